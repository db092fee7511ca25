//! A read-only, flat copy of an hnsw_rs graph, and the search over it.
//!
//! hnsw_rs builds the graph (its insertion algorithm, neighbour heuristic and seeded layer
//! RNG), but its search keeps every candidate as an `Arc`-allocated heap node and its
//! visited set in a hash map, which costs far more than the distance arithmetic below a
//! few hundred dimensions. We therefore copy the adjacency lists out of the graph into
//! compressed-sparse-row arrays of slot numbers ([`FlatGraph::extract`]) and search those
//! with plain `(f32, u32)` heaps and a bitset, evaluating each node's new neighbours in
//! batches with a bounded distance once the beam is full ([`FlatGraph::search`]; the
//! caller's distance decides what is read — f32 vectors, or their bfloat16 copies). The
//! copy is refreshed by the write path at deterministic points (see
//! [`crate::collection`]); slots inserted since the last refresh are scanned exactly.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use hnsw_rs::hnsw::Hnsw;

use crate::kernel::{IndexDistance, BATCH};

/// Work done by graph searches in this process so far: searches run, distances they
/// evaluated (`upper_distances` of them in the greedy descent through layers ≥ 1) and
/// layer-0 nodes they expanded — what FAISS reports as `hnsw_stats` (`ndis`, `nhops`),
/// so the two can be compared per query at equal recall. A search adds its counts once,
/// when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchTotals {
    /// Graph searches run.
    pub searches: u64,
    /// Distances evaluated, all layers.
    pub distances: u64,
    /// Of `distances`, those evaluated in the descent through layers ≥ 1.
    pub upper_distances: u64,
    /// Layer-0 nodes whose neighbours were evaluated.
    pub expanded: u64,
}

static SEARCHES: AtomicU64 = AtomicU64::new(0);
static DISTANCES: AtomicU64 = AtomicU64::new(0);
static UPPER_DISTANCES: AtomicU64 = AtomicU64::new(0);
static EXPANDED: AtomicU64 = AtomicU64::new(0);

/// This process's [`SearchTotals`] so far.
pub fn search_totals() -> SearchTotals {
    SearchTotals {
        searches: SEARCHES.load(AtomicOrdering::Relaxed),
        distances: DISTANCES.load(AtomicOrdering::Relaxed),
        upper_distances: UPPER_DISTANCES.load(AtomicOrdering::Relaxed),
        expanded: EXPANDED.load(AtomicOrdering::Relaxed),
    }
}

/// Heap entry ordered by (distance, slot).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cand(pub f32, pub u32);

impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// Adjacency of an HNSW graph over slots `0..slots`.
#[derive(Debug, Default)]
pub(crate) struct FlatGraph {
    /// Number of slots the copy covers (all slots inserted when it was taken).
    slots: usize,
    /// Layer 0 in CSR form: neighbours of slot `s` are `l0[l0_off[s]..l0_off[s + 1]]`.
    l0_off: Vec<u32>,
    l0: Vec<u32>,
    /// `upper[l - 1]`: neighbours of the slots present on layer `l ≥ 1`.
    upper: Vec<BTreeMap<u32, Vec<u32>>>,
    /// hnsw_rs' entry point: the first point that reached the top layer.
    entry: u32,
    top: usize,
}

