//! Load generator speaking the Kafka protocol: changefeed-like produce (pipelined Produce
//! v7 requests carrying one record batch each) and a metadata workload (sequential
//! Metadata requests, which go through kpsc's rewrite path).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use kafka_protocol::{
    messages::{
        ApiKey, BrokerId, FetchRequest, FetchResponse, FindCoordinatorRequest, MetadataRequest,
        ProduceRequest, ProduceResponse, ResponseHeader, TopicName,
        fetch_request::{FetchPartition, FetchTopic},
        produce_request::{PartitionProduceData, TopicProduceData},
    },
    protocol::{Decodable, HeaderVersion, StrBytes},
};
use kpsc_testkit::request_body;
use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    sync::{Semaphore, mpsc},
};

use crate::wire::{
    FETCH_VERSION, FIND_COORDINATOR_MAX, FrameReader, PRODUCE_VERSION, TOPIC, record_batch,
    write_frame,
};

#[derive(Clone, Debug)]
pub struct ProduceLoad {
    pub connections: usize,
    pub in_flight: usize,
    pub records_per_batch: usize,
    pub record_bytes: usize,
    pub acks: i16,
    pub duration: Duration,
    /// Decode every response and check its error code (the --quick correctness mode).
    pub verify: bool,
    /// Fetch instead of produce: each Fetch asks for one batch of the same size, and the
    /// bytes counted are the responses'.
    pub fetch: bool,
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct ProduceResult {
    pub requests: u64,
    pub records: u64,
    /// Request bytes on the wire (what the proxy forwards towards the broker).
    pub bytes: u64,
    pub elapsed: Duration,
    /// Request -> response, microseconds.
    pub latency: Option<Histogram<u64>>,
}

/// Client id of the load's requests; their correlation ids are patched in per request.
const CLIENT_ID: &str = "kpsc-bench";

/// One Fetch v11 request body for `bench`/0; `max_bytes` tells the sink the batch size to
/// answer with.
pub fn fetch_request(batch_bytes: i32) -> anyhow::Result<BytesMut> {
    let request = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(1)
        .with_max_bytes(batch_bytes)
        .with_session_epoch(-1)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str(TOPIC)))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(batch_bytes),
                ]),
        ]);
    request_body(ApiKey::Fetch, FETCH_VERSION, 0, CLIENT_ID, &request)
}

/// One Produce v7 request body (header included) with a valid record batch.
pub fn produce_request(load: &ProduceLoad) -> anyhow::Result<BytesMut> {
    let batch = record_batch(load.records_per_batch, load.record_bytes)?;
    let request = ProduceRequest::default()
        .with_acks(load.acks)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str(TOPIC)))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(batch)),
                ]),
        ]);
    request_body(ApiKey::Produce, PRODUCE_VERSION, 0, CLIENT_ID, &request)
}

/// Correlation id offset in a request body (after api key and version).
const CORRELATION_AT: usize = 4;

/// Runs `load` against `target`. `sink_produce_requests` counts the Produce requests the
/// sink behind `target` has read (how acks=0 runs, which get no answers, check for loss).
pub async fn run_produce(
    target: &str,
    load: &ProduceLoad,
    sink_produce_requests: &AtomicU64,
) -> anyhow::Result<ProduceResult> {
    let body = if load.fetch {
        fetch_request((load.records_per_batch * load.record_bytes) as i32)?
    } else {
        produce_request(load)?
    };
    // Connections are opened before the clock starts: the sweep measures forwarding, not
    // connection setup.
    let mut streams = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        let stream = TcpStream::connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    let received_before = sink_produce_requests.load(Ordering::Relaxed);
    let started = Instant::now();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|stream| {
            tokio::spawn(produce_connection(
                stream,
                body.clone(),
                load.clone(),
                started,
            ))
        })
        .collect();
    let mut total = ProduceResult::default();
    let mut latency = Histogram::<u64>::new(3)?;
    for t in tasks {
        let r = t.await??;
        total.requests += r.requests;
        total.bytes += r.bytes;
        if let Some(h) = &r.latency {
            latency.add(h)?;
        }
    }
    if !load.fetch && load.acks == 0 {
        // Nothing acknowledges acks=0 requests: the run ends when the sink has read them
        // all, and one that never arrives is a loss.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let received = sink_produce_requests.load(Ordering::Relaxed) - received_before;
            if received >= total.requests {
                ensure!(
                    received == total.requests,
                    "{} acks=0 requests sent, the sink read {received}",
                    total.requests
                );
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} acks=0 requests sent, only {received} reached the sink",
                    total.requests
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    total.elapsed = started.elapsed();
    total.records = total.requests * load.records_per_batch as u64;
    total.latency = (load.fetch || load.acks != 0).then_some(latency);
    Ok(total)
}

