//! Continuous batching: sequences join and leave between decoding steps, and each step is one
//! forward pass over every active sequence (the prompt rows of sequences that just joined, one
//! row for each of the others). A server admits requests as slots free up instead of waiting
//! for a whole batch to finish; `Gpt::generate` is the same loop with every prompt added at once.

use crate::infer::KvCache;
use crate::kernels::Kernels;
use crate::rng::Rng;
use crate::sampling::{sample, Control, FinishReason, GenerateOptions};
use crate::{EngineError, Gpt, Result};

/// What a step reports about one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A generated token (stop tokens are not reported).
    Token(u32),
    /// The sequence is done and has left the batch.
    Finished(FinishReason),
}

struct Sequence {
    id: u64,
    rng: Rng,
    /// Prompt and generated tokens (the repetition penalty looks at all of them).
    history: Vec<u32>,
    /// Tokens to feed at the next step: the prompt, then the last generated token.
    pending: Vec<u32>,
    generated: usize,
    options: GenerateOptions,
}

/// The sequences being decoded together, with one KV cache each.
pub struct Batcher<'g, K: Kernels> {
    gpt: &'g Gpt<K>,
    sequences: Vec<Sequence>,
    /// `caches[i]` belongs to `sequences[i]`.
    caches: Vec<KvCache>,
    /// Caches of finished sequences, reused by the next ones.
    spare: Vec<KvCache>,
}

impl<'g, K: Kernels> Batcher<'g, K> {
    pub fn new(gpt: &'g Gpt<K>) -> Self {
        Self {
            gpt,
            sequences: Vec::new(),
            caches: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Active sequences.
    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Adds a sequence, prefilled at the next step. Its RNG is seeded with
    /// `options.sampling.seed`.
    pub fn add(&mut self, id: u64, prompt: Vec<u32>, options: GenerateOptions) -> Result<()> {
        self.add_with_adapter(id, prompt, options, None)
    }

    /// As [`Batcher::add`], decoding with served adapter `adapter` (an index from
    /// [`Gpt::add_served_adapter`]); sequences with different adapters share the batch.
    pub fn add_with_adapter(
        &mut self,
        id: u64,
        prompt: Vec<u32>,
        options: GenerateOptions,
        adapter: Option<usize>,
    ) -> Result<()> {
        options.sampling.validate()?;
        if let Some(a) = adapter.filter(|&a| a >= self.gpt.served_adapters.len()) {
            return Err(EngineError::Shape(format!(
                "adapter {a} is not served ({} are)",
                self.gpt.served_adapters.len()
            )));
        }
        let context = self.gpt.config.context;
        if prompt.is_empty() {
            return Err(EngineError::Shape(
                "a prompt needs at least one token".into(),
            ));
        }
        if prompt.len() > context {
            return Err(EngineError::Shape(format!(
                "the prompt has {} tokens, more than the model's context of {context}",
                prompt.len()
            )));
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.gpt.config.vocab_size)
        {
            return Err(EngineError::Shape(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.gpt.config.vocab_size
            )));
        }
        if self.sequences.iter().any(|s| s.id == id) {
            return Err(EngineError::Shape(format!(
                "sequence {id} is already active"
            )));
        }
        let mut cache = self.spare.pop().unwrap_or_else(|| KvCache::new(self.gpt));
        cache.clear();
        cache.set_adapter(adapter);
        self.caches.push(cache);
        self.sequences.push(Sequence {
            id,
            rng: Rng::new(options.sampling.seed),
            history: prompt.clone(),
            pending: prompt,
            generated: 0,
            options,
        });
        Ok(())
    }

    /// Drops a sequence at once (its client went away); false if it was not active.
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.sequences.iter().position(|s| s.id == id) {
            Some(i) => {
                self.remove(i);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, i: usize) {
        self.sequences.swap_remove(i);
        self.spare.push(self.caches.swap_remove(i));
    }

    /// One forward pass over every active sequence. `on_event` sees each new token (and may
    /// end its sequence with `Control::Stop`, finishing it with `FinishReason::Stop`) and then
    /// each sequence that finished; finished sequences leave the batch.
    pub fn step(&mut self, on_event: &mut dyn FnMut(u64, Event) -> Control) -> Result<()> {
        if self.sequences.is_empty() {
            return Ok(());
        }
        let inputs: Vec<&[u32]> = self
            .sequences
            .iter()
            .map(|s| s.pending.as_slice())
            .collect();
        let logits = self.gpt.forward_cached(&mut self.caches, &inputs)?;
        let (vocab, vp, context) = (
            self.gpt.sampling_vocab(),
            self.gpt.config.padded_vocab(),
            self.gpt.config.context,
        );
        let mut finished = Vec::new();
        for (s, seq) in self.sequences.iter_mut().enumerate() {
            seq.pending.clear();
            if seq.generated >= seq.options.max_tokens {
                finished.push((s, FinishReason::Length));
                continue;
            }
            let row = &logits[s * vp..s * vp + vocab];
            let token = sample(row, &seq.options.sampling, &seq.history, &mut seq.rng);
            if seq.options.stop_ids.contains(&token) {
                finished.push((s, FinishReason::Stop));
                continue;
            }
            seq.generated += 1;
            seq.history.push(token);
            if on_event(seq.id, Event::Token(token)) == Control::Stop {
                finished.push((s, FinishReason::Stop));
            } else if seq.generated >= seq.options.max_tokens || seq.history.len() >= context {
                finished.push((s, FinishReason::Length));
            } else {
                seq.pending.push(token);
            }
        }
        // Highest index first, so swap_remove leaves the lower indices in place.
        for &(s, reason) in finished.iter().rev() {
            let id = self.sequences[s].id;
            self.remove(s);
            on_event(id, Event::Finished(reason));
        }
        Ok(())
    }
}
