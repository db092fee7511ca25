//! The cluster's changes as they happen, for dashboards and `swarm status --watch`
//! (`GET /v1/events`).
//!
//! Two kinds of change, both costing nothing while nobody watches:
//! * **Task changes** (submitted, started, moved, retried, finished): pushed from the
//!   applied loop into one ring per node, bounded in events; each has a sequence number,
//!   so a client that reconnects with the id of the last one it saw gets what followed,
//!   or `reset` when that has left the ring (or the node restarted: ids carry the
//!   node's epoch) and it must read the lists again.
//! * **Status**: the leader's `/v1/status` view, rebuilt at most every
//!   [`STATUS_EVERY`] while someone watches and sent only when it changed; a client gets
//!   the latest at once when it connects.
//!
//! A watcher that falls a ring behind loses the oldest task changes and is sent `reset`;
//! nobody waits for it. Followers relay the leader's stream (the workers, in the status,
//! are known to the leader only).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use swarm_proto::api::TaskState;
use swarm_proto::TaskId;
use tokio::sync::watch;

use crate::node::Node;
use crate::state::TableEvent;

/// Task changes a node keeps for watchers that reconnect or fall behind.
pub const RING_EVENTS: usize = 4096;
/// How often the leader rebuilds the status view while someone watches.
pub const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How long a node keeps recording task changes after its last watcher left, so a
/// client that reconnects within it resumes without loss.
pub const RESUME_GRACE: Duration = Duration::from_secs(60);

/// One task's new state, as watchers see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskChange {
    pub id: TaskId,
    pub state: TaskState,
    pub agent: String,
    pub swarm: String,
    /// The attempt running or last run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A ring task's current stage (0-based); absent for other tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<u32>,
    /// Times the running attempt moved between workers (mesh steals): a change whose
    /// `moves` grew, with the same attempt on another worker, is a steal.
    #[serde(skip_serializing_if = "is_zero")]
    pub moves: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Default)]
struct Ring {
    /// Changes `first..first + changes.len()`.
    changes: VecDeque<Arc<TaskChange>>,
    first: u64,
}

/// A node's cluster feed (see the module docs).
#[derive(Debug)]
pub struct ClusterFeed {
    ring: Mutex<Ring>,
    /// The sequence number the next change gets.
    next: watch::Sender<u64>,
    /// The latest status view, as JSON, and what it was compared by.
    status: watch::Sender<Option<Arc<str>>>,
    fingerprint: Mutex<String>,
    /// When the status view was last rebuilt (ms since `started`; 0: never), published
    /// or not: the rebuilds stop while nobody watches, so the latest may be stale.
    status_at_ms: std::sync::atomic::AtomicU64,
    watchers: AtomicUsize,
    /// When the last watcher left (ms since `started`); recording goes on for
    /// [`RESUME_GRACE`] after it.
    last_left_ms: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    /// Changes before this position may be missing (recording paused): no resume from
    /// before it.
    resumable_from: std::sync::atomic::AtomicU64,
    /// Tells this node's ids from another's (or an earlier run's).
    epoch: u64,
}

impl Default for ClusterFeed {
    fn default() -> Self {
        ClusterFeed {
            ring: Mutex::default(),
            next: watch::channel(0).0,
            status: watch::channel(None).0,
            fingerprint: Mutex::default(),
            status_at_ms: std::sync::atomic::AtomicU64::new(0),
            watchers: AtomicUsize::new(0),
            last_left_ms: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
            resumable_from: std::sync::atomic::AtomicU64::new(0),
            epoch: rand::random::<u32>() as u64,
        }
    }
}

/// What a watcher is sent, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// The status view (JSON), first and whenever it changed.
    Status(Arc<str>),
    /// Task changes, oldest first.
    Tasks(Vec<Arc<TaskChange>>),
    /// Changes were lost (too old to resume from, or this watcher fell behind): read the
    /// lists again.
    Reset,
}

impl ClusterFeed {
    /// Whether task changes are recorded: someone watches, or the last watcher left less
    /// than [`RESUME_GRACE`] ago (the applied loop asks for every batch of changes).
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0 || self.in_grace()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn in_grace(&self) -> bool {
        self.in_grace_at(self.now_ms())
    }

