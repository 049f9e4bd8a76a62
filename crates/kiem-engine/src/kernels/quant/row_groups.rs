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
//! - high bits (Q5_0, Q5_1, Q5_K, Q6_K): per plane, 8 masks of 64 bits (two u32, low first),
//!   mask `k` bit `4r + i` = the plane's bit of row `r`'s weight `4k + i`;
//!
//! and per group and ggml block (32 weights, or a K super-block of 256), the 16 rows side by
//! side: each fp16 value the block keeps ([`QuantKind::block_floats`]: a scale, and Q4_1's and
//! Q5_1's offset; a K super-block's scale, and Q4_K's and Q5_K's min), and each of a K
//! super-block's [`SUPER_BYTES`] small scales (and mins).

use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::{halves16, halves8};
use super::{QuantKind, QuantMatrix, QuantRows, QUANT_BLOCK, SUPER_BYTES};

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

/// u32 words per group, 32-weight block and plane of high bits: 8 masks of 64 bits.
pub(super) const PLANE_WORDS: usize = 16;

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
    let blocks = groups * (c_in / QUANT_BLOCK);
    let ggml_blocks = groups * (c_in / kind.row_multiple());
    let (floats, offsets) = kind.block_floats();
    let sub = if kind.super_blocks() { SUPER_BYTES } else { 0 };
    QuantMatrix {
        kind,
        c_in,
        c_out,
        q: vec![0; blocks * group_block_bytes(kind)],
        high: vec![0; blocks * PLANE_WORDS * kind.high_planes()],
        scales: vec![f16::ZERO; ggml_blocks * floats * GROUP_ROWS],
        offsets: vec![f16::ZERO; ggml_blocks * offsets * GROUP_ROWS],
        sub: vec![0; ggml_blocks * sub * GROUP_ROWS],
    }
}

/// Where row `j`'s f32 `f` of its ggml block `i` is kept in `scales` (`offsets`: `f` 0).
#[inline(always)]
pub(super) fn float_at(w: &QuantMatrix, j: usize, i: usize, f: usize) -> usize {
    let per_row = w.c_in / w.kind.row_multiple();
    let floats = w.kind.block_floats().0;
    (((j / GROUP_ROWS) * per_row + i) * floats + f) * GROUP_ROWS + j % GROUP_ROWS
}

/// Where row `j`'s small scale `k` of its K super-block `i` is kept in `sub`.
#[inline(always)]
pub(super) fn sub_at(w: &QuantMatrix, j: usize, i: usize, k: usize) -> usize {
    let per_row = w.c_in / w.kind.row_multiple();
    (((j / GROUP_ROWS) * per_row + i) * SUPER_BYTES + k) * GROUP_ROWS + j % GROUP_ROWS
}

/// Row `j`'s 32-weight block `b` (counted in its row) as it is stored: 32 unsigned values
/// (Q8_0: the signed bytes as they are), bits above the nibble included.
#[inline(always)]
pub(super) fn stored_block(w: &QuantMatrix, j: usize, b: usize) -> [u8; QUANT_BLOCK] {
    let blocks = w.c_in / QUANT_BLOCK;
    let (group_block, r) = ((j / GROUP_ROWS) * blocks + b, j % GROUP_ROWS);
    let q = &w.q[group_block * group_block_bytes(w.kind)..];
    let planes = w.kind.high_planes();
    std::array::from_fn(|k| {
        let (granule, i) = (k / 4, k % 4);
        if !w.kind.nibbles() {
            return q[granule * LINE + 4 * r + i];
        }
        let byte = q[(granule % 4) * LINE + 4 * r + i];
        let mut v = if granule < 4 { byte & 0xF } else { byte >> 4 };
        for p in 0..planes {
            let at = (group_block * planes + p) * PLANE_WORDS + 2 * granule;
            let mask = u64::from(w.high[at]) | u64::from(w.high[at + 1]) << 32;
            v |= (((mask >> (4 * r + i)) & 1) as u8) << (4 + p);
        }
        v
    })
}

/// One row group's share of a matrix's storage, each slice from the group's first entry.
struct Group<'a> {
    q: &'a mut [u8],
    scales: &'a mut [f16],
    offsets: &'a mut [f16],
    sub: &'a mut [u8],
    high: &'a mut [u32],
}

