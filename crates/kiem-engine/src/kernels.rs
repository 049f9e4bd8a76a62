//! The operations a decoder-only transformer needs (GPT-2's and the Llama family's), forward
//! and backward, behind one trait ([`Kernels`]).
//!
//! [`Cpu`] is the reference implementation, one file per family of operations under
//! `kernels/`: `matmul` (GEMM paths and decoding's thin products), `attention`, `norm` (layer
//! and RMS), `rope`, `activation` (GELU, SwiGLU), `embedding`, `loss`, `optimizer`, and `simd`
//! (the SIMD-level dispatch and vectorizing helpers they share). Loops run in parallel over a
//! rayon pool; matmuls go through OpenBLAS when installed, else the `gemm` crate. Every parallel loop writes disjoint outputs, and every reduction across rows
//! sums fixed-size chunks in a fixed order, so results are bit-identical from run to run for a
//! given thread count (exact resume depends on this). The trait works on host slices today; a
//! CUDA implementation will bring its own buffer type behind the same operations.

use rayon::prelude::*;

mod activation;
mod attention;
mod embedding;
mod loss;
mod matmul;
mod norm;
mod optimizer;
mod quant;
mod rope;
mod simd;

pub(crate) use attention::{attention_over_cache, softmax};
pub use matmul::{matmul_thin_bf16, SKINNY_ROWS};
pub use quant::{matmul_thin_quant, matmul_wide_quant, wide_quant_native, QuantKind, QuantMatrix};
pub use rope::RopeTable;
pub(crate) use simd::{fast_exp, lane_dot, level, wide, Level};
use simd::{lane_max, lane_sum};
pub use simd::{streaming_read_f32, streaming_read_u16};

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

/// The operations of a transformer's forward and backward pass and of AdamW.
///
/// Conventions: `d*` outputs of backward passes accumulate (`+=`) into parameter gradients and
/// into `dinp` where noted; activations are row-major `[rows, width]`.
pub trait Kernels: Sync {
    /// `out[row] = wte[token] (+ wpe[positions[row]])`.
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        positions: &[u32],
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
        positions: &[u32],
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
    /// `dinp =` (overwritten), `dw +=` (unless the weight is frozen), `dbias +=`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: &mut [f32],
        dw: Option<&mut [f32]>,
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
    /// reads key/value head `h / group`) in which row `t` of a sequence attends to the
    /// `positions[t]` rows before it and itself: positions `0, 1, 2, …` give ordinary causal
    /// attention, a position that restarts at 0 starts a new example that never sees the
    /// earlier ones (packing). Keeps only each row's log-sum-exp, `stats[B,H,T]`, for the
    /// backward pass (no T × T probabilities).
    fn attention_forward(
        &self,
        out: &mut [f32],
        stats: &mut [f32],
        qkv: &[f32],
        positions: &[u32],
        d: Dims,
    );
    /// Overwrites `dqkv`; `stats` and `positions` as given to the forward pass.
    fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        stats: &[f32],
        positions: &[u32],
        d: Dims,
    );
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

/// What computes this process's matrix products at `precision`: the library or kernel and the
/// SIMD level. Results are reproducible bit for bit only on the same path (and thread count).
pub fn matmul_path(precision: MatmulPrecision) -> String {
    let level = match level() {
        Level::Avx512 => "AVX-512",
        Level::Avx2 => "AVX2",
        Level::Base => "baseline x86-64",
    };
    match (precision, crate::bf16_gemm::backend()) {
        (MatmulPrecision::Bf16, Some(crate::bf16_gemm::Backend::Emulated)) => {
            format!("bf16 kernel (emulated), {level}")
        }
        (MatmulPrecision::Bf16, Some(crate::bf16_gemm::Backend::Amx)) => {
            format!("bf16 AMX tiles 32x32, {level}")
        }
        (MatmulPrecision::Bf16, Some(crate::bf16_gemm::Backend::AmxEmulated)) => {
            format!("bf16 AMX tiles (emulated), {level}")
        }
        (MatmulPrecision::Bf16, _) => format!("bf16 kernel (AVX512-BF16), {level}"),
        (MatmulPrecision::Fp32, _) => format!("{}, {level}", crate::blas::backend_name()),
    }
}

