#![no_main]
//! The discovery client's parsers (`kpsc::kafka::discovery`): a broker's answer to
//! ApiVersions v0 and to Metadata v1-12, the versions the client asks for. Under
//! AddressSanitizer a multi-GB allocation is a crash, so this is where a decode that skips
//! the layout walk would show. Checked: for ApiVersions the discovery client accepts an
//! answer exactly when the forwarding path's guarded decoder does and the correlation id
//! and error code are the ones it expects, and returns what that decoder reads. For
//! Metadata (read by the layout walk, as the forwarding path reads it) kafka-protocol's
//! own decode is the oracle: whatever it reads with the expected correlation id, discovery
//! accepts, returning every distinct broker endpoint with a host and a port a listener can
//! use, in order; it may accept more (a topic name that is not UTF-8 is no concern of its).

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, MetadataResponse};
use kpsc::{
    kafka::{
        discovery::{parse_api_versions, parse_metadata},
        guarded,
    },
    proxy::rewrite::{api_versions::decode_api_versions, apis::metadata},
};
use kpsc_fuzz::DiscoveryInput;
use libfuzzer_sys::fuzz_target;

/// The correlation ids the client sends.
const API_VERSIONS_CORRELATION_ID: i32 = 1;
const METADATA_CORRELATION_ID: i32 = 2;

fuzz_target!(|data: &[u8]| {
    let Some(input) = DiscoveryInput::parse(data) else {
        return;
    };
    let body = Bytes::copy_from_slice(input.body);
    match input.metadata_version {
        None => api_versions(body),
        Some(version) => metadata(version, body),
    }
});

fn api_versions(body: Bytes) {
    let parsed = parse_api_versions(body.clone());
    let expected = decode_api_versions(0, body).ok().and_then(|(_, frame)| {
        (frame.header.correlation_id == API_VERSIONS_CORRELATION_ID
            && frame.message.error_code == 0)
            .then_some(frame.message)
    });
    match (parsed, expected) {
        (Ok(got), Some(want)) => assert_eq!(got, want),
        (Err(_), None) => {}
        (Ok(_), None) => {
            panic!("discovery accepted an ApiVersions answer the guarded decoder refuses")
        }
        (Err(e), Some(_)) => panic!("discovery refused a valid ApiVersions answer: {e:#}"),
    }
}

fn metadata(version: i16, body: Bytes) {
    let parsed = parse_metadata(version, body.clone());
    let expected = guarded::decode_response::<MetadataResponse>(
        ApiKey::Metadata as i16,
        ApiKey::Metadata.response_header_version(version),
        version,
        &metadata::SCHEMA,
        body,
    )
    .ok()
    .filter(|frame| frame.header.correlation_id == METADATA_CORRELATION_ID)
    .map(|frame| frame.message.brokers);
    match (parsed, expected) {
        (Ok(brokers), Some(expected)) => {
            let mut usable: Vec<(i32, String, i32)> = Vec::new();
            for b in expected.iter().filter(|b| !b.host.is_empty()) {
                let endpoint = (b.node_id.0, b.host.to_string(), b.port);
                if !usable.contains(&endpoint) {
                    usable.push(endpoint);
                }
            }
            usable.retain(|(_, _, port)| (1..=i32::from(u16::MAX)).contains(port));
            let got: Vec<_> = brokers
                .into_iter()
                .map(|(id, addr)| (id, addr.host, i32::from(addr.port)))
                .collect();
            assert_eq!(got, usable);
        }
        (_, None) => {}
        (Err(e), Some(_)) => {
            panic!("discovery refused a Metadata answer kafka-protocol reads: {e:#}")
        }
    }
}
