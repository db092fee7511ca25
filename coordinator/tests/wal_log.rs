//! Raft storage conformance (openraft's test suite) and durability / recovery tests for
//! `WalLogStore`.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::testing::{blank_ent, log_id, StoreBuilder, Suite};
use openraft::{
    AnyError, EntryPayload, LogState, RaftLogReader, StorageError, StorageIOError, Vote,
};
use swarm_coordinator::raft::types::Entry;
use swarm_coordinator::raft::wal_log::{COMMITTED_FLUSH_INTERVAL, WAL_DIR};
use swarm_coordinator::raft::{StateMachineStore, TypeConfig, WalLogStore, WalOptions};
use swarm_coordinator::state::{Command, Op, TaskSpec};
use tempfile::TempDir;

/// Small segments, so that tests roll over and stay cheap to preallocate.
const SMALL: u64 = 4096;

fn small() -> WalOptions {
    WalOptions {
        segment_bytes: SMALL,
    }
}

/// Builds a fresh log store + state machine in their own temp dir for each suite test.
struct TempStoreBuilder {
    segment_bytes: u64,
}

impl StoreBuilder<TypeConfig, WalLogStore, StateMachineStore, TempDir> for TempStoreBuilder {
    async fn build(&self) -> Result<(TempDir, WalLogStore, StateMachineStore), StorageError<u64>> {
        let to_err = |e: String| StorageError::from(StorageIOError::write(AnyError::error(e)));
        let dir = tempfile::tempdir().map_err(|e| to_err(e.to_string()))?;
        let options = WalOptions {
            segment_bytes: self.segment_bytes,
        };
        let log =
            WalLogStore::open_with(dir.path(), options).map_err(|e| to_err(format!("{e:#}")))?;
        let sm = StateMachineStore::open(dir.path()).map_err(|e| to_err(format!("{e:#}")))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    let builder = TempStoreBuilder {
        segment_bytes: 1024 * 1024,
    };
    if let Err(e) = Suite::test_all(builder) {
        panic!("openraft storage suite failed: {e}");
    }
}

#[test]
fn openraft_storage_suite_with_tiny_segments() {
    // The suite's logs then span several segments.
    let builder = TempStoreBuilder {
        segment_bytes: SMALL,
    };
    if let Err(e) = Suite::test_all(builder) {
        panic!("openraft storage suite failed: {e}");
    }
}

fn normal_ent(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, 0, index),
        payload: EntryPayload::Normal(Command::default()),
    }
}

/// An entry whose encoding is a little over `bytes` long.
fn big_ent(term: u64, index: u64, bytes: usize) -> Entry {
    let spec = TaskSpec {
        agent: "echo".into(),
        payload: vec![(index % 251) as u8; bytes],
        priority: 0,
        timeout_ms: 1_000,
        max_attempts: 1,
        idempotency_key: None,
        labels: BTreeMap::new(),
    };
    Entry {
        log_id: log_id(term, 0, index),
        payload: EntryPayload::Normal(Command {
            ops: vec![Op::Submit {
                spec,
                now_ms: index,
                queue_limit: 0,
            }],
        }),
    }
}

fn index_of(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.log_id.index).collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join(WAL_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    out.sort();
    out
}

/// `(offset, payload len)` of every record of a segment, per the documented format.
fn records(segment: &Path) -> Vec<(u64, u32)> {
    let bytes = std::fs::read(segment).unwrap();
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap());
        if len == 0 {
            break;
        }
        out.push((off as u64, len));
        off += 8 + len as usize;
    }
    out
}

fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

async fn all(log: &mut WalLogStore) -> Vec<Entry> {
    log.try_get_log_entries(0..).await.unwrap()
}

async fn state(log: &mut WalLogStore) -> LogState<TypeConfig> {
    log.get_log_state().await.unwrap()
}

