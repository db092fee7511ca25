//! Hierarchical swarms: a lead worker relays a member's session to a fake coordinator.
//! Real QUIC on loopback, real certificates, the public API only.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use swarm_proto::worker::{
    AttemptRef, CoordinatorMsg, Hello, Outcome, PeerInfo, TaskAssignment, TaskReport, WorkerMsg,
};
use swarm_proto::{ALPN_RELAY, ALPN_WORKER, PROTOCOL_VERSION};
use swarm_transport::endpoint::WRONG_ROLE_CODE;
use swarm_transport::tls::{client_config, init_certs, server_config, Identity, Role};
use swarm_transport::{FrameReader, FrameWriter};
use swarm_worker::{Backoff, Worker, WorkerParams, WorkerStats, RELAY_CLOSE_NO_COORDINATOR};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// One worker session as the fake coordinator sees it (already welcomed).
struct Session {
    conn: quinn::Connection,
    /// Opened on a lead's connection after the lead's own session.
    relayed: bool,
    writer: FrameWriter,
    reader: FrameReader,
    hello: Hello,
}

impl Session {
    async fn send(&mut self, msg: CoordinatorMsg) {
        self.writer.send(&msg).await.unwrap();
    }

    /// The next frame other than a heartbeat.
    async fn recv(&mut self) -> WorkerMsg {
        loop {
            match within("worker message", self.reader.recv::<WorkerMsg>())
                .await
                .unwrap()
                .expect("worker went away")
            {
                WorkerMsg::Heartbeat { .. } => {}
                m => return m,
            }
        }
    }

    async fn finished(&mut self) -> TaskReport {
        match self.recv().await {
            WorkerMsg::Finished(r) => r,
            other => panic!("expected Finished, got {other:?}"),
        }
    }
}

/// A coordinator that welcomes every session: a worker's own on the first stream of its
/// connection, relayed ones on further streams.
struct FakeCoordinator {
    addr: SocketAddr,
    sessions: mpsc::UnboundedReceiver<Session>,
    _endpoint: quinn::Endpoint,
}

impl FakeCoordinator {
    fn start(certs: &Path) -> FakeCoordinator {
        let id = Identity::load(certs, Role::Coordinator).unwrap();
        let endpoint = swarm_transport::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            server_config(&id, &[ALPN_WORKER]).unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, sessions) = mpsc::unbounded_channel();
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(connection(incoming, tx.clone()));
            }
        });
        FakeCoordinator {
            addr,
            sessions,
            _endpoint: endpoint,
        }
    }

    async fn next(&mut self) -> Session {
        within("a session", self.sessions.recv())
            .await
            .expect("fake coordinator stopped")
    }
}

async fn welcome(
    conn: &quinn::Connection,
    relayed: bool,
    mut writer: FrameWriter,
    mut reader: FrameReader,
) -> Option<Session> {
    let WorkerMsg::Hello(hello) = reader.recv::<WorkerMsg>().await.ok()?? else {
        panic!("expected Hello first");
    };
    writer
        .send(&CoordinatorMsg::Welcome {
            protocol: PROTOCOL_VERSION,
            heartbeat_interval_ms: 200,
            max_output_bytes: 1 << 20,
            term: 1,
        })
        .await
        .ok()?;
    Some(Session {
        conn: conn.clone(),
        relayed,
        writer,
        reader,
        hello,
    })
}

async fn connection(incoming: quinn::Incoming, tx: mpsc::UnboundedSender<Session>) {
    let Ok(mut accepted) = swarm_transport::accept(incoming).await else {
        return;
    };
    let Ok((writer, reader)) = accepted.accept_stream().await else {
        return;
    };
    if accepted.authenticate_as(Role::Worker).await.is_err() {
        return;
    }
    let conn = accepted.conn.clone();
    let Some(own) = welcome(&conn, false, writer, reader).await else {
        return;
    };
    let _ = tx.send(own);
    while let Ok((send, recv)) = conn.accept_bi().await {
        let tx = tx.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            let (writer, reader) = (FrameWriter::new(send), FrameReader::new(recv));
            if let Some(s) = welcome(&conn, true, writer, reader).await {
                let _ = tx.send(s);
            }
        });
    }
}

struct Running {
    stats: watch::Receiver<WorkerStats>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn wait(&self, what: &str, pred: impl Fn(&WorkerStats) -> bool) -> WorkerStats {
        let mut stats = self.stats.clone();
        let got = within(what, stats.wait_for(|s| pred(s)))
            .await
            .unwrap()
            .clone();
        got
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        within("worker stops", self.task).await.unwrap().unwrap();
    }
}

fn start_worker(certs: &Path, coord: SocketAddr, id: &str) -> Running {
    let identity = Identity::load(certs, Role::Worker).unwrap();
    let client = client_config(&identity, ALPN_WORKER, swarm_transport::Role::Coordinator).unwrap();
    let mut params = WorkerParams::new(id, client, coord, "localhost");
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

fn certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    init_certs(dir.path(), &[], false).unwrap();
    dir
}

