//! Matrix products: the GEMM paths (kiem's own fp32 kernel, or OpenBLAS where chosen; bf16
//! operands through [`crate::bf16_gemm`]) and the thin products decoding reads weights with.

use rayon::prelude::*;

use super::{level, reduce_rows, wide, Level, MatmulPrecision, WeightLayout};

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, each operand given by (row stride, column stride);
/// `dst` is row-major (column stride 1).
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    precision: MatmulPrecision,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    let extent = |rows: usize, cols: usize, (rs, cs): (usize, usize)| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= extent(m, n, dst_strides), "gemm dst too small");
    assert!(lhs.len() >= extent(m, k, lhs_strides), "gemm lhs too small");
    assert!(rhs.len() >= extent(k, n, rhs_strides), "gemm rhs too small");
    if m == 0 || n == 0 {
        return;
    }
    if precision == MatmulPrecision::Bf16 && dst_strides.1 == 1 {
        crate::bf16_gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_strides.0,
            accumulate,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
        );
        return;
    }
    // SAFETY: the asserts above keep every access inside the slices; dst does not alias the
    // inputs (it is a distinct &mut).
    unsafe {
        sgemm(
            true,
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides,
            accumulate,
            lhs.as_ptr(),
            lhs_strides,
            rhs.as_ptr(),
            rhs_strides,
            1.0,
        )
    }
}

/// The fp32 product on this process's path: OpenBLAS where chosen ([`crate::blas::blas`]),
/// else kiem's own kernel ([`crate::f32_gemm`]).
///
/// # Safety
/// Every (row, col) addressed through the strides lies inside the pointed-to buffers, and
/// nothing else writes the addressed part of `dst` during the call; with `parallel`, the call
/// may use the whole rayon pool.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    parallel: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: *const f32,
    rhs_strides: (usize, usize),
    alpha: f32,
) {
    assert_eq!(dst_strides.1, 1, "gemm: dst must be row-major");
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        if let Some(blas) = crate::blas::blas() {
            if blas.sgemm_raw(
                !parallel,
                m,
                n,
                k,
                dst,
                dst_strides.0,
                accumulate,
                lhs,
                lhs_strides,
                rhs,
                rhs_strides,
                alpha,
            ) {
                return;
            }
        }
    }
    crate::f32_gemm::gemm(
        crate::f32_gemm::kernel(),
        parallel,
        m,
        n,
        k,
        dst,
        dst_strides.0,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        alpha,
    )
}

/// Up to this many rows, `matmul_forward` reads the weights once for all rows with its own
/// kernel: decoding (one row per sequence) is bound by reading the weights, and GEMM libraries
/// re-pack the whole weight matrix for such thin products.
pub const SKINNY_ROWS: usize = 16;

/// `out[rows, c_out] = inp[rows, c_in] · W (+ bias)` for few rows, each weight read once. Each
/// row's result is computed in the same order whatever the number of rows, so a sequence's
/// logits do not depend on which others share its decoding step.
fn matmul_skinny(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    layout: WeightLayout,
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    let rows = inp.len() / c_in;
    if layout == WeightLayout::InOut && c_in >= 2 * SKINNY_K_CHUNK {
        matmul_skinny_by_k(out, inp, w, bias, c_in, c_out);
        return;
    }
    by_column_blocks(out, rows, c_out, bias, |acc, j0, j1| {
        skinny_block(acc, inp, w, layout, c_in, c_out, j0, j1)
    });
}

