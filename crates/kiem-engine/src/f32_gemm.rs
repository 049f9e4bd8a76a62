//! kiem's own fp32 matrix product: BLIS-style packing around a register tile, with microkernels
//! for AVX-512 (12 × 32), AVX2 + FMA (6 × 16) and a portable one (4 × 16), picked at run time
//! from [`crate::kernels::simd`]'s level (`KIEM_SIMD` caps it).
//!
//! The `gemm` crate enables its AVX-512 kernels only on nightly Rust and OpenBLAS is a system
//! package a quick start does not have; training's products are large and few, so one kernel
//! per instruction set, tuned for them, is what makes the default build fast everywhere.
//!
//! Every output element is summed in the same order (k ascending, blocks of [`KC`], fused
//! multiply-adds) whatever the kernel, the thread count or the split, so results are the same
//! bits at every SIMD level and thread count.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::kernels::{level, wide, with_thread_buffer, Level, SyncPtr};

/// Values of k per packed block: a register tile's rows of A (MR × KC, 12 KiB at AVX-512) stay
/// in L1 while it runs along the block's panels of B.
const KC: usize = 256;
/// Columns of B per packed block (KC × NC × 4 bytes = 512 KiB, in L2), streamed from there by
/// each tile of rows: as BLIS arranges its AVX-512 kernels, the operand read by broadcasts
/// stays in L1 and the one read by vector loads streams from L2.
const NC: usize = 512;
/// Register tiles of rows per block of A that one task packs and keeps in L2.
const MC_TILES: usize = 12;

/// Where a tile's rows of A are: element (r, p) at `ptr + r · row_stride + p · k_stride` (a
/// packed `[kc][MR]` panel: 1 and MR; a row-major A read in place: its row stride and 1).
#[derive(Clone, Copy)]
struct APanel {
    ptr: *const f32,
    row_stride: usize,
    k_stride: usize,
}

/// One register-tile kernel: `c[0..mr, 0..nr] = (overwrite ? 0 : c) + alpha · a · b` where `a`
/// holds `mr` rows (rows up to MR are read again from the last one, never stored) and `b` is a
/// packed `[kc][NR]` panel.
type TileFn = unsafe fn(
    kc: usize,
    a: APanel,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
    alpha: f32,
);

/// The microkernel of one instruction set.
#[derive(Clone, Copy)]
pub struct Kernel {
    pub name: &'static str,
    /// The instruction set of its tile (its packing of transposed operands uses it too).
    level: Level,
    mr: usize,
    nr: usize,
    tile: TileFn,
}

/// The kernel this process uses (the best the CPU and `KIEM_SIMD` allow).
pub fn kernel() -> Kernel {
    kernel_for(level())
}

fn kernel_for(level: Level) -> Kernel {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => Kernel {
            name: "kiem sgemm, AVX-512 12x32",
            level: Level::Avx512,
            mr: 12,
            nr: 32,
            tile: tile_avx512,
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => Kernel {
            name: "kiem sgemm, AVX2+FMA 6x16",
            level: Level::Avx2,
            mr: 6,
            nr: 16,
            tile: tile_avx2,
        },
        _ => Kernel {
            name: "kiem sgemm, portable 4x16",
            level: Level::Base,
            mr: PORTABLE_MR,
            nr: PORTABLE_NR,
            tile: tile_portable,
        },
    }
}

/// Every kernel this CPU can run, best first (tests compare them).
pub fn kernels_available() -> Vec<Kernel> {
    [Level::Avx512, Level::Avx2, Level::Base]
        .into_iter()
        .filter(|&l| l == Level::Base || level_supported(l))
        .map(kernel_for)
        .collect()
}

fn level_supported(l: Level) -> bool {
    matches!(
        (level(), l),
        (_, Level::Base) | (Level::Avx512, _) | (Level::Avx2, Level::Avx2)
    )
}

/// One cache line of packed values: panels start on line boundaries, so no vector load of B
/// straddles two lines.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `n` values rounded up to whole cache lines.
fn lines(n: usize) -> usize {
    n.div_ceil(16) * 16
}

thread_local! {
    /// Packed blocks of A (per task) and B (per call), reused across calls.
    static PACKED_A: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    static PACKED_B: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Runs `body` on this thread's buffer of `len` values (starting on a cache line; see
/// [`with_thread_buffer`]).
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<Line>>>,
    len: usize,
    body: impl FnOnce(&mut [f32]) -> R,
) -> R {
    with_thread_buffer(key, len.div_ceil(16), |buffer| {
        // SAFETY: a Line is 16 plain f32 with no padding.
        body(unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr() as *mut f32, len) })
    })
}

