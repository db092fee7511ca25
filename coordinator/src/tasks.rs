//! Tasks as clients see them: a submit request becomes a checked [`TaskSpec`] and an
//! [`Op::Submit`] (defaults, limits, admission to the queue), reads go through
//! [`linearizable`], and a cancel reaches the worker running the task.
//!
//! A refused submit changes nothing: every check here runs before anything is proposed,
//! and the queue limit is checked again, authoritatively, when the submit applies.

use std::sync::Arc;
use std::time::Duration;

use swarm_proto::api::{
    SubmitBatch, SubmitBatchResponse, SubmitGraph, SubmitGraphResponse, SubmitResponse, SubmitTask,
    TaskList, TaskOrder, TaskState, TaskView,
};
use swarm_proto::TaskId;

use crate::commit::{linearizable, CommitError};
use crate::limits::{ENTRY_BUDGET, MAX_OP_BYTES};
use crate::node::{now_ms, Node};
use crate::state::callbacks;
use crate::state::flow::{self, check_step_name, FlowAttr};
use crate::state::{Flow, FlowFault, GraphStep, Lookup, Op, OpResult, SwarmFault, Task, TaskSpec};
use crate::swarms::SwarmError;

/// Why a task request was refused.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The request is malformed or outside the limits.
    #[error("{0}")]
    Invalid(String),
    /// A payload, a task or a batch is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The queue has no room for the submit; nothing was proposed (or the submit was
    /// refused when it applied).
    #[error("queue full: {limit} unfinished tasks; retry later")]
    QueueFull { limit: u64 },
    /// No such task.
    #[error("no task {0}")]
    Unknown(TaskId),
    /// The task finished and was purged when its retention ended.
    #[error(
        "task {0} finished and was purged when its retention ended \
         (`retain_ms` at submit, default --retain-finished)"
    )]
    Expired(TaskId),
    /// The task's swarm refused it (unknown, or deleted meanwhile).
    #[error(transparent)]
    Swarm(#[from] SwarmError),
    /// A batch was refused part-way by a change that happened meanwhile; the message
    /// lists what was committed before it.
    #[error("{0}")]
    Conflict(String),
    /// Not now: retry later (checkpoints behind, the queue filled part-way through a
    /// batch).
    #[error("{0}")]
    Unavailable(String),
    /// The change was not committed, or the read could not be confirmed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A flow control refused the task when it applied (an unknown or failed parent,
    /// too many dependants): nothing was submitted.
    #[error("{}", .0.message)]
    Flow(FlowFault),
    /// A result this code does not expect, or a storage failure.
    #[error("{0}")]
    Internal(String),
}

/// Parse `250ms`, `5s`, `2m`, `3h`, `7d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 500ms, 5s, 2m, 7d"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m, h or d")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// How long a request asked to wait (`?wait=5s`), within the configured maximum.
pub(crate) fn wait_of(node: &Node, wait: Option<&str>) -> Result<Option<Duration>, TaskError> {
    let Some(w) = wait else { return Ok(None) };
    let d = parse_duration(w).map_err(TaskError::Invalid)?;
    let max = node.config().limits.max_wait;
    if d > max {
        return Err(TaskError::Invalid(format!(
            "wait {w} exceeds the maximum of {}s",
            max.as_secs()
        )));
    }
    Ok(Some(d))
}

/// A submit body's spec and its flow controls (`None` when it has none).
struct Submission {
    spec: TaskSpec,
    flow: Option<Flow>,
}

/// Longest concurrency key.
const MAX_KEY_BYTES: usize = 128;

/// Turn a submit body into a spec and flow, applying defaults and limits.
fn to_submission(node: &Node, mut t: SubmitTask) -> Result<Submission, TaskError> {
    let depends_on = std::mem::take(&mut t.depends_on);
    let concurrency_key = t.concurrency_key.take();
    let rate_limit = t.rate_limit.take();
    let requires_approval = std::mem::take(&mut t.requires_approval);
    let approval_timeout_ms = t.approval_timeout_ms.take();
    let callback_url = t.callback_url.take();
    if let Some(url) = &callback_url {
        check_callback_url(node, url)?;
    }
    if approval_timeout_ms.is_some() && !requires_approval {
        return Err(TaskError::Invalid(
            "`approval_timeout_ms` needs `requires_approval: true`".into(),
        ));
    }
    if approval_timeout_ms.is_some_and(|t| t == 0 || t > flow::MAX_APPROVAL_TIMEOUT_MS) {
        return Err(TaskError::Invalid(format!(
            "`approval_timeout_ms` must be between 1 and {} (30 days)",
            flow::MAX_APPROVAL_TIMEOUT_MS
        )));
    }
    if depends_on.len() > flow::MAX_PARENTS {
        return Err(TaskError::Invalid(format!(
            "`depends_on` names at most {} tasks, got {}",
            flow::MAX_PARENTS,
            depends_on.len()
        )));
    }
    if concurrency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_BYTES)
    {
        return Err(TaskError::Invalid(format!(
            "`concurrency_key` must be 1 to {MAX_KEY_BYTES} bytes"
        )));
    }
    if let Some(name) = &rate_limit {
        check_step_name(name).map_err(|_| {
            TaskError::Invalid(format!(
                "`rate_limit` {name:?}: 1 to {} letters, digits, '-', '_' or '.'",
                flow::MAX_STEP_NAME
            ))
        })?;
    }
    if let Some(name) = &rate_limit {
        // Checked against the limits of now: one deleted later lets its tasks run
        // unlimited rather than wait for ever.
        if node.read_table(|t| t.limits().rate_of(name).is_none()) {
            return Err(TaskError::Flow(FlowFault::new(
                "unknown_limit",
                format!("no rate limit named {name:?}; create it first (swarm limits set {name} --rate N/s)"),
            )));
        }
    }
    let spec = to_spec(node, t)?;
    let mut flow = Flow {
        parents: depends_on,
        concurrency_key,
        rate_limit,
        ..Flow::default()
    };
    if requires_approval {
        flow.more.push(FlowAttr::Approval {
            timeout_ms: approval_timeout_ms,
            deadline_ms: None,
        });
    }
    if let Some(url) = callback_url {
        flow.more.push(FlowAttr::Callback { url });
    }
    Ok(Submission {
        spec,
        flow: (!flow.is_empty()).then_some(flow),
    })
}

