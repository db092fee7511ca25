//! [`CheckpointStore`]: the replicated state as of its last checkpoint, in one redb file
//! (`raft/state.redb`).
//!
//! Only checkpoints write here, each in one transaction with an fsync, so the file always
//! holds the state at exactly one log position (`applied`). Between checkpoints the
//! task table keeps the changes in memory ([`crate::state::Changes`]) and reads older
//! state through a [`StoreReader`] (the [`Archive`] of the task table).
//!
//! # Tables (format [`STATE_FORMAT`])
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `format`, `applied`, `membership`, `table`, `access`, `ledger`, `schedules` | u32 LE; codec records |
//! | `live` | task id | codec [`Task`] (queued, running) |
//! | `done` | task id | codec [`Task`] (finished, retained) |
//! | `done_by_state` | (state code, id) | () |
//! | `expiry` | (expires at ms, id) | () |
//! | `keys` | idempotency key | task id |
//! | `memory` | chunk number | the memory store's snapshot bytes, in pieces |
//! | `staged` | chunk number | memory bytes staged by a restore in progress |

// The error type of every storage path is openraft's `StorageError`, fixed by its traits;
// errors are the cold path, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use openraft::StoredMembership;
use redb::{
    Database, Durability, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use swarm_codec::{decode, encode};
use swarm_memory::MemoryStore;
use swarm_proto::api::{TaskOrder, TaskState};
use swarm_proto::TaskId;

use super::dump::{DumpReader, DumpWriter, Header, Record, BATCH_BYTES};
use super::types::{LogId, NodeAddr, NodeId};
use crate::limits::{ACCESS_DECODE_LIMIT, RECORD_DECODE_LIMIT, SCHEDULES_DECODE_LIMIT};
use crate::state::{
    in_order, Access, Archive, ArchiveError, Callbacks, CheckpointDelta, Ledger, Limits, Schedules,
    TableMeta, Task, TaskTable,
};

/// File name of the checkpoint store inside the Raft data directory.
pub const STATE_DB_FILE: &str = "state.redb";
/// Version of the tables and records this module writes. Format 2 added `Task::flow`;
/// a store of format 1 is migrated when opened ([`migrate_tasks`]).
pub const STATE_FORMAT: u32 = 2;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LIVE: TableDefinition<u64, &[u8]> = TableDefinition::new("live");
const DONE: TableDefinition<u64, &[u8]> = TableDefinition::new("done");
const DONE_BY_STATE: TableDefinition<(u8, u64), ()> = TableDefinition::new("done_by_state");
const EXPIRY: TableDefinition<(u64, u64), ()> = TableDefinition::new("expiry");
const KEYS: TableDefinition<&str, u64> = TableDefinition::new("keys");
const MEMORY: TableDefinition<u64, &[u8]> = TableDefinition::new("memory");
const STAGED: TableDefinition<u64, &[u8]> = TableDefinition::new("staged");

const KEY_FORMAT: &str = "format";
const KEY_APPLIED: &str = "applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_TABLE: &str = "table";
/// The API tokens and revoked certificates ([`Access`]); absent in checkpoints written
/// before they existed (read as none).
const KEY_ACCESS: &str = "access";
const KEY_LEDGER: &str = "ledger";
/// The schedules ([`Schedules`]); absent in checkpoints written before them (read as
/// none).
const KEY_SCHEDULES: &str = "schedules";
/// The named limits ([`Limits`]); absent in checkpoints written before them (read as
/// none).
const KEY_LIMITS: &str = "limits";
/// The callback outbox ([`Callbacks`]); absent in checkpoints written before it (read
/// as empty).
const KEY_CALLBACKS: &str = "callbacks";

/// Largest stored task: a task is bounded by its ops (payload, outputs of each ring
/// stage), each below the entry budget.
const TASK_DECODE_LIMIT: usize = 256 << 20;
/// The memory store's bytes are stored in pieces of this size.
const MEMORY_CHUNK: usize = 4 << 20;
/// Page cache of the store: reads of old finished tasks, purges, dumps.
const CACHE_BYTES: usize = 16 << 20;

/// The membership a checkpoint records.
pub type Membership = StoredMembership<NodeId, NodeAddr>;

/// A state code for the `done_by_state` index (stable: part of the format).
fn state_code(s: TaskState) -> u8 {
    match s {
        TaskState::Queued => 0,
        TaskState::Running => 1,
        TaskState::Succeeded => 2,
        TaskState::Failed => 3,
        TaskState::Cancelled => 4,
        TaskState::DeadLettered => 5,
        TaskState::Waiting => 6,
        TaskState::AwaitingApproval => 7,
    }
}

fn archive_err(e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError(e.to_string())
}

/// The state a checkpoint holds, loaded at startup.
pub struct Loaded {
    /// Whether a checkpoint was ever written (a new store has none).
    pub checkpointed: bool,
    pub applied: Option<LogId>,
    pub membership: Membership,
    pub table: TaskTable,
    /// `None` when the store holds no memory store (a new replica): create one.
    pub memory: Option<MemoryStore>,
}

/// The checkpoint store. See the module docs.
pub struct CheckpointStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("path", &self.path)
            .finish()
    }
}