/// A thin product split into column blocks (enough tasks to balance the threads, long enough
/// to vectorize): `block(acc, j0, j1)` adds columns `j0..j1` into `acc[rows, j1 - j0]`, which
/// starts at the bias.
pub(super) fn by_column_blocks(
    out: &mut [f32],
    rows: usize,
    c_out: usize,
    bias: Option<&[f32]>,
    block: impl Fn(&mut [f32], usize, usize) + Sync,
) {
    // About 8 blocks a thread, at least 64 columns; where that count does not divide among
    // the threads (9 blocks of a 576-wide output on 2), the widest multiple of 16 that does.
    let threads = rayon::current_num_threads().max(1);
    let target = (c_out / (8 * threads)).clamp(64, 512);
    let width = (2..=target / 16)
        .rev()
        .map(|k| 16 * k)
        .find(|&w| c_out.div_ceil(w).is_multiple_of(threads))
        .unwrap_or(target);
    if rows == 1 {
        // One row (batch-1 decoding): each block's columns are a slice of `out` itself.
        out[..c_out]
            .par_chunks_mut(width)
            .enumerate()
            .for_each(|(b, acc)| {
                let j0 = b * width;
                match bias {
                    Some(bias) => acc.copy_from_slice(&bias[j0..j0 + acc.len()]),
                    None => acc.fill(0.0),
                }
                block(acc, j0, j0 + acc.len());
            });
        return;
    }
    let blocks: Vec<(usize, Vec<f32>)> = (0..c_out.div_ceil(width))
        .into_par_iter()
        .map(|b| {
            let (j0, j1) = (b * width, ((b + 1) * width).min(c_out));
            let mut acc = vec![0f32; rows * (j1 - j0)];
            if let Some(bias) = bias {
                for row in acc.chunks_mut(j1 - j0) {
                    row.copy_from_slice(&bias[j0..j1]);
                }
            }
            block(&mut acc, j0, j1);
            (j0, acc)
        })
        .collect();
    for (j0, acc) in blocks {
        let width = acc.len() / rows;
        for (r, row) in acc.chunks(width).enumerate() {
            out[r * c_out + j0..r * c_out + j0 + width].copy_from_slice(row);
        }
    }
}

/// `out[rows, c_out] = inp[rows, c_in] · Wᵀ (+ bias)` for few rows, with `W[c_out, c_in]`
/// stored as bf16 bits: decoding from bf16 weights reads half the bytes. The result is exactly
/// that of [`Kernels::matmul_forward`] on the same weights widened to f32 (same summation
/// order), and each row's result is independent of the others.
pub fn matmul_thin_bf16(
    out: &mut [f32],
    inp: &[f32],
    w: &[u16],
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    let rows = inp.len() / c_in;
    assert!(
        rows <= SKINNY_ROWS,
        "matmul_thin_bf16 takes at most {SKINNY_ROWS} rows"
    );
    assert!(w.len() >= c_in * c_out && out.len() >= rows * c_out);
    by_column_blocks(out, rows, c_out, bias, |acc, j0, j1| {
        #[cfg(target_arch = "x86_64")]
        if level() != Level::Base {
            // SAFETY: the CPU has AVX2 and FMA (`level`); the assert above makes every W row
            // j0..j1 < c_out hold c_in values, so each 8-wide load at k + 8 <= c_in is in bounds.
            unsafe {
                outin_dots_avx2(
                    acc,
                    inp,
                    c_in,
                    j0,
                    j1,
                    #[inline(always)]
                    |j, k| {
                        use std::arch::x86_64::*;
                        let halves =
                            _mm_loadu_si128(w.as_ptr().add(j * c_in + k) as *const __m128i);
                        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16))
                    },
                    #[inline(always)]
                    |j, k| crate::bf16_gemm::from_bf16(w[j * c_in + k]),
                )
            };
            return;
        }
        outin_dots_portable(acc, inp, c_in, j0, j1, |j, k| {
            crate::bf16_gemm::from_bf16(w[j * c_in + k])
        });
    });
}

/// Weight rows per task of the thin `InOut` product.
const SKINNY_K_CHUNK: usize = 32;

/// The thin `InOut` product by chunks of weight rows: each task streams one contiguous piece
/// of W (whole rows), which keeps memory reads sequential; the chunks' partial sums are then
/// added in chunk order, so each row's result depends neither on the thread count nor on the
/// other rows.
fn matmul_skinny_by_k(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    let rows = inp.len() / c_in;
    let chunks = c_in.div_ceil(SKINNY_K_CHUNK);
    let mut partial = vec![0f32; chunks * rows * c_out];
    partial
        .par_chunks_mut(rows * c_out)
        .enumerate()
        .for_each(|(chunk, part)| {
            let k0 = chunk * SKINNY_K_CHUNK;
            let k1 = (k0 + SKINNY_K_CHUNK).min(c_in);
            let x: Vec<f32> = (0..rows)
                .flat_map(|r| inp[r * c_in + k0..r * c_in + k1].iter().copied())
                .collect();
            wide(
                #[inline(always)]
                || inout_rows(part, &x, &w[k0 * c_out..k1 * c_out], k1 - k0, c_out),
            );
        });
    out.par_chunks_mut(c_out)
        .enumerate()
        .take(rows)
        .for_each(|(r, o)| {
            match bias {
                Some(bias) => o.copy_from_slice(bias),
                None => o.fill(0.0),
            }
            wide(
                #[inline(always)]
                || {
                    for part in partial.chunks(rows * c_out) {
                        for (o, p) in o.iter_mut().zip(&part[r * c_out..(r + 1) * c_out]) {
                            *o += p;
                        }
                    }
                },
            )
        });
}

