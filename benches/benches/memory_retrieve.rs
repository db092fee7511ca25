//! Criterion bench of ReasoningBank retrieval (`MemoryStore::retrieve`, k = 5, default
//! params: 20 HNSW candidates, similarity/recency/confidence scoring, MMR) over banks of
//! 10k and 100k synthetic 256-d patterns.
//!
//! Run: `cargo bench -p swarm-benches --bench memory_retrieve`
//! (set `MEMORY_RETRIEVE_SIZES=10000` to skip the 100k bank, which takes a while to build).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use swarm_memory::synthetic::synthetic_pattern_bank;
use swarm_memory::{RetrieveParams, StoreConfig};

fn sizes() -> Vec<usize> {
    std::env::var("MEMORY_RETRIEVE_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![10_000, 100_000])
}

fn retrieve(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_retrieve");
    group.sample_size(50);
    for n in sizes() {
        let (store, queries) = synthetic_pattern_bank(n, 1_000, StoreConfig::default(), 42)
            .expect("build pattern bank");
        let params = RetrieveParams::default();
        let now_ms = 2 * n as u64;
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("k5", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                let r = store
                    .retrieve(&queries[i], 5, now_ms, &params)
                    .expect("retrieve");
                std::hint::black_box(r)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, retrieve);
criterion_main!(benches);
