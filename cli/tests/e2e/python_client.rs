//! The Python client (`clients/python`) against real clusters: a coordinator and a worker
//! whose agents file registers `clients/python/examples/echo_agent.py` and
//! `clients/python/examples/ticker_agent.py` (lines printed a little apart, for the live
//! output tests) as `exec` agents, plus a second cluster serving its API over HTTPS; then
//! the package's own test suite (`python3 -m unittest discover -s clients/python/tests`)
//! runs against them and must pass with nothing skipped. Skipped, saying so, only when
//! there is no `python3`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{bin, wait_exit, Cluster};

/// How long the Python suite may run before it is killed (its own waits are bounded).
const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

/// The repository's root (this crate is `cli/`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

/// The absolute path of the `python3` on `PATH` (its `sys.executable`), if there is one
/// that runs. The worker starts agents with a cleared environment, so the agents file
/// names the interpreter itself rather than a shim that may need more of it.
fn python3() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// `path` as a TOML literal string (no escapes inside; the paths here never hold `'`).
fn toml_literal(path: &Path) -> String {
    let s = path.to_str().expect("UTF-8 path");
    assert!(!s.contains('\'') && !s.contains('\n'), "unusual path {s:?}");
    format!("'{s}'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_and_agent_helpers_pass_their_suite_against_real_clusters() {
    let Some(python) = python3() else {
        println!(
            "SKIPPED the_python_client_and_agent_helpers_pass_their_suite_against_real_clusters: \
             no runnable python3 on PATH"
        );
        return;
    };
    let client_dir = repo_root().join("clients").join("python");
    let src = client_dir.join("src");
    let agent = client_dir.join("examples").join("echo_agent.py");
    let ticker = client_dir.join("examples").join("ticker_agent.py");
    for script in [&agent, &ticker] {
        assert!(script.is_file(), "missing {}", script.display());
    }

    // A cluster with the Python example agents.
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    let agents_dir = c.dir.path().join("agents");
    std::fs::create_dir_all(&agents_dir).expect("agents dir");
    std::fs::write(
        agents_dir.join("agents.toml"),
        [("py_echo", &agent), ("py_ticker", &ticker)]
            .iter()
            .map(|(name, script)| {
                format!(
                    "[agents.{name}]\ncommand = {}\nargs = [{}]\nenv_set = {{ PYTHONPATH = {} }}\n\n",
                    toml_literal(&python),
                    toml_literal(script),
                    toml_literal(&src),
                )
            })
            .collect::<String>(),
    )
    .expect("agents file");
    c.wait_ready().await;
    c.start_worker("w1", 4, Some(&agents_dir.join("agents.toml")));
    c.wait_workers(&["w1"]).await;

    // A cluster serving its API over HTTPS (the suite waits for it itself, with the CA),
    // and another cluster's CA, which must not verify it.
    let mut tls = Cluster::new(&["--api-tls", "on"]);
    tls.start_coordinator();
    tls.start_worker("t1", 2, None);
    let other_ca = c.dir.path().join("other-ca");
    let out = Command::new(bin())
        .args(["certs", "init", "--dir"])
        .arg(&other_ca)
        .output()
        .expect("run swarm certs init");
    assert!(
        out.status.success(),
        "certs init: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let log_path = c.dir.path().join("python-suite.txt");
    let log = std::fs::File::create(&log_path).expect("suite log");
    let mut child = Command::new(&python)
        .args(["-m", "unittest", "discover", "-s", "tests", "-v"])
        .current_dir(&client_dir)
        .env("PYTHONPATH", &src)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SWARM_TEST_API", &c.api)
        .env("SWARM_TEST_TOKEN", &c.token)
        .env("SWARM_TEST_AGENTS_DIR", &agents_dir)
        .env(
            "SWARM_TEST_TLS_API",
            format!("https://127.0.0.1:{}", tls.api_port),
        )
        .env("SWARM_TEST_TLS_CA", tls.certs.join("ca.pem"))
        .env("SWARM_TEST_OTHER_CA", other_ca.join("ca.pem"))
        .env_remove("SWARM_API")
        .env_remove("SWARM_TOKEN")
        .env_remove("SWARM_TOKEN_FILE")
        .env_remove("SWARM_CA")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("suite log"))
        .stderr(log)
        .spawn()
        .expect("run the Python suite");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > SUITE_TIMEOUT {
            let _ = child.kill();
            let _ = wait_exit(&mut child, "the Python suite").await;
            panic!(
                "the Python suite ran past {SUITE_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        status.success(),
        "the Python suite failed ({status}):\n{output}\n{}\n{}",
        c.logs(),
        tls.logs()
    );
    // Every test ran: a skip here would mean the clusters were not wired in.
    assert!(
        !output.contains("skipped"),
        "the Python suite skipped tests:\n{output}"
    );
    assert!(output.contains("\nOK"), "{output}");
    println!("{output}");
}
