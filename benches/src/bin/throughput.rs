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
//! Run: `cargo run --release -p swarm-benches --bin throughput [-- --nodes 3]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use swarm_benches::processes::free_port;
use swarm_coordinator::CoordinatorConfig;
use tokio::sync::Semaphore;

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
}

/// Start `n` coordinators forming one cluster; returns them and the leader's index.
async fn start_cluster(
    n: u64,
    dir: &std::path::Path,
    certs: &std::path::Path,
    token: &str,
) -> anyhow::Result<(Vec<swarm_coordinator::CoordinatorHandle>, usize)> {
    use swarm_coordinator::raft::NodeAddr;
    let ports: Vec<(u16, u16)> = (0..n)
        .map(|_| Ok((free_port(true)?, free_port(false)?)))
        .collect::<anyhow::Result<_>>()?;
    let addr = |i: usize| NodeAddr {
        raft_addr: format!("127.0.0.1:{}", ports[i].0),
        api_addr: format!("127.0.0.1:{}", ports[i].1),
    };
    let mut handles = Vec::new();
    for (i, (quic, api)) in ports.iter().enumerate() {
        let mut cfg = CoordinatorConfig::single_node(
            dir.join(format!("coordinator-{}", i + 1)),
            certs.to_path_buf(),
            format!("127.0.0.1:{quic}").parse()?,
            format!("127.0.0.1:{api}").parse()?,
            token.to_string(),
        );
        cfg.node_id = i as u64 + 1;
        cfg.bootstrap = i == 0;
        cfg.api_advertise = addr(i).api_addr;
        if i == 0 {
            cfg.peers = (1..n as usize).map(|j| (j as u64 + 1, addr(j))).collect();
        }
        handles.push(swarm_coordinator::start(cfg).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(i) = handles.iter().position(|h| h.node().is_leader()) {
            return Ok((handles, i));
        }
        if Instant::now() > deadline {
            bail!("no leader elected");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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
            coordinators: quic.clone(),
            server_name: Some("localhost".into()),
            certs_dir: certs.clone(),
            worker_id: format!("bench-{i}"),
            slots: args.slots,
            labels: BTreeMap::new(),
            agents_file: None,
            peer_listen: (args.topology == "hierarchical")
                .then(|| "127.0.0.1:0".parse())
                .transpose()?,
            peer_advertise: None,
            peer_server_name: None,
            drain_timeout: Duration::ZERO,
            log_tail_bytes: swarm_worker::DEFAULT_LOG_TAIL_BYTES,
        };
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.changed().await;
            };
            let _ = swarm_worker::run_worker(wcfg, std::future::pending(), stop).await;
        });
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
        &Args {
            tasks: 500,
            ..args.clone()
        },
    )
    .await?;

    println!(
        "# swarm end-to-end benchmark ({} coordinator(s) in one Raft cluster, {} workers x {} slots, loopback, fsync'd Raft log)",
        args.nodes.max(1),
        args.workers,
        args.slots
    );
    let (elapsed, n) = run_throughput(&http, &api, &token, &args).await?;
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
            .json(&serde_json::json!({"agent": "echo", "swarm": args.swarm(), "payload": i.to_string()}))
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

async fn wait_for_workers(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value = http
            .get(format!("{api}/v1/workers"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if v["workers"].as_array().map_or(0, |a| a.len()) == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("workers did not connect: {v}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submit `args.tasks` echo tasks, then wait for all; returns the wall time of both.
async fn run_throughput(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    args: &Args,
) -> anyhow::Result<(Duration, usize)> {
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let start = Instant::now();
    let mut handles = Vec::new();
    let per = args.batch.max(1);
    for chunk_start in (0..args.tasks).step_by(per) {
        let n = per.min(args.tasks - chunk_start);
        let permit = sem.clone().acquire_owned().await?;
        let http = http.clone();
        let (api, token) = (api.to_string(), token.to_string());
        let swarm = args.swarm();
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let ids: Vec<u64> = if n == 1 {
                let v: serde_json::Value = http
                    .post(format!("{api}/v1/tasks"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"agent": "echo", "swarm": swarm, "payload": chunk_start.to_string()}))
                    .send()
                    .await?
                    .json()
                    .await?;
                vec![v["id"].as_u64().with_context(|| format!("submit failed: {v}"))?]
            } else {
                let tasks: Vec<_> = (0..n)
                    .map(|i| serde_json::json!({"agent": "echo", "swarm": swarm, "payload": (chunk_start + i).to_string()}))
                    .collect();
                let v: serde_json::Value = http
                    .post(format!("{api}/v1/tasks/batch"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "tasks": tasks }))
                    .send()
                    .await?
                    .json()
                    .await?;
                v["tasks"]
                    .as_array()
                    .with_context(|| format!("batch failed: {v}"))?
                    .iter()
                    .map(|t| t["id"].as_u64().context("id"))
                    .collect::<anyhow::Result<_>>()?
            };
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::with_capacity(args.tasks);
    for h in handles {
        ids.extend(h.await??);
    }
    // Await every result.
    let mut waits = Vec::new();
    for &id in &ids {
        let permit = sem.clone().acquire_owned().await?;
        let http = http.clone();
        let (api, token) = (api.to_string(), token.to_string());
        waits.push(tokio::spawn(async move {
            let _permit = permit;
            let v: serde_json::Value = http
                .get(format!("{api}/v1/tasks/{id}?wait=60s"))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            if v["state"] != "succeeded" {
                bail!("task {id} ended {}", v["state"]);
            }
            anyhow::Ok(())
        }));
    }
    for w in waits {
        w.await??;
    }
    Ok((start.elapsed(), ids.len()))
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
