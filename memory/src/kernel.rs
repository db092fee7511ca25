//! Distance kernels.
//!
//! All kernels use one fixed summation order and fused multiply-adds: element `j` of the
//! vectors is accumulated into lane `j mod 32`, in increasing `j`, as
//! `lane = fma(x − y, x − y, lane)` (L2) or `lane = fma(x, y, lane)` (dot), and the 32
//! lanes are then summed by a fixed halving tree (`lane i + lane i+16`, then `i + i+8`,
//! `i + i+4`, `i + i+2`, `0 + 1`). An IEEE-754 fused multiply-add has one rounding and so
//! one result on every platform — the AVX2 and AVX-512 `vfmadd` instructions, an aarch64
//! `fmla`, and `f32::mul_add`'s software fallback (libm `fmaf`) on a CPU without FMA agree
//! bit for bit. The result is therefore bit-identical on every platform and in every
//! process, which is what makes the HNSW graph — and everything derived from it during
//! `apply`, such as consolidation — identical on all replicas. (Changing this order
//! changes graphs: every replica must run the same kernels.)
//!
//! On x86-64 CPUs with AVX2 and FMA the kernels run explicit 8-wide code (four registers
//! hold the 32 lanes), and the batch kernels 16-wide code (two registers) where AVX-512 is
//! there too; `pulp`'s safe runtime-dispatch wrappers (`pulp::x86::V3`, `V4`) select it at
//! run time, and elsewhere the portable scalar source below runs. All perform the same
//! per-lane operations in the same order and the same reduction, so they return the same
//! bits — unlike kernels with a single accumulator of ISA-dependent width. Unit tests
//! check every instruction set the CPU has bit for bit against the scalar source on random
//! inputs of every length up to 300 and longer ones. 32 lanes are enough independent
//! accumulators to hide the latency of the dependent adds at either width.
//!
//! [`l2_squared_bounded`] is the same L2 sum that gives up once a partial sum exceeds a
//! bound. Every term is non-negative and rounding is monotone, so a partial sum never
//! exceeds the full one: a search that only needs to know whether a node beats the bound
//! decides exactly as if it had computed the whole distance, while reading a fraction of
//! a distant vector.
//!
//! The `*_batch` kernels compute the same sums for up to [`BATCH`] vectors against one
//! query, interleaved 16 floats of each vector at a time. Each vector's lanes see exactly
//! the operations of the one-vector kernel, so the results are the same bits; what
//! changes is that four streams of loads are in flight instead of one. Outside L2 a
//! distance waits on memory, not arithmetic (784-d L2 on an AMD EPYC, AVX2, vectors at
//! random among 10,000 / 60,000: about 200 / 400 ns one at a time, 130 / 260 ns per
//! vector four at a time, 45 ns when the vector is in L1), which is why graph search
//! evaluates a node's new neighbours in batches. The batch kernels also read rows of
//! bfloat16 ([`Component`], [`to_bf16`]): widening a bf16 to f32 is exact (a shift), so
//! such a distance is again the same on every platform, and it reads half the bytes
//! (random 784-d rows among 10,000: 80–110 ns per vector, four at a time).

use anndists::dist::distances::Distance;

/// Accumulator lanes: element `j` goes to lane `j % LANES`.
const LANES: usize = 32;

/// Floats summed between two bound checks of [`l2_squared_bounded`].
pub(crate) const CHECK_EVERY: usize = 4 * LANES;

/// Vectors evaluated together by the `*_batch` kernels.
pub const BATCH: usize = 4;

/// Runs `$body` with `$s` bound to an instruction set this CPU has, inside its
/// `vectorize`, and returns the result; falls through where none applies (then the
/// scalar source runs). `wide` tries AVX-512 before AVX2; without it only AVX2 runs.
///
/// Only the batch kernels (the graph walk) go wide. Measured on a Xeon with AVX-512 (Ice
/// Lake), alternating the two every 50 queries or 1,000 inserts in one process (so the
/// machine's drift cancels): 16-wide batch kernels made searches 7–10% faster (10k × 784,
/// Fashion-MNIST and clustered), while 16-wide one-vector kernels made graph builds 0–8%
/// slower (hnsw_rs' insert path interleaves each distance with scalar work, which then
/// runs at AVX-512's lower clock) and 128-d searches no faster.
macro_rules! with_simd {
    (wide, $s:ident => $body:expr) => {
        #[cfg(target_arch = "x86_64")]
        if let Some($s) = pulp::x86::V4::try_new() {
            return $s.vectorize(
                #[inline(always)]
                || $body,
            );
        }
        with_simd!($s => $body);
    };
    ($s:ident => $body:expr) => {
        #[cfg(target_arch = "x86_64")]
        if let Some($s) = pulp::x86::V3::try_new() {
            return $s.vectorize(
                #[inline(always)]
                || $body,
            );
        }
    };
}