impl CheckpointStore {
    /// Open (or create) the store at `path`. A store of another format is refused.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        // A crash then costs no walk of the whole file on the next open.
        txn.set_quick_repair(true);
        let mut migrating = false;
        {
            let mut meta = txn.open_table(META)?;
            let stamp = meta.get(KEY_FORMAT)?.map(|v| v.value().to_vec());
            match stamp {
                Some(v) => {
                    let version = <[u8; 4]>::try_from(v.as_slice())
                        .map(u32::from_le_bytes)
                        .map_err(|_| anyhow::anyhow!("corrupt format stamp"))?;
                    anyhow::ensure!(
                        version == STATE_FORMAT || version == 1,
                        "{} is state format {version}; this release reads formats 1 and {STATE_FORMAT}",
                        path.display()
                    );
                    migrating = version == 1;
                }
                None => {
                    meta.insert(KEY_FORMAT, &STATE_FORMAT.to_le_bytes()[..])?;
                }
            }
            // Create every table, so readers never meet a missing one.
            txn.open_table(LIVE)?;
            txn.open_table(DONE)?;
            txn.open_table(DONE_BY_STATE)?;
            txn.open_table(EXPIRY)?;
            txn.open_table(KEYS)?;
            txn.open_table(MEMORY)?;
            txn.open_table(STAGED)?;
        }
        txn.commit()?;
        if migrating {
            migrate_tasks(&db, path)?;
        }
        Ok(CheckpointStore {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A consistent read view of the last checkpoint (it stays at that checkpoint for as
    /// long as it is held).
    pub fn reader(&self) -> Result<StoreReader, ArchiveError> {
        Ok(StoreReader {
            txn: self.db.begin_read().map_err(archive_err)?,
        })
    }

    /// Load the checkpoint: metadata, live tasks and the memory store (not the finished
    /// tasks: they stay on disk).
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let r = self.reader()?;
        let checkpointed = r.record::<Option<LogId>>(KEY_APPLIED)?.is_some();
        let (applied, membership, meta) = r.header_parts()?;
        let mut live = Vec::new();
        r.for_each_task(LIVE, |t| {
            live.push(t);
            Ok(())
        })?;
        let access = r.access()?;
        let ledger = r.ledger()?;
        let schedules = r.schedules()?;
        let limits = r.limits()?;
        let callbacks = r.callbacks()?;
        let table =
            TaskTable::from_checkpoint(meta, access, ledger, schedules, limits, callbacks, live)?;
        let bytes = r.chunks(MEMORY)?;
        let memory = if bytes.is_empty() {
            None
        } else {
            Some(
                MemoryStore::restore_bytes(&bytes.concat())
                    .map_err(|e| anyhow::anyhow!("the memory store does not load: {e}"))?,
            )
        };
        Ok(Loaded {
            checkpointed,
            applied,
            membership,
            table,
            memory,
        })
    }

    /// Write one checkpoint: the delta the table handed out, the log position and
    /// membership it reflects, and the memory store's bytes if it changed. One
    /// transaction, fsynced before this returns.
    pub fn write(
        &self,
        delta: &CheckpointDelta,
        applied: Option<LogId>,
        membership: &Membership,
        memory: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        // A crash then costs no walk of the whole file on the next open.
        txn.set_quick_repair(true);
        write_delta(&txn, delta, applied, membership, memory)?;
        txn.commit()?;
        Ok(())
    }

    /// Build a new store at `path` from a dump (a snapshot sent by the leader), checking
    /// it whole. The file is complete and fsynced when this returns; on error it is
    /// removed.
    pub fn build_from_dump(path: &Path, input: impl Read) -> anyhow::Result<(Self, Header)> {
        let _ = std::fs::remove_file(path);
        let built = Self::fill_from_dump(path, input);
        if built.is_err() {
            let _ = std::fs::remove_file(path);
        }
        built
    }

    fn fill_from_dump(path: &Path, input: impl Read) -> anyhow::Result<(Self, Header)> {
        let store = Self::open(path)?;
        let mut reader = DumpReader::new(input);
        let header = reader.header()?;
        let mut memory_at = 0u64;
        let mut staged_at = 0u64;
        let mut tasks = 0u64;
        // Commit in steps without fsync (the file is not in use until it is complete),
        // so one transaction never holds a whole large state.
        let mut txn = store.db.begin_write()?;
        txn.set_durability(Durability::None);
        let mut pending = 0usize;
        let mut access = Access::default();
        let mut ledger = Ledger::default();
        let mut schedules = Schedules::default();
        let mut limits = Limits::default();
        let mut callbacks = Callbacks::default();
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Header(_) => anyhow::bail!("a second header"),
                Record::Access(a) => access = *a,
                Record::Ledger(l) => ledger = *l,
                Record::Schedules(s) => schedules = *s,
                Record::Limits(l) => limits = *l,
                Record::Callbacks(c) => callbacks = *c,
                Record::Tasks(batch) => {
                    let mut live = txn.open_table(LIVE)?;
                    let mut done = txn.open_table(DONE)?;
                    let mut by_state = txn.open_table(DONE_BY_STATE)?;
                    let mut expiry = txn.open_table(EXPIRY)?;
                    let mut keys = txn.open_table(KEYS)?;
                    for t in &batch {
                        let bytes = encode(t)?;
                        pending += bytes.len();
                        if t.state.is_final() {
                            done.insert(t.id, &bytes[..])?;
                            by_state.insert((state_code(t.state), t.id), ())?;
                            if let Some(at) = t.expires_at_ms {
                                expiry.insert((at, t.id), ())?;
                            }
                        } else {
                            live.insert(t.id, &bytes[..])?;
                        }
                        if let Some(k) = &t.spec.idempotency_key {
                            keys.insert(k.as_str(), t.id)?;
                        }
                    }
                    tasks += batch.len() as u64;
                }
                Record::Memory(bytes) => {
                    pending += bytes.len();
                    txn.open_table(MEMORY)?.insert(memory_at, &bytes[..])?;
                    memory_at += 1;
                }
                Record::Staged(bytes) => {
                    pending += bytes.len();
                    txn.open_table(STAGED)?.insert(staged_at, &bytes[..])?;
                    staged_at += 1;
                }
                Record::End { .. } => {}
            }
            if pending >= 64 << 20 {
                txn.commit()?;
                txn = store.db.begin_write()?;
                txn.set_durability(Durability::None);
                pending = 0;
            }
        }
        anyhow::ensure!(
            tasks == header.tasks,
            "the dump's header announces {} tasks, it holds {tasks}",
            header.tasks
        );
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(KEY_APPLIED, &encode(&header.applied)?[..])?;
            meta.insert(KEY_MEMBERSHIP, &encode(&header.membership)?[..])?;
            meta.insert(KEY_TABLE, &encode(&header.meta)?[..])?;
            meta.insert(KEY_ACCESS, &encode(&access)?[..])?;
            meta.insert(KEY_LEDGER, &encode(&ledger)?[..])?;
            meta.insert(KEY_SCHEDULES, &encode(&schedules)?[..])?;
            meta.insert(KEY_LIMITS, &encode(&limits)?[..])?;
            meta.insert(KEY_CALLBACKS, &encode(&callbacks)?[..])?;
        }
        txn.set_durability(Durability::Immediate);
        // A crash then costs no walk of the whole file on the next open.
        txn.set_quick_repair(true);
        txn.commit()?;
        Ok((store, header))
    }
}