/// `dst[m, n] = (accumulate ? dst : 0) + alpha · lhs[m, k] · rhs[k, n]`: `dst` row-major with
/// row stride `ldc`, each operand given by (row stride, column stride). With `parallel`, the
/// work is split over the rayon pool; without, it runs on this thread (inside parallel tasks).
///
/// # Safety
/// Every element addressed through the strides lies inside the pointed-to buffers, `dst` does
/// not overlap the operands, and nothing else writes its addressed part during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    kernel: Kernel,
    parallel: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ldc: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: *const f32,
    rhs_strides: (usize, usize),
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * ldc), 0, n);
            }
        }
        return;
    }
    let (mr, nr) = (kernel.mr, kernel.nr);
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let (lhs, rhs, dst) = (lhs as usize, rhs as usize, SyncPtr(dst));
    // Blocks of rows, as equal as whole register tiles allow and a multiple of the threads
    // in number, so that no thread waits on a short last block.
    let tiles = m.div_ceil(mr);
    let row_blocks = tiles
        .div_ceil(MC_TILES)
        .next_multiple_of(threads)
        .min(tiles);
    let block_rows = |b: usize| ((b * tiles / row_blocks) * mr).min(m);
    for jc in (0..n).step_by(NC) {
        let nc = (n - jc).min(NC);
        let panels = nc.div_ceil(nr);
        for pc in (0..k).step_by(KC) {
            let kc = (k - pc).min(KC);
            let overwrite = pc == 0 && !accumulate;
            let (a_stride, b_stride) = (lines(kc * mr), lines(kc * nr));
            with_buffer(&PACKED_B, panels * b_stride, |b_pack| {
                if rhs_strides.1 == 1 {
                    // A row-major B is packed a band of k rows per thread, each row read as one
                    // contiguous run (see `pack_b_rows`).
                    // (Serially where there is one panel: small products.)
                    let parts = if threads > 1 && panels > 1 {
                        threads.min(kc)
                    } else {
                        1
                    };
                    let panels_ptr = SyncPtr(b_pack.as_mut_ptr());
                    let part = |t: usize| {
                        // SAFETY: the caller guarantees rhs's extent; each part writes only its
                        // own k rows of the block's panels, which b_pack holds.
                        unsafe {
                            pack_b_rows(
                                panels_ptr.get(),
                                b_stride,
                                rhs as *const f32,
                                rhs_strides.0,
                                pc,
                                t * kc / parts..(t + 1) * kc / parts,
                                jc,
                                nc,
                                nr,
                            )
                        }
                    };
                    if parts > 1 {
                        (0..parts).into_par_iter().for_each(part);
                    } else {
                        part(0);
                    }
                } else {
                    let pack = |(p, panel): (usize, &mut [f32])| {
                        let j0 = jc + p * nr;
                        // SAFETY: the caller guarantees rhs's extent; the panel is this task's.
                        unsafe {
                            pack_b(
                                kernel.level,
                                panel,
                                rhs as *const f32,
                                rhs_strides,
                                pc,
                                kc,
                                j0,
                                (jc + nc - j0).min(nr),
                                nr,
                            )
                        }
                    };
                    if threads > 1 && panels > 1 {
                        b_pack.par_chunks_mut(b_stride).enumerate().for_each(pack);
                    } else {
                        b_pack.chunks_mut(b_stride).enumerate().for_each(pack);
                    }
                }
                // Tasks: blocks of rows, and where those are fewer than the threads can use,
                // groups of column panels too.
                let groups = if threads > 1 {
                    (2 * threads).div_ceil(row_blocks).clamp(1, panels)
                } else {
                    1
                };
                let per_group = panels.div_ceil(groups);
                let b_pack = &*b_pack;
                let task = |t: usize| {
                    let (block, group) = (t / groups, t % groups);
                    let i0 = block_rows(block);
                    let rows = block_rows(block + 1) - i0;
                    let row_tiles = rows.div_ceil(mr);
                    let (p0, p1) = (group * per_group, ((group + 1) * per_group).min(panels));
                    if p0 >= p1 {
                        return;
                    }
                    // A row-major A is read in place (its rows are already contiguous in k)
                    // unless its rows are 4 KiB apart; otherwise it is packed (`pack_a`).
                    let in_place = read_in_place(lhs_strides);
                    let packed_len = if in_place { 0 } else { row_tiles * a_stride };
                    with_buffer(&PACKED_A, packed_len, |a_pack| {
                        if !in_place {
                            // SAFETY: the caller guarantees lhs's extent.
                            unsafe {
                                pack_a(
                                    a_pack,
                                    a_stride,
                                    lhs as *const f32,
                                    lhs_strides,
                                    i0,
                                    rows,
                                    pc,
                                    kc,
                                    mr,
                                )
                            };
                        }
                        let tile_rows = |ti: usize| {
                            if in_place {
                                APanel {
                                    ptr: (lhs as *const f32)
                                        .wrapping_add((i0 + ti * mr) * lhs_strides.0 + pc),
                                    row_stride: lhs_strides.0,
                                    k_stride: 1,
                                }
                            } else {
                                APanel {
                                    ptr: a_pack[ti * a_stride..].as_ptr(),
                                    row_stride: 1,
                                    k_stride: mr,
                                }
                            }
                        };
                        for ti in 0..row_tiles {
                            let r0 = i0 + ti * mr;
                            for p in p0..p1 {
                                let j0 = jc + p * nr;
                                let cols = (jc + nc - j0).min(nr);
                                let b = b_pack[p * b_stride..].as_ptr();
                                // SAFETY: the kernel matches the CPU (chosen by `level`); A's
                                // tile holds its rows' kc values (packed, or in place within
                                // lhs's extent), B's panel kc × NR; the tile's rows and columns
                                // lie inside dst, which this task alone writes there.
                                unsafe {
                                    (kernel.tile)(
                                        kc,
                                        tile_rows(ti),
                                        b,
                                        dst.get().add(r0 * ldc + j0),
                                        ldc,
                                        (i0 + rows - r0).min(mr),
                                        cols,
                                        overwrite,
                                        alpha,
                                    )
                                };
                            }
                        }
                    });
                };
                let tasks = row_blocks * groups;
                if threads > 1 && tasks > 1 {
                    (0..tasks).into_par_iter().for_each(task);
                } else {
                    (0..tasks).for_each(task);
                }
            });
        }
    }
}

/// A `k × n` operand B packed once for many products that each read a range of its k and a
/// range of its columns (attention reads every head's keys and values block after block).
pub struct PackedB {
    kernel: Kernel,
    k: usize,
    n: usize,
    data: Vec<Line>,
}

