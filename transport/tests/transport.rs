//! End-to-end tests: real QUIC over 127.0.0.1 with certificates from `init_certs`.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
mod common;

use common::{any_local, bounded, client, server, Pki, ALPN};
use swarm_transport::endpoint::WRONG_ROLE_CODE;
use swarm_transport::tls::CertFiles;
use swarm_transport::{
    accept, client_config, client_endpoint, dial, init_certs, open_session, peer_role,
    require_role, server_config, Accepted, FrameError, FrameReader, FrameWriter, Identity, Role,
    TransportError, DEFAULT_MAX_FRAME,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Hello { worker: String },
    Task { id: u64, payload: Vec<u8> },
    Ack(u64),
}

fn hello(n: u32) -> Msg {
    Msg::Hello {
        worker: format!("worker-{n}"),
    }
}

/// Accepts one connection and returns it with its first stream, unauthenticated.
async fn accept_one(ep: &quinn::Endpoint) -> (Accepted, FrameWriter, FrameReader) {
    let incoming = ep.accept().await.expect("endpoint closed");
    let acc = accept(incoming).await.unwrap();
    let (w, r) = acc.accept_stream().await.unwrap();
    (acc, w, r)
}

/// What the server made of one incoming connection attempt.
async fn server_outcome(ep: quinn::Endpoint) -> Result<Role, TransportError> {
    let incoming = ep.accept().await.expect("endpoint closed");
    let mut acc = accept(incoming).await?;
    acc.authenticate().await
}

/// Whether the error is a connection closed because of a TLS alert (QUIC CRYPTO_ERROR,
/// codes 0x100..=0x1ff), raised locally or by the peer.
fn is_tls_failure(e: &TransportError) -> bool {
    let code = match e {
        TransportError::Connection(quinn::ConnectionError::TransportError(te)) => te.code,
        TransportError::Connection(quinn::ConnectionError::ConnectionClosed(c)) => c.error_code,
        _ => return false,
    };
    (0x100..=0x1ff).contains(&u64::from(code))
}

/// The client's view of a connection attempt the server is expected to refuse: either
/// the dial fails, or (TLS 1.3 clients finish before the server checks their
/// certificate) the connection is closed right after.
async fn client_outcome(
    ep: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    addr: SocketAddr,
    name: &str,
) -> TransportError {
    match dial(ep, cfg, addr, name).await {
        Err(e) => e,
        Ok(d) => d.conn.closed().await.into(),
    }
}

/// A client config built straight from rustls, to present credentials `Identity` would
/// refuse to assemble (a certificate from another CA, or none at all). It still verifies
/// the server properly.
fn raw_client_config(trusted_ca_pem: &str, auth: Option<(&str, &str)>) -> quinn::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trusted_ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut tls = match auth {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(quic))
}

#[tokio::test]
async fn frames_round_trip_both_ways_including_large_batches() {
    bounded(async {
        let pki = Pki::new();
        let (sep, addr) = server(&pki.identity(Role::Coordinator));
        const N: u64 = 10_000;

        let srv = tokio::spawn(async move {
            let (mut acc, mut w, mut r) = accept_one(&sep).await;
            let first: Msg = r.recv().await.unwrap().unwrap();
            assert_eq!(acc.authenticate().await.unwrap(), Role::Worker);
            for id in 0..N {
                let got: Msg = r.recv().await.unwrap().expect("stream ended early");
                assert_eq!(
                    got,
                    Msg::Task {
                        id,
                        payload: id.to_le_bytes().to_vec()
                    }
                );
            }
            // The client finished its side after the batch: a clean end, not an error.
            assert!(r.recv::<Msg>().await.unwrap().is_none());
            w.send(&Msg::Ack(N)).await.unwrap();
            let acks: Vec<Msg> = (0..N).map(Msg::Ack).collect();
            w.send_batch(&acks).await.unwrap();
            w.finish().unwrap();
            // Keep the connection alive until the client has read everything.
            acc.conn.closed().await;
            first
        });

        let (cep, cfg) = client(&pki.identity(Role::Worker));
        let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        assert!(dialed.early.is_none(), "no session to resume yet");
        let mut s = open_session(dialed, &hello(1)).await.unwrap();
        assert!(!s.zero_rtt_accepted);
        let tasks: Vec<Msg> = (0..N)
            .map(|id| Msg::Task {
                id,
                payload: id.to_le_bytes().to_vec(),
            })
            .collect();
        s.writer.send_batch(&tasks).await.unwrap();
        s.writer.finish().unwrap();

        assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(N)));
        for i in 0..N {
            assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(i)));
        }
        assert!(s.reader.recv::<Msg>().await.unwrap().is_none());
        s.conn.close(0u32.into(), b"done");
        assert_eq!(srv.await.unwrap(), hello(1));
    })
    .await
}

