use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {}
}
