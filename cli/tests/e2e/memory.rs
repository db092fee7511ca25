//! Vector memory and the ReasoningBank through the real coordinator and workers:
//! collections over HTTP, patterns handed to an agent over QUIC, judged and distilled,
//! everything durable across a SIGKILL.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{Cluster, WAIT};

async fn patterns(c: &Cluster) -> Vec<Value> {
    let (st, v) = c.get("/v1/patterns").await;
    assert_eq!(st, 200, "{v}");
    v["patterns"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_search_filter_delete_and_bad_input() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;

    let (st, v) = c
        .request(
            reqwest::Method::PUT,
            "/v1/memory/docs",
            Some(json!({"dimension": 3, "metric": "cosine"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = c
        .post(
            "/v1/memory/docs/points",
            json!({"points": [
                {"id": "a", "vector": [1.0, 0.0, 0.0], "metadata": {"lang": "rust"}},
                {"id": "b", "vector": [0.9, 0.1, 0.0], "metadata": {"lang": "go"}},
                {"id": "c", "vector": [0.0, 1.0, 0.0], "metadata": {"lang": "rust"}},
                {"id": "d", "vector": [0.0, 0.0, 1.0], "ttl_ms": 1}
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = c
        .post(
            "/v1/memory/docs/search",
            json!({"vector": [1.0, 0.05, 0.0], "k": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let ids: Vec<&str> = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"], "{v}");
    // The filter applies during the search: only rust documents, still k of them.
    let (_, v) = c
        .post(
            "/v1/memory/docs/search",
            json!({"vector": [1.0, 0.05, 0.0], "k": 2, "filter": {"lang": "rust"}}),
        )
        .await;
    let ids: Vec<&str> = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "c"], "{v}");
    assert_eq!(v["hits"][0]["metadata"]["lang"], "rust");
    // Expired and deleted points are never returned.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (st, v) = c
        .post("/v1/memory/docs/delete", json!({"ids": ["a"]}))
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = c
        .post(
            "/v1/memory/docs/search",
            json!({"vector": [0.0, 0.0, 1.0], "k": 10}),
        )
        .await;
    let ids: Vec<&str> = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&"a") && !ids.contains(&"d"), "{v}");
    assert_eq!(ids.len(), 2, "{v}");

    // Bad input: clear errors, nothing changed.
    let (st, v) = c
        .post(
            "/v1/memory/docs/points",
            json!({"points": [{"id": "x", "vector": [1.0, 2.0]}]}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("dimension_mismatch")),
        "{v}"
    );
    let (st, v) = c
        .post("/v1/memory/nope/search", json!({"vector": [1.0, 0.0, 0.0]}))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("unknown_collection")),
        "{v}"
    );
    let big = "x".repeat(20_000);
    let (st, v) = c
        .post(
            "/v1/memory/docs/points",
            json!({"points": [{"id": "y", "vector": [1.0, 0.0, 0.0], "metadata": {"blob": big}}]}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (413, Some("metadata_too_large")),
        "{v}"
    );
    let (st, v) = c
        .post(
            "/v1/memory/docs/points",
            json!({"points": [{"id": "z", "vector": [0.0, 0.0, 0.0]}]}),
        )
        .await;
    assert_eq!(st, 400, "zero vector with cosine: {v}");
    let (st, v) = c
        .request(
            reqwest::Method::PUT,
            "/v1/memory/docs",
            Some(json!({"dimension": 3, "metric": "hamming"})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    let (_, v) = c.get("/v1/memory/docs").await;
    assert_eq!(v["live"], 2, "{v}");

    // Durable: a SIGKILLed coordinator comes back with the same collection.
    c.kill_coordinator();
    c.start_coordinator();
    c.wait_ready().await;
    let (st, v) = c
        .post(
            "/v1/memory/docs/search",
            json!({"vector": [0.0, 1.0, 0.0], "k": 1, "filter": {"lang": "rust"}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["hits"][0]["id"], "c", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_patterns_over_quic_and_outcomes_are_judged_and_distilled() {
    let mut c = Cluster::new(&["--distill", "agent"]);
    c.start_coordinator();
    c.wait_ready().await;
    // An agent that returns the patterns it was handed, plus a lesson of its own.
    let agents = c.dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        r#"
[agents.learner]
command = "sh"
args = ["-c", '''ids=$(grep -o 'pat-[0-9]*' "$SWARM_PATTERNS_FILE" | sort -u | tr '\n' ' '); printf '{"used": "%s", "memory_items": [{"title": "Retry flaky downloads", "description": "mirrors time out", "content": "wrap downloads in three retries with backoff"}]}' "$ids"''']
"#,
    )
    .expect("agents file");
    c.start_worker("w1", 2, Some(&agents));
    c.wait_workers(&["w1"]).await;

    let (code, out, err) = {
        let out = std::process::Command::new(crate::harness::bin())
            .args(["patterns", "add", "--api", &c.api, "--token", &c.token])
            .args(["--title", "Cache the cargo registry"])
            .args([
                "--content",
                "mount ~/.cargo/registry as a cache in CI builds",
            ])
            .args(["--outcome", "success"])
            .output()
            .expect("swarm patterns add");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{out}{err}");
    let (st, v) = c
        .post(
            "/v1/patterns",
            json!({"items": [
                {"title": "Avoid global locks", "content": "a global mutex serialised all requests", "outcome": "failure"},
                {"title": "Speed up CI builds", "content": "cache the cargo registry and the target dir in CI", "outcome": "success"}
            ]}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = c
        .post(
            "/v1/patterns/retrieve",
            json!({"query": "how do I make CI builds with cargo faster", "k": 2}),
        )
        .await;
    let titles: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item"]["title"].as_str().unwrap())
        .collect();
    assert!(
        titles.contains(&"Speed up CI builds") || titles.contains(&"Cache the cargo registry"),
        "{v}"
    );

    let (task_id, output) = c
        .run_json_task(
            json!({"agent": "learner", "payload": "make the cargo CI build faster", "patterns": 2}),
        )
        .await;
    let used: Vec<String> = output["used"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with("pat-"))
        .map(String::from)
        .collect();
    assert_eq!(used.len(), 2, "the agent got two patterns: {output}");

    // The outcome was judged against exactly those two, and the agent's lesson was added.
    let deadline = Instant::now() + WAIT;
    loop {
        let ps = patterns(&c).await;
        let judged = ps
            .iter()
            .filter(|p| p["use_count"] == 1 && p["success_count"] == 1)
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>();
        let learnt = ps
            .iter()
            .any(|p| p["title"] == "Retry flaky downloads" && p["source_task"] == task_id);
        if judged.len() == 2 && learnt {
            let mut judged = judged;
            judged.sort();
            let mut used = used.clone();
            used.sort();
            assert_eq!(judged, used);
            break;
        }
        assert!(Instant::now() < deadline, "not judged/distilled: {ps:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, m) = c.get("/metrics").await;
    assert!(
        m.as_str()
            .unwrap_or_default()
            .contains("swarm_memory_retrieve_seconds"),
        "retrieval latency on /metrics"
    );

    // Patterns survive a SIGKILL of the coordinator.
    let before = patterns(&c).await.len();
    c.kill_coordinator();
    c.start_coordinator();
    c.wait_ready().await;
    assert_eq!(patterns(&c).await.len(), before);
}

/// Points of a unit-ish cloud, deterministic (a linear congruential generator).
fn cloud(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            (0..dim)
                .map(|_| {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        })
        .collect()
}

/// A rebuild of a collection above 1,000 points runs beside the op stream: the delete
/// that starts it is answered before the graph is rebuilt, tasks run meanwhile, a
/// checkpoint taken meanwhile and a SIGKILL do not lose it, and the leader swaps the new
/// graph in (generation 1, tombstones dropped, searches exact on a known point).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_rebuild_runs_beside_the_task_queue_and_survives_sigkill() {
    let mut c = Cluster::new(&["--snapshot-every", "4"]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 4, None);
    c.wait_workers(&["w1"]).await;
    let dim = 16;
    let points = cloud(4000, dim, 42);
    let (st, v) = c
        .request(
            reqwest::Method::PUT,
            "/v1/memory/big",
            Some(json!({"dimension": dim, "metric": "l2"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    for (b, chunk) in points.chunks(500).enumerate() {
        let batch: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, p)| json!({"id": format!("p{}", b * 500 + i), "vector": p}))
            .collect();
        let (st, v) = c
            .post("/v1/memory/big/points", json!({ "points": batch }))
            .await;
        assert_eq!(st, 200, "{v}");
    }
    // Half the points go: 2,000 tombstones against 2,000 live starts a rebuild of 2,000.
    let ids: Vec<String> = (0..2000).map(|i| format!("p{}", 2 * i + 1)).collect();
    let (st, v) = c.post("/v1/memory/big/delete", json!({ "ids": ids })).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["Deleted"]["deleted"], 2000, "{v}");
    assert_eq!(v["Deleted"]["rebuilt"], true, "{v}");
    let (_, info) = c.get("/v1/memory/big").await;
    assert_eq!(
        (
            &info["generation"],
            &info["tombstones"],
            &info["rebuilding"]
        ),
        (&json!(0), &json!(2000), &json!(true)),
        "the delete was answered before the graph was rebuilt: {info}"
    );
    // Tasks are taken and finished meanwhile.
    for i in 0..5 {
        let id = c
            .submit(json!({"agent": "echo", "payload": {"n": i}}))
            .await;
        assert_eq!(c.wait_final(id).await["state"], "succeeded");
    }
    // A SIGKILL while it may still be under way: the node comes back with it (from
    // the checkpoint that recorded it, or by applying the delete again) and finishes it.
    c.kill_coordinator();
    c.start_coordinator();
    c.wait_ready().await;
    let deadline = Instant::now() + WAIT;
    let info = loop {
        let (st, info) = c.get("/v1/memory/big").await;
        assert_eq!(st, 200, "{info}");
        // The restarted node scans exactly until its indexer has re-inserted every point.
        if info["rebuilding"] == false && info["unindexed"] == 0 {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the rebuild never finished: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (&info["live"], &info["tombstones"], &info["generation"]),
        (&json!(2000), &json!(0), &json!(1)),
        "{info}"
    );
    // The rebuilt graph finds a kept point and never a deleted one.
    let (st, v) = c
        .post(
            "/v1/memory/big/search",
            json!({"vector": points[1234], "k": 3}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["hits"][0]["id"], "p1234", "{v}");
    let (_, v) = c
        .post(
            "/v1/memory/big/search",
            json!({"vector": points[1235], "k": 3}),
        )
        .await;
    assert!(
        v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["id"] != "p1235"),
        "{v}"
    );
}
