//! Real processes on loopback: a `swarm coordinator` and `swarm worker`s started from the
//! built binary, with certificates from `swarm certs init`, driven over the HTTP API.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any wait in these tests may take before the test fails. Generous: CI
/// machines are slow; nothing asserts on how fast things are.
pub const WAIT: Duration = Duration::from_secs(90);

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_swarm"))
}

/// A free TCP port on loopback, never one handed out before in this test process.
pub fn free_tcp_port() -> u16 {
    unused_port("tcp", || {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
    })
}

/// A free UDP port on loopback, never one handed out before in this test process.
pub fn free_udp_port() -> u16 {
    unused_port("udp", || {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
    })
}

/// A port the OS says is free, skipping any this process handed out already: the socket
/// that found it is closed before the port is used, so the OS may offer it again to the
/// next caller (two nodes of one cluster were once given the same QUIC port).
fn unused_port(proto: &'static str, probe: impl Fn() -> std::io::Result<u16>) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<(&str, u16)>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let port = probe().unwrap_or_else(|e| panic!("free {proto} port: {e}"));
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&(proto, port)) {
            given.push((proto, port));
            return port;
        }
    }
    panic!("no {proto} port not handed out before in 1000 tries")
}

/// Send SIGTERM to a child process (what Kubernetes, Docker and systemd send to stop it).
pub fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
}

