//! `http` and `llm` agents against real local servers speaking the real protocols (see
//! `mock_http` and `mock_llm`), through the public API: agents loaded from an agents
//! file, attempts run by the [`Executor`] (or, to watch streamed pieces arrive, by
//! [`swarm_worker::agent_kinds::llm::run`]).

mod mock_http;
mod mock_llm;

mod support;

use std::path::Path;
use std::time::Duration;

use mock_http::MockHttp;
use mock_llm::MockLlm;
use support::task;
use swarm_proto::worker::{FailureKind, Outcome, PatternHit};
use swarm_worker::agent_kinds::{build_client, llm, Attempt};
use swarm_worker::{cancel_pair, Agent, Agents, CancelToken, Executor, LlmSpec, LlmUsage};

/// Upper bound on any wait, so a broken test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(20);
const MAX: u64 = 1 << 20;

/// The agents of `toml`, loaded from a real file.
fn load(toml: &str) -> Agents {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agents.toml");
    std::fs::write(&path, toml).unwrap();
    Agents::load(&path).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn executor(toml: &str) -> Executor {
    Executor::new(load(toml))
}

fn output(o: Outcome) -> String {
    match o {
        Outcome::Succeeded { output } => String::from_utf8(output).unwrap(),
        other => panic!("expected success, got {other:?}"),
    }
}

fn failure(o: Outcome, want: FailureKind) -> String {
    match o {
        Outcome::Failed { kind, message } if kind == want => message,
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

/// A local port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

fn header(h: &axum::http::HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.to_str().unwrap().to_owned())
}

fn patterns() -> Vec<PatternHit> {
    vec![
        PatternHit {
            id: "pat-1".into(),
            title: "Pin the toolchain".into(),
            description: "CI broke on a new lint".into(),
            content: "Add rust-toolchain.toml with the version CI uses.".into(),
            outcome: "success".into(),
            confidence: 0.75,
            score: 0.9,
        },
        PatternHit {
            id: "pat-2".into(),
            title: "Blind retries".into(),
            description: "Retrying without reading the error".into(),
            content: "Read the compiler output first.".into(),
            outcome: "failure".into(),
            confidence: 0.4,
            score: 0.5,
        },
    ]
}

// ---------------------------------------------------------------------------- http

#[tokio::test]
async fn http_a_2xx_body_is_the_output_and_the_request_names_the_task() {
    let mock = MockHttp::start().await;
    let ex = executor(&format!(
        r#"
        [agents.post]
        kind = "http"
        url = "{echo}"
        headers = {{ "Content-Type" = "application/json", "X-Custom" = "yes" }}

        [agents.get]
        kind = "http"
        url = "{echo}"
        method = "GET"

        [agents.put]
        kind = "http"
        url = "{created}"
        method = "PUT"
        "#,
        echo = mock.url("/echo"),
        created = mock.url("/created"),
    ));
    let mut t = task("post", r#"{"q":1}"#, 10_000);
    t.idempotency_key = Some("idem-7".into());
    let out = ex.run(t, MAX, CancelToken::never()).await;
    assert_eq!(output(out), r#"got: {"q":1}"#);
    let out = ex
        .run(task("get", "ignored", 10_000), MAX, CancelToken::never())
        .await;
    assert_eq!(output(out), "got: ", "GET sends no body");
    let out = ex
        .run(task("put", "x", 10_000), MAX, CancelToken::never())
        .await;
    assert_eq!(output(out), "made", "any 2xx succeeds");

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 3);
    let r = &reqs[0];
    assert_eq!(r.method, axum::http::Method::POST);
    assert_eq!(r.body, br#"{"q":1}"#);
    for (name, want) in [
        ("content-type", "application/json"),
        ("x-custom", "yes"),
        ("x-swarm-task-id", "42"),
        ("x-swarm-attempt", "3"),
        ("x-swarm-execution-id", "42.3.1"),
        ("idempotency-key", "idem-7"),
    ] {
        assert_eq!(header(&r.headers, name).as_deref(), Some(want), "{name}");
    }
    assert_eq!(reqs[1].method, axum::http::Method::GET);
    assert!(reqs[1].body.is_empty());
    assert_eq!(header(&reqs[1].headers, "idempotency-key"), None);
    assert_eq!(reqs[2].method, axum::http::Method::PUT);
    assert_eq!(reqs[2].body, b"x");
}

#[tokio::test]
async fn http_a_non_2xx_fails_with_the_status_and_the_body_tail() {
    let mock = MockHttp::start().await;
    let ex = executor(&format!(
        "[agents.f]\nkind = \"http\"\nurl = \"{}\"\n\n[agents.nf]\nkind = \"http\"\nurl = \"{}\"\n",
        mock.url("/fail"),
        mock.url("/nowhere"),
    ));
    let out = ex
        .run(task("f", "", 10_000), MAX, CancelToken::never())
        .await;
    let msg = failure(out, FailureKind::Exit);
    assert!(
        msg.starts_with("HTTP 503 Service Unavailable: xxx"),
        "{msg}"
    );
    assert!(msg.ends_with(mock_http::FAIL_END), "{msg}");
    let prefix = "HTTP 503 Service Unavailable: ".len();
    assert!(
        msg.len() <= prefix + 512,
        "only the tail: {} bytes",
        msg.len()
    );
    let out = ex
        .run(task("nf", "", 10_000), MAX, CancelToken::never())
        .await;
    assert_eq!(
        failure(out, FailureKind::Exit),
        "HTTP 404 Not Found: no such path"
    );
}

#[tokio::test]
async fn http_the_timeout_covers_the_request_and_the_agent_caps_it() {
    let mock = MockHttp::start().await;
    let ex = executor(&format!(
        "[agents.slow]\nkind = \"http\"\nurl = \"{}\"\ntimeout_ms = 300\n\n\
         [agents.hang]\nkind = \"http\"\nurl = \"{}\"\n",
        mock.url("/slow"),
        mock.url("/hang"),
    ));
    // No task timeout: the agent's cap applies.
    let out = ex.run(task("slow", "", 0), MAX, CancelToken::never()).await;
    let msg = failure(out, FailureKind::Timeout);
    assert!(msg.contains("300 ms"), "{msg}");
    // The body too: headers came at once, the body never ends.
    let out = ex
        .run(task("hang", "", 1000), MAX, CancelToken::never())
        .await;
    failure(out, FailureKind::Timeout);
    mock.wait_dropped(1, LIMIT).await;
}

#[tokio::test]
async fn http_cancel_aborts_the_request_and_the_server_sees_it() {
    let mock = MockHttp::start().await;
    let ex = executor(&format!(
        "[agents.hang]\nkind = \"http\"\nurl = \"{}\"\n",
        mock.url("/hang")
    ));
    let (handle, token) = cancel_pair();
    let run = tokio::spawn({
        let ex = ex.clone();
        async move { ex.run(task("hang", "", 0), MAX, token).await }
    });
    mock.wait_arrived(1, LIMIT).await;
    handle.cancel();
    let out = tokio::time::timeout(LIMIT, run)
        .await
        .expect("cancel ends the attempt")
        .unwrap();
    failure(out, FailureKind::Cancelled);
    mock.wait_dropped(1, LIMIT).await;
}

#[tokio::test]
async fn http_a_body_beyond_the_limit_fails_without_being_read_whole() {
    let mock = MockHttp::start().await;
    let ex = executor(&format!(
        "[agents.big]\nkind = \"http\"\nurl = \"{}\"\n\n[agents.chunked]\nkind = \"http\"\nurl = \"{}\"\n",
        mock.url("/big"),
        mock.url("/big-chunked"),
    ));
    for agent in ["big", "chunked"] {
        let out = ex
            .run(task(agent, "", 10_000), 1000, CancelToken::never())
            .await;
        let msg = failure(out, FailureKind::OutputTooLarge);
        assert!(msg.contains("1000 bytes"), "{agent}: {msg}");
    }
    // Exactly at the limit is fine.
    let out = ex
        .run(task("big", "", 10_000), 1 << 20, CancelToken::never())
        .await;
    assert_eq!(output(out).len(), 1 << 20);
}

#[tokio::test]
async fn http_an_unreachable_url_is_a_spawn_failure() {
    let port = closed_port().await;
    let ex = executor(&format!(
        "[agents.gone]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/run\"\n"
    ));
    let out = ex
        .run(task("gone", "", 10_000), MAX, CancelToken::never())
        .await;
    let msg = failure(out, FailureKind::Spawn);
    assert!(
        msg.starts_with(&format!("cannot reach http://127.0.0.1:{port}/run: "))
            && msg.contains("onnection refused"),
        "{msg}"
    );
}

// ----------------------------------------------------------------------------- llm

fn llm_agent(mock: &MockLlm, model: &str, extra: &str) -> String {
    format!(
        "[agents.w]\nkind = \"llm\"\nbase_url = \"{}\"\nmodel = \"{model}\"\n{extra}\n",
        mock.base_url()
    )
}

fn llm_spec(agents: &Agents) -> LlmSpec {
    match agents.get("w") {
        Some(Agent::Llm(spec)) => spec.clone(),
        other => panic!("not an llm agent: {other:?}"),
    }
}

#[tokio::test]
async fn llm_a_streamed_answer_is_assembled() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::OK, ""));
    let out = ex
        .run(task("w", "Say hello.", 10_000), MAX, CancelToken::never())
        .await;
    assert_eq!(output(out), mock_llm::ANSWER);
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let body = &reqs[0].body;
    assert_eq!(body["model"], "ok");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert!(body.get("temperature").is_none() && body.get("max_tokens").is_none());
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(
        messages[1],
        serde_json::json!({"role": "user", "content": "Say hello."})
    );
    assert_eq!(
        header(&reqs[0].headers, "accept").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(header(&reqs[0].headers, "authorization"), None);
}

#[tokio::test]
async fn llm_a_json_answer_is_the_output() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(
        &mock,
        mock_llm::OK,
        "stream = false\ntemperature = 0.25\nmax_tokens = 64",
    ));
    let out = ex
        .run(task("w", "Say hello.", 10_000), MAX, CancelToken::never())
        .await;
    assert_eq!(output(out), mock_llm::ANSWER);
    let body = &mock.requests()[0].body;
    assert_eq!(body["stream"], false);
    assert!(body.get("stream_options").is_none());
    assert_eq!(body["temperature"], 0.25);
    assert_eq!(body["max_tokens"], 64);
}

