//! The swarm worker: connects to the coordinator over mutual-TLS QUIC and runs the
//! attempts it is assigned with local agents.
//!
//! * [`agents`]: the built-in agents and the agents file.
//! * [`executor`]: runs one attempt (process groups, timeouts, cancellation, limits).
//! * [`run_worker`] / [`Worker`]: the runtime — connect, `Hello`, `Welcome`, run what the
//!   coordinator assigns, report, reconnect.
//!
//! # Runtime behaviour
//!
//! * Dials with 0-RTT when a resumable session exists; the first message is
//!   [`WorkerMsg::Hello`](swarm_proto::worker::WorkerMsg::Hello), listing the attempts
//!   the worker still holds. After `Welcome`, every report not yet acked is re-sent.
//! * `Run` for an attempt that is running (or queued) is ignored; for an attempt that
//!   finished but is not acked, its report is re-sent. An attempt never starts twice.
//! * At most `slots` attempts run at once, and at most an agent's `max_concurrency` of
//!   that agent. If the coordinator assigns more, the extra attempts are queued locally
//!   and start as slots free up, in arrival order, except that an attempt whose agent is
//!   at its `max_concurrency` waits without holding up later attempts of other agents;
//!   they are listed as running in `Hello` and heartbeats, since the worker has accepted
//!   them.
//!   A `Cancel` of a queued attempt reports it `Cancelled` at once.
//! * Attempts keep running while the connection is down; reconnects use exponential
//!   backoff with jitter (see [`Backoff`]), reset by every `Welcome`.
//! * All frames are written by one task per connection, which sends whatever is queued
//!   as one batch per stream write.
//! * A malformed frame from the coordinator drops the connection (then reconnects). A
//!   `Rejected` whose code mentions `protocol` (or is `version`), or a `Welcome` with
//!   another protocol version, stops the worker with an error; other rejections are
//!   retried.
//! * **Drain** ([`Worker::run_with_drain`], what `swarm worker` does on SIGTERM or
//!   Ctrl-C): the worker sends [`WorkerMsg::Draining`](swarm_proto::worker::WorkerMsg::Draining)
//!   (again first on every later session) and takes no new work: the coordinator places
//!   nothing more on it, a `Run` that still arrives and every attempt queued locally are
//!   handed back at once (reported `Failed` with `FailureKind::Drained`, which requeues
//!   the task at once and does not count against its `max_attempts`), and it steals from
//!   no mesh peer. Running attempts go on to their end and are reported as usual;
//!   reconnects continue. The worker leaves once the coordinator acknowledged the drain
//!   on the current session (`DrainAck`: no `Run` follows it), nothing runs and every
//!   report is acknowledged. At the drain timeout the attempts still running are killed
//!   (process groups included) and reported `Drained`; the worker waits up to
//!   [`DRAIN_REPORT_GRACE`] for those reports to be acknowledged, then leaves.
//! * **Remote drain** (protocol 7): `CoordinatorMsg::Drain { on: true }` (an operator's
//!   `POST /v1/workers/{id}/drain`) makes the worker take no new work exactly as a drain
//!   does (nothing starts; what waits and every `Run` or stolen attempt that still
//!   arrives is handed back `Drained`; no steals), and it says so with
//!   `WorkerMsg::Drain { on: true }`, again first on every later session so that a new
//!   leader learns it. But it does not leave: running attempts go on to their end and are
//!   reported as usual, with no drain timeout, and the worker stays connected.
//!   `Drain { on: false }` (`.../resume`) takes work again, answered with
//!   `WorkerMsg::Drain { on: false }`. A stop wins: once the worker drains to stop, a
//!   resume is ignored (it says `Draining` again). The remote drain is kept in memory only:
//!   a restarted worker starts undrained. [`WorkerStats::remote_drain`] shows it.
//! * **Live output** (protocol 6): each attempt of an `exec`, `http` or `llm` agent keeps
//!   the tail of its output, every stream in one byte sequence numbered from 0
//!   ([`WorkerConfig::log_tail_bytes`], default [`DEFAULT_LOG_TAIL_BYTES`]), and reports
//!   it with its end (`TaskReport::log`; an `llm` attempt also reports the tokens it used,
//!   `TaskReport::usage`). `CoordinatorMsg::Watch { on: true, from }` for an attempt
//!   running here is answered with what the tail holds from `from` on, then with every
//!   new piece as it is produced, as `WorkerMsg::Output` chunks of at most
//!   [`MAX_CHUNK_BYTES`], in offset order, until `on: false`, the attempt's end, or the
//!   session's end (a new session starts unwatched). A `Watch` for an attempt not running
//!   here is ignored. The agent never waits for the coordinator: at most
//!   [`MAX_QUEUED_OUTPUT_BYTES`] of output wait for the connection's writer, and a chunk
//!   beyond that is dropped ([`WorkerStats::output_dropped_bytes`]); the next one's offset
//!   shows the gap.
//! * A stop without a drain ([`Worker::run`]'s shutdown, or a second signal during a
//!   drain) kills running attempts (process groups included) without reporting them: the
//!   coordinator sees the worker leave and reschedules them after its lease.
//!
//! # Mesh peers and work stealing
//!
//! With a peer listener ([`WorkerConfig::peer_listen`] / [`WorkerParams::peer_listen`])
//! the worker takes part in mesh swarms. It binds a QUIC endpoint (ALPN
//! [`swarm_proto::ALPN_PEER`], mutual TLS; only peers with a *worker* certificate of the
//! cluster CA are accepted, and a dialed peer must present one too) and advertises its
//! address in `Hello::peer_addr` (the bound address, or `peer_advertise`).
//!
//! * `CoordinatorMsg::Peers { swarm, peers }` sets the peers of one swarm (an empty list
//!   drops them); the worker links to the union over all swarms. Exactly one link exists
//!   per pair: the worker with the smaller id dials (with `peer_server_name`, default
//!   `localhost`, as the certificate name), the other accepts.
//! * Each link exchanges `Hello`s (protocol version checked), then gossips the load
//!   (`running`, `queued`, `slots`) on change and at least every 250 ms. Keep-alive
//!   300 ms, idle timeout 1.5 s.
//! * A worker connected to the coordinator with a free slot and an empty local queue
//!   steals from the peer with the largest excess
//!   ([`swarm_topology::steal_decision`]): at most one `Steal` is outstanding. The victim
//!   hands over queued attempts only (newest first; never a running one, never one whose
//!   patterns are being retrieved) in a `Given`; they stop being listed in its `Hello`
//!   and heartbeats once the frame is written, and go back into its queue if it cannot
//!   be. The thief sends `WorkerMsg::Stole { attempt, from }` for each (held until the
//!   next session if the coordinator connection dropped meanwhile; always before the
//!   attempt's report) and runs it like a `Run`. If the coordinator refuses the move
//!   with `Cancel`, the attempt is stopped and reported cancelled, whatever it did.
//! * A link that goes down is reported once with `WorkerMsg::PeerLost` (as is a peer
//!   that cannot be dialed three times in a row); the dialing side redials with backoff
//!   while the peer is listed. A malformed frame closes the link with an error.
//! * [`WorkerStats`] counts `steals_in`, `steals_out`, `peers_connected` and
//!   `peers_lost`.
//!
//! # Hierarchical swarms: leads and members
//!
//! In a hierarchical swarm a *lead* relays the sessions of its *members*, so the
//! coordinator holds one QUIC connection per lead instead of one per worker. The lead
//! never parses a relayed frame: it pipes bytes.
//!
//! **Member.** `CoordinatorMsg::Parent { lead }` is handled by the connection loop (the
//! core never sees it):
//!
//! * `Some(lead)` naming another route than the current session's: the lead becomes the
//!   route, the current connection is closed at once (nothing is lost: running
//!   attempts, unacked reports and pending `Stole`s live in the core and are listed or
//!   re-sent on the next session), and the worker dials `lead.addr` with ALPN
//!   [`swarm_proto::ALPN_RELAY`] (its own worker certificate; the lead's certificate
//!   must be valid for `peer_server_name`, default `localhost`; a session cache makes
//!   redials 0-RTT), then runs the normal session over it: `Hello`, `Welcome`, ... The
//!   relay client configuration is [`WorkerParams::relay_client_config`], else built
//!   from `peer_identity`; a worker with neither ignores `Parent`.
//! * `Some(lead)` equal to the current route: nothing. `None` while routed through a
//!   lead: back to the coordinator directly, at once. A `Parent` naming this worker
//!   itself, or an address that is not `HOST:PORT`, is ignored.
//! * If dialing the lead fails, or a session through it ends for any reason (the lead
//!   died or lost its coordinator connection, a malformed frame, a `NotLeader`, ...;
//!   a fatal rejection still stops the worker), the route is cleared and the worker goes back to its coordinator list after the usual
//!   reconnect backoff (a `NotLeader` redirects to the leader it names, directly, as
//!   for a direct session). The coordinator sends `Parent` again when appropriate. For
//!   a while after such a failure (a backoff of its own, reset only by a session through
//!   a lead that lasted 10 s), a new `Parent` is held back and taken when that backoff
//!   ends, so a broken lead is not redialed in a tight loop.
//! * [`WorkerStats::via_lead`] is the lead of the current session (`None`: direct, or
//!   no session).
//!
//! **Lead.** A worker with a peer listener is also a relay: the listener negotiates
//! either [`swarm_proto::ALPN_PEER`] (mesh links) or [`swarm_proto::ALPN_RELAY`] and
//! dispatches on it. A relay connection must present a *worker* certificate (else it is
//! closed with `0x5701`). It is bound to the worker's current *direct* coordinator
//! connection (published once a session is welcomed, withdrawn when it ends; a worker
//! that is itself routed through a lead relays nothing): without one, the member's
//! connection is closed at once with [`RELAY_CLOSE_NO_COORDINATOR`] and the reason
//! "the lead has no coordinator connection", and the member falls back to the
//! coordinator. Each bidirectional stream the member opens is piped onto a new
//! bidirectional stream of that coordinator connection, both ways: a finish is passed
//! on as a finish, a reset or failure as a reset ([`RELAY_STREAM_ABORTED`]), and a
//! stopped receiver stops the other side. When the coordinator connection ends (or the
//! lead shuts down), every relay connection bound to it is closed with the same code,
//! which ends every relayed stream; the members then reconnect on their own.
//! [`WorkerStats::relayed_sessions`] counts relayed streams open now,
//! [`WorkerStats::relayed_total`] all so far.

