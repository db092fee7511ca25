//! [`StateMachineStore`]: applies committed commands to the replica (task table and memory
//! store) and keeps it durable through checkpoints.
//!
//! # Layout
//!
//! In memory: the [`TaskTable`] (live tasks, indexes, the changes since the last
//! checkpoint) and the [`MemoryStore`]. On disk: the [`CheckpointStore`]
//! (`raft/state.redb`), the state at the last checkpoint, finished tasks included. A
//! checkpoint is what openraft calls building a snapshot: the table's changes are taken
//! out (in O(changed tasks), under the lock) and written to the store in one fsynced
//! transaction *outside* the lock, while entries keep being applied; the table reads
//! them from the checkpoint in flight until it is written. After a restart the replica
//! is the last checkpoint (live tasks and the memory store are loaded, finished tasks
//! stay on disk) plus the committed log after it, which openraft re-applies because
//! [`RedbLogStore`](super::RedbLogStore) persists the committed log id. So a restart
//! costs the live state plus one checkpoint interval of log, whatever the history.
//!
//! # Snapshots
//!
//! The snapshot openraft sends to a lagging follower is a dump ([`super::dump`]) of the
//! last checkpoint, read from a redb read transaction that stays at that checkpoint,
//! written to `snapshot-<term>-<index>.dump` the first time a follower needs it and sent
//! in [`SNAPSHOT_CHUNK`](crate::limits::SNAPSHOT_CHUNK) pieces. A follower receives it
//! into a file, builds a complete new store from it next to the current one (checked
//! whole: framing, counts, checksum), renames it into place and loads it. Neither side
//! holds the state in memory whole.
//!
//! # Locks
//!
//! Order: checkpoint mutex, then memory store, then task table. Task reads and dispatch
//! take only the table lock, memory reads only the memory lock. Applying an entry takes
//! the memory lock only if it holds memory ops, and then the table lock only for the
//! table's part of each op, so a long memory write (an HNSW insert of a large batch)
//! never holds the lock task reads and dispatch need; graph rebuilds run on threads of
//! their own, outside every lock (`swarm_memory`'s background rebuilds). Nothing holds a
//! lock across an `.await`.

// The error type of every storage path is openraft's `StorageError`, fixed by its traits;
// errors are the cold path, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::cell::OnceCell;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use anyhow::Context as _;
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use swarm_proto::api::{TaskOrder, TaskState};
use swarm_proto::TaskId;
use tokio::sync::watch;

use super::checkpoint::{CheckpointStore, Membership, StoreReader, STATE_DB_FILE};
use super::snapshot_data::SnapshotData;
use super::types::{Entry, LogId, NodeAddr, NodeId, TypeConfig};
use crate::state::{
    apply_command, apply_memory_command, Archive, ArchiveError, CommandResponse, Lookup, Task,
    TaskTable,
};
use swarm_memory::{MemoryStore, StoreConfig};

/// The snapshot file of releases before the checkpoint store (format 1, bincode); its
/// presence without a checkpoint store is refused.
pub const OLD_SNAPSHOT_FILE: &str = "snapshot.bin";
const INSTALL_FILE: &str = "state.redb.install";

/// Snapshot metadata of this cluster's type configuration.
pub type SnapshotMetaOf = SnapshotMeta<NodeId, NodeAddr>;

type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// The task table with the log position it reflects, behind one lock so that a
/// checkpoint (or a reader) never pairs a table with the wrong `last_applied`.
struct Applied {
    table: TaskTable,
    last_applied: Option<LogId>,
    last_membership: Membership,
}

/// The task table of a locked [`Applied`].
struct TableMut<'a>(RwLockWriteGuard<'a, Applied>);

impl Deref for TableMut<'_> {
    type Target = TaskTable;
    fn deref(&self) -> &TaskTable {
        &self.0.table
    }
}

