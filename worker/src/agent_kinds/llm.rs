//! `llm` agents: one chat completion per attempt from an OpenAI-compatible server (see
//! [`crate::executor`] for the behaviour, [`crate::agents`] for the keys).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{json, Map, Value};
use swarm_proto::worker::{FailureKind, Outcome, PatternHit, Usage};
use tokio::time::Instant;

use super::{body_tail, bounded, error_chain, failed, status_message, too_large, Attempt, OnChunk};
use crate::agents::LlmSpec;

/// The system prompt template of an `llm` agent without `system_prompt`.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are an agent of a task-running swarm. Do the \
     task in the user's message and answer with the result only.\n{patterns}";

/// What a system prompt template's retrieved strategies replace.
pub const PATTERNS_PLACEHOLDER: &str = "{patterns}";

/// The first retry's delay (before jitter); it doubles with every retry.
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// The longest retry delay (before jitter).
pub const BACKOFF_CAP: Duration = Duration::from_secs(20);
/// A `Retry-After` asking for a longer wait than this ends the attempt instead.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(600);

/// The tokens an answer took, as the server reported them (`usage`): the protocol's
/// [`Usage`], which the attempt's report carries (`prompt_tokens`: every message sent;
/// `completion_tokens`: the answer).
pub type LlmUsage = Usage;

/// Runs one attempt: builds the conversation from the payload and `patterns`, asks the
/// server (retrying 429, 5xx and failures before any byte of the answer, within the
/// attempt's timeout) and returns the answer text as the output, with the tokens used
/// when the server reported them (also on some failures: an answer that came but was
/// too large still cost its tokens). Streamed token texts are passed to `on_chunk` as
/// they arrive; a non-streamed answer is passed whole. See [`crate::executor`] for
/// every failure.
pub async fn run(
    spec: &LlmSpec,
    attempt: Attempt<'_>,
    patterns: &[PatternHit],
    on_chunk: OnChunk<'_>,
) -> (Outcome, Option<Usage>) {
    let Attempt {
        client,
        task,
        max_output_bytes,
        timeout,
        mut cancel,
    } = attempt;
    let messages = match build_messages(spec, &task.payload, patterns) {
        Ok(m) => m,
        Err(e) => return (failed(FailureKind::BadPayload, e), None),
    };
    let body = match serde_json::to_vec(&request_body(spec, messages)) {
        Ok(b) => b,
        Err(e) => {
            return (
                failed(
                    FailureKind::BadPayload,
                    format!("cannot encode the request: {e}"),
                ),
                None,
            )
        }
    };
    // `None` also for a timeout too far away to be a point in time.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let work = converse(client, spec, &body, max_output_bytes, deadline, on_chunk);
    match bounded(work, timeout, &mut cancel).await {
        Ok(result) => result,
        Err(outcome) => (outcome, None),
    }
}

/// Why a try failed in a way worth another.
enum Retry {
    /// No response: the connection failed.
    Unreachable(String),
    /// 429 or 5xx.
    Status(String),
    /// The answer broke off before its first byte.
    Broken(String),
}

impl Retry {
    fn give_up(self, url: &Url, tries: u32, note: Option<String>) -> Outcome {
        let (kind, mut message) = match self {
            Retry::Unreachable(e) => (FailureKind::Spawn, format!("cannot reach {url}: {e}")),
            Retry::Status(m) | Retry::Broken(m) => (FailureKind::Exit, m),
        };
        let tries = if tries == 1 {
            "1 try".to_owned()
        } else {
            format!("{tries} tries")
        };
        match note {
            Some(n) => message.push_str(&format!(" ({tries}; {n})")),
            None => message.push_str(&format!(" ({tries})")),
        }
        failed(kind, message)
    }

    fn reason(&self) -> &str {
        match self {
            Retry::Unreachable(m) | Retry::Status(m) | Retry::Broken(m) => m,
        }
    }
}

