//! The original GPT-2 tokenizer, built from the vocabulary and merges that ship in `assets/`
//! (the same bytes as Hugging Face `gpt2`'s vocab.json / merges.txt), and GPT-2's byte-level
//! alphabet, which kiem-trained tokenizers share.

use std::sync::OnceLock;

use serde_json::json;

const ENCODER_JSON: &str = include_str!("../assets/gpt2_encoder.json");
const VOCAB_BPE: &str = include_str!("../assets/gpt2_vocab.bpe");

/// The GPT-2 `tokenizer.json`, in the canonical form `tokenizers` writes (computed once).
pub(crate) fn tokenizer_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        byte_level_bpe_json(ENCODER_JSON, VOCAB_BPE, &[])
            .expect("embedded GPT-2 tokenizer definition is valid")
    })
}

/// A `tokenizer.json` for a GPT-2-style byte-level BPE given as `vocab.json` and `merges.txt`
/// (Hugging Face's slow-tokenizer files). `<|endoftext|>` (when in the vocabulary) and
/// `extra_special` (token, id) pairs are special tokens.
pub(crate) fn byte_level_bpe_json(
    vocab_json: &str,
    merges_txt: &str,
    extra_special: &[(String, u32)],
) -> Result<String, String> {
    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(vocab_json)
        .map_err(|e| format!("vocab.json is not a JSON object of ids: {e}"))?;
    let mut merges: Vec<[&str; 2]> = Vec::new();
    for (i, line) in merges_txt.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let (a, b) = line.split_once(' ').ok_or_else(|| {
            format!(
                "merges.txt line {}: expected two tokens separated by a space",
                i + 1
            )
        })?;
        merges.push([a, b]);
    }
    let mut specials: Vec<(String, u32)> = extra_special.to_vec();
    if let Some(id) = vocab
        .get(crate::GPT2_ENDOFTEXT)
        .and_then(serde_json::Value::as_u64)
    {
        specials.push((crate::GPT2_ENDOFTEXT.to_string(), id as u32));
    }
    specials.sort_by_key(|(_, id)| *id);
    specials.dedup_by_key(|(_, id)| *id);
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": true, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let definition = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let hf: tokenizers::Tokenizer = definition
        .to_string()
        .parse()
        .map_err(|e: tokenizers::Error| e.to_string())?;
    hf.to_string(false).map_err(|e| e.to_string())
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the rest to U+0100 onwards, in byte order.
pub(crate) fn byte_to_unicode() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (u32::from(b'!')..=u32::from(b'~')).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b)
        };
        let mut table = ['\0'; 256];
        let mut next = 256u32;
        for b in 0..256u32 {
            table[b as usize] = if printable(b) {
                char::from_u32(b).expect("Latin-1 is valid")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("U+0100.. is valid")
            };
        }
        table
    })
}

/// Inverse of [`byte_to_unicode`]; `None` for characters outside the byte-level alphabet.
pub(crate) fn unicode_to_byte(c: char) -> Option<u8> {
    static TABLE: OnceLock<std::collections::HashMap<char, u8>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            byte_to_unicode()
                .iter()
                .enumerate()
                .map(|(b, &c)| (c, b as u8))
                .collect()
        })
        .get(&c)
        .copied()
}
