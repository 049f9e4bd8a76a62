//! Model shape, the description of its transformer block, and the parameter layout in the flat
//! parameter buffer. Architectures are data: GPT-2 and the Llama family are two descriptions
//! walked by the same forward and backward passes ([`crate::Gpt`]).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::kernels::WeightLayout;
use crate::{EngineError, Result};

/// Which family a model belongs to: decides tensor names and the Hugging Face class it is
/// written as. The layers themselves are described by [`Block`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// `GPT2LMHeadModel`.
    #[default]
    Gpt2,
    /// `LlamaForCausalLM`.
    Llama,
    /// `Qwen2ForCausalLM` (a Llama block with q/k/v biases).
    Qwen2,
    /// `MistralForCausalLM` (a Llama block; kiem does not implement the sliding window).
    Mistral,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }

    /// Families with Llama's tensor names (`model.layers.N.self_attn.q_proj.weight` ...).
    pub fn is_llama_family(self) -> bool {
        self != Arch::Gpt2
    }
}

/// Normalization before attention, before the MLP and before the output head.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Norm {
    /// Layer norm with weight and bias, eps [`crate::kernels::LAYERNORM_EPS`] (GPT-2).
    Layer,
    /// RMS norm with a weight only (Llama).
    Rms { eps: f32 },
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Positions {
    /// A learned embedding per position, added to the token embedding (GPT-2).
    Learned,
    /// Rotary embeddings on queries and keys, Hugging Face's rotate-half layout (Llama).
    Rope(Rope),
}

/// Rotary position settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    #[serde(default)]
    pub scaling: RopeScaling,
}

/// `rope_scaling` / `rope_parameters` types kiem implements (others are refused by name).
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    #[default]
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The feed-forward part of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mlp {
    /// `proj(gelu_tanh(fc(x)))` (GPT-2).
    Gelu,
    /// `down(silu(gate(x)) · up(x))` (Llama).
    SwiGlu,
}

/// What one transformer block is made of. Every block of a model is the same.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Block {
    pub norm: Norm,
    pub positions: Positions,
    pub mlp: Mlp,
    /// Biases on the query, key and value projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub attn_out_bias: bool,
    /// Biases on the MLP's projections.
    pub mlp_bias: bool,
    /// The output head shares the token embedding's weights.
    pub tied_head: bool,
}

impl Block {
    pub const GPT2: Block = Block {
        norm: Norm::Layer,
        positions: Positions::Learned,
        mlp: Mlp::Gelu,
        qkv_bias: true,
        attn_out_bias: true,
        mlp_bias: true,
        tied_head: true,
    };

    /// A Llama block: RMS norm, RoPE, SwiGLU, no biases, untied head.
    pub fn llama(eps: f32, rope: Rope) -> Block {
        Block {
            norm: Norm::Rms { eps },
            positions: Positions::Rope(rope),
            mlp: Mlp::SwiGlu,
            qkv_bias: false,
            attn_out_bias: false,
            mlp_bias: false,
            tied_head: false,
        }
    }
}

fn gpt2_block() -> Block {
    Block::GPT2
}

/// Shape and architecture of a model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Longest sequence.
    pub context: usize,
    /// Vocabulary size as the tokenizer has it.
    pub vocab_size: usize,
    #[serde(default)]
    pub arch: Arch,
    #[serde(default = "gpt2_block")]
    pub block: Block,
    /// Key/value heads (grouped-query attention); `None`: as many as query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<usize>,
    /// Channels per head; `None`: `n_embd / n_head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Hidden width of the MLP; `None`: `4 · n_embd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_hidden: Option<usize>,
}

/// Embedding rows are padded to a multiple of this for speed; padded logits are never sampled
/// or trained.
pub const VOCAB_PAD: usize = 64;

/// Largest size of any one dimension kiem accepts from a config (keeps products of sizes far
/// from overflow and turns a lying config into an error instead of a huge allocation).
const MAX_DIM: usize = 1 << 24;