/// A callback URL must be an absolute `http` or `https` URL with a host, no credentials
/// (they would show in every view of the task: a receiver checks the signature instead),
/// at most [`callbacks::MAX_URL_BYTES`]; and this coordinator must have a secret to sign
/// with.
fn check_callback_url(node: &Node, url: &str) -> Result<(), TaskError> {
    let bad = |why: &str| TaskError::Invalid(format!("`callback_url` {url:?}: {why}"));
    if url.len() > callbacks::MAX_URL_BYTES {
        return Err(bad(&format!(
            "longer than {} bytes",
            callbacks::MAX_URL_BYTES
        )));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("only http and https URLs are called"));
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        return Err(bad("no host"));
    };
    if !node.config().callback_allow.allows(host) {
        return Err(TaskError::Flow(FlowFault::new(
            "callback_not_allowed",
            format!("`callback_url` host {host:?} is not among the coordinators' --callback-allow"),
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(
            "credentials in the URL would show in every view of the task; check the \
             Swarm-Signature header instead",
        ));
    }
    if node.config().callback_secret.is_none() {
        return Err(TaskError::Flow(FlowFault::new(
            "callbacks_disabled",
            "this cluster signs no callbacks: start its coordinators with \
             --callback-secret-file"
                .to_string(),
        )));
    }
    Ok(())
}

/// Turn a submit body into a spec, applying defaults and limits. Flow fields are not
/// taken here (a submit takes them out first, through [`to_submission`]; a schedule's
/// template has none).
pub(crate) fn to_spec(node: &Node, t: SubmitTask) -> Result<TaskSpec, TaskError> {
    if !t.depends_on.is_empty()
        || t.concurrency_key.is_some()
        || t.rate_limit.is_some()
        || t.requires_approval
        || t.approval_timeout_ms.is_some()
        || t.callback_url.is_some()
    {
        return Err(TaskError::Invalid(
            "`depends_on`, `concurrency_key`, `rate_limit`, `requires_approval`, \
             `approval_timeout_ms` and `callback_url` are not taken here"
                .into(),
        ));
    }
    let limits = node.config().limits;
    let defaults = node.config().defaults;
    let swarm = t
        .swarm
        .clone()
        .unwrap_or_else(|| swarm_topology::DEFAULT_SWARM_NAME.to_string());
    let Some(record) = node.read_table(|tb| tb.swarm(&swarm)) else {
        return Err(SwarmError::Unknown(swarm).into());
    };
    let stages = match &record.spec.topology {
        swarm_topology::TopologySpec::Ring { stages } => stages.clone(),
        _ => Vec::new(),
    };
    let mut agent = t.agent.clone();
    if !stages.is_empty() {
        if !agent.is_empty() {
            return Err(TaskError::Invalid(format!(
                "swarm {swarm:?} is a ring: its stages name the agents; omit `agent`"
            )));
        }
        agent = stages[0].agent.clone();
    }
    if agent.is_empty() || agent.len() > 128 {
        return Err(TaskError::Invalid("`agent` must be 1 to 128 bytes".into()));
    }
    let payload = t.payload_bytes().map_err(TaskError::Invalid)?;
    if payload.len() as u64 > limits.max_payload_bytes {
        return Err(TaskError::TooLarge(format!(
            "payload of {} bytes exceeds the limit of {} bytes",
            payload.len(),
            limits.max_payload_bytes
        )));
    }
    let timeout_ms = t.timeout_ms.unwrap_or(defaults.timeout_ms);
    if timeout_ms == 0 || timeout_ms > 7 * 24 * 3600 * 1000 {
        return Err(TaskError::Invalid(
            "`timeout_ms` must be between 1 and 604800000 (7 days)".into(),
        ));
    }
    let max_attempts = t.max_attempts.unwrap_or(defaults.max_attempts);
    if !(1..=100).contains(&max_attempts) {
        return Err(TaskError::Invalid(
            "`max_attempts` must be between 1 and 100".into(),
        ));
    }
    if t.idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 256)
    {
        return Err(TaskError::Invalid(
            "`idempotency_key` must be 1 to 256 bytes".into(),
        ));
    }
    if t.labels.len() > 32
        || t.labels
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 256)
    {
        return Err(TaskError::Invalid(
            "at most 32 `labels`, keys 1-64 bytes, values up to 256 bytes".into(),
        ));
    }
    if t.patterns > MAX_TASK_PATTERNS {
        return Err(TaskError::Invalid(format!(
            "`patterns` is at most {MAX_TASK_PATTERNS}, got {}",
            t.patterns
        )));
    }
    let retain_ms = t
        .retain_ms
        .unwrap_or(node.config().retain_finished.as_millis() as u64);
    if retain_ms > MAX_RETAIN_MS {
        return Err(TaskError::Invalid(format!(
            "`retain_ms` is at most {MAX_RETAIN_MS} (10 years), got {retain_ms}"
        )));
    }
    let spec = TaskSpec {
        agent,
        swarm,
        stages,
        payload,
        priority: t.priority,
        timeout_ms,
        max_attempts,
        idempotency_key: t.idempotency_key,
        labels: t.labels,
        patterns: t.patterns,
        retain_ms,
    };
    if spec.size_hint() > MAX_OP_BYTES {
        return Err(TaskError::TooLarge(format!(
            "the task takes {} bytes; one task is at most {MAX_OP_BYTES} bytes (a Raft entry holds {ENTRY_BUDGET})",
            spec.size_hint()
        )));
    }
    Ok(spec)
}

/// Longest retention a task may ask for.
const MAX_RETAIN_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// The API view of task `id`, wherever it is; [`TaskError::Expired`] once purged.
pub(crate) fn task_view(node: &Node, id: TaskId) -> Result<TaskView, TaskError> {
    match node.table.lookup(id) {
        Ok(Lookup::Found(t)) => Ok(view_of(node, &t)),
        Ok(Lookup::Expired) => Err(TaskError::Expired(id)),
        Ok(Lookup::Unknown) => Err(TaskError::Unknown(id)),
        Err(e) => Err(TaskError::Internal(e.to_string())),
    }
}

/// `t`'s view, saying why it waits if its swarm's token budget holds it.
fn view_of(node: &Node, t: &crate::state::Task) -> TaskView {
    let mut v = t.view();
    if t.state == TaskState::Queued {
        v.held =
            node.read_table(|table| table.ledger().hold_reason(&t.spec.swarm, t.current_agent()));
    }
    v
}

/// Most ReasoningBank patterns one task may ask for.
const MAX_TASK_PATTERNS: u32 = 64;

fn submit_ops(node: &Node, subs: Vec<Submission>) -> Vec<Op> {
    let now = now_ms();
    let queue_limit = node.config().limits.queue_limit;
    subs.into_iter()
        .map(|Submission { spec, flow }| match flow {
            None => Op::Submit {
                spec,
                now_ms: now,
                queue_limit,
            },
            Some(flow) => Op::SubmitFlow {
                spec,
                flow: Box::new(flow),
                now_ms: now,
                queue_limit,
            },
        })
        .collect()
}

impl Submission {
    fn size_hint(&self) -> usize {
        self.spec.size_hint() + self.flow.as_ref().map_or(0, Flow::size_hint)
    }
}

/// Refuses `n` submits (`QueueFull`, before anything is proposed) when the queue has no
/// room for them. The queue limit is checked again when the submits apply (the
/// authoritative, replicated check); this one keeps a refused submit from costing a Raft
/// entry. A single submit with an idempotency key skips it: it may name a task that
/// exists.
fn admit_to_queue(node: &Node, n: usize) -> Result<(), TaskError> {
    let limit = node.config().limits.queue_limit;
    let room = node.read_table(|t| limit.saturating_sub(t.unfinished()));
    if n as u64 > room {
        metrics::counter!("swarm_submit_rejected_total", "reason" => "queue_full")
            .increment(n as u64);
        return Err(TaskError::QueueFull { limit });
    }
    Ok(())
}

/// Longest a submit waits for checkpoints to catch up before it is refused.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(10);

