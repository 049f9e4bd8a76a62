//! Weight matrices that never change again, stored in fewer bytes than fp32 (bf16 or a
//! quantized kind): a LoRA run's frozen base (QLoRA), or a decoding model's weights (read from
//! a quantized GGUF file's blocks, or quantized at load). Products read them directly (thin
//! ones, and quantized prefill where the CPU has an integer form) or dequantized on the fly;
//! the fp32 copy's memory goes back to the system.

use rayon::prelude::*;

use crate::bf16_gemm::{from_bf16, to_bf16};
use crate::kernels::{
    matmul_thin_bf16, matmul_thin_quant, matmul_wide_quant, wide_quant_native, DecodingWeights,
    QuantMatrix,
};

/// One matrix, `[c_out, c_in]`.
#[derive(Debug, Clone)]
pub(crate) enum FrozenMatrix {
    Bf16 {
        w: Vec<u16>,
        c_in: usize,
        c_out: usize,
    },
    Quant(QuantMatrix),
    /// Row ranges stored in different forms, one after another (a GGUF file's q, k and v in
    /// different types, fused into one product).
    Stacked(Vec<FrozenMatrix>),
}

impl FrozenMatrix {
    /// `w` is `[c_out, c_in]`; `None` where the form needs whole blocks per row and the rows
    /// are not, or for fp32 (nothing to store).
    pub fn new(weights: DecodingWeights, w: &[f32], c_in: usize, c_out: usize) -> Option<Self> {
        match weights {
            DecodingWeights::Fp32 => None,
            DecodingWeights::Bf16 => Some(FrozenMatrix::Bf16 {
                w: w.par_iter().map(|&x| to_bf16(x)).collect(),
                c_in,
                c_out,
            }),
            quantized => QuantMatrix::quantize(quantized.quant_kind()?, w, c_in, c_out)
                .map(FrozenMatrix::Quant),
        }
    }

    /// Parts stacked by rows (one part is itself; quantized parts of one kind are joined).
    pub fn stack(mut parts: Vec<FrozenMatrix>) -> Self {
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        let joinable = match parts.first() {
            Some(FrozenMatrix::Quant(first)) => parts.iter().all(|p| {
                matches!(p, FrozenMatrix::Quant(q) if q.kind == first.kind && q.c_in == first.c_in)
            }),
            _ => false,
        };
        if !joinable {
            return FrozenMatrix::Stacked(parts);
        }
        let mut quant = parts.into_iter().map(|p| match p {
            FrozenMatrix::Quant(q) => q,
            _ => unreachable!("checked above"),
        });
        let mut joined = quant.next().expect("parts");
        for q in quant {
            joined.append_rows(q);
        }
        FrozenMatrix::Quant(joined)
    }

    /// Writes the fp32 values into `gpt`'s parameters at `range` as `[out, in]` (a Llama
    /// matrix, whose files' layout decoding reads as it is): a matrix that stays fp32.
    pub fn dequantize_into_params(&self, gpt: &mut crate::Gpt, range: std::ops::Range<usize>) {
        let n = self.len().min(range.len());
        let mut values = vec![0f32; self.len()];
        self.dequantize_into(&mut values);
        gpt.params[range.start..range.start + n].copy_from_slice(&values[..n]);
    }

    /// The matrix with its rows reordered: row `i` is this one's row `order[i]`.
    pub fn with_row_order(&self, order: &[usize]) -> Self {
        match self {
            FrozenMatrix::Bf16 { w, c_in, c_out } => FrozenMatrix::Bf16 {
                w: order
                    .iter()
                    .flat_map(|&r| &w[r * c_in..(r + 1) * c_in])
                    .copied()
                    .collect(),
                c_in: *c_in,
                c_out: *c_out,
            },
            FrozenMatrix::Quant(q) => FrozenMatrix::Quant(q.with_row_order(order)),
            FrozenMatrix::Stacked(parts) => FrozenMatrix::Stacked(
                // Rows of one part at a time keep their form; a permutation across parts
                // (never asked for) would need one form.
                {
                    let mut at = 0;
                    let mut out = Vec::new();
                    for part in parts {
                        let n = part.c_out();
                        let local: Vec<usize> = order[at..at + n].iter().map(|&r| r - at).collect();
                        assert!(
                            local.iter().all(|&r| r < n),
                            "with_row_order: rows move across stacked parts"
                        );
                        out.push(part.with_row_order(&local));
                        at += n;
                    }
                    out
                },
            ),
        }
    }

