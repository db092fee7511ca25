//! JSON bodies of the coordinator's HTTP API (`/v1/*`), shared with the `swarm` CLI.
//!
//! Payloads and outputs are bytes. In JSON they appear as `payload`/`output` when they
//! are valid UTF-8 and as `payload_base64`/`output_base64` otherwise. On submit, a JSON
//! string `payload` is delivered as its UTF-8 text; any other JSON value is delivered as
//! its compact serialization.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::TaskId;

/// `POST /v1/tasks` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    /// Name of the agent to run (`echo`, `sleep`, or one from the worker's agents file).
    /// Omitted for a ring swarm, whose stages name the agents.
    #[serde(default)]
    pub agent: String,
    /// The swarm to run in (default: `default`, a star of every worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swarm: Option<String>,
    /// The task's input as JSON (a string is delivered as its text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// The task's input as base64 bytes; exclusive with `payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Higher runs first. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Per-attempt timeout. Default: the coordinator's `--default-timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts before the task is given up. Default: the coordinator's `--default-max-attempts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Submitting twice with the same key yields one task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Labels a worker must carry to run this task.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Hand the agent this many ReasoningBank patterns retrieved by the payload text
    /// (the outcome is then judged against them). Default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patterns: u32,
    /// How long the finished task stays readable (and its idempotency key dedupes)
    /// before it is purged. Default: the coordinator's `--retain-finished`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_ms: Option<u64>,
    /// Tasks this one runs after: it waits (`waiting`) until all have succeeded, and is
    /// cancelled with `dependency_failed` if one ends otherwise. Its agent then receives
    /// `{"payload": …, "parents": {"<step or id>": <output>, …}}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<TaskId>,
    /// Tasks with the same key share the key's limit on running tasks (a tenant, an LLM
    /// provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// The named rate limit each start of this task draws from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// Hold the task in `awaiting_approval` (a graph step: once its parents have
    /// succeeded) until `POST /v1/tasks/{id}/approve` queues it or `/reject` cancels it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub requires_approval: bool,
    /// With `requires_approval`: fail the task (`approval_timeout`) if no decision came
    /// this long after it began awaiting approval. Default: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_timeout_ms: Option<u64>,
    /// POST the task's view (`{"event": "task.finished", "task": …}`) to this `http` or
    /// `https` URL when it reaches a final state, signed with the cluster's callback
    /// secret (`Swarm-Signature`) and retried with backoff until a 2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `POST /v1/tasks/{id}/approve` and `/reject` body (optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDecision {
    /// Recorded with the decision (at most 1,024 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// A task's approval (`TaskView::approval`): its deadline and the decision, once made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalView {
    /// How long it may await approval (absent: no deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// When it fails unless decided (set once it awaits approval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The decision, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionView>,
}

/// Who approved or rejected a task, when, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionView {
    pub approved: bool,
    /// The name of the token (principal) that decided.
    pub by: String,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// `POST /v1/graphs` body: named steps with edges, committed together (all or none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitGraph {
    pub steps: Vec<GraphStepRequest>,
}

/// One step of a [`SubmitGraph`]: a task, its step name and the steps it runs after.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphStepRequest {
    /// The step's name, unique in the graph (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Names of the steps this one runs after (the graph must have no cycle).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// The step's task (its `depends_on` may name existing tasks too).
    pub task: SubmitTask,
}

/// Reply to a graph submit: each step's task id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitGraphResponse {
    pub steps: BTreeMap<String, TaskId>,
    /// True when every step already existed under its idempotency key.
    pub duplicate: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl SubmitTask {
    /// The payload bytes the agent will receive.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.payload, &self.payload_base64) {
            (Some(_), Some(_)) => Err("give either `payload` or `payload_base64`, not both".into()),
            (None, None) => Ok(Vec::new()),
            (Some(serde_json::Value::String(s)), None) => Ok(s.clone().into_bytes()),
            (Some(v), None) => Ok(v.to_string().into_bytes()),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| format!("`payload_base64` is not valid base64: {e}")),
        }
    }
}

/// `POST /v1/tasks/batch` body: up to the server's batch limit of tasks, committed together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBatch {
    pub tasks: Vec<SubmitTask>,
}

/// Reply to a submit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub id: TaskId,
    /// True when an earlier task with the same idempotency key was returned instead.
    pub duplicate: bool,
    /// The task, when the submit asked to wait for it (`?wait=…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskView>,
}

