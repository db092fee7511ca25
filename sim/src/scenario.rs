//! One seeded run: a cluster of coordinators and workers on turmoil's simulated network,
//! clients submitting and reading through the HTTP API, a fault schedule drawn from the
//! seed (membership changes included), then healing, draining, a final audit, a
//! comparison of the replicas and the checker.
//!
//! Time line of a run (simulated time):
//! * `0 ..` — coordinators start (node 1 bootstraps the cluster), workers dial them;
//! * `warmup ..` — clients submit (each key retried until acknowledged) and read, and
//!   one creates the run's [`SCHEDULES`], which tick until the end; faults start;
//!   membership changes start after the log has been compacted, and the operator
//!   carries them out one at a time while the other faults go on;
//! * `warmup + load` — every fault heals: links repaired, held messages delivered,
//!   crashed hosts restarted (not those removed from the cluster); a membership change in
//!   progress goes on; clients stop starting new submits and finish the ones in progress
//!   (giving up `drain` later); readers go on for a few seconds more;
//! * once the submitters are done, the auditor reads every schedule, then lists the
//!   whole table through the API, until every task is final (giving up
//!   `audit_deadline` after the drain); once the operator is done too, every member of
//!   the cluster applies the whole log and checkpoints it, and the run ends. Each member's checkpoint is then read from its
//!   data dir and the checker compares them.
//!
//! Snapshots are on: every node checkpoints every [`Options::snapshot_every`] entries,
//! and a node that falls behind the compacted log (crashed, cut off, or new) installs the
//! leader's snapshot, sent in [`Options::snapshot_chunk`]-byte chunks. All of it runs on
//! the simulation's thread (`Parts::inline_storage`), so it replays with the seed. A
//! run's [`Report`] counts the snapshots each node built and installed, as openraft's
//! metrics show them: a snapshot is *installed* when the node's log was purged up to the
//! snapshot's own index (openraft does that only when installing; after building one it
//! keeps `max_in_snapshot_log_to_keep` entries).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{self, Method, StatusCode};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use swarm_coordinator::raft::{NodeAddr, Raft};
use swarm_coordinator::{coordinator_server_config, CoordinatorConfig, Parts};
use swarm_proto::worker::{AttemptRef, ExecutionId};
use swarm_proto::ALPN_WORKER;
use swarm_transport::{client_config, Identity, Role};
use swarm_worker::{Backoff, ExecutionEvent, ExecutionJournal, Worker, WorkerParams};

use crate::checker::{
    self, AttemptRecord, Audit, ExecEvent, ExecRecord, History, RateLimit, Read, ReadResult,
    ScheduleCreation, ScheduleStatus, Submit, SubmitResult, TaskRecord,
};
use crate::driver::{Driver, Hosts};
use crate::faults::{self, Episode};
use crate::membership::{self, Operator, Settled};
use crate::net::{http_exchange, quic_endpoint, SimListener, SimPeerHttp};

/// QUIC port of every coordinator.
const QUIC_PORT: u16 = 7000;
/// HTTP API port of every coordinator.
const API_PORT: u16 = 8080;
/// The API token of the simulated cluster.
const TOKEN: &str = "sim-token";
/// How long a client waits for one HTTP answer before calling the outcome unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reads go on at least this long after the heal, and the audit waits as long.
const AFTER_HEAL: Duration = Duration::from_secs(3);
/// How long the members may take to settle after the audit (or its deadline).
const SETTLE_TIME: Duration = Duration::from_secs(15);
/// Simulated wall-clock time at the start of every run (fixed, so runs replay).
const EPOCH_SECS: u64 = 1_750_000_000;
/// Default snapshot interval, entries. A run writes 15 to 20 entries a second of load,
/// so each node takes a snapshot about every second (10 to 30 a run), and with
/// `raft_config`'s `max_in_snapshot_log_to_keep` of half the interval and purges in
/// batches of one interval, a leader keeps 8 to 24 entries of log: a node that misses a
/// second or two of log usually catches up from a snapshot. (openraft postpones a purge
/// while a follower's entries are in flight, so not every crash ends in an install.)
pub const SNAPSHOT_EVERY: u64 = 16;
/// Default size trigger (`CoordinatorConfig::snapshot_bytes`): the changes held in memory
/// between two snapshots by entries pass it now and then, so the maintenance loop's
/// size-triggered snapshot runs a few times a run too, racing the entry-triggered ones.
pub const SNAPSHOT_BYTES: u64 = 2 << 10;
/// Default snapshot chunk: a run's snapshots are 5–15 KiB, so each travels in 5 to 15
/// InstallSnapshot RPCs.
pub const SNAPSHOT_CHUNK: u64 = 1024;

/// The concurrency limits every run sets (`PUT /v1/limits/{name}`) before its submitters
/// give tasks concurrency keys: each key `tenant:…` runs at most 2 attempts at a time.
pub const KEY_LIMITS: &[(&str, u32)] = &[("tenant", 2)];
/// The concurrency keys submitters pick from (`tenant:0` to `tenant:3`).
pub const KEYS: u32 = 4;
/// The share of tasks (not under a shared idempotency key) given a concurrency key.
pub const KEYED: f64 = 0.35;
/// The share given the rate limit (independently: some have both).
pub const RATE_LIMITED: f64 = 0.2;
/// The token buckets every run sets before its submitters name them: a start a second,
/// at most 2 at once (a run's submitters ask for about 0.6 a second, in bursts).
pub const RATE_LIMITS: &[(&str, RateLimit)] = &[(
    "bucket",
    RateLimit {
        tokens: 1,
        per_ms: 1000,
        burst: 2,
    },
)];

/// The schedules every run creates (name, interval in ms) as it starts, each submitting
/// an echo task a tick.
pub const SCHEDULES: &[(&str, u64)] = &[("every-1s", 1000), ("every-2s", 2000)];
/// Their catch-up policy is `all`, up to this many missed ticks at once: the most there
/// is. A run lasts under two minutes of simulated time, so fewer ticks than that are
/// ever due at once, and none may be skipped (the checker holds them to it).
pub const SCHEDULE_CATCH_UP: u32 = swarm_coordinator::state::schedules::MAX_CATCH_UP;

