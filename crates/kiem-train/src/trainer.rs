//! The training loop: gradient accumulation with a token-weighted loss, clipping, AdamW with a
//! schedule, periodic evaluation (loss and bits per byte), text samples, checkpoints, exact
//! resume, metrics and a loss plot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kiem_data::prepare::DataDir;
use kiem_engine::kernels::{DecodingWeights, MatmulPrecision};
use kiem_engine::lora::{Lora, LoraSpec};
use kiem_engine::model::activation_bytes;
use kiem_engine::rng::Rng;
use kiem_engine::{AdamWState, Gpt, ModelConfig};
use kiem_tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    list_checkpoints, load_checkpoint, save_checkpoint, send_moments, write_model_dir, Moments,
    TrainerState,
};
use crate::examples::{load_examples, ExampleLoader, Examples, FinetuneData};
use crate::loader::{Batches, TokenLoader};
use crate::plot::plot_losses;
use crate::schedule::Schedule;
use crate::{Result, TrainError};

pub const RUN_FILE: &str = "run.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.png";
pub const MODEL_DIR: &str = "model";
/// Where a LoRA run writes its adapters (PEFT's format) at the end.
pub const ADAPTER_DIR: &str = "adapter";

/// Everything that defines a run; saved as `run.json` so `--resume` continues the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub source: DataSource,
    pub model: ModelConfig,
    /// Row length: the context for pre-training, the longest example for fine-tuning.
    pub seq: usize,
    pub micro_batch: usize,
    /// Tokens per optimizer step (a multiple of micro_batch × context).
    pub batch_tokens: usize,
    pub steps: u64,
    pub schedule: Schedule,
    pub weight_decay: f32,
    /// 0 disables clipping.
    pub grad_clip: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub eval_every: u64,
    pub eval_tokens: usize,
    /// Benchmark task files (`kiem eval`'s formats) scored at each evaluation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval_tasks: Vec<PathBuf>,
    /// Questions (or examples) of each task scored per evaluation (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_task_limit: Option<usize>,
    pub sample_every: u64,
    pub sample_tokens: usize,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    pub seed: u64,
    /// Operand precision of the layers' matrix products (master weights stay fp32).
    #[serde(default)]
    pub precision: MatmulPrecision,
    /// Train LoRA adapters on a frozen base instead of every weight (fine-tuning only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Fine-tuning rows pack several examples each (attention never crosses them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pack: bool,
    /// How a LoRA run keeps its frozen base's layer matrices: bf16, q8_0 or q4_0 (QLoRA)
    /// instead of fp32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_weights: Option<DecodingWeights>,
    /// A LoRA run on a GGUF file keeps its frozen base's layer matrices in the forms the file
    /// stores them, read straight from its blocks (no fp32 copy at any time; see
    /// [`kiem_engine::gguf::load_gguf_frozen_base`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base_as_stored: bool,
    /// Keep one layer's activations and recompute each layer's in the backward pass: less
    /// memory for long contexts, about a third more compute, the same results.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recompute: bool,
    /// ZeRO stage of a job of several processes: 1 shards the AdamW moments across them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub zero: u8,
}

fn is_zero(stage: &u8) -> bool {
    *stage == 0
}

/// Where the training data comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataSource {
    /// Token shards from `kiem data prepare`, from random weights or from a model's.
    Pretrain {
        data_dir: PathBuf,
        /// Start from this model directory's weights (same shape and tokenizer as the run).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init_from: Option<PathBuf>,
    },
    /// Conversations, starting from a trained model.
    Finetune(FinetuneData),
}

impl TrainConfig {
    pub fn tokens_per_micro_batch(&self) -> usize {
        self.micro_batch * self.seq
    }

