//! Pipelining and bad input against a real broker (librdkafka's mock) through the real
//! kpscd binary. After every fault the daemon must still be alive and serving.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    time::Duration,
};

use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsRequest, ApiVersionsResponse, FindCoordinatorRequest,
        FindCoordinatorResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest,
        MetadataResponse, TopicName,
        list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic},
        metadata_request::MetadataRequestTopic,
    },
    protocol::StrBytes,
};
use kpsc_tests::{
    Kpscd, MockCluster, RAW_CLIENT_ID, RawClient, Tansu, expect_closed, free_port_base, proxy_args,
    response_delay_shim::{HoldPlan, proxy_behind_shim},
};

fn start() -> (MockCluster, Kpscd, u16) {
    start_with(&[])
}

fn start_with(extra: &[&str]) -> (MockCluster, Kpscd, u16) {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    let base = free_port_base(20);
    let args = [&["--max-frame-size", "1048576"][..], extra].concat();
    let kpscd = Kpscd::start(&proxy_args(&cluster, base, &args)).unwrap();
    (cluster, kpscd, base)
}

/// A full Metadata round trip through kpscd: the daemon is serving.
fn assert_serving(kpscd: &mut Kpscd, base: u16) {
    assert!(kpscd.alive(), "kpscd died; log:\n{}", kpscd.log());
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    let (response, raw): (MetadataResponse, _) = client
        .call(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(Some(vec![])),
        )
        .unwrap();
    // A broker that is down is left out of metadata; the others must be there, rewritten.
    assert!(response.brokers.len() >= 2, "{:?}", response.brokers);
    assert!(!kpsc_tests::contains_bytes(&raw, b"127.0.0.1"));
}

fn metadata_request() -> MetadataRequest {
    MetadataRequest::default().with_topics(Some(vec![
        MetadataRequestTopic::default().with_name(Some(TopicName(StrBytes::from_static_str("t")))),
    ]))
}

#[test]
fn pipelined_mixed_requests_come_back_in_order() {
    let (_cluster, mut kpscd, base) = start();
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    // 300 requests of four kinds, two of them rewritten, sent without waiting.
    let mut sent = Vec::new();
    for i in 0..300 {
        let id = match i % 4 {
            // v2: the highest librdkafka 2.12's mock serves.
            0 => client
                .send(ApiKey::ApiVersions, 2, &ApiVersionsRequest::default())
                .unwrap(),
            1 => client
                .send(ApiKey::Metadata, 12, &metadata_request())
                .unwrap(),
            2 => client
                .send(
                    ApiKey::FindCoordinator,
                    3,
                    &FindCoordinatorRequest::default()
                        .with_key(StrBytes::from_string(format!("g{i}"))),
                )
                .unwrap(),
            _ => client
                .send(
                    ApiKey::ListOffsets,
                    5,
                    &ListOffsetsRequest::default()
                        .with_replica_id((-1).into())
                        .with_topics(vec![
                            ListOffsetsTopic::default()
                                .with_name(TopicName(StrBytes::from_static_str("t")))
                                .with_partitions(vec![
                                    ListOffsetsPartition::default()
                                        .with_partition_index(i % 3)
                                        .with_timestamp(-1),
                                ]),
                        ]),
                )
                .unwrap(),
        };
        sent.push((i % 4, id));
    }
    for (kind, id) in sent {
        match kind {
            0 => {
                let (r, _): (ApiVersionsResponse, _) = client.recv(id, 2).unwrap();
                assert_eq!(r.error_code, 0);
            }
            1 => {
                let (r, _): (MetadataResponse, _) = client.recv(id, 12).unwrap();
                assert_eq!(r.brokers.len(), 3);
            }
            2 => {
                let (r, _): (FindCoordinatorResponse, _) = client.recv(id, 3).unwrap();
                assert!(r.host.starts_with("127.0.1."), "{}", r.host);
            }
            _ => {
                let _: (ListOffsetsResponse, _) = client.recv(id, 5).unwrap();
            }
        }
    }
    assert_serving(&mut kpscd, base);
}

