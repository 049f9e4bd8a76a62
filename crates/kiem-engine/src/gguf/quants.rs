//! ggml tensor types: their block layouts, dequantization of every type kiem reads (F32, F16,
//! BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), and ggml's reference quantizers for
//! the types kiem writes (Q8_0, Q4_0, Q4_1), bit for bit as `ggml-quants.c` computes them, and
//! its Q4_K quantizer (for decoding from Q4_K weights).

use half::{bf16, f16};

/// A ggml tensor type kiem reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// The type of a ggml type id; `Err` names an id kiem does not read.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::BF16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            other => {
                let name = match other {
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    15 => "Q8_K",
                    16..=23 | 29 => "an IQ type",
                    24..=27 => "an integer type",
                    28 => "F64",
                    34 | 35 => "a ternary type",
                    39 => "MXFP4",
                    _ => "unknown",
                };
                return Err(format!(
                    "tensor type {other} ({name}) is not supported: kiem reads F32, F16, BF16, \
                     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K"
                ));
            }
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
        }
    }

    /// Bytes of `elements` values (a whole number of blocks), `None` on overflow.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        let (n, b) = self.block();
        elements.is_multiple_of(n as u64).then_some(())?;
        (elements / n as u64).checked_mul(b as u64)
    }
}

fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of type `t`) into `out` (`out.len()` values).
///
/// # Panics
/// When `bytes` does not hold exactly `out.len()` values of type `t` (the reader checks sizes
/// before it gets here).
pub fn dequantize(t: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (n, b) = t.block();
    assert_eq!(
        t.bytes_for(out.len() as u64),
        Some(bytes.len() as u64),
        "dequantize: {} bytes for {} {} values",
        bytes.len(),
        out.len(),
        t.name()
    );
    let blocks = bytes.chunks_exact(b).zip(out.chunks_exact_mut(n));
    match t {
        GgmlType::F32 => {
            for (x, y) in blocks {
                y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            }
        }
        GgmlType::F16 => {
            for (x, y) in blocks {
                y[0] = half(x);
            }
        }
        GgmlType::BF16 => {
            for (x, y) in blocks {
                y[0] = bf16::from_le_bytes([x[0], x[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (x, y) in blocks {
                let d = half(x);
                for (v, &q) in y.iter_mut().zip(&x[2..34]) {
                    *v = f32::from(q as i8) * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (x, y) in blocks {
                let d = half(x);
                let qs = &x[2..18];
                for j in 0..16 {
                    y[j] = (i32::from(qs[j] & 0xF) - 8) as f32 * d;
                    y[j + 16] = (i32::from(qs[j] >> 4) - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (x, y) in blocks {
                let (d, m) = (half(x), half(&x[2..]));
                let qs = &x[4..20];
                for j in 0..16 {
                    y[j] = f32::from(qs[j] & 0xF) * d + m;
                    y[j + 16] = f32::from(qs[j] >> 4) * d + m;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let with_min = t == GgmlType::Q5_1;
            for (x, y) in blocks {
                let d = half(x);
                let (m, rest) = if with_min {
                    (half(&x[2..]), &x[4..])
                } else {
                    (0.0, &x[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    let (q0, q1) = ((qs[j] & 0xF) | h0, (qs[j] >> 4) | h1);
                    if with_min {
                        y[j] = f32::from(q0) * d + m;
                        y[j + 16] = f32::from(q1) * d + m;
                    } else {
                        y[j] = (i32::from(q0) - 16) as f32 * d;
                        y[j + 16] = (i32::from(q1) - 16) as f32 * d;
                    }
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let five = t == GgmlType::Q5_K;
            for (x, y) in blocks {
                let (d, min) = (half(x), half(&x[2..]));
                let scales = &x[4..16];
                let (qh, mut ql) = if five {
                    (&x[16..48], &x[48..176])
                } else {
                    (&x[..0], &x[16..144])
                };
                let (mut u1, mut u2) = (1u8, 2u8);
                let mut out = y.iter_mut();
                for chunk in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                    let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                    let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
                    let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
                    for l in 0..32 {
                        let high = if five && qh[l] & u1 != 0 { 16.0 } else { 0.0 };
                        *out.next().expect("256 values") =
                            d1 * (f32::from(ql[l] & 0xF) + high) - m1;
                    }
                    for l in 0..32 {
                        let high = if five && qh[l] & u2 != 0 { 16.0 } else { 0.0 };
                        *out.next().expect("256 values") = d2 * (f32::from(ql[l] >> 4) + high) - m2;
                    }
                    ql = &ql[32..];
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
        }
        GgmlType::Q6_K => {
            for (x, y) in blocks {
                let (mut ql, mut qh) = (&x[..128], &x[128..192]);
                let mut sc = &x[192..208];
                let d = half(&x[208..]);
                for half_block in y.chunks_exact_mut(128) {
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u32| -> f32 {
                            f32::from(((low | (((qh[l] >> shift) & 3) << 4)) as i8) - 32)
                        };
                        let s = |k: usize| f32::from(sc[is + k] as i8);
                        half_block[l] = d * s(0) * q(ql[l] & 0xF, 0);
                        half_block[l + 32] = d * s(2) * q(ql[l + 32] & 0xF, 2);
                        half_block[l + 64] = d * s(4) * q(ql[l] >> 4, 4);
                        half_block[l + 96] = d * s(6) * q(ql[l + 32] >> 4, 6);
                    }
                    ql = &ql[64..];
                    qh = &qh[32..];
                    sc = &sc[8..];
                }
            }
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a K-quant block.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// C's `roundf`: halves away from zero.
fn roundf(x: f32) -> f32 {
    x.round()
}

/// Quantizes `values` (a whole number of blocks) to type `t` as ggml's reference quantizers
/// do. Types kiem writes: F32, F16, BF16, Q8_0, Q4_0, Q4_1; and Q4_K.
///
/// # Panics
/// For another type, or a length that is not a whole number of blocks.
pub fn quantize(t: GgmlType, values: &[f32]) -> Vec<u8> {
    let (n, b) = t.block();
    assert!(values.len().is_multiple_of(n), "quantize: not whole blocks");
    let mut out = Vec::with_capacity(values.len() / n * b);
    for x in values.chunks_exact(n) {
        match t {
            GgmlType::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
            // `half` rounds to nearest even; ggml also turns NaN into 0x7E00.
            GgmlType::F16 => {
                let h = if x[0].is_nan() {
                    f16::from_bits(0x7E00)
                } else {
                    f16::from_f32(x[0])
                };
                out.extend_from_slice(&h.to_le_bytes());
            }
            GgmlType::BF16 => {
                let u = x[0].to_bits();
                let h = if (u & 0x7fff_ffff) > 0x7f80_0000 {
                    (u >> 16) | 64
                } else {
                    (u + (0x7fff + ((u >> 16) & 1))) >> 16
                };
                out.extend_from_slice(&(h as u16).to_le_bytes());
            }
            GgmlType::Q8_0 => {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|&v| roundf(v * id) as i8 as u8));
            }
            GgmlType::Q4_0 => {
                // The signed value of largest magnitude (the first on a tie).
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in x {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                // ggml: `(int8_t)(x*id + 8.5f)` truncates toward zero; `x*id + 8.5f` is fused
                // into one rounding where the compiler emits FMA, as on x86-64 builds of ggml
                // with FMA: `mul_add` gives that single rounding.
                let q = |v: f32| (v.mul_add(id, 8.5) as i8).min(15) as u8;
                for j in 0..16 {
                    out.push(q(x[j]) | (q(x[j + 16]) << 4));
                }
            }
            GgmlType::Q4_1 => {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
                for j in 0..16 {
                    out.push(q(x[j]) | (q(x[j + 16]) << 4));
                }
            }
            GgmlType::Q4_K => out.extend_from_slice(&quantize_q4_k(x)),
            other => panic!("kiem does not write {}", other.name()),
        }
    }
    out
}

/// ggml's `nearest_int`: round half to even (for the small values it is given).
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// ggml's `quantize_row_q4_K_ref` for one 256-weight super-block: each 32-weight sub-block's
/// scale and min by `make_qkx2_quants` (weighted least squares over 21 trial scales), both
/// quantized to 6 bits against the largest, then the weights against those.
fn quantize_q4_k(x: &[f32]) -> [u8; 144] {
    let mut levels = [0u8; 256];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let sub = &x[32 * j..32 * (j + 1)];
        let sum_x2 = sub.iter().fold(0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + sub[l].abs());
        (scales[j], mins[j]) = make_qkx2_quants(sub, &weights, &mut levels[32 * j..32 * (j + 1)]);
    }
    let max_scale = scales.iter().fold(0f32, |m, &s| if s > m { s } else { m });
    let max_min = mins.iter().fold(0f32, |m, &s| if s > m { s } else { m });
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut block = [0u8; 144];
    {
        let packed = &mut block[4..16];
        for j in 0..8 {
            // ggml stores these through uint8_t: the wrap of a negative value included.
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                packed[j] = ls;
                packed[j + 4] = lm;
            } else {
                packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                packed[j - 4] |= (ls >> 4) << 6;
                packed[j] |= (lm >> 4) << 6;
            }
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    block[0..2].copy_from_slice(&d.to_le_bytes());
    block[2..4].copy_from_slice(&dmin.to_le_bytes());
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &block[4..16]);
        let d = d.to_f32() * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for i in 0..32 {
            let l = nearest_int((x[32 * j + i] + dm) / d);
            levels[32 * j + i] = l.clamp(0, 15) as u8;
        }
    }
    for (chunk, q) in block[16..].chunks_exact_mut(32).enumerate() {
        for (l, byte) in q.iter_mut().enumerate() {
            *byte = levels[64 * chunk + l] | (levels[64 * chunk + l + 32] << 4);
        }
    }
    block
}

/// ggml's `make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1, 0.1, 20, false)`: 4-bit
/// levels `l` with `x ≈ scale·l - min` minimizing the weighted squared error; returns
/// (scale, min).
fn make_qkx2_quants(x: &[f32], weights: &[f32], levels: &mut [u8]) -> (f32, f32) {
    const NMAX: i32 = 15;
    let (rmin, rdelta, nstep) = (-1.0f32, 0.1f32, 20);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..x.len() {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let mut iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..x.len() {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut trial = [0u8; 32];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + NMAX as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..x.len() {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
            trial[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0f32;
            for i in 0..x.len() {
                let diff = this_scale * f32::from(trial[i]) + this_min - x[i];
                error += weights[i] * (diff * diff);
            }
            if error < best_error {
                levels.copy_from_slice(&trial[..x.len()]);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let q = quantize(GgmlType::Q8_0, &x);
        assert_eq!(q.len(), 2 * 34);
        let mut y = vec![0f32; 64];
        dequantize(GgmlType::Q8_0, &q, &mut y);
        for (block, out) in x.chunks(32).zip(y.chunks(32)) {
            let step = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in block.iter().zip(out) {
                assert!(
                    (a - b).abs() <= 0.51 * step + 1e-3 * step.max(1e-6),
                    "{a} {b}"
                );
            }
        }
    }

    #[test]
    fn unsupported_types_are_named() {
        let e = GgmlType::from_id(10).unwrap_err();
        assert!(e.contains("Q2_K"), "{e}");
        assert!(GgmlType::from_id(999).unwrap_err().contains("999"));
    }
}
