//! An address-bearing response as kpsc rewrites it: the frame as received, the distinct
//! endpoints the layout walk found in it, and (after `rewrite`) what each becomes. The
//! output is the input with hosts, ports and the sizes around them replaced, every other
//! byte copied: unknown tagged fields, strings that are not UTF-8 and bytes after the
//! schema's last field pass as they came, and memory is the frame plus the output.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use crate::{
    kafka::{
        guarded::CodecError,
        layout::{self, EndpointSink, Replacements},
    },
    proxy::rewrite::declaration::{AddressApi, Advertised, Endpoint, RewriteError},
};

/// More distinct endpoints than any cluster has brokers (and than ports a proxy could
/// give them): a response naming more is refused rather than indexed.
pub const MAX_DISTINCT_ENDPOINTS: usize = 4096;

#[derive(Debug)]
pub struct AddressResponse {
    api: &'static AddressApi,
    version: i16,
    header_version: i16,
    body: Bytes,
    endpoints: DistinctEndpoints,
    /// Set by a successful `rewrite`.
    plan: Option<Plan>,
    stripped_hidden: bool,
}

/// What each distinct endpoint becomes (same order), and the rewritten body's length.
#[derive(Debug)]
struct Plan {
    advertised: Vec<Advertised>,
    encoded_len: usize,
}

impl AddressResponse {
    /// Walks `body`, the frame body after the 4-byte size (it starts with the response
    /// header), as a response of `api` version `version`, and lists its endpoints.
    pub fn decode(
        api: &'static AddressApi,
        version: i16,
        body: Bytes,
    ) -> Result<Self, RewriteError> {
        if !api.versions().contains(&version) {
            return Err(RewriteError::Unsupported {
                api_key: api.key as i16,
                version,
            });
        }
        let header_version = api.key.response_header_version(version);
        let decode_error = |reason: String| CodecError::Decode {
            api: api.name(),
            version,
            reason,
        };
        let mut stripped_hidden = false;
        let mut body = body;
        if let Some(tag) = api.hidden_tag.filter(|_| version < api.addresses_since) {
            let without =
                layout::without_top_level_tag(&body, header_version, api.schema, version, tag)
                    .map_err(|e| decode_error(e.to_string()))?;
            if let Some(without) = without {
                body = Bytes::from(without);
                stripped_hidden = true;
            }
        }
        let mut endpoints = DistinctEndpoints::default();
        let end =
            layout::visit_endpoints(&body, header_version, api.schema, version, &mut endpoints)
                .map_err(|e| decode_error(e.to_string()))?;
        if end < body.len() {
            // librdkafka's mock cluster appends a byte to Metadata v12/v13: kept verbatim.
            tracing::debug!(
                api = api.name(),
                version,
                trailing = body.len() - end,
                "response has bytes after its last schema field; keeping them"
            );
        }
        Ok(Self {
            api,
            version,
            header_version,
            body,
            endpoints,
            plan: None,
            stripped_hidden,
        })
    }

    pub fn correlation_id(&self) -> i32 {
        // The walk read the header: the body starts with these four bytes.
        i32::from_be_bytes(self.body[..4].try_into().expect("walked header"))
    }

