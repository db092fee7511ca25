//! [`StateMachineStore`]: applies committed commands to the in-memory [`TaskTable`] and keeps
//! it durable through snapshot files.
//!
//! The table lives in memory only. After a restart it is rebuilt from the latest snapshot
//! (`<dir>/snapshot.bin`) plus the committed log entries after it, which openraft re-applies
//! because [`RedbLogStore`](super::RedbLogStore) persists the committed log id.
//!
//! # Snapshot file format
//!
//! ```text
//! magic "SWSNAP01" | meta_len u64 LE | meta (codec) | data_len u64 LE | data | checksum u64 LE
//! ```
//!
//! `data` is [`crate::state::encode_replica`] output (the task table and the memory
//! store), exactly the bytes openraft ships to a
//! lagging follower. The checksum covers everything before it, so a torn or bit-rotted file is
//! reported as corrupt instead of decoding into a wrong table. Files are replaced atomically:
//! write a temp file, fsync it, rename it over the old one, fsync the directory.

// The error type of every storage path is openraft's `StorageError`, fixed by its traits;
// errors are the cold path, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::fs::{self, File};
use std::io::{self, Cursor, Write as _};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use swarm_transport::codec::{decode, encode};
use tokio::sync::watch;

use super::types::{Entry, LogId, NodeAddr, NodeId, TypeConfig};
use crate::state::{apply_command, decode_replica, encode_replica, CommandResponse, TaskTable};
use swarm_memory::{MemoryStore, StoreConfig};

/// File name of the current snapshot inside the data directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_TMP_FILE: &str = "snapshot.bin.tmp";
const MAGIC: &[u8; 8] = b"SWSNAP03";

/// Snapshot metadata of this cluster's type configuration.
pub type SnapshotMetaOf = SnapshotMeta<NodeId, NodeAddr>;

type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// The table together with the log position it reflects, behind one lock so that a snapshot
/// (or a reader) never pairs a table with the wrong `last_applied`.
struct Applied {
    table: TaskTable,
    memory: MemoryStore,
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, NodeAddr>,
}

/// A read-only handle on the replicated task table, for the API and the scheduler: reads do not
/// go through Raft (they see this node's applied state, which may lag the leader).
#[derive(Clone)]
pub struct TableHandle {
    applied: Arc<RwLock<Applied>>,
    applied_rx: watch::Receiver<Option<u64>>,
}

/// A read lock on the task table. Holding it blocks the state machine from applying entries,
/// so keep it short.
pub struct TableGuard<'a>(RwLockReadGuard<'a, Applied>);

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
}

impl TableHandle {
    /// Read the replica's memory store (vector collections and ReasoningBank) under the
    /// same read lock as the table; keep `f` short.
    pub fn memory<R>(&self, f: impl FnOnce(&MemoryStore) -> R) -> R {
        let guard = self.applied.read().unwrap_or_else(PoisonError::into_inner);
        f(&guard.memory)
    }

    /// The whole replica (tasks and memory) encoded as one consistent cut, and the log
    /// position it reflects. Holds the read lock while encoding.
    pub fn encode_replica(&self) -> anyhow::Result<(Option<LogId>, Vec<u8>)> {
        let guard = self.applied.read().unwrap_or_else(PoisonError::into_inner);
        Ok((
            guard.last_applied,
            encode_replica(&guard.table, &guard.memory)?,
        ))
    }

    /// Lock the table for reading.
    pub fn read(&self) -> TableGuard<'_> {
        TableGuard(self.applied.read().unwrap_or_else(PoisonError::into_inner))
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
        self.applied
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .table
            .take_events()
    }

    /// Wait until the entry at `index` (or a later one) has been applied. Errors only when the
    /// state machine has been dropped.
    pub async fn wait_applied(&self, index: u64) -> Result<(), watch::error::RecvError> {
        let mut rx = self.applied_rx.clone();
        rx.wait_for(|applied| applied.is_some_and(|a| a >= index))
            .await
            .map(|_| ())
    }
}

