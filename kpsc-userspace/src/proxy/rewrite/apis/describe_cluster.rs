//! DescribeCluster (60): `brokers[].host/port` in every version (the admin client's view of
//! the cluster).

use kafka_protocol::messages::{ApiKey, DescribeClusterResponse};

use crate::{
    kafka::layout::{BOOL, Field, HOST, I8, I16, I32, NODE_ID, PORT, STR, Schema, Ty, all, since},
    proxy::rewrite::declaration::{AddressApi, Codec},
};

pub static API: AddressApi = AddressApi {
    #[cfg(test)]
    fixture: tests::fixture_frame,
    ..AddressApi::every_version(ApiKey::DescribeCluster, &SCHEMA, Codec::of::<DescribeClusterResponse>())
};


const BROKER: &[Field] = &[
    all("broker_id", NODE_ID),
    all("host", HOST),
    all("port", PORT),
    all("rack", STR),
    since(2, "is_fenced", BOOL),
];
pub const SCHEMA: Schema = Schema {
    flexible_from: 0,
    fields: &[
        all("throttle_time_ms", I32),
        all("error_code", I16),
        all("error_message", STR),
        since(1, "endpoint_type", I8),
        all("cluster_id", STR),
        all("controller_id", I32),
        all("brokers", Ty::Array(BROKER)),
        all("cluster_authorized_operations", I32),
    ],
};

#[cfg(test)]
pub mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{BrokerId, describe_cluster_response::DescribeClusterBroker};

    use super::*;
    use crate::{
        kafka::layout::assert_min_size_matches,
        proxy::rewrite::{declaration::Endpoint, testkit::*},
    };

    pub fn fixture(v: i16) -> (DescribeClusterResponse, Vec<Endpoint>) {
        let broker = |id: i32, host: &'static str| {
            DescribeClusterBroker::default()
                .with_broker_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack(Some(s("rack-b")))
                .with_is_fenced(v >= 2 && id == 2)
        };
        let message = DescribeClusterResponse::default()
            .with_throttle_time_ms(1)
            .with_error_message(None)
            .with_endpoint_type(if v >= 1 { 2 } else { 1 })
            .with_cluster_id(s("cluster-x"))
            .with_controller_id(BrokerId(1))
            .with_brokers(vec![broker(1, "10.0.0.1"), broker(2, "10.0.0.2")])
            .with_cluster_authorized_operations(0x0ff8);
        (
            message,
            vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
        )
    }

    pub(in crate::proxy::rewrite) fn fixture_frame(v: i16) -> Bytes {
        frame(ApiKey::DescribeCluster, v, &fixture(v).0)
    }

    fn endpoints(m: &DescribeClusterResponse) -> Vec<Endpoint> {
        m.brokers
            .iter()
            .map(|b| ep(b.broker_id.0, &b.host, b.port))
            .collect()
    }

    #[test]
    fn roundtrip_every_version() {
        assert_eq!(API.versions(), 0..=2);
        check_roundtrip(&API, fixture, endpoints);
    }

    #[test]
    fn layout_table_matches_kafka_protocol() {
        let f = SCHEMA.flexible_from;
        assert_min_size_matches::<DescribeClusterResponse>("DescribeCluster", SCHEMA.fields, f, 0..=2);
        assert_min_size_matches::<DescribeClusterBroker>("broker", BROKER, f, 0..=2);
    }
}
