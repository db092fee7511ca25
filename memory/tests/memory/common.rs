#![allow(dead_code)]

use swarm_memory::{
    CollectionSpec, MemoryOp, MemoryStore, Metric, OpOutcome, PointWrite, StoreConfig,
};

pub fn store() -> MemoryStore {
    MemoryStore::new(StoreConfig::default()).unwrap()
}

pub fn store_with(f: impl FnOnce(&mut StoreConfig)) -> MemoryStore {
    let mut cfg = StoreConfig::default();
    f(&mut cfg);
    MemoryStore::new(cfg).unwrap()
}

pub fn create(store: &mut MemoryStore, name: &str, dim: usize, metric: Metric) {
    store
        .apply(MemoryOp::CreateCollection {
            name: name.into(),
            spec: CollectionSpec::new(dim, metric),
            now_ms: 1,
        })
        .unwrap();
}

pub fn point(id: impl Into<String>, vector: Vec<f32>, metadata: &str) -> PointWrite {
    PointWrite {
        id: id.into(),
        vector,
        metadata: metadata.into(),
        ttl_ms: None,
    }
}

pub fn upsert(
    store: &mut MemoryStore,
    coll: &str,
    points: Vec<PointWrite>,
    now_ms: u64,
) -> OpOutcome {
    store
        .apply(MemoryOp::Upsert {
            collection: coll.into(),
            points,
            now_ms,
        })
        .unwrap()
}

/// Upserts `vectors` as ids `p{i}` in batches, metadata from `meta(i)`.
pub fn load(
    store: &mut MemoryStore,
    coll: &str,
    vectors: &[Vec<f32>],
    meta: impl Fn(usize) -> String,
) {
    for (b, chunk) in vectors.chunks(500).enumerate() {
        let points = chunk
            .iter()
            .enumerate()
            .map(|(j, v)| {
                let i = b * 500 + j;
                point(format!("p{i}"), v.clone(), &meta(i))
            })
            .collect();
        upsert(store, coll, points, 10);
    }
    catch_up(store);
}

/// What a leader does in the background, done now ([`MemoryStore::settle_indexes`]).
/// Returns the ops applied, for other replicas.
pub fn catch_up(store: &mut MemoryStore) -> Vec<MemoryOp> {
    store.settle_indexes(10).unwrap()
}
