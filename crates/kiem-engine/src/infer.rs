//! Inference with a KV cache: prefill a prompt, then decode one token at a time, for several
//! sequences at once (their new rows share every matmul). Layer norms, matmuls, GELU, residual
//! adds and the embedding use the training kernels; attention reads keys and values from the
//! cache instead of recomputing them.

use rayon::prelude::*;

use crate::kernels::{matmul_thin_bf16, Kernels, WeightLayout, SKINNY_ROWS};
use crate::{EngineError, Gpt, Result};

/// Keys and values of one sequence for every layer, up to the model's context.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// `[layer][head][position][head channel]`: a head's keys (and values) are contiguous, so
    /// decoding's attention streams them.
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    capacity: usize,
    heads: usize,
    head_size: usize,
}

impl KvCache {
    pub fn new(gpt: &Gpt<impl Kernels>) -> Self {
        let (l, t, c) = (gpt.config.n_layer, gpt.config.context, gpt.config.n_embd);
        Self {
            k: vec![0.0; l * t * c],
            v: vec![0.0; l * t * c],
            len: 0,
            capacity: t,
            heads: gpt.config.n_head,
            head_size: c / gpt.config.n_head,
        }
    }

    /// Tokens already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left before the context is full.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Where head `head` of layer `layer` starts in `k` and `v` (position 0).
    fn head_start(&self, layer: usize, head: usize) -> usize {
        (layer * self.heads + head) * self.capacity * self.head_size
    }

    /// Stores the keys and values (`[channel]` each, heads side by side) of position `pos`.
    fn store(&mut self, layer: usize, pos: usize, keys: &[f32], values: &[f32]) {
        let hs = self.head_size;
        for h in 0..self.heads {
            let at = self.head_start(layer, h) + pos * hs;
            self.k[at..at + hs].copy_from_slice(&keys[h * hs..(h + 1) * hs]);
            self.v[at..at + hs].copy_from_slice(&values[h * hs..(h + 1) * hs]);
        }
    }
}

