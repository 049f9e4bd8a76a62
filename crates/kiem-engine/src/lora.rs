//! LoRA adapters as PEFT defines them: a frozen layer `y = x·Wᵀ` becomes
//! `y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ` with `A [r, in]`, `B [out, r]` and `s = α/r` (or `α/√r`
//! with rsLoRA). Only A and B train. Every module PEFT can target is a column range of one of
//! the block's four products (Llama's q, k and v are slices of the fused qkv product), so the
//! engine adds each adapter's term to its product's output and takes its gradients from the
//! product's output gradient, leaving the base product as it is.
//!
//! Adapters are saved and loaded in PEFT's format (`adapter_config.json` and
//! `adapter_model.safetensors` with names like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Arch, ModelConfig};
use crate::kernels::{Kernels, WeightLayout};
use crate::rng::Rng;
use crate::{EngineError, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Prefix of every tensor name in PEFT's adapter files (`PeftModel` wrapping the base model).
const PEFT_PREFIX: &str = "base_model.model.";

/// The four matrix products of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Site {
    Qkv,
    AttnOut,
    MlpIn,
    MlpOut,
}

/// A module PEFT can adapt, in one architecture.
struct Target {
    /// PEFT's module name, the last part of its path (`q_proj`, `c_attn`).
    name: &'static str,
    /// The path inside a layer (`self_attn.q_proj`, `mlp.c_proj`).
    in_layer: &'static str,
    site: Site,
    attention: bool,
}

const LLAMA_TARGETS: &[Target] = &[
    Target {
        name: "q_proj",
        in_layer: "self_attn.q_proj",
        site: Site::Qkv,
        attention: true,
    },
    Target {
        name: "k_proj",
        in_layer: "self_attn.k_proj",
        site: Site::Qkv,
        attention: true,
    },
    Target {
        name: "v_proj",
        in_layer: "self_attn.v_proj",
        site: Site::Qkv,
        attention: true,
    },
    Target {
        name: "o_proj",
        in_layer: "self_attn.o_proj",
        site: Site::AttnOut,
        attention: true,
    },
    Target {
        name: "gate_proj",
        in_layer: "mlp.gate_proj",
        site: Site::MlpIn,
        attention: false,
    },
    Target {
        name: "up_proj",
        in_layer: "mlp.up_proj",
        site: Site::MlpIn,
        attention: false,
    },
    Target {
        name: "down_proj",
        in_layer: "mlp.down_proj",
        site: Site::MlpOut,
        attention: false,
    },
];

const GPT2_TARGETS: &[Target] = &[
    Target {
        name: "c_attn",
        in_layer: "attn.c_attn",
        site: Site::Qkv,
        attention: true,
    },
    Target {
        name: "c_proj",
        in_layer: "attn.c_proj",
        site: Site::AttnOut,
        attention: true,
    },
    Target {
        name: "c_fc",
        in_layer: "mlp.c_fc",
        site: Site::MlpIn,
        attention: false,
    },
    Target {
        name: "c_proj",
        in_layer: "mlp.c_proj",
        site: Site::MlpOut,
        attention: false,
    },
];

fn targets_of(arch: Arch) -> &'static [Target] {
    if arch.is_llama_family() {
        LLAMA_TARGETS
    } else {
        GPT2_TARGETS
    }
}

/// The path of layer `l`'s module in the Hugging Face model (`model.layers.3.self_attn.q_proj`).
fn module_path(arch: Arch, l: usize, in_layer: &str) -> String {
    if arch.is_llama_family() {
        format!("model.layers.{l}.{in_layer}")
    } else {
        format!("transformer.h.{l}.{in_layer}")
    }
}

/// Where a target's output lies in its product's output, and the product's input width.
fn columns(config: &ModelConfig, t: &Target) -> (Range<usize>, usize) {
    let (c, q, kv, hidden) = (
        config.n_embd,
        config.q_width(),
        config.kv_width(),
        config.mlp_hidden(),
    );
    match (t.site, t.name) {
        (Site::Qkv, "q_proj") => (0..q, c),
        (Site::Qkv, "k_proj") => (q..q + kv, c),
        (Site::Qkv, "v_proj") => (q + kv..q + 2 * kv, c),
        (Site::Qkv, _) => (0..config.qkv_width(), c),
        (Site::AttnOut, _) => (0..c, q),
        (Site::MlpIn, "gate_proj") => (0..hidden, c),
        (Site::MlpIn, "up_proj") => (hidden..2 * hidden, c),
        (Site::MlpIn, _) => (0..config.mlp_in_width(), c),
        (Site::MlpOut, _) => (0..c, hidden),
    }
}