/// Holds a submit while the changes held since the last checkpoint exceed half of
/// `--snapshot-bytes` (twice what triggers a checkpoint): checkpoints are falling behind
/// the applied stream, and the memory those changes take would otherwise grow with
/// throughput × checkpoint time. Admission resumes as soon as a checkpoint lands; after
/// [`CHECKPOINT_WAIT`] the submit is refused (unavailable, nothing committed).
async fn wait_for_checkpoints(node: &Node) -> Result<(), TaskError> {
    let cap = (node.config().snapshot_bytes / 2) as usize;
    if node.table.changes_bytes() <= cap {
        return Ok(());
    }
    metrics::counter!("swarm_submit_held_total", "reason" => "checkpoint_behind").increment(1);
    let deadline = tokio::time::Instant::now() + CHECKPOINT_WAIT;
    while node.table.changes_bytes() > cap {
        if tokio::time::Instant::now() >= deadline {
            return Err(TaskError::Unavailable(format!(
                "state checkpoints are behind (over {cap} bytes of changes held); retry later"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Submit one task; with `wait`, the answer holds the task once it is final (or when
/// `wait` runs out). `duplicate` says an idempotency key named an existing task.
pub(crate) async fn submit(
    node: &Node,
    task: SubmitTask,
    wait: Option<Duration>,
) -> Result<SubmitResponse, TaskError> {
    let sub = to_submission(node, task)?;
    if sub.spec.idempotency_key.is_none() {
        admit_to_queue(node, 1)?;
    }
    wait_for_checkpoints(node).await?;
    let results = node
        .propose_client(submit_ops(node, vec![sub]))
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    node.count_results(&results);
    let (id, duplicate) = match results.first() {
        Some(OpResult::Submitted { id, duplicate }) => (*id, *duplicate),
        Some(OpResult::QueueFull { limit }) => return Err(TaskError::QueueFull { limit: *limit }),
        Some(OpResult::Swarm(Err(f))) => return Err(SwarmError::Fault(f.clone()).into()),
        Some(OpResult::Refused(f)) => return Err(TaskError::Flow(f.clone())),
        Some(OpResult::Restoring) => return Err(CommitError::Restoring.into()),
        other => {
            return Err(TaskError::Internal(format!(
                "unexpected submit result {other:?}"
            )))
        }
    };
    let mut task = None;
    if let Some(wait) = wait {
        node.wait_final(id, wait).await;
        task = Some(task_view(node, id)?);
    }
    Ok(SubmitResponse {
        id,
        duplicate,
        task,
    })
}

/// Submit a batch as one Raft entry: all of it or, when the queue fills or a swarm goes
/// between the checks and the commit, the tasks before that point (the error lists them).
pub(crate) async fn submit_batch(
    node: &Node,
    batch: SubmitBatch,
) -> Result<SubmitBatchResponse, TaskError> {
    let max = node.config().limits.max_batch;
    if batch.tasks.is_empty() || batch.tasks.len() > max {
        return Err(TaskError::Invalid(format!(
            "a batch holds 1 to {max} tasks, got {}",
            batch.tasks.len()
        )));
    }
    let specs = batch
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            to_submission(node, t).map_err(|e| match e {
                TaskError::Invalid(m) => TaskError::Invalid(format!("tasks[{i}]: {m}")),
                TaskError::TooLarge(m) => TaskError::TooLarge(format!("tasks[{i}]: {m}")),
                other => other,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // One batch is one Raft entry (all or nothing), so it must fit one.
    let bytes: usize = specs.iter().map(Submission::size_hint).sum();
    if bytes > MAX_OP_BYTES {
        return Err(TaskError::TooLarge(format!(
            "the batch takes {bytes} bytes; a batch is at most {MAX_OP_BYTES} bytes (one Raft entry holds {ENTRY_BUDGET}): split it"
        )));
    }
    // Refuse the whole batch if it does not fit the queue.
    admit_to_queue(node, specs.len())?;
    wait_for_checkpoints(node).await?;
    let results = node
        .propose_client(submit_ops(node, specs))
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    node.count_results(&results);
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            OpResult::Submitted { id, duplicate } => out.push(SubmitResponse {
                id,
                duplicate,
                task: None,
            }),
            OpResult::Restoring => return Err(CommitError::Restoring.into()),
            // The swarm was deleted between the check and the commit, or a flow control
            // refused the task (a parent failed meanwhile).
            OpResult::Swarm(Err(SwarmFault { message, .. }))
            | OpResult::Refused(FlowFault { message, .. }) => {
                let committed: Vec<String> = out.iter().map(|r| r.id.to_string()).collect();
                return Err(TaskError::Conflict(format!(
                    "{message} part-way through the batch; committed before it: [{}]",
                    committed.join(",")
                )));
            }
            // Another client filled the queue between the check and the commit: the tasks
            // before this one are committed; report honestly which.
            OpResult::QueueFull { limit } => {
                let committed: Vec<String> = out.iter().map(|r| r.id.to_string()).collect();
                return Err(TaskError::Unavailable(format!(
                    "queue full ({limit} unfinished tasks) part-way through the batch; \
                     committed before it filled: [{}]",
                    committed.join(",")
                )));
            }
            other => {
                return Err(TaskError::Internal(format!(
                    "unexpected submit result {other:?}"
                )))
            }
        }
    }
    Ok(SubmitBatchResponse { tasks: out })
}

/// Submit a graph in one entry: every step or none. Steps are ordered so each comes
/// after those it names (a cycle or an unknown step name is refused here, before anything
/// is proposed); the replicated apply checks the shape again.
pub(crate) async fn submit_graph(
    node: &Node,
    graph: SubmitGraph,
) -> Result<SubmitGraphResponse, TaskError> {
    let n = graph.steps.len();
    if n == 0 || n > flow::MAX_GRAPH_STEPS {
        return Err(TaskError::Invalid(format!(
            "a graph holds 1 to {} steps, got {n}",
            flow::MAX_GRAPH_STEPS
        )));
    }
    let mut index = std::collections::BTreeMap::new();
    for (i, s) in graph.steps.iter().enumerate() {
        check_step_name(&s.name).map_err(|f| TaskError::Invalid(f.message))?;
        if index.insert(s.name.clone(), i).is_some() {
            return Err(TaskError::Invalid(format!(
                "step {:?} appears twice",
                s.name
            )));
        }
    }
    let mut after: Vec<Vec<usize>> = Vec::with_capacity(n);
    for s in &graph.steps {
        let mut edges = Vec::with_capacity(s.after.len());
        for a in &s.after {
            let Some(&i) = index.get(a) else {
                return Err(TaskError::Invalid(format!(
                    "step {:?} runs after {a:?}, which is not a step of the graph",
                    s.name
                )));
            };
            if edges.contains(&i) {
                return Err(TaskError::Invalid(format!(
                    "step {:?} names {a:?} twice",
                    s.name
                )));
            }
            edges.push(i);
        }
        after.push(edges);
    }
    let order = topological_order(&after).map_err(|cycle| {
        let names: Vec<&str> = cycle
            .iter()
            .map(|&i| graph.steps[i].name.as_str())
            .collect();
        TaskError::Invalid(format!("the graph has a cycle: {}", names.join(" -> ")))
    })?;
    let mut position = vec![0u32; n];
    for (pos, &i) in order.iter().enumerate() {
        position[i] = pos as u32;
    }
    let mut requests: Vec<Option<swarm_proto::api::GraphStepRequest>> =
        graph.steps.into_iter().map(Some).collect();
    let mut steps = Vec::with_capacity(n);
    for &i in &order {
        let Some(req) = requests[i].take() else {
            return Err(TaskError::Internal("a step ordered twice".into()));
        };
        let name = req.name.clone();
        let sub = to_submission(node, req.task).map_err(|e| match e {
            TaskError::Invalid(m) => TaskError::Invalid(format!("step {name:?}: {m}")),
            TaskError::TooLarge(m) => TaskError::TooLarge(format!("step {name:?}: {m}")),
            other => other,
        })?;
        let mut flow = sub.flow.unwrap_or_default();
        flow.step = Some(name);
        steps.push(GraphStep {
            spec: sub.spec,
            flow,
            after: after[i].iter().map(|&a| position[a]).collect(),
        });
    }
    flow::check_graph(&steps).map_err(|f| TaskError::Invalid(f.message))?;
    let bytes: usize = steps
        .iter()
        .map(|s| s.spec.size_hint() + s.flow.size_hint())
        .sum();
    if bytes > MAX_OP_BYTES {
        return Err(TaskError::TooLarge(format!(
            "the graph takes {bytes} bytes; a graph is at most {MAX_OP_BYTES} bytes (one Raft entry holds {ENTRY_BUDGET})"
        )));
    }
    admit_to_queue(node, n)?;
    wait_for_checkpoints(node).await?;
    let names: Vec<String> = steps
        .iter()
        .map(|s| s.flow.step.clone().unwrap_or_default())
        .collect();
    let op = Op::Graph {
        steps,
        now_ms: now_ms(),
        queue_limit: node.config().limits.queue_limit,
    };
    let results = node
        .propose_client(vec![op])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    node.count_results(&results);
    match results.into_iter().next() {
        Some(OpResult::Graph { ids, duplicate }) => Ok(SubmitGraphResponse {
            steps: names.into_iter().zip(ids).collect(),
            duplicate,
        }),
        Some(OpResult::QueueFull { limit }) => Err(TaskError::QueueFull { limit }),
        Some(OpResult::Swarm(Err(f))) => Err(SwarmError::Fault(f).into()),
        Some(OpResult::Refused(f)) => Err(TaskError::Flow(f)),
        Some(OpResult::Restoring) => Err(CommitError::Restoring.into()),
        other => Err(TaskError::Internal(format!(
            "unexpected graph submit result {other:?}"
        ))),
    }
}

/// An order of the nodes `0..after.len()` in which each comes after the nodes it names
/// (Kahn's algorithm, stable: among ready nodes the earliest listed first); or a cycle.
fn topological_order(after: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = after.len();
    let mut pending: Vec<usize> = after.iter().map(Vec::len).collect();
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, edges) in after.iter().enumerate() {
        for &a in edges {
            dependants[a].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &dependants[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.insert(d);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk back along unfinished edges from a node left over until one repeats.
    let mut at = (0..n).find(|&i| pending[i] > 0).unwrap_or(0);
    let mut seen = vec![usize::MAX; n];
    let mut path = Vec::new();
    while seen[at] == usize::MAX {
        seen[at] = path.len();
        path.push(at);
        at = after[at]
            .iter()
            .copied()
            .find(|&a| pending[a] > 0)
            .unwrap_or(at);
    }
    let mut cycle: Vec<usize> = path[seen[at]..].to_vec();
    cycle.reverse();
    cycle.push(cycle[0]);
    Err(cycle)
}

/// A task id as a client writes it.
pub(crate) fn parse_id(s: &str) -> Result<TaskId, TaskError> {
    s.parse()
        .map_err(|_| TaskError::Invalid(format!("task id must be a number, got {s:?}")))
}

/// Task `id`, read linearizably; with `wait`, once it is final (or `wait` runs out).
pub(crate) async fn get(
    node: &Node,
    id: TaskId,
    wait: Option<Duration>,
) -> Result<TaskView, TaskError> {
    if let Some(wait) = wait {
        node.wait_final(id, wait).await;
    }
    linearizable(node).await?;
    task_view(node, id)
}

/// Most tasks one `GET /v1/tasks` examines, whatever its filters: past it the page ends
/// where the scan stopped (short, even empty, with `next_after` leading on).
pub(crate) const LIST_SCAN_BUDGET: usize = 20_000;

/// Tasks read from the table at a time while a filtered listing scans (the table lock
/// is taken for each chunk, never across them).
pub(crate) const LIST_CHUNK: usize = 1_000;

/// Longest `text` a listing may search for, in bytes.
pub(crate) const MAX_FILTER_TEXT: usize = 256;

/// Most `label` pairs one listing may ask for (a task holds at most 32 labels).
const MAX_FILTER_LABELS: usize = 32;

/// What `GET /v1/tasks` asks, as the query gives it (strings unchecked).
#[derive(Debug, Clone, Default)]
pub(crate) struct ListParams {
    pub state: Option<String>,
    pub order: Option<String>,
    pub after: Option<TaskId>,
    pub limit: Option<usize>,
    pub agent: Option<String>,
    pub swarm: Option<String>,
    pub label: Option<String>,
    pub text: Option<String>,
}

/// The filters of a task listing besides its state, all of them optional, combined with
/// AND. See [`TaskFilter::matches`].
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TaskFilter {
    /// The task's agent, or for a ring task any of its stages' agents.
    agent: Option<String>,
    /// The task's swarm, exactly.
    swarm: Option<String>,
    /// Labels the task must carry, each with this value.
    labels: Vec<(String, String)>,
    /// A substring of the payload, ASCII case-insensitive (UTF-8 payloads only).
    text: Option<TextSearch>,
}

impl TaskFilter {
    /// The filter the query parameters ask for; an empty parameter is no filter.
    /// Refuses (`Invalid`) a `label` that is not `k=v[,k=v...]` and a `text` over
    /// [`MAX_FILTER_TEXT`] bytes.
    pub fn parse(
        agent: Option<&str>,
        swarm: Option<&str>,
        label: Option<&str>,
        text: Option<&str>,
    ) -> Result<TaskFilter, TaskError> {
        let given = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(str::to_string);
        let mut labels = Vec::new();
        if let Some(list) = label.filter(|s| !s.is_empty()) {
            for pair in list.split(',') {
                let Some((k, v)) = pair.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                    return Err(TaskError::Invalid(format!(
                        "bad `label` filter {pair:?}: expected k=v (several comma-separated)"
                    )));
                };
                labels.push((k.to_string(), v.to_string()));
            }
            if labels.len() > MAX_FILTER_LABELS {
                return Err(TaskError::Invalid(format!(
                    "at most {MAX_FILTER_LABELS} `label` filters, got {}",
                    labels.len()
                )));
            }
        }
        let text = match text.filter(|s| !s.is_empty()) {
            Some(t) if t.len() > MAX_FILTER_TEXT => {
                return Err(TaskError::Invalid(format!(
                    "`text` is at most {MAX_FILTER_TEXT} bytes, got {}",
                    t.len()
                )))
            }
            Some(t) => Some(TextSearch::new(t.as_bytes())),
            None => None,
        };
        Ok(TaskFilter {
            agent: given(agent),
            swarm: given(swarm),
            labels,
            text,
        })
    }

    /// Whether every task matches (no filter at all).
    pub fn is_empty(&self) -> bool {
        self.agent.is_none()
            && self.swarm.is_none()
            && self.labels.is_empty()
            && self.text.is_none()
    }

    /// Whether `t` passes every filter given.
    pub fn matches(&self, t: &Task) -> bool {
        let spec = &t.spec;
        if self.swarm.as_ref().is_some_and(|s| spec.swarm != *s) {
            return false;
        }
        if let Some(a) = &self.agent {
            if spec.agent != *a && !spec.stages.iter().any(|st| st.agent == *a) {
                return false;
            }
        }
        if !self
            .labels
            .iter()
            .all(|(k, v)| spec.labels.get(k).is_some_and(|have| have == v))
        {
            return false;
        }
        match &self.text {
            Some(needle) => {
                needle.found_in(&spec.payload) && std::str::from_utf8(&spec.payload).is_ok()
            }
            None => true,
        }
    }
}

/// A search for one ASCII case-insensitive byte string (Knuth-Morris-Pratt over the
/// lower-cased bytes): linear in the text searched, whatever the text and the needle.
#[derive(Debug, Clone, PartialEq)]
struct TextSearch {
    /// The needle, lower-cased (ASCII), not empty.
    needle: Vec<u8>,
    /// `fail[i]`: the length of the longest proper border of `needle[..=i]`.
    fail: Vec<usize>,
}

impl TextSearch {
    fn new(needle: &[u8]) -> TextSearch {
        let needle = needle.to_ascii_lowercase();
        let mut fail = vec![0; needle.len()];
        let mut k = 0;
        for i in 1..needle.len() {
            while k > 0 && needle[i] != needle[k] {
                k = fail[k - 1];
            }
            if needle[i] == needle[k] {
                k += 1;
            }
            fail[i] = k;
        }
        TextSearch { needle, fail }
    }

    fn found_in(&self, hay: &[u8]) -> bool {
        let n = &self.needle;
        if n.is_empty() {
            return true;
        }
        let mut k = 0;
        for &b in hay {
            let b = b.to_ascii_lowercase();
            while k > 0 && b != n[k] {
                k = self.fail[k - 1];
            }
            if b == n[k] {
                k += 1;
                if k == n.len() {
                    return true;
                }
            }
        }
        false
    }
}

/// One page of a listing being scanned: fed chunks of the table's listing in order
/// (each asked for with [`ListScan::next_read`]) until [`ListScan::feed`] says it is
/// done, examining at most its budget of tasks.
#[derive(Debug)]
pub(crate) struct ListScan<'f> {
    filter: &'f TaskFilter,
    limit: usize,
    budget: usize,
    /// The last id examined (the cursor of the next read).
    cursor: Option<TaskId>,
    examined: usize,
    found: Vec<Arc<Task>>,
    /// Set once done: the page's `next_after`.
    next_after: Option<Option<TaskId>>,
}

impl<'f> ListScan<'f> {
    /// A page of at most `limit` tasks passing `filter` after `after`, examining at most
    /// `budget` tasks.
    pub fn new(
        filter: &'f TaskFilter,
        after: Option<TaskId>,
        limit: usize,
        budget: usize,
    ) -> ListScan<'f> {
        let done = (limit == 0 || budget == 0).then_some(after);
        ListScan {
            filter,
            limit,
            budget,
            cursor: after,
            examined: 0,
            found: Vec::new(),
            next_after: done,
        }
    }

    /// The next chunk to read: the tasks after this cursor, this many (`None`: done).
    pub fn next_read(&self) -> Option<(Option<TaskId>, usize)> {
        if self.next_after.is_some() {
            return None;
        }
        let left = self.budget - self.examined;
        let want = if self.filter.is_empty() {
            self.limit - self.found.len()
        } else {
            LIST_CHUNK
        };
        Some((self.cursor, want.min(left).max(1)))
    }

    /// Take the chunk read as [`ListScan::next_read`] asked (`asked` tasks); returns
    /// whether the page is done.
    pub fn feed(&mut self, asked: usize, chunk: Vec<Arc<Task>>) -> bool {
        let exhausted = chunk.len() < asked;
        let total = chunk.len();
        for (i, t) in chunk.into_iter().enumerate() {
            self.examined += 1;
            self.cursor = Some(t.id);
            if self.filter.matches(&t) {
                self.found.push(t);
                if self.found.len() >= self.limit {
                    // Full: the next page starts after its last task, unless nothing
                    // follows it.
                    let last = exhausted && i + 1 == total;
                    self.next_after = Some(if last { None } else { self.cursor });
                    return true;
                }
            }
        }
        if exhausted {
            self.next_after = Some(None);
        } else if self.examined >= self.budget {
            self.next_after = Some(self.cursor);
        }
        self.next_after.is_some()
    }

    /// Tasks examined so far.
    #[cfg(test)]
    pub fn examined(&self) -> usize {
        self.examined
    }

    /// The page: its tasks in order and `next_after` (`None`: the listing is exhausted).
    pub fn finish(self) -> (Vec<Arc<Task>>, Option<TaskId>) {
        (self.found, self.next_after.flatten())
    }
}

/// One page of tasks (see [`TaskList`] for the query), read linearizably: chunks of the
/// table's listing, each under the table lock for its own read only, filtered here,
/// examining at most [`LIST_SCAN_BUDGET`] tasks.
pub(crate) async fn list(node: &Node, q: ListParams) -> Result<TaskList, TaskError> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            TaskError::Invalid(format!("unknown state {s:?}; one of {}", names.join(", ")))
        })?),
    };
    let order = match q.order.as_deref() {
        None | Some("") => TaskOrder::Asc,
        Some(o) => TaskOrder::parse(o)
            .ok_or_else(|| TaskError::Invalid(format!("unknown order {o:?}; one of asc, desc")))?,
    };
    let filter = TaskFilter::parse(
        q.agent.as_deref(),
        q.swarm.as_deref(),
        q.label.as_deref(),
        q.text.as_deref(),
    )?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    // No id is 0: descending "below 0" would always be empty, so it means "from the
    // newest", like no `after`.
    let after = q.after.filter(|&a| !(order == TaskOrder::Desc && a == 0));
    linearizable(node).await?;
    let mut scan = ListScan::new(&filter, after, limit, LIST_SCAN_BUDGET);
    let mut first = true;
    while let Some((cursor, want)) = scan.next_read() {
        if !first {
            // Let the runtime's other tasks in between chunks.
            tokio::task::yield_now().await;
        }
        first = false;
        let chunk = node
            .table
            .list(state, order, cursor, want)
            .map_err(|e| TaskError::Internal(e.to_string()))?;
        scan.feed(want, chunk);
    }
    let (found, next_after) = scan.finish();
    let tasks: Vec<TaskView> = found.iter().map(|t| view_of(node, t)).collect();
    Ok(TaskList { tasks, next_after })
}

/// Run task `id` again (redrive): a `failed` or `dead_lettered` task is queued for a new
/// attempt with a fresh `max_attempts`, its earlier attempts kept. A task in any other
/// state is refused (`Conflict`), naming it.
pub(crate) async fn retry(node: &Node, id: TaskId) -> Result<TaskView, TaskError> {
    let result = node
        .propose_client(vec![Op::Retry {
            task_id: id,
            now_ms: now_ms(),
        }])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?
        .pop()
        .ok_or_else(|| TaskError::Internal("empty retry result".into()))?;
    match result {
        OpResult::Applied { .. } => {
            metrics::counter!("swarm_tasks_redriven_total").increment(1);
            node.poke();
            task_view(node, id)
        }
        OpResult::Ignored { state } => Err(TaskError::Conflict(format!(
            "task {id} is {}: only failed or dead-lettered tasks are retried",
            state.as_str()
        ))),
        OpResult::NotFound => Err(TaskError::Unknown(id)),
        OpResult::Expired => Err(TaskError::Expired(id)),
        OpResult::Restoring => Err(CommitError::Restoring.into()),
        other => Err(TaskError::Internal(format!(
            "unexpected retry result {other:?}"
        ))),
    }
}

/// Most tasks one bulk retry runs again.
pub(crate) const MAX_BULK_RETRY: usize = 1000;

/// `POST /v1/tasks/retry` body: which finished tasks to run again.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkRetry {
    /// `failed` or `dead_lettered`.
    pub state: String,
    pub agent: Option<String>,
    pub swarm: Option<String>,
    pub label: Option<String>,
    pub text: Option<String>,
    /// Continue after this id (the previous answer's `next_after`).
    pub after: Option<TaskId>,
    /// At most this many (default 100, at most [`MAX_BULK_RETRY`]).
    pub limit: Option<usize>,
}

