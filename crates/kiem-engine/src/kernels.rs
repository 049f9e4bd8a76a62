//! The operations a GPT needs, forward and backward, behind one trait ([`Kernels`]).
//!
//! [`Cpu`] is the reference implementation: fused loops parallel over a rayon pool, matmuls
//! through `gemm`. Every parallel loop writes disjoint outputs, and every reduction across rows
//! sums fixed-size chunks in a fixed order, so results are bit-identical from run to run for a
//! given thread count (exact resume depends on this). The trait works on host slices today; a
//! CUDA implementation will bring its own buffer type behind the same operations.

use rayon::prelude::*;

mod llama;
pub use llama::RopeTable;

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]` (Hugging Face GPT-2 `Conv1D`).
    InOut,
    /// `[out, in]` (the token embedding used as the output head).
    OutIn,
}

/// Sizes of a batch and of attention's heads.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub batch: usize,
    pub seq: usize,
    /// Width of the residual stream (embeddings).
    pub channels: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`; grouped-query attention when fewer).
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Dims {
    /// Multi-head attention with `channels / heads` channels per head (GPT-2).
    pub fn mha(batch: usize, seq: usize, channels: usize, heads: usize) -> Dims {
        Dims {
            batch,
            seq,
            channels,
            heads,
            kv_heads: heads,
            head_dim: channels / heads,
        }
    }

    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Width of attention's output, all query heads side by side.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of one row of `qkv`: queries, then keys, then values.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Query heads that share one key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

pub const LAYERNORM_EPS: f32 = 1e-5;

/// The operations of a GPT-2 forward and backward pass and of AdamW.
///
/// Conventions: `d*` outputs of backward passes accumulate (`+=`) into parameter gradients and
/// into `dinp` where noted; activations are row-major `[rows, width]`.
pub trait Kernels: Sync {
    /// `out[b,t] = wte[token] (+ wpe[t])`.
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f32],
        wpe: Option<&[f32]>,
        d: Dims,
    );
    /// Accumulates into `dwte` and `dwpe`.
    fn encoder_backward(
        &self,
        dwte: &mut [f32],
        dwpe: Option<&mut [f32]>,
        dout: &[f32],
        tokens: &[u32],
        d: Dims,
    );
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: &[f32],
        c: usize,
    );
    /// `dinp +=`, `dw +=`, `db +=`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        c: usize,
    );
    /// `out[rows, c_out] = inp[rows, c_in] · W (+ bias)`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        w: &[f32],
        layout: WeightLayout,
        bias: Option<&[f32]>,
        c_in: usize,
        c_out: usize,
    );
    /// `dinp =` (overwritten), `dw +=`, `dbias +=`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        layout: WeightLayout,
        c_in: usize,
        c_out: usize,
    );
    /// RMS norm: `out = inp / rms(inp) · w`; keeps `1 / rms` per row in `rstd`.
    fn rmsnorm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        eps: f32,
        c: usize,
    );
    /// `dinp +=`, `dw +=`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        rstd: &[f32],
        c: usize,
    );
    /// Rotates the first `heads` heads of every row of `x[rows, width]` (queries and keys sit
    /// first in `qkv`) by their row's position, in place; `inverse` applies the transpose
    /// (the backward pass).
    fn rope(
        &self,
        x: &mut [f32],
        width: usize,
        heads: usize,
        positions: &[u32],
        table: &RopeTable,
        inverse: bool,
    );
    /// Causal attention over `qkv[rows, qkv_width]` (queries, keys, values; query head `h`
    /// reads key/value head `h / group`); keeps the probabilities `att[B,H,T,T]`.
    fn attention_forward(&self, out: &mut [f32], att: &mut [f32], qkv: &[f32], d: Dims);
    /// Overwrites `dqkv`.
    fn attention_backward(&self, dqkv: &mut [f32], dout: &[f32], qkv: &[f32], att: &[f32], d: Dims);
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]);
    /// Overwrites `dinp`.
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]);
    /// `out[rows, h] = silu(gate) · up` where each row of `inp[rows, 2h]` is `gate | up`.
    fn swiglu_forward(&self, out: &mut [f32], inp: &[f32], h: usize);
    /// Overwrites `dinp[rows, 2h]`.
    fn swiglu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], h: usize);
    fn add(&self, out: &mut [f32], a: &[f32], b: &[f32]);
    /// Softmax cross-entropy over the first `vocab` of each row of `logits[rows, padded]`.
    /// Writes each row's loss (0 where `targets[i]` is `None`). With `grad_scale`, overwrites
    /// `logits` with `d(loss · grad_scale)/d(logits)` (0 for ignored rows and padding).
    fn cross_entropy(
        &self,
        logits: &mut [f32],
        losses: &mut [f32],
        targets: &[Option<u32>],
        vocab: usize,
        padded: usize,
        grad_scale: Option<f32>,
    );
    /// Sum of squares, accumulated in f64.
    fn sum_squares(&self, x: &[f32]) -> f64;
    fn scale(&self, x: &mut [f32], factor: f32);
    /// One AdamW step over a contiguous range of parameters.
    fn adamw(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW);
}

