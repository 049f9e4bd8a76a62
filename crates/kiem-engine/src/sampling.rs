//! Choosing the next token from logits, and the generation loop over a KV cache.

use serde::{Deserialize, Serialize};

use crate::batch::{Batcher, Event};
use crate::kernels::Kernels;
use crate::rng::Rng;
use crate::{EngineError, Gpt, Result};

/// How the next token is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Above 1 discourages tokens already in the sequence (CTRL-style: positive logits
    /// divided, negative multiplied); 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Always the most likely token, no penalty.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::Config(m.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be a finite number > 0");
        }
        Ok(())
    }
}

/// Samples from `softmax(logits / temperature)` restricted to the `top_k` largest logits
/// (`top_k` 0 = all). Temperature 0 picks the largest logit.
pub fn sample_top_k(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    let params = SamplingParams {
        temperature,
        top_k,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 0,
    };
    sample(logits, &params, &[], rng)
}

/// Draws a token id from `logits` (the real vocabulary only) given the tokens so far.
pub fn sample(logits: &[f32], params: &SamplingParams, history: &[u32], rng: &mut Rng) -> u32 {
    let mut logits = logits.to_vec();
    if params.repetition_penalty != 1.0 {
        for &t in history {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = if *x > 0.0 {
                    *x / params.repetition_penalty
                } else {
                    *x * params.repetition_penalty
                };
            }
        }
    }
    if params.temperature == 0.0 {
        return argmax(&logits);
    }
    // Candidates largest first (ties by id), but only as many as the filters need: all of
    // them in id order when neither top-k nor top-p restricts (no sort), the k largest when
    // top-k does (a selection, then a sort of k).
    let descending = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    if params.top_k > 0 && params.top_k < order.len() {
        order.select_nth_unstable_by(params.top_k - 1, descending);
        order.truncate(params.top_k);
        order.sort_unstable_by(descending);
    } else if params.top_p < 1.0 {
        order.sort_unstable_by(descending);
    }
    let max = order
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut weights: Vec<f32> = order
        .iter()
        .map(|&i| ((logits[i as usize] - max) / params.temperature).exp())
        .collect();
    if params.top_p < 1.0 {
        let total: f32 = weights.iter().sum();
        let mut mass = 0.0;
        let mut keep = weights.len();
        for (i, w) in weights.iter().enumerate() {
            mass += w / total;
            if mass >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        weights.truncate(keep);
        order.truncate(keep);
    }
    let total: f32 = weights.iter().sum();
    let mut r = rng.uniform() * total;
    for (&id, &w) in order.iter().zip(&weights) {
        if r < w {
            return id;
        }
        r -= w;
    }
    *order.last().expect("at least one candidate")
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
}

/// Generated tokens of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// What the streaming callback decides after each token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// End this sequence now (e.g. a stop string appeared), with `FinishReason::Stop`.
    Stop,
}

impl<K: Kernels> Gpt<K> {
    /// Generates continuations of several prompts together (one forward step advances every
    /// unfinished sequence). `on_token(sequence, token)` sees each new token as it is drawn
    /// (stop tokens are not emitted) and may stop that sequence. Sequence `i` draws from its own
    /// RNG seeded with `seed + i`, so the same seed gives the same text.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, u32) -> Control,
    ) -> Result<Vec<Generation>> {
        let mut batcher = Batcher::new(self);
        for (i, prompt) in prompts.iter().enumerate() {
            let mut options = options.clone();
            options.sampling.seed = options.sampling.seed.wrapping_add(i as u64);
            batcher
                .add(i as u64, prompt.clone(), options)
                .map_err(|e| EngineError::Shape(format!("prompt {i}: {e}")))?;
        }
        let mut out: Vec<Generation> = prompts
            .iter()
            .map(|_| Generation {
                tokens: Vec::new(),
                finish: FinishReason::Length,
            })
            .collect();
        while !batcher.is_empty() {
            batcher.step(&mut |id, event| {
                let generation = &mut out[id as usize];
                match event {
                    Event::Token(token) => {
                        generation.tokens.push(token);
                        return on_token(id as usize, token);
                    }
                    Event::Finished(reason) => generation.finish = reason,
                }
                Control::Continue
            })?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// How often each id is drawn in `n` samples.
    fn counts(logits: &[f32], p: &SamplingParams, n: usize) -> Vec<usize> {
        let mut rng = Rng::new(11);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[sample(logits, p, &[], &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn draws_follow_the_softmax_and_the_filters() {
        let logits = [1.0f32, 3.0, 0.0, 2.0, 3.0, -1.0];
        // Plain temperature sampling (no sort): frequencies match softmax(logits / T).
        let n = 60_000;
        let t = 0.7;
        let z: f64 = logits.iter().map(|&l| (f64::from(l) / t).exp()).sum();
        let got = counts(&logits, &params(t as f32, 0, 1.0), n);
        for (i, &l) in logits.iter().enumerate() {
            let want = (f64::from(l) / t).exp() / z;
            let freq = got[i] as f64 / n as f64;
            assert!((freq - want).abs() < 0.01, "id {i}: {freq} vs {want}");
        }
        // top-k 2 keeps the two largest (ids 1 and 4, tied), each about half the time.
        let got = counts(&logits, &params(1.0, 2, 1.0), 10_000);
        assert_eq!(got[0] + got[2] + got[3] + got[5], 0);
        assert!(got[1].abs_diff(got[4]) < 600, "{got:?}");
        // top-k 3 adds id 3; top-p 0.3 keeps only the first of the tied pair (id 1).
        let got = counts(&logits, &params(1.0, 3, 1.0), 10_000);
        assert!(got[3] > 0 && got[0] + got[2] + got[5] == 0, "{got:?}");
        let got = counts(&logits, &params(1.0, 0, 0.3), 1_000);
        assert_eq!(got[1], 1_000, "{got:?}");
        // Temperature 0 is the argmax; the same seed gives the same draws.
        assert_eq!(counts(&logits, &params(0.0, 0, 1.0), 10)[1], 10);
        assert_eq!(
            counts(&logits, &params(0.9, 4, 0.95), 500),
            counts(&logits, &params(0.9, 4, 0.95), 500)
        );
    }
}
