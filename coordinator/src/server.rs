//! Starting and stopping one coordinator process: storage, Raft, QUIC, HTTP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use swarm_proto::{ALPN_RAFT, ALPN_WORKER};
use swarm_transport::{client_config, server_config, server_endpoint, Identity, Role};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::cluster::{PeerHttp, ReqwestPeers};
use crate::node::{self, CoordinatorConfig, Node};
use crate::{http, metrics, raft, worker_session};
use raft::types::NodeAddr;
use raft::{RedbLogStore, StateMachineStore};

/// Most concurrent QUIC connections (workers plus peers) one coordinator serves.
const MAX_CONNECTIONS: usize = 16_384;
/// Most QUIC connections open at once from one IP address other than loopback (where
/// `swarm up` runs all its workers): one host's connections, handshakes included,
/// cannot take the whole of [`MAX_CONNECTIONS`].
const MAX_CONNECTIONS_PER_IP: usize = 512;

/// Open QUIC connections by remote IP; a [`PerIpPermit`] gives its slot back on drop.
#[derive(Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct PerIpPermit {
    table: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn try_acquire(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PerIpPermit> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_IP && !ip.is_loopback() {
            return None;
        }
        *n += 1;
        Some(PerIpPermit {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for PerIpPermit {
    fn drop(&mut self) {
        let mut m = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A running coordinator.
pub struct CoordinatorHandle {
    pub node: Arc<Node>,
    /// Where the HTTP API listens.
    pub api_addr: SocketAddr,
    /// Where the QUIC endpoint (workers and Raft peers) listens.
    pub quic_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    /// Raft RPCs to peers outside openraft (the hand-off's `TimeoutNow`); shares its
    /// connections with openraft's own copy.
    network: raft::network::QuicRaftNetwork,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// If this node leads, hand leadership to the voter whose log is furthest along
    /// before stopping (see [`crate::handoff`]); bounded, and a failure only means the
    /// cluster elects by itself. The node serves no more as leader afterwards: call
    /// [`CoordinatorHandle::shutdown`] next.
    pub async fn hand_off_leadership(&self) -> crate::handoff::Handoff {
        crate::handoff::hand_off(&self.node, &self.network).await
    }

    /// Check this node's certificate files every `every` and present a renewed
    /// certificate from the next handshake on (QUIC, Raft, HTTPS), without a restart; see
    /// [`swarm_transport::Identity::spawn_reload`]. The process runs it; a simulation,
    /// whose files never change, does not.
    pub fn spawn_cert_reload(&self, every: std::time::Duration) -> JoinHandle<()> {
        self.node.identity().spawn_reload(every)
    }

    /// Stop serving: API, worker sessions, Raft. Data on disk stays consistent.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"coordinator shutting down");
        if let Err(e) = self.node.raft().shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.endpoint.wait_idle().await;
    }

    /// The running node (its Raft handle, task table and configuration).
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

/// Replace a `:0` port in an advertised address with the bound one.
fn advertised(given: &str, bound: SocketAddr) -> String {
    if given.is_empty() {
        return bound.to_string();
    }
    match given.rsplit_once(':') {
        Some((host, "0")) => format!("{host}:{}", bound.port()),
        _ => given.to_string(),
    }
}

/// What [`start_with`] serves on and talks through, instead of binding real sockets.
pub struct Parts<L> {
    /// The QUIC endpoint for workers and Raft peers. It must accept connections with a
    /// server configuration offering both ALPNs ([`coordinator_server_config`]); Raft RPCs
    /// to peers are dialed from it too.
    pub endpoint: quinn::Endpoint,
    /// Where the HTTP API accepts connections.
    pub api_listener: L,
    /// HTTP to peer APIs (forwarding, node reports); `None` for [`ReqwestPeers`].
    pub peer_http: Option<Arc<dyn PeerHttp>>,
    /// Keep storage I/O on the calling thread where possible: the Raft log's
    /// ([`RedbLogStore::open_inline`]), and the state machine's checkpoints, dumps and
    /// installs ([`StateMachineStore::open_inline`]), instead of a writer thread and
    /// tokio's blocking pool. For single-threaded deterministic simulations, where I/O must complete at a
    /// point the program fixes.
    pub inline_storage: bool,
    /// Bytes per InstallSnapshot RPC instead of
    /// [`SNAPSHOT_CHUNK`](crate::limits::SNAPSHOT_CHUNK) (`None`). A simulation's snapshots
    /// are a few KiB: a small chunk makes each one travel in several RPCs, as large ones do.
    pub snapshot_chunk: Option<u64>,
}

/// The QUIC server configuration of a coordinator: its certificate from `certs_dir`,
/// worker and Raft ALPNs.
pub fn coordinator_server_config(certs_dir: &Path) -> anyhow::Result<quinn::ServerConfig> {
    let identity =
        Identity::load(certs_dir, Role::Coordinator).context("load coordinator certificate")?;
    server_config(&identity, &[ALPN_WORKER, ALPN_RAFT])
}

/// Start a coordinator: open storage, join or bootstrap Raft, serve QUIC and HTTP.
pub async fn start(cfg: CoordinatorConfig) -> anyhow::Result<CoordinatorHandle> {
    let endpoint = server_endpoint(cfg.listen, coordinator_server_config(&cfg.certs_dir)?)
        .with_context(|| format!("bind QUIC endpoint on {}", cfg.listen))?;
    let api_listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| format!("bind HTTP API on {}", cfg.api_listen))?;
    start_with(
        cfg,
        Parts {
            endpoint,
            api_listener,
            peer_http: None,
            inline_storage: false,
            snapshot_chunk: None,
        },
    )
    .await
}

/// Like [`start`], on a caller-supplied QUIC endpoint and HTTP listener (e.g. a
/// simulated network); `cfg.listen` and `cfg.api_listen` are not used.
pub async fn start_with<L>(
    mut cfg: CoordinatorConfig,
    parts: Parts<L>,
) -> anyhow::Result<CoordinatorHandle>
where
    L: http::Listener<Addr = SocketAddr>,
{
    let Parts {
        endpoint,
        api_listener,
        peer_http,
        inline_storage,
        snapshot_chunk,
    } = parts;
    metrics::handle();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data dir {}", cfg.data_dir.display()))?;
    let identity = Identity::load(&cfg.certs_dir, Role::Coordinator)
        .context("load coordinator certificate")?;
    if let Some(e) = &cfg.enroll {
        // Refuse to start with an enrollment CA that cannot sign, not at the first worker.
        swarm_transport::Issuer::load(&cfg.certs_dir.join("ca.pem"), &e.ca_key)
            .context("--enroll-ca-key: the cluster CA's key, matching ca.pem")?;
    }
    let quic_addr = endpoint.local_addr().context("QUIC local address")?;
    let api_addr = api_listener.local_addr().context("API local address")?;
    cfg.advertise = advertised(&cfg.advertise, quic_addr);
    cfg.api_advertise = advertised(&cfg.api_advertise, api_addr);

    let raft_dir = cfg.data_dir.join("raft");
    // Before the log is opened: it creates the directory this looks at.
    let store_cfg = crate::memory::pin_pattern_dimension(&raft_dir, &cfg.embedder)?;
    let log_store = if inline_storage {
        RedbLogStore::open_inline(&raft_dir)
    } else {
        RedbLogStore::open(&raft_dir)
    }
    .context("open raft log")?;
    let log_for_maintenance = log_store.clone();
    let sm = if inline_storage {
        StateMachineStore::open_inline(&raft_dir, store_cfg)
    } else {
        StateMachineStore::open_with(&raft_dir, store_cfg)
    }
    .context("open state machine")?;
    let table = sm.table();
    let receiving = sm.subscribe_receiving();
    let arrivals = sm.arrivals();
    // A snapshot brings the replicated pattern dimension with it.
    table.memory(|m| crate::memory::check_replica_dimension(m.config(), &cfg.embedder))?;
    let network = raft::network::QuicRaftNetwork::new(
        endpoint.clone(),
        client_config(&identity, ALPN_RAFT, Role::Coordinator)?,
        identity.clone(),
    );
    let handoff_network = network.clone();
    let mut raft_cfg = raft::raft_config("swarm", cfg.snapshot_every);
    if let Some(chunk) = snapshot_chunk {
        raft_cfg.snapshot_max_chunk_size = chunk.max(1);
    }
    let raft_cfg = Arc::new(raft_cfg.validate().context("raft config")?);
    step_down_at_start(&log_store, cfg.node_id).await?;
    let raft = openraft::Raft::new(cfg.node_id, raft_cfg, network, log_store, sm)
        .await
        .context("start raft")?;

    if cfg.bootstrap && !raft.is_initialized().await.context("read raft state")? {
        let mut members = BTreeMap::new();
        members.insert(
            cfg.node_id,
            NodeAddr {
                raft_addr: cfg.advertise.clone(),
                api_addr: cfg.api_advertise.clone(),
            },
        );
        members.extend(cfg.peers.iter().cloned());
        info!(voters = ?members.keys().collect::<Vec<_>>(), "bootstrapping a new cluster");
        if let Err(e) = raft.initialize(members).await {
            // Another node may have initialised the same cluster first; that is fine.
            warn!(error = %e, "raft initialize");
        }
    }

    let peer_http: Arc<dyn PeerHttp> = match peer_http {
        Some(p) => p,
        // Over HTTPS, peers are verified against the cluster CA and this node presents
        // its coordinator certificate.
        None if cfg.api.tls => Arc::new(
            ReqwestPeers::with_tls(swarm_transport::https_client_config(
                &identity,
                Role::Coordinator,
            )?)
            .map_err(anyhow::Error::msg)?,
        ),
        None => Arc::new(ReqwestPeers::new()),
    };
    let memory =
        crate::memory::MemoryService::new(&cfg.distill, &cfg.embedder).context("memory service")?;
    info!(embedder = %cfg.embedder.describe(), "ReasoningBank embedder");
    // One identity drives the QUIC server, the Raft client, the HTTPS API and relayed
    // members' proofs, so a renewed certificate reaches all of them (see
    // `CoordinatorHandle::spawn_cert_reload`).
    endpoint.set_server_config(Some(server_config(&identity, &[ALPN_WORKER, ALPN_RAFT])?));
    let node = Node::new(cfg, raft.clone(), table, peer_http, memory, identity);
    let (shutdown, shutdown_rx) = watch::channel(false);
    // Each loop restarts after a panic (see `node::supervise`).
    let mut tasks = vec![
        node::supervise(node.dead_loops.clone(), "applied", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || node::applied_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "dispatch", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || node::dispatch_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "gauges", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || node::gauges_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "quiet_while_receiving", {
            let (raft, receiving, rx) = (raft.clone(), receiving, shutdown_rx.clone());
            move || node::quiet_while_receiving(raft.clone(), receiving.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "status_events", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || crate::events::status_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "distill", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || crate::memory::distill_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "schedules", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || crate::schedules::fire_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "approvals", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || crate::approvals::expire_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "callbacks", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || crate::callbacks::deliver_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "finish_joint", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            move || crate::cluster::finish_joint_loop(node.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "maintenance", {
            let (node, log, rx) = (node.clone(), log_for_maintenance, shutdown_rx.clone());
            move || node::maintenance_loop(node.clone(), log.clone(), rx.clone())
        }),
        node::supervise(node.dead_loops.clone(), "accept", {
            let (node, rx) = (node.clone(), shutdown_rx.clone());
            let endpoint = endpoint.clone();
            move || accept_loop(node.clone(), arrivals.clone(), endpoint.clone(), rx.clone())
        }),
    ];
    let serve = http::serve(api_listener, node.clone(), shutdown_rx.clone())?;
    tasks.push(tokio::spawn(async move {
        if let Err(e) = serve.await {
            warn!(error = %e, "HTTP API stopped");
        }
    }));
    info!(node = node.id(), quic = %quic_addr, api = %api_addr, "coordinator started");
    Ok(CoordinatorHandle {
        node,
        api_addr,
        quic_addr,
        endpoint,
        network: handoff_network,
        shutdown,
        tasks,
    })
}

/// Accept QUIC connections and route them by ALPN.
async fn accept_loop(
    node: Arc<Node>,
    arrivals: raft::Arrivals,
    endpoint: quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_ip = Arc::new(PerIp::default());
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(
                "connection limit reached; refusing {}",
                incoming.remote_address()
            );
            incoming.refuse();
            continue;
        };
        let Some(ip_permit) = per_ip.try_acquire(incoming.remote_address().ip()) else {
            ::metrics::counter!("swarm_quic_connections_refused_total", "reason" => "per_ip")
                .increment(1);
            debug!(
                "{} has {MAX_CONNECTIONS_PER_IP} connections open; refusing another",
                incoming.remote_address().ip()
            );
            incoming.refuse();
            continue;
        };
        let node = node.clone();
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let _permits = (permit, ip_permit);
            let remote = incoming.remote_address();
            let mut accepted = match swarm_transport::accept(incoming).await {
                Ok(a) => a,
                Err(e) => {
                    debug!(%remote, error = %e, "connection failed during handshake");
                    return;
                }
            };
            let alpn = accepted
                .conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            match alpn.as_deref() {
                Some(p) if p == ALPN_WORKER => worker_session::serve(node, accepted).await,
                Some(p) if p == ALPN_RAFT => {
                    if let Err(e) = accepted.authenticate_as(Role::Coordinator).await {
                        warn!(%remote, error = %e, "refused raft connection");
                        return;
                    }
                    let revocations = node.identity().revocations().clone();
                    if let Err(e) =
                        swarm_transport::require_not_revoked(&accepted.conn, &revocations)
                    {
                        warn!(%remote, error = %e, "refused raft connection");
                        return;
                    }
                    // A peer whose certificate is revoked later is cut off at once.
                    tokio::spawn(raft::network::cut_when_distrusted(
                        accepted.conn.clone(),
                        node.identity().clone(),
                    ));
                    raft::network::serve_raft_connection(
                        accepted.conn,
                        node.raft().clone(),
                        arrivals,
                    )
                    .await;
                }
                _ => accepted
                    .conn
                    .close(quinn::VarInt::from_u32(0x5704), b"unknown ALPN"),
            }
        });
    }
}

/// A leader that restarts must not lead on in the same term, as openraft 0.9 would
/// (it restores a committed vote for itself as leadership): the `Run`s its earlier
/// process sent before their `Start` was on record would be sent again under the same
/// execution ids, so one execution could run twice (found by the simulation, seed
/// 3016). Its committed vote for itself is saved back as a plain vote in the same term:
/// the node stays bound to it (it votes for nobody else in that term) and leads again
/// only by winning an election, in a new term.
async fn step_down_at_start(log_store: &RedbLogStore, node_id: u64) -> anyhow::Result<()> {
    use openraft::storage::RaftLogStorage as _;
    let mut store = log_store.clone();
    let Some(vote) = store.read_vote().await.context("read the stored vote")? else {
        return Ok(());
    };
    if vote.is_committed() && vote.leader_id().voted_for() == Some(node_id) {
        let term = vote.leader_id().get_term();
        store
            .save_vote(&openraft::Vote::new(term, node_id))
            .await
            .context("save the vote")?;
        info!(
            term,
            "this node led term {term} before it stopped: it leads again only after an election, in a new term"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_gets_its_share_and_loopback_is_not_capped() {
        let t = Arc::new(PerIp::default());
        let ip: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        let held: Vec<_> = (0..MAX_CONNECTIONS_PER_IP)
            .map(|_| t.try_acquire(ip).expect("within the cap"))
            .collect();
        assert!(t.try_acquire(ip).is_none());
        assert!(t.try_acquire("10.0.0.8".parse().unwrap()).is_some());
        drop(held);
        assert!(t.try_acquire(ip).is_some());
        let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let many: Vec<_> = (0..MAX_CONNECTIONS_PER_IP + 10)
            .map(|_| t.try_acquire(lo))
            .collect();
        assert!(many.iter().all(Option::is_some));
    }
}