/// Tasks rewritten per transaction by [`migrate_tasks`].
const MIGRATE_BATCH: usize = 20_000;
/// Where a migration got to (the last task id rewritten in `live`, then `done`).
const KEY_MIGRATED_LIVE: &str = "migrated_live";
const KEY_MIGRATED_DONE: &str = "migrated_done";

/// Rewrite every task of a format 1 store in the format 2 encoding, then stamp the store
/// format 2. Batches of [`MIGRATE_BATCH`] tasks, each committed (fsynced) with how far it
/// got, so a crash resumes where it stopped and no transaction holds a whole history.
fn migrate_tasks(db: &Database, path: &Path) -> anyhow::Result<()> {
    use crate::state::format1::TaskV1;
    let started = std::time::Instant::now();
    let mut migrated = 0u64;
    for (table, progress) in [(LIVE, KEY_MIGRATED_LIVE), (DONE, KEY_MIGRATED_DONE)] {
        loop {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            txn.set_quick_repair(true);
            let done_batch = {
                let mut meta = txn.open_table(META)?;
                let after = match meta.get(progress)? {
                    Some(v) => Some(decode::<u64>(v.value(), 16)?),
                    None => None,
                };
                let mut t = txn.open_table(table)?;
                let range = match after {
                    Some(a) => t.range(a + 1..)?,
                    None => t.range(0..)?,
                };
                let mut batch = Vec::with_capacity(MIGRATE_BATCH);
                for row in range.take(MIGRATE_BATCH) {
                    let (k, v) = row?;
                    let old: TaskV1 = decode(v.value(), TASK_DECODE_LIMIT)
                        .with_context(|| format!("task {} of format 1", k.value()))?;
                    batch.push((k.value(), encode(&Task::from(old))?));
                }
                for (id, bytes) in &batch {
                    t.insert(*id, &bytes[..])?;
                }
                if let Some((last, _)) = batch.last() {
                    meta.insert(progress, &encode(last)?[..])?;
                }
                migrated += batch.len() as u64;
                batch.len() < MIGRATE_BATCH
            };
            txn.commit()?;
            if done_batch {
                break;
            }
            tracing::info!(migrated, "migrating the checkpoint store to state format 2");
        }
    }
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate);
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(KEY_FORMAT, &STATE_FORMAT.to_le_bytes()[..])?;
        meta.remove(KEY_MIGRATED_LIVE)?;
        meta.remove(KEY_MIGRATED_DONE)?;
    }
    txn.commit()?;
    tracing::info!(
        tasks = migrated,
        ms = started.elapsed().as_millis() as u64,
        path = %path.display(),
        "checkpoint store migrated from state format 1 to {STATE_FORMAT}"
    );
    Ok(())
}

fn clear<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &WriteTransaction,
    table: TableDefinition<K, V>,
) -> anyhow::Result<()> {
    txn.delete_table(table)?;
    txn.open_table(table)?;
    Ok(())
}

