//! bf16 products on AMX tiles (Intel Sapphire Rapids and newer): `tdpbf16ps` multiplies a
//! 16 × 32 bf16 tile of A by a 32 × 16 tile of B into a 16 × 16 fp32 tile, 16 times the work of
//! one `vdpbf16ps`. On those Xeons `vdpbf16ps` adds nothing over two fp32 FMA ports, so the
//! tiles are the only way bf16 runs faster than fp32 there.
//!
//! The register block is 2 × 2 tiles (32 rows × 32 columns of C in tiles 0-3, A in 4-5, B in
//! 6-7), over the same k blocks and packed B panels as the AVX512-BF16 kernel (k pairs
//! interleaved, which is AMX's B layout). A is packed as rows of pairs, zero-padded to whole
//! tiles in rows and k, because a tile load reads 16 full rows.
//!
//! The tile operations go through [`Tiles`]: [`Hardware`] issues the instructions (inline
//! assembly: Rust's AMX intrinsics are unstable), [`Emulated`] computes them in scalar code, so
//! the packing and blocking are tested on every CPU (`Backend::AmxEmulated`).

use super::{dot_pair_step, to_bf16, vector_packing, Backend, Block, Lhs, Tiling, NR};
use crate::kernels::SyncPtr;

/// Rows (and k pairs) of a tile; each tile row is 64 bytes: 16 fp32 or 16 bf16 pairs.
const T: usize = 16;
/// Rows of the register block: two tiles of A.
const MR: usize = 2 * T;
/// Columns of the register block: two tiles of B (half a packed panel).
const NB: usize = 2 * T;
/// Rows per parallel task: four blocks of A (4 × 32 rows × 384 k × 2 bytes = 96 KiB, in L2)
/// against one half panel of B (24 KiB, in L1).
const MC: usize = 4 * MR;

/// Whether this CPU and OS run AMX-BF16 tiles: CPUID's AMX-TILE and AMX-BF16, the OS enabling tile
/// state (XCR0 bits 17-18), AVX512-BF16 for the packing, Linux granting this process the tile
/// data (asked once; the grant covers every thread) and one tile product, run in a child
/// process, matching the emulation.
pub fn supported() -> bool {
    unsupported_reason().is_none()
}

/// Why this CPU and OS do not run AMX-BF16 tiles (see [`supported`]), or `None` when they do.
pub fn unsupported_reason() -> Option<&'static str> {
    static REASON: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *REASON.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            use std::arch::x86_64::{__cpuid, __cpuid_count};
            // SAFETY: CPUID exists on every x86-64 CPU (these functions are safe from Rust
            // 1.94 on; kiem builds with 1.89).
            #[allow(unused_unsafe)]
            let (leaf7, leaf1) = unsafe { (__cpuid_count(7, 0), __cpuid(1)) };
            let (tile, bf16) = ((leaf7.edx >> 24) & 1 == 1, (leaf7.edx >> 22) & 1 == 1);
            let osxsave = (leaf1.ecx >> 27) & 1 == 1;
            if !(tile && bf16 && super::native()) {
                return Some("the CPU lacks AMX-TILE, AMX-BF16 or AVX512-BF16");
            }
            // SAFETY: xgetbv exists when OSXSAVE is set.
            if !osxsave || (unsafe { xcr0() } >> 17) & 3 != 3 {
                return Some("the OS does not enable the tile state (XCR0 bits 17-18)");
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let granted = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            if granted != 0 {
                return Some("Linux refused this process the tile data (ARCH_REQ_XCOMP_PERM)");
            }
            // SAFETY: CPUID and the OS report AMX-BF16 and Linux granted the tile data
            // (children inherit the grant); `tiles_agree` allocates nothing. One tile product
            // takes microseconds: ten seconds is for a machine under load.
            if !unsafe { passes_in_a_child(tiles_agree, std::time::Duration::from_secs(10)) } {
                return Some(
                    "a tile product tried in a child process faulted, hung or disagreed with the emulation",
                );
            }
            None
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            Some("AMX tiles are used on x86-64 Linux only")
        }
    })
}

