//! Peer links between real worker cores over real QUIC on loopback, with real
//! certificates. The coordinator is played through the core's command channel: each
//! node's core is "connected" to a channel the test reads.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use swarm_proto::worker::{CoordinatorMsg, FailureKind, Outcome, TaskReport, WorkerMsg};
use swarm_transport::tls::init_certs;

use super::*;
use crate::agents::Agents;
use crate::core::Core;
use crate::executor::Executor;

/// Upper bound on any single wait, so a broken test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    init_certs(dir.path(), &[], false).unwrap();
    dir
}

fn fast() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    }
}

/// One worker minus its coordinator connection: core + peer service.
struct Node {
    id: String,
    core: mpsc::UnboundedSender<Command>,
    stats: watch::Receiver<WorkerStats>,
    /// What the core sends to "the coordinator".
    coord: mpsc::UnboundedReceiver<WorkerMsg>,
    service: Option<PeerService>,
    addr: String,
}

impl Node {
    fn start(certs: &Path, id: &str, slots: u32) -> Node {
        let stats = watch::Sender::new(WorkerStats::default());
        let (core_tx, core_rx) = mpsc::unbounded_channel();
        let mut core = Core::new(Executor::new(Agents::builtin()), slots, stats.clone());
        let setup = PeerSetup {
            worker_id: id.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            server_name: "localhost".into(),
            identity: Identity::load(certs, Role::Worker).unwrap(),
            backoff: fast(),
        };
        let service = PeerService::start(
            setup,
            core_tx.clone(),
            core.load(),
            stats.clone(),
            watch::Sender::new(None).subscribe(),
        )
        .unwrap();
        core.set_peer_ctl(service.ctl());
        tokio::spawn(core.run(core_rx));
        let (sink, coord) = mpsc::unbounded_channel();
        core_tx
            .send(Command::Connected {
                sink,
                output_budget: Default::default(),
                heartbeat: Duration::from_secs(3600),
                max_output_bytes: 1 << 20,
                term: 1,
            })
            .unwrap();
        Node {
            id: id.into(),
            core: core_tx,
            stats: stats.subscribe(),
            coord,
            addr: service.advertised.clone(),
            service: Some(service),
        }
    }

    fn coordinator(&self, msg: CoordinatorMsg) {
        self.core.send(Command::Coordinator(msg)).unwrap();
    }

    fn peers(&self, peers: &[(&str, &str)]) {
        self.coordinator(CoordinatorMsg::Peers {
            swarm: "mesh".into(),
            peers: peers
                .iter()
                .map(|(id, addr)| PeerInfo {
                    worker_id: (*id).into(),
                    addr: (*addr).into(),
                })
                .collect(),
        });
    }

    fn link_to(&self, other: &Node) {
        self.peers(&[(&other.id, &other.addr)]);
    }

    async fn wait(&mut self, what: &str, pred: impl Fn(&WorkerStats) -> bool) -> WorkerStats {
        within(what, self.stats.wait_for(|s| pred(s)))
            .await
            .unwrap()
            .clone()
    }

    /// The next message the core sends to the coordinator, skipping heartbeats.
    async fn next_msg(&mut self) -> WorkerMsg {
        loop {
            match within("coordinator message", self.coord.recv()).await {
                Some(WorkerMsg::Heartbeat { .. }) => continue,
                Some(m) => return m,
                None => panic!("core stopped"),
            }
        }
    }

    /// Every message sent so far, without waiting.
    fn drain(&mut self) -> Vec<WorkerMsg> {
        let mut v = Vec::new();
        while let Ok(m) = self.coord.try_recv() {
            if !matches!(m, WorkerMsg::Heartbeat { .. }) {
                v.push(m);
            }
        }
        v
    }

    async fn held(&self) -> Vec<AttemptRef> {
        let (tx, rx) = oneshot::channel();
        self.core.send(Command::Snapshot(tx)).unwrap();
        rx.await.unwrap()
    }

    async fn stop_peers(&mut self) {
        if let Some(s) = self.service.take() {
            within("peer service shutdown", s.shutdown()).await;
        }
    }
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

/// A client config for dialing a peer listener as `role`.
fn peer_client(certs: &Path, role: Role) -> quinn::ClientConfig {
    client_config(
        &Identity::load(certs, role).unwrap(),
        ALPN_PEER,
        Role::Worker,
    )
    .unwrap()
}

/// Dials `addr` as worker `id` and completes the `Hello` exchange.
async fn fake_peer(
    certs: &Path,
    addr: &str,
    id: &str,
) -> (quinn::Connection, FrameWriter, FrameReader) {
    let endpoint = swarm_transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let sock: SocketAddr = addr.parse().unwrap();
    let dialed = swarm_transport::dial(
        &endpoint,
        &peer_client(certs, Role::Worker),
        sock,
        "localhost",
    )
    .await
    .unwrap();
    let hello = PeerMsg::Hello {
        protocol: PROTOCOL_VERSION,
        worker_id: id.into(),
    };
    let s = within(
        "fake peer session",
        swarm_transport::open_session(dialed, &hello),
    )
    .await
    .unwrap();
    let mut reader = s.reader;
    let first = within("peer Hello", reader.recv::<PeerMsg>())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&first, PeerMsg::Hello { protocol, .. } if *protocol == PROTOCOL_VERSION),
        "{first:?}"
    );
    (s.conn, s.writer, reader)
}

