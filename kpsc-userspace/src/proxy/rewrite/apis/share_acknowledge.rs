//! ShareAcknowledge (79): `node_endpoints` in every version (KIP-932 share groups).

use kafka_protocol::messages::{ApiKey, ShareAcknowledgeResponse};

use crate::{
    kafka::layout::{Field, I16, I32, STR, Schema, Ty, UUID, all},
    proxy::rewrite::{
        apis::shared::{LEADER_ID_AND_EPOCH, NODE_ENDPOINT},
        declaration::{AddressApi, Codec},
    },
};

pub static API: AddressApi = AddressApi {
    #[cfg(test)]
    fixture: tests::fixture_frame,
    ..AddressApi::every_version(ApiKey::ShareAcknowledge, &SCHEMA, Codec::of::<ShareAcknowledgeResponse>())
};


const PARTITION: &[Field] = &[
    all("partition_index", I32),
    all("error_code", I16),
    all("error_message", STR),
    all("current_leader", Ty::Struct(LEADER_ID_AND_EPOCH)),
];
const TOPIC: &[Field] = &[
    all("topic_id", UUID),
    all("partitions", Ty::Array(PARTITION)),
];
pub const SCHEMA: Schema = Schema {
    flexible_from: 0,
    fields: &[
        all("throttle_time_ms", I32),
        all("error_code", I16),
        all("error_message", STR),
        all("responses", Ty::Array(TOPIC)),
        all("node_endpoints", Ty::Array(NODE_ENDPOINT)),
    ],
};

#[cfg(test)]
pub mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{BrokerId, share_acknowledge_response as sa};

    use super::*;
    use crate::{
        kafka::layout::assert_min_size_matches,
        proxy::rewrite::{apis::shared::node_endpoint_list, declaration::Endpoint, testkit::*},
    };

    pub fn fixture(_v: i16) -> (ShareAcknowledgeResponse, Vec<Endpoint>) {
        let partition = sa::PartitionData::default()
            .with_partition_index(0)
            .with_error_message(None)
            .with_current_leader(
                sa::LeaderIdAndEpoch::default()
                    .with_leader_id(2)
                    .with_leader_epoch(4),
            );
        let node = |id: i32, host: &'static str| {
            sa::NodeEndpoint::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
        };
        let message = ShareAcknowledgeResponse::default()
            .with_error_message(None)
            .with_responses(vec![
                sa::ShareAcknowledgeTopicResponse::default().with_partitions(vec![partition]),
            ])
            .with_node_endpoints(vec![node(2, "10.0.0.2"), node(1, "10.0.0.1")]);
        (
            message,
            vec![ep(2, "10.0.0.2", 9092), ep(1, "10.0.0.1", 9092)],
        )
    }

    pub(in crate::proxy::rewrite) fn fixture_frame(v: i16) -> Bytes {
        frame(ApiKey::ShareAcknowledge, v, &fixture(v).0)
    }

    fn endpoints(m: &ShareAcknowledgeResponse) -> Vec<Endpoint> {
        node_endpoint_list!(m.node_endpoints)
    }

    #[test]
    fn roundtrip_every_version() {
        assert_eq!(API.versions(), 1..=1);
        check_roundtrip(&API, fixture, endpoints);
    }

    #[test]
    fn layout_table_matches_kafka_protocol() {
        let f = SCHEMA.flexible_from;
        assert_min_size_matches::<ShareAcknowledgeResponse>("ShareAcknowledge", SCHEMA.fields, f, 1..=1);
        assert_min_size_matches::<sa::ShareAcknowledgeTopicResponse>("topic", TOPIC, f, 1..=1);
        assert_min_size_matches::<sa::PartitionData>("partition", PARTITION, f, 1..=1);
        assert_min_size_matches::<sa::LeaderIdAndEpoch>("leader", LEADER_ID_AND_EPOCH, f, 1..=1);
        assert_min_size_matches::<sa::NodeEndpoint>("endpoint", NODE_ENDPOINT, f, 1..=1);
    }
}
