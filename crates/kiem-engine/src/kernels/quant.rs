//! Quantized weight matrices (ggml's block formats) and the thin products decoding reads them
//! with: integer dot products of the weights' blocks with the input quantized to 8 bits.

use rayon::prelude::*;

use super::matmul::by_column_blocks;
use super::{level, Level, SKINNY_ROWS};

mod gemm;
pub use gemm::{matmul_wide_quant, wide_quant_native};

/// How a [`QuantMatrix`] stores its weights: ggml's Q8_0, Q4_0 or Q4_1 blocks of 32 weights
/// along each row, or Q4_K super-blocks of 256 (eight 32-weight sub-blocks, each with its own
/// 6-bit scale and min), quantized by ggml's reference quantizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum QuantKind {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
}

impl QuantKind {
    pub(crate) fn ggml(self) -> crate::gguf::GgmlType {
        use crate::gguf::GgmlType;
        match self {
            QuantKind::Q8_0 => GgmlType::Q8_0,
            QuantKind::Q4_0 => GgmlType::Q4_0,
            QuantKind::Q4_1 => GgmlType::Q4_1,
            QuantKind::Q4_K => GgmlType::Q4_K,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4_0 => "q4_0",
            QuantKind::Q4_1 => "q4_1",
            QuantKind::Q4_K => "q4_k",
        }
    }

    /// The kind that stores a ggml type's blocks as they are (`None`: no kernel reads it).
    pub fn of_ggml(t: crate::gguf::GgmlType) -> Option<Self> {
        use crate::gguf::GgmlType;
        match t {
            GgmlType::Q8_0 => Some(QuantKind::Q8_0),
            GgmlType::Q4_0 => Some(QuantKind::Q4_0),
            GgmlType::Q4_1 => Some(QuantKind::Q4_1),
            GgmlType::Q4_K => Some(QuantKind::Q4_K),
            _ => None,
        }
    }

    /// Weights a row must hold a whole number of: ggml's block (256 for Q4_K).
    pub fn row_multiple(self) -> usize {
        self.ggml().block().0
    }

    /// Whether each 32-weight block has an offset besides its scale (`w = scale·q + offset`,
    /// `q` unsigned) rather than a scale alone (`w = scale·q`, `q` signed).
    fn has_offset(self) -> bool {
        matches!(self, QuantKind::Q4_1 | QuantKind::Q4_K)
    }

    fn nibbles(self) -> bool {
        self != QuantKind::Q8_0
    }

    /// Bytes a weight takes as stored here: the weight, and its block's f32 scale (and offset).
    pub fn bytes_per_weight(self) -> f64 {
        let weight = if self.nibbles() { 0.5 } else { 1.0 };
        let per_block = if self.has_offset() { 8.0 } else { 4.0 };
        weight + per_block / QUANT_BLOCK as f64
    }
}

/// Weights per quantization block (a Q4_K super-block holds eight).
pub const QUANT_BLOCK: usize = 32;

/// A matrix `W[c_out, c_in]` quantized for decoding, in a layout the thin product streams:
/// each 32-weight block's scale (and offset) as f32, ggml's fp16 values widened once (a Q4_K
/// sub-block's are its super-block's scale times its 6-bit scale, and minus its min, computed
/// as ggml dequantizes), and its weights: Q8_0 one signed byte each in order; the 4-bit kinds
/// two a byte, Q4_0's minus 8 when read, each row's blocks in pairs (0 and 1, 2 and 3, ...):
/// byte k of a pair's 32 holds weight k of the first block in its low nibble and weight k of
/// the second in its high one (so one load and a shift give 64 weights in order; Q4_K's ggml
/// layout); a row's odd last block alone holds weights k and k + 16 in byte k of its 16
/// (Q4_0's ggml layout).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub kind: QuantKind,
    pub c_in: usize,
    pub c_out: usize,
    scales: Vec<f32>,
    /// Empty for kinds without offsets.
    offsets: Vec<f32>,
    q: Vec<u8>,
}

impl QuantMatrix {
    /// `c_out` rows of `c_in` zeros; `None` when rows are not whole blocks of `kind`.
    pub fn zeros(kind: QuantKind, c_in: usize, c_out: usize) -> Option<Self> {
        if c_in == 0 || !c_in.is_multiple_of(kind.row_multiple()) {
            return None;
        }
        let blocks = c_in / QUANT_BLOCK * c_out;
        let per_byte = if kind.nibbles() { 2 } else { 1 };
        Some(Self {
            kind,
            c_in,
            c_out,
            scales: vec![0f32; blocks],
            offsets: vec![0f32; if kind.has_offset() { blocks } else { 0 }],
            q: vec![0u8; c_in * c_out / per_byte],
        })
    }

    /// Quantizes `w[c_out, c_in]` as ggml's reference quantizer does; `None` when rows are
    /// not whole blocks.
    pub fn quantize(kind: QuantKind, w: &[f32], c_in: usize, c_out: usize) -> Option<Self> {
        if w.len() < c_in * c_out {
            return None;
        }
        let mut m = Self::zeros(kind, c_in, c_out)?;
        m.fill_blocks(|n, values_at| {
            crate::gguf::quants::quantize(kind.ggml(), &w[values_at..values_at + n])
        });
        Some(m)
    }