/// # Safety
/// CPUID reports OSXSAVE.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

/// Whether `check` returns true in a child process (which dies alone if it faults) within
/// `patience` (after which the child is killed): the
/// tile instructions are tried this way ([`tiles_agree`]), since a virtual machine may report
/// AMX and its tile state yet fault on the first tile instruction, or lose tile contents.
///
/// # Safety
/// `check` is safe to call here, allocates nothing and takes no lock (the child inherits
/// the other threads' locks and heap in whatever state they are).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn passes_in_a_child(check: unsafe fn() -> bool, patience: std::time::Duration) -> bool {
    let pid = libc::fork();
    if pid == 0 {
        // A crash here is the expected way to fail: no core file for it.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        // Leaves with 2 should `check` panic, rather than unwind into the parent's frames.
        struct ExitOnUnwind;
        impl Drop for ExitOnUnwind {
            fn drop(&mut self) {
                // SAFETY: ends the child process at once.
                unsafe { libc::_exit(2) }
            }
        }
        let _guard = ExitOnUnwind;
        // `_exit` skips the parent's destructors and exit handlers.
        libc::_exit(if check() { 0 } else { 1 });
    }
    if pid < 0 {
        return false;
    }
    // A child still running after `patience` is stuck: killed, and the check failed.
    let deadline = std::time::Instant::now() + patience;
    let mut status = 0;
    loop {
        match libc::waitpid(pid, &mut status, libc::WNOHANG) {
            done if done == pid => {
                return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
            }
            0 if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            0 => {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
                return false;
            }
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

/// One `tdpbf16ps` on small integers (so every sum is exact, whatever the order) through the
/// hardware and through [`Emulated`]: whether they agree bit for bit.
///
/// # Safety
/// The CPU has AMX-TILE and AMX-BF16 and the OS lets this process use the tile data.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn tiles_agree() -> bool {
    let [a, b, c] = probe_operands();
    let (mut on_hardware, mut emulated) = (Tile(c.0), Tile(c.0));
    one_dot(&mut Hardware, &a, &b, &mut on_hardware);
    let mut tiles = Emulated {
        tiles: [[[0; T]; T]; 8],
    };
    one_dot(&mut tiles, &a, &b, &mut emulated);
    on_hardware.0 == emulated.0
}

/// A, B and C of the probe: bf16 pairs and fp32 values that are small integers.
#[cfg(any(test, all(target_arch = "x86_64", target_os = "linux")))]
fn probe_operands() -> [Tile; 3] {
    let pair = |lo: usize, hi: usize, modulus: usize| {
        let value = |v: usize| u32::from(to_bf16((v % modulus) as f32 - (modulus / 2) as f32));
        value(lo) | (value(hi) << 16)
    };
    [
        Tile(std::array::from_fn(|i| pair(3 * i + 1, i / 3, 7))),
        Tile(std::array::from_fn(|i| pair(i + 5, 2 * i + i / 16, 5))),
        Tile(std::array::from_fn(|i| ((i % 9) as f32 - 4.0).to_bits())),
    ]
}

/// One tile of 16 rows × 64 bytes in memory.
#[cfg(any(test, all(target_arch = "x86_64", target_os = "linux")))]
#[repr(C, align(64))]
struct Tile([u32; T * T]);

/// `c += a · b` on `tiles`, loading and storing through memory.
///
/// # Safety
/// As for the `tiles` used.
#[cfg(any(test, all(target_arch = "x86_64", target_os = "linux")))]
unsafe fn one_dot(tiles: &mut impl Tiles, a: &Tile, b: &Tile, c: &mut Tile) {
    let stride = 4 * T;
    tiles.configure();
    tiles.load::<4>(a.0.as_ptr() as *const u8, stride);
    tiles.load::<6>(b.0.as_ptr() as *const u8, stride);
    tiles.load::<0>(c.0.as_ptr() as *const u8, stride);
    tiles.dot::<0, 4, 6>();
    tiles.store::<0>(c.0.as_mut_ptr() as *mut u8, stride);
    tiles.release();
}

/// The tile operations the kernel uses, on tiles named by number (0-7), each configured as 16
/// rows of 64 bytes.
trait Tiles {
    /// Sets every tile to 16 rows × 64 bytes (before the first use on this thread).
    unsafe fn configure(&mut self);
    /// Hands the tile state back (after the last use).
    unsafe fn release(&mut self);
    unsafe fn zero<const D: u8>(&mut self);
    /// Loads 16 rows of 64 bytes, row `r` at `ptr + r · stride` bytes.
    unsafe fn load<const D: u8>(&mut self, ptr: *const u8, stride: usize);
    unsafe fn store<const S: u8>(&mut self, ptr: *mut u8, stride: usize);
    /// `c += a · b` (`tdpbf16ps`): a's rows hold 16 bf16 pairs, b's row q pair q of 16 columns.
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self);
}

