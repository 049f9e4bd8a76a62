//! Where a model comes from: a model directory (Hugging Face GPT-2 or Llama family, or a kiem
//! run's `model/`) or a GGUF file. Every command that takes `--model` (and `pretrain
//! --init-from`) loads it here: network, tokenizer and special ids together.

use std::path::Path;

use kiem_engine::gguf::{
    is_gguf, load_gguf_for_decoding, load_gguf_frozen_base, load_gguf_model, write_gguf,
    ExportType, GgufFile, MetaValue,
};
use kiem_engine::io::{load_model_dir, SpecialIds};
use kiem_engine::{Gpt, ModelConfig};
use kiem_tokenizer::gguf_vocab::ByteLevelVocab;
use kiem_tokenizer::Tokenizer;

use crate::{Result, TrainError};

/// Loads a model directory or `.gguf` file: the network in its files' layout (a GGUF file's
/// weights dequantized to fp32), its tokenizer, and the special ids its config names.
pub fn load_model(path: &Path) -> Result<(Gpt, Tokenizer, SpecialIds)> {
    if is_gguf(path) {
        return load_gguf(path);
    }
    let (gpt, ids) = load_model_dir(path)?;
    let dir = path
        .to_str()
        .ok_or_else(|| TrainError::Config("model path is not valid UTF-8".into()))?;
    let tokenizer = Tokenizer::load(dir)?;
    Ok((gpt, tokenizer, ids))
}

/// The model a directory or GGUF file describes (without loading its weights).
pub fn read_config(path: &Path) -> Result<(ModelConfig, SpecialIds)> {
    if is_gguf(path) {
        return Ok(GgufFile::open(path)?.model_config()?);
    }
    Ok(kiem_engine::io::read_hf_config(&path.join("config.json"))?)
}

/// The tokenizer of a GGUF file (its `tokenizer.ggml.*` metadata).
pub fn load_gguf_tokenizer(path: &Path) -> Result<Tokenizer> {
    gguf_tokenizer(&GgufFile::open(path)?)
}

fn load_gguf(path: &Path) -> Result<(Gpt, Tokenizer, SpecialIds)> {
    load_gguf_as(path, load_gguf_model)
}

/// Loads a GGUF file for decoding only, its matrices kept in the file's compact forms (see
/// [`load_gguf_for_decoding`]): the network, its tokenizer and special ids.
pub fn load_gguf_decoding(path: &Path) -> Result<(Gpt, Tokenizer, SpecialIds)> {
    load_gguf_as(path, load_gguf_for_decoding)
}

/// Loads a GGUF file as the frozen base of a LoRA run, its layer matrices kept in the file's
/// compact forms (see [`load_gguf_frozen_base`]): the network, its tokenizer and special ids.
pub fn load_gguf_as_frozen_base(path: &Path) -> Result<(Gpt, Tokenizer, SpecialIds)> {
    load_gguf_as(path, load_gguf_frozen_base)
}

/// A GGUF file's tokenizer and the network `load` makes of it.
fn load_gguf_as(
    path: &Path,
    load: fn(&GgufFile) -> kiem_engine::Result<(Gpt, SpecialIds)>,
) -> Result<(Gpt, Tokenizer, SpecialIds)> {
    let file = GgufFile::open(path)?;
    let tokenizer = gguf_tokenizer(&file)?;
    let (gpt, ids) = load(&file)?;
    Ok((gpt, tokenizer, ids))
}

fn gguf_tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let path = file.path();
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(TrainError::Config(format!(
            "{}: tokenizer.ggml.model {model:?} is not supported (kiem reads byte-level BPE \
             vocabularies: gpt2)",
            path.display()
        )));
    }
    let tokens = file.strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(file
            .error("no tokenizer.ggml.tokens: the file carries no tokenizer")
            .into());
    }
    let token_types = file
        .integers("tokenizer.ggml.token_type")?
        .into_iter()
        .map(|t| i32::try_from(t).unwrap_or(0))
        .collect();
    let vocab = ByteLevelVocab {
        pre: file
            .get("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default")
            .to_string(),
        tokens,
        token_types,
        merges: file.strings("tokenizer.ggml.merges")?,
        bos_id: file.id_of("tokenizer.ggml.bos_token_id"),
        eos_id: file.id_of("tokenizer.ggml.eos_token_id"),
        add_bos: file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(MetaValue::as_bool),
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(str::to_string),
    };
    Ok(Tokenizer::from_byte_level_vocab(&vocab, path)?)
}

/// The `tokenizer.*` metadata of a GGUF file for `tokenizer` (a byte-level BPE).
fn tokenizer_metadata(tokenizer: &Tokenizer) -> Result<Vec<(String, MetaValue)>> {
    let v = tokenizer.byte_level_vocab()?;
    let strings = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::Str).collect());
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), MetaValue::Str(v.pre)),
        ("tokenizer.ggml.tokens".into(), strings(v.tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(v.token_types.into_iter().map(MetaValue::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(v.merges)),
    ];
    meta.extend(
        v.bos_id
            .map(|id| ("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(id))),
    );
    meta.extend(
        v.eos_id
            .map(|id| ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(id))),
    );
    meta.extend(
        v.add_bos
            .map(|b| ("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(b))),
    );
    meta.extend(
        v.chat_template
            .map(|t| ("tokenizer.chat_template".into(), MetaValue::Str(t))),
    );
    Ok(meta)
}

/// Writes a model and its tokenizer as a GGUF file (see [`write_gguf`]); returns the tensors
/// kept in F32.
pub fn export_gguf(
    gpt: &Gpt,
    tokenizer: &Tokenizer,
    kind: ExportType,
    name: &str,
    path: &Path,
) -> Result<Vec<String>> {
    if tokenizer.vocab_size() != gpt.config.vocab_size {
        return Err(TrainError::Config(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}: llama.cpp needs one \
             token per embedding row",
            tokenizer.vocab_size(),
            gpt.config.vocab_size
        )));
    }
    let meta = tokenizer_metadata(tokenizer)?;
    Ok(write_gguf(gpt, &meta, kind, name, path)?)
}

/// Adds a LoRA adapter directory (PEFT's format, from `peft` or a kiem LoRA run) into the
/// model's weights, as PEFT's `merge_and_unload` does.
pub fn merge_adapter(gpt: &mut Gpt, adapter: &Path) -> Result<()> {
    let lora = kiem_engine::lora::Lora::load_peft(adapter, &gpt.config)?;
    gpt.set_lora(Some(lora))?;
    gpt.merge_lora()?;
    Ok(())
}
