//! LoRA adapters: gradients against finite differences (dropout included), the frozen base,
//! merging, decoding with adapters, and PEFT's file format read back.

use kiem_engine::config::{Arch, Block, Rope, RopeScaling};
use kiem_engine::infer::KvCache;
use kiem_engine::kernels::DecodingWeights;
use kiem_engine::lora::{Lora, LoraSpec};
use kiem_engine::rng::Rng;
use kiem_engine::{AdamWState, Gpt, ModelConfig};

fn gpt2() -> ModelConfig {
    ModelConfig::gpt2(2, 2, 8, 6, 11)
}

/// A Qwen2 block: grouped-query attention (4 query heads, 2 key/value heads), q/k/v biases,
/// untied head.
fn llama() -> ModelConfig {
    let rope = Rope {
        theta: 10_000.0,
        scaling: RopeScaling::Default,
    };
    let mut block = Block::llama(1e-5, rope);
    block.qkv_bias = true;
    ModelConfig {
        arch: Arch::Qwen2,
        block,
        n_kv_head: Some(2),
        head_dim: Some(4),
        mlp_hidden: Some(12),
        ..ModelConfig::gpt2(2, 4, 8, 6, 11)
    }
}

fn spec(targets: &[&str], dropout: f32) -> LoraSpec {
    LoraSpec {
        rank: 2,
        alpha: 3.0,
        dropout,
        use_rslora: false,
        targets: targets.iter().map(|s| s.to_string()).collect(),
    }
}

fn base(config: ModelConfig) -> Gpt {
    let mut gpt = Gpt::new(config).unwrap();
    gpt.init_random(42);
    let mut rng = Rng::new(9);
    for x in gpt.params_mut().unwrap().iter_mut() {
        *x += rng.normal() * 0.1;
    }
    gpt
}

/// Adapters with B non-zero too (fresh ones start at B = 0, where A's gradient vanishes).
fn adapters(config: &ModelConfig, spec: LoraSpec) -> Lora {
    let mut lora = Lora::new(config, spec, 5).unwrap();
    let mut rng = Rng::new(6);
    for x in lora.params.iter_mut() {
        *x += rng.normal() * 0.3;
    }
    lora
}

fn batch() -> (Vec<u32>, Vec<Option<u32>>) {
    let tokens: Vec<u32> = (0..10).map(|i| (i * 7 % 11) as u32).collect();
    let targets = (0..10)
        .map(|i| (i % 4 != 3).then_some((i * 3 % 11) as u32))
        .collect();
    (tokens, targets)
}

fn adapter_gradients_match_finite_differences(config: ModelConfig, targets: &[&str], dropout: f32) {
    let lora = adapters(&config, spec(targets, dropout));
    let mut gpt = base(config);
    let base_params = gpt.params().unwrap().to_vec();
    gpt.set_lora(Some(lora.clone())).unwrap();
    gpt.set_lora_dropout_seed(77);
    let (tokens, targets) = batch();
    let scale = 1.0 / targets.iter().flatten().count() as f32;
    gpt.zero_grad();
    gpt.forward(&tokens, &targets, 2, 5, Some(scale)).unwrap();
    gpt.backward().unwrap();
    assert!(
        gpt.grads.is_empty(),
        "the frozen base gets no gradient buffer"
    );
    let analytic = gpt.lora().unwrap().grads.clone();
    assert!(analytic.iter().any(|&g| g != 0.0));
    // The loss under the same dropout masks: a training pass with the same seed.
    let loss = |p: &[f32]| {
        let mut m = Gpt::new(config).unwrap();
        m.params_mut().unwrap().copy_from_slice(&base_params);
        let mut l = lora.clone();
        l.params.copy_from_slice(p);
        m.set_lora(Some(l)).unwrap();
        m.set_lora_dropout_seed(77);
        let (sum, _) = m.forward(&tokens, &targets, 2, 5, Some(scale)).unwrap();
        sum * f64::from(scale)
    };
    let mut worst = 0f64;
    for m in &lora.modules {
        for r in [m.a.clone(), m.b.clone()] {
            for i in r.clone().step_by((r.len() / 6).max(1)) {
                let eps = 1e-2;
                let (mut plus, mut minus) = (lora.params.clone(), lora.params.clone());
                plus[i] += eps;
                minus[i] -= eps;
                let numeric = (loss(&plus) - loss(&minus)) / (2.0 * f64::from(eps));
                let a = f64::from(analytic[i]);
                let err = (a - numeric).abs() / (a.abs().max(numeric.abs()) + 1e-2);
                worst = worst.max(err);
                assert!(
                    err < 2e-2,
                    "{} [{i}]: analytic {a} vs numeric {numeric}",
                    m.path
                );
            }
        }
    }
    eprintln!(
        "{:?} {targets:?} dropout {dropout}: worst {worst:.2e}",
        config.arch
    );
}

