//! Fault schedules: what goes wrong when, drawn from the seed.
//!
//! A schedule is a list of [`Episode`]s, each a [`Fault`] active from `start` to `end`
//! (simulated time). Episodes may overlap. [`Network`] turns the set of active episodes
//! into turmoil link states, so overlapping partitions, one-way partitions and holds on
//! the same link combine instead of undoing each other.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

/// Which coordinator a fault is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Whichever node is the Raft leader when the fault starts.
    Leader,
    /// Coordinator number `i` (0-based).
    Node(usize),
}

/// One kind of trouble.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Cut a coordinator off from the other coordinators (a minority partition; the
    /// leader's is the interesting one). Workers and clients still reach it.
    IsolateFromPeers(Target),
    /// Cut a coordinator off from every other host.
    IsolateFully(Target),
    /// Drop everything one coordinator sends to another (but not the replies).
    OneWay { from: Target, to: Target },
    /// Hold all traffic between two coordinators, then deliver it at once: a long delay
    /// with heavy reordering.
    Hold(Target, Target),
    /// Hold all traffic between a coordinator and a worker.
    HoldWorker(Target, usize),
    /// Random message loss on every link (turmoil breaks a link with this probability per
    /// message and repairs it with the repair rate).
    Loss(f64),
    /// Message latency up to this many milliseconds on every link (delay and reordering).
    Latency(u64),
    /// Crash a coordinator (its memory is lost, its files stay); restart it at the end.
    CrashCoordinator(Target),
    /// Crash a worker (its running attempts die with it); restart it at the end.
    CrashWorker(usize),
    /// Replace a coordinator: a brand-new node (new id, empty data dir, a host of its own)
    /// joins as a learner, catches up (from a snapshot, the log being compacted) and
    /// becomes a voter; then the old node is removed from the cluster and its host shut
    /// down for good. A membership change, not a timed fault: it starts at `start` (or
    /// when the previous membership change is done) and takes as long as it takes.
    Replace(Target),
    /// Crash a coordinator, remove it from the cluster, wipe its data dir and bring its
    /// host back as a new member (new id, same address) that catches up from a snapshot.
    /// A membership change like [`Fault::Replace`].
    Rejoin(Target),
}

impl Fault {
    /// Whether this is a membership change (run by the simulation's operator, one at a
    /// time) rather than a fault with an end.
    pub fn is_membership(&self) -> bool {
        matches!(self, Fault::Replace(_) | Fault::Rejoin(_))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Leader => f.write_str("leader"),
            Target::Node(i) => write!(f, "c{}", i + 1),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::IsolateFromPeers(t) => write!(f, "isolate {t} from its peers"),
            Fault::IsolateFully(t) => write!(f, "isolate {t} from everyone"),
            Fault::OneWay { from, to } => write!(f, "drop {from} -> {to}"),
            Fault::Hold(a, b) => write!(f, "hold {a} <-> {b}"),
            Fault::HoldWorker(a, w) => write!(f, "hold {a} <-> w{}", w + 1),
            Fault::Loss(p) => write!(f, "message loss {p}"),
            Fault::Latency(ms) => write!(f, "latency up to {ms} ms"),
            Fault::CrashCoordinator(t) => write!(f, "crash {t}"),
            Fault::CrashWorker(w) => write!(f, "crash w{}", w + 1),
            Fault::Replace(t) => write!(f, "replace {t} with a new node on a new host"),
            Fault::Rejoin(t) => write!(f, "wipe {t} and bring it back as a new member"),
        }
    }
}

/// A fault active over `[start, end)` (a membership change: starting at `start`; `end`
/// is not used).
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub start: Duration,
    pub end: Duration,
    pub fault: Fault,
}

/// Draw a schedule of episodes starting in `[from, until)` for `coordinators`
/// coordinators and `workers` workers. At most one coordinator crash is active at a time,
/// so crashes alone never take the majority down (partitions on top of one may). With
/// `membership`, up to one [`Fault::Replace`] and one [`Fault::Rejoin`] are added, each
/// starting at least [`MEMBERSHIP_NOT_BEFORE`] after `from` (so that the log has been
/// compacted and a joining node must catch up from a snapshot) and ending well before
/// `until`; the other faults go on around them.
pub fn schedule(
    rng: &mut StdRng,
    from: Duration,
    until: Duration,
    coordinators: usize,
    workers: usize,
    membership: bool,
) -> Vec<Episode> {
    let mut out: Vec<Episode> = Vec::new();
    let mut t = from;
    let node = |rng: &mut StdRng| {
        if rng.gen_bool(0.5) {
            Target::Leader
        } else {
            Target::Node(rng.gen_range(0..coordinators))
        }
    };
    let other = |rng: &mut StdRng, not: Target| loop {
        let t = Target::Node(rng.gen_range(0..coordinators));
        if t != not {
            return t;
        }
    };
    while t < until {
        let len = Duration::from_millis(rng.gen_range(800..6_000));
        let fault = match rng.gen_range(0..100) {
            0..=17 => Fault::IsolateFromPeers(node(rng)),
            18..=27 => Fault::IsolateFully(node(rng)),
            28..=37 => {
                let from = node(rng);
                Fault::OneWay {
                    from,
                    to: other(rng, from),
                }
            }
            38..=45 => {
                let a = node(rng);
                Fault::Hold(a, other(rng, a))
            }
            46..=51 => Fault::HoldWorker(node(rng), rng.gen_range(0..workers)),
            52..=61 => Fault::Loss([0.002, 0.01, 0.05][rng.gen_range(0..3)]),
            62..=69 => Fault::Latency([50, 150, 400][rng.gen_range(0..3)]),
            70..=85 => Fault::CrashCoordinator(node(rng)),
            _ => Fault::CrashWorker(rng.gen_range(0..workers)),
        };
        let crash_active = out
            .iter()
            .any(|e| matches!(e.fault, Fault::CrashCoordinator(_)) && e.start <= t && t < e.end);
        if !(matches!(fault, Fault::CrashCoordinator(_)) && crash_active) {
            out.push(Episode {
                start: t,
                end: (t + len).min(until),
                fault,
            });
        }
        // Usually wait for some quiet time; sometimes pile the next fault on top.
        t += if rng.gen_bool(0.3) {
            Duration::from_millis(rng.gen_range(200..1_500))
        } else {
            len + Duration::from_millis(rng.gen_range(300..3_000))
        };
    }
    let (lo, hi) = (
        from + MEMBERSHIP_NOT_BEFORE,
        until.saturating_sub(MEMBERSHIP_NOT_AFTER),
    );
    if membership && lo < hi {
        for (p, kind) in [(0.55, 0), (0.45, 1)] {
            if !rng.gen_bool(p) {
                continue;
            }
            let start = Duration::from_millis(rng.gen_range(lo.as_millis()..hi.as_millis()) as u64);
            let target = node(rng);
            out.push(Episode {
                start,
                end: start,
                fault: if kind == 0 {
                    Fault::Replace(target)
                } else {
                    Fault::Rejoin(target)
                },
            });
        }
    }
    out
}

