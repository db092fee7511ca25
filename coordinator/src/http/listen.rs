//! The API's edge: accepting connections, TLS, and the limits that keep a slow or idle
//! client from taking the API down for everyone else.
//!
//! * At most [`Edges::max_connections`] connections are open at once; one more is
//!   closed at once (counted in `swarm_http_connections_refused_total`), so no amount of
//!   idle sockets exhausts the process's file descriptors or memory.
//! * A client has [`Edges::header_timeout`] to finish its TLS handshake, and the same to
//!   send each request's headers (hyper's header-read timer, which axum's own `serve`
//!   leaves off) and between two pieces of a request body: a slowloris client is cut
//!   off, in its headers or its body; an idle keep-alive connection is closed.
//! * With TLS, a client may present a cluster certificate (optional client auth): a
//!   coordinator forwarding a request to the leader proves itself that way, never with a
//!   client's token. [`PeerCert`] tells the handlers who it is.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt as _;
use tower_http::timeout::TimeoutBody;
use tracing::{debug, info};

/// How long in-flight requests get to finish once shutdown begins.
const DRAIN: Duration = Duration::from_secs(5);

/// The limits and TLS of an API listener.
#[derive(Clone)]
pub struct Edges {
    /// Serve HTTPS with this configuration; `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake and for each request's headers.
    pub header_timeout: Duration,
}

impl std::fmt::Debug for Edges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edges")
            .field("tls", &self.tls.is_some())
            .field("max_connections", &self.max_connections)
            .field("header_timeout", &self.header_timeout)
            .finish()
    }
}

/// Who the client's certificate (TLS client auth) says it is, in every request's
/// extensions; absent without one.
#[derive(Debug, Clone)]
pub struct PeerCert(pub swarm_transport::CertSubject);

/// Serves `app` on `listener` within `edges` until `shutdown` changes (or is dropped),
/// then lets in-flight requests finish for a short while.
pub async fn serve_edges<L>(
    mut listener: L,
    app: Router,
    edges: Edges,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
{
    let permits = Arc::new(Semaphore::new(edges.max_connections.max(1)));
    let acceptor = edges.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    loop {
        // Biased: a deterministic simulation replays this loop exactly.
        let (io, remote) = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("swarm_http_connections_refused_total").increment(1);
            debug!(%remote, "API connection refused: at the connection limit");
            drop(io);
            continue;
        };
        let app = app.clone();
        let timeout = edges.header_timeout;
        let watcher = graceful.watcher();
        match acceptor.clone() {
            None => {
                tokio::spawn(async move {
                    serve_conn(io, app, None, timeout, watcher).await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            metrics::counter!("swarm_http_tls_failures_total").increment(1);
                            debug!(%remote, "API TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            metrics::counter!("swarm_http_tls_failures_total").increment(1);
                            debug!(%remote, "API TLS handshake timed out");
                            return;
                        }
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| swarm_transport::CertSubject::from_cert_der(leaf).ok())
                        .map(PeerCert);
                    serve_conn(tls, app, peer, timeout, watcher).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        biased;
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN) => info!("API shutdown: requests still running were cut off"),
    }
    Ok(())
}

/// One connection, HTTP/1.1, its header-read timer on.
async fn serve_conn<I>(
    io: I,
    app: Router,
    peer: Option<PeerCert>,
    header_timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        if let Some(p) = &peer {
            req.extensions_mut().insert(p.clone());
        }
        // A body must keep coming: a pause longer than the header timeout fails the
        // read (the handler answers an error and the connection closes).
        let req = req.map(|b| axum::body::Body::new(TimeoutBody::new(header_timeout, b)));
        app.clone().oneshot(req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        debug!("API connection ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn start(edges: Edges) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve_edges(listener, app, edges, rx));
        (addr, tx)
    }

    /// Reads until the server closes the connection; the bytes read.
    async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return all,
                Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
                Err(_) => panic!("the server kept the connection open"),
            }
        }
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&until_closed(&mut s).await).into_owned()
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_and_the_others_are_served() {
        let (addr, _stop) = start(Edges {
            tls: None,
            max_connections: 2,
            header_timeout: Duration::from_secs(30),
        })
        .await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        // The third is closed at once, without an answer.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(until_closed(&mut c).await.is_empty());
        // Freeing a slot lets the next one in.
        drop(_a);
        let mut answer = String::new();
        for _ in 0..100 {
            answer = get(addr).await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn a_body_that_stops_coming_is_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        );
        let (_stop, rx) = watch::channel(false);
        let edges = Edges {
            tls: None,
            max_connections: 16,
            header_timeout: Duration::from_millis(300),
        };
        tokio::spawn(serve_edges(listener, app, edges, rx));
        // A whole body is read.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nabcd",
        )
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with('4'),
            "{text}"
        );
        // One that announces 1,000 bytes, sends 10 and stalls, gets an error and is
        // closed instead of holding the connection.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 4"),
            "a stalled body was not refused: {text}"
        );
    }

    #[tokio::test]
    async fn slow_and_idle_clients_are_cut_off_and_do_not_block_others() {
        let (addr, _stop) = start(Edges {
            tls: None,
            max_connections: 1024,
            header_timeout: Duration::from_millis(500),
        })
        .await;
        // 500 idle connections and 50 slowloris clients, as in the issue.
        let mut idle = Vec::new();
        for _ in 0..500 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut slow = Vec::new();
        for _ in 0..50 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            slow.push(s);
        }
        // A normal request meanwhile is answered.
        assert!(get(addr).await.starts_with("HTTP/1.1 200"));
        // The slow ones drip a header line now and then; all are closed by the server.
        let drip = async {
            for _ in 0..20 {
                for s in &mut slow {
                    let _ = s.write_all(b"x-a: b\r\n").await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        drip.await;
        for s in idle.iter_mut().chain(slow.iter_mut()) {
            let got = until_closed(s).await;
            // Cut off: nothing, or a 408 hyper writes before closing.
            let text = String::from_utf8_lossy(&got);
            assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
        }
    }
}
