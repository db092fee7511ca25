//! Client histories and the checker that judges them.
//!
//! A [`History`] is what clients saw: every submit and every read with the (simulated)
//! time it was invoked and completed and what came back, plus a final [`Audit`] of the
//! whole task table taken after the faults healed. [`check`] returns every
//! [`Violation`] of the guarantees swarm makes:
//!
//! * **durability** — an acknowledged submit names a task that exists at the end and has
//!   reached a final state (nothing acknowledged is lost, and the cluster recovers);
//! * **idempotency** — all acknowledgements of one idempotency key name one task, and
//!   the table holds at most one task per key;
//! * **integrity** — every task in the table was submitted by some client (its key was
//!   sent), has at most one successful attempt, and a succeeded echo task's output is its
//!   payload (a dependant's: its payload and its parents' outputs);
//! * **dependencies** — a task submitted with `depends_on` started only after each parent
//!   had succeeded (allowing for the workers' clock skew: a parent's end is its worker's
//!   time), and one whose parent ended otherwise was cancelled (`dependency_failed`)
//!   without running;
//! * **linearizable reads** — a read invoked after a submit was acknowledged finds the
//!   task, and once a read returned a final state, every read invoked after that read
//!   completed (the audit included) returns the same state;
//! * **membership** — every membership change the run's operator started completed once
//!   the faults healed, and the cluster's voters at the end are the ones those changes
//!   leave;
//! * **unique executions** — no execution (one `Run` of one attempt by the leader of one
//!   term, journaled by the workers) ran on two workers at overlapping times;
//! * **no phantom attempts** — an attempt the table gave up as lost was not recorded as
//!   running on a worker that did not hold it for longer than a lease (plus a heartbeat
//!   and a second of slack) under the leader that gave it up: heartbeat reconciliation
//!   loses such an attempt within one lease (while no leader is in office nobody can);
//! * **concurrency keys** — an attempt of a task with `concurrency_key` K (limit L: the
//!   limit named K, else the one named by K's part before its first `:`) started only
//!   while fewer than L other attempts of K's tasks that started before it (by start
//!   time, then task id and attempt number) had not yet ended. Starts are the leader's
//!   times; an end is the leader's time for a lost or cancelled attempt, else the
//!   worker's report less the workers' clock skew; an attempt with no end runs for ever.
//!   (The leader starts an attempt only while fewer than L of K's attempts are in its
//!   scheduler, and one leaves it only once its end is committed, after its recorded
//!   end; a new leader adopts the recorded attempts before it starts any of K's.)
//! * **rate limits** — the attempts of tasks with `rate_limit` N started no faster than
//!   N's bucket allows: in every window `[s_i, s_j]` of their (sorted) start times at most
//!   `burst + tokens × (s_j − s_i) / per_ms` starts (buckets start empty at an election,
//!   and an old leader can record no start after one);
//! * **schedules** — for every schedule a client created (an interval, catching up all
//!   missed ticks up to a bound; read in the audit just before the listing): it exists at
//!   the end as defined, created (by the leader's clock) while its create was in flight;
//!   each of its tasks' keys `schedule:<name>:<tick_ms>` names a tick of its grid
//!   `created_at + k × every` (`k ≥ 1`), no tick has two tasks; every tick from the first
//!   up to its final next tick (exclusive: later ones may have fired after the read)
//!   submitted exactly one task, except as many as it counts skipped or refused, and it
//!   counts none skipped unless more ticks than its catch-up bound were ever due at once;
//!   its `fired` counter is the number of those ticks with a task, and its last tick is
//!   the one before its next;
//! * **identical replicas** — at the end, every member of the cluster has applied the
//!   leader's whole log and checkpointed it, and all their checkpoints hold the same state
//!   (byte-equal dumps, read from each member's data dir after the run).
//!
//! Outcomes a client cannot know (timeouts, connection failures, 5xx answers) are recorded
//! as unknown and never count as failures: an unknown submit may or may not have created
//! its task, an unknown read says nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// Simulated time since the start of a run.
pub type At = Duration;

/// Final task states: once in one, a task never changes again.
pub const FINAL_STATES: [&str; 4] = ["succeeded", "failed", "cancelled", "dead_lettered"];

/// Whether `state` (as the API spells it) is final.
pub fn is_final(state: &str) -> bool {
    FINAL_STATES.contains(&state)
}

/// What a submit came back with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubmitResult {
    /// 2xx: the task with this id exists and is durable.
    Acked { id: u64 },
    /// 4xx: refused, nothing changed.
    Refused { status: u16 },
    /// Timeout, connection failure or 5xx: it may or may not have happened.
    Unknown { reason: String },
}

/// One submit as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Submit {
    pub client: String,
    pub key: String,
    pub invoked: At,
    pub completed: At,
    pub result: SubmitResult,
}

/// What a read of one task came back with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReadResult {
    /// 200 with the task in this state.
    Found { state: String },
    /// 404.
    NotFound,
    /// Timeout, connection failure or any other answer.
    Unknown { reason: String },
}

/// One read (`GET /v1/tasks/{id}`) as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Read {
    pub client: String,
    pub id: u64,
    pub invoked: At,
    pub completed: At,
    pub result: ReadResult,
}

/// A task as the final audit found it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskRecord {
    pub id: u64,
    pub key: Option<String>,
    pub agent: String,
    pub state: String,
    /// The payload as text (`None` when shown as base64).
    pub payload: Option<String>,
    /// The result as text, if any.
    pub output: Option<String>,
    pub attempts: usize,
    pub succeeded_attempts: usize,
    /// Every attempt as the table recorded it, in order.
    pub attempt_log: Vec<AttemptRecord>,
    /// The task's concurrency key and rate limit, if any.
    pub concurrency_key: Option<String>,
    pub rate_limit: Option<String>,
    /// The tasks it runs after (graph parents).
    pub parents: Vec<u64>,
    pub error: Option<String>,
}

/// One attempt of a task as the final audit found it (times on the leader's clock, which
/// the simulation shares with the journal, except where a worker's report set them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttemptRecord {
    pub number: u32,
    pub worker: String,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// `succeeded`, `failed`, `lost`, `cancelled`, `released`.
    pub outcome: Option<String>,
}

/// What a worker journaled about one execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecEvent {
    /// The worker (re)started: whatever its earlier boot held is gone by now.
    Boot,
    Held,
    Started,
    Ended,
    Released,
}

