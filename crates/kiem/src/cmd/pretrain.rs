use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiem_data::prepare::DataDir;
use kiem_engine::config::{Arch, Block, Rope, RopeScaling};
use kiem_engine::kernels::MatmulPrecision;
use kiem_engine::ModelConfig;
use kiem_train::trainer::{EvalReport, Observer, StepReport, RUN_FILE};
use kiem_train::{Schedule, ScheduleKind, TrainConfig};

use super::cancel_flag;
use crate::progress;
use crate::ThreadArgs;

#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Prepared data directory (from `kiem data prepare`).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,

    /// Run directory: checkpoints, metrics.jsonl, loss.png and the final model go here.
    #[arg(long, value_name = "RUN_DIR")]
    out: Option<PathBuf>,

    /// Continue the run in RUN_DIR from its last checkpoint, bit for bit (only --steps, --tokens,
    /// --threads and --zero may change).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,

    /// Start from this model's weights instead of random ones (a Hugging Face GPT-2, Llama,
    /// Qwen2 or Mistral directory, e.g. an imported model or RUN_DIR/model, or a GGUF file);
    /// its architecture and shape are used, and the data must be prepared with its tokenizer
    /// (`--tokenizer DIR|FILE.gguf`).
    #[arg(long, value_name = "DIR|FILE", conflicts_with_all = ["depth", "n_layer", "n_head", "n_embd"])]
    init_from: Option<PathBuf>,

    /// Architecture of a new model: gpt2 (layer norm, learned positions, GELU MLP, biases,
    /// tied head) or llama (RMS norm, rotary positions with theta 10000, SwiGLU MLP of width
    /// 8/3·n_embd rounded up to 64, grouped-query attention with n_head/2 key/value heads, no
    /// biases, tied head, as small modern models such as SmolLM2) [default: gpt2].
    #[arg(long, value_enum, value_name = "ARCH", conflicts_with = "init_from")]
    arch: Option<ArchArg>,

    /// Key/value heads for --arch llama (a divisor of the heads; 1 = multi-query attention)
    /// [default: n_head / 2 when even, else n_head].
    #[arg(long, value_name = "N", requires = "arch")]
    n_kv_head: Option<usize>,

    /// One dial for the model size: D layers, width 64·D, D heads of 64, and a learning rate
    /// scaled to the width (default when no shape flags are given: 6).
    #[arg(long, value_name = "D")]
    depth: Option<usize>,

    /// Transformer blocks (give --n-layer, --n-head and --n-embd together).
    #[arg(long, value_name = "N")]
    n_layer: Option<usize>,

    /// Attention heads per block.
    #[arg(long, value_name = "N")]
    n_head: Option<usize>,

    /// Width of the residual stream (a multiple of --n-head).
    #[arg(long, value_name = "N")]
    n_embd: Option<usize>,

    /// Context length in tokens [default: 256]. With --init-from: the length of the training
    /// rows, at most the base's context (which the model keeps) [default: the base's context,
    /// at most 2048].
    #[arg(long, value_name = "T")]
    context: Option<usize>,

    /// Sequences per forward/backward pass [default: 8].
    #[arg(long, value_name = "B")]
    micro_batch: Option<usize>,

    /// Tokens per optimizer step; gradients accumulate over --micro-batch passes to reach it
    /// [default: micro-batch × context].
    #[arg(long, value_name = "N")]
    batch_tokens: Option<usize>,

    /// Optimizer steps to train for.
    #[arg(long, value_name = "N", conflicts_with = "tokens")]
    steps: Option<u64>,

    /// Tokens to train on (rounded up to whole steps); alternative to --steps.
    #[arg(long, value_name = "N")]
    tokens: Option<u64>,

    /// Peak learning rate [default: from --depth/--n-embd: 6e-4 × 768 / width, at most 3e-3].
    #[arg(long, value_name = "LR")]
    lr: Option<f32>,

    /// Final learning rate of the decay [default: lr / 10].
    #[arg(long, value_name = "LR")]
    min_lr: Option<f32>,

    /// Steps of linear warmup [default: 1% of the steps, between 1 and 100].
    #[arg(long, value_name = "N")]
    warmup_steps: Option<u64>,

    /// Learning-rate schedule after warmup [default: cosine].
    #[arg(long, value_enum, value_name = "KIND")]
    schedule: Option<ScheduleArg>,

    /// For --schedule wsd: fraction of the steps spent decaying at the end [default: 0.2].
    #[arg(long, value_name = "F")]
    decay_fraction: Option<f32>,

    /// Decoupled AdamW weight decay on matrices (not biases or layer norms) [default: 0.1].
    #[arg(long, value_name = "W")]
    weight_decay: Option<f32>,

    /// Clip the global gradient norm to this (0 = off) [default: 1.0].
    #[arg(long, value_name = "N")]
    grad_clip: Option<f32>,

    /// AdamW beta1 [default: 0.9].
    #[arg(long, value_name = "B")]
    beta1: Option<f32>,

    /// AdamW beta2 [default: 0.95].
    #[arg(long, value_name = "B")]
    beta2: Option<f32>,

    /// Evaluate on the validation split every N steps and at the end (0 = only at the end)
    /// [default: 250].
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,

    /// Validation tokens per evaluation [default: 65536].
    #[arg(long, value_name = "N")]
    eval_tokens: Option<usize>,

    #[command(flatten)]
    eval_tasks: EvalTaskArgs,

    /// Print a generated text sample every N steps (0 = never) [default: 500].
    #[arg(long, value_name = "N")]
    sample_every: Option<u64>,

    /// Tokens per text sample [default: 64].
    #[arg(long, value_name = "N")]
    sample_tokens: Option<usize>,

    /// Save a checkpoint every N steps (and always at the end) [default: 500].
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<u64>,

    /// Checkpoints to keep (older ones are deleted) [default: 3].
    #[arg(long, value_name = "K")]
    keep_checkpoints: Option<usize>,

    /// Seed for initialization and sampling [default: 1337].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,

    /// Operands of the matrix products: fp32; bf16 (fp32 sums and master weights; needs
    /// AVX512-BF16; products about 1.7x faster on AMD Zen 4, not on Intel Xeons without
    /// `KIEM_BF16=amx`); or auto: bf16 where it is the faster (AMX tiles in use, or
    /// AVX512-BF16 on a non-Intel CPU), else fp32. The run records the one used [default: fp32].
    #[arg(long, value_name = "P", value_parser = crate::parse_training_precision)]
    precision: Option<MatmulPrecision>,

    /// Keep only each layer's input and recompute its activations in the backward pass:
    /// activation memory of one layer instead of all (long contexts) for about a third more
    /// compute; results are the same bits.
    #[arg(long)]
    recompute: bool,

    #[command(flatten)]
    sharding: ShardingArgs,

    #[command(flatten)]
    threads: ThreadArgs,
}

