//! Quantized matrices kept in groups of [`GROUP_ROWS`] rows, interleaved four weights at a
//! time, and the thin product of the 32-weight-block kinds (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1;
//! the K kinds' is in `super_blocks`): one 64-byte line holds four weights of each of 16 rows,
//! so one AVX-512 VNNI instruction takes 16 rows' dot products with four broadcast inputs, and
//! a block's 16 row sums come out in one register, scaled with one multiply-add (a row-major
//! layout spent about as much on scaling and adding up lanes as on the dot products; decoding
//! is bound by that work on a core before it is by memory).
//!
//! Layout, per group of 16 rows (the last one padded with zero rows) and 32-weight block `b`
//! of a row (a K super-block holds eight):
//! - weights: Q8_0 8 lines, line `k` byte `4r + i` = row `r`'s weight `4k + i` (signed); the
//!   other kinds 4 lines, line `k` byte `4r + i` = row `r`'s weights `4k + i` (low nibble)
//!   and `4k + 16 + i` (high nibble), each less its bits above the nibble;
//! - high lines (Q5_0, Q5_1, Q5_K: one; Q6_K: two), before the block's weight lines
//!   ([`high_bytes`]), each weight's `bits` above its nibble: with granule `m` = weights
//!   `4m..4m + 4` (line `m % 4`'s low nibbles for `m < 4`, high ones after) and `F = 8 /
//!   bits` granules a byte, high line `m / F` byte `4r + i` holds row `r`'s bits of weight
//!   `4m + i` from bit `bits · (m % F)` ([`high_place`]). One shift of a high line puts a
//!   granule's bits above its nibbles: two instructions a granule, where bit planes read as
//!   byte masks had cost Q6_K a third of its time in cache;
//!
//! and per group and ggml block (32 weights, or a K super-block of 256), the 16 rows side by
//! side: each fp16 value the block keeps ([`QuantKind::block_floats`]: a scale, and Q4_1's and
//! Q5_1's offset; a K super-block's scale, and Q4_K's and Q5_K's min), and each of a K
//! super-block's [`SUPER_BYTES`] small scales (and mins). All of it lies in one byte vector,
//! in the order a product reads it (see [`Records`]).

use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::{halves16, halves8};
use super::{LineBytes, QuantKind, QuantMatrix, QuantRows, QUANT_BLOCK, SUPER_BYTES};

/// Rows interleaved together.
pub(super) const GROUP_ROWS: usize = 16;

/// Bytes of one line: four weights of each of a group's rows.
const LINE: usize = 64;

/// Bytes of a group's 32-weight block of weights.
pub(super) const fn group_block_bytes(kind: QuantKind) -> usize {
    if kind.nibbles() {
        4 * LINE
    } else {
        8 * LINE
    }
}

/// Bytes of a 32-weight block's high lines, which come before its weight lines: a product
/// reads them first (their shifts head each granule's work), and loads that go up through
/// memory in order let the prefetcher stream (high lines after the weights had cost Q6_K a
/// quarter of its speed from memory).
pub(super) const fn high_bytes(kind: QuantKind) -> usize {
    kind.high_bits() * LINE
}

/// Granules whose high bits a byte of a high line holds (Q6_K: 4 pairs of bits; the Q5 kinds:
/// 8 bits).
const fn high_fields(bits: usize) -> usize {
    8 / bits
}

/// Where granule `m`'s `bits` high bits lie: the block's high line and the bit within a byte.
#[inline(always)]
pub(super) const fn high_place(bits: usize, m: usize) -> (usize, u32) {
    (
        m / high_fields(bits),
        (bits * (m % high_fields(bits))) as u32,
    )
}

/// `$h` (16-bit lanes) shifted so that the field at bit `$at` of each byte lands on bit 4, by
/// the width's immediate shifts `$left` and `$right` (the count must be a constant).
#[cfg(target_arch = "x86_64")]
macro_rules! field_to_bit4 {
    ($h:expr, $at:expr, $left:ident, $right:ident) => {
        match $at {
            0 => $left($h, 4),
            1 => $left($h, 3),
            2 => $left($h, 2),
            3 => $left($h, 1),
            4 => $h,
            5 => $right($h, 1),
            6 => $right($h, 2),
            _ => $right($h, 3),
        }
    };
}

/// `nibbles` (granule `m`'s weights of a group's 16 rows, one byte each) with their `bits`
/// high bits from the block's high lines at `high`: each byte's field shifted to bit 4 (the
/// shift moves 16-bit lanes; the mask drops what crossed from the neighbouring byte).
///
/// # Safety
/// The CPU has AVX-512 F/BW; `high` points at the block's high lines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(super) unsafe fn with_high_bits512(
    nibbles: std::arch::x86_64::__m512i,
    high: *const u8,
    bits: usize,
    m: usize,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let (line, at) = high_place(bits, m);
    let h = _mm512_loadu_si512(high.add(line * LINE) as *const _);
    let h = field_to_bit4!(h, at, _mm512_slli_epi16, _mm512_srli_epi16);
    let field = _mm512_set1_epi8((((1 << bits) - 1) << 4) as i8);
    // nibbles | (h & field)
    _mm512_ternarylogic_epi32(nibbles, h, field, 0xF8)
}

