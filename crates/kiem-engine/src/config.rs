//! Model shape and the parameter layout in the flat parameter buffer.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// Shape of a GPT-2 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Longest sequence (number of learned positions).
    pub context: usize,
    /// Vocabulary size as the tokenizer has it.
    pub vocab_size: usize,
}

/// Embedding rows are padded to a multiple of this for speed; padded logits are never sampled
/// or trained.
pub const VOCAB_PAD: usize = 64;

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 || self.context == 0 {
            return bad(format!("every dimension must be positive: {self:?}"));
        }
        if self.vocab_size == 0 {
            return bad("vocab_size must be positive".into());
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd {} must be a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        Ok(())
    }

    /// Vocabulary rounded up to a multiple of [`VOCAB_PAD`].
    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_PAD) * VOCAB_PAD
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameters that carry information (padding rows excluded).
    pub fn num_parameters(&self) -> usize {
        let layout = ParamLayout::new(self);
        layout.total - (self.padded_vocab() - self.vocab_size) * self.n_embd
    }
}

/// One tensor in the flat buffer. Matrices are stored `[in, out]` like Hugging Face GPT-2's
/// `Conv1D`, so model files map to the buffer without transposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face name (`transformer.h.0.attn.c_attn.weight`).
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    /// Matrices (2-D) get weight decay; biases and layer-norm parameters do not.
    pub decay: bool,
}

/// Offsets of one transformer block's tensors.
#[derive(Debug, Clone)]
pub struct LayerParams {
    pub ln1_w: Range<usize>,
    pub ln1_b: Range<usize>,
    /// `[C, 3C]`
    pub qkv_w: Range<usize>,
    pub qkv_b: Range<usize>,
    /// `[C, C]`
    pub attn_proj_w: Range<usize>,
    pub attn_proj_b: Range<usize>,
    pub ln2_w: Range<usize>,
    pub ln2_b: Range<usize>,
    /// `[C, 4C]`
    pub fc_w: Range<usize>,
    pub fc_b: Range<usize>,
    /// `[4C, C]`
    pub fc_proj_w: Range<usize>,
    pub fc_proj_b: Range<usize>,
}

/// Where every parameter tensor lives in the flat buffer.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    /// `[padded_vocab, C]`
    pub wte: Range<usize>,
    /// `[context, C]`
    pub wpe: Range<usize>,
    pub layers: Vec<LayerParams>,
    pub lnf_w: Range<usize>,
    pub lnf_b: Range<usize>,
    pub tensors: Vec<TensorSpec>,
    pub total: usize,
}

impl ParamLayout {
    pub fn new(config: &ModelConfig) -> Self {
        let c = config.n_embd;
        let mut tensors = Vec::new();
        let mut offset = 0;
        let mut add = |name: String, shape: Vec<usize>| {
            let len: usize = shape.iter().product();
            let range = offset..offset + len;
            offset += len;
            tensors.push(TensorSpec {
                name,
                decay: shape.len() == 2,
                shape,
                range: range.clone(),
            });
            range
        };
        let wte = add(
            "transformer.wte.weight".into(),
            vec![config.padded_vocab(), c],
        );
        let wpe = add("transformer.wpe.weight".into(), vec![config.context, c]);
        let mut layers = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let p = |s: &str| format!("transformer.h.{l}.{s}");
            layers.push(LayerParams {
                ln1_w: add(p("ln_1.weight"), vec![c]),
                ln1_b: add(p("ln_1.bias"), vec![c]),
                qkv_w: add(p("attn.c_attn.weight"), vec![c, 3 * c]),
                qkv_b: add(p("attn.c_attn.bias"), vec![3 * c]),
                attn_proj_w: add(p("attn.c_proj.weight"), vec![c, c]),
                attn_proj_b: add(p("attn.c_proj.bias"), vec![c]),
                ln2_w: add(p("ln_2.weight"), vec![c]),
                ln2_b: add(p("ln_2.bias"), vec![c]),
                fc_w: add(p("mlp.c_fc.weight"), vec![c, 4 * c]),
                fc_b: add(p("mlp.c_fc.bias"), vec![4 * c]),
                fc_proj_w: add(p("mlp.c_proj.weight"), vec![4 * c, c]),
                fc_proj_b: add(p("mlp.c_proj.bias"), vec![c]),
            });
        }
        let lnf_w = add("transformer.ln_f.weight".into(), vec![c]);
        let lnf_b = add("transformer.ln_f.bias".into(), vec![c]);
        ParamLayout {
            wte,
            wpe,
            layers,
            lnf_w,
            lnf_b,
            tensors,
            total: offset,
        }
    }
}
