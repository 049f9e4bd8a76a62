//! Matrix products on bf16 operands with fp32 accumulation, for CPUs with AVX512-BF16.
//!
//! Training keeps fp32 master weights, gradients and activations; a bf16 product rounds its
//! operands to bf16 (nearest, ties to even) while packing them into tiles, multiplies them in
//! pairs with `vdpbf16ps` (two products per fp32 lane per instruction, twice the fp32 FMA rate)
//! and accumulates in fp32. Debian's OpenBLAS (0.3.21) is built without `sbgemm`, so kiem
//! carries this kernel: BLIS-style packing around a 6 × 64 register tile.
//!
//! Every output element is summed in the same order whatever the thread count or the row
//! split, so results are deterministic.

use rayon::prelude::*;

use crate::f32_gemm::PackedOperand;
use crate::kernels::{with_thread_buffer, SyncPtr};

mod amx;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (four 16-lane vectors).
const NR: usize = 64;
/// Pairs of k per packed block: 384 values of k (a 6-row panel of A stays in L1).
const KC_PAIRS: usize = 192;
/// Columns per packed block of B (192 pairs × 512 columns × 4 bytes = 384 KiB, in L2).
const NC: usize = 512;
/// Rows per parallel task.
const MC: usize = 8 * MR;

/// Whether this CPU has the bf16 instructions (AVX-512F with AVX512-BF16).
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What computes the bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The CPU's `vcvtneps2bf16` and `vdpbf16ps`.
    Native,
    /// Scalar code with exactly the arithmetic Intel documents for those instructions (inputs
    /// rounded to nearest-even bf16; each pair added to the fp32 sum by two fused steps with
    /// subnormals read and written as zero). Many times slower: for testing the bf16 path on
    /// CPUs without the instructions (`KIEM_BF16=emulate`).
    Emulated,
    /// AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and newer), with `KIEM_BF16=amx` on a CPU
    /// and OS that run them. Opt-in until measured on such a CPU: the tile path is tested on
    /// every CPU through [`Backend::AmxEmulated`], its instructions only where AMX exists.
    Amx,
    /// The AMX path with its tile instructions computed in scalar code (the operands packed
    /// as for the tiles): tests the AMX packing and blocking on any CPU.
    AmxEmulated,
}

impl Backend {
    /// Whether this backend can run on this CPU and OS.
    pub fn runs_here(self) -> bool {
        match self {
            Backend::Emulated | Backend::AmxEmulated => true,
            Backend::Native => native(),
            Backend::Amx => amx_supported(),
        }
    }
}

pub use amx::supported as amx_supported;
pub use amx::unsupported_reason as amx_unsupported_reason;

/// A note for the user when `KIEM_BF16` asks for what this process does not run (AMX tiles on
/// a CPU or OS without them, or a value that names no backend): why, and what runs instead.
pub fn request_note() -> Option<String> {
    let instead = if native() {
        "bf16 products run on AVX512-BF16"
    } else {
        "this CPU has no bf16 products"
    };
    match std::env::var("KIEM_BF16").as_deref() {
        Ok("amx") => amx_unsupported_reason().map(|why| format!("KIEM_BF16=amx: {why}; {instead}")),
        Ok("emulate") | Err(_) => None,
        Ok(other) => Some(format!(
            "KIEM_BF16={other:?} names no backend (amx or emulate); {instead}"
        )),
    }
}

/// Whether operands are rounded and packed with AVX-512 code: wherever the CPU has
/// AVX512-BF16, except for the scalar emulation of `vdpbf16ps`, which packs in scalar code too.
fn vector_packing(backend: Backend) -> bool {
    backend != Backend::Emulated && native()
}

/// The backend of this process: emulated when `KIEM_BF16=emulate`, AMX tiles when
/// `KIEM_BF16=amx` and the CPU runs them, else native where the CPU has AVX512-BF16, else
/// none.
pub fn backend() -> Option<Backend> {
    static BACKEND: std::sync::OnceLock<Option<Backend>> = std::sync::OnceLock::new();
    *BACKEND.get_or_init(|| match std::env::var("KIEM_BF16").as_deref() {
        Ok("emulate") => Some(Backend::Emulated),
        Ok("amx") if amx_supported() => Some(Backend::Amx),
        // Without AMX the request falls back; `crate::kernels::matmul_path` names what runs.
        _ => native().then_some(Backend::Native),
    })
}

/// Whether this process's bf16 products outrun its fp32 ones, as a training step measures
/// them: on AMX tiles, or on `vdpbf16ps` outside Intel. AMD's Zen 4 runs `vdpbf16ps` at twice
/// its fp32 FMA rate (bf16 steps 1.6-1.8x fp32 ones); Intel's server cores run it no faster
/// than their two fp32 FMA ports, and the rounding and packing then cost more than they save (an
/// Emerald Rapids Xeon trained at 1399 tok/s in bf16 against 1845 in fp32, bench/RESULTS.md).
pub fn outruns_fp32() -> bool {
    match backend() {
        Some(Backend::Amx) => true,
        Some(Backend::Native) => !cpu_is_intel(),
        _ => false,
    }
}

/// Whether CPUID names the vendor GenuineIntel.
fn cpu_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID exists on every x86-64 CPU (safe from Rust 1.94 on; kiem builds with
        // 1.89).
        #[allow(unused_unsafe)]
        let leaf = unsafe { std::arch::x86_64::__cpuid(0) };
        // The vendor string is EBX, EDX, ECX, little-endian.
        let mut vendor = [0u8; 12];
        for (bytes, register) in vendor.chunks_mut(4).zip([leaf.ebx, leaf.edx, leaf.ecx]) {
            bytes.copy_from_slice(&register.to_le_bytes());
        }
        &vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 products can run in this process (see [`backend`]).
pub fn available() -> bool {
    backend().is_some()
}

/// The bits of the bf16 nearest to `x` (ties to even), exactly as `vcvtneps2bf16` rounds:
/// subnormal inputs become signed zero and NaN stays a (quiet) NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if bits & 0x7F80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 a bf16 stands for.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Rounds `src` to bf16 into `dst` (same length), in parallel.
fn convert(backend: Backend, src: &[f32], dst: &mut [u16]) {
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| round_scaled(backend, s, d, 1.0));
}