#[tokio::test]
async fn peer_role_is_read_from_the_certificate_on_both_sides() {
    bounded(async {
        let pki = Pki::new();
        // (server role, client role): worker servers are the future peer links.
        for (server_role, client_role) in [(Role::Coordinator, Role::Worker), (Role::Worker, Role::Coordinator)]
        {
            let (sep, addr) = server(&pki.identity(server_role));
            let srv = tokio::spawn(async move {
                let (mut acc, mut w, mut r) = accept_one(&sep).await;
                let role = acc.authenticate().await.unwrap();
                let msg: Msg = r.recv().await.unwrap().unwrap();
                w.send(&msg).await.unwrap();
                acc.conn.closed().await;
                role
            });
            let (cep, cfg) = client(&pki.identity(client_role));
            let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
            let mut s = open_session(dialed, &hello(2)).await.unwrap();
            assert_eq!(peer_role(&s.conn).unwrap(), server_role);
            assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(hello(2)));
            let err = require_role(&s.conn, client_role).unwrap_err();
            assert!(matches!(
                err,
                TransportError::WrongRole { expected, got } if expected == client_role && got == server_role
            ));
            s.conn.close(0u32.into(), b"done");
            assert_eq!(srv.await.unwrap(), client_role);
        }
    })
    .await
}

#[tokio::test]
async fn coordinators_dial_each_other_from_their_server_endpoints() {
    bounded(async {
        let pki = Pki::new();
        let coord = pki.identity(Role::Coordinator);
        let (ep_a, _) = server(&coord);
        let (ep_b, addr_b) = server(&coord);
        let srv = tokio::spawn(async move {
            let (mut acc, mut w, mut r) = accept_one(&ep_b).await;
            acc.authenticate_as(Role::Coordinator).await.unwrap();
            let msg: Msg = r.recv().await.unwrap().unwrap();
            w.send(&msg).await.unwrap();
            acc.conn.closed().await;
        });
        let cfg = client_config(&coord, ALPN, Role::Coordinator).unwrap();
        let dialed = dial(&ep_a, &cfg, addr_b, "127.0.0.1").await.unwrap();
        let mut s = open_session(dialed, &Msg::Ack(7)).await.unwrap();
        assert_eq!(peer_role(&s.conn).unwrap(), Role::Coordinator);
        assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(7)));
        s.conn.close(0u32.into(), b"done");
        srv.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn server_closes_a_client_of_the_wrong_role() {
    bounded(async {
        let pki = Pki::new();
        let (sep, addr) = server(&pki.identity(Role::Coordinator));
        let srv = tokio::spawn(async move {
            let incoming = sep.accept().await.unwrap();
            let mut acc = accept(incoming).await.unwrap();
            acc.authenticate_as(Role::Coordinator).await
        });
        let (cep, cfg) = client(&pki.identity(Role::Worker));
        let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        let err = srv.await.unwrap().unwrap_err();
        assert!(matches!(
            err,
            TransportError::WrongRole {
                expected: Role::Coordinator,
                got: Role::Worker
            }
        ));
        match dialed.conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, quinn::VarInt::from_u32(WRONG_ROLE_CODE))
            }
            other => panic!("unexpected close: {other:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    bounded(async {
        let cluster = Pki::new();
        let intruder = Pki::new();
        let files = intruder.files();
        // The intruder trusts the real CA (so it accepts the server) but presents a
        // certificate from its own CA. `Identity` refuses to build that combination.
        assert!(Identity::from_pem(
            &cluster.read(cluster.files().ca_cert),
            &intruder.read(files.worker_cert.clone()),
            &intruder.read(files.worker_key.clone()),
            Role::Worker,
        )
        .is_err());
        let cfg = raw_client_config(
            &cluster.read(cluster.files().ca_cert),
            Some((
                &intruder.read(files.worker_cert),
                &intruder.read(files.worker_key),
            )),
        );

        let (sep, addr) = server(&cluster.identity(Role::Coordinator));
        let srv = tokio::spawn(server_outcome(sep.clone()));
        let cep = client_endpoint(any_local()).unwrap();
        let client_err = client_outcome(&cep, &cfg, addr, "localhost").await;
        let server_err = srv.await.unwrap().unwrap_err();
        assert!(is_tls_failure(&server_err), "server: {server_err:?}");
        assert!(is_tls_failure(&client_err), "client: {client_err:?}");
    })
    .await
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    bounded(async {
        let pki = Pki::new();
        let cfg = raw_client_config(&pki.read(pki.files().ca_cert), None);
        let (sep, addr) = server(&pki.identity(Role::Coordinator));
        let srv = tokio::spawn(server_outcome(sep.clone()));
        let cep = client_endpoint(any_local()).unwrap();
        let client_err = client_outcome(&cep, &cfg, addr, "localhost").await;
        let server_err = srv.await.unwrap().unwrap_err();
        assert!(is_tls_failure(&server_err), "server: {server_err:?}");
        assert!(is_tls_failure(&client_err), "client: {client_err:?}");
    })
    .await
}