/// Reply to a batch submit, in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitBatchResponse {
    pub tasks: Vec<SubmitResponse>,
}

/// Lifecycle of a task. `succeeded`, `failed`, `cancelled` and `dead_lettered` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    /// The agent failed on its last allowed attempt, or failed in a way no retry can fix.
    Failed,
    Cancelled,
    /// Every allowed attempt was lost to infrastructure (worker lost, lease expired).
    DeadLettered,
    /// Waiting for its graph parents to succeed; then it is queued. (Appended: states
    /// recorded before it keep their encoding.)
    Waiting,
    /// Held until an operator approves it (then queued) or rejects it (then cancelled);
    /// fails with `approval_timeout` past its deadline. (Appended, like `Waiting`.)
    AwaitingApproval,
}

impl TaskState {
    pub const ALL: [TaskState; 8] = [
        TaskState::Waiting,
        TaskState::AwaitingApproval,
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::DeadLettered,
    ];

    /// True for states a task never leaves.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            TaskState::Waiting
                | TaskState::AwaitingApproval
                | TaskState::Queued
                | TaskState::Running
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::DeadLettered => "dead_lettered",
            TaskState::Waiting => "waiting",
            TaskState::AwaitingApproval => "awaiting_approval",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// One attempt as recorded in the replicated state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    pub attempt: u32,
    /// The ring stage this attempt ran (0 for single-stage tasks).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stage: u32,
    pub worker: String,
    pub started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// `succeeded`, `failed`, `lost`, `cancelled`, `released` (handed back by a draining
    /// worker; not counted against `max_attempts`); absent while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of output the attempt produced (all streams), as its worker reported at its
    /// end; the last of them are kept (`GET /v1/tasks/{id}/logs`). 0 while running.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub output_bytes: u64,
    /// Tokens an `llm` attempt used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
}

/// `GET /v1/tasks/{id}/logs`: the log tail stored with each attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskLogs {
    pub id: TaskId,
    pub state: TaskState,
    pub attempts: Vec<AttemptLog>,
}

/// One attempt's stored log tail (empty while it runs: follow
/// `GET /v1/tasks/{id}/events` for live output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptLog {
    pub attempt: u32,
    #[serde(default)]
    pub stage: u32,
    pub worker: String,
    pub running: bool,
    /// Where the tail starts in the attempt's output: bytes before it were not kept.
    pub offset: u64,
    /// The attempt's whole output length.
    pub output_bytes: u64,
    pub pieces: Vec<LogPieceView>,
}

/// A run of output from one stream (`stdout`, `stderr`, `tokens`, `body`); bytes that
/// are not UTF-8 are replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogPieceView {
    pub stream: String,
    pub text: String,
}

/// `GET /v1/usage`: tokens LLM agents spent, by swarm, agent and model, with each swarm's
/// budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    pub swarms: Vec<SwarmUsageView>,
}

/// One swarm's token usage and budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmUsageView {
    pub swarm: String,
    /// Tokens spent in all (prompt and completion).
    pub tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<u64>,
    /// The budget is spent: the swarm's token-using agents get no new attempt.
    #[serde(default)]
    pub exhausted: bool,
    pub agents: Vec<AgentUsageView>,
}

/// Tokens one agent spent with one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentUsageView {
    pub agent: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub attempts: u64,
}

/// `PUT /v1/swarms/{name}/budget`: the most tokens the swarm's agents may spend in all;
/// `null` clears it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetBudget {
    pub tokens: Option<u64>,
}

/// Tokens used, as a model's server counted them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageView {
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// A task as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: TaskId,
    pub agent: String,
    pub state: TaskState,
    pub priority: i32,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// ReasoningBank patterns handed to the agent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patterns: u32,
    #[serde(flatten)]
    pub payload: BytesView<PayloadField>,
    pub attempts: Vec<AttemptView>,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub output: Option<BytesView<OutputField>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// When a finished task is purged (its retention ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// The swarm the task runs in.
    #[serde(default = "default_swarm")]
    pub swarm: String,
    /// A ring task's stages (`agent` or `agent[k=v]`), in order; empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    /// The stage the task is at (a finished ring task: the last one).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stage: u32,
    /// Outputs of a ring task's completed stages, in order (as text when UTF-8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_outputs: Vec<String>,
    /// Times a running attempt moved to another worker (mesh steals).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub moves: u32,
    /// Tokens the task's attempts used in all (`llm` agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
    /// Why a queued task is not dispatched now (its swarm's token budget is spent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// Tasks this one runs after (graph parents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<TaskId>,
    /// Tasks that run after this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<TaskId>,
    /// Parents that have not succeeded yet (a `waiting` task).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub waiting_on: u32,
    /// The task's step name in its graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// The task requires approval: its deadline and the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalView>,
    /// The task's callback and how its delivery went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackView>,
}

