//! The **benchmark sink**: a deliberately minimal Kafka-speaking fake broker, so that the
//! proxy and not the broker is what gets measured. It is not a broker: it stores nothing,
//! answers every Produce with offset 0 and knows one topic, `bench`, with one partition.
//! It answers ApiVersions, Metadata and FindCoordinator (advertising itself as node 1),
//! Produce and Fetch; anything else closes the connection.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use bytes::BytesMut;
use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsResponse, BrokerId, FetchResponse, FindCoordinatorResponse,
        MetadataResponse, ProduceResponse, ResponseHeader, TopicName,
        api_versions_response::ApiVersion,
        fetch_response::{FetchableTopicResponse, PartitionData},
        metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        },
        produce_response::{PartitionProduceResponse, TopicProduceResponse},
    },
    protocol::{Encodable, HeaderVersion, StrBytes},
};
use tokio::net::{TcpListener, TcpStream};

use crate::wire::{
    Acks, FETCH_VERSION, FIND_COORDINATOR_MAX, FrameReader, PRODUCE_VERSION, RequestHeader,
    SIZE_LEN, TOPIC, frame_size, produce_acks, record_batch, write_frame,
};

/// Highest versions the sink answers of what kpscd's discovery sends (the load's versions
/// are in `wire`).
const METADATA_MAX: i16 = 12;
const API_VERSIONS_MAX: i16 = 3;

/// Fetch response template (correlation id 0) carrying one record batch of about
/// `batch_bytes`, built once per size and patched per request.
fn fetch_template(batch_bytes: usize) -> anyhow::Result<BytesMut> {
    let record_bytes = 1024.min(batch_bytes.max(1));
    let records = record_batch((batch_bytes / record_bytes).max(1), record_bytes)?;
    let body = FetchResponse::default().with_responses(vec![
        FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str(TOPIC)))
            .with_partitions(vec![
                PartitionData::default()
                    .with_partition_index(0)
                    .with_high_watermark(1_000_000)
                    .with_last_stable_offset(1_000_000)
                    .with_aborted_transactions(Some(Vec::new()))
                    .with_preferred_read_replica(BrokerId(-1))
                    .with_records(Some(records)),
            ]),
    ]);
    encode(
        0,
        FETCH_VERSION,
        FetchResponse::header_version(FETCH_VERSION),
        &body,
    )
}

/// `max_bytes` of a Fetch v4+ request: after the header, replica_id, max_wait and
/// min_bytes. The load generator sets it to the batch size it wants back.
fn fetch_max_bytes(body: &[u8]) -> anyhow::Result<usize> {
    let client_id_len =
        i16::from_be_bytes(body.get(8..10).context("short fetch")?.try_into()?).max(0) as usize;
    let at = 10 + client_id_len + 12;
    let max = i32::from_be_bytes(body.get(at..at + 4).context("short fetch")?.try_into()?);
    anyhow::ensure!(
        max > 0 && max <= 64 << 20,
        "fetch max_bytes {max} out of range"
    );
    Ok(max as usize)
}

/// A running sink (a handle: clones share it).
#[derive(Clone, Debug)]
pub struct Sink {
    pub addr: SocketAddr,
    produce_requests: Arc<AtomicU64>,
}

fn encode<T: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    header_version: i16,
    body: &T,
) -> anyhow::Result<BytesMut> {
    let mut out = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut out, header_version)?;
    body.encode(&mut out, version)?;
    Ok(out)
}

fn api_versions(correlation_id: i32, version: i16) -> anyhow::Result<BytesMut> {
    let key = |api: ApiKey, min: i16, max: i16| {
        ApiVersion::default()
            .with_api_key(api as i16)
            .with_min_version(min)
            .with_max_version(max)
    };
    let body = ApiVersionsResponse::default().with_api_keys(vec![
        key(ApiKey::Produce, 3, PRODUCE_VERSION),
        key(ApiKey::Fetch, 4, FETCH_VERSION),
        key(ApiKey::Metadata, 1, METADATA_MAX),
        key(ApiKey::ApiVersions, 0, API_VERSIONS_MAX),
        key(ApiKey::FindCoordinator, 0, FIND_COORDINATOR_MAX),
    ]);
    // The ApiVersions response header is always v0.
    encode(correlation_id, version.min(API_VERSIONS_MAX), 0, &body)
}

fn metadata(correlation_id: i32, version: i16, advertised: SocketAddr) -> anyhow::Result<BytesMut> {
    let body = MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(1))
                .with_host(StrBytes::from_string(advertised.ip().to_string()))
                .with_port(i32::from(advertised.port())),
        ])
        .with_controller_id(BrokerId(1))
        .with_topics(vec![
            MetadataResponseTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str(TOPIC))))
                .with_partitions(vec![
                    MetadataResponsePartition::default()
                        .with_leader_id(BrokerId(1))
                        .with_replica_nodes(vec![BrokerId(1)])
                        .with_isr_nodes(vec![BrokerId(1)]),
                ]),
        ]);
    encode(
        correlation_id,
        version,
        MetadataResponse::header_version(version),
        &body,
    )
}

