//! The certificate deny list in real handshakes: QUIC over 127.0.0.1 and HTTPS (rustls
//! over a loopback TCP socket), with certificates from `init_certs` / `issue_cert`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{any_local, bounded, client, server, Pki};
use swarm_transport::endpoint::REVOKED_CODE;
use swarm_transport::{
    accept, dial, https_client_config, https_server_config, is_peer_revoked, open_session,
    peer_serial, require_not_revoked, CertInfo, Identity, Revocations, Role, TransportError,
};

/// QUIC CRYPTO_ERROR (0x100) carrying the TLS alert `certificate_revoked` (44).
const CERTIFICATE_REVOKED: u64 = 0x100 + 44;

/// The QUIC error code a connection failure carries, raised locally or by the peer.
fn error_code(e: &TransportError) -> Option<u64> {
    match e {
        TransportError::Connection(quinn::ConnectionError::TransportError(te)) => {
            Some(u64::from(te.code))
        }
        TransportError::Connection(quinn::ConnectionError::ConnectionClosed(c)) => {
            Some(u64::from(c.error_code))
        }
        _ => None,
    }
}

/// What the server made of one connection attempt: the client's serial once the
/// handshake completed, or why it failed. Answers one message so the client gets its
/// session tickets, then waits for the client to close.
async fn serve_one(ep: quinn::Endpoint) -> Result<String, TransportError> {
    let incoming = ep.accept().await.expect("endpoint closed");
    let mut acc = accept(incoming).await?;
    let (mut w, mut r) = match acc.accept_stream().await {
        Ok(stream) => stream,
        // A refused client never gets to open a stream: report the handshake failure.
        Err(e) => return Err(acc.authenticate().await.err().unwrap_or(e)),
    };
    acc.authenticate().await?;
    let serial = peer_serial(&acc.conn)?;
    let msg: String = r.recv().await.unwrap().unwrap();
    w.send(&msg).await.unwrap();
    acc.conn.closed().await;
    Ok(serial)
}

/// Dials and exchanges one message (so session tickets have arrived), then closes.
/// Returns whether the connection resumed with accepted 0-RTT, or the client's error.
async fn talk(
    ep: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    addr: SocketAddr,
) -> Result<bool, TransportError> {
    let dialed = dial(ep, cfg, addr, "localhost").await?;
    let conn = dialed.conn.clone();
    let result = async {
        let mut s = open_session(dialed, &"hello".to_string()).await?;
        let echo: Option<String> = s.reader.recv().await?;
        assert_eq!(echo.as_deref(), Some("hello"));
        Ok(s.zero_rtt_accepted)
    }
    .await;
    match result {
        Ok(zero_rtt) => {
            conn.close(0u32.into(), b"done");
            Ok(zero_rtt)
        }
        // Prefer the reason the connection died over the stream error it caused.
        Err(e) => Err(conn.close_reason().map(Into::into).unwrap_or(e)),
    }
}

#[tokio::test]
async fn a_client_is_accepted_until_its_serial_is_revoked() {
    bounded(async {
        let pki = Pki::new();
        let server_id = pki.identity(Role::Coordinator);
        let (sep, addr) = server(&server_id);
        let worker = pki.identity(Role::Worker);
        let worker_serial = pki.serial(Role::Worker);

        // Before: accepted.
        let srv = tokio::spawn(serve_one(sep.clone()));
        let (cep, cfg) = client(&worker);
        talk(&cep, &cfg, addr).await.unwrap();
        assert_eq!(srv.await.unwrap().unwrap(), worker_serial);

        // Revoked (written the way `openssl x509 -serial` would): a fresh client is
        // refused in the handshake, with the `certificate_revoked` alert on both sides.
        assert!(server_id
            .revocations()
            .replace([worker_serial.to_uppercase()]));
        let srv = tokio::spawn(serve_one(sep.clone()));
        let (cep, cfg) = client(&pki.identity(Role::Worker));
        let client_err = talk(&cep, &cfg, addr).await.unwrap_err();
        let server_err = srv.await.unwrap().unwrap_err();
        assert_eq!(
            error_code(&server_err),
            Some(CERTIFICATE_REVOKED),
            "server: {server_err:?}"
        );
        assert_eq!(
            error_code(&client_err),
            Some(CERTIFICATE_REVOKED),
            "client: {client_err:?}"
        );

        // Another member of the cluster is not affected.
        let w2 = Identity::load(&pki.issue_worker("w2"), Role::Worker).unwrap();
        let srv = tokio::spawn(serve_one(sep.clone()));
        let (cep, cfg) = client(&w2);
        talk(&cep, &cfg, addr).await.unwrap();
        let w2_serial = srv.await.unwrap().unwrap();
        assert_ne!(w2_serial, worker_serial);

        // Lifted again: accepted again.
        assert!(server_id.revocations().replace(Vec::new()));
        let srv = tokio::spawn(serve_one(sep.clone()));
        let (cep, cfg) = client(&worker);
        talk(&cep, &cfg, addr).await.unwrap();
        assert_eq!(srv.await.unwrap().unwrap(), worker_serial);
    })
    .await
}

