//! A mock OpenAI-compatible server (`POST /v1/chat/completions`, axum on 127.0.0.1:0)
//! speaking the real protocol: JSON answers, Server-Sent Events streams (`data:` chunks
//! with `choices[0].delta.content`, a final usage chunk, `data: [DONE]`), error statuses
//! with `Retry-After`. What it does is chosen per request by the model asked for (see
//! [`MockLlm`]'s constants); it records every request it gets and counts the streams
//! whose client went away.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::watch;

/// The answer of every successful model.
pub const ANSWER: &str = "Hello, world!";
/// How a streamed [`ANSWER`] is cut into deltas.
pub const DELTAS: [&str; 3] = ["Hel", "lo, ", "world!"];
/// The model name the server reports.
pub const SERVED_MODEL: &str = "mock-model-2024";
/// Usage reported with every answer.
pub const PROMPT_TOKENS: u64 = 11;
pub const COMPLETION_TOKENS: u64 = 3;

/// Answers [`ANSWER`], streamed or not as asked.
pub const OK: &str = "ok";
/// 429 with `Retry-After: 1` the first time, then as [`OK`].
pub const RATE_LIMITED: &str = "rate-limited";
/// 500 the first time, then as [`OK`].
pub const FLAKY: &str = "flaky";
/// Always 400 with a long body ending in [`BAD_REQUEST_END`].
pub const BAD_REQUEST: &str = "bad-request";
pub const BAD_REQUEST_END: &str = "the model `bad-request` does not exist";
/// Sleeps a minute before answering.
pub const SLOW: &str = "slow";
/// Streams the first delta, then only keep-alive comments, forever.
pub const HANG: &str = "hang";
/// Answers 64 KiB of text (streamed in 1 KiB deltas, or as JSON).
pub const BIG: &str = "big";
/// Streams two deltas, then ends without `[DONE]`.
pub const BROKEN: &str = "broken";
/// Streams the first delta of [`ANSWER`], then the rest (with usage and `[DONE]`) once
/// [`MockLlm::open_gate`] was called.
pub const GATED: &str = "gated";

/// One request as the server got it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    requests: Mutex<Vec<Recorded>>,
    hits: Mutex<HashMap<String, u32>>,
    dropped: watch::Sender<u32>,
    gate: watch::Sender<bool>,
}

/// A running mock server (stops with the test's runtime).
pub struct MockLlm {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl MockLlm {
    pub async fn start() -> MockLlm {
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockLlm { addr, inner }
    }

    /// The `base_url` of an agent talking to this server.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// How many requests asked for `model`.
    pub fn hits(&self, model: &str) -> u32 {
        self.inner
            .hits
            .lock()
            .unwrap()
            .get(model)
            .copied()
            .unwrap_or(0)
    }

    /// Lets [`GATED`] answers go on.
    pub fn open_gate(&self) {
        self.inner.gate.send_replace(true);
    }

    /// Waits (at most `limit`) until `n` streams saw their client go away.
    pub async fn wait_dropped(&self, n: u32, limit: Duration) {
        let mut rx = self.inner.dropped.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|d| *d >= n))
            .await
            .expect("the server never saw the client go away")
            .unwrap();
    }
}

async fn chat(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not JSON".into());
    };
    inner.requests.lock().unwrap().push(Recorded {
        headers,
        body: body.clone(),
    });
    let model = body["model"].as_str().unwrap_or("").to_owned();
    let hit = {
        let mut hits = inner.hits.lock().unwrap();
        let n = hits.entry(model.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    match model.as_str() {
        RATE_LIMITED if hit == 1 => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "slow down".into());
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            r
        }
        FLAKY if hit == 1 => error(StatusCode::INTERNAL_SERVER_ERROR, "oops".into()),
        BAD_REQUEST => error(
            StatusCode::BAD_REQUEST,
            format!("{}{BAD_REQUEST_END}", "x".repeat(2000)),
        ),
        SLOW => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            answer(stream, &DELTAS)
        }
        HANG => {
            let first = Bytes::from(sse_delta(DELTAS[0]));
            // The guard lives as long as the body: dropped when the client goes away.
            let keep_alive =
                futures::stream::unfold(DropGuard(inner.clone()), |guard| async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((Ok(Bytes::from_static(b": keep-alive\n\n")), guard))
                });
            let s = futures::stream::once(async move { Ok::<_, std::io::Error>(first) })
                .chain(keep_alive);
            sse_response(Body::from_stream(s))
        }
        BIG => {
            let piece = "y".repeat(1024);
            let pieces: Vec<&str> = (0..64).map(|_| piece.as_str()).collect();
            answer(stream, &pieces)
        }
        BROKEN => {
            let text = format!("{}{}", sse_delta(DELTAS[0]), sse_delta(DELTAS[1]));
            sse_response(Body::from(text))
        }
        GATED if stream => {
            let mut events = stream_events(&DELTAS);
            // The role chunk and the first delta now, the rest once the gate opens.
            let rest = events.split_off(2);
            let mut gate = inner.gate.subscribe();
            let later = async move {
                let _ = gate.wait_for(|open| *open).await;
                futures::stream::iter(rest.into_iter().map(ok_bytes))
            };
            let s = futures::stream::iter(events.into_iter().map(ok_bytes))
                .chain(futures::stream::once(later).flatten());
            sse_response(Body::from_stream(s))
        }
        _ => answer(stream, &DELTAS),
    }
}

/// Counts the end of a stream the client left.
struct DropGuard(Arc<Inner>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.dropped.send_modify(|d| *d += 1);
    }
}

fn error(status: StatusCode, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": "mock_error"}}).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

fn sse_delta(text: &str) -> String {
    let chunk = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": SERVED_MODEL,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}],
    });
    format!("data: {chunk}\n\n")
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap()
}

fn usage() -> Value {
    json!({
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    })
}

/// The answer `pieces` joined: a stream of deltas (a role-only first chunk, one chunk
/// per piece, a usage chunk, `[DONE]`; sent as separate writes), or one JSON document.
fn answer(stream: bool, pieces: &[&str]) -> Response {
    if !stream {
        let body = json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": SERVED_MODEL,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": pieces.concat()},
                "finish_reason": "stop",
            }],
            "usage": usage(),
        });
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
    }
    let s = futures::stream::iter(stream_events(pieces).into_iter().map(ok_bytes));
    sse_response(Body::from_stream(s))
}

fn ok_bytes(e: String) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(e))
}

/// The events of a streamed answer made of `pieces`: a role-only first chunk, one chunk
/// per piece, a usage chunk, `[DONE]`.
fn stream_events(pieces: &[&str]) -> Vec<String> {
    let role = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": SERVED_MODEL,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}],
    });
    let mut events = vec![format!("data: {role}\n\n")];
    events.extend(pieces.iter().map(|p| sse_delta(p)));
    let done = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": SERVED_MODEL,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    });
    events.push(format!("data: {done}\n\n"));
    let last = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": SERVED_MODEL,
        "choices": [],
        "usage": usage(),
    });
    events.push(format!("data: {last}\n\n"));
    events.push("data: [DONE]\n\n".to_owned());
    events
}