/// `each(j, r, group)` for every row `j < c_out` of `w` (`r` its place in its group), the
/// groups in parallel, each with its own share of the storage to write.
fn for_each_row(w: &mut QuantMatrix, each: impl Fn(usize, usize, &mut Group) + Sync) {
    let (kind, c_in, c_out) = (w.kind, w.c_in, w.c_out);
    let (blocks, per_row) = (c_in / QUANT_BLOCK, c_in / kind.row_multiple());
    let groups = c_out.div_ceil(GROUP_ROWS);
    // A group's chunk of `v`, `size` long; an empty chunk each where the kind keeps none.
    fn chunks<T>(v: &mut [T], size: usize, groups: usize) -> Vec<&mut [T]> {
        if v.is_empty() {
            (0..groups).map(|_| <&mut [T]>::default()).collect()
        } else {
            v.chunks_mut(size).collect()
        }
    }
    let sub = if kind.super_blocks() { SUPER_BYTES } else { 0 };
    let offsets = chunks(&mut w.offsets, per_row * GROUP_ROWS, groups);
    let subs = chunks(&mut w.sub, per_row * sub * GROUP_ROWS, groups);
    let high = chunks(
        &mut w.high,
        blocks * kind.high_planes() * PLANE_WORDS,
        groups,
    );
    let floats = per_row * kind.block_floats().0 * GROUP_ROWS;
    w.q.par_chunks_mut(blocks * group_block_bytes(kind))
        .zip(w.scales.par_chunks_mut(floats))
        .zip(offsets)
        .zip(subs)
        .zip(high)
        .enumerate()
        .for_each(|(g, ((((q, scales), offsets), sub), high))| {
            let mut group = Group {
                q,
                scales,
                offsets,
                sub,
                high,
            };
            for j in (g * GROUP_ROWS..(g + 1) * GROUP_ROWS).filter(|&j| j < c_out) {
                each(j, j % GROUP_ROWS, &mut group);
            }
        });
}

