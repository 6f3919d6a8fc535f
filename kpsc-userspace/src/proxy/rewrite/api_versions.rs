//! ApiVersions (18) responses are rewritten so that clients never negotiate a version of an
//! address-bearing API kpsc cannot rewrite (or, under `--bulk-policy cap`, a bulk version
//! that carries addresses), and never see unknown or forbidden keys. Requests newer than
//! kpsc can decode the answer of are answered here, as a broker would.

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, ApiVersionsResponse, ResponseHeader, api_versions_response::ApiVersion},
    protocol::{Encodable, Message},
};

use crate::{
    config::proxy::BulkPolicy,
    kafka::{
        guarded::{self, Frame},
        layout::{BOOL, Field, I16, I32, I64, STR, Schema, Ty, all, since, tagged},
    },
    proxy::rewrite::{declaration::RewriteError, policy::rewritable_max_version},
};

const API_VERSIONS: i16 = ApiKey::ApiVersions as i16;
/// Kafka error code UNSUPPORTED_VERSION.
const UNSUPPORTED_VERSION: i16 = 35;

/// Result of rewriting an ApiVersions response.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApiVersionsChanges {
    /// (api_key, broker max, advertised max)
    pub capped: Vec<(i16, i16, i16)>,
    /// Removed api keys, in response order.
    pub removed: Vec<i16>,
}

/// Rewrites an ApiVersions response body (header v0 always) so a client never negotiates a version
/// of an address-bearing API that kpsc cannot rewrite, and never sees unknown or `forbidden` keys.
///
/// The re-encoded body (header + message + trailing bytes, no size prefix) is appended to `out`;
/// on error `out` is left as it was.
pub fn rewrite_api_versions(
    api_version: i16,
    body: Bytes,
    policy: BulkPolicy,
    forbidden: &[i16],
    out: &mut BytesMut,
) -> Result<ApiVersionsChanges, RewriteError> {
    let (version, mut frame) = decode_api_versions(api_version, body)?;
    let changes = restrict_api_versions(&mut frame.message.api_keys, policy, forbidden);
    guarded::encode_response(
        API_VERSIONS,
        0,
        version,
        &frame.header,
        &frame.message,
        &frame.trailing,
        out,
    )?;
    Ok(changes)
}

/// Newer ApiVersions requests than kpsc can decode the answer of are answered by kpsc
/// itself, as a broker answers a version it does not know: UNSUPPORTED_VERSION in v0
/// format, listing the ApiVersions range it supports, so the client retries lower.
pub fn api_versions_request_supported(api_version: i16) -> bool {
    api_version <= ApiVersionsResponse::VERSIONS.max
}

/// The answer to an ApiVersions request newer than kpsc supports (body, no size prefix).
pub fn unsupported_api_versions_response(correlation_id: i32) -> BytesMut {
    let body = ApiVersionsResponse::default()
        .with_error_code(UNSUPPORTED_VERSION)
        .with_api_keys(vec![
            ApiVersion::default()
                .with_api_key(API_VERSIONS)
                .with_min_version(ApiVersionsResponse::VERSIONS.min)
                .with_max_version(ApiVersionsResponse::VERSIONS.max),
        ]);
    let mut out = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut out, 0)
        .and_then(|()| body.encode(&mut out, 0))
        .expect("encoding a fixed v0 ApiVersions response cannot fail");
    out
}

/// Decodes an ApiVersions response (guarded), returning the version its body is in.
pub fn decode_api_versions(
    api_version: i16,
    body: Bytes,
) -> Result<(i16, Frame<ApiVersionsResponse>), RewriteError> {
    let requested = decode_api_versions_at(api_version, body.clone());
    if let Ok(frame) = &requested
        && frame.message.error_code != UNSUPPORTED_VERSION
    {
        return requested.map(|frame| (api_version, frame));
    }
    // A broker that does not support the requested version answers in v0 format with
    // UNSUPPORTED_VERSION (and its own ApiVersions range) so the client can retry lower. Only
    // accept such a body: a v0 decode of anything else would be a misreading.
    if api_version != 0
        && let Ok(frame) = decode_api_versions_at(0, body)
        && frame.message.error_code == UNSUPPORTED_VERSION
    {
        return Ok((0, frame));
    }
    requested.map(|frame| (api_version, frame))
}

