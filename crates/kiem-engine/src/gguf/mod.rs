//! GGUF v3 files (llama.cpp's format): the reader (every count, length and offset checked
//! against the file before anything is allocated for it), models of architecture `llama` and
//! `gpt2` loaded from them, and the writer (`kiem export --format gguf`).

mod model;
pub mod quants;
mod writer;

use std::path::{Path, PathBuf};

pub use model::{load_gguf_for_decoding, load_gguf_frozen_base, load_gguf_model};
pub use quants::GgmlType;
pub use writer::{write_gguf, ExportType};

use crate::{EngineError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limits: a string of at most 1 GiB, an array of at most 2^30 elements.
const MAX_STRING: u64 = 1 << 30;
const MAX_ARRAY: u64 = 1 << 30;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF value type id.
    fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// `ne`: the first is the contiguous dimension (a PyTorch `[out, in]` matrix is `[in, out]`).
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape as PyTorch writes it (`dims` reversed).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: metadata and tensor directory parsed and checked, data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

fn bad(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A bounds-checked cursor over the header.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(bad(
                self.path,
                format!(
                    "truncated or corrupt GGUF: {what} needs {n} bytes at offset {} but the file \
                     has {left} left",
                    self.pos
                ),
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(bad(
                self.path,
                format!("corrupt GGUF: {what} claims {len} bytes"),
            ));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| bad(self.path, format!("corrupt GGUF: {what} is not UTF-8")))
    }

    /// The fewest bytes one value of type `t` takes (to bound an array's count before
    /// allocating for it).
    fn min_size(t: u32) -> u64 {
        match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => 1,
        }
    }

    fn value(&mut self, t: u32, what: &str, depth: u32) -> Result<MetaValue> {
        Ok(match t {
            0 => MetaValue::U8(self.array::<1>(what)?[0]),
            1 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                let elem = self.u32(what)?;
                if elem == 9 && depth > 0 {
                    return Err(bad(self.path, format!("corrupt GGUF: {what} nests arrays")));
                }
                let count = self.u64(what)?;
                let left = (self.bytes.len() - self.pos) as u64;
                if count > MAX_ARRAY || count.saturating_mul(Self::min_size(elem)) > left {
                    return Err(bad(
                        self.path,
                        format!("truncated or corrupt GGUF: {what} claims {count} elements"),
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(bad(
                    self.path,
                    format!("corrupt GGUF: {what} has value type {other}"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Opens and checks a GGUF v2/v3 file: header, metadata, tensor directory, and that every
    /// tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
        // SAFETY: the file is mapped read-only; kiem does not write model files while reading
        // them, and a file changed underneath by another process can only give wrong values
        // (every read below is bounds-checked against the mapped length).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(path, e.to_string()))?;
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
            path,
        };
        if c.take(4, "the magic number")? != MAGIC {
            return Err(bad(path, "not a GGUF file (no GGUF magic number)"));
        }
        let version = c.u32("the version")?;
        if version & 0xFFFF == 0 && version != 0 {
            return Err(bad(
                path,
                "a big-endian GGUF file: kiem reads little-endian ones",
            ));
        }
        if !(2..=3).contains(&version) {
            return Err(bad(
                path,
                format!("GGUF version {version} is not supported (kiem reads versions 2 and 3)"),
            ));
        }
        let tensor_count = c.u64("the tensor count")?;
        let kv_count = c.u64("the metadata count")?;
        let left = (map.len() - c.pos) as u64;
        // Each entry takes at least 12 bytes (a key or name length and a type or dimension).
        if kv_count.saturating_mul(12) > left || tensor_count.saturating_mul(24) > left {
            return Err(bad(
                path,
                format!(
                    "truncated or corrupt GGUF: claims {kv_count} metadata entries and \
                     {tensor_count} tensors in {left} bytes"
                ),
            ));
        }
        let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(kv_count as usize);
        for i in 0..kv_count {
            let key = c.string(&format!("metadata key {i}"))?;
            if key.is_empty() || metadata.iter().any(|(k, _)| *k == key) {
                return Err(bad(
                    path,
                    format!("corrupt GGUF: empty or repeated key {key:?}"),
                ));
            }
            let t = c.u32(&key)?;
            let value = c.value(t, &key, 0)?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, MetaValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(bad(
                    path,
                    format!("general.alignment must be a power of two (u32), not {v:?}"),
                ))
            }
        };
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = c.string(&format!("tensor {i}'s name"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(bad(
                    path,
                    format!("corrupt GGUF: tensor {name} has {n_dims} dimensions"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<u64>>>()?;
            let kind = GgmlType::from_id(c.u32(&name)?)
                .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
            let offset = c.u64(&name)?;
            if tensors.iter().any(|t| t.name == name) {
                return Err(bad(
                    path,
                    format!("corrupt GGUF: tensor {name} appears twice"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                kind,
                offset,
            });
        }
        let data_start = c.pos.div_ceil(alignment as usize) * alignment as usize;
        let data_len = (map.len() as u64).saturating_sub(data_start as u64);
        for t in &tensors {
            let elements = t
                .dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .filter(|&n| n > 0);
            let (block, _) = t.kind.block();
            let bytes = elements
                .filter(|_| t.dims[0] % block as u64 == 0)
                .and_then(|n| t.kind.bytes_for(n));
            let Some(bytes) = bytes else {
                return Err(bad(
                    path,
                    format!(
                        "corrupt GGUF: tensor {} has dimensions {:?}, not whole {} blocks",
                        t.name,
                        t.dims,
                        t.kind.name()
                    ),
                ));
            };
            if t.offset % alignment != 0
                || t.offset.checked_add(bytes).is_none_or(|end| end > data_len)
            {
                return Err(bad(
                    path,
                    format!(
                        "truncated or corrupt GGUF: tensor {} ({bytes} bytes at data offset {}) \
                         lies outside the file's {data_len} data bytes",
                        t.name, t.offset
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A metadata entry that is a list of strings (empty when absent).
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect())
                .ok_or_else(|| self.error(format!("{key} must be a list of strings"))),
        }
    }

    /// A metadata entry that is a list of integers (empty when absent).
    pub fn integers(&self, key: &str) -> Result<Vec<i64>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| match *x {
                            MetaValue::I8(v) => Some(v.into()),
                            MetaValue::I16(v) => Some(v.into()),
                            MetaValue::I32(v) => Some(v.into()),
                            MetaValue::I64(v) => Some(v),
                            ref other => other.as_u64().and_then(|v| i64::try_from(v).ok()),
                        })
                        .collect()
                })
                .ok_or_else(|| self.error(format!("{key} must be a list of integers"))),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's raw bytes (checked to lie inside the file when it was opened).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset as usize;
        let len = info
            .kind
            .bytes_for(info.elements())
            .expect("checked at open") as usize;
        &self.map[start..start + len]
    }

    /// A tensor's values as f32 (dequantized), in its file order (`torch_shape`).
    pub fn read_f32(&self, info: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0f32; info.elements() as usize];
        quants::dequantize(info.kind, self.tensor_bytes(info), &mut out);
        out
    }

    pub fn error(&self, message: impl Into<String>) -> EngineError {
        bad(&self.path, message)
    }
}

/// Whether a path names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
