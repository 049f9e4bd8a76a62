//! The GPT-2 model over flat buffers: parameters, gradients and activations each live in one
//! allocation; forward and backward call the [`Kernels`].

use std::ops::Range;
use std::sync::{RwLock, RwLockReadGuard};

use rayon::prelude::*;

use crate::config::{Init, Mlp, ModelConfig, Norm, ParamLayout, Positions};
use crate::frozen::{release_pages, FrozenMatrix};
use crate::kernels::{
    AdamW, Cpu, Dims, Kernels, MatmulPrecision, RopeTable, WeightLayout, SKINNY_ROWS,
};
use crate::lora::{Lora, LoraPass, Site};
use crate::rng::Rng;
use crate::{EngineError, Result};

/// Activations kept from the forward pass for the backward pass, sized for (batch, seq).
/// Per-layer buffers hold every layer side by side, `[layer][row][width]`.
#[derive(Debug, Default)]
struct Activations {
    batch: usize,
    seq: usize,
    /// Layers whose activations are kept side by side: all of them, or one (recomputing).
    slots: usize,
    tokens: Vec<u32>,
    /// Position of every row (`row % seq`).
    positions: Vec<u32>,
    encoded: Vec<f32>,
    norm1: Vec<f32>,
    norm1_mean: Vec<f32>,
    norm1_rstd: Vec<f32>,
    /// Queries, keys and values after rotary positions.
    qkv: Vec<f32>,
    atty: Vec<f32>,
    /// Attention's log-sum-exp per (layer, batch, head, row).
    attn_stats: Vec<f32>,
    residual2: Vec<f32>,
    norm2: Vec<f32>,
    norm2_mean: Vec<f32>,
    norm2_rstd: Vec<f32>,
    /// The MLP's first product (GELU's input, or SwiGLU's gate | up).
    mlp_pre: Vec<f32>,
    /// The MLP's activation, the input of its output projection.
    mlp_act: Vec<f32>,
    residual3: Vec<f32>,
    normf: Vec<f32>,
    normf_mean: Vec<f32>,
    normf_rstd: Vec<f32>,
    /// Logits; after a training forward pass, their gradients.
    logits: Vec<f32>,
    /// The adapters' dropout seed in the last forward pass (their masks).
    lora_dropout_seed: Option<u64>,
    losses: Vec<f32>,
    /// Matmul output before it is added to the residual stream.
    scratch: Vec<f32>,
}

/// Gradient buffers of one layer, reused for every layer during backward.
#[derive(Debug, Default)]
struct GradScratch {
    residual: Vec<f32>,
    norm: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    mlp_pre: Vec<f32>,
    mlp_act: Vec<f32>,
}

/// Widths of the per-row buffers of one block.
#[derive(Debug, Clone, Copy)]
struct Widths {
    c: usize,
    qkv: usize,
    q: usize,
    mlp_in: usize,
    hidden: usize,
}

impl Widths {
    fn of(config: &ModelConfig) -> Widths {
        Widths {
            c: config.n_embd,
            qkv: config.qkv_width(),
            q: config.q_width(),
            mlp_in: config.mlp_in_width(),
            hidden: config.mlp_hidden(),
        }
    }

    /// Floats of one row's saved activations in one layer (norm statistics included).
    fn per_row(&self) -> usize {
        let Widths {
            c,
            qkv,
            q,
            mlp_in,
            hidden,
        } = *self;
        c + 2 + qkv + q + c + c + 2 + mlp_in + hidden + c
    }
}

/// Positions of the rotary table a model starts with (it grows when a sequence goes further).
const ROPE_POSITIONS: usize = 4096;

/// Bytes of activation memory for (batch, seq), for estimating before allocating.
pub fn activation_bytes(config: &ModelConfig, batch: usize, seq: usize) -> usize {
    let (l, bt) = (config.n_layer, batch * seq);
    let w = Widths::of(config);
    let per_layer = bt * w.per_row() + batch * config.n_head * seq * seq;
    let floats =
        bt * w.c + l * per_layer + bt * (w.c + 2) + bt * config.padded_vocab() + bt + bt * w.c;
    let scratch = bt * (w.c + w.c + w.qkv + w.q + w.mlp_in + w.hidden);
    (floats + scratch) * 4
}

/// The buffers one block's forward pass reads and writes, for some number of rows. Training
/// passes slices of its saved activations; decoding passes short-lived buffers.
pub(crate) struct BlockBuffers<'a> {
    pub input: &'a [f32],
    pub norm1: &'a mut [f32],
    pub mean1: &'a mut [f32],
    pub rstd1: &'a mut [f32],
    pub qkv: &'a mut [f32],
    pub atty: &'a mut [f32],
    pub residual2: &'a mut [f32],
    pub norm2: &'a mut [f32],
    pub mean2: &'a mut [f32],
    pub rstd2: &'a mut [f32],
    pub mlp_pre: &'a mut [f32],
    pub mlp_act: &'a mut [f32],
    pub output: &'a mut [f32],
    pub scratch: &'a mut [f32],
}

pub struct Gpt<K: Kernels = Cpu> {
    pub config: ModelConfig,
    pub layout: ParamLayout,
    /// In the model files' layout until [`Gpt::transpose_for_decoding`]; read it through
    /// [`Gpt::params`] (which refuses a model laid out for decoding) or
    /// [`Gpt::decoding_weights`].
    pub(crate) params: Vec<f32>,
    pub grads: Vec<f32>,
    pub(crate) kernels: K,
    /// How the layers' matrices are stored now: as in the model's files (`InOut` for GPT-2,
    /// `OutIn` for the Llama family), or `OutIn` after [`Gpt::transpose_for_decoding`].
    pub(crate) matrices: WeightLayout,
    /// Matrices that never change again, in a compact form, keyed by where each starts in
    /// `params` (whose fp32 copy of them is released, reading 0): a LoRA run's frozen base
    /// ([`Gpt::freeze_base`]), or a decoding model's weights ([`Gpt::use_compact_weights`],
    /// [`Gpt::set_compact_matrices`]).
    frozen_base: std::collections::HashMap<usize, FrozenMatrix>,
    /// Rotary cosines and sines (rotary models only), for the positions used so far: grown on
    /// demand up to the context, so a 128k-position model does not build a 128k table to
    /// answer a short prompt.
    rope: Option<RwLock<RopeTable>>,
    /// Set by [`Gpt::transpose_for_decoding`]: the model only generates from now on.
    decoding_only: bool,
    /// Ids generation may pick: the tokenizer's vocabulary, which can be smaller than the
    /// embedding (Qwen2.5 pads its embedding beyond its tokenizer).
    sampling_vocab: usize,
    acts: Activations,
    scratch: GradScratch,
    /// LoRA adapters on the layers' products: while set, the base is frozen (no gradients
    /// for it) and training updates the adapters only.
    pub(crate) lora: Option<Lora>,
    /// Seed of the adapters' dropout masks for the next training forward pass.
    lora_seed: u64,
    /// Keep one layer's activations and recompute each layer's in the backward pass
    /// ([`Gpt::set_recompute`]).
    recompute: bool,
    /// Adapters a server decodes with, chosen per sequence ([`crate::infer::KvCache`]), kept
    /// apart from the weights so that sequences with different adapters share a batch.
    pub(crate) served_adapters: Vec<Lora>,
    /// Whether the last forward pass left logit gradients for a backward pass.
    ready_for_backward: bool,
    /// What the logits buffer holds after the last forward pass: logits, or (a training pass)
    /// their gradients, written in place.
    logits_are_gradients: bool,
}

fn two_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start, "ranges must be ordered and disjoint");
    let (left, right) = buf.split_at_mut(b.start);
    (&mut left[a], &mut right[..b.end - b.start])
}

