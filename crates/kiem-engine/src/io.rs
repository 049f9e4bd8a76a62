//! Hugging Face GPT-2 files: `config.json` and `model.safetensors` with `GPT2LMHeadModel`
//! tensor names. Parameters are stored in the same `[in, out]` layout as the flat buffer, so
//! reading and writing are straight copies (only the padded vocabulary rows are dropped).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::kernels::{Kernels, LAYERNORM_EPS};
use crate::{EngineError, Gpt, ModelConfig, Result};

#[cfg(not(target_endian = "little"))]
compile_error!("kiem writes little-endian safetensors by reinterpreting f32 buffers");

fn file_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub(crate) fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// Writes named f32 tensors to a safetensors file (fsynced, then renamed into place).
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), f32_bytes(data))
                    .map_err(|e| file_err(path, format!("tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        safetensors::tensor::serialize_to_file(views, metadata, &tmp)
            .map_err(|e| file_err(path, e.to_string()))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| file_err(path, e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(path, e.to_string()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes a small file atomically.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| file_err(path, e.to_string()))
}

/// Tensors by name: shape and f32 values.
pub type NamedTensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads named tensors from a safetensors file as f32 (converting F16/BF16).
pub fn read_tensors(path: &Path) -> Result<NamedTensors> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(file_err(
                    path,
                    format!("tensor {name} has dtype {other:?}; kiem reads F32, F16 and BF16"),
                ))
            }
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

impl<K: Kernels> Gpt<K> {
    /// Parameters as Hugging Face tensors (padded vocabulary rows dropped).
    ///
    /// # Panics
    /// For a model transposed for decoding (its matrices are not in the files' order).
    pub fn hf_tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        assert!(
            self.check_training_layout().is_ok(),
            "hf_tensors of a model transposed for decoding"
        );
        let live_wte = self.config.vocab_size * self.config.n_embd;
        self.layout
            .tensors
            .iter()
            .map(|spec| {
                if spec.name == "transformer.wte.weight" {
                    let data = &self.params[spec.range.start..spec.range.start + live_wte];
                    (
                        spec.name.clone(),
                        vec![self.config.vocab_size, self.config.n_embd],
                        data,
                    )
                } else {
                    (
                        spec.name.clone(),
                        spec.shape.clone(),
                        &self.params[spec.range.clone()],
                    )
                }
            })
            .collect()
    }

    /// Writes `model.safetensors`.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        self.check_training_layout()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_tensors(path, &self.hf_tensors(), Some(metadata))
    }

    /// Loads parameters from Hugging Face tensors; every tensor must be present with its shape.
    pub fn load_tensors(
        &mut self,
        path: &Path,
        tensors: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<()> {
        self.check_training_layout()?;
        let c = self.config.n_embd;
        for spec in self.layout.tensors.clone() {
            let (shape, data) = tensors
                .get(&spec.name)
                .ok_or_else(|| file_err(path, format!("tensor {} is missing", spec.name)))?;
            let want = if spec.name == "transformer.wte.weight" {
                vec![self.config.vocab_size, c]
            } else {
                spec.shape.clone()
            };
            if *shape != want {
                return Err(file_err(
                    path,
                    format!(
                        "tensor {} has shape {shape:?}, expected {want:?}",
                        spec.name
                    ),
                ));
            }
            let dst = &mut self.params[spec.range.clone()];
            dst[..data.len()].copy_from_slice(data);
            dst[data.len()..].fill(0.0);
        }
        let known: std::collections::HashSet<&str> = self
            .layout
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        for name in tensors.keys() {
            let buffer = name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias");
            if known.contains(name.as_str()) || buffer {
                continue;
            }
            if name == "lm_head.weight" {
                let (_, head) = &tensors[name];
                let (_, wte) = &tensors["transformer.wte.weight"];
                if head != wte {
                    return Err(file_err(path, "lm_head.weight differs from transformer.wte.weight: untied output embeddings are not supported"));
                }
                continue;
            }
            return Err(file_err(
                path,
                format!("unexpected tensor {name}: not part of a GPT-2 model"),
            ));
        }
        Ok(())
    }
}

/// Special token ids recorded in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: u32,
    pub eos: u32,
}