    /// The matrix a GGUF file stores as `bytes` (ggml blocks, rows of `c_in` weights), read
    /// as it is; `None` for a type no kernel here reads, or a size that does not match.
    pub fn from_ggml(
        t: crate::gguf::GgmlType,
        bytes: &[u8],
        c_in: usize,
        c_out: usize,
    ) -> Option<Self> {
        let kind = QuantKind::of_ggml(t)?;
        if t.bytes_for((c_in * c_out) as u64) != Some(bytes.len() as u64) {
            return None;
        }
        let mut m = Self::zeros(kind, c_in, c_out)?;
        let (n, b) = t.block();
        m.fill_blocks(|_, values_at| bytes[values_at / n * b..][..b].to_vec());
        Some(m)
    }

    /// Fills every ggml block (in parallel) from `block(n, at)`: the ggml bytes of the `n`
    /// weights starting at flat index `at`.
    fn fill_blocks(&mut self, block: impl Fn(usize, usize) -> Vec<u8> + Sync) {
        let kind = self.kind;
        let n = kind.row_multiple();
        let subs = n / QUANT_BLOCK;
        let q_per = if kind.nibbles() { n / 2 } else { n };
        // Kinds without offsets fill a scratch copy that is dropped.
        let mut offsets = vec![0f32; self.scales.len()];
        self.scales
            .par_chunks_mut(subs)
            .zip(offsets.par_chunks_mut(subs))
            .zip(self.q.par_chunks_mut(q_per))
            .enumerate()
            .for_each(|(i, ((scales, offsets), q))| {
                unpack_ggml_block(kind, &block(n, i * n), scales, offsets, q);
            });
        if kind.has_offset() {
            self.offsets = offsets;
        }
        if matches!(kind, QuantKind::Q4_0 | QuantKind::Q4_1) {
            let row_bytes = self.c_in / 2;
            self.q.par_chunks_mut(row_bytes).for_each(pair_blocks);
        }
    }

    /// Adds `other`'s rows after these (same kind and width).
    pub fn append_rows(&mut self, other: QuantMatrix) {
        assert!(
            other.kind == self.kind && other.c_in == self.c_in,
            "append_rows: a {:?} matrix {} wide after a {:?} one {} wide",
            other.kind,
            other.c_in,
            self.kind,
            self.c_in
        );
        self.c_out += other.c_out;
        self.scales.extend_from_slice(&other.scales);
        self.offsets.extend_from_slice(&other.offsets);
        self.q.extend_from_slice(&other.q);
    }

    /// The matrix with its rows reordered: row `i` is this one's row `order[i]`.
    pub fn with_row_order(&self, order: &[usize]) -> Self {
        assert_eq!(order.len(), self.c_out, "with_row_order: one index per row");
        let blocks = self.c_in / QUANT_BLOCK;
        let q_row = self.q.len() / self.c_out;
        let pick = |v: &[f32]| -> Vec<f32> {
            if v.is_empty() {
                return Vec::new();
            }
            order
                .iter()
                .flat_map(|&r| &v[r * blocks..(r + 1) * blocks])
                .copied()
                .collect()
        };
        Self {
            kind: self.kind,
            c_in: self.c_in,
            c_out: self.c_out,
            scales: pick(&self.scales),
            offsets: pick(&self.offsets),
            q: order
                .iter()
                .flat_map(|&r| &self.q[r * q_row..(r + 1) * q_row])
                .copied()
                .collect(),
        }
    }

    /// Every weight as the thin product uses it, `[c_out, c_in]`: the quantized value times
    /// its block's scale (plus its offset).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.c_out * self.c_in];
        self.dequantize_into(&mut out);
        out
    }

    /// [`QuantMatrix::dequantize`] into `out` (`c_out · c_in` values).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        out[..self.c_out * self.c_in]
            .par_chunks_exact_mut(QUANT_BLOCK)
            .enumerate()
            .for_each(|(i, block)| self.dequantize_block(i, block));
    }

    /// Row `j` (`c_in` values) into `out`.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let blocks = self.c_in / QUANT_BLOCK;
        for (b, block) in out[..self.c_in].chunks_exact_mut(QUANT_BLOCK).enumerate() {
            self.dequantize_block(j * blocks + b, block);
        }
    }

    /// Block `i` (counted over the whole matrix) into `out`.
    fn dequantize_block(&self, i: usize, out: &mut [f32]) {
        let blocks = self.c_in / QUANT_BLOCK;
        let q = weight_block(self, i / blocks, i % blocks);
        let scale = self.scales[i];
        match self.offsets.get(i) {
            Some(&offset) => {
                for (w, &q) in out.iter_mut().zip(&q) {
                    *w = f32::from(q) * scale + offset;
                }
            }
            None => {
                for (w, &q) in out.iter_mut().zip(&q) {
                    *w = f32::from(q) * scale;
                }
            }
        }
    }

    /// Bytes a product reads: the weights and their scales (and offsets).
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    /// Reads every byte a product reads once, on all threads (for the bandwidth bound).
    pub fn stream(&self) -> u32 {
        let weights = self
            .q
            .par_chunks(1 << 16)
            .map(|chunk| {
                // SAFETY: every bit pattern is a valid u64, so viewing the aligned middle of
                // the bytes as u64 words is sound.
                let (head, words, tail) = unsafe { chunk.align_to::<u64>() };
                let bytes = head.iter().chain(tail).map(|&b| u64::from(b)).sum::<u64>();
                words.iter().fold(bytes, |s, &w| s.wrapping_add(w)) as u32
            })
            .reduce(|| 0, u32::wrapping_add);
        let floats = |v: &[f32]| {
            v.par_chunks(1 << 16)
                .map(super::streaming_read_f32)
                .reduce(|| 0, u32::wrapping_add)
        };
        weights
            .wrapping_add(floats(&self.scales))
            .wrapping_add(floats(&self.offsets))
    }
}

