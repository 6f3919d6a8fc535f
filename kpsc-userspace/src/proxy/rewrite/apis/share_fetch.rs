//! ShareFetch (78): `node_endpoints` in every version (KIP-932 share groups).

use kafka_protocol::messages::{ApiKey, ShareFetchResponse};

use crate::{
    kafka::layout::{BYTES, Field, I16, I32, I64, STR, Schema, Ty, UUID, all},
    proxy::rewrite::{
        apis::shared::{LEADER_ID_AND_EPOCH, NODE_ENDPOINT},
        declaration::{AddressApi, Codec},
    },
};

pub static API: AddressApi = AddressApi {
    #[cfg(test)]
    fixture: tests::fixture_frame,
    ..AddressApi::every_version(ApiKey::ShareFetch, &SCHEMA, Codec::of::<ShareFetchResponse>())
};


const ACQUIRED_RECORDS: &[Field] = &[
    all("first_offset", I64),
    all("last_offset", I64),
    all("delivery_count", I16),
];
const PARTITION: &[Field] = &[
    all("partition_index", I32),
    all("error_code", I16),
    all("error_message", STR),
    all("acknowledge_error_code", I16),
    all("acknowledge_error_message", STR),
    all("current_leader", Ty::Struct(LEADER_ID_AND_EPOCH)),
    all("records", BYTES),
    all("acquired_records", Ty::Array(ACQUIRED_RECORDS)),
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
        all("acquisition_lock_timeout_ms", I32),
        all("responses", Ty::Array(TOPIC)),
        all("node_endpoints", Ty::Array(NODE_ENDPOINT)),
    ],
};

#[cfg(test)]
pub mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{BrokerId, share_fetch_response as sf};

    use super::*;
    use crate::{
        kafka::layout::assert_min_size_matches,
        proxy::rewrite::{apis::shared::node_endpoint_list, declaration::Endpoint, testkit::*},
    };

    pub fn fixture(_v: i16) -> (ShareFetchResponse, Vec<Endpoint>) {
        let partition = sf::PartitionData::default()
            .with_partition_index(0)
            .with_error_message(None)
            .with_acknowledge_error_message(Some(s("")))
            .with_current_leader(
                sf::LeaderIdAndEpoch::default()
                    .with_leader_id(1)
                    .with_leader_epoch(4),
            )
            .with_records(Some(Bytes::from_static(b"opaque share records")))
            .with_acquired_records(vec![
                sf::AcquiredRecords::default()
                    .with_first_offset(0)
                    .with_last_offset(9)
                    .with_delivery_count(1),
            ]);
        let node = |id: i32, host: &'static str| {
            sf::NodeEndpoint::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack(Some(s("rack-d")))
        };
        let message = ShareFetchResponse::default()
            .with_acquisition_lock_timeout_ms(30_000)
            .with_responses(vec![
                sf::ShareFetchableTopicResponse::default().with_partitions(vec![partition]),
            ])
            .with_node_endpoints(vec![node(1, "10.0.0.1"), node(2, "10.0.0.2")]);
        (
            message,
            vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
        )
    }

    pub(in crate::proxy::rewrite) fn fixture_frame(v: i16) -> Bytes {
        frame(ApiKey::ShareFetch, v, &fixture(v).0)
    }

    fn endpoints(m: &ShareFetchResponse) -> Vec<Endpoint> {
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
        assert_min_size_matches::<ShareFetchResponse>("ShareFetch", SCHEMA.fields, f, 1..=1);
        assert_min_size_matches::<sf::ShareFetchableTopicResponse>("topic", TOPIC, f, 1..=1);
        assert_min_size_matches::<sf::PartitionData>("partition", PARTITION, f, 1..=1);
        assert_min_size_matches::<sf::AcquiredRecords>("acquired", ACQUIRED_RECORDS, f, 1..=1);
        assert_min_size_matches::<sf::LeaderIdAndEpoch>("leader", LEADER_ID_AND_EPOCH, f, 1..=1);
        assert_min_size_matches::<sf::NodeEndpoint>("endpoint", NODE_ENDPOINT, f, 1..=1);
    }
}
