//! Faults with real processes: a worker killed mid-task, a coordinator restarted.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Cluster, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_of_a_killed_worker_completes_on_the_other() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 1, None);
    c.wait_workers(&["w1"]).await;

    // Only w1 exists, so the task lands there.
    let id = c
        .submit(json!({"agent": "sleep", "payload": "3000", "max_attempts": 3}))
        .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, t) = c.get(&format!("/v1/tasks/{id}")).await;
        if t["state"] == "running" {
            assert_eq!(t["attempts"][0]["worker"], "w1");
            break;
        }
        assert!(Instant::now() < deadline, "task never started: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.start_worker("w2", 1, None);
    c.wait_workers(&["w1", "w2"]).await;
    c.kill_worker("w1");

    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let attempts = t["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{t}");
    assert_eq!(attempts[0]["worker"], "w1");
    assert_eq!(attempts[0]["outcome"], "lost");
    assert_eq!(attempts[1]["worker"], "w2");
    assert_eq!(attempts[1]["outcome"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinator_keeps_queued_and_finished_tasks() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 4, None);
    c.wait_workers(&["w1"]).await;

    let mut done = Vec::new();
    for i in 0..20 {
        let id = c
            .submit(json!({"agent": "echo", "payload": format!("done-{i}")}))
            .await;
        done.push(id);
    }
    for id in &done {
        assert_eq!(c.wait_final(*id).await["state"], "succeeded");
    }
    // Queued tasks: only a label no worker has, so they stay queued.
    let mut queued = Vec::new();
    for i in 0..20 {
        let id = c
            .submit(
                json!({"agent": "echo", "payload": format!("q-{i}"), "labels": {"zone": "mars"}}),
            )
            .await;
        queued.push(id);
    }

    c.kill_coordinator();
    c.start_coordinator();
    c.wait_ready().await;

    for (i, id) in done.iter().enumerate() {
        let (status, t) = c.get(&format!("/v1/tasks/{id}")).await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["state"], "succeeded");
        assert_eq!(t["output"], format!("done-{i}"));
    }
    for id in &queued {
        let (status, t) = c.get(&format!("/v1/tasks/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(t["state"], "queued", "{t}");
    }
    // The worker reconnects by itself, and new work still flows.
    c.wait_workers(&["w1"]).await;
    let id = c
        .submit(json!({"agent": "echo", "payload": "after restart"}))
        .await;
    assert_eq!(c.wait_final(id).await["output"], "after restart");
    // Ids keep increasing across the restart.
    assert!(id > *queued.last().unwrap());
}