/// The exchange with its retries (bounded by the caller's timeout and cancel).
async fn converse(
    client: &reqwest::Client,
    spec: &LlmSpec,
    body: &[u8],
    max_output_bytes: u64,
    deadline: Option<Instant>,
    on_chunk: OnChunk<'_>,
) -> (Outcome, Option<Usage>) {
    let url = spec.chat_completions_url();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let request = match build_request(client, spec, &url, body) {
            Ok(r) => r,
            Err(o) => return (o, None),
        };
        let (retry, after) = match client.execute(request).await {
            Err(e) => (Retry::Unreachable(error_chain(&e.without_url())), None),
            Ok(resp) => {
                let status = resp.status();
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    let after = retry_after(resp.headers(), SystemTime::now());
                    let tail = body_tail(resp).await;
                    (Retry::Status(status_message(status, &tail)), after)
                } else if !status.is_success() {
                    let tail = body_tail(resp).await;
                    return (
                        failed(FailureKind::Exit, status_message(status, &tail)),
                        None,
                    );
                } else {
                    match read_answer(resp, spec, max_output_bytes, &mut *on_chunk).await {
                        Answer::Done(outcome, usage) => return (outcome, usage),
                        Answer::BrokeEarly(m) => (Retry::Broken(m), None),
                    }
                }
            }
        };
        if tries > spec.max_retries {
            return (retry.give_up(&url, tries, None), None);
        }
        let delay = after.unwrap_or_else(|| backoff(tries - 1, rand::random()));
        if after.is_some_and(|a| a > RETRY_AFTER_MAX) {
            let note = format!("the server asks to retry in {} s", delay.as_secs());
            return (retry.give_up(&url, tries, Some(note)), None);
        }
        if deadline.is_some_and(|d| Instant::now().checked_add(delay).is_none_or(|at| at >= d)) {
            let note = format!(
                "no time for another try in {} ms before the attempt's timeout",
                delay.as_millis()
            );
            return (retry.give_up(&url, tries, Some(note)), None);
        }
        tracing::info!(
            model = %spec.model,
            tries,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            reason = retry.reason(),
            "llm request failed; retrying"
        );
        tokio::time::sleep(delay).await;
    }
}

fn build_request(
    client: &reqwest::Client,
    spec: &LlmSpec,
    url: &Url,
    body: &[u8],
) -> Result<reqwest::Request, Outcome> {
    let accept = if spec.stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut builder = client
        .post(url.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, accept)
        .body(body.to_vec());
    if let Some(key) = &spec.api_key {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                failed(
                    FailureKind::Spawn,
                    "the API key cannot be sent in an HTTP header".into(),
                )
            })?;
        value.set_sensitive(true);
        builder = builder.header(AUTHORIZATION, value);
    }
    builder.build().map_err(|e| {
        failed(
            FailureKind::Spawn,
            format!("cannot make the request to {url}: {}", error_chain(&e)),
        )
    })
}

/// How reading a 2xx response ended.
enum Answer {
    /// For good: the answer, or a failure no retry can mend.
    Done(Outcome, Option<Usage>),
    /// The body broke off before the first byte of the answer: worth another try.
    BrokeEarly(String),
}

/// The largest response body (or SSE event) read for an answer of at most `max` bytes:
/// JSON escapes can make text up to six times longer, plus room for the envelope.
fn body_limit(max: u64) -> usize {
    usize::try_from(max.saturating_mul(6).saturating_add(64 * 1024)).unwrap_or(usize::MAX)
}

async fn read_answer(
    resp: reqwest::Response,
    spec: &LlmSpec,
    max: u64,
    on_chunk: OnChunk<'_>,
) -> Answer {
    // The server's word wins over what was asked for: a server that does not stream
    // answers JSON.
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let streamed = if content_type.starts_with("text/event-stream") {
        true
    } else if content_type.starts_with("application/json") {
        false
    } else {
        spec.stream
    };
    if streamed {
        read_stream(resp, spec, max, on_chunk).await
    } else {
        read_json(resp, spec, max, on_chunk).await
    }
}

