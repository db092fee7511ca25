//! A small client for the coordinators' HTTP API, used by every CLI command that talks
//! to a running cluster.
//!
//! It takes one or more API addresses of the same cluster. Any node answers any request
//! (followers forward to the leader), so the client only moves on when a node cannot
//! have done what was asked: it could not be reached at all, or it answered `not_leader`
//! (then the leader it names is tried first). A request that may have reached the
//! cluster is never sent twice, except reads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Context};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use swarm_proto::api::{
    AddNode, ClusterView, ErrorBody, StatusView, SubmitResponse, SubmitTask, TaskList, TaskView,
};

/// An API error with its stable code, so callers can branch on it.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// What [`Client::list`] asks for: a page of tasks, in which order, and the filters.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub limit: usize,
    /// The last id of the previous page, in this order.
    pub after: Option<u64>,
    /// Newest first.
    pub desc: bool,
    pub state: Option<String>,
    pub agent: Option<String>,
    pub swarm: Option<String>,
    /// `k=v` each (sent comma-separated: none may hold a comma).
    pub labels: Vec<String>,
    pub text: Option<String>,
}

/// Talks to a cluster through any of its nodes' APIs.
pub struct Client {
    bases: Mutex<Vec<String>>,
    /// Index into `bases` of the node that answered last.
    current: AtomicUsize,
    token: String,
    http: reqwest::Client,
}

/// One try's outcome.
enum Try<T> {
    Done(anyhow::Result<T>),
    /// The request did not take effect here; try `next` (or the next base).
    Elsewhere {
        next: Option<String>,
        why: anyhow::Error,
    },
}

fn normalise(base: &str) -> anyhow::Result<String> {
    let base = base.trim().trim_end_matches('/').to_string();
    if !base.starts_with("http://") && !base.starts_with("https://") {
        anyhow::bail!("--api must be an http:// or https:// URL, got {base:?}");
    }
    Ok(base)
}

/// Finishes `builder`: trusts only the cluster CA in `ca` (no system roots: a swarm
/// API's certificate is always the cluster's). An `https` API without a CA is an error.
pub fn http_client(
    builder: reqwest::ClientBuilder,
    ca: Option<&std::path::Path>,
    https: bool,
) -> anyhow::Result<reqwest::Client> {
    let builder = builder.tls_built_in_root_certs(false);
    let builder = match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the cluster CA {}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} holds no usable CA certificate", path.display()))?;
            builder.add_root_certificate(cert)
        }
        None if https => anyhow::bail!(
            "an https:// API is verified against the cluster CA: pass --ca (or SWARM_CA) with its ca.pem"
        ),
        None => builder,
    };
    builder.build().context("build HTTP client")
}

impl Client {
    /// `bases`: comma-separated API URLs of nodes of one cluster; `ca`: the cluster CA
    /// certificate an `https://` API is verified against.
    pub fn new(bases: &str, token: String, ca: Option<&std::path::Path>) -> anyhow::Result<Client> {
        let bases = bases
            .split(',')
            .filter(|b| !b.trim().is_empty())
            .map(normalise)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if bases.is_empty() {
            anyhow::bail!("--api is empty");
        }
        let https = bases.iter().any(|b| b.starts_with("https://"));
        let http = http_client(
            reqwest::Client::builder().connect_timeout(Duration::from_secs(3)),
            ca,
            https,
        )?;
        Ok(Client {
            bases: Mutex::new(bases),
            current: AtomicUsize::new(0),
            token,
            http,
        })
    }

    fn bases(&self) -> Vec<String> {
        self.bases.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Send `method path?query` with an optional JSON body to the cluster; parse the
    /// JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let bytes = self
            .call_raw(method, path, query, body, "application/json")
            .await?;
        serde_json::from_slice(&bytes).context("unexpected API response")
    }