#![warn(missing_docs)]

pub mod agent_kinds;
pub mod agents;
pub mod cancel;
mod connection;
mod core;
pub mod executor;
mod output;
mod peer;
mod relay;
mod retrieve;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use swarm_proto::worker::Hello;
use swarm_proto::{ALPN_RELAY, ALPN_WORKER, PROTOCOL_VERSION};
pub use swarm_transport::tls::Identity;
use swarm_transport::tls::{client_config, Role};
use tokio::sync::{mpsc, oneshot, watch};

pub use crate::core::{set_clock, ExecutionEvent, ExecutionJournal};
pub use agent_kinds::LlmUsage;
pub use agents::{Agent, Agents, AgentsError, ExecSpec, HttpSpec, LlmSpec, Secret};
pub use cancel::{cancel_pair, CancelHandle, CancelToken};
pub use executor::Executor;
pub use output::{
    DEFAULT_LOG_TAIL_BYTES, MAX_CHUNK_BYTES, MAX_LOG_TAIL_BYTES, MAX_QUEUED_OUTPUT_BYTES,
};
pub use relay::{RELAY_CLOSE_NO_COORDINATOR, RELAY_STREAM_ABORTED};

use connection::{ConnLoop, Dest, RelayClient, Shared, Target, CLOSE_SHUTDOWN};

