//! Token (and learned position) embeddings, forward and backward.

use rayon::prelude::*;

use super::Dims;

pub(super) fn encoder_forward(
    out: &mut [f32],
    tokens: &[u32],
    positions: &[u32],
    wte: &[f32],
    wpe: Option<&[f32]>,
    d: Dims,
) {
    let c = d.channels;
    assert!(
        positions.len() >= d.rows(),
        "encoder_forward: a position per row"
    );
    out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
        let tok = tokens[row] as usize;
        o.copy_from_slice(&wte[tok * c..(tok + 1) * c]);
        if let Some(wpe) = wpe {
            let t = positions[row] as usize;
            for (o, p) in o.iter_mut().zip(&wpe[t * c..(t + 1) * c]) {
                *o += p;
            }
        }
    });
}

pub(super) fn encoder_backward(
    dwte: &mut [f32],
    dwpe: Option<&mut [f32]>,
    dout: &[f32],
    tokens: &[u32],
    positions: &[u32],
    d: Dims,
) {
    let c = d.channels;
    assert!(
        positions.len() >= d.rows(),
        "encoder_backward: a position per row"
    );
    // Rows of dwpe are owned by position (each task adds its position's rows in row order);
    // rows of dwte are scattered, so go serially in row order (cheap next to the matmuls) to
    // stay deterministic.
    if let Some(dwpe) = dwpe {
        dwpe.par_chunks_mut(c)
            .enumerate()
            .take(d.seq)
            .for_each(|(t, dp)| {
                for row in (0..d.rows()).filter(|&r| positions[r] as usize == t) {
                    let g = &dout[row * c..(row + 1) * c];
                    for i in 0..c {
                        dp[i] += g[i];
                    }
                }
            });
    }
    for (row, &tok) in tokens.iter().enumerate().take(d.rows()) {
        let g = &dout[row * c..(row + 1) * c];
        let dw = &mut dwte[tok as usize * c..(tok as usize + 1) * c];
        for i in 0..c {
            dw[i] += g[i];
        }
    }
}
