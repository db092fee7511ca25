//! Dispatch decisions, worker leases and retry backoff, as a plain state machine.
//!
//! The scheduler never touches a socket, a clock or the Raft log. The leader's
//! dispatcher feeds it events (worker connected, heartbeat, report received, task
//! finalized) with an explicit `now_ms`, asks it for a [`Scheduler::plan`] and for
//! [`Scheduler::expire`]d attempts, and turns the answers into Raft proposals and frames.
//!
//! Bookkeeping: an attempt is *in flight* from the moment it is planned until the task
//! table says the task moved on (finalized or re-queued). A worker's slot is busy from
//! plan until the worker reports the attempt's end, which may be before the report is
//! committed; the task stays in flight until then, so it is never planned twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;

use swarm_proto::worker::AttemptRef;
use swarm_proto::TaskId;

use crate::admission::{Admission, Blocked};
use crate::state::{Lane, Task, TaskTable};

/// Timing knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// A worker not heard from for this long is lost, and so are its attempts.
    pub lease_ms: u64,
    /// How often workers send heartbeats: an attempt its worker's heartbeats stop
    /// listing is given up two heartbeats inside a lease after the first one that did
    /// not list it, so within a lease of the leader being able to know.
    pub heartbeat_ms: u64,
    /// First retry delay; doubles per attempt.
    pub backoff_base_ms: u64,
    /// Largest retry delay.
    pub backoff_max_ms: u64,
    /// How long after dispatch an attempt's `Start` is recorded in the log, unless its
    /// report came first (then the report records the attempt). Keeps a Raft commit off
    /// the path of short tasks; a longer task shows as running this much later.
    pub start_record_delay_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lease_ms: 5_000,
            heartbeat_ms: 1_000,
            backoff_base_ms: 200,
            backoff_max_ms: 30_000,
            start_record_delay_ms: 10,
        }
    }
}

/// One worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerEntry {
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    /// Agents the worker offers.
    pub agents: BTreeSet<String>,
    /// Where the worker accepts mesh peer links, if it does.
    pub peer_addr: Option<String>,
    pub connected: bool,
    /// The worker is draining (being stopped): nothing new is placed on it.
    pub draining: bool,
    pub last_seen_ms: u64,
    /// Attempts occupying a slot (planned, not yet reported).
    pub busy: u32,
    /// Attempts planned on this worker since it registered.
    pub dispatched: u64,
}

impl WorkerEntry {
    fn load(&self) -> f64 {
        if self.slots == 0 {
            return f64::INFINITY;
        }
        self.busy as f64 / self.slots as f64
    }

    /// Whether new attempts may be placed on the worker: connected and not draining.
    pub fn takes_work(&self) -> bool {
        self.connected && !self.draining
    }

    /// Whether the worker carries every label in `wanted`.
    pub fn has_labels(&self, wanted: &BTreeMap<String, String>) -> bool {
        wanted.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// Whether the worker offers `agent`. A worker that named no agents (registered
    /// without a list) is taken to offer every one.
    pub fn offers(&self, agent: &str) -> bool {
        self.agents.is_empty() || self.agents.contains(agent)
    }
}

/// An attempt the scheduler is tracking.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    pub worker: String,
    pub attempt: AttemptRef,
    /// Past this time the attempt is given up even if its worker is alive.
    pub deadline_ms: u64,
    /// Its slot is free: the worker reported the end, or the attempt was given up
    /// (`given_up`); it stays in flight until the end commits.
    pub reported: bool,
    /// Given up ([`Scheduler::give_up`]): its `Lose` is on its way to commit.
    pub given_up: bool,
    /// Since when the worker's heartbeats have not listed it (see
    /// [`Scheduler::heartbeat`]).
    pub unlisted_since_ms: Option<u64>,
    /// The mesh steals that brought it to `worker` (from, to), in order: the report's
    /// proposal repeats their `Op::Move`s before its `Op::Finish`, so a report that
    /// overtakes a steal's own proposal still finds the attempt on its worker.
    pub moves: Vec<(String, String)>,
    /// The task's concurrency key (counted by [`Admission`] while in flight).
    pub key: Option<String>,
}

/// "Send this attempt to this worker."
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub worker: String,
    pub attempt: AttemptRef,
    /// Record the attempt's `Start` first and send it only once that committed: the
    /// task is under a concurrency key or a rate limit (see [`crate::admission`]).
    /// Other attempts are sent at once and their `Start` recorded after
    /// [`SchedulerConfig::start_record_delay_ms`], if they still run.
    pub record_first: bool,
}

/// The result of [`Scheduler::plan`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub dispatches: Vec<Dispatch>,
    /// Earliest backoff end among the queued tasks looked at and skipped for it.
    pub next_ready_ms: Option<u64>,
}

/// An attempt to give up, with a reason for the task's record.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    pub worker: String,
    pub attempt: AttemptRef,
    pub reason: String,
}