/// AdamW hyper-parameters for one update.
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (0 for tensors that are not decayed).
    pub weight_decay: f32,
    /// 1-based step, for bias correction.
    pub step: u64,
}

/// Number format of the operands of the big matrix products (sums are always fp32).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// fp32 operands (through OpenBLAS when installed, else the `gemm` crate).
    #[default]
    Fp32,
    /// Operands rounded to bf16, fp32 sums ([`crate::bf16_gemm`]): needs AVX512-BF16.
    Bf16,
}

impl MatmulPrecision {
    /// The fastest precision this CPU offers: bf16 with AVX512-BF16, else fp32.
    pub fn fastest_available() -> MatmulPrecision {
        if crate::bf16_gemm::available() {
            MatmulPrecision::Bf16
        } else {
            MatmulPrecision::Fp32
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::Fp32 => "fp32",
            MatmulPrecision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" | "f32" => Ok(MatmulPrecision::Fp32),
            "bf16" => Ok(MatmulPrecision::Bf16),
            other => Err(format!(
                "unknown precision {other:?} (expected fp32 or bf16)"
            )),
        }
    }
}

/// The CPU reference kernels.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu {
    /// Precision of the layers' matrix products (attention's small products stay fp32, and
    /// so do decoding's thin ones).
    pub matmul: MatmulPrecision,
}

impl Cpu {
    /// fp32 everywhere.
    pub const FP32: Cpu = Cpu {
        matmul: MatmulPrecision::Fp32,
    };

    /// Kernels with the given matmul precision, or an error naming what this CPU lacks.
    pub fn with_precision(matmul: MatmulPrecision) -> crate::Result<Cpu> {
        if matmul == MatmulPrecision::Bf16 && !crate::bf16_gemm::available() {
            return Err(crate::EngineError::Config(
                "bf16 matmuls need a CPU with AVX512-BF16 (Intel Cooper Lake / Sapphire Rapids or newer, AMD Zen 4 or newer); use fp32".into(),
            ));
        }
        Ok(Cpu { matmul })
    }
}

/// Rows per chunk in deterministic row reductions.
const REDUCE_ROWS: usize = 32;
/// Elements per chunk in element-wise parallel loops.
const ELEMENTS: usize = 1 << 14;

