//! Optional TOML config file (`--config FILE` or `SWARM_CONFIG`) for the command being run.
//!
//! Its keys are exactly the long flags of that command (`id`, `peer`, `data-dir`, the
//! global `log-format`), found by walking the clap definition, so a new flag is a new key
//! with nothing to keep in step. Precedence, highest first: command-line flag, `SWARM_*`
//! environment variable, config file, default.
//!
//! The type a key takes comes from its flag: `true`/`false` for a switch, an integer for
//! a number, a string for anything else (paths, durations, addresses, names). A flag that
//! can be repeated takes an array, one element per value (a lone scalar is a one-element
//! list); an element is always exactly one value, never split at the flag's `,` or `;`.
//! A flag with an optional value (`--wait`, `--watch`) also takes `true` for "given
//! without a value".
//!
//! How: the file's values for flags that neither the command line nor the environment
//! give become `--flag=value` arguments added to the command line, after each value was
//! checked with the flag's own value parser (so a bad value is reported against the file
//! and the key). Clap then parses them like typed flags, with their conflicts and required
//! flags; the value delimiter of a flag filled from the file is switched off, which is
//! what keeps an element one value.

use std::any::TypeId;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// The id of the global argument naming the config file.
const CONFIG_ARG: &str = "config";

/// `cmd` and the command line `args`, with the values of the `--config` file (if one is
/// given) for the flags of the command being run that `args` and the environment do not
/// give. Parse the result with `cmd.get_matches_from(args)`.
///
/// Errors name the file and the key: an unknown key (with the nearest valid one), a value
/// of the wrong type, a value the flag's parser rejects, an unreadable or invalid file.
pub fn with_config_file(
    cmd: Command,
    mut args: Vec<OsString>,
) -> anyhow::Result<(Command, Vec<OsString>)> {
    // A first, forgiving parse finds the file, the command being run, and which of its
    // flags the command line and the environment give already.
    let mut probe = cmd.clone().ignore_errors(true);
    probe.build();
    let Ok(matches) = probe.try_get_matches_from_mut(&args) else {
        // --help, --version: nothing to configure.
        return Ok((cmd, args));
    };
    let Some(path) = matches
        .get_raw(CONFIG_ARG)
        .and_then(|mut v| v.next())
        .map(PathBuf::from)
    else {
        return Ok((cmd, args));
    };
    let mut names = Vec::new();
    let (mut leaf, mut leaf_matches) = (&probe, &matches);
    while let Some((name, sub)) = leaf_matches.subcommand() {
        leaf = leaf
            .find_subcommand(name)
            .with_context(|| format!("no subcommand {name}"))?;
        names.push(name.to_string());
        leaf_matches = sub;
    }
    if names.is_empty() || leaf.has_subcommands() {
        // No command to configure: clap reports the missing subcommand.
        return Ok((cmd, args));
    }
    let command_name = format!("{} {}", probe.get_name(), names.join(" "));
    let file = ConfigFile {
        path: &path,
        command: &command_name,
    };
    let table = file.read()?;

    let mut added: Vec<OsString> = Vec::new();
    let mut undelimit = Vec::new();
    for (key, value) in table {
        let Some(arg) = config_keys(leaf).find(|a| a.get_long() == Some(key.as_str())) else {
            return Err(file.unknown_key(&key, leaf));
        };
        // Checked even when overridden: a wrong file is wrong.
        let values = file.values(arg, &key, value)?;
        if given(leaf_matches, arg) || values.is_empty() {
            continue;
        }
        for v in values {
            added.push(match v {
                Given::Bare => format!("--{key}").into(),
                Given::Value(v) => format!("--{key}={v}").into(),
            });
        }
        if arg.get_value_delimiter().is_some() {
            undelimit.push((arg.get_id().clone(), arg.is_global_set()));
        }
    }

    let mut cmd = cmd;
    for (id, global) in undelimit {
        cmd = if global {
            cmd.mut_arg(id, |a| a.value_delimiter(None))
        } else {
            undelimit_at(cmd, &names, &id)
        };
    }
    // The added flags go last, but before a `--` that ends the flags.
    let at = args
        .iter()
        .skip(1)
        .position(|a| a == "--")
        .map_or(args.len(), |i| i + 1);
    args.splice(at..at, added);
    Ok((cmd, args))
}