/// The Raft state machine: the task table plus the snapshot file. Cheap to clone; clones share
/// everything (the snapshot builder is such a clone).
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<SmInner>,
}

struct SmInner {
    dir: PathBuf,
    applied: Arc<RwLock<Applied>>,
    applied_tx: watch::Sender<Option<u64>>,
    /// Held while `snapshot.bin` is written or read (in blocking threads); holds the meta of
    /// the snapshot on disk.
    snapshot: Mutex<Option<SnapshotMetaOf>>,
    /// Makes snapshot ids unique among snapshots built by this process.
    snapshot_seq: AtomicU64,
}

impl SmInner {
    fn write_applied(&self) -> RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_applied(&self) -> RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn snapshot_lock(&self) -> MutexGuard<'_, Option<SnapshotMetaOf>> {
        self.snapshot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn build_snapshot_blocking(&self) -> StoreResult<Snapshot<TypeConfig>> {
        // Encode under the read lock: the table must match `last_applied` exactly, and
        // encoding directly avoids a full clone of the table.
        let (data, last_log_id, last_membership) = {
            let applied = self.read_applied();
            let data = encode_replica(&applied.table, &applied.memory).map_err(|e| {
                StorageIOError::read_state_machine(AnyError::error(format!("{e:#}")))
            })?;
            (data, applied.last_applied, applied.last_membership.clone())
        };
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{millis}-{seq}", l.leader_id.term, l.index),
            None => format!("none-{millis}-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };

        let mut current = self.snapshot_lock();
        // A snapshot installed from the leader while this one was being encoded is newer:
        // never replace it with an older one.
        let stale = current
            .as_ref()
            .is_some_and(|c| c.last_log_id > meta.last_log_id);
        if !stale {
            write_snapshot_file(&self.dir, &meta, &data).map_err(|e| {
                StorageIOError::write_snapshot(
                    Some(meta.signature()),
                    AnyError::error(format!("{e:#}")),
                )
            })?;
            *current = Some(meta.clone());
        }
        drop(current);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }

    fn install_snapshot_blocking(&self, meta: SnapshotMetaOf, data: Vec<u8>) -> StoreResult<()> {
        let sig = || Some(meta.signature());
        // Validate before persisting: never make a snapshot we cannot load the current one.
        let (table, memory) = decode_replica(&data)
            .map_err(|e| StorageIOError::read_snapshot(sig(), AnyError::error(format!("{e:#}"))))?;
        {
            let mut current = self.snapshot_lock();
            write_snapshot_file(&self.dir, &meta, &data).map_err(|e| {
                StorageIOError::write_snapshot(sig(), AnyError::error(format!("{e:#}")))
            })?;
            *current = Some(meta.clone());
        }
        // Persisted; now swap the live state.
        {
            let mut applied = self.write_applied();
            applied.table = table;
            applied.memory = memory;
            applied.last_applied = meta.last_log_id;
            applied.last_membership = meta.last_membership.clone();
        }
        self.applied_tx
            .send_replace(meta.last_log_id.map(|l| l.index));
        Ok(())
    }

    fn current_snapshot_blocking(&self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let current = self.snapshot_lock();
        let Some(expected) = current.as_ref() else {
            return Ok(None);
        };
        let path = self.dir.join(SNAPSHOT_FILE);
        let (meta, data) = match read_snapshot_file(&path) {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Err(StorageIOError::read_snapshot(
                    Some(expected.signature()),
                    AnyError::error(format!("{} has disappeared", path.display())),
                )
                .into())
            }
            Err(e) => {
                return Err(StorageIOError::read_snapshot(
                    Some(expected.signature()),
                    AnyError::error(format!("{e:#}")),
                )
                .into())
            }
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

impl StateMachineStore {
    /// Open the state machine in `dir`: load `snapshot.bin` if there is one, else start from an
    /// empty table. Blocking. A snapshot file that is corrupt or does not decode is an error
    /// (the node must not silently start from an empty table).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(dir, StoreConfig::default())
    }

    /// [`StateMachineStore::open`], creating an empty memory store with `memory` (a
    /// snapshot on disk brings its own config).
    pub fn open_with(dir: &Path, memory: StoreConfig) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating raft data dir {}", dir.display()))?;
        // A leftover temp file is an interrupted snapshot write; the renamed file is the truth.
        match fs::remove_file(dir.join(SNAPSHOT_TMP_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).context("removing stale snapshot temp file")
            }
            _ => {}
        }

        let path = dir.join(SNAPSHOT_FILE);
        let (applied, meta) = match read_snapshot_file(&path)? {
            Some((meta, data)) => {
                let (table, memory) = decode_replica(&data)
                    .with_context(|| format!("decoding the replica state in {}", path.display()))?;
                let applied = Applied {
                    table,
                    memory,
                    last_applied: meta.last_log_id,
                    last_membership: meta.last_membership.clone(),
                };
                (applied, Some(meta))
            }
            None => (
                Applied {
                    table: TaskTable::new(),
                    memory: MemoryStore::new(memory).context("creating the memory store")?,
                    last_applied: None,
                    last_membership: StoredMembership::default(),
                },
                None,
            ),
        };
        let (applied_tx, _) = watch::channel(applied.last_applied.map(|l| l.index));
        Ok(Self {
            inner: Arc::new(SmInner {
                dir: dir.to_path_buf(),
                applied: Arc::new(RwLock::new(applied)),
                applied_tx,
                snapshot: Mutex::new(meta),
                snapshot_seq: AtomicU64::new(0),
            }),
        })
    }

