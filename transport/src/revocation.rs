//! A certificate revocation deny list, enforced in every TLS handshake.
//!
//! [`Revocations`] is a shared set of revoked certificate serial numbers (the format of
//! [`CertInfo::serial`](crate::pki::CertInfo::serial), see [`serial_of_der`]). Every
//! [`Identity`](crate::tls::Identity) holds one, and every verifier built from the
//! identity (client certificates on QUIC and HTTPS servers, server certificates on
//! dialers) refuses a leaf certificate whose serial is in it with
//! [`rustls::CertificateError::Revoked`].
//!
//! # Resumption
//!
//! A resumed TLS session (QUIC 0-RTT / 1-RTT resumption, TLS 1.2 session ids) skips
//! certificate verification: the peer's certificate is taken from the stored session.
//! The session caches of configurations built from an identity are therefore emptied
//! whenever its deny list changes, so after a revocation a peer must do a full handshake,
//! which the verifier refuses. (They are also emptied whenever the identity's trusted CAs
//! change, see [`Identity::reload`](crate::tls::Identity::reload), so a peer whose CA is
//! no longer trusted cannot resume either; that does not wake
//! [`Revocations::subscribe`]rs, since the deny list did not change.) That still leaves a
//! window: a handshake verified just before a change can store its session just after
//! it. Changing the list also does nothing to connections already up. So the check
//! after the handshake is the authoritative one: servers (and dialers) must check
//! [`peer_serial`](crate::tls::peer_serial) with
//! [`require_not_revoked`](crate::tls::require_not_revoked) once the handshake has
//! completed, and [`Revocations::subscribe`] tells when live connections must be checked
//! again.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::{DigitallySignedStruct, DistinguishedName, NamedGroup, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;

pub use crate::pki::serial_of_der;
use crate::pki::CertSubject;
use crate::tls::Trust;

/// A shared, atomically replaceable set of revoked certificate serials: lower-case hex
/// without separators, as in [`CertInfo::serial`](crate::pki::CertInfo::serial).
///
/// Clones share the set: a [`Revocations::replace`] on any clone is seen by every
/// verifier built from any other, from the next handshake on.
#[derive(Clone)]
pub struct Revocations {
    shared: Arc<Shared>,
}

struct Shared {
    /// The current set. Readers clone the `Arc` (or look up under the read lock); a
    /// replacement swaps in a whole new set.
    serials: RwLock<Arc<HashSet<String>>>,
    /// The generation, bumped (under the write lock of `serials`) on every change.
    changes: watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Revocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocations")
            .field("len", &self.len())
            .field("generation", &self.generation())
            .finish()
    }
}

impl Revocations {
    /// An empty deny list, generation 0.
    pub fn new() -> Revocations {
        Revocations {
            shared: Arc::new(Shared {
                serials: RwLock::new(Arc::new(HashSet::new())),
                changes: watch::Sender::new(0),
            }),
        }
    }

