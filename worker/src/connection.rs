//! The connection loop: dial, `Hello`, `Welcome`, then shuttle messages between the
//! coordinator and the [core](crate::core) until the connection fails; back off; repeat.
//!
//! The session goes to a coordinator, or through a lead when the coordinator said so with
//! `Parent` (hierarchical swarms, see the crate docs): then the loop dials the lead's
//! relay listener instead and speaks the same protocol over it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swarm_proto::worker::{
    relay_proof_context, CoordinatorMsg, Hello, IdentityProof, PeerInfo, WorkerMsg,
};
use swarm_proto::PROTOCOL_VERSION;
use swarm_transport::{FrameError, FrameReader, FrameWriter};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::core::Command;
use crate::output::OutputBudget;
use crate::{Backoff, WorkerStats};

/// How long to wait for `Welcome` after `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Most messages written with one stream write.
const MAX_BATCH: usize = 4096;
/// QUIC application close code: the coordinator sent something unparseable.
pub(crate) const CLOSE_PROTOCOL_ERROR: u32 = 1;
/// QUIC application close code: the worker is shutting down.
pub(crate) const CLOSE_SHUTDOWN: u32 = 0;
/// A session through a lead that lasted this long resets the lead backoff.
const LEAD_STABLE: Duration = Duration::from_secs(10);

/// Where the coordinator is.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A fixed address.
    Addr(SocketAddr),
    /// `HOST:PORT`, resolved again before every dial.
    Host(String),
}

impl Target {
    async fn resolve(&self) -> anyhow::Result<SocketAddr> {
        match self {
            Target::Addr(a) => Ok(*a),
            Target::Host(h) => tokio::net::lookup_host(h.as_str())
                .await
                .with_context(|| format!("resolving {h}"))?
                .next()
                .ok_or_else(|| anyhow!("{h} resolved to no address")),
        }
    }
}

/// One coordinator the worker may connect to.
#[derive(Debug, Clone)]
pub(crate) struct Dest {
    /// How the address was given (`HOST:PORT`); leader hints are matched against it.
    pub(crate) label: String,
    pub(crate) target: Target,
    /// Name its certificate must be valid for.
    pub(crate) server_name: String,
}

impl Dest {
    /// `HOST:PORT`, resolved before every dial; the certificate must name `server_name`
    /// or, without one, `HOST`.
    pub(crate) fn host(addr: &str, server_name: Option<&str>) -> anyhow::Result<Dest> {
        let (host, _) = crate::split_host_port(addr)?;
        Ok(Dest {
            label: addr.to_owned(),
            target: Target::Host(addr.to_owned()),
            server_name: server_name.map_or(host, str::to_owned),
        })
    }
}

/// Connection state shared with [`crate::Worker::run`] for a graceful shutdown.
pub(crate) struct Shared {
    pub(crate) conn: Mutex<Option<quinn::Connection>>,
    pub(crate) endpoint: Mutex<Option<quinn::Endpoint>>,
    /// The current *direct* coordinator connection while its session is up (set after
    /// `Welcome`, cleared when it ends): what the relay pipes members' streams into.
    pub(crate) coordinator: watch::Sender<Option<quinn::Connection>>,
}

/// How to reach a lead's relay listener.
#[derive(Debug, Clone)]
pub(crate) struct RelayClient {
    /// ALPN `ALPN_RELAY`, the worker's certificate; its session cache makes redials 0-RTT.
    pub(crate) client: quinn::ClientConfig,
    /// Name the lead's certificate must be valid for.
    pub(crate) server_name: String,
    /// The worker's own credentials: a relayed session proves with them who it is.
    pub(crate) identity: Option<swarm_transport::Identity>,
}

impl Shared {
    fn set_conn(&self, conn: Option<quinn::Connection>) {
        if let Ok(mut slot) = self.conn.lock() {
            *slot = conn;
        }
    }
}

