//! Mesh peer links and work stealing between workers.
//!
//! A worker with a peer listener takes part in mesh swarms: the coordinator names its
//! peers (`CoordinatorMsg::Peers`, one list per swarm), and the worker keeps one QUIC
//! link to each of them (mutual TLS, worker certificates on both ends, ALPN
//! [`ALPN_PEER`]).
//!
//! * **One link per pair.** The worker with the smaller id dials; the other accepts. An
//!   incoming link from an unlisted worker, or from one with a larger id, is refused. A
//!   new incoming link from a listed peer replaces the old one (the peer restarted).
//! * **Handshake.** The dialer sends `Hello` first (possibly as 0-RTT early data: it is
//!   idempotent), the acceptor answers with its own `Hello` once the dialer's
//!   certificate is verified and has the worker role. The dialer checks the acceptor's
//!   role and that it is the worker it meant to reach. Both sides check the protocol
//!   version.
//! * **Gossip.** Each side sends its load (`Load`) when it changes and at least every
//!   250 ms. QUIC keep-alives (300 ms) and a 1.5 s idle timeout detect a dead peer.
//! * **Stealing.** When this worker is connected to the coordinator, is not draining, has
//!   a free slot and nothing queued, it picks a victim among its linked peers with
//!   [`swarm_topology::steal_decision`] and sends `Steal`; one steal is outstanding at a
//!   time (abandoned after 5 s or when the victim's link goes down). The victim takes up
//!   to `max` attempts from its local queue (newest first; never a running attempt) and
//!   answers `Given`. Attempts leave the victim only if the `Given` frame was written;
//!   otherwise they go back into its queue. The thief announces each received attempt
//!   to the coordinator (`Stole`) and runs it like a `Run`. A `Given` that answers an
//!   abandoned request is still honoured: the victim already forgot those attempts.
//! * **Loss.** When a link that was up goes down (or the first three dials of a peer
//!   fail), the coordinator gets one `PeerLost`; the dialing side keeps redialling with
//!   exponential backoff while the peer is listed. A malformed frame closes the link with
//!   an error (application code 1) and counts as a loss.
//!
//! The same listener also accepts members' relay connections (ALPN
//! [`swarm_proto::ALPN_RELAY`]), served by [`crate::relay`].
//!
//! The module talks to the rest of the worker only through channels: [`Command`]s to the
//! core, [`LocalLoad`] from it, and [`Ctl`] from it (the coordinator's `Peers`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use swarm_proto::peer::PeerMsg;
use swarm_proto::worker::{AttemptRef, PeerInfo, TaskAssignment};
use swarm_proto::{
    peer_protocol_supported, ALPN_PEER, ALPN_RELAY, MIN_PEER_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use swarm_topology::{steal_decision, Member, StealPolicy};
use swarm_transport::endpoint::WRONG_ROLE_CODE;
use swarm_transport::tls::{client_config, require_role, server_config, Identity, Role};
use swarm_transport::{FrameError, FrameReader, FrameWriter};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::connection::Delay;
use crate::core::{Command, LocalLoad};
use crate::relay::{self, RelayCtx};
use crate::{Backoff, WorkerStats};

/// Keep-alive ping interval on peer links.
const KEEP_ALIVE: Duration = Duration::from_millis(300);
/// A peer silent this long is gone.
const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Load is sent at least this often (and whenever it changes).
const GOSSIP_INTERVAL: Duration = Duration::from_millis(250);
/// How long a dial plus `Hello` exchange, or an incoming handshake, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// An unanswered steal is abandoned after this long.
const STEAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed dials of a peer that has not been reached since it was listed (or lost)
/// before it is reported lost.
const LOST_AFTER_FAILED_DIALS: u32 = 3;
/// Most attempts asked for in one steal.
const MAX_STEAL_BATCH: u32 = 64;

/// QUIC application close codes on peer links.
pub(crate) const CLOSE_SHUTDOWN: u32 = 0;
/// The peer sent something unparseable or out of protocol.
pub(crate) const CLOSE_PROTOCOL_ERROR: u32 = 1;
/// The peer is not one this worker should link to (unlisted, or it should accept).
pub(crate) const CLOSE_NOT_PEER: u32 = 2;
/// The link is no longer wanted (the coordinator dropped the peer) or was replaced.
pub(crate) const CLOSE_DROPPED: u32 = 3;
/// The peer speaks another protocol version.
pub(crate) const CLOSE_VERSION: u32 = 4;

/// Instructions from the core: the coordinator's peer lists, and shutdown.
pub(crate) enum Ctl {
    /// The peers of mesh swarm `swarm` (replaces the earlier list; empty drops them).
    Peers { swarm: String, peers: Vec<PeerInfo> },
    /// Close every link, then reply.
    Shutdown(oneshot::Sender<()>),
}

/// How the peer listener is set up.
#[derive(Debug)]
pub(crate) struct PeerSetup {
    /// This worker's id.
    pub(crate) worker_id: String,
    /// Where to bind the listener (port 0: any).
    pub(crate) listen: SocketAddr,
    /// `HOST:PORT` to advertise instead of the bound address.
    pub(crate) advertise: Option<String>,
    /// Name peers' certificates must be valid for.
    pub(crate) server_name: String,
    /// The worker's credentials (role worker).
    pub(crate) identity: Identity,
    /// Redial backoff.
    pub(crate) backoff: Backoff,
}

/// The core's command channel, held weakly: the peer service must never keep the core
/// alive (the core holds the service's control channel; a strong sender would make a
/// cycle that outlives a dropped worker).
#[derive(Clone)]
struct CoreTx(mpsc::WeakUnboundedSender<Command>);

impl CoreTx {
    /// Sends `cmd`; `false` if the core is gone.
    fn send(&self, cmd: Command) -> bool {
        self.0.upgrade().is_some_and(|tx| tx.send(cmd).is_ok())
    }
}

/// A peer's load as it gossips it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerLoad {
    running: u32,
    queued: u32,
    slots: u32,
}