/// The shape of a run; the seed decides everything else.
#[derive(Debug, Clone)]
pub struct Options {
    pub coordinators: usize,
    pub workers: usize,
    /// Clients submitting tasks.
    pub submitters: usize,
    /// Clients reading acknowledged tasks.
    pub readers: usize,
    /// Time for the cluster to form before clients and faults start.
    pub warmup: Duration,
    /// How long clients submit under faults.
    pub load: Duration,
    /// After the heal, how long submitters may take to finish their submits.
    pub drain: Duration,
    /// After the drain, how much longer the auditor waits for every task to become final.
    pub audit_deadline: Duration,
    /// turmoil's step.
    pub tick: Duration,
    /// Inject faults drawn from the seed (off: a calm run, unless `script` says otherwise).
    pub faults: bool,
    /// Draw membership changes with the faults.
    pub membership: bool,
    /// Run this schedule instead of one drawn from the seed.
    pub script: Option<Vec<Episode>>,
    /// Hosts kept for brand-new coordinators (`Fault::Replace`), beyond `coordinators`.
    pub spare_hosts: usize,
    /// Raft snapshot interval, entries (`CoordinatorConfig::snapshot_every`).
    pub snapshot_every: u64,
    /// Snapshot when this many bytes of log or of held changes piled up since the last
    /// one (`CoordinatorConfig::snapshot_bytes`, checked once a second).
    pub snapshot_bytes: u64,
    /// Bytes per InstallSnapshot RPC.
    pub snapshot_chunk: u64,
    /// How far the workers' clocks run ahead of the coordinators' (negative: behind), ms.
    /// Workers stamp the attempts they report with their own clock.
    pub worker_clock_skew_ms: i64,
    /// Submitters set [`KEY_LIMITS`] and [`RATE_LIMITS`] and give some tasks a
    /// concurrency key or the rate limit.
    pub limited_tasks: bool,
    /// A client creates [`SCHEDULES`] as the load starts.
    pub schedules: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            coordinators: 3,
            workers: 3,
            submitters: 3,
            readers: 2,
            warmup: Duration::from_secs(3),
            load: Duration::from_secs(20),
            drain: Duration::from_secs(20),
            audit_deadline: Duration::from_secs(40),
            tick: Duration::from_millis(2),
            faults: true,
            membership: true,
            script: None,
            spare_hosts: 1,
            snapshot_every: SNAPSHOT_EVERY,
            snapshot_bytes: SNAPSHOT_BYTES,
            snapshot_chunk: SNAPSHOT_CHUNK,
            worker_clock_skew_ms: 0,
            limited_tasks: true,
            schedules: true,
        }
    }
}

/// The snapshots one node took and installed in a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Snapshots {
    /// The host it ran on (`c1`, ...).
    pub host: String,
    /// Snapshots it built, by log id (term, index). Not counted: the checkpoint every
    /// node takes at the very end for the replica comparison.
    pub built: BTreeSet<(u64, u64)>,
    /// Snapshots it installed from a leader, by log id.
    pub installed: BTreeSet<(u64, u64)>,
}

/// What one run produced.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub history: History,
    pub violations: Vec<checker::Violation>,
    /// Faults as applied, membership changes, snapshot installs and what the coordinators
    /// reported about leadership, with times.
    pub log: Vec<String>,
    /// Snapshots by Raft node id.
    pub snapshots: BTreeMap<u64, Snapshots>,
    /// A hash of the history, the log and the snapshots: equal for two runs of one seed
    /// iff they replayed identically (as far as clients, the fault driver and the final
    /// replicas can tell).
    pub digest: u64,
    /// Simulated time the run took.
    pub sim_time: Duration,
}

impl Report {
    /// Snapshots installed on any node.
    pub fn installed(&self) -> usize {
        self.snapshots.values().map(|s| s.installed.len()).sum()
    }

    /// Snapshots built on any node.
    pub fn built(&self) -> usize {
        self.snapshots.values().map(|s| s.built.len()).sum()
    }

    /// How hard the run pressed its limits (the attempts the key and bucket rules
    /// checked).
    pub fn limits(&self) -> checker::LimitStats {
        checker::limit_stats(&self.history)
    }

    /// What the schedule rule checked (the ticks due before each schedule's last next
    /// tick).
    pub fn schedule_ticks(&self) -> checker::ScheduleStats {
        checker::schedule_stats(&self.history)
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        let acked = self
            .history
            .submits
            .iter()
            .filter(|s| matches!(s.result, SubmitResult::Acked { .. }))
            .count();
        let unknown = self
            .history
            .submits
            .iter()
            .filter(|s| matches!(s.result, SubmitResult::Unknown { .. }))
            .count();
        let (tasks, retried, states) = match &self.history.audit {
            Some(Audit::Complete { tasks, .. }) => {
                let mut states: BTreeMap<&str, usize> = BTreeMap::new();
                for t in tasks {
                    *states.entry(t.state.as_str()).or_default() += 1;
                }
                let retried = tasks.iter().filter(|t| t.attempts > 1).count();
                (tasks.len(), retried, format!("{states:?}"))
            }
            _ => (0, 0, "no audit".into()),
        };
        let snapshots: Vec<String> = self
            .snapshots
            .iter()
            .map(|(id, s)| format!("n{id}@{} {}/{}", s.host, s.built.len(), s.installed.len()))
            .collect();
        let membership = self
            .history
            .membership
            .iter()
            .filter(|m| m.completed.is_some())
            .count();
        let replicas = match &self.history.replicas {
            Some(checker::Replicas::Settled { index, nodes, .. }) => {
                format!("{} replicas at {index}", nodes.len())
            }
            Some(checker::Replicas::Unsettled { .. }) => "replicas unsettled".into(),
            None => "replicas not compared".into(),
        };
        let limits = self.limits();
        let ticks = self.schedule_ticks();
        format!(
            "seed {}: {} submits ({acked} acked, {unknown} unknown), {} reads, {tasks} tasks {states}, {retried} with several attempts, limited attempts: {} with a concurrency key ({} filling it), {} with a rate limit ({} emptying it), schedule ticks checked: {} of {} schedules ({} with a task, {} started 1 s late or more), {} executions started, {membership}/{} membership changes, snapshots built/installed [{}], {replicas}, {} log lines, {:.1}s simulated, digest {:016x}",
            self.seed,
            self.history.submits.len(),
            self.history.reads.len(),
            limits.keyed,
            limits.keyed_full,
            limits.bucketed,
            limits.bucket_emptied,
            ticks.ticks,
            ticks.schedules,
            ticks.fired,
            ticks.late,
            self.history
                .executions
                .iter()
                .filter(|e| e.event == checker::ExecEvent::Started)
                .count(),
            self.history.membership.len(),
            snapshots.join(" "),
            self.log.len(),
            self.sim_time.as_secs_f64(),
            self.digest
        )
    }
}

/// A coordinator host's place in the cluster.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot {
    /// The node it runs (`None`: a spare host, idle).
    pub node: Option<u64>,
    /// Whether clients use its API: its node is a member of the cluster.
    pub member: bool,
    /// Shut down for good.
    pub retired: bool,
}