/// A task's callback (`TaskView::callback`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackView {
    pub url: String,
    /// `pending` (the task has not finished, or the delivery is under way),
    /// `delivered` or `failed` (given up).
    pub state: String,
    /// Attempts made, once the delivery ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The receiver's last answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the delivery ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
}

fn default_swarm() -> String {
    swarm_topology::DEFAULT_SWARM_NAME.to_string()
}

/// Names of the two JSON fields a byte string is shown under.
pub trait BytesFieldNames {
    const TEXT: &'static str;
    const BASE64: &'static str;
}

/// Field names for a task's input.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadField;
impl BytesFieldNames for PayloadField {
    const TEXT: &'static str = "payload";
    const BASE64: &'static str = "payload_base64";
}

/// Field names for a task's result.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputField;
impl BytesFieldNames for OutputField {
    const TEXT: &'static str = "output";
    const BASE64: &'static str = "output_base64";
}

/// Bytes shown as text when they are UTF-8 and as base64 otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct BytesView<F> {
    pub bytes: Vec<u8>,
    _names: std::marker::PhantomData<F>,
}

impl<F> BytesView<F> {
    pub fn new(bytes: Vec<u8>) -> Self {
        BytesView {
            bytes,
            _names: std::marker::PhantomData,
        }
    }

    /// The bytes as text, if they are UTF-8.
    pub fn as_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.bytes).ok()
    }
}

impl<F: BytesFieldNames> Serialize for BytesView<F> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => m.serialize_entry(F::TEXT, text)?,
            Err(_) => m.serialize_entry(
                F::BASE64,
                &base64::engine::general_purpose::STANDARD.encode(&self.bytes),
            )?,
        }
        m.end()
    }
}

impl<'de, F: BytesFieldNames> Deserialize<'de> for BytesView<F> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        if let Some(serde_json::Value::String(text)) = map.get(F::TEXT) {
            return Ok(BytesView::new(text.clone().into_bytes()));
        }
        if let Some(serde_json::Value::String(b)) = map.get(F::BASE64) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(D::Error::custom)?;
            return Ok(BytesView::new(bytes));
        }
        Err(D::Error::custom(format!(
            "missing `{}` or `{}`",
            F::TEXT,
            F::BASE64
        )))
    }
}

/// `GET /v1/tasks` reply.
///
/// The query (every parameter optional; filters combine with AND):
///
/// * `order` — `asc` (default, oldest first) or `desc` (newest first), by id;
/// * `after` — the last id of the previous page, in this listing's order: `asc` lists
///   ids above it, `desc` ids below it (`desc` without `after`, or with `after=0`,
///   starts from the newest);
/// * `limit` — most tasks in the page, 1 to 1000 (default 100);
/// * `state` — only tasks in this state;
/// * `agent` — the task's agent, or for a ring task any of its stages' agents;
/// * `swarm` — the task's swarm, exactly;
/// * `label` — `k=v`, several comma-separated: each must be among the task's labels;
/// * `text` — a substring of the payload, ASCII case-insensitive, UTF-8 payloads only
///   (at most 256 bytes).
///
/// One request examines a bounded number of tasks: with filters, a page may hold fewer
/// than `limit` tasks, or none, and still carry `next_after` (where the scan stopped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskList {
    pub tasks: Vec<TaskView>,
    /// Pass as `after` (with the same `order` and filters) to get the next page; absent
    /// only when the listing is exhausted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<TaskId>,
}

/// The order of a task listing (`GET /v1/tasks?order=`), by task id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOrder {
    /// Oldest first.
    #[default]
    Asc,
    /// Newest first.
    Desc,
}

