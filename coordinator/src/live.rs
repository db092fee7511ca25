//! Live output: who watches which task, and what they see.
//!
//! The leader keeps one [`Feed`] per watched task. A feed is a ring of [`FeedEvent`]s —
//! output pieces from the worker, and "the task changed" from the applied log — bounded
//! in events and in bytes, that every watcher reads at its own pace: the oldest events
//! leave the ring whoever has not read them, and a watcher that falls behind is told
//! what it lost ([`Item::Gap`]); nobody else waits for it, and the worker never does
//! (drop-and-mark). A stalled watcher pins no more than the ring.
//!
//! Output is not written through Raft piece by piece. While a task has watchers, the
//! leader asks the worker running its attempt to stream it ([`CoordinatorMsg::Watch`]);
//! the worker first replays what it holds of the attempt's output (its log tail), then
//! sends each piece as it is made. Every piece carries its offset in the attempt's
//! output, so a watcher drops what it saw already (a replay for a later watcher) and
//! sees a gap as a gap. When the attempt ends, its worker reports the tail with the
//! result, which is committed with the attempt: a watcher fills in from it what it
//! missed, and `GET /v1/tasks/{id}/logs` serves it after the fact.
//!
//! On a failover the feeds go with the old leader (its streams end); a client resumes
//! at the new one with `Last-Event-ID` (`<attempt>:<offset>`), and the new leader's
//! `Watch` makes the worker replay its tail, so only output older than the tail is lost
//! for a running attempt, and nothing of an ended one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use swarm_proto::api::{TaskState, TaskView};
use swarm_proto::worker::{AttemptRef, CoordinatorMsg, LogTail, OutputChunk, OutputStream};
use swarm_proto::TaskId;

use crate::node::Node;
use crate::state::{Attempt, Lookup, Task};

/// Events a feed holds for watchers that fall behind. A watcher more than this many
/// events behind loses the oldest ([`Item::Gap`]).
pub const FEED_EVENTS: usize = 1024;

/// Bytes of output a feed's ring holds at most (the oldest events leave first).
pub const FEED_RING_BYTES: usize = 4 << 20;

/// Bytes of the running attempt's latest output a feed keeps for watchers that come
/// later (they start with it, then read on in the ring).
pub const FEED_TAIL_BYTES: usize = 64 * 1024;

/// What a feed carries to its watchers.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedEvent {
    /// A piece of the running attempt's output, as its worker sent it.
    Output(Arc<OutputChunk>),
    /// The task changed in the replicated table: read it again.
    Changed,
}

impl FeedEvent {
    fn bytes(&self) -> usize {
        match self {
            FeedEvent::Output(c) => c.data.len(),
            FeedEvent::Changed => 0,
        }
    }
}

/// One watched task: the ring its watchers read, and which execution streams to it.
#[derive(Debug)]
pub struct Feed {
    state: Mutex<FeedState>,
    /// The sequence number the next event will get: watchers wait for it to move.
    next: tokio::sync::watch::Sender<u64>,
}

/// Why [`Watcher::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// This many events left the ring before this watcher read them.
    Lagged(u64),
}

#[derive(Debug, Default)]
struct FeedState {
    watchers: usize,
    /// The ring: events `first..first + ring.len()` by sequence number.
    ring: std::collections::VecDeque<FeedEvent>,
    first: u64,
    ring_bytes: usize,
    /// The attempt (and its worker) asked to stream here.
    streaming: Option<(AttemptRef, String)>,
    /// The latest pieces of output of the newest attempt that sent any, within
    /// [`FEED_TAIL_BYTES`].
    tail: std::collections::VecDeque<Arc<OutputChunk>>,
    tail_bytes: usize,
}

