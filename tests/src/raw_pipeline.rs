//! Kafka requests written by hand for pipelines on one connection (encoded with the
//! kafka-protocol crate), their responses read and decoded, and records read back: for
//! tests that control every byte a client sends. Produce and Fetch name [`TOPIC`].
use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsRequest, FetchRequest, FetchResponse, FindCoordinatorRequest,
        MetadataRequest, ProduceRequest, ResponseHeader, TopicName,
        fetch_request::{FetchPartition, FetchTopic},
        metadata_request::MetadataRequestTopic,
        produce_request::{PartitionProduceData, TopicProduceData},
    },
    protocol::{Decodable, Encodable, HeaderVersion, StrBytes},
    records::RecordBatchDecoder,
};
pub use kpsc_testkit::read_frame;
use kpsc_testkit::{RawClient, request_body};

use crate::portmap::record_batch;

/// The topic the requests produce to and fetch from.
pub const TOPIC: &str = "pipeline";
/// The client id of every request [`Req::frame`] writes.
pub const CLIENT_ID: &str = "kpsc-pipeline";

pub fn topic_name() -> TopicName {
    TopicName(StrBytes::from_static_str(TOPIC))
}

/// One request of a pipeline.
#[derive(Clone, Debug)]
pub enum Req {
    Metadata,
    FindCoordinator,
    ApiVersions,
    Produce {
        version: i16,
        acks: i16,
        partition: i32,
        value: Vec<u8>,
    },
    Fetch {
        partition: i32,
    },
}

impl Req {
    /// The request frame, size prefix included.
    pub fn frame(&self, correlation_id: i32) -> Vec<u8> {
        fn body<R: Encodable + HeaderVersion>(api: ApiKey, v: i16, id: i32, r: &R) -> Vec<u8> {
            request_body(api, v, id, CLIENT_ID, r).unwrap().to_vec()
        }
        let body = match self {
            Req::Metadata => body(
                ApiKey::Metadata,
                12,
                correlation_id,
                &MetadataRequest::default().with_topics(Some(vec![
                    MetadataRequestTopic::default().with_name(Some(topic_name())),
                ])),
            ),
            Req::FindCoordinator => body(
                ApiKey::FindCoordinator,
                3,
                correlation_id,
                &FindCoordinatorRequest::default()
                    .with_key(StrBytes::from_string(format!("group-{correlation_id}"))),
            ),
            // v2: the highest librdkafka's mock serves.
            Req::ApiVersions => body(
                ApiKey::ApiVersions,
                2,
                correlation_id,
                &ApiVersionsRequest::default(),
            ),
            Req::Produce {
                version,
                acks,
                partition,
                value,
            } => body(
                ApiKey::Produce,
                *version,
                correlation_id,
                &produce_request(*acks, *partition, value),
            ),
            Req::Fetch { partition } => body(
                ApiKey::Fetch,
                11,
                correlation_id,
                &fetch_request(*partition, 0, 256 * 1024),
            ),
        };
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }
}

pub fn produce_request(acks: i16, partition: i32, value: &[u8]) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(5_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(topic_name())
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(partition)
                        .with_records(Some(record_batch(None, value))),
                ]),
        ])
}

pub fn fetch_request(partition: i32, offset: i64, partition_max_bytes: i32) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_wait_ms(0)
        .with_min_bytes(1)
        .with_max_bytes(64 << 20)
        .with_session_epoch(-1)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(topic_name())
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(partition)
                        .with_current_leader_epoch(-1)
                        .with_fetch_offset(offset)
                        .with_log_start_offset(-1)
                        .with_partition_max_bytes(partition_max_bytes),
                ]),
        ])
}

/// A record value of exactly `len` bytes (at least the tag's), unique by its tag.
pub fn value(tag: &str, len: usize) -> Vec<u8> {
    let mut v = tag.as_bytes().to_vec();
    let mut x = v.len() as u32;
    while v.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        v.push((x >> 16) as u8);
    }
    v
}

/// Decodes a response frame's body, checking its correlation id.
pub fn decode<R: Decodable + HeaderVersion>(
    raw: &Bytes,
    id: i32,
    version: i16,
) -> anyhow::Result<R> {
    let mut body = raw.clone();
    let header = ResponseHeader::decode(&mut body, R::header_version(version))?;
    anyhow::ensure!(
        header.correlation_id == id,
        "correlation id {} where {id} was next",
        header.correlation_id
    );
    R::decode(&mut body, version)
}

/// `raw` (a response body, header included) decoded as `R`, changed by `edit` and encoded
/// again, with any bytes after the message kept (librdkafka's mock sends one after
/// Metadata v12): what a proxy that rewrites exactly what `edit` does must forward.
pub fn edited_response<R: Decodable + Encodable + HeaderVersion>(
    raw: &[u8],
    version: i16,
    edit: impl FnOnce(&mut R),
) -> Vec<u8> {
    let mut body = Bytes::copy_from_slice(raw);
    let header = ResponseHeader::decode(&mut body, R::header_version(version)).unwrap();
    let mut response = R::decode(&mut body, version).unwrap();
    edit(&mut response);
    let mut out = BytesMut::new();
    header.encode(&mut out, R::header_version(version)).unwrap();
    response.encode(&mut out, version).unwrap();
    out.extend_from_slice(&body);
    out.to_vec()
}

/// Every record value in a Fetch response's records.
pub fn record_values(records: Option<&Bytes>) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut values = Vec::new();
    let mut buf = records.cloned().unwrap_or_default();
    for set in RecordBatchDecoder::decode_all(&mut buf)? {
        for record in set.records {
            values.push(record.value.unwrap_or_default().to_vec());
        }
    }
    Ok(values)
}

/// Everything produced to `TOPIC`, per partition, read back through kpscd.
pub fn consume_all(addr: &str, counts: &[usize]) -> Vec<Vec<Vec<u8>>> {
    let mut client = RawClient::connect(addr).unwrap();
    let mut all = Vec::new();
    for (partition, &count) in counts.iter().enumerate() {
        let mut values = Vec::new();
        while values.len() < count {
            let request = fetch_request(partition as i32, values.len() as i64, 32 << 20);
            let (r, _): (FetchResponse, _) = client.call(ApiKey::Fetch, 11, &request).unwrap();
            let got = record_values(r.responses[0].partitions[0].records.as_ref()).unwrap();
            assert!(
                !got.is_empty(),
                "partition {partition} ends after {}",
                values.len()
            );
            values.extend(got);
        }
        all.push(values);
    }
    all
}
