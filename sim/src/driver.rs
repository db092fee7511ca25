//! The fault driver: applies a schedule of [`Episode`]s to the simulation between steps.
//!
//! Timed faults (partitions, holds, loss, latency, crashes) start and end at their
//! episode's times. Membership changes ([`Fault::Replace`], [`Fault::Rejoin`]) are handed
//! to the run's operator ([`crate::membership`]) one at a time: the driver does the parts
//! that act on hosts (activating a spare host, crashing a node that is to rejoin, shutting
//! a removed node's host down for good, wiping a data dir) and the operator the parts that
//! go through the cluster (adding and removing nodes).
//!
//! Fault targets name coordinators by position among the *active* hosts (those running,
//! or meant to run, a node of the cluster), so a schedule keeps aiming at the cluster as
//! its membership changes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::faults::{Episode, Fault, Network, Target};
use crate::scenario::{data_dir, lock, Job, Request, SharedRef};

/// The simulated hosts, by role.
pub(crate) struct Hosts {
    /// Every coordinator host, spares included, in host order (`c1`, `c2`, ...).
    pub coordinators: Vec<IpAddr>,
    pub workers: Vec<IpAddr>,
    pub clients: Vec<IpAddr>,
}

/// Applies the fault schedule between simulation steps.
pub(crate) struct Driver {
    /// Start and end events, in time order: (time, start?, episode index). Membership
    /// changes have a start only.
    events: Vec<(Duration, bool, usize)>,
    next: usize,
    episodes: Vec<Episode>,
    /// The coordinator hosts each episode resolved its targets to.
    resolved: BTreeMap<usize, Vec<usize>>,
    hosts: Hosts,
    net: Network,
    /// Crash reference counts per host.
    crashed: BTreeMap<IpAddr, u32>,
    /// Hosts shut down for good (their node was removed from the cluster).
    retired: BTreeSet<IpAddr>,
    /// Hosts a rejoin keeps down (holding one crash reference) until their new node is
    /// set up.
    rejoining: BTreeSet<IpAddr>,
    loss: Vec<(usize, f64)>,
    latency: Vec<(usize, u64)>,
    shared: SharedRef,
    healed: bool,
    /// Membership changes that are due, waiting for the operator to be free.
    waiting: VecDeque<usize>,
    /// The Raft id the next new node gets (ids are never reused).
    next_node_id: u64,
    scratch: PathBuf,
}

