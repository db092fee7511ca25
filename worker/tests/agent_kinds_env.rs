//! Secrets of `http` and `llm` agents come from the worker's environment, read when the
//! agents file is loaded, and reach the server in the request's headers.
//!
//! This binary holds a single test on purpose: it sets variables in its own process
//! environment before starting any other thread, so no other test can race the change.

mod mock_http;
mod mock_llm;

use mock_http::MockHttp;
use mock_llm::MockLlm;
use swarm_proto::worker::{AttemptRef, Outcome, TaskAssignment};
use swarm_worker::{Agent, Agents, CancelToken, Executor};

const TOKEN: &str = "Bearer acme-sentinel-5d1e";
const API_KEY: &str = "sk-sentinel-90ab";

fn task(agent: &str) -> TaskAssignment {
    TaskAssignment {
        attempt: AttemptRef {
            task_id: 7,
            attempt: 1,
        },
        agent: agent.into(),
        payload: b"payload".to_vec(),
        timeout_ms: 20_000,
        idempotency_key: None,
        patterns: 0,
        swarm: "default".into(),
        term: 1,
    }
}

#[test]
fn secrets_come_from_the_worker_environment() {
    // The only test of this binary, and no other thread exists yet.
    std::env::set_var("AGENT_KINDS_ACME_TOKEN", TOKEN);
    std::env::set_var("AGENT_KINDS_LLM_KEY", API_KEY);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = MockHttp::start().await;
        let llm = MockLlm::start().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.toml");
        std::fs::write(
            &path,
            format!(
                r#"
                [agents.fetch]
                kind = "http"
                url = "{url}"
                headers = {{ "X-Plain" = "plain" }}
                secret_headers = {{ "Authorization" = "AGENT_KINDS_ACME_TOKEN", "X-Api-Key" = "AGENT_KINDS_LLM_KEY" }}

                [agents.writer]
                kind = "llm"
                base_url = "{base}"
                model = "{model}"
                api_key_env = "AGENT_KINDS_LLM_KEY"
                "#,
                url = http.url("/echo"),
                base = llm.base_url(),
                model = mock_llm::OK,
            ),
        )
        .unwrap();
        let agents = Agents::load(&path).unwrap();
        // Read at load, kept out of Debug output.
        let shown = format!("{agents:?}");
        assert!(
            !shown.contains(TOKEN) && !shown.contains(API_KEY),
            "{shown}"
        );
        let Some(Agent::Llm(spec)) = agents.get("writer") else {
            panic!("not llm")
        };
        assert_eq!(spec.api_key.as_ref().map(|k| k.expose()), Some(API_KEY));

        let ex = Executor::new(agents);
        let out = ex.run(task("fetch"), 1 << 20, CancelToken::never()).await;
        assert_eq!(
            out,
            Outcome::Succeeded {
                output: b"got: payload".to_vec()
            }
        );
        let req = &http.requests()[0];
        let get = |name: &str| req.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(get("authorization").as_deref(), Some(TOKEN));
        assert_eq!(get("x-api-key").as_deref(), Some(API_KEY));
        assert_eq!(get("x-plain").as_deref(), Some("plain"));

        let out = ex.run(task("writer"), 1 << 20, CancelToken::never()).await;
        assert_eq!(
            out,
            Outcome::Succeeded {
                output: mock_llm::ANSWER.as_bytes().to_vec()
            }
        );
        let req = &llm.requests()[0];
        assert_eq!(
            req.headers
                .get("authorization")
                .map(|v| v.to_str().unwrap()),
            Some(format!("Bearer {API_KEY}").as_str())
        );
        assert_eq!(req.body["model"], mock_llm::OK);
    });
}