#[tokio::test]
async fn llm_the_system_prompt_carries_the_patterns() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::OK, ""));
    let out = ex
        .run_with_patterns(
            task("w", "Fix the build.", 10_000),
            &patterns(),
            MAX,
            CancelToken::never(),
        )
        .await;
    assert_eq!(output(out), mock_llm::ANSWER);
    let body = &mock.requests()[0].body;
    let system = body["messages"][0]["content"].as_str().unwrap();
    for needle in [
        "- Pin the toolchain: CI broke on a new lint\n  Add rust-toolchain.toml with the version CI uses.",
        "learnt from a success; confidence 0.75",
        "- Blind retries: Retrying without reading the error\n  Read the compiler output first.",
        "learnt from a failure; confidence 0.40",
    ] {
        assert!(system.contains(needle), "{needle:?} missing from:\n{system}");
    }
    assert_eq!(body["messages"][1]["content"], "Fix the build.");

    // A template of its own, and a conversation with a system message of its own.
    let ex = executor(&llm_agent(
        &mock,
        mock_llm::OK,
        "system_prompt = \"Rules:\\n{patterns}\\nEnd.\"",
    ));
    ex.run_with_patterns(
        task("w", "x", 10_000),
        &patterns(),
        MAX,
        CancelToken::never(),
    )
    .await;
    let conversation = serde_json::json!({"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Fix it."},
    ]});
    ex.run_with_patterns(
        task("w", conversation.to_string(), 10_000),
        &patterns(),
        MAX,
        CancelToken::never(),
    )
    .await;
    let reqs = mock.requests();
    let system = reqs[1].body["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.starts_with("Rules:\nStrategies retrieved") && system.ends_with("\nEnd."),
        "{system}"
    );
    let messages = reqs[2].body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "no second system message");
    let system = messages[0]["content"].as_str().unwrap();
    assert!(
        system.starts_with("Be terse.\n\nStrategies retrieved"),
        "{system}"
    );
    assert!(system.contains("Pin the toolchain"), "{system}");
    assert_eq!(messages[1]["content"], "Fix it.");
}