/// One ggml block of `kind` (32 weights, or a Q4_K super-block of 256) into `scales` and
/// `offsets` (one per 32 weights) and the weights `q` as ggml packs them (Q4_0 and Q4_1 blocks
/// are paired per row afterwards: [`pair_blocks`]).
fn unpack_ggml_block(
    kind: QuantKind,
    bytes: &[u8],
    scales: &mut [f32],
    offsets: &mut [f32],
    q: &mut [u8],
) {
    let half = |at: usize| half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
    match kind {
        QuantKind::Q8_0 => {
            scales[0] = half(0);
            q.copy_from_slice(&bytes[2..34]);
        }
        QuantKind::Q4_0 => {
            scales[0] = half(0);
            q.copy_from_slice(&bytes[2..18]);
        }
        QuantKind::Q4_1 => {
            scales[0] = half(0);
            offsets[0] = half(2);
            q.copy_from_slice(&bytes[4..20]);
        }
        QuantKind::Q4_K => {
            let (d, min) = (half(0), half(2));
            for j in 0..8 {
                let (sc, m) = crate::gguf::quants::scale_min_k4(j, &bytes[4..16]);
                scales[j] = d * f32::from(sc);
                offsets[j] = -(min * f32::from(m));
            }
            // Sub-blocks 2p and 2p + 1 share 32 bytes, as [`QuantMatrix`] pairs blocks.
            q.copy_from_slice(&bytes[16..144]);
        }
    }
}

/// A row of 4-bit blocks in ggml's layout (weights k and k + 16 of a block in its byte k) with
/// its blocks paired as [`QuantMatrix`] keeps them; an odd last block stays as it is.
fn pair_blocks(row: &mut [u8]) {
    for pair in row.chunks_exact_mut(32) {
        let (first, second) = pair.split_at(16);
        let nibble = |block: &[u8], k: usize| {
            if k < 16 {
                block[k] & 0xF
            } else {
                block[k - 16] >> 4
            }
        };
        let paired: [u8; 32] = std::array::from_fn(|k| nibble(first, k) | (nibble(second, k) << 4));
        pair.copy_from_slice(&paired);
    }
}

/// Rows of inputs quantized as ggml's Q8_0 quantizes weights (32 values a block, scale
/// `max |x| / 127`, kept in f32): what the integer dot products multiply the weights by.
struct QuantRows {
    q: Vec<i8>,
    scales: Vec<f32>,
    /// For weights with offsets: each block's eight lane sums (values 4l..4l+3), as f32.
    lane_sums: Vec<f32>,
}

impl QuantRows {
    fn new(inp: &[f32], lane_sums: bool) -> Self {
        let mut q = vec![0i8; inp.len()];
        let mut scales = vec![0f32; inp.len() / QUANT_BLOCK];
        super::wide(
            #[inline(always)]
            || {
                for (b, scale) in scales.iter_mut().enumerate() {
                    let at = b * QUANT_BLOCK;
                    *scale = quantize_input_block(&inp[at..], &mut q[at..]);
                }
            },
        );
        let lane_sums = if lane_sums {
            q.chunks_exact(4)
                .map(|l| l.iter().map(|&v| i32::from(v)).sum::<i32>() as f32)
                .collect()
        } else {
            Vec::new()
        };
        Self {
            q,
            scales,
            lane_sums,
        }
    }
}