fn open_err(dir: &Path) -> String {
    match WalLogStore::open_with(dir, small()) {
        Ok(_) => panic!("open must fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn entries_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        // Default options: one 64 MiB segment.
        let mut log = WalLogStore::open(dir.path()).unwrap();
        log.blocking_append([blank_ent::<TypeConfig>(1, 0, 0)])
            .await
            .unwrap();
        log.blocking_append((1..=500).map(|i| normal_ent(1, i)))
            .await
            .unwrap();
    }
    assert_eq!(segments(dir.path()).len(), 1);
    let mut log = WalLogStore::open(dir.path()).unwrap();
    assert_eq!(
        state(&mut log).await,
        LogState {
            last_purged_log_id: None,
            last_log_id: Some(log_id(1, 0, 500))
        }
    );
    let entries = all(&mut log).await;
    assert_eq!(index_of(&entries), (0..=500).collect::<Vec<_>>());
    assert_eq!(entries[0].payload, EntryPayload::Blank);
    assert_eq!(entries[7], normal_ent(1, 7));
    let mut reader = log.get_log_reader().await;
    assert_eq!(
        reader.try_get_log_entries(100..=102).await.unwrap(),
        entries[100..=102].to_vec()
    );
    // Appending continues where the log ended.
    log.blocking_append([normal_ent(2, 501)]).await.unwrap();
    drop(log);
    let mut log = WalLogStore::open(dir.path()).unwrap();
    assert_eq!(all(&mut log).await.len(), 502);
}

#[tokio::test]
async fn a_log_is_opened_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = WalLogStore::open_with(dir.path(), small()).unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("already open"), "{err}");
    drop(log);
    WalLogStore::open_with(dir.path(), small()).unwrap();
}

#[tokio::test]
async fn concurrent_appends_are_group_committed_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = WalLogStore::open_with(dir.path(), small()).unwrap();
        // Clones share one writer: their appends queue up behind each other's fsync. On this
        // single-threaded runtime an index is taken and appended without a yield in between,
        // so the log stays contiguous.
        let next = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let mut log = log.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        log.blocking_append([big_ent(1, i, 40)]).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    let entries = all(&mut log).await;
    assert_eq!(index_of(&entries), (0..400).collect::<Vec<_>>());
    assert_eq!(entries[123], big_ent(1, 123, 40));
}

#[tokio::test]
async fn vote_and_committed_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), None);
        assert_eq!(log.read_committed().await.unwrap(), None);
        log.blocking_append((0..5).map(|i| blank_ent::<TypeConfig>(2, 1, i)))
            .await
            .unwrap();
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        log.save_committed(Some(log_id(2, 1, 3))).await.unwrap();
        // No explicit flush: dropping the last clone drains the writer queue.
    }
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 1, 3)));
}

/// Copy the log's files as they are now, like a crash would leave them (minus unsynced data).
fn snapshot_files(from: &Path, to: &Path) {
    let src = from.join(WAL_DIR);
    let dst = to.join(WAL_DIR);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name != "lock" {
            std::fs::copy(e.path(), dst.join(name)).unwrap();
        }
    }
}

#[tokio::test]
async fn committed_is_flushed_lazily_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    log.blocking_append((0..5).map(|i| normal_ent(1, i)))
        .await
        .unwrap();
    log.save_committed(Some(log_id(1, 0, 4))).await.unwrap();
    tokio::time::sleep(COMMITTED_FLUSH_INTERVAL * 3).await;

    let copy = tempfile::tempdir().unwrap();
    snapshot_files(dir.path(), copy.path());
    let mut crashed = WalLogStore::open_with(copy.path(), small()).unwrap();
    assert_eq!(
        crashed.read_committed().await.unwrap(),
        Some(log_id(1, 0, 4))
    );
    assert_eq!(index_of(&all(&mut crashed).await), vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn purge_and_truncate_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
        log.blocking_append((0..=20).map(|i| normal_ent(1, i)))
            .await
            .unwrap();
        log.purge(log_id(1, 0, 5)).await.unwrap();
        log.truncate(log_id(1, 0, 15)).await.unwrap();
        assert_eq!(
            state(&mut log).await,
            LogState {
                last_purged_log_id: Some(log_id(1, 0, 5)),
                last_log_id: Some(log_id(1, 0, 14))
            }
        );
        // Re-append after the truncate point with a new term.
        log.blocking_append([normal_ent(2, 15)]).await.unwrap();
    }
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    assert_eq!(
        state(&mut log).await,
        LogState {
            last_purged_log_id: Some(log_id(1, 0, 5)),
            last_log_id: Some(log_id(2, 0, 15))
        }
    );
    let entries = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(index_of(&entries), (6..=15).collect::<Vec<_>>());
    assert_eq!(entries.last().unwrap().log_id, log_id(2, 0, 15));

    // Purging past the end leaves no entry; the last log id is the purged one, also on reopen.
    log.purge(log_id(2, 0, 30)).await.unwrap();
    assert!(segments(dir.path()).is_empty());
    drop(log);
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    assert_eq!(
        state(&mut log).await,
        LogState {
            last_purged_log_id: Some(log_id(2, 0, 30)),
            last_log_id: Some(log_id(2, 0, 30))
        }
    );
    assert!(all(&mut log).await.is_empty());
    // The log goes on after the purge point, in a new segment.
    log.blocking_append([normal_ent(3, 31), normal_ent(3, 32)])
        .await
        .unwrap();
    drop(log);
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    assert_eq!(index_of(&all(&mut log).await), vec![31, 32]);
}

