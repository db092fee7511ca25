//! Live output, end to end: an exec agent's lines reach `swarm task logs -f` and SSE
//! watchers while the task runs, the tail is stored with the attempt, and a watcher
//! that stops reading holds up neither the task nor the other watchers.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use serde_json::{json, Value};

use crate::harness::{bin, Cluster};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Agents: `ticker` prints `tick <i> <ns since epoch>` every 100 ms for 2 s and a line
/// on stderr; `flood` writes 12 MB of lines to stderr as fast as it can, then `ok`.
fn agents(c: &Cluster) -> std::path::PathBuf {
    let path = c.dir.path().join("agents.toml");
    std::fs::write(
        &path,
        r#"
[agents.ticker]
command = "sh"
args = ["-c", "for i in $(seq 1 20); do echo \"tick $i $(date +%s%N)\"; sleep 0.1; done; echo 'ticker done' >&2"]

[agents.flood]
command = "sh"
args = ["-c", "i=0; while [ $i -lt 12000 ]; do printf '%01000d\n' $i >&2; i=$((i+1)); done; echo ok"]
"#,
    )
    .unwrap();
    path
}

/// `swarm task logs -f` shows each line while the task runs (the first long before it
/// ends), in order, stderr apart, and exits with the task; afterwards `swarm task logs`
/// prints the stored tail. The delay from a line's print to its display is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_lines_are_followed_live_and_stored() {
    let mut c = Cluster::new(&[]);
    let agents = agents(&c);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 2, Some(&agents));
    c.wait_workers(&["w1"]).await;

    let id = c.submit(json!({"agent": "ticker", "payload": ""})).await;
    let mut follow = Command::new(bin())
        .args(["task", "logs", "-f", &id.to_string(), "--api", &c.api])
        .args(["--token", &c.token])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn swarm task logs -f");
    let stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            lines.push((now_ns(), line));
        }
        lines
    });
    let status = tokio::task::spawn_blocking(move || follow.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let lines = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr).into_owned();
    assert!(status.status.success(), "logs -f failed: {stderr}");
    assert!(stderr.contains("ticker done"), "stderr: {stderr}");
    let ticks: Vec<_> = lines
        .iter()
        .filter(|(_, l)| l.starts_with("tick "))
        .collect();
    assert_eq!(ticks.len(), 20, "lines: {lines:?}");
    let mut delays_ms = Vec::new();
    for (i, (seen, line)) in ticks.iter().enumerate() {
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts[1], (i + 1).to_string(), "order: {lines:?}");
        let printed: u128 = parts[2].parse().unwrap();
        delays_ms.push((seen.saturating_sub(printed)) as f64 / 1e6);
    }
    // The first line was shown while the task still ran: before its last line was even
    // printed.
    let last_printed: u128 = ticks[19].1.split(' ').nth(2).unwrap().parse().unwrap();
    assert!(
        ticks[0].0 < last_printed,
        "the first line was shown only after the task's last line was printed"
    );
    delays_ms.sort_by(f64::total_cmp);
    eprintln!(
        "live line delay (print to `swarm task logs -f`): first {:.1} ms, p50 {:.1} ms, max {:.1} ms",
        (ticks[0].0.saturating_sub(ticks[0].1.split(' ').nth(2).unwrap().parse().unwrap()))
            as f64
            / 1e6,
        delays_ms[delays_ms.len() / 2],
        delays_ms[delays_ms.len() - 1]
    );

    // After the fact: the tail stored with the attempt.
    let out = Command::new(bin())
        .args(["task", "logs", &id.to_string(), "--api", &c.api])
        .args(["--token", &c.token])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stored = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stored.lines().filter(|l| l.starts_with("tick ")).count(),
        20
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ticker done"));
    let (status, logs) = c.get(&format!("/v1/tasks/{id}/logs")).await;
    assert_eq!(status, 200, "{logs}");
    assert_eq!(logs["attempts"][0]["running"], false);
    let (_, task) = c.get(&format!("/v1/tasks/{id}")).await;
    assert!(task["attempts"][0]["output_bytes"].as_u64().unwrap() > 20 * 20);

    // `submit --follow` streams and exits with the task's result.
    let out = Command::new(bin())
        .args(["submit", "--agent", "ticker", "--follow", "--api", &c.api])
        .args(["--token", &c.token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("tick "))
            .count(),
        20
    );
}

