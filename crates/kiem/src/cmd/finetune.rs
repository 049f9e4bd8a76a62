use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use kiem_engine::kernels::{DecodingWeights, MatmulPrecision};
use kiem_engine::lora::LoraSpec;
use kiem_train::examples::{load_examples, FinetuneData};
use kiem_train::trainer::{load_finetune_base, refuse_added_tokens_for_lora, DataSource, RUN_FILE};
use kiem_train::{Schedule, ScheduleKind, TrainConfig};

use super::cancel_flag;
use super::chat_format::{FormatArg, TrainOnArg};
use super::pretrain::{print_summary, read_run_config, CliObserver, ShardingArgs};
use crate::ThreadArgs;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// The model to start from: a kiem model (e.g. RUN_DIR/model) or a Hugging Face GPT-2,
    /// Llama, Qwen2 or Mistral directory, or a GGUF file (dequantized to fp32 weights). A model
    /// with a chat template is fine-tuned in its own format; others learn kiem's chat format
    /// (its tokens are added).
    #[arg(long, value_name = "DIR|FILE")]
    model: Option<PathBuf>,

    /// JSONL conversations: OpenAI messages, ShareGPT, Alpaca or prompt/completion.
    #[arg(long = "data", num_args = 1.., value_name = "FILE")]
    data: Vec<PathBuf>,

    /// Run directory for checkpoints, metrics, plot and the fine-tuned model.
    #[arg(long, value_name = "RUN_DIR")]
    out: Option<PathBuf>,

    /// Continue the fine-tuning run in RUN_DIR from its last checkpoint (only --steps,
    /// --threads and --zero may change).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,

    /// Held-out conversations for evaluation (default: --val-fraction of --data).
    #[arg(long = "val-data", num_args = 1.., value_name = "FILE")]
    val_data: Vec<PathBuf>,

    /// Fraction of --data held out (by a hash of each conversation) when no --val-data.
    #[arg(long, default_value_t = 0.1, value_name = "F")]
    val_fraction: f64,

    /// Record format (default: detected per record).
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,

    /// Train on the assistant replies (and their end token) or on every token.
    #[arg(long, value_enum, default_value = "assistant")]
    train_on: TrainOnArg,

    /// Skip malformed records (reporting how many) instead of stopping at the first.
    #[arg(long)]
    skip_bad_records: bool,

    /// Passes over the training conversations (ignored with --steps).
    #[arg(long, default_value_t = 3, value_name = "N")]
    epochs: u64,

    /// Optimizer steps (default: from --epochs).
    #[arg(long, value_name = "N")]
    steps: Option<u64>,

    /// Conversations per forward/backward pass (one per row, padded).
    #[arg(long, default_value_t = 8, value_name = "B")]
    micro_batch: usize,

    /// Micro-batches whose gradients are summed per optimizer step.
    #[arg(long, default_value_t = 1, value_name = "N")]
    grad_accum: usize,

    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4, value_name = "LR")]
    lr: f32,

    /// Final learning rate [default: lr / 10].
    #[arg(long, value_name = "LR")]
    min_lr: Option<f32>,

    /// Steps of linear warmup [default: 5% of the steps, at least 1].
    #[arg(long, value_name = "N")]
    warmup_steps: Option<u64>,

    /// Decoupled AdamW weight decay on matrices.
    #[arg(long, default_value_t = 0.0, value_name = "W")]
    weight_decay: f32,

    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0, value_name = "N")]
    grad_clip: f32,

    /// Evaluate on the held-out conversations every N steps and at the end (0 = only at the end).
    #[arg(long, default_value_t = 50, value_name = "N")]
    eval_every: u64,

    #[command(flatten)]
    eval_tasks: super::pretrain::EvalTaskArgs,

    /// Save a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 200, value_name = "N")]
    checkpoint_every: u64,

    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3, value_name = "K")]
    keep_checkpoints: usize,

    /// Seed for the order of conversations.
    #[arg(long, default_value_t = 1337, value_name = "S")]
    seed: u64,

    /// Operands of the matrix products: fp32; bf16 (fp32 sums and master weights; needs
    /// AVX512-BF16; products about 1.7x faster on AMD Zen 4, not on Intel Xeons without
    /// `KIEM_BF16=amx`); or auto: bf16 where it is the faster (AMX tiles in use, or
    /// AVX512-BF16 on a non-Intel CPU), else fp32. The run records the one used [default: fp32].
    #[arg(long, value_name = "P", value_parser = crate::parse_training_precision)]
    precision: Option<MatmulPrecision>,

    /// Train LoRA adapters of rank R on a frozen base instead of every weight: the run writes
    /// RUN_DIR/adapter in PEFT's format (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_name = "R")]
    lora_rank: Option<usize>,

    /// LoRA's alpha: adapters are scaled by alpha/R (alpha/√R with --use-rslora) [default: R].
    #[arg(long, value_name = "A", requires = "lora_rank")]
    lora_alpha: Option<f32>,

    /// Dropout on the adapters' input while training, as PEFT's lora_dropout.
    #[arg(long, default_value_t = 0.0, value_name = "P", requires = "lora_rank")]
    lora_dropout: f32,

    /// Modules to adapt, comma-separated: q,k,v,o,gate,up,down (Llama family; or q_proj ...)
    /// or c_attn,c_proj,c_fc (GPT-2), or the groups attn, mlp, all.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all",
        value_name = "LIST",
        requires = "lora_rank"
    )]
    lora_targets: Vec<String>,

    /// Scale adapters by alpha/√R (rank-stabilized LoRA) instead of alpha/R.
    #[arg(long, requires = "lora_rank")]
    use_rslora: bool,

    /// How the frozen base keeps its layer matrices while adapters train: fp32, bf16, q8_0,
    /// q4_0, q4_1 or q4_k (QLoRA: about 1/6 of fp32's bytes), read dequantized by every
    /// product. Embeddings, norms and the output head stay fp32 [default: a GGUF base's layer
    /// matrices as the file stores them, read straight from its blocks; else fp32].
    #[arg(long, value_name = "W", requires = "lora_rank")]
    base_weights: Option<DecodingWeights>,

    /// Pack several conversations into each row (as many as fit in the longest one's length),
    /// positions restarting and attention never crossing between them, instead of one padded
    /// row per conversation: fewer wasted tokens when lengths vary.
    #[arg(long)]
    pack: bool,

    /// Keep only each layer's input and recompute its activations in the backward pass:
    /// activation memory of one layer instead of all (long conversations) for about a third
    /// more compute; results are the same bits.
    #[arg(long)]
    recompute: bool,

    #[command(flatten)]
    sharding: ShardingArgs,

    #[command(flatten)]
    threads: ThreadArgs,
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let threads = args.threads.install()?;
    args.eval_tasks.check()?;
    let mut observer = CliObserver::new(threads);
    let cancel = cancel_flag();
    let (run_dir, summary) = if let Some(run_dir) = &args.resume {
        if args.model.is_some()
            || !args.data.is_empty()
            || args.out.is_some()
            || args.precision.is_some()
            || args.lora_rank.is_some()
            || args.pack
            || args.recompute
            || args.base_weights.is_some()
            || !args.eval_tasks.tasks.is_empty()
        {
            bail!("--resume continues a run as it was defined: give only --steps, --threads and --zero with it");
        }
        let mut config = read_run_config(run_dir)?;
        if let Some(steps) = args.steps {
            config.set_steps(steps);
        }
        args.sharding.apply(&mut config);
        let summary = kiem_train::trainer::finetune(run_dir, &config, None, &cancel, &mut observer);
        (run_dir.clone(), summary)
    } else {
        let Some(model) = &args.model else {
            bail!("--model DIR is required (the model to fine-tune)")
        };
        let Some(out) = &args.out else {
            bail!("--out RUN_DIR is required")
        };
        if args.data.is_empty() {
            bail!("--data FILE is required (JSONL conversations)");
        }
        if out.join(RUN_FILE).exists() {
            bail!(
                "{} already holds a run; continue it with --resume {}",
                out.display(),
                out.display()
            );
        }
        if !(0.0..1.0).contains(&args.val_fraction) {
            bail!(
                "--val-fraction {} is out of range: choose 0 <= F < 1",
                args.val_fraction
            );
        }
        let spec = FinetuneData {
            base_model: model.clone(),
            data: args.data.clone(),
            val_data: args.val_data.clone(),
            val_fraction: args.val_fraction,
            format: format_name(args.format).into(),
            train_on: args.train_on.into(),
            skip_bad_records: args.skip_bad_records,
        };
        let lora = args.lora_rank.map(|rank| LoraSpec {
            rank,
            alpha: args.lora_alpha.unwrap_or(rank as f32),
            dropout: args.lora_dropout,
            use_rslora: args.use_rslora,
            targets: args.lora_targets.clone(),
        });
        if let Some(lora) = &lora {
            lora.validate()?;
        }
        // A LoRA run on a GGUF file keeps the base in the file's forms unless told otherwise.
        let base_as_stored =
            lora.is_some() && args.base_weights.is_none() && kiem_engine::gguf::is_gguf(model);
        let (gpt, tokenizer, added) = load_finetune_base(&spec, base_as_stored)?;
        if lora.is_some() {
            refuse_added_tokens_for_lora(&spec.base_model, &added)?;
        }
        let examples = load_examples(&spec, &tokenizer, gpt.config.context)?;
        // In a job of several processes the first reports.
        if kiem_dist::world().rank() == 0 {
            if !added.is_empty() {
                eprintln!(
                    "added {} chat tokens to the tokenizer ({}); the vocabulary grows to {}",
                    added.len(),
                    added.join(" "),
                    tokenizer.vocab_size()
                );
            }
            if let Some(template) = tokenizer.chat_template() {
                if !kiem_tokenizer::chat::uses_typed_format(&tokenizer)? {
                    eprintln!(
                        "conversations are written with the model's chat template ({}); the reply ends at {}",
                        template.origin.display(),
                        tokenizer
                            .id_to_token(kiem_tokenizer::chat::end_of_turn(&tokenizer)?)
                            .unwrap_or_default()
                    );
                }
            }
            super::report_bad_records(&examples.bad);
            if examples.truncated > 0 {
                eprintln!(
                    "note: {} conversations were cut to the model's context of {} tokens",
                    examples.truncated, gpt.config.context
                );
            }
            eprintln!(
                "{} training and {} held-out conversations",
                examples.train.len(),
                examples.val.len()
            );
        }
        let seq = examples.longest().clamp(1, gpt.config.context);
        let per_step = (args.micro_batch * args.grad_accum).max(1) as u64;
        let rows_per_epoch = if args.pack {
            kiem_train::examples::packed_rows(&examples.train, seq)
        } else {
            examples.train.len() as u64
        };
        let steps = args
            .steps
            .unwrap_or_else(|| rows_per_epoch.div_ceil(per_step) * args.epochs.max(1));
        let mut config = TrainConfig {
            source: DataSource::Finetune(spec),
            model: gpt.config,
            seq,
            micro_batch: args.micro_batch,
            batch_tokens: args.micro_batch * args.grad_accum * seq,
            steps,
            schedule: Schedule {
                kind: ScheduleKind::Cosine,
                lr: args.lr,
                min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
                warmup_steps: args.warmup_steps.unwrap_or((steps / 20).max(1)),
                total_steps: steps,
                decay_fraction: 0.2,
            },
            weight_decay: args.weight_decay,
            grad_clip: args.grad_clip,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            eval_every: args.eval_every,
            eval_tokens: usize::MAX / 2,
            eval_tasks: args.eval_tasks.tasks.clone(),
            eval_task_limit: args.eval_tasks.limit,
            sample_every: 0,
            sample_tokens: 0,
            checkpoint_every: args.checkpoint_every,
            keep_checkpoints: args.keep_checkpoints,
            seed: args.seed,
            precision: args.precision.unwrap_or_default(),
            base_weights: args
                .base_weights
                .filter(|&w| lora.is_some() && w != DecodingWeights::Fp32),
            base_as_stored,
            lora,
            pack: args.pack,
            recompute: args.recompute,
            zero: 0,
        };
        args.sharding.apply(&mut config);
        let summary = kiem_train::trainer::finetune(
            out,
            &config,
            Some((gpt, tokenizer, examples)),
            &cancel,
            &mut observer,
        );
        (out.clone(), summary)
    };
    observer.finish();
    print_summary(&summary?, &run_dir, "finetune");
    Ok(())
}

fn format_name(format: FormatArg) -> &'static str {
    match format {
        FormatArg::Auto => "auto",
        FormatArg::Openai => "openai",
        FormatArg::Sharegpt => "sharegpt",
        FormatArg::Alpaca => "alpaca",
        FormatArg::PromptCompletion => "prompt-completion",
    }
}
