//! One coordinator process: wires Raft, the task table, the scheduler, worker sessions
//! and the HTTP API together, and runs the loops that move between them.
//!
//! Loops (each a tokio task):
//! * **accept**: QUIC connections, routed by ALPN to Raft RPCs or a worker session;
//! * **applied**: wakes on every applied Raft entry, drains [`TableEvent`]s, releases
//!   waiters and in-flight attempts, and pokes the dispatcher;
//! * **dispatch** (acts only on the leader): asks the [`Scheduler`] what to run and what
//!   expired, sends `Run`/`Cancel` frames and proposes `Start`/`Lose` ops;
//! * **gauges**: refreshes Prometheus gauges once a second.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::{Raft, ServerState};
use swarm_proto::api::TaskState;
use swarm_proto::worker::{AttemptRef, CoordinatorMsg, TaskAssignment};
use swarm_proto::TaskId;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, info, warn};

use crate::cluster::PeerHttp;
use crate::proposer::{ProposeError, Proposer};
use crate::raft::sm_store::TableHandle;
use crate::raft::types::{NodeAddr, TypeConfig};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::state::{Op, OpResult, TableEvent, TaskTable, MAX_PURGE_PER_OP};

/// Everything a coordinator needs to start.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// This node's Raft id (unique in the cluster, never reused).
    pub node_id: u64,
    /// Raft log, snapshots and the health probe live here.
    pub data_dir: PathBuf,
    /// Cluster certificates (`swarm certs init`).
    pub certs_dir: PathBuf,
    /// QUIC address for workers and peer coordinators.
    pub listen: SocketAddr,
    /// `host:port` peers use to reach `listen` (must match a name in the certificate).
    pub advertise: String,
    /// HTTP API address.
    pub api_listen: SocketAddr,
    /// `host:port` clients use to reach the API.
    pub api_advertise: String,
    /// Bearer token required on `/v1/*`.
    pub api_token: String,
    /// Initialise a new cluster whose voters are this node plus `peers` (ignored when the
    /// data dir already holds Raft state).
    pub bootstrap: bool,
    /// Other voters to include when bootstrapping.
    pub peers: Vec<(u64, NodeAddr)>,
    pub limits: Limits,
    pub defaults: TaskDefaults,
    /// How often workers send heartbeats.
    pub heartbeat_interval_ms: u64,
    pub scheduler: SchedulerConfig,
    /// Build a snapshot (and compact the log) after this many applied entries.
    pub snapshot_every: u64,
    /// ...or after this many bytes of log (or of changes held in memory) since the last
    /// one, whichever comes first.
    pub snapshot_bytes: u64,
    /// How long a finished task stays readable (and its idempotency key dedupes) unless
    /// it asked for another retention at submit.
    pub retain_finished: Duration,
    /// How finished tasks become ReasoningBank patterns.
    pub distill: crate::memory::DistillMode,
    /// What embeds texts (patterns, `text` points, queries); its dimension is the pattern
    /// bank's.
    pub embedder: crate::memory::EmbedderConfig,
    /// How the HTTP API faces its clients: TLS, connection cap, header timeout.
    pub api: ApiEdges,
    /// Sign worker certificates for new workers (`POST /v1/certs/enroll`); `None`: this
    /// node does not enroll.
    pub enroll: Option<EnrollConfig>,
    /// The key callbacks are signed with (HMAC-SHA256); the same on every coordinator,
    /// so a receiver checks any leader's deliveries. `None`: tasks with a
    /// `callback_url` are refused, and this node, leading, delivers none.
    pub callback_secret: Option<String>,
    /// The hosts callbacks may call (empty: any).
    pub callback_allow: crate::callbacks::AllowList,
}

/// Enrollment: a new worker sends a key's signing request with this token and gets a
/// certificate for its name, signed with the cluster CA's key.
#[derive(Clone)]
pub struct EnrollConfig {
    /// The CA's key (its certificate is `ca.pem` in the certificates directory).
    pub ca_key: PathBuf,
    /// The bearer token enrollment requires (and nothing else accepts).
    pub token: String,
    /// Names enrolled must start with this (e.g. `swarm-worker-`); may be empty.
    pub prefix: String,
    /// How long an enrolled certificate is valid.
    pub validity: Duration,
}

impl std::fmt::Debug for EnrollConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollConfig")
            .field("ca_key", &self.ca_key)
            .field("prefix", &self.prefix)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// How the HTTP API faces its clients.
#[derive(Debug, Clone, Copy)]
pub struct ApiEdges {
    /// Serve HTTPS with this node's coordinator certificate (clients verify it against
    /// the cluster CA); followers then forward to the leader over HTTPS with their own
    /// certificate instead of the client's token.
    pub tls: bool,
    /// Most connections open at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has for its TLS handshake and for each request's headers.
    pub header_timeout: Duration,
    /// `/metrics` needs the API token (or a coordinator certificate) too.
    pub metrics_auth: bool,
}

impl Default for ApiEdges {
    fn default() -> Self {
        ApiEdges {
            tls: false,
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            metrics_auth: false,
        }
    }
}

impl CoordinatorConfig {
    /// A one-node cluster on loopback with default limits, as `swarm up` and the
    /// benchmarks run it: bootstraps itself, advertises `127.0.0.1`.
    pub fn single_node(
        data_dir: PathBuf,
        certs_dir: PathBuf,
        listen: SocketAddr,
        api_listen: SocketAddr,
        api_token: String,
    ) -> Self {
        CoordinatorConfig {
            node_id: 1,
            data_dir,
            certs_dir,
            listen,
            advertise: format!("127.0.0.1:{}", listen.port()),
            api_listen,
            api_advertise: String::new(),
            api_token,
            bootstrap: true,
            peers: Vec::new(),
            limits: Limits::default(),
            defaults: TaskDefaults::default(),
            heartbeat_interval_ms: 1000,
            scheduler: SchedulerConfig::default(),
            snapshot_every: crate::raft::SNAPSHOT_EVERY_LOGS,
            snapshot_bytes: crate::raft::SNAPSHOT_EVERY_BYTES,
            retain_finished: DEFAULT_RETAIN_FINISHED,
            distill: crate::memory::DistillMode::default(),
            embedder: crate::memory::EmbedderConfig::default(),
            api: ApiEdges::default(),
            enroll: None,
            callback_secret: None,
            callback_allow: crate::callbacks::AllowList::default(),
        }
    }
}

