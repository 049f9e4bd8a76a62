//! Choosing the next token from logits.

use crate::rng::Rng;

/// Samples from `softmax(logits / temperature)` restricted to the `top_k` largest logits
/// (`top_k` 0 = all). Temperature 0 picks the largest logit.
pub fn sample_top_k(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = if top_k == 0 {
        logits.len()
    } else {
        top_k.min(logits.len())
    };
    if k < logits.len() {
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        order.truncate(k);
    }
    let max = order
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = order
        .iter()
        .map(|&i| ((logits[i as usize] - max) / temperature).exp())
        .collect();
    let total: f32 = weights.iter().sum();
    let mut r = rng.uniform() * total;
    for (&id, &w) in order.iter().zip(&weights) {
        if r < w {
            return id;
        }
        r -= w;
    }
    *order.last().unwrap_or(&argmax())
}