/// Rounds `scale · src` to bf16 into `dst` (same length) on this thread.
fn round_scaled(backend: Backend, src: &[f32], dst: &mut [u16], scale: f32) {
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the native backend is chosen only where the CPU has AVX512-BF16.
        Backend::Native => unsafe { round_scaled_avx512(src, dst, scale) },
        _ => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = to_bf16(s * scale);
            }
        }
    }
}

/// # Safety
/// The CPU has AVX-512F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_scaled_avx512(src: &[f32], dst: &mut [u16], scale: f32) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let factor = _mm512_set1_ps(scale);
    let mut i = 0;
    while i + 16 <= n {
        let x = _mm512_mul_ps(_mm512_loadu_ps(src.as_ptr().add(i)), factor);
        _mm256_storeu_si256(
            dst.as_mut_ptr().add(i) as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)),
        );
        i += 16;
    }
    for j in i..n {
        dst[j] = to_bf16(src[j] * scale);
    }
}

/// The number of elements a strided `rows × cols` operand spans.
fn extent(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> usize {
    (rows - 1) * rs + (cols - 1) * cs + 1
}

thread_local! {
    /// The bf16 copy of A read in place by the tiles, reused across calls.
    static ROUNDED_A: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A's rows rounded for a product over a [`PackedB`], reused across calls.
    static PAIRS_A: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with bf16-rounded operands and fp32 sums; `dst` is
/// row-major with row stride `ldc`, each operand is given by (row stride, column stride).
///
/// # Panics
/// When no backend is available (check [`available`]) or a slice is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldc: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    let backend = backend().expect("bf16 matmul needs a CPU with AVX512-BF16");
    gemm_with(
        backend,
        m,
        n,
        k,
        dst,
        ldc,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
    )
}

/// [`gemm`] on a given backend.
///
/// # Panics
/// When `backend` is native and the CPU lacks AVX512-BF16, or a slice is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldc: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    assert!(
        backend.runs_here(),
        "bf16 matmul backend {backend:?} does not run on this CPU"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * ldc + n, "bf16 gemm: dst too small");
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * ldc..row * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let (lhs_len, rhs_len) = (extent(m, k, lhs_strides), extent(k, n, rhs_strides));
    assert!(lhs.len() >= lhs_len, "bf16 gemm: lhs too small");
    assert!(rhs.len() >= rhs_len, "bf16 gemm: rhs too small");
    let product = Product {
        backend,
        m,
        n,
        k,
        ldc,
        accumulate,
        rhs,
        rhs_strides,
    };
    if matches!(backend, Backend::Amx | Backend::AmxEmulated) {
        let lhs = Lhs::Packed(lhs, lhs_strides);
        return product.run(&amx::Tiles2x2 { backend }, dst, lhs);
    }
    let tiling = RegisterTile { backend };
    // With A's rows contiguous and k even, each k pair of a row is one word of a bf16 copy of
    // A, so the tiles read that copy in place (one vectorized rounding pass): packing A would
    // cost as much as a fifth of the product when n is small. Every other operand is rounded
    // while it is packed, straight from fp32. A call nested in another on this thread (rayon
    // may run one while the other waits) allocates its own copy.
    let a_in_place = lhs_strides.1 == 1 && k.is_multiple_of(2);
    if !a_in_place {
        return product.run(&tiling, dst, Lhs::Packed(lhs, lhs_strides));
    }
    with_thread_buffer(&ROUNDED_A, lhs_len, |a16| {
        convert(backend, &lhs[..lhs_len], a16);
        product.run(&tiling, dst, Lhs::InPlace(a16, lhs_strides.0));
    });
}

/// How the tiles get A.
#[derive(Clone, Copy)]
enum Lhs<'a> {
    /// fp32 with (row stride, column stride), rounded into packed panels per k block.
    Packed(&'a [f32], (usize, usize)),
    /// A bf16 copy with contiguous rows (the given row stride) and even k, read in place.
    InPlace(&'a [u16], usize),
}

/// A product's shape and its B (checked by [`gemm_with`]); its dst and A come with the run.
struct Product<'a> {
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    ldc: usize,
    accumulate: bool,
    rhs: &'a [f32],
    rhs_strides: (usize, usize),
}

/// One k block against one column block, as a task's tiles see it.
struct Block {
    /// The block's first k.
    pc: usize,
    /// Pairs of k per packed row of A and per packed panel of B (whole tiles for AMX).
    pairs: usize,
    ldc: usize,
    overwrite: bool,
    /// All the rows of dst.
    m: usize,
    /// The column block.
    columns: std::ops::Range<usize>,
}

/// How a product's tiles take their operands: the AVX512-BF16 register tile
/// ([`RegisterTile`]) or AMX tiles ([`amx::Tiles2x2`]). Both run inside the same blocking
/// ([`Product::run`]): k blocks of [`KC_PAIRS`] pairs, all of A packed per k block, column
/// blocks of [`NC`] with B packed in panels of [`NR`] interleaved pairs.
trait Tiling: Sync {
    /// Rows of A per packed block.
    const MR: usize;
    /// Rows of dst per parallel task.
    const MC: usize;
    /// Pairs packed for a k block of `pairs` pairs (zero beyond).
    fn padded(pairs: usize) -> usize;
    /// Packs rows `i0..i0 + mr` and k `pc..pc + kc` of fp32 A as `padded(kc.div_ceil(2))`
    /// pairs into `dst` (one block of `MR` rows, zero beyond).
    #[allow(clippy::too_many_arguments)]
    fn pack_a(
        &self,
        dst: &mut [u32],
        a: &[f32],
        strides: (usize, usize),
        i0: usize,
        mr: usize,
        pc: usize,
        kc: usize,
    );
    /// Computes `rows` of dst (a task's, a multiple of `MR` from a block start) over the
    /// block's columns.
    ///
    /// # Safety
    /// `a_pack` holds the k block of A (packed, unless `lhs` is in place) for every row of
    /// dst and `b_pack` the column block's panels, `block.pairs` pairs each; the rows and
    /// columns lie inside dst, which this task alone writes there.
    unsafe fn run(
        &self,
        block: &Block,
        rows: std::ops::Range<usize>,
        lhs: Lhs,
        a_pack: &[u32],
        b_pack: &[u32],
        dst: SyncPtr,
    );
}

