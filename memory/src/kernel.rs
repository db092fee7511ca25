//! Distance kernels.
//!
//! All kernels use one fixed summation order and plain multiplies and adds (Rust never
//! contracts them into FMAs): element `j` of the vectors is added into accumulator lane
//! `j mod 32`, in increasing `j`, and the 32 lanes are then summed by a fixed halving tree
//! (`lane i + lane i+16`, then `i + i+8`, `i + i+4`, `i + i+2`, `0 + 1`). The result is
//! therefore bit-identical on every IEEE-754 platform and in every process, which is what
//! makes the HNSW graph — and everything derived from it during `apply`, such as
//! consolidation — identical on all replicas. (Changing this order changes graphs: every
//! replica must run the same kernels.)
//!
//! On x86-64 CPUs with AVX2 the kernels run explicit 8-wide AVX2 code (four registers
//! hold the 32 lanes; `pulp::x86::V3`, a safe runtime-dispatch wrapper, selects it at run
//! time); elsewhere the portable scalar source below runs, compiled for the baseline
//! target (SSE2, NEON). Both perform the same per-lane operations in the same order and
//! the same reduction, so they return the same bits — unlike kernels with a single
//! accumulator of ISA-dependent width, or FMA-based kernels. Unit tests check this bit
//! for bit against a plain reference on random inputs of every length up to 300 and
//! longer ones. 32 lanes are four independent AVX2 accumulators, enough to hide the add
//! latency; 16 lanes (two accumulators) are latency-bound (hot-cache 784-d L2 on an
//! AMD EPYC with AVX2: 46 ns with 16 lanes, 43 ns with 32).
//!
//! [`l2_squared_bounded`] is the same L2 sum that gives up once a partial sum exceeds a
//! bound. Every term is non-negative and rounding is monotone, so a partial sum never
//! exceeds the full one: a search that only needs to know whether a node beats the bound
//! decides exactly as if it had computed the whole distance, while reading a fraction of
//! a distant vector.

use anndists::dist::distances::Distance;

/// Accumulator lanes: element `j` goes to lane `j % LANES`.
const LANES: usize = 32;

/// Floats summed between two bound checks of [`l2_squared_bounded`].
pub(crate) const CHECK_EVERY: usize = 4 * LANES;

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

/// The fixed reduction tree over the 32 lanes.
#[inline(always)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    let mut s16 = [0f32; 16];
    for i in 0..16 {
        s16[i] = acc[i] + acc[i + 16];
    }
    let mut s8 = [0f32; 8];
    for i in 0..8 {
        s8[i] = s16[i] + s16[i + 8];
    }
    let mut s4 = [0f32; 4];
    for i in 0..4 {
        s4[i] = s8[i] + s8[i + 4];
    }
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Adds `term(x[j], y[j])` into lane `j` for `j < x.len() < LANES`: the last, partial
/// block of a vector. The terms are first laid out in a zero-padded block, which is then
/// added to all lanes at once: adding `+0.0` leaves a lane's bits unchanged (a lane is
/// never `-0.0`: it starts at `+0.0`, and a rounded sum is `-0.0` only if both operands
/// are), so this is exactly the lane-by-lane definition, while `acc` stays in registers.
#[inline(always)]
fn partial_block(
    acc: &mut [f32; LANES],
    x: &[f32],
    y: &[f32],
    term: impl Fn(f32, f32) -> f32 + Copy,
) {
    if x.is_empty() {
        return;
    }
    let mut t = [0f32; LANES];
    for ((t, a), b) in t.iter_mut().zip(x).zip(y) {
        *t = term(*a, *b);
    }
    for i in 0..LANES {
        acc[i] += t[i];
    }
}

/// The lane sum of `term` over `a` and `b` (up to the shorter length).
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += term(x[i], y[i]);
        }
    }
    partial_block(&mut acc, ra, rb, term);
    reduce(&acc)
}

