//! kpsc's benchmark harness as a library: the benchmark sink, the load generators
//! (pipelined requests, connection churn, churn under a SYN flood), the targets (nftables
//! included, the sockmap ceiling probe's forwarder and the Kafka-unaware relay probes) and the report. Namespaces, cleanup and the kpscd handle come from the test kit
//! (kpsc-testkit), shared with the tests.
pub mod churn;
pub mod load;
pub mod nftables;
pub mod relay_ceiling;
pub mod report;
pub mod sink;
pub mod sockmap_ceiling;
pub mod target;
pub mod wire;
