//! The replicated task table: the application half of the Raft state machine.
//!
//! Every coordinator applies the same [`Command`]s in the same order and ends with the
//! same state. Nothing here reads a clock, a socket or a random number: times travel
//! inside the ops (stamped by the leader that proposed them), so applying is a pure
//! function of the log. The scheduler, leases and retries decide *what* to propose; this
//! module only decides what a committed op *means*.
//!
//! # Layout: live work in memory, history on disk
//!
//! [`TaskTable`] holds in memory only what is *live* — queued and running tasks with their
//! indexes — plus the [`Changes`] made since the last checkpoint (tasks that finished,
//! tasks purged, idempotency keys). Everything older lives in the [`Archive`], the
//! checkpoint store on disk (`raft/sm_store.rs`), which this module reads through a trait
//! and never writes: a checkpoint takes the changes out of the table and writes them
//! there. A lookup reads the layers newest first: the changes, the changes a checkpoint
//! is writing right now ([`TaskTable::flushing`]), then the archive. So memory is bounded
//! by live work plus one checkpoint interval of changes, whatever the history.
//!
//! Finished tasks stay readable until their retention ends (`TaskSpec::retain_ms`, fixed
//! at submit); then the leader proposes [`Op::Purge`] with the ids it found expired, and
//! every replica purges exactly those of them that are expired by the op's own time. An
//! idempotency key names its task until that task is purged: the dedupe window is the
//! task's retention.
//!
//! Invariants kept here (and tested):
//! * a final task never changes again: at most one final result per task;
//! * a result is only recorded for a task that was submitted;
//! * an idempotency key maps to exactly one retained task;
//! * the per-state indexes always agree with the tasks' states, and the finished counts
//!   with the retained finished tasks.

pub mod access;
pub mod callbacks;
pub mod flow;
pub mod format1;
mod layers;
pub mod ledger;
pub mod limits;
pub mod run_queue;
pub mod schedules;
#[cfg(test)]
mod schedules_tests;
mod table;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use swarm_memory::{MemoryOp, MemoryStore, OpOutcome};
use swarm_proto::api::{AttemptView, BytesView, TaskState, TaskView};
use swarm_proto::worker::{AttemptRef, FailureKind, LogTail, Outcome, Usage};
use swarm_proto::TaskId;
use swarm_topology::{StageSpec, SwarmSpec};

pub use access::{Access, AccessFault, AccessOp};
pub use callbacks::{CallbackOp, Callbacks};
pub use flow::{Flow, FlowFault, GraphStep};
pub use layers::{Archive, ArchiveError, Changes, FinishRate, NoArchive, RestoreState, TableMeta};
pub use ledger::{Ledger, LedgerOp};
pub use limits::{LimitDef, Limits, LimitsFault, LimitsOp, Rate};
pub use run_queue::{Lane, RunQueue};
pub use schedules::{Schedule, ScheduleDef, ScheduleFault, ScheduleOp, ScheduleOutcome, Schedules};
pub(crate) use table::in_order;
pub use table::{CheckpointDelta, Lookup, TableEvent, TaskTable, MAX_PURGE_PER_OP};

/// One Raft log entry's payload: a batch of operations applied in order.
///
/// The coordinator batches ops proposed at about the same time into one entry, so one
/// fsync commits many submits, starts and results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub ops: Vec<Op>,
}

impl Command {
    /// Whether applying this command needs the memory store (memory and restore ops).
    pub fn touches_memory(&self) -> bool {
        self.ops.iter().any(Op::touches_memory)
    }
}

/// What a task asks for; fixed at submit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub agent: String,
    /// Encoded as one byte string (the same bytes as a sequence, copied at once).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub priority: i32,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// ReasoningBank patterns the worker retrieves for the agent before it runs.
    pub patterns: u32,
    /// The swarm the task targets ([`swarm_topology::DEFAULT_SWARM_NAME`]: a star of all
    /// workers).
    pub swarm: String,
    /// A ring swarm's stages, copied at submit (so a swarm changed later does not change
    /// a task in flight); empty for other topologies. Stage `i` runs `stages[i].agent`.
    pub stages: Vec<StageSpec>,
    /// How long the task stays readable once finished (its idempotency key dedupes as
    /// long); then it is purged.
    pub retain_ms: u64,
}

impl TaskSpec {
    /// Number of stages the task passes through (1 unless it is a ring task).
    pub fn stage_count(&self) -> u32 {
        self.stages.len().max(1) as u32
    }

    /// The agent of `stage`.
    pub fn agent_of(&self, stage: u32) -> &str {
        self.stages
            .get(stage as usize)
            .map_or(self.agent.as_str(), |s| s.agent.as_str())
    }

