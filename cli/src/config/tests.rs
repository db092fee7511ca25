use std::any::TypeId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, CommandFactory, FromArgMatches};

use super::*;
use crate::args::{Cli, Cmd, LogFormat};

/// Parse `args` (after `swarm`) with the config file `text`; `{config}` in `args` is the
/// file's path.
fn parse_with(text: &str, args: &[&str]) -> anyhow::Result<ArgMatches> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swarm.toml");
    std::fs::write(&path, text).unwrap();
    let mut argv: Vec<OsString> = vec!["swarm".into()];
    argv.extend(
        args.iter()
            .map(|a| OsString::from(a.replace("{config}", path.to_str().unwrap()))),
    );
    let (cmd, argv) = with_config_file(Cli::command(), argv)?;
    Ok(cmd.try_get_matches_from(argv)?)
}

fn cli_with(text: &str, args: &[&str]) -> anyhow::Result<Cli> {
    Ok(Cli::from_arg_matches(&parse_with(text, args)?)?)
}

const COORDINATOR: &[&str] = &[
    "coordinator",
    "--data-dir",
    "d",
    "--certs",
    "c",
    "--config",
    "{config}",
];

fn coordinator(text: &str, extra: &[&str]) -> anyhow::Result<crate::args::CoordinatorArgs> {
    let args: Vec<&str> = COORDINATOR.iter().chain(extra).copied().collect();
    match cli_with(text, &args)?.cmd {
        Cmd::Coordinator(a) => Ok(*a),
        _ => unreachable!(),
    }
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Every leaf command of `cmd` (the ones that run), with its path of subcommand names.
fn leaves<'a>(cmd: &'a Command, path: Vec<String>, out: &mut Vec<(Vec<String>, &'a Command)>) {
    if !cmd.has_subcommands() {
        out.push((path, cmd));
        return;
    }
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut p = path.clone();
        p.push(sub.get_name().to_string());
        leaves(sub, p, out);
    }
}

/// A valid sample value for `arg` (the `i`th, for lists), chosen from the argument's own
/// definition, as TOML and as it must reach the parsed arguments.
fn sample(arg: &Arg, i: usize) -> (toml::Value, String) {
    let long = arg.get_long().unwrap_or("positional");
    let t = arg.get_value_parser().type_id();
    let is = |ids: &[TypeId]| ids.iter().any(|id| t == *id);
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .map(|p| p.get_name().to_string())
        .collect();
    if !possible.is_empty() && !is(&[TypeId::of::<bool>()]) {
        // The last one, which is not the default of any flag here.
        let v = possible.last().unwrap().clone();
        (toml::Value::String(v.clone()), v)
    } else if is(&[
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i32>(),
    ]) {
        let n = 7 + i as i64;
        (toml::Value::Integer(n), n.to_string())
    } else if is(&[TypeId::of::<Duration>()]) {
        let v = format!("{}s", 7 + i);
        (toml::Value::String(v.clone()), v)
    } else if is(&[TypeId::of::<SocketAddr>()]) {
        let v = format!("127.0.0.1:{}", 7000 + i);
        (toml::Value::String(v.clone()), v)
    } else if is(&[TypeId::of::<PathBuf>()]) {
        let v = format!("/tmp/swarm-config-{long}-{i}");
        (toml::Value::String(v.clone()), v)
    } else {
        assert!(
            is(&[TypeId::of::<String>()]),
            "--{long}: no sample value for its type yet, add one"
        );
        // Both delimiters the flags use: an element must stay one value.
        let v = format!("{long} {i},x;y");
        (toml::Value::String(v.clone()), v)
    }
}

/// Flags a command needs that clap does not mark required (`required_unless_present`),
/// unless the key tested is one of the listed.
const ALSO_NEEDED: &[(&str, &str, &[&str])] = &[
    ("memory upsert", "--id=p1", &["id", "file"]),
    ("swarms budget", "--tokens=5", &["tokens", "clear"]),
    ("schedules create", "--every=2s", &["every", "cron"]),
    ("limits set", "--rate=5/s", &["rate"]),
];