    /// Changes the run's length (on resume), keeping the schedule's end at the last step.
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
        self.schedule.total_steps = steps;
    }

    pub fn grad_accumulation(&self) -> usize {
        self.batch_tokens / self.tokens_per_micro_batch()
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let bad = |m: String| Err(TrainError::Config(m));
        let per_micro = self.tokens_per_micro_batch();
        if self.micro_batch == 0 {
            return bad("--micro-batch must be at least 1".into());
        }
        if self.seq == 0 || self.seq > self.model.context {
            return bad(format!(
                "rows of {} tokens do not fit the context of {}",
                self.seq, self.model.context
            ));
        }
        if self.batch_tokens == 0 || !self.batch_tokens.is_multiple_of(per_micro) {
            return bad(format!(
                "--batch-tokens {} must be a positive multiple of --micro-batch × row length = {per_micro}",
                self.batch_tokens
            ));
        }
        if self.steps == 0 {
            return bad("the run needs at least one step (--steps or --tokens)".into());
        }
        let s = &self.schedule;
        if !(s.lr.is_finite() && s.lr > 0.0 && s.min_lr >= 0.0 && s.min_lr <= s.lr) {
            return bad(format!(
                "learning rates must satisfy 0 <= --min-lr ({}) <= --lr ({}), --lr > 0",
                s.min_lr, s.lr
            ));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("AdamW betas must be in [0, 1)".into());
        }
        if self.weight_decay < 0.0 || self.grad_clip < 0.0 {
            return bad("--weight-decay and --grad-clip must not be negative".into());
        }
        let ranks = kiem_dist::world().size();
        let accum = self.grad_accumulation();
        if !accum.is_multiple_of(ranks) {
            return bad(format!(
                "--batch-tokens {} makes {accum} micro-batches per step, which {ranks} processes \
                 cannot share evenly: make it a multiple of processes × --micro-batch × row \
                 length = {}",
                self.batch_tokens,
                ranks * per_micro
            ));
        }
        if self.zero > 1 {
            return bad(format!(
                "--zero {}: only stage 1 (sharded AdamW moments) is implemented",
                self.zero
            ));
        }
        if self.pack && !matches!(self.source, DataSource::Finetune(_)) {
            return bad(
                "--pack packs fine-tuning examples; pre-training rows are full already".into(),
            );
        }
        if let Some(lora) = &self.lora {
            if !matches!(self.source, DataSource::Finetune(_)) {
                return bad("LoRA adapters train in fine-tuning runs only".into());
            }
            lora.validate()?;
            kiem_engine::lora::select_targets(self.model.arch, &lora.targets)?;
        }
        if self.base_weights.is_some() && self.lora.is_none() {
            return bad(
                "--base-weights stores a frozen base: it needs LoRA adapters (--lora-rank)".into(),
            );
        }
        if self.base_as_stored {
            let gguf_base = matches!(&self.source,
                DataSource::Finetune(spec) if kiem_engine::gguf::is_gguf(&spec.base_model));
            if self.lora.is_none() || self.base_weights.is_some() || !gguf_base {
                return bad(
                    "a base kept as its file stores it needs a GGUF base model, LoRA adapters \
                     and no --base-weights"
                        .into(),
                );
            }
        }
        if let Some((weights, kind)) = self
            .base_weights
            .and_then(|w| w.quant_kind().map(|k| (w, k)))
        {
            // Checked before the run writes anything: quantized rows are whole blocks.
            let m = &self.model;
            let widths = [m.n_embd, m.q_width(), m.mlp_hidden()];
            let block = kind.row_multiple();
            if widths.iter().any(|w| w % block != 0) {
                return bad(format!(
                    "--base-weights {} needs layer inputs of whole {block}-weight blocks, but \
                     this model's widths are {widths:?}: choose bf16",
                    weights.name()
                ));
            }
        }
        Ok(())
    }
}

/// One optimizer step, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    /// Seconds this step spent exchanging gradients and parameters between processes (jobs of
    /// several processes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub step: u64,
    pub val_loss: f64,
    pub val_bpb: f64,
    pub tokens: usize,
}

/// The benchmark tasks' scores at one evaluation (a line of metrics.jsonl:
/// `{"step": N, "tasks": {"name": {"examples": n, "acc_norm": x, ...}}}`).
#[derive(Debug, Clone)]
pub struct TaskScores {
    pub step: u64,
    pub tasks: Vec<kiem_eval::Brief>,
}

impl Serialize for TaskScores {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let tasks: serde_json::Map<String, serde_json::Value> = self
            .tasks
            .iter()
            .map(|b| {
                let mut m = serde_json::Map::new();
                m.insert("examples".into(), b.examples.into());
                for &(name, value) in &b.metrics {
                    m.insert(name.into(), value.into());
                }
                (b.task.clone(), m.into())
            })
            .collect();
        serde_json::json!({"step": self.step, "tasks": tasks}).serialize(s)
    }
}

/// Reports nothing (the processes of a job other than the first).
struct Silent;
impl Observer for Silent {}

/// What a caller (the CLI) shows while training runs.
pub trait Observer {
    fn started(&mut self, _resumed_from: Option<u64>, _config: &TrainConfig, _params: usize) {}
    fn step(&mut self, _report: &StepReport) {}
    fn eval(&mut self, _report: &EvalReport) {}
    fn tasks(&mut self, _scores: &TaskScores) {}
    fn sample(&mut self, _step: u64, _text: &str) {}
    fn checkpoint(&mut self, _step: u64, _dir: &Path) {}
    fn note(&mut self, _message: &str) {}
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub best_val_loss: Option<f64>,
    pub best_val_bpb: Option<f64>,
    pub last_loss: f64,
    /// The trained model; in a LoRA run, the adapters for `base_model`.
    pub model_dir: PathBuf,
    /// The base model a LoRA run's adapters belong to.
    pub base_model: Option<PathBuf>,
    pub interrupted: bool,
}

/// Bytes of memory a run needs (parameters, gradients, two moments, activations); with LoRA,
/// the frozen base's parameters (its layer matrices as `base_weights` keeps them) and the
/// adapters' four copies.
pub fn memory_estimate(config: &TrainConfig) -> usize {
    let layout = kiem_engine::ParamLayout::new(&config.model);
    let params = layout.total;
    let activations = activation_bytes(&config.model, config.micro_batch, config.seq);
    match &config.lora {
        Some(spec) => {
            let adapters =
                Lora::new(&config.model, spec.clone(), 0).map_or(0, |l| l.num_parameters());
            let matrices: usize = layout
                .layers
                .iter()
                .map(|l| l.qkv_w.len() + l.attn_out_w.len() + l.mlp_in_w.len() + l.mlp_out_w.len())
                .sum();
            let per_weight = config.base_weights.unwrap_or_default().bytes_per_weight();
            let mut stored = (per_weight * matrices as f64) as usize;
            if let (true, DataSource::Finetune(spec)) = (config.base_as_stored, &config.source) {
                // At most the file's bytes (its embeddings are counted in fp32 besides).
                if let Ok(meta) = std::fs::metadata(&spec.base_model) {
                    stored = stored.min(meta.len() as usize);
                }
            }
            let base = 4 * (params - matrices) + stored;
            base + 4 * adapters * 4 + activations
        }
        None => 4 * params * 4 + activations,
    }
}

