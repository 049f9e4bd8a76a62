//! Tokenizers as GGUF files carry them (`tokenizer.ggml.*`): a byte-level BPE vocabulary
//! (`tokenizer.ggml.model = gpt2`) with merges, token types and a pre-tokenizer named as
//! llama.cpp names them, read into a Hugging Face tokenizer definition; and the parts of a
//! byte-level BPE tokenizer that a GGUF file records.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::{
    ChatTemplateText, Result, Tokenizer, TokenizerConfig, TokenizerError, TokenizerSource,
};

/// llama.cpp's token types.
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;

/// The GPT-2 pre-tokenizer regex.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's (`llama-bpe`), as its `tokenizer.json` spells it (llama.cpp spells the
/// case-insensitive contractions out; the two match the same text).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE vocabulary from a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct ByteLevelVocab {
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// `"left right"` strings, by rank.
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub chat_template: Option<String>,
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer of a llama.cpp pre-tokenizer name, whether the model ignores merges for
/// whole-vocabulary words, and whether prompts start with BOS by default.
fn pre_tokenizer(pre: &str) -> std::result::Result<(Value, bool, bool), String> {
    let sequence = |parts: Vec<Value>| json!({"type": "Sequence", "pretokenizers": parts});
    Ok(match pre {
        "gpt-2" | "gpt2" | "phi-2" | "roberta-bpe" | "jina-es" | "jina-de" | "jina-v2-es"
        | "jina-v2-de" | "jina-v2-code" => (byte_level(true), false, false),
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" => (
            sequence(vec![split(LLAMA3_PATTERN), byte_level(false)]),
            true,
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            sequence(vec![split(QWEN2_PATTERN), byte_level(false)]),
            false,
            false,
        ),
        "smollm" | "starcoder" | "refact" | "command-r" => (
            sequence(vec![split(r"\p{N}"), byte_level(true)]),
            false,
            false,
        ),
        "default" => (
            sequence(vec![
                split(r"[\p{P}\$\+<=>\^~\|]+"),
                split(GPT2_PATTERN),
                split(r"\p{N}+"),
                split(r"[0-9][0-9][0-9]"),
                byte_level(false),
            ]),
            false,
            false,
        ),
        other => {
            return Err(format!(
                "unknown pre-tokenizer type {other:?} (kiem reads default, gpt-2, llama-bpe, \
                 qwen2, smollm and their aliases)"
            ))
        }
    })
}

