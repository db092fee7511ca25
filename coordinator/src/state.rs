//! The replicated task table: the application half of the Raft state machine.
//!
//! Every coordinator applies the same [`Command`]s in the same order and ends with the
//! same [`TaskTable`]. Nothing here reads a clock, a socket or a random number: times
//! travel inside the ops (stamped by the leader that proposed them), so applying is a
//! pure function of the log. The scheduler, leases and retries decide *what* to
//! propose; this module only decides what a committed op *means*.
//!
//! Invariants kept here (and tested below):
//! * a final task never changes again: at most one final result per task;
//! * a result is only recorded for a task that was submitted;
//! * an idempotency key maps to exactly one task;
//! * the per-state indexes always agree with the tasks' states.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use swarm_memory::{MemoryOp, MemoryStore, OpOutcome};
use swarm_proto::api::{AttemptView, BytesView, TaskState, TaskView};
use swarm_proto::worker::{AttemptRef, FailureKind, Outcome};
use swarm_proto::TaskId;
use swarm_topology::{StageSpec, SwarmSpec, DEFAULT_SWARM_NAME};

/// One Raft log entry's payload: a batch of operations applied in order.
///
/// The coordinator batches ops proposed at about the same time into one entry, so one
/// fsync commits many submits, starts and results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub ops: Vec<Op>,
}

/// What a task asks for; fixed at submit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub agent: String,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// ReasoningBank patterns the worker retrieves for the agent before it runs.
    pub patterns: u32,
    /// The swarm the task targets ([`DEFAULT_SWARM_NAME`]: a star of all workers).
    pub swarm: String,
    /// A ring swarm's stages, copied at submit (so a swarm changed later does not change
    /// a task in flight); empty for other topologies. Stage `i` runs `stages[i].agent`.
    pub stages: Vec<StageSpec>,
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

/// One operation on the task table. Times are the proposing leader's wall clock (ms).
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
    /// A worker reported the end of an attempt. `retry_at_ms` is when a retry may run.
    Finish {
        attempt: AttemptRef,
        worker: String,
        outcome: Outcome,
        started_at_ms: u64,
        finished_at_ms: u64,
        retry_at_ms: u64,
    },
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
    /// Seed an empty replica from a backup ([`encode_replica`] bytes): tasks and memory.
    /// Refused unless both the task table and the memory store are empty.
    Restore { data: Vec<u8> },
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
    /// No task with that id.
    NotFound,
    /// What a memory op did, or why it was refused (identically on every replica).
    Memory(Result<OpOutcome, MemoryFault>),
    /// A restore: how much it brought back, or why it was refused.
    Restored(Result<RestoreSummary, String>),
    /// A swarm op took effect, or why it was refused (a submit to an unknown swarm too).
    Swarm(Result<(), SwarmFault>),
}

/// What a restore brought back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// Apply one committed command to a replica's two state machines: memory ops go to the
/// memory store, everything else to the task table. Deterministic.
pub fn apply_command(
    table: &mut TaskTable,
    memory: &mut MemoryStore,
    cmd: &Command,
) -> CommandResponse {
    CommandResponse {
        results: cmd
            .ops
            .iter()
            .map(|op| match op {
                Op::Memory(m) => {
                    OpResult::Memory(memory.apply(m.clone()).map_err(MemoryFault::from))
                }
                Op::Restore { data } => OpResult::Restored(restore(table, memory, data)),
                other => table.apply_op(other),
            })
            .collect(),
    }
}

/// Replace an empty replica's state with a backup's. Deterministic: every replica
/// decodes the same bytes, or refuses for the same reason.
fn restore(
    table: &mut TaskTable,
    memory: &mut MemoryStore,
    data: &[u8],
) -> Result<RestoreSummary, String> {
    if !table.is_empty() || memory.pattern_count() > 0 || !memory.list_collections().is_empty() {
        return Err(format!(
            "the cluster already holds {} tasks, {} collections and {} patterns; restore seeds an empty cluster",
            table.len(),
            memory.list_collections().len(),
            memory.pattern_count()
        ));
    }
    let (t, m) = decode_replica(data).map_err(|e| format!("not a usable backup: {e:#}"))?;
    let summary = RestoreSummary {
        tasks: t.len() as u64,
        collections: m.list_collections().len() as u64,
        patterns: m.pattern_count() as u64,
    };
    *table = t;
    *memory = m;
    Ok(summary)
}

/// A replica's snapshot: the task table and the memory store, each in its own encoding.
#[derive(Debug, Serialize, Deserialize)]
struct ReplicaSnapshot {
    tasks: Vec<u8>,
    memory: Vec<u8>,
}

/// Encode both state machines for a Raft snapshot.
pub fn encode_replica(table: &TaskTable, memory: &MemoryStore) -> anyhow::Result<Vec<u8>> {
    let snap = ReplicaSnapshot {
        tasks: table.encode_snapshot()?,
        memory: memory
            .snapshot_bytes()
            .map_err(|e| anyhow::anyhow!("encoding the memory store: {e}"))?,
    };
    Ok(swarm_transport::codec::encode(&snap)?)
}

/// Rebuild both state machines from [`encode_replica`] bytes.
pub fn decode_replica(bytes: &[u8]) -> anyhow::Result<(TaskTable, MemoryStore)> {
    let snap: ReplicaSnapshot = swarm_transport::codec::decode(bytes, bytes.len())?;
    let table = TaskTable::decode_snapshot(&snap.tasks)?;
    let memory = MemoryStore::restore_bytes(&snap.memory)
        .map_err(|e| anyhow::anyhow!("decoding the memory store: {e}"))?;
    Ok((table, memory))
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
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
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
        self.attempts.last().map_or(1, |a| a.number + 1)
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
            swarm: self.spec.swarm.clone(),
            stages: self.spec.stages.iter().map(|s| s.to_string()).collect(),
            stage: self.stage,
            stage_outputs: self
                .stage_outputs
                .iter()
                .map(|o| String::from_utf8_lossy(o).into_owned())
                .collect(),
            moves: self.moves,
        }
    }
}

