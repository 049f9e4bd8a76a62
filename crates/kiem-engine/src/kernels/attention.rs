//! Causal attention over queries, keys and values side by side in one activation (grouped-query
//! when fewer key/value heads than query heads), forward and backward, without the T × T
//! matrix: a block of query rows at a time, the forward keeps only each row's log-sum-exp and
//! the backward recomputes the block's probabilities from it (the flash-attention scheme with
//! whole key rows per block, so memory is a block's scores per thread, not T² per head).

use rayon::prelude::*;

use crate::bf16_gemm;
use crate::f32_gemm::{self, PackedOperand};

use super::{
    fast_exp, lane_dot, lane_max, lane_sum, wide, Dims, MatmulPrecision, SyncPtr, ELEMENTS,
};

/// Query rows per block: a block's scores (`ATTENTION_BLOCK × T`) are what a thread holds.
/// A multiple of every register tile's rows (12 for fp32 AVX-512, 6 for AVX2 and bf16): 32
/// left a partly empty tile per block; attention alone ran up to 5-9% faster with 48 (Zen 4,
/// contexts 256 to 2048; whole training steps within noise). Even, as the bf16 products'
/// ranges of k must start (each block's first row is a key range's start).
const ATTENTION_BLOCK: usize = 48;
const _: () = assert!(ATTENTION_BLOCK.is_multiple_of(2));

/// A head's operand packed once for all its blocks of query rows: fp32 panels, or bf16 ones
/// when the matrix products run in bf16 (fp32 sums either way; every `ks` of attention starts
/// on an even k, as the bf16 packing needs).
fn packing(precision: MatmulPrecision) -> Box<dyn PackedOperand> {
    match precision {
        MatmulPrecision::Fp32 => Box::new(f32_gemm::PackedB::new(f32_gemm::kernel())),
        MatmulPrecision::Bf16 => Box::new(bf16_gemm::PackedB::new(
            bf16_gemm::backend().expect("bf16 attention needs a CPU with AVX512-BF16"),
        )),
    }
}

/// What one thread reuses across calls: a block's probabilities and their gradients, and the
/// head's operands packed once for all its blocks (K and V both ways, Q, the output gradient)
/// at `precision`.
struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    precision: MatmulPrecision,
    packed: [Box<dyn PackedOperand>; 6],
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// Runs `body` on this thread's scratch with block buffers at least `len` long and packings
/// of `precision` (a fresh scratch when it is in use: a rayon task run while this thread
/// waits inside another).
fn with_scratch<R>(
    len: usize,
    precision: MatmulPrecision,
    body: impl FnOnce(&mut Scratch) -> R,
) -> R {
    let fresh = || Scratch {
        p: Vec::new(),
        ds: Vec::new(),
        precision,
        packed: std::array::from_fn(|_| packing(precision)),
    };
    SCRATCH.with(|cell| {
        let mut held = cell.try_borrow_mut();
        let mut own = None;
        let scratch = match held.as_deref_mut() {
            Ok(slot) => slot.get_or_insert_with(fresh),
            Err(_) => own.insert(fresh()),
        };
        if scratch.precision != precision {
            scratch.precision = precision;
            scratch.packed = std::array::from_fn(|_| packing(precision));
        }
        for b in [&mut scratch.p, &mut scratch.ds] {
            if b.len() < len {
                b.resize(len, 0.0);
            }
        }
        body(scratch)
    })
}

/// The scores of query rows `r0..r1` into `p` (row stride: the returned key count) against
/// the keys from the first any of them sees, rounded down to a panel start, to `r1`: returns
/// that first key.
///
/// # Safety
/// `q` addresses rows `r0..r1` of row stride `w` and `head_dim` values; `p` holds
/// `(r1 - r0) × (r1 - first key)` values.
#[allow(clippy::too_many_arguments)]
unsafe fn block_scores(
    p: &mut [f32],
    q: *const f32,
    w: usize,
    head_dim: usize,
    keys_t: &dyn PackedOperand,
    positions: &[u32],
    (r0, r1): (usize, usize),
    scale: f32,
) -> usize {
    let nr = keys_t.panel_width();
    // Keys before every row's example are skipped (packing), from a panel start.
    let k0 = (r0..r1).map(|t| first_key(positions, t)).min().unwrap_or(0) / nr * nr;
    let keys = r1 - k0;
    assert!(p.len() >= (r1 - r0) * keys);
    keys_t.product(
        r1 - r0,
        p.as_mut_ptr(),
        keys,
        false,
        q.add(r0 * w),
        (w, 1),
        0..head_dim,
        k0..r1,
        scale,
    );
    k0
}