    /// Every distinct endpoint the response carries, in the order first seen. Entries
    /// with an empty host are not addresses (e.g. FindCoordinator errors report node -1,
    /// host "", port -1) and are neither listed nor rewritten.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints.list
    }

    /// Plans replacing each endpoint's host/port with what `map` returns (asked once per
    /// distinct endpoint); returns how many distinct endpoints will be rewritten.
    ///
    /// If `map` returns `None` for any endpoint the result is [`RewriteError::Unmapped`],
    /// and if a replacement cannot be encoded (a port above 65535 in a uint16 field) a
    /// [`CodecError::Encode`]; either way the response is left as it was.
    pub fn rewrite(
        &mut self,
        mut map: impl FnMut(&Endpoint) -> Option<Advertised>,
    ) -> Result<usize, RewriteError> {
        let mut advertised = Vec::with_capacity(self.endpoints.list.len());
        for endpoint in &self.endpoints.list {
            let Some(to) = map(endpoint) else {
                return Err(RewriteError::Unmapped {
                    node_id: endpoint.node_id,
                    host: endpoint.host.clone(),
                    port: endpoint.port,
                });
            };
            advertised.push(to);
        }
        let encoded_len = layout::rewritten_len(
            &self.body,
            self.header_version,
            self.api.schema,
            self.version,
            &Planned {
                endpoints: &self.endpoints,
                advertised: &advertised,
            },
        )
        .map_err(|e| self.encode_error(e.to_string()))?;
        let count = advertised.len();
        self.plan = Some(Plan {
            advertised,
            encoded_len,
        });
        Ok(count)
    }

    /// Length of what `encode` appends.
    pub fn encoded_len(&self) -> usize {
        self.plan
            .as_ref()
            .map_or(self.body.len(), |p| p.encoded_len)
    }

    /// Appends header + message + trailing bytes (no size prefix) to `out`, rewritten if
    /// `rewrite` succeeded; on error `out` is left as it was.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), RewriteError> {
        let Some(plan) = &self.plan else {
            out.extend_from_slice(&self.body);
            return Ok(());
        };
        let start = out.len();
        out.reserve(plan.encoded_len);
        let planned = Planned {
            endpoints: &self.endpoints,
            advertised: &plan.advertised,
        };
        let written = layout::rewrite(
            &self.body,
            self.header_version,
            self.api.schema,
            self.version,
            &planned,
            out,
        );
        match written {
            Ok(()) if out.len() - start == plan.encoded_len => Ok(()),
            Ok(()) => {
                let len = out.len() - start;
                out.truncate(start);
                Err(self
                    .encode_error(format!(
                        "wrote {len} bytes where the rewrite measured {}",
                        plan.encoded_len
                    ))
                    .into())
            }
            Err(e) => {
                out.truncate(start);
                Err(self.encode_error(e.to_string()).into())
            }
        }
    }

    /// Whether the response carried the API's address tag outside its version's schema
    /// (`AddressApi::hidden_tag`) and lost it.
    pub fn stripped_hidden(&self) -> bool {
        self.stripped_hidden
    }

    fn encode_error(&self, reason: String) -> CodecError {
        CodecError::Encode {
            api: self.api.name(),
            version: self.version,
            reason,
        }
    }
}

/// The distinct endpoints of one response, found again by host (then node id and port)
/// without allocating while the rewrite walks.
#[derive(Debug, Default)]
struct DistinctEndpoints {
    list: Vec<Endpoint>,
    by_host: HashMap<String, Vec<usize>>,
}

impl DistinctEndpoints {
    fn find(&self, node_id: i32, host: &str, port: i32) -> Option<usize> {
        self.by_host.get(host)?.iter().copied().find(|&i| {
            let e = &self.list[i];
            e.node_id == node_id && e.port == port
        })
    }
}

impl EndpointSink for DistinctEndpoints {
    fn endpoint(&mut self, node_id: i32, host: &[u8], port: i32) -> Result<(), &'static str> {
        let host = std::str::from_utf8(host).map_err(|_| "is not UTF-8")?;
        if self.find(node_id, host, port).is_some() {
            return Ok(());
        }
        if self.list.len() == MAX_DISTINCT_ENDPOINTS {
            return Err("is one of more than 4096 distinct broker endpoints");
        }
        self.by_host
            .entry(host.to_owned())
            .or_default()
            .push(self.list.len());
        self.list.push(Endpoint {
            node_id,
            host: host.to_owned(),
            port,
        });
        Ok(())
    }
}

struct Planned<'a> {
    endpoints: &'a DistinctEndpoints,
    advertised: &'a [Advertised],
}

impl Replacements for Planned<'_> {
    fn replacement(&self, node_id: i32, host: &[u8], port: i32) -> Option<(&str, i32)> {
        // Hosts that are not UTF-8 were refused when the endpoints were listed.
        let host = std::str::from_utf8(host).ok()?;
        let to = &self.advertised[self.endpoints.find(node_id, host, port)?];
        Some((&to.host, to.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distinct_endpoint_limit_is_stated_in_its_error() {
        let mut endpoints = DistinctEndpoints::default();
        for port in 0..MAX_DISTINCT_ENDPOINTS as i32 {
            endpoints.endpoint(1, b"h", port).unwrap();
        }
        // Seen before: no new entry, no error.
        endpoints.endpoint(1, b"h", 0).unwrap();
        let err = endpoints.endpoint(1, b"h", -1).unwrap_err();
        assert!(err.contains(&MAX_DISTINCT_ENDPOINTS.to_string()), "{err}");
    }
}
