//! The parts of the `nemesis` binary (`src/bin/nemesis.rs`): the processes it runs, the
//! firewall it partitions them with, the client load, the faults, and the audit.

pub mod audit;
pub mod cluster;
pub mod faults;
pub mod firewall;
pub mod load;

/// Unix time in nanoseconds (the clock the agents' journal lines use, `date +%s%N`).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Unix time in milliseconds (the clock the coordinators record attempts with).
pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}