/// Runs `work` on a worker thread of the current rayon pool (directly when already on one).
/// Its parallel loops then fork and join inside the pool, where the other workers are still
/// spinning between loops, instead of each loop being handed to the pool from outside and
/// waking a sleeping worker (futex round trips: decoding runs ~120 loops per step).
pub fn in_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        work()
    } else {
        rayon::scope(|_| work())
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, each operand given by (row stride, column stride).
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
    if dst_strides.1 == 1 && k > 0 {
        if let Some(blas) = crate::blas::blas() {
            // SAFETY: the asserts above bound every access; dst is a distinct &mut.
            let done = unsafe {
                blas.sgemm_raw(
                    false,
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    dst_strides.0,
                    accumulate,
                    lhs.as_ptr(),
                    lhs_strides,
                    rhs.as_ptr(),
                    rhs_strides,
                    1.0,
                )
            };
            if done {
                return;
            }
        }
    }
    // SAFETY: the asserts above keep every access inside the slices; dst does not alias the
    // inputs (it is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// `dst[m, n] (+)= beta · lhs[m, k] · rhs[k, n]` on raw pointers, single-threaded (for use
/// inside parallel tasks that own disjoint parts of `dst`).
///
/// # Safety
/// Every (row, col) addressed through the strides must lie inside the pointed-to buffers, and
/// no other thread may write the addressed part of `dst` concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
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
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if dst_strides.1 == 1 && k > 0 {
        if let Some(blas) = crate::blas::blas() {
            if blas.sgemm_raw(
                true,
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
                beta,
            ) {
                return;
            }
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_strides.1 as isize,
        dst_strides.0 as isize,
        accumulate,
        lhs,
        lhs_strides.1 as isize,
        lhs_strides.0 as isize,
        rhs,
        rhs_strides.1 as isize,
        rhs_strides.0 as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Row blocks of the causal attention matmuls: block `[r0, r1)` only needs keys `0..r1`.
const ATTENTION_BLOCK: usize = 32;

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
fn by_column_blocks(
    out: &mut [f32],
    rows: usize,
    c_out: usize,
    bias: Option<&[f32]>,
    block: impl Fn(&mut [f32], usize, usize) + Sync,
) {
    let width = (c_out / (8 * rayon::current_num_threads())).clamp(64, 512);
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
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features; every W row j0..j1 holds c_in values.
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
/// when the CPU has it.
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
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features this function is compiled for.
        unsafe { skinny_block_avx2(acc, inp, w, layout, c_in, c_out, j0, j1) };
        return;
    }
    skinny_block_portable(acc, inp, w, layout, c_in, c_out, j0, j1);
}

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
                        *o += a * x;
                    }
                }
            }
        }
        WeightLayout::OutIn => outin_dots_portable(acc, inp, c_in, j0, j1, |j, k| w[j * c_in + k]),
    }
}

/// Portable [`outin_dots_avx2`]: one dot product per (row, column), sixteen partial sums to
/// vectorize.
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
            let mut lanes = [0f32; 16];
            let full = c_in / 16 * 16;
            for k0 in (0..full).step_by(16) {
                for i in 0..16 {
                    lanes[i] += x[k0 + i] * at(j, k0 + i);
                }
            }
            let mut sum = lanes.iter().sum::<f32>();
            for (k, &xk) in x.iter().enumerate().skip(full) {
                sum += xk * at(j, k);
            }
            acc[r * width + j - j0] += sum;
        }
    }
}

/// Runs `body` compiled for AVX-512 (or else AVX2 + FMA) when the CPU has it. The element-wise
/// loops of these kernels are written to vectorize, but a portable build targets baseline
/// x86-64 (4-lane SSE); `body` is inlined into a function compiled for the wider registers.
/// Floating-point results are the same bits at every level (no reassociation; `mul_add` is
/// fused everywhere). `KIEM_SIMD=baseline` or `KIEM_SIMD=avx2` caps the level.
#[inline(always)]
pub(crate) fn wide<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        #[derive(Clone, Copy, PartialEq)]
        enum Level {
            Avx512,
            Avx2,
            Base,
        }
        static LEVEL: OnceLock<Level> = OnceLock::new();
        let level = *LEVEL.get_or_init(|| {
            // KIEM_SIMD=baseline or avx2 caps the level, so tests can run every code path.
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
                Level::Avx512
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
                Level::Avx2
            } else {
                Level::Base
            }
        });
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        #[inline]
        unsafe fn avx512<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        match level {
            // SAFETY: the CPU has the features each function is compiled for.
            Level::Avx512 => return unsafe { avx512(body) },
            Level::Avx2 => return unsafe { avx2(body) },
            Level::Base => {}
        }
    }
    body()
}

fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(ATTENTION_BLOCK))
        .map(move |i| (i * ATTENTION_BLOCK, ((i + 1) * ATTENTION_BLOCK).min(t)))
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
fn fast_tanh(x: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * x) + 1.0)
}

/// Maximum with 8 independent lanes, so the loop vectorizes.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
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

/// Dot product with 16 independent lanes (a fixed order, so deterministic), so it vectorizes.
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..16 {
            lanes[j] += x[j] * y[j];
        }
    }
    lanes.iter().sum::<f32>() + tail
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
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
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