#[test]
fn adapter_gradients_match_finite_differences_gpt2() {
    adapter_gradients_match_finite_differences(gpt2(), &["all"], 0.0);
    adapter_gradients_match_finite_differences(gpt2(), &["c_attn", "mlp.c_proj"], 0.3);
}

#[test]
fn adapter_gradients_match_finite_differences_llama() {
    adapter_gradients_match_finite_differences(llama(), &["all"], 0.0);
    adapter_gradients_match_finite_differences(llama(), &["k", "v_proj", "gate", "down"], 0.3);
}

fn logits(gpt: &mut Gpt, tokens: &[u32]) -> Vec<f32> {
    let targets = vec![None; tokens.len()];
    gpt.forward(tokens, &targets, 1, tokens.len(), None)
        .unwrap();
    gpt.logits().unwrap().to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn merged_adapters_and_cached_decoding_equal_the_adapted_forward_pass() {
    for config in [gpt2(), llama()] {
        let lora = adapters(&config, spec(&["all"], 0.1));
        let mut gpt = base(config);
        let tokens = [1u32, 4, 2, 9, 3];
        let plain = logits(&mut gpt, &tokens);
        gpt.set_lora(Some(lora)).unwrap();
        let adapted = logits(&mut gpt, &tokens);
        assert!(
            max_diff(&plain, &adapted) > 1e-3,
            "the adapters change the model"
        );
        // Decoding with the KV cache applies them as the full pass does (no dropout).
        let mut cache = KvCache::new(&gpt);
        let vp = config.padded_vocab();
        let mut last = Vec::new();
        for &t in &tokens {
            last = gpt
                .forward_cached(std::slice::from_mut(&mut cache), &[&[t]])
                .unwrap();
        }
        let want = &adapted[(tokens.len() - 1) * vp..];
        assert!(
            max_diff(&last, want) < 1e-5,
            "{:?} cached decoding",
            config.arch
        );
        gpt.merge_lora().unwrap();
        assert!(gpt.lora().is_none());
        let merged = logits(&mut gpt, &tokens);
        let diff = max_diff(&merged, &adapted);
        assert!(diff < 1e-5, "{:?}: merged differs by {diff}", config.arch);
    }
}

#[test]
fn training_changes_only_the_adapters() {
    for config in [gpt2(), llama()] {
        let mut gpt = base(config);
        let before = gpt.params().unwrap().to_vec();
        let lora = Lora::new(&config, spec(&["all"], 0.05), 1).unwrap();
        let trainable = lora.num_parameters();
        gpt.set_lora(Some(lora)).unwrap();
        assert_eq!(gpt.trainable_parameters(), trainable);
        let mut opt = AdamWState::new(0.9, 0.95, 1e-8);
        let (tokens, targets) = batch();
        let mut losses = Vec::new();
        for step in 0..40 {
            gpt.zero_grad();
            gpt.set_lora_dropout_seed(step);
            let (sum, n) = gpt
                .forward(&tokens, &targets, 2, 5, Some(1.0 / 7.0))
                .unwrap();
            losses.push(sum / n as f64);
            gpt.backward().unwrap();
            gpt.clip_grad_norm(1.0);
            gpt.adamw_step(&mut opt, 2e-2, 0.01);
        }
        assert_eq!(
            opt.m.len(),
            trainable,
            "optimizer state for the adapters only"
        );
        assert!(
            losses[39] < losses[0] * 0.8,
            "{:?}: loss falls {} -> {}",
            config.arch,
            losses[0],
            losses[39]
        );
        let after = gpt.params().unwrap();
        assert!(
            before
                .iter()
                .zip(after)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "the base is bitwise untouched"
        );
    }
}

#[test]
fn peft_files_read_back_to_the_same_adapters() {
    let dir = tempfile::tempdir().unwrap();
    for (config, targets) in [
        (gpt2(), vec!["c_attn", "c_proj"]),
        (gpt2(), vec!["mlp"]),
        (llama(), vec!["q", "v", "down_proj"]),
    ] {
        let mut s = spec(&targets, 0.1);
        s.use_rslora = true;
        let lora = adapters(&config, s);
        lora.save_peft(dir.path(), &config).unwrap();
        let back = Lora::load_peft(dir.path(), &config).unwrap();
        assert_eq!(back.params, lora.params);
        assert_eq!(back.modules.len(), lora.modules.len());
        for (a, b) in back.modules.iter().zip(&lora.modules) {
            assert_eq!(
                (&a.path, &a.out, a.rank, a.scaling),
                (&b.path, &b.out, b.rank, b.scaling)
            );
        }
        assert_eq!(back.spec.dropout, 0.1);
        // The adapters do not fit another shape.
        let other = ModelConfig::gpt2(3, 2, 16, 6, 11);
        assert!(Lora::load_peft(dir.path(), &other).is_err());
    }
}

#[test]
fn unknown_targets_and_unsupported_adapters_are_refused_by_name() {
    let err = Lora::new(&llama(), spec(&["qq"], 0.0), 1).unwrap_err();
    assert!(err.to_string().contains("\"qq\""), "{err}");
    let err = Lora::new(&gpt2(), spec(&["q_proj"], 0.0), 1).unwrap_err();
    assert!(err.to_string().contains("c_attn"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let config = llama();
    adapters(&config, spec(&["q"], 0.0))
        .save_peft(dir.path(), &config)
        .unwrap();
    let path = dir.path().join("adapter_config.json");
    let good = std::fs::read_to_string(&path).unwrap();
    for (from, to, named) in [
        ("\"use_dora\": false", "\"use_dora\": true", "use_dora"),
        ("\"bias\": \"none\"", "\"bias\": \"all\"", "bias"),
        ("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"", "IA3"),
        ("\"r\": 2", "\"r\": 4", "rank"),
    ] {
        std::fs::write(&path, good.replace(from, to)).unwrap();
        let err = Lora::load_peft(dir.path(), &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains(named), "{named}: {err}");
    }
    std::fs::write(&path, "{not json").unwrap();
    assert!(Lora::load_peft(dir.path(), &config).is_err());
}

/// Adapters `peft` wrote (fixtures/peft/make_fixtures.py) load into kiem with peft's logits,
/// loss and adapter gradients, and merge to the weights of peft's `merge_and_unload`.
#[test]
fn peft_adapters_reproduce_peft() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let expected =
        kiem_engine::io::read_tensors(&fixtures.join("peft/expected.safetensors")).unwrap();
    let get = |key: &str| &expected.get(key).unwrap_or_else(|| panic!("no {key}")).1;
    for (name, base_dir) in [
        ("llama_lora", "llama_gqa"),
        ("qwen2_rslora", "qwen2_tied"),
        ("gpt2_lora", "peft/gpt2_base"),
    ] {
        let (mut gpt, _) = kiem_engine::io::load_model_dir(&fixtures.join(base_dir)).unwrap();
        let mut lora = Lora::load_peft(&fixtures.join("peft").join(name), &gpt.config).unwrap();
        assert_eq!(lora.spec.dropout, 0.1);
        // peft's reference gradients were taken in eval mode, without dropout.
        lora.spec.dropout = 0.0;
        gpt.set_lora(Some(lora)).unwrap();
        let tokens: Vec<u32> = get(&format!("{name}.tokens"))
            .iter()
            .map(|&t| t as u32)
            .collect();
        let targets: Vec<Option<u32>> = get(&format!("{name}.targets"))
            .iter()
            .map(|&t| (t >= 0.0).then_some(t as u32))
            .collect();
        let (batch, seq) = (2, tokens.len() / 2);
        let (v, vp) = (gpt.config.vocab_size, gpt.config.padded_vocab());
        let compare_logits = |gpt: &mut Gpt, want: &[f32], what: &str| {
            gpt.forward(&tokens, &vec![None; tokens.len()], batch, seq, None)
                .unwrap();
            let got = gpt.logits().unwrap();
            let diff = (0..batch * seq)
                .flat_map(|r| (0..v).map(move |j| (r, j)))
                .fold(0f32, |m, (r, j)| {
                    m.max((got[r * vp + j] - want[r * v + j]).abs())
                });
            assert!(diff < 1e-4, "{name} {what}: logits differ by {diff}");
        };
        compare_logits(&mut gpt, get(&format!("{name}.logits")), "adapted");
        let count = targets.iter().flatten().count();
        gpt.zero_grad();
        let (sum, _) = gpt
            .forward(&tokens, &targets, batch, seq, Some(1.0 / count as f32))
            .unwrap();
        let loss = sum / count as f64;
        let want_loss = f64::from(get(&format!("{name}.loss"))[0]);
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "{name}: loss {loss} vs {want_loss}"
        );
        gpt.backward().unwrap();
        let lora = gpt.lora().unwrap();
        for m in &lora.modules {
            for (which, range) in [("A", &m.a), ("B", &m.b)] {
                let key = format!(
                    "{name}.grad.base_model.model.{}.lora_{which}.weight",
                    m.path
                );
                let want = get(&key);
                let got = &lora.grads[range.clone()];
                let scale = want.iter().fold(0f32, |s, x| s.max(x.abs()));
                let diff = max_diff(got, want);
                assert!(diff <= 1e-4 * scale.max(1.0), "{key}: differs by {diff}");
            }
        }
        gpt.merge_lora().unwrap();
        let prefix = format!("{name}.merged_weight.");
        let mut checked = 0;
        for spec in &gpt.layout.tensors {
            if let Some(want) = expected.get(&format!("{prefix}{}", spec.name)) {
                let diff = max_diff(&gpt.params().unwrap()[spec.range.clone()], &want.1);
                assert!(
                    diff < 1e-5,
                    "{name} merged {}: differs by {diff}",
                    spec.name
                );
                checked += 1;
            }
        }
        let adapted = expected.keys().filter(|k| k.starts_with(&prefix)).count();
        assert_eq!(checked, adapted, "{name}: every merged weight compared");
        compare_logits(&mut gpt, get(&format!("{name}.merged")), "merged");
    }
}

/// The other direction: `peft` loads adapters kiem wrote (`PeftModel.from_pretrained`) and
/// computes kiem's logits, adapted and merged. Needs PyTorch and peft, which CI does not
/// install: set KIEM_TORCH_PYTHON to a Python with torch, transformers and peft to run it;
/// otherwise it reports SKIPPED.
#[test]
fn peft_loads_kiem_adapters() {
    let Some(python) = std::env::var_os("KIEM_TORCH_PYTHON") else {
        eprintln!("SKIPPED: set KIEM_TORCH_PYTHON to a Python with torch, transformers and peft");
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures");
    let tmp = tempfile::tempdir().unwrap();
    for (base_dir, targets) in [
        ("llama_gqa", vec!["all"]),
        ("qwen2_tied", vec!["q", "k", "o", "up"]),
        ("peft/gpt2_base", vec!["c_attn", "mlp.c_proj"]),
    ] {
        let base_path = fixtures.join(base_dir);
        let (mut gpt, _) = kiem_engine::io::load_model_dir(&base_path).unwrap();
        let mut s = spec(&targets, 0.1);
        s.use_rslora = base_dir == "qwen2_tied";
        let mut lora = adapters(&gpt.config, s);
        lora.base_model = base_path.display().to_string();
        let adapter = tmp.path().join(base_dir.replace('/', "_"));
        lora.save_peft(&adapter, &gpt.config).unwrap();
        gpt.set_lora(Some(lora)).unwrap();
        let tokens: Vec<u32> = (0..9).map(|i| (i * 5 % 31) as u32).collect();
        let (v, vp) = (gpt.config.vocab_size, gpt.config.padded_vocab());
        let all = logits(&mut gpt, &tokens);
        let rows: Vec<Vec<f32>> = all.chunks(vp).map(|r| r[..v].to_vec()).collect();
        let expected = adapter.join("expected.json");
        std::fs::write(
            &expected,
            serde_json::json!({"tokens": tokens, "logits": rows}).to_string(),
        )
        .unwrap();
        let out = std::process::Command::new(&python)
            .arg(root.join("tests/python/peft_loads_kiem.py"))
            .args([&base_path, &adapter, &expected])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{base_dir}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "{base_dir}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
}

/// One base serving two adapters, unmerged: sequences with either adapter or none decode in one
/// batch to the logits (and greedy tokens) of the three models with the adapters merged.
#[test]
fn served_adapters_decode_in_one_batch_as_merged_models() {
    use kiem_engine::batch::{Batcher, Event};
    use kiem_engine::sampling::{Control, GenerateOptions, SamplingParams};
    for config in [gpt2(), llama()] {
        let a1 = adapters(&config, spec(&["all"], 0.0));
        let mut a2 = adapters(&config, spec(&["attn"], 0.0));
        a2.params.iter_mut().for_each(|x| *x *= -1.5);
        let mut served = base(config);
        assert_eq!(served.add_served_adapter(a1.clone()).unwrap(), 0);
        assert_eq!(served.add_served_adapter(a2.clone()).unwrap(), 1);
        let merged = |lora: Option<Lora>| {
            let mut m = base(config);
            m.set_lora(lora).unwrap();
            m.merge_lora().unwrap();
            m
        };
        let models = [merged(None), merged(Some(a1)), merged(Some(a2))];
        let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5], &[6, 7, 8, 9]];
        let vp = config.padded_vocab();
        // Each sequence's prompt, with (a, b, c) adapters (none, 0, 1) and in another order.
        for order in [[0usize, 1, 2], [2, 0, 1]] {
            let mut caches: Vec<KvCache> = order
                .iter()
                .map(|&m| {
                    let mut c = KvCache::new(&served);
                    c.set_adapter(m.checked_sub(1));
                    c
                })
                .collect();
            let inputs: Vec<&[u32]> = order.iter().map(|&m| prompts[m]).collect();
            let got = served.forward_cached(&mut caches, &inputs).unwrap();
            for (i, &m) in order.iter().enumerate() {
                let mut cache = KvCache::new(&models[m]);
                let want = models[m]
                    .forward_cached(std::slice::from_mut(&mut cache), &[prompts[m]])
                    .unwrap();
                let diff = max_diff(&got[i * vp..(i + 1) * vp], &want);
                assert!(diff < 1e-5, "{:?} model {m}: {diff}", config.arch);
            }
        }
        // The batcher routes each sequence to its adapter.
        let options = GenerateOptions {
            max_tokens: 4,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop_ids: Vec::new(),
        };
        let mut batcher = Batcher::new(&served);
        for (m, prompt) in prompts.iter().enumerate() {
            batcher
                .add_with_adapter(m as u64, prompt.to_vec(), options.clone(), m.checked_sub(1))
                .unwrap();
        }
        let mut tokens = vec![Vec::new(); 3];
        while !batcher.is_empty() {
            batcher
                .step(&mut |id, e| {
                    if let Event::Token(t) = e {
                        tokens[id as usize].push(t);
                    }
                    Control::Continue
                })
                .unwrap();
        }
        for m in 0..3 {
            let want = models[m]
                .generate(&[prompts[m].to_vec()], &options, &mut |_, _| {
                    Control::Continue
                })
                .unwrap();
            assert_eq!(tokens[m], want[0].tokens, "{:?} model {m}", config.arch);
        }
        assert!(Batcher::new(&served)
            .add_with_adapter(9, vec![1], options.clone(), Some(2))
            .is_err());
    }
}

/// Models whose matrices' rows are whole 32-weight blocks, as Q8_0 and Q4_0 need.
fn blocked_configs() -> [ModelConfig; 2] {
    let mut llama = llama();
    llama.n_embd = 32;
    llama.head_dim = Some(8);
    llama.mlp_hidden = Some(64);
    llama.context = 32;
    [ModelConfig::gpt2(2, 2, 32, 32, 11), llama]
}

/// `gpt`'s layer matrices replaced by what storing them as `weights` keeps of them.
fn round_base_as(gpt: &mut Gpt, weights: DecodingWeights) {
    use kiem_engine::bf16_gemm::{from_bf16, to_bf16};
    use kiem_engine::kernels::QuantMatrix;
    let config = gpt.config;
    let gpt2 = config.arch == kiem_engine::config::Arch::Gpt2;
    let layers = gpt.layout.layers.clone();
    let params = gpt.params_mut().unwrap();
    for lp in &layers {
        for (range, c_in) in [
            (&lp.qkv_w, config.n_embd),
            (&lp.attn_out_w, config.q_width()),
            (&lp.mlp_in_w, config.n_embd),
            (&lp.mlp_out_w, config.mlp_hidden()),
        ] {
            let c_out = range.len() / c_in;
            let w = &mut params[range.clone()];
            // As [out, in] (GPT-2 stores [in, out]).
            let at = |j: usize, i: usize| if gpt2 { i * c_out + j } else { j * c_in + i };
            let out_in: Vec<f32> = (0..c_out * c_in)
                .map(|x| w[at(x / c_in, x % c_in)])
                .collect();
            let kept: Vec<f32> = match (weights, weights.quant_kind()) {
                (DecodingWeights::Bf16, _) => {
                    out_in.iter().map(|&x| from_bf16(to_bf16(x))).collect()
                }
                (_, Some(kind)) => QuantMatrix::quantize(kind, &out_in, c_in, c_out)
                    .unwrap()
                    .dequantize(),
                (_, None) => out_in,
            };
            for (x, v) in kept.into_iter().enumerate() {
                w[at(x / c_in, x % c_in)] = v;
            }
        }
    }
}

#[test]
fn a_compact_base_trains_adapters_as_its_dequantized_weights_do() {
    for config in blocked_configs() {
        for weights in [
            DecodingWeights::Bf16,
            DecodingWeights::Q8_0,
            DecodingWeights::Q4_0,
        ] {
            let what = format!("{:?} base as {}", config.arch, weights.name());
            let lora = adapters(&config, spec(&["all"], 0.1));
            // The QLoRA model, and the reference: an fp32 model with the weights it keeps.
            let mut compact = base(config);
            assert!(
                compact.freeze_base(weights).is_err(),
                "{what}: needs adapters"
            );
            compact.set_lora(Some(lora.clone())).unwrap();
            compact.freeze_base(weights).unwrap();
            let layer_weights: usize = compact
                .layout
                .layers
                .iter()
                .map(|l| l.qkv_w.len() + l.attn_out_w.len() + l.mlp_in_w.len() + l.mlp_out_w.len())
                .sum();
            let want_bytes = (weights.bytes_per_weight() * layer_weights as f64) as usize;
            // Quantized rows are kept in groups of 16 whose blocks' scales share cache lines:
            // a row of one 32-weight block (this width) pads its scales' line by 2 bytes.
            let padding = match weights {
                DecodingWeights::Bf16 => 0,
                _ => layer_weights / config.n_embd.min(config.q_width()) * 2,
            };
            let got = compact.frozen_base_bytes();
            assert!(
                (want_bytes..=want_bytes + padding).contains(&got),
                "{what}: {got} bytes, {want_bytes} + up to {padding} expected"
            );
            let mut reference = base(config);
            round_base_as(&mut reference, weights);
            reference.set_lora(Some(lora)).unwrap();

            // More rows than decoding's thin products take: products with the dequantized
            // matrices.
            let tokens: Vec<u32> = (0..20).map(|i| (i * 5 % 11) as u32).collect();
            let diff = max_diff(
                &logits(&mut compact, &tokens),
                &logits(&mut reference, &tokens),
            );
            assert!(diff < 1e-4, "{what}: logits differ by {diff}");

            // Adapter gradients (dropout on) are those of the reference.
            let (tokens2, targets) = batch();
            let mut grads = Vec::new();
            for gpt in [&mut compact, &mut reference] {
                gpt.zero_grad();
                gpt.set_lora_dropout_seed(7);
                gpt.forward(&tokens2, &targets, 2, 5, Some(1.0 / 7.0))
                    .unwrap();
                gpt.backward().unwrap();
                grads.push(gpt.lora().unwrap().grads.clone());
            }
            let scale = grads[1].iter().fold(0f32, |m, g| m.max(g.abs()));
            let diff = max_diff(&grads[0], &grads[1]) / scale;
            assert!(
                diff < 1e-4,
                "{what}: adapter gradients differ by {diff} (relative)"
            );
            // And training lowers the loss.
            let mut opt = AdamWState::new(0.9, 0.95, 1e-8);
            let mut losses = Vec::new();
            for step in 0..30 {
                compact.zero_grad();
                compact.set_lora_dropout_seed(step);
                let (sum, n) = compact
                    .forward(&tokens2, &targets, 2, 5, Some(1.0 / 7.0))
                    .unwrap();
                losses.push(sum / n as f64);
                compact.backward().unwrap();
                compact.clip_grad_norm(1.0);
                compact.adamw_step(&mut opt, 2e-2, 0.01);
            }
            assert!(
                losses[29] < losses[0] * 0.8,
                "{what}: loss falls {} -> {}",
                losses[0],
                losses[29]
            );

            // Cached decoding reads the stored matrices directly.
            let full = logits(&mut compact, &tokens);
            let mut cache = KvCache::new(&compact);
            let mut last = Vec::new();
            for &t in &tokens {
                last = compact
                    .forward_cached(std::slice::from_mut(&mut cache), &[&[t]])
                    .unwrap();
            }
            let vp = config.padded_vocab();
            let diff = max_diff(&last, &full[(tokens.len() - 1) * vp..]);
            // Quantized products quantize their input rows to 8 bits too.
            let tol = if weights == DecodingWeights::Bf16 {
                1e-4
            } else {
                0.05
            };
            assert!(diff < tol, "{what}: cached decoding differs by {diff}");

            // The fp32 base is gone: reading, merging, dropping the adapters are refused.
            let err = compact.params().unwrap_err().to_string();
            assert!(err.contains("compactly"), "{err}");
            assert!(compact.merge_lora().is_err());
            assert!(compact.set_lora(None).is_err());
            assert!(compact.freeze_base(weights).is_err());
        }
    }
    // Rows that are not whole blocks cannot be quantized: named, and nothing changes.
    let mut gpt = base(gpt2());
    gpt.set_lora(Some(adapters(&gpt2(), spec(&["all"], 0.0))))
        .unwrap();
    let err = gpt
        .freeze_base(DecodingWeights::Q4_0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("q4_0") && err.contains("32"), "{err}");
    assert!(gpt.params().is_ok());
}

/// Storing the base compactly gives the fp32 matrices' memory back to the system.
#[test]
fn a_compact_base_releases_the_fp32_matrices() {
    let config = ModelConfig::gpt2(2, 4, 256, 16, 64);
    let mut gpt = base(config);
    gpt.set_lora(Some(Lora::new(&config, spec(&["all"], 0.0), 1).unwrap()))
        .unwrap();
    let released = gpt.freeze_base(DecodingWeights::Q4_0).unwrap();
    let layer_bytes = 4 * 2 * 12 * 256 * 256;
    if cfg!(target_os = "linux") {
        assert!(
            released as f64 > 0.95 * layer_bytes as f64,
            "{released} of {layer_bytes} bytes released"
        );
    }
    let tokens: Vec<u32> = (0..16).map(|i| i % 64).collect();
    let l = logits(&mut gpt, &tokens);
    assert!(l.iter().all(|x| x.is_finite()));
}

/// `set_recompute`: the backward pass runs each layer forward again from its input instead of
/// reading stored activations; losses and gradients are the same bits, for full training and
/// for adapters with dropout (their masks regenerate), over several steps.
#[test]
fn recomputing_layers_gives_the_same_gradients() {
    for config in [gpt2(), llama()] {
        for adapted in [false, true] {
            let run = |recompute: bool| {
                let mut gpt = base(config);
                if adapted {
                    gpt.set_lora(Some(adapters(&config, spec(&["all"], 0.3))))
                        .unwrap();
                }
                gpt.set_recompute(recompute);
                let (tokens, targets) = batch();
                let mut opt = AdamWState::new(0.9, 0.95, 1e-8);
                let mut out = Vec::new();
                for step in 0..3 {
                    gpt.set_lora_dropout_seed(100 + step);
                    gpt.zero_grad();
                    let (sum, _) = gpt.forward(&tokens, &targets, 2, 5, Some(0.1)).unwrap();
                    gpt.backward().unwrap();
                    let grads = gpt.lora().map_or(&gpt.grads, |l| &l.grads);
                    out.push((
                        sum.to_bits(),
                        grads.iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
                    ));
                    gpt.adamw_step(&mut opt, 1e-2, 0.1);
                }
                out
            };
            let stored = run(false);
            assert!(stored[0].1.iter().any(|&g| g != 0));
            assert_eq!(stored, run(true), "{:?}, adapters: {adapted}", config.arch);
        }
    }
}