/// What link tasks and the listener tell the manager.
enum Event {
    /// A listed worker dialed in and passed the handshake checks.
    Inbound {
        peer: String,
        conn: quinn::Connection,
        writer: FrameWriter,
        reader: FrameReader,
    },
    /// Link `gen` to `peer` completed its `Hello` exchange.
    Up {
        peer: String,
        gen: u64,
        conn: quinn::Connection,
    },
    /// Link `gen` to `peer` ended (or never came up).
    Down {
        peer: String,
        gen: u64,
        error: String,
        was_up: bool,
    },
    /// `peer` gossiped its load.
    Load {
        peer: String,
        gen: u64,
        load: PeerLoad,
    },
    /// `peer` answered a steal.
    Given {
        peer: String,
        request_id: u64,
        assignments: Vec<TaskAssignment>,
    },
}

/// The running peer service: listener, links, stealing.
pub(crate) struct PeerService {
    /// The `HOST:PORT` advertised in `Hello::peer_addr`.
    pub(crate) advertised: String,
    ctl: mpsc::UnboundedSender<Ctl>,
    task: tokio::task::JoinHandle<()>,
    endpoint: quinn::Endpoint,
}

impl PeerService {
    /// Binds the listener and starts the service. `core` receives steals and losses;
    /// `local` is the core's load; `coordinator` is the worker's current direct
    /// coordinator connection, which relay connections (ALPN [`ALPN_RELAY`], see
    /// [`crate::relay`]) are piped into. Must be called within a tokio runtime.
    pub(crate) fn start(
        setup: PeerSetup,
        core: mpsc::UnboundedSender<Command>,
        local: watch::Receiver<LocalLoad>,
        stats: watch::Sender<WorkerStats>,
        coordinator: watch::Receiver<Option<quinn::Connection>>,
    ) -> anyhow::Result<PeerService> {
        if setup.identity.role() != Role::Worker {
            bail!("peer links need a worker certificate");
        }
        let mut server = server_config(&setup.identity, &[ALPN_PEER, ALPN_RELAY])?;
        swarm_transport::set_server_liveness(&mut server, KEEP_ALIVE, IDLE_TIMEOUT);
        let mut client = client_config(&setup.identity, ALPN_PEER, Role::Worker)?;
        swarm_transport::set_liveness(&mut client, KEEP_ALIVE, IDLE_TIMEOUT);
        let endpoint = swarm_transport::server_endpoint(setup.listen, server)
            .context("binding the peer listener")?;
        let local_addr = endpoint
            .local_addr()
            .context("reading the peer listener's address")?;
        let advertised = match setup.advertise {
            Some(a) => {
                crate::split_host_port(&a).context("invalid peer advertise address")?;
                a
            }
            None if local_addr.ip().is_unspecified() => bail!(
                "the peer listener is bound to {local_addr}, which peers cannot dial; \
                 give the address to advertise"
            ),
            None => local_addr.to_string(),
        };
        tracing::info!(listen = %local_addr, advertised = %advertised, "peer listener up");
        stats.send_modify(|s| s.peer_addr = Some(advertised.clone()));

        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let relay = RelayCtx {
            coordinator,
            stats: stats.clone(),
        };
        tokio::spawn(listen(
            endpoint.clone(),
            events_tx.clone(),
            relay,
            setup.identity.clone(),
        ));
        let manager = Manager {
            me: setup.worker_id,
            server_name: setup.server_name,
            client,
            identity: setup.identity.clone(),
            endpoint: endpoint.clone(),
            backoff: setup.backoff,
            core: CoreTx(core.downgrade()),
            local,
            stats,
            events: events_tx,
            swarms: BTreeMap::new(),
            peers: BTreeMap::new(),
            next_gen: 1,
            next_request: 1,
            outstanding: None,
        };
        let task = tokio::spawn(manager.run(ctl_rx, events_rx));
        Ok(PeerService {
            advertised,
            ctl: ctl_tx,
            task,
            endpoint,
        })
    }

