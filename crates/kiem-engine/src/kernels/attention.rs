//! Causal attention over queries, keys and values side by side in one activation (grouped-query
//! when fewer key/value heads than query heads), forward and backward.

use rayon::prelude::*;

use super::matmul::gemm_raw;
use super::{fast_exp, lane_max, lane_sum, wide, Dims, SyncPtr, ELEMENTS};

/// Row blocks of the causal attention matmuls: block `[r0, r1)` only needs keys `0..r1`.
const ATTENTION_BLOCK: usize = 32;

fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(ATTENTION_BLOCK))
        .map(move |i| (i * ATTENTION_BLOCK, ((i + 1) * ATTENTION_BLOCK).min(t)))
}

/// Elements of `qkv`, of attention's output and of the probabilities that `d` needs, or `None`
/// when the head counts do not divide or a size overflows (checked before any raw pointer
/// is formed from them).
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
    let att = d
        .batch
        .checked_mul(d.heads)?
        .checked_mul(d.seq.checked_mul(d.seq)?)?;
    Some((qkv, out, att))
}

pub(super) fn attention_forward(
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    positions: &[u32],
    d: Dims,
) {
    let (t_len, nh, hs) = (d.seq, d.heads, d.head_dim);
    let (w, qw, kvw) = (d.qkv_width(), d.q_width(), d.kv_heads * hs);
    let group = d.group();
    let scale = 1.0 / (hs as f32).sqrt();
    let sizes = buffer_sizes(&d);
    assert!(
        sizes.is_some_and(|(q, o, a)| qkv.len() >= q && out.len() >= o && att.len() >= a),
        "attention_forward: buffers too small for {d:?}"
    );
    assert!(
        positions.len() >= d.batch * t_len
            && positions
                .chunks(t_len)
                .take(d.batch)
                .all(|p| p.iter().enumerate().all(|(t, &pos)| pos as usize <= t)),
        "attention_forward: a position per row, none beyond its row"
    );
    let out_ptr = SyncPtr(out.as_mut_ptr());
    // One task per (batch, head): it owns att[b, h] and the head's columns of out.
    att.par_chunks_mut(t_len * t_len)
        .enumerate()
        .take(d.batch * nh)
        .for_each(|(bh, p)| {
            let (b, h) = (bh / nh, bh % nh);
            let base = qkv[(b * t_len) * w..].as_ptr();
            let q = base.wrapping_add(h * hs);
            let k = base.wrapping_add(qw + (h / group) * hs);
            let v = base.wrapping_add(qw + kvw + (h / group) * hs);
            for (r0, r1) in row_blocks(t_len) {
                // SAFETY: rows r0..r1 of Q and 0..r1 of K lie inside qkv (asserted above);
                // the block of p is this task's.
                unsafe {
                    gemm_raw(
                        r1 - r0,
                        r1,
                        hs,
                        p[r0 * t_len..].as_mut_ptr(),
                        (t_len, 1),
                        false,
                        q.add(r0 * w),
                        (w, 1),
                        k,
                        (1, w),
                        scale,
                    );
                }
            }
            wide(
                #[inline(always)]
                || {
                    for t in 0..t_len {
                        // The row sees its example: the positions[t] rows before it.
                        let first = t - positions[b * t_len + t] as usize;
                        let row = &mut p[t * t_len..(t + 1) * t_len];
                        row[..first].fill(0.0);
                        let live = &mut row[first..=t];
                        let max = lane_max(live);
                        live.iter_mut().for_each(|x| *x = fast_exp(*x - max));
                        let inv = 1.0 / lane_sum(live, |e| e);
                        live.iter_mut().for_each(|x| *x *= inv);
                        row[t + 1..].fill(0.0);
                    }
                },
            );
            for (r0, r1) in row_blocks(t_len) {
                // SAFETY: this task alone writes head h's columns of out for batch b.
                unsafe {
                    let y = out_ptr.get().add((b * t_len + r0) * qw + h * hs);
                    gemm_raw(
                        r1 - r0,
                        hs,
                        r1,
                        y,
                        (qw, 1),
                        false,
                        p[r0 * t_len..].as_ptr(),
                        (t_len, 1),
                        v,
                        (w, 1),
                        1.0,
                    );
                }
            }
        });
}

