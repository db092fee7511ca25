//! Moving a cluster to a new CA without restarting any node: real QUIC over 127.0.0.1
//! (and rustls HTTPS configurations, in memory) with certificate directories on disk,
//! every node taking its new `ca.pem` and certificate with `Identity::reload`, and every
//! configuration built before the rotation used throughout.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod common;

use common::{any_local, bounded, ALPN};
use swarm_transport::pki::DEFAULT_VALIDITY;
use swarm_transport::{
    accept, client_config, client_endpoint, dial, https_client_config, https_server_config,
    init_certs, issue_cert, new_key_and_request, open_session, peer_serial, server_config,
    server_endpoint, CertFiles, CertInfo, CertName, Identity, Issuer, Role, TransportError,
};

/// Replaces `path` with `contents` as deployment tooling should: a temporary file beside
/// it, renamed over it. The new file's modification time is set past the old one's, so
/// a reload sees the change even where timestamps are coarse, without sleeping.
fn replace(path: &Path, contents: &[u8]) {
    let old = fs::metadata(path).and_then(|m| m.modified()).ok();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents).unwrap();
    if let Some(old) = old {
        let later = SystemTime::now().max(old + Duration::from_secs(1));
        fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(later)
            .unwrap();
    }
    fs::rename(&tmp, path).unwrap();
}

/// A CA bundle: the concatenated `ca.pem` files of the given CA directories.
fn bundle(ca_dirs: &[&Path]) -> String {
    ca_dirs
        .iter()
        .map(|dir| fs::read_to_string(CertFiles::in_dir(dir).ca_cert).unwrap())
        .collect()
}

/// Issues a certificate for node `name` of `role` from the CA in `ca_dir` into `out`.
fn issue(ca_dir: &Path, out: &Path, role: Role, name: &str) {
    issue_cert(
        ca_dir,
        out,
        role,
        &CertName::Node(name.into()),
        &[],
        DEFAULT_VALIDITY,
        false,
    )
    .unwrap();
}

/// A node with its own certificate directory, loaded from it.
struct Node {
    dir: PathBuf,
    role: Role,
    name: String,
    id: Identity,
}

impl Node {
    /// A node of `role` named `name` in `root/name`, with a certificate from `ca_dir`.
    fn new(root: &Path, ca_dir: &Path, role: Role, name: &str) -> Node {
        let dir = root.join(name);
        issue(ca_dir, &dir, role, name);
        let id = Identity::load(&dir, role).unwrap();
        Node {
            dir,
            role,
            name: name.into(),
            id,
        }
    }

    fn files(&self) -> CertFiles {
        CertFiles::in_dir(&self.dir)
    }

    /// The serial of the certificate on disk.
    fn serial(&self) -> String {
        CertInfo::read(self.files().cert(self.role)).unwrap().serial
    }

    /// Writes a new `ca.pem`.
    fn write_ca(&self, pem: &str) {
        replace(&self.files().ca_cert, pem.as_bytes());
    }

    /// Replaces the node's certificate and key with new ones (same name) from the CA in
    /// `ca_dir`: key first, then certificate, as `renew_cert` does.
    fn reissue(&self, ca_dir: &Path, scratch: &Path) {
        let out = scratch.join(format!("{}-reissued", self.name));
        issue(ca_dir, &out, self.role, &self.name);
        let (new, mine) = (CertFiles::in_dir(&out), self.files());
        replace(mine.key(self.role), &fs::read(new.key(self.role)).unwrap());
        replace(
            mine.cert(self.role),
            &fs::read(new.cert(self.role)).unwrap(),
        );
    }
}

/// Whether the error is a connection closed because of a TLS alert (QUIC CRYPTO_ERROR,
/// codes 0x100..=0x1ff), raised locally or by the peer, seen on the connection or on one
/// of its streams.
fn is_tls_failure(e: &TransportError) -> bool {
    use swarm_transport::FrameError;
    let conn = match e {
        TransportError::Connection(c) => c,
        TransportError::Frame(FrameError::Read(quinn::ReadError::ConnectionLost(c)))
        | TransportError::Frame(FrameError::Write(quinn::WriteError::ConnectionLost(c))) => c,
        _ => return false,
    };
    let code = match conn {
        quinn::ConnectionError::TransportError(te) => te.code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return false,
    };
    (0x100..=0x1ff).contains(&u64::from(code))
}