/// The leader's dispatch and lease state. Rebuilt from the task table on election.
#[derive(Debug, Default)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    workers: BTreeMap<String, WorkerEntry>,
    in_flight: HashMap<TaskId, InFlight>,
    /// The tasks in flight on each worker: what a heartbeat, a reconnect or a lost
    /// worker looks at, without walking every attempt in flight.
    by_worker: HashMap<String, BTreeSet<TaskId>>,
    /// Unreported attempts in flight by deadline: what `expire` looks at.
    deadlines: BTreeSet<(u64, TaskId)>,
    /// Dispatched attempts whose `Start` is not recorded yet, oldest first, with the time
    /// it is due.
    pending_starts: std::collections::VecDeque<(u64, Dispatch)>,
    /// Rotates the starting point among equally loaded workers.
    cursor: usize,
    /// Bumped whenever a worker joins, leaves or is dropped: topologies re-plan then.
    membership_gen: u64,
    /// The agents some connected worker offers, as of a membership generation.
    offered: (u64, HashSet<String>),
    /// Concurrency keys in flight, token buckets, and the round-robin over lanes.
    admission: Admission,
    /// Lanes with a key or a rate limit are dispatched only while this is set: a new
    /// leader sets it once its table holds every attempt an earlier leader recorded
    /// and it has adopted them (see [`Scheduler::hold_limited`]).
    limited_held: bool,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            cfg,
            ..Default::default()
        }
    }

    /// A worker said hello. Its earlier slot bookkeeping is kept: attempts it still
    /// runs stay in flight on it.
    pub fn worker_connected(
        &mut self,
        id: &str,
        slots: u32,
        labels: BTreeMap<String, String>,
        now_ms: u64,
    ) {
        self.worker_joined(id, slots, labels, BTreeSet::new(), None, now_ms);
    }

    /// [`Scheduler::worker_connected`] with the worker's agents and peer address.
    pub fn worker_joined(
        &mut self,
        id: &str,
        slots: u32,
        labels: BTreeMap<String, String>,
        agents: BTreeSet<String>,
        peer_addr: Option<String>,
        now_ms: u64,
    ) {
        let busy = self.in_flight_on(id).filter(|f| !f.reported).count() as u32;
        let dispatched = self.workers.get(id).map_or(0, |w| w.dispatched);
        self.membership_gen += 1;
        self.workers.insert(
            id.to_string(),
            WorkerEntry {
                slots,
                labels,
                agents,
                peer_addr,
                connected: true,
                // A new session starts undrained; a draining worker says so again first.
                draining: false,
                last_seen_ms: now_ms,
                busy,
                dispatched,
            },
        );
    }

    /// The worker's connection closed. Its attempts stay leased to it until the lease
    /// runs out, so a quick reconnect loses nothing.
    pub fn worker_disconnected(&mut self, id: &str) {
        if let Some(w) = self.workers.get_mut(id) {
            w.connected = false;
            self.membership_gen += 1;
        }
    }

    /// The worker is draining: from now on nothing is placed on it (its attempts in
    /// flight stay tracked until they are reported), and it leaves every swarm layout.
    /// Returns whether this changed anything.
    pub fn worker_draining(&mut self, id: &str) -> bool {
        match self.workers.get_mut(id) {
            Some(w) if !w.draining => {
                w.draining = true;
                self.membership_gen += 1;
                true
            }
            _ => false,
        }
    }

    /// The worker takes work again (an operator resumed it): the reverse of
    /// [`Scheduler::worker_draining`], and it rejoins the swarm layouts. Returns whether
    /// this changed anything.
    pub fn worker_resumed(&mut self, id: &str) -> bool {
        match self.workers.get_mut(id) {
            Some(w) if w.draining => {
                w.draining = false;
                self.membership_gen += 1;
                true
            }
            _ => false,
        }
    }

    /// Any sign of life from the worker renews its lease.
    pub fn worker_seen(&mut self, id: &str, now_ms: u64) {
        if let Some(w) = self.workers.get_mut(id) {
            w.last_seen_ms = w.last_seen_ms.max(now_ms);
        }
    }

    /// Changes whenever the set of workers (or their connectedness, or drain) changes.
    pub fn membership_gen(&self) -> u64 {
        self.membership_gen
    }

    /// Workers known to the scheduler.
    pub fn workers(&self) -> &BTreeMap<String, WorkerEntry> {
        &self.workers
    }

    /// The attempt in flight for `task`, if any.
    pub fn in_flight(&self, task: TaskId) -> Option<&InFlight> {
        self.in_flight.get(&task)
    }

    /// All attempts in flight on `worker`.
    pub fn in_flight_on<'a>(&'a self, worker: &'a str) -> impl Iterator<Item = &'a InFlight> + 'a {
        self.by_worker
            .get(worker)
            .into_iter()
            .flatten()
            .filter_map(|t| self.in_flight.get(t))
    }

    /// Start tracking `f` (nothing is in flight for its task).
    fn track(&mut self, task: TaskId, f: InFlight) {
        // No allocation per dispatch: a worker's set stays (empty) while it is known.
        match self.by_worker.get_mut(&f.worker) {
            Some(set) => {
                set.insert(task);
            }
            None => {
                self.by_worker
                    .insert(f.worker.clone(), BTreeSet::from([task]));
            }
        }
        if !f.reported {
            self.deadlines.insert((f.deadline_ms, task));
        }
        self.admission.track(f.key.as_deref());
        self.in_flight.insert(task, f);
    }

    /// Stop tracking what is in flight for `task`.
    fn untrack(&mut self, task: TaskId) -> Option<InFlight> {
        let f = self.in_flight.remove(&task)?;
        if let Some(set) = self.by_worker.get_mut(&f.worker) {
            set.remove(&task);
            if set.is_empty() && !self.workers.contains_key(&f.worker) {
                self.by_worker.remove(&f.worker);
            }
        }
        self.deadlines.remove(&(f.deadline_ms, task));
        self.admission.untrack(f.key.as_deref());
        Some(f)
    }

    /// Hold (`true`) or release lanes with a key or a rate limit. A new leader holds them
    /// until its state machine has applied an entry of its own term (so every `Start`
    /// of an earlier term that will ever commit is in its table) and it has adopted the
    /// attempts running there: otherwise a `Start` committed late would run beside this
    /// leader's own dispatches of the same key.
    pub fn hold_limited(&mut self, held: bool) {
        self.limited_held = held;
    }

    pub fn limited_held(&self) -> bool {
        self.limited_held
    }

    /// Concurrency keys in flight and token buckets.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Number of attempts in flight.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// Track an attempt the scheduler did not plan: one a reconnecting worker reports, or
    /// one the task table says is running after this node became leader.
    pub fn adopt(
        &mut self,
        worker: &str,
        attempt: AttemptRef,
        timeout_ms: u64,
        key: Option<&str>,
        now_ms: u64,
    ) {
        if self
            .in_flight
            .get(&attempt.task_id)
            .is_some_and(|f| f.attempt == attempt && f.worker == worker)
        {
            return;
        }
        self.forget(attempt.task_id);
        let deadline_ms = self.deadline(now_ms, timeout_ms);
        self.track(
            attempt.task_id,
            InFlight {
                worker: worker.to_string(),
                attempt,
                deadline_ms,
                reported: false,
                given_up: false,
                unlisted_since_ms: None,
                moves: Vec::new(),
                key: key.map(str::to_string),
            },
        );
        // A worker this leader has not heard from yet (the attempt was adopted from the
        // table on election): known from now, disconnected, so its lease runs from now
        // and it has that long to say hello before its attempts are given up.
        let w = self
            .workers
            .entry(worker.to_string())
            .or_insert_with(|| WorkerEntry {
                slots: 0,
                labels: BTreeMap::new(),
                agents: BTreeSet::new(),
                peer_addr: None,
                connected: false,
                draining: false,
                last_seen_ms: now_ms,
                busy: 0,
                dispatched: 0,
            });
        w.busy += 1;
    }

    fn deadline(&self, now_ms: u64, timeout_ms: u64) -> u64 {
        now_ms
            .saturating_add(timeout_ms)
            .saturating_add(self.cfg.lease_ms)
    }

    /// The worker reported the end of `attempt`: its slot is free; the task stays in
    /// flight until the report commits.
    pub fn reported(&mut self, worker: &str, attempt: AttemptRef) {
        let Some(f) = self.in_flight.get_mut(&attempt.task_id) else {
            return;
        };
        if f.attempt != attempt || f.worker != worker || f.reported {
            return;
        }
        f.reported = true;
        let deadline = (f.deadline_ms, attempt.task_id);
        self.deadlines.remove(&deadline);
        if let Some(w) = self.workers.get_mut(worker) {
            w.busy = w.busy.saturating_sub(1);
        }
    }

    /// A heartbeat of `worker` listed the attempts it holds, `running`. An attempt in
    /// flight there that its heartbeats have not listed for longer than a lease is given
    /// up ([`Scheduler::give_up`]) and returned (the caller proposes its `Lose`).
    /// The lease of grace covers a `Run` still on its way and a hand-over to a mesh peer
    /// not yet reported by the taker; an attempt listed again is cleared.
    pub fn heartbeat(
        &mut self,
        worker: &str,
        running: &[AttemptRef],
        now_ms: u64,
    ) -> Vec<AttemptRef> {
        // The first unlisting heartbeat can come a heartbeat after the attempt stopped
        // being held, and the one that gives it up a heartbeat after the grace.
        let grace = self
            .cfg
            .lease_ms
            .saturating_sub(2 * self.cfg.heartbeat_ms)
            .max(self.cfg.heartbeat_ms);
        let listed: BTreeSet<AttemptRef> = running.iter().copied().collect();
        let mut gone = Vec::new();
        let Some(tasks) = self.by_worker.get(worker) else {
            return gone;
        };
        for t in tasks {
            let Some(f) = self.in_flight.get_mut(t) else {
                continue;
            };
            if f.reported {
                continue;
            }
            if listed.contains(&f.attempt) {
                f.unlisted_since_ms = None;
                continue;
            }
            let since = *f.unlisted_since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) > grace {
                gone.push(f.attempt);
            }
        }
        for a in &gone {
            self.give_up(a.task_id);
        }
        gone
    }

    /// Of the attempts `worker` says it holds, those not in flight on it here (or given
    /// up).
    pub fn untracked(&self, worker: &str, running: &[AttemptRef]) -> Vec<AttemptRef> {
        running
            .iter()
            .filter(|a| {
                !self
                    .in_flight
                    .get(&a.task_id)
                    .is_some_and(|f| f.attempt == **a && f.worker == worker && !f.given_up)
            })
            .copied()
            .collect()
    }

    /// Give up the attempt in flight for `task`: its worker lost it, is lost, or may not
    /// run it. Its slot and deadline are freed at once, but it stays in flight, so
    /// [`Scheduler::plan`] does not send the task again under the same attempt number
    /// while its end is uncommitted, until the table says the task moved on
    /// ([`Scheduler::forget`]). The caller proposes [`Op::give_up`]'s ops. Returns what
    /// was given up; `None` if nothing was in flight or its slot was already free.
    ///
    /// [`Op::give_up`]: crate::state::Op::give_up
    pub fn give_up(&mut self, task: TaskId) -> Option<InFlight> {
        let f = self.in_flight.get_mut(&task)?;
        if f.reported {
            return None;
        }
        f.reported = true;
        f.given_up = true;
        let (deadline, worker) = (f.deadline_ms, f.worker.clone());
        let out = f.clone();
        self.deadlines.remove(&(deadline, task));
        if let Some(w) = self.workers.get_mut(&worker) {
            w.busy = w.busy.saturating_sub(1);
        }
        Some(out)
    }

    /// Whether the attempt in flight for `attempt`'s task is `attempt`, given up.
    pub fn is_given_up(&self, attempt: AttemptRef) -> bool {
        self.in_flight
            .get(&attempt.task_id)
            .is_some_and(|f| f.attempt == attempt && f.given_up)
    }

    /// The task table says the task moved on (final, or queued for another attempt).
    /// Returns what was in flight, so a still-running attempt can be stopped.
    pub fn forget(&mut self, task: TaskId) -> Option<InFlight> {
        let f = self.untrack(task)?;
        if !f.reported {
            if let Some(w) = self.workers.get_mut(&f.worker) {
                w.busy = w.busy.saturating_sub(1);
            }
        }
        Some(f)
    }

    /// [`Scheduler::forget`] the attempt in flight for `task` if its number is below
    /// `next`: the task queued again for attempt `next`, so that one has ended.
    pub fn forget_before(&mut self, task: TaskId, next: u32) -> Option<InFlight> {
        if self
            .in_flight
            .get(&task)
            .is_some_and(|f| f.attempt.attempt < next)
        {
            self.forget(task)
        } else {
            None
        }
    }

    /// Choose attempts for queued tasks, best first, until workers are full: priorities
    /// highest first; within one, round-robin across the run queue's lanes (one task
    /// from each lane in turn, starting after the lane served last), oldest first in a
    /// lane. A lane whose key is at its limit or whose bucket is empty is skipped whole.
    /// Tasks in flight, waiting out a backoff, held (`hold`), or matching no connected
    /// worker's labels are skipped; draining workers get nothing. A task goes only to a
    /// worker offering its agent while a connected worker does; while none does, to any
    /// (which fails it `unknown_agent`, naming what it offers: a mistyped agent is told
    /// at once rather than waiting for ever).
    pub fn plan(&mut self, table: &TaskTable, now_ms: u64) -> Plan {
        self.plan_by(
            table,
            now_ms,
            0,
            |_| false,
            |task, _, w| w.has_labels(&task.spec.labels).then_some(w.slots),
        )
    }

    /// [`Scheduler::plan`] with placement decided by `place(task, worker id, worker)`:
    /// how many attempts the worker may hold when it takes this task (its slots, plus a
    /// queue it holds locally), or `None` if it may not take it. `max_extra` bounds what
    /// any worker holds beyond its slots.
    pub fn plan_by(
        &mut self,
        table: &TaskTable,
        now_ms: u64,
        max_extra: u32,
        hold: impl Fn(&Task) -> bool,
        mut place: impl FnMut(&Task, &str, &WorkerEntry) -> Option<u32>,
    ) -> Plan {
        let mut free: u64 = self
            .workers
            .values()
            .filter(|w| w.takes_work())
            .map(|w| (w.slots + max_extra).saturating_sub(w.busy) as u64)
            .sum();
        let mut plan = Plan::default();
        if free == 0 {
            return plan;
        }
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        self.refresh_offered();
        let limits = table.limits().clone();
        self.admission.prune(&limits);
        for (level, lanes) in table.run_queue().levels() {
            if free == 0 {
                break;
            }
            // The lanes in turn, starting after the one served last.
            let after = self.admission.cursor(level).cloned();
            let order: Box<dyn Iterator<Item = (&Lane, &BTreeSet<TaskId>)>> = match &after {
                Some(c) => Box::new(
                    lanes
                        .range::<Lane, _>((Bound::Excluded(c), Bound::Unbounded))
                        .chain(lanes.range::<Lane, _>((Bound::Unbounded, Bound::Included(c)))),
                ),
                None => Box::new(lanes.iter()),
            };
            // Lanes that started a task this pass, with where they stopped.
            let mut again = Vec::new();
            for (lane, queued) in order {
                if free == 0 {
                    break;
                }
                let mut rest = queued.iter();
                if self.take_from_lane(
                    table, lane, &mut rest, &limits, now_ms, &ids, &hold, &mut place, &mut plan,
                ) {
                    self.admission.served(level, lane);
                    free -= 1;
                    again.push((lane, rest));
                }
            }
            // Further passes over the lanes that still start tasks.
            while free > 0 && !again.is_empty() {
                again.retain_mut(|(lane, rest)| {
                    if free == 0 {
                        return true;
                    }
                    let took = self.take_from_lane(
                        table, lane, rest, &limits, now_ms, &ids, &hold, &mut place, &mut plan,
                    );
                    if took {
                        self.admission.served(level, lane);
                        free -= 1;
                    }
                    took
                });
            }
        }
        plan
    }

    /// Start the first task of `rest` (a lane's queued ids, oldest first) that can start
    /// now, if the lane may start one: true if it did.
    #[allow(clippy::too_many_arguments)]
    fn take_from_lane<'q>(
        &mut self,
        table: &TaskTable,
        lane: &Lane,
        rest: &mut impl Iterator<Item = &'q TaskId>,
        limits: &crate::state::Limits,
        now_ms: u64,
        ids: &[String],
        hold: &impl Fn(&Task) -> bool,
        place: &mut impl FnMut(&Task, &str, &WorkerEntry) -> Option<u32>,
        plan: &mut Plan,
    ) -> bool {
        if self.limited_held && (lane.key.is_some() || lane.rate_limit.is_some()) {
            return false;
        }
        match self.admission.check(lane, limits, now_ms) {
            Ok(()) => {}
            Err(Blocked::Key) => return false,
            Err(Blocked::Rate { ready_ms }) => {
                plan.next_ready_ms = Some(plan.next_ready_ms.map_or(ready_ms, |t| t.min(ready_ms)));
                return false;
            }
        }
        for id in rest {
            let Some(task) = table.get(*id) else {
                continue;
            };
            if self.in_flight.contains_key(&task.id) || hold(task) {
                continue;
            }
            if task.not_before_ms > now_ms {
                plan.next_ready_ms = Some(
                    plan.next_ready_ms
                        .map_or(task.not_before_ms, |t| t.min(task.not_before_ms)),
                );
                continue;
            }
            let agent = task.current_agent();
            let strict = self.offered.1.contains(agent);
            let Some(worker) = self.pick_worker(ids, |id, w| {
                if strict && !w.offers(agent) {
                    return None;
                }
                place(task, id, w)
            }) else {
                continue;
            };
            self.admission.started(lane, limits, now_ms);
            let attempt = AttemptRef {
                task_id: task.id,
                attempt: task.next_attempt(),
            };
            let deadline_ms = self.deadline(now_ms, task.spec.timeout_ms);
            if let Some(w) = self.workers.get_mut(&worker) {
                w.busy += 1;
                w.dispatched += 1;
            }
            self.track(
                task.id,
                InFlight {
                    worker: worker.clone(),
                    attempt,
                    deadline_ms,
                    reported: false,
                    given_up: false,
                    unlisted_since_ms: None,
                    moves: Vec::new(),
                    key: task.concurrency_key().map(str::to_string),
                },
            );
            let record_first = task.is_limited();
            let d = Dispatch {
                worker,
                attempt,
                record_first,
            };
            if !record_first {
                self.pending_starts.push_back((
                    now_ms.saturating_add(self.cfg.start_record_delay_ms),
                    d.clone(),
                ));
            }
            plan.dispatches.push(d);
            return true;
        }
        false
    }

    /// Dispatched attempts whose `Start` should be recorded now: due, still in flight and
    /// not reported (a report records the attempt itself).
    pub fn due_starts(&mut self, now_ms: u64) -> Vec<Dispatch> {
        let mut out = Vec::new();
        while self
            .pending_starts
            .front()
            .is_some_and(|(due, _)| *due <= now_ms)
        {
            let Some((_, d)) = self.pending_starts.pop_front() else {
                break;
            };
            let live = self
                .in_flight
                .get(&d.attempt.task_id)
                .is_some_and(|f| f.attempt == d.attempt && f.worker == d.worker && !f.reported);
            if live {
                out.push(d);
            }
        }
        out
    }

    /// The least loaded connected worker with room that `place` allows; ties go
    /// round-robin so equal workers share the work.
    /// Recompute which agents connected workers offer, if membership changed.
    fn refresh_offered(&mut self) {
        if self.offered.0 == self.membership_gen && self.membership_gen != 0 {
            return;
        }
        let offered = self
            .workers
            .values()
            .filter(|w| w.connected)
            .flat_map(|w| w.agents.iter().cloned())
            .collect();
        self.offered = (self.membership_gen, offered);
    }

    fn pick_worker(
        &mut self,
        ids: &[String],
        mut place: impl FnMut(&str, &WorkerEntry) -> Option<u32>,
    ) -> Option<String> {
        let n = ids.len();
        let mut best: Option<(f64, usize)> = None;
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let Some(w) = self.workers.get(&ids[i]) else {
                continue;
            };
            if !w.takes_work() {
                continue;
            }
            match place(&ids[i], w) {
                Some(cap) if w.busy < cap => {}
                _ => continue,
            }
            let load = w.load();
            if best.is_none_or(|(b, _)| load < b) {
                best = Some((load, i));
            }
        }
        let (_, i) = best?;
        self.cursor = (i + 1) % n.max(1);
        Some(ids[i].clone())
    }

    /// `attempt`, in flight on `from`, moved to `to` (a mesh steal). Returns false, and
    /// changes nothing, unless it is in flight on `from` and not yet reported.
    pub fn moved(&mut self, attempt: AttemptRef, from: &str, to: &str) -> bool {
        if !self
            .in_flight
            .get(&attempt.task_id)
            .is_some_and(|f| f.attempt == attempt && f.worker == from && !f.reported)
        {
            return false;
        }
        let Some(mut f) = self.untrack(attempt.task_id) else {
            return false;
        };
        f.moves.push((from.to_string(), to.to_string()));
        f.worker = to.to_string();
        self.track(attempt.task_id, f);
        if let Some(w) = self.workers.get_mut(from) {
            w.busy = w.busy.saturating_sub(1);
        }
        if let Some(w) = self.workers.get_mut(to) {
            w.busy += 1;
        }
        // A pending `Start` naming `from` is no longer due (see `due_starts`): the
        // `Op::Move` proposed for this records the attempt on `to` instead.
        true
    }

    /// Attempts to give up at `now_ms`: those of workers whose lease ran out, and those
    /// past their deadline. Expired workers are dropped. Each attempt is returned once
    /// (it is given up, see [`Scheduler::give_up`]); the caller proposes its `Lose`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Expired> {
        let lease = self.cfg.lease_ms;
        let lost: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now_ms.saturating_sub(w.last_seen_ms) > lease)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        let mut gone = BTreeSet::new();
        // Attempts of lost workers, and of workers the scheduler no longer knows (an
        // adopted attempt of a worker that never said hello to this leader).
        let orphaned = self
            .by_worker
            .keys()
            .filter(|w| !self.workers.contains_key(*w))
            .cloned();
        let lost_or_unknown: Vec<String> = lost.iter().cloned().chain(orphaned).collect();
        for w in &lost_or_unknown {
            for f in self.in_flight_on(w).filter(|f| !f.reported) {
                out.push(Expired {
                    worker: f.worker.clone(),
                    attempt: f.attempt,
                    reason: format!(
                        "worker {} lost: not heard from for over {lease} ms",
                        f.worker
                    ),
                });
                gone.insert(f.attempt.task_id);
            }
        }
        let overdue = self
            .deadlines
            .range(..(now_ms, 0))
            .map(|(_, t)| *t)
            .filter(|t| !gone.contains(t))
            .collect::<Vec<_>>();
        for task in overdue {
            if let Some(f) = self.in_flight.get(&task) {
                out.push(Expired {
                    worker: f.worker.clone(),
                    attempt: f.attempt,
                    reason: format!(
                        "no report from worker {} by the attempt's deadline",
                        f.worker
                    ),
                });
                gone.insert(task);
            }
        }
        for task in gone {
            self.give_up(task);
        }
        for id in lost {
            // A worker still connected but silent is dropped too; if it comes back it
            // says hello again.
            self.workers.remove(&id);
            if self.by_worker.get(&id).is_some_and(BTreeSet::is_empty) {
                self.by_worker.remove(&id);
            }
            self.membership_gen += 1;
        }
        out.sort_by_key(|e| e.attempt);
        out
    }

    /// When [`Scheduler::expire`] may next have something to do.
    pub fn next_expiry(&self) -> Option<u64> {
        let leases = self
            .workers
            .values()
            .map(|w| w.last_seen_ms.saturating_add(self.cfg.lease_ms + 1));
        let deadlines = self.deadlines.first().map(|(d, _)| d + 1);
        let starts = self.pending_starts.front().map(|(due, _)| *due);
        leases.chain(deadlines).chain(starts).min()
    }

    /// When a retry of `attempt` (the attempt that just ended) may run: exponential
    /// backoff from the configured base, capped, with up to 25% jitter derived from the
    /// task id so replays compute the same value.
    pub fn retry_at(&self, now_ms: u64, attempt: AttemptRef) -> u64 {
        let exp = attempt.attempt.saturating_sub(1).min(20);
        let delay = self
            .cfg
            .backoff_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.cfg.backoff_max_ms);
        let jitter = (attempt.task_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % (delay / 4 + 1);
        now_ms.saturating_add(delay).saturating_add(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Op, TaskSpec, TaskTable};
    use swarm_proto::api::TaskState;

    fn cfg() -> SchedulerConfig {
        SchedulerConfig {
            lease_ms: 1000,
            heartbeat_ms: 100,
            backoff_base_ms: 100,
            backoff_max_ms: 1000,
            start_record_delay_ms: 10,
        }
    }

    fn table(n: usize, labels: &[(&str, &str)]) -> TaskTable {
        let mut t = TaskTable::new();
        let spec = TaskSpec {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..table_spec()
        };
        let ops = (0..n)
            .map(|_| Op::Submit {
                spec: spec.clone(),
                now_ms: 0,
                queue_limit: 1000,
            })
            .collect();
        t.apply(&Command { ops });
        t
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The per-worker and deadline indexes hold exactly what a walk over every attempt
    /// in flight finds.
    fn assert_indexed(s: &Scheduler) {
        let mut by_worker: HashMap<String, BTreeSet<TaskId>> = HashMap::new();
        let mut deadlines = BTreeSet::new();
        for (t, f) in &s.in_flight {
            by_worker.entry(f.worker.clone()).or_default().insert(*t);
            if !f.reported {
                deadlines.insert((f.deadline_ms, *t));
            }
        }
        let indexed: HashMap<String, BTreeSet<TaskId>> = s
            .by_worker
            .iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(w, set)| (w.clone(), set.clone()))
            .collect();
        assert_eq!(indexed, by_worker);
        // Empty sets only for workers the scheduler knows.
        assert!(s
            .by_worker
            .iter()
            .all(|(w, set)| !set.is_empty() || s.workers.contains_key(w)));
        assert_eq!(s.deadlines, deadlines);
    }

    /// Placing, moving, reporting, forgetting, heartbeats, reconnects and expiry keep the
    /// indexes true, in a long seeded mix of them.
    #[test]
    fn indexes_follow_every_change() {
        let mut t = table(400, &[]);
        let mut s = Scheduler::new(cfg());
        let workers = ["a", "b", "c", "d"];
        for w in workers {
            s.worker_connected(w, 8, labels(&[]), 0);
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut now = 0;
        for step in 0..3000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            now += x % 40;
            let w = workers[(x >> 8) as usize % workers.len()];
            let on_w: Vec<InFlight> = s.in_flight_on(w).cloned().collect();
            let pick = on_w.get((x >> 16) as usize % on_w.len().max(1)).cloned();
            match x % 7 {
                0 | 1 => {
                    s.plan(&t, now);
                }
                2 => {
                    if let Some(f) = pick {
                        let to = workers[(x >> 24) as usize % workers.len()];
                        s.moved(f.attempt, &f.worker, to);
                    }
                }
                3 => {
                    if let Some(f) = pick {
                        s.reported(&f.worker, f.attempt);
                        if step % 2 == 0 {
                            s.forget(f.attempt.task_id);
                            // Finished for good: it leaves the queue.
                            t.apply(&Command {
                                ops: vec![Op::Cancel {
                                    task_id: f.attempt.task_id,
                                    now_ms: now,
                                }],
                            });
                        }
                    }
                }
                4 => {
                    let listed: Vec<AttemptRef> = on_w.iter().skip(1).map(|f| f.attempt).collect();
                    s.heartbeat(w, &listed, now);
                    s.worker_seen(w, now);
                }
                5 => s.worker_connected(w, 8, labels(&[]), now),
                _ => {
                    for w in workers {
                        if !(x >> 32).is_multiple_of(3) {
                            s.worker_seen(w, now);
                        }
                    }
                    s.expire(now);
                    for w in workers {
                        if !s.workers().contains_key(w) {
                            s.worker_connected(w, 8, labels(&[]), now);
                        }
                    }
                }
            }
            assert_indexed(&s);
        }
        assert!(s.in_flight_count() > 0 || t.queued().next().is_none());
    }

    /// An attempt adopted on election for a worker that has not said hello to this
    /// leader yet gets a lease for the worker to come back, not an instant loss.
    #[test]
    fn adopted_attempts_of_workers_not_yet_back_get_a_lease() {
        let mut s = Scheduler::new(cfg());
        let a = AttemptRef {
            task_id: 1,
            attempt: 1,
        };
        s.adopt("w", a, 60_000, None, 100);
        assert!(
            s.expire(200).is_empty(),
            "the worker has a lease to come back"
        );
        assert!(!s.workers()["w"].takes_work());
        s.worker_connected("w", 2, labels(&[]), 500);
        assert_eq!(s.workers()["w"].busy, 1, "the adopted attempt holds a slot");
        // Silent past the lease after its hello: lost.
        let lost = s.expire(1_501);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].attempt, a);
        // A worker that never comes back loses them a lease after the adoption.
        s.adopt("gone", a, 60_000, None, 2_000);
        assert!(s.expire(3_000).is_empty());
        assert_eq!(s.expire(3_001).len(), 1);
    }

    /// A task queued again for attempt `next` ends the attempt in flight below it; an
    /// attempt planned at `next` (dispatched after the change applied) stays, so it is not
    /// dispatched a second time.
    #[test]
    fn requeue_events_forget_only_older_attempts() {
        let t = table(1, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 2, labels(&[]), 0);
        let d = s.plan(&t, 0).dispatches.remove(0);
        assert_eq!(d.attempt.attempt, 1);
        // The submit's event, drained after the dispatch: the attempt stays in flight.
        assert!(s.forget_before(1, 1).is_none());
        assert!(s.plan(&t, 0).dispatches.is_empty(), "not sent twice");
        // Queued again for attempt 2: attempt 1 has ended.
        assert_eq!(s.forget_before(1, 2).map(|f| f.attempt), Some(d.attempt));
        assert_eq!(s.in_flight_count(), 0);
    }

    /// A task goes only to a worker offering its agent (one that named none offers all)
    /// while a connected worker does.
    #[test]
    fn a_task_goes_only_to_a_worker_offering_its_agent() {
        let t = table(6, &[]);
        let mut s = Scheduler::new(cfg());
        let offers = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        s.worker_joined("other", 8, labels(&[]), offers(&["work"]), None, 0);
        s.worker_joined("echoes", 2, labels(&[]), offers(&["echo", "work"]), None, 0);
        s.worker_connected("unlisted", 2, labels(&[]), 0);
        let plan = s.plan(&t, 0).dispatches;
        assert_eq!(plan.len(), 4, "{plan:?}");
        assert!(plan.iter().all(|d| d.worker != "other"), "{plan:?}");
        // Once no connected worker offers it, anyone takes it (and fails it, saying what
        // it offers) rather than the task waiting unexplained.
        let t = table(2, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_joined("other", 8, labels(&[]), offers(&["work"]), None, 0);
        s.worker_joined("echoes", 2, labels(&[]), offers(&["echo"]), None, 0);
        s.worker_disconnected("echoes");
        let plan = s.plan(&t, 0).dispatches;
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(|d| d.worker == "other"), "{plan:?}");
    }

    #[test]
    fn fills_free_slots_fairly_and_never_twice() {
        let t = table(10, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 2, labels(&[]), 0);
        s.worker_connected("b", 2, labels(&[]), 0);
        let plan = s.plan(&t, 0).dispatches;
        assert_eq!(plan.len(), 4);
        let on_a = plan.iter().filter(|d| d.worker == "a").count();
        assert_eq!(on_a, 2, "work is spread: {plan:?}");
        // Nothing more fits, and nothing already planned is planned again.
        assert!(s.plan(&t, 0).dispatches.is_empty());
        s.reported("a", plan[0].attempt);
        let again = s.plan(&t, 0).dispatches;
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].attempt.task_id, plan[0].attempt.task_id);
    }

    /// Heartbeats reconcile: an attempt placed on a worker that its heartbeats stop
    /// listing is given up once it has been unlisted for more than a lease less two
    /// heartbeats (not before: a `Run` may be on its way), one listed again is kept, and
    /// attempts a worker lists that are not in flight on it are reported as untracked.
    #[test]
    fn heartbeats_give_up_unlisted_attempts_after_a_lease() {
        let t = table(3, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 3, labels(&[]), 0);
        let plan = s.plan(&t, 0).dispatches;
        let [x, y, z] = [plan[0].attempt, plan[1].attempt, plan[2].attempt];
        // The first heartbeat was sent before the Runs arrived: nothing is lost yet.
        assert!(s.heartbeat("a", &[], 100).is_empty());
        // x and y arrive; z never does.
        assert!(s.heartbeat("a", &[x, y], 600).is_empty());
        // Lease 1000 ms, heartbeats every 100 ms: a grace of 800 ms.
        assert!(
            s.heartbeat("a", &[x], 900).is_empty(),
            "z unlisted for 800 ms"
        );
        assert_eq!(s.heartbeat("a", &[x], 901), vec![z]);
        assert!(s.is_given_up(z), "given up");
        assert_eq!(s.workers()["a"].busy, 2);
        // y went unlisted at 900; listed again at 1500, it is kept (and z, given up, is
        // not given up twice).
        assert!(s.heartbeat("a", &[x, y], 1500).is_empty());
        assert!(s.heartbeat("a", &[x, y], 3000).is_empty());
        // A reported attempt is not expected in the list.
        s.reported("a", x);
        assert!(s.heartbeat("a", &[y], 5000).is_empty());
        // Listed but not in flight here: untracked.
        let stray = AttemptRef {
            task_id: 99,
            attempt: 1,
        };
        assert_eq!(s.untracked("a", &[y, stray, z]), vec![stray, z]);
        assert!(
            s.untracked("b", &[y]) == vec![y],
            "in flight on another worker"
        );
    }

    #[test]
    fn respects_labels_backoff_and_disconnects() {
        let mut t = table(1, &[("gpu", "yes")]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("cpu", 4, labels(&[]), 0);
        assert!(
            s.plan(&t, 0).dispatches.is_empty(),
            "no worker has the label"
        );
        s.worker_connected("gpu", 1, labels(&[("gpu", "yes"), ("zone", "x")]), 0);
        s.worker_disconnected("gpu");
        assert!(
            s.plan(&t, 0).dispatches.is_empty(),
            "disconnected workers get nothing"
        );
        s.worker_connected("gpu", 1, labels(&[("gpu", "yes")]), 0);
        let plan = s.plan(&t, 0).dispatches;
        assert_eq!(
            plan,
            vec![Dispatch {
                worker: "gpu".into(),
                attempt: AttemptRef {
                    task_id: 1,
                    attempt: 1
                },
                record_first: false,
            }]
        );
        // The attempt fails and the task is queued again with a backoff.
        let retry_at = s.retry_at(10, plan[0].attempt);
        t.apply(&Command {
            ops: vec![
                Op::Start {
                    attempt: plan[0].attempt,
                    worker: "gpu".into(),
                    now_ms: 1,
                },
                Op::Lose {
                    attempt: plan[0].attempt,
                    reason: "x".into(),
                    now_ms: 10,
                    retry_at_ms: retry_at,
                },
            ],
        });
        s.forget(1);
        let waiting = s.plan(&t, retry_at - 1);
        assert!(waiting.dispatches.is_empty(), "backoff is honoured");
        assert_eq!(waiting.next_ready_ms, Some(retry_at));
        let plan = s.plan(&t, retry_at).dispatches;
        assert_eq!(plan[0].attempt.attempt, 2);
    }

    #[test]
    fn priority_order_is_kept() {
        let mut t = TaskTable::new();
        for p in [1, 7, 3] {
            let spec = TaskSpec {
                agent: "echo".into(),
                payload: vec![],
                priority: p,
                timeout_ms: 10,
                max_attempts: 1,
                idempotency_key: None,
                labels: BTreeMap::new(),
                patterns: 0,
                swarm: swarm_topology::DEFAULT_SWARM_NAME.to_string(),
                stages: Vec::new(),
                retain_ms: 60_000,
            };
            t.apply(&Command {
                ops: vec![Op::Submit {
                    spec,
                    now_ms: 0,
                    queue_limit: 10,
                }],
            });
        }
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 1, labels(&[]), 0);
        assert_eq!(s.plan(&t, 0).dispatches[0].attempt.task_id, 2);
    }

    #[test]
    fn silent_workers_lose_their_attempts_after_the_lease() {
        let t = table(2, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 1, labels(&[]), 0);
        s.worker_connected("b", 1, labels(&[]), 0);
        let plan = s.plan(&t, 0).dispatches;
        assert_eq!(plan.len(), 2);
        s.worker_disconnected("a");
        s.worker_seen("b", 900);
        assert!(s.expire(1000).is_empty(), "lease not over yet");
        let expired = s.expire(1001);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].worker, "a");
        assert!(expired[0].reason.contains("lost"));
        assert!(!s.workers().contains_key("a"));
        assert!(s.expire(1002).is_empty(), "each attempt expires once");
        let lost = expired[0].attempt;
        assert!(s.is_given_up(lost));
        // Until its `Lose` commits, the task is not sent again under the same number,
        // though the table (which has not applied it) still shows it queued.
        s.worker_connected("c", 1, labels(&[]), 1002);
        assert!(s.plan(&t, 1002).dispatches.is_empty());
        // The `Lose` committed: the task queued for attempt 2, which goes out.
        assert!(s.forget_before(lost.task_id, 2).is_some());
        let again = s.plan(&t, 1003).dispatches;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempt.task_id, lost.task_id);
    }

    #[test]
    fn deadline_expires_attempts_of_live_workers() {
        let t = table(1, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 1, labels(&[]), 0);
        s.plan(&t, 0);
        // timeout 500 + lease 1000
        for now in (100..=1500).step_by(100) {
            s.worker_seen("a", now);
            assert!(s.expire(now).is_empty());
        }
        s.worker_seen("a", 1501);
        let e = s.expire(1501);
        assert_eq!(e.len(), 1);
        assert!(e[0].reason.contains("deadline"));
        assert_eq!(s.workers()["a"].busy, 0);
    }

    #[test]
    fn reported_attempts_are_not_expired_and_adopt_is_idempotent() {
        let t = table(1, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 1, labels(&[]), 0);
        let plan = s.plan(&t, 0).dispatches;
        s.reported("a", plan[0].attempt);
        assert!(s.expire(10_000).is_empty());
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 2, labels(&[]), 0);
        let at = AttemptRef {
            task_id: 1,
            attempt: 1,
        };
        s.adopt("a", at, 100, None, 0);
        s.adopt("a", at, 100, None, 0);
        assert_eq!(s.workers()["a"].busy, 1);
        assert!(
            s.plan(&t, 0).dispatches.is_empty(),
            "adopted task is in flight"
        );
        assert_eq!(t.get(1).map(|t| t.state), Some(TaskState::Queued));
    }

    #[test]
    fn a_draining_worker_gets_nothing_new_and_keeps_what_it_runs() {
        let t = table(6, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 2, labels(&[]), 0);
        s.worker_connected("b", 2, labels(&[]), 0);
        let first = s.plan(&t, 0).dispatches;
        let on_a: Vec<AttemptRef> = first
            .iter()
            .filter(|d| d.worker == "a")
            .map(|d| d.attempt)
            .collect();
        assert_eq!(on_a.len(), 2, "{first:?}");
        let gen = s.membership_gen();
        assert!(s.worker_draining("a"));
        assert!(!s.worker_draining("a"), "draining twice changes nothing");
        assert!(!s.worker_draining("nobody"));
        assert!(s.membership_gen() > gen, "layouts re-plan without it");
        // Both of a's slots free up: still nothing goes there, while b takes more.
        for a in &on_a {
            s.reported("a", *a);
            s.forget(a.task_id);
        }
        let b_done: Vec<AttemptRef> = first
            .iter()
            .filter(|d| d.worker == "b")
            .map(|d| d.attempt)
            .collect();
        for a in &b_done {
            s.reported("b", *a);
        }
        let next = s.plan(&t, 0).dispatches;
        assert!(!next.is_empty());
        assert!(next.iter().all(|d| d.worker == "b"), "{next:?}");
        // Queueing beyond slots (plan_by) never picks it either.
        assert!(s
            .plan_by(&t, 0, 8, |_| false, |_, _, w| Some(w.slots + 8))
            .dispatches
            .iter()
            .all(|d| d.worker == "b"));
        assert_eq!(s.workers()["a"].busy, 0);
        // A new session of the worker starts undrained (it says Draining again).
        s.worker_connected("a", 2, labels(&[]), 0);
        assert!(s.workers()["a"].takes_work());
    }

    #[test]
    fn a_resumed_worker_takes_work_again() {
        let t = table(4, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 2, labels(&[]), 0);
        s.worker_connected("b", 2, labels(&[]), 0);
        assert!(!s.worker_resumed("a"), "not drained: nothing to resume");
        assert!(s.worker_draining("a"));
        let drained = s.plan(&t, 0).dispatches;
        assert!(drained.iter().all(|d| d.worker == "b"), "{drained:?}");
        for d in &drained {
            s.reported("b", d.attempt);
            s.forget(d.attempt.task_id);
        }
        let gen = s.membership_gen();
        assert!(s.worker_resumed("a"));
        assert!(!s.worker_resumed("a"), "resuming twice changes nothing");
        assert!(!s.worker_resumed("nobody"));
        assert!(s.membership_gen() > gen, "layouts re-plan with it");
        assert!(s.workers()["a"].takes_work());
        let next = s.plan(&t, 0).dispatches;
        assert!(next.iter().any(|d| d.worker == "a"), "{next:?}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let s = Scheduler::new(cfg());
        let at = |n| AttemptRef {
            task_id: 42,
            attempt: n,
        };
        let d1 = s.retry_at(0, at(1));
        let d2 = s.retry_at(0, at(2));
        let d9 = s.retry_at(0, at(9));
        assert!((100..=125).contains(&d1), "{d1}");
        assert!((200..=250).contains(&d2), "{d2}");
        assert!((1000..=1250).contains(&d9), "{d9}");
        assert_eq!(s.retry_at(0, at(2)), d2, "deterministic");
    }

    #[test]
    fn starts_are_recorded_after_the_delay_unless_reported_first() {
        let t = table(3, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 3, labels(&[]), 0);
        let plan = s.plan(&t, 100).dispatches;
        assert_eq!(plan.len(), 3);
        assert_eq!(s.next_expiry(), Some(110));
        assert!(s.due_starts(109).is_empty());
        s.reported("a", plan[0].attempt);
        s.forget(plan[1].attempt.task_id);
        let due = s.due_starts(110);
        assert_eq!(
            due,
            vec![plan[2].clone()],
            "only the live, unreported attempt"
        );
        assert!(s.due_starts(1000).is_empty(), "each start is due once");
    }

    #[test]
    fn many_workers_share_evenly() {
        let t = table(1000, &[]);
        let mut s = Scheduler::new(cfg());
        for i in 0..10 {
            s.worker_connected(&format!("w{i}"), 100, labels(&[]), 0);
        }
        let plan = s.plan(&t, 0).dispatches;
        assert_eq!(plan.len(), 1000);
        for w in s.workers().values() {
            assert_eq!(w.busy, 100);
        }
    }

    #[test]
    fn placement_bounds_each_worker_and_queue_depth_lets_it_hold_more() {
        let t = table(10, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 2, labels(&[]), 0);
        s.worker_connected("b", 2, labels(&[]), 0);
        // Only "a" may take work, and may hold 3 beyond its 2 slots.
        let plan = s.plan_by(
            &t,
            0,
            3,
            |_| false,
            |_, id, w| (id == "a").then_some(w.slots + 3),
        );
        assert_eq!(plan.dispatches.len(), 5);
        assert!(plan.dispatches.iter().all(|d| d.worker == "a"));
        assert_eq!(s.workers()["a"].busy, 5);
        assert!(s
            .plan_by(
                &t,
                0,
                3,
                |_| false,
                |_, id, w| (id == "a").then_some(w.slots + 3)
            )
            .dispatches
            .is_empty());
    }

    #[test]
    fn a_move_follows_the_attempt_and_its_slot() {
        let t = table(1, &[]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("a", 1, labels(&[]), 0);
        s.worker_connected("b", 1, labels(&[]), 0);
        let d = s.plan(&t, 0).dispatches.remove(0);
        let (from, to) = if d.worker == "a" {
            ("a", "b")
        } else {
            ("b", "a")
        };
        assert!(!s.moved(d.attempt, to, from), "only from the holder");
        assert!(s.moved(d.attempt, from, to));
        assert_eq!(s.in_flight(1).unwrap().worker, to);
        // The report's proposal repeats the move (see `InFlight::moves`).
        assert_eq!(
            s.in_flight(1).unwrap().moves,
            vec![(from.to_string(), to.to_string())]
        );
        assert_eq!((s.workers()[from].busy, s.workers()[to].busy), (0, 1));
        // The start recorded later names no one: the move records the attempt.
        assert!(s.due_starts(1_000).is_empty());
        // The thief's lease now governs it.
        s.worker_disconnected(to);
        s.worker_seen(from, 1_500);
        let lost = s.expire(1_500);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].worker, to);
        let gen = s.membership_gen();
        s.worker_connected("c", 1, labels(&[]), 2_000);
        assert!(s.membership_gen() > gen);
    }

    /// Submit tasks with flow controls: (concurrency key, rate limit, priority) each.
    fn submit_flows(t: &mut TaskTable, tasks: &[(Option<&str>, Option<&str>, i32)]) {
        let ops = tasks
            .iter()
            .map(|(key, rate, priority)| {
                let mut spec = table_spec();
                spec.priority = *priority;
                let flow = crate::state::Flow {
                    concurrency_key: key.map(str::to_string),
                    rate_limit: rate.map(str::to_string),
                    ..Default::default()
                };
                if flow.is_empty() {
                    Op::Submit {
                        spec,
                        now_ms: 0,
                        queue_limit: 100_000,
                    }
                } else {
                    Op::SubmitFlow {
                        spec,
                        flow: Box::new(flow),
                        now_ms: 0,
                        queue_limit: 100_000,
                    }
                }
            })
            .collect();
        t.apply(&Command { ops });
    }

    fn table_spec() -> TaskSpec {
        TaskSpec {
            agent: "echo".into(),
            payload: vec![],
            priority: 0,
            timeout_ms: 500,
            max_attempts: 3,
            idempotency_key: None,
            labels: BTreeMap::new(),
            patterns: 0,
            swarm: swarm_topology::DEFAULT_SWARM_NAME.to_string(),
            stages: Vec::new(),
            retain_ms: 60_000,
        }
    }

    fn set_limit(t: &mut TaskTable, name: &str, concurrency: Option<u32>, rate: Option<&str>) {
        use crate::state::{LimitDef, LimitsOp, Rate};
        t.apply(&Command {
            ops: vec![Op::Limits(LimitsOp::Set {
                name: name.into(),
                def: LimitDef {
                    concurrency,
                    rate: rate.map(|r| Rate::parse(r, 1).unwrap()),
                },
            })],
        });
    }

    fn key_of(t: &TaskTable, d: &Dispatch) -> Option<String> {
        t.get(d.attempt.task_id)
            .and_then(|task| task.concurrency_key().map(str::to_string))
    }

    /// Within a priority, lanes take turns: three tenants' backlogs, submitted one
    /// after the other, start interleaved; a key at its limit is skipped whole; a
    /// higher priority still goes first.
    #[test]
    fn keys_take_turns_and_never_pass_their_limit() {
        let mut t = TaskTable::new();
        set_limit(&mut t, "tenant", Some(2), None);
        let mut tasks = Vec::new();
        for key in ["tenant:a", "tenant:b", "tenant:c"] {
            tasks.extend(std::iter::repeat_n((Some(key), None, 0), 10));
        }
        tasks.extend(std::iter::repeat_n((None, None, 0), 3));
        tasks.push((Some("tenant:c"), None, 5));
        submit_flows(&mut t, &tasks);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("w", 100, labels(&[]), 0);
        let plan = s.plan(&t, 0).dispatches;
        let keys: Vec<Option<String>> = plan.iter().map(|d| key_of(&t, d)).collect();
        let k = |k: &str| Some(k.to_string());
        // The priority-5 task first; then a, b, c (at its limit: 2 with the first) and
        // the default lane in turns.
        assert_eq!(
            keys,
            vec![
                k("tenant:c"),
                None,
                k("tenant:a"),
                k("tenant:b"),
                k("tenant:c"),
                None,
                k("tenant:a"),
                k("tenant:b"),
                None,
            ]
        );
        assert!(plan
            .iter()
            .all(|d| d.record_first == key_of(&t, d).is_some()));
        assert_eq!(
            s.pending_starts.len(),
            3,
            "only unlimited attempts start late"
        );
        // Full keys stay full until an attempt ends.
        assert!(s.plan(&t, 1).dispatches.is_empty());
        let a = plan
            .iter()
            .find(|d| key_of(&t, d) == k("tenant:a"))
            .unwrap();
        s.forget(a.attempt.task_id);
        let next = s.plan(&t, 2).dispatches;
        assert_eq!(next.len(), 1);
        assert_eq!(key_of(&t, &next[0]), k("tenant:a"));
        // A new leader adopting the running attempts counts them against their keys.
        let mut fresh = Scheduler::new(cfg());
        fresh.worker_connected("w", 100, labels(&[]), 0);
        let running = plan.iter().filter(|d| d.attempt != a.attempt).chain(&next);
        for d in running {
            let task = t.get(d.attempt.task_id).unwrap();
            fresh.adopt("w", d.attempt, 500, task.concurrency_key(), 3);
        }
        assert!(fresh.plan(&t, 3).dispatches.is_empty());
    }

    /// With one free slot per round, the turn passes on between rounds.
    #[test]
    fn the_turn_carries_over_between_rounds() {
        let mut t = TaskTable::new();
        let mut tasks = Vec::new();
        for key in ["x", "y", "z"] {
            tasks.extend(std::iter::repeat_n((Some(key), None, 0), 5));
        }
        submit_flows(&mut t, &tasks);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("w", 1, labels(&[]), 0);
        let mut order = Vec::new();
        for now in 0..6 {
            let plan = s.plan(&t, now).dispatches;
            assert_eq!(plan.len(), 1);
            order.push(key_of(&t, &plan[0]).unwrap());
            s.forget(plan[0].attempt.task_id);
        }
        assert_eq!(order, ["x", "y", "z", "x", "y", "z"]);
    }

    /// A lane whose bucket is empty waits, holds no slot, and says when to look again;
    /// other lanes run meanwhile.
    #[test]
    fn an_empty_bucket_holds_its_lane_and_no_slot() {
        let mut t = TaskTable::new();
        set_limit(&mut t, "five", None, Some("5/s"));
        let mut tasks = vec![(None, Some("five"), 0); 10];
        tasks.extend([(None, None, 0); 2]);
        submit_flows(&mut t, &tasks);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("w", 100, labels(&[]), 1_000);
        let plan = s.plan(&t, 1_000);
        assert_eq!(plan.dispatches.len(), 2, "only the unlimited tasks");
        assert!(plan.dispatches.iter().all(|d| t
            .get(d.attempt.task_id)
            .unwrap()
            .rate_limit()
            .is_none()));
        assert_eq!(plan.next_ready_ms, Some(1_200));
        let mut started = Vec::new();
        for now in (1_000..=3_000).step_by(50) {
            for d in s.plan(&t, now).dispatches {
                assert!(d.record_first);
                started.push(now);
            }
        }
        assert_eq!(
            started,
            [1_200, 1_400, 1_600, 1_800, 2_000, 2_200, 2_400, 2_600, 2_800, 3_000]
        );
        assert_eq!(s.workers()["w"].busy, 12);
    }

    /// A new leader holds limited lanes until it has adopted what earlier leaders
    /// started: unlimited work runs meanwhile.
    #[test]
    fn held_limited_lanes_wait_and_others_run() {
        let mut t = TaskTable::new();
        submit_flows(&mut t, &[(Some("k"), None, 9), (None, None, 0)]);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("w", 10, labels(&[]), 0);
        s.hold_limited(true);
        let plan = s.plan(&t, 0).dispatches;
        assert_eq!(plan.len(), 1);
        assert_eq!(key_of(&t, &plan[0]), None);
        s.hold_limited(false);
        let plan = s.plan(&t, 1).dispatches;
        assert_eq!(plan.len(), 1);
        assert_eq!(key_of(&t, &plan[0]).as_deref(), Some("k"));
    }

    /// At scale: 200,000 queued tasks over 10,000 keys of a class limited to 3, and
    /// 2,000 unkeyed ones. Rounds of dispatch and completions never put a key past 3,
    /// serve every key before any key a second time, and finish everything.
    #[test]
    fn ten_thousand_keys_at_scale_stay_fair_and_bounded() {
        const KEYS: usize = 10_000;
        let mut t = TaskTable::new();
        set_limit(&mut t, "t", Some(3), None);
        let names: Vec<String> = (0..KEYS).map(|k| format!("t:{k}")).collect();
        for chunk in 0..20 {
            // Each chunk adds one task of every key, so a key's tasks are spread in age.
            let keys = names.iter().map(|n| Some(n.as_str()));
            let ops: Vec<Op> = keys
                .chain(std::iter::repeat_n(None, 100 * (chunk % 2)))
                .map(|key| match key {
                    Some(k) => Op::SubmitFlow {
                        spec: table_spec(),
                        flow: Box::new(crate::state::Flow {
                            concurrency_key: Some(k.to_string()),
                            ..Default::default()
                        }),
                        now_ms: 0,
                        queue_limit: 1_000_000,
                    },
                    None => Op::Submit {
                        spec: table_spec(),
                        now_ms: 0,
                        queue_limit: 1_000_000,
                    },
                })
                .collect();
            t.apply(&Command { ops });
        }
        assert_eq!(t.run_queue().len(), 20 * KEYS + 1_000);
        let mut s = Scheduler::new(cfg());
        s.worker_connected("w", 5_000, labels(&[]), 0);
        let mut first_round: Vec<String> = Vec::new();
        let mut done = 0usize;
        let mut now = 0;
        while done < 20 * KEYS + 1_000 {
            now += 1;
            let plan = s.plan(&t, now).dispatches;
            assert!(!plan.is_empty(), "stalled with {done} done");
            for d in &plan {
                if let Some(k) = key_of(&t, d) {
                    if first_round.len() < KEYS {
                        first_round.push(k);
                    }
                }
            }
            for (k, n) in s.admission().running_keys() {
                assert!(n <= 3, "{k} has {n} in flight");
            }
            // Every attempt succeeds: the table moves on and the slot is free.
            let ops = plan
                .iter()
                .map(|d| Op::Finish {
                    attempt: d.attempt,
                    worker: d.worker.clone(),
                    outcome: swarm_proto::worker::Outcome::Succeeded { output: vec![] },
                    started_at_ms: now,
                    finished_at_ms: now,
                    now_ms: now,
                    retry_at_ms: now,
                })
                .collect();
            t.apply(&Command { ops });
            for d in &plan {
                s.forget(d.attempt.task_id);
            }
            done += plan.len();
        }
        // The first 10,000 keyed starts were 10,000 different keys.
        first_round.sort();
        first_round.dedup();
        assert_eq!(first_round.len(), KEYS);
        assert!(t.run_queue().is_empty());
    }
}
