//! The attempt bookkeeping of a worker, independent of any connection.
//!
//! One task owns all state — attempts running, attempts queued for a slot, reports not
//! yet acked — and is driven by [`Command`]s from the connection loop. Attempts keep
//! running while the worker is disconnected; their reports wait in the unacked map and
//! are (re)sent on every new connection until the coordinator acks them.
//!
//! Mesh peers (see [`crate::peer`]) talk to the core through the same command channel:
//! a peer stealing work takes attempts from the local queue ([`Command::TakeQueued`],
//! then [`Command::Lent`]); attempts stolen from a peer arrive as [`Command::Stolen`].
//! The core publishes its load ([`LocalLoad`]) for the peer links to gossip.
//!
//! **Draining** ([`Command::Drain`]): the worker is being stopped. It says so to the
//! coordinator (`WorkerMsg::Draining`, again first on every later session), hands back
//! every attempt it accepted but has not started (reported `Failed` with
//! `FailureKind::Drained`, through the usual report path: re-sent until acked), and
//! hands back likewise any `Run` or stolen attempt that still arrives. Running attempts
//! go on to their end. [`Command::CutShort`] (the drain timeout) kills the ones still
//! running and reports them `Drained` too. [`Core::drained`] tells when the worker may
//! leave: the coordinator acknowledged the drain on the current session (so no `Run` is
//! on its way), nothing runs or waits, and every report is acknowledged.
//!
//! **Remote drain** (`CoordinatorMsg::Drain`, protocol 7: an operator's request): the
//! same refusal of new work — nothing starts, what waits and what still arrives is handed
//! back, no steals — said with `WorkerMsg::Drain { on: true }` (again first on every
//! later session), but the worker never leaves for it and no drain timeout applies:
//! running attempts end as they end. `Drain { on: false }` takes work again and says so.
//! A stopping worker ([`Command::Drain`]) ignores a resume, and says `Draining` instead.
//! The remote drain lives in memory only: a restarted worker starts undrained.
//!
//! **Live output** (see [`crate::output`]): each running attempt of an agent that produces
//! output has an [`OutputLog`]. `Watch` marks it watched on the current session (and
//! replays its tail), a new session or a lost one unwatches every attempt, and the
//! attempt's report carries the log's tail.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use swarm_proto::worker::{
    AttemptRef, CoordinatorMsg, ExecutionId, FailureKind, Outcome, TaskAssignment, TaskReport,
    WorkerMsg,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::agents::Agent;
use crate::cancel::{cancel_pair, CancelHandle};
use crate::executor::Executor;
use crate::output::{
    OutputBudget, OutputLog, OutputSink, OutputTap, DEFAULT_LOG_TAIL_BYTES, MAX_LOG_TAIL_BYTES,
};
use crate::peer::Ctl as PeerCtl;
use crate::retrieve::Retriever;

/// How long an attempt waits for its patterns before running without them.
const RETRIEVE_TIMEOUT: Duration = Duration::from_secs(2);
use crate::WorkerStats;

/// Largest output a report may carry whatever the coordinator allows: a report must fit
/// in one frame, with room to spare for the rest of the report (less the log tail's
/// room, see [`Core::output_limit`]).
const FRAME_OUTPUT_LIMIT: u64 = (swarm_transport::DEFAULT_MAX_FRAME - 64 * 1024) as u64;

/// Smallest heartbeat interval honoured, whatever the coordinator asks for.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// The message of an attempt handed back unstarted by a draining worker.
const HANDED_BACK: &str = "handed back unstarted: the worker is draining";
/// The message of an attempt killed at the drain timeout.
const CUT_SHORT: &str = "cut short by the drain timeout: the worker is stopping";

/// Messages from the connection loop to the core.
pub(crate) enum Command {
    /// A session is up: write frames to `sink`; heartbeat and output limit from Welcome.
    Connected {
        sink: mpsc::UnboundedSender<WorkerMsg>,
        /// The session's output bytes queued on `sink` and not yet written (the
        /// connection's writer gives them back as it writes).
        output_budget: Arc<OutputBudget>,
        heartbeat: Duration,
        max_output_bytes: u64,
        /// The leader's term, from `Welcome`.
        term: u64,
    },
    /// The session is gone; hold reports until the next one.
    Disconnected,
    /// A `Run`, `Cancel` or `Ack` from the coordinator.
    Coordinator(CoordinatorMsg),
    /// The attempts to list in the next `Hello`.
    Snapshot(oneshot::Sender<Vec<AttemptRef>>),
    /// Kill every attempt, then reply.
    Shutdown(oneshot::Sender<()>),
    /// Start draining (see the module docs); idempotent.
    Drain,
    /// The drain timeout passed: kill the attempts still running and report them
    /// drained. Only while draining.
    CutShort,
    /// A peer steals: take up to `max` attempts from the local queue (newest first) and
    /// hold them as lent (still listed as held) until [`Command::Lent`] says whether the
    /// hand-over went out. Never takes a running attempt.
    TakeQueued {
        max: usize,
        reply: oneshot::Sender<Vec<TaskAssignment>>,
    },
    /// The outcome of a hand-over to peer `to`: `delivered` (the `Given` frame was
    /// written) forgets the attempts; otherwise they go back into the local queue.
    Lent {
        to: String,
        attempts: Vec<AttemptRef>,
        delivered: bool,
    },
    /// Attempts taken over from peer `from`: each is announced to the coordinator with
    /// `Stole`, then run exactly like a `Run`. Replies once they are accepted (and the
    /// new load is published).
    Stolen {
        from: String,
        assignments: Vec<TaskAssignment>,
        reply: oneshot::Sender<()>,
    },
    /// The link to mesh peer `peer` was lost: tell the coordinator.
    PeerLost { peer: String },
}

/// What the core reports to the mesh peer links: its load, and whether it can tell the
/// coordinator about a steal right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LocalLoad {
    /// Attempts running.
    pub(crate) running: u32,
    /// Attempts waiting for a slot (not counting ones being handed to a peer).
    pub(crate) queued: u32,
    /// Of those, the ones a mesh peer may take (their swarm is one of this worker's mesh
    /// swarms): what peers are told.
    pub(crate) stealable: u32,
    /// Slots.
    pub(crate) slots: u32,
    /// Whether a coordinator session is up.
    pub(crate) connected: bool,
    /// Whether the worker takes no new work, from peers neither: it is draining, or an
    /// operator drained it.
    pub(crate) draining: bool,
}

/// The core's share of [`WorkerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    started: u64,
    finished: u64,
    acked: u64,
    running: usize,
    queued: usize,
    unacked: usize,
    steals_in: u64,
    steals_out: u64,
    handed_back: u64,
    stale_runs: u64,
    output_dropped: u64,
}

struct Running {
    cancel: CancelHandle,
    /// The attempt's agent, for its `max_concurrency`.
    agent: String,
    /// Its output; `None` for an agent that produces none (the built-ins).
    log: Option<Arc<OutputLog>>,
}

/// What happened to an execution on this worker, for an [`ExecutionJournal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionEvent {
    /// The worker holds it (a `Run` or a steal accepted): from now it is listed in
    /// heartbeats until it ends or is let go.
    Held(ExecutionId),
    /// Its agent started.
    Started(ExecutionId),
    /// Its agent ended (the report is made; the worker no longer lists it as running).
    Ended(ExecutionId),
    /// Let go without running here: handed to a mesh peer, cancelled or handed back
    /// before it started.
    Released(ExecutionId),
}

/// Called for every [`ExecutionEvent`] on the worker's core task (keep it quick): what an
/// embedding program (the simulation) uses to check that no execution runs twice.
#[derive(Clone)]
pub struct ExecutionJournal(pub std::sync::Arc<dyn Fn(ExecutionEvent) + Send + Sync>);

impl std::fmt::Debug for ExecutionJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecutionJournal")
    }
}

pub(crate) struct Core {
    executor: Executor,
    slots: usize,
    running: HashMap<AttemptRef, Running>,
    queued: VecDeque<TaskAssignment>,
    queued_set: HashSet<AttemptRef>,
    unacked: HashMap<AttemptRef, TaskReport>,
    tasks: JoinSet<TaskReport>,
    task_attempts: HashMap<tokio::task::Id, (AttemptRef, u64)>,
    sink: Option<mpsc::UnboundedSender<WorkerMsg>>,
    heartbeat: Option<Interval>,
    max_output_bytes: u64,
    stats: watch::Sender<WorkerStats>,
    counts: Counts,
    retriever: std::sync::Arc<Retriever>,
    /// Attempts taken from the queue for a peer, not yet known to be handed over.
    lending: HashMap<AttemptRef, TaskAssignment>,
    /// Mesh swarms this worker has peers in: only their queued attempts may be lent.
    mesh_swarms: HashSet<String>,
    /// Attempts stolen from peers that have not finished yet.
    stolen: HashSet<AttemptRef>,
    /// Stolen attempts the coordinator cancelled (a refused move): whatever they end
    /// with, they are reported cancelled.
    cancel_requested: HashSet<AttemptRef>,
    /// `Stole` and `PeerLost` messages waiting for a session (sent first on connect).
    pending: Vec<WorkerMsg>,
    load: watch::Sender<LocalLoad>,
    peer_ctl: Option<mpsc::UnboundedSender<PeerCtl>>,
    /// Draining: no attempt starts any more (see the module docs).
    draining: bool,
    /// Drained by an operator (`CoordinatorMsg::Drain`): no attempt starts, as while
    /// draining, but the worker stays.
    remote_drain: bool,
    /// The coordinator answered `Draining` with `DrainAck` on the current session.
    drain_acked: bool,
    /// Whether the drain is complete (see [`Core::drained`]).
    drained: watch::Sender<bool>,
    /// The newest leader term a `Welcome` named: a `Run` of an older term comes from a
    /// deposed leader (its `Start` may never commit) and is refused.
    fence_term: u64,
    journal: Option<ExecutionJournal>,
    /// The term of each execution held, while a journal is kept.
    held_terms: HashMap<AttemptRef, u64>,
    /// Where watched output goes on the current session.
    output: Option<OutputSink>,
    /// Output bytes dropped because a session's queue was full (all sessions).
    output_dropped: Arc<AtomicU64>,
    /// How much of each attempt's output is kept for its report.
    log_tail_bytes: usize,
}

