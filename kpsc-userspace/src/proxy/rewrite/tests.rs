//! Properties every address-bearing API must have, checked over the whole registry: a new
//! API is covered here by being listed in `apis`.

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, MetadataResponse, ResponseHeader},
    protocol::Decodable,
};
use proptest::prelude::*;

use crate::{
    kafka::{guarded::CodecError, layout, names::api_name},
    proxy::rewrite::{
        apis::{self, ALL},
        declaration::{AddressApi, RewriteError},
        response::AddressResponse,
        testkit::*,
    },
};

const METADATA: i16 = ApiKey::Metadata as i16;
const PRODUCE: i16 = ApiKey::Produce as i16;
const FETCH: i16 = ApiKey::Fetch as i16;

/// (api, version, frame body) for every version of every address-bearing response.
fn all_frames() -> Vec<(&'static AddressApi, i16, Bytes)> {
    ALL.iter()
        .flat_map(|api| api.versions().map(move |v| (*api, v, (api.fixture)(v))))
        .collect()
}

#[test]
fn registry_has_one_entry_per_key_and_the_versions_kafka_protocol_decodes() {
    let versions: Vec<_> = ALL.iter().map(|api| (api.key, api.versions())).collect();
    assert_eq!(
        versions,
        [
            (ApiKey::Metadata, 0..=13),
            (ApiKey::FindCoordinator, 0..=6),
            (ApiKey::DescribeCluster, 0..=2),
            (ApiKey::Produce, 3..=13),
            (ApiKey::Fetch, 4..=18),
            (ApiKey::ShareFetch, 1..=1),
            (ApiKey::ShareAcknowledge, 1..=1),
            (ApiKey::DescribeQuorum, 0..=2),
        ]
    );
    for api in ALL {
        assert!(std::ptr::eq(apis::find(api.key as i16).unwrap(), *api));
    }
}

#[test]
fn unsupported_versions_and_keys() {
    for (key, version) in [
        (METADATA, 14),
        (METADATA, -1),
        (PRODUCE, 2),
        (PRODUCE, 14),
        (FETCH, 19),
        (ApiKey::ShareFetch as i16, 0),
        (ApiKey::JoinGroup as i16, 5),
        (ApiKey::ApiVersions as i16, 3),
        (999, 0),
    ] {
        let err = apis::decode(key, version, Bytes::from_static(&[0; 64])).unwrap_err();
        assert!(
            matches!(err, RewriteError::Unsupported { api_key, version: v } if api_key == key && v == version),
            "{key} v{version}: {err}"
        );
    }
    let err = apis::decode(METADATA, 14, Bytes::new()).unwrap_err();
    assert_eq!(err.to_string(), "Metadata v14 responses are not rewritable");
}

#[test]
fn unknown_tagged_fields_survive() {
    let header = ResponseHeader::default()
        .with_correlation_id(CORRELATION_ID)
        .with_unknown_tagged_field(5, Bytes::from_static(b"header-tag"));
    for v in 9..=13 {
        let (mut message, _) = apis::metadata::tests::fixture(v);
        message.brokers[0]
            .unknown_tagged_fields
            .insert(7, Bytes::from_static(b"broker-tag"));
        message
            .unknown_tagged_fields
            .insert(99, Bytes::from_static(b"top-tag"));
        let input = encode_with_header(&header, 1, &message, v);
        let mut response = apis::decode(METADATA, v, input.clone()).unwrap();
        let mut out = BytesMut::new();
        response.encode(&mut out).unwrap();
        assert_eq!(out, input, "Metadata v{v}");

        response.rewrite(advertise).unwrap();
        let mut out = BytesMut::new();
        response.encode(&mut out).unwrap();
        let mut buf = out.freeze();
        let decoded_header = ResponseHeader::decode(&mut buf, 1).unwrap();
        assert_eq!(decoded_header, header);
        let decoded = MetadataResponse::decode(&mut buf, v).unwrap();
        assert_eq!(decoded.unknown_tagged_fields, message.unknown_tagged_fields);
        assert_eq!(
            decoded.brokers[0].unknown_tagged_fields,
            message.brokers[0].unknown_tagged_fields
        );
        assert_eq!(decoded.brokers[0].host.as_str(), ADVERTISED_HOST);
    }

    // Unknown tags next to the known node_endpoints tag (0) in bulk responses.
    let (produce_message, _) = apis::produce::tests::fixture(10);
    let produce_message = produce_message.with_unknown_tagged_field(3, Bytes::from_static(b"p"));
    let (fetch_message, _) = apis::fetch::tests::fixture(16);
    let fetch_message = fetch_message.with_unknown_tagged_field(5, Bytes::from_static(b"f"));
    for (key, v, input) in [
        (
            PRODUCE,
            10,
            encode_with_header(&header, 1, &produce_message, 10),
        ),
        (
            FETCH,
            16,
            encode_with_header(&header, 1, &fetch_message, 16),
        ),
    ] {
        let response = apis::decode(key, v, input.clone()).unwrap();
        assert_eq!(response.endpoints().len(), 2);
        let mut out = BytesMut::new();
        response.encode(&mut out).unwrap();
        assert_eq!(out, input, "{} v{v}", api_name(key));
    }
}