fn usage_of(v: &Value, model: Option<&str>, spec: &LlmSpec) -> Option<Usage> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    Some(Usage {
        model: model.unwrap_or(&spec.model).to_owned(),
        prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
        completion_tokens: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// An `error` member's message (or the member itself), shortened.
fn error_text(err: &Value) -> String {
    let text = match err.get("message").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None => err.to_string(),
    };
    shorten(&text)
}

/// At most the first 512 characters of `s`.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(512) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

async fn read_json(
    mut resp: reqwest::Response,
    spec: &LlmSpec,
    max: u64,
    on_chunk: OnChunk<'_>,
) -> Answer {
    let limit = body_limit(max);
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Answer::Done(too_large(max), None);
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len().saturating_add(chunk.len()) > limit {
                    return Answer::Done(too_large(max), None);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Answer::BrokeEarly(format!("the response broke off: {}", error_chain(&e)))
            }
        }
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let tail = &body[body.len().saturating_sub(super::ERROR_TAIL_BYTES)..];
            return Answer::Done(
                failed(
                    FailureKind::Exit,
                    format!(
                        "the response is not JSON ({e}): {}",
                        String::from_utf8_lossy(tail).trim()
                    ),
                ),
                None,
            );
        }
    };
    let usage = usage_of(&v, v.get("model").and_then(Value::as_str), spec);
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        let message = format!("the server answered with an error: {}", error_text(err));
        return Answer::Done(failed(FailureKind::Exit, message), usage);
    }
    let message = &v["choices"][0]["message"];
    match message.get("content").and_then(Value::as_str) {
        Some(text) if text.len() as u64 > max => Answer::Done(too_large(max), usage),
        Some(text) => {
            on_chunk(text.as_bytes());
            Answer::Done(
                Outcome::Succeeded {
                    output: text.as_bytes().to_vec(),
                },
                usage,
            )
        }
        None => {
            let message = match message.get("refusal").and_then(Value::as_str) {
                Some(r) => format!("the model refused: {}", shorten(r)),
                None => {
                    "the response carries no answer text (`choices[0].message.content`)".to_owned()
                }
            };
            Answer::Done(failed(FailureKind::Exit, message), usage)
        }
    }
}

/// What a stream has delivered so far.
#[derive(Default)]
struct StreamState {
    answer: String,
    refusal: String,
    model: Option<String>,
    usage: Option<Value>,
    done: bool,
}

impl StreamState {
    /// Takes one event's data.
    fn event(&mut self, data: &str, max: u64, on_chunk: OnChunk<'_>) -> Result<(), Outcome> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            failed(
                FailureKind::Exit,
                format!("a malformed event in the stream ({e}): {}", shorten(data)),
            )
        })?;
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            return Err(failed(
                FailureKind::Exit,
                format!(
                    "the server reported an error in the stream: {}",
                    error_text(err)
                ),
            ));
        }
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            if self.model.as_deref() != Some(m) {
                self.model = Some(m.to_owned());
            }
        }
        if v.get("usage").is_some_and(Value::is_object) {
            self.usage = Some(json!({ "usage": v["usage"] }));
        }
        let delta = &v["choices"][0]["delta"];
        if let Some(piece) = delta.get("content").and_then(Value::as_str) {
            if !piece.is_empty() {
                if (self.answer.len() as u64).saturating_add(piece.len() as u64) > max {
                    return Err(too_large(max));
                }
                on_chunk(piece.as_bytes());
                self.answer.push_str(piece);
            }
        }
        if let Some(r) = delta.get("refusal").and_then(Value::as_str) {
            if self.refusal.len() < 4096 {
                self.refusal.push_str(r);
            }
        }
        Ok(())
    }

    fn usage(&self, spec: &LlmSpec) -> Option<Usage> {
        usage_of(self.usage.as_ref()?, self.model.as_deref(), spec)
    }
}