/// [`with_high_bits512`] for half a group (8 rows, 32 bytes): `high` points at the half's
/// bytes of the block's first high line.
///
/// # Safety
/// The CPU has AVX2; `high` points at the half's bytes of the block's high lines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn with_high_bits256(
    nibbles: std::arch::x86_64::__m256i,
    high: *const u8,
    bits: usize,
    m: usize,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let (line, at) = high_place(bits, m);
    let h = _mm256_loadu_si256(high.add(line * LINE) as *const __m256i);
    let h = field_to_bit4!(h, at, _mm256_slli_epi16, _mm256_srli_epi16);
    let field = _mm256_set1_epi8((((1 << bits) - 1) << 4) as i8);
    _mm256_or_si256(nibbles, _mm256_and_si256(h, field))
}

/// One row of a matrix, unpacked: each weight's stored value (Q8_0: its signed byte), and
/// per ggml block its fp16 values ([`QuantKind::block_floats`]: scales, then offsets) and a K
/// super-block's small scales.
pub(super) struct Row {
    pub(super) values: Vec<u8>,
    pub(super) scales: Vec<f16>,
    pub(super) offsets: Vec<f16>,
    pub(super) sub: Vec<u8>,
}

/// A `c_out × c_in` matrix of `kind` in row groups, all zeros.
pub(super) fn zeroed(kind: QuantKind, c_in: usize, c_out: usize) -> QuantMatrix {
    let groups = c_out.div_ceil(GROUP_ROWS);
    let records = Records::new(kind, c_in);
    QuantMatrix {
        kind,
        c_in,
        c_out,
        records,
        data: LineBytes::zeroed(groups * records.group_bytes()),
    }
}

/// Where a matrix's records lie in its bytes: row group after row group, each row's ggml
/// blocks (32 weights, or a K super-block of 256) in records of one or two. A record starts
/// with its header, a K super-block's small scales (16 rows each) then each block's fp16
/// values (16 rows each), padded to whole cache lines; then each 32-weight block's high
/// lines and its lines. A thread multiplying a run of groups so reads one stream, in order,
/// every line on a cache line of its own: with the scales in an array apart, that second, slower stream
/// cost about a quarter of the read bandwidth. Records pair the blocks whose header alone
/// would take half a line (Q8_0, Q4_0, Q5_0: one scale), the last one of an odd count alone
/// (half its header padding); Q6_K's header is padded instead (a header line per super-block
/// of 3392 bytes).
#[derive(Debug, Clone, Copy)]
pub(super) struct Records {
    /// ggml blocks per row.
    per_row: usize,
    /// log2 of the ggml blocks per record (1 or 2), and of the 32-weight blocks per ggml
    /// block (1 or 8): offsets take shifts, not divisions (the panel packing asks for every
    /// row's scales).
    record_shift: u32,
    ggml_shift: u32,
    /// Bytes of a 32-weight block's high lines and lines; of a ggml block's small scales and its
    /// fp16 values (16 rows each); of a record's header and of a record.
    block_bytes: usize,
    smalls_bytes: usize,
    floats_bytes: usize,
    header_bytes: usize,
    record_bytes: usize,
}

impl Records {
    #[inline(always)]
    pub(super) fn of(w: &QuantMatrix) -> Self {
        w.records
    }

    #[inline(always)]
    pub(super) fn new(kind: QuantKind, c_in: usize) -> Self {
        let block_bytes = high_bytes(kind) + group_block_bytes(kind);
        let smalls_bytes = if kind.super_blocks() {
            SUPER_BYTES * GROUP_ROWS
        } else {
            0
        };
        let (floats, offsets) = kind.block_floats();
        let floats_bytes = 2 * (floats + offsets) * GROUP_ROWS;
        let pair = !(smalls_bytes + floats_bytes).is_multiple_of(LINE) && !kind.super_blocks();
        let record_shift = u32::from(pair);
        let ggml_shift = (kind.row_multiple() / QUANT_BLOCK).trailing_zeros();
        let header_bytes = ((smalls_bytes + floats_bytes) << record_shift).next_multiple_of(LINE);
        Self {
            per_row: c_in / kind.row_multiple(),
            record_shift,
            ggml_shift,
            block_bytes,
            smalls_bytes,
            floats_bytes,
            header_bytes,
            record_bytes: header_bytes + (block_bytes << (record_shift + ggml_shift)),
        }
    }

    /// ggml blocks per record.
    #[inline(always)]
    pub(super) fn per_record(self) -> usize {
        1 << self.record_shift
    }

    /// Bytes of a row group (a whole number of lines): its whole records, then where a
    /// row's blocks pair up and one is left, a record of that one (its header as long).
    #[inline(always)]
    pub(super) fn group_bytes(self) -> usize {
        let (whole, left) = (
            self.per_row >> self.record_shift,
            self.per_row & (self.per_record() - 1),
        );
        whole * self.record_bytes
            + left * (self.header_bytes + (self.block_bytes << self.ggml_shift))
    }

    /// Where, in its group, 32-weight block `b` (counted in a row) starts: its high lines,
    /// then its lines.
    #[inline(always)]
    pub(super) fn block(self, b: usize) -> usize {
        let i = b >> self.ggml_shift;
        let in_record = b & ((1 << (self.record_shift + self.ggml_shift)) - 1);
        (i >> self.record_shift) * self.record_bytes
            + self.header_bytes
            + in_record * self.block_bytes
    }

