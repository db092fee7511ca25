//! The TLS side of the quinn configuration: identities, verifiers, role checks.
//!
//! Every process in a cluster holds a certificate issued by one cluster CA (see
//! [`crate::pki`]). Both sides of every connection present a certificate and verify the
//! other's against that CA, so a connection exists only between members of the same
//! cluster. Which member a peer is ([`CertSubject`]: role and name) is written in its
//! certificate's subject. A dialer names the role it expects to reach and the handshake
//! fails unless the server's certificate states it; an acceptor checks the client's role
//! after the handshake ([`require_role`], [`crate::Accepted::authenticate_as`]).
//!
//! The CAs a node trusts are not fixed at load: [`Identity::reload`] takes a changed
//! `ca.pem` (one CA certificate or a bundle of several), and every configuration and
//! verifier built from the identity, before or after, checks peers against the CAs
//! trusted at the time of each handshake. That is how a cluster moves to a new CA
//! without a restart: every node first trusts the old and the new CA (a bundle), then
//! gets a certificate from the new one, and finally trusts the new CA only.
//!
//! Each identity also holds a deny list of revoked certificate serials
//! ([`Identity::revocations`]): every verifier built from it refuses a revoked peer
//! certificate in the handshake. Resumed sessions skip verification, so an acceptor (and
//! a dialer) must also check the peer after the handshake with [`require_not_revoked`]
//! (see [`crate::revocation`]).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::endpoint::REVOKED_CODE;
pub use crate::pki::{
    init_certs, issue_cert, renew_cert, serial_of_der, CertFiles, CertInfo, CertName, CertSubject,
    Role,
};
use crate::revocation::{client_sessions, server_sessions, DenyListClientVerifier, Revocations};
use crate::TransportError;

/// Resumption sessions a server remembers. Each reconnecting peer uses one, and a
/// missing session only costs a full handshake, so this just needs to cover a large
/// cluster's reconnect burst.
const SERVER_SESSION_CACHE: usize = 16 * 1024;
/// Servers a client remembers resumption sessions for.
const CLIENT_SESSION_CACHE: usize = 256;
/// Resumption sessions an HTTPS server remembers (rustls' default).
const HTTPS_SERVER_SESSION_CACHE: usize = 256;

/// QUIC idle timeout: a peer silent for this long is considered gone.
const IDLE_TIMEOUT_MS: u32 = 30_000;
/// Keep-alive interval, well below the idle timeout so a few lost pings are tolerated.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Concurrent streams each side lets its peer open.
const MAX_STREAMS: u32 = 1024;

/// A cluster member's credentials: the cluster CAs to verify peers against, its own
/// certificate chain and private key, and who its certificate says it is.
///
/// Clones share the certificate: [`Identity::reload`] (or the loop of
/// [`Identity::spawn_reload`]) swaps in a renewed certificate and key for every
/// configuration built from any clone, and the next handshake presents it; connections
/// already up keep theirs.
///
/// Clones share the trusted CAs the same way: [`Identity::reload`] also takes a changed
/// `ca.pem`, and every configuration and verifier built from any clone, before or after
/// the change, verifies peers against the CAs trusted at the time of the handshake.
/// Sessions stored under the CAs trusted before are not resumed after the change.
/// Connections already up are not checked again.
///
/// Clones also share the deny list of revoked certificates ([`Identity::revocations`],
/// empty when loaded), which every configuration built from the identity enforces.
#[derive(Clone)]
pub struct Identity {
    trust: Arc<Trust>,
    slot: Arc<CertSlot>,
    subject: CertSubject,
    revocations: Revocations,
}

/// The certificate and key a node presents, swappable while configurations that use it
/// serve handshakes.
struct CertSlot {
    current: RwLock<Arc<rustls::sign::CertifiedKey>>,
    /// The directory the identity was loaded from, its role there, and the modification
    /// times of its files when they were last taken. Its lock also keeps two reloads
    /// from running at once.
    files: Mutex<Option<(PathBuf, Role, FileStamp)>>,
}

/// Modification times of a certificate directory's files that an identity uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    ca: Option<SystemTime>,
    cert: Option<SystemTime>,
    key: Option<SystemTime>,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot").finish_non_exhaustive()
    }
}

