//! End-to-end throughput and latency of no-op tasks, every submit and result durably
//! committed (Raft log fsync'd) before it is acknowledged.
//!
//! Starts one coordinator and `--workers` workers in this process, on loopback, with
//! real certificates, real QUIC and the real HTTP API, then measures:
//! * **throughput**: `--tasks` echo tasks submitted by one client (`--concurrency`
//!   requests in flight, one task each; or `--batch` tasks per request), then all awaited;
//! * **latency**: `--rounds` sequential submit-and-wait round trips (p50/p90/p99).
//!
//! `--nodes 3` runs the same against a three-coordinator Raft cluster (all in this
//! process, so on a small machine the replicas compete with the leader for CPU).
//!
//! `--pending-graph 10000` first parks that many graph tasks, `waiting` on a parent that
//! runs for the whole measurement (what many pending graph tasks cost dispatch).
//!
//! `--keys 1000` gives task `i` the concurrency key `k:{i % 1000}` (fair dispatch across
//! 1,000 lanes; each attempt's start is recorded before it is sent); `--key-limit N`
//! also caps each key at N running tasks.
//!
//! Run: `cargo run --release -p swarm-benches --bin throughput [-- --nodes 3]`

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use swarm_benches::inproc::{
    run_throughput, spawn_worker, start_cluster, wait_for_workers, worker_config, ThroughputRun,
};

#[derive(Parser, Clone)]
struct Args {
    /// Tasks in the throughput run.
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Requests in flight during the throughput run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Tasks per request (1: one task per `POST /v1/tasks`; more: `POST /v1/tasks/batch`).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Sequential round trips in the latency run.
    #[arg(long, default_value_t = 2_000)]
    rounds: usize,
    /// Workers.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Slots per worker.
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// Coordinators in the Raft cluster (1, 3 or 5), all in this process; the client
    /// talks to the leader.
    #[arg(long, default_value_t = 1)]
    nodes: u64,
    /// Run the tasks in a swarm of this topology over all workers: `star` (the default
    /// swarm) or `hierarchical` (workers behind leads, which relay their sessions).
    #[arg(long, default_value = "star", value_parser = ["star", "hierarchical"])]
    topology: String,
    /// Hierarchical: workers per lead.
    #[arg(long, default_value_t = 4)]
    fan_out: u32,
    /// Before measuring, submit this many graph tasks (at most 10,000) that wait on a
    /// running parent, so they sit in the table, `waiting`, for the whole run.
    #[arg(long, default_value_t = 0)]
    pending_graph: usize,
    /// Give task `i` (and each round trip) concurrency key `k:{i % keys}`.
    #[arg(long, default_value_t = 0)]
    keys: usize,
    /// With `--keys`: at most this many running tasks per key (0: no limit).
    #[arg(long, default_value_t = 0)]
    key_limit: u32,
}