    /// The matrix with zero rows added up to `rows` (a vocabulary padded for the kernels).
    pub fn padded_to_rows(self, rows: usize) -> Self {
        let extra = rows.saturating_sub(self.c_out());
        if extra == 0 {
            return self;
        }
        let c_in = self.c_in();
        let zeros = match &self {
            FrozenMatrix::Quant(q) => FrozenMatrix::Quant(
                QuantMatrix::zeros(q.kind, c_in, extra).expect("the rows are whole blocks"),
            ),
            _ => FrozenMatrix::Bf16 {
                w: vec![0; c_in * extra],
                c_in,
                c_out: extra,
            },
        };
        FrozenMatrix::stack(vec![self, zeros])
    }

    /// The forms the matrix is stored in (`bf16`, `q8_0` ...).
    pub fn forms(&self) -> Vec<&'static str> {
        match self {
            FrozenMatrix::Bf16 { .. } => vec!["bf16"],
            FrozenMatrix::Quant(q) => vec![q.kind.name()],
            FrozenMatrix::Stacked(parts) => parts.iter().flat_map(FrozenMatrix::forms).collect(),
        }
    }

    pub fn c_in(&self) -> usize {
        match self {
            FrozenMatrix::Bf16 { c_in, .. } => *c_in,
            FrozenMatrix::Quant(q) => q.c_in,
            FrozenMatrix::Stacked(parts) => parts[0].c_in(),
        }
    }

    pub fn c_out(&self) -> usize {
        match self {
            FrozenMatrix::Bf16 { c_out, .. } => *c_out,
            FrozenMatrix::Quant(q) => q.c_out,
            FrozenMatrix::Stacked(parts) => parts.iter().map(FrozenMatrix::c_out).sum(),
        }
    }

    /// Row `j` (`c_in` values) into `out`: an embedding row.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        match self {
            FrozenMatrix::Bf16 { w, c_in, .. } => {
                for (o, &h) in out.iter_mut().zip(&w[j * c_in..(j + 1) * c_in]) {
                    *o = from_bf16(h);
                }
            }
            FrozenMatrix::Quant(q) => q.dequantize_row(j, out),
            FrozenMatrix::Stacked(parts) => {
                let mut j = j;
                for part in parts {
                    if j < part.c_out() {
                        return part.dequantize_row(j, out);
                    }
                    j -= part.c_out();
                }
                panic!("dequantize_row: row out of range");
            }
        }
    }

    /// The fp32 values, `[c_out, c_in]`.
    #[cfg(test)]
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.dequantize_into(&mut out);
        out
    }

    fn len(&self) -> usize {
        self.c_in() * self.c_out()
    }

    fn dequantize_into(&self, out: &mut [f32]) {
        match self {
            FrozenMatrix::Bf16 { w, .. } => out
                .par_iter_mut()
                .zip(w)
                .for_each(|(o, &h)| *o = from_bf16(h)),
            FrozenMatrix::Quant(q) => q.dequantize_into(out),
            FrozenMatrix::Stacked(parts) => {
                let mut rest = out;
                for part in parts {
                    let (this, next) = rest.split_at_mut(part.len());
                    part.dequantize_into(this);
                    rest = next;
                }
            }
        }
    }

    /// Runs `f` on the fp32 values (`[c_out, c_in]`), dequantized into a buffer this thread
    /// keeps between calls: a product's many calls reuse its pages instead of faulting in
    /// fresh ones each time.
    pub fn with_dequantized<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        thread_local! {
            static BUFFER: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        crate::kernels::with_thread_buffer(&BUFFER, self.len(), |w| {
            self.dequantize_into(w);
            f(w)
        })
    }

    pub fn bytes(&self) -> usize {
        match self {
            FrozenMatrix::Bf16 { w, .. } => 2 * w.len(),
            FrozenMatrix::Quant(q) => q.bytes(),
            FrozenMatrix::Stacked(parts) => parts.iter().map(FrozenMatrix::bytes).sum(),
        }
    }

    /// Reads every stored byte once, on all threads (for the bandwidth bound).
    pub fn stream(&self) -> u32 {
        match self {
            FrozenMatrix::Bf16 { w, .. } => w
                .par_chunks(1 << 16)
                .map(crate::kernels::streaming_read_u16)
                .reduce(|| 0, u32::wrapping_add),
            FrozenMatrix::Quant(q) => q.stream(),
            FrozenMatrix::Stacked(parts) => parts
                .iter()
                .map(FrozenMatrix::stream)
                .fold(0, u32::wrapping_add),
        }
    }

    /// `out = inp · Wᵀ (+ bias)` for at most [`crate::kernels::SKINNY_ROWS`] rows, reading the
    /// stored form directly (decoding).
    pub fn thin_product(&self, out: &mut [f32], inp: &[f32], bias: Option<&[f32]>) {
        match self {
            FrozenMatrix::Bf16 { w, c_in, c_out } => {
                matmul_thin_bf16(out, inp, w, bias, *c_in, *c_out)
            }
            FrozenMatrix::Quant(q) => matmul_thin_quant(out, inp, q, bias, q.c_in, q.c_out),
            FrozenMatrix::Stacked(parts) => {
                self.by_parts(parts, out, inp, bias, |part, out, inp, bias| {
                    part.thin_product(out, inp, bias);
                    true
                });
            }
        }
    }

    /// Whether [`FrozenMatrix::wide_product`] multiplies this matrix in integers on this CPU.
    pub fn has_integer_wide_form(&self) -> bool {
        match self {
            FrozenMatrix::Bf16 { .. } => false,
            FrozenMatrix::Quant(_) => wide_quant_native(),
            FrozenMatrix::Stacked(parts) => parts.iter().all(FrozenMatrix::has_integer_wide_form),
        }
    }

    /// `out = inp · Wᵀ (+ bias)` for many rows (a prompt) in integers from the stored blocks,
    /// where the CPU has an integer form for every part ([`matmul_wide_quant`]); false, with
    /// `out` untouched, where not: the caller multiplies the dequantized values then.
    pub fn wide_product(&self, out: &mut [f32], inp: &[f32], bias: Option<&[f32]>) -> bool {
        // Checked first, so a stacked matrix never leaves some parts' columns written.
        if !self.has_integer_wide_form() {
            return false;
        }
        match self {
            FrozenMatrix::Bf16 { .. } => false,
            FrozenMatrix::Quant(q) => matmul_wide_quant(out, inp, q, bias),
            FrozenMatrix::Stacked(parts) => {
                self.by_parts(parts, out, inp, bias, |part, out, inp, bias| {
                    part.wide_product(out, inp, bias)
                })
            }
        }
    }

    /// A stacked matrix's product as each part's columns by `product` (false: it gave
    /// none), placed in the full rows; false where a part's product was not taken.
    fn by_parts(
        &self,
        parts: &[FrozenMatrix],
        out: &mut [f32],
        inp: &[f32],
        bias: Option<&[f32]>,
        product: impl Fn(&FrozenMatrix, &mut [f32], &[f32], Option<&[f32]>) -> bool,
    ) -> bool {
        let (rows, c_out) = (inp.len() / self.c_in(), self.c_out());
        let mut at = 0;
        for part in parts {
            let width = part.c_out();
            let mut part_out = vec![0f32; rows * width];
            if !product(part, &mut part_out, inp, bias.map(|b| &b[at..at + width])) {
                return false;
            }
            for (r, row) in part_out.chunks_exact(width).enumerate() {
                out[r * c_out + at..r * c_out + at + width].copy_from_slice(row);
            }
            at += width;
        }
        true
    }
}

