//! Distillation: turning a finished task into ReasoningBank items.
//!
//! Distillers are pure producers of [`DistilledItem`] values; nothing here touches the
//! store. The coordinator embeds the items ([`embed_items`]) and proposes a
//! [`crate::MemoryOp::PatternAdd`] with the result.
//!
//! Three distillers:
//! * [`AgentItemsDistiller`] — items the agent itself returned in its result under
//!   `memory_items` (shape: see [`AgentMemoryItem`]);
//! * [`RuleDistiller`] — built-in rules from the agent name, payload summary, outcome and
//!   error text ("what worked" on success, "what to avoid" with the error class on failure);
//! * [`LlmDistiller`] — asks an OpenAI-compatible `/v1/chat/completions` endpoint.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::embed::{openai_endpoint, snippet, BoxFuture, Embedder};
use crate::error::{MemoryError, Result};
use crate::reasoning::{NewPattern, Outcome};

/// What a distiller knows about a finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    /// Task id.
    pub task_id: u64,
    /// Name of the agent that ran it.
    pub agent: String,
    /// Short human-readable summary of the task payload.
    pub payload_summary: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Error text, for failures.
    pub error: Option<String>,
    /// The agent's JSON result, if any (may carry `memory_items`).
    pub result: Option<Value>,
}

/// A distilled item, before embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistilledItem {
    /// Short title.
    pub title: String,
    /// One-line description.
    pub description: String,
    /// The strategy text.
    pub content: String,
    /// Polarity.
    pub outcome: Outcome,
    /// The task it came from.
    pub source_task: Option<u64>,
}

impl DistilledItem {
    /// The text that gets embedded: title, description and content, one per line.
    pub fn embedding_text(&self) -> String {
        format!("{}\n{}\n{}", self.title, self.description, self.content)
    }
}

/// The JSON shape of one entry of `memory_items` in an agent's result (and of the LLM
/// distiller's answer):
///
/// ```json
/// {"memory_items": [
///   {"title": "Pin the toolchain", "description": "CI broke on a new clippy lint",
///    "content": "Use rust-toolchain.toml to pin ...", "outcome": "success"}
/// ]}
/// ```
///
/// `outcome` is optional (`"success"` or `"failure"`; default: the task's outcome);
/// `description` is optional (default: empty). Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentMemoryItem {
    /// Short title (required, non-empty).
    pub title: String,
    /// One-line description.
    #[serde(default)]
    pub description: String,
    /// The strategy text (required, non-empty).
    pub content: String,
    /// `success` / `failure`.
    #[serde(default)]
    pub outcome: Option<String>,
}

/// Most items taken from one task.
pub const MAX_ITEMS_PER_TASK: usize = 16;
const MAX_TITLE_CHARS: usize = 200;
const MAX_DESCRIPTION_CHARS: usize = 600;
const MAX_CONTENT_CHARS: usize = 8000;

fn clip(s: &str, max_chars: usize) -> String {
    let t = s.trim();
    if t.chars().count() <= max_chars {
        t.to_string()
    } else {
        let mut out: String = t.chars().take(max_chars.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses a JSON array of [`AgentMemoryItem`]s into distilled items. Strict: any
/// malformed entry is an error naming its index. At most `max_items` are kept.
pub fn parse_memory_items(
    value: &Value,
    default_outcome: Outcome,
    source_task: Option<u64>,
    max_items: usize,
) -> Result<Vec<DistilledItem>> {
    let Value::Array(entries) = value else {
        return Err(MemoryError::Distill(
            "memory_items must be a JSON array".into(),
        ));
    };
    let mut out = Vec::new();
    for (i, e) in entries.iter().take(max_items).enumerate() {
        let item: AgentMemoryItem = serde_json::from_value(e.clone())
            .map_err(|err| MemoryError::Distill(format!("memory_items[{i}]: {err}")))?;
        if item.title.trim().is_empty() || item.content.trim().is_empty() {
            return Err(MemoryError::Distill(format!(
                "memory_items[{i}]: title and content must be non-empty"
            )));
        }
        let outcome = match &item.outcome {
            None => default_outcome,
            Some(s) => Outcome::parse(s).ok_or_else(|| {
                MemoryError::Distill(format!(
                    "memory_items[{i}]: outcome `{s}` is not success/failure"
                ))
            })?,
        };
        out.push(DistilledItem {
            title: clip(&one_line(&item.title), MAX_TITLE_CHARS),
            description: clip(&one_line(&item.description), MAX_DESCRIPTION_CHARS),
            content: clip(&item.content, MAX_CONTENT_CHARS),
            outcome,
            source_task,
        });
    }
    Ok(out)
}

/// Produces items from a finished task.
pub trait Distiller: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Distils the task into zero or more items.
    fn distill<'a>(&'a self, task: &'a TaskSummary) -> BoxFuture<'a, Result<Vec<DistilledItem>>>;
}

/// Takes the `memory_items` array from the agent's JSON result (none if absent).
#[derive(Debug, Clone, Default)]
pub struct AgentItemsDistiller;

impl AgentItemsDistiller {
    /// Synchronous form of [`Distiller::distill`].
    pub fn distill_sync(&self, task: &TaskSummary) -> Result<Vec<DistilledItem>> {
        match task.result.as_ref().and_then(|r| r.get("memory_items")) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => parse_memory_items(v, task.outcome, Some(task.task_id), MAX_ITEMS_PER_TASK),
        }
    }
}

impl Distiller for AgentItemsDistiller {
    fn name(&self) -> &'static str {
        "agent_items"
    }
    fn distill<'a>(&'a self, task: &'a TaskSummary) -> BoxFuture<'a, Result<Vec<DistilledItem>>> {
        Box::pin(std::future::ready(self.distill_sync(task)))
    }
}

