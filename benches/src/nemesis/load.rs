//! The client side: an HTTP API client that can address each coordinator, and the
//! submitters that keep a steady load on the cluster while the faults happen, recording
//! the outcome of every submit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::cluster::AGENT;
use super::now_ms;

/// Most tasks submitted and not yet finished before the submitters pause.
pub const MAX_UNFINISHED: u64 = 200;
/// How long one submit request may take before it is given up (and retried).
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(6);
/// Attempts per task: high, so that faults do not exhaust them.
pub const MAX_ATTEMPTS: u32 = 10;
/// Per-attempt timeout of every task (the agent sleeps at most 300 ms).
pub const TASK_TIMEOUT_MS: u64 = 5_000;

/// The coordinators' HTTP APIs.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    pub urls: Vec<String>,
    token: String,
}

impl Api {
    pub fn new(urls: Vec<String>, token: String) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()?,
            urls,
            token,
        })
    }

    /// One request to node `node` (index into `urls`): its status and JSON body, or why
    /// there is none (connection error, timeout, unreadable body).
    pub async fn call(
        &self,
        node: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Value), String> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.urls[node]))
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| describe(&e))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| describe(&e))?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Submits a task (`POST /v1/tasks`) at node `node`.
    pub async fn submit(&self, node: usize, body: &Value) -> Result<(u16, Value), String> {
        self.call(
            node,
            reqwest::Method::POST,
            "/v1/tasks",
            Some(body),
            SUBMIT_TIMEOUT,
        )
        .await
    }

    pub async fn get(
        &self,
        node: usize,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, Value), String> {
        self.call(node, reqwest::Method::GET, path, None, timeout)
            .await
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection refused or failed".into()
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        s
    }
}

/// How a submit ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Acknowledged with this task id, by this node.
    Acked {
        id: u64,
        node: usize,
        duplicate: bool,
    },
    /// Refused for good (a 4xx other than 429).
    Refused { status: u16, body: String },
    /// Never acknowledged before the run ended.
    Unknown,
}

/// One submitted idempotency key and everything that happened to it.
#[derive(Debug, Clone)]
pub struct SubmitRecord {
    pub key: String,
    pub payload: String,
    pub client: usize,
    /// Unix ms of the first request.
    pub first_sent_ms: u64,
    /// Unix ms of the acknowledgement or refusal, or of giving up.
    pub decided_ms: u64,
    pub tries: u32,
    pub outcome: Outcome,
    /// The last few errors met on the way (timeouts, 5xx, connection errors).
    pub errors: Vec<String>,
    /// Later submits of the same key (the idempotency probe): `(node, id)` acknowledged.
    pub repeat_acks: Vec<(usize, u64)>,
}

impl SubmitRecord {
    pub fn acked_id(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Acked { id, .. } => Some(id),
            _ => None,
        }
    }

    pub fn to_json(&self) -> Value {
        let outcome = match &self.outcome {
            Outcome::Acked {
                id,
                node,
                duplicate,
            } => json!({"acked": id, "via_node": node + 1, "duplicate": duplicate}),
            Outcome::Refused { status, body } => json!({"refused": status, "body": body}),
            Outcome::Unknown => json!("unknown"),
        };
        json!({
            "key": self.key,
            "client": self.client,
            "first_sent_ms": self.first_sent_ms,
            "decided_ms": self.decided_ms,
            "tries": self.tries,
            "outcome": outcome,
            "errors": self.errors,
            "repeat_acks": self.repeat_acks.iter().map(|(n, id)| json!({"via_node": n + 1, "id": id})).collect::<Vec<_>>(),
        })
    }
}

/// The state the submitters share with the rest of the run.
#[derive(Default)]
pub struct Load {
    pub records: Mutex<Vec<SubmitRecord>>,
    /// No new keys once set.
    stop_new: AtomicBool,
    /// Keys being retried are given up (outcome unknown) once set.
    give_up: AtomicBool,
    /// Queued plus running tasks at the last poll of `/v1/status`...
    unfinished_at_poll: AtomicU64,
    /// ...plus the submits acknowledged since.
    acked_since_poll: AtomicU64,
}

impl Load {
    pub fn stop_new(&self) {
        self.stop_new.store(true, Ordering::SeqCst);
    }

    pub fn give_up(&self) {
        self.give_up.store(true, Ordering::SeqCst);
    }

    fn unfinished(&self) -> u64 {
        self.unfinished_at_poll.load(Ordering::Relaxed)
            + self.acked_since_poll.load(Ordering::Relaxed)
    }

