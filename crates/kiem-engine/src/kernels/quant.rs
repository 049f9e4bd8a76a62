//! Quantized weight matrices (ggml's block formats) and the thin products decoding reads them
//! with: integer dot products of the weights' blocks with the input quantized to 8 bits.

use half::f16;
use rayon::prelude::*;

use super::matmul::by_column_blocks;
use super::SKINNY_ROWS;

/// `$tiles::<K>` (as a `$form`) for the kind `$kind`, `K` its index, among the kinds listed:
/// each kind's SIMD forms are compiled apart, with the kind a constant.
#[cfg(target_arch = "x86_64")]
macro_rules! by_kind {
    ($kind:expr, $tiles:ident as $form:ty, [$($k:ident),*]) => {
        match $kind {
            $(QuantKind::$k => $tiles::<{ QuantKind::$k as u8 }> as $form,)*
            other => unreachable!("{other:?} has no such form"),
        }
    };
}

/// A SIMD level's forms of kind `$k` (its index) for 1 to 4 input rows: `$form::<G, $k>`.
#[cfg(target_arch = "x86_64")]
macro_rules! group_forms {
    ($form:ident, $k:ident) => {
        [
            $form::<1, $k>,
            $form::<2, $k>,
            $form::<3, $k>,
            $form::<4, $k>,
        ]
    };
}

mod gemm;
mod row_groups;
mod super_blocks;
pub use gemm::{matmul_wide_quant, wide_quant_native};

/// How a [`QuantMatrix`] stores its weights: ggml's Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1 blocks of
/// 32 weights along each row, or its K super-blocks of 256 (Q4_K and Q5_K: eight 32-weight
/// sub-blocks, each with its own 6-bit scale and min; Q6_K: sixteen 16-weight groups, each with
/// its own 8-bit scale). Q8_0, Q4_0, Q4_1 and Q4_K matrices can also be quantized here, by
/// ggml's reference quantizers; the 5- and 6-bit kinds are read from files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum QuantKind {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
}

impl QuantKind {
    /// Every kind, in declaration order (`k as u8` is a kind's index here).
    pub(crate) const ALL: [QuantKind; 8] = [
        QuantKind::Q8_0,
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q4_K,
        QuantKind::Q5_0,
        QuantKind::Q5_1,
        QuantKind::Q5_K,
        QuantKind::Q6_K,
    ];

    pub(crate) fn ggml(self) -> crate::gguf::GgmlType {
        use crate::gguf::GgmlType;
        match self {
            QuantKind::Q8_0 => GgmlType::Q8_0,
            QuantKind::Q4_0 => GgmlType::Q4_0,
            QuantKind::Q4_1 => GgmlType::Q4_1,
            QuantKind::Q4_K => GgmlType::Q4_K,
            QuantKind::Q5_0 => GgmlType::Q5_0,
            QuantKind::Q5_1 => GgmlType::Q5_1,
            QuantKind::Q5_K => GgmlType::Q5_K,
            QuantKind::Q6_K => GgmlType::Q6_K,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4_0 => "q4_0",
            QuantKind::Q4_1 => "q4_1",
            QuantKind::Q4_K => "q4_k",
            QuantKind::Q5_0 => "q5_0",
            QuantKind::Q5_1 => "q5_1",
            QuantKind::Q5_K => "q5_k",
            QuantKind::Q6_K => "q6_k",
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
            GgmlType::Q5_0 => Some(QuantKind::Q5_0),
            GgmlType::Q5_1 => Some(QuantKind::Q5_1),
            GgmlType::Q5_K => Some(QuantKind::Q5_K),
            GgmlType::Q6_K => Some(QuantKind::Q6_K),
            _ => None,
        }
    }

    /// The kind `k as u8` names: the SIMD forms take the kind as a constant, so that each
    /// kind's form has its own code without tests of the kind in its loops.
    const fn of_index(i: u8) -> Self {
        Self::ALL[i as usize]
    }

    /// Whether [`QuantMatrix::quantize`] can quantize to this kind.
    pub fn has_quantizer(self) -> bool {
        matches!(
            self,
            QuantKind::Q8_0 | QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q4_K
        )
    }

