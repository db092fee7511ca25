//! Raft storage conformance (openraft's test suite) and durability tests for
//! `RedbLogStore` + `StateMachineStore`.

use std::collections::BTreeSet;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{blank_ent, log_id, membership_ent, StoreBuilder, Suite};
use openraft::{
    AnyError, EntryPayload, LogState, RaftLogReader, RaftSnapshotBuilder, StorageError,
    StorageIOError, Vote,
};
use swarm_coordinator::raft::sm_store::OLD_SNAPSHOT_FILE;
use swarm_coordinator::raft::types::Entry;
use swarm_coordinator::raft::{RedbLogStore, StateMachineStore, TypeConfig};
use swarm_coordinator::state::{Command, CommandResponse};
use tempfile::TempDir;

/// Builds a fresh log store + state machine in their own temp dir for each suite test.
struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, RedbLogStore, StateMachineStore, TempDir> for TempStoreBuilder {
    async fn build(&self) -> Result<(TempDir, RedbLogStore, StateMachineStore), StorageError<u64>> {
        let to_err = |e: String| StorageError::from(StorageIOError::write(AnyError::error(e)));
        let dir = tempfile::tempdir().map_err(|e| to_err(e.to_string()))?;
        let log = RedbLogStore::open(dir.path()).map_err(|e| to_err(format!("{e:#}")))?;
        let sm = StateMachineStore::open(dir.path()).map_err(|e| to_err(format!("{e:#}")))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(TempStoreBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}

/// The same stores in inline mode, as deterministic simulations run them.
struct InlineStoreBuilder;

impl StoreBuilder<TypeConfig, RedbLogStore, StateMachineStore, TempDir> for InlineStoreBuilder {
    async fn build(&self) -> Result<(TempDir, RedbLogStore, StateMachineStore), StorageError<u64>> {
        let to_err = |e: String| StorageError::from(StorageIOError::write(AnyError::error(e)));
        let dir = tempfile::tempdir().map_err(|e| to_err(e.to_string()))?;
        let log = RedbLogStore::open_inline(dir.path()).map_err(|e| to_err(format!("{e:#}")))?;
        let sm = StateMachineStore::open_inline(dir.path(), Default::default())
            .map_err(|e| to_err(format!("{e:#}")))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_inline() {
    if let Err(e) = Suite::test_all(InlineStoreBuilder) {
        panic!("openraft storage suite failed in inline mode: {e}");
    }
}

#[tokio::test]
async fn inline_writes_are_durable_when_they_return() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = RedbLogStore::open_inline(dir.path()).unwrap();
        log.blocking_append([
            blank_ent::<TypeConfig>(1, 0, 0),
            normal_ent(1, 1),
            normal_ent(1, 2),
        ])
        .await
        .unwrap();
        log.save_vote(&Vote::new(1, 0)).await.unwrap();
        log.save_committed(Some(log_id(1, 0, 1))).await.unwrap();
        // The committed pointer is written with the next write that has to reach the disk...
        log.blocking_append([normal_ent(1, 3)]).await.unwrap();
        // ...so this one, with no write after it, is not (it only needs to be a lower bound).
        log.save_committed(Some(log_id(1, 0, 3))).await.unwrap();
    }
    let mut log = RedbLogStore::open_inline(dir.path()).unwrap();
    let entries = log.try_get_log_entries(0..).await.unwrap();
    assert_eq!(index_of(&entries), vec![0, 1, 2, 3]);
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, 0)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 0, 1)));
}

fn normal_ent(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, 0, index),
        payload: EntryPayload::Normal(Command::default()),
    }
}

fn voters(ids: &[u64]) -> Vec<BTreeSet<u64>> {
    vec![ids.iter().copied().collect()]
}

fn index_of(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.log_id.index).collect()
}