    pub fn records(&self) -> Vec<SubmitRecord> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Polls `/v1/status` of a random node every 500 ms for the number of unfinished tasks,
/// until the submitters stop.
pub async fn watch_queue(api: Api, load: Arc<Load>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5157_4154);
    while !load.give_up.load(Ordering::SeqCst) {
        let node = rng.gen_range(0..api.urls.len());
        if let Ok((200, v)) = api.get(node, "/v1/status", Duration::from_secs(2)).await {
            let q = &v["queue"];
            if let (Some(queued), Some(running)) = (q["queued"].as_u64(), q["running"].as_u64()) {
                load.unfinished_at_poll
                    .store(queued + running, Ordering::Relaxed);
                load.acked_since_poll.store(0, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Submitter `client`: submits tasks with unique keys and payloads to random
/// coordinators until told to stop, retrying each key (at any node) on a timeout, a 5xx,
/// a 429 or a connection error until it is acknowledged or the run gives up.
pub async fn submitter(api: Api, load: Arc<Load>, client: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(
        seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(client as u64 + 1)),
    );
    let mut n = 0u64;
    while !load.stop_new.load(Ordering::SeqCst) {
        if load.unfinished() > MAX_UNFINISHED {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        n += 1;
        let ms = rng.gen_range(0..=300u32);
        let payload = format!("nem-{seed:x}-c{client}-{n}-{:08x}-ms{ms}", rng.gen::<u32>());
        let key = format!("key-{seed:x}-c{client}-{n}");
        let body = json!({
            "agent": AGENT,
            "payload": payload,
            "idempotency_key": key,
            "max_attempts": MAX_ATTEMPTS,
            "timeout_ms": TASK_TIMEOUT_MS,
        });
        let mut rec = SubmitRecord {
            key,
            payload,
            client,
            first_sent_ms: now_ms(),
            decided_ms: 0,
            tries: 0,
            outcome: Outcome::Unknown,
            errors: Vec::new(),
            repeat_acks: Vec::new(),
        };
        submit_until_decided(&api, &load, &body, &mut rec, &mut rng).await;
        if matches!(rec.outcome, Outcome::Acked { .. }) {
            load.acked_since_poll.fetch_add(1, Ordering::Relaxed);
            // The idempotency probe: the same submit again, through another node.
            if rng.gen_bool(0.05) {
                repeat_submit(&api, &body, &mut rec, &mut rng).await;
            }
        }
        load.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(rec);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..30))).await;
    }
}

fn note_error(rec: &mut SubmitRecord, node: usize, what: String) {
    if rec.errors.len() >= 8 {
        rec.errors.remove(0);
    }
    rec.errors
        .push(format!("{} node-{}: {what}", now_ms(), node + 1));
}

async fn submit_until_decided(
    api: &Api,
    load: &Load,
    body: &Value,
    rec: &mut SubmitRecord,
    rng: &mut StdRng,
) {
    let mut node = rng.gen_range(0..api.urls.len());
    loop {
        if load.give_up.load(Ordering::SeqCst) {
            rec.outcome = Outcome::Unknown;
            rec.decided_ms = now_ms();
            return;
        }
        rec.tries += 1;
        match api.submit(node, body).await {
            Ok((200 | 201, v)) => {
                if let Some(id) = v["id"].as_u64() {
                    rec.outcome = Outcome::Acked {
                        id,
                        node,
                        duplicate: v["duplicate"].as_bool().unwrap_or(false),
                    };
                    rec.decided_ms = now_ms();
                    return;
                }
                note_error(rec, node, format!("2xx without an id: {v}"));
            }
            Ok((429, v)) => note_error(rec, node, format!("429 {v}")),
            Ok((status, v)) if (400..500).contains(&status) => {
                rec.outcome = Outcome::Refused {
                    status,
                    body: v.to_string(),
                };
                rec.decided_ms = now_ms();
                return;
            }
            Ok((status, v)) => note_error(rec, node, format!("{status} {v}")),
            Err(e) => note_error(rec, node, e),
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..300))).await;
        // Possibly elsewhere next time.
        node = rng.gen_range(0..api.urls.len());
    }
}

/// Submits an acknowledged key again through another node (a few tries at most) and
/// records the id each acknowledgement names.
async fn repeat_submit(api: &Api, body: &Value, rec: &mut SubmitRecord, rng: &mut StdRng) {
    let Outcome::Acked { node: first, .. } = rec.outcome else {
        return;
    };
    for _ in 0..3 {
        let node = (first + rng.gen_range(1..api.urls.len())) % api.urls.len();
        match api.submit(node, body).await {
            Ok((200 | 201, v)) => {
                if let Some(id) = v["id"].as_u64() {
                    rec.repeat_acks.push((node, id));
                    return;
                }
            }
            Ok((status, v)) => note_error(rec, node, format!("repeat: {status} {v}")),
            Err(e) => note_error(rec, node, format!("repeat: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