    /// A read handle on the task table, shared with the API and the scheduler.
    pub fn table(&self) -> TableHandle {
        TableHandle {
            applied: self.inner.applied.clone(),
            applied_rx: self.inner.applied_tx.subscribe(),
        }
    }

    /// A receiver of the last applied log index (see [`TableHandle::subscribe_applied`]).
    pub fn subscribe_applied(&self) -> watch::Receiver<Option<u64>> {
        self.inner.applied_tx.subscribe()
    }

    /// Meta of the snapshot currently on disk, if any.
    pub fn snapshot_meta(&self) -> Option<SnapshotMetaOf> {
        self.inner.snapshot_lock().clone()
    }
}

/// Run blocking snapshot work off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::from(StorageIOError::read_state_machine(AnyError::new(&e))))?
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let inner = self.inner.clone();
        blocking(move || inner.build_snapshot_blocking()).await
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
        let mut responses = Vec::new();
        let mut last_index = None;
        for entry in entries {
            // Lock per entry: each entry is applied atomically, and readers get a chance to
            // run between entries of a long batch.
            let mut applied = self.inner.write_applied();
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse::default(),
                EntryPayload::Normal(ref cmd) => {
                    let Applied { table, memory, .. } = &mut *applied;
                    apply_command(table, memory, cmd)
                }
                EntryPayload::Membership(ref membership) => {
                    applied.last_membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    CommandResponse::default()
                }
            };
            applied.last_applied = Some(entry.log_id);
            drop(applied);
            responses.push(response);
            last_index = Some(entry.log_id.index);
        }
        if last_index.is_some() {
            self.inner.applied_tx.send_replace(last_index);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let inner = self.inner.clone();
        let meta = meta.clone();
        let data = snapshot.into_inner();
        blocking(move || inner.install_snapshot_blocking(meta, data)).await
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let inner = self.inner.clone();
        blocking(move || inner.current_snapshot_blocking()).await
    }
}

/// A cheap integrity checksum (not a MAC): every step is a bijection of the state, so any
/// single corrupted 8-byte word always changes the result.
fn checksum(parts: &[&[u8]]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    let mut len: u64 = 0;
    for part in parts {
        let mut words = part.chunks_exact(8);
        for w in &mut words {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(buf))
                .wrapping_mul(K)
                .rotate_left(29);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            h = (h ^ u64::from_le_bytes(buf))
                .wrapping_mul(K)
                .rotate_left(29);
        }
        len = len.wrapping_add(part.len() as u64);
    }
    (h ^ len).wrapping_mul(K)
}

