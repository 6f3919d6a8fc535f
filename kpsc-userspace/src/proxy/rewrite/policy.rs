//! Which responses must be rewritten, and which versions clients may be offered: derived
//! from the registry of address-bearing APIs and `--bulk-policy`.

use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};
use kafka_protocol::protocol::Message;

use crate::{config::proxy::BulkPolicy, proxy::rewrite::apis};

/// KRaft controller APIs whose responses carry voter endpoints (Vote v1+, BeginQuorumEpoch
/// v1+, EndQuorumEpoch v1+, FetchSnapshot v1+, UpdateRaftVoter). kpsc does not rewrite
/// them: they are removed from ApiVersions and their responses are never forwarded.
const CONTROLLER_ADDRESS_APIS: [i16; 5] = [52, 53, 54, 59, 82];

/// True when a response to (`api_key`, `api_version`) may carry broker addresses and so
/// must be decoded and rewritten, never forwarded opaquely.
///
/// Independent of [`BulkPolicy`]: a client that ignores ApiVersions and sends Produce v12
/// under `Cap` still gets its response rewritten.
pub fn response_needs_rewrite(api_key: i16, api_version: i16) -> bool {
    match apis::find(api_key) {
        Some(api) => api_version >= api.inspect_from,
        None => CONTROLLER_ADDRESS_APIS.contains(&api_key),
    }
}

/// Highest version of `api_key` kpsc can decode/rewrite, `None` if kpsc never caps this key.
pub fn rewritable_max_version(api_key: i16, policy: BulkPolicy) -> Option<i16> {
    if api_key == ApiKey::ApiVersions as i16 {
        return Some(ApiVersionsResponse::VERSIONS.max);
    }
    if CONTROLLER_ADDRESS_APIS.contains(&api_key) {
        // Below every min version: the entry is removed.
        return Some(-1);
    }
    let api = apis::find(api_key)?;
    Some(match policy {
        BulkPolicy::Cap if api.capped_by_bulk_policy => api.addresses_since - 1,
        _ => api.codec.max_version,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{
        kafka::{guarded::CodecError, names::api_name},
        proxy::rewrite::declaration::RewriteError,
    };

    const PRODUCE: i16 = ApiKey::Produce as i16;
    const FETCH: i16 = ApiKey::Fetch as i16;
    const METADATA: i16 = ApiKey::Metadata as i16;
    const FIND_COORDINATOR: i16 = ApiKey::FindCoordinator as i16;
    const API_VERSIONS: i16 = ApiKey::ApiVersions as i16;
    const DESCRIBE_QUORUM: i16 = ApiKey::DescribeQuorum as i16;
    const DESCRIBE_CLUSTER: i16 = ApiKey::DescribeCluster as i16;
    const SHARE_FETCH: i16 = ApiKey::ShareFetch as i16;
    const SHARE_ACKNOWLEDGE: i16 = ApiKey::ShareAcknowledge as i16;

    #[test]
    fn response_needs_rewrite_truth_table() {
        let table = [
            (PRODUCE, 8, false),
            (PRODUCE, 9, true),
            (PRODUCE, 10, true),
            (PRODUCE, 13, true),
            (FETCH, 15, false),
            (FETCH, 16, true),
            (DESCRIBE_QUORUM, 1, false),
            (DESCRIBE_QUORUM, 2, true),
            (METADATA, 0, true),
            (METADATA, 13, true),
            (FIND_COORDINATOR, 0, true),
            (FIND_COORDINATOR, 6, true),
            (DESCRIBE_CLUSTER, 0, true),
            (SHARE_FETCH, 1, true),
            (SHARE_ACKNOWLEDGE, 1, true),
            (API_VERSIONS, 3, false),
            (ApiKey::JoinGroup as i16, 9, false),
            (ApiKey::ListOffsets as i16, 10, false),
            (999, 0, false),
            (ApiKey::Vote as i16, 1, true),
            (ApiKey::FetchSnapshot as i16, 1, true),
            (ApiKey::UpdateRaftVoter as i16, 0, true),
        ];
        for (key, version, expected) in table {
            assert_eq!(
                response_needs_rewrite(key, version),
                expected,
                "{} v{version}",
                api_name(key)
            );
        }
    }

    #[test]
    fn rewritable_max_versions() {
        use BulkPolicy::{Cap, Rewrite};
        let table = [
            (PRODUCE, Cap, Some(9)),
            (PRODUCE, Rewrite, Some(13)),
            (ApiKey::Vote as i16, Cap, Some(-1)),
            (FETCH, Cap, Some(15)),
            (FETCH, Rewrite, Some(18)),
            (METADATA, Cap, Some(13)),
            (FIND_COORDINATOR, Rewrite, Some(6)),
            (DESCRIBE_CLUSTER, Cap, Some(2)),
            (SHARE_FETCH, Cap, Some(1)),
            (SHARE_ACKNOWLEDGE, Rewrite, Some(1)),
            (DESCRIBE_QUORUM, Cap, Some(2)),
            (API_VERSIONS, Cap, Some(4)),
            (ApiKey::JoinGroup as i16, Cap, None),
            (999, Rewrite, None),
        ];
        for (key, policy, expected) in table {
            assert_eq!(
                rewritable_max_version(key, policy),
                expected,
                "{} {policy}",
                api_name(key)
            );
        }
        // Every version that may carry addresses is decodable up to the cap (versions below
        // kafka-protocol's minimum, e.g. ShareFetch v0, fail closed at decode).
        for key in ApiKey::iter().map(|key| key as i16) {
            for policy in [Cap, Rewrite] {
                let Some(cap) = rewritable_max_version(key, policy) else {
                    assert!(
                        !response_needs_rewrite(key, 0) && !response_needs_rewrite(key, i16::MAX)
                    );
                    continue;
                };
                for version in 0..=cap {
                    if !response_needs_rewrite(key, version) || key == API_VERSIONS {
                        continue;
                    }
                    let min = apis::find(key).unwrap().codec.min_version;
                    let result = apis::decode(key, version, Bytes::new());
                    if version >= min {
                        assert!(
                            matches!(result, Err(RewriteError::Codec(CodecError::Decode { .. }))),
                            "{} v{version} must be decodable: {result:?}",
                            api_name(key)
                        );
                    }
                }
            }
        }
    }
}