    fn in_grace_at(&self, now_ms: u64) -> bool {
        let left = self.last_left_ms.load(Ordering::Relaxed);
        left > 0 && now_ms.saturating_sub(left) < RESUME_GRACE.as_millis() as u64
    }

    /// A watcher comes: if recording had paused, changes before now may be missing.
    fn arrive(&self) {
        self.arrive_at(self.now_ms());
    }

    fn arrive_at(&self, now_ms: u64) {
        if self.watchers.fetch_add(1, Ordering::SeqCst) == 0 && !self.in_grace_at(now_ms) {
            let next = *self.next.borrow();
            self.resumable_from.store(next, Ordering::SeqCst);
        }
    }

    fn leave(&self) {
        if self.watchers.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.last_left_ms
                .store(self.now_ms().max(1), Ordering::SeqCst);
        }
    }

    /// Add changes to the ring and wake the watchers.
    pub fn push(&self, changes: Vec<TaskChange>) {
        if changes.is_empty() {
            return;
        }
        let next = {
            let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            r.changes.extend(changes.into_iter().map(Arc::new));
            while r.changes.len() > RING_EVENTS {
                r.changes.pop_front();
                r.first += 1;
            }
            r.first + r.changes.len() as u64
        };
        self.next.send_replace(next);
    }

    /// Publish a status view if it differs from the last in more than `fingerprint`
    /// leaves out (heartbeat times, which move every beat).
    pub fn set_status(&self, json: String, fingerprint: String) {
        self.status_at_ms
            .store(self.now_ms().max(1), Ordering::SeqCst);
        let mut last = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *last == fingerprint {
            return;
        }
        *last = fingerprint;
        self.status.send_replace(Some(json.into()));
    }

    /// The latest status view for a watcher arriving now, if it is current (rebuilt
    /// within two rounds). If it is not (nobody watched for a while), the next rebuild
    /// is published whatever it holds, so the watcher gets a current one within a round
    /// instead of an old one at once.
    fn current_status(&self, latest: Option<Arc<str>>) -> Option<Arc<str>> {
        self.current_status_at(latest, self.now_ms())
    }

    fn current_status_at(&self, latest: Option<Arc<str>>, now_ms: u64) -> Option<Arc<str>> {
        let at = self.status_at_ms.load(Ordering::SeqCst);
        let fresh = at > 0 && now_ms.saturating_sub(at) <= 2 * STATUS_EVERY.as_millis() as u64;
        if !fresh {
            self.fingerprint
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            return None;
        }
        latest
    }

    /// The id of position `seq`.
    fn id(&self, seq: u64) -> String {
        format!("{:x}-{seq}", self.epoch)
    }

    /// Where a client resuming from `last_event_id` starts: `Some(seq)` if its id is this
    /// node's and what followed is still here.
    fn resume_at(&self, last_event_id: &str) -> Option<u64> {
        let (epoch, seq) = last_event_id.split_once('-')?;
        let epoch = u64::from_str_radix(epoch, 16).ok()?;
        let seq: u64 = seq.parse().ok()?;
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        (epoch == self.epoch
            && seq >= r.first
            && seq >= self.resumable_from.load(Ordering::SeqCst)
            && seq <= r.first + r.changes.len() as u64)
            .then_some(seq)
    }

    /// Changes from `at` on (at most `max`); `Err` when `at` left the ring.
    fn read(&self, at: u64, max: usize) -> Result<Vec<Arc<TaskChange>>, ()> {
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if at < r.first {
            return Err(());
        }
        Ok(r.changes
            .iter()
            .skip((at - r.first) as usize)
            .take(max)
            .cloned()
            .collect())
    }
}

