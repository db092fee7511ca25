//! `swarm tokens`: create, list and revoke scoped API tokens.

use std::process::ExitCode;

use swarm_proto::api::{CreateToken, Scope, TokenView};

use super::ms;
use crate::args::TokensCmd;

pub async fn run(c: TokensCmd) -> anyhow::Result<ExitCode> {
    match c {
        TokensCmd::Create {
            api,
            name,
            scope,
            swarms,
            ttl,
            json,
        } => {
            let scope =
                Scope::parse(&scope).ok_or_else(|| anyhow::anyhow!("unknown scope {scope:?}"))?;
            let req = CreateToken {
                name,
                scope,
                swarms: swarms.into_iter().filter(|s| !s.is_empty()).collect(),
                ttl_secs: ttl.map(|d| (ms(d) / 1000).max(1)),
            };
            let created = api.client()?.create_token(&req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                eprintln!(
                    "created {}; the token follows, shown this once:",
                    describe(&created.view)
                );
                println!("{}", created.token);
            }
        }
        TokensCmd::List { api, json } => {
            let list = api.client()?.tokens().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.tokens.is_empty() {
                println!("no tokens (the bootstrap token is not listed)");
            } else {
                println!(
                    "{:<24} {:<12} {:<8} {:<24} EXPIRES",
                    "NAME", "ID", "SCOPE", "SWARMS"
                );
                for t in &list.tokens {
                    println!(
                        "{:<24} {:<12} {:<8} {:<24} {}",
                        t.name,
                        t.id,
                        t.scope,
                        if t.swarms.is_empty() {
                            "all".to_string()
                        } else {
                            t.swarms.join(",")
                        },
                        t.expires_at_ms.map_or("never".to_string(), when)
                    );
                }
            }
        }
        TokensCmd::Revoke { api, which } => {
            api.client()?.revoke_token(&which).await?;
            println!("revoked token {which}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(t: &TokenView) -> String {
    let swarms = if t.swarms.is_empty() {
        "every swarm".to_string()
    } else {
        format!("swarms {}", t.swarms.join(", "))
    };
    let expires = t
        .expires_at_ms
        .map_or("no expiry".to_string(), |e| format!("expires {}", when(e)));
    format!(
        "token {} (id {}, scope {}, {swarms}, {expires})",
        t.name, t.id, t.scope
    )
}

/// A time in ms since the epoch, as RFC 3339 (UTC, seconds).
pub(crate) fn when(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(when(0), "1970-01-01T00:00:00Z");
        assert_eq!(when(1_796_601_600_000), "2026-12-07T00:00:00Z");
        assert_eq!(when(951_782_400_000 + 3_661_000), "2000-02-29T01:01:01Z");
    }
}
