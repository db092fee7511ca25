//! The agent kinds that run over the network: [`http`] (one HTTP request per attempt) and
//! [`llm`] (one chat completion from an OpenAI-compatible server per attempt). What each
//! does is described in [`crate::executor`]; their agents.toml keys in [`crate::agents`].
//!
//! Both run under the same rules as an `exec` agent: the attempt's timeout covers
//! everything (connecting, sending, every retry, reading the whole answer), a cancel
//! ends the attempt at once, and the output is bounded by `max_output_bytes`. Ending
//! early drops the request in flight, which closes its connection: the server sees the
//! client go away.
//!
//! **Streamed output.** Both runners take an [`OnChunk`] callback, called with each piece
//! of the answer as it arrives: each chunk of an `http` agent's 2xx response body, each
//! token text (`choices[0].delta.content`) of a streamed `llm` answer, or the whole text of
//! a non-streamed one. Only pieces that are part of the output are passed (never an
//! error body, never more than `max_output_bytes` in all), but an attempt that fails
//! later may already have passed some. In a worker each piece goes to the attempt's
//! output log (stream `body` for `http`, `tokens` for `llm`): its tail is reported with
//! the attempt's end, and a watched attempt's pieces are sent to the coordinator live.

pub mod http;
pub mod llm;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use swarm_proto::worker::{FailureKind, Outcome, OutputStream, PatternHit, TaskAssignment, Usage};

use crate::agents::{Agents, HttpSpec, LlmSpec};
use crate::cancel::CancelToken;
use crate::output::OutputTap;

pub use llm::LlmUsage;

/// Called with each piece of an answer as it arrives (see the [module docs](self)). Keep
/// it quick: it runs on the attempt's task, between reads.
pub type OnChunk<'a> = &'a mut (dyn FnMut(&[u8]) + Send);

/// How long connecting to an `http` or `llm` agent's server may take (each try), within
/// the attempt's timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of an error response's body a failure message quotes (its end).
pub const ERROR_TAIL_BYTES: usize = 512;

/// How much of an error response's body is read, at most, to find its tail.
const ERROR_BODY_READ_LIMIT: usize = 64 * 1024;

/// One attempt of an `http` or `llm` agent: the request's client, the task, and the
/// limits it runs under.
#[derive(Debug)]
pub struct Attempt<'a> {
    /// The client the request goes through (see [`build_client`]).
    pub client: &'a reqwest::Client,
    /// The task: its payload is what is sent.
    pub task: TaskAssignment,
    /// A longer output fails with [`FailureKind::OutputTooLarge`].
    pub max_output_bytes: u64,
    /// The attempt's timeout (`None`: none), covering the whole exchange.
    pub timeout: Option<Duration>,
    /// Ends the attempt with [`FailureKind::Cancelled`].
    pub cancel: CancelToken,
}

/// The HTTP client of the `http` and `llm` agents: HTTP/1.1 over TCP or TLS (rustls with
/// the webpki roots), no redirects followed (a 3xx is a failure like any other non-2xx,
/// so headers never follow a redirect elsewhere), [`CONNECT_TIMEOUT`] per connect, and
/// `swarm-worker/<version>` as the user agent. The proxy variables of the worker's
/// environment (`HTTPS_PROXY`, `NO_PROXY`, …) apply.
pub fn build_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("swarm-worker/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
}

/// A [`build_client`] client made on first use and shared by clones (one connection
/// pool for all the agents of an [`Agents`]). Not part of the configuration: every two
/// compare equal.
#[derive(Clone, Default)]
pub(crate) struct SharedClient(Arc<OnceLock<Result<reqwest::Client, String>>>);

impl SharedClient {
    /// The client, or why it cannot be made.
    pub(crate) fn get(&self) -> Result<&reqwest::Client, &str> {
        self.0
            .get_or_init(|| build_client().map_err(|e| error_chain(&e)))
            .as_ref()
            .map_err(String::as_str)
    }
}

impl PartialEq for SharedClient {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SharedClient {}

impl std::fmt::Debug for SharedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedClient")
    }
}

/// Runs an attempt of the `http` agent `spec` (what [`crate::executor::Executor`] does),
/// its body's pieces going to `tap`.
pub(crate) async fn run_http_agent(
    agents: &Agents,
    spec: &HttpSpec,
    task: TaskAssignment,
    max_output_bytes: u64,
    timeout: Option<Duration>,
    cancel: CancelToken,
    tap: &OutputTap,
) -> Outcome {
    let client = match shared_client(agents) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let attempt = Attempt {
        client,
        task,
        max_output_bytes,
        timeout,
        cancel,
    };
    http::run(spec, attempt, &mut |piece| {
        tap.append(OutputStream::Body, piece)
    })
    .await
}

