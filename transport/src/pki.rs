//! The cluster PKI: issuing, renewing and reading the certificates of a cluster.
//!
//! One cluster CA signs a certificate per node. A leaf certificate's subject says who
//! its holder is: the organizational unit names its [`Role`] (`swarm-coordinator` or
//! `swarm-worker`) and the common name names the node ([`CertName::Node`]), or, ending
//! in `*`, a pool of workers sharing one certificate ([`CertName::Pool`]). Certificates
//! of older releases carry the role in the common name and no unit; they read as a pool
//! for any name.
//!
//! A node's certificate directory holds `ca.pem`, its `<role>.pem` and `<role>-key.pem`
//! (see [`CertFiles`]); the CA directory also holds `ca-key.pem`, which only the machine
//! that issues certificates needs. `ca.pem` may hold several CA certificates: while a
//! cluster moves to a new CA, its nodes trust the old and the new one (running nodes
//! take a new `ca.pem` with [`crate::tls::Identity::reload`]), and an issuer signs with
//! whichever of them its `ca-key.pem` belongs to ([`Issuer::load`]).

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateSigningRequestDer, DnsName};
use x509_parser::extensions::GeneralName;

use crate::TransportError;

/// Role marker of coordinator certificates (the subject's organizational unit).
const MARK_COORDINATOR: &str = "swarm-coordinator";
/// Role marker of worker certificates.
const MARK_WORKER: &str = "swarm-worker";
/// Common name of the cluster CA.
const CN_CA: &str = "swarm cluster CA";
/// Organization of every certificate this module issues.
const ORGANIZATION: &str = "swarm";
/// Longest node name (the worker id limit of the worker protocol).
pub const MAX_NAME_LEN: usize = 128;

/// How long a cluster CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How long a node certificate is valid unless asked otherwise: a year, renewed with
/// [`renew_cert`] (`swarm certs renew`).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// How far `not_before` is backdated, to tolerate clock skew between machines.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// Largest certificate signing request (PEM text) [`Issuer::sign_request`] reads. A
/// request for a 4096-bit RSA key is under 2 KiB.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// What a cluster member is, as stated by its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A coordinator (Raft member, dispatches tasks).
    Coordinator,
    /// A worker (runs tasks).
    Worker,
}

impl Role {
    /// The subject marker (organizational unit; the common name in older certificates)
    /// of this role.
    pub fn common_name(self) -> &'static str {
        match self {
            Role::Coordinator => MARK_COORDINATOR,
            Role::Worker => MARK_WORKER,
        }
    }

    /// The role a subject marker denotes, if any.
    pub fn from_common_name(cn: &str) -> Option<Role> {
        match cn {
            MARK_COORDINATOR => Some(Role::Coordinator),
            MARK_WORKER => Some(Role::Worker),
            _ => None,
        }
    }

    /// Reads the role from a DER-encoded certificate. Fails if the certificate does not
    /// parse or its subject names no role.
    pub fn from_cert_der(der: &[u8]) -> Result<Role, TransportError> {
        CertSubject::from_cert_der(der).map(|s| s.role)
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

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "coordinator" => Ok(Role::Coordinator),
            "worker" => Ok(Role::Worker),
            other => Err(format!("{other:?} is not a role (coordinator or worker)")),
        }
    }
}

/// Whom a certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertName {
    /// One node; a worker holding it must use exactly this id.
    Node(String),
    /// A certificate shared by a pool of workers (e.g. a Kubernetes Deployment): its
    /// holders may use any id starting with this prefix (empty: any id). Written as the
    /// prefix followed by `*`.
    Pool(String),
}

impl CertName {
    /// Parses `name` or `prefix*`, checking the characters a name may have.
    pub fn parse(s: &str) -> Result<CertName, String> {
        let (base, pool) = match s.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (s, false),
        };
        if !pool && base.is_empty() {
            return Err("a node name cannot be empty".into());
        }
        if s.len() > MAX_NAME_LEN {
            return Err(format!("{s:?} is longer than {MAX_NAME_LEN} bytes"));
        }
        if let Some(c) = base
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(format!(
                "{s:?} has {c:?}: names use letters, digits, '-', '_', '.' and ':' (and a final '*' for a pool)"
            ));
        }
        Ok(if pool {
            CertName::Pool(base.to_string())
        } else {
            CertName::Node(base.to_string())
        })
    }

    /// Whether a holder of this certificate may act as node `id`.
    pub fn allows(&self, id: &str) -> bool {
        match self {
            CertName::Node(name) => name == id,
            CertName::Pool(prefix) => id.starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertName::Node(n) => f.write_str(n),
            CertName::Pool(p) => write!(f, "{p}*"),
        }
    }
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertSubject {
    /// The holder's role.
    pub role: Role,
    /// The holder's name.
    pub name: CertName,
}

impl fmt::Display for CertSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

impl CertSubject {
    /// Reads the subject of a DER-encoded certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<CertSubject, TransportError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TransportError::Tls(format!("unparseable certificate: {e}")))?;
        subject_of(&cert)
    }
}

