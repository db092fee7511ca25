//! What the task table keeps besides its live tasks: the [`Changes`] since the last
//! checkpoint, the [`Archive`] it reads older state through, and the table-wide
//! [`TableMeta`] a checkpoint stores.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use swarm_proto::api::TaskState;
use swarm_proto::TaskId;

use super::{SwarmRecord, Task};

/// A failure to read the archive (the checkpoint store on disk). Not a fact about the
/// replicated state: it stops the replica.
#[derive(Debug, Clone, thiserror::Error)]
#[error("reading the checkpoint store: {0}")]
pub struct ArchiveError(pub String);

/// Read access to the state as of the last completed checkpoint. The task table writes
/// nothing here; checkpoints do.
pub trait Archive {
    /// A finished task.
    fn finished(&self, id: TaskId) -> Result<Option<Task>, ArchiveError>;
    /// The task an idempotency key names.
    fn key(&self, key: &str) -> Result<Option<TaskId>, ArchiveError>;
    /// Up to `limit` finished tasks with ids above `after`, in id order, only those in
    /// `state` if it is given.
    fn finished_after(
        &self,
        state: Option<TaskState>,
        after: TaskId,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError>;
    /// Up to `limit` finished tasks with ids below `before`, newest (highest id) first,
    /// only those in `state` if it is given.
    fn finished_before(
        &self,
        state: Option<TaskState>,
        before: TaskId,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError>;
    /// Finished tasks whose retention ended by `now_ms`, up to `limit` ids, oldest
    /// expiry first.
    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<TaskId>, ArchiveError>;
    /// The memory-store bytes a restore in progress has staged, in order.
    fn staged_memory(&self) -> Result<Vec<Vec<u8>>, ArchiveError>;
}

/// The archive of a replica that has never checkpointed: empty.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoArchive;

impl Archive for NoArchive {
    fn finished(&self, _: TaskId) -> Result<Option<Task>, ArchiveError> {
        Ok(None)
    }

    fn key(&self, _: &str) -> Result<Option<TaskId>, ArchiveError> {
        Ok(None)
    }

    fn finished_after(
        &self,
        _: Option<TaskState>,
        _: TaskId,
        _: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        Ok(Vec::new())
    }

    fn finished_before(
        &self,
        _: Option<TaskState>,
        _: TaskId,
        _: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        Ok(Vec::new())
    }

    fn expired(&self, _: u64, _: usize) -> Result<Vec<TaskId>, ArchiveError> {
        Ok(Vec::new())
    }

    fn staged_memory(&self) -> Result<Vec<Vec<u8>>, ArchiveError> {
        Ok(Vec::new())
    }
}

/// What changed since the last checkpoint, besides the live tasks themselves. A
/// checkpoint takes it out of the table whole and writes it to the archive.
#[derive(Debug, Default)]
pub struct Changes {
    /// Tasks that reached a final state.
    pub finished: BTreeMap<TaskId, Arc<Task>>,
    /// Finished tasks purged (retention) that an older layer may still hold.
    pub purged: BTreeSet<TaskId>,
    /// Live tasks created or changed (their current value is in the table).
    pub live_dirty: BTreeSet<TaskId>,
    /// Tasks that left the live set (finished, or wiped by an aborted restore).
    pub live_gone: BTreeSet<TaskId>,
    /// Idempotency keys set (`Some`) or removed (`None`).
    pub keys: BTreeMap<String, Option<TaskId>>,
    /// Memory-store bytes a restore staged, in order after those of older layers.
    pub staged_memory: Vec<Vec<u8>>,
    /// Older layers' staged memory is void (the restore ended).
    pub staging_cleared: bool,
    /// Everything older is void: the replica was reset to empty (an aborted restore).
    pub reset: bool,
    /// The memory store changed.
    pub memory_changed: bool,
    /// Bytes held here, roughly (finished tasks, staged memory), to size checkpoints.
    pub bytes: usize,
}

impl Changes {
    /// Whether a checkpoint of these changes would write nothing but the metadata.
    pub fn is_empty(&self) -> bool {
        self.finished.is_empty()
            && self.purged.is_empty()
            && self.live_dirty.is_empty()
            && self.live_gone.is_empty()
            && self.keys.is_empty()
            && self.staged_memory.is_empty()
            && !self.staging_cleared
            && !self.reset
            && !self.memory_changed
    }
}

/// The layers a lookup reads, newest first: the table's changes, the changes a
/// checkpoint is writing, the archive.
pub(crate) struct Layers<'a> {
    pub changes: &'a Changes,
    pub flushing: Option<&'a Changes>,
    pub archive: &'a dyn Archive,
}

impl Layers<'_> {
    /// The layers below `changes`, stopping at a reset.
    pub fn older(&self) -> impl Iterator<Item = &Changes> {
        let below_changes = !self.changes.reset;
        self.flushing.filter(|_| below_changes).into_iter()
    }

    /// Whether the archive is visible under the in-memory layers.
    fn archive_visible(&self) -> bool {
        !self.changes.reset && !self.flushing.is_some_and(|f| f.reset)
    }