fn decode_api_versions_at(
    version: i16,
    body: Bytes,
) -> Result<Frame<ApiVersionsResponse>, RewriteError> {
    let range = ApiVersionsResponse::VERSIONS;
    if !(range.min..=range.max).contains(&version) {
        return Err(RewriteError::Unsupported {
            api_key: API_VERSIONS,
            version,
        });
    }
    // The ApiVersions response header is always v0, so that a client which does not know the
    // broker's versions yet can still parse it.
    Ok(guarded::decode_response(
        API_VERSIONS,
        0,
        version,
        &SCHEMA,
        body,
    )?)
}

fn restrict_api_versions(
    api_keys: &mut Vec<ApiVersion>,
    policy: BulkPolicy,
    forbidden: &[i16],
) -> ApiVersionsChanges {
    let mut changes = ApiVersionsChanges::default();
    api_keys.retain_mut(|entry| {
        let key = entry.api_key;
        // Unknown keys go too: kpsc cannot decode their responses, which might carry addresses.
        if forbidden.contains(&key) || ApiKey::try_from(key).is_err() {
            changes.removed.push(key);
            return false;
        }
        if let Some(cap) = rewritable_max_version(key, policy) {
            if entry.min_version > cap {
                changes.removed.push(key);
                return false;
            }
            if entry.max_version > cap {
                changes.capped.push((key, entry.max_version, cap));
                entry.max_version = cap;
            }
        }
        true
    });
    changes
}

const API_VERSION: &[Field] = &[
    all("api_key", I16),
    all("min_version", I16),
    all("max_version", I16),
];
const SUPPORTED_FEATURE: &[Field] = &[
    all("name", STR),
    all("min_version", I16),
    all("max_version", I16),
];
const FINALIZED_FEATURE: &[Field] = &[
    all("name", STR),
    all("max_version_level", I16),
    all("min_version_level", I16),
];
pub const SCHEMA: Schema = Schema {
    flexible_from: 3,
    fields: &[
        all("error_code", I16),
        all("api_keys", Ty::Array(API_VERSION)),
        since(1, "throttle_time_ms", I32),
        tagged(0, 0, "supported_features", Ty::Array(SUPPORTED_FEATURE)),
        tagged(1, 0, "finalized_features_epoch", I64),
        tagged(2, 0, "finalized_features", Ty::Array(FINALIZED_FEATURE)),
        tagged(3, 0, "zk_migration_ready", BOOL),
    ],
};