/// The agents' HTTP client, or the attempt's failure when it cannot be made.
fn shared_client(agents: &Agents) -> Result<&reqwest::Client, Outcome> {
    agents.client().get().map_err(|e| {
        failed(
            FailureKind::Spawn,
            format!("cannot make the HTTP client: {e}"),
        )
    })
}

/// Runs an attempt of the `llm` agent `spec` (what [`crate::executor::Executor`] does),
/// its token texts going to `tap`; logs and returns the tokens it used.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_llm_agent(
    agents: &Agents,
    spec: &LlmSpec,
    task: TaskAssignment,
    patterns: &[PatternHit],
    max_output_bytes: u64,
    timeout: Option<Duration>,
    cancel: CancelToken,
    tap: &OutputTap,
) -> (Outcome, Option<Usage>) {
    let client = match shared_client(agents) {
        Ok(c) => c,
        Err(o) => return (o, None),
    };
    let agent = task.agent.clone();
    let attempt_ref = task.attempt;
    let attempt = Attempt {
        client,
        task,
        max_output_bytes,
        timeout,
        cancel,
    };
    let (outcome, usage) = llm::run(spec, attempt, patterns, &mut |piece| {
        tap.append(OutputStream::Tokens, piece)
    })
    .await;
    if let Some(u) = &usage {
        tracing::info!(
            agent = %agent,
            attempt = ?attempt_ref,
            model = %u.model,
            prompt_tokens = u.prompt_tokens,
            completion_tokens = u.completion_tokens,
            "llm usage"
        );
    }
    (outcome, usage)
}

pub(crate) use crate::executor::{failed, too_large};

fn timed_out(timeout: Option<Duration>) -> Outcome {
    failed(
        FailureKind::Timeout,
        format!(
            "timed out after {} ms; request aborted",
            timeout.map_or(0, |d| d.as_millis())
        ),
    )
}

fn cancelled() -> Outcome {
    failed(FailureKind::Cancelled, "cancelled; request aborted".into())
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Runs `work` unless `cancel` fires or `timeout` passes first: then `work` is dropped
/// (with any request in flight, whose connection closes) and the outcome says which.
async fn bounded<T>(
    work: impl Future<Output = T>,
    timeout: Option<Duration>,
    cancel: &mut CancelToken,
) -> Result<T, Outcome> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(cancelled()),
        _ = sleep_opt(timeout) => Err(timed_out(timeout)),
        r = work => Ok(r),
    }
}

/// An error and its sources, `: `-separated.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // Some errors repeat their source in their own message.
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Reads what is left of `resp`'s body, at most [`ERROR_BODY_READ_LIMIT`] bytes, and
/// returns its last [`ERROR_TAIL_BYTES`]. A body that breaks off yields what came.
async fn body_tail(mut resp: reqwest::Response) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut read = 0usize;
    while read < ERROR_BODY_READ_LIMIT {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                buf.extend_from_slice(&chunk);
                if buf.len() > 2 * ERROR_TAIL_BYTES {
                    buf.drain(..buf.len() - ERROR_TAIL_BYTES);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    if buf.len() > ERROR_TAIL_BYTES {
        buf.drain(..buf.len() - ERROR_TAIL_BYTES);
    }
    buf
}

/// `HTTP 503 Service Unavailable: <the body's tail>` (no `:` part for an empty body).
fn status_message(status: reqwest::StatusCode, tail: &[u8]) -> String {
    let text = String::from_utf8_lossy(tail);
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_messages() {
        assert_eq!(
            status_message(reqwest::StatusCode::SERVICE_UNAVAILABLE, b" busy \n"),
            "HTTP 503 Service Unavailable: busy"
        );
        assert_eq!(
            status_message(reqwest::StatusCode::NOT_FOUND, b""),
            "HTTP 404 Not Found"
        );
        // A tail cut inside a UTF-8 character is shown lossily, not refused.
        let cut = &"é-end".as_bytes()[1..];
        assert!(status_message(reqwest::StatusCode::BAD_REQUEST, cut).ends_with("-end"));
    }

    #[test]
    fn error_chains_skip_repeated_sources() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "send failed",
            Some(Box::new(E("connect", Some(Box::new(E("refused", None)))))),
        );
        assert_eq!(error_chain(&e), "send failed: connect: refused");
        let e = E("send failed: connect", Some(Box::new(E("connect", None))));
        assert_eq!(error_chain(&e), "send failed: connect");
    }

    #[test]
    fn shared_clients_are_built_once_and_compare_equal() {
        let a = SharedClient::default();
        let b = a.clone();
        let ca = a.get().expect("client") as *const reqwest::Client;
        let cb = b.get().expect("client") as *const reqwest::Client;
        assert_eq!(ca, cb);
        assert_eq!(a, SharedClient::default());
    }
}