/// Everything the loop needs; lives for the whole life of the worker.
pub(crate) struct ConnLoop {
    pub(crate) client: quinn::ClientConfig,
    /// The coordinators, in the order they are tried; a leader hint naming an unknown
    /// address is appended.
    pub(crate) targets: Mutex<Vec<Dest>>,
    /// Index into `targets` of the coordinator to dial next.
    pub(crate) current: AtomicUsize,
    pub(crate) hello: Hello,
    pub(crate) backoff: Backoff,
    /// Seed of the backoff jitter; `None` seeds from the OS.
    pub(crate) jitter_seed: Option<u64>,
    pub(crate) stats: watch::Sender<WorkerStats>,
    pub(crate) core: mpsc::UnboundedSender<Command>,
    pub(crate) shared: Arc<Shared>,
    /// `None`: `Parent` is ignored, sessions always go to a coordinator directly.
    pub(crate) relay: Option<RelayClient>,
    /// The worker's identity: its deny list (which every verifier of this worker checks)
    /// is what `Revoked` replaces, and live connections are cut when a peer is revoked or
    /// no longer valid under its CAs. `None`: a worker without an identity of its own
    /// ignores `Revoked`.
    pub(crate) identity: Option<swarm_transport::Identity>,
}

/// How one session ended.
enum End {
    /// Try again after a backoff, with the next coordinator.
    Retry(anyhow::Error),
    /// The coordinator is not the leader; `leader` is the leader's address if known.
    Redirect(Option<String>, anyhow::Error),
    /// Give up: retrying cannot help (protocol version mismatch).
    Fatal(anyhow::Error),
    /// The route changed (`Parent`): reconnect at once along the new one.
    Reroute(String),
}

/// Where sessions go: to a coordinator directly, or through a lead.
struct Route {
    /// The lead the coordinator named in `Parent`; the next session dials it.
    lead: Option<PeerInfo>,
    /// A lead named while leads are backed off; adopted when `lead_ok_at` passes.
    pending: Option<PeerInfo>,
    /// After a session through a lead failed, no lead is dialed before this.
    lead_ok_at: Option<Instant>,
    /// Backoff between failures through leads (so a broken lead is not redialed in a
    /// tight loop while the coordinator keeps naming it).
    lead_delay: Delay,
    /// When the current session got its `Welcome`.
    up_since: Option<Instant>,
}

impl Route {
    /// A session through a lead ended: go back to the coordinators, and keep away from
    /// leads for a while.
    fn lead_failed(&mut self) {
        self.lead = None;
        self.pending = None;
        if self.up_since.is_some_and(|t| t.elapsed() >= LEAD_STABLE) {
            self.lead_delay.reset();
        }
        self.lead_ok_at = Some(Instant::now() + self.lead_delay.next());
    }

    fn backed_off(&self) -> bool {
        self.lead_ok_at.is_some_and(|t| t > Instant::now())
    }
}

fn describe(lead: &PeerInfo) -> String {
    format!("lead {} at {}", lead.worker_id, lead.addr)
}

/// Exponential backoff with jitter: each delay is uniform in `[d/2, d]`, `d` doubling
/// from `initial` up to `max`.
pub(crate) struct Delay {
    cfg: Backoff,
    next: Duration,
    rng: StdRng,
}