impl CertSlot {
    fn get(&self) -> Arc<rustls::sign::CertifiedKey> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, key: Arc<rustls::sign::CertifiedKey>) {
        match self.current.write() {
            Ok(mut c) => *c = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn stamp(files: &CertFiles, role: Role) -> FileStamp {
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    FileStamp {
        ca: modified(&files.ca_cert),
        cert: modified(files.cert(role)),
        key: modified(files.key(role)),
    }
}

/// The CA certificates an identity trusts, shared by its clones and by every
/// configuration and verifier built from them, and replaceable while they serve
/// handshakes ([`Identity::reload`]). Verifiers look up the current [`TrustSet`] on every
/// call, so a replacement takes effect from the next handshake on.
pub(crate) struct Trust {
    current: RwLock<Arc<TrustSet>>,
    /// Bumped (under the write lock of `current`) on every replacement; session caches
    /// are emptied when it changes (see [`crate::revocation`]).
    generation: AtomicU64,
    /// Told the new generation after each replacement, for live connections to be checked
    /// again ([`close_when_distrusted`]).
    changes: tokio::sync::watch::Sender<u64>,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("cas", &self.current().cas.len())
            .field("generation", &self.generation())
            .finish()
    }
}

impl Trust {
    fn new(set: TrustSet) -> Trust {
        Trust {
            current: RwLock::new(Arc::new(set)),
            generation: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The CAs trusted now, with their verifiers.
    pub(crate) fn current(&self) -> Arc<TrustSet> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Counts replacements: 0 when created, bumped by each [`Trust::replace`].
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn replace(&self, set: TrustSet) {
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = Arc::new(set);
        // Still under the write lock: whoever sees the new generation sees the new set.
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.changes.send_replace(generation);
    }
}

/// A set of trusted CA certificates and the WebPKI verifiers for it, built once per set.
pub(crate) struct TrustSet {
    /// The CA certificates, DER, in the order of the file.
    cas: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    /// Checks server certificates: chain to one of the CAs, validity, name.
    pub(crate) server: Arc<WebPkiServerVerifier>,
    /// Checks client certificates, which are required.
    pub(crate) client: Arc<dyn ClientCertVerifier>,
    /// Checks client certificates, letting a client without one in.
    pub(crate) client_optional: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for TrustSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustSet")
            .field("cas", &self.cas.len())
            .finish_non_exhaustive()
    }
}

impl TrustSet {
    /// Parses PEM text holding one or more CA certificates (`label` names it in errors)
    /// and builds the verifiers for them.
    fn from_pem(pem: &str, label: &str) -> anyhow::Result<TrustSet> {
        let cas = parse_certs(pem, label)?;
        let mut roots = RootCertStore::empty();
        for ca in &cas {
            roots
                .add(ca.clone())
                .with_context(|| format!("{label}: not a usable CA certificate"))?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let unusable = || format!("{label}: cannot verify certificates with it");
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .with_context(unusable)?;
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .with_context(unusable)?;
        let client_optional = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .allow_unauthenticated()
            .build()
            .with_context(unusable)?;
        Ok(TrustSet {
            cas,
            roots,
            server,
            client,
            client_optional,
        })
    }

    /// Fails unless `chain` (leaf first) is a certificate valid now under these CAs.
    fn check(&self, chain: &[CertificateDer<'static>]) -> anyhow::Result<()> {
        let (leaf, intermediates) = chain.split_first().context("the chain is empty")?;
        self.client
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(anyhow::Error::new)
    }
}

/// What [`Identity::reload`] changed.
#[derive(Debug, Clone, Copy, Default)]
struct Reloaded {
    cas: bool,
    cert: bool,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("Identity")
            .field("subject", &self.subject)
            .field("roots", &self.trust.current().cas.len())
            .field("revoked", &self.revocations.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the CA certificate(s) and `role`'s certificate and key from a directory
    /// written by [`init_certs`]. Errors name the file that is missing or bad.
    pub fn load(dir: &Path, role: Role) -> anyhow::Result<Identity> {
        let files = CertFiles::in_dir(dir);
        let (ca, cert, key) = (&files.ca_cert, files.cert(role), files.key(role));
        let before = stamp(&files, role);
        let id = Self::build(
            (&read_pem(ca)?, &ca.display().to_string()),
            (&read_pem(cert)?, &cert.display().to_string()),
            (&read_pem(key)?, &key.display().to_string()),
            role,
        )?;
        if let Ok(mut f) = id.slot.files.lock() {
            *f = Some((dir.to_path_buf(), role, before));
        }
        Ok(id)
    }

    /// Takes what changed in the directory this identity was loaded from, judging by the
    /// files' modification times, for every configuration built from it or a clone:
    ///
    /// * The certificate and key: the next handshakes present the new ones. The new
    ///   certificate must name the same node.
    /// * The CA file, `ca.pem`, which may hold several CA certificates (during a CA
    ///   rotation, the old and the new one): the next handshakes verify peers against
    ///   those CAs, and sessions stored before are not resumed. A file holding the very
    ///   CAs trusted already changes nothing.
    ///
    /// Either way the node's own certificate (the new one if it changed, else the
    /// current) must be valid now under the CAs trusted afterwards (the new ones if
    /// `ca.pem` changed), so a node never ends up refusing its own certificate. When both
    /// changed, the new certificate is checked against the new CAs.
    ///
    /// Returns whether it changed anything. On an error nothing changes (neither the
    /// certificate nor the CAs) and the next call tries the files again.
    pub fn reload(&self) -> anyhow::Result<bool> {
        self.reload_files().map(|r| r.cas || r.cert)
    }

    fn reload_files(&self) -> anyhow::Result<Reloaded> {
        // Held to the end: reloads through clones run one at a time.
        let mut loaded = match self.slot.files.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some((dir, role, seen)) = loaded.clone() else {
            bail!("this identity was not loaded from a directory");
        };
        let files = CertFiles::in_dir(&dir);
        let now = stamp(&files, role);
        if now == seen {
            return Ok(Reloaded::default());
        }
        let (ca, cert, key) = (&files.ca_cert, files.cert(role), files.key(role));

        // The CAs first, so a new certificate is checked against the CAs it comes with.
        let trusted = self.trust.current();
        let new_trust = if now.ca != seen.ca {
            let set = TrustSet::from_pem(&read_pem(ca)?, &ca.display().to_string())?;
            (set.cas != trusted.cas).then_some(set)
        } else {
            None
        };
        let new_cert = if (now.cert, now.key) != (seen.cert, seen.key) {
            let (certified, subject) = own_certificate(
                (&read_pem(cert)?, &cert.display().to_string()),
                (&read_pem(key)?, &key.display().to_string()),
                role,
            )?;
            if subject != self.subject {
                bail!(
                    "{} names {subject}, not {}: a renewed certificate must name the same node",
                    cert.display(),
                    self.subject
                );
            }
            Some(Arc::new(certified))
        } else {
            None
        };

        if new_trust.is_some() || new_cert.is_some() {
            let trust = new_trust.as_ref().unwrap_or(&trusted);
            let chain = match &new_cert {
                Some(c) => c.cert.clone(),
                None => self.slot.get().cert.clone(),
            };
            if let Err(e) = trust.check(&chain) {
                let why = match (new_trust.is_some(), new_cert.is_some()) {
                    (true, false) => format!(
                        "{} is refused, the CAs trusted now stay: this node's own certificate \
                         {} is not valid under it",
                        ca.display(),
                        cert.display()
                    ),
                    (true, true) => format!(
                        "the new certificate {} is not valid under the new CAs in {}",
                        cert.display(),
                        ca.display()
                    ),
                    (false, _) => format!(
                        "the new certificate {} is not valid under the cluster CAs this node \
                         trusts",
                        cert.display()
                    ),
                };
                return Err(e.context(why));
            }
        }
        let reloaded = Reloaded {
            cas: new_trust.is_some(),
            cert: new_cert.is_some(),
        };
        if let Some(set) = new_trust {
            self.trust.replace(set);
        }
        if let Some(certified) = new_cert {
            self.slot.set(certified);
        }
        *loaded = Some((dir, role, now));
        Ok(reloaded)
    }

    /// Runs [`Identity::reload`] every `every` until the returned handle is aborted (or
    /// the runtime stops), logging each new certificate, each new set of trusted CAs and
    /// each failure. Must be called within a tokio runtime.
    pub fn spawn_reload(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let id = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match id.reload_files() {
                    Ok(Reloaded { cas, cert }) => {
                        if cas {
                            tracing::info!(
                                subject = %id.subject,
                                cas = id.trust.current().cas.len(),
                                "trusted CAs reloaded; new handshakes verify peers against them"
                            );
                        }
                        if cert {
                            tracing::info!(subject = %id.subject, "certificate reloaded; new handshakes present it");
                        }
                    }
                    Err(e) => tracing::warn!(
                        subject = %id.subject,
                        "certificate files not reloaded, the current certificate and CAs stay: {e:#}"
                    ),
                }
            }
        })
    }

    /// Builds an identity from PEM text: the CA certificate(s), the own certificate
    /// chain (leaf first) and the own private key. Its CAs and certificate can be
    /// replaced only when loaded from a directory ([`Identity::load`]).
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        role: Role,
    ) -> anyhow::Result<Identity> {
        Self::build(
            (ca_pem, "CA certificate PEM"),
            (cert_pem, "certificate PEM"),
            (key_pem, "private key PEM"),
            role,
        )
    }

    /// Parses and cross-checks the three inputs; each comes with a label for errors.
    fn build(
        (ca_pem, ca_label): (&str, &str),
        cert: (&str, &str),
        key: (&str, &str),
        role: Role,
    ) -> anyhow::Result<Identity> {
        let trust = TrustSet::from_pem(ca_pem, ca_label)?;
        let cert_label = cert.1;
        let (certified, subject) = own_certificate(cert, key, role)?;
        trust
            .check(&certified.cert)
            .with_context(|| format!("{cert_label} is not valid under the CA in {ca_label}"))?;

        Ok(Identity {
            trust: Arc::new(Trust::new(trust)),
            slot: Arc::new(CertSlot {
                current: RwLock::new(Arc::new(certified)),
                files: Mutex::new(None),
            }),
            subject,
            revocations: Revocations::new(),
        })
    }

    /// The deny list of revoked certificate serials that every configuration built from
    /// this identity (or a clone of it) enforces on peers, from the next handshake on.
    /// Empty unless filled with [`Revocations::replace`].
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// This identity with `revocations` as its deny list instead, e.g. to share one list
    /// between several identities. Configurations built before keep the old list.
    pub fn with_revocations(mut self, revocations: Revocations) -> Identity {
        self.revocations = revocations;
        self
    }

    /// The role this identity's certificate states.
    pub fn role(&self) -> Role {
        self.subject.role
    }

    /// Who this identity's certificate says it is.
    pub fn subject(&self) -> &CertSubject {
        &self.subject
    }

    /// Signs `context` with this identity's key, proving to whoever checks it with
    /// [`Identity::verify_proof`] that the holder of this certificate signed `context`.
    /// The context should bind the proof to one use (e.g. a fresh nonce from the
    /// verifier and what the proof is for), so it cannot be replayed elsewhere.
    pub fn prove(&self, context: &[u8]) -> anyhow::Result<IdentityProof> {
        let certified = self.slot.get();
        let signer = certified
            .key
            .choose_scheme(PROOF_SCHEMES)
            .context("the private key supports none of the proof signature schemes")?;
        let signature = signer
            .sign(&proof_message(context))
            .context("signing an identity proof")?;
        Ok(IdentityProof {
            chain: certified.cert.iter().map(|c| c.to_vec()).collect(),
            scheme: u16::from(signer.scheme()),
            signature,
        })
    }

    /// Checks a proof made with [`Identity::prove`] over `context`: its chain must be
    /// valid now under the CAs this identity trusts now, its leaf not revoked
    /// ([`Identity::revocations`]; [`TransportError::Revoked`]), and its signature made by
    /// the chain's leaf key. Returns who the leaf certificate names.
    pub fn verify_proof(
        &self,
        proof: &IdentityProof,
        context: &[u8],
    ) -> Result<CertSubject, TransportError> {
        let bad = |what: String| TransportError::Tls(format!("identity proof refused: {what}"));
        let chain: Vec<CertificateDer<'static>> = proof
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(bad("no certificate".into()));
        };
        self.trust
            .current()
            .client
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| bad(format!("certificate not valid under the cluster CA: {e}")))?;
        if self.revocations.check(leaf, "proof signer").is_err() {
            return Err(TransportError::Revoked {
                serial: serial_of_der(leaf)?,
            });
        }
        let scheme = SignatureScheme::from(proof.scheme);
        if !PROOF_SCHEMES.contains(&scheme) {
            return Err(bad(format!("signature scheme {scheme:?} not accepted")));
        }
        let alg = provider()
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .and_then(|(_, algs)| algs.first())
            .ok_or_else(|| bad(format!("signature scheme {scheme:?} not supported")))?;
        let cert = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| bad(format!("unusable certificate: {e}")))?;
        cert.verify_signature(*alg, &proof_message(context), &proof.signature)
            .map_err(|e| bad(format!("bad signature: {e}")))?;
        CertSubject::from_cert_der(leaf)
    }

    /// The own certificate chain (the current one), leaf first.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        self.slot.get().cert.clone()
    }

    /// The cluster CA certificates trusted now. [`Identity::reload`] may replace them
    /// later; the store returned stays as it is.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.trust.current().roots.clone()
    }
}