/// A membership change the driver set up for the operator.
#[derive(Debug, Clone)]
pub(crate) enum Job {
    /// Add `new_id` (on the spare `new_host`, started empty), then remove `old_id`.
    Replace {
        old_host: usize,
        old_id: u64,
        new_host: usize,
        new_id: u64,
    },
    /// Remove `old_id` (down), then add `new_id` on the same host, wiped.
    Rejoin {
        host: usize,
        old_id: u64,
        new_id: u64,
    },
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Job::Replace {
                old_host,
                old_id,
                new_host,
                new_id,
            } => write!(
                f,
                "replace n{old_id} (c{}) with n{new_id} (c{})",
                old_host + 1,
                new_host + 1
            ),
            Job::Rejoin {
                host,
                old_id,
                new_id,
            } => write!(
                f,
                "remove n{old_id} (c{}), wipe it, add it back as n{new_id}",
                host + 1
            ),
        }
    }
}

/// What the operator asks the driver to do to a host.
#[derive(Debug, Clone)]
pub(crate) enum Request {
    /// Shut the host down for good (its node was removed).
    Retire(usize),
    /// Wipe the host's data dir and restart it as node `new_id`.
    Rewire { host: usize, new_id: u64 },
}

/// Membership changes queued for the operator.
#[derive(Debug, Default)]
pub(crate) struct Admin {
    pub jobs: VecDeque<(usize, Job)>,
    /// A change is queued or being carried out.
    pub busy: bool,
    /// No more changes will come.
    pub closed: bool,
}

/// What a node says about itself once the run is settling.
#[derive(Debug, Clone)]
pub(crate) struct NodeReport {
    pub host: usize,
    pub leader: bool,
    pub term: u64,
    pub last_log: Option<u64>,
    pub applied: Option<u64>,
    pub snapshot: Option<u64>,
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
}

/// What the hosts and clients share with each other and with the driver. None of it
/// reaches the system under test except through its public interfaces: it is the
/// clients' notebook, the operator's console and the driver's view of the cluster.
#[derive(Default)]
pub(crate) struct Shared {
    pub history: History,
    /// Acknowledged ids in the order they were acknowledged (readers pick from them).
    pub acked: Vec<u64>,
    /// Submitters that finished.
    pub submitters_done: usize,
    /// Per coordinator host: (is leader, term), as its node last reported.
    pub roles: BTreeMap<usize, (bool, u64)>,
    pub log: Vec<String>,
    /// Every coordinator host, spares included.
    pub slots: Vec<Slot>,
    /// Raft handles of running nodes, by node id (for the operator).
    pub rafts: BTreeMap<u64, Raft>,
    /// Snapshots seen per node id.
    pub snapshots: BTreeMap<u64, Snapshots>,
    pub admin: Admin,
    /// The operator's requests to the driver.
    pub requests: Vec<Request>,
    /// The voters the completed membership changes leave (`None` once one failed).
    pub expected_voters: Option<BTreeSet<u64>>,
    /// Nodes report themselves and checkpoint what they applied.
    pub settle: bool,
    pub reports: BTreeMap<u64, NodeReport>,
    /// The auditor's verdict on the settling.
    pub settled: Option<Result<Settled, String>>,
}

pub(crate) type SharedRef = Arc<Mutex<Shared>>;