fn write_delta(
    txn: &WriteTransaction,
    delta: &CheckpointDelta,
    applied: Option<LogId>,
    membership: &Membership,
    memory: Option<&[u8]>,
) -> anyhow::Result<()> {
    let c = &delta.changes;
    if c.reset {
        for t in [LIVE, DONE] {
            clear(txn, t)?;
        }
        clear(txn, DONE_BY_STATE)?;
        clear(txn, EXPIRY)?;
        clear(txn, KEYS)?;
    }
    if c.staging_cleared {
        clear(txn, STAGED)?;
    }
    {
        let mut live = txn.open_table(LIVE)?;
        let mut done = txn.open_table(DONE)?;
        let mut by_state = txn.open_table(DONE_BY_STATE)?;
        let mut expiry = txn.open_table(EXPIRY)?;
        let mut keys = txn.open_table(KEYS)?;
        for id in &c.purged {
            let gone = done.remove(*id)?.map(|v| v.value().to_vec());
            if let Some(bytes) = gone {
                let t: Task = decode(&bytes, TASK_DECODE_LIMIT)?;
                by_state.remove((state_code(t.state), *id))?;
                if let Some(at) = t.expires_at_ms {
                    expiry.remove((at, *id))?;
                }
            }
        }
        for id in &c.live_gone {
            live.remove(*id)?;
        }
        for t in &delta.live {
            live.insert(t.id, &encode(&**t)?[..])?;
        }
        for (id, t) in &c.finished {
            done.insert(*id, &encode(&**t)?[..])?;
            by_state.insert((state_code(t.state), *id), ())?;
            if let Some(at) = t.expires_at_ms {
                expiry.insert((at, *id), ())?;
            }
        }
        for (k, v) in &c.keys {
            match v {
                Some(id) => keys.insert(k.as_str(), *id)?,
                None => keys.remove(k.as_str())?,
            };
        }
    }
    if !c.staged_memory.is_empty() {
        let mut staged = txn.open_table(STAGED)?;
        let first = staged.last()?.map_or(0, |(k, _)| k.value() + 1);
        for (n, piece) in (first..).zip(&c.staged_memory) {
            staged.insert(n, &piece[..])?;
        }
    }
    if let Some(bytes) = memory {
        clear(txn, MEMORY)?;
        let mut table = txn.open_table(MEMORY)?;
        for (i, piece) in bytes.chunks(MEMORY_CHUNK).enumerate() {
            table.insert(i as u64, piece)?;
        }
    }
    let mut meta = txn.open_table(META)?;
    meta.insert(KEY_APPLIED, &encode(&applied)?[..])?;
    meta.insert(KEY_MEMBERSHIP, &encode(membership)?[..])?;
    meta.insert(KEY_TABLE, &encode(&delta.meta)?[..])?;
    if let Some(access) = &delta.access {
        meta.insert(KEY_ACCESS, &encode(&**access)?[..])?;
    }
    if let Some(ledger) = &delta.ledger {
        meta.insert(KEY_LEDGER, &encode(&**ledger)?[..])?;
    }
    if let Some(schedules) = &delta.schedules {
        meta.insert(KEY_SCHEDULES, &encode(&**schedules)?[..])?;
    }
    if let Some(limits) = &delta.limits {
        meta.insert(KEY_LIMITS, &encode(&**limits)?[..])?;
    }
    if let Some(callbacks) = &delta.callbacks {
        meta.insert(KEY_CALLBACKS, &encode(&**callbacks)?[..])?;
    }
    Ok(())
}

/// A read view of one checkpoint: the task table's [`Archive`], and the source of dumps.
pub struct StoreReader {
    txn: ReadTransaction,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreReader")
    }
}

impl StoreReader {
    /// Up to `limit` finished tasks with ids in `ids`, in `order`, only those in `state`
    /// if it is given (through `DONE_BY_STATE`).
    fn finished_page(
        &self,
        state: Option<TaskState>,
        ids: std::ops::RangeInclusive<TaskId>,
        order: TaskOrder,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        let (lo, hi) = (*ids.start(), *ids.end());
        if lo > hi || limit == 0 {
            return Ok(Vec::new());
        }
        match state {
            None => {
                let t = self.txn.open_table(DONE).map_err(archive_err)?;
                let range = t.range(lo..=hi).map_err(archive_err)?;
                in_order(range, order)
                    .take(limit)
                    .map(|item| {
                        let (_, v) = item.map_err(archive_err)?;
                        decode(v.value(), TASK_DECODE_LIMIT).map_err(archive_err)
                    })
                    .collect()
            }
            Some(s) => {
                let code = state_code(s);
                let idx = self.txn.open_table(DONE_BY_STATE).map_err(archive_err)?;
                let range = idx.range((code, lo)..=(code, hi)).map_err(archive_err)?;
                let ids: Vec<TaskId> = in_order(range, order)
                    .take(limit)
                    .map(|item| item.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()
                    .map_err(archive_err)?;
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(t) = self.finished(id)? {
                        out.push(t);
                    }
                }
                Ok(out)
            }
        }
    }

    fn record<T: serde::de::DeserializeOwned>(&self, key: &str) -> anyhow::Result<Option<T>> {
        self.record_up_to(key, RECORD_DECODE_LIMIT)
    }