/// Coarse error classes recognised by [`classify_error`].
pub const ERROR_CLASSES: &[&str] = &[
    "timeout",
    "network",
    "permission",
    "not_found",
    "resource_exhausted",
    "rate_limited",
    "invalid_input",
    "crash",
    "nonzero_exit",
    "cancelled",
    "unknown",
];

/// Classifies error text into one of [`ERROR_CLASSES`] by keywords (first match wins,
/// in the order listed).
pub fn classify_error(error: &str) -> &'static str {
    let e = error.to_lowercase();
    let has = |keys: &[&str]| keys.iter().any(|k| e.contains(k));
    if has(&["timed out", "timeout", "deadline exceeded", "time limit"]) {
        "timeout"
    } else if has(&["rate limit", "too many requests", " 429", "throttl"]) {
        "rate_limited"
    } else if has(&[
        "connection refused",
        "connection reset",
        "unreachable",
        "dns",
        "network",
        "broken pipe",
        "no route to host",
        "tls",
    ]) {
        "network"
    } else if has(&[
        "permission denied",
        "forbidden",
        "unauthorized",
        "access denied",
        "eacces",
    ]) {
        "permission"
    } else if has(&[
        "not found",
        "no such file",
        "enoent",
        "does not exist",
        "unknown command",
    ]) {
        "not_found"
    } else if has(&[
        "out of memory",
        "oom-kill",
        "oomkilled",
        "no space left",
        "disk full",
        "resource exhausted",
        "too many open files",
    ]) {
        "resource_exhausted"
    } else if has(&[
        "invalid",
        "parse error",
        "malformed",
        "unexpected token",
        "bad request",
        "schema",
    ]) {
        "invalid_input"
    } else if has(&[
        "panic",
        "segfault",
        "segmentation fault",
        "core dumped",
        "abort",
        "killed by signal",
        "sigsegv",
        "sigkill",
    ]) {
        "crash"
    } else if has(&["cancelled", "canceled", "interrupted"]) {
        "cancelled"
    } else if has(&[
        "exit code",
        "exit status",
        "exited with",
        "non-zero",
        "nonzero",
    ]) {
        "nonzero_exit"
    } else {
        "unknown"
    }
}

fn advice(class: &str) -> &'static str {
    match class {
        "timeout" => "Split the work into smaller steps or raise the time limit, and check for hangs before retrying.",
        "rate_limited" => "Back off and retry with jitter, batch requests, or lower concurrency.",
        "network" => "Check the endpoint address and that the service is up; retry with backoff on transient errors.",
        "permission" => "Check credentials, tokens and file permissions before running the task.",
        "not_found" => "Verify that files, commands, URLs and ids exist before using them.",
        "resource_exhausted" => "Reduce memory or disk use (stream, chunk, clean up) or request more resources.",
        "invalid_input" => "Validate the input format and schema before processing; fix the producer of bad input.",
        "crash" => "Reproduce with the same input, capture the backtrace, and guard the crashing path.",
        "cancelled" => "The task was cancelled; make the work resumable and idempotent.",
        "nonzero_exit" => "Inspect the command's stderr and exit code; check its arguments and environment.",
        _ => "Read the full error, reproduce it in isolation, and add a check for this case.",
    }
}