#[tokio::test]
async fn llm_a_429_is_retried_after_retry_after() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::RATE_LIMITED, ""));
    let out = ex
        .run(task("w", "x", 20_000), MAX, CancelToken::never())
        .await;
    assert_eq!(output(out), mock_llm::ANSWER);
    assert_eq!(mock.hits(mock_llm::RATE_LIMITED), 2);

    // A Retry-After beyond the attempt's timeout (1 s > 999 ms) ends the attempt at once,
    // with the 429.
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::RATE_LIMITED, ""));
    let out = ex.run(task("w", "x", 999), MAX, CancelToken::never()).await;
    let msg = failure(out, FailureKind::Exit);
    assert!(
        msg.starts_with("HTTP 429 Too Many Requests: ")
            && msg.contains("no time for another try in 1000 ms"),
        "{msg}"
    );
    assert_eq!(mock.hits(mock_llm::RATE_LIMITED), 1);
}

#[tokio::test]
async fn llm_a_500_is_retried_and_retries_run_out() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::FLAKY, "stream = false"));
    let out = ex
        .run(task("w", "x", 20_000), MAX, CancelToken::never())
        .await;
    assert_eq!(output(out), mock_llm::ANSWER);
    assert_eq!(mock.hits(mock_llm::FLAKY), 2);

    // Without retries the first 500 is the end.
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::FLAKY, "max_retries = 0"));
    let out = ex
        .run(task("w", "x", 20_000), MAX, CancelToken::never())
        .await;
    let msg = failure(out, FailureKind::Exit);
    assert!(
        msg.starts_with("HTTP 500 Internal Server Error: ") && msg.ends_with("(1 try)"),
        "{msg}"
    );
    assert_eq!(mock.hits(mock_llm::FLAKY), 1);
}

