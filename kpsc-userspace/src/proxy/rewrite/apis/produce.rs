//! Produce (0): v10+ carry KIP-951 `node_endpoints` (tagged) when the leader moved. The
//! changefeed's bulk: under `--bulk-policy cap` clients are held to v9 so these responses
//! pass without being decoded.

use kafka_protocol::messages::{ApiKey, ProduceResponse};

use crate::{
    kafka::layout::{Field, I16, I32, I64, STR, Schema, Ty, UUID, all, since, tagged, until},
    proxy::rewrite::{
        apis::shared::{LEADER_ID_AND_EPOCH, NODE_ENDPOINT},
        declaration::{AddressApi, Codec},
    },
};

pub static API: AddressApi = AddressApi {
    addresses_since: 10,
    // v9 is flexible: a tagged node_endpoints can appear outside its schema.
    inspect_from: 9,
    hidden_tag: Some(NODE_ENDPOINTS_TAG),
    capped_by_bulk_policy: true,
    #[cfg(test)]
    fixture: tests::fixture_frame,
    ..AddressApi::every_version(ApiKey::Produce, &SCHEMA, Codec::of::<ProduceResponse>())
};

/// Top-level tag of `node_endpoints` (v10+). A broker seen answering NOT_LEADER put it
/// into v9 responses, whose schema does not have it, and librdkafka 2.16 follows the
/// addresses in it, around the proxy: v9 responses are inspected and lose it.
const NODE_ENDPOINTS_TAG: u32 = 0;


const BATCH_ERROR: &[Field] = &[
    all("batch_index", I32),
    all("batch_index_error_message", STR),
];
const PARTITION: &[Field] = &[
    all("index", I32),
    all("error_code", I16),
    all("base_offset", I64),
    all("log_append_time_ms", I64),
    since(5, "log_start_offset", I64),
    since(8, "record_errors", Ty::Array(BATCH_ERROR)),
    since(8, "error_message", STR),
    tagged(0, 10, "current_leader", Ty::Struct(LEADER_ID_AND_EPOCH)),
];
const TOPIC: &[Field] = &[
    until(12, "name", STR),
    since(13, "topic_id", UUID),
    all("partition_responses", Ty::Array(PARTITION)),
];
pub const SCHEMA: Schema = Schema {
    flexible_from: 9,
    fields: &[
        all("responses", Ty::Array(TOPIC)),
        all("throttle_time_ms", I32),
        tagged(0, 10, "node_endpoints", Ty::Array(NODE_ENDPOINT)),
    ],
};

