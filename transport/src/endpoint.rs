//! Endpoints, dialing (with 0-RTT) and accepting connections.
//!
//! # 0-RTT
//!
//! A client that talked to a server before can resume the TLS session and send data in
//! its very first flight ("early data"), saving a round trip on reconnect. Early data can
//! be replayed by an attacker who captured it, so it must only carry *idempotent*
//! messages. Likewise a server that accepts 0-RTT may read such data before the
//! client's certificate has been checked on a fresh handshake, so it must only act on
//! idempotent messages until the handshake completes, and must check [`peer_role`] only
//! after that.
//!
//! Client side: [`dial`] then [`open_session`] with an idempotent first message.
//! Server side: [`accept`], [`Accepted::accept_stream`], then [`Accepted::authenticate`]
//! before acting on anything that is not idempotent.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use serde::Serialize;

use crate::frame::{FrameReader, FrameWriter};
use crate::tls::{peer_role, Role};
use crate::TransportError;

/// Binds a UDP socket at `addr` and serves connections with `server`. Must be called
/// within a tokio runtime. The endpoint can also dial out with
/// [`quinn::Endpoint::connect_with`] or [`dial`], which is how coordinators reach each
/// other from the endpoint they serve on.
pub fn server_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
) -> anyhow::Result<quinn::Endpoint> {
    quinn::Endpoint::server(server, addr)
        .with_context(|| format!("binding QUIC server endpoint on {addr}"))
}

/// Binds a UDP socket at `bind` (usually port 0) for outgoing connections only. Must be
/// called within a tokio runtime.
pub fn client_endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    quinn::Endpoint::client(bind).with_context(|| format!("binding QUIC client endpoint on {bind}"))
}

/// An endpoint over a caller-supplied socket instead of a bound UDP socket, driven by
/// `runtime`: how a deterministic simulation runs QUIC over its simulated network. With
/// `server` it accepts connections as well (like [`server_endpoint`]), and it can always
/// dial out (like [`client_endpoint`]). `rng_seed` fixes the endpoint's own randomness
/// (per-connection seeds, stateless-reset keys stay random), for replayable runs.
pub fn endpoint_on(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    runtime: Arc<dyn quinn::Runtime>,
    server: Option<quinn::ServerConfig>,
    rng_seed: Option<[u8; 32]>,
) -> anyhow::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config.rng_seed(rng_seed);
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
        .context("creating QUIC endpoint on a supplied socket")
}

/// An outgoing connection, possibly still completing its handshake.
pub struct Dialed {
    /// The connection. While `early` is `Some` and unresolved, data written to it is sent
    /// as 0-RTT early data and may be replayed or rejected.
    pub conn: quinn::Connection,
    /// `Some` if the connection resumed a session and is usable before the handshake
    /// completes; it resolves when the handshake does, to whether the server accepted the
    /// early data. `None` if a full handshake was done before returning.
    pub early: Option<quinn::ZeroRttAccepted>,
}

impl Dialed {
    /// Waits for the handshake to complete. Returns whether data sent before it as 0-RTT
    /// was accepted (always `false` if no 0-RTT was attempted); if it was not, such data
    /// never reached the server and streams opened before now are unusable.
    pub async fn handshake(&mut self) -> Result<bool, TransportError> {
        let Some(early) = self.early.take() else {
            return Ok(false);
        };
        let accepted = early.await;
        // The future also resolves (to false) when the connection fails; tell that
        // apart from a plain rejection.
        if let Some(e) = self.conn.close_reason() {
            return Err(e.into());
        }
        Ok(accepted)
    }
}

/// Connects to `addr`, verifying that the server's certificate is valid for
/// `server_name` under the cluster CA.
///
/// If `client` holds a resumable session for `server_name`, returns at once with
/// `early` set (0-RTT); otherwise returns after a full handshake. A failed full
/// handshake (wrong CA, wrong name, wrong ALPN, unreachable peer) is an error here; a
/// failed 0-RTT handshake surfaces when `early` resolves or on first use.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Dialed, TransportError> {
    let connecting = endpoint.connect_with(client.clone(), addr, server_name)?;
    match connecting.into_0rtt() {
        Ok((conn, early)) => {
            tracing::debug!(%addr, server_name, "dialing with 0-RTT");
            Ok(Dialed {
                conn,
                early: Some(early),
            })
        }
        Err(connecting) => {
            let conn = connecting.await?;
            tracing::debug!(%addr, server_name, "dialed with full handshake");
            Ok(Dialed { conn, early: None })
        }
    }
}

/// A framed bidirectional stream on an established connection.
pub struct Session {
    /// The connection; its handshake is complete.
    pub conn: quinn::Connection,
    /// Sends frames on the session's stream.
    pub writer: FrameWriter,
    /// Receives frames from the session's stream.
    pub reader: FrameReader,
    /// Whether the first message went out as 0-RTT early data and the server accepted it.
    pub zero_rtt_accepted: bool,
}

