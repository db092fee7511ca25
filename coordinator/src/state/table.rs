//! [`TaskTable`]: live tasks and their indexes in memory, the changes since the last
//! checkpoint, and the rules every op follows.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use swarm_memory::MemoryStore;
use swarm_proto::api::{TaskOrder, TaskState};
use swarm_proto::worker::{AttemptRef, FailureKind, LogTail, Outcome, Usage};
use swarm_proto::TaskId;
use swarm_topology::DEFAULT_SWARM_NAME;

use super::access::Access;
use super::callbacks::{self, CallbackOp, Callbacks};
use super::flow::{self, Flow, FlowAttr, FlowFault, GraphStep};
use super::layers::Layers;
use super::ledger::Ledger;
use super::limits::{Limits, LimitsFault, LimitsOp};
use super::run_queue::RunQueue;
use super::schedules::{ScheduleFault, ScheduleOp, ScheduleOutcome, Schedules};
use super::{
    Archive, ArchiveError, Attempt, AttemptEnd, Changes, Op, OpResult, RestoreState,
    RestoreSummary, RestoredMeta, SwarmFault, SwarmRecord, TableMeta, Task, TaskSpec,
};

/// Attempts of one stage that draining workers may hand back without counting; past
/// this, a drained attempt counts like a lost one (so a task's attempt list stays
/// bounded however often its workers drain).
pub const MAX_RELEASES_PER_STAGE: u32 = 100;

/// Most task ids one [`Op::Purge`] carries.
pub const MAX_PURGE_PER_OP: usize = 4096;

/// Something a non-Raft component should react to, produced while applying.
#[derive(Debug, Clone, PartialEq)]
pub enum TableEvent {
    /// The task reached a final state (wake waiters; stop any attempt still running).
    Finalized(TaskId, TaskState),
    /// The task (re-)entered the queue, waiting to run this attempt number: an attempt in
    /// flight with a lower number has ended. (One planned at this number already was
    /// dispatched after this change applied, and stays.)
    Queued(TaskId, u32),
    /// An attempt of the task started, or moved to another worker (live output follows
    /// it).
    Running(TaskId),
}

/// Events kept at most when nobody drains them (a bound, not a working size).
const MAX_PENDING_EVENTS: usize = 1_000_000;

/// What a lookup of one task found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Found(Arc<Task>),
    /// The task finished and was purged after its retention.
    Expired,
    /// No task with that id was ever submitted.
    Unknown,
}

/// Live tasks (queued and running) with their indexes, the table-wide metadata, and the
/// changes since the last checkpoint. See the [module docs](super) for the layout.
#[derive(Debug, Default)]
pub struct TaskTable {
    live: BTreeMap<TaskId, Arc<Task>>,
    queue: RunQueue,
    /// Ids of live tasks by state (queued, running).
    by_state: BTreeMap<TaskState, BTreeSet<TaskId>>,
    meta: TableMeta,
    /// API tokens, revoked certificates and enrolled names: copied on change, stored
    /// whole by the next checkpoint after a change.
    access: Arc<Access>,
    access_flush: Flush<Access>,
    /// Token usage and budgets: copied on change, stored whole like `access`.
    ledger: Arc<Ledger>,
    ledger_flush: Flush<Ledger>,
    /// The schedules: copied on change, stored whole like `access`.
    schedules: Arc<Schedules>,
    schedules_flush: Flush<Schedules>,
    /// The named limits: copied on change, stored whole like `access`.
    limits: Arc<Limits>,
    limits_flush: Flush<Limits>,
    /// The callback outbox: changed in place (copied once after a checkpoint takes it),
    /// stored whole like `access`.
    callbacks: Arc<Callbacks>,
    callbacks_flush: Flush<Callbacks>,
    changes: Changes,
    /// The changes a checkpoint is writing to the archive right now.
    flushing: Option<Arc<Changes>>,
    /// Events since the node last drained them; not part of the replicated state.
    events: Vec<TableEvent>,
}

/// What a checkpoint writes: the changes (now readable as [`TaskTable::flushing`] until
/// [`TaskTable::checkpoint_written`]), the current value of every live task they name,
/// and the metadata.
#[derive(Debug)]
pub struct CheckpointDelta {
    pub changes: Arc<Changes>,
    pub live: Vec<Arc<Task>>,
    pub meta: TableMeta,
    /// The access state, when it changed since the last checkpoint.
    pub access: Option<Arc<Access>>,
    /// The ledger, when it changed since the last checkpoint.
    pub ledger: Option<Arc<Ledger>>,
    /// The schedules, when they changed since the last checkpoint.
    pub schedules: Option<Arc<Schedules>>,
    /// The limits, when they changed since the last checkpoint.
    pub limits: Option<Arc<Limits>>,
    /// The callback outbox, when it changed since the last checkpoint.
    pub callbacks: Option<Arc<Callbacks>>,
}

/// Which value of a record stored whole (like [`Access`]) the archive holds, and which
/// one the checkpoint being written carries: a checkpoint writes the record only when
/// it changed (a change replaces the `Arc`).
#[derive(Debug)]
struct Flush<T> {
    /// `None`: unknown, so the next checkpoint writes it.
    stored: Option<Arc<T>>,
    flushing: Option<Arc<T>>,
}

impl<T> Default for Flush<T> {
    fn default() -> Self {
        Flush {
            stored: None,
            flushing: None,
        }
    }
}

impl<T> Flush<T> {
    fn stored(value: &Arc<T>) -> Self {
        Flush {
            stored: Some(value.clone()),
            flushing: None,
        }
    }

    /// A checkpoint begins: what it must write of `current` (`None`: unchanged).
    fn begin(&mut self, current: &Arc<T>) -> Option<Arc<T>> {
        let unchanged = self
            .stored
            .as_ref()
            .is_some_and(|stored| Arc::ptr_eq(stored, current));
        self.flushing = (!unchanged).then(|| current.clone());
        self.flushing.clone()
    }

    fn written(&mut self) {
        if let Some(v) = self.flushing.take() {
            self.stored = Some(v);
        }
    }

    /// The archive holds what it held: the next checkpoint writes the record if it
    /// differs from that.
    fn failed(&mut self) {
        self.flushing = None;
    }
}