/// What a bulk retry did.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct BulkRetried {
    /// The tasks queued again, oldest first.
    pub retried: Vec<TaskId>,
    /// Where to continue (more may match); absent when the listing is exhausted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<TaskId>,
}

/// Run again the `failed` or `dead_lettered` tasks a filter selects, oldest first: one
/// page of them (as a listing finds it, within its scan budget) retried in one entry;
/// `visible` leaves out tasks the caller may not act on.
pub(crate) async fn retry_matching(
    node: &Node,
    b: BulkRetry,
    visible: impl Fn(&str) -> bool,
) -> Result<BulkRetried, TaskError> {
    if !matches!(b.state.as_str(), "failed" | "dead_lettered") {
        return Err(TaskError::Invalid(format!(
            "state {:?}: only failed or dead_lettered tasks are retried",
            b.state
        )));
    }
    let limit = b.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_BULK_RETRY {
        return Err(TaskError::Invalid(format!(
            "limit {limit}: between 1 and {MAX_BULK_RETRY}"
        )));
    }
    let page = list(
        node,
        ListParams {
            state: Some(b.state),
            order: Some("asc".into()),
            after: b.after,
            limit: Some(limit),
            agent: b.agent,
            swarm: b.swarm,
            label: b.label,
            text: b.text,
        },
    )
    .await?;
    let ids: Vec<TaskId> = page
        .tasks
        .iter()
        .filter(|t| visible(&t.swarm))
        .map(|t| t.id)
        .collect();
    if ids.is_empty() {
        return Ok(BulkRetried {
            retried: Vec::new(),
            next_after: page.next_after,
        });
    }
    let now = now_ms();
    let results = node
        .propose_client(
            ids.iter()
                .map(|&task_id| Op::Retry {
                    task_id,
                    now_ms: now,
                })
                .collect(),
        )
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    // A task retried (or purged) by someone else meanwhile is left out.
    let retried: Vec<TaskId> = ids
        .into_iter()
        .zip(results)
        .filter(|(_, r)| matches!(r, OpResult::Applied { .. }))
        .map(|(id, _)| id)
        .collect();
    metrics::counter!("swarm_tasks_redriven_total").increment(retried.len() as u64);
    node.poke();
    Ok(BulkRetried {
        retried,
        next_after: page.next_after,
    })
}