#[test]
fn trailing_bytes_are_kept() {
    for v in [12, 13] {
        let (message, _) = apis::metadata::tests::fixture(v);
        let mut input = BytesMut::from(&frame(ApiKey::Metadata, v, &message)[..]);
        input.extend_from_slice(&[0]);
        let input = input.freeze();
        let mut response = apis::decode(METADATA, v, input.clone()).unwrap();
        let mut out = BytesMut::new();
        response.encode(&mut out).unwrap();
        assert_eq!(out, input, "Metadata v{v}");

        response.rewrite(advertise).unwrap();
        let mut out = BytesMut::new();
        response.encode(&mut out).unwrap();
        assert_eq!(out.last(), Some(&0), "Metadata v{v}");
        let mut buf = out.freeze();
        buf.truncate(buf.len() - 1);
        ResponseHeader::decode(&mut buf, 1).unwrap();
        let decoded = MetadataResponse::decode(&mut buf, v).unwrap();
        assert!(buf.is_empty());
        assert_eq!(decoded.brokers[1].host.as_str(), ADVERTISED_HOST);
    }
}

#[test]
fn unmapped_endpoint_is_an_error_and_changes_nothing() {
    let input = (apis::metadata::API.fixture)(12);
    let mut response = apis::decode(METADATA, 12, input.clone()).unwrap();
    let err = response
        .rewrite(|endpoint| (endpoint.node_id == 1).then(|| advertise(endpoint).unwrap()))
        .unwrap_err();
    assert!(
        matches!(&err, RewriteError::Unmapped { node_id: 2, host, port: 9092 } if host == "10.0.0.2"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "no advertised address for broker 2 at 10.0.0.2:9092"
    );
    let mut out = BytesMut::new();
    response.encode(&mut out).unwrap();
    assert_eq!(
        out, input,
        "a failed rewrite leaves the response as decoded"
    );
}

#[test]
fn truncated_responses_fail_to_decode() {
    for (api, v, input) in all_frames() {
        for len in 0..input.len() {
            let result = AddressResponse::decode(api, v, input.slice(..len));
            assert!(
                matches!(result, Err(RewriteError::Codec(CodecError::Decode { .. }))),
                "{} v{v} truncated to {len} of {} bytes: {result:?}",
                api.name(),
                input.len()
            );
        }
    }
}

#[test]
fn layout_walk_reads_what_kafka_protocol_reads() {
    for (api, v, input) in all_frames() {
        let header_version = api.key.response_header_version(v);
        let end = layout::check(&input, header_version, api.schema, v)
            .unwrap_or_else(|e| panic!("{} v{v}: {e}", api.name()));
        assert_eq!(end, input.len(), "{} v{v}", api.name());
        assert_eq!(
            (api.codec.unguarded_end)(header_version, v, input.clone()),
            Some(end),
            "{} v{v}",
            api.name()
        );
    }
}

/// Without the layout walk kafka-protocol would reserve these counts up front and the
/// allocation failure would abort the test binary.
#[test]
fn impossible_counts_are_refused_before_decoding() {
    let cases: Vec<(i16, i16, &str, Vec<u8>)> = vec![
        // Metadata v0: brokers count i32::MAX.
        (
            METADATA,
            0,
            "brokers",
            [&[1, 2, 3, 4][..], &[0x7f, 0xff, 0xff, 0xff]].concat(),
        ),
        // Metadata v9 (flexible header): brokers compact count u32::MAX - 1.
        (
            METADATA,
            9,
            "brokers",
            [
                &[1, 2, 3, 4, 0][..],
                &[0, 0, 0, 0],
                &[0xff, 0xff, 0xff, 0xff, 0x0f],
            ]
            .concat(),
        ),
        // Metadata v1: one topic with one partition whose replica list claims 2^30 ids.
        (
            METADATA,
            1,
            "replica_nodes",
            [
                &[1, 2, 3, 4][..],
                &[0, 0, 0, 0],                   // brokers: 0
                &[0, 0, 0, 1],                   // controller_id
                &[0, 0, 0, 1],                   // topics: 1
                &[0, 0, 0, 1, b'x', 0],          // error_code, name "x", is_internal
                &[0, 0, 0, 1],                   // partitions: 1
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // error_code, index, leader
                &[0x40, 0, 0, 0],                // replica_nodes: 2^30
                &[0, 0, 0, 0],                   // isr_nodes: 0
            ]
            .concat(),
        ),
        // Fetch v16: node_endpoints tag claiming u32::MAX - 1 entries in a 1-byte field.
        (
            FETCH,
            16,
            "node_endpoints",
            [
                &[1, 2, 3, 4, 0][..],
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // throttle, error_code, session_id
                &[1],                            // responses: 0
                &[1, 0, 1],                      // one tagged field: tag 0, size 1
                &[0xff, 0xff, 0xff, 0xff, 0x0f],
            ]
            .concat(),
        ),
    ];
    for (key, version, field, body) in cases {
        let err = apis::decode(key, version, Bytes::from(body)).unwrap_err();
        assert!(
            matches!(err, RewriteError::Codec(CodecError::Decode { .. })),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("{field} claims more entries")),
            "{message}"
        );
    }
}