/// Produce v7 with acks=0 (and no data) followed by Metadata: kpscd must not wait for an
/// answer to the produce, and the Metadata response must come back as the next frame.
/// Kafka never answers acks=0; librdkafka's mock does, and kpscd must drop that answer.
fn acks_zero_then_metadata(addr: &str) {
    let mut client = RawClient::connect(addr).unwrap();
    let produce = kafka_protocol::messages::ProduceRequest::default()
        .with_acks(0)
        .with_timeout_ms(1000);
    for _ in 0..3 {
        client.send(ApiKey::Produce, 7, &produce).unwrap();
        let id = client
            .send(ApiKey::Metadata, 12, &metadata_request())
            .unwrap();
        let (r, _): (MetadataResponse, _) = client.recv(id, 12).unwrap();
        assert!(!r.brokers.is_empty());
    }
    // Nothing else is owed to the client.
    client
        .stream()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(client.stream().read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "an answer to acks=0 reached the client"
    );
}

#[test]
fn produce_acks_zero_gets_no_response_and_order_is_kept() {
    let (_cluster, mut kpscd, base) = start();
    acks_zero_then_metadata(&format!("127.0.1.1:{base}"));
    assert_serving(&mut kpscd, base);

    let tansu = Tansu::start().unwrap();
    let tansu_base = free_port_base(200);
    let _kpscd = Kpscd::start(&[
        "--bootstrap-server-mapping".into(),
        format!("{},127.0.0.1:{tansu_base}", tansu.addr()),
        "--dynamic-listeners-disable".into(),
    ])
    .unwrap();
    acks_zero_then_metadata(&format!("127.0.0.1:{tansu_base}"));
}

/// As above against a broker that never answers acks=0, as Kafka: a shim in front of the
/// mock drops its answers. kpscd must expect none, under whichever `--bulk-transfer`.
#[test]
fn produce_acks_zero_to_a_broker_that_never_answers_it() {
    let cluster = MockCluster::new(3).unwrap();
    let (shim, mut kpscd, base) =
        proxy_behind_shim(&cluster, HoldPlan::kafka_acks0(RAW_CLIENT_ID), &[]).unwrap();
    acks_zero_then_metadata(&format!("127.0.1.1:{base}"));
    assert!(shim.errors().is_empty(), "{:?}", shim.errors());
    assert_eq!(shim.dropped_acks0_answers(), 3);
    assert_serving(&mut kpscd, base);
    assert_eq!(kpscd.metric("kpsc_connection_errors_total", ""), 0.0);
}

#[test]
fn bad_frames_close_only_their_connection() {
    let (_cluster, mut kpscd, base) = start();
    let addr = format!("127.0.1.1:{base}");
    // A healthy connection that stays open through all the faults.
    let mut bystander = RawClient::connect(&addr).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "client_frame_too_large",
            (2 * 1024 * 1024i32).to_be_bytes().to_vec(),
        ),
        ("client_bad_size", (-5i32).to_be_bytes().to_vec()),
        ("client_bad_size", 3i32.to_be_bytes().to_vec()),
        ("client_bad_header", {
            let mut f = 12i32.to_be_bytes().to_vec();
            f.extend_from_slice(&[0x7f, 0x00, 0, 1, 0, 0, 0, 9, 0xff, 0xff, 0, 0]);
            f
        }),
        // Within the key range the sockmap verdict may carry, yet unknown to Kafka; and a
        // known key with a negative version: both refused as a broker would never see them.
        ("client_bad_header", {
            let mut f = 12i32.to_be_bytes().to_vec();
            f.extend_from_slice(&[0, 127, 0, 1, 0, 0, 0, 9, 0xff, 0xff, 0, 0]);
            f
        }),
        ("client_bad_header", {
            let mut f = 12i32.to_be_bytes().to_vec();
            f.extend_from_slice(&[0, 3, 0xff, 0xff, 0, 0, 0, 9, 0xff, 0xff, 0, 0]);
            f
        }),
    ];
    for (reason, bytes) in cases {
        let before = kpscd.metric("kpsc_connection_errors_total", reason);
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&bytes).unwrap();
        expect_closed(&mut s);
        kpsc_tests::eventually(Duration::from_secs(5), || {
            anyhow::ensure!(kpscd.metric("kpsc_connection_errors_total", reason) > before);
            Ok(())
        })
        .unwrap_or_else(|_| panic!("{reason} not counted"));
        assert_serving(&mut kpscd, base);
    }

    // Truncated size prefix and a disconnect in the middle of a frame.
    for partial in [vec![0u8, 0], {
        let mut f = 100i32.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 3, 0, 12, 0, 0]);
        f
    }] {
        let before = kpscd.metric("kpsc_connection_errors_total", "client_truncated");
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&partial).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut s);
        kpsc_tests::eventually(Duration::from_secs(5), || {
            anyhow::ensure!(
                kpscd.metric("kpsc_connection_errors_total", "client_truncated") > before
            );
            Ok(())
        })
        .unwrap();
        assert_serving(&mut kpscd, base);
    }

    // The bystander was never disturbed.
    let (r, _): (MetadataResponse, _) = bystander
        .call(ApiKey::Metadata, 12, &metadata_request())
        .unwrap();
    assert_eq!(r.brokers.len(), 3);
}