/// A weight's gradient and its bias's (which lies after it in the buffer), both mutable; none
/// for a frozen base.
fn weight_and_bias(
    buf: &mut [f32],
    frozen: bool,
    w: Range<usize>,
    b: Option<Range<usize>>,
) -> (Option<&mut [f32]>, Option<&mut [f32]>) {
    match b {
        _ if frozen => (None, None),
        Some(b) => {
            let (w, b) = two_mut(buf, w, b);
            (Some(w), Some(b))
        }
        None => (Some(&mut buf[w]), None),
    }
}

/// A model's rotary table, grown first (to the next power of two, at most the context) when
/// `positions` go past it; `None` for models without rotary positions. A function of the
/// fields, not of the model, so the backward pass can hold it beside its mutable gradients.
fn rope_table<'a>(
    lock: &'a Option<RwLock<RopeTable>>,
    config: &ModelConfig,
    positions: &[u32],
) -> Option<RwLockReadGuard<'a, RopeTable>> {
    let lock = lock.as_ref()?;
    let needed = positions.iter().max().map_or(0, |&p| p as usize + 1);
    if lock.read().unwrap_or_else(|e| e.into_inner()).len() < needed {
        let Positions::Rope(rope) = config.block.positions else {
            unreachable!("a rotary table belongs to a rotary model")
        };
        let mut table = lock.write().unwrap_or_else(|e| e.into_inner());
        if table.len() < needed {
            let positions = needed.next_power_of_two().min(config.context).max(needed);
            *table = RopeTable::new(&rope, config.head_dim(), positions);
        }
    }
    Some(lock.read().unwrap_or_else(|e| e.into_inner()))
}

/// Most rows a decoding model's quantized product reads through the thin kernels where the
/// integer wide form exists: from 12 rows on the wide one was faster (Zen 4, batched decoding,
/// tokens/s at 16 sequences: Q8_0 560-600 against 440-500, Q4_0 590-710 against 495-531).
const THIN_BEFORE_WIDE_ROWS: usize = 8;

/// Runs `f` on the layer matrix at `w` as the products read it, with its layout: a compact
/// frozen base's dequantized (`[out, in]`), else the parameters in `layout`.
fn with_matrix<R>(
    frozen_base: &std::collections::HashMap<usize, FrozenMatrix>,
    params: &[f32],
    layout: WeightLayout,
    w: &Range<usize>,
    f: impl FnOnce(&[f32], WeightLayout) -> R,
) -> R {
    match frozen_base.get(&w.start) {
        Some(m) => m.with_dequantized(|weights| f(weights, WeightLayout::OutIn)),
        None => f(&params[w.clone()], layout),
    }
}

/// `w[rows, cols]` transposed to `[cols, rows]`.
fn transposed(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    t.par_chunks_mut(rows).enumerate().for_each(|(j, out_row)| {
        for (i, x) in out_row.iter_mut().enumerate() {
            *x = w[i * cols + j];
        }
    });
    t
}

/// `buf[i·len..(i+1)·len]`.
fn nth(buf: &[f32], i: usize, len: usize) -> &[f32] {
    &buf[i * len..(i + 1) * len]
}

fn nth_mut(buf: &mut [f32], i: usize, len: usize) -> &mut [f32] {
    &mut buf[i * len..(i + 1) * len]
}

impl Gpt<Cpu> {
    /// A model with all parameters zero (load or initialize them next).
    pub fn new(config: ModelConfig) -> Result<Self> {
        Self::with_kernels(config, Cpu::FP32)
    }

    /// Sets the precision of the layers' matrix products (fails where the CPU lacks it).
    pub fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()> {
        self.kernels = Cpu::with_precision(precision)?;
        Ok(())
    }
}

impl<K: Kernels> Gpt<K> {
    pub fn with_kernels(config: ModelConfig, kernels: K) -> Result<Self> {
        config.validate()?;
        let layout = ParamLayout::new(&config);
        let rope = match config.block.positions {
            Positions::Rope(rope) => Some(RwLock::new(RopeTable::new(
                &rope,
                config.head_dim(),
                config.context.min(ROPE_POSITIONS),
            ))),
            Positions::Learned => None,
        };
        Ok(Self {
            params: vec![0.0; layout.total],
            grads: Vec::new(),
            matrices: layout.matrices,
            layout,
            config,
            kernels,
            acts: Activations::default(),
            scratch: GradScratch::default(),
            ready_for_backward: false,
            logits_are_gradients: false,
            frozen_base: std::collections::HashMap::new(),
            lora: None,
            lora_seed: 0,
            recompute: false,
            served_adapters: Vec::new(),
            rope,
            decoding_only: false,
            sampling_vocab: config.vocab_size,
        })
    }

    /// Initialization for pre-training from scratch: matrices N(0, 0.02), residual
    /// projections N(0, 0.02/√(2L)), biases 0, norm weights 1; padded vocabulary rows stay 0.
    pub fn init_random(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let vocab = self.config.vocab_size;
        for spec in &self.layout.tensors {
            let data = &mut self.params[spec.range.clone()];
            let live = spec.live_len(vocab);
            match spec.init {
                Init::Zeros => data.fill(0.0),
                Init::Ones => data.fill(1.0),
                Init::Normal { std } => {
                    for x in &mut data[..live] {
                        *x = rng.normal() * std;
                    }
                    data[live..].fill(0.0);
                }
            }
        }
    }

    /// Stores the layers' matrices as `[out, in]`, so decoding reads every weight matrix with
    /// contiguous dot products (its fastest access; the `[in, out]` files' order reads at about
    /// two thirds of the rate). For models that only generate: training, saving and growing the
    /// vocabulary refuse a transposed model. Idempotent; Llama-family matrices are `[out, in]`
    /// already.
    pub fn transpose_for_decoding(&mut self) {
        self.decoding_only = true;
        if self.matrices == WeightLayout::OutIn {
            return;
        }
        let matrices: Vec<(Range<usize>, usize, usize)> = self
            .layout
            .tensors
            .iter()
            .filter(|spec| spec.matrix == Some(WeightLayout::InOut))
            // A frozen base's stored matrices are [out, in] already.
            .filter(|spec| !self.frozen_base.contains_key(&spec.range.start))
            .map(|spec| (spec.range.clone(), spec.shape[0], spec.shape[1]))
            .collect();
        for (range, rows, cols) in matrices {
            let t = transposed(&self.params[range.clone()], rows, cols);
            self.params[range].copy_from_slice(&t);
        }
        self.matrices = WeightLayout::OutIn;
    }

    /// Decodes from compact weights: every layer matrix and the output head becomes `weights`
    /// (bf16: each weight rounded to nearest even; a quantized kind: ggml's reference
    /// quantizer, Q4_K falling back to Q4_1 for rows that are not whole 256-weight blocks; a
    /// matrix whose rows are not whole 32-weight blocks stays fp32), which decoding's thin
    /// products read, and prefill in integers where the CPU can or else dequantized on the fly;
    /// their fp32 memory goes back to the system. Transposes for decoding first. A model with compact weights already (a frozen
    /// base, or a GGUF file's blocks) keeps them.
    pub fn use_compact_weights(&mut self, weights: crate::kernels::DecodingWeights) {
        use crate::kernels::DecodingWeights;
        self.transpose_for_decoding();
        if weights == DecodingWeights::Fp32 || !self.frozen_base.is_empty() {
            return;
        }
        let mut matrices = self.layer_matrices();
        matrices.push((self.layout.head_weights(), self.config.n_embd));
        let mut stored = std::collections::HashMap::new();
        for (range, c_in) in &matrices {
            let c_out = range.len() / c_in;
            let w = &self.params[range.clone()];
            let m = FrozenMatrix::new(weights, w, *c_in, c_out).or_else(|| {
                (weights == DecodingWeights::Q4_K)
                    .then(|| FrozenMatrix::new(DecodingWeights::Q4_1, w, *c_in, c_out))
                    .flatten()
            });
            if let Some(m) = m {
                stored.insert(range.start, m);
            }
        }
        for (range, _) in matrices {
            if stored.contains_key(&range.start) {
                release_pages(&mut self.params[range]);
            }
        }
        self.frozen_base = stored;
    }

