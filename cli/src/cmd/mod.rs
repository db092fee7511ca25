//! One module per command (or group of subcommands), each with a `run` taking that
//! command's arguments from `crate::args`; plus what several commands share: the API
//! client from `--api`/`--token`, token files, labels and milliseconds.

pub mod certs;
pub mod cluster;
pub mod coordinator;
pub mod limits;
pub mod logs;
pub mod memory;
pub mod patterns;
pub mod probe;
pub mod schedules;
pub mod status;
pub mod swarms;
pub mod task;
pub mod tokens;
pub mod transfer;
pub mod up;
pub mod worker;
pub mod workers;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::args::ApiArgs;
use crate::client::Client;
impl ApiArgs {
    /// A client of the API these arguments name, with their token.
    pub fn client(&self) -> anyhow::Result<Client> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => read_token(f)?,
            (None, None) => {
                let default = Path::new("swarm-data/api-token");
                if default.exists() {
                    read_token(default)?
                } else {
                    bail!(
                        "no API token: pass --token, --token-file, SWARM_TOKEN or SWARM_TOKEN_FILE"
                    );
                }
            }
        };
        Client::new(&self.api, token, self.ca.as_deref())
    }
}

/// The token in a token file (trimmed; an empty file is an error).
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("read token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(t)
}

/// `k=v` labels (empty items are skipped).
pub fn parse_labels(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items.iter().filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            bail!("label {item:?} must be key=value");
        };
        if k.is_empty() {
            bail!("label {item:?} has an empty key");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Whole milliseconds, saturating.
pub fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}
