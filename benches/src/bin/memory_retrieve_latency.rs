//! Latency of ReasoningBank retrieval (`MemoryStore::retrieve`): HNSW candidates, scoring
//! by similarity/recency/confidence, MMR — over banks of synthetic patterns.
//!
//! For each size it builds a bank through the public write path (`PatternAdd` and
//! `PatternJudge` ops), then times `--rounds` single-threaded retrieves (queries cycle
//! through a held-out set from the same distribution) and prints p50/p90/p99/p99.9/max.
//! Target: p99 < 1 ms at 100k items. Latencies are reported from wall time and, per
//! call, from the thread's CPU time (which excludes time spent preempted by other
//! processes on a shared machine).
//!
//! Run: `cargo run --release -p swarm-benches --bin memory_retrieve_latency`

use std::time::Instant;

use clap::Parser;
use cpu_time::ThreadTime;
use hdrhistogram::Histogram;
use swarm_memory::synthetic::synthetic_pattern_bank;
use swarm_memory::{RetrieveParams, StoreConfig};

#[derive(Parser, Debug)]
struct Args {
    /// Bank sizes.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sizes: Vec<usize>,
    /// Embedding dimension.
    #[arg(long, default_value_t = 256)]
    dim: usize,
    /// Items returned per retrieve.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// Timed retrieves per size.
    #[arg(long, default_value_t = 20_000)]
    rounds: usize,
    /// HNSW candidates per retrieve (default: max(4k, 16)).
    #[arg(long)]
    candidates: Option<usize>,
    /// MMR λ.
    #[arg(long, default_value_t = 0.7)]
    lambda: f64,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "memory_retrieve_latency: k={} dim={} rounds={} distance kernels={}",
        args.k,
        args.dim,
        args.rounds,
        swarm_memory::kernel::active_kernels()
    );
    for &n in &args.sizes {
        let cfg = StoreConfig {
            pattern_dimension: args.dim,
            ..StoreConfig::default()
        };
        let t = Instant::now();
        let (store, queries) = synthetic_pattern_bank(n, 1_000, cfg, args.seed)?;
        let build = t.elapsed();
        let params = RetrieveParams {
            candidates: args.candidates,
            mmr_lambda: args.lambda,
            ..RetrieveParams::default()
        };
        let now_ms = 2 * n as u64;
        for q in queries.iter().take(200) {
            std::hint::black_box(store.retrieve(q, args.k, now_ms, &params)?);
        }
        let mut hist = Histogram::<u64>::new(3)?;
        let mut hist_cpu = Histogram::<u64>::new(3)?;
        let mut returned = 0usize;
        let wall = Instant::now();
        let cpu = ThreadTime::now();
        for i in 0..args.rounds {
            let q = &queries[i % queries.len()];
            let t = Instant::now();
            let c = ThreadTime::now();
            let r = store.retrieve(q, args.k, now_ms, &params)?;
            hist_cpu.record(c.elapsed().as_nanos() as u64)?;
            hist.record(t.elapsed().as_nanos() as u64)?;
            returned += r.len();
        }
        let wall = wall.elapsed();
        let cpu = cpu.elapsed();
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
        println!(
            "\n== {n} patterns (build {:.1}s) ==\nwall:     p50 {:.1} µs | p90 {:.1} µs | p99 {:.1} µs | p99.9 {:.1} µs | max {:.1} µs | mean {:.1} µs",
            build.as_secs_f64(),
            us(0.5),
            us(0.9),
            us(0.99),
            us(0.999),
            hist.max() as f64 / 1e3,
            hist.mean() / 1e3
        );
        let cus = |q: f64| hist_cpu.value_at_quantile(q) as f64 / 1e3;
        println!(
            "cpu time: p50 {:.1} µs | p90 {:.1} µs | p99 {:.1} µs | p99.9 {:.1} µs | max {:.1} µs",
            cus(0.5),
            cus(0.9),
            cus(0.99),
            cus(0.999),
            hist_cpu.max() as f64 / 1e3
        );
        println!(
            "{:.0} retrieves/s wall, {:.0}/s cpu; {:.2} items per retrieve",
            args.rounds as f64 / wall.as_secs_f64(),
            args.rounds as f64 / cpu.as_secs_f64(),
            returned as f64 / args.rounds as f64
        );
    }
    Ok(())
}