/// The serial number of a DER-encoded certificate as lower-case hex without separators
/// (the DER integer's bytes, so a leading `00` sign byte is kept): the format of
/// [`CertInfo::serial`], of `swarm certs show`, and of a
/// [`Revocations`](crate::revocation::Revocations) deny list.
pub fn serial_of_der(der: &[u8]) -> Result<String, TransportError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TransportError::Tls(format!("unparseable certificate: {e}")))?;
    Ok(serial_of(&cert))
}

/// The one place the serial format is defined; see [`serial_of_der`].
fn serial_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    cert.raw_serial_as_string().replace(':', "")
}

fn subject_of(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<CertSubject, TransportError> {
    let subject = cert.subject();
    let one =
        |mut it: Box<dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>> + '_>,
         what: &str|
         -> Result<Option<String>, TransportError> {
            let Some(first) = it.next() else {
                return Ok(None);
            };
            if it.next().is_some() {
                return Err(TransportError::Tls(format!(
                    "certificate subject {subject} has more than one {what}"
                )));
            }
            first
                .as_str()
                .map(|s| Some(s.to_string()))
                .map_err(|e| TransportError::Tls(format!("certificate {what}: {e}")))
        };
    let cn = one(Box::new(subject.iter_common_name()), "common name")?;
    let unit = one(
        Box::new(subject.iter_organizational_unit()),
        "organizational unit",
    )?;
    let Some(cn) = cn else {
        return Err(TransportError::Tls(format!(
            "certificate subject {subject} has no common name"
        )));
    };
    match unit {
        Some(unit) => {
            let role = Role::from_common_name(&unit).ok_or_else(|| {
                TransportError::Tls(format!("certificate unit {unit:?} names no swarm role"))
            })?;
            let name = CertName::parse(&cn)
                .map_err(|e| TransportError::Tls(format!("certificate name: {e}")))?;
            Ok(CertSubject { role, name })
        }
        // An older release's certificate: the role in the common name, shared by every
        // node of that role.
        None => Role::from_common_name(&cn)
            .map(|role| CertSubject {
                role,
                name: CertName::Pool(String::new()),
            })
            .ok_or_else(|| {
                TransportError::Tls(format!(
                    "certificate common name {cn:?} names no swarm role"
                ))
            }),
    }
}

/// What `swarm certs show` prints about a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Who it names.
    pub subject: CertSubject,
    /// Serial number, lower-case hex without separators (see [`serial_of_der`]).
    pub serial: String,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// DNS names and IP addresses it is valid for, as text.
    pub sans: Vec<String>,
    /// Its public key (SubjectPublicKeyInfo, DER): what two certificates of one key share.
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Reads the first certificate of a PEM file.
    pub fn read(path: &Path) -> anyhow::Result<CertInfo> {
        let pem =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_pem(&pem).with_context(|| path.display().to_string())
    }

    /// Reads the first certificate of PEM text.
    pub fn from_pem(pem: &str) -> anyhow::Result<CertInfo> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .context("no certificate found")?
            .context("invalid PEM")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("unparseable certificate: {e}"))?;
        let subject = subject_of(&cert)?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(d) => sans.push(d.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => sans.push(IpAddr::from(<[u8; 4]>::try_from(*b)?).to_string()),
                        16 => sans.push(IpAddr::from(<[u8; 16]>::try_from(*b)?).to_string()),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            subject,
            serial: serial_of(&cert),
            not_after_unix: cert.validity().not_after.timestamp(),
            sans,
            public_key: cert.public_key().raw.to_vec(),
        })
    }
}

/// The files of a certificate directory.
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
}

/// Creates a cluster CA in `dir` (created if missing), plus a coordinator certificate
/// named `coordinator` and a worker pool certificate for any worker id, both valid for
/// `localhost`, `127.0.0.1`, `::1` and every entry of `extra_sans` (an IP address,
/// optionally in brackets, or a DNS name). Enough for one machine; a cluster issues a
/// certificate per node with [`issue_cert`]. Private keys are written with mode 0600.
///
/// Refuses to replace any existing file unless `force` is set; in that case all six
/// files are replaced.
pub fn init_certs(dir: &Path, extra_sans: &[String], force: bool) -> anyhow::Result<CertFiles> {
    let files = CertFiles::in_dir(dir);
    // Validate input and generate everything before touching the disk, so a bad SAN or
    // a generation failure leaves the directory as it was.
    let sans = subject_alt_names(extra_sans, None)?;
    let ca_key = KeyPair::generate().context("generating CA key")?;
    let ca = ca_params()
        .self_signed(&ca_key)
        .context("self-signing CA certificate")?;
    let mut pems = vec![ca.pem(), ca_key.serialize_pem()];
    let issuer = Ca {
        cert: ca,
        key: ca_key,
    };
    for (role, name) in [
        (Role::Coordinator, CertName::Node("coordinator".into())),
        (Role::Worker, CertName::Pool(String::new())),
    ] {
        let (cert, key) = sign_leaf(&issuer, role, &name, &sans, DEFAULT_VALIDITY)?;
        pems.push(cert);
        pems.push(key);
    }
    let all = [
        (files.ca_cert.as_path(), false),
        (&files.ca_key, true),
        (&files.coordinator_cert, false),
        (&files.coordinator_key, true),
        (&files.worker_cert, false),
        (&files.worker_key, true),
    ];
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !force {
        refuse_existing(all.iter().map(|(p, _)| *p))?;
    }
    for ((path, private), pem) in all.into_iter().zip(&pems) {
        write_file(path, pem, private, force)?;
    }
    Ok(files)
}

