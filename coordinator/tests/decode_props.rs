//! Hostile bytes through the coordinator's decoders, via their public entry points:
//!
//! * dumps (Raft snapshots and backups): `DumpParser` fed in pieces as a restore's HTTP
//!   body arrives, `DumpReader`, and `CheckpointStore::build_from_dump` + `load` as a
//!   follower installs a snapshot;
//! * the Raft log database: entries and records as `RedbLogStore` reads them back from
//!   redb (its `decode_entry` is private, so the test writes the values into a real log
//!   file and opens it), and the same decodes directly;
//! * Raft RPC frames (`RaftRequest`, `RaftResponse`);
//! * `parse_duration` (the `?wait=` query).
//!
//! Arbitrary and mutated valid inputs must give a value or a clean error, never a panic.
//! Mutated dumps are checked as sent (the checksum refuses them) and with their framing,
//! counts and checksum made right, so the records behind the checksum get decoded. The
//! coverage-guided version is `fuzz/` (`scripts/fuzz.sh`).

use std::collections::{BTreeMap, BTreeSet};

use openraft::storage::RaftLogStorage;
use openraft::{Entry, EntryPayload, LogId, Membership, RaftLogReader, StoredMembership, Vote};
use proptest::prelude::*;
use proptest::sample::Index;
use redb::{Database, TableDefinition};
use swarm_coordinator::limits::{ENTRY_DECODE_LIMIT, RAFT_MAX_FRAME, RECORD_DECODE_LIMIT};
use swarm_coordinator::raft::checkpoint::CheckpointStore;
use swarm_coordinator::raft::dump::{
    Checksum, DumpParser, DumpReader, DumpWriter, Header, Record, DUMP_FORMAT,
};
use swarm_coordinator::raft::log_store::LOG_FORMAT;
use swarm_coordinator::raft::network::{RaftRequest, RaftResponse, TimeoutNowRequest};
use swarm_coordinator::raft::types::NodeAddr;
use swarm_coordinator::raft::{RedbLogStore, TypeConfig};
use swarm_coordinator::state::{Attempt, AttemptEnd, Command, Op, TableMeta, Task, TaskSpec};
use swarm_proto::api::TaskState;
use swarm_proto::worker::{AttemptRef, FailureKind, Outcome};
use swarm_testkit::bytes::{apply, split, Edit};
use swarm_testkit::config;

// ---- mutations -----------------------------------------------------------------------

/// Byte edits, varints that lie, and a 4-byte little-endian length (dump record
/// framing) written over the bytes.
fn edit() -> impl Strategy<Value = Edit> {
    let len = prop_oneof![
        Just(u32::MAX),
        Just((256u32 << 20) + 1),
        Just(256u32 << 20),
        0u32..64
    ];
    prop_oneof![
        swarm_testkit::bytes::with_varints(swarm_testkit::bytes::hostile_varints()),
        (any::<Index>(), len).prop_map(|(i, v)| Edit::LengthLe(i, v)),
    ]
}

// ---- valid values --------------------------------------------------------------------

fn log_id(term: u64, node: u64, index: u64) -> LogId<u64> {
    openraft::testing::log_id(term, node, index)
}

fn membership() -> Membership<u64, NodeAddr> {
    let nodes: BTreeMap<u64, NodeAddr> = (1..=3)
        .map(|i| {
            let addr = NodeAddr {
                raft_addr: format!("127.0.0.1:700{i}"),
                api_addr: format!("127.0.0.1:800{i}"),
            };
            (i, addr)
        })
        .collect();
    Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes)
}

fn spec(payload: Vec<u8>, key: Option<String>) -> TaskSpec {
    TaskSpec {
        agent: "echo".into(),
        payload,
        priority: 1,
        timeout_ms: 1000,
        max_attempts: 3,
        idempotency_key: key,
        labels: BTreeMap::from([("a".into(), "b".into())]),
        patterns: 0,
        swarm: "default".into(),
        stages: Vec::new(),
        retain_ms: 60_000,
    }
}