/// Bounds on what clients may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unfinished (queued + running) tasks allowed; further submits get `queue_full`.
    pub queue_limit: u64,
    /// Largest task payload, bytes.
    pub max_payload_bytes: u64,
    /// Largest task output stored, bytes; larger results fail with `output_too_large`.
    pub max_output_bytes: u64,
    /// Most bytes of an attempt's log tail stored with it (a worker's longer tail is cut
    /// to its last bytes).
    pub max_log_tail_bytes: u64,
    /// Most tasks in one batch submit.
    pub max_batch: usize,
    /// Longest `?wait=` a client may ask for.
    pub max_wait: Duration,
    /// A node whose applied index trails its log by more than this is not ready.
    pub ready_max_lag: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue_limit: 1_000_000,
            max_payload_bytes: 1 << 20,
            max_output_bytes: 1 << 20,
            max_log_tail_bytes: DEFAULT_MAX_LOG_TAIL,
            max_batch: 10_000,
            max_wait: Duration::from_secs(300),
            ready_max_lag: 10_000,
        }
    }
}

/// Default of [`Limits::max_log_tail_bytes`].
pub const DEFAULT_MAX_LOG_TAIL: u64 = 64 * 1024;

/// Default retention of finished tasks.
pub const DEFAULT_RETAIN_FINISHED: Duration = Duration::from_secs(3 * 24 * 3600);

/// Values a submit gets when it leaves them out.
#[derive(Debug, Clone, Copy)]
pub struct TaskDefaults {
    pub timeout_ms: u64,
    pub max_attempts: u32,
}

impl Default for TaskDefaults {
    fn default() -> Self {
        TaskDefaults {
            timeout_ms: 60_000,
            max_attempts: 3,
        }
    }
}

/// The clock installed by [`set_clock`], if any.
static CLOCK: OnceLock<fn() -> u64> = OnceLock::new();