    /// Bytes this spec takes in a log entry, roughly (for packing entries by size).
    pub fn size_hint(&self) -> usize {
        let labels: usize = self.labels.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        let stages: usize = self.stages.iter().map(|s| s.agent.len() + 64).sum();
        64 + self.agent.len()
            + self.payload.len()
            + self.idempotency_key.as_ref().map_or(0, String::len)
            + labels
            + self.swarm.len()
            + stages
    }
}

/// A swarm as stored: its spec plus the dispatch settings the coordinator applies to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmRecord {
    pub spec: SwarmSpec,
    /// Attempts a member may hold beyond its slots, queued on the worker (mesh peers
    /// steal from these queues).
    pub queue_depth: u32,
    pub created_at_ms: u64,
}

impl SwarmRecord {
    /// The implicit swarm of tasks that name none.
    pub fn default_swarm() -> Self {
        SwarmRecord {
            spec: SwarmSpec::default_swarm(),
            queue_depth: 0,
            created_at_ms: 0,
        }
    }
}

/// Why a swarm op was refused (identically on every replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmFault {
    pub code: String,
    pub message: String,
}

impl SwarmFault {
    fn new(code: &str, message: impl Into<String>) -> Self {
        SwarmFault {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// One operation on the replicated state. Times are the proposing leader's wall clock (ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Add a task, unless its idempotency key is known or the queue is full.
    Submit {
        spec: TaskSpec,
        now_ms: u64,
        queue_limit: u64,
    },
    /// An attempt was handed to a worker.
    Start {
        attempt: AttemptRef,
        worker: String,
        now_ms: u64,
    },
    /// A worker reported the end of an attempt. `started_at_ms` and `finished_at_ms` are
    /// the worker's (kept on the attempt); `now_ms` is the leader's, which a task that ends
    /// here is finished at and retained from (a worker's clock may be off by days);
    /// `retry_at_ms` is when a retry may run.
    Finish {
        attempt: AttemptRef,
        worker: String,
        outcome: Outcome,
        started_at_ms: u64,
        finished_at_ms: u64,
        now_ms: u64,
        retry_at_ms: u64,
    },
    /// [`Op::Finish`] of an attempt that logged output or used tokens (protocol 6
    /// workers): the same, plus what is stored with the attempt. An op of its own, so
    /// entries written before it keep their encoding.
    Report(Box<Report>),
    /// An attempt was lost: its worker vanished or its lease expired.
    Lose {
        attempt: AttemptRef,
        reason: String,
        now_ms: u64,
        retry_at_ms: u64,
    },
    /// Cancel a task that has not finished.
    Cancel { task_id: TaskId, now_ms: u64 },
    /// A write to the vector memory or the ReasoningBank (applied by the replica's
    /// [`MemoryStore`], not the task table).
    Memory(MemoryOp),
    /// Define a swarm. Refused if the name is taken.
    SwarmCreate { record: SwarmRecord },
    /// Remove a swarm. Refused for the default swarm and while unfinished tasks target it.
    SwarmDelete { name: String },
    /// A running attempt moved from one worker to another (a mesh steal).
    Move {
        attempt: AttemptRef,
        from: String,
        to: String,
        now_ms: u64,
    },
    /// Purge these finished tasks if their retention has ended by `now_ms` (the leader
    /// lists candidates; each replica checks every one itself). At most
    /// [`MAX_PURGE_PER_OP`] ids.
    Purge { ids: Vec<TaskId>, now_ms: u64 },
    /// Start seeding an empty replica from a backup; refused unless the replica holds no
    /// task, collection or pattern. Until [`Op::RestoreCommit`] the replica refuses
    /// every other change.
    RestoreBegin { restore_id: u64, now_ms: u64 },
    /// One piece of the backup, in order (`seq` from 0).
    /// (Tasks of format 1; this release proposes [`Op::RestoreTasks`].)
    RestoreChunk {
        restore_id: u64,
        seq: u64,
        tasks: Vec<format1::TaskV1>,
        memory: Vec<u8>,
    },
    /// The backup arrived whole (`chunks` pieces, `tasks` tasks): the memory store is
    /// decoded from the staged bytes and the restored state goes live.
    RestoreCommit {
        restore_id: u64,
        chunks: u64,
        tasks: u64,
        meta: RestoredMeta,
    },
    /// Give the restore up: the replica returns to empty.
    RestoreAbort { restore_id: u64 },
    /// A change to the API tokens or the revoked certificates.
    Access(AccessOp),
    /// A change to the swarms' token budgets.
    Ledger(LedgerOp),
    /// Run a `failed` or `dead_lettered` task again (redrive): it is queued for a new
    /// attempt with a fresh `max_attempts`, keeping its earlier attempts. Anything else
    /// is `Ignored`. (Appended last: entries written before it read unchanged.)
    Retry { task_id: TaskId, now_ms: u64 },
    /// [`Op::Submit`] of a task with flow controls: graph parents, a step name, a
    /// concurrency key or a rate limit. Refused (`OpResult::Refused`) if a parent is
    /// unknown, purged or already ended other than `succeeded`.
    SubmitFlow {
        spec: TaskSpec,
        flow: Box<Flow>,
        now_ms: u64,
        queue_limit: u64,
    },
    /// Submit a graph: every step, or none (`OpResult::Graph` or `Refused`).
    Graph {
        steps: Vec<GraphStep>,
        now_ms: u64,
        queue_limit: u64,
    },
    /// [`Op::RestoreChunk`] with tasks of the current format (what this release
    /// proposes; the older op is still applied when a log holds it).
    RestoreTasks {
        restore_id: u64,
        seq: u64,
        tasks: Vec<Task>,
        memory: Vec<u8>,
    },
    /// A change to the schedules, or a tick of one ([`ScheduleOp::Fire`]: submits a task
    /// as [`Op::Submit`] does). (Appended last: entries written before it read
    /// unchanged.)
    Schedule(ScheduleOp),
    /// A change to the named limits (concurrency and rate limits). (Appended last.)
    Limits(LimitsOp),
    /// An operator approves (`approve`) or rejects a task awaiting approval; `by` is the
    /// token's name. Approved: queued; rejected: cancelled, with its dependants. Anything
    /// else is `Ignored` (a replay, or a task decided, cancelled or expired meanwhile).
    /// (Appended last.)
    Decide {
        task_id: TaskId,
        approve: bool,
        by: String,
        comment: Option<String>,
        now_ms: u64,
    },
    /// Fail (`approval_timeout`) the named tasks still awaiting approval whose deadline
    /// is at or before `now_ms` (the leader lists candidates; each replica checks every
    /// one itself). At most [`MAX_PURGE_PER_OP`] ids. (Appended last.)
    ExpireApprovals { ids: Vec<TaskId>, now_ms: u64 },
    /// What came of an attempt to deliver a task's callback (see [`callbacks`]).
    /// (Appended last.)
    Callback(CallbackOp),
}

impl Op {
    /// The ops that give up `attempt` on `worker`: its `Start`, then its `Lose`. The
    /// `Start` is ignored when the attempt is already recorded; when it is not (sent with
    /// its `Start` still delayed, see `SchedulerConfig::start_record_delay_ms`), it
    /// records it, so the `Lose` counts the attempt (the worker may have run it) and the
    /// task's next attempt carries a new number: no execution id is ever sent twice.
    pub fn give_up(
        attempt: AttemptRef,
        worker: &str,
        reason: String,
        now_ms: u64,
        retry_at_ms: u64,
    ) -> [Op; 2] {
        [
            Op::Start {
                attempt,
                worker: worker.to_string(),
                now_ms,
            },
            Op::Lose {
                attempt,
                reason,
                now_ms,
                retry_at_ms,
            },
        ]
    }

    /// Whether applying this op needs the memory store.
    pub fn touches_memory(&self) -> bool {
        matches!(
            self,
            Op::Memory(_)
                | Op::RestoreBegin { .. }
                | Op::RestoreCommit { .. }
                | Op::RestoreAbort { .. }
        )
    }

    /// Bytes this op takes in a log entry, roughly (an upper estimate for the fields that
    /// can be large; for packing entries by size).
    pub fn size_hint(&self) -> usize {
        const SMALL: usize = 96;
        match self {
            Op::Submit { spec, .. } => spec.size_hint(),
            Op::SubmitFlow { spec, flow, .. } => spec.size_hint() + flow.size_hint(),
            Op::Graph { steps, .. } => steps
                .iter()
                .map(|s| s.spec.size_hint() + s.flow.size_hint() + 4 * s.after.len())
                .sum::<usize>(),
            Op::Finish {
                outcome, worker, ..
            } => {
                SMALL
                    + worker.len()
                    + match outcome {
                        Outcome::Succeeded { output } => output.len(),
                        Outcome::Failed { message, .. } => message.len(),
                    }
            }
            Op::Report(r) => {
                SMALL
                    + r.worker.len()
                    + r.log.len()
                    + 16 * r.log.pieces.len()
                    + r.usage.as_ref().map_or(0, |u| 24 + u.model.len())
                    + match &r.outcome {
                        Outcome::Succeeded { output } => output.len(),
                        Outcome::Failed { message, .. } => message.len(),
                    }
            }
            Op::Start { worker, .. } => SMALL + worker.len(),
            Op::Lose { reason, .. } => SMALL + reason.len(),
            Op::Move { from, to, .. } => SMALL + from.len() + to.len(),
            Op::Cancel { .. }
            | Op::Retry { .. }
            | Op::RestoreBegin { .. }
            | Op::RestoreAbort { .. } => SMALL,
            Op::Memory(m) => SMALL + swarm_codec::encoded_len(m).unwrap_or(usize::MAX / 4),
            Op::SwarmCreate { record } => {
                SMALL + swarm_codec::encoded_len(record).unwrap_or(usize::MAX / 4)
            }
            Op::SwarmDelete { name } => SMALL + name.len(),
            Op::Purge { ids, .. } => SMALL + 10 * ids.len(),
            Op::RestoreChunk { tasks, memory, .. } => {
                SMALL
                    + memory.len()
                    + tasks
                        .iter()
                        .map(|t| t.spec.size_hint() + 256)
                        .sum::<usize>()
            }
            Op::RestoreTasks { tasks, memory, .. } => {
                SMALL + memory.len() + tasks.iter().map(Task::size_hint).sum::<usize>()
            }
            Op::RestoreCommit { meta, .. } => {
                SMALL + swarm_codec::encoded_len(meta).unwrap_or(usize::MAX / 4)
            }
            Op::Access(a) => SMALL + swarm_codec::encoded_len(a).unwrap_or(usize::MAX / 4),
            Op::Ledger(l) => SMALL + swarm_codec::encoded_len(l).unwrap_or(usize::MAX / 4),
            Op::Schedule(s) => SMALL + swarm_codec::encoded_len(s).unwrap_or(usize::MAX / 4),
            Op::Limits(l) => SMALL + swarm_codec::encoded_len(l).unwrap_or(usize::MAX / 4),
            Op::Decide { by, comment, .. } => {
                SMALL + by.len() + comment.as_ref().map_or(0, String::len)
            }
            Op::ExpireApprovals { ids, .. } => SMALL + 10 * ids.len(),
            Op::Callback(CallbackOp::Failed { error, .. }) => SMALL + error.len(),
            Op::Callback(CallbackOp::Delivered { .. }) => SMALL,
        }
    }
}

/// What [`Op::Report`] records: an attempt's end, as [`Op::Finish`] carries it, with the
/// attempt's log tail and token usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub attempt: AttemptRef,
    pub worker: String,
    pub outcome: Outcome,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub now_ms: u64,
    pub retry_at_ms: u64,
    pub log: LogTail,
    pub usage: Option<Usage>,
}

/// The table-wide facts a backup carries besides its tasks and memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoredMeta {
    pub next_id: TaskId,
    pub swarms: BTreeMap<String, SwarmRecord>,
}