fn first_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// Short text summary of a JSON result (strings as-is, other values compact).
fn summarize_result(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Object(m) => {
            let mut m = m.clone();
            m.remove("memory_items");
            serde_json::to_string(&Value::Object(m)).unwrap_or_default()
        }
        other => serde_json::to_string(other).unwrap_or_default(),
    };
    clip(&one_line(&s), 300)
}

/// Built-in rule-based distiller: one item per task.
///
/// * success ⇒ "what worked": the agent, the task summary and a summary of the result;
/// * failure ⇒ "what to avoid": the error class ([`classify_error`]), the first line of
///   the error and class-specific advice.
#[derive(Debug, Clone, Default)]
pub struct RuleDistiller;

impl RuleDistiller {
    /// Synchronous form of [`Distiller::distill`].
    pub fn distill_sync(&self, task: &TaskSummary) -> Vec<DistilledItem> {
        let agent = one_line(&task.agent);
        let agent = if agent.is_empty() {
            "agent".to_string()
        } else {
            agent
        };
        let summary = clip(&one_line(&task.payload_summary), 160);
        let about = if summary.is_empty() {
            "task".to_string()
        } else {
            summary.clone()
        };
        let item = match task.outcome {
            Outcome::Success => {
                let result = task
                    .result
                    .as_ref()
                    .map(summarize_result)
                    .unwrap_or_default();
                let mut content =
                    format!("What worked: agent `{agent}` completed this task.\nTask: {about}\n");
                if !result.is_empty() {
                    content.push_str(&format!("Result: {result}\n"));
                }
                content.push_str("Reuse the same agent and approach for similar tasks.");
                DistilledItem {
                    title: clip(&format!("{agent}: what worked — {about}"), MAX_TITLE_CHARS),
                    description: clip(
                        &format!("Successful approach for: {about}"),
                        MAX_DESCRIPTION_CHARS,
                    ),
                    content,
                    outcome: Outcome::Success,
                    source_task: Some(task.task_id),
                }
            }
            Outcome::Failure => {
                let error = task.error.as_deref().unwrap_or("");
                let class = classify_error(error);
                let line = clip(first_line(error), 300);
                let mut content = format!(
                    "What to avoid: agent `{agent}` failed this task ({class}).\nTask: {about}\n"
                );
                if !line.is_empty() {
                    content.push_str(&format!("Error: {line}\n"));
                }
                content.push_str(&format!("Avoid: {}", advice(class)));
                DistilledItem {
                    title: clip(
                        &format!("{agent}: avoid {class} — {about}"),
                        MAX_TITLE_CHARS,
                    ),
                    description: clip(
                        &format!("Failure ({class}) on: {about}"),
                        MAX_DESCRIPTION_CHARS,
                    ),
                    content,
                    outcome: Outcome::Failure,
                    source_task: Some(task.task_id),
                }
            }
        };
        vec![item]
    }
}

impl Distiller for RuleDistiller {
    fn name(&self) -> &'static str {
        "rules"
    }
    fn distill<'a>(&'a self, task: &'a TaskSummary) -> BoxFuture<'a, Result<Vec<DistilledItem>>> {
        Box::pin(std::future::ready(Ok(self.distill_sync(task))))
    }
}

/// Settings of [`LlmDistiller`].
#[derive(Debug, Clone)]
pub struct LlmDistillerConfig {
    /// Base URL of an OpenAI-compatible server (`/v1/chat/completions` is appended).
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Bearer token, if needed.
    pub api_key: Option<String>,
    /// Request timeout.
    pub timeout: Duration,
    /// Most items kept from one answer.
    pub max_items: usize,
}

impl LlmDistillerConfig {
    /// Config with a 60 s timeout and at most 5 items.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        LlmDistillerConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(60),
            max_items: 5,
        }
    }
}

const LLM_SYSTEM_PROMPT: &str = "You distill reusable lessons from finished agent tasks. \
Reply with JSON only, no prose: {\"memory_items\": [{\"title\": string, \"description\": \
one-line string, \"content\": string, \"outcome\": \"success\" | \"failure\"}]}. \
Each item is a short, general, actionable strategy: what worked (success) or what to \
avoid (failure). Do not include secrets or task-specific ids. Return at most 3 items; \
return {\"memory_items\": []} if there is nothing reusable.";