/// One line of a worker's execution journal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExecRecord {
    /// The worker's name (the same across its boots).
    pub worker: String,
    pub boot: u64,
    /// On the simulation's clock (ms since the epoch, like the table's times).
    pub at_ms: u64,
    pub event: ExecEvent,
    /// The execution (unused for `Boot`).
    pub task: u64,
    pub attempt: u32,
    pub term: u64,
}

/// The final look at the whole table, after the faults healed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Audit {
    /// Every task, read (linearizably, from the leader) in a listing invoked at `invoked`
    /// and completed at `completed`, once all acknowledged tasks were final.
    Complete {
        invoked: At,
        completed: At,
        tasks: Vec<TaskRecord>,
        /// Every schedule, as read (from the leader) just before the listing was invoked.
        schedules: Vec<ScheduleStatus>,
    },
    /// The cluster never answered with a table in which every acknowledged task is final.
    Incomplete { reason: String },
}

/// A schedule as the API showed it (`GET /v1/schedules`) in the final audit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScheduleStatus {
    pub name: String,
    /// The interval (`None`: a cron schedule).
    pub every_ms: Option<u64>,
    /// `skip` or `all`, and with `all` the most missed ticks one catch-up fires.
    pub catch_up: String,
    pub max_catch_up: Option<u32>,
    pub paused: bool,
    pub agent: String,
    /// The creation time as committed: an interval schedule's grid is
    /// `created_at_ms + k × every_ms`, `k ≥ 1`.
    pub created_at_ms: u64,
    /// The tick the next Fire must name (`None`: paused, or no further tick).
    pub next_tick_ms: Option<u64>,
    pub fired: u64,
    pub skipped: u64,
    pub refused: u64,
    pub last_tick_ms: Option<u64>,
}

/// A schedule a client created (`POST /v1/schedules`, retried until it was confirmed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScheduleCreation {
    pub name: String,
    /// What the client asked for: its interval, catch-up bound (`catch_up: all`) and agent.
    pub every_ms: u64,
    pub max_catch_up: u32,
    pub agent: String,
    /// When the first create was invoked, on the coordinators' clock (ms since the epoch).
    pub invoked_ms: u64,
    /// Once confirmed (a create answered 201, or 409 `schedule_exists`, then read back
    /// with GET): when the read completed (ms since the epoch) and the creation time it
    /// showed. `None`: never confirmed (the schedule may or may not exist).
    pub confirmed: Option<(u64, u64)>,
}

/// A membership change as the run's operator carried it out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MembershipChange {
    /// What was asked, e.g. `replace n2 (c2) with n4 (c4)`.
    pub what: String,
    pub started: At,
    /// When the change was complete (new node a voter, old node out of the committed
    /// membership); `None` if it never was.
    pub completed: Option<At>,
    /// Steps that failed and were retried (the first few), or why the operator gave up.
    pub notes: Vec<String>,
}

/// One member's replica at the end of a run, as its data dir holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaState {
    /// Raft node id.
    pub node: u64,
    /// Its host (`c1`, ...).
    pub host: String,
    /// Log index of its last checkpoint.
    pub checkpoint_index: Option<u64>,
    /// Size and hash of the dump of that checkpoint: the whole replicated state.
    pub dump_bytes: u64,
    pub dump_hash: u64,
    /// Finished tasks the checkpoint holds, and the last task id handed out.
    pub finished_tasks: u64,
    pub last_task_id: u64,
    /// Why the checkpoint could not be read, if it could not.
    pub error: Option<String>,
}

/// The final comparison of the members' replicas.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Replicas {
    /// Every member (voter or learner) of the leader's membership applied the leader's log
    /// up to `index` and checkpointed it; `nodes` are their checkpoints.
    Settled {
        index: u64,
        voters: Vec<u64>,
        /// The voters the operator's completed membership changes leave (`None` when a
        /// change did not complete, so nobody knows).
        expected_voters: Option<Vec<u64>>,
        nodes: Vec<ReplicaState>,
    },
    /// The members never all caught up with the leader.
    Unsettled { reason: String },
}

/// A token bucket as the run defined it: `tokens` every `per_ms`, at most `burst` held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub tokens: u32,
    pub per_ms: u64,
    pub burst: u32,
}

/// Everything the clients saw in one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct History {
    pub submits: Vec<Submit>,
    pub reads: Vec<Read>,
    pub audit: Option<Audit>,
    /// Membership changes, in the order the operator ran them.
    pub membership: Vec<MembershipChange>,
    /// The members' replicas at the end (`None`: not compared).
    pub replicas: Option<Replicas>,
    /// Every worker's execution journal, in the order events happened.
    pub executions: Vec<ExecRecord>,
    /// When a coordinator became leader (on the clock of `executions`), in order.
    pub elections: Vec<u64>,
    /// The coordinators' worker lease and heartbeat interval (ms), for the phantom check.
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    /// Concurrency limits the run set before submitting tasks with concurrency keys, by
    /// name (a key's limit is the one named by the key, else by its part before `:`).
    pub key_limits: BTreeMap<String, u32>,
    /// Rate limits the run set before submitting tasks that name them, by name.
    pub rate_limits: BTreeMap<String, RateLimit>,
    /// How far the workers' clocks ran ahead of the coordinators' (ms): the end times
    /// workers report are that far off.
    pub worker_clock_skew_ms: i64,
    /// Schedules clients created, in the order they were first asked for.
    pub schedules: Vec<ScheduleCreation>,
}

