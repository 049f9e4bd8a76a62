//! Inference with a KV cache: prefill a prompt, then decode one token at a time, for several
//! sequences at once (their new rows share every matmul). Each block runs the same
//! `Gpt::block_forward` as training; only attention differs: it stores the new rows' keys and
//! values in the cache and reads every earlier position from there.

use rayon::prelude::*;

use crate::kernels::{Kernels, WeightLayout};
use crate::model::BlockBuffers;
use crate::{EngineError, Gpt, Result};

/// Keys and values of one sequence for every layer. Only the key/value heads are stored
/// (grouped-query attention shares them between query heads). Room grows as the sequence
/// does, up to the model's context, so a model with a 128k context does not reserve 128k
/// positions for every short chat.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// `[layer][kv head][position][head channel]`: a head's keys (and values) are contiguous,
    /// so decoding's attention streams them.
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    /// Positions allocated per (layer, head).
    capacity: usize,
    /// The model's context: the most positions the cache will ever hold.
    context: usize,
    layers: usize,
    heads: usize,
    head_size: usize,
    /// The served adapter ([`Gpt::add_served_adapter`]) this sequence decodes with.
    adapter: Option<usize>,
}

/// Positions a new cache allocates room for before it first grows.
const INITIAL_POSITIONS: usize = 256;

impl KvCache {
    pub fn new(gpt: &Gpt<impl Kernels>) -> Self {
        let cfg = &gpt.config;
        let mut cache = Self {
            k: Vec::new(),
            v: Vec::new(),
            len: 0,
            capacity: 0,
            context: cfg.context,
            layers: cfg.n_layer,
            heads: cfg.kv_heads(),
            head_size: cfg.head_dim(),
            adapter: None,
        };
        cache.reserve(INITIAL_POSITIONS.min(cfg.context));
        cache
    }

    /// Decodes this sequence with served adapter `adapter` (an index from
    /// [`Gpt::add_served_adapter`]) or with the model alone.
    pub fn set_adapter(&mut self, adapter: Option<usize>) {
        self.adapter = adapter;
    }

    pub fn adapter(&self) -> Option<usize> {
        self.adapter
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
        self.context - self.len
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes of keys and values the cache holds now.
    pub fn allocated_bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
    }

    /// Makes room for `positions` positions (at most the context), keeping what is stored.
    fn reserve(&mut self, positions: usize) {
        let positions = positions.min(self.context);
        if positions <= self.capacity {
            return;
        }
        let capacity = positions.max(2 * self.capacity).min(self.context);
        let (hs, old) = (self.head_size, self.capacity);
        let slabs = self.layers * self.heads;
        for buf in [&mut self.k, &mut self.v] {
            let mut grown = vec![0f32; slabs * capacity * hs];
            for slab in 0..slabs {
                let kept = self.len * hs;
                grown[slab * capacity * hs..][..kept]
                    .copy_from_slice(&buf[slab * old * hs..][..kept]);
            }
            *buf = grown;
        }
        self.capacity = capacity;
    }

    /// Where head `head` of layer `layer` starts in `k` and `v` (position 0).
    fn head_start(&self, layer: usize, head: usize) -> usize {
        (layer * self.heads + head) * self.capacity * self.head_size
    }

    /// Stores the keys and values (`[kv channel]` each, heads side by side) of position `pos`.
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
    /// Appends `new_tokens[i]` to sequence `i` (whose keys and values are in `caches[i]`) and
    /// returns the logits after each sequence's last new token, `[sequences, padded_vocab]`.
    /// A sequence with no new tokens is skipped (its row of logits is left zero).
    pub fn forward_cached(
        &self,
        caches: &mut [KvCache],
        new_tokens: &[&[u32]],
    ) -> Result<Vec<f32>> {
        crate::kernels::in_pool(|| self.forward_cached_in_pool(caches, new_tokens, LogitRows::Last))
    }

    /// As `forward_cached`, but returns the logits after every new token, `[new tokens,
    /// padded_vocab]`, sequence by sequence (scoring continuations after a shared, cached
    /// context needs them all).
    pub fn forward_cached_every(
        &self,
        caches: &mut [KvCache],
        new_tokens: &[&[u32]],
    ) -> Result<Vec<f32>> {
        crate::kernels::in_pool(|| {
            self.forward_cached_in_pool(caches, new_tokens, LogitRows::Every)
        })
    }