    /// A finished, retained task.
    pub fn finished(&self, id: TaskId) -> Result<Option<Arc<Task>>, ArchiveError> {
        for layer in std::iter::once(self.changes).chain(self.older()) {
            if let Some(t) = layer.finished.get(&id) {
                return Ok(Some(t.clone()));
            }
            if layer.purged.contains(&id) || layer.reset {
                return Ok(None);
            }
        }
        Ok(self.archive.finished(id)?.map(Arc::new))
    }

    /// The task an idempotency key names.
    pub fn key(&self, key: &str) -> Result<Option<TaskId>, ArchiveError> {
        for layer in std::iter::once(self.changes).chain(self.older()) {
            if let Some(owner) = layer.keys.get(key) {
                return Ok(*owner);
            }
            if layer.reset {
                return Ok(None);
            }
        }
        self.archive.key(key)
    }

    /// Whether a task the archive returns is still there (not purged since, nor reset).
    pub fn archived_visible(&self, id: TaskId) -> bool {
        self.archive_visible()
            && !self.changes.purged.contains(&id)
            && !self.flushing.is_some_and(|f| f.purged.contains(&id))
    }

    /// The staged memory bytes of a restore, oldest first.
    pub fn staged_memory(&self) -> Result<Vec<u8>, ArchiveError> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut archived = Vec::new();
        let flushing = self.older().next();
        let archive_counts =
            !self.changes.staging_cleared && !flushing.is_some_and(|f| f.staging_cleared);
        if archive_counts && self.archive_visible() {
            archived = self.archive.staged_memory()?;
        }
        parts.extend(archived.iter().map(Vec::as_slice));
        if let Some(f) = flushing.filter(|_| !self.changes.staging_cleared) {
            parts.extend(f.staged_memory.iter().map(Vec::as_slice));
        }
        parts.extend(self.changes.staged_memory.iter().map(Vec::as_slice));
        Ok(parts.concat())
    }
}

/// Table-wide facts, stored by every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableMeta {
    /// The last task id handed out (ids are never reused).
    pub next_id: TaskId,
    /// Defined swarms by name (the default swarm is implicit and not stored).
    pub swarms: BTreeMap<String, SwarmRecord>,
    /// Bumped by every swarm create and delete (and a restore).
    pub swarms_gen: u64,
    /// Retained finished tasks by final state.
    pub finished: BTreeMap<TaskState, u64>,
    /// Finishes over the last minute.
    pub rate: FinishRate,
    /// A restore in progress.
    pub restore: Option<RestoreState>,
}

/// A restore in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreState {
    pub restore_id: u64,
    /// The next chunk expected.
    pub next_seq: u64,
    /// Tasks restored so far.
    pub tasks: u64,
    pub started_at_ms: u64,
    /// `next_id` before the restore began (what an abort returns to).
    pub prev_next_id: TaskId,
}

/// Tasks finalized per second over the last minute (leader time): sixty one-second
/// buckets, so its size does not depend on the rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishRate {
    /// The second (since the epoch) the newest bucket counts.
    newest: u64,
    /// `buckets[s % 60]` counts second `s`, for `s` in `newest - 59 ..= newest`.
    buckets: Vec<u64>,
}

const RATE_WINDOW_S: u64 = 60;

impl Default for FinishRate {
    fn default() -> Self {
        FinishRate {
            newest: 0,
            buckets: vec![0; RATE_WINDOW_S as usize],
        }
    }
}

impl FinishRate {
    /// Count one finish at `now_ms`.
    pub fn record(&mut self, now_ms: u64) {
        let s = now_ms / 1000;
        if self.buckets.len() != RATE_WINDOW_S as usize {
            *self = FinishRate::default();
        }
        if s > self.newest {
            // Clear the buckets of the seconds skipped over (all of them after a minute).
            let gap = (s - self.newest).min(RATE_WINDOW_S);
            for k in 1..=gap {
                let slot = ((self.newest + k) % RATE_WINDOW_S) as usize;
                self.buckets[slot] = 0;
            }
            self.newest = s;
        }
        if s + RATE_WINDOW_S > self.newest {
            self.buckets[(s % RATE_WINDOW_S) as usize] += 1;
        }
    }

    /// Finishes within the minute before `now_ms`.
    pub fn since(&self, now_ms: u64) -> u64 {
        let s = now_ms / 1000;
        if self.buckets.len() != RATE_WINDOW_S as usize {
            return 0;
        }
        (0..RATE_WINDOW_S)
            .filter_map(|k| self.newest.checked_sub(k))
            .filter(|sec| sec + RATE_WINDOW_S > s)
            .map(|sec| self.buckets[(sec % RATE_WINDOW_S) as usize])
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::FinishRate;

    #[test]
    fn finish_rate_counts_the_last_minute_only() {
        let mut r = FinishRate::default();
        for ms in [1_000, 1_500, 2_000, 30_000] {
            r.record(ms);
        }
        assert_eq!(r.since(30_000), 4);
        assert_eq!(r.since(61_500), 2, "second 1 left the window at 61 s");
        assert_eq!(r.since(200_000), 0);
        r.record(200_000);
        assert_eq!(r.since(200_000), 1);
        // A late record older than the window is not counted.
        r.record(100_000);
        assert_eq!(r.since(200_000), 1);
    }
}