    /// Replaces the whole set with `serials` at once. Each serial is normalised: spaces
    /// around it and `:` separators are removed and hex digits lower-cased, so
    /// `AB:01` and `ab01` are the same serial; empty entries are ignored. If the set
    /// changed, bumps [`Revocations::generation`] and wakes every
    /// [`Revocations::subscribe`]r. Returns whether it changed.
    pub fn replace(&self, serials: impl IntoIterator<Item = String>) -> bool {
        let fresh: HashSet<String> = serials
            .into_iter()
            .map(|s| normalize(&s).into_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let mut current = match self.shared.serials.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if **current == fresh {
            return false;
        }
        *current = Arc::new(fresh);
        // Still under the write lock: whoever sees the new generation sees the new set.
        self.shared.changes.send_modify(|g| *g = g.wrapping_add(1));
        true
    }

    /// Whether `serial` (normalised like [`Revocations::replace`] does) is revoked.
    /// Allocates only if `serial` is not already in normal form.
    pub fn is_revoked(&self, serial: &str) -> bool {
        let serial = normalize(serial);
        self.read(|set| set.contains(serial.as_ref()))
    }

    /// Whether the DER-encoded certificate `der` has a revoked serial. A certificate
    /// that does not parse counts as not revoked: this is a deny list, not a validity
    /// check, and every handshake verifier refuses such a certificate anyway (the list
    /// is only consulted after the CA check passed).
    pub fn is_revoked_der(&self, der: &[u8]) -> bool {
        let set = self.snapshot();
        if set.is_empty() {
            // The common case pays no parsing.
            return false;
        }
        serial_of_der(der).is_ok_and(|serial| set.contains(&serial))
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        self.read(HashSet::len)
    }

    /// Whether no serial is revoked.
    pub fn is_empty(&self) -> bool {
        self.read(HashSet::is_empty)
    }

    /// The revoked serials, in no particular order.
    pub fn serials(&self) -> Vec<String> {
        self.read(|set| set.iter().cloned().collect())
    }

    /// Counts changes of the set: 0 when created, bumped by every
    /// [`Revocations::replace`] that changed it (and only those).
    pub fn generation(&self) -> u64 {
        *self.shared.changes.borrow()
    }

    /// A receiver of the generation that is notified whenever the set changes, e.g. to
    /// check live connections again with [`crate::tls::require_not_revoked`]. A change
    /// made before this call does not count as unseen.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// The current set, for several lookups without holding the lock.
    fn snapshot(&self) -> Arc<HashSet<String>> {
        match self.shared.serials.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&HashSet<String>) -> T) -> T {
        let guard = match self.shared.serials.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&guard)
    }

    /// Refuses `end_entity` (already accepted by the CA check) if its serial is revoked,
    /// logging which certificate was refused. `peer` says whose certificate it is.
    pub(crate) fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        peer: &str,
    ) -> Result<(), rustls::Error> {
        let set = self.snapshot();
        if set.is_empty() {
            return Ok(());
        }
        // The CA check parsed it already; if it does not parse here, see is_revoked_der.
        let Ok(serial) = serial_of_der(end_entity) else {
            return Ok(());
        };
        if !set.contains(&serial) {
            return Ok(());
        }
        let subject = match CertSubject::from_cert_der(end_entity) {
            Ok(s) => s.to_string(),
            Err(e) => format!("(unreadable: {e})"),
        };
        tracing::warn!(%serial, %subject, "refusing a {peer} whose certificate is revoked");
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked,
        ))
    }
}

/// `serial` without surrounding spaces and `:` separators, lower-cased; borrowed when it
/// already is.
fn normalize(serial: &str) -> Cow<'_, str> {
    let trimmed = serial.trim();
    if trimmed.bytes().any(|b| b == b':' || b.is_ascii_uppercase()) {
        Cow::Owned(
            trimmed
                .chars()
                .filter(|c| *c != ':')
                .map(|c| c.to_ascii_lowercase())
                .collect(),
        )
    } else {
        Cow::Borrowed(trimmed)
    }
}

/// A client certificate verifier that refuses revoked certificates: the WebPKI verifier
/// of the CAs `trust` holds at the time of the call (one requiring a client certificate,
/// or letting a client without one in if `optional`) decides everything (whether to ask
/// for a certificate, the CA check, signatures), then a leaf it accepted is refused if
/// its serial is in `revocations`.
#[derive(Debug)]
pub(crate) struct DenyListClientVerifier {
    pub(crate) trust: Arc<Trust>,
    pub(crate) optional: bool,
    pub(crate) revocations: Revocations,
}

impl DenyListClientVerifier {
    /// The WebPKI verifier of the CAs trusted now.
    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        let set = self.trust.current();
        if self.optional {
            set.client_optional.clone()
        } else {
            set.client.clone()
        }
    }
}

impl ClientCertVerifier for DenyListClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner().offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner().client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints are optional, and a borrow cannot outlive the look-up of the CAs
        // trusted now (they may be replaced at any time): send none.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner()
            .verify_client_cert(end_entity, intermediates, now)?;
        self.revocations.check(end_entity, "client")?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner().requires_raw_public_keys()
    }
}

/// A cache that is emptied whenever a deny list or a set of trusted CAs changes (see
/// the module docs), so no session stored before a revocation, or verified under CAs
/// trusted no more, can be resumed after it.
#[derive(Debug)]
struct FlushedOnChange<C> {
    revocations: Revocations,
    trust: Arc<Trust>,
    make: fn(usize) -> Arc<C>,
    capacity: usize,
    /// The cache, and the generations (deny list, trusted CAs) it was made under.
    current: Mutex<((u64, u64), Arc<C>)>,
}

impl<C> FlushedOnChange<C> {
    fn new(
        revocations: Revocations,
        trust: Arc<Trust>,
        capacity: usize,
        make: fn(usize) -> Arc<C>,
    ) -> Self {
        let generations = (revocations.generation(), trust.generation());
        FlushedOnChange {
            revocations,
            trust,
            make,
            capacity,
            current: Mutex::new((generations, make(capacity))),
        }
    }