    fn forward_cached_in_pool(
        &self,
        caches: &mut [KvCache],
        new_tokens: &[&[u32]],
        which: LogitRows,
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
        for (cache, tokens) in caches.iter_mut().zip(new_tokens) {
            cache.reserve(cache.len + tokens.len());
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
        if n == 0 {
            return Ok(match which {
                LogitRows::Last => vec![0f32; caches.len() * vp],
                LogitRows::Every => Vec::new(),
            });
        }
        let positions: Vec<u32> = rows.iter().map(|&(_, pos)| pos as u32).collect();
        for cache in caches.iter() {
            if let Some(a) = cache.adapter.filter(|&a| a >= self.served_adapters.len()) {
                return Err(EngineError::Shape(format!(
                    "adapter {a} is not served ({} are)",
                    self.served_adapters.len()
                )));
            }
        }
        let row_adapters: Vec<Option<usize>> =
            rows.iter().map(|&(s, _)| caches[s].adapter).collect();
        let p = &self.params;
        let lay = &self.layout;
        let flat: Vec<u32> = new_tokens.iter().flat_map(|t| t.iter().copied()).collect();

        // Embedding: token row (+ position row; positions differ per sequence).
        let mut x = vec![0f32; n * c];
        x.par_chunks_mut(c)
            .zip(rows.par_iter())
            .zip(flat.par_iter())
            .for_each(|((out, &(_, pos)), &tok)| {
                self.embedding_row(tok as usize, out);
                if let Some(wpe) = &lay.wpe {
                    for (o, w) in out.iter_mut().zip(&p[wpe.start + pos * c..][..c]) {
                        *o += w;
                    }
                }
            });
        let d = self.dims(1, 1);
        let zeros = |width: usize| vec![0f32; n * width];
        let (mut norm1, mut norm2, mut residual2) = (zeros(c), zeros(c), zeros(c));
        let (mut mean1, mut rstd1, mut mean2, mut rstd2) = (zeros(1), zeros(1), zeros(1), zeros(1));
        let mut qkv = zeros(cfg.qkv_width());
        let mut atty = zeros(cfg.q_width());
        let mut mlp_pre = zeros(cfg.mlp_in_width());
        let mut mlp_act = zeros(cfg.mlp_hidden());
        let (mut out, mut scratch) = (zeros(c), zeros(c));
        for l in 0..cfg.n_layer {
            let buffers = BlockBuffers {
                input: &x,
                norm1: &mut norm1,
                mean1: &mut mean1,
                rstd1: &mut rstd1,
                qkv: &mut qkv,
                atty: &mut atty,
                residual2: &mut residual2,
                norm2: &mut norm2,
                mean2: &mut mean2,
                rstd2: &mut rstd2,
                mlp_pre: &mut mlp_pre,
                mlp_act: &mut mlp_act,
                output: &mut out,
                scratch: &mut scratch,
            };
            let pass = crate::lora::LoraPass {
                dropout_seed: None,
                row_adapters: &row_adapters,
            };
            self.block_forward(l, buffers, &positions, pass, &mut |y, qkv| {
                let (qw, kvw) = (d.q_width(), cfg.kv_width());
                let w = d.qkv_width();
                for (r, &(s, pos)) in rows.iter().enumerate() {
                    let row = &qkv[r * w..(r + 1) * w];
                    caches[s].store(l, pos, &row[qw..qw + kvw], &row[qw + kvw..]);
                }
                attention_cached(y, qkv, caches, &rows, l, d);
            });
            std::mem::swap(&mut x, &mut out);
        }
        for (cache, tokens) in caches.iter_mut().zip(new_tokens) {
            cache.len += tokens.len();
        }
        // Logits for each sequence's last new row, or for every row.
        let head_rows: Vec<usize> = match which {
            LogitRows::Every => (0..n).collect(),
            LogitRows::Last => {
                let mut end = 0;
                new_tokens
                    .iter()
                    .filter_map(|t| {
                        end += t.len();
                        (!t.is_empty()).then(|| end - 1)
                    })
                    .collect()
            }
        };
        let m = head_rows.len();
        let mut picked = vec![0f32; m * c];
        for (i, &r) in head_rows.iter().enumerate() {
            picked[i * c..(i + 1) * c].copy_from_slice(&x[r * c..(r + 1) * c]);
        }
        let mut normed = vec![0f32; m * c];
        let (mut mean, mut rstd) = (vec![0f32; m], vec![0f32; m]);
        self.norm_forward(
            &mut normed,
            &mut mean,
            &mut rstd,
            &picked,
            &lay.normf_w,
            &lay.normf_b,
        );
        let mut head_out = vec![0f32; m * vp];
        self.product(
            &mut head_out,
            &normed,
            lay.head_weights(),
            WeightLayout::OutIn,
            None,
            c,
            vp,
            false,
        );
        if which == LogitRows::Every {
            return Ok(head_out);
        }
        let mut logits = vec![0.0f32; caches.len() * vp];
        let with_tokens = new_tokens.iter().enumerate().filter(|(_, t)| !t.is_empty());
        for (i, (s, _)) in with_tokens.enumerate() {
            logits[s * vp..(s + 1) * vp].copy_from_slice(&head_out[i * vp..(i + 1) * vp]);
        }
        Ok(logits)
    }
}

/// Which new rows of a cached pass get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogitRows {
    Last,
    Every,
}