    /// Where, in its group, ggml block `i`'s fp16 value `f` starts (16 rows; `f` counts the
    /// scales, then the offsets: [`QuantKind::block_floats`]).
    #[inline(always)]
    pub(super) fn floats(self, i: usize, f: usize) -> usize {
        (i >> self.record_shift) * self.record_bytes
            + (self.smalls_bytes << self.record_shift)
            + (i & (self.per_record() - 1)) * self.floats_bytes
            + 2 * f * GROUP_ROWS
    }

    /// Where, in its group, K super-block `i`'s small scale `k` starts (16 rows).
    #[inline(always)]
    pub(super) fn smalls(self, i: usize, k: usize) -> usize {
        (i >> self.record_shift) * self.record_bytes
            + (i & (self.per_record() - 1)) * self.smalls_bytes
            + k * GROUP_ROWS
    }
}

/// Where group `group`'s 32-weight block `b` starts in `w`'s bytes: its high lines, then
/// its lines ([`high_bytes`] on).
#[inline(always)]
pub(super) fn block_at(w: &QuantMatrix, group: usize, b: usize) -> usize {
    let records = Records::of(w);
    group * records.group_bytes() + records.block(b)
}

/// Where row `j`'s fp16 value `f` of its ggml block `i` is kept in `w`'s bytes (`f` counts
/// the scales, then the offsets); the group's 16 rows lie side by side from row 0's.
#[inline(always)]
pub(super) fn float_at(w: &QuantMatrix, j: usize, i: usize, f: usize) -> usize {
    let records = Records::of(w);
    (j / GROUP_ROWS) * records.group_bytes() + records.floats(i, f) + 2 * (j % GROUP_ROWS)
}

/// Row `j`'s fp16 value `f` of its ggml block `i`, widened.
#[inline(always)]
pub(super) fn float(w: &QuantMatrix, j: usize, i: usize, f: usize) -> f32 {
    let at = float_at(w, j, i, f);
    f16::from_le_bytes([w.data[at], w.data[at + 1]]).to_f32()
}

/// Where row `j`'s small scale `k` of its K super-block `i` is kept in `w`'s bytes.
#[inline(always)]
pub(super) fn sub_at(w: &QuantMatrix, j: usize, i: usize, k: usize) -> usize {
    let records = Records::of(w);
    (j / GROUP_ROWS) * records.group_bytes() + records.smalls(i, k) + j % GROUP_ROWS
}

/// Row `j`'s 32-weight block `b` (counted in its row) as it is stored: 32 unsigned values
/// (Q8_0: the signed bytes as they are), bits above the nibble included.
#[inline(always)]
pub(super) fn stored_block(w: &QuantMatrix, j: usize, b: usize) -> [u8; QUANT_BLOCK] {
    let (at, r) = (block_at(w, j / GROUP_ROWS, b), j % GROUP_ROWS);
    let (high, q) = w.data[at..].split_at(high_bytes(w.kind));
    let bits = w.kind.high_bits();
    std::array::from_fn(|k| {
        let (granule, i) = (k / 4, k % 4);
        if !w.kind.nibbles() {
            return q[granule * LINE + 4 * r + i];
        }
        let byte = q[(granule % 4) * LINE + 4 * r + i];
        let v = if granule < 4 { byte & 0xF } else { byte >> 4 };
        if bits == 0 {
            return v;
        }
        let (line, at) = high_place(bits, granule);
        v | ((high[line * LINE + 4 * r + i] >> at) & ((1 << bits) - 1)) << 4
    })
}

/// `each(j, r, group)` for every row `j < c_out` of `w` (`r` its place in its group), the
/// groups in parallel, each with its own bytes to write.
fn for_each_row(w: &mut QuantMatrix, each: impl Fn(usize, usize, &mut [u8]) + Sync) {
    let c_out = w.c_out;
    let records = Records::of(w);
    w.data
        .par_chunks_mut(records.group_bytes())
        .enumerate()
        .for_each(|(g, group)| {
            for j in (g * GROUP_ROWS..(g + 1) * GROUP_ROWS).filter(|&j| j < c_out) {
                each(j, j % GROUP_ROWS, group);
            }
        });
}

/// Fills `w` (as [`zeroed`] made it) in parallel, row `j` from `row(j)` (rows past `c_out`
/// stay zero).
pub(super) fn fill(w: &mut QuantMatrix, row: impl Fn(usize) -> Row + Sync) {
    let kind = w.kind;
    let bits = kind.high_bits();
    let records = Records::of(w);
    let (floats, _) = kind.block_floats();
    for_each_row(w, |j, r, group| {
        let data = row(j);
        let mut put = |at: usize, v: f16| group[at..at + 2].copy_from_slice(&v.to_le_bytes());
        for (i, &v) in data.scales.iter().enumerate() {
            put(records.floats(i / floats, i % floats) + 2 * r, v);
        }
        for (i, &v) in data.offsets.iter().enumerate() {
            put(records.floats(i, floats) + 2 * r, v);
        }
        for (k, &v) in data.sub.iter().enumerate() {
            group[records.smalls(k / SUPER_BYTES, k % SUPER_BYTES) + r] = v;
        }
        for (b, v) in data.values.chunks_exact(QUANT_BLOCK).enumerate() {
            let at = records.block(b);
            let (high, lines) = group[at..at + records.block_bytes].split_at_mut(high_bytes(kind));
            if !kind.nibbles() {
                for k in 0..8 {
                    lines[k * LINE + 4 * r..][..4].copy_from_slice(&v[4 * k..4 * k + 4]);
                }
                continue;
            }
            for k in 0..4 {
                for i in 0..4 {
                    let (low, high) = (v[4 * k + i] & 0xF, v[4 * k + 16 + i] & 0xF);
                    lines[k * LINE + 4 * r + i] = low | high << 4;
                }
            }
            if bits > 0 {
                for (k, &v) in v.iter().enumerate() {
                    let (line, shift) = high_place(bits, k / 4);
                    high[line * LINE + 4 * r + k % 4] |= (v >> 4) << shift;
                }
            }
        }
    });
}