#[tokio::test]
async fn entries_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = RedbLogStore::open(dir.path()).unwrap();
        log.blocking_append([blank_ent::<TypeConfig>(1, 0, 0)])
            .await
            .unwrap();
        // One call with many entries (one transaction).
        log.blocking_append((1..=500).map(|i| normal_ent(1, i)))
            .await
            .unwrap();
    }
    let mut log = RedbLogStore::open(dir.path()).unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: None,
            last_log_id: Some(log_id(1, 0, 500))
        }
    );
    let entries = log.try_get_log_entries(0..).await.unwrap();
    assert_eq!(index_of(&entries), (0..=500).collect::<Vec<_>>());
    assert_eq!(entries[0].payload, EntryPayload::Blank);
    assert_eq!(entries[7], normal_ent(1, 7));
    // The reader sees the same log.
    let mut reader = log.get_log_reader().await;
    assert_eq!(
        reader.try_get_log_entries(100..=102).await.unwrap(),
        entries[100..=102].to_vec()
    );
}

#[tokio::test]
async fn concurrent_appends_are_group_committed_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = RedbLogStore::open(dir.path()).unwrap();
        // Clones share one writer: their appends queue up behind each other's fsync.
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let mut log = log.clone();
                tokio::spawn(async move {
                    for i in 0..50u64 {
                        log.blocking_append([normal_ent(1, t * 1000 + i)])
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let mut log = RedbLogStore::open(dir.path()).unwrap();
    let entries = log.try_get_log_entries(0..).await.unwrap();
    assert_eq!(entries.len(), 400);
}

#[tokio::test]
async fn vote_and_committed_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = RedbLogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), None);
        assert_eq!(log.read_committed().await.unwrap(), None);
        log.blocking_append((0..5).map(|i| blank_ent::<TypeConfig>(2, 1, i)))
            .await
            .unwrap();
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        log.save_committed(Some(log_id(2, 1, 3))).await.unwrap();
        // No explicit flush: dropping the last clone drains the writer queue.
    }
    let mut log = RedbLogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 1, 3)));
}

#[tokio::test]
async fn purge_and_truncate_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = RedbLogStore::open(dir.path()).unwrap();
        log.blocking_append((0..=20).map(|i| normal_ent(1, i)))
            .await
            .unwrap();
        log.purge(log_id(1, 0, 5)).await.unwrap();
        log.truncate(log_id(1, 0, 15)).await.unwrap();
        assert_eq!(
            log.get_log_state().await.unwrap(),
            LogState {
                last_purged_log_id: Some(log_id(1, 0, 5)),
                last_log_id: Some(log_id(1, 0, 14))
            }
        );
        // Re-append after the truncate point with a new term.
        log.blocking_append([normal_ent(2, 15)]).await.unwrap();
    }
    let mut log = RedbLogStore::open(dir.path()).unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap(),
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
    drop(log);
    let mut log = RedbLogStore::open(dir.path()).unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: Some(log_id(2, 0, 30)),
            last_log_id: Some(log_id(2, 0, 30))
        }
    );
    assert!(log.try_get_log_entries(0..).await.unwrap().is_empty());
}