/// Ping the coordinator this often when nothing else is sent.
const KEEP_ALIVE: Duration = Duration::from_millis(300);
/// A coordinator silent this long is gone: the worker moves on to another one. Together
/// with the Raft election timeout this bounds how long a leader's death stalls dispatch.
const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a draining worker waits, after its drain timeout, for the reports of the
/// attempts it cut short to be acknowledged. A deployment's grace period (Kubernetes
/// `terminationGracePeriodSeconds`, Compose `stop_grace_period`) must exceed the drain
/// timeout by more than this.
pub const DRAIN_REPORT_GRACE: Duration = Duration::from_secs(2);

/// Configuration of a worker process, as given on the command line.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinators' QUIC addresses, `HOST:PORT` (resolved again on every dial). The
    /// worker connects to one; a follower redirects it to the Raft leader, and a failed
    /// connection moves it on to the next address.
    pub coordinators: Vec<String>,
    /// Name the coordinators' certificates must be valid for; defaults to each `HOST`.
    pub server_name: Option<String>,
    /// Directory holding the cluster CA and the worker certificate and key.
    pub certs_dir: PathBuf,
    /// Stable name of this worker.
    pub worker_id: String,
    /// How many attempts run at once (at least 1).
    pub slots: u32,
    /// Labels tasks may require.
    pub labels: BTreeMap<String, String>,
    /// Agents file (see [`agents`]); without one only the built-ins are offered.
    pub agents_file: Option<PathBuf>,
    /// Where to accept mesh peer links (e.g. `127.0.0.1:0`; port 0 picks one). `None`:
    /// the worker takes no part in mesh swarms.
    pub peer_listen: Option<SocketAddr>,
    /// `HOST:PORT` peers should dial, advertised instead of the bound address (behind
    /// NAT or in containers). Required when `peer_listen` is an unspecified address.
    pub peer_advertise: Option<String>,
    /// Name peers' certificates must be valid for when dialing them; default
    /// `localhost`.
    pub peer_server_name: Option<String>,
    /// How long a drain lets running attempts finish before it cuts them short (see
    /// [`Worker::run_with_drain`]).
    pub drain_timeout: Duration,
    /// How many of the last bytes of each attempt's output the worker keeps, for the
    /// attempt's report and for a watcher joining late (see the crate docs, *Live
    /// output*); [`DEFAULT_LOG_TAIL_BYTES`] by default, 0: none, at most
    /// [`MAX_LOG_TAIL_BYTES`].
    pub log_tail_bytes: usize,
}

