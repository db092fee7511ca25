//! Declares `cfg(tokio_unstable)`: the simulation replays exactly only when tokio is built
//! with it (`.cargo/config.toml` sets it for the workspace), and says so when it is not.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tokio_unstable)");
}
