//! Vectorizing helpers shared by the kernels: the SIMD-level dispatch (`wide`), a fast `exp`,
//! lane-parallel reductions, and the streaming read that measures memory bandwidth.

/// Runs `body` compiled for AVX-512 (or else AVX2 + FMA) when the CPU has it. The element-wise
/// loops of these kernels are written to vectorize, but a portable build targets baseline
/// x86-64 (4-lane SSE); `body` is inlined into a function compiled for the wider registers.
/// Floating-point results are the same bits at every level (no reassociation; `mul_add` is
/// fused everywhere). `KIEM_SIMD=baseline` or `KIEM_SIMD=avx2` caps the level.
#[inline(always)]
pub(crate) fn wide<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// The CPU has the features this function is compiled for.
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        #[inline]
        unsafe fn avx512<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        /// # Safety
        /// The CPU has the features this function is compiled for.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        match level() {
            // SAFETY: `level` reports only features the CPU has.
            Level::Avx512 => return unsafe { avx512(body) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { avx2(body) },
            Level::Base => {}
        }
    }
    body()
}

/// The instruction sets kernels may use, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Avx512,
    Avx2,
    Base,
}

/// The SIMD level of this process: the best the CPU has, capped by `KIEM_SIMD=baseline` or
/// `KIEM_SIMD=avx2` (so tests can run every code path on any x86 machine). Hand-written
/// intrinsics kernels dispatch on it too.
pub(crate) fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let cap = std::env::var("KIEM_SIMD").unwrap_or_default();
            if cap == "baseline" {
                return Level::Base;
            }
            if cap != "avx2"
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("fma")
            {
                return Level::Avx512;
            }
            // F16C too: the quantized kernels widen fp16 scales (every AVX2 CPU has it).
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Level::Avx2;
            }
        }
        Level::Base
    })
}

/// `e^x` to about 2e-7 relative error, written so loops over it vectorize (the libm call does
/// not): range reduction by ln 2, a degree-6 polynomial, and the exponent set by bits.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer with plain SSE2 arithmetic
    // (`round`/`floor` would be library calls on baseline x86-64 and block vectorization).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The integer n sits in the low bits of `shifted`'s mantissa: read it there rather than
    // with `as i32`, whose saturating conversion does not vectorize (it went lane by lane).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    p * scale
}

/// `tanh` through [`fast_exp`]: absolute error about 1e-7 (what GELU needs).
#[inline(always)]
pub(super) fn fast_tanh(x: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * x) + 1.0)
}

/// Maximum with 8 independent lanes, so the loop vectorizes.
#[inline(always)]
pub(super) fn lane_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Dot product with 16 independent lanes (a fixed order, so deterministic), the lanes then
/// summed as a tree (each with the one 8 above, then 4, 2, 1): the same bits at every SIMD
/// level. Decoding's attention takes one per cached key; summing the lanes one after another
/// was a chain of 15 dependent adds per key (Q4_0 decoding after a 512-token prompt: 62-70%
/// of its bandwidth bound before, 68-73% with the tree and grouped heads; bench/RESULTS.md).
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let whole = n - n % 16;
    let tail: f32 = a[whole..n]
        .iter()
        .zip(&b[whole..n])
        .map(|(x, y)| x * y)
        .sum();
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the CPU has the level's features; both slices hold `whole` values.
        Level::Avx512 => return unsafe { lane_dot_avx512(a.as_ptr(), b.as_ptr(), whole) } + tail,
        // SAFETY: as above.
        Level::Avx2 => return unsafe { lane_dot_avx2(a.as_ptr(), b.as_ptr(), whole) } + tail,
        Level::Base => {}
    }
    let mut lanes = [0f32; 16];
    for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        for j in 0..16 {
            lanes[j] += x[j] * y[j];
        }
    }
    let eighths: [f32; 8] = std::array::from_fn(|j| lanes[j] + lanes[j + 8]);
    let quarters: [f32; 4] = std::array::from_fn(|j| eighths[j] + eighths[j + 4]);
    (quarters[0] + quarters[2]) + (quarters[1] + quarters[3]) + tail
}

/// [`lane_dot`]'s lanes over the first `n` (a multiple of 16) values, with AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F; `a` and `b` point at `n` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn lane_dot_avx512(a: *const f32, b: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut lanes = _mm512_setzero_ps();
    for at in (0..n).step_by(16) {
        let product = _mm512_mul_ps(_mm512_loadu_ps(a.add(at)), _mm512_loadu_ps(b.add(at)));
        lanes = _mm512_add_ps(lanes, product);
    }
    let low = _mm512_castps512_ps256(lanes);
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lanes)));
    sum_eighths(_mm256_add_ps(low, high))
}

/// [`lane_dot`]'s lanes over the first `n` (a multiple of 16) values, with AVX2: lanes 0-7
/// and 8-15 in two registers.
///
/// # Safety
/// The CPU has AVX2; `a` and `b` point at `n` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn lane_dot_avx2(a: *const f32, b: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let (mut low, mut high) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for at in (0..n).step_by(16) {
        let product = _mm256_mul_ps(_mm256_loadu_ps(a.add(at)), _mm256_loadu_ps(b.add(at)));
        low = _mm256_add_ps(low, product);
        let product = _mm256_mul_ps(
            _mm256_loadu_ps(a.add(at + 8)),
            _mm256_loadu_ps(b.add(at + 8)),
        );
        high = _mm256_add_ps(high, product);
    }
    sum_eighths(_mm256_add_ps(low, high))
}

/// The 8 lanes of `eighths` summed as [`lane_dot`] does: lane j with j + 4, then the
/// quarters 0 + 2 and 1 + 3, then those two.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn sum_eighths(eighths: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let quarters = _mm_add_ps(
        _mm256_castps256_ps128(eighths),
        _mm256_extractf128_ps::<1>(eighths),
    );
    let halves = _mm_add_ps(quarters, _mm_movehl_ps(quarters, quarters));
    _mm_cvtss_f32(_mm_add_ss(halves, _mm_shuffle_ps::<1>(halves, halves)))
}

/// Wrapping sum of the bits of `x` with 64 independent lanes, compiled for the widest
/// registers: integer adds far outrun memory, so timing it over a buffer larger than the caches
/// measures read bandwidth (whatever the values: no float special cases to slow it down).
pub fn streaming_read_f32(x: &[f32]) -> u32 {
    wide(
        #[inline(always)]
        || streaming_read(x, f32::to_bits),
    )
}

/// [`streaming_read_f32`] for bf16 (or any 16-bit) words.
pub fn streaming_read_u16(x: &[u16]) -> u32 {
    wide(
        #[inline(always)]
        || streaming_read(x, u32::from),
    )
}

#[inline(always)]
fn streaming_read<T: Copy>(x: &[T], bits: impl Fn(T) -> u32) -> u32 {
    let mut lanes = [0u32; 64];
    let chunks = x.chunks_exact(64);
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u32, |s, &v| s.wrapping_add(bits(v)));
    for c in chunks {
        for j in 0..64 {
            lanes[j] = lanes[j].wrapping_add(bits(c[j]));
        }
    }
    lanes.iter().fold(tail, |s, &v| s.wrapping_add(v))
}

/// Sum of `f(x)` with 8 independent lanes (a fixed order, so still deterministic).
#[inline(always)]
pub(super) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            lanes[j] += f(c[j]);
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}
