//! The production network stack over turmoil's simulated network: QUIC (quinn) over
//! simulated UDP, the HTTP API (axum) and HTTP clients (hyper) over simulated TCP.
//!
//! Everything here must run inside a turmoil host or client: the sockets find their
//! simulated host through turmoil's thread-local world.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::TryStreamExt as _;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use swarm_coordinator::cluster::{BodyStream, OpenResult, PeerHttp};

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A [`quinn::AsyncUdpSocket`] over a [`turmoil::net::UdpSocket`].
///
/// Sends never block (turmoil's UDP has no back-pressure; a full receive queue drops the
/// datagram, which QUIC treats as loss). Receiving waits on turmoil's readiness future,
/// kept between polls.
pub struct SimUdpSocket {
    sock: Arc<turmoil::net::UdpSocket>,
    /// The pending readiness wait, if the last receive found the queue empty.
    readable: Mutex<Option<Readable>>,
}

impl std::fmt::Debug for SimUdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimUdpSocket")
            .field("sock", &self.sock)
            .finish_non_exhaustive()
    }
}

impl SimUdpSocket {
    /// Bind `addr` (`0.0.0.0:port`; port 0 picks an ephemeral one) on the current host.
    pub async fn bind(addr: SocketAddr) -> io::Result<Arc<Self>> {
        let sock = turmoil::net::UdpSocket::bind(addr).await?;
        Ok(Arc::new(SimUdpSocket {
            sock: Arc::new(sock),
            readable: Mutex::new(None),
        }))
    }
}

/// turmoil sockets are always writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // `max_transmit_segments` is 1, so each transmit is exactly one datagram.
        self.sock
            .try_send_to(transmit.contents, transmit.destination)
            .map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut readable = self.readable.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(wait) = readable.as_mut() {
                match wait.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => {
                        *readable = None;
                        r?;
                    }
                }
            }
            let mut n = 0;
            for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
                match self.sock.try_recv_from(buf) {
                    Ok((len, addr)) => {
                        *meta = RecvMeta {
                            addr,
                            len,
                            stride: len,
                            ecn: None,
                            dst_ip: None,
                        };
                        n += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if n == 0 => return Poll::Ready(Err(e)),
                    Err(_) => break,
                }
            }
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            let sock = self.sock.clone();
            *readable = Some(Box::pin(async move { sock.readable().await }));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

/// A QUIC endpoint on `addr` of the current simulated host; with `server` it accepts
/// connections too. `rng_seed` makes quinn's own randomness replayable.
pub async fn quic_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    rng_seed: u64,
) -> anyhow::Result<quinn::Endpoint> {
    let sock = SimUdpSocket::bind(addr).await?;
    let mut seed = [0u8; 32];
    for (i, chunk) in seed.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&rng_seed.wrapping_add(i as u64).to_le_bytes());
    }
    swarm_transport::endpoint_on(sock, Arc::new(quinn::TokioRuntime), server, Some(seed))
}

/// A [`turmoil::net::TcpListener`] that axum can serve on.
pub struct SimListener(pub turmoil::net::TcpListener);

impl SimListener {
    /// Listen on `addr` (`0.0.0.0:port`) of the current simulated host.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(SimListener(turmoil::net::TcpListener::bind(addr).await?))
    }
}

impl axum::serve::Listener for SimListener {
    type Io = turmoil::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                // As axum does for real listeners: back off briefly and go on.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// One HTTP/1 exchange with `addr` on a fresh simulated TCP connection; the whole answer
/// is read. `req`'s URI may be absolute or a path.
pub async fn http_exchange(
    addr: SocketAddr,
    req: http::Request<Bytes>,
) -> Result<http::Response<Bytes>, String> {
    let (head, body) = http_open(addr, req).await?.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("answer from {addr}: {e}"))?
        .to_bytes();
    Ok(http::Response::from_parts(head, bytes))
}

/// One HTTP/1 request to `addr` on a fresh simulated TCP connection: the answer once its
/// head arrived, its body still coming.
async fn http_open(
    addr: SocketAddr,
    req: http::Request<Bytes>,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let stream = turmoil::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake with {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    // Origin form on the wire, with the authority as Host.
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = path
        .parse()
        .map_err(|e| format!("bad path {path:?}: {e}"))?;
    parts.headers.insert(
        http::header::HOST,
        http::HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?,
    );
    sender
        .send_request(http::Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(|e| format!("request to {addr}: {e}"))
}

/// [`PeerHttp`] over the simulated network: how coordinators forward to the leader.
#[derive(Debug, Default)]
pub struct SimPeerHttp;

impl PeerHttp for SimPeerHttp {
    fn send(
        &self,
        req: http::Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<http::Response<Bytes>, String>> {
        Box::pin(async move {
            let addr = authority_addr(&req)?;
            tokio::time::timeout(timeout, http_exchange(addr, req))
                .await
                .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
        })
    }

    fn open(&self, req: http::Request<Bytes>, timeout: Duration) -> BoxFuture<'static, OpenResult> {
        Box::pin(async move {
            let addr = authority_addr(&req)?;
            let resp = tokio::time::timeout(timeout, http_open(addr, req))
                .await
                .map_err(|_| format!("no answer from {addr} within {timeout:?}"))??;
            let (head, body) = resp.into_parts();
            let body: BodyStream = Box::pin(body.into_data_stream().map_err(std::io::Error::other));
            Ok(http::Response::from_parts(head, body))
        })
    }
}

fn authority_addr(req: &http::Request<Bytes>) -> Result<SocketAddr, String> {
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| format!("no host in {}", req.uri()))?;
    authority
        .as_str()
        .parse()
        .map_err(|e| format!("{authority} is not an address: {e}"))
}
