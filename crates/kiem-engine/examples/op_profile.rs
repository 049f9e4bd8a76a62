//! Times each kernel of one training step on the benchmark shape (a quick profile).
//! `cargo run --release -p kiem-engine --example op_profile [threads] [fp32|bf16]`

use std::time::Instant;

use kiem_engine::kernels::{Cpu, Dims, Kernels, MatmulPrecision, WeightLayout};

fn time<F: FnMut()>(name: &str, flops: f64, reps: usize, mut f: F) {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{name:<34} {:8.2} ms  {:7.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let (b, t, c, nh, v) = (8usize, 256usize, 384usize, 6usize, 4096usize);
    let rows = b * t;
    let precision: MatmulPrecision = std::env::args()
        .nth(2)
        .map(|p| p.parse().unwrap())
        .unwrap_or_default();
    let k = Cpu::with_precision(precision).unwrap();
    println!(
        "{threads} threads, {} matmuls ({})",
        precision.name(),
        kiem_engine::blas::backend_name()
    );
    let x = vec![0.5f32; rows * 4 * c];
    let w = vec![0.01f32; 4 * c * v.max(4 * c)];
    let mut out = vec![0f32; rows * v];
    let mut dx = vec![0f32; rows * 4 * c];
    let mut dw = vec![0f32; 4 * c * v.max(4 * c)];
    for (name, cin, cout, layout) in [
        ("qkv", c, 3 * c, WeightLayout::InOut),
        ("attn proj", c, c, WeightLayout::InOut),
        ("fc", c, 4 * c, WeightLayout::InOut),
        ("fc proj", 4 * c, c, WeightLayout::InOut),
        ("lm head", c, v, WeightLayout::OutIn),
    ] {
        let f = 2.0 * (rows * cin * cout) as f64;
        time(&format!("{name} fwd"), f, 3, || {
            k.matmul_forward(
                &mut out[..rows * cout],
                &x[..rows * cin],
                &w[..cin * cout],
                layout,
                None,
                cin,
                cout,
            )
        });
        let mut backward = |weight_grad: bool| {
            k.matmul_backward(
                &mut dx[..rows * cin],
                weight_grad.then_some(&mut dw[..cin * cout]),
                None,
                &out[..rows * cout],
                &x[..rows * cin],
                &w[..cin * cout],
                layout,
                cin,
                cout,
            )
        };
        // The input gradient alone, then both: their difference is the weight gradient's.
        time(&format!("{name} bwd, input grad"), f, 3, || backward(false));
        time(&format!("{name} bwd"), 2.0 * f, 3, || backward(true));
    }
    let d = Dims::mha(b, t, c, nh);
    let qkv = vec![0.1f32; rows * 3 * c];
    let mut stats = vec![0f32; b * nh * t];
    let mut y = vec![0f32; rows * c];
    let af = 2.0 * 2.0 * (b * nh * t * t / 2 * (c / nh)) as f64;
    let positions: Vec<u32> = (0..rows).map(|r| (r % t) as u32).collect();
    time("attention fwd", af, 3, || {
        k.attention_forward(&mut y, &mut stats, &qkv, &positions, d)
    });
    let mut dqkv = vec![0f32; rows * 3 * c];
    time("attention bwd", 2.5 * af, 3, || {
        k.attention_backward(&mut dqkv, &y, &qkv, &stats, &positions, d)
    });
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    let lw = vec![1f32; c];
    time("layernorm fwd", 0.0, 5, || {
        k.layernorm_forward(&mut y, &mut mean, &mut rstd, &x[..rows * c], &lw, &lw, c)
    });
    let (mut g1, mut g2) = (vec![0f32; c], vec![0f32; c]);
    time("layernorm bwd", 0.0, 5, || {
        k.layernorm_backward(
            &mut dx[..rows * c],
            &mut g1,
            &mut g2,
            &y,
            &x[..rows * c],
            &lw,
            &mean,
            &rstd,
            c,
        )
    });
    let mut h = vec![0f32; rows * 4 * c];
    time("gelu fwd", 0.0, 5, || k.gelu_forward(&mut h, &x));
    time("gelu bwd", 0.0, 5, || k.gelu_backward(&mut dx, &x, &h));
    // AdamW over the benchmark model's 12.3M parameters (6 layers × 12·C² + vocab × C).
    let n_params = 6 * 12 * c * c + v * c;
    let (mut p, g, mut m1, mut m2) = (
        vec![0.1f32; n_params],
        vec![0.01f32; n_params],
        vec![0f32; n_params],
        vec![0f32; n_params],
    );
    let hyper = kiem_engine::kernels::AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
    };
    time("adamw (all parameters)", 0.0, 5, || {
        k.adamw(&mut p, &g, &mut m1, &mut m2, &hyper)
    });
    let targets: Vec<Option<u32>> = (0..rows).map(|i| Some((i % v) as u32)).collect();
    let mut losses = vec![0f32; rows];
    time("cross-entropy fwd+bwd", 0.0, 3, || {
        k.cross_entropy(&mut out, &mut losses, &targets, v, v, Some(1.0))
    });
    thin_products(&k);
}

/// Decoding's products (one row; GPT-2-124M shapes, head with its 50304-row vocabulary) with
/// the weight-read rate each reaches: decoding is bound by reading the weights.
fn thin_products(k: &Cpu) {
    let (c, v) = (768usize, 50304usize);
    let w = vec![0.01f32; c * v];
    let x = vec![0.5f32; 4 * c];
    let mut out = vec![0f32; v];
    for (name, cin, cout, layout) in [
        ("thin qkv (768x2304)", c, 3 * c, WeightLayout::InOut),
        ("thin attn proj (768x768)", c, c, WeightLayout::InOut),
        ("thin fc (768x3072)", c, 4 * c, WeightLayout::InOut),
        ("thin fc proj (3072x768)", 4 * c, c, WeightLayout::InOut),
        ("thin qkv, [out, in]", c, 3 * c, WeightLayout::OutIn),
        ("thin attn proj, [out, in]", c, c, WeightLayout::OutIn),
        ("thin fc, [out, in]", c, 4 * c, WeightLayout::OutIn),
        ("thin fc proj, [out, in]", 4 * c, c, WeightLayout::OutIn),
        ("thin lm head (50304x768)", c, v, WeightLayout::OutIn),
    ] {
        // Cycle through copies of the weights larger than the caches, as decoding does.
        let copies = (64 << 20) / (cin * cout * 4) + 1;
        let ws: Vec<Vec<f32>> = (0..copies).map(|_| w[..cin * cout].to_vec()).collect();
        let bytes = (cin * cout * 4) as f64;
        let reps = 20;
        k.matmul_forward(&mut out[..cout], &x[..cin], &ws[0], layout, None, cin, cout);
        let t = Instant::now();
        for i in 0..reps {
            k.matmul_forward(
                &mut out[..cout],
                &x[..cin],
                &ws[i % ws.len()],
                layout,
                None,
                cin,
                cout,
            );
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name:<34} {:8.3} ms  {:7.1} GB/s of weights",
            s * 1e3,
            bytes / s / 1e9
        );
    }
}