/// The result of applying one [`Command`]: one entry per op, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandResponse {
    pub results: Vec<OpResult>,
}

/// The result of applying one [`Op`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpResult {
    /// The task exists now; `duplicate` when it already existed under the same key.
    Submitted { id: TaskId, duplicate: bool },
    /// Refused: `limit` unfinished tasks already.
    QueueFull { limit: u64 },
    /// The op changed the task; `state` is its state now.
    Applied { state: TaskState },
    /// The op was a no-op (stale attempt, task already final, replay); `state` is unchanged.
    Ignored { state: TaskState },
    /// A cancel took effect; `running` is the attempt to stop on its worker, if any.
    Cancelled {
        running: Option<(String, AttemptRef)>,
    },
    /// No task with that id was ever submitted.
    NotFound,
    /// The task finished and was purged after its retention.
    Expired,
    /// What a memory op did, or why it was refused (identically on every replica).
    Memory(Result<OpOutcome, MemoryFault>),
    /// A restore op: how much the restore brought back (on commit), or why it was refused.
    Restored(Result<RestoreSummary, String>),
    /// A swarm op took effect, or why it was refused (a submit to an unknown swarm too).
    Swarm(Result<(), SwarmFault>),
    /// How many of a purge's ids were purged.
    Purged { purged: u64 },
    /// Refused: a restore is in progress and the replica takes no other change.
    Restoring,
    /// An access op took effect, or why it was refused.
    Access(Result<(), AccessFault>),
    /// A ledger op took effect.
    Ledger,
    /// A graph was submitted: its tasks' ids, step by step; `duplicate` when every step
    /// already existed under its idempotency key.
    Graph { ids: Vec<TaskId>, duplicate: bool },
    /// A submit with flow controls was refused (a bad parent, too many dependants, ...).
    Refused(FlowFault),
    /// What a schedule op did, or why it was refused (identically on every replica).
    Schedule(Result<ScheduleOutcome, ScheduleFault>),
    /// A limits op took effect, or why it was refused.
    Limits(Result<(), LimitsFault>),
    /// How many of an [`Op::ExpireApprovals`]' tasks failed with `approval_timeout`.
    ApprovalsExpired { expired: u64 },
    /// What an [`Op::Callback`] did to the outbox.
    Callback(callbacks::Applied),
}