    /// Where the core sends the coordinator's `Peers`.
    pub(crate) fn ctl(&self) -> mpsc::UnboundedSender<Ctl> {
        self.ctl.clone()
    }

    /// Closes every link and the listener.
    pub(crate) async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        if let Err(e) = self.task.await {
            tracing::error!("peer manager task failed: {e}");
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(CLOSE_SHUTDOWN),
            b"worker shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Accepts incoming connections until the endpoint closes: peer links (ALPN
/// [`ALPN_PEER`]) and members' relay connections (ALPN [`ALPN_RELAY`]).
///
/// A link or member whose certificate the cluster revokes, or that the CAs this worker
/// trusts no longer cover, is cut off at once.
async fn listen(
    endpoint: quinn::Endpoint,
    events: mpsc::UnboundedSender<Event>,
    relay: RelayCtx,
    identity: Identity,
) {
    while let Some(incoming) = endpoint.accept().await {
        let events = events.clone();
        let relay = relay.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let accepted = match swarm_transport::accept(incoming).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(%remote, "incoming connection failed: {e}");
                    return;
                }
            };
            tokio::spawn(swarm_transport::close_when_distrusted(
                accepted.conn.clone(),
                identity,
            ));
            let alpn = accepted
                .conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            match alpn.as_deref() {
                Some(p) if p == ALPN_RELAY => relay::serve(accepted, relay).await,
                Some(p) if p == ALPN_PEER => {
                    if let Err(e) = inbound_handshake(accepted, &events).await {
                        tracing::warn!(%remote, "refused a peer link: {e:#}");
                    }
                }
                _ => close(&accepted.conn, CLOSE_PROTOCOL_ERROR, "unknown ALPN"),
            }
        });
    }
}

fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(quinn::VarInt::from_u32(code), reason.as_bytes());
}

/// Authenticates an incoming link (worker role) and reads the dialer's `Hello`; the
/// manager then decides whether to keep it.
async fn inbound_handshake(
    mut accepted: swarm_transport::Accepted,
    events: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let conn = accepted.conn.clone();
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        // Closes the connection itself when the role is wrong.
        accepted
            .authenticate_as(Role::Worker)
            .await
            .context("authenticating")?;
        let (writer, mut reader) = accepted
            .accept_stream()
            .await
            .context("accepting the stream")?;
        let first = reader.recv::<PeerMsg>().await;
        anyhow::Ok((writer, reader, first))
    })
    .await;
    let (writer, reader, first) = match first {
        Err(_) => {
            close(&conn, CLOSE_PROTOCOL_ERROR, "no Hello in time");
            bail!("no Hello within {HANDSHAKE_TIMEOUT:?}");
        }
        Ok(Err(e)) => {
            close(&conn, CLOSE_PROTOCOL_ERROR, "handshake failed");
            return Err(e);
        }
        Ok(Ok(x)) => x,
    };
    let peer = hello_of(&conn, first, "the peer")?;
    events
        .send(Event::Inbound {
            peer,
            conn: conn.clone(),
            writer,
            reader,
        })
        .map_err(|_| {
            close(&conn, CLOSE_SHUTDOWN, "worker shutting down");
            anyhow!("worker shutting down")
        })
}

fn msg_name(m: &PeerMsg) -> &'static str {
    match m {
        PeerMsg::Hello { .. } => "Hello",
        PeerMsg::Load { .. } => "Load",
        PeerMsg::Steal { .. } => "Steal",
        PeerMsg::Given { .. } => "Given",
    }
}

/// Our side of the manager's bookkeeping for one link.
struct Link {
    gen: u64,
    /// Frames for the link task to send (`Steal`); dropping it closes the link.
    tx: mpsc::UnboundedSender<PeerMsg>,
    /// The connection, once known (acceptor: at once; dialer: when up).
    conn: Option<quinn::Connection>,
    up: bool,
    load: Option<PeerLoad>,
}