impl<K: Kernels> Gpt<K> {
    /// A product with one of the parameter matrices (`weights` indexes `params`): thin ones read
    /// the bf16 copy when the model has one ([`Gpt::use_bf16_weights`]), all others go through
    /// the kernels.
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weights: std::ops::Range<usize>,
        layout: WeightLayout,
        bias: Option<&[f32]>,
        c_in: usize,
        c_out: usize,
    ) {
        if let Some(w16) = &self.params_bf16 {
            if layout == WeightLayout::OutIn && inp.len() / c_in <= SKINNY_ROWS {
                matmul_thin_bf16(out, inp, &w16[weights], bias, c_in, c_out);
                return;
            }
        }
        self.kernels
            .matmul_forward(out, inp, &self.params[weights], layout, bias, c_in, c_out);
    }

    /// Appends `new_tokens[i]` to sequence `i` (whose keys and values are in `caches[i]`) and
    /// returns the logits after each sequence's last new token, `[sequences, padded_vocab]`.
    /// A sequence with no new tokens is skipped (its row of logits is left zero).
    pub fn forward_cached(
        &self,
        caches: &mut [KvCache],
        new_tokens: &[&[u32]],
    ) -> Result<Vec<f32>> {
        crate::kernels::in_pool(|| self.forward_cached_in_pool(caches, new_tokens))
    }

    fn forward_cached_in_pool(
        &self,
        caches: &mut [KvCache],
        new_tokens: &[&[u32]],
    ) -> Result<Vec<f32>> {
        if caches.len() != new_tokens.len() {
            return Err(EngineError::Shape("one token list per cache".into()));
        }
        let cfg = &self.config;
        let (c, vp) = (cfg.n_embd, cfg.padded_vocab());
        for (cache, tokens) in caches.iter().zip(new_tokens) {
            if tokens.len() > cache.remaining() {
                return Err(EngineError::Shape(format!(
                    "{} new tokens do not fit: {} of the {}-token context are used",
                    tokens.len(),
                    cache.len,
                    cfg.context
                )));
            }
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(EngineError::Shape(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    cfg.vocab_size
                )));
            }
        }
        // Rows of this pass: (sequence, position) for every new token, sequence by sequence.
        let starts: Vec<usize> = caches.iter().map(KvCache::len).collect();
        let rows: Vec<(usize, usize)> = new_tokens
            .iter()
            .enumerate()
            .flat_map(|(s, tokens)| (0..tokens.len()).map(move |i| (s, i)))
            .map(|(s, i)| (s, starts[s] + i))
            .collect();
        let n = rows.len();
        let mut logits = vec![0.0f32; caches.len() * vp];
        if n == 0 {
            return Ok(logits);
        }
        let k = &self.kernels;
        let p = &self.params;
        let lay = &self.layout;
        let flat: Vec<u32> = new_tokens.iter().flat_map(|t| t.iter().copied()).collect();

        // Embedding: token row + position row (positions differ per sequence).
        let mut x = vec![0f32; n * c];
        x.par_chunks_mut(c)
            .zip(rows.par_iter())
            .zip(flat.par_iter())
            .for_each(|((out, &(_, pos)), &tok)| {
                let e = &p[lay.wte.start + tok as usize * c..][..c];
                let w = &p[lay.wpe.start + pos * c..][..c];
                for i in 0..c {
                    out[i] = e[i] + w[i];
                }
            });
        let mut h = vec![0f32; n * c];
        let mut qkv = vec![0f32; n * 3 * c];
        let mut y = vec![0f32; n * c];
        let mut proj = vec![0f32; n * c];
        let mut fc = vec![0f32; n * 4 * c];
        let mut fc_gelu = vec![0f32; n * 4 * c];
        let (mut mean, mut rstd) = (vec![0f32; n], vec![0f32; n]);
        let mut residual = vec![0f32; n * c];
        for (l, lp) in lay.layers.iter().enumerate() {
            k.layernorm_forward(
                &mut h,
                &mut mean,
                &mut rstd,
                &x,
                &p[lp.ln1_w.clone()],
                &p[lp.ln1_b.clone()],
                c,
            );
            self.product(
                &mut qkv,
                &h,
                lp.qkv_w.clone(),
                self.matrices,
                Some(&p[lp.qkv_b.clone()]),
                c,
                3 * c,
            );
            for (r, &(s, pos)) in rows.iter().enumerate() {
                let row = &qkv[r * 3 * c..(r + 1) * 3 * c];
                caches[s].store(l, pos, &row[c..2 * c], &row[2 * c..]);
            }
            attention_cached(&mut y, &qkv, caches, &rows, l, cfg.n_head);
            self.product(
                &mut proj,
                &y,
                lp.attn_proj_w.clone(),
                self.matrices,
                Some(&p[lp.attn_proj_b.clone()]),
                c,
                c,
            );
            k.add(&mut residual, &x, &proj);
            k.layernorm_forward(
                &mut h,
                &mut mean,
                &mut rstd,
                &residual,
                &p[lp.ln2_w.clone()],
                &p[lp.ln2_b.clone()],
                c,
            );
            self.product(
                &mut fc,
                &h,
                lp.fc_w.clone(),
                self.matrices,
                Some(&p[lp.fc_b.clone()]),
                c,
                4 * c,
            );
            k.gelu_forward(&mut fc_gelu, &fc);
            self.product(
                &mut proj,
                &fc_gelu,
                lp.fc_proj_w.clone(),
                self.matrices,
                Some(&p[lp.fc_proj_b.clone()]),
                4 * c,
                c,
            );
            k.add(&mut x, &residual, &proj);
        }
        for (cache, tokens) in caches.iter_mut().zip(new_tokens) {
            cache.len += tokens.len();
        }
        // Logits only for each sequence's last new row.
        let last_rows: Vec<(usize, usize)> = {
            let mut end = 0;
            new_tokens
                .iter()
                .enumerate()
                .filter_map(|(s, t)| {
                    end += t.len();
                    (!t.is_empty()).then(|| (s, end - 1))
                })
                .collect()
        };
        let m = last_rows.len();
        let mut last = vec![0f32; m * c];
        for (i, &(_, r)) in last_rows.iter().enumerate() {
            last[i * c..(i + 1) * c].copy_from_slice(&x[r * c..(r + 1) * c]);
        }
        let mut normed = vec![0f32; m * c];
        let (mut mean, mut rstd) = (vec![0f32; m], vec![0f32; m]);
        k.layernorm_forward(
            &mut normed,
            &mut mean,
            &mut rstd,
            &last,
            &p[lay.lnf_w.clone()],
            &p[lay.lnf_b.clone()],
            c,
        );
        let mut out = vec![0f32; m * vp];
        self.product(
            &mut out,
            &normed,
            lay.wte.clone(),
            WeightLayout::OutIn,
            None,
            c,
            vp,
        );
        for (i, &(s, _)) in last_rows.iter().enumerate() {
            logits[s * vp..(s + 1) * vp].copy_from_slice(&out[i * vp..(i + 1) * vp]);
        }
        Ok(logits)
    }
}

/// Causal attention of each new row over its sequence's cached keys and values (which already
/// include the new rows' own).
fn attention_cached(
    out: &mut [f32],
    qkv: &[f32],
    caches: &[KvCache],
    rows: &[(usize, usize)],
    layer: usize,
    heads: usize,
) {
    let c = out.len() / rows.len();
    let hs = c / heads;
    let scale = 1.0 / (hs as f32).sqrt();
    // One task per (row, head): a single decoding row still keeps every thread busy.
    out.par_chunks_mut(hs).enumerate().for_each(|(i, y)| {
        let (r, h) = (i / heads, i % heads);
        let (s, pos) = rows[r];
        let cache = &caches[s];
        let q = &qkv[r * 3 * c + h * hs..][..hs];
        crate::kernels::wide(
            #[inline(always)]
            || {
                // No closures in these loops: an iterator adapter's closure is compiled on its
                // own, for the baseline CPU.
                let mut scores = vec![0f32; pos + 1];
                let start = cache.head_start(layer, h);
                let keys = cache.k[start..start + (pos + 1) * hs].chunks_exact(hs);
                for (score, key) in scores.iter_mut().zip(keys) {
                    *score = crate::kernels::lane_dot(q, key) * scale;
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = crate::kernels::fast_exp(*s - max);
                    sum += *s;
                }
                y.fill(0.0);
                let values = cache.v[start..start + (pos + 1) * hs].chunks_exact(hs);
                for (&w, value) in scores.iter().zip(values) {
                    let w = w / sum;
                    for (y, &v) in y.iter_mut().zip(value) {
                        *y += w * v;
                    }
                }
            },
        )
    });
}
