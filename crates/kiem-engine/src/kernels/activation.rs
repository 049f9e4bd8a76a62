//! GELU (tanh approximation) and SwiGLU, forward and backward.

use rayon::prelude::*;

use super::simd::fast_tanh;
use super::{fast_exp, wide, ELEMENTS};

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2 / pi)

pub(super) fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(ELEMENTS)
        .zip(inp.par_chunks(ELEMENTS))
        .for_each(|(o, x)| {
            wide(
                #[inline(always)]
                || {
                    for (o, &x) in o.iter_mut().zip(x) {
                        let cube = 0.044715 * x * x * x;
                        *o = 0.5 * x * (1.0 + fast_tanh(GELU_SCALE * (x + cube)));
                    }
                },
            )
        });
}

pub(super) fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_chunks_mut(ELEMENTS)
        .zip(inp.par_chunks(ELEMENTS).zip(dout.par_chunks(ELEMENTS)))
        .for_each(|(di, (x, g))| {
            wide(
                #[inline(always)]
                || {
                    for ((di, &x), &g) in di.iter_mut().zip(x).zip(g) {
                        let cube = 0.044715 * x * x * x;
                        let arg = GELU_SCALE * (x + cube);
                        let th = fast_tanh(arg);
                        let sech2 = 1.0 - th * th;
                        let local = 0.5 * (1.0 + th)
                            + x * 0.5 * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
                        *di = local * g;
                    }
                },
            )
        });
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

pub(super) fn swiglu_forward(out: &mut [f32], inp: &[f32], h: usize) {
    assert!(
        h > 0 && inp.len() == 2 * out.len() && out.len().is_multiple_of(h),
        "swiglu_forward: rows of gate | up"
    );
    out.par_chunks_mut(h)
        .zip(inp.par_chunks(2 * h))
        .for_each(|(o, x)| {
            wide(
                #[inline(always)]
                || {
                    let (gate, up) = x.split_at(h);
                    for i in 0..h {
                        o[i] = gate[i] * sigmoid(gate[i]) * up[i];
                    }
                },
            )
        });
}

pub(super) fn swiglu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32], h: usize) {
    assert!(
        h > 0
            && dinp.len() == inp.len()
            && inp.len() == 2 * dout.len()
            && dout.len().is_multiple_of(h),
        "swiglu_backward: rows of gate | up"
    );
    dinp.par_chunks_mut(2 * h)
        .zip(inp.par_chunks(2 * h).zip(dout.par_chunks(h)))
        .for_each(|(di, (x, g))| {
            wide(
                #[inline(always)]
                || {
                    let (gate, up) = x.split_at(h);
                    let (dgate, dup) = di.split_at_mut(h);
                    for i in 0..h {
                        let sg = sigmoid(gate[i]);
                        dup[i] = g[i] * gate[i] * sg;
                        dgate[i] = g[i] * up[i] * sg * (1.0 + gate[i] * (1.0 - sg));
                    }
                },
            )
        });
}