#[test]
fn every_long_flag_of_every_command_is_a_config_key() {
    let mut cmd = Cli::command();
    cmd.build();
    let mut all = Vec::new();
    leaves(&cmd, Vec::new(), &mut all);
    let mut checked = std::collections::BTreeSet::new();
    for (path, leaf) in &all {
        let name = path.join(" ");
        for arg in config_keys(leaf) {
            let long = arg.get_long().unwrap();
            let id = arg.get_id().as_str();
            if arg.get_env().is_some_and(|v| std::env::var_os(v).is_some()) {
                // The environment beats the file: nothing to see from here.
                continue;
            }
            let list = matches!(arg.get_action(), ArgAction::Append);
            let switch = matches!(arg.get_action(), ArgAction::SetTrue);
            let (value, expected) = if switch {
                (toml::Value::Boolean(true), vec!["true".to_string()])
            } else if list {
                let (a, ea) = sample(arg, 0);
                let (b, eb) = sample(arg, 1);
                (toml::Value::Array(vec![a, b]), vec![ea, eb])
            } else {
                let (v, e) = sample(arg, 0);
                (v, vec![e])
            };
            let mut table = toml::Table::new();
            table.insert(long.to_string(), value);
            let text = toml::to_string(&table).unwrap();

            let mut args: Vec<String> = path.clone();
            for p in leaf.get_positionals().filter(|p| p.is_required_set()) {
                args.push(sample(p, 0).1);
            }
            for other in config_keys(leaf) {
                if other.is_required_set() && other.get_id() != arg.get_id() {
                    args.push(format!(
                        "--{}={}",
                        other.get_long().unwrap(),
                        sample(other, 0).1
                    ));
                }
            }
            for (cmd_name, flag, unless) in ALSO_NEEDED {
                if *cmd_name == name && !unless.contains(&long) {
                    args.push(flag.to_string());
                }
            }
            args.extend(["--config".into(), "{config}".into()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();

            let matches = parse_with(&text, &args)
                .unwrap_or_else(|e| panic!("swarm {name}: `{text}`: {e:#}"));
            Cli::from_arg_matches(&matches)
                .unwrap_or_else(|e| panic!("swarm {name}: `{text}`: {e}"));
            let mut m = &matches;
            for p in path {
                m = m.subcommand_matches(p).unwrap();
            }
            let got: Vec<String> = m
                .get_raw(id)
                .unwrap_or_else(|| panic!("swarm {name}: `{text}` gave no --{long}"))
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            assert_eq!(got, expected, "swarm {name}: `{text}`");
            checked.insert(format!("{name} {long}"));
        }
    }
    for must in [
        "coordinator id",
        "coordinator peer",
        "coordinator join",
        "coordinator bootstrap",
        "coordinator data-dir",
        "coordinator log-format",
        "worker coordinator",
        "worker labels",
        "worker id",
        "up workers",
        "certs init san",
        "submit wait",
        "submit label",
        "submit priority",
        "status watch",
        "memory upsert ttl",
        "swarms create labels",
        "backup out",
        "probe api",
        "task list desc",
        "task list label",
        "task list text",
        "workers drain api",
        "workers resume json",
    ] {
        assert!(
            checked.contains(must),
            "{must} not checked; checked: {checked:?}"
        );
    }
    assert!(checked.len() > 100, "only {} keys checked", checked.len());
}

#[test]
fn a_list_stays_a_list() {
    let a = coordinator("peer = [\"2=a:1\", \"3=b:2\"]\n", &[]).unwrap();
    assert_eq!(a.peers, ["2=a:1", "3=b:2"]);
    // An element is one value even when it holds the flag's delimiter (`;` for --peer,
    // `,` for --join).
    let a = coordinator(
        "peer = [\"2=a:1,a:2\", \"3=b:1;x\"]\njoin = [\"http://a:1,http://b:1\"]\n",
        &[],
    );
    let a = a.unwrap();
    assert_eq!(a.peers, ["2=a:1,a:2", "3=b:1;x"]);
    assert_eq!(a.join, ["http://a:1,http://b:1"]);
    // A scalar is a one-element list.
    let a = coordinator("peer = \"2=a:1,a:2\"\n", &[]).unwrap();
    assert_eq!(a.peers, ["2=a:1,a:2"]);
    // The command line still splits at the delimiter.
    let a = coordinator("", &["--peer", "2=a:1,a:2;3=b:1,b:2"]).unwrap();
    assert_eq!(a.peers, ["2=a:1,a:2", "3=b:1,b:2"]);
    let w = cli_with(
        "coordinator = [\"c1:7070\", \"c2:7070\"]\ncerts = \"certs\"\nlabels = [\"gpu=yes\", \"zone=a\"]\n",
        &["worker", "--config", "{config}"],
    )
    .unwrap();
    let Cmd::Worker(w) = w.cmd else {
        unreachable!()
    };
    assert_eq!(w.coordinator, ["c1:7070", "c2:7070"]);
    assert_eq!(w.labels, ["gpu=yes", "zone=a"]);
    assert_eq!(w.certs, PathBuf::from("certs"));
}

#[test]
fn a_flag_overrides_the_file() {
    let text = "id = 5\npeer = [\"2=a:1,a:2\", \"3=b:1,b:2\"]\nadvertise = \"file:7070\"\n";
    let a = coordinator(text, &[]).unwrap();
    assert_eq!(
        (a.id, a.peers.len(), a.advertise.as_str()),
        (5, 2, "file:7070")
    );
    let a = coordinator(text, &["--id", "7", "--peer", "4=c:1,c:2"]).unwrap();
    assert_eq!(a.id, 7);
    assert_eq!(
        a.peers,
        ["4=c:1,c:2"],
        "a list on the command line replaces the file's"
    );
    assert_eq!(a.advertise, "file:7070");
    // Also as `--flag=value`, and for a global flag given before the command.
    let c = cli_with(
        "log-format = \"json\"\n",
        &["--log-format=human", "status", "--config={config}"],
    )
    .unwrap();
    assert!(matches!(c.log_format, LogFormat::Human));
    let c = cli_with(
        "log-format = \"json\"\n",
        &["status", "--config", "{config}"],
    )
    .unwrap();
    assert!(matches!(c.log_format, LogFormat::Json));
}

#[test]
fn switches_and_optional_values() {
    let a = coordinator("bootstrap = true\n", &[]).unwrap();
    assert!(a.bootstrap);
    let a = coordinator("bootstrap = false\n", &[]).unwrap();
    assert!(!a.bootstrap);
    // Clap's own rules hold for the file's flags.
    let e = err_text(coordinator(
        "bootstrap = true\njoin = [\"http://a:1\"]\n",
        &[],
    ));
    assert!(e.contains("cannot be used with"), "{e}");

    let submit = |text: &str| match cli_with(text, &["submit", "--config", "{config}"])
        .unwrap()
        .cmd
    {
        Cmd::Submit(s) => s,
        _ => unreachable!(),
    };
    assert_eq!(submit("wait = true\n").wait.as_deref(), Some("60s"));
    assert_eq!(submit("wait = \"5s\"\n").wait.as_deref(), Some("5s"));
    assert_eq!(submit("wait = false\n").wait, None);
    assert_eq!(submit("priority = -3\n").priority, -3);
    let status = |text: &str| match cli_with(text, &["status", "--config", "{config}"])
        .unwrap()
        .cmd
    {
        Cmd::Status(s) => s.watch,
        _ => unreachable!(),
    };
    assert_eq!(status("watch = true\n"), Some(1));
    assert_eq!(status("watch = 9\n"), Some(9));
}

#[test]
fn unknown_keys_are_errors_naming_the_file_and_the_nearest_key() {
    let e = err_text(coordinator("peers = [\"2=a:1,a:2\"]\n", &[]));
    assert!(e.contains("swarm.toml"), "{e}");
    assert!(
        e.contains("unknown key `peers` for `swarm coordinator`"),
        "{e}"
    );
    assert!(e.contains("did you mean `peer`?"), "{e}");
    // A key spelt like the flag's environment variable (SWARM_NODE_ID).
    let e = err_text(coordinator("node-id = 2\n", &[]));
    assert!(
        e.contains("unknown key `node-id`") && e.contains("did you mean `id`?"),
        "{e}"
    );
    let e = err_text(coordinator("datadir = \"x\"\n", &[]));
    assert!(e.contains("did you mean `data-dir`?"), "{e}");
    let e = err_text(coordinator("completely-else = 1\n", &[]));
    assert!(
        e.contains("unknown key `completely-else`") && e.contains("see --help"),
        "{e}"
    );
    // A flag of another command is not a key of this one.
    let e = err_text(coordinator("slots = 4\n", &[]));
    assert!(
        e.contains("unknown key `slots` for `swarm coordinator`"),
        "{e}"
    );
    // Neither is --config, nor a positional argument.
    let e = err_text(coordinator("config = \"x.toml\"\n", &[]));
    assert!(e.contains("unknown key `config`"), "{e}");
    let e = err_text(cli_with(
        "name = \"c\"\n",
        &["memory", "info", "c", "--config", "{config}"],
    ));
    assert!(
        e.contains("unknown key `name` for `swarm memory info`"),
        "{e}"
    );
}

#[test]
fn wrong_types_and_values_are_errors() {
    for (text, wants) in [
        (
            "data-dir = 5\n",
            "`data-dir` must be a string (a path), not an integer",
        ),
        (
            "listen = { a = 1 }\n",
            "`listen` must be a string (an address",
        ),
        ("id = \"2\"\n", "`id` must be an integer, not a string"),
        ("id = [1, 2]\n", "`id` takes one value, not an array"),
        (
            "bootstrap = \"yes\"\n",
            "`bootstrap` must be true or false, not a string",
        ),
        (
            "peer = [\"2=a:1,a:2\", 3]\n",
            "`peer` element 2 must be a string, not an integer",
        ),
        (
            "peer = { x = 1 }\n",
            "`peer` element 1 must be a string, or an array of them, not a table",
        ),
        (
            "lease = 5\n",
            "`lease` must be a string (a duration such as \"30s\"), not an integer",
        ),
        ("lease = \"soon\"\n", "`lease` = \"soon\": "),
        (
            "listen = \"nowhere\"\n",
            "`listen` = \"nowhere\": invalid socket address syntax",
        ),
        (
            "llm-concurrency = 0\n",
            "`llm-concurrency` = 0: 0 is not in 1..=1024",
        ),
        (
            "distill = \"maybe\"\n",
            "`distill` = \"maybe\": expected one of agent, rules, llm, off",
        ),
        ("id = -1\n", "`id` = -1: "),
        ("id = 1.5\n", "`id` must be an integer, not a float"),
        ("data-dir = \"\"\n", "`data-dir` = \"\": must not be empty"),
    ] {
        let e = err_text(coordinator(text, &[]));
        assert!(e.starts_with("config file "), "{text}: {e}");
        assert!(e.contains("swarm.toml: "), "{text}: {e}");
        assert!(e.contains(wants), "{text}: {e}\nwants: {wants}");
    }
    // A bad value is an error even where a flag overrides it.
    let e = err_text(coordinator("id = \"x\"\n", &["--id", "3"]));
    assert!(e.contains("`id` must be an integer"), "{e}");
}

#[test]
fn bad_files() {
    let e = err_text(coordinator("id = [\n", &[]));
    assert!(
        e.contains("parse config file") && e.contains("swarm.toml"),
        "{e}"
    );
    let e = err_text(cli_with(
        "",
        &["status", "--config", "/nonexistent/swarm.toml"],
    ));
    assert!(
        e.contains("read config file /nonexistent/swarm.toml"),
        "{e}"
    );
}

#[test]
fn without_a_config_file_nothing_changes() {
    let argv: Vec<OsString> = ["swarm", "status", "--json"].map(OsString::from).into();
    let (_, out) = with_config_file(Cli::command(), argv.clone()).unwrap();
    assert_eq!(out, argv);
    // --help and a missing command are left to clap.
    for args in [&["swarm", "--help"][..], &["swarm", "--config", "x.toml"]] {
        let argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        let (_, out) = with_config_file(Cli::command(), argv.clone()).unwrap();
        assert_eq!(out, argv);
    }
}

#[test]
fn added_flags_go_before_a_double_dash() {
    let m = parse_with(
        "api = \"http://x:1\"\n",
        &[
            "memory",
            "delete",
            "c",
            "--config",
            "{config}",
            "--",
            "--id-like",
        ],
    )
    .unwrap();
    let (_, m) = m.subcommand().unwrap();
    let (_, m) = m.subcommand().unwrap();
    assert_eq!(m.get_one::<String>("api").unwrap(), "http://x:1");
    let ids: Vec<&String> = m.get_many::<String>("ids").unwrap().collect();
    assert_eq!(ids, ["--id-like"]);
}

#[test]
fn edit_distances() {
    assert_eq!(edit_distance("peers", "peer"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
}
