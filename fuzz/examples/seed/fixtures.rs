//! Responses of every address-bearing API and version, and of ApiVersions, with every field
//! the version has set (the unit tests' fixtures are only compiled into test builds, so
//! they are rebuilt here with kafka-protocol's encoders), plus unknown tagged fields in
//! flexible versions so the seeds reach the code that keeps them.

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsResponse, BrokerId, DescribeClusterResponse, DescribeQuorumResponse,
        FetchResponse, FindCoordinatorResponse, MetadataResponse, ProduceResponse, ProducerId,
        ResponseHeader, ShareAcknowledgeResponse, ShareFetchResponse, TopicName,
        api_versions_response::{ApiVersion, FinalizedFeatureKey, SupportedFeatureKey},
        describe_cluster_response::DescribeClusterBroker,
        describe_quorum_response::{self as quorum, Listener, ReplicaState},
        fetch_response::{self as fetch, AbortedTransaction, FetchableTopicResponse},
        find_coordinator_response::Coordinator,
        metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        },
        produce_response::{
            self as produce, BatchIndexAndErrorMessage, PartitionProduceResponse,
            TopicProduceResponse,
        },
        share_acknowledge_response::{self as share_ack, ShareAcknowledgeTopicResponse},
        share_fetch_response::{self as share_fetch, AcquiredRecords, ShareFetchableTopicResponse},
    },
    protocol::{Encodable, StrBytes},
};
use uuid::Uuid;

const CORRELATION_ID: i32 = 0x0102_0304;
/// Loopback only: the seeds are committed.
const BROKERS: [(i32, &str, i32); 2] = [(1, "127.0.0.1", 9092), (2, "127.0.0.1", 9093)];
const TOPIC_ID: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
/// One record batch's worth of opaque bytes (kpsc never looks inside records).
const RECORDS: &[u8] = b"\0\0\0\0\0\0\0\0\0\0\0\x2a\0\0\0\0\x02records";

/// `BROKERS` as the KIP-951 `node_endpoints` of the response module `$module`.
macro_rules! node_endpoints {
    ($module:ident) => {
        BROKERS
            .iter()
            .map(|&(id, host, port)| {
                $module::NodeEndpoint::default()
                    .with_node_id(BrokerId(id))
                    .with_host(s(host))
                    .with_port(port)
                    .with_rack(Some(s("rack-a")))
            })
            .collect()
    };
}

fn s(value: &'static str) -> StrBytes {
    StrBytes::from_static_str(value)
}

/// Sets what `set` sets only if `target` still encodes at `v` with it: kafka-protocol
/// refuses non-default values of fields a version does not have, so one builder serves
/// every version.
fn fit<T: Encodable + Clone>(target: &mut T, v: i16, set: impl FnOnce(&mut T)) {
    let mut candidate = target.clone();
    set(&mut candidate);
    if candidate.encode(&mut BytesMut::new(), v).is_ok() {
        *target = candidate;
    }
}

/// `message` behind a response header, as `api` version `v` answers.
fn frame<T: Encodable>(api: ApiKey, v: i16, message: &T, header_tag: bool) -> Bytes {
    let header_version = if api == ApiKey::ApiVersions {
        0
    } else {
        api.response_header_version(v)
    };
    let mut header = ResponseHeader::default().with_correlation_id(CORRELATION_ID);
    if header_tag && header_version >= 1 {
        header = header.with_unknown_tagged_field(5, Bytes::from_static(b"header-tag"));
    }
    let mut out = BytesMut::new();
    header.encode(&mut out, header_version).unwrap();
    message.encode(&mut out, v).unwrap();
    out.freeze()
}