    /// The cache for the deny list and the trusted CAs as they are now.
    fn cache(&self) -> Arc<C> {
        let generations = (self.revocations.generation(), self.trust.generation());
        let mut current = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.0 != generations {
            tracing::debug!(
                deny_list = generations.0,
                trusted_cas = generations.1,
                "deny list or trusted CAs changed: forgetting resumable TLS sessions"
            );
            *current = (generations, (self.make)(self.capacity));
        }
        current.1.clone()
    }
}

/// Server-side session storage (stateful resumption, as 0-RTT requires) holding up to
/// `capacity` sessions, emptied whenever `revocations` or `trust` changes.
pub(crate) fn server_sessions(
    revocations: &Revocations,
    trust: &Arc<Trust>,
    capacity: usize,
) -> Arc<dyn StoresServerSessions> {
    Arc::new(ServerSessions(FlushedOnChange::new(
        revocations.clone(),
        trust.clone(),
        capacity,
        ServerSessionMemoryCache::new,
    )))
}

/// Client-side session storage for up to `capacity` servers, emptied whenever
/// `revocations` or `trust` changes.
pub(crate) fn client_sessions(
    revocations: &Revocations,
    trust: &Arc<Trust>,
    capacity: usize,
) -> Arc<dyn ClientSessionStore> {
    Arc::new(ClientSessions(FlushedOnChange::new(
        revocations.clone(),
        trust.clone(),
        capacity,
        |n| Arc::new(ClientSessionMemoryCache::new(n)),
    )))
}

#[derive(Debug)]
struct ServerSessions(FlushedOnChange<ServerSessionMemoryCache>);

impl StoresServerSessions for ServerSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.cache().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.cache().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.cache().take(key)
    }

    fn can_cache(&self) -> bool {
        self.0.cache().can_cache()
    }
}

#[derive(Debug)]
struct ClientSessions(FlushedOnChange<ClientSessionMemoryCache>);

impl ClientSessionStore for ClientSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.0.cache().set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.cache().kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.0.cache().set_tls12_session(server_name, value)
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.0.cache().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.0.cache().remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.0.cache().insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.0.cache().take_tls13_ticket(server_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(serials: &[&str]) -> Vec<String> {
        serials.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn serials_are_normalised_on_replace_and_lookup() {
        let r = Revocations::new();
        assert!(r.is_empty());
        assert!(!r.is_revoked("ab01"));
        assert!(r.replace(set(&["AB:01", " 7f ", ""])));
        assert_eq!(r.len(), 2);
        for probe in ["ab01", "AB01", "ab:01", "7f", "7F"] {
            assert!(r.is_revoked(probe), "{probe}");
        }
        assert!(!r.is_revoked("ab02"));
        assert!(!r.is_revoked(""));
        let mut serials = r.serials();
        serials.sort();
        assert_eq!(serials, set(&["7f", "ab01"]));
    }

    #[tokio::test]
    async fn generation_counts_changes_and_wakes_subscribers() {
        let r = Revocations::default();
        let clone = r.clone();
        assert_eq!(r.generation(), 0);
        let mut rx = r.subscribe();
        assert!(!rx.has_changed().unwrap());

        assert!(clone.replace(set(&["01"])));
        assert_eq!(r.generation(), 1);
        assert!(rx.has_changed().unwrap());
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 1);

        // The same set, spelled differently: no change, no wake-up.
        assert!(!r.replace(set(&["0:1"])));
        assert_eq!(r.generation(), 1);
        assert!(!rx.has_changed().unwrap());

        // A waiting subscriber is woken by a change made elsewhere.
        let waiter = tokio::spawn(async move {
            rx.changed().await.unwrap();
            let generation = *rx.borrow_and_update();
            generation
        });
        tokio::task::yield_now().await;
        assert!(clone.replace(Vec::new()));
        assert_eq!(waiter.await.unwrap(), 2);
        assert_eq!(r.generation(), 2);
        assert!(r.is_empty());
        // Emptying an empty list changes nothing.
        assert!(!r.replace(Vec::new()));
        assert_eq!(r.generation(), 2);
    }

    #[test]
    fn der_lookup_uses_the_certificate_info_format() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let serial = serial_of_der(cert.der()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        assert_eq!(serial, parsed.raw_serial_as_string().replace(':', ""));
        assert!(serial
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

        let r = Revocations::new();
        assert!(!r.is_revoked_der(cert.der()));
        r.replace([serial.to_uppercase()]);
        assert!(r.is_revoked_der(cert.der()));
        assert!(!r.is_revoked_der(b"not a certificate"));
        assert!(serial_of_der(b"not a certificate").is_err());
    }
}