/// One connection from the client endpoint `cep` with `cfg` to the worker-accepting
/// server endpoint `sep` at `addr`, exchanging one message. Returns what each side made
/// of it: the server the client's certificate serial, the client the server's.
async fn connect(
    sep: &quinn::Endpoint,
    addr: SocketAddr,
    cep: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
) -> (
    Result<String, TransportError>,
    Result<String, TransportError>,
) {
    let server = async {
        let incoming = sep.accept().await.expect("endpoint closed");
        let mut acc = accept(incoming).await?;
        acc.authenticate_as(Role::Worker).await?;
        let serial = peer_serial(&acc.conn)?;
        let (mut w, mut r) = acc.accept_stream().await?;
        let msg: Option<String> = r.recv().await?;
        w.send(&msg.expect("a message")).await?;
        acc.conn.closed().await;
        Ok(serial)
    };
    let client = async {
        let dialed = dial(cep, cfg, addr, "localhost").await?;
        let mut session = open_session(dialed, &"ping".to_string()).await?;
        let serial = peer_serial(&session.conn)?;
        let echo: Option<String> = session.reader.recv().await?;
        assert_eq!(echo.as_deref(), Some("ping"));
        session.conn.close(0u32.into(), b"done");
        Ok(serial)
    };
    tokio::join!(server, client)
}

/// A TLS handshake between an HTTPS server and client configuration, in memory. Returns
/// the serial of the certificate the client presented (as the server saw it), or the
/// first error either side raised.
fn https_handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> Result<String, rustls::Error> {
    let mut srv = rustls::ServerConnection::new(server.clone())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut cli = rustls::ClientConnection::new(client.clone(), name)?;
    let mut flight = Vec::new();
    // A TLS 1.3 handshake takes three flights; allow a few more before calling it stuck.
    for _ in 0..8 {
        if !cli.is_handshaking() && !srv.is_handshaking() {
            let leaf = srv
                .peer_certificates()
                .and_then(|c| c.first())
                .expect("a client certificate");
            return Ok(swarm_transport::serial_of_der(leaf).unwrap());
        }
        flight.clear();
        while cli.wants_write() {
            cli.write_tls(&mut flight).unwrap();
        }
        if !flight.is_empty() {
            srv.read_tls(&mut flight.as_slice()).unwrap();
            srv.process_new_packets()?;
        }
        flight.clear();
        while srv.wants_write() {
            srv.write_tls(&mut flight).unwrap();
        }
        if !flight.is_empty() {
            cli.read_tls(&mut flight.as_slice()).unwrap();
            cli.process_new_packets()?;
        }
    }
    panic!("the in-memory TLS handshake did not finish");
}

