//! A coordinator and a worker of the `swarm` binary as real processes, for the benchmarks
//! that measure the whole system from outside (`scale`, `rebuild_stall`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A loopback port that is free right now.
pub fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

/// One coordinator (node 1, bootstrapped) and one worker in `dir`: its data, the
/// certificates and token the caller made there, and one log file each. Both processes
/// are killed when this is dropped.
pub struct Processes {
    swarm: PathBuf,
    dir: PathBuf,
    /// The coordinator's QUIC port.
    pub quic: u16,
    /// The coordinator's HTTP API port.
    pub api: u16,
    coordinator_args: Vec<String>,
    coordinator: Option<Child>,
    worker: Option<Child>,
}

impl Processes {
    /// Picks free ports; starts nothing. `coordinator_args` are added to the
    /// coordinator's command line.
    pub fn new(swarm: &Path, dir: &Path, coordinator_args: Vec<String>) -> anyhow::Result<Self> {
        Ok(Processes {
            swarm: swarm.to_path_buf(),
            dir: dir.to_path_buf(),
            quic: free_port(true)?,
            api: free_port(false)?,
            coordinator_args,
            coordinator: None,
            worker: None,
        })
    }

    fn log(&self, name: &str) -> anyhow::Result<Stdio> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        Ok(Stdio::from(f))
    }

    /// Starts the coordinator (again, after [`Processes::kill_coordinator`]).
    pub fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.swarm)
            .args(["coordinator", "--id", "1", "--bootstrap"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--certs")
            .arg(self.dir.join("certs"))
            .arg("--token-file")
            .arg(self.dir.join("token"))
            .args(["--listen", &format!("127.0.0.1:{}", self.quic)])
            .args(["--advertise", &format!("127.0.0.1:{}", self.quic)])
            .args(["--api-listen", &format!("127.0.0.1:{}", self.api)])
            .args(&self.coordinator_args)
            .stdout(self.log("coordinator")?)
            .stderr(self.log("coordinator")?)
            .spawn()
            .with_context(|| format!("starting the coordinator {}", self.swarm.display()))?;
        self.coordinator = Some(child);
        Ok(())
    }

    /// Starts the worker `id` (`slots`: the worker's own default if `None`).
    pub fn start_worker(&mut self, id: &str, slots: Option<u32>) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.swarm);
        cmd.args([
            "worker",
            "--coordinator",
            &format!("127.0.0.1:{}", self.quic),
        ])
        .arg("--certs")
        .arg(self.dir.join("certs"))
        .args(["--id", id]);
        if let Some(s) = slots {
            cmd.args(["--slots", &s.to_string()]);
        }
        let child = cmd
            .stdout(self.log("worker")?)
            .stderr(self.log("worker")?)
            .spawn()
            .context("starting the worker")?;
        self.worker = Some(child);
        Ok(())
    }

    /// The coordinator's process id (0 if it is not running).
    pub fn pid(&self) -> u32 {
        self.coordinator.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL the coordinator and reap it.
    pub fn kill_coordinator(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.coordinator.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for mut c in [self.coordinator.take(), self.worker.take()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