/// Reads one SSE stream to its `end` event; returns (output bytes seen, gap events,
/// whether `end` came).
async fn read_events(resp: reqwest::Response) -> (u64, u64, bool) {
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let (mut bytes, mut gaps) = (0u64, 0u64);
    while let Some(piece) = body.next().await {
        let Ok(piece) = piece else { break };
        buf.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            let name = ev
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("");
            let data = ev
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("");
            match name {
                "output" => {
                    let v: Value = serde_json::from_str(data).unwrap();
                    bytes += v["len"].as_u64().unwrap();
                }
                "gap" => gaps += 1,
                "end" => return (bytes, gaps, true),
                _ => {}
            }
        }
    }
    (bytes, gaps, false)
}

/// A watcher that stops reading: a raw HTTP/1 connection with a 4 KiB receive buffer
/// that asks for the stream and never reads a byte.
async fn stalled_watcher(c: &Cluster, id: u64) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock
        .connect(format!("127.0.0.1:{}", c.api_port).parse().unwrap())
        .await
        .unwrap();
    let req = format!(
        "GET /v1/tasks/{id}/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        c.token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

async fn attempt_ms(c: &Cluster, id: u64) -> u64 {
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let a = &t["attempts"][0];
    a["finished_at_ms"].as_u64().unwrap() - a["started_at_ms"].as_u64().unwrap()
}

/// 100 SSE watchers and one that never reads on a task printing a line every 100 ms:
/// every reading watcher gets every byte and the end; the task's run time with them is
/// reported next to one without. Then a 12 MB flood with 10 watchers and a stalled
/// one: the task ends, every reading watcher gets to `end` and accounts for every byte
/// (seen, or announced as a gap), and the stalled one holds nobody up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_watchers_and_a_stalled_one() {
    let mut c = Cluster::new(&[]);
    let agents = agents(&c);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 2, Some(&agents));
    c.wait_workers(&["w1"]).await;
    let http = reqwest::Client::new();

    let alone = c.submit(json!({"agent": "ticker", "payload": ""})).await;
    let alone_ms = attempt_ms(&c, alone).await;

    let watch = |id: u64, n: usize| {
        let (http, url, token) = (
            http.clone(),
            format!("{}/v1/tasks/{id}/events", c.api),
            c.token.clone(),
        );
        async move {
            let mut watchers = Vec::new();
            for _ in 0..n {
                let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                watchers.push(tokio::spawn(read_events(resp)));
            }
            watchers
        }
    };
    let id = c.submit(json!({"agent": "ticker", "payload": ""})).await;
    let stalled = stalled_watcher(&c, id).await;
    let watchers = watch(id, 100).await;
    let watched_ms = attempt_ms(&c, id).await;
    let (_, t) = c.get(&format!("/v1/tasks/{id}")).await;
    let total = t["attempts"][0]["output_bytes"].as_u64().unwrap();
    for w in watchers {
        let (bytes, gaps, ended) = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("a watcher did not finish")
            .unwrap();
        assert!(
            ended && gaps == 0 && bytes == total,
            "{bytes}/{total} bytes, {gaps} gaps, end {ended}"
        );
    }
    eprintln!(
        "ticker task: {alone_ms} ms alone, {watched_ms} ms with 100 watchers and a stalled one"
    );
    drop(stalled);

    let id = c.submit(json!({"agent": "flood", "payload": ""})).await;
    let stalled = stalled_watcher(&c, id).await;
    let watchers = watch(id, 10).await;
    let started = Instant::now();
    let task = c.wait_final(id).await;
    assert_eq!(task["state"], "succeeded", "{task}");
    let total = task["attempts"][0]["output_bytes"].as_u64().unwrap();
    assert_eq!(total, 12_000 * 1001 + 3);
    let mut full = 0;
    for w in watchers {
        let (bytes, gaps, ended) = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("a watcher did not finish")
            .unwrap();
        assert!(ended, "a watcher's stream ended without `end`");
        assert!(bytes <= total);
        assert!(
            bytes == total || gaps > 0,
            "{bytes} of {total} bytes and no gap"
        );
        full += usize::from(bytes == total);
    }
    eprintln!(
        "12 MB flood, 10 watchers + 1 stalled: {full} saw every byte; final after {:?}",
        started.elapsed()
    );
    drop(stalled);
    // The coordinator is still fine: a task submitted now runs.
    let id = c.submit(json!({"agent": "echo", "payload": "after"})).await;
    assert_eq!(c.wait_final(id).await["state"], "succeeded");
}

/// Bad input to the event routes gets a clear error: an unknown task, a malformed
/// `Last-Event-ID`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_routes_refuse_bad_input() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let (status, v) = c.get("/v1/tasks/999/events").await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = c.get("/v1/tasks/999/logs").await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = c.get("/v1/tasks/abc/events").await;
    assert_eq!(status, 400, "{v}");
    let id = c.submit(json!({"agent": "echo", "payload": "x"})).await;
    let (status, v) = c
        .get(&format!("/v1/tasks/{id}/events?last_event_id=nonsense"))
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Last-Event-ID"));
}

