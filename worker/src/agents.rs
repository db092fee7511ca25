//! The agents a worker can run: two built-ins (`echo`, `sleep`) plus any number of
//! `exec` agents declared in an agents file.
//!
//! The agents file is TOML:
//!
//! ```toml
//! [agents.summarize]
//! command = "/usr/local/bin/summarize"   # required
//! args = ["--model", "small"]            # optional
//! env = { RUST_LOG = "info" }            # optional, added to the worker's environment
//! cwd = "work"                           # optional; relative paths are resolved against
//!                                        # the directory holding the agents file
//! timeout_ms = 60000                     # optional cap on every task's timeout
//! ```
//!
//! Unknown keys are errors, as are agents named like a built-in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Name of the built-in agent whose output is its payload.
pub const ECHO: &str = "echo";
/// Name of the built-in agent that sleeps for the number of milliseconds in its payload.
pub const SLEEP: &str = "sleep";
/// Names of all built-in agents.
pub const BUILTINS: [&str; 2] = [ECHO, SLEEP];

/// An `exec` agent: a command run once per attempt, payload on stdin, result on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program to run (looked up in `PATH` when it contains no `/`).
    pub command: String,
    /// Arguments passed to the program.
    pub args: Vec<String>,
    /// Environment variables added to the worker's own environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute, or already resolved against the agents file's directory).
    pub cwd: Option<PathBuf>,
    /// Upper bound on the timeout of any task run by this agent.
    pub timeout_ms: Option<u64>,
}

/// One runnable agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agent {
    /// Built-in: the output is the payload.
    Echo,
    /// Built-in: sleeps for the payload's number of milliseconds (`250` or `{"ms":250}`).
    Sleep,
    /// An external command.
    Exec(ExecSpec),
}

/// The set of agents a worker offers, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agents {
    by_name: BTreeMap<String, Agent>,
}

/// A problem with an agents file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    /// The file could not be read.
    #[error("agents file {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type, …).
    #[error("agents file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// One agent's definition is invalid.
    #[error("agents file {path}: agent `{agent}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The agent's name.
        agent: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    agents: BTreeMap<String, RawAgent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    timeout_ms: Option<u64>,
}

impl Default for Agents {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Agents {
    /// Only the built-in agents.
    pub fn builtin() -> Self {
        let mut by_name = BTreeMap::new();
        by_name.insert(ECHO.to_owned(), Agent::Echo);
        by_name.insert(SLEEP.to_owned(), Agent::Sleep);
        Agents { by_name }
    }

    /// The built-ins plus the agents declared in the file at `path`.
    pub fn load(path: &Path) -> Result<Self, AgentsError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The built-ins plus the agents declared in `text`, which was read from `path`
    /// (used in error messages and to resolve relative `cwd`s).
    pub fn parse(text: &str, path: &Path) -> Result<Self, AgentsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| AgentsError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut agents = Self::builtin();
        for (name, def) in raw.agents {
            let invalid = |message: String| AgentsError::Invalid {
                path: path.to_owned(),
                agent: name.clone(),
                message,
            };
            if BUILTINS.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "the name clashes with a built-in agent (built-ins: {})",
                    BUILTINS.join(", ")
                )));
            }
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "agent names must be non-empty and contain no whitespace".into(),
                ));
            }
            let command = match def.command {
                None => return Err(invalid("missing required key `command`".into())),
                Some(c) if c.trim().is_empty() => {
                    return Err(invalid("`command` must not be empty".into()))
                }
                Some(c) => c,
            };
            if let Some(bad) = def
                .env
                .keys()
                .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
            {
                return Err(invalid(format!(
                    "invalid environment variable name {bad:?}"
                )));
            }
            if def.timeout_ms == Some(0) {
                return Err(invalid("`timeout_ms` must be positive".into()));
            }
            let cwd = def
                .cwd
                .map(|c| if c.is_relative() { base.join(c) } else { c });
            agents.by_name.insert(
                name,
                Agent::Exec(ExecSpec {
                    command,
                    args: def.args,
                    env: def.env,
                    cwd,
                    timeout_ms: def.timeout_ms,
                }),
            );
        }
        Ok(agents)
    }

    /// Adds (or replaces) an `exec` agent; for embedding and tests.
    pub fn with_exec(mut self, name: impl Into<String>, spec: ExecSpec) -> Self {
        self.by_name.insert(name.into(), Agent::Exec(spec));
        self
    }

    /// The agent called `name`.
    pub fn get(&self, name: &str) -> Option<&Agent> {
        self.by_name.get(name)
    }

    /// All agent names, sorted, built-ins included.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }
}