#[tokio::test]
async fn the_cluster_ca_rotates_without_a_restart() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let (ca_a, ca_b) = (root.join("ca-a"), root.join("ca-b"));
        init_certs(&ca_a, &[], false).unwrap();

        // Under CA A: a coordinator S serving, workers C and D dialing it.
        let s = Node::new(root, &ca_a, Role::Coordinator, "s1");
        let c = Node::new(root, &ca_a, Role::Worker, "c1");
        let d = Node::new(root, &ca_a, Role::Worker, "d1");
        // Everything the rest of the test connects with is built now, before the
        // rotation, and never rebuilt.
        let sep = server_endpoint(any_local(), server_config(&s.id, &[ALPN]).unwrap()).unwrap();
        let addr = sep.local_addr().unwrap();
        let cep = client_endpoint(any_local()).unwrap();
        let c_cfg = client_config(&c.id, ALPN, Role::Coordinator).unwrap();
        let d_cfg = client_config(&d.id, ALPN, Role::Coordinator).unwrap();
        let s_https = Arc::new(https_server_config(&s.id).unwrap());
        let c_https = Arc::new(https_client_config(&c.id, Role::Coordinator).unwrap());
        let d_https = Arc::new(https_client_config(&d.id, Role::Coordinator).unwrap());
        let proof_of = |n: &Node| n.id.prove(b"ca rotation test").unwrap();
        let verify = |by: &Node, proof: swarm_transport::IdentityProof| {
            by.id.verify_proof(&proof, b"ca rotation test")
        };

        let (srv, cli) = connect(&sep, addr, &cep, &c_cfg).await;
        assert_eq!(srv.unwrap(), c.serial());
        assert_eq!(cli.unwrap(), s.serial());
        let (srv, cli) = connect(&sep, addr, &cep, &d_cfg).await;
        assert_eq!(srv.unwrap(), d.serial());
        assert_eq!(cli.unwrap(), s.serial());
        assert_eq!(https_handshake(&s_https, &c_https).unwrap(), c.serial());

        // Step 1: every node trusts A and the new CA B.
        init_certs(&ca_b, &[], false).unwrap();
        let both = bundle(&[&ca_a, &ca_b]);
        for n in [&s, &c, &d] {
            assert_eq!(n.id.roots().len(), 1);
            n.write_ca(&both);
            assert!(n.id.reload().unwrap(), "{}", n.name);
            assert_eq!(n.id.roots().len(), 2);
            // Nothing changed since.
            assert!(!n.id.reload().unwrap(), "{}", n.name);
        }

        // Step 2: C gets a certificate from B. S takes it through the bundle, with the
        // server configuration built before. (A full handshake: the sessions stored
        // under the CAs trusted before step 1 were forgotten, else the server would
        // report C's old certificate from the resumed session.)
        let c_a_serial = c.serial();
        c.reissue(&ca_b, root);
        assert!(c.id.reload().unwrap());
        assert_ne!(c.serial(), c_a_serial);
        let (srv, cli) = connect(&sep, addr, &cep, &c_cfg).await;
        assert_eq!(srv.unwrap(), c.serial());
        assert_eq!(cli.unwrap(), s.serial());
        assert_eq!(https_handshake(&s_https, &c_https).unwrap(), c.serial());
        verify(&s, proof_of(&c)).unwrap();
        // D, still on A, too.
        let (srv, _) = connect(&sep, addr, &cep, &d_cfg).await;
        assert_eq!(srv.unwrap(), d.serial());

        // Step 3: S gets a certificate from B and every node trusts B only. S takes both
        // in one reload: the new certificate is checked against the new CA.
        let s_a_serial = s.serial();
        s.reissue(&ca_b, root);
        let only_b = bundle(&[&ca_b]);
        s.write_ca(&only_b);
        assert!(s.id.reload().unwrap());
        assert_ne!(s.serial(), s_a_serial);
        assert_eq!(s.id.roots().len(), 1);
        c.write_ca(&only_b);
        assert!(c.id.reload().unwrap());
        assert_eq!(c.id.roots().len(), 1);
        // D missed its new certificate: it refuses a CA its own certificate fails under,
        // and keeps trusting A and B.
        let d_roots = d.id.roots();
        d.write_ca(&only_b);
        let err = format!("{:#}", d.id.reload().unwrap_err());
        assert!(err.contains("refused"), "{err}");
        assert!(Arc::ptr_eq(&d.id.roots(), &d_roots));

        // C and S, both on B, with the endpoint and configurations of before.
        let (srv, cli) = connect(&sep, addr, &cep, &c_cfg).await;
        assert_eq!(srv.unwrap(), c.serial());
        assert_eq!(cli.unwrap(), s.serial());
        assert_eq!(https_handshake(&s_https, &c_https).unwrap(), c.serial());
        verify(&s, proof_of(&c)).unwrap();

        // D's certificate from A is refused by S now (D still trusts S's certificate
        // from B, so it is S that refuses), although D holds a session S gave it in
        // step 2: S forgot its sessions when its trusted CAs changed.
        let (srv, cli) = connect(&sep, addr, &cep, &d_cfg).await;
        let srv = srv.unwrap_err();
        assert!(is_tls_failure(&srv), "server: {srv:?}");
        let cli = cli.unwrap_err();
        assert!(is_tls_failure(&cli), "client: {cli:?}");
        let https = https_handshake(&s_https, &d_https).unwrap_err();
        assert!(
            matches!(https, rustls::Error::InvalidCertificate(_)),
            "{https:?}"
        );
        assert!(verify(&s, proof_of(&d)).is_err());

        // Step 4: a ca.pem under which C's own certificate (from B) is not valid: refused,
        // C keeps trusting B and still reaches S, also with a configuration built now
        // (no session to resume, so a full handshake under the CAs C trusts).
        let c_roots = c.id.roots();
        c.write_ca(&bundle(&[&ca_a]));
        let err = format!("{:#}", c.id.reload().unwrap_err());
        assert!(err.contains("refused"), "{err}");
        assert!(Arc::ptr_eq(&c.id.roots(), &c_roots));
        let fresh = client_config(&c.id, ALPN, Role::Coordinator).unwrap();
        for cfg in [&c_cfg, &fresh] {
            let (srv, cli) = connect(&sep, addr, &cep, cfg).await;
            assert_eq!(srv.unwrap(), c.serial());
            assert_eq!(cli.unwrap(), s.serial());
        }
        // Writing back the CAs trusted already changes nothing.
        c.write_ca(&only_b);
        assert!(!c.id.reload().unwrap());
        assert!(Arc::ptr_eq(&c.id.roots(), &c_roots));
    })
    .await
}