/// Reads a PEM file, naming it in the error.
fn read_pem(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Parses a node's own certificate chain (leaf first) and private key, each with a label
/// for errors, and checks that the leaf states `role` and that the key is its key. Does
/// not check the chain against any CA.
fn own_certificate(
    (cert_pem, cert_label): (&str, &str),
    (key_pem, key_label): (&str, &str),
    role: Role,
) -> anyhow::Result<(rustls::sign::CertifiedKey, CertSubject)> {
    let chain = parse_certs(cert_pem, cert_label)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .with_context(|| format!("{key_label}: no usable private key"))?;
    // Catch mixed-up files here, with a message naming them, instead of as an opaque
    // handshake failure on some later connection.
    let Some(leaf) = chain.first() else {
        bail!("{cert_label}: no certificate found");
    };
    let subject = CertSubject::from_cert_der(leaf).with_context(|| cert_label.to_string())?;
    if subject.role != role {
        bail!(
            "{cert_label} is a {} certificate, expected a {role} certificate",
            subject.role
        );
    }
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider())
        .with_context(|| format!("{key_label} does not belong to {cert_label}"))?;
    Ok((certified, subject))
}

/// Signature schemes an identity proof may use (the TLS 1.3 ones our keys can have).
const PROOF_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
];

/// What an identity proof signs: a fixed label, so a proof can never pass for a TLS
/// handshake signature or anything else the key signs, then the caller's context.
fn proof_message(context: &[u8]) -> Vec<u8> {
    let mut m = b"swarm identity proof v1\0".to_vec();
    m.extend_from_slice(context);
    m
}