/// The scores a row sees into their probabilities, in place; returns their log-sum-exp.
#[inline(always)]
pub(crate) fn softmax(live: &mut [f32]) -> f32 {
    let max = lane_max(live);
    live.iter_mut().for_each(|x| *x = fast_exp(*x - max));
    let sum = lane_sum(live, |e| e);
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(ATTENTION_BLOCK))
        .map(move |i| (i * ATTENTION_BLOCK, ((i + 1) * ATTENTION_BLOCK).min(t)))
}

/// Elements of `qkv`, of attention's output and of the per-row statistics that `d` needs, or
/// `None` when the head counts do not divide or a size overflows (checked before any raw
/// pointer is formed from them).
fn buffer_sizes(d: &Dims) -> Option<(usize, usize, usize)> {
    if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) {
        return None;
    }
    let rows = d.batch.checked_mul(d.seq)?;
    let width = d
        .kv_heads
        .checked_mul(2)?
        .checked_add(d.heads)?
        .checked_mul(d.head_dim)?;
    let qkv = rows.checked_mul(width)?;
    let out = rows.checked_mul(d.heads.checked_mul(d.head_dim)?)?;
    let stats = rows.checked_mul(d.heads)?;
    Some((qkv, out, stats))
}

/// Checks that every row has a position and none reaches back before its sequence.
fn check_positions(name: &str, positions: &[u32], d: &Dims) {
    assert!(
        positions.len() >= d.batch * d.seq
            && positions
                .chunks(d.seq)
                .take(d.batch)
                .all(|p| p.iter().enumerate().all(|(t, &pos)| pos as usize <= t)),
        "{name}: a position per row, none beyond its row"
    );
}

/// The keys row `t` sees: `first..=t`, its example's rows so far.
fn first_key(positions: &[u32], t: usize) -> usize {
    t - positions[t] as usize
}

/// Writes attention's output and, per (batch, head, row), the log-sum-exp of the row's scores
/// (`stats[b, h, t]`), which is all the backward pass needs to rebuild the probabilities.
pub(super) fn attention_forward(
    out: &mut [f32],
    stats: &mut [f32],
    qkv: &[f32],
    positions: &[u32],
    d: Dims,
    precision: MatmulPrecision,
) {
    let (t_len, nh, hs) = (d.seq, d.heads, d.head_dim);
    let (w, qw, kvw) = (d.qkv_width(), d.q_width(), d.kv_heads * hs);
    let group = d.group();
    let scale = 1.0 / (hs as f32).sqrt();
    let sizes = buffer_sizes(&d);
    assert!(
        sizes.is_some_and(|(q, o, st)| qkv.len() >= q && out.len() >= o && stats.len() >= st),
        "attention_forward: buffers too small for {d:?}"
    );
    check_positions("attention_forward", positions, &d);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    // One task per (batch, head): it owns stats[b, h] and the head's columns of out.
    stats
        .par_chunks_mut(t_len)
        .enumerate()
        .take(d.batch * nh)
        .for_each(|(bh, lse)| {
            let (b, h) = (bh / nh, bh % nh);
            let pos = &positions[b * t_len..(b + 1) * t_len];
            let base = qkv[(b * t_len) * w..].as_ptr();
            let q = base.wrapping_add(h * hs);
            let k = base.wrapping_add(qw + (h / group) * hs);
            let v = base.wrapping_add(qw + kvw + (h / group) * hs);
            with_scratch(ATTENTION_BLOCK * t_len, precision, |scratch| {
                let [kt, vp, ..] = &mut scratch.packed;
                let p = &mut scratch.p;
                // SAFETY: K and V of batch b, head h / group, lie inside qkv (asserted above).
                unsafe {
                    kt.pack(hs, t_len, k, (1, w));
                    vp.pack(t_len, hs, v, (w, 1));
                }
                for (r0, r1) in row_blocks(t_len) {
                    // SAFETY: rows r0..r1 of Q lie inside qkv; p holds a block of scores.
                    let k0 = unsafe { block_scores(p, q, w, hs, &**kt, pos, (r0, r1), scale) };
                    let keys = r1 - k0;
                    wide(
                        #[inline(always)]
                        || {
                            for t in r0..r1 {
                                let row = &mut p[(t - r0) * keys..(t - r0 + 1) * keys];
                                let first = first_key(pos, t) - k0;
                                row[..first].fill(0.0);
                                lse[t] = softmax(&mut row[first..=t - k0]);
                                row[t - k0 + 1..].fill(0.0);
                            }
                        },
                    );
                    // SAFETY: as above.
                    unsafe {
                        vp.product(
                            r1 - r0,
                            out_ptr.get().add((b * t_len + r0) * qw + h * hs),
                            qw,
                            false,
                            p.as_ptr(),
                            (keys, 1),
                            k0..r1,
                            0..hs,
                            1.0,
                        )
                    };
                }
            });
        });
}