/// Sums per-row contributions into `acc[width]` deterministically: rows are grouped in fixed
/// chunks, each chunk summed in order on some thread, then chunks summed in order.
fn reduce_rows(
    rows: usize,
    width: usize,
    acc: &mut [f32],
    row_fn: impl Fn(usize, &mut [f32]) + Sync,
) {
    let chunks = rows.div_ceil(REDUCE_ROWS);
    let mut partial = vec![0f32; chunks * width];
    partial
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(chunk, part)| {
            let end = ((chunk + 1) * REDUCE_ROWS).min(rows);
            for row in chunk * REDUCE_ROWS..end {
                row_fn(row, part);
            }
        });
    for part in partial.chunks(width) {
        for (a, p) in acc.iter_mut().zip(part) {
            *a += p;
        }
    }
}

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2 / pi)

impl Kernels for Cpu {
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f32],
        wpe: Option<&[f32]>,
        d: Dims,
    ) {
        let c = d.channels;
        out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
            let tok = tokens[row] as usize;
            o.copy_from_slice(&wte[tok * c..(tok + 1) * c]);
            if let Some(wpe) = wpe {
                let t = row % d.seq;
                for (o, p) in o.iter_mut().zip(&wpe[t * c..(t + 1) * c]) {
                    *o += p;
                }
            }
        });
    }

    fn encoder_backward(
        &self,
        dwte: &mut [f32],
        dwpe: Option<&mut [f32]>,
        dout: &[f32],
        tokens: &[u32],
        d: Dims,
    ) {
        let c = d.channels;
        // Rows of dwpe are owned by position; rows of dwte are scattered, so go serially in
        // row order (cheap next to the matmuls) to stay deterministic.
        if let Some(dwpe) = dwpe {
            dwpe.par_chunks_mut(c)
                .enumerate()
                .take(d.seq)
                .for_each(|(t, dp)| {
                    for b in 0..d.batch {
                        let g = &dout[(b * d.seq + t) * c..(b * d.seq + t + 1) * c];
                        for i in 0..c {
                            dp[i] += g[i];
                        }
                    }
                });
        }
        for (row, &tok) in tokens.iter().enumerate().take(d.rows()) {
            let g = &dout[row * c..(row + 1) * c];
            let dw = &mut dwte[tok as usize * c..(tok as usize + 1) * c];
            for i in 0..c {
                dw[i] += g[i];
            }
        }
    }

    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: &[f32],
        c: usize,
    ) {
        out.par_chunks_mut(c)
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .enumerate()
            .for_each(|(row, (o, (m, r)))| {
                wide(
                    #[inline(always)]
                    || {
                        let x = &inp[row * c..(row + 1) * c];
                        let mu = x.iter().sum::<f32>() / c as f32;
                        let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / c as f32;
                        let s = 1.0 / (var + LAYERNORM_EPS).sqrt();
                        for i in 0..c {
                            o[i] = (x[i] - mu) * s * w[i] + b[i];
                        }
                        *m = mu;
                        *r = s;
                    },
                )
            });
    }

    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        c: usize,
    ) {
        let rows = mean.len();
        dinp.par_chunks_mut(c).enumerate().for_each(|(row, di)| {
            wide(
                #[inline(always)]
                || {
                    let x = &inp[row * c..(row + 1) * c];
                    let g = &dout[row * c..(row + 1) * c];
                    let (mu, s) = (mean[row], rstd[row]);
                    let mut dnorm_mean = 0.0f32;
                    let mut dnorm_norm_mean = 0.0f32;
                    for i in 0..c {
                        let norm = (x[i] - mu) * s;
                        let dnorm = w[i] * g[i];
                        dnorm_mean += dnorm;
                        dnorm_norm_mean += dnorm * norm;
                    }
                    dnorm_mean /= c as f32;
                    dnorm_norm_mean /= c as f32;
                    for i in 0..c {
                        let norm = (x[i] - mu) * s;
                        let dnorm = w[i] * g[i];
                        di[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
                    }
                },
            )
        });
        let mut dwb = vec![0f32; 2 * c];
        reduce_rows(rows, 2 * c, &mut dwb, |row, acc| {
            let x = &inp[row * c..(row + 1) * c];
            let g = &dout[row * c..(row + 1) * c];
            let (mu, s) = (mean[row], rstd[row]);
            let (aw, ab) = acc.split_at_mut(c);
            for i in 0..c {
                aw[i] += (x[i] - mu) * s * g[i];
                ab[i] += g[i];
            }
        });
        for i in 0..c {
            dw[i] += dwb[i];
            db[i] += dwb[c + i];
        }
    }

    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        w: &[f32],
        layout: WeightLayout,
        bias: Option<&[f32]>,
        c_in: usize,
        c_out: usize,
    ) {
        let rows = inp.len() / c_in;
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
            self.matmul,
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

    fn matmul_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        layout: WeightLayout,
        c_in: usize,
        c_out: usize,
    ) {
        let rows = inp.len() / c_in;
        // dinp[rows, in] = dout[rows, out] · Wᵀ
        let wt_strides = match layout {
            WeightLayout::InOut => (1, c_out),
            WeightLayout::OutIn => (c_in, 1),
        };
        gemm_f32(
            self.matmul,
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
        match layout {
            // dW[in, out] += inpᵀ · dout
            WeightLayout::InOut => gemm_f32(
                self.matmul,
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
                self.matmul,
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

    fn attention_forward(&self, out: &mut [f32], att: &mut [f32], qkv: &[f32], d: Dims) {
        let (t_len, nh, hs) = (d.seq, d.heads, d.head_dim);
        let (w, qw, kvw) = (d.qkv_width(), d.q_width(), d.kv_heads * hs);
        let group = d.group();
        let scale = 1.0 / (hs as f32).sqrt();
        assert!(
            nh % d.kv_heads == 0
                && qkv.len() >= d.rows() * w
                && out.len() >= d.rows() * qw
                && att.len() >= d.batch * nh * t_len * t_len,
            "attention_forward: buffers too small for {d:?}"
        );
        let out_ptr = SyncPtr(out.as_mut_ptr());
        // One task per (batch, head): it owns att[b, h] and the head's columns of out.
        att.par_chunks_mut(t_len * t_len)
            .enumerate()
            .take(d.batch * nh)
            .for_each(|(bh, p)| {
                let (b, h) = (bh / nh, bh % nh);
                let base = qkv[(b * t_len) * w..].as_ptr();
                let q = base.wrapping_add(h * hs);
                let k = base.wrapping_add(qw + (h / group) * hs);
                let v = base.wrapping_add(qw + kvw + (h / group) * hs);
                for (r0, r1) in row_blocks(t_len) {
                    // SAFETY: rows r0..r1 of Q and 0..r1 of K lie inside qkv (asserted above);
                    // the block of p is this task's.
                    unsafe {
                        gemm_raw(
                            r1 - r0,
                            r1,
                            hs,
                            p[r0 * t_len..].as_mut_ptr(),
                            (t_len, 1),
                            false,
                            q.add(r0 * w),
                            (w, 1),
                            k,
                            (1, w),
                            scale,
                        );
                    }
                }
                wide(
                    #[inline(always)]
                    || {
                        for t in 0..t_len {
                            let row = &mut p[t * t_len..(t + 1) * t_len];
                            let live = &mut row[..=t];
                            let max = lane_max(live);
                            live.iter_mut().for_each(|x| *x = fast_exp(*x - max));
                            let inv = 1.0 / lane_sum(live, |e| e);
                            live.iter_mut().for_each(|x| *x *= inv);
                            row[t + 1..].fill(0.0);
                        }
                    },
                );
                for (r0, r1) in row_blocks(t_len) {
                    // SAFETY: this task alone writes head h's columns of out for batch b.
                    unsafe {
                        let y = out_ptr.get().add((b * t_len + r0) * qw + h * hs);
                        gemm_raw(
                            r1 - r0,
                            hs,
                            r1,
                            y,
                            (qw, 1),
                            false,
                            p[r0 * t_len..].as_ptr(),
                            (t_len, 1),
                            v,
                            (w, 1),
                            1.0,
                        );
                    }
                }
            });
    }

    fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        att: &[f32],
        d: Dims,
    ) {
        let (t_len, nh, hs) = (d.seq, d.heads, d.head_dim);
        let (w, qw, kvw) = (d.qkv_width(), d.q_width(), d.kv_heads * hs);
        let group = d.group();
        let scale = 1.0 / (hs as f32).sqrt();
        assert!(
            nh % d.kv_heads == 0
                && qkv.len() >= d.rows() * w
                && dqkv.len() >= d.rows() * w
                && dout.len() >= d.rows() * qw
                && att.len() >= d.batch * nh * t_len * t_len,
            "attention_backward: buffers too small for {d:?}"
        );
        dqkv.par_chunks_mut(ELEMENTS).for_each(|x| x.fill(0.0));
        let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());
        // One task per (batch, key/value head): the query heads of a group add into the same
        // dK and dV columns, so they run one after another inside the task.
        (0..d.batch * d.kv_heads).into_par_iter().for_each(|bkv| {
            let (b, kvh) = (bkv / d.kv_heads, bkv % d.kv_heads);
            let base = qkv[(b * t_len) * w..].as_ptr();
            let k = base.wrapping_add(qw + kvh * hs);
            let v = base.wrapping_add(qw + kvw + kvh * hs);
            // SAFETY (all blocks below): this task alone writes batch b's columns of the query
            // heads of group kvh and of key/value head kvh in dqkv; every row addressed is
            // < t_len, every column < hs (the buffers' sizes are asserted above).
            let dbase = unsafe { dqkv_ptr.get().add((b * t_len) * w) };
            let dk = dbase.wrapping_add(qw + kvh * hs);
            let dv = dbase.wrapping_add(qw + kvw + kvh * hs);
            let mut ds = vec![0f32; t_len * t_len];
            for h in kvh * group..(kvh + 1) * group {
                let bh = b * nh + h;
                let p = &att[bh * t_len * t_len..(bh + 1) * t_len * t_len];
                let q = base.wrapping_add(h * hs);
                let dq = dbase.wrapping_add(h * hs);
                let dy = dout[(b * t_len) * qw + h * hs..].as_ptr();
                for (r0, r1) in row_blocks(t_len) {
                    unsafe {
                        // dP = dY · Vᵀ
                        gemm_raw(
                            r1 - r0,
                            r1,
                            hs,
                            ds[r0 * t_len..].as_mut_ptr(),
                            (t_len, 1),
                            false,
                            dy.add(r0 * qw),
                            (qw, 1),
                            v,
                            (1, w),
                            1.0,
                        );
                        // dV += Pᵀ · dY
                        gemm_raw(
                            r1,
                            hs,
                            r1 - r0,
                            dv,
                            (w, 1),
                            true,
                            p[r0 * t_len..].as_ptr(),
                            (1, t_len),
                            dy.add(r0 * qw),
                            (qw, 1),
                            1.0,
                        );
                    }
                }
                wide(
                    #[inline(always)]
                    || {
                        for t in 0..t_len {
                            let pr = &p[t * t_len..t * t_len + t + 1];
                            let dr = &mut ds[t * t_len..t * t_len + t + 1];
                            let weighted: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                            for (x, &pv) in dr.iter_mut().zip(pr) {
                                *x = pv * (*x - weighted) * scale;
                            }
                            // The block matmul filled dP beyond the diagonal; those keys are masked.
                            ds[t * t_len + t + 1..(t + 1) * t_len].fill(0.0);
                        }
                    },
                );
                for (r0, r1) in row_blocks(t_len) {
                    unsafe {
                        // dQ = dS · K
                        gemm_raw(
                            r1 - r0,
                            hs,
                            r1,
                            dq.add(r0 * w),
                            (w, 1),
                            true,
                            ds[r0 * t_len..].as_ptr(),
                            (t_len, 1),
                            k,
                            (w, 1),
                            1.0,
                        );
                        // dK += dSᵀ · Q
                        gemm_raw(
                            r1,
                            hs,
                            r1 - r0,
                            dk,
                            (w, 1),
                            true,
                            ds[r0 * t_len..].as_ptr(),
                            (1, t_len),
                            q.add(r0 * w),
                            (w, 1),
                            1.0,
                        );
                    }
                }
            }
        });
    }

    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        out.par_chunks_mut(ELEMENTS)
            .zip(inp.par_chunks(ELEMENTS))
            .for_each(|(o, x)| {
                wide(
                    #[inline(always)]
                    || {
                        for (o, &x) in o.iter_mut().zip(x) {
                            let cube = 0.044715 * x * x * x;
                            *o = 0.5 * x * (1.0 + fast_tanh(GELU_SCALE * (x + cube)));
                        }
                    },
                )
            });
    }

    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        dinp.par_chunks_mut(ELEMENTS)
            .zip(inp.par_chunks(ELEMENTS).zip(dout.par_chunks(ELEMENTS)))
            .for_each(|(di, (x, g))| {
                wide(
                    #[inline(always)]
                    || {
                        for ((di, &x), &g) in di.iter_mut().zip(x).zip(g) {
                            let cube = 0.044715 * x * x * x;
                            let arg = GELU_SCALE * (x + cube);
                            let th = fast_tanh(arg);
                            let sech2 = 1.0 - th * th;
                            let local = 0.5 * (1.0 + th)
                                + x * 0.5 * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
                            *di = local * g;
                        }
                    },
                )
            });
    }

    fn swiglu_forward(&self, out: &mut [f32], inp: &[f32], h: usize) {
        llama::swiglu_forward(out, inp, h);
    }

    fn swiglu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], h: usize) {
        llama::swiglu_backward(dinp, inp, dout, h);
    }

    fn rmsnorm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        eps: f32,
        c: usize,
    ) {
        llama::rmsnorm_forward(out, rstd, inp, w, eps, c);
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        rstd: &[f32],
        c: usize,
    ) {
        llama::rmsnorm_backward(dinp, dw, dout, inp, w, rstd, c);
    }

    fn rope(
        &self,
        x: &mut [f32],
        width: usize,
        heads: usize,
        positions: &[u32],
        table: &RopeTable,
        inverse: bool,
    ) {
        llama::rope(x, width, heads, positions, table, inverse);
    }

    fn add(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        out.par_chunks_mut(ELEMENTS)
            .zip(a.par_chunks(ELEMENTS).zip(b.par_chunks(ELEMENTS)))
            .for_each(|(o, (a, b))| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o = a + b;
                }
            });
    }

    fn cross_entropy(
        &self,
        logits: &mut [f32],
        losses: &mut [f32],
        targets: &[Option<u32>],
        vocab: usize,
        padded: usize,
        grad_scale: Option<f32>,
    ) {
        logits
            .par_chunks_mut(padded)
            .zip(losses.par_iter_mut())
            .zip(targets.par_iter())
            .for_each(|((row, loss), target)| {
                wide(
                    #[inline(always)]
                    || {
                        let Some(target) = *target else {
                            *loss = 0.0;
                            if grad_scale.is_some() {
                                row.fill(0.0);
                            }
                            return;
                        };
                        let target = target as usize;
                        let live = &mut row[..vocab];
                        let max = lane_max(live);
                        let logit = live[target] - max;
                        match grad_scale {
                            None => *loss = lane_sum(live, |x| fast_exp(x - max)).ln() - logit,
                            Some(scale) => {
                                // One exp per logit: store e^(x - max), then normalize in place.
                                live.iter_mut().for_each(|x| *x = fast_exp(*x - max));
                                let sum = lane_sum(live, |e| e);
                                *loss = sum.ln() - logit;
                                let factor = scale / sum;
                                live.iter_mut().for_each(|e| *e *= factor);
                                live[target] -= scale;
                                row[vocab..].fill(0.0);
                            }
                        }
                    },
                )
            });
    }

    fn sum_squares(&self, x: &[f32]) -> f64 {
        let partial: Vec<f64> = x
            .par_chunks(ELEMENTS)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
            .collect();
        partial.iter().sum()
    }

    fn scale(&self, x: &mut [f32], factor: f32) {
        x.par_chunks_mut(ELEMENTS)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
    }

    fn adamw(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW) {
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2 = 1.0 - h.beta2.powi(h.step as i32);
        params
            .par_chunks_mut(ELEMENTS)
            .zip(grads.par_chunks(ELEMENTS))
            .zip(m.par_chunks_mut(ELEMENTS).zip(v.par_chunks_mut(ELEMENTS)))
            .for_each(|((p, g), (m, v))| {
                wide(
                    #[inline(always)]
                    || {
                        for i in 0..p.len() {
                            let gi = g[i];
                            m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
                            v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                            let m_hat = m[i] / bc1;
                            let v_hat = v[i] / bc2;
                            p[i] -= h.lr * (m_hat / (v_hat.sqrt() + h.eps) + h.weight_decay * p[i]);
                        }
                    },
                )
            });
    }
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: used only where every task writes a disjoint region (see each use).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
