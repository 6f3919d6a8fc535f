//! The changefeed soak, short version (about 95 s): an idempotent acks=all producer
//! writes keyed, sequence-numbered records through kpscd to the 3-broker mock while a
//! broker goes down and up, every leader moves, kpscd is stopped (SIGTERM) and killed
//! (SIGKILL) and restarted, and a storm of client connections opens and drops at once; a
//! consumer reads everything back through kpscd. Nothing acknowledged may be lost,
//! nothing reordered, and every fault must have been survived.
//!
//! Duplicates: when a connection is cut with Produce requests in flight (kpscd stopped or
//! killed, a broker down), the client retries them with the same producer id and
//! sequence numbers. A real broker recognises a batch it already wrote and does not write
//! it again; librdkafka's mock checks sequence numbers only for transactional producers,
//! so there a retried batch that had been written appears twice. Duplicates are therefore
//! allowed only for records queued around those faults, never elsewhere.

use std::time::Duration;

use kpsc_tests::soak::{Fault, SoakConfig, run};

#[test]
fn changefeed_survives_every_fault_without_loss_or_reordering() {
    let config = SoakConfig::short();
    let report = run(&config).unwrap();
    let table = report.markdown();
    eprintln!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak-test");
    report.write(&dir).unwrap();

    let v = report.verdict;
    assert!(
        report.acked as f64 >= 0.8 * config.rate as f64 * config.duration.as_secs_f64(),
        "too few records acknowledged for the rate: {table}"
    );
    assert_eq!(report.failed, 0, "deliveries failed: {table}");
    assert_eq!(v.lost, 0, "records lost: {table}");
    assert_eq!(v.reordered, 0, "records reordered: {table}");
    assert_eq!(
        report.duplicates_outside_faults, 0,
        "records duplicated away from any fault: {table}"
    );
    for f in &report.faults {
        if matches!(f.fault, Fault::LeadersMove | Fault::DisconnectStorm) {
            assert_eq!(f.duplicates, 0, "{:?} duplicated records: {table}", f.fault);
        }
    }
    eprintln!(
        "{} duplicates, all around connection-cutting faults",
        v.duplicated
    );
    assert_eq!(report.double_reports, 0, "a record acknowledged twice");
    assert_eq!(report.malformed, 0);
    assert_eq!(report.decode_failures, 0.0);
    // Started once, restarted after SIGTERM and after SIGKILL.
    assert_eq!(report.kpscd_starts, 3);
    for fault in Fault::ALL {
        let stall = report
            .worst_stall(fault)
            .unwrap_or_else(|| panic!("{fault:?} never injected: {table}"));
        // The producer recovered before the next fault.
        assert!(
            stall < config.fault_gap - Duration::from_secs(1),
            "{fault:?}: no acknowledgement for {stall:?}: {table}"
        );
    }
    // The broker was really down: its partitions waited for it.
    assert!(report.worst_stall(Fault::BrokerDownUp).unwrap() >= Duration::from_secs(2));
}