/// How a job of several processes (`mpirun -n N kiem ...`, built with `--features mpi`) divides
/// its optimizer state. It may change on --resume: checkpoints hold the whole state.
#[derive(Args, Debug, Clone)]
pub struct ShardingArgs {
    /// ZeRO stage under MPI: 0 = every process keeps all AdamW moments, 1 = each keeps 1/N of
    /// them (gradients reduce-scattered, parameters all-gathered), cutting optimizer memory per
    /// process by N for the same results [default: 0].
    #[arg(long, value_name = "STAGE")]
    zero: Option<u8>,
}

impl ShardingArgs {
    /// Sets the run's ZeRO stage where the flag was given.
    pub fn apply(&self, config: &mut TrainConfig) {
        if let Some(stage) = self.zero {
            config.zero = stage;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ArchArg {
    Gpt2,
    Llama,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Cosine,
    Wsd,
}

/// Benchmark tasks a training run scores at each evaluation.
#[derive(Args, Debug, Clone, Default)]
pub struct EvalTaskArgs {
    /// Benchmark task files (the formats `kiem eval --task` reads: multiple choice or
    /// generation) scored at each evaluation; the scores go to metrics.jsonl and are plotted
    /// below the loss in loss.png.
    #[arg(long = "eval-tasks", num_args = 1.., value_name = "FILE")]
    pub tasks: Vec<PathBuf>,

    /// Questions (or examples) of each --eval-tasks file scored per evaluation [default: all].
    #[arg(long = "eval-task-limit", value_name = "N", requires = "tasks")]
    pub limit: Option<usize>,
}

impl EvalTaskArgs {
    pub fn check(&self) -> Result<()> {
        if self.limit == Some(0) {
            bail!("--eval-task-limit must be at least 1");
        }
        // A bad task file fails before any training.
        for path in &self.tasks {
            kiem_eval::tasks::load(path)?;
        }
        Ok(())
    }
}

impl PretrainArgs {
    /// Flags that define the run and so cannot change on --resume.
    fn run_defining_flags(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        let mut check = |present: bool, name: &'static str| {
            if present {
                given.push(name);
            }
        };
        check(self.data.is_some(), "--data");
        check(self.out.is_some(), "--out");
        check(self.depth.is_some(), "--depth");
        check(self.arch.is_some(), "--arch");
        check(self.n_kv_head.is_some(), "--n-kv-head");
        check(self.init_from.is_some(), "--init-from");
        check(self.n_layer.is_some(), "--n-layer");
        check(self.n_head.is_some(), "--n-head");
        check(self.n_embd.is_some(), "--n-embd");
        check(self.context.is_some(), "--context");
        check(self.micro_batch.is_some(), "--micro-batch");
        check(self.batch_tokens.is_some(), "--batch-tokens");
        check(self.lr.is_some(), "--lr");
        check(self.min_lr.is_some(), "--min-lr");
        check(self.warmup_steps.is_some(), "--warmup-steps");
        check(self.schedule.is_some(), "--schedule");
        check(self.decay_fraction.is_some(), "--decay-fraction");
        check(self.weight_decay.is_some(), "--weight-decay");
        check(self.grad_clip.is_some(), "--grad-clip");
        check(self.beta1.is_some(), "--beta1");
        check(self.beta2.is_some(), "--beta2");
        check(self.seed.is_some(), "--seed");
        check(self.precision.is_some(), "--precision");
        check(self.recompute, "--recompute");
        check(!self.eval_tasks.tasks.is_empty(), "--eval-tasks");
        check(self.eval_tasks.limit.is_some(), "--eval-task-limit");
        given
    }

    fn steps_for(&self, batch_tokens: usize) -> Option<u64> {
        self.steps
            .or(self.tokens.map(|t| t.div_ceil(batch_tokens as u64)))
    }

    fn config(&self, data_dir: &Path, vocab_size: usize) -> Result<TrainConfig> {
        let base = match &self.init_from {
            Some(dir) => Some(kiem_train::model_source::read_config(dir)?.0),
            None => None,
        };
        if self.n_kv_head.is_some() && self.arch != Some(ArchArg::Llama) {
            bail!(
                "--n-kv-head applies to --arch llama (GPT-2 has one key/value head per query head)"
            );
        }
        // Tokens per training row: --context, up to the base's context with --init-from (whose
        // model keeps its own context: 128k-position bases train on shorter rows).
        let (context, seq) = match base {
            Some(b) => {
                let seq = self.context.unwrap_or(b.context.min(2048));
                if seq > b.context {
                    bail!(
                        "--context {seq} is longer than the base model's context of {}",
                        b.context
                    );
                }
                (b.context, seq)
            }
            None => {
                let c = self.context.unwrap_or(256);
                (c, c)
            }
        };
        let shape = match base {
            Some(b) => (Some(b.n_layer), Some(b.n_head), Some(b.n_embd), None),
            None => (self.n_layer, self.n_head, self.n_embd, self.depth),
        };
        let (n_layer, n_head, n_embd) = match shape {
            (Some(l), Some(h), Some(c), None) => (l, h, c),
            (None, None, None, depth) => {
                let d = depth.unwrap_or(6);
                if d == 0 || d > 64 {
                    bail!("--depth {d} is out of range: choose 1..=64");
                }
                (d, d, 64 * d)
            }
            (_, _, _, Some(_)) => {
                bail!("give either --depth or --n-layer/--n-head/--n-embd, not both")
            }
            _ => bail!("give --n-layer, --n-head and --n-embd together (or use --depth)"),
        };
        let model = match (base, self.arch) {
            // The base's own vocabulary (its embedding may have rows beyond the tokenizer).
            (Some(base), _) => base,
            (None, Some(ArchArg::Llama)) => {
                let kv =
                    self.n_kv_head
                        .unwrap_or(if n_head % 2 == 0 { n_head / 2 } else { n_head });
                let rope = Rope {
                    theta: 10_000.0,
                    scaling: RopeScaling::Default,
                };
                let mut block = Block::llama(1e-5, rope);
                block.tied_head = true;
                ModelConfig {
                    arch: Arch::Llama,
                    block,
                    n_kv_head: Some(kv),
                    mlp_hidden: Some((8 * n_embd).div_ceil(3 * 64) * 64),
                    ..ModelConfig::gpt2(n_layer, n_head, n_embd, context, vocab_size)
                }
            }
            (None, _) => ModelConfig::gpt2(n_layer, n_head, n_embd, context, vocab_size),
        };
        model.validate()?;
        let micro_batch = self.micro_batch.unwrap_or(8);
        let batch_tokens = self.batch_tokens.unwrap_or(micro_batch * seq);
        let Some(steps) = self.steps_for(batch_tokens) else {
            bail!("say how long to train: --steps N or --tokens N");
        };
        let lr = self
            .lr
            .unwrap_or_else(|| (6e-4 * 768.0 / n_embd as f32).min(3e-3));
        let schedule = Schedule {
            kind: match self.schedule {
                Some(ScheduleArg::Wsd) => ScheduleKind::Wsd,
                _ => ScheduleKind::Cosine,
            },
            lr,
            min_lr: self.min_lr.unwrap_or(lr / 10.0),
            warmup_steps: self.warmup_steps.unwrap_or((steps / 100).clamp(1, 100)),
            total_steps: steps,
            decay_fraction: self.decay_fraction.unwrap_or(0.2),
        };
        Ok(TrainConfig {
            source: kiem_train::trainer::DataSource::Pretrain {
                data_dir: data_dir.to_path_buf(),
                init_from: self.init_from.clone(),
            },
            model,
            seq,
            micro_batch,
            batch_tokens,
            steps,
            schedule,
            weight_decay: self.weight_decay.unwrap_or(0.1),
            grad_clip: self.grad_clip.unwrap_or(1.0),
            beta1: self.beta1.unwrap_or(0.9),
            beta2: self.beta2.unwrap_or(0.95),
            eps: 1e-8,
            eval_every: self.eval_every.unwrap_or(250),
            eval_tokens: self.eval_tokens.unwrap_or(65536),
            eval_tasks: self.eval_tasks.tasks.clone(),
            eval_task_limit: self.eval_tasks.limit,
            sample_every: self.sample_every.unwrap_or(500),
            sample_tokens: self.sample_tokens.unwrap_or(64),
            checkpoint_every: self.checkpoint_every.unwrap_or(500),
            keep_checkpoints: self.keep_checkpoints.unwrap_or(3),
            seed: self.seed.unwrap_or(1337),
            precision: self.precision.unwrap_or_default(),
            lora: None,
            pack: false,
            base_weights: None,
            base_as_stored: false,
            recompute: self.recompute,
            zero: 0,
        })
    }
}

pub fn run(args: PretrainArgs) -> Result<()> {
    let threads = args.threads.install()?;
    args.eval_tasks.check()?;
    let (run_dir, config, resume) = match &args.resume {
        Some(run_dir) => {
            let given = args.run_defining_flags();
            if !given.is_empty() {
                bail!(
                    "--resume continues a run exactly as it was defined; these flags cannot change: {} \
                     (only --steps, --tokens, --threads and --zero may)",
                    given.join(", ")
                );
            }
            let mut config = read_run_config(run_dir)?;
            if let Some(steps) = args.steps_for(config.batch_tokens) {
                config.set_steps(steps);
            }
            args.sharding.apply(&mut config);
            (run_dir.clone(), config, true)
        }
        None => {
            let Some(data) = &args.data else {
                bail!("--data DIR is required (a directory made by `kiem data prepare`)");
            };
            let Some(out) = &args.out else {
                bail!("--out RUN_DIR is required (where checkpoints and the model go)");
            };
            if out.join(RUN_FILE).exists() {
                bail!(
                    "{} already holds a run; continue it with --resume {} or choose another --out",
                    out.display(),
                    out.display()
                );
            }
            let data_dir = DataDir::open(data)?;
            let mut config = args.config(data, data_dir.manifest.tokenizer.vocab_size)?;
            args.sharding.apply(&mut config);
            (out.clone(), config, false)
        }
    };
    let mut observer = CliObserver::new(threads);
    let summary = kiem_train::pretrain(&run_dir, &config, resume, &cancel_flag(), &mut observer);
    observer.finish();
    print_summary(&summary?, &run_dir, "pretrain");
    Ok(())
}

/// The configuration a run was started with (`RUN_DIR/run.json`).
pub fn read_run_config(run_dir: &Path) -> Result<TrainConfig> {
    let path = run_dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a kiem run directory (no {RUN_FILE})",
            run_dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))
}

