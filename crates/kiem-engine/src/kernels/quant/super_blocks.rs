//! The thin product with K super-block weights (Q4_K, Q5_K, Q6_K), as llama.cpp takes it: the
//! inputs quantized per 256 values (ggml's Q8_K), so that a super-block's sub-block dot
//! products are scaled by their small integer scales in integers and the whole super-block
//! takes two float operations (its scale, and its min), not two per 32 weights.

use super::{quantize_values, weight_block, QuantKind, QuantMatrix, QUANT_BLOCK, SUPER_BYTES};

/// Weights of a K super-block.
pub(super) const SUPER_BLOCK: usize = 256;

/// Rows of inputs quantized per [`SUPER_BLOCK`] values (scale `max |x| / 127`, in f32), with
/// the sum of each 16 quantized values.
pub(super) struct SuperRows {
    q: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i16>,
}

impl SuperRows {
    pub(super) fn new(inp: &[f32]) -> Self {
        let mut q = vec![0i8; inp.len()];
        let mut scales = vec![0f32; inp.len() / SUPER_BLOCK];
        crate::kernels::wide(
            #[inline(always)]
            || {
                for (s, scale) in scales.iter_mut().enumerate() {
                    let at = s * SUPER_BLOCK;
                    *scale = quantize_values::<SUPER_BLOCK>(&inp[at..], &mut q[at..]);
                }
            },
        );
        let sums = q
            .chunks_exact(16)
            .map(|c| c.iter().map(|&v| i16::from(v)).sum())
            .collect();
        Self { q, scales, sums }
    }
}

/// `acc[rows, j0..j1] += inp · Wᵀ` for K super-block weights, rows quantized as `x`. Per
/// weight row, input row and super-block: [`LANES`] integer lane sums of the sub-blocks' dot
/// products (the stored, unsigned weights) times their scales, lane `l` taking weights
/// `4(l % 8)..4(l % 8) + 4` of the even sub-blocks (`l < 8`) or the odd ones; Q6_K's 32 taken
/// off lane `m` as 32 · (sub-block `m`'s scales times its inputs' 16-value sums); Q4_K/Q5_K's
/// mins as [`MIN_LANES`] more (sub-block `m`'s min times its inputs' sum). Each lane, as f32,
/// is added to its own f32 lane with one fused multiply-add (times `d · x scale`, the mins
/// times `−dmin · x scale`), super-block by super-block; the row's lanes are added in order at
/// its end (the mins' after). Integers are exact and the float steps the same, so every SIMD
/// level gives the same bits; no level reduces across lanes per super-block.
pub(super) fn super_dots(
    acc: &mut [f32],
    x: &SuperRows,
    w: &QuantMatrix,
    rows: usize,
    j0: usize,
    j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::{level, Level};
        match level() {
            Level::Avx512 if super::avx512_vnni() => {
                let dots = by_kind!(
                    w.kind,
                    avx512_forms as fn() -> SuperForms,
                    [Q4_K, Q5_K, Q6_K]
                )();
                // SAFETY: the CPU has AVX-512 F/BW/VL, VNNI and FMA; the caller (the thin
                // product) checked the shapes: rows j0..j1 of `w`, `rows` rows of `x`, `acc`
                // rows × (j1 − j0).
                unsafe { by_groups(acc, x, w, rows, j0, j1, dots) };
                return;
            }
            Level::Avx512 | Level::Avx2 => {
                let dots = by_kind!(w.kind, avx2_forms as fn() -> SuperForms, [Q4_K, Q5_K, Q6_K])();
                // SAFETY: the CPU has AVX2 and FMA; bounds as above.
                unsafe { by_groups(acc, x, w, rows, j0, j1, dots) };
                return;
            }
            Level::Base => {}
        }
    }
    super_dots_portable(acc, x, w, rows, j0, j1);
}

/// f32 lanes a row's terms are summed in (see [`super_dots`]): two sets of 8 (even and odd
/// sub-blocks).
const LANES: usize = 16;

/// A row's f32 lanes added up: `extra` (offsets' or mins' lanes) into the first lanes, then
/// halves added (lane `i` takes lane `i + n` for n = 8, 4, 2, 1), as SIMD registers fold.
#[inline(always)]
fn fold_lanes(mut lanes: [f32; LANES], extra: &[f32]) -> f32 {
    for (lane, e) in lanes.iter_mut().zip(extra) {
        *lane += e;
    }
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            lanes[i] += lanes[i + n];
        }
    }
    lanes[0]
}

