//! Matrix products on bf16 operands with fp32 accumulation, for CPUs with AVX512-BF16.
//!
//! Training keeps fp32 master weights, gradients and activations; a bf16 product rounds its
//! operands to bf16 (nearest, ties to even) while packing them into tiles, multiplies them in
//! pairs with `vdpbf16ps` (two products per fp32 lane per instruction, twice the fp32 FMA rate)
//! and accumulates in fp32. Debian's OpenBLAS (0.3.21) is built without `sbgemm`, so kiem
//! carries this kernel: BLIS-style packing around a 6 × 64 register tile.
//!
//! Every output element is summed in the same order whatever the thread count or the row
//! split, so results are deterministic.

use rayon::prelude::*;

use crate::kernels::SyncPtr;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (four 16-lane vectors).
const NR: usize = 64;
/// Pairs of k per packed block: 384 values of k (a 6-row panel of A stays in L1).
const KC_PAIRS: usize = 192;
/// Columns per packed block of B (192 pairs × 512 columns × 4 bytes = 384 KiB, in L2).
const NC: usize = 512;
/// Rows per parallel task.
const MC: usize = 8 * MR;

/// Whether this CPU has the bf16 instructions (AVX-512F with AVX512-BF16).
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What computes the bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The CPU's `vcvtneps2bf16` and `vdpbf16ps`.
    Native,
    /// Scalar code with exactly the arithmetic Intel documents for those instructions (inputs
    /// rounded to nearest-even bf16; each pair added to the fp32 sum by two fused steps with
    /// subnormals read and written as zero). Many times slower: for testing the bf16 path on
    /// CPUs without the instructions (`KIEM_BF16=emulate`).
    Emulated,
}

/// The backend of this process: emulated when `KIEM_BF16=emulate`, else native where the CPU
/// has the instructions, else none.
pub fn backend() -> Option<Backend> {
    static BACKEND: std::sync::OnceLock<Option<Backend>> = std::sync::OnceLock::new();
    *BACKEND.get_or_init(|| {
        if std::env::var("KIEM_BF16").is_ok_and(|v| v == "emulate") {
            Some(Backend::Emulated)
        } else {
            native().then_some(Backend::Native)
        }
    })
}

/// Whether bf16 products can run in this process (see [`backend`]).
pub fn available() -> bool {
    backend().is_some()
}

/// The bits of the bf16 nearest to `x` (ties to even), exactly as `vcvtneps2bf16` rounds:
/// subnormal inputs become signed zero and NaN stays a (quiet) NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if bits & 0x7F80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 a bf16 stands for.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Rounds `src` to bf16 into `dst` (same length), in parallel.
fn convert(backend: Backend, src: &[f32], dst: &mut [u16]) {
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| match backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the native backend is chosen only where the CPU has AVX512-BF16.
            Backend::Native => unsafe { convert_avx512(s, d) },
            _ => {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = to_bf16(s);
                }
            }
        });
}

/// # Safety
/// The CPU has AVX-512F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 16 <= n {
        let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
        _mm256_storeu_si256(
            dst.as_mut_ptr().add(i) as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(h),
        );
        i += 16;
    }
    for j in i..n {
        dst[j] = to_bf16(src[j]);
    }
}

/// The number of elements a strided `rows × cols` operand spans.
fn extent(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> usize {
    (rows - 1) * rs + (cols - 1) * cs + 1
}

thread_local! {
    /// bf16 copies of the two operands, reused across calls.
    static ROUNDED: std::cell::RefCell<(Vec<u16>, Vec<u16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with bf16-rounded operands and fp32 sums; `dst` is
/// row-major with row stride `ldc`, each operand is given by (row stride, column stride).
///
/// # Panics
/// When no backend is available (check [`available`]) or a slice is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldc: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    let backend = backend().expect("bf16 matmul needs a CPU with AVX512-BF16");
    gemm_with(
        backend,
        m,
        n,
        k,
        dst,
        ldc,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
    )
}

/// [`gemm`] on a given backend.
///
/// # Panics
/// When `backend` is native and the CPU lacks AVX512-BF16, or a slice is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldc: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    assert!(
        backend == Backend::Emulated || native(),
        "bf16 matmul needs a CPU with AVX512-BF16"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * ldc + n, "bf16 gemm: dst too small");
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * ldc..row * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let (lhs_len, rhs_len) = (extent(m, k, lhs_strides), extent(k, n, rhs_strides));
    assert!(lhs.len() >= lhs_len, "bf16 gemm: lhs too small");
    assert!(rhs.len() >= rhs_len, "bf16 gemm: rhs too small");
    // Round each operand once (one vectorized pass), then pack from the bf16 copies. A call
    // nested in another on this thread (rayon may run one while the other waits) allocates.
    ROUNDED.with(|cell| {
        let mut fresh = (Vec::new(), Vec::new());
        let mut reused = cell.try_borrow_mut();
        let (a16, b16) = match reused.as_deref_mut() {
            Ok(buffers) => buffers,
            Err(_) => &mut fresh,
        };
        a16.resize(lhs_len, 0);
        b16.resize(rhs_len, 0);
        convert(backend, &lhs[..lhs_len], a16);
        convert(backend, &rhs[..rhs_len], b16);
        gemm_rounded(
            backend,
            m,
            n,
            k,
            dst,
            ldc,
            accumulate,
            a16,
            lhs_strides,
            b16,
            rhs_strides,
        );
    });
}

