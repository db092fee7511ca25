//! The agents a worker can run: two built-ins (`echo`, `sleep`) plus any number of
//! `exec` agents declared in an agents file.
//!
//! The agents file is TOML:
//!
//! ```toml
//! [agents.summarize]
//! command = "/usr/local/bin/summarize"   # required
//! args = ["--model", "small"]            # optional
//! env = ["OPENAI_API_KEY", "HTTP_PROXY"] # optional: passed on from the worker's
//!                                        # environment when set there
//! env_set = { RUST_LOG = "info" }        # optional: fixed values
//! run_as = "nobody"                      # optional: a user name, or "uid:gid"
//! cwd = "work"                           # optional; relative paths are resolved against
//!                                        # the directory holding the agents file
//! timeout_ms = 60000                     # optional cap on every task's timeout
//! ```
//!
//! Unknown keys are errors, as are agents named like a built-in.
//!
//! An agent does **not** inherit the worker's environment: it starts from an empty one
//! (see [`crate::executor`] for exactly what it gets). `env` names the variables it may
//! have from the worker's environment; `env_set` gives fixed values (the older table form
//! `env = { NAME = "value" }` is still read, as fixed values). Names must be portable
//! environment variable names (`[A-Za-z_][A-Za-z0-9_]*`), and names starting with
//! `SWARM_` are refused in both: that prefix is the worker's own configuration
//! (`SWARM_CERTS`, `SWARM_TOKEN`, …), which never reaches an agent, and the per-attempt
//! variables the worker sets itself (`SWARM_TASK_ID`, …).
//!
//! `run_as` is resolved when the file is loaded: a name through `/etc/passwd` (users
//! known only to other name services need the `"uid:gid"` form), and the agent then runs
//! with that uid and gid and no supplementary groups. A worker that is not root can only
//! name itself (same uid and gid); anything else is refused at load.

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
    /// Program to run (looked up in the agent's `PATH` when it contains no `/`).
    pub command: String,
    /// Arguments passed to the program.
    pub args: Vec<String>,
    /// Environment variables with fixed values (agents.toml `env_set`, or the older table
    /// form of `env`). Names starting with `SWARM_` are never set from here.
    pub env: BTreeMap<String, String>,
    /// Names of variables passed on from the worker's environment when set there
    /// (agents.toml `env = [...]`). Names starting with `SWARM_` are never passed on.
    pub pass_env: Vec<String>,
    /// The user the agent runs as (agents.toml `run_as`); `None`: the worker's user.
    pub run_as: Option<RunAs>,
    /// Working directory (absolute, or already resolved against the agents file's directory).
    pub cwd: Option<PathBuf>,
    /// Upper bound on the timeout of any task run by this agent.
    pub timeout_ms: Option<u64>,
}

/// A user an agent runs as, resolved when the agents file is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// As written in the agents file (a user name or `uid:gid`).
    pub user: String,
    /// The numeric user id.
    pub uid: u32,
    /// The numeric (primary) group id.
    pub gid: u32,
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
    env: Option<RawEnv>,
    #[serde(default)]
    env_set: BTreeMap<String, String>,
    run_as: Option<String>,
    cwd: Option<PathBuf>,
    timeout_ms: Option<u64>,
}

/// `env`: a list of names passed on from the worker's environment, or (the older form)
/// a table of fixed values.
#[derive(Debug)]
enum RawEnv {
    Names(Vec<String>),
    Fixed(BTreeMap<String, String>),
}

impl<'de> Deserialize<'de> for RawEnv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawEnv;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a list of variable names passed on from the worker's environment \
                     (`env = [\"NAME\"]`); fixed values go in `env_set = { NAME = \"value\" }`",
                )
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawEnv, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(RawEnv::Names(names))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawEnv, A::Error> {
                let mut fixed = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    fixed.insert(k, v);
                }
                Ok(RawEnv::Fixed(fixed))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What loading `run_as` needs from the host: the user database and who the worker is.
trait Host {
    /// The text of `/etc/passwd`.
    fn passwd(&self) -> std::io::Result<String>;
    /// The worker's effective uid and gid.
    fn ids(&self) -> std::io::Result<(u32, u32)>;
}

struct RealHost;

impl Host for RealHost {
    fn passwd(&self) -> std::io::Result<String> {
        std::fs::read_to_string("/etc/passwd")
    }

