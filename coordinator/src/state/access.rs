//! Who may use the cluster, replicated like the tasks: the API tokens (their secrets'
//! hashes, never the secrets) and the certificates refused in every handshake.
//!
//! Enrolled names (worker certificates coordinators signed) are kept until their
//! certificates expire, so no name is signed twice.
//!
//! A token is `swt_<id>_<secret>`: `id` finds the record, the SHA-256 of the whole token
//! must match the record's hash (compared in constant time). Secrets are 256 random bits,
//! so a fast hash is enough; nothing here can recover a token.
//!
//! Every change is an [`AccessOp`] in the log and applies identically on every replica:
//! creation and revocation take effect on every node as soon as it applies the entry, with
//! no restart. Expired tokens and revocations of certificates past their own expiry are
//! dropped by the next access op (their time is the op's, not a replica's clock).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use swarm_proto::api::{RevokedView, Scope, TokenView};

/// Most tokens a cluster holds.
pub const MAX_TOKENS: usize = 10_000;
/// Most revoked certificates a cluster lists.
pub const MAX_REVOKED: usize = 100_000;
/// Longest token name.
pub const MAX_NAME: usize = 64;
/// Most enrolled worker certificates valid at once.
pub const MAX_ENROLLED: usize = 200_000;
/// Most swarms one token may be limited to.
pub const MAX_TOKEN_SWARMS: usize = 64;

/// A token as stored: everything but the secret, and the SHA-256 of the whole token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    /// Empty: every swarm.
    pub swarms: Vec<String>,
    pub hash: [u8; 32],
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

impl TokenRecord {
    pub fn view(&self) -> TokenView {
        TokenView {
            id: self.id.clone(),
            name: self.name.clone(),
            scope: self.scope,
            swarms: self.swarms.clone(),
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }

    /// Whether the token is past its expiry at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }
}

/// A certificate refused in every handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCert {
    /// Lower-case hex, no separators.
    pub serial: String,
    pub subject: String,
    pub not_after_ms: Option<u64>,
    pub revoked_at_ms: u64,
}

impl RevokedCert {
    pub fn view(&self) -> RevokedView {
        RevokedView {
            serial: self.serial.clone(),
            subject: self.subject.clone(),
            not_after_ms: self.not_after_ms,
            revoked_at_ms: self.revoked_at_ms,
        }
    }
}

/// A worker certificate a coordinator signed for a name (enrollment): that name is never
/// signed again while the certificate is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub serial: String,
    /// SHA-256 of the certificate's public key: enrolling the same name with the same key
    /// again (a retry whose answer was lost) is answered, not refused.
    pub key_sha256: [u8; 32],
    pub not_after_ms: u64,
    pub enrolled_at_ms: u64,
}

/// A change to [`Access`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AccessOp {
    /// Add a token; refused if its id or name is taken or the list is full.
    TokenCreate { record: TokenRecord, now_ms: u64 },
    /// Remove the token with this id or name.
    TokenRevoke { token: String, now_ms: u64 },
    /// Refuse a certificate from now on (a no-op if it is listed already).
    CertRevoke { cert: RevokedCert, now_ms: u64 },
    /// A worker certificate was signed for `name`; refused if that name holds a valid one.
    Enroll {
        name: String,
        cert: Enrolled,
        now_ms: u64,
    },
}

/// Why an [`AccessOp`] was refused: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessFault {
    pub code: String,
    pub message: String,
}

impl AccessFault {
    fn new(code: &str, message: impl Into<String>) -> Self {
        AccessFault {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The replicated access state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Access {
    /// By id.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// By serial.
    pub revoked: BTreeMap<String, RevokedCert>,
    /// Names enrolled, with their certificates, until those expire.
    pub enrolled: BTreeMap<String, Enrolled>,
    /// Bumped whenever `revoked` changes: nodes rebuild their handshake deny list only
    /// then (equal versions of one log hold equal lists).
    pub revoked_version: u64,
}

/// Checks a token name: 1 to [`MAX_NAME`] letters, digits, `.`, `_` or `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a token name takes 1 to {MAX_NAME} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "token name {name:?}: only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Normalises a certificate serial (hex, any case, `:` separators allowed).
pub fn normalize_serial(serial: &str) -> Result<String, String> {
    let s: String = serial
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if s.is_empty() || s.len() > 40 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{serial:?} is not a certificate serial (up to 20 bytes of hex)"
        ));
    }
    Ok(s)
}