impl Driver {
    pub(crate) fn new(
        episodes: Vec<Episode>,
        hosts: Hosts,
        shared: SharedRef,
        scratch: PathBuf,
        next_node_id: u64,
    ) -> Self {
        let mut events: Vec<(Duration, bool, usize)> = episodes
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                let end = (!e.fault.is_membership()).then_some((e.end, false, i));
                std::iter::once((e.start, true, i)).chain(end)
            })
            .collect();
        // Ends before starts at the same instant; otherwise schedule order.
        events.sort_by_key(|(t, start, i)| (*t, *start, *i));
        Driver {
            events,
            next: 0,
            episodes,
            resolved: BTreeMap::new(),
            hosts,
            net: Network::default(),
            crashed: BTreeMap::new(),
            retired: BTreeSet::new(),
            rejoining: BTreeSet::new(),
            loss: Vec::new(),
            latency: Vec::new(),
            shared,
            healed: false,
            waiting: VecDeque::new(),
            next_node_id,
            scratch,
        }
    }

    fn log(&self, at: Duration, line: String) {
        lock(&self.shared)
            .log
            .push(format!("{:>8.3}s {line}", at.as_secs_f64()));
    }

    /// Coordinator hosts that run (or are meant to run) a node of the cluster, in host
    /// order: not spares yet to be used, not retired.
    fn active(&self) -> Vec<usize> {
        let s = lock(&self.shared);
        s.slots
            .iter()
            .enumerate()
            .filter(|(i, slot)| {
                slot.node.is_some() && !self.retired.contains(&self.hosts.coordinators[*i])
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// `c3 (n5)`: a host and the node it runs.
    fn name(&self, host: usize) -> String {
        match lock(&self.shared).slots[host].node {
            Some(n) => format!("c{} (n{n})", host + 1),
            None => format!("c{}", host + 1),
        }
    }

    /// The active host that most recently claimed leadership (highest term) among those
    /// running; if none does, the running one `pick` selects.
    fn leader(&self, pick: usize) -> usize {
        let active = self.active();
        let roles = lock(&self.shared).roles.clone();
        let running: Vec<usize> = active
            .iter()
            .copied()
            .filter(|i| !self.crashed.contains_key(&self.hosts.coordinators[*i]))
            .collect();
        roles
            .iter()
            .filter(|(i, (leader, _))| *leader && running.contains(i))
            .max_by_key(|(_, (_, term))| *term)
            .map(|(i, _)| *i)
            .unwrap_or_else(|| match running.get(pick % running.len().max(1)) {
                Some(i) => *i,
                None => active.first().copied().unwrap_or(0),
            })
    }

    /// The coordinator host `t` means now, for episode `ep`.
    fn resolve(&self, ep: usize, t: Target) -> usize {
        match t {
            Target::Node(k) => {
                let active = self.active();
                active[k % active.len()]
            }
            Target::Leader => self.leader(ep),
        }
    }

    /// An active host other than `a`.
    fn other(&self, a: usize) -> usize {
        let active = self.active();
        let at = active.iter().position(|h| *h == a).unwrap_or(0);
        active[(at + 1) % active.len()]
    }

    pub(crate) fn tick(&mut self, sim: &mut turmoil::Sim<'_>, heal_at: Duration) {
        let now = sim.elapsed();
        self.serve_requests(sim, now);
        if self.healed {
            return;
        }
        if now >= heal_at {
            self.heal(sim, now);
            return;
        }
        while let Some(&(at, start, i)) = self.events.get(self.next) {
            if at > now {
                break;
            }
            self.next += 1;
            if self.episodes[i].fault.is_membership() {
                self.waiting.push_back(i);
            } else if start {
                self.start(sim, i, now);
            } else {
                self.end(sim, i, now);
            }
        }
        if !self.waiting.is_empty() && !lock(&self.shared).admin.busy {
            if let Some(i) = self.waiting.pop_front() {
                self.begin_membership(sim, i, now);
            }
        }
    }

    fn start(&mut self, sim: &mut turmoil::Sim<'_>, i: usize, now: Duration) {
        let fault = self.episodes[i].fault;
        let c = self.hosts.coordinators.clone();
        let mut nodes = Vec::new();
        match fault {
            Fault::IsolateFromPeers(t) => {
                let n = self.resolve(i, t);
                nodes.push(n);
                for (j, ip) in c.iter().enumerate() {
                    if j != n {
                        self.net.drop_dir(c[n], *ip, true);
                        self.net.drop_dir(*ip, c[n], true);
                    }
                }
            }
            Fault::IsolateFully(t) => {
                let n = self.resolve(i, t);
                nodes.push(n);
                for ip in self.all_hosts() {
                    if ip != c[n] {
                        self.net.drop_dir(c[n], ip, true);
                        self.net.drop_dir(ip, c[n], true);
                    }
                }
            }
            Fault::OneWay { from, to } => {
                let a = self.resolve(i, from);
                let mut b = self.resolve(i, to);
                if a == b {
                    b = self.other(a);
                }
                nodes.extend([a, b]);
                self.net.drop_dir(c[a], c[b], true);
            }
            Fault::Hold(x, y) => {
                let a = self.resolve(i, x);
                let mut b = self.resolve(i, y);
                if a == b {
                    b = self.other(a);
                }
                nodes.extend([a, b]);
                self.net.hold(c[a], c[b], true);
            }
            Fault::HoldWorker(x, w) => {
                let a = self.resolve(i, x);
                nodes.push(a);
                self.net.hold(c[a], self.hosts.workers[w], true);
            }
            Fault::Loss(p) => {
                self.loss.push((i, p));
                self.apply_loss(sim);
            }
            Fault::Latency(ms) => {
                self.latency.push((i, ms));
                self.apply_latency(sim);
            }
            Fault::CrashCoordinator(t) => {
                let n = self.resolve(i, t);
                nodes.push(n);
                self.crash_coordinator(sim, n);
            }
            Fault::CrashWorker(w) => {
                let ip = self.hosts.workers[w];
                self.crash(sim, ip);
            }
            Fault::Replace(_) | Fault::Rejoin(_) => {}
        }
        let names: Vec<String> = nodes.iter().map(|n| self.name(*n)).collect();
        self.resolved.insert(i, nodes);
        self.log(now, format!("start #{i}: {fault} {names:?}"));
        for l in self.net.apply(sim) {
            self.log(now, format!("  link {l}"));
        }
    }

    fn end(&mut self, sim: &mut turmoil::Sim<'_>, i: usize, now: Duration) {
        let fault = self.episodes[i].fault;
        let nodes = self.resolved.remove(&i).unwrap_or_default();
        let c = self.hosts.coordinators.clone();
        match fault {
            Fault::IsolateFromPeers(_) => {
                let n = nodes[0];
                for (j, ip) in c.iter().enumerate() {
                    if j != n {
                        self.net.drop_dir(c[n], *ip, false);
                        self.net.drop_dir(*ip, c[n], false);
                    }
                }
            }
            Fault::IsolateFully(_) => {
                let n = nodes[0];
                for ip in self.all_hosts() {
                    if ip != c[n] {
                        self.net.drop_dir(c[n], ip, false);
                        self.net.drop_dir(ip, c[n], false);
                    }
                }
            }
            Fault::OneWay { .. } => self.net.drop_dir(c[nodes[0]], c[nodes[1]], false),
            Fault::Hold(..) => self.net.hold(c[nodes[0]], c[nodes[1]], false),
            Fault::HoldWorker(_, w) => self.net.hold(c[nodes[0]], self.hosts.workers[w], false),
            Fault::Loss(_) => {
                self.loss.retain(|(e, _)| *e != i);
                self.apply_loss(sim);
            }
            Fault::Latency(_) => {
                self.latency.retain(|(e, _)| *e != i);
                self.apply_latency(sim);
            }
            Fault::CrashCoordinator(_) => self.restart(sim, c[nodes[0]]),
            Fault::CrashWorker(w) => {
                let ip = self.hosts.workers[w];
                self.restart(sim, ip);
            }
            Fault::Replace(_) | Fault::Rejoin(_) => {}
        }
        self.log(now, format!("end #{i}: {fault}"));
        for l in self.net.apply(sim) {
            self.log(now, format!("  link {l}"));
        }
    }

    /// Set up membership change `i` and hand it to the operator.
    fn begin_membership(&mut self, sim: &mut turmoil::Sim<'_>, i: usize, now: Duration) {
        let fault = self.episodes[i].fault;
        let job = match fault {
            Fault::Replace(t) => {
                let old_host = self.resolve(i, t);
                let mut s = lock(&self.shared);
                let spare = s
                    .slots
                    .iter()
                    .position(|slot| slot.node.is_none() && !slot.retired);
                match (spare, s.slots[old_host].node) {
                    (Some(new_host), Some(old_id)) => {
                        let new_id = self.next_node_id;
                        self.next_node_id += 1;
                        // The spare host's software starts its node on its next poll.
                        s.slots[new_host].node = Some(new_id);
                        Some(Job::Replace {
                            old_host,
                            old_id,
                            new_host,
                            new_id,
                        })
                    }
                    _ => None,
                }
            }
            Fault::Rejoin(t) => {
                let host = self.resolve(i, t);
                let old_id = lock(&self.shared).slots[host].node;
                old_id.map(|old_id| {
                    let new_id = self.next_node_id;
                    self.next_node_id += 1;
                    self.crash_coordinator(sim, host);
                    self.rejoining.insert(self.hosts.coordinators[host]);
                    Job::Rejoin {
                        host,
                        old_id,
                        new_id,
                    }
                })
            }
            _ => None,
        };
        match job {
            Some(job) => {
                self.log(now, format!("start #{i}: {fault}: {job}"));
                let mut s = lock(&self.shared);
                s.admin.jobs.push_back((i, job));
                s.admin.busy = true;
            }
            None => self.log(now, format!("skip #{i}: {fault}: no spare host left")),
        }
    }

    /// Do what the operator asked of the hosts.
    fn serve_requests(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration) {
        let requests = std::mem::take(&mut lock(&self.shared).requests);
        for r in requests {
            match r {
                Request::Retire(host) => {
                    let ip = self.hosts.coordinators[host];
                    let name = self.name(host);
                    if !self.crashed.contains_key(&ip) && !self.retired.contains(&ip) {
                        sim.crash(ip);
                    }
                    self.retired.insert(ip);
                    self.forget(host);
                    lock(&self.shared).slots[host].retired = true;
                    self.log(
                        now,
                        format!("{name} removed from the cluster: host shut down"),
                    );
                }
                Request::Rewire { host, new_id } => {
                    let ip = self.hosts.coordinators[host];
                    let old = self.name(host);
                    if !self.rejoining.remove(&ip) || !self.crashed.contains_key(&ip) {
                        // Brought back by the heal meanwhile: down again.
                        sim.crash(ip);
                        *self.crashed.entry(ip).or_insert(0) += 1;
                    }
                    self.forget(host);
                    let old_id = {
                        let mut s = lock(&self.shared);
                        s.slots[host].node.replace(new_id)
                    };
                    let wiped = match old_id {
                        Some(id) => {
                            let dir = data_dir(&self.scratch, host, id);
                            match std::fs::remove_dir_all(&dir) {
                                Ok(()) => "data dir wiped".to_string(),
                                Err(e) => format!("data dir not wiped: {e}"),
                            }
                        }
                        None => "no data dir".to_string(),
                    };
                    self.log(
                        now,
                        format!("{old} removed from the cluster: {wiped}, back as n{new_id}"),
                    );
                    // Release the rejoin's crash reference: the host starts its new node
                    // unless another fault keeps it down.
                    self.restart(sim, ip);
                }
            }
        }
    }

    fn all_hosts(&self) -> Vec<IpAddr> {
        self.hosts
            .coordinators
            .iter()
            .chain(&self.hosts.workers)
            .chain(&self.hosts.clients)
            .copied()
            .collect()
    }

    /// Crash coordinator host `host` and forget what its node reported.
    fn crash_coordinator(&mut self, sim: &mut turmoil::Sim<'_>, host: usize) {
        self.crash(sim, self.hosts.coordinators[host]);
        self.forget(host);
    }

    /// Forget the leadership, Raft handle and reports of the node on `host`.
    fn forget(&self, host: usize) {
        let mut s = lock(&self.shared);
        s.roles.remove(&host);
        if let Some(id) = s.slots[host].node {
            s.rafts.remove(&id);
            s.reports.remove(&id);
        }
    }

    fn crash(&mut self, sim: &mut turmoil::Sim<'_>, ip: IpAddr) {
        let n = self.crashed.entry(ip).or_insert(0);
        *n += 1;
        if *n == 1 && !self.retired.contains(&ip) {
            sim.crash(ip);
        }
    }

    fn restart(&mut self, sim: &mut turmoil::Sim<'_>, ip: IpAddr) {
        if let Some(n) = self.crashed.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.crashed.remove(&ip);
                if !self.retired.contains(&ip) {
                    sim.bounce(ip);
                }
            }
        }
    }

    fn apply_loss(&self, sim: &mut turmoil::Sim<'_>) {
        let p = self.loss.iter().map(|(_, p)| *p).fold(0.0, f64::max);
        sim.set_fail_rate(p);
    }

    fn apply_latency(&self, sim: &mut turmoil::Sim<'_>) {
        let ms = self.latency.iter().map(|(_, ms)| *ms).max().unwrap_or(20);
        sim.set_max_message_latency(Duration::from_millis(ms));
    }

    /// End every fault at once. Membership changes not started yet are dropped; one in
    /// progress goes on.
    fn heal(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration) {
        self.healed = true;
        for i in std::mem::take(&mut self.waiting) {
            let fault = self.episodes[i].fault;
            self.log(
                now,
                format!("skip #{i}: {fault}: not started before the heal"),
            );
        }
        lock(&self.shared).admin.closed = true;
        self.loss.clear();
        self.latency.clear();
        self.apply_loss(sim);
        self.apply_latency(sim);
        self.net.clear();
        for l in self.net.apply(sim) {
            self.log(now, format!("  link {l}"));
        }
        // Links broken by random loss are not in `net`; repair every pair.
        let all = self.all_hosts();
        for (k, a) in all.iter().enumerate() {
            for b in &all[k + 1..] {
                sim.repair(*a, *b);
            }
        }
        for ip in std::mem::take(&mut self.crashed).into_keys() {
            if self.retired.contains(&ip) {
                continue;
            }
            if self.rejoining.contains(&ip) {
                // Stays down until the operator has removed its old node.
                self.crashed.insert(ip, 1);
                continue;
            }
            sim.bounce(ip);
        }
        self.log(
            now,
            "heal: all links repaired, crashed hosts restarted".into(),
        );
    }
}