/// kafka-protocol counts a tag of 2^31 or more among a message's tagged fields but does
/// not write it back: forwarded, the response would claim a field it does not hold, and
/// the client would read what follows as that field. Found by the response_rewrite fuzz
/// target.
#[test]
fn tags_of_2_pow_31_or_more_are_refused() {
    let (message, _) = apis::metadata::tests::fixture(12);
    let mut input = BytesMut::from(&frame(ApiKey::Metadata, 12, &message)[..]);
    assert_eq!(input.last(), Some(&0), "no top-level tagged fields yet");
    input.truncate(input.len() - 1);
    // One tagged field: tag 2^31 (uvarint 80 80 80 80 08), one byte of value.
    input.extend_from_slice(&[1, 0x80, 0x80, 0x80, 0x80, 0x08, 1, 0xaa]);
    let err = apis::decode(METADATA, 12, input.freeze()).unwrap_err();
    assert!(err.to_string().contains("2^31"), "{err}");
}

#[test]
fn types_cross_tasks() {
    // The forwarder holds an AddressResponse across awaits on a multi-threaded runtime.
    fn check<T: Send + Sync + 'static>() {}
    check::<AddressResponse>();
    check::<RewriteError>();
}

fn exercise(api: &'static AddressApi, version: i16, body: Bytes) {
    let header_version = api.key.response_header_version(version);
    let result = AddressResponse::decode(api, version, body.clone());
    let walked = layout::check(&body, header_version, api.schema, version);
    // kafka-protocol must not be given counts it would reserve up front (nor what follows
    // a tag it mishandles: it would read on, into such counts).
    if walked.as_ref().is_err_and(|e| e.guards_kafka_protocol()) {
        assert!(result.is_err());
        return;
    }
    // What kafka-protocol reads, kpsc reads to the same byte and never refuses (it may
    // forward what kafka-protocol refuses, e.g. a topic name that is not UTF-8: the
    // client would have had it from the broker directly).
    if let Some(end) = (api.codec.unguarded_end)(header_version, version, body.clone()) {
        assert_eq!(
            walked.as_ref().ok(),
            Some(&end),
            "walk and kafka-protocol disagree"
        );
        assert!(
            result.is_ok(),
            "kafka-protocol decodes what kpsc refuses: {result:?}"
        );
    }
    if let Ok(mut response) = result {
        let endpoints = response.endpoints().to_vec();
        let mut out = BytesMut::new();
        response.encode(&mut out).unwrap();
        match response.rewrite(advertise) {
            Ok(n) => assert_eq!(n, endpoints.len()),
            // Garbage ports may not fit DescribeQuorum's u16 after mapping.
            Err(RewriteError::Codec(CodecError::Encode { .. })) => return,
            Err(e) => panic!("{e}"),
        }
        let mut out = BytesMut::new();
        response.encode(&mut out).unwrap();
        assert_eq!(out.len(), response.encoded_len());
        let out = out.freeze();
        layout::check_endpoint_tag_sizes(&out, header_version, api.schema, version).unwrap();
        let again = AddressResponse::decode(api, version, out).unwrap();
        // Distinct real endpoints may share an advertisement.
        let mut want: Vec<_> = endpoints.iter().map(advertised).collect();
        want.sort_by_key(|e| (e.node_id, e.port));
        want.dedup();
        let mut seen = again.endpoints().to_vec();
        seen.sort_by_key(|e| (e.node_id, e.port));
        assert_eq!(seen, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let body = Bytes::from(body);
        for api in ALL {
            for version in api.versions() {
                exercise(api, version, body.clone());
            }
        }
    }

    #[test]
    fn mutated_responses_never_panic(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let frames = all_frames();
        let (api, version, input) = &frames[pick.index(frames.len())];
        let mut body = input.to_vec();
        for (at, byte) in edits {
            let at = at.index(body.len());
            body[at] = byte;
        }
        exercise(api, *version, Bytes::from(body));
    }
}