impl Delay {
    pub(crate) fn new(cfg: Backoff, seed: Option<u64>) -> Self {
        Delay {
            cfg,
            next: cfg.initial,
            rng: seed.map_or_else(StdRng::from_entropy, StdRng::seed_from_u64),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.cfg.initial;
    }

    pub(crate) fn next(&mut self) -> Duration {
        let d = self.next.min(self.cfg.max);
        self.next = (d * 2).min(self.cfg.max);
        let lo = d / 2;
        lo + (d - lo).mul_f64(self.rng.gen::<f64>())
    }
}

/// The host part of `HOST:PORT`, or the whole string if it has no port.
fn host_of(addr: &str) -> String {
    crate::split_host_port(addr).map_or_else(|_| addr.to_owned(), |(h, _)| h)
}

/// Whether a `Rejected` code means that retrying is pointless.
fn fatal_reject(code: &str) -> bool {
    code.to_ascii_lowercase().contains("protocol") || code.eq_ignore_ascii_case("version")
}

impl ConnLoop {
    /// Runs until a fatal error (returned); the caller stops it by dropping the future.
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let mut delay = Delay::new(self.backoff, self.jitter_seed);
        let mut route = Route {
            lead: None,
            pending: None,
            lead_ok_at: None,
            lead_delay: Delay::new(self.backoff, self.jitter_seed.map(|s| s.rotate_left(17))),
            up_since: None,
        };
        loop {
            let via = route.lead.clone().filter(|_| self.relay.is_some());
            route.up_since = None;
            let end = self.session(&mut delay, &mut route, via.as_ref()).await;
            self.shared.coordinator.send_replace(None);
            let was_connected = self.stats.send_if_modified(|s| {
                s.via_lead = None;
                std::mem::replace(&mut s.connected, false)
            });
            self.shared.set_conn(None);
            let _ = self.core.send(Command::Disconnected);
            let e = match end {
                End::Fatal(e) => return Err(e),
                End::Reroute(why) => {
                    tracing::info!("reconnecting: {why}");
                    continue;
                }
                End::Retry(e) => {
                    match &via {
                        // The lead failed, not the coordinator: back to the current one.
                        Some(_) => route.lead_failed(),
                        None => self.advance(None),
                    }
                    e
                }
                End::Redirect(leader, e) => {
                    if via.is_some() {
                        route.lead_failed();
                    }
                    self.advance(leader.as_deref());
                    e
                }
            };
            let e = match &via {
                Some(lead) => e.context(format!("through {}", describe(lead))),
                None => e,
            };
            let wait = delay.next();
            if was_connected {
                tracing::warn!(reconnect_in = ?wait, "disconnected from coordinator: {e:#}");
            } else {
                tracing::warn!(reconnect_in = ?wait, "cannot connect to coordinator: {e:#}");
            }
            self.stats
                .send_modify(|s| s.last_error = Some(format!("{e:#}")));
            tokio::time::sleep(wait).await;
        }
    }

    /// Choose the coordinator to dial next: the leader if named, else the next one.
    fn advance(&self, leader: Option<&str>) {
        let Ok(mut targets) = self.targets.lock() else {
            return;
        };
        let next = match leader {
            Some(l) => match targets.iter().position(|d| d.label == l) {
                Some(i) => i,
                None => match Dest::host(l, None) {
                    Ok(mut d) => {
                        // Keep the certificate name policy of the configured targets.
                        if let Some(first) = targets.first() {
                            if first.server_name != host_of(&first.label) {
                                d.server_name = first.server_name.clone();
                            }
                        }
                        targets.push(d);
                        targets.len() - 1
                    }
                    Err(e) => {
                        tracing::warn!("ignoring unusable leader address {l:?}: {e:#}");
                        self.current.load(Ordering::Relaxed) + 1
                    }
                },
            },
            None => self.current.load(Ordering::Relaxed) + 1,
        };
        self.current
            .store(next % targets.len().max(1), Ordering::Relaxed);
    }

    /// The coordinator to dial now.
    fn dest(&self) -> anyhow::Result<Dest> {
        let targets = self
            .targets
            .lock()
            .map_err(|_| anyhow!("targets lock poisoned"))?;
        let i = self.current.load(Ordering::Relaxed) % targets.len().max(1);
        targets
            .get(i)
            .cloned()
            .ok_or_else(|| anyhow!("no coordinator address"))
    }