#[test]
fn broker_down_or_reset_closes_the_client_connection_only() {
    let (cluster, mut kpscd, base) = start();
    let broker3 = format!("127.0.1.3:{}", base + 13);
    let mut client = RawClient::connect(&broker3).unwrap();
    let (_, _): (MetadataResponse, _) = client
        .call(ApiKey::Metadata, 12, &metadata_request())
        .unwrap();

    // Broker 3 goes down: the mock closes its connections (a reset for the proxy).
    cluster.broker_down(3).unwrap();
    let id = client.send(ApiKey::Metadata, 12, &metadata_request());
    if id.is_ok() {
        expect_closed(client.stream());
    }
    // New connections to broker 3's port are refused by the broker: closed, counted.
    let mut s = TcpStream::connect(&broker3).unwrap();
    expect_closed(&mut s);
    kpsc_tests::eventually(Duration::from_secs(5), || {
        anyhow::ensure!(
            kpscd.metric("kpsc_connection_errors_total", "broker_unreachable") >= 1.0
                || kpscd.metric("kpsc_connection_errors_total", "broker_closed") >= 1.0
        );
        Ok(())
    })
    .unwrap();
    assert_serving(&mut kpscd, base);

    cluster.broker_up(3).unwrap();
    let mut client = kpsc_tests::eventually(Duration::from_secs(10), || {
        let mut c = RawClient::connect(&broker3)?;
        let _: (MetadataResponse, _) = c.call(ApiKey::Metadata, 12, &metadata_request())?;
        Ok(c)
    })
    .unwrap();
    let (r, _): (MetadataResponse, _) = client
        .call(ApiKey::Metadata, 12, &metadata_request())
        .unwrap();
    assert_eq!(r.brokers.len(), 3);
}

/// An ApiVersions request newer than kpsc decodes is answered by kpsc as a broker would
/// (UNSUPPORTED_VERSION in v0 format), in order with the responses around it.
#[test]
fn newer_api_versions_request_gets_unsupported_version_in_order() {
    let (_cluster, mut kpscd, base) = start();
    let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
    let first = client
        .send(ApiKey::Metadata, 12, &metadata_request())
        .unwrap();
    // ApiVersions v7 (header v2): api key, version, correlation id, client id, no tags,
    // then compact client software name and version, no tags.
    let mut v7 = Vec::new();
    v7.extend_from_slice(&18i16.to_be_bytes());
    v7.extend_from_slice(&7i16.to_be_bytes());
    v7.extend_from_slice(&777i32.to_be_bytes());
    v7.extend_from_slice(&4i16.to_be_bytes());
    v7.extend_from_slice(b"test");
    v7.extend_from_slice(&[0, 2, b'x', 2, b'1', 0]);
    client.send_raw(&v7).unwrap();
    let last = client
        .send(ApiKey::Metadata, 12, &metadata_request())
        .unwrap();

    let (r, _): (MetadataResponse, _) = client.recv(first, 12).unwrap();
    assert_eq!(r.brokers.len(), 3);
    let raw = client.recv_raw().unwrap();
    assert_eq!(i32::from_be_bytes(raw[..4].try_into().unwrap()), 777);
    let mut body = raw.slice(4..);
    let answer = <kafka_protocol::messages::ApiVersionsResponse as kafka_protocol::protocol::Decodable>::decode(&mut body, 0).unwrap();
    assert_eq!(answer.error_code, 35, "UNSUPPORTED_VERSION");
    assert_eq!(answer.api_keys[0].api_key, ApiKey::ApiVersions as i16);
    assert!(answer.api_keys[0].max_version >= 3);
    let (r, _): (MetadataResponse, _) = client.recv(last, 12).unwrap();
    assert_eq!(r.brokers.len(), 3);
    // And the client can carry on with a version it was offered.
    let (versions, _) = client.api_versions().unwrap();
    assert_eq!(versions.error_code, 0);
    assert_serving(&mut kpscd, base);
}

