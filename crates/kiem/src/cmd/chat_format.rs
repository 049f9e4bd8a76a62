use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use kiem_data::chat::{read_conversations, ChatFormat};
use kiem_data::corpus::BadRecords;
use kiem_tokenizer::chat::{render, TrainOn};

use super::report_bad_records;
use super::tokenizer::TokenizerArg;

#[derive(Subcommand, Debug)]
pub enum ChatFormatCommand {
    /// Print conversations as the model will see them (its chat template, or kiem's chat format),
    /// with the trained tokens marked.
    Show(ShowArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Auto,
    Openai,
    Sharegpt,
    Alpaca,
    PromptCompletion,
}

impl From<FormatArg> for ChatFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Auto => ChatFormat::Auto,
            FormatArg::Openai => ChatFormat::OpenAi,
            FormatArg::Sharegpt => ChatFormat::ShareGpt,
            FormatArg::Alpaca => ChatFormat::Alpaca,
            FormatArg::PromptCompletion => ChatFormat::PromptCompletion,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TrainOnArg {
    Assistant,
    All,
}

impl From<TrainOnArg> for TrainOn {
    fn from(t: TrainOnArg) -> Self {
        match t {
            TrainOnArg::Assistant => TrainOn::Assistant,
            TrainOnArg::All => TrainOn::All,
        }
    }
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// JSONL conversations (OpenAI messages, ShareGPT, Alpaca or prompt/completion; .gz/.zst ok).
    #[arg(long = "data", required = true, num_args = 1.., value_name = "FILE")]
    data: Vec<PathBuf>,

    #[command(flatten)]
    tokenizer: TokenizerArg,

    /// Record format (default: detected per record from its fields).
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,

    /// Which tokens are trained: assistant replies (with their end token) or everything.
    #[arg(long, value_enum, default_value = "assistant")]
    train_on: TrainOnArg,

    /// How many conversations to print.
    #[arg(long, default_value_t = 3, value_name = "N")]
    limit: usize,

    /// Skip malformed records (reporting how many) instead of stopping at the first.
    #[arg(long)]
    skip_bad_records: bool,
}

pub fn run(command: ChatFormatCommand) -> Result<()> {
    match command {
        ChatFormatCommand::Show(args) => show(args),
    }
}

fn show(args: ShowArgs) -> Result<()> {
    let (tokenizer, added) = kiem_tokenizer::chat::for_fine_tuning(args.tokenizer.load()?)?;
    match tokenizer.chat_template() {
        Some(template) if !kiem_tokenizer::chat::uses_typed_format(&tokenizer)? => println!(
            "rendered with the model's chat template ({})",
            template.origin.display()
        ),
        _ if added.is_empty() => println!("rendered in kiem's chat format"),
        _ => println!(
            "rendered in kiem's chat format, with the chat tokens fine-tuning adds ({})",
            added.join(" ")
        ),
    }
    let mut bad = BadRecords::default();
    let mut examples = Vec::new();
    for path in &args.data {
        examples.extend(read_conversations(
            path,
            args.format.into(),
            args.skip_bad_records,
            &mut bad,
        )?);
    }
    report_bad_records(&bad);
    let color = std::io::stdout().is_terminal();
    let (open, close) = if color {
        ("\x1b[1;32m", "\x1b[0m")
    } else {
        ("[[", "]]")
    };
    println!(
        "{} conversations; trained tokens are shown {}",
        examples.len(),
        if color {
            "in green"
        } else {
            "between [[ and ]]"
        }
    );
    let (mut total, mut trained_total) = (0usize, 0usize);
    for (n, example) in examples.iter().enumerate() {
        let rendered = render(&tokenizer, &example.messages, args.train_on.into())
            .map_err(|e| anyhow::anyhow!("{}: {e}", example.location))?;
        total += rendered.ids.len();
        trained_total += rendered.trained.iter().filter(|&&t| t).count();
        if n >= args.limit {
            continue;
        }
        println!(
            "\n--- {} ({} tokens, {} trained)",
            example.location,
            rendered.ids.len(),
            rendered.trained.iter().filter(|&&t| t).count()
        );
        let mut text = String::new();
        let mut in_span = false;
        for (&id, &trained) in rendered.ids.iter().zip(&rendered.trained) {
            if trained != in_span {
                text.push_str(if trained { open } else { close });
                in_span = trained;
            }
            text.push_str(&String::from_utf8_lossy(&tokenizer.decode_bytes(&[id])));
        }
        if in_span {
            text.push_str(close);
        }
        println!("{text}");
    }
    println!(
        "\n{} tokens in all, {} trained ({:.0}%)",
        total,
        trained_total,
        100.0 * trained_total as f64 / total.max(1) as f64
    );
    Ok(())
}