/// Issues a certificate for node `name` of `role`, signed by the CA in `ca_dir`, into
/// `out_dir` (created if missing): `ca.pem` (a copy, unless `out_dir` is `ca_dir`),
/// `<role>.pem` and `<role>-key.pem` (0600). Valid for `localhost`, `127.0.0.1`, `::1`,
/// the name itself when it is a DNS name, and `extra_sans`. Refuses to replace existing
/// files unless `force`.
pub fn issue_cert(
    ca_dir: &Path,
    out_dir: &Path,
    role: Role,
    name: &CertName,
    extra_sans: &[String],
    validity: Duration,
    force: bool,
) -> anyhow::Result<CertFiles> {
    let sans = subject_alt_names(extra_sans, Some(name))?;
    let ca = CertFiles::in_dir(ca_dir);
    let (ca_pem, issuer) = read_ca(&ca.ca_cert, &ca.ca_key)?;
    let (cert, key) = sign_leaf(&issuer, role, name, &sans, validity)?;
    let out = CertFiles::in_dir(out_dir);
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let copy_ca = !same_file(&ca.ca_cert, &out.ca_cert);
    if !force {
        let mut paths = vec![out.cert(role), out.key(role)];
        if copy_ca {
            paths.push(&out.ca_cert);
        }
        refuse_existing(paths.into_iter())?;
    }
    if copy_ca {
        write_file(&out.ca_cert, &ca_pem, false, force)?;
    }
    write_file(out.cert(role), &cert, false, force)?;
    write_file(out.key(role), &key, true, force)?;
    Ok(out)
}

/// Renews the `role` certificate in `dir` with the CA in `ca_dir`: a new key and a
/// certificate with the same subject and names, valid for `validity` from now. The new
/// files replace the old ones atomically (a reader sees the old pair or the new one).
/// Returns the renewed certificate's details.
pub fn renew_cert(
    ca_dir: &Path,
    dir: &Path,
    role: Role,
    validity: Duration,
) -> anyhow::Result<CertInfo> {
    let files = CertFiles::in_dir(dir);
    let old = CertInfo::read(files.cert(role))?;
    if old.subject.role != role {
        bail!(
            "{} is a {} certificate, not a {role} one",
            files.cert(role).display(),
            old.subject.role
        );
    }
    let sans = subject_alt_names(&old.sans, None)?;
    let ca = CertFiles::in_dir(ca_dir);
    let (_, issuer) = read_ca(&ca.ca_cert, &ca.ca_key)?;
    let (cert, key) = sign_leaf(&issuer, role, &old.subject.name, &sans, validity)?;
    // Key first: a reader that sees the new certificate then finds its key. Loaders
    // check that the two match, so a reader between the renames fails and retries.
    replace_file(files.key(role), &key, true)?;
    replace_file(files.cert(role), &cert, false)?;
    CertInfo::from_pem(&cert)
}

/// A CA that can sign: its certificate and key.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// The CA certificate file's PEM text (all of it) and the CA, ready to sign.
///
/// The file may hold several CA certificates, a bundle (while a cluster moves to a new
/// CA, the old and the new one): the CA is the one whose public key is the key's.
fn read_ca(ca_cert: &Path, ca_key: &Path) -> anyhow::Result<(String, Ca)> {
    let ca_pem = fs::read_to_string(ca_cert)
        .with_context(|| format!("reading the CA certificate {}", ca_cert.display()))?;
    let key_pem = fs::read_to_string(ca_key).with_context(|| {
        format!(
            "reading the CA key {} (issuing needs the CA's directory)",
            ca_key.display()
        )
    })?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} holds no usable key", ca_key.display()))?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: invalid PEM", ca_cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", ca_cert.display());
    }
    let Some(der) = certs.iter().find(|der| {
        x509_parser::parse_x509_certificate(der)
            .is_ok_and(|(_, cert)| cert.public_key().subject_public_key.data == key.der_bytes())
    }) else {
        bail!(
            "{} does not belong to {}: none of its {} certificate(s) has that key",
            ca_key.display(),
            ca_cert.display(),
            certs.len()
        );
    };
    // rcgen signs with a `Certificate`: rebuild the CA's from its parameters and key
    // (same name, same key, so the same key identifier the leaves point at).
    let cert = CertificateParams::from_ca_cert_der(der)
        .with_context(|| format!("{} is not a usable CA certificate", ca_cert.display()))?
        .self_signed(&key)
        .with_context(|| format!("{} does not match {}", ca_key.display(), ca_cert.display()))?;
    Ok((ca_pem, Ca { cert, key }))
}

/// The cluster CA, able to sign certificate requests of nodes that generated their own
/// key ([`new_key_and_request`]), so the key never leaves the node: the node sends the
/// request, the holder of the CA key answers with [`Issuer::sign_request`], and the node
/// stores the answer with [`install_enrolled`].
pub struct Issuer {
    ca_pem: String,
    ca: Ca,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the CA key.
        f.debug_struct("Issuer").finish_non_exhaustive()
    }
}