#[allow(clippy::too_many_arguments)]
fn gemm_rounded(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldc: usize,
    accumulate: bool,
    lhs: &[u16],
    lhs_strides: (usize, usize),
    rhs: &[u16],
    rhs_strides: (usize, usize),
) {
    let dst_ptr = SyncPtr(dst.as_mut_ptr());
    let panels_a = m.div_ceil(MR);
    // With A's rows contiguous and k even, each k pair of a row already is one word in the bf16
    // copy, so the tiles read A in place: packing it would cost as much as a fifth of the
    // product when n is small.
    let a_in_place = lhs_strides.1 == 1 && k.is_multiple_of(2);
    let mut a_pack = if a_in_place {
        Vec::new()
    } else {
        vec![0u32; panels_a * MR * KC_PAIRS]
    };
    let mut b_pack = vec![0u32; KC_PAIRS * NC];
    for pc in (0..k).step_by(2 * KC_PAIRS) {
        let kc = (k - pc).min(2 * KC_PAIRS);
        let pairs = kc.div_ceil(2);
        // All of A's rows for this k block, packed once and shared by every column block.
        if !a_in_place {
            a_pack[..panels_a * MR * pairs]
                .par_chunks_mut(MR * pairs)
                .enumerate()
                .for_each(|(i, panel)| {
                    let i0 = i * MR;
                    pack_a(panel, lhs, lhs_strides, i0, (m - i0).min(MR), pc, kc);
                });
        }
        let overwrite = pc == 0 && !accumulate;
        for jc in (0..n).step_by(NC) {
            let nc = (n - jc).min(NC);
            let panels = nc.div_ceil(NR);
            b_pack[..panels * pairs * NR]
                .par_chunks_mut(pairs * NR)
                .enumerate()
                .for_each(|(p, panel)| {
                    let j0 = jc + p * NR;
                    pack_b(panel, rhs, rhs_strides, pc, kc, j0, (jc + nc - j0).min(NR));
                });
            let (a_pack, b_pack) = (&a_pack, &b_pack);
            (0..m.div_ceil(MC)).into_par_iter().for_each(|block| {
                for i0 in (block * MC..m.min((block + 1) * MC)).step_by(MR) {
                    let mr = (m - i0).min(MR);
                    // Where each of the tile's rows of A starts (rows past m repeat the last
                    // one: read, never stored), and the step from one k pair to the next.
                    let (a_rows, pair_step) = if a_in_place {
                        let row =
                            |r: usize| lhs[(i0 + r.min(mr - 1)) * lhs_strides.0 + pc..].as_ptr();
                        (std::array::from_fn::<_, MR, _>(row), 2)
                    } else {
                        let panel = a_pack[i0 * pairs..].as_ptr() as *const u16;
                        (std::array::from_fn(|r| panel.wrapping_add(2 * r)), 2 * MR)
                    };
                    for p in 0..panels {
                        let j0 = jc + p * NR;
                        // SAFETY: the native backend runs only where the CPU has AVX512-BF16
                        // (asserted by `gemm_with`); each row of A holds `pairs` pairs from its
                        // start (packed, or the row's k block in place, k even), as does the
                        // packed panel of B; the tile's rows i0..i0+mr and columns j0..j0+NR∧n
                        // lie inside dst (asserted by `gemm_with`) and this task alone writes
                        // the rows of its block.
                        let tile = match backend {
                            Backend::Native => tile,
                            Backend::Emulated => tile_emulated,
                        };
                        unsafe {
                            tile(
                                pairs,
                                a_rows,
                                pair_step,
                                b_pack[p * pairs * NR..].as_ptr(),
                                dst_ptr.get().add(i0 * ldc + j0),
                                ldc,
                                mr,
                                (jc + nc - j0).min(NR),
                                overwrite,
                            )
                        };
                    }
                }
            });
        }
    }
}