/// What a restore brought back (so far, for a chunk; in all, for the commit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreSummary {
    pub tasks: u64,
    pub collections: u64,
    pub patterns: u64,
}

/// A refused memory op: the [`swarm_memory::MemoryError`] code and message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryFault {
    pub code: String,
    pub message: String,
}

impl From<swarm_memory::MemoryError> for MemoryFault {
    fn from(e: swarm_memory::MemoryError) -> Self {
        MemoryFault {
            code: e.code().to_string(),
            message: e.to_string(),
        }
    }
}

/// Apply one committed command that does not [`Command::touches_memory`] to a replica's
/// task table (the caller need not lock the memory store; see [`apply_memory_command`]
/// for the others). Deterministic. `archive` is the replica's checkpoint store, read for
/// finished tasks and keys; an error from it (a failing disk) stops the apply.
pub fn apply_command(
    table: &mut TaskTable,
    cmd: &Command,
    archive: &dyn Archive,
) -> Result<CommandResponse, ArchiveError> {
    let mut results = Vec::with_capacity(cmd.ops.len());
    for op in &cmd.ops {
        if op.touches_memory() {
            return Err(ArchiveError(
                "a memory op was applied without the memory store".into(),
            ));
        }
        results.push(table.apply_op(op, archive)?);
    }
    Ok(CommandResponse { results })
}

