use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiem_data::corpus::{discover_inputs, DocumentStream};
use kiem_tokenizer::{Tokenizer, TrainOptions, SPECIAL_TOKENS};

use super::{cancel_flag, report_bad_records, CorpusArgs};
use crate::progress;
use crate::ThreadArgs;

#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (GPT-4-style pre-tokenization) on a corpus.
    Train(TrainArgs),
    /// Print the token ids of a text.
    Encode(EncodeArgs),
    /// Print the text of token ids.
    Decode(DecodeArgs),
    /// Describe a tokenizer: vocabulary size, special tokens, hash.
    Info(InfoArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    corpus: CorpusArgs,

    /// Vocabulary size including the 256 byte tokens and merges, 256..=131072. The special
    /// tokens (<|bos|>, chat roles) sit at ids 0..7 and come on top below 263.
    #[arg(long, value_name = "N")]
    vocab_size: usize,

    /// Where to write the tokenizer (Hugging Face tokenizer.json format).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// Never merge a pair of tokens seen fewer times than this.
    #[arg(long, default_value_t = 0, value_name = "N")]
    min_frequency: u64,

    /// Train on at most this many bytes of text (the first documents); 0 means all.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    max_bytes: u64,

    /// Replace --out if it exists.
    #[arg(long)]
    overwrite: bool,

    #[command(flatten)]
    threads: ThreadArgs,
}

/// The tokenizer to use: `gpt2` (the original GPT-2 BPE), a tokenizer.json, or a directory that
/// holds one (a data or model directory).
#[derive(Args, Debug)]
pub struct TokenizerArg {
    /// Tokenizer: `gpt2`, a tokenizer.json file, or a data/model directory holding one.
    #[arg(long, value_name = "T")]
    pub tokenizer: String,
}

impl TokenizerArg {
    pub fn load(&self) -> Result<Tokenizer> {
        let path = std::path::Path::new(&self.tokenizer);
        if kiem_engine::gguf::is_gguf(path) {
            return Ok(kiem_train::model_source::load_gguf_tokenizer(path)?);
        }
        Ok(Tokenizer::load(&self.tokenizer)?)
    }
}

#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    tokenizer: TokenizerArg,

    /// Text to encode (default: read standard input).
    #[arg(long, value_name = "TEXT", conflicts_with = "file")]
    text: Option<String>,

    /// File whose contents to encode.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,

    /// Print one line per token: id, then the token's text.
    #[arg(long)]
    pieces: bool,
}

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    tokenizer: TokenizerArg,

    /// Token ids, separated by spaces or commas, or as a JSON array (default: read standard
    /// input in the same forms).
    #[arg(value_name = "IDS")]
    ids: Vec<String>,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    tokenizer: TokenizerArg,
}

