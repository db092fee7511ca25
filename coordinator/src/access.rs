//! API tokens and certificate revocation: creating, listing and revoking them through
//! the log, and deciding who a request's token is ([`authenticate`]).
//!
//! The replicated part is [`crate::state::access`]; this module makes tokens (random
//! secrets, shown once), turns requests into [`AccessOp`]s and keeps this node's
//! handshake deny list ([`swarm_transport::Revocations`]) equal to the replicated one.

use base64::Engine as _;
use rand::RngCore as _;
use subtle::ConstantTimeEq as _;
use swarm_proto::api::{
    CreateToken, CreatedToken, EnrollRequest, EnrollResponse, RevokeCert, RevokedList, Scope,
    TokenList, TokenView,
};
use tracing::info;

use crate::commit::CommitError;
use crate::node::{now_ms, Node};
use crate::state::access::{check_name, normalize_serial, Enrolled, RevokedCert, TokenRecord};
use crate::state::{AccessFault, AccessOp, Op, OpResult};

/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "swt_";
/// Longest validity a token may be given (ten years).
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// Who a request's credentials say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (`bootstrap` for the cluster's configured token; `coordinator`
    /// for a peer coordinator's certificate).
    pub name: String,
    pub scope: Scope,
    /// `None`: every swarm.
    pub swarms: Option<Vec<String>>,
}

impl Principal {
    /// Full powers: the bootstrap token, a peer coordinator.
    pub fn admin(name: &str) -> Self {
        Principal {
            name: name.into(),
            scope: Scope::Admin,
            swarms: None,
        }
    }

    /// Whether this principal may act on swarm `name` (tasks without a swarm run in the
    /// default swarm).
    pub fn may_use_swarm(&self, name: &str) -> bool {
        self.swarms
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == name))
    }
}

/// Why an access request failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Invalid(String),
    /// This node does not enroll workers, or the enrollment token is wrong.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Refused by the replicated state (`conflict`, `not_found`, `limit`, `invalid`).
    #[error("{}", .0.message)]
    Fault(AccessFault),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("{0}")]
    Internal(String),
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The id part of a token (`swt_<id>_<secret>`), if it has that shape.
fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// Who `token` is: the cluster's bootstrap token (`admin`), or a live token of the
/// replicated list. `None`: neither (unknown, revoked, expired or malformed). Compares
/// in constant time.
pub fn authenticate(node: &Node, token: &[u8]) -> Option<Principal> {
    let bootstrap = node.config().api_token.as_bytes();
    if !token.is_empty() && bool::from(token.ct_eq(bootstrap)) {
        return Some(Principal::admin("bootstrap"));
    }
    let token = std::str::from_utf8(token).ok()?;
    let id = token_id(token)?;
    let access = node.read_table(|t| t.access().clone());
    let record = access.token(id)?;
    if !bool::from(sha256(token.as_bytes()).ct_eq(&record.hash)) || record.expired(now_ms()) {
        return None;
    }
    Some(Principal {
        name: record.name.clone(),
        scope: record.scope,
        swarms: (!record.swarms.is_empty()).then(|| record.swarms.clone()),
    })
}

async fn propose(node: &Node, op: AccessOp) -> Result<(), AccessError> {
    let result = node
        .propose_client(vec![Op::Access(op)])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    match result.first() {
        Some(OpResult::Access(Ok(()))) => Ok(()),
        Some(OpResult::Access(Err(f))) => Err(AccessError::Fault(f.clone())),
        Some(OpResult::Restoring) => Err(CommitError::Restoring.into()),
        other => Err(AccessError::Internal(format!(
            "unexpected result {other:?}"
        ))),
    }
}

