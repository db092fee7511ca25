//! Enrollment end to end: a worker makes its own key and request, the CA signs it, the
//! worker installs the answer and connects over real mutual-TLS QUIC.

use std::net::SocketAddr;
use std::time::Duration;

use swarm_transport::{
    accept, client_config, client_endpoint, dial, init_certs, install_enrolled,
    new_key_and_request, open_session, peer_subject, server_config, server_endpoint, CertInfo,
    CertName, CertSubject, Identity, Issuer, Role,
};

mod common;

use common::{bounded, ALPN};

#[tokio::test]
async fn an_enrolled_worker_completes_an_mtls_handshake_with_a_coordinator() {
    bounded(async {
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = init_certs(ca_dir.path(), &[], false).unwrap();
        let coordinator = Identity::load(ca_dir.path(), Role::Coordinator).unwrap();

        // The worker side: key and request; the key stays here.
        let name = CertName::Node("w-enrolled".into());
        let (key, csr) = new_key_and_request(Role::Worker, &name).unwrap();
        // The CA side: sign, answer with the certificate and the CA.
        let issuer = Issuer::load(&ca.ca_cert, &ca.ca_key).unwrap();
        let cert = issuer
            .sign_request(
                &csr,
                Role::Worker,
                &name,
                &["10.0.0.9".into()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let info = CertInfo::from_pem(&cert).unwrap();
        assert_eq!(info.subject.role, Role::Worker);
        assert_eq!(info.subject.name, name);
        assert!(info.sans.contains(&"w-enrolled".to_string()));
        assert!(info.sans.contains(&"10.0.0.9".to_string()));
        // The worker side again: install, load.
        let node = tempfile::tempdir().unwrap();
        let dir = node.path().join("certs");
        install_enrolled(&dir, Role::Worker, issuer.ca_pem(), &cert, &key).unwrap();
        let worker = Identity::load(&dir, Role::Worker).unwrap();
        assert_eq!(
            worker.subject(),
            &CertSubject {
                role: Role::Worker,
                name: name.clone()
            }
        );

        // Real handshake: the coordinator requires a cluster certificate from the
        // client, the worker requires a coordinator certificate from the server.
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let sep = server_endpoint(any, server_config(&coordinator, &[ALPN]).unwrap()).unwrap();
        let addr = sep.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let incoming = sep.accept().await.expect("endpoint closed");
            let mut acc = accept(incoming).await.unwrap();
            acc.authenticate_as(Role::Worker).await.unwrap();
            let subject = peer_subject(&acc.conn).unwrap();
            let (mut w, mut r) = acc.accept_stream().await.unwrap();
            let hello: String = r.recv().await.unwrap().unwrap();
            w.send(&format!("welcome {hello}")).await.unwrap();
            acc.conn.closed().await;
            subject
        });
        let cep = client_endpoint(any).unwrap();
        let cfg = client_config(&worker, ALPN, Role::Coordinator).unwrap();
        let dialed = dial(&cep, &cfg, addr, "localhost").await.unwrap();
        let mut s = open_session(dialed, &"w-enrolled".to_string())
            .await
            .unwrap();
        assert_eq!(peer_subject(&s.conn).unwrap().role, Role::Coordinator);
        let reply: String = s.reader.recv().await.unwrap().unwrap();
        assert_eq!(reply, "welcome w-enrolled");
        s.conn.close(0u32.into(), b"done");
        assert_eq!(
            srv.await.unwrap(),
            CertSubject {
                role: Role::Worker,
                name: name.clone()
            }
        );

        // And the enrolled key proves the identity across a relay.
        let proof = worker.prove(b"nonce-1").unwrap();
        assert_eq!(
            coordinator.verify_proof(&proof, b"nonce-1").unwrap().name,
            name
        );
        assert!(coordinator.verify_proof(&proof, b"nonce-2").is_err());
    })
    .await
}