impl FeedState {
    /// Add `ev` to the ring, dropping the oldest past its bounds; returns the sequence
    /// number after it.
    fn push(&mut self, ev: FeedEvent) -> u64 {
        self.ring_bytes += ev.bytes();
        self.ring.push_back(ev);
        while self.ring.len() > FEED_EVENTS
            || (self.ring_bytes > FEED_RING_BYTES && self.ring.len() > 1)
        {
            if let Some(old) = self.ring.pop_front() {
                self.ring_bytes -= old.bytes();
                self.first += 1;
            }
        }
        self.first + self.ring.len() as u64
    }

    fn keep(&mut self, chunk: Arc<OutputChunk>) {
        if self
            .tail
            .front()
            .is_some_and(|c| c.attempt.attempt != chunk.attempt.attempt)
        {
            if chunk.attempt.attempt < self.tail[0].attempt.attempt {
                return;
            }
            self.tail.clear();
            self.tail_bytes = 0;
        }
        self.tail_bytes += chunk.data.len();
        self.tail.push_back(chunk);
        while self.tail_bytes > FEED_TAIL_BYTES && self.tail.len() > 1 {
            if let Some(old) = self.tail.pop_front() {
                self.tail_bytes -= old.data.len();
            }
        }
    }
}

/// The feeds of a leader.
#[derive(Debug, Default)]
pub struct LiveHub {
    feeds: Mutex<HashMap<TaskId, Arc<Feed>>>,
    /// How many feeds there are: with none, [`LiveHub::watched`] takes no lock (the
    /// applied loop asks for every task that changes).
    count: std::sync::atomic::AtomicUsize,
}

/// A watcher's hold on a feed; leaving (drop) lets the feed go when it was the last.
#[derive(Debug)]
pub struct Watcher {
    feed: Arc<Feed>,
    /// The sequence number of the next event this watcher reads.
    at: u64,
    moved: tokio::sync::watch::Receiver<u64>,
    /// The feed's latest output when the watcher came; what follows is in the ring.
    pub backlog: Vec<Arc<OutputChunk>>,
}

impl Watcher {
    /// The next event, waiting for one; `Err` when events left the ring unread (the
    /// watcher then reads on from the oldest still there).
    pub async fn recv(&mut self) -> Result<FeedEvent, Missed> {
        loop {
            if let Some(r) = self.try_recv() {
                return r;
            }
            // The sender lives in the feed this watcher holds: never closed.
            let _ = self.moved.changed().await;
        }
    }

    /// The next event if there is one now.
    pub fn try_recv(&mut self) -> Option<Result<FeedEvent, Missed>> {
        let st = self.feed.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.at < st.first {
            let lost = st.first - self.at;
            self.at = st.first;
            return Some(Err(Missed::Lagged(lost)));
        }
        let ev = st.ring.get((self.at - st.first) as usize)?.clone();
        self.at += 1;
        Some(Ok(ev))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut st = self.feed.state.lock().unwrap_or_else(|p| p.into_inner());
        st.watchers = st.watchers.saturating_sub(1);
    }
}

