//! Several real `swarm coordinator` processes forming one Raft cluster on loopback, plus
//! workers that know every coordinator. Nodes can be SIGKILLed and restarted on the same
//! ports and data dirs.

use std::collections::BTreeMap;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{bin, log_tails, sigterm, wait_exit, WAIT};

/// A port that is free now, picked at random below Linux's ephemeral range (32768+), so
/// that the short-lived sockets other processes bind to port 0 cannot take it between
/// here and the node binding it, even across restarts.
fn free_port(udp: bool) -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seed = std::process::id() as u64 * 7919
        + SEQ.fetch_add(1, Ordering::Relaxed) * 104_729
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
    for i in 0..10_000u64 {
        let port = 20_000 + ((seed + i * 7_907) % 12_000) as u16;
        let free = if udp {
            UdpSocket::bind(("127.0.0.1", port)).is_ok()
        } else {
            TcpListener::bind(("127.0.0.1", port)).is_ok()
        };
        if free {
            return port;
        }
    }
    panic!("no free port");
}

fn free_tcp_port() -> u16 {
    free_port(false)
}

fn free_udp_port() -> u16 {
    free_port(true)
}

/// One coordinator's fixed coordinates.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: u64,
    pub api_port: u16,
    pub quic_port: u16,
    pub data_dir: PathBuf,
    /// `https` when the cluster runs with `--api-tls on`.
    pub scheme: &'static str,
}

impl NodeSpec {
    pub fn api(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.api_port)
    }
    pub fn raft_addr(&self) -> String {
        format!("localhost:{}", self.quic_port)
    }
    pub fn api_addr(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }
}

pub struct RaftCluster {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub token: String,
    pub nodes: BTreeMap<u64, NodeSpec>,
    /// Extra flags for every coordinator.
    pub coordinator_args: Vec<String>,
    /// Certificates of a node's own (see [`RaftCluster::issue`]); others use `certs`.
    pub node_certs: BTreeMap<u64, PathBuf>,
    procs: BTreeMap<u64, Child>,
    workers: Vec<(String, Child)>,
    pub http: reqwest::Client,
    scheme: &'static str,
}