impl MatmulPrecision {
    /// The fastest precision this process offers: bf16 where its products outrun fp32 ones
    /// ([`crate::bf16_gemm::outruns_fp32`]: AMX tiles, or AVX512-BF16 outside Intel), else fp32.
    pub fn fastest_available() -> MatmulPrecision {
        if crate::bf16_gemm::outruns_fp32() {
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

/// Which copy of the weights decoding reads: fp32, bf16 (half the bytes), or quantized
/// matrices (Q8_0 about a quarter; Q4_0, Q4_1 and Q4_K about a sixth of fp32's bytes). Also
/// how a LoRA run stores its frozen base ([`crate::Gpt::freeze_base`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(non_camel_case_types)]
pub enum DecodingWeights {
    #[default]
    Fp32,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
}

impl DecodingWeights {
    pub const NAMES: &'static str = "fp32, bf16, q8_0, q4_0, q4_1 or q4_k";

    pub fn name(self) -> &'static str {
        match self {
            DecodingWeights::Fp32 => "fp32",
            DecodingWeights::Bf16 => "bf16",
            DecodingWeights::Q8_0 => "q8_0",
            DecodingWeights::Q4_0 => "q4_0",
            DecodingWeights::Q4_1 => "q4_1",
            DecodingWeights::Q4_K => "q4_k",
        }
    }

    /// The quantized kind, for the quantized forms.
    pub fn quant_kind(self) -> Option<QuantKind> {
        match self {
            DecodingWeights::Fp32 | DecodingWeights::Bf16 => None,
            DecodingWeights::Q8_0 => Some(QuantKind::Q8_0),
            DecodingWeights::Q4_0 => Some(QuantKind::Q4_0),
            DecodingWeights::Q4_1 => Some(QuantKind::Q4_1),
            DecodingWeights::Q4_K => Some(QuantKind::Q4_K),
        }
    }

    /// Bytes a weight matrix takes per weight in this form (quantized blocks: 32 weights and
    /// their fp32 scale, and offset where the kind has one).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            DecodingWeights::Fp32 => 4.0,
            DecodingWeights::Bf16 => 2.0,
            quantized => quantized
                .quant_kind()
                .map_or(4.0, QuantKind::bytes_per_weight),
        }
    }
}

impl std::str::FromStr for DecodingWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(DecodingWeights::Fp32),
            "bf16" => Ok(DecodingWeights::Bf16),
            "q8_0" => Ok(DecodingWeights::Q8_0),
            "q4_0" => Ok(DecodingWeights::Q4_0),
            "q4_1" => Ok(DecodingWeights::Q4_1),
            "q4_k" => Ok(DecodingWeights::Q4_K),
            other => Err(format!(
                "unknown weights {other:?} (expected {})",
                DecodingWeights::NAMES
            )),
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
    /// Precision of the matrix products, the layers' and attention's (softmax and sums stay
    /// fp32; decoding's thin products and its attention over the KV cache stay fp32 too).
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

impl Kernels for Cpu {
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        positions: &[u32],
        wte: &[f32],
        wpe: Option<&[f32]>,
        d: Dims,
    ) {
        embedding::encoder_forward(out, tokens, positions, wte, wpe, d)
    }

    fn encoder_backward(
        &self,
        dwte: &mut [f32],
        dwpe: Option<&mut [f32]>,
        dout: &[f32],
        tokens: &[u32],
        positions: &[u32],
        d: Dims,
    ) {
        embedding::encoder_backward(dwte, dwpe, dout, tokens, positions, d)
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
        norm::layernorm_forward(out, mean, rstd, inp, w, b, c)
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
        norm::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, c)
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
        matmul::matmul_forward(self.matmul, out, inp, w, layout, bias, c_in, c_out)
    }

    fn matmul_backward(
        &self,
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
        matmul::matmul_backward(
            self.matmul,
            dinp,
            dw,
            dbias,
            dout,
            inp,
            w,
            layout,
            c_in,
            c_out,
        )
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        stats: &mut [f32],
        qkv: &[f32],
        positions: &[u32],
        d: Dims,
    ) {
        attention::attention_forward(out, stats, qkv, positions, d, self.matmul)
    }

    fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        stats: &[f32],
        positions: &[u32],
        d: Dims,
    ) {
        attention::attention_backward(dqkv, dout, qkv, stats, positions, d, self.matmul)
    }

    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        activation::gelu_forward(out, inp)
    }

    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        activation::gelu_backward(dinp, inp, dout)
    }

    fn swiglu_forward(&self, out: &mut [f32], inp: &[f32], h: usize) {
        activation::swiglu_forward(out, inp, h);
    }

    fn swiglu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], h: usize) {
        activation::swiglu_backward(dinp, inp, dout, h);
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
        norm::rmsnorm_forward(out, rstd, inp, w, eps, c);
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
        norm::rmsnorm_backward(dinp, dw, dout, inp, w, rstd, c);
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
        rope::rope(x, width, heads, positions, table, inverse);
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
        loss::cross_entropy(logits, losses, targets, vocab, padded, grad_scale)
    }

    fn sum_squares(&self, x: &[f32]) -> f64 {
        optimizer::sum_squares(x)
    }

    fn scale(&self, x: &mut [f32], factor: f32) {
        optimizer::scale(x, factor)
    }

    fn adamw(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW) {
        optimizer::adamw(params, grads, m, v, h)
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

/// Runs `body` on this thread's buffer `key` grown to at least `len` elements (its first
/// `len`), or on a fresh one when the buffer is in use (a rayon task run while this thread
/// waits inside another): repeated products reuse their pages instead of faulting in new ones.
pub(crate) fn with_thread_buffer<T: Clone + Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
    body: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, T::default());
            }
            body(&mut buffer[..len])
        }
        Err(_) => body(&mut vec![T::default(); len]),
    })
}