impl LiveHub {
    /// Start watching `task` (its feed is made on the first watcher).
    pub fn watch(&self, task: TaskId) -> Watcher {
        let feed = {
            let mut feeds = self.lock();
            let count = &self.count;
            feeds
                .entry(task)
                .or_insert_with(|| {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Arc::new(Feed {
                        state: Mutex::new(FeedState::default()),
                        next: tokio::sync::watch::channel(0).0,
                    })
                })
                .clone()
        };
        // Under the feed's lock, as `output` sends: every piece is in the backlog or in
        // the ring, never both, never neither.
        let (at, backlog) = {
            let mut st = feed.state.lock().unwrap_or_else(|p| p.into_inner());
            st.watchers += 1;
            (
                st.first + st.ring.len() as u64,
                st.tail.iter().cloned().collect(),
            )
        };
        let moved = feed.next.subscribe();
        Watcher {
            feed,
            at,
            moved,
            backlog,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Arc<Feed>>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn feed(&self, task: TaskId) -> Option<Arc<Feed>> {
        self.lock().get(&task).cloned()
    }

    /// Whether anyone watches `task`.
    pub fn watched(&self, task: TaskId) -> bool {
        self.count.load(std::sync::atomic::Ordering::Relaxed) > 0 && self.feed(task).is_some()
    }

    /// Hand a worker's output piece to the task's watchers. Returns false when nobody
    /// watches the task any more (the worker should stop sending), after dropping its
    /// feed.
    pub fn output(&self, chunk: OutputChunk) -> bool {
        let task = chunk.attempt.task_id;
        let Some(feed) = self.feed(task) else {
            return false;
        };
        if self.drop_if_unwatched(task, &feed) {
            return false;
        }
        metrics::counter!("swarm_live_output_bytes_total").increment(chunk.data.len() as u64);
        let chunk = Arc::new(chunk);
        let mut st = feed.state.lock().unwrap_or_else(|p| p.into_inner());
        st.keep(chunk.clone());
        let next = st.push(FeedEvent::Output(chunk));
        feed.next.send_replace(next);
        true
    }

    /// Tell `task`'s watchers it changed.
    pub fn changed(&self, task: TaskId) {
        if let Some(feed) = self.feed(task) {
            let mut st = feed.state.lock().unwrap_or_else(|p| p.into_inner());
            let next = st.push(FeedEvent::Changed);
            feed.next.send_replace(next);
        }
    }

    /// Drop `feed` if its last watcher left; true if dropped.
    fn drop_if_unwatched(&self, task: TaskId, feed: &Arc<Feed>) -> bool {
        let mut feeds = self.lock();
        let st = feed.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.watchers > 0 {
            return false;
        }
        if feeds.get(&task).is_some_and(|f| Arc::ptr_eq(f, feed)) {
            feeds.remove(&task);
            self.count
                .store(feeds.len(), std::sync::atomic::Ordering::Relaxed);
        }
        true
    }

    /// Feeds with no watcher left, dropped; returns what each was streaming, to
    /// unwatch on its worker.
    pub fn prune(&self) -> Vec<(AttemptRef, String)> {
        let mut feeds = self.lock();
        let mut unwatch = Vec::new();
        feeds.retain(|_, f| {
            let st = f.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.watchers > 0 {
                return true;
            }
            unwatch.extend(st.streaming.clone());
            false
        });
        self.count
            .store(feeds.len(), std::sync::atomic::Ordering::Relaxed);
        unwatch
    }

    /// What `task`'s feed should stream now that its running attempt is `running` (the
    /// attempt and its worker, `None` when none runs): the `Watch` frames to send, to
    /// whom (the worker replays its tail on `Watch`, so a moved attempt loses nothing).
    fn retarget(
        &self,
        task: TaskId,
        running: Option<(AttemptRef, String)>,
    ) -> Vec<(String, CoordinatorMsg)> {
        let Some(feed) = self.feed(task) else {
            return Vec::new();
        };
        let mut st = feed.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        if st.streaming == running {
            return out;
        }
        if let Some((attempt, worker)) = st.streaming.take() {
            if running.as_ref().map(|(a, w)| (a, w)) != Some((&attempt, &worker)) {
                out.push((
                    worker,
                    CoordinatorMsg::Watch {
                        attempt,
                        on: false,
                        from: 0,
                    },
                ));
            }
        }
        if let Some((attempt, worker)) = &running {
            out.push((
                worker.clone(),
                CoordinatorMsg::Watch {
                    attempt: *attempt,
                    on: true,
                    from: 0,
                },
            ));
        }
        st.streaming = running;
        out
    }
}

/// Point `task`'s feed (if watched) at the attempt running it now, asking its worker to
/// stream.
pub(crate) fn retarget(node: &Node, task: TaskId) {
    if !node.live.watched(task) {
        return;
    }
    let running = node.read_table(|t| {
        t.get(task).and_then(|t| {
            t.running_attempt().map(|a| {
                (
                    AttemptRef {
                        task_id: task,
                        attempt: a.number,
                    },
                    a.worker.clone(),
                )
            })
        })
    });
    let sends = node.live.retarget(task, running);
    if sends.is_empty() {
        return;
    }
    let d = node.lock_dispatch();
    for (worker, msg) in sends {
        if let Some(s) = d.sessions.get(&worker) {
            if s.protocol >= swarm_proto::OUTPUT_PROTOCOL {
                let _ = s.tx.send(msg);
            }
        }
    }
}

/// After a worker's session is (re)established: its watches were cleared, so ask again
/// for every watched attempt it runs.
pub(crate) fn rewatch_worker(node: &Node, worker: &str) {
    let tasks: Vec<TaskId> = node.live.lock().keys().copied().collect();
    for task in tasks {
        let on_worker = node.read_table(|t| {
            t.get(task)
                .and_then(|t| t.running_attempt().map(|a| a.worker == worker))
                .unwrap_or(false)
        });
        if on_worker {
            if let Some(feed) = node.live.feed(task) {
                feed.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .streaming = None;
            }
            retarget(node, task);
        }
    }
}

/// Drop feeds nobody watches and unwatch their attempts on the workers.
pub(crate) fn prune(node: &Node) {
    let unwatch = node.live.prune();
    if unwatch.is_empty() {
        return;
    }
    let d = node.lock_dispatch();
    for (attempt, worker) in unwatch {
        if let Some(s) = d.sessions.get(&worker) {
            if s.protocol >= swarm_proto::OUTPUT_PROTOCOL {
                let _ = s.tx.send(CoordinatorMsg::Watch {
                    attempt,
                    on: false,
                    from: 0,
                });
            }
        }
    }
}

/// One thing a watcher is told, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// The task's state (first, and on every change).
    State {
        state: TaskState,
        attempt: Option<u32>,
        worker: Option<String>,
    },
    /// An attempt started on a worker.
    AttemptStarted {
        attempt: u32,
        stage: u32,
        worker: String,
    },
    /// A piece of an attempt's output; `offset` is where it starts in the attempt's
    /// output.
    Output {
        attempt: u32,
        stream: OutputStream,
        offset: u64,
        data: Vec<u8>,
    },
    /// Output this watcher will never see: bytes `from..to` of the attempt's output
    /// (`to` unknown when events were dropped for a slow watcher: `None`).
    Gap {
        attempt: u32,
        from: u64,
        to: Option<u64>,
        reason: &'static str,
    },
    /// An attempt ended.
    AttemptEnded {
        attempt: u32,
        outcome: String,
        error: Option<String>,
        output_bytes: u64,
    },
    /// The task is final; nothing follows.
    End { task: Box<TaskView> },
}

/// Where a watcher stands: the attempts it was told of, and how much of each one's
/// output it has seen.
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    /// Output offset seen, by attempt.
    seen: HashMap<u32, u64>,
    /// Attempts whose start was told.
    started: HashSet<u32>,
    /// Attempts whose end was told.
    ended: HashSet<u32>,
    last_state: Option<(TaskState, Option<u32>)>,
    /// Attempts before this one are skipped (a resumed watcher saw them).
    from_attempt: u32,
}

