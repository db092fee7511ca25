//! `swarm`: run coordinators and workers, submit tasks, inspect a cluster.
//!
//! Flags can also come from `SWARM_*` environment variables and from a TOML file given
//! by `--config` (see `config.rs`). Exit codes: 0 success, 1 error, 2 usage error (clap),
//! 3 a waited-for task ended in a state other than succeeded, 4 a wait timed out.
//!
//! `args` defines the command line, `cmd` runs each command, `client` talks to the HTTP
//! API.

mod args;
mod client;
mod cmd;
mod config;
mod signals;
mod sse;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use crate::args::{Cli, Cmd, LogFormat};

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parse the command line, with the values of the `--config` file for the flags it
/// does not give. Usage errors exit here (code 2), as clap does.
fn parse_cli() -> anyhow::Result<Cli> {
    let (cmd, args) = config::with_config_file(Cli::command(), std::env::args_os().collect())?;
    let matches = cmd.get_matches_from(args);
    Ok(Cli::from_arg_matches(&matches)?)
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SWARM_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Up(a) => cmd::up::run(a).await,
        Cmd::Coordinator(a) => cmd::coordinator::run(*a).await,
        Cmd::Worker(a) => cmd::worker::run(a).await,
        Cmd::Certs(c) => cmd::certs::run(c).await,
        Cmd::Submit(a) => cmd::task::submit(a).await,
        Cmd::Task(t) => cmd::task::run(t).await,
        Cmd::Status(a) => cmd::status::run(a).await,
        Cmd::Cluster(c) => cmd::cluster::run(c).await,
        Cmd::Workers(c) => cmd::workers::run(c).await,
        Cmd::Probe(a) => cmd::probe::run(a).await,
        Cmd::Memory(c) => cmd::memory::run(c).await,
        Cmd::Swarms(c) => cmd::swarms::run(c).await,
        Cmd::Schedules(c) => cmd::schedules::run(c).await,
        Cmd::Limits(c) => cmd::limits::run(c).await,
        Cmd::Tokens(c) => cmd::tokens::run(c).await,
        Cmd::Patterns(c) => cmd::patterns::run(c).await,
        Cmd::Backup { api, out } => cmd::transfer::backup(&api.client()?, &out).await,
        Cmd::Restore { api, from } => cmd::transfer::restore(&api.client()?, &from).await,
    }
}
