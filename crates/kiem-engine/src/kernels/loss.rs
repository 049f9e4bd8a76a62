//! Softmax cross-entropy over the vocabulary, with its gradient.

use rayon::prelude::*;

use super::{fast_exp, lane_max, lane_sum, wide};

pub(super) fn cross_entropy(
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
