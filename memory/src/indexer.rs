//! The thread that inserts a collection's points into its HNSW graph, off the op sequence.
//!
//! An HNSW insert costs an `ef_construction` search (milliseconds at a few hundred
//! dimensions), so a batch of a few thousand points took seconds inside the op that wrote
//! it, and every later op of the replicated log — task submits and results included —
//! waited behind it. Here the op only appends the vectors to the collection and hands a
//! copy to this thread, which inserts them in slot order, alone, into a graph it shares
//! read-only with the collection.
//!
//! Searches must not depend on how far a replica's thread has got (consolidation, a
//! replicated write, draws its candidates from a search). So what they see moves only at
//! ops: the thread takes flat copies of the graph ([`FlatGraph`]) at *copy points*, slot
//! counts that are a function of the insert sequence alone (a first one, then each time
//! [`delta_limit`] more slots have been inserted), and a copy is used only from the op that
//! names it ([`crate::MemoryOp::AdvanceIndex`], proposed by the leader once its own thread
//! has taken it). Until a replica's thread reaches the copy the log names, its searches
//! scan exactly (never worse answers, only slower), and a consolidation waits for it.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use hnsw_rs::hnsw::Hnsw;

use crate::graph::FlatGraph;
use crate::kernel::IndexDistance;

/// The graph type every collection builds.
pub(crate) type Graph = Hnsw<'static, f32, IndexDistance>;

/// Copies a thread keeps that no op has named yet; it waits for an op before it inserts
/// more (the copies of a large graph are tens of MB each).
const MAX_READY_COPIES: usize = 3;

/// Most vectors in one message to the thread.
const JOB_VECTORS: usize = 4096;

/// Most slots searched by exact scan after the graph copy before the next copy point.
pub(crate) fn delta_limit(slots: usize) -> usize {
    (slots / 32).clamp(128, 2048)
}

/// The copy point after the one at `from` slots.
pub(crate) fn next_copy_point(from: usize) -> usize {
    let mut n = from + 1;
    while n - from < delta_limit(n) {
        n += 1;
    }
    n
}

/// Whether `to` is a copy point of the sequence that continues from the copy point `from`.
pub(crate) fn is_copy_point_after(from: usize, to: usize) -> bool {
    let mut p = from;
    while p < to {
        p = next_copy_point(p);
    }
    p == to
}

/// What a collection and its indexing thread share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a copy is taken, the target moves, slots are queued, or on stop.
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    /// Slots handed to the thread so far.
    queued: usize,
    /// Slots inserted into the graph so far.
    indexed: usize,
    /// The copy searches must use (replicated: set by ops, recorded in snapshots).
    target: usize,
    /// The copy in use; covers `target` slots once this replica has taken that copy.
    installed: Arc<FlatGraph>,
    /// Copies taken and not yet named by an op, by increasing slots, all past `target`.
    ready: VecDeque<Arc<FlatGraph>>,
    /// The collection is gone or rebuilt: the thread stops.
    stop: bool,
}

impl State {
    /// Drops copies behind the target and installs the target's copy if taken.
    fn settle(&mut self) {
        while let Some(front) = self.ready.front() {
            if front.slots() > self.target {
                break;
            }
            let copy = self.ready.pop_front().expect("front exists");
            if copy.slots() == self.target {
                self.installed = copy;
            }
        }
    }
}

/// What a search may use: the graph copy if this replica has taken the one the log names
/// (the slots after it are scanned exactly), else `None` (scan everything exactly).
#[derive(Debug)]
pub(crate) struct SearchView {
    pub copy: Option<Arc<FlatGraph>>,
}

/// The inserting side: the graph, the copy-point rule, and where copies go.
struct Inserter {
    graph: Arc<Graph>,
    dimension: usize,
    max_degree: usize,
    /// Slots inserted.
    count: usize,
    /// The next copy point.
    next_copy: usize,
    shared: Arc<Shared>,
}

impl Inserter {
    /// Inserts slot-major `vectors` as the next slots, taking copies at copy points.
    /// Returns early (false) if told to stop.
    fn insert(&mut self, vectors: &[f32]) -> bool {
        for v in vectors.chunks_exact(self.dimension.max(1)) {
            if self.lock().stop {
                return false;
            }
            self.graph.insert_slice((v, self.count));
            self.count += 1;
            if self.count == self.next_copy {
                let copy = Arc::new(FlatGraph::extract(&self.graph, self.count, self.max_degree));
                self.next_copy = next_copy_point(self.count);
                let mut st = self.lock();
                st.indexed = self.count;
                if copy.slots() > st.target {
                    st.ready.push_back(copy);
                    st.settle();
                } else if copy.slots() == st.target {
                    st.installed = copy;
                }
                drop(st);
                self.shared.changed.notify_all();
            } else if self.count % 64 == 0 {
                self.lock().indexed = self.count;
            }
        }
        self.lock().indexed = self.count;
        self.shared.changed.notify_all();
        true
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The thread's loop: insert what arrives, pausing while too many copies wait.
    fn run(mut self, jobs: Receiver<Vec<f32>>) {
        while let Ok(vectors) = jobs.recv() {
            if !self.insert(&vectors) {
                return;
            }
            let mut st = self.lock();
            while st.ready.len() >= MAX_READY_COPIES && !st.stop {
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if st.stop {
                return;
            }
        }
    }
}

/// A collection's graph and the thread that inserts into it.
pub(crate) struct Indexer {
    graph: Arc<Graph>,
    shared: Arc<Shared>,
    /// To the thread; `None` if none could be started (inserts then run in the op).
    jobs: Option<Sender<Vec<f32>>>,
    /// Used when there is no thread.
    inline: Option<Inserter>,
    dimension: usize,
}

impl std::fmt::Debug for Indexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Indexer")
            .field("queued", &st.queued)
            .field("indexed", &st.indexed)
            .field("target", &st.target)
            .field("installed", &st.installed.slots())
            .field("ready", &st.ready.len())
            .finish()
    }
}