#[tokio::test]
async fn a_revoked_client_cannot_get_in_by_resuming_a_session() {
    bounded(async {
        let pki = Pki::new();
        let server_id = pki.identity(Role::Coordinator);
        let (sep, addr) = server(&server_id);
        let (cep, cfg) = client(&pki.identity(Role::Worker));

        // Two connections: the second resumes with 0-RTT, so the client holds tickets.
        for resumed in [false, true] {
            let srv = tokio::spawn(serve_one(sep.clone()));
            assert_eq!(talk(&cep, &cfg, addr).await.unwrap(), resumed);
            srv.await.unwrap().unwrap();
        }

        server_id.revocations().replace([pki.serial(Role::Worker)]);
        let srv = tokio::spawn(serve_one(sep.clone()));
        // The client still tries to resume ...
        let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        assert!(dialed.early.is_some(), "expected a resumption attempt");
        let client_err: TransportError = dialed.conn.closed().await.into();
        // ... but the server forgot its sessions, so the handshake is a full one and the
        // verifier refuses the certificate.
        let server_err = srv.await.unwrap().unwrap_err();
        assert_eq!(
            error_code(&server_err),
            Some(CERTIFICATE_REVOKED),
            "server: {server_err:?}"
        );
        assert_eq!(
            error_code(&client_err),
            Some(CERTIFICATE_REVOKED),
            "client: {client_err:?}"
        );
    })
    .await
}

#[tokio::test]
async fn peer_serial_is_the_serial_cert_info_reads_on_both_sides() {
    bounded(async {
        let pki = Pki::new();
        let (sep, addr) = server(&pki.identity(Role::Coordinator));
        let srv = tokio::spawn(async move {
            let incoming = sep.accept().await.unwrap();
            let mut acc = accept(incoming).await.unwrap();
            acc.authenticate().await.unwrap();
            let serial = peer_serial(&acc.conn).unwrap();
            acc.conn.closed().await;
            serial
        });
        let (cep, cfg) = client(&pki.identity(Role::Worker));
        let mut dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        dialed.handshake().await.unwrap();
        assert_eq!(
            peer_serial(&dialed.conn).unwrap(),
            pki.serial(Role::Coordinator)
        );
        dialed.conn.close(0u32.into(), b"done");
        assert_eq!(srv.await.unwrap(), pki.serial(Role::Worker));
    })
    .await
}

