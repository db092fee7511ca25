//! The HTTP embedder through a real coordinator: `--embedder http` against a mock
//! OpenAI-compatible `/v1/embeddings` server run inside this test process (the embedding
//! model is external to swarm, so it is the one thing mocked). Patterns, `text` points
//! and queries are embedded by the mock; a failing or wrong-dimension mock gives clear
//! errors and writes nothing; workers get an error answer, not silence.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{bin, free_tcp_port, free_udp_port, Cluster, WAIT};

/// Dimension of the mock's vectors.
const DIM: usize = 16;
/// The variable `--embedder-api-key-env` names, and the token in it.
const KEY_VAR: &str = "SWARM_E2E_EMBEDDER_KEY";
const KEY: &str = "sk-e2e-embedder-secret";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Deterministic vectors of `DIM` dimensions.
    Ok,
    /// HTTP 500.
    Fail,
    /// Vectors of `DIM - 1` dimensions.
    WrongDimension,
}

struct MockState {
    mode: Mode,
    /// Every text of every request, in order.
    inputs: Vec<String>,
    /// The `Authorization` header of every request.
    auth: Vec<Option<String>>,
    /// The `model` of every request.
    models: Vec<String>,
    /// Request lines that were not `POST /v1/embeddings`.
    unexpected: Vec<String>,
}

/// A mock OpenAI-compatible embeddings server on loopback.
struct MockEmbedder {
    url: String,
    state: Arc<Mutex<MockState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockEmbedder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockEmbedder {
    async fn start() -> MockEmbedder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr: SocketAddr = listener.local_addr().expect("mock address");
        let state = Arc::new(Mutex::new(MockState {
            mode: Mode::Ok,
            inputs: Vec::new(),
            auth: Vec::new(),
            models: Vec::new(),
            unexpected: Vec::new(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve_one(sock, &state).await;
                });
            }
        });
        MockEmbedder {
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    fn state(&self) -> MutexGuard<'_, MockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_mode(&self, mode: Mode) {
        self.state().mode = mode;
    }

    fn inputs(&self) -> Vec<String> {
        self.state().inputs.clone()
    }
}

/// The mock's vector for a text: FNV-1a of the text seeds xorshift64, components in
/// [-1, 1). Equal texts give equal vectors; different texts practically never do.
fn mock_vector(text: &str, dim: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h |= 1;
    (0..dim)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 request on `sock`, answered with `Connection: close`.
async fn serve_one(mut sock: TcpStream, state: &Mutex<MockState>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut content_length = 0usize;
    let mut auth = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("authorization") {
                auth = Some(value.to_string());
            }
        }
    }
    while buf.len() < head_end + content_length {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Value =
        serde_json::from_slice(&buf[head_end..head_end + content_length]).unwrap_or(Value::Null);

    let (status, answer) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        if !request_line.starts_with("POST /v1/embeddings ") {
            st.unexpected.push(request_line.clone());
            ("404 Not Found", json!({"error": "not found"}))
        } else {
            let texts: Vec<String> = body["input"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| t.as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            st.inputs.extend(texts.iter().cloned());
            st.auth.push(auth);
            st.models
                .push(body["model"].as_str().unwrap_or_default().to_string());
            match st.mode {
                Mode::Fail => (
                    "500 Internal Server Error",
                    json!({"error": {"message": "mock embedder is down"}}),
                ),
                Mode::Ok | Mode::WrongDimension => {
                    let dim = if st.mode == Mode::Ok { DIM } else { DIM - 1 };
                    let data: Vec<Value> = texts
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            json!({"object": "embedding", "index": i, "embedding": mock_vector(t, dim)})
                        })
                        .collect();
                    (
                        "200 OK",
                        json!({"object": "list", "data": data, "model": body["model"]}),
                    )
                }
            }
        }
    };
    let body = answer.to_string();
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
}