impl Cursor {
    /// A watcher resuming after `attempt`'s output up to `offset` (a `Last-Event-ID`).
    pub fn resume(attempt: u32, offset: u64) -> Cursor {
        let mut c = Cursor {
            from_attempt: attempt,
            ..Cursor::default()
        };
        c.seen.insert(attempt, offset);
        c
    }

    /// The id of the watcher's position: `<attempt>:<offset>` of the newest attempt it
    /// knows.
    pub fn id(&self) -> String {
        let (a, o) = self
            .seen
            .iter()
            .max_by_key(|(a, _)| **a)
            .map_or((0, 0), |(a, o)| (*a, *o));
        format!("{a}:{o}")
    }

    /// Parse a `Last-Event-ID`.
    pub fn parse_id(id: &str) -> Option<(u32, u64)> {
        let (a, o) = id.trim().split_once(':')?;
        Some((a.parse().ok()?, o.parse().ok()?))
    }

    /// What changed in `task` since this cursor last looked, in order; ends with
    /// [`Item::End`] when the task is final.
    pub fn catch_up(&mut self, task: &Task) -> Vec<Item> {
        let mut items = Vec::new();
        let running = task.running_attempt().map(|a| a.number);
        if self.last_state != Some((task.state, running)) {
            self.last_state = Some((task.state, running));
            let worker = task.running_attempt().map(|a| a.worker.clone());
            items.push(Item::State {
                state: task.state,
                attempt: running,
                worker,
            });
        }
        let from_attempt = self.from_attempt;
        for a in task.attempts.iter().filter(|a| a.number >= from_attempt) {
            if !self.started.contains(&a.number) {
                self.mark_started(a.number);
                items.push(Item::AttemptStarted {
                    attempt: a.number,
                    stage: a.stage,
                    worker: a.worker.clone(),
                });
            }
            if a.end.is_some() && !self.ended.contains(&a.number) {
                if let Some(log) = a.log() {
                    self.fill_from_tail(a.number, log, &mut items);
                }
                self.ended.insert(a.number);
                items.push(ended_item(a));
            }
        }
        if task.state.is_final() {
            items.push(Item::End {
                task: Box::new(task.view()),
            });
        }
        items
    }