/// `config.json` for `transformers`' `GPT2LMHeadModel`.
pub fn hf_config_json(config: &ModelConfig, ids: SpecialIds) -> Value {
    json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.context,
        "n_ctx": config.context,
        "vocab_size": config.vocab_size,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYERNORM_EPS,
        "tie_word_embeddings": true,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "dtype": "float32",
        "use_cache": true,
    })
}

/// Reads a Hugging Face GPT-2 `config.json`, refusing options kiem does not implement.
pub fn read_hf_config(path: &Path) -> Result<(ModelConfig, Option<SpecialIds>)> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| file_err(path, format!("malformed JSON: {e}")))?;
    let model_type = v
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("(missing)");
    if model_type != "gpt2" {
        return Err(file_err(
            path,
            format!("model_type {model_type:?} is not supported (kiem runs gpt2)"),
        ));
    }
    let num = |key: &str| -> Result<usize> {
        v.get(key)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| file_err(path, format!("missing or non-integer {key}")))
    };
    let config = ModelConfig {
        n_layer: num("n_layer")?,
        n_head: num("n_head")?,
        n_embd: num("n_embd")?,
        context: num("n_positions")?,
        vocab_size: num("vocab_size")?,
    };
    config
        .validate()
        .map_err(|e| file_err(path, e.to_string()))?;
    let mut unsupported = Vec::new();
    let is =
        |key: &str, ok: &dyn Fn(&Value) -> bool| v.get(key).is_none_or(|x| x.is_null() || ok(x));
    if !is("n_inner", &|x| x.as_u64() == Some(4 * config.n_embd as u64)) {
        unsupported.push("n_inner other than 4·n_embd");
    }
    if !is("activation_function", &|x| {
        x == "gelu_new" || x == "gelu_pytorch_tanh"
    }) {
        unsupported.push("activation_function other than gelu_new");
    }
    if !is("tie_word_embeddings", &|x| x == &Value::Bool(true)) {
        unsupported.push("untied word embeddings");
    }
    if !is("scale_attn_weights", &|x| x == &Value::Bool(true)) {
        unsupported.push("scale_attn_weights = false");
    }
    for flag in [
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ] {
        if !is(flag, &|x| x == &Value::Bool(false)) {
            unsupported.push(flag);
        }
    }
    if !is("layer_norm_epsilon", &|x| {
        x.as_f64().is_some_and(|e| (e - 1e-5).abs() < 1e-12)
    }) {
        unsupported.push("layer_norm_epsilon other than 1e-5");
    }
    if !unsupported.is_empty() {
        return Err(file_err(
            path,
            format!("unsupported GPT-2 options: {}", unsupported.join(", ")),
        ));
    }
    let id = |key: &str| v.get(key).and_then(Value::as_u64).map(|x| x as u32);
    let ids = match (id("bos_token_id"), id("eos_token_id")) {
        (Some(bos), Some(eos)) => Some(SpecialIds { bos, eos }),
        _ => None,
    };
    Ok((config, ids))
}

/// Loads a Hugging Face GPT-2 model directory (`config.json` + `model.safetensors`).
pub fn load_model_dir(dir: &Path) -> Result<(Gpt, Option<SpecialIds>)> {
    if !dir.is_dir() {
        return Err(file_err(dir, "model directory does not exist"));
    }
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(file_err(
            dir,
            "not a model directory: no config.json (a kiem run keeps its model in RUN_DIR/model)",
        ));
    }
    let (config, ids) = read_hf_config(&config_path)?;
    let weights = dir.join("model.safetensors");
    if !weights.exists() {
        return Err(file_err(
            dir,
            "no model.safetensors (kiem reads safetensors weights only)",
        ));
    }
    let mut gpt = Gpt::new(config)?;
    // `GPT2LMHeadModel` names its tensors `transformer.h.0...`; a bare `GPT2Model` (the
    // original `gpt2` checkpoint) names them `h.0...`.
    let tensors = read_tensors(&weights)?
        .into_iter()
        .map(|(name, tensor)| {
            let bare = !name.starts_with("transformer.") && name != "lm_head.weight";
            (
                if bare {
                    format!("transformer.{name}")
                } else {
                    name
                },
                tensor,
            )
        })
        .collect();
    gpt.load_tensors(&weights, &tensors)?;
    Ok((gpt, ids))
}