#[tokio::test]
async fn server_certificate_from_another_ca_is_rejected() {
    bounded(async {
        let cluster = Pki::new();
        let impostor = Pki::new();
        let (sep, addr) = server(&impostor.identity(Role::Coordinator));
        let srv = tokio::spawn(server_outcome(sep.clone()));
        let (cep, cfg) = client(&cluster.identity(Role::Worker));
        let err = dial(&cep, &cfg, addr, "localhost")
            .await
            .err()
            .expect("dial must fail");
        assert!(is_tls_failure(&err), "client: {err:?}");
        let server_err = srv.await.unwrap().unwrap_err();
        assert!(is_tls_failure(&server_err), "server: {server_err:?}");
    })
    .await
}

#[tokio::test]
async fn server_name_must_match_the_certificate() {
    bounded(async {
        let pki = Pki::with_sans(&["swarm.test", "10.9.8.7"]);
        let (sep, addr) = server(&pki.identity(Role::Coordinator));
        let (cep, cfg) = client(&pki.identity(Role::Worker));

        let srv = tokio::spawn(server_outcome(sep.clone()));
        let err = dial(&cep, &cfg, addr, "other.test")
            .await
            .err()
            .expect("wrong name accepted");
        assert!(is_tls_failure(&err), "client: {err:?}");
        assert!(srv.await.unwrap().is_err());

        // Names that are in the certificate work, including an extra SAN.
        for name in ["swarm.test", "10.9.8.7", "localhost"] {
            let srv = tokio::spawn(server_outcome(sep.clone()));
            let dialed = dial(&cep, &cfg, addr, name).await.unwrap();
            assert_eq!(srv.await.unwrap().unwrap(), Role::Worker);
            dialed.conn.close(0u32.into(), b"done");
        }
    })
    .await
}

/// Runs `client` against a server that hands its first stream's reader to `check`.
async fn with_raw_stream<C, CF, K, KF>(write: C, check: K)
where
    C: FnOnce(quinn::SendStream) -> CF,
    CF: Future<Output = ()>,
    K: FnOnce(FrameReader) -> KF + Send + 'static,
    KF: Future<Output = ()> + Send,
{
    let pki = Pki::new();
    let (sep, addr) = server(&pki.identity(Role::Coordinator));
    let srv = tokio::spawn(async move {
        let (mut acc, _w, r) = accept_one(&sep).await;
        acc.authenticate().await.unwrap();
        check(r).await;
        acc.conn.close(0u32.into(), b"checked");
    });
    let (cep, cfg) = client(&pki.identity(Role::Worker));
    let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
    let (send, _recv) = dialed.conn.open_bi().await.unwrap();
    write(send).await;
    srv.await.unwrap();
    dialed.conn.close(0u32.into(), b"done");
}