/// A broken guarantee, with what shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// No audit could be taken, or it never showed every acknowledged task final.
    NoAudit { reason: String },
    /// An acknowledged task is missing from the final table.
    LostAck { key: String, id: u64 },
    /// An acknowledged task never reached a final state.
    NotFinal { key: String, id: u64, state: String },
    /// One idempotency key acknowledged as two tasks, or two tasks in the table for one key.
    KeyTwoTasks { key: String, ids: Vec<u64> },
    /// An acknowledgement names a task that carries another key.
    WrongKey {
        id: u64,
        acked_key: String,
        task_key: Option<String>,
    },
    /// A task in the table no client ever submitted.
    Unsubmitted { id: u64, key: Option<String> },
    /// More than one attempt of a task succeeded, or a succeeded task has none.
    ResultCount {
        id: u64,
        state: String,
        succeeded_attempts: usize,
    },
    /// A succeeded echo task whose output is not its payload.
    WrongResult {
        id: u64,
        payload: Option<String>,
        output: Option<String>,
    },
    /// A dependant ran before a parent succeeded, or was not cancelled when a parent
    /// ended otherwise.
    Dependency { id: u64, parent: u64, why: String },
    /// A read invoked after the task's submit was acknowledged did not find it.
    ReadMissedAck { id: u64, acked_at: At, read: Read },
    /// A read invoked after another read saw a final state saw something else.
    StaleRead { id: u64, earlier: Read, later: Read },
    /// A membership change never completed.
    MembershipIncomplete { what: String, notes: Vec<String> },
    /// The members never all applied the leader's log.
    Unsettled { reason: String },
    /// The cluster ended with other voters than the membership changes leave.
    WrongVoters {
        expected: Vec<u64>,
        actual: Vec<u64>,
    },
    /// Members' checkpoints at the same log index hold different states (or one could
    /// not be read, or is at another index).
    ReplicasDiffer {
        index: u64,
        nodes: Vec<ReplicaState>,
    },
    /// One execution ran on two workers (or twice) at overlapping times.
    DuplicateExecution {
        execution: String,
        runs: Vec<(String, u64, u64, Option<u64>)>,
    },
    /// An attempt stayed recorded as running on a worker that did not hold it for longer
    /// than a lease before it was given up.
    Phantom {
        id: u64,
        attempt: u32,
        worker: String,
        unheld_ms: u64,
        /// When the attempt stopped being held (or was recorded) and when it was given
        /// up, in ms since the run began.
        from: u64,
        lost: u64,
    },
    /// An attempt of a task with a concurrency key started while `running` (task,
    /// attempt) of that key's attempts, as many as its limit or more, had started and
    /// not ended.
    KeyLimit {
        key: String,
        limit: u32,
        id: u64,
        attempt: u32,
        /// Its start, on the leader's clock (ms since the epoch).
        at_ms: u64,
        running: Vec<(u64, u32)>,
    },
    /// More attempts of a rate limit's tasks started within a window than its bucket
    /// allows: `starts` (ms since the epoch, task, attempt), the window's first to last.
    Bucket {
        limit: String,
        rate: RateLimit,
        starts: Vec<(u64, u64, u32)>,
    },
    /// A schedule a client created (or that fired) is not in the final audit.
    ScheduleLost { name: String },
    /// A schedule in the final audit is not what its client created (definition,
    /// creation time outside the create's window), or has no next tick.
    ScheduleDiffers { name: String, why: String },
    /// A task of a schedule whose key names no tick of the schedule's grid.
    ScheduleOffGrid {
        name: String,
        id: u64,
        key: Option<String>,
    },
    /// One tick of a schedule submitted several tasks.
    ScheduleTickTwice {
        name: String,
        tick_ms: u64,
        ids: Vec<u64>,
    },
    /// Ticks before the schedule's next one with no task, not all accounted for by its
    /// skipped and refused counters.
    ScheduleTicksMissing {
        name: String,
        /// How many, and the first few (ms since the epoch).
        missing: usize,
        first: Vec<u64>,
        skipped: u64,
        refused: u64,
    },
    /// A schedule's counters disagree with the tasks its ticks submitted.
    ScheduleCounters { name: String, why: String },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NoAudit { reason } => {
                write!(f, "the cluster did not recover after the faults healed: {reason}")
            }
            Violation::LostAck { key, id } => {
                write!(f, "acknowledged task {id} (key {key}) is missing from the final table")
            }
            Violation::NotFinal { key, id, state } => write!(
                f,
                "acknowledged task {id} (key {key}) never became final: still {state}"
            ),
            Violation::KeyTwoTasks { key, ids } => {
                write!(f, "idempotency key {key} names several tasks: {ids:?}")
            }
            Violation::WrongKey {
                id,
                acked_key,
                task_key,
            } => write!(
                f,
                "submit of key {acked_key} acknowledged as task {id}, which has key {task_key:?}"
            ),
            Violation::Unsubmitted { id, key } => {
                write!(f, "task {id} (key {key:?}) was never submitted by any client")
            }
            Violation::ResultCount {
                id,
                state,
                succeeded_attempts,
            } => write!(
                f,
                "task {id} is {state} with {succeeded_attempts} succeeded attempts"
            ),
            Violation::WrongResult {
                id,
                payload,
                output,
            } => write!(
                f,
                "echo task {id} succeeded with output {output:?} for payload {payload:?}"
            ),
            Violation::Dependency { id, parent, why } => {
                write!(f, "task {id}, a dependant of task {parent}: {why}")
            }
            Violation::ReadMissedAck { id, acked_at, read } => write!(
                f,
                "task {id} acknowledged at {acked_at:?}, but a read invoked at {:?} by {} got {:?}",
                read.invoked, read.client, read.result
            ),
            Violation::StaleRead { id, earlier, later } => write!(
                f,
                "task {id}: a read completed at {:?} ({}) saw {:?}, a read invoked later at {:?} ({}) saw {:?}",
                earlier.completed,
                earlier.client,
                earlier.result,
                later.invoked,
                later.client,
                later.result
            ),
            Violation::MembershipIncomplete { what, notes } => {
                write!(f, "membership change never completed: {what}; {}", notes.join("; "))
            }
            Violation::Unsettled { reason } => {
                write!(f, "the members never all applied the leader's log: {reason}")
            }
            Violation::WrongVoters { expected, actual } => write!(
                f,
                "the cluster ended with voters {actual:?}, the membership changes leave {expected:?}"
            ),
            Violation::ReplicasDiffer { index, nodes } => {
                write!(f, "replicas differ (all should be checkpointed at {index}):")?;
                for n in nodes {
                    write!(
                        f,
                        " n{} ({}) at {:?}: {} bytes, hash {:016x}, {} finished, last id {}{};",
                        n.node,
                        n.host,
                        n.checkpoint_index,
                        n.dump_bytes,
                        n.dump_hash,
                        n.finished_tasks,
                        n.last_task_id,
                        n.error
                            .as_deref()
                            .map(|e| format!(", error: {e}"))
                            .unwrap_or_default()
                    )?;
                }
                Ok(())
            }
            Violation::DuplicateExecution { execution, runs } => {
                write!(f, "execution {execution} ran more than once at a time:")?;
                for (worker, boot, from, to) in runs {
                    match to {
                        Some(to) => write!(f, " on {worker} (boot {boot}) {from}..{to} ms;")?,
                        None => write!(f, " on {worker} (boot {boot}) from {from} ms, no end;")?,
                    }
                }
                Ok(())
            }
            Violation::Phantom {
                id,
                attempt,
                worker,
                unheld_ms,
                from,
                lost,
            } => write!(
                f,
                "attempt {attempt} of task {id} stayed recorded as running on {worker} for {unheld_ms} ms while {worker} did not hold it, longer than a lease ({from} ms to {lost} ms into the run)"
            ),
            Violation::KeyLimit {
                key,
                limit,
                id,
                attempt,
                at_ms,
                running,
            } => write!(
                f,
                "attempt {attempt} of task {id} (concurrency key {key}, limit {limit}) started at {at_ms} ms while {} attempts of the key ran: {running:?} (task, attempt)",
                running.len()
            ),
            Violation::Bucket {
                limit,
                rate,
                starts,
            } => write!(
                f,
                "rate limit {limit} ({} per {} ms, burst {}) started {} attempts from {} ms to {} ms: {starts:?} (ms, task, attempt)",
                rate.tokens,
                rate.per_ms,
                rate.burst,
                starts.len(),
                starts.first().map_or(0, |s| s.0),
                starts.last().map_or(0, |s| s.0),
            ),
            Violation::ScheduleLost { name } => write!(
                f,
                "schedule {name} was created (or fired) but is missing from the final audit"
            ),
            Violation::ScheduleDiffers { name, why } => write!(f, "schedule {name}: {why}"),
            Violation::ScheduleOffGrid { name, id, key } => write!(
                f,
                "task {id} (key {key:?}) of schedule {name} names no tick of its grid"
            ),
            Violation::ScheduleTickTwice { name, tick_ms, ids } => write!(
                f,
                "tick {tick_ms} of schedule {name} submitted several tasks: {ids:?}"
            ),
            Violation::ScheduleTicksMissing {
                name,
                missing,
                first,
                skipped,
                refused,
            } => write!(
                f,
                "schedule {name}: {missing} ticks before its next one submitted no task (first: {first:?}), but it counts {skipped} skipped and {refused} refused"
            ),
            Violation::ScheduleCounters { name, why } => {
                write!(f, "schedule {name}'s counters: {why}")
            }
        }
    }
}