/// Reconnect backoff: delays double from `initial` up to `max`, each one jittered down
/// by up to half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay after a failure.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    /// 50 ms, doubling up to 5 s.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

/// Everything a [`Worker`] needs, already loaded and resolved: lets tests and an
/// in-process cluster start many workers without touching the disk or DNS.
#[derive(Debug)]
pub struct WorkerParams {
    /// Stable name of this worker.
    pub worker_id: String,
    /// How many attempts run at once (at least 1).
    pub slots: u32,
    /// Labels tasks may require.
    pub labels: BTreeMap<String, String>,
    /// The agents offered.
    pub agents: Agents,
    /// TLS/QUIC client configuration (see [`swarm_transport::tls::client_config`]). Its
    /// session cache is what makes reconnects 0-RTT.
    pub client_config: quinn::ClientConfig,
    /// The coordinator's address.
    pub coordinator: SocketAddr,
    /// Name the coordinator's certificate must be valid for.
    pub server_name: String,
    /// More coordinators of the same cluster (address, certificate name), tried in turn
    /// after `coordinator`.
    pub more_coordinators: Vec<(SocketAddr, String)>,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// The QUIC endpoint to dial from (e.g. one over a simulated network); `None` binds a
    /// UDP socket on the first dial.
    pub endpoint: Option<quinn::Endpoint>,
    /// Seed of the reconnect jitter, for replayable runs; `None` draws it from the OS.
    pub jitter_seed: Option<u64>,
    /// Where to accept mesh peer links (port 0 picks one); `None`: no mesh. Needs
    /// `peer_identity`.
    pub peer_listen: Option<SocketAddr>,
    /// `HOST:PORT` advertised to peers instead of the bound address.
    pub peer_advertise: Option<String>,
    /// Name peers' certificates must be valid for; `None`: `localhost`.
    pub peer_server_name: Option<String>,
    /// The worker's credentials for peer links (a worker certificate); required with
    /// `peer_listen`.
    pub peer_identity: Option<Identity>,
    /// Client configuration for reaching a lead's relay listener (ALPN
    /// [`swarm_proto::ALPN_RELAY`], the worker's certificate; see
    /// [`swarm_transport::tls::client_config`]). `None`: built from `peer_identity` when
    /// that is given; without either, `Parent` is ignored and the worker always connects
    /// to the coordinator directly.
    pub relay_client_config: Option<quinn::ClientConfig>,
    /// Told of every execution held, started, ended or let go here (see
    /// [`ExecutionEvent`]); `None`: nothing is told.
    pub journal: Option<ExecutionJournal>,
    /// The worker's own credentials (its worker certificate): a session relayed by a lead
    /// proves with them who this worker is. `None`: `peer_identity` is used.
    pub identity: Option<Identity>,
    /// How many of the last bytes of each attempt's output are kept (see
    /// [`WorkerConfig::log_tail_bytes`]).
    pub log_tail_bytes: usize,
}