pub(crate) fn lock(s: &SharedRef) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Simulated time since the start of the run.
pub(crate) fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// The coordinators' and workers' clock: the simulation's, so leases, retries and every
/// time recorded in the replicated state follow simulated time.
fn sim_clock_ms() -> u64 {
    match turmoil::since_epoch() {
        Some(d) => d.as_millis() as u64,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// [`Options::worker_clock_skew_ms`] of the run in progress (a clock is a plain `fn`).
static WORKER_CLOCK_SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// The workers' clock: the simulation's, skewed as the run asks.
fn worker_clock_ms() -> u64 {
    sim_clock_ms().saturating_add_signed(WORKER_CLOCK_SKEW_MS.load(Ordering::Relaxed))
}

fn err(e: impl std::fmt::Display) -> Box<dyn std::error::Error> {
    e.to_string().into()
}

/// A seed for one purpose of one run.
pub(crate) fn sub_seed(seed: u64, purpose: u64) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (seed, purpose).hash(&mut h);
    h.finish()
}

/// Where simulated coordinators keep their data: tmpfs when there is one, since every
/// Raft append is an fsync.
fn scratch_root() -> Option<PathBuf> {
    let shm = Path::new("/dev/shm");
    shm.is_dir().then(|| shm.to_path_buf())
}

/// The data dir of node `node` on coordinator host `host` (0-based).
pub(crate) fn data_dir(scratch: &Path, host: usize, node: u64) -> PathBuf {
    scratch.join(format!("c{}-n{node}", host + 1))
}

/// The APIs of the cluster's members, as clients know them.
fn member_apis(shared: &SharedRef, apis: &[SocketAddr]) -> Vec<SocketAddr> {
    let s = lock(shared);
    let members: Vec<SocketAddr> = s
        .slots
        .iter()
        .zip(apis)
        .filter(|(slot, _)| slot.member && !slot.retired)
        .map(|(_, a)| *a)
        .collect();
    if members.is_empty() {
        apis.to_vec()
    } else {
        members
    }
}

/// A random member's API.
pub(crate) fn pick_api(shared: &SharedRef, apis: &[SocketAddr], rng: &mut StdRng) -> SocketAddr {
    let members = member_apis(shared, apis);
    members[rng.gen_range(0..members.len())]
}

/// Run `seed` with `opts` and check the history. `Err` when the simulation itself broke
/// (a host's software failed or panicked, or the run exceeded its time budget).
pub fn run(seed: u64, opts: &Options) -> Result<Report, String> {
    swarm_coordinator::node::set_clock(sim_clock_ms);
    // Workers stamp attempts with their clock, and the coordinator records those times.
    WORKER_CLOCK_SKEW_MS.store(opts.worker_clock_skew_ms, Ordering::Relaxed);
    swarm_worker::set_clock(worker_clock_ms);
    swarm_coordinator::raft::seed_thread_rng(Some(sub_seed(seed, 1)));
    let result = run_inner(seed, opts);
    swarm_coordinator::raft::seed_thread_rng(None);
    result
}

fn run_inner(seed: u64, opts: &Options) -> Result<Report, String> {
    let scratch = match scratch_root() {
        Some(root) => tempfile::Builder::new()
            .prefix("swarm-sim-")
            .tempdir_in(root),
        None => tempfile::Builder::new().prefix("swarm-sim-").tempdir(),
    }
    .map_err(|e| format!("scratch dir: {e}"))?;
    let certs_dir = scratch.path().join("certs");

    let heal_at = opts.warmup + opts.load;
    let drain_until = heal_at + opts.drain;
    let audit_until = drain_until + opts.audit_deadline;
    let mut sim = turmoil::Builder::new()
        .rng_seed(sub_seed(seed, 2))
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .simulation_duration(audit_until + SETTLE_TIME + Duration::from_secs(15))
        .tick_duration(opts.tick)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .repair_rate(0.4)
        .udp_capacity(16_384)
        .tcp_capacity(16_384)
        .enable_random_order()
        .build();

    // Names first, so every address is known (and in the certificates) before anything runs.
    let hosts_total = opts.coordinators + opts.spare_hosts;
    let coord_names: Vec<String> = (1..=hosts_total).map(|i| format!("c{i}")).collect();
    let worker_names: Vec<String> = (1..=opts.workers).map(|i| format!("w{i}")).collect();
    // Clients share two hosts (fewer hosts, fewer links: a cheaper step): the writers
    // with the operator, and the readers with the auditor.
    let client_names: Vec<String> = vec!["writers".into(), "readers".into()];
    let coord_ips: Vec<IpAddr> = coord_names.iter().map(|n| sim.lookup(n.as_str())).collect();
    let worker_ips: Vec<IpAddr> = worker_names
        .iter()
        .map(|n| sim.lookup(n.as_str()))
        .collect();
    let client_ips: Vec<IpAddr> = client_names
        .iter()
        .map(|n| sim.lookup(n.as_str()))
        .collect();
    crate::certs::write_certs(&certs_dir, &coord_ips).map_err(|e| format!("certs: {e:#}"))?;
    let quic: Vec<SocketAddr> = coord_ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, QUIC_PORT))
        .collect();
    let apis: Vec<SocketAddr> = coord_ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, API_PORT))
        .collect();

    let shared: SharedRef = Arc::default();
    {
        let mut s = lock(&shared);
        s.slots = (0..hosts_total)
            .map(|i| Slot {
                node: (i < opts.coordinators).then_some(i as u64 + 1),
                member: i < opts.coordinators,
                retired: false,
            })
            .collect();
        s.expected_voters = Some((1..=opts.coordinators as u64).collect());
    }

    let mut base = CoordinatorConfig::single_node(
        PathBuf::new(),
        certs_dir.clone(),
        SocketAddr::from(([0, 0, 0, 0], QUIC_PORT)),
        SocketAddr::from(([0, 0, 0, 0], API_PORT)),
        TOKEN.into(),
    );
    base.snapshot_every = opts.snapshot_every;
    base.snapshot_bytes = opts.snapshot_bytes;
    {
        let mut s = lock(&shared);
        s.history.lease_ms = base.scheduler.lease_ms;
        s.history.heartbeat_ms = base.heartbeat_interval_ms;
        s.history.worker_clock_skew_ms = opts.worker_clock_skew_ms;
        s.history.key_limits = KEY_LIMITS
            .iter()
            .map(|(name, n)| (name.to_string(), *n))
            .collect();
        s.history.rate_limits = RATE_LIMITS
            .iter()
            .map(|(name, r)| (name.to_string(), *r))
            .collect();
    }
    let initial: Vec<(u64, NodeAddr)> = (0..opts.coordinators)
        .map(|j| {
            (
                j as u64 + 1,
                NodeAddr {
                    raft_addr: quic[j].to_string(),
                    api_addr: apis[j].to_string(),
                },
            )
        })
        .collect();
    for (i, name) in coord_names.iter().enumerate() {
        let mut cfg = base.clone();
        cfg.advertise = quic[i].to_string();
        cfg.api_advertise = apis[i].to_string();
        let host = CoordinatorHost {
            i,
            cfg,
            scratch: scratch.path().to_path_buf(),
            initial: initial.clone(),
            snapshot_chunk: opts.snapshot_chunk,
            seed,
            shared: shared.clone(),
        };
        let boots = Arc::new(Mutex::new(0u64));
        sim.host(name.as_str(), move || {
            let host = host.clone();
            let boot = {
                let mut b = boots.lock().unwrap_or_else(PoisonError::into_inner);
                *b += 1;
                *b
            };
            async move { coordinator(host, boot).await }
        });
    }

    for (i, name) in worker_names.iter().enumerate() {
        let certs_dir = certs_dir.clone();
        // Workers know the founding coordinators; a follower redirects them to a leader
        // that joined later.
        let quic = quic[..opts.coordinators].to_vec();
        let boots = Arc::new(Mutex::new(0u64));
        let name = name.clone();
        let shared = shared.clone();
        sim.host(name.as_str(), {
            let name = name.clone();
            move || {
                let certs_dir = certs_dir.clone();
                let quic = quic.clone();
                let name = name.clone();
                let boot = {
                    let mut b = boots.lock().unwrap_or_else(PoisonError::into_inner);
                    *b += 1;
                    *b
                };
                let shared = shared.clone();
                async move { worker(i, name, certs_dir, quic, boot, seed, shared).await }
            }
        });
    }

    {
        let writers = (0..opts.submitters).map(|i| {
            let (apis, shared) = (apis.clone(), shared.clone());
            let limited = opts.limited_tasks;
            submitter(
                i,
                apis,
                shared,
                seed,
                (opts.warmup, heal_at, drain_until),
                limited,
            )
        });
        let writers = futures::future::join_all(writers.collect::<Vec<_>>());
        let schedules = create_schedules(
            apis.clone(),
            shared.clone(),
            seed,
            opts.warmup,
            heal_at,
            opts.schedules,
        );
        let operator = Operator::new(
            shared.clone(),
            quic.clone(),
            apis.clone(),
            seed,
            drain_until,
        );
        sim.client("writers", async move {
            futures::join!(writers, schedules, operator.run());
            Ok(())
        });
    }
    {
        let readers = (0..opts.readers).map(|i| {
            let (apis, shared) = (apis.clone(), shared.clone());
            reader(
                i,
                apis,
                shared,
                seed,
                opts.submitters,
                opts.warmup,
                heal_at + AFTER_HEAL,
                drain_until,
            )
        });
        let readers = futures::future::join_all(readers.collect::<Vec<_>>());
        let audit = auditor(
            apis.clone(),
            shared.clone(),
            seed,
            opts.submitters,
            heal_at + AFTER_HEAL,
            audit_until,
        );
        sim.client("readers", async move {
            futures::join!(readers, audit);
            Ok(())
        });
    }

    let mut plan_rng = StdRng::seed_from_u64(sub_seed(seed, 3));
    let episodes = match &opts.script {
        Some(script) => script.clone(),
        None if opts.faults => faults::schedule(
            &mut plan_rng,
            opts.warmup + Duration::from_millis(500),
            heal_at,
            opts.coordinators,
            opts.workers,
            opts.membership && opts.spare_hosts > 0,
        ),
        None => Vec::new(),
    };
    let hosts = Hosts {
        coordinators: coord_ips,
        workers: worker_ips,
        clients: client_ips,
    };
    let mut driver = Driver::new(
        episodes,
        hosts,
        shared.clone(),
        scratch.path().to_path_buf(),
        opts.coordinators as u64 + 1,
    );
    loop {
        driver.tick(&mut sim, heal_at);
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                let log = std::mem::take(&mut lock(&shared).log);
                return Err(format!(
                    "simulation failed at {:?}: {e}\nlast log lines:\n{}",
                    sim.elapsed(),
                    tail(&log, 40)
                ));
            }
        }
    }
    let sim_time = sim.elapsed();
    // Every host's software goes with the simulation; and the Raft handles the operator
    // used go too (a handle can keep its node's state machine, and so its files, open:
    // an interrupted snapshot transfer stays in it). Then no node holds its files.
    drop(sim);
    lock(&shared).rafts.clear();

    let (mut history, log, snapshots, settled, expected) = {
        let mut s = lock(&shared);
        (
            std::mem::take(&mut s.history),
            std::mem::take(&mut s.log),
            std::mem::take(&mut s.snapshots),
            s.settled.take(),
            s.expected_voters.take(),
        )
    };
    history.replicas = Some(match settled {
        Some(Ok(settled)) => membership::read_replicas(
            scratch.path(),
            &settled,
            expected.map(|v| v.into_iter().collect()),
        ),
        Some(Err(reason)) => checker::Replicas::Unsettled { reason },
        None => checker::Replicas::Unsettled {
            reason: "the run ended before the members settled".into(),
        },
    });
    let violations = checker::check(&history);
    let mut h = std::hash::DefaultHasher::new();
    history.hash(&mut h);
    log.hash(&mut h);
    snapshots.hash(&mut h);
    Ok(Report {
        seed,
        digest: h.finish(),
        history,
        violations,
        log,
        snapshots,
        sim_time,
    })
}