    fn endpoint_for(&self, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
        let mut slot = self
            .shared
            .endpoint
            .lock()
            .map_err(|_| anyhow!("endpoint lock poisoned"))?;
        if let Some(ep) = slot.as_ref() {
            let same_family = ep
                .local_addr()
                .map(|l| l.is_ipv4() == addr.is_ipv4())
                .unwrap_or(false);
            if same_family {
                return Ok(ep.clone());
            }
        }
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let ep = swarm_transport::client_endpoint(bind)?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    async fn session(&self, delay: &mut Delay, route: &mut Route, via: Option<&PeerInfo>) -> End {
        let (addr, server_name, client) = match (via, &self.relay) {
            (Some(lead), Some(relay)) => {
                let addr = match Target::Host(lead.addr.clone()).resolve().await {
                    Ok(a) => a,
                    Err(e) => return End::Retry(e),
                };
                (addr, relay.server_name.clone(), &relay.client)
            }
            _ => {
                let dest = match self.dest() {
                    Ok(d) => d,
                    Err(e) => return End::Fatal(e),
                };
                let addr = match dest.target.resolve().await {
                    Ok(a) => a,
                    Err(e) => return End::Retry(e),
                };
                (addr, dest.server_name, &self.client)
            }
        };
        let endpoint = match self.endpoint_for(addr) {
            Ok(e) => e,
            Err(e) => return End::Retry(e),
        };

        // The attempts we hold, for the coordinator to reconcile against.
        let (tx, rx) = oneshot::channel();
        if self.core.send(Command::Snapshot(tx)).is_err() {
            return End::Fatal(anyhow!("worker core stopped"));
        }
        let Ok(running) = rx.await else {
            return End::Fatal(anyhow!("worker core stopped"));
        };
        let n_running = running.len();
        let hello = WorkerMsg::Hello(Hello {
            running,
            ..self.hello.clone()
        });

        let dialed = match swarm_transport::dial(&endpoint, client, addr, &server_name).await {
            Ok(d) => d,
            Err(e) => return End::Retry(anyhow::Error::new(e).context(format!("dialing {addr}"))),
        };
        let session = match swarm_transport::open_session(dialed, &hello).await {
            Ok(s) => s,
            Err(e) => {
                return End::Retry(
                    anyhow::Error::new(e).context(format!("opening session with {addr}")),
                )
            }
        };
        let swarm_transport::Session {
            conn,
            writer,
            mut reader,
            zero_rtt_accepted,
        } = session;
        self.shared.set_conn(Some(conn.clone()));
        // A coordinator (or lead) whose certificate is revoked while this session is up
        // is left at once; the handshake refuses it from then on.
        if let Some(identity) = &self.identity {
            tokio::spawn(swarm_transport::close_when_distrusted(
                conn.clone(),
                identity.clone(),
            ));
        }

        let end = self
            .serve(
                &conn,
                writer,
                &mut reader,
                zero_rtt_accepted,
                n_running,
                addr,
                delay,
                route,
                via,
            )
            .await;
        // Harmless if already closed; otherwise tells the coordinator we are gone.
        conn.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"reconnecting");
        end
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        conn: &quinn::Connection,
        mut writer: FrameWriter,
        reader: &mut FrameReader,
        zero_rtt: bool,
        n_running: usize,
        addr: SocketAddr,
        delay: &mut Delay,
        route: &mut Route,
        via: Option<&PeerInfo>,
    ) -> End {
        let mut first =
            match tokio::time::timeout(WELCOME_TIMEOUT, reader.recv::<CoordinatorMsg>()).await {
                Err(_) => return End::Retry(anyhow!("no Welcome within {WELCOME_TIMEOUT:?}")),
                Ok(r) => r,
            };
        // Through a lead, the coordinator first asks the member to prove who it is.
        if let (Ok(Some(CoordinatorMsg::Prove { nonce })), Some(lead)) = (&first, via) {
            if let Err(e) = self.prove(&mut writer, nonce, &lead.worker_id).await {
                return End::Retry(e);
            }
            first = match tokio::time::timeout(WELCOME_TIMEOUT, reader.recv::<CoordinatorMsg>())
                .await
            {
                Err(_) => return End::Retry(anyhow!("no Welcome within {WELCOME_TIMEOUT:?}")),
                Ok(r) => r,
            };
        }
        let (heartbeat, max_output_bytes, term) = match first {
            Ok(Some(CoordinatorMsg::Welcome {
                protocol,
                heartbeat_interval_ms,
                max_output_bytes,
                term,
            })) => {
                if protocol != PROTOCOL_VERSION {
                    return End::Fatal(anyhow!(
                        "coordinator at {addr} speaks protocol version {protocol}, this worker speaks {PROTOCOL_VERSION}"
                    ));
                }
                (
                    Duration::from_millis(heartbeat_interval_ms),
                    max_output_bytes,
                    term,
                )
            }
            Ok(Some(CoordinatorMsg::NotLeader { leader, message })) => {
                return End::Redirect(leader, anyhow!("coordinator at {addr}: {message}"));
            }
            Ok(Some(CoordinatorMsg::Rejected { code, message })) => {
                let e = anyhow!("coordinator at {addr} rejected this worker: {code}: {message}");
                return if fatal_reject(&code) {
                    End::Fatal(e)
                } else {
                    End::Retry(e)
                };
            }
            Ok(Some(other)) => {
                conn.close(
                    quinn::VarInt::from_u32(CLOSE_PROTOCOL_ERROR),
                    b"expected Welcome",
                );
                let shown: String = format!("{other:?}").chars().take(200).collect();
                return End::Retry(anyhow!(
                    "protocol violation: {shown} before Welcome; connection dropped"
                ));
            }
            Ok(None) => {
                return End::Retry(anyhow!("coordinator closed the session before Welcome"))
            }
            Err(e) => return self.read_error(conn, e, "waiting for Welcome"),
        };

        delay.reset();
        route.up_since = Some(Instant::now());
        if via.is_none() {
            // Members may now relay their sessions through this connection.
            self.shared.coordinator.send_replace(Some(conn.clone()));
        }
        self.stats.send_modify(|s| {
            s.connected = true;
            s.connects += 1;
            s.zero_rtt_accepted += u64::from(zero_rtt);
            s.last_error = None;
            s.via_lead = via.map(|l| l.worker_id.clone());
        });
        tracing::info!(
            coordinator = %addr,
            via_lead = via.map(|l| l.worker_id.as_str()),
            zero_rtt_accepted = zero_rtt,
            running = n_running,
            heartbeat_ms = heartbeat.as_millis() as u64,
            "connected to coordinator"
        );

        let (sink, rx) = mpsc::unbounded_channel();
        // This session's output bytes queued and not yet written (see `crate::output`).
        let output_budget = Arc::new(OutputBudget::default());
        let mut write_task = tokio::spawn(write_loop(writer, rx, output_budget.clone()));
        // Abort the writer however this function is left.
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _abort = AbortOnDrop(write_task.abort_handle());
        if self
            .core
            .send(Command::Connected {
                sink,
                output_budget,
                heartbeat,
                max_output_bytes,
                term,
            })
            .is_err()
        {
            return End::Fatal(anyhow!("worker core stopped"));
        }

        loop {
            // A lead named while leads were backed off is adopted when the backoff ends.
            let lead_ok_at = route.lead_ok_at.unwrap_or_else(Instant::now);
            tokio::select! {
                () = tokio::time::sleep_until(lead_ok_at), if route.pending.is_some() => {
                    if let Some(lead) = route.pending.take() {
                        let why = format!("the coordinator routes this worker through {}", describe(&lead));
                        route.lead = Some(lead);
                        return End::Reroute(why);
                    }
                }
                r = reader.recv::<CoordinatorMsg>() => match r {
                    Ok(Some(CoordinatorMsg::Parent { lead })) => {
                        if let Some(end) = self.parent(route, via, lead) {
                            return end;
                        }
                    }
                    Ok(Some(CoordinatorMsg::NotLeader { leader, message })) => {
                        return End::Redirect(leader, anyhow!("coordinator at {addr}: {message}"));
                    }
                    Ok(Some(CoordinatorMsg::Rejected { code, message })) => {
                        let e = anyhow!("coordinator rejected this worker: {code}: {message}");
                        return if fatal_reject(&code) { End::Fatal(e) } else { End::Retry(e) };
                    }
                    Ok(Some(CoordinatorMsg::Revoked { serials })) => self.revoked(serials),
                    Ok(Some(msg)) => {
                        if self.core.send(Command::Coordinator(msg)).is_err() {
                            return End::Fatal(anyhow!("worker core stopped"));
                        }
                    }
                    Ok(None) => return End::Retry(anyhow!("coordinator closed the session")),
                    Err(e) => return self.read_error(conn, e, "reading from coordinator"),
                },
                r = &mut write_task => {
                    return End::Retry(match r {
                        Ok(Ok(())) => anyhow!("writer stopped"),
                        Ok(Err(e)) => anyhow::Error::new(e).context("writing to coordinator"),
                        Err(e) => anyhow!("writer task failed: {e}"),
                    });
                }
            }
        }
    }

