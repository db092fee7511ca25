//! What the transport tests share: a throwaway PKI, endpoints on 127.0.0.1, and a bound
//! on every test's time. Each test binary uses part of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use swarm_transport::tls::CertFiles;
use swarm_transport::{
    client_config, client_endpoint, init_certs, issue_cert, server_config, server_endpoint,
    CertInfo, CertName, Identity, Role,
};

pub const ALPN: &[u8] = b"swarm-test/1";

/// A cluster certificate directory (`init_certs`) that lives as long as the value.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        Self::with_sans(&[])
    }

    pub fn with_sans(sans: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        init_certs(dir.path(), &sans, false).unwrap();
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn files(&self) -> CertFiles {
        CertFiles::in_dir(self.path())
    }

    pub fn identity(&self, role: Role) -> Identity {
        Identity::load(self.path(), role).unwrap()
    }

    pub fn read(&self, path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// The serial of the shared `role` certificate, as `swarm certs show` prints it.
    pub fn serial(&self, role: Role) -> String {
        CertInfo::read(self.files().cert(role)).unwrap().serial
    }

    /// Issues a worker certificate for node `name` into its own directory.
    pub fn issue_worker(&self, name: &str) -> PathBuf {
        let out = self.path().join(name);
        issue_cert(
            self.path(),
            &out,
            Role::Worker,
            &CertName::Node(name.into()),
            &[],
            swarm_transport::pki::DEFAULT_VALIDITY,
            false,
        )
        .unwrap();
        out
    }
}

pub fn any_local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn server(id: &Identity) -> (quinn::Endpoint, SocketAddr) {
    let ep = server_endpoint(any_local(), server_config(id, &[ALPN]).unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    (ep, addr)
}

/// A client that expects to reach the other role (workers dial coordinators).
pub fn client(id: &Identity) -> (quinn::Endpoint, quinn::ClientConfig) {
    let server_role = match id.role() {
        Role::Worker => Role::Coordinator,
        Role::Coordinator => Role::Worker,
    };
    (
        client_endpoint(any_local()).unwrap(),
        client_config(id, ALPN, server_role).unwrap(),
    )
}

/// Safety net so a broken test fails instead of hanging; correctness never depends on it.
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}
