//! AdamW and the whole-buffer reductions around it (gradient norm, clipping).

use rayon::prelude::*;

use super::{wide, AdamW, ELEMENTS};

pub(super) fn sum_squares(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(ELEMENTS)
        .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
        .collect();
    partial.iter().sum()
}

pub(super) fn scale(x: &mut [f32], factor: f32) {
    x.par_chunks_mut(ELEMENTS)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
}

pub(super) fn adamw(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW) {
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