    /// Takes the cluster's deny list: every verifier of this worker (coordinators, leads,
    /// mesh peers) refuses those certificates from its next handshake, and live
    /// connections using one are closed (see `close_when_distrusted`).
    fn revoked(&self, serials: Vec<String>) {
        let Some(revocations) = self.identity.as_ref().map(|i| i.revocations()) else {
            return;
        };
        let n = serials.len();
        if revocations.replace(serials) {
            tracing::info!(
                revoked = n,
                "the cluster's deny list of certificates changed"
            );
        }
    }

    /// Answers a relayed session's `Prove`: signs the nonce, the lead and this worker's id
    /// with the worker's certificate key.
    async fn prove(
        &self,
        writer: &mut FrameWriter,
        nonce: &[u8],
        lead: &str,
    ) -> anyhow::Result<()> {
        let identity = self
            .relay
            .as_ref()
            .and_then(|r| r.identity.as_ref())
            .ok_or_else(|| anyhow!("asked to prove its identity, but this worker has no certificate to prove it with"))?;
        let context = relay_proof_context(nonce, lead, &self.hello.worker_id);
        let proof = identity.prove(&context)?;
        writer
            .send(&WorkerMsg::Proof(IdentityProof {
                chain: proof.chain,
                scheme: proof.scheme,
                signature: proof.signature,
            }))
            .await
            .context("sending the identity proof")?;
        Ok(())
    }