/// Causal attention of one head's `n` new query rows (positions `start..start + n`) over a
/// KV cache's keys and values (`[position][head_dim]`, positions `0..start + n`, the new rows'
/// own included): a block of query rows at a time against the keys packed once, as
/// [`attention_forward`] does, so a long prompt's prefill multiplies blocks instead of taking
/// one dot product per (row, key).
///
/// # Safety
/// `q` addresses `n` rows of row stride `q_stride` and `head_dim` values; `out` rows of stride
/// `out_stride` and `head_dim` values that no other thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_over_cache(
    out: *mut f32,
    out_stride: usize,
    q: *const f32,
    q_stride: usize,
    keys: &[f32],
    values: &[f32],
    (start, n): (usize, usize),
    head_dim: usize,
) {
    let total = start + n;
    assert!(
        keys.len() >= total * head_dim && values.len() >= total * head_dim,
        "attention_over_cache: {total} positions of keys and values"
    );
    let scale = 1.0 / (head_dim as f32).sqrt();
    with_scratch(ATTENTION_BLOCK * total, MatmulPrecision::Fp32, |scratch| {
        let [kt, vp, ..] = &mut scratch.packed;
        let p = &mut scratch.p;
        // SAFETY: the keys and values of every position are inside the slices (asserted).
        unsafe {
            kt.pack(head_dim, total, keys.as_ptr(), (1, head_dim));
            vp.pack(total, head_dim, values.as_ptr(), (head_dim, 1));
        }
        for (r0, r1) in row_blocks(n) {
            // The block's last row sees keys 0..start + r1; earlier rows fewer (masked).
            let seen = start + r1;
            // SAFETY: rows r0..r1 of q exist (the caller's contract); p holds a block of
            // scores (with_scratch's length).
            unsafe {
                kt.product(
                    r1 - r0,
                    p.as_mut_ptr(),
                    seen,
                    false,
                    q.add(r0 * q_stride),
                    (q_stride, 1),
                    0..head_dim,
                    0..seen,
                    scale,
                )
            };
            wide(
                #[inline(always)]
                || {
                    for t in r0..r1 {
                        let row = &mut p[(t - r0) * seen..(t - r0 + 1) * seen];
                        softmax(&mut row[..=start + t]);
                        row[start + t + 1..].fill(0.0);
                    }
                },
            );
            // SAFETY: the caller's contract for `out`; p holds the block's probabilities.
            unsafe {
                vp.product(
                    r1 - r0,
                    out.add(r0 * out_stride),
                    out_stride,
                    false,
                    p.as_ptr(),
                    (seen, 1),
                    0..seen,
                    0..head_dim,
                    1.0,
                )
            };
        }
    });
}

