//! Tokenizers for kiem.
//!
//! A [`Tokenizer`] is always backed by a Hugging Face `tokenizers` definition (the
//! `tokenizer.json` that model directories carry), so whatever kiem writes loads unchanged in
//! the Python `tokenizers` package. The original GPT-2 tokenizer (`gpt2`, tiktoken's
//! `r50k_base`) is built offline from vocabulary files embedded in this crate and encodes through
//! `tiktoken-rs`, which is faster than the generic BPE path and gives identical ids.
//!
//! Byte-level BPE tokenizers are trained with [`train`]; their special tokens (documents and
//! chat roles) sit at fixed ids `0..SPECIAL_TOKENS.len()` whatever the vocabulary size.

mod bpe;
pub mod chat;
pub mod gguf_vocab;
mod gpt2;
pub mod stream;
mod train;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use train::{train, TrainOptions};

/// Special tokens of kiem-trained tokenizers, in id order: `<|bos|>` is id 0, and so on.
///
/// `<|bos|>` starts every document (it doubles as the document separator); the role markers
/// frame chat turns. Keeping them at the front means their ids never move when the vocabulary
/// size changes, so chat code can rely on them.
pub const SPECIAL_TOKENS: [&str; 7] = [
    BOS,
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|system_start|>",
    "<|system_end|>",
];

/// The beginning-of-document token of kiem-trained tokenizers.
pub const BOS: &str = "<|bos|>";

/// GPT-2's single special token: both beginning and end of a document.
pub const GPT2_ENDOFTEXT: &str = "<|endoftext|>";

/// Pre-tokenization regex of GPT-4 (`cl100k_base`), used by kiem-trained tokenizers.
pub const GPT4_SPLIT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Smallest vocabulary [`train`] accepts: the 256 byte tokens (special tokens come on top).
pub const MIN_VOCAB_SIZE: usize = 256;
/// Largest vocabulary [`train`] accepts.
pub const MAX_VOCAB_SIZE: usize = 131_072;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error(
        "tokenizer {path} has no beginning-of-document token (expected {BOS} or {GPT2_ENDOFTEXT})"
    )]
    NoBos { path: PathBuf },
    #[error("vocabulary size {0} is out of range: choose {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE}")]
    VocabSize(usize),
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownId { id: u32, vocab_size: usize },
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("{0}")]
    Chat(String),
    #[error("tokenizer training failed: {0}")]
    Train(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Where a tokenizer came from; shown to users and recorded in manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The embedded original GPT-2 tokenizer.
    Gpt2,
    /// A `tokenizer.json` on disk.
    File(PathBuf),
    /// Trained in this process.
    Trained,
}

impl std::fmt::Display for TokenizerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerSource::Gpt2 => f.write_str("gpt2"),
            TokenizerSource::File(path) => write!(f, "{}", path.display()),
            TokenizerSource::Trained => f.write_str("(trained)"),
        }
    }
}

/// A loaded tokenizer. Cheap to share across threads (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    /// Fast encoder with ids identical to `hf`, for byte-level BPE with the GPT-2 or GPT-4
    /// pre-tokenizer (everything kiem trains or ships).
    fast: Option<bpe::FastBpe>,
    source: TokenizerSource,
    bos_id: u32,
    json: String,
    hash: String,
    /// The bytes each id stands for, when the tokenizer is byte-level (`None` otherwise).
    id_bytes: Option<Vec<Vec<u8>>>,
    /// Whether each id is a special (added) token.
    special: Vec<bool>,
    /// Ids a prompt starts with, as the model's tokenizer rules say ([`Tokenizer::prompt_prefix`]).
    prompt_prefix: Vec<u32>,
    /// The end-of-sequence token its `tokenizer_config.json` names (`eos_token`), if any.
    eos_id: Option<u32>,
    /// [`Tokenizer::hash`] of the tokenizer this one was made from by
    /// [`Tokenizer::with_bos_prompts`] (same ids for every text).
    before_bos_rule: Option<String>,
    /// `bos_token`, `eos_token` … as the model's `tokenizer_config.json` spells them.
    token_texts: Vec<(String, String)>,
    /// The model's Hugging Face chat template, if it has one.
    chat_template: Option<ChatTemplateText>,
    /// The compiled template, made on first use (`None`: kiem's typed chat format applies).
    compiled_template: std::sync::OnceLock<Result<Option<chat::jinja::JinjaTemplate>, String>>,
    /// `hf` with special-token texts recognised, for rendered chats (made on first use).
    hf_chat: std::sync::OnceLock<tokenizers::Tokenizer>,
}