impl FlatGraph {
    /// Copies the adjacency of `index`, which must contain exactly slots `0..slots`, adding
    /// missing reverse links up to `max_degree` links per node and layer.
    pub(crate) fn extract(
        index: &Hnsw<'static, f32, IndexDistance>,
        slots: usize,
        max_degree: usize,
    ) -> FlatGraph {
        let top = index.get_max_level_observed() as usize;
        let mut ranges = vec![(0u32, 0u32); slots];
        let mut buf: Vec<u32> = Vec::with_capacity(slots * 20);
        let mut upper: Vec<BTreeMap<u32, Vec<u32>>> = vec![BTreeMap::new(); top];
        let mut entry = None;
        let mut levels = vec![0u8; slots];
        if slots > 0 {
            for point in index.get_point_indexation() {
                let slot = point.get_origin_id();
                if slot >= slots {
                    continue;
                }
                let pid = point.get_point_id();
                levels[slot] = pid.0;
                if pid.0 as usize == top && pid.1 == 0 {
                    entry = Some(slot as u32);
                }
                for (layer, ns) in point.get_neighborhood_id().into_iter().enumerate() {
                    if layer == 0 {
                        let start = buf.len() as u32;
                        buf.extend(
                            ns.iter()
                                .map(|n| n.d_id as u32)
                                .filter(|&d| (d as usize) < slots),
                        );
                        ranges[slot] = (start, buf.len() as u32 - start);
                    } else if layer <= pid.0 as usize && !ns.is_empty() {
                        upper[layer - 1].insert(
                            slot as u32,
                            ns.iter()
                                .map(|n| n.d_id as u32)
                                .filter(|&d| (d as usize) < slots)
                                .collect(),
                        );
                    }
                }
            }
        }
        // hnsw_rs files a list under every layer its insertion descended through, not only
        // the layers the point is on (`insert_slice` pushes the descent's closest node into
        // the new point's list at each layer above the point's level). Those lists are
        // skipped above; the links to nodes below a layer are dropped here. Left in, the
        // reverse-link pass below turned them into links from the few true upper-layer
        // nodes to thousands of layer-0 nodes (10k Fashion-MNIST images: layer 1 had 9,984
        // listed nodes of which 634 are on it), and a query's descent evaluated 185
        // distances instead of 64.
        for (i, layer) in upper.iter_mut().enumerate() {
            let level = i + 1;
            for ns in layer.values_mut() {
                ns.retain(|&v| levels[v as usize] as usize >= level);
            }
        }
        // Reverse links: hnsw_rs truncates a node's list to its closest entries when a new
        // neighbour overflows it, which drops exactly the long links that connect clusters
        // (and, in high dimension, the links out of "hub" nodes). Every edge u→v that lost
        // its v→u twin gets it back here, in slot order, up to `max_degree` per node.
        let forward = |v: usize| &buf[ranges[v].0 as usize..(ranges[v].0 + ranges[v].1) as usize];
        let mut reverse: Vec<Vec<u32>> = vec![Vec::new(); slots];
        for u in 0..slots {
            for &v in forward(u) {
                let v = v as usize;
                if ranges[v].1 as usize + reverse[v].len() < max_degree
                    && !forward(v).contains(&(u as u32))
                {
                    reverse[v].push(u as u32);
                }
            }
        }
        // A node nobody links to cannot be found by a search. Give each such node one way
        // in — from its first (closest) neighbour — even past the cap.
        let mut linked = vec![false; slots];
        for (v, rev) in reverse.iter().enumerate() {
            for &u in forward(v).iter().chain(rev) {
                linked[u as usize] = true;
            }
        }
        for (u, &is_linked) in linked.iter().enumerate() {
            if !is_linked && u as u32 != entry.unwrap_or(u32::MAX) {
                if let Some(&v) = forward(u).first() {
                    reverse[v as usize].push(u as u32);
                }
            }
        }
        // Re-lay layer 0 in slot order.
        let mut l0_off = Vec::with_capacity(slots + 1);
        let mut l0 = Vec::with_capacity(buf.len() * 3 / 2);
        l0_off.push(0u32);
        for (v, rev) in reverse.iter().enumerate() {
            l0.extend_from_slice(forward(v));
            l0.extend_from_slice(rev);
            l0_off.push(l0.len() as u32);
        }
        for (i, layer) in upper.iter_mut().enumerate() {
            let level = i + 1;
            let mut extra: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for (&u, ns) in layer.iter() {
                for &v in ns {
                    let has_back = layer.get(&v).is_some_and(|back| back.contains(&u));
                    if !has_back && levels[v as usize] as usize >= level {
                        extra.entry(v).or_default().push(u);
                    }
                }
            }
            for (v, more) in extra {
                let ns = layer.entry(v).or_default();
                let room = max_degree.saturating_sub(ns.len());
                ns.extend(more.into_iter().take(room));
            }
        }
        let entry = entry
            .or_else(|| upper.last().and_then(|m| m.keys().next().copied()))
            .unwrap_or(0);
        FlatGraph {
            slots,
            l0_off,
            l0,
            upper,
            entry,
            top,
        }
    }

    /// Upper-layer entries that break the HNSW layering — a listed node, or a link to a
    /// node, whose level (in `index`) is below the layer. Always zero after `extract`.
    #[cfg(test)]
    pub(crate) fn layering_violations(&self, index: &Hnsw<'static, f32, IndexDistance>) -> usize {
        let mut levels = vec![0usize; self.slots];
        for point in index.get_point_indexation() {
            if point.get_origin_id() < self.slots {
                levels[point.get_origin_id()] = point.get_point_id().0 as usize;
            }
        }
        let mut bad = 0;
        for (i, layer) in self.upper.iter().enumerate() {
            for (&u, ns) in layer {
                bad += usize::from(levels[u as usize] <= i);
                bad += ns.iter().filter(|&&v| levels[v as usize] <= i).count();
            }
        }
        bad
    }

    /// Slots covered by the copy.
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    /// Layer-0 edge count, highest layer, and how many of the covered slots a search can
    /// reach (descending from the entry point to layer 0, then following layer-0 edges).
    pub(crate) fn stats(&self) -> (usize, usize, usize) {
        if self.slots == 0 {
            return (0, 0, 0);
        }
        let mut seen = vec![false; self.slots];
        let mut stack = vec![self.entry];
        seen[self.entry as usize] = true;
        // Upper-layer nodes are all on layer 0 too, so layer-0 reachability from the
        // entry point is what a search can reach.
        let mut reached = 0;
        while let Some(s) = stack.pop() {
            reached += 1;
            let (a, b) = (
                self.l0_off[s as usize] as usize,
                self.l0_off[s as usize + 1] as usize,
            );
            for &n in &self.l0[a..b] {
                if !seen[n as usize] {
                    seen[n as usize] = true;
                    stack.push(n);
                }
            }
        }
        (self.l0.len(), self.top, reached)
    }

