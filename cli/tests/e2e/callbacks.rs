//! Task callbacks against a real coordinator and worker, received by a local HTTP/1.1
//! server: each delivery is signed (checked here with ring, independently of the
//! coordinator's code), a 503 is retried and the attempt counted, a 400 gives up at
//! once, a cancelled task notifies too, and a delivery still due when the coordinator is
//! SIGKILLed is made after its restart (the outbox is replicated state).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::harness::Cluster;

const SECRET: &str = "callback-secret-for-the-e2e-test";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A local HTTP/1.1 receiver. Each path answers the statuses queued for it in turn,
/// then its last one for ever; every request is recorded.
#[derive(Clone)]
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(plan: &[(&str, &[u16])]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let plan: Arc<Mutex<BTreeMap<String, Vec<u16>>>> = Arc::new(Mutex::new(
            plan.iter()
                .map(|(p, s)| (p.to_string(), s.to_vec()))
                .collect(),
        ));
        let g = got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (g, plan) = (g.clone(), plan.clone());
                tokio::spawn(async move {
                    let mut r = BufReader::new(sock);
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut headers = BTreeMap::new();
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).await.unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                    let len: usize = headers
                        .get("content-length")
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).await.unwrap();
                    let status = {
                        let mut plan = plan.lock().unwrap();
                        let q = plan.entry(path.clone()).or_insert_with(|| vec![200]);
                        if q.len() > 1 {
                            q.remove(0)
                        } else {
                            q[0]
                        }
                    };
                    g.lock().unwrap().push(Received {
                        path,
                        headers,
                        body,
                    });
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope"
                    );
                    let _ = r.get_mut().write_all(answer.as_bytes()).await;
                    let _ = r.get_mut().shutdown().await;
                });
            }
        });
        Receiver { port, got }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests_to(&self, path: &str) -> Vec<Received> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Wait (up to a minute) until `path` got `n` requests; returns them.
    async fn wait_for(&self, path: &str, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.requests_to(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{path} got {} requests, not {n}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Check a request's `Swarm-Signature` with ring's HMAC-SHA256 verify, and return its
/// body as JSON.
fn verified(r: &Received, task: u64, attempt: u32) -> Value {
    let sig = r.headers.get("swarm-signature").expect("signed");
    let (t, v1) = sig.split_once(',').expect("t=…,v1=…");
    let t = t.strip_prefix("t=").expect("t=");
    let hex = v1.strip_prefix("v1=").expect("v1=");
    assert_eq!(hex.len(), 64, "{sig}");
    let tag: Vec<u8> = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&r.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    ring::hmac::verify(&key, &signed, &tag).expect("the signature verifies");
    let wrong = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another secret");
    assert!(ring::hmac::verify(&wrong, &signed, &tag).is_err());
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["swarm-task-id"], task.to_string());
    assert_eq!(r.headers["swarm-delivery-attempt"], attempt.to_string());
    let body: Value = serde_json::from_slice(&r.body).expect("JSON body");
    assert_eq!(body["event"], "task.finished", "{body}");
    assert_eq!(body["task"]["id"], task, "{body}");
    body
}

/// [`callback_ended`], checked to have ended as (state, attempts, last status).
async fn ended_as(c: &Cluster, id: u64, (state, attempts, status): (&str, u32, u16)) -> Value {
    let cb = callback_ended(c, id).await;
    assert_eq!(
        (&cb["state"], &cb["attempts"], &cb["status"]),
        (&json!(state), &json!(attempts), &json!(status)),
        "{cb}"
    );
    cb
}

/// Poll task `id` until its callback is no longer pending (a minute at most).
async fn callback_ended(c: &Cluster, id: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = c.get(&format!("/v1/tasks/{id}")).await;
        if status == 200 && v["callback"]["state"] != "pending" {
            assert!(!v["callback"].is_null(), "{v}");
            return v["callback"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "task {id}'s callback never ended: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_signed_retried_given_up_and_survive_a_restart() {
    let receiver = Receiver::start(&[
        ("/ok", &[200]),
        ("/flaky", &[503, 204]),
        ("/refuses", &[400]),
        ("/after-restart", &[503, 503, 503, 503, 200]),
    ])
    .await;
    let mut c = Cluster::new(&[]);
    let secret = c.dir.path().join("callback-secret");
    std::fs::write(&secret, SECRET).unwrap();
    c.coordinator_args.extend([
        "--callback-secret-file".to_string(),
        secret.display().to_string(),
        "--callback-allow=127.0.0.1,*.example.test".to_string(),
    ]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 4, None);
    c.wait_workers(&["w1"]).await;

    // Delivered at once: signed, the body is the task's view.
    let (code, out, err) = c.cli(&[
        "submit",
        "--agent",
        "echo",
        "--payload",
        "\"hello\"",
        "--callback-url",
        &receiver.url("/ok"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let ok: u64 = out.trim().parse().unwrap();
    let got = receiver.wait_for("/ok", 1).await;
    let body = verified(&got[0], ok, 1);
    assert_eq!(body["task"]["state"], "succeeded", "{body}");
    assert_eq!(body["task"]["output"], "hello", "{body}");
    let cb = ended_as(&c, ok, ("delivered", 1, 200)).await;
    assert_eq!(cb["url"], receiver.url("/ok"));

    // A 503, then 204: retried after the backoff, delivered on attempt 2.
    let flaky = c
        .submit(json!({"agent": "echo", "payload": "x", "callback_url": receiver.url("/flaky")}))
        .await;
    ended_as(&c, flaky, ("delivered", 2, 204)).await;
    let got = receiver.requests_to("/flaky");
    assert_eq!(got.len(), 2);
    verified(&got[0], flaky, 1);
    verified(&got[1], flaky, 2);

    // A 400 will not get better: given up after one attempt, the answer recorded.
    let refused = c
        .submit(json!({"agent": "echo", "payload": "x", "callback_url": receiver.url("/refuses")}))
        .await;
    let cb = ended_as(&c, refused, ("failed", 1, 400)).await;
    assert!(cb["error"].as_str().unwrap().contains("nope"), "{cb}");
    assert_eq!(receiver.requests_to("/refuses").len(), 1);

    // A task cancelled before it ran notifies too.
    let cancelled = c
        .submit(json!({
            "agent": "echo", "payload": "x", "requires_approval": true,
            "callback_url": receiver.url("/ok"),
        }))
        .await;
    let (code, out, err) = c.cli(&["task", "cancel", &cancelled.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let cb = callback_ended(&c, cancelled).await;
    assert_eq!(cb["state"], "delivered", "{cb}");
    let last = receiver.requests_to("/ok").pop().unwrap();
    assert_eq!(verified(&last, cancelled, 1)["task"]["state"], "cancelled");

    // Bad URLs are refused at submit, with nothing created.
    for bad in [
        "ftp://127.0.0.1/x",
        "not a url",
        "http://user:pw@127.0.0.1/x",
        &format!("http://127.0.0.1/{}", "a".repeat(2100)),
    ] {
        let (status, v) = c
            .post("/v1/tasks", json!({"agent": "echo", "callback_url": bad}))
            .await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("callback_url"),
            "{v}"
        );
    }
    // Hosts outside --callback-allow (a cloud's metadata address, say) are refused.
    for host in ["169.254.169.254", "localhost", "example.test"] {
        let (status, v) = c
            .post(
                "/v1/tasks",
                json!({"agent": "echo", "callback_url": format!("http://{host}/x")}),
            )
            .await;
        assert_eq!(status, 400, "{host}: {v}");
        assert_eq!(v["error"]["code"], "callback_not_allowed", "{v}");
    }
    let (status, v) = c
        .post(
            "/v1/tasks",
            json!({"agent": "echo", "callback_url": "https://hooks.example.test/x", "requires_approval": true}),
        )
        .await;
    assert!(
        status == 201 || status == 200,
        "an allowed suffix: {status} {v}"
    );

    // Due when the coordinator is SIGKILLed (after two refused attempts): delivered
    // after the restart, the attempts counted across it.
    let kept = c
        .submit(json!({"agent": "echo", "payload": "x", "callback_url": receiver.url("/after-restart")}))
        .await;
    receiver.wait_for("/after-restart", 2).await;
    c.kill_coordinator();
    c.start_coordinator();
    c.wait_ready().await;
    let cb = callback_ended(&c, kept).await;
    assert_eq!(cb["state"], "delivered", "{cb}");
    let got = receiver.requests_to("/after-restart");
    // Attempts are numbered across the restart: an attempt whose answer was not
    // recorded before the kill is made again under its number (at least once).
    let numbers: Vec<u32> = got
        .iter()
        .map(|r| r.headers["swarm-delivery-attempt"].parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1),
        "{numbers:?}"
    );
    assert_eq!(cb["attempts"], *numbers.last().unwrap(), "{cb} {numbers:?}");
    assert_eq!(numbers.len(), 5, "four 503s, then the 200: {numbers:?}");
    assert!(*numbers.last().unwrap() >= 4, "{numbers:?}");
    for r in &got {
        let n: u32 = r.headers["swarm-delivery-attempt"].parse().unwrap();
        verified(r, kept, n);
    }
    c.assert_coordinator_alive();
}

/// 5,000 tasks with callbacks, submitted in five batches: every one is delivered once,
/// signed, and the rate (printed, not asserted) is bounded by the receiver and the
/// commits, not by the delivery loop's period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_callbacks_are_each_delivered() {
    const N: usize = 5_000;
    let receiver = Receiver::start(&[]).await;
    let mut c = Cluster::new(&[]);
    let secret = c.dir.path().join("callback-secret");
    std::fs::write(&secret, SECRET).unwrap();
    c.coordinator_args.extend([
        "--callback-secret-file".to_string(),
        secret.display().to_string(),
    ]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 64, None);
    c.wait_workers(&["w1"]).await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for b in 0..5 {
        let tasks: Vec<Value> = (0..N / 5)
            .map(|i| {
                json!({"agent": "echo", "payload": format!("{b}-{i}"),
                       "callback_url": receiver.url("/many")})
            })
            .collect();
        let (status, v) = c.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
        assert!(status == 200 || status == 201, "{status} {v}");
        ids.extend(
            v["tasks"]
                .as_array()
                .unwrap_or_else(|| panic!("{v}"))
                .iter()
                .map(|t| t["id"].as_u64().unwrap()),
        );
    }
    assert_eq!(ids.len(), N);
    let deadline = Instant::now() + Duration::from_secs(300);
    while receiver.requests_to("/many").len() < N {
        assert!(
            Instant::now() < deadline,
            "{} of {N} delivered",
            receiver.requests_to("/many").len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    let got = receiver.requests_to("/many");
    let mut seen = std::collections::BTreeSet::new();
    for r in &got {
        let id: u64 = r.headers["swarm-task-id"].parse().unwrap();
        let body = verified(r, id, 1);
        assert_eq!(body["task"]["state"], "succeeded", "{body}");
        assert!(seen.insert(id), "task {id} delivered twice");
    }
    assert_eq!(seen, ids.iter().copied().collect());
    eprintln!(
        "{N} tasks run and their callbacks delivered in {:.1} s ({:.0}/s, debug build)",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64()
    );
    // The outbox empties: the last delivery's outcome commits.
    let last = *ids.last().unwrap();
    assert_eq!(callback_ended(&c, last).await["state"], "delivered");
    c.assert_coordinator_alive();
}