impl TaskOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskOrder::Asc => "asc",
            TaskOrder::Desc => "desc",
        }
    }

    pub fn parse(s: &str) -> Option<TaskOrder> {
        [TaskOrder::Asc, TaskOrder::Desc]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// A connected worker as the leader sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    pub id: String,
    pub addr: String,
    pub slots: u32,
    pub running: u32,
    pub labels: BTreeMap<String, String>,
    pub agents: Vec<String>,
    pub connected_at_ms: u64,
    pub last_heartbeat_ms: u64,
    /// Whether this connection began with accepted 0-RTT early data.
    pub zero_rtt: bool,
    /// The lead whose connection relays this worker's session; absent for a worker
    /// connected to the coordinator directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The worker is draining: it gets no new work, finishes what it runs and hands back
    /// what it has not started (being stopped, or drained by an operator; see `drain`).
    #[serde(default)]
    pub draining: bool,
    /// Why it is draining; absent when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainKind>,
}

/// Why a worker is draining (`WorkerView::drain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainKind {
    /// It is being stopped (SIGTERM): it leaves once what it runs has ended.
    Stopping,
    /// An operator drained it (`POST /v1/workers/{id}/drain`): it stays connected, and
    /// takes work again when resumed (`POST /v1/workers/{id}/resume`).
    Operator,
}

impl DrainKind {
    /// Stable lower-case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainKind::Stopping => "stopping",
            DrainKind::Operator => "operator",
        }
    }
}

/// `GET /v1/workers` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerList {
    pub workers: Vec<WorkerView>,
}

/// One coordinator as seen by the node answering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: u64,
    pub raft_addr: String,
    pub api_addr: String,
    /// `leader`, `follower`, `candidate`, `learner` or `unknown`.
    pub role: String,
    pub voter: bool,
    /// Highest log index known replicated to this node (leader's view), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_index: Option<u64>,
    /// Entries this node trails the leader's log by (leader's view), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// The node's own report (`GET /v1/node`), when it could be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    /// Why the node could not be asked, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One coordinator's report on itself: `GET /v1/node`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    pub term: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_log_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<u64>,
    /// Last log index covered by the node's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_index: Option<u64>,
    /// Log entries up to here have been compacted away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_index: Option<u64>,
    /// Raft runs and the data directory takes a durable write (what `/health` checks).
    pub healthy: bool,
    /// `ok`, or why the node is unhealthy.
    pub health: String,
    /// A leader is known and the node has applied (almost) all of its log (`/ready`).
    pub ready: bool,
}

/// `POST /v1/cluster/nodes`: add a coordinator (as a learner that catches up, then a voter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNode {
    pub id: u64,
    /// `host:port` of its QUIC endpoint.
    pub raft_addr: String,
    /// `host:port` of its HTTP API.
    pub api_addr: String,
    /// Make it a voter once caught up (default); `false` leaves it a learner.
    #[serde(default = "yes")]
    pub voter: bool,
    /// Dimension of the joining node's pattern embedder, if it says: the cluster refuses
    /// a node whose embedder disagrees with its ReasoningBank (`409
    /// embedder_dimension_mismatch`), which would otherwise build a diverging replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern_dimension: Option<usize>,
}

fn yes() -> bool {
    true
}

/// Raft state of the answering node and its view of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub node_id: u64,
    pub role: String,
    pub term: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_log_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<u64>,
    pub nodes: Vec<NodeView>,
}

/// Task counts by state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Tasks waiting for their graph parents.
    #[serde(default)]
    pub waiting: u64,
    pub queued: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub dead_lettered: u64,
    /// Tasks held until an operator approves or rejects them.
    #[serde(default)]
    pub awaiting_approval: u64,
}

/// Recent throughput measured by the answering node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Tasks that reached a final state in the last 60 s.
    pub finished_last_minute: u64,
    /// `finished_last_minute / 60`.
    pub per_second: f64,
}

/// Submit-to-final latency of the tasks that finished in the last 60 s, read from a
/// log-scale histogram: each figure is an upper bound at most 26% (and 1 ms) above the
/// true one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyView {
    /// Tasks measured.
    pub tasks: u64,
    pub p50_ms: u64,
    pub p90_ms: u64,
    pub p99_ms: u64,
}

/// `GET /v1/status` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub cluster: ClusterView,
    pub workers: Vec<WorkerView>,
    pub queue: QueueCounts,
    pub queue_limit: u64,
    pub throughput: Throughput,
    /// Latency of the last minute's finished tasks (absent when none finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyView>,
    /// The defined swarms with their layouts (the default swarm is left out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swarms: Vec<SwarmView>,
    /// Tokens LLM agents spent, by swarm (only swarms with usage or a budget).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<SwarmUsageView>,
}