impl Link {
    fn close(&self, code: u32, reason: &str) {
        if let Some(conn) = &self.conn {
            close(conn, code, reason);
        }
    }
}

/// One listed peer.
struct Peer {
    addr: String,
    link: Option<Link>,
    /// Reported lost since it was last up (or listed).
    lost_reported: bool,
    /// Consecutive failed dials since it was last up.
    failures: u32,
    delay: Delay,
    /// When to dial next (dialing side, no link).
    retry_at: Option<Instant>,
}

struct Outstanding {
    victim: String,
    request_id: u64,
    deadline: Instant,
}

struct Manager {
    me: String,
    server_name: String,
    client: quinn::ClientConfig,
    /// This worker's identity: links to peers it revokes or no longer trusts are closed.
    identity: Identity,
    endpoint: quinn::Endpoint,
    backoff: Backoff,
    core: CoreTx,
    local: watch::Receiver<LocalLoad>,
    stats: watch::Sender<WorkerStats>,
    events: mpsc::UnboundedSender<Event>,
    /// The coordinator's lists, per swarm.
    swarms: BTreeMap<String, Vec<PeerInfo>>,
    /// The union of the lists, by worker id (never this worker).
    peers: BTreeMap<String, Peer>,
    next_gen: u64,
    next_request: u64,
    outstanding: Option<Outstanding>,
}

impl Manager {
    async fn run(
        mut self,
        mut ctl: mpsc::UnboundedReceiver<Ctl>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let done = loop {
            let wake = self.next_wake();
            tokio::select! {
                c = ctl.recv() => match c {
                    Some(Ctl::Peers { swarm, peers }) => self.set_peers(swarm, peers),
                    Some(Ctl::Shutdown(done)) => break Some(done),
                    // The core is gone (the worker was dropped): stop too.
                    None => break None,
                },
                Some(ev) = events.recv() => self.event(ev).await,
                r = self.local.changed() => {
                    if r.is_err() {
                        break None;
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
            self.dial_due();
            self.expire_steal();
            self.maybe_steal();
            self.publish();
        };
        self.close_all();
        // Ends the listener task too.
        self.endpoint.close(
            quinn::VarInt::from_u32(CLOSE_SHUTDOWN),
            b"worker shutting down",
        );
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + GOSSIP_INTERVAL;
        for p in self.peers.values() {
            if let Some(t) = p.retry_at {
                wake = wake.min(t);
            }
        }
        if let Some(o) = &self.outstanding {
            wake = wake.min(o.deadline);
        }
        wake
    }

    /// Whether this side dials `peer` (the smaller id dials).
    fn dials(&self, peer: &str) -> bool {
        self.me.as_str() < peer
    }

    fn set_peers(&mut self, swarm: String, peers: Vec<PeerInfo>) {
        if peers.is_empty() {
            self.swarms.remove(&swarm);
        } else {
            self.swarms.insert(swarm, peers);
        }
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        for info in self.swarms.values().flatten() {
            if info.worker_id != self.me && !info.worker_id.is_empty() {
                wanted.insert(info.worker_id.clone(), info.addr.clone());
            }
        }
        let gone: Vec<String> = self
            .peers
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(p) = self.peers.remove(&id) {
                tracing::info!(peer = %id, "peer no longer listed; dropping its link");
                if let Some(link) = p.link {
                    link.close(CLOSE_DROPPED, "no longer peers");
                }
                if self.outstanding.as_ref().is_some_and(|o| o.victim == id) {
                    self.outstanding = None;
                }
            }
        }
        for (id, addr) in wanted {
            let dials = self.dials(&id);
            match self.peers.get_mut(&id) {
                Some(p) => p.addr = addr,
                None => {
                    tracing::info!(peer = %id, %addr, dials, "new mesh peer");
                    self.peers.insert(
                        id,
                        Peer {
                            addr,
                            link: None,
                            lost_reported: false,
                            failures: 0,
                            delay: Delay::new(self.backoff, None),
                            retry_at: dials.then(Instant::now),
                        },
                    );
                }
            }
        }
    }

    fn new_gen(&mut self) -> u64 {
        let g = self.next_gen;
        self.next_gen += 1;
        g
    }

    fn ctx(&self, peer: &str, gen: u64) -> LinkCtx {
        LinkCtx {
            me: self.me.clone(),
            peer: peer.to_owned(),
            gen,
            core: self.core.clone(),
            local: self.local.clone(),
            events: self.events.clone(),
        }
    }

    /// Starts dials whose time has come.
    fn dial_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.link.is_none() && p.retry_at.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let gen = self.new_gen();
            let ctx = self.ctx(&id, gen);
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            p.retry_at = None;
            let (tx, rx) = mpsc::unbounded_channel();
            let start = Start::Dial {
                endpoint: self.endpoint.clone(),
                client: self.client.clone(),
                identity: self.identity.clone(),
                addr: p.addr.clone(),
                server_name: self.server_name.clone(),
            };
            tracing::debug!(peer = %id, addr = %p.addr, "dialing peer");
            tokio::spawn(link_task(ctx, start, rx));
            p.link = Some(Link {
                gen,
                tx,
                conn: None,
                up: false,
                load: None,
            });
        }
    }