#[tokio::test]
async fn oversize_frame_is_rejected_without_allocating_it() {
    bounded(with_raw_stream(
        |mut send| async move {
            send.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
            send.write_all(&[0u8; 4096]).await.unwrap();
        },
        |mut r| async move {
            let err = r.recv::<Msg>().await.unwrap_err();
            assert!(
                matches!(err, FrameError::TooLarge { len, max } if len == 1 << 30 && max == DEFAULT_MAX_FRAME),
                "{err:?}"
            );
            assert!(err.is_malformed());
            // Only what actually arrived was buffered, not the 1 GiB the header claimed.
            assert!(r.buffer_capacity() < 64 * 1024, "buffer grew to {}", r.buffer_capacity());
        },
    ))
    .await
}

#[tokio::test]
async fn custom_max_frame_is_enforced_at_the_boundary() {
    bounded(with_raw_stream(
        |send| async move {
            let mut w = FrameWriter::new(send);
            w.send(&Msg::Task {
                id: 1,
                payload: vec![7; 100],
            })
            .await
            .unwrap();
            w.send(&Msg::Task {
                id: 2,
                payload: vec![7; 101],
            })
            .await
            .unwrap();
            w.finish().unwrap();
        },
        |r| async move {
            let limit = swarm_transport::codec::encode(&Msg::Task {
                id: 1,
                payload: vec![7; 100],
            })
            .unwrap()
            .len();
            let mut r = FrameReader::with_max_frame(r.into_inner(), limit);
            assert!(matches!(
                r.recv::<Msg>().await,
                Ok(Some(Msg::Task { id: 1, .. }))
            ));
            let err = r.recv::<Msg>().await.unwrap_err();
            assert!(
                matches!(err, FrameError::TooLarge { len, max } if len == limit + 1 && max == limit)
            );
        },
    ))
    .await
}

#[tokio::test]
async fn garbage_payload_is_malformed_and_the_stream_continues() {
    bounded(with_raw_stream(
        |send| async move {
            let mut w = FrameWriter::new(send);
            w.get_mut()
                .write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
                .await
                .unwrap();
            w.send(&Msg::Ack(3)).await.unwrap();
            w.finish().unwrap();
        },
        |mut r| async move {
            let err = r.recv::<Msg>().await.unwrap_err();
            assert!(
                matches!(err, FrameError::Malformed(_)) && err.is_malformed(),
                "{err:?}"
            );
            assert_eq!(r.recv::<Msg>().await.unwrap(), Some(Msg::Ack(3)));
            assert!(r.recv::<Msg>().await.unwrap().is_none());
        },
    ))
    .await
}

#[tokio::test]
async fn truncated_frame_at_end_of_stream_is_an_error() {
    bounded(with_raw_stream(
        |mut send| async move {
            send.write_all(&100u32.to_be_bytes()).await.unwrap();
            send.write_all(&[1u8; 10]).await.unwrap();
            send.finish().unwrap();
        },
        |mut r| async move {
            let err = r.recv::<Msg>().await.unwrap_err();
            assert!(
                matches!(
                    err,
                    FrameError::Truncated {
                        expected: 104,
                        got: 14
                    }
                ),
                "{err:?}"
            );
            assert!(err.is_malformed());
        },
    ))
    .await
}

/// xorshift64: deterministic noise without a dependency.
fn noise(state: &mut u64, buf: &mut [u8]) {
    for b in buf {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *b = *state as u8;
    }
}

/// Garbage datagrams of several shapes: tiny, short-header, and long-header packets
/// claiming to be QUIC v1 Initials (which make the server try to decrypt them).
fn spray(sock: &UdpSocket, addr: SocketAddr, seed: u64) {
    let mut state = seed;
    for i in 0..300 {
        let len = [1, 7, 40, 1200, 1350, 1500][i % 6];
        let mut buf = vec![0u8; len];
        noise(&mut state, &mut buf);
        if i % 2 == 0 && len >= 1200 {
            buf[0] = 0xc0 | (buf[0] & 0x0f); // long header, Initial
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
            buf[5] = 8; // DCID length
            buf[14] = 8; // SCID length
            buf[23] = 0; // no token
        }
        sock.send_to(&buf, addr).unwrap();
    }
}