#[test]
fn api_versions_hides_what_kpsc_cannot_rewrite() {
    let cluster = MockCluster::new(3).unwrap();
    let base = free_port_base(20);
    for (policy, produce_max, fetch_max) in [("cap", 9, 15), ("rewrite", i16::MAX, i16::MAX)] {
        let kpscd = Kpscd::start(&proxy_args(
            &cluster,
            base,
            &["--bulk-policy", policy, "--forbidden-api-keys", "20,19"],
        ))
        .unwrap();
        let mut client = RawClient::connect(&format!("127.0.1.1:{base}")).unwrap();
        // v3 first, then (librdkafka's mock answers v3 with UNSUPPORTED_VERSION in v0
        // format, which kpsc must rewrite too) the broker's own highest version.
        let (r, _) = client.api_versions().unwrap();
        let max = |key: ApiKey| {
            r.api_keys
                .iter()
                .find(|k| k.api_key == key as i16)
                .map(|k| k.max_version)
        };
        assert!(max(ApiKey::Produce).unwrap() <= produce_max, "{policy}");
        assert!(max(ApiKey::Fetch).unwrap() <= fetch_max, "{policy}");
        assert!(max(ApiKey::Metadata).unwrap() <= 13);
        assert!(max(ApiKey::FindCoordinator).unwrap() <= 6);
        assert_eq!(
            max(ApiKey::DeleteTopics),
            None,
            "forbidden key still offered"
        );
        assert_eq!(
            max(ApiKey::CreateTopics),
            None,
            "forbidden key still offered"
        );
        assert!(max(ApiKey::DescribeQuorum).is_none_or(|v| v <= 1));
        assert!(max(ApiKey::ShareFetch).is_none());
        // A forbidden request closes the connection and is counted.
        client
            .send(
                ApiKey::DeleteTopics,
                4,
                &kafka_protocol::messages::DeleteTopicsRequest::default(),
            )
            .unwrap();
        expect_closed(client.stream());
        assert_eq!(
            kpscd.metric("kpsc_forbidden_requests_total", "DeleteTopics"),
            1.0
        );
        drop(kpscd);
    }
}

/// Produce v7 with acks=1 whose transactional id makes the header `header_bytes` long.
fn produce_with_header_of(header_bytes: usize) -> kafka_protocol::messages::ProduceRequest {
    kafka_protocol::messages::ProduceRequest::default()
        .with_transactional_id(Some(kafka_protocol::messages::TransactionalId(
            StrBytes::from_string("x".repeat(header_bytes)),
        )))
        .with_acks(1)
        .with_timeout_ms(1000)
}

/// kpscd finds a Produce request's acks in what it has read of the frame: the first 8 KiB
/// under splice, copy and uring alike (copy's larger buffer exists only while it moves the rest
/// of a large frame). A header beyond that closes that connection with a counted error,
/// never the daemon; below it the request is forwarded. (The kernel path reads the header
/// where it lies.)
#[test]
fn produce_header_beyond_the_read_buffer_closes_only_its_connection() {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    for transfer in ["splice", "copy", "uring"] {
        let base = free_port_base(20);
        let mut kpscd = Kpscd::start(&proxy_args(
            &cluster,
            base,
            &["--max-frame-size", "1048576", "--bulk-transfer", transfer],
        ))
        .unwrap();
        let addr = format!("127.0.1.1:{base}");
        let mut client = RawClient::connect(&addr).unwrap();
        let id = client
            .send(ApiKey::Produce, 7, &produce_with_header_of(7_000))
            .unwrap();
        assert_eq!(
            client.recv_raw().unwrap()[..4],
            id.to_be_bytes(),
            "{transfer}"
        );

        let before = kpscd.metric("kpsc_connection_errors_total", "client_bad_header");
        let mut client = RawClient::connect(&addr).unwrap();
        client
            .send(ApiKey::Produce, 7, &produce_with_header_of(9_000))
            .unwrap();
        expect_closed(client.stream());
        kpsc_tests::eventually(Duration::from_secs(5), || {
            anyhow::ensure!(
                kpscd.metric("kpsc_connection_errors_total", "client_bad_header") > before,
                "{transfer}: no client_bad_header counted"
            );
            Ok(())
        })
        .unwrap();
        assert_serving(&mut kpscd, base);
    }
}