/// The CPU's AMX instructions.
struct Hardware;

/// The configuration `ldtilecfg` reads: palette 1, tiles 0-7 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn all_full() -> Config {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        for tile in 0..8 {
            bytes[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&64u16.to_le_bytes());
            bytes[48 + tile] = T as u8;
        }
        Config(bytes)
    }
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Hardware {
    #[inline(always)]
    unsafe fn configure(&mut self) {
        let config = Config::all_full();
        std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    }
    #[inline(always)]
    unsafe fn release(&mut self) {
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
    #[inline(always)]
    unsafe fn zero<const D: u8>(&mut self) {
        std::arch::asm!("tilezero tmm{d}", d = const D, options(nostack, nomem));
    }
    #[inline(always)]
    unsafe fn load<const D: u8>(&mut self, ptr: *const u8, stride: usize) {
        std::arch::asm!(
            "tileloadd tmm{d}, [{p} + {s} * 1]",
            d = const D,
            p = in(reg) ptr,
            s = in(reg) stride,
            options(nostack, readonly)
        );
    }
    #[inline(always)]
    unsafe fn store<const S: u8>(&mut self, ptr: *mut u8, stride: usize) {
        std::arch::asm!(
            "tilestored [{p} + {s} * 1], tmm{t}",
            t = const S,
            p = in(reg) ptr,
            s = in(reg) stride,
            options(nostack)
        );
    }
    #[inline(always)]
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        std::arch::asm!(
            "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nostack, nomem)
        );
    }
}

/// The tiles in memory and their operations in scalar code: each tile 16 rows of 16 words.
/// `dot` adds pair by pair as `vdpbf16ps` does; Intel's pseudocode for `tdpbf16ps` orders
/// the sums within an instruction differently, so hardware and emulation may differ in the
/// last bits (tests compare AMX with a tolerance, or with itself).
struct Emulated {
    tiles: [[[u32; T]; T]; 8],
}

impl Tiles for Emulated {
    unsafe fn configure(&mut self) {}
    unsafe fn release(&mut self) {}
    unsafe fn zero<const D: u8>(&mut self) {
        self.tiles[D as usize] = [[0; T]; T];
    }
    unsafe fn load<const D: u8>(&mut self, ptr: *const u8, stride: usize) {
        for (r, row) in self.tiles[D as usize].iter_mut().enumerate() {
            let src = ptr.add(r * stride) as *const u32;
            for (w, word) in row.iter_mut().enumerate() {
                *word = src.add(w).read_unaligned();
            }
        }
    }
    unsafe fn store<const S: u8>(&mut self, ptr: *mut u8, stride: usize) {
        for (r, row) in self.tiles[S as usize].iter().enumerate() {
            let dst = ptr.add(r * stride) as *mut u32;
            for (w, &word) in row.iter().enumerate() {
                dst.add(w).write_unaligned(word);
            }
        }
    }
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        let (a, b) = (self.tiles[A as usize], self.tiles[B as usize]);
        for (m, row) in self.tiles[C as usize].iter_mut().enumerate() {
            for (n, c) in row.iter_mut().enumerate() {
                let mut sum = f32::from_bits(*c);
                for q in 0..T {
                    sum = dot_pair_step(sum, a[m][q], b[q][n]);
                }
                *c = sum.to_bits();
            }
        }
    }
}