/// Memory writes wait for a restore to end; swapping in a rebuilt graph or naming a graph
/// copy does not (they change no data, and the leader would otherwise propose them again
/// every second).
fn refused_while_restoring(m: &MemoryOp) -> bool {
    !matches!(
        m,
        MemoryOp::FinishRebuild { .. } | MemoryOp::AdvanceIndex { .. }
    )
}

/// Applies a command that [`Command::touches_memory`]: memory ops go to the memory store,
/// restore ops to both, everything else to the task table. A `PatternJudge` or a
/// `DistillQueue` of a task that comes after that task's `Finish` (a worker's report, the
/// judgement of the patterns its agent used and its place in the distillation outbox,
/// proposed together) applies only if the `Finish` did: each recorded result is judged
/// and queued for distillation exactly once, in the same entry. `table` locks the table, and
/// is called only for the table's part of each op: a memory op itself — an HNSW insert
/// of a large batch, the swap of a rebuilt graph — runs with the table free, so task
/// reads and dispatch go on meanwhile. The caller holds the memory store for the whole
/// command. Deterministic, like [`apply_command`].
pub fn apply_memory_command<G: std::ops::DerefMut<Target = TaskTable>>(
    mut table: impl FnMut() -> G,
    memory: &mut MemoryStore,
    cmd: &Command,
    archive: &dyn Archive,
) -> Result<CommandResponse, ArchiveError> {
    let mut results: Vec<OpResult> = Vec::with_capacity(cmd.ops.len());
    for (i, op) in cmd.ops.iter().enumerate() {
        let result = match op {
            Op::Memory(m) if refused_while_restoring(m) && table().restoring().is_some() => {
                OpResult::Restoring
            }
            Op::Memory(MemoryOp::PatternJudge {
                task_id: Some(task),
                ..
            }) if follows_an_unrecorded_finish(&cmd.ops, &results, i, *task) => {
                OpResult::Memory(Ok(OpOutcome::Judged {
                    updated: Vec::new(),
                    missing: Vec::new(),
                }))
            }
            Op::Memory(MemoryOp::DistillQueue { task_id, .. })
                if follows_an_unrecorded_finish(&cmd.ops, &results, i, *task_id) =>
            {
                OpResult::Memory(Ok(OpOutcome::DistillQueued {
                    queued: false,
                    waiting: memory.distill_waiting() as u64,
                }))
            }
            Op::Memory(m) => {
                let r = memory.apply(m.clone()).map_err(MemoryFault::from);
                table().note_memory_change();
                OpResult::Memory(r)
            }
            other => apply_whole_replica_op(&mut table(), memory, other, archive)?,
        };
        results.push(result);
    }
    Ok(CommandResponse { results })
}

/// Whether op `i`, about a result of `task` (a judgement, a distillation), comes after a
/// `Finish` of that task in the same command that was not recorded (`results` holds the
/// results of the ops before `i`): the op then belongs to a result that does not count.
fn follows_an_unrecorded_finish(ops: &[Op], results: &[OpResult], i: usize, task: TaskId) -> bool {
    let Some(prev) = ops[..i].iter().rposition(|op| match op {
        Op::Finish { attempt, .. } => attempt.task_id == task,
        Op::Report(r) => r.attempt.task_id == task,
        _ => false,
    }) else {
        return false;
    };
    !matches!(results.get(prev), Some(OpResult::Applied { .. }))
}