    fn record_up_to<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        limit: usize,
    ) -> anyhow::Result<Option<T>> {
        let meta = self.txn.open_table(META)?;
        let Some(v) = meta.get(key)? else {
            return Ok(None);
        };
        Ok(Some(
            decode(v.value(), limit).with_context(|| format!("corrupt {key} record"))?,
        ))
    }

    /// The access state of this checkpoint (none before any was written).
    fn access(&self) -> anyhow::Result<Access> {
        Ok(self
            .record_up_to::<Access>(KEY_ACCESS, ACCESS_DECODE_LIMIT)?
            .unwrap_or_default())
    }

    /// The token ledger of this checkpoint (empty before any was written).
    fn ledger(&self) -> anyhow::Result<Ledger> {
        Ok(self
            .record_up_to::<Ledger>(KEY_LEDGER, ACCESS_DECODE_LIMIT)?
            .unwrap_or_default())
    }

    /// The schedules of this checkpoint (none before any was written).
    fn schedules(&self) -> anyhow::Result<Schedules> {
        Ok(self
            .record_up_to::<Schedules>(KEY_SCHEDULES, SCHEDULES_DECODE_LIMIT)?
            .unwrap_or_default())
    }

    /// The named limits of this checkpoint (none before any was written).
    fn limits(&self) -> anyhow::Result<Limits> {
        Ok(self
            .record_up_to::<Limits>(KEY_LIMITS, ACCESS_DECODE_LIMIT)?
            .unwrap_or_default())
    }

    /// The callback outbox of this checkpoint (empty before any was written).
    fn callbacks(&self) -> anyhow::Result<Callbacks> {
        Ok(self
            .record_up_to::<Callbacks>(KEY_CALLBACKS, ACCESS_DECODE_LIMIT)?
            .unwrap_or_default())
    }

    /// The log position, membership and table metadata of this checkpoint.
    pub fn header_parts(&self) -> anyhow::Result<(Option<LogId>, Membership, TableMeta)> {
        Ok((
            self.record::<Option<LogId>>(KEY_APPLIED)?.flatten(),
            self.record(KEY_MEMBERSHIP)?.unwrap_or_default(),
            self.record(KEY_TABLE)?.unwrap_or_default(),
        ))
    }

    fn for_each_task(
        &self,
        table: TableDefinition<u64, &[u8]>,
        mut f: impl FnMut(Task) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let t = self.txn.open_table(table)?;
        for item in t.iter()? {
            let (k, v) = item?;
            let task: Task = decode(v.value(), TASK_DECODE_LIMIT)
                .with_context(|| format!("corrupt task {}", k.value()))?;
            anyhow::ensure!(
                task.id == k.value(),
                "task {} stored under {}",
                task.id,
                k.value()
            );
            f(task)?;
        }
        Ok(())
    }

    fn chunks(&self, table: TableDefinition<u64, &[u8]>) -> anyhow::Result<Vec<Vec<u8>>> {
        let t = self.txn.open_table(table)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            out.push(item?.1.value().to_vec());
        }
        Ok(out)
    }

    fn count(&self, table: TableDefinition<u64, &[u8]>) -> anyhow::Result<u64> {
        Ok(self.txn.open_table(table)?.len()?)
    }

    fn bytes_in(&self, table: TableDefinition<u64, &[u8]>) -> anyhow::Result<u64> {
        let t = self.txn.open_table(table)?;
        let mut n = 0;
        for item in t.iter()? {
            n += item?.1.value().len() as u64;
        }
        Ok(n)
    }

    /// Write this checkpoint as a dump; returns the bytes written.
    pub fn write_dump(&self, out: impl std::io::Write) -> anyhow::Result<u64> {
        let (applied, membership, meta) = self.header_parts()?;
        let header = Header {
            applied,
            membership,
            meta,
            tasks: self.count(LIVE)? + self.count(DONE)?,
            memory_bytes: self.bytes_in(MEMORY)?,
            staged_bytes: self.bytes_in(STAGED)?,
        };
        let mut w = DumpWriter::new(out, &header)?;
        let access = self.access()?;
        w.write(&Record::Access(Box::new(access)))?;
        w.write(&Record::Ledger(Box::new(self.ledger()?)))?;
        w.write(&Record::Schedules(Box::new(self.schedules()?)))?;
        w.write(&Record::Limits(Box::new(self.limits()?)))?;
        w.write(&Record::Callbacks(Box::new(self.callbacks()?)))?;
        let mut batch = Vec::new();
        let mut size = 0;
        for table in [LIVE, DONE] {
            self.for_each_task(table, |t| {
                size += t.size_hint();
                batch.push(t);
                if size >= BATCH_BYTES {
                    w.write(&Record::Tasks(std::mem::take(&mut batch)))?;
                    size = 0;
                }
                Ok(())
            })?;
        }
        if !batch.is_empty() {
            w.write(&Record::Tasks(batch))?;
        }
        for (table, wrap) in [
            (MEMORY, Record::Memory as fn(Vec<u8>) -> Record),
            (STAGED, Record::Staged as fn(Vec<u8>) -> Record),
        ] {
            let t = self.txn.open_table(table)?;
            for item in t.iter()? {
                w.write(&wrap(item?.1.value().to_vec()))?;
            }
        }
        Ok(w.finish()?.1)
    }
}

impl Archive for StoreReader {
    fn finished(&self, id: TaskId) -> Result<Option<Task>, ArchiveError> {
        let t = self.txn.open_table(DONE).map_err(archive_err)?;
        let Some(v) = t.get(id).map_err(archive_err)? else {
            return Ok(None);
        };
        decode(v.value(), TASK_DECODE_LIMIT)
            .map(Some)
            .map_err(|e| ArchiveError(format!("corrupt task {id}: {e}")))
    }

    fn key(&self, key: &str) -> Result<Option<TaskId>, ArchiveError> {
        let t = self.txn.open_table(KEYS).map_err(archive_err)?;
        Ok(t.get(key).map_err(archive_err)?.map(|v| v.value()))
    }

    fn finished_after(
        &self,
        state: Option<TaskState>,
        after: TaskId,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        self.finished_page(
            state,
            after.saturating_add(1)..=TaskId::MAX,
            TaskOrder::Asc,
            limit,
        )
    }

    fn finished_before(
        &self,
        state: Option<TaskState>,
        before: TaskId,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        match before {
            0 => Ok(Vec::new()),
            b => self.finished_page(state, 1..=b - 1, TaskOrder::Desc, limit),
        }
    }

    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<TaskId>, ArchiveError> {
        let t = self.txn.open_table(EXPIRY).map_err(archive_err)?;
        t.range((0, 0)..=(now_ms, u64::MAX))
            .map_err(archive_err)?
            .take(limit)
            .map(|item| item.map(|(k, _)| k.value().1).map_err(archive_err))
            .collect()
    }