/// The closing lines of a training command (from the first process of a job only).
pub fn print_summary(summary: &kiem_train::Summary, run_dir: &Path, command: &str) {
    if kiem_dist::world().rank() != 0 {
        return;
    }
    println!(
        "{} {} steps, {} tokens in {:.1}s ({:.0} tokens/s this session); final train loss {:.4}",
        if summary.interrupted {
            "interrupted after"
        } else {
            "trained"
        },
        summary.steps,
        progress::count(summary.tokens),
        summary.seconds,
        summary.tokens_per_second,
        summary.last_loss
    );
    if let (Some(loss), Some(bpb)) = (summary.best_val_loss, summary.best_val_bpb) {
        println!("best validation loss {loss:.4} ({bpb:.4} bits per byte)");
    }
    if summary.interrupted {
        println!(
            "checkpoint saved; continue with: kiem {command} --resume {}",
            run_dir.display()
        );
    } else if let Some(base) = &summary.base_model {
        println!(
            "adapters: {} (PEFT's format, for the base {}); metrics: {}; plot: {}\n\
             chat with: kiem chat --model {} --adapter {}",
            summary.model_dir.display(),
            base.display(),
            run_dir.join("metrics.jsonl").display(),
            run_dir.join("loss.png").display(),
            base.display(),
            summary.model_dir.display()
        );
    } else {
        println!(
            "model: {} (a Hugging Face model directory); metrics: {}; plot: {}",
            summary.model_dir.display(),
            run_dir.join("metrics.jsonl").display(),
            run_dir.join("loss.png").display()
        );
    }
}

