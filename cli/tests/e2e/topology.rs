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
            || metrics
                .contains("swarm_ring_stage_seconds_count{stage=\"1\",swarm=\"pipeline\"} 12"),
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
    assert_eq!(
        attempts.iter().filter(|a| stage_of(a) == 0).count(),
        1,
        "{t}"
    );
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
    let (status, v) = c
        .post(
            "/v1/swarms",
            json!({"name": "r", "topology": "ring", "stages": ["echo"]}),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "no_workers", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no workers"),
        "{v}"
    );

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
            // w1 has no peer listener, so it cannot be in a hierarchy.
            json!({"name": "h", "topology": "hierarchical", "labels": {"zone": "a"}}),
            409,
            "no_matching_workers",
        ),
        (
            json!({"name": "h", "topology": "hierarchical", "fan_out": 0}),
            400,
            "invalid_fan_out",
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
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (400, json!("invalid_json")),
        "{v}"
    );

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
    let (status, v) = c
        .post(
            "/v1/swarms",
            json!({
                "name": "later", "topology": "star", "labels": {"zone": "b"}, "allow_empty": true
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = c
        .post(
            "/v1/swarms",
            json!({"name": "later", "topology": "star", "allow_empty": true}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (409, json!("swarm_exists")),
        "{v}"
    );
    let id = c
        .submit(json!({"swarm": "later", "agent": "echo", "payload": "hi"}))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, t) = c.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(t["state"], "queued", "no member yet: {t}");
    c.start_worker_with("w2", 1, None, &["--labels", "zone=b"]);
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(
        t["attempts"][0]["worker"], "w2",
        "only a member runs it: {t}"
    );

    // Submits that cannot work.
    let (status, v) = c
        .post("/v1/tasks", json!({"swarm": "nope", "agent": "echo"}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (404, json!("unknown_swarm")),
        "{v}"
    );
    let (status, v) = c.post("/v1/tasks", json!({"payload": "x"})).await;
    assert_eq!(status, 400, "an agent is needed outside a ring: {v}");

    // The CLI reports the API's error and fails.
    let out = Command::new(bin())
        .args([
            "swarms",
            "create",
            "x",
            "--topology",
            "ring",
            "--api",
            &c.api,
        ])
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

/// An agent `work` that sleeps `ms` and returns its payload.
fn work_agent(dir: &Path, name: &str, ms: u64) -> PathBuf {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "[agents.work]\ncommand = \"sh\"\nargs = [\"-c\", \"sleep {}; cat\"]\n",
            ms as f64 / 1000.0
        ),
    )
    .unwrap();
    file
}

/// Submit `n` tasks to `swarm` in one batch; wait for all; return (wall time, tasks).
async fn run_batch(c: &Cluster, swarm: &str, n: usize) -> (Duration, Vec<Value>) {
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"swarm": swarm, "agent": "work", "payload": format!("{swarm}-{i}")}))
        .collect();
    let started = Instant::now();
    let (status, v) = c.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    assert_eq!(status, 201, "{v}");
    let mut done = Vec::new();
    for t in v["tasks"].as_array().unwrap() {
        let t = c.wait_final(t["id"].as_u64().unwrap()).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        done.push(t);
    }
    (started.elapsed(), done)
}

