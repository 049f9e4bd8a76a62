use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiem_engine::kernels::DecodingWeights;
use kiem_engine::sampling::{Control, FinishReason, GenerateOptions, SamplingParams};
use kiem_tokenizer::chat::{render_prompt, Message, Role};
use kiem_tokenizer::stream::StreamDecoder;
use kiem_tokenizer::Tokenizer;

use crate::ThreadArgs;

/// Sampling flags shared by every command that generates text.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub max_tokens: usize,

    /// Randomness: 0 always picks the most likely token, higher is more varied.
    #[arg(long, default_value_t = 0.8, value_name = "T")]
    pub temperature: f32,

    /// Sample only among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 50, value_name = "K")]
    pub top_k: usize,

    /// Sample only among the most likely tokens that together have probability P (1 = all).
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,

    /// Penalize tokens already present (1 = off, 1.1-1.3 is typical).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f32,

    /// Random seed: the same seed, prompt and flags give the same text (default: random).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stops: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed,
        };
        params.validate().map_err(|e| {
            anyhow::anyhow!("{e} (check --temperature, --top-p, --repetition-penalty)")
        })?;
        Ok(params)
    }
}

/// Which copy of the weights decoding reads.
#[derive(Args, Debug, Clone, Default)]
pub struct WeightsArgs {
    /// Weights decoding reads. Default: as the model stores them: a GGUF file's matrices
    /// straight from its blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, BF16),
    /// memory about the file's size; a model directory's in fp32.
    /// fp32; bf16 (each matrix weight rounded to bf16, sums in fp32); q8_0, q4_0, q4_1 or q4_k
    /// (matrices and output head quantized as ggml does at load, about 1.06, 0.56, 0.63 and 0.58
    /// bytes a weight per token): their fp32 copies go back to the system; prefill multiplies
    /// the quantized blocks in integers (AVX-512 VNNI), or dequantizes them on the fly.
    #[arg(long, value_name = "W")]
    pub weights: Option<DecodingWeights>,

    /// A LoRA adapter directory (PEFT's format: a kiem LoRA run's RUN_DIR/adapter, or one
    /// `peft` saved) for --model, merged into its weights at load. `serve` takes several
    /// (`--adapter NAME=DIR` ...), each served unmerged under its own model id.
    #[arg(long, value_name = "DIR")]
    pub adapter: Vec<String>,
}

impl WeightsArgs {
    /// The one adapter to merge (commands other than `serve` take at most one).
    pub fn single_adapter(&self) -> Result<Option<PathBuf>> {
        match self.adapter.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(PathBuf::from(one))),
            _ => bail!("--adapter: this command takes one adapter (kiem serve takes several)"),
        }
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face GPT-2 or Llama family, e.g. RUN_DIR/model from `kiem
    /// pretrain`) or GGUF file.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,

    /// Text to continue (default: read standard input).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,

    /// Do not start the prompt with the beginning-of-text token that the model's tokenizer adds
    /// (kiem's own models, Llama 3 ...; GPT-2, Qwen2 and SmolLM2 add none).
    #[arg(long, conflicts_with = "chat")]
    no_bos: bool,

    /// Take the prompt as a user message and answer it as the chat model: the prompt is written
    /// with the model's chat template (or kiem's chat format), and the reply ends at its
    /// end-of-turn token.
    #[arg(long)]
    chat: bool,

    /// System prompt for --chat.
    #[arg(long, value_name = "TEXT", requires = "chat")]
    system: Option<String>,

    #[command(flatten)]
    sampling: SamplingArgs,

    #[command(flatten)]
    weights: WeightsArgs,

    #[command(flatten)]
    threads: ThreadArgs,
}

/// Decodes one generated token and writes the new text to `out` (when given): the step that
/// `generate` and `chat` share. A write error is kept in `error` and stops generation.
pub fn stream_token(
    decoder: &mut StreamDecoder<'_>,
    token: u32,
    out: Option<&mut dyn Write>,
    error: &mut Option<std::io::Error>,
) -> (String, Control) {
    let chunk = decoder.push(token);
    if let Some(out) = out {
        if let Err(e) = out
            .write_all(chunk.text.as_bytes())
            .and_then(|_| out.flush())
        {
            *error = Some(e);
            return (chunk.text, Control::Stop);
        }
    }
    let control = if chunk.stopped {
        Control::Stop
    } else {
        Control::Continue
    };
    (chunk.text, control)
}

/// A model directory's or GGUF file's network laid out for decoding (it only generates), in
/// the weights asked for (a GGUF file's own blocks by default), and tokenizer, checked
/// against each other; `--adapter` merged in.
pub fn load_model(
    path: &std::path::Path,
    weights: &WeightsArgs,
) -> Result<(kiem_engine::Gpt, Tokenizer, Vec<u32>)> {
    load_for_decoding(path, weights, weights.single_adapter()?.as_deref())
}