/// Fills `w` (as [`zeroed`] made it) in parallel, row `j` from `row(j)` (rows past `c_out`
/// stay zero).
pub(super) fn fill(w: &mut QuantMatrix, row: impl Fn(usize) -> Row + Sync) {
    let kind = w.kind;
    let planes = kind.high_planes();
    let gbb = group_block_bytes(kind);
    for_each_row(w, |j, r, group| {
        let data = row(j);
        for (i, &v) in data.scales.iter().enumerate() {
            group.scales[i * GROUP_ROWS + r] = v;
        }
        for (i, &v) in data.offsets.iter().enumerate() {
            group.offsets[i * GROUP_ROWS + r] = v;
        }
        for (k, &v) in data.sub.iter().enumerate() {
            group.sub[k * GROUP_ROWS + r] = v;
        }
        for (b, v) in data.values.chunks_exact(QUANT_BLOCK).enumerate() {
            let lines = &mut group.q[b * gbb..(b + 1) * gbb];
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
            for p in 0..planes {
                let words = &mut group.high[(b * planes + p) * PLANE_WORDS..];
                for g in 0..8 {
                    let bits = (0..4).fold(0u32, |m, i| {
                        m | (u32::from(v[4 * g + i] >> (4 + p)) & 1) << i
                    });
                    words[2 * g + 4 * r / 32] |= bits << (4 * r % 32);
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
    let (blocks, per_row) = (c_in / QUANT_BLOCK, c_in / kind.row_multiple());
    let (floats, offsets) = kind.block_floats();
    let sub = if kind.super_blocks() { SUPER_BYTES } else { 0 };
    let planes = kind.high_planes();
    let gbb = group_block_bytes(kind);
    for_each_row(dst, |j, r, group| {
        let (src, js) = source(j);
        assert!(
            src.kind == kind && src.c_in == c_in,
            "copy_rows: another kind or width"
        );
        let (rs, first) = (js % GROUP_ROWS, js / GROUP_ROWS * blocks);
        for b in 0..blocks {
            let from = &src.q[(first + b) * gbb..(first + b + 1) * gbb];
            let to = &mut group.q[b * gbb..(b + 1) * gbb];
            for line in 0..gbb / LINE {
                let (f, t) = (line * LINE + 4 * rs, line * LINE + 4 * r);
                to[t..t + 4].copy_from_slice(&from[f..f + 4]);
            }
            for p in 0..planes {
                let from = &src.high[((first + b) * planes + p) * PLANE_WORDS..];
                let to = &mut group.high[(b * planes + p) * PLANE_WORDS..];
                for g in 0..8 {
                    // Row rs's 4 bits of mask g, to row r's.
                    let mask = u64::from(from[2 * g]) | u64::from(from[2 * g + 1]) << 32;
                    let bits = (mask >> (4 * rs)) & 0xF;
                    to[2 * g + 4 * r / 32] |= (bits as u32) << (4 * r % 32);
                }
            }
        }
        for i in 0..per_row {
            for f in 0..floats {
                group.scales[(i * floats + f) * GROUP_ROWS + r] =
                    src.scales[float_at(src, js, i, f)];
            }
            if offsets > 0 {
                group.offsets[i * GROUP_ROWS + r] = src.offsets[float_at(src, js, i, 0)];
            }
            for k in 0..sub {
                group.sub[(i * sub + k) * GROUP_ROWS + r] = src.sub[sub_at(src, js, i, k)];
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
pub(super) unsafe fn line(
    w: &QuantMatrix,
    group: usize,
    b: usize,
    g: usize,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let group_block = group * (w.c_in / QUANT_BLOCK) + b;
    let lines = w.q.as_ptr().add(group_block * group_block_bytes(w.kind));
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
    let planes = w.kind.high_planes();
    let high = w.high.as_ptr().add(group_block * planes * PLANE_WORDS);
    for p in 0..planes {
        let mask = (high.add(p * PLANE_WORDS + 2 * g) as *const u64).read_unaligned();
        v = _mm512_mask_add_epi8(v, mask, v, _mm512_set1_epi8(16 << p));
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
                let s = float_at(w, j, b, 0);
                sum = (dot as f32).mul_add(w.scales[s].to_f32() * x.scales[at], sum);
                if w.kind.has_offset() {
                    sum = w.offsets[s].to_f32().mul_add(x.scaled_sums[at], sum);
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
    let gbb = group_block_bytes(kind);
    let planes = kind.high_planes();
    let offsets = kind.has_offset();
    let nibble = _mm512_set1_epi8(0x0F);
    let flip = _mm512_set1_epi8(-128);
    let mut sums = [_mm512_setzero_ps(); G];
    for b in 0..blocks {
        let group_block = tile.group * blocks + b;
        let lines = w.q.as_ptr().add(group_block * gbb);
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
            let high = w.high.as_ptr().add(group_block * planes * PLANE_WORDS);
            for k in 0..4 {
                let line = _mm512_loadu_si512(lines.add(k * LINE) as *const _);
                let mut low = _mm512_and_si512(line, nibble);
                let mut up = _mm512_and_si512(_mm512_srli_epi16(line, 4), nibble);
                for p in 0..planes {
                    let masks = high.add(p * PLANE_WORDS) as *const u64;
                    let add = _mm512_set1_epi8(16 << p);
                    low = _mm512_mask_add_epi8(low, masks.add(k).read_unaligned(), low, add);
                    up = _mm512_mask_add_epi8(up, masks.add(k + 4).read_unaligned(), up, add);
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
        let scales = halves16(w.scales.as_ptr().add(group_block * GROUP_ROWS));
        for (g, sum) in sums.iter_mut().enumerate() {
            let [a, b_, c, d] = dots[g];
            let dot = _mm512_add_epi32(_mm512_add_epi32(a, b_), _mm512_add_epi32(c, d));
            let at = (tile.r0 + g) * blocks + b;
            let scale = _mm512_mul_ps(scales, _mm512_set1_ps(*x.scales.get_unchecked(at)));
            *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *sum);
            if offsets {
                let offs = halves16(w.offsets.as_ptr().add(group_block * GROUP_ROWS));
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
    let gbb = group_block_bytes(kind);
    let planes = kind.high_planes();
    let offsets = kind.has_offset();
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // The 16 rows' sums of each input row: rows 0..8, then 8..16.
    let mut sums = [[_mm256_setzero_ps(); G]; 2];
    for b in 0..blocks {
        let group_block = tile.group * blocks + b;
        let lines = w.q.as_ptr().add(group_block * gbb);
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
                let high = w.high.as_ptr().add(group_block * planes * PLANE_WORDS);
                for k in 0..4 {
                    let line =
                        _mm256_loadu_si256(lines.add(k * LINE + 32 * half) as *const __m256i);
                    let mut low = _mm256_and_si256(line, nibble);
                    let mut up = _mm256_and_si256(_mm256_srli_epi16(line, 4), nibble);
                    for p in 0..planes {
                        // This half's 32 bits of masks k and k + 4.
                        let words = high.add(p * PLANE_WORDS + half);
                        low = super::avx2_plane_bytes(low, *words.add(2 * k), p);
                        up = super::avx2_plane_bytes(up, *words.add(2 * (k + 4)), p);
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
            let at_rows = group_block * GROUP_ROWS + 8 * half;
            let scales = halves8(w.scales.as_ptr().add(at_rows));
            for (g, d) in dots.iter().enumerate() {
                let at = (tile.r0 + g) * blocks + b;
                let scale = _mm256_mul_ps(scales, _mm256_set1_ps(*x.scales.get_unchecked(at)));
                let sum = &mut half_sums[g];
                *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*d), scale, *sum);
                if offsets {
                    let offs = halves8(w.offsets.as_ptr().add(at_rows));
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

    /// Row groups keep every row's values, with a partial last group.
    #[test]
    fn row_groups_keep_each_rows_blocks() {
        for (kind, c_in, w) in test_matrices(19) {
            if kind.super_blocks() {
                continue;
            }
            let blocks = c_in / QUANT_BLOCK;
            assert_eq!(w.q.len(), 2 * blocks * group_block_bytes(kind), "{kind:?}");
            let again = w.with_row_order(&(0..19).collect::<Vec<_>>());
            for j in 0..19 {
                for b in 0..blocks {
                    assert_eq!(stored_block(&w, j, b), stored_block(&again, j, b));
                }
            }
        }
    }
}