/// Wall clock in ms since the Unix epoch; the only clock the coordinator reads (unless
/// [`set_clock`] replaced it).
pub fn now_ms() -> u64 {
    match CLOCK.get() {
        Some(clock) => clock(),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// Replace the clock [`now_ms`] reads, for the whole process and for good: a
/// deterministic simulation installs its simulated time here. Only the first call takes
/// effect; returns whether it was this one.
pub fn set_clock(clock: fn() -> u64) -> bool {
    CLOCK.set(clock).is_ok()
}

/// A worker session as the dispatcher sees it.
pub(crate) struct SessionHandle {
    /// Distinguishes this connection from an earlier one of the same worker.
    pub conn_id: u64,
    pub tx: mpsc::UnboundedSender<CoordinatorMsg>,
    pub info: swarm_proto::api::WorkerView,
    /// Ends the session when sent to: a newer session of the same worker replaced it.
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The worker's protocol version (what it may be sent).
    pub protocol: u32,
    /// Whom the worker's certificate names: a session of a pool certificate never
    /// replaces one of a certificate naming the worker.
    pub cert: swarm_transport::CertName,
}

/// Scheduler plus the live sessions it dispatches to: one lock, taken briefly.
pub(crate) struct Dispatch {
    pub scheduler: Scheduler,
    /// Ordered by worker id, so everything done to all sessions happens in the same order
    /// on every run.
    pub sessions: BTreeMap<String, SessionHandle>,
    /// When the leader last checked that every running attempt is tracked.
    pub last_reconcile_ms: u64,
    /// Every swarm's live layout.
    pub topologies: crate::swarms::Topologies,
    /// The Raft term the scheduler dispatches in: set when this node adopts the running
    /// attempts as leader of that term, 0 while it does not lead. Every `Run` carries it,
    /// so each execution's id ([`swarm_proto::worker::ExecutionId`]) is unique.
    pub term: u64,
    /// When the workers were last turned away for want of a quorum.
    pub turned_away_ms: u64,
}

/// How often the leader adopts running attempts its scheduler does not track.
const RECONCILE_EVERY_MS: u64 = 1000;

/// A leader no quorum has acknowledged for this long stops serving as leader: twice the
/// longest election timeout, by which the others have elected a new one.
pub(crate) const QUORUM_LOST_MS: u64 = 2 * crate::raft::ELECTION_TIMEOUT_MAX_MS;

/// Shared state of one coordinator.
pub struct Node {
    pub(crate) cfg: CoordinatorConfig,
    /// The replicated revocation list's version this node's handshake deny list holds,
    /// plus one (0: none yet); see [`crate::access::sync_revocations`].
    pub(crate) revocations_synced: std::sync::atomic::AtomicU64,
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) table: TableHandle,
    pub(crate) proposer: Proposer,
    pub(crate) dispatch: Mutex<Dispatch>,
    waiters: Mutex<HashMap<TaskId, Vec<oneshot::Sender<()>>>>,
    /// Watchers of tasks' live output (see [`crate::live`]).
    pub(crate) live: crate::live::LiveHub,
    /// Watchers of the cluster's changes (see [`crate::events`]).
    pub(crate) cluster_feed: crate::events::ClusterFeed,
    /// Latency of the last minute's finished tasks (see [`crate::status`]).
    pub(crate) latency: Mutex<crate::status::LatencyWindow>,
    wake_dispatch: Notify,
    pub(crate) data_dir: PathBuf,
    /// HTTP to peers: forwarding to the leader and asking peers for their reports.
    peer_http: Arc<dyn PeerHttp>,
    /// Embedder and distillers for the ReasoningBank.
    memory: crate::memory::MemoryService,
    /// The restore this node's API is driving, if any.
    restore_driver: Mutex<Option<u64>>,
    /// Set once this leader started handing leadership over (it is stopping): it serves
    /// no more as leader (see [`Node::is_leader`]).
    handing_off: AtomicBool,
    /// Node loops that panicked too often to be restarted again (`/health` names them).
    pub(crate) dead_loops: DeadLoops,
    /// The term whose leadership `applied_loop` last acted on (adopted attempts in), if
    /// this node leads, and when it noticed; kept here so a restarted loop still steps
    /// down.
    led_term: Mutex<Option<(u64, std::time::Instant)>>,
    /// This coordinator's certificate and the cluster CA: checks relayed members'
    /// identity proofs.
    identity: swarm_transport::Identity,
    /// The last storage probe of `/health` and when it ran: probes run at most every
    /// [`crate::cluster::HEALTH_PROBE_EVERY`], one at a time, whatever the request rate.
    pub(crate) storage_probe:
        tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
}

impl Node {
    pub(crate) fn new(
        cfg: CoordinatorConfig,
        raft: Raft<TypeConfig>,
        table: TableHandle,
        peer_http: Arc<dyn PeerHttp>,
        memory: crate::memory::MemoryService,
        identity: swarm_transport::Identity,
    ) -> Arc<Node> {
        let proposer = Proposer::spawn(raft.clone());
        Arc::new(Node {
            identity,
            revocations_synced: std::sync::atomic::AtomicU64::new(0),
            storage_probe: tokio::sync::Mutex::new(None),
            memory,
            data_dir: cfg.data_dir.clone(),
            live: Default::default(),
            cluster_feed: Default::default(),
            latency: Default::default(),
            dispatch: Mutex::new(Dispatch {
                scheduler: Scheduler::new(cfg.scheduler),
                sessions: BTreeMap::new(),
                last_reconcile_ms: 0,
                topologies: Default::default(),
                term: 0,
                turned_away_ms: 0,
            }),
            cfg,
            raft,
            table,
            proposer,
            waiters: Mutex::new(HashMap::new()),
            wake_dispatch: Notify::new(),
            peer_http,
            restore_driver: Mutex::new(None),
            handing_off: AtomicBool::new(false),
            dead_loops: DeadLoops::default(),
            led_term: Mutex::new(None),
        })
    }

    /// This node's Raft id.
    pub fn id(&self) -> u64 {
        self.cfg.node_id
    }

    /// The URL of `path` on a peer coordinator's API at `api_addr` (`host:port`): HTTPS
    /// when this cluster's API serves it.
    pub(crate) fn peer_api_url(&self, api_addr: &str, path: &str) -> String {
        let scheme = if self.cfg.api.tls { "https" } else { "http" };
        format!("{scheme}://{api_addr}{path}")
    }

    /// What a request to a peer's API authenticates with, besides the connection: over
    /// HTTPS nothing (this coordinator's certificate does), over plain HTTP (loopback
    /// only) the cluster token.
    pub(crate) fn peer_api_auth(&self) -> Option<String> {
        (!self.cfg.api.tls).then(|| format!("Bearer {}", self.cfg.api_token))
    }

    /// This coordinator's certificate and the cluster CA.
    pub(crate) fn identity(&self) -> &swarm_transport::Identity {
        &self.identity
    }

    /// This node's configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    /// The ReasoningBank's embedder and distillers.
    pub(crate) fn memory_service(&self) -> &crate::memory::MemoryService {
        &self.memory
    }

    /// HTTP to peer APIs.
    pub(crate) fn peer_http(&self) -> &dyn PeerHttp {
        &*self.peer_http
    }

    /// Largest request body the API reads: room for a batch, at least 64 MiB.
    pub(crate) fn body_limit(&self) -> usize {
        (self.cfg.limits.max_payload_bytes as usize)
            .saturating_mul(2)
            .saturating_add(64 << 10)
            .max(64 << 20)
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Read the local replica of the task table.
    pub fn read_table<R>(&self, f: impl FnOnce(&TaskTable) -> R) -> R {
        let guard = self.table.read();
        f(&guard)
    }

    pub(crate) fn lock_dispatch(&self) -> std::sync::MutexGuard<'_, Dispatch> {
        self.dispatch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node is the Raft leader right now and serves as one: not once it
    /// started handing leadership over. Then the API answers `not_leader`, dispatch stops,
    /// new worker sessions are turned away and reports are left for the next leader.
    pub fn is_leader(&self) -> bool {
        self.leads_raft() && !self.handing_off()
    }

    /// Whether this node is the Raft leader, handing over or not. Leadership changes
    /// (adopting attempts, stepping down) follow this one.
    pub(crate) fn leads_raft(&self) -> bool {
        self.raft_term_led().is_some()
    }

    /// The Raft term this node leads in, if it leads (handing over or not).
    pub(crate) fn raft_term_led(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.state == ServerState::Leader && m.current_leader == Some(self.cfg.node_id))
            .then_some(m.current_term)
    }

    /// Whether a quorum acknowledged this leader within [`QUORUM_LOST_MS`] (true on a node
    /// that does not lead). A leader cut off from its quorum does not step down in
    /// openraft 0.9 (no check-quorum), and the workers that can still reach it would stay
    /// with it while the others elect a new leader that gets none: past that bound it
    /// turns its workers away (at most once per bound) so they look for the new one. It
    /// goes on serving whatever still comes to it — the others may simply be slow (a
    /// high-latency link), and then it is still the only leader — and keeps its dispatch
    /// state, so nothing is dispatched twice.
    pub(crate) fn quorum_fresh(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.millis_since_quorum_ack
            .is_none_or(|ms| ms <= QUORUM_LOST_MS)
    }

    /// Whether a leadership hand-off started (see [`Node::is_leader`]).
    pub(crate) fn handing_off(&self) -> bool {
        self.handing_off.load(Ordering::Relaxed)
    }

    /// Stop serving as leader: the first step of a hand-off, for good (the node stops).
    pub(crate) fn begin_handoff(&self) {
        self.handing_off.store(true, Ordering::Relaxed);
    }

    /// The leader's id and address, if one is known.
    pub fn leader(&self) -> Option<(u64, NodeAddr)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id).cloned()?;
        Some((id, node))
    }

    /// Propose the coordinator's own ops through the group-commit batcher. Refused while
    /// this node hands leadership over: an entry appended after the target caught up
    /// would make the target's log too short to win its election.
    pub async fn propose(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, ProposeError> {
        if self.handing_off() {
            return Err(ProposeError::NotLeader { leader: None });
        }
        self.proposer.propose(ops).await
    }

    /// Propose a client request's ops: refused when too much waits to commit, and
    /// answered with a timeout when not committed in time.
    pub async fn propose_client(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, ProposeError> {
        if self.handing_off() {
            return Err(ProposeError::NotLeader { leader: None });
        }
        self.proposer.propose_admitted(ops).await
    }

    /// Propose purges of the finished tasks whose retention ended, as many ops as it takes.
    async fn purge_expired(&self) {
        loop {
            let now = now_ms();
            let ids = match self.table.expired(now, MAX_PURGE_PER_OP) {
                Ok(ids) => ids,
                Err(e) => {
                    warn!(error = %e, "listing expired tasks");
                    return;
                }
            };
            if ids.is_empty() {
                return;
            }
            let n = ids.len();
            match self
                .proposer
                .propose_one(Op::Purge { ids, now_ms: now })
                .await
            {
                Ok(OpResult::Purged { purged }) => {
                    metrics::counter!("swarm_tasks_purged_total").increment(purged);
                    debug!(purged, "purged expired tasks");
                    if n < MAX_PURGE_PER_OP || purged == 0 {
                        return;
                    }
                }
                Ok(other) => {
                    debug!(result = ?other, "purge not applied");
                    return;
                }
                Err(e) => {
                    debug!(error = %e, "purge not committed");
                    return;
                }
            }
        }
    }

    /// A restore is driven by the HTTP request that began it, on the leader then. If this
    /// leader is not driving the one in progress (leadership moved, or the request
    /// ended), nobody will finish it: abort it, so the cluster is empty again.
    async fn abort_orphaned_restore(&self) {
        let Some(r) = self.read_table(|t| t.restoring().cloned()) else {
            return;
        };
        let driving = *self
            .restore_driver
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if driving == Some(r.restore_id) {
            return;
        }
        warn!(
            restore = format!("{:x}", r.restore_id),
            tasks = r.tasks,
            "aborting a restore nobody drives"
        );
        match self
            .proposer
            .propose_one(Op::RestoreAbort {
                restore_id: r.restore_id,
            })
            .await
        {
            Ok(result) => info!(?result, "restore aborted"),
            Err(e) => debug!(error = %e, "restore abort not committed"),
        }
    }

    /// Mark the restore this node is driving.
    pub(crate) fn set_restore_driver(&self, id: u64) {
        *self
            .restore_driver
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// This node no longer drives restore `id` (another request may have taken over).
    pub(crate) fn clear_restore_driver(&self, id: u64) {
        let mut driver = self
            .restore_driver
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *driver == Some(id) {
            *driver = None;
        }
    }

    /// Wake the dispatcher (new work, a free slot, a new worker).
    pub(crate) fn poke(&self) {
        self.wake_dispatch.notify_one();
    }

    /// Wait until `id` is final or `timeout` passes. Returns whether it is final.
    pub async fn wait_final(&self, id: TaskId, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        // Register before looking, so a finalization in between is not missed.
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .push(tx);
        let done = self.read_table(|t| t.get(id).is_none_or(|t| t.state.is_final()));
        if done {
            return true;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    fn release_waiters(&self, id: TaskId) {
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        for w in waiters.into_iter().flatten() {
            let _ = w.send(());
        }
    }

    /// Drop waiters whose clients gave up (timeouts), so the map stays small.
    fn prune_waiters(&self) {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, ws| {
                ws.retain(|w| !w.is_closed());
                !ws.is_empty()
            });
    }

    /// Send a frame to a connected worker; false when it is not connected here.
    pub(crate) fn send_to_worker(&self, worker: &str, msg: CoordinatorMsg) -> bool {
        let d = self.lock_dispatch();
        d.sessions
            .get(worker)
            .is_some_and(|s| s.tx.send(msg).is_ok())
    }

    /// Count committed results of ops in Prometheus counters (called where results land,
    /// which is on the leader).
    pub(crate) fn count_results(&self, results: &[OpResult]) {
        for r in results {
            match r {
                OpResult::Submitted {
                    duplicate: false, ..
                } => metrics::counter!("swarm_tasks_submitted_total").increment(1),
                OpResult::Graph {
                    ids,
                    duplicate: false,
                } => metrics::counter!("swarm_tasks_submitted_total").increment(ids.len() as u64),
                OpResult::QueueFull { .. } => {
                    metrics::counter!("swarm_submit_rejected_total", "reason" => "queue_full")
                        .increment(1)
                }
                OpResult::Applied {
                    state: TaskState::Succeeded,
                } => metrics::counter!("swarm_tasks_succeeded_total").increment(1),
                OpResult::Applied {
                    state: TaskState::Failed,
                } => metrics::counter!("swarm_tasks_failed_total").increment(1),
                OpResult::Applied {
                    state: TaskState::Queued,
                } => metrics::counter!("swarm_tasks_retried_total").increment(1),
                OpResult::Applied {
                    state: TaskState::DeadLettered,
                } => metrics::counter!("swarm_tasks_dead_lettered_total").increment(1),
                OpResult::Cancelled { .. } => {
                    metrics::counter!("swarm_tasks_cancelled_total").increment(1)
                }
                _ => {}
            }
        }
    }

    /// Handle what the last applied entries changed.
    fn on_applied(&self) {
        let events = self.table.take_events();
        if events.is_empty() {
            return;
        }
        crate::events::on_applied(self, &events);
        crate::status::on_applied(self, &events);
        let leader = self.leads_raft();
        let mut cancels = Vec::new();
        {
            let mut d = self.lock_dispatch();
            for ev in &events {
                match ev {
                    TableEvent::Finalized(id, _) => {
                        // Finished elsewhere or cancelled: stop the attempt still running.
                        if let Some(f) = d.scheduler.forget(*id) {
                            if leader && !f.reported {
                                cancels.push(f);
                            }
                        }
                    }
                    // Queued again for a later attempt: the one in flight has ended. An
                    // attempt planned at that number was dispatched after this change
                    // applied (the dispatcher reads the table as it is), and must stay
                    // in flight, or the next round would send the same execution to a
                    // second worker (found by the nemesis: a submit's event drained
                    // after the first dispatch of its task).
                    TableEvent::Queued(id, next) => {
                        d.scheduler.forget_before(*id, *next);
                    }
                    TableEvent::Running(_) => {}
                }
            }
            for f in cancels {
                if let Some(s) = d.sessions.get(&f.worker) {
                    let _ = s.tx.send(CoordinatorMsg::Cancel(f.attempt));
                }
            }
        }
        for ev in events {
            let id = match ev {
                TableEvent::Finalized(id, _) => {
                    self.release_waiters(id);
                    id
                }
                TableEvent::Queued(id, _) | TableEvent::Running(id) => id,
            };
            if leader && self.live.watched(id) {
                self.live.changed(id);
                crate::live::retarget(self, id);
            }
        }
        self.poke();
    }

    /// Act on a change of the term this node leads in. Tracked by term, not as a flag: a
    /// node that lost and regained leadership between two looks steps down and adopts
    /// again, so nothing dispatched in the old term survives into the new one.
    fn follow_leadership(&self) {
        let term = self.raft_term_led();
        if term.is_some() && !self.quorum_fresh() {
            self.turn_workers_away();
        }
        let mut led = self.led_term.lock().unwrap_or_else(|p| p.into_inner());
        if term == led.map(|(t, _)| t) {
            return;
        }
        if led.is_some() {
            self.step_down();
        }
        if let Some(t) = term {
            self.adopt_running(t);
        }
        *led = term.map(|t| (t, std::time::Instant::now()));
    }

    /// Leading without a quorum (see [`Node::quorum_fresh`]): end every worker session
    /// with a `NotLeader` that names no leader, so the workers look for the one the
    /// others elect (they come back here if there is none). At most once per
    /// [`QUORUM_LOST_MS`]. The scheduler keeps what is in flight (leases run on).
    fn turn_workers_away(&self) {
        let mut d = self.lock_dispatch();
        let now = now_ms();
        if d.sessions.is_empty() || now.saturating_sub(d.turned_away_ms) < QUORUM_LOST_MS {
            return;
        }
        d.turned_away_ms = now;
        let sessions = std::mem::take(&mut d.sessions);
        warn!(
            node = self.cfg.node_id,
            workers = sessions.len(),
            "no quorum has acknowledged this leader for {QUORUM_LOST_MS} ms: turning its workers away"
        );
        for (id, s) in sessions {
            d.scheduler.worker_disconnected(&id);
            let _ = s.tx.send(not_leader_msg(self.cfg.node_id, None));
        }
    }

    /// How long this node has led in its current term, as far as `applied_loop` noticed
    /// (`None` if it does not lead).
    pub(crate) fn leading_for(&self) -> Option<Duration> {
        let led = *self.led_term.lock().unwrap_or_else(|p| p.into_inner());
        led.map(|(_, since)| since.elapsed())
    }

    /// On election: track every attempt the table says is running, so its worker gets a
    /// lease's grace to reconnect and report before the attempt is declared lost. The
    /// scheduler's workers are kept: a worker that registered between the election and
    /// this call stays placeable (the scheduler was emptied when this node last stepped
    /// down).
    fn adopt_running(&self, term: u64) {
        let now = now_ms();
        type Running = (String, AttemptRef, u64, Option<String>);
        let running: Vec<Running> = self.read_table(|t| {
            t.running()
                .map(|(task, a)| {
                    (
                        a.worker.clone(),
                        AttemptRef {
                            task_id: task.id,
                            attempt: a.number,
                        },
                        task.spec.timeout_ms,
                        task.concurrency_key().map(str::to_string),
                    )
                })
                .collect()
        });
        let mut d = self.lock_dispatch();
        d.term = term;
        d.scheduler.hold_limited(true);
        for (worker, attempt, timeout, key) in running {
            let tracked = d
                .scheduler
                .in_flight(attempt.task_id)
                .is_some_and(|f| f.attempt == attempt);
            if !tracked {
                d.scheduler
                    .adopt(&worker, attempt, timeout, key.as_deref(), now);
            }
        }
        info!(
            node = self.cfg.node_id,
            term,
            adopted = d.scheduler.in_flight_count(),
            "became leader"
        );
    }

    /// Lost leadership: forget dispatch state and turn workers away so they find the
    /// new leader.
    fn step_down(&self) {
        let mut d = self.lock_dispatch();
        d.scheduler = Scheduler::new(self.cfg.scheduler);
        d.topologies.clear();
        d.term = 0;
        let leader = self.leader();
        for (_, s) in std::mem::take(&mut d.sessions) {
            let _ = s.tx.send(not_leader_msg(self.cfg.node_id, leader.as_ref()));
        }
        info!(node = self.cfg.node_id, "no longer leader");
    }

    /// Whether this node's state machine has applied an entry of `term` (its leader's
    /// blank entry at least): then every entry of an earlier term that will ever commit
    /// is applied.
    fn applied_own_term(&self, term: u64) -> bool {
        let m = self.raft.metrics();
        let applied = m.borrow().last_applied;
        applied.is_some_and(|l| l.leader_id.term == term)
    }

    /// Record the `Start` of attempts of limited tasks, then send those that were
    /// recorded (see `scheduler::Dispatch::record_first`). One that was not (the task
    /// was cancelled meanwhile, or this node lost leadership) is not sent: the table's
    /// events or the attempt's lease free its slot.
    async fn send_when_started(self: Arc<Self>, gated: Vec<(Op, String, CoordinatorMsg)>) {
        let (ops, sends): (Vec<Op>, Vec<(String, CoordinatorMsg)>) =
            gated.into_iter().map(|(op, w, m)| (op, (w, m))).unzip();
        let results = match self.propose(ops).await {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!("swarm_dispatch_proposals_failed_total").increment(1);
                warn!(error = %e, "recording the start of limited attempts failed; they are not sent");
                return;
            }
        };
        let mut d = self.lock_dispatch();
        for (result, (worker, msg)) in results.iter().zip(sends) {
            let CoordinatorMsg::Run(run) = &msg else {
                continue;
            };
            let still_ours = d
                .scheduler
                .in_flight(run.attempt.task_id)
                .is_some_and(|f| f.attempt == run.attempt && f.worker == worker);
            if !matches!(result, OpResult::Applied { .. }) || !still_ours {
                debug!(
                    task = run.attempt.task_id,
                    ?result,
                    "limited attempt not sent"
                );
                continue;
            }
            if let Some(s) = d.sessions.get_mut(&worker) {
                let _ = s.tx.send(msg);
                s.info.running += 1;
            }
        }
    }

    /// One round of dispatch on the leader. Returns when the next round is due.
    fn dispatch_round(self: &Arc<Self>) -> Option<u64> {
        let now = now_ms();
        let mut ops = Vec::new();
        // Attempts of limited tasks: sent once their `Start` committed.
        let mut gated: Vec<(Op, String, CoordinatorMsg)> = Vec::new();
        let next_due;
        {
            let table = self.table.read();
            let mut d = self.lock_dispatch();
            if d.term == 0 {
                // Leading, but the applied loop has not adopted this term yet: nothing is
                // dispatched without a term to fence it by.
                return Some(now + 10);
            }
            // A leader elected before its state machine had re-applied the log (after a
            // restart) adopted only the attempts it knew of then; attempts recorded as
            // running later must get a lease too, or a dead worker's attempt would stay
            // `running` forever. Found by the simulation (sim/, seed 1795236407001).
            if d.scheduler.limited_held() && self.applied_own_term(d.term) {
                // Every earlier `Start` is applied now: adopt what they started, then
                // dispatch limited tasks again.
                d.last_reconcile_ms = 0;
                d.scheduler.hold_limited(false);
            }
            if now.saturating_sub(d.last_reconcile_ms) >= RECONCILE_EVERY_MS {
                d.last_reconcile_ms = now;
                let mut adopted = 0;
                for (task, a) in table.running() {
                    let attempt = AttemptRef {
                        task_id: task.id,
                        attempt: a.number,
                    };
                    let tracked = d
                        .scheduler
                        .in_flight(task.id)
                        .is_some_and(|f| f.attempt == attempt);
                    if !tracked {
                        d.scheduler.adopt(
                            &a.worker,
                            attempt,
                            task.spec.timeout_ms,
                            task.concurrency_key(),
                            now,
                        );
                        adopted += 1;
                    }
                }
                if adopted > 0 {
                    info!(
                        adopted,
                        "adopted running attempts the scheduler did not track"
                    );
                }
            }
            for e in d.scheduler.expire(now) {
                warn!(task = e.attempt.task_id, attempt = e.attempt.attempt, worker = %e.worker, reason = %e.reason, "attempt lost");
                if let Some(s) = d.sessions.get(&e.worker) {
                    let _ = s.tx.send(CoordinatorMsg::Cancel(e.attempt));
                }
                let retry_at_ms = d.scheduler.retry_at(now, e.attempt);
                ops.extend(Op::give_up(
                    e.attempt,
                    &e.worker,
                    e.reason,
                    now,
                    retry_at_ms,
                ));
            }
            let d = &mut *d;
            if table.restoring().is_some() {
                // Restored tasks run only once the whole restore has committed.
                return d.scheduler.next_expiry();
            }
            let out = d.topologies.refresh(&d.scheduler, &table, &d.sessions);
            crate::swarms::deliver(d, out);
            let topologies = &d.topologies;
            // Tasks of agents whose swarm spent its token budget wait (see `state::ledger`).
            let ledger = table.ledger();
            let plan = d.scheduler.plan_by(
                &table,
                now,
                topologies.max_queue_depth(),
                |t| ledger.holds(&t.spec.swarm, t.current_agent()),
                |task, id, w| topologies.place(task, id, w),
            );
            for p in plan.dispatches {
                let Some(task) = table.get(p.attempt.task_id) else {
                    continue;
                };
                let ready_since = task.created_at_ms.max(task.not_before_ms);
                metrics::histogram!("swarm_dispatch_latency_seconds")
                    .record(now.saturating_sub(ready_since) as f64 / 1000.0);
                if task.spec.swarm != swarm_topology::DEFAULT_SWARM_NAME {
                    metrics::counter!("swarm_swarm_dispatched_total", "swarm" => task.spec.swarm.clone())
                        .increment(1);
                }
                let payload = match table.input_of(task) {
                    Ok(p) => p,
                    Err(e) => {
                        // Not sent (a failing disk): the attempt is lost when its lease
                        // runs out, and tried again.
                        warn!(task = task.id, error = %e, "reading a dependant's input");
                        continue;
                    }
                };
                let msg = CoordinatorMsg::Run(TaskAssignment {
                    attempt: p.attempt,
                    agent: task.current_agent().to_string(),
                    payload,
                    timeout_ms: task.spec.timeout_ms,
                    idempotency_key: task.spec.idempotency_key.clone(),
                    patterns: task.spec.patterns,
                    swarm: task.spec.swarm.clone(),
                    term: d.term,
                });
                if p.record_first {
                    let start = Op::Start {
                        attempt: p.attempt,
                        worker: p.worker.clone(),
                        now_ms: now,
                    };
                    gated.push((start, p.worker, msg));
                    continue;
                }
                if let Some(s) = d.sessions.get_mut(&p.worker) {
                    let _ = s.tx.send(msg);
                    s.info.running += 1;
                }
                debug!(task = p.attempt.task_id, attempt = p.attempt.attempt, worker = %p.worker, "dispatched");
            }
            // Record the attempts that are still running after the start delay; short
            // ones were recorded by their report instead.
            for s in d.scheduler.due_starts(now) {
                ops.push(Op::Start {
                    attempt: s.attempt,
                    worker: s.worker,
                    now_ms: now,
                });
            }
            next_due = [d.scheduler.next_expiry(), plan.next_ready_ms]
                .into_iter()
                .flatten()
                .min();
        }
        if !gated.is_empty() {
            let node = self.clone();
            tokio::spawn(async move { node.send_when_started(gated).await });
        }
        if !ops.is_empty() {
            let node = self.clone();
            tokio::spawn(async move {
                match node.propose(ops).await {
                    Ok(results) => node.count_results(&results),
                    // The attempts' `Start`/`Lose` stay unrecorded: the deadline and
                    // heartbeat reconciliation give them up, or the next leader adopts them.
                    Err(e) => {
                        metrics::counter!("swarm_dispatch_proposals_failed_total").increment(1);
                        warn!(error = %e, "dispatch proposal (Start/Lose) not committed")
                    }
                }
            });
        }
        next_due
    }
}

/// The frame that turns a worker away from a follower.
pub(crate) fn not_leader_msg(me: u64, leader: Option<&(u64, NodeAddr)>) -> CoordinatorMsg {
    match leader {
        Some((id, addr)) if *id != me => CoordinatorMsg::NotLeader {
            leader: Some(addr.raft_addr.clone()),
            message: format!(
                "coordinator {me} is not the leader; the leader is {id} at {}",
                addr.raft_addr
            ),
        },
        _ => CoordinatorMsg::NotLeader {
            leader: None,
            message: format!("coordinator {me} is not the leader and knows no leader yet"),
        },
    }
}

/// Names of node loops left stopped by [`supervise`].
pub(crate) type DeadLoops = Arc<Mutex<Vec<&'static str>>>;

/// Most restarts of one node loop within [`RESTART_WINDOW`] before it is left stopped.
const MAX_LOOP_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Runs a node loop (`make` starts it) and restarts it when it panics — the panic is
/// logged by the panic hook and counted in `swarm_loop_panics_total{loop}` — a moment
/// later. A loop that panics more than [`MAX_LOOP_RESTARTS`] times within
/// [`RESTART_WINDOW`] is left stopped and named by `/health`, which then fails, so an
/// orchestrator restarts the process. A loop that returns (at shutdown) is not restarted.
pub(crate) fn supervise<F, Fut>(
    dead: DeadLoops,
    name: &'static str,
    make: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut panics: std::collections::VecDeque<tokio::time::Instant> = Default::default();
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => return,
                Err(e) if e.is_panic() => {}
                // Cancelled: the runtime is shutting down.
                Err(_) => return,
            }
            metrics::counter!("swarm_loop_panics_total", "loop" => name).increment(1);
            let now = tokio::time::Instant::now();
            panics.push_back(now);
            while panics
                .front()
                .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
            {
                panics.pop_front();
            }
            if panics.len() > MAX_LOOP_RESTARTS {
                tracing::error!(
                    loop_name = name,
                    "node loop panicked {} times within {RESTART_WINDOW:?}; left stopped, /health fails",
                    panics.len()
                );
                dead.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(name);
                return;
            }
            warn!(loop_name = name, "node loop panicked; restarting it");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Watch applied entries and leadership changes; runs until shutdown.
pub(crate) async fn applied_loop(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut metrics = node.raft.metrics();
    let mut applied = node.table.subscribe_applied();
    let mut prune = tokio::time::interval(Duration::from_secs(5));
    // The checkpoint loaded at start may list revoked certificates already.
    crate::access::sync_revocations(&node);
    loop {
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            r = applied.changed() => if r.is_err() { return },
            _ = prune.tick() => node.prune_waiters(),
            _ = shutdown.changed() => return,
        }
        // Raft leadership itself: a node handing leadership over still holds its worker
        // sessions until another node leads, then turns them to it.
        node.follow_leadership();
        node.on_applied();
        crate::access::sync_revocations(&node);
    }
}

/// Run `round` every `period` (a late tick waits, none are bunched) while this node
/// leads, until shutdown: the shape of the leader's periodic proposers (schedule ticks,
/// approval deadlines, leaving a joint membership).
pub(crate) async fn every_while_leading<F, Fut>(
    node: Arc<Node>,
    mut shutdown: watch::Receiver<bool>,
    period: Duration,
    round: F,
) where
    F: Fn(Arc<Node>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if node.is_leader() {
            round(node.clone()).await;
        }
    }
}

