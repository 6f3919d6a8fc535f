//! kpsc's benchmark harness as a library: the benchmark sink, the load generators
//! (pipelined requests, connection churn, churn under a SYN flood), the targets (nftables
//! included, and the sockmap ceiling probe's forwarder) and the report. Namespaces, cleanup and the kpscd handle come from the test kit
//! (kpsc-testkit), shared with the tests.
pub mod churn;
pub mod load;
pub mod nftables;
pub mod report;
pub mod sink;
pub mod sockmap_ceiling;
pub mod target;
pub mod wire;
