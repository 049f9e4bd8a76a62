//! Layer norm (GPT-2) and RMS norm (Llama), forward and backward.

use rayon::prelude::*;

use super::{reduce_rows, wide, LAYERNORM_EPS};

pub(super) fn layernorm_forward(
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

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_backward(
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

pub(super) fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    eps: f32,
    c: usize,
) {
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .enumerate()
        .for_each(|(row, (o, r))| {
            wide(
                #[inline(always)]
                || {
                    let x = &inp[row * c..(row + 1) * c];
                    let ms = x.iter().map(|v| v * v).sum::<f32>() / c as f32;
                    let s = 1.0 / (ms + eps).sqrt();
                    for i in 0..c {
                        o[i] = x[i] * s * w[i];
                    }
                    *r = s;
                },
            )
        });
}

/// With `y = w · x · s`, `s = (mean(x²) + eps)^-1/2`:
/// `dx = s · (w·g − x · s² · mean(w·g·x))`, `dw = Σ_rows g · x · s`.
pub(super) fn rmsnorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let rows = rstd.len();
    dinp.par_chunks_mut(c).enumerate().for_each(|(row, di)| {
        wide(
            #[inline(always)]
            || {
                let x = &inp[row * c..(row + 1) * c];
                let g = &dout[row * c..(row + 1) * c];
                let s = rstd[row];
                let mut dot = 0.0f32;
                for i in 0..c {
                    dot += w[i] * g[i] * x[i];
                }
                let k = s * s * dot / c as f32;
                for i in 0..c {
                    di[i] += s * (w[i] * g[i] - x[i] * k);
                }
            },
        )
    });
    let mut acc = vec![0f32; c];
    reduce_rows(rows, c, &mut acc, |row, part| {
        let x = &inp[row * c..(row + 1) * c];
        let g = &dout[row * c..(row + 1) * c];
        let s = rstd[row];
        for i in 0..c {
            part[i] += g[i] * x[i] * s;
        }
    });
    for (d, a) in dw.iter_mut().zip(&acc) {
        *d += a;
    }
}