    async fn event(&mut self, ev: Event) {
        match ev {
            Event::Inbound {
                peer,
                conn,
                writer,
                reader,
            } => self.inbound(peer, conn, writer, reader),
            Event::Up { peer, gen, conn } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    close(&conn, CLOSE_DROPPED, "no longer peers");
                    return;
                };
                match &mut p.link {
                    Some(link) if link.gen == gen => {
                        link.up = true;
                        link.conn = Some(conn);
                        p.lost_reported = false;
                        p.failures = 0;
                        p.delay.reset();
                        tracing::info!(peer = %peer, "peer link up");
                    }
                    _ => close(&conn, CLOSE_DROPPED, "link replaced"),
                }
            }
            Event::Down {
                peer,
                gen,
                error,
                was_up,
            } => self.down(&peer, gen, &error, was_up),
            Event::Load { peer, gen, load } => {
                if let Some(link) = self.peers.get_mut(&peer).and_then(|p| p.link.as_mut()) {
                    if link.gen == gen {
                        link.load = Some(load);
                    }
                }
            }
            Event::Given {
                peer,
                request_id,
                assignments,
            } => self.given(peer, request_id, assignments).await,
        }
    }

    fn inbound(
        &mut self,
        peer: String,
        conn: quinn::Connection,
        writer: FrameWriter,
        reader: FrameReader,
    ) {
        if !self.peers.contains_key(&peer) {
            close(&conn, CLOSE_NOT_PEER, "not a listed peer");
            tracing::warn!(peer = %peer, "refused a peer link from a worker that is not a listed peer");
            return;
        }
        if self.dials(&peer) {
            close(
                &conn,
                CLOSE_NOT_PEER,
                "the worker with the smaller id dials",
            );
            tracing::warn!(peer = %peer, "refused a peer link: this worker dials that peer");
            return;
        }
        let gen = self.new_gen();
        let ctx = self.ctx(&peer, gen);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(old) = p.link.take() {
            tracing::info!(peer = %peer, "peer dialed again; replacing its link");
            old.close(CLOSE_DROPPED, "link replaced");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let start = Start::Accept {
            conn: conn.clone(),
            writer,
            reader,
        };
        tokio::spawn(link_task(ctx, start, rx));
        p.link = Some(Link {
            gen,
            tx,
            conn: Some(conn),
            up: false,
            load: None,
        });
        if self.outstanding.as_ref().is_some_and(|o| o.victim == peer) {
            self.outstanding = None;
        }
    }

    fn down(&mut self, peer: &str, gen: u64, error: &str, was_up: bool) {
        let dials = self.dials(peer);
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.link.as_ref().map(|l| l.gen) != Some(gen) {
            return;
        }
        p.link = None;
        if was_up {
            p.failures = 0;
            tracing::warn!(peer = %peer, "peer link lost: {error}");
        } else {
            p.failures += 1;
            tracing::warn!(peer = %peer, failures = p.failures, "cannot link to peer: {error}");
        }
        let lost = was_up || (dials && p.failures >= LOST_AFTER_FAILED_DIALS);
        if lost && !p.lost_reported {
            p.lost_reported = true;
            self.core.send(Command::PeerLost {
                peer: peer.to_owned(),
            });
            self.stats.send_modify(|s| s.peers_lost += 1);
        }
        if dials {
            p.retry_at = Some(Instant::now() + p.delay.next());
        }
        if self.outstanding.as_ref().is_some_and(|o| o.victim == peer) {
            tracing::debug!(peer = %peer, "victim link lost during a steal");
            self.outstanding = None;
        }
    }

    async fn given(&mut self, peer: String, request_id: u64, assignments: Vec<TaskAssignment>) {
        let current = self
            .outstanding
            .as_ref()
            .is_some_and(|o| o.victim == peer && o.request_id == request_id);
        if current {
            self.outstanding = None;
        } else {
            tracing::debug!(peer = %peer, request_id, count = assignments.len(), "Given for an abandoned steal; the attempts are taken anyway");
        }
        if assignments.is_empty() {
            // Its gossip was stale: treat it as having nothing until it says otherwise.
            if let Some(link) = self.peers.get_mut(&peer).and_then(|p| p.link.as_mut()) {
                if let Some(l) = &mut link.load {
                    l.queued = 0;
                }
            }
            return;
        }
        tracing::info!(peer = %peer, count = assignments.len(), "stole attempts from a peer");
        let (tx, rx) = oneshot::channel();
        if self.core.send(Command::Stolen {
            from: peer,
            assignments,
            reply: tx,
        }) {
            // Wait until the core took them, so the next steal decision sees the new load.
            let _ = rx.await;
        }
    }

    fn expire_steal(&mut self) {
        if let Some(o) = &self.outstanding {
            if o.deadline <= Instant::now() {
                tracing::warn!(peer = %o.victim, request_id = o.request_id, "steal unanswered; abandoned");
                self.outstanding = None;
            }
        }
    }

    fn maybe_steal(&mut self) {
        if self.outstanding.is_some() {
            return;
        }
        let local = *self.local.borrow();
        if !local.connected || local.draining {
            // A steal must be announced to the coordinator at once; and a draining
            // worker takes no new work, from peers neither.
            return;
        }
        let thief =
            Member::new(self.me.clone(), local.slots).with_load(local.running, local.queued);
        let members: Vec<Member> = self
            .peers
            .iter()
            .filter_map(|(id, p)| {
                let link = p.link.as_ref().filter(|l| l.up)?;
                let load = link.load?;
                Some(Member::new(id.clone(), load.slots).with_load(load.running, load.queued))
            })
            .collect();
        let policy = StealPolicy {
            max_batch: thief.free_slots().min(MAX_STEAL_BATCH),
            min_excess: 1,
        };
        let Some(steal) = steal_decision(&thief, &members, &policy) else {
            return;
        };
        let Some(link) = self.peers.get(&steal.victim).and_then(|p| p.link.as_ref()) else {
            return;
        };
        let request_id = self.next_request;
        self.next_request += 1;
        if link
            .tx
            .send(PeerMsg::Steal {
                request_id,
                max: steal.count,
            })
            .is_err()
        {
            return;
        }
        tracing::debug!(peer = %steal.victim, request_id, max = steal.count, "stealing");
        self.outstanding = Some(Outstanding {
            victim: steal.victim,
            request_id,
            deadline: Instant::now() + STEAL_TIMEOUT,
        });
    }

    fn publish(&self) {
        let connected = self
            .peers
            .values()
            .filter(|p| p.link.as_ref().is_some_and(|l| l.up))
            .count();
        self.stats.send_if_modified(|s| {
            std::mem::replace(&mut s.peers_connected, connected) != connected
        });
    }

    fn close_all(&mut self) {
        for p in self.peers.values_mut() {
            if let Some(link) = p.link.take() {
                link.close(CLOSE_SHUTDOWN, "worker shutting down");
            }
        }
        self.outstanding = None;
        self.publish();
    }
}

