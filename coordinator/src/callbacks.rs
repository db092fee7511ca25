//! Delivering task callbacks. On the leader, [`deliver_loop`] POSTs each finished task's
//! view to its `callback_url` and proposes what came of the attempt ([`Op::Callback`]);
//! the outbox and its rules (which attempt counts, backoff, giving up) are replicated
//! state, in [`crate::state::callbacks`], so a new leader carries on where the old one
//! stopped.
//!
//! # What a receiver gets
//! `POST <callback_url>` with `Content-Type: application/json` and the body
//! `{"event": "task.finished", "task": <the task's view, as GET /v1/tasks/{id}>}`, and:
//! * `Swarm-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: the
//!   receiver recomputes it with the cluster's callback secret (constant-time compare)
//!   and may refuse an old `t` (replays);
//! * `Swarm-Task-Id` and `Swarm-Delivery-Attempt`: delivery is at least once (a leader
//!   change may repeat an attempt whose answer was not recorded), so a receiver dedupes
//!   by the task id.
//!
//! A 2xx answer delivers it. No answer, a 408, 429 or 5xx is retried with backoff; any
//! other answer (a 3xx too: redirects are not followed) gives it up at once, recorded on
//! the task with the status.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ring::hmac;
use swarm_proto::TaskId;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use crate::node::{now_ms, Node};
use crate::state::{CallbackOp, Op};
use crate::tasks::{task_view, TaskError};

/// How often the leader looks for deliveries due.
const DELIVER_EVERY: Duration = Duration::from_millis(200);
/// Most deliveries under way at once.
const MAX_IN_FLIGHT: usize = 64;
/// Longest wait for a receiver's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer body read (for the error recorded on a refusal).
const MAX_ANSWER_EXCERPT: usize = 200;

/// On the leader, every [`DELIVER_EVERY`] and whenever a delivery ends (its slot is
/// free): start the deliveries due, at most [`MAX_IN_FLIGHT`] at once. So the rate is
/// bounded by the receivers' and the commits' speed, not by the period. Runs until
/// shutdown.
pub(crate) async fn deliver_loop(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let http = match reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("swarm-coordinator/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "no HTTP client for callbacks; none will be delivered");
            return;
        }
    };
    let under_way: Arc<Mutex<HashSet<TaskId>>> = Arc::default();
    let ended = Arc::new(Notify::new());
    let warned_at = AtomicU64::new(0);
    let mut tick = tokio::time::interval(DELIVER_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ended.notified() => {}
            _ = shutdown.changed() => return,
        }
        if node.is_leader() {
            start_due(&node, &http, &under_way, &ended, &warned_at);
        }
    }
}

fn start_due(
    node: &Arc<Node>,
    http: &reqwest::Client,
    under_way: &Arc<Mutex<HashSet<TaskId>>>,
    ended: &Arc<Notify>,
    warned_at: &AtomicU64,
) {
    let now = now_ms();
    let Some(secret) = node.config().callback_secret.clone() else {
        let waiting = node.read_table(|t| t.callbacks().len());
        // Once a minute: this loop runs five times a second.
        if waiting > 0 && now.saturating_sub(warned_at.load(Ordering::Relaxed)) >= 60_000 {
            warned_at.store(now, Ordering::Relaxed);
            warn!(
                waiting,
                "callbacks are waiting but this coordinator has no --callback-secret-file"
            );
        }
        return;
    };
    // The set is held while the outbox is read and the new deliveries are entered: a
    // delivery leaves it only once its outcome is applied (`propose` returns then), so
    // an entry read here as due is either under way or still due, never just done (a
    // second attempt of the same number; found by the 5,000-callback test).
    let mut started = Vec::new();
    {
        let mut u = under_way.lock().unwrap_or_else(PoisonError::into_inner);
        let due = node.read_table(|t| match t.restoring() {
            Some(_) => Vec::new(),
            None => t.callbacks().due(now, u.len() + MAX_IN_FLIGHT),
        });
        for (id, attempt) in due {
            if u.len() >= MAX_IN_FLIGHT {
                break;
            }
            if u.insert(id) {
                started.push((id, attempt));
            }
        }
    }
    for (id, attempt) in started {
        let (node, http, under_way, ended, secret) = (
            node.clone(),
            http.clone(),
            under_way.clone(),
            ended.clone(),
            secret.clone(),
        );
        tokio::spawn(async move {
            let op = attempt_delivery(&node, &http, secret.as_bytes(), id, attempt).await;
            if let Some(op) = op {
                match node.propose(vec![Op::Callback(op)]).await {
                    Ok(_) => {}
                    Err(e) => debug!(task = id, error = %e, "callback outcome not committed"),
                }
            }
            under_way
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            ended.notify_one();
        });
    }
}