/// Wait, at most [`WAIT`], for a child process to exit, and reap it.
pub async fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of every `*.log` file in `dir`, for failure messages.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.sort();
    for p in paths {
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            out.push_str(&format!("--- {} ---\n", p.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// A coordinator and workers as child processes, killed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub token: String,
    pub api: String,
    pub api_port: u16,
    pub quic_port: u16,
    pub coordinator_args: Vec<String>,
    coordinator: Option<Child>,
    workers: Vec<(String, Child)>,
    http: reqwest::Client,
}

impl Cluster {
    /// Certificates and a token in a fresh temp dir; nothing running yet.
    pub fn new(extra_coordinator_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let out = Command::new(bin())
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .output()
            .expect("run swarm certs init");
        assert!(
            out.status.success(),
            "certs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = "test-token-0123456789".to_string();
        std::fs::write(dir.path().join("token"), &token).expect("write token");
        let api_port = free_tcp_port();
        let quic_port = free_udp_port();
        Cluster {
            certs,
            token,
            api: format!("http://127.0.0.1:{api_port}"),
            api_port,
            quic_port,
            coordinator_args: extra_coordinator_args
                .iter()
                .map(|s| s.to_string())
                .collect(),
            coordinator: None,
            workers: Vec::new(),
            http: reqwest::Client::new(),
            dir,
        }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file")
    }

    /// `swarm coordinator` as this cluster runs it (node 1, bootstrapping, on the same
    /// ports and data dir, logging to `coordinator.log`), not yet started.
    pub fn coordinator_command(&self) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("coordinator")
            .args(["--id", "1", "--bootstrap"])
            .arg("--data-dir")
            .arg(self.dir.path().join("coordinator"))
            .arg("--certs")
            .arg(&self.certs)
            .args(["--listen", &format!("127.0.0.1:{}", self.quic_port)])
            .args(["--advertise", &format!("localhost:{}", self.quic_port)])
            .args(["--api-listen", &format!("127.0.0.1:{}", self.api_port)])
            .arg("--token-file")
            .arg(self.dir.path().join("token"))
            .args([
                "--heartbeat-interval",
                "200ms",
                "--lease",
                "1500ms",
                "--retry-backoff",
                "50ms",
            ])
            .args(&self.coordinator_args)
            .env("SWARM_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(self.log("coordinator"));
        cmd
    }

    /// Start (or restart) the coordinator on the same ports and data dir.
    pub fn start_coordinator(&mut self) {
        let child = self
            .coordinator_command()
            .spawn()
            .expect("spawn coordinator");
        self.coordinator = Some(child);
    }

    /// SIGKILL the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_worker(&mut self, id: &str, slots: u32, agents: Option<&Path>) {
        self.start_worker_with(id, slots, agents, &[]);
    }

    /// [`Cluster::start_worker`] with more command-line arguments (labels, peer links).
    pub fn start_worker_with(
        &mut self,
        id: &str,
        slots: u32,
        agents: Option<&Path>,
        extra: &[&str],
    ) {
        let certs = self.certs.clone();
        self.start_worker_as(id, id, slots, agents, &certs, extra);
    }

    /// [`Cluster::start_worker_with`] under another `name` (its log is `<name>.log`, and
    /// [`Cluster::kill_worker`] takes it), with the certificates in `certs` (e.g. a
    /// certificate issued for this one worker).
    pub fn start_worker_as(
        &mut self,
        name: &str,
        id: &str,
        slots: u32,
        agents: Option<&Path>,
        certs: &Path,
        extra: &[&str],
    ) {
        let mut cmd = Command::new(bin());
        cmd.arg("worker")
            .args(["--coordinator", &format!("127.0.0.1:{}", self.quic_port)])
            .args(["--server-name", "localhost"])
            .arg("--certs")
            .arg(certs)
            .args(["--slots", &slots.to_string(), "--id", id])
            .env("SWARM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log(name));
        if let Some(a) = agents {
            cmd.arg("--agents").arg(a);
        }
        cmd.args(extra);
        let child = cmd.spawn().expect("spawn worker");
        self.workers.push((name.to_string(), child));
    }

    /// SIGTERM one worker (it keeps running until it has drained).
    pub fn term_worker(&self, id: &str) {
        let (_, c) = self
            .workers
            .iter()
            .find(|(w, _)| w == id)
            .expect("no such worker");
        sigterm(c);
    }

    /// Wait for worker `id` to exit (bounded), forget it, and return its exit status.
    pub async fn wait_worker_exit(&mut self, id: &str) -> ExitStatus {
        let pos = self
            .workers
            .iter()
            .position(|(w, _)| w == id)
            .expect("no such worker");
        let status = wait_exit(&mut self.workers[pos].1, &format!("worker {id}")).await;
        self.workers.remove(pos);
        status
    }

    /// Whether worker `id`'s process still runs (a worker that exited is reaped).
    pub fn worker_alive(&mut self, id: &str) -> bool {
        let (_, c) = self
            .workers
            .iter_mut()
            .find(|(w, _)| w == id)
            .expect("no such worker");
        c.try_wait().expect("try_wait").is_none()
    }

    /// The worker's log so far.
    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// SIGKILL one worker.
    pub fn kill_worker(&mut self, id: &str) {
        if let Some(pos) = self.workers.iter().position(|(w, _)| w == id) {
            let (_, mut c) = self.workers.remove(pos);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("API request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("API body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// Submits a task and waits for it (`?wait=30s`), asserting it succeeded; returns the
    /// task's id and its output parsed as JSON (agents here answer with a JSON document).
    pub async fn run_json_task(&self, body: Value) -> (u64, Value) {
        let (status, v) = self.post("/v1/tasks?wait=30s", body).await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["task"]["state"], "succeeded", "{v}");
        let output = serde_json::from_str(v["task"]["output"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("agent output is not JSON ({e}): {v}"));
        (v["id"].as_u64().expect("task id"), output)
    }

    /// `swarm <args>` against this cluster's API with its token: (exit code, stdout,
    /// stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_as(&self.token, args)
    }

    /// `swarm <args>` against this cluster's API with `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .args(args)
            .env("SWARM_API", &self.api)
            .env("SWARM_TOKEN", token)
            .env_remove("SWARM_CA")
            .output()
            .expect("run swarm");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Submit and return the task id, asserting the submit was accepted.
    pub async fn submit(&self, body: Value) -> u64 {
        let (status, v) = self.post("/v1/tasks", body).await;
        assert!(status == 201 || status == 200, "submit: {status} {v}");
        v["id"].as_u64().expect("task id")
    }

    /// Wait for the task to be final and return it.
    pub async fn wait_final(&self, id: u64) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, v) = self.get(&format!("/v1/tasks/{id}?wait=10s")).await;
            assert_eq!(status, 200, "get task {id}: {v}");
            let state = v["state"].as_str().unwrap_or("");
            if !matches!(
                state,
                "waiting" | "awaiting_approval" | "queued" | "running"
            ) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} not final in time: {v}"
            );
        }
    }

    /// Poll until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = self.http.get(format!("{}/ready", self.api)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            self.assert_coordinator_alive();
            assert!(
                Instant::now() < deadline,
                "coordinator not ready in time\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Poll until exactly these workers are connected.
    pub async fn wait_workers(&self, ids: &[&str]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, v) = self.get("/v1/workers").await;
            if status == 200 {
                let mut got: Vec<String> = v["workers"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|w| w["id"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                got.sort();
                let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
                want.sort();
                if got == want {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "workers {ids:?} not connected in time\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn assert_coordinator_alive(&self) {
        if let Some(c) = &self.coordinator {
            // try_wait needs &mut; read the process state instead (a dead child that was
            // not reaped yet is a zombie, state Z).
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            let alive = state.is_some_and(|s| s != "Z");
            assert!(alive, "coordinator process died\n{}", self.logs());
        }
    }

    /// Tail of every process log, for failure messages.
    pub fn logs(&self) -> String {
        log_tails(self.dir.path(), 40)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for (_, c) in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_coordinator();
    }
}