/// The last `n` lines of `log`.
pub fn tail(log: &[String], n: usize) -> String {
    log[log.len().saturating_sub(n)..].join("\n")
}

/// What a coordinator host's software needs; it runs the node its [`Slot`] names.
#[derive(Clone)]
struct CoordinatorHost {
    /// Host index (0-based: `c1` is 0).
    i: usize,
    /// Everything but the node id, data dir, bootstrap and peers.
    cfg: CoordinatorConfig,
    scratch: PathBuf,
    /// The founding members, which node 1 bootstraps the cluster with.
    initial: Vec<(u64, NodeAddr)>,
    snapshot_chunk: u64,
    seed: u64,
    shared: SharedRef,
}

/// A coordinator host: wait until it has a node to run (spare hosts wait until a
/// membership change gives them one), then serve until crashed, reporting leadership and
/// snapshots to the driver, and at the end its state.
async fn coordinator(h: CoordinatorHost, boot: u64) -> turmoil::Result {
    let id = loop {
        if let Some(id) = lock(&h.shared).slots[h.i].node {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let name = format!("c{} (n{id})", h.i + 1);
    let mut cfg = h.cfg.clone();
    cfg.node_id = id;
    cfg.data_dir = data_dir(&h.scratch, h.i, id);
    // A founding member: node 1 bootstraps with the others (ignored once initialised).
    // A later one starts empty and waits to be added.
    cfg.bootstrap = id == 1;
    cfg.peers = if h.initial.iter().any(|(n, _)| *n == id) {
        h.initial
            .iter()
            .filter(|(n, _)| *n != id)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let server = coordinator_server_config(&cfg.certs_dir).map_err(err)?;
    let endpoint = quic_endpoint(
        SocketAddr::from(([0, 0, 0, 0], QUIC_PORT)),
        Some(server),
        sub_seed(h.seed, 1000 + 100 * h.i as u64 + boot),
    )
    .await
    .map_err(err)?;
    let api_listener = SimListener::bind(SocketAddr::from(([0, 0, 0, 0], API_PORT))).await?;
    let handle = swarm_coordinator::start_with(
        cfg,
        Parts {
            endpoint,
            api_listener,
            peer_http: Some(Arc::new(SimPeerHttp)),
            inline_storage: true,
            snapshot_chunk: Some(h.snapshot_chunk),
        },
    )
    .await
    .map_err(|e| err(format!("{name} boot {boot}: {e:#}")))?;
    let raft = handle.node().raft().clone();
    lock(&h.shared).rafts.insert(id, raft.clone());
    let mut metrics = raft.metrics();
    let mut last_role = (false, 0);
    let mut triggered = None;
    loop {
        let m = metrics.borrow_and_update().clone();
        let role = (
            m.state == openraft::ServerState::Leader && m.current_leader == Some(id),
            m.current_term,
        );
        let settle = {
            let mut s = lock(&h.shared);
            let at = now().as_secs_f64();
            if role != last_role {
                last_role = role;
                s.roles.insert(h.i, role);
                if role.0 {
                    s.history.elections.push(sim_clock_ms());
                }
                s.log.push(format!(
                    "{at:>8.3}s {name} boot {boot}: term {} {}",
                    role.1,
                    if role.0 { "leader" } else { "not leader" }
                ));
            }
            let settle = s.settle;
            let seen = s.snapshots.entry(id).or_insert_with(|| Snapshots {
                host: format!("c{}", h.i + 1),
                ..Default::default()
            });
            if let Some(snap) = m.snapshot {
                let key = (snap.leader_id.term, snap.index);
                // Only an install purges the log up to the snapshot itself.
                if m.purged == m.snapshot {
                    if seen.installed.insert(key) {
                        seen.built.remove(&key);
                        s.log.push(format!(
                            "{at:>8.3}s {name}: installed snapshot {}-{}",
                            key.0, key.1
                        ));
                    }
                } else if !settle && !seen.installed.contains(&key) {
                    seen.built.insert(key);
                }
            }
            if settle {
                let membership = m.membership_config.membership();
                s.reports.insert(
                    id,
                    NodeReport {
                        host: h.i,
                        leader: role.0,
                        term: role.1,
                        last_log: m.last_log_index,
                        applied: m.last_applied.map(|l| l.index),
                        snapshot: m.snapshot.map(|l| l.index),
                        voters: membership.voter_ids().collect(),
                        learners: membership.learner_ids().collect(),
                    },
                );
            }
            settle
        };
        if settle {
            // Checkpoint what is applied, once per applied index, so that every replica
            // can be read whole from its data dir after the run.
            if m.last_applied != m.snapshot && triggered != m.last_applied {
                triggered = m.last_applied;
                if let Err(e) = raft.trigger().snapshot().await {
                    return Err(err(format!("{name}: raft stopped: {e}")));
                }
            }
            if let Ok(Err(_)) =
                tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await
            {
                return Err(err(format!("{name}: raft stopped")));
            }
        } else if metrics.changed().await.is_err() {
            return Err(err(format!("{name}: raft stopped")));
        }
    }
}

/// A worker host: four slots, the built-in agents, all coordinators as targets.
async fn worker(
    i: usize,
    name: String,
    certs_dir: PathBuf,
    quic: Vec<SocketAddr>,
    boot: u64,
    seed: u64,
    shared: SharedRef,
) -> turmoil::Result {
    let journal = {
        let (name, shared) = (name.clone(), shared.clone());
        move |event: ExecEvent, e: Option<ExecutionId>| {
            let e = e.unwrap_or(ExecutionId {
                attempt: AttemptRef {
                    task_id: 0,
                    attempt: 0,
                },
                term: 0,
            });
            lock(&shared).history.executions.push(ExecRecord {
                worker: name.clone(),
                boot,
                at_ms: sim_clock_ms(),
                event,
                task: e.attempt.task_id,
                attempt: e.attempt.attempt,
                term: e.term,
            });
        }
    };
    journal(ExecEvent::Boot, None);
    let endpoint = quic_endpoint(
        SocketAddr::from(([0, 0, 0, 0], 0)),
        None,
        sub_seed(seed, 5000 + 100 * i as u64 + boot),
    )
    .await
    .map_err(err)?;
    let identity = Identity::load(&certs_dir, Role::Worker).map_err(err)?;
    let client =
        client_config(&identity, ALPN_WORKER, swarm_transport::Role::Coordinator).map_err(err)?;
    let mut params = WorkerParams::new(name, client, quic[0], quic[0].ip().to_string());
    params.more_coordinators = quic[1..].iter().map(|a| (*a, a.ip().to_string())).collect();
    params.slots = 4;
    params.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(2),
    };
    params.endpoint = Some(endpoint);
    params.jitter_seed = Some(sub_seed(seed, 6000 + 100 * i as u64 + boot));
    params.journal = Some(ExecutionJournal(Arc::new(move |e| match e {
        ExecutionEvent::Held(x) => journal(ExecEvent::Held, Some(x)),
        ExecutionEvent::Started(x) => journal(ExecEvent::Started, Some(x)),
        ExecutionEvent::Ended(x) => journal(ExecEvent::Ended, Some(x)),
        ExecutionEvent::Released(x) => journal(ExecEvent::Released, Some(x)),
    })));
    Worker::new(params)
        .map_err(err)?
        .run(std::future::pending())
        .await
        .map_err(err)
}

/// One API call from a client: `Ok((status, body))`, or `Err` for an unknown outcome.
pub(crate) async fn call(
    api: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), String> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    let bytes = match body {
        Some(v) => {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let req = b.body(bytes).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, http_exchange(api, req))
        .await
        .map_err(|_| "timed out".to_string())??;
    let status = resp.status();
    let v = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
    Ok((status, v))
}

/// Set [`KEY_LIMITS`] and [`RATE_LIMITS`] through random members, each retried until a
/// 2xx (a PUT sets a limit whole, so a repeat is harmless), or until `stop`: whether all
/// were set.
async fn set_limits(
    apis: &[SocketAddr],
    shared: &SharedRef,
    rng: &mut StdRng,
    stop: Duration,
) -> bool {
    let bodies = KEY_LIMITS
        .iter()
        .map(|(name, n)| (*name, json!({"concurrency": n})))
        .chain(RATE_LIMITS.iter().map(|(name, r)| {
            (
                *name,
                json!({"rate": format!("{}/{}ms", r.tokens, r.per_ms), "burst": r.burst}),
            )
        }));
    for (name, body) in bodies {
        let mut tries = 0u32;
        loop {
            if now() >= stop {
                return false;
            }
            tries += 1;
            let api = pick_api(shared, apis, rng);
            let path = format!("/v1/limits/{name}");
            match call(api, Method::PUT, &path, Some(body.clone())).await {
                Ok((st, _)) if st.is_success() => break,
                Ok((st, v))
                    if st == StatusCode::BAD_REQUEST
                        || st == StatusCode::UNAUTHORIZED
                        || st == StatusCode::FORBIDDEN
                        || st == StatusCode::UNPROCESSABLE_ENTITY =>
                {
                    // Such a refusal is the scenario's mistake, not a fault.
                    panic!("PUT {path} {body} refused: {st} {v}");
                }
                _ => {}
            }
            let backoff = 50u64 << tries.min(5);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(backoff / 2..=backoff))).await;
        }
    }
    true
}