/// 2 × 2 blocks of AMX tiles (or their scalar emulation, [`Backend::AmxEmulated`]) inside
/// the bf16 products' blocking ([`super::Product::run`]).
pub(super) struct Tiles2x2 {
    pub(super) backend: Backend,
}

impl Tiling for Tiles2x2 {
    const MR: usize = MR;
    const MC: usize = MC;

    /// Whole tiles of 16 pairs (the padding is zero in A and B).
    fn padded(pairs: usize) -> usize {
        pairs.next_multiple_of(T)
    }

    fn pack_a(
        &self,
        dst: &mut [u32],
        a: &[f32],
        strides: (usize, usize),
        i0: usize,
        mr: usize,
        pc: usize,
        kc: usize,
    ) {
        let padded = Self::padded(kc.div_ceil(2));
        pack_a(self.backend, dst, a, strides, i0, mr, pc, kc, padded);
    }

    unsafe fn run(
        &self,
        block: &Block,
        rows: std::ops::Range<usize>,
        lhs: Lhs,
        a_pack: &[u32],
        b_pack: &[u32],
        dst: SyncPtr,
    ) {
        // AMX tiles read A only packed (`gemm_with` never hands them a copy in place).
        debug_assert!(matches!(lhs, Lhs::Packed(..)) && !a_pack.is_empty());
        let work = Work { block, rows };
        match self.backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: gemm_with runs the Amx backend only where `supported()`; the packed
            // operands hold `block.pairs` (whole tiles of) pairs for every row and column the
            // blocks read (zero past the operands); this task alone writes its rows of dst,
            // which lie inside it (the caller's guarantee).
            Backend::Amx => {
                let mut hw = Hardware;
                hw.configure();
                work.run(&mut hw, a_pack, b_pack, dst);
                hw.release();
            }
            // SAFETY: as above, on tiles in memory.
            _ => {
                let mut emulated = Emulated {
                    tiles: [[[0; T]; T]; 8],
                };
                work.run(&mut emulated, a_pack, b_pack, dst);
            }
        }
    }
}

/// One task's share of a k block and column block: its rows against every panel of B.
struct Work<'a> {
    block: &'a Block,
    /// The task's rows of dst.
    rows: std::ops::Range<usize>,
}