    /// Weights a row must hold a whole number of: ggml's block (256 for the K kinds).
    pub fn row_multiple(self) -> usize {
        self.ggml().block().0
    }

    /// Whether each 32-weight block has an offset besides its scale (`w = scale·q + offset`,
    /// `q` unsigned) rather than a scale alone (`w = scale·(q − center)`).
    const fn has_offset(self) -> bool {
        matches!(
            self,
            QuantKind::Q4_1 | QuantKind::Q4_K | QuantKind::Q5_1 | QuantKind::Q5_K
        )
    }

    const fn nibbles(self) -> bool {
        !matches!(self, QuantKind::Q8_0)
    }

    /// Bits of each weight above its low nibble (kept in a block's high lines, one line per
    /// bit: see `row_groups`).
    const fn high_bits(self) -> usize {
        match self {
            QuantKind::Q5_0 | QuantKind::Q5_1 | QuantKind::Q5_K => 1,
            QuantKind::Q6_K => 2,
            _ => 0,
        }
    }

    /// What is subtracted from a stored unsigned value to give the weight's signed one (0 for
    /// Q8_0, whose bytes are signed, and for the kinds with offsets).
    const fn center(self) -> u8 {
        match self {
            QuantKind::Q4_0 => 8,
            QuantKind::Q5_0 => 16,
            QuantKind::Q6_K => 32,
            _ => 0,
        }
    }

    /// Whether rows are K super-blocks of 256 (Q4_K, Q5_K, Q6_K): their scales are kept as
    /// ggml keeps them, small integers per 32 (Q6_K: 16) weights times an fp16 per 256.
    const fn super_blocks(self) -> bool {
        matches!(self, QuantKind::Q4_K | QuantKind::Q5_K | QuantKind::Q6_K)
    }

    /// Scales per 32-weight block: two for Q6_K (one per 16 weights), else one.
    const fn scale_groups(self) -> usize {
        if matches!(self, QuantKind::Q6_K) {
            2
        } else {
            1
        }
    }

    /// Bytes a weight takes as stored here: the weight, and its block's fp16 scale (and
    /// offset), or its super-block's byte scales (and mins) and fp16 scale (and min).
    pub fn bytes_per_weight(self) -> f64 {
        let weight = if self.nibbles() {
            (4 + self.high_bits()) as f64 / 8.0
        } else {
            1.0
        };
        if self.super_blocks() {
            let floats = if self.has_offset() { 2 } else { 1 };
            return weight + (SUPER_BYTES + 2 * floats) as f64 / 256.0;
        }
        let per_block = 2 + if self.has_offset() { 2 } else { 0 };
        weight + per_block as f64 / QUANT_BLOCK as f64
    }

    /// The fp16 values kept per ggml block: a 32-weight block's scale and offset (kinds with
    /// offsets), a super-block's scale and min (Q4_K, Q5_K) or scale (Q6_K).
    fn block_floats(self) -> (usize, usize) {
        match self {
            QuantKind::Q4_1 | QuantKind::Q5_1 => (1, 1),
            QuantKind::Q4_K | QuantKind::Q5_K => (2, 0),
            _ => (1, 0),
        }
    }
}

/// 64 bytes on a cache line of their own.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [u8; 64]);

/// Bytes on whole cache lines, seen as bytes: a 64-byte load at a multiple of 64 from the
/// start never straddles two lines.
#[derive(Clone)]
pub(super) struct LineBytes(Vec<Line>);

impl LineBytes {
    /// `bytes` zeros (a multiple of 64).
    fn zeroed(bytes: usize) -> Self {
        assert!(bytes.is_multiple_of(64), "LineBytes: whole lines");
        Self(vec![Line([0; 64]); bytes / 64])
    }

    /// `other`'s bytes after these.
    fn append(&mut self, other: &Self) {
        self.0.extend_from_slice(&other.0);
    }
}

impl std::ops::Deref for LineBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: a Line is 64 bytes with no padding; the lines are contiguous.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), 64 * self.0.len()) }
    }
}