/// New rows of one sequence at which its attention runs a block of rows at a time (a
/// prompt's prefill) rather than one row at a time (decoding).
const BLOCKED_ATTENTION_ROWS: usize = 8;

/// Causal attention of each new row over its sequence's cached keys and values (which already
/// include the new rows' own). Query head `h` reads key/value head `h / group`.
fn attention_cached(
    out: &mut [f32],
    qkv: &[f32],
    caches: &[KvCache],
    rows: &[(usize, usize)],
    layer: usize,
    d: crate::kernels::Dims,
) {
    let (heads, hs, w, group) = (d.heads, d.head_dim, d.qkv_width(), d.group());
    let scale = 1.0 / (hs as f32).sqrt();
    // Runs of rows of one sequence (rows come sequence by sequence): (first row, count).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (r, &(s, _)) in rows.iter().enumerate() {
        match runs.last_mut() {
            Some((first, count)) if rows[*first].0 == s => *count += 1,
            _ => runs.push((r, 1)),
        }
    }
    let blocked: Vec<(usize, usize)> = runs
        .into_iter()
        .filter(|&(_, count)| count >= BLOCKED_ATTENTION_ROWS)
        .collect();
    let in_blocked = |r: usize| blocked.iter().any(|&(f, n)| (f..f + n).contains(&r));
    let qw = d.q_width();
    let out_ptr = crate::kernels::SyncPtr(out.as_mut_ptr());
    // One task per (sequence, head) for the long runs.
    blocked
        .par_iter()
        .flat_map(|&run| (0..heads).into_par_iter().map(move |h| (run, h)))
        .for_each(|((first, n), h)| {
            let (s, start) = rows[first];
            let cache = &caches[s];
            let at = cache.head_start(layer, h / group);
            let seen = (start + n) * hs;
            // SAFETY: rows first..first + n of qkv hold this head's queries at column h·hs
            // (row stride w); this task alone writes those rows' columns h·hs.. of out.
            unsafe {
                crate::kernels::attention_over_cache(
                    out_ptr.get().add(first * qw + h * hs),
                    qw,
                    qkv[first * w + h * hs..].as_ptr(),
                    w,
                    &cache.k[at..at + seen],
                    &cache.v[at..at + seen],
                    (start, n),
                    hs,
                )
            }
        });
    // The other rows: one task per (row, key/value head), whose query heads score each key
    // and take each value as it is read (grouped-query attention reads its cache once, not
    // once per query head); the query heads split further where the tasks would not keep
    // every thread busy (a single decoding row of a model with few key/value heads).
    let per_task =
        query_heads_per_task(group, rows.len() * d.kv_heads, rayon::current_num_threads());
    let tasks_per_row = heads / per_task;
    out.par_chunks_mut(per_task * hs)
        .enumerate()
        .for_each(|(i, y)| {
            let (r, first) = (i / tasks_per_row, i % tasks_per_row * per_task);
            if in_blocked(r) {
                return;
            }
            let (s, pos) = rows[r];
            let cache = &caches[s];
            let at = cache.head_start(layer, first / group);
            let queries = &qkv[r * w + first * hs..][..per_task * hs];
            let seen = pos + 1;
            crate::kernels::wide(
                #[inline(always)]
                || {
                    // No closures in these loops: an iterator adapter's closure is compiled on
                    // its own, for the baseline CPU.
                    let mut scores = vec![0f32; per_task * seen];
                    let keys = cache.k[at..at + seen * hs].chunks_exact(hs);
                    for (p, key) in keys.enumerate() {
                        for (h, q) in queries.chunks_exact(hs).enumerate() {
                            scores[h * seen + p] = crate::kernels::lane_dot(q, key) * scale;
                        }
                    }
                    for row in scores.chunks_exact_mut(seen) {
                        crate::kernels::softmax(row);
                    }
                    let values = &cache.v[at..at + seen * hs];
                    match hs {
                        64 => weighted_values::<64>(y, &scores, values),
                        128 => weighted_values::<128>(y, &scores, values),
                        _ => weighted_values_any(y, &scores, values, hs),
                    }
                },
            )
        });
}