#[tokio::test]
async fn corrupt_log_record_is_an_error_not_a_panic() {
    const LOGS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("logs");
    let dir = tempfile::tempdir().unwrap();
    let db_path;
    {
        let mut log = RedbLogStore::open(dir.path()).unwrap();
        log.blocking_append((0..10).map(|i| normal_ent(1, i)))
            .await
            .unwrap();
        db_path = log.path().to_path_buf();
    }
    {
        let db = redb::Database::open(&db_path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(LOGS).unwrap();
            t.insert(3, &[0xff, 0xfe, 0xfd][..]).unwrap();
            // A well-formed entry under the wrong key is corruption too.
            let misplaced = swarm_transport::codec::encode(&normal_ent(1, 42)).unwrap();
            t.insert(5, &misplaced[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let mut log = RedbLogStore::open(dir.path()).unwrap();
    assert!(log.try_get_log_entries(0..4).await.is_err());
    assert!(log.try_get_log_entries(5..6).await.is_err());
    assert_eq!(
        index_of(&log.try_get_log_entries(6..10).await.unwrap()),
        vec![6, 7, 8, 9]
    );
}

#[tokio::test]
async fn apply_returns_one_response_per_entry_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let mut applied = sm.subscribe_applied();
    let responses = sm
        .apply([
            blank_ent::<TypeConfig>(1, 0, 1),
            normal_ent(1, 2),
            membership_ent::<TypeConfig>(1, 0, 3, voters(&[1, 2, 3])),
            normal_ent(1, 4),
        ])
        .await
        .unwrap();
    let expected = CommandResponse::default();
    assert_eq!(
        responses,
        vec![
            CommandResponse::default(),
            expected.clone(),
            CommandResponse::default(),
            expected
        ]
    );
    let (last, membership) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(log_id(1, 0, 4)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 0, 3)));
    assert!(applied.has_changed().unwrap());
    assert_eq!(*applied.borrow_and_update(), Some(4));
    sm.table().wait_applied(4).await.unwrap();
    assert_eq!(sm.table().last_applied(), Some(log_id(1, 0, 4)));
}

/// A submit of one task, then its start and success: three ops in three entries.
fn task_entries(term: u64, first_index: u64, task_id: u64) -> Vec<Entry> {
    use swarm_coordinator::state::{Op, TaskSpec};
    use swarm_proto::worker::{AttemptRef, Outcome};
    let spec = TaskSpec {
        agent: "echo".into(),
        payload: format!("payload {task_id}").into_bytes(),
        priority: 0,
        timeout_ms: 1000,
        max_attempts: 1,
        idempotency_key: Some(format!("key-{task_id}")),
        labels: Default::default(),
        patterns: 0,
        swarm: "default".into(),
        stages: Vec::new(),
        retain_ms: 3_600_000,
    };
    let attempt = AttemptRef {
        task_id,
        attempt: 1,
    };
    let ops = [
        Op::Submit {
            spec,
            now_ms: 1,
            queue_limit: 1 << 30,
        },
        Op::Start {
            attempt,
            worker: "w".into(),
            now_ms: 2,
        },
        Op::Finish {
            attempt,
            worker: "w".into(),
            outcome: Outcome::Succeeded {
                output: format!("out {task_id}").into_bytes(),
            },
            started_at_ms: 2,
            finished_at_ms: 3,
            now_ms: 3,
            retry_at_ms: 3,
        },
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Entry {
            log_id: log_id(term, 0, first_index + i as u64),
            payload: EntryPayload::Normal(Command { ops: vec![op] }),
        })
        .collect()
}

async fn read_all(data: &mut swarm_coordinator::raft::snapshot_data::SnapshotData) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    data.seek(std::io::SeekFrom::Start(0)).await.unwrap();
    let mut out = Vec::new();
    data.read_to_end(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn snapshot_survives_reopen_and_installs_elsewhere() {
    use swarm_coordinator::state::Lookup;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (built_meta, built_bytes) = {
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        sm.apply([membership_ent::<TypeConfig>(1, 0, 1, voters(&[1]))])
            .await
            .unwrap();
        for id in 1..=50u64 {
            sm.apply(task_entries(1, 2 + 3 * (id - 1), id))
                .await
                .unwrap();
        }
        // One more task stays queued (live).
        sm.apply(task_entries(1, 152, 51).into_iter().take(1))
            .await
            .unwrap();
        let mut built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        (built.meta.clone(), read_all(&mut built.snapshot).await)
    };
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let (last, membership) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(log_id(1, 0, 152)));
    assert_eq!(membership, built_meta.last_membership);
    let mut current = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("snapshot after reopen");
    assert_eq!(current.meta, built_meta);
    let bytes = read_all(&mut current.snapshot).await;
    assert_eq!(bytes, built_bytes, "same state, same dump");

    // Install it on a fresh node: state swapped, store persisted, survives that node's
    // reopen, every task readable there.
    let other = tempfile::tempdir().unwrap();
    {
        let mut sm2 = StateMachineStore::open(other.path()).unwrap();
        let mut buf = sm2.begin_receiving_snapshot().await.unwrap();
        // In uneven pieces, as chunks arrive.
        for piece in bytes.chunks(1000) {
            buf.write_all(piece).await.unwrap();
        }
        sm2.install_snapshot(&current.meta, buf).await.unwrap();
        assert_eq!(
            sm2.applied_state().await.unwrap().0,
            Some(log_id(1, 0, 152))
        );
        assert_eq!(sm2.table().last_applied(), Some(log_id(1, 0, 152)));
    }
    let mut sm2 = StateMachineStore::open(other.path()).unwrap();
    assert_eq!(sm2.applied_state().await.unwrap(), (last, membership));
    assert_eq!(
        sm2.get_current_snapshot().await.unwrap().unwrap().meta,
        built_meta
    );
    let table = sm2.table();
    for id in 1..=50 {
        match table.lookup(id).unwrap() {
            Lookup::Found(t) => {
                assert_eq!(t.output.as_deref(), Some(format!("out {id}").as_bytes()))
            }
            other => panic!("task {id}: {other:?}"),
        }
        assert_eq!(
            table.by_idempotency_key(&format!("key-{id}")).unwrap(),
            Some(id)
        );
    }
    assert!(
        matches!(table.lookup(51).unwrap(), Lookup::Found(t) if t.state == swarm_proto::api::TaskState::Queued)
    );
    assert_eq!(
        table.read().count(swarm_proto::api::TaskState::Succeeded),
        50
    );
}

#[tokio::test]
async fn install_of_a_damaged_snapshot_is_refused_and_changes_nothing() {
    use tokio::io::AsyncWriteExt;
    let src = tempfile::tempdir().unwrap();
    let (good, bytes) = {
        let mut sm = StateMachineStore::open(src.path()).unwrap();
        sm.apply(task_entries(1, 1, 1)).await.unwrap();
        let mut good = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let bytes = read_all(&mut good.snapshot).await;
        (good, bytes)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let mut damaged = vec![vec![0xff; 16], bytes[..bytes.len() - 3].to_vec()];
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    damaged.push(flipped);
    for bad in damaged {
        let mut buf = sm.begin_receiving_snapshot().await.unwrap();
        buf.write_all(&bad).await.unwrap();
        assert!(sm.install_snapshot(&good.meta, buf).await.is_err());
        // Nothing was persisted or swapped in.
        assert_eq!(sm.applied_state().await.unwrap().0, None);
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
    }
    drop(sm);
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, None);
    // The good one installs.
    let mut buf = sm.begin_receiving_snapshot().await.unwrap();
    buf.write_all(&bytes).await.unwrap();
    sm.install_snapshot(&good.meta, buf).await.unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 0, 3)));
}

