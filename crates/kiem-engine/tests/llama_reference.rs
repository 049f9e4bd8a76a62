//! The Llama family against `transformers` itself: model directories written by
//! `LlamaForCausalLM` / `Qwen2ForCausalLM` (`tests/fixtures/make_llama_reference.py`) load in
//! kiem and give the same logits, loss, every gradient, gradient norm, two AdamW steps and the
//! same greedy continuation. Configs: GQA with an explicit head_dim, llama3 rope scaling and an
//! untied head; Qwen2 tied with q/k/v biases and linear rope scaling; multi-query attention
//! with biases on every projection. A bf16 checkpoint in two shards loads too.
//!
//! Tolerance: for each tensor, max |kiem − torch| ≤ 1e-4 × max(1, max |torch|).

use std::path::{Path, PathBuf};

use kiem_engine::io::{load_model_dir, read_tensors, NamedTensors};
use kiem_engine::sampling::{GenerateOptions, SamplingParams};
use kiem_engine::AdamWState;

const B: usize = 2;
const T: usize = 12;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn max_diff(ours: &[f32], reference: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), reference.len(), "length");
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    (diff, scale)
}

fn assert_close(what: &str, ours: &[f32], reference: &[f32]) {
    let (diff, scale) = max_diff(ours, reference);
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{what}: max abs diff {diff:e} vs max |ref| {scale:e}"
    );
}

fn ids(t: &NamedTensors, key: &str) -> Vec<u32> {
    t[key].1.iter().map(|&x| x as u32).collect()
}

/// Logits over the real vocabulary, `[rows, vocab]`.
fn live_logits(all: &[f32], vocab: usize, padded: usize) -> Vec<f32> {
    all.chunks(padded)
        .flat_map(|row| row[..vocab].to_vec())
        .collect()
}

/// AdamW's first steps move each parameter by about `lr · sign(g)`, so a parameter whose true
/// gradient is within rounding of zero moves by a sign that neither side can know. Gradients
/// agree to 1e-4 of their tensor's largest (checked above), so parameters whose reference
/// gradient is nonzero but below that carry no trustworthy sign: they are left out of the
/// parameter comparison (at most a few per tensor; e.g. a key bias in the slowest-turning rotary
/// channels, which adds nearly the same constant to every score).
fn without_rounding_noise(
    reference: &NamedTensors,
    name: &str,
    ours: &[f32],
    theirs: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let grad = &reference[&format!("grad.{name}")].1;
    let top = grad.iter().fold(0f32, |m, g| m.max(g.abs()));
    let keep = |i: &usize| grad[*i] == 0.0 || grad[*i].abs() >= 1e-4 * top;
    let kept: Vec<usize> = (0..grad.len()).filter(keep).collect();
    assert!(
        grad.len() - kept.len() <= 16.max(grad.len() / 100),
        "{name}: {} of {} gradients are within rounding of zero",
        grad.len() - kept.len(),
        grad.len()
    );
    let pick = |x: &[f32]| kept.iter().map(|&i| x[i]).collect::<Vec<_>>();
    (pick(ours), pick(theirs))
}

