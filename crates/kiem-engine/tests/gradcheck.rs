//! Every kernel's backward pass, and the whole model's, against central finite differences.
//!
//! Each check builds a scalar `L = Σ out ⊙ R` with fixed random `R`, perturbs one input element
//! at a time by ±eps and compares (L(x+eps) − L(x−eps)) / 2eps with the analytic gradient.

use kiem_engine::config::{Arch, Block, Rope, RopeScaling};
use kiem_engine::kernels::RopeTable;
use kiem_engine::kernels::{AdamW, Cpu, Dims, Kernels, WeightLayout};
use kiem_engine::rng::Rng;
use kiem_engine::{AdamWState, Gpt, ModelConfig};

fn random(n: usize, rng: &mut Rng, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn weighted_sum(out: &[f32], r: &[f32]) -> f64 {
    out.iter()
        .zip(r)
        .map(|(&o, &r)| f64::from(o) * f64::from(r))
        .sum()
}

/// Compares `analytic` with finite differences of `loss` at up to `samples` positions of `x`.
fn check(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    samples: usize,
    eps: f32,
    loss: impl Fn(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let step = (x.len() / samples).max(1);
    let mut worst = 0.0f64;
    for i in (0..x.len()).step_by(step) {
        let mut plus = x.to_vec();
        plus[i] += eps;
        let mut minus = x.to_vec();
        minus[i] -= eps;
        let numeric = (loss(&plus) - loss(&minus)) / (2.0 * f64::from(eps));
        let a = f64::from(analytic[i]);
        let err = (a - numeric).abs() / (a.abs().max(numeric.abs()) + 1e-2);
        worst = worst.max(err);
        assert!(
            err < 2e-2,
            "{name}[{i}]: analytic {a} vs numeric {numeric} (rel err {err})"
        );
    }
    eprintln!("{name}: worst relative error {worst:.2e}");
}

const K: Cpu = Cpu::FP32;

#[test]
fn layernorm_backward() {
    let (rows, c) = (6, 16);
    let mut rng = Rng::new(1);
    let x = random(rows * c, &mut rng, 1.0);
    let w = random(c, &mut rng, 1.0);
    let b = random(c, &mut rng, 1.0);
    let r = random(rows * c, &mut rng, 1.0);
    let forward = |x: &[f32], w: &[f32], b: &[f32]| {
        let (mut out, mut mean, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
        K.layernorm_forward(&mut out, &mut mean, &mut rstd, x, w, b, c);
        (out, mean, rstd)
    };
    let (_, mean, rstd) = forward(&x, &w, &b);
    let (mut dx, mut dw, mut db) = (vec![0.0; rows * c], vec![0.0; c], vec![0.0; c]);
    K.layernorm_backward(&mut dx, &mut dw, &mut db, &r, &x, &w, &mean, &rstd, c);
    check("layernorm dx", &x, &dx, 40, 1e-2, |x| {
        weighted_sum(&forward(x, &w, &b).0, &r)
    });
    check("layernorm dw", &w, &dw, 16, 1e-2, |w| {
        weighted_sum(&forward(&x, w, &b).0, &r)
    });
    check("layernorm db", &b, &db, 16, 1e-2, |b| {
        weighted_sum(&forward(&x, &w, b).0, &r)
    });
}

#[test]
fn matmul_backward_both_layouts() {
    let (rows, c_in, c_out) = (7, 12, 10);
    let mut rng = Rng::new(2);
    let x = random(rows * c_in, &mut rng, 1.0);
    let w = random(c_in * c_out, &mut rng, 0.5);
    let bias = random(c_out, &mut rng, 1.0);
    let r = random(rows * c_out, &mut rng, 1.0);
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let forward = |x: &[f32], w: &[f32], bias: &[f32]| {
            let mut out = vec![0.0; rows * c_out];
            K.matmul_forward(&mut out, x, w, layout, Some(bias), c_in, c_out);
            weighted_sum(&out, &r)
        };
        let (mut dx, mut dw, mut db) = (
            vec![0.0; rows * c_in],
            vec![0.0; c_in * c_out],
            vec![0.0; c_out],
        );
        K.matmul_backward(
            &mut dx,
            Some(&mut dw),
            Some(&mut db),
            &r,
            &x,
            &w,
            layout,
            c_in,
            c_out,
        );
        check(&format!("{layout:?} matmul dx"), &x, &dx, 40, 1e-2, |x| {
            forward(x, &w, &bias)
        });
        check(&format!("{layout:?} matmul dw"), &w, &dw, 40, 1e-2, |w| {
            forward(&x, w, &bias)
        });
        check(
            &format!("{layout:?} matmul db"),
            &bias,
            &db,
            10,
            1e-2,
            |b| forward(&x, &w, b),
        );
    }
}

#[test]
fn attention_backward() {
    let d = Dims::mha(2, 5, 8, 2);
    let mut rng = Rng::new(3);
    let qkv = random(d.rows() * 3 * d.channels, &mut rng, 1.0);
    let r = random(d.rows() * d.channels, &mut rng, 1.0);
    // Batch 0 is one sequence; batch 1 packs two examples (rows 0-1 and 2-4).
    let positions = [0, 1, 2, 3, 4, 0, 1, 0, 1, 2];
    let forward = |qkv: &[f32]| {
        let mut out = vec![0.0; d.rows() * d.channels];
        let mut stats = vec![0.0; d.batch * d.heads * d.seq];
        K.attention_forward(&mut out, &mut stats, qkv, &positions, d);
        (out, stats)
    };
    let (_, stats) = forward(&qkv);
    let mut dqkv = vec![0.0; qkv.len()];
    K.attention_backward(&mut dqkv, &r, &qkv, &stats, &positions, d);
    check("attention dqkv", &qkv, &dqkv, 120, 1e-2, |q| {
        weighted_sum(&forward(q).0, &r)
    });
    // Causality: the output at t = 0 of batch 0 depends on no later key.
    let (out0, _) = forward(&qkv);
    let mut later = qkv.clone();
    later[3 * d.channels + d.channels] += 1.0; // key of t = 1
    let (out1, _) = forward(&later);
    assert_eq!(out0[..d.channels], out1[..d.channels]);
    // Packing: batch 1's second example (rows 2-4) never sees the first's keys or values.
    let mut first = qkv.clone();
    for row in 5..7 {
        for x in &mut first[row * 3 * d.channels + d.channels..(row + 1) * 3 * d.channels] {
            *x += 1.0;
        }
    }
    let (out2, _) = forward(&first);
    assert_eq!(out0[7 * d.channels..], out2[7 * d.channels..]);
    assert_ne!(
        out0[5 * d.channels..7 * d.channels],
        out2[5 * d.channels..7 * d.channels]
    );
}

/// Attention in f64 with the whole T × T matrix, the textbook way: the output of every row.
fn reference_attention(qkv: &[f32], positions: &[u32], d: Dims) -> Vec<f64> {
    let (w, qw, hs) = (d.qkv_width(), d.q_width(), d.head_dim);
    let mut out = vec![0f64; d.rows() * qw];
    for b in 0..d.batch {
        for h in 0..d.heads {
            let kvh = h / d.group();
            let at = |t: usize, col: usize| f64::from(qkv[(b * d.seq + t) * w + col]);
            for t in 0..d.seq {
                let first = t - positions[b * d.seq + t] as usize;
                let scores: Vec<f64> = (first..=t)
                    .map(|j| {
                        (0..hs)
                            .map(|i| at(t, h * hs + i) * at(j, qw + kvh * hs + i))
                            .sum::<f64>()
                            / (hs as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for i in 0..hs {
                    out[(b * d.seq + t) * qw + h * hs + i] = (first..=t)
                        .zip(&e)
                        .map(|(j, p)| p / sum * at(j, qw + d.kv_heads * hs + kvh * hs + i))
                        .sum();
                }
            }
        }
    }
    out
}

/// Sequences longer than one block of query rows (the kernel works 48 rows at a time, keeping
/// only each row's log-sum-exp): the output equals the textbook computation and the gradient
/// finite differences, with grouped queries and a packed sequence whose examples straddle the
/// blocks.
#[test]
fn attention_over_several_row_blocks() {
    let d = Dims {
        batch: 2,
        seq: 100,
        channels: 8,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
    };
    let mut rng = Rng::new(21);
    let qkv = random(d.rows() * d.qkv_width(), &mut rng, 1.0);
    let r = random(d.rows() * d.q_width(), &mut rng, 1.0);
    // Batch 0: one sequence; batch 1: examples of 20, 30 and 50 rows (across both block
    // boundaries).
    let positions: Vec<u32> = (0..100u32)
        .chain((0..20).chain(0..30).chain(0..50))
        .collect();
    let forward = |qkv: &[f32]| {
        let mut out = vec![0.0; d.rows() * d.q_width()];
        let mut stats = vec![0.0; d.batch * d.heads * d.seq];
        K.attention_forward(&mut out, &mut stats, qkv, &positions, d);
        (out, stats)
    };
    let (out, stats) = forward(&qkv);
    let want = reference_attention(&qkv, &positions, d);
    for (i, (&o, &e)) in out.iter().zip(&want).enumerate() {
        assert!((f64::from(o) - e).abs() < 1e-5, "output {i}: {o} vs {e}");
    }
    let mut dqkv = vec![0.0; qkv.len()];
    K.attention_backward(&mut dqkv, &r, &qkv, &stats, &positions, d);
    check(
        "attention dqkv, several blocks",
        &qkv,
        &dqkv,
        200,
        1e-2,
        |q| weighted_sum(&forward(q).0, &r),
    );
}

/// Grouped-query (2 query heads per key/value head) and multi-query attention.
#[test]
fn grouped_query_attention_backward() {
    for kv_heads in [2, 1] {
        let d = Dims {
            batch: 2,
            seq: 5,
            channels: 8,
            heads: 4,
            kv_heads,
            head_dim: 3,
        };
        let mut rng = Rng::new(13);
        let qkv = random(d.rows() * d.qkv_width(), &mut rng, 1.0);
        let r = random(d.rows() * d.q_width(), &mut rng, 1.0);
        let positions = [0, 1, 2, 3, 4, 0, 1, 2, 0, 1];
        let forward = |qkv: &[f32]| {
            let mut out = vec![0.0; d.rows() * d.q_width()];
            let mut stats = vec![0.0; d.batch * d.heads * d.seq];
            K.attention_forward(&mut out, &mut stats, qkv, &positions, d);
            (out, stats)
        };
        let (out, stats) = forward(&qkv);
        let mut dqkv = vec![0.0; qkv.len()];
        K.attention_backward(&mut dqkv, &r, &qkv, &stats, &positions, d);
        check(
            &format!("attention dqkv, {kv_heads} kv heads"),
            &qkv,
            &dqkv,
            150,
            1e-2,
            |q| weighted_sum(&forward(q).0, &r),
        );
        // Query heads of one group read the same keys and values: with equal queries they
        // give equal outputs.
        let mut same = qkv.clone();
        for row in same.chunks_mut(d.qkv_width()) {
            let first: Vec<f32> = row[..d.head_dim].to_vec();
            row[d.head_dim..2 * d.head_dim].copy_from_slice(&first);
        }
        let (o, _) = forward(&same);
        for row in o.chunks(d.q_width()) {
            assert_eq!(row[..d.head_dim], row[d.head_dim..2 * d.head_dim]);
        }
        assert_eq!(out.len(), d.rows() * d.q_width());
    }
}

#[test]
fn rmsnorm_backward() {
    let (rows, c) = (6, 16);
    let mut rng = Rng::new(14);
    let x = random(rows * c, &mut rng, 1.0);
    let w = random(c, &mut rng, 1.0);
    let r = random(rows * c, &mut rng, 1.0);
    let forward = |x: &[f32], w: &[f32]| {
        let (mut out, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        K.rmsnorm_forward(&mut out, &mut rstd, x, w, 1e-5, c);
        (out, rstd)
    };
    let (_, rstd) = forward(&x, &w);
    let (mut dx, mut dw) = (vec![0.0; rows * c], vec![0.0; c]);
    K.rmsnorm_backward(&mut dx, &mut dw, &r, &x, &w, &rstd, c);
    check("rmsnorm dx", &x, &dx, 40, 1e-2, |x| {
        weighted_sum(&forward(x, &w).0, &r)
    });
    check("rmsnorm dw", &w, &dw, 16, 1e-2, |w| {
        weighted_sum(&forward(&x, w).0, &r)
    });
}

/// Rotary embeddings: the backward (inverse rotation) against finite differences, the
/// rotation keeps norms, and positions far apart rotate differently.
#[test]
fn rope_backward() {
    let rope = Rope {
        theta: 10_000.0,
        scaling: RopeScaling::Linear { factor: 2.0 },
    };
    let (hd, heads, width) = (8, 3, 30);
    let table = RopeTable::new(&rope, hd, 16);
    let positions: Vec<u32> = vec![0, 3, 7, 15];
    let mut rng = Rng::new(15);
    let x = random(positions.len() * width, &mut rng, 1.0);
    let r = random(x.len(), &mut rng, 1.0);
    let forward = |x: &[f32]| {
        let mut y = x.to_vec();
        K.rope(&mut y, width, heads, &positions, &table, false);
        y
    };
    let mut dx = r.clone();
    K.rope(&mut dx, width, heads, &positions, &table, true);
    // Columns past the rotated heads pass through unchanged.
    check("rope dx", &x, &dx, 120, 1e-2, |x| {
        weighted_sum(&forward(x), &r)
    });
    let y = forward(&x);
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
    for (xr, yr) in x.chunks(width).zip(y.chunks(width)) {
        for (a, b) in xr[..heads * hd].chunks(hd).zip(yr[..heads * hd].chunks(hd)) {
            assert!((norm(a) - norm(b)).abs() < 1e-4 * norm(a).max(1.0));
        }
    }
    assert_eq!(x[..width], y[..width], "position 0 is not rotated");
    assert_eq!(x[width - 6..width], y[width - 6..width]);
}

#[test]
fn swiglu_backward() {
    let (rows, h) = (3, 7);
    let mut rng = Rng::new(16);
    let x = random(rows * 2 * h, &mut rng, 2.0);
    let r = random(rows * h, &mut rng, 1.0);
    let forward = |x: &[f32]| {
        let mut out = vec![0.0; rows * h];
        K.swiglu_forward(&mut out, x, h);
        weighted_sum(&out, &r)
    };
    let mut dx = vec![0.0; x.len()];
    K.swiglu_backward(&mut dx, &x, &r, h);
    check("swiglu dx", &x, &dx, 42, 1e-2, forward);
    // silu(gate) · up against its definition.
    let mut out = vec![0.0; rows * h];
    K.swiglu_forward(&mut out, &x, h);
    let (gate, up) = (x[0], x[h]);
    let expected = gate / (1.0 + (-gate).exp()) * up;
    assert!((out[0] - expected).abs() < 1e-5);
}

#[test]
fn gelu_backward() {
    let mut rng = Rng::new(4);
    let x = random(50, &mut rng, 2.0);
    let r = random(50, &mut rng, 1.0);
    let forward = |x: &[f32]| {
        let mut out = vec![0.0; x.len()];
        K.gelu_forward(&mut out, x);
        weighted_sum(&out, &r)
    };
    let mut dx = vec![0.0; 50];
    K.gelu_backward(&mut dx, &x, &r);
    check("gelu dx", &x, &dx, 50, 1e-2, forward);
}

#[test]
fn cross_entropy_backward_ignores_padding_and_masked_rows() {
    let (rows, vocab, padded) = (4, 7, 8);
    let mut rng = Rng::new(5);
    let logits = random(rows * padded, &mut rng, 2.0);
    let targets = [Some(3), None, Some(0), Some(6)];
    let scale = 0.25f32;
    let loss = |logits: &[f32]| {
        let mut l = logits.to_vec();
        let mut losses = vec![0.0; rows];
        K.cross_entropy(&mut l, &mut losses, &targets, vocab, padded, None);
        losses
            .iter()
            .map(|&x| f64::from(x) * f64::from(scale))
            .sum::<f64>()
    };
    let mut grads = logits.clone();
    let mut losses = vec![0.0; rows];
    K.cross_entropy(
        &mut grads,
        &mut losses,
        &targets,
        vocab,
        padded,
        Some(scale),
    );
    assert_eq!(losses[1], 0.0);
    assert!(
        grads[padded..2 * padded].iter().all(|&g| g == 0.0),
        "masked row has no gradient"
    );
    assert!(
        (0..rows).all(|r| grads[r * padded + 7] == 0.0),
        "padding has no gradient"
    );
    check("cross-entropy dlogits", &logits, &grads, 32, 1e-2, loss);
}

#[test]
fn encoder_backward() {
    let d = Dims::mha(2, 3, 4, 1);
    let mut rng = Rng::new(6);
    let (vocab, context) = (5, 4);
    let wte = random(vocab * d.channels, &mut rng, 1.0);
    let wpe = random(context * d.channels, &mut rng, 1.0);
    let tokens = [1u32, 4, 1, 0, 2, 1];
    // The second row packs two examples: positions restart.
    let positions = [0u32, 1, 2, 0, 1, 0];
    let r = random(d.rows() * d.channels, &mut rng, 1.0);
    let forward = |wte: &[f32], wpe: &[f32]| {
        let mut out = vec![0.0; d.rows() * d.channels];
        K.encoder_forward(&mut out, &tokens, &positions, wte, Some(wpe), d);
        weighted_sum(&out, &r)
    };
    let (mut dwte, mut dwpe) = (vec![0.0; wte.len()], vec![0.0; wpe.len()]);
    K.encoder_backward(&mut dwte, Some(&mut dwpe), &r, &tokens, &positions, d);
    check("encoder dwte", &wte, &dwte, 20, 1e-2, |w| forward(w, &wpe));
    check("encoder dwpe", &wpe, &dwpe, 16, 1e-2, |w| forward(&wte, w));
}

#[test]
fn adamw_matches_a_double_precision_reference() {
    let mut rng = Rng::new(7);
    let mut p = random(100, &mut rng, 1.0);
    let mut p64: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
    let (mut m, mut v) = (vec![0.0; 100], vec![0.0; 100]);
    let (mut m64, mut v64) = (vec![0.0f64; 100], vec![0.0f64; 100]);
    for step in 1..=3u64 {
        let g = random(100, &mut rng, 0.1);
        let h = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        K.adamw(&mut p, &g, &mut m, &mut v, &h);
        for i in 0..100 {
            let gi = f64::from(g[i]);
            m64[i] = 0.9 * m64[i] + 0.1 * gi;
            v64[i] = 0.95 * v64[i] + 0.05 * gi * gi;
            let mh = m64[i] / (1.0 - 0.9f64.powi(step as i32));
            let vh = v64[i] / (1.0 - 0.95f64.powi(step as i32));
            p64[i] -= 1e-2 * (mh / (vh.sqrt() + 1e-8) + 0.1 * p64[i]);
        }
    }
    for i in 0..100 {
        assert!((f64::from(p[i]) - p64[i]).abs() < 1e-5, "param {i}");
    }
}

/// bf16 products (where the CPU has them) agree with fp32 to bf16's precision, forward and
/// backward, for both weight layouts; they are exercised above the thin-product threshold.
#[test]
fn bf16_matmuls_agree_with_fp32_to_bf16_precision() {
    let Ok(bf16) = Cpu::with_precision(kiem_engine::kernels::MatmulPrecision::Bf16) else {
        assert!(!kiem_engine::bf16_gemm::available());
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    };
    let (rows, c_in, c_out) = (45, 70, 130);
    let mut rng = Rng::new(3);
    let x = random(rows * c_in, &mut rng, 1.0);
    let w = random(c_in * c_out, &mut rng, 0.5);
    let bias = random(c_out, &mut rng, 1.0);
    let dout = random(rows * c_out, &mut rng, 1.0);
    let close = |name: &str, a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // bf16 keeps 8 bits of mantissa: each product is off by up to ~2^-8 relative.
        assert!(
            worst <= 1e-2 * scale && worst > 0.0,
            "{name}: worst {worst}, scale {scale}"
        );
    };
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let run = |k: &Cpu| {
            let mut out = vec![0.0; rows * c_out];
            k.matmul_forward(&mut out, &x, &w, layout, Some(&bias), c_in, c_out);
            let (mut dx, mut dw, mut db) = (
                vec![0.0; rows * c_in],
                vec![0.5; c_in * c_out],
                vec![0.0; c_out],
            );
            k.matmul_backward(
                &mut dx,
                Some(&mut dw),
                Some(&mut db),
                &dout,
                &x,
                &w,
                layout,
                c_in,
                c_out,
            );
            (out, dx, dw, db)
        };
        let (f, b) = (run(&K), run(&bf16));
        close(&format!("{layout:?} out"), &b.0, &f.0);
        close(&format!("{layout:?} dx"), &b.1, &f.1);
        close(&format!("{layout:?} dw"), &b.2, &f.2);
        assert_eq!(b.3, f.3, "bias gradients are plain fp32 sums");
    }
}

/// Attention under bf16 precision (its products on the bf16 kernel, fp32 sums and softmax)
/// agrees with fp32 attention to bf16's precision, forward and backward: grouped queries, heads
/// wider than one packed panel and of odd size, an odd length over several row blocks, packed
/// examples.
#[test]
fn bf16_attention_agrees_with_fp32_to_bf16_precision() {
    let Ok(bf16) = Cpu::with_precision(kiem_engine::kernels::MatmulPrecision::Bf16) else {
        assert!(!kiem_engine::bf16_gemm::available());
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    };
    // A head of 80 (more than one packed panel of 64), and an odd head of 3 (each score an
    // odd number of products, the last pair half empty) with two key/value heads.
    for (heads, kv_heads, head_dim) in [(2, 1, 80), (4, 2, 3)] {
        let d = Dims {
            batch: 2,
            seq: 101,
            channels: heads * head_dim,
            heads,
            kv_heads,
            head_dim,
        };
        let mut rng = Rng::new(8);
        let qkv = random(d.rows() * d.qkv_width(), &mut rng, 1.0);
        let r = random(d.rows() * d.q_width(), &mut rng, 1.0);
        // Batch 1's second example starts at row 75: its last block skips the first panel of
        // 64 keys (products over ranges that start past k 0).
        let positions: Vec<u32> = (0..101u32).chain((0..75).chain(0..26)).collect();
        let run = |k: &Cpu| {
            let mut out = vec![0.0; d.rows() * d.q_width()];
            let mut stats = vec![0.0; d.batch * d.heads * d.seq];
            k.attention_forward(&mut out, &mut stats, &qkv, &positions, d);
            let mut dqkv = vec![0.0; qkv.len()];
            k.attention_backward(&mut dqkv, &r, &qkv, &stats, &positions, d);
            (out, stats, dqkv)
        };
        let (f, b) = (run(&K), run(&bf16));
        for (name, got, want) in [
            ("out", &b.0, &f.0),
            ("lse", &b.1, &f.1),
            ("dqkv", &b.2, &f.2),
        ] {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(want.iter())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Operands rounded to 8 bits of mantissa; differences must exist (bf16 ran).
            assert!(
                worst <= 2e-2 * scale && worst > 0.0,
                "head of {head_dim}, {name}: worst {worst}, scale {scale}"
            );
        }
    }
}

fn tiny_config() -> ModelConfig {
    ModelConfig::gpt2(2, 2, 8, 6, 11)
}

#[test]
fn whole_model_backward() {
    whole_model_matches_finite_differences(tiny_config());
}

/// A small Llama: grouped-query attention (4 query heads, 2 key/value heads) with an explicit
/// head size, rotary positions with llama3 scaling, SwiGLU, biases on every projection, untied
/// head.
fn tiny_llama() -> ModelConfig {
    let rope = Rope {
        theta: 10_000.0,
        scaling: RopeScaling::Llama3 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 4,
        },
    };
    let mut block = Block::llama(1e-5, rope);
    block.qkv_bias = true;
    block.attn_out_bias = true;
    block.mlp_bias = true;
    ModelConfig {
        arch: Arch::Llama,
        block,
        n_kv_head: Some(2),
        head_dim: Some(4),
        mlp_hidden: Some(12),
        ..ModelConfig::gpt2(2, 4, 8, 6, 11)
    }
}

#[test]
fn whole_llama_model_backward() {
    whole_model_matches_finite_differences(tiny_llama());
    // Multi-query attention, tied head, no biases.
    let mut mqa = tiny_llama();
    mqa.n_kv_head = Some(1);
    mqa.block.qkv_bias = false;
    mqa.block.attn_out_bias = false;
    mqa.block.mlp_bias = false;
    mqa.block.tied_head = true;
    whole_model_matches_finite_differences(mqa);
}

fn whole_model_matches_finite_differences(config: ModelConfig) {
    let mut gpt = Gpt::new(config).unwrap();
    gpt.init_random(42);
    // Larger weights than GPT-2's init make every path matter numerically.
    let mut rng = Rng::new(9);
    for x in gpt.params_mut().unwrap().iter_mut() {
        *x += rng.normal() * 0.1;
    }
    let (batch, seq) = (2, 5);
    let tokens: Vec<u32> = (0..batch * seq).map(|i| (i * 7 % 11) as u32).collect();
    let targets: Vec<Option<u32>> = (0..batch * seq)
        .map(|i| {
            if i % 4 == 3 {
                None
            } else {
                Some((i * 3 % 11) as u32)
            }
        })
        .collect();
    let count = targets.iter().flatten().count();
    let scale = 1.0 / count as f32;
    gpt.zero_grad();
    gpt.forward(&tokens, &targets, batch, seq, Some(scale))
        .unwrap();
    gpt.backward().unwrap();
    let analytic = gpt.grads.clone();
    let params = gpt.params().unwrap().to_vec();
    // Padded vocabulary rows never get gradient.
    for spec in gpt.layout.tensors.iter().filter(|s| s.vocab_rows) {
        let live = spec.range.start + spec.live_len(config.vocab_size);
        assert!(analytic[live..spec.range.end].iter().all(|&g| g == 0.0));
    }
    let loss = |p: &[f32]| {
        let mut m = Gpt::new(config).unwrap();
        m.params_mut().unwrap().copy_from_slice(p);
        let (sum, n) = m.forward(&tokens, &targets, batch, seq, None).unwrap();
        sum / n as f64
    };
    for spec in gpt.layout.tensors.clone() {
        let r = spec.range.start..spec.range.start + spec.live_len(config.vocab_size);
        let slice: Vec<f32> = params[r.clone()].to_vec();
        check(&spec.name, &slice, &analytic[r.clone()], 12, 1e-2, |x| {
            let mut p = params.clone();
            p[r.clone()].copy_from_slice(x);
            loss(&p)
        });
    }
}

#[test]
fn training_steps_are_deterministic_and_reduce_loss() {
    let config = tiny_config();
    let run = || {
        let mut gpt = Gpt::new(config).unwrap();
        gpt.init_random(1);
        let mut opt = AdamWState::new(0.9, 0.95, 1e-8);
        let tokens: Vec<u32> = (0..12).map(|i| (i % 5) as u32).collect();
        let targets: Vec<Option<u32>> = (0..12).map(|i| Some(((i + 1) % 5) as u32)).collect();
        let mut losses = Vec::new();
        for _ in 0..30 {
            gpt.zero_grad();
            let (sum, n) = gpt
                .forward(&tokens, &targets, 2, 6, Some(1.0 / 12.0))
                .unwrap();
            losses.push(sum / n as f64);
            gpt.backward().unwrap();
            gpt.clip_grad_norm(1.0);
            gpt.adamw_step(&mut opt, 1e-2, 0.1);
        }
        losses
    };
    let a = run();
    let b = run();
    assert_eq!(a, b, "bit-identical runs");
    assert!(a[29] < a[0] * 0.5, "loss falls: {} -> {}", a[0], a[29]);
}

/// The forward matmul against a plain f64 product, on both sides of the thin-product threshold
/// (`SKINNY_ROWS`), for both weight layouts and awkward widths; thin products give each row the
/// same bits however many rows share the call.
#[test]
fn matmul_forward_matches_a_plain_product_for_thin_and_wide_inputs() {
    use kiem_engine::kernels::SKINNY_ROWS;
    let mut rng = Rng::new(21);
    for (c_in, c_out) in [(40, 37), (64, 96), (17, 130), (70, 33), (150, 200)] {
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let w = random(c_in * c_out, &mut rng, 0.3);
            let bias = random(c_out, &mut rng, 0.3);
            for rows in [1, 2, 3, 4, 5, 8, 9, SKINNY_ROWS, SKINNY_ROWS + 1, 40] {
                let x = random(rows * c_in, &mut rng, 1.0);
                let mut out = vec![f32::NAN; rows * c_out];
                K.matmul_forward(&mut out, &x, &w, layout, Some(&bias), c_in, c_out);
                for r in 0..rows {
                    for j in 0..c_out {
                        let mut sum = f64::from(bias[j]);
                        for k in 0..c_in {
                            let wkj = match layout {
                                WeightLayout::InOut => w[k * c_out + j],
                                WeightLayout::OutIn => w[j * c_in + k],
                            };
                            sum += f64::from(x[r * c_in + k]) * f64::from(wkj);
                        }
                        let got = f64::from(out[r * c_out + j]);
                        assert!(
                            (got - sum).abs() < 1e-4 * (1.0 + sum.abs()),
                            "{layout:?} {rows}x{c_in}x{c_out} [{r},{j}]: {got} vs {sum}"
                        );
                    }
                }
                if rows <= SKINNY_ROWS {
                    for r in 0..rows {
                        let mut alone = vec![0f32; c_out];
                        let row = &x[r * c_in..(r + 1) * c_in];
                        K.matmul_forward(&mut alone, row, &w, layout, Some(&bias), c_in, c_out);
                        assert_eq!(alone, out[r * c_out..(r + 1) * c_out], "row {r} of {rows}");
                    }
                }
            }
        }
    }
}

/// Sizes that overflow or do not match the buffers are refused before any pointer is formed.
#[test]
#[should_panic(expected = "buffers too small")]
fn attention_refuses_sizes_that_overflow() {
    let d = Dims {
        batch: usize::MAX / 2,
        seq: 4,
        channels: 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
    };
    let (mut out, mut stats) = (vec![0.0; 64], vec![0.0; 64]);
    K.attention_forward(&mut out, &mut stats, &[0.0; 64], &[0, 1, 2, 3], d);
}

/// Packing: a row holding several examples (positions restarting at each) gives every
/// example the losses and gradients it has alone in its own row, for GPT-2's learned positions
/// and the Llama block's rotary ones.
#[test]
fn packed_rows_equal_separate_examples() {
    for config in [tiny_config(), tiny_llama()] {
        let mut gpt = Gpt::new(config).unwrap();
        gpt.init_random(42);
        let mut rng = Rng::new(9);
        for x in gpt.params_mut().unwrap().iter_mut() {
            *x += rng.normal() * 0.1;
        }
        let examples: [&[u32]; 2] = [&[1, 5, 7], &[2, 9, 4, 3]];
        let target = |t: u32| Some((t * 3 + 1) % 11);
        // Packed: one row of 3 + 2 + padding 1 (6 = the context), positions restarting.
        let tokens = [1u32, 5, 7, 2, 9, 4];
        let targets: Vec<Option<u32>> = tokens.iter().map(|&t| target(t)).collect();
        let positions = [0u32, 1, 2, 0, 1, 2];
        gpt.zero_grad();
        let (packed_sum, n) = gpt
            .forward_packed(&tokens, &targets, Some(&positions), 1, 6, Some(0.25))
            .unwrap();
        assert_eq!(n, 6);
        let packed_losses = gpt.losses().to_vec();
        gpt.backward().unwrap();
        let packed_grads = gpt.grads.clone();
        // Alone: the first example, then the second's first three tokens.
        gpt.zero_grad();
        let mut alone_losses = Vec::new();
        let mut alone_sum = 0.0;
        for ex in [&examples[0][..3], &examples[1][..3]] {
            let t: Vec<Option<u32>> = ex.iter().map(|&t| target(t)).collect();
            let (sum, _) = gpt.forward(ex, &t, 1, 3, Some(0.25)).unwrap();
            alone_sum += sum;
            alone_losses.extend_from_slice(gpt.losses());
            gpt.backward().unwrap();
        }
        for (a, b) in packed_losses.iter().zip(&alone_losses) {
            assert!((a - b).abs() < 1e-5, "{:?}: losses {a} vs {b}", config.arch);
        }
        assert!((packed_sum - alone_sum).abs() < 1e-4);
        let diff = packed_grads
            .iter()
            .zip(&gpt.grads)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-5, "{:?}: gradients differ by {diff}", config.arch);
        // Positions that do not count up from 0 are refused.
        let bad = gpt.forward_packed(&tokens, &targets, Some(&[0, 1, 3, 0, 1, 2]), 1, 6, None);
        assert!(bad.is_err());
    }
}
