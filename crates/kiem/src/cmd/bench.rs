//! `kiem bench`: speed measurements. Comparisons against other implementations run in the same
//! process run by scripts under `bench/` (e.g. `bench/tokenizer.py` runs tiktoken beside this).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiem_data::corpus::CorpusOptions;
use kiem_data::prepare::{prepare, PrepareOptions};
use kiem_tokenizer::{Tokenizer, TrainOptions};
use rayon::prelude::*;
use serde::Serialize;

use crate::progress::mb_per_s;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// GPT-2 encoding throughput (1 thread and all), BPE training time, and `data prepare`
    /// scaling with threads. The documents are the inputs split at blank lines ("\n\n"),
    /// exactly as bench/tokenizer.py splits them for tiktoken.
    Tokenizer(TokenizerBenchArgs),
    /// Inference speed of a model: prefill tokens/s, and decode tokens/s with a KV cache at
    /// several batch sizes (continuous batching, as `kiem serve` decodes).
    Generate(GenerateBenchArgs),
    /// fp32 matrix products of one transformer layer's training step (forward, input
    /// gradient, weight gradient of the qkv, attention-output, MLP-in and MLP-out matrices) on
    /// every path this machine has: kiem's kernel at each SIMD level, OpenBLAS if installed, and
    /// the bf16-operand kernel (fp32 sums) where the CPU has AVX512-BF16, and with
    /// `KIEM_BF16=amx` the AMX tile kernel where the CPU has AMX-BF16.
    Gemm(GemmBenchArgs),
}

#[derive(Args, Debug)]
pub struct GemmBenchArgs {
    /// Model width (the issue-3 benchmark config: 384; GPT-2 124M: 768).
    #[arg(long, default_value_t = 384, value_name = "N")]
    width: usize,

    /// Rows of activations: micro-batch x context (8 x 256).
    #[arg(long, default_value_t = 2048, value_name = "N")]
    rows: usize,

    /// Timed repetitions of each product; the fastest counts.
    #[arg(long, default_value_t = 3, value_name = "N")]
    repeat: usize,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    threads: crate::ThreadArgs,
}

#[derive(Serialize, Debug)]
struct GemmBench {
    machine: String,
    threads: usize,
    /// The path `kiem pretrain` uses in this process.
    default_path: String,
    shapes: Vec<GemmShape>,
    paths: Vec<GemmPath>,
}

#[derive(Serialize, Debug)]
struct GemmShape {
    name: String,
    m: usize,
    n: usize,
    k: usize,
}

#[derive(Serialize, Debug)]
struct GemmPath {
    name: String,
    /// GFLOP/s of each shape, in order.
    gflops: Vec<f64>,
    /// All shapes' FLOPs over their summed fastest times.
    total_gflops: f64,
}

#[derive(Args, Debug)]
pub struct GenerateBenchArgs {
    /// Model directory (Hugging Face GPT-2 or Llama family) or GGUF file.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,

    /// Sequences decoded together, one measurement each.
    #[arg(long, num_args = 1.., default_values_t = [1, 8], value_name = "N")]
    batch: Vec<usize>,

    /// Prompt length (tokens) of each sequence.
    #[arg(long, default_value_t = 64, value_name = "N")]
    prompt_tokens: usize,

    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128, value_name = "N")]
    tokens: usize,

    /// Timed repetitions; the fastest counts.
    #[arg(long, default_value_t = 3, value_name = "N")]
    repeat: usize,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    weights: super::generate::WeightsArgs,

    #[command(flatten)]
    threads: crate::ThreadArgs,
}

#[derive(Serialize, Debug)]
struct GenerateBench {
    machine: String,
    threads: usize,
    parameters: usize,
    prompt_tokens: usize,
    prefill_tokens_per_second: f64,
    decode: Vec<DecodeBench>,
    /// Highest memory read bandwidth of a repetition (bytes/s, all threads): streaming the
    /// decoding weights (the very memory decoding reads) once between each two decoding steps.
    read_bandwidth: f64,
    /// Weights decoding reads: "fp32" or "bf16".
    weights: String,
    /// Bytes a batch-1 decoding step must read: the weights plus the KV cache at mid-length.
    bytes_per_token: f64,
    /// Tokens/s if a batch-1 step cost only reading those bytes once at `read_bandwidth`.
    bandwidth_bound_tokens_per_second: f64,
    /// Batch-1 decoding against the bandwidth bound: the median over repetitions of each
    /// one's tokens/s against the bound from the bandwidth measured between its steps.
    bandwidth_fraction: Option<f64>,
}