pub struct CliObserver {
    bar: ProgressBar,
    threads: usize,
    /// Without a terminal, a log line every this many steps.
    log_every: u64,
    tty: bool,
}

impl CliObserver {
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    pub fn new(threads: usize) -> Self {
        Self {
            bar: ProgressBar::hidden(),
            threads,
            log_every: 1,
            tty: std::io::stderr().is_terminal() && !progress::quiet(),
        }
    }

    fn line(&self, text: &str) {
        if progress::quiet() {
            return;
        }
        if self.tty {
            self.bar.println(text);
        } else {
            eprintln!("{text}");
        }
    }
}

impl Observer for CliObserver {
    fn started(&mut self, resumed_from: Option<u64>, config: &TrainConfig, params: usize) {
        let m = &config.model;
        self.line(&format!(
            "{} {}: {} layers, {} heads ({} key/value), width {}, context {}, vocab {} = {:.2}M parameters; \
             up to {} tokens/step ({} rows × {} × {} accumulation), {} steps, {} threads, \
             {} matmuls",
            if resumed_from.is_some() {
                "resuming"
            } else {
                "training"
            },
            m.arch.name(),
            m.n_layer,
            m.n_head,
            m.kv_heads(),
            m.n_embd,
            m.context,
            m.vocab_size,
            params as f64 / 1e6,
            config.batch_tokens,
            config.micro_batch,
            config.seq,
            config.grad_accumulation(),
            config.steps,
            self.threads,
            config.precision.name()
        ));
        if let Some(step) = resumed_from {
            self.line(&format!("resumed from the checkpoint at step {step}"));
        }
        self.log_every = (config.steps / 50).max(1);
        if self.tty {
            self.bar = ProgressBar::new(config.steps);
            self.bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            self.bar.set_position(resumed_from.unwrap_or(0));
        }
    }

