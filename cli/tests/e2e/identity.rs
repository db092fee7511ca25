//! Identities: a worker is the one its certificate names, reports only what it holds,
//! and a lead cannot relay a member it cannot prove.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use swarm_proto::worker::{
    relay_proof_context, AttemptRef, CoordinatorMsg, Hello, IdentityProof, Outcome, TaskReport,
    WorkerMsg,
};
use swarm_transport::{CertName, FrameReader, FrameWriter, Identity, Role};

use crate::harness::{Cluster, WAIT};

/// Issues a certificate for worker `name` into its own directory under the cluster's.
fn issue(c: &Cluster, name: &str) -> PathBuf {
    let dir = c.dir.path().join(format!("certs-{name}"));
    swarm_transport::issue_cert(
        &c.certs,
        &dir,
        Role::Worker,
        &CertName::parse(name).unwrap(),
        &[],
        swarm_transport::pki::DEFAULT_VALIDITY,
        false,
    )
    .unwrap();
    dir
}

/// A raw worker connection with `certs`' identity: the session after `Welcome`.
async fn raw_worker(
    c: &Cluster,
    certs: &std::path::Path,
    id: &str,
) -> (quinn::Connection, FrameWriter, FrameReader, Identity) {
    let identity = Identity::load(certs, Role::Worker).unwrap();
    let cfg =
        swarm_transport::client_config(&identity, swarm_proto::ALPN_WORKER, Role::Coordinator)
            .unwrap();
    let ep = swarm_transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = format!("127.0.0.1:{}", c.quic_port).parse().unwrap();
    let d = swarm_transport::dial(&ep, &cfg, addr, "localhost")
        .await
        .unwrap();
    let mut s = swarm_transport::open_session(d, &hello(id)).await.unwrap();
    match next(&mut s.reader).await {
        CoordinatorMsg::Welcome { .. } => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    // The endpoint must outlive the connection.
    std::mem::forget(ep);
    (s.conn, s.writer, s.reader, identity)
}

fn hello(id: &str) -> WorkerMsg {
    WorkerMsg::Hello(Hello {
        protocol: swarm_proto::PROTOCOL_VERSION,
        worker_id: id.into(),
        slots: 1,
        labels: Default::default(),
        agents: vec![],
        running: vec![],
        peer_addr: None,
    })
}

/// The next frame that is not a heartbeat-driven `Peers`/`Parent`.
async fn next(reader: &mut FrameReader) -> CoordinatorMsg {
    loop {
        let m = tokio::time::timeout(WAIT, reader.recv::<CoordinatorMsg>())
            .await
            .expect("a frame in time")
            .unwrap()
            .expect("the session is open");
        if !matches!(
            m,
            CoordinatorMsg::Peers { .. }
                | CoordinatorMsg::Parent { .. }
                | CoordinatorMsg::Revoked { .. }
        ) {
            return m;
        }
    }
}

async fn worker_list(c: &Cluster) -> serde_json::Value {
    let (status, v) = c.get("/v1/workers").await;
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_the_one_its_certificate_names_and_reports_only_what_it_holds() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let (w1, w2, w3) = (issue(&c, "w1"), issue(&c, "w2"), issue(&c, "w3"));

    c.start_worker_as("w1", "w1", 1, None, &w1, &[]);
    c.wait_workers(&["w1"]).await;
    let since = worker_list(&c).await["workers"][0]["connected_at_ms"].clone();

    // w2's certificate claiming w1's id: `swarm worker` refuses to start, and the
    // coordinator refuses such a session anyway.
    let out = std::process::Command::new(crate::harness::bin())
        .args([
            "worker",
            "--coordinator",
            &format!("127.0.0.1:{}", c.quic_port),
        ])
        .arg("--certs")
        .arg(&w2)
        .args(["--id", "w1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate names (w2)"), "{err}");
    {
        let identity = Identity::load(&w2, Role::Worker).unwrap();
        let cfg =
            swarm_transport::client_config(&identity, swarm_proto::ALPN_WORKER, Role::Coordinator)
                .unwrap();
        let ep = swarm_transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = format!("127.0.0.1:{}", c.quic_port).parse().unwrap();
        let d = swarm_transport::dial(&ep, &cfg, addr, "localhost")
            .await
            .unwrap();
        let mut s = swarm_transport::open_session(d, &hello("w1"))
            .await
            .unwrap();
        match next(&mut s.reader).await {
            CoordinatorMsg::Rejected { code, message } => {
                assert_eq!(code, "identity");
                assert!(message.contains("w2"), "names the certificate: {message}");
            }
            other => panic!("an impostor was welcomed: {other:?}"),
        }
    }
    // A pool certificate (any id) cannot take the place of a worker its certificate names.
    let pool = c.certs.clone();
    c.start_worker_as("pool", "w1", 1, None, &pool, &[]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let b = c.log_of("pool");
        if b.contains("identity") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool worker was not refused:\n{b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = worker_list(&c).await;
    assert_eq!(v["workers"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        v["workers"][0]["connected_at_ms"], since,
        "w1 was not evicted"
    );
    c.kill_worker("pool");

    // w1 runs a task; w2, connected honestly, reports it as its own: refused, and the
    // task's result is w1's.
    let id = c.submit(json!({"agent": "sleep", "payload": "1500"})).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, t) = c.get(&format!("/v1/tasks/{id}")).await;
        if t["state"] == "running" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not running: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (conn, mut writer, mut reader, _w2) = raw_worker(&c, &w2, "w2").await;
    let attempt = AttemptRef {
        task_id: id,
        attempt: 1,
    };
    writer
        .send(&WorkerMsg::Finished(TaskReport {
            attempt,
            outcome: Outcome::Succeeded {
                output: b"forged".to_vec(),
            },
            started_at_ms: 1,
            finished_at_ms: 2,
            patterns_used: vec![],
            log: Default::default(),
            usage: None,
        }))
        .await
        .unwrap();
    assert_eq!(next(&mut reader).await, CoordinatorMsg::Cancel(attempt));
    assert_eq!(next(&mut reader).await, CoordinatorMsg::Ack(attempt));
    // A report for an attempt nobody was given is refused the same way.
    let ghost = AttemptRef {
        task_id: id,
        attempt: 7,
    };
    writer
        .send(&WorkerMsg::Finished(TaskReport {
            attempt: ghost,
            outcome: Outcome::Succeeded {
                output: b"forged".to_vec(),
            },
            started_at_ms: 1,
            finished_at_ms: 2,
            patterns_used: vec![],
            log: Default::default(),
            usage: None,
        }))
        .await
        .unwrap();
    assert_eq!(next(&mut reader).await, CoordinatorMsg::Cancel(ghost));
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["output"], "slept 1500 ms", "{t}");
    assert_eq!(t["attempts"][0]["worker"], "w1", "{t}");

    // Relayed sessions on w2's connection: claiming w1 with w2's proof is refused, and
    // so is w3 proving itself, as no plan makes w2 its lead.
    let relayed = |conn: quinn::Connection, id: &'static str, prover: Identity| async move {
        let (send, recv) = conn.open_bi().await.unwrap();
        let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
        w.send(&hello(id)).await.unwrap();
        let nonce = match next(&mut r).await {
            CoordinatorMsg::Prove { nonce } => nonce,
            other => panic!("expected Prove, got {other:?}"),
        };
        let proof = prover
            .prove(&relay_proof_context(&nonce, "w2", id))
            .unwrap();
        w.send(&WorkerMsg::Proof(IdentityProof {
            chain: proof.chain,
            scheme: proof.scheme,
            signature: proof.signature,
        }))
        .await
        .unwrap();
        let answer = next(&mut r).await;
        (answer, w, r)
    };
    let w2_id = Identity::load(&w2, Role::Worker).unwrap();
    let (answer, _, _) = relayed(conn.clone(), "w1", w2_id.clone()).await;
    match answer {
        CoordinatorMsg::Rejected { code, message } => {
            assert_eq!(code, "identity");
            assert!(
                message.contains("w1") && message.contains("w2"),
                "{message}"
            );
        }
        other => panic!("a forged member was not refused: {other:?}"),
    }
    // A proof signed for another lead (a replay through another relay) is refused too.
    let (send, recv) = conn.open_bi().await.unwrap();
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    w.send(&hello("w3")).await.unwrap();
    let CoordinatorMsg::Prove { nonce } = next(&mut r).await else {
        panic!("expected Prove")
    };
    let w3_id = Identity::load(&w3, Role::Worker).unwrap();
    let proof = w3_id
        .prove(&relay_proof_context(&nonce, "some-other-lead", "w3"))
        .unwrap();
    w.send(&WorkerMsg::Proof(IdentityProof {
        chain: proof.chain,
        scheme: proof.scheme,
        signature: proof.signature,
    }))
    .await
    .unwrap();
    assert!(
        matches!(next(&mut r).await, CoordinatorMsg::Rejected { ref code, .. } if code == "identity")
    );
    // Proven, but no hierarchy routes w3 through w2: a lead relays only the members the
    // plan gives it (the relayed sessions of real leads are in the topology tests).
    let (answer, _w3_writer, _w3_reader) = relayed(conn.clone(), "w3", w3_id).await;
    match answer {
        CoordinatorMsg::Rejected { code, message } => {
            assert_eq!(code, "not_assigned");
            assert!(
                message.contains("w3") && message.contains("w2"),
                "{message}"
            );
        }
        other => panic!("a member relayed by a lead it was not given was let in: {other:?}"),
    }
    let v = worker_list(&c).await;
    assert!(
        !v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["id"] == "w3"),
        "{v}"
    );
    c.assert_coordinator_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_https_is_verified_end_to_end_by_the_cli() {
    let mut c = Cluster::new(&["--api-tls", "on"]);
    c.start_coordinator();
    let https = format!("https://127.0.0.1:{}", c.api_port);
    let ca = c.certs.join("ca.pem");
    let token = c.token.clone();
    let swarm = |args: &[&str], ca: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(crate::harness::bin());
        cmd.args(args)
            .env("SWARM_API", &https)
            .env("SWARM_PROBE_API", &https)
            .env("SWARM_TOKEN", &token)
            .env_remove("SWARM_CA");
        if let Some(ca) = ca {
            cmd.env("SWARM_CA", ca);
        }
        cmd.output().expect("run swarm")
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !swarm(&["probe", "ready"], Some(&ca)).status.success() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready over https"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.start_worker("w1", 1, None);
    let out = swarm(
        &[
            "submit",
            "--agent",
            "echo",
            "--payload",
            "over tls",
            "--wait",
        ],
        Some(&ca),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over tls");
    let out = swarm(&["status"], Some(&ca));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node 1 is leader"));

    // No CA: a clear error, not a silent fallback to trusting anything.
    let out = swarm(&["status"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca"), "{err}");
    // Another cluster's CA: the server is not trusted.
    let other = tempfile::tempdir().unwrap();
    swarm_transport::init_certs(other.path(), &[], false).unwrap();
    let out = swarm(&["status"], Some(&other.path().join("ca.pem")));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("tls") || err.contains("ssl"),
        "{err}"
    );
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/health", c.api_port))
        .timeout(Duration::from_secs(20))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    c.assert_coordinator_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_put_behind_the_token() {
    let mut c = Cluster::new(&["--metrics-auth"]);
    c.start_coordinator();
    c.wait_ready().await;
    let http = reqwest::Client::new();
    let url = format!("{}/metrics", c.api);
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(&url).bearer_auth(&c.token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("swarm_"));
    // Health and readiness stay open to orchestrators.
    let r = http.get(format!("{}/health", c.api)).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