/// Create [`SCHEDULES`] from `start` (when `enabled`), one after the other, each retried
/// through random members until confirmed, or until `stop`. A create is refused as a
/// conflict (`schedule_exists`) if an earlier try that looked lost did create it; either
/// way the schedule is then read back (its creation time as committed), and the checker
/// compares the audit's view with what was asked.
async fn create_schedules(
    apis: Vec<SocketAddr>,
    shared: SharedRef,
    seed: u64,
    start: Duration,
    stop: Duration,
    enabled: bool,
) {
    if !enabled {
        return;
    }
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, 400));
    tokio::time::sleep(start.saturating_sub(now())).await;
    for &(name, every_ms) in SCHEDULES {
        let agent = "echo";
        let body = json!({
            "name": name,
            "every": format!("{}ms", every_ms),
            "catch_up": "all",
            "max_catch_up": SCHEDULE_CATCH_UP,
            "task": {"agent": agent, "payload": {"schedule": name},
                     "timeout_ms": 8000, "max_attempts": 6},
        });
        let slot = {
            let mut s = lock(&shared);
            s.history.schedules.push(ScheduleCreation {
                name: name.to_string(),
                every_ms,
                max_catch_up: SCHEDULE_CATCH_UP,
                agent: agent.to_string(),
                invoked_ms: sim_clock_ms(),
                confirmed: None,
            });
            s.history.schedules.len() - 1
        };
        let mut created = false;
        let mut tries = 0u32;
        while now() < stop {
            tries += 1;
            let api = pick_api(&shared, &apis, &mut rng);
            if !created {
                match call(api, Method::POST, "/v1/schedules", Some(body.clone())).await {
                    Ok((st, _)) if st.is_success() => created = true,
                    Ok((st, v))
                        if st == StatusCode::CONFLICT
                            && v["error"]["code"] == "schedule_exists" =>
                    {
                        created = true
                    }
                    Ok((st, v))
                        if st.is_client_error()
                            && st != StatusCode::REQUEST_TIMEOUT
                            && st != StatusCode::TOO_MANY_REQUESTS =>
                    {
                        // Such a refusal is the scenario's mistake, not a fault.
                        panic!("POST /v1/schedules {body} refused: {st} {v}");
                    }
                    _ => {}
                }
            }
            if created {
                // A 404 here is a deposed leader's stale answer: read again.
                let path = format!("/v1/schedules/{name}");
                if let Ok((StatusCode::OK, v)) = call(api, Method::GET, &path, None).await {
                    if let Some(at) = v["created_at_ms"].as_u64() {
                        lock(&shared).history.schedules[slot].confirmed =
                            Some((sim_clock_ms(), at));
                        break;
                    }
                }
            }
            let backoff = 50u64 << tries.min(5);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(backoff / 2..=backoff))).await;
        }
    }
}