impl WorkerParams {
    /// Parameters with one slot, no labels, the built-in agents and the default backoff.
    pub fn new(
        worker_id: impl Into<String>,
        client_config: quinn::ClientConfig,
        coordinator: SocketAddr,
        server_name: impl Into<String>,
    ) -> Self {
        WorkerParams {
            worker_id: worker_id.into(),
            slots: 1,
            labels: BTreeMap::new(),
            agents: Agents::builtin(),
            client_config,
            coordinator,
            server_name: server_name.into(),
            more_coordinators: Vec::new(),
            backoff: Backoff::default(),
            endpoint: None,
            jitter_seed: None,
            peer_listen: None,
            peer_advertise: None,
            peer_server_name: None,
            peer_identity: None,
            relay_client_config: None,
            journal: None,
            identity: None,
            log_tail_bytes: DEFAULT_LOG_TAIL_BYTES,
        }
    }
}

/// What a running worker is doing, for tests and status displays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Whether a session is up (a `Welcome` was received and the connection still works).
    pub connected: bool,
    /// Sessions established (Welcome received) so far.
    pub connects: u64,
    /// How many of those had their `Hello` accepted as 0-RTT early data.
    pub zero_rtt_accepted: u64,
    /// Attempts started.
    pub started: u64,
    /// Attempts finished (reports produced).
    pub finished: u64,
    /// Reports acked by the coordinator.
    pub acked: u64,
    /// Attempts running now.
    pub running: usize,
    /// Attempts waiting for a slot.
    pub queued: usize,
    /// Reports not yet acked.
    pub unacked: usize,
    /// Why the last session ended or the last dial failed; cleared by a `Welcome`.
    pub last_error: Option<String>,
    /// The advertised peer listener address (`HOST:PORT`), once bound.
    pub peer_addr: Option<String>,
    /// Mesh peer links up now.
    pub peers_connected: usize,
    /// Peer losses reported to the coordinator.
    pub peers_lost: u64,
    /// Attempts taken over from peers.
    pub steals_in: u64,
    /// Attempts handed over to peers.
    pub steals_out: u64,
    /// Whether the worker is draining: it takes no new work and stops once what it runs
    /// is finished and reported (see [`Worker::run_with_drain`]).
    pub draining: bool,
    /// Whether an operator drained the worker remotely (protocol 7): it takes no new
    /// work, like a draining worker, but stays until resumed (see the crate docs).
    pub remote_drain: bool,
    /// Attempts handed back to the coordinator by a drain: never started here, or cut
    /// short at the drain timeout.
    pub handed_back: u64,
    /// `Run`s refused because a newer leader had already welcomed this worker.
    pub stale_runs_refused: u64,
    /// The lead (worker id) the current session goes through; `None` when the session
    /// is direct or down.
    pub via_lead: Option<String>,
    /// Members' sessions this worker relays to the coordinator now, as their lead.
    pub relayed_sessions: usize,
    /// Members' sessions relayed so far.
    pub relayed_total: u64,
    /// Bytes of watched output dropped instead of sent, because the session's queue
    /// toward the coordinator held [`MAX_QUEUED_OUTPUT_BYTES`] already (published with
    /// the worker's next event or heartbeat).
    pub output_dropped_bytes: u64,
}