/// What a link task needs to know and whom it tells.
struct LinkCtx {
    me: String,
    peer: String,
    gen: u64,
    core: CoreTx,
    local: watch::Receiver<LocalLoad>,
    events: mpsc::UnboundedSender<Event>,
}

/// How a link begins.
enum Start {
    Dial {
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        identity: Identity,
        addr: String,
        server_name: String,
    },
    /// Already authenticated, the dialer's `Hello` read.
    Accept {
        conn: quinn::Connection,
        writer: FrameWriter,
        reader: FrameReader,
    },
}

/// Closes the connection when dropped, unless disarmed.
struct CloseOnDrop(Option<quinn::Connection>);

impl CloseOnDrop {
    fn new(conn: &quinn::Connection) -> Self {
        CloseOnDrop(Some(conn.clone()))
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = &self.0 {
            // Harmless if already closed (then the first reason stands).
            close(conn, CLOSE_SHUTDOWN, "link closed");
        }
    }
}

/// One link from handshake to end; always ends with [`Event::Down`].
async fn link_task(ctx: LinkCtx, start: Start, out: mpsc::UnboundedReceiver<PeerMsg>) {
    let mut was_up = false;
    let error = match run_link(&ctx, start, out, &mut was_up).await {
        Ok(()) => "link closed".to_owned(),
        Err(e) => format!("{e:#}"),
    };
    let _ = ctx.events.send(Event::Down {
        peer: ctx.peer,
        gen: ctx.gen,
        error,
        was_up,
    });
}