fn find_coordinator(
    correlation_id: i32,
    version: i16,
    advertised: SocketAddr,
) -> anyhow::Result<BytesMut> {
    anyhow::ensure!(
        version <= FIND_COORDINATOR_MAX,
        "sink answers FindCoordinator v0-{FIND_COORDINATOR_MAX} only"
    );
    let body = FindCoordinatorResponse::default()
        .with_node_id(BrokerId(1))
        .with_host(StrBytes::from_string(advertised.ip().to_string()))
        .with_port(i32::from(advertised.port()));
    encode(
        correlation_id,
        version,
        FindCoordinatorResponse::header_version(version),
        &body,
    )
}

/// Produce response template (correlation id 0), patched per request.
fn produce_template() -> anyhow::Result<BytesMut> {
    let body = ProduceResponse::default().with_responses(vec![
        TopicProduceResponse::default()
            .with_name(TopicName(StrBytes::from_static_str(TOPIC)))
            .with_partition_responses(vec![PartitionProduceResponse::default().with_index(0)]),
    ]);
    encode(
        0,
        PRODUCE_VERSION,
        ProduceResponse::header_version(PRODUCE_VERSION),
        &body,
    )
}

impl Sink {
    /// Binds `addr` and serves until the process ends. Metadata advertises `advertised`,
    /// or the bound address.
    pub async fn start(addr: SocketAddr, advertised: Option<SocketAddr>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .context("binding the benchmark sink")?;
        let sink = Self {
            addr: listener.local_addr()?,
            produce_requests: Arc::default(),
        };
        let advertised = advertised.unwrap_or(sink.addr);
        let template = Arc::new(produce_template()?);
        let counter = Arc::clone(&sink.produce_requests);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let template = Arc::clone(&template);
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let _ = serve(stream, advertised, &template, &counter).await;
                });
            }
        });
        Ok(sink)
    }

    /// Produce requests this sink has read in full so far. Nothing answers acks=0
    /// requests: the count across a run is how such a run proves nothing was lost.
    pub fn produce_requests(&self) -> &AtomicU64 {
        &self.produce_requests
    }
}

enum Reply {
    None,
    Produce,
    /// Index into the connection's fetch templates.
    Fetch(usize),
    Other(BytesMut),
}

async fn serve(
    stream: TcpStream,
    advertised: SocketAddr,
    template: &BytesMut,
    produce_requests: &AtomicU64,
) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r, 64 * 1024);
    let mut produce = template.clone(); // per connection, patched per response
    // Fetch responses by requested size, built on first use.
    let mut fetches: Vec<(usize, BytesMut)> = Vec::new();
    loop {
        if !reader.fill_to(SIZE_LEN + 8).await? {
            return Ok(());
        }
        let size =
            frame_size(reader.buffered()[..4].try_into()?, 128 << 20, 8, "request")? as usize;
        let header = RequestHeader::parse(&reader.buffered()[SIZE_LEN..])?;
        let reply = match ApiKey::try_from(header.api_key) {
            Ok(ApiKey::Produce) => {
                let peek = (SIZE_LEN + size).min(reader.capacity());
                reader.fill_to(peek).await?;
                let acks =
                    match produce_acks(&reader.buffered()[SIZE_LEN..peek], header.api_version)? {
                        Acks::Value(a) => a,
                        Acks::NeedMore => anyhow::bail!("produce header too long"),
                    };
                anyhow::ensure!(
                    header.api_version == PRODUCE_VERSION,
                    "sink answers Produce v{PRODUCE_VERSION} only"
                );
                if acks != 0 {
                    produce[..4].copy_from_slice(&header.correlation_id.to_be_bytes());
                    Reply::Produce
                } else {
                    Reply::None
                }
            }
            Ok(ApiKey::Fetch) => {
                anyhow::ensure!(
                    header.api_version == FETCH_VERSION,
                    "sink answers Fetch v{FETCH_VERSION} only"
                );
                let peek = (SIZE_LEN + size).min(reader.capacity());
                reader.fill_to(peek).await?;
                let max = fetch_max_bytes(&reader.buffered()[SIZE_LEN..peek])?;
                let index = match fetches.iter().position(|(m, _)| *m == max) {
                    Some(i) => i,
                    None => {
                        fetches.push((max, fetch_template(max)?));
                        fetches.len() - 1
                    }
                };
                fetches[index].1[..4].copy_from_slice(&header.correlation_id.to_be_bytes());
                Reply::Fetch(index)
            }
            Ok(ApiKey::ApiVersions) => {
                Reply::Other(api_versions(header.correlation_id, header.api_version)?)
            }
            Ok(ApiKey::Metadata) => Reply::Other(metadata(
                header.correlation_id,
                header.api_version,
                advertised,
            )?),
            Ok(ApiKey::FindCoordinator) => Reply::Other(find_coordinator(
                header.correlation_id,
                header.api_version,
                advertised,
            )?),
            _ => anyhow::bail!(
                "the benchmark sink does not answer api key {}",
                header.api_key
            ),
        };
        reader
            .copy_to(SIZE_LEN + size, &mut tokio::io::sink())
            .await?;
        if header.api_key == ApiKey::Produce as i16 {
            // Counted once the whole request has arrived.
            produce_requests.fetch_add(1, Ordering::Relaxed);
        }
        match reply {
            Reply::None => {}
            // The template, patched in place: no allocation per produce.
            Reply::Produce => write_frame(&mut w, &produce).await?,
            Reply::Fetch(index) => write_frame(&mut w, &fetches[index].1).await?,
            Reply::Other(bytes) => write_frame(&mut w, &bytes).await?,
        }
    }
}
