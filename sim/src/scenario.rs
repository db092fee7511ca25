//! One seeded run: a cluster of coordinators and workers on turmoil's simulated network,
//! clients submitting and reading through the HTTP API, a fault schedule drawn from the
//! seed, then healing, draining, a final audit and the checker.
//!
//! Time line of a run (simulated time):
//! * `0 ..` — coordinators start (node 1 bootstraps the cluster), workers dial them;
//! * `warmup ..` — clients submit (each key retried until acknowledged) and read;
//!   faults start;
//! * `warmup + load` — every fault heals: links repaired, held messages delivered,
//!   crashed hosts restarted; clients stop starting new submits and finish the ones in
//!   progress (giving up `drain` later); readers go on for a few seconds more;
//! * once the submitters are done, the auditor lists the whole table through the API
//!   until every task is final (giving up `audit_deadline` after the drain), and the run
//!   ends.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{self, Method, StatusCode};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use swarm_coordinator::{coordinator_server_config, CoordinatorConfig, Parts};
use swarm_proto::ALPN_WORKER;
use swarm_transport::{client_config, Identity, Role};
use swarm_worker::{Backoff, Worker, WorkerParams};

use crate::checker::{self, Audit, History, Read, ReadResult, Submit, SubmitResult, TaskRecord};
use crate::faults::{self, Episode, Fault, Network, Target};
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
/// Simulated wall-clock time at the start of every run (fixed, so runs replay).
const EPOCH_SECS: u64 = 1_750_000_000;

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
    /// Inject faults (off: a calm run, to see the plumbing work).
    pub faults: bool,
    /// Raft snapshot interval (entries). Snapshots are built and installed on tokio's
    /// blocking pool, which a simulation cannot order deterministically: a run that takes
    /// one replays exactly only up to that point. The default is beyond what a run writes.
    pub snapshot_every: u64,
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
            snapshot_every: 1_000_000,
        }
    }
}

/// What one run produced.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub history: History,
    pub violations: Vec<checker::Violation>,
    /// Faults as applied and what the coordinators reported about leadership, with times.
    pub log: Vec<String>,
    /// A hash of the history and the log: equal for two runs of one seed iff they replayed
    /// identically (as far as clients and the fault driver can tell).
    pub digest: u64,
    /// Simulated time the run took.
    pub sim_time: Duration,
}

impl Report {
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
        format!(
            "seed {}: {} submits ({acked} acked, {unknown} unknown), {} reads, {tasks} tasks {states}, {retried} with several attempts, {} log lines, {:.1}s simulated, digest {:016x}",
            self.seed,
            self.history.submits.len(),
            self.history.reads.len(),
            self.log.len(),
            self.sim_time.as_secs_f64(),
            self.digest
        )
    }
}