async fn run_link(
    ctx: &LinkCtx,
    start: Start,
    out: mpsc::UnboundedReceiver<PeerMsg>,
    was_up: &mut bool,
) -> anyhow::Result<()> {
    let hello = PeerMsg::Hello {
        protocol: PROTOCOL_VERSION,
        worker_id: ctx.me.clone(),
    };
    let (conn, writer, reader) = match start {
        Start::Dial {
            endpoint,
            client,
            identity,
            addr,
            server_name,
        } => {
            let (conn, writer, reader) =
                dial(ctx, &endpoint, &client, &addr, &server_name, &hello).await?;
            // A peer whose certificate the cluster revokes later is cut off at once.
            tokio::spawn(swarm_transport::close_when_distrusted(
                conn.clone(),
                identity,
            ));
            (conn, writer, reader)
        }
        Start::Accept {
            conn,
            mut writer,
            reader,
        } => {
            let guard = CloseOnDrop::new(&conn);
            writer.send(&hello).await.context("sending Hello")?;
            guard.disarm();
            (conn, writer, reader)
        }
    };
    let _guard = CloseOnDrop::new(&conn);
    *was_up = true;
    let _ = ctx.events.send(Event::Up {
        peer: ctx.peer.clone(),
        gen: ctx.gen,
        conn: conn.clone(),
    });
    serve(ctx, &conn, writer, reader, out).await
}

/// Dials `addr`, exchanges `Hello`s and checks who answered.
async fn dial(
    ctx: &LinkCtx,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addr: &str,
    server_name: &str,
    hello: &PeerMsg,
) -> anyhow::Result<(quinn::Connection, FrameWriter, FrameReader)> {
    let sock = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolved to no address"))?;
    let session = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let dialed = swarm_transport::dial(endpoint, client, sock, server_name).await?;
        swarm_transport::open_session(dialed, hello).await
    })
    .await
    .map_err(|_| anyhow!("no handshake within {HANDSHAKE_TIMEOUT:?}"))?
    .with_context(|| format!("dialing {addr}"))?;
    let swarm_transport::Session {
        conn,
        writer,
        mut reader,
        ..
    } = session;
    let guard = CloseOnDrop::new(&conn);
    if let Err(e) = require_role(&conn, Role::Worker) {
        close(&conn, WRONG_ROLE_CODE, "wrong role");
        return Err(e).with_context(|| format!("{addr} is not a worker"));
    }
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv::<PeerMsg>())
        .await
        .map_err(|_| anyhow!("no Hello from {addr} within {HANDSHAKE_TIMEOUT:?}"))?;
    let worker_id = hello_of(&conn, first, addr)?;
    if worker_id != ctx.peer {
        close(&conn, CLOSE_NOT_PEER, "unexpected worker");
        bail!("{addr} is worker {worker_id:?}, expected {:?}", ctx.peer);
    }
    guard.disarm();
    Ok((conn, writer, reader))
}

/// The link after its handshake: gossip, steals both ways.
async fn serve(
    ctx: &LinkCtx,
    conn: &quinn::Connection,
    mut writer: FrameWriter,
    mut reader: FrameReader,
    mut out: mpsc::UnboundedReceiver<PeerMsg>,
) -> anyhow::Result<()> {
    let mut local = ctx.local.clone();
    let mut last_sent: Option<PeerMsg> = None;
    let mut tick = tokio::time::interval(GOSSIP_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = reader.recv::<PeerMsg>() => match r {
                Ok(Some(PeerMsg::Load { running, queued, slots })) => {
                    let _ = ctx.events.send(Event::Load {
                        peer: ctx.peer.clone(),
                        gen: ctx.gen,
                        load: PeerLoad { running, queued, slots },
                    });
                }
                Ok(Some(PeerMsg::Steal { request_id, max })) => {
                    give(ctx, &mut writer, request_id, max).await?;
                }
                Ok(Some(PeerMsg::Given { request_id, assignments })) => {
                    let _ = ctx.events.send(Event::Given {
                        peer: ctx.peer.clone(),
                        request_id,
                        assignments,
                    });
                }
                Ok(Some(PeerMsg::Hello { .. })) => {
                    close(conn, CLOSE_PROTOCOL_ERROR, "unexpected Hello");
                    bail!("protocol violation: a second Hello");
                }
                Ok(None) => bail!("the peer finished the link stream"),
                Err(e) => {
                    if e.is_malformed() {
                        close(conn, CLOSE_PROTOCOL_ERROR, "malformed frame");
                        return Err(e).context("malformed frame from peer; link closed");
                    }
                    return Err(e).context("reading from peer");
                }
            },
            m = out.recv() => match m {
                Some(msg) => writer.send(&msg).await.context("writing to peer")?,
                None => {
                    close(conn, CLOSE_DROPPED, "no longer peers");
                    return Ok(());
                }
            },
            r = local.changed() => {
                if r.is_err() {
                    close(conn, CLOSE_SHUTDOWN, "worker shutting down");
                    return Ok(());
                }
                send_load(&mut writer, &mut local, &mut last_sent, false).await?;
            }
            _ = tick.tick() => send_load(&mut writer, &mut local, &mut last_sent, true).await?,
        }
    }
}

