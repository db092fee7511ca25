//! Vector memory and ReasoningBank for swarm.
