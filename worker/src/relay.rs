//! The lead side of hierarchical swarms: relaying members' sessions to the coordinator.
//!
//! A member dials the lead's peer listener with ALPN [`swarm_proto::ALPN_RELAY`]. The
//! lead requires a worker certificate, then pipes every bidirectional stream the member
//! opens onto a new bidirectional stream of the lead's own coordinator connection, bytes
//! both ways, without parsing a frame: the coordinator serves each such stream as one
//! worker session (the member's `Hello` first).
//!
//! * A relay connection is bound to the coordinator connection that was current when it
//!   was accepted (published by the connection loop after `Welcome`, direct sessions
//!   only). Without one, the member's connection is closed at once with
//!   [`RELAY_CLOSE_NO_COORDINATOR`]; when it ends (or is replaced), every relay connection
//!   bound to it is closed with the same code, which ends the relayed streams.
//! * A stream half ends the way its source ended: a finish becomes a finish, a reset (or
//!   a failed read) a reset with [`RELAY_STREAM_ABORTED`]; a stopped destination stops the
//!   source.

use std::time::Duration;

use swarm_transport::endpoint::WRONG_ROLE_CODE;
use swarm_transport::tls::Role;
use swarm_transport::Accepted;
use tokio::sync::watch;

use crate::WorkerStats;

/// QUIC application close code on a relay connection: the lead has no coordinator
/// connection (now, or any more); the member should dial the coordinator itself.
pub const RELAY_CLOSE_NO_COORDINATOR: u32 = 0x5710;
/// QUIC application close code on a relay connection: the lead is shutting down.
const CLOSE_SHUTDOWN: u32 = 0;
/// Stream error code (reset / stop) when the other half of a relayed stream failed.
pub const RELAY_STREAM_ABORTED: u32 = 0x5711;
/// How long an incoming relay connection may take to authenticate.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest chunk moved in one read.
const CHUNK: usize = 64 * 1024;

/// What the relay needs from the rest of the worker.
#[derive(Clone)]
pub(crate) struct RelayCtx {
    /// The worker's current direct coordinator connection, if a session is up.
    pub(crate) coordinator: watch::Receiver<Option<quinn::Connection>>,
    pub(crate) stats: watch::Sender<WorkerStats>,
}

fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(quinn::VarInt::from_u32(code), reason.as_bytes());
}

/// Serves one member's relay connection until it, or the coordinator connection it is
/// bound to, ends.
pub(crate) async fn serve(mut accepted: Accepted, ctx: RelayCtx) {
    let conn = accepted.conn.clone();
    let remote = conn.remote_address();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accepted.authenticate_as(Role::Worker)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // `authenticate_as` closed it already on a wrong role; a missing or unusable
            // certificate gets the same answer.
            close(&conn, WRONG_ROLE_CODE, "wrong role");
            tracing::warn!(%remote, "refused a relay connection: {e}");
            return;
        }
        Err(_) => {
            close(&conn, WRONG_ROLE_CODE, "no handshake in time");
            tracing::warn!(%remote, "refused a relay connection: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    }
    let mut current = ctx.coordinator.clone();
    let coord = current
        .borrow_and_update()
        .clone()
        .filter(|c| c.close_reason().is_none());
    let Some(coord) = coord else {
        close(
            &conn,
            RELAY_CLOSE_NO_COORDINATOR,
            "the lead has no coordinator connection",
        );
        tracing::info!(%remote, "refused a relay connection: no coordinator connection");
        return;
    };
    tracing::info!(%remote, "relaying a member to the coordinator");
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    tokio::spawn(pipe(coord.clone(), send, recv, ctx.stats.clone()));
                }
                Err(e) => {
                    tracing::debug!(%remote, "relay connection ended: {e}");
                    return;
                }
            },
            _ = coord.closed() => {
                close(&conn, RELAY_CLOSE_NO_COORDINATOR, "the lead lost its coordinator connection");
                tracing::info!(%remote, "coordinator connection lost; relay connection closed");
                return;
            }
            r = current.changed() => {
                if r.is_err() {
                    close(&conn, CLOSE_SHUTDOWN, "lead shutting down");
                    return;
                }
                let same = current
                    .borrow_and_update()
                    .as_ref()
                    .is_some_and(|c| c.stable_id() == coord.stable_id());
                if !same {
                    close(&conn, RELAY_CLOSE_NO_COORDINATOR, "the lead lost its coordinator connection");
                    tracing::info!(%remote, "coordinator session ended; relay connection closed");
                    return;
                }
            }
        }
    }
}

/// Counts one relayed stream in the stats while it lives.
struct OpenStream(watch::Sender<WorkerStats>);

impl OpenStream {
    fn new(stats: watch::Sender<WorkerStats>) -> Self {
        stats.send_modify(|s| {
            s.relayed_sessions += 1;
            s.relayed_total += 1;
        });
        OpenStream(stats)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0
            .send_modify(|s| s.relayed_sessions = s.relayed_sessions.saturating_sub(1));
    }
}

/// One member stream onto a new stream of the coordinator connection, both ways.
async fn pipe(
    coord: quinn::Connection,
    mut member_send: quinn::SendStream,
    mut member_recv: quinn::RecvStream,
    stats: watch::Sender<WorkerStats>,
) {
    let aborted = quinn::VarInt::from_u32(RELAY_STREAM_ABORTED);
    let (coord_send, coord_recv) = match coord.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("cannot open a relayed stream to the coordinator: {e}");
            let _ = member_send.reset(aborted);
            let _ = member_recv.stop(aborted);
            return;
        }
    };
    let _open = OpenStream::new(stats);
    tokio::join!(copy(member_recv, coord_send), copy(coord_recv, member_send));
}

/// Copies `from` into `to` until `from` ends (then `to` ends the same way) or `to` is
/// stopped (then `from` is stopped).
async fn copy(mut from: quinn::RecvStream, mut to: quinn::SendStream) {
    let aborted = quinn::VarInt::from_u32(RELAY_STREAM_ABORTED);
    let stopped = to.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            chunk = from.read_chunk(CHUNK, true) => match chunk {
                Ok(Some(chunk)) => {
                    if to.write_chunk(chunk.bytes).await.is_err() {
                        let _ = from.stop(aborted);
                        return;
                    }
                }
                Ok(None) => {
                    let _ = to.finish();
                    return;
                }
                Err(_) => {
                    let _ = to.reset(aborted);
                    return;
                }
            },
            _ = &mut stopped => {
                let _ = from.stop(aborted);
                let _ = to.reset(aborted);
                return;
            }
        }
    }
}
