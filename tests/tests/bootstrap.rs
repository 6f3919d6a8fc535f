//! Bootstrapping through kpscd: for every Metadata and FindCoordinator version the broker
//! and kpsc agree on, through every listen port, the client sees only advertised
//! addresses. Real broker: librdkafka's mock cluster. Client: raw requests encoded with
//! `kafka-protocol` (so every version is exercised, not just the one a library picks).

use kafka_protocol::{
    messages::{
        ApiKey, FindCoordinatorRequest, FindCoordinatorResponse, MetadataRequest, MetadataResponse,
        TopicName, metadata_request::MetadataRequestTopic,
    },
    protocol::StrBytes,
};
use kpsc_tests::{
    Kpscd, MockCluster, REAL_BROKER_HOST, RawClient, contains_bytes, free_port_base, proxy_args,
};

fn negotiated(client: &mut RawClient, api: ApiKey) -> (i16, i16) {
    let (versions, _) = client.api_versions().unwrap();
    let k = versions
        .api_keys
        .iter()
        .find(|k| k.api_key == api as i16)
        .unwrap_or_else(|| panic!("{api:?} not offered through kpsc"));
    (k.min_version, k.max_version)
}

#[test]
fn every_metadata_and_find_coordinator_version_shows_only_advertised_addresses() {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("t", 3).unwrap();
    for p in 0..3 {
        cluster.set_leader("t", p, p + 1).unwrap();
    }
    let base = free_port_base(20);
    let kpscd = Kpscd::start(&proxy_args(&cluster, base, &[])).unwrap();
    // Every port kpscd serves: broker 1 static, 2 and 3 deterministic (base + 10 + id).
    let listen_ports = [base, base + 12, base + 13];
    let expected = [
        (1, format!("127.0.1.1:{base}")),
        (2, format!("127.0.1.2:{}", base + 12)),
        (3, format!("127.0.1.3:{}", base + 13)),
    ];

    let mut metadata_versions_checked = 0;
    let mut coordinator_versions_checked = 0;
    for (i, port) in listen_ports.iter().enumerate() {
        let addr = format!("127.0.1.{}:{port}", i + 1);
        let mut client = RawClient::connect(&addr).unwrap();
        let (min, max) = negotiated(&mut client, ApiKey::Metadata);
        assert!(max >= 12, "Metadata capped too low: {max}");
        for version in min..=max {
            let topics = if version == 0 {
                Vec::new() // v0: empty list means all topics
            } else {
                vec![
                    MetadataRequestTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_static_str("t")))),
                ]
            };
            let request = MetadataRequest::default().with_topics(Some(topics));
            let (response, raw): (MetadataResponse, _) =
                client.call(ApiKey::Metadata, version, &request).unwrap();
            let mut seen: Vec<(i32, String)> = response
                .brokers
                .iter()
                .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
                .collect();
            seen.sort();
            assert_eq!(seen, expected.to_vec(), "Metadata v{version} via {addr}");
            assert!(
                !contains_bytes(&raw, REAL_BROKER_HOST.as_bytes()),
                "Metadata v{version} via {addr} carries {REAL_BROKER_HOST}"
            );
            metadata_versions_checked += 1;
        }

        let (min, max) = negotiated(&mut client, ApiKey::FindCoordinator);
        for version in min..=max {
            let mut request = FindCoordinatorRequest::default().with_key_type(0);
            if version < 4 {
                request = request.with_key(StrBytes::from_static_str("group-a"));
            } else {
                request = request.with_coordinator_keys(vec![StrBytes::from_static_str("group-a")]);
            }
            let (response, raw): (FindCoordinatorResponse, _) = client
                .call(ApiKey::FindCoordinator, version, &request)
                .unwrap();
            let found: Vec<(i32, String)> = if version < 4 {
                vec![(
                    response.node_id.0,
                    format!("{}:{}", response.host, response.port),
                )]
            } else {
                response
                    .coordinators
                    .iter()
                    .map(|c| (c.node_id.0, format!("{}:{}", c.host, c.port)))
                    .collect()
            };
            for (id, address) in &found {
                assert!(
                    expected.contains(&(*id, address.clone())),
                    "FindCoordinator v{version} via {addr}: {id} at {address}"
                );
            }
            assert!(!contains_bytes(&raw, REAL_BROKER_HOST.as_bytes()));
            coordinator_versions_checked += 1;
        }
    }
    // librdkafka 2.12's mock serves Metadata v0-12; v13 is covered by the confluent-kafka
    // 2.16 tests (tests/python), whose mock serves it.
    assert!(
        metadata_versions_checked >= 3 * 13,
        "Metadata v0-12 on each port"
    );
    assert!(
        coordinator_versions_checked >= 3 * 4,
        "FindCoordinator v0-3 at least"
    );
    assert!(
        kpscd.metric("kpsc_rewrites_total", "api=\"Metadata\"") >= metadata_versions_checked as f64
    );
}