fn write_snapshot_file(dir: &Path, meta: &SnapshotMetaOf, data: &[u8]) -> anyhow::Result<()> {
    let meta_bytes = encode(meta)?;
    let mut header = Vec::with_capacity(MAGIC.len() + 16 + meta_bytes.len());
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
    header.extend_from_slice(&meta_bytes);
    header.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let sum = checksum(&[&header, data]);

    let tmp = dir.join(SNAPSHOT_TMP_FILE);
    let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&header)?;
    file.write_all(data)?;
    file.write_all(&sum.to_le_bytes())?;
    // Data on disk before the rename makes it visible, and the rename on disk before we report
    // success (the directory fsync).
    file.sync_all()
        .with_context(|| format!("fsync {}", tmp.display()))?;
    drop(file);
    let path = dir.join(SNAPSHOT_FILE);
    fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))?;
    Ok(())
}

/// Read and verify a snapshot file. `Ok(None)` if there is none.
fn read_snapshot_file(path: &Path) -> anyhow::Result<Option<(SnapshotMetaOf, Vec<u8>)>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_snapshot(bytes)
        .map(Some)
        .with_context(|| format!("corrupt snapshot file {}", path.display()))
}

fn parse_snapshot(mut bytes: Vec<u8>) -> anyhow::Result<(SnapshotMetaOf, Vec<u8>)> {
    fn take_u64(bytes: &[u8], at: usize) -> anyhow::Result<u64> {
        let end = at.checked_add(8).context("bad length")?;
        let word = bytes.get(at..end).context("file is truncated")?;
        let mut buf = [0u8; 8];
        buf.copy_from_slice(word);
        Ok(u64::from_le_bytes(buf))
    }
    anyhow::ensure!(
        bytes.len() >= MAGIC.len() + 24,
        "file is truncated ({} bytes)",
        bytes.len()
    );
    anyhow::ensure!(
        &bytes[..MAGIC.len()] == MAGIC,
        "bad magic, not a swarm snapshot"
    );

    let meta_len = usize::try_from(take_u64(&bytes, MAGIC.len())?)?;
    let meta_start = MAGIC.len() + 8;
    let meta_end = meta_start
        .checked_add(meta_len)
        .context("bad meta length")?;
    let data_len = usize::try_from(take_u64(&bytes, meta_end)?)?;
    let data_start = meta_end + 8;
    let data_end = data_start
        .checked_add(data_len)
        .context("bad data length")?;
    let sum_end = data_end.checked_add(8).context("bad data length")?;
    anyhow::ensure!(
        sum_end == bytes.len(),
        "lengths in the header ({sum_end} bytes) do not match the file ({} bytes)",
        bytes.len()
    );
    let stored = take_u64(&bytes, data_end)?;
    let actual = checksum(&[&bytes[..data_start], &bytes[data_start..data_end]]);
    anyhow::ensure!(stored == actual, "checksum mismatch");

    let meta: SnapshotMetaOf =
        decode(&bytes[meta_start..meta_end], meta_len).context("decoding snapshot meta")?;
    // Reuse the buffer for the data rather than copying a possibly large table.
    bytes.truncate(data_end);
    bytes.drain(..data_start);
    Ok((meta, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_detects_single_word_change() {
        let a = vec![7u8; 100];
        let mut b = a.clone();
        b[50] ^= 1;
        assert_ne!(checksum(&[&a]), checksum(&[&b]));
        // Trailing zero bytes change the length, hence the sum.
        assert_ne!(checksum(&[&a[..99]]), checksum(&[&a[..99], &[0]]));
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse_snapshot(Vec::new()).is_err());
        assert!(parse_snapshot(vec![0xff; 64]).is_err());
        let mut fake = MAGIC.to_vec();
        fake.extend_from_slice(&u64::MAX.to_le_bytes());
        fake.extend_from_slice(&[0; 32]);
        assert!(parse_snapshot(fake).is_err());
    }
}
