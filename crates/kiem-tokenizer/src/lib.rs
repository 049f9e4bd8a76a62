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
                return Self::from_vocab_and_merges(&dir);
            }
        }
        let json = std::fs::read_to_string(&path).map_err(|e| TokenizerError::Load {
            path: path.clone(),
            message: if e.kind() == std::io::ErrorKind::NotFound {
                "no such file (give `gpt2`, a tokenizer.json, or a directory holding one)"
                    .to_string()
            } else {
                e.to_string()
            },
        })?;
        Self::from_json(json, TokenizerSource::File(path))
    }

    /// A Hugging Face GPT-2 directory's slow-tokenizer files: `vocab.json` + `merges.txt`, and
    /// `added_tokens.json` when present (its tokens are special).
    fn from_vocab_and_merges(dir: &std::path::Path) -> Result<Self> {
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
        Self::from_json(json, TokenizerSource::File(dir.join("vocab.json")))
    }

    /// The original GPT-2 tokenizer (`r50k_base`), built from embedded files: no network.
    pub fn gpt2() -> Self {
        let json = gpt2::tokenizer_json();
        Self::from_json(json.to_string(), TokenizerSource::Gpt2)
            .expect("the embedded GPT-2 tokenizer is valid")
    }

    pub(crate) fn from_json(json: String, source: TokenizerSource) -> Result<Self> {
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
        let bos_id = hf
            .token_to_id(BOS)
            .or_else(|| hf.token_to_id(GPT2_ENDOFTEXT))
            .ok_or(TokenizerError::NoBos { path })?;
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
        let fast = serde_json::from_str(&json)
            .ok()
            .and_then(|value| bpe::FastBpe::from_json(&value));
        Ok(Self {
            hf,
            fast,
            source,
            bos_id,
            json,
            hash,
            id_bytes,
            special,
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
            serde_json::from_str(&self.json).map_err(|e| TokenizerError::Load {
                path: PathBuf::from(self.source.to_string()),
                message: e.to_string(),
            })?;
        let added = json["added_tokens"]
            .as_array_mut()
            .ok_or_else(|| TokenizerError::Load {
                path: PathBuf::from(self.source.to_string()),
                message: "tokenizer.json has no added_tokens list".into(),
            })?;
        let mut next = self.vocab_size() as u32;
        for name in names {
            if self.token_to_id(name).is_some() {
                continue;
            }
            added.push(serde_json::json!({"id": next, "content": name, "single_word": false, "lstrip": false,
                                          "rstrip": false, "normalized": false, "special": true}));
            next += 1;
        }
        let text = serde_json::to_string(&json).expect("json serializes");
        // Round-trip through `tokenizers` so the stored JSON is its canonical form.
        let hf: tokenizers::Tokenizer =
            text.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Load {
                    path: PathBuf::from(self.source.to_string()),
                    message: e.to_string(),
                })?;
        let canonical = hf
            .to_string(false)
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        Self::from_json(canonical, self.source.clone())
    }

    /// Token ids needed to store ids of this vocabulary: 2 bytes when it fits in `u16`.
    pub fn fits_u16(&self) -> bool {
        self.vocab_size() <= 1 << 16
    }
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
