#![no_main]
//! The response layout walker plus rewrite, for every address-bearing API and version in
//! `kpsc::proxy::rewrite::apis::ALL`: `AddressResponse::decode` (the layout walk listing
//! the endpoints), every endpoint mapped to one advertised host, `encode` (the walk again,
//! copying every byte but hosts, ports and the sizes around them). Checked:
//! - kafka-protocol (through the guarded decoder, as the API's message type) and the walk
//!   never disagree on where a message ends, and what kafka-protocol decodes kpsc takes;
//! - encode without a rewrite gives the body back byte for byte (less a top-level address
//!   tag a broker put into a version that cannot carry addresses: `hidden_tag`, and only
//!   that); responses kpsc forwards without rewriting (`response_needs_rewrite` false)
//!   have no endpoints;
//! - the rewritten response is as long as measured, decodes again (through kafka-protocol
//!   too when the input did), declares the real size of every tagged field holding
//!   endpoints, and its endpoints are exactly the advertised ones (so no original host is
//!   left, unless it was the advertised host); mapping them back gives what mapping every
//!   endpoint to itself gives: only the endpoints changed;
//! - a rewrite refused (a port that does not fit) leaves the response as it was.

use std::fmt::Debug;

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ApiKey, DescribeClusterResponse, DescribeQuorumResponse, FetchResponse,
        FindCoordinatorResponse, MetadataResponse, ProduceResponse, ShareAcknowledgeResponse,
        ShareFetchResponse,
    },
    protocol::Decodable,
};
use kpsc::{
    kafka::{
        guarded::{self, CodecError},
        layout,
    },
    proxy::rewrite::{
        declaration::{AddressApi, Advertised, RewriteError},
        policy::response_needs_rewrite,
        response::AddressResponse,
    },
};
use kpsc_fuzz::ResponseInput;
use libfuzzer_sys::fuzz_target;

/// The one host every endpoint is advertised as.
const ADVERTISED_HOST: &str = "kpsc-advertised.invalid";

fuzz_target!(|data: &[u8]| {
    if let Some(input) = ResponseInput::parse(data) {
        check(&input);
    }
});