/// A stored vector component the batch kernels read: `f32`, or a bfloat16 held in a
/// `u16` (the upper half of an `f32`'s bits, see [`to_bf16`]). The kernels widen every
/// component to `f32` exactly and then sum as for `f32` rows, so an `f32` query against
/// bf16 rows gives the same bits on every platform too.
pub trait Component: Copy + sealed::Sealed {
    /// The component as an `f32` (exact).
    fn to_f32(self) -> f32;
    /// Eight components from the start of `s` as an AVX2 register.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    fn load8(v3: pulp::x86::V3, s: &[Self]) -> pulp::f32x8;
    /// Sixteen components from the start of `s` as an AVX-512 register.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    fn load16(v4: pulp::x86::V4, s: &[Self]) -> pulp::f32x16;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

impl Component for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn load8(_: pulp::x86::V3, s: &[f32]) -> pulp::f32x8 {
        let a: [f32; 8] = s[..8].try_into().expect("8 floats");
        pulp::cast(a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn load16(_: pulp::x86::V4, s: &[f32]) -> pulp::f32x16 {
        let a: [f32; 16] = s[..16].try_into().expect("16 floats");
        pulp::cast(a)
    }
}

impl Component for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn load8(v3: pulp::x86::V3, s: &[u16]) -> pulp::f32x8 {
        let a: [u16; 8] = s[..8].try_into().expect("8 halves");
        let wide = v3.convert_u16x8_to_u32x8(pulp::cast(a));
        pulp::cast(v3.shl_const_u32x8::<16>(wide))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn load16(v4: pulp::x86::V4, s: &[u16]) -> pulp::f32x16 {
        let a: [u16; 16] = s[..16].try_into().expect("16 halves");
        let wide = v4.convert_u16x16_to_u32x16(pulp::cast(a));
        pulp::cast(v4.shl_const_u32x16::<16>(wide))
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as the upper 16 bits of an
/// `f32`: 8 significant bits and the full `f32` exponent range. `x` must be finite (stored
/// vectors are); a finite `x` beyond bf16's largest finite value rounds to infinity.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Which code the kernels run on this machine: `"avx512 batches, avx2"` (x86-64 with
/// AVX-512 F, BW, CD, DQ and VL: the batch kernels 16 wide, the others 8 wide), `"avx2"`
/// (x86-64 with AVX2 and FMA) or `"baseline"`. Informational: all give identical
/// results.
pub fn active_kernels() -> &'static str {
    if cfg!(feature = "anndists-simd") {
        return "anndists-simd (L2 graphs)";
    }
    #[cfg(target_arch = "x86_64")]
    {
        if pulp::x86::V4::try_new().is_some() {
            return "avx512 batches, avx2";
        }
        if pulp::x86::V3::try_new().is_some() {
            return "avx2";
        }
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

/// One lane's step of the squared L2 sum: `acc + (x − y)²`, fused (one rounding).
#[inline(always)]
fn l2_step(acc: f32, x: f32, y: f32) -> f32 {
    let d = x - y;
    d.mul_add(d, acc)
}

/// One lane's step of the dot product: `acc + x·y`, fused (one rounding).
#[inline(always)]
fn dot_step(acc: f32, x: f32, y: f32) -> f32 {
    x.mul_add(y, acc)
}

/// Steps lane `j` with `(x[j], y[j])` for `j < x.len() < LANES`: the last, partial block
/// of a vector.
#[inline(always)]
fn partial_block<C: Component>(
    acc: &mut [f32; LANES],
    x: &[f32],
    y: &[C],
    step: impl Fn(f32, f32, f32) -> f32 + Copy,
) {
    for ((a, x), y) in acc.iter_mut().zip(x).zip(y) {
        *a = step(*a, *x, y.to_f32());
    }
}

/// The lane sum of `step` over `a` and `b` (up to the shorter length).
#[inline(always)]
fn lane_sum<C: Component>(a: &[f32], b: &[C], step: impl Fn(f32, f32, f32) -> f32 + Copy) -> f32 {
    checked_lane_sum(a, b, step, None)
}

/// [`lane_sum`] of the squared differences that returns early, with a value `> bound`
/// that is at most the full sum, once a partial sum (checked every [`CHECK_EVERY`]
/// floats) exceeds `bound`. Otherwise returns exactly `lane_sum`'s result.
#[inline(always)]
fn l2_bounded_sum<C: Component>(a: &[f32], b: &[C], bound: f32) -> f32 {
    checked_lane_sum(a, b, l2_step, Some(bound))
}

/// The lane sum, and with a `bound` the check after every [`CHECK_EVERY`] floats (which
/// reads the lanes without changing them).
#[inline(always)]
fn checked_lane_sum<C: Component>(
    a: &[f32],
    b: &[C],
    step: impl Fn(f32, f32, f32) -> f32 + Copy,
    bound: Option<f32>,
) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(CHECK_EVERY);
    let cb = b.chunks_exact(CHECK_EVERY);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for (x, y) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
            for i in 0..LANES {
                acc[i] = step(acc[i], x[i], y[i].to_f32());
            }
        }
        if let Some(bound) = bound {
            let partial = reduce(&acc);
            if partial > bound {
                return partial;
            }
        }
    }
    let (cx, cy) = (ra.chunks_exact(LANES), rb.chunks_exact(LANES));
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (x, y) in cx.zip(cy) {
        for i in 0..LANES {
            acc[i] = step(acc[i], x[i], y[i].to_f32());
        }
    }
    partial_block(&mut acc, rx, ry, step);
    reduce(&acc)
}

#[inline(always)]
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    lane_sum(a, b, dot_step)
}

#[inline(always)]
fn l2_squared_scalar(a: &[f32], b: &[f32]) -> f32 {
    lane_sum(a, b, l2_step)
}

/// Dot product with a platform-independent summation order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    with_simd!(s => simd::checked_lane_sum(s, a, b, simd::Dot, None));
    dot_scalar(a, b)
}