impl PackedB {
    /// An empty packing for `kernel`; [`PackedOperand::pack`] fills it (reusing its memory).
    pub fn new(kernel: Kernel) -> Self {
        PackedB {
            kernel,
            k: 0,
            n: 0,
            data: Vec::new(),
        }
    }

    /// Values of one panel in k block `block` (of [`KC`] rows).
    fn panel_len(&self, block: usize) -> usize {
        lines((self.k - block * KC).min(KC) * self.kernel.nr)
    }

    /// Where k block `block` starts.
    fn block_start(&self, block: usize) -> usize {
        block * self.n.div_ceil(self.kernel.nr) * lines(KC * self.kernel.nr)
    }
}

/// An operand B packed once for many products that each read a range of its k and a range of
/// its columns, on one thread (attention packs each head's keys, values, queries and output
/// gradient once for all its blocks of query rows): fp32 panels ([`PackedB`]) or bf16 ones
/// ([`crate::bf16_gemm::PackedB`]).
pub trait PackedOperand {
    /// Columns per panel: a column range must start at a multiple of this.
    fn panel_width(&self) -> usize;

    /// Packs `b[k, n]` (row stride, column stride) on this thread, reusing the memory.
    ///
    /// # Safety
    /// Every element addressed through the strides is readable and nothing writes it during
    /// the call.
    unsafe fn pack(&mut self, k: usize, n: usize, b: *const f32, strides: (usize, usize));

    /// `dst[m, cols] (+)= alpha · lhs[m, ks] · self[ks, cols]` on this thread, for a range `ks`
    /// of the packed k and a range `cols` of its columns starting at a panel boundary: `dst`
    /// points at the output's column `cols.start` (row stride `ldc`), and `lhs` at its column
    /// for `ks.start` (its k index runs from 0 over `ks`).
    ///
    /// # Safety
    /// Every element of `lhs` addressed through its strides lies inside one readable buffer
    /// that nothing writes during the call; `dst`'s rows and columns are valid for reads and
    /// writes, overlap nothing else here and no other thread touches them meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(
        &self,
        m: usize,
        dst: *mut f32,
        ldc: usize,
        accumulate: bool,
        lhs: *const f32,
        lhs_strides: (usize, usize),
        ks: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        alpha: f32,
    );
}

impl PackedOperand for PackedB {
    fn panel_width(&self) -> usize {
        self.kernel.nr
    }

    unsafe fn pack(&mut self, k: usize, n: usize, b: *const f32, strides: (usize, usize)) {
        let nr = self.kernel.nr;
        let panels = n.div_ceil(nr);
        self.k = k;
        self.n = n;
        let blocks = k.div_ceil(KC);
        let len = blocks.saturating_sub(1) * panels * lines(KC * nr)
            + if blocks > 0 {
                panels * self.panel_len(blocks - 1)
            } else {
                0
            };
        if self.data.len() * 16 < len {
            self.data.resize(len.div_ceil(16), Line([0.0; 16]));
        }
        let data = std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut f32, len);
        for block in 0..blocks {
            let (p0, kc) = (block * KC, (k - block * KC).min(KC));
            let stride = self.panel_len(block);
            let start = self.block_start(block);
            if strides.1 == 1 {
                let panels = data[start..start + panels * stride].as_mut_ptr();
                pack_b_rows(panels, stride, b, strides.0, p0, 0..kc, 0, n, nr);
                continue;
            }
            for p in 0..panels {
                let j0 = p * nr;
                let panel = &mut data[start + p * stride..start + (p + 1) * stride];
                let cols = (n - j0).min(nr);
                pack_b(self.kernel.level, panel, b, strides, p0, kc, j0, cols, nr);
            }
        }
    }

    unsafe fn product(
        &self,
        m: usize,
        dst: *mut f32,
        ldc: usize,
        accumulate: bool,
        lhs: *const f32,
        lhs_strides: (usize, usize),
        ks: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        alpha: f32,
    ) {
        let kernel = self.kernel;
        let (mr, nr) = (kernel.mr, kernel.nr);
        if nothing_to_multiply(m, dst, ldc, accumulate, (&ks, &cols), (self.k, self.n, nr)) {
            return;
        }
        let data = self.data.as_ptr() as *const f32;
        let row_tiles = m.div_ceil(mr);
        let mut k = ks.start;
        while k < ks.end {
            // The part of ks inside k block `block`.
            let block = k / KC;
            let end = ks.end.min((block + 1) * KC);
            let kc = end - k;
            let overwrite = k == ks.start && !accumulate;
            let stride = self.panel_len(block);
            let start = self.block_start(block) + (k - block * KC) * nr;
            let in_place = read_in_place(lhs_strides);
            let a_stride = lines(kc * mr);
            let packed_len = if in_place { 0 } else { row_tiles * a_stride };
            with_buffer(&PACKED_A, packed_len, |a_pack| {
                if !in_place {
                    pack_a(
                        a_pack,
                        a_stride,
                        lhs,
                        lhs_strides,
                        0,
                        m,
                        k - ks.start,
                        kc,
                        mr,
                    );
                }
                for j0 in cols.clone().step_by(nr) {
                    let panel = data.add(start + (j0 / nr) * stride);
                    for ti in 0..row_tiles {
                        let r0 = ti * mr;
                        let a = if in_place {
                            APanel {
                                ptr: lhs.add(r0 * lhs_strides.0 + (k - ks.start)),
                                row_stride: lhs_strides.0,
                                k_stride: 1,
                            }
                        } else {
                            APanel {
                                ptr: a_pack[ti * a_stride..].as_ptr(),
                                row_stride: 1,
                                k_stride: mr,
                            }
                        };
                        (kernel.tile)(
                            kc,
                            a,
                            panel,
                            dst.add(r0 * ldc + (j0 - cols.start)),
                            ldc,
                            (m - r0).min(mr),
                            (cols.end - j0).min(nr),
                            overwrite,
                            alpha,
                        );
                    }
                }
            });
            k = end;
        }
    }
}

