//! kpsc's benchmark harness as a library: the benchmark sink, the load generator, the
//! targets and the report. Namespaces, cleanup and the kpscd handle come from the test kit
//! (kpsc-testkit), shared with the tests.
pub mod load;
pub mod report;
pub mod sink;
pub mod target;
pub mod wire;