impl std::ops::DerefMut for TableMut<'_> {
    fn deref_mut(&mut self) -> &mut TaskTable {
        &mut self.0.table
    }
}

/// What the last checkpoint was, for openraft and for backups.
#[derive(Default)]
struct Current {
    meta: Option<SnapshotMetaOf>,
    /// A read view that stays at that checkpoint.
    view: Option<Arc<StoreReader>>,
    /// The dump file of that checkpoint, once built.
    dump: Option<PathBuf>,
}

struct SmInner {
    dir: PathBuf,
    /// The checkpoint store; replaced whole when a snapshot is installed.
    store: RwLock<Arc<CheckpointStore>>,
    applied: RwLock<Applied>,
    memory: RwLock<MemoryStore>,
    memory_config: StoreConfig,
    applied_tx: watch::Sender<Option<u64>>,
    /// Held while a checkpoint is taken or a snapshot installed (one at a time).
    current: Mutex<Current>,
    /// Held while a dump file is built (one at a time; later readers reuse it).
    dumping: Mutex<()>,
    /// Makes names of received snapshot files unique.
    seq: AtomicU64,
    /// Whether a snapshot is arriving or being installed (see [`Receiving`]).
    receiving: Arc<watch::Sender<Receiving>>,
    /// Checkpoints, dumps and installs run on the calling thread (deterministic
    /// simulations) instead of tokio's blocking pool.
    inline: bool,
}

/// What a follower is receiving from the leader: a snapshot (when its last chunk arrived,
/// whether the install runs) or large AppendEntries (how many are under way, when the
/// last one was answered). The node does not campaign meanwhile: the leader's replication
/// to it sends nothing else until they are answered, so its election timer runs out
/// although the leader is alive, and a follower that campaigned would depose the leader
/// and restart the transfer, over and over.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Receiving {
    pub last_chunk: Option<tokio::time::Instant>,
    pub installing: bool,
    /// Large AppendEntries being read or appended now.
    pub appends: u32,
    /// When the last large AppendEntries was answered.
    pub last_append: Option<tokio::time::Instant>,
}

impl Receiving {
    /// Busy while installing or appending, within `snapshot_quiet` of a snapshot's last
    /// chunk, or within `append_quiet` of a large append's answer.
    pub fn busy(
        &self,
        snapshot_quiet: std::time::Duration,
        append_quiet: std::time::Duration,
    ) -> bool {
        self.installing
            || self.appends > 0
            || self
                .last_chunk
                .is_some_and(|t| t.elapsed() < snapshot_quiet)
            || self.last_append.is_some_and(|t| t.elapsed() < append_quiet)
    }
}

/// Lets the Raft server mark large AppendEntries as under way (see [`Receiving`]).
#[derive(Clone, Default)]
pub struct Arrivals(Arc<watch::Sender<Receiving>>);

impl Arrivals {
    /// Count one large append as under way until the guard is dropped.
    pub fn append(&self) -> AppendUnderWay {
        self.0.send_modify(|r| r.appends += 1);
        AppendUnderWay(self.0.clone())
    }
}

/// One large append under way (see [`Arrivals::append`]).
pub struct AppendUnderWay(Arc<watch::Sender<Receiving>>);

impl Drop for AppendUnderWay {
    fn drop(&mut self) {
        self.0.send_modify(|r| {
            r.appends = r.appends.saturating_sub(1);
            r.last_append = Some(tokio::time::Instant::now());
        });
    }
}

/// Gives the heap pages freed since the last call back to the system. A checkpoint
/// frees a whole layer of finished tasks at once (tens of megabytes under load), and
/// glibc's allocator keeps such pages in its arenas, so without this the resident set
/// holds the high-water mark of every layer (measured at 1M tasks: 100–130 MiB given
/// back). Costs a walk of the allocator's free lists, once per checkpoint.
#[allow(unsafe_code)]
fn return_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas; it
    // takes the arenas' locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn recover<T>(r: Result<T, PoisonError<T>>) -> T {
    r.unwrap_or_else(PoisonError::into_inner)
}