#[tokio::test]
async fn random_udp_datagrams_do_not_disturb_the_server() {
    bounded(async {
        let pki = Pki::new();
        let (sep, addr) = server(&pki.identity(Role::Coordinator));
        // The server loop must survive anything; failed attempts are just counted.
        let srv = tokio::spawn(async move {
            let mut served = 0;
            while served < 2 {
                let Some(incoming) = sep.accept().await else {
                    break;
                };
                let Ok(mut acc) = accept(incoming).await else {
                    continue;
                };
                let Ok((mut w, mut r)) = acc.accept_stream().await else {
                    continue;
                };
                if acc.authenticate().await.is_err() {
                    continue;
                }
                tokio::spawn(async move {
                    while let Ok(Some(msg)) = r.recv::<Msg>().await {
                        if w.send(&msg).await.is_err() {
                            break;
                        }
                    }
                    acc.conn.closed().await;
                });
                served += 1;
            }
        });

        let sock = UdpSocket::bind(any_local()).unwrap();
        spray(&sock, addr, 0x1234_5678_9abc_def1);

        let (cep, cfg) = client(&pki.identity(Role::Worker));
        let mut first = open_session(
            dial(&cep, &cfg, addr, "localhost").await.unwrap(),
            &hello(1),
        )
        .await
        .unwrap();
        assert_eq!(first.reader.recv::<Msg>().await.unwrap(), Some(hello(1)));

        // More garbage while a connection is up; that connection keeps working, and a
        // new one can still be made.
        spray(&sock, addr, 0x0fed_cba9_8765_4321);
        first.writer.send(&Msg::Ack(1)).await.unwrap();
        assert_eq!(first.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(1)));

        let cep2 = client_endpoint(any_local()).unwrap();
        let mut second = open_session(
            dial(&cep2, &cfg, addr, "localhost").await.unwrap(),
            &hello(2),
        )
        .await
        .unwrap();
        assert_eq!(second.reader.recv::<Msg>().await.unwrap(), Some(hello(2)));
        srv.await.unwrap();
        first.conn.close(0u32.into(), b"done");
        second.conn.close(0u32.into(), b"done");
    })
    .await
}

#[tokio::test]
async fn second_connection_resumes_with_zero_rtt() {
    bounded(async {
        let pki = Pki::new();
        let (sep, addr) = server(&pki.identity(Role::Coordinator));
        let srv = tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..2 {
                let (mut acc, mut w, mut r) = accept_one(&sep).await;
                // Read the (idempotent) first message before the handshake completes.
                let first: Msg = r.recv().await.unwrap().unwrap();
                let early = r.is_0rtt();
                let role = acc.authenticate().await.unwrap();
                w.send(&Msg::Ack(i)).await.unwrap();
                acc.conn.closed().await;
                seen.push((first, early, role));
            }
            seen
        });

        let (cep, cfg) = client(&pki.identity(Role::Worker));
        // First connection: full handshake. Exchanging a message makes sure the session
        // tickets (sent right after the handshake) have arrived before closing.
        let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        assert!(dialed.early.is_none());
        let mut s = open_session(dialed, &hello(1)).await.unwrap();
        assert!(!s.zero_rtt_accepted);
        assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(0)));
        s.conn.close(0u32.into(), b"reconnect");

        // Second connection from the same endpoint and config: resumed, first message as
        // early data, accepted.
        let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        assert!(dialed.early.is_some(), "expected a resumable session");
        let mut s = open_session(dialed, &hello(2)).await.unwrap();
        assert!(s.zero_rtt_accepted);
        assert_eq!(peer_role(&s.conn).unwrap(), Role::Coordinator);
        assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(1)));
        // After open_session the handshake is complete: ordinary data is fine.
        s.writer
            .send(&Msg::Task {
                id: 9,
                payload: vec![],
            })
            .await
            .unwrap();
        s.conn.close(0u32.into(), b"done");

        let seen = srv.await.unwrap();
        assert_eq!(seen[0], (hello(1), false, Role::Worker));
        assert_eq!(seen[1], (hello(2), true, Role::Worker));
    })
    .await
}

