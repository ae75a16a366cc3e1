//! Benchmarks and the load generator of Switchboard: the criterion benches of
//! the core live in `benches/`, the load generator in `src/bin/loadgen.rs`,
//! and the subscribers it runs over each transport in [`clients`].

pub mod clients;