/// Sends the local load if it changed since last sent, or always with `force`.
async fn send_load(
    writer: &mut FrameWriter,
    local: &mut watch::Receiver<LocalLoad>,
    last_sent: &mut Option<PeerMsg>,
    force: bool,
) -> anyhow::Result<()> {
    let l = *local.borrow_and_update();
    let msg = PeerMsg::Load {
        running: l.running,
        // What this worker would give: queued attempts of its mesh swarms.
        queued: l.stealable,
        slots: l.slots,
    };
    if force || last_sent.as_ref() != Some(&msg) {
        writer.send(&msg).await.context("writing to peer")?;
        *last_sent = Some(msg);
    }
    Ok(())
}

/// Tells the core how a hand-over went, however [`give`] is left: attempts are given away
/// only once the `Given` frame was written.
struct Lending<'a> {
    core: &'a CoreTx,
    to: &'a str,
    attempts: Vec<AttemptRef>,
    delivered: bool,
}

impl Drop for Lending<'_> {
    fn drop(&mut self) {
        if !self.attempts.is_empty() {
            self.core.send(Command::Lent {
                to: self.to.to_owned(),
                attempts: std::mem::take(&mut self.attempts),
                delivered: self.delivered,
            });
        }
    }
}

/// The worker id of a link's first frame, which must be a `Hello` of this protocol
/// version; closes the link with the matching code otherwise. `who` names the other end
/// in errors.
fn hello_of(
    conn: &quinn::Connection,
    first: Result<Option<PeerMsg>, swarm_transport::FrameError>,
    who: &str,
) -> anyhow::Result<String> {
    match first {
        Ok(Some(PeerMsg::Hello {
            protocol,
            worker_id,
        })) => {
            if !peer_protocol_supported(protocol) {
                let msg = format!(
                    "peer {worker_id} speaks protocol version {protocol}, this worker links to {MIN_PEER_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
                );
                close(conn, CLOSE_VERSION, &msg);
                bail!("{msg}");
            }
            Ok(worker_id)
        }
        Ok(Some(other)) => {
            close(conn, CLOSE_PROTOCOL_ERROR, "expected Hello");
            bail!("protocol violation: {} before Hello", msg_name(&other));
        }
        Ok(None) => bail!("{who} closed the link before Hello"),
        Err(e) => {
            if e.is_malformed() {
                close(conn, CLOSE_PROTOCOL_ERROR, "malformed frame");
            }
            Err(e).with_context(|| format!("reading Hello from {who}"))
        }
    }
}

/// Answers a `Steal`: up to `max` attempts from the local queue.
async fn give(
    ctx: &LinkCtx,
    writer: &mut FrameWriter,
    request_id: u64,
    max: u32,
) -> anyhow::Result<()> {
    let max = usize::try_from(max.min(MAX_STEAL_BATCH)).unwrap_or(0);
    let (tx, rx) = oneshot::channel();
    let assignments = if max > 0 && ctx.core.send(Command::TakeQueued { max, reply: tx }) {
        rx.await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut lending = Lending {
        core: &ctx.core,
        to: &ctx.peer,
        attempts: assignments.iter().map(|t| t.attempt).collect(),
        delivered: false,
    };
    let count = assignments.len();
    match writer
        .send(&PeerMsg::Given {
            request_id,
            assignments,
        })
        .await
    {
        Ok(()) => {
            lending.delivered = true;
            if count > 0 {
                tracing::debug!(peer = %ctx.peer, request_id, count, "gave attempts to a peer");
            }
            Ok(())
        }
        Err(FrameError::TooLarge { len, max }) => {
            // Nothing was written: keep the attempts and say so with an empty answer.
            tracing::warn!(peer = %ctx.peer, len, max, "attempts too large to hand over; kept");
            drop(lending);
            writer
                .send(&PeerMsg::Given {
                    request_id,
                    assignments: Vec::new(),
                })
                .await
                .context("writing to peer")
        }
        Err(e) => Err(e).context("handing attempts to peer"),
    }
}

#[cfg(test)]
mod tests;
