//! Recall@k and single-threaded query throughput of swarm-memory's HNSW collections.
//!
//! For each (size, dimension) it builds a collection through the public write path
//! (`MemoryStore::apply(Upsert)` in batches, then `settle_indexes`: the collection's
//! indexer thread inserts serially, M and ef_construction as given), computes exact top-k by brute force as ground truth, then for each ef runs
//! every query once, single-threaded, and reports recall@k, queries/s and latency.
//!
//! Data: seeded Gaussian clusters (`--clusters`, `--spread`), optionally with a low
//! intrinsic dimension per cluster (`--rank`), or real vectors from `--fvecs` (queries
//! from `--fvecs-queries`, or else held out from the end of the base file).
//!
//! Throughput is reported twice: from wall time, and from the thread's CPU time (which
//! is less disturbed by other processes competing for the cores). Latency percentiles
//! come from a wall-clock reading around each query (the vDSO clock; a per-query
//! thread-CPU-time reading is a system call and would itself cost about 2% of a query).
//!
//! Run: `cargo run --release -p swarm-benches --bin memory_recall -- --sizes 10000 --dims 784`
//! (100k × 784 is skipped unless `--with-100k-784`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use cpu_time::{ProcessTime, ThreadTime};
use hdrhistogram::Histogram;
use swarm_memory::synthetic::{
    gaussian_clusters, low_rank_clusters, read_fvecs, recall_at_k, Dataset,
};
use swarm_memory::{
    CollectionSpec, MemoryOp, MemoryStore, Metric, PointWrite, SearchRequest, StoreConfig,
};

#[derive(Parser, Debug)]
struct Args {
    /// Collection sizes.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sizes: Vec<usize>,
    /// Vector dimensions (ignored with --fvecs).
    #[arg(long, value_delimiter = ',', default_value = "128,784")]
    dims: Vec<usize>,
    /// Also run 100k × 784 (slow to build and to brute-force).
    #[arg(long)]
    with_100k_784: bool,
    /// Number of Gaussian clusters.
    #[arg(long, default_value_t = 100)]
    clusters: usize,
    /// Per-component standard deviation around a cluster centre (centres are N(0, 1)).
    #[arg(long, default_value_t = 0.5)]
    spread: f64,
    /// Intrinsic dimension of each cluster (low-rank clusters); isotropic if absent.
    #[arg(long)]
    rank: Option<usize>,
    /// Isotropic noise added to low-rank clusters.
    #[arg(long, default_value_t = 0.05)]
    noise: f64,
    /// Queries per measurement.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// HNSW M.
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW ef_construction.
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    /// Search ef values.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    efs: Vec<usize>,
    /// Metric: l2, cosine or dot.
    #[arg(long, default_value = "l2")]
    metric: String,
    /// Base vectors from an .fvecs file instead of synthetic data.
    #[arg(long)]
    fvecs: Option<PathBuf>,
    /// Query vectors from an .fvecs file (default: held out from the end of --fvecs).
    #[arg(long)]
    fvecs_queries: Option<PathBuf>,
    /// Threads for the brute-force ground truth.
    #[arg(long, default_value_t = 2)]
    truth_threads: usize,
    /// Also measure hnsw_rs' own search over the same graph (`search_via_hnsw_rs`).
    #[arg(long)]
    compare_hnsw_rs: bool,
    /// Also snapshot, restore, and check that the restored store answers identically.
    #[arg(long)]
    restore_check: bool,
    /// Seed for synthetic data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn dataset(args: &Args, n: usize, dim: usize) -> anyhow::Result<Dataset> {
    if let Some(path) = &args.fvecs {
        let held_out = if args.fvecs_queries.is_some() {
            0
        } else {
            args.queries
        };
        let mut base =
            read_fvecs(path, n + held_out).with_context(|| format!("read {}", path.display()))?;
        let queries = match &args.fvecs_queries {
            Some(q) => {
                read_fvecs(q, args.queries).with_context(|| format!("read {}", q.display()))?
            }
            None => {
                if base.len() <= held_out {
                    bail!("{} has only {} vectors", path.display(), base.len());
                }
                base.split_off(base.len() - held_out)
            }
        };
        let dimension = base.first().map(Vec::len).context("empty fvecs file")?;
        return Ok(Dataset {
            dimension,
            base,
            queries,
        });
    }
    Ok(match args.rank {
        Some(r) => low_rank_clusters(
            n,
            args.queries,
            dim,
            args.clusters,
            r,
            args.spread,
            args.noise,
            args.seed,
        ),
        None => gaussian_clusters(n, args.queries, dim, args.clusters, args.spread, args.seed),
    })
}