fn echo(task_id: u64, payload: &str) -> CoordinatorMsg {
    CoordinatorMsg::Run(TaskAssignment {
        attempt: AttemptRef {
            task_id,
            attempt: 1,
        },
        agent: "echo".into(),
        payload: payload.as_bytes().to_vec(),
        timeout_ms: 600_000,
        idempotency_key: None,
        patterns: 0,
        swarm: "default".into(),
        term: 1,
    })
}

/// The lead's and the member's direct sessions, in that order.
async fn both_direct(coord: &mut FakeCoordinator) -> (Session, Session) {
    let (mut lead, mut member) = (None, None);
    while lead.is_none() || member.is_none() {
        let s = coord.next().await;
        assert!(!s.relayed);
        match s.hello.worker_id.as_str() {
            "lead" => lead = Some(s),
            "member" => member = Some(s),
            other => panic!("unexpected worker {other}"),
        }
    }
    (lead.unwrap(), member.unwrap())
}

fn parent(lead: &Session) -> CoordinatorMsg {
    CoordinatorMsg::Parent {
        lead: Some(PeerInfo {
            worker_id: lead.hello.worker_id.clone(),
            addr: lead
                .hello
                .peer_addr
                .clone()
                .expect("lead advertises peer_addr"),
        }),
    }
}

#[tokio::test]
async fn a_member_runs_through_its_lead_and_falls_back_when_the_lead_dies() {
    let certs = certs();
    let mut coord = FakeCoordinator::start(certs.path());
    let lead = start_worker(certs.path(), coord.addr, "lead");
    let member = start_worker(certs.path(), coord.addr, "member");
    let (lead_session, mut direct) = both_direct(&mut coord).await;
    lead.wait("lead connected", |s| s.connected).await;
    member.wait("member connected", |s| s.connected).await;

    direct.send(parent(&lead_session)).await;

    // The member's next session is a second stream on the lead's connection.
    let mut relayed = coord.next().await;
    assert_eq!(relayed.hello.worker_id, "member");
    assert!(relayed.relayed);
    assert_eq!(relayed.conn.stable_id(), lead_session.conn.stable_id());
    // Its direct connection is gone.
    within("direct connection closed", direct.conn.closed()).await;
    let m = member
        .wait("member via lead", |s| {
            s.connected && s.via_lead.as_deref() == Some("lead")
        })
        .await;
    assert_eq!(m.connects, 2);
    let l = lead
        .wait("lead relays one session", |s| s.relayed_sessions == 1)
        .await;
    assert_eq!(l.relayed_total, 1);
    assert_eq!(l.via_lead, None);

    // Work flows through the relay both ways.
    relayed.send(echo(7, "through the lead")).await;
    let report = relayed.finished().await;
    assert_eq!(report.attempt.task_id, 7);
    match &report.outcome {
        Outcome::Succeeded { output } => assert_eq!(output, b"through the lead"),
        other => panic!("unexpected outcome {other:?}"),
    }
    // Not acked: the report must survive the lead's death.
    member.wait("report pending", |s| s.unacked == 1).await;

    lead.stop().await;
    within("lead's connection closed", lead_session.conn.closed()).await;

    // The member comes back directly and re-sends the unacked report there.
    let mut back = coord.next().await;
    assert_eq!(back.hello.worker_id, "member");
    assert!(!back.relayed);
    assert_ne!(back.conn.stable_id(), lead_session.conn.stable_id());
    let again = back.finished().await;
    assert_eq!(again, report);
    back.send(CoordinatorMsg::Ack(again.attempt)).await;
    let m = member
        .wait("member direct, report acked", |s| {
            s.connected && s.via_lead.is_none() && s.acked == 1 && s.unacked == 0
        })
        .await;
    assert_eq!(m.finished, 1);
    member.stop().await;
}

#[tokio::test]
async fn parent_none_sends_a_relayed_member_back_to_the_coordinator() {
    let certs = certs();
    let mut coord = FakeCoordinator::start(certs.path());
    let lead = start_worker(certs.path(), coord.addr, "lead");
    let member = start_worker(certs.path(), coord.addr, "member");
    let (lead_session, mut direct) = both_direct(&mut coord).await;
    lead.wait("lead connected", |s| s.connected).await;

    // Naming the current route again changes nothing.
    direct.send(CoordinatorMsg::Parent { lead: None }).await;
    direct.send(parent(&lead_session)).await;
    let mut relayed = coord.next().await;
    assert!(relayed.relayed && relayed.hello.worker_id == "member");
    relayed.send(parent(&lead_session)).await;
    relayed.send(echo(1, "still here")).await;
    assert!(matches!(
        relayed.finished().await.outcome,
        Outcome::Succeeded { .. }
    ));
    relayed
        .send(CoordinatorMsg::Ack(AttemptRef {
            task_id: 1,
            attempt: 1,
        }))
        .await;
    member.wait("acked via lead", |s| s.acked == 1).await;
    assert_eq!(member.stats.borrow().via_lead.as_deref(), Some("lead"));

    relayed.send(CoordinatorMsg::Parent { lead: None }).await;
    let back = coord.next().await;
    assert!(!back.relayed && back.hello.worker_id == "member");
    member
        .wait("member direct", |s| s.connected && s.via_lead.is_none())
        .await;
    lead.wait("relayed stream closed", |s| s.relayed_sessions == 0)
        .await;
    // The lead itself was never disturbed.
    assert_eq!(lead.stats.borrow().connects, 1);
    member.stop().await;
    lead.stop().await;
}