/// Fresh adapters for a LoRA run on `base`, or nothing for a full fine-tune.
fn attach_adapters(gpt: &mut Gpt, config: &TrainConfig, base: &Path) -> Result<()> {
    if let Some(spec) = &config.lora {
        let mut lora = Lora::new(&gpt.config, spec.clone(), config.seed ^ 0x10_4A)?;
        lora.base_model = base.display().to_string();
        gpt.set_lora(Some(lora))?;
    }
    Ok(())
}

/// A LoRA run leaves the embedding frozen: chat tokens the base lacks would never be learnt
/// (`added`: what [`load_finetune_base`] added).
pub fn refuse_added_tokens_for_lora(base: &Path, added: &[String]) -> Result<()> {
    if !added.is_empty() {
        return Err(TrainError::Config(format!(
            "{} has no chat template and lacks kiem's chat tokens ({}); LoRA keeps the \
             embedding frozen, so they could not be learnt. Fine-tune it fully once (without \
             --lora-rank), or use a base model with a chat template",
            base.display(),
            added.join(" ")
        )));
    }
    Ok(())
}

/// Refuses a run whose parameters, gradients, moments and activations cannot fit in the memory
/// available now: checked before the run allocates its model (a fine-tuning run's base model
/// is already loaded by then, its parameters counted in the estimate).
fn check_memory(config: &TrainConfig, already_allocated: usize) -> Result<()> {
    let need = memory_estimate(config).saturating_sub(already_allocated);
    match kiem_engine::io::available_memory() {
        Some(available) if need > available => Err(TrainError::Config(format!(
            "the model needs about {:.1} GiB (parameters, gradients, AdamW moments, activations \
             for --micro-batch {}) but only {:.1} GiB is available; lower --micro-batch, \
             --context or the model size",
            need as f64 / (1u64 << 30) as f64,
            config.micro_batch,
            available as f64 / (1u64 << 30) as f64
        ))),
        _ => Ok(()),
    }
}

/// `metrics.jsonl`; only the first process of a job writes it (`file` is `None` elsewhere).
struct Metrics {
    file: Option<std::fs::File>,
}

/// (step, loss) points of a curve.
type Curve = Vec<(u64, f64)>;

/// Each benchmark task's plotted score by step, by task name.
pub type TaskCurves = std::collections::BTreeMap<String, Curve>;

impl Metrics {
    /// Opens `metrics.jsonl`, dropping lines of steps after `keep_through` (they are redone on
    /// resume).
    fn open(
        path: &Path,
        keep_through: Option<u64>,
        writes: bool,
    ) -> Result<(Self, Curve, Curve, TaskCurves)> {
        let mut train = Vec::new();
        let mut val = Vec::new();
        let mut tasks = TaskCurves::new();
        let mut kept = String::new();
        if let (Some(limit), Ok(text)) = (keep_through, std::fs::read_to_string(path)) {
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let step = v["step"].as_u64().unwrap_or(0);
                if step > limit {
                    continue;
                }
                if let Some(loss) = v["loss"].as_f64() {
                    train.push((step, loss));
                }
                if let Some(loss) = v["val_loss"].as_f64() {
                    val.push((step, loss));
                }
                for (task, scores) in v["tasks"].as_object().into_iter().flatten() {
                    if let Some(score) = scores.get(plotted_metric(scores)).and_then(|x| x.as_f64())
                    {
                        tasks.entry(task.clone()).or_default().push((step, score));
                    }
                }
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if !writes {
            return Ok((Self { file: None }, train, val, tasks));
        }
        kiem_engine::io::write_file_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        Ok((Self { file: Some(file) }, train, val, tasks))
    }

    fn write(&mut self, value: &impl Serialize) -> Result<()> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let line = serde_json::to_string(value).expect("metrics serialize");
        writeln!(file, "{line}").map_err(|e| TrainError::Io(format!("metrics.jsonl: {e}")))
    }
}

/// The metric a task's curve shows: the first a brief names (accuracy or ROUGE-L).
fn plotted_metric(scores: &serde_json::Value) -> &'static str {
    if scores.get("acc_norm").is_some() {
        "acc_norm"
    } else {
        "rouge_l"
    }
}

/// Reads the run's benchmark task files (before training starts: a bad file fails at once).
fn load_eval_tasks(config: &TrainConfig) -> Result<Vec<kiem_eval::tasks::LoadedTask>> {
    config
        .eval_tasks
        .iter()
        .map(|path| {
            kiem_eval::tasks::load(path)
                .map_err(|e| TrainError::Config(format!("--eval-tasks: {e}")))
        })
        .collect()
}

