//! The leader's side of flow control: which lane of the run queue may start a task now.
//!
//! [`Admission`] counts the attempts in flight per concurrency key, holds one token
//! bucket per rate limit, and remembers where the round-robin over each priority's lanes
//! stopped. The limits themselves are replicated configuration
//! ([`crate::state::Limits`]); these counts are not replicated, and need not be:
//! * **Keys.** An attempt of a limited task is recorded as started (`Op::Start`) before
//!   it is sent, so a new leader finds every attempt that may be running in the task
//!   table, adopts it (counted here) and never over-admits a key.
//! * **Buckets.** A new leader's buckets start empty and fill at their rate from its
//!   election. The deposed leader could not record (so not send) any start after that,
//!   so in any window the starts of both stay within `burst + rate × window`.
//!
//! Pure: `now_ms` is a parameter, nothing reads a clock.

use std::collections::HashMap;

use crate::state::{Lane, Limits, Rate};

/// One rate limit's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    /// Tokens now, at `rate` (a changed rate applies from the last refill on).
    fn refill(&mut self, rate: &Rate, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        self.at_ms = self.at_ms.max(now_ms);
        let gained = elapsed as f64 * rate.tokens as f64 / rate.per_ms as f64;
        self.tokens = (self.tokens + gained).min(rate.burst as f64);
    }
}

/// Rounding slack: a token that is 1 up to float error is a whole token.
const WHOLE: f64 = 1.0 - 1e-9;

/// See the module docs.
#[derive(Debug, Default)]
pub struct Admission {
    /// Attempts in flight by concurrency key.
    running: HashMap<String, u32>,
    buckets: HashMap<String, Bucket>,
    /// The lane served last at each priority: the next round starts after it.
    cursor: HashMap<i64, Lane>,
}

/// Why a lane cannot start a task now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Blocked {
    /// Its key runs as many tasks as its limit allows: a report frees it.
    Key,
    /// Its bucket has no token; one arrives at this time.
    Rate { ready_ms: u64 },
}

impl Admission {
    /// Whether `lane` may start a task now under `limits`.
    pub fn check(&mut self, lane: &Lane, limits: &Limits, now_ms: u64) -> Result<(), Blocked> {
        if let Some(key) = &lane.key {
            if let Some(limit) = limits.concurrency_of(key) {
                if self.running(key) >= limit {
                    return Err(Blocked::Key);
                }
            }
        }
        if let Some(name) = &lane.rate_limit {
            if let Some(rate) = limits.rate_of(name) {
                let b = self.bucket(name, &rate, now_ms);
                if b.tokens < WHOLE {
                    let missing = 1.0 - b.tokens;
                    let wait = (missing * rate.per_ms as f64 / rate.tokens as f64).ceil() as u64;
                    return Err(Blocked::Rate {
                        ready_ms: now_ms.saturating_add(wait.max(1)),
                    });
                }
            }
        }
        Ok(())
    }

    /// A task of `lane` starts (after [`Admission::check`] allowed it): it takes a token
    /// from its bucket. Its key is counted by [`Admission::track`].
    pub fn started(&mut self, lane: &Lane, limits: &Limits, now_ms: u64) {
        if let Some(name) = &lane.rate_limit {
            if let Some(rate) = limits.rate_of(name) {
                let b = self.bucket(name, &rate, now_ms);
                b.tokens = (b.tokens - 1.0).max(0.0);
            }
        }
    }

    fn bucket(&mut self, name: &str, rate: &Rate, now_ms: u64) -> &mut Bucket {
        if !self.buckets.contains_key(name) {
            // Empty at first: see the module docs.
            self.buckets.insert(
                name.to_string(),
                Bucket {
                    tokens: 0.0,
                    at_ms: now_ms,
                },
            );
        }
        let b = self
            .buckets
            .get_mut(name)
            .expect("the bucket was just inserted");
        b.refill(rate, now_ms);
        b
    }

    /// Tokens in a bucket now (for tests and status).
    pub fn tokens(&mut self, name: &str, rate: &Rate, now_ms: u64) -> f64 {
        self.bucket(name, rate, now_ms).tokens
    }

    /// Attempts of key `key` in flight.
    pub fn running(&self, key: &str) -> u32 {
        self.running.get(key).copied().unwrap_or(0)
    }

    /// Every key with attempts in flight, and how many.
    pub fn running_keys(&self) -> impl Iterator<Item = (&str, u32)> {
        self.running.iter().map(|(k, n)| (k.as_str(), *n))
    }

    /// An attempt with `key` is in flight.
    pub fn track(&mut self, key: Option<&str>) {
        if let Some(k) = key {
            match self.running.get_mut(k) {
                Some(n) => *n += 1,
                None => {
                    self.running.insert(k.to_string(), 1);
                }
            }
        }
    }

