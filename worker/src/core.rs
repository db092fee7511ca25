//! The attempt bookkeeping of a worker, independent of any connection.
//!
//! One task owns all state — attempts running, attempts queued for a slot, reports not
//! yet acked — and is driven by [`Command`]s from the connection loop. Attempts keep
//! running while the worker is disconnected; their reports wait in the unacked map and
//! are (re)sent on every new connection until the coordinator acks them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use swarm_proto::worker::{
    AttemptRef, CoordinatorMsg, FailureKind, Outcome, TaskAssignment, TaskReport, WorkerMsg,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::cancel::{cancel_pair, CancelHandle};
use crate::executor::Executor;
use crate::retrieve::Retriever;

/// How long an attempt waits for its patterns before running without them.
const RETRIEVE_TIMEOUT: Duration = Duration::from_secs(2);
use crate::WorkerStats;

/// Largest output a report may carry whatever the coordinator allows: a report must fit
/// in one frame, with room to spare for the rest of the report.
const FRAME_OUTPUT_LIMIT: u64 = (swarm_transport::DEFAULT_MAX_FRAME - 64 * 1024) as u64;

/// Smallest heartbeat interval honoured, whatever the coordinator asks for.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// Messages from the connection loop to the core.
pub(crate) enum Command {
    /// A session is up: write frames to `sink`; heartbeat and output limit from Welcome.
    Connected {
        sink: mpsc::UnboundedSender<WorkerMsg>,
        heartbeat: Duration,
        max_output_bytes: u64,
    },
    /// The session is gone; hold reports until the next one.
    Disconnected,
    /// A `Run`, `Cancel` or `Ack` from the coordinator.
    Coordinator(CoordinatorMsg),
    /// The attempts to list in the next `Hello`.
    Snapshot(oneshot::Sender<Vec<AttemptRef>>),
    /// Kill every attempt, then reply.
    Shutdown(oneshot::Sender<()>),
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
}

struct Running {
    cancel: CancelHandle,
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
}

pub(crate) fn now_ms() -> u64 {
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
        }
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
                        if let Command::Shutdown(done) = cmd {
                            self.shutdown().await;
                            let _ = done.send(());
                            return;
                        }
                        self.handle(cmd);
                    }
                }
                Some(res) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
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
                                }
                            }
                            None => continue,
                        },
                    };
                    self.finished(report);
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

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connected {
                sink,
                heartbeat,
                max_output_bytes,
            } => {
                self.retriever.set_sink(Some(sink.clone()));
                self.sink = Some(sink);
                self.max_output_bytes = max_output_bytes;
                let period = heartbeat.max(MIN_HEARTBEAT);
                let mut interval = tokio::time::interval_at(Instant::now() + period, period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                self.heartbeat = Some(interval);
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
                self.retriever.set_sink(None);
                self.sink = None;
                self.heartbeat = None;
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(self.held_list());
            }
            Command::Coordinator(msg) => self.coordinator(msg),
            Command::Shutdown(_) => {}
        }
    }

    fn coordinator(&mut self, msg: CoordinatorMsg) {
        match msg {
            CoordinatorMsg::Run(task) => {
                let attempt = task.attempt;
                if self.running.contains_key(&attempt) || self.queued_set.contains(&attempt) {
                    tracing::debug!(?attempt, "duplicate Run ignored: attempt already running");
                } else if let Some(report) = self.unacked.get(&attempt) {
                    tracing::debug!(
                        ?attempt,
                        "duplicate Run: attempt already finished, re-sending report"
                    );
                    let m = WorkerMsg::Finished(report.clone());
                    self.send(m);
                } else if self.running.len() < self.slots {
                    self.start(task);
                } else {
                    tracing::debug!(
                        ?attempt,
                        queued = self.queued.len() + 1,
                        "all slots busy; queueing attempt"
                    );
                    self.queued_set.insert(attempt);
                    self.queued.push_back(task);
                }
            }
            CoordinatorMsg::Cancel(attempt) => {
                if let Some(r) = self.running.get(&attempt) {
                    tracing::debug!(?attempt, "cancelling attempt");
                    r.cancel.cancel();
                } else if self.queued_set.remove(&attempt) {
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
            CoordinatorMsg::Welcome { .. }
            | CoordinatorMsg::Rejected { .. }
            | CoordinatorMsg::NotLeader { .. } => {
                tracing::warn!("unexpected session message after Welcome; ignored");
            }
            // This worker has no peer listener yet: it takes no part in a mesh.
            CoordinatorMsg::Peers { .. } => {}
        }
    }

    fn start(&mut self, task: TaskAssignment) {
        let attempt = task.attempt;
        let (cancel, token) = cancel_pair();
        let executor = self.executor.clone();
        let max = self.max_output_bytes.min(FRAME_OUTPUT_LIMIT);
        let started_at_ms = now_ms();
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
            let outcome = executor
                .run_with_patterns(task, &patterns, max, token)
                .await;
            TaskReport {
                attempt,
                outcome,
                started_at_ms,
                finished_at_ms: now_ms(),
                patterns_used: patterns.into_iter().map(|p| p.id).collect(),
            }
        });
        self.task_attempts
            .insert(handle.id(), (attempt, started_at_ms));
        self.running.insert(attempt, Running { cancel });
        self.counts.started += 1;
    }

    fn finished(&mut self, report: TaskReport) {
        let attempt = report.attempt;
        self.running.remove(&attempt);
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
        while self.running.len() < self.slots {
            let Some(next) = self.queued.pop_front() else {
                break;
            };
            self.queued_set.remove(&next.attempt);
            self.start(next);
        }
    }

    /// Attempts this worker holds: running ones, then queued ones (accepted, waiting for
    /// a slot, and certain to run unless cancelled).
    /// Attempts running or queued locally for a slot (what heartbeats report).
    fn running_list(&self) -> Vec<AttemptRef> {
        let mut v: Vec<AttemptRef> = self.running.keys().copied().collect();
        v.sort();
        v.extend(self.queued.iter().map(|t| t.attempt));
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
        if let Some(sink) = &self.sink {
            if sink.send(msg).is_err() {
                // The writer is gone: the connection is going down; the connection loop
                // will say so. Reports stay in `unacked`.
                self.sink = None;
                self.heartbeat = None;
            }
        }
    }

    /// Publishes the counters and sizes as one consistent snapshot.
    fn publish(&self) {
        let c = Counts {
            running: self.running.len(),
            queued: self.queued.len(),
            unacked: self.unacked.len(),
            ..self.counts
        };
        self.stats.send_if_modified(|s| {
            let old = Counts {
                started: s.started,
                finished: s.finished,
                acked: s.acked,
                running: s.running,
                queued: s.queued,
                unacked: s.unacked,
            };
            s.started = c.started;
            s.finished = c.finished;
            s.acked = c.acked;
            s.running = c.running;
            s.queued = c.queued;
            s.unacked = c.unacked;
            old != c
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
        self.sink = None;
        self.publish();
    }
}
