//! Swarm topologies with real processes: a ring pipeline whose result is the composition
//! of its stages and that survives losing a middle stage's worker, and the errors of
//! swarms that cannot work.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{bin, Cluster};

/// Three text stages, each recording every run in `dir/<stage>.runs` (one line per run:
/// task/attempt): upper-case, reverse (slow when the payload says so),
/// then wrap in brackets.
fn ring_agents(dir: &Path) -> PathBuf {
    let file = dir.join("agents.toml");
    let runs = |stage: &str| dir.join(format!("{stage}.runs")).display().to_string();
    std::fs::write(
        &file,
        format!(
            r#"[agents.upper]
command = "sh"
args = ["-c", "echo \"$SWARM_TASK_ID/$SWARM_ATTEMPT\" >> {up}; tr a-z A-Z"]

[agents.rev]
command = "sh"
args = ["-c", "in=$(cat); echo \"$SWARM_TASK_ID/$SWARM_ATTEMPT\" >> {rev}; case \"$in\" in *SLOW*) sleep 4;; esac; printf '%s' \"$in\" | rev"]

[agents.wrap]
command = "sh"
args = ["-c", "echo \"$SWARM_TASK_ID/$SWARM_ATTEMPT\" >> {wrap}; printf '[%s]' \"$(cat)\""]
"#,
            up = runs("upper"),
            rev = runs("rev"),
            wrap = runs("wrap"),
        ),
    )
    .unwrap();
    file
}