/// Every run of one execution: (worker, boot, started, ended), from the journal.
type Runs = Vec<(String, u64, u64, Option<u64>)>;

/// Executions that ran twice at overlapping times (an execution that never journaled an
/// end runs until the end: its worker may have crashed, but then it must not run again).
fn check_executions(h: &History, out: &mut Vec<Violation>) {
    let mut runs: BTreeMap<(u64, u32, u64), Runs> = BTreeMap::new();
    for e in &h.executions {
        let key = (e.task, e.attempt, e.term);
        match e.event {
            ExecEvent::Started => {
                runs.entry(key)
                    .or_default()
                    .push((e.worker.clone(), e.boot, e.at_ms, None))
            }
            ExecEvent::Ended => {
                if let Some(r) = runs.get_mut(&key).and_then(|v| {
                    v.iter_mut()
                        .rev()
                        .find(|r| r.0 == e.worker && r.1 == e.boot && r.3.is_none())
                }) {
                    r.3 = Some(e.at_ms);
                }
            }
            _ => {}
        }
    }
    for ((task, attempt, term), v) in runs {
        let overlaps = v.iter().enumerate().any(|(i, a)| {
            v[i + 1..]
                .iter()
                .any(|b| a.2 < b.3.unwrap_or(u64::MAX) && b.2 < a.3.unwrap_or(u64::MAX))
        });
        if overlaps {
            out.push(Violation::DuplicateExecution {
                execution: format!("{task}.{attempt}.{term}"),
                runs: v,
            });
        }
    }
}

/// When a worker held an attempt: from, until (`None`: to the end), and in which boot.
type Held = (u64, Option<u64>, u64);

/// Attempts given up as lost after being recorded on a worker that did not hold them for
/// longer than a lease (with a heartbeat and a second of slack). A worker holds an
/// attempt from `Held` until `Ended` or `Released`, or until it boots again.
fn check_phantoms(h: &History, tasks: &[TaskRecord], out: &mut Vec<Violation>) {
    let allowed = h.lease_ms + h.heartbeat_ms + 1000;
    // The workers' first journal lines are their boots, as the run begins.
    let start_ms = h.executions.first().map_or(0, |e| e.at_ms);
    let mut boots: BTreeMap<(&str, u64), u64> = BTreeMap::new();
    for e in &h.executions {
        if e.event == ExecEvent::Boot {
            boots.insert((&e.worker, e.boot), e.at_ms);
        }
    }
    // (worker, task, attempt) -> held intervals (from, to, boot).
    let mut held: BTreeMap<(&str, u64, u32), Vec<Held>> = BTreeMap::new();
    for e in &h.executions {
        let key = (e.worker.as_str(), e.task, e.attempt);
        match e.event {
            ExecEvent::Held => held.entry(key).or_default().push((e.at_ms, None, e.boot)),
            ExecEvent::Ended | ExecEvent::Released => {
                if let Some(iv) = held.get_mut(&key).and_then(|v| {
                    v.iter_mut()
                        .rev()
                        .find(|iv| iv.1.is_none() && iv.2 == e.boot)
                }) {
                    iv.1 = Some(e.at_ms);
                }
            }
            ExecEvent::Boot | ExecEvent::Started => {}
        }
    }
    // What a boot still held is gone by the worker's next boot.
    for ((worker, _, _), v) in held.iter_mut() {
        for iv in v.iter_mut().filter(|iv| iv.1.is_none()) {
            iv.1 = boots.get(&(*worker, iv.2 + 1)).copied();
        }
    }
    for t in tasks {
        for a in &t.attempt_log {
            if a.outcome.as_deref() != Some("lost") {
                continue;
            }
            let Some(lost_at) = a.finished_ms else {
                continue;
            };
            let ivs = held
                .get(&(a.worker.as_str(), t.id, a.number))
                .map(Vec::as_slice)
                .unwrap_or_default();
            // Held when given up (its worker was unreachable): the lease did its work.
            if ivs
                .iter()
                .any(|(from, to, _)| *from <= lost_at && to.is_none_or(|to| to >= lost_at))
            {
                continue;
            }
            let let_go = ivs
                .iter()
                .filter_map(|(_, to, _)| *to)
                .filter(|to| *to <= lost_at)
                .max()
                .unwrap_or(0);
            // Counted from when the leader that gave it up took office, at the earliest.
            let elected = h
                .elections
                .iter()
                .copied()
                .filter(|e| *e <= lost_at)
                .max()
                .unwrap_or(0);
            let from = a.started_ms.max(let_go).max(elected);
            let unheld_ms = lost_at.saturating_sub(from);
            if unheld_ms > allowed {
                out.push(Violation::Phantom {
                    id: t.id,
                    attempt: a.number,
                    worker: a.worker.clone(),
                    unheld_ms,
                    from: from.saturating_sub(start_ms),
                    lost: lost_at.saturating_sub(start_ms),
                });
            }
        }
    }
}

