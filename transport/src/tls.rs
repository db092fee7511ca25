//! The cluster PKI and the TLS side of the quinn configuration.
//!
//! Every process in a cluster holds a certificate issued by one cluster CA. Both sides
//! of every connection present a certificate and verify the other's against that CA, so
//! a connection exists only between members of the same cluster. Which member a peer is
//! ([`Role`]) is written into its certificate's subject common name.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, UnixTime};

use crate::TransportError;

/// Common name of coordinator certificates.
const CN_COORDINATOR: &str = "swarm-coordinator";
/// Common name of worker certificates.
const CN_WORKER: &str = "swarm-worker";
/// Common name of the cluster CA.
const CN_CA: &str = "swarm cluster CA";
/// Organization of every certificate this module issues.
const ORGANIZATION: &str = "swarm";

/// How long generated certificates are valid. Long, because rotation is an explicit
/// operator action (`init_certs` with `force`), not something the cluster does itself.
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How far `not_before` is backdated, to tolerate clock skew between machines.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Resumption sessions a server remembers. Each reconnecting peer uses one, and a
/// missing session only costs a full handshake, so this just needs to cover a large
/// cluster's reconnect burst.
const SERVER_SESSION_CACHE: usize = 16 * 1024;
/// Servers a client remembers resumption sessions for.
const CLIENT_SESSION_CACHE: usize = 256;

/// QUIC idle timeout: a peer silent for this long is considered gone.
const IDLE_TIMEOUT_MS: u32 = 30_000;
/// Keep-alive interval, well below the idle timeout so a few lost pings are tolerated.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Concurrent streams each side lets its peer open.
const MAX_STREAMS: u32 = 1024;

/// What a cluster member is, as stated by its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A coordinator (Raft member, dispatches tasks).
    Coordinator,
    /// A worker (runs tasks).
    Worker,
}

impl Role {
    /// The subject common name that marks a certificate as this role.
    pub fn common_name(self) -> &'static str {
        match self {
            Role::Coordinator => CN_COORDINATOR,
            Role::Worker => CN_WORKER,
        }
    }

    /// The role a subject common name denotes, if any.
    pub fn from_common_name(cn: &str) -> Option<Role> {
        match cn {
            CN_COORDINATOR => Some(Role::Coordinator),
            CN_WORKER => Some(Role::Worker),
            _ => None,
        }
    }

    /// Reads the role from a DER-encoded certificate. Fails if the certificate does not
    /// parse or its subject does not have exactly one common name naming a role.
    pub fn from_cert_der(der: &[u8]) -> Result<Role, TransportError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TransportError::Tls(format!("unparseable certificate: {e}")))?;
        let mut names = cert.subject().iter_common_name();
        let (Some(cn), None) = (names.next(), names.next()) else {
            return Err(TransportError::Tls(format!(
                "certificate subject {} must have exactly one common name",
                cert.subject()
            )));
        };
        let cn = cn
            .as_str()
            .map_err(|e| TransportError::Tls(format!("certificate common name: {e}")))?;
        Role::from_common_name(cn).ok_or_else(|| {
            TransportError::Tls(format!(
                "certificate common name {cn:?} names no swarm role"
            ))
        })
    }

    /// File name stem of this role's certificate and key in a certificate directory.
    fn file_stem(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_stem())
    }
}

/// The files of a certificate directory, as written by [`init_certs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The directory holding the files.
    pub dir: PathBuf,
    /// Cluster CA certificate (`ca.pem`).
    pub ca_cert: PathBuf,
    /// Cluster CA private key (`ca-key.pem`); only needed to issue certificates.
    pub ca_key: PathBuf,
    /// Coordinator certificate (`coordinator.pem`).
    pub coordinator_cert: PathBuf,
    /// Coordinator private key (`coordinator-key.pem`).
    pub coordinator_key: PathBuf,
    /// Worker certificate (`worker.pem`).
    pub worker_cert: PathBuf,
    /// Worker private key (`worker-key.pem`).
    pub worker_key: PathBuf,
}

impl CertFiles {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            coordinator_cert: dir.join("coordinator.pem"),
            coordinator_key: dir.join("coordinator-key.pem"),
            worker_cert: dir.join("worker.pem"),
            worker_key: dir.join("worker-key.pem"),
        }
    }

    /// The certificate file of `role`.
    pub fn cert(&self, role: Role) -> &Path {
        match role {
            Role::Coordinator => &self.coordinator_cert,
            Role::Worker => &self.worker_cert,
        }
    }

    /// The private key file of `role`.
    pub fn key(&self, role: Role) -> &Path {
        match role {
            Role::Coordinator => &self.coordinator_key,
            Role::Worker => &self.worker_key,
        }
    }

    /// Every file, each with whether it holds a private key.
    fn all(&self) -> [(&Path, bool); 6] {
        [
            (&self.ca_cert, false),
            (&self.ca_key, true),
            (&self.coordinator_cert, false),
            (&self.coordinator_key, true),
            (&self.worker_cert, false),
            (&self.worker_key, true),
        ]
    }
}