impl Indexer {
    /// An indexer for an empty `graph` whose first copy is taken at `first_copy` slots,
    /// which is also the copy searches use until an op names a later one (0: the empty
    /// copy, in use at once). `name` labels the thread.
    pub(crate) fn start(
        name: &str,
        graph: Graph,
        dimension: usize,
        max_degree: usize,
        first_copy: usize,
    ) -> Self {
        let graph = Arc::new(graph);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queued: 0,
                indexed: 0,
                target: first_copy,
                installed: Arc::new(FlatGraph::default()),
                ready: VecDeque::new(),
                stop: false,
            }),
            changed: Condvar::new(),
        });
        let inserter = || Inserter {
            graph: graph.clone(),
            dimension,
            max_degree,
            count: 0,
            next_copy: if first_copy == 0 {
                next_copy_point(0)
            } else {
                first_copy
            },
            shared: shared.clone(),
        };
        let (tx, rx) = mpsc::channel::<Vec<f32>>();
        let on_thread = inserter();
        // A thread name may not hold a NUL (`Builder::name` panics on one); whatever
        // reached here, the name is only for humans.
        let thread_name: String = format!("hnsw-index-{name}")
            .chars()
            .filter(|c| *c != '\0')
            .collect();
        let spawned = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || on_thread.run(rx));
        let (jobs, inline) = match spawned {
            Ok(_) => (Some(tx), None),
            Err(e) => {
                tracing::warn!(error = %e, collection = name, "no indexing thread: inserting in the op");
                (None, Some(inserter()))
            }
        };
        Indexer {
            graph,
            shared,
            jobs,
            inline,
            dimension,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The graph (complete up to [`Indexer::indexed`] slots; others may be inserting).
    pub(crate) fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Hands slot-major `vectors` (whole vectors) over as the next slots, copied in
    /// parts of at most [`JOB_VECTORS`], so that a large hand-over (a restored collection)
    /// holds one part's copy at a time.
    pub(crate) fn push(&mut self, vectors: &[f32]) {
        let d = self.dimension.max(1);
        let count = vectors.len() / d;
        if count == 0 {
            return;
        }
        self.lock().queued += count;
        if let Some(inserter) = self.inline.as_mut() {
            inserter.insert(vectors);
            return;
        }
        let sent = self.jobs.as_ref().is_some_and(|tx| {
            vectors
                .chunks(JOB_VECTORS * d)
                .all(|part| tx.send(part.to_vec()).is_ok())
        });
        if !sent {
            // The thread is gone (it only stops when told to, or if an insert panicked):
            // nothing more will be indexed; searches stay exact past the last copy.
            tracing::error!("indexing thread gone: new points are searched exactly");
        }
    }

    /// What a search may use now.
    pub(crate) fn view(&self) -> SearchView {
        let st = self.lock();
        SearchView {
            copy: (st.installed.slots() == st.target).then(|| st.installed.clone()),
        }
    }

    /// The copy the log names (slots).
    pub(crate) fn target(&self) -> usize {
        self.lock().target
    }

    /// Slots inserted into the graph so far.
    pub(crate) fn indexed(&self) -> usize {
        self.lock().indexed
    }

    /// Slots handed over and not yet inserted.
    pub(crate) fn backlog(&self) -> usize {
        let st = self.lock();
        st.queued.saturating_sub(st.indexed)
    }

    /// The latest copy taken past the target, if any: what the leader names next.
    pub(crate) fn latest_ready(&self) -> Option<usize> {
        self.lock().ready.back().map(|c| c.slots())
    }

    /// Whether the copy the log names has been taken here.
    pub(crate) fn caught_up(&self) -> bool {
        let st = self.lock();
        st.installed.slots() == st.target
    }

    /// Names a later copy (an op did): searches use it from now on if this replica has
    /// taken it, else scan exactly until it does.
    pub(crate) fn advance(&self, slots: usize) {
        let mut st = self.lock();
        if slots <= st.target {
            return;
        }
        st.target = slots;
        st.settle();
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Waits until this replica has taken the copy the log names (a write that searches
    /// must see what every replica sees). Returns at once if it has; gives up (false) if
    /// the thread cannot get there (it stopped, or has fewer slots than the copy).
    pub(crate) fn wait_caught_up(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.installed.slots() == st.target {
                return true;
            }
            if st.stop || st.queued < st.target || self.inline.is_some() {
                return false;
            }
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Waits until every slot handed over is inserted, or the thread pauses for an op to
    /// name one of its copies (tests and benchmarks).
    pub(crate) fn wait_indexed(&self) {
        let mut st = self.lock();
        while st.indexed < st.queued && st.ready.len() < MAX_READY_COPIES && !st.stop {
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.changed.notify_all();
        // Dropping `jobs` ends the thread's `recv`; it is not joined (a drop of a large
        // collection must not wait for the insert under way).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_points_follow_the_delta_rule() {
        assert_eq!(next_copy_point(0), 128);
        assert_eq!(next_copy_point(128), 256);
        // From 4096 slots up the step is slots/32.
        let p = next_copy_point(8192);
        assert!(p - 8192 >= delta_limit(p) && p - 8193 < delta_limit(p - 1));
        assert_eq!(next_copy_point(1_000_000), 1_002_048);
        assert!(is_copy_point_after(0, 256));
        assert!(!is_copy_point_after(0, 200));
        assert!(is_copy_point_after(300, 300));
        assert!(is_copy_point_after(
            300,
            next_copy_point(next_copy_point(300))
        ));
    }
}