/// What every product over ranges of a packed `k × n` B (panels of `nr` columns) checks
/// first: panics when `ks` or `cols` leave it or `cols` starts inside a panel; returns true when
/// nothing is left to multiply (no rows, no columns, or no k: `dst` then zeroed unless
/// `accumulate`).
///
/// # Safety
/// `dst` holds `m` rows of `cols.len()` values, `ldc` apart, valid for writes.
pub(crate) unsafe fn nothing_to_multiply(
    m: usize,
    dst: *mut f32,
    ldc: usize,
    accumulate: bool,
    (ks, cols): (&std::ops::Range<usize>, &std::ops::Range<usize>),
    (k, n, nr): (usize, usize, usize),
) -> bool {
    assert!(
        ks.end <= k && cols.end <= n && cols.start.is_multiple_of(nr),
        "product over a packed B: k {ks:?} or columns {cols:?} outside the packed {k} x {n} (or \
         not at a panel of {nr})"
    );
    if m == 0 || cols.is_empty() {
        return true;
    }
    if ks.is_empty() && !accumulate {
        for i in 0..m {
            std::ptr::write_bytes(dst.add(i * ldc), 0, cols.len());
        }
    }
    ks.is_empty()
}

/// Whether a tile reads A's rows in place: they must be contiguous in k and not a multiple of
/// 4 KiB apart. Such rows (a width of 1024 or 2048 floats, common in Llama models) all start in
/// the same L1 sets, where a tile's rows and the streamed B evict each other: packed, those
/// products ran 12-17% faster (Zen 4, width 1024; rows spread over two set ranges were fine).
fn read_in_place((row_stride, k_stride): (usize, usize)) -> bool {
    k_stride == 1 && (row_stride * 4) % 4096 != 0
}

/// [`pack_a_in`] compiled for the CPU's vector width (its copies then inline).
///
/// # Safety
/// As [`pack_a_in`].
#[allow(clippy::too_many_arguments)]
unsafe fn pack_a(
    dst: &mut [f32],
    tile_stride: usize,
    a: *const f32,
    strides: (usize, usize),
    i0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    mr: usize,
) {
    let a = a as usize;
    wide(
        #[inline(always)]
        // SAFETY: as the caller guarantees.
        || unsafe {
            pack_a_in(
                dst,
                tile_stride,
                a as *const f32,
                strides,
                i0,
                rows,
                p0,
                kc,
                mr,
            )
        },
    )
}

/// Packs rows `i0..i0 + rows` and k `p0..p0 + kc` of A as tiles of `mr` rows, each `[k][mr]`
/// (zero beyond `rows`), `tile_stride` values apart.
///
/// # Safety
/// Every addressed element of `a` is readable.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pack_a_in(
    dst: &mut [f32],
    tile_stride: usize,
    a: *const f32,
    (rs, cs): (usize, usize),
    i0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    mr: usize,
) {
    if rows == 0 {
        return;
    }
    let tiles = rows.div_ceil(mr);
    let tile_rows = |t: usize| (rows - t * mr).min(mr);
    if tile_rows(tiles - 1) < mr {
        dst[(tiles - 1) * tile_stride..][..kc * mr].fill(0.0);
    }
    if rs == 1 {
        // A's columns are contiguous (a transposed operand): a k at a time across all the
        // tiles, so each read is one run of `rows` values; tile by tile, the reads went down a
        // narrow strip of A and missed the cache at every k.
        #[inline(always)]
        unsafe fn columns<const W: usize>(
            dst: &mut [f32],
            tile_stride: usize,
            src: *const f32,
            cs: usize,
            rows: usize,
            kc: usize,
            mr: usize,
        ) {
            let tiles = rows.div_ceil(mr);
            for p in 0..kc {
                for t in 0..tiles {
                    let out = dst[t * tile_stride + p * mr..].as_mut_ptr();
                    copy_values::<W>(out, src.add(p * cs + t * mr), (rows - t * mr).min(mr));
                }
            }
        }
        let src = a.add(i0 + p0 * cs);
        let dst = &mut dst[..(tiles - 1) * tile_stride + kc * mr];
        with_width!(mr, columns(dst, tile_stride, src, cs, rows, kc, mr));
    } else {
        // Rows contiguous in k (packed only when 4 KiB apart: `read_in_place`) or neither
        // stride 1: value by value.
        for t in 0..tiles {
            let tile = &mut dst[t * tile_stride..][..kc * mr];
            for r in 0..tile_rows(t) {
                let row = a.add((i0 + t * mr + r) * rs + p0 * cs);
                for p in 0..kc {
                    tile[p * mr + r] = *row.add(p * cs);
                }
            }
        }
    }
}

/// Copies `len` values from `src` to `dst`: `W` of them as one fixed-size move (inlined as
/// vector moves), another count through `copy_nonoverlapping`. Callers fix `W` to their tile
/// width once per call, outside their loops (`with_width!`): a match on the count inside the
/// loop let LLVM fold the fixed-size moves back into one `memcpy` call per 48 or 128 bytes, and
/// such calls cost as much as a tenth of a training step.
///
/// # Safety
/// `src` is readable and `dst` writable for `len` values.
#[inline(always)]
unsafe fn copy_values<const W: usize>(dst: *mut f32, src: *const f32, len: usize) {
    if W > 0 && len == W {
        dst.cast::<[f32; W]>()
            .write_unaligned(src.cast::<[f32; W]>().read_unaligned());
    } else {
        std::ptr::copy_nonoverlapping(src, dst, len);
    }
}