    fn staged_memory(&self) -> Result<Vec<Vec<u8>>, ArchiveError> {
        self.chunks(STAGED).map_err(archive_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::access::RevokedCert;
    use crate::state::{AccessOp, Command, Op, OpResult};

    /// The access state at its limits of count (10,000 tokens, 100,000 revocations,
    /// 200,000 enrolled names, realistic lengths: about 30 MB encoded) survives a
    /// checkpoint, a restart and a snapshot install. Under the 1 MiB small-record limit a
    /// node with some 10,000 enrolled workers could not have restarted.
    #[test]
    fn access_at_its_limits_survives_restart_and_install() {
        use crate::state::access::{Enrolled, TokenRecord, MAX_ENROLLED, MAX_REVOKED, MAX_TOKENS};
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join("a.redb")).unwrap();
        let mut access = Access::default();
        for i in 0..MAX_TOKENS {
            access.tokens.insert(
                format!("{i:012x}"),
                TokenRecord {
                    id: format!("{i:012x}"),
                    name: format!("team-{i}-pipeline-token"),
                    scope: swarm_proto::api::Scope::Submit,
                    swarms: vec![format!("swarm-{}", i % 50)],
                    hash: [i as u8; 32],
                    created_at_ms: 1,
                    expires_at_ms: None,
                },
            );
        }
        for i in 0..MAX_REVOKED - 1 {
            access.revoked.insert(
                format!("{i:040x}"),
                RevokedCert {
                    serial: format!("{i:040x}"),
                    subject: format!("worker swarm-worker-7d9f8c-{i:05}"),
                    not_after_ms: Some(u64::MAX),
                    revoked_at_ms: 1,
                },
            );
        }
        for i in 0..MAX_ENROLLED {
            access.enrolled.insert(
                format!("swarm-worker-7d9f8c5b4-{i:06}"),
                Enrolled {
                    serial: format!("{i:040x}"),
                    key_sha256: [(i % 251) as u8; 32],
                    not_after_ms: u64::MAX,
                    enrolled_at_ms: 1,
                },
            );
        }
        let mut table = TaskTable::from_checkpoint(
            TableMeta::default(),
            access,
            Ledger::default(),
            Schedules::default(),
            Limits::default(),
            Callbacks::default(),
            Vec::new(),
        )
        .unwrap();
        // One change makes the next checkpoint write it whole.
        checkpoint_revocation(&store, &mut table, "ffff", 2);
        drop(store);
        let store = CheckpointStore::open(&dir.path().join("a.redb")).unwrap();
        let loaded = store.load().unwrap().table;
        assert_eq!(loaded.access(), table.access());
        assert_eq!(loaded.access().revoked.len(), MAX_REVOKED);
        assert_eq!(&installed_access(&store, dir.path()), table.access());
    }

    /// Revokes `serial` through the state machine at `now_ms` and checkpoints `table`
    /// into `store`.
    fn checkpoint_revocation(
        store: &CheckpointStore,
        table: &mut TaskTable,
        serial: &str,
        now_ms: u64,
    ) {
        let revoke = Op::Access(AccessOp::CertRevoke {
            cert: RevokedCert {
                serial: serial.into(),
                subject: format!("worker holding {serial}"),
                not_after_ms: None,
                revoked_at_ms: now_ms,
            },
            now_ms,
        });
        let r = crate::state::apply_command(
            table,
            &Command { ops: vec![revoke] },
            &store.reader().unwrap(),
        )
        .unwrap();
        assert_eq!(r.results, [crate::state::OpResult::Access(Ok(()))]);
        let delta = table.begin_checkpoint().unwrap();
        store
            .write(&delta, None, &Membership::default(), None)
            .unwrap();
        table.checkpoint_written();
    }

    /// The access state a follower installs from `store`'s dump (built in `dir`).
    /// The token ledger (usage and budgets) is stored by a checkpoint, loaded at restart,
    /// written into dumps and installed from them; a checkpoint that did not change it
    /// keeps it.
    #[test]
    fn the_ledger_survives_checkpoints_dumps_and_installs() {
        use crate::state::{LedgerOp, Report};
        use swarm_proto::worker::{AttemptRef, Outcome, Usage};
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join("a.redb")).unwrap();
        let mut table = store.load().unwrap().table;
        let spec = crate::state::TaskSpec {
            agent: "writer".into(),
            payload: vec![],
            priority: 0,
            timeout_ms: 1000,
            max_attempts: 1,
            idempotency_key: None,
            labels: Default::default(),
            patterns: 0,
            swarm: "default".into(),
            stages: vec![],
            retain_ms: 60_000,
        };
        let attempt = AttemptRef {
            task_id: 1,
            attempt: 1,
        };
        let ops = vec![
            Op::Submit {
                spec,
                now_ms: 1,
                queue_limit: 10,
            },
            Op::Start {
                attempt,
                worker: "w".into(),
                now_ms: 2,
            },
            Op::Report(Box::new(Report {
                attempt,
                worker: "w".into(),
                outcome: Outcome::Succeeded { output: vec![] },
                started_at_ms: 2,
                finished_at_ms: 3,
                now_ms: 3,
                retry_at_ms: 3,
                log: Default::default(),
                usage: Some(Usage {
                    model: "m".into(),
                    prompt_tokens: 7,
                    completion_tokens: 5,
                }),
            })),
            Op::Ledger(LedgerOp::Budget {
                swarm: "default".into(),
                tokens: Some(10),
            }),
        ];
        crate::state::apply_command(&mut table, &Command { ops }, &store.reader().unwrap())
            .unwrap();
        let delta = table.begin_checkpoint().unwrap();
        assert!(delta.ledger.is_some());
        store
            .write(&delta, None, &Membership::default(), None)
            .unwrap();
        table.checkpoint_written();
        // A later checkpoint that leaves the ledger alone does not write it again.
        checkpoint_revocation(&store, &mut table, "0abc", 4);
        let loaded = store.load().unwrap().table;
        assert_eq!(loaded.ledger().spent("default"), 12);
        assert!(loaded.ledger().holds("default", "writer"));
        assert_eq!(loaded.ledger(), table.ledger());
        let mut dump = Vec::new();
        store.reader().unwrap().write_dump(&mut dump).unwrap();
        let (installed, _) =
            CheckpointStore::build_from_dump(&dir.path().join("b.redb"), &dump[..]).unwrap();
        assert_eq!(installed.load().unwrap().table.ledger(), table.ledger());
    }