#[derive(Serialize, Debug)]
struct DecodeBench {
    batch: usize,
    tokens: usize,
    /// The fastest repetition.
    seconds: f64,
    tokens_per_second: f64,
    ms_per_step: f64,
    repetitions: Vec<DecodeRepetition>,
}

#[derive(Serialize, Debug)]
struct DecodeRepetition {
    tokens_per_second: f64,
    /// Read bandwidth streaming the decoding weights between its steps (bytes/s).
    read_bandwidth: f64,
}

#[derive(Args, Debug)]
pub struct TokenizerBenchArgs {
    /// UTF-8 text files to measure on.
    #[arg(long = "input", required = true, num_args = 1.., value_name = "FILE")]
    inputs: Vec<PathBuf>,

    /// Threads for the multi-threaded measurements (default: all available cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Timed repetitions of each encoding measurement; the fastest counts.
    #[arg(long, default_value_t = 3, value_name = "N")]
    repeat: usize,

    /// Vocabulary size for the BPE training measurement.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    train_vocab: usize,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug)]
struct TokenizerBench {
    machine: String,
    threads: usize,
    documents: usize,
    bytes: u64,
    gpt2_tokens: u64,
    gpt2_encode_1_thread_mb_s: f64,
    gpt2_encode_all_threads_mb_s: f64,
    trained_vocab: usize,
    bpe_train_seconds: f64,
    trained_encode_1_thread_mb_s: f64,
    prepare_1_thread_mb_s: f64,
    prepare_all_threads_mb_s: f64,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Tokenizer(args) => tokenizer(args),
        BenchCommand::Generate(args) => generate(args),
        BenchCommand::Gemm(args) => gemm(args),
    }
}

/// (row stride, column stride) of a product's two operands, either one transposed.
fn operand_strides(
    m: usize,
    n: usize,
    k: usize,
    lhs_transposed: bool,
    rhs_transposed: bool,
) -> ((usize, usize), (usize, usize)) {
    (
        if lhs_transposed { (1, m) } else { (k, 1) },
        if rhs_transposed { (1, k) } else { (n, 1) },
    )
}

