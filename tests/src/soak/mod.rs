//! The changefeed soak (`cargo xtask soak`, and its short version in the test command):
//! keyed, sequence-numbered records through kpscd while faults are injected on a
//! schedule; then lost, duplicated and reordered records, produce latency and the stall
//! each fault caused.

mod config;
mod faults;
mod ledger;
mod report;
mod run;

pub use config::SoakConfig;
pub use faults::Fault;
pub use ledger::{Acks, ConsumerLedger, ProducerLedger, Reads, Verdict, lock, stall_after, tally};
pub use report::Report;
pub use run::{consume, produce, run};