#[tokio::test]
async fn truncate_of_not_yet_durable_entries_and_reappend() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
        log.blocking_append((0..10).map(|i| normal_ent(1, i)))
            .await
            .unwrap();
        log.truncate(log_id(1, 0, 0)).await.unwrap();
        assert_eq!(state(&mut log).await.last_log_id, None);
        assert!(all(&mut log).await.is_empty());
        log.blocking_append((0..3).map(|i| normal_ent(2, i)))
            .await
            .unwrap();
        // Truncating past the end changes nothing.
        log.truncate(log_id(2, 0, 10)).await.unwrap();
        assert_eq!(state(&mut log).await.last_log_id, Some(log_id(2, 0, 2)));
    }
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    let entries = all(&mut log).await;
    assert_eq!(
        entries,
        (0..3).map(|i| normal_ent(2, i)).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn segments_roll_over_and_truncate_and_purge_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let ent = |term, i| big_ent(term, i, 300);
    {
        let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
        // Single appends and batches, some straddling segment boundaries.
        for i in 0..20 {
            log.blocking_append([ent(1, i)]).await.unwrap();
        }
        log.blocking_append((20..100).map(|i| ent(1, i)))
            .await
            .unwrap();
        assert_eq!(index_of(&all(&mut log).await), (0..100).collect::<Vec<_>>());
    }
    let n_segments = segments(dir.path()).len();
    assert!(n_segments >= 8, "{n_segments} segments");
    for seg in segments(dir.path()) {
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            SMALL,
            "preallocated"
        );
    }

    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    let entries = all(&mut log).await;
    assert_eq!(entries, (0..100).map(|i| ent(1, i)).collect::<Vec<_>>());

    // Truncate in the middle of an early segment: later segments go, appends continue there.
    log.truncate(log_id(1, 0, 30)).await.unwrap();
    assert!(segments(dir.path()).len() < n_segments);
    log.blocking_append((30..60).map(|i| ent(2, i)))
        .await
        .unwrap();
    // Purge: whole segments below the point are deleted, a partial one stays.
    let before = segments(dir.path()).len();
    log.purge(log_id(1, 0, 25)).await.unwrap();
    assert!(segments(dir.path()).len() < before);
    let expected: Vec<Entry> = (26..30)
        .map(|i| ent(1, i))
        .chain((30..60).map(|i| ent(2, i)))
        .collect();
    assert_eq!(log.try_get_log_entries(26..).await.unwrap(), expected);
    drop(log);

    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    assert_eq!(
        state(&mut log).await,
        LogState {
            last_purged_log_id: Some(log_id(1, 0, 25)),
            last_log_id: Some(log_id(2, 0, 59))
        }
    );
    assert_eq!(log.try_get_log_entries(26..).await.unwrap(), expected);
    // Ranges that start and end inside segments.
    assert_eq!(
        log.try_get_log_entries(33..47).await.unwrap(),
        expected[7..21].to_vec()
    );
}

#[tokio::test]
async fn an_entry_larger_than_a_segment_gets_its_own() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
        log.blocking_append([normal_ent(1, 0), big_ent(1, 1, 10_000), normal_ent(1, 2)])
            .await
            .unwrap();
    }
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    let entries = all(&mut log).await;
    assert_eq!(entries[1], big_ent(1, 1, 10_000));
    assert_eq!(index_of(&entries), vec![0, 1, 2]);
    let sizes: Vec<u64> = segments(dir.path())
        .iter()
        .map(|s| std::fs::metadata(s).unwrap().len())
        .collect();
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert!(sizes[1] > 10_000, "{sizes:?}");
}