fn task(id: u64, state: TaskState, payload: Vec<u8>) -> Task {
    let finished = state.is_final();
    let running = state == TaskState::Running;
    Task {
        id,
        spec: spec(payload, Some(format!("key-{id}"))),
        state,
        attempts: if finished || running {
            vec![Attempt {
                number: 1,
                stage: 0,
                worker: "w".into(),
                started_at_ms: 3,
                finished_at_ms: finished.then_some(4),
                end: finished.then(|| AttemptEnd::Failed {
                    kind: FailureKind::Exit,
                    message: "exit 1".into(),
                }),
            }]
        } else {
            Vec::new()
        },
        output: finished.then(|| b"out".to_vec()),
        error: None,
        created_at_ms: 1,
        finished_at_ms: finished.then_some(4),
        expires_at_ms: finished.then_some(100),
        not_before_ms: 0,
        stage: 0,
        stage_base: 0,
        released: 0,
        stage_outputs: Vec::new(),
        moves: 0,
        flow: None,
    }
}

fn state() -> impl Strategy<Value = TaskState> {
    prop::sample::select(TaskState::ALL.to_vec())
}

/// A valid dump of `tasks` (ids from 1) and `memory` bytes in pieces.
fn dump(states: &[(TaskState, Vec<u8>)], memory: &[Vec<u8>]) -> Vec<u8> {
    let tasks: Vec<Task> = states
        .iter()
        .enumerate()
        .map(|(i, (s, p))| task(i as u64 + 1, *s, p.clone()))
        .collect();
    let header = Header {
        applied: Some(log_id(2, 1, 9)),
        membership: StoredMembership::new(Some(log_id(1, 1, 2)), membership()),
        meta: TableMeta {
            next_id: tasks.len() as u64,
            ..TableMeta::default()
        },
        tasks: tasks.len() as u64,
        memory_bytes: memory.iter().map(|m| m.len() as u64).sum(),
        staged_bytes: 0,
    };
    let mut w = DumpWriter::new(Vec::new(), &header).unwrap();
    for batch in tasks.chunks(2) {
        w.write(&Record::Tasks(batch.to_vec())).unwrap();
    }
    for m in memory {
        w.write(&Record::Memory(m.clone())).unwrap();
    }
    w.finish().unwrap().0
}

fn dump_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((state(), prop::collection::vec(any::<u8>(), 0..16)), 0..5),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..16), 0..3),
    )
        .prop_map(|(states, memory)| dump(&states, &memory))
}

/// The records of a valid dump (without its preamble and end record), each framed as
/// the dump frames it.
fn records_of(dump: &[u8]) -> Vec<u8> {
    let mut body = &dump[12..];
    let mut out = Vec::new();
    while body.len() >= 4 {
        let len = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
        if matches!(
            swarm_codec::decode::<Record>(&body[4..4 + len], usize::MAX),
            Ok(Record::End { .. })
        ) {
            break;
        }
        out.extend_from_slice(&body[..4 + len]);
        body = &body[4 + len..];
    }
    out
}

/// A dump with its preamble, framing, counts and checksum made right around the record
/// bodies framed in `records` (u32 LE length, body; a length past the end takes the rest).
fn reframe(mut records: &[u8]) -> Vec<u8> {
    let mut out = b"SWBACKUP".to_vec();
    out.extend_from_slice(&DUMP_FORMAT.to_le_bytes());
    let mut sum = Checksum::default();
    sum.update(&out);
    let (mut count, mut tasks) = (0u64, 0u64);
    while records.len() >= 4 {
        let len = u32::from_le_bytes([records[0], records[1], records[2], records[3]]) as usize;
        let body = &records[4..4 + len.min(records.len() - 4)];
        let start = out.len();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        sum.update(&out[start..]);
        count += 1;
        if let Ok(Record::Tasks(t)) = swarm_codec::decode::<Record>(body, usize::MAX) {
            tasks += t.len() as u64;
        }
        records = &records[4 + body.len()..];
    }
    let end = swarm_codec::encode(&Record::End {
        records: count,
        tasks,
        checksum: sum.value(),
    })
    .unwrap();
    out.extend_from_slice(&(end.len() as u32).to_le_bytes());
    out.extend_from_slice(&end);
    out
}

// ---- checks --------------------------------------------------------------------------