/// A restore op (they need both state machines) or a task-table op; memory ops are
/// [`apply_memory_command`]'s.
fn apply_whole_replica_op(
    table: &mut TaskTable,
    memory: &mut MemoryStore,
    op: &Op,
    archive: &dyn Archive,
) -> Result<OpResult, ArchiveError> {
    Ok(match op {
        Op::RestoreBegin { restore_id, now_ms } => {
            OpResult::Restored(table.restore_begin(*restore_id, *now_ms, memory))
        }
        Op::RestoreCommit {
            restore_id,
            chunks,
            tasks,
            meta,
        } => {
            let staged = match table.restore_commit_check(*restore_id, *chunks, *tasks) {
                Ok(()) => table.staged_memory(archive)?,
                Err(e) => return Ok(OpResult::Restored(Err(e))),
            };
            // A backup without a memory section restores an empty store.
            let restored = if staged.is_empty() {
                MemoryStore::new(memory.config().clone())
                    .map_err(|e| format!("creating the memory store: {e}"))
            } else {
                MemoryStore::restore_bytes(&staged)
                    .map_err(|e| format!("the backup's memory store does not load: {e}"))
            };
            match restored {
                Ok(m) => {
                    *memory = m;
                    table.note_memory_change();
                    let mut summary = table.restore_commit(meta);
                    summary.collections = memory.list_collections().len() as u64;
                    summary.patterns = memory.pattern_count() as u64;
                    OpResult::Restored(Ok(summary))
                }
                Err(reason) => {
                    // The backup is unusable: give the whole restore up, on every replica.
                    let _ = table.restore_abort(*restore_id, memory);
                    OpResult::Restored(Err(reason))
                }
            }
        }
        Op::RestoreAbort { restore_id } => {
            OpResult::Restored(table.restore_abort(*restore_id, memory))
        }
        other => table.apply_op(other, archive)?,
    })
}

/// How one attempt ended, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AttemptEnd {
    Succeeded,
    Failed {
        kind: FailureKind,
        message: String,
    },
    Lost {
        reason: String,
    },
    Cancelled,
    /// Handed back by a draining worker (not started, or cut short at its drain timeout);
    /// does not count against `max_attempts`.
    Released {
        reason: String,
    },
    /// One of the ends above, with what the attempt logged and the tokens it used
    /// (reported by protocol 6 workers). A variant of its own, so that tasks recorded
    /// before it keep their encoding; never nested (see [`LoggedEnd`]).
    Logged(Box<LoggedEnd>),
}

/// An attempt's end with its log tail and usage ([`AttemptEnd::Logged`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "LoggedEndWire")]
pub struct LoggedEnd {
    /// How the attempt ended; never `Logged` itself.
    pub end: AttemptEnd,
    pub log: LogTail,
    pub usage: Option<Usage>,
}

/// [`LoggedEnd`] as decoded: its end is read as a [`PlainEnd`], so no encoding can nest
/// `Logged` ends (a deep nesting would take the decoder's stack).
#[derive(Deserialize)]
struct LoggedEndWire {
    end: PlainEnd,
    log: LogTail,
    usage: Option<Usage>,
}

/// The variants of [`AttemptEnd`] before `Logged`, encoded the same.
#[derive(Deserialize)]
enum PlainEnd {
    Succeeded,
    Failed { kind: FailureKind, message: String },
    Lost { reason: String },
    Cancelled,
    Released { reason: String },
}

impl From<LoggedEndWire> for LoggedEnd {
    fn from(w: LoggedEndWire) -> Self {
        let end = match w.end {
            PlainEnd::Succeeded => AttemptEnd::Succeeded,
            PlainEnd::Failed { kind, message } => AttemptEnd::Failed { kind, message },
            PlainEnd::Lost { reason } => AttemptEnd::Lost { reason },
            PlainEnd::Cancelled => AttemptEnd::Cancelled,
            PlainEnd::Released { reason } => AttemptEnd::Released { reason },
        };
        LoggedEnd {
            end,
            log: w.log,
            usage: w.usage,
        }
    }
}

impl AttemptEnd {
    /// `end` with `log` and `usage` attached, when there is anything to attach.
    pub fn with_log(self, log: Option<&LogTail>, usage: Option<&Usage>) -> AttemptEnd {
        let log = log.filter(|l| !l.is_empty() || l.offset > 0);
        if log.is_none() && usage.is_none() {
            return self;
        }
        let end = match self {
            AttemptEnd::Logged(l) => l.end,
            plain => plain,
        };
        AttemptEnd::Logged(Box::new(LoggedEnd {
            end,
            log: log.cloned().unwrap_or_default(),
            usage: usage.cloned(),
        }))
    }

    /// How the attempt ended, whatever it logged.
    pub fn plain(&self) -> &AttemptEnd {
        match self {
            AttemptEnd::Logged(l) => &l.end,
            plain => plain,
        }
    }
}