/// Gives the memory under `buf` back to the system (whole pages; the values all read 0 after)
/// and returns the bytes given back. Where that is not possible, only zeroes `buf`.
pub(crate) fn release_pages(buf: &mut [f32]) -> usize {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).unwrap_or(4096).max(4096);
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (first, last) = (start.next_multiple_of(page), end / page * page);
        if last > first {
            // SAFETY: [first, last) lies inside `buf`, which we borrow mutably, in memory the
            // allocator got as private anonymous pages: MADV_DONTNEED only makes them read as
            // zeros (a valid f32) from now on.
            let done = unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_DONTNEED,
                )
            };
            if done == 0 {
                let f = std::mem::size_of::<f32>();
                buf[..(first - start) / f].fill(0.0);
                buf[(last - start) / f..].fill(0.0);
                return last - first;
            }
        }
    }
    buf.fill(0.0);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_zero_and_the_rest_is_kept() {
        let mut v: Vec<f32> = (0..1 << 20).map(|i| i as f32 + 1.0).collect();
        let released = release_pages(&mut v[1000..900_000]);
        #[cfg(target_os = "linux")]
        assert!(released > 3_000_000, "{released} bytes released");
        let _ = released;
        assert!(v[1000..900_000].iter().all(|&x| x == 0.0));
        assert_eq!(v[999], 1000.0);
        assert_eq!(v[900_000], 900_001.0);
        // The pages can be written again.
        v[500_000] = 3.0;
        assert_eq!(v[500_000], 3.0);
    }

    #[test]
    fn stored_forms_dequantize_close_to_the_weights() {
        // 16 rows: quantized 32-weight blocks are kept in groups of 16 rows (a partial group
        // is padded, and `bytes` counts the padding the products read).
        let (c_in, c_out) = (64, 16);
        let w: Vec<f32> = (0..c_in * c_out)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
            .collect();
        assert!(FrozenMatrix::new(DecodingWeights::Fp32, &w, c_in, c_out).is_none());
        assert!(FrozenMatrix::new(DecodingWeights::Q4_0, &w[..48 * 8], 48, 8).is_none());
        for (kind, tol) in [
            (DecodingWeights::Bf16, 0.004),
            (DecodingWeights::Q8_0, 0.003),
            // ggml clips the largest positive weight to 7 steps when the negative one sets the scale.
            (DecodingWeights::Q4_0, 0.07),
        ] {
            let m = FrozenMatrix::new(kind, &w, c_in, c_out).unwrap();
            let back = m.dequantize();
            let err = w
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= tol, "{kind:?}: {err}");
            let bytes = (kind.bytes_per_weight() * (c_in * c_out) as f64) as usize;
            assert_eq!(m.bytes(), bytes, "{kind:?}");
            // Thin products equal products with the dequantized weights (up to the input's
            // own 8-bit rounding in the quantized forms).
            let x: Vec<f32> = (0..2 * c_in).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut thin = vec![0f32; 2 * c_out];
            m.thin_product(&mut thin, &x, None);
            for r in 0..2 {
                for j in 0..c_out {
                    let dense: f32 = (0..c_in)
                        .map(|i| x[r * c_in + i] * back[j * c_in + i])
                        .sum();
                    let got = thin[r * c_out + j];
                    assert!((got - dense).abs() < 0.05, "{kind:?} {got} vs {dense}");
                }
            }
        }
    }
}