/// Packs rows `i0..i0 + mr` and k `p0..p0 + kc` of A as `[pair][MR]` words (zero beyond):
/// each word holds two consecutive k, the lower in the low half, as `vdpbf16ps` pairs them.
fn pack_a(
    dst: &mut [u32],
    a: &[u16],
    (rs, cs): (usize, usize),
    i0: usize,
    mr: usize,
    p0: usize,
    kc: usize,
) {
    let pairs = kc.div_ceil(2);
    let dst = &mut dst[..pairs * MR];
    dst.fill(0);
    let at = |i: usize, p: usize| u32::from(a[(i0 + i) * rs + (p0 + p) * cs]);
    if cs == 1 {
        // Rows of A are contiguous: read along each row.
        for r in 0..mr {
            let row = &a[(i0 + r) * rs + p0..(i0 + r) * rs + p0 + kc];
            for (q, two) in row.chunks_exact(2).enumerate() {
                dst[q * MR + r] = u32::from(two[0]) | (u32::from(two[1]) << 16);
            }
        }
    } else if rs == 1 && mr == MR && i0 + 8 <= a.len() - (p0 + kc - 1) * cs {
        // Columns of A are contiguous (a transposed operand), and 8 values from row i0 on lie
        // inside A for every k: interleave two k rows eight values at a time, keep six.
        for q in 0..kc / 2 {
            let lo = &a[(p0 + 2 * q) * cs + i0..][..8];
            let hi = &a[(p0 + 2 * q + 1) * cs + i0..][..8];
            let out = &mut dst[q * MR..(q + 1) * MR];
            for (r, o) in out.iter_mut().enumerate() {
                *o = u32::from(lo[r]) | (u32::from(hi[r]) << 16);
            }
        }
    } else {
        // Columns of A are contiguous (a transposed operand): read across the rows.
        for q in 0..kc / 2 {
            for r in 0..mr {
                dst[q * MR + r] = at(r, 2 * q) | (at(r, 2 * q + 1) << 16);
            }
        }
    }
    if kc % 2 == 1 {
        for r in 0..mr {
            dst[(pairs - 1) * MR + r] = at(r, kc - 1);
        }
    }
}

/// Packs k `p0..p0 + kc` and columns `j0..j0 + nr` of B as `[pair][NR]` words (zero beyond).
fn pack_b(
    dst: &mut [u32],
    b: &[u16],
    (rs, cs): (usize, usize),
    p0: usize,
    kc: usize,
    j0: usize,
    nr: usize,
) {
    let pairs = kc.div_ceil(2);
    if nr < NR {
        dst.fill(0);
    }
    let at = |p: usize, j: usize| u32::from(b[(p0 + p) * rs + (j0 + j) * cs]);
    if cs == 1 {
        // Rows of B are contiguous: interleave two rows.
        for q in 0..kc / 2 {
            let r0 = &b[(p0 + 2 * q) * rs + j0..(p0 + 2 * q) * rs + j0 + nr];
            let r1 = &b[(p0 + 2 * q + 1) * rs + j0..(p0 + 2 * q + 1) * rs + j0 + nr];
            for ((o, &lo), &hi) in dst[q * NR..q * NR + nr].iter_mut().zip(r0).zip(r1) {
                *o = u32::from(lo) | (u32::from(hi) << 16);
            }
        }
    } else if rs == 1 {
        // Columns of B are contiguous (a transposed operand): read down each column.
        for j in 0..nr {
            let col = &b[p0 * rs + (j0 + j) * cs..p0 * rs + (j0 + j) * cs + kc];
            for (q, two) in col.chunks_exact(2).enumerate() {
                dst[q * NR + j] = u32::from(two[0]) | (u32::from(two[1]) << 16);
            }
        }
    } else {
        for q in 0..kc / 2 {
            for j in 0..nr {
                dst[q * NR + j] = at(2 * q, j) | (at(2 * q + 1, j) << 16);
            }
        }
    }
    if kc % 2 == 1 {
        for j in 0..nr {
            dst[(pairs - 1) * NR + j] = at(kc - 1, j);
        }
    }
}