/// A mock OpenAI-compatible chat-completions server on loopback (the model is the one
/// external thing): every request is answered with a stream of `TOKENS` deltas 100 ms
/// apart, a usage chunk (50 prompt + `TOKENS` completion tokens) and `[DONE]`.
const TOKENS: u64 = 10;

/// Request bodies the mock received.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;

async fn mock_llm() -> (String, Seen) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let bodies = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let bodies = bodies.clone();
            tokio::spawn(async move {
                // The request: headers, then Content-Length bytes of body.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body_start = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..body_start]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < body_start + len {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                if let Ok(v) = serde_json::from_slice(&buf[body_start..body_start + len]) {
                    bodies.lock().unwrap().push(v);
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
                    )
                    .await;
                for i in 0..TOKENS {
                    let ev = json!({"model": "mock-1", "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}}]});
                    if s.write_all(format!("data: {ev}\n\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let usage = json!({"model": "mock-1", "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": TOKENS, "total_tokens": 50 + TOKENS}});
                let _ = s
                    .write_all(format!("data: {usage}\n\ndata: [DONE]\n\n").as_bytes())
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/v1"), seen)
}

/// An `llm` agent against the mock: the pattern retrieved for the task is in its system
/// prompt and is judged by the outcome; its tokens reach an SSE watcher before the task
/// ends; the tokens used are recorded on the attempt, the task, `/v1/usage` and
/// `/metrics`; a spent budget holds the swarm's next `llm` task (queued, saying why)
/// while other agents run on, and raising it releases the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_tokens_stream_and_usage_is_counted_against_a_budget() {
    let (base, seen) = mock_llm().await;
    let mut c = Cluster::new(&[]);
    let agents = c.dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        format!("[agents.writer]\nkind = \"llm\"\nbase_url = \"{base}\"\nmodel = \"mock-1\"\nsystem_prompt = \"Strategies:\\n{{patterns}}\"\n"),
    )
    .unwrap();
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 2, Some(&agents));
    c.wait_workers(&["w1"]).await;
    let http = reqwest::Client::new();
    let (st, v) = c
        .post(
            "/v1/patterns",
            json!({"items": [{"title": "Outline first", "content": "write the outline before the prose", "outcome": "success"}]}),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    let id = c
        .submit(json!({"agent": "writer", "payload": "write the release notes", "patterns": 1}))
        .await;
    let resp = http
        .get(format!("{}/v1/tasks/{id}/events", c.api))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let (mut tokens, mut first_token_running, mut end) = (String::new(), None, None);
    while let Some(piece) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&piece.unwrap()));
        while let Some(at) = buf.find("\n\n") {
            let ev: String = buf.drain(..at + 2).collect();
            let data = ev
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("");
            if ev.contains("event: output") {
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(v["stream"], "tokens");
                tokens.push_str(v["text"].as_str().unwrap());
                if first_token_running.is_none() {
                    let (_, t) = c.get(&format!("/v1/tasks/{id}")).await;
                    first_token_running = Some(t["state"] == "running");
                }
            } else if ev.contains("event: end") {
                end = Some(serde_json::from_str::<Value>(data).unwrap());
            }
        }
        if end.is_some() {
            break;
        }
    }
    let end = end.expect("the stream ended without `end`");
    let want: String = (0..TOKENS).map(|i| format!("tok{i} ")).collect();
    assert_eq!(tokens, want);
    assert_eq!(
        first_token_running,
        Some(true),
        "the first token came after the end"
    );
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(end["output"], want.as_str());
    assert_eq!(end["usage"]["prompt_tokens"], 50, "{end}");
    assert_eq!(end["usage"]["completion_tokens"], TOKENS);
    assert_eq!(end["attempts"][0]["usage"]["model"], "mock-1");
    // The retrieved pattern was in the system prompt, and the outcome was judged on it.
    let request = seen.lock().unwrap()[0].clone();
    assert_eq!(request["stream"], true, "{request}");
    let system = request["messages"][0]["content"].as_str().unwrap_or("");
    assert!(
        request["messages"][0]["role"] == "system"
            && system.contains("write the outline before the prose"),
        "{request}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = c.get("/v1/patterns").await;
        let p = &v["patterns"][0];
        if p["use_count"] == 1 && p["success_count"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the pattern was not judged: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (_, usage) = c.get("/v1/usage").await;
    assert_eq!(usage["swarms"][0]["swarm"], "default", "{usage}");
    assert_eq!(usage["swarms"][0]["tokens"], 50 + TOKENS);
    assert_eq!(usage["swarms"][0]["agents"][0]["agent"], "writer");
    let metrics = http
        .get(format!("{}/metrics", c.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("swarm_llm_tokens_total{")
                && l.contains("agent=\"writer\"")
                && l.contains("kind=\"prompt\"")
                && l.ends_with(" 50")),
        "{metrics}"
    );

    // A budget the next task spends: the one after it is held.
    let (status, v) = c
        .request(
            reqwest::Method::PUT,
            "/v1/swarms/default/budget",
            Some(json!({"tokens": 100})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let second = c
        .submit(json!({"agent": "writer", "payload": "again"}))
        .await;
    assert_eq!(c.wait_final(second).await["state"], "succeeded");
    let held = c
        .submit(json!({"agent": "writer", "payload": "held"}))
        .await;
    let other = c.submit(json!({"agent": "echo", "payload": "runs"})).await;
    assert_eq!(c.wait_final(other).await["state"], "succeeded");
    let (_, t) = c.get(&format!("/v1/tasks/{held}")).await;
    assert_eq!(t["state"], "queued", "{t}");
    assert!(
        t["held"]
            .as_str()
            .unwrap()
            .contains("token budget of swarm default spent: 120 of 100"),
        "{t}"
    );
    let (_, usage) = c.get("/v1/usage").await;
    assert_eq!(usage["swarms"][0]["exhausted"], true, "{usage}");
    let status_out = std::process::Command::new(bin())
        .args(["status", "--api", &c.api, "--token", &c.token])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status_out.stdout);
    assert!(text.contains("default: 120 of 100 (budget spent"), "{text}");
    // Raised: the held task runs.
    let out = std::process::Command::new(bin())
        .args(["swarms", "budget", "default", "--tokens", "1000"])
        .args(["--api", &c.api, "--token", &c.token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.wait_final(held).await["state"], "succeeded");
    // Bad input: an unknown swarm, a malformed body.
    let (status, v) = c
        .request(
            reqwest::Method::PUT,
            "/v1/swarms/nope/budget",
            Some(json!({"tokens": 1})),
        )
        .await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = c
        .request(
            reqwest::Method::PUT,
            "/v1/swarms/default/budget",
            Some(json!({"tokens": "many"})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
}

/// A watcher on a follower: `swarm task logs -f` given only a follower's address is
/// relayed the leader's stream; when the leader is killed mid-task, the stream breaks,
/// the CLI resumes from its last event id, the new leader has the worker replay its
/// tail, and every line is shown exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_on_a_follower_follows_through_a_leader_kill() {
    use crate::raft_cluster::RaftCluster;
    let mut c = RaftCluster::new(3, &[]);
    let agents = c.dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        r#"
[agents.ticker]
command = "sh"
args = ["-c", "for i in $(seq 1 60); do echo \"tick $i\"; sleep 0.1; done"]
"#,
    )
    .unwrap();
    c.start_all();
    let leader = c.wait_leader().await;
    c.start_worker("w1", 2, Some(&agents));
    c.wait_for(leader, "/v1/workers", "the worker on the leader", |v| {
        v["workers"].as_array().map_or(0, |a| a.len()) == 1
    })
    .await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let (st, v) = c
        .request(
            leader,
            reqwest::Method::POST,
            "/v1/tasks",
            Some(json!({"agent": "ticker", "payload": "", "timeout_ms": 120000})),
        )
        .await
        .unwrap();
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    let mut follow = Command::new(bin())
        .args(["task", "logs", "-f", &id.to_string()])
        .args(["--api", &c.nodes[&follower].api()])
        .env("SWARM_TOKEN", &c.token)
        .env("SWARM_CA", c.certs.join("ca.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            lines.push(line);
        }
        lines
    });
    // Some lines arrive through the follower, then the leader dies.
    let first = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        while got.len() < 5 {
            got.push(
                rx.recv_timeout(Duration::from_secs(30))
                    .expect("no line through the follower"),
            );
        }
        got
    })
    .await
    .unwrap();
    assert_eq!(first[0], "tick 1");
    c.kill_node(leader);
    let status = tokio::task::spawn_blocking(move || follow.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let lines = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr).into_owned();
    assert!(
        status.status.success(),
        "logs -f failed: {stderr}\n{}",
        c.logs()
    );
    let want: Vec<String> = (1..=60).map(|i| format!("tick {i}")).collect();
    assert_eq!(lines, want, "stderr: {stderr}");
}