/// Dispatch whenever poked or due; acts only while this node leads.
pub(crate) async fn dispatch_loop(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let due = if node.is_leader() {
            node.dispatch_round()
        } else {
            None
        };
        // Never sleep long: leadership and clocks change without a poke.
        let wait = due.map_or(250, |t| t.saturating_sub(now_ms()).clamp(1, 250));
        tokio::select! {
            _ = node.wake_dispatch.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How often the leader looks for finished tasks whose retention ended.
const PURGE_EVERY: Duration = Duration::from_secs(5);

/// Housekeeping that keeps the state bounded, once a second: checkpoints by size (the
/// log bytes and the changes held in memory since the last one; openraft triggers them
/// by entry count), log purges by size (openraft keeps a number of entries behind a
/// snapshot, and an entry can hold 8 MiB), and on the leader, purges of expired tasks,
/// TTL sweeps of the vector memory, swapping in graphs rebuilt in the background, and
/// aborting a restore nobody drives any more.
pub(crate) async fn maintenance_loop(
    node: Arc<Node>,
    log: crate::raft::RedbLogStore,
    mut shutdown: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering;
    let log_bytes = log.appended_bytes();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut snapshot_seen = node.raft.metrics().borrow().snapshot;
    let mut bytes_at_snapshot = log_bytes.load(Ordering::Relaxed);
    let mut last_purge = tokio::time::Instant::now();
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (snapshot, purged) = {
            let m = node.raft.metrics().borrow().clone();
            (m.snapshot, m.purged)
        };
        if snapshot != snapshot_seen {
            snapshot_seen = snapshot;
            bytes_at_snapshot = log_bytes.load(Ordering::Relaxed);
            if let Some(s) = snapshot {
                purge_log_by_size(&node, &log, s.index, purged.map(|p| p.index)).await;
            }
        }
        let log_since = log_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(bytes_at_snapshot);
        let held = node.table.changes_bytes() as u64;
        metrics::gauge!("swarm_state_changes_bytes").set(held as f64);
        // Changes are held at a quarter of the log threshold: their memory (tasks with
        // their strings, map nodes) is a few times their size hint.
        if log_since >= node.cfg.snapshot_bytes || held >= node.cfg.snapshot_bytes / 4 {
            debug!(log_since, held, "snapshot by size");
            // Counted from now: a snapshot already being built completes the trigger.
            bytes_at_snapshot = log_bytes.load(Ordering::Relaxed);
            if let Err(e) = node.raft.trigger().snapshot().await {
                warn!(error = %e, "could not trigger a snapshot");
            }
        }
        if !node.is_leader() {
            continue;
        }
        node.abort_orphaned_restore().await;
        let full = last_purge.elapsed() >= PURGE_EVERY;
        if full {
            last_purge = tokio::time::Instant::now();
            node.purge_expired().await;
        }
        if last_sweep.elapsed() >= crate::memory::SWEEP_EVERY {
            last_sweep = tokio::time::Instant::now();
            crate::memory::sweep_expired_points(&node).await;
        }
        crate::memory::finish_rebuilds(&node).await;
        crate::memory::advance_indexes(&node).await;
    }
}

/// How long after its last chunk a snapshot transfer counts as under way.
const SNAPSHOT_QUIET: Duration = Duration::from_secs(10);
/// How long after a large append's answer the leader gets to resume its heartbeats
/// (openraft backs a replication off for half a second after an RPC it gave up on).
const APPEND_QUIET: Duration = Duration::from_secs(2);

/// Keep this node from campaigning while a snapshot or a large append arrives or is
/// written (see [`crate::raft::sm_store::Receiving`]); elections come back once it has
/// been quiet for [`SNAPSHOT_QUIET`] (or [`APPEND_QUIET`]), so a leader that died
/// mid-transfer is replaced as usual.
pub(crate) async fn quiet_while_receiving(
    raft: Raft<TypeConfig>,
    mut receiving: watch::Receiver<crate::raft::sm_store::Receiving>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut electing = true;
    loop {
        let busy = receiving
            .borrow_and_update()
            .busy(SNAPSHOT_QUIET, APPEND_QUIET);
        if busy == electing {
            electing = !busy;
            raft.runtime_config().elect(electing);
            info!(
                electing,
                "{}",
                if busy {
                    "receiving a snapshot or large entries: not campaigning"
                } else {
                    "campaigning allowed again"
                }
            );
        }
        tokio::select! {
            r = receiving.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Keep at most `--snapshot-bytes` of log behind the snapshot at `upto` (followers that
/// trail further catch up from the snapshot).
async fn purge_log_by_size(
    node: &Node,
    log: &crate::raft::RedbLogStore,
    upto: u64,
    purged: Option<u64>,
) {
    let keep = node.cfg.snapshot_bytes;
    let store = log.clone();
    // In place in inline mode: a simulation cannot order the blocking pool.
    let point = match store.is_inline() {
        true => Ok(store.byte_purge_point(upto, keep)),
        false => tokio::task::spawn_blocking(move || store.byte_purge_point(upto, keep)).await,
    };
    match point {
        Ok(Ok(Some(at))) if purged.is_none_or(|p| at > p) => {
            debug!(upto = at, "purging the log by size");
            if let Err(e) = node.raft.trigger().purge_log(at).await {
                warn!(error = %e, "could not purge the log");
            }
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %format!("{e:#}"), "sizing the log for a purge"),
        Err(e) => warn!(error = %e, "sizing the log for a purge"),
    }
}

/// Refresh gauges from the local replica once a second.
pub(crate) async fn gauges_loop(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        node.read_table(|t| {
            for st in TaskState::ALL {
                metrics::gauge!("swarm_queue_depth", "state" => st.as_str())
                    .set(t.count(st) as f64);
            }
            metrics::gauge!("swarm_tasks_running").set(t.count(TaskState::Running) as f64);
            crate::metrics::keep_alive(t.defined_swarms().keys());
        });
        let (workers, relayed, draining) = {
            let d = node.lock_dispatch();
            let relayed = d.sessions.values().filter(|s| s.info.via.is_some()).count();
            let draining = d.sessions.values().filter(|s| s.info.draining).count();
            (d.sessions.len(), relayed, draining)
        };
        metrics::gauge!("swarm_workers_connected").set(workers as f64);
        metrics::gauge!("swarm_workers_draining").set(draining as f64);
        // Worker QUIC connections the coordinator holds: relayed sessions share their
        // lead's connection.
        metrics::gauge!("swarm_worker_connections").set((workers - relayed) as f64);
        metrics::gauge!("swarm_workers_relayed").set(relayed as f64);
        let m = node.raft.metrics().borrow().clone();
        metrics::gauge!("swarm_raft_term").set(m.current_term as f64);
        metrics::gauge!("swarm_raft_leader").set(m.current_leader.unwrap_or(0) as f64);
        metrics::gauge!("swarm_raft_is_leader").set(if node.is_leader() { 1.0 } else { 0.0 });
        metrics::gauge!("swarm_raft_last_applied")
            .set(m.last_applied.map_or(0, |l| l.index) as f64);
        metrics::gauge!("swarm_raft_last_log").set(m.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("swarm_raft_snapshot_index").set(m.snapshot.map_or(0, |l| l.index) as f64);
        metrics::gauge!("swarm_raft_purged_index").set(m.purged.map_or(0, |l| l.index) as f64);
        metrics::gauge!("swarm_raft_members")
            .set(m.membership_config.membership().nodes().count() as f64);
        if let Some(repl) = &m.replication {
            let last = m.last_log_index.unwrap_or(0);
            for (id, matched) in repl.iter() {
                let matched = matched.map_or(0, |l| l.index);
                metrics::gauge!("swarm_raft_replication_lag", "node" => id.to_string())
                    .set(last.saturating_sub(matched) as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A loop that panics once is started again and runs to its end; one that keeps
    /// panicking is left stopped after the allowed restarts and named as dead.
    #[tokio::test]
    async fn supervised_loops_restart_after_a_panic_and_stop_when_it_repeats() {
        let dead = DeadLoops::default();
        let runs = Arc::new(AtomicU32::new(0));
        let once = {
            let runs = runs.clone();
            move || {
                let runs = runs.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("first run panics");
                    }
                }
            }
        };
        supervise(dead.clone(), "once", once).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2, "restarted once, then ended");
        assert!(dead.lock().unwrap().is_empty());

        let tries = Arc::new(AtomicU32::new(0));
        let always = {
            let tries = tries.clone();
            move || {
                let tries = tries.clone();
                async move {
                    tries.fetch_add(1, Ordering::SeqCst);
                    panic!("always panics");
                }
            }
        };
        supervise(dead.clone(), "always", always).await.unwrap();
        assert_eq!(
            tries.load(Ordering::SeqCst) as usize,
            MAX_LOOP_RESTARTS + 1,
            "started once and restarted the allowed number of times"
        );
        assert_eq!(*dead.lock().unwrap(), vec!["always"]);
    }
}