/// Feeds `bytes` to a `DumpParser` in `pieces`, as a restore does. Returns whether the
/// dump parsed whole; checks the parser's own invariants on the way.
fn parse_pieces(pieces: &[&[u8]]) -> Result<bool, TestCaseError> {
    let mut parser = DumpParser::new();
    let mut pieces = pieces.iter();
    let mut records = 0u64;
    loop {
        let record = match parser.next_record() {
            Ok(r) => r,
            Err(_) => return Ok(false),
        };
        let Some(record) = record else {
            if parser.ended() {
                // Whatever pieces are left must be empty: bytes after the end record
                // make the dump invalid, as they do for a reader.
                if pieces.any(|p| parser.push(p).is_err()) {
                    return Ok(false);
                }
                break;
            }
            match pieces.next() {
                Some(p) => {
                    if parser.push(p).is_err() {
                        return Ok(false);
                    }
                    continue;
                }
                None => return Ok(parser.finish().is_ok()),
            }
        };
        match &record {
            Record::Header(_) => prop_assert_eq!(records, 0, "a header after the first record"),
            Record::Tasks(batch) => {
                for t in batch {
                    let _ = t.size_hint();
                }
            }
            Record::End { .. } => prop_assert!(parser.ended()),
            // Whatever a dump holds, evaluating a schedule's cadence never panics.
            Record::Schedules(s) => {
                for s in s.by_name.values() {
                    let _ = s.def.cadence.next_after(s.next_tick_ms);
                    let _ = s.def.cadence.check(s.created_at_ms);
                }
            }
            // Whatever a dump holds, asking the outbox what is due never panics.
            Record::Callbacks(c) => {
                let _ = c.due(u64::MAX, 10);
                let _ = c.next_due_ms();
            }
            Record::Memory(_)
            | Record::Staged(_)
            | Record::Access(_)
            | Record::Ledger(_)
            | Record::Limits(_) => {}
        }
        records += 1;
    }
    prop_assert!(parser.finish().is_ok());
    Ok(true)
}

