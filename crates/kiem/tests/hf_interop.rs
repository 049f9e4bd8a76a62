//! Hugging Face interop, proven against `transformers`: small random GPT-2 models it made
//! (tests/fixtures/hf, built by make_hf_fixtures.py) load in kiem with the same tokens, the same
//! logits (max abs diff ≤ 1e-4) and the same greedy continuation; kiem's chat template,
//! rendered by `transformers`, gives exactly the ids kiem's typed chat format gives; and kiem
//! commands take such a directory wherever they take a model.

mod common;

use std::path::{Path, PathBuf};

use common::{failed, ok, read_json, run, run_with_input, write_order_conversations};
use kiem_engine::io::{load_model_dir, read_tensors};
use kiem_engine::sampling::{GenerateOptions, SamplingParams};
use kiem_tokenizer::chat::{render, render_prompt, Message, Role, TrainOn};
use kiem_tokenizer::Tokenizer;

const TEXT: &str = "The customer asked whether the permit";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

#[test]
fn transformers_models_give_the_same_tokens_logits_and_greedy_text() {
    // tiny_a: float32 weights and tokenizer.json; tiny_b: float16 weights, vocab.json + merges.txt.
    for name in ["tiny_a", "tiny_b"] {
        let dir = fixture(name);
        let (gpt, ids) = load_model_dir(&dir).unwrap();
        assert_eq!((ids.bos, ids.eos), (Some(50256), vec![50256]));
        let tokenizer = Tokenizer::load(dir.to_str().unwrap()).unwrap();
        assert_eq!(tokenizer.vocab_size(), 50257);
        assert_eq!(tokenizer.bos_id(), 50256);
        let reference = read_tensors(&dir.join("reference.safetensors")).unwrap();
        let as_ids =
            |name: &str| -> Vec<u32> { reference[name].1.iter().map(|&x| x as u32).collect() };
        let tokens = as_ids("tokens");
        assert_eq!(tokenizer.encode(TEXT), tokens, "{name}: token ids");

        let mut gpt = gpt;
        let targets = vec![None; tokens.len()];
        gpt.forward(&tokens, &targets, 1, tokens.len(), None)
            .unwrap();
        let (v, vp) = (gpt.config.vocab_size, gpt.config.padded_vocab());
        let (shape, expected) = &reference["logits"];
        assert_eq!(shape, &vec![tokens.len(), v]);
        let mut worst = 0f32;
        for (t, row) in gpt.logits().unwrap().chunks(vp).enumerate() {
            for (got, want) in row[..v].iter().zip(&expected[t * v..(t + 1) * v]) {
                worst = worst.max((got - want).abs());
            }
        }
        assert!(worst <= 1e-4, "{name}: logits differ by up to {worst}");

        let greedy = as_ids("greedy");
        let options = GenerateOptions {
            max_tokens: greedy.len(),
            sampling: SamplingParams::greedy(),
            stop_ids: Vec::new(),
        };
        let out = gpt
            .generate(std::slice::from_ref(&tokens), &options, &mut |_, _| {
                kiem_engine::sampling::Control::Continue
            })
            .unwrap();
        assert_eq!(out[0].tokens, greedy, "{name}: greedy continuation");
    }
}

/// `kiem generate` prompts an imported GPT-2 as `transformers` does (no `<|endoftext|>` in
/// front: GPT-2's tokenizer adds none), so its greedy text is the one `transformers` generated.
#[test]
fn generate_continues_a_plain_prompt_as_transformers_does() {
    let dir = fixture("tiny_a");
    let reference = read_tensors(&dir.join("reference.safetensors")).unwrap();
    let greedy: Vec<u32> = reference["greedy"].1.iter().map(|&x| x as u32).collect();
    let tokenizer = Tokenizer::load(dir.to_str().unwrap()).unwrap();
    assert!(tokenizer.prompt_prefix().is_empty());
    let expected = tokenizer.decode(&greedy).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let max = greedy.len().to_string();
    let text = ok(run(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            TEXT,
            "--max-tokens",
            &max,
            "--temperature",
            "0",
            "--threads",
            "2",
        ],
        tmp.path(),
    ));
    assert_eq!(text, expected);
}