#[tokio::test]
async fn a_relay_connection_with_a_coordinator_certificate_is_refused() {
    let certs = certs();
    let mut coord = FakeCoordinator::start(certs.path());
    let lead = start_worker(certs.path(), coord.addr, "lead");
    let s = coord.next().await;
    lead.wait("lead connected", |s| s.connected).await;
    let lead_addr: SocketAddr = s.hello.peer_addr.clone().unwrap().parse().unwrap();

    let coord_id = Identity::load(certs.path(), Role::Coordinator).unwrap();
    let client = client_config(&coord_id, ALPN_RELAY, swarm_transport::Role::Worker).unwrap();
    let endpoint = swarm_transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let dialed = within(
        "dial",
        swarm_transport::dial(&endpoint, &client, lead_addr, "localhost"),
    )
    .await
    .unwrap();
    let reason = within("refused", dialed.conn.closed()).await;
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(WRONG_ROLE_CODE))
        }
        other => panic!("unexpected close {other:?}"),
    }
    assert_eq!(lead.stats.borrow().relayed_total, 0);
    lead.stop().await;
}

#[tokio::test]
async fn a_lead_without_a_coordinator_connection_closes_relay_connections_at_once() {
    let certs = certs();
    // This lead's coordinator does not exist.
    let lead = start_worker(certs.path(), "127.0.0.1:1".parse().unwrap(), "lead");
    let lead_addr: SocketAddr = lead
        .wait("listener bound", |s| s.peer_addr.is_some())
        .await
        .peer_addr
        .unwrap()
        .parse()
        .unwrap();
    let worker_id = Identity::load(certs.path(), Role::Worker).unwrap();
    let client = client_config(&worker_id, ALPN_RELAY, swarm_transport::Role::Worker).unwrap();
    let endpoint = swarm_transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let dialed = within(
        "dial",
        swarm_transport::dial(&endpoint, &client, lead_addr, "localhost"),
    )
    .await
    .unwrap();
    match within("closed", dialed.conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(RELAY_CLOSE_NO_COORDINATOR)
            );
            let reason = String::from_utf8_lossy(&c.reason);
            assert!(reason.contains("no coordinator connection"), "{reason}");
        }
        other => panic!("unexpected close {other:?}"),
    }
    lead.stop().await;
}

#[tokio::test]
async fn a_member_falls_back_to_the_coordinator_when_its_lead_cannot_relay() {
    let certs = certs();
    let mut coord = FakeCoordinator::start(certs.path());
    // A lead that never reaches a coordinator.
    let lonely = start_worker(certs.path(), "127.0.0.1:1".parse().unwrap(), "lonely");
    let lonely_addr = lonely
        .wait("listener bound", |s| s.peer_addr.is_some())
        .await
        .peer_addr
        .unwrap();
    let member = start_worker(certs.path(), coord.addr, "member");
    let mut direct = coord.next().await;
    assert_eq!(direct.hello.worker_id, "member");
    member.wait("member connected", |s| s.connected).await;

    direct
        .send(CoordinatorMsg::Parent {
            lead: Some(PeerInfo {
                worker_id: "lonely".into(),
                addr: lonely_addr,
            }),
        })
        .await;
    within("direct connection closed", direct.conn.closed()).await;
    let mut back = coord.next().await;
    assert!(!back.relayed && back.hello.worker_id == "member");
    member
        .wait("member direct again", |s| {
            s.connected && s.via_lead.is_none()
        })
        .await;
    assert_eq!(lonely.stats.borrow().relayed_total, 0);

    // An unreachable lead: nothing listens there.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    back.send(CoordinatorMsg::Parent {
        lead: Some(PeerInfo {
            worker_id: "ghost".into(),
            addr: dead_addr,
        }),
    })
    .await;
    within("direct connection closed", back.conn.closed()).await;
    let mut third = coord.next().await;
    assert!(!third.relayed && third.hello.worker_id == "member");
    // Still fully working.
    third.send(echo(3, "direct")).await;
    assert!(matches!(
        third.finished().await.outcome,
        Outcome::Succeeded { .. }
    ));
    member.stop().await;
    lonely.stop().await;
}