#[test]
fn a_data_dir_of_the_old_format_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(OLD_SNAPSHOT_FILE), b"SWSNAP03...").unwrap();
    let err = StateMachineStore::open(dir.path()).err().expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("format 1") && msg.contains("start this node"),
        "{msg}"
    );
}

/// Three Raft nodes talking over real mutual-TLS QUIC on loopback.
mod network {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use openraft::raft::VoteRequest;
    use openraft::{Config, ServerState, Vote};
    use swarm_coordinator::raft::network::{RaftRequest, RaftResponse, CLOSE_NOT_COORDINATOR};
    use swarm_coordinator::raft::{
        raft_config, serve_raft_connection, NodeAddr, QuicRaftNetwork, Raft, RedbLogStore,
        StateMachineStore,
    };
    use swarm_coordinator::state::Command;
    use swarm_proto::ALPN_RAFT;
    use swarm_transport::{
        client_config, client_endpoint, init_certs, server_config, server_endpoint, FrameReader,
        FrameWriter, Identity, Role,
    };
    use tempfile::TempDir;

    /// Generous bound for every wait: only there so that a broken test fails instead of hanging.
    const WAIT: Option<Duration> = Some(Duration::from_secs(30));

    struct TestNode {
        id: u64,
        raft: Raft,
        sm: StateMachineStore,
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
    }

    impl TestNode {
        async fn start(
            id: u64,
            certs: &Path,
            data: &Path,
            bind: SocketAddr,
            config: Arc<Config>,
        ) -> Self {
            let identity = Identity::load(certs, Role::Coordinator).unwrap();
            let endpoint =
                server_endpoint(bind, server_config(&identity, &[ALPN_RAFT]).unwrap()).unwrap();
            let addr = endpoint.local_addr().unwrap();
            let log = RedbLogStore::open(data).unwrap();
            let sm = StateMachineStore::open(data).unwrap();
            let network = QuicRaftNetwork::new(
                endpoint.clone(),
                client_config(&identity, ALPN_RAFT, swarm_transport::Role::Coordinator).unwrap(),
                identity.clone(),
            );
            let raft = Raft::new(id, config, network, log, sm.clone())
                .await
                .unwrap();

            let (ep, r, arrivals) = (endpoint.clone(), raft.clone(), sm.arrivals());
            tokio::spawn(async move {
                while let Some(incoming) = ep.accept().await {
                    let raft = r.clone();
                    let arrivals = arrivals.clone();
                    tokio::spawn(async move {
                        let Ok(mut accepted) = swarm_transport::accept(incoming).await else {
                            return;
                        };
                        // Only wait for the handshake here: the role check under test is the
                        // one inside `serve_raft_connection`.
                        if accepted.authenticate().await.is_err() {
                            return;
                        }
                        serve_raft_connection(accepted.conn, raft, arrivals).await;
                    });
                }
            });
            Self {
                id,
                raft,
                sm,
                endpoint,
                addr,
            }
        }

