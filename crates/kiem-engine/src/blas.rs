//! An optional system BLAS for the fp32 products, loaded at run time on request.
//!
//! kiem's own kernel ([`crate::f32_gemm`]) computes fp32 products by default. With
//! `KIEM_BLAS=openblas`, `libopenblas.so.0` (Debian: `libopenblas0`) is loaded with `dlopen`
//! and used instead, for comparison (bench/RESULTS.md); kiem does not link it. Results agree
//! to float rounding.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

type SgemmFn = unsafe extern "C" fn(
    order: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);
type SetThreadsFn = unsafe extern "C" fn(i32);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

pub struct Blas {
    _library: libloading::Library,
    sgemm: SgemmFn,
    set_threads: Option<SetThreadsFn>,
    threads: AtomicUsize,
    pub name: String,
}

/// The BLAS fp32 products go through: OpenBLAS when `KIEM_BLAS=openblas` and it loads.
pub fn blas() -> Option<&'static Blas> {
    static CHOSEN: OnceLock<bool> = OnceLock::new();
    if *CHOSEN.get_or_init(|| std::env::var("KIEM_BLAS").is_ok_and(|v| v == "openblas")) {
        openblas()
    } else {
        None
    }
}

/// OpenBLAS loaded from the system, if present (whether or not products use it).
pub fn openblas() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        ["libopenblas.so.0", "libopenblas.so"]
            .iter()
            .find_map(|name| {
                // SAFETY: loading OpenBLAS runs its (well-behaved) initializers; the symbols are
                // looked up with their documented C signatures.
                unsafe {
                    let library = libloading::Library::new(name).ok()?;
                    let sgemm = *library.get::<SgemmFn>(b"cblas_sgemm\0").ok()?;
                    let set_threads = library
                        .get::<SetThreadsFn>(b"openblas_set_num_threads\0")
                        .ok()
                        .map(|f| *f);
                    Some(Blas {
                        _library: library,
                        sgemm,
                        set_threads,
                        threads: AtomicUsize::new(0),
                        name: name.to_string(),
                    })
                }
            })
    })
    .as_ref()
}

/// Name of the matmul backend in use, for logs and benchmarks.
pub fn backend_name() -> String {
    match blas() {
        Some(b) => format!("{} (system BLAS)", b.name),
        None => crate::f32_gemm::kernel().name.to_string(),
    }
}

impl Blas {
    /// `dst[m, n] (+)= beta_scale · lhs[m, k] · rhs[k, n]` with row-major `dst` (row stride `ldc`) and each
    /// operand either row-major `(ld, 1)` or transposed `(1, ld)`. Returns false when the
    /// strides fit neither (the caller then uses the `gemm` crate).
    ///
    /// With `serial`, the call stays on the current thread (for use inside parallel tasks).
    ///
    /// # Safety
    /// Every element addressed through the strides must lie inside the pointed-to buffers, and
    /// nothing else may write the addressed part of `dst` during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm_raw(
        &self,
        serial: bool,
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
        beta_scale: f32,
    ) -> bool {
        let layout = |(rs, cs): (usize, usize)| match (rs, cs) {
            (ld, 1) => Some((NO_TRANS, ld)),
            (1, ld) => Some((TRANS, ld)),
            _ => None,
        };
        let (Some((ta, lda)), Some((tb, ldb))) = (layout(lhs_strides), layout(rhs_strides)) else {
            return false;
        };
        let fits = |x: usize| i32::try_from(x).is_ok();
        if ![m, n, k, lda, ldb, ldc].into_iter().all(fits) {
            return false;
        }
        // BLAS runs single-threaded inside rayon tasks that split the rows of dst: one thread
        // pool for all of kiem (OpenBLAS's own threads would spin beside rayon's), and a fixed
        // split keeps results deterministic.
        if let Some(set) = self.set_threads {
            if self.threads.swap(1, Ordering::Relaxed) != 1 {
                // SAFETY: documented OpenBLAS entry point taking the thread count.
                unsafe { set(1) };
            }
        }
        let tasks = if serial {
            1
        } else {
            rayon::current_num_threads().min(m.div_ceil(16)).max(1)
        };
        let rows_per_task = m.div_ceil(tasks);
        let lhs_row_step = if ta == NO_TRANS { lda } else { 1 };
        let (lhs_ptr, rhs_ptr, dst_ptr) = (lhs as usize, rhs as usize, dst as usize);
        let beta = if accumulate { 1.0 } else { 0.0 };
        let sgemm = self.sgemm;
        let run = |task: usize| {
            let m0 = task * rows_per_task;
            let rows = rows_per_task.min(m - m0);
            // SAFETY: the caller guarantees every addressed element lies inside the buffers;
            // each task writes its own rows m0..m0+rows of dst, which does not alias the inputs.
            unsafe {
                sgemm(
                    ROW_MAJOR,
                    ta,
                    tb,
                    rows as i32,
                    n as i32,
                    k as i32,
                    beta_scale,
                    (lhs_ptr as *const f32).add(m0 * lhs_row_step),
                    lda as i32,
                    rhs_ptr as *const f32,
                    ldb as i32,
                    beta,
                    (dst_ptr as *mut f32).add(m0 * ldc),
                    ldc as i32,
                );
            }
        };
        if tasks == 1 {
            run(0);
        } else {
            use rayon::prelude::*;
            (0..tasks).into_par_iter().for_each(run);
        }
        true
    }
}