impl ModelConfig {
    /// A GPT-2 model.
    pub const fn gpt2(
        n_layer: usize,
        n_head: usize,
        n_embd: usize,
        context: usize,
        vocab_size: usize,
    ) -> Self {
        ModelConfig {
            n_layer,
            n_head,
            n_embd,
            context,
            vocab_size,
            arch: Arch::Gpt2,
            block: Block::GPT2,
            n_kv_head: None,
            head_dim: None,
            mlp_hidden: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        let dims = [
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.context,
            self.vocab_size,
            self.kv_heads(),
            self.head_dim(),
            self.mlp_hidden(),
        ];
        if dims.contains(&0) {
            return bad(format!("every dimension must be positive: {self:?}"));
        }
        if dims.iter().any(|&d| d > MAX_DIM) || self.n_layer > 4096 {
            return bad(format!("a dimension is implausibly large: {self:?}"));
        }
        // Products of sizes, in u128 so that nothing wraps: at most 2^40 parameters.
        let (c, hd, l) = (
            self.n_embd as u128,
            self.head_dim() as u128,
            self.n_layer as u128,
        );
        let heads = (self.n_head + 2 * self.kv_heads()) as u128;
        let per_layer =
            c * heads * hd + self.n_head as u128 * hd * c + 3 * c * self.mlp_hidden() as u128;
        let total = l * per_layer + 2 * (self.padded_vocab() as u128 + self.context as u128) * c;
        if total > 1 << 40 {
            return bad(format!(
                "the model would have about {total} parameters: {self:?}"
            ));
        }
        if self.head_dim.is_none() && !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd {} must be a multiple of n_head {} (or give head_dim)",
                self.n_embd, self.n_head
            ));
        }
        if !self.n_head.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "n_head {} must be a multiple of the number of key/value heads {}",
                self.n_head,
                self.kv_heads()
            ));
        }
        let b = &self.block;
        if let Positions::Rope(rope) = b.positions {
            if !self.head_dim().is_multiple_of(2) {
                return bad(format!(
                    "rotary positions need an even head size, not {}",
                    self.head_dim()
                ));
            }
            if !(rope.theta > 0.0 && rope.theta.is_finite()) {
                return bad(format!("rope theta must be positive, not {}", rope.theta));
            }
            let factor_ok = |f: f64| f.is_finite() && f > 0.0;
            match rope.scaling {
                RopeScaling::Default => {}
                RopeScaling::Linear { factor } if factor_ok(factor) => {}
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } if factor_ok(factor)
                    && factor_ok(low_freq_factor)
                    && high_freq_factor > low_freq_factor
                    && high_freq_factor.is_finite()
                    && original_max_position_embeddings > 0 => {}
                other => return bad(format!("invalid rope scaling {other:?}")),
            }
        }
        if let Norm::Rms { eps } = b.norm {
            if !(eps > 0.0 && eps.is_finite()) {
                return bad(format!("norm eps must be positive, not {eps}"));
            }
        }
        match self.arch {
            Arch::Gpt2 if *b != Block::GPT2 || self.n_kv_head.is_some() => {
                return bad("a gpt2 model has GPT-2's block (layer norm, learned positions, GELU, biases, tied head) and no key/value head count".into());
            }
            a if a.is_llama_family()
                && (!matches!(b.norm, Norm::Rms { .. })
                    || !matches!(b.positions, Positions::Rope(_))
                    || b.mlp != Mlp::SwiGlu) =>
            {
                return bad(format!(
                    "a {} model has RMS norm, rotary positions and a SwiGLU MLP",
                    a.name()
                ));
            }
            _ => {}
        }
        let biases = (b.qkv_bias, b.attn_out_bias, b.mlp_bias);
        match self.arch {
            Arch::Qwen2 if biases != (true, false, false) => {
                return bad("a qwen2 model has biases on q, k and v only".into());
            }
            Arch::Llama | Arch::Mistral if b.qkv_bias != b.attn_out_bias => {
                return bad(format!(
                    "a {} model has biases on all of q, k, v and o (attention_bias) or on none",
                    self.arch.name()
                ));
            }
            Arch::Mistral if b.qkv_bias || b.mlp_bias => {
                return bad("a mistral model has no biases".into());
            }
            _ => {}
        }
        if self.arch == Arch::Gpt2 && (self.head_dim.is_some() || self.mlp_hidden.is_some()) {
            return bad(
                "a gpt2 model has head size n_embd / n_head and MLP width 4 · n_embd".into(),
            );
        }
        Ok(())
    }

    /// Vocabulary rounded up to a multiple of [`VOCAB_PAD`].
    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_PAD) * VOCAB_PAD
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd / self.n_head.max(1))
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    pub fn mlp_hidden(&self) -> usize {
        // Saturating: a hostile config's n_embd must reach validate's range check, not wrap.
        self.mlp_hidden.unwrap_or(self.n_embd.saturating_mul(4))
    }

    /// Width of attention's output (all query heads side by side).
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim()
    }

    /// Width of the keys (and of the values) of one position.
    pub fn kv_width(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }

    /// Width of one row of the fused query/key/value activation.
    pub fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }

    /// Width of the MLP's first product: GELU's input, or SwiGLU's gate and up side by side.
    pub fn mlp_in_width(&self) -> usize {
        match self.block.mlp {
            Mlp::Gelu => self.mlp_hidden(),
            Mlp::SwiGlu => 2 * self.mlp_hidden(),
        }
    }

    /// Parameters that carry information (padding rows excluded).
    pub fn num_parameters(&self) -> usize {
        let layout = ParamLayout::new(self);
        let heads = if self.block.tied_head { 1 } else { 2 };
        layout.total - heads * (self.padded_vocab() - self.vocab_size) * self.n_embd
    }
}