/// [`lane_sum`] of the squared differences that returns early, with a value `> bound`
/// that is at most the full sum, once a partial sum (checked every [`CHECK_EVERY`]
/// floats) exceeds `bound`. Otherwise returns exactly `lane_sum`'s result.
#[inline(always)]
fn l2_bounded_sum(a: &[f32], b: &[f32], bound: f32) -> f32 {
    let term = |x: f32, y: f32| {
        let d = x - y;
        d * d
    };
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(CHECK_EVERY);
    let cb = b.chunks_exact(CHECK_EVERY);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for (x, y) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
            for i in 0..LANES {
                acc[i] += term(x[i], y[i]);
            }
        }
        let partial = reduce(&acc);
        if partial > bound {
            return partial;
        }
    }
    let (cx, cy) = (ra.chunks_exact(LANES), rb.chunks_exact(LANES));
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (x, y) in cx.zip(cy) {
        for i in 0..LANES {
            acc[i] += term(x[i], y[i]);
        }
    }
    partial_block(&mut acc, rx, ry, term);
    reduce(&acc)
}

#[inline(always)]
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    lane_sum(a, b, |x, y| x * y)
}

#[inline(always)]
fn l2_squared_scalar(a: &[f32], b: &[f32]) -> f32 {
    lane_sum(a, b, |x, y| {
        let d = x - y;
        d * d
    })
}

/// Dot product with a platform-independent summation order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return v3.vectorize(
            #[inline(always)]
            || avx2::lane_sum(v3, a, b, |x, y| v3.mul_f32x8(x, y)),
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
            || avx2::lane_sum(v3, a, b, avx2::squared_difference(v3)),
        );
    }
    l2_squared_scalar(a, b)
}

/// [`l2_squared`], or — once a partial sum exceeds `bound` — some value `v` with
/// `bound < v ≤ l2_squared(a, b)`, computed from a prefix of the vectors.
///
/// Hence `l2_squared_bounded(a, b, t) <= t` exactly when `l2_squared(a, b) <= t`, and
/// then both return the same bits.
#[inline]
pub fn l2_squared_bounded(a: &[f32], b: &[f32], bound: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return v3.vectorize(
            #[inline(always)]
            || avx2::l2_bounded_sum(v3, a, b, bound),
        );
    }
    l2_bounded_sum(a, b, bound)
}