pub(super) fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    d: Dims,
) {
    let (t_len, nh, hs) = (d.seq, d.heads, d.head_dim);
    let (w, qw, kvw) = (d.qkv_width(), d.q_width(), d.kv_heads * hs);
    let group = d.group();
    let scale = 1.0 / (hs as f32).sqrt();
    let sizes = buffer_sizes(&d);
    assert!(
        sizes.is_some_and(|(q, o, a)| {
            qkv.len() >= q && dqkv.len() >= q && dout.len() >= o && att.len() >= a
        }),
        "attention_backward: buffers too small for {d:?}"
    );
    dqkv.par_chunks_mut(ELEMENTS).for_each(|x| x.fill(0.0));
    let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());
    // One task per (batch, key/value head): the query heads of a group add into the same
    // dK and dV columns, so they run one after another inside the task.
    (0..d.batch * d.kv_heads).into_par_iter().for_each(|bkv| {
        let (b, kvh) = (bkv / d.kv_heads, bkv % d.kv_heads);
        let base = qkv[(b * t_len) * w..].as_ptr();
        let k = base.wrapping_add(qw + kvh * hs);
        let v = base.wrapping_add(qw + kvw + kvh * hs);
        // SAFETY (all blocks below): this task alone writes batch b's columns of the query
        // heads of group kvh and of key/value head kvh in dqkv; every row addressed is
        // < t_len, every column < hs (the buffers' sizes are asserted above).
        let dbase = unsafe { dqkv_ptr.get().add((b * t_len) * w) };
        let dk = dbase.wrapping_add(qw + kvh * hs);
        let dv = dbase.wrapping_add(qw + kvw + kvh * hs);
        let mut ds = vec![0f32; t_len * t_len];
        for h in kvh * group..(kvh + 1) * group {
            let bh = b * nh + h;
            let p = &att[bh * t_len * t_len..(bh + 1) * t_len * t_len];
            let q = base.wrapping_add(h * hs);
            let dq = dbase.wrapping_add(h * hs);
            let dy = dout[(b * t_len) * qw + h * hs..].as_ptr();
            for (r0, r1) in row_blocks(t_len) {
                // SAFETY: as stated for this task above; rows r0..r1 < t_len.
                unsafe {
                    // dP = dY · Vᵀ
                    gemm_raw(
                        r1 - r0,
                        r1,
                        hs,
                        ds[r0 * t_len..].as_mut_ptr(),
                        (t_len, 1),
                        false,
                        dy.add(r0 * qw),
                        (qw, 1),
                        v,
                        (1, w),
                        1.0,
                    );
                    // dV += Pᵀ · dY
                    gemm_raw(
                        r1,
                        hs,
                        r1 - r0,
                        dv,
                        (w, 1),
                        true,
                        p[r0 * t_len..].as_ptr(),
                        (1, t_len),
                        dy.add(r0 * qw),
                        (qw, 1),
                        1.0,
                    );
                }
            }
            wide(
                #[inline(always)]
                || {
                    for t in 0..t_len {
                        let pr = &p[t * t_len..t * t_len + t + 1];
                        let dr = &mut ds[t * t_len..t * t_len + t + 1];
                        let weighted: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                        for (x, &pv) in dr.iter_mut().zip(pr) {
                            *x = pv * (*x - weighted) * scale;
                        }
                        // The block matmul filled dP beyond the diagonal; those keys are masked.
                        ds[t * t_len + t + 1..(t + 1) * t_len].fill(0.0);
                    }
                },
            );
            for (r0, r1) in row_blocks(t_len) {
                // SAFETY: as stated for this task above; rows r0..r1 < t_len.
                unsafe {
                    // dQ = dS · K
                    gemm_raw(
                        r1 - r0,
                        hs,
                        r1,
                        dq.add(r0 * w),
                        (w, 1),
                        true,
                        ds[r0 * t_len..].as_ptr(),
                        (t_len, 1),
                        k,
                        (w, 1),
                        1.0,
                    );
                    // dK += dSᵀ · Q
                    gemm_raw(
                        r1,
                        hs,
                        r1 - r0,
                        dk,
                        (w, 1),
                        true,
                        ds[r0 * t_len..].as_ptr(),
                        (1, t_len),
                        q.add(r0 * w),
                        (w, 1),
                        1.0,
                    );
                }
            }
        }
    });
}