impl std::ops::DerefMut for LineBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), 64 * self.0.len()) }
    }
}

impl std::fmt::Debug for LineBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.len())
    }
}

/// Weights per quantization block (a K super-block holds eight).
pub const QUANT_BLOCK: usize = 32;

/// Bytes of a K super-block's small scales: Q4_K's and Q5_K's eight 6-bit scales then eight
/// 6-bit mins (a byte each), or Q6_K's sixteen signed 8-bit scales.
const SUPER_BYTES: usize = 16;

/// A matrix `W[c_out, c_in]` quantized for decoding, in the layout the thin product streams:
/// rows in groups of 16, interleaved four weights at a time, so that one instruction takes 16
/// rows' dot products (see `row_groups`). Each weight keeps its low 4 bits (Q8_0: its byte)
/// and, for the 5- and 6-bit kinds, its higher bits in high lines beside them; each 32-weight block its fp16
/// scale (and offset) as ggml has it (the kernels widen it: exact); each K super-block its fp16
/// scale (and min) and its sub-blocks' byte scales (and mins) as ggml has them, multiplied out where a
/// product needs a block's scale (as ggml dequantizes). A stored value less the kind's center
/// (Q4_0 8, Q5_0 16, Q6_K 32) is the signed one the scale multiplies.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub kind: QuantKind,
    pub c_in: usize,
    pub c_out: usize,
    /// Row group after row group, each ggml block's weights' lines (and the high lines above
    /// the nibbles), its scales (and offsets) in fp16 as ggml keeps them (widening is exact,
    /// and decoding reads half the bytes of f32s), a K super-block's small scales: see
    /// `row_groups::Records`.
    data: LineBytes,
    /// Where in `data` each part lies.
    records: row_groups::Records,
}

impl QuantMatrix {
    /// `c_out` rows of `c_in` zeros; `None` when rows are not whole blocks of `kind`.
    pub fn zeros(kind: QuantKind, c_in: usize, c_out: usize) -> Option<Self> {
        if c_in == 0 || !c_in.is_multiple_of(kind.row_multiple()) {
            return None;
        }
        Some(row_groups::zeroed(kind, c_in, c_out))
    }