/// One `mr × nr` tile of dst (at most MR × NR): `c = a · b` when `overwrite`, else
/// `c += a · b`. Row `r` of A has its k pair `q` (two bf16, the lower k in the low half) at
/// `a_rows[r] + q · pair_step` (in bf16 units); B is a packed panel.
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; each row of A holds `pairs` pairs so laid out and `b`
/// `pairs · NR` words; rows `0..mr` (stride `ldc`) and columns `0..nr` of `c` are valid for
/// reads and writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    pairs: usize,
    a_rows: [*const u16; MR],
    pair_step: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    const V: usize = NR / 16;
    let mut acc = [[_mm512_setzero_ps(); V]; MR];
    for q in 0..pairs {
        let bq = b.add(q * NR);
        let mut bv = [_mm512_setzero_si512(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(bq.add(16 * v) as *const _);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = (a_rows[r].add(q * pair_step) as *const u32).read_unaligned();
            let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_dpbf16_ps(*acc, ar, std::mem::transmute::<__m512i, __m512bh>(bv));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(mr) {
        let row = c.add(r * ldc);
        for (v, &acc) in acc.iter().enumerate() {
            let cols = nr.saturating_sub(16 * v).min(16);
            if cols == 0 {
                break;
            }
            let p = row.add(16 * v);
            if cols == 16 {
                let sum = if overwrite {
                    acc
                } else {
                    _mm512_add_ps(_mm512_loadu_ps(p), acc)
                };
                _mm512_storeu_ps(p, sum);
            } else {
                let mask: __mmask16 = ((1u32 << cols) - 1) as __mmask16;
                let sum = if overwrite {
                    acc
                } else {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), acc)
                };
                _mm512_mask_storeu_ps(p, mask, sum);
            }
        }
    }
}

/// One step of `vdpbf16ps` on one lane, as Intel documents it: the odd (high) pair member
/// first, then the even one, each a fused multiply-add with subnormal inputs read as zero, the
/// result rounded to nearest-even and a subnormal result flushed to zero.
#[inline(always)]
fn dot_pair_step(sum: f32, a: u32, b: u32) -> f32 {
    let zero_subnormal = |x: f32| {
        if x.is_subnormal() {
            0f32.copysign(x)
        } else {
            x
        }
    };
    let half = |word: u32, high: bool| {
        zero_subnormal(from_bf16((word >> if high { 16 } else { 0 }) as u16))
    };
    let step = |sum: f32, high: bool| {
        zero_subnormal(half(a, high).mul_add(half(b, high), zero_subnormal(sum)))
    };
    step(step(sum, true), false)
}