    /// Acts on `Parent`: `Some` when the session must end to take the new route.
    fn parent(
        &self,
        route: &mut Route,
        via: Option<&PeerInfo>,
        lead: Option<PeerInfo>,
    ) -> Option<End> {
        let Some(lead) = lead else {
            route.pending = None;
            route.lead = None;
            return via.map(|l| {
                End::Reroute(format!(
                    "the coordinator wants a direct connection instead of through {}",
                    describe(l)
                ))
            });
        };
        if via == Some(&lead) {
            route.pending = None;
            return None;
        }
        if self.relay.is_none() {
            tracing::warn!(
                lead = %lead.worker_id,
                "the coordinator routes this worker through a lead, but it has no relay client configuration; staying direct"
            );
            return None;
        }
        if lead.worker_id == self.hello.worker_id {
            tracing::warn!("the coordinator named this worker as its own lead; ignored");
            return None;
        }
        if let Err(e) = crate::split_host_port(&lead.addr) {
            tracing::warn!(lead = %lead.worker_id, "ignoring a lead with an unusable address: {e:#}");
            return None;
        }
        if route.backed_off() {
            tracing::debug!(lead = %lead.worker_id, "a lead failed recently; switching later");
            route.pending = Some(lead);
            return None;
        }
        route.pending = None;
        let why = format!(
            "the coordinator routes this worker through {}",
            describe(&lead)
        );
        route.lead = Some(lead);
        Some(End::Reroute(why))
    }

    /// Ends the session after a failed read. The error is logged once, by the caller
    /// of [`ConnLoop::session`], with the reconnect delay.
    fn read_error(&self, conn: &quinn::Connection, e: FrameError, context: &str) -> End {
        if e.is_malformed() {
            conn.close(
                quinn::VarInt::from_u32(CLOSE_PROTOCOL_ERROR),
                b"malformed frame",
            );
            End::Retry(anyhow::Error::new(e).context(format!(
                "malformed frame while {context}; connection dropped"
            )))
        } else {
            End::Retry(anyhow::Error::new(e).context(context.to_owned()))
        }
    }
}

/// The connection's only writer: sends whatever is queued as one batch per stream write,
/// and gives the bytes of the `Output` chunks it wrote back to the session's output
/// budget (so output waits for the writer, not the other way round, at most
/// [`crate::MAX_QUEUED_OUTPUT_BYTES`] of it).
async fn write_loop(
    mut writer: FrameWriter,
    mut rx: mpsc::UnboundedReceiver<WorkerMsg>,
    output_budget: Arc<OutputBudget>,
) -> Result<(), FrameError> {
    let mut batch = Vec::with_capacity(256);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            let _ = writer.finish();
            return Ok(());
        }
        writer.send_batch(&batch).await?;
        output_budget.written(&batch);
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_jitters_and_resets() {
        let cfg = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        };
        let mut d = Delay::new(cfg, None);
        let mut nominal = Duration::from_millis(50);
        for _ in 0..20 {
            let got = d.next();
            assert!(
                got >= nominal / 2 && got <= nominal,
                "{got:?} vs {nominal:?}"
            );
            nominal = (nominal * 2).min(cfg.max);
        }
        assert_eq!(d.next, cfg.max);
        d.reset();
        assert!(d.next() <= cfg.initial);
    }

    #[test]
    fn reject_codes() {
        assert!(fatal_reject("protocol_version"));
        assert!(fatal_reject("unsupported_protocol"));
        assert!(fatal_reject("VERSION"));
        assert!(!fatal_reject("duplicate_worker"));
    }
}
