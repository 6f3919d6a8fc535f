#![no_main]
//! The discovery client's parsers (`kpsc::kafka::discovery`): a broker's answer to
//! ApiVersions v0 and to Metadata v1-12, the versions the client asks for. Under
//! AddressSanitizer a multi-GB allocation is a crash, so this is where a decode that skips
//! the layout walk would show. Checked: the discovery client accepts an answer exactly
//! when the forwarding path's guarded decoder does and the correlation id (and, for
//! ApiVersions, the error code) is the one it expects, and it returns what that decoder
//! reads: for Metadata, every endpoint whose port a listener can use.

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use kpsc::{
    kafka::discovery::{parse_api_versions, parse_metadata},
    proxy::rewrite::{api_versions::decode_api_versions, apis},
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
    let expected = apis::decode(ApiKey::Metadata as i16, version, body)
        .ok()
        .filter(|r| r.correlation_id() == METADATA_CORRELATION_ID)
        .map(|mut r| r.endpoints());
    match (parsed, expected) {
        (Ok(brokers), Some(endpoints)) => {
            let usable: Vec<_> = endpoints
                .into_iter()
                .filter(|e| (1..=i32::from(u16::MAX)).contains(&e.port))
                .map(|e| (e.node_id, e.host, e.port))
                .collect();
            let got: Vec<_> = brokers
                .into_iter()
                .map(|(id, addr)| (id, addr.host, i32::from(addr.port)))
                .collect();
            assert_eq!(got, usable);
        }
        (Err(_), None) => {}
        (Ok(_), None) => panic!("discovery accepted a Metadata answer the guarded decoder refuses"),
        (Err(e), Some(_)) => panic!("discovery refused a valid Metadata answer: {e:#}"),
    }
}