impl Issuer {
    /// Loads the CA certificate and its private key (`ca.pem` and `ca-key.pem` of the
    /// CA directory, see [`CertFiles`]). `ca.pem` may be a bundle of several CA
    /// certificates (while a cluster moves to a new CA): the issuer signs as the one whose
    /// public key is the key's. Fails if either file is unreadable or no certificate in
    /// `ca.pem` belongs to the key.
    pub fn load(ca_cert: &Path, ca_key: &Path) -> anyhow::Result<Issuer> {
        let (ca_pem, ca) = read_ca(ca_cert, ca_key)?;
        Ok(Issuer { ca_pem, ca })
    }

    /// The CA certificate file, PEM, as read (the whole bundle if it holds several CA
    /// certificates): what a node needs as its `ca.pem`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Signs the public key of a PKCS#10 certificate signing request (PEM) as a node
    /// certificate for `name` of `role`, valid for `validity`, and returns it (PEM).
    ///
    /// Only the request's key is used: the certificate is exactly what [`issue_cert`]
    /// would issue for the same role, name and `extra_sans` (subject, SANs including the
    /// name when it is a DNS name, key usages, validity), whatever subject, names or
    /// extensions the request asks for. Refuses a request longer than [`MAX_CSR_LEN`],
    /// one that does not parse or whose signature does not verify (so its sender holds
    /// the key), one with extensions other than key usages and names, and a key other
    /// than ECDSA P-256 or P-384, Ed25519 or RSA of 2048 to 8192 bits.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        role: Role,
        name: &CertName,
        extra_sans: &[String],
        validity: Duration,
    ) -> anyhow::Result<String> {
        if csr_pem.len() > MAX_CSR_LEN {
            bail!(
                "certificate request of {} bytes refused: the limit is {MAX_CSR_LEN}",
                csr_pem.len()
            );
        }
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .context("no PEM certificate request (CERTIFICATE REQUEST) found")?;
        let sans = subject_alt_names(extra_sans, Some(name))?;
        // Verifies the request's signature with its own key; everything but the key is
        // dropped below.
        let request = CertificateSigningRequestParams::from_der(&der).map_err(|e| {
            anyhow::anyhow!("certificate request refused (unparseable or bad signature): {e}")
        })?;
        let public_key = request.public_key;
        let alg = public_key.algorithm();
        if !USABLE_KEY_ALGORITHMS.contains(&alg) {
            bail!("certificate request refused: its key type ({alg:?}) is not supported");
        }
        let cert = sign_leaf_key(&self.ca, role, name, &sans, validity, &public_key)?;
        // rcgen derives the key's type from the request's signature algorithm; make sure
        // the certificate carries the very key the request does (say, not a P-384 point
        // labelled P-256 because the request was signed with SHA-256).
        if spki_of_request(&der)? != spki_of_cert(cert.der())? {
            bail!("certificate request refused: its key type and signature algorithm disagree");
        }
        Ok(cert.pem())
    }
}

/// Key types a node key may have: what rcgen can sign for and rustls (ring) can use.
/// RSA key sizes are held to 2048..=8192 bits by the request's signature check.
static USABLE_KEY_ALGORITHMS: [&rcgen::SignatureAlgorithm; 6] = [
    &rcgen::PKCS_ECDSA_P256_SHA256,
    &rcgen::PKCS_ECDSA_P384_SHA384,
    &rcgen::PKCS_ED25519,
    &rcgen::PKCS_RSA_SHA256,
    &rcgen::PKCS_RSA_SHA384,
    &rcgen::PKCS_RSA_SHA512,
];

/// The DER of a certificate request's subject public key info.
fn spki_of_request(der: &[u8]) -> anyhow::Result<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| anyhow::anyhow!("unparseable certificate request: {e}"))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// The DER of a certificate's subject public key info.
fn spki_of_cert(der: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("unparseable certificate: {e}"))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// A new private key for a node of `role` named `name`, of the type [`issue_cert`]
/// generates, and a certificate signing request for it: `(key PEM, request PEM)`. Send
/// the request to the CA holder ([`Issuer::sign_request`]), keep the key, and store both
/// with the answer using [`install_enrolled`]. The request's subject names the role and
/// name, for the CA holder's information only: the signer decides them.
pub fn new_key_and_request(role: Role, name: &CertName) -> anyhow::Result<(String, String)> {
    check_name(name)?;
    let key = KeyPair::generate().with_context(|| format!("generating {role} key"))?;
    let csr = request_for(&key, role, name)?;
    Ok((key.serialize_pem(), csr))
}

/// A certificate signing request (PEM) for the key a node already holds in `dir` (its
/// `<role>-key.pem`), naming `name`: to renew an enrolled certificate, keeping the key
/// the cluster enrolled the name for. Install the answer with [`install_renewed`].
pub fn request_for_existing_key(dir: &Path, role: Role, name: &CertName) -> anyhow::Result<String> {
    check_name(name)?;
    let files = CertFiles::in_dir(dir);
    let key_pem = fs::read_to_string(files.key(role))
        .with_context(|| format!("reading {}", files.key(role).display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} holds no usable key", files.key(role).display()))?;
    request_for(&key, role, name)
}

fn request_for(key: &KeyPair, role: Role, name: &CertName) -> anyhow::Result<String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = leaf_dn(role, name);
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .with_context(|| format!("making the {role} certificate request"))
}

