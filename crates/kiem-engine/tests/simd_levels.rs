//! The kernels compiled for AVX-512, AVX2 and baseline x86-64 give the same bits: the level is
//! chosen once per process, so the test runs itself again with `KIEM_SIMD` capped.

use kiem_engine::infer::KvCache;
use kiem_engine::kernels::{matmul_thin_quant, QuantKind, QuantMatrix};
use kiem_engine::kernels::{AdamW, Cpu, Dims, Kernels, WeightLayout};
use kiem_engine::rng::Rng;
use kiem_engine::{Gpt, ModelConfig};

/// A digest of every element-wise kernel's output, the thin products decoding uses (hand-written
/// AVX2 code or its portable twin) and a decoding step's logits, on fixed inputs.
fn digest() -> u64 {
    let k = Cpu::FP32;
    let mut rng = Rng::new(5);
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal()).collect() };
    let (rows, c) = (37, 40);
    let x = random(rows * c);
    let g = random(rows * c);
    let mut bits: Vec<u32> = Vec::new();
    let mut keep = |v: &[f32]| bits.extend(v.iter().map(|x| x.to_bits()));

    let mut out = vec![0f32; rows * c];
    k.gelu_forward(&mut out, &x);
    keep(&out);
    k.gelu_backward(&mut out, &x, &g);
    keep(&out);

    let (w, b) = (random(c), random(c));
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    k.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, c);
    keep(&out);
    let (mut dx, mut dw, mut db) = (vec![0f32; rows * c], vec![0f32; c], vec![0f32; c]);
    k.layernorm_backward(&mut dx, &mut dw, &mut db, &g, &x, &w, &mean, &rstd, c);
    keep(&dx);
    keep(&dw);

    let mut logits = x.clone();
    let mut losses = vec![0f32; rows];
    let targets: Vec<Option<u32>> = (0..rows)
        .map(|i| (i % 3 != 0).then_some((i % 30) as u32))
        .collect();
    k.cross_entropy(&mut logits, &mut losses, &targets, 30, c, Some(0.5));
    keep(&logits);
    keep(&losses);

    let (mut p, mut m, mut v) = (x.clone(), vec![0f32; rows * c], vec![0f32; rows * c]);
    let h = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
    };
    k.adamw(&mut p, &g, &mut m, &mut v, &h);
    keep(&p);

    // kiem's fp32 GEMM (the level picks its kernel), with edges in every direction.
    let (a, b) = (random(37 * 300), random(300 * 41));
    let mut product = vec![0f32; 37 * 41];
    // SAFETY: the strides address only the vectors' elements.
    unsafe {
        kiem_engine::f32_gemm::gemm(
            kiem_engine::f32_gemm::kernel(),
            true,
            37,
            41,
            300,
            product.as_mut_ptr(),
            41,
            false,
            a.as_ptr(),
            (300, 1),
            b.as_ptr(),
            (41, 1),
            1.0,
        )
    };
    keep(&product);

    let d = Dims::mha(2, 9, 16, 2);
    let qkv = random(d.rows() * 3 * d.channels);
    let (mut y, mut stats) = (vec![0f32; d.rows() * d.channels], vec![0f32; 2 * 2 * 9]);
    let positions: Vec<u32> = (0..d.rows()).map(|r| (r % d.seq) as u32).collect();
    k.attention_forward(&mut y, &mut stats, &qkv, &positions, d);
    keep(&y);
    keep(&stats);
    let mut dqkv = vec![0f32; qkv.len()];
    k.attention_backward(&mut dqkv, &y, &qkv, &stats, &positions, d);
    keep(&dqkv);

    // Thin products (one decoding row) in both layouts, and a cached decoding step.
    // Widths with and without the 32- and 8-wide tails, 1 and 3 rows, with a bias; InOut below
    // 64 inputs takes the per-block kernel, above it the by-k one; and bf16 weights.
    for (c_in, c_out, rows) in [(96, 50, 1), (77, 50, 3), (40, 33, 3), (13, 20, 2)] {
        let wm = random(c_in * c_out);
        let inp = random(rows * c_in);
        let bias = random(c_out);
        let mut thin = vec![0f32; rows * c_out];
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            k.matmul_forward(&mut thin, &inp, &wm, layout, Some(&bias), c_in, c_out);
            keep(&thin);
        }
        let halves: Vec<u16> = wm.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        kiem_engine::kernels::matmul_thin_bf16(&mut thin, &inp, &halves, None, c_in, c_out);
        keep(&thin);
    }
    // Quantized weights: rows of whole 32-weight blocks.
    for kind in [QuantKind::Q8_0, QuantKind::Q4_0] {
        let (c_in, c_out, rows) = (96, 50, 3);
        let q = QuantMatrix::quantize(kind, &random(c_in * c_out), c_in, c_out).unwrap();
        let inp = random(rows * c_in);
        let mut thin = vec![0f32; rows * c_out];
        matmul_thin_quant(&mut thin, &inp, &q, Some(&random(c_out)), c_in, c_out);
        keep(&thin);
    }
    let config = ModelConfig::gpt2(2, 2, 64, 16, 50);
    let mut gpt = Gpt::new(config).unwrap();
    gpt.init_random(8);
    gpt.transpose_for_decoding();
    let mut cache = [KvCache::new(&gpt)];
    keep(&gpt.forward_cached(&mut cache, &[&[1, 2, 3][..]]).unwrap());
    keep(&gpt.forward_cached(&mut cache, &[&[4][..]]).unwrap());

    // FNV-1a over the bits.
    bits.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn every_simd_level_gives_the_same_bits() {
    let mine = digest();
    if std::env::var("KIEM_SIMD_DIGEST_CHILD").is_ok() {
        println!("DIGEST {mine}");
        return;
    }
    for level in ["baseline", "avx2"] {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "every_simd_level_gives_the_same_bits",
                "--nocapture",
            ])
            .env("KIEM_SIMD", level)
            .env("KIEM_SIMD_DIGEST_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let theirs: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("DIGEST "))
            .unwrap_or_else(|| panic!("no digest from the {level} run: {stdout}"))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(theirs, mine, "KIEM_SIMD={level} changed the results");
    }
}