/// Cancel task `id` (idempotent: a final task stays as it is); the worker running it is
/// told to stop.
pub(crate) async fn cancel(node: &Node, id: TaskId) -> Result<TaskView, TaskError> {
    let result = node
        .propose_client(vec![Op::Cancel {
            task_id: id,
            now_ms: now_ms(),
        }])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?
        .pop()
        .ok_or_else(|| TaskError::Internal("empty cancel result".into()))?;
    node.count_results(std::slice::from_ref(&result));
    match result {
        OpResult::NotFound => return Err(TaskError::Unknown(id)),
        OpResult::Expired => return Err(TaskError::Expired(id)),
        OpResult::Restoring => return Err(CommitError::Restoring.into()),
        OpResult::Cancelled {
            running: Some((worker, attempt)),
        } => {
            node.send_to_worker(
                &worker,
                swarm_proto::worker::CoordinatorMsg::Cancel(attempt),
            );
        }
        // Already final (cancel is idempotent) or cancelled while queued.
        _ => {}
    }
    task_view(node, id)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(
            parse_duration("3d").unwrap(),
            Duration::from_secs(3 * 86400)
        );
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}

/// Listing at scale: a history of 200,000 tasks over the archive (real checkpoints into
/// a redb file), a checkpoint being written, the changes since and the live tasks, read
/// the way `list` reads it (chunks of `TaskTable::list` through a `ListScan`).
#[cfg(test)]
mod listing_tests {
    use std::collections::BTreeMap;
    use std::ops::RangeInclusive;
    use std::sync::Arc;