fn gemm(args: GemmBenchArgs) -> Result<()> {
    use kiem_engine::f32_gemm;
    let threads = args.threads.install()?;
    if !(1..=65_536).contains(&args.width) || !(1..=1 << 20).contains(&args.rows) {
        bail!("--width must be in 1..=65536 and --rows in 1..=1048576");
    }
    let (w, r) = (args.width, args.rows);
    // (name, rows, out, in): each layer matrix as training multiplies it.
    let matrices = [
        ("qkv", w, 3 * w),
        ("attn out", w, w),
        ("mlp in", w, 4 * w),
        ("mlp out", 4 * w, w),
    ];
    // (name, m, n, k, lhs transposed, rhs transposed)
    let mut shapes = Vec::new();
    for (name, c_in, c_out) in matrices {
        shapes.push((format!("{name} forward"), r, c_out, c_in, false, false));
        shapes.push((format!("{name} input grad"), r, c_in, c_out, false, true));
        shapes.push((format!("{name} weight grad"), c_in, c_out, r, true, false));
    }
    let largest = shapes
        .iter()
        .map(|s| (s.1 * s.3).max(s.3 * s.2).max(s.1 * s.2))
        .max()
        .unwrap_or(0);
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed) % 2001) as f32 / 1000.0 - 1.0) * 0.1)
            .collect()
    };
    let (lhs, rhs) = (values(largest, 1), values(largest, 2));
    let mut dst = vec![0f32; largest];
    // A product returns false where it does not apply to the shape.
    type Product<'a> =
        Box<dyn Fn(&(String, usize, usize, usize, bool, bool), &mut [f32]) -> bool + 'a>;
    let mut paths: Vec<(String, Product)> = Vec::new();
    for kernel in f32_gemm::kernels_available() {
        let (lhs, rhs) = (&lhs, &rhs);
        paths.push((
            kernel.name.to_string(),
            Box::new(move |&(_, m, n, k, lt, rt), dst: &mut [f32]| {
                let (ls, rs) = operand_strides(m, n, k, lt, rt);
                // SAFETY: each operand holds `largest` >= its m·k, k·n, m·n elements.
                unsafe {
                    f32_gemm::gemm(
                        kernel,
                        true,
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        n,
                        false,
                        lhs.as_ptr(),
                        ls,
                        rhs.as_ptr(),
                        rs,
                        1.0,
                    )
                };
                true
            }),
        ));
    }
    if let Some(blas) = kiem_engine::blas::openblas() {
        let (lhs, rhs) = (&lhs, &rhs);
        paths.push((
            format!("{} (system BLAS)", blas.name),
            Box::new(move |&(_, m, n, k, lt, rt), dst: &mut [f32]| {
                let (ls, rs) = operand_strides(m, n, k, lt, rt);
                // SAFETY: as above.
                let done = unsafe {
                    blas.sgemm_raw(
                        false,
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        n,
                        false,
                        lhs.as_ptr(),
                        ls,
                        rhs.as_ptr(),
                        rs,
                        1.0,
                    )
                };
                assert!(done, "OpenBLAS refused a plain product");
                true
            }),
        ));
    }
    {
        use kiem_engine::bf16_gemm::{backend, gemm_with, Backend};
        // AMX tiles only when asked for (`KIEM_BF16=amx`): their kernel has not yet been
        // measured on such a CPU.
        let bf16_paths = [
            (Backend::Native, "kiem bf16 operands, AVX512-BF16 6x64"),
            (Backend::Amx, "kiem bf16 operands, AMX tiles 32x32"),
        ];
        for (bf16, name) in bf16_paths {
            let wanted = bf16 == Backend::Native || backend() == Some(Backend::Amx);
            if !(wanted && bf16.runs_here()) {
                continue;
            }
            let (lhs, rhs) = (&lhs, &rhs);
            paths.push((
                name.to_string(),
                Box::new(move |&(_, m, n, k, lt, rt), dst: &mut [f32]| {
                    let (ls, rs) = operand_strides(m, n, k, lt, rt);
                    gemm_with(bf16, m, n, k, dst, n, false, lhs, ls, rhs, rs);
                    true
                }),
            ));
        }
        if Backend::Amx.runs_here() && backend() != Some(Backend::Amx) {
            eprintln!("this CPU has AMX-BF16: KIEM_BF16=amx adds the AMX tile kernel's column");
        }
        if let Some(note) = kiem_engine::bf16_gemm::request_note() {
            eprintln!("{note}");
        }
    }
    // Quantized weights as a decoding model's prefill multiplies them (forward products only;
    // the inputs are quantized to 8 bits inside each product, as in a prefill).
    if kiem_engine::kernels::wide_quant_native() {
        use kiem_engine::kernels::{matmul_wide_quant, QuantKind, QuantMatrix};
        for kind in [QuantKind::Q8_0, QuantKind::Q4_0] {
            let mut weights = std::collections::HashMap::new();
            for &(_, _, n, k, lt, rt) in &shapes {
                if !lt && !rt && k % 32 == 0 {
                    let w = QuantMatrix::quantize(kind, &rhs[..n * k], k, n)
                        .expect("rows of whole blocks");
                    weights.insert((n, k), w);
                }
            }
            let lhs = &lhs;
            paths.push((
                format!("kiem {} weights, VNNI", kind.name()),
                Box::new(move |&(_, m, n, k, lt, rt), dst: &mut [f32]| {
                    let Some(w) = weights.get(&(n, k)).filter(|_| !lt && !rt) else {
                        return false;
                    };
                    matmul_wide_quant(&mut dst[..m * n], &lhs[..m * k], w, None)
                }),
            ));
        }
    }
    let mut results = Vec::new();
    for (name, product) in &paths {
        let mut gflops = Vec::new();
        let (mut flops, mut seconds) = (0f64, 0f64);
        for shape in &shapes {
            let (best, ran) = fastest(args.repeat, || product(shape, &mut dst));
            if !ran {
                gflops.push(f64::NAN);
                continue;
            }
            let f = 2.0 * (shape.1 * shape.2 * shape.3) as f64;
            gflops.push(f / best / 1e9);
            flops += f;
            seconds += best;
        }
        results.push(GemmPath {
            name: name.clone(),
            gflops,
            total_gflops: flops / seconds / 1e9,
        });
    }
    let report = GemmBench {
        machine: machine_description(),
        threads,
        default_path: kiem_engine::kernels::matmul_path(
            kiem_engine::kernels::MatmulPrecision::Fp32,
        ),
        shapes: shapes
            .iter()
            .map(|s| GemmShape {
                name: s.0.clone(),
                m: s.1,
                n: s.2,
                k: s.3,
            })
            .collect(),
        paths: results,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("machine: {}; {threads} threads", report.machine);
    println!("fp32 products use: {}", report.default_path);
    print!("{:<24}{:>18}", "product", "m x n x k");
    for p in &report.paths {
        print!("  {:>28}", p.name);
    }
    println!();
    for (i, s) in report.shapes.iter().enumerate() {
        print!("{:<24}{:>18}", s.name, format!("{}x{}x{}", s.m, s.n, s.k));
        for p in &report.paths {
            if p.gflops[i].is_nan() {
                print!("  {:>30}", "-");
            } else {
                print!("  {:>22.1} GFLOP/s", p.gflops[i]);
            }
        }
        println!();
    }
    print!("{:<42}", "all products");
    for p in &report.paths {
        print!("  {:>22.1} GFLOP/s", p.total_gflops);
    }
    println!();
    Ok(())
}