/// A worker, ready to [`run`](Worker::run).
#[derive(Debug)]
pub struct Worker {
    worker_id: String,
    slots: u32,
    labels: BTreeMap<String, String>,
    agents: Agents,
    client_config: quinn::ClientConfig,
    targets: Vec<Dest>,
    backoff: Backoff,
    endpoint: Option<quinn::Endpoint>,
    jitter_seed: Option<u64>,
    peer: Option<peer::PeerSetup>,
    relay: Option<RelayClient>,
    /// The worker's identity, whose deny list is kept equal to the cluster's (protocol 5).
    identity: Option<swarm_transport::Identity>,
    stats: watch::Sender<WorkerStats>,
    journal: Option<ExecutionJournal>,
    log_tail_bytes: usize,
}

impl Worker {
    /// A worker from already-loaded parameters. Fails if `slots` is 0 or the id is empty.
    pub fn new(params: WorkerParams) -> anyhow::Result<Self> {
        Self::build(params, None)
    }

    fn build(mut p: WorkerParams, hosts: Option<Vec<Dest>>) -> anyhow::Result<Self> {
        if p.slots == 0 {
            bail!("a worker needs at least one slot");
        }
        if p.worker_id.trim().is_empty() {
            bail!("the worker id must not be empty");
        }
        swarm_transport::set_liveness(&mut p.client_config, KEEP_ALIVE, IDLE_TIMEOUT);
        let relay_client = match (p.relay_client_config.take(), &p.peer_identity) {
            (Some(c), _) => Some(c),
            (None, Some(id)) if id.role() == Role::Worker => {
                Some(client_config(id, ALPN_RELAY, Role::Worker)?)
            }
            (None, _) => None,
        };
        let relay = relay_client.map(|mut client| {
            swarm_transport::set_liveness(&mut client, KEEP_ALIVE, IDLE_TIMEOUT);
            RelayClient {
                client,
                identity: p.identity.clone().or_else(|| p.peer_identity.clone()),
                server_name: p
                    .peer_server_name
                    .clone()
                    .unwrap_or_else(|| "localhost".into()),
            }
        });
        let identity = p.identity.clone().or_else(|| p.peer_identity.clone());
        let peer = match (p.peer_listen, p.peer_identity) {
            (None, _) => None,
            (Some(_), None) => bail!("a peer listener needs the worker's identity"),
            (Some(listen), Some(identity)) => {
                if identity.role() != Role::Worker {
                    bail!(
                        "peer links need a worker certificate, not a {} one",
                        identity.role()
                    );
                }
                if let Some(a) = &p.peer_advertise {
                    split_host_port(a).context("invalid peer advertise address")?;
                }
                Some(peer::PeerSetup {
                    worker_id: p.worker_id.clone(),
                    listen,
                    advertise: p.peer_advertise,
                    server_name: p.peer_server_name.unwrap_or_else(|| "localhost".into()),
                    identity,
                    backoff: p.backoff,
                })
            }
        };
        Ok(Worker {
            journal: p.journal,
            log_tail_bytes: p.log_tail_bytes,
            worker_id: p.worker_id,
            slots: p.slots,
            labels: p.labels,
            agents: p.agents,
            client_config: p.client_config,
            targets: hosts.unwrap_or_else(|| {
                std::iter::once((p.coordinator, p.server_name))
                    .chain(p.more_coordinators)
                    .map(|(addr, server_name)| Dest {
                        label: addr.to_string(),
                        target: Target::Addr(addr),
                        server_name,
                    })
                    .collect()
            }),
            backoff: p.backoff,
            endpoint: p.endpoint,
            jitter_seed: p.jitter_seed,
            peer,
            relay,
            identity,
            stats: watch::Sender::new(WorkerStats::default()),
        })
    }

    /// A live view of the worker's [`WorkerStats`].
    pub fn stats(&self) -> watch::Receiver<WorkerStats> {
        self.stats.subscribe()
    }