#[test]
fn kiem_chat_template_in_transformers_renders_what_kiem_renders() {
    // The GPT-2 tokenizer grown by kiem's chat tokens, as `kiem finetune` grows it.
    let tokenizer = Tokenizer::gpt2()
        .with_special_tokens(&[
            "<|user_start|>",
            "<|user_end|>",
            "<|assistant_start|>",
            "<|assistant_end|>",
            "<|system_start|>",
            "<|system_end|>",
        ])
        .unwrap();
    let text = std::fs::read_to_string(fixture("chat_renderings.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let role = match m["role"].as_str().unwrap() {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    _ => Role::Assistant,
                };
                Message::new(role, m["content"].as_str().unwrap())
            })
            .collect();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = if case["add_generation_prompt"] == true {
            render_prompt(&tokenizer, &messages).unwrap()
        } else {
            render(&tokenizer, &messages, TrainOn::Assistant)
                .unwrap()
                .ids
        };
        assert_eq!(got, expected, "{}", case["messages"]);
    }
}

#[test]
fn commands_take_a_transformers_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = fixture("tiny_b");
    let model = model.to_str().unwrap();
    // Generation from the vocab.json + merges.txt directory.
    let text = ok(run(
        &[
            "generate",
            "--model",
            model,
            "--prompt",
            TEXT,
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--threads",
            "2",
        ],
        dir,
    ));
    assert!(!text.is_empty());
    // Fine-tuning it on conversations adds the chat tokens and grows the embeddings; the result
    // is a model directory kiem chats with.
    write_order_conversations(&dir.join("chat.jsonl"), 12, |_| "It has shipped.".into());
    let out = run(
        &[
            "finetune",
            "--model",
            model,
            "--data",
            "chat.jsonl",
            "--out",
            "ft",
            "--steps",
            "3",
            "--val-fraction",
            "0",
            "--threads",
            "2",
        ],
        dir,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(stderr.contains("added 6 chat tokens"), "{stderr}");
    let config = read_json(&dir.join("ft/model/config.json"));
    assert_eq!(config["vocab_size"], 50263);
    let tokenizer_config = read_json(&dir.join("ft/model/tokenizer_config.json"));
    assert_eq!(
        tokenizer_config["chat_template"],
        kiem_tokenizer::chat::CHAT_TEMPLATE
    );
    assert_eq!(tokenizer_config["bos_token"], "<|endoftext|>");
    let generation = read_json(&dir.join("ft/model/generation_config.json"));
    assert_eq!(
        generation["eos_token_id"],
        serde_json::json!([50256, 50260])
    );
    let reply = run_with_input(
        &[
            "chat",
            "--model",
            "ft/model",
            "--max-tokens",
            "3",
            "--threads",
            "2",
        ],
        dir,
        "Where is order 3?\n",
    );
    assert_eq!(reply.lines().count(), 1, "{reply}");
    // Continued pre-training from the imported model.
    std::fs::write(
        dir.join("corpus.txt"),
        "The permit was granted. ".repeat(400),
    )
    .unwrap();
    ok(run(
        &[
            "data",
            "prepare",
            "--input",
            "corpus.txt",
            "--tokenizer",
            model,
            "--out",
            "data",
            "--val-fraction",
            "0.1",
        ],
        dir,
    ));
    ok(run(
        &[
            "pretrain",
            "--data",
            "data",
            "--init-from",
            model,
            "--out",
            "more",
            "--steps",
            "2",
            "--micro-batch",
            "2",
            "--threads",
            "2",
        ],
        dir,
    ));
    // Training rows shorter than the base's context; longer ones are refused.
    failed(
        run(
            &[
                "pretrain",
                "--data",
                "data",
                "--init-from",
                model,
                "--out",
                "long",
                "--steps",
                "1",
                "--context",
                "64",
            ],
            dir,
        ),
        &["--context 64 is longer than the base model's context of 32"],
    );
    let (more, _) = load_model_dir(&dir.join("more/model")).unwrap();
    assert_eq!(more.config.n_layer, 3);
    assert_eq!(more.config.context, 32);
    // A model directory of an architecture kiem does not run is refused, naming it; a Llama
    // config missing a size names the field.
    std::fs::create_dir(dir.join("gemma")).unwrap();
    std::fs::write(
        dir.join("gemma/config.json"),
        r#"{"model_type": "gemma", "hidden_size": 64}"#,
    )
    .unwrap();
    failed(
        run(&["generate", "--model", "gemma", "--prompt", "x"], dir),
        &["model_type \"gemma\" is not supported"],
    );
    std::fs::create_dir(dir.join("llama")).unwrap();
    std::fs::write(
        dir.join("llama/config.json"),
        r#"{"model_type": "llama", "hidden_size": 64, "max_position_embeddings": 128}"#,
    )
    .unwrap();
    failed(
        run(&["generate", "--model", "llama", "--prompt", "x"], dir),
        &["config.json", "num_attention_heads"],
    );
    std::fs::create_dir(dir.join("odd")).unwrap();
    let mut odd = read_json(&fixture("tiny_b").join("config.json"));
    odd["activation_function"] = "relu".into();
    odd["scale_attn_by_inverse_layer_idx"] = true.into();
    std::fs::write(dir.join("odd/config.json"), odd.to_string()).unwrap();
    failed(
        run(&["generate", "--model", "odd", "--prompt", "x"], dir),
        &["activation_function", "scale_attn_by_inverse_layer_idx"],
    );
}