/// One block of inputs (32 values) into `q` as ggml's Q8_0 quantizes it; returns its scale.
/// Written to vectorize inside [`super::wide`] (a libm `roundf` per value did not).
#[inline(always)]
fn quantize_input_block(x: &[f32], q: &mut [i8]) -> f32 {
    let (x, q) = (&x[..QUANT_BLOCK], &mut q[..QUANT_BLOCK]);
    // The largest magnitude (a max is exact, so any order gives the same value).
    let mut lanes = [0f32; QUANT_BLOCK / 2];
    for k in 0..QUANT_BLOCK / 2 {
        lanes[k] = x[k].abs().max(x[k + QUANT_BLOCK / 2].abs());
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for k in 0..QUANT_BLOCK {
        q[k] = round_half_away(x[k] * id) as i8;
    }
    d
}

/// `x.round()` (halves away from zero, as C's `roundf`) from a truncation, which vectorizes:
/// `x - trunc(x)` is exact.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// Weight block `b` of row `j` as 32 bytes: signed (Q8_0, Q4_0) or unsigned 4-bit values.
#[inline(always)]
fn weight_block(w: &QuantMatrix, j: usize, b: usize) -> [i8; QUANT_BLOCK] {
    let start = j * w.c_in + b * QUANT_BLOCK;
    if w.kind == QuantKind::Q8_0 {
        return std::array::from_fn(|k| w.q[start + k] as i8);
    }
    let bias = if w.kind == QuantKind::Q4_0 { 8 } else { 0 };
    let blocks = w.c_in / QUANT_BLOCK;
    // The block's 16 bytes (an odd last block) or its pair's 32, and which nibble it takes.
    let (bytes, high) = if b + 1 == blocks && blocks % 2 == 1 {
        (&w.q[start / 2..start / 2 + 16], None)
    } else {
        let pair = (j * w.c_in + (b & !1) * QUANT_BLOCK) / 2;
        (&w.q[pair..pair + 32], Some(b % 2 == 1))
    };
    std::array::from_fn(|k| {
        let nibble = match high {
            Some(false) => bytes[k] & 0xF,
            Some(true) => bytes[k] >> 4,
            None if k < 16 => bytes[k] & 0xF,
            None => bytes[k - 16] >> 4,
        };
        nibble as i8 - bias
    })
}

/// `out[rows, c_out] = inp[rows, c_in] · Wᵀ (+ bias)` for few rows with a quantized `W`:
/// decoding reads about a byte (Q8_0) or half a byte (the 4-bit kinds) per weight. As
/// llama.cpp does, each input row is quantized to Q8_0 blocks and every block's dot product is
/// taken in integers (exact), then scaled by the two blocks' scales (a block's offset times
/// the input block's sum is added); so the result differs from the product with the
/// dequantized weights by the inputs' quantization (about 0.4% of a block's largest input).
/// Each row's result is independent of the others, and every SIMD level gives the same bits:
/// eight lane sums (bytes 4l..4l+3 of each block), accumulated in block order with one fused
/// multiply-add each (a second for the offset), then added lane by lane in order.
pub fn matmul_thin_quant(
    out: &mut [f32],
    inp: &[f32],
    w: &QuantMatrix,
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    let rows = inp.len() / c_in;
    assert!(
        rows <= SKINNY_ROWS,
        "matmul_thin_quant takes at most {SKINNY_ROWS} rows"
    );
    assert!(
        w.c_in == c_in && w.c_out >= c_out && out.len() >= rows * c_out && inp.len() == rows * c_in,
        "matmul_thin_quant: shapes"
    );
    let x = QuantRows::new(inp, w.kind.has_offset());
    let blocks = c_in / QUANT_BLOCK;
    by_column_blocks(out, rows, c_out, bias, |acc, j0, j1| {
        #[cfg(target_arch = "x86_64")]
        match level() {
            Level::Avx512 if avx512_vnni() => {
                // SAFETY: the CPU has AVX-512 F/BW/VL, VNNI and FMA (`level`, `avx512_vnni`);
                // the asserts above bound every block read: rows j < c_out <= w.c_out of c_in
                // weights, input rows of c_in values.
                unsafe { quant_dots_avx512(acc, &x, w, rows, blocks, j0, j1) };
                return;
            }
            Level::Avx512 | Level::Avx2 => {
                // SAFETY: the CPU has AVX2 and FMA (`level`); bounds as above.
                unsafe { quant_dots_avx2(acc, &x, w, rows, blocks, j0, j1) };
                return;
            }
            Level::Base => {}
        }
        quant_dots_portable(acc, &x, w, rows, blocks, j0, j1);
    });
}

/// Whether the CPU has AVX-512 VNNI (byte dot products in one instruction).
#[cfg(target_arch = "x86_64")]
fn avx512_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| std::is_x86_feature_detected!("avx512vnni"))
}

/// The reference form of [`matmul_thin_quant`]'s block loop, which the SIMD forms match bit
/// for bit.
fn quant_dots_portable(
    acc: &mut [f32],
    x: &QuantRows,
    w: &QuantMatrix,
    rows: usize,
    blocks: usize,
    j0: usize,
    j1: usize,
) {
    let (width, c_in) = (j1 - j0, blocks * QUANT_BLOCK);
    for j in j0..j1 {
        for r in 0..rows {
            let mut lanes = [0f32; 8];
            for b in 0..blocks {
                let wq = weight_block(w, j, b);
                let xq = &x.q[r * c_in + b * QUANT_BLOCK..][..QUANT_BLOCK];
                let xscale = x.scales[r * blocks + b];
                let scale = w.scales[j * blocks + b] * xscale;
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let dot: i32 = (4 * l..4 * l + 4)
                        .map(|k| i32::from(wq[k]) * i32::from(xq[k]))
                        .sum();
                    *lane = (dot as f32).mul_add(scale, *lane);
                }
                if let Some(&offset) = w.offsets.get(j * blocks + b) {
                    let sums = &x.lane_sums[(r * blocks + b) * 8..][..8];
                    for (lane, &sum) in lanes.iter_mut().zip(sums) {
                        *lane = sum.mul_add(offset * xscale, *lane);
                    }
                }
            }
            acc[r * width + j - j0] += lanes.iter().fold(0f32, |s, &v| s + v);
        }
    }
}

/// Where one tile of [`matmul_thin_quant`]'s block loop reads and writes: input rows
/// `r0..r0 + G` against weight rows `j..j + J`, into `acc` (`width` columns from `j0`).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Tile<'a> {
    x: &'a QuantRows,
    w: &'a QuantMatrix,
    blocks: usize,
    r0: usize,
    width: usize,
    j0: usize,
}

/// Weight rows the SIMD forms take in turn while every group of input rows reads them (they
/// stay in cache between groups).
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 16;

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// Adds a tile's sums (eight lanes each, `[weight row][input row]`) to `acc`, lanes in
    /// order.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    unsafe fn finish<const J: usize, const G: usize>(
        &self,
        acc: &mut [f32],
        j: usize,
        sums: &[[std::arch::x86_64::__m256; G]; J],
    ) {
        use std::arch::x86_64::_mm256_storeu_ps;
        for (u, row_sums) in sums.iter().enumerate() {
            for (g, sum) in row_sums.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *sum);
                acc[(self.r0 + g) * self.width + j + u - self.j0] +=
                    lanes.iter().fold(0f32, |s, &v| s + v);
            }
        }
    }
}