/// `$f::<W>($args)` with `W` the tile width `$width` when it is one of the kernels' (4, 6, 12,
/// 16 or 32), else 0 (see [`copy_values`]).
macro_rules! with_width {
    ($width:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $width {
            4 => $f::<4>($($arg),*),
            6 => $f::<6>($($arg),*),
            12 => $f::<12>($($arg),*),
            16 => $f::<16>($($arg),*),
            32 => $f::<32>($($arg),*),
            _ => $f::<0>($($arg),*),
        }
    };
}
use with_width;

/// [`pack_b_in`] compiled for the CPU's vector width (its copies then inline).
///
/// # Safety
/// As [`pack_b_in`]: the CPU has `level`'s instructions.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b(
    level: Level,
    dst: &mut [f32],
    b: *const f32,
    strides: (usize, usize),
    p0: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    nr: usize,
) {
    let b = b as usize;
    wide(
        #[inline(always)]
        // SAFETY: as the caller guarantees.
        || unsafe { pack_b_in(level, dst, b as *const f32, strides, p0, kc, j0, cols, nr) },
    )
}

/// Packs k rows `ks` (of a block starting at k `p0`) of a row-major B's columns `jc..jc + nc`
/// into the block's panels (`[k][nr]` each, zero beyond `nc`, `panel_stride` values apart), a
/// k row at a time: each row is read as one contiguous run. Packed panel by panel, the reads
/// went down a strip of `nr` columns and missed the cache at every row (a sixth of a
/// weight-gradient product's time, whose B is the output gradient).
///
/// # Safety
/// Every addressed element of `b` is readable; `dst` is writable for
/// `(nc.div_ceil(nr) - 1) · panel_stride + ks.end · nr` values (panels `panel_stride >= kc · nr`
/// apart) and nothing else writes their rows `ks` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b_rows(
    dst: *mut f32,
    panel_stride: usize,
    b: *const f32,
    rs: usize,
    p0: usize,
    ks: std::ops::Range<usize>,
    jc: usize,
    nc: usize,
    nr: usize,
) {
    #[inline(always)]
    unsafe fn rows<const W: usize>(
        dst: *mut f32,
        panel_stride: usize,
        src: *const f32,
        rs: usize,
        ks: std::ops::Range<usize>,
        nc: usize,
        nr: usize,
    ) {
        for p in ks {
            for q in 0..nc.div_ceil(nr) {
                let cols = (nc - q * nr).min(nr);
                let out = dst.add(q * panel_stride + p * nr);
                copy_values::<W>(out, src.add(p * rs + q * nr), cols);
                if cols < nr {
                    std::ptr::write_bytes(out.add(cols), 0, nr - cols);
                }
            }
        }
    }
    let (dst, src) = (dst as usize, b.add(p0 * rs + jc) as usize);
    wide(
        #[inline(always)]
        // SAFETY: as the caller guarantees.
        || unsafe {
            let (dst, src) = (dst as *mut f32, src as *const f32);
            with_width!(nr, rows(dst, panel_stride, src, rs, ks, nc, nr))
        },
    )
}

/// Packs k `p0..p0 + kc` and columns `j0..j0 + cols` of B as `[k][nr]` (zero beyond `cols`),
/// a transposed B with `level`'s register transposes.
///
/// # Safety
/// Every addressed element of `b` is readable; the CPU has `level`'s instructions (a kernel's
/// level: `kernel_for` makes only those the CPU runs).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pack_b_in(
    level: Level,
    dst: &mut [f32],
    b: *const f32,
    (rs, cs): (usize, usize),
    p0: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    nr: usize,
) {
    let dst = &mut dst[..kc * nr];
    if cols < nr {
        dst.fill(0.0);
    }
    // A row-major B goes through `pack_b_rows`.
    if rs == 1 {
        // Columns of B are contiguous (a transposed operand): squares of 16 (AVX-512) or 8
        // (AVX2, portable) columns by as many k go through a transpose, in registers where the
        // level has them, so that each k writes a contiguous run (one column at a time wrote a
        // value per line); the columns left over, one at a time.
        let src = b.add(p0 + j0 * cs);
        // SAFETY: the CPU has `level`'s instructions (the caller's guarantee); the columns and
        // k lie inside b, and dst holds kc rows of nr.
        let j = match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => pack_columns_avx512(dst, src, cs, kc, cols, nr),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => pack_columns_avx2(dst, src, cs, kc, cols, nr),
            _ => pack_columns::<8>(dst, src, cs, kc, cols, nr, |columns, out| {
                for (i, column) in columns.iter().enumerate() {
                    for q in 0..8 {
                        *out.add(q * nr + i) = *column.add(q);
                    }
                }
            }),
        };
        for j in j..cols {
            let col = std::slice::from_raw_parts(b.add(p0 + (j0 + j) * cs), kc);
            for (p, &x) in col.iter().enumerate() {
                dst[p * nr + j] = x;
            }
        }
    } else {
        for p in 0..kc {
            for j in 0..cols {
                dst[p * nr + j] = *b.add((p0 + p) * rs + (j0 + j) * cs);
            }
        }
    }
}