async fn produce_connection(
    stream: TcpStream,
    mut body: BytesMut,
    load: ProduceLoad,
    started: Instant,
) -> anyhow::Result<ProduceResult> {
    let (r, mut w) = stream.into_split();
    let expects_response = load.fetch || load.acks != 0;
    let fetch = load.fetch;
    // Requests in flight on this connection: the writer takes a permit, the reader gives
    // it back when the response arrives.
    let window = Arc::new(Semaphore::new(load.in_flight));
    let reader_window = Arc::clone(&window);
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(i32, Instant)>();
    let verify = load.verify;
    let reader = tokio::spawn(async move {
        let mut reader = FrameReader::new(r, 64 * 1024);
        let mut frame = Vec::new();
        let mut latency = Histogram::<u64>::new(3)?;
        let mut answered = 0u64;
        let mut response_bytes = 0u64;
        while let Some((correlation_id, sent_at)) = sent_rx.recv().await {
            if !reader.read_frame(16 << 20, &mut frame).await? {
                bail!("the target closed the connection with requests in flight");
            }
            let got = i32::from_be_bytes(frame[..4].try_into()?);
            ensure!(
                got == correlation_id,
                "response {got} arrived for request {correlation_id}: order broken"
            );
            response_bytes += 4 + frame.len() as u64;
            if verify && fetch {
                let mut bytes = Bytes::copy_from_slice(&frame);
                ResponseHeader::decode(&mut bytes, FetchResponse::header_version(FETCH_VERSION))?;
                let response = FetchResponse::decode(&mut bytes, FETCH_VERSION)?;
                ensure!(
                    response.error_code == 0,
                    "fetch error {}",
                    response.error_code
                );
                let partition = response
                    .responses
                    .first()
                    .and_then(|t| t.partitions.first())
                    .context("empty fetch response")?;
                ensure!(
                    partition.error_code == 0,
                    "fetch partition error {}",
                    partition.error_code
                );
                let records = partition
                    .records
                    .as_ref()
                    .context("fetch without records")?;
                ensure!(!records.is_empty(), "fetch without records");
            } else if verify {
                let mut bytes = Bytes::copy_from_slice(&frame);
                ResponseHeader::decode(
                    &mut bytes,
                    ProduceResponse::header_version(PRODUCE_VERSION),
                )?;
                let response = ProduceResponse::decode(&mut bytes, PRODUCE_VERSION)?;
                let errors: Vec<i16> = response
                    .responses
                    .iter()
                    .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code))
                    .filter(|e| *e != 0)
                    .collect();
                ensure!(errors.is_empty(), "produce errors {errors:?}");
            }
            latency.record(sent_at.elapsed().as_micros() as u64)?;
            answered += 1;
            reader_window.add_permits(1);
        }
        anyhow::Ok((answered, latency, response_bytes))
    });
    let mut sent = 0u64;
    let mut bytes = 0u64;
    let mut correlation_id = 0i32;
    loop {
        if started.elapsed() >= load.duration {
            break;
        }
        if expects_response {
            window.acquire().await?.forget();
        }
        correlation_id = correlation_id.wrapping_add(1);
        body[CORRELATION_AT..CORRELATION_AT + 4].copy_from_slice(&correlation_id.to_be_bytes());
        if expects_response {
            sent_tx.send((correlation_id, Instant::now())).ok();
        }
        write_frame(&mut w, &body).await?;
        sent += 1;
        bytes += 4 + body.len() as u64;
    }
    drop(sent_tx);
    w.flush().await?;
    let (answered, latency, response_bytes) = reader.await??;
    if expects_response {
        ensure!(
            answered == sent,
            "{sent} requests sent, {answered} acknowledged"
        );
    }
    Ok(ProduceResult {
        requests: sent,
        records: 0,
        // What the proxy forwarded in the direction that carries the data.
        bytes: if fetch { response_bytes } else { bytes },
        elapsed: Duration::ZERO,
        latency: Some(latency),
    })
}

/// The address-bearing requests of the control workload.
#[derive(Clone, Copy, Debug)]
pub enum ControlRequest {
    Metadata,
    FindCoordinator,
}

impl ControlRequest {
    pub fn workload(self) -> &'static str {
        match self {
            Self::Metadata => "metadata v9 (rewrite path)",
            Self::FindCoordinator => "find-coordinator v3 (rewrite path)",
        }
    }

    fn body(self) -> anyhow::Result<BytesMut> {
        match self {
            Self::Metadata => request_body(
                ApiKey::Metadata,
                9,
                0,
                CLIENT_ID,
                &MetadataRequest::default().with_topics(None),
            ),
            Self::FindCoordinator => request_body(
                ApiKey::FindCoordinator,
                FIND_COORDINATOR_MAX,
                0,
                CLIENT_ID,
                &FindCoordinatorRequest::default()
                    .with_key(StrBytes::from_static_str("kpsc-bench-group")),
            ),
        }
    }
}

/// Sequential control requests whose responses kpscd decodes and rewrites: the latency of
/// the rewrite path.
pub async fn run_control(
    target: &str,
    request: ControlRequest,
    duration: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r, 64 * 1024);
    let mut body = request.body()?;
    let mut latency = Histogram::<u64>::new(3)?;
    let mut frame = Vec::new();
    let started = Instant::now();
    let mut id = 0i32;
    while started.elapsed() < duration {
        id += 1;
        body[CORRELATION_AT..CORRELATION_AT + 4].copy_from_slice(&id.to_be_bytes());
        let sent = Instant::now();
        write_frame(&mut w, &body).await?;
        ensure!(
            reader.read_frame(16 << 20, &mut frame).await?,
            "target closed"
        );
        ensure!(
            i32::from_be_bytes(frame[..4].try_into()?) == id,
            "{request:?} response order broken"
        );
        latency.record(sent.elapsed().as_micros() as u64)?;
    }
    Ok(latency)
}