    use swarm_proto::api::{TaskOrder, TaskState};
    use swarm_proto::worker::{AttemptRef, Outcome};
    use swarm_proto::TaskId;
    use swarm_topology::{StageSpec, SwarmSpec, TopologySpec};

    use super::{ListScan, TaskError, TaskFilter, LIST_SCAN_BUDGET, MAX_FILTER_TEXT};
    use crate::raft::checkpoint::{CheckpointStore, Membership, STATE_DB_FILE};
    use crate::state::{Op, OpResult, SwarmRecord, Task, TaskSpec, TaskTable};

    /// Tasks in the history.
    const N: TaskId = 200_000;
    const RARE_WORD: &str = "Zebra-Quartz";

    /// What task `id` is submitted with: one in 1,000 carries each rare thing.
    fn spec_of(id: TaskId) -> TaskSpec {
        let mut labels = BTreeMap::new();
        let team = ["red", "green", "blue"][(id % 3) as usize];
        labels.insert("team".to_string(), team.to_string());
        if id % 1000 == 333 {
            labels.insert("rare".to_string(), "yes".to_string());
        }
        let payload = match id % 1000 {
            // Queued ones and succeeded ones (see `History::finish`).
            500 | 612 => format!("task {id}: look for the {RARE_WORD} here").into_bytes(),
            // The word, but the payload is not UTF-8: never a text match.
            501 => [&[0xff, 0xfe, b' '][..], RARE_WORD.as_bytes()].concat(),
            _ => format!("task {id}: nothing to see, zebra quartz").into_bytes(),
        };
        let (agent, swarm, stages) = match id % 1000 {
            7 => ("rare-agent", "default", vec![]),
            // Ring tasks; the first's second stage runs the rare agent.
            907 => ("planner", "pipeline", vec!["planner", "rare-agent"]),
            908 => ("planner", "pipeline", vec!["planner", "reviewer"]),
            _ => ("coder", "default", vec![]),
        };
        TaskSpec {
            agent: agent.into(),
            payload,
            priority: 0,
            timeout_ms: 1000,
            max_attempts: 1,
            idempotency_key: None,
            labels,
            patterns: 0,
            swarm: swarm.into(),
            stages: stages.into_iter().map(StageSpec::new).collect(),
            retain_ms: 1000,
        }
    }

    /// The table, its checkpoint store, and what every retained task should be.
    struct History {
        _dir: tempfile::TempDir,
        store: CheckpointStore,
        table: TaskTable,
        /// The state of every retained task (purged ones are gone).
        model: BTreeMap<TaskId, TaskState>,
    }

    impl History {
        fn apply(&mut self, ops: &[Op]) -> Vec<OpResult> {
            let reader = self.store.reader().unwrap();
            let results = ops
                .iter()
                .map(|op| self.table.apply_op(op, &reader).unwrap())
                .collect();
            self.table.take_events();
            results
        }

        fn submit(&mut self, ids: RangeInclusive<TaskId>) {
            for chunk in ids.collect::<Vec<_>>().chunks(4096) {
                let ops: Vec<Op> = chunk
                    .iter()
                    .map(|&id| Op::Submit {
                        spec: spec_of(id),
                        now_ms: 1,
                        queue_limit: u64::MAX,
                    })
                    .collect();
                for (id, r) in chunk.iter().zip(self.apply(&ops)) {
                    assert_eq!(
                        r,
                        OpResult::Submitted {
                            id: *id,
                            duplicate: false
                        }
                    );
                    self.model.insert(*id, TaskState::Queued);
                }
            }
        }

