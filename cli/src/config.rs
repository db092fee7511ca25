//! Optional TOML config file: every key is a long flag name (`data-dir = "/var/lib/swarm"`)
//! and fills the flag's `SWARM_*` environment variable when that is not set already.
//! Precedence, highest first: command-line flag, environment, config file, default.

use std::path::Path;

use anyhow::{bail, Context};

/// Apply `path`'s keys to the environment. `known` lists the `SWARM_*` variables the
/// command line understands; any other key is an error naming the file and the key.
pub fn apply_config_file(path: &Path, known: &[String]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parse config file {}", path.display()))?;
    for (key, value) in table {
        let var = format!("SWARM_{}", key.to_ascii_uppercase().replace('-', "_"));
        if !known.contains(&var) {
            bail!("config file {}: unknown key `{key}`", path.display());
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => bail!(
                        "config file {}: `{key}` holds an unsupported {}",
                        path.display(),
                        other.type_str()
                    ),
                })
                .collect::<anyhow::Result<Vec<_>>>()?
                .join(","),
            other => bail!(
                "config file {}: `{key}` must not be a {}",
                path.display(),
                other.type_str()
            ),
        };
        if std::env::var_os(&var).is_none() {
            std::env::set_var(&var, text);
        }
    }
    Ok(())
}

/// Every `SWARM_*` variable some argument of `cmd` (or its subcommands) reads.
pub fn known_env_vars(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    collect(cmd, &mut out);
    out.sort();
    out.dedup();
    out
}

fn collect(cmd: &clap::Command, out: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        if let Some(env) = arg.get_env() {
            out.push(env.to_string_lossy().into_owned());
        }
    }
    for sub in cmd.get_subcommands() {
        collect(sub, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_toml_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "nope = 1\n").unwrap();
        let err = apply_config_file(&p, &["SWARM_SLOTS".into()]).unwrap_err();
        assert!(err.to_string().contains("unknown key `nope`"), "{err}");
        std::fs::write(&p, "slots = [\n").unwrap();
        assert!(apply_config_file(&p, &[])
            .unwrap_err()
            .to_string()
            .contains("parse config file"));
    }

    #[test]
    fn values_fill_unset_variables_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "test-cfg-a = 7\ntest-cfg-b = [\"x=1\", \"y=2\"]\n").unwrap();
        std::env::set_var("SWARM_TEST_CFG_A", "9");
        apply_config_file(&p, &["SWARM_TEST_CFG_A".into(), "SWARM_TEST_CFG_B".into()]).unwrap();
        assert_eq!(std::env::var("SWARM_TEST_CFG_A").unwrap(), "9");
        assert_eq!(std::env::var("SWARM_TEST_CFG_B").unwrap(), "x=1,y=2");
    }
}