/// Append `0..n`, close, and return the last segment.
async fn log_of(dir: &Path, n: u64) -> PathBuf {
    let mut log = WalLogStore::open_with(dir, small()).unwrap();
    log.blocking_append((0..n).map(|i| big_ent(1, i, 20)))
        .await
        .unwrap();
    drop(log);
    segments(dir).pop().unwrap()
}

async fn assert_recovers_to(dir: &Path, last: u64) {
    let mut log = WalLogStore::open_with(dir, small()).unwrap();
    assert_eq!(
        index_of(&all(&mut log).await),
        (0..=last).collect::<Vec<_>>()
    );
    assert_eq!(state(&mut log).await.last_log_id, Some(log_id(1, 0, last)));
    // New appends go where the torn record was, and survive another reopen.
    log.blocking_append([big_ent(2, last + 1, 5), big_ent(2, last + 2, 5)])
        .await
        .unwrap();
    drop(log);
    let mut log = WalLogStore::open_with(dir, small()).unwrap();
    let entries = all(&mut log).await;
    assert_eq!(index_of(&entries), (0..=last + 2).collect::<Vec<_>>());
    assert_eq!(entries.last().unwrap(), &big_ent(2, last + 2, 5));
}

#[tokio::test]
async fn a_torn_last_record_ends_the_log() {
    // The tail of the last record never reached the disk (zeros, as preallocated).
    let dir = tempfile::tempdir().unwrap();
    let seg = log_of(dir.path(), 10).await;
    let (off, len) = *records(&seg).last().unwrap();
    overwrite(&seg, off + 8 + u64::from(len) - 5, &[0; 5]);
    assert_recovers_to(dir.path(), 8).await;
}

#[tokio::test]
async fn a_garbled_last_record_ends_the_log() {
    // Garbage in the length field: the record runs past the end of the file.
    let dir = tempfile::tempdir().unwrap();
    let seg = log_of(dir.path(), 10).await;
    let (off, _) = *records(&seg).last().unwrap();
    overwrite(&seg, off, &[0xff, 0xff, 0xff, 0x7f]);
    assert_recovers_to(dir.path(), 8).await;

    // Garbage in the payload of the last record.
    let dir = tempfile::tempdir().unwrap();
    let seg = log_of(dir.path(), 10).await;
    let (off, len) = *records(&seg).last().unwrap();
    overwrite(&seg, off + 8 + u64::from(len) - 3, &[0xa5; 3]);
    assert_recovers_to(dir.path(), 8).await;
}

#[tokio::test]
async fn a_torn_first_record_of_the_last_segment_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    let mut i = 0;
    // Fill until a second segment starts.
    while segments(dir.path()).len() < 2 {
        log.blocking_append([big_ent(1, i, 100)]).await.unwrap();
        i += 1;
    }
    drop(log);
    let last = segments(dir.path()).pop().unwrap();
    assert_eq!(records(&last).len(), 1);
    overwrite(&last, 20, &[0x5a; 4]);
    {
        let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
        assert_eq!(
            index_of(&all(&mut log).await),
            (0..i - 1).collect::<Vec<_>>()
        );
    }
    assert!(!last.exists());
}

#[tokio::test]
async fn a_bad_record_followed_by_valid_ones_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let seg = log_of(dir.path(), 10).await;
    let (off, len) = records(&seg)[3];
    // One flipped bit in the payload of entry 3 of 10.
    let at = off + 8 + u64::from(len) / 2;
    let mut byte = [0u8; 1];
    std::fs::File::open(&seg)
        .unwrap()
        .read_exact_at(&mut byte, at)
        .unwrap();
    overwrite(&seg, at, &[byte[0] ^ 0x10]);
    let err = open_err(dir.path());
    assert!(err.contains(&seg.display().to_string()), "{err}");
    assert!(err.contains(&format!("offset {off}")), "{err}");
    assert!(err.contains("followed by a valid record"), "{err}");
    // Still refused on a second attempt: nothing was "repaired" away.
    let again = open_err(dir.path());
    assert_eq!(err, again);
}

