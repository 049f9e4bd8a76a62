//! Hugging Face GPT-2 files: `config.json` and `model.safetensors` with `GPT2LMHeadModel`
//! tensor names. Parameters are stored in the same `[in, out]` layout as the flat buffer, so
//! reading and writing are straight copies (only the padded vocabulary rows are dropped).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::config::Arch;
use crate::kernels::{Kernels, LAYERNORM_EPS};
use crate::{EngineError, Gpt, ModelConfig, Result};

#[cfg(not(target_endian = "little"))]
compile_error!("kiem writes little-endian safetensors by reinterpreting f32 buffers");

pub(crate) fn file_err(path: &Path, message: impl Into<String>) -> EngineError {
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

/// Where [`write_tensors_streamed`]'s `fill` puts values: positioned writes into one tensor.
pub struct TensorSink<'a> {
    file: &'a std::fs::File,
    path: &'a Path,
    /// Byte offset of the tensor's data in the file, and its length in values.
    start: u64,
    len: usize,
}

impl TensorSink<'_> {
    /// Writes `values` at index `at` of the tensor.
    pub fn write_at(&mut self, at: usize, values: &[f32]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if at + values.len() > self.len {
            return Err(file_err(
                self.path,
                format!(
                    "values {at}..{} written past the tensor's {} values",
                    at + values.len(),
                    self.len
                ),
            ));
        }
        self.file
            .write_all_at(f32_bytes(values), self.start + 4 * at as u64)
            .map_err(|e| file_err(self.path, e.to_string()))
    }
}