#[tokio::test]
async fn llm_a_400_fails_at_once_with_the_body_tail() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::BAD_REQUEST, ""));
    let out = ex
        .run(task("w", "x", 20_000), MAX, CancelToken::never())
        .await;
    let msg = failure(out, FailureKind::Exit);
    assert!(msg.starts_with("HTTP 400 Bad Request: "), "{msg}");
    assert!(msg.contains(mock_llm::BAD_REQUEST_END), "{msg}");
    assert!(msg.len() < 600, "only the tail: {msg}");
    assert_eq!(mock.hits(mock_llm::BAD_REQUEST), 1, "not retried");
}

#[tokio::test]
async fn llm_the_timeout_ends_a_slow_answer() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::SLOW, ""));
    let out = ex.run(task("w", "x", 300), MAX, CancelToken::never()).await;
    let msg = failure(out, FailureKind::Timeout);
    assert!(msg.contains("300 ms"), "{msg}");
    // Also mid-stream, capped by the agent.
    let ex = executor(&llm_agent(&mock, mock_llm::HANG, "timeout_ms = 1000"));
    let out = ex.run(task("w", "x", 0), MAX, CancelToken::never()).await;
    failure(out, FailureKind::Timeout);
    mock.wait_dropped(1, LIMIT).await;
}