    /// Takes `matrices` (keyed by where each starts in `params`, each `[out, in]`) as the
    /// model's weights for decoding, e.g. a quantized GGUF file's blocks as they are; their
    /// place in `params` is expected never to have been written (it is released anyway).
    /// Transposes the rest for decoding.
    pub(crate) fn set_compact_matrices(
        &mut self,
        matrices: std::collections::HashMap<usize, FrozenMatrix>,
    ) -> Result<()> {
        let mut products = self.layer_matrices();
        products.push((self.layout.head_weights(), self.config.n_embd));
        products.push((self.layout.wte.clone(), self.config.n_embd));
        self.take_compact_matrices(matrices, &products)?;
        self.transpose_for_decoding();
        Ok(())
    }

    /// Takes `matrices` (keyed by where each starts in `params`, each `[out, in]`, e.g. a
    /// quantized GGUF file's blocks as they are) as the frozen base's layer matrices, in place
    /// of parameters expected never to have been written (they are released anyway). From now
    /// on the model trains adapters only (put them on with [`Gpt::set_lora`]): its base can no
    /// longer be read, saved or merged into, as after [`Gpt::freeze_base`].
    pub(crate) fn set_frozen_base(
        &mut self,
        matrices: std::collections::HashMap<usize, FrozenMatrix>,
    ) -> Result<()> {
        self.check_training_layout()?;
        if !self.frozen_base.is_empty() {
            return Err(EngineError::Config(
                "the base is stored compactly already".into(),
            ));
        }
        let products = self.layer_matrices();
        self.take_compact_matrices(matrices, &products)?;
        Ok(())
    }

    /// Stores `matrices` as the compact form of some of `products` (their ranges in `params`
    /// and input widths) and releases those parameters' pages; returns the bytes released.
    fn take_compact_matrices(
        &mut self,
        matrices: std::collections::HashMap<usize, FrozenMatrix>,
        products: &[(Range<usize>, usize)],
    ) -> Result<usize> {
        for (&start, m) in &matrices {
            let fits = products.iter().any(|(range, c_in)| {
                range.start == start && *c_in == m.c_in() && range.len() >= m.c_in() * m.c_out()
            });
            if !fits {
                return Err(EngineError::Shape(format!(
                    "a compact matrix of {}x{} at {start} is not one of the model's matrices",
                    m.c_out(),
                    m.c_in()
                )));
            }
        }
        let released = matrices
            .iter()
            .map(|(&start, m)| release_pages(&mut self.params[start..start + m.c_in() * m.c_out()]))
            .sum();
        self.frozen_base = matrices;
        Ok(released)
    }

    /// The token embedding's row `token` into `out` (`n_embd` values), from wherever the
    /// embedding lives (fp32 parameters or a compact matrix).
    pub(crate) fn embedding_row(&self, token: usize, out: &mut [f32]) {
        let (start, c) = (self.layout.wte.start, self.config.n_embd);
        match self.frozen_base.get(&start) {
            Some(m) => m.dequantize_row(token, out),
            None => out.copy_from_slice(&self.params[start + token * c..][..c]),
        }
    }

    /// The layers' matrices as the products read them (fused q/k/v and gate/up included), with
    /// their input widths.
    pub fn layer_matrices(&self) -> Vec<(Range<usize>, usize)> {
        let (c, cfg) = (self.config.n_embd, &self.config);
        self.layout
            .layers
            .iter()
            .flat_map(|l| {
                [
                    (l.qkv_w.clone(), c),
                    (l.attn_out_w.clone(), cfg.q_width()),
                    (l.mlp_in_w.clone(), c),
                    (l.mlp_out_w.clone(), cfg.mlp_hidden()),
                ]
            })
            .collect()
    }

    /// Stores the frozen base's layer matrices as `weights` (bf16 or a quantized kind: QLoRA) and
    /// gives their fp32 memory back to the system; returns the bytes given back. Products read
    /// the stored matrices, dequantized on the fly (decoding reads them directly). Only for a
    /// model with LoRA adapters, whose base never changes again: the base's parameters can no
    /// longer be read, saved or merged into. Embeddings, norms, biases and the output head stay
    /// fp32. Fp32 keeps the model as it is.
    pub fn freeze_base(&mut self, weights: crate::kernels::DecodingWeights) -> Result<usize> {
        if weights == crate::kernels::DecodingWeights::Fp32 {
            return Ok(0);
        }
        if self.lora.is_none() {
            return Err(EngineError::Config(
                "only a model with LoRA adapters can store its frozen base compactly".into(),
            ));
        }
        self.check_training_layout()?;
        if !self.frozen_base.is_empty() {
            return Err(EngineError::Config(
                "the base is stored compactly already".into(),
            ));
        }
        let matrices = self.layer_matrices();
        let mut stored = std::collections::HashMap::new();
        for (range, c_in) in &matrices {
            let (range, c_in) = (range.clone(), *c_in);
            let c_out = range.len() / c_in;
            let w = &self.params[range.clone()];
            let out_in = match self.matrices {
                WeightLayout::InOut => std::borrow::Cow::Owned(transposed(w, c_in, c_out)),
                WeightLayout::OutIn => std::borrow::Cow::Borrowed(w),
            };
            let m = FrozenMatrix::new(weights, &out_in, c_in, c_out).ok_or_else(|| {
                EngineError::Config(format!(
                    "cannot store the base as {}: a matrix's rows of {c_in} weights are not \
                     whole blocks of {}",
                    weights.name(),
                    weights.quant_kind().map_or(32, |k| k.row_multiple())
                ))
            })?;
            stored.insert(range.start, m);
        }
        self.take_compact_matrices(stored, &matrices)
    }

    /// Bytes of the compactly stored matrices (a frozen base's, or a decoding model's).
    pub fn frozen_base_bytes(&self) -> usize {
        self.frozen_base.values().map(FrozenMatrix::bytes).sum()
    }

    /// The forms the weights are stored in: `fp32` and those of the compact matrices
    /// (`q8_0`, `q4_k+q8_0` ...), largest share of the parameters first.
    pub fn weight_forms(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        let compact: usize = self
            .frozen_base
            .values()
            .map(|m| m.c_in() * m.c_out())
            .sum();
        let mut add = |form: &'static str, n: usize| match counts.iter_mut().find(|c| c.0 == form) {
            Some(c) => c.1 += n,
            None => counts.push((form, n)),
        };
        for m in self.frozen_base.values() {
            let forms = m.forms();
            for form in &forms {
                add(form, m.c_in() * m.c_out() / forms.len());
            }
        }
        // Norms, biases and embeddings beside compact matrices are not worth naming.
        if compact < self.params.len() / 2 {
            add("fp32", self.params.len() - compact);
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        counts.iter().map(|c| c.0).collect::<Vec<_>>().join("+")
    }