#[tokio::test]
async fn corruption_in_an_earlier_segment_or_a_missing_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
        log.blocking_append((0..60).map(|i| big_ent(1, i, 200)))
            .await
            .unwrap();
    }
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);

    // A torn record anywhere but at the end of the last segment is not a torn write.
    let first = &segs[0];
    let (off, len) = *records(first).last().unwrap();
    let original = std::fs::read(first).unwrap();
    overwrite(first, off + 8 + u64::from(len) - 1, &[0xee]);
    let err = open_err(dir.path());
    assert!(err.contains(&first.display().to_string()), "{err}");
    assert!(err.contains(&format!("offset {off}")), "{err}");
    std::fs::write(first, &original).unwrap();

    // A missing middle segment is a hole in the log.
    let middle = &segs[1];
    let saved = std::fs::read(middle).unwrap();
    std::fs::remove_file(middle).unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("starts at index"), "{err}");
    std::fs::write(middle, &saved).unwrap();

    // A record that verifies but holds the wrong index.
    let (off0, _) = records(middle)[0];
    let (_, len1) = records(middle)[1];
    let record1: Vec<u8> = {
        let bytes = std::fs::read(middle).unwrap();
        let (o, _) = records(middle)[1];
        bytes[o as usize..(o + 8 + u64::from(len1)) as usize].to_vec()
    };
    // Record 1's payload re-chained as the first record of the segment.
    let payload = &record1[8..];
    let crc = crc32(payload);
    let mut moved = Vec::new();
    moved.extend_from_slice(&len1.to_le_bytes());
    moved.extend_from_slice(&crc.to_le_bytes());
    moved.extend_from_slice(payload);
    overwrite(middle, off0, &moved);
    let err = open_err(dir.path());
    assert!(err.contains("holds log index"), "{err}");
    std::fs::write(middle, &saved).unwrap();

    // Restored: opens again.
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    assert_eq!(all(&mut log).await.len(), 60);
}

/// CRC-32 (IEEE) seeded with 0, as the first record of a segment is.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn stale_records_after_a_truncate_are_not_resurrected() {
    let dir = tempfile::tempdir().unwrap();
    let seg = log_of(dir.path(), 8).await;
    let (off5, len5) = records(&seg)[5];
    let mut old5 = vec![0u8; 8 + len5 as usize];
    std::fs::File::open(&seg)
        .unwrap()
        .read_exact_at(&mut old5, off5)
        .unwrap();
    {
        let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
        log.truncate(log_id(1, 0, 4)).await.unwrap();
        // Same size as the old entry 4, so it ends exactly where old entry 5 started.
        log.blocking_append([big_ent(2, 4, 20)]).await.unwrap();
    }
    let (off4, len4) = records(&seg)[4];
    assert_eq!(off4 + 8 + u64::from(len4), off5);
    // The truncate erased the old records, not just the first header.
    let bytes = std::fs::read(&seg).unwrap();
    assert!(bytes[off5 as usize..].iter().all(|&b| b == 0));

    // Even if the old entry 5 were there (as a lost end marker after a write into stale bytes
    // would leave it), it does not chain to the new entry 4 and is not taken for entry 5.
    overwrite(&seg, off5, &old5);
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    let entries = all(&mut log).await;
    assert_eq!(index_of(&entries), vec![0, 1, 2, 3, 4]);
    assert_eq!(entries[4], big_ent(2, 4, 20));
}