impl SmInner {
    fn write_applied(&self) -> RwLockWriteGuard<'_, Applied> {
        recover(self.applied.write())
    }

    fn read_applied(&self) -> RwLockReadGuard<'_, Applied> {
        recover(self.applied.read())
    }

    fn store(&self) -> Arc<CheckpointStore> {
        recover(self.store.read()).clone()
    }

    fn current(&self) -> MutexGuard<'_, Current> {
        recover(self.current.lock())
    }

    /// Take a checkpoint: see the module docs. Returns its snapshot meta.
    fn checkpoint(&self) -> anyhow::Result<Option<SnapshotMetaOf>> {
        let mut current = self.current();
        let store = self.store();
        let (delta, applied, membership, memory_bytes) = {
            // The memory lock first: while it is held no memory op applies, so the bytes
            // taken here match the table whatever it applies meanwhile.
            let memory = recover(self.memory.read());
            let changed = self.read_applied().table.has_memory_changes();
            let bytes = match changed {
                true => Some(
                    memory
                        .snapshot_bytes()
                        .map_err(|e| anyhow::anyhow!("encoding the memory store: {e}"))?,
                ),
                false => None,
            };
            let mut applied = self.write_applied();
            let delta = applied.table.begin_checkpoint()?;
            (
                delta,
                applied.last_applied,
                applied.last_membership.clone(),
                bytes,
            )
        };
        let started = std::time::Instant::now();
        let written = store.write(&delta, applied, &membership, memory_bytes.as_deref());
        drop(delta);
        if let Err(e) = written {
            self.write_applied().table.checkpoint_failed();
            return Err(e.context("writing the checkpoint"));
        }
        let view = Arc::new(store.reader()?);
        self.write_applied().table.checkpoint_written();
        return_freed_heap();
        let took = started.elapsed().as_secs_f64();
        metrics::histogram!("swarm_checkpoint_seconds").record(took);
        metrics::gauge!("swarm_checkpoint_last_seconds").set(took);
        let meta = snapshot_meta(applied, membership);
        self.replace_current(&mut current, Some(meta.clone()), Some(view));
        Ok(Some(meta))
    }

    /// Point at a new checkpoint; the old one's dump file goes.
    fn replace_current(
        &self,
        current: &mut Current,
        meta: Option<SnapshotMetaOf>,
        view: Option<Arc<StoreReader>>,
    ) {
        if current.meta.as_ref().map(|m| &m.snapshot_id) != meta.as_ref().map(|m| &m.snapshot_id) {
            if let Some(old) = current.dump.take() {
                // Senders still reading it keep their open file.
                let _ = fs::remove_file(old);
            }
        }
        current.meta = meta;
        current.view = view;
    }

    /// The current snapshot, its bytes built on first read.
    fn current_snapshot(self: &Arc<Self>) -> Option<Snapshot<TypeConfig>> {
        let current = self.current();
        let meta = current.meta.clone()?;
        let view = current.view.clone()?;
        drop(current);
        // A weak reference: a snapshot held on to (by a replication task) must not keep
        // the whole state machine alive.
        let inner = Arc::downgrade(self);
        let id = meta.snapshot_id.clone();
        let build = Box::new(move || match inner.upgrade() {
            Some(inner) => inner.dump_file(&id, &view),
            None => Err(io::Error::other("the state machine has shut down")),
        });
        Some(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::deferred(build, self.inline)),
        })
    }

    /// The dump of checkpoint `id` as a file opened for reading, built if needed.
    fn dump_file(&self, id: &str, view: &StoreReader) -> io::Result<File> {
        let _one_at_a_time = recover(self.dumping.lock());
        let path = self.dir.join(format!("snapshot-{id}.dump"));
        if let Ok(f) = File::open(&path) {
            return Ok(f);
        }
        let tmp = path.with_extension("dump.tmp");
        let started = std::time::Instant::now();
        let file = File::create(&tmp)?;
        let bytes = view
            .write_dump(BufWriter::with_capacity(1 << 20, file))
            .map_err(|e| io::Error::other(format!("{e:#}")))?;
        fs::rename(&tmp, &path)?;
        tracing::info!(snapshot = id, bytes, elapsed = ?started.elapsed(), "snapshot dump written");
        let mut current = self.current();
        if current.meta.as_ref().is_some_and(|m| m.snapshot_id == id) {
            current.dump = Some(path.clone());
        } else {
            // A newer checkpoint came meanwhile: this file is nobody's to clean up later.
            let f = File::open(&path);
            let _ = fs::remove_file(&path);
            return f;
        }
        File::open(&path)
    }

    /// Install a snapshot received into `path`: build a new store from it, then swap.
    fn install(&self, meta: &SnapshotMetaOf, path: &Path) -> anyhow::Result<()> {
        self.receiving.send_modify(|r| r.installing = true);
        let result = self.install_now(meta, path);
        self.receiving.send_modify(|r| {
            r.installing = false;
            r.last_chunk = Some(tokio::time::Instant::now());
        });
        result
    }

    fn install_now(&self, meta: &SnapshotMetaOf, path: &Path) -> anyhow::Result<()> {
        let mut current = self.current();
        let install = self.dir.join(INSTALL_FILE);
        let input = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let started = std::time::Instant::now();
        let (store, header) = CheckpointStore::build_from_dump(
            &install,
            io::BufReader::with_capacity(1 << 20, input),
        )
        .context("the snapshot does not load")?;
        anyhow::ensure!(
            header.applied == meta.last_log_id,
            "the snapshot holds the state at {:?}, its metadata says {:?}",
            header.applied,
            meta.last_log_id
        );
        let loaded = store.load().context("loading the installed snapshot")?;
        let memory = match loaded.memory {
            Some(m) => m,
            None => MemoryStore::new(self.memory_config.clone())
                .map_err(|e| anyhow::anyhow!("creating the memory store: {e}"))?,
        };
        drop(store);
        let live = self.dir.join(STATE_DB_FILE);
        fs::rename(&install, &live)
            .with_context(|| format!("renaming {} to {}", install.display(), live.display()))?;
        sync_dir(&self.dir)?;
        let store = Arc::new(CheckpointStore::open(&live)?);
        let view = Arc::new(store.reader()?);
        {
            let mut mem = recover(self.memory.write());
            let mut applied = self.write_applied();
            *recover(self.store.write()) = store;
            *mem = memory;
            applied.table = loaded.table;
            applied.last_applied = loaded.applied;
            applied.last_membership = loaded.membership;
        }
        self.applied_tx
            .send_replace(meta.last_log_id.map(|l| l.index));
        self.replace_current(&mut current, Some(meta.clone()), Some(view));
        let _ = fs::remove_file(path);
        tracing::info!(snapshot = %meta.snapshot_id, elapsed = ?started.elapsed(), "snapshot installed");
        Ok(())
    }
}