fn check_against_transformers(name: &str) {
    let dir = fixture(name);
    let reference = read_tensors(&dir.join("reference.safetensors")).unwrap();
    let (mut gpt, special) = load_model_dir(&dir).unwrap();
    assert_eq!(special.bos, Some(1), "{name}: bos_token_id");
    let (vocab, vp) = (gpt.config.vocab_size, gpt.config.padded_vocab());
    let tokens = ids(&reference, "tokens");
    let targets: Vec<Option<u32>> = reference["targets"]
        .1
        .iter()
        .map(|&t| (t >= 0.0).then_some(t as u32))
        .collect();
    let count = targets.iter().flatten().count();

    // Forward.
    gpt.forward(&tokens, &targets, B, T, None).unwrap();
    let logits = live_logits(gpt.logits().unwrap(), vocab, vp);
    let (diff, scale) = max_diff(&logits, &reference["logits"].1);
    eprintln!("{name}: logits max abs diff {diff:e} (max |logit| {scale:.3})");
    assert_close(&format!("{name} logits"), &logits, &reference["logits"].1);

    // The same greedy continuation, through the KV-cache path, before any training.
    let prompt = ids(&reference, "prompt");
    let greedy = ids(&reference, "greedy");
    let options = GenerateOptions {
        max_tokens: greedy.len() - prompt.len(),
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
    };
    let generated = gpt
        .generate(std::slice::from_ref(&prompt), &options, &mut |_, _| {
            kiem_engine::sampling::Control::Continue
        })
        .unwrap();
    assert_eq!(
        generated[0].tokens,
        greedy[prompt.len()..],
        "{name}: greedy continuation"
    );

    // Two training steps: loss, gradients (step 1), clipping, AdamW.
    let mut opt = AdamWState::new(0.9, 0.95, 1e-8);
    for (step, loss_key, params_key) in [(1, "loss", "step1."), (2, "loss2", "step2.")] {
        gpt.zero_grad();
        let (sum, n) = gpt
            .forward(&tokens, &targets, B, T, Some(1.0 / count as f32))
            .unwrap();
        assert_eq!(n, count);
        let loss = (sum / n as f64) as f32;
        assert_close(
            &format!("{name} loss at step {step}"),
            &[loss],
            &reference[loss_key].1,
        );
        gpt.backward().unwrap();
        let live = |buffer: &[f32], spec: &kiem_engine::config::TensorSpec| {
            buffer[spec.range.start..spec.range.start + spec.live_len(vocab)].to_vec()
        };
        if step == 1 {
            for spec in &gpt.layout.tensors {
                let theirs = &reference[&format!("grad.{}", spec.name)].1;
                assert_close(
                    &format!("{name} gradient of {}", spec.name),
                    &live(&gpt.grads, spec),
                    theirs,
                );
            }
        }
        let norm = gpt.clip_grad_norm(1.0);
        if step == 1 {
            assert_close(
                &format!("{name} gradient norm"),
                &[norm as f32],
                &reference["grad_norm"].1,
            );
        }
        gpt.adamw_step(&mut opt, 1e-2, 0.1);
        for spec in &gpt.layout.tensors {
            let theirs = &reference[&format!("{params_key}{}", spec.name)].1;
            let ours = live(gpt.params().unwrap(), spec);
            let (ours, theirs) = without_rounding_noise(&reference, &spec.name, &ours, theirs);
            assert_close(
                &format!("{name} {} after step {step}", spec.name),
                &ours,
                &theirs,
            );
        }
    }
}

#[test]
fn llama_gqa_untied_head_llama3_rope_matches_transformers() {
    check_against_transformers("llama_gqa");
}

#[test]
fn qwen2_tied_qkv_bias_linear_rope_matches_transformers() {
    check_against_transformers("qwen2_tied");
}

#[test]
fn llama_multi_query_with_every_bias_matches_transformers() {
    check_against_transformers("llama_mqa_bias");
}

#[test]
fn mistral_without_sliding_window_matches_transformers() {
    check_against_transformers("mistral_gqa");
}

