//! Rotary position embeddings in Hugging Face's rotate-half layout: the table of cosines and
//! sines (with `rope_scaling` applied to the frequencies) and the rotation, forward and backward.

use rayon::prelude::*;

use super::wide;
use crate::config::{Rope, RopeScaling};

/// Cosines and sines of every (position, frequency) pair, `[positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// The table for `positions` positions, computed as `transformers` computes it: inverse
    /// frequencies `1 / theta^(2i/d)` rounded to f32 (then scaled), each angle a single f32
    /// product `position · inv_freq`, and its cosine and sine rounded to f32.
    pub fn new(rope: &Rope, head_dim: usize, positions: usize) -> RopeTable {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / head_dim as f32;
                let base = rope.theta.powf(f64::from(exponent)) as f32;
                scale_frequency(1.0 / base, &rope.scaling)
            })
            .collect();
        let mut cos = vec![0f32; positions * half];
        let mut sin = vec![0f32; positions * half];
        cos.par_chunks_mut(half)
            .zip(sin.par_chunks_mut(half))
            .enumerate()
            .for_each(|(pos, (c, s))| {
                for i in 0..half {
                    let angle = f64::from(pos as f32 * inv_freq[i]);
                    c[i] = angle.cos() as f32;
                    s[i] = angle.sin() as f32;
                }
            });
        RopeTable { half, cos, sin }
    }

    /// Positions the table covers.
    pub fn len(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }
}

/// Applies a `rope_scaling` rule to one inverse frequency.
fn scale_frequency(inv_freq: f32, scaling: &RopeScaling) -> f32 {
    match *scaling {
        RopeScaling::Default => inv_freq,
        RopeScaling::Linear { factor } => (f64::from(inv_freq) / factor) as f32,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            // Long wavelengths are slowed down by `factor`, short ones kept, and the band
            // between interpolated smoothly (Llama 3.1).
            let old = original_max_position_embeddings as f64;
            let f = f64::from(inv_freq);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            let scaled = if wavelen > low_freq_wavelen {
                f / factor
            } else {
                f
            };
            // Wavelengths are finite and positive, so this is `high <= wavelen <= low`.
            let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
            let out = if medium {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            };
            out as f32
        }
    }
}

pub(super) fn rope(
    x: &mut [f32],
    width: usize,
    heads: usize,
    positions: &[u32],
    table: &RopeTable,
    inverse: bool,
) {
    let half = table.half;
    let hd = 2 * half;
    assert!(
        heads * hd <= width && x.len() == positions.len() * width,
        "rope: {} values for {} rows of width {width}, {heads} heads of {hd}",
        x.len(),
        positions.len()
    );
    assert!(
        positions.iter().all(|&p| (p as usize) < table.len()),
        "rope: a position is past the table's {} positions",
        table.len()
    );
    let sign = if inverse { -1.0f32 } else { 1.0 };
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let at = pos as usize * half;
            let (cos, sin) = (&table.cos[at..at + half], &table.sin[at..at + half]);
            wide(
                #[inline(always)]
                || {
                    for head in row[..heads * hd].chunks_exact_mut(hd) {
                        let (a, b) = head.split_at_mut(half);
                        for i in 0..half {
                            let (x1, x2, s) = (a[i], b[i], sign * sin[i]);
                            a[i] = x1 * cos[i] - x2 * s;
                            b[i] = x2 * cos[i] + x1 * s;
                        }
                    }
                },
            )
        });
}