    /// Schedules, limits and the callback outbox are stored by a checkpoint, loaded at
    /// restart, written into dumps and installed from them (a snapshot, or the records a
    /// backup carries), and a checkpoint that did not change them keeps them.
    #[test]
    fn schedules_limits_and_callbacks_survive_checkpoints_dumps_and_installs() {
        use crate::state::schedules::{Cadence, CatchUp};
        use crate::state::{LimitDef, LimitsOp, Rate, ScheduleDef, ScheduleOp};
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join("a.redb")).unwrap();
        let mut table = store.load().unwrap().table;
        let def = |name: &str, cadence| ScheduleDef {
            name: name.into(),
            cadence,
            catch_up: CatchUp::All { max: 3 },
            template: crate::state::TaskSpec {
                agent: "echo".into(),
                payload: b"tick".to_vec(),
                priority: 2,
                timeout_ms: 1000,
                max_attempts: 1,
                idempotency_key: None,
                labels: Default::default(),
                patterns: 0,
                swarm: "default".into(),
                stages: vec![],
                retain_ms: 60_000,
            },
            paused: false,
        };
        let t0 = 1_700_000_000_000;
        let ops = vec![
            Op::Schedule(ScheduleOp::Create {
                def: Box::new(def(
                    "every",
                    Cadence::Every {
                        every_ms: 2000,
                        anchor_ms: 0,
                    },
                )),
                now_ms: t0,
            }),
            Op::Schedule(ScheduleOp::Create {
                def: Box::new(def(
                    "cron",
                    Cadence::Cron {
                        expr: "*/5 * * * *".into(),
                    },
                )),
                now_ms: t0,
            }),
            Op::Schedule(ScheduleOp::Fire {
                name: "every".into(),
                tick_ms: t0 + 2000,
                now_ms: t0 + 2001,
                queue_limit: 10,
            }),
            Op::Limits(LimitsOp::Set {
                name: "openai".into(),
                def: LimitDef {
                    concurrency: Some(3),
                    rate: Some(Rate::parse("60/min", 10).unwrap()),
                },
            }),
        ];
        crate::state::apply_command(&mut table, &Command { ops }, &store.reader().unwrap())
            .unwrap();
        assert_eq!(table.schedules().get("every").unwrap().fired, 1);
        assert_eq!(table.limits().concurrency_of("openai"), Some(3));
        // A task with a callback, cancelled: its delivery waits in the outbox.
        let flow = crate::state::Flow {
            more: vec![crate::state::flow::FlowAttr::Callback {
                url: "http://127.0.0.1:9/cb".into(),
            }],
            ..Default::default()
        };
        let submit = Op::SubmitFlow {
            spec: def(
                "x",
                Cadence::Cron {
                    expr: String::new(),
                },
            )
            .template,
            flow: Box::new(flow),
            now_ms: t0,
            queue_limit: 10,
        };
        let reader = store.reader().unwrap();
        let r = crate::state::apply_command(&mut table, &Command { ops: vec![submit] }, &reader)
            .unwrap();
        let [OpResult::Submitted { id, .. }] = r.results[..] else {
            panic!("{r:?}");
        };
        let cancel = Op::Cancel {
            task_id: id,
            now_ms: t0 + 1,
        };
        crate::state::apply_command(&mut table, &Command { ops: vec![cancel] }, &reader).unwrap();
        drop(reader);
        assert_eq!(table.callbacks().due(t0 + 1, 10), vec![(id, 1)]);
        let delta = table.begin_checkpoint().unwrap();
        assert!(delta.schedules.is_some());
        assert!(delta.limits.is_some());
        assert!(delta.callbacks.is_some());
        store
            .write(&delta, None, &Membership::default(), None)
            .unwrap();
        table.checkpoint_written();
        // A later checkpoint that leaves them alone does not write them again.
        checkpoint_revocation(&store, &mut table, "0abc", t0 + 3000);
        let loaded = store.load().unwrap().table;
        assert_eq!(loaded.schedules(), table.schedules());
        assert_eq!(loaded.schedules().len(), 2);
        assert_eq!(loaded.limits(), table.limits());
        assert_eq!(loaded.callbacks(), table.callbacks());
        assert_eq!(loaded.callbacks().len(), 1);
        let mut dump = Vec::new();
        store.reader().unwrap().write_dump(&mut dump).unwrap();
        let (installed, _) =
            CheckpointStore::build_from_dump(&dir.path().join("b.redb"), &dump[..]).unwrap();
        let installed = installed.load().unwrap().table;
        assert_eq!(installed.schedules(), table.schedules());
        assert_eq!(installed.limits(), table.limits());
        assert_eq!(installed.callbacks(), table.callbacks());
        let mut records = DumpReader::new(&dump[..]);
        records.header().unwrap();
        let (mut carried, mut limits) = (None, None);
        while let Some(r) = records.next_record().unwrap() {
            match r {
                Record::Schedules(s) => carried = Some(s),
                Record::Limits(l) => limits = Some(l),
                _ => {}
            }
        }
        assert_eq!(carried.as_deref(), Some(&**table.schedules()));
        assert_eq!(limits.as_deref(), Some(&**table.limits()));
    }

    fn installed_access(store: &CheckpointStore, dir: &std::path::Path) -> std::sync::Arc<Access> {
        let mut dump = Vec::new();
        store.reader().unwrap().write_dump(&mut dump).unwrap();
        let (installed, _) =
            CheckpointStore::build_from_dump(&dir.join("b.redb"), &dump[..]).unwrap();
        installed.load().unwrap().table.access().clone()
    }

    /// A revoked certificate reaches the checkpoint, a dump and the store a follower
    /// builds from that dump (a snapshot install); tokens, enrollments and a restart at
    /// the limits are `access_at_its_limits_survives_restart_and_install`'s.
    #[test]
    fn access_survives_checkpoints_dumps_and_installs() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join("a.redb")).unwrap();
        let mut table = store.load().unwrap().table;
        checkpoint_revocation(&store, &mut table, "0abc", 1);
        let loaded = store.load().unwrap().table;
        assert!(loaded.access().is_revoked("0abc"));
        assert_eq!(&installed_access(&store, dir.path()), loaded.access());
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_DB_FILE);
        drop(CheckpointStore::open(&path).unwrap());
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(KEY_FORMAT, &9u32.to_le_bytes()[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let err = CheckpointStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("state format 9"), "{err}");
    }

    /// A store of format 1 (tasks without `flow`) is migrated when opened, in batches,
    /// and resumes a migration a crash cut short: every task reads back whole.
    #[test]
    fn a_format_1_store_is_migrated_and_a_cut_migration_resumes() {
        use crate::state::format1::TaskV1;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_DB_FILE);
        drop(CheckpointStore::open(&path).unwrap());
        let n_live = 3 * MIGRATE_BATCH as u64 / 2;
        let n_done = 2 * MIGRATE_BATCH as u64 + 7;
        let old = |id: u64, state: TaskState| TaskV1 {
            id,
            spec: crate::state::TaskSpec {
                agent: "echo".into(),
                payload: id.to_le_bytes().to_vec(),
                priority: 0,
                timeout_ms: 1000,
                max_attempts: 3,
                idempotency_key: None,
                labels: Default::default(),
                patterns: 0,
                swarm: "default".into(),
                stages: Vec::new(),
                retain_ms: 60_000,
            },
            state,
            attempts: Vec::new(),
            output: state.is_final().then(|| b"done".to_vec()),
            error: None,
            created_at_ms: id,
            finished_at_ms: state.is_final().then_some(id),
            expires_at_ms: None,
            not_before_ms: 0,
            stage: 0,
            stage_base: 0,
            released: 0,
            stage_outputs: Vec::new(),
            moves: 1,
        };
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert(KEY_FORMAT, &1u32.to_le_bytes()[..]).unwrap();
                // A migration cut short after the first live batch: those are format 2.
                meta.insert(
                    KEY_MIGRATED_LIVE,
                    &encode(&(MIGRATE_BATCH as u64)).unwrap()[..],
                )
                .unwrap();
                let mut live = txn.open_table(LIVE).unwrap();
                for id in 1..=n_live {
                    let t = old(id, TaskState::Queued);
                    let bytes = if id <= MIGRATE_BATCH as u64 {
                        encode(&Task::from(t)).unwrap()
                    } else {
                        encode(&t).unwrap()
                    };
                    live.insert(id, &bytes[..]).unwrap();
                }
                let mut done = txn.open_table(DONE).unwrap();
                for id in n_live + 1..=n_live + n_done {
                    done.insert(id, &encode(&old(id, TaskState::Succeeded)).unwrap()[..])
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = CheckpointStore::open(&path).unwrap();
        let r = store.reader().unwrap();
        let mut live = 0;
        r.for_each_task(LIVE, |t| {
            assert_eq!(t.payload_id(), t.id);
            assert_eq!((t.moves, t.flow.is_none()), (1, true));
            live += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(live, n_live);
        for id in [n_live + 1, n_live + MIGRATE_BATCH as u64, n_live + n_done] {
            let t = r.finished(id).unwrap().unwrap();
            assert_eq!((t.id, t.output.as_deref()), (id, Some(&b"done"[..])));
        }
        assert_eq!(r.count(DONE).unwrap(), n_done);
        drop(r);
        drop(store);
        // Stamped format 2, with no progress left behind: a second open migrates nothing.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        let stamp = meta.get(KEY_FORMAT).unwrap().unwrap().value().to_vec();
        assert_eq!(stamp, STATE_FORMAT.to_le_bytes());
        assert!(meta.get(KEY_MIGRATED_LIVE).unwrap().is_none());
    }

    impl Task {
        fn payload_id(&self) -> u64 {
            u64::from_le_bytes(self.spec.payload[..8].try_into().unwrap())
        }
    }
}