/// Every field `v` has, set; `tags` adds unknown tagged fields (flexible versions keep them).
pub fn response(api: ApiKey, v: i16, tags: bool) -> Option<Bytes> {
    let tag = |t: i32| Bytes::from(format!("tag-{t}"));
    macro_rules! tagged {
        ($message:expr, $t:expr) => {{
            let mut m = $message;
            if tags {
                fit(&mut m, v, |m| {
                    m.unknown_tagged_fields.insert($t, tag($t));
                });
            }
            m
        }};
    }
    Some(match api {
        ApiKey::Metadata => frame(api, v, &tagged!(metadata(v, tags), 99), tags),
        ApiKey::FindCoordinator => frame(api, v, &tagged!(find_coordinator(v), 98), tags),
        ApiKey::DescribeCluster => frame(api, v, &tagged!(describe_cluster(v), 97), tags),
        ApiKey::Produce => frame(api, v, &tagged!(produce(v), 96), tags),
        ApiKey::Fetch => frame(api, v, &tagged!(fetch(v), 95), tags),
        ApiKey::ShareFetch => frame(api, v, &tagged!(share_fetch(v), 94), tags),
        ApiKey::ShareAcknowledge => frame(api, v, &tagged!(share_acknowledge(v), 93), tags),
        ApiKey::DescribeQuorum => frame(api, v, &tagged!(describe_quorum(v), 92), tags),
        ApiKey::ApiVersions => frame(api, v, &tagged!(api_versions(v), 91), tags),
        _ => return None,
    })
}

fn metadata(v: i16, tags: bool) -> MetadataResponse {
    let mut m = MetadataResponse::default();
    fit(&mut m, v, |m| m.throttle_time_ms = 7);
    for (id, host, port) in BROKERS {
        let mut b = MetadataResponseBroker::default()
            .with_node_id(BrokerId(id))
            .with_host(s(host))
            .with_port(port);
        fit(&mut b, v, |b| b.rack = Some(s("rack-a")));
        if tags {
            fit(&mut b, v, |b| {
                b.unknown_tagged_fields
                    .insert(7, Bytes::from_static(b"broker-tag"));
            });
        }
        m.brokers.push(b);
    }
    fit(&mut m, v, |m| m.cluster_id = Some(s("cluster-x")));
    fit(&mut m, v, |m| m.controller_id = BrokerId(1));
    let mut p = MetadataResponsePartition::default()
        .with_partition_index(3)
        .with_leader_id(BrokerId(1))
        .with_replica_nodes(vec![BrokerId(1), BrokerId(2)])
        .with_isr_nodes(vec![BrokerId(1)]);
    fit(&mut p, v, |p| p.leader_epoch = 4);
    fit(&mut p, v, |p| p.offline_replicas = vec![BrokerId(2)]);
    let mut t = MetadataResponseTopic::default()
        .with_name(Some(TopicName(s("orders"))))
        .with_partitions(vec![p]);
    fit(&mut t, v, |t| t.topic_id = TOPIC_ID);
    fit(&mut t, v, |t| t.is_internal = true);
    fit(&mut t, v, |t| t.topic_authorized_operations = 0x0ff8);
    m.topics.push(t);
    fit(&mut m, v, |m| m.cluster_authorized_operations = 0x0ff8);
    fit(&mut m, v, |m| m.error_code = 0);
    m
}

fn find_coordinator(v: i16) -> FindCoordinatorResponse {
    let mut m = FindCoordinatorResponse::default();
    fit(&mut m, v, |m| m.throttle_time_ms = 7);
    let (id, host, port) = BROKERS[1];
    fit(&mut m, v, |m| {
        m.node_id = BrokerId(id);
        m.host = s(host);
        m.port = port;
    });
    fit(&mut m, v, |m| m.error_message = Some(s("none")));
    fit(&mut m, v, |m| {
        m.coordinators = BROKERS
            .iter()
            .map(|&(id, host, port)| {
                Coordinator::default()
                    .with_key(s("group-a"))
                    .with_node_id(BrokerId(id))
                    .with_host(s(host))
                    .with_port(port)
                    .with_error_message(Some(s("none")))
            })
            .collect();
    });
    m
}

fn describe_cluster(v: i16) -> DescribeClusterResponse {
    let mut m = DescribeClusterResponse::default()
        .with_throttle_time_ms(7)
        .with_error_message(Some(s("none")))
        .with_cluster_id(s("cluster-x"))
        .with_controller_id(BrokerId(1))
        .with_cluster_authorized_operations(0x0ff8);
    fit(&mut m, v, |m| m.endpoint_type = 1);
    for (id, host, port) in BROKERS {
        let mut b = DescribeClusterBroker::default()
            .with_broker_id(BrokerId(id))
            .with_host(s(host))
            .with_port(port)
            .with_rack(Some(s("rack-a")));
        fit(&mut b, v, |b| b.is_fenced = id == 2);
        m.brokers.push(b);
    }
    m
}

