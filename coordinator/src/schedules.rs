//! Schedules on the node (the rules are [`crate::state::schedules`]): a create request
//! becomes a checked [`ScheduleDef`] — its task template checked exactly as a submit's
//! ([`crate::tasks::to_spec`]) — and [`ScheduleOp::Create`]; reads, pause, resume and
//! delete; and [`fire_loop`], which on the leader proposes a [`ScheduleOp::Fire`] for
//! every tick that has come.
//!
//! The loop holds no state of its own: what is due is read from the replicated table
//! each round, and a Fire for a tick that another leader fired already is ignored when it
//! applies, so a leader change neither loses nor repeats a tick.

use std::sync::Arc;
use std::time::Duration;

use swarm_proto::api::{CreateSchedule, ScheduleList, ScheduleView};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::commit::CommitError;
use crate::node::{now_ms, Node};
use crate::state::schedules::{Cadence, CatchUp, DEFAULT_CATCH_UP};
use crate::state::{
    Op, OpResult, Schedule, ScheduleDef, ScheduleFault, ScheduleOp, ScheduleOutcome,
};
use crate::tasks::{parse_duration, TaskError};

/// How often the leader looks for due ticks: a tick fires at most this late (plus a
/// commit).
const FIRE_EVERY: Duration = Duration::from_millis(200);
/// Most Fires one round proposes (the rest are due next round).
const MAX_FIRES_PER_ROUND: usize = 1024;

/// Why a schedule request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The request is malformed: name, cadence, catch-up policy.
    #[error("{0}")]
    Invalid(String),
    /// The task template was refused as a submit would be.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// No schedule of that name.
    #[error("no schedule named {0:?}")]
    Unknown(String),
    /// The replicated state refused the op (`schedule_exists`, `unknown_schedule`,
    /// `too_many_schedules`, `too_large`, `unknown_swarm`, `invalid_schedule`).
    #[error("{}", .0.message)]
    Fault(ScheduleFault),
    /// Not committed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A result this code does not expect.
    #[error("{0}")]
    Internal(String),
}

/// The definition a create request asks for, checked (the template as a submit).
fn to_def(node: &Node, req: CreateSchedule) -> Result<ScheduleDef, ScheduleError> {
    crate::state::schedules::check_name(&req.name).map_err(ScheduleError::Invalid)?;
    let cadence = match (req.every.as_deref(), req.cron) {
        (Some(e), None) => {
            let every = parse_duration(e).map_err(ScheduleError::Invalid)?;
            Cadence::Every {
                every_ms: every.as_millis() as u64,
                anchor_ms: 0,
            }
        }
        (None, Some(expr)) => Cadence::Cron { expr },
        _ => {
            return Err(ScheduleError::Invalid(
                "give either `every` (e.g. \"2s\") or `cron` (e.g. \"*/5 * * * *\"), not both"
                    .into(),
            ))
        }
    };
    cadence.check(now_ms()).map_err(ScheduleError::Invalid)?;
    let catch_up = match (req.catch_up.as_deref(), req.max_catch_up) {
        (None | Some("skip"), None) => CatchUp::Skip,
        (Some("skip"), Some(_)) | (None, Some(_)) => {
            return Err(ScheduleError::Invalid(
                "`max_catch_up` goes with `catch_up: all`".into(),
            ))
        }
        (Some("all"), max) => CatchUp::All {
            max: max.unwrap_or(DEFAULT_CATCH_UP),
        },
        (Some(other), _) => {
            return Err(ScheduleError::Invalid(format!(
                "unknown catch_up {other:?}; one of skip, all"
            )))
        }
    };
    if req.task.idempotency_key.is_some() {
        return Err(ScheduleError::Invalid(
            "a schedule's task takes no `idempotency_key`: each tick's is schedule:<name>:<tick_ms>"
                .into(),
        ));
    }
    let template = crate::tasks::to_spec(node, req.task)?;
    Ok(ScheduleDef {
        name: req.name,
        cadence,
        catch_up,
        template,
        paused: req.paused,
    })
}

/// The API view of a schedule.
pub fn view(s: &Schedule) -> ScheduleView {
    let (every_ms, cron) = match &s.def.cadence {
        Cadence::Every { every_ms, .. } => (Some(*every_ms), None),
        Cadence::Cron { expr } => (None, Some(expr.clone())),
    };
    let (catch_up, max_catch_up) = match s.def.catch_up {
        CatchUp::Skip => ("skip", None),
        CatchUp::All { max } => ("all", Some(max)),
    };
    ScheduleView {
        name: s.def.name.clone(),
        every_ms,
        cron,
        catch_up: catch_up.into(),
        max_catch_up,
        paused: s.def.paused,
        agent: s.def.template.agent.clone(),
        swarm: s.def.template.swarm.clone(),
        priority: s.def.template.priority,
        created_at_ms: s.created_at_ms,
        next_tick_ms: (!s.def.paused && s.next_tick_ms != u64::MAX).then_some(s.next_tick_ms),
        fired: s.fired,
        skipped: s.skipped,
        refused: s.refused,
        last_tick_ms: s.last_tick_ms,
        last_task: s.last_task,
        last_error: s.last_error.clone(),
    }
}