fn generate(args: GenerateBenchArgs) -> Result<()> {
    use kiem_engine::batch::Batcher;
    use kiem_engine::infer::KvCache;
    use kiem_engine::sampling::{Control, GenerateOptions, SamplingParams};
    let threads = args.threads.install()?;
    let (gpt, _, _) = super::generate::load_model(&args.model, &args.weights)?;
    let context = gpt.config.context;
    if args.prompt_tokens == 0 || args.prompt_tokens + args.tokens > context {
        bail!(
            "--prompt-tokens {} + --tokens {} must fit the model's context of {context} (and the prompt be non-empty)",
            args.prompt_tokens,
            args.tokens
        );
    }
    if args.batch.iter().any(|&b| b == 0 || b > 4096) {
        bail!("--batch sizes must be in 1..=4096");
    }
    let vocab = gpt.config.vocab_size as u32;
    let prompt = |seed: usize| -> Vec<u32> {
        (0..args.prompt_tokens)
            .map(|i| ((i * 7919 + seed * 104_729) as u32) % vocab)
            .collect()
    };
    // One cache, emptied before each repetition, as a server reuses its caches (and as
    // llama-bench measures prompt processing: its cache is allocated once): the fastest
    // repetition times the prefill, not the first touch of the cache's memory.
    let mut cache = [KvCache::new(&gpt)];
    let (prefill_seconds, _) = fastest(args.repeat, || {
        cache[0].clear();
        gpt.forward_cached(&mut cache, &[&prompt(0)]).map(|_| ())
    });
    drop(cache);
    let c = &gpt.config;
    let mid_length = (args.prompt_tokens + args.tokens / 2) as f64;
    let bytes_per_token = gpt.decoding_weight_bytes() as f64
        + 4.0 * 2.0 * (c.n_layer * c.kv_width()) as f64 * mid_length;
    let mut best_bandwidth = 0f64;
    let mut decode = Vec::new();
    for &batch in &args.batch {
        let mut repetitions = Vec::new();
        let (mut best, mut generated) = (f64::INFINITY, 0);
        for _ in 0..args.repeat.max(1) {
            let mut batcher = Batcher::new(&gpt);
            let options = GenerateOptions {
                max_tokens: args.tokens,
                sampling: SamplingParams::greedy(),
                stop_ids: Vec::new(),
            };
            for b in 0..batch {
                batcher.add(b as u64, prompt(b), options.clone())?;
            }
            // Prefill every prompt (its step draws each sequence's first token), then time
            // the decoding steps alone. Between steps the weights are streamed once, timed
            // apart: the bandwidth they give is that of the same moments (this shared VM's
            // bandwidth swings within seconds), so the two compare.
            batcher.step(&mut |_, _| Control::Continue)?;
            let mut count = 0;
            let (mut seconds, mut stream_seconds, mut passes) = (0.0, 0.0, 0);
            while !batcher.is_empty() {
                let started = Instant::now();
                batcher.step(&mut |_, e| {
                    if matches!(e, kiem_engine::batch::Event::Token(_)) {
                        count += 1;
                    }
                    Control::Continue
                })?;
                seconds += started.elapsed().as_secs_f64();
                let started = Instant::now();
                kiem_engine::kernels::in_pool(|| {
                    std::hint::black_box(gpt.stream_decoding_weights())
                });
                stream_seconds += started.elapsed().as_secs_f64();
                passes += 1;
            }
            let read_bandwidth = (passes * gpt.decoding_weight_bytes()) as f64 / stream_seconds;
            best_bandwidth = best_bandwidth.max(read_bandwidth);
            repetitions.push(DecodeRepetition {
                tokens_per_second: count as f64 / seconds,
                read_bandwidth,
            });
            best = best.min(seconds);
            generated = count;
        }
        decode.push(DecodeBench {
            batch,
            tokens: generated,
            seconds: best,
            tokens_per_second: generated as f64 / best,
            ms_per_step: 1000.0 * best / ((args.tokens.max(2) - 1) as f64),
            repetitions,
        });
    }
    let bandwidth_fraction = decode.iter().find(|d| d.batch == 1).map(|d| {
        let mut fractions: Vec<f64> = d
            .repetitions
            .iter()
            .map(|r| r.tokens_per_second * bytes_per_token / r.read_bandwidth)
            .collect();
        fractions.sort_by(f64::total_cmp);
        fractions[fractions.len() / 2]
    });
    let report = GenerateBench {
        machine: machine_description(),
        threads,
        parameters: gpt.num_parameters(),
        prompt_tokens: args.prompt_tokens,
        prefill_tokens_per_second: args.prompt_tokens as f64 / prefill_seconds,
        decode,
        read_bandwidth: best_bandwidth,
        weights: gpt.weight_forms(),
        bytes_per_token,
        bandwidth_bound_tokens_per_second: best_bandwidth / bytes_per_token,
        bandwidth_fraction,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("machine: {}", report.machine);
    println!(
        "model: {:.2}M parameters, context {context}; {threads} threads",
        report.parameters as f64 / 1e6
    );
    println!(
        "prefill ({} tokens): {:.0} tokens/s",
        args.prompt_tokens, report.prefill_tokens_per_second
    );
    for d in &report.decode {
        println!(
            "decode batch {:>3}: {:>8.0} tokens/s ({:.2} ms per step, {} tokens)",
            d.batch, d.tokens_per_second, d.ms_per_step, d.tokens
        );
    }
    println!(
        "memory read bandwidth up to {:.1} GB/s; a batch-1 step reads {:.1} MB ({} weights + KV \
         cache), so the bandwidth bound is {:.0} tokens/s",
        report.read_bandwidth / 1e9,
        report.bytes_per_token / 1e6,
        report.weights,
        report.bandwidth_bound_tokens_per_second
    );
    if let (Some(d), Some(fraction)) = (
        report.decode.iter().find(|d| d.batch == 1),
        report.bandwidth_fraction,
    ) {
        println!(
            "batch-1 decode reaches {:.0}% of the bandwidth bound (median over {} repetitions, \
             each against the bandwidth measured between its steps); fastest decode against the highest \
             bandwidth: {:.0}%",
            100.0 * fraction,
            d.repetitions.len(),
            100.0 * d.tokens_per_second / report.bandwidth_bound_tokens_per_second
        );
    }
    Ok(())
}

/// Runs `f` `repeat` times and returns the fastest wall time in seconds.
fn fastest<T>(repeat: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let started = Instant::now();
        let out = f();
        best = best.min(started.elapsed().as_secs_f64());
        last = Some(out);
    }
    (best, last.expect("ran at least once"))
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start worker threads")
}