/// kiem writes each family back as a directory that loads in kiem unchanged, and (with
/// KIEM_TORCH_PYTHON set to a Python with torch and transformers) that `transformers` builds as
/// the same class with the fixture's logits.
#[test]
fn written_directories_load_back_in_kiem_and_transformers() {
    let python = std::env::var_os("KIEM_TORCH_PYTHON");
    if python.is_none() {
        eprintln!("transformers side SKIPPED: set KIEM_TORCH_PYTHON to a Python with torch and transformers");
    }
    for (name, class) in [
        ("llama_gqa", "LlamaForCausalLM"),
        ("qwen2_tied", "Qwen2ForCausalLM"),
        ("llama_mqa_bias", "LlamaForCausalLM"),
        ("mistral_gqa", "MistralForCausalLM"),
    ] {
        let dir = fixture(name);
        let (gpt, ids) = load_model_dir(&dir).unwrap();
        let out = tempfile::tempdir().unwrap();
        let config = kiem_engine::io::hf_config_json(&gpt.config, &ids);
        std::fs::write(out.path().join("config.json"), config.to_string()).unwrap();
        gpt.save_safetensors(&out.path().join("model.safetensors"))
            .unwrap();
        let (again, again_ids) = load_model_dir(out.path()).unwrap();
        assert_eq!(again.config, gpt.config, "{name}: config round trip");
        assert_eq!(again_ids, ids, "{name}: special ids");
        assert_eq!(
            again.params().unwrap(),
            gpt.params().unwrap(),
            "{name}: weights round trip"
        );
        if let Some(python) = &python {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/transformers_logits.py");
            let output = std::process::Command::new(python)
                .arg(script)
                .arg(out.path())
                .arg(dir.join("reference.safetensors"))
                .arg(class)
                .env("HF_HUB_OFFLINE", "1")
                .output()
                .unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            eprintln!("{report}");
            assert!(output.status.success(), "{name}: {report}");
        }
    }
}

/// bf16 matrix products (AVX512-BF16) train the Llama block too: loss and gradients stay within
/// bf16 rounding of transformers' fp32 ones.
#[test]
fn bf16_products_track_fp32_on_a_llama() {
    let dir = fixture("llama_gqa");
    let reference = read_tensors(&dir.join("reference.safetensors")).unwrap();
    let (mut gpt, _) = load_model_dir(&dir).unwrap();
    if let Err(e) = gpt.set_matmul_precision(kiem_engine::kernels::MatmulPrecision::Bf16) {
        eprintln!("SKIPPED (this CPU has no bf16 products): {e}");
        return;
    }
    let tokens = ids(&reference, "tokens");
    let targets: Vec<Option<u32>> = reference["targets"]
        .1
        .iter()
        .map(|&t| (t >= 0.0).then_some(t as u32))
        .collect();
    let count = targets.iter().flatten().count();
    gpt.zero_grad();
    let (sum, n) = gpt
        .forward(&tokens, &targets, B, T, Some(1.0 / count as f32))
        .unwrap();
    let loss = (sum / n as f64) as f32;
    let expected = reference["loss"].1[0];
    assert!(
        (loss - expected).abs() < 0.01 * expected,
        "loss {loss} vs {expected}"
    );
    gpt.backward().unwrap();
    let norm = gpt.grad_norm() as f32;
    let expected = reference["grad_norm"].1[0];
    assert!(
        (norm - expected).abs() < 0.03 * expected,
        "gradient norm {norm} vs {expected}"
    );
}

#[test]
fn sharded_bf16_checkpoint_loads_and_matches_transformers() {
    let dir = fixture("llama_gqa_bf16_sharded");
    let reference = read_tensors(&dir.join("reference.safetensors")).unwrap();
    let (mut gpt, _) = load_model_dir(&dir).unwrap();
    let tokens = ids(&reference, "tokens");
    let targets = vec![None; tokens.len()];
    gpt.forward(&tokens, &targets, B, T, None).unwrap();
    let logits = live_logits(
        gpt.logits().unwrap(),
        gpt.config.vocab_size,
        gpt.config.padded_vocab(),
    );
    assert_close("bf16 sharded logits", &logits, &reference["logits"].1);
}