#[test]
fn init_certs_writes_a_usable_pki_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested/certs");
    let files = init_certs(
        &dir,
        &["swarm.test".into(), "10.9.8.7".into(), "[::2]".into()],
        false,
    )
    .unwrap();
    assert_eq!(files, CertFiles::in_dir(&dir));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [&files.ca_key, &files.coordinator_key, &files.worker_key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }

    for role in [Role::Coordinator, Role::Worker] {
        let id = Identity::load(&dir, role).unwrap();
        assert_eq!(id.role(), role);
        let pem = std::fs::read_to_string(files.cert(role)).unwrap();
        let der = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
        };
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.subject()
                .iter_organizational_unit()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            role.common_name()
        );
        assert_eq!(
            swarm_transport::CertSubject::from_cert_der(&der)
                .unwrap()
                .role,
            role
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let sans = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        use x509_parser::extensions::GeneralName::{DNSName, IPAddress};
        for expected in ["localhost", "swarm.test"] {
            assert!(
                sans.iter()
                    .any(|n| matches!(n, DNSName(d) if *d == expected)),
                "{expected}"
            );
        }
        for ip in ["127.0.0.1", "::1", "10.9.8.7", "::2"] {
            let octets = match ip.parse::<std::net::IpAddr>().unwrap() {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            assert!(
                sans.iter()
                    .any(|n| matches!(n, IPAddress(b) if *b == octets)),
                "{ip}"
            );
        }
    }

    // A second run refuses, names the files, and leaves them alone.
    let ca_before = std::fs::read_to_string(&files.ca_cert).unwrap();
    let err = format!("{:#}", init_certs(&dir, &[], false).unwrap_err());
    assert!(err.contains("refusing") && err.contains("ca.pem"), "{err}");
    assert_eq!(std::fs::read_to_string(&files.ca_cert).unwrap(), ca_before);

    // With force, everything is replaced, keys still private.
    init_certs(&dir, &[], true).unwrap();
    assert_ne!(std::fs::read_to_string(&files.ca_cert).unwrap(), ca_before);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.worker_key)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    Identity::load(&dir, Role::Worker).unwrap();

    // An invalid extra SAN is refused before anything is written.
    let fresh = tmp.path().join("fresh");
    assert!(init_certs(&fresh, &["not a name".into()], false).is_err());
    assert!(!fresh.join("ca.pem").exists());
}

#[test]
fn identity_errors_name_the_bad_file() {
    let pki = Pki::new();
    let files = pki.files();

    // Missing key file.
    std::fs::remove_file(&files.worker_key).unwrap();
    let err = format!(
        "{:#}",
        Identity::load(pki.path(), Role::Worker).unwrap_err()
    );
    assert!(
        err.contains(&files.worker_key.display().to_string()),
        "{err}"
    );

    // Corrupt certificate file.
    std::fs::write(&files.coordinator_cert, "not a certificate").unwrap();
    let err = format!(
        "{:#}",
        Identity::load(pki.path(), Role::Coordinator).unwrap_err()
    );
    assert!(
        err.contains(&files.coordinator_cert.display().to_string()),
        "{err}"
    );

    // A worker certificate where the coordinator's should be.
    let other = Pki::new();
    std::fs::copy(other.files().worker_cert, &files.coordinator_cert).unwrap();
    let err = format!(
        "{:#}",
        Identity::load(pki.path(), Role::Coordinator).unwrap_err()
    );
    assert!(
        err.contains("coordinator.pem") && err.contains("worker certificate"),
        "{err}"
    );

    // A key that does not belong to the certificate.
    let err = Identity::from_pem(
        &other.read(other.files().ca_cert),
        &other.read(other.files().worker_cert),
        &other.read(other.files().coordinator_key),
        Role::Worker,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("does not belong"), "{err:#}");

    // Missing CA file.
    std::fs::remove_file(&files.ca_cert).unwrap();
    let err = format!(
        "{:#}",
        Identity::load(pki.path(), Role::Coordinator).unwrap_err()
    );
    assert!(err.contains(&files.ca_cert.display().to_string()), "{err}");
}

#[tokio::test]
async fn server_config_requires_an_alpn() {
    let pki = Pki::new();
    assert!(server_config(&pki.identity(Role::Coordinator), &[]).is_err());
}

