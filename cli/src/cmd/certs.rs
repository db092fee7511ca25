//! `swarm certs`: the cluster's certificates.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use swarm_transport::{CertInfo, CertName};

use crate::args::CertsCmd;

pub async fn run(c: CertsCmd) -> anyhow::Result<ExitCode> {
    match c {
        CertsCmd::Revoke { api, path, serial } => {
            let req = match (path, serial) {
                (Some(path), _) => {
                    let info = CertInfo::read(&path)?;
                    swarm_proto::api::RevokeCert {
                        serial: info.serial.clone(),
                        subject: format!("{} {}", info.subject.role, info.subject.name),
                        not_after_ms: u64::try_from(info.not_after_unix)
                            .ok()
                            .map(|s| s.saturating_mul(1000)),
                    }
                }
                (None, Some(serial)) => swarm_proto::api::RevokeCert {
                    serial,
                    subject: String::new(),
                    not_after_ms: None,
                },
                (None, None) => anyhow::bail!("name a certificate file or pass --serial"),
            };
            api.client()?.revoke_cert(&req).await?;
            println!(
                "revoked certificate {}{}; coordinators refuse it from the next handshake",
                req.serial,
                if req.subject.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", req.subject)
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        CertsCmd::Revoked { api, json } => {
            let list = api.client()?.revoked_certs().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.revoked.is_empty() {
                println!("no revoked certificates");
            } else {
                println!("{:<42} SUBJECT", "SERIAL");
                for r in &list.revoked {
                    println!("{:<42} {}", r.serial, r.subject);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCmd::Init { dir, sans, force } => init(&dir, &sans, force),
        CertsCmd::Issue {
            ca_dir,
            out,
            role,
            name,
            sans,
            days,
            force,
        } => {
            let role = parse_role(&role)?;
            let name = CertName::parse(&name)
                .map_err(anyhow::Error::msg)
                .context("--name")?;
            let files = swarm_transport::issue_cert(
                &ca_dir,
                &out,
                role,
                &name,
                &sans,
                validity(days)?,
                force,
            )?;
            let info = CertInfo::read(files.cert(role))?;
            println!("wrote {} into {}", describe(&info), out.display());
            if let CertName::Pool(prefix) = &name {
                println!(
                    "note: a pool certificate: every holder may use any worker id starting with {prefix:?}; \
                     issue one per worker where you can"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCmd::Renew {
            ca_dir,
            dir,
            role,
            days,
        } => {
            let role = parse_role(&role)?;
            let info = swarm_transport::renew_cert(&ca_dir, &dir, role, validity(days)?)?;
            println!(
                "renewed {} in {}; running nodes present it from their next handshake",
                describe(&info),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        CertsCmd::Show { path } => {
            let info = CertInfo::read(&path)?;
            println!("{}", describe(&info));
            println!("names: {}", info.sans.join(", "));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `swarm certs init`: write a cluster CA and coordinator and worker certificates.
pub fn init(dir: &Path, sans: &[String], force: bool) -> anyhow::Result<ExitCode> {
    let files = swarm_transport::init_certs(dir, sans, force)?;
    println!(
        "wrote cluster CA and certificates to {}",
        files.dir.display()
    );
    println!(
        "note: worker.pem is a pool certificate any worker id may use; for a cluster, issue \
         one per node: swarm certs issue --ca-dir {} --role worker --name ID --out DIR",
        files.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_role(role: &str) -> anyhow::Result<swarm_transport::Role> {
    role.parse().map_err(anyhow::Error::msg)
}

fn validity(days: u32) -> anyhow::Result<Duration> {
    if days == 0 {
        anyhow::bail!("--days must be at least 1");
    }
    Ok(Duration::from_secs(u64::from(days) * 24 * 60 * 60))
}

/// `worker w1, serial 1a2b…, valid until 2027-12-06T10:00:00Z`.
fn describe(info: &CertInfo) -> String {
    let until = time_text(info.not_after_unix);
    format!(
        "{} certificate for {}, serial {}, valid until {until}",
        info.subject.role, info.subject.name, info.serial
    )
}

/// A Unix time as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn time_text(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(time_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(time_text(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(time_text(1_796_601_599), "2026-12-06T23:59:59Z");
    }
}