/// The AVX2 form of [`matmul_thin_quant`]'s block loop: tiles of one weight row against up to
/// 4 input rows, reading the weights in order (decoding is bound by reading them).
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` has rows `j0..j1` of `blocks` blocks, `x` has `rows` rows of
/// `blocks` blocks, and `acc` holds `rows × (j1 - j0)` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quant_dots_avx2(
    acc: &mut [f32],
    x: &QuantRows,
    w: &QuantMatrix,
    rows: usize,
    blocks: usize,
    j0: usize,
    j1: usize,
) {
    let tiles = |group: usize| -> (usize, TileForm, TileForm) {
        match group {
            // Always one weight row at a time, so the weights are read as one sequential
            // stream, which the hardware prefetchers follow; several rows at a time made short
            // interleaved runs that they did not (Zen 4, batch 1: 0.5-0.8x; batch 2: Q8_0
            // 0.6x, Q4_0 0.9x).
            1 => (1, avx2_tile::<1, 1>, avx2_tile::<1, 1>),
            2 => (1, avx2_tile::<1, 2>, avx2_tile::<1, 2>),
            3 => (1, avx2_tile::<1, 3>, avx2_tile::<1, 3>),
            _ => (1, avx2_tile::<1, 4>, avx2_tile::<1, 4>),
        }
    };
    by_tiles(acc, x, w, rows, blocks, j0, j1, tiles);
}

/// One SIMD level's tile of the block loop: weight rows `j..j + J` (the form's own `J`)
/// against the tile's input rows.
#[cfg(target_arch = "x86_64")]
type TileForm = unsafe fn(&mut [f32], Tile, usize);

/// [`matmul_thin_quant`]'s block loop as tiles: weight rows in chunks of [`TILE_ROWS`], each
/// read by every group of up to 4 input rows in turn; `tiles(group)` gives the tile width for
/// that group, its form, and the one-row form for the chunk's remainder.
///
/// # Safety
/// The CPU has the forms' features; bounds as for [`quant_dots_avx2`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn by_tiles(
    acc: &mut [f32],
    x: &QuantRows,
    w: &QuantMatrix,
    rows: usize,
    blocks: usize,
    j0: usize,
    j1: usize,
    tiles: impl Fn(usize) -> (usize, TileForm, TileForm),
) {
    for jc in (j0..j1).step_by(TILE_ROWS) {
        let jend = (jc + TILE_ROWS).min(j1);
        for r0 in (0..rows).step_by(4) {
            let tile = Tile {
                x,
                w,
                blocks,
                r0,
                width: j1 - j0,
                j0,
            };
            let (width, many, one) = tiles((rows - r0).min(4));
            let mut j = jc;
            while j + width <= jend {
                // SAFETY: the caller's contract.
                unsafe { many(acc, tile, j) };
                j += width;
            }
            while j < jend {
                // SAFETY: as above.
                unsafe { one(acc, tile, j) };
                j += 1;
            }
        }
    }
}

/// # Safety
/// As for [`quant_dots_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_tile<const J: usize, const G: usize>(acc: &mut [f32], tile: Tile, j: usize) {
    use std::arch::x86_64::*;
    let (x, w, blocks) = (tile.x, tile.w, tile.blocks);
    let c_in = blocks * QUANT_BLOCK;
    let ones = _mm256_set1_epi16(1);
    let low_nibbles = _mm_set1_epi8(0x0F);
    let signed = !w.kind.has_offset();
    let nibble_bias = _mm256_set1_epi8(if w.kind == QuantKind::Q4_0 { 8 } else { 0 });
    let nibble_mask = _mm256_set1_epi8(0x0F);
    // Blocks of a row that come in pairs (see [`QuantMatrix`]).
    let paired = blocks & !1;
    let mut sums = [[_mm256_setzero_ps(); G]; J];
    for b in 0..blocks {
        for (u, row_sums) in sums.iter_mut().enumerate() {
            let at = (j + u) * c_in + b * QUANT_BLOCK;
            let wq = if w.kind == QuantKind::Q8_0 {
                _mm256_loadu_si256(w.q.as_ptr().add(at) as *const __m256i)
            } else if b < paired {
                // The pair's 32 bytes: this block's nibbles, low or high.
                let pair = (at - (b & 1) * QUANT_BLOCK) / 2;
                let packed = _mm256_loadu_si256(w.q.as_ptr().add(pair) as *const __m256i);
                let shifted = if b & 1 == 1 {
                    _mm256_srli_epi16(packed, 4)
                } else {
                    packed
                };
                _mm256_sub_epi8(_mm256_and_si256(shifted, nibble_mask), nibble_bias)
            } else {
                // An odd last block: weights k and k + 16 in byte k.
                let packed = _mm_loadu_si128(w.q.as_ptr().add(at / 2) as *const __m128i);
                let low = _mm_and_si128(packed, low_nibbles);
                let high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles);
                _mm256_sub_epi8(_mm256_set_m128i(high, low), nibble_bias)
            };
            // Signed weights: |w| · (x with w's sign) = w · x, as unsigned × signed bytes.
            let magnitude = if signed { _mm256_sign_epi8(wq, wq) } else { wq };
            let block = (j + u) * blocks + b;
            let wscale = *w.scales.get_unchecked(block);
            for (g, sum) in row_sums.iter_mut().enumerate() {
                let r = tile.r0 + g;
                let xq = _mm256_loadu_si256(
                    x.q.as_ptr().add(r * c_in + b * QUANT_BLOCK) as *const __m256i
                );
                let xs = if signed { _mm256_sign_epi8(xq, wq) } else { xq };
                let pairs = _mm256_maddubs_epi16(magnitude, xs);
                let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                let xscale = *x.scales.get_unchecked(r * blocks + b);
                *sum = _mm256_fmadd_ps(lanes, _mm256_set1_ps(wscale * xscale), *sum);
                if !signed {
                    let offset = *w.offsets.get_unchecked(block);
                    let lane_sums = _mm256_loadu_ps(x.lane_sums.as_ptr().add((r * blocks + b) * 8));
                    *sum = _mm256_fmadd_ps(lane_sums, _mm256_set1_ps(offset * xscale), *sum);
                }
            }
        }
    }
    tile.finish(acc, j, &sums);
}