/// Packs the first columns of a B whose columns are contiguous (`cs` apart, each from `b`) as
/// `[k][nr]` rows, squares of `W` columns by `W` k through `square` (which reads `W` values
/// from each of the `W` column pointers and writes them transposed, as `W` rows `nr` apart
/// from its output pointer), the k left over value by value: returns the columns packed, a
/// multiple of `W`.
///
/// # Safety
/// Every column `< cols` is readable for `kc` values; `dst` holds `kc` rows of `nr` values;
/// `square` does as said above.
#[inline(always)]
unsafe fn pack_columns<const W: usize>(
    dst: &mut [f32],
    b: *const f32,
    cs: usize,
    kc: usize,
    cols: usize,
    nr: usize,
    square: impl Fn([*const f32; W], *mut f32),
) -> usize {
    assert!(dst.len() >= kc * nr && cols <= nr);
    let out = dst.as_mut_ptr();
    let mut j = 0;
    while j + W <= cols {
        let columns: [*const f32; W] = std::array::from_fn(|i| b.add((j + i) * cs));
        let mut p = 0;
        while p + W <= kc {
            square(columns.map(|c| c.add(p)), out.add(p * nr + j));
            p += W;
        }
        for p in p..kc {
            for (i, column) in columns.iter().enumerate() {
                *out.add(p * nr + j + i) = *column.add(p);
            }
        }
        j += W;
    }
    j
}

/// [`pack_columns`] with 16 × 16 squares through [`transpose16`].
///
/// # Safety
/// The CPU has AVX-512 F; as [`pack_columns`] otherwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_columns_avx512(
    dst: &mut [f32],
    b: *const f32,
    cs: usize,
    kc: usize,
    cols: usize,
    nr: usize,
) -> usize {
    use std::arch::x86_64::*;
    pack_columns::<16>(dst, b, cs, kc, cols, nr, |columns, out| {
        let rows = transpose16(columns.map(|c| _mm512_loadu_ps(c)));
        for (q, row) in rows.into_iter().enumerate() {
            _mm512_storeu_ps(out.add(q * nr), row);
        }
    })
}

/// A 16 × 16 transpose: lane `c` of result `r` is lane `r` of row `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn transpose16(
    rows: [std::arch::x86_64::__m512; 16],
) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved by element, then by element pair: u[4g + c], 128-bit lane L,
    // holds column 4L + c of rows 4g..4g + 4.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let a = _mm512_castps_pd(t[4 * g + c / 2]);
        let b = _mm512_castps_pd(t[4 * g + c / 2 + 2]);
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // Then gather lane L of u[c], u[4 + c], u[8 + c], u[12 + c] into result 4L + c: even
    // lanes and odd lanes of each pair first, then of the two pairs.
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let even_low = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let odd_low = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
        let even_high = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let odd_high = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(even_low, even_high);
        out[4 + c] = _mm512_shuffle_f32x4::<0x88>(odd_low, odd_high);
        out[8 + c] = _mm512_shuffle_f32x4::<0xdd>(even_low, even_high);
        out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(odd_low, odd_high);
    }
    out
}

/// [`pack_columns`] with 8 × 8 squares through [`transpose8`].
///
/// # Safety
/// The CPU has AVX; as [`pack_columns`] otherwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn pack_columns_avx2(
    dst: &mut [f32],
    b: *const f32,
    cs: usize,
    kc: usize,
    cols: usize,
    nr: usize,
) -> usize {
    use std::arch::x86_64::*;
    pack_columns::<8>(dst, b, cs, kc, cols, nr, |columns, out| {
        let rows = transpose8(columns.map(|c| _mm256_loadu_ps(c)));
        for (q, row) in rows.into_iter().enumerate() {
            _mm256_storeu_ps(out.add(q * nr), row);
        }
    })
}

/// An 8 × 8 transpose: lane `c` of result `r` is lane `r` of row `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8(rows: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // As in `transpose16`: u[4g + c], 128-bit lane L, holds column 4L + c of rows 4g..4g + 4.
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    let u: [__m256; 8] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + c / 2], t[4 * g + c / 2 + 2]);
        if c % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(a, b)
        } else {
            _mm256_shuffle_ps::<0xee>(a, b)
        }
    });
    std::array::from_fn(|r| {
        let (lane, c) = (r / 4, r % 4);
        if lane == 0 {
            _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c])
        } else {
            _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c])
        }
    })
}

/// Writes a finished tile: `c = (overwrite ? 0 : c) + alpha · acc` for rows `0..mr`, columns
/// `0..nr` (a partial tile of a full `MR × NR` accumulator laid out row by row).
///
/// # Safety
/// Rows `0..mr` (stride `ldc`), columns `0..nr` of `c` are valid for reads and writes.
#[inline(always)]
unsafe fn store_partial<const NR: usize>(
    acc: &[[f32; NR]],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
    alpha: f32,
) {
    for (r, row) in acc.iter().enumerate().take(mr) {
        let out = c.add(r * ldc);
        for (j, &x) in row.iter().enumerate().take(nr) {
            // As the vector stores do: no `0 + x` on overwrite (it would turn -0 into +0).
            *out.add(j) = if overwrite {
                alpha * x
            } else {
                *out.add(j) + alpha * x
            };
        }
    }
}