/// Positions of values a decoding attention task takes at a time for each of its heads (at
/// most 32 KB of them: they stay in the core's first cache while its heads take them).
const VALUE_BLOCK: usize = 64;

/// `y[h] = Σ_p weights[h][p] · values[p]` for each of the task's heads `h` (`y` rows and
/// `values` rows of `HS`), each output summed over the positions in order: the head's `HS`
/// sums stay in registers for a block of positions (once per position through memory, the
/// loads and stores of `y` outnumbered the values' own).
#[inline(always)]
fn weighted_values<const HS: usize>(y: &mut [f32], weights: &[f32], values: &[f32]) {
    let seen = values.len() / HS;
    y.fill(0.0);
    for p0 in (0..seen).step_by(VALUE_BLOCK) {
        let p1 = (p0 + VALUE_BLOCK).min(seen);
        for (h, y) in y.chunks_exact_mut(HS).enumerate() {
            let mut sums = [0f32; HS];
            sums.copy_from_slice(y);
            let block = &values[p0 * HS..p1 * HS];
            for (&weight, value) in weights[h * seen + p0..h * seen + p1]
                .iter()
                .zip(block.chunks_exact(HS))
            {
                for j in 0..HS {
                    sums[j] += weight * value[j];
                }
            }
            y.copy_from_slice(&sums);
        }
    }
}

/// [`weighted_values`] for any head width: the same sums, through memory.
#[inline(always)]
fn weighted_values_any(y: &mut [f32], weights: &[f32], values: &[f32], hs: usize) {
    let seen = values.len() / hs;
    y.fill(0.0);
    for (p, value) in values.chunks_exact(hs).enumerate() {
        for (h, y) in y.chunks_exact_mut(hs).enumerate() {
            let weight = weights[h * seen + p];
            for (y, &v) in y.iter_mut().zip(value) {
                *y += weight * v;
            }
        }
    }
}

/// How many of a key/value head's `group` query heads one decoding attention task takes: the
/// whole group (each key and value read once), unless `kv_tasks` tasks (rows × key/value
/// heads) would leave some of the `threads` idle, then the largest divisor of the group that
/// gives every thread a task.
fn query_heads_per_task(group: usize, kv_tasks: usize, threads: usize) -> usize {
    (1..=group)
        .rev()
        .filter(|&n| group.is_multiple_of(n))
        .find(|&n| kv_tasks * (group / n) >= threads)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::query_heads_per_task;

    #[test]
    fn decoding_attention_tasks_keep_a_group_together_unless_threads_idle() {
        // (query heads per key/value head, rows × key/value heads, threads) -> heads a task.
        for (group, kv_tasks, threads, want) in [
            (1, 12, 2, 1),
            (2, 6, 2, 2),
            (4, 8, 16, 2),
            (8, 1, 4, 2),
            (8, 1, 64, 1),
            (6, 2, 6, 2),
            (32, 1, 1, 32),
            (7, 2, 4, 1),
            (7, 4, 4, 7),
        ] {
            assert_eq!(
                query_heads_per_task(group, kv_tasks, threads),
                want,
                "group {group}, {kv_tasks} key/value tasks, {threads} threads"
            );
        }
    }
}