/// A coordinator process started here (the harness' cannot take extra environment
/// variables), killed on drop.
struct Coordinator(Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `swarm coordinator` as the harness runs it, with `args` and `env` added.
fn coordinator_command(c: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = c.coordinator_command();
    cmd.args(args).envs(env.iter().copied());
    cmd
}

fn http_embedder_args(mock: &MockEmbedder) -> Vec<String> {
    [
        "--embedder",
        "http",
        "--embedder-url",
        &mock.url,
        "--embedder-model",
        "mock-embed-1",
        "--embedder-dimension",
        &DIM.to_string(),
        "--embedder-api-key-env",
        KEY_VAR,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_http_coordinator(c: &Cluster, mock: &MockEmbedder) -> Coordinator {
    let args = http_embedder_args(mock);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Coordinator(
        coordinator_command(c, &args, &[(KEY_VAR, KEY)])
            .spawn()
            .expect("spawn coordinator"),
    )
}

async fn pattern_count(c: &Cluster) -> usize {
    let (st, v) = c.get("/v1/patterns").await;
    assert_eq!(st, 200, "{v}");
    v["patterns"].as_array().map_or(0, Vec::len)
}

async fn live_points(c: &Cluster, collection: &str) -> u64 {
    let (st, v) = c.get(&format!("/v1/memory/{collection}")).await;
    assert_eq!(st, 200, "{v}");
    v["live"].as_u64().expect("live count")
}

/// The text the coordinator embeds for a pattern.
fn pattern_text(title: &str, description: &str, content: &str) -> String {
    format!("{title}\n{description}\n{content}")
}

fn assert_error(st: u16, v: &Value, status: u16, code: &str, message_has: &str) {
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (status, Some(code)),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(message_has),
        "message should mention {message_has:?}: {v}"
    );
}

fn ids(v: &Value, list: &str, id: &str) -> Vec<String> {
    v[list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|h| {
                    h.pointer(id)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_embedder_embeds_texts_and_failures_write_nothing() {
    let mock = MockEmbedder::start().await;
    let mut c = Cluster::new(&[]);
    let mut coord = start_http_coordinator(&c, &mock);
    c.wait_ready().await;

    // Patterns given as text are embedded by the mock, with the bearer token from the
    // named variable and the configured model.
    let (st, v) = c
        .post(
            "/v1/patterns",
            json!({"items": [
                {"title": "Cache the cargo registry", "content": "mount ~/.cargo/registry as a CI cache", "outcome": "success"},
                {"title": "Avoid global locks", "description": "contention", "content": "a global mutex serialised all requests", "outcome": "failure"}
            ]}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let cache = pattern_text(
        "Cache the cargo registry",
        "",
        "mount ~/.cargo/registry as a CI cache",
    );
    let locks = pattern_text(
        "Avoid global locks",
        "contention",
        "a global mutex serialised all requests",
    );
    assert_eq!(mock.inputs(), [cache.clone(), locks.clone()]);
    {
        let st = mock.state();
        assert!(!st.auth.is_empty());
        for a in &st.auth {
            assert_eq!(a.as_deref(), Some(format!("Bearer {KEY}").as_str()));
        }
        assert!(
            st.models.iter().all(|m| m == "mock-embed-1"),
            "{:?}",
            st.models
        );
        assert!(st.unexpected.is_empty(), "{:?}", st.unexpected);
    }
    assert_eq!(pattern_count(&c).await, 2);

    // Retrieval embeds the query with the mock: the same text ranks its pattern first.
    for (query, title) in [
        (&locks, "Avoid global locks"),
        (&cache, "Cache the cargo registry"),
    ] {
        let (st, v) = c
            .post("/v1/patterns/retrieve", json!({"query": query, "k": 2}))
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["items"][0]["item"]["title"], title, "{v}");
        assert_eq!(mock.inputs().last(), Some(query));
    }

    // A collection of the embedder's dimension takes `text` points and `text` queries.
    let (st, v) = c
        .request(
            reqwest::Method::PUT,
            "/v1/memory/notes",
            Some(json!({"dimension": DIM})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let given = mock_vector("a vector given directly", DIM);
    let (st, v) = c
        .post(
            "/v1/memory/notes/points",
            json!({"points": [
                {"id": "n1", "text": "rotate the signing keys every quarter"},
                {"id": "n2", "vector": given},
                {"id": "n3", "text": "the staging database is read-only on fridays"}
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let seen = mock.inputs();
    assert!(
        seen.ends_with(&[
            "rotate the signing keys every quarter".to_string(),
            "the staging database is read-only on fridays".to_string()
        ]),
        "both texts embedded in one request, in order: {seen:?}"
    );
    assert_eq!(live_points(&c, "notes").await, 3);
    let (st, v) = c
        .post(
            "/v1/memory/notes/search",
            json!({"text": "the staging database is read-only on fridays", "k": 1, "exact": true}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(ids(&v, "hits", "/id"), ["n3"], "{v}");

    // The embedder fails: 502 embedder_unavailable with its message, nothing written.
    mock.set_mode(Mode::Fail);
    let asked = mock.inputs().len();
    let (st, v) = c
        .post(
            "/v1/patterns",
            json!({"items": [{"title": "Never stored", "content": "x", "outcome": "success"}]}),
        )
        .await;
    assert_error(st, &v, 502, "embedder_unavailable", "mock embedder is down");
    let (st, v) = c
        .post(
            "/v1/memory/notes/points",
            json!({"points": [{"id": "n4", "text": "never stored either"}, {"id": "n5", "vector": given}]}),
        )
        .await;
    assert_error(st, &v, 502, "embedder_unavailable", "HTTP 500");
    let (st, v) = c
        .post("/v1/patterns/retrieve", json!({"query": "anything"}))
        .await;
    assert_error(st, &v, 502, "embedder_unavailable", "mock embedder is down");
    let (st, v) = c
        .post("/v1/memory/notes/search", json!({"text": "anything"}))
        .await;
    assert_error(st, &v, 502, "embedder_unavailable", "mock embedder is down");
    assert_eq!(
        mock.inputs().len(),
        asked + 4,
        "every request reached the mock"
    );
    assert_eq!(pattern_count(&c).await, 2);
    assert_eq!(live_points(&c, "notes").await, 3);
    let (_, v) = c.get("/v1/patterns").await;
    assert!(!v.to_string().contains("Never stored"), "{v}");

    // Vectors of the wrong dimension: a clear error, nothing written.
    mock.set_mode(Mode::WrongDimension);
    let (st, v) = c
        .post(
            "/v1/patterns",
            json!({"items": [{"title": "Wrong size", "content": "y", "outcome": "success"}]}),
        )
        .await;
    assert_error(
        st,
        &v,
        502,
        "embedder_unavailable",
        &format!("expected dimension {DIM}, got {}", DIM - 1),
    );
    let (st, v) = c
        .post(
            "/v1/memory/notes/points",
            json!({"points": [{"id": "n6", "text": "wrong size too"}]}),
        )
        .await;
    assert_error(st, &v, 502, "embedder_unavailable", "dimension");
    assert_eq!(pattern_count(&c).await, 2);
    assert_eq!(live_points(&c, "notes").await, 3);

    // Workers: a task's payload is embedded by the mock for its patterns; when the mock
    // fails, the worker gets an error answer (and runs the agent without patterns).
    mock.set_mode(Mode::Ok);
    let agents = c.dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        r#"
[agents.reader]
command = "sh"
args = ["-c", '''if [ -n "$SWARM_PATTERNS_FILE" ]; then cat "$SWARM_PATTERNS_FILE"; else echo '{"patterns": []}'; fi''']
"#,
    )
    .expect("agents file");
    c.start_worker("w1", 2, Some(&agents));
    c.wait_workers(&["w1"]).await;
    let (_, out) = c
        .run_json_task(json!({"agent": "reader", "payload": locks, "patterns": 1}))
        .await;
    assert_eq!(out["patterns"][0]["title"], "Avoid global locks", "{out}");
    assert_eq!(mock.inputs().last(), Some(&locks));

    mock.set_mode(Mode::Fail);
    let (_, out) = c
        .run_json_task(
            json!({"agent": "reader", "payload": "no patterns for this one", "patterns": 1}),
        )
        .await;
    assert_eq!(out["patterns"], json!([]), "{out}");
    assert_eq!(
        mock.inputs().last().map(String::as_str),
        Some("no patterns for this one")
    );
    wait_for_log(
        &c.dir.path().join("w1.log"),
        "retrieval failed: embedder_unavailable",
        &c,
    )
    .await;

    // The pattern dimension is pinned to the data dir: the hash embedder (256
    // dimensions) is refused at startup, clearly.
    drop(coord);
    let out = coordinator_command(&c, &[], &[])
        .stderr(Stdio::piped())
        .output()
        .expect("run coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with another dimension: {err}"
    );
    assert!(
        err.contains(&format!("{DIM}-dimensional pattern embeddings"))
            && err.contains("the hash embedder (256 dimensions)"),
        "{err}"
    );
    // With the same embedder it comes back with everything.
    mock.set_mode(Mode::Ok);
    coord = start_http_coordinator(&c, &mock);
    c.wait_ready().await;
    assert_eq!(pattern_count(&c).await, 2);
    assert_eq!(live_points(&c, "notes").await, 3);
    drop(coord);
}

/// Poll `path` until it contains `needle`.
async fn wait_for_log(path: &Path, needle: &str, c: &Cluster) {
    let deadline = Instant::now() + WAIT;
    loop {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in {}\n{}",
            path.display(),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `swarm coordinator` with `args` until it exits (each of these fails before
/// serving anything) and returns its stderr.
fn coordinator_fails(c: &Cluster, args: &[&str]) -> String {
    let out = coordinator_command(c, args, &[])
        .env_remove(KEY_VAR)
        .stderr(Stdio::piped())
        .output()
        .expect("run coordinator");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "coordinator {args:?} should fail: {err}"
    );
    err
}

#[test]
fn bad_embedder_flags_fail_at_startup_with_clear_messages() {
    let c = Cluster::new(&[]);
    let url = "http://127.0.0.1:9";
    let http = ["--embedder", "http", "--embedder-url", url];
    let missing_key = format!("--embedder-api-key-env names {KEY_VAR}, which is not set");
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec!["--embedder", "http", "--embedder-dimension", "8"],
            "--embedder http needs --embedder-url",
        ),
        (http.to_vec(), "--embedder http needs --embedder-dimension"),
        (
            [&http[..], &["--embedder-dimension", "0"]].concat(),
            "--embedder-dimension must be greater than 0",
        ),
        (
            [
                &http[..],
                &[
                    "--embedder-dimension",
                    "8",
                    "--embedder-api-key-env",
                    KEY_VAR,
                ],
            ]
            .concat(),
            &missing_key,
        ),
        (
            vec!["--embedder-url", url],
            "--embedder-url is only used with --embedder http",
        ),
        (vec!["--embedder", "word2vec"], "word2vec"),
    ];
    for (args, want) in &cases {
        let err = coordinator_fails(&c, args);
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    // None of them created any state.
    assert!(!c.dir.path().join("coordinator").exists());
}

/// A node started with another embedder than the cluster's is refused when it asks to
/// join (it would replay pattern ops into a ReasoningBank of another dimension and
/// diverge): the process exits with the cluster's reason, and the cluster is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_embedder_is_refused_at_join() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let (api_port, quic_port) = (free_tcp_port(), free_udp_port());
    let mut joiner = Command::new(bin())
        .arg("coordinator")
        .args(["--id", "2", "--join", &c.api])
        .arg("--data-dir")
        .arg(c.dir.path().join("node2"))
        .arg("--certs")
        .arg(&c.certs)
        .args(["--listen", &format!("127.0.0.1:{quic_port}")])
        .args(["--advertise", &format!("localhost:{quic_port}")])
        .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
        .arg("--token-file")
        .arg(c.dir.path().join("token"))
        .args(["--embedder", "http", "--embedder-url", "http://127.0.0.1:9"])
        .args(["--embedder-dimension", "16"])
        .env("SWARM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn joining coordinator");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = joiner.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the refused node kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut joiner.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("embedder_dimension_mismatch"), "{err}");
    assert!(err.contains("16 dimensions"), "{err}");
    let (st, v) = c.get("/v1/cluster").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(1), "{v}");
}