impl Work<'_> {
    /// Each half panel of B (staying in L1) against each 32-row block of A (from L2).
    ///
    /// # Safety
    /// The tiles are configured; `a_pack` holds the packed blocks of A of this k block (32 rows
    /// of `block.pairs` words each) and `b_pack` the column block's panels (`block.pairs` rows
    /// of NR words each); the task's rows of dst are inside it and written by this task alone.
    unsafe fn run<X: Tiles>(&self, x: &mut X, a_pack: &[u32], b_pack: &[u32], dst: SyncPtr) {
        let panel_words = self.block.pairs * NR;
        // Tiles of C cut by dst's edge go through this buffer (made once: it is 4 KiB).
        let mut edges = [[0f32; T * T]; 4];
        let (jc, n_end) = (self.block.columns.start, self.block.columns.end);
        for p in 0..(n_end - jc).div_ceil(NR) {
            for half in 0..NR / NB {
                let j0 = jc + p * NR + half * NB;
                if j0 >= n_end {
                    break;
                }
                let b = b_pack[p * panel_words + half * NB..].as_ptr();
                for i0 in self.rows.clone().step_by(MR) {
                    let a = a_pack[i0 * self.block.pairs..].as_ptr();
                    let c = dst.get().add(i0 * self.block.ldc + j0);
                    let extent = ((self.block.m - i0).min(MR), (n_end - j0).min(NB));
                    self.block(x, &mut edges, a, b, c, extent);
                }
            }
        }
    }

    /// One 32 × 32 block of C (`rows × cols` of it inside dst): A's packed rows at `a`, B's
    /// half panel at `b` (row stride NR words).
    ///
    /// # Safety
    /// The tiles are configured; `a` holds 32 rows of `block.pairs` words and `b` `block.pairs`
    /// rows of NR words (32 readable from each row start); dst's `rows × cols` at `c` (row
    /// stride `ldc`) are valid for reads and writes.
    #[inline(always)]
    unsafe fn block<X: Tiles>(
        &self,
        x: &mut X,
        edges: &mut [[f32; T * T]; 4],
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        (rows, cols): (usize, usize),
    ) {
        let ldc_bytes = self.block.ldc * 4;
        let inside = |t: usize| rows >= T * (t / 2 + 1) && cols >= T * (t % 2 + 1);
        let origin = |t: usize| c.wrapping_add((t / 2) * T * self.block.ldc + (t % 2) * T);
        let place = |t: usize, edges: &mut [[f32; T * T]; 4]| -> (*mut u8, usize) {
            if inside(t) {
                (origin(t) as *mut u8, ldc_bytes)
            } else {
                (edges[t].as_mut_ptr() as *mut u8, T * 4)
            }
        };
        if self.block.overwrite {
            x.zero::<0>();
            x.zero::<1>();
            x.zero::<2>();
            x.zero::<3>();
        } else {
            for (t, edge) in edges.iter_mut().enumerate() {
                if !inside(t) {
                    self.edge(t, rows, cols, |r, j| {
                        edge[r * T + j] = *origin(t).add(r * self.block.ldc + j);
                    });
                }
            }
            let (p, s) = place(0, edges);
            x.load::<0>(p, s);
            let (p, s) = place(1, edges);
            x.load::<1>(p, s);
            let (p, s) = place(2, edges);
            x.load::<2>(p, s);
            let (p, s) = place(3, edges);
            x.load::<3>(p, s);
        }
        let a_stride = self.block.pairs * 4;
        let b_stride = NR * 4;
        for step in 0..self.block.pairs / T {
            let a0 = a.add(step * T) as *const u8;
            let b0 = b.add(step * T * NR) as *const u8;
            x.load::<4>(a0, a_stride);
            x.load::<5>(a0.add(T * a_stride), a_stride);
            x.load::<6>(b0, b_stride);
            x.load::<7>(b0.add(T * 4), b_stride);
            x.dot::<0, 4, 6>();
            x.dot::<1, 4, 7>();
            x.dot::<2, 5, 6>();
            x.dot::<3, 5, 7>();
        }
        let (p, s) = place(0, edges);
        x.store::<0>(p, s);
        let (p, s) = place(1, edges);
        x.store::<1>(p, s);
        let (p, s) = place(2, edges);
        x.store::<2>(p, s);
        let (p, s) = place(3, edges);
        x.store::<3>(p, s);
        for (t, edge) in edges.iter().enumerate() {
            if !inside(t) {
                self.edge(t, rows, cols, |r, j| {
                    *origin(t).add(r * self.block.ldc + j) = edge[r * T + j];
                });
            }
        }
    }

    /// Calls `f(row, column)` for tile `t`'s elements inside dst's `rows × cols`.
    fn edge(&self, t: usize, rows: usize, cols: usize, mut f: impl FnMut(usize, usize)) {
        let (r0, j0) = ((t / 2) * T, (t % 2) * T);
        for r in 0..rows.saturating_sub(r0).min(T) {
            for j in 0..cols.saturating_sub(j0).min(T) {
                f(r, j);
            }
        }
    }
}