    fn ids(&self) -> std::io::Result<(u32, u32)> {
        current_ids()
    }
}

/// The worker's effective uid and gid (without `unsafe`: from `/proc/self/status`, else
/// from `id`).
pub(crate) fn current_ids() -> std::io::Result<(u32, u32)> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        // "Uid:\treal\teffective\tsaved\tfs"
        let effective = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok())
        };
        if let (Some(u), Some(g)) = (effective("Uid:"), effective("Gid:")) {
            return Ok((u, g));
        }
    }
    let id = |flag: &str| -> std::io::Result<u32> {
        let out = std::process::Command::new("id").arg(flag).output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| std::io::Error::other(format!("cannot parse the output of `id {flag}`")))
    };
    Ok((id("-u")?, id("-g")?))
}

/// Whether `name` is a portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `name` is in the `SWARM_` namespace (the worker's own configuration and the
/// per-attempt variables), which agents.toml can neither pass on nor set.
pub(crate) fn reserved_env_name(name: &str) -> bool {
    name.len() >= 6 && name.as_bytes()[..6].eq_ignore_ascii_case(b"SWARM_")
}

fn check_env_name(key: &str, name: &str) -> Result<(), String> {
    if !valid_env_name(name) {
        return Err(format!(
            "`{key}`: invalid environment variable name {name:?} (letters, digits and `_`, \
             not starting with a digit)"
        ));
    }
    if reserved_env_name(name) {
        return Err(format!(
            "`{key}`: `{name}` is refused: names starting with `SWARM_` are reserved (the \
             worker's own configuration, such as its certificates, keys and token, never \
             reaches an agent; the worker sets the agent's SWARM_* variables itself)"
        ));
    }
    Ok(())
}

/// Resolves `run_as` (`name` or `uid:gid`) against the text of `/etc/passwd`.
fn resolve_run_as(
    user: &str,
    passwd: impl FnOnce() -> std::io::Result<String>,
) -> Result<RunAs, String> {
    if let Some((u, g)) = user.split_once(':') {
        let (Ok(uid), Ok(gid)) = (u.trim().parse::<u32>(), g.trim().parse::<u32>()) else {
            return Err(format!(
                "`run_as`: {user:?} is neither a user name nor \"uid:gid\" (two numbers)"
            ));
        };
        return Ok(RunAs {
            user: user.to_owned(),
            uid,
            gid,
        });
    }
    if user.is_empty() {
        return Err("`run_as` must not be empty".into());
    }
    let text = passwd().map_err(|e| format!("`run_as`: cannot read /etc/passwd: {e}"))?;
    for line in text.lines() {
        let mut fields = line.split(':');
        if fields.next() != Some(user) {
            continue;
        }
        let _password = fields.next();
        let (Some(Ok(uid)), Some(Ok(gid))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u32>),
        ) else {
            return Err(format!(
                "`run_as`: the /etc/passwd entry of `{user}` is malformed"
            ));
        };
        return Ok(RunAs {
            user: user.to_owned(),
            uid,
            gid,
        });
    }
    Err(format!(
        "`run_as`: no user `{user}` in /etc/passwd (for a user known only to another name \
         service, write \"uid:gid\")"
    ))
}

