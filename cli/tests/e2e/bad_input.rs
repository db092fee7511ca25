//! Bad input gets a clear error and loses nothing.

use std::time::Duration;

use serde_json::json;

use crate::harness::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_lose_nothing() {
    let mut c = Cluster::new(&["--max-payload-bytes", "1024", "--queue-limit", "5"]);
    c.start_coordinator();
    c.wait_ready().await;
    let http = reqwest::Client::new();

    // Missing and wrong tokens.
    let r = http
        .get(format!("{}/v1/status", c.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    let r = http
        .get(format!("{}/v1/status", c.api))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Malformed JSON, wrong types, unknown fields.
    let r = http
        .post(format!("{}/v1/tasks", c.api))
        .bearer_auth(&c.token)
        .header("content-type", "application/json")
        .body("{\"agent\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_json", "{v}");
    let (status, v) = c
        .post("/v1/tasks", json!({"agent": "echo", "priorty": 1}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_json")),
        "{v}"
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("priorty"));
    let (status, v) = c.post("/v1/tasks", json!({"agent": ""})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    let (status, _) = c
        .post("/v1/tasks", json!({"agent": "echo", "max_attempts": 0}))
        .await;
    assert_eq!(status, 400);

    // Oversize payload.
    let big = "x".repeat(2000);
    let (status, v) = c
        .post("/v1/tasks", json!({"agent": "echo", "payload": big}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );

    // Unknown task, bad id, unknown state, unknown route.
    let (status, v) = c.get("/v1/tasks/999999").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = c.get("/v1/tasks/abc").await;
    assert_eq!(status, 400);
    let (status, v) = c.get("/v1/tasks?state=sleeping").await;
    assert_eq!(status, 400, "{v}");
    let (status, _) = c.get("/v1/nothing").await;
    assert_eq!(status, 404);

    // Queue limit: no workers, so tasks stay queued; the 6th is refused with 429.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            c.submit(json!({"agent": "echo", "payload": i.to_string()}))
                .await,
        );
    }
    let (_, s) = c.get("/v1/status").await;
    let log_before = s["cluster"]["last_log_index"].clone();
    assert!(log_before.is_u64(), "{s}");
    // Refused before anything is proposed: a payload at the limit costs no log entry.
    let (status, v) = c
        .post(
            "/v1/tasks",
            json!({"agent": "echo", "payload": "x".repeat(1024)}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("queue_full")),
        "{v}"
    );
    let (status, _) = c
        .post("/v1/tasks/batch", json!({"tasks": [{"agent": "echo"}]}))
        .await;
    assert_eq!(status, 429);
    let (_, s) = c.get("/v1/status").await;
    assert_eq!(
        s["queue"]["queued"], 5,
        "refused submits left nothing behind"
    );
    assert_eq!(
        s["cluster"]["last_log_index"], log_before,
        "refused submits took no Raft entry"
    );

    // Garbage on the QUIC port: the coordinator shrugs it off.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in 0..200u32 {
        let junk: Vec<u8> = (0..(1 + n % 1400)).map(|i| (i * 31 + n) as u8).collect();
        sock.send_to(&junk, ("127.0.0.1", c.quic_port)).unwrap();
    }
    // A garbage TCP request on the API port too.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", c.api_port)).unwrap();
        let _ = s.write_all(b"\x16\x03\x01garbage\r\n\r\n");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.assert_coordinator_alive();

    // Unknown agent: a clear failure, not a crash; queued tasks all complete.
    c.start_worker("w1", 2, None);
    c.wait_workers(&["w1"]).await;
    for id in &ids {
        assert_eq!(c.wait_final(*id).await["state"], "succeeded");
    }
    let id = c.submit(json!({"agent": "nope"})).await;
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "failed");
    let err = t["error"].as_str().unwrap();
    assert!(
        err.starts_with("unknown_agent") && err.contains("echo"),
        "lists known agents: {err}"
    );
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1, "not retried");
}

/// Dial the coordinator's QUIC port with a real certificate of `role`.
async fn dial(c: &Cluster, role: swarm_transport::Role) -> swarm_transport::Dialed {
    let id = swarm_transport::Identity::load(&c.certs, role).unwrap();
    let cfg = swarm_transport::client_config(
        &id,
        swarm_proto::ALPN_WORKER,
        swarm_transport::Role::Coordinator,
    )
    .unwrap();
    let ep = swarm_transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = format!("127.0.0.1:{}", c.quic_port).parse().unwrap();
    swarm_transport::dial(&ep, &cfg, addr, "localhost")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_wrong_peers_are_refused_without_harm() {
    use swarm_proto::worker::{CoordinatorMsg, Hello, WorkerMsg};
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let hello = |protocol| {
        WorkerMsg::Hello(Hello {
            protocol,
            worker_id: "probe".into(),
            slots: 1,
            labels: Default::default(),
            agents: vec![],
            running: vec![],
            peer_addr: None,
        })
    };

    // An authenticated worker that sends garbage instead of a frame: its connection is
    // closed with an error.
    let mut d = dial(&c, swarm_transport::Role::Worker).await;
    d.handshake().await.unwrap();
    let (mut send, _recv) = d.conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let reason = tokio::time::timeout(crate::harness::WAIT, d.conn.closed())
        .await
        .expect("closed");
    assert!(reason.to_string().contains("malformed"), "{reason}");

    // An oversize length prefix: refused the same way, nothing allocated.
    let mut d = dial(&c, swarm_transport::Role::Worker).await;
    d.handshake().await.unwrap();
    let (mut send, _recv) = d.conn.open_bi().await.unwrap();
    send.write_all(&[0x7f, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    let reason = tokio::time::timeout(crate::harness::WAIT, d.conn.closed())
        .await
        .expect("closed");
    assert!(reason.to_string().contains("malformed"), "{reason}");

    // A worker speaking another protocol version gets a clear rejection.
    let d = dial(&c, swarm_transport::Role::Worker).await;
    let mut s = swarm_transport::open_session(d, &hello(99)).await.unwrap();
    match s.reader.recv::<CoordinatorMsg>().await.unwrap() {
        Some(CoordinatorMsg::Rejected { code, message }) => {
            assert_eq!(code, "protocol_version");
            assert!(
                message.contains("99")
                    && message.contains(&swarm_proto::PROTOCOL_VERSION.to_string()),
                "{message}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }

    // A coordinator certificate may not pose as a worker.
    let d = dial(&c, swarm_transport::Role::Coordinator).await;
    let conn = d.conn.clone();
    let _ = swarm_transport::open_session(d, &hello(swarm_proto::PROTOCOL_VERSION)).await;
    let reason = tokio::time::timeout(crate::harness::WAIT, conn.closed())
        .await
        .expect("closed");
    assert!(reason.to_string().contains("role"), "{reason}");

    // None of it hurt: a real worker connects and work flows.
    c.assert_coordinator_alive();
    c.start_worker("w1", 1, None);
    c.wait_workers(&["w1"]).await;
    let id = c
        .submit(serde_json::json!({"agent": "echo", "payload": "still fine"}))
        .await;
    assert_eq!(c.wait_final(id).await["output"], "still fine");
}
