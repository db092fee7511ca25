//! Swarm topologies as pure routing rules.