impl Product<'_> {
    /// `dst (+)= lhs · rhs` on `tiling`'s tiles.
    fn run<T: Tiling>(&self, tiling: &T, dst: &mut [f32], lhs: Lhs) {
        let (m, n, k) = (self.m, self.n, self.k);
        let dst_ptr = SyncPtr(dst.as_mut_ptr());
        let blocks_a = m.div_ceil(T::MR);
        let most = T::padded(KC_PAIRS);
        let mut a_pack = match lhs {
            Lhs::InPlace(..) => Vec::new(),
            Lhs::Packed(..) => vec![0u32; blocks_a * T::MR * most],
        };
        let mut b_pack = vec![0u32; most * NC];
        for pc in (0..k).step_by(2 * KC_PAIRS) {
            let kc = (k - pc).min(2 * KC_PAIRS);
            let pairs = kc.div_ceil(2);
            let padded = T::padded(pairs);
            // All of A's rows for this k block, packed once and shared by every column block.
            if let Lhs::Packed(lhs, lhs_strides) = lhs {
                a_pack[..blocks_a * T::MR * padded]
                    .par_chunks_mut(T::MR * padded)
                    .enumerate()
                    .for_each(|(i, block)| {
                        let i0 = i * T::MR;
                        let mr = (m - i0).min(T::MR);
                        tiling.pack_a(block, lhs, lhs_strides, i0, mr, pc, kc);
                    });
            }
            for jc in (0..n).step_by(NC) {
                let nc = (n - jc).min(NC);
                let panels = nc.div_ceil(NR);
                b_pack[..panels * padded * NR]
                    .par_chunks_mut(padded * NR)
                    .enumerate()
                    .for_each(|(p, panel)| {
                        let j0 = jc + p * NR;
                        let (filled, padding) = panel.split_at_mut(pairs * NR);
                        let cols = (jc + nc - j0).min(NR);
                        pack_b(
                            self.backend,
                            filled,
                            self.rhs,
                            self.rhs_strides,
                            pc,
                            kc,
                            j0,
                            cols,
                        );
                        padding.fill(0);
                    });
                let block = Block {
                    pc,
                    pairs: padded,
                    ldc: self.ldc,
                    overwrite: pc == 0 && !self.accumulate,
                    m,
                    columns: jc..jc + nc,
                };
                let (a_pack, b_pack) = (&a_pack, &b_pack);
                (0..m.div_ceil(T::MC)).into_par_iter().for_each(|task| {
                    let rows = task * T::MC..m.min((task + 1) * T::MC);
                    // SAFETY: A's k block is packed above (or read in place) for every row,
                    // B's panels for the column block; gemm_with checked that dst holds m rows
                    // of ldc and this task alone writes its rows.
                    unsafe { tiling.run(&block, rows, lhs, a_pack, b_pack, dst_ptr) };
                });
            }
        }
    }
}

/// The AVX512-BF16 register tile: 6 rows × 64 columns of C in 24 vectors (or its scalar
/// emulation with [`Backend::Emulated`]).
struct RegisterTile {
    backend: Backend,
}

impl Tiling for RegisterTile {
    const MR: usize = MR;
    const MC: usize = MC;

    fn padded(pairs: usize) -> usize {
        pairs
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
        pack_a(self.backend, dst, a, strides, i0, mr, pc, kc);
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
        let (pairs, pc, m) = (block.pairs, block.pc, block.m);
        let (jc, n_end) = (block.columns.start, block.columns.end);
        let tile = match self.backend {
            Backend::Native => tile,
            _ => tile_emulated,
        };
        for i0 in rows.step_by(MR) {
            let mr = (m - i0).min(MR);
            // Where each of the tile's rows of A starts (rows past m repeat the last one:
            // read, never stored), and the step from one k pair to the next.
            let (a_rows, pair_step) = match lhs {
                Lhs::InPlace(a16, row_stride) => {
                    let row = |r: usize| a16[(i0 + r.min(mr - 1)) * row_stride + pc..].as_ptr();
                    (std::array::from_fn::<_, MR, _>(row), 2)
                }
                Lhs::Packed(..) => {
                    let panel = a_pack[i0 * pairs..].as_ptr() as *const u16;
                    (std::array::from_fn(|r| panel.wrapping_add(2 * r)), 2 * MR)
                }
            };
            for (p, j0) in (jc..n_end).step_by(NR).enumerate() {
                // SAFETY: the native backend runs only where the CPU has AVX512-BF16 (asserted
                // by `gemm_with`); each row of A holds `pairs` pairs from its start (packed, or
                // the row's k block in place, k even), as does the packed panel of B; the
                // tile's rows i0..i0+mr and columns j0..j0+NR∧n lie inside dst, which this task
                // alone writes (the caller's guarantee).
                tile(
                    pairs,
                    a_rows,
                    pair_step,
                    b_pack[p * pairs * NR..].as_ptr(),
                    dst.get().add(i0 * block.ldc + j0),
                    block.ldc,
                    mr,
                    (n_end - j0).min(NR),
                    block.overwrite,
                )
            }
        }
    }
}

/// A `k × n` operand B rounded to bf16 and packed once, for many products that each read a
/// range of its k and a range of its columns on one thread (attention under bf16 precision
/// packs each head's keys and values once for all its blocks of query rows), as
/// [`crate::f32_gemm::PackedB`] does in fp32.
pub struct PackedB {
    backend: Backend,
    k: usize,
    n: usize,
    /// `[panel][pair][NR]` words; pair q holds k 2q (low half) and 2q + 1, so a product's k
    /// range starts on an even k.
    data: Vec<u32>,
}