async fn read_stream(
    mut resp: reqwest::Response,
    spec: &LlmSpec,
    max: u64,
    on_chunk: OnChunk<'_>,
) -> Answer {
    let mut sse = Sse::new(body_limit(max));
    let mut state = StreamState::default();
    let mut events = Vec::new();
    let mut broke: Option<String> = None;
    loop {
        let fed = match resp.chunk().await {
            Ok(Some(chunk)) => sse.push(&chunk, &mut events),
            Ok(None) => {
                sse.finish(&mut events);
                broke = Some("the stream ended before [DONE]".to_owned());
                Ok(())
            }
            Err(e) => {
                broke = Some(format!(
                    "the stream ended before [DONE]: {}",
                    error_chain(&e)
                ));
                Ok(())
            }
        };
        for data in events.drain(..) {
            if let Err(outcome) = state.event(&data, max, &mut *on_chunk) {
                return Answer::Done(outcome, state.usage(spec));
            }
            if state.done {
                break;
            }
        }
        if state.done {
            if state.answer.is_empty() && !state.refusal.is_empty() {
                let message = format!("the model refused: {}", shorten(&state.refusal));
                return Answer::Done(failed(FailureKind::Exit, message), state.usage(spec));
            }
            let usage = state.usage(spec);
            return Answer::Done(
                Outcome::Succeeded {
                    output: state.answer.into_bytes(),
                },
                usage,
            );
        }
        match fed {
            Ok(()) => {}
            Err(SseError::TooLarge) => return Answer::Done(too_large(max), state.usage(spec)),
            Err(SseError::NotUtf8) => {
                return Answer::Done(
                    failed(FailureKind::Exit, "the stream is not UTF-8".into()),
                    state.usage(spec),
                )
            }
        }
        if let Some(message) = broke {
            // Nothing of the answer reached anyone yet: another try is harmless.
            if state.answer.is_empty() {
                return Answer::BrokeEarly(message);
            }
            return Answer::Done(failed(FailureKind::Exit, message), state.usage(spec));
        }
    }
}

/// Why a Server-Sent Events stream cannot be read on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SseError {
    /// A line or an event outgrew the limit.
    TooLarge,
    /// A line is not UTF-8.
    NotUtf8,
}

/// A Server-Sent Events parser (the `text/event-stream` format): bytes in, the `data` of
/// each complete event out. Lines end with LF, CRLF or CR; `:` lines are comments; fields
/// other than `data` are ignored; the `data` lines of one event are joined with LF.
pub(crate) struct Sse {
    line: Vec<u8>,
    data: Option<String>,
    /// The last byte was a CR: an LF right after it ends no second line.
    skip_lf: bool,
    limit: usize,
}