fn produce(v: i16) -> ProduceResponse {
    let mut p = PartitionProduceResponse::default()
        .with_index(0)
        .with_base_offset(42);
    fit(&mut p, v, |p| p.log_append_time_ms = 1_700_000_000_000);
    fit(&mut p, v, |p| p.log_start_offset = 1);
    fit(&mut p, v, |p| {
        p.record_errors = vec![
            BatchIndexAndErrorMessage::default()
                .with_batch_index(0)
                .with_batch_index_error_message(Some(s("bad record"))),
        ];
    });
    fit(&mut p, v, |p| p.error_message = Some(s("partial")));
    fit(&mut p, v, |p| {
        p.current_leader = produce::LeaderIdAndEpoch::default()
            .with_leader_id(BrokerId(2))
            .with_leader_epoch(5);
    });
    let mut t = TopicProduceResponse::default().with_partition_responses(vec![p]);
    fit(&mut t, v, |t| t.name = TopicName(s("orders")));
    fit(&mut t, v, |t| t.topic_id = TOPIC_ID);
    let mut m = ProduceResponse::default().with_responses(vec![t]);
    fit(&mut m, v, |m| m.throttle_time_ms = 7);
    fit(&mut m, v, |m| {
        m.node_endpoints = node_endpoints!(produce);
    });
    m
}

fn fetch(v: i16) -> FetchResponse {
    let mut p = fetch::PartitionData::default()
        .with_partition_index(0)
        .with_high_watermark(43)
        .with_records(Some(Bytes::from_static(RECORDS)));
    fit(&mut p, v, |p| p.last_stable_offset = 43);
    fit(&mut p, v, |p| p.log_start_offset = 1);
    fit(&mut p, v, |p| {
        p.aborted_transactions = Some(vec![
            AbortedTransaction::default()
                .with_producer_id(ProducerId(9))
                .with_first_offset(40),
        ]);
    });
    fit(&mut p, v, |p| p.preferred_read_replica = BrokerId(2));
    fit(&mut p, v, |p| {
        p.diverging_epoch = fetch::EpochEndOffset::default()
            .with_epoch(3)
            .with_end_offset(40);
    });
    fit(&mut p, v, |p| {
        p.current_leader = fetch::LeaderIdAndEpoch::default()
            .with_leader_id(BrokerId(2))
            .with_leader_epoch(5);
    });
    fit(&mut p, v, |p| {
        p.snapshot_id = fetch::SnapshotId::default()
            .with_end_offset(40)
            .with_epoch(3);
    });
    let mut t = FetchableTopicResponse::default().with_partitions(vec![p]);
    fit(&mut t, v, |t| t.topic = TopicName(s("orders")));
    fit(&mut t, v, |t| t.topic_id = TOPIC_ID);
    let mut m = FetchResponse::default().with_responses(vec![t]);
    fit(&mut m, v, |m| m.throttle_time_ms = 7);
    fit(&mut m, v, |m| m.session_id = 11);
    fit(&mut m, v, |m| {
        m.node_endpoints = node_endpoints!(fetch);
    });
    m
}

fn share_fetch(v: i16) -> ShareFetchResponse {
    let p = share_fetch::PartitionData::default()
        .with_partition_index(0)
        .with_error_message(Some(s("none")))
        .with_acknowledge_error_message(Some(s("none")))
        .with_current_leader(
            share_fetch::LeaderIdAndEpoch::default()
                .with_leader_id(2)
                .with_leader_epoch(5),
        )
        .with_records(Some(Bytes::from_static(RECORDS)))
        .with_acquired_records(vec![
            AcquiredRecords::default()
                .with_first_offset(40)
                .with_last_offset(42)
                .with_delivery_count(1),
        ]);
    let mut m = ShareFetchResponse::default()
        .with_throttle_time_ms(7)
        .with_error_message(Some(s("none")))
        .with_responses(vec![
            ShareFetchableTopicResponse::default()
                .with_topic_id(TOPIC_ID)
                .with_partitions(vec![p]),
        ])
        .with_node_endpoints(node_endpoints!(share_fetch));
    fit(&mut m, v, |m| m.acquisition_lock_timeout_ms = 30_000);
    m
}