    fn step(&mut self, r: &StepReport) {
        let msg = format!(
            "loss {:.4} lr {:.2e} |g| {:.2} {:.0} tok/s",
            r.loss, r.lr, r.grad_norm, r.tokens_per_second
        );
        if self.tty {
            self.bar.set_position(r.step);
            self.bar.set_message(msg);
        } else if r.step.is_multiple_of(self.log_every) || r.step == r.total_steps {
            self.line(&format!("step {}/{} {msg}", r.step, r.total_steps));
        }
    }

    fn eval(&mut self, r: &EvalReport) {
        self.line(&format!(
            "step {}: validation loss {:.4}, {:.4} bits per byte ({} tokens)",
            r.step, r.val_loss, r.val_bpb, r.tokens
        ));
    }

    fn tasks(&mut self, scores: &kiem_train::trainer::TaskScores) {
        for brief in &scores.tasks {
            let metrics: Vec<String> = brief
                .metrics
                .iter()
                .map(|(name, value)| format!("{name} {value:.4}"))
                .collect();
            self.line(&format!(
                "step {}: {} ({} examples): {}",
                scores.step,
                brief.task,
                brief.examples,
                metrics.join(", ")
            ));
        }
    }

    fn sample(&mut self, step: u64, text: &str) {
        self.line(&format!("step {step} sample: {text:?}"));
    }

    fn checkpoint(&mut self, step: u64, dir: &Path) {
        self.line(&format!("step {step}: checkpoint {}", dir.display()));
    }

    fn note(&mut self, message: &str) {
        self.line(&format!("note: {message}"));
    }
}
