//! Network partitions between coordinators on loopback, with iptables.
//!
//! A coordinator's QUIC endpoint listens on its one UDP port and dials its peers from it
//! too, so the Raft traffic between two nodes is exactly the UDP packets between their
//! two ports. The rules live in a dedicated chain, [`CHAIN`], jumped to from `INPUT`
//! (every loopback packet passes `INPUT` on its way in); the chain is flushed and deleted
//! at the start (left over from a run that was killed) and at the end.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::cluster::Supervisor;

pub const CHAIN: &str = "SWARM_NEMESIS";

pub struct Firewall {
    sup: Arc<Supervisor>,
}

impl Firewall {
    /// Sets up the chain and checks that a rule in it really drops a loopback UDP
    /// packet. `Err` says why partitions cannot be used (e.g. no permission); nothing is
    /// left behind then.
    pub fn setup(sup: Arc<Supervisor>) -> Result<Firewall, String> {
        let fw = Firewall { sup };
        fw.teardown();
        let made = fw
            .ipt(&["-N", CHAIN])
            .and_then(|()| fw.ipt(&["-I", "INPUT", "1", "-j", CHAIN]))
            .and_then(|()| fw.self_test());
        match made {
            Ok(()) => Ok(fw),
            Err(e) => {
                fw.teardown();
                Err(e)
            }
        }
    }

    fn ipt(&self, args: &[&str]) -> Result<(), String> {
        let out = self
            .sup
            .run_command(Command::new("iptables").arg("-w").args(args))
            .map_err(|e| format!("running iptables: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("# Warning"))
            .collect();
        Err(format!(
            "iptables {} failed ({}): {}",
            args.join(" "),
            out.status,
            msg.join(" ").trim()
        ))
    }

    fn drop_rule(&self, action: &str, from: u16, to: u16) -> Result<(), String> {
        self.ipt(&[
            action,
            CHAIN,
            "-i",
            "lo",
            "-p",
            "udp",
            "--sport",
            &from.to_string(),
            "--dport",
            &to.to_string(),
            "-j",
            "DROP",
        ])
    }

    /// A datagram between two fresh sockets is dropped with a rule and delivered without.
    fn self_test(&self) -> Result<(), String> {
        let io = |e: std::io::Error| format!("firewall self-test: {e}");
        let a = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io)?;
        let b = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io)?;
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .map_err(io)?;
        let pa = a.local_addr().map_err(io)?.port();
        let pb = b.local_addr().map_err(io)?.port();
        self.drop_rule("-A", pa, pb)?;
        a.send_to(b"cut", ("127.0.0.1", pb)).map_err(io)?;
        let mut buf = [0u8; 16];
        let dropped = b.recv_from(&mut buf).is_err();
        self.heal()?;
        if !dropped {
            return Err(
                "firewall self-test: a rule in the chain did not drop a loopback UDP datagram"
                    .into(),
            );
        }
        a.send_to(b"open", ("127.0.0.1", pb)).map_err(io)?;
        b.recv_from(&mut buf)
            .map_err(|e| format!("firewall self-test: nothing delivered once healed: {e}"))?;
        Ok(())
    }

    /// Drops every UDP datagram between port `a` and each of `others`, both ways.
    pub fn cut(&self, a: u16, others: &[u16]) -> Result<(), String> {
        for &b in others {
            self.drop_rule("-A", a, b)?;
            self.drop_rule("-A", b, a)?;
        }
        Ok(())
    }

    /// Removes every rule of the chain.
    pub fn heal(&self) -> Result<(), String> {
        self.ipt(&["-F", CHAIN])
    }

    /// Removes the jump and the chain (errors ignored: they may not exist).
    pub fn teardown(&self) {
        for _ in 0..16 {
            if self.ipt(&["-D", "INPUT", "-j", CHAIN]).is_err() {
                break;
            }
        }
        let _ = self.ipt(&["-F", CHAIN]);
        let _ = self.ipt(&["-X", CHAIN]);
    }
}