/// A signature by a certificate holder over a context (see [`Identity::prove`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityProof {
    /// The holder's certificate chain, leaf first, DER.
    pub chain: Vec<Vec<u8>>,
    /// The TLS signature scheme code of `signature`.
    pub scheme: u16,
    /// The signature.
    pub signature: Vec<u8>,
}

/// All certificates in `pem`; at least one.
fn parse_certs(pem: &str, label: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{label}: invalid PEM"))?;
    if certs.is_empty() {
        bail!("{label}: no certificate found");
    }
    Ok(certs)
}

/// The crypto provider, always chosen explicitly: relying on a process-wide default
/// would break (or silently change) as soon as another crate installs a different one.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport parameters shared by both sides.
fn transport_config() -> Arc<quinn::TransportConfig> {
    liveness_transport(
        KEEP_ALIVE,
        Duration::from_millis(u64::from(IDLE_TIMEOUT_MS)),
    )
}

fn liveness_transport(keep_alive: Duration, idle: Duration) -> Arc<quinn::TransportConfig> {
    let idle = quinn::IdleTimeout::try_from(idle)
        .unwrap_or_else(|_| quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into());
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(keep_alive))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(MAX_STREAMS));
    Arc::new(transport)
}

/// Make connections from `config` declare the peer gone after `idle` without a packet,
/// pinging every `keep_alive` (well below `idle`) so a live but quiet peer is never
/// dropped. The effective idle timeout is the smaller of both sides', so this is how a
/// client detects a dead server quickly (the server's default is 30 s).
pub fn set_liveness(config: &mut quinn::ClientConfig, keep_alive: Duration, idle: Duration) {
    config.transport_config(liveness_transport(keep_alive, idle));
}