#[test]
fn unusable_ca_files_are_refused_and_nothing_changes() {
    let pki = common::Pki::new();
    let files = pki.files();
    let id = pki.identity(Role::Coordinator);
    let roots = id.roots();
    let chain = id.cert_chain();
    let ca = fs::read_to_string(&files.ca_cert).unwrap();

    let other = common::Pki::new();
    let other_ca = fs::read_to_string(other.files().ca_cert).unwrap();
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    for bad in ["", "not a certificate", garbage, &other_ca] {
        replace(&files.ca_cert, bad.as_bytes());
        assert!(id.reload().is_err(), "{bad:?} taken");
        assert!(Arc::ptr_eq(&id.roots(), &roots), "{bad:?}");
    }

    // A renewed certificate waits for a usable ca.pem: neither is taken alone.
    replace(&files.ca_cert, ca.as_bytes());
    swarm_transport::renew_cert(pki.path(), pki.path(), Role::Coordinator, DEFAULT_VALIDITY)
        .unwrap();
    replace(&files.ca_cert, b"not a certificate");
    assert!(id.reload().is_err());
    assert_eq!(id.cert_chain(), chain);
    // The same CA again: the renewed certificate is taken, the CAs stay as they are.
    replace(&files.ca_cert, ca.as_bytes());
    assert!(id.reload().unwrap());
    assert_ne!(id.cert_chain(), chain);
    assert!(Arc::ptr_eq(&id.roots(), &roots));
}

/// The key identifier of the first certificate in `pem`: its authority key identifier
/// if `authority`, else its subject key identifier.
fn key_id(pem: &str, authority: bool) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use x509_parser::extensions::ParsedExtension;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) if authority => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            ParsedExtension::SubjectKeyIdentifier(ski) if !authority => Some(ski.0.to_vec()),
            _ => None,
        })
        .expect("a key identifier")
}