        async fn kill(self) {
            self.raft.shutdown().await.unwrap();
            self.endpoint.close(quinn::VarInt::from_u32(0), b"killed");
            self.endpoint.wait_idle().await;
        }
    }

    fn test_config() -> Arc<Config> {
        let mut config = raft_config("test", swarm_coordinator::raft::SNAPSHOT_EVERY_LOGS);
        // Let the test force a follower to need a snapshot.
        config.max_in_snapshot_log_to_keep = 0;
        config.purge_batch_size = 1;
        Arc::new(config.validate().unwrap())
    }

    async fn wait_leader(nodes: &[&TestNode], not: Option<u64>) -> u64 {
        let m = nodes[0]
            .raft
            .wait(WAIT)
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != not,
                "a leader",
            )
            .await
            .unwrap();
        let leader = m.current_leader.unwrap();
        // Everyone agrees.
        for n in nodes {
            n.raft
                .wait(WAIT)
                .current_leader(leader, "same leader")
                .await
                .unwrap();
        }
        leader
    }

    async fn write(leader: &TestNode, n: usize) -> u64 {
        let mut last = 0;
        for _ in 0..n {
            let resp = leader.raft.client_write(Command::default()).await.unwrap();
            last = resp.log_id.index;
        }
        last
    }

    async fn wait_applied(nodes: &[&TestNode], index: u64) {
        for n in nodes {
            n.raft
                .wait(WAIT)
                .applied_index_at_least(Some(index), format!("node {} applies {index}", n.id))
                .await
                .unwrap();
            assert!(n.sm.table().last_applied().unwrap().index >= index);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_replicate_fail_over_and_catch_up_by_snapshot() {
        let certs = TempDir::new().unwrap();
        init_certs(certs.path(), &[], false).unwrap();
        let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
        let config = test_config();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();

        let mut nodes = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            nodes.push(Some(
                TestNode::start(i as u64 + 1, certs.path(), dir.path(), any, config.clone()).await,
            ));
        }
        let members: BTreeMap<u64, NodeAddr> = nodes
            .iter()
            .flatten()
            .map(|n| {
                (
                    n.id,
                    NodeAddr {
                        raft_addr: n.addr.to_string(),
                        api_addr: String::new(),
                    },
                )
            })
            .collect();
        nodes[0]
            .as_ref()
            .unwrap()
            .raft
            .initialize(members)
            .await
            .unwrap();

        let all: Vec<&TestNode> = nodes.iter().flatten().collect();
        let leader = wait_leader(&all, None).await;
        let last = write(all[leader as usize - 1], 5).await;
        wait_applied(&all, last).await;

        // Kill the leader: the other two elect a new one, which accepts writes.
        let old = nodes[leader as usize - 1].take().unwrap();
        let old_addr = old.addr;
        old.kill().await;
        let alive: Vec<&TestNode> = nodes.iter().flatten().collect();
        let new_leader = wait_leader(&alive, Some(leader)).await;
        assert_ne!(new_leader, leader);
        let new_leader_node = alive.iter().find(|n| n.id == new_leader).unwrap();
        let last = write(new_leader_node, 3).await;
        wait_applied(&alive, last).await;

        // Snapshot and purge on the new leader, so the old node can only catch up by snapshot.
        new_leader_node.raft.trigger().snapshot().await.unwrap();
        new_leader_node
            .raft
            .wait(WAIT)
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= last),
                "snapshot built",
            )
            .await
            .unwrap();
        new_leader_node
            .raft
            .trigger()
            .purge_log(last)
            .await
            .unwrap();
        new_leader_node
            .raft
            .wait(WAIT)
            .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "log purged")
            .await
            .unwrap();

        // Restart the old leader on its old address with its old data: the new leader redials
        // it, sends the snapshot over QUIC, and it applies everything.
        let restarted = TestNode::start(
            leader,
            certs.path(),
            dirs[leader as usize - 1].path(),
            old_addr,
            config.clone(),
        )
        .await;
        let last = write(new_leader_node, 2).await;
        wait_applied(&[&restarted], last).await;
        assert!(
            restarted.sm.snapshot_meta().is_some(),
            "caught up through an installed snapshot"
        );
        wait_applied(&alive, last).await;

        for n in alive {
            n.raft.shutdown().await.unwrap();
        }
        restarted.raft.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_certificate_cannot_send_raft_rpcs() {
        let certs = TempDir::new().unwrap();
        init_certs(certs.path(), &[], false).unwrap();
        let dir = TempDir::new().unwrap();
        let node = TestNode::start(
            1,
            certs.path(),
            dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            test_config(),
        )
        .await;
        let term_before = node.raft.metrics().borrow().current_term;

        let worker = Identity::load(certs.path(), Role::Worker).unwrap();
        let ep = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut dialed = swarm_transport::dial(
            &ep,
            &client_config(&worker, ALPN_RAFT, swarm_transport::Role::Coordinator).unwrap(),
            node.addr,
            "127.0.0.1",
        )
        .await
        .unwrap();
        dialed.handshake().await.unwrap();
        let conn = dialed.conn;
        // A vote for a much later term: if it were served, the node's term would jump.
        let attempt = async {
            let (send, recv) = conn.open_bi().await?;
            let mut w = FrameWriter::new(send);
            w.send(&RaftRequest::Vote(VoteRequest::new(
                Vote::new(1_000, 9),
                None,
            )))
            .await?;
            w.finish()?;
            let mut r = FrameReader::new(recv);
            Ok::<_, anyhow::Error>(r.recv::<RaftResponse>().await?)
        };
        assert!(
            !matches!(attempt.await, Ok(Some(_))),
            "a worker got a Raft response"
        );
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(
                    close.error_code,
                    quinn::VarInt::from_u32(CLOSE_NOT_COORDINATOR)
                );
            }
            other => panic!("unexpected close: {other}"),
        }
        assert_eq!(node.raft.metrics().borrow().current_term, term_before);
        node.kill().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_malformed_request_only_costs_its_stream() {
        let certs = TempDir::new().unwrap();
        init_certs(certs.path(), &[], false).unwrap();
        let dir = TempDir::new().unwrap();
        let node = TestNode::start(
            1,
            certs.path(),
            dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            test_config(),
        )
        .await;
        node.raft
            .initialize(BTreeMap::from([(
                1,
                NodeAddr {
                    raft_addr: node.addr.to_string(),
                    api_addr: String::new(),
                },
            )]))
            .await
            .unwrap();
        node.raft
            .wait(WAIT)
            .state(ServerState::Leader, "single-node leader")
            .await
            .unwrap();

        let coordinator = Identity::load(certs.path(), Role::Coordinator).unwrap();
        let ep = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut dialed = swarm_transport::dial(
            &ep,
            &client_config(&coordinator, ALPN_RAFT, swarm_transport::Role::Coordinator).unwrap(),
            node.addr,
            "localhost",
        )
        .await
        .unwrap();
        dialed.handshake().await.unwrap();
        let conn = dialed.conn;

        // A well-framed but undecodable request: its stream is reset, nothing else happens.
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        send.finish().unwrap();
        let got = FrameReader::new(recv).recv::<RaftResponse>().await;
        assert!(got.is_err(), "malformed request must not be answered");

        // The connection still serves well-formed requests (a stale vote is simply refused).
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut w = FrameWriter::new(send);
        w.send(&RaftRequest::Vote(VoteRequest::new(Vote::new(0, 9), None)))
            .await
            .unwrap();
        w.finish().unwrap();
        match FrameReader::new(recv).recv::<RaftResponse>().await.unwrap() {
            Some(RaftResponse::Vote(Ok(resp))) => assert!(!resp.vote_granted),
            _ => panic!("expected a vote response"),
        }
        assert!(conn.close_reason().is_none());
        node.kill().await;
    }
}