/// Make attempt `attempt` of task `id`'s delivery; what came of it (`None`: the task is
/// gone, and so is its entry, with the purge that removed it).
async fn attempt_delivery(
    node: &Node,
    http: &reqwest::Client,
    secret: &[u8],
    id: TaskId,
    attempt: u32,
) -> Option<CallbackOp> {
    let view = match task_view(node, id) {
        Ok(v) => v,
        Err(TaskError::Expired(_) | TaskError::Unknown(_)) => return None,
        Err(e) => {
            warn!(task = id, error = %e, "reading a task to deliver its callback");
            return None;
        }
    };
    let url = view.callback.as_ref()?.url.clone();
    let host = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    if !node.config().callback_allow.allows(&host) {
        // Allowed at submit; the coordinators' list changed since.
        return Some(CallbackOp::Failed {
            task_id: id,
            attempt,
            status: None,
            error: format!("host {host:?} is not among the coordinators' --callback-allow"),
            retry: false,
            now_ms: now_ms(),
        });
    }
    let body = match serde_json::to_vec(&serde_json::json!({
        "event": "task.finished",
        "task": view,
    })) {
        Ok(b) => b,
        Err(e) => {
            warn!(task = id, error = %e, "encoding a callback");
            return None;
        }
    };
    let at = now_ms();
    let signature = sign(secret, at, &body);
    let sent = http
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Swarm-Signature", signature)
        .header("Swarm-Task-Id", id.to_string())
        .header("Swarm-Delivery-Attempt", attempt.to_string())
        .body(body)
        .send()
        .await;
    let now_ms = now_ms();
    let op = match sent {
        Ok(r) if r.status().is_success() => {
            metrics::counter!("swarm_callbacks_delivered_total").increment(1);
            CallbackOp::Delivered {
                task_id: id,
                attempt,
                status: r.status().as_u16(),
                now_ms,
            }
        }
        Ok(r) => {
            let status = r.status();
            let retry = status.is_server_error()
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            let excerpt = r
                .text()
                .await
                .map(|t| t.chars().take(MAX_ANSWER_EXCERPT).collect::<String>())
                .unwrap_or_default();
            metrics::counter!("swarm_callbacks_failed_attempts_total").increment(1);
            debug!(task = id, attempt, %status, "callback refused");
            CallbackOp::Failed {
                task_id: id,
                attempt,
                status: Some(status.as_u16()),
                error: format!("{status}: {excerpt}"),
                retry,
                now_ms,
            }
        }
        Err(e) => {
            metrics::counter!("swarm_callbacks_failed_attempts_total").increment(1);
            debug!(task = id, attempt, error = %e, "callback not delivered");
            CallbackOp::Failed {
                task_id: id,
                attempt,
                status: None,
                error: error_chain(&e),
                retry: true,
                now_ms,
            }
        }
    };
    Some(op)
}

/// The hosts callbacks may call (`--callback-allow`): names, name suffixes (`*.x.com`:
/// any name ending in `.x.com`), IP addresses and networks (`10.0.0.0/8`). Empty: any
/// host. A name is matched as written in the URL (so a network entry does not admit a
/// name that resolves into it); a literal IP address in the URL, by the networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    names: Vec<String>,
    suffixes: Vec<String>,
    nets: Vec<(std::net::IpAddr, u8)>,
}

impl AllowList {
    /// Parse `--callback-allow` entries.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a String>) -> Result<Self, String> {
        let mut list = AllowList::default();
        for e in entries {
            let e = e.trim().to_ascii_lowercase();
            if let Some(suffix) = e.strip_prefix("*.") {
                if suffix.is_empty() || suffix.contains('*') {
                    return Err(format!("{e:?}: expected *.domain"));
                }
                list.suffixes.push(format!(".{suffix}"));
            } else if let Some((ip, bits)) = e.split_once('/') {
                let ip: std::net::IpAddr = ip
                    .parse()
                    .map_err(|_| format!("{e:?}: not an IP network"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits: u8 = bits
                    .parse()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("{e:?}: a prefix length is 0 to {max}"))?;
                list.nets.push((ip, bits));
            } else if let Ok(ip) = e.parse::<std::net::IpAddr>() {
                list.nets.push((ip, if ip.is_ipv4() { 32 } else { 128 }));
            } else if e.is_empty() || e.contains(['*', '/', ':', ' ']) {
                return Err(format!(
                    "{e:?}: expected a host name, *.domain, an IP or a network"
                ));
            } else {
                list.names.push(e);
            }
        }
        Ok(list)
    }

