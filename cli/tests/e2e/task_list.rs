//! `GET /v1/tasks` newest first and with filters, against a real coordinator and worker;
//! bad listing queries get `400`. (The listing at scale is tested in the coordinator's
//! `tasks::listing_tests`.)

use serde_json::{json, Value};

use crate::harness::{bin, Cluster};

/// The ids of a listing's page, and its `next_after`.
fn page(v: &Value) -> (Vec<u64>, Option<u64>) {
    let ids = v["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("not a task list: {v}"))
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    (ids, v["next_after"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_listings_go_newest_first_filter_and_refuse_bad_queries() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker_with("w1", 4, None, &["--labels", "team=red"]);
    c.wait_workers(&["w1"]).await;

    // Six echo tasks that succeed, the even ones labelled (labels are what a worker
    // must carry: this one has team=red); three for an agent no worker has, with
    // another label (they stay queued), one of them cancelled.
    let echo: Vec<Value> = (0..6)
        .map(|i| {
            let labels = if i % 2 == 0 {
                json!({"team": "red"})
            } else {
                json!({})
            };
            json!({"agent": "echo", "payload": format!("hello World {i}"), "labels": labels})
        })
        .collect();
    let (status, v) = c.post("/v1/tasks/batch", json!({ "tasks": echo })).await;
    assert_eq!(status, 201, "{v}");
    let echo_ids: Vec<u64> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    for id in &echo_ids {
        assert_eq!(c.wait_final(*id).await["state"], "succeeded");
    }
    let mut idle = Vec::new();
    for i in 0..3 {
        idle.push(
            c.submit(
                json!({"agent": "nobody", "payload": format!("a Needle in hay {i}"),
                            "labels": {"team": "blue"}}),
            )
            .await,
        );
    }
    let (status, v) = c
        .post(&format!("/v1/tasks/{}/cancel", idle[0]), json!({}))
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("cancelled")),
        "{v}"
    );
    let mut all: Vec<u64> = echo_ids.iter().chain(&idle).copied().collect();
    all.sort_unstable();

    // Bad queries.
    let too_long = "x".repeat(257);
    for bad in [
        "order=sideways".to_string(),
        format!("text={too_long}"),
        "label=oops".to_string(),
        "label=team%3Dred,".to_string(),
        "label=%3Dred".to_string(),
    ] {
        let (status, v) = c.get(&format!("/v1/tasks?{bad}")).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {v}"
        );
    }
    let (status, _) = c.get(&format!("/v1/tasks?text={}", "x".repeat(256))).await;
    assert_eq!(status, 200);

    // Newest first, two a page, following `next_after`.
    let mut seen = Vec::new();
    let mut query = "/v1/tasks?order=desc&limit=2".to_string();
    loop {
        let (status, v) = c.get(&query).await;
        assert_eq!(status, 200, "{v}");
        let (ids, next) = page(&v);
        seen.extend(ids);
        let Some(next) = next else { break };
        query = format!("/v1/tasks?order=desc&limit=2&after={next}");
    }
    let mut newest_first = all.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    // `asc` is the default, and `after` counts in the listing's order.
    let (_, v) = c
        .get(&format!("/v1/tasks?order=asc&after={}", all[3]))
        .await;
    assert_eq!(page(&v), (all[4..].to_vec(), None));
    let (_, v) = c
        .get(&format!("/v1/tasks?order=desc&after={}", all[3]))
        .await;
    assert_eq!(page(&v), (vec![all[2], all[1], all[0]], None));

    // Filters.
    let (_, v) = c.get("/v1/tasks?agent=nobody&order=desc").await;
    assert_eq!(page(&v), (vec![idle[2], idle[1], idle[0]], None));
    let (_, v) = c.get("/v1/tasks?agent=nobody&state=queued").await;
    assert_eq!(page(&v), (vec![idle[1], idle[2]], None));
    let (_, v) = c.get("/v1/tasks?text=NEEDLE%20IN").await;
    assert_eq!(page(&v), (idle.clone(), None));
    let evens: Vec<u64> = echo_ids.iter().step_by(2).copied().collect();
    let (_, v) = c
        .get("/v1/tasks?label=team%3Dred&agent=echo&state=succeeded&swarm=default")
        .await;
    assert_eq!(page(&v), (evens.clone(), None));
    let (_, v) = c.get("/v1/tasks?label=team%3Dred,team%3Dblue").await;
    assert_eq!(page(&v), (vec![], None));
    let (_, v) = c.get("/v1/tasks?label=team%3Dblue&order=desc").await;
    assert_eq!(page(&v), (vec![idle[2], idle[1], idle[0]], None));
    let (_, v) = c.get("/v1/tasks?swarm=elsewhere").await;
    assert_eq!(page(&v), (vec![], None));
    // A full filtered page leads on from its last task.
    let (_, v) = c.get("/v1/tasks?text=world&order=desc&limit=2").await;
    assert_eq!(
        page(&v),
        (vec![echo_ids[5], echo_ids[4]], Some(echo_ids[4]))
    );

    // The CLI asks the same.
    let out = std::process::Command::new(bin())
        .args([
            "task", "list", "--desc", "--label", "team=red", "--text", "WORLD", "--agent", "echo",
        ])
        .env("SWARM_API", &c.api)
        .env("SWARM_TOKEN", &c.token)
        .env_remove("SWARM_CA")
        .output()
        .expect("run swarm task list");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<u64> = stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let mut want = evens;
    want.reverse();
    assert_eq!(listed, want, "{stdout}");
    c.assert_coordinator_alive();
}
