//! The worker runtime against a tiny fake coordinator built on the real transport and
//! real certificates.

mod mock_http;
mod mock_llm;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mock_http::MockHttp;
use mock_llm::MockLlm;
use swarm_proto::worker::{
    AttemptRef, CoordinatorMsg, FailureKind, Hello, LogPiece, LogTail, Outcome, OutputChunk,
    OutputStream, TaskAssignment, TaskReport, Usage, WorkerMsg,
};
use swarm_proto::{ALPN_WORKER, PROTOCOL_VERSION};
use swarm_transport::tls::{client_config, init_certs, server_config, Identity, Role};
use swarm_transport::{FrameReader, FrameWriter};
use swarm_worker::{
    Agent, Agents, Backoff, ExecSpec, HttpSpec, LlmSpec, Worker, WorkerParams, WorkerStats,
    MAX_QUEUED_OUTPUT_BYTES,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Upper bound on any single wait, so a broken test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

struct Coord {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

struct Peer {
    conn: quinn::Connection,
    writer: FrameWriter,
    reader: FrameReader,
    hello: Hello,
    early: bool,
}

impl Coord {
    fn new(certs: &Path) -> Self {
        let id = Identity::load(certs, Role::Coordinator).unwrap();
        let cfg = server_config(&id, &[ALPN_WORKER]).unwrap();
        let endpoint =
            swarm_transport::server_endpoint("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
        let addr = endpoint.local_addr().unwrap();
        Coord { endpoint, addr }
    }

    /// Accepts the next worker connection and reads its Hello.
    async fn accept(&self) -> Peer {
        within("accept", async {
            let incoming = self.endpoint.accept().await.expect("endpoint closed");
            let mut accepted = swarm_transport::accept(incoming).await.unwrap();
            let (writer, mut reader) = accepted.accept_stream().await.unwrap();
            let early = reader.is_0rtt();
            let first: WorkerMsg = reader
                .recv()
                .await
                .unwrap()
                .expect("stream ended before Hello");
            accepted.authenticate_as(Role::Worker).await.unwrap();
            let WorkerMsg::Hello(hello) = first else {
                panic!("first message is not Hello: {first:?}")
            };
            Peer {
                conn: accepted.conn,
                writer,
                reader,
                hello,
                early,
            }
        })
        .await
    }

    /// Accepts and welcomes.
    async fn accept_welcome(&self, heartbeat_ms: u64) -> Peer {
        let mut p = self.accept().await;
        p.send(welcome(heartbeat_ms)).await;
        p
    }
}

fn welcome(heartbeat_ms: u64) -> CoordinatorMsg {
    CoordinatorMsg::Welcome {
        protocol: PROTOCOL_VERSION,
        heartbeat_interval_ms: heartbeat_ms,
        max_output_bytes: 1024 * 1024,
        term: 1,
    }
}

impl Peer {
    async fn send(&mut self, msg: CoordinatorMsg) {
        self.writer.send(&msg).await.unwrap();
    }

    /// The next message; `None` if the worker closed the stream or connection.
    async fn recv_any(&mut self) -> Option<WorkerMsg> {
        within("recv", self.reader.recv::<WorkerMsg>())
            .await
            .ok()
            .flatten()
    }

    /// The next message that is not a heartbeat.
    async fn recv(&mut self) -> WorkerMsg {
        loop {
            match self.recv_any().await {
                Some(WorkerMsg::Heartbeat { .. }) => continue,
                Some(m) => return m,
                None => panic!("worker went away"),
            }
        }
    }

    async fn finished(&mut self) -> TaskReport {
        match self.recv().await {
            WorkerMsg::Finished(r) => r,
            other => panic!("expected Finished, got {other:?}"),
        }
    }

    fn drop_connection(&self) {
        self.conn.close(0u32.into(), b"test drops connection");
    }
}

fn attempt(task_id: u64, attempt: u32) -> AttemptRef {
    AttemptRef { task_id, attempt }
}

fn run(a: AttemptRef, agent: &str, payload: &str) -> CoordinatorMsg {
    CoordinatorMsg::Run(TaskAssignment {
        attempt: a,
        agent: agent.into(),
        payload: payload.as_bytes().to_vec(),
        timeout_ms: 60_000,
        idempotency_key: None,
        patterns: 0,
        swarm: "default".into(),
        term: 1,
    })
}

struct Harness {
    _certs: tempfile::TempDir,
    coord: Coord,
    stats: watch::Receiver<WorkerStats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    fn start(slots: u32, agents: Agents) -> Self {
        let certs = tempfile::tempdir().unwrap();
        init_certs(certs.path(), &[], false).unwrap();
        let coord = Coord::new(certs.path());
        let id = Identity::load(certs.path(), Role::Worker).unwrap();
        let client = client_config(&id, ALPN_WORKER, swarm_transport::Role::Coordinator).unwrap();
        let mut params = WorkerParams::new("w-test", client, coord.addr, "localhost");
        params.slots = slots;
        params.agents = agents;
        params.labels.insert("zone".into(), "a".into());
        params.backoff = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        let worker = Worker::new(params).unwrap();
        let stats = worker.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        Harness {
            _certs: certs,
            coord,
            stats,
            stop: Some(stop),
            task,
        }
    }

    async fn wait_stats(&mut self, what: &str, pred: impl Fn(&WorkerStats) -> bool) -> WorkerStats {
        within(what, self.stats.wait_for(|s| pred(s)))
            .await
            .unwrap()
            .clone()
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("worker stop", self.task).await.unwrap()
    }
}

#[tokio::test]
async fn hello_welcome_run_finish_ack() {
    let mut h = Harness::start(4, Agents::builtin());
    let mut p = h.coord.accept().await;
    assert_eq!(p.hello.protocol, PROTOCOL_VERSION);
    assert_eq!(p.hello.worker_id, "w-test");
    assert_eq!(p.hello.slots, 4);
    assert_eq!(p.hello.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(p.hello.agents, vec!["echo", "sleep"]);
    assert!(p.hello.running.is_empty());
    assert!(!p.early, "first connection cannot be 0-RTT");
    p.send(welcome(60_000)).await;
    let s = h.wait_stats("connected", |s| s.connected).await;
    assert_eq!((s.connects, s.zero_rtt_accepted), (1, 0));

    p.send(run(attempt(1, 1), "echo", "hello")).await;
    let r = p.finished().await;
    assert_eq!(r.attempt, attempt(1, 1));
    assert_eq!(
        r.outcome,
        Outcome::Succeeded {
            output: b"hello".to_vec()
        }
    );
    assert!(r.finished_at_ms >= r.started_at_ms && r.started_at_ms > 0);

    p.send(run(attempt(2, 1), "nope", "")).await;
    let r = p.finished().await;
    assert!(
        matches!(
            r.outcome,
            Outcome::Failed {
                kind: FailureKind::UnknownAgent,
                ..
            }
        ),
        "{r:?}"
    );

    h.wait_stats("unacked", |s| s.unacked == 2).await;
    p.send(CoordinatorMsg::Ack(attempt(1, 1))).await;
    p.send(CoordinatorMsg::Ack(attempt(2, 1))).await;
    let s = h.wait_stats("acked", |s| s.acked == 2).await;
    assert_eq!((s.unacked, s.started, s.finished), (0, 2, 2));
    h.stop().await.unwrap();
}

#[tokio::test]
async fn unacked_reports_are_resent_after_reconnect_with_0rtt() {
    let mut h = Harness::start(2, Agents::builtin());
    let mut p = h.coord.accept_welcome(60_000).await;
    p.send(run(attempt(7, 1), "echo", "first")).await;
    let original = p.finished().await;
    p.send(run(attempt(8, 1), "echo", "second")).await;
    let acked = p.finished().await;
    p.send(CoordinatorMsg::Ack(attempt(8, 1))).await;
    h.wait_stats("ack", |s| s.acked == 1).await;

    p.drop_connection();
    let mut p2 = h.coord.accept().await;
    // Hello lists what the worker still holds: the unacked attempt, not the acked one.
    assert_eq!(p2.hello.running, vec![attempt(7, 1)]);
    assert!(p2.early, "reconnect should send Hello as 0-RTT");
    p2.send(welcome(60_000)).await;
    // Only the unacked report is re-sent, unchanged.
    assert_eq!(p2.finished().await, original);
    let s = h.wait_stats("second connect", |s| s.connects == 2).await;
    assert_eq!(s.zero_rtt_accepted, 1);
    assert_ne!(original, acked);

    p2.send(CoordinatorMsg::Ack(attempt(7, 1))).await;
    h.wait_stats("ack 2", |s| s.unacked == 0).await;
    p2.drop_connection();
    let mut p3 = h.coord.accept_welcome(60_000).await;
    // Nothing left to resend: the first report on this connection is for a new attempt.
    p3.send(run(attempt(9, 1), "echo", "third")).await;
    assert_eq!(p3.finished().await.attempt, attempt(9, 1));
    h.stop().await.unwrap();
}

#[tokio::test]
async fn duplicate_run_is_not_executed_twice() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs");
    let script = format!("echo run >> {}; sleep 0.3; echo done", log.display());
    let agents = Agents::builtin().with_exec("count", ExecSpec::new("sh", ["-c", script.as_str()]));
    let mut h = Harness::start(4, agents);
    let mut p = h.coord.accept_welcome(60_000).await;
    let a = attempt(3, 2);
    // Twice while it runs...
    p.send(run(a, "count", "")).await;
    p.send(run(a, "count", "")).await;
    let first = p.finished().await;
    assert_eq!(
        first.outcome,
        Outcome::Succeeded {
            output: b"done\n".to_vec()
        }
    );
    // ...and once after it finished, before the ack: the report is re-sent instead.
    p.send(run(a, "count", "")).await;
    assert_eq!(p.finished().await, first);
    // And after a reconnect, where the report is re-sent anyway.
    p.drop_connection();
    let mut p2 = h.coord.accept_welcome(60_000).await;
    assert_eq!(p2.finished().await, first);
    p2.send(run(a, "count", "")).await;
    assert_eq!(p2.finished().await, first);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "run\n");
    let s = h.wait_stats("stats", |s| s.finished == 1).await;
    assert_eq!(s.started, 1);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn heartbeats_list_running_attempts_and_cancel_works_over_the_wire() {
    let mut h = Harness::start(4, Agents::builtin());
    let mut p = h.coord.accept_welcome(50).await;
    let a = attempt(11, 1);
    p.send(run(a, "sleep", "600000")).await;
    // Heartbeats arrive, and soon list the attempt.
    let mut beats = 0;
    loop {
        match p.recv_any().await {
            Some(WorkerMsg::Heartbeat { running }) => {
                beats += 1;
                if running == vec![a] {
                    break;
                }
            }
            other => panic!("expected heartbeat, got {other:?}"),
        }
    }
    assert!(beats >= 1);
    p.send(CoordinatorMsg::Cancel(a)).await;
    let r = p.finished().await;
    assert_eq!(r.attempt, a);
    assert!(
        matches!(
            r.outcome,
            Outcome::Failed {
                kind: FailureKind::Cancelled,
                ..
            }
        ),
        "{r:?}"
    );
    // Heartbeats continue, now empty.
    loop {
        if let Some(WorkerMsg::Heartbeat { running }) = p.recv_any().await {
            if running.is_empty() {
                break;
            }
        }
    }
    let _ = h.wait_stats("idle", |s| s.running == 0).await;
    h.stop().await.unwrap();
}

#[tokio::test]
async fn attempts_survive_reconnects_and_are_listed_in_hello() {
    let mut h = Harness::start(4, Agents::builtin());
    let mut p = h.coord.accept_welcome(60_000).await;
    let a = attempt(21, 1);
    p.send(run(a, "sleep", "400")).await;
    h.wait_stats("running", |s| s.running == 1).await;
    p.drop_connection();
    let mut p2 = h.coord.accept().await;
    assert_eq!(p2.hello.running, vec![a]);
    p2.send(welcome(60_000)).await;
    let r = p2.finished().await;
    assert_eq!(r.attempt, a);
    assert_eq!(
        r.outcome,
        Outcome::Succeeded {
            output: b"slept 400 ms".to_vec()
        }
    );
    h.stop().await.unwrap();
}

#[tokio::test]
async fn slot_limit_queues_extra_attempts() {
    let mut h = Harness::start(1, Agents::builtin());
    let mut p = h.coord.accept_welcome(60_000).await;
    let (a, b, c) = (attempt(31, 1), attempt(32, 1), attempt(33, 1));
    p.send(run(a, "sleep", "200")).await;
    p.send(run(b, "sleep", "10")).await;
    p.send(run(c, "sleep", "10")).await;
    let s = h.wait_stats("queued", |s| s.queued == 2).await;
    assert_eq!(s.running, 1);
    // Cancelling a queued attempt reports it at once, before the running one ends.
    p.send(CoordinatorMsg::Cancel(c)).await;
    let rc = p.finished().await;
    assert_eq!(rc.attempt, c);
    assert!(matches!(
        rc.outcome,
        Outcome::Failed {
            kind: FailureKind::Cancelled,
            ..
        }
    ));
    let ra = p.finished().await;
    let rb = p.finished().await;
    assert_eq!((ra.attempt, rb.attempt), (a, b));
    assert!(
        rb.started_at_ms >= ra.finished_at_ms,
        "b started before a freed the slot"
    );
    h.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_frame_drops_connection_and_worker_reconnects() {
    let mut h = Harness::start(1, Agents::builtin());
    let mut p = h.coord.accept_welcome(60_000).await;
    h.wait_stats("connected", |s| s.connected).await;
    // A frame whose payload is not a CoordinatorMsg (enum variant 200 does not exist).
    p.writer.send(&200u32).await.unwrap();
    let mut p2 = h.coord.accept_welcome(60_000).await;
    h.wait_stats("reconnected", |s| s.connects == 2).await;
    assert!(
        p.recv_any().await.is_none(),
        "old connection should be closed"
    );
    p2.send(run(attempt(1, 1), "echo", "still works")).await;
    assert_eq!(
        p2.finished().await.outcome,
        Outcome::Succeeded {
            output: b"still works".to_vec()
        }
    );
    h.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_frame_error_is_recorded() {
    let mut h = Harness::start(1, Agents::builtin());
    let mut p = h.coord.accept_welcome(60_000).await;
    h.wait_stats("connected", |s| s.connected).await;
    p.writer.send(&200u32).await.unwrap();
    let s = h
        .wait_stats("disconnected", |s| s.last_error.is_some())
        .await;
    let err = s.last_error.unwrap_or_default();
    assert!(err.contains("malformed"), "{err}");
    h.stop().await.unwrap();
}

#[tokio::test]
async fn non_fatal_rejection_is_retried() {
    let mut h = Harness::start(1, Agents::builtin());
    let mut p = h.coord.accept().await;
    p.send(CoordinatorMsg::Rejected {
        code: "busy".into(),
        message: "try later".into(),
    })
    .await;
    let mut p2 = h.coord.accept_welcome(60_000).await;
    h.wait_stats("connected", |s| s.connected).await;
    p2.send(run(attempt(1, 1), "echo", "x")).await;
    p2.finished().await;
    h.stop().await.unwrap();
}

#[tokio::test]
async fn protocol_mismatch_stops_the_worker() {
    let h = Harness::start(1, Agents::builtin());
    let mut p = h.coord.accept().await;
    p.send(CoordinatorMsg::Welcome {
        protocol: PROTOCOL_VERSION + 1,
        heartbeat_interval_ms: 1000,
        max_output_bytes: 10,
        term: 1,
    })
    .await;
    let err = within("worker exit", h.task)
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("protocol version"), "{err}");

    let h = Harness::start(1, Agents::builtin());
    let mut p = h.coord.accept().await;
    p.send(CoordinatorMsg::Rejected {
        code: "protocol_version".into(),
        message: "want 2".into(),
    })
    .await;
    let err = within("worker exit", h.task)
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("protocol_version") && err.contains("want 2"),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_kills_running_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("sleep 100 & echo $! > {}; wait", pidfile.display());
    let agents = Agents::builtin().with_exec("long", ExecSpec::new("sh", ["-c", script.as_str()]));
    let mut h = Harness::start(1, agents);
    let mut p = h.coord.accept_welcome(60_000).await;
    p.send(run(attempt(1, 1), "long", "")).await;
    let pid: u32 = within("pidfile", async {
        loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                if let Ok(pid) = s.trim().parse() {
                    break pid;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    h.wait_stats("running", |s| s.running == 1).await;
    h.stop().await.unwrap();
    // The grandchild is gone (or a zombie awaiting a reaper that is not ours).
    within("grandchild death", async {
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            if stat.is_empty() || state == Some("Z") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The worker closed the connection without reporting the killed attempt.
    assert!(p.recv_any().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_each_reported_exactly_once() {
    const N: u64 = 20_000;
    let mut h = Harness::start(256, Agents::builtin());
    let p = h.coord.accept_welcome(60_000).await;
    h.wait_stats("connected", |s| s.connected).await;
    let Peer {
        mut writer,
        mut reader,
        conn,
        ..
    } = p;
    let t0 = std::time::Instant::now();
    let sender = tokio::spawn(async move {
        let ids: Vec<u64> = (1..=N).collect();
        for chunk in ids.chunks(500) {
            let msgs: Vec<CoordinatorMsg> = chunk
                .iter()
                .map(|&i| run(attempt(i, 1), "echo", &i.to_string()))
                .collect();
            writer.send_batch(&msgs).await.unwrap();
        }
        writer
    });
    let mut seen = std::collections::HashSet::new();
    let mut acks = Vec::new();
    while (seen.len() as u64) < N {
        match within("report", reader.recv::<WorkerMsg>()).await.unwrap() {
            Some(WorkerMsg::Finished(r)) => {
                let id = r.attempt.task_id;
                assert_eq!(
                    r.outcome,
                    Outcome::Succeeded {
                        output: id.to_string().into_bytes()
                    }
                );
                assert!(seen.insert(id), "attempt {id} reported twice");
                acks.push(CoordinatorMsg::Ack(r.attempt));
            }
            Some(WorkerMsg::Heartbeat { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let elapsed = t0.elapsed();
    eprintln!(
        "{N} echo tasks round-tripped in {elapsed:?} ({:.0}/s)",
        N as f64 / elapsed.as_secs_f64()
    );
    let mut writer = sender.await.unwrap();
    writer.send_batch(&acks).await.unwrap();
    let s = h.wait_stats("all acked", |s| s.acked == N).await;
    assert_eq!((s.started, s.finished, s.unacked, s.running), (N, N, 0, 0));
    drop(conn);
    h.stop().await.unwrap();
}

// ------------------------------------------------------------------------ live output

fn watch(a: AttemptRef, on: bool, from: u64) -> CoordinatorMsg {
    CoordinatorMsg::Watch {
        attempt: a,
        on,
        from,
    }
}

/// Output chunks as a watcher gets them, checked as they come: each of `attempt`, each
/// starting where the one before ended, the first at 0.
struct Watched {
    attempt: AttemptRef,
    chunks: Vec<OutputChunk>,
}

impl Watched {
    fn new(attempt: AttemptRef) -> Self {
        Watched {
            attempt,
            chunks: Vec::new(),
        }
    }

    fn take(&mut self, c: OutputChunk) {
        assert_eq!(c.attempt, self.attempt);
        let end = self.chunks.last().map_or(0, OutputChunk::end);
        assert_eq!(c.offset, end, "no gap, no overlap");
        self.chunks.push(c);
    }

    fn len(&self) -> usize {
        self.chunks.iter().map(|c| c.data.len()).sum()
    }

    fn data(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|c| c.data.clone()).collect()
    }

    /// Takes chunks until they hold `n` bytes.
    async fn until_len(&mut self, p: &mut Peer, n: usize) {
        while self.len() < n {
            match p.recv().await {
                WorkerMsg::Output(c) => self.take(c),
                other => panic!("expected output, got {other:?}"),
            }
        }
    }

    /// Takes chunks until the attempt's report, which it returns.
    async fn until_report(&mut self, p: &mut Peer) -> TaskReport {
        loop {
            match p.recv().await {
                WorkerMsg::Output(c) => self.take(c),
                WorkerMsg::Finished(r) if r.attempt == self.attempt => return r,
                other => panic!("expected output or the report, got {other:?}"),
            }
        }
    }
}

/// An `llm` attempt watched over the wire: its token texts arrive as `tokens` chunks as
/// the model streams them, and the report carries the answer as its log and the tokens
/// used.
#[tokio::test]
async fn a_watched_llm_attempt_streams_its_tokens_and_reports_its_usage() {
    let mock = MockLlm::start().await;
    let spec = LlmSpec::new(mock.base_url().parse().unwrap(), mock_llm::GATED);
    let agents = Agents::builtin().with_agent("w", Agent::Llm(spec));
    let h = Harness::start(1, agents);
    let mut p = h.coord.accept_welcome(60_000).await;
    let a = attempt(21, 1);
    p.send(run(a, "w", "hi")).await;
    p.send(watch(a, true, 0)).await;
    // The first delta comes while the model still holds back the rest.
    let mut seen = Watched::new(a);
    seen.until_len(&mut p, mock_llm::DELTAS[0].len()).await;
    assert_eq!(seen.data(), mock_llm::DELTAS[0].as_bytes());
    mock.open_gate();
    let r = seen.until_report(&mut p).await;
    assert_eq!(seen.data(), mock_llm::ANSWER.as_bytes());
    assert!(seen.chunks.iter().all(|c| c.stream == OutputStream::Tokens));
    assert_eq!(
        r.outcome,
        Outcome::Succeeded {
            output: mock_llm::ANSWER.as_bytes().to_vec()
        }
    );
    assert_eq!(
        r.usage,
        Some(Usage {
            model: mock_llm::SERVED_MODEL.into(),
            prompt_tokens: mock_llm::PROMPT_TOKENS,
            completion_tokens: mock_llm::COMPLETION_TOKENS,
        })
    );
    assert_eq!(
        r.log,
        LogTail {
            offset: 0,
            pieces: vec![LogPiece {
                stream: OutputStream::Tokens,
                data: mock_llm::ANSWER.as_bytes().to_vec(),
            }],
        }
    );
    h.stop().await.unwrap();
}

/// An `http` attempt's body pieces go out as `body` chunks while watched; cancelled, it
/// reports what came as its log.
#[tokio::test]
async fn a_watched_http_attempt_streams_its_body() {
    let mock = MockHttp::start().await;
    let spec = HttpSpec::new(mock.url("/hang").parse().unwrap());
    let agents = Agents::builtin().with_agent("fetch", Agent::Http(spec));
    let h = Harness::start(1, agents);
    let mut p = h.coord.accept_welcome(60_000).await;
    let a = attempt(22, 1);
    p.send(run(a, "fetch", "")).await;
    p.send(watch(a, true, 0)).await;
    let mut seen = Watched::new(a);
    // `part;`, then a byte at a time.
    seen.until_len(&mut p, "part;...".len()).await;
    p.send(CoordinatorMsg::Cancel(a)).await;
    let r = seen.until_report(&mut p).await;
    assert!(
        matches!(
            r.outcome,
            Outcome::Failed {
                kind: FailureKind::Cancelled,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(seen.chunks.iter().all(|c| c.stream == OutputStream::Body));
    assert!(seen.data().starts_with(b"part;..."));
    // Everything sent is in the log, and nothing else.
    assert_eq!(
        r.log,
        LogTail {
            offset: 0,
            pieces: vec![LogPiece {
                stream: OutputStream::Body,
                data: seen.data(),
            }],
        }
    );
    h.stop().await.unwrap();
}

/// The connection's writer gives the budget back as it writes: an agent printing more
/// than [`MAX_QUEUED_OUTPUT_BYTES`] in all, while the coordinator keeps reading, loses
/// none of it.
#[tokio::test]
async fn output_written_to_the_coordinator_frees_the_budget() {
    const HALF: usize = 800 * 1024;
    const { assert!(2 * HALF > MAX_QUEUED_OUTPUT_BYTES && HALF < MAX_QUEUED_OUTPUT_BYTES) };
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start");
    let gate = dir.path().join("gate");
    let script = format!(
        "while [ ! -e '{start}' ]; do sleep 0.02; done; head -c {HALF} /dev/zero >&2; \
         while [ ! -e '{gate}' ]; do sleep 0.02; done; head -c {HALF} /dev/zero >&2",
        start = start.display(),
        gate = gate.display(),
    );
    let agents = Agents::builtin().with_exec("flood", ExecSpec::new("sh", ["-c", script.as_str()]));
    let h = Harness::start(2, agents);
    let mut p = h.coord.accept_welcome(60_000).await;
    let a = attempt(23, 1);
    p.send(run(a, "flood", "")).await;
    p.send(watch(a, true, 0)).await;
    // A report made after the watch: the watch is in place (the agent has printed nothing).
    p.send(run(attempt(24, 1), "echo", "x")).await;
    assert_eq!(p.finished().await.attempt, attempt(24, 1));
    std::fs::write(&start, "").unwrap();
    let mut seen = Watched::new(a);
    seen.until_len(&mut p, HALF).await;
    // A frame the worker makes only now is written after every chunk above, and the
    // writer gives a batch's bytes back before it writes the next batch.
    p.send(run(attempt(25, 1), "echo", "x")).await;
    assert_eq!(p.finished().await.attempt, attempt(25, 1));
    std::fs::write(&gate, "").unwrap();
    let r = seen.until_report(&mut p).await;
    assert_eq!(r.outcome, Outcome::Succeeded { output: vec![] });
    assert_eq!(seen.len(), 2 * HALF, "nothing dropped");
    assert!(seen.chunks.iter().all(|c| c.stream == OutputStream::Stderr));
    assert_eq!(r.log.end(), 2 * HALF as u64);
    assert_eq!(h.stats.borrow().output_dropped_bytes, 0);
    h.stop().await.unwrap();
}