/// `part[r, :] += Σ_k x[r, k] · w[k, :]` for a chunk of `kc` weight rows, reading the weights
/// in memory order, four rows at a time (four sequential streams, each sum kept in L1). Every
/// element is summed in k order with fused multiply-adds, whatever `rows` or the CPU level.
/// Inlined into [`wide`]'s callers, so the loops compile for the wide registers.
#[inline(always)]
fn inout_rows(part: &mut [f32], x: &[f32], w: &[f32], kc: usize, c_out: usize) {
    let rows = part.len() / c_out;
    let mut k = 0;
    while k + 4 <= kc {
        let w = &w[k * c_out..(k + 4) * c_out];
        let (w0, rest) = w.split_at(c_out);
        let (w1, rest) = rest.split_at(c_out);
        let (w2, w3) = rest.split_at(c_out);
        for (r, y) in part.chunks_mut(c_out).enumerate().take(rows) {
            let a = &x[r * kc + k..r * kc + k + 4];
            for ((((y, &v0), &v1), &v2), &v3) in y.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3) {
                *y = a[3].mul_add(v3, a[2].mul_add(v2, a[1].mul_add(v1, a[0].mul_add(v0, *y))));
            }
        }
        k += 4;
    }
    for k in k..kc {
        let wk = &w[k * c_out..(k + 1) * c_out];
        for (r, y) in part.chunks_mut(c_out).enumerate().take(rows) {
            let a = x[r * kc + k];
            for (y, &v) in y.iter_mut().zip(wk) {
                *y = a.mul_add(v, *y);
            }
        }
    }
}

/// Columns `j0..j1` of the skinny product, added to `acc[rows, j1 - j0]`, with AVX2/FMA code
/// when the SIMD level allows it; the portable code gives the same bits.
#[allow(clippy::too_many_arguments)]
fn skinny_block(
    acc: &mut [f32],
    inp: &[f32],
    w: &[f32],
    layout: WeightLayout,
    c_in: usize,
    c_out: usize,
    j0: usize,
    j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        // SAFETY: the CPU has AVX2 and FMA (`level`), and `matmul_forward` checked that `w`
        // holds c_in × c_out values and `inp` whole rows of c_in, which bounds every load.
        unsafe { skinny_block_avx2(acc, inp, w, layout, c_in, c_out, j0, j1) };
        return;
    }
    skinny_block_portable(acc, inp, w, layout, c_in, c_out, j0, j1);
}

/// # Safety
/// The CPU has AVX2 and FMA; `w` holds a `c_in × c_out` matrix in `layout`, `inp` whole rows of
/// `c_in`, `acc` those rows × `j1 - j0`, and `j0 < j1 <= c_out` (checked by `matmul_forward`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn skinny_block_avx2(
    acc: &mut [f32],
    inp: &[f32],
    w: &[f32],
    layout: WeightLayout,
    c_in: usize,
    c_out: usize,
    j0: usize,
    j1: usize,
) {
    use std::arch::x86_64::*;
    let width = j1 - j0;
    let rows = acc.len() / width;
    match layout {
        WeightLayout::InOut => {
            // Tiles of up to 4 rows × 16 columns live in registers while k runs; each row's
            // sum is accumulated in k order with FMA, whatever tile it falls in.
            let mut r0 = 0;
            while r0 < rows {
                match rows - r0 {
                    1 => inout_tile_avx2::<1>(acc, inp, w, c_in, c_out, j0, j1, r0),
                    2 => inout_tile_avx2::<2>(acc, inp, w, c_in, c_out, j0, j1, r0),
                    3 => inout_tile_avx2::<3>(acc, inp, w, c_in, c_out, j0, j1, r0),
                    _ => inout_tile_avx2::<4>(acc, inp, w, c_in, c_out, j0, j1, r0),
                }
                r0 += 4;
            }
        }
        WeightLayout::OutIn => outin_dots_avx2(
            acc,
            inp,
            c_in,
            j0,
            j1,
            #[inline(always)]
            |j, k| _mm256_loadu_ps(w.as_ptr().add(j * c_in + k)),
            #[inline(always)]
            |j, k| w[j * c_in + k],
        ),
    }
}