fn tokenizer(args: TokenizerBenchArgs) -> Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let mut text = String::new();
    for path in &args.inputs {
        text.push_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?,
        );
    }
    let documents: Vec<&str> = text.split("\n\n").filter(|d| !d.is_empty()).collect();
    let bytes: u64 = documents.iter().map(|d| d.len() as u64).sum();
    if bytes == 0 {
        bail!("the inputs hold no text");
    }
    let note = |what: &str| {
        if !args.json {
            eprintln!("measuring {what} ...");
        }
    };

    let gpt2 = Tokenizer::gpt2();
    note("GPT-2 encoding, 1 thread");
    let (single, tokens) = fastest(args.repeat, || {
        documents
            .iter()
            .map(|d| gpt2.encode(d).len() as u64)
            .sum::<u64>()
    });
    note("GPT-2 encoding, all threads");
    let all = pool(threads)?;
    let (multi, _) = fastest(args.repeat, || {
        all.install(|| {
            documents
                .par_iter()
                .map(|d| gpt2.encode(d).len() as u64)
                .sum::<u64>()
        })
    });

    note("BPE training");
    let train_started = Instant::now();
    let trained = all.install(|| {
        kiem_tokenizer::train(
            documents.iter().map(|d| d.to_string()),
            &TrainOptions {
                vocab_size: args.train_vocab,
                min_frequency: 0,
                show_progress: false,
            },
        )
    })?;
    let train_seconds = train_started.elapsed().as_secs_f64();
    note("trained-tokenizer encoding, 1 thread");
    let (trained_single, _) = fastest(args.repeat, || {
        documents
            .iter()
            .map(|d| trained.encode(d).len())
            .sum::<usize>()
    });

    note("data prepare, 1 thread and all threads");
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let prepare_with = |n: usize, name: &str| -> Result<f64> {
        let options = PrepareOptions {
            inputs: args.inputs.clone(),
            out: scratch.path().join(name),
            val_fraction: 0.01,
            corpus: CorpusOptions {
                split_on_blank_lines: true,
                ..Default::default()
            },
            skip_bad_records: false,
            shard_tokens: 100_000_000,
            overwrite: true,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let report = pool(n)?.install(|| prepare(&gpt2, &options, cancel, &mut |_| {}))?;
        let m = &report.manifest;
        Ok(mb_per_s(
            m.train.bytes + m.val.bytes,
            report.elapsed.as_secs_f64(),
        ))
    };
    let prepare_single = prepare_with(1, "one")?;
    let prepare_all = prepare_with(threads, "all")?;

    let result = TokenizerBench {
        machine: machine_description(),
        threads,
        documents: documents.len(),
        bytes,
        gpt2_tokens: tokens,
        gpt2_encode_1_thread_mb_s: mb_per_s(bytes, single),
        gpt2_encode_all_threads_mb_s: mb_per_s(bytes, multi),
        trained_vocab: trained.vocab_size(),
        bpe_train_seconds: train_seconds,
        trained_encode_1_thread_mb_s: mb_per_s(bytes, trained_single),
        prepare_1_thread_mb_s: prepare_single,
        prepare_all_threads_mb_s: prepare_all,
    };
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        let r = &result;
        println!("machine: {}", r.machine);
        println!(
            "text: {} documents, {:.1} MB, {} GPT-2 tokens",
            r.documents,
            r.bytes as f64 / 1e6,
            r.gpt2_tokens
        );
        println!(
            "GPT-2 encode, 1 thread:          {:8.2} MB/s",
            r.gpt2_encode_1_thread_mb_s
        );
        println!(
            "GPT-2 encode, {} threads:         {:8.2} MB/s",
            r.threads, r.gpt2_encode_all_threads_mb_s
        );
        println!(
            "BPE training to {} tokens:     {:8.2} s",
            r.trained_vocab, r.bpe_train_seconds
        );
        println!(
            "trained encode, 1 thread:        {:8.2} MB/s",
            r.trained_encode_1_thread_mb_s
        );
        println!(
            "data prepare (gpt2), 1 thread:   {:8.2} MB/s",
            r.prepare_1_thread_mb_s
        );
        println!(
            "data prepare (gpt2), {} threads:  {:8.2} MB/s ({:.2}x)",
            r.threads,
            r.prepare_all_threads_mb_s,
            r.prepare_all_threads_mb_s / r.prepare_1_thread_mb_s
        );
    }
    Ok(())
}

/// CPU model and core count, for benchmark records.
pub fn machine_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores available")
}