#[tokio::test]
async fn require_not_revoked_cuts_a_live_connection_when_the_list_changes() {
    bounded(async {
        let pki = Pki::new();
        let server_id = pki.identity(Role::Coordinator);
        let revocations = server_id.revocations().clone();
        let mut changes = revocations.subscribe();
        let (sep, addr) = server(&server_id);
        let (admitted_tx, admitted) = tokio::sync::oneshot::channel();
        let srv = tokio::spawn(async move {
            let incoming = sep.accept().await.unwrap();
            let mut acc = accept(incoming).await.unwrap();
            acc.authenticate_as(Role::Worker).await.unwrap();
            // Checked after the handshake: fine.
            require_not_revoked(&acc.conn, &revocations).unwrap();
            assert!(!is_peer_revoked(&acc.conn, &revocations));
            admitted_tx.send(()).unwrap();
            // Checked again when the deny list changes.
            changes.changed().await.unwrap();
            assert!(is_peer_revoked(&acc.conn, &revocations));
            require_not_revoked(&acc.conn, &revocations)
        });
        let (cep, cfg) = client(&pki.identity(Role::Worker));
        let mut dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        dialed.handshake().await.unwrap();
        // Revoke only once the server has verified the client: a TLS 1.3 client finishes
        // its handshake before the server checks its certificate.
        admitted.await.unwrap();

        server_id.revocations().replace([pki.serial(Role::Worker)]);
        match srv.await.unwrap() {
            Err(TransportError::Revoked { serial }) => {
                assert_eq!(serial, pki.serial(Role::Worker))
            }
            other => panic!("expected Revoked, got {other:?}"),
        }
        match dialed.conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, quinn::VarInt::from_u32(REVOKED_CODE))
            }
            other => panic!("unexpected close: {other:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn a_dialer_refuses_a_server_whose_certificate_is_revoked() {
    bounded(async {
        let pki = Pki::new();
        let (sep, addr) = server(&pki.identity(Role::Coordinator));
        let worker = pki.identity(Role::Worker);
        let (cep, cfg) = client(&worker);

        // Before: reachable, and the dialer keeps a session to resume.
        let srv = tokio::spawn(serve_one(sep.clone()));
        talk(&cep, &cfg, addr).await.unwrap();
        srv.await.unwrap().unwrap();

        worker
            .revocations()
            .replace([pki.serial(Role::Coordinator)]);
        // The same config: its sessions were forgotten, so there is no resumption that
        // would skip the check, and the full handshake fails on the client.
        let srv = tokio::spawn(serve_one(sep.clone()));
        let err = dial(&cep, &cfg, addr, "localhost")
            .await
            .err()
            .expect("a revoked server was accepted");
        assert_eq!(
            error_code(&err),
            Some(CERTIFICATE_REVOKED),
            "client: {err:?}"
        );
        let server_err = srv.await.unwrap().unwrap_err();
        assert_eq!(
            error_code(&server_err),
            Some(CERTIFICATE_REVOKED),
            "server: {server_err:?}"
        );

        // A fresh config built from the same identity refuses it as well.
        let (cep2, cfg2) = client(&worker);
        let srv = tokio::spawn(serve_one(sep.clone()));
        let err = dial(&cep2, &cfg2, addr, "localhost")
            .await
            .err()
            .expect("a revoked server was accepted");
        assert_eq!(
            error_code(&err),
            Some(CERTIFICATE_REVOKED),
            "client: {err:?}"
        );
        assert!(srv.await.unwrap().is_err());
    })
    .await
}

#[test]
fn identity_proofs_of_a_revoked_signer_are_refused() {
    let pki = Pki::new();
    let member = Identity::load(&pki.issue_worker("w1"), Role::Worker).unwrap();
    let coordinator = pki.identity(Role::Coordinator);
    let proof = member.prove(b"nonce").unwrap();
    assert!(coordinator.verify_proof(&proof, b"nonce").is_ok());
    let serial = CertInfo::read(&pki.path().join("w1/worker.pem"))
        .unwrap()
        .serial;
    coordinator.revocations().replace([serial.clone()]);
    match coordinator.verify_proof(&proof, b"nonce") {
        Err(TransportError::Revoked { serial: s }) => assert_eq!(s, serial),
        other => panic!("expected Revoked, got {other:?}"),
    }
}

// ---- HTTPS: blocking rustls over a loopback TCP socket ----

/// Safety net for blocking socket reads; correctness never depends on it.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);

fn io_error(e: std::io::Error) -> rustls::Error {
    rustls::Error::General(format!("socket: {e}"))
}

/// Drives `conn`'s handshake over `sock`. On a TLS error, the alert it caused is sent
/// before returning the error.
fn handshake(conn: &mut rustls::Connection, sock: &mut TcpStream) -> Result<(), rustls::Error> {
    loop {
        while conn.wants_write() {
            conn.write_tls(sock).map_err(io_error)?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        if conn.read_tls(sock).map_err(io_error)? == 0 {
            return Err(rustls::Error::General("closed during the handshake".into()));
        }
        if let Err(e) = conn.process_new_packets() {
            while conn.wants_write() && conn.write_tls(sock).is_ok() {}
            return Err(e);
        }
    }
}

/// Ends our side of the TCP connection and waits for the peer to end its side, so no
/// unread data turns the close into a reset that would hide the peer's alert.
fn finish(sock: &mut TcpStream) {
    let _ = sock.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!(sock.read(&mut sink), Ok(n) if n > 0) {}
}

/// Serves one HTTPS handshake with `config`; on success sends `ok` and returns the
/// client's certificate serial (`None` without one).
fn https_serve_one(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> std::thread::JoinHandle<Result<Option<String>, rustls::Error>> {
    std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
        let mut conn = rustls::Connection::Server(rustls::ServerConnection::new(config).unwrap());
        let result = handshake(&mut conn, &mut sock).map(|()| {
            let serial = conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| swarm_transport::serial_of_der(leaf).unwrap());
            conn.writer().write_all(b"ok").unwrap();
            conn.send_close_notify();
            while conn.wants_write() && conn.write_tls(&mut sock).is_ok() {}
            serial
        });
        finish(&mut sock);
        result
    })
}

