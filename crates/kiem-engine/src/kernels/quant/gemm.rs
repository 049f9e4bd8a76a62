//! The wide product with quantized weights (prefill, many rows at once): integer dot products
//! of the inputs' Q8 blocks with the weights' blocks, as the thin product takes them, but
//! with the weights repacked 32 rows at a time so that one AVX-512 VNNI instruction
//! multiplies 16 weight rows by 4 bytes of an input row. Without VNNI the caller multiplies
//! the dequantized weights instead.

use rayon::prelude::*;

use super::row_groups::{self, GROUP_ROWS};
#[cfg(target_arch = "x86_64")]
use super::Line;
use super::{quantize_input_block, QuantMatrix, QUANT_BLOCK};

/// Inputs of a wide product: each row quantized to Q8 blocks as the thin product quantizes it,
/// held as the integer kernel reads them.
struct WideRows {
    /// Each quantized value plus 128, as an unsigned byte (the instruction multiplies
    /// unsigned by signed bytes).
    up: Vec<u8>,
    /// Each block's scale.
    scales: Vec<f32>,
    /// Each block's scale times the sum of its quantized values (for weights with offsets;
    /// empty otherwise).
    scaled_sums: Vec<f32>,
}

impl WideRows {
    /// Quantizes rows of `c_in` values, in parallel.
    fn new(inp: &[f32], c_in: usize, sums: bool) -> Self {
        let blocks = c_in / QUANT_BLOCK;
        let mut up = vec![0u8; inp.len()];
        let mut scales = vec![0f32; inp.len() / QUANT_BLOCK];
        let mut scaled_sums = vec![0f32; scales.len()];
        up.par_chunks_mut(c_in)
            .zip(scales.par_chunks_mut(blocks))
            .zip(scaled_sums.par_chunks_mut(blocks))
            .zip(inp.par_chunks(c_in))
            .for_each(|(((up, scales), sums), x)| {
                #[cfg(target_arch = "x86_64")]
                if wide_quant_native() {
                    // SAFETY: the CPU has AVX-512 F/BW/VL (`wide_quant_native`); the slices
                    // hold one row of `blocks` blocks each.
                    unsafe { quantize_row_avx512(x, up, scales, sums) };
                    return;
                }
                for b in 0..blocks {
                    let at = b * QUANT_BLOCK;
                    let mut q = [0i8; QUANT_BLOCK];
                    scales[b] = quantize_input_block(&x[at..], &mut q);
                    let mut sum = 0i32;
                    for (k, &v) in q.iter().enumerate() {
                        sum += i32::from(v);
                        up[at + k] = (v as u8) ^ 0x80;
                    }
                    sums[b] = scales[b] * sum as f32;
                }
            });
        if !sums {
            scaled_sums = Vec::new();
        }
        Self {
            up,
            scales,
            scaled_sums,
        }
    }
}

/// One row of [`WideRows::new`] with AVX-512: the same values as [`quantize_input_block`]
/// (its rounding of halves away from zero, NaN as 0, infinities saturated), 32 at a time.
///
/// # Safety
/// The CPU has AVX-512 F/BW/DQ/VL; `x` and `up` hold `scales.len()` blocks, as `sums` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn quantize_row_avx512(x: &[f32], up: &mut [u8], scales: &mut [f32], sums: &mut [f32]) {
    use std::arch::x86_64::*;
    let sign_bit = _mm512_set1_ps(-0.0);
    let one = _mm512_set1_ps(1.0);
    let half = _mm512_set1_ps(0.5);
    let (low, high) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
    let flip = _mm_set1_epi8(-128);
    for (b, (scale, sum)) in scales.iter_mut().zip(sums.iter_mut()).enumerate() {
        let at = b * QUANT_BLOCK;
        let v = [
            _mm512_loadu_ps(x.as_ptr().add(at)),
            _mm512_loadu_ps(x.as_ptr().add(at + 16)),
        ];
        // The largest magnitude, NaNs left out (as f32::max does).
        let magnitude = |v: __m512| {
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
            _mm512_maskz_mov_ps(ordered, _mm512_andnot_ps(sign_bit, v))
        };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(magnitude(v[0]), magnitude(v[1])));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let mut total = _mm512_setzero_si512();
        for (h, &v) in v.iter().enumerate() {
            let scaled = _mm512_mul_ps(v, id);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(scaled);
            let frac = _mm512_andnot_ps(sign_bit, _mm512_sub_ps(scaled, t));
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
            let step = _mm512_or_ps(_mm512_and_ps(scaled, sign_bit), one);
            let rounded = _mm512_mask_add_ps(t, away, t, step);
            // NaN to 0, then saturate as `as i8` does.
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(scaled, scaled);
            let rounded = _mm512_maskz_mov_ps(ordered, rounded);
            let q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(rounded, low), high));
            total = _mm512_add_epi32(total, q);
            let bytes = _mm_xor_si128(_mm512_cvtepi32_epi8(q), flip);
            _mm_storeu_si128(up.as_mut_ptr().add(at + 16 * h) as *mut __m128i, bytes);
        }
        *scale = d;
        *sum = d * _mm512_reduce_add_epi32(total) as f32;
    }
}

