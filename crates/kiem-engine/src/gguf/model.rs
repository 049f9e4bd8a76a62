//! A model from a GGUF file: its metadata read into the `config.json` that `transformers`
//! would build from it (as `transformers`' GGUF loader maps the keys), then each tensor
//! dequantized to f32 and placed under its Hugging Face name, with llama.cpp's conventions
//! undone: llama q/k rows permuted back from interleaved RoPE pairs, GPT-2's linear weights
//! transposed back to `Conv1D`'s `[in, out]`.

use serde_json::{json, Value};

use super::{GgufFile, MetaValue, TensorInfo};
use crate::config::Arch;
use crate::frozen::FrozenMatrix;
use crate::io::{hf_config_from_json, Loading, SpecialIds};
use crate::{Gpt, Result};

impl GgufFile {
    fn u64_of(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(MetaValue::as_u64)
            .ok_or_else(|| self.error(format!("missing or non-integer metadata {key}")))
    }

    fn f64_of(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(MetaValue::as_f64)
    }

    /// An id-valued metadata entry (`tokenizer.ggml.bos_token_id` ...).
    pub fn id_of(&self, key: &str) -> Option<u32> {
        self.get(key)
            .and_then(MetaValue::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| self.error("no general.architecture"))
    }

    /// The `config.json` `transformers` builds from this file's metadata.
    fn hf_config(&self, arch: &str, vocab_size: usize) -> Result<Value> {
        let key = |k: &str| format!("{arch}.{k}");
        let n = |k: &str| self.u64_of(&key(k));
        let ids = (
            self.id_of("tokenizer.ggml.bos_token_id"),
            self.id_of("tokenizer.ggml.eos_token_id"),
        );
        Ok(match arch {
            "llama" => {
                let heads = n("attention.head_count")?;
                let embd = n("embedding_length")?;
                let mut v = json!({
                    "model_type": "llama",
                    "num_hidden_layers": n("block_count")?,
                    "hidden_size": embd,
                    "intermediate_size": n("feed_forward_length")?,
                    "num_attention_heads": heads,
                    "num_key_value_heads": self.u64_of(&key("attention.head_count_kv")).unwrap_or(heads),
                    "max_position_embeddings": n("context_length")?,
                    "rms_norm_eps": self.f64_of(&key("attention.layer_norm_rms_epsilon"))
                        .ok_or_else(|| self.error(format!("no {}", key("attention.layer_norm_rms_epsilon"))))?,
                    "rope_theta": self.f64_of(&key("rope.freq_base")).unwrap_or(10_000.0),
                    "vocab_size": vocab_size,
                    "tie_word_embeddings": self.tensor("output.weight").is_none(),
                    "attention_bias": self.tensor("blk.0.attn_q.bias").is_some(),
                    "mlp_bias": self.tensor("blk.0.ffn_up.bias").is_some(),
                    "bos_token_id": ids.0,
                    "eos_token_id": ids.1,
                });
                if let Ok(dim) = n("rope.dimension_count") {
                    v["head_dim"] = json!(dim);
                }
                if let Some(kind) = self
                    .get(&key("rope.scaling.type"))
                    .and_then(MetaValue::as_str)
                {
                    let factor = self.f64_of(&key("rope.scaling.factor")).unwrap_or(1.0);
                    match kind {
                        "none" => {}
                        "linear" => v["rope_scaling"] = json!({"rope_type": "linear", "factor": factor}),
                        other => {
                            return Err(self.error(format!(
                                "rope scaling {other:?} in a GGUF file is not supported (kiem reads none and linear)"
                            )))
                        }
                    }
                }
                if self.tensor("rope_freqs.weight").is_some() {
                    return Err(self.error(
                        "rope_freqs.weight (Llama 3.1 rope scaling as a tensor) is not supported yet",
                    ));
                }
                v
            }
            "gpt2" => {
                let eps = self
                    .f64_of(&key("attention.layer_norm_epsilon"))
                    .unwrap_or(1e-5);
                json!({
                    "model_type": "gpt2",
                    "n_layer": n("block_count")?,
                    "n_embd": n("embedding_length")?,
                    "n_head": n("attention.head_count")?,
                    "n_positions": n("context_length")?,
                    "n_inner": self.u64_of(&key("feed_forward_length")).ok(),
                    "vocab_size": vocab_size,
                    "layer_norm_epsilon": (eps as f32) as f64,
                    "bos_token_id": ids.0,
                    "eos_token_id": ids.1,
                })
            }
            other => {
                return Err(self.error(format!(
                    "architecture {other:?} is not supported (kiem reads GGUF files of \
                     architecture llama and gpt2)"
                )))
            }
        })
    }
}