/// Which modules to adapt: PEFT's module names, the short Llama names (`q`, `gate`), a layer's
/// path suffix (`mlp.c_proj`), or the groups `attn`, `mlp` and `all` (`all-linear`).
/// Returns indices into the architecture's targets.
pub fn select_targets(arch: Arch, names: &[String]) -> Result<Vec<usize>> {
    let targets = targets_of(arch);
    let mut chosen = Vec::new();
    for name in names {
        let name = name.trim();
        let long = format!("{name}_proj");
        let hits: Vec<usize> = (0..targets.len())
            .filter(|&i| {
                let t = &targets[i];
                match name {
                    "all" | "all-linear" => true,
                    "attn" => t.attention,
                    "mlp" => !t.attention,
                    _ => {
                        t.name == name
                            || t.in_layer == name
                            || (arch.is_llama_family() && t.name == long)
                    }
                }
            })
            .collect();
        if hits.is_empty() {
            let mut valid: Vec<&str> = targets.iter().map(|t| t.name).collect();
            valid.dedup();
            return Err(EngineError::Config(format!(
                "--lora-targets: no module {name:?} in a {} model; choose from {}, attn, mlp, all",
                arch.name(),
                valid.join(", ")
            )));
        }
        chosen.extend(hits);
    }
    chosen.sort_unstable();
    chosen.dedup();
    Ok(chosen)
}