pub fn run(command: TokenizerCommand) -> Result<()> {
    match command {
        TokenizerCommand::Train(args) => train(args),
        TokenizerCommand::Encode(args) => encode(args),
        TokenizerCommand::Decode(args) => decode(args),
        TokenizerCommand::Info(args) => info(args),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let threads = args.threads.install()?;
    if !(kiem_tokenizer::MIN_VOCAB_SIZE..=kiem_tokenizer::MAX_VOCAB_SIZE).contains(&args.vocab_size)
    {
        bail!(
            "--vocab-size {} is out of range: choose {}..={}",
            args.vocab_size,
            kiem_tokenizer::MIN_VOCAB_SIZE,
            kiem_tokenizer::MAX_VOCAB_SIZE
        );
    }
    if args.out.exists() && !args.overwrite {
        bail!(
            "{} already exists; pass --overwrite to replace it",
            args.out.display()
        );
    }
    if args.out.is_dir() {
        bail!(
            "--out {} is a directory; give a file name such as tokenizer.json",
            args.out.display()
        );
    }
    let started = Instant::now();
    let discovered = discover_inputs(&args.corpus.inputs)?;
    if discovered.files.is_empty() {
        bail!("no readable input files in the given paths");
    }
    let files = discovered.files.len();
    let mut stream = DocumentStream::new(
        discovered.files,
        args.corpus.options(),
        args.corpus.skip_bad_records,
        cancel_flag(),
    );
    let read = stream.progress();
    let bar = progress::bytes_bar(read.bytes_total, "reading");
    let ticker = {
        let bar = bar.clone();
        let read = read.clone();
        move || bar.set_position(read.bytes_read.load(Ordering::Relaxed))
    };
    let max_bytes = if args.max_bytes == 0 {
        u64::MAX
    } else {
        args.max_bytes
    };
    let mut taken = 0u64;
    let mut texts = 0u64;
    let documents = stream.by_ref().take_while(|text| {
        ticker();
        if taken >= max_bytes {
            return false;
        }
        taken += text.len() as u64;
        texts += 1;
        true
    });
    let options = TrainOptions {
        vocab_size: args.vocab_size,
        min_frequency: args.min_frequency,
        show_progress: !progress::quiet() && std::io::stderr().is_terminal(),
    };
    let trained = kiem_tokenizer::train(documents, &options);
    bar.finish_and_clear();
    let stream = stream.finish()?;
    let tokenizer = trained?;
    report_bad_records(&stream.bad);
    if texts == 0 {
        bail!("empty corpus: no documents with text in the {files} input file(s)");
    }
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    tokenizer.save(&args.out)?;
    let seconds = started.elapsed().as_secs_f64();
    let wanted = args.vocab_size.max(256 + SPECIAL_TOKENS.len());
    if tokenizer.vocab_size() < wanted {
        eprintln!(
            "note: the corpus supports only {} tokens (asked for {}); there were no more pairs to merge",
            tokenizer.vocab_size(),
            args.vocab_size
        );
    }
    println!(
        "trained a {}-token tokenizer on {} documents ({:.1} MB of text from {files} file(s)) in \
         {seconds:.1}s with {threads} threads -> {}",
        tokenizer.vocab_size(),
        progress::count(texts),
        taken as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}

fn encode(args: EncodeArgs) -> Result<()> {
    let tokenizer = args.tokenizer.load()?;
    let text = match (&args.text, &args.file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?,
        (None, None) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("standard input is not UTF-8 text")?;
            text
        }
    };
    let ids = tokenizer.encode(&text);
    let mut out = std::io::stdout().lock();
    if args.pieces {
        for &id in &ids {
            let piece = String::from_utf8_lossy(&tokenizer.decode_bytes(&[id])).into_owned();
            writeln!(out, "{id}\t{piece:?}")?;
        }
    } else {
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    }
    Ok(())
}

/// Parses ids written as `1 2 3`, `1,2,3` or `[1, 2, 3]`.
fn parse_ids(text: &str) -> Result<Vec<u32>> {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("`{s}` is not a token id (a non-negative integer)"))
        })
        .collect()
}

fn decode(args: DecodeArgs) -> Result<()> {
    let tokenizer = args.tokenizer.load()?;
    let text = if args.ids.is_empty() {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read ids from standard input")?;
        text
    } else {
        args.ids.join(" ")
    };
    let ids = parse_ids(&text)?;
    let decoded = tokenizer.decode(&ids)?;
    let mut out = std::io::stdout().lock();
    out.write_all(decoded.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn info(args: InfoArgs) -> Result<()> {
    let tokenizer = args.tokenizer.load()?;
    println!("source:      {}", tokenizer.source());
    println!("vocab size:  {}", tokenizer.vocab_size());
    println!("bos id:      {}", tokenizer.bos_id());
    let prefix: Vec<String> = tokenizer
        .prompt_prefix()
        .iter()
        .map(|&id| format!("{id}={}", tokenizer.id_to_token(id).unwrap_or_default()))
        .collect();
    println!(
        "prompts:     {}",
        if prefix.is_empty() {
            "start with the text (no BOS)".to_string()
        } else {
            format!("start with {}", prefix.join(" "))
        }
    );
    let specials: Vec<String> = (0..tokenizer.vocab_size() as u32)
        .filter(|&id| tokenizer.is_special(id))
        .map(|id| format!("{id}={}", tokenizer.id_to_token(id).unwrap_or_default()))
        .collect();
    println!("specials:    {}", specials.join(" "));
    let typed = kiem_tokenizer::chat::uses_typed_format(&tokenizer);
    let chat = match (tokenizer.chat_template(), &typed) {
        (_, Err(e)) => format!("broken: {e}"),
        (Some(template), Ok(false)) => {
            format!("the model's template ({})", template.origin.display())
        }
        _ => "kiem's chat format".to_string(),
    };
    let end = kiem_tokenizer::chat::end_of_turn(&tokenizer)
        .map(|id| {
            format!(
                "; replies end at {id}={}",
                tokenizer.id_to_token(id).unwrap_or_default()
            )
        })
        .unwrap_or_else(|_| "; no chat tokens yet (fine-tuning adds them)".into());
    println!(
        "chat:        {chat}{}",
        if typed.is_ok() { end } else { String::new() }
    );
    println!("hash:        {}", tokenizer.hash());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ids;

    #[test]
    fn ids_in_every_accepted_form() {
        assert_eq!(parse_ids("1 2 3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_ids("[1, 2,3]\n").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_ids("").unwrap(), Vec::<u32>::new());
        assert!(parse_ids("1 -2").unwrap_err().to_string().contains("-2"));
    }
}