/// Squared Euclidean distance with a platform-independent summation order.
#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    with_simd!(s => simd::checked_lane_sum(s, a, b, simd::L2, None));
    l2_squared_scalar(a, b)
}

/// [`l2_squared`], or — once a partial sum exceeds `bound` — some value `v` with
/// `bound < v ≤ l2_squared(a, b)`, computed from a prefix of the vectors.
///
/// Hence `l2_squared_bounded(a, b, t) <= t` exactly when `l2_squared(a, b) <= t`, and
/// then both return the same bits.
#[inline]
pub fn l2_squared_bounded(a: &[f32], b: &[f32], bound: f32) -> f32 {
    with_simd!(s => simd::checked_lane_sum(s, a, b, simd::L2, Some(bound)));
    l2_bounded_sum(a, b, bound)
}

/// Whether the batch kernels' interleaved path applies: every vector as long as the query
/// (otherwise each is summed on its own, over the shorter length, as the one-vector
/// kernels do).
#[inline(always)]
fn same_lengths<C: Component>(q: &[f32], vs: &[&[C]]) -> bool {
    vs.len() <= BATCH && vs.iter().all(|v| v.len() == q.len())
}

/// [`l2_squared_bounded`] of `q` against each of `vs` (at most [`BATCH`]): `out[k]` is
/// bit for bit `l2_squared_bounded(q, vs[k], bound)` for `k < vs.len()`, and `0.0` after.
/// With `bound = f32::INFINITY` that is [`l2_squared`].
///
/// # Panics
/// If `vs` holds more than [`BATCH`] vectors.
#[inline]
pub fn l2_squared_bounded_batch<C: Component>(q: &[f32], vs: &[&[C]], bound: f32) -> [f32; BATCH] {
    assert!(vs.len() <= BATCH, "at most {BATCH} vectors per batch");
    if same_lengths(q, vs) {
        with_simd!(wide, s => simd::sum_batch::<_, C, true>(s, q, vs, bound, simd::L2));
    }
    let mut out = [0f32; BATCH];
    for (o, v) in out.iter_mut().zip(vs) {
        *o = l2_bounded_sum(q, v, bound);
    }
    out
}