/// Writes 1-D f32 tensors of the given lengths to a safetensors file without holding them:
/// `fill(i, sink)` writes tensor i's values, in any order, through positioned writes into the
/// file sized up front (fsynced, then renamed into place). For state larger than a process
/// wants to hold at once, such as optimizer moments gathered from a job's processes.
pub fn write_tensors_streamed(
    path: &Path,
    tensors: &[(&str, usize)],
    mut fill: impl FnMut(usize, &mut TensorSink) -> Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for &(name, len) in tensors {
        let end = offset + 4 * len as u64;
        header.insert(
            name.to_string(),
            json!({"dtype": "F32", "shape": [len], "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("header serializes");
    // The data starts 8-byte aligned, as the safetensors writer pads it.
    header.resize(header.len().next_multiple_of(8), b' ');
    let data_start = 8 + header.len() as u64;
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let io = |e: std::io::Error| file_err(path, e.to_string());
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.set_len(data_start + offset).map_err(io)?;
        file.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        file.write_all(&header).map_err(io)?;
        let mut start = data_start;
        for (i, &(_, len)) in tensors.iter().enumerate() {
            let mut sink = TensorSink {
                file: &file,
                path,
                start,
                len,
            };
            fill(i, &mut sink)?;
            start += 4 * len as u64;
        }
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
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

/// A safetensors file, memory-mapped: tensors are read straight from the mapping, so loading a
/// model costs its parameters, not a copy of the file besides. [`MappedTensors::tensors`]
/// checks the header.
pub struct MappedTensors {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl MappedTensors {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| file_err(path, e.to_string()))?;
        // SAFETY: the mapping is read-only; kiem never writes a weights file while reading it
        // (checkpoints are written under a temporary name and renamed into place).
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_err(path, e.to_string()))?;
        Ok(MappedTensors {
            path: path.to_path_buf(),
            map,
        })
    }

    /// The parsed file; the safetensors crate bounds-checks every offset against the file.
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map)
            .map_err(|e| file_err(&self.path, format!("not a valid safetensors file: {e}")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops `bytes` (a slice of this mapping whose values were read already) from the
    /// process's resident memory, so that loading a model never holds the whole file and the
    /// converted parameters at once (peak memory: about the parameters alone).
    pub fn release(&self, bytes: &[u8]) {
        #[cfg(unix)]
        if let Some(offset) = (bytes.as_ptr() as usize).checked_sub(self.map.as_ptr() as usize) {
            // SAFETY: a read-only mapping of a file nobody writes while kiem reads it (see
            // `open`): dropped pages are read again from the file, unchanged, if touched.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    bytes.len(),
                )
            };
        }
    }

    /// One tensor's values as f32, checked to hold `len` values: converted straight from the
    /// mapping (one copy of the data, not two).
    pub fn read_f32(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let st = self.tensors()?;
        let view = st
            .tensor(name)
            .map_err(|_| file_err(&self.path, format!("no tensor {name}")))?;
        let count: usize = view.shape().iter().product();
        if count != len {
            return Err(file_err(
                &self.path,
                format!("tensor {name} has {count} values, expected {len}"),
            ));
        }
        let mut out = vec![0f32; len];
        convert_into(&self.path, name, &view, &mut out)?;
        Ok(out)
    }
}

/// Memory the system can give this process now (`MemAvailable`), where the OS tells it.
pub fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Converts one tensor's values to f32 into `dst` (whose length must match).
fn convert_into(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    dst: &mut [f32],
) -> Result<()> {
    let data = view.data();
    let width = match view.dtype() {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        other => {
            return Err(file_err(
                path,
                format!("tensor {name} has dtype {other:?}; kiem reads F32, F16 and BF16"),
            ))
        }
    };
    if data.len() != dst.len() * width {
        return Err(file_err(
            path,
            format!(
                "tensor {name}: {} bytes for {} values",
                data.len(),
                dst.len()
            ),
        ));
    }
    match view.dtype() {
        Dtype::F32 => {
            for (d, b) in dst.iter_mut().zip(data.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (d, b) in dst.iter_mut().zip(data.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => {
            for (d, b) in dst.iter_mut().zip(data.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
    }
    Ok(())
}

/// Reads named tensors from a safetensors file as f32 (converting F16/BF16).
pub fn read_tensors(path: &Path) -> Result<NamedTensors> {
    let mapped = MappedTensors::open(path)?;
    let st = mapped.tensors()?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let len = view
            .shape()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        let len = len.ok_or_else(|| file_err(path, format!("tensor {name}: shape overflows")))?;
        let mut values = vec![0f32; len];
        convert_into(path, &name, &view, &mut values)?;
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// The weight files of a model directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names (as large checkpoints ship).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(file_err(
            dir,
            "no model.safetensors or model.safetensors.index.json (kiem reads safetensors weights only)",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| file_err(&index, e.to_string()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| file_err(&index, format!("malformed JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| file_err(&index, "no weight_map object"))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| file_err(&index, format!("weight_map[{tensor}] is not a file name")))?;
        // Shards live beside the index: a name with a directory part could point anywhere.
        let plain = Path::new(file).file_name().is_some_and(|n| n == file);
        if !plain {
            return Err(file_err(
                &index,
                format!("shard name {file:?} is not a plain file name"),
            ));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            if !path.exists() {
                return Err(file_err(
                    &index,
                    format!("names shard {file}, which is missing"),
                ));
            }
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

impl<K: Kernels> Gpt<K> {
    /// Parameters as Hugging Face tensors (padded vocabulary rows dropped).
    ///
    /// # Panics
    /// For a model prepared for decoding only (its matrices may not be in the files' order).
    pub fn hf_tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        assert!(
            self.check_training_layout().is_ok(),
            "hf_tensors of a model transposed for decoding"
        );
        let vocab = self.config.vocab_size;
        self.layout
            .tensors
            .iter()
            .map(|spec| {
                let data = &self.params[spec.range.start..spec.range.start + spec.live_len(vocab)];
                (spec.name.clone(), spec.file_shape(vocab), data)
            })
            .collect()
    }

    /// Writes `model.safetensors`.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        self.check_training_layout()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_tensors(path, &self.hf_tensors(), Some(metadata))
    }

    /// The flat-buffer tensor a file's tensor name stands for (`None`: not one of ours).
    fn spec_index(&self, name: &str) -> Option<usize> {
        // A bare `GPT2Model` (the original `gpt2` checkpoint) names its tensors `h.0...`.
        let name = if self.config.arch == Arch::Gpt2
            && !name.starts_with("transformer.")
            && name != "lm_head.weight"
        {
            std::borrow::Cow::Owned(format!("transformer.{name}"))
        } else {
            std::borrow::Cow::Borrowed(name)
        };
        self.layout.tensors.iter().position(|t| t.name == *name)
    }

    /// Tensors that files carry besides the parameters, which loading skips: GPT-2's causal
    /// mask buffers, and the rotary frequencies older Llama checkpoints saved.
    fn is_buffer(name: &str) -> bool {
        name.ends_with(".attn.bias")
            || name.ends_with(".attn.masked_bias")
            || name.ends_with("rotary_emb.inv_freq")
    }

    /// Loads parameters from safetensors files, reading each tensor from its memory-mapped
    /// file straight into the parameter buffer. Every parameter must be present exactly once
    /// with its shape; a tied output head, if the file has one, must equal the embedding.
    pub fn load_files(&mut self, files: &[PathBuf]) -> Result<()> {
        let mut loading = Loading::new(self)?;
        for path in files {
            let mapped = MappedTensors::open(path)?;
            let st = mapped.tensors()?;
            for (name, view) in st.tensors() {
                loading.place(self, path, &name, view.shape(), &mut |dst| {
                    convert_into(path, &name, &view, dst)
                })?;
                mapped.release(view.data());
            }
        }
        let first = files.first().cloned().unwrap_or_default();
        loading.finish(self, &first)
    }

    /// Loads parameters from Hugging Face tensors already in memory, with the checks of
    /// [`Gpt::load_files`].
    pub fn load_tensors(&mut self, path: &Path, tensors: &NamedTensors) -> Result<()> {
        let mut loading = Loading::new(self)?;
        for (name, (shape, data)) in tensors {
            loading.place(self, path, name, shape, &mut |dst| {
                dst.copy_from_slice(data);
                Ok(())
            })?;
        }
        loading.finish(self, path)
    }
}

/// What a load has placed so far: which parameter tensors, and a tied head the file carried.
/// What a file tensor is to the model.
enum Claim {
    /// A buffer files carry that is not a parameter (GPT-2's attention mask ...).
    Buffer,
    /// The output head of a model that ties it to the embedding.
    TiedHead,
    /// Parameter tensor `i` of the layout.
    Spec(usize),
}

pub(crate) struct Loading {
    seen: Vec<bool>,
    tied_head: Option<(PathBuf, Vec<f32>)>,
}

impl Loading {
    pub(crate) fn new<K: Kernels>(gpt: &Gpt<K>) -> Result<Self> {
        gpt.check_training_layout()?;
        Ok(Loading {
            seen: vec![false; gpt.layout.tensors.len()],
            tied_head: None,
        })
    }

    /// Checks a file tensor's name and shape and lets `fill` write its values where they go.
    pub(crate) fn place<K: Kernels>(
        &mut self,
        gpt: &mut Gpt<K>,
        path: &Path,
        name: &str,
        shape: &[usize],
        fill: &mut dyn FnMut(&mut [f32]) -> Result<()>,
    ) -> Result<()> {
        match self.claim(gpt, path, name, shape)? {
            Claim::Buffer => Ok(()),
            Claim::TiedHead => {
                let (vocab, c) = (gpt.config.vocab_size, gpt.config.n_embd);
                let mut head = vec![0f32; vocab * c];
                fill(&mut head)?;
                self.tied_head = Some((path.to_path_buf(), head));
                Ok(())
            }
            Claim::Spec(i) => {
                let spec = &gpt.layout.tensors[i];
                let live = spec.live_len(gpt.config.vocab_size);
                let dst = &mut gpt.params[spec.range.clone()];
                fill(&mut dst[..live])?;
                dst[live..].fill(0.0);
                Ok(())
            }
        }
    }

    /// Checks a file tensor's name and shape, counts it as loaded, and returns its
    /// parameter's range: the caller keeps its values elsewhere (a compact matrix).
    pub(crate) fn place_elsewhere<K: Kernels>(
        &mut self,
        gpt: &Gpt<K>,
        path: &Path,
        name: &str,
        shape: &[usize],
    ) -> Result<std::ops::Range<usize>> {
        match self.claim(gpt, path, name, shape)? {
            Claim::Spec(i) => Ok(gpt.layout.tensors[i].range.clone()),
            Claim::Buffer | Claim::TiedHead => Err(file_err(
                path,
                format!("tensor {name} has no parameter of its own to hold"),
            )),
        }
    }

    /// What a file tensor is, its name and shape checked.
    fn claim<K: Kernels>(
        &mut self,
        gpt: &Gpt<K>,
        path: &Path,
        name: &str,
        shape: &[usize],
    ) -> Result<Claim> {
        if Gpt::<K>::is_buffer(name) {
            return Ok(Claim::Buffer);
        }
        let (vocab, c) = (gpt.config.vocab_size, gpt.config.n_embd);
        let Some(i) = gpt.spec_index(name) else {
            if name == "lm_head.weight" && gpt.config.block.tied_head {
                if shape != [vocab, c] {
                    return Err(file_err(
                        path,
                        format!("lm_head.weight has shape {shape:?}"),
                    ));
                }
                return Ok(Claim::TiedHead);
            }
            return Err(file_err(
                path,
                format!(
                    "unexpected tensor {name}: not part of a {} model with this config",
                    gpt.config.arch.name()
                ),
            ));
        };
        let spec = &gpt.layout.tensors[i];
        if std::mem::replace(&mut self.seen[i], true) {
            return Err(file_err(path, format!("tensor {name} appears twice")));
        }
        let want = spec.file_shape(vocab);
        if shape != want.as_slice() {
            return Err(file_err(
                path,
                format!("tensor {name} has shape {shape:?}, expected {want:?}"),
            ));
        }
        Ok(Claim::Spec(i))
    }

    /// Every parameter present; a tied head equal to the embedding.
    pub(crate) fn finish<K: Kernels>(self, gpt: &Gpt<K>, path: &Path) -> Result<()> {
        if let Some(missing) = self.seen.iter().position(|&s| !s) {
            return Err(file_err(
                path,
                format!("tensor {} is missing", gpt.layout.tensors[missing].name),
            ));
        }
        if let Some((path, head)) = self.tied_head {
            let wte = &gpt.params[gpt.layout.wte.start..gpt.layout.wte.start + head.len()];
            if head != wte {
                return Err(file_err(&path, "lm_head.weight differs from the token embedding, but the config ties them (tie_word_embeddings)"));
            }
        }
        Ok(())
    }
}

/// Special token ids a model's `config.json` records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    /// End of sequence: one id, or several (Llama 3 lists its end-of-turn tokens too).
    pub eos: Vec<u32>,
}

/// `config.json` for the model's `transformers` class.
pub fn hf_config_json(config: &ModelConfig, ids: &SpecialIds) -> Value {
    let eos = match ids.eos.as_slice() {
        [one] => json!(one),
        [] => Value::Null,
        many => json!(many),
    };
    if config.arch.is_llama_family() {
        return crate::hf_llama::config_json(config, ids.bos, eos);
    }
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
        "eos_token_id": eos,
        "dtype": "float32",
        "use_cache": true,
    })
}

/// Reads `bos_token_id` and `eos_token_id` (a number or a list) from a config.
pub(crate) fn special_ids(v: &Value) -> SpecialIds {
    let id = |x: &Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    SpecialIds {
        bos: v.get("bos_token_id").and_then(id),
        eos: match v.get("eos_token_id") {
            Some(Value::Array(list)) => list.iter().filter_map(id).collect(),
            Some(x) => id(x).into_iter().collect(),
            None => Vec::new(),
        },
    }
}

/// The end-of-sequence ids of a model directory's `generation_config.json` (Llama 3 Instruct
/// lists its end-of-turn token there); empty when the file is absent.
pub fn generation_eos(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_err(&path, e.to_string())),
    };
    let v: Value =
        serde_json::from_str(&text).map_err(|e| file_err(&path, format!("malformed JSON: {e}")))?;
    Ok(special_ids(&v).eos)
}

/// Reads a Hugging Face `config.json` (GPT-2 or the Llama family), refusing options kiem does
/// not implement by name.
pub fn read_hf_config(path: &Path) -> Result<(ModelConfig, SpecialIds)> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| file_err(path, format!("malformed JSON: {e}")))?;
    hf_config_from_json(path, &v)
}

/// A `config.json`'s contents (read from `path`, named in errors) as kiem's model description.
pub(crate) fn hf_config_from_json(path: &Path, v: &Value) -> Result<(ModelConfig, SpecialIds)> {
    let v = v.clone();
    let model_type = v
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("(missing)");
    let config = match model_type {
        "gpt2" => read_gpt2_config(path, &v)?,
        "llama" | "qwen2" | "mistral" => crate::hf_llama::read_config(path, &v, model_type)?,
        other => {
            return Err(file_err(
                path,
                format!(
                "model_type {other:?} is not supported (kiem runs gpt2, llama, qwen2 and mistral)"
            ),
            ))
        }
    };
    config
        .validate()
        .map_err(|e| file_err(path, e.to_string()))?;
    Ok((config, special_ids(&v)))
}

/// An integer field of a config, bounded so that a lying file cannot ask for a huge model.
pub(crate) fn config_usize(path: &Path, v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| file_err(path, format!("missing or non-integer {key}")))
}

fn read_gpt2_config(path: &Path, v: &Value) -> Result<ModelConfig> {
    let num = |key: &str| config_usize(path, v, key);
    let config = ModelConfig::gpt2(
        num("n_layer")?,
        num("n_head")?,
        num("n_embd")?,
        num("n_positions")?,
        num("vocab_size")?,
    );
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
    Ok(config)
}

/// Loads a Hugging Face model directory: `config.json` and `model.safetensors` (or sharded
/// weights with `model.safetensors.index.json`), F32, F16 or BF16.
pub fn load_model_dir(dir: &Path) -> Result<(Gpt, SpecialIds)> {
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
    let files = weight_files(dir)?;
    // Before allocating: the files must hold at least 2 bytes for every parameter the config
    // describes (a lying or mistyped config must not make kiem allocate a huge buffer).
    let file_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()
        .map_err(|e| file_err(dir, e.to_string()))?;
    let parameters = config.num_parameters() as u64;
    if parameters.saturating_mul(2) > file_bytes {
        return Err(file_err(
            &config_path,
            format!(
                "describes {parameters} parameters, but the weight files hold only {file_bytes} bytes"
            ),
        ));
    }
    let needed = parameters.saturating_mul(4);
    if let Some(available) = available_memory() {
        if needed > available as u64 {
            return Err(file_err(
                dir,
                format!(
                    "the model's {parameters} parameters need {:.1} GiB as fp32, but only {:.1} GiB \
                     of memory is available",
                    needed as f64 / (1u64 << 30) as f64,
                    available as f64 / (1u64 << 30) as f64
                ),
            ));
        }
    }
    let mut gpt = Gpt::new(config)?;
    gpt.load_files(&files)?;
    Ok((gpt, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_tensors_read_back_as_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let m: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let v: Vec<f32> = (0..37).map(|i| -(i as f32)).collect();
        let streamed = dir.path().join("streamed.safetensors");
        write_tensors_streamed(&streamed, &[("m", m.len()), ("v", v.len())], |i, sink| {
            let values = [&m, &v][i];
            // Out of order, in uneven windows.
            for chunk in (0..values.len()).step_by(300).rev() {
                let end = (chunk + 300).min(values.len());
                sink.write_at(chunk, &values[chunk..end])?;
            }
            Ok(())
        })
        .unwrap();
        let whole = dir.path().join("whole.safetensors");
        write_tensors(
            &whole,
            &[
                ("m".to_string(), vec![m.len()], &m),
                ("v".to_string(), vec![v.len()], &v),
            ],
            None,
        )
        .unwrap();
        let (a, b) = (
            read_tensors(&streamed).unwrap(),
            read_tensors(&whole).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a["m"], (vec![1000], m));
        // A write past a tensor's end is an error, not a corrupt neighbour.
        let err = write_tensors_streamed(&streamed, &[("m", 4)], |_, sink| {
            sink.write_at(2, &[1.0, 2.0, 3.0])
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("past the tensor's 4 values"),
            "{err}"
        );
    }
}