/// Check `h` against every guarantee; empty when all hold.
pub fn check(h: &History) -> Vec<Violation> {
    let mut out = Vec::new();

    // Idempotency across acknowledgements.
    let mut acked: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    // Earliest completed acknowledgement of each id, with its key.
    let mut first_ack: BTreeMap<u64, (At, &str)> = BTreeMap::new();
    for s in &h.submits {
        if let SubmitResult::Acked { id } = s.result {
            acked.entry(&s.key).or_default().insert(id);
            let e = first_ack.entry(id).or_insert((s.completed, &s.key));
            if s.completed < e.0 {
                *e = (s.completed, &s.key);
            }
        }
    }
    for (key, ids) in &acked {
        if ids.len() > 1 {
            out.push(Violation::KeyTwoTasks {
                key: key.to_string(),
                ids: ids.iter().copied().collect(),
            });
        }
    }
    for (id, (_, key)) in &first_ack {
        let other: Vec<&str> = h
            .submits
            .iter()
            .filter(|s| s.result == SubmitResult::Acked { id: *id } && s.key != *key)
            .map(|s| s.key.as_str())
            .collect();
        if let Some(k) = other.first() {
            out.push(Violation::WrongKey {
                id: *id,
                acked_key: k.to_string(),
                task_key: Some(key.to_string()),
            });
        }
    }

    // Reads, with the audit's view of every task as one more read at its time.
    let mut reads: BTreeMap<u64, Vec<Read>> = BTreeMap::new();
    for r in &h.reads {
        reads.entry(r.id).or_default().push(r.clone());
    }

    match &h.audit {
        None => out.push(Violation::NoAudit {
            reason: "no audit was taken".into(),
        }),
        Some(Audit::Incomplete { reason }) => out.push(Violation::NoAudit {
            reason: reason.clone(),
        }),
        Some(Audit::Complete {
            invoked,
            completed,
            tasks,
            schedules,
        }) => {
            check_table(h, &acked, tasks, &mut out);
            check_schedules(h, tasks, schedules, &mut out);
            check_phantoms(h, tasks, &mut out);
            check_keys(h, tasks, &mut out);
            check_buckets(h, tasks, &mut out);
            let listed: BTreeSet<u64> = tasks.iter().map(|t| t.id).collect();
            for t in tasks {
                reads.entry(t.id).or_default().push(Read {
                    client: "audit".into(),
                    id: t.id,
                    invoked: *invoked,
                    completed: *completed,
                    result: ReadResult::Found {
                        state: t.state.clone(),
                    },
                });
            }
            // An acknowledged task the listing does not show is a read that missed it.
            for id in first_ack.keys().filter(|id| !listed.contains(id)) {
                reads.entry(*id).or_default().push(Read {
                    client: "audit".into(),
                    id: *id,
                    invoked: *invoked,
                    completed: *completed,
                    result: ReadResult::NotFound,
                });
            }
        }
    }

    check_membership(h, &mut out);
    check_executions(h, &mut out);

    for (id, rs) in &reads {
        if let Some((acked_at, _)) = first_ack.get(id) {
            for r in rs {
                if r.invoked > *acked_at && r.result == ReadResult::NotFound && r.client != "audit"
                {
                    out.push(Violation::ReadMissedAck {
                        id: *id,
                        acked_at: *acked_at,
                        read: r.clone(),
                    });
                }
            }
        }
        for a in rs {
            let ReadResult::Found { state } = &a.result else {
                continue;
            };
            if !is_final(state) {
                continue;
            }
            // The first later read that disagrees is enough to show the violation.
            if let Some(b) = rs.iter().find(|b| {
                b.invoked > a.completed
                    && !matches!(&b.result, ReadResult::Unknown { .. })
                    && b.result != a.result
            }) {
                out.push(Violation::StaleRead {
                    id: *id,
                    earlier: a.clone(),
                    later: b.clone(),
                });
            }
        }
    }
    out
}

/// The limit of concurrency key `key`: the one named by it, else by its part before `:`.
fn key_limit(h: &History, key: &str) -> Option<u32> {
    h.key_limits.get(key).copied().or_else(|| {
        let (class, _) = key.split_once(':')?;
        h.key_limits.get(class).copied()
    })
}

/// When an attempt ended on the leader's clock (`None`: not yet). The leader stamps lost
/// and cancelled attempts; the others carry the time the worker reported, on its clock.
fn attempt_end(h: &History, a: &AttemptRecord) -> Option<u64> {
    let f = a.finished_ms?;
    match a.outcome.as_deref() {
        Some("lost") | Some("cancelled") => Some(f),
        _ => Some(f.saturating_add_signed(h.worker_clock_skew_ms.saturating_neg())),
    }
}

/// An attempt's start (ms since the epoch), task and attempt number.
type Start = (u64, u64, u32);