/// Packs rows `i0..i0 + mr` and k `p0..p0 + kc` of fp32 A, rounded to bf16, as 32 rows of
/// `padded` words (pairs, the lower k in the low half), zero past `mr` rows and `kc` values.
#[allow(clippy::too_many_arguments)]
fn pack_a(
    backend: Backend,
    dst: &mut [u32],
    a: &[f32],
    (rs, cs): (usize, usize),
    i0: usize,
    mr: usize,
    p0: usize,
    kc: usize,
    padded: usize,
) {
    let dst = &mut dst[..MR * padded];
    #[cfg(target_arch = "x86_64")]
    if vector_packing(backend) && (cs == 1 || rs == 1) {
        // SAFETY: vector packing runs only where the CPU has AVX512-BF16 (and so AVX-512 BW
        // and VL); rows i0..i0 + mr and k p0..p0 + kc of A lie inside `a` (checked by
        // gemm_with), and `dst` holds 32 rows of `padded` words.
        unsafe {
            if cs == 1 {
                pack_a_rows_avx512(dst, &a[i0 * rs + p0..], rs, mr, kc, padded);
            } else {
                pack_a_columns_avx512(dst, &a[p0 * cs + i0..], cs, mr, kc, padded);
            }
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = backend;
    let at = |i: usize, p: usize| {
        if p < kc {
            u32::from(to_bf16(a[(i0 + i) * rs + (p0 + p) * cs]))
        } else {
            0
        }
    };
    for (r, row) in dst.chunks_mut(padded).enumerate() {
        for (q, word) in row.iter_mut().enumerate() {
            *word = if r < mr && 2 * q < kc {
                at(r, 2 * q) | (at(r, 2 * q + 1) << 16)
            } else {
                0
            };
        }
    }
}

/// [`pack_a`] for A with contiguous rows (`a` at row 0, k 0 of the block; row stride `rs`).
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; `a` holds `kc` values from each row start `r · rs`
/// (r < mr); `dst` holds 32 rows of `padded` words, `padded` a multiple of 16 and
/// `padded ≥ kc / 2`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_a_rows_avx512(
    dst: &mut [u32],
    a: &[f32],
    rs: usize,
    mr: usize,
    kc: usize,
    padded: usize,
) {
    use std::arch::x86_64::*;
    for (r, row) in dst.chunks_mut(padded).enumerate() {
        if r >= mr {
            row.fill(0);
            continue;
        }
        let src = a.as_ptr().add(r * rs);
        for q in (0..padded).step_by(T) {
            // Masked loads read only the row's kc values (a mask of 0 reads nothing).
            let mask =
                |from: usize| ((1u64 << kc.saturating_sub(2 * q + from).min(16)) - 1) as __mmask16;
            let first = _mm512_maskz_loadu_ps(mask(0), src.wrapping_add(2 * q));
            let second = _mm512_maskz_loadu_ps(mask(16), src.wrapping_add(2 * q + 16));
            let words =
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(second, first));
            _mm512_storeu_si512(row.as_mut_ptr().add(q) as *mut _, words);
        }
    }
}