/// Tensors outside the blocks: (GGUF name, GPT-2's Hugging Face name, the Llama family's).
const GLOBAL_NAMES: [(&str, Option<&str>, Option<&str>); 5] = [
    (
        "token_embd.weight",
        Some("transformer.wte.weight"),
        Some("model.embed_tokens.weight"),
    ),
    ("position_embd.weight", Some("transformer.wpe.weight"), None),
    (
        "output_norm.weight",
        Some("transformer.ln_f.weight"),
        Some("model.norm.weight"),
    ),
    ("output_norm.bias", Some("transformer.ln_f.bias"), None),
    (
        "output.weight",
        Some("lm_head.weight"),
        Some("lm_head.weight"),
    ),
];

/// Block tensors: (GGUF part of `blk.N.PART.SUFFIX`, GPT-2's part of
/// `transformer.h.N.PART.SUFFIX`, the Llama family's part of `model.layers.N.PART.SUFFIX`).
const BLOCK_NAMES: [(&str, Option<&str>, Option<&str>); 10] = [
    ("attn_norm", Some("ln_1"), Some("input_layernorm")),
    ("attn_qkv", Some("attn.c_attn"), None),
    ("attn_q", None, Some("self_attn.q_proj")),
    ("attn_k", None, Some("self_attn.k_proj")),
    ("attn_v", None, Some("self_attn.v_proj")),
    ("attn_output", Some("attn.c_proj"), Some("self_attn.o_proj")),
    ("ffn_norm", Some("ln_2"), Some("post_attention_layernorm")),
    ("ffn_gate", None, Some("mlp.gate_proj")),
    ("ffn_up", Some("mlp.c_fc"), Some("mlp.up_proj")),
    ("ffn_down", Some("mlp.c_proj"), Some("mlp.down_proj")),
];

/// The Hugging Face side of a name-table entry for `arch`.
fn hf_side<'a>(arch: Arch, entry: &(&'a str, Option<&'a str>, Option<&'a str>)) -> Option<&'a str> {
    if arch == Arch::Gpt2 {
        entry.1
    } else {
        entry.2
    }
}

/// Where a block's tensors live in Hugging Face names.
fn block_prefix(arch: Arch) -> &'static str {
    if arch == Arch::Gpt2 {
        "transformer.h."
    } else {
        "model.layers."
    }
}

/// The Hugging Face name of a GGUF tensor (`None`: not a tensor kiem knows).
fn hf_name(arch: Arch, name: &str) -> Option<String> {
    if let Some(entry) = GLOBAL_NAMES.iter().find(|e| e.0 == name) {
        return hf_side(arch, entry).map(str::to_string);
    }
    let (layer, tensor) = name.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = tensor.rsplit_once('.')?;
    let hf = BLOCK_NAMES
        .iter()
        .find(|e| e.0 == part)
        .and_then(|e| hf_side(arch, e))?;
    Some(format!("{}{layer}.{hf}.{suffix}", block_prefix(arch)))
}