/// The other direction: `transformers` loads a model that kiem fine-tuned (chat tokens added)
/// and computes the same logits and chat-template ids. Needs PyTorch, which CI does not
/// install: set KIEM_TORCH_PYTHON to a Python with torch and transformers to run it (see
/// README); otherwise it reports SKIPPED.
#[test]
fn transformers_loads_a_kiem_fine_tuned_model() {
    let Some(python) = std::env::var_os("KIEM_TORCH_PYTHON") else {
        eprintln!("SKIPPED: set KIEM_TORCH_PYTHON to a Python with torch and transformers");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    check_fine_tuned_in_transformers(&python, tmp.path(), &fixture("tiny_a"));
}

/// The same for a Llama that kiem pre-trained (grouped-query attention, tied head) and then
/// fine-tuned: `transformers` loads it as `LlamaForCausalLM` and starts prompts with the same
/// BOS. Opt-in like the GPT-2 check.
#[test]
fn transformers_loads_a_kiem_fine_tuned_llama() {
    let Some(python) = std::env::var_os("KIEM_TORCH_PYTHON") else {
        eprintln!("SKIPPED: set KIEM_TORCH_PYTHON to a Python with torch and transformers");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::prepare(dir);
    ok(run(
        &[
            "pretrain",
            "--data",
            "data",
            "--out",
            "base",
            "--arch",
            "llama",
            "--n-layer",
            "2",
            "--n-head",
            "4",
            "--n-embd",
            "64",
            "--context",
            "64",
            "--micro-batch",
            "4",
            "--steps",
            "10",
            "--eval-every",
            "0",
            "--sample-every",
            "0",
            "--threads",
            "2",
        ],
        dir,
    ));
    check_fine_tuned_in_transformers(&python, dir, &dir.join("base/model"));
}

fn check_fine_tuned_in_transformers(python: &std::ffi::OsStr, dir: &Path, base: &Path) {
    let chats: String = (0..8)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": format!("Where is order {i}?")},
                {"role": "assistant", "content": "It has shipped."}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("chat.jsonl"), chats).unwrap();
    ok(run(
        &[
            "finetune",
            "--model",
            base.to_str().unwrap(),
            "--data",
            "chat.jsonl",
            "--out",
            "ft",
            "--steps",
            "2",
            "--val-fraction",
            "0",
            "--threads",
            "2",
        ],
        dir,
    ));
    let model_dir = dir.join("ft/model");
    let (mut gpt, _) = load_model_dir(&model_dir).unwrap();
    let tokenizer = Tokenizer::load(model_dir.to_str().unwrap()).unwrap();
    let tokens = tokenizer.encode_prompt(TEXT);
    gpt.forward(&tokens, &vec![None; tokens.len()], 1, tokens.len(), None)
        .unwrap();
    let (v, vp) = (gpt.config.vocab_size, gpt.config.padded_vocab());
    let logits: Vec<Vec<f32>> = gpt
        .logits()
        .unwrap()
        .chunks(vp)
        .map(|r| r[..v].to_vec())
        .collect();
    let conversation = vec![
        Message::new(Role::System, "You answer customers."),
        Message::new(Role::User, "Do I need a permit? Ünïcödé 🏗️"),
        Message::new(Role::Assistant, "Usually not."),
        Message::new(Role::User, "Thanks!"),
    ];
    let as_json = |m: &[Message]| -> serde_json::Value {
        m.iter()
            .map(|m| serde_json::json!({"role": m.role.to_string(), "content": m.content}))
            .collect()
    };
    let chats = serde_json::json!([
        {"messages": as_json(&conversation), "add_generation_prompt": true,
         "ids": render_prompt(&tokenizer, &conversation).unwrap()},
        {"messages": as_json(&conversation[..3]), "add_generation_prompt": false,
         "ids": render(&tokenizer, &conversation[..3], TrainOn::Assistant).unwrap().ids},
    ]);
    let expected =
        serde_json::json!({"text": TEXT, "tokens": tokens, "logits": logits, "chats": chats});
    std::fs::write(dir.join("expected.json"), expected.to_string()).unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/transformers_loads_kiem.py");
    let output = std::process::Command::new(python)
        .arg(script)
        .arg(&model_dir)
        .arg(dir.join("expected.json"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{report}");
    assert!(
        output.status.success(),
        "transformers check failed:\n{report}"
    );
}