fn snapshot_meta(applied: Option<LogId>, membership: Membership) -> SnapshotMetaOf {
    SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
        // The state at a log position is the same on every replica, so is its dump.
        snapshot_id: match applied {
            Some(l) => format!("{}-{}", l.leader_id.term, l.index),
            None => "empty".into(),
        },
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))
}

/// The archive of one apply batch: a read view of the checkpoint store, opened on first
/// use.
struct LazyArchive {
    store: Arc<CheckpointStore>,
    reader: OnceCell<Result<StoreReader, ArchiveError>>,
}

impl LazyArchive {
    fn new(store: Arc<CheckpointStore>) -> Self {
        LazyArchive {
            store,
            reader: OnceCell::new(),
        }
    }

    fn get(&self) -> Result<&StoreReader, ArchiveError> {
        self.reader
            .get_or_init(|| self.store.reader())
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl Archive for LazyArchive {
    fn finished(&self, id: TaskId) -> Result<Option<Task>, ArchiveError> {
        self.get()?.finished(id)
    }

    fn key(&self, key: &str) -> Result<Option<TaskId>, ArchiveError> {
        self.get()?.key(key)
    }

    fn finished_after(
        &self,
        state: Option<TaskState>,
        after: TaskId,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        self.get()?.finished_after(state, after, limit)
    }

    fn finished_before(
        &self,
        state: Option<TaskState>,
        before: TaskId,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        self.get()?.finished_before(state, before, limit)
    }

    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<TaskId>, ArchiveError> {
        self.get()?.expired(now_ms, limit)
    }

    fn staged_memory(&self) -> Result<Vec<Vec<u8>>, ArchiveError> {
        self.get()?.staged_memory()
    }
}

/// A read handle on the replica, for the API and the scheduler: reads do not go through
/// Raft (they see this node's applied state, which may lag the leader).
#[derive(Clone)]
pub struct TableHandle {
    inner: Arc<SmInner>,
    applied_rx: watch::Receiver<Option<u64>>,
}

/// A read lock on the task table. Holding it blocks the state machine from applying
/// entries, so keep it short.
pub struct TableGuard<'a>(RwLockReadGuard<'a, Applied>, &'a SmInner);

impl Deref for TableGuard<'_> {
    type Target = TaskTable;
    fn deref(&self) -> &TaskTable {
        &self.0.table
    }
}

impl TableGuard<'_> {
    /// The id of the last log entry reflected in the table.
    pub fn last_applied(&self) -> Option<LogId> {
        self.0.last_applied
    }

