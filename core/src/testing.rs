//! Proptest strategies for property-testing policies against the real core
//! (feature `proptest`).