/// [`dot`] of `q` with each of `vs` (at most [`BATCH`]), bit for bit; `0.0` after
/// `vs.len()`.
///
/// # Panics
/// If `vs` holds more than [`BATCH`] vectors.
#[inline]
pub fn dot_batch<C: Component>(q: &[f32], vs: &[&[C]]) -> [f32; BATCH] {
    assert!(vs.len() <= BATCH, "at most {BATCH} vectors per batch");
    if same_lengths(q, vs) {
        with_simd!(wide, s => simd::sum_batch::<_, C, false>(s, q, vs, f32::INFINITY, simd::Dot));
    }
    let mut out = [0f32; BATCH];
    for (o, v) in out.iter_mut().zip(vs) {
        *o = lane_sum(q, v, dot_step);
    }
    out
}

/// The same sums written with explicit SIMD registers, for `vectorize` of an instruction
/// set (`simd::Isa`): AVX2 (`pulp::x86::V3`, four 8-float registers hold the 32 lanes)
/// or AVX-512 (`pulp::x86::V4`, two 16-float registers); register `g` holds lanes
/// `WIDTH·g..WIDTH·(g + 1)`. Every lane sees the same additions in the same order as in
/// the scalar source, and the reduction is the same tree; tests compare each instruction
/// set with the scalar source bit for bit.
#[cfg(target_arch = "x86_64")]
mod simd {
    use pulp::x86::{V3, V4};
    use pulp::{f32x16, f32x8};

    use super::{Component, BATCH, CHECK_EVERY, LANES};

    /// Registers an accumulator array has room for (AVX2 uses all four, AVX-512 two).
    pub(super) const MAX_REGS: usize = 4;

    /// One instruction set's registers and the operations the kernels need.
    pub(super) trait Isa: Copy {
        /// A register of `WIDTH` floats.
        type R: Copy;
        /// Floats per register; `LANES` is a multiple of `2 · WIDTH`.
        const WIDTH: usize;
        fn zero(self) -> Self::R;
        /// `WIDTH` floats from the start of `s`.
        fn load(self, s: &[f32]) -> Self::R;
        /// `WIDTH` components from the start of `s`, widened to `f32` (exactly).
        fn load_c<C: Component>(self, s: &[C]) -> Self::R;
        /// `super::l2_step` on every lane.
        fn l2_step(self, acc: Self::R, x: Self::R, y: Self::R) -> Self::R;
        /// `super::dot_step` on every lane.
        fn dot_step(self, acc: Self::R, x: Self::R, y: Self::R) -> Self::R;
        /// `super::reduce` of the lanes in `acc[..LANES / WIDTH]`.
        fn reduce(self, acc: &[Self::R; MAX_REGS]) -> f32;
    }

    /// Lanes `i + i+8` of 16 lanes, then the scalar end of `super::reduce`.
    #[inline(always)]
    fn reduce16(v3: V3, s16: [f32x8; 2]) -> f32 {
        let s8: [f32; 8] = pulp::cast(v3.add_f32x8(s16[0], s16[1]));
        let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
        (s4[0] + s4[2]) + (s4[1] + s4[3])
    }

    impl Isa for V3 {
        type R = f32x8;
        const WIDTH: usize = 8;
        #[inline(always)]
        fn zero(self) -> f32x8 {
            self.splat_f32x8(0.0)
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> f32x8 {
            let a: [f32; 8] = s[..8].try_into().expect("8 floats");
            pulp::cast(a)
        }
        #[inline(always)]
        fn load_c<C: Component>(self, s: &[C]) -> f32x8 {
            C::load8(self, s)
        }
        #[inline(always)]
        fn l2_step(self, acc: f32x8, x: f32x8, y: f32x8) -> f32x8 {
            let d = self.sub_f32x8(x, y);
            self.mul_add_f32x8(d, d, acc)
        }
        #[inline(always)]
        fn dot_step(self, acc: f32x8, x: f32x8, y: f32x8) -> f32x8 {
            self.mul_add_f32x8(x, y, acc)
        }
        #[inline(always)]
        fn reduce(self, acc: &[f32x8; MAX_REGS]) -> f32 {
            // Lanes i + i+16: registers 0+2, 1+3.
            let s16 = [
                self.add_f32x8(acc[0], acc[2]),
                self.add_f32x8(acc[1], acc[3]),
            ];
            reduce16(self, s16)
        }
    }