    /// Whether callbacks may call `host` (a URL's host: a name, or an IP address,
    /// IPv6 in brackets).
    pub fn allows(&self, host: &str) -> bool {
        if self.names.is_empty() && self.suffixes.is_empty() && self.nets.is_empty() {
            return true;
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return self.nets.iter().any(|(net, bits)| in_net(ip, *net, *bits));
        }
        self.names.contains(&host) || self.suffixes.iter().any(|s| host.ends_with(s.as_str()))
    }
}

/// Whether `ip` is in the network `net`/`bits` (an IPv4 network holds no IPv6 address).
fn in_net(ip: std::net::IpAddr, net: std::net::IpAddr, bits: u8) -> bool {
    let (a, b, width) = match (ip, net) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    if shift >= 128 {
        return true;
    }
    a >> shift == b >> shift
}

/// `t=<at>,v1=<hex HMAC-SHA256(secret, "<at>.<body>")>`.
pub fn sign(secret: &[u8], at_ms: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(at_ms.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={at_ms},v1={hex}")
}

/// An error and its causes, `: `-joined (reqwest's own message leaves out the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_admits_names_suffixes_and_networks_only() {
        let list = |entries: &[&str]| {
            AllowList::parse(
                entries
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .iter(),
            )
        };
        let any = list(&[]).unwrap();
        assert!(any.allows("169.254.169.254") && any.allows("example.com"));
        let l = list(&[
            "hooks.example.com",
            "*.corp.test",
            "10.1.0.0/16",
            "127.0.0.1",
            "::1",
        ])
        .unwrap();
        for ok in [
            "hooks.example.com",
            "HOOKS.example.com",
            "a.corp.test",
            "b.a.corp.test",
        ] {
            assert!(l.allows(ok), "{ok}");
        }
        for ok in ["10.1.255.3", "127.0.0.1", "[::1]"] {
            assert!(l.allows(ok), "{ok}");
        }
        for no in [
            "example.com",
            "corp.test",
            "evilcorp.test",
            "hooks.example.com.evil",
            "10.2.0.1",
            "127.0.0.2",
            "169.254.169.254",
            "[::2]",
        ] {
            assert!(!l.allows(no), "{no}");
        }
        assert!(list(&["0.0.0.0/0"]).unwrap().allows("8.8.8.8"));
        assert!(
            !list(&["0.0.0.0/0"]).unwrap().allows("[::1]"),
            "v4 nets hold no v6"
        );
        for bad in ["*.", "a*b.com", "10.0.0.0/33", "x/8", "h h", ""] {
            assert!(list(&[bad]).is_err(), "{bad}");
        }
    }

    /// The signature is the HMAC of `t.body`, checkable with ring's own verify; another
    /// time, body or secret does not verify.
    #[test]
    fn signatures_verify_with_the_secret_only() {
        let body = br#"{"event":"task.finished"}"#;
        let sig = sign(b"s3cret", 1_700_000_000_000, body);
        // The same value Python's hmac module computes (the client's
        // `verify_callback`): the format is what receivers in any language expect.
        assert_eq!(
            sig,
            "t=1700000000000,v1=821bc611644634e77d1958873f12c8749f57446f70041f4351704c552094126c"
        );
        let (t, v1) = sig.split_once(',').unwrap();
        assert_eq!(t, "t=1700000000000");
        let hex = v1.strip_prefix("v1=").unwrap();
        let tag: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let verify = |secret: &[u8], signed: &[u8]| {
            hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, secret), signed, &tag).is_ok()
        };
        let mut signed = b"1700000000000.".to_vec();
        signed.extend_from_slice(body);
        assert!(verify(b"s3cret", &signed));
        assert!(!verify(b"other", &signed));
        signed[0] = b'2';
        assert!(!verify(b"s3cret", &signed));
    }
}
