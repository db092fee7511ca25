//! Schedules across a leader kill: a three-coordinator cluster, a schedule every 2 s
//! catching up all missed ticks, the leader SIGKILLed mid-way; every tick from the first
//! to the last fired submitted exactly one task, none is missing, and all succeed.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::raft_cluster::RaftCluster;

const EVERY_MS: u64 = 2000;

/// The schedule's view from node `id` (forwarded to the leader).
async fn schedule(c: &RaftCluster, id: u64) -> Value {
    let (st, v) = c.get(id, "/v1/schedules/tick").await.expect("answers");
    assert_eq!(st, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_every_2s_fires_once_per_tick_across_a_leader_kill() {
    let mut c = RaftCluster::new(3, &[]);
    c.start_all();
    let leader = c.wait_leader().await;
    c.start_worker("w1", 4, None);
    c.wait_for(leader, "/v1/workers", "the worker", |v| {
        v["workers"].as_array().map_or(0, |a| a.len()) == 1
    })
    .await;

    // Bad definitions are refused with a clear error; nothing is created.
    let bad = |body: Value| {
        let c = &c;
        async move {
            c.request(leader, Method::POST, "/v1/schedules", Some(body))
                .await
                .expect("answers")
        }
    };
    let (st, v) = bad(json!({"name": "x", "cron": "61 * * * *", "task": {"agent": "echo"}})).await;
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (400, json!("invalid_schedule")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("cron"),
        "{v}"
    );
    let (st, v) = bad(json!({"name": "x", "every": "100ms", "task": {"agent": "echo"}})).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) =
        bad(json!({"name": "x", "every": "2s", "cron": "* * * * *", "task": {"agent": "echo"}}))
            .await;
    assert_eq!(st, 400, "{v}");

    // Created through the CLI, given every coordinator.
    let (code, out, err) = c.cli(&[
        "schedules",
        "create",
        "tick",
        "--api",
        &c.api_list(),
        "--agent",
        "echo",
        "--payload",
        "tick",
        "--every",
        "2s",
        "--catch-up",
        "all",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let created: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(created["every_ms"], EVERY_MS, "{created}");
    assert_eq!(created["catch_up"], "all");
    let created_at = created["created_at_ms"].as_u64().unwrap();
    let (st, v) = bad(json!({"name": "tick", "every": "5s", "task": {"agent": "echo"}})).await;
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("schedule_exists")),
        "{v}"
    );

    c.wait_for(leader, "/v1/schedules/tick", "three ticks", |v| {
        v["fired"].as_u64() >= Some(3)
    })
    .await;
    let before = schedule(&c, leader).await["fired"].as_u64().unwrap();

    // SIGKILL the leader; the others elect one and the schedule goes on from its next
    // tick, catching up any missed while there was no leader.
    c.kill_node(leader);
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    c.wait_for(
        new_leader,
        "/v1/schedules/tick",
        "four ticks after failover",
        |v| v["fired"].as_u64() >= Some(before + 4),
    )
    .await;

    // Pause, so that the counts hold still while they are checked.
    let (code, out, err) = c.cli(&[
        "schedules",
        "pause",
        "tick",
        "--api",
        &c.api_list(),
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let s: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(s["paused"], true);
    let fired = s["fired"].as_u64().unwrap();
    assert_eq!(
        (s["skipped"].as_u64(), s["refused"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    let last_tick = s["last_tick_ms"].as_u64().unwrap();

    // The tasks: one per tick, from the first tick after creation to the last fired, every
    // 2 s, none twice, none missing.
    let (st, list) = c
        .get(new_leader, "/v1/tasks?limit=1000")
        .await
        .expect("answers");
    assert_eq!(st, 200, "{list}");
    let mut ticks = Vec::new();
    let mut ids = Vec::new();
    for t in list["tasks"].as_array().unwrap() {
        let Some(key) = t["idempotency_key"].as_str() else {
            continue;
        };
        if let Some(tick) = key.strip_prefix("schedule:tick:") {
            ticks.push(tick.parse::<u64>().expect("a tick in the key"));
            ids.push(t["id"].as_u64().unwrap());
        }
    }
    assert_eq!(
        ticks.len() as u64,
        fired,
        "one task per fired tick: {ticks:?}"
    );
    let distinct: BTreeSet<u64> = ticks.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        ticks.len(),
        "a tick submitted twice: {ticks:?}"
    );
    let want: Vec<u64> = (1..=fired).map(|k| created_at + k * EVERY_MS).collect();
    let got: Vec<u64> = distinct.into_iter().collect();
    assert_eq!(got, want, "ticks missing or off the 2 s grid");
    assert_eq!(last_tick, *want.last().unwrap());
    for id in ids {
        let (st, t) = c
            .get(new_leader, &format!("/v1/tasks/{id}?wait=30s"))
            .await
            .expect("answers");
        assert_eq!((st, t["state"].clone()), (200, json!("succeeded")), "{t}");
        assert_eq!(t["output"], "tick");
    }

    // Listed, then deleted.
    let (code, out, err) = c.cli(&["schedules", "list", "--api", &c.api_list()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("tick") && out.contains("every 2s") && out.contains("paused"),
        "{out}"
    );
    let (code, out, err) = c.cli(&["schedules", "delete", "tick", "--api", &c.api_list()]);
    assert_eq!(code, 0, "{out}{err}");
    let (st, v) = c
        .get(new_leader, "/v1/schedules/tick")
        .await
        .expect("answers");
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (404, json!("unknown_schedule")),
        "{v}"
    );
}
