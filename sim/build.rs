//! Declares `cfg(tokio_unstable)`: the simulation replays exactly only when tokio is built
//! with it (`RUSTFLAGS="--cfg tokio_unstable"`), and says so.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tokio_unstable)");
}