/// Connects to `addr` as `localhost` with `config`; returns what the server sent.
fn https_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Vec<u8>, rustls::Error> {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    let mut conn = rustls::Connection::Client(
        rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap(),
    );
    let result = handshake(&mut conn, &mut sock).and_then(|()| {
        // TLS 1.3: the client is done before the server has checked its certificate, so
        // a refusal arrives as an alert after the handshake.
        let mut got = Vec::new();
        loop {
            let n = conn.read_tls(&mut sock).map_err(io_error)?;
            let state = conn.process_new_packets()?;
            let mut buf = vec![0u8; state.plaintext_bytes_to_read()];
            conn.reader().read_exact(&mut buf).map_err(io_error)?;
            got.extend_from_slice(&buf);
            if state.peer_has_closed() || n == 0 {
                return Ok(got);
            }
        }
    });
    finish(&mut sock);
    result
}

/// One connection from `client` to `server`. Configurations keep their resumption
/// sessions across calls, like a long-running server or client does.
fn https_exchange(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> (
    Result<Option<String>, rustls::Error>,
    Result<Vec<u8>, rustls::Error>,
) {
    let listener = TcpListener::bind(any_local()).unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = https_serve_one(listener, server.clone());
    let client = https_request(addr, client.clone());
    (srv.join().unwrap(), client)
}

fn is_revoked_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
    )
}

fn is_revoked_alert(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)
    )
}

#[test]
fn https_server_refuses_a_revoked_client_certificate() {
    let pki = Pki::new();
    let server_id = pki.identity(Role::Coordinator);
    let worker = pki.identity(Role::Worker);
    let worker_serial = pki.serial(Role::Worker);
    let server = Arc::new(https_server_config(&server_id).unwrap());
    let client = Arc::new(https_client_config(&worker, Role::Coordinator).unwrap());

    // Before: accepted (the client now holds a session), and the server reads the
    // client's serial.
    let (srv, cli) = https_exchange(&server, &client);
    assert_eq!(srv.unwrap(), Some(worker_serial.clone()));
    assert_eq!(cli.unwrap(), b"ok");

    // After: refused in the handshake, although the client offers to resume.
    server_id.revocations().replace([worker_serial]);
    let (srv, cli) = https_exchange(&server, &client);
    let srv = srv.unwrap_err();
    assert!(is_revoked_error(&srv), "server: {srv:?}");
    let cli = cli.unwrap_err();
    assert!(is_revoked_alert(&cli), "client: {cli:?}");

    // Client certificates stay optional: a client without one still gets in.
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(server_id.roots())
    .with_no_client_auth();
    let (srv, cli) = https_exchange(&server, &Arc::new(anonymous));
    assert_eq!(srv.unwrap(), None);
    assert_eq!(cli.unwrap(), b"ok");
}

#[test]
fn https_client_refuses_a_server_whose_certificate_is_revoked() {
    let pki = Pki::new();
    let worker = pki.identity(Role::Worker);
    let server = Arc::new(https_server_config(&pki.identity(Role::Coordinator)).unwrap());
    let client = Arc::new(https_client_config(&worker, Role::Coordinator).unwrap());

    let (srv, cli) = https_exchange(&server, &client);
    assert!(srv.is_ok() && cli.is_ok());

    worker
        .revocations()
        .replace([pki.serial(Role::Coordinator)]);
    // The same config (which held a session to resume) and a fresh one both refuse it.
    let fresh = Arc::new(https_client_config(&worker, Role::Coordinator).unwrap());
    for client in [client, fresh] {
        let (srv, cli) = https_exchange(&server, &client);
        let cli = cli.unwrap_err();
        assert!(is_revoked_error(&cli), "client: {cli:?}");
        let srv = srv.unwrap_err();
        assert!(is_revoked_alert(&srv), "server: {srv:?}");
    }
}

#[test]
fn a_shared_deny_list_reaches_every_identity_using_it() {
    let pki = Pki::new();
    let shared = Revocations::new();
    let a = pki
        .identity(Role::Coordinator)
        .with_revocations(shared.clone());
    let b = a.clone();
    shared.replace(["AB:CD".to_string()]);
    assert!(a.revocations().is_revoked("abcd"));
    assert!(b.revocations().is_revoked("abcd"));
    assert_eq!(a.revocations().generation(), 1);
}