/// Replaces `dir`'s `<role>.pem` with `cert_pem`, a renewal for the key `dir` already
/// holds. Checks first that it is a `role` certificate valid now under `dir`'s CA, for
/// that key, naming the same node as the one it replaces; on any failure the disk is
/// untouched. Running nodes present it from their next handshake
/// ([`crate::Identity::spawn_reload`]).
pub fn install_renewed(dir: &Path, role: Role, cert_pem: &str) -> anyhow::Result<CertInfo> {
    let files = CertFiles::in_dir(dir);
    let read = |path: &Path| {
        fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let (ca_pem, key_pem) = (read(&files.ca_cert)?, read(files.key(role))?);
    let old = CertInfo::read(files.cert(role))?;
    crate::tls::Identity::from_pem(&ca_pem, cert_pem, &key_pem, role)
        .context("the renewed certificate is not usable")?;
    let new = CertInfo::from_pem(cert_pem)?;
    if new.subject.name != old.subject.name {
        bail!(
            "the renewed certificate names {}, not {} as the one it would replace",
            new.subject.name,
            old.subject.name
        );
    }
    replace_file(files.cert(role), cert_pem, false)?;
    Ok(new)
}

/// Stores an enrolled node's credentials in `dir` (created with mode 0700 if missing):
/// `ca.pem`, `<role>.pem` and `<role>-key.pem` (0600), as [`issue_cert`] would.
///
/// Checks first that the certificate is a `role` certificate valid now under `ca_pem`
/// and that `key_pem` is its key, and refuses to replace any existing file; either
/// failure leaves the disk untouched.
pub fn install_enrolled(
    dir: &Path,
    role: Role,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<CertFiles> {
    crate::tls::Identity::from_pem(ca_pem, cert_pem, key_pem, role)
        .context("the enrolled certificate is not usable")?;
    let files = CertFiles::in_dir(dir);
    let all = [
        (files.ca_cert.as_path(), ca_pem, false),
        (files.cert(role), cert_pem, false),
        (files.key(role), key_pem, true),
    ];
    refuse_existing(all.iter().map(|(p, _, _)| *p))?;
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    for (i, (path, pem, private)) in all.iter().enumerate() {
        if let Err(e) = write_file(path, pem, *private, false) {
            // Take back what this call wrote (create_new: only its own files), so a
            // retry starts from the same state.
            for (written, _, _) in &all[..i] {
                let _ = fs::remove_file(written);
            }
            return Err(e);
        }
    }
    Ok(files)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn refuse_existing<'a>(paths: impl Iterator<Item = &'a Path>) -> anyhow::Result<()> {
    let existing: Vec<String> = paths
        .filter(|path| fs::symlink_metadata(path).is_ok())
        .map(|path| path.display().to_string())
        .collect();
    if !existing.is_empty() {
        bail!(
            "refusing to overwrite existing certificate files ({}); force replacing them",
            existing.join(", ")
        );
    }
    Ok(())
}

/// A signed leaf certificate and its new key, both PEM.
fn sign_leaf(
    issuer: &Ca,
    role: Role,
    name: &CertName,
    sans: &[SanType],
    validity: Duration,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().with_context(|| format!("generating {role} key"))?;
    let cert = sign_leaf_key(issuer, role, name, sans, validity, &key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A node certificate for `public_key`: the one place every leaf certificate (issued,
/// renewed or enrolled) is signed.
fn sign_leaf_key(
    issuer: &Ca,
    role: Role,
    name: &CertName,
    sans: &[SanType],
    validity: Duration,
    public_key: &impl PublicKeyData,
) -> anyhow::Result<Certificate> {
    check_name(name)?;
    leaf_params(role, name, sans, validity)
        .signed_by(public_key, &issuer.cert, &issuer.key)
        .with_context(|| format!("signing {role} certificate"))
}

/// Refuses a name [`CertName::parse`] would not give back, which would make a
/// certificate no reader accepts.
fn check_name(name: &CertName) -> anyhow::Result<()> {
    match CertName::parse(&name.to_string()) {
        Ok(parsed) if parsed == *name => Ok(()),
        Ok(_) => bail!("{name:?} is not a valid certificate name"),
        Err(e) => bail!("invalid certificate name: {e}"),
    }
}

/// The default SANs (plus `name` when it is a DNS name) and `extra`, each classified as
/// IP address or DNS name.
fn subject_alt_names(extra: &[String], name: Option<&CertName>) -> anyhow::Result<Vec<SanType>> {
    let mut sans = vec![
        SanType::DnsName(Ia5String::try_from("localhost")?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    if let Some(CertName::Node(n)) = name {
        if DnsName::try_from(n.as_str()).is_ok() && n.parse::<IpAddr>().is_err() {
            let san = SanType::DnsName(Ia5String::try_from(n.to_ascii_lowercase())?);
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
    }
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

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now();
    params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
    params.not_after = now.checked_add(validity).unwrap_or(now).into();
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, CN_CA);
    params.distinguished_name = dn;
    // Path length 0: the CA signs leaf certificates only, never intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY);
    params
}

/// A node certificate: organization `swarm`, unit = role marker, common name = name.
/// Both TLS usages: coordinators serve and dial each other, workers dial coordinators
/// and serve peer and relay links; what a peer may do is decided by the role every
/// dialer and acceptor checks, not by the usage.
fn leaf_params(
    role: Role,
    name: &CertName,
    sans: &[SanType],
    validity: Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = leaf_dn(role, name);
    params.subject_alt_names = sans.to_vec();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    // A random serial: rcgen's default derives it from the public key, which would give
    // a renewal (same key) the serial of the certificate it replaces.
    params.serial_number = Some(random_serial());
    set_validity(&mut params, validity);
    params
}

/// 16 random bytes, positive and without a leading zero byte (RFC 5280 §4.1.2.2).
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    let filled = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes);
    if filled.is_err() {
        // The system's random source failed: fall back to the clock and a counter,
        // still unique per process (serials need to be unique, not secret).
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&now.to_be_bytes());
        bytes[8..].copy_from_slice(&n.to_be_bytes());
    }
    bytes[0] = (bytes[0] & 0x7f).max(1);
    rcgen::SerialNumber::from_slice(&bytes)
}

/// A node's subject: organization `swarm`, unit = role marker, common name = name.
fn leaf_dn(role: Role, name: &CertName) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::OrganizationalUnitName, role.common_name());
    dn.push(DnType::CommonName, name.to_string());
    dn
}

fn open_options(private: bool) -> fs::OpenOptions {
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
    options
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
    let mut file = open_options(private)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `contents` to a fresh temporary file beside `path`, syncs it and renames it
/// over `path`, then syncs the directory.
fn replace_file(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    write_file(&tmp, contents, private, false)?;
    fs::rename(&tmp, path)
        .with_context(|| format!("replacing {} with {}", path.display(), tmp.display()))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
        let sans = subject_alt_names(&extra, None).unwrap();
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
                subject_alt_names(&[bad.to_string()], None).is_err(),
                "{bad:?} accepted"
            );
        }
        // A node's own name is a SAN when it is a DNS name.
        let named = subject_alt_names(&[], Some(&CertName::Node("worker-3".into()))).unwrap();
        assert!(named.contains(&SanType::DnsName("worker-3".try_into().unwrap())));
    }

    #[test]
    fn subjects_round_trip_through_certificates() {
        for (role, name) in [
            (Role::Coordinator, CertName::Node("node-1".into())),
            (Role::Worker, CertName::Node("w1".into())),
            (Role::Worker, CertName::Pool("k8s-".into())),
            (Role::Worker, CertName::Pool(String::new())),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = leaf_params(role, &name, &[], DEFAULT_VALIDITY)
                .self_signed(&key)
                .unwrap();
            let subject = CertSubject::from_cert_der(cert.der()).unwrap();
            assert_eq!(subject, CertSubject { role, name });
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
    fn an_older_release_certificate_reads_as_a_pool_for_any_name() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::CommonName, MARK_WORKER);
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).unwrap();
        let subject = CertSubject::from_cert_der(cert.der()).unwrap();
        assert_eq!(subject.role, Role::Worker);
        assert!(subject.name.allows("anything"));
    }

    #[test]
    fn names_parse_and_bind_ids() {
        assert_eq!(
            CertName::parse("w-1").unwrap(),
            CertName::Node("w-1".into())
        );
        assert_eq!(
            CertName::parse("pool-*").unwrap(),
            CertName::Pool("pool-".into())
        );
        assert_eq!(CertName::parse("*").unwrap(), CertName::Pool(String::new()));
        for bad in ["", "a b", "a/b", "a*b", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(CertName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(CertName::Node("w1".into()).allows("w1"));
        assert!(!CertName::Node("w1".into()).allows("w10"));
        assert!(CertName::Pool("k8s-".into()).allows("k8s-abc"));
        assert!(!CertName::Pool("k8s-".into()).allows("w1"));
    }

    #[test]
    fn role_names() {
        assert_eq!(Role::Coordinator.to_string(), "coordinator");
        assert_eq!(Role::from_common_name("swarm-worker"), Some(Role::Worker));
        assert_eq!(Role::from_common_name("swarm-Worker"), None);
        assert_eq!("worker".parse::<Role>().unwrap(), Role::Worker);
        assert!("admin".parse::<Role>().is_err());
    }

    #[test]
    fn issue_and_renew_keep_the_subject_and_replace_the_key() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[], false).unwrap();
        let node = dir.path().join("w7");
        let name = CertName::Node("w7".into());
        let files = issue_cert(
            dir.path(),
            &node,
            Role::Worker,
            &name,
            &["10.1.2.3".into()],
            Duration::from_secs(3600),
            false,
        )
        .unwrap();
        let first = CertInfo::read(&files.worker_cert).unwrap();
        assert_eq!(first.subject.name, name);
        assert!(first.sans.contains(&"10.1.2.3".to_string()));
        assert!(first.sans.contains(&"w7".to_string()));
        assert!(fs::read(&files.ca_cert).unwrap() == fs::read(dir.path().join("ca.pem")).unwrap());
        // No silent overwrite.
        assert!(issue_cert(
            dir.path(),
            &node,
            Role::Worker,
            &name,
            &[],
            DEFAULT_VALIDITY,
            false
        )
        .is_err());
        let key_before = fs::read(&files.worker_key).unwrap();
        let renewed = renew_cert(dir.path(), &node, Role::Worker, DEFAULT_VALIDITY).unwrap();
        assert_eq!(renewed.subject, first.subject);
        assert_eq!(renewed.sans, first.sans);
        assert_ne!(renewed.serial, first.serial);
        assert!(renewed.not_after_unix > first.not_after_unix);
        assert_ne!(fs::read(&files.worker_key).unwrap(), key_before);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files.worker_key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The renewed pair loads.
        crate::tls::Identity::load(&node, Role::Worker).unwrap();
        // Without the CA key there is nothing to sign with.
        assert!(issue_cert(
            &node,
            &dir.path().join("x"),
            Role::Worker,
            &name,
            &[],
            DEFAULT_VALIDITY,
            false
        )
        .is_err());
    }

    /// A cluster CA (from `init_certs`) and an issuer loaded from it.
    fn issuer() -> (tempfile::TempDir, Issuer) {
        let dir = tempfile::tempdir().unwrap();
        let files = init_certs(dir.path(), &[], false).unwrap();
        let issuer = Issuer::load(&files.ca_cert, &files.ca_key).unwrap();
        (dir, issuer)
    }

    /// The extensions of a PEM certificate but the subject key identifier (which differs
    /// with the key), as (oid, critical, value).
    fn extensions(pem: &str) -> Vec<(String, bool, Vec<u8>)> {
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let mut exts: Vec<_> = cert
            .extensions()
            .iter()
            .filter(|e| e.oid != x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .map(|e| (e.oid.to_id_string(), e.critical, e.value.to_vec()))
            .collect();
        exts.sort();
        exts
    }

    /// (issuer, not_after - not_before in seconds) of a PEM certificate.
    fn issuer_and_lifetime(pem: &str) -> (String, i64) {
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let v = cert.validity();
        (
            cert.issuer().to_string(),
            v.not_after.timestamp() - v.not_before.timestamp(),
        )
    }

    #[test]
    fn a_signed_request_gets_the_signers_subject_not_the_requested_one() {
        let (ca, issuer) = issuer();
        // The request claims to be a coordinator named "evil", valid for another host,
        // able to sign certificates.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = leaf_dn(Role::Coordinator, &CertName::Node("evil".into()));
        params.subject_alt_names = vec![SanType::DnsName("evil.example".try_into().unwrap())];
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let name = CertName::Node("w9".into());
        let cert = issuer
            .sign_request(
                &csr,
                Role::Worker,
                &name,
                &["10.9.9.9".into()],
                DEFAULT_VALIDITY,
            )
            .unwrap();
        let info = CertInfo::from_pem(&cert).unwrap();
        assert_eq!(
            info.subject,
            CertSubject {
                role: Role::Worker,
                name: name.clone()
            }
        );
        assert!(info.sans.contains(&"w9".to_string()));
        assert!(info.sans.contains(&"10.9.9.9".to_string()));
        assert!(!info.sans.contains(&"evil.example".to_string()));
        // The requested key is the one certified, and it works with the CA.
        let id = crate::tls::Identity::from_pem(
            issuer.ca_pem(),
            &cert,
            &key.serialize_pem(),
            Role::Worker,
        )
        .unwrap();
        assert_eq!(id.subject().name, name);

        // Exactly what issue_cert makes for the same role, name and SANs.
        let out = tempfile::tempdir().unwrap();
        let issued = issue_cert(
            ca.path(),
            out.path(),
            Role::Worker,
            &name,
            &["10.9.9.9".into()],
            DEFAULT_VALIDITY,
            false,
        )
        .unwrap();
        let issued = fs::read_to_string(&issued.worker_cert).unwrap();
        let issued_info = CertInfo::from_pem(&issued).unwrap();
        assert_eq!(issued_info.subject, info.subject);
        assert_eq!(issued_info.sans, info.sans);
        assert_eq!(extensions(&issued), extensions(&cert));
        let (issued_by, issued_life) = issuer_and_lifetime(&issued);
        let (signed_by, signed_life) = issuer_and_lifetime(&cert);
        assert_eq!(issued_by, signed_by);
        assert!(
            (issued_life - signed_life).abs() <= 2,
            "{issued_life} vs {signed_life}"
        );
    }

    #[test]
    fn new_key_and_request_make_a_request_the_issuer_signs() {
        let (_ca, issuer) = issuer();
        let name = CertName::Pool("k8s-".into());
        let (key, csr) = new_key_and_request(Role::Worker, &name).unwrap();
        // Same key type as issue_cert's.
        assert_eq!(
            KeyPair::from_pem(&key).unwrap().algorithm(),
            KeyPair::generate().unwrap().algorithm()
        );
        let cert = issuer
            .sign_request(&csr, Role::Worker, &name, &[], Duration::from_secs(3600))
            .unwrap();
        let id =
            crate::tls::Identity::from_pem(issuer.ca_pem(), &cert, &key, Role::Worker).unwrap();
        assert_eq!(id.subject().name, name);
        // A pool name is no DNS name: only the defaults.
        assert_eq!(
            CertInfo::from_pem(&cert).unwrap().sans,
            ["localhost", "127.0.0.1", "::1"]
        );
        assert!(new_key_and_request(Role::Worker, &CertName::Node("a b".into())).is_err());
        assert!(issuer
            .sign_request(
                &csr,
                Role::Worker,
                &CertName::Node("x*".into()),
                &[],
                DEFAULT_VALIDITY
            )
            .is_err());
    }

    #[test]
    fn other_usable_key_types_are_signed() {
        let (_ca, issuer) = issuer();
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            let cert = issuer
                .sign_request(
                    &csr,
                    Role::Coordinator,
                    &CertName::Node("c2".into()),
                    &[],
                    DEFAULT_VALIDITY,
                )
                .unwrap();
            crate::tls::Identity::from_pem(
                issuer.ca_pem(),
                &cert,
                &key.serialize_pem(),
                Role::Coordinator,
            )
            .unwrap();
        }
    }

    /// Standard base64 with padding (no dependency for one test).
    fn base64(data: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn tampered_garbage_and_oversize_requests_are_refused() {
        let (_ca, issuer) = issuer();
        let name = CertName::Node("w1".into());
        let sign = |csr: &str| issuer.sign_request(csr, Role::Worker, &name, &[], DEFAULT_VALIDITY);
        let (_, csr) = new_key_and_request(Role::Worker, &name).unwrap();
        sign(&csr).unwrap();

        // Flip one byte of the DER: in the signature, then in the signed subject.
        let der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let name_at = der
            .windows(2)
            .position(|w| w == b"w1")
            .expect("the name is in the request");
        for at in [der.len() - 1, name_at] {
            let mut bad = der.to_vec();
            bad[at] ^= 0x01;
            let pem = format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                base64(&bad)
            );
            // The encoding itself is right: the unflipped DER passes.
            assert!(CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).is_ok());
            let err = sign(&pem).unwrap_err();
            assert!(format!("{err:#}").contains("refused"), "{err:#}");
        }

        for garbage in [
            "",
            "not a request",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            issuer.ca_pem(),
        ] {
            assert!(sign(garbage).is_err(), "{garbage:?} accepted");
        }

        // A real, validly signed request that is simply too large.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = (0..800)
            .map(|i| SanType::DnsName(format!("host-{i}.example.com").try_into().unwrap()))
            .collect();
        let big = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(big.len() > MAX_CSR_LEN);
        assert!(CertificateSigningRequestParams::from_pem(&big).is_ok());
        let err = sign(&big).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err:#}");
    }

    #[test]
    fn install_enrolled_checks_before_writing() {
        let (_ca, issuer) = issuer();
        let name = CertName::Node("w5".into());
        let (key, csr) = new_key_and_request(Role::Worker, &name).unwrap();
        let cert = issuer
            .sign_request(&csr, Role::Worker, &name, &[], DEFAULT_VALIDITY)
            .unwrap();
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("node");

        // Another key: refused, nothing written (not even the directory).
        let (other_key, _) = new_key_and_request(Role::Worker, &name).unwrap();
        assert!(install_enrolled(&dir, Role::Worker, issuer.ca_pem(), &cert, &other_key).is_err());
        assert!(!dir.exists());
        // Another CA: refused.
        let (_other_ca, other_issuer) = self::issuer();
        assert!(install_enrolled(&dir, Role::Worker, other_issuer.ca_pem(), &cert, &key).is_err());
        // The wrong role: refused.
        assert!(install_enrolled(&dir, Role::Coordinator, issuer.ca_pem(), &cert, &key).is_err());
        assert!(!dir.exists());

        let files = install_enrolled(&dir, Role::Worker, issuer.ca_pem(), &cert, &key).unwrap();
        assert_eq!(files, CertFiles::in_dir(&dir));
        assert_eq!(fs::read_to_string(&files.ca_cert).unwrap(), issuer.ca_pem());
        assert_eq!(fs::read_to_string(&files.worker_cert).unwrap(), cert);
        assert_eq!(fs::read_to_string(&files.worker_key).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&files.worker_key), 0o600);
            assert_eq!(mode(&dir) & 0o077, 0);
        }
        let id = crate::tls::Identity::load(&dir, Role::Worker).unwrap();
        assert_eq!(id.subject().name, name);

        // Existing files are never replaced, and stay as they were.
        let (key2, csr2) = new_key_and_request(Role::Worker, &name).unwrap();
        let cert2 = issuer
            .sign_request(&csr2, Role::Worker, &name, &[], DEFAULT_VALIDITY)
            .unwrap();
        assert!(install_enrolled(&dir, Role::Worker, issuer.ca_pem(), &cert2, &key2).is_err());
        assert_eq!(fs::read_to_string(&files.worker_key).unwrap(), key);
        // Only the CA there (say a node that trusts the CA already): still refused.
        let dir2 = root.path().join("node2");
        fs::create_dir(&dir2).unwrap();
        fs::write(dir2.join("ca.pem"), issuer.ca_pem()).unwrap();
        assert!(install_enrolled(&dir2, Role::Worker, issuer.ca_pem(), &cert2, &key2).is_err());
        assert!(!dir2.join("worker.pem").exists());
    }
}