        /// Ends the tasks `ids` but one in 25: half of those stay queued, half start.
        /// Even ids (but ring tasks) succeed, the others are cancelled.
        fn finish(&mut self, ids: RangeInclusive<TaskId>) {
            let mut ops = Vec::new();
            for id in ids {
                let attempt = AttemptRef {
                    task_id: id,
                    attempt: 1,
                };
                let start = Op::Start {
                    attempt,
                    worker: "w".into(),
                    now_ms: 2,
                };
                let ring = matches!(id % 1000, 907 | 908);
                let state = match id % 50 {
                    0 => TaskState::Queued,
                    25 => {
                        ops.push(start);
                        TaskState::Running
                    }
                    _ if id % 2 == 0 && !ring => {
                        ops.push(start);
                        ops.push(Op::Finish {
                            attempt,
                            worker: "w".into(),
                            outcome: Outcome::Succeeded {
                                output: b"done".to_vec(),
                            },
                            started_at_ms: 2,
                            finished_at_ms: 3,
                            now_ms: 3,
                            retry_at_ms: 3,
                        });
                        TaskState::Succeeded
                    }
                    _ => {
                        ops.push(Op::Cancel {
                            task_id: id,
                            now_ms: 3,
                        });
                        TaskState::Cancelled
                    }
                };
                self.model.insert(id, state);
            }
            for chunk in ops.chunks(4096) {
                self.apply(chunk);
            }
        }

        /// Purges the finished tasks among `ids` that `pick` picks.
        fn purge(&mut self, ids: RangeInclusive<TaskId>, pick: impl Fn(TaskId) -> bool) {
            let gone: Vec<TaskId> = ids
                .filter(|&id| pick(id) && self.model.get(&id).is_some_and(|s| s.is_final()))
                .collect();
            for chunk in gone.chunks(4096) {
                let r = self.apply(&[Op::Purge {
                    ids: chunk.to_vec(),
                    now_ms: 1_000_000,
                }]);
                assert_eq!(
                    r,
                    [OpResult::Purged {
                        purged: chunk.len() as u64
                    }]
                );
            }
            for id in gone {
                self.model.remove(&id);
            }
        }

        fn checkpoint(&mut self) {
            let delta = self.table.begin_checkpoint().unwrap();
            self.store
                .write(&delta, None, &Membership::default(), None)
                .unwrap();
            self.table.checkpoint_written();
        }

        /// The ids the model holds, in `order`, in `state` if given, passing `pick`.
        fn expected(
            &self,
            state: Option<TaskState>,
            order: TaskOrder,
            pick: impl Fn(TaskId) -> bool,
        ) -> Vec<TaskId> {
            let mut ids: Vec<TaskId> = self
                .model
                .iter()
                .filter(|(id, s)| state.is_none_or(|want| **s == want) && pick(**id))
                .map(|(id, _)| *id)
                .collect();
            if order == TaskOrder::Desc {
                ids.reverse();
            }
            ids
        }

        /// One page as `tasks::list` reads it: (tasks, next_after, tasks examined).
        fn page(
            &self,
            state: Option<TaskState>,
            order: TaskOrder,
            filter: &TaskFilter,
            after: Option<TaskId>,
            limit: usize,
        ) -> (Vec<Arc<Task>>, Option<TaskId>, usize) {
            let reader = self.store.reader().unwrap();
            let mut scan = ListScan::new(filter, after, limit, LIST_SCAN_BUDGET);
            while let Some((cursor, want)) = scan.next_read() {
                let chunk = self
                    .table
                    .list(state, order, cursor, want, &reader)
                    .unwrap();
                assert!(chunk.len() <= want);
                scan.feed(want, chunk);
            }
            let examined = scan.examined();
            let (tasks, next_after) = scan.finish();
            (tasks, next_after, examined)
        }

        /// Every page from the start, checking each: the ids found in order and the
        /// number of pages.
        fn all_pages(
            &self,
            state: Option<TaskState>,
            order: TaskOrder,
            filter: &TaskFilter,
            limit: usize,
        ) -> (Vec<TaskId>, usize) {
            // A scan stops only when its page is full or its budget is spent.
            let most_pages = self.model.len() / LIST_SCAN_BUDGET + self.model.len() / limit + 2;
            let mut ids: Vec<TaskId> = Vec::new();
            let mut after = None;
            let mut pages = 0;
            loop {
                pages += 1;
                assert!(pages <= most_pages, "more than {most_pages} pages");
                let (tasks, next, examined) = self.page(state, order, filter, after, limit);
                assert!(examined <= LIST_SCAN_BUDGET, "a page examined {examined}");
                assert!(tasks.len() <= limit);
                for t in &tasks {
                    assert!(filter.matches(t) && state.is_none_or(|s| t.state == s));
                    ids.push(t.id);
                }
                let Some(next) = next else {
                    return (ids, pages);
                };
                if tasks.len() < limit {
                    // Short but not the end: the budget ran out, at `next`.
                    assert_eq!(examined, LIST_SCAN_BUDGET);
                } else {
                    assert_eq!(Some(next), tasks.last().map(|t| t.id));
                }
                // The cursor moves on.
                if let Some(prev) = after {
                    match order {
                        TaskOrder::Asc => assert!(next > prev),
                        TaskOrder::Desc => assert!(next < prev),
                    }
                }
                after = Some(next);
            }
        }
    }

