//! What the load generator and the benchmark sink agree on: the topic, the request versions
//! the sink answers, the record batch both send (Produce requests, Fetch responses), and
//! the framing both speak, which is kpsc's own codec (the one place the benchmark names
//! kpsc's library). A Fetch request's `max_bytes` tells the sink the size of the batch to
//! answer with.

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
pub use kpsc::kafka::{
    frame::{FrameReader, SIZE_LEN, frame_size, write_frame},
    request::{Acks, RequestHeader, produce_acks},
};

/// The sink's one topic (one partition).
pub const TOPIC: &str = "bench";
pub const PRODUCE_VERSION: i16 = 7;
pub const FETCH_VERSION: i16 = 11;
/// v0-3 carry one coordinator at the top level; v4+ batch keys, which the load does not use.
pub const FIND_COORDINATOR_MAX: i16 = 3;

/// A valid uncompressed record batch.
pub fn record_batch(records_per_batch: usize, record_bytes: usize) -> anyhow::Result<Bytes> {
    let value = Bytes::from(vec![b'c'; record_bytes]);
    let records: Vec<Record> = (0..records_per_batch)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: -1,
            timestamp: 0,
            key: None,
            value: Some(value.clone()),
            headers: Default::default(),
        })
        .collect();
    let mut batch = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut batch,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )?;
    Ok(batch.freeze())
}