fn ran_on(tasks: &[Value], worker: &str) -> usize {
    tasks
        .iter()
        .filter(|t| {
            t["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .is_some_and(|a| a["worker"] == worker)
        })
        .count()
}

async fn metric(c: &Cluster, prefix: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", c.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_moves_queued_work_off_a_slow_worker() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let dir = c.dir.path().to_path_buf();
    let fast = work_agent(&dir, "fast", 60);
    let slow = work_agent(&dir, "slow", 900);
    for (id, agents) in [("m-fast-1", &fast), ("m-fast-2", &fast), ("m-slow", &slow)] {
        c.start_worker_with(
            id,
            1,
            Some(agents),
            &["--labels", "pool=mesh", "--peer-listen", "127.0.0.1:0"],
        );
    }
    c.wait_workers(&["m-fast-1", "m-fast-2", "m-slow"]).await;
    // The same members and the same queue depth: only the topology differs. Both swarms
    // exist at once: the peer links of the mesh must not carry the star's work.
    let n = 30;
    for (name, topology) in [("flat", "star"), ("net", "mesh")] {
        let (status, v) = c
            .post(
                "/v1/swarms",
                json!({"name": name, "topology": topology, "labels": {"pool": "mesh"}, "queue_depth": 4}),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let (_, v) = c.get("/v1/swarms/net").await;
    let layout = &v["layout"]["layout"];
    assert_eq!(layout["topology"], "mesh", "{v}");
    assert_eq!(layout["links"], 3, "3 workers, full mesh: {v}");
    assert_eq!(layout["connected"], true);
    let shown = cli(&c, &["swarms", "show", "net"]);
    assert!(
        shown.contains("mesh") && shown.contains("m-slow"),
        "{shown}"
    );
    // Let the links come up (each worker gossips every 250 ms once linked).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (star_time, star_tasks) = run_batch(&c, "flat", n).await;
    let (mesh_time, mesh_tasks) = run_batch(&c, "net", n).await;
    let star_slow = ran_on(&star_tasks, "m-slow");
    let mesh_slow = ran_on(&mesh_tasks, "m-slow");
    let moved: u64 = mesh_tasks
        .iter()
        .map(|t| t["moves"].as_u64().unwrap_or(0))
        .sum();
    let steals = metric(&c, "swarm_swarm_steals_total{swarm=\"net\"}").await;
    println!(
        "batch of {n}: star {star_time:?} ({star_slow} on the slow worker), \
         mesh {mesh_time:?} ({mesh_slow} on the slow worker, {moved} moved, {steals} steals)"
    );
    // Star: the slow worker keeps what it was given. Mesh: idle peers take its queue.
    assert!(
        star_slow >= 5,
        "star gave the slow worker its full queue: {star_slow}"
    );
    assert!(
        moved >= 1 && steals >= 1.0,
        "steals recorded: {moved} moves, {steals}"
    );
    assert!(
        mesh_slow < star_slow,
        "the mesh ran fewer tasks on the slow worker ({mesh_slow}) than star ({star_slow})"
    );
    assert_eq!(
        metric(&c, "swarm_swarm_steals_total{swarm=\"flat\"}").await,
        0.0,
        "no steals in a star"
    );
    assert_eq!(
        metric(&c, "swarm_swarm_steals_refused_total").await,
        0.0,
        "no steal had to be refused"
    );
    // A moved task's attempt names the worker that ran it.
    let stolen = mesh_tasks
        .iter()
        .find(|t| t["moves"].as_u64().unwrap_or(0) > 0)
        .unwrap();
    assert_ne!(stolen["attempts"][0]["worker"], "m-slow", "{stolen}");

    // A member dies: the mesh is re-planned over the survivors and keeps working. (Its
    // peers also notice the dead link by themselves and report `PeerLost` unless the
    // coordinator dropped the member from their lists first; the worker's own tests
    // check that detection with a peer that goes silent.)
    c.kill_worker("m-slow");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = c.get("/v1/swarms/net").await;
        if v["layout"]["layout"]["links"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "mesh not re-planned: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, after) = run_batch(&c, "net", 6).await;
    assert_eq!(ran_on(&after, "m-slow"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hierarchy_reaches_twenty_workers_through_five_connections_and_survives_a_lead() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let dir = c.dir.path().to_path_buf();
    let agents = work_agent(&dir, "work", 150);
    let ids: Vec<String> = (0..20).map(|i| format!("h{i:02}")).collect();
    for id in &ids {
        c.start_worker_with(
            id,
            2,
            Some(&agents),
            &["--labels", "pool=tree", "--peer-listen", "127.0.0.1:0"],
        );
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    c.wait_workers(&refs).await;
    let (status, v) = c
        .post(
            "/v1/swarms",
            json!({"name": "tree", "topology": "hierarchical", "labels": {"pool": "tree"}, "fan_out": 4}),
        )
        .await;
    assert_eq!(status, 201, "{v}");

    // Members move behind their leads: the coordinator ends up holding one connection
    // per lead.
    let direct = |v: &Value| -> Vec<String> {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w.get("via").is_none())
            .map(|w| w["id"].as_str().unwrap().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let leads = loop {
        let (_, w) = c.get("/v1/workers").await;
        let (_, s) = c.get("/v1/swarms/tree").await;
        let leads = sorted_leads(&s);
        let d = direct(&w);
        if w["workers"].as_array().unwrap().len() == 20 && !leads.is_empty() && d == leads {
            break leads;
        }
        assert!(
            Instant::now() < deadline,
            "members never moved behind leads: {w}\n{s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        leads.len() <= 5,
        "at most 5 leads for 20 workers at fan-out 4: {leads:?}"
    );
    // The gauge is refreshed every few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&c, "swarm_worker_connections ").await as usize != leads.len() {
        assert!(
            Instant::now() < deadline,
            "swarm_worker_connections never reached {}",
            leads.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = cli(&c, &["status"]);
    assert!(status.contains("hierarchical (fan-out 4)"), "{status}");
    assert!(status.contains("relayed by their leads"), "{status}");

    // Load, and a lead killed in the middle of it: every task still completes.
    let tasks: Vec<Value> = (0..200)
        .map(|i| json!({"swarm": "tree", "agent": "work", "payload": format!("t{i}"), "max_attempts": 5}))
        .collect();
    let (status, v) = c.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    assert_eq!(status, 201, "{v}");
    let task_ids: Vec<u64> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    // Wait until some tasks ran, then kill a lead with children.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, s) = c.get("/v1/status").await;
        if s["queue"]["succeeded"].as_u64().unwrap_or(0) >= 20 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = leads[0].clone();
    c.kill_worker(&victim);
    let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
    for id in &task_ids {
        let t = c.wait_final(*id).await;
        assert_eq!(t["state"], "succeeded", "no task lost: {t}");
        let w = t["attempts"].as_array().unwrap().last().unwrap()["worker"]
            .as_str()
            .unwrap()
            .to_string();
        *by_worker.entry(w).or_default() += 1;
    }
    println!("tasks per worker: {by_worker:?}");
    assert!(
        by_worker.len() >= 10,
        "the work spread over the members: {by_worker:?}"
    );

    // The orphans re-parented: 19 workers, all but the leads relayed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, w) = c.get("/v1/workers").await;
        let (_, s) = c.get("/v1/swarms/tree").await;
        let leads = sorted_leads(&s);
        if w["workers"].as_array().unwrap().len() == 19
            && direct(&w) == leads
            && !leads.contains(&victim)
        {
            assert!(leads.len() <= 5, "{leads:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no re-parenting: {w}\n{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&c, "swarm_relayed_sessions_total").await >= 15.0);
}

/// The leads of a hierarchical swarm's layout (`GET /v1/swarms/{name}`), sorted.
fn sorted_leads(swarm: &Value) -> Vec<String> {
    let mut leads: Vec<String> = swarm["layout"]["layout"]["leads"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|l| l["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    leads.sort();
    leads
}