fn runs(dir: &Path, stage: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{stage}.runs")))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// What the pipeline computes, in Rust: wrap(rev(upper(x))).
fn composed(x: &str) -> String {
    let up = x.to_uppercase();
    let rev: String = up.chars().rev().collect();
    format!("[{rev}]")
}

/// A coordinator and four workers: one per `role` label, two for the middle stage.
async fn ring_cluster() -> (Cluster, PathBuf) {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let agents = ring_agents(c.dir.path());
    for (id, role) in [
        ("w-up", "up"),
        ("w-mid-a", "mid"),
        ("w-mid-b", "mid"),
        ("w-end", "end"),
    ] {
        let labels = format!("role={role},pool=ring");
        c.start_worker_with(id, 2, Some(&agents), &["--labels", &labels]);
    }
    c.wait_workers(&["w-up", "w-mid-a", "w-mid-b", "w-end"])
        .await;
    let (status, v) = c
        .post(
            "/v1/swarms",
            json!({
                "name": "pipeline",
                "topology": "ring",
                "labels": {"pool": "ring"},
                "stages": ["upper[role=up]", "rev[role=mid]", "wrap[role=end]"],
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["topology"], "ring");
    let dir = c.dir.path().to_path_buf();
    (c, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_pipeline_composes_its_stages() {
    let (c, dir) = ring_cluster().await;

    // The layout: three stages, each on a worker with the stage's label.
    let (status, v) = c.get("/v1/swarms/pipeline").await;
    assert_eq!(status, 200, "{v}");
    let stages = v["layout"]["layout"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3, "{v}");
    assert_eq!(stages[0]["worker"], "w-up");
    assert!(stages[1]["worker"].as_str().unwrap().starts_with("w-mid-"));
    assert_eq!(stages[2]["worker"], "w-end");

    let inputs: Vec<String> = (0..12).map(|i| format!("task {i} says hello")).collect();
    let mut ids = Vec::new();
    for x in &inputs {
        ids.push(
            c.submit(json!({"swarm": "pipeline", "payload": x, "max_attempts": 1}))
                .await,
        );
    }
    for (id, x) in ids.iter().zip(&inputs) {
        let t = c.wait_final(*id).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["output"].as_str(), Some(composed(x).as_str()), "{t}");
        assert_eq!(t["swarm"], "pipeline");
        // Each stage ran once, in order, and each stage's output is the next's input.
        let stages: Vec<u64> = t["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["stage"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(stages, vec![0, 1, 2], "{t}");
        let up = x.to_uppercase();
        let rev: String = up.chars().rev().collect();
        assert_eq!(
            t["stage_outputs"],
            json!([up, rev, composed(x)]),
            "intermediate outputs are kept: {t}"
        );
    }
    assert_eq!(runs(&dir, "upper").len(), 12);
    assert_eq!(runs(&dir, "rev").len(), 12);
    assert_eq!(runs(&dir, "wrap").len(), 12);

    // `swarm status` and `swarm swarms show` draw the ring.
    let out = cli(&c, &["swarms", "show", "pipeline"]);
    assert!(out.contains("ring"), "{out}");
    assert!(out.contains("upper") && out.contains("w-end"), "{out}");
    let status = cli(&c, &["status"]);
    assert!(status.contains("swarm pipeline"), "{status}");

    // Stage latency is on /metrics.
    let metrics = reqwest::get(format!("{}/metrics", c.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("swarm_ring_stage_seconds_count{swarm=\"pipeline\",stage=\"1\"} 12")
            || metrics.contains("swarm_ring_stage_seconds_count{stage=\"1\",swarm=\"pipeline\"} 12"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("ring_stage"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A busy swarm cannot be deleted; an idle one can.
    let (status, v) = c
        .request(reqwest::Method::DELETE, "/v1/swarms/pipeline", None)
        .await;
    assert_eq!(status, 204, "{v}");
    let (status, v) = c
        .post("/v1/tasks", json!({"swarm": "pipeline", "payload": "x"}))
        .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "unknown_swarm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_middle_stage_resumes_from_the_last_completed_stage() {
    let (mut c, dir) = ring_cluster().await;
    let id = c
        .submit(json!({"swarm": "pipeline", "payload": "slow and steady", "max_attempts": 3}))
        .await;
    // Wait until stage 1 (the slow one) is running, and find its worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mid = loop {
        let (_, t) = c.get(&format!("/v1/tasks/{id}")).await;
        let running = t["attempts"].as_array().and_then(|a| {
            a.iter()
                .find(|a| a["stage"] == 1 && a.get("outcome").is_none())
                .and_then(|a| a["worker"].as_str().map(String::from))
        });
        if let Some(w) = running {
            if runs(&dir, "rev").len() == 1 {
                break w;
            }
        }
        assert!(Instant::now() < deadline, "stage 1 never started: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(mid.starts_with("w-mid-"), "{mid}");
    c.kill_worker(&mid);

    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(
        t["output"].as_str(),
        Some(composed("slow and steady").as_str())
    );
    let attempts = t["attempts"].as_array().unwrap();
    let stage_of = |a: &Value| a["stage"].as_u64().unwrap_or(0);
    // Stage 0 ran once and was not rerun; stage 1 was lost on the killed worker and
    // completed on the other middle worker; stage 2 ran once.
    assert_eq!(attempts.iter().filter(|a| stage_of(a) == 0).count(), 1, "{t}");
    let mids: Vec<&Value> = attempts.iter().filter(|a| stage_of(a) == 1).collect();
    assert_eq!(mids.len(), 2, "{t}");
    assert_eq!(mids[0]["worker"].as_str(), Some(mid.as_str()));
    assert_eq!(mids[0]["outcome"], "lost", "{t}");
    assert_ne!(mids[1]["worker"].as_str(), Some(mid.as_str()));
    assert_eq!(mids[1]["outcome"], "succeeded");
    assert_eq!(runs(&dir, "upper").len(), 1, "stage 0 not rerun");
    assert_eq!(runs(&dir, "wrap").len(), 1);

    // The ring was repaired: its middle stage is on the surviving worker now.
    let (_, v) = c.get("/v1/swarms/pipeline").await;
    let stages = v["layout"]["layout"]["stages"].as_array().unwrap();
    assert_eq!(stages[1]["worker"], mids[1]["worker"], "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarms_that_cannot_work_are_refused_with_clear_errors() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;

    // A ring with no workers at all.
    let (status, v) = c.post("/v1/swarms", json!({"name": "r", "topology": "ring", "stages": ["echo"]})).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "no_workers", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("no workers"), "{v}");

    c.start_worker_with("w1", 1, None, &["--labels", "zone=a"]);
    c.wait_workers(&["w1"]).await;

    let cases = [
        (
            json!({"name": "s", "topology": "torus"}),
            400,
            "unknown_topology",
        ),
        (
            json!({"name": "s", "topology": "star", "labels": {"zone": "mars"}}),
            409,
            "no_matching_workers",
        ),
        (
            json!({"name": "r", "topology": "ring", "stages": []}),
            400,
            "empty_ring",
        ),
        (
            json!({"name": "r", "topology": "ring", "stages": ["echo", "no-such-agent"]}),
            409,
            "empty_stage",
        ),
        (
            json!({"name": "s", "topology": "star", "max_degree": 3}),
            400,
            "option_not_applicable",
        ),
        (
            json!({"name": "bad name!", "topology": "star"}),
            400,
            "invalid_swarm_name",
        ),
        (
            json!({"name": "h", "topology": "hierarchical"}),
            501,
            "unsupported_topology",
        ),
        (
            json!({"name": "default", "topology": "star"}),
            409,
            "swarm_exists",
        ),
    ];
    for (body, want_status, want_code) in cases {
        let (status, v) = c.post("/v1/swarms", body.clone()).await;
        assert_eq!(status, want_status, "{body} → {v}");
        assert_eq!(v["error"]["code"], want_code, "{body} → {v}");
        assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let (status, v) = c.post("/v1/swarms", json!({"name": 5})).await;
    assert_eq!((status, v["error"]["code"].clone()), (400, json!("invalid_json")), "{v}");

    // Nothing was created by the refused requests.
    let (_, v) = c.get("/v1/swarms").await;
    let names: Vec<&str> = v["swarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["default"], "{v}");

    // allow_empty: defined now, dispatches once a member shows up.
    let (status, v) = c.post("/v1/swarms", json!({
        "name": "later", "topology": "star", "labels": {"zone": "b"}, "allow_empty": true
    }))
    .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = c.post("/v1/swarms", json!({"name": "later", "topology": "star", "allow_empty": true})).await;
    assert_eq!((status, v["error"]["code"].clone()), (409, json!("swarm_exists")), "{v}");
    let id = c.submit(json!({"swarm": "later", "agent": "echo", "payload": "hi"})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, t) = c.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(t["state"], "queued", "no member yet: {t}");
    c.start_worker_with("w2", 1, None, &["--labels", "zone=b"]);
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempts"][0]["worker"], "w2", "only a member runs it: {t}");

    // Submits that cannot work.
    let (status, v) = c
        .post("/v1/tasks", json!({"swarm": "nope", "agent": "echo"}))
        .await;
    assert_eq!((status, v["error"]["code"].clone()), (404, json!("unknown_swarm")), "{v}");
    let (status, v) = c.post("/v1/tasks", json!({"payload": "x"})).await;
    assert_eq!(status, 400, "an agent is needed outside a ring: {v}");

    // The CLI reports the API's error and fails.
    let out = Command::new(bin())
        .args(["swarms", "create", "x", "--topology", "ring", "--api", &c.api])
        .env("SWARM_TOKEN", &c.token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ring"), "{err}");
}

/// Run the CLI against the cluster and return stdout, asserting success.
fn cli(c: &Cluster, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .args(["--api", &c.api])
        .env("SWARM_TOKEN", &c.token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "swarm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