impl Args {
    /// The swarm the tasks name.
    fn swarm(&self) -> &'static str {
        if self.topology == "hierarchical" {
            "bench-tree"
        } else {
            "default"
        }
    }

    /// The throughput run these arguments describe.
    fn run(&self) -> ThroughputRun {
        ThroughputRun {
            tasks: self.tasks,
            concurrency: self.concurrency,
            batch: self.batch,
            swarm: self.swarm(),
            keys: self.keys,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir().context("tempdir")?;
    let certs = dir.path().join("certs");
    swarm_transport::init_certs(&certs, &[], false)?;
    let token = "bench-token".to_string();
    let (coords, leader) = start_cluster(args.nodes.max(1), dir.path(), &certs, &token).await?;
    let coord = &coords[leader];
    let quic: Vec<String> = coords.iter().map(|c| c.quic_addr.to_string()).collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for i in 0..args.workers {
        let wcfg = swarm_worker::WorkerConfig {
            peer_listen: (args.topology == "hierarchical")
                .then(|| "127.0.0.1:0".parse())
                .transpose()?,
            ..worker_config(&quic, &certs, i, args.slots)
        };
        spawn_worker(wcfg, stop_rx.clone());
    }
    let api = format!("http://{}", coord.api_addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(8))
        .build()?;
    wait_for_workers(&http, &api, &token, args.workers as usize).await?;
    if args.topology == "hierarchical" {
        let leads = hierarchy(&http, &api, &token, &args).await?;
        println!(
            "# hierarchical swarm: {} workers behind {leads} leads (fan-out {}): the coordinator holds {leads} worker connections",
            args.workers, args.fan_out
        );
    }

    // Warm up connections and code paths.
    run_throughput(
        &http,
        &api,
        &token,
        &ThroughputRun {
            tasks: 500,
            ..args.run()
        },
    )
    .await?;

    if args.key_limit > 0 {
        let r = http
            .put(format!("{api}/v1/limits/k"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"concurrency": args.key_limit}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("setting the key limit: {}", r.text().await?);
        }
        println!(
            "# each of {} keys limited to {} running",
            args.keys, args.key_limit
        );
    }
    if args.pending_graph > 0 {
        let parent = pending_graph(&http, &api, &token, args.pending_graph).await?;
        println!(
            "# {} graph tasks waiting (dependants of task {parent}, running for the whole run)",
            args.pending_graph
        );
    }

    println!(
        "# swarm end-to-end benchmark ({} coordinator(s) in one Raft cluster, {} workers x {} slots, loopback, fsync'd Raft log)",
        args.nodes.max(1),
        args.workers,
        args.slots
    );
    let (elapsed, n) = run_throughput(&http, &api, &token, &args.run()).await?;
    println!(
        "throughput: {n} no-op tasks submitted (concurrency {}, {} per request) then awaited in {:.3} s = {:.0} tasks/s",
        args.concurrency,
        args.batch,
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );

    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    for i in 0..args.rounds {
        let t0 = Instant::now();
        let resp: serde_json::Value = http
            .post(format!("{api}/v1/tasks?wait=10s"))
            .bearer_auth(&token)
            .json(&args.run().task(i))
            .send()
            .await?
            .json()
            .await?;
        let us = t0.elapsed().as_micros() as u64;
        if resp["task"]["state"] != "succeeded" {
            bail!("round trip {i} did not succeed: {resp}");
        }
        hist.record(us)?;
    }
    println!(
        "latency: {} sequential submit->result round trips: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        args.rounds,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.9) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );
    if let Some(h) = swarm_coordinator::metrics::handle() {
        let text = h.render();
        for l in text.lines().filter(|l| {
            l.starts_with("swarm_raft_batch_ops_sum")
                || l.starts_with("swarm_raft_batch_ops_count")
                || l.starts_with("swarm_raft_commit_seconds_sum")
                || l.starts_with("swarm_raft_commit_seconds_count")
                || l.starts_with("swarm_raft_log_write_seconds_sum")
                || l.starts_with("swarm_raft_log_write_seconds_count")
        }) {
            println!("  {l}");
        }
    }
    let _ = stop_tx.send(true);
    for c in coords {
        c.shutdown().await;
    }
    Ok(())
}

/// Submit a parent that runs for an hour and `n` dependants of it (batches of 1,000);
/// returns the parent's id once every dependant is committed, `waiting`.
async fn pending_graph(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    n: usize,
) -> anyhow::Result<u64> {
    let hour = 3_600_000u64;
    let resp: serde_json::Value = http
        .post(format!("{api}/v1/tasks"))
        .bearer_auth(token)
        .json(&serde_json::json!({"agent": "sleep", "payload": {"ms": hour}, "timeout_ms": hour}))
        .send()
        .await?
        .json()
        .await?;
    let Some(parent) = resp["id"].as_u64() else {
        bail!("submitting the parent: {resp}");
    };
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let tasks: Vec<serde_json::Value> = (0..k)
            .map(|i| serde_json::json!({"agent": "echo", "payload": i.to_string(), "depends_on": [parent]}))
            .collect();
        let resp = http
            .post(format!("{api}/v1/tasks/batch"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "tasks": tasks }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("submitting dependants: {}", resp.text().await?);
        }
        left -= k;
    }
    let status: serde_json::Value = http
        .get(format!("{api}/v1/status"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    let waiting = status["queue"]["waiting"].as_u64().unwrap_or(0);
    if waiting != n as u64 {
        bail!("{waiting} tasks waiting, expected {n}: {status}");
    }
    Ok(parent)
}

/// Create the hierarchical swarm and wait until every member's session is relayed by a
/// lead. Returns the number of leads (= worker connections the coordinator holds).
async fn hierarchy(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    args: &Args,
) -> anyhow::Result<usize> {
    let resp = http
        .post(format!("{api}/v1/swarms"))
        .bearer_auth(token)
        .json(&serde_json::json!({"name": args.swarm(), "topology": "hierarchical", "fan_out": args.fan_out}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("creating the swarm: {}", resp.text().await?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s: serde_json::Value = http
            .get(format!("{api}/v1/swarms/{}", args.swarm()))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let leads = s["layout"]["layout"]["leads"]
            .as_array()
            .map_or(0, Vec::len);
        let w: serde_json::Value = http
            .get(format!("{api}/v1/workers"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let workers = w["workers"].as_array().map_or(&[][..], |a| a.as_slice());
        let relayed = workers.iter().filter(|w| w.get("via").is_some()).count();
        if leads > 0 && workers.len() == args.workers as usize && relayed + leads == workers.len() {
            return Ok(leads);
        }
        if Instant::now() > deadline {
            bail!("members never moved behind their leads: {s}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