/// Reads `bytes` with a `DumpReader`; returns whether it read whole.
fn read_dump(bytes: &[u8]) -> bool {
    let mut r = DumpReader::new(bytes);
    if r.header().is_err() {
        return false;
    }
    loop {
        match r.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

/// A scratch directory, in memory where the machine has /dev/shm: the redb cases write
/// and fsync a file each.
fn scratch() -> tempfile::TempDir {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => d,
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

/// Installs `bytes` as a snapshot (build the checkpoint, load it); a clean result.
fn install(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = scratch();
    let path = dir.path().join("install.redb");
    if let Ok((store, header)) = CheckpointStore::build_from_dump(&path, bytes) {
        if let Ok(loaded) = store.load() {
            prop_assert_eq!(loaded.applied, header.applied);
        }
    } else {
        prop_assert!(!path.exists(), "a failed install left its file");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn valid_dumps_parse_however_cut(dump in dump_strategy(), cuts in prop::collection::vec(any::<Index>(), 0..8)) {
        prop_assert!(parse_pieces(&split(&dump, &cuts))?);
        prop_assert!(read_dump(&dump));
        // Framing made right around a valid dump's records is the same dump.
        prop_assert_eq!(reframe(&records_of(&dump)), dump);
    }

    #[test]
    fn mutated_dumps_parse_cleanly(
        dump in dump_strategy(),
        edits in prop::collection::vec(edit(), 1..4),
        cuts in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        // As sent: the checksum (or the framing) refuses any damage.
        let mut raw = dump.clone();
        apply(&mut raw, &edits);
        let whole = parse_pieces(&split(&raw, &cuts))?;
        prop_assert_eq!(whole, read_dump(&raw));
        if whole {
            // Only an edit that changed nothing gets through.
            prop_assert_eq!(&raw, &dump);
        }
        // With the framing made right: the records are decoded and checked.
        let mut records = records_of(&dump);
        apply(&mut records, &edits);
        let fixed = reframe(&records);
        let whole = parse_pieces(&split(&fixed, &cuts))?;
        prop_assert_eq!(whole, read_dump(&fixed));
    }

    #[test]
    fn arbitrary_bytes_parse_cleanly(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        cuts in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let mut prefixed = b"SWBACKUP".to_vec();
        prefixed.extend_from_slice(&DUMP_FORMAT.to_le_bytes());
        prefixed.extend_from_slice(&bytes);
        for b in [&bytes, &prefixed, &reframe(&bytes)] {
            let whole = parse_pieces(&split(b, &cuts))?;
            prop_assert_eq!(whole, read_dump(b));
        }
    }

    #[test]
    fn mutated_log_entries_decode_cleanly(
        entry in entry_strategy(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let mut bytes = swarm_codec::encode(&entry).unwrap();
        if edits.is_empty() {
            let back: Entry<TypeConfig> = swarm_codec::decode(&bytes, ENTRY_DECODE_LIMIT).unwrap();
            prop_assert_eq!(back.log_id, entry.log_id);
        }
        apply(&mut bytes, &edits);
        round_trip::<Entry<TypeConfig>>(&bytes, ENTRY_DECODE_LIMIT)?;
        round_trip::<Vote<u64>>(&bytes, RECORD_DECODE_LIMIT)?;
        round_trip::<Option<LogId<u64>>>(&bytes, RECORD_DECODE_LIMIT)?;
    }

    #[test]
    fn mutated_raft_rpcs_decode_cleanly(
        entries in prop::collection::vec(entry_strategy(), 0..3),
        which in 0usize..4,
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let vote = Vote::new_committed(2, 1);
        let request = match which {
            0 => RaftRequest::AppendEntries(openraft::raft::AppendEntriesRequest {
                vote,
                prev_log_id: Some(log_id(1, 1, 1)),
                entries,
                leader_commit: Some(log_id(1, 1, 1)),
            }),
            1 => RaftRequest::Vote(openraft::raft::VoteRequest {
                vote,
                last_log_id: None,
            }),
            2 => RaftRequest::InstallSnapshot(openraft::raft::InstallSnapshotRequest {
                vote,
                meta: openraft::SnapshotMeta {
                    last_log_id: Some(log_id(2, 1, 3)),
                    last_membership: StoredMembership::new(Some(log_id(1, 1, 2)), membership()),
                    snapshot_id: "2-1-3-17".into(),
                },
                offset: 7,
                data: vec![1, 2, 3],
                done: false,
            }),
            _ => RaftRequest::TimeoutNow(TimeoutNowRequest {
                vote,
                last_log_id: Some(log_id(2, 1, 3)),
            }),
        };
        let mut bytes = swarm_codec::encode(&request).unwrap();
        apply(&mut bytes, &edits);
        round_trip::<RaftRequest>(&bytes, RAFT_MAX_FRAME)?;
        round_trip::<RaftResponse>(&bytes, RAFT_MAX_FRAME)?;
    }

    #[test]
    fn durations_parse_cleanly(s in prop_oneof![
        any::<String>(),
        "[0-9.]{0,24}(ms|s|m|h|d|x)?",
        "[0-9]{300,400}(ms|d)",
    ]) {
        if let Ok(d) = swarm_coordinator::tasks::parse_duration(&s) {
            prop_assert!(d.as_secs_f64() <= 1e9 + 1.0);
        }
    }
}

proptest! {
    // Each case creates, writes and fsyncs redb files, about half a second in a debug
    // build: few cases here. The decoders behind them get thousands of cases above, and
    // the same install path is fuzzed in release by the `raft_snapshot` target.
    #![proptest_config(config(12))]

    #[test]
    fn mutated_snapshots_install_cleanly(
        dump in dump_strategy(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let mut records = records_of(&dump);
        apply(&mut records, &edits);
        install(&reframe(&records))?;
    }

    #[test]
    fn a_log_with_mutated_values_opens_cleanly(
        entries in prop::collection::vec(entry_strategy(), 1..4),
        victim in any::<Index>(),
        edits in prop::collection::vec(edit(), 1..4),
        vote_edits in prop::collection::vec(edit(), 0..2),
    ) {
        let dir = scratch();
        write_log(dir.path(), &entries, victim.index(entries.len()), &edits, &vote_edits);
        open_log(dir.path())?;
    }
}

#[test]
fn a_valid_log_written_by_hand_reads_back() {
    // The hand-written layout below is the one `RedbLogStore` reads: a log that is not
    // damaged reads back whole (so the mutated cases above exercise its decoder).
    let dir = tempfile::tempdir().unwrap();
    let entries = vec![blank(1), normal(2, vec![1, 2, 3])];
    write_log(dir.path(), &entries, 0, &[], &[]);
    let got = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut log = RedbLogStore::open(dir.path()).unwrap();
            assert_eq!(
                log.read_vote().await.unwrap(),
                Some(Vote::new_committed(2, 1))
            );
            log.try_get_log_entries(0..).await.unwrap()
        });
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].log_id.index, 2);
}

// ---- log helpers ---------------------------------------------------------------------

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

fn blank(index: u64) -> Entry<TypeConfig> {
    openraft::testing::blank_ent::<TypeConfig>(1, 1, index)
}

fn normal(index: u64, payload: Vec<u8>) -> Entry<TypeConfig> {
    let op = Op::Submit {
        spec: spec(payload, None),
        now_ms: 5,
        queue_limit: 100,
    };
    let finish = Op::Finish {
        attempt: AttemptRef {
            task_id: 1,
            attempt: 1,
        },
        worker: "w".into(),
        outcome: Outcome::Succeeded { output: vec![7] },
        started_at_ms: 1,
        finished_at_ms: 2,
        now_ms: 3,
        retry_at_ms: 0,
    };
    Entry {
        log_id: log_id(2, 1, index),
        payload: EntryPayload::Normal(Command {
            ops: vec![op, finish],
        }),
    }
}

fn entry_strategy() -> impl Strategy<Value = Entry<TypeConfig>> {
    (
        1u64..1000,
        prop::collection::vec(any::<u8>(), 0..24),
        0u8..3,
    )
        .prop_map(|(index, payload, kind)| match kind {
            0 => blank(index),
            1 => Entry {
                log_id: log_id(1, 1, index),
                payload: EntryPayload::Membership(membership()),
            },
            _ => normal(index, payload),
        })
}

/// Writes a log database as `RedbLogStore` lays it out, with entry `victim`'s bytes and
/// the vote record edited.
fn write_log(
    dir: &std::path::Path,
    entries: &[Entry<TypeConfig>],
    victim: usize,
    edits: &[Edit],
    vote_edits: &[Edit],
) {
    let db = Database::create(dir.join(swarm_coordinator::raft::log_store::LOG_DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert("format", &LOG_FORMAT.to_le_bytes()[..])
            .unwrap();
        let mut vote = swarm_codec::encode(&Vote::<u64>::new_committed(2, 1)).unwrap();
        apply(&mut vote, vote_edits);
        meta.insert("vote", &vote[..]).unwrap();
        let committed = swarm_codec::encode(&Some(log_id(1, 1, 1))).unwrap();
        meta.insert("committed", &committed[..]).unwrap();
        let mut logs = txn.open_table(LOGS).unwrap();
        for (i, e) in entries.iter().enumerate() {
            // Keys in order, one per entry, as the store writes them.
            let index = i as u64 + 1;
            let mut e = e.clone();
            e.log_id.index = index;
            let mut bytes = swarm_codec::encode(&e).unwrap();
            if i == victim {
                apply(&mut bytes, edits);
            }
            logs.insert(index, &bytes[..]).unwrap();
        }
    }
    txn.commit().unwrap();
}

/// Opens the log and reads everything back: a clean result (the store reports damage as
/// errors).
fn open_log(dir: &std::path::Path) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Ok(mut log) = RedbLogStore::open(dir) else {
            return;
        };
        let _ = log.read_vote().await;
        let _ = log.get_log_state().await;
        let _ = log.try_get_log_entries(0..).await;
        let _ = log.try_get_log_entries(1..2).await;
    });
    Ok(())
}

/// Decodes `bytes` as `T`: a clean result, and a decoded value re-encodes stably.
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
) -> Result<(), TestCaseError> {
    if let Ok(v) = swarm_codec::decode::<T>(bytes, limit) {
        let once = swarm_codec::encode(&v).unwrap();
        let back: T = swarm_codec::decode(&once, usize::MAX).unwrap();
        prop_assert_eq!(swarm_codec::encode(&back).unwrap(), once);
    }
    Ok(())
}
