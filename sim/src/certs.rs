//! Cluster certificates for simulations.
//!
//! Like `swarm certs init` (same file names, same subjects, so the production loaders
//! read them), but with Ed25519 keys, fixed serial numbers and a fixed validity window:
//! every certificate then has the same size on every run, so TLS handshakes, and with
//! them the packets the simulation schedules, do not vary in size between runs.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use swarm_transport::{CertFiles, Role};

fn params(unit: Option<&str>, cn: &str, serial: u64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "swarm");
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.serial_number = Some(SerialNumber::from(serial));
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2999, 1, 1);
    p
}

/// Write a cluster CA and coordinator and worker certificates valid for `ips` (and
/// `localhost`) into `dir`.
pub fn write_certs(dir: &Path, ips: &[IpAddr]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let files = CertFiles::in_dir(dir);
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut ca = params(None, "swarm cluster CA", 1);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(&files.ca_cert, ca_cert.pem())?;
    std::fs::write(&files.ca_key, ca_key.serialize_pem())?;
    for (serial, role) in [(2, Role::Coordinator), (3, Role::Worker)] {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        // A coordinator named `coordinator`, a worker pool certificate for any id.
        let name = match role {
            Role::Coordinator => "coordinator",
            Role::Worker => "*",
        };
        let mut p = params(Some(role.common_name()), name, serial);
        p.subject_alt_names = std::iter::once(SanType::DnsName("localhost".try_into()?))
            .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        std::fs::write(files.cert(role), cert.pem())?;
        std::fs::write(files.key(role), key.serialize_pem())?;
    }
    Ok(())
}