    /// The input the next attempt of `task` receives (its graph parents' outputs are
    /// read from the table and the checkpoint store of this moment).
    pub fn input_of(&self, task: &Task) -> Result<Vec<u8>, ArchiveError> {
        // The store is taken under the table lock: an install swaps both under it.
        let archive = LazyArchive::new(self.1.store());
        self.0.table.input_of(task, &archive)
    }
}

impl TableHandle {
    /// Read the replica's memory store (vector collections and ReasoningBank); keep `f`
    /// short. Does not block task reads.
    ///
    /// A memory write being applied (an HNSW insert of a large batch) can hold the store
    /// for seconds. On a runtime worker thread such a wait would stall every task on it
    /// — QUIC connections among them, which then time out — so if the store is busy the
    /// wait moves off the runtime (`block_in_place`); uncontended reads take the fast path.
    pub fn memory<R>(&self, f: impl FnOnce(&MemoryStore) -> R) -> R {
        use std::sync::TryLockError;
        match self.inner.memory.try_read() {
            Ok(memory) => return f(&memory),
            Err(TryLockError::Poisoned(p)) => return f(&p.into_inner()),
            Err(TryLockError::WouldBlock) => {}
        }
        let read = move || {
            let memory = recover(self.inner.memory.read());
            f(&memory)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(read)
            }
            _ => read(),
        }
    }

    /// Lock the table for reading.
    pub fn read(&self) -> TableGuard<'_> {
        TableGuard(self.inner.read_applied(), &self.inner)
    }

    /// Run `f` on the table with the archive of the same moment.
    fn with_archive<R>(
        &self,
        f: impl FnOnce(&TaskTable, &dyn Archive) -> Result<R, ArchiveError>,
    ) -> Result<R, ArchiveError> {
        let guard = self.inner.read_applied();
        // The store is taken under the table lock: an install swaps both under it.
        let archive = LazyArchive::new(self.inner.store());
        f(&guard.table, &archive)
    }

    /// One task, wherever it is (live, recently finished, or in the checkpoint store).
    pub fn lookup(&self, id: TaskId) -> Result<Lookup, ArchiveError> {
        self.with_archive(|t, a| t.lookup(id, a))
    }

    /// Up to `limit` tasks after `after` in `order` (ids above it ascending, below it
    /// descending; `None`: from the first, or the newest), optionally in `state` (see
    /// [`TaskTable::list`]). Holds the table lock for this one call.
    pub fn list(
        &self,
        state: Option<TaskState>,
        order: TaskOrder,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<Arc<Task>>, ArchiveError> {
        self.with_archive(|t, a| t.list(state, order, after, limit, a))
    }

    /// The retained task submitted under an idempotency key.
    pub fn by_idempotency_key(&self, key: &str) -> Result<Option<TaskId>, ArchiveError> {
        self.with_archive(|t, a| t.by_idempotency_key(key, a))
    }

    /// Finished tasks whose retention ended by `now_ms` (purge candidates), at most
    /// `limit`.
    pub fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<TaskId>, ArchiveError> {
        self.with_archive(|t, a| {
            let mut ids = t.expired_in_memory(now_ms, limit);
            if ids.len() < limit {
                ids.extend(t.expired_in_archive(now_ms, limit - ids.len(), a)?);
            }
            ids.sort_unstable();
            ids.dedup();
            Ok(ids)
        })
    }

    /// The id of the last log entry applied to the table.
    pub fn last_applied(&self) -> Option<LogId> {
        self.read().last_applied()
    }

    /// A receiver of the last applied log index, updated after every applied batch and every
    /// installed snapshot.
    pub fn subscribe_applied(&self) -> watch::Receiver<Option<u64>> {
        self.applied_rx.clone()
    }

    /// Take the task-table events produced by entries applied since the last call (see
    /// [`crate::state::TableEvent`]). One consumer, the node's applied loop, drains them.
    pub fn take_events(&self) -> Vec<crate::state::TableEvent> {
        self.inner.write_applied().table.take_events()
    }

    /// Wait until the entry at `index` (or a later one) has been applied. Errors only when the
    /// state machine has been dropped.
    pub async fn wait_applied(&self, index: u64) -> Result<(), watch::error::RecvError> {
        let mut rx = self.applied_rx.clone();
        rx.wait_for(|applied| applied.is_some_and(|a| a >= index))
            .await
            .map(|_| ())
    }

    /// The last checkpoint: its snapshot meta and a read view that stays at it (for
    /// backups: write it with [`StoreReader::write_dump`]).
    pub fn checkpoint(&self) -> Option<(SnapshotMetaOf, Arc<StoreReader>)> {
        let c = self.inner.current();
        Some((c.meta.clone()?, c.view.clone()?))
    }

    /// Bytes of changes held in memory since the last checkpoint, roughly.
    pub fn changes_bytes(&self) -> usize {
        self.read().changes_bytes()
    }
}

