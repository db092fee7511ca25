//! Two workers in a mesh behind a tiny fake coordinator: real QUIC, real certificates,
//! the public API only.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use swarm_proto::worker::{
    AttemptRef, CoordinatorMsg, Hello, Outcome, PeerInfo, TaskAssignment, WorkerMsg,
};
use swarm_proto::{ALPN_WORKER, PROTOCOL_VERSION};
use swarm_transport::tls::{client_config, init_certs, server_config, Identity, Role};
use swarm_transport::{FrameReader, FrameWriter};
use swarm_worker::{Backoff, Worker, WorkerParams, WorkerStats};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

struct Session {
    writer: FrameWriter,
    reader: FrameReader,
    hello: Hello,
}

impl Session {
    async fn send(&mut self, msg: CoordinatorMsg) {
        self.writer.send(&msg).await.unwrap();
    }

    async fn recv(&mut self) -> WorkerMsg {
        within("worker message", self.reader.recv::<WorkerMsg>())
            .await
            .unwrap()
            .expect("worker went away")
    }
}

async fn accept(endpoint: &quinn::Endpoint) -> Session {
    within("accept", async {
        let incoming = endpoint.accept().await.expect("endpoint closed");
        let mut accepted = swarm_transport::accept(incoming).await.unwrap();
        let (writer, mut reader) = accepted.accept_stream().await.unwrap();
        let first: WorkerMsg = reader.recv().await.unwrap().unwrap();
        accepted.authenticate_as(Role::Worker).await.unwrap();
        let WorkerMsg::Hello(hello) = first else {
            panic!("expected Hello, got {first:?}")
        };
        Session {
            writer,
            reader,
            hello,
        }
    })
    .await
}

struct Running {
    stats: watch::Receiver<WorkerStats>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

fn start_worker(certs: &Path, coord: SocketAddr, id: &str, slots: u32) -> Running {
    let identity = Identity::load(certs, Role::Worker).unwrap();
    let client = client_config(&identity, ALPN_WORKER, swarm_transport::Role::Coordinator).unwrap();
    let mut params = WorkerParams::new(id, client, coord, "localhost");
    params.slots = slots;
    params.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    params.peer_listen = Some("127.0.0.1:0".parse().unwrap());
    params.peer_identity = Some(identity);
    let worker = Worker::new(params).unwrap();
    let stats = worker.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    Running { stats, stop, task }
}

fn attempt(task_id: u64) -> AttemptRef {
    AttemptRef {
        task_id,
        attempt: 1,
    }
}

fn run(a: AttemptRef, agent: &str, payload: &str) -> CoordinatorMsg {
    CoordinatorMsg::Run(TaskAssignment {
        attempt: a,
        agent: agent.into(),
        payload: payload.as_bytes().to_vec(),
        timeout_ms: 600_000,
        idempotency_key: None,
        patterns: 0,
        swarm: "mesh".into(),
        term: 1,
    })
}

#[tokio::test]
async fn workers_link_and_the_idle_one_steals_through_the_coordinator_session() {
    let certs = tempfile::tempdir().unwrap();
    init_certs(certs.path(), &[], false).unwrap();
    let coord_id = Identity::load(certs.path(), Role::Coordinator).unwrap();
    let endpoint = swarm_transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        server_config(&coord_id, &[ALPN_WORKER]).unwrap(),
    )
    .unwrap();
    let coord = endpoint.local_addr().unwrap();

    let busy = start_worker(certs.path(), coord, "w-busy", 1);
    let idle = start_worker(certs.path(), coord, "w-idle", 2);
    let mut sessions: BTreeMap<String, Session> = BTreeMap::new();
    for _ in 0..2 {
        let s = accept(&endpoint).await;
        sessions.insert(s.hello.worker_id.clone(), s);
    }
    let mut addrs = BTreeMap::new();
    for (id, s) in &mut sessions {
        let addr = s.hello.peer_addr.clone().expect("peer_addr advertised");
        let parsed: SocketAddr = addr.parse().unwrap();
        assert!(parsed.ip().is_loopback() && parsed.port() != 0, "{addr}");
        addrs.insert(id.clone(), addr);
        s.send(CoordinatorMsg::Welcome {
            protocol: PROTOCOL_VERSION,
            heartbeat_interval_ms: 50,
            max_output_bytes: 1 << 20,
            term: 1,
        })
        .await;
    }
    assert_eq!(
        busy.stats.borrow().peer_addr.as_deref(),
        Some(addrs["w-busy"].as_str())
    );
    let mut b = sessions.remove("w-busy").unwrap();
    let mut i = sessions.remove("w-idle").unwrap();