    fn mark_started(&mut self, attempt: u32) {
        self.started.insert(attempt);
        self.seen.entry(attempt).or_insert(0);
    }

    /// The stored tail's bytes past what this watcher saw of `attempt`.
    fn fill_from_tail(&mut self, attempt: u32, log: &LogTail, items: &mut Vec<Item>) {
        let seen = self.seen.get(&attempt).copied().unwrap_or(0);
        if log.offset > seen {
            items.push(Item::Gap {
                attempt,
                from: seen,
                to: Some(log.offset),
                reason: "older than the stored tail",
            });
        }
        let mut at = log.offset;
        for piece in &log.pieces {
            let end = at + piece.data.len() as u64;
            let from = seen.max(at);
            if end > from {
                items.push(Item::Output {
                    attempt,
                    stream: piece.stream,
                    offset: from,
                    data: piece.data[(from - at) as usize..].to_vec(),
                });
            }
            at = end;
        }
        self.seen.insert(attempt, seen.max(at));
    }

    /// A live piece of output: the part this watcher has not seen, after a gap mark if
    /// pieces were missed. Nothing for an attempt that ended already (its stored tail
    /// was told).
    pub fn output(&mut self, chunk: &OutputChunk) -> Vec<Item> {
        let attempt = chunk.attempt.attempt;
        if attempt < self.from_attempt || self.ended.contains(&attempt) {
            return Vec::new();
        }
        let mut items = Vec::new();
        let seen = self.seen.get(&attempt).copied().unwrap_or(0);
        if chunk.end() <= seen {
            return items;
        }
        if chunk.offset > seen {
            items.push(Item::Gap {
                attempt,
                from: seen,
                to: Some(chunk.offset),
                reason: "not received",
            });
        }
        let from = seen.max(chunk.offset);
        items.push(Item::Output {
            attempt,
            stream: chunk.stream,
            offset: from,
            data: chunk.data[(from - chunk.offset) as usize..].to_vec(),
        });
        self.seen.insert(attempt, chunk.end());
        items
    }
}

impl Cursor {
    /// This watcher fell behind and lost events: a gap mark at the newest attempt it
    /// follows (the stored tail fills in what it can when the attempt ends).
    fn lagged(&mut self) -> Vec<Item> {
        let Some((&attempt, &from)) = self
            .seen
            .iter()
            .filter(|(a, _)| !self.ended.contains(a))
            .max_by_key(|(a, _)| **a)
        else {
            return Vec::new();
        };
        vec![Item::Gap {
            attempt,
            from,
            to: None,
            reason: "this watcher fell behind",
        }]
    }
}