#[tokio::test]
async fn a_hole_is_refused_and_the_log_then_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    log.blocking_append((0..5).map(|i| normal_ent(1, i)))
        .await
        .unwrap();
    assert!(log.blocking_append([normal_ent(1, 9)]).await.is_err());
    assert!(log.blocking_append([normal_ent(1, 5)]).await.is_err());
    assert!(log.save_vote(&Vote::new(1, 1)).await.is_err());
    drop(log);
    // What was durable before the failure is intact.
    let mut log = WalLogStore::open_with(dir.path(), small()).unwrap();
    assert_eq!(index_of(&all(&mut log).await), vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn reads_below_the_cache_come_from_disk_while_open() {
    // More than the in-memory cache holds, so the start of the log is read back from disk.
    let dir = tempfile::tempdir().unwrap();
    let mut log = WalLogStore::open(dir.path()).unwrap();
    for chunk in 0..40u64 {
        log.blocking_append((chunk * 100..(chunk + 1) * 100).map(|i| big_ent(1, i, 5_000)))
            .await
            .unwrap();
    }
    let mut reader = log.get_log_reader().await;
    let got = reader.try_get_log_entries(10..20).await.unwrap();
    assert_eq!(
        got,
        (10..20).map(|i| big_ent(1, i, 5_000)).collect::<Vec<_>>()
    );
    let got = reader.try_get_log_entries(3_990..).await.unwrap();
    assert_eq!(index_of(&got), (3_990..4_000).collect::<Vec<_>>());
    // Give the writer a moment: nothing else should change.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(all(&mut log).await.len(), 4_000);
}

/// openraft itself on top of the WAL: a single-node cluster writes, snapshots, purges, and
/// restarts from disk.
mod raft {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use openraft::{Config, ServerState};
    use swarm_coordinator::raft::{
        raft_config, NodeAddr, QuicRaftNetwork, Raft, StateMachineStore, WalLogStore,
    };
    use swarm_coordinator::state::Command;
    use swarm_proto::ALPN_RAFT;
    use swarm_transport::{
        client_config, init_certs, server_config, server_endpoint, Identity, Role,
    };
    use tempfile::TempDir;

    /// Only there so that a broken test fails instead of hanging.
    const WAIT: Option<Duration> = Some(Duration::from_secs(30));

    async fn start(certs: &Path, data: &Path, config: Arc<Config>) -> (Raft, quinn::Endpoint) {
        let identity = Identity::load(certs, Role::Coordinator).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let endpoint =
            server_endpoint(any, server_config(&identity, &[ALPN_RAFT]).unwrap()).unwrap();
        let network = QuicRaftNetwork::new(
            endpoint.clone(),
            client_config(&identity, ALPN_RAFT).unwrap(),
        );
        let log = WalLogStore::open_with(data, super::small()).unwrap();
        let sm = StateMachineStore::open(data).unwrap();
        let raft = Raft::new(1, config, network, log, sm).await.unwrap();
        (raft, endpoint)
    }

    async fn write(raft: &Raft, n: usize) -> u64 {
        let mut last = 0;
        for _ in 0..n {
            last = raft
                .client_write(Command::default())
                .await
                .unwrap()
                .log_id
                .index;
        }
        last
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_node_cluster_writes_snapshots_purges_and_restarts() {
        let certs = TempDir::new().unwrap();
        init_certs(certs.path(), &[], false).unwrap();
        let data = TempDir::new().unwrap();
        let mut config = raft_config("test");
        config.max_in_snapshot_log_to_keep = 0;
        config.purge_batch_size = 1;
        let config = Arc::new(config.validate().unwrap());

        let (raft, endpoint) = start(certs.path(), data.path(), config.clone()).await;
        let me = NodeAddr {
            raft_addr: endpoint.local_addr().unwrap().to_string(),
            api_addr: String::new(),
        };
        raft.initialize(BTreeMap::from([(1, me)])).await.unwrap();
        raft.wait(WAIT)
            .state(ServerState::Leader, "leader")
            .await
            .unwrap();
        // Enough to span several 4 KiB segments.
        let snap_at = write(&raft, 300).await;
        raft.trigger().snapshot().await.unwrap();
        raft.wait(WAIT)
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= snap_at),
                "snapshot",
            )
            .await
            .unwrap();
        raft.trigger().purge_log(snap_at).await.unwrap();
        raft.wait(WAIT)
            .metrics(|m| m.purged.is_some_and(|p| p.index >= snap_at), "purged")
            .await
            .unwrap();
        let last = write(&raft, 20).await;
        raft.shutdown().await.unwrap();
        drop(raft);
        endpoint.close(quinn::VarInt::from_u32(0), b"restart");
        endpoint.wait_idle().await;
        // The purge deleted the segments below the snapshot.
        let first: u64 = super::segments(data.path())[0]
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            first > snap_at / 2,
            "first segment {first}, purged to {snap_at}"
        );

        // Restart on the same data: the log (from the purge point on), vote and committed
        // pointer come back, the node leads again and goes on writing.
        let (raft, endpoint) = start(certs.path(), data.path(), config).await;
        raft.wait(WAIT)
            .state(ServerState::Leader, "leader after restart")
            .await
            .unwrap();
        raft.wait(WAIT)
            .applied_index_at_least(Some(last), "re-applied")
            .await
            .unwrap();
        let after = write(&raft, 5).await;
        assert!(after > last);
        raft.shutdown().await.unwrap();
        endpoint.close(quinn::VarInt::from_u32(0), b"done");
    }
}