/// The Raft state machine: the replica plus its checkpoint store. Cheap to clone; clones
/// share everything (the snapshot builder is such a clone).
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<SmInner>,
}

impl StateMachineStore {
    /// Open the state machine in `dir`: load the last checkpoint if there is one, else
    /// start empty. Blocking. A store that is corrupt or of another format is an error
    /// (the node must not silently start from an empty table).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(dir, StoreConfig::default())
    }

    /// [`StateMachineStore::open`], creating an empty memory store with `memory` (a
    /// checkpoint brings its own config).
    pub fn open_with(dir: &Path, memory: StoreConfig) -> anyhow::Result<Self> {
        Self::open_mode(dir, memory, false)
    }

    /// [`StateMachineStore::open_with`] in inline mode: checkpoints, dumps and installs
    /// run on the calling thread (deterministic simulations).
    pub fn open_inline(dir: &Path, memory: StoreConfig) -> anyhow::Result<Self> {
        Self::open_mode(dir, memory, true)
    }

    fn open_mode(dir: &Path, memory_config: StoreConfig, inline: bool) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating raft data dir {}", dir.display()))?;
        let path = dir.join(STATE_DB_FILE);
        if !path.exists() && dir.join(OLD_SNAPSHOT_FILE).exists() {
            anyhow::bail!(
                "{} holds a snapshot in format 1 (bincode), written by a swarm release \
                 before the checkpoint store, which this release cannot read. Keep running \
                 the release that wrote it, or move the data dir aside and start this node \
                 empty (a cluster member then catches up from its peers)",
                dir.display()
            );
        }
        // Leftovers of an interrupted install or dump: the store in place is the truth.
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            let stale = name == INSTALL_FILE
                || name.ends_with(".dump")
                || name.ends_with(".dump.tmp")
                || name.starts_with("incoming-");
            if stale {
                fs::remove_file(dir.join(&*name))
                    .with_context(|| format!("removing stale {name}"))?;
            }
        }
        let store = CheckpointStore::open(&path)?;
        let loaded = store
            .load()
            .with_context(|| format!("loading the checkpoint in {}", path.display()))?;
        let memory = match loaded.memory {
            Some(m) => m,
            None => MemoryStore::new(memory_config.clone()).context("creating the memory store")?,
        };
        let meta = loaded
            .checkpointed
            .then(|| snapshot_meta(loaded.applied, loaded.membership.clone()));
        let view = Arc::new(store.reader()?);
        let (applied_tx, _) = watch::channel(loaded.applied.map(|l| l.index));
        Ok(Self {
            inner: Arc::new(SmInner {
                dir: dir.to_path_buf(),
                store: RwLock::new(Arc::new(store)),
                applied: RwLock::new(Applied {
                    table: loaded.table,
                    last_applied: loaded.applied,
                    last_membership: loaded.membership,
                }),
                memory: RwLock::new(memory),
                memory_config,
                applied_tx,
                current: Mutex::new(Current {
                    meta,
                    view: Some(view),
                    dump: None,
                }),
                dumping: Mutex::new(()),
                seq: AtomicU64::new(0),
                receiving: Arc::new(watch::channel(Receiving::default()).0),
                inline,
            }),
        })
    }

    /// A read handle on the replica, shared with the API and the scheduler.
    pub fn table(&self) -> TableHandle {
        TableHandle {
            inner: self.inner.clone(),
            applied_rx: self.inner.applied_tx.subscribe(),
        }
    }

    /// A receiver of the last applied log index (see [`TableHandle::subscribe_applied`]).
    pub fn subscribe_applied(&self) -> watch::Receiver<Option<u64>> {
        self.inner.applied_tx.subscribe()
    }

    /// Whether a snapshot or a large append is arriving, as it changes.
    pub fn subscribe_receiving(&self) -> watch::Receiver<Receiving> {
        self.inner.receiving.subscribe()
    }

    /// The handle with which the Raft server marks large appends as under way.
    pub fn arrivals(&self) -> Arrivals {
        Arrivals(self.inner.receiving.clone())
    }

    /// Meta of the last checkpoint, if any.
    pub fn snapshot_meta(&self) -> Option<SnapshotMetaOf> {
        self.inner.current().meta.clone()
    }

    /// Run blocking storage work off the async executor (in place in inline mode).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Arc<SmInner>) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        if self.inner.inline {
            return f(&self.inner);
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| {
                StorageError::from(StorageIOError::write_state_machine(AnyError::new(&e)))
            })?
    }
}