    /// An attempt with `key` is no longer in flight.
    pub fn untrack(&mut self, key: Option<&str>) {
        if let Some(k) = key {
            if let Some(n) = self.running.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.running.remove(k);
                }
            }
        }
    }

    /// The lane served last at priority `level`.
    pub fn cursor(&self, level: i64) -> Option<&Lane> {
        self.cursor.get(&level)
    }

    pub fn served(&mut self, level: i64, lane: &Lane) {
        match self.cursor.get_mut(&level) {
            Some(c) if c == lane => {}
            Some(c) => *c = lane.clone(),
            None => {
                self.cursor.insert(level, lane.clone());
            }
        }
    }

    /// Forget buckets of limits that no longer exist (bounds memory to the limits).
    pub fn prune(&mut self, limits: &Limits) {
        if self.buckets.len() > limits.by_name.len() {
            self.buckets
                .retain(|name, _| limits.rate_of(name).is_some());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LimitDef, LimitsOp};

    /// (name, concurrency, (rate, burst)) of each limit.
    type Spec<'a> = (&'a str, Option<u32>, Option<(&'a str, u32)>);

    fn limits(ops: &[Spec]) -> Limits {
        let mut l = Limits::default();
        for (name, concurrency, rate) in ops {
            l.apply(&LimitsOp::Set {
                name: name.to_string(),
                def: LimitDef {
                    concurrency: *concurrency,
                    rate: rate.map(|(r, burst)| Rate::parse(r, burst).unwrap()),
                },
            })
            .unwrap();
        }
        l
    }

    fn lane(key: Option<&str>, rate: Option<&str>) -> Lane {
        Lane {
            key: key.map(str::to_string),
            rate_limit: rate.map(str::to_string),
        }
    }

    #[test]
    fn a_key_at_its_limit_is_blocked_until_an_attempt_ends() {
        let l = limits(&[("tenant", Some(2), None)]);
        let mut a = Admission::default();
        let acme = lane(Some("tenant:acme"), None);
        for _ in 0..2 {
            assert_eq!(a.check(&acme, &l, 0), Ok(()));
            a.started(&acme, &l, 0);
            a.track(Some("tenant:acme"));
        }
        assert_eq!(a.check(&acme, &l, 0), Err(Blocked::Key));
        // Another key of the class has its own count; a key with no limit has none.
        assert_eq!(a.check(&lane(Some("tenant:globex"), None), &l, 0), Ok(()));
        assert_eq!(a.check(&lane(Some("free"), None), &l, 0), Ok(()));
        a.untrack(Some("tenant:acme"));
        assert_eq!(a.check(&acme, &l, 0), Ok(()));
        assert_eq!(a.running("tenant:acme"), 1);
    }

    /// Buckets start empty, fill at their rate up to the burst, and never let more than
    /// `burst + rate × window` start in any window.
    #[test]
    fn buckets_start_empty_and_are_never_overdrawn() {
        let l = limits(&[
            ("five", None, Some(("5/s", 1))),
            ("burst", None, Some(("5/s", 5))),
        ]);
        for (name, burst) in [("five", 1u64), ("burst", 5)] {
            let mut a = Admission::default();
            let ln = lane(None, Some(name));
            assert_eq!(
                a.check(&ln, &l, 1_000),
                Err(Blocked::Rate { ready_ms: 1_200 }),
                "empty when first seen"
            );
            let mut starts = Vec::new();
            // Ask every millisecond for 10 s, starting whenever allowed.
            for now in 1_000..=11_000u64 {
                if a.check(&ln, &l, now).is_ok() {
                    a.started(&ln, &l, now);
                    starts.push(now);
                }
            }
            // 5 per second for 10 s (the first token after 200 ms).
            assert_eq!(starts.len(), 50, "{name}");
            for w in 0..starts.len() {
                let in_a_second = starts[w..].iter().take_while(|&&t| t < starts[w] + 1_000);
                assert!(
                    in_a_second.count() as u64 <= burst.max(5),
                    "{name}: {starts:?}"
                );
            }
            // A quiet spell fills the bucket up to its burst, no further.
            assert!(
                (a.tokens(name, &Rate::parse("5/s", burst as u32).unwrap(), 60_000) - burst as f64)
                    .abs()
                    < 1e-6
            );
        }
    }

    #[test]
    fn cursors_and_pruning() {
        let mut a = Admission::default();
        let x = lane(Some("x"), None);
        assert_eq!(a.cursor(5), None);
        a.served(5, &x);
        assert_eq!(a.cursor(5), Some(&x));
        let l = limits(&[("r", None, Some(("1/s", 1)))]);
        a.check(&lane(None, Some("r")), &l, 0).unwrap_err();
        a.prune(&Limits::default());
        assert!(a.buckets.is_empty());
    }
}