/// End-of-sequence ids come from `generation_config.json` too; a malformed one is an error
/// naming the file.
#[test]
fn generation_config_names_end_ids() {
    assert_eq!(
        kiem_engine::io::generation_eos(&fixture("llama_gqa")).unwrap(),
        vec![2]
    );
    let dir = tempfile::tempdir().unwrap();
    assert!(kiem_engine::io::generation_eos(dir.path())
        .unwrap()
        .is_empty());
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [128001, 128009]}"#,
    )
    .unwrap();
    assert_eq!(
        kiem_engine::io::generation_eos(dir.path()).unwrap(),
        vec![128001, 128009]
    );
    std::fs::write(dir.path().join("generation_config.json"), "{oops").unwrap();
    let err = kiem_engine::io::generation_eos(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("generation_config.json") && err.contains("malformed"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load_error(dir: &Path) -> String {
    match load_model_dir(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Broken or unsupported directories fail with an error naming the file and what is wrong.
#[test]
fn bad_directories_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let edit_config = |dir: &Path, edit: &dyn Fn(&mut serde_json::Value)| {
        let path = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    let case = |name: &str, from: &str| {
        let dir = tmp.path().join(name);
        copy_dir(&fixture(from), &dir);
        dir
    };
    let expect = |dir: &Path, needles: &[&str]| {
        let err = load_error(dir);
        for needle in needles {
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    };

    let dir = case("missing_shard", "llama_gqa_bf16_sharded");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    expect(
        &dir,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
            "missing",
        ],
    );

    let dir = case("escaping_shard", "llama_gqa_bf16_sharded");
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, text.replacen("model-00001", "../model-00001", 1)).unwrap();
    expect(&dir, &["not a plain file name"]);

    let dir = case("truncated", "llama_gqa");
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    expect(&dir, &["model.safetensors", "not a valid safetensors file"]);

    let dir = case("yarn", "llama_gqa");
    edit_config(
        &dir,
        &|v| {
            v["rope_parameters"] =
                serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
        },
    );
    expect(
        &dir,
        &["config.json", "rope scaling type \"yarn\" is not supported"],
    );

    let dir = case("window", "mistral_gqa");
    edit_config(&dir, &|v| v["sliding_window"] = 16.into());
    expect(&dir, &["sliding_window 16", "sliding-window attention"]);

    // MistralConfig's default window (4096) applies when the key is absent.
    let dir = case("default_window", "mistral_gqa");
    edit_config(&dir, &|v| {
        v.as_object_mut().unwrap().remove("sliding_window");
        v["max_position_embeddings"] = 8192.into();
    });
    expect(
        &dir,
        &["sliding_window 4096 below max_position_embeddings 8192"],
    );
    // Keys Mistral ignores are ignored; a Qwen2 window that no layer reaches changes nothing.
    let dir = case("mistral_bias_keys", "mistral_gqa");
    edit_config(&dir, &|v| v["attention_bias"] = true.into());
    load_model_dir(&dir).unwrap();
    let dir = case("qwen_window_unused", "qwen2_tied");
    edit_config(&dir, &|v| {
        v["use_sliding_window"] = true.into();
        v["sliding_window"] = 8.into();
        v["max_window_layers"] = 2.into();
    });
    load_model_dir(&dir).unwrap();
    edit_config(&dir, &|v| v["max_window_layers"] = 1.into());
    expect(&dir, &["use_sliding_window"]);

    let dir = case("gelu", "llama_gqa");
    edit_config(&dir, &|v| {
        v["hidden_act"] = "gelu".into();
        v["pretraining_tp"] = 2.into();
    });
    expect(&dir, &["hidden_act \"gelu\"", "pretraining_tp"]);

    let dir = case("heads", "llama_gqa");
    edit_config(&dir, &|v| v["num_key_value_heads"] = 3.into());
    expect(&dir, &["multiple of the number of key/value heads"]);

    let dir = case("huge", "llama_gqa");
    edit_config(&dir, &|v| v["hidden_size"] = (1u64 << 40).into());
    expect(&dir, &["config.json", "implausibly large"]);

    let dir = case("bigger_than_its_files", "llama_gqa");
    edit_config(&dir, &|v| v["num_hidden_layers"] = 4000.into());
    expect(
        &dir,
        &["config.json", "parameters, but the weight files hold only"],
    );

    let dir = case("tied_but_different", "llama_gqa");
    edit_config(&dir, &|v| v["tie_word_embeddings"] = true.into());
    expect(&dir, &["lm_head.weight differs from the token embedding"]);
}