/// [`fold_lanes`] from its step n = 8 on, in SIMD: `lower` lanes 0..8 and `upper` 8..16.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn fold_halves(lower: std::arch::x86_64::__m256, upper: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let eight = _mm256_add_ps(lower, upper);
    let four = _mm_add_ps(
        _mm256_castps256_ps128(eight),
        _mm256_extractf128_ps(eight, 1),
    );
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
}

/// Integer lanes per super-block of Q4_K's and Q5_K's mins (one per sub-block).
const MIN_LANES: usize = 8;

/// The reference form of [`super_dots`], which the SIMD forms match bit for bit.
pub(super) fn super_dots_portable(
    acc: &mut [f32],
    x: &SuperRows,
    w: &QuantMatrix,
    rows: usize,
    j0: usize,
    j1: usize,
) {
    let supers = w.c_in / SUPER_BLOCK;
    let width = j1 - j0;
    let six = w.kind == QuantKind::Q6_K;
    let center = i32::from(w.kind.center());
    for j in j0..j1 {
        for r in 0..rows {
            let mut lanes = [0f32; LANES];
            let mut min_lanes = [0f32; MIN_LANES];
            for s in 0..supers {
                let xs = r * supers + s;
                let xq = &x.q[xs * SUPER_BLOCK..][..SUPER_BLOCK];
                let xsums = &x.sums[xs * 16..][..16];
                let sub = &w.sub[(j * supers + s) * SUPER_BYTES..][..SUPER_BYTES];
                let mut dots = [0i32; LANES];
                let mut mins = [0i32; MIN_LANES];
                for b in 0..SUPER_BLOCK / QUANT_BLOCK {
                    let wq = weight_block(w, j, s * 8 + b);
                    let xb = &xq[b * QUANT_BLOCK..][..QUANT_BLOCK];
                    for k in 0..QUANT_BLOCK {
                        let scale = if six {
                            i32::from(sub[2 * b + k / 16] as i8)
                        } else {
                            i32::from(sub[b])
                        };
                        let stored = i32::from(wq[k]) + center;
                        dots[8 * (b % 2) + k / 4] += scale * stored * i32::from(xb[k]);
                    }
                    let (first, second) = (i32::from(xsums[2 * b]), i32::from(xsums[2 * b + 1]));
                    if six {
                        let (s0, s1) = (sub[2 * b] as i8, sub[2 * b + 1] as i8);
                        dots[b] -= 32 * (i32::from(s0) * first + i32::from(s1) * second);
                    } else {
                        mins[b] = i32::from(sub[8 + b]) * (first + second);
                    }
                }
                let dx = x.scales[xs];
                let (d, dmin) = super_scales(w, j * supers + s);
                for (lane, &dot) in lanes.iter_mut().zip(&dots) {
                    *lane = (dot as f32).mul_add(d * dx, *lane);
                }
                if !six {
                    for (lane, &min) in min_lanes.iter_mut().zip(&mins) {
                        *lane = (min as f32).mul_add(-(dmin * dx), *lane);
                    }
                }
            }
            acc[r * width + j - j0] += fold_lanes(lanes, &min_lanes);
        }
    }
}

/// Super-block `i`'s f32 scale and min (0 for Q6_K).
#[inline(always)]
fn super_scales(w: &QuantMatrix, i: usize) -> (f32, f32) {
    if w.kind == QuantKind::Q6_K {
        (w.scales[i], 0.0)
    } else {
        (w.scales[2 * i], w.scales[2 * i + 1])
    }
}

/// A SIMD level's form for weight rows `j0..j1` against `G` input rows from `r0`.
#[cfg(target_arch = "x86_64")]
type SuperForm = unsafe fn(&mut [f32], &SuperRows, &QuantMatrix, usize, usize, usize);

/// A SIMD level's forms for 1 to 4 input rows.
#[cfg(target_arch = "x86_64")]
type SuperForms = [SuperForm; 4];