    /// Like [`Client::call`], with a body of `content_type` and the raw answer.
    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let body = || Ok(body.clone().map(|b| (reqwest::Body::from(b), content_type)));
        let resp = self.route(&method, path, query, body).await?;
        let bytes = resp.bytes().await.context("read API response")?;
        Ok(bytes.to_vec())
    }

    /// Send the request to the nodes in turn, starting with the one that answered last,
    /// until one answers: `make_body` makes the body afresh for every try. Moves on only
    /// when the request cannot have taken effect (no connection, or `not_leader`, whose
    /// leader is tried next; reads also on `unavailable` or a timeout). Returns the
    /// successful response unread.
    async fn route<'a>(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        make_body: impl Fn() -> anyhow::Result<Option<(reqwest::Body, &'a str)>>,
    ) -> anyhow::Result<reqwest::Response> {
        let bases = self.bases();
        let start = self.current.load(Ordering::Relaxed);
        let mut order: Vec<String> = (0..bases.len())
            .map(|i| bases[(start + i) % bases.len()].clone())
            .collect();
        let mut last_err = None;
        let mut tried = 0usize;
        while tried < order.len() && tried < 8 {
            let base = order[tried].clone();
            tried += 1;
            match self
                .try_once(&base, method, path, query, make_body()?)
                .await
            {
                Try::Done(r) => {
                    if let Some(i) = bases.iter().position(|b| *b == base) {
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return r;
                }
                Try::Elsewhere { next, why } => {
                    if let Some(n) = next.and_then(|n| normalise(&format!("http://{n}")).ok()) {
                        if !order[..tried].contains(&n) {
                            order.insert(tried, n);
                        }
                    }
                    last_err = Some(why);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("no API address to try")))
    }

    async fn try_once(
        &self,
        base: &str,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(reqwest::Body, &str)>,
    ) -> Try<reqwest::Response> {
        let mut req = self
            .http
            .request(method.clone(), format!("{base}{path}"))
            .bearer_auth(&self.token);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some((b, content_type)) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            // Not connected: the request never reached this node.
            Err(e) if e.is_connect() || (method == Method::GET && e.is_timeout()) => {
                return Try::Elsewhere {
                    next: None,
                    why: anyhow::Error::new(e)
                        .context(format!("cannot reach the swarm API at {base}")),
                }
            }
            Err(e) => {
                return Try::Done(Err(anyhow::Error::new(e)
                    .context(format!("request to the swarm API at {base} failed"))))
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Try::Done(Ok(resp));
        }
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Try::Done(Err(anyhow::Error::new(e).context("read API response"))),
        };
        let err = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => b.error,
            Err(_) => {
                return Try::Done(Err(anyhow!(
                    "API answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )))
            }
        };
        let api_err = ApiError {
            status: status.as_u16(),
            code: err.code.clone(),
            message: err.message.clone(),
        };
        // `not_leader` means nothing was done here; reads may also move on when a node
        // cannot answer right now.
        if err.code == "not_leader" || (method == Method::GET && err.code == "unavailable") {
            return Try::Elsewhere {
                next: err.leader_api,
                why: anyhow!(api_err),
            };
        }
        Try::Done(Err(anyhow!(api_err)))
    }

    fn encode<B: Serialize>(body: &B) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(Some(serde_json::to_vec(body).context("encode request")?))
    }

    pub async fn submit(
        &self,
        task: &SubmitTask,
        wait: Option<&str>,
    ) -> anyhow::Result<SubmitResponse> {
        let mut q = Vec::new();
        if let Some(w) = wait {
            q.push(("wait", w.to_string()));
        }
        self.call(Method::POST, "/v1/tasks", &q, Self::encode(task)?)
            .await
    }

    pub async fn task(&self, id: u64, wait: Option<&str>) -> anyhow::Result<TaskView> {
        let mut q = Vec::new();
        if let Some(w) = wait {
            q.push(("wait", w.to_string()));
        }
        self.call(Method::GET, &format!("/v1/tasks/{id}"), &q, None)
            .await
    }

    /// One page of tasks (`GET /v1/tasks`, see [`TaskList`] for the query).
    pub async fn list(&self, query: &ListQuery) -> anyhow::Result<TaskList> {
        let mut q = vec![("limit", query.limit.to_string())];
        if query.desc {
            q.push(("order", "desc".to_string()));
        }
        let text = [
            ("after", query.after.map(|a| a.to_string())),
            ("state", query.state.clone()),
            ("agent", query.agent.clone()),
            ("swarm", query.swarm.clone()),
            ("text", query.text.clone()),
        ];
        q.extend(text.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        if !query.labels.is_empty() {
            q.push(("label", query.labels.join(",")));
        }
        self.call(Method::GET, "/v1/tasks", &q, None).await
    }

    /// The cluster's event stream (`GET /v1/events`, Server-Sent Events), from the
    /// position `last_event_id` names if given; the answer is returned unread.
    pub async fn cluster_events(
        &self,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<reqwest::Response> {
        let q: Vec<(&str, String)> = last_event_id
            .map(|l| ("last_event_id", l.to_string()))
            .into_iter()
            .collect();
        self.route(&Method::GET, "/v1/events", &q, || Ok(None))
            .await
    }

    /// The log tails stored with task `id`'s attempts.
    pub async fn logs(&self, id: u64) -> anyhow::Result<swarm_proto::api::TaskLogs> {
        self.call(Method::GET, &format!("/v1/tasks/{id}/logs"), &[], None)
            .await
    }

    /// Task `id`'s event stream (Server-Sent Events), from the position `last_event_id`
    /// names if given; the answer is returned unread, its body still coming.
    pub async fn events(
        &self,
        id: u64,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<reqwest::Response> {
        let q: Vec<(&str, String)> = last_event_id
            .map(|l| ("last_event_id", l.to_string()))
            .into_iter()
            .collect();
        self.route(&Method::GET, &format!("/v1/tasks/{id}/events"), &q, || {
            Ok(None)
        })
        .await
    }

    pub async fn cancel(&self, id: u64) -> anyhow::Result<TaskView> {
        self.call(Method::POST, &format!("/v1/tasks/{id}/cancel"), &[], None)
            .await
    }

    /// `POST /v1/tasks/{id}/approve` (`approve`) or `/reject`, with an optional comment.
    pub async fn decide(
        &self,
        id: u64,
        approve: bool,
        comment: Option<String>,
    ) -> anyhow::Result<TaskView> {
        let verb = if approve { "approve" } else { "reject" };
        let body = Self::encode(&swarm_proto::api::ApprovalDecision { comment })?;
        self.call(Method::POST, &format!("/v1/tasks/{id}/{verb}"), &[], body)
            .await
    }

    /// `POST /v1/tasks/{id}/retry`.
    pub async fn retry(&self, id: u64) -> anyhow::Result<TaskView> {
        self.call(Method::POST, &format!("/v1/tasks/{id}/retry"), &[], None)
            .await
    }

    /// Any JSON endpoint (used by the memory and pattern commands).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let body = match body {
            Some(b) => Self::encode(b)?,
            None => None,
        };
        self.call(method, path, &[], body).await
    }

    /// `GET /v1/backup`, streamed into `out`; `progress` is told the bytes received so
    /// far. Returns the bytes written and the log index the backup reflects.
    pub async fn backup_into(
        &self,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
        mut progress: impl FnMut(u64),
    ) -> anyhow::Result<(u64, u64)> {
        use tokio::io::AsyncWriteExt as _;
        let mut resp = self
            .route(&Method::GET, "/v1/backup", &[], || Ok(None))
            .await?;
        let index = resp
            .headers()
            .get("x-swarm-backup-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut n = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .context("the backup stream broke (the file is incomplete)")?
        {
            out.write_all(&chunk).await.context("writing the backup")?;
            n += chunk.len() as u64;
            progress(n);
        }
        Ok((n, index))
    }

    /// `POST /v1/restore`, streaming the backup file at `from`; `progress` is told the
    /// bytes sent so far. Returns the cluster's summary of what was restored.
    pub async fn restore_from(
        &self,
        from: &std::path::Path,
        progress: impl Fn(u64) + Clone + Send + Sync + 'static,
    ) -> anyhow::Result<serde_json::Value> {
        let path = from.to_path_buf();
        let body = move || -> anyhow::Result<Option<(reqwest::Body, &str)>> {
            let file = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let file = tokio::fs::File::from_std(file);
            let progress = progress.clone();
            let stream = futures::stream::unfold((file, 0u64), move |(mut file, sent)| {
                let progress = progress.clone();
                async move {
                    use tokio::io::AsyncReadExt as _;
                    let mut buf = vec![0u8; 1 << 20];
                    match file.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            let sent = sent + n as u64;
                            progress(sent);
                            Some((
                                Ok::<_, std::io::Error>(bytes::Bytes::from(buf)),
                                (file, sent),
                            ))
                        }
                        Err(e) => Some((Err(e), (file, sent))),
                    }
                }
            });
            Ok(Some((
                reqwest::Body::wrap_stream(stream),
                "application/octet-stream",
            )))
        };
        let resp = self.route(&Method::POST, "/v1/restore", &[], body).await?;
        let bytes = resp.bytes().await.context("read API response")?;
        serde_json::from_slice(&bytes).context("unexpected API response")
    }

    pub async fn swarms(&self) -> anyhow::Result<swarm_proto::api::SwarmList> {
        self.call(Method::GET, "/v1/swarms", &[], None).await
    }

    pub async fn swarm(&self, name: &str) -> anyhow::Result<swarm_proto::api::SwarmView> {
        self.call(Method::GET, &format!("/v1/swarms/{}", seg(name)), &[], None)
            .await
    }

    pub async fn create_swarm(
        &self,
        req: &swarm_proto::api::CreateSwarm,
    ) -> anyhow::Result<swarm_proto::api::SwarmView> {
        self.call(Method::POST, "/v1/swarms", &[], Self::encode(req)?)
            .await
    }

    pub async fn limits(&self) -> anyhow::Result<swarm_proto::api::LimitList> {
        self.call(Method::GET, "/v1/limits", &[], None).await
    }

    pub async fn set_limit(
        &self,
        name: &str,
        req: &swarm_proto::api::SetLimit,
    ) -> anyhow::Result<swarm_proto::api::LimitView> {
        let path = format!("/v1/limits/{}", seg(name));
        self.call(Method::PUT, &path, &[], Self::encode(req)?).await
    }

    pub async fn delete_limit(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/v1/limits/{}", seg(name));
        self.call_raw(Method::DELETE, &path, &[], None, "application/json")
            .await
            .map(|_| ())
    }

    pub async fn schedules(&self) -> anyhow::Result<swarm_proto::api::ScheduleList> {
        self.call(Method::GET, "/v1/schedules", &[], None).await
    }

    pub async fn schedule(&self, name: &str) -> anyhow::Result<swarm_proto::api::ScheduleView> {
        self.call(
            Method::GET,
            &format!("/v1/schedules/{}", seg(name)),
            &[],
            None,
        )
        .await
    }

    pub async fn create_schedule(
        &self,
        req: &swarm_proto::api::CreateSchedule,
    ) -> anyhow::Result<swarm_proto::api::ScheduleView> {
        self.call(Method::POST, "/v1/schedules", &[], Self::encode(req)?)
            .await
    }

    /// Pause (`pause`) or resume a schedule.
    pub async fn pause_schedule(
        &self,
        name: &str,
        pause: bool,
    ) -> anyhow::Result<swarm_proto::api::ScheduleView> {
        let verb = if pause { "pause" } else { "resume" };
        let path = format!("/v1/schedules/{}/{verb}", seg(name));
        self.call(Method::POST, &path, &[], None).await
    }

    pub async fn delete_schedule(&self, name: &str) -> anyhow::Result<()> {
        self.call_raw(
            Method::DELETE,
            &format!("/v1/schedules/{}", seg(name)),
            &[],
            None,
            "application/json",
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_swarm(&self, name: &str) -> anyhow::Result<()> {
        self.call_raw(
            Method::DELETE,
            &format!("/v1/swarms/{}", seg(name)),
            &[],
            None,
            "application/json",
        )
        .await
        .map(|_| ())
    }

    pub async fn create_token(
        &self,
        req: &swarm_proto::api::CreateToken,
    ) -> anyhow::Result<swarm_proto::api::CreatedToken> {
        self.call(Method::POST, "/v1/tokens", &[], Self::encode(req)?)
            .await
    }

    pub async fn tokens(&self) -> anyhow::Result<swarm_proto::api::TokenList> {
        self.call(Method::GET, "/v1/tokens", &[], None).await
    }

    pub async fn revoke_token(&self, token: &str) -> anyhow::Result<()> {
        self.call_raw(
            Method::DELETE,
            &format!("/v1/tokens/{}", seg(token)),
            &[],
            None,
            "application/json",
        )
        .await
        .map(|_| ())
    }

    pub async fn revoke_cert(&self, req: &swarm_proto::api::RevokeCert) -> anyhow::Result<()> {
        self.call_raw(
            Method::POST,
            "/v1/certs/revoked",
            &[],
            Self::encode(req)?,
            "application/json",
        )
        .await
        .map(|_| ())
    }

    pub async fn enroll(
        &self,
        req: &swarm_proto::api::EnrollRequest,
    ) -> anyhow::Result<swarm_proto::api::EnrollResponse> {
        self.call(Method::POST, "/v1/certs/enroll", &[], Self::encode(req)?)
            .await
    }

    pub async fn revoked_certs(&self) -> anyhow::Result<swarm_proto::api::RevokedList> {
        self.call(Method::GET, "/v1/certs/revoked", &[], None).await
    }

    pub async fn status(&self) -> anyhow::Result<StatusView> {
        self.call(Method::GET, "/v1/status", &[], None).await
    }

    pub async fn workers(&self) -> anyhow::Result<swarm_proto::api::WorkerList> {
        self.call(Method::GET, "/v1/workers", &[], None).await
    }

    /// `POST /v1/workers/{id}/drain` (`on`) or `/resume`: the worker's view.
    pub async fn drain_worker(
        &self,
        id: &str,
        on: bool,
    ) -> anyhow::Result<swarm_proto::api::WorkerView> {
        let action = if on { "drain" } else { "resume" };
        self.call(
            Method::POST,
            &format!("/v1/workers/{}/{action}", seg(id)),
            &[],
            None,
        )
        .await
    }

    pub async fn cluster(&self) -> anyhow::Result<ClusterView> {
        self.call(Method::GET, "/v1/cluster", &[], None).await
    }

    pub async fn add_node(&self, add: &AddNode) -> anyhow::Result<ClusterView> {
        self.call(Method::POST, "/v1/cluster/nodes", &[], Self::encode(add)?)
            .await
    }

    pub async fn remove_node(&self, id: u64) -> anyhow::Result<ClusterView> {
        self.call(
            Method::DELETE,
            &format!("/v1/cluster/nodes/{id}"),
            &[],
            None,
        )
        .await
    }
}

/// A path segment with the characters that would change the path escaped.
pub fn seg(s: &str) -> String {
    s.replace('%', "%25")
        .replace('/', "%2F")
        .replace('?', "%3F")
        .replace('#', "%23")
}