fn attempt_view(a: &Attempt) -> AttemptView {
    let (outcome, error) = match &a.end {
        None => (None, None),
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
    }
}

/// Order of the run queue: higher priority first, then older first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueueKey {
    neg_priority: i64,
    id: TaskId,
}

impl QueueKey {
    fn of(task: &Task) -> Self {
        QueueKey {
            neg_priority: -(task.spec.priority as i64),
            id: task.id,
        }
    }

    /// The task this key orders.
    pub fn id(&self) -> TaskId {
        self.id
    }
}

/// Something a non-Raft component should react to, produced while applying.
#[derive(Debug, Clone, PartialEq)]
pub enum TableEvent {
    /// The task reached a final state (wake waiters; stop any attempt still running).
    Finalized(TaskId, TaskState),
    /// The task (re-)entered the queue.
    Queued(TaskId),
}

/// Counts of tasks that reached a final state, for throughput figures.
const RECENT_WINDOW_MS: u64 = 60_000;

/// All tasks, indexed for the scheduler and the API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskTable {
    tasks: BTreeMap<TaskId, Task>,
    next_id: TaskId,
    by_key: HashMap<String, TaskId>,
    queue: BTreeSet<QueueKey>,
    by_state: BTreeMap<TaskState, BTreeSet<TaskId>>,
    /// Finish times (leader clock) of tasks finalized in the last minute.
    recent_finishes: VecDeque<u64>,
    /// Defined swarms by name (the default swarm is implicit and not stored).
    swarms: BTreeMap<String, SwarmRecord>,
    /// Bumped by every swarm create and delete.
    swarms_gen: u64,
    /// Events since the node last drained them; not part of the replicated state.
    #[serde(skip)]
    events: Vec<TableEvent>,
}

/// Events kept at most when nobody drains them (a bound, not a working size).
const MAX_PENDING_EVENTS: usize = 1_000_000;