/// Columns `j0..j1` of a thin product with `W[c_out, c_in]`, added to `acc[rows, j1 - j0]`:
/// one dot product per (column, row), eight weights at a time from `load8(j, k)` (the
/// scalar `at(j, k)` for the tail), so f32 and bf16 weights share every rounding step.
///
/// # Safety
/// The CPU has AVX2 and FMA; `load8(j, k)` is valid for `k + 8 <= c_in`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn outin_dots_avx2(
    acc: &mut [f32],
    inp: &[f32],
    c_in: usize,
    j0: usize,
    j1: usize,
    load8: impl Fn(usize, usize) -> std::arch::x86_64::__m256,
    at: impl Fn(usize, usize) -> f32,
) {
    use std::arch::x86_64::*;
    let width = j1 - j0;
    let rows = acc.len() / width;
    for j in j0..j1 {
        for r in 0..rows {
            let x = &inp[r * c_in..(r + 1) * c_in];
            // Four independent sums, so the loop streams W instead of waiting on the FMA
            // latency.
            let mut s = [_mm256_setzero_ps(); 4];
            let mut k = 0;
            while k + 32 <= c_in {
                for (i, s) in s.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(k + 8 * i));
                    *s = _mm256_fmadd_ps(xv, load8(j, k + 8 * i), *s);
                }
                k += 32;
            }
            while k + 8 <= c_in {
                s[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(k)), load8(j, k), s[0]);
                k += 8;
            }
            let mut lanes = [0f32; 8];
            let total = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
            _mm256_storeu_ps(lanes.as_mut_ptr(), total);
            let mut sum = lanes.iter().sum::<f32>();
            for (k, &xk) in x.iter().enumerate().skip(k) {
                sum = xk.mul_add(at(j, k), sum);
            }
            acc[r * width + j - j0] += sum;
        }
    }
}

/// Rows `r0..r0 + R` of an `InOut` skinny block.
///
/// # Safety
/// The CPU has AVX2 and FMA (the slice bounds are asserted here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn inout_tile_avx2<const R: usize>(
    acc: &mut [f32],
    inp: &[f32],
    w: &[f32],
    c_in: usize,
    c_out: usize,
    j0: usize,
    j1: usize,
    r0: usize,
) {
    let width = j1 - j0;
    assert!(acc.len() >= (r0 + R) * width);
    assert!(inp.len() >= (r0 + R) * c_in && w.len() >= (c_in - 1) * c_out + j1);
    // Strips as wide as the registers allow (R rows × V vectors of sums, at most 12), so a
    // single decoding row streams 64 columns (four cache lines) of each weight row at a time.
    let mut j = j0;
    match R {
        1 => strip_loop::<R, 8>(acc, inp, w, c_in, c_out, j0, j1, r0, &mut j),
        2 => strip_loop::<R, 4>(acc, inp, w, c_in, c_out, j0, j1, r0, &mut j),
        3 => strip_loop::<R, 4>(acc, inp, w, c_in, c_out, j0, j1, r0, &mut j),
        _ => strip_loop::<R, 2>(acc, inp, w, c_in, c_out, j0, j1, r0, &mut j),
    }
    strip_loop::<R, 1>(acc, inp, w, c_in, c_out, j0, j1, r0, &mut j);
    for r in r0..r0 + R {
        for jj in j..j1 {
            let mut sum = acc[r * width + jj - j0];
            for k in 0..c_in {
                sum = inp[r * c_in + k].mul_add(w[k * c_out + jj], sum);
            }
            acc[r * width + jj - j0] = sum;
        }
    }
}

