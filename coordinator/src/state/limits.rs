//! Named limits on how work starts: concurrency limits for concurrency keys, and rate
//! limits (token buckets) that tasks draw from.
//!
//! A limit is configuration, replicated like the rest of the state (`Op::Limits`) and
//! read by the leader's dispatcher (`scheduler.rs`); nothing here counts running tasks
//! or tokens. Rules:
//! * **Concurrency.** A task with `concurrency_key` K runs only while fewer than the
//!   limit of K tasks with key K run. The limit of K is the limit named K, else the
//!   limit named by K's part before its first `:` — so `tenant` with `concurrency 2`
//!   caps each of `tenant:acme` and `tenant:globex` at 2 — else none (the key still
//!   shares dispatch fairly with other keys).
//! * **Rate.** A task with `rate_limit` N draws one token from bucket N when it starts.
//!   The bucket holds at most `burst` tokens and gains `tokens` every `per_ms`. A task
//!   naming no existing limit (a limit deleted after it was submitted) is not limited.
//!
//! Stored whole by every checkpoint (`limits` key) and every dump (a `Limits` record,
//! dump format 6; older ones read as none).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most named limits.
pub const MAX_LIMITS: usize = 10_000;
/// Longest limit name (and concurrency key, and rate limit a task names).
pub const MAX_NAME: usize = 128;
/// Most tokens a bucket may hold or gain per period.
pub const MAX_TOKENS: u32 = 1_000_000;
/// Longest refill period: a day.
pub const MAX_PERIOD_MS: u64 = 86_400_000;

/// A token bucket's definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    /// Tokens gained every `per_ms`.
    pub tokens: u32,
    pub per_ms: u64,
    /// Most tokens held (what may start at once after a quiet spell).
    pub burst: u32,
}

impl Rate {
    /// Parse `N/s`, `N/min`, `N/h` or `N/<ms>ms` (e.g. `60/min`).
    pub fn parse(rate: &str, burst: u32) -> Result<Rate, String> {
        let (n, unit) = rate
            .split_once('/')
            .ok_or_else(|| format!("rate {rate:?}: expected N/s, N/min, N/h or N/<ms>ms"))?;
        let tokens: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("rate {rate:?}: {n:?} is not a count"))?;
        let per_ms = match unit.trim() {
            "s" | "sec" | "second" => 1_000,
            "m" | "min" | "minute" => 60_000,
            "h" | "hour" => 3_600_000,
            other => other
                .strip_suffix("ms")
                .and_then(|ms| ms.parse::<u64>().ok())
                .ok_or_else(|| format!("rate {rate:?}: unknown period {other:?}"))?,
        };
        let r = Rate {
            tokens,
            per_ms,
            burst,
        };
        r.check()?;
        Ok(r)
    }

    fn check(&self) -> Result<(), String> {
        if self.tokens == 0 || self.tokens > MAX_TOKENS {
            return Err(format!("a rate gains 1 to {MAX_TOKENS} tokens per period"));
        }
        if self.per_ms == 0 || self.per_ms > MAX_PERIOD_MS {
            return Err(format!("a rate's period is 1 ms to {MAX_PERIOD_MS} ms"));
        }
        if self.burst == 0 || self.burst > MAX_TOKENS {
            return Err(format!("a burst is 1 to {MAX_TOKENS} tokens"));
        }
        Ok(())
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.per_ms {
            1_000 => write!(f, "{}/s", self.tokens),
            60_000 => write!(f, "{}/min", self.tokens),
            3_600_000 => write!(f, "{}/h", self.tokens),
            ms => write!(f, "{}/{ms}ms", self.tokens),
        }
    }
}

/// One named limit: a concurrency limit, a rate, or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitDef {
    /// Most tasks of one key running at once.
    pub concurrency: Option<u32>,
    pub rate: Option<Rate>,
}

/// A change to the limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitsOp {
    /// Create or replace a limit.
    Set {
        name: String,
        def: LimitDef,
    },
    Delete {
        name: String,
    },
}

/// Why a limits op was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitsFault {
    Invalid(String),
    NotFound(String),
}

impl std::fmt::Display for LimitsFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitsFault::Invalid(m) => f.write_str(m),
            LimitsFault::NotFound(n) => write!(f, "no limit named {n:?}"),
        }
    }
}

/// The named limits; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub by_name: BTreeMap<String, LimitDef>,
}

/// Check a limit's, key's or bucket's name: 1 to [`MAX_NAME`] bytes, printable, no
/// spaces.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a {what} is 1 to {MAX_NAME} bytes"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{what} {name:?} holds a space or a control character"
        ));
    }
    Ok(())
}