impl ExecSpec {
    /// A spec running `command args…` with no extra environment, cwd or timeout cap.
    pub fn new(
        command: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ExecSpec {
            command: command.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Agents, AgentsError> {
        Agents::parse(text, Path::new("/etc/swarm/agents.toml"))
    }

    #[test]
    fn empty_file_has_builtins() {
        let a = parse("").unwrap();
        assert_eq!(a.names(), vec!["echo", "sleep"]);
        assert_eq!(a.get("echo"), Some(&Agent::Echo));
        assert_eq!(a.get("sleep"), Some(&Agent::Sleep));
    }

    #[test]
    fn full_agent() {
        let a = parse(
            r#"
            [agents.sum]
            command = "python3"
            args = ["-c", "print(1)"]
            env = { A = "1", B = "two" }
            cwd = "work"
            timeout_ms = 500

            [agents.abs]
            command = "/bin/true"
            cwd = "/tmp"
            "#,
        )
        .unwrap();
        assert_eq!(a.names(), vec!["abs", "echo", "sleep", "sum"]);
        let Some(Agent::Exec(spec)) = a.get("sum") else {
            panic!("not exec")
        };
        assert_eq!(spec.command, "python3");
        assert_eq!(spec.args, vec!["-c", "print(1)"]);
        assert_eq!(spec.env.get("B").map(String::as_str), Some("two"));
        assert_eq!(spec.cwd.as_deref(), Some(Path::new("/etc/swarm/work")));
        assert_eq!(spec.timeout_ms, Some(500));
        let Some(Agent::Exec(spec)) = a.get("abs") else {
            panic!("not exec")
        };
        assert_eq!(spec.cwd.as_deref(), Some(Path::new("/tmp")));
        assert!(spec.args.is_empty() && spec.env.is_empty() && spec.timeout_ms.is_none());
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let cases: &[(&str, &[&str])] = &[
            (
                "[agents.x\ncommand = 1",
                &["/etc/swarm/agents.toml", "line"],
            ),
            (
                "[agents.x]\nargs = []",
                &["agent `x`", "missing required key `command`"],
            ),
            (
                "[agents.x]\ncommand = \"\"",
                &["agent `x`", "must not be empty"],
            ),
            (
                "[agents.x]\ncommand = \"a\"\ncomand = \"b\"",
                &["unknown field `comand`"],
            ),
            ("[agent.x]\ncommand = \"a\"", &["unknown field `agent`"]),
            (
                "[agents.echo]\ncommand = \"a\"",
                &["agent `echo`", "built-in"],
            ),
            (
                "[agents.sleep]\ncommand = \"a\"",
                &["agent `sleep`", "built-in"],
            ),
            ("[agents.x]\ncommand = \"a\"\nargs = \"b\"", &["args"]),
            (
                "[agents.x]\ncommand = \"a\"\ntimeout_ms = 0",
                &["timeout_ms", "positive"],
            ),
            (
                "[agents.x]\ncommand = \"a\"\nenv = { \"A=B\" = \"c\" }",
                &["environment"],
            ),
        ];
        for (text, needles) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains("/etc/swarm/agents.toml"), "{err}");
            for n in *needles {
                assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn missing_file() {
        let err = Agents::load(Path::new("/nonexistent/agents.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/agents.toml") && err.contains("cannot read"),
            "{err}"
        );
    }
}