/// Generates an intrinsics microkernel: `$mr` rows × `$v` vectors of `$lanes` floats.
macro_rules! simd_tile {
    ($name:ident, $feature:literal, $mr:literal, $v:literal, $lanes:literal, $zero:ident,
     $loadu:ident, $storeu:ident, $set1:ident, $fmadd:ident, $mul:ident, $add:ident) => {
        /// # Safety
        /// The CPU has the features named; see [`TileFn`] for the operands.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            kc: usize,
            a: APanel,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            mr: usize,
            nr: usize,
            overwrite: bool,
            alpha: f32,
        ) {
            use std::arch::x86_64::*;
            const MR: usize = $mr;
            const V: usize = $v;
            const NR: usize = $v * $lanes;
            // The tile of C is read (or written) once the sums are done: start fetching it.
            for r in 0..mr {
                let row = c.add(r * ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4 * NR - 1));
            }
            let mut rows = [a.ptr; MR];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = a.ptr.add(r.min(mr - 1) * a.row_stride);
            }
            let mut acc = [[$zero(); V]; MR];
            for p in 0..kc {
                let bp = b.add(p * NR);
                let mut bv = [$zero(); V];
                for v in 0..V {
                    bv[v] = $loadu(bp.add(v * $lanes));
                }
                let at = p * a.k_stride;
                for r in 0..MR {
                    let ar = $set1(*rows[r].add(at));
                    for v in 0..V {
                        acc[r][v] = $fmadd(ar, bv[v], acc[r][v]);
                    }
                }
            }
            let scale = $set1(alpha);
            if mr == MR && nr == NR {
                for r in 0..MR {
                    let row = c.add(r * ldc);
                    for v in 0..V {
                        let p = row.add(v * $lanes);
                        let x = $mul(acc[r][v], scale);
                        let sum = if overwrite { x } else { $add($loadu(p), x) };
                        $storeu(p, sum);
                    }
                }
            } else {
                let mut spill = [[0f32; NR]; MR];
                for r in 0..MR {
                    for v in 0..V {
                        $storeu(spill[r].as_mut_ptr().add(v * $lanes), acc[r][v]);
                    }
                }
                store_partial(&spill, c, ldc, mr, nr, overwrite, alpha);
            }
        }
    };
}

simd_tile!(
    tile_avx2,
    "avx2,fma",
    6,
    2,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_mul_ps,
    _mm256_add_ps
);

simd_tile!(
    tile_avx512,
    "avx512f,avx2,fma",
    12,
    2,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_mul_ps,
    _mm512_add_ps
);

const PORTABLE_MR: usize = 4;
const PORTABLE_NR: usize = 16;

