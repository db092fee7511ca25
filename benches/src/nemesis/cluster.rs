//! The processes of one run: three coordinators forming one Raft cluster and the
//! workers, all on loopback, each in a process group of its own and logging to
//! `<name>.log` in the scratch dir; and [`Guard`], which kills all of them (and whatever
//! they left behind), removes the firewall chain and the temp dir however the run ends.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use rand::Rng;

use super::firewall::Firewall;

/// The worker heartbeat interval given to the coordinators.
pub const HEARTBEAT: &str = "200ms";
/// The lease given to the coordinators (`--lease`), in milliseconds.
pub const LEASE_MS: u64 = 1_500;
/// The exec agent's name in every worker's agents file.
pub const AGENT: &str = "journal";

/// The agent every worker runs: journals `start` and `end` around a short sleep taken
/// from the payload (its `-ms<N>` suffix), and answers with the payload; `busy-exec` /
/// `busy-task` when another agent of the same execution / task holds its lock (is
/// running) as it starts.
const AGENT_SCRIPT: &str = r#"#!/bin/sh
# Written by the swarm nemesis: the exec agent of every worker.
# $1: the worker's name, $2: the journal file, $3: a directory for lock files.
# The payload arrives on stdin and ends in -ms<N>: the agent sleeps N milliseconds
# between its `start` and `end` journal lines, then prints the payload (the task's
# output). Each line is one `echo` appended with O_APPEND (>>), so lines of concurrent
# agents never interleave.
#
# Before its `start` line the agent takes two exclusive locks (flock, held by its open
# file descriptors until the agent and its children are gone, however they end, SIGKILL
# included): one per execution id and one per task. If another agent holds one, it is
# running at this very moment, and the agent says so: `busy-exec` / `busy-task` lines.
worker="$1"
journal="$2"
locks="$3"
payload=$(cat)
exec_id="${SWARM_EXECUTION_ID:-${SWARM_TASK_ID}.${SWARM_ATTEMPT}}"
ms="${payload##*-ms}"
case "$ms" in ''|*[!0-9]*) ms=0 ;; esac
busy=""
if command -v flock >/dev/null 2>&1; then
    exec 8>>"$locks/task-$SWARM_TASK_ID" 9>>"$locks/exec-$exec_id"
    flock -n 9 || busy="exec"
    flock -n 8 || busy="$busy task"
else
    echo "no-flock $exec_id $SWARM_TASK_ID $SWARM_ATTEMPT $worker $(date +%s%N)" >> "$journal"
fi
echo "start $exec_id $SWARM_TASK_ID $SWARM_ATTEMPT $worker $(date +%s%N)" >> "$journal"
for what in $busy; do
    echo "busy-$what $exec_id $SWARM_TASK_ID $SWARM_ATTEMPT $worker $(date +%s%N)" >> "$journal"
done
sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
printf '%s' "$payload"
echo "end $exec_id $SWARM_TASK_ID $SWARM_ATTEMPT $worker $(date +%s%N)" >> "$journal"
"#;

/// One coordinator's fixed coordinates.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: u64,
    /// Its QUIC port (workers and Raft peers; it dials its peers from it too).
    pub quic: u16,
    /// Its HTTP API port.
    pub api: u16,
    pub data: PathBuf,
}

impl NodeSpec {
    pub fn name(&self) -> String {
        format!("node-{}", self.id)
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api)
    }

    fn quic_addr(&self) -> String {
        format!("127.0.0.1:{}", self.quic)
    }

    fn api_addr(&self) -> String {
        format!("127.0.0.1:{}", self.api)
    }
}

/// One worker's fixed settings.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub name: String,
    pub slots: u32,
    pub agents: PathBuf,
}

/// Where everything of a run lives, and how each process is started.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The copy of the binary every process runs...
    pub swarm: PathBuf,
    /// ...and the binary it was copied from.
    pub swarm_original: PathBuf,
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub token_file: PathBuf,
    pub token: String,
    pub journal: PathBuf,
    pub nodes: Vec<NodeSpec>,
    pub workers: Vec<WorkerSpec>,
}

