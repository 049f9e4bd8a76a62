//! Hostile model files: random or mutated `config.json` and safetensors files give errors,
//! never a panic or an allocation sized by a lying header.

use std::path::Path;

use kiem_engine::io::{load_model_dir, read_tensors, write_tensors};
use proptest::prelude::*;
use serde_json::{json, Value};

/// A number a config field might hold: ordinary, zero, negative, huge, fractional or not a
/// number at all.
fn field() -> impl Strategy<Value = Value> {
    prop_oneof![
        (1u64..300).prop_map(|n| json!(n)),
        Just(json!(0)),
        Just(json!(-4)),
        Just(json!(u64::MAX)),
        Just(json!(1u64 << 40)),
        Just(json!(1e30)),
        Just(json!(2.5)),
        Just(json!("12")),
        Just(Value::Null),
    ]
}

const KEYS: [&str; 16] = [
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "n_inner",
    "tie_word_embeddings",
];

fn model_dir(dir: &Path, config: &Value) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tiny = vec![0.5f32; 64];
    write_tensors(
        &dir.join("model.safetensors"),
        &[("wte.weight".to_string(), vec![8, 8], &tiny)],
        None,
    )
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_configs_fail_cleanly(
        model_type in prop_oneof![Just("gpt2"), Just("llama"), Just("qwen2"), Just("mistral"), Just("bert")],
        values in proptest::collection::vec(field(), KEYS.len()),
        present in proptest::collection::vec(any::<bool>(), KEYS.len()),
    ) {
        let mut config = json!({"model_type": model_type});
        for ((key, value), keep) in KEYS.iter().zip(values).zip(present) {
            if keep {
                config[*key] = value;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        model_dir(dir.path(), &config);
        // The weights hold 64 values: no config that describes a real model loads from them,
        // and none may make kiem panic or allocate what the config claims.
        prop_assert!(load_model_dir(dir.path()).is_err());
    }

    #[test]
    fn mutated_safetensors_fail_cleanly(
        cut in 0usize..400,
        flips in proptest::collection::vec((0usize..400, any::<u8>()), 0..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let values = vec![1.0f32; 48];
        write_tensors(&path, &[("a".to_string(), vec![6, 8], &values)], None).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, byte) in flips {
            if at < bytes.len() {
                bytes[at] = byte;
            }
        }
        bytes.truncate(cut.min(bytes.len()));
        std::fs::write(&path, &bytes).unwrap();
        // Either the damage left a valid file or it is an error naming the file.
        if let Err(e) = read_tensors(&path) {
            prop_assert!(e.to_string().contains("model.safetensors"), "{}", e);
        }
    }
}

#[test]
fn a_header_claiming_a_huge_tensor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let header =
        json!({"w": {"dtype": "F32", "shape": [1u64 << 40, 1u64 << 20], "data_offsets": [0, 16]}})
            .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 16]);
    std::fs::write(&path, bytes).unwrap();
    let err = read_tensors(&path).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Found by `random_configs_fail_cleanly`: a width of 2^64 - 1 without `n_inner` made the default
/// MLP width (4 x n_embd) overflow before the range check could refuse it.
#[test]
fn a_huge_width_without_mlp_width_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = json!({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": u64::MAX,
                        "n_positions": 1, "vocab_size": u64::MAX});
    model_dir(dir.path(), &config);
    let Err(err) = load_model_dir(dir.path()) else {
        panic!("a model of width 2^64 - 1 loaded")
    };
    let err = err.to_string();
    assert!(err.contains("large") || err.contains("config"), "{err}");
}