    /// Runs until `shutdown` completes (then returns `Ok`) or a fatal error: the
    /// coordinator speaks another protocol version. Connection failures are retried
    /// forever. Running attempts are killed, unreported, before this returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.run_with_drain(std::future::pending(), Duration::ZERO, shutdown)
            .await
    }

    /// Like [`Worker::run`], and when `drain` completes the worker drains (see the crate
    /// docs): it takes no new work, hands back what it has not started, lets running
    /// attempts finish for up to `drain_timeout` (then kills and hands back the rest),
    /// and returns `Ok` once the coordinator has acknowledged the drain and every report.
    /// `stop` completing, before or during the drain, stops at once as [`Worker::run`]
    /// does.
    pub async fn run_with_drain(
        self,
        drain: impl Future<Output = ()>,
        drain_timeout: Duration,
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Worker {
            worker_id,
            slots,
            labels,
            agents,
            client_config,
            targets,
            backoff,
            endpoint,
            jitter_seed,
            peer,
            relay,
            identity,
            stats,
            journal,
            log_tail_bytes,
        } = self;
        let agent_names = agents.names();
        let (core_tx, core_rx) = mpsc::unbounded_channel();
        let mut core = core::Core::new(Executor::new(agents), slots, stats.clone());
        core.set_journal(journal);
        core.set_log_tail_bytes(log_tail_bytes);
        // The current direct coordinator connection, for relaying members' sessions.
        let coordinator = watch::Sender::new(None);
        let peers = match peer {
            Some(setup) => {
                let service = peer::PeerService::start(
                    setup,
                    core_tx.clone(),
                    core.load(),
                    stats.clone(),
                    coordinator.subscribe(),
                )?;
                core.set_peer_ctl(service.ctl());
                Some(service)
            }
            None => None,
        };
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            worker_id: worker_id.clone(),
            slots,
            labels,
            agents: agent_names,
            running: Vec::new(),
            peer_addr: peers.as_ref().map(|p| p.advertised.clone()),
        };
        tracing::info!(worker_id = %worker_id, slots, agents = ?hello.agents, "worker starting");
        let mut drained = core.drained();
        let core_task = tokio::spawn(core.run(core_rx));
        let shared = Arc::new(Shared {
            conn: Mutex::new(None),
            endpoint: Mutex::new(endpoint),
            coordinator,
        });
        let conn_loop = ConnLoop {
            client: client_config,
            targets: Mutex::new(targets),
            current: AtomicUsize::new(0),
            hello,
            backoff,
            jitter_seed,
            stats: stats.clone(),
            core: core_tx.clone(),
            shared: shared.clone(),
            relay,
            identity,
        };

        let conn = conn_loop.run();
        tokio::pin!(conn, drain, stop);
        let result = tokio::select! {
            r = &mut conn => r,
            () = &mut stop => {
                tracing::info!(worker_id = %worker_id, "worker shutting down");
                Ok(())
            }
            () = &mut drain => {
                tracing::info!(
                    worker_id = %worker_id,
                    drain_timeout = ?drain_timeout,
                    "worker draining"
                );
                let _ = core_tx.send(core::Command::Drain);
                let deadline = tokio::time::Instant::now() + drain_timeout;
                let done = tokio::select! {
                    r = &mut conn => Some(r),
                    () = &mut stop => {
                        tracing::info!(worker_id = %worker_id, "stopping at once during the drain");
                        Some(Ok(()))
                    }
                    r = drained.wait_for(|d| *d) => {
                        if r.is_ok() {
                            tracing::info!(worker_id = %worker_id, "drained: every attempt finished and every report acknowledged");
                        }
                        Some(Ok(()))
                    }
                    () = tokio::time::sleep_until(deadline) => None,
                };
                match done {
                    Some(r) => r,
                    None => {
                        let _ = core_tx.send(core::Command::CutShort);
                        tokio::select! {
                            r = &mut conn => r,
                            () = &mut stop => Ok(()),
                            r = drained.wait_for(|d| *d) => {
                                if r.is_ok() {
                                    tracing::info!(worker_id = %worker_id, "drained: the attempts cut short were handed back");
                                }
                                Ok(())
                            }
                            () = tokio::time::sleep(DRAIN_REPORT_GRACE) => {
                                tracing::warn!(
                                    worker_id = %worker_id,
                                    "leaving before the drain was acknowledged: the coordinator gives up what it still counts on this worker after its lease"
                                );
                                Ok(())
                            }
                        }
                    }
                }
            }
        };

        // Members relayed through this worker go to the coordinator directly from now on.
        shared.coordinator.send_replace(None);
        let conn = shared.conn.lock().ok().and_then(|mut c| c.take());
        if let Some(conn) = conn {
            conn.close(
                quinn::VarInt::from_u32(CLOSE_SHUTDOWN),
                b"worker shutting down",
            );
        }
        stats.send_modify(|s| {
            s.connected = false;
            s.via_lead = None;
        });
        if let Some(peers) = peers {
            // Before the core stops: no steal may start or finish half-way after it.
            peers.shutdown().await;
        }
        let (tx, rx) = oneshot::channel();
        if core_tx.send(core::Command::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        drop(core_tx);
        if let Err(e) = core_task.await {
            tracing::error!("worker core task failed: {e}");
        }
        let endpoint = shared.endpoint.lock().ok().and_then(|mut e| e.take());
        if let Some(endpoint) = endpoint {
            // Give the close frame a chance to reach the coordinator.
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        if let Err(e) = &result {
            tracing::error!(worker_id = %worker_id, "worker stopped: {e:#}");
        }
        result
    }
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6 literals) into host (without brackets) and port.
pub fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let bad = || format!("invalid coordinator address {addr:?}: expected HOST:PORT");
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").with_context(bad)?;
        (h, p)
    } else {
        addr.rsplit_once(':').with_context(bad)?
    };
    if host.is_empty() || (host.contains(':') && !addr.starts_with('[')) {
        bail!("{}", bad());
    }
    let port = port.parse::<u16>().with_context(bad)?;
    Ok((host.to_owned(), port))
}