    /// Quantizes `w[c_out, c_in]` as ggml's reference quantizer does; `None` when rows are
    /// not whole blocks, or for a kind without a quantizer here ([`QuantKind::has_quantizer`]).
    pub fn quantize(kind: QuantKind, w: &[f32], c_in: usize, c_out: usize) -> Option<Self> {
        if w.len() < c_in * c_out || !kind.has_quantizer() {
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

    /// Fills every row (in parallel) from its ggml blocks, `block(n, at)` giving the bytes of
    /// the `n` weights starting at flat index `at`.
    fn fill_blocks(&mut self, block: impl Fn(usize, usize) -> Vec<u8> + Sync) {
        let (kind, c_in) = (self.kind, self.c_in);
        let n = kind.row_multiple();
        let (floats, offsets) = kind.block_floats();
        let sub = if kind.super_blocks() { SUPER_BYTES } else { 0 };
        row_groups::fill(self, |j| {
            let per_row = c_in / n;
            let mut row = row_groups::Row {
                values: vec![0; c_in],
                scales: vec![f16::ZERO; per_row * floats],
                offsets: vec![f16::ZERO; per_row * offsets],
                sub: vec![0; per_row * sub],
            };
            for i in 0..per_row {
                unpack_ggml_block(
                    kind,
                    &block(n, j * c_in + i * n),
                    &mut row.scales[i * floats..(i + 1) * floats],
                    &mut row.offsets[i * offsets..(i + 1) * offsets],
                    &mut row.sub[i * sub..(i + 1) * sub],
                    &mut row.values[i * n..(i + 1) * n],
                );
            }
            row
        });
    }

    /// The matrix of `c_out` rows whose row `j` is `source(j)`'s row (a matrix and a row of
    /// it).
    fn regrouped<'a>(
        &self,
        c_out: usize,
        source: impl Fn(usize) -> (&'a Self, usize) + Sync,
    ) -> Self {
        let mut m = Self::zeros(self.kind, self.c_in, c_out).expect("the rows are whole blocks");
        row_groups::copy_rows(&mut m, source);
        m
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
        if self.c_out.is_multiple_of(row_groups::GROUP_ROWS) {
            // Whole groups: the other's groups follow as they are.
            self.c_out += other.c_out;
            self.data.append(&other.data);
            return;
        }
        let n = self.c_out;
        *self = self.regrouped(n + other.c_out, |j| {
            if j < n {
                (&*self, j)
            } else {
                (&other, j - n)
            }
        });
    }

    /// The matrix with its rows reordered: row `i` is this one's row `order[i]`.
    pub fn with_row_order(&self, order: &[usize]) -> Self {
        assert_eq!(order.len(), self.c_out, "with_row_order: one index per row");
        self.regrouped(self.c_out, |j| (self, order[j]))
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
        let (j, b) = (i / blocks, i % blocks);
        let q = weight_block(self, j, b);
        let (scales, offset) = self.block_scales(j, b);
        for (k, (w, &q)) in out.iter_mut().zip(&q).enumerate() {
            let scaled = f32::from(q) * scales[k / 16];
            *w = match offset {
                Some(offset) => scaled + offset,
                None => scaled,
            };
        }
    }

    /// Row `j`'s block `b`: the scales of its weights 0-15 and 16-31 (the same but for Q6_K)
    /// and its offset, computed as ggml dequantizes (a K sub-block's scale is its
    /// super-block's times its own, its offset minus the super-block's min times its own).
    #[inline(always)]
    fn block_scales(&self, j: usize, b: usize) -> ([f32; 2], Option<f32>) {
        let (s, k) = (b / 8, b % 8);
        let float = |i: usize, f: usize| row_groups::float(self, j, i, f);
        let sub = |k: usize| self.data[row_groups::sub_at(self, j, s, k)];
        match self.kind {
            QuantKind::Q4_K | QuantKind::Q5_K => {
                let scale = float(s, 0) * f32::from(sub(k));
                ([scale; 2], Some(-(float(s, 1) * f32::from(sub(8 + k)))))
            }
            QuantKind::Q6_K => {
                let scale = |g: usize| float(s, 0) * f32::from(sub(2 * k + g) as i8);
                ([scale(0), scale(1)], None)
            }
            _ => {
                let offset = self.kind.has_offset();
                ([float(b, 0); 2], offset.then(|| float(b, 1)))
            }
        }
    }

    /// Bytes a product reads: the weights and their scales (and offsets, and high bits).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Reads every byte a product reads once, on all threads (for the bandwidth bound).
    pub fn stream(&self) -> u32 {
        self.data
            .par_chunks(1 << 16)
            .map(|chunk| {
                // SAFETY: every bit pattern is a valid u64, so viewing the aligned middle of
                // the bytes as u64 words is sound.
                let (head, words, tail) = unsafe { chunk.align_to::<u64>() };
                let bytes = head.iter().chain(tail).map(|&b| u64::from(b)).sum::<u64>();
                words.iter().fold(bytes, |s, &w| s.wrapping_add(w)) as u32
            })
            .reduce(|| 0, u32::wrapping_add)
    }
}

/// One ggml block of `kind` (32 weights, or a K super-block of 256) into `scales` and
/// `offsets` (see [`QuantKind::block_floats`]), a super-block's `sub` scales (and mins), and
/// each weight's stored value in `values` (unsigned, its bits above the nibble included; Q8_0's
/// signed bytes as they are).
fn unpack_ggml_block(
    kind: QuantKind,
    bytes: &[u8],
    scales: &mut [f16],
    offsets: &mut [f16],
    sub: &mut [u8],
    values: &mut [u8],
) {
    let half = |at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    match kind {
        QuantKind::Q8_0 => {
            scales[0] = half(0);
            values.copy_from_slice(&bytes[2..34]);
        }
        QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q5_0 | QuantKind::Q5_1 => {
            scales[0] = half(0);
            let mut at = 2;
            if kind.has_offset() {
                offsets[0] = half(2);
                at = 4;
            }
            let mut fifth = 0;
            if kind.high_bits() == 1 {
                fifth = word(at);
                at += 4;
            }
            for k in 0..16 {
                values[k] = bytes[at + k] & 0xF;
                values[k + 16] = bytes[at + k] >> 4;
            }
            for (k, v) in values[..32].iter_mut().enumerate() {
                *v |= (((fifth >> k) & 1) << 4) as u8;
            }
        }
        QuantKind::Q4_K | QuantKind::Q5_K => {
            scales[0] = half(0);
            scales[1] = half(2);
            for j in 0..8 {
                (sub[j], sub[8 + j]) = crate::gguf::quants::scale_min_k4(j, &bytes[4..16]);
            }
            let five = kind == QuantKind::Q5_K;
            let (qh, ql) = if five {
                (&bytes[16..48], &bytes[48..176])
            } else {
                (&bytes[..0], &bytes[16..144])
            };
            // 32 bytes per pair of sub-blocks: the first's weights in the low nibbles; bits
            // 2p and 2p + 1 of qh[l] are weight l's fifth bits in sub-blocks 2p and 2p + 1.
            for pair in 0..4 {
                for l in 0..32 {
                    let byte = ql[32 * pair + l];
                    let fifth = |s: usize| if five { ((qh[l] >> s) & 1) << 4 } else { 0 };
                    values[64 * pair + l] = (byte & 0xF) | fifth(2 * pair);
                    values[64 * pair + 32 + l] = (byte >> 4) | fifth(2 * pair + 1);
                }
            }
        }
        QuantKind::Q6_K => {
            scales[0] = half(208);
            sub.copy_from_slice(&bytes[192..208]);
            // Per 128 weights: 64 bytes of low nibbles (weights l and l + 64 in byte l,
            // l + 32 and l + 96 in byte l + 32), and 32 of top bits (two per weight).
            for h in 0..2 {
                let (ql, qh) = (
                    &bytes[64 * h..64 * h + 64],
                    &bytes[128 + 32 * h..160 + 32 * h],
                );
                let v = &mut values[128 * h..128 * h + 128];
                for l in 0..32 {
                    let top = |shift: u32| ((qh[l] >> shift) & 3) << 4;
                    v[l] = (ql[l] & 0xF) | top(0);
                    v[l + 32] = (ql[l + 32] & 0xF) | top(2);
                    v[l + 64] = (ql[l] >> 4) | top(4);
                    v[l + 96] = (ql[l + 32] >> 4) | top(6);
                }
            }
        }
    }
}

/// Rows of inputs quantized as ggml's Q8_0 quantizes weights (32 values a block, scale
/// `max |x| / 127`, kept in f32): what the integer dot products multiply the weights by.
struct QuantRows {
    q: Vec<i8>,
    scales: Vec<f32>,
    /// For weights with offsets: each block's scale times the sum of its values (as the wide
    /// product's inputs have it).
    scaled_sums: Vec<f32>,
    /// For weights without: each block's sum times minus the weights' center (Q8_0: 128),
    /// where dot products of unsigned weights start (Q8_0's weights taken as w + 128).
    starts: Vec<i32>,
}

impl QuantRows {
    fn new(inp: &[f32], kind: QuantKind) -> Self {
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
        let sums = q
            .chunks_exact(QUANT_BLOCK)
            .map(|l| l.iter().map(|&v| i32::from(v)).sum::<i32>());
        let (mut scaled_sums, mut starts) = (Vec::new(), Vec::new());
        if kind.has_offset() {
            scaled_sums = sums
                .zip(&scales)
                .map(|(sum, &scale)| scale * sum as f32)
                .collect();
        } else {
            let center = if kind == QuantKind::Q8_0 {
                128
            } else {
                i32::from(kind.center())
            };
            starts = sums.map(|sum| -center * sum).collect();
        }
        Self {
            q,
            scales,
            scaled_sums,
            starts,
        }
    }
}

/// One block of inputs (32 values) into `q` as ggml's Q8_0 quantizes it; returns its scale.
#[inline(always)]
fn quantize_input_block(x: &[f32], q: &mut [i8]) -> f32 {
    quantize_values::<QUANT_BLOCK>(x, q)
}

/// `N` inputs into `q`, scaled by 127 over the largest magnitude and rounded (halves away
/// from zero); returns the scale. Written to vectorize inside [`super::wide`] (a libm
/// `roundf` per value did not).
#[inline(always)]
fn quantize_values<const N: usize>(x: &[f32], q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::level() == super::Level::Avx512 {
        // SAFETY: the CPU has AVX-512 F/BW (`level`).
        return unsafe { quantize_values_avx512::<N>(x, q) };
    }
    quantize_values_portable::<N>(x, q)
}

/// [`quantize_values`] in plain code (the compiler vectorizes it inside [`super::wide`]).
#[inline(always)]
fn quantize_values_portable<const N: usize>(x: &[f32], q: &mut [i8]) -> f32 {
    let (x, q) = (&x[..N], &mut q[..N]);
    // The largest magnitude (a max is exact, so any order gives the same value).
    let mut lanes = [0f32; 16];
    for (k, &v) in x.iter().enumerate() {
        lanes[k % 16] = lanes[k % 16].max(v.abs());
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = round_half_away(v * id) as i8;
    }
    d
}

/// [`quantize_values`] with AVX-512, 16 values a register: the same bits (the same largest
/// magnitude, scale and rounding, NaN to 0 and infinities saturated as `as i8` does); the
/// compiled plain form took about 65 ns a block of 32, serial before every decoding product.
///
/// # Safety
/// The CPU has AVX-512 F/BW/DQ; `N` is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq")]
unsafe fn quantize_values_avx512<const N: usize>(x: &[f32], q: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    let (x, q) = (&x[..N], &mut q[..N]);
    let mut most = _mm512_setzero_ps();
    for c in x.chunks_exact(16) {
        // A NaN magnitude leaves `most` as it was (`vmaxps` returns its second operand), as
        // `f32::max` ignores NaN.
        most = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(c.as_ptr())), most);
    }
    let amax = _mm512_reduce_max_ps(most);
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let (half, one, sign) = (
        _mm512_set1_ps(0.5),
        _mm512_set1_ps(1.0),
        _mm512_set1_ps(-0.0),
    );
    for (c, out) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)) {
        let v = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), id);
        // Halves away from zero, as `round_half_away`: the truncation, plus one with v's sign
        // where at least half is cut off (never for NaN or infinities).
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(v, t)), half);
        let r = _mm512_mask_add_ps(t, away, t, _mm512_or_ps(one, _mm512_and_ps(v, sign)));
        // Saturated as `as i8` does; a NaN stays NaN (`vmaxps`/`vminps` return their second
        // operand) and converts to 0x80000000, whose low byte is 0, as NaN `as i8` is.
        let r = _mm512_min_ps(
            _mm512_set1_ps(127.0),
            _mm512_max_ps(_mm512_set1_ps(-128.0), r),
        );
        let bytes = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r));
        _mm_storeu_si128(out.as_mut_ptr().cast(), bytes);
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

