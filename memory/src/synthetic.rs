//! Datasets and measures for tests and benchmarks: seeded Gaussian-cluster data, `.fvecs`
//! loading, and recall@k.

use std::io::{self, Read};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A base set to index and a query set drawn from the same distribution.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Vector dimension.
    pub dimension: usize,
    /// Vectors to index.
    pub base: Vec<Vec<f32>>,
    /// Query vectors (not in `base`).
    pub queries: Vec<Vec<f32>>,
}

/// One standard normal sample (Box–Muller).
fn gaussian(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Seeded Gaussian-cluster data: `clusters` centres with components drawn from N(0, 1);
/// each point (base or query) picks a centre uniformly and adds N(0, `spread`²) noise per
/// component. `spread` around 0.3–0.6 gives clusters that are distinct but whose members
/// are spread widely enough that nearest neighbours are not trivial.
pub fn gaussian_clusters(
    n_base: usize,
    n_queries: usize,
    dimension: usize,
    clusters: usize,
    spread: f64,
    seed: u64,
) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let clusters = clusters.max(1);
    let centres: Vec<Vec<f64>> = (0..clusters)
        .map(|_| (0..dimension).map(|_| gaussian(&mut rng)).collect())
        .collect();
    let point = |rng: &mut StdRng| -> Vec<f32> {
        let c = &centres[rng.gen_range(0..clusters)];
        c.iter()
            .map(|x| (x + spread * gaussian(rng)) as f32)
            .collect()
    };
    let base = (0..n_base).map(|_| point(&mut rng)).collect();
    let queries = (0..n_queries).map(|_| point(&mut rng)).collect();
    Dataset {
        dimension,
        base,
        queries,
    }
}

/// Seeded clusters with low intrinsic dimension, closer to real embeddings and image
/// features than isotropic clusters: each cluster has its own random `rank`-dimensional
/// subspace; a point is `centre + spread · A_c z + noise · ε` with `z ~ N(0, I_rank / rank)`,
/// `A_c` entries ~ N(0, 1) (so each component has variance `spread²` along the subspace)
/// and `ε ~ N(0, I)`.
#[allow(clippy::too_many_arguments)]
pub fn low_rank_clusters(
    n_base: usize,
    n_queries: usize,
    dimension: usize,
    clusters: usize,
    rank: usize,
    spread: f64,
    noise: f64,
    seed: u64,
) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let clusters = clusters.max(1);
    let rank = rank.max(1);
    let centres: Vec<Vec<f64>> = (0..clusters)
        .map(|_| (0..dimension).map(|_| gaussian(&mut rng)).collect())
        .collect();
    // bases[c][j] is the j-th column (length `dimension`) of A_c.
    let bases: Vec<Vec<Vec<f64>>> = (0..clusters)
        .map(|_| {
            (0..rank)
                .map(|_| (0..dimension).map(|_| gaussian(&mut rng)).collect())
                .collect()
        })
        .collect();
    let scale = spread / (rank as f64).sqrt();
    let point = |rng: &mut StdRng| -> Vec<f32> {
        let c = rng.gen_range(0..clusters);
        let mut v = centres[c].clone();
        for col in &bases[c] {
            let z = gaussian(rng) * scale;
            for (x, a) in v.iter_mut().zip(col) {
                *x += z * a;
            }
        }
        v.iter()
            .map(|x| (x + noise * gaussian(rng)) as f32)
            .collect()
    };
    let base = (0..n_base).map(|_| point(&mut rng)).collect();
    let queries = (0..n_queries).map(|_| point(&mut rng)).collect();
    Dataset {
        dimension,
        base,
        queries,
    }
}