/// The scalar twin of [`tile`]: the same sums in the same order, one lane at a time.
///
/// # Safety
/// As for [`tile`], except that any CPU runs it.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_emulated(
    pairs: usize,
    a_rows: [*const u16; MR],
    pair_step: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for q in 0..pairs {
        let bq = std::slice::from_raw_parts(b.add(q * NR), NR);
        for (r, acc) in acc.iter_mut().enumerate().take(mr) {
            let pair = (a_rows[r].add(q * pair_step) as *const u32).read_unaligned();
            for (acc, &bw) in acc.iter_mut().zip(bq) {
                *acc = dot_pair_step(*acc, pair, bw);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(mr) {
        let row = std::slice::from_raw_parts_mut(c.add(r * ldc), nr);
        for (out, &acc) in row.iter_mut().zip(acc) {
            *out = if overwrite { acc } else { *out + acc };
        }
    }
}

/// Never called: `gemm_with` refuses the native backend without AVX512-BF16.
///
/// # Safety
/// None needed; it only panics.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    _: usize,
    _: [*const u16; MR],
    _: usize,
    _: *const u32,
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("bf16 matmul is only offered on x86-64 CPUs with AVX512-BF16")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        // Subnormals flush to signed zero, as the hardware conversion does.
        assert_eq!(to_bf16(-1e-40), 0x8000);
    }

    #[test]
    fn vector_rounding_matches_scalar() {
        if !native() {
            eprintln!("skipped: this CPU has no AVX512-BF16 (the emulation rounds with to_bf16)");
            return;
        }
        let mut src: Vec<f32> = values(1000, 3).iter().map(|v| v * 1e3).collect();
        src.extend([
            1.0 + 1.0 / 256.0,
            1e-40,
            -1e-40,
            f32::NAN,
            f32::INFINITY,
            f32::MAX,
            -0.0,
        ]);
        src.extend([
            f32::from_bits(0x7FFF_FFFF),
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0x0080_8000),
        ]);
        let mut dst = vec![0u16; src.len()];
        convert(Backend::Native, &src, &mut dst);
        for (x, h) in src.iter().zip(&dst) {
            assert_eq!(*h, to_bf16(*x), "{:08x}", x.to_bits());
        }
    }

    /// The product of the bf16-rounded operands in f64, for comparison.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        lhs: &[f32],
        (ars, acs): (usize, usize),
        rhs: &[f32],
        (brs, bcs): (usize, usize),
    ) -> Vec<f64> {
        let r = |x: f32| f64::from(from_bf16(to_bf16(x)));
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| r(lhs[i * ars + p * acs]) * r(rhs[p * brs + j * bcs]))
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_the_rounded_product_for_every_layout_and_edge() {
        let backends: &[Backend] = if native() {
            eprintln!("bf16 GEMM checked natively and with its scalar emulation");
            &[Backend::Native, Backend::Emulated]
        } else {
            eprintln!(
                "bf16 GEMM checked with its scalar emulation only: this CPU has no AVX512-BF16"
            );
            &[Backend::Emulated]
        };
        // Sizes straddle the tile (6 × 64), the k block (384) and the column block (512), with
        // enough rows for many panels of A; even k (A read in place when its rows are
        // contiguous) and odd k (A packed), down to a last k block of one pair.
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 65, 3),
            (13, 130, 385),
            (50, 520, 800),
            (6, 64, 2),
            (200, 70, 391),
            (14, 100, 770),
        ] {
            for lhs_t in [false, true] {
                for rhs_t in [false, true] {
                    let lhs = values(m * k, (m * 31 + k) as u32);
                    let rhs = values(k * n, (n * 17 + k) as u32);
                    let ls = if lhs_t { (1, m) } else { (k, 1) };
                    let rs = if rhs_t { (1, k) } else { (n, 1) };
                    let want = reference(m, n, k, &lhs, ls, &rhs, rs);
                    let start = values(m * n, 7);
                    for (&backend, accumulate) in
                        backends.iter().flat_map(|b| [(b, false), (b, true)])
                    {
                        let mut dst = start.clone();
                        gemm_with(
                            backend, m, n, k, &mut dst, n, accumulate, &lhs, ls, &rhs, rs,
                        );
                        for i in 0..m * n {
                            let base = if accumulate { f64::from(start[i]) } else { 0.0 };
                            let err = (f64::from(dst[i]) - base - want[i]).abs();
                            // fp32 summation of k products of size ≤ 1.
                            assert!(
                                err <= 1e-6 * (k as f64 + 1.0),
                                "m {m} n {n} k {k} lhsᵀ {lhs_t} rhsᵀ {rhs_t} acc {accumulate}: element {i} off by {err}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let backend = backend().unwrap_or(Backend::Emulated);
        let (m, n, k) = (100, 300, 500);
        let (lhs, rhs) = (values(m * k, 1), values(k * n, 2));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut dst = vec![0f32; m * n];
            pool.install(|| {
                gemm_with(
                    backend,
                    m,
                    n,
                    k,
                    &mut dst,
                    n,
                    false,
                    &lhs,
                    (k, 1),
                    &rhs,
                    (n, 1),
                )
            });
            dst
        };
        assert_eq!(run(1), run(3));
    }

    /// The emulation is the instruction's arithmetic, bit for bit, on ordinary values and on
    /// the edges (subnormal inputs and sums, cancellation, huge values).
    #[test]
    fn the_emulation_matches_the_instructions_bit_for_bit() {
        if !native() {
            eprintln!("skipped: this CPU has no AVX512-BF16 to compare the emulation with");
            return;
        }
        let (m, n, k) = (13, 70, 101);
        let mut lhs = values(m * k, 11);
        let mut rhs = values(k * n, 12);
        for (i, x) in lhs.iter_mut().enumerate().step_by(7) {
            *x = [1e-39, -3e38, 1e30, 2e-38, 0.0][i % 5];
        }
        for (i, x) in rhs.iter_mut().enumerate().step_by(5) {
            *x = [1e-38, 3e38, -1e-30, 1.5e-38][i % 4];
        }
        for accumulate in [false, true] {
            let start: Vec<f32> = values(m * n, 3).iter().map(|v| v * 1e-38).collect();
            let mut native_out = start.clone();
            let mut emulated_out = start.clone();
            for (backend, out) in [
                (Backend::Native, &mut native_out),
                (Backend::Emulated, &mut emulated_out),
            ] {
                gemm_with(
                    backend,
                    m,
                    n,
                    k,
                    out,
                    n,
                    accumulate,
                    &lhs,
                    (k, 1),
                    &rhs,
                    (n, 1),
                );
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&native_out),
                bits(&emulated_out),
                "accumulate {accumulate}"
            );
        }
    }
}