/// Whether [`matmul_wide_quant`] has an integer form on this CPU (AVX-512 VNNI).
pub fn wide_quant_native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::{level, Level};
        level() == Level::Avx512 && super::avx512_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[rows, c_out] = inp[rows, c_in] · Wᵀ (+ bias)` for many rows with a quantized `W`, in
/// integers as [`super::matmul_thin_quant`] does (inputs quantized to Q8_0 blocks, each block
/// pair's dot product exact), summed per output in block order: `sum += dot · (w scale · x
/// scale)`, then `sum += offset · (x scale · x sum)` for kinds with offsets. So each row's
/// result is independent of the others, and for the 32-weight-block kinds the thin product's
/// bits (the K kinds' thin product sums a super-block in integers first, so its bits differ).
/// Returns false, leaving `out` as it was, where the CPU has no integer form (AVX-512 VNNI):
/// the caller multiplies the dequantized weights then.
pub fn matmul_wide_quant(
    out: &mut [f32],
    inp: &[f32],
    w: &QuantMatrix,
    bias: Option<&[f32]>,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !wide_quant_native() {
            return false;
        }
        let (c_in, c_out) = (w.c_in, w.c_out);
        let rows = inp.len() / c_in;
        assert!(
            inp.len() == rows * c_in && out.len() >= rows * c_out,
            "matmul_wide_quant: shapes"
        );
        if let Some(bias) = bias {
            assert!(bias.len() >= c_out, "matmul_wide_quant: a bias per column");
        }
        let x = WideRows::new(inp, c_in, w.kind.has_offset());
        let out = crate::kernels::SyncPtr(out.as_mut_ptr());
        // One task per panel of weight rows, writing its columns of every output row.
        (0..c_out.div_ceil(PANEL))
            .into_par_iter()
            .for_each(|panel| {
                // SAFETY: the CPU has AVX-512 F/BW/VL and VNNI (checked above); `x` holds `rows`
                // rows of `c_in`, `w` and `bias` `c_out` columns, `out` `rows × c_out` values of
                // which this task alone writes the panel's columns.
                unsafe { wide_panel_avx512(out, c_out, &x, w, bias, rows, panel * PANEL) }
            });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (out, inp, w, bias);
        false
    }
}

/// The reference form of the wide product's sums: what the SIMD form gives bit for bit.
#[cfg(test)]
fn wide_dots_portable(
    acc: &mut [f32],
    x: &WideRows,
    w: &QuantMatrix,
    rows: usize,
    j0: usize,
    j1: usize,
) {
    let blocks = w.c_in / QUANT_BLOCK;
    let width = j1 - j0;
    let groups = w.kind.scale_groups();
    let per_group = QUANT_BLOCK / groups;
    for r in 0..rows {
        for j in j0..j1 {
            let mut sum = 0f32;
            for b in 0..blocks {
                let wq = super::weight_block(w, j, b);
                let xu = &x.up[(r * blocks + b) * QUANT_BLOCK..][..QUANT_BLOCK];
                let at = r * blocks + b;
                let (scales, offset) = w.block_scales(j, b);
                for (s, scale) in scales.iter().enumerate().take(groups) {
                    let dot: i32 = (s * per_group..(s + 1) * per_group)
                        .map(|k| (i32::from(xu[k]) - 128) * i32::from(wq[k]))
                        .sum();
                    sum = (dot as f32).mul_add(scale * x.scales[at], sum);
                }
                if let Some(offset) = offset {
                    sum = offset.mul_add(x.scaled_sums[at], sum);
                }
            }
            acc[r * width + j - j0] += sum;
        }
    }
}

/// Weight rows repacked together.
#[cfg(target_arch = "x86_64")]
const PANEL: usize = 32;