/// Weight block `b` of row `j` as 32 signed values: the stored ones less the kind's center
/// (unsigned for the kinds with offsets).
#[inline(always)]
fn weight_block(w: &QuantMatrix, j: usize, b: usize) -> [i8; QUANT_BLOCK] {
    let v = row_groups::stored_block(w, j, b);
    std::array::from_fn(|k| v[k] as i8 - w.kind.center() as i8)
}

/// `out[rows, c_out] = inp[rows, c_in] · Wᵀ (+ bias)` for few rows with a quantized `W`:
/// decoding reads about a byte (Q8_0) to half a byte (the 4-bit kinds) per weight. As
/// llama.cpp does, each input row is quantized to Q8_0 blocks and every block's dot product is
/// taken in integers (exact), then scaled by the two blocks' scales (a block's offset times
/// the input block's sum is added); so the result differs from the product with the
/// dequantized weights by the inputs' quantization (about 0.4% of a block's largest input).
/// Each row's result is independent of the others, and every SIMD level gives the same bits:
/// the 32-weight-block kinds sum block by block as the wide product does (see `row_groups`,
/// so any number of rows gives a row the same bits); K kinds (Q4_K, Q5_K, Q6_K) quantize the
/// inputs per 256 values instead, as llama.cpp's Q8_K does, and scale each super-block's
/// integer sums once (see `super_blocks`).
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
    if w.kind.super_blocks() {
        let x = super_blocks::SuperRows::new(inp);
        by_column_blocks(out, rows, c_out, bias, |acc, j0, j1| {
            super_blocks::super_dots(acc, &x, w, rows, j0, j1)
        });
        return;
    }
    let x = QuantRows::new(inp, w.kind);
    by_column_blocks(out, rows, c_out, bias, |acc, j0, j1| {
        row_groups::dots(acc, &x, w, rows, j0, j1)
    });
}

