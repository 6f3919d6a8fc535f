//! FindCoordinator (10): v0-3 name one coordinator at the top level, v4+ a list (batched
//! lookups). Consumers and transactional producers connect to what it names.

use kafka_protocol::messages::{ApiKey, FindCoordinatorResponse};

use crate::{
    kafka::layout::{
        Field, HOST, I16, I32, NODE_ID, PORT, STR, Schema, Ty, all, between, since, until,
    },
    proxy::rewrite::declaration::{AddressApi, Codec},
};

pub static API: AddressApi = AddressApi {
    #[cfg(test)]
    fixture: tests::fixture_frame,
    ..AddressApi::every_version(ApiKey::FindCoordinator, &SCHEMA, Codec::of::<FindCoordinatorResponse>())
};


const COORDINATOR: &[Field] = &[
    all("key", STR),
    all("node_id", NODE_ID),
    all("host", HOST),
    all("port", PORT),
    all("error_code", I16),
    all("error_message", STR),
];
pub const SCHEMA: Schema = Schema {
    flexible_from: 3,
    fields: &[
        since(1, "throttle_time_ms", I32),
        until(3, "error_code", I16),
        between(1, 3, "error_message", STR),
        until(3, "node_id", NODE_ID),
        until(3, "host", HOST),
        until(3, "port", PORT),
        since(4, "coordinators", Ty::Array(COORDINATOR)),
    ],
};

#[cfg(test)]
pub mod tests {
    use bytes::{Bytes, BytesMut};
    use kafka_protocol::messages::{BrokerId, find_coordinator_response::Coordinator};

    use super::*;
    use crate::{
        kafka::layout::assert_min_size_matches,
        proxy::rewrite::{declaration::Endpoint, response::AddressResponse, testkit::*},
    };

    pub fn fixture(v: i16) -> (FindCoordinatorResponse, Vec<Endpoint>) {
        let message =
            FindCoordinatorResponse::default().with_throttle_time_ms(if v >= 1 { 5 } else { 0 });
        if v <= 3 {
            let message = message
                .with_node_id(BrokerId(1))
                .with_host(s("10.0.0.1"))
                .with_port(9092);
            let message = if v >= 1 {
                message.with_error_message(None)
            } else {
                message
            };
            return (message, vec![ep(1, "10.0.0.1", 9092)]);
        }
        let coordinator = |key: &'static str, id: i32, host: &'static str| {
            Coordinator::default()
                .with_key(s(key))
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_error_message(None)
        };
        // A failed lookup reports no address (node -1, empty host): nothing to rewrite there.
        let failed = Coordinator::default()
            .with_key(s("group-c"))
            .with_node_id(BrokerId(-1))
            .with_port(-1)
            .with_error_code(15)
            .with_error_message(Some(s("coordinator not available")));
        let message = message.with_coordinators(vec![
            coordinator("group-a", 1, "10.0.0.1"),
            coordinator("group-b", 2, "10.0.0.2"),
            failed,
        ]);
        (
            message,
            vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
        )
    }

    pub(in crate::proxy::rewrite) fn fixture_frame(v: i16) -> Bytes {
        frame(ApiKey::FindCoordinator, v, &fixture(v).0)
    }

    fn endpoints(m: &FindCoordinatorResponse) -> Vec<Endpoint> {
        std::iter::once(ep(m.node_id.0, &m.host, m.port))
            .chain(
                m.coordinators
                    .iter()
                    .map(|c| ep(c.node_id.0, &c.host, c.port)),
            )
            .filter(|e| !e.host.is_empty())
            .collect()
    }

    #[test]
    fn roundtrip_every_version() {
        assert_eq!(API.versions(), 0..=6);
        check_roundtrip(&API, fixture, endpoints);
    }

    #[test]
    fn error_carries_no_endpoint() {
        for v in 0..=3 {
            let message = FindCoordinatorResponse::default()
                .with_error_code(15)
                .with_node_id(BrokerId(-1))
                .with_port(-1);
            let message = if v >= 1 {
                message.with_error_message(Some(s("coordinator not available")))
            } else {
                message
            };
            let input = frame(ApiKey::FindCoordinator, v, &message);
            let mut response = AddressResponse::decode(&API, v, input.clone()).unwrap();
            assert_eq!(response.endpoints(), vec![]);
            // A map that knows nothing must not be asked.
            assert_eq!(response.rewrite(|_| None).unwrap(), 0);
            let mut out = BytesMut::new();
            response.encode(&mut out).unwrap();
            assert_eq!(out, input);
        }
    }

    /// The key is the client's group or transactional id, echoed by the broker: any bytes
    /// pass, while the addresses beside it are rewritten (it used to close the connection).
    #[test]
    fn keys_that_are_not_utf8_pass_through() {
        for v in 4..=6 {
            let (message, _) = fixture(v);
            let mut input = BytesMut::from(&frame(ApiKey::FindCoordinator, v, &message)[..]);
            let at = input
                .windows(7)
                .position(|w| w == b"group-b")
                .unwrap();
            input[at..at + 7].copy_from_slice(b"\xffgr\xfe-\xc3b");
            let input = input.freeze();
            let mut response = AddressResponse::decode(&API, v, input.clone())
                .unwrap_or_else(|e| panic!("v{v}: {e}"));
            let mut out = BytesMut::new();
            response.encode(&mut out).unwrap();
            assert_eq!(out, input, "v{v}: untouched, byte for byte");
            response.rewrite(advertise).unwrap();
            let mut out = BytesMut::new();
            response.encode(&mut out).unwrap();
            assert!(contains(&out, b"\xffgr\xfe-\xc3b"), "v{v}: key kept");
            assert!(!contains(&out, REAL_PREFIX), "v{v}: addresses rewritten");
        }
    }

    #[test]
    fn layout_table_matches_kafka_protocol() {
        let f = SCHEMA.flexible_from;
        assert_min_size_matches::<FindCoordinatorResponse>(
            "FindCoordinator",
            SCHEMA.fields,
            f,
            0..=6,
        );
        assert_min_size_matches::<Coordinator>("coordinator", COORDINATOR, f, 4..=6);
    }
}