/// Fills `dst` (as [`zeroed`] made it) in parallel with rows of matrices of its kind and width
/// as they are stored (no unpacking): row `j` is `source(j)`'s (a matrix and a row of it).
pub(super) fn copy_rows<'a>(
    dst: &mut QuantMatrix,
    source: impl Fn(usize) -> (&'a QuantMatrix, usize) + Sync,
) {
    let (kind, c_in) = (dst.kind, dst.c_in);
    let records = Records::of(dst);
    let (blocks, per_row) = (c_in / QUANT_BLOCK, c_in / kind.row_multiple());
    let (floats, offsets) = kind.block_floats();
    let sub = if kind.super_blocks() { SUPER_BYTES } else { 0 };
    for_each_row(dst, |j, r, group| {
        let (src, js) = source(j);
        assert!(
            src.kind == kind && src.c_in == c_in,
            "copy_rows: another kind or width"
        );
        let rs = js % GROUP_ROWS;
        for b in 0..blocks {
            let from_at = block_at(src, js / GROUP_ROWS, b);
            let from = &src.data[from_at..from_at + records.block_bytes];
            let to_at = records.block(b);
            // Every line (weights' and high bits') holds row rs's 4 bytes at 4·rs.
            for line in 0..records.block_bytes / LINE {
                let (f, t) = (line * LINE + 4 * rs, to_at + line * LINE + 4 * r);
                group[t..t + 4].copy_from_slice(&from[f..f + 4]);
            }
        }
        for i in 0..per_row {
            for f in 0..floats + offsets {
                let (t, s) = (records.floats(i, f) + 2 * r, float_at(src, js, i, f));
                group[t..t + 2].copy_from_slice(&src.data[s..s + 2]);
            }
            for k in 0..sub {
                group[records.smalls(i, k) + r] = src.data[sub_at(src, js, i, k)];
            }
        }
    });
}

/// Granule `g` (weights 4g..4g + 3) of block `b` of row group `group`'s 16 rows, as signed
/// bytes (the nibble kinds' with their high bits, less their center): the wide product's
/// panel line.
///
/// # Safety
/// The CPU has AVX-512 F/BW; `w` (a row-group kind) has the group and block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(super) unsafe fn line(
    w: &QuantMatrix,
    group: usize,
    b: usize,
    g: usize,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let high = w.data.as_ptr().add(block_at(w, group, b));
    let lines = high.add(high_bytes(w.kind));
    if !w.kind.nibbles() {
        return _mm512_loadu_si512(lines.add(g * LINE) as *const _);
    }
    let line = _mm512_loadu_si512(lines.add((g % 4) * LINE) as *const _);
    let line = if g >= 4 {
        _mm512_srli_epi16(line, 4)
    } else {
        line
    };
    let mut v = _mm512_and_si512(line, _mm512_set1_epi8(0x0F));
    let bits = w.kind.high_bits();
    if bits > 0 {
        v = with_high_bits512(v, high, bits, g);
    }
    _mm512_sub_epi8(v, _mm512_set1_epi8(w.kind.center() as i8))
}

/// The reference form of the row groups' thin product, which the SIMD forms match bit for
/// bit: per weight row and input row, block by block, `sum += dot · (w scale · x scale)`
/// (the dot product exact, in integers), then `sum += offset · (x scale · x sum)` for kinds
/// with offsets; the wide product's sums, so a row's result does not depend on how many rows
/// are multiplied at once.
pub(super) fn dots_portable(
    acc: &mut [f32],
    x: &QuantRows,
    w: &QuantMatrix,
    rows: usize,
    j0: usize,
    j1: usize,
) {
    let (blocks, c_in, width) = (w.c_in / QUANT_BLOCK, w.c_in, j1 - j0);
    let center = i32::from(w.kind.center());
    for j in j0..j1 {
        for r in 0..rows {
            let mut sum = 0f32;
            for b in 0..blocks {
                let v = stored_block(w, j, b);
                let xq = &x.q[r * c_in + b * QUANT_BLOCK..][..QUANT_BLOCK];
                let dot: i32 = v
                    .iter()
                    .zip(xq)
                    .map(|(&v, &x)| {
                        let v = if w.kind.nibbles() {
                            i32::from(v) - center
                        } else {
                            i32::from(v as i8)
                        };
                        v * i32::from(x)
                    })
                    .sum();
                let at = r * blocks + b;
                sum = (dot as f32).mul_add(float(w, j, b, 0) * x.scales[at], sum);
                if w.kind.has_offset() {
                    sum = float(w, j, b, 1).mul_add(x.scaled_sums[at], sum);
                }
            }
            acc[r * width + j - j0] += sum;
        }
    }
}