fn app_close_code(e: &quinn::ConnectionError) -> Option<u64> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
        _ => None,
    }
}

#[tokio::test]
async fn idle_worker_steals_queued_attempts_without_loss_or_duplication() {
    let certs = certs();
    // The victim has the smaller id, so it dials; the thief accepts.
    let mut victim = Node::start(certs.path(), "w-a", 1);
    let mut thief = Node::start(certs.path(), "w-b", 4);

    // The victim's only slot is taken by a long sleep; 12 echoes wait in its queue.
    victim.coordinator(run(attempt(1), "sleep", "600000"));
    const N: u64 = 12;
    let queued: BTreeSet<AttemptRef> = (100..100 + N).map(attempt).collect();
    for a in &queued {
        victim.coordinator(run(*a, "echo", "x"));
    }
    victim
        .wait("victim queue filled", |s| {
            s.running == 1 && s.queued == N as usize
        })
        .await;

    victim.link_to(&thief);
    thief.link_to(&victim);
    thief.wait("link up", |s| s.peers_connected == 1).await;

    // The thief takes everything beyond the victim's (zero) free slots.
    let s = victim.wait("victim queue drained", |s| s.queued == 0).await;
    assert_eq!(s.running, 1, "the running attempt is never given away");
    thief
        .wait("thief ran all stolen attempts", |s| s.finished == N)
        .await;

    // Every attempt was announced with Stole before its report, exactly once.
    let mut stole = BTreeSet::new();
    let mut finished = BTreeSet::new();
    while finished.len() < N as usize {
        match thief.next_msg().await {
            WorkerMsg::Stole { attempt, from } => {
                assert_eq!(from, "w-a");
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
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stole, queued);
    assert_eq!(finished, queued);
    let ts = thief.stats.borrow().clone();
    assert_eq!((ts.steals_in, ts.steals_out), (N, 0));
    let vs = victim.stats.borrow().clone();
    assert_eq!((vs.steals_in, vs.steals_out), (0, N));

    // The victim no longer lists what it gave away, and reported nothing for it.
    assert_eq!(victim.held().await, vec![attempt(1)]);
    assert!(
        victim
            .drain()
            .iter()
            .all(|m| !matches!(m, WorkerMsg::Finished(_) | WorkerMsg::Stole { .. })),
        "victim reported a given attempt"
    );

    // The victim's own attempt still ends normally.
    victim.coordinator(CoordinatorMsg::Cancel(attempt(1)));
    match victim.next_msg().await {
        WorkerMsg::Finished(r) => {
            assert_eq!(r.attempt, attempt(1));
            assert!(matches!(
                r.outcome,
                Outcome::Failed {
                    kind: FailureKind::Cancelled,
                    ..
                }
            ));
        }
        other => panic!("unexpected {other:?}"),
    }
    victim.stop_peers().await;
    thief.stop_peers().await;
}

#[tokio::test]
async fn refused_steal_is_reported_cancelled() {
    let certs = certs();
    let mut victim = Node::start(certs.path(), "w-a", 1);
    let mut thief = Node::start(certs.path(), "w-b", 1);
    victim.coordinator(run(attempt(1), "sleep", "600000"));
    victim.coordinator(run(attempt(2), "sleep", "600000"));
    victim.wait("queued", |s| s.queued == 1).await;
    victim.link_to(&thief);
    thief.link_to(&victim);

    match thief.next_msg().await {
        WorkerMsg::Stole { attempt: a, from } => {
            assert_eq!((a, from.as_str()), (attempt(2), "w-a"));
        }
        other => panic!("unexpected {other:?}"),
    }
    thief
        .wait("stolen attempt running", |s| s.running == 1)
        .await;
    // The coordinator refuses the move.
    thief.coordinator(CoordinatorMsg::Cancel(attempt(2)));
    match thief.next_msg().await {
        WorkerMsg::Finished(TaskReport {
            attempt: a,
            outcome:
                Outcome::Failed {
                    kind: FailureKind::Cancelled,
                    ..
                },
            ..
        }) => assert_eq!(a, attempt(2)),
        other => panic!("unexpected {other:?}"),
    }
    victim.stop_peers().await;
    thief.stop_peers().await;
}

#[tokio::test]
async fn malformed_frame_closes_the_link_without_panicking() {
    let certs = certs();
    let mut node = Node::start(certs.path(), "w-m", 2);
    // "w-a" is smaller, so it dials the node.
    node.peers(&[("w-a", "127.0.0.1:9")]);

    let (conn, mut writer, _reader) = fake_peer(certs.path(), &node.addr, "w-a").await;
    node.wait("link up", |s| s.peers_connected == 1).await;
    // A frame whose payload is not a PeerMsg.
    writer
        .get_mut()
        .write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let err = within("link closed", conn.closed()).await;
    assert_eq!(
        app_close_code(&err),
        Some(u64::from(CLOSE_PROTOCOL_ERROR)),
        "{err:?}"
    );
    let s = node.wait("loss noticed", |s| s.peers_connected == 0).await;
    assert_eq!(s.peers_lost, 1);
    match node.next_msg().await {
        WorkerMsg::PeerLost { peer } => assert_eq!(peer, "w-a"),
        other => panic!("unexpected {other:?}"),
    }

    // An oversize length prefix is malformed too.
    let (conn, mut writer, _reader) = fake_peer(certs.path(), &node.addr, "w-a").await;
    node.wait("link up again", |s| s.peers_connected == 1).await;
    writer
        .get_mut()
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .unwrap();
    let err = within("link closed", conn.closed()).await;
    assert_eq!(app_close_code(&err), Some(u64::from(CLOSE_PROTOCOL_ERROR)));
    node.wait("second loss noticed", |s| s.peers_lost == 2)
        .await;

    // The node keeps serving links.
    let (_conn, _writer, _reader) = fake_peer(certs.path(), &node.addr, "w-a").await;
    node.wait("link up a third time", |s| s.peers_connected == 1)
        .await;
    node.stop_peers().await;
}

#[tokio::test]
async fn unlisted_or_accepting_side_dialers_are_refused() {
    let certs = certs();
    let mut node = Node::start(certs.path(), "w-m", 2);
    node.peers(&[("w-z", "127.0.0.1:9")]);
    for id in ["w-unknown", "w-z"] {
        // Unlisted, and listed but with a larger id (the node dials it, not vice versa).
        let (conn, _writer, mut reader) = {
            let endpoint =
                swarm_transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
            let dialed = swarm_transport::dial(
                &endpoint,
                &peer_client(certs.path(), Role::Worker),
                node.addr.parse().unwrap(),
                "localhost",
            )
            .await
            .unwrap();
            let hello = PeerMsg::Hello {
                protocol: PROTOCOL_VERSION,
                worker_id: id.into(),
            };
            let s = swarm_transport::open_session(dialed, &hello).await.unwrap();
            (s.conn, s.writer, s.reader)
        };
        assert!(within("refusal", reader.recv::<PeerMsg>()).await.is_err());
        let err = within("closed", conn.closed()).await;
        assert_eq!(
            app_close_code(&err),
            Some(u64::from(CLOSE_NOT_PEER)),
            "{id}: {err:?}"
        );
    }
    assert_eq!(node.stats.borrow().peers_connected, 0);
    node.stop_peers().await;
}

#[tokio::test]
async fn peers_with_a_coordinator_certificate_are_refused() {
    let certs = certs();
    let mut node = Node::start(certs.path(), "w-m", 2);
    node.peers(&[("w-a", "127.0.0.1:9")]);

    // Dialing in with a coordinator certificate.
    let endpoint = swarm_transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let dialed = swarm_transport::dial(
        &endpoint,
        &peer_client(certs.path(), Role::Coordinator),
        node.addr.parse().unwrap(),
        "localhost",
    )
    .await
    .unwrap();
    let hello = PeerMsg::Hello {
        protocol: PROTOCOL_VERSION,
        worker_id: "w-a".into(),
    };
    let conn = dialed.conn.clone();
    // The session may or may not open before the node hangs up; either way it does.
    let _ = swarm_transport::open_session(dialed, &hello).await;
    let err = within("closed", conn.closed()).await;
    assert_eq!(
        app_close_code(&err),
        Some(u64::from(WRONG_ROLE_CODE)),
        "{err:?}"
    );
    assert_eq!(node.stats.borrow().peers_connected, 0);

    // Dialing out to a listener with a coordinator certificate.
    let coord_id = Identity::load(certs.path(), Role::Coordinator).unwrap();
    let server = server_config(&coord_id, &[ALPN_PEER]).unwrap();
    let fake = swarm_transport::server_endpoint("127.0.0.1:0".parse().unwrap(), server).unwrap();
    let fake_addr = fake.local_addr().unwrap().to_string();
    node.peers(&[("w-a", "127.0.0.1:9"), ("w-z", &fake_addr)]);
    let incoming = within("node dials the fake peer", fake.accept())
        .await
        .unwrap();
    // The node's TLS verifier refuses a server that is not a worker: the handshake fails
    // with a certificate alert, before any stream opens.
    let err = match within("handshake", incoming.accept().unwrap()).await {
        Err(e) => e,
        Ok(conn) => within("node hangs up", conn.closed()).await,
    };
    assert!(
        matches!(err, quinn::ConnectionError::ConnectionClosed(ref c) if String::from_utf8_lossy(&c.reason).contains("ApplicationVerificationFailure")),
        "{err:?}"
    );
    // After repeated refusals the peer is reported lost, once.
    match node.next_msg().await {
        WorkerMsg::PeerLost { peer } => assert_eq!(peer, "w-z"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(node.stats.borrow().peers_connected, 0);
    node.stop_peers().await;
    fake.close(0u32.into(), b"done");
}

/// A UDP relay between a dialer and a listener that can go silent, to make a peer
/// vanish without a close frame.
async fn relay(target: SocketAddr, silent: Arc<AtomicBool>) -> SocketAddr {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    if !silent.load(Ordering::Relaxed) {
                        let _ = back.send_to(&a[..n], target).await;
                    }
                }
                r = back.recv_from(&mut b) => {
                    let Ok((n, _)) = r else { return };
                    if let (Some(c), false) = (client, silent.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    });
    addr
}

#[tokio::test]
async fn silent_peer_is_detected_reported_once_and_redialed() {
    let certs = certs();
    let mut a = Node::start(certs.path(), "w-a", 2);
    let mut b = Node::start(certs.path(), "w-b", 2);
    let silent = Arc::new(AtomicBool::new(false));
    let via = relay(b.addr.parse().unwrap(), silent.clone()).await;
    // a dials b through the relay.
    a.peers(&[("w-b", &via.to_string())]);
    b.link_to(&a);
    a.wait("a linked", |s| s.peers_connected == 1).await;
    b.wait("b linked", |s| s.peers_connected == 1).await;

    silent.store(true, Ordering::Relaxed);
    let s = a.wait("a notices", |s| s.peers_connected == 0).await;
    assert_eq!(s.peers_lost, 1);
    b.wait("b notices", |s| s.peers_connected == 0).await;
    match a.next_msg().await {
        WorkerMsg::PeerLost { peer } => assert_eq!(peer, "w-b"),
        other => panic!("unexpected {other:?}"),
    }
    match b.next_msg().await {
        WorkerMsg::PeerLost { peer } => assert_eq!(peer, "w-a"),
        other => panic!("unexpected {other:?}"),
    }

    // a keeps redialling; once the path works again the link comes back, and the loss
    // was reported only once meanwhile.
    silent.store(false, Ordering::Relaxed);
    a.wait("a relinked", |s| s.peers_connected == 1).await;
    b.wait("b relinked", |s| s.peers_connected == 1).await;
    assert_eq!(a.stats.borrow().peers_lost, 1);
    assert!(
        a.drain()
            .iter()
            .all(|m| !matches!(m, WorkerMsg::PeerLost { .. })),
        "loss reported twice"
    );

    // Dropping the peer from the list closes the link without a loss report.
    a.peers(&[]);
    a.wait("a dropped the link", |s| s.peers_connected == 0)
        .await;
    assert_eq!(a.stats.borrow().peers_lost, 1);
    a.stop_peers().await;
    b.stop_peers().await;
}

#[tokio::test]
async fn gossiped_load_reaches_the_peer() {
    let certs = certs();
    let mut a = Node::start(certs.path(), "w-a", 3);
    let mut b = Node::start(certs.path(), "w-b", 1);
    let (conn, _w, mut reader) = {
        // Play "w-0" (smaller than "w-a", so it dials a) to watch a's gossip.
        a.peers(&[("w-0", "127.0.0.1:9"), ("w-b", &b.addr)]);
        fake_peer(certs.path(), &a.addr, "w-0").await
    };
    b.link_to(&a);
    a.wait("both links", |s| s.peers_connected == 2).await;
    a.coordinator(run(attempt(1), "sleep", "600000"));
    a.coordinator(run(attempt(2), "sleep", "600000"));
    // The change is gossiped (and then repeated as a keep-alive).
    let mut seen = Vec::new();
    within("load gossip", async {
        loop {
            match reader.recv::<PeerMsg>().await.unwrap().unwrap() {
                PeerMsg::Load {
                    running,
                    queued,
                    slots,
                } => {
                    assert_eq!(slots, 3);
                    assert_eq!(queued, 0);
                    seen.push(running);
                    if seen.iter().filter(|&&r| r == 2).count() >= 2 {
                        break;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let _ = b.wait("b still linked", |s| s.peers_connected == 1).await;
    conn.close(0u32.into(), b"done");
    a.stop_peers().await;
    b.stop_peers().await;
}