/// A store whose ReasoningBank holds `n` synthetic patterns (embeddings from
/// [`low_rank_clusters`] in the bank's dimension, mixed outcomes, creation times spread
/// over `n` ms, about a third of them judged once) plus `n_queries` query embeddings from
/// the same distribution. For retrieval benchmarks.
pub fn synthetic_pattern_bank(
    n: usize,
    n_queries: usize,
    config: crate::StoreConfig,
    seed: u64,
) -> crate::error::Result<(crate::MemoryStore, Vec<Vec<f32>>)> {
    use crate::{MemoryOp, NewPattern, OpOutcome, Outcome};
    let dim = config.pattern_dimension;
    let data = low_rank_clusters(n, n_queries, dim, (n / 100).max(1), 16, 0.6, 0.05, seed);
    let mut store = crate::MemoryStore::new(config)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let batch = store.config().max_batch.min(1000);
    let mut all_ids = Vec::with_capacity(n);
    for (b, chunk) in data.base.chunks(batch).enumerate() {
        let items = chunk
            .iter()
            .enumerate()
            .map(|(j, v)| {
                let i = b * batch + j;
                NewPattern {
                    title: format!("pattern {i}"),
                    description: format!("synthetic pattern {i} for benchmarks"),
                    content: format!("Synthetic strategy text number {i}."),
                    embedding: v.clone(),
                    source_task: Some(i as u64),
                    outcome: if i % 3 == 0 {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    },
                }
            })
            .collect();
        let now_ms = (b * batch) as u64;
        if let OpOutcome::PatternsAdded { ids } =
            store.apply(MemoryOp::PatternAdd { items, now_ms })?
        {
            all_ids.extend(ids);
        }
    }
    for (t, chunk) in all_ids.chunks(64).enumerate() {
        let used: Vec<String> = chunk
            .iter()
            .filter(|_| rng.gen_bool(0.33))
            .cloned()
            .collect();
        let outcome = if rng.gen_bool(0.7) {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        store.apply(MemoryOp::PatternJudge {
            task_id: Some(t as u64),
            item_ids: used,
            outcome,
            now_ms: n as u64 + t as u64,
        })?;
    }
    store.settle_indexes(2 * n as u64)?;
    Ok((store, data.queries))
}

/// Reads up to `limit` vectors from an `.fvecs` file (each record: little-endian `i32`
/// dimension, then that many little-endian `f32`s).
pub fn read_fvecs(path: &Path, limit: usize) -> io::Result<Vec<Vec<f32>>> {
    let mut r = io::BufReader::new(std::fs::File::open(path)?);
    let mut out = Vec::new();
    let mut dim_buf = [0u8; 4];
    let mut dim0: Option<usize> = None;
    while out.len() < limit {
        match r.read_exact(&mut dim_buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let d = i32::from_le_bytes(dim_buf);
        if d <= 0 || d > 1 << 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad dimension {d}"),
            ));
        }
        let d = d as usize;
        if *dim0.get_or_insert(d) != d {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "mixed dimensions",
            ));
        }
        let mut buf = vec![0u8; d * 4];
        r.read_exact(&mut buf)?;
        out.push(
            buf.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        );
    }
    Ok(out)
}

/// Mean recall@k: the fraction of each true top-k found in the returned top-k.
pub fn recall_at_k<T: PartialEq>(truth: &[Vec<T>], found: &[Vec<T>], k: usize) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let mut total = 0.0;
    for (t, f) in truth.iter().zip(found) {
        let t = &t[..t.len().min(k)];
        if t.is_empty() {
            total += 1.0;
            continue;
        }
        let f = &f[..f.len().min(k)];
        let hit = t.iter().filter(|x| f.contains(x)).count();
        total += hit as f64 / t.len() as f64;
    }
    total / truth.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_seeded_and_shaped() {
        let a = gaussian_clusters(50, 5, 8, 3, 0.5, 42);
        let b = gaussian_clusters(50, 5, 8, 3, 0.5, 42);
        assert_eq!(a.base, b.base);
        assert_eq!(a.base.len(), 50);
        assert_eq!(a.queries.len(), 5);
        assert!(a
            .base
            .iter()
            .all(|v| v.len() == 8 && v.iter().all(|x| x.is_finite())));
        assert_ne!(a.base, gaussian_clusters(50, 5, 8, 3, 0.5, 43).base);
    }

    #[test]
    fn low_rank_clusters_are_seeded_and_finite() {
        let a = low_rank_clusters(40, 4, 12, 3, 2, 0.5, 0.05, 9);
        assert_eq!(
            a.base,
            low_rank_clusters(40, 4, 12, 3, 2, 0.5, 0.05, 9).base
        );
        assert_eq!((a.base.len(), a.queries.len()), (40, 4));
        assert!(a
            .base
            .iter()
            .all(|v| v.len() == 12 && v.iter().all(|x| x.is_finite())));
    }

    #[test]
    fn synthetic_bank_is_populated() {
        let cfg = crate::StoreConfig {
            pattern_dimension: 16,
            ..Default::default()
        };
        let (store, queries) = synthetic_pattern_bank(300, 5, cfg, 1).unwrap();
        assert_eq!(store.pattern_count(), 300);
        assert_eq!(queries.len(), 5);
        assert!(store.patterns().any(|p| p.use_count > 0));
        assert!(store
            .patterns()
            .any(|p| p.outcome == crate::Outcome::Failure));
        let r = store
            .retrieve(&queries[0], 5, 10_000, &crate::RetrieveParams::default())
            .unwrap();
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn recall_counts_overlap() {
        let truth = vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]];
        let found = vec![vec![1, 2, 9, 4], vec![5, 6, 7, 8]];
        assert!((recall_at_k(&truth, &found, 4) - 0.875).abs() < 1e-12);
        assert!((recall_at_k(&truth, &found, 2) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn fvecs_roundtrip() {
        let dir = std::env::temp_dir().join(format!("swarm-memory-fvecs-{}", std::process::id()));
        let mut bytes = Vec::new();
        for v in [[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]] {
            bytes.extend_from_slice(&3i32.to_le_bytes());
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        std::fs::write(&dir, &bytes).unwrap();
        let vs = read_fvecs(&dir, 10).unwrap();
        assert_eq!(vs, vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]);
        assert_eq!(read_fvecs(&dir, 1).unwrap().len(), 1);
        std::fs::remove_file(&dir).ok();
    }
}
