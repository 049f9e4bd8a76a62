//! `kiem`: from raw text to a chatting, served GPT.

mod allocator;
mod cmd;
mod config;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator;

#[derive(Parser, Debug)]
#[command(
    name = "kiem",
    version,
    about = "From raw text to a chatting, served GPT: train a tokenizer, prepare token shards, \
             pre-train a GPT, fine-tune it on conversations, generate, chat and serve. \
             Start with `kiem demo`.",
    after_help = "Every flag can also come from a TOML file given with --config: its keys are the \
                  flag names (`vocab-size = 4096` or `vocab_size = 4096`); flags typed on the \
                  command line win over the file."
)]
struct Cli {
    /// TOML file whose keys are flags of the command being run; command-line flags win.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only errors and final results.
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The whole recipe on embedded data: tokenizer, pre-training, chat fine-tuning, answers.
    Demo(Box<cmd::demo::DemoArgs>),
    /// Train, inspect and use tokenizers.
    #[command(subcommand)]
    Tokenizer(cmd::tokenizer::TokenizerCommand),
    /// Turn a text corpus into token shards for training.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Inspect how conversations are rendered for fine-tuning.
    #[command(subcommand)]
    ChatFormat(cmd::chat_format::ChatFormatCommand),
    /// Pre-train a GPT on token shards (or continue a run with --resume).
    Pretrain(Box<cmd::pretrain::PretrainArgs>),
    /// Fine-tune a model on conversations or prompt/completion pairs.
    Finetune(Box<cmd::finetune::FinetuneArgs>),
    /// Talk to a fine-tuned chat model (reads one message per line when not on a terminal).
    Chat(Box<cmd::chat::ChatArgs>),
    /// Continue a prompt with a trained model, streaming the text to standard output.
    Generate(Box<cmd::generate::GenerateArgs>),
    /// Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.
    Serve(Box<cmd::serve::ServeArgs>),
    /// Score a model on benchmark tasks (as lm-evaluation-harness does), texts and chats.
    Eval(Box<cmd::eval::EvalArgs>),
    /// Write a model for other tools: GGUF for llama.cpp.
    Export(Box<cmd::export::ExportArgs>),
    /// Merge a LoRA adapter into its base model's weights and write the merged model.
    Merge(cmd::merge::MergeArgs),
    /// Measure kiem's speed against reference implementations.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

/// Threads for the parallel parts of a command.
#[derive(Args, Debug, Clone)]
pub struct ThreadArgs {
    /// Worker threads (default: the number of physical cores, divided between the processes of
    /// a job that share the machine).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Physical cores (hyper-threads share one core's arithmetic units, so numeric work gains
/// nothing from them), falling back to the logical count.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let mut physical = "";
    for line in info.lines() {
        if let Some((key, value)) = line.split_once(':') {
            match key.trim() {
                "physical id" => physical = value.trim(),
                "core id" => {
                    cores.insert((physical.to_string(), value.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    // A container may see fewer CPUs than the machine has cores.
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

/// `--precision` of the training commands: fp32, bf16, or auto (resolved here, so the run
/// records the precision it used).
pub fn parse_training_precision(
    value: &str,
) -> Result<kiem_engine::kernels::MatmulPrecision, String> {
    match value {
        "auto" => Ok(kiem_engine::kernels::MatmulPrecision::fastest_available()),
        other => other
            .parse()
            .map_err(|_| format!("unknown precision {other:?} (expected fp32, bf16 or auto)")),
    }
}

impl ThreadArgs {
    /// Sizes the global rayon pool; returns the thread count in use. The pool is built once
    /// per process: later calls (`kiem demo` runs several commands) keep it.
    pub fn install(&self) -> anyhow::Result<usize> {
        static INSTALLED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let threads = self
            .threads
            .unwrap_or_else(|| (physical_cores() / kiem_dist::local_ranks()).max(1));
        if threads == 0 || threads > 1024 {
            anyhow::bail!("--threads {threads} is out of range: choose 1..=1024");
        }
        if let Some(&installed) = INSTALLED.get() {
            return Ok(installed);
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {threads} worker threads: {e}"))?;
        Ok(*INSTALLED.get_or_init(|| threads))
    }
}

fn main() -> ExitCode {
    let argv: Vec<_> = std::env::args_os().collect();
    let command = Cli::command();
    let argv = match config::apply_config_file(&command, argv) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let matches = command.get_matches_from(argv);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(cli.verbose, cli.quiet);
    progress::set_quiet(cli.quiet);
    if let Err(e) = join_job(&cli.command) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    cmd::install_interrupt_handler();
    let world = kiem_dist::world();
    // A panic in one process of a job must end the others, not leave them waiting in a
    // collective for it.
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_command(cli.command)));
    let code = match result {
        Ok(Ok(())) => {
            #[cfg(feature = "mpi")]
            kiem_dist::mpi_world::finalize();
            return ExitCode::SUCCESS;
        }
        Ok(Err(e)) if cmd::interrupted() => {
            eprintln!("interrupted{}: {e:#}", rank_label(world));
            130
        }
        Ok(Err(e)) => {
            eprintln!("error{}: {e:#}", rank_label(world));
            1
        }
        // The panic hook has printed the message.
        Err(_) => 101,
    };
    if world.size() > 1 {
        world.abort(code);
    }
    ExitCode::from(code as u8)
}

/// " (rank r of n)" in a job of several processes, else nothing.
fn rank_label(world: &dyn kiem_dist::Collective) -> String {
    if world.size() > 1 {
        format!(" (rank {} of {})", world.rank(), world.size())
    } else {
        String::new()
    }
}

/// Joins the job's other processes when a launcher (`mpirun -n N`) started several: only the
/// training commands and `data prepare` divide their work between processes.
fn join_job(command: &Command) -> anyhow::Result<()> {
    let Some(ranks) = kiem_dist::launched_ranks().filter(|&n| n > 1) else {
        return Ok(());
    };
    let parallel = matches!(
        command,
        Command::Pretrain(_)
            | Command::Finetune(_)
            | Command::Data(cmd::data::DataCommand::Prepare(_))
    );
    if !parallel {
        anyhow::bail!(
            "launched as one of {ranks} processes (mpirun), but only `kiem pretrain`, `kiem finetune` \
             and `kiem data prepare` run as a job of several processes: run this command once, \
             without mpirun"
        );
    }
    #[cfg(feature = "mpi")]
    {
        let world = kiem_dist::mpi_world::init().map_err(anyhow::Error::msg)?;
        if kiem_dist::Collective::size(&world) != ranks {
            anyhow::bail!(
                "the launcher started {ranks} processes but MPI reports {}: this kiem was built \
                 against another MPI than the mpirun that launched it",
                kiem_dist::Collective::size(&world)
            );
        }
        kiem_dist::install(Box::new(world)).map_err(anyhow::Error::msg)?;
        Ok(())
    }
    #[cfg(not(feature = "mpi"))]
    anyhow::bail!(
        "launched as one of {ranks} processes (mpirun), but this kiem was built without MPI: \
         rebuild it with `cargo build --release --features mpi` (needs Open MPI or MPICH and \
         libclang)"
    )
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(c) => cmd::demo::run(*c),
        Command::Tokenizer(c) => cmd::tokenizer::run(c),
        Command::Data(c) => cmd::data::run(c),
        Command::ChatFormat(c) => cmd::chat_format::run(c),
        Command::Pretrain(c) => cmd::pretrain::run(*c),
        Command::Generate(c) => cmd::generate::run(*c),
        Command::Chat(c) => cmd::chat::run(*c),
        Command::Serve(c) => cmd::serve::run(*c),
        Command::Eval(c) => cmd::eval::run(*c),
        Command::Export(c) => cmd::export::run(*c),
        Command::Merge(c) => cmd::merge::run(c),
        Command::Finetune(c) => cmd::finetune::run(*c),
        Command::Bench(c) => cmd::bench::run(c),
    }
}

/// Runs a kiem command line in this process, as if typed (`kiem demo` is made of them).
pub(crate) fn run_command_line<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> anyhow::Result<()> {
    let argv = std::iter::once(std::ffi::OsStr::new("kiem")).chain(args.iter().map(|a| a.as_ref()));
    let cli = Cli::try_parse_from(argv)?;
    run_command(cli.command)
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => tracing::Level::ERROR,
        (false, 0) => tracing::Level::INFO,
        (false, 1) => tracing::Level::DEBUG,
        (false, _) => tracing::Level::TRACE,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
}
