//! How the cost of running swarm grows with history: one coordinator and one worker as
//! real processes (the `swarm` binary), echo tasks with 100-byte payloads submitted
//! through `/v1/tasks/batch` until each milestone of processed tasks, and at each
//! milestone one line of the table:
//!
//! * coordinator RSS now and its peak (`/proc/<pid>/status`);
//! * data-dir size, and of that the checkpoint store (`raft/state.redb`);
//! * checkpoints (snapshot builds) taken since the previous milestone, their mean time,
//!   and the time of the one the backup below takes (`swarm_checkpoint_seconds`);
//! * snapshot size and time: the dump a lagging follower would be sent (the same bytes
//!   as a backup: `GET /v1/backup`, read to the end);
//! * submit p50/p99: sequential single submits, acknowledged once durable; and beside it
//!   the submit p50 of a reference node (a second coordinator holding `--reference`
//!   tasks, 100k by default), sampled interleaved with the measured node's, one submit
//!   each in turn, so growth is told apart from the machine's load;
//! * old-task read p50: `GET /v1/tasks/{id}` of random tasks among the first 10%;
//! * restart to ready: SIGKILL, start again, until `/ready` answers 200 (and an old task
//!   reads back).
//!
//! Default settings throughout (pass `--retain 60s` to see RSS and disk stay flat once
//! retention applies). Run in release, on an otherwise idle machine:
//!
//! `cargo build --release -p swarm-cli -p swarm-benches &&
//!  target/release/scale --sizes 100000,1000000,10000000`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use rand::Rng;
use swarm_benches::processes::Processes;