/// Loads certificates and agents per `cfg` and runs a worker that drains when `drain`
/// completes (for up to `cfg.drain_timeout`) and stops at once when `stop` does, or
/// until a fatal error occurs (see [`Worker::run_with_drain`]).
pub async fn run_worker(
    cfg: WorkerConfig,
    drain: impl Future<Output = ()>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if cfg.coordinators.is_empty() {
        bail!("no coordinator address given");
    }
    let targets = cfg
        .coordinators
        .iter()
        .map(|c| Dest::host(c, cfg.server_name.as_deref()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let identity = Identity::load(&cfg.certs_dir, Role::Worker).with_context(|| {
        format!(
            "loading worker certificate from {}",
            cfg.certs_dir.display()
        )
    })?;
    let client = client_config(&identity, ALPN_WORKER, Role::Coordinator)?;
    let agents = match &cfg.agents_file {
        Some(path) => Agents::load(path)?,
        None => Agents::builtin(),
    };
    let params = WorkerParams {
        worker_id: cfg.worker_id,
        slots: cfg.slots,
        labels: cfg.labels,
        agents,
        client_config: client,
        // Unused: the hosts are resolved before every dial.
        coordinator: SocketAddr::from(([0, 0, 0, 0], 0)),
        server_name: String::new(),
        more_coordinators: Vec::new(),
        backoff: Backoff::default(),
        endpoint: None,
        jitter_seed: None,
        peer_listen: cfg.peer_listen,
        peer_advertise: cfg.peer_advertise,
        peer_server_name: cfg.peer_server_name,
        peer_identity: cfg.peer_listen.map(|_| identity.clone()),
        relay_client_config: Some(client_config(&identity, ALPN_RELAY, Role::Worker)?),
        journal: None,
        identity: Some(identity.clone()),
        log_tail_bytes: cfg.log_tail_bytes,
    };
    // A renewed certificate (`swarm certs renew`) is presented from the next handshake.
    let reload = identity.spawn_reload(Duration::from_secs(10));
    let result = Worker::build(params, Some(targets))?
        .run_with_drain(drain, cfg.drain_timeout, stop)
        .await;
    reload.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("localhost:7000").unwrap(),
            ("localhost".into(), 7000)
        );
        assert_eq!(
            split_host_port("10.0.0.1:1").unwrap(),
            ("10.0.0.1".into(), 1)
        );
        assert_eq!(split_host_port("[::1]:7000").unwrap(), ("::1".into(), 7000));
        for bad in [
            "localhost",
            ":7000",
            "host:port",
            "::1:7000",
            "[::1]",
            "h:70000",
        ] {
            let err = split_host_port(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