    impl Isa for V4 {
        type R = f32x16;
        const WIDTH: usize = 16;
        #[inline(always)]
        fn zero(self) -> f32x16 {
            self.splat_f32x16(0.0)
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> f32x16 {
            let a: [f32; 16] = s[..16].try_into().expect("16 floats");
            pulp::cast(a)
        }
        #[inline(always)]
        fn load_c<C: Component>(self, s: &[C]) -> f32x16 {
            C::load16(self, s)
        }
        #[inline(always)]
        fn l2_step(self, acc: f32x16, x: f32x16, y: f32x16) -> f32x16 {
            let d = self.sub_f32x16(x, y);
            self.mul_add_f32x16(d, d, acc)
        }
        #[inline(always)]
        fn dot_step(self, acc: f32x16, x: f32x16, y: f32x16) -> f32x16 {
            self.mul_add_f32x16(x, y, acc)
        }
        #[inline(always)]
        fn reduce(self, acc: &[f32x16; MAX_REGS]) -> f32 {
            // Lanes i + i+16: registers 0+1.
            reduce16(*self, pulp::cast(self.add_f32x16(acc[0], acc[1])))
        }
    }

    /// The lane step a kernel sums: [`L2`] or [`Dot`] (types, so that every kernel is
    /// compiled with its step inlined).
    pub(super) trait Step: Copy {
        fn step<S: Isa>(self, s: S, acc: S::R, x: S::R, y: S::R) -> S::R;
    }

    /// `super::l2_step`.
    #[derive(Clone, Copy)]
    pub(super) struct L2;

    /// `super::dot_step`.
    #[derive(Clone, Copy)]
    pub(super) struct Dot;

    impl Step for L2 {
        #[inline(always)]
        fn step<S: Isa>(self, s: S, acc: S::R, x: S::R, y: S::R) -> S::R {
            s.l2_step(acc, x, y)
        }
    }

    impl Step for Dot {
        #[inline(always)]
        fn step<S: Isa>(self, s: S, acc: S::R, x: S::R, y: S::R) -> S::R {
            s.dot_step(acc, x, y)
        }
    }

    #[inline(always)]
    fn regs<S: Isa>() -> usize {
        LANES / S::WIDTH
    }

    #[inline(always)]
    fn block<S: Isa>(s: S, acc: &mut [S::R; MAX_REGS], x: &[f32], y: &[f32], step: impl Step) {
        for (g, a) in acc.iter_mut().take(regs::<S>()).enumerate() {
            let o = S::WIDTH * g;
            *a = step.step(s, *a, s.load(&x[o..]), s.load(&y[o..]));
        }
    }

    /// `super::partial_block`: the last `x.len() < LANES` elements, zero-padded to a
    /// whole block and stepped into every lane. A padding lane steps with `(0, 0)`, which
    /// adds `+0.0` to it (`0 − 0 = +0`, `+0 · +0 = +0`): that leaves its bits unchanged,
    /// since a lane is never `-0.0` (it starts at `+0.0`, and a rounded sum is `-0.0` only
    /// if both operands are). So this is exactly the lane-by-lane definition.
    #[inline(always)]
    fn partial_block<S: Isa>(
        s: S,
        acc: &mut [S::R; MAX_REGS],
        x: &[f32],
        y: &[f32],
        step: impl Step,
    ) {
        if x.is_empty() {
            return;
        }
        let (mut px, mut py) = ([0f32; LANES], [0f32; LANES]);
        px[..x.len()].copy_from_slice(x);
        py[..y.len()].copy_from_slice(y);
        block(s, acc, &px, &py, step);
    }

