//! The run queue: queued tasks by priority, and within a priority by [`Lane`], oldest
//! first in each lane.
//!
//! A lane is the tasks that share a concurrency key and a rate limit. The dispatcher
//! (`scheduler.rs`) takes work round-robin across the lanes of a priority, so one key's
//! backlog never starves another's, and skips a whole lane at once while its key is at
//! its limit or its bucket is empty: what waits for a limit is never walked task by
//! task, and never holds a slot. Tasks with neither control share the default lane.

use std::collections::{BTreeMap, BTreeSet};

use swarm_proto::TaskId;

use super::Task;

/// Tasks that are dispatched fairly against each other and limited together.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lane {
    pub key: Option<String>,
    pub rate_limit: Option<String>,
}

impl Lane {
    pub fn of(task: &Task) -> Lane {
        match &task.flow {
            None => Lane::default(),
            Some(f) => Lane {
                key: f.concurrency_key.clone(),
                rate_limit: f.rate_limit.clone(),
            },
        }
    }
}

/// One priority's lanes.
pub type Lanes = BTreeMap<Lane, BTreeSet<TaskId>>;

/// See the module docs.
#[derive(Debug, Default)]
pub struct RunQueue {
    /// By negated priority (highest first).
    levels: BTreeMap<i64, Lanes>,
    len: usize,
}

impl RunQueue {
    /// Add a queued task (`false` if it was in already).
    pub fn insert(&mut self, task: &Task) -> bool {
        let added = self
            .levels
            .entry(-(task.spec.priority as i64))
            .or_default()
            .entry(Lane::of(task))
            .or_default()
            .insert(task.id);
        self.len += added as usize;
        added
    }

    /// Take a task out (`false` if it was not in).
    pub fn remove(&mut self, task: &Task) -> bool {
        let level_key = -(task.spec.priority as i64);
        let Some(level) = self.levels.get_mut(&level_key) else {
            return false;
        };
        let lane = Lane::of(task);
        let Some(ids) = level.get_mut(&lane) else {
            return false;
        };
        let removed = ids.remove(&task.id);
        if ids.is_empty() {
            level.remove(&lane);
            if level.is_empty() {
                self.levels.remove(&level_key);
            }
        }
        self.len -= removed as usize;
        removed
    }

    pub fn contains(&self, task: &Task) -> bool {
        self.levels
            .get(&-(task.spec.priority as i64))
            .and_then(|l| l.get(&Lane::of(task)))
            .is_some_and(|ids| ids.contains(&task.id))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.levels.clear();
        self.len = 0;
    }

    /// The priorities, highest first, each with its lanes.
    pub fn levels(&self) -> impl Iterator<Item = (i64, &Lanes)> {
        self.levels.iter().map(|(p, lanes)| (-*p, lanes))
    }

    /// Every queued id, by priority, then lane, then age.
    pub fn ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.levels
            .values()
            .flat_map(|lanes| lanes.values().flat_map(|ids| ids.iter().copied()))
    }
}