#[cfg(test)]
mod tests {
    use kafka_protocol::{
        messages::api_versions_response::{FinalizedFeatureKey, SupportedFeatureKey},
        protocol::Decodable,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::{
        kafka::{guarded::CodecError, layout::assert_min_size_matches},
        proxy::rewrite::testkit::{CORRELATION_ID, encode_with_header, frame, s},
    };

    const PRODUCE: i16 = ApiKey::Produce as i16;
    const FETCH: i16 = ApiKey::Fetch as i16;
    const METADATA: i16 = ApiKey::Metadata as i16;
    const FIND_COORDINATOR: i16 = ApiKey::FindCoordinator as i16;
    const DESCRIBE_QUORUM: i16 = ApiKey::DescribeQuorum as i16;
    const SHARE_FETCH: i16 = ApiKey::ShareFetch as i16;
    const SHARE_ACKNOWLEDGE: i16 = ApiKey::ShareAcknowledge as i16;
    const DESCRIBE_CLUSTER: i16 = ApiKey::DescribeCluster as i16;

    fn api_versions(v: i16, keys: &[(i16, i16, i16)]) -> ApiVersionsResponse {
        let message = ApiVersionsResponse::default()
            .with_api_keys(
                keys.iter()
                    .map(|&(key, min, max)| {
                        ApiVersion::default()
                            .with_api_key(key)
                            .with_min_version(min)
                            .with_max_version(max)
                    })
                    .collect(),
            )
            .with_throttle_time_ms(if v >= 1 { 10 } else { 0 });
        if v < 3 {
            return message;
        }
        message
            .with_supported_features(vec![
                SupportedFeatureKey::default()
                    .with_name(s("metadata.version"))
                    .with_min_version(1)
                    .with_max_version(27),
            ])
            .with_finalized_features_epoch(42)
            .with_finalized_features(vec![
                FinalizedFeatureKey::default()
                    .with_name(s("metadata.version"))
                    .with_max_version_level(27)
                    .with_min_version_level(27),
            ])
            .with_unknown_tagged_field(9, Bytes::from_static(b"future"))
    }

    #[test]
    fn api_versions_roundtrip_every_version() {
        let keys = [(0, 3, 9), (2, 1, 10), (3, 0, 13), (18, 0, 4), (19, 2, 7)];
        for v in 0..=4 {
            let input = frame(ApiKey::ApiVersions, v, &api_versions(v, &keys));
            for policy in [BulkPolicy::Cap, BulkPolicy::Rewrite] {
                let mut out = BytesMut::new();
                let changes =
                    rewrite_api_versions(v, input.clone(), policy, &[], &mut out).unwrap();
                assert_eq!(changes, ApiVersionsChanges::default(), "v{v} {policy}");
                assert_eq!(
                    out, input,
                    "v{v} {policy}: nothing to change, byte-identical"
                );
            }
        }
    }

    const BROKER_API_KEYS: [(i16, i16, i16); 13] = [
        (PRODUCE, 0, 13),
        (FETCH, 0, 18),
        (2, 1, 10), // ListOffsets
        (METADATA, 0, 14),
        (FIND_COORDINATOR, 0, 6),
        (11, 0, 9), // JoinGroup
        (API_VERSIONS, 0, 5),
        (20, 1, 6), // DeleteTopics, forbidden below
        (DESCRIBE_QUORUM, 0, 2),
        (DESCRIBE_CLUSTER, 0, 2),
        (SHARE_FETCH, 1, 1),
        (SHARE_ACKNOWLEDGE, 1, 1),
        (999, 0, 3),
    ];

    #[test]
    fn api_versions_are_capped_per_policy() {
        let cases = [
            (
                BulkPolicy::Cap,
                ApiVersionsChanges {
                    capped: vec![
                        (PRODUCE, 13, 9),
                        (FETCH, 18, 15),
                        (METADATA, 14, 13),
                        (API_VERSIONS, 5, 4),
                    ],
                    removed: vec![20, 999],
                },
                vec![
                    (PRODUCE, 0, 9),
                    (FETCH, 0, 15),
                    (2, 1, 10),
                    (METADATA, 0, 13),
                    (FIND_COORDINATOR, 0, 6),
                    (11, 0, 9),
                    (API_VERSIONS, 0, 4),
                    (DESCRIBE_QUORUM, 0, 2),
                    (DESCRIBE_CLUSTER, 0, 2),
                    (SHARE_FETCH, 1, 1),
                    (SHARE_ACKNOWLEDGE, 1, 1),
                ],
            ),
            (
                BulkPolicy::Rewrite,
                ApiVersionsChanges {
                    capped: vec![(METADATA, 14, 13), (API_VERSIONS, 5, 4)],
                    removed: vec![20, 999],
                },
                vec![
                    (PRODUCE, 0, 13),
                    (FETCH, 0, 18),
                    (2, 1, 10),
                    (METADATA, 0, 13),
                    (FIND_COORDINATOR, 0, 6),
                    (11, 0, 9),
                    (API_VERSIONS, 0, 4),
                    (DESCRIBE_QUORUM, 0, 2),
                    (DESCRIBE_CLUSTER, 0, 2),
                    (SHARE_FETCH, 1, 1),
                    (SHARE_ACKNOWLEDGE, 1, 1),
                ],
            ),
        ];
        for v in 0..=4 {
            for (policy, expected_changes, expected_keys) in &cases {
                let input = frame(ApiKey::ApiVersions, v, &api_versions(v, &BROKER_API_KEYS));
                let mut out = BytesMut::new();
                let changes = rewrite_api_versions(v, input, *policy, &[20], &mut out).unwrap();
                assert_eq!(&changes, expected_changes, "v{v} {policy}");
                // Header v0 even for v3+: the correlation id is followed directly by the body.
                let expected = api_versions(v, expected_keys);
                let mut want = BytesMut::new();
                want.extend_from_slice(&CORRELATION_ID.to_be_bytes());
                expected.encode(&mut want, v).unwrap();
                assert_eq!(out, want, "v{v} {policy}");
                let mut buf = out.freeze().slice(4..);
                assert_eq!(ApiVersionsResponse::decode(&mut buf, v).unwrap(), expected);
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn api_versions_removes_what_cannot_be_capped() {
        let keys = [
            (PRODUCE, 10, 13),
            (SHARE_FETCH, 2, 2),
            (FETCH, 4, 17),
            (7, 0, 1),
        ];
        let input = frame(ApiKey::ApiVersions, 3, &api_versions(3, &keys));
        let mut out = BytesMut::new();
        let changes =
            rewrite_api_versions(3, input.clone(), BulkPolicy::Cap, &[], &mut out).unwrap();
        assert_eq!(
            changes,
            ApiVersionsChanges {
                capped: vec![(FETCH, 17, 15)],
                // 7 (ControlledShutdown) left the protocol in Kafka 4: kafka-protocol 0.18
                // does not know it.
                removed: vec![PRODUCE, SHARE_FETCH, 7],
            }
        );
        let mut buf = out.freeze().slice(4..);
        let decoded = ApiVersionsResponse::decode(&mut buf, 3).unwrap();
        assert_eq!(decoded, api_versions(3, &[(FETCH, 4, 15)]));

        let mut out = BytesMut::new();
        let changes = rewrite_api_versions(3, input, BulkPolicy::Rewrite, &[], &mut out).unwrap();
        assert_eq!(
            changes,
            ApiVersionsChanges {
                capped: vec![],
                removed: vec![SHARE_FETCH, 7],
            }
        );
    }

    #[test]
    fn api_versions_unsupported_version_error_is_v0() {
        // Kafka answers an ApiVersions request it cannot parse in v0 format.
        let broker = ApiVersionsResponse::default()
            .with_error_code(UNSUPPORTED_VERSION)
            .with_api_keys(vec![
                ApiVersion::default()
                    .with_api_key(API_VERSIONS)
                    .with_min_version(0)
                    .with_max_version(5),
            ]);
        let header = ResponseHeader::default().with_correlation_id(CORRELATION_ID);
        for request_version in [3, 4, 5, 7] {
            let mut input = BytesMut::from(&encode_with_header(&header, 0, &broker, 0)[..]);
            input.extend_from_slice(&[0xab]);
            let mut out = BytesMut::new();
            let changes = rewrite_api_versions(
                request_version,
                input.freeze(),
                BulkPolicy::Cap,
                &[],
                &mut out,
            )
            .unwrap();
            assert_eq!(changes.capped, vec![(API_VERSIONS, 5, 4)]);
            let mut capped = broker.clone();
            capped.api_keys[0].max_version = 4;
            let mut want = BytesMut::from(&encode_with_header(&header, 0, &capped, 0)[..]);
            want.extend_from_slice(&[0xab]);
            assert_eq!(out, want, "request v{request_version}");
        }

        // A well-formed v3 body with error 35 that is not v0-shaped stays v3.
        let v3 = api_versions(3, &[(API_VERSIONS, 0, 5)]).with_error_code(UNSUPPORTED_VERSION);
        let input = encode_with_header(&header, 0, &v3, 3);
        let mut out = BytesMut::new();
        rewrite_api_versions(3, input, BulkPolicy::Cap, &[], &mut out).unwrap();
        let mut buf = out.freeze().slice(4..);
        let decoded = ApiVersionsResponse::decode(&mut buf, 3).unwrap();
        assert_eq!(decoded.api_keys[0].max_version, 4);
        assert_eq!(decoded.finalized_features_epoch, 42);

        // A v0 body without error 35 answering a v3 request is not accepted.
        let v0 = api_versions(0, &[(API_VERSIONS, 0, 4)]);
        let input = encode_with_header(&header, 0, &v0, 0);
        let mut out = BytesMut::from(&b"keep"[..]);
        let result = rewrite_api_versions(3, input, BulkPolicy::Cap, &[], &mut out);
        assert!(
            matches!(result, Err(RewriteError::Codec(CodecError::Decode { .. }))),
            "{result:?}"
        );
        assert_eq!(&out[..], b"keep", "out untouched on error");
    }

    #[test]
    fn newer_api_versions_requests_get_a_v0_unsupported_version_answer() {
        assert!(api_versions_request_supported(4));
        assert!(!api_versions_request_supported(5));
        let mut body = unsupported_api_versions_response(42).freeze();
        let header = ResponseHeader::decode(&mut body, 0).unwrap();
        assert_eq!(header.correlation_id, 42);
        let r = ApiVersionsResponse::decode(&mut body, 0).unwrap();
        assert_eq!(r.error_code, UNSUPPORTED_VERSION);
        assert_eq!(r.api_keys.len(), 1);
        assert_eq!(r.api_keys[0].api_key, API_VERSIONS);
        assert_eq!(r.api_keys[0].max_version, ApiVersionsResponse::VERSIONS.max);
        assert!(body.is_empty());
    }

    #[test]
    fn impossible_api_keys_count_is_refused_before_decoding() {
        let body = [&[1, 2, 3, 4][..], &[0, 0], &[0x7f, 0xff, 0xff, 0xff]].concat();
        let err = rewrite_api_versions(
            0,
            Bytes::from(body),
            BulkPolicy::Cap,
            &[],
            &mut BytesMut::new(),
        )
        .unwrap_err();
        assert!(
            matches!(err, RewriteError::Codec(CodecError::Decode { .. })),
            "{err}"
        );
        assert!(
            err.to_string().contains("api_keys claims more entries"),
            "{err}"
        );
    }

    #[test]
    fn layout_table_matches_kafka_protocol() {
        use kafka_protocol::messages::api_versions_response as av;
        let f = SCHEMA.flexible_from;
        assert_min_size_matches::<av::ApiVersionsResponse>("ApiVersions", SCHEMA.fields, f, 0..=4);
        assert_min_size_matches::<av::ApiVersion>("api", API_VERSION, f, 0..=4);
        assert_min_size_matches::<av::SupportedFeatureKey>(
            "supported",
            SUPPORTED_FEATURE,
            f,
            3..=4,
        );
        assert_min_size_matches::<av::FinalizedFeatureKey>(
            "finalized",
            FINALIZED_FEATURE,
            f,
            3..=4,
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            for version in -1..=5 {
                let _ = rewrite_api_versions(version, Bytes::from(body.clone()), BulkPolicy::Cap, &[], &mut BytesMut::new());
            }
        }

        #[test]
        fn mutated_api_versions_never_panic(
            version in 0i16..=4,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let input = frame(ApiKey::ApiVersions, version, &api_versions(version, &BROKER_API_KEYS));
            let mut body = input.to_vec();
            for (at, byte) in edits {
                let at = at.index(body.len());
                body[at] = byte;
            }
            let mut out = BytesMut::new();
            if rewrite_api_versions(version, Bytes::from(body), BulkPolicy::Rewrite, &[20], &mut out).is_ok() {
                prop_assert!(out.len() >= 4);
            }
        }
    }
}