impl PackedB {
    /// An empty packing whose products run on `backend`'s register tile (AMX backends use the
    /// same CPU's AVX512-BF16, or its emulation: attention's blocks are too small for tiles
    /// of 16 rows); [`PackedOperand::pack`] fills it, reusing its memory.
    ///
    /// # Panics
    /// When `backend` does not run on this CPU.
    pub fn new(backend: Backend) -> Self {
        let backend = match backend {
            Backend::Amx => Backend::Native,
            Backend::AmxEmulated => Backend::Emulated,
            other => other,
        };
        assert!(
            backend.runs_here(),
            "bf16 packing for {backend:?}, which does not run on this CPU"
        );
        PackedB {
            backend,
            k: 0,
            n: 0,
            data: Vec::new(),
        }
    }
}

/// Products over ranges of the packing (see [`PackedOperand::product`]) with bf16-rounded
/// operands and fp32 sums: `ks` must start on an even k (pairs are packed from k 0), and
/// `alpha` scales A before it is rounded (only A with contiguous rows takes one other than 1).
impl PackedOperand for PackedB {
    fn panel_width(&self) -> usize {
        NR
    }

    unsafe fn pack(&mut self, k: usize, n: usize, b: *const f32, strides: (usize, usize)) {
        let panel = k.div_ceil(2) * NR;
        let panels = n.div_ceil(NR);
        self.k = k;
        self.n = n;
        if self.data.len() < panels * panel {
            self.data.resize(panels * panel, 0);
        }
        if k == 0 || n == 0 {
            return;
        }
        let b = std::slice::from_raw_parts(b, extent(k, n, strides));
        for (p, dst) in self.data.chunks_mut(panel).take(panels).enumerate() {
            let j0 = p * NR;
            pack_b(self.backend, dst, b, strides, 0, k, j0, (n - j0).min(NR));
        }
    }

    unsafe fn product(
        &self,
        m: usize,
        dst: *mut f32,
        ldc: usize,
        accumulate: bool,
        lhs: *const f32,
        (rs, cs): (usize, usize),
        ks: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        alpha: f32,
    ) {
        assert!(
            ks.start.is_multiple_of(2),
            "bf16 product over a packed B: k {ks:?} starts inside a packed pair"
        );
        if crate::f32_gemm::nothing_to_multiply(
            m,
            dst,
            ldc,
            accumulate,
            (&ks, &cols),
            (self.k, self.n, NR),
        ) {
            return;
        }
        let kc = ks.len();
        let pairs = kc.div_ceil(2);
        let row_tiles = m.div_ceil(MR);
        // Rows contiguous in k: each row rounded into `pairs` words, read in place by the tile.
        // Otherwise (a transposed A): packed `[pair][MR]` per tile of rows.
        let in_place = cs == 1;
        assert!(
            in_place || alpha == 1.0,
            "bf16 product over a packed B: a scale needs A's rows contiguous"
        );
        let a = std::slice::from_raw_parts(lhs, extent(m, kc, (rs, cs)));
        let tile = match self.backend {
            Backend::Native => tile,
            _ => tile_emulated,
        };
        let panel_len = self.k.div_ceil(2) * NR;
        with_thread_buffer(&PAIRS_A, row_tiles * MR * pairs, |a_pairs| {
            if in_place {
                for (i, row) in a_pairs.chunks_mut(pairs).take(m).enumerate() {
                    let halves = std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut u16, kc);
                    round_scaled(self.backend, &a[i * rs..i * rs + kc], halves, alpha);
                    // An odd k leaves the last pair's upper half, which must add nothing.
                    if kc % 2 == 1 {
                        row[pairs - 1] &= 0xFFFF;
                    }
                }
            } else {
                for (t, block) in a_pairs.chunks_mut(MR * pairs).enumerate() {
                    let i0 = t * MR;
                    pack_a(
                        self.backend,
                        block,
                        a,
                        (rs, cs),
                        i0,
                        (m - i0).min(MR),
                        0,
                        kc,
                    );
                }
            }
            let a_pairs = a_pairs.as_ptr();
            for q0 in (0..pairs).step_by(KC_PAIRS) {
                let chunk = (pairs - q0).min(KC_PAIRS);
                for j0 in cols.clone().step_by(NR) {
                    let panel =
                        self.data[(j0 / NR) * panel_len + (ks.start / 2 + q0) * NR..].as_ptr();
                    for t in 0..row_tiles {
                        let i0 = t * MR;
                        let mr = (m - i0).min(MR);
                        let (a_rows, pair_step) = if in_place {
                            // Rows past m repeat the last one: read, never stored.
                            let row = |r: usize| a_pairs.add((i0 + r.min(mr - 1)) * pairs + q0);
                            (std::array::from_fn(|r| row(r) as *const u16), 2)
                        } else {
                            let words = a_pairs.add(t * MR * pairs + q0 * MR) as *const u16;
                            (std::array::from_fn(|r| words.add(2 * r)), 2 * MR)
                        };
                        // SAFETY: a native backend runs only where the CPU has AVX512-BF16
                        // (PackedB::new); A's rows hold `chunk` pairs from q0, as does the panel;
                        // the tile's rows and columns lie inside dst (the caller's contract).
                        tile(
                            chunk,
                            a_rows,
                            pair_step,
                            panel,
                            dst.add(i0 * ldc + (j0 - cols.start)),
                            ldc,
                            mr,
                            (cols.end - j0).min(NR),
                            q0 == 0 && !accumulate,
                        );
                    }
                }
            }
        });
    }
}

