#![no_main]
//! ApiVersions capping (`kpsc::proxy::rewrite::api_versions::rewrite_api_versions`) on any
//! answer a broker can give, for any request version, either `--bulk-policy` and a few
//! forbidden keys. Checked:
//! - on error the output buffer is left as it was, and the error is never the layout walk
//!   and kafka-protocol disagreeing on where the message ends;
//! - the output decodes (guarded) in the version the input was read in (the request's, or
//!   v0 for an UNSUPPORTED_VERSION answer), with the same header, trailing bytes and every
//!   field but `api_keys` equal, unknown tagged fields included;
//! - `api_keys` is the input's minus the forbidden, unknown and uncappable keys, in order,
//!   each kept entry capped at `rewritable_max_version`: no address-bearing API is offered
//!   above what kpsc rewrites; the reported changes are exactly those;
//! - rewriting the output again changes nothing.

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, ApiVersionsResponse, api_versions_response::ApiVersion},
    protocol::Message,
};
use kpsc::{
    kafka::guarded::{self, Frame},
    proxy::rewrite::{
        api_versions::{ApiVersionsChanges, SCHEMA, decode_api_versions, rewrite_api_versions},
        apis,
        policy::rewritable_max_version,
    },
};
use kpsc_fuzz::{ApiVersionsInput, assert_walk_agrees};
use libfuzzer_sys::fuzz_target;

const API_VERSIONS: i16 = ApiKey::ApiVersions as i16;

fuzz_target!(|data: &[u8]| {
    if let Some(input) = ApiVersionsInput::parse(data) {
        check(&input);
    }
});

fn check(input: &ApiVersionsInput) {
    let body = Bytes::copy_from_slice(input.body);
    let mut out = BytesMut::from(&b"before"[..]);
    let result = rewrite_api_versions(
        input.version,
        body.clone(),
        input.policy,
        &input.forbidden,
        &mut out,
    );
    assert_walk_agrees(&result);
    let Ok(changes) = result else {
        assert_eq!(&out[..], b"before", "output touched on error");
        return;
    };
    assert_eq!(&out[..6], b"before", "output must be appended to");
    let output = out.freeze().slice(6..);

    // The version the body was read in: the request's, or v0 for an UNSUPPORTED_VERSION
    // answer.
    let (version, before) = decode_api_versions(input.version, body.clone())
        .unwrap_or_else(|e| panic!("rewritten, but does not decode: {e}"));
    let after = decode(version, &output).expect("the rewritten ApiVersions does not decode");
    assert_eq!(before.header, after.header);
    assert_eq!(before.trailing, after.trailing);

    let mut expected = ApiVersionsChanges::default();
    let mut kept = Vec::new();
    for entry in &before.message.api_keys {
        let key = entry.api_key;
        let cap = rewritable_max_version(key, input.policy);
        if input.forbidden.contains(&key)
            || ApiKey::try_from(key).is_err()
            || cap.is_some_and(|cap| entry.min_version > cap)
        {
            expected.removed.push(key);
            continue;
        }
        let mut entry: ApiVersion = entry.clone();
        if let Some(cap) = cap.filter(|&cap| entry.max_version > cap) {
            expected.capped.push((key, entry.max_version, cap));
            entry.max_version = cap;
        }
        kept.push(entry);
    }
    assert_eq!(changes, expected);
    let mut want = before.message.clone();
    want.api_keys = kept;
    assert_eq!(after.message, want);
    for entry in &after.message.api_keys {
        if apis::find(entry.api_key).is_some() || entry.api_key == API_VERSIONS {
            let cap = rewritable_max_version(entry.api_key, input.policy).unwrap();
            assert!(entry.max_version <= cap, "{entry:?} above kpsc's cap {cap}");
        }
    }

    let mut again = BytesMut::new();
    let changes = rewrite_api_versions(
        input.version,
        output.clone(),
        input.policy,
        &input.forbidden,
        &mut again,
    )
    .expect("the rewritten ApiVersions is refused");
    assert_eq!(changes, ApiVersionsChanges::default());
    assert_eq!(again, output);
}

fn decode(version: i16, body: &Bytes) -> Option<Frame<ApiVersionsResponse>> {
    let range = ApiVersionsResponse::VERSIONS;
    if !(range.min..=range.max).contains(&version) {
        return None;
    }
    // The ApiVersions response header is v0 in every version.
    guarded::decode_response(API_VERSIONS, 0, version, &SCHEMA, body.clone()).ok()
}