impl Tokenizer {
    /// A tokenizer from a GGUF file's byte-level BPE vocabulary (`path` names the file in
    /// errors and as the source).
    pub fn from_byte_level_vocab(vocab: &ByteLevelVocab, path: &Path) -> Result<Self> {
        let fail = |message: String| TokenizerError::Load {
            path: path.to_path_buf(),
            message,
        };
        let (pre_tokenizer, ignore_merges, default_add_bos) =
            pre_tokenizer(&vocab.pre).map_err(fail)?;
        let mut map = serde_json::Map::new();
        for (id, token) in vocab.tokens.iter().enumerate() {
            // A repeated string (a padding hole) keeps its first id.
            map.entry(token.clone()).or_insert(json!(id));
        }
        let mut merges = Vec::with_capacity(vocab.merges.len());
        for (rank, merge) in vocab.merges.iter().enumerate() {
            // As llama.cpp splits them: at the first space after the first character.
            let cut = merge
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i)
                .ok_or_else(|| fail(format!("merge {rank} ({merge:?}) is not two tokens")))?;
            merges.push(json!([&merge[..cut], &merge[cut + 1..]]));
        }
        let added: Vec<Value> = vocab
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(id, &t)| {
                json!({"id": id, "content": vocab.tokens[id], "single_word": false,
                       "lstrip": false, "rstrip": false, "normalized": t != TOKEN_CONTROL,
                       "special": t == TOKEN_CONTROL})
            })
            .collect();
        let definition = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": byte_level(false),
            "decoder": byte_level(false),
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                      "vocab": map, "merges": merges},
        });
        let text = |id: Option<u32>| id.and_then(|i| vocab.tokens.get(i as usize)).cloned();
        let (bos, eos) = (text(vocab.bos_id), text(vocab.eos_id));
        let mut token_texts = Vec::new();
        token_texts.extend(bos.clone().map(|t| ("bos_token".to_string(), t)));
        token_texts.extend(eos.clone().map(|t| ("eos_token".to_string(), t)));
        let config = TokenizerConfig {
            bos_token: bos,
            eos_token: eos,
            add_bos_token: Some(vocab.add_bos.unwrap_or(default_add_bos)),
            token_texts,
            chat_template: vocab.chat_template.as_ref().map(|source| ChatTemplateText {
                source: source.clone(),
                origin: PathBuf::from(format!("{} (tokenizer.chat_template)", path.display())),
            }),
        };
        Self::from_json_with(
            definition.to_string(),
            TokenizerSource::File(path.to_path_buf()),
            &config,
        )
    }

    /// This tokenizer as a GGUF file records a byte-level BPE: tokens by id, their types
    /// (special tokens are control tokens), merges as `"left right"`, and `pre`, the
    /// pre-tokenizer's llama.cpp name, recognised from the definition. Fails for a tokenizer
    /// that is not a byte-level BPE or whose pre-tokenizer llama.cpp has no name for.
    pub fn byte_level_vocab(&self) -> Result<ByteLevelVocab> {
        let fail = |message: &str| TokenizerError::Load {
            path: PathBuf::from(self.source.to_string()),
            message: format!("cannot be written to GGUF: {message}"),
        };
        let definition: Value =
            serde_json::from_str(self.to_json()).map_err(|_| fail("its definition is not JSON"))?;
        let model = &definition["model"];
        if model["type"] != "BPE" {
            return Err(fail("not a BPE tokenizer"));
        }
        let pre = pre_name(&definition["pre_tokenizer"]).ok_or_else(|| {
            fail("its pre-tokenizer has no llama.cpp name (gpt-2, llama-bpe, qwen2, smollm)")
        })?;
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| fail("no merges"))?
            .iter()
            .map(|m| match m {
                Value::String(s) => Some(s.clone()),
                Value::Array(pair) => Some(format!(
                    "{} {}",
                    pair.first()?.as_str()?,
                    pair.get(1)?.as_str()?
                )),
                _ => None,
            })
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| fail("malformed merges"))?;
        let n = self.vocab_size();
        let mut tokens = Vec::with_capacity(n);
        let mut token_types = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let token = self
                .hf
                .id_to_token(id)
                .ok_or_else(|| fail(&format!("no token for id {id}")))?;
            tokens.push(token);
            token_types.push(if self.is_special(id) {
                TOKEN_CONTROL
            } else {
                TOKEN_NORMAL
            });
        }
        let prefix = self.prompt_prefix();
        Ok(ByteLevelVocab {
            pre: pre.to_string(),
            tokens,
            token_types,
            merges,
            bos_id: Some(prefix.first().copied().unwrap_or(self.bos_id())),
            eos_id: self.eos_id().or(Some(self.bos_id())),
            add_bos: Some(!prefix.is_empty()),
            chat_template: self.chat_template().map(|t| t.source.clone()),
        })
    }
}

/// llama.cpp's name for a Hugging Face pre-tokenizer definition, when it has one.
fn pre_name(pre: &Value) -> Option<&'static str> {
    let is_byte_level = |v: &Value, regex: bool| {
        v["type"] == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if is_byte_level(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array()?;
    let pattern = |v: &Value| v["pattern"]["Regex"].as_str().map(str::to_string);
    match parts.as_slice() {
        [a, b] if a["type"] == "Split" && is_byte_level(b, false) => match pattern(a)?.as_str() {
            LLAMA3_PATTERN => Some("llama-bpe"),
            QWEN2_PATTERN => Some("qwen2"),
            _ => None,
        },
        [a, b]
            if is_byte_level(b, true)
                && (a["type"] == "Digits" && a["individual_digits"] == true
                    || a["type"] == "Split" && pattern(a).as_deref() == Some(r"\p{N}")) =>
        {
            Some("smollm")
        }
        _ => None,
    }
}