/// The AVX-512 VNNI form of [`matmul_thin_quant`]'s block loop: two blocks a step, their
/// byte dot products in one instruction, then scaled block by block in the order the other
/// forms use (same bits); tiles as in [`quant_dots_avx2`].
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL, VNNI and FMA; bounds as for [`quant_dots_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn quant_dots_avx512(
    acc: &mut [f32],
    x: &QuantRows,
    w: &QuantMatrix,
    rows: usize,
    blocks: usize,
    j0: usize,
    j1: usize,
) {
    let q8 = w.kind == QuantKind::Q8_0;
    let tiles = |group: usize| -> (usize, TileForm, TileForm) {
        match group {
            // One weight row at a time (see `quant_dots_avx2`) for one or two input rows, and
            // for Q8_0 up to four: there the stream of weights still sets the pace (Zen 4,
            // against multi-row tiles: Q8_0 1.5-1.7x at 2 and 4 rows, the 4-bit kinds
            // 1.1-1.4x at 2 rows but 0.9-1.0x at 3 and 4, where unpacking the nibbles once
            // for two weight rows' worth of inputs pays).
            1 => (1, avx512_tile::<1, 1>, avx512_tile::<1, 1>),
            2 => (1, avx512_tile::<1, 2>, avx512_tile::<1, 2>),
            3 if q8 => (1, avx512_tile::<1, 3>, avx512_tile::<1, 3>),
            3 => (2, avx512_tile::<2, 3>, avx512_tile::<1, 3>),
            _ if q8 => (1, avx512_tile::<1, 4>, avx512_tile::<1, 4>),
            _ => (2, avx512_tile::<2, 4>, avx512_tile::<1, 4>),
        }
    };
    by_tiles(acc, x, w, rows, blocks, j0, j1, tiles);
}

/// Q8_0 weights are signed: the byte products are (x + 128)·w, started from −128·(the
/// weights' lane sums); the 4-bit kinds take the unsigned nibbles, their dot products started
/// from −8·(the input's lane sums) for Q4_0 (whose weights are nibble − 8): the same integers
/// as the portable form's, so the same bits.
///
/// # Safety
/// As for [`quant_dots_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn avx512_tile<const J: usize, const G: usize>(acc: &mut [f32], tile: Tile, j: usize) {
    use std::arch::x86_64::*;
    let (x, w, blocks) = (tile.x, tile.w, tile.blocks);
    let c_in = blocks * QUANT_BLOCK;
    let signed = w.kind == QuantKind::Q8_0;
    let offsets = w.kind.has_offset();
    let centered = w.kind == QuantKind::Q4_0;
    let eights = _mm512_set1_epi8(8);
    let flip = _mm512_set1_epi8(-128);
    let nibble_mask = _mm512_set1_epi8(0x0F);
    // Shift counts of 16-bit lanes: 0 for the low half, 4 for the high one (of 64 and of 32
    // bytes).
    let pair_shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    let one_shifts = _mm512_castsi256_si512(_mm256_inserti128_si256(
        _mm256_setzero_si256(),
        _mm_set1_epi16(4),
        1,
    ));
    // Weight blocks `b` and `b + 1` of row `j`, 64 bytes in order (4-bit kinds: nibbles).
    let load_pair = |j: usize, b: usize| -> __m512i {
        let at = j * c_in + b * QUANT_BLOCK;
        if signed {
            return _mm512_loadu_si512(w.q.as_ptr().add(at) as *const _);
        }
        // The pair's 32 bytes in both halves: low nibbles (block b), high ones (block b + 1).
        let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(
            w.q.as_ptr().add(at / 2) as *const __m256i
        ));
        _mm512_and_si512(_mm512_srlv_epi16(packed, pair_shifts), nibble_mask)
    };
    // Weight block `b` of row `j` alone, 32 bytes (the odd last block: a pair load would
    // read past the row).
    let load_one = |j: usize, b: usize| -> __m256i {
        let at = j * c_in + b * QUANT_BLOCK;
        if signed {
            return _mm256_loadu_si256(w.q.as_ptr().add(at) as *const __m256i);
        }
        // Weights k and k + 16 in byte k: the 16 bytes in both halves, shifted as a pair's.
        let packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(
            w.q.as_ptr().add(at / 2) as *const __m128i
        ));
        _mm256_and_si256(
            _mm256_srlv_epi16(packed, _mm512_castsi512_si256(one_shifts)),
            _mm512_castsi512_si256(nibble_mask),
        )
    };
    // sum += lanes · (w scale · x scale) (+ x lane sums · (offset · x scale)).
    let scale_into = |sum: &mut __m256, lanes: __m256, xscale: __m256, block: usize, at: usize| {
        let scale = _mm256_mul_ps(_mm256_broadcast_ss(w.scales.get_unchecked(block)), xscale);
        *sum = _mm256_fmadd_ps(lanes, scale, *sum);
        if offsets {
            let offset = _mm256_mul_ps(_mm256_broadcast_ss(w.offsets.get_unchecked(block)), xscale);
            let lane_sums = _mm256_loadu_ps(x.lane_sums.as_ptr().add(at * 8));
            *sum = _mm256_fmadd_ps(lane_sums, offset, *sum);
        }
    };
    let mut sums = [[_mm256_setzero_ps(); G]; J];
    let mut b = 0;
    while b + 2 <= blocks {
        // The input rows' blocks, their scales, and where their dot products start.
        let xq: [__m512i; G] = std::array::from_fn(|g| {
            _mm512_loadu_si512(x.q.as_ptr().add((tile.r0 + g) * c_in + b * QUANT_BLOCK) as *const _)
        });
        let start: [__m512i; G] = std::array::from_fn(|g| {
            if centered {
                _mm512_sub_epi32(
                    _mm512_setzero_si512(),
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), eights, xq[g]),
                )
            } else {
                _mm512_setzero_si512()
            }
        });
        // Signed weights: the inputs plus 128 as unsigned bytes (x xor 0x80).
        let x_up: [__m512i; G] = std::array::from_fn(|g| _mm512_xor_si512(xq[g], flip));
        let xscales: [(__m256, __m256); G] = std::array::from_fn(|g| {
            let at = (tile.r0 + g) * blocks + b;
            (
                _mm256_broadcast_ss(x.scales.get_unchecked(at)),
                _mm256_broadcast_ss(x.scales.get_unchecked(at + 1)),
            )
        });
        for (u, row_sums) in sums.iter_mut().enumerate() {
            let wq = load_pair(j + u, b);
            // Signed weights: (x + 128)·w started from −128·(the weights' lane sums).
            let w_start = if signed {
                _mm512_sub_epi32(
                    _mm512_setzero_si512(),
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, wq),
                )
            } else {
                _mm512_setzero_si512()
            };
            let block = (j + u) * blocks + b;
            for (g, sum) in row_sums.iter_mut().enumerate() {
                let dots = if signed {
                    _mm512_dpbusd_epi32(w_start, x_up[g], wq)
                } else {
                    _mm512_dpbusd_epi32(start[g], wq, xq[g])
                };
                let lanes = _mm512_cvtepi32_ps(dots);
                let at = (tile.r0 + g) * blocks + b;
                scale_into(sum, _mm512_castps512_ps256(lanes), xscales[g].0, block, at);
                let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1));
                scale_into(sum, upper, xscales[g].1, block + 1, at + 1);
            }
        }
        b += 2;
    }
    if b < blocks {
        for (u, row_sums) in sums.iter_mut().enumerate() {
            let wq = load_one(j + u, b);
            let (magnitude, negative) = if signed {
                (_mm256_abs_epi8(wq), _mm256_movepi8_mask(wq))
            } else {
                (wq, 0)
            };
            for (g, sum) in row_sums.iter_mut().enumerate() {
                let at = (tile.r0 + g) * blocks + b;
                let xq = _mm256_loadu_si256(x.q.as_ptr().add(at * QUANT_BLOCK) as *const __m256i);
                let xs = _mm256_mask_sub_epi8(xq, negative, _mm256_setzero_si256(), xq);
                let start = if centered {
                    _mm256_sub_epi32(
                        _mm256_setzero_si256(),
                        _mm256_dpbusd_epi32(
                            _mm256_setzero_si256(),
                            _mm512_castsi512_si256(eights),
                            xq,
                        ),
                    )
                } else {
                    _mm256_setzero_si256()
                };
                let dots = _mm256_dpbusd_epi32(start, magnitude, xs);
                let xscale = _mm256_broadcast_ss(x.scales.get_unchecked(at));
                scale_into(
                    sum,
                    _mm256_cvtepi32_ps(dots),
                    xscale,
                    (j + u) * blocks + b,
                    at,
                );
            }
        }
    }
    tile.finish(acc, j, &sums);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::quants;

    pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        // Blocks of varied scale and sign balance, so offsets and scales both matter.
        (0..n)
            .map(|i| rng.normal() * (1.0 + (i / 32 % 5) as f32) + (i / 64 % 3) as f32 * 0.5)
            .collect()
    }

    /// A matrix of `c_out` rows of every kind, 3, 8 and 24 blocks wide (those its rows allow).
    pub(super) fn test_matrices(c_out: usize) -> Vec<(QuantKind, usize, QuantMatrix)> {
        let mut matrices = Vec::new();
        for kind in KINDS {
            for c_in in [96usize, 256, 768] {
                if c_in.is_multiple_of(kind.row_multiple()) {
                    let w = values(c_in * c_out, 4);
                    matrices.push((
                        kind,
                        c_in,
                        QuantMatrix::quantize(kind, &w, c_in, c_out).unwrap(),
                    ));
                }
            }
        }
        matrices
    }

    pub(super) const KINDS: [QuantKind; 4] = [
        QuantKind::Q8_0,
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q4_K,
    ];

    #[test]
    fn a_files_blocks_read_as_ggml_dequantizes_them() {
        for kind in KINDS {
            let (c_in, c_out) = (512, 3);
            let w = values(c_in * c_out, 1);
            let bytes = quants::quantize(kind.ggml(), &w);
            let m = QuantMatrix::from_ggml(kind.ggml(), &bytes, c_in, c_out).unwrap();
            let mut want = vec![0f32; w.len()];
            quants::dequantize(kind.ggml(), &bytes, &mut want);
            let got = m.dequantize();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kind:?}"
            );
            // Quantizing gives the same matrix; rows read alone as in the whole.
            let q = QuantMatrix::quantize(kind, &w, c_in, c_out).unwrap();
            assert_eq!(q.dequantize(), got, "{kind:?}");
            let mut row = vec![0f32; c_in];
            m.dequantize_row(2, &mut row);
            assert_eq!(row, got[2 * c_in..], "{kind:?}");
            assert!(QuantMatrix::from_ggml(kind.ggml(), &bytes[1..], c_in, c_out).is_none());
        }
        assert!(QuantMatrix::from_ggml(crate::gguf::GgmlType::Q6_K, &[0; 210], 256, 1).is_none());
        assert!(
            QuantMatrix::zeros(QuantKind::Q4_K, 32, 1).is_none(),
            "Q4_K rows are 256s"
        );
    }

    /// The vectorizing rounding is C's `roundf`: halves away from zero, the largest float
    /// below a half down, signs and non-finite values kept.
    #[test]
    fn rounding_halves_away_from_zero() {
        let below_half = f32::from_bits(0.5f32.to_bits() - 1);
        let cases = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            below_half,
            -below_half,
            126.5,
            -127.49,
            8388607.5,
            1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let mut rng = crate::rng::Rng::new(8);
        let random = (0..10_000).map(|_| rng.normal() * 60.0);
        for x in cases.into_iter().chain(random) {
            assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    #[test]
    fn rows_stack_and_reorder() {
        let kind = QuantKind::Q4_1;
        let w = values(64 * 5, 2);
        let m = QuantMatrix::quantize(kind, &w, 64, 5).unwrap();
        let dense = m.dequantize();
        let mut stacked = QuantMatrix::quantize(kind, &w[..128], 64, 2).unwrap();
        stacked.append_rows(QuantMatrix::quantize(kind, &w[128..], 64, 3).unwrap());
        assert_eq!(stacked.dequantize(), dense);
        let order = [4, 0, 3, 1, 2];
        let reordered = m.with_row_order(&order).dequantize();
        for (i, &r) in order.iter().enumerate() {
            assert_eq!(reordered[i * 64..(i + 1) * 64], dense[r * 64..(r + 1) * 64]);
        }
    }

    /// Q4_K (ggml's reference quantizer) stays within a step of each sub-block's range, and
    /// tracks the weights better than Q4_0 does.
    #[test]
    fn q4_k_quantizes_closely() {
        let w = values(256 * 8, 3);
        let error = |kind: QuantKind| {
            let back = QuantMatrix::quantize(kind, &w, 256, 8)
                .unwrap()
                .dequantize();
            let squares: f32 = w.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum();
            let worst = w
                .chunks(32)
                .zip(back.chunks(32))
                .map(|(a, b)| {
                    let range = a.iter().fold(f32::MIN, |m, &v| m.max(v))
                        - a.iter().fold(f32::MAX, |m, &v| m.min(v));
                    let e = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    e / range
                })
                .fold(0f32, f32::max);
            ((squares / w.len() as f32).sqrt(), worst)
        };
        let (q4k, worst) = error(QuantKind::Q4_K);
        let (q4_0, _) = error(QuantKind::Q4_0);
        assert!(
            worst < 1.0 / 15.0 + 0.02,
            "worst error {worst} of a block's range"
        );
        assert!(q4k < 0.9 * q4_0, "rms {q4k} vs Q4_0's {q4_0}");
    }

    /// Every SIMD form of the block loop gives the portable form's bits, for every kind, odd
    /// and even block counts, and 1 to 6 rows.
    #[test]
    fn simd_forms_give_the_portable_bits() {
        for (kind, c_in, w) in test_matrices(19) {
            for rows in [1, 2, 3, 4, 6, 7] {
                let x = QuantRows::new(&values(rows * c_in, 5), kind.has_offset());
                let blocks = c_in / QUANT_BLOCK;
                let run = |form: &dyn Fn(&mut [f32])| {
                    let mut acc = vec![0.5f32; rows * 17];
                    form(&mut acc);
                    acc.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let want = run(&|acc| quant_dots_portable(acc, &x, &w, rows, blocks, 2, 19));
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: AVX2 and FMA checked; shapes as the product passes them.
                        let got = run(&|acc| unsafe {
                            quant_dots_avx2(acc, &x, &w, rows, blocks, 2, 19)
                        });
                        assert_eq!(got, want, "{kind:?} AVX2, {c_in} wide, {rows} rows");
                    }
                    if level() == Level::Avx512 && avx512_vnni() {
                        // SAFETY: AVX-512 and VNNI checked; shapes as above.
                        let got = run(&|acc| unsafe {
                            quant_dots_avx512(acc, &x, &w, rows, blocks, 2, 19)
                        });
                        assert_eq!(got, want, "{kind:?} AVX-512, {c_in} wide, {rows} rows");
                    }
                }
            }
        }
    }
}