static CLOCK: std::sync::OnceLock<fn() -> u64> = std::sync::OnceLock::new();

/// Replace the clock attempts are stamped with (`started_at_ms`, `finished_at_ms` in
/// reports), for the whole process and for good: a deterministic simulation installs its
/// simulated time here, as it does for the coordinator. Only the first call takes effect;
/// returns whether it was this one.
pub fn set_clock(clock: fn() -> u64) -> bool {
    CLOCK.set(clock).is_ok()
}

/// Milliseconds since the Unix epoch: the wall clock, or the one [`set_clock`] installed.
pub(crate) fn now_ms() -> u64 {
    if let Some(clock) = CLOCK.get() {
        return clock();
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

async fn tick(hb: &mut Option<Interval>) {
    match hb {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl Core {
    pub(crate) fn new(executor: Executor, slots: u32, stats: watch::Sender<WorkerStats>) -> Self {
        Core {
            executor,
            slots: usize::try_from(slots.max(1)).unwrap_or(usize::MAX),
            running: HashMap::new(),
            queued: VecDeque::new(),
            queued_set: HashSet::new(),
            unacked: HashMap::new(),
            tasks: JoinSet::new(),
            task_attempts: HashMap::new(),
            sink: None,
            heartbeat: None,
            max_output_bytes: 0,
            stats,
            counts: Counts::default(),
            retriever: std::sync::Arc::new(Retriever::default()),
            lending: HashMap::new(),
            mesh_swarms: HashSet::new(),
            stolen: HashSet::new(),
            cancel_requested: HashSet::new(),
            pending: Vec::new(),
            load: watch::Sender::new(LocalLoad {
                slots,
                ..LocalLoad::default()
            }),
            peer_ctl: None,
            draining: false,
            remote_drain: false,
            drain_acked: false,
            drained: watch::Sender::new(false),
            fence_term: 0,
            journal: None,
            held_terms: HashMap::new(),
            output: None,
            output_dropped: Arc::new(AtomicU64::new(0)),
            log_tail_bytes: DEFAULT_LOG_TAIL_BYTES,
        }
    }

    /// Whether attempts may start here: neither draining nor drained by an operator.
    fn takes_work(&self) -> bool {
        !self.draining && !self.remote_drain
    }

    /// Keep the last `bytes` of each attempt's output (at most [`MAX_LOG_TAIL_BYTES`]).
    pub(crate) fn set_log_tail_bytes(&mut self, bytes: usize) {
        self.log_tail_bytes = bytes.min(MAX_LOG_TAIL_BYTES);
    }

    /// The largest result an attempt may return: the coordinator's limit, and what fits
    /// in a report's frame beside the log tail (each byte of which may cost up to three
    /// when encoded, in pieces of one byte alternating between streams).
    fn output_limit(&self) -> u64 {
        let tail_room = 3 * self.log_tail_bytes as u64 + 64;
        self.max_output_bytes
            .min(FRAME_OUTPUT_LIMIT.saturating_sub(tail_room))
    }

    /// Stops sending the output of every running attempt.
    fn unwatch_all(&self) {
        for log in self.running.values().filter_map(|r| r.log.as_ref()) {
            log.unwatch();
        }
    }

    /// The log tail of `attempt` so far, ending its log: for a report made without the
    /// attempt's own (its task was aborted).
    fn take_tail(&self, attempt: &AttemptRef) -> swarm_proto::worker::LogTail {
        self.running
            .get(attempt)
            .and_then(|r| r.log.as_ref())
            .map(|l| l.finish())
            .unwrap_or_default()
    }

    pub(crate) fn set_journal(&mut self, journal: Option<ExecutionJournal>) {
        self.journal = journal;
    }

    /// Tell the journal, if any, what happened to the execution of `attempt`: `Started`
    /// keeps it held, `Ended` and `Released` let it go.
    fn note(&mut self, attempt: AttemptRef, event: fn(ExecutionId) -> ExecutionEvent) {
        let Some(journal) = &self.journal else {
            return;
        };
        let probe = event(ExecutionId { attempt, term: 0 });
        let term = match probe {
            ExecutionEvent::Held(_) | ExecutionEvent::Started(_) => {
                self.held_terms.get(&attempt).copied()
            }
            ExecutionEvent::Ended(_) | ExecutionEvent::Released(_) => {
                self.held_terms.remove(&attempt)
            }
        };
        if let Some(term) = term {
            (journal.0)(event(ExecutionId { attempt, term }));
        }
    }

    fn note_held(&mut self, task: &TaskAssignment) {
        if self.journal.is_some() {
            self.held_terms.insert(task.attempt, task.term);
            self.note(task.attempt, ExecutionEvent::Held);
        }
    }

    /// A live view of whether the drain is complete: draining, acknowledged by the
    /// coordinator on the current session, no attempt running, queued or being lent, and
    /// no report unacknowledged. Never true before [`Command::Drain`].
    pub(crate) fn drained(&self) -> watch::Receiver<bool> {
        self.drained.subscribe()
    }

    /// A live view of the load, for the mesh peer links.
    pub(crate) fn load(&self) -> watch::Receiver<LocalLoad> {
        self.load.subscribe()
    }

    /// Where `Peers` messages from the coordinator go; without one they are ignored.
    pub(crate) fn set_peer_ctl(&mut self, ctl: mpsc::UnboundedSender<PeerCtl>) {
        self.peer_ctl = Some(ctl);
    }

    /// Runs until a `Shutdown` command or until every command sender is gone.
    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut cmds = Vec::with_capacity(256);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut cmds, 256) => {
                    if n == 0 {
                        break;
                    }
                    for cmd in cmds.drain(..) {
                        match cmd {
                            Command::Shutdown(done) => {
                                self.shutdown().await;
                                let _ = done.send(());
                                return;
                            }
                            Command::CutShort => self.cut_short().await,
                            cmd => self.handle(cmd),
                        }
                    }
                }
                Some(res) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.joined(res);
                }
                _ = tick(&mut self.heartbeat) => {
                    let running = self.running_list();
                    self.send(WorkerMsg::Heartbeat { running });
                }
            }
            self.publish();
        }
        self.shutdown().await;
    }

    /// An attempt's task ended: report what it returned (or that it failed).
    fn joined(&mut self, res: Result<(tokio::task::Id, TaskReport), tokio::task::JoinError>) {
        let report = match res {
            Ok((id, report)) => {
                self.task_attempts.remove(&id);
                report
            }
            Err(e) => match self.task_attempts.remove(&e.id()) {
                Some((attempt, started_at_ms)) => {
                    tracing::error!(?attempt, "attempt task failed: {e}");
                    TaskReport {
                        attempt,
                        outcome: Outcome::Failed {
                            kind: FailureKind::Exit,
                            message: format!("worker internal error: {e}"),
                        },
                        started_at_ms,
                        finished_at_ms: now_ms(),
                        patterns_used: Vec::new(),
                        log: self.take_tail(&attempt),
                        usage: None,
                    }
                }
                None => return,
            },
        };
        self.finished(report);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connected {
                sink,
                output_budget,
                heartbeat,
                max_output_bytes,
                term,
            } => {
                if term > self.fence_term {
                    self.fence_term = term;
                }
                // The new coordinator watches what it wants, afresh.
                self.unwatch_all();
                self.output = Some(OutputSink {
                    tx: sink.clone(),
                    budget: output_budget,
                    dropped: self.output_dropped.clone(),
                });
                self.retriever.set_sink(Some(sink.clone()));
                self.sink = Some(sink);
                self.drain_acked = false;
                self.max_output_bytes = max_output_bytes;
                let period = heartbeat.max(MIN_HEARTBEAT);
                let mut interval = tokio::time::interval_at(Instant::now() + period, period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                self.heartbeat = Some(interval);
                // A new session starts with a clean slate on the coordinator: say at once
                // that nothing new may come here (being stopped wins over an operator's
                // drain).
                if self.draining {
                    self.send(WorkerMsg::Draining);
                } else if self.remote_drain {
                    self.send(WorkerMsg::Drain { on: true });
                }
                // Steals and lost peers first: a `Stole` must reach the coordinator
                // before the report of the attempt it announces.
                let held = std::mem::take(&mut self.pending);
                if !held.is_empty() {
                    tracing::info!(count = held.len(), "sending held mesh messages");
                }
                for m in held {
                    self.send_or_hold(m);
                }
                let mut reports: Vec<&TaskReport> = self.unacked.values().collect();
                reports.sort_by_key(|r| r.attempt);
                if !reports.is_empty() {
                    tracing::info!(count = reports.len(), "re-sending unacked reports");
                }
                let msgs: Vec<WorkerMsg> = reports
                    .into_iter()
                    .map(|r| WorkerMsg::Finished(r.clone()))
                    .collect();
                for m in msgs {
                    self.send(m);
                }
            }
            Command::Disconnected => {
                self.unwatch_all();
                self.output = None;
                self.retriever.set_sink(None);
                self.sink = None;
                self.drain_acked = false;
                self.heartbeat = None;
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(self.held_list());
            }
            Command::Coordinator(msg) => self.coordinator(msg),
            Command::Drain => self.drain(),
            // Handled by the run loop (they await).
            Command::Shutdown(_) | Command::CutShort => {}
            Command::TakeQueued { max, reply } => self.take_queued(max, reply),
            Command::Lent {
                to,
                attempts,
                delivered,
            } => self.lent(&to, attempts, delivered),
            Command::Stolen {
                from,
                assignments,
                reply,
            } => {
                self.stolen_in(&from, assignments);
                // Publish before replying: the mesh decides its next steal on this load.
                self.publish();
                let _ = reply.send(());
            }
            Command::PeerLost { peer } => {
                let dup = self
                    .pending
                    .iter()
                    .any(|m| matches!(m, WorkerMsg::PeerLost { peer: p } if *p == peer));
                if !dup {
                    self.send_or_hold(WorkerMsg::PeerLost { peer });
                }
            }
        }
    }

    /// Whether the attempt is here in any form: running, queued, being lent, or finished
    /// and not acked.
    fn holds(&self, attempt: &AttemptRef) -> bool {
        self.running.contains_key(attempt)
            || self.queued_set.contains(attempt)
            || self.lending.contains_key(attempt)
            || self.unacked.contains_key(attempt)
    }

    fn take_queued(&mut self, max: usize, reply: oneshot::Sender<Vec<TaskAssignment>>) {
        // Newest first, and only attempts of this worker's mesh swarms: a queued attempt
        // of a star or hierarchy swarm stays where the coordinator put it. An attempt this
        // worker stole stays too: lent on before the coordinator recorded the first move,
        // the second `Stole` would name a holder the coordinator does not know yet, be
        // refused, and the attempt given up and run again (seen in the mesh e2e test: 1 -> 2 -> 3
        // within 3 ms).
        let mut out = Vec::with_capacity(max.min(self.queued.len()));
        let mut i = self.queued.len();
        while out.len() < max && i > 0 {
            i -= 1;
            let q = &self.queued[i];
            if !self.mesh_swarms.contains(&q.swarm) || self.stolen.contains(&q.attempt) {
                continue;
            }
            let Some(task) = self.queued.remove(i) else {
                break;
            };
            self.queued_set.remove(&task.attempt);
            self.lending.insert(task.attempt, task.clone());
            out.push(task);
        }
        // Publish before replying, so the load gossiped next no longer counts them.
        self.publish();
        if let Err(out) = reply.send(out) {
            // The asking link is gone: nothing was handed over.
            let attempts = out.iter().map(|t| t.attempt).collect();
            self.lent("(link gone)", attempts, false);
        }
    }

    fn lent(&mut self, to: &str, attempts: Vec<AttemptRef>, delivered: bool) {
        if delivered {
            let mut n = 0u64;
            for a in &attempts {
                if self.lending.remove(a).is_some() {
                    n += 1;
                    self.note(*a, ExecutionEvent::Released);
                }
            }
            self.counts.steals_out += n;
            if n > 0 {
                tracing::info!(peer = %to, count = n, "attempts handed over to a peer");
            }
            return;
        }
        // Taken newest first: put them back oldest first, restoring the queue order.
        let mut back = 0usize;
        for a in attempts.iter().rev() {
            if let Some(task) = self.lending.remove(a) {
                if !self.takes_work() {
                    // Not handed over, and not to be run here: back to the coordinator.
                    self.hand_back(task.attempt, HANDED_BACK);
                    continue;
                }
                self.queued_set.insert(task.attempt);
                self.queued.push_back(task);
                back += 1;
            }
        }
        if back > 0 {
            tracing::info!(peer = %to, count = back, "hand-over to a peer failed; attempts requeued");
        }
        self.fill_slots();
    }

    fn stolen_in(&mut self, from: &str, assignments: Vec<TaskAssignment>) {
        for task in assignments {
            let attempt = task.attempt;
            if self.holds(&attempt) {
                tracing::warn!(?attempt, peer = %from, "peer gave an attempt this worker already holds; ignored");
                continue;
            }
            tracing::debug!(?attempt, peer = %from, "took attempt over from a peer");
            self.counts.steals_in += 1;
            self.stolen.insert(attempt);
            self.send_or_hold(WorkerMsg::Stole {
                attempt,
                from: from.to_owned(),
            });
            self.accept_run(task);
        }
    }

    /// Whether `agent` already runs as many attempts as its `max_concurrency` allows.
    fn at_agent_limit(&self, agent: &str) -> bool {
        let Some(max) = self
            .executor
            .agents()
            .get(agent)
            .and_then(|a| a.max_concurrency())
        else {
            return false;
        };
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        self.running.values().filter(|r| r.agent == agent).count() >= max
    }

    /// Starts queued attempts, in queue order, while slots are free (none while
    /// draining or drained), skipping those whose agent is at its `max_concurrency`: they
    /// wait without holding up the attempts of other agents behind them.
    fn fill_slots(&mut self) {
        let mut i = 0;
        while self.takes_work() && self.running.len() < self.slots && i < self.queued.len() {
            if self.at_agent_limit(&self.queued[i].agent) {
                i += 1;
                continue;
            }
            let Some(next) = self.queued.remove(i) else {
                break;
            };
            self.queued_set.remove(&next.attempt);
            self.start(next);
        }
    }

    /// Runs `task` now if a slot is free and its agent is below its `max_concurrency`,
    /// else queues it; hands it back while draining or drained.
    fn accept_run(&mut self, task: TaskAssignment) {
        self.note_held(&task);
        if !self.takes_work() {
            tracing::debug!(attempt = ?task.attempt, "draining: attempt handed back unstarted");
            self.hand_back(task.attempt, HANDED_BACK);
        } else if self.running.len() < self.slots && !self.at_agent_limit(&task.agent) {
            self.start(task);
        } else {
            tracing::debug!(
                attempt = ?task.attempt,
                agent = %task.agent,
                queued = self.queued.len() + 1,
                "all slots busy, or the agent at its max_concurrency; queueing attempt"
            );
            self.queued_set.insert(task.attempt);
            self.queued.push_back(task);
        }
    }

    fn coordinator(&mut self, msg: CoordinatorMsg) {
        match msg {
            CoordinatorMsg::Run(task) => {
                let attempt = task.attempt;
                if task.term < self.fence_term {
                    // Sent by a leader deposed since: its `Start` may never commit, and
                    // the current leader may run the attempt elsewhere. The current
                    // leader learns from this worker's heartbeats that it does not hold
                    // it.
                    tracing::warn!(
                        ?attempt,
                        term = task.term,
                        newest = self.fence_term,
                        "Run from a deposed leader refused"
                    );
                    self.counts.stale_runs += 1;
                } else if self.running.contains_key(&attempt)
                    || self.queued_set.contains(&attempt)
                    || self.lending.contains_key(&attempt)
                {
                    tracing::debug!(?attempt, "duplicate Run ignored: attempt already running");
                } else if let Some(report) = self.unacked.get(&attempt) {
                    tracing::debug!(
                        ?attempt,
                        "duplicate Run: attempt already finished, re-sending report"
                    );
                    let m = WorkerMsg::Finished(report.clone());
                    self.send(m);
                } else {
                    self.accept_run(task);
                }
            }
            CoordinatorMsg::Cancel(attempt) => {
                if let Some(r) = self.running.get(&attempt) {
                    tracing::debug!(?attempt, "cancelling attempt");
                    r.cancel.cancel();
                    if self.stolen.contains(&attempt) {
                        self.cancel_requested.insert(attempt);
                    }
                } else if self.queued_set.remove(&attempt)
                    || self.lending.remove(&attempt).is_some()
                {
                    tracing::debug!(?attempt, "cancelling queued attempt");
                    self.queued.retain(|t| t.attempt != attempt);
                    let now = now_ms();
                    self.finished(TaskReport {
                        attempt,
                        outcome: Outcome::Failed {
                            kind: FailureKind::Cancelled,
                            message: "cancelled before it started".into(),
                        },
                        started_at_ms: now,
                        finished_at_ms: now,
                        patterns_used: Vec::new(),
                        log: Default::default(),
                        usage: None,
                    });
                } else {
                    tracing::debug!(?attempt, "Cancel for an attempt not running here; ignored");
                }
            }
            CoordinatorMsg::Ack(attempt) => {
                if self.unacked.remove(&attempt).is_some() {
                    self.counts.acked += 1;
                } else {
                    tracing::debug!(?attempt, "Ack for an unknown report; ignored");
                }
            }
            CoordinatorMsg::Retrieved { request_id, result } => {
                self.retriever.complete(request_id, result);
            }
            CoordinatorMsg::Peers { swarm, peers } => {
                // Queued attempts of a mesh swarm become lendable (and are gossiped as
                // such) while the swarm lists peers for this worker.
                if peers.is_empty() {
                    self.mesh_swarms.remove(&swarm);
                } else {
                    self.mesh_swarms.insert(swarm.clone());
                }
                self.publish();
                match &self.peer_ctl {
                    Some(ctl) => {
                        let _ = ctl.send(PeerCtl::Peers { swarm, peers });
                    }
                    None => tracing::warn!(
                        %swarm,
                        "coordinator sent mesh peers, but this worker has no peer listener; ignored"
                    ),
                }
            }
            CoordinatorMsg::DrainAck => {
                if !self.takes_work() {
                    tracing::info!("the coordinator acknowledged the drain: no new work comes");
                    self.drain_acked = true;
                } else {
                    tracing::warn!("DrainAck while not draining; ignored");
                }
            }
            // Handled by the connection loop, which never passes them on.
            CoordinatorMsg::Parent { .. } | CoordinatorMsg::Revoked { .. } => {}
            CoordinatorMsg::Watch { attempt, on, from } => self.watch(attempt, on, from),
            CoordinatorMsg::Drain { on } => self.remote_drain(on),
            CoordinatorMsg::Welcome { .. }
            | CoordinatorMsg::Rejected { .. }
            | CoordinatorMsg::NotLeader { .. }
            | CoordinatorMsg::Prove { .. } => {
                tracing::warn!("unexpected session message after Welcome; ignored");
            }
        }
    }

    /// `Watch`: start (replaying the tail from `from`) or stop sending the output of a
    /// running attempt on the current session.
    fn watch(&mut self, attempt: AttemptRef, on: bool, from: u64) {
        let Some(running) = self.running.get(&attempt) else {
            tracing::debug!(
                ?attempt,
                on,
                "Watch for an attempt not running here; ignored"
            );
            return;
        };
        let Some(log) = &running.log else {
            tracing::debug!(
                ?attempt,
                on,
                "Watch for an attempt whose agent has no output; ignored"
            );
            return;
        };
        match (on, &self.output) {
            (true, Some(sink)) => {
                tracing::debug!(?attempt, from, "attempt watched");
                log.watch(sink.clone(), from);
            }
            (true, None) => {}
            (false, _) => {
                tracing::debug!(?attempt, "attempt no longer watched");
                log.unwatch();
            }
        }
    }

    fn start(&mut self, task: TaskAssignment) {
        let attempt = task.attempt;
        let (cancel, token) = cancel_pair();
        let executor = self.executor.clone();
        let max = self.output_limit();
        let started_at_ms = now_ms();
        let agent = task.agent.clone();
        let log = match self.executor.agents().get(&task.agent) {
            Some(Agent::Exec(_) | Agent::Http(_) | Agent::Llm(_)) => {
                Some(Arc::new(OutputLog::new(attempt, self.log_tail_bytes)))
            }
            Some(Agent::Echo | Agent::Sleep) | None => None,
        };
        let tap = log.clone().map(OutputTap::to).unwrap_or_default();
        tracing::debug!(?attempt, agent = %task.agent, "starting attempt");
        let retriever = self.retriever.clone();
        let handle = self.tasks.spawn(async move {
            let patterns = if task.patterns > 0 {
                let query = String::from_utf8_lossy(&task.payload).into_owned();
                match retriever
                    .retrieve(query, task.patterns, RETRIEVE_TIMEOUT)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(?attempt, "running without patterns: retrieval failed: {e}");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            // A cancel that came while the patterns were being retrieved: do not start.
            let (outcome, usage) = if token.is_cancelled() {
                let outcome = Outcome::Failed {
                    kind: FailureKind::Cancelled,
                    message: "cancelled before it started".into(),
                };
                (outcome, None)
            } else {
                executor
                    .run_attempt(task, &patterns, max, token, tap.clone())
                    .await
            };
            TaskReport {
                attempt,
                outcome,
                started_at_ms,
                finished_at_ms: now_ms(),
                patterns_used: patterns.into_iter().map(|p| p.id).collect(),
                log: tap.finish(),
                usage,
            }
        });
        self.task_attempts
            .insert(handle.id(), (attempt, started_at_ms));
        self.running.insert(attempt, Running { cancel, agent, log });
        self.counts.started += 1;
        self.note(attempt, ExecutionEvent::Started);
    }

    /// Begin draining: tell the coordinator, hand back everything queued.
    fn drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        // The `Draining` below is acknowledged afresh, even after an operator's drain was.
        self.drain_acked = false;
        tracing::info!(
            running = self.running.len(),
            queued = self.queued.len(),
            unacked = self.unacked.len(),
            "drain: queued attempts handed back, running ones go on"
        );
        self.send(WorkerMsg::Draining);
        self.hand_back_queued();
    }

    /// An operator's drain (`on`) or resume, sent by the coordinator. Stated back to it
    /// either way (`Drain { on }`), so the two agree even when the request repeats. A
    /// worker being stopped ignores a resume and says `Draining` again, to be
    /// acknowledged afresh behind any `Run` the coordinator sent meanwhile.
    fn remote_drain(&mut self, on: bool) {
        if self.draining {
            self.remote_drain = on;
            if !on {
                tracing::warn!("resume ignored: the worker is being stopped");
                self.drain_acked = false;
                self.send(WorkerMsg::Draining);
            }
            return;
        }
        let was = std::mem::replace(&mut self.remote_drain, on);
        if on {
            if !was {
                tracing::info!(
                    running = self.running.len(),
                    queued = self.queued.len(),
                    "drained by the operator: queued attempts handed back, running ones go on; the worker stays"
                );
            }
            self.send(WorkerMsg::Drain { on: true });
            self.hand_back_queued();
        } else {
            if was {
                tracing::info!("resumed by the operator: taking work again");
            }
            self.drain_acked = false;
            self.send(WorkerMsg::Drain { on: false });
            self.fill_slots();
        }
    }

    /// Hand every attempt waiting for a slot back to the coordinator.
    fn hand_back_queued(&mut self) {
        let queued: Vec<TaskAssignment> = self.queued.drain(..).collect();
        self.queued_set.clear();
        for task in queued {
            self.hand_back(task.attempt, HANDED_BACK);
        }
    }

    /// Report `attempt`, never started here, drained: it runs again elsewhere without
    /// counting against the task's attempts.
    fn hand_back(&mut self, attempt: AttemptRef, message: &str) {
        let now = now_ms();
        self.counts.handed_back += 1;
        self.finished(TaskReport {
            attempt,
            outcome: Outcome::Failed {
                kind: FailureKind::Drained,
                message: message.to_owned(),
            },
            started_at_ms: now,
            finished_at_ms: now,
            patterns_used: Vec::new(),
            log: Default::default(),
            usage: None,
        });
    }

    /// The drain timeout passed: kill what still runs (process groups included) and hand
    /// it back. Attempts that ended meanwhile are reported as they ended.
    async fn cut_short(&mut self) {
        if !self.draining {
            return;
        }
        while let Some(res) = self.tasks.try_join_next_with_id() {
            self.joined(res);
        }
        if self.running.is_empty() {
            return;
        }
        let mut cut: Vec<AttemptRef> = self.running.keys().copied().collect();
        cut.sort();
        tracing::warn!(
            running = cut.len(),
            "drain timeout: killing the attempts still running and handing them back"
        );
        let started: HashMap<AttemptRef, u64> = self.task_attempts.values().copied().collect();
        // Aborting drops each executor future, whose guard kills the process group.
        self.tasks.shutdown().await;
        self.task_attempts.clear();
        let now = now_ms();
        for attempt in cut {
            self.counts.handed_back += 1;
            let log = self.take_tail(&attempt);
            self.finished(TaskReport {
                attempt,
                outcome: Outcome::Failed {
                    kind: FailureKind::Drained,
                    message: CUT_SHORT.into(),
                },
                started_at_ms: started.get(&attempt).copied().unwrap_or(now),
                finished_at_ms: now,
                patterns_used: Vec::new(),
                log,
                usage: None,
            });
        }
    }

    fn finished(&mut self, mut report: TaskReport) {
        let attempt = report.attempt;
        if self.running.remove(&attempt).is_some() {
            self.note(attempt, ExecutionEvent::Ended);
        } else {
            self.note(attempt, ExecutionEvent::Released);
        }
        self.stolen.remove(&attempt);
        if self.cancel_requested.remove(&attempt)
            && !matches!(
                report.outcome,
                Outcome::Failed {
                    kind: FailureKind::Cancelled,
                    ..
                }
            )
        {
            // The coordinator refused this steal: the result is not this worker's to give.
            report.outcome = Outcome::Failed {
                kind: FailureKind::Cancelled,
                message: "cancelled by the coordinator".into(),
            };
        }
        match &report.outcome {
            Outcome::Succeeded { output } => {
                tracing::debug!(?attempt, bytes = output.len(), "attempt succeeded")
            }
            Outcome::Failed { kind, message } => {
                tracing::debug!(?attempt, kind = kind.as_str(), %message, "attempt failed")
            }
        }
        self.unacked.insert(attempt, report.clone());
        self.send(WorkerMsg::Finished(report));
        self.counts.finished += 1;
        self.fill_slots();
    }

    /// Attempts this worker holds: running ones, then queued ones (accepted, waiting for
    /// a slot, and certain to run unless cancelled).
    /// Attempts running or queued locally for a slot (what heartbeats report).
    fn running_list(&self) -> Vec<AttemptRef> {
        let mut v: Vec<AttemptRef> = self.running.keys().copied().collect();
        v.sort();
        v.extend(self.queued.iter().map(|t| t.attempt));
        // Being handed to a peer: still ours until the hand-over went out.
        let mut lending: Vec<AttemptRef> = self.lending.keys().copied().collect();
        lending.sort();
        v.extend(lending);
        v
    }

    /// Every attempt this worker still holds (what `Hello` reports): running, queued
    /// locally, or finished with the report not yet acknowledged. The coordinator treats
    /// an attempt it placed here that is missing from this list as lost, so unacked ones
    /// must be in it.
    fn held_list(&self) -> Vec<AttemptRef> {
        let mut v = self.running_list();
        let mut done: Vec<AttemptRef> = self.unacked.keys().copied().collect();
        done.sort();
        v.extend(done);
        v
    }

    fn send(&mut self, msg: WorkerMsg) {
        let _ = self.try_send(msg);
    }

    /// Sends `msg` if a session is up; otherwise hands it back.
    fn try_send(&mut self, msg: WorkerMsg) -> Option<WorkerMsg> {
        let Some(sink) = &self.sink else {
            return Some(msg);
        };
        match sink.send(msg) {
            Ok(()) => None,
            Err(e) => {
                // The writer is gone: the connection is going down; the connection loop
                // will say so. Reports stay in `unacked`.
                self.sink = None;
                self.output = None;
                self.heartbeat = None;
                Some(e.0)
            }
        }
    }

    /// Sends `msg`, or keeps it for the next session.
    fn send_or_hold(&mut self, msg: WorkerMsg) {
        if let Some(msg) = self.try_send(msg) {
            self.pending.push(msg);
        }
    }

    /// Publishes the counters and sizes as one consistent snapshot.
    fn publish(&self) {
        let c = Counts {
            running: self.running.len(),
            queued: self.queued.len(),
            unacked: self.unacked.len(),
            output_dropped: self.output_dropped.load(Ordering::Relaxed),
            ..self.counts
        };
        let drained = self.draining
            && self.drain_acked
            && self.sink.is_some()
            && self.running.is_empty()
            && self.queued.is_empty()
            && self.lending.is_empty()
            && self.unacked.is_empty();
        self.drained
            .send_if_modified(|d| std::mem::replace(d, drained) != drained);
        let stealable = self
            .queued
            .iter()
            .filter(|t| self.mesh_swarms.contains(&t.swarm))
            .count();
        let load = LocalLoad {
            running: u32::try_from(c.running).unwrap_or(u32::MAX),
            queued: u32::try_from(c.queued).unwrap_or(u32::MAX),
            stealable: u32::try_from(stealable).unwrap_or(u32::MAX),
            slots: u32::try_from(self.slots).unwrap_or(u32::MAX),
            connected: self.sink.is_some(),
            draining: !self.takes_work(),
        };
        self.load
            .send_if_modified(|l| std::mem::replace(l, load) != load);
        self.stats.send_if_modified(|s| {
            let old = Counts {
                started: s.started,
                finished: s.finished,
                acked: s.acked,
                running: s.running,
                queued: s.queued,
                unacked: s.unacked,
                steals_in: s.steals_in,
                steals_out: s.steals_out,
                handed_back: s.handed_back,
                stale_runs: s.stale_runs_refused,
                output_dropped: s.output_dropped_bytes,
            };
            let was_draining = std::mem::replace(&mut s.draining, self.draining);
            let was_remote = std::mem::replace(&mut s.remote_drain, self.remote_drain);
            s.started = c.started;
            s.finished = c.finished;
            s.acked = c.acked;
            s.running = c.running;
            s.queued = c.queued;
            s.unacked = c.unacked;
            s.steals_in = c.steals_in;
            s.steals_out = c.steals_out;
            s.handed_back = c.handed_back;
            s.stale_runs_refused = c.stale_runs;
            s.output_dropped_bytes = c.output_dropped;
            old != c || was_draining != self.draining || was_remote != self.remote_drain
        });
    }

    async fn shutdown(&mut self) {
        if !self.running.is_empty() {
            tracing::info!(running = self.running.len(), "killing running attempts");
        }
        // Aborting drops each executor future, whose guard kills the process group.
        self.tasks.shutdown().await;
        self.running.clear();
        self.queued.clear();
        self.queued_set.clear();
        self.lending.clear();
        self.stolen.clear();
        self.cancel_requested.clear();
        self.sink = None;
        self.output = None;
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::Agents;

    const LIMIT: Duration = Duration::from_secs(20);

    struct Harness {
        tx: mpsc::UnboundedSender<Command>,
        stats: watch::Receiver<WorkerStats>,
        load: watch::Receiver<LocalLoad>,
        drained: watch::Receiver<bool>,
    }

    fn start(slots: u32) -> Harness {
        start_with(slots, Agents::builtin())
    }

    fn start_with(slots: u32, agents: Agents) -> Harness {
        start_journaled(slots, agents, None)
    }

    fn start_journaled(slots: u32, agents: Agents, journal: Option<ExecutionJournal>) -> Harness {
        start_full(slots, agents, journal, DEFAULT_LOG_TAIL_BYTES)
    }

    /// A core keeping `tail` bytes of each attempt's output.
    fn start_tail(slots: u32, agents: Agents, tail: usize) -> Harness {
        start_full(slots, agents, None, tail)
    }

    fn start_full(
        slots: u32,
        agents: Agents,
        journal: Option<ExecutionJournal>,
        tail: usize,
    ) -> Harness {
        let stats = watch::Sender::new(WorkerStats::default());
        let mut core = Core::new(Executor::new(agents), slots, stats.clone());
        core.set_journal(journal);
        core.set_log_tail_bytes(tail);
        let load = core.load();
        let drained = core.drained();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(core.run(rx));
        // The tasks below run in mesh swarm "mesh", in which this worker has a peer.
        tx.send(Command::Coordinator(CoordinatorMsg::Peers {
            swarm: "mesh".into(),
            peers: vec![swarm_proto::worker::PeerInfo {
                worker_id: "w-peer".into(),
                addr: "127.0.0.1:1".into(),
            }],
        }))
        .unwrap();
        Harness {
            tx,
            stats: stats.subscribe(),
            load,
            drained,
        }
    }

    fn attempt(task_id: u64) -> AttemptRef {
        AttemptRef {
            task_id,
            attempt: 1,
        }
    }

    fn task(task_id: u64, agent: &str, payload: &str) -> TaskAssignment {
        TaskAssignment {
            attempt: attempt(task_id),
            agent: agent.into(),
            payload: payload.as_bytes().to_vec(),
            timeout_ms: 600_000,
            idempotency_key: None,
            patterns: 0,
            swarm: "mesh".into(),
            term: 1,
        }
    }

    impl Harness {
        fn send(&self, cmd: Command) {
            self.tx.send(cmd).unwrap();
        }

        fn run(&self, t: TaskAssignment) {
            self.send(Command::Coordinator(CoordinatorMsg::Run(t)));
        }

        fn connect(&self) -> mpsc::UnboundedReceiver<WorkerMsg> {
            self.connect_in(1)
        }

        /// A session whose `Welcome` named leader term `term`.
        fn connect_in(&self, term: u64) -> mpsc::UnboundedReceiver<WorkerMsg> {
            let (sink, rx) = mpsc::unbounded_channel();
            self.send(Command::Connected {
                sink,
                output_budget: Default::default(),
                heartbeat: Duration::from_secs(3600),
                max_output_bytes: 1 << 20,
                term,
            });
            rx
        }

        async fn held(&self) -> Vec<AttemptRef> {
            let (tx, rx) = oneshot::channel();
            self.send(Command::Snapshot(tx));
            rx.await.unwrap()
        }

        async fn take(&self, max: usize) -> Vec<AttemptRef> {
            let (tx, rx) = oneshot::channel();
            self.send(Command::TakeQueued { max, reply: tx });
            rx.await.unwrap().into_iter().map(|t| t.attempt).collect()
        }

        async fn wait(&mut self, what: &str, pred: impl Fn(&WorkerStats) -> bool) {
            tokio::time::timeout(LIMIT, self.stats.wait_for(|s| pred(s)))
                .await
                .unwrap_or_else(|_| panic!("timed out: {what}"))
                .unwrap();
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<WorkerMsg>) -> WorkerMsg {
        loop {
            match tokio::time::timeout(LIMIT, rx.recv()).await.unwrap() {
                Some(WorkerMsg::Heartbeat { .. }) => continue,
                Some(m) => return m,
                None => panic!("core stopped"),
            }
        }
    }

    /// A `Run` from a leader older than the newest that welcomed this worker is refused;
    /// one of the current term runs, and the journal sees each execution held, started
    /// and ended once, under its own id.
    #[tokio::test]
    async fn runs_of_a_deposed_leader_are_refused_and_executions_are_journaled() {
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        let journal = ExecutionJournal(std::sync::Arc::new(move |e| {
            sink.lock().unwrap().push(e);
        }));
        let mut h = start_journaled(2, Agents::builtin(), Some(journal));
        let mut rx = h.connect_in(5);
        let mut stale = task(1, "echo", "old");
        stale.term = 4;
        h.run(stale);
        let mut current = task(2, "echo", "new");
        current.term = 5;
        h.run(current.clone());
        // The duplicate of a held attempt is not a second execution.
        h.run(current);
        match next(&mut rx).await {
            WorkerMsg::Finished(r) => assert_eq!(r.attempt, attempt(2)),
            other => panic!("expected the current term's report, got {other:?}"),
        }
        h.wait("the stale run counted", |s| s.stale_runs_refused == 1)
            .await;
        assert_eq!(h.held().await, vec![attempt(2)], "unacked report held");
        let ex = ExecutionId {
            attempt: attempt(2),
            term: 5,
        };
        assert_eq!(
            *events.lock().unwrap(),
            vec![
                ExecutionEvent::Held(ex),
                ExecutionEvent::Started(ex),
                ExecutionEvent::Ended(ex)
            ]
        );
        assert_eq!(ex.to_string(), "2.1.5");
        // A later session of an older leader does not lower the fence.
        let _rx = h.connect_in(3);
        let mut old = task(3, "echo", "older");
        old.term = 4;
        h.run(old);
        h.wait("refused again", |s| s.stale_runs_refused == 2).await;
    }

    #[tokio::test]
    async fn only_attempts_of_a_mesh_swarm_are_lent() {
        let h = start(1);
        let _coord = h.connect();
        h.run(task(1, "sleep", "600000"));
        let mut star = task(2, "sleep", "1");
        star.swarm = "flat".into();
        h.run(star);
        h.run(task(3, "sleep", "1"));
        tokio::time::timeout(LIMIT, h.load.clone().wait_for(|l| l.queued == 2))
            .await
            .expect("queued")
            .unwrap();
        assert_eq!(
            h.load.borrow().stealable,
            1,
            "only the mesh attempt is offered"
        );
        // Asked for everything: only the mesh swarm's attempt goes.
        assert_eq!(h.take(5).await, vec![attempt(3)]);
        assert_eq!(h.load.borrow().queued, 1);
        // The swarm drops this worker's peers: nothing is lendable any more.
        h.send(Command::Lent {
            to: "w-x".into(),
            attempts: vec![attempt(3)],
            delivered: false,
        });
        h.send(Command::Coordinator(CoordinatorMsg::Peers {
            swarm: "mesh".into(),
            peers: vec![],
        }));
        assert!(h.take(5).await.is_empty());
        assert_eq!(h.held().await.len(), 3);
    }

    #[tokio::test]
    async fn lent_attempts_stay_held_until_handed_over_and_return_on_failure() {
        let mut h = start(1);
        let mut coord = h.connect();
        h.run(task(1, "sleep", "600000"));
        for id in 2..=4 {
            h.run(task(id, "sleep", "1"));
        }
        h.wait("queued", |s| s.queued == 3).await;

        // Newest first; the running attempt is never taken.
        assert_eq!(h.take(2).await, vec![attempt(4), attempt(3)]);
        assert_eq!(h.load.borrow().queued, 1);
        // Not handed over yet: still listed.
        let held = h.held().await;
        assert_eq!(held.len(), 4, "{held:?}");

        // The hand-over failed: back in the queue, in the original order.
        h.send(Command::Lent {
            to: "w-x".into(),
            attempts: vec![attempt(4), attempt(3)],
            delivered: false,
        });
        assert_eq!(
            h.held().await,
            vec![attempt(1), attempt(2), attempt(3), attempt(4)]
        );
        tokio::time::timeout(LIMIT, h.load.wait_for(|l| l.queued == 3))
            .await
            .expect("load published")
            .unwrap();

        // The asking link vanished before the answer: nothing is lost.
        let (tx, rx) = oneshot::channel();
        drop(rx);
        h.send(Command::TakeQueued { max: 3, reply: tx });
        assert_eq!(h.held().await.len(), 4);

        // A cancel while lent reports it at once and keeps it from coming back.
        assert_eq!(h.take(1).await, vec![attempt(4)]);
        h.send(Command::Coordinator(CoordinatorMsg::Cancel(attempt(4))));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => {
                assert_eq!(r.attempt, attempt(4));
                assert!(matches!(
                    r.outcome,
                    Outcome::Failed {
                        kind: FailureKind::Cancelled,
                        ..
                    }
                ));
            }
            other => panic!("unexpected {other:?}"),
        }
        h.send(Command::Lent {
            to: "w-x".into(),
            attempts: vec![attempt(4)],
            delivered: false,
        });
        h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(4))));
        assert_eq!(h.held().await, vec![attempt(1), attempt(2), attempt(3)]);

        // Handed over: forgotten, counted, no report.
        assert_eq!(h.take(8).await, vec![attempt(3), attempt(2)]);
        h.send(Command::Lent {
            to: "w-x".into(),
            attempts: vec![attempt(3), attempt(2)],
            delivered: true,
        });
        assert_eq!(h.held().await, vec![attempt(1)]);
        h.wait("steals counted", |s| s.steals_out == 2 && s.queued == 0)
            .await;
        // A Run for an attempt being lent is a duplicate, not a second copy.
        h.run(task(1, "sleep", "1"));
        assert_eq!(h.held().await, vec![attempt(1)]);
    }

    #[tokio::test]
    async fn an_attempt_stolen_here_is_never_lent_on() {
        // One slot, busy: stolen attempts wait in the queue beside one of its own.
        let mut h = start(1);
        let _coord = h.connect();
        h.run(task(1, "sleep", "600000"));
        h.run(task(2, "sleep", "1"));
        let (tx, rx) = oneshot::channel();
        h.send(Command::Stolen {
            from: "w-x".into(),
            assignments: vec![task(7, "sleep", "1"), task(8, "sleep", "1")],
            reply: tx,
        });
        rx.await.unwrap();
        h.wait("queued", |s| s.queued == 3).await;
        // A peer asking for everything gets only what the coordinator placed here.
        assert_eq!(h.take(8).await, vec![attempt(2)]);
    }

    #[tokio::test]
    async fn steals_made_while_disconnected_are_announced_before_their_reports() {
        let mut h = start(2);
        let (tx, rx) = oneshot::channel();
        h.send(Command::Stolen {
            from: "w-x".into(),
            assignments: vec![task(5, "echo", "hi"), task(6, "sleep", "600000")],
            reply: tx,
        });
        rx.await.unwrap();
        h.send(Command::PeerLost { peer: "w-y".into() });
        h.send(Command::PeerLost { peer: "w-y".into() });
        h.wait("echo finished", |s| s.finished == 1 && s.steals_in == 2)
            .await;
        // The stolen attempts are this worker's now.
        let held = h.held().await;
        assert!(
            held.contains(&attempt(5)) && held.contains(&attempt(6)),
            "{held:?}"
        );

        let mut coord = h.connect();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(next(&mut coord).await);
        }
        assert_eq!(
            got[..3],
            [
                WorkerMsg::Stole {
                    attempt: attempt(5),
                    from: "w-x".into()
                },
                WorkerMsg::Stole {
                    attempt: attempt(6),
                    from: "w-x".into()
                },
                WorkerMsg::PeerLost { peer: "w-y".into() },
            ]
        );
        assert!(
            matches!(&got[3], WorkerMsg::Finished(r) if r.attempt == attempt(5)),
            "{:?}",
            got[3]
        );

        // A stolen attempt the coordinator refuses is cancelled.
        h.send(Command::Coordinator(CoordinatorMsg::Cancel(attempt(6))));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => {
                assert_eq!(r.attempt, attempt(6));
                assert!(matches!(
                    r.outcome,
                    Outcome::Failed {
                        kind: FailureKind::Cancelled,
                        ..
                    }
                ));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The report of `id`, which must be the next message, and its failure message if it
    /// was handed back as drained.
    async fn drained_report(rx: &mut mpsc::UnboundedReceiver<WorkerMsg>, id: u64) -> String {
        match next(rx).await {
            WorkerMsg::Finished(TaskReport {
                attempt: a,
                outcome:
                    Outcome::Failed {
                        kind: FailureKind::Drained,
                        message,
                    },
                ..
            }) if a == attempt(id) => message,
            other => panic!("expected attempt {id} handed back, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_drain_hands_back_what_waits_and_lets_what_runs_finish() {
        // `gate` runs until the test opens the gate: it is surely running during the drain.
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("open");
        let file = dir.path().join("agents.toml");
        let agents = format!(
            "[agents.gate]\ncommand = \"sh\"\nargs = [\"-c\", \"while [ ! -e '{}' ]; do sleep 0.02; done; printf finished\"]\n",
            gate.display()
        );
        std::fs::write(&file, agents).unwrap();
        let mut h = start_with(1, Agents::load(&file).unwrap());
        let mut coord = h.connect();
        h.run(task(1, "gate", ""));
        h.run(task(2, "echo", "queued"));
        h.wait("one running, one queued", |s| {
            s.running == 1 && s.queued == 1
        })
        .await;

        h.send(Command::Drain);
        assert_eq!(next(&mut coord).await, WorkerMsg::Draining);
        assert_eq!(drained_report(&mut coord, 2).await, HANDED_BACK);
        // A Run that still arrives goes straight back, unstarted.
        h.run(task(3, "echo", "late"));
        assert_eq!(drained_report(&mut coord, 3).await, HANDED_BACK);
        h.wait("draining, two handed back", |s| {
            s.draining && s.handed_back == 2 && s.running == 1 && s.queued == 0
        })
        .await;
        assert!(
            h.load.borrow().draining,
            "no steals from peers while draining"
        );

        // The running attempt ends as it would have, and is reported as usual.
        std::fs::write(&gate, "").unwrap();
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => {
                assert_eq!(r.attempt, attempt(1));
                assert_eq!(
                    r.outcome,
                    Outcome::Succeeded {
                        output: b"finished".to_vec()
                    }
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            h.stats.borrow().started,
            1,
            "nothing handed back ever started"
        );

        // Done only once every report is acknowledged and so is the drain itself.
        for id in 1..=3 {
            h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(id))));
        }
        assert!(h.held().await.is_empty());
        assert!(
            !*h.drained.borrow(),
            "the coordinator has not acknowledged the drain"
        );
        h.send(Command::Coordinator(CoordinatorMsg::DrainAck));
        tokio::time::timeout(LIMIT, h.drained.wait_for(|d| *d))
            .await
            .expect("drained")
            .unwrap();
    }

    /// An agent with `max_concurrency = 1` runs its attempts one after the other, whatever
    /// the free slots, while an attempt of another agent queued behind them starts at once.
    #[tokio::test]
    async fn max_concurrency_queues_an_agent_without_blocking_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("open");
        let log = dir.path().join("log");
        let file = dir.path().join("agents.toml");
        let agents = format!(
            "[agents.one]\ncommand = \"sh\"\nmax_concurrency = 1\nargs = [\"-c\", \"printf s >> '{log}'; while [ ! -e '{gate}' ]; do sleep 0.02; done; printf e >> '{log}'\"]\n",
            log = log.display(),
            gate = gate.display(),
        );
        std::fs::write(&file, agents).unwrap();
        let mut h = start_with(4, Agents::load(&file).unwrap());
        let mut coord = h.connect();
        h.run(task(1, "one", ""));
        h.run(task(2, "one", ""));
        h.run(task(3, "sleep", "600000"));
        // Two of four slots busy: the second `one` waits, the `sleep` behind it started.
        h.wait("one of each running, the second `one` queued", |s| {
            s.running == 2 && s.queued == 1 && s.started == 2
        })
        .await;
        assert_eq!(h.held().await, vec![attempt(1), attempt(3), attempt(2)]);
        tokio::time::timeout(LIMIT, async {
            while std::fs::read(&log).unwrap_or_default() != b"s" {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the first `one` started");

        // The first `one` ends: the second starts (and, the gate open, ends too).
        std::fs::write(&gate, "").unwrap();
        for id in [1, 2] {
            match next(&mut coord).await {
                WorkerMsg::Finished(r) => {
                    assert_eq!(r.attempt, attempt(id));
                    assert!(matches!(r.outcome, Outcome::Succeeded { .. }), "{r:?}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "sese",
            "never both at once"
        );
        h.wait("the sleep still runs", |s| {
            s.started == 3 && s.running == 1 && s.queued == 0
        })
        .await;
    }

    #[tokio::test]
    async fn the_drain_timeout_cuts_running_attempts_short_and_hands_them_back() {
        let mut h = start(2);
        let mut coord = h.connect();
        h.run(task(1, "sleep", "600000"));
        h.run(task(2, "sleep", "600000"));
        h.wait("running", |s| s.running == 2).await;
        // Cutting short before a drain does nothing.
        h.send(Command::CutShort);
        h.send(Command::Drain);
        assert_eq!(next(&mut coord).await, WorkerMsg::Draining);
        h.send(Command::Coordinator(CoordinatorMsg::DrainAck));
        h.send(Command::CutShort);
        assert_eq!(drained_report(&mut coord, 1).await, CUT_SHORT);
        assert_eq!(drained_report(&mut coord, 2).await, CUT_SHORT);
        h.wait("nothing runs", |s| s.running == 0 && s.handed_back == 2)
            .await;
        assert!(!*h.drained.borrow(), "reports not acknowledged yet");
        h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(1))));
        h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(2))));
        tokio::time::timeout(LIMIT, h.drained.wait_for(|d| *d))
            .await
            .expect("drained")
            .unwrap();
    }

    #[tokio::test]
    async fn a_draining_worker_says_so_first_on_every_new_session() {
        let mut h = start(1);
        h.run(task(1, "sleep", "600000"));
        h.run(task(2, "sleep", "1"));
        h.wait("one running, one queued", |s| {
            s.running == 1 && s.queued == 1
        })
        .await;
        // Draining while disconnected: the hand-back waits for a session.
        h.send(Command::Drain);
        h.wait("handed back", |s| s.handed_back == 1).await;
        let mut coord = h.connect();
        assert_eq!(next(&mut coord).await, WorkerMsg::Draining);
        assert_eq!(drained_report(&mut coord, 2).await, HANDED_BACK);
        h.send(Command::Coordinator(CoordinatorMsg::DrainAck));
        h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(2))));
        assert_eq!(h.held().await, vec![attempt(1)]);

        // A new session (e.g. another leader): Draining first again, and the drain must
        // be acknowledged again before the worker may leave.
        h.send(Command::Disconnected);
        let mut coord = h.connect();
        assert_eq!(next(&mut coord).await, WorkerMsg::Draining);
        h.send(Command::Coordinator(CoordinatorMsg::Cancel(attempt(1))));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => assert_eq!(r.attempt, attempt(1)),
            other => panic!("unexpected {other:?}"),
        }
        h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(1))));
        assert!(h.held().await.is_empty());
        assert!(!*h.drained.borrow(), "not acknowledged on this session");
        h.send(Command::Coordinator(CoordinatorMsg::DrainAck));
        tokio::time::timeout(LIMIT, h.drained.wait_for(|d| *d))
            .await
            .expect("drained")
            .unwrap();
    }

    fn remote(on: bool) -> Command {
        Command::Coordinator(CoordinatorMsg::Drain { on })
    }

    /// An operator's drain: what waits and what still arrives is handed back, no steals,
    /// what runs finishes and is reported as usual (the drain timeout does not apply), and
    /// the worker never counts as drained for leaving. Said first on every new session;
    /// a resume takes work again and says so.
    #[tokio::test]
    async fn a_remote_drain_refuses_new_work_but_the_worker_stays_until_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let script = gated(dir.path(), "g", "A", "B");
        let mut h = start_with(1, exec_agents(dir.path(), &[("gated", &script)]));
        let mut coord = h.connect();
        h.run(task(1, "gated", ""));
        h.run(task(2, "echo", "queued"));
        wait_file(&dir.path().join("g.half")).await;
        h.wait("one running, one queued", |s| {
            s.running == 1 && s.queued == 1
        })
        .await;

        h.send(remote(true));
        assert_eq!(next(&mut coord).await, WorkerMsg::Drain { on: true });
        assert_eq!(drained_report(&mut coord, 2).await, HANDED_BACK);
        h.run(task(3, "echo", "late"));
        assert_eq!(drained_report(&mut coord, 3).await, HANDED_BACK);
        h.send(Command::Coordinator(CoordinatorMsg::DrainAck));
        h.wait("drained remotely, not stopping", |s| {
            s.remote_drain && !s.draining && s.handed_back == 2 && s.running == 1
        })
        .await;
        assert!(h.load.borrow().draining, "no steals from peers");
        // No drain timeout: cutting short does nothing, the attempt ends as it would.
        h.send(Command::CutShort);
        h.held().await;
        open(dir.path().join("g.gate"));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => {
                assert_eq!(r.attempt, attempt(1));
                assert_eq!(
                    r.outcome,
                    Outcome::Succeeded {
                        output: b"AB".to_vec()
                    }
                );
            }
            other => panic!("expected the report, got {other:?}"),
        }
        for id in 1..=3 {
            h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(id))));
        }
        assert!(h.held().await.is_empty());
        assert!(
            !*h.drained.borrow(),
            "a remote drain never lets the worker leave"
        );

        // A new session (another leader, say) hears it first.
        h.send(Command::Disconnected);
        let mut coord = h.connect();
        assert_eq!(next(&mut coord).await, WorkerMsg::Drain { on: true });

        // Resumed: said back, and work starts again.
        h.send(remote(false));
        assert_eq!(next(&mut coord).await, WorkerMsg::Drain { on: false });
        h.wait("resumed", |s| !s.remote_drain).await;
        assert!(!h.load.borrow().draining, "steals again");
        h.run(task(4, "echo", "again"));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => {
                assert_eq!(r.attempt, attempt(4));
                assert!(matches!(r.outcome, Outcome::Succeeded { .. }), "{r:?}");
            }
            other => panic!("expected report 4, got {other:?}"),
        }
        // Nothing said on a new session once resumed.
        h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(4))));
        assert!(h.held().await.is_empty());
        let mut coord = h.connect();
        h.run(task(5, "echo", "fresh"));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => assert_eq!(r.attempt, attempt(5)),
            other => panic!("expected report 5 first, got {other:?}"),
        }
    }

    /// Being stopped wins: a drained worker that is stopped says `Draining` (and waits for
    /// its acknowledgement before leaving); a resume then is ignored, and `Draining` said
    /// again to be acknowledged afresh.
    #[tokio::test]
    async fn a_stopping_worker_ignores_a_resume() {
        let mut h = start(1);
        let mut coord = h.connect();
        h.send(remote(true));
        assert_eq!(next(&mut coord).await, WorkerMsg::Drain { on: true });
        h.send(Command::Coordinator(CoordinatorMsg::DrainAck));
        h.send(Command::Drain);
        assert_eq!(next(&mut coord).await, WorkerMsg::Draining);
        assert!(h.held().await.is_empty());
        assert!(
            !*h.drained.borrow(),
            "the stop's own Draining is not acknowledged yet"
        );
        h.send(remote(false));
        assert_eq!(next(&mut coord).await, WorkerMsg::Draining);
        h.run(task(1, "echo", "late"));
        assert_eq!(drained_report(&mut coord, 1).await, HANDED_BACK);
        h.send(Command::Coordinator(CoordinatorMsg::DrainAck));
        h.send(Command::Coordinator(CoordinatorMsg::Ack(attempt(1))));
        tokio::time::timeout(LIMIT, h.drained.wait_for(|d| *d))
            .await
            .expect("drained")
            .unwrap();
        h.wait("stopping", |s| s.draining && s.started == 0).await;
        let mut coord = h.connect();
        assert_eq!(next(&mut coord).await, WorkerMsg::Draining);
    }

    // ------------------------------------------------------------------ live output

    use swarm_proto::worker::{LogPiece, LogTail, OutputChunk, OutputStream};

    /// `exec` agents running `sh -c <script>`, one per `(name, script)`.
    fn exec_agents(dir: &std::path::Path, scripts: &[(&str, &str)]) -> Agents {
        let mut toml = String::new();
        for (name, script) in scripts {
            toml.push_str(&format!(
                "[agents.{name}]\ncommand = \"sh\"\nargs = [\"-c\", '''{script}''']\n\n"
            ));
        }
        let file = dir.join("agents.toml");
        std::fs::write(&file, &toml).unwrap();
        Agents::load(&file).unwrap_or_else(|e| panic!("{e}\n{toml}"))
    }

    /// A script that prints `first`, touches `<dir>/<name>.half`, waits for
    /// `<dir>/<name>.gate`, then prints `second`.
    fn gated(dir: &std::path::Path, name: &str, first: &str, second: &str) -> String {
        let d = dir.display();
        format!(
            "printf {first}; : > '{d}/{name}.half'; while [ ! -e '{d}/{name}.gate' ]; do sleep 0.02; done; printf {second}"
        )
    }

    async fn wait_file(path: &std::path::Path) {
        tokio::time::timeout(LIMIT, async {
            while !path.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} never appeared", path.display()));
    }

    fn open(path: std::path::PathBuf) {
        std::fs::write(path, "").unwrap();
    }

    fn watch_msg(id: u64, on: bool, from: u64) -> Command {
        Command::Coordinator(CoordinatorMsg::Watch {
            attempt: attempt(id),
            on,
            from,
        })
    }

    /// The output chunks a session got, checked as they come: all of one attempt, each
    /// starting where the one before ended.
    #[derive(Default)]
    struct Seen {
        chunks: Vec<OutputChunk>,
    }

    impl Seen {
        fn take(&mut self, c: OutputChunk) {
            if let Some(last) = self.chunks.last() {
                assert_eq!(c.attempt, last.attempt);
                assert_eq!(c.offset, last.end(), "chunks are contiguous");
            }
            self.chunks.push(c);
        }

        fn len(&self) -> usize {
            self.chunks.iter().map(|c| c.data.len()).sum()
        }

        fn stream(&self, s: OutputStream) -> Vec<u8> {
            self.chunks
                .iter()
                .filter(|c| c.stream == s)
                .flat_map(|c| c.data.clone())
                .collect()
        }

        /// Takes output chunks until they hold `n` bytes in all.
        async fn until_len(&mut self, rx: &mut mpsc::UnboundedReceiver<WorkerMsg>, n: usize) {
            while self.len() < n {
                match next(rx).await {
                    WorkerMsg::Output(c) => self.take(c),
                    other => panic!("expected output, got {other:?}"),
                }
            }
        }

        /// Takes output chunks until the report comes.
        async fn until_report(
            &mut self,
            rx: &mut mpsc::UnboundedReceiver<WorkerMsg>,
        ) -> TaskReport {
            loop {
                match next(rx).await {
                    WorkerMsg::Output(c) => self.take(c),
                    WorkerMsg::Finished(r) => return r,
                    other => panic!("expected output or a report, got {other:?}"),
                }
            }
        }
    }

    fn log_stream(log: &LogTail, s: OutputStream) -> Vec<u8> {
        log.pieces
            .iter()
            .filter(|p| p.stream == s)
            .flat_map(|p| p.data.clone())
            .collect()
    }

    /// Watched mid-run, an `exec` attempt sends what it printed so far (its tail), then
    /// each line as it is printed, stdout and stderr alike, in one contiguous sequence of
    /// offsets; its report carries the whole output as its log.
    #[tokio::test]
    async fn a_watched_exec_attempt_sends_its_tail_then_each_piece_live() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let script = format!(
            r#"i=1; while [ $i -le 10 ]; do if [ $i -eq 6 ]; then : > '{d}/half'; while [ ! -e '{d}/gate' ]; do sleep 0.02; done; fi; if [ $((i % 3)) -eq 0 ]; then echo "err $i" >&2; else echo "line $i"; fi; sleep 0.05; i=$((i+1)); done"#
        );
        let h = start_with(2, exec_agents(dir.path(), &[("talk", &script)]));
        let mut coord = h.connect();
        h.run(task(1, "talk", ""));
        wait_file(&dir.path().join("half")).await;
        h.send(watch_msg(1, true, 0));
        // The first five lines, all printed before the watch: the agent now waits.
        let mut seen = Seen::default();
        let first_half = "line 1\nline 2\nerr 3\nline 4\nline 5\n".len();
        seen.until_len(&mut coord, first_half).await;
        assert_eq!(seen.len(), first_half);
        assert_eq!(seen.chunks[0].offset, 0);
        assert_eq!(seen.chunks[0].attempt, attempt(1));
        // The rest comes as it is printed.
        open(dir.path().join("gate"));
        let report = seen.until_report(&mut coord).await;
        // Each stream in the order printed (the two pipes are read apart, so how lines
        // of different streams interleave depends on when each was read).
        let stdout = "line 1\nline 2\nline 4\nline 5\nline 7\nline 8\nline 10\n";
        let stderr = "err 3\nerr 6\nerr 9\n";
        assert_eq!(
            String::from_utf8(seen.stream(OutputStream::Stdout)).unwrap(),
            stdout
        );
        assert_eq!(
            String::from_utf8(seen.stream(OutputStream::Stderr)).unwrap(),
            stderr
        );
        assert_eq!(seen.len(), stdout.len() + stderr.len());

        assert_eq!(report.attempt, attempt(1));
        assert_eq!(
            report.outcome,
            Outcome::Succeeded {
                output: stdout.as_bytes().to_vec()
            }
        );
        // The log is what was sent, piece for piece.
        assert_eq!(report.log.offset, 0);
        assert_eq!(report.log.end(), (stdout.len() + stderr.len()) as u64);
        let sent: Vec<u8> = seen.chunks.iter().flat_map(|c| c.data.clone()).collect();
        let logged: Vec<u8> = report
            .log
            .pieces
            .iter()
            .flat_map(|p| p.data.clone())
            .collect();
        assert_eq!(sent, logged);
        assert_eq!(
            log_stream(&report.log, OutputStream::Stdout),
            stdout.as_bytes()
        );
        assert_eq!(
            log_stream(&report.log, OutputStream::Stderr),
            stderr.as_bytes()
        );
        // Runs of one stream are merged: no two neighbours share a stream.
        assert!(report
            .log
            .pieces
            .windows(2)
            .all(|w| w[0].stream != w[1].stream));
        assert_eq!(report.usage, None);
    }

    /// Nobody watches: not one output frame, and the report's log is the last
    /// `log_tail_bytes` of the output, placed where they are in it.
    #[tokio::test]
    async fn an_unwatched_attempt_sends_no_output_and_reports_a_bounded_tail() {
        let dir = tempfile::tempdir().unwrap();
        let script = r#"i=0; while [ $i -lt 1000 ]; do printf '%099d\n' $i; i=$((i+1)); done"#;
        let h = start_tail(1, exec_agents(dir.path(), &[("big", script)]), 4096);
        let mut coord = h.connect();
        h.run(task(1, "big", ""));
        let report = match next(&mut coord).await {
            WorkerMsg::Finished(r) => r,
            other => panic!("expected the report and nothing before it, got {other:?}"),
        };
        let printed: String = (0..1000).map(|i| format!("{i:099}\n")).collect();
        assert_eq!(printed.len(), 100_000);
        assert_eq!(
            report.outcome,
            Outcome::Succeeded {
                output: printed.clone().into_bytes()
            }
        );
        assert!(report.log.len() <= 4096);
        assert_eq!(report.log.end(), 100_000);
        assert_eq!(
            report.log.pieces,
            vec![LogPiece {
                stream: OutputStream::Stdout,
                data: printed.as_bytes()[100_000 - 4096..].to_vec(),
            }]
        );
        assert_eq!(report.log.offset, 100_000 - 4096);
    }

    /// `Watch { on: false }` stops the chunks; the report's log still holds everything.
    #[tokio::test]
    async fn an_unwatched_attempt_stops_sending() {
        let dir = tempfile::tempdir().unwrap();
        let script = gated(dir.path(), "g", "A", "B");
        let h = start_with(1, exec_agents(dir.path(), &[("gated", &script)]));
        let mut coord = h.connect();
        h.run(task(1, "gated", ""));
        wait_file(&dir.path().join("g.half")).await;
        h.send(watch_msg(1, true, 0));
        let mut seen = Seen::default();
        seen.until_len(&mut coord, 1).await;
        assert_eq!(seen.stream(OutputStream::Stdout), b"A");
        h.send(watch_msg(1, false, 0));
        // Once the core has taken the unwatch, let the agent print the rest.
        h.held().await;
        open(dir.path().join("g.gate"));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => {
                assert_eq!(
                    r.outcome,
                    Outcome::Succeeded {
                        output: b"AB".to_vec()
                    }
                );
                assert_eq!(
                    r.log.pieces,
                    vec![LogPiece {
                        stream: OutputStream::Stdout,
                        data: b"AB".to_vec()
                    }]
                );
            }
            other => panic!("expected the report and no more output, got {other:?}"),
        }
    }

    /// A new session starts with nothing watched: the new coordinator asks for what it
    /// wants, and the old session's queue gets nothing more.
    #[tokio::test]
    async fn a_new_session_clears_every_watch() {
        let dir = tempfile::tempdir().unwrap();
        let script = gated(dir.path(), "g", "A", "B");
        let h = start_with(1, exec_agents(dir.path(), &[("gated", &script)]));
        let mut old = h.connect();
        h.run(task(1, "gated", ""));
        wait_file(&dir.path().join("g.half")).await;
        h.send(watch_msg(1, true, 0));
        Seen::default().until_len(&mut old, 1).await;

        let mut coord = h.connect();
        h.held().await;
        open(dir.path().join("g.gate"));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => {
                assert_eq!(r.attempt, attempt(1));
                assert_eq!(r.log.end(), 2);
            }
            other => panic!("expected the report and no output, got {other:?}"),
        }
        while let Ok(m) = old.try_recv() {
            assert!(
                !matches!(m, WorkerMsg::Output(_)),
                "output on the old session: {m:?}"
            );
        }
    }

    /// A `Watch` for an attempt that is not running here (unknown, queued, finished) or
    /// whose agent has no output (a built-in) is ignored.
    #[tokio::test]
    async fn watches_of_attempts_not_running_here_are_ignored() {
        let h = start(1);
        let mut coord = h.connect();
        h.send(watch_msg(99, true, 0));
        h.run(task(1, "sleep", "600000"));
        h.run(task(2, "echo", "queued"));
        h.send(watch_msg(1, true, 0));
        h.send(watch_msg(2, true, 0));
        h.send(Command::Coordinator(CoordinatorMsg::Cancel(attempt(1))));
        for id in [1, 2] {
            match next(&mut coord).await {
                WorkerMsg::Finished(r) => {
                    assert_eq!(r.attempt, attempt(id));
                    assert_eq!(r.log, LogTail::default());
                }
                other => panic!("expected report {id}, got {other:?}"),
            }
        }
        // Finished, not yet acknowledged: not running either.
        h.send(watch_msg(2, true, 0));
        h.run(task(3, "echo", "x"));
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => assert_eq!(r.attempt, attempt(3)),
            other => panic!("expected report 3, got {other:?}"),
        }
    }

    /// An attempt cut short at the drain timeout reports the tail of what it printed.
    #[tokio::test]
    async fn an_attempt_cut_short_reports_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let script = gated(dir.path(), "g", "A", "B");
        let mut h = start_with(1, exec_agents(dir.path(), &[("gated", &script)]));
        let mut coord = h.connect();
        h.run(task(1, "gated", ""));
        wait_file(&dir.path().join("g.half")).await;
        // Watched, so the test knows the piece reached the log.
        h.send(watch_msg(1, true, 0));
        Seen::default().until_len(&mut coord, 1).await;
        h.send(Command::Drain);
        assert_eq!(next(&mut coord).await, WorkerMsg::Draining);
        h.send(Command::Coordinator(CoordinatorMsg::DrainAck));
        h.send(Command::CutShort);
        match next(&mut coord).await {
            WorkerMsg::Finished(r) => {
                assert!(
                    matches!(
                        r.outcome,
                        Outcome::Failed {
                            kind: FailureKind::Drained,
                            ..
                        }
                    ),
                    "{r:?}"
                );
                assert_eq!(
                    r.log.pieces,
                    vec![LogPiece {
                        stream: OutputStream::Stdout,
                        data: b"A".to_vec()
                    }]
                );
            }
            other => panic!("expected the drained report, got {other:?}"),
        }
        h.wait("cut short", |s| s.handed_back == 1).await;
    }
}
