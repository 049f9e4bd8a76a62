//! Checkpoints: a Hugging Face model directory plus `trainer_state/` (optimizer moments, step,
//! data cursor, RNG), written under a temporary name and renamed into place whole.

use std::path::{Path, PathBuf};

use kiem_engine::io::{
    hf_config_json, write_file_atomic, write_tensors, write_tensors_streamed, MappedTensors,
    SpecialIds,
};
use kiem_engine::rng::Rng;
use kiem_engine::{AdamWState, Gpt};
use kiem_tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::loader::Cursor;
use crate::{Result, TrainError};

pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const STATE_DIR: &str = "trainer_state";

/// Everything besides parameters and moments that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub cursor: Cursor,
    pub sample_rng: Rng,
    pub best_val_loss: Option<f64>,
    pub best_val_bpb: Option<f64>,
    pub elapsed_seconds: f64,
    /// `sha256:` of the tokenizer the model was trained with.
    pub tokenizer_hash: String,
    /// What computed the matrix products ([`kiem_engine::kernels::matmul_path`]); absent in
    /// checkpoints written before it was recorded.
    #[serde(default)]
    pub matmul_path: Option<String>,
    /// Processes of the job that wrote it (absent: one). The checkpoint holds the whole
    /// optimizer state either way, so a job of another size can continue it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<usize>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// Writes `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer files;
/// for a model with LoRA adapters, the adapters in PEFT's format and the tokenizer files.
pub fn write_model_files(dir: &Path, gpt: &Gpt, tokenizer: &Tokenizer) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    if let Some(lora) = gpt.lora() {
        lora.save_peft(dir, &gpt.config)?;
        return write_tokenizer_files(dir, tokenizer, gpt.config.context);
    }
    let bos = tokenizer.bos_id();
    // Documents end at the document token; a base model's own end token (its
    // tokenizer_config.json's eos_token, e.g. Llama 3's <|end_of_text|>) still ends text too.
    let mut eos = vec![bos];
    eos.extend(tokenizer.eos_id().filter(|&id| id != bos));
    let ids = SpecialIds {
        bos: Some(bos),
        eos: eos.clone(),
    };
    let config = hf_config_json(&gpt.config, &ids);
    write_file_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("json")
            .as_bytes(),
    )?;
    // A chat model's reply ends at <|assistant_end|> as well as at the end of the document.
    let chat_end = kiem_tokenizer::chat::end_of_turn(tokenizer).ok();
    eos.extend(chat_end.filter(|end| !eos.contains(end)));
    let eos: serde_json::Value = match eos.as_slice() {
        [one] => serde_json::json!(one),
        many => serde_json::json!(many),
    };
    let generation = serde_json::json!({
        "bos_token_id": bos,
        "eos_token_id": eos,
        "do_sample": true,
        "temperature": 0.8,
        "top_k": 50,
    });
    write_file_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)
            .expect("json")
            .as_bytes(),
    )?;
    gpt.save_safetensors(&dir.join("model.safetensors"))?;
    write_tokenizer_files(dir, tokenizer, gpt.config.context)
}

/// `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template).
fn write_tokenizer_files(dir: &Path, tokenizer: &Tokenizer, context: usize) -> Result<()> {
    let chat_end = kiem_tokenizer::chat::end_of_turn(tokenizer).ok();
    tokenizer.save(&dir.join("tokenizer.json"))?;
    let bos = tokenizer.decode(&[tokenizer.bos_id()])?;
    let mut tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": bos,
        "unk_token": null,
        "pad_token": null,
        "model_max_length": context,
        "clean_up_tokenization_spaces": false,
        // Whether prompts start with bos_token: kiem's and transformers' rule for this model.
        "add_bos_token": !tokenizer.prompt_prefix().is_empty(),
    });
    let uses_typed_chat = kiem_tokenizer::chat::uses_typed_format(tokenizer)?;
    if !uses_typed_chat {
        // An imported chat model keeps its template and the token texts it renders with.
        for (key, text) in tokenizer.token_texts() {
            tokenizer_config[key] = text.as_str().into();
        }
    }
    match tokenizer.chat_template() {
        Some(template) if !uses_typed_chat => {
            tokenizer_config["chat_template"] = template.source.as_str().into()
        }
        _ if chat_end.is_some() => {
            tokenizer_config["chat_template"] = kiem_tokenizer::chat::CHAT_TEMPLATE.into()
        }
        _ => {}
    }
    write_file_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tokenizer_config)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(())
}

/// The AdamW state a checkpoint saves: always the whole of it, whoever holds it.
#[derive(Clone, Copy)]
pub enum Moments<'a> {
    /// Held whole by this process.
    Whole(&'a AdamWState),
    /// Sharded over the job's processes (ZeRO-1): `opt` holds this process's shard of the
    /// moments. Rank 0 gathers the others' shards a bucket at a time while it writes them, so
    /// it never holds the whole moments; the other ranks call [`send_moments`] meanwhile.
    Sharded {
        opt: &'a AdamWState,
        shards: kiem_dist::Shards,
    },
}

