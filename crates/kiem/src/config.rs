//! `--config FILE`: a TOML file whose keys are the flags of the command being run.
//!
//! The file's entries are turned into ordinary command-line arguments and inserted right after
//! the subcommand, so clap validates them exactly like typed flags. A flag given on the command
//! line wins over the same key in the file.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Command};

/// Returns `argv` with the entries of the `--config` file (if any) spliced in.
pub fn apply_config_file(root: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(config_path) = find_config_path(&argv) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read config file {}", config_path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {} is not valid TOML", config_path.display()))?;

    // Walk the subcommand chain to the command the flags belong to.
    let mut command = root;
    let mut insert_at = 1;
    let mut path = vec![root.get_name().to_string()];
    let mut i = 1;
    while i < argv.len() {
        let token = argv[i].to_string_lossy();
        if token == "--config" {
            i += 2;
            continue;
        }
        if token.starts_with('-') {
            i += 1;
            continue;
        }
        match command.find_subcommand(token.as_ref()) {
            Some(sub) => {
                command = sub;
                path.push(token.into_owned());
                insert_at = i + 1;
                i += 1;
            }
            None => break,
        }
    }
    let command_name = path.join(" ");
    if command.has_subcommands() {
        bail!(
            "config file {} needs a command to apply to: `{command_name}` has subcommands",
            config_path.display()
        );
    }
    let given_on_command_line: Vec<String> = argv[insert_at..]
        .iter()
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect();

    let mut injected = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        let where_ = || format!("config file {}, key `{key}`", config_path.display());
        if name == "config" {
            bail!(
                "{}: a config file cannot name another config file",
                where_()
            );
        }
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()))
        else {
            let known: Vec<&str> = command
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config" && *l != "help")
                .collect();
            bail!(
                "{}: `{command_name}` has no flag --{name} (its flags: {})",
                where_(),
                known.join(", ")
            );
        };
        if given_on_command_line.contains(&name) {
            continue;
        }
        let flag = format!("--{name}");
        match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(b)) => {
                if *b {
                    injected.push(OsString::from(&flag));
                }
            }
            (ArgAction::SetTrue, _) => bail!("{}: expected true or false", where_()),
            (_, toml::Value::Array(items)) => {
                for item in items {
                    injected.push(OsString::from(format!("{flag}={}", scalar(item, &where_)?)));
                }
            }
            (_, value) => injected.push(OsString::from(format!(
                "{flag}={}",
                scalar(value, &where_)?
            ))),
        }
    }
    let mut out = argv;
    out.splice(insert_at..insert_at, injected);
    Ok(out)
}

fn scalar(value: &toml::Value, where_: &dyn Fn() -> String) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "{}: expected a string, number or boolean, found {}",
            where_(),
            other.type_str()
        ),
    })
}

fn find_config_path(argv: &[OsString]) -> Option<std::path::PathBuf> {
    let mut iter = argv.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--" {
            return None;
        }
        if arg == "--config" {
            return iter.next().map(|p| Path::new(p).to_path_buf());
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(Path::new(path).to_path_buf());
        }
    }
    None
}
