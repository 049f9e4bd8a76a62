//! Byte-level BPE training with the `tokenizers` crate and a GPT-4-style pre-tokenizer.

use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Trainer};

use crate::{Result, Tokenizer, TokenizerError, TokenizerSource, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE};

/// Options for [`train`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Size of the vocabulary: 256 byte tokens plus merges, special tokens included.
    /// The 256 bytes and the special tokens are always present, so sizes below
    /// `256 + SPECIAL_TOKENS.len()` give a pure byte tokenizer.
    pub vocab_size: usize,
    /// Pairs seen fewer times than this are never merged.
    pub min_frequency: u64,
    /// Show the merge phase's progress bar on stderr.
    pub show_progress: bool,
}

/// Trains a byte-level BPE tokenizer on `documents`.
///
/// Memory grows with the number of distinct pre-tokenized words, not with the corpus size.
pub fn train<I>(documents: I, options: &TrainOptions) -> Result<Tokenizer>
where
    I: Iterator<Item = String> + Send,
{
    if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&options.vocab_size) {
        return Err(TokenizerError::VocabSize(options.vocab_size));
    }
    let specials: Vec<AddedToken> = crate::SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let bpe_trainer = BpeTrainer::builder()
        .vocab_size(options.vocab_size)
        .min_frequency(options.min_frequency)
        .show_progress(options.show_progress)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = MergePhaseProgress(bpe_trainer);

    let split = Split::new(
        SplitPattern::Regex(crate::GPT4_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| TokenizerError::Train(format!("bad split pattern: {e}")))?;
    let pre_tokenizer = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]);
    let mut hf = tokenizers::TokenizerBuilder::<
        BPE,
        tokenizers::NormalizerWrapper,
        PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre_tokenizer)))
    .with_decoder(Some(tokenizers::DecoderWrapper::ByteLevel(
        ByteLevel::default(),
    )))
    .build()
    .map_err(|e| TokenizerError::Train(e.to_string()))?;
    hf.train(&mut trainer, documents)
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    let json = hf
        .to_string(false)
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    Tokenizer::from_json(json, TokenizerSource::Trained)
}

/// `tokenizers` shows one progress bar for reading and one for merging; reading has no known
/// length here (kiem's reader shows byte progress instead), so only the merge bar is kept.
struct MergePhaseProgress(BpeTrainer);

impl Trainer for MergePhaseProgress {
    type Model = BPE;

    fn should_show_progress(&self) -> bool {
        false
    }

    fn train(&self, model: &mut BPE) -> tokenizers::Result<Vec<AddedToken>> {
        self.0.train(model)
    }

    fn feed<I, S, F>(&mut self, iterator: I, process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        self.0.feed(iterator, process)
    }
}
