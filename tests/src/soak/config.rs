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
    /// Extra librdkafka settings for the producer (e.g. to compare client behaviours).
    pub producer_config: Vec<(String, String)>,
}

impl SoakConfig {
    /// The test command's version: every fault once, 90 s. 15 s between faults: after a
    /// kpscd restart the producer was seen waiting up to 9.4 s for its next
    /// acknowledgement (see the README's soak section).
    pub fn short() -> Self {
        Self {
            duration: Duration::from_secs(90),
            rate: 500,
            keys: 60,
            partitions: 6,
            fault_gap: Duration::from_secs(15),
            value_bytes: 100,
            producer_config: Vec::new(),
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
