//! The thin product with K super-block weights (Q4_K, Q5_K, Q6_K), as llama.cpp takes it: the
//! inputs quantized per 256 values (ggml's Q8_K), so that a super-block's sub-block dot
//! products are scaled by their small integer scales in integers and the whole super-block
//! takes two float operations (its scale, and its min), not two per 32 weights.

#[cfg(target_arch = "x86_64")]
use super::row_groups::{
    by_groups, high_bytes, with_high_bits256, with_high_bits512, GroupForms, GroupTile,
};
use super::row_groups::{float, sub_at};
#[cfg(target_arch = "x86_64")]
use super::{halves16, halves8};
use super::{quantize_values, weight_block, QuantKind, QuantMatrix, QUANT_BLOCK};

/// Weights of a K super-block.
pub(super) const SUPER_BLOCK: usize = 256;

/// Rows of inputs quantized per [`SUPER_BLOCK`] values (scale `max |x| / 127`, in f32), with
/// the sum of each 16 quantized values (Q6_K's sub-blocks) and of each 32 (Q4_K's and Q5_K's,
/// for their mins: one load where two sums and an add had taken four instructions a sub-block).
pub(super) struct SuperRows {
    q: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i16>,
    block_sums: Vec<i32>,
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
        let sums: Vec<i16> = q
            .chunks_exact(16)
            .map(|c| c.iter().map(|&v| i16::from(v)).sum())
            .collect();
        let block_sums = sums
            .chunks_exact(2)
            .map(|p| i32::from(p[0]) + i32::from(p[1]))
            .collect();
        Self {
            q,
            scales,
            sums,
            block_sums,
        }
    }
}

/// `acc[rows, j0..j1] += inp · Wᵀ` for K super-block weights (kept in row groups, see
/// `row_groups`), rows quantized as `x`: per weight row, input row and super-block, the
/// integer sum of each sub-block's dot product times its scale (Q6_K: each 16 weights', less
/// 32 per weight), and for Q4_K/Q5_K the integer sum of each sub-block's min times its inputs'
/// sum; then `sum += dot · (d · x scale)` and `sum += mins · −(dmin · x scale)`, super-block
/// by super-block. Integers are exact, so every SIMD level gives the same bits.
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
        let forms: Option<GroupForms<SuperRows>> = match level() {
            Level::Avx512 if super::avx512_vnni() => Some(by_kind!(
                w.kind,
                avx512_forms as fn() -> GroupForms<SuperRows>,
                [Q4_K, Q5_K, Q6_K]
            )()),
            Level::Avx512 | Level::Avx2 => Some(by_kind!(
                w.kind,
                avx2_forms as fn() -> GroupForms<SuperRows>,
                [Q4_K, Q5_K, Q6_K]
            )()),
            Level::Base => None,
        };
        if let Some(forms) = forms {
            // SAFETY: the CPU has the forms' features (`level`, `avx512_vnni`); the thin
            // product checked the shapes: rows j0..j1 of `w`, `rows` rows of `x`, `acc`
            // rows × (j1 − j0).
            unsafe { by_groups(acc, x, w, rows, j0, j1, forms) };
            return;
        }
    }
    super_dots_portable(acc, x, w, rows, j0, j1);
}

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
    for j in j0..j1 {
        for r in 0..rows {
            let mut sum = 0f32;
            for s in 0..supers {
                let xs = r * supers + s;
                let xq = &x.q[xs * SUPER_BLOCK..][..SUPER_BLOCK];
                let small = |k: usize| w.data[sub_at(w, j, s, k)];
                let (mut dot, mut mins) = (0i32, 0i32);
                for b in 0..SUPER_BLOCK / QUANT_BLOCK {
                    let wq = weight_block(w, j, s * 8 + b);
                    let xb = &xq[b * QUANT_BLOCK..][..QUANT_BLOCK];
                    let part = |k0: usize, n: usize| -> i32 {
                        (k0..k0 + n)
                            .map(|k| i32::from(wq[k]) * i32::from(xb[k]))
                            .sum()
                    };
                    if six {
                        for h in 0..2 {
                            dot += i32::from(small(2 * b + h) as i8) * part(16 * h, 16);
                        }
                    } else {
                        dot += i32::from(small(b)) * part(0, QUANT_BLOCK);
                        let xsum: i32 = xb.iter().map(|&v| i32::from(v)).sum();
                        mins += i32::from(small(8 + b)) * xsum;
                    }
                }
                let dx = x.scales[xs];
                let d = float(w, j, s, 0);
                sum = (dot as f32).mul_add(d * dx, sum);
                if !six {
                    let dmin = float(w, j, s, 1);
                    sum = (mins as f32).mul_add(-(dmin * dx), sum);
                }
            }
            acc[r * width + j - j0] += sum;
        }
    }
}