/// Packs rows `i0..i0 + mr` and k `p0..p0 + kc` of fp32 A, rounded to bf16, as `[pair][MR]`
/// words (zero beyond): each word holds two consecutive k, the lower in the low half, as
/// `vdpbf16ps` pairs them.
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
) {
    let pairs = kc.div_ceil(2);
    let dst = &mut dst[..pairs * MR];
    let at = |i: usize, p: usize| u32::from(to_bf16(a[(i0 + i) * rs + (p0 + p) * cs]));
    // Columns of A contiguous (a transposed operand, as in weight gradients): vector code.
    if cfg!(target_arch = "x86_64") && vector_packing(backend) && rs == 1 {
        // SAFETY: the native backend runs only where the CPU has AVX512-BF16 (and so AVX-512
        // BW and VL); rows i0..i0 + mr and k p0..p0 + kc of A lie inside `a` (asserted by
        // `gemm_with`), and `dst` holds `kc / 2 · MR` words.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            pack_a_columns_avx512(dst, &a[p0 * cs + i0..], cs, mr, kc)
        };
    } else {
        for q in 0..kc / 2 {
            for r in 0..mr {
                dst[q * MR + r] = at(r, 2 * q) | (at(r, 2 * q + 1) << 16);
            }
            dst[q * MR + mr..(q + 1) * MR].fill(0);
        }
    }
    if kc % 2 == 1 {
        let last = &mut dst[(pairs - 1) * MR..];
        last.fill(0);
        for (r, word) in last.iter_mut().enumerate().take(mr) {
            *word = at(r, kc - 1);
        }
    }
}

/// The pairs of [`pack_a`] for A whose columns are contiguous: `a` starts at row 0, k 0 of the
/// block and k advances by `cs`.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL and AVX512-BF16; `a` holds `mr` values from each k start
/// `p · cs` (p < kc); `dst` holds `kc / 2 · MR` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_a_columns_avx512(dst: &mut [u32], a: &[f32], cs: usize, mr: usize, kc: usize) {
    use std::arch::x86_64::*;
    debug_assert!(mr <= MR && MR <= 8);
    // Word r of a pair: (k even, row r) low, (k odd, row r) high.
    let interleave = _mm256_setr_epi16(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    // Masked loads read only the tile's rows (never past the end of A).
    let rows = ((1u32 << mr) - 1) as __mmask8;
    for q in 0..kc / 2 {
        let even = _mm256_maskz_loadu_ps(rows, a.as_ptr().add(2 * q * cs));
        let odd = _mm256_maskz_loadu_ps(rows, a.as_ptr().add((2 * q + 1) * cs));
        let halves = std::mem::transmute::<__m256bh, __m256i>(_mm256_cvtne2ps_pbh(odd, even));
        let words = _mm256_permutexvar_epi16(interleave, halves);
        _mm256_mask_storeu_epi32(
            dst.as_mut_ptr().add(q * MR) as *mut i32,
            ((1u32 << MR) - 1) as __mmask8,
            words,
        );
    }
}

/// Packs k `p0..p0 + kc` and columns `j0..j0 + nr` of fp32 B, rounded to bf16, as
/// `[pair][NR]` words (zero beyond).
#[allow(clippy::too_many_arguments)]
fn pack_b(
    backend: Backend,
    dst: &mut [u32],
    b: &[f32],
    (rs, cs): (usize, usize),
    p0: usize,
    kc: usize,
    j0: usize,
    nr: usize,
) {
    let pairs = kc.div_ceil(2);
    if nr < NR {
        dst.fill(0);
    }
    let at = |p: usize, j: usize| u32::from(to_bf16(b[(p0 + p) * rs + (j0 + j) * cs]));
    if cfg!(target_arch = "x86_64") && vector_packing(backend) && (cs == 1 || rs == 1) {
        // SAFETY: the native backend runs only where the CPU has AVX512-BF16 (and so AVX-512
        // BW and VL); k p0..p0 + kc and columns j0..j0 + nr of B lie inside `b` (asserted by
        // `gemm_with`), and `dst` holds `pairs · NR` words.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if cs == 1 {
                pack_b_rows_avx512(dst, &b[p0 * rs + j0..], rs, kc, nr);
            } else {
                pack_b_columns_avx512(dst, &b[p0 + j0 * cs..], cs, kc, nr);
            }
        }
    } else {
        for q in 0..kc / 2 {
            for j in 0..nr {
                dst[q * NR + j] = at(2 * q, j) | (at(2 * q + 1, j) << 16);
            }
        }
    }
    if kc % 2 == 1 {
        for j in 0..nr {
            dst[(pairs - 1) * NR + j] = at(kc - 1, j);
        }
    }
}

/// The pairs of [`pack_b`] for B whose rows are contiguous (`b` starts at k 0, column 0 of the
/// block; row stride `rs`): two rows rounded and interleaved 16 columns at a time.
///
/// # Safety
/// The CPU has AVX-512F/BW and AVX512-BF16; `b` holds `nr` values from each row start
/// `p · rs` (p < kc); `dst` holds `kc / 2 · NR` words, `nr <= NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_b_rows_avx512(dst: &mut [u32], b: &[f32], rs: usize, kc: usize, nr: usize) {
    use std::arch::x86_64::*;
    debug_assert!(nr <= NR && dst.len() >= kc / 2 * NR);
    // Word j: (k even, column j) low, (k odd, column j) high.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for q in 0..kc / 2 {
        let (even, odd) = (b.as_ptr().add(2 * q * rs), b.as_ptr().add((2 * q + 1) * rs));
        let out = dst.as_mut_ptr().add(q * NR);
        for j in (0..nr).step_by(16) {
            // Masked loads read only the block's columns; the words past nr store as zero.
            let cols = ((1u32 << (nr - j).min(16)) - 1) as __mmask16;
            let lo = _mm512_maskz_loadu_ps(cols, even.add(j));
            let hi = _mm512_maskz_loadu_ps(cols, odd.add(j));
            let halves = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(
                out.add(j) as *mut _,
                _mm512_permutexvar_epi16(interleave, halves),
            );
        }
    }
}