/// How adapters are shaped and trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    /// Dropout on the adapters' input while training (PEFT's `lora_dropout`).
    pub dropout: f32,
    /// Scale by α/√r instead of α/r.
    pub use_rslora: bool,
    /// As given (see [`select_targets`]).
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scaling(&self, rank: usize) -> f32 {
        if self.use_rslora {
            self.alpha / (rank as f32).sqrt()
        } else {
            self.alpha / rank as f32
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 4096 {
            return Err(EngineError::Config(format!(
                "--lora-rank {} must be in 1..=4096",
                self.rank
            )));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(EngineError::Config(format!(
                "--lora-alpha {} must be positive",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(EngineError::Config(format!(
                "--lora-dropout {} must be in [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// One adapted module of one layer.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub layer: usize,
    pub site: Site,
    /// PEFT's module path (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    /// Output columns of the product this module is part of.
    pub out: Range<usize>,
    pub in_width: usize,
    pub rank: usize,
    pub scaling: f32,
    /// `A [rank, in_width]` and `B [out.len(), rank]` in [`Lora::params`].
    pub a: Range<usize>,
    pub b: Range<usize>,
}

/// A set of adapters over a model: their parameters (and, while training, gradients) in one
/// buffer each, like the model's.
#[derive(Debug, Clone)]
pub struct Lora {
    pub spec: LoraSpec,
    /// The base model's name or path, as PEFT records it (`base_model_name_or_path`).
    pub base_model: String,
    pub modules: Vec<LoraModule>,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
}

/// How a forward pass uses the adapters: dropout only while training, with a seed that the
/// backward pass regenerates the same masks from; in decoding, which served adapter each row
/// uses (empty: none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraPass<'a> {
    pub dropout_seed: Option<u64>,
    pub row_adapters: &'a [Option<usize>],
}

impl LoraPass<'_> {
    pub(crate) const TRAINING_OFF: LoraPass<'static> = LoraPass {
        dropout_seed: None,
        row_adapters: &[],
    };
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Lora {
    /// Fresh adapters on the chosen modules of every layer, initialized as PEFT does: A from
    /// U(-1/√in, 1/√in) (Kaiming-uniform with a = √5), B zero, so training starts at the base.
    pub fn new(config: &ModelConfig, spec: LoraSpec, seed: u64) -> Result<Lora> {
        spec.validate()?;
        let chosen = select_targets(config.arch, &spec.targets)?;
        let targets = targets_of(config.arch);
        let mut lora = Lora {
            modules: Vec::new(),
            params: Vec::new(),
            grads: Vec::new(),
            spec,
            base_model: String::new(),
        };
        for l in 0..config.n_layer {
            for &i in &chosen {
                let t = &targets[i];
                let rank = lora.spec.rank;
                lora.push(config, l, t, rank, lora.spec.scaling(rank));
            }
        }
        let mut rng = Rng::new(seed);
        for m in &lora.modules {
            let bound = 1.0 / (m.in_width as f32).sqrt();
            for x in &mut lora.params[m.a.clone()] {
                *x = (rng.uniform() * 2.0 - 1.0) * bound;
            }
        }
        Ok(lora)
    }

    fn push(&mut self, config: &ModelConfig, layer: usize, t: &Target, rank: usize, scaling: f32) {
        let (out, in_width) = columns(config, t);
        let start = self.params.len();
        let a = start..start + rank * in_width;
        let b = a.end..a.end + out.len() * rank;
        self.params.resize(b.end, 0.0);
        self.modules.push(LoraModule {
            layer,
            site: t.site,
            path: module_path(config.arch, layer, t.in_layer),
            out,
            in_width,
            rank,
            scaling,
            a,
            b,
        });
    }

    pub fn num_parameters(&self) -> usize {
        self.params.len()
    }

    /// Modules of layer `l` on product `site`.
    fn at(&self, l: usize, site: Site) -> impl Iterator<Item = (usize, &LoraModule)> {
        self.modules
            .iter()
            .enumerate()
            .filter(move |(_, m)| m.layer == l && m.site == site)
    }

    /// What dropout multiplies element `i` of module `index`'s input by under `seed`: 0 or
    /// 1/(1-p), a hash of (seed, module, element), so the backward pass regenerates the mask
    /// instead of storing it. `None`: no dropout (p = 0, or not training).
    fn dropout_factor(
        &self,
        index: usize,
        seed: Option<u64>,
    ) -> Option<impl Fn(usize) -> f32 + Sync> {
        let p = self.spec.dropout;
        let seed = seed.filter(|_| p > 0.0)?;
        let keep = 1.0 / (1.0 - p);
        let base = mix(seed ^ mix(index as u64 + 1));
        Some(move |i: usize| {
            let u = (mix(base.wrapping_add(i as u64)) >> 40) as f32 / (1u64 << 24) as f32;
            if u < p {
                0.0
            } else {
                keep
            }
        })
    }

    /// The adapters' input: `x`, or dropout applied to it (see [`Lora::dropout_factor`]).
    fn adapter_input<'x>(
        &self,
        index: usize,
        x: &'x [f32],
        seed: Option<u64>,
    ) -> std::borrow::Cow<'x, [f32]> {
        match self.dropout_factor(index, seed) {
            Some(factor) => x
                .par_iter()
                .enumerate()
                .map(|(i, &v)| v * factor(i))
                .collect::<Vec<f32>>()
                .into(),
            None => x.into(),
        }
    }

    /// `out[:, m.out] += s·(dropout(x)·Aᵀ)·Bᵀ` for every module of layer `l` on `site`; `out`
    /// has `width` columns.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        k: &impl Kernels,
        l: usize,
        site: Site,
        out: &mut [f32],
        x: &[f32],
        width: usize,
        pass: LoraPass<'_>,
    ) {
        for (index, m) in self.at(l, site) {
            let rows = x.len() / m.in_width;
            let xd = self.adapter_input(index, x, pass.dropout_seed);
            let mut u = vec![0f32; rows * m.rank];
            let (a, b) = (&self.params[m.a.clone()], &self.params[m.b.clone()]);
            k.matmul_forward(
                &mut u,
                &xd,
                a,
                WeightLayout::OutIn,
                None,
                m.in_width,
                m.rank,
            );
            let n = m.out.len();
            let mut y = vec![0f32; rows * n];
            k.matmul_forward(&mut y, &u, b, WeightLayout::OutIn, None, m.rank, n);
            for (o, y) in out.chunks_mut(width).zip(y.chunks(n)) {
                for (o, &y) in o[m.out.clone()].iter_mut().zip(y) {
                    *o += m.scaling * y;
                }
            }
        }
    }

    /// Gradients of layer `l`'s modules on `site`: from the product's output gradient `dout`
    /// (`width` columns) and its input `x`, `grads += ` the adapters' gradients and
    /// `dx +=` their part of the input gradient.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &mut self,
        k: &impl Kernels,
        l: usize,
        site: Site,
        dx: &mut [f32],
        dout: &[f32],
        x: &[f32],
        width: usize,
        pass: LoraPass<'_>,
    ) {
        if self.grads.len() != self.params.len() {
            self.grads = vec![0.0; self.params.len()];
        }
        let modules: Vec<(usize, LoraModule)> =
            self.at(l, site).map(|(i, m)| (i, m.clone())).collect();
        for (index, m) in modules {
            let rows = x.len() / m.in_width;
            let (n, r) = (m.out.len(), m.rank);
            let xd = self.adapter_input(index, x, pass.dropout_seed);
            // The scaled gradient of this module's columns: dy = s·dout[:, out].
            let dy: Vec<f32> = dout
                .chunks(width)
                .flat_map(|row| row[m.out.clone()].iter().map(|&g| g * m.scaling))
                .collect();
            let mut u = vec![0f32; rows * r];
            k.matmul_forward(
                &mut u,
                &xd,
                &self.params[m.a.clone()],
                WeightLayout::OutIn,
                None,
                m.in_width,
                r,
            );
            // du = dy·B, dB += dyᵀ·u.
            let mut du = vec![0f32; rows * r];
            let (params, grads) = (&self.params, &mut self.grads);
            k.matmul_backward(
                &mut du,
                Some(&mut grads[m.b.clone()]),
                None,
                &dy,
                &u,
                &params[m.b.clone()],
                WeightLayout::OutIn,
                r,
                n,
            );
            // dxd = du·A, dA += duᵀ·xd.
            let mut dxd = vec![0f32; rows * m.in_width];
            k.matmul_backward(
                &mut dxd,
                Some(&mut grads[m.a.clone()]),
                None,
                &du,
                &xd,
                &params[m.a.clone()],
                WeightLayout::OutIn,
                m.in_width,
                r,
            );
            // Through dropout: the same mask and scale as the forward pass.
            match self.dropout_factor(index, pass.dropout_seed) {
                Some(factor) => dx
                    .par_iter_mut()
                    .zip(&dxd)
                    .enumerate()
                    .for_each(|(i, (d, g))| *d += g * factor(i)),
                None => dx.par_iter_mut().zip(&dxd).for_each(|(d, g)| *d += g),
            }
        }
    }

    /// The change each adapted matrix gets: `W[out, in] += s·B·A` added into the model's
    /// parameters (stored in `layout`).
    pub fn merge_into(&self, config: &ModelConfig, params: &mut [f32], layout: WeightLayout) {
        let lay = crate::ParamLayout::new(config);
        for m in &self.modules {
            let lp = &lay.layers[m.layer];
            let (w, width) = match m.site {
                Site::Qkv => (lp.qkv_w.clone(), config.qkv_width()),
                Site::AttnOut => (lp.attn_out_w.clone(), config.n_embd),
                Site::MlpIn => (lp.mlp_in_w.clone(), config.mlp_in_width()),
                Site::MlpOut => (lp.mlp_out_w.clone(), config.n_embd),
            };
            let w = &mut params[w];
            let (a, b) = (&self.params[m.a.clone()], &self.params[m.b.clone()]);
            let n_in = m.in_width;
            for (i, o) in m.out.clone().enumerate() {
                let brow = &b[i * m.rank..(i + 1) * m.rank];
                for j in 0..n_in {
                    // In f64, then rounded once: as close to PEFT's fp32 B·A as fp32 allows.
                    let delta: f64 = brow
                        .iter()
                        .enumerate()
                        .map(|(k, &bk)| f64::from(bk) * f64::from(a[k * n_in + j]))
                        .sum();
                    let at = match layout {
                        WeightLayout::OutIn => o * n_in + j,
                        WeightLayout::InOut => j * width + o,
                    };
                    w[at] += (delta * f64::from(m.scaling)) as f32;
                }
            }
        }
    }

    /// The PEFT module names these adapters target (for `target_modules`).
    fn target_modules(&self, arch: Arch) -> Vec<String> {
        let targets = targets_of(arch);
        let mut names: Vec<String> = Vec::new();
        for m in &self.modules {
            let t = targets
                .iter()
                .find(|t| m.path.ends_with(&format!(".{}", t.in_layer)))
                .expect("a module of the architecture");
            // GPT-2's two c_proj modules: named by their parent unless both are adapted.
            let both_c_proj = !arch.is_llama_family()
                && self.modules.iter().any(|x| x.site == Site::AttnOut)
                && self.modules.iter().any(|x| x.site == Site::MlpOut);
            let name = if t.name == "c_proj" && !both_c_proj {
                t.in_layer.to_string()
            } else {
                t.name.to_string()
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.sort();
        names
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` as PEFT's
    /// `save_pretrained` does.
    pub fn save_peft(&self, dir: &Path, config: &ModelConfig) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::io::file_err(dir, e.to_string()))?;
        let rank = self.spec.rank;
        let mut rank_pattern = serde_json::Map::new();
        for m in self.modules.iter().filter(|m| m.rank != rank) {
            rank_pattern.insert(m.path.clone(), m.rank.into());
        }
        let fan_in_fan_out = !config.arch.is_llama_family();
        let json = serde_json::json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": self.spec.alpha,
            "lora_bias": false,
            "lora_dropout": self.spec.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": rank,
            "rank_pattern": rank_pattern,
            "revision": null,
            "target_modules": self.target_modules(config.arch),
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.spec.use_rslora,
        });
        // serde_json's map is ordered by key, as PEFT's `sort_keys=True`.
        crate::io::write_file_atomic(
            &dir.join(ADAPTER_CONFIG),
            serde_json::to_string_pretty(&json)
                .expect("json")
                .as_bytes(),
        )?;
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for m in &self.modules {
            tensors.push((
                format!("{PEFT_PREFIX}{}.lora_A.weight", m.path),
                vec![m.rank, m.in_width],
                &self.params[m.a.clone()],
            ));
            tensors.push((
                format!("{PEFT_PREFIX}{}.lora_B.weight", m.path),
                vec![m.out.len(), m.rank],
                &self.params[m.b.clone()],
            ));
        }
        let metadata = [("format".to_string(), "pt".to_string())].into();
        crate::io::write_tensors(&dir.join(ADAPTER_WEIGHTS), &tensors, Some(metadata))
    }

    /// Reads an adapter directory PEFT (or kiem) wrote, for a base model of shape `config`.
    /// Options kiem does not implement (DoRA, trained biases, `modules_to_save`, adapters on
    /// embeddings) are refused by name.
    pub fn load_peft(dir: &Path, config: &ModelConfig) -> Result<Lora> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let err = |m: String| crate::io::file_err(&config_path, m);
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            err(format!(
                "{e} (an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
            ))
        })?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        match json.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(err(format!(
                    "peft_type is {}, kiem reads LORA adapters",
                    other.map_or("missing".to_string(), |s| format!("{s:?}"))
                )))
            }
        }
        let flag = |key: &str| json.get(key).and_then(Value::as_bool).unwrap_or(false);
        for key in ["use_dora", "lora_bias"] {
            if flag(key) {
                return Err(err(format!("{key} is set: kiem does not implement it")));
            }
        }
        if let Some(bias) = json.get("bias").and_then(Value::as_str) {
            if bias != "none" {
                return Err(err(format!(
                    "bias is {bias:?}: kiem reads adapters that train no biases (\"none\")"
                )));
            }
        }
        match json.get("modules_to_save") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(other) => {
                return Err(err(format!(
                    "modules_to_save is {other}: kiem reads adapters without fully trained modules"
                )))
            }
        }
        let number =
            |key: &str, default: f64| json.get(key).and_then(Value::as_f64).unwrap_or(default);
        let r = number("r", 8.0) as usize;
        let alpha = number("lora_alpha", 8.0) as f32;
        let pattern = |key: &str| -> Vec<(String, f64)> {
            json.get(key)
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (rank_pattern, alpha_pattern) = (pattern("rank_pattern"), pattern("alpha_pattern"));
        // PEFT's rule: a pattern key applies to a module whose path is it or ends in `.key`.
        let lookup = |patterns: &[(String, f64)], path: &str| {
            patterns
                .iter()
                .find(|(k, _)| path == k || path.ends_with(&format!(".{k}")))
                .map(|(_, v)| *v)
        };
        let spec = LoraSpec {
            rank: r,
            alpha,
            dropout: number("lora_dropout", 0.0) as f32,
            use_rslora: flag("use_rslora"),
            targets: Vec::new(),
        };

        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let tensors = crate::io::read_tensors(&weights_path)?;
        let werr = |m: String| crate::io::file_err(&weights_path, m);
        // Every tensor must be an A or B of a module the architecture has.
        type Tensor = (Vec<usize>, Vec<f32>);
        let mut by_module: BTreeMap<String, [Option<&Tensor>; 2]> = BTreeMap::new();
        for (name, tensor) in &tensors {
            let stripped = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
            let (path, which) = if let Some(p) = stripped.strip_suffix(".lora_A.weight") {
                (p, 0)
            } else if let Some(p) = stripped.strip_suffix(".lora_B.weight") {
                (p, 1)
            } else {
                return Err(werr(format!(
                    "tensor {name} is not a LoRA A or B weight (kiem reads plain LoRA adapters)"
                )));
            };
            by_module.entry(path.to_string()).or_default()[which] = Some(tensor);
        }
        if by_module.is_empty() {
            return Err(werr("holds no LoRA weights".into()));
        }
        let targets = targets_of(config.arch);
        let mut lora = Lora {
            spec,
            base_model: json
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            modules: Vec::new(),
            params: Vec::new(),
            grads: Vec::new(),
        };
        // Modules in the engine's order (layer, then product), whatever the file's order.
        let mut found = Vec::new();
        for (path, [a, b]) in &by_module {
            let place = (0..config.n_layer).find_map(|l| {
                targets.iter().enumerate().find_map(|(i, t)| {
                    (module_path(config.arch, l, t.in_layer) == *path).then_some((l, i))
                })
            });
            let Some((l, i)) = place else {
                return Err(werr(format!(
                    "module {path} is not one kiem can adapt in this {}-layer {} model",
                    config.n_layer,
                    config.arch.name()
                )));
            };
            let (Some(a), Some(b)) = (a, b) else {
                return Err(werr(format!("module {path} lacks its lora_A or lora_B")));
            };
            found.push((l, i, path.clone(), *a, *b));
        }
        found.sort_by_key(|(l, i, ..)| (*l, *i));
        for (l, i, path, a, b) in found {
            let t = &targets[i];
            let (out, in_width) = columns(config, t);
            let rank = a.0.first().copied().unwrap_or(0);
            if a.0 != [rank, in_width] || b.0 != [out.len(), rank] || rank == 0 {
                return Err(werr(format!(
                    "module {path}: lora_A is {:?} and lora_B {:?}, the model needs [r, {in_width}] and [{}, r]",
                    a.0,
                    b.0,
                    out.len()
                )));
            }
            let want_rank = lookup(&rank_pattern, &path).map_or(r, |v| v as usize);
            if rank != want_rank {
                return Err(werr(format!(
                    "module {path} has rank {rank} but {ADAPTER_CONFIG} says {want_rank}"
                )));
            }
            let module_alpha = lookup(&alpha_pattern, &path).map_or(alpha, |v| v as f32);
            let scaling = LoraSpec {
                alpha: module_alpha,
                ..lora.spec.clone()
            }
            .scaling(rank);
            lora.push(config, l, t, rank, scaling);
            let m = lora.modules.last().expect("pushed").clone();
            lora.params[m.a].copy_from_slice(&a.1);
            lora.params[m.b].copy_from_slice(&b.1);
            if !lora.spec.targets.iter().any(|x| x == t.in_layer) {
                lora.spec.targets.push(t.in_layer.to_string());
            }
        }
        if let Some(bad) = lora.params.iter().find(|x| !x.is_finite()) {
            return Err(werr(format!("holds a non-finite value ({bad})")));
        }
        Ok(lora)
    }
}

impl Lora {
    /// Checks that every module fits a model of shape `config`.
    pub fn check_fits(&self, config: &ModelConfig) -> Result<()> {
        let targets = targets_of(config.arch);
        for m in &self.modules {
            let fits = m.layer < config.n_layer
                && targets.iter().any(|t| {
                    module_path(config.arch, m.layer, t.in_layer) == m.path
                        && columns(config, t) == (m.out.clone(), m.in_width)
                });
            if !fits {
                return Err(EngineError::Config(format!(
                    "adapter module {} does not fit this {}-layer {} model of width {}",
                    m.path,
                    config.n_layer,
                    config.arch.name(),
                    config.n_embd
                )));
            }
        }
        Ok(())
    }
}