/// Every start of an attempt of a task with a limited concurrency key, in order: `f(key,
/// limit, (start, task, attempt), running)` with the key's earlier attempts (task,
/// attempt) that had not ended by then.
fn walk_keys(
    h: &History,
    tasks: &[TaskRecord],
    mut f: impl FnMut(&str, u32, Start, Vec<(u64, u32)>),
) {
    // key -> (start, task, attempt, end).
    let mut by_key: BTreeMap<&str, Vec<(Start, Option<u64>)>> = BTreeMap::new();
    for t in tasks {
        let Some(key) = t.concurrency_key.as_deref() else {
            continue;
        };
        for a in &t.attempt_log {
            by_key
                .entry(key)
                .or_default()
                .push(((a.started_ms, t.id, a.number), attempt_end(h, a)));
        }
    }
    for (key, mut attempts) in by_key {
        let Some(limit) = key_limit(h, key) else {
            continue;
        };
        attempts.sort();
        for (i, &(start, _)) in attempts.iter().enumerate() {
            let running: Vec<(u64, u32)> = attempts[..i]
                .iter()
                .filter(|(_, end)| end.is_none_or(|end| end > start.0))
                .map(|((_, id, attempt), _)| (*id, *attempt))
                .collect();
            f(key, limit, start, running);
        }
    }
}

/// The concurrency-key rule (see the module docs).
fn check_keys(h: &History, tasks: &[TaskRecord], out: &mut Vec<Violation>) {
    walk_keys(h, tasks, |key, limit, (s, id, attempt), running| {
        if running.len() >= limit as usize {
            out.push(Violation::KeyLimit {
                key: key.to_string(),
                limit,
                id,
                attempt,
                at_ms: s,
                running,
            });
        }
    });
}

/// Every rate limit the run defined with the starts of its tasks' attempts, sorted
/// (ms since the epoch, task, attempt).
fn bucket_starts(h: &History, tasks: &[TaskRecord]) -> Vec<(String, RateLimit, Vec<Start>)> {
    let mut by_limit: BTreeMap<&str, Vec<Start>> = BTreeMap::new();
    for t in tasks {
        let Some(limit) = t.rate_limit.as_deref() else {
            continue;
        };
        for a in &t.attempt_log {
            by_limit
                .entry(limit)
                .or_default()
                .push((a.started_ms, t.id, a.number));
        }
    }
    by_limit
        .into_iter()
        .filter_map(|(limit, mut starts)| {
            let rate = h.rate_limits.get(limit).copied()?;
            starts.sort();
            Some((limit.to_string(), rate, starts))
        })
        .collect()
}

/// Whether `n` starts from `from` to `to` (ms) overdraw `rate`:
/// `n > burst + tokens × (to − from) / per_ms`, in integers.
fn overdrawn(rate: RateLimit, n: usize, from: u64, to: u64) -> bool {
    let allowed = u128::from(rate.burst) * u128::from(rate.per_ms)
        + u128::from(rate.tokens) * u128::from(to.saturating_sub(from));
    n as u128 * u128::from(rate.per_ms) > allowed
}

/// The rate-limit rule (see the module docs): one violation per bucket at most, its
/// longest overdrawn window from the earliest start that has one.
fn check_buckets(h: &History, tasks: &[TaskRecord], out: &mut Vec<Violation>) {
    for (limit, rate, starts) in bucket_starts(h, tasks) {
        let over = |i: usize, j: usize| overdrawn(rate, j - i + 1, starts[i].0, starts[j].0);
        let window = (0..starts.len()).find_map(|i| {
            (i..starts.len())
                .rev()
                .find(|&j| over(i, j))
                .map(|j| (i, j))
        });
        if let Some((i, j)) = window {
            out.push(Violation::Bucket {
                limit,
                rate,
                starts: starts[i..=j].to_vec(),
            });
        }
    }
}

/// How hard a run pressed its limits, as the final audit shows (zero without one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitStats {
    /// Attempts of tasks with a limited concurrency key (what the key rule checked).
    pub keyed: usize,
    /// Of those, attempts that started with their key's limit less one running: they
    /// filled the key.
    pub keyed_full: usize,
    /// Attempts of tasks with a rate limit (what the bucket rule checked).
    pub bucketed: usize,
    /// Of those, attempts after which one more start at the same time would have
    /// overdrawn the bucket: they emptied it.
    pub bucket_emptied: usize,
}

/// [`LimitStats`] of `h`.
pub fn limit_stats(h: &History) -> LimitStats {
    let mut st = LimitStats::default();
    let Some(Audit::Complete { tasks, .. }) = &h.audit else {
        return st;
    };
    walk_keys(h, tasks, |_, limit, _, running| {
        st.keyed += 1;
        if running.len() + 1 >= limit as usize {
            st.keyed_full += 1;
        }
    });
    for (_, rate, starts) in bucket_starts(h, tasks) {
        st.bucketed += starts.len();
        st.bucket_emptied += (0..starts.len())
            .filter(|&j| (0..=j).any(|i| overdrawn(rate, j - i + 2, starts[i].0, starts[j].0)))
            .count();
    }
    st
}

/// The tick a task's idempotency key names if it is one of schedule `name`'s
/// (`schedule:<name>:<tick_ms>`): `Some(None)` when the key has the schedule's prefix but
/// no tick after it.
fn tick_of(name: &str, key: &str) -> Option<Option<u64>> {
    let rest = key
        .strip_prefix("schedule:")?
        .strip_prefix(name)?
        .strip_prefix(':')?;
    Some(rest.parse().ok())
}

/// What the schedule rule found for one schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TickCount {
    /// Ticks of its grid before its final next tick.
    due: u64,
    /// Of those, ticks with a task.
    fired: u64,
    /// Of those, ticks whose task first started [`LATE_TICK_MS`] or more after the tick.
    late: u64,
}

/// A tick whose task first started this long after it (ms) was fired late: a catch-up
/// after an outage, or its task waited for a worker. (Without either, a leader fires a
/// tick within 200 ms and its task starts at once.)
pub const LATE_TICK_MS: u64 = 1000;