#[tokio::test]
async fn llm_streamed_pieces_arrive_as_they_come_and_cancel_aborts_mid_stream() {
    let mock = MockLlm::start().await;
    let spec = llm_spec(&load(&llm_agent(&mock, mock_llm::HANG, "")));
    let client = build_client().unwrap();
    let (handle, token) = cancel_pair();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let mut on_chunk = move |piece: &[u8]| {
        let _ = tx.send(piece.to_vec());
    };
    let attempt = Attempt {
        client: &client,
        task: task("w", "x", 0),
        max_output_bytes: MAX,
        timeout: None,
        cancel: token,
    };
    let run = llm::run(&spec, attempt, &[], &mut on_chunk);
    tokio::pin!(run);
    // The stream never ends, yet its first piece is here.
    let first = tokio::time::timeout(LIMIT, async {
        tokio::select! {
            piece = rx.recv() => piece,
            r = &mut run => panic!("the attempt ended early: {r:?}"),
        }
    })
    .await
    .expect("the first piece arrived");
    assert_eq!(first.as_deref(), Some(mock_llm::DELTAS[0].as_bytes()));
    handle.cancel();
    let (out, usage) = tokio::time::timeout(LIMIT, run)
        .await
        .expect("cancel ends the attempt");
    failure(out, FailureKind::Cancelled);
    assert_eq!(usage, None);
    mock.wait_dropped(1, LIMIT).await;
}

#[tokio::test]
async fn llm_pieces_and_usage_streamed_or_not() {
    let mock = MockLlm::start().await;
    let client = build_client().unwrap();
    for (extra, want) in [
        ("", mock_llm::DELTAS.map(str::to_owned).to_vec()),
        ("stream = false", vec![mock_llm::ANSWER.to_owned()]),
    ] {
        let spec = llm_spec(&load(&llm_agent(&mock, mock_llm::OK, extra)));
        let mut pieces = Vec::new();
        let mut on_chunk = |p: &[u8]| pieces.push(String::from_utf8(p.to_vec()).unwrap());
        let attempt = Attempt {
            client: &client,
            task: task("w", "x", 10_000),
            max_output_bytes: MAX,
            timeout: Some(LIMIT),
            cancel: CancelToken::never(),
        };
        let (out, usage) = llm::run(&spec, attempt, &[], &mut on_chunk).await;
        assert_eq!(output(out), mock_llm::ANSWER);
        assert_eq!(pieces, want, "{extra}");
        assert_eq!(
            usage,
            Some(LlmUsage {
                model: mock_llm::SERVED_MODEL.into(),
                prompt_tokens: mock_llm::PROMPT_TOKENS,
                completion_tokens: mock_llm::COMPLETION_TOKENS,
            }),
            "{extra}"
        );
    }
}

#[tokio::test]
async fn llm_an_answer_beyond_the_limit_fails() {
    let mock = MockLlm::start().await;
    for extra in ["", "stream = false"] {
        let ex = executor(&llm_agent(&mock, mock_llm::BIG, extra));
        let out = ex
            .run(task("w", "x", 10_000), 1000, CancelToken::never())
            .await;
        let msg = failure(out, FailureKind::OutputTooLarge);
        assert!(msg.contains("1000 bytes"), "{extra}: {msg}");
        // With room, the whole answer comes.
        let out = ex
            .run(task("w", "x", 10_000), MAX, CancelToken::never())
            .await;
        assert_eq!(output(out).len(), 64 * 1024, "{extra}");
    }
}

#[tokio::test]
async fn llm_a_stream_that_breaks_mid_answer_fails() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::BROKEN, ""));
    let out = ex
        .run(task("w", "x", 10_000), MAX, CancelToken::never())
        .await;
    let msg = failure(out, FailureKind::Exit);
    assert!(msg.contains("the stream ended before [DONE]"), "{msg}");
    assert_eq!(
        mock.hits(mock_llm::BROKEN),
        1,
        "part of the answer came: no retry"
    );
}

