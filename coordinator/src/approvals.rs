//! Task approvals on the node: an operator's approve or reject ([`decide`], proposed as
//! [`Op::Decide`]) and [`expire_loop`], which on the leader proposes
//! [`Op::ExpireApprovals`] for the tasks whose approval deadline has passed. The rules
//! (what a decision or an expiry does to a task and its dependants) are the state
//! machine's: see [`crate::state::flow`]. Holds no state: what is due is read from the
//! table each round.

use std::sync::Arc;
use std::time::Duration;

use swarm_proto::api::{TaskState, TaskView};
use swarm_proto::TaskId;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::commit::CommitError;
use crate::node::{now_ms, Node};
use crate::state::flow::{MAX_DECIDER_NAME, MAX_DECISION_COMMENT};
use crate::state::{FlowFault, Op, OpResult, MAX_PURGE_PER_OP};
use crate::tasks::{task_view, TaskError};

/// How often the leader looks for approvals past their deadline.
const EXPIRE_EVERY: Duration = Duration::from_millis(250);

/// Approve (`approve`) or reject task `id`, awaiting approval, as `by` (the caller's
/// token name) with an optional comment. A task in any other state is refused with
/// `409 not_awaiting_approval` (naming its state and any earlier decision), an unknown
/// one with `404`.
pub(crate) async fn decide(
    node: &Node,
    id: TaskId,
    approve: bool,
    by: &str,
    comment: Option<String>,
) -> Result<TaskView, TaskError> {
    let comment = comment.filter(|c| !c.is_empty());
    if comment
        .as_ref()
        .is_some_and(|c| c.len() > MAX_DECISION_COMMENT)
    {
        return Err(TaskError::Invalid(format!(
            "`comment` is at most {MAX_DECISION_COMMENT} bytes"
        )));
    }
    // Token names are short; a longer principal name is cut at a character boundary.
    let mut cut = by.len().min(MAX_DECIDER_NAME);
    while !by.is_char_boundary(cut) {
        cut -= 1;
    }
    let by = by[..cut].to_string();
    let result = node
        .propose_client(vec![Op::Decide {
            task_id: id,
            approve,
            by: by.clone(),
            comment,
            now_ms: now_ms(),
        }])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?
        .pop()
        .ok_or_else(|| TaskError::Internal("empty decision result".into()))?;
    let verb = if approve { "approved" } else { "rejected" };
    match result {
        OpResult::Applied { .. } => {
            metrics::counter!("swarm_approvals_total", "decision" => verb).increment(1);
            info!(task = id, by = %by, "task {verb}");
            node.poke();
            task_view(node, id)
        }
        OpResult::Ignored { state } => Err(not_awaiting(node, id, state)),
        OpResult::NotFound => Err(TaskError::Unknown(id)),
        OpResult::Expired => Err(TaskError::Expired(id)),
        OpResult::Restoring => Err(CommitError::Restoring.into()),
        other => Err(TaskError::Internal(format!(
            "unexpected decision result {other:?}"
        ))),
    }
}

/// The refusal of a decision on a task that does not await approval: its state, and the
/// decision made earlier if there was one.
fn not_awaiting(node: &Node, id: TaskId, state: TaskState) -> TaskError {
    let earlier = task_view(node, id)
        .ok()
        .and_then(|v| v.approval)
        .and_then(|a| a.decision)
        .map(|d| {
            format!(
                " (already {} by {})",
                if d.approved { "approved" } else { "rejected" },
                d.by
            )
        })
        .unwrap_or_default();
    TaskError::Flow(FlowFault::new(
        "not_awaiting_approval",
        format!(
            "task {id} is {}, not awaiting approval{earlier}",
            state.as_str()
        ),
    ))
}

/// On the leader, every [`EXPIRE_EVERY`]: propose the expiry of the approvals whose
/// deadline has passed. Runs until shutdown.
pub(crate) async fn expire_loop(node: Arc<Node>, shutdown: watch::Receiver<bool>) {
    crate::node::every_while_leading(node, shutdown, EXPIRE_EVERY, |n| async move {
        expire_due(&n).await
    })
    .await
}

/// One [`Op::ExpireApprovals`] of the tasks due now (each replica checks them again
/// against the op's time).
async fn expire_due(node: &Node) {
    let now = now_ms();
    let ids = node.read_table(|t| match t.restoring() {
        Some(_) => Vec::new(),
        None => t.approvals_due(now, MAX_PURGE_PER_OP),
    });
    if ids.is_empty() {
        return;
    }
    match node
        .propose(vec![Op::ExpireApprovals { ids, now_ms: now }])
        .await
    {
        Ok(results) => {
            for r in results {
                if let OpResult::ApprovalsExpired { expired } = r {
                    metrics::counter!("swarm_approvals_total", "decision" => "expired")
                        .increment(expired);
                }
            }
        }
        Err(e) => debug!(error = %e, "approval expiry not committed"),
    }
}