/// The schedule rule (see the module docs) for every schedule a client created; what it
/// counted, by schedule.
fn check_schedules(
    h: &History,
    tasks: &[TaskRecord],
    statuses: &[ScheduleStatus],
    out: &mut Vec<Violation>,
) -> BTreeMap<String, TickCount> {
    let mut counts = BTreeMap::new();
    for c in &h.schedules {
        // Its tasks by tick; keys of its prefix that name no tick.
        let mut by_tick: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let mut bad_keys = Vec::new();
        for t in tasks {
            match t.key.as_deref().and_then(|k| tick_of(&c.name, k)) {
                None => {}
                Some(Some(tick)) => by_tick.entry(tick).or_default().push(t.id),
                Some(None) => bad_keys.push(t),
            }
        }
        let Some(st) = statuses.iter().find(|s| s.name == c.name) else {
            if c.confirmed.is_some() || !by_tick.is_empty() || !bad_keys.is_empty() {
                out.push(Violation::ScheduleLost {
                    name: c.name.clone(),
                });
            }
            continue;
        };
        let differs = |why: String| Violation::ScheduleDiffers {
            name: c.name.clone(),
            why,
        };
        let asked = (
            Some(c.every_ms),
            "all",
            Some(c.max_catch_up),
            c.agent.as_str(),
        );
        let shown = (
            st.every_ms,
            st.catch_up.as_str(),
            st.max_catch_up,
            st.agent.as_str(),
        );
        if asked != shown {
            out.push(differs(format!(
                "created as (every_ms, catch_up, max_catch_up, agent) {asked:?}, the audit shows {shown:?}"
            )));
            continue;
        }
        // Created by the leader's clock while a create was in flight: after the first
        // was invoked, before the read that confirmed it completed.
        let window_end = c.confirmed.map_or(u64::MAX, |(done, _)| done);
        if !(c.invoked_ms..=window_end).contains(&st.created_at_ms) {
            out.push(differs(format!(
                "created at {} ms, outside the window of its creation ({} ms to {window_end} ms)",
                st.created_at_ms, c.invoked_ms
            )));
        }
        if let Some((_, anchor)) = c.confirmed {
            if anchor != st.created_at_ms {
                out.push(differs(format!(
                    "read back as created at {anchor} ms, the audit shows {} ms",
                    st.created_at_ms
                )));
            }
        }
        let (anchor, every) = (st.created_at_ms, c.every_ms.max(1));
        let on_grid = |t: u64| t > anchor && (t - anchor).is_multiple_of(every);
        for t in bad_keys {
            out.push(Violation::ScheduleOffGrid {
                name: c.name.clone(),
                id: t.id,
                key: t.key.clone(),
            });
        }
        for (tick, ids) in &by_tick {
            if !on_grid(*tick) {
                for id in ids {
                    out.push(Violation::ScheduleOffGrid {
                        name: c.name.clone(),
                        id: *id,
                        key: Some(format!("schedule:{}:{tick}", c.name)),
                    });
                }
            }
            if ids.len() > 1 {
                out.push(Violation::ScheduleTickTwice {
                    name: c.name.clone(),
                    tick_ms: *tick,
                    ids: ids.clone(),
                });
            }
        }
        let next = match st.next_tick_ms {
            Some(n) if on_grid(n) => n,
            other => {
                out.push(differs(format!(
                    "its next tick is {other:?} (paused: {}), not a tick of its grid {anchor} + k × {every} ms",
                    st.paused
                )));
                continue;
            }
        };
        // Every tick from the first up to the next one (exclusive) was handled: it
        // submitted its task, or its task was refused, or a later tick's catch-up
        // skipped it. Ticks from `next` on may have fired after the audit read the
        // schedule; they were checked for the grid and for duplicates above.
        let first = anchor + every;
        let due = (next - first) / every;
        let fired: Vec<u64> = by_tick.range(..next).map(|(t, _)| *t).collect();
        let late = tasks
            .iter()
            .filter_map(|t| {
                let tick = t.key.as_deref().and_then(|k| tick_of(&c.name, k))??;
                let start = t.attempt_log.first()?.started_ms;
                (tick < next && start >= tick + LATE_TICK_MS).then_some(tick)
            })
            .collect::<BTreeSet<u64>>()
            .len() as u64;
        let missing: Vec<u64> = (0..due)
            .map(|k| first + k * every)
            .filter(|t| !by_tick.contains_key(t))
            .collect();
        counts.insert(
            c.name.clone(),
            TickCount {
                due,
                fired: fired.len() as u64,
                late,
            },
        );
        let counters = |why: String| Violation::ScheduleCounters {
            name: c.name.clone(),
            why,
        };
        if st.fired != fired.len() as u64 {
            out.push(counters(format!(
                "{} fired, but {} of its ticks before {next} ms submitted a task",
                st.fired,
                fired.len()
            )));
        }
        // A catch-up skips only when more than `max_catch_up` ticks are due at once, and
        // no more than `due` ever were (those it skips and fires are all before `next`).
        let keep = match (st.catch_up.as_str(), st.max_catch_up) {
            ("all", Some(max)) => u64::from(max),
            _ => 1,
        };
        if due <= keep && st.skipped > 0 {
            out.push(counters(format!(
                "{} skipped, but only {due} ticks were ever due and a catch-up fires up to {keep}",
                st.skipped
            )));
        }
        if missing.len() as u64 != st.skipped.saturating_add(st.refused) {
            out.push(Violation::ScheduleTicksMissing {
                name: c.name.clone(),
                missing: missing.len(),
                first: missing.iter().take(10).copied().collect(),
                skipped: st.skipped,
                refused: st.refused,
            });
        }
        // The tick before the next one is the last one fired or refused (a skip comes
        // with a later tick fired or refused).
        let last = (due > 0).then(|| next - every);
        if st.last_tick_ms != last {
            out.push(counters(format!(
                "its last tick is {:?}, but the tick before its next one ({next} ms) is {last:?}",
                st.last_tick_ms
            )));
        }
    }
    counts
}

/// What the schedule rule checked in a run (zero without an audit or a schedule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScheduleStats {
    /// Schedules in the final audit that clients created.
    pub schedules: usize,
    /// Ticks due before their schedule's final next tick (each checked to have
    /// submitted exactly one task, or to be accounted for by the counters).
    pub ticks: u64,
    /// Of those, ticks with a task.
    pub fired: u64,
    /// Of those, ticks fired late (their task first started [`LATE_TICK_MS`] or more
    /// after the tick): caught up after an outage, or their task waited for a worker.
    pub late: u64,
}

/// [`ScheduleStats`] of `h`.
pub fn schedule_stats(h: &History) -> ScheduleStats {
    let Some(Audit::Complete {
        tasks, schedules, ..
    }) = &h.audit
    else {
        return ScheduleStats::default();
    };
    let counts = check_schedules(h, tasks, schedules, &mut Vec::new());
    ScheduleStats {
        schedules: counts.len(),
        ticks: counts.values().map(|c| c.due).sum(),
        fired: counts.values().map(|c| c.fired).sum(),
        late: counts.values().map(|c| c.late).sum(),
    }
}