fn check(input: &ResponseInput) {
    let (api, version) = (input.api, input.version);
    let body = Bytes::copy_from_slice(input.body);
    let result = AddressResponse::decode(api, version, body.clone());
    let oracle = kafka_protocol_decodes(api, version, &body);
    if oracle {
        assert!(
            result.is_ok(),
            "kafka-protocol decodes what kpsc refuses: {result:?}"
        );
    }
    let Ok(mut response) = result else {
        return;
    };
    let original = response.endpoints().to_vec();
    if !response_needs_rewrite(api.key as i16, version) {
        assert!(
            original.is_empty(),
            "{} v{version} passes opaquely but has endpoints {original:?}",
            api.name()
        );
    }

    // What kpsc forwards: the body, less a top-level address tag the version's schema
    // does not have (a broker reusing a later version's encoding).
    let header_version = api.key.response_header_version(version);
    let hidden = api.hidden_tag.filter(|_| version < api.addresses_since);
    let without_hidden = |bytes: &Bytes| {
        hidden.and_then(|tag| {
            layout::without_top_level_tag(bytes, header_version, api.schema, version, tag)
                .unwrap_or_else(|e| panic!("kpsc decoded what it cannot walk: {e}"))
        })
    };
    let plain = encode(&response);
    let expected = match without_hidden(&body) {
        Some(stripped) => Bytes::from(stripped),
        None => body.clone(),
    };
    assert_eq!(plain, expected, "encode without a rewrite changed bytes");
    assert_eq!(response.stripped_hidden(), plain != body);
    assert_eq!(without_hidden(&plain), None, "hidden address tag forwarded");

    // Every endpoint mapped to itself: what the rewrite does besides the endpoints.
    let mut itself = AddressResponse::decode(api, version, plain.clone())
        .unwrap_or_else(|e| panic!("forwarded response does not decode: {e}"));
    itself
        .rewrite(|e| {
            Some(Advertised {
                host: e.host.clone(),
                port: e.port,
            })
        })
        .unwrap_or_else(|e| panic!("mapping endpoints to themselves failed: {e}"));
    let identity = encode(&itself);

    let port = |i: usize| {
        let i = i32::try_from(i).unwrap_or(i32::MAX);
        if input.wide_ports {
            65_536_i32.saturating_add(i)
        } else {
            40_000 + i % 20_000
        }
    };
    let mut next = 0;
    let result = response.rewrite(|_| {
        next += 1;
        Some(Advertised {
            host: ADVERTISED_HOST.to_owned(),
            port: port(next - 1),
        })
    });
    match result {
        Ok(rewritten) => assert_eq!(rewritten, original.len()),
        Err(RewriteError::Codec(CodecError::Encode { .. })) if input.wide_ports => {
            assert_eq!(
                encode(&response),
                plain,
                "a refused rewrite changed the response"
            );
            return;
        }
        Err(e) => panic!("rewrite failed: {e}"),
    }

    let rewritten = encode(&response);
    assert_eq!(
        rewritten.len(),
        response.encoded_len(),
        "length as measured"
    );
    layout::check_endpoint_tag_sizes(&rewritten, header_version, api.schema, version)
        .unwrap_or_else(|e| panic!("rewritten response: {e}"));
    if oracle {
        assert!(
            kafka_protocol_decodes(api, version, &rewritten),
            "kafka-protocol decodes the input but not the rewritten response"
        );
    }
    let mut back = AddressResponse::decode(api, version, rewritten)
        .unwrap_or_else(|e| panic!("rewritten response does not decode: {e}"));
    let advertised = back.endpoints().to_vec();
    assert_eq!(advertised.len(), original.len());
    for (i, (seen, was)) in advertised.iter().zip(&original).enumerate() {
        assert_eq!(seen.host, ADVERTISED_HOST, "endpoint {i} (was {was:?})");
        assert_eq!(seen.port, port(i), "endpoint {i}");
        assert_eq!(seen.node_id, was.node_id, "endpoint {i}");
    }
    let restored = back
        .rewrite(|seen| {
            let i = advertised.iter().position(|a| a == seen)?;
            Some(Advertised {
                host: original[i].host.clone(),
                port: original[i].port,
            })
        })
        .unwrap();
    assert_eq!(restored, original.len());
    assert_eq!(
        encode(&back),
        identity,
        "more than the endpoints changed in the rewrite"
    );
}

fn encode(response: &AddressResponse) -> Bytes {
    let mut out = BytesMut::new();
    response
        .encode(&mut out)
        .unwrap_or_else(|e| panic!("a decoded response does not encode: {e}"));
    out.freeze()
}

/// Whether kafka-protocol decodes `body` as the API's message type, through the guarded
/// decoder (which refuses what kafka-protocol must not be given, and fails if the walk and
/// kafka-protocol disagree on where the message ends: that is a panic here).
fn kafka_protocol_decodes(api: &'static AddressApi, version: i16, body: &Bytes) -> bool {
    fn decodes<M: Decodable + Debug>(api: &'static AddressApi, version: i16, body: &Bytes) -> bool {
        let result = guarded::decode_response::<M>(
            api.key as i16,
            api.key.response_header_version(version),
            version,
            api.schema,
            body.clone(),
        );
        match result {
            Ok(_) => true,
            Err(CodecError::Decode { reason, .. }) => {
                assert!(!reason.contains("schema table"), "{reason}");
                false
            }
            Err(e) => panic!("{e}"),
        }
    }
    let decodes = match api.key {
        ApiKey::Metadata => decodes::<MetadataResponse>,
        ApiKey::FindCoordinator => decodes::<FindCoordinatorResponse>,
        ApiKey::DescribeCluster => decodes::<DescribeClusterResponse>,
        ApiKey::Produce => decodes::<ProduceResponse>,
        ApiKey::Fetch => decodes::<FetchResponse>,
        ApiKey::ShareFetch => decodes::<ShareFetchResponse>,
        ApiKey::ShareAcknowledge => decodes::<ShareAcknowledgeResponse>,
        ApiKey::DescribeQuorum => decodes::<DescribeQuorumResponse>,
        other => panic!("{other:?} is address-bearing: add its message type here"),
    };
    decodes(api, version, body)
}