impl TaskTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply one committed command. Deterministic: same commands, same table.
    pub fn apply(&mut self, cmd: &Command) -> CommandResponse {
        CommandResponse {
            results: cmd.ops.iter().map(|op| self.apply_op(op)).collect(),
        }
    }

    fn apply_op(&mut self, op: &Op) -> OpResult {
        match op {
            // Routed by `apply_command`; a bare table has no memory store.
            Op::Memory(_) => OpResult::Memory(Err(MemoryFault {
                code: "no_memory_store".into(),
                message: "memory ops apply to a replica's memory store".into(),
            })),
            Op::Restore { .. } => OpResult::Restored(Err(
                "restores apply to a whole replica, not a bare task table".into(),
            )),
            Op::Submit {
                spec,
                now_ms,
                queue_limit,
            } => self.submit(spec, *now_ms, *queue_limit),
            Op::Start {
                attempt,
                worker,
                now_ms,
            } => self.start(*attempt, worker, *now_ms),
            Op::Finish {
                attempt,
                worker,
                outcome,
                started_at_ms,
                finished_at_ms,
                retry_at_ms,
            } => self.finish(
                *attempt,
                worker,
                outcome,
                *started_at_ms,
                *finished_at_ms,
                *retry_at_ms,
            ),
            Op::Lose {
                attempt,
                reason,
                now_ms,
                retry_at_ms,
            } => self.lose(*attempt, reason, *now_ms, *retry_at_ms),
            Op::Cancel { task_id, now_ms } => self.cancel(*task_id, *now_ms),
            Op::SwarmCreate { record } => OpResult::Swarm(self.create_swarm(record)),
            Op::SwarmDelete { name } => OpResult::Swarm(self.delete_swarm(name)),
            Op::Move {
                attempt,
                from,
                to,
                now_ms,
            } => self.move_attempt(*attempt, from, to, *now_ms),
        }
    }

    fn create_swarm(&mut self, record: &SwarmRecord) -> Result<(), SwarmFault> {
        let name = &record.spec.name;
        record
            .spec
            .validate()
            .map_err(|e| SwarmFault::new(e.code(), e.to_string()))?;
        if name == DEFAULT_SWARM_NAME || self.swarms.contains_key(name) {
            return Err(SwarmFault::new(
                "swarm_exists",
                format!("swarm {name:?} already exists"),
            ));
        }
        self.swarms.insert(name.clone(), record.clone());
        self.swarms_gen += 1;
        Ok(())
    }

    fn delete_swarm(&mut self, name: &str) -> Result<(), SwarmFault> {
        if name == DEFAULT_SWARM_NAME {
            return Err(SwarmFault::new(
                "default_swarm",
                "the default swarm cannot be deleted",
            ));
        }
        if !self.swarms.contains_key(name) {
            return Err(SwarmFault::new(
                "unknown_swarm",
                format!("no swarm named {name:?}"),
            ));
        }
        let busy = self
            .ids_in(TaskState::Queued)
            .chain(self.ids_in(TaskState::Running))
            .filter(|id| self.tasks.get(id).is_some_and(|t| t.spec.swarm == name))
            .count();
        if busy > 0 {
            return Err(SwarmFault::new(
                "swarm_busy",
                format!("swarm {name:?} still has {busy} unfinished tasks; cancel them or wait"),
            ));
        }
        self.swarms.remove(name);
        self.swarms_gen += 1;
        Ok(())
    }

    /// Record that `attempt`, running on `from`, now runs on `to`.
    fn move_attempt(&mut self, attempt: AttemptRef, from: &str, to: &str, now_ms: u64) -> OpResult {
        let Some(task) = self.tasks.get_mut(&attempt.task_id) else {
            return OpResult::NotFound;
        };
        // A Move may commit before the attempt's Start (both are proposed around the same
        // time): then the attempt is recorded here, on its new worker.
        if task.state == TaskState::Queued && attempt.attempt == task.next_attempt() {
            let stage = task.stage;
            let key = QueueKey::of(task);
            task.attempts.push(Attempt {
                number: attempt.attempt,
                stage,
                worker: to.to_string(),
                started_at_ms: now_ms,
                finished_at_ms: None,
                end: None,
            });
            task.moves += 1;
            self.queue.remove(&key);
            self.set_state(attempt.task_id, TaskState::Running);
            return OpResult::Applied {
                state: TaskState::Running,
            };
        }
        let state = task.state;
        match task
            .attempts
            .last_mut()
            .filter(|a| a.number == attempt.attempt && a.end.is_none() && a.worker == from)
        {
            Some(rec) if state == TaskState::Running => {
                rec.worker = to.to_string();
                task.moves += 1;
                OpResult::Applied { state }
            }
            _ => OpResult::Ignored { state },
        }
    }

    /// A defined swarm, or the implicit default one.
    pub fn swarm(&self, name: &str) -> Option<SwarmRecord> {
        if name == DEFAULT_SWARM_NAME {
            return Some(SwarmRecord::default_swarm());
        }
        self.swarms.get(name).cloned()
    }

    /// Every swarm: the default one first, then the defined ones by name.
    pub fn swarms(&self) -> Vec<SwarmRecord> {
        std::iter::once(SwarmRecord::default_swarm())
            .chain(self.swarms.values().cloned())
            .collect()
    }

    /// Changes whenever a swarm is created or deleted.
    pub fn swarms_gen(&self) -> u64 {
        self.swarms_gen
    }

    /// Unfinished tasks of swarm `name`: (queued, running).
    pub fn swarm_load(&self, name: &str) -> (u64, u64) {
        let count = |state| {
            self.ids_in(state)
                .filter(|id| self.tasks.get(id).is_some_and(|t| t.spec.swarm == name))
                .count() as u64
        };
        (count(TaskState::Queued), count(TaskState::Running))
    }

    /// The defined swarms (without the default one), by name.
    pub fn defined_swarms(&self) -> &BTreeMap<String, SwarmRecord> {
        &self.swarms
    }

    fn submit(&mut self, spec: &TaskSpec, now_ms: u64, queue_limit: u64) -> OpResult {
        if let Some(key) = &spec.idempotency_key {
            if let Some(&id) = self.by_key.get(key) {
                return OpResult::Submitted {
                    id,
                    duplicate: true,
                };
            }
        }
        if spec.swarm != DEFAULT_SWARM_NAME && !self.swarms.contains_key(&spec.swarm) {
            return OpResult::Swarm(Err(SwarmFault::new(
                "unknown_swarm",
                format!("no swarm named {:?}", spec.swarm),
            )));
        }
        if self.unfinished() >= queue_limit {
            return OpResult::QueueFull { limit: queue_limit };
        }
        self.next_id += 1;
        let id = self.next_id;
        let task = Task {
            id,
            spec: spec.clone(),
            state: TaskState::Queued,
            attempts: Vec::new(),
            output: None,
            error: None,
            created_at_ms: now_ms,
            finished_at_ms: None,
            not_before_ms: 0,
            stage: 0,
            stage_base: 0,
            released: 0,
            stage_outputs: Vec::new(),
            moves: 0,
        };
        if let Some(key) = &spec.idempotency_key {
            self.by_key.insert(key.clone(), id);
        }
        self.queue.insert(QueueKey::of(&task));
        self.by_state
            .entry(TaskState::Queued)
            .or_default()
            .insert(id);
        self.tasks.insert(id, task);
        self.push_event(TableEvent::Queued(id));
        OpResult::Submitted {
            id,
            duplicate: false,
        }
    }

    fn start(&mut self, attempt: AttemptRef, worker: &str, now_ms: u64) -> OpResult {
        let Some(task) = self.tasks.get(&attempt.task_id) else {
            return OpResult::NotFound;
        };
        // Only the next attempt of a queued task starts; anything else is a replay or
        // arrived after a newer fact (the task finished, or was re-queued and re-sent).
        if task.state != TaskState::Queued || attempt.attempt != task.next_attempt() {
            return OpResult::Ignored { state: task.state };
        }
        let key = QueueKey::of(task);
        let stage = task.stage;
        self.set_state(attempt.task_id, TaskState::Running);
        self.queue.remove(&key);
        if let Some(task) = self.tasks.get_mut(&attempt.task_id) {
            task.attempts.push(Attempt {
                number: attempt.attempt,
                stage,
                worker: worker.to_string(),
                started_at_ms: now_ms,
                finished_at_ms: None,
                end: None,
            });
        }
        OpResult::Applied {
            state: TaskState::Running,
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
        started_at_ms: u64,
        finished_at_ms: u64,
        retry_at_ms: u64,
    ) -> OpResult {
        let Some(task) = self.tasks.get_mut(&attempt.task_id) else {
            return OpResult::NotFound;
        };
        if task.state.is_final() {
            return OpResult::Ignored { state: task.state };
        }
        // A report may be committed before its Start (the two are proposed concurrently,
        // or a new leader adopts an attempt a worker reports): record the attempt then.
        let known = task.attempts.iter().any(|a| a.number == attempt.attempt);
        let current = task.attempts.last().map_or(0, |a| a.number);
        if !known {
            if attempt.attempt <= current {
                return OpResult::Ignored { state: task.state };
            }
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
            return OpResult::Ignored { state: task.state };
        };
        if rec.end.is_some() {
            return OpResult::Ignored { state: task.state };
        }
        rec.finished_at_ms = Some(finished_at_ms);
        let id = attempt.task_id;
        match outcome {
            Outcome::Succeeded { output } => {
                rec.end = Some(AttemptEnd::Succeeded);
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
                self.finalize(id, TaskState::Succeeded, finished_at_ms);
                OpResult::Applied {
                    state: TaskState::Succeeded,
                }
            }
            Outcome::Failed {
                kind: FailureKind::Drained,
                message,
            } => {
                // Not the task's fault, nor a try at it: it queues again at once and the
                // attempt is not counted.
                rec.end = Some(AttemptEnd::Released {
                    reason: message.clone(),
                });
                task.released += 1;
                self.requeue(id, retry_at_ms);
                OpResult::Applied {
                    state: TaskState::Queued,
                }
            }
            Outcome::Failed { kind, message } => {
                let error = format!("{}: {message}", kind.as_str());
                rec.end = Some(if *kind == FailureKind::Cancelled {
                    AttemptEnd::Cancelled
                } else {
                    AttemptEnd::Failed {
                        kind: *kind,
                        message: message.clone(),
                    }
                });
                task.error = Some(error);
                // A worker that cancels on its own (e.g. it is shutting down) did not
                // run the task to an end: treat it like a lost attempt.
                let retryable = kind.retryable() || *kind == FailureKind::Cancelled;
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
                    self.finalize(id, end, finished_at_ms);
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
        let Some(task) = self.tasks.get_mut(&attempt.task_id) else {
            return OpResult::NotFound;
        };
        if task.state != TaskState::Running {
            return OpResult::Ignored { state: task.state };
        }
        let Some(rec) = task
            .attempts
            .last_mut()
            .filter(|a| a.number == attempt.attempt && a.end.is_none())
        else {
            return OpResult::Ignored { state: task.state };
        };
        rec.end = Some(AttemptEnd::Lost {
            reason: reason.to_string(),
        });
        rec.finished_at_ms = Some(now_ms);
        task.error = Some(format!("attempt {} lost: {reason}", attempt.attempt));
        let id = attempt.task_id;
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
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return OpResult::NotFound;
        };
        if task.state.is_final() {
            return OpResult::Ignored { state: task.state };
        }
        let mut running = None;
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
        if task.state == TaskState::Queued {
            let key = QueueKey::of(task);
            self.queue.remove(&key);
        }
        self.finalize(task_id, TaskState::Cancelled, now_ms);
        OpResult::Cancelled { running }
    }

    fn requeue(&mut self, id: TaskId, retry_at_ms: u64) {
        self.set_state(id, TaskState::Queued);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.not_before_ms = retry_at_ms;
            self.queue.insert(QueueKey::of(task));
        }
        self.push_event(TableEvent::Queued(id));
    }

    fn finalize(&mut self, id: TaskId, state: TaskState, now_ms: u64) {
        if let Some(task) = self.tasks.get(&id) {
            if task.state == TaskState::Queued {
                let key = QueueKey::of(task);
                self.queue.remove(&key);
            }
        }
        self.set_state(id, state);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.finished_at_ms = Some(now_ms);
        }
        self.recent_finishes.push_back(now_ms);
        let horizon = now_ms.saturating_sub(RECENT_WINDOW_MS);
        while self.recent_finishes.front().is_some_and(|&t| t < horizon) {
            self.recent_finishes.pop_front();
        }
        self.push_event(TableEvent::Finalized(id, state));
    }

    fn set_state(&mut self, id: TaskId, state: TaskState) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let old = task.state;
        task.state = state;
        if let Some(set) = self.by_state.get_mut(&old) {
            set.remove(&id);
        }
        self.by_state.entry(state).or_default().insert(id);
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
    /// Tasks in the table, in any state.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the table holds no task at all.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn unfinished(&self) -> u64 {
        self.count(TaskState::Queued) + self.count(TaskState::Running)
    }

    /// Number of tasks in `state`.
    pub fn count(&self, state: TaskState) -> u64 {
        self.by_state.get(&state).map_or(0, |s| s.len() as u64)
    }

    /// Tasks that reached a final state within the minute before `now_ms`.
    pub fn finished_since(&self, now_ms: u64) -> u64 {
        let horizon = now_ms.saturating_sub(RECENT_WINDOW_MS);
        self.recent_finishes
            .iter()
            .filter(|&&t| t >= horizon)
            .count() as u64
    }

    /// One task.
    pub fn get(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    /// The task submitted under `key`, if any.
    pub fn by_idempotency_key(&self, key: &str) -> Option<TaskId> {
        self.by_key.get(key).copied()
    }

    /// Queued tasks in run order (priority, then age), including ones waiting out a
    /// retry backoff: callers check [`Task::not_before_ms`].
    pub fn queued(&self) -> impl Iterator<Item = &Task> {
        self.queue.iter().filter_map(|k| self.tasks.get(&k.id))
    }

    /// Running tasks with their current attempt.
    pub fn running(&self) -> impl Iterator<Item = (&Task, &Attempt)> {
        self.ids_in(TaskState::Running)
            .filter_map(|id| self.tasks.get(&id))
            .filter_map(|t| t.running_attempt().map(|a| (t, a)))
    }

    fn ids_in(&self, state: TaskState) -> impl Iterator<Item = TaskId> + '_ {
        self.by_state
            .get(&state)
            .into_iter()
            .flat_map(|s| s.iter().copied())
    }

    /// Up to `limit` tasks with id greater than `after`, optionally only in `state`.
    pub fn list(&self, state: Option<TaskState>, after: TaskId, limit: usize) -> Vec<&Task> {
        match state {
            Some(st) => self
                .by_state
                .get(&st)
                .into_iter()
                .flat_map(|s| s.range(after.saturating_add(1)..))
                .filter_map(|id| self.tasks.get(id))
                .take(limit)
                .collect(),
            None => self
                .tasks
                .range(after.saturating_add(1)..)
                .map(|(_, t)| t)
                .take(limit)
                .collect(),
        }
    }

    /// Serialize the whole table for a Raft snapshot.
    pub fn encode_snapshot(&self) -> anyhow::Result<Vec<u8>> {
        Ok(swarm_transport::codec::encode(self)?)
    }

    /// Rebuild a table from [`TaskTable::encode_snapshot`] bytes.
    pub fn decode_snapshot(bytes: &[u8]) -> anyhow::Result<Self> {
        let table: TaskTable = swarm_transport::codec::decode(bytes, bytes.len())?;
        table.check_indexes()?;
        Ok(table)
    }

    /// Verify the indexes agree with the tasks (a corrupt snapshot fails here, not later).
    pub fn check_indexes(&self) -> anyhow::Result<()> {
        for (id, task) in &self.tasks {
            let indexed = self
                .by_state
                .get(&task.state)
                .is_some_and(|s| s.contains(id));
            anyhow::ensure!(indexed, "task {id} is {:?} but not indexed so", task.state);
            let queued = self.queue.contains(&QueueKey::of(task));
            anyhow::ensure!(
                queued == (task.state == TaskState::Queued),
                "task {id}: queue index disagrees"
            );
        }
        let indexed: usize = self.by_state.values().map(|s| s.len()).sum();
        anyhow::ensure!(
            indexed == self.tasks.len(),
            "state index holds {indexed} ids for {} tasks",
            self.tasks.len()
        );
        anyhow::ensure!(
            self.queue.len() as u64 == self.count(TaskState::Queued),
            "queue index size disagrees"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(agent: &str) -> TaskSpec {
        TaskSpec {
            agent: agent.into(),
            payload: b"p".to_vec(),
            priority: 0,
            timeout_ms: 1000,
            max_attempts: 3,
            idempotency_key: None,
            labels: BTreeMap::new(),
            patterns: 0,
            swarm: swarm_topology::DEFAULT_SWARM_NAME.to_string(),
            stages: Vec::new(),
        }
    }

    fn submit(t: &mut TaskTable, s: TaskSpec) -> OpResult {
        let cmd = Command {
            ops: vec![Op::Submit {
                spec: s,
                now_ms: 1,
                queue_limit: 100,
            }],
        };
        t.apply(&cmd).results.remove(0)
    }

    fn one(t: &mut TaskTable, op: Op) -> OpResult {
        t.apply(&Command { ops: vec![op] }).results.remove(0)
    }

    fn at(task_id: TaskId, attempt: u32) -> AttemptRef {
        AttemptRef { task_id, attempt }
    }

    fn ok(output: &[u8]) -> Outcome {
        Outcome::Succeeded {
            output: output.to_vec(),
        }
    }

    fn fail(kind: FailureKind) -> Outcome {
        Outcome::Failed {
            kind,
            message: "boom".into(),
        }
    }

    fn finish(t: &mut TaskTable, a: AttemptRef, outcome: Outcome) -> OpResult {
        one(
            t,
            Op::Finish {
                attempt: a,
                worker: "w".into(),
                outcome,
                started_at_ms: 2,
                finished_at_ms: 3,
                retry_at_ms: 10,
            },
        )
    }

    fn start(t: &mut TaskTable, a: AttemptRef) -> OpResult {
        one(
            t,
            Op::Start {
                attempt: a,
                worker: "w".into(),
                now_ms: 2,
            },
        )
    }

    #[test]
    fn happy_path_and_single_final_result() {
        let mut t = TaskTable::new();
        assert_eq!(
            submit(&mut t, spec("echo")),
            OpResult::Submitted {
                id: 1,
                duplicate: false
            }
        );
        assert_eq!(
            start(&mut t, at(1, 1)),
            OpResult::Applied {
                state: TaskState::Running
            }
        );
        assert_eq!(
            finish(&mut t, at(1, 1), ok(b"out")),
            OpResult::Applied {
                state: TaskState::Succeeded
            }
        );
        // A second report (replay, or a stale duplicate) changes nothing.
        assert_eq!(
            finish(&mut t, at(1, 1), ok(b"other")),
            OpResult::Ignored {
                state: TaskState::Succeeded
            }
        );
        assert_eq!(t.get(1).unwrap().output.as_deref(), Some(&b"out"[..]));
        assert_eq!(t.count(TaskState::Succeeded), 1);
        t.check_indexes().unwrap();
        let events = t.take_events();
        assert_eq!(
            events,
            vec![
                TableEvent::Queued(1),
                TableEvent::Finalized(1, TaskState::Succeeded)
            ]
        );
    }

    #[test]
    fn results_for_unknown_tasks_are_not_recorded() {
        let mut t = TaskTable::new();
        assert_eq!(finish(&mut t, at(9, 1), ok(b"x")), OpResult::NotFound);
        assert_eq!(start(&mut t, at(9, 1)), OpResult::NotFound);
        assert_eq!(
            one(
                &mut t,
                Op::Cancel {
                    task_id: 9,
                    now_ms: 1
                }
            ),
            OpResult::NotFound
        );
        assert!(t.get(9).is_none());
    }

    #[test]
    fn idempotency_key_yields_one_task() {
        let mut t = TaskTable::new();
        let mut s = spec("echo");
        s.idempotency_key = Some("k".into());
        assert_eq!(
            submit(&mut t, s.clone()),
            OpResult::Submitted {
                id: 1,
                duplicate: false
            }
        );
        assert_eq!(
            submit(&mut t, s),
            OpResult::Submitted {
                id: 1,
                duplicate: true
            }
        );
        assert_eq!(t.count(TaskState::Queued), 1);
    }

    #[test]
    fn queue_limit_counts_unfinished_tasks() {
        let mut t = TaskTable::new();
        let op = |n| Op::Submit {
            spec: spec("echo"),
            now_ms: n,
            queue_limit: 2,
        };
        let r = t
            .apply(&Command {
                ops: vec![op(1), op(2), op(3)],
            })
            .results;
        assert_eq!(r[2], OpResult::QueueFull { limit: 2 });
        start(&mut t, at(1, 1));
        finish(&mut t, at(1, 1), ok(b""));
        assert_eq!(
            one(&mut t, op(4)),
            OpResult::Submitted {
                id: 3,
                duplicate: false
            }
        );
    }

    #[test]
    fn retryable_failures_requeue_until_max_attempts_then_fail() {
        let mut t = TaskTable::new();
        submit(&mut t, spec("x"));
        for n in 1..=2 {
            start(&mut t, at(1, n));
            assert_eq!(
                finish(&mut t, at(1, n), fail(FailureKind::Exit)),
                OpResult::Applied {
                    state: TaskState::Queued
                }
            );
            assert_eq!(t.get(1).unwrap().not_before_ms, 10);
        }
        start(&mut t, at(1, 3));
        assert_eq!(
            finish(&mut t, at(1, 3), fail(FailureKind::Exit)),
            OpResult::Applied {
                state: TaskState::Failed
            }
        );
        assert_eq!(t.get(1).unwrap().attempts.len(), 3);
        t.check_indexes().unwrap();
    }

    #[test]
    fn attempts_handed_back_by_a_draining_worker_do_not_count() {
        let mut t = TaskTable::new();
        let mut s = spec("x");
        s.max_attempts = 1;
        submit(&mut t, s);
        for n in 1..=5 {
            start(&mut t, at(1, n));
            assert_eq!(
                finish(&mut t, at(1, n), fail(FailureKind::Drained)),
                OpResult::Applied {
                    state: TaskState::Queued
                }
            );
        }
        let task = t.get(1).unwrap();
        assert_eq!(task.released, 5);
        assert!(task
            .attempts
            .iter()
            .all(|a| matches!(a.end, Some(AttemptEnd::Released { .. }))));
        // The one counted attempt is still there to be made.
        start(&mut t, at(1, 6));
        assert_eq!(
            finish(&mut t, at(1, 6), fail(FailureKind::Exit)),
            OpResult::Applied {
                state: TaskState::Failed
            }
        );
        t.check_indexes().unwrap();
    }

    #[test]
    fn non_retryable_failure_is_final_at_once() {
        let mut t = TaskTable::new();
        submit(&mut t, spec("nope"));
        start(&mut t, at(1, 1));
        let r = finish(&mut t, at(1, 1), fail(FailureKind::UnknownAgent));
        assert_eq!(
            r,
            OpResult::Applied {
                state: TaskState::Failed
            }
        );
        assert!(t
            .get(1)
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .starts_with("unknown_agent"));
    }

    #[test]
    fn lost_attempts_retry_then_dead_letter() {
        let mut t = TaskTable::new();
        let mut s = spec("x");
        s.max_attempts = 2;
        submit(&mut t, s);
        start(&mut t, at(1, 1));
        let lose = |n| Op::Lose {
            attempt: at(1, n),
            reason: "worker lost".into(),
            now_ms: 5,
            retry_at_ms: 6,
        };
        assert_eq!(
            one(&mut t, lose(1)),
            OpResult::Applied {
                state: TaskState::Queued
            }
        );
        // Losing the same attempt again is a no-op.
        assert_eq!(
            one(&mut t, lose(1)),
            OpResult::Ignored {
                state: TaskState::Queued
            }
        );
        start(&mut t, at(1, 2));
        assert_eq!(
            one(&mut t, lose(2)),
            OpResult::Applied {
                state: TaskState::DeadLettered
            }
        );
        t.check_indexes().unwrap();
    }

    #[test]
    fn late_reports_of_a_lost_attempt_are_ignored() {
        let mut t = TaskTable::new();
        submit(&mut t, spec("x"));
        submit(&mut t, spec("x"));
        for id in [1, 2] {
            start(&mut t, at(id, 1));
            one(
                &mut t,
                Op::Lose {
                    attempt: at(id, 1),
                    reason: "lease".into(),
                    now_ms: 5,
                    retry_at_ms: 6,
                },
            );
            start(&mut t, at(id, 2));
        }
        // The lost attempt 1 reports after all: failure or success, it is stale.
        assert_eq!(
            finish(&mut t, at(1, 1), fail(FailureKind::Exit)),
            OpResult::Ignored {
                state: TaskState::Running
            }
        );
        assert_eq!(
            finish(&mut t, at(2, 1), ok(b"late")),
            OpResult::Ignored {
                state: TaskState::Running
            }
        );
        assert_eq!(
            finish(&mut t, at(2, 2), ok(b"now")),
            OpResult::Applied {
                state: TaskState::Succeeded
            }
        );
    }

    #[test]
    fn report_before_start_is_recorded_and_start_after_is_ignored() {
        let mut t = TaskTable::new();
        submit(&mut t, spec("x"));
        assert_eq!(
            finish(&mut t, at(1, 1), ok(b"r")),
            OpResult::Applied {
                state: TaskState::Succeeded
            }
        );
        assert_eq!(
            start(&mut t, at(1, 1)),
            OpResult::Ignored {
                state: TaskState::Succeeded
            }
        );
        assert_eq!(t.get(1).unwrap().attempts.len(), 1);
        t.check_indexes().unwrap();
    }

    #[test]
    fn cancel_running_names_the_attempt_and_is_final() {
        let mut t = TaskTable::new();
        submit(&mut t, spec("x"));
        submit(&mut t, spec("x"));
        start(&mut t, at(1, 1));
        let r = one(
            &mut t,
            Op::Cancel {
                task_id: 1,
                now_ms: 4,
            },
        );
        assert_eq!(
            r,
            OpResult::Cancelled {
                running: Some(("w".into(), at(1, 1)))
            }
        );
        assert_eq!(
            one(
                &mut t,
                Op::Cancel {
                    task_id: 2,
                    now_ms: 4
                }
            ),
            OpResult::Cancelled { running: None }
        );
        assert_eq!(
            one(
                &mut t,
                Op::Cancel {
                    task_id: 2,
                    now_ms: 4
                }
            ),
            OpResult::Ignored {
                state: TaskState::Cancelled
            }
        );
        // The cancelled attempt's late result does not resurrect the task.
        assert_eq!(
            finish(&mut t, at(1, 1), ok(b"x")),
            OpResult::Ignored {
                state: TaskState::Cancelled
            }
        );
        assert_eq!(t.queued().count(), 0);
        t.check_indexes().unwrap();
    }

    #[test]
    fn queue_order_is_priority_then_age() {
        let mut t = TaskTable::new();
        for p in [0, 5, 0, 9] {
            let mut s = spec("x");
            s.priority = p;
            submit(&mut t, s);
        }
        let order: Vec<TaskId> = t.queued().map(|t| t.id).collect();
        assert_eq!(order, vec![4, 2, 1, 3]);
    }

    #[test]
    fn snapshot_round_trip_and_listing() {
        let mut t = TaskTable::new();
        for _ in 0..5 {
            submit(&mut t, spec("x"));
        }
        start(&mut t, at(2, 1));
        finish(&mut t, at(2, 1), ok(b"y"));
        let bytes = t.encode_snapshot().unwrap();
        let back = TaskTable::decode_snapshot(&bytes).unwrap();
        assert_eq!(back.get(2), t.get(2));
        assert_eq!(back.count(TaskState::Queued), 4);
        let page: Vec<TaskId> = back
            .list(Some(TaskState::Queued), 1, 2)
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(page, vec![3, 4]);
        assert!(TaskTable::decode_snapshot(&bytes[..bytes.len() / 2]).is_err());
    }

    /// Random op sequences never break the indexes or change a final task.
    #[test]
    fn random_histories_keep_invariants() {
        use rand::{Rng, SeedableRng};
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut t = TaskTable::new();
            let mut finals: BTreeMap<TaskId, (TaskState, Option<Vec<u8>>)> = BTreeMap::new();
            for step in 0..200u64 {
                let id = rng.gen_range(1..=8);
                let n = rng.gen_range(1..=4);
                let op = match rng.gen_range(0..6) {
                    0 => Op::Submit {
                        spec: spec("x"),
                        now_ms: step,
                        queue_limit: 6,
                    },
                    1 => Op::Start {
                        attempt: at(id, n),
                        worker: "w".into(),
                        now_ms: step,
                    },
                    2 => Op::Finish {
                        attempt: at(id, n),
                        worker: "w".into(),
                        outcome: ok(&step.to_le_bytes()),
                        started_at_ms: step,
                        finished_at_ms: step,
                        retry_at_ms: step,
                    },
                    3 => Op::Finish {
                        attempt: at(id, n),
                        worker: "w".into(),
                        outcome: fail(FailureKind::Exit),
                        started_at_ms: step,
                        finished_at_ms: step,
                        retry_at_ms: step,
                    },
                    4 => Op::Lose {
                        attempt: at(id, n),
                        reason: "r".into(),
                        now_ms: step,
                        retry_at_ms: step,
                    },
                    _ => Op::Cancel {
                        task_id: id,
                        now_ms: step,
                    },
                };
                one(&mut t, op);
                t.check_indexes()
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                for (fid, (st, out)) in &finals {
                    let task = t.get(*fid).unwrap();
                    assert_eq!(
                        (task.state, &task.output),
                        (*st, out),
                        "seed {seed}: final task {fid} changed"
                    );
                }
                for task in t.list(None, 0, usize::MAX) {
                    if task.state.is_final() {
                        finals
                            .entry(task.id)
                            .or_insert((task.state, task.output.clone()));
                    }
                    assert!(task.attempts.len() as u32 <= 4);
                }
            }
        }
    }

    fn ring_record(name: &str, stages: &[&str]) -> SwarmRecord {
        SwarmRecord {
            spec: SwarmSpec::new(
                name,
                swarm_topology::TopologySpec::Ring {
                    stages: stages.iter().map(|a| StageSpec::new(*a)).collect(),
                },
                BTreeMap::new(),
            )
            .unwrap(),
            queue_depth: 0,
            created_at_ms: 1,
        }
    }

    fn ring_spec(swarm: &str, stages: &[&str]) -> TaskSpec {
        TaskSpec {
            swarm: swarm.into(),
            stages: stages.iter().map(|a| StageSpec::new(*a)).collect(),
            agent: stages[0].into(),
            ..spec("x")
        }
    }

    #[test]
    fn swarms_are_created_once_and_deleted_only_when_idle() {
        let mut t = TaskTable::new();
        let rec = ring_record("pipe", &["a", "b"]);
        assert_eq!(
            one(
                &mut t,
                Op::SwarmCreate {
                    record: rec.clone()
                }
            ),
            OpResult::Swarm(Ok(()))
        );
        let again = one(&mut t, Op::SwarmCreate { record: rec });
        assert!(
            matches!(&again, OpResult::Swarm(Err(f)) if f.code == "swarm_exists"),
            "{again:?}"
        );
        let default = one(
            &mut t,
            Op::SwarmCreate {
                record: SwarmRecord::default_swarm(),
            },
        );
        assert!(matches!(&default, OpResult::Swarm(Err(f)) if f.code == "swarm_exists"));
        // A task in the swarm keeps it from being deleted.
        assert!(matches!(
            submit(&mut t, ring_spec("pipe", &["a", "b"])),
            OpResult::Submitted { id: 1, .. }
        ));
        let busy = one(
            &mut t,
            Op::SwarmDelete {
                name: "pipe".into(),
            },
        );
        assert!(
            matches!(&busy, OpResult::Swarm(Err(f)) if f.code == "swarm_busy"),
            "{busy:?}"
        );
        one(
            &mut t,
            Op::Cancel {
                task_id: 1,
                now_ms: 5,
            },
        );
        assert_eq!(
            one(
                &mut t,
                Op::SwarmDelete {
                    name: "pipe".into()
                }
            ),
            OpResult::Swarm(Ok(()))
        );
        let gone = one(
            &mut t,
            Op::SwarmDelete {
                name: "pipe".into(),
            },
        );
        assert!(matches!(&gone, OpResult::Swarm(Err(f)) if f.code == "unknown_swarm"));
        let dflt = one(
            &mut t,
            Op::SwarmDelete {
                name: "default".into(),
            },
        );
        assert!(matches!(&dflt, OpResult::Swarm(Err(f)) if f.code == "default_swarm"));
        // Submitting to a swarm that does not exist is refused, and creates nothing.
        let unknown = submit(&mut t, ring_spec("pipe", &["a"]));
        assert!(matches!(&unknown, OpResult::Swarm(Err(f)) if f.code == "unknown_swarm"));
        assert_eq!(t.len(), 1);
        assert_eq!(t.swarms().len(), 1, "only the default swarm is left");
    }

    #[test]
    fn a_ring_task_passes_each_stage_output_on_and_retries_per_stage() {
        let mut t = TaskTable::new();
        one(
            &mut t,
            Op::SwarmCreate {
                record: ring_record("pipe", &["up", "rev", "wrap"]),
            },
        );
        let mut s = ring_spec("pipe", &["up", "rev", "wrap"]);
        s.max_attempts = 2;
        submit(&mut t, s);
        let task = t.get(1).unwrap();
        assert_eq!(
            (task.stage, task.current_agent(), task.current_input()),
            (0, "up", &b"p"[..])
        );
        start(&mut t, at(1, 1));
        assert_eq!(
            finish(&mut t, at(1, 1), ok(b"P")),
            OpResult::Applied {
                state: TaskState::Queued
            },
            "stage 0 done: queued for stage 1"
        );
        let task = t.get(1).unwrap();
        assert_eq!(
            (task.stage, task.current_agent(), task.current_input()),
            (1, "rev", &b"P"[..])
        );
        assert_eq!(task.not_before_ms, 0, "the next stage may start at once");
        // Stage 1 fails once and is lost once: two attempts of this stage, the limit.
        start(&mut t, at(1, 2));
        assert_eq!(
            finish(&mut t, at(1, 2), fail(FailureKind::Exit)),
            OpResult::Applied {
                state: TaskState::Queued
            },
            "stage attempts count from the stage's start, not the task's"
        );
        start(&mut t, at(1, 3));
        assert_eq!(
            finish(&mut t, at(1, 3), ok(b"P!")),
            OpResult::Applied {
                state: TaskState::Queued
            }
        );
        start(&mut t, at(1, 4));
        assert_eq!(
            finish(&mut t, at(1, 4), ok(b"[P!]")),
            OpResult::Applied {
                state: TaskState::Succeeded
            }
        );
        let task = t.get(1).unwrap();
        assert_eq!(task.output.as_deref(), Some(&b"[P!]"[..]));
        assert_eq!(
            task.stage_outputs,
            vec![b"P".to_vec(), b"P!".to_vec(), b"[P!]".to_vec()]
        );
        let stages: Vec<u32> = task.attempts.iter().map(|a| a.stage).collect();
        assert_eq!(stages, vec![0, 1, 1, 2]);
        // A late report of stage 0's attempt changes nothing.
        assert!(matches!(
            finish(&mut t, at(1, 1), ok(b"x")),
            OpResult::Ignored { .. }
        ));
        t.check_indexes().unwrap();
        let v = t.get(1).unwrap().view();
        assert_eq!(v.stages, vec!["up", "rev", "wrap"]);
        assert_eq!(v.stage_outputs, vec!["P", "P!", "[P!]"]);
    }

    #[test]
    fn a_ring_stage_lost_too_often_dead_letters_the_task() {
        let mut t = TaskTable::new();
        one(
            &mut t,
            Op::SwarmCreate {
                record: ring_record("pipe", &["a", "b"]),
            },
        );
        let mut s = ring_spec("pipe", &["a", "b"]);
        s.max_attempts = 1;
        submit(&mut t, s);
        start(&mut t, at(1, 1));
        finish(&mut t, at(1, 1), ok(b"1"));
        start(&mut t, at(1, 2));
        let r = one(
            &mut t,
            Op::Lose {
                attempt: at(1, 2),
                reason: "gone".into(),
                now_ms: 9,
                retry_at_ms: 10,
            },
        );
        assert_eq!(
            r,
            OpResult::Applied {
                state: TaskState::DeadLettered
            }
        );
        assert_eq!(t.get(1).unwrap().stage_outputs, vec![b"1".to_vec()]);
    }

    #[test]
    fn moves_are_recorded_only_from_the_current_holder() {
        let mut t = TaskTable::new();
        submit(&mut t, spec("echo"));
        // Before its Start commits: the move records the attempt on the thief.
        let mv = |from: &str, to: &str| Op::Move {
            attempt: at(1, 1),
            from: from.into(),
            to: to.into(),
            now_ms: 4,
        };
        assert_eq!(
            one(&mut t, mv("a", "b")),
            OpResult::Applied {
                state: TaskState::Running
            }
        );
        assert!(matches!(start(&mut t, at(1, 1)), OpResult::Ignored { .. }));
        let task = t.get(1).unwrap();
        assert_eq!(
            (
                task.attempts.len(),
                task.attempts[0].worker.as_str(),
                task.moves
            ),
            (1, "b", 1)
        );
        // From a worker that does not hold it: ignored.
        assert!(matches!(
            one(&mut t, mv("a", "c")),
            OpResult::Ignored { .. }
        ));
        assert_eq!(
            one(&mut t, mv("b", "c")),
            OpResult::Applied {
                state: TaskState::Running
            }
        );
        assert_eq!(t.get(1).unwrap().attempts[0].worker, "c");
        t.check_indexes().unwrap();
        // A snapshot keeps swarms and moves.
        one(
            &mut t,
            Op::SwarmCreate {
                record: ring_record("pipe", &["a"]),
            },
        );
        let back = TaskTable::decode_snapshot(&t.encode_snapshot().unwrap()).unwrap();
        assert_eq!(back.get(1).unwrap().moves, 2);
        assert!(back.swarm("pipe").is_some());
        assert_eq!(back.swarms_gen(), t.swarms_gen());
    }
}