#[test]
fn issuer_load_signs_with_the_ca_of_its_key_in_a_bundle() {
    let root = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (root.path().join("ca-a"), root.path().join("ca-b"));
    init_certs(&ca_a, &[], false).unwrap();
    init_certs(&ca_b, &[], false).unwrap();
    let only = |dir: &Path| fs::read_to_string(CertFiles::in_dir(dir).ca_cert).unwrap();
    let name = CertName::Node("w1".into());

    // Either order of the bundle, either key: the issuer signs as the key's CA.
    for (first, second, signer, other) in [
        (&ca_a, &ca_b, &ca_b, &ca_a),
        (&ca_a, &ca_b, &ca_a, &ca_b),
        (&ca_b, &ca_a, &ca_b, &ca_a),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles::in_dir(dir.path());
        let both = bundle(&[first, second]);
        fs::write(&files.ca_cert, &both).unwrap();
        fs::copy(CertFiles::in_dir(signer).ca_key, &files.ca_key).unwrap();
        let issuer = Issuer::load(&files.ca_cert, &files.ca_key).unwrap();
        // The whole bundle is what nodes must trust.
        assert_eq!(issuer.ca_pem(), both);

        let (key, csr) = new_key_and_request(Role::Worker, &name).unwrap();
        let cert = issuer
            .sign_request(&csr, Role::Worker, &name, &[], DEFAULT_VALIDITY)
            .unwrap();
        Identity::from_pem(&only(signer), &cert, &key, Role::Worker).unwrap();
        assert!(Identity::from_pem(&only(other), &cert, &key, Role::Worker).is_err());
        Identity::from_pem(issuer.ca_pem(), &cert, &key, Role::Worker).unwrap();
        // All swarm CAs have the same name, so the check above would pass a certificate
        // signed with the right key in the name of the wrong CA; its authority key
        // identifier would still point at that CA.
        assert_eq!(key_id(&cert, true), key_id(&only(signer), false));
        assert_ne!(key_id(&cert, true), key_id(&only(other), false));

        // issue_cert from a bundle directory: the node gets the bundle, and a
        // certificate from the key's CA.
        let node = dir.path().join("node");
        issue(dir.path(), &node, Role::Worker, "w2");
        let node_files = CertFiles::in_dir(&node);
        assert_eq!(fs::read_to_string(&node_files.ca_cert).unwrap(), both);
        Identity::load(&node, Role::Worker).unwrap();
        let (cert, key) = (
            fs::read_to_string(&node_files.worker_cert).unwrap(),
            fs::read_to_string(&node_files.worker_key).unwrap(),
        );
        Identity::from_pem(&only(signer), &cert, &key, Role::Worker).unwrap();
        assert!(Identity::from_pem(&only(other), &cert, &key, Role::Worker).is_err());
        assert_eq!(key_id(&cert, true), key_id(&only(signer), false));
    }

    // A key of neither CA in the bundle: a clear error.
    let ca_c = root.path().join("ca-c");
    init_certs(&ca_c, &[], false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = CertFiles::in_dir(dir.path());
    fs::write(&files.ca_cert, bundle(&[&ca_a, &ca_b])).unwrap();
    fs::copy(CertFiles::in_dir(&ca_c).ca_key, &files.ca_key).unwrap();
    let err = format!(
        "{:#}",
        Issuer::load(&files.ca_cert, &files.ca_key).unwrap_err()
    );
    assert!(err.contains("does not belong"), "{err}");
    assert!(err.contains("2 certificate"), "{err}");
}

/// A connection made under the old CA does not outlive a rotation that drops it: once a
/// node trusts only the new CA, `close_when_distrusted` closes its live connection to a
/// peer still on an old-CA certificate (with `UNTRUSTED_CODE`), while a connection to a
/// peer with a new-CA certificate stays up.
#[tokio::test]
async fn live_connections_under_a_dropped_ca_are_closed() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let (ca_a, ca_b) = (root.join("ca-a"), root.join("ca-b"));
        init_certs(&ca_a, &[], false).unwrap();
        init_certs(&ca_b, &[], false).unwrap();
        let s = Node::new(root, &ca_a, Role::Coordinator, "s1");
        let old = Node::new(root, &ca_a, Role::Worker, "old");
        let new = Node::new(root, &ca_b, Role::Worker, "new");
        // Everyone trusts both CAs to begin with; S holds a certificate from B.
        let both = bundle(&[&ca_a, &ca_b]);
        for n in [&s, &old, &new] {
            n.write_ca(&both);
            assert!(n.id.reload().unwrap());
        }
        s.reissue(&ca_b, root);
        assert!(s.id.reload().unwrap());

        let sep = server_endpoint(any_local(), server_config(&s.id, &[ALPN]).unwrap()).unwrap();
        let addr = sep.local_addr().unwrap();
        let mut live = Vec::new();
        for n in [&old, &new] {
            let cep = client_endpoint(any_local()).unwrap();
            let cfg = client_config(&n.id, ALPN, Role::Coordinator).unwrap();
            let (accepted, dialed) = tokio::join!(
                async {
                    let mut acc = accept(sep.accept().await.expect("endpoint open"))
                        .await
                        .unwrap();
                    acc.authenticate_as(Role::Worker).await.unwrap();
                    acc.conn
                },
                async { dial(&cep, &cfg, addr, "localhost").await.unwrap() }
            );
            let mut dialed = dialed;
            dialed.handshake().await.unwrap();
            let watch = tokio::spawn(swarm_transport::close_when_distrusted(
                accepted.clone(),
                s.id.clone(),
            ));
            live.push((accepted, watch, cep, dialed.conn.clone()));
        }

        // S now trusts B only: the old-CA worker's connection is closed, the other stays.
        s.write_ca(&bundle(&[&ca_b]));
        assert!(s.id.reload().unwrap());
        let (_, old_watch, _, old_client) = live.remove(0);
        assert!(old_watch.await.unwrap(), "the old-CA peer was not cut off");
        match old_client.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(swarm_transport::endpoint::UNTRUSTED_CODE)
            ),
            other => panic!("the old-CA peer saw {other:?}"),
        }
        let (new_conn, new_watch, _, _) = live.remove(0);
        assert!(
            new_conn.close_reason().is_none(),
            "the new-CA peer was cut off too"
        );
        assert!(!new_watch.is_finished());
        new_conn.close(0u32.into(), b"done");
        assert!(
            !new_watch.await.unwrap(),
            "closed for another reason, not distrust"
        );
    })
    .await;
}