/// The AVX-512 forms of kind `K` (see [`QuantKind::of_index`]).
#[cfg(target_arch = "x86_64")]
fn avx512_forms<const K: u8>() -> GroupForms<SuperRows> {
    group_forms!(avx512_group, K)
}

/// The AVX2 forms of kind `K`.
#[cfg(target_arch = "x86_64")]
fn avx2_forms<const K: u8>() -> GroupForms<SuperRows> {
    group_forms!(avx2_group, K)
}

/// The AVX-512 VNNI form: per sub-block, the unsigned weights of each line's low nibbles
/// (weights 0-15) and high ones (16-31) times four inputs broadcast, 16 rows' dot products a
/// register (Q6_K's started from −32 times their 16 inputs' sum); times the 16 rows' small
/// scales (`vpmulld`) into the super-block's integer sums; then one multiply-add per
/// super-block for the 16 rows (and one for the mins).
///
/// # Safety
/// The CPU has AVX-512 F/BW/DQ/VL, VNNI and FMA; `tile` lies within `w`, `x` and `acc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")]
unsafe fn avx512_group<const G: usize, const K: u8>(acc: &mut [f32], tile: GroupTile<SuperRows>) {
    use std::arch::x86_64::*;
    let kind = QuantKind::of_index(K);
    let six = kind == QuantKind::Q6_K;
    let (x, w) = (tile.x, tile.w);
    let (c_in, supers) = (w.c_in, w.c_in / SUPER_BLOCK);
    let bits = kind.high_bits();
    let nibble = _mm512_set1_epi8(0x0F);
    let (records, group_at) = tile.records(kind);
    let mut sums = [_mm512_setzero_ps(); G];
    for s in 0..supers {
        let xs: [usize; G] = std::array::from_fn(|g| (tile.r0 + g) * supers + s);
        // The 16 rows' small scale `k` as i32 lanes.
        let small = |k: usize| -> __m128i {
            _mm_loadu_si128(group_at.add(records.smalls(s, k)) as *const _)
        };
        let mut dots = [_mm512_setzero_si512(); G];
        let mut mins = [_mm512_setzero_si512(); G];
        for sb in 0..SUPER_BLOCK / QUANT_BLOCK {
            let high = group_at.add(records.block(8 * s + sb));
            let lines = high.add(high_bytes(kind));
            // Four inputs of row g from value `at` of the sub-block, in every lane.
            let four = |g: usize, at: usize| -> __m512i {
                let p =
                    x.q.as_ptr()
                        .add((tile.r0 + g) * c_in + (8 * s + sb) * QUANT_BLOCK + at);
                _mm512_set1_epi32((p as *const i32).read_unaligned())
            };
            // Per input row: weights 0-15's dot products in chains 0 and 1, 16-31's in 2, 3.
            let mut parts: [[__m512i; 4]; G] = std::array::from_fn(|g| {
                let start = |h: usize| {
                    if six {
                        let sum = *x.sums.get_unchecked(xs[g] * 16 + 2 * sb + h);
                        _mm512_set1_epi32(-32 * i32::from(sum))
                    } else {
                        _mm512_setzero_si512()
                    }
                };
                [
                    start(0),
                    _mm512_setzero_si512(),
                    start(1),
                    _mm512_setzero_si512(),
                ]
            });
            for k in 0..4 {
                let line = _mm512_loadu_si512(lines.add(k * 64) as *const _);
                let mut low = _mm512_and_si512(line, nibble);
                let mut up = _mm512_and_si512(_mm512_srli_epi16(line, 4), nibble);
                if bits > 0 {
                    low = with_high_bits512(low, high, bits, k);
                    up = with_high_bits512(up, high, bits, k + 4);
                }
                for (g, part) in parts.iter_mut().enumerate() {
                    part[k % 2] = _mm512_dpbusd_epi32(part[k % 2], low, four(g, 4 * k));
                    part[2 + k % 2] = _mm512_dpbusd_epi32(part[2 + k % 2], up, four(g, 4 * k + 16));
                }
            }
            let (first, second) = if six {
                (
                    _mm512_cvtepi8_epi32(small(2 * sb)),
                    _mm512_cvtepi8_epi32(small(2 * sb + 1)),
                )
            } else {
                let scale = _mm512_cvtepu8_epi32(small(sb));
                (scale, scale)
            };
            let min = _mm512_cvtepu8_epi32(small(8 + sb));
            for g in 0..G {
                let [a, b, c, d] = parts[g];
                let low = _mm512_add_epi32(a, b);
                let up = _mm512_add_epi32(c, d);
                let scaled = if six {
                    _mm512_add_epi32(
                        _mm512_mullo_epi32(low, first),
                        _mm512_mullo_epi32(up, second),
                    )
                } else {
                    _mm512_mullo_epi32(_mm512_add_epi32(low, up), first)
                };
                dots[g] = _mm512_add_epi32(dots[g], scaled);
                if !six {
                    let xsum = *x.block_sums.get_unchecked(xs[g] * 8 + sb);
                    mins[g] =
                        _mm512_add_epi32(mins[g], _mm512_mullo_epi32(min, _mm512_set1_epi32(xsum)));
                }
            }
        }
        let d = halves16(group_at.add(records.floats(s, 0)) as *const _);
        for (g, sum) in sums.iter_mut().enumerate() {
            let dx = _mm512_set1_ps(*x.scales.get_unchecked(xs[g]));
            *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[g]), _mm512_mul_ps(d, dx), *sum);
            if !six {
                let dmin = halves16(group_at.add(records.floats(s, 1)) as *const _);
                let scale = _mm512_xor_ps(_mm512_mul_ps(dmin, dx), _mm512_set1_ps(-0.0));
                *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mins[g]), scale, *sum);
            }
        }
    }
    for (g, sum) in sums.iter().enumerate() {
        tile.add_all(acc, g, *sum);
    }
}