#[tokio::test]
async fn rejected_zero_rtt_is_resent_transparently() {
    bounded(async {
        let pki = Pki::new();
        let coord = pki.identity(Role::Coordinator);
        let (sep, addr) = server(&coord);
        let server_ep = sep.clone();
        let srv = tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..2 {
                let (mut acc, mut w, mut r) = accept_one(&sep).await;
                let first: Msg = r.recv().await.unwrap().unwrap();
                let early = r.is_0rtt();
                acc.authenticate().await.unwrap();
                w.send(&Msg::Ack(i)).await.unwrap();
                // The next message on this stream proves no earlier copy of `first` is
                // queued ahead of it.
                let next: Msg = r.recv().await.unwrap().unwrap();
                w.send(&next).await.unwrap();
                acc.conn.closed().await;
                seen.push((first, early, next));
            }
            seen
        });

        let (cep, cfg) = client(&pki.identity(Role::Worker));
        let mut s = open_session(
            dial(&cep, &cfg, addr, "localhost").await.unwrap(),
            &hello(1),
        )
        .await
        .unwrap();
        assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(0)));
        s.writer.send(&Msg::Ack(100)).await.unwrap();
        assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(100)));
        s.conn.close(0u32.into(), b"reconnect");

        // A fresh server config has an empty session cache, as after a server restart:
        // the client still tries 0-RTT, the server must refuse it.
        server_ep.set_server_config(Some(server_config(&coord, &[ALPN]).unwrap()));
        let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        assert!(dialed.early.is_some(), "client should attempt 0-RTT");
        let mut s = open_session(dialed, &hello(2)).await.unwrap();
        assert!(!s.zero_rtt_accepted);
        assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(1)));
        s.writer.send(&Msg::Ack(200)).await.unwrap();
        assert_eq!(s.reader.recv::<Msg>().await.unwrap(), Some(Msg::Ack(200)));
        s.conn.close(0u32.into(), b"done");

        let seen = srv.await.unwrap();
        assert_eq!(seen[0], (hello(1), false, Msg::Ack(100)));
        assert_eq!(seen[1], (hello(2), false, Msg::Ack(200)));
    })
    .await
}

#[tokio::test]
async fn a_dialer_refuses_a_server_of_the_wrong_role() {
    bounded(async {
        // A worker certificate carries `localhost` like a coordinator's: only the role
        // check stops a worker key from posing as the coordinator to another worker.
        let pki = Pki::new();
        let (sep, addr) = server(&pki.identity(Role::Worker));
        tokio::spawn(async move {
            if let Some(incoming) = sep.accept().await {
                if let Ok(acc) = accept(incoming).await {
                    acc.conn.closed().await;
                }
            }
        });
        let worker = pki.identity(Role::Worker);
        let cep = client_endpoint(any_local()).unwrap();
        let cfg = client_config(&worker, ALPN, Role::Coordinator).unwrap();
        let result = dial(&cep, &cfg, addr, "localhost").await;
        let err = match result {
            Err(e) => e.to_string(),
            Ok(mut d) => match d.handshake().await {
                Err(e) => e.to_string(),
                Ok(_) => match open_session(d, &hello(1)).await {
                    Err(e) => e.to_string(),
                    Ok(_) => panic!("a worker certificate passed for a coordinator"),
                },
            },
        };
        assert!(
            err.to_lowercase().contains("certificate"),
            "unexpected error: {err}"
        );
    })
    .await
}

#[test]
fn identity_proofs_bind_the_signer_and_the_context() {
    let pki = Pki::new();
    let dir = pki.path();
    let name = swarm_transport::CertName::Node("w1".into());
    let w1 = dir.join("w1");
    swarm_transport::issue_cert(
        dir,
        &w1,
        Role::Worker,
        &name,
        &[],
        swarm_transport::pki::DEFAULT_VALIDITY,
        false,
    )
    .unwrap();
    let member = Identity::load(&w1, Role::Worker).unwrap();
    let coordinator = pki.identity(Role::Coordinator);
    let proof = member.prove(b"nonce-1|lead-a").unwrap();
    let subject = coordinator.verify_proof(&proof, b"nonce-1|lead-a").unwrap();
    assert_eq!(subject.name, name);
    assert_eq!(subject.role, Role::Worker);
    // Another context (a replay elsewhere) fails.
    assert!(coordinator.verify_proof(&proof, b"nonce-2|lead-a").is_err());
    // A tampered signature fails.
    let mut bad = proof.clone();
    let last = bad.signature.len() - 1;
    bad.signature[last] ^= 1;
    assert!(coordinator.verify_proof(&bad, b"nonce-1|lead-a").is_err());
    // Someone else's certificate with this signature fails.
    let mut swapped = proof.clone();
    swapped.chain = pki
        .identity(Role::Worker)
        .cert_chain()
        .iter()
        .map(|c| c.to_vec())
        .collect();
    assert!(coordinator
        .verify_proof(&swapped, b"nonce-1|lead-a")
        .is_err());
    // A certificate from another cluster's CA fails.
    let other = Pki::new();
    let stranger = other
        .identity(Role::Worker)
        .prove(b"nonce-1|lead-a")
        .unwrap();
    assert!(coordinator
        .verify_proof(&stranger, b"nonce-1|lead-a")
        .is_err());
    // Garbage fails cleanly.
    let junk = swarm_transport::IdentityProof {
        chain: vec![vec![0x30, 0x03, 1, 2, 3]],
        scheme: 0xffff,
        signature: vec![],
    };
    assert!(coordinator.verify_proof(&junk, b"x").is_err());
}

