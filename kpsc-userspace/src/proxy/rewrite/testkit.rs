//! Test support shared by every API's tests: fixture framing, a deterministic fake
//! advertisement (real brokers are 10.0.0.<node>:909x), and the round trip every API must
//! pass (decode -> endpoints -> rewrite -> encode, checked against kafka-protocol).

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, ResponseHeader},
    protocol::{Decodable, Encodable, StrBytes},
};

use crate::{
    kafka::layout,
    proxy::rewrite::{
        declaration::{AddressApi, Advertised, Endpoint},
        response::AddressResponse,
    },
};

pub const CORRELATION_ID: i32 = 0x0102_0304;
pub const ADVERTISED_HOST: &str = "kpsc.proxy.example";
pub const REAL_PREFIX: &[u8] = b"10.0.0.";

pub fn s(value: &'static str) -> StrBytes {
    StrBytes::from_static_str(value)
}

pub fn ep(node_id: i32, host: &str, port: i32) -> Endpoint {
    Endpoint {
        node_id,
        host: host.to_string(),
        port,
    }
}

/// Real brokers are 10.0.0.<node>:909x; kpsc advertises one host with a port per endpoint.
pub fn advertise(endpoint: &Endpoint) -> Option<Advertised> {
    Some(Advertised {
        host: ADVERTISED_HOST.to_string(),
        // Wrapping: fuzzed responses carry arbitrary ids and ports.
        port: 40_000i32
            .wrapping_add(endpoint.node_id.wrapping_mul(10))
            .wrapping_add(endpoint.port.wrapping_sub(9092)),
    })
}

pub fn advertised(endpoint: &Endpoint) -> Endpoint {
    let Advertised { host, port } = advertise(endpoint).unwrap();
    ep(endpoint.node_id, &host, port)
}

/// Inverse of [`advertise`].
pub fn unadvertise(endpoint: &Endpoint) -> Option<Advertised> {
    (endpoint.host == ADVERTISED_HOST).then(|| Advertised {
        host: format!("10.0.0.{}", endpoint.node_id),
        port: endpoint.port - 40_000 - endpoint.node_id * 10 + 9092,
    })
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn encode_with_header<T: Encodable>(
    header: &ResponseHeader,
    header_version: i16,
    message: &T,
    version: i16,
) -> Bytes {
    let mut buf = BytesMut::new();
    header.encode(&mut buf, header_version).unwrap();
    message.encode(&mut buf, version).unwrap();
    buf.freeze()
}

/// A response body (header included) of `message` as `api` version `version` answers.
pub fn frame<T: Encodable>(api: ApiKey, version: i16, message: &T) -> Bytes {
    let header = ResponseHeader::default().with_correlation_id(CORRELATION_ID);
    encode_with_header(
        &header,
        api.response_header_version(version),
        message,
        version,
    )
}

/// decode -> endpoints -> rewrite -> encode of every version's fixture, checked against
/// kafka-protocol: only the endpoints change, and nothing real is left.
pub fn check_roundtrip<T: Encodable + Decodable>(
    api: &'static AddressApi,
    fixture: fn(i16) -> (T, Vec<Endpoint>),
    extract: fn(&T) -> Vec<Endpoint>,
) {
    for v in api.versions() {
        check_version(api, v, fixture, extract);
    }
}

fn check_version<T: Encodable + Decodable>(
    api: &'static AddressApi,
    v: i16,
    fixture: fn(i16) -> (T, Vec<Endpoint>),
    extract: fn(&T) -> Vec<Endpoint>,
) {
    let ctx = format!("{} v{v}", api.name());
    let (message, expected) = fixture(v);
    assert_eq!(extract(&message), expected, "{ctx}: fixture");
    let input = frame(api.key, v, &message);
    assert_eq!(input, (api.fixture)(v), "{ctx}: declared fixture");
    assert_eq!(
        contains(&input, REAL_PREFIX),
        !expected.is_empty(),
        "{ctx}: fixture"
    );

    let mut response =
        AddressResponse::decode(api, v, input.clone()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    assert_eq!(response.correlation_id(), CORRELATION_ID, "{ctx}");
    assert_eq!(response.endpoints(), expected, "{ctx}");

    let mut out = BytesMut::new();
    response.encode(&mut out).unwrap();
    assert_eq!(out, input, "{ctx}: decode -> encode must be byte-identical");

    let mut seen = Vec::new();
    let rewritten = response
        .rewrite(|endpoint| {
            seen.push(endpoint.clone());
            advertise(endpoint)
        })
        .unwrap();
    assert_eq!(rewritten, expected.len(), "{ctx}");
    assert_eq!(seen, expected, "{ctx}: map sees every endpoint once");

    let mut out = BytesMut::from(&b"prefix"[..]);
    response.encode(&mut out).unwrap();
    assert_eq!(&out[..6], b"prefix", "{ctx}: encode appends");
    assert_eq!(
        out.len() - 6,
        response.encoded_len(),
        "{ctx}: measured length"
    );
    let output = out.freeze().slice(6..);
    if !expected.is_empty() {
        assert!(
            !contains(&output, REAL_PREFIX),
            "{ctx}: real address leaked"
        );
    }

    let header_version = api.key.response_header_version(v);
    layout::check_endpoint_tag_sizes(&output, header_version, api.schema, v)
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let mut buf = output.clone();
    let header = ResponseHeader::decode(&mut buf, header_version).unwrap();
    assert_eq!(header.correlation_id, CORRELATION_ID, "{ctx}");
    let decoded = T::decode(&mut buf, v).unwrap();
    assert!(buf.is_empty(), "{ctx}: extra bytes after rewrite");
    let want: Vec<Endpoint> = expected.iter().map(advertised).collect();
    assert_eq!(
        extract(&decoded),
        want,
        "{ctx}: kafka-protocol sees the advertised endpoints"
    );

    // Only hosts and ports changed: mapping them back restores the input byte for byte.
    let mut back = AddressResponse::decode(api, v, output).unwrap();
    assert_eq!(back.rewrite(unadvertise).unwrap(), expected.len(), "{ctx}");
    let mut restored = BytesMut::new();
    back.encode(&mut restored).unwrap();
    assert_eq!(restored, input, "{ctx}: only endpoints may change");
}