/// A loopback port free for UDP (or TCP) right now, taken at random below Linux's
/// ephemeral range (32768+): sockets bound to port 0 by other processes cannot take it
/// between this check and a restart of the node that owns it.
fn pick_port(rng: &mut impl Rng, udp: bool, taken: &mut BTreeSet<u16>) -> anyhow::Result<u16> {
    for _ in 0..10_000 {
        let port = rng.gen_range(20_000..32_000u16);
        if taken.contains(&port) {
            continue;
        }
        let free = if udp {
            std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        } else {
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        };
        if free {
            taken.insert(port);
            return Ok(port);
        }
    }
    bail!("no free loopback port found")
}

impl Layout {
    /// Certificates, token, agent script, agents files and ports for 3 coordinators and
    /// `workers` workers in `dir`. Starts nothing.
    pub fn create(
        sup: &Supervisor,
        swarm: &Path,
        dir: &Path,
        workers: usize,
        rng: &mut impl Rng,
    ) -> anyhow::Result<Layout> {
        let original = std::fs::canonicalize(swarm)
            .with_context(|| format!("the swarm binary {}", swarm.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::fs::canonicalize(dir)?;
        // A scratch dir used before: start from nothing (only what a run makes).
        for id in 1..=3 {
            remove_if_present(&dir.join(format!("node-{id}")))?;
            remove_if_present(&dir.join(format!("node-{id}.log")))?;
        }
        for i in 1..=workers {
            remove_if_present(&dir.join(format!("w{i}.log")))?;
        }
        remove_if_present(&dir.join("locks"))?;
        // A copy, so that a rebuild during the run cannot mix versions across restarts.
        let swarm = dir.join("swarm");
        std::fs::copy(&original, &swarm)
            .with_context(|| format!("copying {} to {}", original.display(), swarm.display()))?;
        let certs = dir.join("certs");
        if !certs.join("ca.pem").exists() {
            let out = sup.run_command(
                Command::new(&swarm)
                    .args(["certs", "init", "--dir"])
                    .arg(&certs),
            )?;
            if !out.status.success() {
                bail!(
                    "`swarm certs init` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let token = format!("nemesis-{:016x}", rng.gen::<u64>());
        let token_file = dir.join("token");
        std::fs::write(&token_file, &token)?;
        let journal = dir.join("journal.log");
        File::create(&journal).context("creating the journal")?;
        let script = dir.join("agent.sh");
        std::fs::write(&script, AGENT_SCRIPT)?;
        let locks = dir.join("locks");
        std::fs::create_dir_all(&locks)?;

        let mut taken = BTreeSet::new();
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            nodes.push(NodeSpec {
                id,
                quic: pick_port(rng, true, &mut taken)?,
                api: pick_port(rng, false, &mut taken)?,
                data: dir.join(format!("node-{id}")),
            });
        }
        let mut specs = Vec::new();
        for i in 1..=workers {
            let name = format!("w{i}");
            let agents = dir.join(format!("agents-{name}.toml"));
            let mut f = File::create(&agents)?;
            writeln!(
                f,
                "# The nemesis' exec agent; the worker's name is an argument."
            )?;
            writeln!(f, "[agents.{AGENT}]")?;
            writeln!(f, "command = {}", toml_str("/bin/sh"))?;
            writeln!(
                f,
                "args = [{}, {}, {}, {}]",
                toml_str(&script.to_string_lossy()),
                toml_str(&name),
                toml_str(&journal.to_string_lossy()),
                toml_str(&locks.to_string_lossy())
            )?;
            specs.push(WorkerSpec {
                name,
                slots: rng.gen_range(2..=4),
                agents,
            });
        }
        Ok(Layout {
            swarm,
            swarm_original: original,
            dir,
            certs,
            token_file,
            token,
            journal,
            nodes,
            workers: specs,
        })
    }

    pub fn node(&self, id: u64) -> &NodeSpec {
        &self.nodes[(id - 1) as usize]
    }

    /// `swarm coordinator` for node `id`; node 1 bootstraps the cluster of all three
    /// (only while its data dir is empty, so restarting it with the same flags is fine).
    pub fn coordinator_command(&self, id: u64) -> Command {
        let spec = self.node(id);
        let mut cmd = Command::new(&self.swarm);
        cmd.arg("coordinator")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&spec.data)
            .arg("--certs")
            .arg(&self.certs)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(["--listen", &spec.quic_addr()])
            .args(["--advertise", &spec.quic_addr()])
            .args(["--api-listen", &spec.api_addr()])
            .args(["--api-advertise", &spec.api_addr()])
            .args(["--heartbeat-interval", HEARTBEAT])
            .args(["--lease", &format!("{LEASE_MS}ms")])
            .args(["--retry-backoff", "50ms", "--retry-backoff-max", "2s"])
            .env("SWARM_LOG", "info,openraft=warn");
        if id == 1 {
            cmd.arg("--bootstrap");
            for peer in self.nodes.iter().filter(|n| n.id != 1) {
                cmd.args([
                    "--peer",
                    &format!("{}={},{}", peer.id, peer.quic_addr(), peer.api_addr()),
                ]);
            }
        }
        cmd
    }

    /// `swarm worker` for worker `name`, given every coordinator.
    pub fn worker_command(&self, name: &str) -> anyhow::Result<Command> {
        let spec = self
            .workers
            .iter()
            .find(|w| w.name == name)
            .with_context(|| format!("no worker {name}"))?;
        let coordinators: Vec<String> = self.nodes.iter().map(NodeSpec::quic_addr).collect();
        let mut cmd = Command::new(&self.swarm);
        cmd.arg("worker")
            .args(["--coordinator", &coordinators.join(",")])
            .arg("--certs")
            .arg(&self.certs)
            .args(["--id", name, "--slots", &spec.slots.to_string()])
            .arg("--agents")
            .arg(&spec.agents)
            .env("SWARM_LOG", "info");
        Ok(cmd)
    }

    /// The command that starts process `name` (`node-<id>` or a worker's name).
    pub fn command_of(&self, name: &str) -> anyhow::Result<Command> {
        match name
            .strip_prefix("node-")
            .and_then(|id| id.parse::<u64>().ok())
        {
            Some(id) if (1..=3).contains(&id) => Ok(self.coordinator_command(id)),
            _ => self.worker_command(name),
        }
    }

    /// Every process's name: the coordinators, then the workers.
    pub fn names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(NodeSpec::name)
            .chain(self.workers.iter().map(|w| w.name.clone()))
            .collect()
    }
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// A string as a TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Proc {
    child: Option<Child>,
    stopped: bool,
}

/// A process that exited without being told to.
#[derive(Debug, Clone)]
pub struct Exit {
    pub name: String,
    pub status: String,
    pub at_ms: u64,
}

/// The child processes of a run, by name.
///
/// The nemesis is a child subreaper, so agents orphaned by a SIGKILLed worker become its
/// children; they are reaped as they exit and killed at the end. Every command it runs to
/// completion goes through [`Supervisor::run_command`], which the reaper never races.
pub struct Supervisor {
    dir: PathBuf,
    procs: Mutex<BTreeMap<String, Proc>>,
    reap_lock: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

impl Supervisor {
    pub fn new(dir: &Path) -> Supervisor {
        Supervisor {
            dir: dir.to_path_buf(),
            procs: Mutex::new(BTreeMap::new()),
            reap_lock: Mutex::new(()),
        }
    }

    /// Runs `cmd` to completion (output captured), never racing the orphan reaper.
    pub fn run_command(&self, cmd: &mut Command) -> std::io::Result<Output> {
        let _reaping = lock(&self.reap_lock);
        cmd.stdin(Stdio::null()).output()
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Starts `cmd` as process `name`, in a process group of its own, appending its
    /// output to `<name>.log`.
    pub fn spawn(&self, name: &str, mut cmd: Command) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))?;
        let mut procs = lock(&self.procs);
        if let Some(Proc { child: Some(_), .. }) = procs.get(name) {
            bail!("{name} is already running");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        procs.insert(
            name.to_string(),
            Proc {
                child: Some(child),
                stopped: false,
            },
        );
        Ok(pid)
    }

    /// SIGKILL process `name` and reap it. False if it was not running.
    pub fn kill(&self, name: &str) -> bool {
        let mut procs = lock(&self.procs);
        let Some(p) = procs.get_mut(name) else {
            return false;
        };
        p.stopped = false;
        match p.child.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }

    /// Sends SIGSTOP or SIGCONT to process `name`.
    pub fn signal(&self, name: &str, signal: Signal) -> anyhow::Result<()> {
        let mut procs = lock(&self.procs);
        let p = procs
            .get_mut(name)
            .filter(|p| p.child.is_some())
            .with_context(|| format!("{name} is not running"))?;
        if let Some(c) = &p.child {
            kill(pid_of(c), signal).with_context(|| format!("{signal} to {name}"))?;
        }
        match signal {
            Signal::SIGSTOP => p.stopped = true,
            Signal::SIGCONT => p.stopped = false,
            _ => {}
        }
        Ok(())
    }

    /// Started and not known to have exited or been killed.
    pub fn is_running(&self, name: &str) -> bool {
        lock(&self.procs)
            .get(name)
            .is_some_and(|p| p.child.is_some())
    }

    /// Running and not stopped: it can answer.
    pub fn is_up(&self, name: &str) -> bool {
        lock(&self.procs)
            .get(name)
            .is_some_and(|p| p.child.is_some() && !p.stopped)
    }

    /// SIGCONT every stopped process.
    pub fn cont_all(&self) {
        let mut procs = lock(&self.procs);
        for p in procs.values_mut() {
            if let (true, Some(c)) = (p.stopped, &p.child) {
                let _ = kill(pid_of(c), Signal::SIGCONT);
            }
            p.stopped = false;
        }
    }

    /// The processes that exited by themselves since the last call.
    pub fn poll_exits(&self) -> Vec<Exit> {
        let mut exits = Vec::new();
        let mut procs = lock(&self.procs);
        for (name, p) in procs.iter_mut() {
            let Some(c) = p.child.as_mut() else { continue };
            let status = match c.try_wait() {
                Ok(Some(s)) => s.to_string(),
                Ok(None) => continue,
                Err(e) => format!("unknown ({e})"),
            };
            p.child = None;
            p.stopped = false;
            exits.push(Exit {
                name: name.clone(),
                status,
                at_ms: super::now_ms(),
            });
        }
        exits
    }

    /// SIGKILL every process and reap it.
    pub fn kill_all(&self) {
        let mut procs = lock(&self.procs);
        for p in procs.values_mut() {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            p.stopped = false;
        }
    }

    /// Reaps this process's exited children that it does not track (agents orphaned by a
    /// SIGKILLed worker); with `kill_all`, first SIGKILLs those still running, with their
    /// process groups. Returns how many it found.
    pub fn reap_orphans(&self, kill_all: bool) -> usize {
        let _reaping = lock(&self.reap_lock);
        let procs = lock(&self.procs);
        let tracked: BTreeSet<u32> = procs
            .values()
            .filter_map(|p| p.child.as_ref().map(Child::id))
            .collect();
        let me = std::process::id();
        let mut found = 0;
        for (pid, state, pgrp) in children_of(me) {
            if tracked.contains(&pid) {
                continue;
            }
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            let p = Pid::from_raw(raw);
            if state == 'Z' {
                let _ = waitpid(p, None);
                found += 1;
            } else if kill_all {
                if pgrp == pid {
                    let _ = killpg(p, Signal::SIGKILL);
                }
                let _ = kill(p, Signal::SIGKILL);
                let _ = waitpid(p, None);
                found += 1;
            }
        }
        found
    }
}

/// `(pid, state, process group)` of every process whose parent is `parent`.
fn children_of(parent: u32) -> Vec<(u32, char, u32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse::<u32>().ok());
        let pgrp = f.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        if ppid == Some(parent) {
            out.push((pid, state, pgrp));
        }
    }
    out
}

/// Undoes everything a run set up when dropped: on success, on error, on a panic and when
/// the run is abandoned on a signal. Kills every process (SIGKILL), then the agents they
/// orphaned, removes the firewall chain, and deletes the temp dir (if the run made one).
pub struct Guard {
    pub sup: Arc<Supervisor>,
    pub firewall: Option<Arc<Firewall>>,
    pub temp: Option<tempfile::TempDir>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.sup.kill_all();
        for _ in 0..20 {
            if self.sup.reap_orphans(true) == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        if let Some(fw) = &self.firewall {
            fw.teardown();
        }
        if let Some(t) = self.temp.take() {
            let path = t.path().to_path_buf();
            if let Err(e) = t.close() {
                eprintln!("nemesis: could not remove {}: {e}", path.display());
            }
        }
    }
}

/// The last `lines` lines of every process's log.
pub fn log_tails(layout: &Layout, sup: &Supervisor, lines: usize) -> String {
    let mut out = String::new();
    for name in layout.names() {
        let path = sup.log_path(&name);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        out.push_str(&format!(
            "--- {} (last {} lines) ---\n",
            path.display(),
            all.len() - from
        ));
        for l in &all[from..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}
