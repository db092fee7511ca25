//! A mock HTTP endpoint for `http` agents (axum on 127.0.0.1:0), any method, behaviour
//! by path: `/echo` (200 `got: <body>`), `/created` (201 `made`), `/fail` (503 with a
//! long body ending in [`FAIL_END`]), `/slow` (answers after a minute), `/hang` (200, a
//! first chunk, then a byte every 50 ms forever), `/big` (200 with 1 MiB, length
//! announced), `/big-chunked` (200 with 1 MiB in 1 KiB chunks, length not announced). It
//! records every request and counts the bodies whose client went away.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use futures::StreamExt as _;
use tokio::sync::watch;

/// How the body of `/fail` ends.
pub const FAIL_END: &str = "the end of the error";

/// One request as the server got it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    requests: Mutex<Vec<Recorded>>,
    arrived: watch::Sender<u32>,
    dropped: watch::Sender<u32>,
}

/// A running mock endpoint (stops with the test's runtime).
pub struct MockHttp {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl MockHttp {
    pub async fn start() -> MockHttp {
        let inner = Arc::new(Inner::default());
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockHttp { addr, inner }
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// Waits (at most `limit`) until `n` requests arrived.
    pub async fn wait_arrived(&self, n: u32, limit: Duration) {
        let mut rx = self.inner.arrived.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|a| *a >= n))
            .await
            .expect("the request never arrived")
            .unwrap();
    }

    /// Waits (at most `limit`) until `n` response bodies saw their client go away.
    pub async fn wait_dropped(&self, n: u32, limit: Duration) {
        let mut rx = self.inner.dropped.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|d| *d >= n))
            .await
            .expect("the server never saw the client go away")
            .unwrap();
    }
}

/// Counts the end of a body the client left.
struct DropGuard(Arc<Inner>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.dropped.send_modify(|d| *d += 1);
    }
}

fn respond(status: StatusCode, body: Body) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(body)
        .unwrap()
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    inner.requests.lock().unwrap().push(Recorded {
        method,
        path: uri.path().to_owned(),
        headers,
        body: body.to_vec(),
    });
    inner.arrived.send_modify(|a| *a += 1);
    match uri.path() {
        "/echo" => {
            let mut out = b"got: ".to_vec();
            out.extend_from_slice(&body);
            respond(StatusCode::OK, Body::from(out))
        }
        "/created" => respond(StatusCode::CREATED, Body::from("made")),
        "/fail" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            Body::from(format!("{}{FAIL_END}\n", "x".repeat(1500))),
        ),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            respond(StatusCode::OK, Body::from("late"))
        }
        "/hang" => {
            let rest = futures::stream::unfold(DropGuard(inner.clone()), |guard| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok(Bytes::from_static(b".")), guard))
            });
            let s = futures::stream::once(async {
                Ok::<_, std::io::Error>(Bytes::from_static(b"part;"))
            })
            .chain(rest);
            respond(StatusCode::OK, Body::from_stream(s))
        }
        "/big" => respond(StatusCode::OK, Body::from(vec![b'z'; 1 << 20])),
        "/big-chunked" => {
            let s = futures::stream::iter(
                (0..1024).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'z'; 1024]))),
            );
            respond(StatusCode::OK, Body::from_stream(s))
        }
        _ => respond(StatusCode::NOT_FOUND, Body::from("no such path")),
    }
}