/// Every error reply: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A stable machine-readable `code` and a human-readable `message`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    /// Where the leader's API is, for `not_leader` errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_api: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_string_is_delivered_as_text_and_objects_as_json() {
        let mut t = SubmitTask {
            agent: "echo".into(),
            ..Default::default()
        };
        t.payload = Some(serde_json::json!("hi"));
        assert_eq!(t.payload_bytes().unwrap(), b"hi");
        t.payload = Some(serde_json::json!({"a": 1}));
        assert_eq!(t.payload_bytes().unwrap(), br#"{"a":1}"#);
        t.payload_base64 = Some("aGk=".into());
        assert!(t.payload_bytes().is_err());
        t.payload = None;
        assert_eq!(t.payload_bytes().unwrap(), b"hi");
        t.payload_base64 = Some("***".into());
        assert!(t.payload_bytes().unwrap_err().contains("base64"));
    }

    #[test]
    fn unknown_submit_fields_are_rejected() {
        let err =
            serde_json::from_str::<SubmitTask>(r#"{"agent":"echo","priorty":3}"#).unwrap_err();
        assert!(err.to_string().contains("priorty"));
    }

    #[test]
    fn bytes_view_round_trips_text_and_binary() {
        let text: BytesView<OutputField> = BytesView::new(b"hello".to_vec());
        let j = serde_json::to_value(&text).unwrap();
        assert_eq!(j, serde_json::json!({"output": "hello"}));
        let bin: BytesView<OutputField> = BytesView::new(vec![0xff, 0x00]);
        let j = serde_json::to_value(&bin).unwrap();
        assert_eq!(j, serde_json::json!({"output_base64": "/wA="}));
        let back: BytesView<OutputField> = serde_json::from_value(j).unwrap();
        assert_eq!(back.bytes, vec![0xff, 0x00]);
    }

    #[test]
    fn task_state_names_round_trip() {
        for st in TaskState::ALL {
            assert_eq!(TaskState::parse(st.as_str()), Some(st));
            let j = serde_json::to_string(&st).unwrap();
            assert_eq!(j, format!("\"{}\"", st.as_str()));
        }
        assert_eq!(TaskState::parse("nope"), None);
    }
}

/// `POST /v1/swarms` body: define a swarm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateSwarm {
    pub name: String,
    /// `star`, `hierarchical`, `mesh` or `ring`.
    pub topology: String,
    /// Workers carrying all of these labels are members (empty: every worker).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Hierarchical: workers per lead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<u32>,
    /// Mesh: most peer links per worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_degree: Option<u32>,
    /// Ring: the stages in order, each `agent` or `agent[k=v,...]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    /// Attempts a member may hold beyond its slots, queued on the worker. Default: 0,
    /// or 4 for a mesh (whose peers steal from these queues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u32>,
    /// Create the swarm even if no connected worker is a member yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_empty: bool,
}

/// Task counts of one swarm.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmTaskCounts {
    pub queued: u64,
    pub running: u64,
}

/// A swarm as the API shows it: its definition, and its live layout over the workers
/// connected to the leader right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmView {
    pub name: String,
    pub topology: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_degree: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    pub queue_depth: u32,
    pub created_at_ms: u64,
    pub tasks: SwarmTaskCounts,
    /// A ring: the unfinished tasks at each stage, in stage order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_tasks: Vec<SwarmTaskCounts>,
    /// The layout over the connected members; absent when it cannot be planned (see
    /// `problem`) or this node is not the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<swarm_topology::TopologyView>,
    /// Why there is no layout (e.g. a ring stage no connected worker can serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `GET /v1/swarms` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmList {
    pub swarms: Vec<SwarmView>,
}

/// What an API token may do. Each scope includes the ones before it:
/// `read` < `submit` < `operate` < `admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every `GET` view: tasks, status, workers, cluster, memory and pattern reads.
    Read,
    /// `read`, plus submitting tasks.
    Submit,
    /// `submit`, plus cancelling tasks and writing swarms, memory and patterns.
    Operate,
    /// Everything: cluster membership, backup and restore, tokens and certificates.
    Admin,
}

impl Scope {
    /// Every scope, weakest first.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Submit, Scope::Operate, Scope::Admin];

