//! `--config FILE` end to end: the `swarm` binary reads a TOML file whose keys are the
//! long flags of the command run. These run no cluster: each command either does its
//! work offline (`certs init`, `probe` of a closed port) or stops at a check that shows
//! which values reached it (`coordinator` refusing its own id among the peers).

use std::path::Path;
use std::process::{Command, Output};

fn swarm(dir: &Path, config: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let file = dir.join("swarm.toml");
    std::fs::write(&file, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swarm"));
    cmd.args(args).arg("--config").arg(&file).current_dir(dir);
    // Only what the test sets: the environment beats the file.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SWARM_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn certs_init_takes_its_flags_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let o = swarm(
        dir.path(),
        &format!(
            "dir = {:?}\nsan = [\"a.example\", \"b.example\"]\nforce = true\n",
            certs.to_str().unwrap()
        ),
        &["certs", "init"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(certs.join("ca.pem").exists());
    assert!(certs.join("coordinator.pem").exists());
}

/// A coordinator config that stops before starting anything: with `peer` naming the
/// node's own id it stops at that check, else at `default-max-attempts = 0`.
const COORDINATOR: &str = "id = 1
data-dir = \"data\"
certs = \"certs\"
token = \"t\"
default-max-attempts = 0
peer = [\"2=a:7070,a:8080\", \"1=b:7070,b:8080\"]
";
const OWN_ID: &str = "--peer lists this node's own id 1";
const PAST_PEERS: &str = "--default-max-attempts must be at least 1";

#[test]
fn each_peer_in_the_file_is_one_peer() {
    let dir = tempfile::tempdir().unwrap();
    let o = swarm(dir.path(), COORDINATOR, &["coordinator"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(OWN_ID), "{}", stderr(&o));
}

#[test]
fn flag_beats_environment_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let other = "3=c:7070,c:8080";
    for (args, env) in [
        (&["coordinator", "--peer", other][..], &[][..]),
        (&["coordinator"], &[("SWARM_PEERS", other)]),
        (
            &["coordinator", "--peer", other],
            &[("SWARM_PEERS", "1=x:7070,x:8080")],
        ),
    ] {
        let o = swarm(dir.path(), COORDINATOR, args, env);
        assert_eq!(o.status.code(), Some(1), "{args:?} {env:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(PAST_PEERS),
            "{args:?} {env:?}: {}",
            stderr(&o)
        );
    }
    // The environment against the file alone, for a scalar.
    let o = swarm(
        dir.path(),
        "id = 2\ndata-dir = \"d\"\ncerts = \"c\"\ntoken = \"t\"\npeer = \"2=a:1,a:2\"\n",
        &["coordinator"],
        &[("SWARM_NODE_ID", "3"), ("SWARM_DEFAULT_MAX_ATTEMPTS", "0")],
    );
    assert!(stderr(&o).contains(PAST_PEERS), "{}", stderr(&o));
}

#[test]
fn unknown_keys_and_wrong_types_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("swarm.toml");
    for (config, wants) in [
        (
            "node-id = 2\n",
            "unknown key `node-id` for `swarm coordinator`; did you mean `id`?",
        ),
        (
            "peers = []\n",
            "unknown key `peers` for `swarm coordinator`; did you mean `peer`?",
        ),
        (
            "data-dir = 5\n",
            "`data-dir` must be a string (a path), not an integer",
        ),
        (
            "peer = [[\"2=a:1,a:2\"]]\n",
            "`peer` element 1 must be a string, or an array of them, not an array",
        ),
    ] {
        let o = swarm(dir.path(), config, &["coordinator"], &[]);
        assert_eq!(o.status.code(), Some(2), "{config}: {}", stderr(&o));
        let want = format!("error: config file {}: {wants}", file.display());
        assert!(
            stderr(&o).contains(&want),
            "{config}: {}\nwants: {want}",
            stderr(&o)
        );
    }
}

#[test]
fn probe_reads_api_and_timeout_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let o = swarm(
        dir.path(),
        "api = \"http://127.0.0.1:1\"\ntimeout = \"2s\"\n",
        &["probe", "live"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("cannot reach http://127.0.0.1:1/health"),
        "{out}"
    );
}