/// The pairs of [`pack_b`] for B whose columns are contiguous (a transposed operand, as in
/// input gradients; `b` starts at k 0, column 0 of the block, column stride `cs`): squares of
/// 16 columns × 16 pairs, each column's 32 values of k rounded into one vector of 16 words,
/// then the square transposed so that each pair's 16 columns store as one vector.
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; `b` holds `kc` values from each column start
/// `j · cs` (j < nr); `dst` holds `kc / 2 · NR` words, `nr <= NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_b_columns_avx512(dst: &mut [u32], b: &[f32], cs: usize, kc: usize, nr: usize) {
    use std::arch::x86_64::*;
    debug_assert!(nr <= NR && dst.len() >= kc / 2 * NR);
    let full_pairs = kc / 2;
    for j0 in (0..nr).step_by(16) {
        let cols = (nr - j0).min(16);
        for q in (0..full_pairs).step_by(16) {
            let values = 2 * (full_pairs - q).min(16);
            let mask =
                |from: usize| ((1u64 << values.saturating_sub(from).min(16)) - 1) as __mmask16;
            // Masked loads never touch values past the pairs (a mask of 0 reads nothing);
            // columns past nr stay zero, as their words in the panel must.
            let columns: [__m512; 16] = std::array::from_fn(|c| {
                if c >= cols {
                    return _mm512_setzero_ps();
                }
                let col = b.as_ptr().add((j0 + c) * cs + 2 * q);
                let first = _mm512_maskz_loadu_ps(mask(0), col);
                let second = _mm512_maskz_loadu_ps(mask(16), col.wrapping_add(16));
                std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(second, first))
            });
            let pairs = crate::f32_gemm::transpose16(columns);
            for (p, &words) in pairs.iter().enumerate().take(values / 2) {
                _mm512_storeu_ps(dst.as_mut_ptr().add((q + p) * NR + j0) as *mut f32, words);
            }
        }
    }
}

/// One `mr × nr` tile of dst (at most MR × NR): `c = a · b` when `overwrite`, else
/// `c += a · b`. Row `r` of A has its k pair `q` (two bf16, the lower k in the low half) at
/// `a_rows[r] + q · pair_step` (in bf16 units); B is a packed panel.
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; each row of A holds `pairs` pairs so laid out and `b`
/// `pairs · NR` words; rows `0..mr` (stride `ldc`) and columns `0..nr` of `c` are valid for
/// reads and writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    pairs: usize,
    a_rows: [*const u16; MR],
    pair_step: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    const V: usize = NR / 16;
    let mut acc = [[_mm512_setzero_ps(); V]; MR];
    for q in 0..pairs {
        let bq = b.add(q * NR);
        let mut bv = [_mm512_setzero_si512(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(bq.add(16 * v) as *const _);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = (a_rows[r].add(q * pair_step) as *const u32).read_unaligned();
            let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_dpbf16_ps(*acc, ar, std::mem::transmute::<__m512i, __m512bh>(bv));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(mr) {
        let row = c.add(r * ldc);
        for (v, &acc) in acc.iter().enumerate() {
            let cols = nr.saturating_sub(16 * v).min(16);
            if cols == 0 {
                break;
            }
            let p = row.add(16 * v);
            if cols == 16 {
                let sum = if overwrite {
                    acc
                } else {
                    _mm512_add_ps(_mm512_loadu_ps(p), acc)
                };
                _mm512_storeu_ps(p, sum);
            } else {
                let mask: __mmask16 = ((1u32 << cols) - 1) as __mmask16;
                let sum = if overwrite {
                    acc
                } else {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), acc)
                };
                _mm512_mask_storeu_ps(p, mask, sum);
            }
        }
    }
}

/// One step of `vdpbf16ps` on one lane, as Intel documents it: the odd (high) pair member
/// first, then the even one, each a fused multiply-add with subnormal inputs read as zero, the
/// result rounded to nearest-even and a subnormal result flushed to zero.
#[inline(always)]
fn dot_pair_step(sum: f32, a: u32, b: u32) -> f32 {
    let zero_subnormal = |x: f32| {
        if x.is_subnormal() {
            0f32.copysign(x)
        } else {
            x
        }
    };
    let half = |word: u32, high: bool| {
        zero_subnormal(from_bf16((word >> if high { 16 } else { 0 }) as u16))
    };
    let step = |sum: f32, high: bool| {
        zero_subnormal(half(a, high).mul_add(half(b, high), zero_subnormal(sum)))
    };
    step(step(sum, true), false)
}