/// Opens a bidirectional stream on `dialed` and sends `first` on it, as 0-RTT early data
/// if the connection allows it. If the server rejects the early data, the stream is
/// reopened after the handshake and `first` is sent again, transparently.
///
/// `first` must be idempotent: as early data it may be replayed by an attacker, and
/// after a rejection it is sent twice (the server only ever sees the second copy, but a
/// replay of the first may also arrive).
///
/// Returns only once the handshake is complete, so everything sent on the returned
/// writer has full TLS protection and anything may be sent on it.
pub async fn open_session<T: Serialize>(
    dialed: Dialed,
    first: &T,
) -> Result<Session, TransportError> {
    let Dialed { conn, early } = dialed;
    let Some(early) = early else {
        let (writer, reader) = open_and_send(&conn, first).await?;
        return Ok(Session {
            conn,
            writer,
            reader,
            zero_rtt_accepted: false,
        });
    };

    let attempt = open_and_send(&conn, first).await;
    let mut dialed = Dialed {
        conn,
        early: Some(early),
    };
    let accepted = dialed.handshake().await?;
    let conn = dialed.conn;
    match attempt {
        Ok((writer, reader)) if accepted => {
            return Ok(Session {
                conn,
                writer,
                reader,
                zero_rtt_accepted: true,
            });
        }
        // Rejected early data fails writes with ZeroRttRejected, or writes that went
        // into the buffer before the rejection are silently dropped; either way the
        // stream is dead and `first` must be resent on a new one.
        Ok(_) | Err(TransportError::ZeroRttRejected) => {}
        Err(e) => return Err(e),
    }
    tracing::debug!(remote = %conn.remote_address(), "0-RTT rejected; resending first message");
    let (writer, reader) = open_and_send(&conn, first).await?;
    Ok(Session {
        conn,
        writer,
        reader,
        zero_rtt_accepted: false,
    })
}

async fn open_and_send<T: Serialize>(
    conn: &quinn::Connection,
    first: &T,
) -> Result<(FrameWriter, FrameReader), TransportError> {
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FrameWriter::new(send);
    writer.send(first).await?;
    Ok((writer, FrameReader::new(recv)))
}

/// Completion of a server-side handshake that was accepted with 0-RTT. Resolves to
/// `Ok(())` once the client is authenticated, or to the error that ended the connection.
pub struct Handshake {
    conn: quinn::Connection,
    done: quinn::ZeroRttAccepted,
}

impl Future for Handshake {
    type Output = Result<(), TransportError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match Pin::new(&mut this.done).poll(cx) {
            Poll::Pending => Poll::Pending,
            // Server side, the value carries no meaning; it also resolves when the
            // connection dies mid-handshake, which only `close_reason` tells apart.
            Poll::Ready(_) => Poll::Ready(match this.conn.close_reason() {
                Some(e) => Err(e.into()),
                None => Ok(()),
            }),
        }
    }
}

/// An incoming connection, possibly still completing its handshake.
pub struct Accepted {
    /// The connection. Until `handshake` resolves, the client may not be authenticated
    /// yet and data from it may be replayed 0-RTT data: act only on idempotent messages.
    pub conn: quinn::Connection,
    /// `Some` while the handshake may still be in progress; resolves when it completes.
    /// `None` if it had already completed. [`Accepted::authenticate`] awaits it.
    pub handshake: Option<Handshake>,
}

/// Accepts an incoming connection with 0-RTT (0.5-RTT on the server side) enabled, so
/// streams a resuming client opened in its first flight can be read at once.
///
/// See the [module docs](self): process only idempotent messages until
/// [`Accepted::authenticate`] (or the `handshake` future) has succeeded, and check the
/// peer's role only after that.
pub async fn accept(incoming: quinn::Incoming) -> Result<Accepted, TransportError> {
    let remote = incoming.remote_address();
    let connecting = incoming.accept()?;
    match connecting.into_0rtt() {
        Ok((conn, done)) => {
            tracing::debug!(%remote, "accepted connection");
            Ok(Accepted {
                handshake: Some(Handshake {
                    conn: conn.clone(),
                    done,
                }),
                conn,
            })
        }
        // quinn documents that servers always get Ok; handle the other arm anyway by
        // completing the handshake, rather than assuming.
        Err(connecting) => Ok(Accepted {
            conn: connecting.await?,
            handshake: None,
        }),
    }
}

impl Accepted {
    /// Waits for the handshake to complete and returns the client's role. After this
    /// succeeds, everything received is authenticated and not a replay.
    pub async fn authenticate(&mut self) -> Result<Role, TransportError> {
        if let Some(handshake) = self.handshake.take() {
            handshake.await?;
        }
        peer_role(&self.conn)
    }

    /// Like [`Accepted::authenticate`], but fails with [`TransportError::WrongRole`] (and
    /// closes the connection) unless the client has role `expected`.
    pub async fn authenticate_as(&mut self, expected: Role) -> Result<(), TransportError> {
        let got = self.authenticate().await?;
        if got != expected {
            self.conn
                .close(quinn::VarInt::from_u32(WRONG_ROLE_CODE), b"wrong role");
            return Err(TransportError::WrongRole { expected, got });
        }
        Ok(())
    }

    /// Accepts the next bidirectional stream the client opens, as a framed pair. The
    /// first stream of a resuming client may carry 0-RTT data.
    pub async fn accept_stream(&self) -> Result<(FrameWriter, FrameReader), TransportError> {
        accept_stream(&self.conn).await
    }
}

/// Application close code used when a peer has the wrong role.
pub const WRONG_ROLE_CODE: u32 = 0x5701;

/// Application close code used when a peer's certificate is revoked (see
/// [`crate::tls::require_not_revoked`]).
pub const REVOKED_CODE: u32 = 0x5702;

/// Application close code used when a peer's certificate is no longer valid under the
/// CAs this node trusts (after a CA rotation, see [`crate::tls::close_when_distrusted`]).
pub const UNTRUSTED_CODE: u32 = 0x5706;

/// Accepts the next bidirectional stream the peer of `conn` opens, as a framed pair.
pub async fn accept_stream(
    conn: &quinn::Connection,
) -> Result<(FrameWriter, FrameReader), TransportError> {
    let (send, recv) = conn.accept_bi().await?;
    Ok((FrameWriter::new(send), FrameReader::new(recv)))
}