/// How a tensor is initialized for pre-training from scratch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal { std: f32 },
}

/// One tensor in the flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Hugging Face name (`transformer.h.0.attn.c_attn.weight`, `model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// Shape in the buffer (vocabulary rows padded).
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    /// Matrices (2-D) get weight decay; biases and norm weights do not.
    pub decay: bool,
    /// Rows are the vocabulary, padded to [`ModelConfig::padded_vocab`] in the buffer.
    pub vocab_rows: bool,
    /// How a matrix that enters a product is stored in files (`None` for other tensors).
    pub matrix: Option<WeightLayout>,
    pub init: Init,
}

impl TensorSpec {
    /// Shape in Hugging Face files (the vocabulary unpadded).
    pub fn file_shape(&self, vocab_size: usize) -> Vec<usize> {
        let mut shape = self.shape.clone();
        if self.vocab_rows {
            shape[0] = vocab_size;
        }
        shape
    }

    /// Elements that carry information (the vocabulary's padding rows excluded).
    pub fn live_len(&self, vocab_size: usize) -> usize {
        self.file_shape(vocab_size).iter().product()
    }
}

/// Offsets of one transformer block's tensors. Fused ranges span tensors that are adjacent in
/// the buffer: GPT-2's `c_attn` is one tensor; Llama's q, k and v projections (stored
/// `[out, in]`) are three adjacent tensors that read as one `[q + 2 kv, C]` matrix, and so are
/// the gate and up projections.
#[derive(Debug, Clone)]
pub struct LayerParams {
    pub norm1_w: Range<usize>,
    pub norm1_b: Option<Range<usize>>,
    /// Queries, keys and values: `[C, qkv]` (GPT-2) or `[qkv, C]` (Llama).
    pub qkv_w: Range<usize>,
    pub qkv_b: Option<Range<usize>>,
    /// Attention output projection, `q_width → C`.
    pub attn_out_w: Range<usize>,
    pub attn_out_b: Option<Range<usize>>,
    pub norm2_w: Range<usize>,
    pub norm2_b: Option<Range<usize>>,
    /// `C → mlp_in_width` (GPT-2's `c_fc`; Llama's gate and up).
    pub mlp_in_w: Range<usize>,
    pub mlp_in_b: Option<Range<usize>>,
    /// `mlp_hidden → C`.
    pub mlp_out_w: Range<usize>,
    pub mlp_out_b: Option<Range<usize>>,
}

