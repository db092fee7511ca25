//! The nemesis: one fault at a time, chosen by a seeded RNG, each healed (and the cluster
//! given a leader again) before the next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};

use super::cluster::{Exit, Layout, Supervisor};
use super::firewall::Firewall;
use super::load::Api;
use super::now_ns;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    KillCoordinator,
    StopLeader,
    KillWorker,
    StopWorker,
    Partition,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::KillCoordinator,
        FaultKind::StopLeader,
        FaultKind::KillWorker,
        FaultKind::StopWorker,
        FaultKind::Partition,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::KillCoordinator => "kill_coordinator",
            FaultKind::StopLeader => "stop_leader",
            FaultKind::KillWorker => "kill_worker",
            FaultKind::StopWorker => "stop_worker",
            FaultKind::Partition => "partition",
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// The process (`node-<id>` or a worker) it hit.
    pub target: String,
    /// The leader when the fault began, as the nodes reported it.
    pub leader_before: Option<u64>,
    /// Whether the fault hit the leader.
    pub hit_leader: bool,
    /// Unix ns when it began and when it was healed.
    pub start_ns: u64,
    pub heal_ns: u64,
    /// The leader's term when the fault began.
    pub term_before: Option<u64>,
    /// For a fault on the leader: when a leader of a later term was first seen (unix
    /// ns; polled every 100 ms).
    pub new_term_ns: Option<u64>,
    /// Whether a node other than the old leader led while the fault held.
    pub other_node_led: bool,
    /// The agreed leader once healed, and how long after the heal all three nodes
    /// agreed on it (`None`: not within the bound).
    pub leader_after: Option<u64>,
    /// The term of `leader_after` (terms rise with every election, including those a
    /// cut-off node forces when it comes back).
    pub term_after: Option<u64>,
    pub recovered_after_ms: Option<u64>,
    pub note: String,
}

impl Fault {
    pub fn to_json(&self, t0_ns: u64) -> Value {
        json!({
            "kind": self.kind.as_str(),
            "target": self.target,
            "hit_leader": self.hit_leader,
            "leader_before": self.leader_before,
            "at_s": (self.start_ns.saturating_sub(t0_ns)) as f64 / 1e9,
            "held_ms": (self.heal_ns.saturating_sub(self.start_ns)) / 1_000_000,
            "term_before": self.term_before,
            "new_term_leader_after_ms": self.new_term_ns.map(|t| t.saturating_sub(self.start_ns) / 1_000_000),
            "other_node_led_during_fault": self.other_node_led,
            "leader_after": self.leader_after,
            "term_after": self.term_after,
            "recovered_after_ms": self.recovered_after_ms,
            "note": self.note,
        })
    }
}

/// What the nemesis works with.
pub struct Nemesis {
    pub layout: Layout,
    pub sup: Arc<Supervisor>,
    pub firewall: Option<Arc<Firewall>>,
    pub api: Api,
    pub rng: StdRng,
    /// Unix ns when the load began.
    pub t0_ns: u64,
    pub faults: Vec<Fault>,
    /// Processes that exited by themselves (restarted when seen).
    pub exits: Vec<Exit>,
    /// Things that went wrong on the nemesis' side (a restart that failed, ...).
    pub problems: Vec<String>,
}

/// A node's own view: `(role, term, leader)`.
async fn node_view(api: &Api, idx: usize) -> Option<(String, u64, Option<u64>)> {
    match api.get(idx, "/v1/node", Duration::from_millis(800)).await {
        Ok((200, v)) => Some((
            v["role"].as_str().unwrap_or("").to_string(),
            v["term"].as_u64().unwrap_or(0),
            v["leader"].as_u64(),
        )),
        _ => None,
    }
}

impl Nemesis {
    fn node_name(&self, id: u64) -> String {
        self.layout.node(id).name()
    }

    /// The node that says it leads, with the highest term among those that answer
    /// (a deposed leader cut off from the others may still think it leads, in an older
    /// term). Nodes that are stopped or down are not asked.
    pub async fn leader(&self) -> Option<(u64, u64)> {
        let mut best: Option<(u64, u64)> = None;
        for n in &self.layout.nodes {
            if !self.sup.is_up(&n.name()) {
                continue;
            }
            if let Some((role, term, _)) = node_view(&self.api, (n.id - 1) as usize).await {
                if role == "leader" && best.is_none_or(|(_, t)| term > t) {
                    best = Some((n.id, term));
                }
            }
        }
        best
    }

