//! The cluster's event stream (`GET /v1/events`) end to end: status views and task
//! changes as they happen, resume by id, `reset` for an id it cannot resume from, and
//! `swarm status --watch` drawing from it.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{json, Value};

use crate::harness::{bin, Cluster};

/// Reads SSE events from a response, one at a time.
struct Events {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Events {
    async fn open(c: &Cluster, last: Option<&str>) -> Events {
        let mut req = reqwest::Client::new()
            .get(format!("{}/v1/events", c.api))
            .bearer_auth(&c.token);
        if let Some(l) = last {
            req = req.header("Last-Event-ID", l);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        Events {
            body: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event: (name, id, data).
    async fn next(&mut self) -> (String, String, Value) {
        loop {
            if let Some(at) = self.buf.find("\n\n") {
                let ev: String = self.buf.drain(..at + 2).collect();
                if ev.lines().all(|l| l.starts_with(':')) {
                    continue;
                }
                let field = |f: &str| {
                    ev.lines()
                        .find_map(|l| l.strip_prefix(f))
                        .unwrap_or("")
                        .to_string()
                };
                return (
                    field("event: "),
                    field("id: "),
                    serde_json::from_str(&field("data: ")).unwrap(),
                );
            }
            let piece = tokio::time::timeout(Duration::from_secs(30), self.body.next())
                .await
                .expect("no event within 30 s")
                .expect("the stream ended")
                .unwrap();
            self.buf.push_str(&String::from_utf8_lossy(&piece));
        }
    }

    /// Events until `pred` holds for one; returns it and the id of the last event.
    async fn until(&mut self, what: &str, pred: impl Fn(&str, &Value) -> bool) -> (Value, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (name, id, data) = tokio::time::timeout_at(deadline, self.next())
                .await
                .unwrap_or_else(|_| panic!("no event: {what}"));
            if pred(&name, &data) {
                return (data, id);
            }
        }
    }
}

fn task_in(data: &Value, id: u64, state: &str) -> bool {
    data["tasks"]
        .as_array()
        .is_some_and(|ts| ts.iter().any(|t| t["id"] == id && t["state"] == state))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_stream_shows_status_and_task_changes_and_resumes() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 2, None);
    c.wait_workers(&["w1"]).await;

    let mut ev = Events::open(&c, None).await;
    let (status, _) = ev
        .until("a status listing w1", |n, d| {
            n == "status" && d["workers"].as_array().is_some_and(|w| w.len() == 1)
        })
        .await;
    assert_eq!(status["workers"][0]["id"], "w1");

    let id = c.submit(json!({"agent": "echo", "payload": "hi"})).await;
    let (change, last) = ev
        .until("the task succeeded", |n, d| {
            n == "tasks" && task_in(d, id, "succeeded")
        })
        .await;
    let t = change["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap()
        .clone();
    assert_eq!(t["agent"], "echo");
    assert_eq!(t["worker"], "w1");
    // The queue counts follow.
    ev.until("a status counting it", |n, d| {
        n == "status" && d["queue"]["succeeded"].as_u64() >= Some(1)
    })
    .await;
    drop(ev);

    // Resumed from the last id: what happened meanwhile, and no reset.
    let second = c.submit(json!({"agent": "echo", "payload": "again"})).await;
    c.wait_final(second).await;
    let mut ev = Events::open(&c, Some(&last)).await;
    let (data, _) = ev
        .until("what happened meanwhile", |n, _| n != "status")
        .await;
    assert!(
        data["tasks"]
            .as_array()
            .is_some_and(|ts| ts.iter().any(|t| t["id"] == second)),
        "{data}"
    );
    // An id it cannot resume from: reset.
    let mut ev = Events::open(&c, Some("0-99999999")).await;
    ev.until("reset", |n, _| n == "reset").await;

    // A killed worker leaves the status.
    let mut ev = Events::open(&c, None).await;
    c.kill_worker("w1");
    let killed = Instant::now();
    ev.until("a status without workers", |n, d| {
        n == "status" && d["workers"].as_array().is_some_and(|w| w.is_empty())
    })
    .await;
    eprintln!(
        "a SIGKILLed worker left the event stream's status after {:?}",
        killed.elapsed()
    );

    // `whoami` says what the token may do.
    let (st, me) = c.get("/v1/whoami").await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["scope"], "admin");
}

/// `swarm status --watch` draws from the event stream: its screen follows a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_redraws_when_the_cluster_changes() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let mut watch = Command::new(bin())
        .args(["status", "--watch", "--api", &c.api, "--token", &c.token])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = watch.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&all).contains("w-late") {
                break;
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_worker("w-late", 1, None);
    c.wait_workers(&["w-late"]).await;
    let text = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || reader.join().unwrap()),
    )
    .await
    .expect("the watch never showed the new worker")
    .unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(text.contains("queue"), "{text}");
    assert!(text.contains("w-late"), "{text}");
}