/// `acc[rows, j0..j1] += x · Wᵀ` for row-group weights: the best form this CPU has.
pub(super) fn dots(
    acc: &mut [f32],
    x: &QuantRows,
    w: &QuantMatrix,
    rows: usize,
    j0: usize,
    j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::{level, Level};
        let form: Option<GroupForms<QuantRows>> = match level() {
            Level::Avx512 if super::avx512_vnni() => Some(by_kind!(
                w.kind,
                avx512_forms as fn() -> GroupForms<QuantRows>,
                [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1]
            )()),
            Level::Avx512 | Level::Avx2 => Some(by_kind!(
                w.kind,
                avx2_forms as fn() -> GroupForms<QuantRows>,
                [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1]
            )()),
            Level::Base => None,
        };
        if let Some(forms) = form {
            // SAFETY: the CPU has the forms' features (`level`, `avx512_vnni`); the thin
            // product checked the shapes: rows j0..j1 of `w`, `rows` rows of `x`, `acc`
            // rows × (j1 − j0).
            unsafe { by_groups(acc, x, w, rows, j0, j1, forms) };
            return;
        }
    }
    dots_portable(acc, x, w, rows, j0, j1);
}

/// Where one call of a SIMD form reads and writes: weight rows `j..j + n` (within one group;
/// lanes past `n` are not written) against input rows `r0..r0 + G`, into `acc` (`width`
/// columns from `j0`).
#[cfg(target_arch = "x86_64")]
pub(super) struct GroupTile<'a, X> {
    pub(super) x: &'a X,
    pub(super) w: &'a QuantMatrix,
    pub(super) group: usize,
    lane0: usize,
    n: usize,
    pub(super) r0: usize,
    acc_at: usize,
    width: usize,
}

#[cfg(target_arch = "x86_64")]
impl<X> Clone for GroupTile<'_, X> {
    fn clone(&self) -> Self {
        *self
    }
}

#[cfg(target_arch = "x86_64")]
impl<X> Copy for GroupTile<'_, X> {}

#[cfg(target_arch = "x86_64")]
impl<X> GroupTile<'_, X> {
    /// The tile's matrix's records as `kind` lays them out (a form passes its constant kind,
    /// so the offsets fold to shifts and multiplies), and where the tile's group starts.
    #[inline(always)]
    pub(super) fn records(&self, kind: QuantKind) -> (Records, *const u8) {
        let records = Records::new(kind, self.w.c_in);
        let at = self.group * records.group_bytes();
        (records, self.w.data[at..].as_ptr())
    }

    /// Adds lanes `lane0..lane0 + n` of input row `g`'s 16 row sums to `acc`.
    #[inline(always)]
    fn add(&self, acc: &mut [f32], g: usize, sums: &[f32; GROUP_ROWS]) {
        let row = &mut acc[(self.r0 + g) * self.width + self.acc_at..][..self.n];
        for (a, s) in row.iter_mut().zip(&sums[self.lane0..]) {
            *a += s;
        }
    }

    /// [`GroupTile::add`] of the row sums in `low` (rows 0..8) and `high` (8..16).
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn add_halves(
        &self,
        acc: &mut [f32],
        g: usize,
        low: std::arch::x86_64::__m256,
        high: std::arch::x86_64::__m256,
    ) {
        use std::arch::x86_64::_mm256_storeu_ps;
        let mut lanes = [0f32; GROUP_ROWS];
        _mm256_storeu_ps(lanes.as_mut_ptr(), low);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), high);
        self.add(acc, g, &lanes);
    }

    /// [`GroupTile::add`] of the row sums in `sums`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add_all(
        &self,
        acc: &mut [f32],
        g: usize,
        sums: std::arch::x86_64::__m512,
    ) {
        let mut lanes = [0f32; GROUP_ROWS];
        std::arch::x86_64::_mm512_storeu_ps(lanes.as_mut_ptr(), sums);
        self.add(acc, g, &lanes);
    }
}

/// A SIMD form for `G` input rows (its own constant), inputs `X`.
#[cfg(target_arch = "x86_64")]
pub(super) type GroupForm<X> = unsafe fn(&mut [f32], GroupTile<X>);

/// A SIMD level's forms for 1 to 4 input rows.
#[cfg(target_arch = "x86_64")]
pub(super) type GroupForms<X> = [GroupForm<X>; 4];

/// The AVX-512 forms of kind `K` (see [`QuantKind::of_index`]).
#[cfg(target_arch = "x86_64")]
fn avx512_forms<const K: u8>() -> GroupForms<QuantRows> {
    group_forms!(avx512_group, K)
}

/// The AVX2 forms of kind `K`.
#[cfg(target_arch = "x86_64")]
fn avx2_forms<const K: u8>() -> GroupForms<QuantRows> {
    group_forms!(avx2_group, K)
}