    /// A leader, polling for at most `within`.
    pub async fn wait_leader(&self, within: Duration) -> Option<(u64, u64)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node answers and names the same leader, which says it leads; polls for at
    /// most `within`. Returns the leader and its term, and, when that took more than
    /// 5 s, what each node said at the first poll after those 5 s.
    pub async fn wait_agreed_leader(
        &self,
        within: Duration,
    ) -> (Option<(u64, u64)>, Option<String>) {
        let began = Instant::now();
        let deadline = began + within;
        let mut slow = None;
        loop {
            let mut views = Vec::new();
            for n in &self.layout.nodes {
                views.push(node_view(&self.api, (n.id - 1) as usize).await);
            }
            if slow.is_none() && began.elapsed() > Duration::from_secs(5) {
                let described: Vec<String> = views
                    .iter()
                    .zip(&self.layout.nodes)
                    .map(|(v, n)| match v {
                        Some((role, term, leader)) => format!(
                            "node-{}: {role} in term {term}, leader {}",
                            n.id,
                            leader.map_or("none".into(), |l| format!("node-{l}"))
                        ),
                        None => format!("node-{}: no answer", n.id),
                    })
                    .collect();
                slow = Some(described.join("; "));
            }
            if let Some(Some((_, _, Some(l)))) = views.first() {
                let l = *l;
                let agreed = views
                    .iter()
                    .all(|v| v.as_ref().is_some_and(|(_, _, x)| *x == Some(l)));
                let leads = views
                    .get((l as usize).wrapping_sub(1))
                    .and_then(|v| v.as_ref())
                    .filter(|(role, _, _)| role == "leader");
                if let (true, Some((_, term, _))) = (agreed, leads) {
                    return (Some((l, *term)), slow);
                }
            }
            if Instant::now() >= deadline {
                return (None, slow);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls every up node until `until` (or until one answers): the first time a node
    /// says it leads in a term after `term` (unix ns), and whether that node is not `old`.
    async fn watch_new_term(&self, old: u64, term: u64, until: Instant) -> Option<(u64, bool)> {
        while Instant::now() < until {
            for n in &self.layout.nodes {
                if !self.sup.is_up(&n.name()) {
                    continue;
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if let Ok((200, v)) = self
                    .api
                    .get(
                        (n.id - 1) as usize,
                        "/v1/node",
                        left.min(Duration::from_millis(500)),
                    )
                    .await
                {
                    if v["role"] == "leader" && v["term"].as_u64().is_some_and(|t| t > term) {
                        return Some((now_ns(), n.id != old));
                    }
                }
            }
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(100))).await;
        }
        None
    }

    /// While a fault on the leader `old` (of `term`) holds, until `until`: notes when a
    /// leader of a later term appears; sleeps out the rest of the hold.
    async fn hold_watching(&self, f: &mut Fault, old: u64, until: Instant) {
        if let (true, Some(term)) = (f.hit_leader, f.term_before) {
            if let Some((at, other)) = self.watch_new_term(old, term, until).await {
                f.new_term_ns = Some(at);
                f.other_node_led = other;
            }
        }
        tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    }

    /// Starts process `name` (again).
    fn start(&mut self, name: &str) {
        let started = self
            .layout
            .command_of(name)
            .and_then(|cmd| self.sup.spawn(name, cmd));
        if let Err(e) = started {
            self.problems.push(format!("starting {name}: {e:#}"));
        }
    }

    /// Records processes that exited by themselves, and starts them again.
    pub fn restart_exited(&mut self) {
        for exit in self.sup.poll_exits() {
            eprintln!(
                "nemesis: {} exited by itself ({}); starting it again",
                exit.name, exit.status
            );
            let name = exit.name.clone();
            self.exits.push(exit);
            self.start(&name);
        }
    }

    /// Every process runs, nothing is stopped, no partition is in place.
    pub fn heal_all(&mut self) {
        if let Some(fw) = &self.firewall {
            if let Err(e) = fw.heal() {
                self.problems.push(format!("healing partitions: {e}"));
            }
        }
        self.sup.cont_all();
        self.restart_exited();
        for name in self.layout.names() {
            if !self.sup.is_running(&name) {
                self.start(&name);
            }
        }
    }

    /// A random hold time in `[lo, hi)` milliseconds.
    fn hold(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.rng.gen_range(lo..hi))
    }

    /// The leader with probability `p`, else another node (any node if no leader is
    /// known).
    fn pick_node(&mut self, leader: Option<u64>, p: f64) -> u64 {
        match leader {
            Some(l) if self.rng.gen_bool(p) => l,
            Some(l) => {
                let others: Vec<u64> = (1..=3).filter(|&i| i != l).collect();
                others.choose(&mut self.rng).copied().unwrap_or(l)
            }
            None => self.rng.gen_range(1..=3),
        }
    }

    fn pick_worker(&mut self) -> String {
        self.layout
            .workers
            .choose(&mut self.rng)
            .map(|w| w.name.clone())
            .unwrap_or_default()
    }

    /// Injects faults until `until`: one at a time, 2-5 s after the previous one was
    /// healed and a leader agreed on; none that could not end (with ~6 s to spare) before
    /// `until`.
    pub async fn run(&mut self, until: Instant) {
        let partitions = self.firewall.is_some();
        let weights: Vec<(FaultKind, u32)> = FaultKind::ALL
            .iter()
            .map(|&k| {
                let w = match k {
                    FaultKind::KillCoordinator => 3,
                    FaultKind::StopLeader => 2,
                    FaultKind::KillWorker => 2,
                    FaultKind::StopWorker => 2,
                    FaultKind::Partition if partitions => 3,
                    FaultKind::Partition => 0,
                };
                (k, w)
            })
            .collect();
        loop {
            let pause = self.hold(2_000, 5_000);
            if Instant::now() + pause + Duration::from_secs(6) >= until {
                break;
            }
            tokio::time::sleep(pause).await;
            self.restart_exited();
            let kind = weights
                .choose_weighted(&mut self.rng, |(_, w)| *w)
                .map(|(k, _)| *k)
                .unwrap_or(FaultKind::KillWorker);
            let fault = self.inject(kind).await;
            eprintln!(
                "nemesis: {:>5.1}s {} {}{} held {} ms{}{}",
                (fault.start_ns.saturating_sub(self.t0_ns)) as f64 / 1e9,
                fault.kind.as_str(),
                fault.target,
                if fault.hit_leader { " (leader)" } else { "" },
                (fault.heal_ns.saturating_sub(fault.start_ns)) / 1_000_000,
                match fault.new_term_ns {
                    Some(t) if fault.hit_leader => format!(
                        ", a later term's leader {} ms in",
                        t.saturating_sub(fault.start_ns) / 1_000_000
                    ),
                    _ => String::new(),
                },
                match (
                    fault.leader_after,
                    fault.term_after,
                    fault.recovered_after_ms
                ) {
                    (Some(l), Some(t), Some(ms)) => format!(
                        "; term {} -> {t}, node-{l} agreed leader {ms} ms after the heal",
                        fault.term_before.map_or("?".into(), |t| t.to_string())
                    ),
                    _ => "; NO agreed leader within 30 s of the heal".into(),
                },
            );
            if !fault.note.is_empty() {
                eprintln!("nemesis:        ({})", fault.note);
            }
            self.faults.push(fault);
        }
    }

    async fn inject(&mut self, kind: FaultKind) -> Fault {
        let current = self.wait_leader(Duration::from_secs(5)).await;
        let leader = current.map(|(id, _)| id);
        let mut f = Fault {
            kind,
            target: String::new(),
            leader_before: leader,
            hit_leader: false,
            start_ns: 0,
            heal_ns: 0,
            term_before: current.map(|(_, term)| term),
            new_term_ns: None,
            other_node_led: false,
            leader_after: None,
            term_after: None,
            recovered_after_ms: None,
            note: String::new(),
        };
        match kind {
            FaultKind::KillCoordinator => {
                let id = self.pick_node(leader, 0.7);
                let name = self.node_name(id);
                f.target = name.clone();
                f.hit_leader = leader == Some(id);
                let hold = self.hold(1_000, 5_000);
                f.start_ns = now_ns();
                self.sup.kill(&name);
                self.hold_watching(&mut f, id, Instant::now() + hold).await;
                self.start(&name);
                f.heal_ns = now_ns();
            }
            FaultKind::StopLeader => {
                let id = match leader {
                    Some(l) => l,
                    None => {
                        f.note = "no leader known: stopped a random node".into();
                        self.rng.gen_range(1..=3)
                    }
                };
                let name = self.node_name(id);
                f.target = name.clone();
                f.hit_leader = leader == Some(id);
                // Well past the election timeout (300-600 ms) and the workers' 1.5 s
                // silence timeout.
                let hold = self.hold(2_000, 5_000);
                f.start_ns = now_ns();
                if let Err(e) = self.sup.signal(&name, Signal::SIGSTOP) {
                    f.note = format!("SIGSTOP failed: {e:#}");
                }
                self.hold_watching(&mut f, id, Instant::now() + hold).await;
                if let Err(e) = self.sup.signal(&name, Signal::SIGCONT) {
                    self.problems.push(format!("SIGCONT {name}: {e:#}"));
                }
                f.heal_ns = now_ns();
                if f.hit_leader && !f.other_node_led {
                    f.note = "no other node led while the leader was stopped".into();
                }
            }
            FaultKind::KillWorker => {
                let name = self.pick_worker();
                f.target = name.clone();
                f.start_ns = now_ns();
                self.sup.kill(&name);
                let hold = self.hold(1_000, 4_000);
                tokio::time::sleep(hold).await;
                self.start(&name);
                f.heal_ns = now_ns();
            }
            FaultKind::StopWorker => {
                let name = self.pick_worker();
                f.target = name.clone();
                let hold = self.hold(2_000, 5_000);
                f.start_ns = now_ns();
                if let Err(e) = self.sup.signal(&name, Signal::SIGSTOP) {
                    f.note = format!("SIGSTOP failed: {e:#}");
                }
                tokio::time::sleep(hold).await;
                if let Err(e) = self.sup.signal(&name, Signal::SIGCONT) {
                    self.problems.push(format!("SIGCONT {name}: {e:#}"));
                }
                f.heal_ns = now_ns();
            }
            FaultKind::Partition => {
                let id = self.pick_node(leader, 0.6);
                let name = self.node_name(id);
                f.target = name;
                f.hit_leader = leader == Some(id);
                let port = self.layout.node(id).quic;
                let others: Vec<u16> = self
                    .layout
                    .nodes
                    .iter()
                    .filter(|n| n.id != id)
                    .map(|n| n.quic)
                    .collect();
                let hold = self.hold(3_000, 7_000);
                f.start_ns = now_ns();
                let cut = match &self.firewall {
                    Some(fw) => fw.cut(port, &others),
                    None => Err("no firewall".into()),
                };
                if let Err(e) = cut {
                    f.note = format!("partition not in place: {e}");
                }
                self.hold_watching(&mut f, id, Instant::now() + hold).await;
                if let Some(fw) = &self.firewall {
                    if let Err(e) = fw.heal() {
                        self.problems.push(format!("healing the partition: {e}"));
                    }
                }
                f.heal_ns = now_ns();
                if f.hit_leader && !f.other_node_led && f.note.is_empty() {
                    f.note = "no other node led while the leader was cut off".into();
                }
            }
        }
        // Healed: the cluster agrees on a leader again before the next fault.
        let healed = Instant::now();
        if let (true, None, Some(term)) = (f.hit_leader, f.new_term_ns, f.term_before) {
            let old = leader.unwrap_or(0);
            if let Some((at, other)) = self
                .watch_new_term(old, term, Instant::now() + Duration::from_secs(15))
                .await
            {
                f.new_term_ns = Some(at);
                f.other_node_led = other;
            }
        }
        let (agreed, slow) = self.wait_agreed_leader(Duration::from_secs(30)).await;
        if let Some(views) = slow {
            if !f.note.is_empty() {
                f.note.push_str("; ");
            }
            f.note.push_str(&format!(
                "5 s after the heal the nodes still disagreed: {views}"
            ));
        }
        f.leader_after = agreed.map(|(l, _)| l);
        f.term_after = agreed.map(|(_, t)| t);
        if f.leader_after.is_some() {
            f.recovered_after_ms = Some(healed.elapsed().as_millis() as u64);
        }
        f
    }

    /// Every worker is connected to the leader, polling for at most `within`.
    pub async fn wait_workers(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let want = self.layout.workers.len();
        loop {
            for i in 0..self.api.urls.len() {
                if let Ok((200, v)) = self.api.get(i, "/v1/workers", Duration::from_secs(2)).await {
                    let n = v["workers"].as_array().map_or(0, Vec::len);
                    if n == want {
                        return true;
                    }
                    break;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