/// A worker that is not root cannot switch users: it may only "run as" itself.
fn check_run_as(run_as: &RunAs, (euid, egid): (u32, u32)) -> Result<(), String> {
    if euid != 0 && (run_as.uid != euid || run_as.gid != egid) {
        return Err(format!(
            "run_as needs the worker to run as root: `run_as = {:?}` is uid {} gid {}, \
             but the worker runs as uid {euid} gid {egid}",
            run_as.user, run_as.uid, run_as.gid
        ));
    }
    Ok(())
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
        Self::parse_on(text, path, &RealHost)
    }

    fn parse_on(text: &str, path: &Path, host: &dyn Host) -> Result<Self, AgentsError> {
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
            let (pass_env, mut fixed) = match def.env {
                None => (Vec::new(), BTreeMap::new()),
                Some(RawEnv::Names(names)) => (names, BTreeMap::new()),
                Some(RawEnv::Fixed(fixed)) => (Vec::new(), fixed),
            };
            for n in &pass_env {
                check_env_name("env", n).map_err(invalid)?;
            }
            for (i, n) in pass_env.iter().enumerate() {
                if pass_env[..i].contains(n) {
                    return Err(invalid(format!("`env`: `{n}` is listed twice")));
                }
            }
            for n in fixed.keys() {
                check_env_name("env", n).map_err(invalid)?;
            }
            for (n, v) in def.env_set {
                check_env_name("env_set", &n).map_err(invalid)?;
                if fixed.contains_key(&n) {
                    return Err(invalid(format!(
                        "`{n}` is given both in the table form of `env` and in `env_set`"
                    )));
                }
                fixed.insert(n, v);
            }
            if let Some(n) = pass_env.iter().find(|n| fixed.contains_key(*n)) {
                return Err(invalid(format!(
                    "`{n}` is both passed on (`env`) and given a fixed value (`env_set`)"
                )));
            }
            if let Some(bad) = fixed.iter().find(|(_, v)| v.contains('\0')) {
                return Err(invalid(format!(
                    "the value of environment variable `{}` contains a NUL byte",
                    bad.0
                )));
            }
            let run_as = match def.run_as {
                None => None,
                Some(user) => {
                    let run_as = resolve_run_as(user.trim(), || host.passwd()).map_err(invalid)?;
                    let ids = host.ids().map_err(|e| {
                        invalid(format!(
                            "`run_as`: cannot tell which user the worker is: {e}"
                        ))
                    })?;
                    check_run_as(&run_as, ids).map_err(invalid)?;
                    Some(run_as)
                }
            };
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
                    env: fixed,
                    pass_env,
                    run_as,
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
    /// A spec running `command args…` with no extra environment, no `run_as`, no cwd and
    /// no timeout cap.
    pub fn new(
        command: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ExecSpec {
            command: command.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            run_as: None,
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
    fn env_names_and_fixed_values() {
        let a = parse(
            r#"
            [agents.a]
            command = "x"
            env = ["OPENAI_API_KEY", "HTTP_PROXY", "_x1"]
            env_set = { MODEL = "small", PATH = "/opt/bin" }

            [agents.legacy]
            command = "x"
            env = { RUST_LOG = "info" }
            env_set = { B = "2" }
            "#,
        )
        .unwrap();
        let Some(Agent::Exec(spec)) = a.get("a") else {
            panic!("not exec")
        };
        assert_eq!(spec.pass_env, vec!["OPENAI_API_KEY", "HTTP_PROXY", "_x1"]);
        assert_eq!(spec.env.len(), 2);
        assert_eq!(spec.env.get("MODEL").map(String::as_str), Some("small"));
        assert_eq!(spec.run_as, None);
        let Some(Agent::Exec(spec)) = a.get("legacy") else {
            panic!("not exec")
        };
        assert!(spec.pass_env.is_empty());
        assert_eq!(spec.env.get("RUST_LOG").map(String::as_str), Some("info"));
        assert_eq!(spec.env.get("B").map(String::as_str), Some("2"));
    }

    #[test]
    fn env_errors() {
        let cases: &[(&str, &[&str])] = &[
            (
                "env = [\"1A\"]",
                &["`env`", "invalid environment variable name \"1A\""],
            ),
            ("env = [\"A-B\"]", &["invalid environment variable name"]),
            ("env = [\"\"]", &["invalid environment variable name \"\""]),
            ("env = [\"A=B\"]", &["invalid environment variable name"]),
            ("env = [\"É\"]", &["invalid environment variable name"]),
            ("env_set = { \"A B\" = \"1\" }", &["`env_set`", "invalid"]),
            (
                "env = [\"SWARM_CERTS\"]",
                &[
                    "`env`",
                    "`SWARM_CERTS` is refused",
                    "reserved",
                    "certificates",
                ],
            ),
            ("env = [\"SWARM_TOKEN\"]", &["`SWARM_TOKEN` is refused"]),
            (
                "env = [\"swarm_token_file\"]",
                &["`swarm_token_file` is refused"],
            ),
            ("env = [\"SWARM_\"]", &["`SWARM_` is refused"]),
            (
                "env_set = { SWARM_TASK_ID = \"1\" }",
                &["`env_set`", "`SWARM_TASK_ID` is refused"],
            ),
            (
                "env = { SWARM_AGENTS = \"x\" }",
                &["`SWARM_AGENTS` is refused"],
            ),
            ("env = [\"A\", \"A\"]", &["listed twice"]),
            (
                "env = [\"A\"]\nenv_set = { A = \"1\" }",
                &["`A` is both passed on"],
            ),
            (
                "env = { A = \"1\" }\nenv_set = { A = \"2\" }",
                &["`A` is given both"],
            ),
            ("env = \"A\"", &["list of variable names", "env_set"]),
            ("env = [1]", &["env"]),
            ("env_set = [\"A\"]", &["env_set"]),
            ("env_set = { A = \"a\\u0000b\" }", &["NUL"]),
            ("envs = [\"A\"]", &["unknown field `envs`"]),
        ];
        for (extra, needles) in cases {
            let text = format!("[agents.x]\ncommand = \"a\"\n{extra}\n");
            let err = parse(&text).expect_err(&text).to_string();
            assert!(err.contains("/etc/swarm/agents.toml"), "{err}");
            for n in *needles {
                assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn reserved_names() {
        for n in ["SWARM_CERTS", "swarm_x", "Swarm_Token", "SWARM_"] {
            assert!(reserved_env_name(n), "{n}");
        }
        for n in ["SWARM", "SWARMX", "MY_SWARM_CERTS", "", "É", "SWARMÉ_"] {
            assert!(!reserved_env_name(n), "{n}");
        }
    }

    struct FakeHost {
        ids: (u32, u32),
    }

    impl Host for FakeHost {
        fn passwd(&self) -> std::io::Result<String> {
            Ok("# comment\n\
                root:x:0:0:root:/root:/bin/bash\n\
                nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                svc:x:1000:1001::/home/svc:/bin/sh\n\
                broken:x:abc:1::/:/bin/sh\n"
                .into())
        }

        fn ids(&self) -> std::io::Result<(u32, u32)> {
            Ok(self.ids)
        }
    }

    fn parse_as(ids: (u32, u32), run_as: &str) -> Result<Option<RunAs>, String> {
        let text = format!("[agents.x]\ncommand = \"a\"\nrun_as = {run_as:?}\n");
        let agents = Agents::parse_on(
            &text,
            Path::new("/etc/swarm/agents.toml"),
            &FakeHost { ids },
        )
        .map_err(|e| e.to_string())?;
        match agents.get("x") {
            Some(Agent::Exec(spec)) => Ok(spec.run_as.clone()),
            _ => panic!("not exec"),
        }
    }

    #[test]
    fn run_as_resolution() {
        let root = (0, 0);
        let nobody = parse_as(root, "nobody").unwrap().unwrap();
        assert_eq!(
            (nobody.uid, nobody.gid, nobody.user.as_str()),
            (65534, 65534, "nobody")
        );
        let svc = parse_as(root, "svc").unwrap().unwrap();
        assert_eq!((svc.uid, svc.gid), (1000, 1001));
        let num = parse_as(root, "123:456").unwrap().unwrap();
        assert_eq!((num.uid, num.gid), (123, 456));
        for (value, needle) in [
            ("ghost", "no user `ghost` in /etc/passwd"),
            ("1:x", "neither a user name nor"),
            (":5", "neither a user name nor"),
            ("", "must not be empty"),
            ("broken", "malformed"),
        ] {
            let err = parse_as(root, value).unwrap_err();
            assert!(
                err.contains("agent `x`") && err.contains(needle),
                "{value:?}: {err}"
            );
        }
    }

    #[test]
    fn run_as_needs_root_to_switch_users() {
        // A worker running as svc (1000:1001) may only run agents as itself.
        let svc = (1000, 1001);
        assert_eq!(parse_as(svc, "svc").unwrap().unwrap().uid, 1000);
        assert!(parse_as(svc, "1000:1001").is_ok());
        for other in ["nobody", "root", "1000:0", "0:1001"] {
            let err = parse_as(svc, other).unwrap_err();
            assert!(
                err.contains("run_as needs the worker to run as root")
                    && err.contains("uid 1000 gid 1001")
                    && err.contains("/etc/swarm/agents.toml"),
                "{other}: {err}"
            );
        }
    }

    #[test]
    fn current_ids_match_the_process() {
        let (uid, _gid) = current_ids().unwrap();
        let meta = std::fs::metadata("/proc/self").ok();
        if let Some(meta) = meta {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(uid, meta.uid());
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
