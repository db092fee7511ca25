//! Concurrency keys and rate limits against a real coordinator and worker: ten tenants'
//! backlogs under a key limit of 2 start interleaved and never run more than 2 at once
//! per key; a 5/s bucket spaces 50 starts over more than 9 s, never 6 within a second;
//! a key limit and a bucket together finish without deadlock; refusals; the CLI.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::harness::Cluster;

/// (first attempt's start, last attempt's end) of every attempt of a task.
fn intervals(t: &Value) -> Vec<(u64, u64)> {
    t["attempts"]
        .as_array()
        .unwrap_or_else(|| panic!("no attempts: {t}"))
        .iter()
        .map(|a| {
            (
                a["started_at_ms"].as_u64().unwrap(),
                a["finished_at_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Most intervals `[start, end)` that overlap at any moment.
fn most_at_once(mut spans: Vec<(u64, u64)>) -> usize {
    let mut edges: Vec<(u64, i32)> = Vec::new();
    for (s, e) in spans.drain(..) {
        edges.push((s, 1));
        edges.push((e.max(s), -1));
    }
    // Ends before starts at the same millisecond: half-open intervals.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

async fn submit_batch(c: &Cluster, tasks: Vec<Value>) -> Vec<u64> {
    let (status, v) = c.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    assert_eq!(status, 201, "{v}");
    v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_tenants_share_dispatch_and_no_key_passes_its_limit() {
    const TENANTS: usize = 10;
    const EACH: usize = 1_000;
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let (code, out, err) = c.cli(&["limits", "set", "tenant", "--concurrency", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 per key"), "{out}");

    // Each tenant's whole backlog, one tenant after the other, before any worker is
    // there: tenant 9's tasks are the newest 1,000.
    let mut ids: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for tenant in 0..TENANTS {
        let key = format!("tenant:{tenant}");
        for _ in 0..EACH / 500 {
            let tasks = (0..500)
                .map(|_| json!({"agent": "sleep", "payload": 2, "concurrency_key": key}))
                .collect();
            ids.entry(key.clone())
                .or_default()
                .extend(submit_batch(&c, tasks).await);
        }
    }
    let (_, limits) = c.get("/v1/limits").await;
    assert_eq!(
        limits["limits"][0]["queued"],
        (TENANTS * EACH) as u64,
        "{limits}"
    );

    c.start_worker("w1", 32, None);
    c.wait_workers(&["w1"]).await;

    let mut starts: Vec<(u64, usize)> = Vec::new();
    for (tenant, (key, ids)) in ids.iter().enumerate() {
        let mut spans = Vec::new();
        for &id in ids {
            let t = c.wait_final(id).await;
            assert_eq!(t["state"], "succeeded", "{t}");
            assert_eq!(t["concurrency_key"], key.as_str(), "{t}");
            let mine = intervals(&t);
            starts.push((mine[0].0, tenant));
            spans.extend(mine);
        }
        let most = most_at_once(spans);
        assert!(most <= 2, "{key} ran {most} attempts at once");
    }
    // Interleaved: among the first 200 starts every tenant had its share (20 each if
    // exactly round-robin; at least 10 asked), though tenant 0 submitted first.
    starts.sort();
    let mut early = [0usize; TENANTS];
    for (_, tenant) in &starts[..200] {
        early[*tenant] += 1;
    }
    assert!(
        early.iter().all(|&n| n >= 10),
        "the first 200 starts by tenant: {early:?}"
    );
    // The last tenant's first task started long before the first tenant's backlog ran
    // out.
    let first_of_last = starts.iter().find(|(_, t)| *t == TENANTS - 1).unwrap().0;
    let tenant0: Vec<u64> = starts
        .iter()
        .filter(|(_, t)| *t == 0)
        .map(|s| s.0)
        .collect();
    assert!(
        first_of_last < tenant0[EACH / 10],
        "tenant 9 waited for tenant 0"
    );

    let (code, out, err) = c.cli(&["limits", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tenant") && out.contains("0 in 0 keys"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_spaces_starts_and_composes_with_a_key_limit() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 16, None);
    c.wait_workers(&["w1"]).await;

    // Refusals first: an unknown limit, bad definitions.
    let (status, v) = c
        .post("/v1/tasks", json!({"agent": "echo", "rate_limit": "five"}))
        .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "unknown_limit", "{v}");
    for (body, words) in [
        (json!({}), "a concurrency, a rate, or both"),
        (json!({"rate": "5/fortnight"}), "unknown period"),
        (json!({"rate": "5/s", "burst": 0}), "burst"),
        (json!({"burst": 3}), "goes with a `rate`"),
        (json!({"concurrency": 0}), "at least 1"),
        (json!({"rate": "5/s", "extra": 1}), "unknown field"),
    ] {
        let (status, v) = c
            .request(reqwest::Method::PUT, "/v1/limits/five", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(words)
                || v.to_string().contains(words),
            "{body}: {v}"
        );
    }
    let (code, out, err) = c.cli(&["limits", "set", "five", "--rate", "5/s"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = c.cli(&["limits", "set", "mix", "--concurrency", "1"]);
    assert_eq!(code, 0, "{out}{err}");

    let tasks = (0..50)
        .map(|i| json!({"agent": "echo", "payload": i, "rate_limit": "five"}))
        .collect();
    let ids = submit_batch(&c, tasks).await;
    // Both controls at once: the key allows one at a time, the bucket 5/s.
    let tasks = (0..10)
        .map(|i| json!({"agent": "sleep", "payload": 50, "rate_limit": "five", "concurrency_key": "mix", "priority": i % 2}))
        .collect();
    let mixed = submit_batch(&c, tasks).await;

    let mut starts = Vec::new();
    for &id in &ids {
        let t = c.wait_final(id).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["rate_limit"], "five", "{t}");
        starts.extend(intervals(&t).into_iter().map(|(s, _)| s));
    }
    let mut mix_spans = Vec::new();
    for &id in &mixed {
        let t = c.wait_final(id).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        mix_spans.extend(intervals(&t));
        starts.extend(intervals(&t).into_iter().map(|(s, _)| s));
    }
    assert!(most_at_once(mix_spans) <= 1);
    starts.sort();
    assert_eq!(starts.len(), 60);
    // Never 6 starts within one second (the bucket holds 1 and gains 5/s)...
    for w in starts.windows(6) {
        assert!(w[5] - w[0] >= 1_000, "6 starts within a second: {w:?}");
    }
    // ... so 60 of them take at least 11 s.
    assert!(
        starts[59] - starts[0] >= 11_000,
        "60 starts from {} to {}",
        starts[0],
        starts[59]
    );

    let (code, _, err) = c.cli(&["limits", "delete", "mix"]);
    assert_eq!(code, 0, "{err}");
    let (status, v) = c.get("/v1/limits/mix").await;
    assert_eq!(status, 404, "{v}");
    let (_, v) = c.get("/v1/limits").await;
    assert_eq!(v["limits"][0]["name"], "five", "{v}");
    assert_eq!(v["limits"][0]["rate"], "5/s", "{v}");
}