/// Submit tasks from `start` to `stop`, each retried with its key until acknowledged
/// (or `give_up`). Once it has set the run's limits, a submitter gives some of its tasks
/// a concurrency key (`tenant:0` to `tenant:3`, mostly on sleeps) or the rate limit
/// `bucket`, or both.
async fn submitter(
    i: usize,
    apis: Vec<SocketAddr>,
    shared: SharedRef,
    seed: u64,
    (start, stop, give_up): (Duration, Duration, Duration),
    limited_tasks: bool,
) {
    let client = format!("submitter{}", i + 1);
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, 100 + i as u64));
    // Its own generator for the limits, so the other draws stay as they were.
    let mut lrng = StdRng::seed_from_u64(sub_seed(seed, 150 + i as u64));
    tokio::time::sleep(start.saturating_sub(now())).await;
    let limited = limited_tasks && set_limits(&apis, &shared, &mut lrng, stop).await;
    let mut n = 0u64;
    while now() < stop {
        n += 1;
        // Now and then a key every submitter may be using at about the same time:
        // concurrent submits of one key must still make one task.
        let key = if rng.gen_bool(0.15) {
            format!("shared-{}", now().as_secs() / 2)
        } else {
            format!("s{}-{n}", i + 1)
        };
        let mut body = if rng.gen_bool(0.8) {
            json!({"agent": "echo", "payload": {"key": key}, "idempotency_key": key,
                   "timeout_ms": 8000, "max_attempts": 6})
        } else {
            json!({"agent": "sleep", "payload": {"ms": rng.gen_range(50..2000)},
                   "idempotency_key": key, "timeout_ms": 8000, "max_attempts": 6})
        };
        // Now and then a dependant of one or two recently acknowledged tasks (a graph
        // edge): it must wait for them, or be cancelled if one does not succeed. (A
        // `sleep` dependant fails, its input being the graph's JSON rather than `{"ms"}`:
        // so its own dependants take the cancel path.)
        if !key.starts_with("shared-") && rng.gen_bool(0.25) {
            let parents: Vec<u64> = {
                let s = lock(&shared);
                let recent = &s.acked[s.acked.len().saturating_sub(20)..];
                (0..rng.gen_range(1..=2))
                    .filter_map(|_| recent.get(rng.gen_range(0..recent.len().max(1))).copied())
                    .collect::<BTreeSet<u64>>()
                    .into_iter()
                    .collect()
            };
            if !parents.is_empty() {
                body["depends_on"] = json!(parents);
            }
        }
        if limited && !key.starts_with("shared-") {
            if lrng.gen_bool(KEYED) {
                body["concurrency_key"] = json!(format!("tenant:{}", lrng.gen_range(0..KEYS)));
                // Mostly sleeps, so that a key's attempts overlap and its limit binds
                // (an echo ends at once). Not a dependant: its input would be the graph's.
                if body["agent"] == "echo" && body["depends_on"].is_null() && lrng.gen_bool(0.5) {
                    body["agent"] = json!("sleep");
                    body["payload"] = json!({"ms": lrng.gen_range(200..2500)});
                }
            }
            if lrng.gen_bool(RATE_LIMITED) {
                body["rate_limit"] = json!(RATE_LIMITS[0].0);
            }
        }
        let mut tries = 0u32;
        loop {
            tries += 1;
            let api = pick_api(&shared, &apis, &mut rng);
            let invoked = now();
            let r = call(api, Method::POST, "/v1/tasks", Some(body.clone())).await;
            let completed = now();
            let result = match r {
                Ok((st, v)) if st.is_success() => match v["id"].as_u64() {
                    Some(id) => SubmitResult::Acked { id },
                    None => SubmitResult::Unknown {
                        reason: format!("{st} without an id: {v}"),
                    },
                },
                Ok((st, _)) if st.is_client_error() => SubmitResult::Refused {
                    status: st.as_u16(),
                },
                Ok((st, v)) => SubmitResult::Unknown {
                    reason: format!("{st} {}", v["error"]["code"].as_str().unwrap_or("")),
                },
                Err(e) => SubmitResult::Unknown { reason: e },
            };
            let done = !matches!(result, SubmitResult::Unknown { .. });
            {
                let mut s = lock(&shared);
                if let SubmitResult::Acked { id } = result {
                    s.acked.push(id);
                }
                s.history.submits.push(Submit {
                    client: client.clone(),
                    key: key.clone(),
                    invoked,
                    completed,
                    result,
                });
            }
            if done || now() >= give_up {
                break;
            }
            let backoff = 50u64 << tries.min(5);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(backoff / 2..=backoff))).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
    }
    lock(&shared).submitters_done += 1;
}

/// Read acknowledged tasks through random nodes from `start`, until the submitters are
/// done and `min_stop` has passed, or `stop`.
#[allow(clippy::too_many_arguments)]
async fn reader(
    i: usize,
    apis: Vec<SocketAddr>,
    shared: SharedRef,
    seed: u64,
    submitters: usize,
    start: Duration,
    min_stop: Duration,
    stop: Duration,
) {
    let client = format!("reader{}", i + 1);
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, 200 + i as u64));
    tokio::time::sleep(start.saturating_sub(now())).await;
    loop {
        let done = lock(&shared).submitters_done >= submitters;
        if (done && now() >= min_stop) || now() >= stop {
            break;
        }
        let id = {
            let s = lock(&shared);
            if s.acked.is_empty() {
                None
            } else {
                // Mostly recent tasks (the interesting ones), sometimes any.
                let n = s.acked.len();
                let k = if rng.gen_bool(0.7) {
                    n - 1 - rng.gen_range(0..n.min(10))
                } else {
                    rng.gen_range(0..n)
                };
                Some(s.acked[k])
            }
        };
        let Some(id) = id else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let api = pick_api(&shared, &apis, &mut rng);
        let invoked = now();
        let r = call(api, Method::GET, &format!("/v1/tasks/{id}"), None).await;
        let completed = now();
        let result = match r {
            Ok((st, v)) if st == StatusCode::OK => match v["state"].as_str() {
                Some(state) => ReadResult::Found {
                    state: state.to_string(),
                },
                None => ReadResult::Unknown {
                    reason: format!("200 without a state: {v}"),
                },
            },
            Ok((st, _)) if st == StatusCode::NOT_FOUND => ReadResult::NotFound,
            Ok((st, v)) => ReadResult::Unknown {
                reason: format!("{st} {}", v["error"]["code"].as_str().unwrap_or("")),
            },
            Err(e) => ReadResult::Unknown { reason: e },
        };
        lock(&shared).history.reads.push(Read {
            client: client.clone(),
            id,
            invoked,
            completed,
            result,
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(10..150))).await;
    }
}

