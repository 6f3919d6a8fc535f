//! Fetch (1): v16+ carry KIP-951 `node_endpoints` (tagged, after the records). Consumers'
//! bulk: under `--bulk-policy cap` clients are held to v15 so these responses pass without
//! being decoded.

use kafka_protocol::messages::{ApiKey, FetchResponse};

use crate::{
    kafka::layout::{BYTES, Field, I16, I32, I64, STR, Schema, Ty, UUID, all, since, tagged, until},
    proxy::rewrite::{
        apis::shared::{LEADER_ID_AND_EPOCH, NODE_ENDPOINT},
        declaration::{AddressApi, Codec},
    },
};

pub static API: AddressApi = AddressApi {
    addresses_since: 16,
    inspect_from: 16,
    hidden_tag: Some(NODE_ENDPOINTS_TAG),
    capped_by_bulk_policy: true,
    #[cfg(test)]
    fixture: tests::fixture_frame,
    ..AddressApi::every_version(ApiKey::Fetch, &SCHEMA, Codec::of::<FetchResponse>())
};

/// Top-level tag of `node_endpoints` (v16+). Fetch v12-15 responses could carry it
/// outside their schema too, but they are the bulk of the traffic and pass opaquely
/// (README: what `--bulk-policy cap` leaves to the broker).
const NODE_ENDPOINTS_TAG: u32 = 0;


const ABORTED_TRANSACTION: &[Field] = &[all("producer_id", I64), all("first_offset", I64)];
const EPOCH_END_OFFSET: &[Field] = &[all("epoch", I32), all("end_offset", I64)];
const SNAPSHOT_ID: &[Field] = &[all("end_offset", I64), all("epoch", I32)];
const PARTITION: &[Field] = &[
    all("partition_index", I32),
    all("error_code", I16),
    all("high_watermark", I64),
    all("last_stable_offset", I64),
    since(5, "log_start_offset", I64),
    all("aborted_transactions", Ty::Array(ABORTED_TRANSACTION)),
    since(11, "preferred_read_replica", I32),
    all("records", BYTES),
    tagged(0, 0, "diverging_epoch", Ty::Struct(EPOCH_END_OFFSET)),
    tagged(1, 0, "current_leader", Ty::Struct(LEADER_ID_AND_EPOCH)),
    tagged(2, 0, "snapshot_id", Ty::Struct(SNAPSHOT_ID)),
];
const TOPIC: &[Field] = &[
    until(12, "topic", STR),
    since(13, "topic_id", UUID),
    all("partitions", Ty::Array(PARTITION)),
];
pub const SCHEMA: Schema = Schema {
    flexible_from: 12,
    fields: &[
        all("throttle_time_ms", I32),
        since(7, "error_code", I16),
        since(7, "session_id", I32),
        all("responses", Ty::Array(TOPIC)),
        tagged(0, 16, "node_endpoints", Ty::Array(NODE_ENDPOINT)),
    ],
};

#[cfg(test)]
pub mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{BrokerId, ProducerId, TopicName, fetch_response as fetch};

    use super::*;
    use crate::{
        kafka::layout::assert_min_size_matches,
        proxy::rewrite::{apis::shared::node_endpoint_list, declaration::Endpoint, testkit::*},
    };

    pub fn fixture(v: i16) -> (FetchResponse, Vec<Endpoint>) {
        let mut partition = fetch::PartitionData::default()
            .with_partition_index(1)
            .with_high_watermark(100)
            .with_last_stable_offset(90)
            .with_log_start_offset(if v >= 5 { 1 } else { -1 })
            .with_aborted_transactions(Some(vec![
                fetch::AbortedTransaction::default()
                    .with_producer_id(ProducerId(9))
                    .with_first_offset(10),
            ]))
            .with_preferred_read_replica(BrokerId(if v >= 11 { 2 } else { -1 }))
            .with_records(Some(Bytes::from_static(b"opaque record batch bytes")));
        if v >= 12 {
            partition = partition
                .with_diverging_epoch(
                    fetch::EpochEndOffset::default()
                        .with_epoch(3)
                        .with_end_offset(80),
                )
                .with_current_leader(
                    fetch::LeaderIdAndEpoch::default()
                        .with_leader_id(BrokerId(2))
                        .with_leader_epoch(6),
                )
                .with_snapshot_id(
                    fetch::SnapshotId::default()
                        .with_end_offset(70)
                        .with_epoch(2),
                );
        }
        let topic = fetch::FetchableTopicResponse::default()
            .with_topic(if v <= 12 {
                TopicName(s("orders"))
            } else {
                Default::default()
            })
            .with_partitions(vec![partition]);
        let node = |id: i32, host: &'static str| {
            fetch::NodeEndpoint::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack(None)
        };
        let (nodes, endpoints) = if v >= API.addresses_since {
            (
                vec![node(1, "10.0.0.1"), node(2, "10.0.0.2")],
                vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
            )
        } else {
            (vec![], vec![])
        };
        let message = FetchResponse::default()
            .with_throttle_time_ms(2)
            .with_session_id(if v >= 7 { 77 } else { 0 })
            .with_responses(vec![topic])
            .with_node_endpoints(nodes);
        (message, endpoints)
    }

    pub(in crate::proxy::rewrite) fn fixture_frame(v: i16) -> Bytes {
        frame(ApiKey::Fetch, v, &fixture(v).0)
    }

    fn endpoints(m: &FetchResponse) -> Vec<Endpoint> {
        node_endpoint_list!(m.node_endpoints)
    }

    #[test]
    fn roundtrip_every_version() {
        assert_eq!(API.versions(), 4..=18);
        check_roundtrip(&API, fixture, endpoints);
    }

    #[test]
    fn layout_table_matches_kafka_protocol() {
        let f = SCHEMA.flexible_from;
        assert_min_size_matches::<FetchResponse>("Fetch", SCHEMA.fields, f, 4..=18);
        assert_min_size_matches::<fetch::FetchableTopicResponse>("topic", TOPIC, f, 4..=18);
        assert_min_size_matches::<fetch::PartitionData>("partition", PARTITION, f, 4..=18);
        assert_min_size_matches::<fetch::AbortedTransaction>("aborted", ABORTED_TRANSACTION, f, 4..=18);
        assert_min_size_matches::<fetch::EpochEndOffset>("epoch", EPOCH_END_OFFSET, f, 12..=18);
        assert_min_size_matches::<fetch::SnapshotId>("snapshot", SNAPSHOT_ID, f, 12..=18);
        assert_min_size_matches::<fetch::LeaderIdAndEpoch>("leader", LEADER_ID_AND_EPOCH, f, 12..=18);
        assert_min_size_matches::<fetch::NodeEndpoint>("endpoint", NODE_ENDPOINT, f, 16..=18);
    }
}