/// Record the task changes among `events` if anyone watches (called by the applied loop
/// with the events it drained).
pub(crate) fn on_applied(node: &Node, events: &[TableEvent]) {
    if !node.cluster_feed.watched() {
        return;
    }
    // One change per task, with its state after the whole batch.
    let mut ids: Vec<TaskId> = Vec::with_capacity(events.len());
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for ev in events {
        let id = match ev {
            TableEvent::Finalized(id, _) | TableEvent::Queued(id, _) | TableEvent::Running(id) => {
                *id
            }
        };
        if seen.insert(id) {
            ids.push(id);
        }
    }
    let changes = ids
        .into_iter()
        .filter_map(|id| match node.table.lookup(id) {
            Ok(crate::state::Lookup::Found(task)) => {
                let last = task.attempts.last();
                Some(TaskChange {
                    id,
                    state: task.state,
                    agent: task.current_agent().to_string(),
                    swarm: task.spec.swarm.clone(),
                    attempt: last.map(|a| a.number),
                    worker: last.map(|a| a.worker.clone()),
                    error: task.error.clone(),
                    stage: (!task.spec.stages.is_empty()).then_some(task.stage),
                    moves: task.moves,
                })
            }
            _ => None,
        })
        .collect();
    node.cluster_feed.push(changes);
}

/// While someone watches and this node leads, rebuild the status view every
/// [`STATUS_EVERY`] and publish it when it changed. Runs until shutdown.
pub(crate) async fn status_loop(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !node.cluster_feed.watched() || !node.is_leader() {
            continue;
        }
        let cluster = crate::cluster::cluster_view(&node).await;
        let mut view = crate::status::status_view(&node, cluster);
        let json = serde_json::to_string(&view);
        for w in &mut view.workers {
            w.last_heartbeat_ms = 0;
        }
        match (json, serde_json::to_string(&view)) {
            (Ok(json), Ok(fingerprint)) => node.cluster_feed.set_status(json, fingerprint),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "encoding the status view failed")
            }
        }
    }
}