/// Where every parameter tensor lives in the flat buffer.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    /// Token embedding `[padded_vocab, C]`.
    pub wte: Range<usize>,
    /// Learned positions `[context, C]`.
    pub wpe: Option<Range<usize>>,
    pub layers: Vec<LayerParams>,
    pub normf_w: Range<usize>,
    pub normf_b: Option<Range<usize>>,
    /// Untied output head `[padded_vocab, C]`; `None` when the head is `wte`.
    pub head: Option<Range<usize>>,
    /// How the layers' matrices are stored in files: `[in, out]` (GPT-2's Conv1D) or
    /// `[out, in]` (`nn.Linear`).
    pub matrices: WeightLayout,
    pub tensors: Vec<TensorSpec>,
    pub total: usize,
}

/// Appends tensors to the flat buffer in order.
struct LayoutBuilder {
    tensors: Vec<TensorSpec>,
    offset: usize,
}

impl LayoutBuilder {
    fn add(&mut self, name: String, shape: Vec<usize>, init: Init) -> Range<usize> {
        self.push(name, shape, init, None, false)
    }

    fn matrix(
        &mut self,
        name: String,
        shape: [usize; 2],
        layout: WeightLayout,
        init: Init,
    ) -> Range<usize> {
        self.push(name, shape.to_vec(), init, Some(layout), false)
    }

    fn push(
        &mut self,
        name: String,
        shape: Vec<usize>,
        init: Init,
        matrix: Option<WeightLayout>,
        vocab_rows: bool,
    ) -> Range<usize> {
        let len: usize = shape.iter().product();
        let range = self.offset..self.offset + len;
        self.offset += len;
        self.tensors.push(TensorSpec {
            name,
            decay: shape.len() == 2,
            shape,
            range: range.clone(),
            vocab_rows,
            matrix,
            init,
        });
        range
    }
}

fn span(first: &Range<usize>, last: &Range<usize>) -> Range<usize> {
    debug_assert!(first.start <= last.start);
    first.start..last.end
}

impl ParamLayout {
    pub fn new(config: &ModelConfig) -> Self {
        if config.arch.is_llama_family() {
            Self::llama(config)
        } else {
            Self::gpt2(config)
        }
    }