fn ids(hits: &[swarm_memory::SearchHit]) -> Vec<String> {
    hits.iter().map(|h| h.id.clone()).collect()
}

fn run(args: &Args, n: usize, dim: usize, metric: Metric) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let data = dataset(args, n, dim)?;
    let (n, dim) = (data.base.len(), data.dimension);
    let gen_time = t0.elapsed();

    let mut store = MemoryStore::new(StoreConfig {
        max_dimension: dim.max(4096),
        ..StoreConfig::default()
    })?;
    let mut spec = CollectionSpec::new(dim, metric);
    spec.m = args.m;
    spec.ef_construction = args.ef_construction;
    store.apply(MemoryOp::CreateCollection {
        name: "bench".into(),
        spec,
        now_ms: 0,
    })?;
    let t = Instant::now();
    // The inserts run on the collection's indexer thread: the process's CPU time.
    let cpu = ProcessTime::now();
    for (b, chunk) in data.base.chunks(1000).enumerate() {
        let points = chunk
            .iter()
            .enumerate()
            .map(|(j, v)| PointWrite {
                id: format!("v{}", b * 1000 + j),
                vector: v.clone(),
                metadata: String::new(),
                ttl_ms: None,
            })
            .collect();
        store.apply(MemoryOp::Upsert {
            collection: "bench".into(),
            points,
            now_ms: 1,
        })?;
    }
    // The indexer thread inserts the points; the build ends when they are all in the
    // graph and searches use its copy.
    store.settle_indexes(1)?;
    let build = t.elapsed();
    let build_cpu = cpu.elapsed();
    let graph = store.graph_stats("bench")?;

    let t = Instant::now();
    let threads = args.truth_threads.max(1);
    let per = data.queries.len().div_ceil(threads).max(1);
    let truth: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = data
            .queries
            .chunks(per)
            .map(|qs| {
                let store = &store;
                s.spawn(move || {
                    qs.iter()
                        .map(|q| {
                            let req = SearchRequest::new(q.clone(), args.k, 1);
                            store.search_exact("bench", &req).map(|h| ids(&h))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ground-truth thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    let truth_time = t.elapsed();

    println!(
        "\n== n={n} dim={dim} metric={} M={} ef_construction={} queries={} k={} data={} ==",
        metric.as_str(),
        args.m,
        args.ef_construction,
        data.queries.len(),
        args.k,
        if args.fvecs.is_some() {
            "fvecs".to_string()
        } else {
            match args.rank {
                Some(r) => format!(
                    "low-rank clusters (c={}, rank={r}, spread={}, noise={})",
                    args.clusters, args.spread, args.noise
                ),
                None => format!(
                    "gaussian clusters (c={}, spread={})",
                    args.clusters, args.spread
                ),
            }
        }
    );
    println!(
        "data {:.1}s | build {:.2}s wall, {:.2}s cpu ({:.0} inserts/s wall) | brute-force truth {:.1}s",
        gen_time.as_secs_f64(),
        build.as_secs_f64(),
        build_cpu.as_secs_f64(),
        n as f64 / build.as_secs_f64(),
        truth_time.as_secs_f64()
    );
    println!(
        "graph: {} layers, {:.1} layer-0 links/node, {}/{} nodes reachable from the entry point",
        graph.top_layer + 1,
        graph.layer0_edges as f64 / graph.copied_slots.max(1) as f64,
        graph.reachable,
        graph.copied_slots
    );
    println!(
        "{:>6} {:>10} {:>10} {:>12} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "ef", "recall@k", "q/s", "q/s (cpu)", "p50 µs", "p99 µs", "ndis/q", "upper/q", "hops/q"
    );
    let mut last: Vec<Vec<swarm_memory::SearchHit>> = Vec::new();
    for &ef in &args.efs {
        let reqs: Vec<SearchRequest> = data
            .queries
            .iter()
            .map(|q| SearchRequest {
                vector: q.clone(),
                k: args.k,
                ef: Some(ef),
                filter: None,
                now_ms: 1,
            })
            .collect();
        // Warm-up pass (caches, page faults), then the measured pass.
        for r in reqs.iter().take(100) {
            std::hint::black_box(store.search("bench", r)?);
        }
        let mut hist = Histogram::<u64>::new(3)?;
        let mut results = Vec::with_capacity(reqs.len());
        let before = swarm_memory::search_totals();
        let t = Instant::now();
        let cpu = ThreadTime::now();
        for r in &reqs {
            let q0 = Instant::now();
            let hits = store.search("bench", r)?;
            hist.record(q0.elapsed().as_nanos() as u64)?;
            results.push(hits);
        }
        let elapsed = t.elapsed();
        let cpu = cpu.elapsed();
        let after = swarm_memory::search_totals();
        let per_query = |a: u64, b: u64| (a - b) as f64 / reqs.len() as f64;
        let found: Vec<Vec<String>> = results.iter().map(|h| ids(h)).collect();
        let recall = recall_at_k(&truth, &found, args.k);
        let reference = if args.compare_hnsw_rs {
            let cpu = ThreadTime::now();
            let mut found = Vec::with_capacity(reqs.len());
            for r in &reqs {
                found.push(ids(&store.search_via_hnsw_rs("bench", r)?));
            }
            let cpu = cpu.elapsed();
            format!(
                "   | hnsw_rs search: recall {:.4}, {:.0} q/s (cpu)",
                recall_at_k(&truth, &found, args.k),
                reqs.len() as f64 / cpu.as_secs_f64()
            )
        } else {
            String::new()
        };
        println!(
            "{:>6} {:>10.4} {:>10.0} {:>12.0} {:>10.1} {:>10.1} {:>8.0} {:>8.0} {:>8.1}{}",
            ef,
            recall,
            reqs.len() as f64 / elapsed.as_secs_f64(),
            reqs.len() as f64 / cpu.as_secs_f64(),
            hist.value_at_quantile(0.5) as f64 / 1e3,
            hist.value_at_quantile(0.99) as f64 / 1e3,
            per_query(after.distances, before.distances),
            per_query(after.upper_distances, before.upper_distances),
            per_query(after.expanded, before.expanded),
            reference
        );
        last = results;
    }

    if args.restore_check {
        let t = Instant::now();
        let bytes = store.snapshot_bytes()?;
        let snap_time = t.elapsed();
        let t = Instant::now();
        let restored = MemoryStore::restore_bytes(&bytes)?;
        restored.wait_indexing();
        let restore_time = t.elapsed();
        let ef = *args.efs.last().unwrap_or(&64);
        let mut same = 0;
        for (q, before) in data.queries.iter().zip(&last) {
            let req = SearchRequest {
                vector: q.clone(),
                k: args.k,
                ef: Some(ef),
                filter: None,
                now_ms: 1,
            };
            if &restored.search("bench", &req)? == before {
                same += 1;
            }
        }
        println!(
            "snapshot {:.1} MB in {:.2}s; restore (graph rebuild) {:.2}s; identical answers after restore: {same}/{}",
            bytes.len() as f64 / 1e6,
            snap_time.as_secs_f64(),
            restore_time.as_secs_f64(),
            data.queries.len()
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(metric) = Metric::parse(&args.metric) else {
        bail!("unknown metric {}", args.metric);
    };
    println!(
        "memory_recall: distance kernels = {}",
        swarm_memory::kernel::active_kernels()
    );
    let started = Instant::now();
    if args.fvecs.is_some() {
        for &n in &args.sizes {
            run(&args, n, 0, metric)?;
        }
    } else {
        for &dim in &args.dims {
            for &n in &args.sizes {
                if n >= 100_000 && dim >= 784 && !args.with_100k_784 {
                    println!("\n(skipping n={n} dim={dim}; pass --with-100k-784 to run it)");
                    continue;
                }
                run(&args, n, dim, metric)?;
            }
        }
    }
    println!(
        "\ntotal {:.0?}",
        Duration::from_secs(started.elapsed().as_secs())
    );
    Ok(())
}
