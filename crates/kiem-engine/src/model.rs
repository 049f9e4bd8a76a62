//! The GPT-2 model over flat buffers: parameters, gradients and activations each live in one
//! allocation; forward and backward call the [`Kernels`].

use std::ops::Range;

use rayon::prelude::*;

use crate::bf16_gemm::{from_bf16, to_bf16};
use crate::config::{ModelConfig, ParamLayout};
use crate::kernels::{AdamW, Cpu, Dims, Kernels, MatmulPrecision, WeightLayout};
use crate::rng::Rng;
use crate::{EngineError, Result};

/// Activations kept from the forward pass for the backward pass, sized for (batch, seq).
#[derive(Debug, Default)]
struct Activations {
    batch: usize,
    seq: usize,
    tokens: Vec<u32>,
    encoded: Vec<f32>,
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    att: Vec<f32>,
    residual2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    residual3: Vec<f32>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// Logits; after a training forward pass, their gradients.
    logits: Vec<f32>,
    losses: Vec<f32>,
    /// Matmul output before it is added to the residual stream.
    scratch: Vec<f32>,
}

/// Gradient buffers of one layer, reused for every layer during backward.
#[derive(Debug, Default)]
struct GradScratch {
    residual: Vec<f32>,
    ln: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
}

/// Bytes of activation memory for (batch, seq), for estimating before allocating.
pub fn activation_bytes(config: &ModelConfig, batch: usize, seq: usize) -> usize {
    let (l, c, bt) = (config.n_layer, config.n_embd, batch * seq);
    let per_layer = bt * (c + 2 + 3 * c + c + c + c + 2 + 4 * c + 4 * c + c)
        + batch * config.n_head * seq * seq;
    let floats = bt * c + l * per_layer + bt * (c + 2) + bt * config.padded_vocab() + bt + bt * c;
    let scratch = bt * (c + c + 3 * c + c + 4 * c + 4 * c);
    (floats + scratch) * 4
}

pub struct Gpt<K: Kernels = Cpu> {
    pub config: ModelConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    pub(crate) kernels: K,
    /// How the layers' four matrices are stored: `InOut` as in Hugging Face files (training),
    /// or `OutIn` after [`Gpt::transpose_for_decoding`].
    pub(crate) matrices: WeightLayout,
    /// bf16 copy of `params` (same indices) that decoding's thin products read, when chosen.
    pub(crate) params_bf16: Option<Vec<u16>>,
    acts: Activations,
    scratch: GradScratch,
    /// Whether the last forward pass left logit gradients for a backward pass.
    ready_for_backward: bool,
}