    fn gpt2(config: &ModelConfig) -> Self {
        let c = config.n_embd;
        let normal = Init::Normal { std: 0.02 };
        let residual = Init::Normal {
            std: 0.02 / (2.0 * config.n_layer as f32).sqrt(),
        };
        let mut b = LayoutBuilder {
            tensors: Vec::new(),
            offset: 0,
        };
        let wte = b.push(
            "transformer.wte.weight".into(),
            vec![config.padded_vocab(), c],
            normal,
            Some(WeightLayout::OutIn),
            true,
        );
        let wpe = b.add(
            "transformer.wpe.weight".into(),
            vec![config.context, c],
            normal,
        );
        let io = WeightLayout::InOut;
        let mut layers = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let p = |s: &str| format!("transformer.h.{l}.{s}");
            layers.push(LayerParams {
                norm1_w: b.add(p("ln_1.weight"), vec![c], Init::Ones),
                norm1_b: Some(b.add(p("ln_1.bias"), vec![c], Init::Zeros)),
                qkv_w: b.matrix(p("attn.c_attn.weight"), [c, 3 * c], io, normal),
                qkv_b: Some(b.add(p("attn.c_attn.bias"), vec![3 * c], Init::Zeros)),
                attn_out_w: b.matrix(p("attn.c_proj.weight"), [c, c], io, residual),
                attn_out_b: Some(b.add(p("attn.c_proj.bias"), vec![c], Init::Zeros)),
                norm2_w: b.add(p("ln_2.weight"), vec![c], Init::Ones),
                norm2_b: Some(b.add(p("ln_2.bias"), vec![c], Init::Zeros)),
                mlp_in_w: b.matrix(p("mlp.c_fc.weight"), [c, 4 * c], io, normal),
                mlp_in_b: Some(b.add(p("mlp.c_fc.bias"), vec![4 * c], Init::Zeros)),
                mlp_out_w: b.matrix(p("mlp.c_proj.weight"), [4 * c, c], io, residual),
                mlp_out_b: Some(b.add(p("mlp.c_proj.bias"), vec![c], Init::Zeros)),
            });
        }
        let normf_w = b.add("transformer.ln_f.weight".into(), vec![c], Init::Ones);
        let normf_b = Some(b.add("transformer.ln_f.bias".into(), vec![c], Init::Zeros));
        ParamLayout {
            wte,
            wpe: Some(wpe),
            layers,
            normf_w,
            normf_b,
            head: None,
            matrices: io,
            tensors: b.tensors,
            total: b.offset,
        }
    }

    /// Llama-family names; `nn.Linear` weights are `[out, in]`. Adjacent tensors that one
    /// product reads together (q, k, v; gate, up; and their biases) are laid out side by side.
    fn llama(config: &ModelConfig) -> Self {
        let c = config.n_embd;
        let (qw, kvw, hidden) = (config.q_width(), config.kv_width(), config.mlp_hidden());
        let blk = &config.block;
        let normal = Init::Normal { std: 0.02 };
        let residual = Init::Normal {
            std: 0.02 / (2.0 * config.n_layer as f32).sqrt(),
        };
        let oi = WeightLayout::OutIn;
        let mut b = LayoutBuilder {
            tensors: Vec::new(),
            offset: 0,
        };
        let wte = b.push(
            "model.embed_tokens.weight".into(),
            vec![config.padded_vocab(), c],
            normal,
            Some(oi),
            true,
        );
        let mut layers = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let norm1_w = b.add(p("input_layernorm.weight"), vec![c], Init::Ones);
            let q = b.matrix(p("self_attn.q_proj.weight"), [qw, c], oi, normal);
            b.matrix(p("self_attn.k_proj.weight"), [kvw, c], oi, normal);
            let v = b.matrix(p("self_attn.v_proj.weight"), [kvw, c], oi, normal);
            let qkv_b = blk.qkv_bias.then(|| {
                let q = b.add(p("self_attn.q_proj.bias"), vec![qw], Init::Zeros);
                b.add(p("self_attn.k_proj.bias"), vec![kvw], Init::Zeros);
                let v = b.add(p("self_attn.v_proj.bias"), vec![kvw], Init::Zeros);
                span(&q, &v)
            });
            let attn_out_w = b.matrix(p("self_attn.o_proj.weight"), [c, qw], oi, residual);
            let attn_out_b = blk
                .attn_out_bias
                .then(|| b.add(p("self_attn.o_proj.bias"), vec![c], Init::Zeros));
            let norm2_w = b.add(p("post_attention_layernorm.weight"), vec![c], Init::Ones);
            let gate = b.matrix(p("mlp.gate_proj.weight"), [hidden, c], oi, normal);
            let up = b.matrix(p("mlp.up_proj.weight"), [hidden, c], oi, normal);
            let mlp_in_b = blk.mlp_bias.then(|| {
                let g = b.add(p("mlp.gate_proj.bias"), vec![hidden], Init::Zeros);
                let u = b.add(p("mlp.up_proj.bias"), vec![hidden], Init::Zeros);
                span(&g, &u)
            });
            let mlp_out_w = b.matrix(p("mlp.down_proj.weight"), [c, hidden], oi, residual);
            let mlp_out_b = blk
                .mlp_bias
                .then(|| b.add(p("mlp.down_proj.bias"), vec![c], Init::Zeros));
            layers.push(LayerParams {
                norm1_w,
                norm1_b: None,
                qkv_w: span(&q, &v),
                qkv_b,
                attn_out_w,
                attn_out_b,
                norm2_w,
                norm2_b: None,
                mlp_in_w: span(&gate, &up),
                mlp_in_b,
                mlp_out_w,
                mlp_out_b,
            });
        }
        let normf_w = b.add("model.norm.weight".into(), vec![c], Init::Ones);
        let head = (!blk.tied_head).then(|| {
            b.push(
                "lm_head.weight".into(),
                vec![config.padded_vocab(), c],
                normal,
                Some(oi),
                true,
            )
        });
        ParamLayout {
            wte,
            wpe: None,
            layers,
            normf_w,
            normf_b: None,
            head,
            matrices: oi,
            tensors: b.tensors,
            total: b.offset,
        }
    }

    /// The output head's weights `[padded_vocab, C]`.
    pub fn head_weights(&self) -> Range<usize> {
        self.head.clone().unwrap_or_else(|| self.wte.clone())
    }
}