/// The settings of a model directory's `tokenizer_config.json` that decide how text starts and
/// how chats are written.
#[derive(Debug, Default, Clone)]
struct TokenizerConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos_token: Option<bool>,
    /// `bos_token`, `eos_token`, `unk_token` … as written (what chat templates see).
    token_texts: Vec<(String, String)>,
    chat_template: Option<ChatTemplateText>,
}

/// The special-token keys of `tokenizer_config.json` that `transformers` passes to a chat
/// template (its `special_tokens_map`).
const TEMPLATE_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A rendered chat's ids, and each token's byte range in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatEncoding {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

/// A model's Hugging Face chat template (Jinja source) and the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplateText {
    pub source: String,
    pub origin: PathBuf,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json` in `dir`, if there is one.
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(TokenizerError::Load {
                    path,
                    message: e.to_string(),
                })
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TokenizerError::Load {
                path: path.clone(),
                message: format!("malformed JSON: {e}"),
            })?;
        // A token is a string, or (older files) an AddedToken object with its `content`.
        let token = |key: &str| match v.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let token_texts = TEMPLATE_TOKEN_KEYS
            .iter()
            .filter_map(|key| token(key).map(|t| (key.to_string(), t)))
            .collect();
        // As in `transformers`: a `chat_template.jinja` file wins over the config's entry, which
        // is a string or a list of named templates (the one named "default" is used).
        let file = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&file) {
            Ok(source) => Some(ChatTemplateText {
                source,
                origin: file,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let source = match v.get("chat_template") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Array(list)) => {
                        let named = |name: &str| {
                            list.iter()
                                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                                .and_then(|t| t.get("template"))
                                .and_then(|t| t.as_str())
                                .map(str::to_string)
                        };
                        Some(named("default").ok_or_else(|| TokenizerError::Load {
                            path: path.clone(),
                            message: "chat_template lists named templates but none is named \"default\"".into(),
                        })?)
                    }
                    Some(_) => {
                        return Err(TokenizerError::Load {
                            path,
                            message: "chat_template must be a string or a list of {name, template}"
                                .into(),
                        })
                    }
                };
                source.map(|source| ChatTemplateText {
                    source,
                    origin: path.clone(),
                })
            }
            Err(e) => {
                return Err(TokenizerError::Load {
                    path: file,
                    message: e.to_string(),
                })
            }
        };
        Ok(Self {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            add_bos_token: v.get("add_bos_token").and_then(serde_json::Value::as_bool),
            token_texts,
            chat_template,
        })
    }
}

/// The special tokens a `tokenizer.json` post-processor puts before a single text
/// (`TemplateProcessing`, possibly inside a `Sequence`): what `transformers` adds to a prompt.
fn template_prefix(json: &serde_json::Value) -> Vec<String> {
    let Some(post) = json.get("post_processor") else {
        return Vec::new();
    };
    let processors: Vec<&serde_json::Value> = match post.get("processors") {
        Some(serde_json::Value::Array(list)) => list.iter().collect(),
        _ => vec![post],
    };
    let Some(template) = processors
        .into_iter()
        .find(|p| p.get("type").and_then(|t| t.as_str()) == Some("TemplateProcessing"))
    else {
        return Vec::new();
    };
    let mut prefix = Vec::new();
    for piece in template
        .get("single")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
    {
        match piece.get("SpecialToken").and_then(|t| t.get("id")) {
            Some(serde_json::Value::String(id)) => prefix.push(id.clone()),
            _ => break,
        }
    }
    prefix
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("hash", &self.hash)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a tokenizer by name or path: `gpt2`, a `tokenizer.json` file, or a directory that
    /// holds one (a model or data directory).
    pub fn load(spec: &str) -> Result<Self> {
        if spec == "gpt2" {
            return Ok(Self::gpt2());
        }
        let mut path = PathBuf::from(spec);
        if path.is_dir() {
            let dir = path;
            path = dir.join("tokenizer.json");
            if !path.exists() && dir.join("vocab.json").exists() && dir.join("merges.txt").exists()
            {
                let config = TokenizerConfig::read(&dir)?;
                return Self::from_vocab_and_merges(&dir, &config);
            }
        }
        // A model directory's `tokenizer.json` comes with its `tokenizer_config.json`; a
        // tokenizer file under another name stands alone.
        let config = match path.parent() {
            _ if path.file_name() != Some(std::ffi::OsStr::new("tokenizer.json")) => {
                TokenizerConfig::default()
            }
            Some(dir) if !dir.as_os_str().is_empty() => TokenizerConfig::read(dir)?,
            _ => TokenizerConfig::read(Path::new("."))?,
        };
        let json = std::fs::read_to_string(&path).map_err(|e| TokenizerError::Load {
            path: path.clone(),
            message: if e.kind() == std::io::ErrorKind::NotFound {
                "no such file (give `gpt2`, a tokenizer.json, or a directory holding one)"
                    .to_string()
            } else {
                e.to_string()
            },
        })?;
        Self::from_json_with(json, TokenizerSource::File(path), &config)
    }

    /// A Hugging Face GPT-2 directory's slow-tokenizer files: `vocab.json` + `merges.txt`, and
    /// `added_tokens.json` when present (its tokens are special).
    fn from_vocab_and_merges(dir: &std::path::Path, config: &TokenizerConfig) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| TokenizerError::Load {
                path,
                message: e.to_string(),
            })
        };
        let (vocab, merges) = (read("vocab.json")?, read("merges.txt")?);
        let mut extra = Vec::new();
        if dir.join("added_tokens.json").exists() {
            let added: std::collections::BTreeMap<String, u32> =
                serde_json::from_str(&read("added_tokens.json")?).map_err(|e| {
                    TokenizerError::Load {
                        path: dir.join("added_tokens.json"),
                        message: format!("expected {{\"token\": id, ...}}: {e}"),
                    }
                })?;
            extra.extend(added);
        }
        let json = gpt2::byte_level_bpe_json(&vocab, &merges, &extra).map_err(|message| {
            TokenizerError::Load {
                path: dir.join("vocab.json"),
                message,
            }
        })?;
        Self::from_json_with(json, TokenizerSource::File(dir.join("vocab.json")), config)
    }

    /// The original GPT-2 tokenizer (`r50k_base`), built from embedded files: no network.
    pub fn gpt2() -> Self {
        let json = gpt2::tokenizer_json();
        Self::from_json(json.to_string(), TokenizerSource::Gpt2)
            .expect("the embedded GPT-2 tokenizer is valid")
    }

    pub(crate) fn from_json(json: String, source: TokenizerSource) -> Result<Self> {
        Self::from_json_with(json, source, &TokenizerConfig::default())
    }

    /// A tokenizer from its `tokenizer.json` text and its model directory's
    /// `tokenizer_config.json` settings.
    ///
    /// The document token ([`Tokenizer::bos_id`]) is kiem's `<|bos|>`, else GPT-2's
    /// `<|endoftext|>`, else the config's `bos_token`, else the token the post-processor starts
    /// texts with (Llama 3's `<|begin_of_text|>`). Prompts start the way `transformers` starts
    /// them: with `bos_token` when the config says `add_bos_token`, with what the post-processor
    /// adds otherwise (nothing for GPT-2, Qwen2 or SmolLM2), and with `<|bos|>` for kiem's own
    /// tokenizers, whose every document starts with it.
    fn from_json_with(
        json: String,
        source: TokenizerSource,
        config: &TokenizerConfig,
    ) -> Result<Self> {
        let path = match &source {
            TokenizerSource::File(p) => p.clone(),
            other => PathBuf::from(other.to_string()),
        };
        let mut hf: tokenizers::Tokenizer =
            json.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Load {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
        // Text is data: a document that spells `<|bos|>` must not inject a control token.
        hf.set_encode_special_tokens(true);
        let value: Option<serde_json::Value> = serde_json::from_str(&json).ok();
        let template: Vec<u32> = value
            .as_ref()
            .map(template_prefix)
            .unwrap_or_default()
            .iter()
            .filter_map(|t| hf.token_to_id(t))
            .collect();
        let config_bos = config.bos_token.as_deref().and_then(|t| hf.token_to_id(t));
        let eos_id = config.eos_token.as_deref().and_then(|t| hf.token_to_id(t));
        let kiem_bos = hf.token_to_id(BOS);
        let bos_id = kiem_bos
            .or_else(|| hf.token_to_id(GPT2_ENDOFTEXT))
            .or(config_bos)
            .or_else(|| template.first().copied())
            .ok_or(TokenizerError::NoBos { path })?;
        let prompt_prefix = match config.add_bos_token {
            Some(true) => vec![config_bos.unwrap_or(bos_id)],
            Some(false) => Vec::new(),
            None if !template.is_empty() => template,
            None => kiem_bos.into_iter().collect(),
        };
        let hash = format!("sha256:{}", hex(&Sha256::digest(json.as_bytes())));
        let vocab_size = hf.get_vocab_size(true);
        let added = hf.get_added_tokens_decoder();
        let mut special = vec![false; vocab_size];
        for (&id, token) in &added {
            if let Some(slot) = special.get_mut(id as usize) {
                *slot = token.special;
            }
        }
        let byte_level = matches!(
            hf.get_decoder(),
            Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
        );
        let id_bytes = byte_level.then(|| {
            (0..vocab_size as u32)
                .map(|id| match added.get(&id) {
                    Some(token) => token.content.as_bytes().to_vec(),
                    None => hf
                        .id_to_token(id)
                        .map(|t| t.chars().filter_map(gpt2::unicode_to_byte).collect())
                        .unwrap_or_default(),
                })
                .collect()
        });
        let fast = value.as_ref().and_then(bpe::FastBpe::from_json);
        Ok(Self {
            hf,
            fast,
            source,
            bos_id,
            json,
            hash,
            id_bytes,
            special,
            prompt_prefix,
            eos_id,
            before_bos_rule: None,
            token_texts: config.token_texts.clone(),
            chat_template: config.chat_template.clone(),
            compiled_template: std::sync::OnceLock::new(),
            hf_chat: std::sync::OnceLock::new(),
        })
    }

    /// Encodes text to ids. Special-token strings inside `text` are encoded as ordinary text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        if let Some(fast) = &self.fast {
            return fast.encode(text);
        }
        match self.hf.encode_fast(text, false) {
            Ok(encoding) => encoding.get_ids().to_vec(),
            // Byte-level BPE without truncation cannot fail on a &str; keep the path total anyway.
            Err(e) => panic!("byte-level BPE failed to encode text: {e}"),
        }
    }

    /// Decodes ids to text. Fails on ids outside the vocabulary and on id sequences whose bytes
    /// are not valid UTF-8 (e.g. a multi-byte character cut in half).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab_size = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TokenizerError::UnknownId { id, vocab_size });
        }
        let bytes = self.decode_bytes(ids);
        String::from_utf8(bytes).map_err(|e| {
            TokenizerError::Decode(format!(
                "the ids do not form valid UTF-8 ({e}); a character may be split across tokens"
            ))
        })
    }

    /// Decodes ids to raw bytes (special tokens render as their text). Ids outside the
    /// vocabulary are skipped; streaming decoders use this to emit whole characters only.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        match &self.id_bytes {
            Some(table) => {
                let mut out = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    if let Some(bytes) = table.get(id as usize) {
                        out.extend_from_slice(bytes);
                    }
                }
                out
            }
            None => {
                let known: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|&id| (id as usize) < self.special.len())
                    .collect();
                self.hf
                    .decode(&known, false)
                    .map(String::into_bytes)
                    .unwrap_or_default()
            }
        }
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.hf.get_vocab_size(true)
    }

    /// The id that starts every document.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The ids a prompt starts with, following the model's tokenizer rules (see
    /// `from_json_with`): `[bos]` or nothing.
    pub fn prompt_prefix(&self) -> &[u32] {
        &self.prompt_prefix
    }

    /// `prompt_prefix` followed by the text's ids: a prompt as the model expects it.
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut ids = self.prompt_prefix.clone();
        ids.extend(self.encode(text));
        ids
    }

    /// This tokenizer for a model kiem pre-trains: its documents start with the document
    /// token, so its prompts do too. The rule is written into the tokenizer's post-processor
    /// (as Llama 3's tokenizer carries it), so `transformers` starts prompts the same way;
    /// text encodes to the same ids as before ([`Tokenizer::encoding_hash`] is unchanged).
    pub fn with_bos_prompts(self) -> Result<Tokenizer> {
        let mut json: serde_json::Value =
            serde_json::from_str(&self.json).map_err(|e| self.load_error(e.to_string()))?;
        if template_prefix(&json)
            .iter()
            .map(|t| self.token_to_id(t))
            .collect::<Vec<_>>()
            == [Some(self.bos_id)]
        {
            return Ok(self);
        }
        let bos = bos_text(&self)?;
        let special =
            |type_id: u32| serde_json::json!({"SpecialToken": {"id": bos, "type_id": type_id}});
        let sequence = |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
        let template = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [special(0), sequence("A", 0)],
            "pair": [special(0), sequence("A", 0), special(1), sequence("B", 1)],
            "special_tokens": {bos.clone(): {"id": bos, "ids": [self.bos_id], "tokens": [bos]}},
        });
        let post = match json.get("post_processor") {
            None | Some(serde_json::Value::Null) => template,
            // Keep what the tokenizer did after encoding (ByteLevel's offsets) and add BOS.
            Some(existing) if existing.get("type").and_then(|t| t.as_str()) == Some("Sequence") => {
                let mut seq = existing.clone();
                let list = seq["processors"].as_array_mut().ok_or_else(|| {
                    self.load_error("post_processor Sequence has no processors".into())
                })?;
                list.retain(|p| {
                    p.get("type").and_then(|t| t.as_str()) != Some("TemplateProcessing")
                });
                list.push(template);
                seq
            }
            Some(existing)
                if existing.get("type").and_then(|t| t.as_str()) == Some("TemplateProcessing") =>
            {
                template
            }
            Some(existing) => {
                serde_json::json!({"type": "Sequence", "processors": [existing, template]})
            }
        };
        json["post_processor"] = post;
        let mut with = self.rebuilt(&json)?;
        with.prompt_prefix = vec![self.bos_id];
        with.before_bos_rule = Some(self.hash.clone());
        Ok(with)
    }

    /// A tokenizer from an edited copy of this one's JSON, in `tokenizers`' canonical form, with
    /// the same document token, prompt rule and end token.
    fn rebuilt(&self, json: &serde_json::Value) -> Result<Tokenizer> {
        let text = serde_json::to_string(json).expect("json serializes");
        let hf: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e: tokenizers::Error| self.load_error(e.to_string()))?;
        let canonical = hf
            .to_string(false)
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        let config = TokenizerConfig {
            bos_token: self.id_to_token(self.bos_id),
            eos_token: None,
            add_bos_token: None,
            token_texts: self.token_texts.clone(),
            chat_template: self.chat_template.clone(),
        };
        let mut rebuilt = Self::from_json_with(canonical, self.source.clone(), &config)?;
        rebuilt.bos_id = self.bos_id;
        rebuilt.prompt_prefix = self.prompt_prefix.clone();
        rebuilt.eos_id = self.eos_id;
        Ok(rebuilt)
    }

    /// `sha256:` of what decides how text encodes: the tokenizer's JSON without its
    /// post-processor (which only adds special tokens around a prompt). Two tokenizers with the
    /// same encoding hash turn every text into the same ids.
    pub fn encoding_hash(&self) -> String {
        // The canonical form `tokenizers` writes, so formatting and defaulted fields don't count.
        let canonical = self
            .hf
            .to_string(false)
            .unwrap_or_else(|_| self.json.clone());
        let mut json: serde_json::Value = match serde_json::from_str(&canonical) {
            Ok(v) => v,
            Err(_) => return self.hash.clone(),
        };
        if let Some(obj) = json.as_object_mut() {
            obj.remove("post_processor");
        }
        let text = serde_json::to_string(&json).expect("json serializes");
        format!("sha256:{}", hex(&Sha256::digest(text.as_bytes())))
    }

    /// Whether `hash` names this tokenizer: its own [`Tokenizer::hash`], or that of the tokenizer
    /// it was made from by [`Tokenizer::with_bos_prompts`] (a run checkpointed before the BOS
    /// rule was recorded resumes with it).
    pub fn matches_hash(&self, hash: &str) -> bool {
        hash == self.hash || self.before_bos_rule.as_deref() == Some(hash)
    }

    /// The end-of-sequence id `tokenizer_config.json` names (`eos_token`), if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// `bos_token`, `eos_token` … as the model's `tokenizer_config.json` spells them (empty for
    /// tokenizers without one).
    pub fn token_texts(&self) -> &[(String, String)] {
        &self.token_texts
    }

    /// The model's Hugging Face chat template, if its directory has one.
    pub fn chat_template(&self) -> Option<&ChatTemplateText> {
        self.chat_template.as_ref()
    }

    /// The compiled Jinja chat template: `None` when the model has none or has kiem's own
    /// (whose typed renderer gives the same ids).
    pub(crate) fn jinja_template(&self) -> Result<Option<&chat::jinja::JinjaTemplate>> {
        let compiled = self.compiled_template.get_or_init(|| {
            let Some(template) = &self.chat_template else {
                return Ok(None);
            };
            if template.source.trim() == chat::CHAT_TEMPLATE.trim() {
                return Ok(None);
            }
            chat::jinja::JinjaTemplate::compile(&template.source, self.token_texts.clone())
                .map(Some)
                .map_err(|e| {
                    format!(
                        "the chat template in {} does not compile: {e:#}",
                        template.origin.display()
                    )
                })
        });
        compiled
            .as_ref()
            .map(Option::as_ref)
            .map_err(|e| TokenizerError::Chat(e.clone()))
    }

    /// Encodes a rendered chat as `transformers` does: special-token texts (written by the
    /// template) become their ids, and no special tokens are added. Also returns each token's
    /// byte range in `text`.
    pub fn encode_chat(&self, text: &str) -> Result<ChatEncoding> {
        let hf = self.hf_chat.get_or_init(|| {
            let mut hf = self.hf.clone();
            hf.set_encode_special_tokens(false);
            hf
        });
        let encoding = hf
            .encode(text, false)
            .map_err(|e| TokenizerError::Chat(format!("cannot encode the rendered chat: {e}")))?;
        Ok(ChatEncoding {
            ids: encoding.get_ids().to_vec(),
            offsets: encoding.get_offsets().to_vec(),
        })
    }

    fn load_error(&self, message: String) -> TokenizerError {
        TokenizerError::Load {
            path: PathBuf::from(self.source.to_string()),
            message,
        }
    }

    /// The id of a token given by its text (special or not).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }

    /// The text of a token id, in the tokenizer's own byte-level alphabet.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.hf.id_to_token(id)
    }

    /// Whether `id` is a special (added) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Where this tokenizer came from.
    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }

    /// `sha256:<hex>` of the tokenizer's JSON: token shards and models record it so that a
    /// mismatch between data and model is caught before training.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The Hugging Face `tokenizer.json` text.
    pub fn to_json(&self) -> &str {
        &self.json
    }

    /// Writes `tokenizer.json` atomically (temp file in the same directory, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.json.as_bytes()).map_err(|source| TokenizerError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A copy with special tokens added at the next free ids (fine-tuning adds the chat tokens
    /// to a base tokenizer this way; the model's embeddings grow to match).
    pub fn with_special_tokens(&self, names: &[&str]) -> Result<Tokenizer> {
        let mut json: serde_json::Value =
            serde_json::from_str(&self.json).map_err(|e| self.load_error(e.to_string()))?;
        let added = json["added_tokens"]
            .as_array_mut()
            .ok_or_else(|| self.load_error("tokenizer.json has no added_tokens list".into()))?;
        let mut next = self.vocab_size() as u32;
        for name in names {
            if self.token_to_id(name).is_some() {
                continue;
            }
            added.push(serde_json::json!({"id": next, "content": name, "single_word": false, "lstrip": false,
                                          "rstrip": false, "normalized": false, "special": true}));
            next += 1;
        }
        // Only ids were added: same document token and prompt rule.
        self.rebuilt(&json)
    }

    /// Token ids needed to store ids of this vocabulary: 2 bytes when it fits in `u16`.
    pub fn fits_u16(&self) -> bool {
        self.vocab_size() <= 1 << 16
    }
}

/// The text of a tokenizer's document token.
fn bos_text(tokenizer: &Tokenizer) -> Result<String> {
    tokenizer
        .id_to_token(tokenizer.bos_id)
        .ok_or_else(|| tokenizer.load_error("the document token has no text".into()))
}

/// Writes a file atomically: a temp file beside it, fsync, rename over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.partial-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