/// [`PANEL`] weight rows repacked for the VNNI tiles. Per block: for each of its 8 groups of
/// 4 weights, two lines (rows 0-15, then 16-31), each row's 4 weights as signed bytes (the
/// nibble kinds unpacked with their high bits, less their center); per block, scale group
/// (two for Q6_K: weights 0-15 and 16-31) and row the dot product's start (−128 · the group's
/// weight sum, undoing the inputs' +128) and scale; and per block and row the offset.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Panel {
    q: Vec<Line>,
    starts: Vec<i32>,
    scales: Vec<f32>,
    offsets: Vec<f32>,
}

/// Lines of a packed block: 8 groups of 4 weights, two lines each.
#[cfg(target_arch = "x86_64")]
const BLOCK_LINES: usize = 16;

/// Repacks rows `j0..j0 + n` (`n <= PANEL`) of `w` into `p`; rows past `n` get zero scales.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and VNNI; `j0 + n <= w.c_out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")]
unsafe fn pack_panel(p: &mut Panel, w: &QuantMatrix, j0: usize, n: usize) {
    use std::arch::x86_64::*;
    let blocks = w.c_in / QUANT_BLOCK;
    let offsets = w.kind.has_offset();
    let groups = w.kind.scale_groups();
    p.q.resize(blocks * BLOCK_LINES, Line([0; 64]));
    p.starts.resize(blocks * groups * PANEL, 0);
    p.scales.resize(blocks * groups * PANEL, 0.0);
    p.offsets
        .resize(if offsets { blocks * PANEL } else { 0 }, 0.0);
    let flip = _mm512_set1_epi8(-128);
    // Each block's scales and offset, rows past `n` zeros.
    for b in 0..blocks {
        for r in 0..PANEL {
            let (scales, offset) = if r < n {
                w.block_scales(j0 + r, b)
            } else {
                ([0.0; 2], Some(0.0))
            };
            for (s, &scale) in scales.iter().enumerate().take(groups) {
                p.scales[(b * groups + s) * PANEL + r] = scale;
            }
            if offsets {
                p.offsets[b * PANEL + r] = offset.unwrap_or(0.0);
            }
        }
    }
    // The panel's two row groups (j0 is a multiple of 32): their lines are the panel's, the
    // nibbles unpacked; a group past the matrix's rows reads as zeros.
    for half in 0..2 {
        let row_group = j0 / GROUP_ROWS + half;
        let present = row_group * GROUP_ROWS < w.c_out;
        for b in 0..blocks {
            let mut sums = [_mm512_setzero_si512(); 2];
            for g in 0..8 {
                let group = if present {
                    row_groups::line(w, row_group, b, g)
                } else {
                    _mm512_setzero_si512()
                };
                let line = &mut p.q[b * BLOCK_LINES + 2 * g + half];
                _mm512_store_si512(line.0.as_mut_ptr() as *mut _, group);
                let s = g * groups / 8;
                sums[s] = _mm512_dpbusd_epi32(sums[s], flip, group);
            }
            for (s, sum) in sums.iter().enumerate().take(groups) {
                let at = (b * groups + s) * PANEL + 16 * half;
                _mm512_storeu_si512(
                    p.starts.as_mut_ptr().add(at) as *mut _,
                    _mm512_sub_epi32(_mm512_setzero_si512(), *sum),
                );
            }
        }
    }
}

/// The AVX-512 VNNI form of the wide product for the panel of weight rows from `j0`: repacked
/// once, then read by every group of 4 input rows.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and VNNI; `x` has `rows` rows of `w.c_in`, `j0 < w.c_out`,
/// `bias` (if any) holds `w.c_out` values, and `out` `rows × c_out` values, the panel's
/// columns of which no other thread touches meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")]
unsafe fn wide_panel_avx512(
    out: crate::kernels::SyncPtr,
    c_out: usize,
    x: &WideRows,
    w: &QuantMatrix,
    bias: Option<&[f32]>,
    rows: usize,
    j0: usize,
) {
    thread_local! {
        static PANEL_BUFFER: std::cell::RefCell<Panel> = std::cell::RefCell::default();
    }
    let n = (w.c_out - j0).min(PANEL);
    let run = |p: &mut Panel| {
        pack_panel(p, w, j0, n);
        let tile = PanelTile {
            p,
            x,
            blocks: w.c_in / QUANT_BLOCK,
            offsets: w.kind.has_offset(),
            out: out.get().add(j0),
            c_out,
            bias: bias.map(|b| b[j0..].as_ptr()),
            n,
        };
        if w.kind.scale_groups() == 2 {
            tile.all_rows::<2>(rows);
        } else {
            tile.all_rows::<1>(rows);
        }
    };
    PANEL_BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut p) => run(&mut p),
        // A product nested in another on this thread (work stealing): a panel of its own.
        Err(_) => run(&mut Panel::default()),
    })
}