/// Membership changes completed, the voters they leave, and identical replicas.
fn check_membership(h: &History, out: &mut Vec<Violation>) {
    for c in &h.membership {
        if c.completed.is_none() {
            out.push(Violation::MembershipIncomplete {
                what: c.what.clone(),
                notes: c.notes.clone(),
            });
        }
    }
    match &h.replicas {
        None => {}
        Some(Replicas::Unsettled { reason }) => out.push(Violation::Unsettled {
            reason: reason.clone(),
        }),
        Some(Replicas::Settled {
            index,
            voters,
            expected_voters,
            nodes,
        }) => {
            if let Some(expected) = expected_voters {
                if expected != voters {
                    out.push(Violation::WrongVoters {
                        expected: expected.clone(),
                        actual: voters.clone(),
                    });
                }
            }
            let states: BTreeSet<(u64, u64)> =
                nodes.iter().map(|n| (n.dump_bytes, n.dump_hash)).collect();
            let off = nodes
                .iter()
                .any(|n| n.error.is_some() || n.checkpoint_index != Some(*index));
            if off || states.len() > 1 {
                out.push(Violation::ReplicasDiffer {
                    index: *index,
                    nodes: nodes.clone(),
                });
            }
        }
    }
}

/// The audit's table against the acknowledgements and the submitted keys.
/// Whether a succeeded echo task answered its input: its payload, or for a dependant
/// `{"payload": <payload>, "parents": …}`.
fn echoed(t: &TaskRecord) -> bool {
    if t.parents.is_empty() {
        return t.output == t.payload;
    }
    let out: Option<serde_json::Value> = t
        .output
        .as_deref()
        .and_then(|o| serde_json::from_str(o).ok());
    let payload: Option<serde_json::Value> = t
        .payload
        .as_deref()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|_| p.into()));
    match (out, payload) {
        (Some(o), Some(p)) => o["payload"] == p && o["parents"].is_object(),
        _ => false,
    }
}

/// The graph rule: a dependant runs only after every parent succeeded (its first attempt
/// starts after each parent's successful one ended), and a parent that ended otherwise
/// leaves it cancelled with `dependency_failed`, never run. The parent's end is its
/// worker's time; the dependant's start is the leader's when it recorded the start
/// before the result, else the worker's (an attempt of a task with neither concurrency
/// key nor rate limit may be recorded by its result first), and the audit does not say
/// which: it counts as early only if it is under both readings, against the parent's end
/// corrected for the workers' clock skew and as reported.
fn check_dependencies(
    h: &History,
    t: &TaskRecord,
    by_id: &BTreeMap<u64, &TaskRecord>,
    out: &mut Vec<Violation>,
) {
    for &p in &t.parents {
        let Some(parent) = by_id.get(&p) else {
            // Purged after its retention; nothing to compare.
            continue;
        };
        let mut fail = |why: String| {
            out.push(Violation::Dependency {
                id: t.id,
                parent: p,
                why,
            })
        };
        if let Some(first) = t.attempt_log.first() {
            match parent
                .attempt_log
                .iter()
                .find(|a| a.outcome.as_deref() == Some("succeeded"))
            {
                Some(done) if parent.state == "succeeded" => {
                    let ended = done
                        .finished_ms
                        .zip(attempt_end(h, done))
                        .map(|(a, b)| a.min(b));
                    if ended.is_some_and(|f| first.started_ms < f) {
                        fail(format!(
                            "started at {} ms, before the parent's success ended at {:?} ms (the earlier of its reported and skew-corrected ends)",
                            first.started_ms, ended
                        ));
                    }
                }
                _ => fail(format!(
                    "ran (attempt {} on {}) although the parent is {}",
                    first.number, first.worker, parent.state
                )),
            }
        } else if is_final(&parent.state) && parent.state != "succeeded" {
            let cancelled = t.state == "cancelled"
                && t.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("dependency_failed"));
            if !cancelled {
                fail(format!(
                    "is {} ({:?}) although the parent is {}",
                    t.state, t.error, parent.state
                ));
            }
        }
    }
}

fn check_table(
    h: &History,
    acked: &BTreeMap<&str, BTreeSet<u64>>,
    tasks: &[TaskRecord],
    out: &mut Vec<Violation>,
) {
    let submitted: BTreeSet<&str> = h.submits.iter().map(|s| s.key.as_str()).collect();
    let by_id: BTreeMap<u64, &TaskRecord> = tasks.iter().map(|t| (t.id, t)).collect();
    let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for t in tasks {
        match t.key.as_deref() {
            Some(k) if submitted.contains(k) => by_key.entry(k).or_default().push(t.id),
            // A tick of a schedule a client created: the schedule rule judges it.
            Some(k) if h.schedules.iter().any(|c| tick_of(&c.name, k).is_some()) => {}
            _ => out.push(Violation::Unsubmitted {
                id: t.id,
                key: t.key.clone(),
            }),
        }
        let expected = usize::from(t.state == "succeeded");
        if t.succeeded_attempts > 1 || (t.state == "succeeded" && t.succeeded_attempts != expected)
        {
            out.push(Violation::ResultCount {
                id: t.id,
                state: t.state.clone(),
                succeeded_attempts: t.succeeded_attempts,
            });
        }
        if t.state == "succeeded" && t.agent == "echo" && !echoed(t) {
            out.push(Violation::WrongResult {
                id: t.id,
                payload: t.payload.clone(),
                output: t.output.clone(),
            });
        }
        check_dependencies(h, t, &by_id, out);
    }
    for (key, ids) in &by_key {
        if ids.len() > 1 {
            out.push(Violation::KeyTwoTasks {
                key: key.to_string(),
                ids: ids.clone(),
            });
        }
    }
    for (key, ids) in acked {
        for id in ids {
            match by_id.get(id) {
                None => out.push(Violation::LostAck {
                    key: key.to_string(),
                    id: *id,
                }),
                Some(t) => {
                    if t.key.as_deref() != Some(*key) {
                        out.push(Violation::WrongKey {
                            id: *id,
                            acked_key: key.to_string(),
                            task_key: t.key.clone(),
                        });
                    }
                    if !is_final(&t.state) {
                        out.push(Violation::NotFinal {
                            key: key.to_string(),
                            id: *id,
                            state: t.state.clone(),
                        });
                    }
                }
            }
        }
    }
}
