//! kpscd's memory under Metadata responses far larger than usual: the rewrite path's memory
//! is one budget for all connections, and what a spike took is given back.
//!
//! The broker here is a fake, named as such: it injects what no real broker on these
//! machines can produce quickly (a ~48 MiB Metadata response, about 1.8 million
//! partitions). It answers ApiVersions and Metadata only, the way Kafka frames them.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::Arc,
    time::Duration,
};

use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsResponse, BrokerId, MetadataRequest, MetadataResponse, ResponseHeader,
        TopicName,
        api_versions_response::ApiVersion,
        metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        },
    },
    protocol::{Encodable, StrBytes},
};
use kpsc_tests::{Kpscd, RawClient, free_port_base, memory_use::status_bytes};

/// Metadata v1 only, so the fake broker never has to parse a request beyond its header.
const METADATA_VERSION: i16 = 1;
const TOPICS: usize = 1_800;
const PARTITIONS: i32 = 1_000;
/// Room for one rewrite of the ~48 MiB response (charged twice its size), not two.
const BUDGET_MIB: u64 = 150;

fn response(correlation_id: i32, message: &impl Encodable, version: i16) -> Vec<u8> {
    let mut body = Vec::new();
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut body, 0)
        .unwrap();
    message.encode(&mut body, version).unwrap();
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

fn metadata(port: u16, topics: usize) -> MetadataResponse {
    let partition = |i: i32| {
        MetadataResponsePartition::default()
            .with_partition_index(i)
            .with_leader_id(BrokerId(1))
            .with_replica_nodes(vec![BrokerId(1)])
            .with_isr_nodes(vec![BrokerId(1)])
    };
    MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(1))
                .with_host(StrBytes::from_static_str("127.0.0.1"))
                .with_port(i32::from(port)),
        ])
        .with_controller_id(BrokerId(1))
        .with_topics(
            (0..topics)
                .map(|t| {
                    MetadataResponseTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_string(format!("t{t:05}")))))
                        .with_partitions((0..PARTITIONS).map(partition).collect())
                })
                .collect(),
        )
}

/// Starts the fake broker; returns its port. kpscd's own discovery (client id
/// "kpsc-discovery") gets a small answer, every other Metadata request the large one.
fn fake_broker() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let large = Arc::new(response(0, &metadata(port, TOPICS), METADATA_VERSION));
    let small = Arc::new(response(0, &metadata(port, 0), METADATA_VERSION));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (large, small) = (Arc::clone(&large), Arc::clone(&small));
            std::thread::spawn(move || serve(stream, &large, &small));
        }
    });
    port
}

fn serve(mut stream: TcpStream, large: &[u8], small: &[u8]) {
    loop {
        let mut size = [0u8; 4];
        if stream.read_exact(&mut size).is_err() {
            return;
        }
        let mut body = vec![0; i32::from_be_bytes(size) as usize];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let api_key = i16::from_be_bytes([body[0], body[1]]);
        let correlation_id = i32::from_be_bytes(body[4..8].try_into().unwrap());
        let client_id_len = i16::from_be_bytes([body[8], body[9]]).max(0) as usize;
        let discovery = &body[10..10 + client_id_len] == b"kpsc-discovery";
        let frame = if api_key == ApiKey::ApiVersions as i16 {
            let versions = ApiVersionsResponse::default().with_api_keys(vec![
                ApiVersion::default()
                    .with_api_key(ApiKey::ApiVersions as i16)
                    .with_max_version(0),
                ApiVersion::default()
                    .with_api_key(ApiKey::Metadata as i16)
                    .with_max_version(METADATA_VERSION),
            ]);
            response(correlation_id, &versions, 0)
        } else {
            let mut frame = if discovery {
                small.to_vec()
            } else {
                large.to_vec()
            };
            frame[4..8].copy_from_slice(&correlation_id.to_be_bytes());
            frame
        };
        if stream.write_all(&frame).is_err() {
            return;
        }
    }
}

/// (VmRSS, VmHWM) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    (status_bytes(pid, "VmRSS:"), status_bytes(pid, "VmHWM:"))
}

/// Three clients ask for a ~48 MiB Metadata response at once. kpscd charges a rewrite
/// twice the frame (the frame and its rewritten copy); when it decoded the whole message
/// with kafka-protocol a rewrite took eight times the frame, and three at once took over a
/// gigabyte and kept most of it. With the budget (here 150 MiB: room for one at a time)
/// the peak stays within it, which it would not if a rewrite took more than it is charged,
/// every client gets its answer, and the memory is given back afterwards.
#[test]
fn large_rewrites_share_one_budget_and_memory_is_given_back() {
    let broker = fake_broker();
    let base = free_port_base(1);
    let kpscd = Kpscd::start(&[
        "--bootstrap-server-mapping".into(),
        format!("127.0.0.1:{broker},0.0.0.0:{base},127.0.1.1:{base}"),
        "--dynamic-listeners-disable".into(),
        "--rewrite-memory-budget".into(),
        format!("{BUDGET_MIB}MiB"),
    ])
    .unwrap();
    let (baseline, _) = memory(kpscd.pid());

    let clients: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
                client
                    .stream()
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let correlation_id = client
                    .send(
                        ApiKey::Metadata,
                        METADATA_VERSION,
                        &MetadataRequest::default().with_topics(None),
                    )
                    .unwrap();
                let raw = client.recv_raw().unwrap();
                assert_eq!(&raw[..4], &correlation_id.to_be_bytes());
                raw.len()
            })
        })
        .collect();
    for client in clients {
        let size = client.join().unwrap();
        assert!(size > 40 << 20, "a {size} byte answer");
    }
    assert!(
        kpscd.metric("kpsc_rewrite_budget_waits_total", "") >= 1.0,
        "three large rewrites at once must have waited for each other"
    );

    let (after, peak) = memory(kpscd.pid());
    let mib = |b: u64| b >> 20;
    eprintln!(
        "kpscd RSS: {} MiB before, peak {} MiB, {} MiB after",
        mib(baseline),
        mib(peak),
        mib(after)
    );
    assert!(
        peak < baseline + (BUDGET_MIB << 20) + (64 << 20),
        "peak {} MiB over a {} MiB baseline: the budget did not bound it",
        mib(peak),
        mib(baseline)
    );
    assert!(
        peak > baseline + (40 << 20),
        "the spike did not happen (peak {} MiB): the test proves nothing",
        mib(peak)
    );
    assert!(
        after < baseline + (64 << 20),
        "{} MiB kept after the spike (baseline {} MiB)",
        mib(after),
        mib(baseline)
    );
}