fn two_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start, "ranges must be ordered and disjoint");
    let (left, right) = buf.split_at_mut(b.start);
    (&mut left[a], &mut right[..b.end - b.start])
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
        Ok(Self {
            params: vec![0.0; layout.total],
            grads: Vec::new(),
            layout,
            config,
            kernels,
            acts: Activations::default(),
            scratch: GradScratch::default(),
            ready_for_backward: false,
            matrices: WeightLayout::InOut,
            params_bf16: None,
        })
    }

    /// GPT-2's initialization: matrices N(0, 0.02), residual projections N(0, 0.02/√(2L)),
    /// biases 0, layer-norm weights 1; padded vocabulary rows stay 0.
    pub fn init_random(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let residual_std = 0.02 / (2.0 * self.config.n_layer as f32).sqrt();
        let c = self.config.n_embd;
        for spec in &self.layout.tensors {
            let data = &mut self.params[spec.range.clone()];
            if spec.name.ends_with("ln_1.weight")
                || spec.name.ends_with("ln_2.weight")
                || spec.name.ends_with("ln_f.weight")
            {
                data.fill(1.0);
            } else if spec.decay {
                let std = if spec.name.ends_with("c_proj.weight") {
                    residual_std
                } else {
                    0.02
                };
                let live = if spec.name == "transformer.wte.weight" {
                    self.config.vocab_size * c
                } else {
                    data.len()
                };
                for x in &mut data[..live] {
                    *x = rng.normal() * std;
                }
                data[live..].fill(0.0);
            } else {
                data.fill(0.0);
            }
        }
    }

    /// Stores the layers' matrices as `[out, in]`, so decoding reads every weight matrix with
    /// contiguous dot products (its fastest access; the `[in, out]` files' order reads at about
    /// two thirds of the rate). For models that only generate: training, saving and growing the
    /// vocabulary refuse a transposed model. Idempotent.
    pub fn transpose_for_decoding(&mut self) {
        if self.matrices == WeightLayout::OutIn {
            return;
        }
        let c = self.config.n_embd;
        let matrices: Vec<(Range<usize>, usize, usize)> = self
            .layout
            .layers
            .iter()
            .flat_map(|lp| {
                [
                    (lp.qkv_w.clone(), c, 3 * c),
                    (lp.attn_proj_w.clone(), c, c),
                    (lp.fc_w.clone(), c, 4 * c),
                    (lp.fc_proj_w.clone(), 4 * c, c),
                ]
            })
            .collect();
        for (range, rows, cols) in matrices {
            let original = self.params[range.clone()].to_vec();
            self.params[range]
                .par_chunks_mut(rows)
                .enumerate()
                .for_each(|(j, out_row)| {
                    for (i, x) in out_row.iter_mut().enumerate() {
                        *x = original[i * cols + j];
                    }
                });
        }
        self.matrices = WeightLayout::OutIn;
    }

    /// Decodes from bf16 weights: rounds every parameter to bf16 (nearest, ties to even) and
    /// keeps a bf16 copy that decoding's thin products read, half the bytes per token. Results
    /// are exactly those of the fp32 kernels on the rounded weights (prefill reads the fp32
    /// copy of the same values). Transposes for decoding first; memory: 1.5x the fp32 model.
    pub fn use_bf16_weights(&mut self) {
        self.transpose_for_decoding();
        if self.params_bf16.is_some() {
            return;
        }
        let rounded: Vec<u16> = self.params.par_iter().map(|&x| to_bf16(x)).collect();
        self.params
            .par_iter_mut()
            .zip(&rounded)
            .for_each(|(p, &h)| *p = from_bf16(h));
        self.params_bf16 = Some(rounded);
    }

    /// Bytes of parameters a decoding step reads (all of them, in the precision decoding uses).
    pub fn decoding_weight_bytes(&self) -> usize {
        let per_parameter = if self.params_bf16.is_some() { 2 } else { 4 };
        self.params.len() * per_parameter
    }

    /// Reads every weight a decoding step reads ([`Self::decoding_weight_bytes`] of them) once,
    /// as fast as memory allows, on all threads: timing it measures the read bandwidth of the
    /// very memory decoding streams, the denominator of its bandwidth bound.
    pub fn stream_decoding_weights(&self) -> u32 {
        const CHUNK: usize = 1 << 16;
        match &self.params_bf16 {
            Some(bf16) => bf16
                .par_chunks(CHUNK)
                .map(crate::kernels::streaming_read_u16)
                .reduce(|| 0, u32::wrapping_add),
            None => self
                .params
                .par_chunks(CHUNK)
                .map(crate::kernels::streaming_read_f32)
                .reduce(|| 0, u32::wrapping_add),
        }
    }

    /// Fails for a model transposed for decoding.
    pub(crate) fn check_training_layout(&self) -> Result<()> {
        if self.matrices != WeightLayout::InOut {
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

    /// A copy with a larger vocabulary: existing parameters are kept and each new embedding row
    /// starts at the mean of the existing rows (a neutral token rather than noise).
    pub fn grow_vocab(&self, vocab_size: usize) -> Result<Gpt<Cpu>> {
        self.check_training_layout()?;
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
            if old.name == "transformer.wte.weight" {
                let live = self.config.vocab_size * c;
                let dst = &mut grown.params[new.range.clone()];
                dst[..live].copy_from_slice(&self.params[old.range.start..old.range.start + live]);
                let mut mean = vec![0f64; c];
                for row in self.params[old.range.start..old.range.start + live].chunks(c) {
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
        let a = &mut self.acts;
        if a.batch == batch && a.seq == seq {
            return;
        }
        let (l, c, bt) = (self.config.n_layer, self.config.n_embd, batch * seq);
        let nh = self.config.n_head;
        let v = self.config.padded_vocab();
        let size = |buf: &mut Vec<f32>, n: usize| buf.resize(n, 0.0);
        a.batch = batch;
        a.seq = seq;
        a.tokens.resize(bt, 0);
        size(&mut a.encoded, bt * c);
        for buf in [
            &mut a.ln1,
            &mut a.atty,
            &mut a.residual2,
            &mut a.ln2,
            &mut a.residual3,
        ] {
            size(buf, l * bt * c);
        }
        for buf in [
            &mut a.ln1_mean,
            &mut a.ln1_rstd,
            &mut a.ln2_mean,
            &mut a.ln2_rstd,
        ] {
            size(buf, l * bt);
        }
        size(&mut a.qkv, l * bt * 3 * c);
        size(&mut a.att, l * batch * nh * seq * seq);
        size(&mut a.fch, l * bt * 4 * c);
        size(&mut a.fch_gelu, l * bt * 4 * c);
        size(&mut a.lnf, bt * c);
        size(&mut a.lnf_mean, bt);
        size(&mut a.lnf_rstd, bt);
        size(&mut a.logits, bt * v);
        size(&mut a.losses, bt);
        size(&mut a.scratch, bt * c);
        let g = &mut self.scratch;
        for buf in [&mut g.residual, &mut g.ln, &mut g.atty] {
            size(buf, bt * c);
        }
        size(&mut g.qkv, bt * 3 * c);
        size(&mut g.fch, bt * 4 * c);
        size(&mut g.fch_gelu, bt * 4 * c);
    }

    fn dims(&self) -> Dims {
        Dims {
            batch: self.acts.batch,
            seq: self.acts.seq,
            channels: self.config.n_embd,
            heads: self.config.n_head,
        }
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
        self.ensure_activations(batch, seq);
        let d = self.dims();
        let (c, bt, vp) = (d.channels, d.rows(), self.config.padded_vocab());
        let k = &self.kernels;
        let p = &self.params;
        let lay = &self.layout;
        let a = &mut self.acts;
        a.tokens.copy_from_slice(tokens);
        k.encoder_forward(
            &mut a.encoded,
            tokens,
            &p[lay.wte.clone()],
            &p[lay.wpe.clone()],
            d,
        );
        for (l, lp) in lay.layers.iter().enumerate() {
            let row = |w: usize| l * bt * w..(l + 1) * bt * w;
            let stat = l * bt..(l + 1) * bt;
            let residual: &[f32] = if l == 0 {
                &a.encoded
            } else {
                &a.residual3[(l - 1) * bt * c..l * bt * c]
            };
            k.layernorm_forward(
                &mut a.ln1[row(c)],
                &mut a.ln1_mean[stat.clone()],
                &mut a.ln1_rstd[stat.clone()],
                residual,
                &p[lp.ln1_w.clone()],
                &p[lp.ln1_b.clone()],
                c,
            );
            k.matmul_forward(
                &mut a.qkv[row(3 * c)],
                &a.ln1[row(c)],
                &p[lp.qkv_w.clone()],
                self.matrices,
                Some(&p[lp.qkv_b.clone()]),
                c,
                3 * c,
            );
            let att_len = d.batch * d.heads * d.seq * d.seq;
            k.attention_forward(
                &mut a.atty[row(c)],
                &mut a.att[l * att_len..(l + 1) * att_len],
                &a.qkv[row(3 * c)],
                d,
            );
            k.matmul_forward(
                &mut a.scratch,
                &a.atty[row(c)],
                &p[lp.attn_proj_w.clone()],
                self.matrices,
                Some(&p[lp.attn_proj_b.clone()]),
                c,
                c,
            );
            k.add(&mut a.residual2[row(c)], residual, &a.scratch);
            k.layernorm_forward(
                &mut a.ln2[row(c)],
                &mut a.ln2_mean[stat.clone()],
                &mut a.ln2_rstd[stat.clone()],
                &a.residual2[row(c)],
                &p[lp.ln2_w.clone()],
                &p[lp.ln2_b.clone()],
                c,
            );
            k.matmul_forward(
                &mut a.fch[row(4 * c)],
                &a.ln2[row(c)],
                &p[lp.fc_w.clone()],
                self.matrices,
                Some(&p[lp.fc_b.clone()]),
                c,
                4 * c,
            );
            k.gelu_forward(&mut a.fch_gelu[row(4 * c)], &a.fch[row(4 * c)]);
            k.matmul_forward(
                &mut a.scratch,
                &a.fch_gelu[row(4 * c)],
                &p[lp.fc_proj_w.clone()],
                self.matrices,
                Some(&p[lp.fc_proj_b.clone()]),
                4 * c,
                c,
            );
            let (r2, r3) = (&a.residual2[row(c)], &mut a.residual3[row(c)]);
            k.add(r3, r2, &a.scratch);
        }
        let last = (self.config.n_layer - 1) * bt * c..self.config.n_layer * bt * c;
        k.layernorm_forward(
            &mut a.lnf,
            &mut a.lnf_mean,
            &mut a.lnf_rstd,
            &a.residual3[last],
            &p[lay.lnf_w.clone()],
            &p[lay.lnf_b.clone()],
            c,
        );
        k.matmul_forward(
            &mut a.logits,
            &a.lnf,
            &p[lay.wte.clone()],
            WeightLayout::OutIn,
            None,
            c,
            vp,
        );
        k.cross_entropy(&mut a.logits, &mut a.losses, targets, vocab, vp, grad_scale);
        self.ready_for_backward = grad_scale.is_some();
        let count = targets.iter().filter(|t| t.is_some()).count();
        let sum: f64 = a.losses.iter().map(|&x| f64::from(x)).sum();
        Ok((sum, count))
    }

    /// Per-position losses of the last forward pass (0 where the target was `None`).
    pub fn losses(&self) -> &[f32] {
        &self.acts.losses
    }

    /// Logits of the last forward pass without `grad_scale`, `[batch·seq, padded_vocab]`.
    pub fn logits(&self) -> &[f32] {
        &self.acts.logits
    }

    /// Sets all gradients to zero (allocating them on first use).
    pub fn zero_grad(&mut self) {
        if self.grads.len() != self.params.len() {
            self.grads = vec![0.0; self.params.len()];
        } else {
            self.grads.fill(0.0);
        }
    }

    /// Accumulates the gradients of the last training forward pass into `grads`.
    pub fn backward(&mut self) -> Result<()> {
        if !self.ready_for_backward {
            return Err(EngineError::Shape(
                "backward needs a forward pass with grad_scale".into(),
            ));
        }
        self.check_training_layout()?;
        if self.grads.len() != self.params.len() {
            self.zero_grad();
        }
        self.ready_for_backward = false;
        let d = self.dims();
        let (c, bt, vp) = (d.channels, d.rows(), self.config.padded_vocab());
        let k = &self.kernels;
        let p = &self.params;
        let g = &mut self.grads;
        let lay = &self.layout;
        let a = &self.acts;
        let s = &mut self.scratch;

        // Output head (tied to wte) and final layer norm.
        k.matmul_backward(
            &mut s.ln,
            &mut g[lay.wte.clone()],
            None,
            &a.logits,
            &a.lnf,
            &p[lay.wte.clone()],
            WeightLayout::OutIn,
            c,
            vp,
        );
        s.residual.fill(0.0);
        let last = (self.config.n_layer - 1) * bt * c..self.config.n_layer * bt * c;
        {
            let (dw, db) = two_mut(g, lay.lnf_w.clone(), lay.lnf_b.clone());
            k.layernorm_backward(
                &mut s.residual,
                dw,
                db,
                &s.ln,
                &a.residual3[last],
                &p[lay.lnf_w.clone()],
                &a.lnf_mean,
                &a.lnf_rstd,
                c,
            );
        }
        for (l, lp) in lay.layers.iter().enumerate().rev() {
            let row = |w: usize| l * bt * w..(l + 1) * bt * w;
            let stat = l * bt..(l + 1) * bt;
            let residual_in: &[f32] = if l == 0 {
                &a.encoded
            } else {
                &a.residual3[(l - 1) * bt * c..l * bt * c]
            };
            // MLP: residual3 = residual2 + fc_proj(gelu(fc(ln2(residual2)))).
            {
                let (dw, db) = two_mut(g, lp.fc_proj_w.clone(), lp.fc_proj_b.clone());
                k.matmul_backward(
                    &mut s.fch_gelu,
                    dw,
                    Some(db),
                    &s.residual,
                    &a.fch_gelu[row(4 * c)],
                    &p[lp.fc_proj_w.clone()],
                    WeightLayout::InOut,
                    4 * c,
                    c,
                );
            }
            k.gelu_backward(&mut s.fch, &a.fch[row(4 * c)], &s.fch_gelu);
            {
                let (dw, db) = two_mut(g, lp.fc_w.clone(), lp.fc_b.clone());
                k.matmul_backward(
                    &mut s.ln,
                    dw,
                    Some(db),
                    &s.fch,
                    &a.ln2[row(c)],
                    &p[lp.fc_w.clone()],
                    WeightLayout::InOut,
                    c,
                    4 * c,
                );
            }
            {
                let (dw, db) = two_mut(g, lp.ln2_w.clone(), lp.ln2_b.clone());
                k.layernorm_backward(
                    &mut s.residual,
                    dw,
                    db,
                    &s.ln,
                    &a.residual2[row(c)],
                    &p[lp.ln2_w.clone()],
                    &a.ln2_mean[stat.clone()],
                    &a.ln2_rstd[stat.clone()],
                    c,
                );
            }
            // Attention: residual2 = residual_in + attn_proj(attention(qkv(ln1(residual_in)))).
            {
                let (dw, db) = two_mut(g, lp.attn_proj_w.clone(), lp.attn_proj_b.clone());
                k.matmul_backward(
                    &mut s.atty,
                    dw,
                    Some(db),
                    &s.residual,
                    &a.atty[row(c)],
                    &p[lp.attn_proj_w.clone()],
                    WeightLayout::InOut,
                    c,
                    c,
                );
            }
            let att_len = d.batch * d.heads * d.seq * d.seq;
            k.attention_backward(
                &mut s.qkv,
                &s.atty,
                &a.qkv[row(3 * c)],
                &a.att[l * att_len..(l + 1) * att_len],
                d,
            );
            {
                let (dw, db) = two_mut(g, lp.qkv_w.clone(), lp.qkv_b.clone());
                k.matmul_backward(
                    &mut s.ln,
                    dw,
                    Some(db),
                    &s.qkv,
                    &a.ln1[row(c)],
                    &p[lp.qkv_w.clone()],
                    WeightLayout::InOut,
                    c,
                    3 * c,
                );
            }
            {
                let (dw, db) = two_mut(g, lp.ln1_w.clone(), lp.ln1_b.clone());
                k.layernorm_backward(
                    &mut s.residual,
                    dw,
                    db,
                    &s.ln,
                    residual_in,
                    &p[lp.ln1_w.clone()],
                    &a.ln1_mean[stat.clone()],
                    &a.ln1_rstd[stat],
                    c,
                );
            }
        }
        let (dwte, dwpe) = two_mut(g, lay.wte.clone(), lay.wpe.clone());
        k.encoder_backward(dwte, dwpe, &s.residual, &a.tokens, d);
        Ok(())
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        self.kernels.sum_squares(&self.grads).sqrt()
    }

    /// Scales gradients so their norm is at most `max_norm` (as `torch.nn.utils.clip_grad_norm_`);
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            self.kernels.scale(&mut self.grads, coef as f32);
        }
        norm
    }

    /// One AdamW step; weight decay applies to matrices only.
    pub fn adamw_step(&mut self, state: &mut AdamWState, lr: f32, weight_decay: f32) {
        if state.m.len() != self.params.len() {
            state.m = vec![0.0; self.params.len()];
            state.v = vec![0.0; self.params.len()];
        }
        state.step += 1;
        for spec in &self.layout.tensors {
            let r = spec.range.clone();
            let h = AdamW {
                lr,
                beta1: state.beta1,
                beta2: state.beta2,
                eps: state.eps,
                weight_decay: if spec.decay { weight_decay } else { 0.0 },
                step: state.step,
            };
            self.kernels.adamw(
                &mut self.params[r.clone()],
                &self.grads[r.clone()],
                &mut state.m[r.clone()],
                &mut state.v[r],
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
