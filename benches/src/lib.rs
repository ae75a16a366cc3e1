//! Benchmarks and the load generator of Switchboard.