/// The groups holding rows `j0..j1`, each against the input rows 4 at a time.
///
/// # Safety
/// The CPU has the forms' features; bounds as for [`dots`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn by_groups<X>(
    acc: &mut [f32],
    x: &X,
    w: &QuantMatrix,
    rows: usize,
    j0: usize,
    j1: usize,
    forms: GroupForms<X>,
) {
    let mut j = j0;
    while j < j1 {
        let group = j / GROUP_ROWS;
        let end = ((group + 1) * GROUP_ROWS).min(j1);
        for r0 in (0..rows).step_by(4) {
            let tile = GroupTile {
                x,
                w,
                group,
                lane0: j % GROUP_ROWS,
                n: end - j,
                r0,
                acc_at: j - j0,
                width: j1 - j0,
            };
            // SAFETY: the caller's contract.
            unsafe { forms[(rows - r0).min(4) - 1](acc, tile) };
        }
        j = end;
    }
}

/// The AVX-512 VNNI form: per block, each line's low and high nibbles (Q8_0: each line, plus
/// 128) times four inputs broadcast, 16 rows' dot products a register (four chains of them,
/// added once a block: integers, so in any order), started from minus the center times the
/// inputs' sum; then one multiply-add per block for the 16 rows (and one for the offsets).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL, VNNI and FMA; `tile` lies within `w`, `x` and `acc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn avx512_group<const G: usize, const K: u8>(acc: &mut [f32], tile: GroupTile<QuantRows>) {
    use std::arch::x86_64::*;
    let kind = QuantKind::of_index(K);
    let (x, w) = (tile.x, tile.w);
    let (blocks, c_in) = (w.c_in / QUANT_BLOCK, w.c_in);
    let bits = kind.high_bits();
    let offsets = kind.has_offset();
    let nibble = _mm512_set1_epi8(0x0F);
    let flip = _mm512_set1_epi8(-128);
    let mut sums = [_mm512_setzero_ps(); G];
    let (records, group_at) = tile.records(kind);
    for b in 0..blocks {
        let high = group_at.add(records.block(b));
        let lines = high.add(high_bytes(kind));
        // Four inputs of row g from value `at` of the block, as one i32 in every lane.
        let four = |g: usize, at: usize| -> __m512i {
            let p =
                x.q.as_ptr()
                    .add((tile.r0 + g) * c_in + b * QUANT_BLOCK + at);
            _mm512_set1_epi32((p as *const i32).read_unaligned())
        };
        let mut dots: [[__m512i; 4]; G] = std::array::from_fn(|g| {
            let start = if offsets {
                0
            } else {
                *x.starts.get_unchecked((tile.r0 + g) * blocks + b)
            };
            [
                _mm512_set1_epi32(start),
                _mm512_setzero_si512(),
                _mm512_setzero_si512(),
                _mm512_setzero_si512(),
            ]
        });
        if kind.nibbles() {
            for k in 0..4 {
                let line = _mm512_loadu_si512(lines.add(k * LINE) as *const _);
                let mut low = _mm512_and_si512(line, nibble);
                let mut up = _mm512_and_si512(_mm512_srli_epi16(line, 4), nibble);
                if bits > 0 {
                    low = with_high_bits512(low, high, bits, k);
                    up = with_high_bits512(up, high, bits, k + 4);
                }
                for (g, dot) in dots.iter_mut().enumerate() {
                    dot[k] = _mm512_dpbusd_epi32(dot[k], low, four(g, 4 * k));
                    dot[k] = _mm512_dpbusd_epi32(dot[k], up, four(g, 4 * k + 16));
                }
            }
        } else {
            for k in 0..8 {
                let line = _mm512_loadu_si512(lines.add(k * LINE) as *const _);
                let line = _mm512_xor_si512(line, flip);
                for (g, dot) in dots.iter_mut().enumerate() {
                    dot[k % 4] = _mm512_dpbusd_epi32(dot[k % 4], line, four(g, 4 * k));
                }
            }
        }
        let scales = halves16(group_at.add(records.floats(b, 0)) as *const f16);
        for (g, sum) in sums.iter_mut().enumerate() {
            let [a, b_, c, d] = dots[g];
            let dot = _mm512_add_epi32(_mm512_add_epi32(a, b_), _mm512_add_epi32(c, d));
            let at = (tile.r0 + g) * blocks + b;
            let scale = _mm512_mul_ps(scales, _mm512_set1_ps(*x.scales.get_unchecked(at)));
            *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *sum);
            if offsets {
                let offs = halves16(group_at.add(records.floats(b, 1)) as *const f16);
                let xsum = _mm512_set1_ps(*x.scaled_sums.get_unchecked(at));
                *sum = _mm512_fmadd_ps(offs, xsum, *sum);
            }
        }
    }
    for (g, sum) in sums.iter().enumerate() {
        tile.add_all(acc, g, *sum);
    }
}