/// The AVX2 form: the group as two halves of 8 rows (32 bytes of each line), unsigned
/// weights times signed inputs summed in pairs (`vpmaddubsw`) then in fours (`vpmaddwd`);
/// the same integers and float steps as the AVX-512 form.
///
/// # Safety
/// The CPU has AVX2 and FMA; `tile` lies within `w`, `x` and `acc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_group<const G: usize, const K: u8>(acc: &mut [f32], tile: GroupTile<SuperRows>) {
    use std::arch::x86_64::*;
    let kind = QuantKind::of_index(K);
    let six = kind == QuantKind::Q6_K;
    let (x, w) = (tile.x, tile.w);
    let (c_in, supers) = (w.c_in, w.c_in / SUPER_BLOCK);
    let bits = kind.high_bits();
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (records, group_at) = tile.records(kind);
    // The 16 rows' sums of each input row: rows 0..8, then 8..16.
    let mut sums = [[_mm256_setzero_ps(); G]; 2];
    for s in 0..supers {
        let xs: [usize; G] = std::array::from_fn(|g| (tile.r0 + g) * supers + s);
        for (half, half_sums) in sums.iter_mut().enumerate() {
            // This half's 8 rows' small scale `k` as i32 lanes.
            let small = |k: usize| -> __m128i {
                let at = records.smalls(s, k) + 8 * half;
                _mm_loadl_epi64(group_at.add(at) as *const _)
            };
            let mut dots = [_mm256_setzero_si256(); G];
            let mut mins = [_mm256_setzero_si256(); G];
            for sb in 0..SUPER_BLOCK / QUANT_BLOCK {
                let block = group_at.add(records.block(8 * s + sb));
                let high = block.add(32 * half);
                let lines = block.add(high_bytes(kind) + 32 * half);
                let four = |g: usize, at: usize| -> __m256i {
                    let p =
                        x.q.as_ptr()
                            .add((tile.r0 + g) * c_in + (8 * s + sb) * QUANT_BLOCK + at);
                    _mm256_set1_epi32((p as *const i32).read_unaligned())
                };
                let dot = |weights: __m256i, inputs: __m256i| -> __m256i {
                    _mm256_madd_epi16(_mm256_maddubs_epi16(weights, inputs), ones)
                };
                let mut parts: [[__m256i; 2]; G] = std::array::from_fn(|g| {
                    let start = |h: usize| {
                        if six {
                            let sum = *x.sums.get_unchecked(xs[g] * 16 + 2 * sb + h);
                            _mm256_set1_epi32(-32 * i32::from(sum))
                        } else {
                            _mm256_setzero_si256()
                        }
                    };
                    [start(0), start(1)]
                });
                for k in 0..4 {
                    let line = _mm256_loadu_si256(lines.add(k * 64) as *const __m256i);
                    let mut low = _mm256_and_si256(line, nibble);
                    let mut up = _mm256_and_si256(_mm256_srli_epi16(line, 4), nibble);
                    if bits > 0 {
                        low = with_high_bits256(low, high, bits, k);
                        up = with_high_bits256(up, high, bits, k + 4);
                    }
                    for (g, part) in parts.iter_mut().enumerate() {
                        part[0] = _mm256_add_epi32(part[0], dot(low, four(g, 4 * k)));
                        part[1] = _mm256_add_epi32(part[1], dot(up, four(g, 4 * k + 16)));
                    }
                }
                let (first, second) = if six {
                    (
                        _mm256_cvtepi8_epi32(small(2 * sb)),
                        _mm256_cvtepi8_epi32(small(2 * sb + 1)),
                    )
                } else {
                    let scale = _mm256_cvtepu8_epi32(small(sb));
                    (scale, scale)
                };
                let min = _mm256_cvtepu8_epi32(small(8 + sb));
                for g in 0..G {
                    let [low, up] = parts[g];
                    let scaled = if six {
                        _mm256_add_epi32(
                            _mm256_mullo_epi32(low, first),
                            _mm256_mullo_epi32(up, second),
                        )
                    } else {
                        _mm256_mullo_epi32(_mm256_add_epi32(low, up), first)
                    };
                    dots[g] = _mm256_add_epi32(dots[g], scaled);
                    if !six {
                        let xsum = *x.block_sums.get_unchecked(xs[g] * 8 + sb);
                        mins[g] = _mm256_add_epi32(
                            mins[g],
                            _mm256_mullo_epi32(min, _mm256_set1_epi32(xsum)),
                        );
                    }
                }
            }
            let at = records.floats(s, 0) + 16 * half;
            let d = halves8(group_at.add(at) as *const _);
            for (g, sum) in half_sums.iter_mut().enumerate() {
                let dx = _mm256_set1_ps(*x.scales.get_unchecked(xs[g]));
                *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[g]), _mm256_mul_ps(d, dx), *sum);
                if !six {
                    let at = records.floats(s, 1) + 16 * half;
                    let dmin = halves8(group_at.add(at) as *const _);
                    let scale = _mm256_xor_ps(_mm256_mul_ps(dmin, dx), _mm256_set1_ps(-0.0));
                    *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins[g]), scale, *sum);
                }
            }
        }
    }
    for (g, (low, high)) in sums[0].iter().zip(&sums[1]).enumerate() {
        tile.add_halves(acc, g, *low, *high);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::kernels::quant::row_groups::tests::available;
    use crate::kernels::quant::row_groups::tests::check_thin_forms;
    use crate::kernels::quant::tests::values;

    /// Every SIMD form gives the portable form's bits for each K kind, near the dequantized
    /// product.
    #[test]
    fn simd_forms_give_the_portable_bits_near_the_dequantized_product() {
        let kinds = [QuantKind::Q4_K, QuantKind::Q5_K, QuantKind::Q6_K];
        check_thin_forms(
            &kinds,
            |inp, _| SuperRows::new(inp),
            super_dots_portable,
            |kind| {
                #[cfg(target_arch = "x86_64")]
                return available(
                    by_kind!(
                        kind,
                        avx2_forms as fn() -> GroupForms<SuperRows>,
                        [Q4_K, Q5_K, Q6_K]
                    )(),
                    by_kind!(
                        kind,
                        avx512_forms as fn() -> GroupForms<SuperRows>,
                        [Q4_K, Q5_K, Q6_K]
                    )(),
                );
                #[cfg(not(target_arch = "x86_64"))]
                Vec::new()
            },
        );
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