/// The server-side counterpart of [`set_liveness`]: connections accepted with `config`
/// ping every `keep_alive` and offer an idle timeout of `idle` (the effective timeout is
/// the smaller of both sides'). Used where both ends must notice a dead peer quickly,
/// e.g. worker peer links.
pub fn set_server_liveness(config: &mut quinn::ServerConfig, keep_alive: Duration, idle: Duration) {
    config.transport_config(liveness_transport(keep_alive, idle));
}

/// A quinn server configuration that accepts only clients presenting a certificate
/// issued by a cluster CA `id` trusts (at the time of the handshake: see
/// [`Identity::reload`]) and not on its deny list ([`Identity::revocations`]),
/// negotiates one of `alpns`, speaks TLS 1.3 only and accepts 0-RTT early data from
/// resuming clients.
///
/// A resuming client is not verified again: its certificate is the one of the session
/// it resumes. Stored sessions are forgotten whenever the deny list or the trusted CAs
/// change, but a session stored by a handshake that raced a change may survive it, so
/// check [`require_not_revoked`] once the handshake has completed.
pub fn server_config(id: &Identity, alpns: &[&[u8]]) -> anyhow::Result<quinn::ServerConfig> {
    if alpns.is_empty() {
        // The ALPN is what versions the protocol; a server must insist on one.
        bail!("a server needs at least one ALPN protocol");
    }
    let verifier = client_verifier(id, false);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("enabling TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(id.slot.clone());
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    // QUIC allows only 0 or u32::MAX here; u32::MAX turns 0-RTT on.
    tls.max_early_data_size = u32::MAX;
    // rustls accepts early data only with stateful resumption: sessions stay in this
    // cache (each usable once, which is rustls' replay defence) and the stateless
    // `ticketer` stays disabled. The tickets sent are lookup keys into this cache, which
    // is emptied whenever the deny list or the trusted CAs change, so a revoked client
    // (or one whose CA is no longer trusted) cannot skip the verifier by resuming a
    // session from before the change.
    tls.session_storage = server_sessions(&id.revocations, &id.trust, SERVER_SESSION_CACHE);
    tls.send_tls13_tickets = 2;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// A quinn client configuration that presents `id`'s certificate, verifies the server's
/// certificate (including its name) against the cluster CAs `id` trusts at the time of
/// the handshake ([`Identity::reload`] may change them), requires the server's
/// certificate to state `server_role` (so a worker's certificate can never pass for a
/// coordinator's, whatever names it holds), offers `alpn`, and attempts 0-RTT. Sessions
/// are cached inside the configuration, so later connections made with it (or a clone
/// of it) to a server it already talked to can resume; a resumed session was verified
/// by this same check when it was first made. A server certificate on `id`'s deny list
/// ([`Identity::revocations`]) is refused, and sessions are forgotten whenever the list
/// or the trusted CAs change.
pub fn client_config(
    id: &Identity,
    alpn: &[u8],
    server_role: Role,
) -> anyhow::Result<quinn::ClientConfig> {
    let verifier = Arc::new(RoleVerifier {
        trust: id.trust.clone(),
        role: server_role,
        revocations: id.revocations.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("enabling TLS 1.3")?
        .dangerous()
        // Not a weakening: the CA and name checks are WebPKI's (for the CAs trusted at the
        // time of the handshake), the role check is added.
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(id.slot.clone());
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = true;
    tls.resumption = rustls::client::Resumption::store(client_sessions(
        &id.revocations,
        &id.trust,
        CLIENT_SESSION_CACHE,
    ));
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// The cluster's client certificate check: the CAs `id` trusts at the time of each
/// handshake (client certificates required unless `optional`), then `id`'s deny list.
fn client_verifier(id: &Identity, optional: bool) -> Arc<dyn ClientCertVerifier> {
    Arc::new(DenyListClientVerifier {
        trust: id.trust.clone(),
        optional,
        revocations: id.revocations.clone(),
    })
}

/// The standard WebPKI server check (chain to a cluster CA trusted at the time of the
/// handshake, name, validity) plus: the leaf certificate states the role the dialer
/// wants to reach and is not revoked.
#[derive(Debug)]
struct RoleVerifier {
    trust: Arc<Trust>,
    role: Role,
    revocations: Revocations,
}

impl RoleVerifier {
    /// The WebPKI verifier of the CAs trusted now.
    fn inner(&self) -> Arc<WebPkiServerVerifier> {
        self.trust.current().server.clone()
    }
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.revocations.check(end_entity, "server")?;
        match CertSubject::from_cert_der(end_entity) {
            Ok(s) if s.role == self.role => Ok(verified),
            Ok(s) => {
                tracing::warn!(
                    server = ?server_name,
                    "refusing a server whose certificate names a {}, not a {}",
                    s.role,
                    self.role
                );
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
            Err(e) => {
                tracing::warn!(server = ?server_name, "refusing a server certificate: {e}");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::BadEncoding,
                ))
            }
        }
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

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        // The hints are optional, and a borrow cannot outlive the look-up of the CAs
        // trusted now (they may be replaced at any time): send none.
        None
    }
}

/// Who the certificate the peer of `conn` authenticated with says it is.
///
/// On a server-side connection accepted with 0-RTT, call this only after the handshake
/// has completed (see [`crate::endpoint::Accepted`]).
pub fn peer_subject(conn: &quinn::Connection) -> Result<CertSubject, TransportError> {
    CertSubject::from_cert_der(&peer_leaf(conn)?)
}

/// The serial of the certificate the peer of `conn` authenticated with, in the format of
/// [`CertInfo::serial`] (see [`serial_of_der`]). Also right for a resumed session: it is
/// the certificate the session was first made with.
///
/// On a server-side connection accepted with 0-RTT, call this only after the handshake
/// has completed (see [`crate::endpoint::Accepted`]).
pub fn peer_serial(conn: &quinn::Connection) -> Result<String, TransportError> {
    serial_of_der(&peer_leaf(conn)?)
}

/// Whether the certificate the peer of `conn` authenticated with is on `revocations`.
/// Fails closed: a peer whose certificate cannot be read (none yet, before a 0-RTT
/// handshake completed) counts as revoked.
pub fn is_peer_revoked(conn: &quinn::Connection, revocations: &Revocations) -> bool {
    match peer_serial(conn) {
        Ok(serial) => revocations.is_revoked(&serial),
        Err(_) => true,
    }
}

/// Fails with [`TransportError::Revoked`], and closes `conn` with [`REVOKED_CODE`], if
/// the peer's certificate is on `revocations`; fails without closing if the certificate
/// cannot be read.
///
/// This is the authoritative revocation check: the handshake verifiers refuse revoked
/// certificates, but a resumed session is not verified again (see
/// [`crate::revocation`]). Call it once the handshake has completed (after
/// [`crate::Accepted::authenticate`] on a server), and again for live connections when
/// [`Revocations::subscribe`] reports a change.
pub fn require_not_revoked(
    conn: &quinn::Connection,
    revocations: &Revocations,
) -> Result<(), TransportError> {
    let serial = peer_serial(conn)?;
    if revocations.is_revoked(&serial) {
        tracing::warn!(
            %serial,
            remote = %conn.remote_address(),
            "closing a connection whose peer certificate is revoked"
        );
        conn.close(
            quinn::VarInt::from_u32(REVOKED_CODE),
            b"certificate revoked",
        );
        return Err(TransportError::Revoked { serial });
    }
    Ok(())
}

/// Close `conn` as soon as its peer's certificate is revoked or no longer valid under
/// the CAs `id` trusts, checking again at each change of `id`'s deny list
/// ([`Identity::revocations`]) and of its trusted CAs (a CA rotation,
/// [`Identity::reload`]). Returns `true` when it closed it, `false` when the connection
/// ended otherwise. Run it beside every long-lived connection: the handshake refuses a
/// revoked or untrusted certificate, but a connection made before the change would live
/// on. A revoked peer is closed with [`REVOKED_CODE`], an untrusted one with
/// [`crate::endpoint::UNTRUSTED_CODE`]. (Checked against the CAs, the peer's certificate
/// must also still be within its validity: one that expired is closed at the next change
/// too.)
///
/// A peer certificate that cannot be read yet (a server's connection before the
/// handshake completes) is checked again at the next change; the handshake's own
/// verifier covers the time until then.
pub async fn close_when_distrusted(conn: quinn::Connection, id: Identity) -> bool {
    let mut revoked = id.revocations.subscribe();
    let mut trusted = id.trust.changes.subscribe();
    // A change between the handshake's check and these subscriptions is not lost.
    if distrusted(&conn, &id) {
        return true;
    }
    loop {
        tokio::select! {
            _ = conn.closed() => return false,
            r = revoked.changed() => {
                if r.is_err() {
                    // The deny list is gone (its identity dropped): no change can come.
                    conn.closed().await;
                    return false;
                }
            }
            r = trusted.changed() => {
                if r.is_err() {
                    conn.closed().await;
                    return false;
                }
            }
        }
        if distrusted(&conn, &id) {
            return true;
        }
    }
}

/// Whether `conn`'s peer is revoked or no longer valid under `id`'s CAs; closes it if so.
fn distrusted(conn: &quinn::Connection, id: &Identity) -> bool {
    if matches!(
        require_not_revoked(conn, &id.revocations),
        Err(TransportError::Revoked { .. })
    ) {
        return true;
    }
    let Ok(chain) = peer_chain(conn) else {
        return false;
    };
    match id.trust.current().check(&chain) {
        Ok(()) => false,
        Err(e) => {
            let subject = chain
                .first()
                .and_then(|leaf| CertSubject::from_cert_der(leaf).ok())
                .map_or_else(|| "(unreadable)".to_owned(), |s| s.to_string());
            tracing::warn!(
                %subject,
                remote = %conn.remote_address(),
                "closing a connection whose peer certificate is no longer valid under the trusted CAs: {e:#}"
            );
            conn.close(
                quinn::VarInt::from_u32(crate::endpoint::UNTRUSTED_CODE),
                b"certificate no longer trusted",
            );
            true
        }
    }
}

/// The certificate chain the peer of `conn` authenticated with, leaf first.
fn peer_chain(conn: &quinn::Connection) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| TransportError::Tls("peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| {
            TransportError::Tls("peer identity is not an X.509 certificate chain".into())
        })?;
    if chain.is_empty() {
        return Err(TransportError::Tls(
            "peer presented an empty certificate chain".into(),
        ));
    }
    Ok(*chain)
}

/// The leaf certificate the peer of `conn` authenticated with.
fn peer_leaf(conn: &quinn::Connection) -> Result<CertificateDer<'static>, TransportError> {
    let mut chain = peer_chain(conn)?;
    Ok(chain.swap_remove(0))
}