/// Propose one schedule op from a client and read its answer.
async fn propose(node: &Node, op: ScheduleOp) -> Result<ScheduleOutcome, ScheduleError> {
    let results = node
        .propose_client(vec![Op::Schedule(op)])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    match results.into_iter().next() {
        Some(OpResult::Schedule(Ok(o))) => Ok(o),
        Some(OpResult::Schedule(Err(f))) => Err(ScheduleError::Fault(f)),
        Some(OpResult::Restoring) => Err(CommitError::Restoring.into()),
        other => Err(ScheduleError::Internal(format!(
            "unexpected schedule result {other:?}"
        ))),
    }
}

/// Define a schedule; its first tick is one interval (or the first cron tick) after now.
pub(crate) async fn create(
    node: &Node,
    req: CreateSchedule,
) -> Result<ScheduleView, ScheduleError> {
    let def = to_def(node, req)?;
    let name = def.name.clone();
    propose(
        node,
        ScheduleOp::Create {
            def: Box::new(def),
            now_ms: now_ms(),
        },
    )
    .await?;
    info!(schedule = %name, "schedule created");
    get(node, &name)
}

/// Every schedule, by name.
pub(crate) fn list(node: &Node) -> ScheduleList {
    ScheduleList {
        schedules: node.read_table(|t| t.schedules().by_name.values().map(view).collect()),
    }
}

/// One schedule.
pub(crate) fn get(node: &Node, name: &str) -> Result<ScheduleView, ScheduleError> {
    node.read_table(|t| t.schedules().get(name).map(view))
        .ok_or_else(|| ScheduleError::Unknown(name.to_string()))
}

/// The swarm a schedule's tasks run in (to check a caller's token against).
pub(crate) fn swarm_of(node: &Node, name: &str) -> Result<String, ScheduleError> {
    node.read_table(|t| {
        t.schedules()
            .get(name)
            .map(|s| s.def.template.swarm.clone())
    })
    .ok_or_else(|| ScheduleError::Unknown(name.to_string()))
}

/// Remove a schedule; the tasks it submitted stay.
pub(crate) async fn delete(node: &Node, name: &str) -> Result<(), ScheduleError> {
    propose(node, ScheduleOp::Delete { name: name.into() }).await?;
    info!(schedule = %name, "schedule deleted");
    Ok(())
}

/// Pause a schedule (`pause`) or resume it from the next tick after now.
pub(crate) async fn set_paused(
    node: &Node,
    name: &str,
    pause: bool,
) -> Result<ScheduleView, ScheduleError> {
    let op = if pause {
        ScheduleOp::Pause { name: name.into() }
    } else {
        ScheduleOp::Resume {
            name: name.into(),
            now_ms: now_ms(),
        }
    };
    propose(node, op).await?;
    get(node, name)
}

/// On the leader, every [`FIRE_EVERY`]: propose a Fire for each schedule whose next tick
/// has come. Runs until shutdown.
pub(crate) async fn fire_loop(node: Arc<Node>, shutdown: watch::Receiver<bool>) {
    crate::node::every_while_leading(
        node,
        shutdown,
        FIRE_EVERY,
        |n| async move { fire_due(&n).await },
    )
    .await
}

/// Propose the due ticks, one Fire each, in one request (so in one entry).
async fn fire_due(node: &Node) {
    let now = now_ms();
    let due = node.read_table(|t| match t.restoring() {
        Some(_) => Vec::new(),
        None => t.schedules().due(now, MAX_FIRES_PER_ROUND),
    });
    if due.is_empty() {
        return;
    }
    let queue_limit = node.config().limits.queue_limit;
    let ops = due
        .into_iter()
        .map(|(name, tick_ms)| {
            Op::Schedule(ScheduleOp::Fire {
                name,
                tick_ms,
                now_ms: now,
                queue_limit,
            })
        })
        .collect();
    match node.propose(ops).await {
        Ok(results) => count(&results),
        Err(e) => debug!(error = %e, "schedule ticks not committed"),
    }
}

/// Count what the Fires did in `swarm_schedule_ticks_total{outcome}`.
fn count(results: &[OpResult]) {
    for r in results {
        let OpResult::Schedule(Ok(outcome)) = r else {
            continue;
        };
        let skipped = match outcome {
            ScheduleOutcome::Fired {
                duplicate, skipped, ..
            } => {
                metrics::counter!("swarm_schedule_ticks_total", "outcome" => "fired").increment(1);
                if !duplicate {
                    metrics::counter!("swarm_tasks_submitted_total").increment(1);
                }
                *skipped
            }
            ScheduleOutcome::Refused {
                skipped, reason, ..
            } => {
                debug!(reason, "schedule tick refused");
                metrics::counter!("swarm_schedule_ticks_total", "outcome" => "refused")
                    .increment(1);
                *skipped
            }
            ScheduleOutcome::Ignored | ScheduleOutcome::Done => 0,
        };
        if skipped > 0 {
            metrics::counter!("swarm_schedule_ticks_total", "outcome" => "skipped")
                .increment(skipped);
        }
    }
}