    /// The scope's name in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
        }
    }

    /// Parses a scope's name.
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether a token of this scope may do what `needed` allows.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/tokens` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// A unique name, for people (`ci`, `dashboard`): letters, digits, `.`, `_`, `-`.
    pub name: String,
    pub scope: Scope,
    /// Limit the token to these swarms (its tasks and swarm definitions); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swarms: Vec<String>,
    /// Seconds the token is valid for; absent: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swarms: Vec<String>,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// `POST /v1/tokens` answer: the token itself, shown this once (the cluster keeps only a
/// hash of its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    pub token: String,
}

/// `GET /v1/tokens` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// `POST /v1/certs/revoked` body: refuse this certificate from the next handshake on,
/// and cut the sessions that use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeCert {
    /// The certificate's serial, hex (`swarm certs show` prints it).
    pub serial: String,
    /// Who the certificate names (for the list; not checked).
    #[serde(default)]
    pub subject: String,
    /// When the certificate expires (ms since the epoch): the entry is dropped after it,
    /// as the certificate is refused anyway. Absent: kept until the list is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<u64>,
}

/// A revoked certificate as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokedView {
    pub serial: String,
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<u64>,
    pub revoked_at_ms: u64,
}

/// `GET /v1/certs/revoked` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokedList {
    pub revoked: Vec<RevokedView>,
}

/// `POST /v1/certs/enroll` body (authorized by the cluster's enrollment token): sign
/// a worker certificate for `name` over the key of `csr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The worker's name (its id), starting with the cluster's enrollment prefix.
    pub name: String,
    /// A PKCS#10 certificate signing request, PEM. Only its public key is used.
    pub csr: String,
}

/// `POST /v1/certs/enroll` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The signed worker certificate, PEM.
    pub certificate: String,
    pub serial: String,
    pub not_after_ms: u64,
}

/// `POST /v1/schedules` body: a task submitted on every tick of an interval or a cron
/// expression.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// 1 to 63 characters from `a-z`, `0-9`, `-` and `_`.
    pub name: String,
    /// An interval: `2s`, `5m`, `1h` (at least 1 s); exclusive with `cron`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// A cron expression, evaluated in UTC: five fields (`*/5 * * * *`) or six with
    /// seconds first; exclusive with `every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Ticks missed during an outage: `skip` (default: fire the latest only) or `all`
    /// (fire each, up to `max_catch_up`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<String>,
    /// With `catch_up: all`, most missed ticks fired (default 10, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_catch_up: Option<u32>,
    /// Create it paused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The task each tick submits (no `idempotency_key`: each tick's is
    /// `schedule:<name>:<tick_ms>`).
    pub task: SubmitTask,
}

/// One schedule as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleView {
    pub name: String,
    /// The interval in ms, for an interval schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// The cron expression, for a cron schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// `skip` or `all`.
    pub catch_up: String,
    /// With `catch_up: all`, most missed ticks fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_catch_up: Option<u32>,
    pub paused: bool,
    pub agent: String,
    pub swarm: String,
    pub priority: i32,
    pub created_at_ms: u64,
    /// The next tick (absent when paused, or when the cadence has no further tick).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_tick_ms: Option<u64>,
    /// Ticks that submitted their task.
    pub fired: u64,
    /// Missed ticks not fired (catch-up policy).
    pub skipped: u64,
    /// Ticks whose task was refused (queue full, swarm deleted).
    pub refused: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tick_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task: Option<TaskId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `PUT /v1/limits/{name}` body: a concurrency limit, a rate, or both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetLimit {
    /// Most tasks of one concurrency key running at once: of key `{name}`, and of each
    /// key `{name}:…` that has no limit of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Starts allowed: `N/s`, `N/min`, `N/h` or `N/<ms>ms`, drawn by tasks whose
    /// `rate_limit` is `{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Most starts at once after a quiet spell (default 1: starts evenly spaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// A named limit, as `GET /v1/limits` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitView {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Attempts in flight now by key under this limit's concurrency (on the leader).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub running: BTreeMap<String, u32>,
    /// Queued tasks waiting on this limit's keys or rate.
    #[serde(default)]
    pub queued: u64,
}

/// `GET /v1/limits` answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitList {
    pub limits: Vec<LimitView>,
}

/// `GET /v1/schedules` answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleView>,
}
