//! Writing a model as GGUF v3 the way llama.cpp's converter and quantizer lay it out: its
//! tensor names and shapes, metadata keys with the types llama.cpp checks, llama q/k rows in
//! llama.cpp's RoPE order, GPT-2's `Conv1D` weights as `[out, in]`, 1-D tensors and position
//! embeddings in F32, matrices in the chosen type (ggml's reference quantizers).

use std::io::Write;
use std::path::Path;

use super::model::{convert_layout, gguf_name};
use super::quants::{quantize, GgmlType};
use super::{MetaValue, DEFAULT_ALIGNMENT};
use crate::config::{Arch, Norm, Positions, RopeScaling};
use crate::io::file_err;
use crate::{EngineError, Gpt, Result};

/// The type of an exported file's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ExportType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl ExportType {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            other => {
                return Err(format!(
                    "--type {other:?}: choose f32, f16, bf16, q8_0, q4_0 or q4_1"
                ))
            }
        })
    }

    fn ggml(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::BF16 => GgmlType::BF16,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
        }
    }

    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 32,
            Self::Q8_0 => 7,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
        }
    }
}

struct Tensor {
    name: String,
    /// `ne`, contiguous dimension first.
    dims: Vec<u64>,
    kind: GgmlType,
    bytes: Vec<u8>,
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::Str(s) => write_string(out, s),
        MetaValue::Array(items) => {
            let elem = items.first().map_or(8, MetaValue::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Writes `gpt` (in its files' layout) as a GGUF v3 file, with `extra` metadata after the
/// model's own (the tokenizer's `tokenizer.*` entries). Returns the tensors kept in F32 because
/// their rows are not whole quantization blocks.
pub fn write_gguf(
    gpt: &Gpt,
    extra: &[(String, MetaValue)],
    kind: ExportType,
    name: &str,
    path: &Path,
) -> Result<Vec<String>> {
    let config = &gpt.config;
    let arch = match config.arch {
        Arch::Gpt2 => "gpt2",
        Arch::Llama => "llama",
        other => {
            return Err(EngineError::Config(format!(
                "GGUF export writes llama and gpt2 models, not {} (as architecture llama it \
                 would need llama.cpp's handling of its differences)",
                other.name()
            )))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |v: usize| MetaValue::U32(v as u32);
    let eps = match config.block.norm {
        Norm::Layer => crate::kernels::LAYERNORM_EPS,
        Norm::Rms { eps } => eps,
    };
    let mut meta: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), MetaValue::Str(arch.into())),
        ("general.name".into(), MetaValue::Str(name.into())),
        ("general.file_type".into(), MetaValue::U32(kind.file_type())),
        ("general.quantization_version".into(), MetaValue::U32(2)),
        (key("context_length"), u32_of(config.context)),
        (key("embedding_length"), u32_of(config.n_embd)),
        (key("block_count"), u32_of(config.n_layer)),
        (key("feed_forward_length"), u32_of(config.mlp_hidden())),
        (key("attention.head_count"), u32_of(config.n_head)),
    ];
    if config.arch == Arch::Gpt2 {
        meta.push((key("attention.layer_norm_epsilon"), MetaValue::F32(eps)));
    } else {
        let Positions::Rope(rope) = config.block.positions else {
            return Err(EngineError::Config("a llama model without RoPE".into()));
        };
        if !matches!(rope.scaling, RopeScaling::Default) {
            return Err(EngineError::Config(
                "GGUF export of RoPE scaling is not supported yet".into(),
            ));
        }
        meta.extend([
            (key("attention.head_count_kv"), u32_of(config.kv_heads())),
            (key("rope.dimension_count"), u32_of(config.head_dim())),
            (key("rope.freq_base"), MetaValue::F32(rope.theta as f32)),
            (key("attention.layer_norm_rms_epsilon"), MetaValue::F32(eps)),
            (key("vocab_size"), u32_of(config.vocab_size)),
        ]);
    }
    meta.extend(extra.iter().cloned());

    let matrix_type = kind.ggml();
    let mut kept_f32 = Vec::new();
    let mut tensors: Vec<Tensor> = Vec::new();
    let mut head: Option<Tensor> = None;
    for (hf, shape, data) in gpt.hf_tensors() {
        let Some(g) = gguf_name(config.arch, &hf) else {
            return Err(EngineError::Config(format!("no GGUF name for tensor {hf}")));
        };
        let mut torch_shape = shape.clone();
        let values = convert_layout(config, &hf, data.to_vec(), &mut torch_shape, true);
        let dims: Vec<u64> = torch_shape.iter().rev().map(|&d| d as u64).collect();
        let is_matrix = dims.len() == 2 && g.ends_with(".weight") && g != "position_embd.weight";
        let mut t = if is_matrix {
            matrix_type
        } else {
            GgmlType::F32
        };
        if t.bytes_for(dims[0]).is_none() {
            kept_f32.push(g.clone());
            t = GgmlType::F32;
        }
        let tensor = Tensor {
            name: g,
            dims,
            kind: t,
            bytes: quantize(t, &values),
        };
        if tensor.name == "output.weight" {
            head = Some(tensor);
        } else {
            tensors.push(tensor);
        }
    }
    // GPT-2's head is the embedding; older llama.cpp requires `output.weight` for gpt2.
    if config.arch == Arch::Gpt2 && head.is_none() {
        let embd = tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .expect("every model has a token embedding");
        head = Some(Tensor {
            name: "output.weight".into(),
            dims: embd.dims.clone(),
            kind: embd.kind,
            bytes: embd.bytes.clone(),
        });
    }
    tensors.extend(head);

    let mut header = Vec::new();
    header.extend_from_slice(super::MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        write_string(&mut header, k);
        header.extend_from_slice(&v.type_id().to_le_bytes());
        write_value(&mut header, v);
    }
    let align = DEFAULT_ALIGNMENT as usize;
    let mut offset = 0usize;
    for t in &tensors {
        write_string(&mut header, &t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&t.kind.id().to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.bytes.len().div_ceil(align) * align;
    }
    header.resize(header.len().div_ceil(align) * align, 0);
    let tmp = path.with_extension("gguf.partial");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&header)?;
        for t in &tensors {
            f.write_all(&t.bytes)?;
            let pad = t.bytes.len().div_ceil(align) * align - t.bytes.len();
            f.write_all(&vec![0u8; pad])?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        file_err(path, e.to_string())
    })?;
    Ok(kept_f32)
}