/// Columns from `*j` in strips of `8·V` while whole strips fit, for rows `r0..r0 + R`.
///
/// # Safety
/// The CPU has AVX2 and FMA, and the bounds `inout_tile_avx2` asserts hold: every row touched
/// lies in `acc` and `inp`, and every weight read (`k < c_in`, column `< j1 <= c_out`) in `w`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn strip_loop<const R: usize, const V: usize>(
    acc: &mut [f32],
    inp: &[f32],
    w: &[f32],
    c_in: usize,
    c_out: usize,
    j0: usize,
    j1: usize,
    r0: usize,
    j: &mut usize,
) {
    use std::arch::x86_64::*;
    let width = j1 - j0;
    while *j + 8 * V <= j1 {
        let mut a = [[_mm256_setzero_ps(); V]; R];
        for (r, a) in a.iter_mut().enumerate() {
            let p = acc.as_ptr().add((r0 + r) * width + *j - j0);
            for (v, a) in a.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(p.add(8 * v));
            }
        }
        for k in 0..c_in {
            let wp = w.as_ptr().add(k * c_out + *j);
            let mut wv = [_mm256_setzero_ps(); V];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(wp.add(8 * v));
            }
            for (r, a) in a.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*inp.get_unchecked((r0 + r) * c_in + k));
                for (a, &wv) in a.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(x, wv, *a);
                }
            }
        }
        for (r, a) in a.iter().enumerate() {
            let p = acc.as_mut_ptr().add((r0 + r) * width + *j - j0);
            for (v, &a) in a.iter().enumerate() {
                _mm256_storeu_ps(p.add(8 * v), a);
            }
        }
        *j += 8 * V;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn skinny_block_portable(
    acc: &mut [f32],
    inp: &[f32],
    w: &[f32],
    layout: WeightLayout,
    c_in: usize,
    c_out: usize,
    j0: usize,
    j1: usize,
) {
    let width = j1 - j0;
    match layout {
        // W[k, j]: stream row k of the block once, update every output row with it.
        WeightLayout::InOut => {
            for k in 0..c_in {
                let wk = &w[k * c_out + j0..k * c_out + j1];
                for (r, out) in acc.chunks_mut(width).enumerate() {
                    let a = inp[r * c_in + k];
                    for (o, &x) in out.iter_mut().zip(wk) {
                        *o = a.mul_add(x, *o);
                    }
                }
            }
        }
        WeightLayout::OutIn => outin_dots_portable(acc, inp, c_in, j0, j1, |j, k| w[j * c_in + k]),
    }
}

/// Portable [`outin_dots_avx2`], with its exact arithmetic (so every SIMD level gives the same
/// bits): per (row, column), four sums of eight lanes fed 32 weights at a time with fused
/// multiply-adds, then eight at a time into the first, the four added pairwise, the lanes in
/// order, and the tail with fused multiply-adds.
#[inline(always)]
fn outin_dots_portable(
    acc: &mut [f32],
    inp: &[f32],
    c_in: usize,
    j0: usize,
    j1: usize,
    at: impl Fn(usize, usize) -> f32,
) {
    let width = j1 - j0;
    for j in j0..j1 {
        for r in 0..acc.len() / width {
            let x = &inp[r * c_in..(r + 1) * c_in];
            let mut s = [[0f32; 8]; 4];
            let mut k = 0;
            while k + 32 <= c_in {
                for (i, s) in s.iter_mut().enumerate() {
                    for (l, s) in s.iter_mut().enumerate() {
                        let kk = k + 8 * i + l;
                        *s = x[kk].mul_add(at(j, kk), *s);
                    }
                }
                k += 32;
            }
            while k + 8 <= c_in {
                for (l, s) in s[0].iter_mut().enumerate() {
                    *s = x[k + l].mul_add(at(j, k + l), *s);
                }
                k += 8;
            }
            let lanes: [f32; 8] =
                std::array::from_fn(|l| (s[0][l] + s[1][l]) + (s[2][l] + s[3][l]));
            let mut sum = lanes.iter().sum::<f32>();
            for (k, &xk) in x.iter().enumerate().skip(k) {
                sum = xk.mul_add(at(j, k), sum);
            }
            acc[r * width + j - j0] += sum;
        }
    }
}

/// Checks the shapes of a product at the safe boundary: the thin and GEMM kernels behind it
/// read through raw pointers and rely on these bounds.
fn check_product(
    what: &str,
    inp: usize,
    w: usize,
    out: usize,
    bias: Option<usize>,
    c_in: usize,
    c_out: usize,
) -> usize {
    assert!(
        c_in > 0 && inp.is_multiple_of(c_in),
        "{what}: the input ({inp} values) is not whole rows of {c_in}"
    );
    let rows = inp / c_in;
    let needed = c_in.checked_mul(c_out).expect("matrix size overflows");
    assert!(
        w >= needed,
        "{what}: the weights hold {w} values, a {c_in}x{c_out} matrix needs {needed}"
    );
    let out_needed = rows.checked_mul(c_out).expect("output size overflows");
    assert!(
        out >= out_needed,
        "{what}: the output holds {out} values, {rows} rows of {c_out} need {out_needed}"
    );
    if let Some(bias) = bias {
        assert!(
            bias >= c_out,
            "{what}: the bias holds {bias} values, needs {c_out}"
        );
    }
    rows
}