#[tokio::test]
async fn llm_a_bad_payload_sends_nothing() {
    let mock = MockLlm::start().await;
    let ex = executor(&llm_agent(&mock, mock_llm::OK, ""));
    for payload in [&b"\xff\xfe"[..], br#"{"messages": []}"#] {
        let out = ex
            .run(task("w", payload, 10_000), MAX, CancelToken::never())
            .await;
        failure(out, FailureKind::BadPayload);
    }
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn llm_an_unreachable_server_is_retried_then_a_spawn_failure() {
    let port = closed_port().await;
    let ex = executor(&format!(
        "[agents.w]\nkind = \"llm\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"m\"\nmax_retries = 1\n"
    ));
    let out = ex
        .run(task("w", "x", 20_000), MAX, CancelToken::never())
        .await;
    let msg = failure(out, FailureKind::Spawn);
    assert!(
        msg.starts_with(&format!(
            "cannot reach http://127.0.0.1:{port}/v1/chat/completions: "
        )) && msg.ends_with("(2 tries)"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------- agents.toml

#[test]
fn agents_files_check_each_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agents.toml");
    let cases = [
        ("[agents.a]\nkind = \"http\"\n", "missing required key `url`"),
        (
            "[agents.a]\nkind = \"llm\"\nbase_url = \"http://h/v1\"\n",
            "missing required key `model`",
        ),
        (
            "[agents.a]\nkind = \"llm\"\nmodel = \"m\"\n",
            "missing required key `base_url`",
        ),
        ("[agents.a]\nargs = []\n", "missing required key `command`"),
        (
            "[agents.a]\nkind = \"http\"\nurl = \"http://h\"\ncommand = \"x\"\n",
            "unknown key `command` for `http` agents",
        ),
        (
            "[agents.a]\nkind = \"llm\"\nbase_url = \"http://h\"\nmodel = \"m\"\nurl = \"x\"\n",
            "unknown key `url` for `llm` agents",
        ),
        (
            "[agents.a]\ncommand = \"x\"\nmodel = \"m\"\n",
            "unknown key `model` for `exec` agents",
        ),
        (
            "[agents.a]\nkind = \"http\"\nurl = \"http://h\"\nbogus = 1\n",
            "unknown field `bogus`",
        ),
        (
            "[agents.a]\nkind = \"llm\"\nbase_url = \"http://h\"\nmodel = \"m\"\napi_key_env = \"AGENT_KINDS_SURELY_UNSET_7F3A\"\n",
            "`AGENT_KINDS_SURELY_UNSET_7F3A` is not set on the worker",
        ),
        (
            "[agents.a]\nkind = \"http\"\nurl = \"http://h\"\nsecret_headers = { \"X-Key\" = \"AGENT_KINDS_SURELY_UNSET_7F3A\" }\n",
            "`AGENT_KINDS_SURELY_UNSET_7F3A` is not set on the worker",
        ),
        (
            "[agents.a]\nkind = \"http\"\nurl = \"http://h\"\nsecret_headers = { \"X-Key\" = \"SWARM_TOKEN\" }\n",
            "`SWARM_TOKEN` is refused",
        ),
        (
            "[agents.a]\nkind = \"llm\"\nbase_url = \"http://h\"\nmodel = \"m\"\napi_key_env = \"SWARM_TOKEN\"\n",
            "`SWARM_TOKEN` is refused",
        ),
        (
            "[agents.a]\nkind = \"llm\"\nbase_url = \"http://h\"\nmodel = \"m\"\nmax_concurrency = 0\n",
            "`max_concurrency` must be at least 1",
        ),
        (
            "[agents.a]\ncommand = \"x\"\nmax_concurrency = 0\n",
            "`max_concurrency` must be at least 1",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(&path, text).unwrap();
        let err = Agents::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    std::fs::write(
        &path,
        "[agents.a]\nkind = \"http\"\nurl = \"http://h/x\"\nmax_concurrency = 2\n\n\
         [agents.b]\nkind = \"llm\"\nbase_url = \"http://h/v1\"\nmodel = \"m\"\n",
    )
    .unwrap();
    let agents = Agents::load(Path::new(&path)).unwrap();
    assert_eq!(agents.names(), ["a", "b", "echo", "sleep"]);
    assert_eq!(agents.get("a").unwrap().max_concurrency(), Some(2));
    assert!(matches!(agents.get("b"), Some(Agent::Llm(s)) if s.stream && s.max_retries == 4));
}