    // The busy worker's only slot runs a long sleep; six echoes wait in its queue.
    b.send(run(attempt(1), "sleep", "600000")).await;
    let queued: BTreeSet<AttemptRef> = (10..16).map(attempt).collect();
    for a in &queued {
        b.send(run(*a, "echo", "x")).await;
    }
    // Link them only once a heartbeat lists the whole queue: later heartbeats then show
    // what the steals did.
    within("heartbeat listing the queue", async {
        loop {
            match b.recv().await {
                WorkerMsg::Heartbeat { running } if running.len() == 7 => break,
                WorkerMsg::Heartbeat { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    for (s, other) in [(&mut b, "w-idle"), (&mut i, "w-busy")] {
        s.send(CoordinatorMsg::Peers {
            swarm: "mesh".into(),
            peers: vec![PeerInfo {
                worker_id: other.into(),
                addr: addrs[other].clone(),
            }],
        })
        .await;
    }

    // The idle worker announces each steal, then reports it.
    let mut stole = BTreeSet::new();
    let mut finished = BTreeSet::new();
    while finished.len() < queued.len() {
        match i.recv().await {
            WorkerMsg::Heartbeat { .. } => {}
            WorkerMsg::Stole { attempt, from } => {
                assert_eq!(from, "w-busy");
                assert!(stole.insert(attempt), "{attempt:?} stolen twice");
            }
            WorkerMsg::Finished(r) => {
                assert!(
                    stole.contains(&r.attempt),
                    "{:?} reported before Stole",
                    r.attempt
                );
                assert!(finished.insert(r.attempt), "{:?} reported twice", r.attempt);
                assert!(matches!(r.outcome, Outcome::Succeeded { .. }), "{r:?}");
                i.send(CoordinatorMsg::Ack(r.attempt)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stole, queued);

    // The busy worker's heartbeats stop listing what it gave away; it reports nothing
    // for those attempts.
    within("heartbeat without the given attempts", async {
        loop {
            match b.recv().await {
                WorkerMsg::Heartbeat { running } if running == vec![attempt(1)] => break,
                WorkerMsg::Heartbeat { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    let mut bs = busy.stats.clone();
    within(
        "busy stats",
        bs.wait_for(|s| s.steals_out == 6 && s.peers_connected == 1),
    )
    .await
    .unwrap();
    let mut is = idle.stats.clone();
    within(
        "idle stats",
        is.wait_for(|s| s.steals_in == 6 && s.acked == 6),
    )
    .await
    .unwrap();

    for w in [busy, idle] {
        let _ = w.stop.send(());
        within("worker stops", w.task).await.unwrap().unwrap();
    }
}

#[test]
fn a_peer_listener_needs_a_worker_identity() {
    let certs = tempfile::tempdir().unwrap();
    init_certs(certs.path(), &[], false).unwrap();
    let worker = Identity::load(certs.path(), Role::Worker).unwrap();
    let client = client_config(&worker, ALPN_WORKER, swarm_transport::Role::Coordinator).unwrap();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();

    let mut p = WorkerParams::new("w", client.clone(), addr, "localhost");
    p.peer_listen = Some("127.0.0.1:0".parse().unwrap());
    let err = Worker::new(p).unwrap_err().to_string();
    assert!(err.contains("identity"), "{err}");

    let mut p = WorkerParams::new("w", client.clone(), addr, "localhost");
    p.peer_listen = Some("127.0.0.1:0".parse().unwrap());
    p.peer_identity = Some(Identity::load(certs.path(), Role::Coordinator).unwrap());
    let err = Worker::new(p).unwrap_err().to_string();
    assert!(err.contains("worker certificate"), "{err}");

    let mut p = WorkerParams::new("w", client, addr, "localhost");
    p.peer_listen = Some("127.0.0.1:0".parse().unwrap());
    p.peer_identity = Some(worker);
    p.peer_advertise = Some("no-port".into());
    assert!(Worker::new(p).is_err());
}

#[tokio::test]
async fn an_unspecified_listen_address_needs_an_advertised_one() {
    let certs = tempfile::tempdir().unwrap();
    init_certs(certs.path(), &[], false).unwrap();
    let worker = Identity::load(certs.path(), Role::Worker).unwrap();
    let client = client_config(&worker, ALPN_WORKER, swarm_transport::Role::Coordinator).unwrap();
    let mut p = WorkerParams::new("w", client, "127.0.0.1:1".parse().unwrap(), "localhost");
    p.peer_listen = Some("0.0.0.0:0".parse().unwrap());
    p.peer_identity = Some(worker);
    let err = within(
        "run fails",
        Worker::new(p).unwrap().run(std::future::pending()),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("advertise"), "{err:#}");
}

#[tokio::test]
async fn dropping_a_running_worker_releases_its_peer_listener() {
    let certs = tempfile::tempdir().unwrap();
    init_certs(certs.path(), &[], false).unwrap();
    // No coordinator listens there: the worker keeps redialling.
    let w = start_worker(certs.path(), "127.0.0.1:1".parse().unwrap(), "w-gone", 1);
    let mut stats = w.stats.clone();
    let addr: SocketAddr = within("listener bound", stats.wait_for(|s| s.peer_addr.is_some()))
        .await
        .unwrap()
        .peer_addr
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    w.task.abort();
    let _ = w.task.await;
    drop(w.stop);
    // Once every task of the worker has stopped, the UDP port is free again.
    within("port released", async {
        while std::net::UdpSocket::bind(addr).is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
