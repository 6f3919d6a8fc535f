//! How long and how hard the soak runs.

use std::time::Duration;

pub struct SoakConfig {
    pub duration: Duration,
    /// Records per second.
    pub rate: u32,
    pub keys: usize,
    pub partitions: i32,
    /// Time between two faults (the first comes after one gap of steady load).
    pub fault_gap: Duration,
    pub value_bytes: usize,
}

impl SoakConfig {
    /// The test command's version: every fault once, about 75 s.
    pub fn short() -> Self {
        Self {
            duration: Duration::from_secs(72),
            rate: 500,
            keys: 60,
            partitions: 6,
            fault_gap: Duration::from_secs(12),
            value_bytes: 100,
        }
    }

    pub fn minutes(minutes: f64) -> Self {
        Self {
            duration: Duration::from_secs_f64(minutes * 60.0),
            fault_gap: Duration::from_secs(20),
            ..Self::short()
        }
    }
}