/// [`load_model`] with the adapter to merge given (`serve` serves its adapters unmerged).
pub fn load_for_decoding(
    path: &std::path::Path,
    weights: &WeightsArgs,
    adapter: Option<&std::path::Path>,
) -> Result<(kiem_engine::Gpt, Tokenizer, Vec<u32>)> {
    if weights.weights.is_none() && adapter.is_none() && kiem_engine::gguf::is_gguf(path) {
        let (gpt, tokenizer, ids) = kiem_train::model_source::load_gguf_decoding(path)?;
        return checked(path, gpt, tokenizer, ids);
    }
    let (mut gpt, tokenizer, stop_ids) = load_checked(path, adapter)?;
    gpt.use_compact_weights(weights.weights.unwrap_or_default());
    Ok((gpt, tokenizer, stop_ids))
}

/// A model directory's network (in its files' layout, with the LoRA adapter merged in when
/// given) and tokenizer, checked against each other, and the ids that end its text.
pub fn load_checked(
    dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> Result<(kiem_engine::Gpt, Tokenizer, Vec<u32>)> {
    let (mut gpt, tokenizer, ids) = kiem_train::model_source::load_model(dir)?;
    if let Some(adapter) = adapter {
        kiem_train::model_source::merge_adapter(&mut gpt, adapter)
            .with_context(|| format!("--adapter {}", adapter.display()))?;
    }
    checked(dir, gpt, tokenizer, ids)
}

/// The network and tokenizer checked against each other, and the ids that end the text.
fn checked(
    dir: &std::path::Path,
    mut gpt: kiem_engine::Gpt,
    tokenizer: Tokenizer,
    ids: kiem_engine::io::SpecialIds,
) -> Result<(kiem_engine::Gpt, Tokenizer, Vec<u32>)> {
    match tokenizer.vocab_size().cmp(&gpt.config.vocab_size) {
        std::cmp::Ordering::Greater => bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is only {}",
            dir.display(),
            tokenizer.vocab_size(),
            gpt.config.vocab_size
        ),
        // An embedding padded beyond the tokenizer (Qwen2.5): never generate the extra rows.
        std::cmp::Ordering::Less => gpt.limit_sampling_to(tokenizer.vocab_size())?,
        std::cmp::Ordering::Equal => {}
    }
    // Generation ends at any end-of-sequence id the model names, in config.json or
    // generation_config.json; kiem's own models end documents with the document token.
    let mut stop_ids = ids.eos;
    if dir.is_dir() {
        stop_ids.extend(kiem_engine::io::generation_eos(dir)?);
    }
    if stop_ids.is_empty() {
        stop_ids.push(tokenizer.bos_id());
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok((gpt, tokenizer, stop_ids))
}

pub fn run(args: GenerateArgs) -> Result<()> {
    args.threads.install()?;
    let (gpt, tokenizer, stop_ids) = load_model(&args.model, &args.weights)?;
    let prompt = match args.prompt {
        Some(p) => p,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("standard input is not UTF-8 text")?;
            text
        }
    };
    let (ids, stop_ids) = if args.chat {
        let stop_ids = kiem_tokenizer::chat::reply_stop_ids(&tokenizer, stop_ids)
            .map_err(|e| super::chat::not_a_chat_model(&args.model, e))?;
        let mut messages: Vec<Message> = args
            .system
            .iter()
            .map(|s| Message::new(Role::System, s.clone()))
            .collect();
        messages.push(Message::new(
            Role::User,
            prompt.trim_end_matches(['\r', '\n']),
        ));
        (render_prompt(&tokenizer, &messages)?, stop_ids)
    } else if args.no_bos {
        (tokenizer.encode(&prompt), stop_ids)
    } else {
        (tokenizer.encode_prompt(&prompt), stop_ids)
    };
    if ids.is_empty() {
        bail!("the prompt is empty; give --prompt TEXT");
    }
    if ids.len() >= gpt.config.context {
        bail!(
            "the prompt has {} tokens but the model's context is {}; shorten it",
            ids.len(),
            gpt.config.context
        );
    }
    let options = GenerateOptions {
        max_tokens: args.sampling.max_tokens,
        sampling: args.sampling.params()?,
        stop_ids,
    };
    let mut decoder = StreamDecoder::new(&tokenizer, &args.sampling.stops);
    let mut out = std::io::stdout().lock();
    let mut write_error = None;
    let result = gpt.generate(&[ids], &options, &mut |_, token| {
        stream_token(&mut decoder, token, Some(&mut out), &mut write_error).1
    })?;
    if let Some(e) = write_error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(e.into());
    }
    out.write_all(decoder.finish().as_bytes())?;
    if std::io::stdout().is_terminal() {
        writeln!(out)?;
    }
    let generation = &result[0];
    if generation.finish == FinishReason::Length && generation.tokens.len() < options.max_tokens {
        eprintln!(
            "(stopped at the model's context of {} tokens)",
            gpt.config.context
        );
    }
    Ok(())
}