impl Limits {
    pub fn apply(&mut self, op: &LimitsOp) -> Result<(), LimitsFault> {
        match op {
            LimitsOp::Set { name, def } => {
                check_name("limit name", name).map_err(LimitsFault::Invalid)?;
                if def.concurrency.is_none() && def.rate.is_none() {
                    return Err(LimitsFault::Invalid(
                        "a limit sets a concurrency, a rate, or both".into(),
                    ));
                }
                if def.concurrency == Some(0) {
                    return Err(LimitsFault::Invalid(
                        "a concurrency limit is at least 1 (pause work by other means)".into(),
                    ));
                }
                if let Some(r) = &def.rate {
                    r.check().map_err(LimitsFault::Invalid)?;
                }
                if !self.by_name.contains_key(name) && self.by_name.len() >= MAX_LIMITS {
                    return Err(LimitsFault::Invalid(format!(
                        "{MAX_LIMITS} limits already; delete one first"
                    )));
                }
                self.by_name.insert(name.clone(), *def);
                Ok(())
            }
            LimitsOp::Delete { name } => match self.by_name.remove(name) {
                Some(_) => Ok(()),
                None => Err(LimitsFault::NotFound(name.clone())),
            },
        }
    }

    /// The concurrency limit of tasks with key `key` (see the module docs).
    pub fn concurrency_of(&self, key: &str) -> Option<u32> {
        if let Some(c) = self.by_name.get(key).and_then(|d| d.concurrency) {
            return Some(c);
        }
        let (class, _) = key.split_once(':')?;
        self.by_name.get(class).and_then(|d| d.concurrency)
    }

    /// The bucket a task naming rate limit `name` draws from.
    pub fn rate_of(&self, name: &str) -> Option<Rate> {
        self.by_name.get(name).and_then(|d| d.rate)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(l: &mut Limits, name: &str, concurrency: Option<u32>, rate: Option<&str>) {
        let def = LimitDef {
            concurrency,
            rate: rate.map(|r| Rate::parse(r, 1).unwrap()),
        };
        l.apply(&LimitsOp::Set {
            name: name.into(),
            def,
        })
        .unwrap();
    }

    #[test]
    fn a_key_takes_its_own_limit_else_its_class_limit() {
        let mut l = Limits::default();
        set(&mut l, "tenant", Some(2), None);
        set(&mut l, "tenant:big", Some(10), None);
        set(&mut l, "openai", None, Some("60/min"));
        assert_eq!(l.concurrency_of("tenant:acme"), Some(2));
        assert_eq!(l.concurrency_of("tenant:big"), Some(10));
        assert_eq!(l.concurrency_of("tenant"), Some(2));
        assert_eq!(l.concurrency_of("other:x"), None);
        assert_eq!(
            l.concurrency_of("openai"),
            None,
            "a rate-only limit caps nothing"
        );
        assert_eq!(
            l.rate_of("openai"),
            Some(Rate {
                tokens: 60,
                per_ms: 60_000,
                burst: 1
            })
        );
        assert_eq!(l.rate_of("tenant"), None);
        l.apply(&LimitsOp::Delete {
            name: "tenant".into(),
        })
        .unwrap();
        assert_eq!(l.concurrency_of("tenant:acme"), None);
        assert_eq!(
            l.apply(&LimitsOp::Delete {
                name: "tenant".into()
            }),
            Err(LimitsFault::NotFound("tenant".into()))
        );
    }

    #[test]
    fn rates_parse_and_bad_limits_are_refused() {
        assert_eq!(Rate::parse("5/s", 1).unwrap().per_ms, 1_000);
        assert_eq!(Rate::parse("10/h", 3).unwrap().to_string(), "10/h");
        assert_eq!(Rate::parse("7/250ms", 1).unwrap().per_ms, 250);
        for bad in ["5", "x/s", "5/fortnight", "0/s", "5/0ms", "5/99999999999ms"] {
            assert!(Rate::parse(bad, 1).is_err(), "{bad}");
        }
        assert!(Rate::parse("5/s", 0).is_err());
        let mut l = Limits::default();
        for (name, def) in [
            (
                "",
                LimitDef {
                    concurrency: Some(1),
                    rate: None,
                },
            ),
            (
                "a b",
                LimitDef {
                    concurrency: Some(1),
                    rate: None,
                },
            ),
            ("ok", LimitDef::default()),
            (
                "ok",
                LimitDef {
                    concurrency: Some(0),
                    rate: None,
                },
            ),
        ] {
            assert!(matches!(
                l.apply(&LimitsOp::Set {
                    name: name.into(),
                    def
                }),
                Err(LimitsFault::Invalid(_))
            ));
        }
        assert!(l.is_empty());
    }
}