impl Access {
    /// Apply one op. Deterministic: same ops, same state.
    pub fn apply(&mut self, op: &AccessOp) -> Result<(), AccessFault> {
        match op {
            AccessOp::TokenCreate { record, now_ms } => {
                self.prune(*now_ms);
                check_name(&record.name).map_err(|m| AccessFault::new("invalid", m))?;
                if record.swarms.len() > MAX_TOKEN_SWARMS {
                    return Err(AccessFault::new(
                        "invalid",
                        format!("a token names at most {MAX_TOKEN_SWARMS} swarms"),
                    ));
                }
                if self.tokens.contains_key(&record.id) {
                    return Err(AccessFault::new(
                        "conflict",
                        format!("a token with id {} exists", record.id),
                    ));
                }
                if self.tokens.values().any(|t| t.name == record.name) {
                    return Err(AccessFault::new(
                        "conflict",
                        format!("a token named {:?} exists", record.name),
                    ));
                }
                if self.tokens.len() >= MAX_TOKENS {
                    return Err(AccessFault::new(
                        "limit",
                        format!("the cluster holds {MAX_TOKENS} tokens already; revoke some"),
                    ));
                }
                self.tokens.insert(record.id.clone(), record.clone());
                Ok(())
            }
            AccessOp::TokenRevoke { token, now_ms } => {
                self.prune(*now_ms);
                let id = match self.tokens.get(token) {
                    Some(t) => t.id.clone(),
                    None => self
                        .tokens
                        .values()
                        .find(|t| &t.name == token)
                        .map(|t| t.id.clone())
                        .ok_or_else(|| {
                            AccessFault::new("not_found", format!("no token {token:?}"))
                        })?,
                };
                self.tokens.remove(&id);
                Ok(())
            }
            AccessOp::CertRevoke { cert, now_ms } => {
                self.prune(*now_ms);
                if self.revoked.contains_key(&cert.serial) {
                    return Ok(());
                }
                if self.revoked.len() >= MAX_REVOKED {
                    return Err(AccessFault::new(
                        "limit",
                        format!(
                            "{MAX_REVOKED} certificates are revoked and not yet expired; \
                             rotate the cluster CA"
                        ),
                    ));
                }
                self.revoked.insert(cert.serial.clone(), cert.clone());
                self.revoked_version += 1;
                Ok(())
            }
            AccessOp::Enroll { name, cert, now_ms } => {
                self.prune(*now_ms);
                if let Some(e) = self.enrolled.get(name) {
                    if self.revoked.contains_key(&e.serial) {
                        // Else the holder of a revoked certificate could renew it.
                        return Err(AccessFault::new(
                            "revoked",
                            format!(
                                "worker {name:?}'s certificate {} is revoked; the name cannot \
                                 be enrolled again while it would be valid",
                                e.serial
                            ),
                        ));
                    }
                    if e.key_sha256 == cert.key_sha256 {
                        // The same key asking again: its latest certificate counts.
                        self.enrolled.insert(name.clone(), cert.clone());
                        return Ok(());
                    }
                    return Err(AccessFault::new(
                        "conflict",
                        format!(
                            "worker {name:?} was enrolled already (certificate {}); a name is \
                             enrolled once: revoke and retire it, or use a new name",
                            e.serial
                        ),
                    ));
                }
                if self.enrolled.len() >= MAX_ENROLLED {
                    return Err(AccessFault::new(
                        "limit",
                        format!("{MAX_ENROLLED} enrolled certificates are still valid"),
                    ));
                }
                self.enrolled.insert(name.clone(), cert.clone());
                Ok(())
            }
        }
    }

    /// Drop expired tokens and revocations of certificates that have expired themselves.
    fn prune(&mut self, now_ms: u64) {
        self.tokens.retain(|_, t| !t.expired(now_ms));
        let before = self.revoked.len();
        self.revoked
            .retain(|_, c| c.not_after_ms.is_none_or(|t| t > now_ms));
        if self.revoked.len() != before {
            self.revoked_version += 1;
        }
        self.enrolled.retain(|_, e| e.not_after_ms > now_ms);
    }

    /// The token with this id, if any.
    pub fn token(&self, id: &str) -> Option<&TokenRecord> {
        self.tokens.get(id)
    }

