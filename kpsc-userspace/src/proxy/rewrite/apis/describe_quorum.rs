//! DescribeQuorum (55): v2+ list every voter's listeners (KIP-853), with uint16 ports.

use kafka_protocol::messages::{ApiKey, DescribeQuorumResponse};

use crate::{
    kafka::layout::{
        Field, HOST, I16, I32, I64, NODE_ID, PORT16, STR, Schema, Ty, UUID, all, since,
    },
    proxy::rewrite::declaration::{AddressApi, Codec},
};

pub static API: AddressApi = AddressApi {
    addresses_since: 2,
    inspect_from: 2,
    #[cfg(test)]
    fixture: tests::fixture_frame,
    ..AddressApi::every_version(ApiKey::DescribeQuorum, &SCHEMA, Codec::of::<DescribeQuorumResponse>())
};


const REPLICA: &[Field] = &[
    all("replica_id", I32),
    since(2, "replica_directory_id", UUID),
    all("log_end_offset", I64),
    since(1, "last_fetch_timestamp", I64),
    since(1, "last_caught_up_timestamp", I64),
];
const PARTITION: &[Field] = &[
    all("partition_index", I32),
    all("error_code", I16),
    since(2, "error_message", STR),
    all("leader_id", I32),
    all("leader_epoch", I32),
    all("high_watermark", I64),
    all("current_voters", Ty::Array(REPLICA)),
    all("observers", Ty::Array(REPLICA)),
];
const TOPIC: &[Field] = &[
    all("topic_name", STR),
    all("partitions", Ty::Array(PARTITION)),
];
const LISTENER: &[Field] = &[all("name", STR), all("host", HOST), all("port", PORT16)];
const NODE: &[Field] = &[
    all("node_id", NODE_ID),
    all("listeners", Ty::Array(LISTENER)),
];
pub const SCHEMA: Schema = Schema {
    flexible_from: 0,
    fields: &[
        all("error_code", I16),
        since(2, "error_message", STR),
        all("topics", Ty::Array(TOPIC)),
        since(2, "nodes", Ty::Array(NODE)),
    ],
};

#[cfg(test)]
pub mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{BrokerId, TopicName, describe_quorum_response as dq};

    use super::*;
    use crate::{
        kafka::{guarded::CodecError, layout::assert_min_size_matches},
        proxy::rewrite::{
            declaration::{Advertised, Endpoint, RewriteError},
            response::AddressResponse,
            testkit::*,
        },
    };

    pub fn fixture(v: i16) -> (DescribeQuorumResponse, Vec<Endpoint>) {
        let replica = |id: i32| {
            dq::ReplicaState::default()
                .with_replica_id(BrokerId(id))
                .with_log_end_offset(50)
                .with_last_fetch_timestamp(if v >= 1 { 1_000 } else { -1 })
                .with_last_caught_up_timestamp(if v >= 1 { 900 } else { -1 })
        };
        let mut partition = dq::PartitionData::default()
            .with_leader_id(BrokerId(1))
            .with_leader_epoch(3)
            .with_high_watermark(60)
            .with_current_voters(vec![replica(1), replica(2)])
            .with_observers(vec![replica(3)]);
        let mut message = DescribeQuorumResponse::default();
        let mut endpoints = vec![];
        if v >= API.addresses_since {
            partition = partition.with_error_message(None);
            let listener = |name: &'static str, host: &'static str, port: u16| {
                dq::Listener::default()
                    .with_name(s(name))
                    .with_host(s(host))
                    .with_port(port)
            };
            message = message.with_error_message(None).with_nodes(vec![
                dq::Node::default()
                    .with_node_id(BrokerId(1))
                    .with_listeners(vec![
                        listener("PLAINTEXT", "10.0.0.1", 9092),
                        listener("CONTROLLER", "10.0.0.1", 9093),
                    ]),
                dq::Node::default()
                    .with_node_id(BrokerId(2))
                    .with_listeners(vec![listener("PLAINTEXT", "10.0.0.2", 9092)]),
            ]);
            endpoints = vec![
                ep(1, "10.0.0.1", 9092),
                ep(1, "10.0.0.1", 9093),
                ep(2, "10.0.0.2", 9092),
            ];
        }
        let message = message.with_topics(vec![
            dq::TopicData::default()
                .with_topic_name(TopicName(s("__cluster_metadata")))
                .with_partitions(vec![partition]),
        ]);
        (message, endpoints)
    }

    pub(in crate::proxy::rewrite) fn fixture_frame(v: i16) -> Bytes {
        frame(ApiKey::DescribeQuorum, v, &fixture(v).0)
    }

    fn endpoints(m: &DescribeQuorumResponse) -> Vec<Endpoint> {
        m.nodes
            .iter()
            .flat_map(|n| {
                n.listeners
                    .iter()
                    .map(|l| ep(n.node_id.0, &l.host, i32::from(l.port)))
            })
            .collect()
    }

    #[test]
    fn roundtrip_every_version() {
        assert_eq!(API.versions(), 0..=2);
        check_roundtrip(&API, fixture, endpoints);
    }

    #[test]
    fn port_must_fit_u16() {
        let (message, _) = fixture(2);
        let input = frame(ApiKey::DescribeQuorum, 2, &message);
        let mut response = AddressResponse::decode(&API, 2, input).unwrap();
        let err = response
            .rewrite(|_| {
                Some(Advertised {
                    host: ADVERTISED_HOST.into(),
                    port: 70_000,
                })
            })
            .unwrap_err();
        assert!(matches!(err, RewriteError::Codec(CodecError::Encode { .. })), "{err}");
    }

    #[test]
    fn layout_table_matches_kafka_protocol() {
        let f = SCHEMA.flexible_from;
        assert_min_size_matches::<DescribeQuorumResponse>("DescribeQuorum", SCHEMA.fields, f, 0..=2);
        assert_min_size_matches::<dq::TopicData>("topic", TOPIC, f, 0..=2);
        assert_min_size_matches::<dq::PartitionData>("partition", PARTITION, f, 0..=2);
        assert_min_size_matches::<dq::ReplicaState>("replica", REPLICA, f, 0..=2);
        assert_min_size_matches::<dq::Node>("node", NODE, f, 2..=2);
        assert_min_size_matches::<dq::Listener>("listener", LISTENER, f, 2..=2);
    }
}
