//! A seeded, deterministic simulation of a swarm cluster.
//!
//! Real coordinators (openraft over QUIC with mutual TLS, redb storage, the axum API)
//! and real workers run as hosts of a [turmoil] simulation: one thread, simulated time,
//! a simulated network whose latency, loss, partitions and host crashes are driven by a
//! seed. Clients submit and read through the HTTP API and record what they saw; the
//! [`checker`] judges that history.
//!
//! * [`net`]: quinn over turmoil UDP, axum and hyper over turmoil TCP.
//! * [`certs`]: cluster certificates of a fixed size.
//! * [`faults`]: fault schedules drawn from the seed, and turning them into link states.
//! * [`scenario`]: one run of one seed.
//! * [`checker`]: the history model and the checker.

pub mod certs;
pub mod checker;
pub mod faults;
pub mod net;
pub mod scenario;