/// Items for one watcher, each with the id of the position after it, until this node
/// stops leading (the channel closes; the client resumes elsewhere) or the receiver is
/// dropped. `visible` filters task changes by swarm (a token limited to swarms).
pub(crate) fn follow(
    node: Arc<Node>,
    last_event_id: Option<String>,
    visible: impl Fn(&str) -> bool + Send + 'static,
) -> tokio::sync::mpsc::Receiver<(Item, String)> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let feed_watchers = Watching::new(node.clone());
    tokio::spawn(async move {
        let _watching = feed_watchers;
        let feed = &node.cluster_feed;
        let mut next = feed.next.subscribe();
        let mut status = feed.status.subscribe();
        let mut at = *next.borrow_and_update();
        if let Some(last) = last_event_id {
            match feed.resume_at(&last) {
                Some(seq) => at = seq,
                None => {
                    if tx.send((Item::Reset, feed.id(at))).await.is_err() {
                        return;
                    }
                }
            }
        }
        // The latest status at once, if it is current (the loop makes one within
        // `STATUS_EVERY` of the first watcher otherwise).
        let latest = feed.current_status(status.borrow_and_update().clone());
        if let Some(s) = latest {
            if tx.send((Item::Status(s), feed.id(at))).await.is_err() {
                return;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Everything since `at`, in pieces.
            loop {
                match feed.read(at, 256) {
                    Ok(batch) if batch.is_empty() => break,
                    Ok(batch) => {
                        at += batch.len() as u64;
                        let shown: Vec<_> =
                            batch.into_iter().filter(|c| visible(&c.swarm)).collect();
                        if !shown.is_empty()
                            && tx.send((Item::Tasks(shown), feed.id(at))).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(()) => {
                        metrics::counter!("swarm_events_reset_total").increment(1);
                        at = *next.borrow();
                        if tx.send((Item::Reset, feed.id(at))).await.is_err() {
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                r = next.changed() => if r.is_err() { return },
                r = status.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let latest = status.borrow_and_update().clone();
                    if let Some(s) = latest {
                        if tx.send((Item::Status(s), feed.id(at))).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tick.tick() => {
                    if !node.is_leader() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

/// Counts a watcher while it lives.
struct Watching(Arc<Node>);

impl Watching {
    fn new(node: Arc<Node>) -> Self {
        node.cluster_feed.arrive();
        metrics::gauge!("swarm_events_watchers").increment(1.0);
        Watching(node)
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.cluster_feed.leave();
        metrics::gauge!("swarm_events_watchers").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: TaskId) -> TaskChange {
        TaskChange {
            id,
            state: TaskState::Queued,
            agent: "a".into(),
            swarm: "default".into(),
            attempt: None,
            worker: None,
            error: None,
            stage: None,
            moves: 0,
        }
    }

    #[test]
    fn resuming_reads_what_followed_or_is_told_to_reset() {
        let feed = ClusterFeed::default();
        feed.push((1..=10).map(change).collect());
        let id = feed.id(4);
        let at = feed.resume_at(&id).unwrap();
        let got: Vec<TaskId> = feed.read(at, 100).unwrap().iter().map(|c| c.id).collect();
        assert_eq!(got, (5..=10).collect::<Vec<_>>());
        // Another node's (or run's) id, garbage, or a position not reached yet.
        assert_eq!(feed.resume_at("ffffffffff-3"), None);
        assert_eq!(feed.resume_at("nonsense"), None);
        assert_eq!(feed.resume_at(&feed.id(11)), None);
        // Past the ring: too old to resume.
        feed.push((11..=(RING_EVENTS as u64 + 20)).map(change).collect());
        assert_eq!(feed.resume_at(&id), None);
        assert!(feed.read(4, 10).is_err());
    }

    /// Changes are recorded while someone watches and for a grace after the last one
    /// left; a watcher arriving after recording paused cannot resume from before it.
    #[test]
    fn no_resume_across_a_pause_in_recording() {
        let feed = ClusterFeed::default();
        assert!(!feed.watched());
        feed.arrive();
        feed.push((1..=3).map(change).collect());
        let id = feed.id(1);
        feed.leave();
        assert!(feed.watched(), "within the grace");
        feed.arrive();
        assert_eq!(feed.resume_at(&id), Some(1));
        feed.leave();
        // Past the grace, recording stopped: what happened then is unknown.
        let left = feed.last_left_ms.load(Ordering::SeqCst);
        let later = left + RESUME_GRACE.as_millis() as u64 + 1;
        assert!(!feed.in_grace_at(later));
        feed.push((4..=5).map(change).collect());
        feed.arrive_at(later);
        assert_eq!(feed.resume_at(&id), None);
        assert_eq!(feed.resume_at(&feed.id(5)), Some(5));
    }

    /// A watcher arriving after the rebuilds paused is not handed the old status: the
    /// next rebuild is published even if it looks the same.
    #[test]
    fn a_stale_status_is_not_sent_and_the_next_is() {
        let feed = ClusterFeed::default();
        let mut rx = feed.status.subscribe();
        assert_eq!(feed.current_status_at(None, 10), None, "none built yet");
        feed.set_status("{\"q\":1}".into(), "{\"q\":1}".into());
        let built = feed.status_at_ms.load(Ordering::SeqCst);
        let latest = rx.borrow_and_update().clone();
        assert_eq!(
            feed.current_status_at(latest.clone(), built + 100)
                .as_deref(),
            Some("{\"q\":1}")
        );
        // Long after: not sent, and the same view rebuilt is published again.
        let later = built + 60_000;
        assert_eq!(feed.current_status_at(latest, later), None);
        feed.set_status("{\"q\":1}".into(), "{\"q\":1}".into());
        assert!(rx.has_changed().unwrap(), "published for the new watcher");
    }

    #[test]
    fn a_status_is_published_only_when_it_changed() {
        let feed = ClusterFeed::default();
        let mut rx = feed.status.subscribe();
        feed.set_status("{\"a\":1,\"t\":1}".into(), "{\"a\":1}".into());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        feed.set_status("{\"a\":1,\"t\":2}".into(), "{\"a\":1}".into());
        assert!(!rx.has_changed().unwrap(), "only a heartbeat time moved");
        feed.set_status("{\"a\":2,\"t\":2}".into(), "{\"a\":2}".into());
        assert!(rx.has_changed().unwrap());
    }
}