    /// Whether this serial (normalised) is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.contains_key(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, name: &str, expires: Option<u64>) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            name: name.into(),
            scope: Scope::Read,
            swarms: vec![],
            hash: [7; 32],
            created_at_ms: 1,
            expires_at_ms: expires,
        }
    }

    #[test]
    fn tokens_are_created_once_and_revoked_by_id_or_name() {
        let mut a = Access::default();
        let create = |record| AccessOp::TokenCreate { record, now_ms: 10 };
        a.apply(&create(token("a1", "ci", None))).unwrap();
        assert_eq!(
            a.apply(&create(token("a1", "other", None)))
                .unwrap_err()
                .code,
            "conflict"
        );
        assert_eq!(
            a.apply(&create(token("a2", "ci", None))).unwrap_err().code,
            "conflict"
        );
        assert_eq!(
            a.apply(&create(token("a3", "bad name", None)))
                .unwrap_err()
                .code,
            "invalid"
        );
        a.apply(&create(token("a4", "ui", None))).unwrap();
        a.apply(&AccessOp::TokenRevoke {
            token: "ci".into(),
            now_ms: 11,
        })
        .unwrap();
        a.apply(&AccessOp::TokenRevoke {
            token: "a4".into(),
            now_ms: 11,
        })
        .unwrap();
        assert!(a.tokens.is_empty());
        assert_eq!(
            a.apply(&AccessOp::TokenRevoke {
                token: "ci".into(),
                now_ms: 12
            })
            .unwrap_err()
            .code,
            "not_found"
        );
    }

    #[test]
    fn expired_entries_go_with_the_next_op() {
        let mut a = Access::default();
        a.apply(&AccessOp::TokenCreate {
            record: token("a1", "short", Some(100)),
            now_ms: 10,
        })
        .unwrap();
        a.apply(&AccessOp::CertRevoke {
            cert: RevokedCert {
                serial: "0a".into(),
                subject: "w1".into(),
                not_after_ms: Some(150),
                revoked_at_ms: 10,
            },
            now_ms: 10,
        })
        .unwrap();
        assert!(a.is_revoked("0a"));
        a.apply(&AccessOp::CertRevoke {
            cert: RevokedCert {
                serial: "0b".into(),
                subject: "w2".into(),
                not_after_ms: None,
                revoked_at_ms: 200,
            },
            now_ms: 200,
        })
        .unwrap();
        assert!(a.tokens.is_empty());
        assert!(!a.is_revoked("0a"));
        assert!(a.is_revoked("0b"));
    }

    #[test]
    fn a_name_is_enrolled_once_until_its_certificate_expires() {
        let mut a = Access::default();
        let enroll = |serial: &str, now_ms| AccessOp::Enroll {
            name: "worker-abc".into(),
            cert: Enrolled {
                serial: serial.into(),
                key_sha256: [serial.len() as u8 + now_ms as u8; 32],
                not_after_ms: 1_000,
                enrolled_at_ms: now_ms,
            },
            now_ms,
        };
        a.apply(&enroll("01", 10)).unwrap();
        assert_eq!(a.apply(&enroll("02", 20)).unwrap_err().code, "conflict");
        // The same key again (a retry): answered, the newest certificate recorded.
        let mut retry = enroll("04", 10);
        if let AccessOp::Enroll { cert, .. } = &mut retry {
            cert.key_sha256 = [2 + 10; 32];
        }
        a.apply(&retry).unwrap();
        assert_eq!(a.enrolled["worker-abc"].serial, "04");
        // Once the first certificate has expired, the name may be enrolled again.
        a.apply(&enroll("03", 1_000)).unwrap();
        assert_eq!(a.enrolled["worker-abc"].serial, "03");
    }

    /// A revoked certificate cannot be renewed by its holder (the same key asking
    /// again), nor the name taken by another key, until it would have expired.
    #[test]
    fn a_revoked_enrollment_is_not_renewed() {
        let mut a = Access::default();
        let enroll = |serial: &str, key: u8, now_ms| AccessOp::Enroll {
            name: "worker-abc".into(),
            cert: Enrolled {
                serial: serial.into(),
                key_sha256: [key; 32],
                not_after_ms: 1_000,
                enrolled_at_ms: now_ms,
            },
            now_ms,
        };
        a.apply(&enroll("01", 7, 10)).unwrap();
        a.apply(&AccessOp::CertRevoke {
            cert: RevokedCert {
                serial: "01".into(),
                subject: "worker worker-abc".into(),
                not_after_ms: Some(1_000),
                revoked_at_ms: 20,
            },
            now_ms: 20,
        })
        .unwrap();
        assert_eq!(a.apply(&enroll("02", 7, 30)).unwrap_err().code, "revoked");
        assert_eq!(a.apply(&enroll("03", 8, 30)).unwrap_err().code, "revoked");
        assert_eq!(a.enrolled["worker-abc"].serial, "01");
        a.apply(&enroll("04", 8, 1_000)).unwrap();
        assert_eq!(a.enrolled["worker-abc"].serial, "04");
    }

    #[test]
    fn serials_normalise_and_junk_is_refused() {
        assert_eq!(normalize_serial("0A:1b:FF").unwrap(), "0a1bff");
        assert!(normalize_serial("").is_err());
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial(&"a".repeat(41)).is_err());
    }
}