/// The arguments of `cmd` that a config file may set, by their long name: every long
/// flag but `--help`, `--version` and `--config`.
pub fn config_keys(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| {
        a.get_long().is_some()
            && !a.is_positional()
            && a.get_id() != CONFIG_ARG
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    })
}

/// Whether the command line or the environment gives `arg` already.
fn given(matches: &ArgMatches, arg: &Arg) -> bool {
    matches!(
        matches.value_source(arg.get_id().as_str()),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// `cmd` with the value delimiter of argument `id` of subcommand `path` switched off.
fn undelimit_at(cmd: Command, path: &[String], id: &clap::Id) -> Command {
    match path.split_first() {
        None => {
            if cmd.get_arguments().any(|a| a.get_id() == id) {
                cmd.mut_arg(id, |a| a.value_delimiter(None))
            } else {
                cmd
            }
        }
        Some((name, rest)) => cmd.mut_subcommand(name, |sub| undelimit_at(sub, rest, id)),
    }
}

/// One value of a flag, as it goes on the command line.
#[derive(Debug, PartialEq)]
enum Given {
    /// `--flag` (a switch that is on, or a flag with an optional value given none).
    Bare,
    /// `--flag=value`.
    Value(String),
}

/// What one value of a flag is in TOML.
#[derive(Clone, Copy)]
enum Kind {
    /// A switch (`--bootstrap`): `true` or `false`.
    Switch,
    /// A counted switch (`-vvv`): a non-negative integer.
    Count,
    Bool,
    Integer,
    Float,
    /// A string, described for error messages.
    Text(&'static str),
}

impl Kind {
    fn of(arg: &Arg) -> Kind {
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => return Kind::Switch,
            ArgAction::Count => return Kind::Count,
            _ => {}
        }
        let t = arg.get_value_parser().type_id();
        let is = |ids: &[TypeId]| ids.iter().any(|id| t == *id);
        if is(&[TypeId::of::<bool>()]) {
            Kind::Bool
        } else if is(&[
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<u128>(),
            TypeId::of::<usize>(),
            TypeId::of::<i8>(),
            TypeId::of::<i16>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
            TypeId::of::<i128>(),
            TypeId::of::<isize>(),
        ]) {
            Kind::Integer
        } else if is(&[TypeId::of::<f32>(), TypeId::of::<f64>()]) {
            Kind::Float
        } else if is(&[TypeId::of::<PathBuf>()]) {
            Kind::Text("a string (a path)")
        } else if is(&[TypeId::of::<Duration>()]) {
            Kind::Text("a string (a duration such as \"30s\")")
        } else if is(&[TypeId::of::<SocketAddr>()]) {
            Kind::Text("a string (an address such as \"127.0.0.1:7070\")")
        } else {
            Kind::Text("a string")
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Switch | Kind::Bool => "true or false",
            Kind::Count | Kind::Integer => "an integer",
            Kind::Float => "a number",
            Kind::Text(what) => what,
        }
    }
}

/// The file being applied, for reading it and for error messages.
struct ConfigFile<'a> {
    path: &'a Path,
    /// The command being run, e.g. `swarm coordinator`.
    command: &'a str,
}

impl ConfigFile<'_> {
    fn read(&self) -> anyhow::Result<toml::Table> {
        let text = std::fs::read_to_string(self.path)
            .with_context(|| format!("read config file {}", self.path.display()))?;
        text.parse()
            .with_context(|| format!("parse config file {}", self.path.display()))
    }

    fn error(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("config file {}: {msg}", self.path.display())
    }

    fn unknown_key(&self, key: &str, cmd: &Command) -> anyhow::Error {
        let hint = match nearest_key(key, cmd) {
            Some(k) => format!("; did you mean `{k}`?"),
            None => format!(
                " (keys are the long flags of `{}`, see --help)",
                self.command
            ),
        };
        self.error(format_args!(
            "unknown key `{key}` for `{}`{hint}",
            self.command
        ))
    }

    /// The values `value` gives flag `arg` (`key`), checked against the flag's type and
    /// value parser. Empty for a switch that is off and for an empty array.
    fn values(&self, arg: &Arg, key: &str, value: toml::Value) -> anyhow::Result<Vec<Given>> {
        let kind = Kind::of(arg);
        let list = matches!(arg.get_action(), ArgAction::Append)
            || arg.get_num_args().is_some_and(|r| r.max_values() > 1);
        let items = match value {
            toml::Value::Array(items) if list => items,
            toml::Value::Array(_) => {
                return Err(self.error(format_args!("`{key}` takes one value, not an array")))
            }
            scalar => vec![scalar],
        };
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let what = if list {
                format!("`{key}` element {}", i + 1)
            } else {
                format!("`{key}`")
            };
            let wrong = |item: &toml::Value| {
                let must = if list && i == 0 && !matches!(kind, Kind::Switch | Kind::Count) {
                    format!("{}, or an array of them", kind.describe())
                } else {
                    kind.describe().to_string()
                };
                self.error(format_args!("{what} must be {must}, not {}", a_type(item)))
            };
            let optional_value = arg.get_num_args().is_some_and(|r| r.min_values() == 0)
                && !matches!(kind, Kind::Switch | Kind::Count);
            let text = match (&item, kind) {
                (toml::Value::Boolean(on), Kind::Switch) => {
                    if *on {
                        out.push(Given::Bare);
                    }
                    continue;
                }
                (toml::Value::Integer(n), Kind::Count) if *n >= 0 => {
                    out.extend((0..*n).map(|_| Given::Bare));
                    continue;
                }
                (toml::Value::Boolean(on), _) if optional_value => {
                    if *on {
                        out.push(Given::Bare);
                    }
                    continue;
                }
                (toml::Value::Boolean(b), Kind::Bool) => b.to_string(),
                (toml::Value::Integer(n), Kind::Integer | Kind::Float) => n.to_string(),
                (toml::Value::Float(f), Kind::Float) => f.to_string(),
                (toml::Value::String(s), Kind::Text(_)) => s.clone(),
                _ => return Err(wrong(&item)),
            };
            if let Err(why) = check_value(arg, &text) {
                return Err(self.error(format_args!("{what} = {item}: {why}")));
            }
            out.push(Given::Value(text));
        }
        Ok(out)
    }
}

