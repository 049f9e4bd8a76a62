use proptest::prelude::*;

use super::*;

const TESTPLANS: &str = include_str!("../tests/data/tiktoken_testplans.txt");

/// The `r50k_base` (GPT-2) cases of the test plans: (text, expected ids).
fn r50k_cases() -> Vec<(String, Vec<u32>)> {
    let mut cases = Vec::new();
    for block in TESTPLANS.split("\n\n") {
        let mut encoding = None;
        let mut sample = None;
        let mut encoded = None;
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("EncodingName: ") {
                encoding = Some(v);
            } else if let Some(v) = line.strip_prefix("Sample: ") {
                sample = Some(v);
            } else if line == "Sample:" {
                sample = Some("");
            } else if let Some(v) = line.strip_prefix("Encoded: ") {
                encoded = Some(serde_json::from_str::<Vec<u32>>(v).expect("ids are JSON"));
            }
        }
        if encoding == Some("r50k_base") {
            cases.push((sample.unwrap().to_string(), encoded.unwrap()));
        }
    }
    cases
}

fn gpt2() -> &'static Tokenizer {
    static GPT2: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    GPT2.get_or_init(Tokenizer::gpt2)
}

fn generic_encode(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    tokenizer
        .hf
        .encode_fast(text, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

#[test]
fn gpt2_passes_every_r50k_test_plan() {
    let cases = r50k_cases();
    assert_eq!(cases.len(), 64, "the test plans hold 64 r50k_base cases");
    let gpt2 = Tokenizer::gpt2();
    for (text, expected) in &cases {
        assert_eq!(&gpt2.encode(text), expected, "fast path on {text:?}");
        assert_eq!(
            &generic_encode(&gpt2, text),
            expected,
            "tokenizer.json path on {text:?}"
        );
        assert_eq!(&gpt2.decode(expected).unwrap(), text);
    }
}

#[test]
fn fast_encoder_serves_kiem_tokenizers_and_matches_on_long_pieces() {
    let trained = train(
        corpus().into_iter(),
        &TrainOptions {
            vocab_size: 400,
            min_frequency: 0,
            show_progress: false,
        },
    )
    .unwrap();
    for tok in [gpt2(), &trained] {
        assert!(
            tok.fast.is_some(),
            "{:?} should use the fast encoder",
            tok.source()
        );
        // Pieces longer than the small-merge limit take the heap path.
        for text in [
            "a".repeat(200),
            "1234567890".repeat(30),
            format!("x{}y", "ab".repeat(100)),
            "!?".repeat(120),
            format!("{}word", " ".repeat(150)),
            "documentdocument".repeat(9) + " quick brown fox",
            "é🦀".repeat(40),
        ] {
            assert_eq!(tok.encode(&text), generic_encode(tok, &text), "{text:?}");
        }
    }
}

#[test]
fn gpt2_shape() {
    let gpt2 = Tokenizer::gpt2();
    assert_eq!(gpt2.vocab_size(), 50257);
    assert_eq!(gpt2.bos_id(), 50256);
    assert!(gpt2.is_special(50256));
    assert!(!gpt2.is_special(0));
    assert!(gpt2.fits_u16());
    assert_eq!(gpt2.hash(), Tokenizer::gpt2().hash(), "hash is stable");
    // Text that spells the special token is data, not a control token.
    assert_ne!(gpt2.encode("<|endoftext|>"), vec![50256]);
    assert_eq!(gpt2.decode(&[50256]).unwrap(), "<|endoftext|>");
}

#[test]
fn decode_rejects_unknown_ids_and_split_characters() {
    let gpt2 = Tokenizer::gpt2();
    assert!(matches!(
        gpt2.decode(&[50257]),
        Err(TokenizerError::UnknownId { id: 50257, .. })
    ));
    let ids = gpt2.encode("é");
    let bytes = gpt2.decode_bytes(&ids);
    assert_eq!(bytes, "é".as_bytes());
    // The byte tokens of a 2-byte character, one at a time, are not valid UTF-8 alone.
    let first_byte_only = gpt2.token_to_id(&gpt2::byte_to_unicode()[0xC3].to_string());
    assert!(gpt2.decode(&[first_byte_only.unwrap()]).is_err());
}

fn corpus() -> Vec<String> {
    let base = "The quick brown fox jumps over the lazy dog. 12345 numbers!\n\
                Le café coûte 3,50 €. Ünïcödé wörds and emoji 🦀🦀.\n\
                    indented code() {{ return x + y; }}\n";
    (0..50).map(|i| format!("{base} document {i}\n")).collect()
}

#[test]
fn trained_tokenizer_has_fixed_specials_and_round_trips() {
    let options = TrainOptions {
        vocab_size: 400,
        min_frequency: 0,
        show_progress: false,
    };
    let tok = train(corpus().into_iter(), &options).unwrap();
    assert_eq!(tok.vocab_size(), 400);
    for (id, name) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(name), Some(id as u32));
        assert!(tok.is_special(id as u32));
    }
    assert_eq!(tok.bos_id(), 0);
    for text in corpus().iter().take(3) {
        let ids = tok.encode(text);
        assert!(
            ids.len() < text.len() / 2,
            "merges compress the training text"
        );
        assert_eq!(tok.decode(&ids).unwrap(), *text);
    }
    // Special-token text in a document stays text.
    let ids = tok.encode("<|bos|>");
    assert!(ids.iter().all(|&id| !tok.is_special(id)));
    // Reloading the saved JSON gives the same ids and hash.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let again = Tokenizer::load(path.to_str().unwrap()).unwrap();
    assert_eq!(again.hash(), tok.hash());
    assert_eq!(again.encode(&corpus()[0]), tok.encode(&corpus()[0]));
    let from_dir = Tokenizer::load(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(from_dir.hash(), tok.hash());
}

#[test]
fn vocab_256_is_pure_bytes_plus_specials() {
    let options = TrainOptions {
        vocab_size: 256,
        min_frequency: 0,
        show_progress: false,
    };
    let tok = train(corpus().into_iter(), &options).unwrap();
    assert_eq!(tok.vocab_size(), 256 + SPECIAL_TOKENS.len());
    let text = "héllo wörld 🦀";
    let ids = tok.encode(text);
    assert_eq!(ids.len(), text.len(), "one token per byte");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Bytes never seen in training are still encodable.
    let unseen = "\u{7}\u{1F}ÿ";
    assert_eq!(tok.decode(&tok.encode(unseen)).unwrap(), unseen);
}

#[test]
fn vocab_size_out_of_range_is_an_error() {
    for vocab_size in [0, 255, MAX_VOCAB_SIZE + 1] {
        let options = TrainOptions {
            vocab_size,
            min_frequency: 0,
            show_progress: false,
        };
        let err = train(corpus().into_iter(), &options).unwrap_err();
        assert!(matches!(err, TokenizerError::VocabSize(v) if v == vocab_size));
        assert!(err.to_string().contains("256"));
    }
}

#[test]
fn load_errors_name_the_file() {
    let err = Tokenizer::load("/nonexistent/tokenizer.json").unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.json"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, "{not json").unwrap();
    let err = Tokenizer::load(path.to_str().unwrap()).unwrap_err();
    assert!(err.to_string().contains("bad.json"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn gpt2_round_trips_any_utf8(text in any::<String>()) {
        let gpt2 = gpt2();
        let ids = gpt2.encode(&text);
        prop_assert_eq!(gpt2.decode(&ids).unwrap(), text.clone());
        prop_assert_eq!(generic_encode(gpt2, &text), ids);
    }

    #[test]
    fn gpt2_round_trips_texty_strings(text in "[ a-zA-Z0-9'.,!?\\n\\t\u{e9}\u{4e2d}\u{1F600}-]{0,200}") {
        let gpt2 = gpt2();
        let ids = gpt2.encode(&text);
        prop_assert_eq!(gpt2.decode(&ids).unwrap(), text.clone());
        prop_assert_eq!(generic_encode(gpt2, &text), ids);
    }

    #[test]
    fn trained_round_trips_any_utf8(text in any::<String>()) {
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        let tok = TOK.get_or_init(|| {
            let options = TrainOptions { vocab_size: 300, min_frequency: 0, show_progress: false };
            train(corpus().into_iter(), &options).unwrap()
        });
        let ids = tok.encode(&text);
        prop_assert_eq!(generic_encode(tok, &text), ids.clone());
        prop_assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}