/// The AVX2 form: the group as two halves of 8 rows (32 bytes of each line), unsigned
/// weights times signed inputs summed in pairs (`vpmaddubsw`; Q8_0's signed weights through
/// their magnitudes and the inputs with their signs) then in fours (`vpmaddwd`); the same
/// integers and float steps as the AVX-512 form.
///
/// # Safety
/// The CPU has AVX2 and FMA; `tile` lies within `w`, `x` and `acc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_group<const G: usize, const K: u8>(acc: &mut [f32], tile: GroupTile<QuantRows>) {
    use std::arch::x86_64::*;
    let kind = QuantKind::of_index(K);
    let (x, w) = (tile.x, tile.w);
    let (blocks, c_in) = (w.c_in / QUANT_BLOCK, w.c_in);
    let bits = kind.high_bits();
    let offsets = kind.has_offset();
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // The 16 rows' sums of each input row: rows 0..8, then 8..16.
    let mut sums = [[_mm256_setzero_ps(); G]; 2];
    let (records, group_at) = tile.records(kind);
    for b in 0..blocks {
        let high = group_at.add(records.block(b));
        let lines = high.add(high_bytes(kind));
        let four = |g: usize, at: usize| -> __m256i {
            let p =
                x.q.as_ptr()
                    .add((tile.r0 + g) * c_in + b * QUANT_BLOCK + at);
            _mm256_set1_epi32((p as *const i32).read_unaligned())
        };
        // Unsigned weights (32 bytes) times four inputs, summed per row into 8 lanes.
        let dot = |weights: __m256i, inputs: __m256i| -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(weights, inputs), ones)
        };
        for (half, half_sums) in sums.iter_mut().enumerate() {
            let mut dots: [__m256i; G] = std::array::from_fn(|g| {
                let start = if offsets || !kind.nibbles() {
                    0
                } else {
                    *x.starts.get_unchecked((tile.r0 + g) * blocks + b)
                };
                _mm256_set1_epi32(start)
            });
            if kind.nibbles() {
                let high = high.add(32 * half);
                for k in 0..4 {
                    let line =
                        _mm256_loadu_si256(lines.add(k * LINE + 32 * half) as *const __m256i);
                    let mut low = _mm256_and_si256(line, nibble);
                    let mut up = _mm256_and_si256(_mm256_srli_epi16(line, 4), nibble);
                    if bits > 0 {
                        low = with_high_bits256(low, high, bits, k);
                        up = with_high_bits256(up, high, bits, k + 4);
                    }
                    for (g, d) in dots.iter_mut().enumerate() {
                        *d = _mm256_add_epi32(*d, dot(low, four(g, 4 * k)));
                        *d = _mm256_add_epi32(*d, dot(up, four(g, 4 * k + 16)));
                    }
                }
            } else {
                for k in 0..8 {
                    let line =
                        _mm256_loadu_si256(lines.add(k * LINE + 32 * half) as *const __m256i);
                    let magnitude = _mm256_sign_epi8(line, line);
                    for (g, d) in dots.iter_mut().enumerate() {
                        let signed = _mm256_sign_epi8(four(g, 4 * k), line);
                        *d = _mm256_add_epi32(*d, dot(magnitude, signed));
                    }
                }
            }
            let scales = halves8(group_at.add(records.floats(b, 0) + 16 * half) as *const f16);
            for (g, d) in dots.iter().enumerate() {
                let at = (tile.r0 + g) * blocks + b;
                let scale = _mm256_mul_ps(scales, _mm256_set1_ps(*x.scales.get_unchecked(at)));
                let sum = &mut half_sums[g];
                *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*d), scale, *sum);
                if offsets {
                    let offs =
                        halves8(group_at.add(records.floats(b, 1) + 16 * half) as *const f16);
                    let xsum = _mm256_set1_ps(*x.scaled_sums.get_unchecked(at));
                    *sum = _mm256_fmadd_ps(offs, xsum, *sum);
                }
            }
        }
    }
    for (g, (low, high)) in sums[0].iter().zip(&sums[1]).enumerate() {
        tile.add_halves(acc, g, *low, *high);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::quant::tests::{test_matrices, values};

    /// A thin product's form: `(acc, x, w, rows, j0, j1)`.
    pub(in crate::kernels::quant) type FormFn<'a, X> =
        dyn Fn(&mut [f32], &X, &QuantMatrix, usize, usize, usize) + 'a;

    /// A [`FormFn`] held.
    pub(in crate::kernels::quant) type Form<X> = Box<FormFn<'static, X>>;

    /// Of a kind's AVX2 and AVX-512 VNNI forms, those this CPU has, named.
    #[cfg(target_arch = "x86_64")]
    pub(in crate::kernels::quant) fn available<X: 'static>(
        avx2: GroupForms<X>,
        avx512: GroupForms<X>,
    ) -> Vec<(&'static str, Form<X>)> {
        use crate::kernels::{level, Level};
        let run = |forms: GroupForms<X>| -> Form<X> {
            // SAFETY: only the forms of levels this CPU has are listed (below); the checker
            // passes shapes as the thin product does.
            Box::new(move |acc, x, w, rows, j0, j1| unsafe {
                by_groups(acc, x, w, rows, j0, j1, forms)
            })
        };
        let mut forms = Vec::new();
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            forms.push(("AVX2", run(avx2)));
        }
        if level() == Level::Avx512 && super::super::avx512_vnni() {
            forms.push(("AVX-512", run(avx512)));
        }
        forms
    }

    /// Checks a thin product on the test matrices of `kinds`: its portable form within the
    /// inputs' 8-bit rounding (half a step of 1/127 of a row's largest input) of the product
    /// with the dequantized weights, and each of `simd(kind)` giving the portable form's bits;
    /// rows 2..19 of a matrix (partial first and last groups), 1 to 7 input rows.
    pub(in crate::kernels::quant) fn check_thin_forms<X>(
        kinds: &[QuantKind],
        inputs: impl Fn(&[f32], QuantKind) -> X,
        portable: impl Fn(&mut [f32], &X, &QuantMatrix, usize, usize, usize),
        simd: impl Fn(QuantKind) -> Vec<(&'static str, Form<X>)>,
    ) {
        let (j0, j1) = (2, 19);
        for (kind, c_in, w) in test_matrices(j1) {
            if !kinds.contains(&kind) {
                continue;
            }
            let dense = w.dequantize();
            for rows in [1, 2, 3, 4, 6, 7] {
                let inp = values(rows * c_in, 5);
                let x = inputs(&inp, kind);
                let run = |form: &FormFn<'_, X>| {
                    let mut acc = vec![0.5f32; rows * (j1 - j0)];
                    form(&mut acc, &x, &w, rows, j0, j1);
                    acc
                };
                let want = run(&portable);
                for r in 0..rows {
                    let xr = &inp[r * c_in..(r + 1) * c_in];
                    let step = xr.iter().fold(0f32, |m, v| m.max(v.abs())) / 254.0;
                    for j in j0..j1 {
                        let wr = &dense[j * c_in..(j + 1) * c_in];
                        let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                        let bound: f32 = wr.iter().map(|v| v.abs() * step).sum();
                        let got = want[r * (j1 - j0) + j - j0] - 0.5;
                        assert!(
                            (got - exact).abs() <= 1.01 * bound + 1e-3,
                            "{kind:?} row {r} col {j}: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                for (name, form) in simd(kind) {
                    let got = run(&*form);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{kind:?} {name}, {c_in} wide, {rows} rows"
                    );
                }
            }
        }
    }

    /// Every SIMD form gives the portable form's bits for each 32-weight-block kind (odd and
    /// even block counts), near the dequantized product.
    #[test]
    fn simd_forms_give_the_portable_bits_near_the_dequantized_product() {
        let kinds = [
            QuantKind::Q8_0,
            QuantKind::Q4_0,
            QuantKind::Q4_1,
            QuantKind::Q5_0,
            QuantKind::Q5_1,
        ];
        check_thin_forms(&kinds, QuantRows::new, dots_portable, |kind| {
            #[cfg(target_arch = "x86_64")]
            return available(
                by_kind!(
                    kind,
                    avx2_forms as fn() -> GroupForms<QuantRows>,
                    [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1]
                )(),
                by_kind!(
                    kind,
                    avx512_forms as fn() -> GroupForms<QuantRows>,
                    [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1]
                )(),
            );
            #[cfg(not(target_arch = "x86_64"))]
            Vec::new()
        });
    }

    /// A row's result has the same bits from the thin product (decoding) and the wide one
    /// (prefill), alone or among others.
    #[test]
    fn thin_and_wide_products_give_a_row_the_same_bits() {
        if !super::super::wide_quant_native() {
            return; // no integer wide form on this CPU
        }
        for (kind, c_in, w) in test_matrices(37) {
            if kind.super_blocks() {
                continue;
            }
            let rows = 9;
            let inp = values(rows * c_in, 8);
            let bias = values(37, 2);
            let mut wide = vec![0f32; rows * 37];
            assert!(super::super::matmul_wide_quant(
                &mut wide,
                &inp,
                &w,
                Some(&bias)
            ));
            for r in 0..rows {
                let mut thin = vec![0f32; 37];
                let row = &inp[r * c_in..(r + 1) * c_in];
                super::super::matmul_thin_quant(&mut thin, row, &w, Some(&bias), c_in, 37);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&thin),
                    bits(&wide[r * 37..(r + 1) * 37]),
                    "{kind:?} row {r}"
                );
            }
        }
    }

    /// Every 32-weight block's lines start on a cache line of their own, so no 64-byte load
    /// straddles two.
    #[test]
    fn lines_start_on_cache_lines() {
        for (kind, c_in, w) in test_matrices(19) {
            assert_eq!(w.data.as_ptr() as usize % 64, 0);
            for group in 0..2 {
                for b in 0..c_in / QUANT_BLOCK {
                    let at = block_at(&w, group, b);
                    assert_eq!(at % 64, 0, "{kind:?} {c_in} wide, block {b}");
                }
            }
        }
    }

    /// Row groups keep every row's values, with a partial last group.
    #[test]
    fn row_groups_keep_each_rows_blocks() {
        for (kind, c_in, w) in test_matrices(19) {
            if kind.super_blocks() {
                continue;
            }
            let blocks = c_in / QUANT_BLOCK;
            // Two groups of 16 rows, each as many bytes as 16 of the file's rows (and where a
            // row's blocks pair up in records and one is left, its header's padding).
            let file_row = kind.ggml().bytes_for(c_in as u64).unwrap() as usize;
            let left = Records::new(kind, c_in).per_record() == 2 && blocks % 2 == 1;
            let pad = if left { 2 * GROUP_ROWS } else { 0 };
            assert_eq!(w.bytes(), 2 * (GROUP_ROWS * file_row + pad), "{kind:?}");
            let again = w.with_row_order(&(0..19).collect::<Vec<_>>());
            for j in 0..19 {
                for b in 0..blocks {
                    assert_eq!(stored_block(&w, j, b), stored_block(&again, j, b));
                }
            }
        }
    }
}