/// Make a token (`POST /v1/tokens`): the secret is returned this once.
pub(crate) async fn create_token(
    node: &Node,
    req: CreateToken,
) -> Result<CreatedToken, AccessError> {
    check_name(&req.name).map_err(AccessError::Invalid)?;
    for s in &req.swarms {
        swarm_topology::validate_name(s).map_err(|e| AccessError::Invalid(e.to_string()))?;
    }
    if req.ttl_secs == Some(0) || req.ttl_secs.is_some_and(|t| t > MAX_TTL_SECS) {
        return Err(AccessError::Invalid(format!(
            "ttl_secs runs from 1 to {MAX_TTL_SECS}"
        )));
    }
    let (mut id, mut secret) = ([0u8; 6], [0u8; 32]);
    {
        let mut rng = rand::thread_rng();
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
    }
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!(
        "{TOKEN_PREFIX}{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let now = now_ms();
    let record = TokenRecord {
        id,
        name: req.name,
        scope: req.scope,
        swarms: req.swarms,
        hash: sha256(token.as_bytes()),
        created_at_ms: now,
        expires_at_ms: req.ttl_secs.map(|t| now + t * 1000),
    };
    let view = record.view();
    propose(
        node,
        AccessOp::TokenCreate {
            record,
            now_ms: now,
        },
    )
    .await?;
    info!(token = %view.name, id = %view.id, scope = %view.scope, "API token created");
    Ok(CreatedToken { view, token })
}

/// Every live token (`GET /v1/tokens`), by name.
pub(crate) fn list_tokens(node: &Node) -> TokenList {
    let access = node.read_table(|t| t.access().clone());
    let now = now_ms();
    let mut tokens: Vec<TokenView> = access
        .tokens
        .values()
        .filter(|t| !t.expired(now))
        .map(TokenRecord::view)
        .collect();
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    TokenList { tokens }
}

/// Revoke a token by id or name (`DELETE /v1/tokens/{token}`): refused from the moment
/// each node applies the entry.
pub(crate) async fn revoke_token(node: &Node, token: &str) -> Result<(), AccessError> {
    propose(
        node,
        AccessOp::TokenRevoke {
            token: token.to_string(),
            now_ms: now_ms(),
        },
    )
    .await?;
    info!(token, "API token revoked");
    Ok(())
}

/// Revoke a certificate (`POST /v1/certs/revoked`): every coordinator refuses it from
/// the next handshake and cuts the sessions it holds.
pub(crate) async fn revoke_cert(node: &Node, req: RevokeCert) -> Result<(), AccessError> {
    let serial = normalize_serial(&req.serial).map_err(AccessError::Invalid)?;
    if node.identity().revocations().is_revoked(&serial) {
        return Ok(());
    }
    let now = now_ms();
    propose(
        node,
        AccessOp::CertRevoke {
            cert: RevokedCert {
                serial: serial.clone(),
                subject: req.subject.chars().take(256).collect(),
                not_after_ms: req.not_after_ms,
                revoked_at_ms: now,
            },
            now_ms: now,
        },
    )
    .await?;
    info!(serial, subject = %req.subject, "certificate revoked");
    Ok(())
}

/// Every revoked certificate (`GET /v1/certs/revoked`), by serial.
pub(crate) fn list_revoked(node: &Node) -> RevokedList {
    let access = node.read_table(|t| t.access().clone());
    RevokedList {
        revoked: access.revoked.values().map(RevokedCert::view).collect(),
    }
}

/// Whether `token` is this node's enrollment token (constant time); `Err` says why not.
pub fn check_enroll_token(node: &Node, token: &[u8]) -> Result<(), AccessError> {
    let Some(cfg) = &node.config().enroll else {
        return Err(AccessError::Unauthorized(
            "this coordinator does not enroll workers (start it with --enroll-ca-key and --enroll-token-file)",
        ));
    };
    if token.is_empty() || !bool::from(token.ct_eq(cfg.token.as_bytes())) {
        return Err(AccessError::Unauthorized("invalid enrollment token"));
    }
    Ok(())
}

/// Sign a worker certificate for a new worker (`POST /v1/certs/enroll`, leader): the
/// name must carry the enrollment prefix and never have been enrolled while a
/// certificate for it is valid; the signature over the request's key is checked; the
/// certificate is returned only once the enrollment is committed.
pub(crate) async fn enroll(node: &Node, req: EnrollRequest) -> Result<EnrollResponse, AccessError> {
    let Some(cfg) = node.config().enroll.clone() else {
        return Err(AccessError::Unauthorized(
            "this coordinator does not enroll workers",
        ));
    };
    let name = swarm_transport::CertName::parse(&req.name).map_err(AccessError::Invalid)?;
    let swarm_transport::CertName::Node(plain) = &name else {
        return Err(AccessError::Invalid(format!(
            "{:?} names a pool; enrollment signs one worker's name",
            req.name
        )));
    };
    if !plain.starts_with(&cfg.prefix) {
        return Err(AccessError::Invalid(format!(
            "worker names enrolled here start with {:?}; {plain:?} does not",
            cfg.prefix
        )));
    }
    if req.csr.len() > 16 * 1024 {
        return Err(AccessError::Invalid(
            "a signing request of over 16 KiB".into(),
        ));
    }
    let ca = node.config().certs_dir.join("ca.pem");
    let issuer = swarm_transport::Issuer::load(&ca, &cfg.ca_key)
        .map_err(|e| AccessError::Internal(format!("the enrollment CA does not load: {e:#}")))?;
    let pem = issuer
        .sign_request(
            &req.csr,
            swarm_transport::Role::Worker,
            &name,
            &[],
            cfg.validity,
        )
        .map_err(|e| AccessError::Invalid(format!("unusable signing request: {e:#}")))?;
    let info = swarm_transport::CertInfo::from_pem(&pem)
        .map_err(|e| AccessError::Internal(format!("reading the signed certificate: {e:#}")))?;
    let not_after_ms = u64::try_from(info.not_after_unix)
        .unwrap_or(0)
        .saturating_mul(1000);
    let now = now_ms();
    propose(
        node,
        AccessOp::Enroll {
            name: plain.clone(),
            cert: Enrolled {
                serial: info.serial.clone(),
                key_sha256: sha256(&info.public_key),
                not_after_ms,
                enrolled_at_ms: now,
            },
            now_ms: now,
        },
    )
    .await?;
    info!(worker = %plain, serial = %info.serial, "worker enrolled");
    metrics::counter!("swarm_workers_enrolled_total").increment(1);
    Ok(EnrollResponse {
        certificate: pem,
        serial: info.serial,
        not_after_ms,
    })
}

/// Bring this node's handshake deny list up to the replicated one (after entries apply
/// or a snapshot installs). Costs a version compare when nothing changed: it runs after
/// every apply.
pub(crate) fn sync_revocations(node: &Node) {
    use std::sync::atomic::Ordering;
    let want = node.read_table(|t| t.access().revoked_version) + 1;
    if node.revocations_synced.load(Ordering::Acquire) == want {
        return;
    }
    let access = node.read_table(|t| t.access().clone());
    node.identity()
        .revocations()
        .replace(access.revoked.keys().cloned());
    node.revocations_synced
        .store(access.revoked_version + 1, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_come_from_the_token_shape() {
        assert_eq!(token_id("swt_0a1b_secret"), Some("0a1b"));
        assert_eq!(token_id("swt__secret"), None);
        assert_eq!(token_id("swt_0a1b_"), None);
        assert_eq!(token_id("other"), None);
    }

    #[test]
    fn scopes_include_the_weaker_ones() {
        assert!(Scope::Admin.allows(Scope::Read));
        assert!(Scope::Operate.allows(Scope::Submit));
        assert!(!Scope::Submit.allows(Scope::Operate));
        assert!(!Scope::Read.allows(Scope::Submit));
    }
}