/// Creates a cluster CA and a coordinator and a worker certificate signed by it, in
/// `dir` (created if missing).
///
/// Both leaf certificates are valid for `localhost`, `127.0.0.1`, `::1` and every entry
/// of `extra_sans` (an IP address, optionally in brackets, or a DNS name), and for both
/// TLS server and client authentication: coordinators dial each other, and workers will
/// accept peer links. Private keys are written with mode 0600.
///
/// Refuses to replace any existing file unless `force` is set; in that case all six
/// files are replaced.
pub fn init_certs(dir: &Path, extra_sans: &[String], force: bool) -> anyhow::Result<CertFiles> {
    let files = CertFiles::in_dir(dir);
    // Validate input and generate everything before touching the disk, so a bad SAN or
    // a generation failure leaves the directory as it was.
    let sans = subject_alt_names(extra_sans)?;
    let ca_key = KeyPair::generate().context("generating CA key")?;
    let ca = ca_params()
        .self_signed(&ca_key)
        .context("self-signing CA certificate")?;
    let mut pems = vec![ca.pem(), ca_key.serialize_pem()];
    for role in [Role::Coordinator, Role::Worker] {
        let key = KeyPair::generate().with_context(|| format!("generating {role} key"))?;
        let cert = leaf_params(role, &sans)
            .signed_by(&key, &ca, &ca_key)
            .with_context(|| format!("signing {role} certificate"))?;
        pems.push(cert.pem());
        pems.push(key.serialize_pem());
    }

    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !force {
        let existing: Vec<String> = files
            .all()
            .iter()
            .filter(|(path, _)| fs::symlink_metadata(path).is_ok())
            .map(|(path, _)| path.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "refusing to overwrite existing certificate files ({}); force replacing them \
                 to issue a new cluster CA",
                existing.join(", ")
            );
        }
    }
    for ((path, private), pem) in files.all().into_iter().zip(&pems) {
        write_file(path, pem, private, force)?;
    }
    Ok(files)
}

