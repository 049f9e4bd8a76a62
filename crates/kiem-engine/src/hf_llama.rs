//! `config.json` of Hugging Face's Llama-family classes (`LlamaForCausalLM`,
//! `Qwen2ForCausalLM`, `MistralForCausalLM`), read and written. Rotary settings are read both as
//! `rope_theta` + `rope_scaling` (transformers 4) and as `rope_parameters` (transformers 5), and
//! written the transformers-4 way, which transformers 5 still reads.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::config::{Arch, Block, ModelConfig, Rope, RopeScaling};
use crate::io::{config_usize, file_err};
use crate::Result;

fn arch_of(model_type: &str) -> Arch {
    match model_type {
        "qwen2" => Arch::Qwen2,
        "mistral" => Arch::Mistral,
        _ => Arch::Llama,
    }
}

/// The class `transformers` builds for each family.
fn class_of(arch: Arch) -> &'static str {
    match arch {
        Arch::Qwen2 => "Qwen2ForCausalLM",
        Arch::Mistral => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    }
}

fn float(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// The rotary settings: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
fn read_rope(path: &Path, v: &Value) -> Result<Rope> {
    let params = v.get("rope_parameters").filter(|p| !p.is_null());
    let scaling = v.get("rope_scaling").filter(|p| !p.is_null());
    let (theta, scaling) = match params {
        Some(p) => {
            let p = p
                .as_object()
                .ok_or_else(|| file_err(path, "rope_parameters is not an object"))?;
            if p.values().any(Value::is_object) {
                return Err(file_err(
                    path,
                    "rope_parameters per attention type is not supported (kiem runs one rotary setting for every layer)",
                ));
            }
            let theta = p.get("rope_theta").and_then(Value::as_f64);
            (theta.or_else(|| float(v, "rope_theta")), Some(p))
        }
        None => {
            let s = match scaling {
                Some(s) => Some(
                    s.as_object()
                        .ok_or_else(|| file_err(path, "rope_scaling is not an object"))?,
                ),
                None => None,
            };
            (float(v, "rope_theta"), s)
        }
    };
    let theta = theta.unwrap_or(10_000.0);
    let Some(s) = scaling else {
        return Ok(Rope {
            theta,
            scaling: RopeScaling::Default,
        });
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| file_err(path, format!("rope scaling {kind:?} needs a number {key}")))
    };
    let factor_is_one = s
        .get("factor")
        .and_then(Value::as_f64)
        .is_none_or(|f| f == 1.0);
    let attention_factor_is_one = s
        .get("attention_factor")
        .filter(|x| !x.is_null())
        .is_none_or(|f| f.as_f64() == Some(1.0));
    if !attention_factor_is_one {
        return Err(file_err(
            path,
            "rope attention_factor other than 1 is not supported",
        ));
    }
    let scaling = match kind {
        "default" if factor_is_one => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: s
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| file_err(path, "llama3 rope scaling needs original_max_position_embeddings"))?,
        },
        other => {
            return Err(file_err(
                path,
                format!("rope scaling type {other:?} is not supported (kiem implements default, linear and llama3)"),
            ))
        }
    };
    Ok(Rope { theta, scaling })
}

