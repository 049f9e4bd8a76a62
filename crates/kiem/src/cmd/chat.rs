use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use kiem_engine::sampling::GenerateOptions;
use kiem_tokenizer::chat::{render_prompt, reply_stop_ids, Message, Role};
use kiem_tokenizer::stream::StreamDecoder;
use kiem_tokenizer::Tokenizer;

use super::generate::{load_model, stream_token, SamplingArgs, WeightsArgs};
use crate::ThreadArgs;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A chat model directory or GGUF file: one with a chat template (an instruct model), or
    /// one kiem fine-tuned for chat.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,

    /// System prompt that starts every conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,

    #[command(flatten)]
    sampling: SamplingArgs,

    #[command(flatten)]
    weights: WeightsArgs,

    #[command(flatten)]
    threads: ThreadArgs,
}

const HELP: &str = "commands: /reset starts over, /system TEXT sets the system prompt (and starts over), /exit quits";

/// The error for a model that cannot chat: no chat template and no chat tokens (or a broken
/// template, which `error` names).
pub fn not_a_chat_model(dir: &Path, error: kiem_tokenizer::TokenizerError) -> anyhow::Error {
    let hint = if Tokenizer::load(&dir.to_string_lossy())
        .ok()
        .is_some_and(|t| t.chat_template().is_some())
    {
        ""
    } else {
        ". It has no chat template and was not fine-tuned for chat: run `kiem finetune` on \
         conversations first"
    };
    anyhow::anyhow!("{}: {error}{hint}", dir.display())
}

/// A chat model: network, tokenizer, and the ids that end a reply.
pub struct ChatModel {
    pub gpt: kiem_engine::Gpt,
    pub tokenizer: kiem_tokenizer::Tokenizer,
    pub stop_ids: Vec<u32>,
}

impl ChatModel {
    pub fn load(dir: &Path, weights: WeightsArgs) -> Result<Self> {
        let (gpt, tokenizer, stop_ids) = load_model(dir, &weights)?;
        let stop_ids =
            reply_stop_ids(&tokenizer, stop_ids).map_err(|e| not_a_chat_model(dir, e))?;
        Ok(Self {
            gpt,
            tokenizer,
            stop_ids,
        })
    }

    /// Generates the assistant's next reply to `messages` (whose prompt must fit the context),
    /// streaming its text to `sink` when given.
    pub fn reply(
        &self,
        prompt: Vec<u32>,
        sampling: &SamplingArgs,
        mut sink: Option<&mut dyn Write>,
    ) -> Result<String> {
        let options = GenerateOptions {
            max_tokens: sampling.max_tokens,
            sampling: sampling.params()?,
            stop_ids: self.stop_ids.clone(),
        };
        let mut decoder = StreamDecoder::new(&self.tokenizer, &sampling.stops);
        let mut reply = String::new();
        let mut failed = None;
        self.gpt.generate(&[prompt], &options, &mut |_, token| {
            let out: Option<&mut dyn Write> = match &mut sink {
                Some(sink) => Some(&mut **sink),
                None => None,
            };
            let (text, control) = stream_token(&mut decoder, token, out, &mut failed);
            reply.push_str(&text);
            control
        })?;
        if let Some(e) = failed {
            bail!("cannot write the reply: {e}");
        }
        let rest = decoder.finish();
        if let Some(sink) = sink {
            sink.write_all(rest.as_bytes())?;
        }
        reply.push_str(&rest);
        Ok(reply)
    }
}

pub fn run(args: ChatArgs) -> Result<()> {
    args.threads.install()?;
    let model = ChatModel::load(&args.model, args.weights)?;
    let (gpt, tokenizer) = (&model.gpt, &model.tokenizer);
    let mut system = args.system.clone();
    let start = |system: &Option<String>| -> Vec<Message> {
        system
            .iter()
            .map(|s| Message::new(Role::System, s.clone()))
            .collect()
    };
    let mut messages = start(&system);
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let mut editor = if interactive {
        eprintln!("chatting with {} ({HELP})", args.model.display());
        Some(rustyline::DefaultEditor::new()?)
    } else {
        None
    };
    let mut lines = std::io::stdin().lock().lines();
    let mut out = std::io::stdout().lock();
    loop {
        let line = match editor.as_mut() {
            Some(editor) => match editor.readline("you> ") {
                Ok(line) => {
                    let _ = editor.add_history_entry(line.as_str());
                    line
                }
                Err(
                    rustyline::error::ReadlineError::Interrupted
                    | rustyline::error::ReadlineError::Eof,
                ) => break,
                Err(e) => return Err(e.into()),
            },
            None => match lines.next() {
                Some(line) => line?,
                None => break,
            },
        };
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            continue;
        }
        if line == "/exit" || line == "/quit" {
            break;
        }
        if line == "/reset" {
            messages = start(&system);
            if interactive {
                eprintln!("(conversation cleared)");
            }
            continue;
        }
        if let Some(text) = line.strip_prefix("/system") {
            let text = text.trim();
            system = (!text.is_empty()).then(|| text.to_string());
            messages = start(&system);
            if interactive {
                eprintln!(
                    "(system prompt {}; conversation cleared)",
                    if system.is_some() { "set" } else { "removed" }
                );
            }
            continue;
        }
        if line.starts_with('/') {
            eprintln!("unknown command {line:?}; {HELP}");
            continue;
        }
        messages.push(Message::new(Role::User, line));
        // Drop the oldest exchanges (keeping the system prompt) until the prompt leaves room.
        let first_turn = usize::from(system.is_some());
        let prompt = loop {
            let ids = render_prompt(tokenizer, &messages)?;
            if ids.len() + 16 <= gpt.config.context || messages.len() - first_turn <= 1 {
                break ids;
            }
            messages.drain(first_turn..first_turn + 2);
        };
        if prompt.len() >= gpt.config.context {
            messages.pop();
            eprintln!(
                "(that message is too long for the model's context of {} tokens)",
                gpt.config.context
            );
            continue;
        }
        if interactive {
            write!(out, "bot> ")?;
            out.flush()?;
        }
        let sink: Option<&mut dyn Write> = if interactive { Some(&mut out) } else { None };
        let reply = model.reply(prompt, &args.sampling, sink)?;
        if interactive {
            writeln!(out)?;
        } else {
            // One reply per line, so scripts can pair questions and answers.
            writeln!(out, "{}", reply.replace(['\r', '\n'], " ").trim())?;
        }
        out.flush()?;
        messages.push(Message::new(Role::Assistant, reply.trim().to_string()));
    }
    Ok(())
}