/// The AVX-512 forms of kind `K` (see [`QuantKind::of_index`]).
#[cfg(target_arch = "x86_64")]
fn avx512_forms<const K: u8>() -> SuperForms {
    [
        avx512_rows::<1, K>,
        avx512_rows::<2, K>,
        avx512_rows::<3, K>,
        avx512_rows::<4, K>,
    ]
}

/// The AVX2 forms of kind `K`.
#[cfg(target_arch = "x86_64")]
fn avx2_forms<const K: u8>() -> SuperForms {
    [
        avx2_rows::<1, K>,
        avx2_rows::<2, K>,
        avx2_rows::<3, K>,
        avx2_rows::<4, K>,
    ]
}

/// Input rows in groups of up to 4, each group reading weight rows `j0..j1` once.
///
/// # Safety
/// The CPU has the forms' features; bounds as for [`super_dots`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn by_groups(
    acc: &mut [f32],
    x: &SuperRows,
    w: &QuantMatrix,
    rows: usize,
    j0: usize,
    j1: usize,
    forms: SuperForms,
) {
    for r0 in (0..rows).step_by(4) {
        let group = (rows - r0).min(4);
        // SAFETY: the caller's contract.
        unsafe { forms[group - 1](acc, x, w, r0, j0, j1) };
    }
}

/// The AVX-512 VNNI form: per pair of sub-blocks (64 weights, one register), unsigned weights
/// times signed inputs summed in pairs (`vpmaddubsw`), then times each sub-block's scale and
/// summed into 32-bit lanes (`vpdpwssd`); Q6_K's 32 taken off through the inputs' 16-value
/// sums.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL, VNNI and FMA; bounds as for [`super_dots`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn avx512_rows<const G: usize, const K: u8>(
    acc: &mut [f32],
    x: &SuperRows,
    w: &QuantMatrix,
    r0: usize,
    j0: usize,
    j1: usize,
) {
    use std::arch::x86_64::*;
    let kind = QuantKind::of_index(K);
    let six = kind == QuantKind::Q6_K;
    let planes = kind.high_planes();
    let (c_in, supers, width) = (w.c_in, w.c_in / SUPER_BLOCK, j1 - j0);
    // For pair p, which scale each of the 32 pair sums (16-bit lanes: weights 2l, 2l + 1)
    // takes: sub-block 2p or 2p + 1; Q6_K's 16-weight groups 4p..4p + 3.
    let picks: [__m512i; 4] = std::array::from_fn(|p| {
        let lane: [i16; 32] = std::array::from_fn(|l| {
            if six {
                (4 * p + l / 8) as i16
            } else {
                (2 * p + l / 16) as i16
            }
        });
        _mm512_loadu_si512(lane.as_ptr() as *const _)
    });
    for j in j0..j1 {
        let mut lanes = [_mm512_setzero_ps(); G];
        let mut min_lanes = [_mm256_setzero_ps(); G];
        for s in 0..supers {
            let at = j * supers + s;
            let sub = w.sub.as_ptr().add(at * SUPER_BYTES);
            // The sub-blocks' scales as 16-bit values (Q6_K's signed).
            let scales = if six {
                _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(sub as *const _)))
            } else {
                _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(sub as *const _)))
            };
            let mut dots = [_mm512_setzero_si512(); G];
            for (p, pick) in picks.iter().enumerate() {
                let b = 8 * s + 2 * p;
                let wq = super::avx512_nibble_pair(w, planes, j, b);
                let scale = _mm512_permutexvar_epi16(*pick, scales);
                for (g, dot) in dots.iter_mut().enumerate() {
                    let xq = _mm512_loadu_si512(
                        x.q.as_ptr().add((r0 + g) * c_in + b * QUANT_BLOCK) as *const _,
                    );
                    *dot = _mm512_dpwssd_epi32(*dot, _mm512_maddubs_epi16(wq, xq), scale);
                }
            }
            let (d, dmin) = super_scales(w, at);
            for g in 0..G {
                let xs = (r0 + g) * supers + s;
                let xsums = _mm256_loadu_si256(x.sums.as_ptr().add(xs * 16) as *const __m256i);
                let dx = *x.scales.get_unchecked(xs);
                let mut dot = dots[g];
                if six {
                    // Weights are stored + 32: 32 · (scales · 16-value sums) off lanes 0..8.
                    let centre = _mm256_madd_epi16(_mm512_castsi512_si256(scales), xsums);
                    let centre = _mm512_zextsi256_si512(_mm256_slli_epi32(centre, 5));
                    dot = _mm512_sub_epi32(dot, centre);
                } else {
                    // Each min twice, against the two 16-value sums of its sub-block.
                    let m = _mm_loadl_epi64(sub.add(8) as *const __m128i);
                    let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));
                    let mins = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, xsums));
                    min_lanes[g] =
                        _mm256_fmadd_ps(mins, _mm256_set1_ps(-(dmin * dx)), min_lanes[g]);
                }
                lanes[g] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(d * dx), lanes[g]);
            }
        }
        for g in 0..G {
            let lower = _mm256_add_ps(_mm512_castps512_ps256(lanes[g]), min_lanes[g]);
            let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes[g]), 1));
            acc[(r0 + g) * width + j - j0] += fold_halves(lower, upper);
        }
    }
}