impl TaskTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuild a table from a checkpoint: its metadata and its live tasks.
    pub fn from_checkpoint(
        meta: TableMeta,
        access: Access,
        ledger: Ledger,
        schedules: Schedules,
        limits: Limits,
        callbacks: Callbacks,
        live: Vec<Task>,
    ) -> anyhow::Result<Self> {
        let access = Arc::new(access);
        let ledger = Arc::new(ledger);
        let schedules = Arc::new(schedules);
        let limits = Arc::new(limits);
        let callbacks = Arc::new(callbacks);
        let mut t = TaskTable {
            meta,
            access_flush: Flush::stored(&access),
            access,
            ledger_flush: Flush::stored(&ledger),
            ledger,
            schedules_flush: Flush::stored(&schedules),
            schedules,
            limits_flush: Flush::stored(&limits),
            limits,
            callbacks_flush: Flush::stored(&callbacks),
            callbacks,
            ..Default::default()
        };
        for task in live {
            anyhow::ensure!(
                !task.state.is_final(),
                "task {} is {:?} in the live table",
                task.id,
                task.state
            );
            anyhow::ensure!(
                task.id <= t.meta.next_id,
                "task {} is beyond the last id handed out ({})",
                task.id,
                t.meta.next_id
            );
            t.index_live(Arc::new(task));
        }
        t.check_indexes()?;
        Ok(t)
    }

    fn index_live(&mut self, task: Arc<Task>) {
        if task.state == TaskState::Queued {
            self.queue.insert(&task);
        }
        self.by_state.entry(task.state).or_default().insert(task.id);
        self.live.insert(task.id, task);
    }

    fn layers<'a>(&'a self, archive: &'a dyn Archive) -> Layers<'a> {
        Layers {
            changes: &self.changes,
            flushing: self.flushing.as_deref(),
            archive,
        }
    }

    /// Apply one task-table op. Deterministic: same ops, same table. `archive` is read
    /// for finished tasks and idempotency keys; it is never written.
    pub fn apply_op(&mut self, op: &Op, archive: &dyn Archive) -> Result<OpResult, ArchiveError> {
        // Credentials stay manageable while a restore runs; the backup's schedules arrive
        // meanwhile.
        if self.meta.restore.is_some()
            && !matches!(
                op,
                Op::RestoreChunk { .. }
                    | Op::RestoreTasks { .. }
                    | Op::Access(_)
                    | Op::Schedule(ScheduleOp::Restore { .. })
                    | Op::Limits(_)
            )
        {
            return Ok(OpResult::Restoring);
        }
        Ok(match op {
            Op::Submit {
                spec,
                now_ms,
                queue_limit,
            } => self.submit(spec, None, *now_ms, *queue_limit, archive)?,
            Op::Start {
                attempt,
                worker,
                now_ms,
            } => match self.live.contains_key(&attempt.task_id) {
                true => self.start(*attempt, worker, *now_ms),
                false => self.not_live(attempt.task_id, archive)?,
            },
            Op::Finish {
                attempt,
                worker,
                outcome,
                started_at_ms,
                finished_at_ms,
                now_ms,
                retry_at_ms,
            } => match self.live.contains_key(&attempt.task_id) {
                true => self.finish(
                    *attempt,
                    worker,
                    outcome,
                    (*started_at_ms, *finished_at_ms),
                    (*now_ms, *retry_at_ms),
                    (None, None),
                ),
                false => self.not_live(attempt.task_id, archive)?,
            },
            Op::Report(r) => match self.live.contains_key(&r.attempt.task_id) {
                true => self.finish(
                    r.attempt,
                    &r.worker,
                    &r.outcome,
                    (r.started_at_ms, r.finished_at_ms),
                    (r.now_ms, r.retry_at_ms),
                    (Some(&r.log), r.usage.as_ref()),
                ),
                false => self.not_live(r.attempt.task_id, archive)?,
            },
            Op::Lose {
                attempt,
                reason,
                now_ms,
                retry_at_ms,
            } => match self.live.contains_key(&attempt.task_id) {
                true => self.lose(*attempt, reason, *now_ms, *retry_at_ms),
                false => self.not_live(attempt.task_id, archive)?,
            },
            Op::Cancel { task_id, now_ms } => match self.live.contains_key(task_id) {
                true => self.cancel(*task_id, *now_ms),
                false => self.not_live(*task_id, archive)?,
            },
            Op::Move {
                attempt,
                from,
                to,
                now_ms,
            } => match self.live.contains_key(&attempt.task_id) {
                true => self.move_attempt(*attempt, from, to, *now_ms),
                false => self.not_live(attempt.task_id, archive)?,
            },
            Op::Retry { task_id, now_ms } => match self.live.get(task_id) {
                Some(t) => OpResult::Ignored { state: t.state },
                None => self.retry(*task_id, *now_ms, archive)?,
            },
            Op::SubmitFlow {
                spec,
                flow,
                now_ms,
                queue_limit,
            } => self.submit(spec, Some(flow), *now_ms, *queue_limit, archive)?,
            Op::Graph {
                steps,
                now_ms,
                queue_limit,
            } => self.submit_graph(steps, *now_ms, *queue_limit, archive)?,
            Op::SwarmCreate { record } => OpResult::Swarm(self.create_swarm(record)),
            Op::SwarmDelete { name } => OpResult::Swarm(self.delete_swarm(name)),
            Op::Purge { ids, now_ms } => self.purge(ids, *now_ms, archive)?,
            Op::Access(op) => OpResult::Access(Arc::make_mut(&mut self.access).apply(op)),
            Op::Ledger(op) => {
                Arc::make_mut(&mut self.ledger).apply(op);
                OpResult::Ledger
            }
            Op::Schedule(op) => OpResult::Schedule(self.apply_schedule(op, archive)?),
            Op::Limits(op) => OpResult::Limits(self.apply_limits(op)),
            Op::Decide {
                task_id,
                approve,
                by,
                comment,
                now_ms,
            } => match self.live.contains_key(task_id) {
                true => self.decide(*task_id, *approve, by, comment.as_deref(), *now_ms),
                false => self.not_live(*task_id, archive)?,
            },
            Op::ExpireApprovals { ids, now_ms } => self.expire_approvals(ids, *now_ms),
            Op::Callback(op) => OpResult::Callback(self.apply_callback(op, archive)?),
            Op::RestoreChunk {
                restore_id,
                seq,
                tasks,
                memory,
            } => {
                let tasks: Vec<Task> = tasks.iter().cloned().map(Task::from).collect();
                OpResult::Restored(self.restore_chunk(*restore_id, *seq, &tasks, memory))
            }
            Op::RestoreTasks {
                restore_id,
                seq,
                tasks,
                memory,
            } => OpResult::Restored(self.restore_chunk(*restore_id, *seq, tasks, memory)),
            // Routed by `apply_command`: they need the memory store too.
            Op::Memory(_)
            | Op::RestoreBegin { .. }
            | Op::RestoreCommit { .. }
            | Op::RestoreAbort { .. } => OpResult::Restored(Err(
                "memory and restore ops apply to a whole replica, not a bare task table".into(),
            )),
        })
    }

    /// Apply a command to a table that has never been checkpointed (tests).
    #[cfg(test)]
    pub(crate) fn apply(&mut self, cmd: &super::Command) -> super::CommandResponse {
        let results = cmd
            .ops
            .iter()
            .map(|op| {
                self.apply_op(op, &super::NoArchive)
                    .expect("an empty archive never fails")
            })
            .collect();
        super::CommandResponse { results }
    }

    /// The answer to an op on a task that is not live: finished, purged, or unknown.
    fn not_live(&self, id: TaskId, archive: &dyn Archive) -> Result<OpResult, ArchiveError> {
        Ok(match self.lookup(id, archive)? {
            Lookup::Found(t) => OpResult::Ignored { state: t.state },
            Lookup::Expired => OpResult::Expired,
            Lookup::Unknown => OpResult::NotFound,
        })
    }

    /// A live task, to change: copied first if a checkpoint still holds this version.
    fn live_mut(&mut self, id: TaskId) -> Option<&mut Task> {
        let task = self.live.get_mut(&id)?;
        self.changes.live_dirty.insert(id);
        Some(Arc::make_mut(task))
    }

    fn create_swarm(&mut self, record: &SwarmRecord) -> Result<(), SwarmFault> {
        let name = &record.spec.name;
        record
            .spec
            .validate()
            .map_err(|e| SwarmFault::new(e.code(), e.to_string()))?;
        if name == DEFAULT_SWARM_NAME || self.meta.swarms.contains_key(name) {
            return Err(SwarmFault::new(
                "swarm_exists",
                format!("swarm {name:?} already exists"),
            ));
        }
        self.meta.swarms.insert(name.clone(), record.clone());
        self.meta.swarms_gen += 1;
        Ok(())
    }

    fn delete_swarm(&mut self, name: &str) -> Result<(), SwarmFault> {
        if name == DEFAULT_SWARM_NAME {
            return Err(SwarmFault::new(
                "default_swarm",
                "the default swarm cannot be deleted",
            ));
        }
        if !self.meta.swarms.contains_key(name) {
            return Err(SwarmFault::new(
                "unknown_swarm",
                format!("no swarm named {name:?}"),
            ));
        }
        let busy = self.live.values().filter(|t| t.spec.swarm == name).count();
        if busy > 0 {
            return Err(SwarmFault::new(
                "swarm_busy",
                format!("swarm {name:?} still has {busy} unfinished tasks; cancel them or wait"),
            ));
        }
        self.meta.swarms.remove(name);
        self.meta.swarms_gen += 1;
        Ok(())
    }

    /// Record that `attempt`, running on `from`, now runs on `to`.
    fn move_attempt(&mut self, attempt: AttemptRef, from: &str, to: &str, now_ms: u64) -> OpResult {
        let id = attempt.task_id;
        let Some(task) = self.live.get(&id) else {
            return OpResult::NotFound;
        };
        // A Move may commit before the attempt's Start (both are proposed around the same
        // time): then the attempt is recorded here, on its new worker.
        if task.state == TaskState::Queued && attempt.attempt == task.next_attempt() {
            self.run_next_attempt(attempt, to, now_ms);
            if let Some(task) = self.live_mut(id) {
                task.moves += 1;
            }
            return OpResult::Applied {
                state: TaskState::Running,
            };
        }
        let state = task.state;
        let holds = task
            .attempts
            .last()
            .is_some_and(|a| a.number == attempt.attempt && a.end.is_none() && a.worker == from);
        if !(holds && state == TaskState::Running) {
            return OpResult::Ignored { state };
        }
        if let Some(task) = self.live_mut(id) {
            if let Some(rec) = task.attempts.last_mut() {
                rec.worker = to.to_string();
            }
            task.moves += 1;
        }
        self.push_event(TableEvent::Running(id));
        OpResult::Applied { state }
    }

    /// A defined swarm, or the implicit default one.
    pub fn swarm(&self, name: &str) -> Option<SwarmRecord> {
        if name == DEFAULT_SWARM_NAME {
            return Some(SwarmRecord::default_swarm());
        }
        self.meta.swarms.get(name).cloned()
    }

    /// Every swarm: the default one first, then the defined ones by name.
    pub fn swarms(&self) -> Vec<SwarmRecord> {
        std::iter::once(SwarmRecord::default_swarm())
            .chain(self.meta.swarms.values().cloned())
            .collect()
    }

    /// Changes whenever a swarm is created or deleted.
    /// The named limits (a shared copy: cheap to keep).
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    fn apply_limits(&mut self, op: &LimitsOp) -> Result<(), LimitsFault> {
        // Checked on a copy: a refused op leaves the shared value (and the next
        // checkpoint) alone.
        let mut next = (*self.limits).clone();
        next.apply(op)?;
        self.limits = Arc::new(next);
        Ok(())
    }

    /// The callback outbox (a shared copy: cheap to keep).
    pub fn callbacks(&self) -> &Arc<Callbacks> {
        &self.callbacks
    }

    /// What came of a callback delivery: the outbox moves on, and a delivery that ended
    /// is recorded on its (finished) task.
    fn apply_callback(
        &mut self,
        op: &CallbackOp,
        archive: &dyn Archive,
    ) -> Result<callbacks::Applied, ArchiveError> {
        if self.callbacks.get(op.task_id()).is_none() {
            return Ok(callbacks::Applied::Ignored);
        }
        let applied = Arc::make_mut(&mut self.callbacks).apply(op);
        if let callbacks::Applied::Ended(outcome) = &applied {
            let id = op.task_id();
            if let Some(done) = self.layers(archive).finished(id)? {
                let mut task = Arc::unwrap_or_clone(done);
                task.flow
                    .get_or_insert_default()
                    .set_callback_result(outcome);
                let task = Arc::new(task);
                self.changes.bytes += task.size_hint();
                if let Some(old) = self.changes.finished.insert(id, task) {
                    self.changes.bytes = self.changes.bytes.saturating_sub(old.size_hint());
                }
            }
        }
        Ok(applied)
    }

    /// The API tokens and revoked certificates (a shared copy: cheap to keep).
    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    /// Token usage and budgets.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The schedules.
    pub fn schedules(&self) -> &Arc<Schedules> {
        &self.schedules
    }

    fn apply_schedule(
        &mut self,
        op: &ScheduleOp,
        archive: &dyn Archive,
    ) -> Result<Result<ScheduleOutcome, ScheduleFault>, ArchiveError> {
        let done = |r: Result<(), ScheduleFault>| r.map(|()| ScheduleOutcome::Done);
        Ok(match op {
            ScheduleOp::Create { def, now_ms } => {
                if def.template.swarm != DEFAULT_SWARM_NAME
                    && !self.meta.swarms.contains_key(&def.template.swarm)
                {
                    return Ok(Err(ScheduleFault::new(
                        "unknown_swarm",
                        format!("no swarm named {:?}", def.template.swarm),
                    )));
                }
                done(Arc::make_mut(&mut self.schedules).create(def, *now_ms))
            }
            ScheduleOp::Delete { name } => done(Arc::make_mut(&mut self.schedules).delete(name)),
            ScheduleOp::Pause { name } => done(Arc::make_mut(&mut self.schedules).pause(name)),
            ScheduleOp::Resume { name, now_ms } => {
                done(Arc::make_mut(&mut self.schedules).resume(name, *now_ms))
            }
            ScheduleOp::Fire {
                name,
                tick_ms,
                now_ms,
                queue_limit,
            } => {
                let Some(plan) = self.schedules.plan_fire(name, *tick_ms, *now_ms) else {
                    return Ok(Ok(ScheduleOutcome::Ignored));
                };
                // The tick's task goes in exactly as a client's submit would.
                let submitted =
                    match self.submit(&plan.spec, None, *now_ms, *queue_limit, archive)? {
                        OpResult::Submitted { id, duplicate } => Ok((id, duplicate)),
                        OpResult::QueueFull { limit } => {
                            Err(format!("queue full: {limit} unfinished tasks"))
                        }
                        OpResult::Swarm(Err(f)) => Err(f.message),
                        other => Err(format!("submit refused: {other:?}")),
                    };
                Ok(Arc::make_mut(&mut self.schedules).record_fire(name, &plan, submitted))
            }
            ScheduleOp::Restore {
                restore_id,
                schedules,
            } => match &self.meta.restore {
                Some(r) if r.restore_id == *restore_id => {
                    done(Arc::make_mut(&mut self.schedules).restore(schedules))
                }
                _ => Err(ScheduleFault::new(
                    "no_restore",
                    format!("restore {restore_id:x} is not in progress"),
                )),
            },
        })
    }

    pub fn swarms_gen(&self) -> u64 {
        self.meta.swarms_gen
    }

    /// Unfinished tasks of swarm `name`: (queued, running) in all, and by stage (index
    /// = the stage a task is at; one entry for a swarm that is not a ring).
    pub fn swarm_load(&self, name: &str) -> ((u64, u64), Vec<(u64, u64)>) {
        let mut total = (0, 0);
        let mut stages: Vec<(u64, u64)> = Vec::new();
        for (state, running) in [(TaskState::Queued, false), (TaskState::Running, true)] {
            for t in self.ids_in(state).filter_map(|id| self.live.get(&id)) {
                if t.spec.swarm != name {
                    continue;
                }
                let at = t.stage as usize;
                if stages.len() <= at {
                    stages.resize(at + 1, (0, 0));
                }
                let (q, r) = &mut stages[at];
                if running {
                    *r += 1;
                    total.1 += 1;
                } else {
                    *q += 1;
                    total.0 += 1;
                }
            }
        }
        (total, stages)
    }

    /// The defined swarms (without the default one), by name.
    pub fn defined_swarms(&self) -> &BTreeMap<String, SwarmRecord> {
        &self.meta.swarms
    }

    /// [`Op::Submit`] (`flow` `None`) and [`Op::SubmitFlow`]: a new task, unless its
    /// idempotency key names one; a flow's parents are checked and linked (see
    /// [`super::flow`]).
    fn submit(
        &mut self,
        spec: &TaskSpec,
        flow: Option<&Flow>,
        now_ms: u64,
        queue_limit: u64,
        archive: &dyn Archive,
    ) -> Result<OpResult, ArchiveError> {
        if let Some(key) = &spec.idempotency_key {
            if let Some(id) = self.layers(archive).key(key)? {
                return Ok(OpResult::Submitted {
                    id,
                    duplicate: true,
                });
            }
        }
        if let Some(refused) = self.unknown_swarm(spec) {
            return Ok(refused);
        }
        let parents = flow.map_or(&[][..], |f| &f.parents[..]);
        if let Err(fault) = self.check_parents(parents, 1, archive)? {
            return Ok(OpResult::Refused(fault));
        }
        if self.unfinished() >= queue_limit {
            return Ok(OpResult::QueueFull { limit: queue_limit });
        }
        let id = self.insert_task(spec, flow, now_ms);
        self.link_parents(id, parents, now_ms, archive)?;
        Ok(OpResult::Submitted {
            id,
            duplicate: false,
        })
    }

    /// The refusal of a task that names a swarm that does not exist.
    fn unknown_swarm(&self, spec: &TaskSpec) -> Option<OpResult> {
        (spec.swarm != DEFAULT_SWARM_NAME && !self.meta.swarms.contains_key(&spec.swarm)).then(
            || {
                OpResult::Swarm(Err(SwarmFault::new(
                    "unknown_swarm",
                    format!("no swarm named {:?}", spec.swarm),
                )))
            },
        )
    }

    /// [`Op::Graph`]: every step or none. Steps name earlier steps by index.
    fn submit_graph(
        &mut self,
        steps: &[GraphStep],
        now_ms: u64,
        queue_limit: u64,
        archive: &dyn Archive,
    ) -> Result<OpResult, ArchiveError> {
        if let Err(fault) = flow::check_graph(steps) {
            return Ok(OpResult::Refused(fault));
        }
        // Idempotency: all steps known under their keys is a replay; some is a conflict.
        let mut known = Vec::new();
        for s in steps {
            if let Some(key) = &s.spec.idempotency_key {
                if let Some(id) = self.layers(archive).key(key)? {
                    known.push(id);
                }
            }
        }
        if !known.is_empty() {
            if known.len() == steps.len() {
                return Ok(OpResult::Graph {
                    ids: known,
                    duplicate: true,
                });
            }
            return Ok(OpResult::Refused(FlowFault::new(
                "graph_conflict",
                format!(
                    "{} of the graph's {} steps exist already under their idempotency keys",
                    known.len(),
                    steps.len()
                ),
            )));
        }
        for s in steps {
            if let Some(refused) = self.unknown_swarm(&s.spec) {
                return Ok(refused);
            }
        }
        // External parents: each one's new dependants all count against its limit.
        let mut external: BTreeMap<TaskId, usize> = BTreeMap::new();
        for s in steps {
            for &p in &s.flow.parents {
                *external.entry(p).or_default() += 1;
            }
        }
        for (&p, &n) in &external {
            if let Err(fault) = self.check_parents(&[p], n, archive)? {
                return Ok(OpResult::Refused(fault));
            }
        }
        if self.unfinished().saturating_add(steps.len() as u64) > queue_limit {
            return Ok(OpResult::QueueFull { limit: queue_limit });
        }
        let mut ids: Vec<TaskId> = Vec::with_capacity(steps.len());
        for s in steps {
            let mut flow = s.flow.clone();
            flow.parents
                .extend(s.after.iter().map(|&i| ids[i as usize]));
            let id = self.insert_task(&s.spec, Some(&flow), now_ms);
            self.link_parents(id, &flow.parents, now_ms, archive)?;
            ids.push(id);
        }
        Ok(OpResult::Graph {
            ids,
            duplicate: false,
        })
    }

    /// Whether `parents` may each take `adding` more dependants: known, retained, not
    /// ended other than `succeeded`, below [`flow::MAX_CHILDREN`].
    fn check_parents(
        &self,
        parents: &[TaskId],
        adding: usize,
        archive: &dyn Archive,
    ) -> Result<Result<(), FlowFault>, ArchiveError> {
        if parents.len() > flow::MAX_PARENTS {
            return Ok(Err(FlowFault::new(
                "too_many_parents",
                format!("a task may name at most {} parents", flow::MAX_PARENTS),
            )));
        }
        let mut seen = BTreeSet::new();
        for &p in parents {
            if !seen.insert(p) {
                return Ok(Err(FlowFault::new(
                    "bad_parent",
                    format!("parent {p} is named twice"),
                )));
            }
            let task = match self.lookup(p, archive)? {
                Lookup::Found(t) => t,
                Lookup::Expired => {
                    return Ok(Err(FlowFault::new(
                        "unknown_parent",
                        format!("parent {p} finished and was purged after its retention"),
                    )))
                }
                Lookup::Unknown => {
                    return Ok(Err(FlowFault::new(
                        "unknown_parent",
                        format!("no task {p}"),
                    )))
                }
            };
            if task.state.is_final() && task.state != TaskState::Succeeded {
                return Ok(Err(FlowFault::new(
                    "dependency_failed",
                    format!("parent {p} is {}", task.state.as_str()),
                )));
            }
            let children = task.flow.as_ref().map_or(0, |f| f.children.len());
            if children + adding > flow::MAX_CHILDREN {
                return Ok(Err(FlowFault::new(
                    "too_many_children",
                    format!(
                        "parent {p} has {children} dependants; the limit is {}",
                        flow::MAX_CHILDREN
                    ),
                )));
            }
        }
        Ok(Ok(()))
    }

    /// Record new task `id` as a dependant of each of `parents` (checked by
    /// [`Self::check_parents`]); it waits for those not yet succeeded.
    fn link_parents(
        &mut self,
        id: TaskId,
        parents: &[TaskId],
        now_ms: u64,
        archive: &dyn Archive,
    ) -> Result<(), ArchiveError> {
        if parents.is_empty() {
            return Ok(());
        }
        let mut waiting = 0u32;
        for &p in parents {
            if let Some(parent) = self.live_mut(p) {
                parent.flow.get_or_insert_default().children.push(id);
                waiting += 1;
                continue;
            }
            // A finished (succeeded) parent: its copy in the changes gains the dependant.
            if let Some(done) = self.layers(archive).finished(p)? {
                let mut done = Arc::unwrap_or_clone(done);
                done.flow.get_or_insert_default().children.push(id);
                let done = Arc::new(done);
                let old = self.changes.finished.insert(p, done.clone());
                self.changes.bytes = self
                    .changes
                    .bytes
                    .saturating_sub(old.map_or(0, |o| o.size_hint()))
                    .saturating_add(done.size_hint());
            }
        }
        if waiting > 0 {
            if let Some(task) = self.live_mut(id) {
                task.flow.get_or_insert_default().waiting_on = waiting;
            }
        } else if self
            .live
            .get(&id)
            .is_some_and(|t| t.state == TaskState::Waiting)
        {
            self.release(id, now_ms);
        }
        Ok(())
    }

    /// Add a new task, waiting if it names parents (linked by the caller), else queued.
    fn insert_task(&mut self, spec: &TaskSpec, flow: Option<&Flow>, now_ms: u64) -> TaskId {
        self.meta.next_id += 1;
        let id = self.meta.next_id;
        let mut flow = flow.filter(|f| !f.is_empty()).map(|f| {
            Box::new(Flow {
                children: Vec::new(),
                waiting_on: 0,
                ..f.clone()
            })
        });
        let state = match flow.as_deref_mut() {
            Some(f) if !f.parents.is_empty() => TaskState::Waiting,
            Some(f) if f.needs_approval() => {
                f.start_deadline(now_ms);
                TaskState::AwaitingApproval
            }
            _ => TaskState::Queued,
        };
        let task = Task {
            id,
            spec: spec.clone(),
            state,
            attempts: Vec::new(),
            output: None,
            error: None,
            created_at_ms: now_ms,
            finished_at_ms: None,
            expires_at_ms: None,
            not_before_ms: 0,
            stage: 0,
            stage_base: 0,
            released: 0,
            stage_outputs: Vec::new(),
            moves: 0,
            flow,
        };
        if let Some(key) = &spec.idempotency_key {
            self.changes.keys.insert(key.clone(), Some(id));
        }
        self.changes.live_dirty.insert(id);
        self.index_live(Arc::new(task));
        if state == TaskState::Queued {
            self.push_event(TableEvent::Queued(id, 1));
        }
        id
    }

    fn start(&mut self, attempt: AttemptRef, worker: &str, now_ms: u64) -> OpResult {
        let id = attempt.task_id;
        let Some(task) = self.live.get(&id) else {
            return OpResult::NotFound;
        };
        // Only the next attempt of a queued task starts; anything else is a replay or
        // arrived after a newer fact (the task finished, or was re-queued and re-sent).
        if task.state != TaskState::Queued || attempt.attempt != task.next_attempt() {
            return OpResult::Ignored { state: task.state };
        }
        self.run_next_attempt(attempt, worker, now_ms);
        OpResult::Applied {
            state: TaskState::Running,
        }
    }

    /// A queued task's next attempt starts on `worker`: out of the queue, running, with
    /// the attempt recorded.
    fn run_next_attempt(&mut self, attempt: AttemptRef, worker: &str, now_ms: u64) {
        let id = attempt.task_id;
        if let Some(task) = self.live.get(&id) {
            self.queue.remove(task);
        }
        self.set_state(id, TaskState::Running);
        self.push_event(TableEvent::Running(id));
        if let Some(task) = self.live_mut(id) {
            let stage = task.stage;
            // Most tasks make one attempt: room for one, not the four a first push makes.
            task.attempts.reserve_exact(1);
            task.attempts.push(Attempt {
                number: attempt.attempt,
                stage,
                worker: worker.to_string(),
                started_at_ms: now_ms,
                finished_at_ms: None,
                end: None,
            });
        }
    }

    /// Record the end of `attempt`. Only the task's current attempt counts: an earlier
    /// attempt was already ended (lost or failed) before a newer one could start, so a
    /// late report of it is ignored.
    fn finish(
        &mut self,
        attempt: AttemptRef,
        worker: &str,
        outcome: &Outcome,
        (started_at_ms, finished_at_ms): (u64, u64),
        (now_ms, retry_at_ms): (u64, u64),
        (log, usage): (Option<&LogTail>, Option<&Usage>),
    ) -> OpResult {
        let id = attempt.task_id;
        let Some(task) = self.live.get(&id) else {
            return OpResult::NotFound;
        };
        // A report may be committed before its Start (the two are proposed concurrently,
        // or a new leader adopts an attempt a worker reports): record the attempt then.
        let known = task.attempts.iter().any(|a| a.number == attempt.attempt);
        let current = task.attempts.last().map_or(0, |a| a.number);
        if !known && attempt.attempt <= current {
            return OpResult::Ignored { state: task.state };
        }
        // Ended already, or recorded on another worker: a report from a worker that does
        // not hold the attempt (a stale `Run` of the same number after a failover, a
        // hand-over whose `Move` never committed) is not the attempt's result.
        if known
            && task
                .attempts
                .iter()
                .any(|a| a.number == attempt.attempt && (a.end.is_some() || a.worker != worker))
        {
            return OpResult::Ignored { state: task.state };
        }
        // The report counts: so do the tokens it spent.
        if let Some(u) = usage {
            let (swarm, agent) = (task.spec.swarm.clone(), task.current_agent().to_string());
            Arc::make_mut(&mut self.ledger).record(&swarm, &agent, u);
        }
        // The task leaves the queue whatever comes next (it may re-enter it below).
        if task.state == TaskState::Queued {
            self.queue.remove(task);
        }
        self.changes.live_dirty.insert(id);
        let Some(task) = self.live.get_mut(&id).map(Arc::make_mut) else {
            return OpResult::NotFound;
        };
        if !known {
            task.attempts.push(Attempt {
                number: attempt.attempt,
                stage: task.stage,
                worker: worker.to_string(),
                started_at_ms,
                finished_at_ms: None,
                end: None,
            });
        }
        let Some(rec) = task
            .attempts
            .iter_mut()
            .find(|a| a.number == attempt.attempt)
        else {
            return OpResult::NotFound;
        };
        rec.finished_at_ms = Some(finished_at_ms);
        match outcome {
            Outcome::Succeeded { output } => {
                rec.end = Some(AttemptEnd::Succeeded.with_log(log, usage));
                task.error = None;
                if task.stage + 1 < task.spec.stage_count() {
                    // A ring stage is done: its output is the next stage's input, and the
                    // task queues again for that stage at once.
                    task.stage_outputs.push(output.clone());
                    task.stage += 1;
                    task.stage_base = attempt.attempt;
                    task.released = 0;
                    self.requeue(id, 0);
                    return OpResult::Applied {
                        state: TaskState::Queued,
                    };
                }
                if !task.spec.stages.is_empty() {
                    task.stage_outputs.push(output.clone());
                }
                task.output = Some(output.clone());
                self.finalize(id, TaskState::Succeeded, now_ms);
                OpResult::Applied {
                    state: TaskState::Succeeded,
                }
            }
            Outcome::Failed {
                kind: FailureKind::Drained,
                message,
            } if task.released < MAX_RELEASES_PER_STAGE => {
                // Not the task's fault, nor a try at it: it queues again at once and the
                // attempt is not counted.
                rec.end = Some(
                    AttemptEnd::Released {
                        reason: message.clone(),
                    }
                    .with_log(log, usage),
                );
                task.released += 1;
                self.requeue(id, retry_at_ms);
                OpResult::Applied {
                    state: TaskState::Queued,
                }
            }
            Outcome::Failed { kind, message } => {
                let end = if *kind == FailureKind::Cancelled {
                    AttemptEnd::Cancelled
                } else {
                    AttemptEnd::Failed {
                        kind: *kind,
                        message: message.clone(),
                    }
                };
                rec.end = Some(end.with_log(log, usage));
                task.error = Some(format!("{}: {message}", kind.as_str()));
                // A worker that cancels on its own did not run the task to an end: treat
                // it like a lost attempt (so is a drain past the free ones).
                let retryable = kind.retryable()
                    || matches!(kind, FailureKind::Cancelled | FailureKind::Drained);
                let exhausted = task.attempts_counted(attempt.attempt) >= task.spec.max_attempts;
                if retryable && !exhausted {
                    self.requeue(id, retry_at_ms);
                    OpResult::Applied {
                        state: TaskState::Queued,
                    }
                } else {
                    let end = if *kind == FailureKind::Cancelled {
                        TaskState::DeadLettered
                    } else {
                        TaskState::Failed
                    };
                    self.finalize(id, end, now_ms);
                    OpResult::Applied { state: end }
                }
            }
        }
    }

    fn lose(
        &mut self,
        attempt: AttemptRef,
        reason: &str,
        now_ms: u64,
        retry_at_ms: u64,
    ) -> OpResult {
        let id = attempt.task_id;
        let Some(task) = self.live.get(&id) else {
            return OpResult::NotFound;
        };
        let current = task.state == TaskState::Running
            && task
                .attempts
                .last()
                .is_some_and(|a| a.number == attempt.attempt && a.end.is_none());
        if !current {
            return OpResult::Ignored { state: task.state };
        }
        let Some(task) = self.live_mut(id) else {
            return OpResult::NotFound;
        };
        if let Some(rec) = task.attempts.last_mut() {
            rec.end = Some(AttemptEnd::Lost {
                reason: reason.to_string(),
            });
            rec.finished_at_ms = Some(now_ms);
        }
        task.error = Some(format!("attempt {} lost: {reason}", attempt.attempt));
        if task.attempts_counted(attempt.attempt) >= task.spec.max_attempts {
            self.finalize(id, TaskState::DeadLettered, now_ms);
            OpResult::Applied {
                state: TaskState::DeadLettered,
            }
        } else {
            self.requeue(id, retry_at_ms);
            OpResult::Applied {
                state: TaskState::Queued,
            }
        }
    }

    fn cancel(&mut self, task_id: TaskId, now_ms: u64) -> OpResult {
        let Some(task) = self.live.get(&task_id) else {
            return OpResult::NotFound;
        };
        if task.state == TaskState::Queued {
            self.queue.remove(task);
        }
        let mut running = None;
        if let Some(task) = self.live_mut(task_id) {
            if let Some(rec) = task.attempts.last_mut().filter(|a| a.end.is_none()) {
                running = Some((
                    rec.worker.clone(),
                    AttemptRef {
                        task_id,
                        attempt: rec.number,
                    },
                ));
                rec.end = Some(AttemptEnd::Cancelled);
                rec.finished_at_ms = Some(now_ms);
            }
            task.error = Some("cancelled on request".to_string());
        }
        self.finalize(task_id, TaskState::Cancelled, now_ms);
        OpResult::Cancelled { running }
    }

    /// Run finished task `id` again if it `failed` or was dead-lettered: it becomes live
    /// and queued for its next attempt, with `max_attempts` counted afresh from it (a
    /// ring task at the stage it failed in). Its earlier attempts stay. The finished copy
    /// leaves the changes, and older layers' copies are hidden and dropped from the
    /// archive by the next checkpoint, as a purge does; a later finish is a new copy.
    fn retry(
        &mut self,
        id: TaskId,
        now_ms: u64,
        archive: &dyn Archive,
    ) -> Result<OpResult, ArchiveError> {
        let Some(done) = self.layers(archive).finished(id)? else {
            return self.not_live(id, archive);
        };
        if !matches!(done.state, TaskState::Failed | TaskState::DeadLettered) {
            return Ok(OpResult::Ignored { state: done.state });
        }
        if let Some(gone) = self.changes.finished.remove(&id) {
            self.changes.bytes = self.changes.bytes.saturating_sub(gone.size_hint());
        }
        self.changes.purged.insert(id);
        if let Some(n) = self.meta.finished.get_mut(&done.state) {
            *n = n.saturating_sub(1);
        }
        let mut task = Arc::unwrap_or_clone(done);
        // It finishes again, and its callback is delivered then.
        if self.callbacks.get(id).is_some() {
            Arc::make_mut(&mut self.callbacks).remove(id);
        }
        if let Some(f) = task.flow.as_deref_mut() {
            f.clear_callback_result();
        }
        // A task that was never approved (its approval timed out) awaits approval again,
        // with a fresh deadline; anything else is queued.
        let awaits = match task.flow.as_deref_mut() {
            Some(f) if f.needs_approval() => {
                f.start_deadline(now_ms);
                true
            }
            _ => false,
        };
        task.state = if awaits {
            TaskState::AwaitingApproval
        } else {
            TaskState::Queued
        };
        task.error = None;
        task.output = None;
        task.finished_at_ms = None;
        task.expires_at_ms = None;
        task.not_before_ms = now_ms;
        task.stage_base = task.next_attempt() - 1;
        task.released = 0;
        let next = task.next_attempt();
        self.changes.live_gone.remove(&id);
        self.changes.live_dirty.insert(id);
        self.index_live(Arc::new(task));
        if awaits {
            return Ok(OpResult::Applied {
                state: TaskState::AwaitingApproval,
            });
        }
        self.push_event(TableEvent::Queued(id, next));
        Ok(OpResult::Applied {
            state: TaskState::Queued,
        })
    }

    /// A live task whose parents have all succeeded (or that has none) moves on: it
    /// awaits approval if it requires one not yet given (its deadline running from
    /// `now_ms`), else it is queued.
    fn release(&mut self, id: TaskId, now_ms: u64) {
        let awaits = self
            .live
            .get(&id)
            .and_then(|t| t.flow.as_ref())
            .is_some_and(|f| f.needs_approval());
        if !awaits {
            self.requeue(id, 0);
            return;
        }
        self.set_state(id, TaskState::AwaitingApproval);
        if let Some(task) = self.live_mut(id) {
            task.flow.get_or_insert_default().start_deadline(now_ms);
        }
    }

    /// [`Op::Decide`]: approve (queued) or reject (cancelled, its dependants with it) a
    /// task awaiting approval, recording who decided, when and why. Any other task is
    /// left as it is (`Ignored`: a replay, or decided, cancelled or expired meanwhile).
    fn decide(
        &mut self,
        id: TaskId,
        approve: bool,
        by: &str,
        comment: Option<&str>,
        now_ms: u64,
    ) -> OpResult {
        let Some(task) = self.live.get(&id) else {
            return OpResult::NotFound;
        };
        if task.state != TaskState::AwaitingApproval {
            return OpResult::Ignored { state: task.state };
        }
        if let Some(task) = self.live_mut(id) {
            task.flow
                .get_or_insert_default()
                .more
                .push(FlowAttr::Decision {
                    approved: approve,
                    by: by.to_string(),
                    comment: comment.map(str::to_string),
                    at_ms: now_ms,
                });
            if !approve {
                task.error = Some(match comment {
                    Some(c) => format!("rejected by {by}: {c}"),
                    None => format!("rejected by {by}"),
                });
            }
        }
        if approve {
            self.requeue(id, 0);
            OpResult::Applied {
                state: TaskState::Queued,
            }
        } else {
            self.finalize(id, TaskState::Cancelled, now_ms);
            OpResult::Applied {
                state: TaskState::Cancelled,
            }
        }
    }

    /// [`Op::ExpireApprovals`]: fail (`approval_timeout`) each named task that still
    /// awaits approval and whose deadline is at or before `now_ms`; its dependants are
    /// cancelled as for any failed parent. Others are left. At most
    /// [`MAX_PURGE_PER_OP`] ids.
    fn expire_approvals(&mut self, ids: &[TaskId], now_ms: u64) -> OpResult {
        let mut expired = 0;
        for &id in ids.iter().take(MAX_PURGE_PER_OP) {
            let Some(task) = self.live.get(&id) else {
                continue;
            };
            if task.state != TaskState::AwaitingApproval {
                continue;
            }
            let Some((timeout, Some(deadline))) = task.flow.as_ref().and_then(|f| f.approval())
            else {
                continue;
            };
            if deadline > now_ms {
                continue;
            }
            if let Some(task) = self.live_mut(id) {
                task.error = Some(format!(
                    "approval_timeout: not approved within {} ms",
                    timeout.unwrap_or(0)
                ));
            }
            self.finalize(id, TaskState::Failed, now_ms);
            expired += 1;
        }
        OpResult::ApprovalsExpired { expired }
    }

    /// Up to `limit` tasks awaiting approval whose deadline is at or before `now_ms`
    /// (what the leader proposes to expire).
    pub fn approvals_due(&self, now_ms: u64, limit: usize) -> Vec<TaskId> {
        self.ids_in(TaskState::AwaitingApproval)
            .filter(|id| {
                self.live
                    .get(id)
                    .and_then(|t| t.flow.as_ref())
                    .and_then(|f| f.approval())
                    .and_then(|(_, deadline)| deadline)
                    .is_some_and(|d| d <= now_ms)
            })
            .take(limit)
            .collect()
    }

    /// Put a live task (not in the queue index) back in the queue.
    fn requeue(&mut self, id: TaskId, retry_at_ms: u64) {
        self.set_state(id, TaskState::Queued);
        let mut next = 1;
        if let Some(task) = self.live_mut(id) {
            task.not_before_ms = retry_at_ms;
            next = task.next_attempt();
        }
        if let Some(task) = self.live.get(&id) {
            self.queue.insert(task);
        }
        self.push_event(TableEvent::Queued(id, next));
    }

    /// Move a live task (already out of the queue index) to the finished layer, and
    /// tell its dependants: each one waiting is queued once its last parent succeeded, or
    /// cancelled (`dependency_failed`) when a parent ended otherwise — and so on down the
    /// graph, iteratively.
    fn finalize(&mut self, id: TaskId, state: TaskState, now_ms: u64) {
        let mut ended = vec![(id, state)];
        while let Some((id, state)) = ended.pop() {
            let children = self.finalize_one(id, state, now_ms);
            for child in children {
                let waiting = self
                    .live
                    .get(&child)
                    .is_some_and(|t| t.state == TaskState::Waiting);
                if !waiting {
                    continue;
                }
                if state == TaskState::Succeeded {
                    let Some(task) = self.live_mut(child) else {
                        continue;
                    };
                    let flow = task.flow.get_or_insert_default();
                    flow.waiting_on = flow.waiting_on.saturating_sub(1);
                    if flow.waiting_on == 0 {
                        self.release(child, now_ms);
                    }
                } else if let Some(task) = self.live_mut(child) {
                    task.error = Some(format!(
                        "dependency_failed: parent {id} is {}",
                        state.as_str()
                    ));
                    ended.push((child, TaskState::Cancelled));
                }
            }
        }
    }

    /// [`Self::finalize`] of one task; returns its dependants.
    fn finalize_one(&mut self, id: TaskId, state: TaskState, now_ms: u64) -> Vec<TaskId> {
        let Some(mut task) = self.live.remove(&id) else {
            return Vec::new();
        };
        if let Some(set) = self.by_state.get_mut(&task.state) {
            set.remove(&id);
        }
        let t = Arc::make_mut(&mut task);
        t.state = state;
        t.finished_at_ms = Some(now_ms);
        t.expires_at_ms = Some(now_ms.saturating_add(t.spec.retain_ms));
        if t.flow.as_ref().and_then(|f| f.callback_url()).is_some()
            && !Arc::make_mut(&mut self.callbacks).enqueue(id, now_ms)
        {
            t.flow
                .get_or_insert_default()
                .set_callback_result(&callbacks::Outcome {
                    delivered: false,
                    attempts: 0,
                    status: None,
                    error: Some(format!(
                        "outbox full: {} callbacks were waiting",
                        callbacks::MAX_PENDING
                    )),
                    at_ms: now_ms,
                });
        }
        self.changes.bytes += t.size_hint();
        self.changes.live_dirty.remove(&id);
        self.changes.live_gone.insert(id);
        *self.meta.finished.entry(state).or_default() += 1;
        self.meta.rate.record(now_ms);
        let children = task
            .flow
            .as_ref()
            .map(|f| f.children.clone())
            .unwrap_or_default();
        self.changes.finished.insert(id, task);
        self.push_event(TableEvent::Finalized(id, state));
        children
    }

    /// Change the state of a live task between queued and running (indexes included,
    /// except the queue, which callers keep).
    fn set_state(&mut self, id: TaskId, state: TaskState) {
        let Some(task) = self.live_mut(id) else {
            return;
        };
        let old = task.state;
        task.state = state;
        if let Some(set) = self.by_state.get_mut(&old) {
            set.remove(&id);
        }
        self.by_state.entry(state).or_default().insert(id);
    }

    fn purge(
        &mut self,
        ids: &[TaskId],
        now_ms: u64,
        archive: &dyn Archive,
    ) -> Result<OpResult, ArchiveError> {
        let mut purged = 0;
        for &id in ids.iter().take(MAX_PURGE_PER_OP) {
            let Some(task) = self.layers(archive).finished(id)? else {
                continue;
            };
            if task.expires_at_ms.is_none_or(|at| at > now_ms) {
                continue;
            }
            if let Some(key) = &task.spec.idempotency_key {
                if self.layers(archive).key(key)? == Some(id) {
                    self.changes.keys.insert(key.clone(), None);
                }
            }
            self.keep_output_for_dependants(&task);
            if self.callbacks.get(id).is_some() {
                Arc::make_mut(&mut self.callbacks).remove(id);
            }
            if let Some(gone) = self.changes.finished.remove(&id) {
                self.changes.bytes = self.changes.bytes.saturating_sub(gone.size_hint());
            }
            // An older layer may hold it too (written, or being written, to the archive).
            self.changes.purged.insert(id);
            if let Some(n) = self.meta.finished.get_mut(&task.state) {
                *n = n.saturating_sub(1);
            }
            purged += 1;
        }
        Ok(OpResult::Purged { purged })
    }

    /// A parent is being purged: dependants that have not started yet keep its output
    /// (see [`super::flow`]).
    fn keep_output_for_dependants(&mut self, parent: &Task) {
        let Some(flow) = &parent.flow else {
            return;
        };
        let (Some(output), TaskState::Succeeded) = (&parent.output, parent.state) else {
            return;
        };
        let key = Flow::key_of(parent.id, flow.step.as_deref());
        for &child in &flow.children {
            let waits = self.live.get(&child).is_some_and(|t| {
                matches!(
                    t.state,
                    TaskState::Waiting | TaskState::AwaitingApproval | TaskState::Queued
                )
            });
            if !waits {
                continue;
            }
            if let Some(t) = self.live_mut(child) {
                t.flow
                    .get_or_insert_default()
                    .more
                    .push(FlowAttr::ParentOutput {
                        parent: parent.id,
                        key: key.clone(),
                        output: output.clone(),
                    });
            }
        }
    }

    /// The input the next attempt of `task` receives: for a task with parents, its payload
    /// and their outputs ([`flow::graph_input`]), read now; otherwise
    /// [`Task::current_input`].
    pub fn input_of(&self, task: &Task, archive: &dyn Archive) -> Result<Vec<u8>, ArchiveError> {
        let Some(flow) = task.flow.as_ref().filter(|f| !f.parents.is_empty()) else {
            return Ok(task.current_input().to_vec());
        };
        if task.stage > 0 {
            return Ok(task.current_input().to_vec());
        }
        // Each parent's key, and its output: kept with the dependant, or on the parent.
        type Parent<'a> = (String, Option<Arc<Task>>, Option<&'a [u8]>);
        let mut parents: Vec<Parent> = Vec::new();
        for &p in &flow.parents {
            let kept = flow.more.iter().find_map(|a| match a {
                FlowAttr::ParentOutput {
                    parent,
                    key,
                    output,
                } if *parent == p => Some((key.clone(), &output[..])),
                _ => None,
            });
            match kept {
                Some((key, output)) => parents.push((key, None, Some(output))),
                None => {
                    let found = match self.lookup(p, archive)? {
                        Lookup::Found(t) => Some(t),
                        _ => None,
                    };
                    let key = Flow::key_of(
                        p,
                        found
                            .as_ref()
                            .and_then(|t| t.flow.as_ref())
                            .and_then(|f| f.step.as_deref()),
                    );
                    parents.push((key, found, None));
                }
            }
        }
        Ok(flow::graph_input(
            &task.spec.payload,
            parents.iter().map(|(key, found, kept)| {
                let output = kept.or_else(|| found.as_ref().and_then(|t| t.output.as_deref()));
                (key.clone(), output)
            }),
        ))
    }

    fn push_event(&mut self, ev: TableEvent) {
        if self.events.len() < MAX_PENDING_EVENTS {
            self.events.push(ev);
        }
    }

    /// Take the events produced since the last call.
    pub fn take_events(&mut self) -> Vec<TableEvent> {
        std::mem::take(&mut self.events)
    }

    /// Tasks not yet in a final state (what the queue limit counts).
    pub fn unfinished(&self) -> u64 {
        self.live.len() as u64
    }

    /// Whether the table holds no task at all: none live, none retained.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.meta.finished.values().all(|&n| n == 0)
    }

    /// Tasks held, live and retained finished ones.
    pub fn len(&self) -> u64 {
        self.unfinished() + self.meta.finished.values().sum::<u64>()
    }

    /// Number of tasks in `state` (finished states: retained ones).
    pub fn count(&self, state: TaskState) -> u64 {
        if state.is_final() {
            return self.meta.finished.get(&state).copied().unwrap_or(0);
        }
        self.by_state.get(&state).map_or(0, |s| s.len() as u64)
    }

    /// Tasks that reached a final state within the minute before `now_ms`.
    pub fn finished_since(&self, now_ms: u64) -> u64 {
        self.meta.rate.since(now_ms)
    }

    /// The last task id handed out.
    pub fn last_id(&self) -> TaskId {
        self.meta.next_id
    }

    /// The restore in progress, if any.
    pub fn restoring(&self) -> Option<&RestoreState> {
        self.meta.restore.as_ref()
    }

    /// A task held in memory: live, or finished since the last checkpoint (or in the one
    /// being written). Finished tasks older than that are in the archive: see
    /// [`TaskTable::lookup`].
    pub fn get(&self, id: TaskId) -> Option<&Task> {
        if let Some(t) = self.live.get(&id) {
            return Some(t);
        }
        if let Some(t) = self.changes.finished.get(&id) {
            return Some(t);
        }
        if self.changes.purged.contains(&id) || self.changes.reset {
            return None;
        }
        self.flushing
            .as_ref()
            .and_then(|f| f.finished.get(&id))
            .map(|t| &**t)
    }

    /// One task, wherever it is.
    pub fn lookup(&self, id: TaskId, archive: &dyn Archive) -> Result<Lookup, ArchiveError> {
        if let Some(t) = self.live.get(&id) {
            return Ok(Lookup::Found(t.clone()));
        }
        if let Some(t) = self.layers(archive).finished(id)? {
            return Ok(Lookup::Found(t));
        }
        Ok(if id >= 1 && id <= self.meta.next_id {
            Lookup::Expired
        } else {
            Lookup::Unknown
        })
    }

    /// The task submitted under `key`, while it is retained.
    pub fn by_idempotency_key(
        &self,
        key: &str,
        archive: &dyn Archive,
    ) -> Result<Option<TaskId>, ArchiveError> {
        self.layers(archive).key(key)
    }

    /// The run queue: queued tasks by priority and lane, including ones waiting out a
    /// retry backoff (callers check [`Task::not_before_ms`]).
    pub fn run_queue(&self) -> &RunQueue {
        &self.queue
    }

    /// Queued tasks by priority, then lane, then age.
    pub fn queued(&self) -> impl Iterator<Item = &Task> {
        self.queue
            .ids()
            .filter_map(|id| self.live.get(&id).map(|t| &**t))
    }

    /// Running tasks with their current attempt.
    pub fn running(&self) -> impl Iterator<Item = (&Task, &Attempt)> {
        self.ids_in(TaskState::Running)
            .filter_map(|id| self.live.get(&id))
            .filter_map(|t| t.running_attempt().map(|a| (&**t, a)))
    }

    fn ids_in(&self, state: TaskState) -> impl Iterator<Item = TaskId> + '_ {
        self.by_state
            .get(&state)
            .into_iter()
            .flat_map(|s| s.iter().copied())
    }

    /// Up to `limit` tasks following `after` in `order`, optionally only in `state`: live
    /// ones from memory, finished ones from every layer. Ascending, ids above `after`
    /// (`None`: from the first); descending, ids below it (`None`: from the newest).
    pub fn list(
        &self,
        state: Option<TaskState>,
        order: TaskOrder,
        after: Option<TaskId>,
        limit: usize,
        archive: &dyn Archive,
    ) -> Result<Vec<Arc<Task>>, ArchiveError> {
        let range: (Bound<TaskId>, Bound<TaskId>) = match (order, after) {
            (TaskOrder::Asc, None) => (Bound::Unbounded, Bound::Unbounded),
            (TaskOrder::Asc, Some(a)) => (Bound::Excluded(a), Bound::Unbounded),
            (TaskOrder::Desc, None) => (Bound::Unbounded, Bound::Unbounded),
            (TaskOrder::Desc, Some(b)) => (Bound::Unbounded, Bound::Excluded(b)),
        };
        let wanted = |t: &Task| state.is_none_or(|s| t.state == s);
        let mut found: BTreeMap<TaskId, Arc<Task>> = BTreeMap::new();
        if state.is_none_or(|s| !s.is_final()) {
            let live: Box<dyn Iterator<Item = &Arc<Task>>> = match state {
                Some(s) => Box::new(
                    self.by_state
                        .get(&s)
                        .into_iter()
                        .flat_map(move |ids| in_order(ids.range(range), order))
                        .filter_map(|id| self.live.get(id)),
                ),
                None => Box::new(in_order(self.live.range(range), order).map(|(_, t)| t)),
            };
            found.extend(live.take(limit).map(|t| (t.id, t.clone())));
        }
        // The first `limit` of `found` in the listing's order.
        let first = |found: BTreeMap<TaskId, Arc<Task>>| -> Vec<Arc<Task>> {
            match order {
                TaskOrder::Asc => found.into_values().take(limit).collect(),
                TaskOrder::Desc => found.into_values().rev().take(limit).collect(),
            }
        };
        if state.is_some_and(|s| !s.is_final()) {
            return Ok(first(found));
        }
        let layers = self.layers(archive);
        found.extend(
            in_order(self.changes.finished.range(range), order)
                .filter(|(_, t)| wanted(t))
                .take(limit)
                .map(|(id, t)| (*id, t.clone())),
        );
        for layer in layers.older() {
            // Skip what a newer layer purged since.
            found.extend(
                in_order(layer.finished.range(range), order)
                    .filter(|(id, t)| wanted(t) && !self.changes.purged.contains(id))
                    .take(limit)
                    .map(|(id, t)| (*id, t.clone())),
            );
        }
        // Archive pages until `limit` visible ones are found (purged ones are skipped):
        // enough once `limit` found tasks lie no further than the archive was read.
        let mut cursor = after;
        loop {
            let page = match order {
                TaskOrder::Asc => archive.finished_after(state, cursor.unwrap_or(0), limit)?,
                TaskOrder::Desc => {
                    archive.finished_before(state, cursor.unwrap_or(TaskId::MAX), limit)?
                }
            };
            let full = page.len() == limit;
            for t in page {
                cursor = Some(t.id);
                if layers.archived_visible(t.id) {
                    found.entry(t.id).or_insert_with(|| Arc::new(t));
                }
            }
            let reached = cursor.unwrap_or(0);
            let enough = match order {
                TaskOrder::Asc => found.range(..=reached).count() >= limit,
                TaskOrder::Desc => found.range(reached..).count() >= limit,
            };
            if !full || enough {
                break;
            }
        }
        Ok(first(found))
    }

    /// Finished tasks held in memory whose retention ended by `now_ms` (purge candidates
    /// besides the archive's).
    pub fn expired_in_memory(&self, now_ms: u64, limit: usize) -> Vec<TaskId> {
        let flushing = self
            .flushing
            .as_deref()
            .filter(|_| !self.changes.reset)
            .into_iter()
            .flat_map(|l| l.finished.values())
            .filter(|t| !self.changes.purged.contains(&t.id));
        let mut ids: Vec<TaskId> = self
            .changes
            .finished
            .values()
            .chain(flushing)
            .filter(|t| t.expires_at_ms.is_some_and(|at| at <= now_ms))
            .map(|t| t.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(limit);
        ids
    }

    /// Archive purge candidates that are not already purged by a newer layer.
    pub fn expired_in_archive(
        &self,
        now_ms: u64,
        limit: usize,
        archive: &dyn Archive,
    ) -> Result<Vec<TaskId>, ArchiveError> {
        let layers = self.layers(archive);
        Ok(archive
            .expired(now_ms, limit)?
            .into_iter()
            .filter(|id| layers.archived_visible(*id))
            .collect())
    }

    // ---- checkpoints ----

    /// Bytes held by the changes since the last checkpoint, roughly.
    pub fn changes_bytes(&self) -> usize {
        self.changes.bytes
    }

    /// Whether there is anything to checkpoint.
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// Note that the memory store changed (it is checkpointed with the table).
    pub fn note_memory_change(&mut self) {
        self.changes.memory_changed = true;
    }

    /// Whether the memory store changed since the last checkpoint.
    pub fn has_memory_changes(&self) -> bool {
        self.changes.memory_changed
    }

    /// Start a checkpoint: take the changes out (they stay readable as the flushing
    /// layer), with the live tasks they name and the metadata. Fails if a checkpoint is
    /// already being written.
    pub fn begin_checkpoint(&mut self) -> anyhow::Result<CheckpointDelta> {
        anyhow::ensure!(
            self.flushing.is_none(),
            "a checkpoint is already being written"
        );
        let changes = Arc::new(std::mem::take(&mut self.changes));
        let live = changes
            .live_dirty
            .iter()
            .filter_map(|id| self.live.get(id).cloned())
            .collect();
        self.flushing = Some(changes.clone());
        Ok(CheckpointDelta {
            changes,
            live,
            meta: self.meta.clone(),
            access: self.access_flush.begin(&self.access),
            ledger: self.ledger_flush.begin(&self.ledger),
            schedules: self.schedules_flush.begin(&self.schedules),
            limits: self.limits_flush.begin(&self.limits),
            callbacks: self.callbacks_flush.begin(&self.callbacks),
        })
    }

    /// The checkpoint begun last is in the archive now.
    pub fn checkpoint_written(&mut self) {
        self.flushing = None;
        self.access_flush.written();
        self.ledger_flush.written();
        self.schedules_flush.written();
        self.limits_flush.written();
        self.callbacks_flush.written();
    }

    /// The checkpoint begun last failed: its changes go back in front of the newer ones,
    /// to be written by the next checkpoint.
    pub fn checkpoint_failed(&mut self) {
        self.access_flush.failed();
        self.ledger_flush.failed();
        self.schedules_flush.failed();
        self.limits_flush.failed();
        self.callbacks_flush.failed();
        let Some(failed) = self.flushing.take() else {
            return;
        };
        let failed = Arc::try_unwrap(failed).unwrap_or_else(|shared| Changes {
            finished: shared.finished.clone(),
            purged: shared.purged.clone(),
            live_dirty: shared.live_dirty.clone(),
            live_gone: shared.live_gone.clone(),
            keys: shared.keys.clone(),
            staged_memory: shared.staged_memory.clone(),
            staging_cleared: shared.staging_cleared,
            reset: shared.reset,
            memory_changed: shared.memory_changed,
            bytes: shared.bytes,
        });
        let newer = std::mem::replace(&mut self.changes, failed);
        merge_newer(&mut self.changes, newer);
    }

    // ---- restore ----

    /// Begin a restore into this replica, which must hold nothing.
    pub fn restore_begin(
        &mut self,
        restore_id: u64,
        now_ms: u64,
        memory: &MemoryStore,
    ) -> Result<RestoreSummary, String> {
        if let Some(r) = &self.meta.restore {
            return Err(format!(
                "restore {:x} is already in progress; it must end (commit or abort) first",
                r.restore_id
            ));
        }
        if !self.is_empty()
            || memory.pattern_count() > 0
            || !memory.list_collections().is_empty()
            || !self.schedules.is_empty()
        {
            return Err(format!(
                "the cluster already holds {} tasks, {} collections, {} patterns and {} schedules; restore seeds an empty cluster",
                self.len(),
                memory.list_collections().len(),
                memory.pattern_count(),
                self.schedules.len()
            ));
        }
        self.meta.restore = Some(RestoreState {
            restore_id,
            next_seq: 0,
            tasks: 0,
            started_at_ms: now_ms,
            prev_next_id: self.meta.next_id,
        });
        Ok(RestoreSummary::default())
    }

    fn restore_chunk(
        &mut self,
        restore_id: u64,
        seq: u64,
        tasks: &[Task],
        memory: &[u8],
    ) -> Result<RestoreSummary, String> {
        let Some(r) = &self.meta.restore else {
            return Err("no restore in progress".into());
        };
        if r.restore_id != restore_id || r.next_seq != seq {
            return Err(format!(
                "restore chunk {seq} of {restore_id:x} does not follow chunk {} of {:x}",
                r.next_seq.wrapping_sub(1),
                r.restore_id
            ));
        }
        for task in tasks {
            let held =
                self.live.contains_key(&task.id) || self.changes.finished.contains_key(&task.id);
            if task.id == 0 || held {
                return Err(format!("the backup holds task {} twice", task.id));
            }
        }
        for task in tasks {
            let task = Arc::new(task.clone());
            self.meta.next_id = self.meta.next_id.max(task.id);
            if let Some(key) = &task.spec.idempotency_key {
                self.changes.keys.insert(key.clone(), Some(task.id));
            }
            if task.state.is_final() {
                *self.meta.finished.entry(task.state).or_default() += 1;
                self.changes.bytes += task.size_hint();
                self.changes.finished.insert(task.id, task);
            } else {
                self.changes.live_dirty.insert(task.id);
                self.index_live(task);
            }
        }
        if !memory.is_empty() {
            self.changes.bytes += memory.len();
            self.changes.staged_memory.push(memory.to_vec());
        }
        let Some(r) = self.meta.restore.as_mut() else {
            return Err("no restore in progress".into());
        };
        r.next_seq += 1;
        r.tasks += tasks.len() as u64;
        Ok(RestoreSummary {
            tasks: r.tasks,
            ..Default::default()
        })
    }

    /// Check that a commit closes the restore in progress with everything it announced.
    pub fn restore_commit_check(
        &self,
        restore_id: u64,
        chunks: u64,
        tasks: u64,
    ) -> Result<(), String> {
        let Some(r) = &self.meta.restore else {
            return Err("no restore in progress".into());
        };
        if r.restore_id != restore_id {
            return Err(format!(
                "restore {restore_id:x} is not the one in progress ({:x})",
                r.restore_id
            ));
        }
        if r.next_seq != chunks || r.tasks != tasks {
            return Err(format!(
                "the restore received {} chunks and {} tasks, the backup announced {chunks} and {tasks}",
                r.next_seq, r.tasks
            ));
        }
        Ok(())
    }

    /// The memory-store bytes the restore in progress staged.
    pub fn staged_memory(&self, archive: &dyn Archive) -> Result<Vec<u8>, ArchiveError> {
        self.layers(archive).staged_memory()
    }

    /// End a restore that [`TaskTable::restore_commit_check`] accepted: the restored
    /// tasks go live (queued ones can be dispatched).
    pub fn restore_commit(&mut self, meta: &RestoredMeta) -> RestoreSummary {
        let tasks = self.meta.restore.take().map_or(0, |r| r.tasks);
        self.meta.next_id = self.meta.next_id.max(meta.next_id);
        self.meta.swarms = meta.swarms.clone();
        self.meta.swarms_gen += 1;
        self.changes.staged_memory.clear();
        self.changes.staging_cleared = true;
        let queued: Vec<(TaskId, u32)> = self
            .queue
            .ids()
            .map(|id| (id, self.live.get(&id).map_or(1, |t| t.next_attempt())))
            .collect();
        for (id, next) in queued {
            self.push_event(TableEvent::Queued(id, next));
        }
        RestoreSummary {
            tasks,
            ..Default::default()
        }
    }

    /// Give a restore up: the replica is empty again, as before it began.
    pub fn restore_abort(
        &mut self,
        restore_id: u64,
        memory: &mut MemoryStore,
    ) -> Result<RestoreSummary, String> {
        let Some(r) = &self.meta.restore else {
            return Err("no restore in progress".into());
        };
        if r.restore_id != restore_id {
            return Err(format!(
                "restore {restore_id:x} is not the one in progress ({:x})",
                r.restore_id
            ));
        }
        let prev_next_id = r.prev_next_id;
        let gone: BTreeSet<TaskId> = self.live.keys().copied().collect();
        self.live.clear();
        self.queue.clear();
        self.by_state.clear();
        self.meta = TableMeta {
            next_id: prev_next_id,
            swarms: std::mem::take(&mut self.meta.swarms),
            swarms_gen: self.meta.swarms_gen + 1,
            ..TableMeta::default()
        };
        self.changes = Changes {
            live_gone: gone,
            reset: true,
            staging_cleared: true,
            memory_changed: true,
            ..Changes::default()
        };
        if let Ok(empty) = MemoryStore::new(memory.config().clone()) {
            *memory = empty;
        }
        // The backup's schedules, if some arrived, go with the rest of it.
        if !self.schedules.is_empty() {
            self.schedules = Arc::new(Schedules::default());
        }
        if !self.callbacks.is_empty() {
            self.callbacks = Arc::new(Callbacks::default());
        }
        Ok(RestoreSummary::default())
    }

    /// Verify the indexes agree with the live tasks (a corrupt checkpoint fails here, not
    /// later).
    pub fn check_indexes(&self) -> anyhow::Result<()> {
        for (id, task) in &self.live {
            anyhow::ensure!(*id == task.id, "task {} stored under id {id}", task.id);
            anyhow::ensure!(!task.state.is_final(), "final task {id} is live");
            let indexed = self
                .by_state
                .get(&task.state)
                .is_some_and(|s| s.contains(id));
            anyhow::ensure!(indexed, "task {id} is {:?} but not indexed so", task.state);
            let queued = self.queue.contains(task);
            anyhow::ensure!(
                queued == (task.state == TaskState::Queued),
                "task {id}: queue index disagrees"
            );
        }
        let indexed: usize = self.by_state.values().map(|s| s.len()).sum();
        anyhow::ensure!(
            indexed == self.live.len(),
            "state index holds {indexed} ids for {} live tasks",
            self.live.len()
        );
        anyhow::ensure!(
            self.queue.len() as u64 == self.count(TaskState::Queued),
            "queue index size disagrees"
        );
        Ok(())
    }
}

