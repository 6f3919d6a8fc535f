//! Helpers for the real client the tests drive, rdkafka (librdkafka).

use std::time::Duration;

use anyhow::bail;
use rdkafka::{
    message::ToBytes,
    producer::{BaseProducer, BaseRecord, ProducerContext},
    types::RDKafkaErrorCode,
};

/// Queues `record`, polling while librdkafka's queue is full; any other error fails.
pub fn send_waiting<'a, C, K, P>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'a, K, P, C::DeliveryOpaque>,
) -> anyhow::Result<()>
where
    C: ProducerContext,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => {
                producer.poll(Duration::ZERO);
                return Ok(());
            }
            Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                record = r;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => bail!("produce failed: {e}"),
        }
    }
}