impl Moments<'_> {
    fn adamw(&self) -> &AdamWState {
        match self {
            Moments::Whole(opt) | Moments::Sharded { opt, .. } => opt,
        }
    }
}

/// A process other than rank 0's part in saving [`Moments::Sharded`].
pub fn send_moments(opt: &AdamWState, shards: kiem_dist::Shards) {
    let world = kiem_dist::world();
    for moment in [&opt.m, &opt.v] {
        let _ = kiem_dist::gather_shards_to_root(world, moment, shards, |_, _| Ok::<(), ()>(()));
    }
}

/// Writes a model directory atomically: into a temporary sibling, then renamed over `dir`.
pub fn write_model_dir(
    dir: &Path,
    gpt: &Gpt,
    tokenizer: &Tokenizer,
    state: Option<(Moments, &TrainerState)>,
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    let result = (|| -> Result<()> {
        write_model_files(&tmp, gpt, tokenizer)?;
        if let Some((moments, trainer)) = state {
            let sdir = tmp.join(STATE_DIR);
            std::fs::create_dir_all(&sdir).map_err(|e| io_err(&sdir, e))?;
            let path = sdir.join("optimizer.safetensors");
            match moments {
                Moments::Whole(opt) => write_tensors(
                    &path,
                    &[
                        ("m".to_string(), vec![opt.m.len()], &opt.m),
                        ("v".to_string(), vec![opt.v.len()], &opt.v),
                    ],
                    None,
                )?,
                Moments::Sharded { opt, shards } => {
                    let world = kiem_dist::world();
                    write_tensors_streamed(
                        &path,
                        &[("m", shards.len), ("v", shards.len)],
                        |i, sink| {
                            kiem_dist::gather_shards_to_root(
                                world,
                                [&opt.m, &opt.v][i],
                                shards,
                                |range, values| sink.write_at(range.start, values),
                            )
                        },
                    )?
                }
            }
            let opt = moments.adamw();
            let json = serde_json::json!({
                "trainer": trainer,
                "adamw": {"step": opt.step, "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps},
            });
            write_file_atomic(
                &sdir.join("state.json"),
                serde_json::to_string_pretty(&json)
                    .expect("json")
                    .as_bytes(),
            )?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir
        .join(CHECKPOINTS_DIR)
        .join(format!("step_{step:08}"))
}

/// Complete checkpoints of a run, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(run_dir.join(CHECKPOINTS_DIR)) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step_")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Saves a checkpoint for `state.step` and deletes all but the newest `keep`.
pub fn save_checkpoint(
    run_dir: &Path,
    gpt: &Gpt,
    moments: Moments,
    state: &TrainerState,
    tokenizer: &Tokenizer,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(run_dir, state.step);
    write_model_dir(&dir, gpt, tokenizer, Some((moments, state)))?;
    let all = list_checkpoints(run_dir);
    if all.len() > keep.max(1) {
        for (_, old) in &all[..all.len() - keep.max(1)] {
            std::fs::remove_dir_all(old).map_err(|e| io_err(old, e))?;
        }
    }
    Ok(dir)
}

/// Loads parameters (or, in a LoRA run, the adapters onto the base model `gpt` holds), optimizer
/// moments and trainer state from a checkpoint directory.
pub fn load_checkpoint(dir: &Path, gpt: &mut Gpt, opt: &mut AdamWState) -> Result<TrainerState> {
    let len = if dir.join(kiem_engine::lora::ADAPTER_CONFIG).exists() {
        let lora = kiem_engine::lora::Lora::load_peft(dir, &gpt.config)?;
        let len = lora.num_parameters();
        gpt.set_lora(Some(lora))?;
        len
    } else {
        // Parameters and moments are converted straight from the mapped files into their
        // buffers.
        gpt.load_files(&[dir.join("model.safetensors")])?;
        // The moments match the parameter buffer, padded vocabulary rows included.
        gpt.params()?.len()
    };
    let sdir = dir.join(STATE_DIR);
    let moments = MappedTensors::open(&sdir.join("optimizer.safetensors"))?;
    let take = |name: &str| -> Result<Vec<f32>> {
        moments
            .read_f32(name, len)
            .map_err(|e| TrainError::Resume(e.to_string()))
    };
    opt.m = take("m")?;
    opt.v = take("v")?;
    let state_path = sdir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| io_err(&state_path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| io_err(&state_path, e))?;
    let trainer: TrainerState =
        serde_json::from_value(json["trainer"].clone()).map_err(|e| io_err(&state_path, e))?;
    opt.step = json["adamw"]["step"].as_u64().unwrap_or(trainer.step);
    Ok(trainer)
}