/// Membership changes start this long after the first fault may: by then the log has
/// been compacted.
pub const MEMBERSHIP_NOT_BEFORE: Duration = Duration::from_secs(5);
/// ...and this long before the faults heal at the latest, so that most of the change
/// happens under faults.
pub const MEMBERSHIP_NOT_AFTER: Duration = Duration::from_secs(5);

/// What one direction of a link should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Dir {
    dropped: u32,
    held: u32,
}

/// The fault state of every link, as reference counts per direction; see [`Network::apply`].
#[derive(Debug, Default)]
pub struct Network {
    /// Keyed by (from, to).
    dirs: BTreeMap<(IpAddr, IpAddr), Dir>,
    /// What turmoil was last told, per unordered pair (smaller address first).
    applied: BTreeMap<(IpAddr, IpAddr), LinkState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Healthy,
    Held,
    Cut,
    /// Only the first address's direction is cut.
    CutFrom(IpAddr),
}

impl Network {
    /// Drop (`true`) or stop dropping what `from` sends to `to`.
    pub fn drop_dir(&mut self, from: IpAddr, to: IpAddr, on: bool) {
        let d = self.dirs.entry((from, to)).or_default();
        d.dropped = if on {
            d.dropped + 1
        } else {
            d.dropped.saturating_sub(1)
        };
    }

    /// Hold (`true`) or stop holding traffic between `a` and `b`.
    pub fn hold(&mut self, a: IpAddr, b: IpAddr, on: bool) {
        for k in [(a, b), (b, a)] {
            let d = self.dirs.entry(k).or_default();
            d.held = if on {
                d.held + 1
            } else {
                d.held.saturating_sub(1)
            };
        }
    }

    /// Forget every fault: all links healthy.
    pub fn clear(&mut self) {
        self.dirs.clear();
    }

    /// Bring turmoil's links in line with the counts. Links that change state are
    /// returned with what was done, for the run's log.
    pub fn apply(&mut self, sim: &turmoil::Sim<'_>) -> Vec<String> {
        let mut pairs: Vec<(IpAddr, IpAddr)> = self
            .dirs
            .keys()
            .map(|&(a, b)| if a < b { (a, b) } else { (b, a) })
            .chain(self.applied.keys().copied())
            .collect();
        pairs.sort();
        pairs.dedup();
        let mut log = Vec::new();
        for (a, b) in pairs {
            let ab = self.dirs.get(&(a, b)).copied().unwrap_or_default();
            let ba = self.dirs.get(&(b, a)).copied().unwrap_or_default();
            let want = match (ab.dropped > 0, ba.dropped > 0) {
                (true, true) => LinkState::Cut,
                (true, false) => LinkState::CutFrom(a),
                (false, true) => LinkState::CutFrom(b),
                (false, false) if ab.held > 0 || ba.held > 0 => LinkState::Held,
                (false, false) => LinkState::Healthy,
            };
            let have = self
                .applied
                .get(&(a, b))
                .copied()
                .unwrap_or(LinkState::Healthy);
            if want == have {
                continue;
            }
            if have == LinkState::Held {
                // Deliver what was held before anything else happens to the link.
                sim.release(a, b);
            }
            match want {
                LinkState::Healthy => sim.repair(a, b),
                LinkState::Held => {
                    sim.repair(a, b);
                    sim.hold(a, b);
                }
                LinkState::Cut => sim.partition(a, b),
                LinkState::CutFrom(from) => {
                    let to = if from == a { b } else { a };
                    sim.repair(a, b);
                    sim.partition_oneway(from, to);
                }
            }
            log.push(format!("{a} <-> {b}: {want:?}"));
            if want == LinkState::Healthy {
                self.applied.remove(&(a, b));
            } else {
                self.applied.insert((a, b), want);
            }
        }
        log
    }
}