/// One packed panel against the inputs, writing its `n` columns of each output row (`out`:
/// the panel's first column, rows `c_out` apart), plus the bias (from the panel's first).
#[cfg(target_arch = "x86_64")]
struct PanelTile<'a> {
    p: &'a Panel,
    x: &'a WideRows,
    blocks: usize,
    offsets: bool,
    out: *mut f32,
    c_out: usize,
    bias: Option<*const f32>,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl PanelTile<'_> {
    /// Every input row against the panel, 4 at a time, with `S` scale groups a block.
    ///
    /// # Safety
    /// As for [`wide_panel_avx512`]; `S` is the weights' [`super::QuantKind::scale_groups`].
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn all_rows<const S: usize>(&self, rows: usize) {
        let mut r0 = 0;
        while r0 + 4 <= rows {
            self.run::<4, S>(r0);
            r0 += 4;
        }
        match rows - r0 {
            1 => self.run::<1, S>(r0),
            2 => self.run::<2, S>(r0),
            3 => self.run::<3, S>(r0),
            _ => {}
        }
    }

    /// Input rows `r0..r0 + G` against the panel's 32 weight rows, `S` scale groups a block.
    ///
    /// # Safety
    /// As for [`PanelTile::all_rows`]; `r0 + G` rows exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn run<const G: usize, const S: usize>(&self, r0: usize) {
        use std::arch::x86_64::*;
        let (p, x, blocks) = (self.p, self.x, self.blocks);
        let c_in = blocks * QUANT_BLOCK;
        let mut sums = [[_mm512_setzero_ps(); 2]; G];
        for b in 0..blocks {
            let lines = p.q.as_ptr().add(b * BLOCK_LINES);
            let inputs = x.up.as_ptr().add(r0 * c_in + b * QUANT_BLOCK);
            let xs: [__m512; G] = std::array::from_fn(|i| {
                _mm512_set1_ps(*x.scales.get_unchecked((r0 + i) * blocks + b))
            });
            for s in 0..S {
                let at = (b * S + s) * PANEL;
                let starts = [
                    _mm512_loadu_si512(p.starts.as_ptr().add(at) as *const _),
                    _mm512_loadu_si512(p.starts.as_ptr().add(at + 16) as *const _),
                ];
                let mut dots = [starts; G];
                for g in s * 8 / S..(s + 1) * 8 / S {
                    let w0 = _mm512_load_si512(lines.add(2 * g) as *const _);
                    let w1 = _mm512_load_si512(lines.add(2 * g + 1) as *const _);
                    for (i, dot) in dots.iter_mut().enumerate() {
                        let four = (inputs.add(i * c_in + 4 * g) as *const i32).read_unaligned();
                        let xb = _mm512_set1_epi32(four);
                        dot[0] = _mm512_dpbusd_epi32(dot[0], xb, w0);
                        dot[1] = _mm512_dpbusd_epi32(dot[1], xb, w1);
                    }
                }
                let ws = [
                    _mm512_loadu_ps(p.scales.as_ptr().add(at)),
                    _mm512_loadu_ps(p.scales.as_ptr().add(at + 16)),
                ];
                for ((sum, dot), xs) in sums.iter_mut().zip(&dots).zip(&xs) {
                    for h in 0..2 {
                        let scale = _mm512_mul_ps(ws[h], *xs);
                        sum[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[h]), scale, sum[h]);
                    }
                }
            }
            for (i, sum) in sums.iter_mut().enumerate() {
                let xat = (r0 + i) * blocks + b;
                if self.offsets {
                    let xo = _mm512_set1_ps(*x.scaled_sums.get_unchecked(xat));
                    for (h, sum) in sum.iter_mut().enumerate() {
                        let offset = _mm512_loadu_ps(p.offsets.as_ptr().add(b * PANEL + 16 * h));
                        *sum = _mm512_fmadd_ps(offset, xo, *sum);
                    }
                }
            }
        }
        let masks: [__mmask16; 2] = std::array::from_fn(|h| {
            let count = self.n.saturating_sub(16 * h).min(16);
            ((1u32 << count) - 1) as __mmask16
        });
        let bias = self.bias.map(|b| {
            [
                _mm512_maskz_loadu_ps(masks[0], b),
                _mm512_maskz_loadu_ps(masks[1], b.add(16)),
            ]
        });
        for (i, sum) in sums.iter().enumerate() {
            let out = self.out.add((r0 + i) * self.c_out);
            for (h, sum) in sum.iter().enumerate() {
                let value = match bias {
                    Some(bias) => _mm512_add_ps(bias[h], *sum),
                    None => *sum,
                };
                _mm512_mask_storeu_ps(out.add(16 * h), masks[h], value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::tests::{test_matrices, values};

    /// The rows' AVX-512 quantization gives the scalar quantizer's values, edge cases
    /// included (halves, zeros, tiny scales, infinities, NaN).
    #[test]
    fn wide_rows_quantize_as_the_thin_product_does() {
        let mut x = values(32 * 40, 6);
        x[..32].fill(0.0);
        for (k, v) in x[32..64].iter_mut().enumerate() {
            *v = (k as f32 - 16.0) * 127.0 / 32.0 + 0.5 * (k % 2) as f32;
        }
        x[64..96].iter_mut().for_each(|v| *v *= 1e-38);
        x[100] = f32::INFINITY;
        x[140] = f32::NAN;
        x[170] = f32::NEG_INFINITY;
        x[200] = 3e38;
        let wide = WideRows::new(&x, 32 * 8, true);
        let thin = super::super::QuantRows::new(&x, super::super::QuantKind::Q8_0);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&wide.scales), bits(&thin.scales));
        let back: Vec<i8> = wide.up.iter().map(|&u| (u ^ 0x80) as i8).collect();
        assert_eq!(back, thin.q);
        for (b, &sum) in wide.scaled_sums.iter().enumerate() {
            let q: i32 = thin.q[b * 32..][..32].iter().map(|&v| i32::from(v)).sum();
            assert_eq!(
                sum.to_bits(),
                (thin.scales[b] * q as f32).to_bits(),
                "block {b}"
            );
        }
    }

    /// The SIMD form gives the reference form's bits for every kind, odd and even block
    /// counts, any number of rows and a partial last panel; each row's result does not depend
    /// on the other rows; and the product stays near the dequantized weights' product.
    #[test]
    fn wide_product_matches_its_reference_and_the_dequantized_product() {
        let c_out = 83;
        for (kind, c_in, w) in test_matrices(c_out) {
            for rows in [1usize, 3, 4, 9, 21] {
                // With a bias, and without one (for 3 rows).
                let bias = values(c_out, 9)
                    .into_iter()
                    .map(|b| if rows == 3 { 0.0 } else { b })
                    .collect::<Vec<_>>();
                let bias_arg = (rows != 3).then_some(&bias[..]);
                let inp = values(rows * c_in, 5);
                let x = WideRows::new(&inp, c_in, kind.has_offset());
                let mut want = vec![0f32; rows * c_out];
                for row in want.chunks_mut(c_out) {
                    row.copy_from_slice(&bias);
                }
                wide_dots_portable(&mut want, &x, &w, rows, 0, c_out);
                // Near the product with the dequantized weights: the inputs' 8-bit
                // quantization is the only difference.
                let dense = w.dequantize();
                for r in 0..rows {
                    let xr = &inp[r * c_in..(r + 1) * c_in];
                    let magnitude: f32 = xr.iter().map(|v| v.abs()).sum::<f32>();
                    for j in 0..c_out {
                        let wr = &dense[j * c_in..(j + 1) * c_in];
                        let exact: f32 =
                            bias[j] + xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>();
                        let wmax = wr.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let got = want[r * c_out + j];
                        assert!(
                            (got - exact).abs() <= 0.01 * magnitude * wmax + 1e-4,
                            "{kind:?} {c_in} row {r} col {j}: {got} vs {exact}"
                        );
                    }
                }
                let mut got = vec![f32::NAN; rows * c_out];
                let taken = matmul_wide_quant(&mut got, &inp, &w, bias_arg);
                #[cfg(target_arch = "x86_64")]
                assert_eq!(
                    taken,
                    wide_quant_native(),
                    "the integer form is taken wherever the CPU has one"
                );
                if !taken {
                    continue;
                }
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{kind:?} {c_in} wide, {rows} rows");
                let mut alone = vec![0f32; c_out];
                let last = rows - 1;
                matmul_wide_quant(&mut alone, &inp[last * c_in..], &w, bias_arg);
                assert_eq!(bits(&alone), bits(&want[last * c_out..]), "{kind:?} alone");
            }
        }
    }
}
