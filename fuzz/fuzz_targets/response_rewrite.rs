#![no_main]
//! The response layout walker plus rewrite, for every address-bearing API and version in
//! `kpsc::proxy::rewrite::apis::ALL`: `AddressResponse::decode` (layout walk, then
//! kafka-protocol), every endpoint mapped to one advertised host, `encode`. Checked:
//! - a refusal is never the walk and kafka-protocol disagreeing on where the message ends;
//! - decode -> encode keeps the value: the re-encoded bytes decode (through the guarded
//!   decoder, as the API's message type) to the same header, message (unknown tagged fields
//!   included) and trailing bytes, opaque strings (FindCoordinator's keys, UTF-8 or not)
//!   keep their bytes, and re-encoding again changes no byte;
//! - responses kpsc forwards without rewriting (`response_needs_rewrite` false) have no
//!   endpoints; a version that cannot carry addresses loses the address tag a broker put
//!   in anyway (`hidden_tag`), and only that;
//! - the rewritten response decodes again, its endpoints are exactly the advertised ones
//!   (so no original host is left, unless it was the advertised host), and mapping them
//!   back gives the re-encoded input byte for byte: only the endpoints changed;
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
use kpsc_fuzz::{ResponseInput, assert_walk_agrees};
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
    assert_walk_agrees(&result);
    let Ok(mut response) = result else {
        return;
    };
    let original = response.endpoints();
    if !response_needs_rewrite(api.key as i16, version) {
        assert!(
            original.is_empty(),
            "{} v{version} passes opaquely but has endpoints {original:?}",
            api.name()
        );
    }

    // What kpsc decodes: the body, less a top-level address tag the version's schema does
    // not have (a broker reusing a later version's encoding).
    let header_version = api.key.response_header_version(version);
    let hidden = api.hidden_tag.filter(|_| version < api.addresses_since);
    let without_hidden = |bytes: &Bytes| {
        hidden.and_then(|tag| {
            layout::without_top_level_tag(bytes, header_version, api.schema, version, tag)
                .unwrap_or_else(|e| panic!("kpsc decoded what it cannot walk: {e}"))
        })
    };
    let decoded = match without_hidden(&body) {
        Some(stripped) => Bytes::from(stripped),
        None => body.clone(),
    };
    assert_eq!(response.stripped_hidden(), decoded != body);

    let plain = encode(&response);
    same_value(api, version, &decoded, &plain);
    assert_eq!(without_hidden(&plain), None, "hidden address tag forwarded");
    let mut again = AddressResponse::decode(api, version, plain.clone())
        .unwrap_or_else(|e| panic!("re-encoded response does not decode: {e}"));
    assert_eq!(again.endpoints(), original);
    assert_eq!(encode(&again), plain, "re-encoding changed bytes");

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
    let mut back = AddressResponse::decode(api, version, rewritten)
        .unwrap_or_else(|e| panic!("rewritten response does not decode: {e}"));
    let advertised = back.endpoints();
    assert_eq!(advertised.len(), original.len());
    for (i, (seen, was)) in advertised.iter().zip(&original).enumerate() {
        assert_eq!(seen.host, ADVERTISED_HOST, "endpoint {i} (was {was:?})");
        assert_eq!(seen.port, port(i), "endpoint {i}");
        assert_eq!(seen.node_id, was.node_id, "endpoint {i}");
    }
    let mut originals = original.iter();
    let restored = back
        .rewrite(|_| {
            originals.next().map(|was| Advertised {
                host: was.host.clone(),
                port: was.port,
            })
        })
        .unwrap();
    assert_eq!(restored, original.len());
    assert_eq!(
        encode(&back),
        plain,
        "more than the endpoints changed in the rewrite"
    );
}

/// `body` with its opaque strings (`AddressApi::opaque_strings`, e.g. FindCoordinator's
/// keys, which kpsc carries whatever bytes they hold) blanked to `?`s of the same length so
/// kafka-protocol reads it, and those strings' bytes.
fn split_opaque(api: &AddressApi, version: i16, body: &Bytes) -> (Bytes, Vec<Bytes>) {
    if api.opaque_strings.is_empty() {
        return (body.clone(), Vec::new());
    }
    let header_version = api.key.response_header_version(version);
    let spans = layout::string_spans(
        body,
        header_version,
        api.schema,
        version,
        api.opaque_strings,
    )
    .unwrap_or_else(|e| panic!("kpsc decoded what it cannot walk: {e}"));
    let strings = spans.iter().map(|span| body.slice(span.clone())).collect();
    let mut blank = body.to_vec();
    for span in spans {
        blank[span].fill(b'?');
    }
    (Bytes::from(blank), strings)
}

fn encode(response: &AddressResponse) -> Bytes {
    let mut out = BytesMut::new();
    response
        .encode(&mut out)
        .unwrap_or_else(|e| panic!("a decoded response does not encode: {e}"));
    out.freeze()
}

/// `input` and `output` decode to the same header, message and trailing bytes, read as
/// the API's own message type through the guarded decoder, and hold the same opaque strings
/// byte for byte.
fn same_value(api: &'static AddressApi, version: i16, input: &Bytes, output: &Bytes) {
    fn compare<M: Decodable + PartialEq + Debug>(
        api: &'static AddressApi,
        version: i16,
        input: &Bytes,
        output: &Bytes,
    ) {
        let decode = |body: &Bytes| {
            let (blank, strings) = split_opaque(api, version, body);
            let frame = guarded::decode_response::<M>(
                api.key as i16,
                api.key.response_header_version(version),
                version,
                api.schema,
                blank,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            (frame, strings)
        };
        let (before, input_strings) = decode(input);
        let (after, output_strings) = decode(output);
        assert_eq!(input_strings, output_strings, "an opaque string changed");
        assert_eq!(before.header, after.header);
        assert_eq!(before.message, after.message);
        assert_eq!(before.trailing, after.trailing);
    }
    let compare = match api.key {
        ApiKey::Metadata => compare::<MetadataResponse>,
        ApiKey::FindCoordinator => compare::<FindCoordinatorResponse>,
        ApiKey::DescribeCluster => compare::<DescribeClusterResponse>,
        ApiKey::Produce => compare::<ProduceResponse>,
        ApiKey::Fetch => compare::<FetchResponse>,
        ApiKey::ShareFetch => compare::<ShareFetchResponse>,
        ApiKey::ShareAcknowledge => compare::<ShareAcknowledgeResponse>,
        ApiKey::DescribeQuorum => compare::<DescribeQuorumResponse>,
        other => panic!("{other:?} is address-bearing: add its message type here"),
    };
    compare(api, version, input, output)
}