/// The portable kernel. Its multiply-adds are fused, as the vector kernels' are, so every level
/// gives the same bits (on a CPU without FMA that costs speed: `mul_add` is then computed in
/// software, as in the element-wise kernels).
///
/// # Safety
/// See [`TileFn`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_portable(
    kc: usize,
    a: APanel,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
    alpha: f32,
) {
    let mut acc = [[0f32; PORTABLE_NR]; PORTABLE_MR];
    for p in 0..kc {
        let bp = std::slice::from_raw_parts(b.add(p * PORTABLE_NR), PORTABLE_NR);
        for (r, row) in acc.iter_mut().enumerate() {
            let x = *a.ptr.add(r.min(mr - 1) * a.row_stride + p * a.k_stride);
            for (s, &y) in row.iter_mut().zip(bp) {
                *s = x.mul_add(y, *s);
            }
        }
    }
    store_partial(&acc, c, ldc, mr, nr, overwrite, alpha);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The product in f64, for comparison.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        prior: &[f32],
        ldc: usize,
        accumulate: bool,
        a: &[f32],
        (ars, acs): (usize, usize),
        b: &[f32],
        (brs, bcs): (usize, usize),
        alpha: f32,
    ) -> Vec<f32> {
        let mut out = prior.to_vec();
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k)
                    .map(|p| f64::from(a[i * ars + p * acs]) * f64::from(b[p * brs + j * bcs]))
                    .sum();
                let base = if accumulate { out[i * ldc + j] } else { 0.0 };
                out[i * ldc + j] = base + alpha * sum as f32;
            }
        }
        out
    }

    #[test]
    fn every_kernel_matches_the_product_for_every_layout_and_edge() {
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (13, 33, 17),
            (37, 50, 300),
            (100, 70, 513),
            (6, 16, 256),
            // Two column blocks, four k blocks, and a row-major A whose rows are 4 KiB apart
            // (packed, not read in place).
            (29, 600, 1024),
        ];
        for kernel in kernels_available() {
            for &(m, n, k) in &shapes {
                for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                    for (accumulate, alpha) in [(false, 1.0), (true, 0.5)] {
                        let a = values(m * k, 3);
                        let b = values(k * n, 5);
                        let a_strides = if a_t { (1, m) } else { (k, 1) };
                        let b_strides = if b_t { (1, k) } else { (n, 1) };
                        let ldc = n + 3;
                        let prior = values(m * ldc, 7);
                        let want = reference(
                            m, n, k, &prior, ldc, accumulate, &a, a_strides, &b, b_strides, alpha,
                        );
                        for parallel in [false, true] {
                            let mut got = prior.clone();
                            // SAFETY: the strides address only the vectors' elements.
                            unsafe {
                                gemm(
                                    kernel,
                                    parallel,
                                    m,
                                    n,
                                    k,
                                    got.as_mut_ptr(),
                                    ldc,
                                    accumulate,
                                    a.as_ptr(),
                                    a_strides,
                                    b.as_ptr(),
                                    b_strides,
                                    alpha,
                                )
                            };
                            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                                let column = i % ldc;
                                let expect = if column < n { *w } else { prior[i] };
                                assert!(
                                    (g - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
                                    "{}: {m}x{n}x{k} a_t {a_t} b_t {b_t} acc {accumulate} \
                                     parallel {parallel}: element {i} {g} vs {expect}",
                                    kernel.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_same_bits() {
        // Tiles of 6, 12 and 4 rows and 16 or 32 columns cut these shapes differently; k spans
        // two blocks; the values include exact zeros of both signs.
        let (m, n, k) = (29, 45, 300);
        let mut a = values(m * k, 17);
        let b = values(k * n, 19);
        a.iter_mut().step_by(7).for_each(|x| *x = -0.0);
        for (accumulate, alpha) in [(false, 1.0), (true, 0.75), (false, -1.0)] {
            let outputs: Vec<Vec<u32>> = kernels_available()
                .into_iter()
                .map(|kernel| {
                    let mut out = values(m * n, 23);
                    // SAFETY: the strides address only the vectors' elements.
                    unsafe {
                        gemm(
                            kernel,
                            true,
                            m,
                            n,
                            k,
                            out.as_mut_ptr(),
                            n,
                            accumulate,
                            a.as_ptr(),
                            (1, m),
                            b.as_ptr(),
                            (n, 1),
                            alpha,
                        )
                    };
                    out.iter().map(|x| x.to_bits()).collect()
                })
                .collect();
            assert!(outputs.windows(2).all(|w| w[0] == w[1]));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_register_transposes_are_transposes() {
        use std::arch::x86_64::*;
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        if level_supported(Level::Avx512) {
            // SAFETY: the CPU has AVX-512 F; each row load reads 16 of m's 256 values.
            let rows = unsafe {
                transpose16(std::array::from_fn(|r| {
                    _mm512_loadu_ps(m[16 * r..].as_ptr())
                }))
            };
            for (r, row) in rows.into_iter().enumerate() {
                let lanes: [f32; 16] = unsafe { std::mem::transmute(row) };
                assert!(
                    (0..16).all(|c| lanes[c] == m[16 * c + r]),
                    "row {r}: {lanes:?}"
                );
            }
        }
        if level_supported(Level::Avx2) {
            // SAFETY: the CPU has AVX; each row load reads 8 of m's first 64 values.
            let rows = unsafe {
                transpose8(std::array::from_fn(|r| {
                    _mm256_loadu_ps(m[8 * r..].as_ptr())
                }))
            };
            for (r, row) in rows.into_iter().enumerate() {
                let lanes: [f32; 8] = unsafe { std::mem::transmute(row) };
                assert!(
                    (0..8).all(|c| lanes[c] == m[8 * c + r]),
                    "row {r}: {lanes:?}"
                );
            }
        }
    }

    #[test]
    fn packed_b_ranges_match_the_plain_product() {
        // k spans two blocks; column ranges start at panel boundaries; both layouts of B.
        let (k, n, m) = (300, 70, 9);
        for kernel in kernels_available() {
            let nr = kernel.nr;
            for b_t in [false, true] {
                let b = values(k * n, 29);
                let strides = if b_t { (1, k) } else { (n, 1) };
                let mut packed = PackedB::new(kernel);
                // A first, smaller packing: the buffer is reused.
                unsafe { packed.pack(5, 3, b.as_ptr(), (3, 1)) };
                unsafe { packed.pack(k, n, b.as_ptr(), strides) };
                for (ks, cols) in [
                    (0..k, 0..n),
                    (17..290, nr..n - 1),
                    (250..260, 0..1),
                    (100..100, 0..n),
                ] {
                    let a = values(m * ks.len(), 31);
                    let ldc = cols.len() + 2;
                    // A row-major (read in place) or transposed (packed).
                    for (accumulate, a_t) in [(false, false), (true, false), (false, true)] {
                        let a_strides = if a_t { (1, m) } else { (ks.len(), 1) };
                        let prior = values(m * ldc, 37);
                        let mut got = prior.clone();
                        unsafe {
                            packed.product(
                                m,
                                got.as_mut_ptr(),
                                ldc,
                                accumulate,
                                a.as_ptr(),
                                a_strides,
                                ks.clone(),
                                cols.clone(),
                                0.5,
                            )
                        };
                        // The same product through `gemm` on the sub-matrix of B.
                        let sub: Vec<f32> = ks
                            .clone()
                            .flat_map(|p| cols.clone().map(move |j| (p, j)))
                            .map(|(p, j)| b[p * strides.0 + j * strides.1])
                            .collect();
                        let mut want = prior.clone();
                        unsafe {
                            gemm(
                                kernel,
                                false,
                                m,
                                cols.len(),
                                ks.len(),
                                want.as_mut_ptr(),
                                ldc,
                                accumulate,
                                a.as_ptr(),
                                a_strides,
                                sub.as_ptr(),
                                (cols.len(), 1),
                                0.5,
                            )
                        };
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{}: ks {ks:?} cols {cols:?} b_t {b_t} a_t {a_t} \
                                 acc {accumulate}: element {i} {g} vs {w}",
                                kernel.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, n, k) = (300, 200, 600);
        let a = values(m * k, 11);
        let b = values(k * n, 13);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; m * n];
            pool.install(|| unsafe {
                gemm(
                    kernel(),
                    true,
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    n,
                    false,
                    a.as_ptr(),
                    (k, 1),
                    b.as_ptr(),
                    (n, 1),
                    1.0,
                )
            });
            out
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }

    #[test]
    fn an_empty_inner_dimension_zeroes_or_keeps_dst() {
        let mut out = vec![5f32; 6];
        unsafe {
            gemm(
                kernel(),
                true,
                2,
                3,
                0,
                out.as_mut_ptr(),
                3,
                true,
                [].as_ptr(),
                (0, 1),
                [].as_ptr(),
                (3, 1),
                1.0,
            );
        }
        assert_eq!(out, vec![5.0; 6]);
        unsafe {
            gemm(
                kernel(),
                true,
                2,
                3,
                0,
                out.as_mut_ptr(),
                3,
                false,
                [].as_ptr(),
                (0, 1),
                [].as_ptr(),
                (3, 1),
                1.0,
            );
        }
        assert_eq!(out, vec![0.0; 6]);
    }
}