#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_forward(
    precision: MatmulPrecision,
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    layout: WeightLayout,
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    let rows = check_product(
        "matmul_forward",
        inp.len(),
        w.len(),
        out.len(),
        bias.map(<[f32]>::len),
        c_in,
        c_out,
    );
    if rows <= SKINNY_ROWS {
        matmul_skinny(out, inp, w, layout, bias, c_in, c_out);
        return;
    }
    if let Some(bias) = bias {
        out.par_chunks_mut(c_out)
            .for_each(|o| o.copy_from_slice(bias));
    }
    let w_strides = match layout {
        WeightLayout::InOut => (c_out, 1),
        WeightLayout::OutIn => (1, c_in),
    };
    gemm_f32(
        precision,
        rows,
        c_out,
        c_in,
        out,
        (c_out, 1),
        bias.is_some(),
        inp,
        (c_in, 1),
        w,
        w_strides,
    );
}

#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_backward(
    precision: MatmulPrecision,
    dinp: &mut [f32],
    dw: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    layout: WeightLayout,
    c_in: usize,
    c_out: usize,
) {
    let rows = check_product(
        "matmul_backward",
        inp.len(),
        w.len(),
        dout.len(),
        dbias.as_deref().map(<[f32]>::len),
        c_in,
        c_out,
    );
    assert!(
        dw.as_ref().is_none_or(|dw| dw.len() >= c_in * c_out) && dinp.len() >= rows * c_in,
        "matmul_backward: gradient buffers too small"
    );
    // dinp[rows, in] = dout[rows, out] · Wᵀ
    let wt_strides = match layout {
        WeightLayout::InOut => (1, c_out),
        WeightLayout::OutIn => (c_in, 1),
    };
    gemm_f32(
        precision,
        rows,
        c_in,
        c_out,
        dinp,
        (c_in, 1),
        false,
        dout,
        (c_out, 1),
        w,
        wt_strides,
    );
    // A frozen weight (LoRA's base) takes no gradient.
    let Some(dw) = dw else {
        return;
    };
    match layout {
        // dW[in, out] += inpᵀ · dout
        WeightLayout::InOut => gemm_f32(
            precision,
            c_in,
            c_out,
            rows,
            dw,
            (c_out, 1),
            true,
            inp,
            (1, c_in),
            dout,
            (c_out, 1),
        ),
        // dW[out, in] += doutᵀ · inp
        WeightLayout::OutIn => gemm_f32(
            precision,
            c_out,
            c_in,
            rows,
            dw,
            (c_in, 1),
            true,
            dout,
            (1, c_out),
            inp,
            (c_in, 1),
        ),
    }
    if let Some(dbias) = dbias {
        reduce_rows(rows, c_out, dbias, |row, acc| {
            for (a, g) in acc.iter_mut().zip(&dout[row * c_out..(row + 1) * c_out]) {
                *a += g;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(inp: usize, w: usize, out: usize, bias: Option<usize>, c_in: usize, c_out: usize) {
        let bias = bias.map(|n| vec![0f32; n]);
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            matmul_forward(
                MatmulPrecision::Fp32,
                &mut vec![0f32; out],
                &vec![1f32; inp],
                &vec![1f32; w],
                layout,
                bias.as_deref(),
                c_in,
                c_out,
            );
        }
    }

    #[test]
    #[should_panic(expected = "the weights hold 127 values, a 16x8 matrix needs 128")]
    fn a_short_weight_slice_is_refused_on_the_thin_path() {
        forward(16, 127, 8, None, 16, 8);
    }

    #[test]
    #[should_panic(expected = "the weights hold 127 values")]
    fn a_short_weight_slice_is_refused_on_the_gemm_path() {
        forward(16 * 40, 127, 8 * 40, None, 16, 8);
    }

    #[test]
    #[should_panic(expected = "not whole rows of 16")]
    fn a_ragged_input_is_refused() {
        forward(17, 128, 8, None, 16, 8);
    }

    #[test]
    #[should_panic(expected = "the output holds 15 values")]
    fn a_short_output_is_refused() {
        forward(32, 128, 15, None, 16, 8);
    }

    #[test]
    #[should_panic(expected = "the bias holds 7 values")]
    fn a_short_bias_is_refused() {
        forward(16, 128, 8, Some(7), 16, 8);
    }

    #[test]
    fn exact_shapes_pass() {
        forward(48, 128, 24, Some(8), 16, 8);
    }
}