    /// Best-first search: greedy descent through the upper layers, then a beam of width
    /// `ef` on layer 0. Every node is traversed, but only those for which `visible`
    /// holds are collected, so filters act during the search; with fewer than `ef`
    /// visible nodes found the beam does not stop early (it can then walk the whole
    /// reachable graph). Returns up to `ef` visible (distance, slot), unordered.
    ///
    /// `dist(query, slots, bound)` evaluates up to [`BATCH`] slots at once (see
    /// [`crate::kernel::l2_squared_bounded_batch`]: the loads of several vectors overlap)
    /// and must return each distance whenever it is below `bound`, and otherwise any
    /// value `>= bound`. A node's unvisited neighbours are evaluated in batches with the
    /// beam's worst distance at the start of the batch as the bound: the beam only
    /// tightens while the batch's results are taken in, so each neighbour is kept or
    /// dropped exactly as if it had been evaluated alone, against the beam of that
    /// moment. `prefetch(slot, n)` hints that the first `n` components of a slot's
    /// vector (as `dist` reads it) will be read soon.
    pub(crate) fn search(
        &self,
        query: &[f32],
        ef: usize,
        dist: impl Fn(&[f32], &[u32], f32) -> [f32; BATCH],
        visible: impl Fn(u32) -> bool,
        prefetch: impl Fn(u32, usize),
    ) -> Vec<Cand> {
        if self.slots == 0 || ef == 0 {
            return Vec::new();
        }
        let mut distances = 1u64;
        let mut expanded = 0u64;
        let mut ep = self.entry;
        let mut d_ep = dist(query, &[ep], f32::INFINITY)[0];
        for layer in (1..=self.top).rev() {
            let adj = &self.upper[layer - 1];
            loop {
                let mut moved = false;
                if let Some(ns) = adj.get(&ep) {
                    distances += ns.len() as u64;
                    for batch in ns.chunks(BATCH) {
                        let ds = dist(query, batch, f32::INFINITY);
                        for (&n, &d) in batch.iter().zip(&ds) {
                            if d < d_ep || (d == d_ep && n < ep) {
                                d_ep = d;
                                ep = n;
                                moved = true;
                            }
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        let upper_distances = distances;
        let mut visited = vec![0u64; self.slots.div_ceil(64)];
        let mut mark = |s: u32| {
            let (w, b) = (s as usize / 64, 1u64 << (s % 64));
            let seen = visited[w] & b != 0;
            visited[w] |= b;
            seen
        };
        let mut candidates: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(ef * 2);
        let mut results: BinaryHeap<Cand> = BinaryHeap::with_capacity(ef + 1);
        mark(ep);
        candidates.push(Reverse(Cand(d_ep, ep)));
        if visible(ep) {
            results.push(Cand(d_ep, ep));
        }
        let mut fresh: Vec<u32> = Vec::with_capacity(64);
        while let Some(Reverse(c)) = candidates.pop() {
            let bound = results.peek().map_or(f32::INFINITY, |w| w.0);
            if results.len() >= ef && c.0 > bound {
                break;
            }
            let (a, b) = (
                self.l0_off[c.1 as usize] as usize,
                self.l0_off[c.1 as usize + 1] as usize,
            );
            fresh.clear();
            fresh.extend(self.l0[a..b].iter().copied().filter(|&n| !mark(n)));
            expanded += 1;
            distances += fresh.len() as u64;
            // Start the first lines of every new neighbour's vector loading before any is
            // used: once the beam is full most are rejected from those lines alone.
            for &n in &fresh {
                prefetch(n, PREFETCH_HEAD);
            }
            for batch in fresh.chunks(BATCH) {
                let full = results.len() >= ef;
                let bound = results.peek().map_or(f32::INFINITY, |w| w.0);
                let ds = dist(query, batch, if full { bound } else { f32::INFINITY });
                for (&n, &d) in batch.iter().zip(&ds) {
                    let full = results.len() >= ef;
                    let bound = results.peek().map_or(f32::INFINITY, |w| w.0);
                    if !full || d < bound {
                        candidates.push(Reverse(Cand(d, n)));
                        if visible(n) {
                            results.push(Cand(d, n));
                            if results.len() > ef {
                                results.pop();
                            }
                        }
                    }
                }
            }
        }
        SEARCHES.fetch_add(1, AtomicOrdering::Relaxed);
        DISTANCES.fetch_add(distances, AtomicOrdering::Relaxed);
        UPPER_DISTANCES.fetch_add(upper_distances, AtomicOrdering::Relaxed);
        EXPANDED.fetch_add(expanded, AtomicOrdering::Relaxed);
        results.into_vec()
    }
}

/// Components of each new neighbour's vector prefetched before any distance is computed:
/// the bounded L2 kernel's first check (measured on Fashion-MNIST 10k × 784: 5–10% more
/// queries/s than none; prefetching whole vectors, or the next batch while one is
/// computed, is slower — the batch's own four streams of loads already fill the memory
/// pipeline).
const PREFETCH_HEAD: usize = crate::kernel::CHECK_EVERY;