    /// The history: the archive written by three checkpoints (tasks 1 to 150,000, some
    /// purged since), a checkpoint being written (150,001 to 180,000), the changes
    /// since (180,001 to 200,000, and purges of tasks the older layers hold), with one
    /// task in 25 still live throughout.
    fn history() -> History {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join(STATE_DB_FILE)).unwrap();
        let table = store.load().unwrap().table;
        let mut h = History {
            _dir: dir,
            store,
            table,
            model: BTreeMap::new(),
        };
        let ring = SwarmRecord {
            spec: SwarmSpec::new(
                "pipeline",
                TopologySpec::Ring {
                    stages: vec![StageSpec::new("planner"), StageSpec::new("reviewer")],
                },
                BTreeMap::new(),
            )
            .unwrap(),
            queue_depth: 0,
            created_at_ms: 1,
        };
        assert_eq!(
            h.apply(&[Op::SwarmCreate { record: ring }]),
            [OpResult::Swarm(Ok(()))]
        );
        for k in 0..3 {
            let ids = k * 50_000 + 1..=(k + 1) * 50_000;
            h.submit(ids.clone());
            h.finish(ids);
            h.checkpoint();
        }
        h.purge(1..=150_000, |id| id % 97 == 0);
        h.submit(150_001..=180_000);
        h.finish(150_001..=180_000);
        // Written by nobody: the flushing layer from here on.
        let flushing = h.table.begin_checkpoint().unwrap();
        assert!(flushing.changes.finished.len() > 25_000);
        h.submit(180_001..=N);
        h.finish(180_001..=N);
        h.purge(100_001..=180_000, |id| id % 89 == 0);
        assert!(h.model.len() > 190_000, "{}", h.model.len());
        h
    }

    fn ids_of(tasks: &[Arc<Task>]) -> Vec<TaskId> {
        tasks.iter().map(|t| t.id).collect()
    }

    /// The history, built once for the tests that read it.
    fn shared() -> &'static History {
        static HISTORY: std::sync::OnceLock<History> = std::sync::OnceLock::new();
        HISTORY.get_or_init(history)
    }

    #[test]
    fn pages_of_a_large_history_hold_every_task_once_in_order() {
        let h = shared();
        let none = TaskFilter::default();
        // Newest first, 1,000 a page: every retained id once, strictly descending.
        let (desc, pages) = h.all_pages(None, TaskOrder::Desc, &none, 1000);
        assert!(desc.windows(2).all(|w| w[0] > w[1]), "strictly descending");
        assert_eq!(desc, h.expected(None, TaskOrder::Desc, |_| true));
        assert_eq!(pages, h.model.len() / 1000 + 1);
        let (asc, _) = h.all_pages(None, TaskOrder::Asc, &none, 1000);
        assert_eq!(asc, h.expected(None, TaskOrder::Asc, |_| true));
        // By state: the archive's state index read backwards, and the live index.
        for state in [
            TaskState::Succeeded,
            TaskState::Cancelled,
            TaskState::Running,
        ] {
            let (got, _) = h.all_pages(Some(state), TaskOrder::Desc, &none, 1000);
            assert_eq!(got, h.expected(Some(state), TaskOrder::Desc, |_| true));
        }
        // From a cursor in each layer: the next ids below it.
        for after in [50_001, 123_457, 170_000, 190_000, N + 1] {
            let (page, next, _) = h.page(None, TaskOrder::Desc, &none, Some(after), 10);
            let want: Vec<TaskId> = h
                .model
                .range(..after)
                .rev()
                .take(10)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(ids_of(&page), want, "after {after}");
            assert_eq!(next, want.last().copied());
        }
        let (page, next, _) = h.page(None, TaskOrder::Desc, &none, Some(3), 10);
        assert_eq!((ids_of(&page), next), (vec![2, 1], None));
    }

    #[test]
    fn filtered_pages_find_exactly_the_matches_within_the_scan_budget() {
        let h = shared();
        let f = |agent: Option<&str>, swarm: Option<&str>, label: Option<&str>, text| {
            TaskFilter::parse(agent, swarm, label, text).unwrap()
        };
        type Pick = fn(TaskId) -> bool;
        let cases: [(&str, TaskFilter, Pick); 6] = [
            ("text", f(None, None, None, Some("zebra-QUARTZ")), |id| {
                matches!(id % 1000, 500 | 612)
            }),
            ("label", f(None, None, Some("rare=yes"), None), |id| {
                id % 1000 == 333
            }),
            ("agent", f(Some("rare-agent"), None, None, None), |id| {
                matches!(id % 1000, 7 | 907)
            }),
            (
                "swarm and agent",
                f(Some("reviewer"), Some("pipeline"), None, None),
                |id| id % 1000 == 908,
            ),
            (
                "labels",
                f(None, None, Some("rare=yes,team=red"), None),
                |id| id % 1000 == 333 && id % 3 == 0,
            ),
            (
                "nothing",
                f(None, Some("default"), None, Some("no such words")),
                |_| false,
            ),
        ];
        for (i, (name, filter, pick)) in cases.iter().enumerate() {
            // Each case in one order (a whole scan takes a while), the first in both.
            let orders = match i {
                0 => &[TaskOrder::Desc, TaskOrder::Asc][..],
                _ if i % 2 == 0 => &[TaskOrder::Desc],
                _ => &[TaskOrder::Asc],
            };
            for &order in orders {
                let (got, pages) = h.all_pages(None, order, filter, 50);
                let want = h.expected(None, order, pick);
                assert!(!want.is_empty() || *name == "nothing");
                assert_eq!(got, want, "{name} {order:?}");
                // Each page ended at its budget (none filled): every task was examined
                // once, so the scan took as many pages as the budget allows (and one
                // that finds the end).
                assert_eq!(
                    pages,
                    h.model.len() / LIST_SCAN_BUDGET + 1,
                    "{name} {order:?}"
                );
            }
        }
        // A state and a filter; pages that fill before the budget runs out.
        let text = f(None, None, None, Some(RARE_WORD));
        let (got, _) = h.all_pages(Some(TaskState::Succeeded), TaskOrder::Desc, &text, 3);
        let want = h.expected(Some(TaskState::Succeeded), TaskOrder::Desc, |id| {
            matches!(id % 1000, 500 | 612)
        });
        assert!(want.len() > 50);
        assert_eq!(got, want);
        // An empty page that leads on: the budget ran out first.
        let nothing = &cases[5].1;
        let (page, next, examined) = h.page(None, TaskOrder::Desc, nothing, None, 100);
        assert!(page.is_empty());
        assert_eq!(examined, LIST_SCAN_BUDGET);
        let last_examined = h.model.keys().rev().nth(LIST_SCAN_BUDGET - 1).copied();
        assert_eq!(next, last_examined);
    }

    #[test]
    fn filters_parse_and_match() {
        let bad = |label: Option<&str>, text: Option<&str>| {
            matches!(
                TaskFilter::parse(None, None, label, text),
                Err(TaskError::Invalid(_))
            )
        };
        for label in ["rare", "=yes", "a=b,", "a=b,,c=d", ",a=b"] {
            assert!(bad(Some(label), None), "{label:?}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(bad(Some(&many.join(",")), None));
        assert!(bad(None, Some(&"x".repeat(MAX_FILTER_TEXT + 1))));
        assert!(!bad(None, Some(&"x".repeat(MAX_FILTER_TEXT))));
        // Empty parameters are no filter; a value may be empty or hold `=`.
        let none = TaskFilter::parse(Some(""), Some(""), Some(""), Some("")).unwrap();
        assert!(none.is_empty());
        let f = TaskFilter::parse(None, None, Some("a=,b=c=d"), None).unwrap();
        let mut t = Task {
            id: 1,
            spec: spec_of(1),
            state: TaskState::Queued,
            attempts: Vec::new(),
            output: None,
            error: None,
            created_at_ms: 0,
            finished_at_ms: None,
            expires_at_ms: None,
            not_before_ms: 0,
            stage: 0,
            stage_base: 0,
            released: 0,
            stage_outputs: Vec::new(),
            moves: 0,
            flow: None,
        };
        assert!(!f.matches(&t));
        t.spec.labels.insert("a".into(), String::new());
        t.spec.labels.insert("b".into(), "c=d".into());
        assert!(f.matches(&t));
        // Text: ASCII case-insensitive, anywhere, UTF-8 only.
        let text = |s: &str| TaskFilter::parse(None, None, None, Some(s)).unwrap();
        t.spec.payload = "Ünïcode and MiXeD case: aab aaab".as_bytes().to_vec();
        for hit in ["mixed CASE", "Ünïcode AND", "aaab", "b aaab", "Ü"] {
            assert!(text(hit).matches(&t), "{hit}");
        }
        // Only ASCII letters fold.
        for miss in ["ünïcode", "ÜNÏCODE", "aaaab", "case:  aab", "mixed  case"] {
            assert!(!text(miss).matches(&t), "{miss}");
        }
        t.spec.payload = vec![0xff, b'a', b'b'];
        assert!(!text("ab").matches(&t));
    }

    /// The case-insensitive search agrees with a naive one on many small random texts
    /// (overlapping prefixes are where a linear search goes wrong).
    #[test]
    fn text_search_agrees_with_a_naive_one() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let letters = b"aAbB";
        for _ in 0..20_000 {
            let hay: Vec<u8> = (0..rng.gen_range(0..24))
                .map(|_| letters[rng.gen_range(0..4)])
                .collect();
            let needle: String = (0..rng.gen_range(1..6))
                .map(|_| letters[rng.gen_range(0..4)] as char)
                .collect();
            let naive = hay
                .windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()));
            let f = TaskFilter::parse(None, None, None, Some(&needle)).unwrap();
            let search = f.text.as_ref().unwrap();
            assert_eq!(search.found_in(&hay), naive, "{needle:?} in {hay:?}");
        }
    }
}