/// Asks an LLM (OpenAI-compatible `/v1/chat/completions`) to distil items, and parses
/// them from the JSON reply (fenced or bare; an array or `{"memory_items": [...]}`).
#[derive(Debug, Clone)]
pub struct LlmDistiller {
    client: reqwest::Client,
    endpoint: String,
    cfg: LlmDistillerConfig,
}

impl LlmDistiller {
    /// A client for the configured endpoint.
    pub fn new(cfg: LlmDistillerConfig) -> Result<Self> {
        if cfg.max_items == 0 {
            return Err(MemoryError::InvalidParams(
                "max_items must be positive".into(),
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| MemoryError::Distill(format!("cannot build HTTP client: {e}")))?;
        Ok(LlmDistiller {
            client,
            endpoint: openai_endpoint(&cfg.base_url, "chat/completions"),
            cfg,
        })
    }

    /// The full endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The chat request body sent for a task.
    pub fn request_body(&self, task: &TaskSummary) -> Value {
        let user = serde_json::json!({
            "agent": task.agent,
            "task": task.payload_summary,
            "outcome": task.outcome.as_str(),
            "error": task.error.as_deref().map(|e| clip(e, 2000)),
            "result": task.result.as_ref().map(summarize_result),
        });
        serde_json::json!({
            "model": self.cfg.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": LLM_SYSTEM_PROMPT},
                {"role": "user", "content": user.to_string()},
            ],
        })
    }

    async fn distill_async(&self, task: &TaskSummary) -> Result<Vec<DistilledItem>> {
        let mut req = self
            .client
            .post(&self.endpoint)
            .json(&self.request_body(task));
        if let Some(key) = &self.cfg.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| MemoryError::Distill(format!("POST {}: {e}", self.endpoint)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| MemoryError::Distill(format!("reading response: {e}")))?;
        if !status.is_success() {
            return Err(MemoryError::Distill(format!(
                "HTTP {status}: {}",
                snippet(&text)
            )));
        }
        let body: Value = serde_json::from_str(&text).map_err(|e| {
            MemoryError::Distill(format!("bad response JSON ({e}): {}", snippet(&text)))
        })?;
        let content = body
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                MemoryError::Distill("response has no choices[0].message.content".into())
            })?;
        parse_llm_items(content, task, self.cfg.max_items)
    }
}

/// Extracts items from an LLM reply: strips Markdown code fences, takes the outermost
/// JSON value, accepts a bare array or an object with `memory_items` (or `items`).
pub fn parse_llm_items(
    content: &str,
    task: &TaskSummary,
    max_items: usize,
) -> Result<Vec<DistilledItem>> {
    let start = content.find(['{', '[']);
    let end = content.rfind(['}', ']']);
    let json = match (start, end) {
        (Some(s), Some(e)) if e > s => &content[s..=e],
        _ => {
            return Err(MemoryError::Distill(format!(
                "no JSON in reply: {}",
                snippet(content)
            )))
        }
    };
    let v: Value = serde_json::from_str(json).map_err(|e| {
        MemoryError::Distill(format!("reply is not valid JSON ({e}): {}", snippet(json)))
    })?;
    let items = match &v {
        Value::Array(_) => &v,
        Value::Object(m) => m
            .get("memory_items")
            .or_else(|| m.get("items"))
            .ok_or_else(|| MemoryError::Distill("reply object has no memory_items".into()))?,
        _ => {
            return Err(MemoryError::Distill(
                "reply is neither an array nor an object".into(),
            ))
        }
    };
    parse_memory_items(items, task.outcome, Some(task.task_id), max_items)
}

impl Distiller for LlmDistiller {
    fn name(&self) -> &'static str {
        "llm"
    }
    fn distill<'a>(&'a self, task: &'a TaskSummary) -> BoxFuture<'a, Result<Vec<DistilledItem>>> {
        Box::pin(self.distill_async(task))
    }
}

