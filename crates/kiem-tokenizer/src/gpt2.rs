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
        let vocab: serde_json::Value =
            serde_json::from_str(ENCODER_JSON).expect("embedded GPT-2 vocabulary is JSON");
        let merges: Vec<[&str; 2]> = VOCAB_BPE
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.is_empty())
            .map(|l| {
                let (a, b) = l.split_once(' ').expect("GPT-2 merges are pairs");
                [a, b]
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true});
        let definition = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 50256, "content": crate::GPT2_ENDOFTEXT, "single_word": false,
                              "lstrip": false, "rstrip": false, "normalized": true, "special": true}],
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
            .expect("embedded GPT-2 tokenizer definition is valid");
        hf.to_string(false)
            .expect("a loaded tokenizer serializes")
    })
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