/// A TLS configuration for an HTTPS API served with `id`'s certificate: TLS 1.2 and
/// 1.3, ALPN `http/1.1`, and optional client authentication against the cluster CAs
/// `id` trusts at the time of the handshake (an operator's client sends a token
/// instead; a coordinator forwarding a request presents its certificate, which the
/// server reads back from the connection). A client certificate on `id`'s deny list
/// ([`Identity::revocations`]) fails the handshake.
///
/// As with [`server_config`], a resumed session is not verified again and sessions
/// stored just as the deny list (or the trusted CAs) changed may survive the change:
/// check the leaf
/// certificate the connection reports ([`Revocations::is_revoked_der`]) before
/// trusting it.
pub fn https_server_config(id: &Identity) -> anyhow::Result<rustls::ServerConfig> {
    let verifier = client_verifier(id, true);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("enabling TLS")?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(id.slot.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.session_storage = server_sessions(&id.revocations, &id.trust, HTTPS_SERVER_SESSION_CACHE);
    Ok(tls)
}

/// A TLS configuration for HTTPS requests from `id` to a server of `server_role` (e.g.
/// a coordinator forwarding a request to the leader): verifies the server against the
/// cluster CAs `id` trusts at the time of the handshake, its role and `id`'s deny list,
/// and presents `id`'s certificate.
pub fn https_client_config(
    id: &Identity,
    server_role: Role,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("enabling TLS")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RoleVerifier {
            trust: id.trust.clone(),
            role: server_role,
            revocations: id.revocations.clone(),
        }))
        .with_client_cert_resolver(id.slot.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.resumption = rustls::client::Resumption::store(client_sessions(
        &id.revocations,
        &id.trust,
        CLIENT_SESSION_CACHE,
    ));
    Ok(tls)
}

/// The role stated by the certificate the peer of `conn` authenticated with.
///
/// On a server-side connection accepted with 0-RTT, call this only after the handshake
/// has completed (see [`crate::endpoint::Accepted`]); before that the client may not
/// have been authenticated yet.
pub fn peer_role(conn: &quinn::Connection) -> Result<Role, TransportError> {
    peer_subject(conn).map(|s| s.role)
}

/// Fails with [`TransportError::WrongRole`] unless the peer of `conn` has role `expected`.
pub fn require_role(conn: &quinn::Connection, expected: Role) -> Result<(), TransportError> {
    match peer_role(conn)? {
        got if got == expected => Ok(()),
        got => Err(TransportError::WrongRole { expected, got }),
    }
}