impl RaftCluster {
    /// Certificates, a token and `n` node specs (ids 1..=n); nothing running yet.
    pub fn new(n: u64, extra: &[&str]) -> RaftCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let out = Command::new(bin())
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .output()
            .expect("run swarm certs init");
        assert!(out.status.success(), "certs init failed");
        let token = "cluster-token-0123456789".to_string();
        let tls = extra.windows(2).any(|w| w == ["--api-tls", "on"]);
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(15));
        if tls {
            // The API is verified against this cluster's CA, as the CLI does.
            let ca = std::fs::read(certs.join("ca.pem")).expect("ca.pem");
            http = http
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"));
        }
        std::fs::write(dir.path().join("token"), &token).expect("write token");
        let mut c = RaftCluster {
            certs,
            token,
            nodes: BTreeMap::new(),
            coordinator_args: extra.iter().map(|s| s.to_string()).collect(),
            node_certs: BTreeMap::new(),
            procs: BTreeMap::new(),
            workers: Vec::new(),
            http: http.build().expect("http client"),
            scheme: if tls { "https" } else { "http" },
            dir,
        };
        for id in 1..=n {
            c.add_spec(id);
        }
        c
    }

    /// Reserve ports and a data dir for node `id`.
    pub fn add_spec(&mut self, id: u64) -> NodeSpec {
        let spec = NodeSpec {
            id,
            api_port: free_tcp_port(),
            quic_port: free_udp_port(),
            data_dir: self.dir.path().join(format!("node-{id}")),
            scheme: self.scheme,
        };
        self.nodes.insert(id, spec.clone());
        spec
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file")
    }

    /// Start all nodes; node 1 bootstraps a cluster of every node in `nodes`.
    pub fn start_all(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.start_node(id, &[]);
        }
    }

    /// Start (or restart) node `id` with its usual flags plus `extra`.
    pub fn start_node(&mut self, id: u64, extra: &[&str]) {
        let spec = self.nodes[&id].clone();
        let mut cmd = Command::new(bin());
        cmd.arg("coordinator")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .arg("--certs")
            .arg(self.node_certs.get(&id).unwrap_or(&self.certs))
            .args(["--listen", &format!("127.0.0.1:{}", spec.quic_port)])
            .args(["--advertise", &spec.raft_addr()])
            .args(["--api-listen", &spec.api_addr()])
            .args(["--api-advertise", &spec.api_addr()])
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
            .args(extra)
            .env("SWARM_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(self.log(&format!("node-{id}")));
        if id == 1 && !extra.iter().any(|a| a.starts_with("--join")) {
            cmd.arg("--bootstrap");
            for (pid, p) in &self.nodes {
                if *pid != 1 && *pid <= 3 {
                    cmd.args([
                        "--peer",
                        &format!("{pid}={},{}", p.raft_addr(), p.api_addr()),
                    ]);
                }
            }
        }
        let child = cmd.spawn().expect("spawn coordinator");
        self.procs.insert(id, child);
    }

    /// A certificate of its own for one node (`role` coordinator or worker) named
    /// `name`, signed by the cluster CA, in a new directory (returned).
    pub fn issue(&self, role: &str, name: &str) -> PathBuf {
        let out = self.dir.path().join(format!("certs-{name}"));
        let done = Command::new(bin())
            .args(["certs", "issue", "--role", role, "--name", name, "--ca-dir"])
            .arg(&self.certs)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run swarm certs issue");
        assert!(
            done.status.success(),
            "certs issue: {}",
            String::from_utf8_lossy(&done.stderr)
        );
        out
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.procs.get(&id).map(Child::id)
    }

    /// SIGTERM node `id` (a graceful stop: a leader hands leadership over first).
    pub fn term_node(&self, id: u64) {
        sigterm(self.procs.get(&id).expect("no such node"));
    }

    /// Wait for node `id` to exit (bounded), forget it, and return its exit status.
    pub async fn wait_node_exit(&mut self, id: u64) -> std::process::ExitStatus {
        let status = {
            let child = self.procs.get_mut(&id).expect("no such node");
            wait_exit(child, &format!("node {id}")).await
        };
        self.procs.remove(&id);
        status
    }

    /// Node `id`'s log so far.
    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default()
    }

    /// SIGKILL node `id`.
    pub fn kill_node(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `localhost:q1,localhost:q2,...` of the first three nodes.
    pub fn quic_list(&self) -> String {
        self.nodes
            .values()
            .map(|n| n.raft_addr())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `http://...,http://...` of every node.
    pub fn api_list(&self) -> String {
        self.nodes
            .values()
            .map(|n| n.api())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn start_worker(&mut self, id: &str, slots: u32, agents: Option<&Path>) {
        let certs = self.certs.clone();
        self.start_worker_certs(id, slots, agents, &certs);
    }

    /// [`RaftCluster::start_worker`] with the certificates in `certs` (e.g. issued for
    /// this one worker).
    pub fn start_worker_certs(
        &mut self,
        id: &str,
        slots: u32,
        agents: Option<&Path>,
        certs: &Path,
    ) {
        let mut cmd = Command::new(bin());
        cmd.arg("worker")
            .args(["--coordinator", &self.quic_list()])
            .arg("--certs")
            .arg(certs)
            .args(["--slots", &slots.to_string(), "--id", id])
            .env("SWARM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log(id));
        if let Some(a) = agents {
            cmd.arg("--agents").arg(a);
        }
        let child = cmd.spawn().expect("spawn worker");
        self.workers.push((id.to_string(), child));
    }

    /// `swarm <args>` with the cluster's token, returning (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .args(args)
            .env("SWARM_TOKEN", &self.token)
            .env("SWARM_CA", self.certs.join("ca.pem"))
            .output()
            .expect("run swarm");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A request to node `id`'s API; `None` when it cannot be reached.
    pub async fn request(
        &self,
        id: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.nodes[&id].api()))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.ok()?;
        let status = resp.status().as_u16();
        let text = resp.text().await.ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    pub async fn get(&self, id: u64, path: &str) -> Option<(u16, Value)> {
        self.request(id, reqwest::Method::GET, path, None).await
    }

    /// The node's own report, if it answers.
    pub async fn node_status(&self, id: u64) -> Option<Value> {
        match self.get(id, "/v1/node").await {
            Some((200, v)) => Some(v),
            _ => None,
        }
    }

    /// Wait until the running nodes agree on one leader among them; returns its id.
    pub async fn wait_leader(&self) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut leaders = Vec::new();
            let mut running = 0;
            for id in self.procs.keys() {
                running += 1;
                if let Some(s) = self.node_status(*id).await {
                    if let Some(l) = s["leader"].as_u64() {
                        leaders.push(l);
                    }
                }
            }
            if leaders.len() == running
                && leaders.windows(2).all(|w| w[0] == w[1])
                && leaders.first().is_some_and(|l| self.procs.contains_key(l))
            {
                let l = leaders[0];
                if let Some(s) = self.node_status(l).await {
                    if s["role"] == "leader" {
                        return l;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader in time\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Poll node `id` until `GET path` satisfies `pred`.
    pub async fn wait_for(&self, id: u64, path: &str, what: &str, pred: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((200, v)) = self.get(id, path).await {
                if pred(&v) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not in time\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Tail of every process log, for failure messages.
    pub fn logs(&self) -> String {
        log_tails(self.dir.path(), 30)
    }
}

impl Drop for RaftCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for (_, c) in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.kill_node(id);
        }
    }
}
