//! Tokenizers shaped like those of the open models people start from (Llama 3's split regex
//! with `ignore_merges`, Qwen2's NFC normalizer and one-digit split with non-special added
//! tokens, SmolLM2's individual digits, plain GPT-2), made by the Python `tokenizers` library
//! (`tests/fixtures/hf_pretokenizers/make_fixtures.py`): kiem gives exactly its ids, and starts
//! prompts as `transformers` does (BOS for Llama 3 only).

use std::path::{Path, PathBuf};

use kiem_tokenizer::Tokenizer;
use serde_json::Value;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf_pretokenizers")
        .join(family)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Checks one family; returns how many texts had their prompt compared with `transformers`.
fn check(family: &str, bos: &str, prompt_prefix: &[&str]) -> usize {
    let dir = fixture(family);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tokenizer = Tokenizer::load(dir.to_str().unwrap()).unwrap();
    assert_eq!(
        tokenizer.bos_id(),
        tokenizer.token_to_id(bos).unwrap(),
        "{family}: document token"
    );
    let prefix: Vec<u32> = prompt_prefix
        .iter()
        .map(|t| tokenizer.token_to_id(t).unwrap())
        .collect();
    assert_eq!(tokenizer.prompt_prefix(), prefix, "{family}: prompt prefix");
    let mut prompts_compared = 0;
    for (i, text) in expected["texts"].as_array().unwrap().iter().enumerate() {
        let text = text.as_str().unwrap();
        // kiem encodes special-token spellings inside text as text, as `tokenizers` does with
        // `encode_special_tokens = True`.
        let ours = tokenizer.encode(text);
        assert_eq!(
            ours,
            ids(&expected["ids_special_as_text"][i]),
            "{family}: ids of {text:?}"
        );
        let plain = ids(&expected["ids"][i]);
        if plain == ours {
            assert_eq!(
                tokenizer.decode(&ours).unwrap(),
                expected["decoded"][i].as_str().unwrap(),
                "{family}: decoding {text:?}"
            );
        }
        // Prompts as transformers builds them, where transformers tokenizes the text itself
        // as `tokenizers` does (5.24 rebuilds SmolLM2's pre-tokenizer without its digit
        // split, and turns special-token spellings into control tokens; kiem follows
        // `tokenizers` and keeps text as text).
        if ids(&expected["ids_transformers_no_special"][i]) == ours {
            assert_eq!(
                tokenizer.encode_prompt(text),
                ids(&expected["prompt_ids"][i]),
                "{family}: prompt ids of {text:?}"
            );
            prompts_compared += 1;
        }
    }
    prompts_compared
}

#[test]
fn llama3_split_regex_with_ignore_merges_and_a_bos_template() {
    assert!(check("llama3", "<|begin_of_text|>", &["<|begin_of_text|>"]) >= 10);
    // Its tokenizer_config.json names the end-of-turn token as eos_token.
    let tokenizer = Tokenizer::load(fixture("llama3").to_str().unwrap()).unwrap();
    assert_eq!(tokenizer.eos_id(), tokenizer.token_to_id("<|eot_id|>"));
}

#[test]
fn qwen2_nfc_single_digits_and_added_tokens_without_bos() {
    assert!(check("qwen2", "<|endoftext|>", &[]) >= 10);
}

#[test]
fn smollm2_individual_digits_without_bos() {
    assert!(check("smollm2", "<|endoftext|>", &[]) >= 5);
}

#[test]
fn plain_gpt2_adds_no_bos() {
    assert!(check("plain_gpt2", "<|endoftext|>", &[]) >= 10);
}

/// A model kiem pre-trains starts prompts with its document token, and the rule travels in
/// the tokenizer's post-processor (so `transformers` follows it) without changing any text's ids.
#[test]
fn bos_prompts_are_written_into_the_post_processor() {
    let plain = Tokenizer::load(fixture("plain_gpt2").to_str().unwrap()).unwrap();
    let text = " Emma Woodhouse, handsome, clever, and rich";
    let with = Tokenizer::load(fixture("plain_gpt2").to_str().unwrap())
        .unwrap()
        .with_bos_prompts()
        .unwrap();
    assert_eq!(with.encode(text), plain.encode(text));
    assert_eq!(with.encoding_hash(), plain.encoding_hash());
    assert_ne!(with.hash(), plain.hash());
    assert_eq!(with.prompt_prefix(), [plain.bos_id()]);
    // A run checkpointed with the tokenizer before the rule resumes with it.
    assert!(with.matches_hash(plain.hash()) && with.matches_hash(with.hash()));
    assert!(!plain.matches_hash(with.hash()));
    let dir = tempfile::tempdir().unwrap();
    with.save(&dir.path().join("tokenizer.json")).unwrap();
    let again = Tokenizer::load(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(again.prompt_prefix(), [plain.bos_id()]);
    assert_eq!(again.hash(), with.hash());
    // Idempotent.
    assert_eq!(again.with_bos_prompts().unwrap().hash(), with.hash());
}