/// Reads a Llama, Qwen2 or Mistral `config.json` into kiem's description of the model.
pub(crate) fn read_config(path: &Path, v: &Value, model_type: &str) -> Result<ModelConfig> {
    let arch = arch_of(model_type);
    let num = |key: &str| config_usize(path, v, key);
    let optional = |key: &str| -> Result<Option<usize>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => num(key).map(Some),
        }
    };
    let flag = |key: &str, default: bool| -> Result<bool> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(file_err(
                path,
                format!("{key} is {other}, not true or false"),
            )),
        }
    };
    let mut unsupported: Vec<String> = Vec::new();
    let act = v
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    if act != "silu" {
        unsupported.push(format!("hidden_act {act:?} (kiem's SwiGLU uses silu)"));
    }
    if v.get("pretraining_tp")
        .and_then(Value::as_u64)
        .is_some_and(|tp| tp != 1)
    {
        unsupported.push("pretraining_tp other than 1".into());
    }
    if float(v, "attention_dropout").is_some_and(|p| p != 0.0) {
        unsupported.push("attention_dropout (kiem does not implement dropout)".into());
    }
    let context = num("max_position_embeddings")?;
    match arch {
        // Qwen2 slides only in the layers from max_window_layers on (transformers' rule).
        Arch::Qwen2
            if flag("use_sliding_window", false)?
                && optional("max_window_layers")?.unwrap_or(28) < num("num_hidden_layers")? =>
        {
            unsupported.push("use_sliding_window (sliding-window attention)".into())
        }
        Arch::Mistral => {
            // MistralConfig's default window is 4096; only an explicit null turns it off.
            let window = match v.get("sliding_window") {
                None => Some(4096),
                Some(_) => optional("sliding_window")?,
            };
            if let Some(window) = window.filter(|&w| w < context) {
                unsupported.push(format!(
                    "sliding_window {window} below max_position_embeddings {context} (sliding-window attention)"
                ));
            }
        }
        _ => {}
    }
    if let Some(types) = v.get("layer_types").and_then(Value::as_array) {
        if types.iter().any(|t| t != "full_attention") {
            unsupported.push("layer_types other than full_attention".into());
        }
    }
    let rope = read_rope(path, v)?;
    if !unsupported.is_empty() {
        return Err(file_err(
            path,
            format!(
                "unsupported {model_type} options: {}",
                unsupported.join(", ")
            ),
        ));
    }
    let eps = float(v, "rms_norm_eps").unwrap_or(1e-6) as f32;
    let mut block = Block::llama(eps, rope);
    match arch {
        Arch::Qwen2 => block.qkv_bias = true,
        // MistralForCausalLM has no biases, whatever attention_bias / mlp_bias say.
        Arch::Mistral => {}
        _ => {
            let bias = flag("attention_bias", false)?;
            block.qkv_bias = bias;
            block.attn_out_bias = bias;
            block.mlp_bias = flag("mlp_bias", false)?;
        }
    }
    block.tied_head = flag("tie_word_embeddings", false)?;
    let n_head = num("num_attention_heads")?;
    let n_embd = num("hidden_size")?;
    // Kept only when it differs from hidden_size / heads (checked product: sizes are not yet
    // validated here).
    let head_dim = optional("head_dim")?.filter(|&d| d.checked_mul(n_head) != Some(n_embd));
    let config = ModelConfig {
        n_layer: num("num_hidden_layers")?,
        n_head,
        n_embd,
        context,
        vocab_size: num("vocab_size")?,
        arch,
        block,
        n_kv_head: Some(optional("num_key_value_heads")?.unwrap_or(n_head)),
        head_dim,
        mlp_hidden: Some(num("intermediate_size")?),
    };
    Ok(config)
}

/// `config.json` that `transformers` loads as the model's class.
pub(crate) fn config_json(config: &ModelConfig, bos: Option<u32>, eos: Value) -> Value {
    let b = &config.block;
    let (eps, rope) = match (b.norm, b.positions) {
        (crate::config::Norm::Rms { eps }, crate::config::Positions::Rope(rope)) => (eps, rope),
        _ => unreachable!("a Llama-family config has RMS norm and rotary positions (validated)"),
    };
    let scaling = match rope.scaling {
        RopeScaling::Default => Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    let mut v = Map::new();
    let mut set = |k: &str, x: Value| {
        v.insert(k.to_string(), x);
    };
    set("model_type", json!(config.arch.name()));
    set("architectures", json!([class_of(config.arch)]));
    set("hidden_size", json!(config.n_embd));
    set("intermediate_size", json!(config.mlp_hidden()));
    set("num_hidden_layers", json!(config.n_layer));
    set("num_attention_heads", json!(config.n_head));
    set("num_key_value_heads", json!(config.kv_heads()));
    set("head_dim", json!(config.head_dim()));
    set("max_position_embeddings", json!(config.context));
    set("vocab_size", json!(config.vocab_size));
    // Rounded through its decimal form so 1e-5 is written as 1e-5, not 9.99999974737875e-6.
    let eps: f64 = format!("{eps}").parse().unwrap_or(f64::from(eps));
    set("rms_norm_eps", json!(eps));
    set("rope_theta", json!(rope.theta));
    set("rope_scaling", scaling);
    set("hidden_act", json!("silu"));
    set("tie_word_embeddings", json!(b.tied_head));
    set("attention_dropout", json!(0.0));
    set("initializer_range", json!(0.02));
    set("bos_token_id", json!(bos));
    set("eos_token_id", eos);
    set("dtype", json!("float32"));
    set("use_cache", json!(true));
    match config.arch {
        Arch::Qwen2 => {
            set("use_sliding_window", json!(false));
            set("sliding_window", Value::Null);
            set("max_window_layers", json!(config.n_layer));
        }
        Arch::Mistral => set("sliding_window", Value::Null),
        _ => {
            set("attention_bias", json!(b.qkv_bias));
            set("mlp_bias", json!(b.mlp_bias));
            set("pretraining_tp", json!(1));
        }
    }
    Value::Object(v)
}