fn ended_item(a: &Attempt) -> Item {
    let view = crate::state::attempt_view(a);
    Item::AttemptEnded {
        attempt: a.number,
        outcome: view.outcome.unwrap_or_default(),
        error: view.error,
        output_bytes: view.output_bytes,
    }
}

/// Items for a watcher of task `id` from `cursor` on, each with the id of the position
/// after it, until the task is final (the last item is [`Item::End`]), the task is
/// purged, or this node stops leading (the channel closes without `End`; the client
/// resumes elsewhere). The watch ends when the receiver is dropped.
pub(crate) fn follow(
    node: Arc<Node>,
    id: TaskId,
    mut cursor: Cursor,
) -> tokio::sync::mpsc::Receiver<(Item, String)> {
    // Small: a stalled client holds at most this many items here (the rest of what it
    // misses is the ring's to drop).
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut watcher = node.live.watch(id);
    tokio::spawn(async move {
        metrics::gauge!("swarm_live_watchers").increment(1.0);
        retarget(&node, id);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut reread = true;
        let mut backlog = std::mem::take(&mut watcher.backlog);
        'watch: loop {
            let mut items = Vec::new();
            if reread {
                let Some(task) = read_task(&node, id) else {
                    break;
                };
                items = cursor.catch_up(&task);
                reread = false;
            }
            for chunk in backlog.drain(..) {
                items.extend(cursor.output(&chunk));
            }
            for item in items {
                let end = matches!(item, Item::End { .. });
                if tx.send((item, cursor.id())).await.is_err() || end {
                    break 'watch;
                }
            }
            let ev = tokio::select! {
                ev = watcher.recv() => ev,
                _ = tick.tick() => {
                    if !node.is_leader() {
                        break;
                    }
                    continue;
                }
                _ = tx.closed() => break,
            };
            let items = match ev {
                Ok(FeedEvent::Output(chunk)) => cursor.output(&chunk),
                Ok(FeedEvent::Changed) => {
                    reread = true;
                    Vec::new()
                }
                Err(Missed::Lagged(n)) => {
                    metrics::counter!("swarm_live_events_dropped_total").increment(n);
                    reread = true;
                    cursor.lagged()
                }
            };
            for item in items {
                if tx.send((item, cursor.id())).await.is_err() {
                    break 'watch;
                }
            }
        }
        metrics::gauge!("swarm_live_watchers").decrement(1.0);
        drop(watcher);
        prune(&node);
    });
    rx
}