/// Whether the CPU has AVX-512 VNNI (byte dot products in one instruction).
#[cfg(target_arch = "x86_64")]
fn avx512_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| std::is_x86_feature_detected!("avx512vnni"))
}

/// 16 fp16 scales (a group's rows) at `p`, widened.
///
/// # Safety
/// The CPU has AVX-512 F; `p` points at 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn halves16(p: *const f16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

/// 8 fp16 scales at `p`, widened.
///
/// # Safety
/// The CPU has AVX and F16C; `p` points at 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn halves8(p: *const f16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
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

    /// ggml blocks of `kind` for `n` weights: quantized `values` where kiem has the kind's
    /// quantizer, else random bytes (every bit pattern of the weights is a valid block) with
    /// fp16 scales and mins of a sensible size.
    pub(super) fn ggml_blocks(kind: QuantKind, n: usize, seed: u64) -> Vec<u8> {
        if kind.has_quantizer() {
            return quants::quantize(kind.ggml(), &values(n, seed));
        }
        let (per, size) = kind.ggml().block();
        let mut rng = crate::rng::Rng::new(seed);
        let mut bytes: Vec<u8> = (0..n / per * size)
            .map(|_| (rng.uniform() * 256.0) as u8)
            .collect();
        for block in bytes.chunks_exact_mut(size) {
            let mut put = |at: usize, v: f32| {
                block[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes())
            };
            let (a, b) = (rng.uniform(), rng.uniform() - 0.5);
            match kind {
                QuantKind::Q5_0 => put(0, 0.02 + 0.2 * a),
                QuantKind::Q5_1 => {
                    put(0, 0.02 + 0.2 * a);
                    put(2, 2.0 * b);
                }
                QuantKind::Q5_K => {
                    put(0, 0.001 + 0.01 * a);
                    put(2, 0.001 + 0.02 * b.abs());
                }
                QuantKind::Q6_K => put(208, 0.0005 + 0.002 * a),
                _ => unreachable!("kinds with quantizers return above"),
            }
        }
        bytes
    }

    /// A matrix of `c_out` rows of every kind, 3, 8 and 24 blocks wide (those its rows allow).
    pub(super) fn test_matrices(c_out: usize) -> Vec<(QuantKind, usize, QuantMatrix)> {
        let mut matrices = Vec::new();
        for kind in QuantKind::ALL {
            for c_in in [96usize, 256, 768] {
                if c_in.is_multiple_of(kind.row_multiple()) {
                    let bytes = ggml_blocks(kind, c_in * c_out, 4);
                    matrices.push((
                        kind,
                        c_in,
                        QuantMatrix::from_ggml(kind.ggml(), &bytes, c_in, c_out).unwrap(),
                    ));
                }
            }
        }
        matrices
    }

    /// The AVX-512 input quantization gives the plain form's bits: ordinary blocks, blocks
    /// with halves to round, zeros, tiny values (a scale whose inverse overflows), infinities,
    /// NaN and the largest floats; blocks of 32 and 256.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn input_quantization_simd_gives_the_plain_bits() {
        if crate::kernels::level() != crate::kernels::Level::Avx512 {
            return;
        }
        let mut x = values(2048, 11);
        // A block whose scale is 1: its halves round away from zero.
        for (k, v) in x[32..64].iter_mut().enumerate() {
            *v = [127.0, -127.0, 2.5, -2.5, 0.5, -0.5, 126.5, -126.5][k % 8];
        }
        x[64..96].fill(0.0);
        x[96..128].iter_mut().for_each(|v| *v *= 1e-40);
        x[128..160].iter_mut().for_each(|v| *v *= 1e-38);
        x[170] = f32::INFINITY;
        x[200] = f32::NAN;
        x[230] = f32::NEG_INFINITY;
        x[260] = 3e38;
        x[261] = -3.4e38;
        x[300] = f32::NAN;
        x[301] = 1.0;
        let run = |f: &dyn Fn(&[f32], &mut [i8]) -> f32, n: usize| {
            let mut q = vec![0i8; x.len()];
            let scales: Vec<u32> = (0..x.len() / n)
                .map(|b| f(&x[b * n..], &mut q[b * n..]).to_bits())
                .collect();
            (scales, q)
        };
        // SAFETY: the CPU has AVX-512 (checked above).
        let simd32 = |x: &[f32], q: &mut [i8]| unsafe { quantize_values_avx512::<32>(x, q) };
        let simd256 = |x: &[f32], q: &mut [i8]| unsafe { quantize_values_avx512::<256>(x, q) };
        assert_eq!(run(&simd32, 32), run(&quantize_values_portable::<32>, 32));
        assert_eq!(
            run(&simd256, 256),
            run(&quantize_values_portable::<256>, 256)
        );
    }

    #[test]
    fn a_files_blocks_read_as_ggml_dequantizes_them() {
        for kind in QuantKind::ALL {
            // Rows of 3 K super-blocks, or of 17 32-weight blocks (an odd count).
            let c_in = if kind.row_multiple() == 256 { 768 } else { 544 };
            let c_out = 3;
            let w = values(c_in * c_out, 1);
            let bytes = ggml_blocks(kind, c_in * c_out, 1);
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
            let q = QuantMatrix::quantize(kind, &w, c_in, c_out);
            if kind.has_quantizer() {
                assert_eq!(q.unwrap().dequantize(), got, "{kind:?}");
            } else {
                assert!(q.is_none(), "{kind:?} has no quantizer");
            }
            let mut row = vec![0f32; c_in];
            m.dequantize_row(2, &mut row);
            assert_eq!(row, got[2 * c_in..], "{kind:?}");
            assert!(QuantMatrix::from_ggml(kind.ggml(), &bytes[1..], c_in, c_out).is_none());
        }
        assert!(QuantMatrix::from_ggml(crate::gguf::GgmlType::F16, &[0; 512], 256, 1).is_none());
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
        for (kind, c_in) in [
            (QuantKind::Q8_0, 32),
            (QuantKind::Q4_1, 64),
            (QuantKind::Q5_0, 96),
            (QuantKind::Q5_K, 256),
            (QuantKind::Q6_K, 256),
        ] {
            let bytes = ggml_blocks(kind, c_in * 21, 2);
            let t = kind.ggml();
            let row = t.bytes_for(c_in as u64).unwrap() as usize;
            let m = QuantMatrix::from_ggml(t, &bytes, c_in, 21).unwrap();
            let dense = m.dequantize();
            // After a partial group (rows regrouped) and after whole groups (appended as they are).
            for first in [2, 16] {
                let mut stacked =
                    QuantMatrix::from_ggml(t, &bytes[..first * row], c_in, first).unwrap();
                let rest = QuantMatrix::from_ggml(t, &bytes[first * row..], c_in, 21 - first);
                stacked.append_rows(rest.unwrap());
                assert_eq!(stacked.dequantize(), dense, "{kind:?} after {first} rows");
            }
            let order: Vec<usize> = (0..21).map(|i| (i * 8 + 4) % 21).collect();
            let reordered = m.with_row_order(&order).dequantize();
            for (i, &r) in order.iter().enumerate() {
                assert_eq!(
                    reordered[i * c_in..(i + 1) * c_in],
                    dense[r * c_in..(r + 1) * c_in],
                    "{kind:?}"
                );
            }
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
}