impl Sse {
    /// A parser refusing lines and events longer than `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Sse {
            line: Vec::new(),
            data: None,
            skip_lf: false,
            limit,
        }
    }

    /// Feeds `bytes`, pushing the data of every event they complete onto `events` (also
    /// when it then fails).
    pub(crate) fn push(&mut self, bytes: &[u8], events: &mut Vec<String>) -> Result<(), SseError> {
        for &b in bytes {
            if std::mem::take(&mut self.skip_lf) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' => self.end_line(events)?,
                b'\r' => {
                    self.end_line(events)?;
                    self.skip_lf = true;
                }
                _ => {
                    if self.line.len() >= self.limit {
                        return Err(SseError::TooLarge);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    /// The stream ended: an unterminated last line and event still count.
    pub(crate) fn finish(&mut self, events: &mut Vec<String>) {
        if !self.line.is_empty() {
            let _ = self.end_line(events);
        }
        if let Some(d) = self.data.take() {
            events.push(d);
        }
    }

    fn end_line(&mut self, events: &mut Vec<String>) -> Result<(), SseError> {
        if self.line.is_empty() {
            if let Some(d) = self.data.take() {
                events.push(d);
            }
            return Ok(());
        }
        let line =
            String::from_utf8(std::mem::take(&mut self.line)).map_err(|_| SseError::NotUtf8)?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        if field == "data" {
            match &mut self.data {
                // Every `data` line after the first adds a line feed first.
                Some(d) => {
                    if d.len().saturating_add(1 + value.len()) > self.limit {
                        return Err(SseError::TooLarge);
                    }
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        Ok(())
    }
}

/// The retrieved strategies as the system prompt shows them (empty without patterns).
pub fn render_patterns(patterns: &[PatternHit]) -> String {
    if patterns.is_empty() {
        return String::new();
    }
    let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::from(
        "Strategies retrieved from similar earlier tasks (use what fits; one learnt from a \
         failure shows what to avoid):\n",
    );
    for p in patterns {
        let title = one_line(&p.title);
        let description = one_line(&p.description);
        if description.is_empty() {
            out.push_str(&format!("- {title}\n"));
        } else {
            out.push_str(&format!("- {title}: {description}\n"));
        }
        for line in p.content.lines() {
            out.push_str("  ");
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let from = match p.outcome.as_str() {
            "success" => "a success".to_owned(),
            "failure" => "a failure".to_owned(),
            other => format!("`{}`", one_line(other)),
        };
        out.push_str(&format!(
            "  (learnt from {from}; confidence {:.2})\n",
            p.confidence
        ));
    }
    out.trim_end().to_owned()
}

/// The system prompt from `template` and the rendered `strategies`: `{patterns}` is
/// replaced by them; a template without it gets them appended after a blank line.
pub fn system_prompt(template: &str, strategies: &str) -> String {
    let text = if template.contains(PATTERNS_PLACEHOLDER) {
        template.replace(PATTERNS_PLACEHOLDER, strategies)
    } else if strategies.is_empty() {
        template.to_owned()
    } else {
        format!("{}\n\n{strategies}", template.trim_end())
    };
    text.trim_end().to_owned()
}

/// The conversation sent for `payload` (see [`crate::executor`]): UTF-8 text is the user
/// message, a JSON object with `messages` is the conversation; a system message carrying
/// the strategies is prepended, or the strategies are appended to the conversation's own
/// leading system message. A system prompt that renders empty is left out.
pub fn build_messages(
    spec: &LlmSpec,
    payload: &[u8],
    patterns: &[PatternHit],
) -> Result<Vec<Value>, String> {
    let text = std::str::from_utf8(payload).map_err(|_| {
        "the payload is neither UTF-8 text nor a JSON object with `messages`".to_owned()
    })?;
    let strategies = render_patterns(patterns);
    let mut messages = match conversation(text)? {
        Some(m) => m,
        None => vec![json!({ "role": "user", "content": text })],
    };
    let first_is_system = messages
        .first()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        == Some("system");
    if first_is_system {
        if let Some(first) = messages.first_mut().and_then(Value::as_object_mut) {
            if !strategies.is_empty() {
                append_text(first, &strategies);
            }
        }
    } else {
        let prompt = system_prompt(&spec.system_prompt, &strategies);
        if !prompt.trim().is_empty() {
            messages.insert(0, json!({ "role": "system", "content": prompt }));
        }
    }
    Ok(messages)
}

/// Appends `text` to a message's content: after a blank line for a string, as one more
/// text part for an array of parts.
fn append_text(message: &mut Map<String, Value>, text: &str) {
    match message.get_mut("content") {
        Some(Value::String(s)) if !s.trim().is_empty() => {
            s.push_str("\n\n");
            s.push_str(text);
        }
        Some(Value::Array(parts)) => parts.push(json!({ "type": "text", "text": text })),
        _ => {
            message.insert("content".into(), Value::String(text.to_owned()));
        }
    }
}

/// The conversation of a JSON payload `{"messages": [{role, content}, …]}`; `None` when
/// the payload is not such an object (then it is the user's text).
fn conversation(text: &str) -> Result<Option<Vec<Value>>, String> {
    if !text.trim_start().starts_with('{') {
        return Ok(None);
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(text) else {
        return Ok(None);
    };
    let Some(messages) = obj.remove("messages") else {
        return Ok(None);
    };
    if let Some(key) = obj.keys().next() {
        return Err(format!(
            "the payload's key `{key}` is not understood (a JSON payload holds only `messages`)"
        ));
    }
    let Value::Array(messages) = messages else {
        return Err("`messages` must be an array of {role, content} objects".into());
    };
    if messages.is_empty() {
        return Err("`messages` is empty".into());
    }
    for (i, m) in messages.iter().enumerate() {
        let Some(o) = m.as_object() else {
            return Err(format!("`messages[{i}]` is not an object"));
        };
        if o.get("role")
            .and_then(Value::as_str)
            .is_none_or(|r| r.trim().is_empty())
        {
            return Err(format!(
                "`messages[{i}]` has no `role` (a non-empty string)"
            ));
        }
        if !matches!(o.get("content"), Some(Value::String(_) | Value::Array(_))) {
            return Err(format!(
                "`messages[{i}]` has no `content` (a string, or an array of parts)"
            ));
        }
    }
    Ok(Some(messages))
}

/// The chat completions request.
pub fn request_body(spec: &LlmSpec, messages: Vec<Value>) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), Value::String(spec.model.clone()));
    body.insert("messages".into(), Value::Array(messages));
    if let Some(t) = spec.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if let Some(m) = spec.max_tokens {
        body.insert("max_tokens".into(), json!(m));
    }
    body.insert("stream".into(), Value::Bool(spec.stream));
    if spec.stream {
        body.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    Value::Object(body)
}

/// The delay before retry number `retry + 1`: [`BACKOFF_START`] doubled `retry` times,
/// at most [`BACKOFF_CAP`], then jittered down by up to half (`jitter` in `0..1`).
pub(crate) fn backoff(retry: u32, jitter: f64) -> Duration {
    let factor = 1u32.checked_shl(retry.min(16)).unwrap_or(u32::MAX);
    let base = BACKOFF_START.saturating_mul(factor).min(BACKOFF_CAP);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    base.mul_f64(1.0 - 0.5 * jitter)
}

/// A response's `Retry-After`: a number of seconds, or an HTTP date (IMF-fixdate, e.g.
/// `Sun, 06 Nov 1994 08:49:37 GMT`; a date already past means now). `None` when absent
/// or unreadable (the obsolete date forms included).
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = v.parse().ok()?;
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = parse_http_date(v)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub(crate) fn parse_http_date(s: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [weekday, day, month, year, time, zone] = parts.as_slice() else {
        return None;
    };
    if !weekday.ends_with(',') || *zone != "GMT" || day.len() != 2 || year.len() != 4 {
        return None;
    }
    let day: u32 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let month = u32::try_from(MONTHS.iter().position(|m| m == month)? + 1).ok()?;
    let year: i64 = year.parse().ok().filter(|y| *y >= 1970)?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|p| if p.len() == 2 { p.parse().ok() } else { None })
        .collect::<Option<Vec<u64>>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days from 1970-01-01 to the given date (proleptic Gregorian calendar).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LlmSpec {
        LlmSpec::new("http://127.0.0.1:1/v1".parse().unwrap(), "m")
    }

    fn pattern(title: &str, outcome: &str, confidence: f64) -> PatternHit {
        PatternHit {
            id: format!("pat-{title}"),
            title: title.into(),
            description: "when\nthe build breaks".into(),
            content: "Pin the toolchain.\nThen retry.".into(),
            outcome: outcome.into(),
            confidence,
            score: 0.9,
        }
    }

    #[test]
    fn patterns_render_as_strategies() {
        assert_eq!(render_patterns(&[]), "");
        let text = render_patterns(&[
            pattern("Pin", "success", 0.75),
            pattern("Guess", "failure", 0.125),
        ]);
        assert_eq!(
            text,
            "Strategies retrieved from similar earlier tasks (use what fits; one learnt from \
             a failure shows what to avoid):\n\
             - Pin: when the build breaks\n  Pin the toolchain.\n  Then retry.\n  \
             (learnt from a success; confidence 0.75)\n\
             - Guess: when the build breaks\n  Pin the toolchain.\n  Then retry.\n  \
             (learnt from a failure; confidence 0.12)"
        );
    }

    #[test]
    fn system_prompts_take_the_strategies() {
        assert_eq!(system_prompt("A\n{patterns}", ""), "A");
        assert_eq!(system_prompt("A\n{patterns}\nB", "S"), "A\nS\nB");
        assert_eq!(system_prompt("A", "S"), "A\n\nS");
        assert_eq!(system_prompt("A\n", ""), "A");
        assert_eq!(system_prompt("{patterns}", ""), "");
    }

    #[test]
    fn text_payloads_are_the_user_message() {
        let msgs = build_messages(&spec(), b"Summarize this.", &[]).unwrap();
        assert_eq!(
            msgs,
            vec![
                json!({"role": "system", "content": system_prompt(DEFAULT_SYSTEM_PROMPT, "")}),
                json!({"role": "user", "content": "Summarize this."}),
            ]
        );
        // With patterns, the system prompt carries them.
        let p = [pattern("Pin", "success", 0.5)];
        let msgs = build_messages(&spec(), b"x", &p).unwrap();
        let system = msgs[0]["content"].as_str().unwrap();
        assert!(system.starts_with("You are an agent"), "{system}");
        assert!(system.contains("- Pin: when the build breaks"), "{system}");
        // A template that renders empty sends no system message.
        let mut s = spec();
        s.system_prompt = "{patterns}".into();
        let msgs = build_messages(&s, b"x", &[]).unwrap();
        assert_eq!(msgs, vec![json!({"role": "user", "content": "x"})]);
        // JSON that is not a conversation is text too.
        for text in [r#"{"a": 1}"#, "[1, 2]", "{not json"] {
            let msgs = build_messages(&s, text.as_bytes(), &[]).unwrap();
            assert_eq!(msgs, vec![json!({"role": "user", "content": text})]);
        }
    }

    #[test]
    fn conversations_get_the_system_prompt_or_the_strategies() {
        let p = [pattern("Pin", "success", 0.5)];
        let payload = br#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"}, {"role": "user", "content": "go"}]}"#;
        let msgs = build_messages(&spec(), payload, &p).unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0]["role"], "system");
        assert!(msgs[0]["content"]
            .as_str()
            .unwrap()
            .contains("Pin the toolchain"));
        assert_eq!(msgs[3], json!({"role": "user", "content": "go"}));

        // The conversation's own system message gets the strategies appended.
        let payload =
            br#"{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "go", "name": "bob"}]}"#;
        let msgs = build_messages(&spec(), payload, &p).unwrap();
        assert_eq!(msgs.len(), 2);
        let system = msgs[0]["content"].as_str().unwrap();
        assert!(
            system.starts_with("Be terse.\n\nStrategies retrieved"),
            "{system}"
        );
        assert_eq!(msgs[1]["name"], "bob", "other fields pass through");
        // ... and nothing without patterns.
        let msgs = build_messages(&spec(), payload, &[]).unwrap();
        assert_eq!(msgs[0]["content"], "Be terse.");
        // Content parts: one more text part.
        let payload = br#"{"messages": [{"role": "system", "content": [{"type": "text", "text": "A"}]}, {"role": "user", "content": "go"}]}"#;
        let msgs = build_messages(&spec(), payload, &p).unwrap();
        assert_eq!(msgs[0]["content"].as_array().unwrap().len(), 2);
        assert_eq!(msgs[0]["content"][1]["type"], "text");
    }

    #[test]
    fn bad_payloads() {
        for (payload, needle) in [
            (&b"\xff\xfe"[..], "UTF-8"),
            (br#"{"messages": "hi"}"#, "must be an array"),
            (br#"{"messages": []}"#, "is empty"),
            (br#"{"messages": [1]}"#, "`messages[0]` is not an object"),
            (
                br#"{"messages": [{"content": "x"}]}"#,
                "`messages[0]` has no `role`",
            ),
            (
                br#"{"messages": [{"role": "user", "content": "x"}, {"role": "user"}]}"#,
                "`messages[1]` has no `content`",
            ),
            (
                br#"{"messages": [{"role": "user", "content": "x"}], "model": "y"}"#,
                "key `model` is not understood",
            ),
        ] {
            let err = build_messages(&spec(), payload, &[]).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn request_bodies() {
        let mut s = spec();
        let body = request_body(&s, vec![json!({"role": "user", "content": "x"})]);
        assert_eq!(
            body,
            json!({
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
        s.stream = false;
        s.temperature = Some(0.5);
        s.max_tokens = Some(64);
        let body = request_body(&s, vec![]);
        assert_eq!(
            body,
            json!({"model": "m", "messages": [], "temperature": 0.5, "max_tokens": 64, "stream": false})
        );
    }

    fn feed(sse: &mut Sse, parts: &[&[u8]]) -> Vec<String> {
        let mut events = Vec::new();
        for p in parts {
            sse.push(p, &mut events).unwrap();
        }
        events
    }

    #[test]
    fn sse_events_across_chunks_and_line_endings() {
        let mut sse = Sse::new(1024);
        let events = feed(
            &mut sse,
            &[
                b": comment\n\ndata: {\"a\"",
                b":1}\n\nevent: x\nid: 7\ndata:two\r\ndata: lines\r",
                b"\n\r\ndata: three\r\rdata: [DONE]\n",
                b"\n",
            ],
        );
        assert_eq!(events, ["{\"a\":1}", "two\nlines", "three", "[DONE]"]);
        // An unterminated last event still counts at the end of the stream.
        let mut sse = Sse::new(1024);
        let mut events = feed(&mut sse, &[b"data: tail"]);
        assert!(events.is_empty());
        sse.finish(&mut events);
        assert_eq!(events, ["tail"]);
        // A multi-byte character split across chunks.
        let mut sse = Sse::new(1024);
        let e = "data: é\n\n".as_bytes();
        assert_eq!(feed(&mut sse, &[&e[..7], &e[7..]]), ["é"]);
    }

    #[test]
    fn sse_limits_and_bad_bytes() {
        let mut sse = Sse::new(8);
        let mut events = Vec::new();
        assert_eq!(
            sse.push(b"data: 0123456789", &mut events),
            Err(SseError::TooLarge)
        );
        let mut sse = Sse::new(8);
        assert_eq!(
            sse.push(b"data: 1234\ndata: 5678\n", &mut events),
            Err(SseError::TooLarge)
        );
        let mut sse = Sse::new(64);
        assert_eq!(
            sse.push(b"data: \xff\n", &mut events),
            Err(SseError::NotUtf8)
        );
    }

    #[test]
    fn retry_after_values() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&m, now)
        };
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
        assert_eq!(h("1"), Some(Duration::from_secs(1)));
        assert_eq!(h(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(h("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(
            h("Sun, 06 Nov 1994 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(h("Sun, 06 Nov 1994 08:49:00 GMT"), Some(Duration::ZERO));
        for bad in [
            "soon",
            "-1",
            "1e400",
            "NaN",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 CET",
            "Sun, 06 Nox 1994 08:49:37 GMT",
            "18446744073709551616",
        ] {
            assert_eq!(h(bad), None, "{bad}");
        }
    }

    #[test]
    fn http_dates() {
        let at = |s| {
            parse_http_date(s)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(at("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(at("Tue, 29 Feb 2000 12:00:00 GMT"), Some(951_825_600));
        assert_eq!(at("Wed, 31 Dec 1969 23:59:59 GMT"), None);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_down_by_half() {
        assert_eq!(backoff(0, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(0, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(10, 0.0), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX, 0.0), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX, 0.5), Duration::from_secs(15));
        assert_eq!(backoff(2, f64::NAN), Duration::from_secs(2));
        for i in 0..40 {
            let d = backoff(i, rand::random());
            assert!(d >= BACKOFF_START / 2 && d <= BACKOFF_CAP, "{d:?}");
        }
    }
}