/// One attempt of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    /// The ring stage this attempt ran (0 for single-stage tasks).
    pub stage: u32,
    pub worker: String,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub end: Option<AttemptEnd>,
}

/// A task and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub spec: TaskSpec,
    pub state: TaskState,
    pub attempts: Vec<Attempt>,
    #[serde(with = "serde_bytes")]
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// When a finished task's retention ends and it may be purged.
    pub expires_at_ms: Option<u64>,
    /// A queued retry may not start before this time.
    pub not_before_ms: u64,
    /// The stage the task is at: the next attempt runs this stage.
    pub stage: u32,
    /// Attempts made before the current stage began (retries are counted per stage).
    pub stage_base: u32,
    /// Attempts of the current stage handed back by draining workers: they do not count
    /// against `max_attempts`.
    pub released: u32,
    /// Outputs of the completed stages, in order; stage `i + 1`'s input is `[i]`.
    pub stage_outputs: Vec<Vec<u8>>,
    /// Times the task's attempt moved between workers (mesh steals).
    pub moves: u32,
    /// Its place in a task graph and its flow controls; `None` when it uses none (state
    /// format 2 on; older tasks read as `None`, see [`format1`]).
    pub flow: Option<Box<Flow>>,
}

impl Attempt {
    /// How the attempt ended (`None` while it runs), whatever it logged.
    pub fn outcome(&self) -> Option<&AttemptEnd> {
        self.end.as_ref().map(AttemptEnd::plain)
    }

    /// The tail of the attempt's output, when its worker reported one.
    pub fn log(&self) -> Option<&LogTail> {
        match &self.end {
            Some(AttemptEnd::Logged(l)) => Some(&l.log),
            _ => None,
        }
    }

    /// The tokens the attempt used, when its agent reported them.
    pub fn usage(&self) -> Option<&Usage> {
        match &self.end {
            Some(AttemptEnd::Logged(l)) => l.usage.as_ref(),
            _ => None,
        }
    }
}

impl Task {
    /// The attempt currently running, if the task is running.
    pub fn running_attempt(&self) -> Option<&Attempt> {
        if self.state != TaskState::Running {
            return None;
        }
        self.attempts.last().filter(|a| a.end.is_none())
    }

    /// Attempts of the current stage up to `attempt` that count against `max_attempts`
    /// (those handed back by draining workers do not).
    pub fn attempts_counted(&self, attempt: u32) -> u32 {
        attempt
            .saturating_sub(self.stage_base)
            .saturating_sub(self.released)
    }

    /// The number the next attempt will carry.
    pub fn next_attempt(&self) -> u32 {
        self.attempts
            .last()
            .map_or(1, |a| a.number.saturating_add(1))
    }

    /// The concurrency key the task runs under, if any.
    pub fn concurrency_key(&self) -> Option<&str> {
        self.flow.as_ref()?.concurrency_key.as_deref()
    }

    /// The rate limit a start of the task draws from, if any.
    pub fn rate_limit(&self) -> Option<&str> {
        self.flow.as_ref()?.rate_limit.as_deref()
    }

    /// Whether the task is under a flow control whose count must survive a leader
    /// change: its attempts are recorded as started before they are sent (see
    /// `scheduler::Dispatch::record_first`).
    pub fn is_limited(&self) -> bool {
        self.concurrency_key().is_some() || self.rate_limit().is_some()
    }

    /// The agent the next (or current) attempt runs: the current stage's for a ring task.
    pub fn current_agent(&self) -> &str {
        self.spec.agent_of(self.stage)
    }

    /// The input of the next (or current) attempt: the previous stage's output for a
    /// ring task past its first stage, the payload otherwise.
    pub fn current_input(&self) -> &[u8] {
        match (self.stage as usize).checked_sub(1) {
            Some(prev) => self
                .stage_outputs
                .get(prev)
                .map_or(&self.spec.payload[..], |o| &o[..]),
            None => &self.spec.payload,
        }
    }

    /// Bytes this task takes in memory or in an encoding, roughly.
    pub fn size_hint(&self) -> usize {
        self.spec.size_hint()
            + self.output.as_ref().map_or(0, Vec::len)
            + self.error.as_ref().map_or(0, String::len)
            + self
                .attempts
                .iter()
                .map(|a| 48 + a.worker.len() + a.log().map_or(0, |l| l.len() + 32))
                .sum::<usize>()
            + self.stage_outputs.iter().map(Vec::len).sum::<usize>()
            + self.flow.as_ref().map_or(0, |f| f.size_hint())
            + 96
    }