/// `value` run through `arg`'s own value parser: why it is not a valid value, if so.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let one = Arg::new(arg.get_id().clone())
        .value_parser(arg.get_value_parser().clone())
        .action(ArgAction::Set)
        .required(true);
    let parsed = Command::new("config")
        .disable_help_flag(true)
        .arg(one)
        .try_get_matches_from([OsString::from("config"), "--".into(), value.into()]);
    let Err(e) = parsed else {
        return Ok(());
    };
    if let Some(why) = std::error::Error::source(&e) {
        return Err(why.to_string());
    }
    match e.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(valid)) if !valid.is_empty() => {
            return Err(format!("expected one of {}", valid.join(", ")));
        }
        _ => {}
    }
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid value");
    Err(first.trim_start_matches("error: ").to_string())
}

/// "a string", "an integer", ... for error messages.
fn a_type(v: &toml::Value) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {t}")
}

/// The valid key closest to `key`: the key of the flag whose environment variable
/// `key` spells (`node-id` for `--id`, whose variable is `SWARM_NODE_ID`), else the
/// nearest spelling within a few edits.
fn nearest_key<'a>(key: &str, cmd: &'a Command) -> Option<&'a str> {
    let var = format!("SWARM_{}", key.to_ascii_uppercase().replace('-', "_"));
    if let Some(arg) = config_keys(cmd).find(|a| a.get_env().is_some_and(|e| e == var.as_str())) {
        return arg.get_long();
    }
    let limit = (key.chars().count() / 3).max(2);
    config_keys(cmd)
        .filter_map(|a| a.get_long())
        .map(|long| (edit_distance(key, long), long))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, long)| long)
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests;