/// After the submitters are done: list the whole table until every task is final; then
/// let the members settle (see the module docs).
async fn auditor(
    apis: Vec<SocketAddr>,
    shared: SharedRef,
    seed: u64,
    submitters: usize,
    not_before: Duration,
    deadline: Duration,
) {
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, 300));
    loop {
        if lock(&shared).submitters_done >= submitters && now() >= not_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut last = String::from("no listing succeeded");
    let audit = loop {
        if now() > deadline {
            break Audit::Incomplete {
                reason: format!("not settled by {deadline:?}; last attempt: {last}"),
            };
        }
        let api = pick_api(&shared, &apis, &mut rng);
        match audit_once(api).await {
            Ok((invoked, completed, tasks, schedules)) => {
                let open: Vec<&TaskRecord> = tasks
                    .iter()
                    .filter(|t| !checker::is_final(&t.state))
                    .collect();
                if open.is_empty() {
                    break Audit::Complete {
                        invoked,
                        completed,
                        tasks,
                        schedules,
                    };
                }
                last = format!(
                    "{} of {} tasks not final, e.g. {:?}",
                    open.len(),
                    tasks.len(),
                    open.iter().take(3).collect::<Vec<_>>()
                );
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    lock(&shared).history.audit = Some(audit);

    // Settle: once the operator is done, every node checkpoints what it applied; wait
    // until every member has applied the leader's whole log and checkpointed it.
    loop {
        let operator_done = {
            let s = lock(&shared);
            s.admin.closed && !s.admin.busy
        };
        if operator_done || now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lock(&shared).settle = true;
    // Its own time: even when the audit gave up, the replicas say what they hold.
    let settle_by = now().max(deadline) + SETTLE_TIME;
    let settled = loop {
        match membership::settled(&shared) {
            Ok(s) => break Ok(s),
            Err(why) if now() > settle_by => {
                break Err(format!("not settled by {settle_by:?}: {why}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    lock(&shared).settled = Some(settled);
}

/// Every schedule, then every task, from `api`: the schedules are read before the
/// (linearizable) listing is invoked, so it holds every task their ticks had submitted.
async fn audit_once(
    api: SocketAddr,
) -> Result<(Duration, Duration, Vec<TaskRecord>, Vec<ScheduleStatus>), String> {
    let (st, v) = call(api, Method::GET, "/v1/schedules", None).await?;
    if st != StatusCode::OK {
        return Err(format!("schedules from {api}: {st} {v}"));
    }
    let schedules = v["schedules"]
        .as_array()
        .ok_or_else(|| format!("schedules from {api}: no list in {v}"))?
        .iter()
        .map(schedule_status)
        .collect::<Result<Vec<_>, _>>()?;
    let (invoked, completed, tasks) = list_all(api).await?;
    Ok((invoked, completed, tasks, schedules))
}

fn schedule_status(v: &Value) -> Result<ScheduleStatus, String> {
    let num = |field: &str| {
        v[field]
            .as_u64()
            .ok_or_else(|| format!("schedule without {field}: {v}"))
    };
    Ok(ScheduleStatus {
        name: v["name"]
            .as_str()
            .ok_or_else(|| format!("schedule without a name: {v}"))?
            .to_string(),
        every_ms: v["every_ms"].as_u64(),
        catch_up: v["catch_up"].as_str().unwrap_or_default().to_string(),
        max_catch_up: v["max_catch_up"].as_u64().map(|m| m as u32),
        paused: v["paused"].as_bool().unwrap_or_default(),
        agent: v["agent"].as_str().unwrap_or_default().to_string(),
        created_at_ms: num("created_at_ms")?,
        next_tick_ms: v["next_tick_ms"].as_u64(),
        fired: num("fired")?,
        skipped: num("skipped")?,
        refused: num("refused")?,
        last_tick_ms: v["last_tick_ms"].as_u64(),
    })
}

/// Every task, page by page, from `api`.
async fn list_all(api: SocketAddr) -> Result<(Duration, Duration, Vec<TaskRecord>), String> {
    let invoked = now();
    let mut tasks = Vec::new();
    let mut after = 0u64;
    loop {
        let (st, v) = call(
            api,
            Method::GET,
            &format!("/v1/tasks?limit=1000&after={after}"),
            None,
        )
        .await?;
        if st != StatusCode::OK {
            return Err(format!("listing from {api}: {st} {v}"));
        }
        for t in v["tasks"].as_array().cloned().unwrap_or_default() {
            tasks.push(record(&t)?);
        }
        match v["next_after"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    Ok((invoked, now(), tasks))
}

fn record(t: &Value) -> Result<TaskRecord, String> {
    let attempts = t["attempts"].as_array().cloned().unwrap_or_default();
    Ok(TaskRecord {
        id: t["id"]
            .as_u64()
            .ok_or_else(|| format!("task without id: {t}"))?,
        key: t["idempotency_key"].as_str().map(str::to_string),
        agent: t["agent"].as_str().unwrap_or_default().to_string(),
        state: t["state"].as_str().unwrap_or_default().to_string(),
        payload: t["payload"].as_str().map(str::to_string),
        output: t["output"].as_str().map(str::to_string),
        attempts: attempts.len(),
        succeeded_attempts: attempts
            .iter()
            .filter(|a| a["outcome"] == "succeeded")
            .count(),
        attempt_log: attempts
            .iter()
            .map(|a| AttemptRecord {
                number: a["attempt"].as_u64().unwrap_or_default() as u32,
                worker: a["worker"].as_str().unwrap_or_default().to_string(),
                started_ms: a["started_at_ms"].as_u64().unwrap_or_default(),
                finished_ms: a["finished_at_ms"].as_u64(),
                outcome: a["outcome"].as_str().map(str::to_string),
            })
            .collect(),
        concurrency_key: t["concurrency_key"].as_str().map(str::to_string),
        rate_limit: t["rate_limit"].as_str().map(str::to_string),
        parents: t["parents"]
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default(),
        error: t["error"].as_str().map(str::to_string),
    })
}