    /// The API view of this task.
    pub fn view(&self) -> TaskView {
        TaskView {
            id: self.id,
            agent: self.current_agent().to_string(),
            state: self.state,
            priority: self.spec.priority,
            timeout_ms: self.spec.timeout_ms,
            max_attempts: self.spec.max_attempts,
            idempotency_key: self.spec.idempotency_key.clone(),
            labels: self.spec.labels.clone(),
            patterns: self.spec.patterns,
            payload: BytesView::new(self.spec.payload.clone()),
            attempts: self.attempts.iter().map(attempt_view).collect(),
            output: self.output.clone().map(BytesView::new),
            error: self.error.clone(),
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms,
            expires_at_ms: self.expires_at_ms,
            swarm: self.spec.swarm.clone(),
            stages: self.spec.stages.iter().map(|s| s.to_string()).collect(),
            stage: self.stage,
            stage_outputs: self
                .stage_outputs
                .iter()
                .map(|o| String::from_utf8_lossy(o).into_owned())
                .collect(),
            moves: self.moves,
            usage: self.usage_total(),
            held: None,
            parents: self
                .flow
                .as_ref()
                .map(|f| f.parents.clone())
                .unwrap_or_default(),
            children: self
                .flow
                .as_ref()
                .map(|f| f.children.clone())
                .unwrap_or_default(),
            waiting_on: self.flow.as_ref().map_or(0, |f| f.waiting_on),
            step: self.flow.as_ref().and_then(|f| f.step.clone()),
            concurrency_key: self.flow.as_ref().and_then(|f| f.concurrency_key.clone()),
            rate_limit: self.flow.as_ref().and_then(|f| f.rate_limit.clone()),
            approval: self.flow.as_ref().and_then(|f| approval_view(f)),
            callback: self.flow.as_ref().and_then(|f| callback_view(f)),
        }
    }

    /// Tokens all attempts used (the model of the last that reported any).
    pub fn usage_total(&self) -> Option<swarm_proto::api::UsageView> {
        self.attempts.iter().filter_map(Attempt::usage).fold(
            None,
            |acc: Option<swarm_proto::api::UsageView>, u| {
                let mut t = acc.unwrap_or_default();
                t.model = u.model.clone();
                t.prompt_tokens = t.prompt_tokens.saturating_add(u.prompt_tokens);
                t.completion_tokens = t.completion_tokens.saturating_add(u.completion_tokens);
                Some(t)
            },
        )
    }
}

/// A task's approval as the API shows it (`None` when it requires none).
fn approval_view(f: &Flow) -> Option<swarm_proto::api::ApprovalView> {
    let (timeout_ms, deadline_ms) = f.approval()?;
    Some(swarm_proto::api::ApprovalView {
        timeout_ms,
        deadline_ms,
        decision: f.decision().map(|(approved, by, comment, at_ms)| {
            swarm_proto::api::DecisionView {
                approved,
                by: by.to_string(),
                at_ms,
                comment: comment.map(str::to_string),
            }
        }),
    })
}

/// A task's callback as the API shows it (`None` when it has none).
fn callback_view(f: &Flow) -> Option<swarm_proto::api::CallbackView> {
    let url = f.callback_url()?.to_string();
    let mut v = swarm_proto::api::CallbackView {
        url,
        state: "pending".into(),
        attempts: None,
        status: None,
        error: None,
        at_ms: None,
    };
    if let Some(flow::FlowAttr::CallbackResult {
        delivered,
        attempts,
        status,
        error,
        at_ms,
    }) = f.callback_result()
    {
        v.state = if *delivered { "delivered" } else { "failed" }.into();
        v.attempts = Some(*attempts);
        v.status = *status;
        v.error = error.clone();
        v.at_ms = Some(*at_ms);
    }
    Some(v)
}

pub fn attempt_view(a: &Attempt) -> AttemptView {
    let (outcome, error) = match a.outcome() {
        None => (None, None),
        Some(AttemptEnd::Logged(_)) => (None, None),
        Some(AttemptEnd::Succeeded) => (Some("succeeded"), None),
        Some(AttemptEnd::Failed { kind, message }) => (
            Some("failed"),
            Some(format!("{}: {message}", kind.as_str())),
        ),
        Some(AttemptEnd::Lost { reason }) => (Some("lost"), Some(reason.clone())),
        Some(AttemptEnd::Cancelled) => (Some("cancelled"), None),
        Some(AttemptEnd::Released { reason }) => (Some("released"), Some(reason.clone())),
    };
    AttemptView {
        attempt: a.number,
        stage: a.stage,
        worker: a.worker.clone(),
        started_at_ms: a.started_at_ms,
        finished_at_ms: a.finished_at_ms,
        outcome: outcome.map(str::to_string),
        error,
        output_bytes: a.log().map_or(0, LogTail::end),
        usage: a.usage().map(|u| swarm_proto::api::UsageView {
            model: u.model.clone(),
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        }),
    }
}
