//! Tasks as clients see them: a submit request becomes a checked [`TaskSpec`] and an
//! [`Op::Submit`] (defaults, limits, admission to the queue), reads go through
//! [`linearizable`], and a cancel reaches the worker running the task.
//!
//! A refused submit changes nothing: every check here runs before anything is proposed,
//! and the queue limit is checked again, authoritatively, when the submit applies.

use std::time::Duration;

use swarm_proto::api::{
    SubmitBatch, SubmitBatchResponse, SubmitResponse, SubmitTask, TaskList, TaskState, TaskView,
};
use swarm_proto::TaskId;

use crate::commit::{linearizable, CommitError};
use crate::limits::{ENTRY_BUDGET, MAX_OP_BYTES};
use crate::node::{now_ms, Node};
use crate::state::{Lookup, Op, OpResult, TaskSpec};
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

/// Turn a submit body into a spec, applying defaults and limits.
fn to_spec(node: &Node, t: SubmitTask) -> Result<TaskSpec, TaskError> {
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

fn submit_ops(node: &Node, specs: Vec<TaskSpec>) -> Vec<Op> {
    let now = now_ms();
    let queue_limit = node.config().limits.queue_limit;
    specs
        .into_iter()
        .map(|spec| Op::Submit {
            spec,
            now_ms: now,
            queue_limit,
        })
        .collect()
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
    let spec = to_spec(node, task)?;
    if spec.idempotency_key.is_none() {
        admit_to_queue(node, 1)?;
    }
    wait_for_checkpoints(node).await?;
    let results = node
        .propose_client(submit_ops(node, vec![spec]))
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    node.count_results(&results);
    let (id, duplicate) = match results.first() {
        Some(OpResult::Submitted { id, duplicate }) => (*id, *duplicate),
        Some(OpResult::QueueFull { limit }) => return Err(TaskError::QueueFull { limit: *limit }),
        Some(OpResult::Swarm(Err(f))) => return Err(SwarmError::Fault(f.clone()).into()),
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
            to_spec(node, t).map_err(|e| match e {
                TaskError::Invalid(m) => TaskError::Invalid(format!("tasks[{i}]: {m}")),
                TaskError::TooLarge(m) => TaskError::TooLarge(format!("tasks[{i}]: {m}")),
                other => other,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // One batch is one Raft entry (all or nothing), so it must fit one.
    let bytes: usize = specs.iter().map(TaskSpec::size_hint).sum();
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
            // The swarm was deleted between the check and the commit.
            OpResult::Swarm(Err(f)) => {
                let committed: Vec<String> = out.iter().map(|r| r.id.to_string()).collect();
                return Err(TaskError::Conflict(format!(
                    "{} part-way through the batch; committed before it: [{}]",
                    f.message,
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

/// One page of tasks, in `state` if given, with ids after `after`, read linearizably.
pub(crate) async fn list(
    node: &Node,
    state: Option<&str>,
    after: Option<TaskId>,
    limit: Option<usize>,
) -> Result<TaskList, TaskError> {
    let state = match state {
        None | Some("") => None,
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            TaskError::Invalid(format!("unknown state {s:?}; one of {}", names.join(", ")))
        })?),
    };
    let limit = limit.unwrap_or(100).clamp(1, 1000);
    linearizable(node).await?;
    let tasks: Vec<TaskView> = node
        .table
        .list(state, after.unwrap_or(0), limit)
        .map_err(|e| TaskError::Internal(e.to_string()))?
        .iter()
        .map(|t| view_of(node, t))
        .collect();
    let next_after = if tasks.len() == limit {
        tasks.last().map(|t| t.id)
    } else {
        None
    };
    Ok(TaskList { tasks, next_after })
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