/// [`pack_a`] for A with contiguous columns (a transposed operand, as in weight gradients; `a`
/// at row 0, k 0 of the block, column stride `cs`): for 16 rows and 16 pairs at a time, each
/// pair's two k rounded and interleaved across the rows, then the 16 × 16 words transposed.
///
/// # Safety
/// The CPU has AVX-512F/BW and AVX512-BF16; `a` holds `mr` values from each k start `p · cs`
/// (p < kc); `dst` holds 32 rows of `padded` words, `padded` a multiple of 16 and
/// `padded ≥ kc / 2`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a_columns_avx512(
    dst: &mut [u32],
    a: &[f32],
    cs: usize,
    mr: usize,
    kc: usize,
    padded: usize,
) {
    use std::arch::x86_64::*;
    // Word r: (k even, row r) low, (k odd, row r) high.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for g in 0..MR / T {
        let rows = mr.saturating_sub(g * T).min(T);
        let mask = ((1u32 << rows) - 1) as __mmask16;
        for q0 in (0..padded).step_by(T) {
            let mut words = [_mm512_setzero_si512(); T];
            for (t, w) in words.iter_mut().enumerate() {
                let p = 2 * (q0 + t);
                let load = |p: usize| {
                    if p < kc && rows > 0 {
                        _mm512_maskz_loadu_ps(mask, a.as_ptr().add(p * cs + g * T))
                    } else {
                        _mm512_setzero_ps()
                    }
                };
                let halves = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                    load(p + 1),
                    load(p),
                ));
                *w = _mm512_permutexvar_epi16(interleave, halves);
            }
            // 32-bit lanes moved as they are: the fp32 transpose serves for words.
            let rows_of_pairs =
                std::mem::transmute::<[__m512; T], [__m512i; T]>(crate::f32_gemm::transpose16(
                    std::mem::transmute::<[__m512i; T], [__m512; T]>(words),
                ));
            for (r, v) in rows_of_pairs.iter().enumerate() {
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add((g * T + r) * padded + q0) as *mut _,
                    *v,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16_gemm::from_bf16;

    #[test]
    fn the_configuration_is_palette_one_with_eight_full_tiles() {
        let c = Config::all_full();
        assert_eq!(c.0[0], 1);
        assert!(c.0[1..16].iter().all(|&b| b == 0));
        for tile in 0..8 {
            assert_eq!(
                u16::from_le_bytes([c.0[16 + 2 * tile], c.0[17 + 2 * tile]]),
                64
            );
            assert_eq!(c.0[48 + tile], 16);
        }
        assert!(c.0[32..48].iter().all(|&b| b == 0));
        assert!(c.0[56..].iter().all(|&b| b == 0));
    }

    /// The support probe's product, on the emulated tiles, is the textbook one and exact:
    /// small integers, so the hardware must give the same bits whatever its summation order.
    #[test]
    fn the_support_probe_sums_exactly() {
        let [a, b, c] = probe_operands();
        let mut out = Tile(c.0);
        let mut tiles = Emulated {
            tiles: [[[0; T]; T]; 8],
        };
        // SAFETY: the emulation runs anywhere; the tiles are 16 rows of 64 bytes.
        unsafe { one_dot(&mut tiles, &a, &b, &mut out) };
        let half =
            |w: u32, high: bool| f64::from(from_bf16((w >> if high { 16 } else { 0 }) as u16));
        let mut distinct = std::collections::BTreeSet::new();
        for m in 0..T {
            for n in 0..T {
                let want = f64::from(f32::from_bits(c.0[m * T + n]))
                    + (0..T)
                        .flat_map(|q| [false, true].map(|h| (q, h)))
                        .map(|(q, h)| half(a.0[m * T + q], h) * half(b.0[q * T + n], h))
                        .sum::<f64>();
                assert_eq!(
                    f64::from(f32::from_bits(out.0[m * T + n])),
                    want,
                    "({m}, {n})"
                );
                assert_eq!(want.fract(), 0.0);
                distinct.insert(want as i64);
            }
        }
        // Varied enough to catch a transposed or misplaced operand.
        assert!(distinct.len() > 20, "{distinct:?}");
    }

    /// The child-process check behind [`supported`]: a true, a false, a crash and a hang.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn a_check_in_a_child_reports_success_failure_and_crashes() {
        unsafe fn yes() -> bool {
            true
        }
        unsafe fn no() -> bool {
            false
        }
        unsafe fn crash() -> bool {
            libc::abort()
        }
        unsafe fn hang() -> bool {
            loop {
                libc::pause();
            }
        }
        // SAFETY: the checks allocate nothing and take no lock.
        unsafe {
            let patience = std::time::Duration::from_secs(5);
            assert!(passes_in_a_child(yes, patience));
            assert!(!passes_in_a_child(no, patience));
            assert!(!passes_in_a_child(crash, patience));
            let start = std::time::Instant::now();
            assert!(!passes_in_a_child(
                hang,
                std::time::Duration::from_millis(200)
            ));
            assert!(start.elapsed() < patience);
        }
    }
}