    /// `super::checked_lane_sum` on registers: the lane sum of `step`, and with a
    /// `bound` the check after every `CHECK_EVERY` floats.
    #[inline(always)]
    pub(super) fn checked_lane_sum<S: Isa>(
        s: S,
        a: &[f32],
        b: &[f32],
        step: impl Step,
        bound: Option<f32>,
    ) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [s.zero(); MAX_REGS];
        let ca = a.chunks_exact(CHECK_EVERY);
        let cb = b.chunks_exact(CHECK_EVERY);
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for (x, y) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
                block(s, &mut acc, x, y, step);
            }
            if let Some(bound) = bound {
                let partial = s.reduce(&acc);
                if partial > bound {
                    return partial;
                }
            }
        }
        let (cx, cy) = (ra.chunks_exact(LANES), rb.chunks_exact(LANES));
        let (rx, ry) = (cx.remainder(), cy.remainder());
        for (x, y) in cx.zip(cy) {
            block(s, &mut acc, x, y, step);
        }
        partial_block(s, &mut acc, rx, ry, step);
        s.reduce(&acc)
    }

    /// Steps `q[from..to]` against all `BATCH` rows, into registers `2h` and `2h + 1`
    /// of each row's accumulators (lanes `2·WIDTH·h..2·WIDTH·(h + 1)`). Doing two
    /// registers of all rows at a time keeps 8 accumulators live, which AVX2's 16
    /// registers hold (AVX-512 covers all 32 lanes with `h = 0`), and reading every row
    /// leaves no branch in the loop (a branch per row and block made the compiler spill
    /// accumulators to the stack on every block).
    #[inline(always)]
    fn pair_blocks<S: Isa, C: Component>(
        s: S,
        acc: &mut [[S::R; MAX_REGS]; BATCH],
        q: &[f32],
        rows: &[&[C]; BATCH],
        (from, to): (usize, usize),
        h: usize,
        step: impl Step,
    ) {
        let w = S::WIDTH;
        let mut a = [[s.zero(); 2]; BATCH];
        for j in 0..BATCH {
            a[j] = [acc[j][2 * h], acc[j][2 * h + 1]];
        }
        for at in (from..to).step_by(LANES) {
            let o = at + 2 * w * h;
            let (x0, x1) = (s.load(&q[o..]), s.load(&q[o + w..]));
            for j in 0..BATCH {
                let r = &rows[j][o..o + 2 * w];
                a[j][0] = step.step(s, a[j][0], x0, s.load_c(r));
                a[j][1] = step.step(s, a[j][1], x1, s.load_c(&r[w..]));
            }
        }
        for j in 0..BATCH {
            acc[j][2 * h] = a[j][0];
            acc[j][2 * h + 1] = a[j][1];
        }
    }

    /// [`pair_blocks`] over all lanes.
    #[inline(always)]
    fn all_blocks<S: Isa, C: Component>(
        s: S,
        acc: &mut [[S::R; MAX_REGS]; BATCH],
        q: &[f32],
        rows: &[&[C]; BATCH],
        span: (usize, usize),
        step: impl Step,
    ) {
        for h in 0..regs::<S>() / 2 {
            pair_blocks(s, acc, q, rows, span, h, step);
        }
    }

    /// The sums of `step` over `q` and each of `vs` (all of `q`'s length, at most
    /// `BATCH`), interleaved `2 · WIDTH` floats of each row at a time. With `BOUNDED`, a
    /// row whose partial sum exceeds `bound` at a check (every `CHECK_EVERY` floats, as
    /// in `l2_bounded_sum`) stops there with that partial sum. The loop always steps four
    /// rows: a position without a row of its own (a short batch, or a row that stopped)
    /// repeats a row still going, whose lines are being read anyway, and its sums are
    /// ignored.
    #[inline(always)]
    pub(super) fn sum_batch<S: Isa, C: Component, const BOUNDED: bool>(
        s: S,
        q: &[f32],
        vs: &[&[C]],
        bound: f32,
        step: impl Step,
    ) -> [f32; BATCH] {
        let mut out = [0f32; BATCH];
        let Some(first) = vs.first() else {
            return out;
        };
        let n = q.len();
        let mut rows: [&[C]; BATCH] = [&first[..n]; BATCH];
        let mut live = [false; BATCH];
        for (k, v) in vs.iter().enumerate() {
            rows[k] = &v[..n];
            live[k] = true;
        }
        let mut acc = [[s.zero(); MAX_REGS]; BATCH];
        let checked = if BOUNDED {
            n / CHECK_EVERY * CHECK_EVERY
        } else {
            0
        };
        for start in (0..checked).step_by(CHECK_EVERY) {
            all_blocks(s, &mut acc, q, &rows, (start, start + CHECK_EVERY), step);
            let mut going = None;
            for k in 0..BATCH {
                if live[k] {
                    let partial = s.reduce(&acc[k]);
                    if partial > bound {
                        out[k] = partial;
                        live[k] = false;
                    } else {
                        going = Some(rows[k]);
                    }
                }
            }
            let Some(going) = going else {
                return out;
            };
            for k in 0..BATCH {
                if !live[k] {
                    rows[k] = going;
                }
            }
        }
        let whole = checked + (n - checked) / LANES * LANES;
        all_blocks(s, &mut acc, q, &rows, (checked, whole), step);
        for k in 0..BATCH {
            if live[k] {
                // The last < 32 components, widened to f32 (exactly) first.
                let mut tail = [0f32; LANES];
                for (t, c) in tail.iter_mut().zip(&rows[k][whole..]) {
                    *t = c.to_f32();
                }
                partial_block(s, &mut acc[k], &q[whole..], &tail[..n - whole], step);
                out[k] = s.reduce(&acc[k]);
            }
        }
        out
    }
}