/// The AVX2 form: per sub-block (32 weights, one register), `vpmaddubsw` then `vpmaddwd`
/// with the sub-block's scale (Q6_K: two), summed into 32-bit lanes.
///
/// # Safety
/// The CPU has AVX2 and FMA; bounds as for [`super_dots`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_rows<const G: usize, const K: u8>(
    acc: &mut [f32],
    x: &SuperRows,
    w: &QuantMatrix,
    r0: usize,
    j0: usize,
    j1: usize,
) {
    use std::arch::x86_64::*;
    let kind = QuantKind::of_index(K);
    let six = kind == QuantKind::Q6_K;
    let planes = kind.high_planes();
    let (c_in, supers, width) = (w.c_in, w.c_in / SUPER_BLOCK, j1 - j0);
    let nibble_mask = _mm256_set1_epi8(0x0F);
    for j in j0..j1 {
        // Lanes 0..8 (even sub-blocks) and 8..16 (odd ones) of each input row.
        let mut lanes = [[_mm256_setzero_ps(); 2]; G];
        let mut min_lanes = [_mm256_setzero_ps(); G];
        for s in 0..supers {
            let at = j * supers + s;
            let sub = w.sub.as_ptr().add(at * SUPER_BYTES);
            let mut dots = [[_mm256_setzero_si256(); 2]; G];
            for pair in 0..4 {
                let b = 8 * s + 2 * pair;
                let packed = _mm256_loadu_si256(
                    w.q.as_ptr().add((j * c_in + b * QUANT_BLOCK) / 2) as *const __m256i
                );
                for half in 0..2 {
                    let shifted = if half == 1 {
                        _mm256_srli_epi16(packed, 4)
                    } else {
                        packed
                    };
                    let nibbles = _mm256_and_si256(shifted, nibble_mask);
                    let wq = super::avx2_add_planes(nibbles, w, planes, j, b + half);
                    let block = 2 * pair + half;
                    let scale = if six {
                        let first = i16::from(*sub.add(2 * block) as i8);
                        let second = i16::from(*sub.add(2 * block + 1) as i8);
                        _mm256_set_m128i(_mm_set1_epi16(second), _mm_set1_epi16(first))
                    } else {
                        _mm256_set1_epi16(i16::from(*sub.add(block)))
                    };
                    for (g, dot) in dots.iter_mut().enumerate() {
                        let xq = _mm256_loadu_si256(
                            x.q.as_ptr().add((r0 + g) * c_in + (b + half) * QUANT_BLOCK)
                                as *const __m256i,
                        );
                        let pairs = _mm256_maddubs_epi16(wq, xq);
                        dot[half] = _mm256_add_epi32(dot[half], _mm256_madd_epi16(pairs, scale));
                    }
                }
            }
            let (d, dmin) = super_scales(w, at);
            for g in 0..G {
                let xs = (r0 + g) * supers + s;
                let xsums = _mm256_loadu_si256(x.sums.as_ptr().add(xs * 16) as *const __m256i);
                let dx = *x.scales.get_unchecked(xs);
                let mut even = dots[g][0];
                if six {
                    let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(sub as *const _));
                    let centre = _mm256_madd_epi16(scales, xsums);
                    even = _mm256_sub_epi32(even, _mm256_slli_epi32(centre, 5));
                } else {
                    let m = _mm_loadl_epi64(sub.add(8) as *const __m128i);
                    let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));
                    let mins = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, xsums));
                    min_lanes[g] =
                        _mm256_fmadd_ps(mins, _mm256_set1_ps(-(dmin * dx)), min_lanes[g]);
                }
                let scale = _mm256_set1_ps(d * dx);
                let [first, second] = &mut lanes[g];
                *first = _mm256_fmadd_ps(_mm256_cvtepi32_ps(even), scale, *first);
                *second = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[g][1]), scale, *second);
            }
        }
        for g in 0..G {
            let lower = _mm256_add_ps(lanes[g][0], min_lanes[g]);
            acc[(r0 + g) * width + j - j0] += fold_halves(lower, lanes[g][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::tests::{test_matrices, values};

    /// Every SIMD form gives the portable form's bits for each K kind, 1 to 7 input rows; and
    /// the product is within the inputs' 8-bit rounding (half a step of 1/127 of a row's
    /// largest input) of the product with the dequantized weights.
    #[test]
    fn simd_forms_give_the_portable_bits_near_the_dequantized_product() {
        let (j0, j1) = (2, 19);
        for (kind, c_in, w) in test_matrices(j1) {
            if !kind.super_blocks() {
                continue;
            }
            let dense = w.dequantize();
            for rows in [1, 2, 3, 4, 6, 7] {
                let inp = values(rows * c_in, 5);
                let x = SuperRows::new(&inp);
                let run = |form: &dyn Fn(&mut [f32])| {
                    let mut acc = vec![0.5f32; rows * (j1 - j0)];
                    form(&mut acc);
                    acc
                };
                let want = run(&|acc| super_dots_portable(acc, &x, &w, rows, j0, j1));
                for r in 0..rows {
                    let xr = &inp[r * c_in..(r + 1) * c_in];
                    let step = xr.iter().fold(0f32, |m, v| m.max(v.abs())) / 254.0;
                    for j in j0..j1 {
                        let wr = &dense[j * c_in..(j + 1) * c_in];
                        let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                        let bound: f32 = wr.iter().map(|v| v.abs() * step).sum();
                        let got = want[r * (j1 - j0) + j - j0] - 0.5;
                        assert!(
                            (got - exact).abs() <= 1.01 * bound + 1e-3,
                            "{kind:?} row {r} col {j}: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                #[cfg(target_arch = "x86_64")]
                {
                    use crate::kernels::{level, Level};
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
                    {
                        let forms =
                            by_kind!(kind, avx2_forms as fn() -> SuperForms, [Q4_K, Q5_K, Q6_K])();
                        // SAFETY: AVX2 and FMA checked; shapes as the thin product passes them.
                        let got =
                            run(&|acc| unsafe { by_groups(acc, &x, &w, rows, j0, j1, forms) });
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{kind:?} AVX2, {c_in} wide, {rows} rows"
                        );
                    }
                    if level() == Level::Avx512 && super::super::avx512_vnni() {
                        let forms =
                            by_kind!(kind, avx512_forms as fn() -> SuperForms, [Q4_K, Q5_K, Q6_K])(
                            );
                        // SAFETY: AVX-512 and VNNI checked; shapes as above.
                        let got =
                            run(&|acc| unsafe { by_groups(acc, &x, &w, rows, j0, j1, forms) });
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{kind:?} AVX-512, {c_in} wide, {rows} rows"
                        );
                    }
                }
                let _ = bits;
            }
        }
    }

    /// The 256-value quantizer rounds as the 32-value one does and sums each 16 values.
    #[test]
    fn inputs_quantize_per_super_block() {
        let mut x = values(512, 7);
        x[300] = 40.0;
        let rows = SuperRows::new(&x);
        assert_eq!(
            rows.scales[0],
            x[..256].iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0
        );
        assert_eq!(rows.scales[1], 40.0 / 127.0);
        assert_eq!(rows.q[300], 127);
        for (k, &q) in rows.q.iter().enumerate() {
            let want = super::super::round_half_away(x[k] / rows.scales[k / 256]);
            assert!((f32::from(q) - want).abs() <= 1.0, "{k}");
        }
        for (i, &sum) in rows.sums.iter().enumerate() {
            let want: i16 = rows.q[16 * i..16 * i + 16]
                .iter()
                .map(|&v| i16::from(v))
                .sum();
            assert_eq!(sum, want);
        }
    }
}