#[cfg(test)]
pub mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{BrokerId, TopicName, produce_response as produce};

    use super::*;
    use crate::{
        kafka::layout::assert_min_size_matches,
        proxy::rewrite::{apis::shared::node_endpoint_list, declaration::Endpoint, testkit::*},
    };

    pub fn fixture(v: i16) -> (ProduceResponse, Vec<Endpoint>) {
        let partition = produce::PartitionProduceResponse::default()
            .with_index(2)
            .with_base_offset(42)
            .with_log_append_time_ms(1_700_000_000_000)
            .with_log_start_offset(if v >= 5 { 0 } else { -1 })
            .with_record_errors(if v >= 8 {
                vec![
                    produce::BatchIndexAndErrorMessage::default()
                        .with_batch_index(1)
                        .with_batch_index_error_message(Some(s("bad record"))),
                ]
            } else {
                vec![]
            })
            .with_error_message((v >= 8).then(|| s("partial failure")))
            .with_current_leader(if v >= 10 {
                produce::LeaderIdAndEpoch::default()
                    .with_leader_id(BrokerId(2))
                    .with_leader_epoch(5)
            } else {
                Default::default()
            });
        let topic = produce::TopicProduceResponse::default()
            .with_name(if v <= 12 {
                TopicName(s("orders"))
            } else {
                Default::default()
            })
            .with_partition_responses(vec![partition]);
        let node = |id: i32, host: &'static str| {
            produce::NodeEndpoint::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack(Some(s("rack-c")))
        };
        let (nodes, endpoints) = if v >= API.addresses_since {
            (
                vec![node(1, "10.0.0.1"), node(2, "10.0.0.2")],
                vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
            )
        } else {
            (vec![], vec![])
        };
        let message = ProduceResponse::default()
            .with_responses(vec![topic])
            .with_throttle_time_ms(3)
            .with_node_endpoints(nodes);
        (message, endpoints)
    }

    pub(in crate::proxy::rewrite) fn fixture_frame(v: i16) -> Bytes {
        frame(ApiKey::Produce, v, &fixture(v).0)
    }

    fn endpoints(m: &ProduceResponse) -> Vec<Endpoint> {
        node_endpoint_list!(m.node_endpoints)
    }

    #[test]
    fn roundtrip_every_version() {
        assert_eq!(API.versions(), 3..=13);
        check_roundtrip(&API, fixture, endpoints);
    }

    /// A v9 response carrying tag 0 (v10's node_endpoints, outside v9's schema) leaves
    /// kpsc without it; other unknown tags stay.
    #[test]
    fn node_endpoints_hidden_in_v9_are_stripped() {
        use bytes::BytesMut;
        use kafka_protocol::protocol::{Decodable, Encodable};

        use crate::proxy::rewrite::response::AddressResponse;

        let (v10, _) = fixture(10);
        // The v10 encoding of the endpoints array is what such a broker sends in tag 0.
        let nodes = v10.node_endpoints.clone();
        let mut hidden = BytesMut::new();
        // Compact array: a uvarint of count + 1 (one byte for so few).
        hidden.extend_from_slice(&[nodes.len() as u8 + 1]);
        for node in &nodes {
            node.encode(&mut hidden, 10).unwrap();
        }
        // kafka-protocol never writes an unknown tag 0, so the broker's bytes are built by
        // hand: v9's top-level tagged fields (the last byte, a count of 0) become tag 0
        // (once, or twice as a broken broker might) and 7: "keep".
        for copies in [1u8, 2] {
            let mut input = BytesMut::from(&frame(ApiKey::Produce, 9, &fixture(9).0)[..]);
            assert_eq!(input.last(), Some(&0));
            input.truncate(input.len() - 1);
            input.extend_from_slice(&[copies + 1]);
            for _ in 0..copies {
                input.extend_from_slice(&[0, hidden.len() as u8]);
                input.extend_from_slice(&hidden);
            }
            input.extend_from_slice(&[7, 4]);
            input.extend_from_slice(b"keep");
            let input = input.freeze();
            assert!(contains(&input, REAL_PREFIX));
            let response = AddressResponse::decode(&API, 9, input).unwrap();
            assert!(response.stripped_hidden());
            let mut out = BytesMut::new();
            response.encode(&mut out).unwrap();
            assert!(!contains(&out, REAL_PREFIX), "real address left in v9");
            let mut buf = out.freeze().slice(5..); // correlation id + empty header tags
            let decoded = ProduceResponse::decode(&mut buf, 9).unwrap();
            assert_eq!(
                decoded.unknown_tagged_fields.keys().collect::<Vec<_>>(),
                [&7],
                "{copies} copies"
            );
            assert!(buf.is_empty(), "{copies} copies: nothing left over");
        }
    }

    #[test]
    fn layout_table_matches_kafka_protocol() {
        let f = SCHEMA.flexible_from;
        assert_min_size_matches::<ProduceResponse>("Produce", SCHEMA.fields, f, 3..=13);
        assert_min_size_matches::<produce::TopicProduceResponse>("topic", TOPIC, f, 3..=13);
        assert_min_size_matches::<produce::PartitionProduceResponse>("partition", PARTITION, f, 3..=13);
        assert_min_size_matches::<produce::BatchIndexAndErrorMessage>("batch", BATCH_ERROR, f, 8..=13);
        assert_min_size_matches::<produce::NodeEndpoint>("endpoint", NODE_ENDPOINT, f, 10..=13);
        assert_min_size_matches::<produce::LeaderIdAndEpoch>("leader", LEADER_ID_AND_EPOCH, f, 10..=13);
    }
}