/// The default SANs plus `extra`, each classified as IP address or DNS name.
fn subject_alt_names(extra: &[String]) -> anyhow::Result<Vec<SanType>> {
    let mut sans = vec![
        SanType::DnsName(Ia5String::try_from("localhost")?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    for raw in extra {
        let name = raw.trim();
        // Accept the bracketed form too, since IPv6 addresses are often written that way.
        let unbracketed = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        let san = if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            SanType::IpAddress(ip)
        } else {
            // Certificate verification uses the same DNS-name rules, so a name rejected
            // here could never be dialed anyway.
            DnsName::try_from(name)
                .map_err(|_| anyhow::anyhow!("{raw:?} is neither an IP address nor a DNS name"))?;
            SanType::DnsName(Ia5String::try_from(name.to_ascii_lowercase())?)
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

fn distinguished_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_validity(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
    params.not_after = now.checked_add(VALIDITY).unwrap_or(now).into();
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(CN_CA);
    // Path length 0: the CA signs leaf certificates only, never intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params);
    params
}

fn leaf_params(role: Role, sans: &[SanType]) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(role.common_name());
    params.subject_alt_names = sans.to_vec();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    params
}

fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> anyhow::Result<()> {
    if force {
        // Remove rather than truncate, so the new file gets the intended mode even if
        // the old one was more permissive, and a symlink is replaced, not followed.
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    let mut options = fs::OpenOptions::new();
    // create_new: never write through a file (or symlink) that appeared in the meantime.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// A cluster member's credentials: the cluster CA to verify peers against, its own
/// certificate chain and private key, and the role its certificate states.
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    role: Role,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            role: self.role,
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("Identity")
            .field("role", &self.role)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the CA certificate and `role`'s certificate and key from a directory
    /// written by [`init_certs`]. Errors name the file that is missing or bad.
    pub fn load(dir: &Path, role: Role) -> anyhow::Result<Identity> {
        let files = CertFiles::in_dir(dir);
        let read = |path: &Path| {
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        let (ca, cert, key) = (&files.ca_cert, files.cert(role), files.key(role));
        Self::build(
            (&read(ca)?, &ca.display().to_string()),
            (&read(cert)?, &cert.display().to_string()),
            (&read(key)?, &key.display().to_string()),
            role,
        )
    }

    /// Builds an identity from PEM text: the CA certificate(s), the own certificate
    /// chain (leaf first) and the own private key.
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
        (cert_pem, cert_label): (&str, &str),
        (key_pem, key_label): (&str, &str),
        role: Role,
    ) -> anyhow::Result<Identity> {
        let mut roots = RootCertStore::empty();
        for ca in parse_certs(ca_pem, ca_label)? {
            roots
                .add(ca)
                .with_context(|| format!("{ca_label}: not a usable CA certificate"))?;
        }
        let roots = Arc::new(roots);
        let chain = parse_certs(cert_pem, cert_label)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .with_context(|| format!("{key_label}: no usable private key"))?;

        // Catch mixed-up files here, with a message naming them, instead of as an
        // opaque handshake failure on some later connection.
        let Some((leaf, intermediates)) = chain.split_first() else {
            bail!("{cert_label}: no certificate found");
        };
        let got = Role::from_cert_der(leaf).with_context(|| cert_label.to_string())?;
        if got != role {
            bail!("{cert_label} is a {got} certificate, expected a {role} certificate");
        }
        let provider = provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
            .with_context(|| format!("{key_label} does not belong to {cert_label}"))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .with_context(|| format!("{ca_label}: cannot verify certificates with it"))?;
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .with_context(|| format!("{cert_label} is not valid under the CA in {ca_label}"))?;

        Ok(Identity {
            roots,
            chain,
            key,
            role,
        })
    }

    /// The role this identity's certificate states.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The own certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The trusted cluster CA certificates.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }
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
/// issued by `id`'s cluster CA, negotiates one of `alpns`, speaks TLS 1.3 only and
/// accepts 0-RTT early data from resuming clients.
pub fn server_config(id: &Identity, alpns: &[&[u8]]) -> anyhow::Result<quinn::ServerConfig> {
    if alpns.is_empty() {
        // The ALPN is what versions the protocol; a server must insist on one.
        bail!("a server needs at least one ALPN protocol");
    }
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .build()
        .context("building client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("enabling TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .context("installing server certificate")?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    // QUIC allows only 0 or u32::MAX here; u32::MAX turns 0-RTT on.
    tls.max_early_data_size = u32::MAX;
    // rustls accepts early data only with stateful resumption: sessions stay in this
    // cache (each usable once, which is rustls' replay defence) and the stateless
    // `ticketer` stays disabled. The tickets sent are lookup keys into this cache.
    tls.session_storage = rustls::server::ServerSessionMemoryCache::new(SERVER_SESSION_CACHE);
    tls.send_tls13_tickets = 2;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// A quinn client configuration that presents `id`'s certificate, verifies the server's
/// certificate (including its name) against `id`'s cluster CA, offers `alpn`, and
/// attempts 0-RTT. Sessions are cached inside the configuration, so later connections
/// made with it (or a clone of it) to a server it already talked to can resume.
pub fn client_config(id: &Identity, alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("enabling TLS 1.3")?
        .with_root_certificates(id.roots.clone())
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .context("installing client certificate")?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = true;
    tls.resumption = rustls::client::Resumption::in_memory_sessions(CLIENT_SESSION_CACHE);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// The role stated by the certificate the peer of `conn` authenticated with.
///
/// On a server-side connection accepted with 0-RTT, call this only after the handshake
/// has completed (see [`crate::endpoint::Accepted`]); before that the client may not
/// have been authenticated yet.
pub fn peer_role(conn: &quinn::Connection) -> Result<Role, TransportError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| TransportError::Tls("peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| {
            TransportError::Tls("peer identity is not an X.509 certificate chain".into())
        })?;
    let leaf = chain
        .first()
        .ok_or_else(|| TransportError::Tls("peer presented an empty certificate chain".into()))?;
    Role::from_cert_der(leaf)
}

/// Fails with [`TransportError::WrongRole`] unless the peer of `conn` has role `expected`.
pub fn require_role(conn: &quinn::Connection, expected: Role) -> Result<(), TransportError> {
    match peer_role(conn)? {
        got if got == expected => Ok(()),
        got => Err(TransportError::WrongRole { expected, got }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_classify_ips_and_names_and_reject_junk() {
        let extra: Vec<String> = [
            "10.0.0.7",
            "[fe80::1]",
            "Coord-1.Example.com",
            "localhost",
            " node2 ",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let sans = subject_alt_names(&extra).unwrap();
        assert!(sans.contains(&SanType::IpAddress("10.0.0.7".parse().unwrap())));
        assert!(sans.contains(&SanType::IpAddress("fe80::1".parse().unwrap())));
        assert!(sans.contains(&SanType::DnsName("coord-1.example.com".try_into().unwrap())));
        assert!(sans.contains(&SanType::DnsName("node2".try_into().unwrap())));
        // localhost is a default and is not duplicated.
        assert_eq!(
            sans.iter()
                .filter(|s| matches!(s, SanType::DnsName(n) if n.as_str() == "localhost"))
                .count(),
            1
        );

        for bad in ["", "has space.example", "under_score!", "a..b"] {
            assert!(
                subject_alt_names(&[bad.to_string()]).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn role_round_trips_through_a_certificate() {
        for role in [Role::Coordinator, Role::Worker] {
            let key = KeyPair::generate().unwrap();
            let cert = leaf_params(role, &[]).self_signed(&key).unwrap();
            assert_eq!(Role::from_cert_der(cert.der()).unwrap(), role);
        }
        let key = KeyPair::generate().unwrap();
        let ca = ca_params().self_signed(&key).unwrap();
        assert!(matches!(
            Role::from_cert_der(ca.der()),
            Err(TransportError::Tls(_))
        ));
        assert!(matches!(
            Role::from_cert_der(b"not a certificate"),
            Err(TransportError::Tls(_))
        ));
    }

    #[test]
    fn role_names() {
        assert_eq!(Role::Coordinator.to_string(), "coordinator");
        assert_eq!(Role::from_common_name("swarm-worker"), Some(Role::Worker));
        assert_eq!(Role::from_common_name("swarm-Worker"), None);
    }
}