/// Embeds distilled items (title, description and content) into [`NewPattern`]s ready
/// for a [`crate::MemoryOp::PatternAdd`].
pub async fn embed_items(
    embedder: &dyn Embedder,
    items: &[DistilledItem],
) -> Result<Vec<NewPattern>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let texts: Vec<String> = items.iter().map(DistilledItem::embedding_text).collect();
    let vectors = embedder.embed(&texts).await?;
    if vectors.len() != items.len() {
        return Err(MemoryError::Embedding(format!(
            "embedder returned {} vectors for {} texts",
            vectors.len(),
            items.len()
        )));
    }
    Ok(items
        .iter()
        .zip(vectors)
        .map(|(it, embedding)| NewPattern {
            title: it.title.clone(),
            description: it.description.clone(),
            content: it.content.clone(),
            embedding,
            source_task: it.source_task,
            outcome: it.outcome,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(outcome: Outcome, error: Option<&str>, result: Option<Value>) -> TaskSummary {
        TaskSummary {
            task_id: 7,
            agent: "builder".into(),
            payload_summary: "cargo build --release of swarm".into(),
            outcome,
            error: error.map(str::to_string),
            result,
        }
    }

    #[test]
    fn classifies_errors() {
        assert_eq!(classify_error("operation timed out after 30s"), "timeout");
        assert_eq!(
            classify_error("Connection refused (os error 111)"),
            "network"
        );
        assert_eq!(
            classify_error("open /etc/x: Permission denied"),
            "permission"
        );
        assert_eq!(classify_error("No such file or directory"), "not_found");
        assert_eq!(
            classify_error("thread 'main' panicked at src/x.rs"),
            "crash"
        );
        assert_eq!(
            classify_error("process exited with exit code 2"),
            "nonzero_exit"
        );
        assert_eq!(classify_error("HTTP 429 Too Many Requests"), "rate_limited");
        assert_eq!(classify_error("something odd"), "unknown");
        for c in ERROR_CLASSES {
            assert!(!advice(c).is_empty());
        }
    }

    #[test]
    fn rule_distiller_success_and_failure() {
        let ok = RuleDistiller.distill_sync(&task(
            Outcome::Success,
            None,
            Some(serde_json::json!({"artifact": "target/release/swarm"})),
        ));
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].outcome, Outcome::Success);
        assert!(ok[0].title.contains("what worked"));
        assert!(ok[0].content.contains("target/release/swarm"));
        assert_eq!(ok[0].source_task, Some(7));
        let bad = RuleDistiller.distill_sync(&task(
            Outcome::Failure,
            Some("error: linker `cc` not found\nmore"),
            None,
        ));
        assert_eq!(bad[0].outcome, Outcome::Failure);
        assert!(bad[0].title.contains("avoid not_found"), "{}", bad[0].title);
        assert!(bad[0].content.contains("linker `cc` not found"));
        assert!(!bad[0].content.contains("more"));
    }

    #[test]
    fn agent_items_parse_and_validate() {
        let t = task(
            Outcome::Success,
            None,
            Some(serde_json::json!({"memory_items": [
                {"title": "Pin toolchain", "description": "multi\nline", "content": "Use rust-toolchain.toml"},
                {"title": "Avoid nightly", "content": "nightly broke", "outcome": "failure", "extra": 1}
            ]})),
        );
        let items = AgentItemsDistiller.distill_sync(&t).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].outcome, Outcome::Success);
        assert_eq!(items[0].description, "multi line");
        assert_eq!(items[1].outcome, Outcome::Failure);
        assert!(AgentItemsDistiller
            .distill_sync(&task(Outcome::Success, None, None))
            .unwrap()
            .is_empty());
        let bad = task(
            Outcome::Success,
            None,
            Some(serde_json::json!({"memory_items": [{"title": "x"}]})),
        );
        let err = AgentItemsDistiller.distill_sync(&bad).unwrap_err();
        assert_eq!(err.code(), "distill_failed");
        assert!(err.to_string().contains("memory_items[0]"));
        let bad = task(
            Outcome::Success,
            None,
            Some(serde_json::json!({"memory_items": {"a": 1}})),
        );
        assert!(AgentItemsDistiller.distill_sync(&bad).is_err());
        let bad = task(
            Outcome::Success,
            None,
            Some(
                serde_json::json!({"memory_items": [{"title": "t", "content": "c", "outcome": "meh"}]}),
            ),
        );
        assert!(AgentItemsDistiller.distill_sync(&bad).is_err());
    }

    #[test]
    fn llm_reply_parsing() {
        let t = task(Outcome::Failure, Some("boom"), None);
        let fenced = "Here you go:\n```json\n{\"memory_items\": [{\"title\": \"T\", \"description\": \"D\", \"content\": \"C\", \"outcome\": \"failure\"}]}\n```";
        let items = parse_llm_items(fenced, &t, 5).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].title, "T");
        let bare =
            "[{\"title\": \"A\", \"content\": \"B\"}, {\"title\": \"C\", \"content\": \"D\"}]";
        let items = parse_llm_items(bare, &t, 1).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].outcome, Outcome::Failure);
        assert!(parse_llm_items("no json here", &t, 5).is_err());
        assert!(parse_llm_items("{\"other\": []}", &t, 5).is_err());
    }
}