/// The same sums written with explicit 8-wide AVX2 operations (four registers hold the
/// 32 lanes: register `g` is lanes `8g..8g+8`), for `pulp::x86::V3::vectorize`. Every
/// lane sees the same additions in the same order as in the scalar source, and the
/// reduction is the same tree; tests compare the two bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use pulp::f32x8;
    use pulp::x86::V3;

    use super::{CHECK_EVERY, LANES};

    const REGS: usize = LANES / 8;

    #[inline(always)]
    fn load(s: &[f32]) -> f32x8 {
        let a: [f32; 8] = s[..8].try_into().expect("8 floats");
        pulp::cast(a)
    }

    #[inline(always)]
    pub(super) fn squared_difference(v3: V3) -> impl Fn(f32x8, f32x8) -> f32x8 + Copy {
        move |x, y| {
            let d = v3.sub_f32x8(x, y);
            v3.mul_f32x8(d, d)
        }
    }

    #[inline(always)]
    fn block(
        v3: V3,
        acc: &mut [f32x8; REGS],
        x: &[f32],
        y: &[f32],
        term: impl Fn(f32x8, f32x8) -> f32x8 + Copy,
    ) {
        for g in 0..REGS {
            acc[g] = v3.add_f32x8(acc[g], term(load(&x[8 * g..]), load(&y[8 * g..])));
        }
    }

    /// `super::partial_block`: the terms of the last `x.len() < LANES` elements in a
    /// zero-padded block, added to every lane.
    #[inline(always)]
    fn partial_block(
        v3: V3,
        acc: &mut [f32x8; REGS],
        x: &[f32],
        y: &[f32],
        term: impl Fn(f32x8, f32x8) -> f32x8 + Copy,
    ) {
        if x.is_empty() {
            return;
        }
        let zero = v3.splat_f32x8(0.0);
        let mut t = [zero; REGS];
        let (cx, cy) = (x.chunks_exact(8), y.chunks_exact(8));
        let (rx, ry) = (cx.remainder(), cy.remainder());
        let mut g = 0;
        for (bx, by) in cx.zip(cy) {
            t[g] = term(load(bx), load(by));
            g += 1;
        }
        if !rx.is_empty() {
            let (mut px, mut py) = ([0f32; 8], [0f32; 8]);
            px[..rx.len()].copy_from_slice(rx);
            py[..ry.len()].copy_from_slice(ry);
            let mut last: [f32; 8] = pulp::cast(term(pulp::cast(px), pulp::cast(py)));
            // Padding lanes must hold +0.0 whatever `term(0, 0)` is.
            for l in &mut last[rx.len()..] {
                *l = 0.0;
            }
            t[g] = pulp::cast(last);
        }
        for g in 0..REGS {
            acc[g] = v3.add_f32x8(acc[g], t[g]);
        }
    }

    /// `super::reduce` on registers.
    #[inline(always)]
    fn reduce(v3: V3, acc: &[f32x8; REGS]) -> f32 {
        // Lanes i + i+16 (registers 0+2, 1+3), then i + i+8.
        let s16 = [v3.add_f32x8(acc[0], acc[2]), v3.add_f32x8(acc[1], acc[3])];
        let s8: [f32; 8] = pulp::cast(v3.add_f32x8(s16[0], s16[1]));
        let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
        (s4[0] + s4[2]) + (s4[1] + s4[3])
    }

    #[inline(always)]
    pub(super) fn lane_sum(
        v3: V3,
        a: &[f32],
        b: &[f32],
        term: impl Fn(f32x8, f32x8) -> f32x8 + Copy,
    ) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [v3.splat_f32x8(0.0); REGS];
        let ca = a.chunks_exact(LANES);
        let cb = b.chunks_exact(LANES);
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            block(v3, &mut acc, x, y, term);
        }
        partial_block(v3, &mut acc, ra, rb, term);
        reduce(v3, &acc)
    }

    #[inline(always)]
    pub(super) fn l2_bounded_sum(v3: V3, a: &[f32], b: &[f32], bound: f32) -> f32 {
        let term = squared_difference(v3);
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [v3.splat_f32x8(0.0); REGS];
        let ca = a.chunks_exact(CHECK_EVERY);
        let cb = b.chunks_exact(CHECK_EVERY);
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for (x, y) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
                block(v3, &mut acc, x, y, term);
            }
            let partial = reduce(v3, &acc);
            if partial > bound {
                return partial;
            }
        }
        let (cx, cy) = (ra.chunks_exact(LANES), rb.chunks_exact(LANES));
        let (rx, ry) = (cx.remainder(), cy.remainder());
        for (x, y) in cx.zip(cy) {
            block(v3, &mut acc, x, y, term);
        }
        partial_block(v3, &mut acc, rx, ry, term);
        reduce(v3, &acc)
    }
}