/// The GGUF name of a Hugging Face tensor name of kiem's layout (`None`: no GGUF name).
pub(crate) fn gguf_name(arch: Arch, name: &str) -> Option<String> {
    if let Some(entry) = GLOBAL_NAMES.iter().find(|e| hf_side(arch, e) == Some(name)) {
        return Some(entry.0.to_string());
    }
    let (layer, tensor) = name.strip_prefix(block_prefix(arch))?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = tensor.rsplit_once('.')?;
    let g = BLOCK_NAMES
        .iter()
        .find(|e| hf_side(arch, e) == Some(part))?
        .0;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// A tensor's values between kiem's (Hugging Face) layout and llama.cpp's, in the direction
/// `to_file`: GPT-2's `Conv1D` weights are transposed (`[in, out]` ↔ `[out, in]`, `shape`
/// swapped), Llama q/k rows (and biases) permuted to or from llama.cpp's RoPE pair order.
pub(crate) fn convert_layout(
    config: &crate::ModelConfig,
    hf: &str,
    values: Vec<f32>,
    shape: &mut [usize],
    to_file: bool,
) -> Vec<f32> {
    if config.arch == Arch::Gpt2 {
        let conv1d = [
            ".attn.c_attn.weight",
            ".attn.c_proj.weight",
            ".mlp.c_fc.weight",
            ".mlp.c_proj.weight",
        ];
        if shape.len() == 2 && conv1d.iter().any(|s| hf.ends_with(s)) {
            let transposed = transpose(&values, shape[0], shape[1]);
            shape.swap(0, 1);
            return transposed;
        }
        return values;
    }
    let row_len = if shape.len() == 2 { shape[1] } else { 1 };
    let heads = if hf.contains(".self_attn.q_proj.") {
        config.n_head
    } else if hf.contains(".self_attn.k_proj.") {
        config.kv_heads()
    } else {
        return values;
    };
    permute_rows(&values, heads, row_len, to_file)
}

/// llama.cpp's q/k row order (`forward`) or its inverse: within each head of `head_dim` rows,
/// file row `2i` is Hugging Face row `i` and file row `2i + 1` is row `i + head_dim / 2`.
fn permute_rows(data: &[f32], heads: usize, row_len: usize, forward: bool) -> Vec<f32> {
    let rows = data.len() / row_len;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for (file, hf) in [(2 * i, i), (2 * i + 1, i + half)] {
                let (src, dst) = if forward { (hf, file) } else { (file, hf) };
                let (src, dst) = (h * head_dim + src, h * head_dim + dst);
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

impl GgufFile {
    /// The model this file describes, and its special ids.
    pub fn model_config(&self) -> Result<(crate::ModelConfig, SpecialIds)> {
        let arch_name = self.architecture()?.to_string();
        let vocab_size = match self
            .get(&format!("{arch_name}.vocab_size"))
            .and_then(MetaValue::as_u64)
        {
            Some(v) => v as usize,
            None => self
                .tensor("token_embd.weight")
                .and_then(|t| t.dims.get(1))
                .map(|&v| v as usize)
                .ok_or_else(|| self.error("no token_embd.weight"))?,
        };
        let config_json = self.hf_config(&arch_name, vocab_size)?;
        hf_config_from_json(self.path(), &config_json)
    }
}

/// Loads the network of a GGUF file (weights dequantized to f32) and its special ids.
pub fn load_gguf_model(file: &GgufFile) -> Result<(Gpt, SpecialIds)> {
    let arch_name = file.architecture()?.to_string();
    let (config, ids) = file.model_config()?;
    check_size(file, &config)?;
    let mut gpt = Gpt::new(config)?;
    let mut loading = Loading::new(&gpt)?;
    for info in &file.tensors {
        let Some(name) = hf_name(config.arch, &info.name) else {
            return Err(file.error(format!(
                "unexpected tensor {} for architecture {arch_name}",
                info.name
            )));
        };
        place(&mut gpt, &mut loading, file, info, &name)?;
    }
    loading.finish(&gpt, file.path())?;
    Ok((gpt, ids))
}

/// Loads the network of a GGUF file for decoding, and its special ids: every matrix (layer
/// matrices, embedding, output head) kept in the form the file stores it where a kernel reads
/// that form (every quantized kind a GGUF file can hold here, and BF16), so the memory held is
/// about the file's size; F32 and F16 ones, and the rest of the parameters, become fp32. The
/// model is laid out for decoding (it only generates).
pub fn load_gguf_for_decoding(file: &GgufFile) -> Result<(Gpt, SpecialIds)> {
    let (mut gpt, ids, compact) = load_gguf_compact(file, true)?;
    gpt.set_compact_matrices(compact)?;
    Ok((gpt, ids))
}

/// Loads the network of a GGUF file as the frozen base of a LoRA run, and its special ids: the
/// layer matrices go from the file's blocks straight into the frozen base, each in the form
/// [`load_gguf_for_decoding`] keeps it (no fp32 copy of them at any time, so the memory held
/// is about the file's size); embeddings, norms and the output head become fp32. The model
/// trains adapters only (see [`Gpt::set_frozen_base`]).
pub fn load_gguf_frozen_base(file: &GgufFile) -> Result<(Gpt, SpecialIds)> {
    let (mut gpt, ids, compact) = load_gguf_compact(file, false)?;
    gpt.set_frozen_base(compact)?;
    Ok((gpt, ids))
}

/// The network of a GGUF file with its layer matrices (and, `with_embeddings`, the embedding
/// and output head) taken from the file's blocks where a kernel reads their form: those are
/// returned by where each product starts in the parameters, which they never occupy.
fn load_gguf_compact(
    file: &GgufFile,
    with_embeddings: bool,
) -> Result<(
    Gpt,
    SpecialIds,
    std::collections::HashMap<usize, FrozenMatrix>,
)> {
    let arch_name = file.architecture()?.to_string();
    let (config, ids) = file.model_config()?;
    check_size(file, &config)?;
    let mut gpt = Gpt::new(config)?;
    let mut loading = Loading::new(&gpt)?;
    // Compact matrices by the parameter range they stand for.
    let mut parts: Vec<(std::ops::Range<usize>, FrozenMatrix)> = Vec::new();
    for info in &file.tensors {
        let Some(name) = hf_name(config.arch, &info.name) else {
            return Err(file.error(format!(
                "unexpected tensor {} for architecture {arch_name}",
                info.name
            )));
        };
        if name == "lm_head.weight" && config.block.tied_head {
            // The head is the embedding (llama.cpp's GPT-2 files repeat it as output.weight):
            // checked against it here, row by row, as no parameter holds it.
            check_tied_head(file, info)?;
            continue;
        }
        let is_matrix = info.dims.len() == 2
            && (info.name.starts_with("blk.")
                || with_embeddings
                    && (info.name == "token_embd.weight" || info.name == "output.weight"));
        let compact = if is_matrix {
            compact_matrix(file, info, &config, &name)
        } else {
            None
        };
        match compact {
            Some(m) => {
                let mut shape = info.torch_shape();
                if config.arch == Arch::Gpt2 && info.name.starts_with("blk.") {
                    // Conv1D's `[in, out]` in the model's files.
                    shape.swap(0, 1);
                }
                let range = loading.place_elsewhere(&gpt, file.path(), &name, &shape)?;
                let rows = range.len() / config.n_embd.max(1);
                let m = if info.name.starts_with("blk.") {
                    m
                } else {
                    m.padded_to_rows(rows)
                };
                parts.push((range, m));
            }
            None => place(&mut gpt, &mut loading, file, info, &name)?,
        }
    }
    loading.finish(&gpt, file.path())?;
    // Fuse the parts of each product (q, k, v; gate, up); a product some of whose parts are
    // fp32 takes its compact parts as fp32 too.
    parts.sort_by_key(|(r, _)| r.start);
    let mut products: Vec<std::ops::Range<usize>> = gpt
        .layer_matrices()
        .into_iter()
        .map(|(r, _)| r)
        .chain([gpt.layout.head_weights(), gpt.layout.wte.clone()])
        .collect();
    products.sort_by_key(|r| r.start);
    products.dedup();
    let mut compact = std::collections::HashMap::new();
    // Each part moves into its product (no second copy of the file's bytes at any time).
    let mut parts: Vec<Option<(std::ops::Range<usize>, FrozenMatrix)>> =
        parts.into_iter().map(Some).collect();
    for product in products {
        let inside: Vec<(std::ops::Range<usize>, FrozenMatrix)> = parts
            .iter_mut()
            .filter(|p| {
                p.as_ref()
                    .is_some_and(|(r, _)| r.start >= product.start && r.end <= product.end)
            })
            .filter_map(Option::take)
            .collect();
        if inside.is_empty() {
            continue;
        }
        let covered: usize = inside.iter().map(|(r, _)| r.len()).sum();
        if covered == product.len() {
            let fused = inside.into_iter().map(|(_, m)| m).collect();
            compact.insert(product.start, FrozenMatrix::stack(fused));
        } else {
            for (range, m) in inside {
                m.dequantize_into_params(&mut gpt, range);
            }
        }
    }
    Ok((gpt, ids, compact))
}

/// Checks that a tied model's `output.weight` holds its `token_embd.weight`'s values (the same
/// bytes, or the same values row by row where the two are stored in different types).
fn check_tied_head(file: &GgufFile, head: &TensorInfo) -> Result<()> {
    let differs = || {
        file.error(
            "output.weight differs from the token embedding, but the model ties them \
             (tie_word_embeddings)",
        )
    };
    let Some(embedding) = file.tensor("token_embd.weight") else {
        return Err(file.error("output.weight of a tied model without token_embd.weight"));
    };
    if head.dims != embedding.dims {
        return Err(differs());
    }
    let (a, b) = (file.tensor_bytes(head), file.tensor_bytes(embedding));
    if head.kind == embedding.kind {
        return if a == b { Ok(()) } else { Err(differs()) };
    }
    let width = head.dims[0] as usize;
    let row_bytes = |t: super::GgmlType| t.bytes_for(width as u64).map(|n| n as usize);
    let (Some(ra), Some(rb)) = (row_bytes(head.kind), row_bytes(embedding.kind)) else {
        return Err(differs());
    };
    let (mut x, mut y) = (vec![0f32; width], vec![0f32; width]);
    for (ca, cb) in a.chunks_exact(ra).zip(b.chunks_exact(rb)) {
        super::quants::dequantize(head.kind, ca, &mut x);
        super::quants::dequantize(embedding.kind, cb, &mut y);
        if x != y {
            return Err(differs());
        }
    }
    Ok(())
}

/// The compact form of a file matrix for decoding (rows as the model's products read them:
/// llama q/k rows back in Hugging Face order), or `None` to keep it fp32.
fn compact_matrix(
    file: &GgufFile,
    info: &TensorInfo,
    config: &crate::ModelConfig,
    hf: &str,
) -> Option<FrozenMatrix> {
    use super::GgmlType;
    use crate::kernels::QuantMatrix;
    let (c_in, c_out) = (info.dims[0] as usize, info.dims[1] as usize);
    let bytes = file.tensor_bytes(info);
    let m = match info.kind {
        GgmlType::BF16 => FrozenMatrix::Bf16 {
            w: bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
            c_in,
            c_out,
        },
        kind => FrozenMatrix::Quant(QuantMatrix::from_ggml(kind, bytes, c_in, c_out)?),
    };
    if config.arch == Arch::Gpt2 {
        return Some(m);
    }
    let heads = if hf.contains(".self_attn.q_proj.") {
        config.n_head
    } else if hf.contains(".self_attn.k_proj.") {
        config.kv_heads()
    } else {
        return Some(m);
    };
    Some(m.with_row_order(&file_row_order(heads, c_out)))
}

/// For each Hugging Face row of a llama q/k matrix, the file row that holds it (see
/// [`permute_rows`]).
fn file_row_order(heads: usize, rows: usize) -> Vec<usize> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, i) = (r / head_dim, r % head_dim);
            let file = if i < half { 2 * i } else { 2 * (i - half) + 1 };
            h * head_dim + file
        })
        .collect()
}

/// Refuses a file too small for the parameters its header describes, before allocating.
fn check_size(file: &GgufFile, config: &crate::ModelConfig) -> Result<()> {
    // The file must hold at least half a byte for every parameter.
    let parameters = config.num_parameters() as u64;
    let file_bytes = std::fs::metadata(file.path()).map(|m| m.len()).unwrap_or(0);
    if parameters / 2 > file_bytes {
        return Err(file.error(format!(
            "describes {parameters} parameters, but the file holds only {file_bytes} bytes"
        )));
    }
    Ok(())
}

fn place(
    gpt: &mut Gpt,
    loading: &mut Loading,
    file: &GgufFile,
    info: &TensorInfo,
    name: &str,
) -> Result<()> {
    let mut shape = info.torch_shape();
    let values = convert_layout(&gpt.config, name, file.read_f32(info), &mut shape, false);
    loading.place(gpt, file.path(), name, &shape, &mut |dst| {
        if dst.len() != values.len() {
            return Err(file.error(format!("tensor {}: size mismatch", info.name)));
        }
        dst.copy_from_slice(&values);
        Ok(())
    })
}