/// Overwrites `dqkv` with the gradient of attention's inputs, from `stats` as
/// [`attention_forward`] wrote them.
pub(super) fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    stats: &[f32],
    positions: &[u32],
    d: Dims,
    precision: MatmulPrecision,
) {
    let (t_len, nh, hs) = (d.seq, d.heads, d.head_dim);
    let (w, qw, kvw) = (d.qkv_width(), d.q_width(), d.kv_heads * hs);
    let group = d.group();
    let scale = 1.0 / (hs as f32).sqrt();
    let sizes = buffer_sizes(&d);
    assert!(
        sizes.is_some_and(|(q, o, st)| {
            qkv.len() >= q && dqkv.len() >= q && dout.len() >= o && stats.len() >= st
        }),
        "attention_backward: buffers too small for {d:?}"
    );
    check_positions("attention_backward", positions, &d);
    dqkv.par_chunks_mut(ELEMENTS).for_each(|x| x.fill(0.0));
    let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());
    // One task per (batch, key/value head): the query heads of a group add into the same
    // dK and dV columns, so they run one after another inside the task.
    (0..d.batch * d.kv_heads).into_par_iter().for_each(|bkv| {
        let (b, kvh) = (bkv / d.kv_heads, bkv % d.kv_heads);
        let pos = &positions[b * t_len..(b + 1) * t_len];
        let base = qkv[(b * t_len) * w..].as_ptr();
        let k = base.wrapping_add(qw + kvh * hs);
        let v = base.wrapping_add(qw + kvw + kvh * hs);
        // SAFETY (all blocks below): this task alone writes batch b's columns of the query
        // heads of group kvh and of key/value head kvh in dqkv; every row addressed is
        // < t_len, every column < hs (the buffers' sizes are asserted above).
        let dbase = unsafe { dqkv_ptr.get().add((b * t_len) * w) };
        let dk = dbase.wrapping_add(qw + kvh * hs);
        let dv = dbase.wrapping_add(qw + kvw + kvh * hs);
        with_scratch(ATTENTION_BLOCK * t_len, precision, |scratch| {
            let [kt, vt, kp, qp, dyp, _] = &mut scratch.packed;
            let (p, ds) = (&mut scratch.p, &mut scratch.ds);
            // SAFETY: K and V of batch b, head kvh, lie inside qkv (asserted above).
            unsafe {
                kt.pack(hs, t_len, k, (1, w));
                vt.pack(hs, t_len, v, (1, w));
                kp.pack(t_len, hs, k, (w, 1));
            }
            for h in kvh * group..(kvh + 1) * group {
                let lse = &stats[(b * nh + h) * t_len..(b * nh + h + 1) * t_len];
                let q = base.wrapping_add(h * hs);
                let dq = dbase.wrapping_add(h * hs);
                let dy = dout[(b * t_len) * qw + h * hs..].as_ptr();
                // SAFETY: Q of head h and its output gradient lie inside qkv and dout.
                unsafe {
                    qp.pack(t_len, hs, q, (w, 1));
                    dyp.pack(t_len, hs, dy, (qw, 1));
                }
                for (r0, r1) in row_blocks(t_len) {
                    // The block's probabilities again, from the scores and each row's lse.
                    // SAFETY: as stated for this task above; rows r0..r1 and k0..r1 < t_len.
                    let k0 = unsafe { block_scores(p, q, w, hs, &**kt, pos, (r0, r1), scale) };
                    let keys = r1 - k0;
                    // SAFETY: as above.
                    unsafe {
                        // dP = dY · Vᵀ
                        vt.product(
                            r1 - r0,
                            ds.as_mut_ptr(),
                            keys,
                            false,
                            dy.add(r0 * qw),
                            (qw, 1),
                            0..hs,
                            k0..r1,
                            1.0,
                        );
                    }
                    wide(
                        #[inline(always)]
                        || {
                            for t in r0..r1 {
                                let (first, last) = (first_key(pos, t) - k0, t - k0);
                                let pr = &mut p[(t - r0) * keys..(t - r0 + 1) * keys];
                                let dr = &mut ds[(t - r0) * keys..(t - r0 + 1) * keys];
                                let l = lse[t];
                                pr[..first].fill(0.0);
                                pr[last + 1..].fill(0.0);
                                pr[first..=last]
                                    .iter_mut()
                                    .for_each(|x| *x = fast_exp(*x - l));
                                // dS = P ∘ (dP − Σ P·dP) · scale; masked keys get none.
                                let weighted = lane_dot(&pr[first..=last], &dr[first..=last]);
                                for (x, &pv) in dr.iter_mut().zip(pr.iter()) {
                                    *x = pv * (*x - weighted) * scale;
                                }
                            }
                        },
                    );
                    // SAFETY: as stated for this task above.
                    unsafe {
                        // dV += Pᵀ · dY
                        dyp.product(
                            keys,
                            dv.add(k0 * w),
                            w,
                            true,
                            p.as_ptr(),
                            (1, keys),
                            r0..r1,
                            0..hs,
                            1.0,
                        );
                        // dQ += dS · K
                        kp.product(
                            r1 - r0,
                            dq.add(r0 * w),
                            w,
                            true,
                            ds.as_ptr(),
                            (keys, 1),
                            k0..r1,
                            0..hs,
                            1.0,
                        );
                        // dK += dSᵀ · Q
                        qp.product(
                            keys,
                            dk.add(k0 * w),
                            w,
                            true,
                            ds.as_ptr(),
                            (1, keys),
                            r0..r1,
                            0..hs,
                            1.0,
                        );
                    }
                }
            }
        });
    });
}