/// Asks the CPU to start loading the cache lines of `v` (a hint: no effect on results;
/// a no-op off x86-64).
#[inline]
pub(crate) fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(sse) = pulp::core_arch::x86::Sse::try_new() {
        // One hint per 64-byte line.
        for x in v.iter().step_by((64 / size_of::<T>().max(1)).max(1)) {
            sse._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((x as *const T).cast::<i8>());
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

    /// [`Self::eval_bounded`] of `q` against each of `vs` (at most [`BATCH`]), bit for
    /// bit when the rows are `f32`, from the batch kernels; `out[k]` for `k >= vs.len()`
    /// is unspecified.
    #[inline]
    pub(crate) fn eval_bounded_batch<C: Component>(
        self,
        q: &[f32],
        vs: &[&[C]],
        bound: f32,
    ) -> [f32; BATCH] {
        let finite = |d: f32| if d.is_finite() { d } else { f32::MAX };
        match self {
            IndexDistance::L2Squared => {
                // With anndists' kernel building the graph, `eval_bounded` computes
                // whole distances; so does this.
                let bound = if cfg!(feature = "anndists-simd") {
                    f32::INFINITY
                } else {
                    bound
                };
                l2_squared_bounded_batch(q, vs, bound).map(finite)
            }
            IndexDistance::CosineUnit => dot_batch(q, vs).map(|p| finite((1.0 - p).max(0.0))),
            IndexDistance::NegDot => {
                dot_batch(q, vs).map(|p| finite(positive_monotone(-p).max(0.0)))
            }
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
    fn reference(a: &[f32], b: &[f32], step: impl Fn(f32, f32, f32) -> f32) -> f32 {
        let mut acc = [0f32; 32];
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            acc[j % 32] = step(acc[j % 32], *x, *y);
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

    /// The runtime-selected (AVX-512 or AVX2 on x86-64 CPUs that have them) and the
    /// baseline build of every kernel return identical bits, equal to the documented
    /// order, on random inputs of every length up to 300 (odd ones included) and beyond.
    #[test]
    fn dispatched_kernels_are_bit_identical_to_baseline() {
        let sq = |acc: f32, x: f32, y: f32| (x - y).mul_add(x - y, acc);
        for n in lengths() {
            for round in 0..4 {
                let (a, b) = random_vectors(n, 0x9e37_79b9 ^ (n as u32 * 7919 + round));
                let want_dot = reference(&a, &b, |acc, x, y| x.mul_add(y, acc)).to_bits();
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
                    reference(&a[..cut], &b[..cut], |acc, x, y| x.mul_add(y, acc)).to_bits(),
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

    /// The batch kernels give, for every vector of the batch, the bits of the one-vector
    /// kernels — whatever the batch size, length, bound, and which vectors exit early —
    /// and so do the metrics built on them.
    #[test]
    fn batch_kernels_are_bit_identical_to_one_at_a_time() {
        for n in lengths() {
            let q = random_vectors(n, 0x27d4_eb2f ^ n as u32).0;
            let vs: Vec<Vec<f32>> = (0..BATCH as u32)
                .map(|k| {
                    let (a, _) = random_vectors(n, 0x1656_67b1 ^ (n as u32 * 31 + k));
                    // Vector k is q scaled by k: the batch mixes near and far vectors.
                    a.iter().zip(&q).map(|(a, x)| x + a * k as f32).collect()
                })
                .collect();
            let full: Vec<f32> = vs.iter().map(|v| l2_squared(&q, v)).collect();
            let mid = full.iter().copied().fold(0f32, f32::max) * 0.5;
            for bound in [f32::INFINITY, mid, full[1], full[1] * 0.01, 0.0, f32::NAN] {
                for size in 0..=BATCH {
                    let refs: Vec<&[f32]> = vs[..size].iter().map(Vec::as_slice).collect();
                    let got = l2_squared_bounded_batch(&q, &refs, bound);
                    let dots = dot_batch(&q, &refs);
                    for k in 0..BATCH {
                        let (want, want_dot) = match refs.get(k) {
                            Some(v) => (l2_squared_bounded(&q, v, bound), dot(&q, v)),
                            None => (0.0, 0.0),
                        };
                        assert_eq!(got[k].to_bits(), want.to_bits(), "l2 n={n} k={k} b={bound}");
                        assert_eq!(dots[k].to_bits(), want_dot.to_bits(), "dot n={n} k={k}");
                    }
                    for metric in [
                        IndexDistance::L2Squared,
                        IndexDistance::CosineUnit,
                        IndexDistance::NegDot,
                    ] {
                        let got = metric.eval_bounded_batch(&q, &refs, bound);
                        for (k, v) in refs.iter().enumerate() {
                            let want = metric.eval_bounded(&q, v, bound);
                            assert_eq!(got[k].to_bits(), want.to_bits(), "{metric:?} n={n}");
                        }
                    }
                }
            }
            // Vectors of another length than the query take the one-at-a-time path.
            if n > 0 {
                let short = &vs[0][..n - 1];
                let got = l2_squared_bounded_batch(&q, &[short, &vs[1]], f32::INFINITY);
                assert_eq!(got[0].to_bits(), l2_squared(&q, short).to_bits());
                assert_eq!(got[1].to_bits(), full[1].to_bits());
            }
        }
    }

    /// Each instruction set this CPU has (AVX2, AVX-512) gives the scalar source's bits,
    /// whichever the dispatch picks: the one-vector kernels, plain and bounded, and the
    /// batch kernels over f32 and bfloat16 rows, for every batch size and bound.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_instruction_set_matches_the_scalar_source() {
        fn check<S: simd::Isa>(s: S) {
            for n in lengths() {
                let (a, b) = random_vectors(n, 0x6a09_e667 ^ n as u32);
                let l2 = lane_sum(&a, &b, l2_step);
                let got = simd::checked_lane_sum(s, &a, &b, simd::Dot, None);
                assert_eq!(
                    got.to_bits(),
                    lane_sum(&a, &b, dot_step).to_bits(),
                    "dot n={n}"
                );
                let got = simd::checked_lane_sum(s, &a, &b, simd::L2, None);
                assert_eq!(got.to_bits(), l2.to_bits(), "l2 n={n}");
                for bound in [f32::INFINITY, l2 * 0.5, 0.0, f32::NAN] {
                    let got = simd::checked_lane_sum(s, &a, &b, simd::L2, Some(bound));
                    let want = l2_bounded_sum(&a, &b, bound);
                    assert_eq!(got.to_bits(), want.to_bits(), "bounded n={n} b={bound}");
                }
                let rows: Vec<Vec<f32>> = (0..BATCH as u32)
                    .map(|k| {
                        let r = random_vectors(n, 0xbb67_ae85 ^ (n as u32 * 17 + k)).0;
                        r.iter().zip(&a).map(|(r, x)| x + r * k as f32).collect()
                    })
                    .collect();
                let halves: Vec<Vec<u16>> = rows
                    .iter()
                    .map(|r| r.iter().map(|&x| to_bf16(x)).collect())
                    .collect();
                let mid = l2_bounded_sum(&a, &rows[2], f32::INFINITY);
                for size in 0..=BATCH {
                    let fs: Vec<&[f32]> = rows[..size].iter().map(Vec::as_slice).collect();
                    let hs: Vec<&[u16]> = halves[..size].iter().map(Vec::as_slice).collect();
                    for bound in [f32::INFINITY, mid, 0.0] {
                        let got = simd::sum_batch::<_, f32, true>(s, &a, &fs, bound, simd::L2);
                        let got_h = simd::sum_batch::<_, u16, true>(s, &a, &hs, bound, simd::L2);
                        for k in 0..size {
                            let want = l2_bounded_sum(&a, fs[k], bound);
                            assert_eq!(got[k].to_bits(), want.to_bits(), "f32 n={n} k={k}");
                            let want = l2_bounded_sum(&a, hs[k], bound);
                            assert_eq!(got_h[k].to_bits(), want.to_bits(), "bf16 n={n} k={k}");
                        }
                    }
                    let got = simd::sum_batch::<_, u16, false>(s, &a, &hs, 0.0, simd::Dot);
                    for k in 0..size {
                        let want = lane_sum(&a, hs[k], dot_step);
                        assert_eq!(got[k].to_bits(), want.to_bits(), "bf16 dot n={n} k={k}");
                    }
                }
            }
        }
        let mut ran = 0;
        if let Some(v3) = pulp::x86::V3::try_new() {
            v3.vectorize(|| check(v3));
            ran += 1;
        }
        if let Some(v4) = pulp::x86::V4::try_new() {
            v4.vectorize(|| check(v4));
            ran += 1;
        }
        eprintln!(
            "checked {ran} instruction set(s); dispatch uses {}",
            active_kernels()
        );
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