    /// Ranges of `params` a decoding step reads in fp32: all but the compact matrices and the
    /// embeddings (of which it reads a row a token) other than a tied head.
    fn fp32_ranges_decoding_reads(&self) -> Vec<Range<usize>> {
        let lay = &self.layout;
        let mut skip: Vec<Range<usize>> = self
            .frozen_base
            .iter()
            .map(|(&start, m)| start..start + m.c_in() * m.c_out())
            .collect();
        if lay.head.is_some() {
            skip.push(lay.wte.clone());
        }
        skip.extend(lay.wpe.clone());
        skip.sort_by_key(|r| r.start);
        let mut ranges = Vec::new();
        let mut at = 0;
        for r in skip {
            if r.start > at {
                ranges.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < self.params.len() {
            ranges.push(at..self.params.len());
        }
        ranges
    }

    /// Bytes of parameters a decoding step reads: every compact matrix as stored, every other
    /// parameter in fp32, but of embeddings only the head (a row a token is not counted).
    pub fn decoding_weight_bytes(&self) -> usize {
        let compact: usize = self.frozen_base.values().map(FrozenMatrix::bytes).sum();
        let fp32: usize = self
            .fp32_ranges_decoding_reads()
            .iter()
            .map(|r| 4 * r.len())
            .sum();
        compact + fp32
    }

    /// Generation picks only ids below `vocab` (a tokenizer smaller than the embedding: its
    /// extra rows are never generated). Fails outside `1..=vocab_size`.
    pub fn limit_sampling_to(&mut self, vocab: usize) -> Result<()> {
        if vocab == 0 || vocab > self.config.vocab_size {
            return Err(EngineError::Config(format!(
                "cannot sample from {vocab} ids: the model's vocabulary is {}",
                self.config.vocab_size
            )));
        }
        self.sampling_vocab = vocab;
        Ok(())
    }

    /// Ids generation may pick (`0..sampling_vocab`).
    pub fn sampling_vocab(&self) -> usize {
        self.sampling_vocab
    }

    /// Reads every weight a decoding step reads ([`Self::decoding_weight_bytes`] of them) once,
    /// as fast as memory allows, on all threads: timing it measures the read bandwidth of the
    /// very memory decoding streams, the denominator of its bandwidth bound.
    pub fn stream_decoding_weights(&self) -> u32 {
        const CHUNK: usize = 1 << 16;
        let compact = self
            .frozen_base
            .values()
            .map(FrozenMatrix::stream)
            .fold(0u32, u32::wrapping_add);
        self.fp32_ranges_decoding_reads()
            .into_iter()
            .map(|r| {
                self.params[r]
                    .par_chunks(CHUNK)
                    .map(crate::kernels::streaming_read_f32)
                    .reduce(|| 0, u32::wrapping_add)
            })
            .fold(compact, u32::wrapping_add)
    }

    /// Fails for a model prepared for decoding only.
    pub(crate) fn check_training_layout(&self) -> Result<()> {
        if self.decoding_only {
            return Err(EngineError::Config(
                "this model was transposed for decoding; load it again to train, save or grow it"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.config.num_parameters()
    }

    /// Parameters training updates: the adapters' with adapters, else all.
    pub fn trainable_parameters(&self) -> usize {
        self.lora
            .as_ref()
            .map_or(self.num_parameters(), Lora::num_parameters)
    }

    /// Puts adapters on the model (checked against its shape) or takes them off: with
    /// adapters, the base is frozen and training updates the adapters alone; the base's
    /// gradients are dropped.
    pub fn set_lora(&mut self, lora: Option<Lora>) -> Result<()> {
        if lora.is_none() && !self.frozen_base.is_empty() {
            return Err(EngineError::Config(
                "a base stored compactly trains adapters only: its adapters stay".into(),
            ));
        }
        if let Some(lora) = &lora {
            lora.check_fits(&self.config)?;
            self.grads = Vec::new();
        }
        self.lora = lora;
        Ok(())
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Adds adapters that decoding applies to the sequences that ask for them (see
    /// [`crate::infer::KvCache::set_adapter`]), unmerged, so one base serves several adapters
    /// in one batch; returns the adapter's index.
    pub fn add_served_adapter(&mut self, mut lora: Lora) -> Result<usize> {
        lora.check_fits(&self.config)?;
        lora.grads = Vec::new();
        self.served_adapters.push(lora);
        Ok(self.served_adapters.len() - 1)
    }

    /// Seeds the adapters' dropout masks of the next training forward pass (one seed per
    /// micro-batch makes runs, and resumed runs, repeatable).
    pub fn set_lora_dropout_seed(&mut self, seed: u64) {
        self.lora_seed = seed;
    }

    /// With `on`, training keeps only the layers' inputs (and one layer's activations) and the
    /// backward pass runs each layer's forward again before its backward: about one more
    /// forward pass of compute for activation memory of one layer instead of all of them (long
    /// contexts). Gradients are the same bits either way.
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// Adds the adapters into the base weights (PEFT's `merge_and_unload`) and removes them.
    pub fn merge_lora(&mut self) -> Result<()> {
        self.check_training_layout()?;
        self.files_layout()?;
        if let Some(lora) = self.lora.take() {
            lora.merge_into(&self.config, &mut self.params, self.matrices);
        }
        Ok(())
    }

    /// A copy with a larger vocabulary: existing parameters are kept and each new embedding
    /// (and output head) row starts at the mean of the existing rows (a neutral token rather
    /// than noise).
    pub fn grow_vocab(&self, vocab_size: usize) -> Result<Gpt<Cpu>> {
        self.check_training_layout()?;
        self.files_layout()?;
        if vocab_size < self.config.vocab_size {
            return Err(EngineError::Config(format!(
                "cannot shrink the vocabulary from {} to {vocab_size}",
                self.config.vocab_size
            )));
        }
        let mut config = self.config;
        config.vocab_size = vocab_size;
        let mut grown = Gpt::new(config)?;
        let c = config.n_embd;
        for (old, new) in self.layout.tensors.iter().zip(grown.layout.tensors.clone()) {
            if old.vocab_rows {
                let live = self.config.vocab_size * c;
                let src = &self.params[old.range.start..old.range.start + live];
                let dst = &mut grown.params[new.range.clone()];
                dst[..live].copy_from_slice(src);
                let mut mean = vec![0f64; c];
                for row in src.chunks(c) {
                    for (m, &x) in mean.iter_mut().zip(row) {
                        *m += f64::from(x);
                    }
                }
                for row in dst[live..vocab_size * c].chunks_mut(c) {
                    for (x, m) in row.iter_mut().zip(&mean) {
                        *x = (*m / self.config.vocab_size as f64) as f32;
                    }
                }
            } else {
                grown.params[new.range.clone()].copy_from_slice(&self.params[old.range.clone()]);
            }
        }
        Ok(grown)
    }

    /// Sizes the activation buffers for (batch, seq). Buffers keep their capacity, so batches
    /// of varying length (fine-tuning pads each batch to its longest example) reuse memory
    /// instead of reallocating; every forward pass overwrites what it reads.
    fn ensure_activations(&mut self, batch: usize, seq: usize) {
        let slots = if self.recompute {
            1
        } else {
            self.config.n_layer
        };
        let a = &mut self.acts;
        if a.batch == batch && a.seq == seq && a.slots == slots {
            return;
        }
        let (l, bt) = (slots, batch * seq);
        let w = Widths::of(&self.config);
        let nh = self.config.n_head;
        let v = self.config.padded_vocab();
        let size = |buf: &mut Vec<f32>, n: usize| buf.resize(n, 0.0);
        a.batch = batch;
        a.seq = seq;
        a.slots = slots;
        a.tokens.resize(bt, 0);
        a.positions = (0..bt).map(|r| (r % seq) as u32).collect();
        size(&mut a.encoded, bt * w.c);
        for buf in [&mut a.norm1, &mut a.residual2, &mut a.norm2] {
            size(buf, l * bt * w.c);
        }
        // Every layer's output stays: it is the next layer's input, from which a recomputing
        // backward pass runs the layer again.
        size(&mut a.residual3, self.config.n_layer * bt * w.c);
        for buf in [
            &mut a.norm1_mean,
            &mut a.norm1_rstd,
            &mut a.norm2_mean,
            &mut a.norm2_rstd,
        ] {
            size(buf, l * bt);
        }
        size(&mut a.qkv, l * bt * w.qkv);
        size(&mut a.atty, l * bt * w.q);
        size(&mut a.attn_stats, l * batch * nh * seq);
        size(&mut a.mlp_pre, l * bt * w.mlp_in);
        size(&mut a.mlp_act, l * bt * w.hidden);
        size(&mut a.normf, bt * w.c);
        size(&mut a.normf_mean, bt);
        size(&mut a.normf_rstd, bt);
        size(&mut a.logits, bt * v);
        size(&mut a.losses, bt);
        size(&mut a.scratch, bt * w.c);
        let g = &mut self.scratch;
        size(&mut g.residual, bt * w.c);
        size(&mut g.norm, bt * w.c);
        size(&mut g.qkv, bt * w.qkv);
        size(&mut g.atty, bt * w.q);
        size(&mut g.mlp_pre, bt * w.mlp_in);
        size(&mut g.mlp_act, bt * w.hidden);
    }

    pub(crate) fn dims(&self, batch: usize, seq: usize) -> Dims {
        Dims {
            batch,
            seq,
            channels: self.config.n_embd,
            heads: self.config.n_head,
            kv_heads: self.config.kv_heads(),
            head_dim: self.config.head_dim(),
        }
    }

    /// A product with one of the parameter matrices (`weights` indexes `params`): thin ones read
    /// the bf16 copy when the model has one ([`Gpt::use_bf16_weights`]), all others go through
    /// the kernels.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn product(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weights: Range<usize>,
        layout: WeightLayout,
        bias: Option<Range<usize>>,
        c_in: usize,
        c_out: usize,
        training: bool,
    ) {
        let bias = bias.map(|b| &self.params[b]);
        if let Some(m) = self.frozen_base.get(&weights.start) {
            // A training pass reads the matrices as its backward pass does: dequantized; so
            // does any pass of a model that trains (a frozen base's logits stay exactly those
            // of its dequantized weights). Decoding's few rows read the stored form through the
            // thin kernels, 16 rows a pass; a decoding model's wider products (a prompt, a
            // large batch) through the integer GEMM where the CPU has one, else dequantized.
            let rows = inp.len() / c_in;
            let integer_wide = self.decoding_only && m.has_integer_wide_form();
            let most = if integer_wide {
                THIN_BEFORE_WIDE_ROWS
            } else if self.decoding_only {
                4 * SKINNY_ROWS
            } else {
                SKINNY_ROWS
            };
            if !training && rows <= most {
                for (out, inp) in out
                    .chunks_mut(SKINNY_ROWS * c_out)
                    .zip(inp.chunks(SKINNY_ROWS * c_in))
                {
                    m.thin_product(out, inp, bias);
                }
                return;
            }
            if !training && integer_wide && m.wide_product(out, inp, bias) {
                return;
            }
        }
        with_matrix(
            &self.frozen_base,
            &self.params,
            layout,
            &weights,
            |w, layout| {
                self.kernels
                    .matmul_forward(out, inp, w, layout, bias, c_in, c_out)
            },
        );
    }

    /// The rotary table for `positions` (see [`rope_table`]).
    fn rope_table(&self, positions: &[u32]) -> Option<RwLockReadGuard<'_, RopeTable>> {
        rope_table(&self.rope, &self.config, positions)
    }

    /// The block's norm (layer or RMS) with the weights at `w` (and bias `b`).
    pub(crate) fn norm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &Range<usize>,
        b: &Option<Range<usize>>,
    ) {
        let (p, c) = (&self.params, self.config.n_embd);
        match self.config.block.norm {
            Norm::Layer => {
                let b = b.as_ref().expect("layer norm has a bias");
                self.kernels.layernorm_forward(
                    out,
                    mean,
                    rstd,
                    inp,
                    &p[w.clone()],
                    &p[b.clone()],
                    c,
                )
            }
            Norm::Rms { eps } => {
                self.kernels
                    .rmsnorm_forward(out, rstd, inp, &p[w.clone()], eps, c)
            }
        }
    }

    /// One transformer block on `positions.len()` rows, as its description says. `attend`
    /// turns the rows' queries, keys and values (rotated already) into attention's output:
    /// over the batch itself in training, over the KV cache in decoding.
    pub(crate) fn block_forward(
        &self,
        l: usize,
        buf: BlockBuffers<'_>,
        positions: &[u32],
        lora_pass: LoraPass<'_>,
        attend: &mut dyn FnMut(&mut [f32], &[f32]),
    ) {
        let k = &self.kernels;
        let lp = &self.layout.layers[l];
        let w = Widths::of(&self.config);
        // The adapters' terms join each product's output before anything reads it.
        let rows = positions.len();
        let training = lora_pass.dropout_seed.is_some();
        let adapt = |site: Site, out: &mut [f32], x: &[f32], width: usize| {
            if let Some(lora) = &self.lora {
                lora.forward(k, l, site, out, x, width, lora_pass);
            }
            // Served adapters: each run of rows that shares one.
            let per_row = lora_pass.row_adapters;
            if per_row.len() == rows && rows > 0 {
                let x_width = x.len() / rows;
                let mut start = 0;
                while start < rows {
                    let adapter = per_row[start];
                    let end = (start..rows)
                        .find(|&r| per_row[r] != adapter)
                        .unwrap_or(rows);
                    if let Some(a) = adapter {
                        self.served_adapters[a].forward(
                            k,
                            l,
                            site,
                            &mut out[start * width..end * width],
                            &x[start * x_width..end * x_width],
                            width,
                            LoraPass::TRAINING_OFF,
                        );
                    }
                    start = end;
                }
            }
        };
        self.norm_forward(
            buf.norm1,
            buf.mean1,
            buf.rstd1,
            buf.input,
            &lp.norm1_w,
            &lp.norm1_b,
        );
        self.product(
            buf.qkv,
            buf.norm1,
            lp.qkv_w.clone(),
            self.matrices,
            lp.qkv_b.clone(),
            w.c,
            w.qkv,
            training,
        );
        adapt(Site::Qkv, buf.qkv, buf.norm1, w.qkv);
        if let Some(table) = self.rope_table(positions) {
            let heads = self.config.n_head + self.config.kv_heads();
            k.rope(buf.qkv, w.qkv, heads, positions, &table, false);
        }
        attend(buf.atty, buf.qkv);
        self.product(
            buf.scratch,
            buf.atty,
            lp.attn_out_w.clone(),
            self.matrices,
            lp.attn_out_b.clone(),
            w.q,
            w.c,
            training,
        );
        adapt(Site::AttnOut, buf.scratch, buf.atty, w.c);
        k.add(buf.residual2, buf.input, buf.scratch);
        self.norm_forward(
            buf.norm2,
            buf.mean2,
            buf.rstd2,
            buf.residual2,
            &lp.norm2_w,
            &lp.norm2_b,
        );
        self.product(
            buf.mlp_pre,
            buf.norm2,
            lp.mlp_in_w.clone(),
            self.matrices,
            lp.mlp_in_b.clone(),
            w.c,
            w.mlp_in,
            training,
        );
        adapt(Site::MlpIn, buf.mlp_pre, buf.norm2, w.mlp_in);
        match self.config.block.mlp {
            Mlp::Gelu => k.gelu_forward(buf.mlp_act, buf.mlp_pre),
            Mlp::SwiGlu => k.swiglu_forward(buf.mlp_act, buf.mlp_pre, w.hidden),
        }
        self.product(
            buf.scratch,
            buf.mlp_act,
            lp.mlp_out_w.clone(),
            self.matrices,
            lp.mlp_out_b.clone(),
            w.hidden,
            w.c,
            training,
        );
        adapt(Site::MlpOut, buf.scratch, buf.mlp_act, w.c);
        k.add(buf.output, buf.residual2, buf.scratch);
    }

    /// Runs the model on `tokens[batch, seq]` and returns the summed loss over positions whose
    /// target is `Some` and their count. With `grad_scale`, the logits' gradients of
    /// `Σ loss · grad_scale` are kept for [`Gpt::backward`] (pass 1 / trained tokens of the
    /// whole optimizer step for a token-weighted mean).
    pub fn forward(
        &mut self,
        tokens: &[u32],
        targets: &[Option<u32>],
        batch: usize,
        seq: usize,
        grad_scale: Option<f32>,
    ) -> Result<(f64, usize)> {
        self.forward_packed(tokens, targets, None, batch, seq, grad_scale)
    }

    /// [`Gpt::forward`] on rows that may pack several examples: `positions` (one per token)
    /// restart at 0 where an example starts, and attention never reaches back past its
    /// example's start (each position counts the rows of its example before it). `None`: one
    /// sequence per row, positions `0..seq`.
    pub fn forward_packed(
        &mut self,
        tokens: &[u32],
        targets: &[Option<u32>],
        positions: Option<&[u32]>,
        batch: usize,
        seq: usize,
        grad_scale: Option<f32>,
    ) -> Result<(f64, usize)> {
        let lay = &self.layout;
        if [lay.wte.start, lay.head_weights().start]
            .iter()
            .any(|start| self.frozen_base.contains_key(start))
        {
            return Err(EngineError::Config(
                "the embedding or output head is stored compactly for decoding: this model \
                 decodes (forward_cached) only"
                    .into(),
            ));
        }
        if seq == 0 || batch == 0 || seq > self.config.context {
            return Err(EngineError::Shape(format!(
                "sequence length {seq} must be in 1..={} (the model's context) and batch {batch} positive",
                self.config.context
            )));
        }
        if tokens.len() != batch * seq || targets.len() != batch * seq {
            return Err(EngineError::Shape(format!(
                "expected {} tokens and targets, got {} and {}",
                batch * seq,
                tokens.len(),
                targets.len()
            )));
        }
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens
            .iter()
            .chain(targets.iter().flatten())
            .find(|&&t| t as usize >= vocab)
        {
            return Err(EngineError::Shape(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        if let Some(positions) = positions {
            // Each row's positions count up from 0, restarting only where an example starts.
            let valid = positions.len() == batch * seq
                && positions.chunks(seq).all(|row| {
                    row[0] == 0 && row.windows(2).all(|p| p[1] == 0 || p[1] == p[0] + 1)
                });
            if !valid {
                return Err(EngineError::Shape(
                    "packed positions must be one per token, each row's counting up from 0 and \
                     restarting at 0 where an example starts"
                        .into(),
                ));
            }
        }
        self.ensure_activations(batch, seq);
        let mut a = std::mem::take(&mut self.acts);
        match positions {
            Some(positions) => a.positions.copy_from_slice(positions),
            None => {
                for (r, p) in a.positions.iter_mut().enumerate() {
                    *p = (r % seq) as u32;
                }
            }
        }
        let d = self.dims(batch, seq);
        let (bt, vp) = (d.rows(), self.config.padded_vocab());
        let w = Widths::of(&self.config);
        let k = &self.kernels;
        let p = &self.params;
        let lay = &self.layout;
        a.tokens.copy_from_slice(tokens);
        k.encoder_forward(
            &mut a.encoded,
            tokens,
            &a.positions,
            &p[lay.wte.clone()],
            lay.wpe.clone().map(|r| &p[r]),
            d,
        );
        // Adapters drop out only while training, with masks the backward pass regenerates.
        let lora_pass = LoraPass {
            dropout_seed: grad_scale.map(|_| self.lora_seed),
            row_adapters: &[],
        };
        a.lora_dropout_seed = lora_pass.dropout_seed;
        for l in 0..self.config.n_layer {
            self.layer_forward(&mut a, l, lora_pass, d);
        }
        let last = nth(&a.residual3, self.config.n_layer - 1, bt * w.c);
        self.norm_forward(
            &mut a.normf,
            &mut a.normf_mean,
            &mut a.normf_rstd,
            last,
            &lay.normf_w,
            &lay.normf_b,
        );
        k.matmul_forward(
            &mut a.logits,
            &a.normf,
            &p[lay.head_weights()],
            WeightLayout::OutIn,
            None,
            w.c,
            vp,
        );
        k.cross_entropy(&mut a.logits, &mut a.losses, targets, vocab, vp, grad_scale);
        let count = targets.iter().filter(|t| t.is_some()).count();
        let sum: f64 = a.losses.iter().map(|&x| f64::from(x)).sum();
        self.acts = a;
        self.ready_for_backward = grad_scale.is_some();
        self.logits_are_gradients = grad_scale.is_some();
        Ok((sum, count))
    }

    /// Per-position losses of the last forward pass (0 where the target was `None`).
    pub fn losses(&self) -> &[f32] {
        &self.acts.losses
    }

    /// Logits of the last forward pass, `[batch·seq, padded_vocab]`: only after a pass without
    /// `grad_scale` (a training pass overwrites them with their gradients).
    pub fn logits(&self) -> Result<&[f32]> {
        if self.logits_are_gradients {
            return Err(EngineError::Shape(
                "the last forward pass trained (grad_scale): its logits were replaced by their \
                 gradients; run forward without grad_scale to read logits"
                    .into(),
            ));
        }
        Ok(&self.acts.logits)
    }

    /// Gradients of the loss with respect to the logits, after a forward pass with
    /// `grad_scale`.
    pub fn logit_gradients(&self) -> Result<&[f32]> {
        if !self.logits_are_gradients {
            return Err(EngineError::Shape(
                "no logit gradients: the last forward pass ran without grad_scale".into(),
            ));
        }
        Ok(&self.acts.logits)
    }

    /// The parameters in the model files' layout (the tensors of [`Gpt::layout`]). Refused
    /// once [`Gpt::transpose_for_decoding`] or [`Gpt::use_bf16_weights`] has laid the model out
    /// for decoding, where matrices may be stored transposed.
    pub fn params(&self) -> Result<&[f32]> {
        self.files_layout()?;
        Ok(&self.params)
    }

    /// Mutable [`Gpt::params`].
    pub fn params_mut(&mut self) -> Result<&mut [f32]> {
        self.files_layout()?;
        Ok(&mut self.params)
    }

    /// The fp32 weights as decoding reads them (matrices `[out, in]` once laid out for
    /// decoding); for measuring and checking decoding, not for reading tensors by name.
    pub fn decoding_weights(&self) -> &[f32] {
        &self.params
    }

    /// [`Gpt::decoding_weights`] with the compact matrices' values (dequantized) in place:
    /// the fp32 model decoding computes with.
    pub fn dequantized_decoding_weights(&self) -> Vec<f32> {
        let mut values = self.params.clone();
        for (&start, m) in &self.frozen_base {
            let n = m.c_in() * m.c_out();
            m.with_dequantized(|w| values[start..start + n].copy_from_slice(w));
        }
        values
    }

    fn files_layout(&self) -> Result<()> {
        if !self.frozen_base.is_empty() {
            return Err(EngineError::Config(
                "the frozen base's layer matrices are stored compactly (QLoRA): its fp32 \
                 parameters are gone; load the base again to read, save or merge it"
                    .into(),
            ));
        }
        if self.decoding_only {
            return Err(EngineError::Shape(
                "the model is laid out for decoding (matrices transposed): its parameters no \
                 longer follow the files' layout"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Sets all gradients to zero (allocating them on first use): the adapters' only when the
    /// model has adapters.
    pub fn zero_grad(&mut self) {
        if let Some(lora) = &mut self.lora {
            lora.grads.clear();
            lora.grads.resize(lora.params.len(), 0.0);
            return;
        }
        if self.grads.len() != self.params.len() {
            self.grads = vec![0.0; self.params.len()];
        } else {
            self.grads.fill(0.0);
        }
    }

    /// Runs layer `l` on the output of the layer before (or the embeddings), keeping its
    /// activations in its slot (the only slot when recomputing).
    fn layer_forward(&self, a: &mut Activations, l: usize, lora_pass: LoraPass<'_>, d: Dims) {
        let w = Widths::of(&self.config);
        let (bt, stats_len) = (d.rows(), d.batch * d.heads * d.seq);
        let slot = if a.slots == 1 { 0 } else { l };
        let (done, rest) = a.residual3.split_at_mut(l * bt * w.c);
        let input: &[f32] = if l == 0 {
            &a.encoded
        } else {
            nth(done, l - 1, bt * w.c)
        };
        let stats = nth_mut(&mut a.attn_stats, slot, stats_len);
        let buffers = BlockBuffers {
            input,
            norm1: nth_mut(&mut a.norm1, slot, bt * w.c),
            mean1: nth_mut(&mut a.norm1_mean, slot, bt),
            rstd1: nth_mut(&mut a.norm1_rstd, slot, bt),
            qkv: nth_mut(&mut a.qkv, slot, bt * w.qkv),
            atty: nth_mut(&mut a.atty, slot, bt * w.q),
            residual2: nth_mut(&mut a.residual2, slot, bt * w.c),
            norm2: nth_mut(&mut a.norm2, slot, bt * w.c),
            mean2: nth_mut(&mut a.norm2_mean, slot, bt),
            rstd2: nth_mut(&mut a.norm2_rstd, slot, bt),
            mlp_pre: nth_mut(&mut a.mlp_pre, slot, bt * w.mlp_in),
            mlp_act: nth_mut(&mut a.mlp_act, slot, bt * w.hidden),
            output: &mut rest[..bt * w.c],
            scratch: &mut a.scratch,
        };
        let (k, positions) = (&self.kernels, &a.positions);
        self.block_forward(l, buffers, positions, lora_pass, &mut |y, qkv| {
            k.attention_forward(y, stats, qkv, positions, d)
        });
    }

    /// Accumulates the gradients of the last training forward pass into `grads`: the forward
    /// pass's description walked in reverse.
    pub fn backward(&mut self) -> Result<()> {
        if !self.ready_for_backward {
            return Err(EngineError::Shape(
                "backward needs a forward pass with grad_scale".into(),
            ));
        }
        self.check_training_layout()?;
        if self.lora.is_none() && !self.frozen_base.is_empty() {
            return Err(EngineError::Config(
                "the base's layer matrices are stored compactly (QLoRA): only LoRA adapters \
                 train on it"
                    .into(),
            ));
        }
        // With adapters the base is frozen: only the adapters' gradients are kept.
        let frozen = self.lora.is_some();
        if !frozen && self.grads.len() != self.params.len() {
            self.zero_grad();
        }
        self.ready_for_backward = false;
        let d = self.dims(self.acts.batch, self.acts.seq);
        let (bt, vp) = (d.rows(), self.config.padded_vocab());
        let w = Widths::of(&self.config);
        let k = &self.kernels;
        let p = &self.params;
        // Moved out for the pass so that a recomputing pass can run layers forward (`&self`).
        let mut grads = std::mem::take(&mut self.grads);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut acts = std::mem::take(&mut self.acts);
        let (g, s) = (&mut grads, &mut scratch);
        let lay = &self.layout;
        let a = &acts;
        let norm = self.config.block.norm;
        let c = w.c;
        let lora_pass = LoraPass {
            dropout_seed: a.lora_dropout_seed,
            row_adapters: &[],
        };
        // A frozen norm's weight gradients go to a scratch buffer that nothing reads.
        let mut frozen_norm = vec![0f32; if frozen { 2 * c } else { 0 }];
        // dinp += norm'(dout) for the norm with weights `nw` (and bias `nb`).
        let mut norm_backward = |g: &mut [f32],
                                 dinp: &mut [f32],
                                 dout: &[f32],
                                 inp: &[f32],
                                 nw: &Range<usize>,
                                 nb: &Option<Range<usize>>,
                                 mean: &[f32],
                                 rstd: &[f32]| match norm {
            Norm::Layer => {
                let nb = nb.clone().expect("layer norm has a bias");
                let (dw, db) = if frozen {
                    frozen_norm.split_at_mut(c)
                } else {
                    two_mut(g, nw.clone(), nb)
                };
                k.layernorm_backward(dinp, dw, db, dout, inp, &p[nw.clone()], mean, rstd, c);
            }
            Norm::Rms { .. } => {
                let dw = if frozen {
                    &mut frozen_norm[..c]
                } else {
                    &mut g[nw.clone()]
                };
                k.rmsnorm_backward(dinp, dw, dout, inp, &p[nw.clone()], rstd, c)
            }
        };

        // Output head and final norm.
        let head = lay.head_weights();
        k.matmul_backward(
            &mut s.norm,
            (!frozen).then(|| &mut g[head.clone()]),
            None,
            &a.logits,
            &a.normf,
            &p[head],
            WeightLayout::OutIn,
            c,
            vp,
        );
        s.residual.fill(0.0);
        let last = nth(&a.residual3, self.config.n_layer - 1, bt * c);
        norm_backward(
            g,
            &mut s.residual,
            &s.norm,
            last,
            &lay.normf_w,
            &lay.normf_b,
            &a.normf_mean,
            &a.normf_rstd,
        );
        let stats_len = d.batch * d.heads * d.seq;
        let frozen_base = &self.frozen_base;
        let matrices = self.matrices;
        for (l, lp) in lay.layers.iter().enumerate().rev() {
            if acts.slots == 1 {
                self.layer_forward(&mut acts, l, lora_pass, d);
            }
            let a = &acts;
            let rope = rope_table(&self.rope, &self.config, &a.positions);
            let mut lora = self.lora.as_mut();
            let slot = if a.slots == 1 { 0 } else { l };
            let rows = |width: usize| slot * bt * width..(slot + 1) * bt * width;
            let stat = slot * bt..(slot + 1) * bt;
            let residual_in: &[f32] = if l == 0 {
                &a.encoded
            } else {
                nth(&a.residual3, l - 1, bt * c)
            };
            // MLP: residual3 = residual2 + out(act(in(norm2(residual2)))).
            {
                let (dw, db) =
                    weight_and_bias(g, frozen, lp.mlp_out_w.clone(), lp.mlp_out_b.clone());
                with_matrix(frozen_base, p, matrices, &lp.mlp_out_w, |weight, layout| {
                    k.matmul_backward(
                        &mut s.mlp_act,
                        dw,
                        db,
                        &s.residual,
                        &a.mlp_act[rows(w.hidden)],
                        weight,
                        layout,
                        w.hidden,
                        c,
                    )
                });
            }
            if let Some(lora) = lora.as_deref_mut() {
                let x = &a.mlp_act[rows(w.hidden)];
                lora.backward(
                    k,
                    l,
                    Site::MlpOut,
                    &mut s.mlp_act,
                    &s.residual,
                    x,
                    c,
                    lora_pass,
                );
            }
            let mlp_pre = &a.mlp_pre[rows(w.mlp_in)];
            match self.config.block.mlp {
                Mlp::Gelu => k.gelu_backward(&mut s.mlp_pre, mlp_pre, &s.mlp_act),
                Mlp::SwiGlu => k.swiglu_backward(&mut s.mlp_pre, mlp_pre, &s.mlp_act, w.hidden),
            }
            {
                let (dw, db) = weight_and_bias(g, frozen, lp.mlp_in_w.clone(), lp.mlp_in_b.clone());
                with_matrix(frozen_base, p, matrices, &lp.mlp_in_w, |weight, layout| {
                    k.matmul_backward(
                        &mut s.norm,
                        dw,
                        db,
                        &s.mlp_pre,
                        &a.norm2[rows(c)],
                        weight,
                        layout,
                        c,
                        w.mlp_in,
                    )
                });
            }
            if let Some(lora) = lora.as_deref_mut() {
                let x = &a.norm2[rows(c)];
                lora.backward(
                    k,
                    l,
                    Site::MlpIn,
                    &mut s.norm,
                    &s.mlp_pre,
                    x,
                    w.mlp_in,
                    lora_pass,
                );
            }
            norm_backward(
                g,
                &mut s.residual,
                &s.norm,
                &a.residual2[rows(c)],
                &lp.norm2_w,
                &lp.norm2_b,
                &a.norm2_mean[stat.clone()],
                &a.norm2_rstd[stat.clone()],
            );
            // Attention: residual2 = residual_in + out(attention(rope(qkv(norm1(residual_in))))).
            {
                let (dw, db) =
                    weight_and_bias(g, frozen, lp.attn_out_w.clone(), lp.attn_out_b.clone());
                with_matrix(
                    frozen_base,
                    p,
                    matrices,
                    &lp.attn_out_w,
                    |weight, layout| {
                        k.matmul_backward(
                            &mut s.atty,
                            dw,
                            db,
                            &s.residual,
                            &a.atty[rows(w.q)],
                            weight,
                            layout,
                            w.q,
                            c,
                        )
                    },
                );
            }
            if let Some(lora) = lora.as_deref_mut() {
                let x = &a.atty[rows(w.q)];
                lora.backward(
                    k,
                    l,
                    Site::AttnOut,
                    &mut s.atty,
                    &s.residual,
                    x,
                    c,
                    lora_pass,
                );
            }
            k.attention_backward(
                &mut s.qkv,
                &s.atty,
                &a.qkv[rows(w.qkv)],
                nth(&a.attn_stats, slot, stats_len),
                &a.positions,
                d,
            );
            if let Some(table) = rope.as_ref() {
                let heads = self.config.n_head + self.config.kv_heads();
                k.rope(&mut s.qkv, w.qkv, heads, &a.positions, table, true);
            }
            {
                let (dw, db) = weight_and_bias(g, frozen, lp.qkv_w.clone(), lp.qkv_b.clone());
                with_matrix(frozen_base, p, matrices, &lp.qkv_w, |weight, layout| {
                    k.matmul_backward(
                        &mut s.norm,
                        dw,
                        db,
                        &s.qkv,
                        &a.norm1[rows(c)],
                        weight,
                        layout,
                        c,
                        w.qkv,
                    )
                });
            }
            if let Some(lora) = lora {
                let x = &a.norm1[rows(c)];
                lora.backward(k, l, Site::Qkv, &mut s.norm, &s.qkv, x, w.qkv, lora_pass);
            }
            norm_backward(
                g,
                &mut s.residual,
                &s.norm,
                residual_in,
                &lp.norm1_w,
                &lp.norm1_b,
                &a.norm1_mean[stat.clone()],
                &a.norm1_rstd[stat],
            );
        }
        let a = &acts;
        match lay.wpe.clone() {
            _ if frozen => {}
            Some(wpe) => {
                let (dwte, dwpe) = two_mut(g, lay.wte.clone(), wpe);
                k.encoder_backward(dwte, Some(dwpe), &s.residual, &a.tokens, &a.positions, d);
            }
            None => k.encoder_backward(
                &mut g[lay.wte.clone()],
                None,
                &s.residual,
                &a.tokens,
                &a.positions,
                d,
            ),
        }
        self.grads = grads;
        self.scratch = scratch;
        self.acts = acts;
        Ok(())
    }

    /// Values the optimizer trains: the adapters' when the model has them, else every
    /// parameter. [`Gpt::trainable_mut`] and the gradients are this long.
    pub fn trainable_len(&self) -> usize {
        self.lora
            .as_ref()
            .map_or(self.params.len(), |l| l.params.len())
    }

    /// The trained values and their gradients as flat buffers (the adapters' when the model
    /// has them), for reducing gradients and gathering parameters across processes.
    pub fn trainable_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        match &mut self.lora {
            Some(lora) => (&mut lora.params, &mut lora.grads),
            None => (&mut self.params, &mut self.grads),
        }
    }

    /// Sum of squares of the gradients in `range` of the trained values.
    pub fn grad_sum_squares(&self, range: Range<usize>) -> f64 {
        let grads = self.lora.as_ref().map_or(&self.grads, |l| &l.grads);
        self.kernels.sum_squares(&grads[range])
    }

    /// Global L2 norm of the gradients (the adapters' when the model has them).
    pub fn grad_norm(&self) -> f64 {
        self.grad_sum_squares(0..self.trainable_len()).sqrt()
    }

    /// Scales the gradients in `range` as clipping a gradient of L2 norm `norm` to `max_norm`
    /// does (as `torch.nn.utils.clip_grad_norm_`).
    pub fn clip_grads(&mut self, range: Range<usize>, norm: f64, max_norm: f64) {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let grads = match &mut self.lora {
                Some(lora) => &mut lora.grads,
                None => &mut self.grads,
            };
            self.kernels.scale(&mut grads[range], coef as f32);
        }
    }

    /// Scales gradients so their norm is at most `max_norm`; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        self.clip_grads(0..self.trainable_len(), norm, max_norm);
        norm
    }

    /// One AdamW step; weight decay applies to matrices only (the adapters' included, as the
    /// Hugging Face trainer decays them). With adapters, only they are updated.
    pub fn adamw_step(&mut self, state: &mut AdamWState, lr: f32, weight_decay: f32) {
        self.adamw_step_shard(state, lr, weight_decay, 0..self.trainable_len());
    }

    /// AdamW on the trained values in `shard` only, whose moments `state` holds (ZeRO-1: each
    /// process updates its shard); the same arithmetic per value as [`Gpt::adamw_step`].
    pub fn adamw_step_shard(
        &mut self,
        state: &mut AdamWState,
        lr: f32,
        weight_decay: f32,
        shard: Range<usize>,
    ) {
        if state.m.len() != shard.len() {
            state.m = vec![0.0; shard.len()];
            state.v = vec![0.0; shard.len()];
        }
        state.step += 1;
        let h = |decay: bool| AdamW {
            lr,
            beta1: state.beta1,
            beta2: state.beta2,
            eps: state.eps,
            weight_decay: if decay { weight_decay } else { 0.0 },
            step: state.step,
        };
        if let Some(lora) = &mut self.lora {
            let r = shard.clone();
            let h = h(true);
            self.kernels.adamw(
                &mut lora.params[r.clone()],
                &lora.grads[r],
                &mut state.m,
                &mut state.v,
                &h,
            );
            return;
        }
        for spec in &self.layout.tensors {
            let r = spec.range.start.max(shard.start)..spec.range.end.min(shard.end);
            if r.is_empty() {
                continue;
            }
            let local = r.start - shard.start..r.end - shard.start;
            let h = h(spec.decay);
            self.kernels.adamw(
                &mut self.params[r.clone()],
                &self.grads[r],
                &mut state.m[local.clone()],
                &mut state.v[local],
                &h,
            );
        }
    }
}

/// AdamW moments and step count (saved with checkpoints).
#[derive(Debug, Clone)]
pub struct AdamWState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl AdamWState {
    pub fn new(beta1: f32, beta2: f32, eps: f32) -> Self {
        Self {
            m: Vec::new(),
            v: Vec::new(),
            step: 0,
            beta1,
            beta2,
            eps,
        }
    }
}