/// What the hosts and clients share with each other and with the driver. None of it
/// reaches the system under test: it is the clients' notebook and the driver's view of
/// who leads.
#[derive(Default)]
struct Shared {
    history: History,
    /// Acknowledged ids in the order they were acknowledged (readers pick from them).
    acked: Vec<u64>,
    /// Submitters that finished.
    submitters_done: usize,
    /// Per coordinator (0-based): (is leader, term), as it last reported.
    roles: BTreeMap<usize, (bool, u64)>,
    log: Vec<String>,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(s: &SharedRef) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Simulated time since the start of the run.
fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// The coordinators' clock: the simulation's, so leases and retries follow simulated time.
fn sim_clock_ms() -> u64 {
    match turmoil::since_epoch() {
        Some(d) => d.as_millis() as u64,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

fn err(e: impl std::fmt::Display) -> Box<dyn std::error::Error> {
    e.to_string().into()
}

/// A seed for one purpose of one run.
fn sub_seed(seed: u64, purpose: u64) -> u64 {
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

/// Run `seed` with `opts` and check the history. `Err` when the simulation itself broke
/// (a host's software failed or panicked, or the run exceeded its time budget).
pub fn run(seed: u64, opts: &Options) -> Result<Report, String> {
    swarm_coordinator::node::set_clock(sim_clock_ms);
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
        .simulation_duration(audit_until + Duration::from_secs(30))
        .tick_duration(opts.tick)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .repair_rate(0.4)
        .udp_capacity(16_384)
        .tcp_capacity(16_384)
        .enable_random_order()
        .build();

    // Names first, so every address is known (and in the certificates) before anything runs.
    let coord_names: Vec<String> = (1..=opts.coordinators).map(|i| format!("c{i}")).collect();
    let worker_names: Vec<String> = (1..=opts.workers).map(|i| format!("w{i}")).collect();
    // Clients share two hosts (fewer hosts, fewer links: a cheaper step): the writers, and
    // the readers with the auditor.
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

    for (i, name) in coord_names.iter().enumerate() {
        let mut cfg = CoordinatorConfig::single_node(
            scratch.path().join(name),
            certs_dir.clone(),
            SocketAddr::from(([0, 0, 0, 0], QUIC_PORT)),
            SocketAddr::from(([0, 0, 0, 0], API_PORT)),
            TOKEN.into(),
        );
        cfg.node_id = i as u64 + 1;
        cfg.advertise = quic[i].to_string();
        cfg.api_advertise = apis[i].to_string();
        cfg.bootstrap = i == 0;
        cfg.peers = (0..opts.coordinators)
            .filter(|j| *j != i)
            .map(|j| {
                (
                    j as u64 + 1,
                    swarm_coordinator::raft::NodeAddr {
                        raft_addr: quic[j].to_string(),
                        api_addr: apis[j].to_string(),
                    },
                )
            })
            .collect();
        cfg.snapshot_every = opts.snapshot_every;
        let shared = shared.clone();
        let boots = Arc::new(Mutex::new(0u64));
        sim.host(name.as_str(), move || {
            let cfg = cfg.clone();
            let shared = shared.clone();
            let boot = {
                let mut b = boots.lock().unwrap_or_else(PoisonError::into_inner);
                *b += 1;
                *b
            };
            async move { coordinator(i, cfg, boot, seed, shared).await }
        });
    }

    for (i, name) in worker_names.iter().enumerate() {
        let certs_dir = certs_dir.clone();
        let quic = quic.clone();
        let boots = Arc::new(Mutex::new(0u64));
        let name = name.clone();
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
                async move { worker(i, name, certs_dir, quic, boot, seed).await }
            }
        });
    }

    {
        let writers = (0..opts.submitters).map(|i| {
            let (apis, shared) = (apis.clone(), shared.clone());
            submitter(i, apis, shared, seed, opts.warmup, heal_at, drain_until)
        });
        let writers = futures::future::join_all(writers.collect::<Vec<_>>());
        sim.client("writers", async move {
            writers.await;
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
    let episodes = if opts.faults {
        faults::schedule(
            &mut plan_rng,
            opts.warmup + Duration::from_millis(500),
            heal_at,
            opts.coordinators,
            opts.workers,
        )
    } else {
        Vec::new()
    };
    let hosts = Hosts {
        coordinators: coord_ips,
        workers: worker_ips,
        clients: client_ips,
    };
    let mut driver = Driver::new(episodes, hosts, shared.clone());
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
    drop(sim);

    let (history, log) = {
        let mut s = lock(&shared);
        (std::mem::take(&mut s.history), std::mem::take(&mut s.log))
    };
    let violations = checker::check(&history);
    let mut h = std::hash::DefaultHasher::new();
    history.hash(&mut h);
    log.hash(&mut h);
    Ok(Report {
        seed,
        digest: h.finish(),
        history,
        violations,
        log,
        sim_time,
    })
}

/// The last `n` lines of `log`.
pub fn tail(log: &[String], n: usize) -> String {
    log[log.len().saturating_sub(n)..].join("\n")
}

struct Hosts {
    coordinators: Vec<IpAddr>,
    workers: Vec<IpAddr>,
    clients: Vec<IpAddr>,
}

/// Applies the fault schedule between simulation steps.
struct Driver {
    /// Start and end events, in time order: (time, start?, episode index).
    events: Vec<(Duration, bool, usize)>,
    next: usize,
    episodes: Vec<Episode>,
    /// The coordinator each episode resolved its targets to, per target slot.
    resolved: BTreeMap<usize, Vec<usize>>,
    hosts: Hosts,
    net: Network,
    /// Crash reference counts per host.
    crashed: BTreeMap<IpAddr, u32>,
    loss: Vec<(usize, f64)>,
    latency: Vec<(usize, u64)>,
    shared: SharedRef,
    healed: bool,
}

impl Driver {
    fn new(episodes: Vec<Episode>, hosts: Hosts, shared: SharedRef) -> Self {
        let mut events: Vec<(Duration, bool, usize)> = episodes
            .iter()
            .enumerate()
            .flat_map(|(i, e)| [(e.start, true, i), (e.end, false, i)])
            .collect();
        // Ends before starts at the same instant; otherwise schedule order.
        events.sort_by_key(|(t, start, i)| (*t, *start, *i));
        Driver {
            events,
            next: 0,
            episodes,
            resolved: BTreeMap::new(),
            hosts,
            net: Network::default(),
            crashed: BTreeMap::new(),
            loss: Vec::new(),
            latency: Vec::new(),
            shared,
            healed: false,
        }
    }

    fn log(&self, at: Duration, line: String) {
        lock(&self.shared)
            .log
            .push(format!("{:>8.3}s {line}", at.as_secs_f64()));
    }

    /// The coordinator that most recently claimed leadership (highest term) among those
    /// running; if none does, the running one `pick` selects.
    fn leader(&self, pick: usize) -> usize {
        let roles = lock(&self.shared).roles.clone();
        let running: Vec<usize> = (0..self.hosts.coordinators.len())
            .filter(|i| !self.crashed.contains_key(&self.hosts.coordinators[*i]))
            .collect();
        roles
            .iter()
            .filter(|(i, (leader, _))| *leader && running.contains(i))
            .max_by_key(|(_, (_, term))| *term)
            .map(|(i, _)| *i)
            .unwrap_or_else(|| {
                running
                    .get(pick % running.len().max(1))
                    .copied()
                    .unwrap_or(0)
            })
    }

    /// The coordinator `t` means now, for episode `ep`.
    fn resolve(&self, ep: usize, t: Target) -> usize {
        match t {
            Target::Node(i) => i,
            Target::Leader => self.leader(ep),
        }
    }

    fn tick(&mut self, sim: &mut turmoil::Sim<'_>, heal_at: Duration) {
        let now = sim.elapsed();
        if !self.healed && now >= heal_at {
            self.heal(sim, now);
            return;
        }
        while let Some(&(at, start, i)) = self.events.get(self.next) {
            if at > now || self.healed {
                break;
            }
            self.next += 1;
            if start {
                self.start(sim, i, now);
            } else {
                self.end(sim, i, now);
            }
        }
    }

    fn start(&mut self, sim: &mut turmoil::Sim<'_>, i: usize, now: Duration) {
        let fault = self.episodes[i].fault;
        let c = self.hosts.coordinators.clone();
        let mut nodes = Vec::new();
        match fault {
            Fault::IsolateFromPeers(t) => {
                let n = self.resolve(i, t);
                nodes.push(n);
                for (j, ip) in c.iter().enumerate() {
                    if j != n {
                        self.net.drop_dir(c[n], *ip, true);
                        self.net.drop_dir(*ip, c[n], true);
                    }
                }
            }
            Fault::IsolateFully(t) => {
                let n = self.resolve(i, t);
                nodes.push(n);
                for ip in self.all_hosts() {
                    if ip != c[n] {
                        self.net.drop_dir(c[n], ip, true);
                        self.net.drop_dir(ip, c[n], true);
                    }
                }
            }
            Fault::OneWay { from, to } => {
                let a = self.resolve(i, from);
                let mut b = self.resolve(i, to);
                if a == b {
                    b = (a + 1) % c.len();
                }
                nodes.extend([a, b]);
                self.net.drop_dir(c[a], c[b], true);
            }
            Fault::Hold(x, y) => {
                let a = self.resolve(i, x);
                let mut b = self.resolve(i, y);
                if a == b {
                    b = (a + 1) % c.len();
                }
                nodes.extend([a, b]);
                self.net.hold(c[a], c[b], true);
            }
            Fault::HoldWorker(x, w) => {
                let a = self.resolve(i, x);
                nodes.push(a);
                self.net.hold(c[a], self.hosts.workers[w], true);
            }
            Fault::Loss(p) => {
                self.loss.push((i, p));
                self.apply_loss(sim);
            }
            Fault::Latency(ms) => {
                self.latency.push((i, ms));
                self.apply_latency(sim);
            }
            Fault::CrashCoordinator(t) => {
                let n = self.resolve(i, t);
                nodes.push(n);
                self.crash(sim, c[n]);
                lock(&self.shared).roles.remove(&n);
            }
            Fault::CrashWorker(w) => {
                let ip = self.hosts.workers[w];
                self.crash(sim, ip);
            }
        }
        let names: Vec<String> = nodes.iter().map(|n| format!("c{}", n + 1)).collect();
        self.resolved.insert(i, nodes);
        self.log(now, format!("start #{i}: {fault} {names:?}"));
        for l in self.net.apply(sim) {
            self.log(now, format!("  link {l}"));
        }
    }

    fn end(&mut self, sim: &mut turmoil::Sim<'_>, i: usize, now: Duration) {
        let fault = self.episodes[i].fault;
        let nodes = self.resolved.remove(&i).unwrap_or_default();
        let c = self.hosts.coordinators.clone();
        match fault {
            Fault::IsolateFromPeers(_) => {
                let n = nodes[0];
                for (j, ip) in c.iter().enumerate() {
                    if j != n {
                        self.net.drop_dir(c[n], *ip, false);
                        self.net.drop_dir(*ip, c[n], false);
                    }
                }
            }
            Fault::IsolateFully(_) => {
                let n = nodes[0];
                for ip in self.all_hosts() {
                    if ip != c[n] {
                        self.net.drop_dir(c[n], ip, false);
                        self.net.drop_dir(ip, c[n], false);
                    }
                }
            }
            Fault::OneWay { .. } => self.net.drop_dir(c[nodes[0]], c[nodes[1]], false),
            Fault::Hold(..) => self.net.hold(c[nodes[0]], c[nodes[1]], false),
            Fault::HoldWorker(_, w) => self.net.hold(c[nodes[0]], self.hosts.workers[w], false),
            Fault::Loss(_) => {
                self.loss.retain(|(e, _)| *e != i);
                self.apply_loss(sim);
            }
            Fault::Latency(_) => {
                self.latency.retain(|(e, _)| *e != i);
                self.apply_latency(sim);
            }
            Fault::CrashCoordinator(_) => self.restart(sim, c[nodes[0]]),
            Fault::CrashWorker(w) => {
                let ip = self.hosts.workers[w];
                self.restart(sim, ip);
            }
        }
        self.log(now, format!("end #{i}: {fault}"));
        for l in self.net.apply(sim) {
            self.log(now, format!("  link {l}"));
        }
    }

    fn all_hosts(&self) -> Vec<IpAddr> {
        self.hosts
            .coordinators
            .iter()
            .chain(&self.hosts.workers)
            .chain(&self.hosts.clients)
            .copied()
            .collect()
    }

    fn crash(&mut self, sim: &mut turmoil::Sim<'_>, ip: IpAddr) {
        let n = self.crashed.entry(ip).or_insert(0);
        *n += 1;
        if *n == 1 {
            sim.crash(ip);
        }
    }

    fn restart(&mut self, sim: &mut turmoil::Sim<'_>, ip: IpAddr) {
        if let Some(n) = self.crashed.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.crashed.remove(&ip);
                sim.bounce(ip);
            }
        }
    }

    fn apply_loss(&self, sim: &mut turmoil::Sim<'_>) {
        let p = self.loss.iter().map(|(_, p)| *p).fold(0.0, f64::max);
        sim.set_fail_rate(p);
    }

    fn apply_latency(&self, sim: &mut turmoil::Sim<'_>) {
        let ms = self.latency.iter().map(|(_, ms)| *ms).max().unwrap_or(20);
        sim.set_max_message_latency(Duration::from_millis(ms));
    }

    /// End every fault at once.
    fn heal(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration) {
        self.healed = true;
        self.loss.clear();
        self.latency.clear();
        self.apply_loss(sim);
        self.apply_latency(sim);
        self.net.clear();
        for l in self.net.apply(sim) {
            self.log(now, format!("  link {l}"));
        }
        // Links broken by random loss are not in `net`; repair every pair.
        let all = self.all_hosts();
        for (k, a) in all.iter().enumerate() {
            for b in &all[k + 1..] {
                sim.repair(*a, *b);
            }
        }
        for ip in std::mem::take(&mut self.crashed).into_keys() {
            sim.bounce(ip);
        }
        self.log(
            now,
            "heal: all links repaired, crashed hosts restarted".into(),
        );
    }
}

/// A coordinator host: serve until crashed, reporting leadership to the driver.
async fn coordinator(
    i: usize,
    cfg: CoordinatorConfig,
    boot: u64,
    seed: u64,
    shared: SharedRef,
) -> turmoil::Result {
    let server = coordinator_server_config(&cfg.certs_dir).map_err(err)?;
    let endpoint = quic_endpoint(
        SocketAddr::from(([0, 0, 0, 0], QUIC_PORT)),
        Some(server),
        sub_seed(seed, 1000 + 100 * i as u64 + boot),
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
            snapshot_chunk: None,
        },
    )
    .await
    .map_err(|e| err(format!("c{} boot {boot}: {e:#}", i + 1)))?;
    let mut metrics = handle.node().raft().metrics();
    let mut last = (false, 0);
    loop {
        let role = {
            let m = metrics.borrow_and_update();
            (
                m.state == openraft::ServerState::Leader && m.current_leader == Some(m.id),
                m.current_term,
            )
        };
        if role != last {
            last = role;
            let mut s = lock(&shared);
            s.roles.insert(i, role);
            let line = format!(
                "{:>8.3}s c{} boot {boot}: term {} {}",
                now().as_secs_f64(),
                i + 1,
                role.1,
                if role.0 { "leader" } else { "not leader" }
            );
            s.log.push(line);
        }
        if metrics.changed().await.is_err() {
            return Err(err(format!("c{}: raft stopped", i + 1)));
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
) -> turmoil::Result {
    let endpoint = quic_endpoint(
        SocketAddr::from(([0, 0, 0, 0], 0)),
        None,
        sub_seed(seed, 5000 + 100 * i as u64 + boot),
    )
    .await
    .map_err(err)?;
    let identity = Identity::load(&certs_dir, Role::Worker).map_err(err)?;
    let client = client_config(&identity, ALPN_WORKER).map_err(err)?;
    let mut params = WorkerParams::new(name, client, quic[0], quic[0].ip().to_string());
    params.more_coordinators = quic[1..].iter().map(|a| (*a, a.ip().to_string())).collect();
    params.slots = 4;
    params.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(2),
    };
    params.endpoint = Some(endpoint);
    params.jitter_seed = Some(sub_seed(seed, 6000 + 100 * i as u64 + boot));
    Worker::new(params)
        .map_err(err)?
        .run(std::future::pending())
        .await
        .map_err(err)
}

/// One API call from a client: `Ok((status, body))`, or `Err` for an unknown outcome.
async fn call(
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

/// Submit tasks from `start` to `stop`, each retried with its key until acknowledged
/// (or `give_up`).
async fn submitter(
    i: usize,
    apis: Vec<SocketAddr>,
    shared: SharedRef,
    seed: u64,
    start: Duration,
    stop: Duration,
    give_up: Duration,
) {
    let client = format!("submitter{}", i + 1);
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, 100 + i as u64));
    tokio::time::sleep(start.saturating_sub(now())).await;
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
        let body = if rng.gen_bool(0.8) {
            json!({"agent": "echo", "payload": {"key": key}, "idempotency_key": key,
                   "timeout_ms": 8000, "max_attempts": 6})
        } else {
            json!({"agent": "sleep", "payload": {"ms": rng.gen_range(50..2000)},
                   "idempotency_key": key, "timeout_ms": 8000, "max_attempts": 6})
        };
        let mut tries = 0u32;
        loop {
            tries += 1;
            let api = apis[rng.gen_range(0..apis.len())];
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
        let api = apis[rng.gen_range(0..apis.len())];
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

/// After the submitters are done: list the whole table until every task is final.
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
        let api = apis[rng.gen_range(0..apis.len())];
        match list_all(api).await {
            Ok((invoked, completed, tasks)) => {
                let open: Vec<&TaskRecord> = tasks
                    .iter()
                    .filter(|t| !checker::is_final(&t.state))
                    .collect();
                if open.is_empty() {
                    break Audit::Complete {
                        invoked,
                        completed,
                        tasks,
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
    })
}
