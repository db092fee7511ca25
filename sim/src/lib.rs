//! A seeded, deterministic simulation of a swarm cluster.
//!
//! Real coordinators (openraft over QUIC with mutual TLS, redb storage, the axum API)
//! and real workers run as hosts of a [turmoil] simulation: one thread, simulated time,
//! a simulated network whose latency, loss, partitions and host crashes are driven by a
//! seed. Snapshots are on (checkpoints, chunked installs, all on the simulation's
//! thread), and the cluster's membership changes while the faults run: a node replaced by
//! a brand-new one, a node wiped and added back. Clients submit and read through the HTTP
//! API and record what they saw (some tasks under a concurrency key or a rate limit the
//! run sets first, and schedules that submit a task a tick); at the end every member's checkpoint is read from its
//! data dir; the [`checker`] judges the history and compares the replicas.
//!
//! * [`net`]: quinn over turmoil UDP, axum and hyper over turmoil TCP.
//! * [`certs`]: cluster certificates of a fixed size.
//! * [`faults`]: fault schedules drawn from the seed, and turning them into link states.
//! * [`driver`]: applying a schedule to the simulation between steps.
//! * [`membership`]: the operator that adds and removes nodes under faults, and the
//!   final comparison of the replicas.
//! * [`scenario`]: one run of one seed.
//! * [`checker`]: the history model and the checker (durability, idempotency,
//!   integrity, dependencies, linearizable reads, membership, unique executions, no
//!   phantom attempts, concurrency keys, rate limits, schedule ticks, identical
//!   replicas).

pub mod certs;
pub mod checker;
pub mod driver;
pub mod faults;
pub mod membership;
pub mod net;
pub mod scenario;