/// Scores every benchmark task of the run on the model as it is now.
fn score_tasks(
    gpt: &mut Gpt,
    tokenizer: &Tokenizer,
    tasks: &[kiem_eval::tasks::LoadedTask],
    config: &TrainConfig,
    step: u64,
) -> Result<TaskScores> {
    let eos = [tokenizer.eos_id().unwrap_or(tokenizer.bos_id())];
    let tasks = tasks
        .iter()
        .map(|task| {
            kiem_engine::kernels::in_pool(|| {
                kiem_eval::brief(gpt, tokenizer, task, config.eval_task_limit, &eos)
            })
            .map_err(|e| TrainError::Config(format!("evaluating {}: {e}", task.name())))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TaskScores { step, tasks })
}

/// Token byte lengths for bits per byte (special tokens count 0 bytes).
fn token_bytes(tokenizer: &Tokenizer) -> Vec<u32> {
    (0..tokenizer.vocab_size() as u32)
        .map(|id| {
            if tokenizer.is_special(id) {
                0
            } else {
                tokenizer.decode_bytes(&[id]).len() as u32
            }
        })
        .collect()
}

/// Samples `n` tokens after BOS (temperature 1, top-k 40) with the KV cache.
fn sample_text(gpt: &Gpt, tokenizer: &Tokenizer, n: usize, rng: &mut Rng) -> Result<String> {
    let options = kiem_engine::sampling::GenerateOptions {
        max_tokens: n,
        sampling: kiem_engine::sampling::SamplingParams {
            temperature: 1.0,
            top_k: 40,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: rng.next_u64(),
        },
        stop_ids: Vec::new(),
    };
    let out = gpt.generate(&[vec![tokenizer.bos_id()]], &options, &mut |_, _| {
        kiem_engine::sampling::Control::Continue
    })?;
    Ok(String::from_utf8_lossy(&tokenizer.decode_bytes(&out[0].tokens)).into_owned())
}

/// Runs (or, with `resume`, continues) a pre-training run in `run_dir`.
pub fn pretrain(
    run_dir: &Path,
    config: &TrainConfig,
    resume: bool,
    cancel: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<Summary> {
    config.validate()?;
    let DataSource::Pretrain {
        data_dir,
        init_from,
    } = &config.source
    else {
        return Err(TrainError::Config(
            "pretrain needs token shards (--data)".into(),
        ));
    };
    let data = DataDir::open(data_dir)?;
    let tokenizer = data.tokenizer()?;
    // A model's embedding may have rows beyond its tokenizer (Qwen2.5 pads it), never fewer.
    if tokenizer.vocab_size() > config.model.vocab_size {
        return Err(TrainError::Config(format!(
            "the data's tokenizer has {} ids but the model's vocabulary is only {}",
            tokenizer.vocab_size(),
            config.model.vocab_size
        )));
    }
    let seq = config.seq;
    let mut train = TokenLoader::new(&data.train, "train", seq, Some(config.seed))?;
    let mut val = if data.val.iter().map(|s| s.len()).sum::<usize>() > seq {
        Some(TokenLoader::new(&data.val, "validation", seq, None)?)
    } else {
        observer.note(
            "the data has no validation split large enough for one sequence: evaluation is skipped",
        );
        None
    };
    // The data fits the run; now the memory, before the model is allocated.
    check_memory(config, 0)?;
    let gpt = match init_from {
        Some(dir) if !resume => {
            let (gpt, model_tokenizer, _) = crate::model_source::load_model(dir)?;
            if gpt.config != config.model {
                return Err(TrainError::Config(format!(
                    "{} has shape {:?}, but the run is configured for {:?}",
                    dir.display(),
                    gpt.config,
                    config.model
                )));
            }
            if model_tokenizer.encoding_hash() != tokenizer.encoding_hash() {
                return Err(TrainError::Config(format!(
                    "the data in {} was prepared with another tokenizer than {}'s; prepare it with \
                     --tokenizer {}",
                    data_dir.display(),
                    dir.display(),
                    dir.display()
                )));
            }
            gpt
        }
        _ => {
            let mut gpt = Gpt::new(config.model)?;
            if !resume {
                gpt.init_random(config.seed);
            }
            gpt
        }
    };
    // Every document of the data starts with the document token, so the model's prompts do.
    let tokenizer = tokenizer.with_bos_prompts()?;
    let title = format!("kiem pretrain: {}", run_dir.display());
    run_loop(
        run_dir,
        config,
        gpt,
        &tokenizer,
        &mut train,
        val.as_mut().map(|v| v as &mut dyn Batches),
        resume,
        cancel,
        observer,
        &title,
    )
}

/// A fine-tuning run's starting point: the base model and tokenizer, with the chat tokens added
/// (and the embeddings grown) when the base tokenizer lacks them.
///
/// `base_as_stored`: a GGUF base's layer matrices stay in the file's forms, for a LoRA run (see
/// [`TrainConfig::base_as_stored`]); such a base can take no new tokens.
pub fn load_finetune_base(
    spec: &FinetuneData,
    base_as_stored: bool,
) -> Result<(Gpt, Tokenizer, Vec<String>)> {
    let (gpt, tokenizer, _) = if base_as_stored {
        crate::model_source::load_gguf_as_frozen_base(&spec.base_model)?
    } else {
        crate::model_source::load_model(&spec.base_model)?
    };
    if tokenizer.vocab_size() > gpt.config.vocab_size {
        return Err(TrainError::Config(format!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is only {}",
            spec.base_model.display(),
            tokenizer.vocab_size(),
            gpt.config.vocab_size
        )));
    }
    let (tokenizer, added) = kiem_tokenizer::chat::for_fine_tuning(tokenizer)?;
    if added.is_empty() {
        return Ok((gpt, tokenizer, added));
    }
    if base_as_stored {
        refuse_added_tokens_for_lora(&spec.base_model, &added)?;
    }
    // New ids land in the embedding's spare rows where it has them, else the embedding grows.
    let grown = gpt.grow_vocab(tokenizer.vocab_size().max(gpt.config.vocab_size))?;
    Ok((grown, tokenizer, added))
}

/// Runs (or continues) a fine-tuning run. Without `resume`, `start` is the prepared base model,
/// tokenizer and examples (see [`load_finetune_base`] and [`load_examples`]).
pub fn finetune(
    run_dir: &Path,
    config: &TrainConfig,
    start: Option<(Gpt, Tokenizer, Examples)>,
    cancel: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<Summary> {
    config.validate()?;
    // A fresh run's base model is loaded already: its parameters are in use.
    let loaded = start
        .as_ref()
        .map_or(0, |(gpt, _, _)| 4 * gpt.num_parameters());
    check_memory(config, loaded)?;
    let DataSource::Finetune(spec) = &config.source else {
        return Err(TrainError::Config(
            "finetune needs conversations (--data)".into(),
        ));
    };
    let resume = start.is_none();
    let (mut gpt, tokenizer, examples) = match start {
        Some(start) => start,
        None => {
            let (_, dir) = list_checkpoints(run_dir).pop().ok_or_else(|| {
                TrainError::Resume(format!(
                    "{} has no checkpoint to resume from",
                    run_dir.display()
                ))
            })?;
            let tokenizer = Tokenizer::load(
                dir.to_str()
                    .ok_or_else(|| TrainError::Config("path is not valid UTF-8".into()))?,
            )?;
            let examples = load_examples(spec, &tokenizer, config.model.context)?;
            // A LoRA run's checkpoints hold the adapters only: the base comes from where the
            // run started.
            let gpt = if config.lora.is_some() {
                let (gpt, _, added) = load_finetune_base(spec, config.base_as_stored)?;
                refuse_added_tokens_for_lora(&spec.base_model, &added)?;
                if gpt.config != config.model {
                    return Err(TrainError::Resume(format!(
                        "the base model {} changed shape since the run started",
                        spec.base_model.display()
                    )));
                }
                gpt
            } else {
                Gpt::new(config.model)?
            };
            (gpt, tokenizer, examples)
        }
    };
    if !resume {
        attach_adapters(&mut gpt, config, &spec.base_model)?;
    }
    let pad = tokenizer.bos_id();
    let mut train = ExampleLoader::new(examples.train, config.seq, Some(config.seed), pad);
    if config.pack {
        train = train.packed();
    }
    let mut val =
        (!examples.val.is_empty()).then(|| ExampleLoader::new(examples.val, config.seq, None, pad));
    if val.is_none() {
        observer.note(
            "no validation conversations: evaluation is skipped (use --val-data or --val-fraction)",
        );
    }
    let title = format!("kiem finetune: {}", run_dir.display());
    run_loop(
        run_dir,
        config,
        gpt,
        &tokenizer,
        &mut train,
        val.as_mut().map(|v| v as &mut dyn Batches),
        resume,
        cancel,
        observer,
        &title,
    )
}

#[allow(clippy::too_many_arguments)]
fn run_loop(
    run_dir: &Path,
    config: &TrainConfig,
    mut gpt: Gpt,
    tokenizer: &Tokenizer,
    train_loader: &mut dyn Batches,
    mut val_loader: Option<&mut dyn Batches>,
    resume: bool,
    cancel: &AtomicBool,
    observer: &mut dyn Observer,
    plot_title: &str,
) -> Result<Summary> {
    // A job of several processes: each trains its share of every step's micro-batches, they
    // sum gradients, and the first alone writes files and reports.
    let world = kiem_dist::world();
    let (rank, ranks) = (world.rank(), world.size());
    let root = rank == 0;
    let mut silent = Silent;
    let observer: &mut dyn Observer = if root { observer } else { &mut silent };
    gpt.set_matmul_precision(config.precision)?;
    if config.precision == MatmulPrecision::Bf16 {
        if let Some(note) = kiem_engine::bf16_gemm::request_note() {
            observer.note(&note);
        }
    }
    gpt.set_recompute(config.recompute);
    if tokenizer.vocab_size() < gpt.config.vocab_size {
        gpt.limit_sampling_to(tokenizer.vocab_size())?;
    }
    std::fs::create_dir_all(run_dir)
        .map_err(|e| TrainError::Io(format!("{}: {e}", run_dir.display())))?;
    let mut opt = AdamWState::new(config.beta1, config.beta2, config.eps);
    let mut state = TrainerState {
        step: 0,
        tokens_seen: 0,
        cursor: Default::default(),
        sample_rng: Rng::new(config.seed ^ 0x5A5A_5A5A),
        best_val_loss: None,
        best_val_bpb: None,
        elapsed_seconds: 0.0,
        tokenizer_hash: tokenizer.hash().to_string(),
        matmul_path: Some(kiem_engine::kernels::matmul_path(config.precision)),
        ranks: (ranks > 1).then_some(ranks),
    };
    let resumed_from = if resume {
        let (step, dir) = list_checkpoints(run_dir).pop().ok_or_else(|| {
            TrainError::Resume(format!(
                "{} has no checkpoint to resume from",
                run_dir.display()
            ))
        })?;
        state = load_checkpoint(&dir, &mut gpt, &mut opt)?;
        if !tokenizer.matches_hash(&state.tokenizer_hash) {
            return Err(TrainError::Resume(format!(
                "the checkpoint was trained with tokenizer {} but the data uses {}",
                state.tokenizer_hash,
                tokenizer.hash()
            )));
        }
        train_loader.set_cursor(state.cursor);
        // Exact resume needs the same arithmetic: the same matmul path and thread count.
        let now = kiem_engine::kernels::matmul_path(config.precision);
        match state.matmul_path.replace(now.clone()) {
            Some(then) if then != now => observer.note(&format!(
                "the checkpoint was trained with matrix products on {then}, this process uses \
                 {now}: the losses may differ in their last bits from an uninterrupted run"
            )),
            _ => {}
        }
        let then = state.ranks.replace(ranks).unwrap_or(1);
        if then != ranks {
            observer.note(&format!(
                "the checkpoint was written by a job of {then} process(es), this one has {ranks}: \
                 each takes a new share of every step (the optimizer state is re-sharded); the \
                 losses may differ in their last bits from an uninterrupted run"
            ));
        }
        state.ranks = (ranks > 1).then_some(ranks);
        Some(step)
    } else {
        // Every process has seen the run directory free before the first one claims it.
        world.barrier();
        if root {
            let json = serde_json::to_string_pretty(config).expect("config serializes");
            kiem_engine::io::write_file_atomic(&run_dir.join(RUN_FILE), json.as_bytes())?;
        }
        None
    };
    // ZeRO-1: this process keeps (and updates) the AdamW moments of its shard only.
    let shards = kiem_dist::Shards::new(gpt.trainable_len(), ranks);
    let zero = config.zero >= 1 && ranks > 1;
    let mine = if zero {
        shards.range(rank)
    } else {
        0..gpt.trainable_len()
    };
    if zero && !opt.m.is_empty() {
        opt.m = opt.m[mine.clone()].to_vec();
        opt.v = opt.v[mine.clone()].to_vec();
    }
    if ranks > 1 {
        observer.note(&format!(
            "{}: each takes {} of the {} micro-batches of every step{}",
            world.describe(),
            config.grad_accumulation() / ranks,
            config.grad_accumulation(),
            if zero {
                "; AdamW moments sharded across them (ZeRO-1)"
            } else {
                ""
            }
        ));
    }
    if config.base_as_stored {
        observer.note(&format!(
            "the frozen base's layer matrices are kept as the file stores them ({}; {:.0} MiB)",
            gpt.weight_forms(),
            gpt.frozen_base_bytes() as f64 / (1u64 << 20) as f64,
        ));
    }
    if let Some(weights) = config.base_weights {
        let released = gpt.freeze_base(weights)?;
        observer.note(&format!(
            "the frozen base's layer matrices are kept as {} ({:.0} MiB; {:.0} MiB of fp32 \
             given back)",
            weights.name(),
            gpt.frozen_base_bytes() as f64 / (1u64 << 20) as f64,
            released as f64 / (1u64 << 20) as f64
        ));
    }
    let (mut metrics, mut train_curve, mut val_curve, mut task_curves) =
        Metrics::open(&run_dir.join(METRICS_FILE), Some(state.step), root)?;
    let eval_tasks = load_eval_tasks(config)?;
    let record_tasks = |gpt: &mut Gpt,
                        metrics: &mut Metrics,
                        curves: &mut TaskCurves,
                        observer: &mut dyn Observer,
                        step: u64|
     -> Result<()> {
        // Scored by the first process alone (the others wait at the next step's exchange).
        if eval_tasks.is_empty() || !root {
            return Ok(());
        }
        let scores = score_tasks(gpt, tokenizer, &eval_tasks, config, step)?;
        metrics.write(&scores)?;
        for brief in &scores.tasks {
            if let Some(&(_, value)) = brief.metrics.first() {
                curves
                    .entry(brief.task.clone())
                    .or_default()
                    .push((step, value));
            }
        }
        observer.tasks(&scores);
        Ok(())
    };
    observer.started(resumed_from, config, gpt.num_parameters());
    if let Some(lora) = gpt.lora() {
        observer.note(&format!(
            "LoRA: rank {}, alpha {}{}, dropout {} on {} modules ({}): {} trainable parameters, \
             {:.2}% of the frozen base",
            lora.spec.rank,
            lora.spec.alpha,
            if lora.spec.use_rslora {
                " (rsLoRA)"
            } else {
                ""
            },
            lora.spec.dropout,
            lora.modules.len(),
            lora.spec.targets.join(","),
            lora.num_parameters(),
            100.0 * lora.num_parameters() as f64 / gpt.num_parameters() as f64
        ));
    }

    let bytes_of = token_bytes(tokenizer);
    // A fine-tuning run records the base model's held-out loss (and task scores) first, to
    // compare against.
    if resumed_from.is_none() && matches!(config.source, DataSource::Finetune(_)) {
        if let Some(val) = val_loader.as_deref_mut() {
            let report = evaluate(&mut gpt, val, config, &bytes_of, 0, world)?;
            metrics.write(&report)?;
            val_curve.push((0, report.val_loss));
            observer.eval(&report);
        }
        record_tasks(&mut gpt, &mut metrics, &mut task_curves, observer, 0)?;
    }
    let accum = config.grad_accumulation();
    // Each micro-batch: inputs, targets, row length and (packed rows) positions.
    type MicroBatch = (Vec<u32>, Vec<Option<u32>>, usize, Option<Vec<u32>>);
    let mut batches: Vec<MicroBatch> = vec![(Vec::new(), Vec::new(), 0, None); accum];
    let started = Instant::now();
    let elapsed_before = state.elapsed_seconds;
    let tokens_before = state.tokens_seen;
    let mut last_loss = f64::NAN;
    let mut interrupted = false;
    // Every process reads every micro-batch (the loader's position and the step's count of
    // trained tokens stay the same everywhere) and trains its contiguous share of them.
    let share = accum / ranks;
    let my_micro = rank * share..(rank + 1) * share;
    let mut stage = Vec::new();
    while state.step < config.steps {
        let step = state.step;
        let lr = config.schedule.lr_at(step);
        let mut step_tokens = 0;
        for (inputs, targets, seq, positions) in batches.iter_mut() {
            let shape = train_loader.next_batch(config.micro_batch, inputs, targets);
            *seq = shape.seq;
            *positions = train_loader.packed_positions().map(<[u32]>::to_vec);
            step_tokens += shape.tokens;
        }
        let trained: usize = batches
            .iter()
            .map(|(_, t, _, _)| t.iter().flatten().count())
            .sum();
        let scale = 1.0 / trained.max(1) as f32;
        // The whole step on a worker of the thread pool: its many parallel loops then fork
        // and join inside the pool instead of each being handed to it from this thread.
        let (loss, grad_norm, stop, comm) = kiem_engine::kernels::in_pool(|| -> Result<_> {
            gpt.zero_grad();
            let mut loss_sum = 0.0f64;
            for (micro, (inputs, targets, seq, positions)) in batches.iter().enumerate() {
                if !my_micro.contains(&micro) {
                    continue;
                }
                // Adapter dropout draws fresh masks for every micro-batch, the same ones again
                // on resume.
                gpt.set_lora_dropout_seed(
                    config.seed ^ step.wrapping_mul(0x9E37_79B9) ^ ((micro as u64) << 48),
                );
                let (sum, _) = gpt.forward_packed(
                    inputs,
                    targets,
                    positions.as_deref(),
                    config.micro_batch,
                    *seq,
                    Some(scale),
                )?;
                loss_sum += sum;
                gpt.backward()?;
            }
            // Processes agree on the loss and on stopping (an interrupt may reach them at
            // different steps).
            let comm_started = Instant::now();
            let mut totals = [0.0; 2];
            let stop_here = f64::from(u8::from(cancel.load(Ordering::Relaxed)));
            world.all_reduce_f64(&[loss_sum, stop_here], &mut totals);
            let [loss_sum, stop] = totals;
            let mut comm = comm_started.elapsed().as_secs_f64();
            let loss = loss_sum / trained.max(1) as f64;
            if !loss.is_finite() {
                let last = list_checkpoints(run_dir)
                    .pop()
                    .map(|(s, d)| format!("step {s} in {}", d.display()));
                return Err(TrainError::Diverged(format!(
                    "loss is {loss} at step {}; stopped without saving this state. Last good checkpoint: {}. \
                     Try a lower --lr or a longer --warmup-steps.",
                    step + 1,
                    last.unwrap_or_else(|| "none yet".into())
                )));
            }
            let comm_started = Instant::now();
            if zero {
                kiem_dist::reduce_scatter_in_place(
                    world,
                    gpt.trainable_mut().1,
                    shards,
                    &mut stage,
                );
            } else {
                kiem_dist::all_reduce_in_place(world, gpt.trainable_mut().1, &mut stage);
            }
            comm += comm_started.elapsed().as_secs_f64();
            let grad_norm = if zero {
                // This process holds the summed gradients of its shard only.
                let mut sum_squares = [0.0];
                world.all_reduce_f64(&[gpt.grad_sum_squares(mine.clone())], &mut sum_squares);
                sum_squares[0].sqrt()
            } else {
                gpt.grad_norm()
            };
            if config.grad_clip > 0.0 {
                gpt.clip_grads(mine.clone(), grad_norm, f64::from(config.grad_clip));
            }
            gpt.adamw_step_shard(&mut opt, lr, config.weight_decay, mine.clone());
            if zero {
                let comm_started = Instant::now();
                kiem_dist::all_gather_in_place(world, gpt.trainable_mut().0, shards, &mut stage);
                comm += comm_started.elapsed().as_secs_f64();
            }
            Ok((loss, grad_norm, stop > 0.0, comm))
        })?;
        state.step += 1;
        state.tokens_seen += step_tokens as u64;
        state.cursor = train_loader.cursor();
        last_loss = loss;
        let session = started.elapsed().as_secs_f64();
        state.elapsed_seconds = elapsed_before + session;
        let report = StepReport {
            step: state.step,
            total_steps: config.steps,
            loss,
            lr,
            grad_norm,
            tokens: state.tokens_seen,
            tokens_per_second: (state.tokens_seen - tokens_before) as f64 / session.max(1e-9),
            elapsed_seconds: state.elapsed_seconds,
            comm_seconds: (ranks > 1).then_some(comm),
        };
        metrics.write(&report)?;
        train_curve.push((state.step, loss));
        observer.step(&report);

        let last_step = state.step == config.steps;
        let evaluate_now =
            (config.eval_every > 0 && state.step.is_multiple_of(config.eval_every)) || last_step;
        if let (true, Some(val)) = (evaluate_now, val_loader.as_deref_mut()) {
            let report = evaluate(&mut gpt, val, config, &bytes_of, state.step, world)?;
            if state.best_val_loss.is_none_or(|b| report.val_loss < b) {
                state.best_val_loss = Some(report.val_loss);
                state.best_val_bpb = Some(report.val_bpb);
            }
            metrics.write(&report)?;
            val_curve.push((state.step, report.val_loss));
            observer.eval(&report);
        }
        if evaluate_now {
            record_tasks(
                &mut gpt,
                &mut metrics,
                &mut task_curves,
                observer,
                state.step,
            )?;
        }
        if root
            && config.sample_every > 0
            && (state.step.is_multiple_of(config.sample_every) || last_step)
        {
            let text = sample_text(&gpt, tokenizer, config.sample_tokens, &mut state.sample_rng)?;
            observer.sample(state.step, &text);
        }
        if (config.checkpoint_every > 0 && state.step.is_multiple_of(config.checkpoint_every))
            || last_step
            || stop
        {
            // The first process writes the whole optimizer state: sharded moments are gathered
            // to it as it writes them, so any number of processes can continue the run.
            if root {
                let moments = if zero {
                    Moments::Sharded { opt: &opt, shards }
                } else {
                    Moments::Whole(&opt)
                };
                let dir = save_checkpoint(
                    run_dir,
                    &gpt,
                    moments,
                    &state,
                    tokenizer,
                    config.keep_checkpoints,
                )?;
                plot_losses(
                    &run_dir.join(PLOT_FILE),
                    plot_title,
                    &train_curve,
                    &val_curve,
                    &task_curves,
                )?;
                observer.checkpoint(state.step, &dir);
            } else if zero {
                send_moments(&opt, shards);
            }
            // A job stopped here must not end before its checkpoint is written.
            world.barrier();
        }
        if stop && !last_step {
            interrupted = true;
            break;
        }
    }
    let model_dir = run_dir.join(if gpt.lora().is_some() {
        ADAPTER_DIR
    } else {
        MODEL_DIR
    });
    if !interrupted && root {
        write_model_dir(&model_dir, &gpt, tokenizer, None)?;
        plot_losses(
            &run_dir.join(PLOT_FILE),
            plot_title,
            &train_curve,
            &val_curve,
            &task_curves,
        )?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        steps: state.step,
        tokens: state.tokens_seen,
        seconds: state.elapsed_seconds,
        tokens_per_second: (state.tokens_seen - tokens_before) as f64 / seconds.max(1e-9),
        best_val_loss: state.best_val_loss,
        best_val_bpb: state.best_val_bpb,
        last_loss,
        model_dir,
        base_model: match (&config.source, gpt.lora()) {
            (DataSource::Finetune(spec), Some(_)) => Some(spec.base_model.clone()),
            _ => None,
        },
        interrupted,
    })
}

/// Loss and bits per byte over the first `eval_tokens` (at most one pass) of the validation set.
fn evaluate(
    gpt: &mut Gpt,
    val: &mut dyn Batches,
    config: &TrainConfig,
    bytes_of: &[u32],
    step: u64,
    world: &dyn kiem_dist::Collective,
) -> Result<EvalReport> {
    let per_batch = config.micro_batch * val.seq();
    let rows = val.rows();
    let batches = (config.eval_tokens / per_batch)
        .max(1)
        .min(rows.div_ceil(config.micro_batch as u64).max(1) as usize);
    val.set_cursor(Default::default());
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let (mut nats, mut count, mut bytes) = (0.0f64, 0usize, 0u64);
    for b in 0..batches {
        let shape = val.next_batch(config.micro_batch, &mut inputs, &mut targets);
        // Processes take turns through the batches.
        if b % world.size() != world.rank() {
            continue;
        }
        // The last batch of a pass wraps around to the first rows: count each row once.
        let first_row = b * config.micro_batch;
        let fresh = (rows as usize).saturating_sub(first_row);
        if fresh < config.micro_batch {
            targets[fresh * shape.seq..].fill(None);
        }
        let (sum, n) = kiem_engine::kernels::in_pool(|| {
            gpt.forward(&inputs, &targets, config.micro_batch, shape.seq, None)
        })?;
        nats += sum;
        count += n;
        bytes += targets
            .iter()
            .flatten()
            .map(|&t| u64::from(bytes_of[t as usize]))
            .sum::<u64>();
    }
    let mut totals = [0.0; 3];
    world.all_reduce_f64(&[nats, count as f64, bytes as f64], &mut totals);
    let [nats, count, bytes] = totals;
    let (count, bytes) = (count as usize, bytes as u64);
    Ok(EvalReport {
        step,
        val_loss: nats / count.max(1) as f64,
        val_bpb: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens: count,
    })
}