fn sm_write_err(e: anyhow::Error) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(format!("{e:#}"))).into()
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        self.blocking(|inner| {
            inner.checkpoint().map_err(|e| {
                StorageError::from(StorageIOError::write_snapshot(
                    None,
                    AnyError::error(format!("{e:#}")),
                ))
            })?;
            inner.current_snapshot().ok_or_else(|| {
                StorageIOError::write_snapshot(
                    None,
                    AnyError::error("the checkpoint just written is not current"),
                )
                .into()
            })
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId>, StoredMembership<NodeId, NodeAddr>)> {
        let applied = self.inner.read_applied();
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<CommandResponse>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let inner = &self.inner;
        let archive = LazyArchive::new(inner.store());
        let mut responses = Vec::new();
        let mut last_index = None;
        for entry in entries {
            // Lock per entry: each entry is applied atomically, and readers get a chance to
            // run between entries of a long batch.
            let response = match entry.payload {
                EntryPayload::Blank => {
                    inner.write_applied().last_applied = Some(entry.log_id);
                    CommandResponse::default()
                }
                EntryPayload::Normal(ref cmd) => {
                    let result = if cmd.touches_memory() {
                        // The memory store for the whole entry (a checkpoint takes it
                        // first, so it never sees half an entry), the table only for
                        // the table's part of each op.
                        let mut memory = recover(inner.memory.write());
                        inner.write_applied().last_applied = Some(entry.log_id);
                        apply_memory_command(
                            || TableMut(inner.write_applied()),
                            &mut memory,
                            cmd,
                            &archive,
                        )
                    } else {
                        let mut applied = inner.write_applied();
                        applied.last_applied = Some(entry.log_id);
                        apply_command(&mut applied.table, cmd, &archive)
                    };
                    result.map_err(|e| {
                        StorageError::from(StorageIOError::apply(
                            entry.log_id,
                            AnyError::error(e.to_string()),
                        ))
                    })?
                }
                EntryPayload::Membership(ref membership) => {
                    let mut applied = inner.write_applied();
                    applied.last_membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    applied.last_applied = Some(entry.log_id);
                    CommandResponse::default()
                }
            };
            responses.push(response);
            last_index = Some(entry.log_id.index);
        }
        if last_index.is_some() {
            inner.applied_tx.send_replace(last_index);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<SnapshotData>> {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.inner.dir.join(format!("incoming-{n}.dump"));
        // Only the signal, not the state machine: a transfer openraft abandons may be
        // held for a while, and must not keep the store open.
        let receiving = self.inner.receiving.clone();
        let note =
            move || receiving.send_modify(|r| r.last_chunk = Some(tokio::time::Instant::now()));
        note();
        let data = SnapshotData::receiving(&path, self.inner.inline)
            .await
            .map_err(|e| {
                StorageError::from(StorageIOError::write_snapshot(None, AnyError::new(&e)))
            })?
            .on_write(std::sync::Arc::new(note));
        Ok(Box::new(data))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf,
        mut snapshot: Box<SnapshotData>,
    ) -> StoreResult<()> {
        let sig = Some(meta.signature());
        let write_err = |e: String| {
            StorageError::from(StorageIOError::write_snapshot(
                sig.clone(),
                AnyError::error(e),
            ))
        };
        if snapshot.path().is_none() {
            // Not a received file (a snapshot built here, handed back): copy it into one.
            let mut received = self.begin_receiving_snapshot().await?;
            tokio::io::AsyncSeekExt::seek(&mut *snapshot, io::SeekFrom::Start(0))
                .await
                .map_err(|e| write_err(e.to_string()))?;
            tokio::io::copy(&mut *snapshot, &mut *received)
                .await
                .map_err(|e| write_err(e.to_string()))?;
            snapshot = received;
        }
        snapshot
            .sync()
            .await
            .map_err(|e| write_err(e.to_string()))?;
        let path = snapshot
            .path()
            .map(Path::to_path_buf)
            .ok_or_else(|| write_err("a received snapshot has no file".into()))?;
        drop(snapshot);
        let meta = meta.clone();
        let result = self
            .blocking(move |inner| inner.install(&meta, &path).map_err(sm_write_err))
            .await;
        result.map_err(|e| write_err(e.to_string()))
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.inner.current_snapshot())
    }
}