/// The scalar twin of [`tile`]: the same sums in the same order, one lane at a time.
///
/// # Safety
/// As for [`tile`], except that any CPU runs it.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_emulated(
    pairs: usize,
    a_rows: [*const u16; MR],
    pair_step: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for q in 0..pairs {
        let bq = std::slice::from_raw_parts(b.add(q * NR), NR);
        for (r, acc) in acc.iter_mut().enumerate().take(mr) {
            let pair = (a_rows[r].add(q * pair_step) as *const u32).read_unaligned();
            for (acc, &bw) in acc.iter_mut().zip(bq) {
                *acc = dot_pair_step(*acc, pair, bw);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(mr) {
        let row = std::slice::from_raw_parts_mut(c.add(r * ldc), nr);
        for (out, &acc) in row.iter_mut().zip(acc) {
            *out = if overwrite { acc } else { *out + acc };
        }
    }
}

/// Never called: `gemm_with` refuses the native backend without AVX512-BF16.
///
/// # Safety
/// None needed; it only panics.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    _: usize,
    _: [*const u16; MR],
    _: usize,
    _: *const u32,
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("bf16 matmul is only offered on x86-64 CPUs with AVX512-BF16")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        // Subnormals flush to signed zero, as the hardware conversion does.
        assert_eq!(to_bf16(-1e-40), 0x8000);
    }

    #[test]
    fn vector_rounding_matches_scalar() {
        if !native() {
            eprintln!("skipped: this CPU has no AVX512-BF16 (the emulation rounds with to_bf16)");
            return;
        }
        let mut src: Vec<f32> = values(1000, 3).iter().map(|v| v * 1e3).collect();
        src.extend([
            1.0 + 1.0 / 256.0,
            1e-40,
            -1e-40,
            f32::NAN,
            f32::INFINITY,
            f32::MAX,
            -0.0,
        ]);
        src.extend([
            f32::from_bits(0x7FFF_FFFF),
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0x0080_8000),
        ]);
        let mut dst = vec![0u16; src.len()];
        convert(Backend::Native, &src, &mut dst);
        for (x, h) in src.iter().zip(&dst) {
            assert_eq!(*h, to_bf16(*x), "{:08x}", x.to_bits());
        }
    }

    /// The product of the bf16-rounded operands in f64, for comparison.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        lhs: &[f32],
        (ars, acs): (usize, usize),
        rhs: &[f32],
        (brs, bcs): (usize, usize),
    ) -> Vec<f64> {
        let r = |x: f32| f64::from(from_bf16(to_bf16(x)));
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| r(lhs[i * ars + p * acs]) * r(rhs[p * brs + j * bcs]))
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_the_rounded_product_for_every_layout_and_edge() {
        let backends: Vec<Backend> = [
            Backend::Native,
            Backend::Emulated,
            Backend::Amx,
            Backend::AmxEmulated,
        ]
        .into_iter()
        .filter(|&b| b.runs_here() && (b != Backend::Amx || amx_opted_in()))
        .collect();
        eprintln!("bf16 GEMM checked on {backends:?} (the others do not run on this CPU)");
        // Sizes straddle the tiles (6 × 64; AMX: 32 × 32 blocks of 16 × 16 tiles, 32 k a step),
        // the k block (384) and the column block (512), with enough rows for many panels of A;
        // even k (A read in place when its rows are contiguous) and odd k (A packed), down to a
        // last k block of one pair.
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 65, 3),
            (13, 130, 385),
            (50, 520, 800),
            (6, 64, 2),
            (200, 70, 391),
            (14, 100, 770),
            (32, 32, 32),
            (33, 17, 33),
            (16, 48, 64),
        ] {
            for lhs_t in [false, true] {
                for rhs_t in [false, true] {
                    let lhs = values(m * k, (m * 31 + k) as u32);
                    let rhs = values(k * n, (n * 17 + k) as u32);
                    let ls = if lhs_t { (1, m) } else { (k, 1) };
                    let rs = if rhs_t { (1, k) } else { (n, 1) };
                    let want = reference(m, n, k, &lhs, ls, &rhs, rs);
                    let start = values(m * n, 7);
                    for (&backend, accumulate) in
                        backends.iter().flat_map(|b| [(b, false), (b, true)])
                    {
                        let mut dst = start.clone();
                        gemm_with(
                            backend, m, n, k, &mut dst, n, accumulate, &lhs, ls, &rhs, rs,
                        );
                        for i in 0..m * n {
                            let base = if accumulate { f64::from(start[i]) } else { 0.0 };
                            let err = (f64::from(dst[i]) - base - want[i]).abs();
                            // fp32 summation of k products of size ≤ 1.
                            assert!(
                                err <= 1e-6 * (k as f64 + 1.0),
                                "m {m} n {n} k {k} lhsᵀ {lhs_t} rhsᵀ {rhs_t} acc {accumulate}: element {i} off by {err}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Products over ranges of one packed B (attention's use): even and odd k ends, ranges
    /// across several k chunks and column panels, a partial last panel, A with contiguous rows
    /// (scaled) or transposed, both layouts of B; the native tile agrees with its emulation
    /// bit for bit.
    #[test]
    fn products_over_a_packed_b_match_the_rounded_product() {
        let backends: Vec<Backend> = [Backend::Native, Backend::Emulated, Backend::AmxEmulated]
            .into_iter()
            .filter(|b| b.runs_here())
            .collect();
        // 405 pairs: not a multiple of the 16 a transposed B is packed by.
        let (k, n) = (811, 130);
        let b_values = values((k + 5) * (n + 3), 11);
        for b_strides in [(n + 3, 1), (1, k + 5)] {
            for &(m, ref ks, ref cols) in &[
                (5, 0..811, 0..130),
                (33, 64..811, 64..130),
                (7, 2..390, 0..64),
                (40, 100..131, 128..130),
                (1, 0..1, 0..1),
                (12, 4..4, 0..70),
            ] {
                for lhs_t in [false, true] {
                    let kc = ks.len();
                    let (a_strides, alpha) = if lhs_t {
                        ((1, m + 1), 1.0)
                    } else {
                        // Not a power of two: scaled before rounding differs from after.
                        ((kc + 2, 1), 1.0 / 80f32.sqrt())
                    };
                    let a = values((m + 1) * (kc + 2), (m * 7 + kc) as u32);
                    let scaled: Vec<f32> = a.iter().map(|x| x * alpha).collect();
                    let b_at = ks.start * b_strides.0 + cols.start * b_strides.1;
                    let (nc, ldc) = (cols.len(), cols.len() + 3);
                    let want =
                        reference(m, nc, kc, &scaled, a_strides, &b_values[b_at..], b_strides);
                    let start = values(m * ldc, 5);
                    let mut native_bits = Vec::new();
                    for (&backend, accumulate) in
                        backends.iter().flat_map(|b| [(b, false), (b, true)])
                    {
                        let mut packed = PackedB::new(backend);
                        let mut dst = start.clone();
                        // SAFETY: B's and A's strided extents lie inside their vectors; dst
                        // holds m rows of ldc.
                        unsafe {
                            packed.pack(k, n, b_values.as_ptr(), b_strides);
                            packed.product(
                                m,
                                dst.as_mut_ptr(),
                                ldc,
                                accumulate,
                                a.as_ptr(),
                                a_strides,
                                ks.clone(),
                                cols.clone(),
                                alpha,
                            );
                        }
                        for i in 0..m {
                            for j in 0..ldc {
                                let (got, was) = (dst[i * ldc + j], start[i * ldc + j]);
                                if j >= nc {
                                    assert_eq!(got, was, "column {j} past the range written");
                                    continue;
                                }
                                let base = if accumulate { f64::from(was) } else { 0.0 };
                                let err = (f64::from(got) - base - want[i * nc + j]).abs();
                                assert!(
                                    err <= 1e-6 * (kc as f64 + 1.0),
                                    "{backend:?} Bᵀ {} Aᵀ {lhs_t} m {m} k {ks:?} cols {cols:?} acc {accumulate}: ({i}, {j}) off by {err}",
                                    b_strides.0 == 1
                                );
                            }
                        }
                        let bits: Vec<u32> = dst.iter().map(|x| x.to_bits()).collect();
                        if backend == Backend::Native {
                            native_bits.push((accumulate, bits));
                        } else if let Some((_, native)) =
                            native_bits.iter().find(|(acc, _)| *acc == accumulate)
                        {
                            assert!(native == &bits, "{backend:?} differs from the tile");
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "starts inside a packed pair")]
    fn products_over_a_packed_b_start_on_a_pair() {
        let mut packed = PackedB::new(Backend::Emulated);
        let (a, b, mut dst) = (vec![1.0; 4], vec![1.0; 16], vec![0.0; 4]);
        // SAFETY: every operand lies inside its vector.
        unsafe {
            packed.pack(4, 4, b.as_ptr(), (4, 1));
            packed.product(
                1,
                dst.as_mut_ptr(),
                4,
                false,
                a.as_ptr(),
                (4, 1),
                1..3,
                0..4,
                1.0,
            );
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        for backend in [backend().unwrap_or(Backend::Emulated), Backend::AmxEmulated] {
            same_bits_for_any_thread_count(backend);
        }
    }

    /// The AMX instructions are tested only where asked for (`KIEM_BF16=amx`) and the CPU runs
    /// them: until they have run on such a CPU, a machine that has them must not fail the
    /// suite for an opt-in path (their packing and blocking are tested everywhere through
    /// `Backend::AmxEmulated`).
    fn amx_opted_in() -> bool {
        let opted = backend() == Some(Backend::Amx);
        if !opted && Backend::Amx.runs_here() {
            eprintln!("this CPU runs AMX-BF16: KIEM_BF16=amx tests its instructions too");
        }
        opted
    }

    /// Some virtual machines are reported to lose tile registers when a thread is preempted;
    /// on such a machine repeated products under more threads than cores would differ.
    #[test]
    fn amx_products_repeat_exactly_under_preemption() {
        if !amx_opted_in() {
            eprintln!("skipped: AMX not asked for (KIEM_BF16=amx) or not run by this CPU");
            return;
        }
        let (m, n, k) = (512, 512, 1024);
        let (lhs, rhs) = (values(m * k, 5), values(k * n, 6));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4 * std::thread::available_parallelism().map_or(2, |p| p.get()))
            .build()
            .unwrap();
        let product = || {
            let mut dst = vec![0f32; m * n];
            pool.install(|| {
                gemm_with(
                    Backend::Amx,
                    m,
                    n,
                    k,
                    &mut dst,
                    n,
                    false,
                    &lhs,
                    (k, 1),
                    &rhs,
                    (n, 1),
                )
            });
            dst.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let first = product();
        for round in 0..30 {
            assert!(
                product() == first,
                "AMX product {round} differs from the first"
            );
        }
    }

    fn same_bits_for_any_thread_count(backend: Backend) {
        let (m, n, k) = (100, 300, 500);
        let (lhs, rhs) = (values(m * k, 1), values(k * n, 2));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut dst = vec![0f32; m * n];
            pool.install(|| {
                gemm_with(
                    backend,
                    m,
                    n,
                    k,
                    &mut dst,
                    n,
                    false,
                    &lhs,
                    (k, 1),
                    &rhs,
                    (n, 1),
                )
            });
            dst
        };
        assert_eq!(run(1), run(3), "{backend:?}");
    }

    /// The emulation is the instruction's arithmetic, bit for bit, on ordinary values and on
    /// the edges (subnormal inputs and sums, cancellation, huge values, NaN), for every
    /// operand layout (each rounded and packed by its own vector code) and odd and even k.
    #[test]
    fn the_emulation_matches_the_instructions_bit_for_bit() {
        if !native() {
            eprintln!("skipped: this CPU has no AVX512-BF16 to compare the emulation with");
            return;
        }
        for (m, n, k, lhs_t, rhs_t, accumulate) in [(13, 70, 101), (13, 70, 100), (7, 17, 67)]
            .into_iter()
            .flat_map(|(m, n, k)| {
                [false, true].into_iter().flat_map(move |lt| {
                    [false, true].into_iter().flat_map(move |rt| {
                        [false, true]
                            .into_iter()
                            .map(move |acc| (m, n, k, lt, rt, acc))
                    })
                })
            })
        {
            let mut lhs = values(m * k, 11);
            let mut rhs = values(k * n, 12);
            for (i, x) in lhs.iter_mut().enumerate().step_by(7) {
                *x = [1e-39, -3e38, 1e30, 2e-38, 0.0, 1.0 + 1.0 / 256.0][i % 6];
            }
            for (i, x) in rhs.iter_mut().enumerate().step_by(5) {
                *x = [1e-38, 3e38, -1e-30, 1.5e-38, f32::NAN][i % 5];
            }
            let (ls, rs) = (
                if lhs_t { (1, m) } else { (k, 1) },
                if rhs_t { (1, k) } else { (n, 1) },
            );
            let start: Vec<f32> = values(m * n, 3).iter().map(|v| v * 1e-38).collect();
            let mut native_out = start.clone();
            let mut emulated_out = start.clone();
            for (backend, out) in [
                (Backend::Native, &mut native_out),
                (Backend::Emulated, &mut emulated_out),
            ] {
                gemm_with(backend, m, n, k, out, n, accumulate, &lhs, ls, &rhs, rs);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&native_out),
                bits(&emulated_out),
                "m {m} n {n} k {k} lhsᵀ {lhs_t} rhsᵀ {rhs_t} accumulate {accumulate}"
            );
        }
    }
}