/// `range` in `order`: as it is, or reversed.
pub(crate) fn in_order<'a, I>(range: I, order: TaskOrder) -> Box<dyn Iterator<Item = I::Item> + 'a>
where
    I: DoubleEndedIterator + 'a,
{
    match order {
        TaskOrder::Asc => Box::new(range),
        TaskOrder::Desc => Box::new(range.rev()),
    }
}

/// Put `newer` changes on top of `base` (the older ones), as if both had been made in
/// one interval.
fn merge_newer(base: &mut Changes, newer: Changes) {
    if newer.reset {
        *base = newer;
        return;
    }
    for id in &newer.purged {
        if let Some(gone) = base.finished.remove(id) {
            base.bytes = base.bytes.saturating_sub(gone.size_hint());
        }
    }
    base.purged.extend(newer.purged);
    base.finished.extend(newer.finished);
    for id in &newer.live_gone {
        base.live_dirty.remove(id);
    }
    base.live_dirty.extend(newer.live_dirty);
    base.live_gone.extend(newer.live_gone);
    base.keys.extend(newer.keys);
    if newer.staging_cleared {
        base.staged_memory.clear();
        base.staging_cleared = true;
    }
    base.staged_memory.extend(newer.staged_memory);
    base.memory_changed |= newer.memory_changed;
    base.bytes += newer.bytes;
}
