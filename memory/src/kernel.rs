//! Distance kernels.
//!
//! All kernels use a fixed summation order (16 independent lanes, then a fixed reduction
//! tree, then the tail) and plain multiplies and adds (Rust never contracts them into
//! FMAs). The result is therefore bit-identical on every IEEE-754 platform and in every
//! process, which is what makes the HNSW graph — and everything derived from it during
//! `apply`, such as consolidation — identical on all replicas.
//!
//! Speed comes from letting LLVM vectorise that one scalar source: on x86-64 CPUs with
//! AVX2 the same code is compiled a second time with AVX2 enabled and selected at run time
//! (`pulp::x86::V3::vectorize`, a safe runtime-dispatch wrapper); elsewhere it is compiled
//! for the baseline target (SSE2, NEON). Both versions perform the same per-lane operations
//! in the same order, so they return the same bits (a unit test checks this) — unlike
//! kernels with a single accumulator of ISA-dependent width, or FMA-based kernels.

use anndists::dist::distances::Distance;

const LANES: usize = 16;

/// Which code the kernels run on this machine: `"avx2"` (x86-64 with AVX2/FMA detected)
/// or `"baseline"`. Informational: both give identical results.
pub fn active_kernels() -> &'static str {
    if cfg!(feature = "anndists-simd") {
        return "anndists-simd (L2 graphs)";
    }
    #[cfg(target_arch = "x86_64")]
    if pulp::x86::V3::try_new().is_some() {
        return "avx2";
    }
    "baseline"
}

#[inline]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut s8 = [0f32; 8];
    for i in 0..8 {
        s8[i] = acc[i] + acc[i + 8];
    }
    let mut s4 = [0f32; 4];
    for i in 0..4 {
        s4[i] = s8[i] + s8[i + 4];
    }
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Dot product with a platform-independent summation order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return v3.vectorize(
            #[inline(always)]
            || dot_scalar(a, b),
        );
    }
    dot_scalar(a, b)
}

/// Squared Euclidean distance with a platform-independent summation order.
#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return v3.vectorize(
            #[inline(always)]
            || l2_squared_scalar(a, b),
        );
    }
    l2_squared_scalar(a, b)
}

#[inline(always)]
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    reduce(acc) + tail
}

#[inline(always)]
fn l2_squared_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        let d = x - y;
        tail += d * d;
    }
    reduce(acc) + tail
}

/// Squared L2 norm.
#[inline]
pub fn norm_squared(a: &[f32]) -> f32 {
    dot(a, a)
}

/// A strictly increasing map from ℝ to (0, ∞): `x ≥ 0 ↦ 1 + x`, `x < 0 ↦ 1 / (1 − x)`.
///
/// hnsw_rs asserts that distances are non-negative, but maximum-inner-product search
/// wants to rank by `−dot`, which is negative for similar vectors. HNSW only ever
/// *compares* distances (search and the neighbour-selection heuristic), so ranking by a
/// strictly increasing function of `−dot` builds exactly the graph ranking by `−dot`
/// would.
#[inline]
pub fn positive_monotone(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 + x
    } else {
        1.0 / (1.0 - x)
    }
}

/// The distance the HNSW graph is built with. Every variant is non-negative and never NaN
/// (hnsw_rs asserts both), and preserves the ranking of the user-facing metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IndexDistance {
    /// Cosine on vectors normalised at insertion: `max(0, 1 − dot)`.
    CosineUnit,
    /// Squared L2 (same ranking as L2, no square root).
    L2Squared,
    /// Inner product, ranked by `positive_monotone(−dot)`.
    NegDot,
}

impl IndexDistance {
    #[inline]
    pub(crate) fn eval_portable(self, a: &[f32], b: &[f32]) -> f32 {
        let d = match self {
            IndexDistance::CosineUnit => 1.0 - dot(a, b),
            IndexDistance::L2Squared => l2_squared(a, b),
            IndexDistance::NegDot => positive_monotone(-dot(a, b)),
        };
        // NaN.max(0.0) == 0.0, and negative rounding noise becomes 0.
        let d = d.max(0.0);
        if d.is_finite() {
            d
        } else {
            f32::MAX
        }
    }
}

impl Distance<f32> for IndexDistance {
    #[inline]
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        #[cfg(feature = "anndists-simd")]
        if let IndexDistance::L2Squared = self {
            // Non-squared L2: same ranking. Inputs are validated, so never NaN.
            return anndists::dist::distances::DistL2.eval(va, vb);
        }
        self.eval_portable(va, vb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn kernels_match_naive_sums() {
        for n in [1usize, 7, 16, 17, 33, 128, 255, 784] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 13.0)
                .collect();
            let d = dot(&a, &b) as f64;
            assert!(
                (d - naive_dot(&a, &b)).abs() < 1e-3 * (1.0 + d.abs()),
                "n={n}"
            );
            let l2: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| ((*x - *y) as f64).powi(2))
                .sum();
            assert!(
                (l2_squared(&a, &b) as f64 - l2).abs() < 1e-3 * (1.0 + l2),
                "n={n}"
            );
        }
    }

    /// The runtime-selected (AVX2) and baseline builds of a kernel return identical bits.
    #[test]
    fn dispatched_kernels_are_bit_identical_to_baseline() {
        let mut x = 0x1234_5678_u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        };
        for n in [3usize, 16, 31, 128, 255, 784, 1536] {
            for _ in 0..20 {
                let a: Vec<f32> = (0..n).map(|_| next() * 100.0).collect();
                let b: Vec<f32> = (0..n).map(|_| next()).collect();
                assert_eq!(
                    dot(&a, &b).to_bits(),
                    dot_scalar(&a, &b).to_bits(),
                    "dot n={n}"
                );
                assert_eq!(
                    l2_squared(&a, &b).to_bits(),
                    l2_squared_scalar(&a, &b).to_bits(),
                    "l2 n={n}"
                );
            }
        }
    }

    #[test]
    fn positive_monotone_is_increasing_and_positive() {
        let xs = [
            -1e30f32, -1e6, -10.0, -1.0, -0.5, -1e-6, 0.0, 1e-6, 0.5, 1.0, 10.0, 1e6,
        ];
        for w in xs.windows(2) {
            assert!(positive_monotone(w[0]) < positive_monotone(w[1]), "{w:?}");
        }
        assert!(xs.iter().all(|x| positive_monotone(*x) > 0.0));
    }

    #[test]
    fn index_distances_are_never_negative_or_nan() {
        let a = [1.0f32, 0.0];
        let b = [1.0000001f32, 0.0];
        assert!(IndexDistance::CosineUnit.eval_portable(&a, &b) >= 0.0);
        let big = [3e38f32, -3e38];
        let d = IndexDistance::L2Squared.eval_portable(&big, &[-3e38, 3e38]);
        assert!(d.is_finite() && d >= 0.0);
        let d = IndexDistance::NegDot.eval_portable(&big, &big);
        assert!(d.is_finite() && d >= 0.0);
    }
}