fn share_acknowledge(_v: i16) -> ShareAcknowledgeResponse {
    let p = share_ack::PartitionData::default()
        .with_partition_index(0)
        .with_error_message(Some(s("none")))
        .with_current_leader(
            share_ack::LeaderIdAndEpoch::default()
                .with_leader_id(2)
                .with_leader_epoch(5),
        );
    ShareAcknowledgeResponse::default()
        .with_throttle_time_ms(7)
        .with_error_message(Some(s("none")))
        .with_responses(vec![
            ShareAcknowledgeTopicResponse::default()
                .with_topic_id(TOPIC_ID)
                .with_partitions(vec![p]),
        ])
        .with_node_endpoints(node_endpoints!(share_ack))
}

fn describe_quorum(v: i16) -> DescribeQuorumResponse {
    let replica = |id: i32| {
        let mut r = ReplicaState::default()
            .with_replica_id(BrokerId(id))
            .with_log_end_offset(100);
        fit(&mut r, v, |r| r.replica_directory_id = TOPIC_ID);
        fit(&mut r, v, |r| {
            r.last_fetch_timestamp = 1_700_000_000_000;
            r.last_caught_up_timestamp = 1_700_000_000_000;
        });
        r
    };
    let mut p = quorum::PartitionData::default()
        .with_partition_index(0)
        .with_leader_id(BrokerId(1))
        .with_leader_epoch(5)
        .with_high_watermark(100)
        .with_current_voters(vec![replica(1), replica(2)])
        .with_observers(vec![replica(3)]);
    fit(&mut p, v, |p| p.error_message = Some(s("none")));
    let mut m = DescribeQuorumResponse::default().with_topics(vec![
        quorum::TopicData::default()
            .with_topic_name(TopicName(s("__cluster_metadata")))
            .with_partitions(vec![p]),
    ]);
    fit(&mut m, v, |m| m.error_message = Some(s("none")));
    fit(&mut m, v, |m| {
        m.nodes = BROKERS
            .iter()
            .map(|&(id, host, port)| {
                quorum::Node::default()
                    .with_node_id(BrokerId(id))
                    .with_listeners(vec![
                        Listener::default()
                            .with_name(s("CONTROLLER"))
                            .with_host(s(host))
                            .with_port(u16::try_from(port).unwrap()),
                    ])
            })
            .collect();
    });
    m
}

/// What a Kafka 4 broker offers, plus a key kafka-protocol does not know.
fn api_versions(v: i16) -> ApiVersionsResponse {
    let keys: &[(i16, i16, i16)] = &[
        (0, 3, 13),
        (1, 4, 18),
        (2, 1, 10),
        (3, 0, 14),
        (10, 0, 6),
        (11, 0, 9),
        (18, 0, 5),
        (20, 1, 6),
        (52, 1, 2),
        (55, 0, 2),
        (60, 0, 2),
        (78, 1, 1),
        (79, 1, 1),
        (999, 0, 3),
    ];
    let mut m = ApiVersionsResponse::default().with_api_keys(
        keys.iter()
            .map(|&(key, min, max)| {
                ApiVersion::default()
                    .with_api_key(key)
                    .with_min_version(min)
                    .with_max_version(max)
            })
            .collect(),
    );
    fit(&mut m, v, |m| m.throttle_time_ms = 7);
    fit(&mut m, v, |m| {
        m.supported_features = vec![
            SupportedFeatureKey::default()
                .with_name(s("metadata.version"))
                .with_min_version(1)
                .with_max_version(27),
        ];
        m.finalized_features_epoch = 42;
        m.finalized_features = vec![
            FinalizedFeatureKey::default()
                .with_name(s("metadata.version"))
                .with_max_version_level(27)
                .with_min_version_level(27),
        ];
    });
    fit(&mut m, v, |m| m.zk_migration_ready = true);
    m
}