/// Asks the CPU to start loading the cache lines of `v` (a hint: no effect on results;
/// a no-op off x86-64).
#[inline]
pub(crate) fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(sse) = pulp::core_arch::x86::Sse::try_new() {
        // One hint per 64-byte line.
        for x in v.iter().step_by(16) {
            sse._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((x as *const f32).cast::<i8>());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
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
    /// Like [`IndexDistance::eval_portable`], but may stop early once the result is
    /// known to exceed `bound`: whenever `eval_portable`'s result is `<= bound` this
    /// returns the same bits; otherwise some value `>= bound` and `<=` that result. So
    /// every comparison with `bound` (including ties) comes out as with the full
    /// distance. Only L2 stops early (its partial sums only grow); the others compute the
    /// full distance.
    #[inline]
    pub(crate) fn eval_bounded(self, a: &[f32], b: &[f32], bound: f32) -> f32 {
        match self {
            IndexDistance::L2Squared if !cfg!(feature = "anndists-simd") => {
                let d = l2_squared_bounded(a, b, bound);
                if d.is_finite() {
                    d
                } else {
                    f32::MAX
                }
            }
            _ => self.eval_portable(a, b),
        }
    }

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

    /// The documented summation order, written as plainly as possible: element `j` into
    /// lane `j % 32`, then the halving tree.
    fn reference(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
        let mut acc = [0f32; 32];
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            acc[j % 32] += term(*x, *y);
        }
        let mut width = 32;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                acc[i] += acc[i + width];
            }
        }
        acc[0]
    }

    /// Random vectors whose components span many magnitudes, so that any change in the
    /// order of the additions changes the rounded result.
    fn random_vectors(n: usize, seed: u32) -> (Vec<f32>, Vec<f32>) {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut component = || {
            let r = next();
            let unit = (r >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
            unit * [1e-3f32, 0.1, 1.0, 7.0, 300.0][(r % 5) as usize]
        };
        let a = (0..n).map(|_| component()).collect();
        let b = (0..n).map(|_| component()).collect();
        (a, b)
    }

    fn lengths() -> impl Iterator<Item = usize> {
        (0..=300).chain([383, 511, 783, 784, 785, 1023, 1536, 3001])
    }

    /// The runtime-selected (AVX2 on x86-64 CPUs that have it) and the baseline build of
    /// every kernel return identical bits, equal to the documented order, on random
    /// inputs of every length up to 300 (odd ones included) and beyond.
    #[test]
    fn dispatched_kernels_are_bit_identical_to_baseline() {
        let sq = |x: f32, y: f32| (x - y) * (x - y);
        for n in lengths() {
            for round in 0..4 {
                let (a, b) = random_vectors(n, 0x9e37_79b9 ^ (n as u32 * 7919 + round));
                let want_dot = reference(&a, &b, |x, y| x * y).to_bits();
                assert_eq!(dot(&a, &b).to_bits(), want_dot, "dot n={n}");
                assert_eq!(dot_scalar(&a, &b).to_bits(), want_dot, "dot baseline n={n}");
                let want_l2 = reference(&a, &b, sq).to_bits();
                assert_eq!(l2_squared(&a, &b).to_bits(), want_l2, "l2 n={n}");
                assert_eq!(
                    l2_squared_scalar(&a, &b).to_bits(),
                    want_l2,
                    "l2 baseline n={n}"
                );
                // Slices of different lengths: the shorter one decides.
                let cut = n / 2;
                assert_eq!(
                    dot(&a, &b[..cut]).to_bits(),
                    reference(&a[..cut], &b[..cut], |x, y| x * y).to_bits(),
                    "dot cut n={n}"
                );
            }
        }
    }

    /// The bounded L2 kernel returns the exact distance whenever it does not exceed the
    /// bound, and otherwise a value in (bound, exact]; dispatched and baseline agree.
    #[test]
    fn bounded_l2_is_exact_below_the_bound() {
        for n in lengths() {
            let (a, b) = random_vectors(n, 0x85eb_ca6b ^ n as u32);
            let full = l2_squared(&a, &b);
            for bound in [
                f32::INFINITY,
                full,
                full * 1.5,
                full * 0.999,
                full * 0.5,
                full * 0.01,
                0.0,
                f32::NAN,
            ] {
                let got = l2_squared_bounded(&a, &b, bound);
                assert_eq!(
                    got.to_bits(),
                    l2_bounded_sum(&a, &b, bound).to_bits(),
                    "dispatched vs baseline n={n} bound={bound}"
                );
                if bound.is_nan() || full <= bound {
                    assert_eq!(got.to_bits(), full.to_bits(), "n={n} bound={bound}");
                } else {
                    assert!(got > bound && got <= full, "n={n} bound={bound} got={got}");
                }
                let (e, f) = (
                    IndexDistance::L2Squared.eval_bounded(&a, &b, bound),
                    IndexDistance::L2Squared.eval_portable(&a, &b),
                );
                if bound.is_nan() || f <= bound {
                    assert_eq!(e.to_bits(), f.to_bits(), "n={n} bound={bound}");
                } else {
                    assert!(e >= bound && e <= f, "n={n} bound={bound}");
                }
            }
        }
        // Early exit actually happens on long vectors far beyond the bound.
        let (a, b) = random_vectors(784, 7);
        let early = l2_squared_bounded(&a, &b, 1.0);
        assert!(early > 1.0 && early < l2_squared(&a, &b));
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