#[derive(Parser)]
struct Args {
    /// Milestones: tasks processed in all.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000,10000000")]
    sizes: Vec<u64>,
    /// The `swarm` binary.
    #[arg(long, default_value = "target/release/swarm")]
    swarm: PathBuf,
    /// Tasks per batch request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Batch requests in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Payload bytes per task.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Worker slots.
    #[arg(long, default_value_t = 256)]
    slots: u32,
    /// Pass `--retain-finished` to the coordinator (default: its own default).
    #[arg(long)]
    retain: Option<String>,
    /// Most tasks submitted but not yet finished: the client waits for the queue to drain
    /// below half of it (a steady state, rather than a queue as deep as the limit).
    #[arg(long, default_value_t = 100_000)]
    ahead: u64,
    /// Samples for each latency figure.
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Keep the data here (default: a temp dir, deleted at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Tasks processed by the reference node: a second coordinator and worker, filled
    /// once at the start and then left alone, whose submits are sampled interleaved with
    /// the measured node's at every milestone (so both latencies see the same machine
    /// load). 0: no reference node.
    #[arg(long, default_value_t = 100_000)]
    reference: u64,
}

/// RSS and peak RSS of a process, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?)
    }

    async fn json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.get(path).await?.error_for_status()?.json().await?)
    }

    /// Wait until `/ready` answers 200.
    async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = self.http.get(format!("{}/ready", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("not ready within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A metric's value from `/metrics` (the sum of its samples).
    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    async fn unfinished(&self) -> anyhow::Result<u64> {
        let s = self.json("/v1/status").await?;
        Ok(
            s["queue"]["queued"].as_u64().unwrap_or(0)
                + s["queue"]["running"].as_u64().unwrap_or(0),
        )
    }
}

/// Submits batches of `batch_body` (`args.batch` tasks each) until `submitted` reaches
/// `target` and everything submitted has finished, at most `args.concurrency` in flight
/// and `args.ahead` unfinished; backs off on 429. Returns the tasks processed per second.
async fn fill(
    api: &Api,
    args: &Args,
    batch_body: &bytes::Bytes,
    submitted: &mut u64,
    target: u64,
    pid: u32,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let from = *submitted;
    let mut inflight = tokio::task::JoinSet::new();
    let mut last_max = Instant::now();
    let mut checked_at = *submitted;
    while *submitted < target || !inflight.is_empty() {
        if *submitted - checked_at >= args.ahead / 4 {
            checked_at = *submitted;
            while api.unfinished().await? > args.ahead {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while *submitted < target && inflight.len() < args.concurrency {
            let (http, url, token, body) = (
                api.http.clone(),
                format!("{}/v1/tasks/batch", api.base),
                api.token.clone(),
                batch_body.clone(),
            );
            *submitted += args.batch as u64;
            inflight.spawn(async move {
                loop {
                    let r = http
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    match r.status().as_u16() {
                        201 => return anyhow::Ok(()),
                        429 => tokio::time::sleep(Duration::from_millis(50)).await,
                        s => {
                            bail!("batch answered {s}: {}", r.text().await.unwrap_or_default())
                        }
                    }
                }
            });
        }
        if let Some(r) = inflight.join_next().await {
            r??;
        }
        if last_max.elapsed() > Duration::from_secs(30) {
            last_max = Instant::now();
            let (rss, _) = rss_kib(pid)?;
            eprintln!(
                "  {submitted} submitted, {:.0}/s, RSS {} MiB",
                (*submitted - from) as f64 / started.elapsed().as_secs_f64(),
                rss / 1024
            );
        }
    }
    while api.unfinished().await? > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((*submitted - from) as f64 / started.elapsed().as_secs_f64())
}

/// One single submit of a probe task, acknowledged once durable: its latency in ms.
async fn probe(api: &Api, i: usize) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let r = api
        .http
        .post(format!("{}/v1/tasks", api.base))
        .bearer_auth(&api.token)
        .json(&serde_json::json!({"agent": "echo", "payload": format!("probe {i}")}))
        .send()
        .await?;
    if r.status().as_u16() != 201 {
        bail!("probe submit answered {}", r.status());
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// A coordinator and worker in `dir` (certificates and token made here), started.
async fn start(args: &Args, dir: &Path) -> anyhow::Result<(Processes, Api)> {
    std::fs::create_dir_all(dir)?;
    swarm_transport::init_certs(&dir.join("certs"), &[], false)?;
    let token = format!("scale-{}", rand::thread_rng().gen::<u64>());
    std::fs::write(dir.join("token"), &token)?;
    let retain = args
        .retain
        .iter()
        .flat_map(|r| ["--retain-finished".to_string(), r.clone()]);
    let mut cluster = Processes::new(&args.swarm, dir, retain.collect())?;
    let api = Api {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency + 4)
            .build()?,
        base: format!("http://127.0.0.1:{}", cluster.api),
        token,
    };
    cluster.start_coordinator()?;
    api.wait_ready(Duration::from_secs(30)).await?;
    cluster.start_worker("scale-w1", Some(args.slots))?;
    Ok((cluster, api))
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (q(0.5), q(0.99))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let (mut cluster, api) = start(&args, &dir).await?;
    let payload = "x".repeat(args.payload);
    let batch_body = serde_json::to_vec(&serde_json::json!({
        "tasks": (0..args.batch)
            .map(|_| serde_json::json!({"agent": "echo", "payload": payload}))
            .collect::<Vec<_>>()
    }))?;
    let batch_body = bytes::Bytes::from(batch_body);
    // The reference node: filled once, then only sampled.
    let reference = match args.reference {
        0 => None,
        n => {
            let (c, api) = start(&args, &dir.join("reference")).await?;
            let mut done = 0;
            fill(&api, &args, &batch_body, &mut done, n, c.pid()).await?;
            Some((c, api))
        }
    };

    println!(
        "# swarm scale benchmark: 1 coordinator + 1 worker ({} slots) as processes, echo tasks of {} bytes, batches of {}, {} in flight, retain {}; reference node: {} tasks",
        args.slots,
        args.payload,
        args.batch,
        args.concurrency,
        args.retain.as_deref().unwrap_or("default"),
        args.reference,
    );
    println!(
        "| tasks | RSS MiB (peak) | data dir MiB (state.redb) | checkpoints: mean / last s | snapshot MiB / s | submit p50/p99 ms | reference p50 ms | old read p50/p99 ms | restart to ready s | run tasks/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut submitted: u64 = 0;
    for &target in &args.sizes {
        let rate = fill(
            &api,
            &args,
            &batch_body,
            &mut submitted,
            target,
            cluster.pid(),
        )
        .await?;

        let (rss, peak) = rss_kib(cluster.pid())?;
        let data = dir_bytes(&dir.join("data"));
        let store = std::fs::metadata(dir.join("data/raft/state.redb")).map_or(0, |m| m.len());
        // Checkpoints taken since the previous milestone (the coordinator restarted then,
        // and its counters with it).
        let ck_sum = api.metric("swarm_checkpoint_seconds_sum").await?;
        // `abs`: an empty sum reads as -0.
        let ck_runs = api.metric("swarm_checkpoint_seconds_count").await?.abs();
        let ck_mean = if ck_runs > 0.0 { ck_sum / ck_runs } else { 0.0 };

        // The snapshot a follower would be sent (read to the end, not kept). The backup
        // takes a checkpoint first: the last one is that checkpoint.
        let t0 = Instant::now();
        let mut resp = api.get("/v1/backup").await?.error_for_status()?;
        let mut snapshot_bytes = 0u64;
        while let Some(c) = resp.chunk().await? {
            snapshot_bytes += c.len() as u64;
        }
        let snapshot_s = t0.elapsed().as_secs_f64();
        let ck_last = api.metric("swarm_checkpoint_last_seconds").await?;

        // Submits, one at a time, alternating with the reference node's.
        let mut submit = Vec::new();
        let mut submit_ref = Vec::new();
        for i in 0..args.samples {
            submit.push(probe(&api, i).await?);
            if let Some((_, r)) = &reference {
                submit_ref.push(probe(r, i).await?);
            }
        }
        submitted += args.samples as u64;
        let old_max = (target / 10).max(1);
        let mut reads = Vec::new();
        for _ in 0..args.samples {
            let id = rand::thread_rng().gen_range(1..=old_max);
            let t0 = Instant::now();
            let r = api.get(&format!("/v1/tasks/{id}")).await?;
            let status = r.status().as_u16();
            let _ = r.bytes().await?;
            if status != 200 && status != 404 {
                bail!("reading task {id} answered {status}");
            }
            reads.push(t0.elapsed().as_secs_f64() * 1000.0);
        }

        // Restart: SIGKILL, start, until ready and an old task reads back.
        cluster.kill_coordinator()?;
        let t0 = Instant::now();
        cluster.start_coordinator()?;
        api.wait_ready(Duration::from_secs(600)).await?;
        let restart = t0.elapsed().as_secs_f64();
        let first = api.get("/v1/tasks/1").await?;
        let first_status = first.status().as_u16();
        let first: serde_json::Value = first.json().await?;
        let readable = match first_status {
            200 => first["state"] == "succeeded",
            404 => first["error"]["code"] == "task_expired",
            _ => false,
        };
        if !readable {
            bail!("after the restart task 1 reads back as {first_status} {first}");
        }
        while api.unfinished().await? > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let (s50, s99) = quantiles(submit);
        let ref50 = match submit_ref.is_empty() {
            true => "-".to_string(),
            false => format!("{:.2}", quantiles(submit_ref).0),
        };
        let (r50, r99) = quantiles(reads);
        println!(
            "| {target} | {} ({}) | {} ({}) | {ck_runs:.0}: {ck_mean:.2} / {ck_last:.2} | {} / {snapshot_s:.1} | {s50:.2}/{s99:.2} | {ref50} | {r50:.2}/{r99:.2} | {restart:.2} | {rate:.0} |",
            rss / 1024,
            peak / 1024,
            data >> 20,
            store >> 20,
            snapshot_bytes >> 20,
        );
    }
    Ok(())
}
