//! Metadata (3): `brokers[].host/port` in every version. Clients bootstrap from it, so an
//! unmapped broker here is what would send a client around the proxy.

use kafka_protocol::messages::{ApiKey, MetadataResponse};

use crate::{
    kafka::layout::{
        BOOL, BROKER_IDS, Field, HOST, I16, I32, NODE_ID, PORT, STR, Schema, Ty, UUID, all, between,
        since,
    },
    proxy::rewrite::declaration::{AddressApi, Codec},
};

pub static API: AddressApi = AddressApi {
    #[cfg(test)]
    fixture: tests::fixture_frame,
    ..AddressApi::every_version(ApiKey::Metadata, &SCHEMA, Codec::of::<MetadataResponse>())
};


const BROKER: &[Field] = &[
    all("node_id", NODE_ID),
    all("host", HOST),
    all("port", PORT),
    since(1, "rack", STR),
];
const PARTITION: &[Field] = &[
    all("error_code", I16),
    all("partition_index", I32),
    all("leader_id", I32),
    since(7, "leader_epoch", I32),
    all("replica_nodes", BROKER_IDS),
    all("isr_nodes", BROKER_IDS),
    since(5, "offline_replicas", BROKER_IDS),
];
const TOPIC: &[Field] = &[
    all("error_code", I16),
    all("name", STR),
    since(10, "topic_id", UUID),
    since(1, "is_internal", BOOL),
    all("partitions", Ty::Array(PARTITION)),
    since(8, "topic_authorized_operations", I32),
];
pub const SCHEMA: Schema = Schema {
    flexible_from: 9,
    fields: &[
        since(3, "throttle_time_ms", I32),
        all("brokers", Ty::Array(BROKER)),
        since(2, "cluster_id", STR),
        since(1, "controller_id", I32),
        all("topics", Ty::Array(TOPIC)),
        between(8, 10, "cluster_authorized_operations", I32),
        since(13, "error_code", I16),
    ],
};

#[cfg(test)]
pub mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{
        BrokerId, TopicName,
        metadata_response::{MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic},
    };

    use super::*;
    use crate::{
        kafka::layout::assert_min_size_matches,
        proxy::rewrite::{declaration::Endpoint, testkit::*},
    };

    /// Every field the version has is set, so the walk covers it.
    pub fn fixture(v: i16) -> (MetadataResponse, Vec<Endpoint>) {
        let broker = |id: i32, host: &'static str| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack((v >= 1).then(|| s("rack-a")))
        };
        let partition = MetadataResponsePartition::default()
            .with_error_code(0)
            .with_partition_index(3)
            .with_leader_id(BrokerId(1))
            .with_leader_epoch(if v >= 7 { 4 } else { -1 })
            .with_replica_nodes(vec![BrokerId(1), BrokerId(2)])
            .with_isr_nodes(vec![BrokerId(1)])
            .with_offline_replicas(if v >= 5 { vec![BrokerId(2)] } else { vec![] });
        let topic = MetadataResponseTopic::default()
            .with_name(Some(TopicName(s("orders"))))
            .with_is_internal(false)
            .with_partitions(vec![partition])
            .with_topic_authorized_operations(if v >= 8 { 0x0ff8 } else { i32::MIN });
        let message = MetadataResponse::default()
            .with_throttle_time_ms(if v >= 3 { 7 } else { 0 })
            .with_brokers(vec![broker(1, "10.0.0.1"), broker(2, "10.0.0.2")])
            .with_cluster_id((v >= 2).then(|| s("cluster-x")))
            .with_controller_id(BrokerId(if v >= 1 { 1 } else { -1 }))
            .with_topics(vec![topic])
            .with_cluster_authorized_operations(if (8..=10).contains(&v) {
                0x0ff8
            } else {
                i32::MIN
            });
        let endpoints = vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)];
        (message, endpoints)
    }

    pub(in crate::proxy::rewrite) fn fixture_frame(v: i16) -> Bytes {
        frame(ApiKey::Metadata, v, &fixture(v).0)
    }

    fn endpoints(m: &MetadataResponse) -> Vec<Endpoint> {
        m.brokers
            .iter()
            .map(|b| ep(b.node_id.0, &b.host, b.port))
            .collect()
    }

    #[test]
    fn roundtrip_every_version() {
        assert_eq!(API.versions(), 0..=13);
        check_roundtrip(&API, fixture, endpoints);
    }

    #[test]
    fn layout_table_matches_kafka_protocol() {
        let f = SCHEMA.flexible_from;
        assert_min_size_matches::<MetadataResponse>("Metadata", SCHEMA.fields, f, 0..=13);
        assert_min_size_matches::<MetadataResponseBroker>("broker", BROKER, f, 0..=13);
        assert_min_size_matches::<MetadataResponseTopic>("topic", TOPIC, f, 0..=13);
        assert_min_size_matches::<MetadataResponsePartition>("partition", PARTITION, f, 0..=13);
    }
}
