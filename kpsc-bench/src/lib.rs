//! kpsc's benchmark harness as a library: the benchmark sink, the load generator, the
//! targets, the report, and network-namespace topologies (shared with the tests).
pub mod interrupt;
pub mod load;
pub mod netns;
pub mod report;
pub mod sink;
pub mod target;
pub mod wire;