/// The task as the watcher's next catch-up reads it: `None` when it is gone (purged).
pub(crate) fn read_task(node: &Node, id: TaskId) -> Option<Arc<Task>> {
    match node.table.lookup(id) {
        Ok(Lookup::Found(t)) => Some(t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use swarm_proto::worker::{LogPiece, OutputStream};

    use super::*;
    use crate::state::{AttemptEnd, TaskSpec};

    fn task(state: TaskState, attempts: Vec<Attempt>) -> Task {
        Task {
            id: 1,
            spec: TaskSpec {
                agent: "a".into(),
                payload: vec![],
                priority: 0,
                timeout_ms: 1000,
                max_attempts: 3,
                idempotency_key: None,
                labels: BTreeMap::new(),
                patterns: 0,
                swarm: "default".into(),
                stages: vec![],
                retain_ms: 1000,
            },
            state,
            attempts,
            output: None,
            error: None,
            created_at_ms: 1,
            finished_at_ms: None,
            expires_at_ms: None,
            not_before_ms: 0,
            stage: 0,
            stage_base: 0,
            released: 0,
            stage_outputs: vec![],
            moves: 0,
            flow: None,
        }
    }

    fn attempt(number: u32, end: Option<AttemptEnd>) -> Attempt {
        Attempt {
            number,
            stage: 0,
            worker: "w1".into(),
            started_at_ms: 2,
            finished_at_ms: end.as_ref().map(|_| 3),
            end,
        }
    }

    fn chunk(attempt: u32, offset: u64, text: &str) -> OutputChunk {
        OutputChunk {
            attempt: AttemptRef {
                task_id: 1,
                attempt,
            },
            stream: OutputStream::Stdout,
            offset,
            data: text.as_bytes().to_vec(),
        }
    }

    fn text(items: &[Item]) -> String {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Output { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn logged(end: AttemptEnd, offset: u64, text: &str) -> AttemptEnd {
        end.with_log(
            Some(&LogTail {
                offset,
                pieces: vec![LogPiece {
                    stream: OutputStream::Stdout,
                    data: text.as_bytes().to_vec(),
                }],
            }),
            None,
        )
    }

    /// A watcher sees each byte once, in order: replays (for later watchers) and
    /// overlaps are cut, a hole is a gap, and at the end the stored tail fills in what
    /// it missed before `end`.
    #[test]
    fn a_watcher_sees_each_byte_once_and_gaps_as_gaps() {
        let mut c = Cursor::default();
        let running = task(TaskState::Running, vec![attempt(1, None)]);
        let items = c.catch_up(&running);
        assert!(matches!(
            items[..],
            [
                Item::State {
                    state: TaskState::Running,
                    attempt: Some(1),
                    ..
                },
                Item::AttemptStarted { attempt: 1, .. }
            ]
        ));
        assert!(c.catch_up(&running).is_empty(), "nothing changed");
        let mut seen = Vec::new();
        seen.extend(c.output(&chunk(1, 0, "hello ")));
        seen.extend(c.output(&chunk(1, 0, "hello ")));
        seen.extend(c.output(&chunk(1, 3, "lo wor")));
        assert_eq!(text(&seen), "hello wor");
        assert_eq!(c.id(), "1:9");
        // Bytes 9..11 never arrived.
        let after_gap = c.output(&chunk(1, 11, "!!"));
        assert_eq!(
            after_gap[0],
            Item::Gap {
                attempt: 1,
                from: 9,
                to: Some(11),
                reason: "not received"
            }
        );
        assert_eq!(text(&after_gap), "!!");
        // Ended: the stored tail holds more than was seen.
        let done = task(
            TaskState::Succeeded,
            vec![attempt(
                1,
                Some(logged(AttemptEnd::Succeeded, 0, "hello world!!\n")),
            )],
        );
        let end = c.catch_up(&done);
        assert_eq!(text(&end), "\n");
        assert!(matches!(
            end.last(),
            Some(Item::End { task }) if task.state == TaskState::Succeeded
        ));
        assert!(end
            .iter()
            .any(|i| matches!(i, Item::AttemptEnded { attempt: 1, .. })));
        // Late pieces of an ended attempt are not shown again.
        assert!(c.output(&chunk(1, 0, "hello world!!\n")).is_empty());
    }

    /// A resumed watcher starts at its `Last-Event-ID`: earlier attempts and bytes are
    /// skipped; a tail that starts later than that is a gap.
    #[test]
    fn a_resumed_watcher_starts_where_it_left() {
        let (a, o) = Cursor::parse_id("2:5").unwrap();
        let mut c = Cursor::resume(a, o);
        let done = task(
            TaskState::Failed,
            vec![
                attempt(1, Some(logged(AttemptEnd::Cancelled, 0, "one"))),
                attempt(2, Some(logged(AttemptEnd::Cancelled, 0, "hello world"))),
            ],
        );
        let items = c.catch_up(&done);
        assert_eq!(text(&items), " world");
        assert!(!items
            .iter()
            .any(|i| matches!(i, Item::AttemptStarted { attempt: 1, .. })));
        let mut c = Cursor::resume(2, 5);
        let cut = task(
            TaskState::Failed,
            vec![attempt(2, Some(logged(AttemptEnd::Cancelled, 8, "rld")))],
        );
        let items = c.catch_up(&cut);
        assert!(items.contains(&Item::Gap {
            attempt: 2,
            from: 5,
            to: Some(8),
            reason: "older than the stored tail"
        }));
        assert_eq!(text(&items), "rld");
        assert_eq!(Cursor::parse_id("x"), None);
        assert_eq!(Cursor::parse_id("1:"), None);
    }

    /// The hub streams an attempt while someone watches: `Watch` on for the running
    /// attempt (again for each new watcher), off when it moves, and nothing once the
    /// last watcher left.
    #[test]
    fn the_hub_follows_the_running_attempt_while_watched() {
        let hub = LiveHub::default();
        assert!(!hub.output(chunk(1, 0, "x")), "nobody watches");
        let w = hub.watch(1);
        let a1 = AttemptRef {
            task_id: 1,
            attempt: 1,
        };
        let on = |a, w: &str| {
            (
                w.to_string(),
                CoordinatorMsg::Watch {
                    attempt: a,
                    on: true,
                    from: 0,
                },
            )
        };
        let sends = hub.retarget(1, Some((a1, "w1".into())));
        assert_eq!(sends, vec![on(a1, "w1")]);
        assert!(hub.retarget(1, Some((a1, "w1".into()))).is_empty());
        // A later watcher starts with the feed's latest output, then reads on.
        assert!(hub.output(chunk(1, 0, "ab")));
        let later = hub.watch(1);
        assert_eq!(later.backlog.len(), 1);
        assert_eq!(later.backlog[0].data, b"ab");
        drop(later);
        // A steal moved it.
        let moved = hub.retarget(1, Some((a1, "w2".into())));
        assert_eq!(
            moved,
            vec![
                (
                    "w1".to_string(),
                    CoordinatorMsg::Watch {
                        attempt: a1,
                        on: false,
                        from: 0
                    }
                ),
                on(a1, "w2")
            ]
        );
        let mut w = w;
        assert!(hub.output(chunk(1, 2, "x")));
        assert!(matches!(w.try_recv(), Some(Ok(FeedEvent::Output(_)))));
        assert!(matches!(w.try_recv(), Some(Ok(FeedEvent::Output(_)))));
        assert!(w.try_recv().is_none());
        drop(w);
        assert_eq!(hub.prune(), vec![(a1, "w2".to_string())]);
        assert!(!hub.watched(1));
        assert!(!hub.output(chunk(1, 3, "y")));
    }

    /// A watcher that does not read loses the oldest events, never blocks the sender,
    /// and is told how many it lost.
    #[test]
    fn a_stalled_watcher_loses_events_and_blocks_nobody() {
        let hub = LiveHub::default();
        let mut stalled = hub.watch(1);
        let mut reader = hub.watch(1);
        for i in 0..(FEED_EVENTS as u64 * 3) {
            assert!(hub.output(chunk(1, i, "x")));
            assert!(matches!(reader.try_recv(), Some(Ok(FeedEvent::Output(_)))));
        }
        assert_eq!(
            stalled.try_recv(),
            Some(Err(Missed::Lagged(FEED_EVENTS as u64 * 2)))
        );
        assert!(matches!(stalled.try_recv(), Some(Ok(FeedEvent::Output(_)))));
        // Bounded in bytes too: 64 KiB pieces, of which the ring keeps 4 MiB.
        let big = "y".repeat(64 << 10);
        for i in 0..200u64 {
            assert!(hub.output(chunk(1, i << 16, &big)));
        }
        let feed = hub.feed(1).unwrap();
        let st = feed.state.lock().unwrap();
        assert!(st.ring_bytes <= FEED_RING_BYTES, "{}", st.ring_bytes);
        assert_eq!(st.ring.len(), FEED_RING_BYTES / (64 << 10));
    }

    /// A watcher waiting for an event wakes when one comes.
    #[tokio::test]
    async fn a_waiting_watcher_wakes_for_the_next_event() {
        let hub = Arc::new(LiveHub::default());
        let mut w = hub.watch(1);
        let waiting = tokio::spawn(async move { w.recv().await });
        tokio::task::yield_now().await;
        hub.changed(1);
        assert!(matches!(waiting.await.unwrap(), Ok(FeedEvent::Changed)));
    }
}