/// The serial of the certificate the server of `conn` presented.
fn server_serial(conn: &quinn::Connection) -> String {
    let chain = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    cert.raw_serial_as_string()
}

#[tokio::test]
async fn a_renewed_certificate_is_presented_without_a_restart() {
    bounded(async {
        let pki = Pki::new();
        let server_id = pki.identity(Role::Coordinator);
        let (sep, addr) = server(&server_id);
        // Echoes every message on each of two connections until the client closes it.
        let srv = tokio::spawn(async move {
            let mut echoes = Vec::new();
            for _ in 0..2 {
                let (acc, mut w, mut r) = accept_one(&sep).await;
                echoes.push(tokio::spawn(async move {
                    while let Ok(Some(msg)) = r.recv::<Msg>().await {
                        w.send(&msg).await.unwrap();
                    }
                    drop(acc);
                }));
            }
            for e in echoes {
                e.await.unwrap();
            }
        });
        let (cep, cfg) = client(&pki.identity(Role::Worker));
        let mut first = open_session(
            dial(&cep, &cfg, addr, "localhost").await.unwrap(),
            &hello(1),
        )
        .await
        .unwrap();
        assert_eq!(first.reader.recv::<Msg>().await.unwrap(), Some(hello(1)));
        let before = server_serial(&first.conn);

        // Nothing changed on disk: nothing to reload.
        assert!(!server_id.reload().unwrap());
        swarm_transport::renew_cert(
            pki.path(),
            pki.path(),
            Role::Coordinator,
            swarm_transport::pki::DEFAULT_VALIDITY,
        )
        .unwrap();
        assert!(server_id.reload().unwrap());

        // A fresh client (no session to resume) sees the renewed certificate.
        let (cep2, cfg2) = client(&pki.identity(Role::Worker));
        let mut second = open_session(
            dial(&cep2, &cfg2, addr, "localhost").await.unwrap(),
            &hello(2),
        )
        .await
        .unwrap();
        assert_eq!(second.reader.recv::<Msg>().await.unwrap(), Some(hello(2)));
        assert_ne!(server_serial(&second.conn), before);
        // The first connection is untouched.
        first.writer.send(&hello(3)).await.unwrap();
        assert_eq!(first.reader.recv::<Msg>().await.unwrap(), Some(hello(3)));
        second.writer.send(&hello(4)).await.unwrap();
        assert_eq!(second.reader.recv::<Msg>().await.unwrap(), Some(hello(4)));
        first.conn.close(0u32.into(), b"done");
        second.conn.close(0u32.into(), b"done");
        srv.await.unwrap();

        // A certificate naming another node is not taken.
        let other = pki.path().join("other");
        swarm_transport::issue_cert(
            pki.path(),
            &other,
            Role::Coordinator,
            &swarm_transport::CertName::Node("node-9".into()),
            &[],
            swarm_transport::pki::DEFAULT_VALIDITY,
            false,
        )
        .unwrap();
        for f in ["coordinator.pem", "coordinator-key.pem"] {
            std::fs::copy(other.join(f), pki.path().join(f)).unwrap();
        }
        let err = server_id.reload().unwrap_err();
        assert!(format!("{err:#}").contains("same node"), "{err:#}");
    })
    .await
}
