//! Rewriting broker addresses inside Kafka responses.
//!
//! Clients must only ever see kpsc's advertised addresses, so every response that can carry a
//! broker address is decoded, its endpoints are replaced, and it is re-encoded. Everything else
//! (unknown tagged fields, bytes after the schema's last field) is carried over verbatim.
//!
//! The ApiVersions response is rewritten as well so that clients never negotiate a version of an
//! address-bearing API this module cannot decode.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, DescribeClusterResponse, DescribeQuorumResponse, FetchResponse,
    FindCoordinatorResponse, MetadataResponse, ProduceResponse, ResponseHeader,
    ShareAcknowledgeResponse, ShareFetchResponse, api_versions_response::ApiVersion,
};
use kafka_protocol::protocol::{Decodable, Encodable, Message, StrBytes};

const PRODUCE: i16 = ApiKey::Produce as i16;
const FETCH: i16 = ApiKey::Fetch as i16;
const METADATA: i16 = ApiKey::Metadata as i16;
const FIND_COORDINATOR: i16 = ApiKey::FindCoordinator as i16;
const API_VERSIONS: i16 = ApiKey::ApiVersions as i16;
const DESCRIBE_QUORUM: i16 = ApiKey::DescribeQuorum as i16;
const DESCRIBE_CLUSTER: i16 = ApiKey::DescribeCluster as i16;
const SHARE_FETCH: i16 = ApiKey::ShareFetch as i16;
const SHARE_ACKNOWLEDGE: i16 = ApiKey::ShareAcknowledge as i16;

/// First versions whose responses carry endpoints (KIP-951 `node_endpoints`, KIP-853 `nodes`).
const PRODUCE_ENDPOINTS_SINCE: i16 = 10;
const FETCH_ENDPOINTS_SINCE: i16 = 16;
const DESCRIBE_QUORUM_NODES_SINCE: i16 = 2;

/// KRaft controller APIs whose responses carry voter endpoints (Vote v1+, BeginQuorumEpoch
/// v1+, EndQuorumEpoch v1+, FetchSnapshot v1+, UpdateRaftVoter). kpsc does not rewrite them:
/// they are removed from ApiVersions and their responses are never forwarded.
const CONTROLLER_ADDRESS_APIS: [i16; 5] = [52, 53, 54, 59, 82];

/// Kafka error code UNSUPPORTED_VERSION.
const UNSUPPORTED_VERSION: i16 = 35;

/// How Produce/Fetch (bulk) responses are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BulkPolicy {
    /// Advertise Produce <= 9 and Fetch <= 15: bulk responses then never carry addresses and are
    /// forwarded without being decoded.
    #[default]
    Cap,
    /// Advertise everything kpsc can rewrite; decode and rewrite `node_endpoints` in Produce v10+
    /// and Fetch v16+ responses.
    Rewrite,
}

impl BulkPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            BulkPolicy::Cap => "cap",
            BulkPolicy::Rewrite => "rewrite",
        }
    }
}

impl fmt::Display for BulkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BulkPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cap" => Ok(BulkPolicy::Cap),
            "rewrite" => Ok(BulkPolicy::Rewrite),
            _ => Err(format!(
                "unknown bulk policy {s:?}: expected \"cap\" or \"rewrite\""
            )),
        }
    }
}

/// A broker endpoint as a response carries it (real address).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub node_id: i32,
    pub host: String,
    pub port: i32,
}

/// What the proxy advertises instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertised {
    pub host: String,
    pub port: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("cannot decode {api} v{version} response: {reason}")]
    Decode {
        api: &'static str,
        version: i16,
        reason: String,
    },
    #[error("cannot encode {api} v{version} response: {reason}")]
    Encode {
        api: &'static str,
        version: i16,
        reason: String,
    },
    #[error("no advertised address for broker {node_id} at {host}:{port}")]
    Unmapped {
        node_id: i32,
        host: String,
        port: i32,
    },
    #[error("{} v{version} responses are not rewritable", api_name(*.api_key))]
    Unsupported { api_key: i16, version: i16 },
}

/// True when a response to (`api_key`, `api_version`) may carry broker addresses and so must be
/// decoded and rewritten, never forwarded opaquely.
///
/// Independent of [`BulkPolicy`]: a client that ignores ApiVersions and sends Produce v12 under
/// `Cap` still gets its response rewritten.
pub fn response_needs_rewrite(api_key: i16, api_version: i16) -> bool {
    match api_key {
        PRODUCE => api_version >= PRODUCE_ENDPOINTS_SINCE,
        FETCH => api_version >= FETCH_ENDPOINTS_SINCE,
        DESCRIBE_QUORUM => api_version >= DESCRIBE_QUORUM_NODES_SINCE,
        METADATA | FIND_COORDINATOR | DESCRIBE_CLUSTER | SHARE_FETCH | SHARE_ACKNOWLEDGE => true,
        key => CONTROLLER_ADDRESS_APIS.contains(&key),
    }
}

/// Highest version of `api_key` kpsc can decode/rewrite, `None` if kpsc never caps this key.
pub fn rewritable_max_version(api_key: i16, policy: BulkPolicy) -> Option<i16> {
    match (api_key, policy) {
        (PRODUCE, BulkPolicy::Cap) => Some(PRODUCE_ENDPOINTS_SINCE - 1),
        (FETCH, BulkPolicy::Cap) => Some(FETCH_ENDPOINTS_SINCE - 1),
        (API_VERSIONS, _) => Some(ApiVersionsResponse::VERSIONS.max),
        // Below every min version: the entry is removed.
        (key, _) if CONTROLLER_ADDRESS_APIS.contains(&key) => Some(-1),
        _ => Kind::of(api_key).map(|kind| kind.versions().1),
    }
}

/// Name of an api key for logs and metric labels, as kafka-protocol spells it ("Metadata",
/// "Produce", ...); "unknown" for keys kafka-protocol does not know.
pub fn api_name(api_key: i16) -> &'static str {
    // kafka-protocol only exposes the names through `Debug`; build the table once (a bounded,
    // one-time leak of ~90 short strings) so the hot path is an index lookup.
    static NAMES: OnceLock<Vec<Option<&'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let mut names = Vec::new();
        for key in ApiKey::iter() {
            let index = key as usize;
            if names.len() <= index {
                names.resize(index + 1, None);
            }
            names[index] = Some(&*Box::leak(format!("{key:?}").into_boxed_str()));
        }
        names
    });
    usize::try_from(api_key)
        .ok()
        .and_then(|index| names.get(index).copied().flatten())
        .unwrap_or("unknown")
}

/// The address-bearing responses kpsc decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Metadata,
    FindCoordinator,
    DescribeCluster,
    Produce,
    Fetch,
    ShareFetch,
    ShareAcknowledge,
    DescribeQuorum,
}

impl Kind {
    fn of(api_key: i16) -> Option<Self> {
        Some(match api_key {
            METADATA => Kind::Metadata,
            FIND_COORDINATOR => Kind::FindCoordinator,
            DESCRIBE_CLUSTER => Kind::DescribeCluster,
            PRODUCE => Kind::Produce,
            FETCH => Kind::Fetch,
            SHARE_FETCH => Kind::ShareFetch,
            SHARE_ACKNOWLEDGE => Kind::ShareAcknowledge,
            DESCRIBE_QUORUM => Kind::DescribeQuorum,
            _ => return None,
        })
    }

    fn api_key(self) -> ApiKey {
        match self {
            Kind::Metadata => ApiKey::Metadata,
            Kind::FindCoordinator => ApiKey::FindCoordinator,
            Kind::DescribeCluster => ApiKey::DescribeCluster,
            Kind::Produce => ApiKey::Produce,
            Kind::Fetch => ApiKey::Fetch,
            Kind::ShareFetch => ApiKey::ShareFetch,
            Kind::ShareAcknowledge => ApiKey::ShareAcknowledge,
            Kind::DescribeQuorum => ApiKey::DescribeQuorum,
        }
    }

    /// (min, max) versions decoded: everything kafka-protocol supports for the message.
    fn versions(self) -> (i16, i16) {
        let range = match self {
            Kind::Metadata => MetadataResponse::VERSIONS,
            Kind::FindCoordinator => FindCoordinatorResponse::VERSIONS,
            Kind::DescribeCluster => DescribeClusterResponse::VERSIONS,
            Kind::Produce => ProduceResponse::VERSIONS,
            Kind::Fetch => FetchResponse::VERSIONS,
            Kind::ShareFetch => ShareFetchResponse::VERSIONS,
            Kind::ShareAcknowledge => ShareAcknowledgeResponse::VERSIONS,
            Kind::DescribeQuorum => DescribeQuorumResponse::VERSIONS,
        };
        (range.min, range.max)
    }

    fn schema(self) -> &'static shape::Schema {
        match self {
            Kind::Metadata => &shape::METADATA,
            Kind::FindCoordinator => &shape::FIND_COORDINATOR,
            Kind::DescribeCluster => &shape::DESCRIBE_CLUSTER,
            Kind::Produce => &shape::PRODUCE,
            Kind::Fetch => &shape::FETCH,
            Kind::ShareFetch => &shape::SHARE_FETCH,
            Kind::ShareAcknowledge => &shape::SHARE_ACKNOWLEDGE,
            Kind::DescribeQuorum => &shape::DESCRIBE_QUORUM,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum AddressMessage {
    Metadata(MetadataResponse),
    FindCoordinator(FindCoordinatorResponse),
    DescribeCluster(DescribeClusterResponse),
    Produce(ProduceResponse),
    Fetch(FetchResponse),
    ShareFetch(ShareFetchResponse),
    ShareAcknowledge(ShareAcknowledgeResponse),
    DescribeQuorum(DescribeQuorumResponse),
}

/// A decoded address-bearing response: header + message + trailing bytes kept verbatim.
#[derive(Clone, Debug, PartialEq)]
pub struct AddressResponse {
    api_key: i16,
    version: i16,
    header_version: i16,
    header: ResponseHeader,
    message: AddressMessage,
    trailing: Bytes,
}

impl AddressResponse {
    /// Decodes `body`, the frame body after the 4-byte size (it starts with the response header).
    pub fn decode(api_key: i16, api_version: i16, body: Bytes) -> Result<Self, RewriteError> {
        let unsupported = RewriteError::Unsupported {
            api_key,
            version: api_version,
        };
        let Some(kind) = Kind::of(api_key) else {
            return Err(unsupported);
        };
        let (min, max) = kind.versions();
        if !(min..=max).contains(&api_version) {
            return Err(unsupported);
        }
        let header_version = kind.api_key().response_header_version(api_version);
        let schema = kind.schema();
        let v = api_version;
        macro_rules! frame {
            ($variant:ident) => {{
                let frame = decode_frame(api_key, header_version, v, schema, body)?;
                (
                    frame.header,
                    AddressMessage::$variant(frame.message),
                    frame.trailing,
                )
            }};
        }
        let (header, message, trailing) = match kind {
            Kind::Metadata => frame!(Metadata),
            Kind::FindCoordinator => frame!(FindCoordinator),
            Kind::DescribeCluster => frame!(DescribeCluster),
            Kind::Produce => frame!(Produce),
            Kind::Fetch => frame!(Fetch),
            Kind::ShareFetch => frame!(ShareFetch),
            Kind::ShareAcknowledge => frame!(ShareAcknowledge),
            Kind::DescribeQuorum => frame!(DescribeQuorum),
        };
        Ok(Self {
            api_key,
            version: api_version,
            header_version,
            header,
            message,
            trailing,
        })
    }

    pub fn correlation_id(&self) -> i32 {
        self.header.correlation_id
    }

    /// Every endpoint the response carries, in wire order.
    ///
    /// Entries with an empty host are not addresses (e.g. FindCoordinator errors report node -1,
    /// host "", port -1) and are neither listed nor rewritten.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut endpoints = Vec::new();
        let mut push = |node_id: i32, host: &StrBytes, port: i32| {
            if !host.is_empty() {
                endpoints.push(Endpoint {
                    node_id,
                    host: host.to_string(),
                    port,
                });
            }
        };
        match &self.message {
            AddressMessage::Metadata(m) => {
                for b in &m.brokers {
                    push(b.node_id.0, &b.host, b.port);
                }
            }
            AddressMessage::FindCoordinator(m) => {
                // v0-3 carry one coordinator at the top level, v4+ a list (batched lookups).
                push(m.node_id.0, &m.host, m.port);
                for c in &m.coordinators {
                    push(c.node_id.0, &c.host, c.port);
                }
            }
            AddressMessage::DescribeCluster(m) => {
                for b in &m.brokers {
                    push(b.broker_id.0, &b.host, b.port);
                }
            }
            AddressMessage::Produce(m) => {
                for e in &m.node_endpoints {
                    push(e.node_id.0, &e.host, e.port);
                }
            }
            AddressMessage::Fetch(m) => {
                for e in &m.node_endpoints {
                    push(e.node_id.0, &e.host, e.port);
                }
            }
            AddressMessage::ShareFetch(m) => {
                for e in &m.node_endpoints {
                    push(e.node_id.0, &e.host, e.port);
                }
            }
            AddressMessage::ShareAcknowledge(m) => {
                for e in &m.node_endpoints {
                    push(e.node_id.0, &e.host, e.port);
                }
            }
            AddressMessage::DescribeQuorum(m) => {
                for n in &m.nodes {
                    for l in &n.listeners {
                        push(n.node_id.0, &l.host, i32::from(l.port));
                    }
                }
            }
        }
        endpoints
    }

    /// Replaces each endpoint's host/port with what `map` returns; returns how many were rewritten.
    ///
    /// If `map` returns `None` for any endpoint the result is [`RewriteError::Unmapped`] and the
    /// response is left untouched (all endpoints are mapped before any is replaced).
    pub fn rewrite(
        &mut self,
        mut map: impl FnMut(&Endpoint) -> Option<Advertised>,
    ) -> Result<usize, RewriteError> {
        let api = api_name(self.api_key);
        let version = self.version;
        let mut slots = self.slots();
        let mut plan = Vec::with_capacity(slots.len());
        for slot in &slots {
            let endpoint = slot.endpoint();
            let Some(advertised) = map(&endpoint) else {
                return Err(RewriteError::Unmapped {
                    node_id: endpoint.node_id,
                    host: endpoint.host,
                    port: endpoint.port,
                });
            };
            if !slot.port.fits(advertised.port) {
                return Err(RewriteError::Encode {
                    api,
                    version,
                    reason: format!(
                        "advertised port {} for broker {} does not fit the response's port field",
                        advertised.port, endpoint.node_id
                    ),
                });
            }
            plan.push(advertised);
        }
        for (slot, advertised) in slots.iter_mut().zip(plan) {
            *slot.host = StrBytes::from_string(advertised.host);
            slot.port.set(advertised.port);
        }
        Ok(slots.len())
    }

    /// Appends header + message + trailing bytes (no size prefix) to `out`; on error `out` is
    /// left as it was.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), RewriteError> {
        let (k, hv, v, h, t) = (
            self.api_key,
            self.header_version,
            self.version,
            &self.header,
            &self.trailing,
        );
        match &self.message {
            AddressMessage::Metadata(m) => encode_frame(k, hv, v, h, m, t, out),
            AddressMessage::FindCoordinator(m) => encode_frame(k, hv, v, h, m, t, out),
            AddressMessage::DescribeCluster(m) => encode_frame(k, hv, v, h, m, t, out),
            AddressMessage::Produce(m) => encode_frame(k, hv, v, h, m, t, out),
            AddressMessage::Fetch(m) => encode_frame(k, hv, v, h, m, t, out),
            AddressMessage::ShareFetch(m) => encode_frame(k, hv, v, h, m, t, out),
            AddressMessage::ShareAcknowledge(m) => encode_frame(k, hv, v, h, m, t, out),
            AddressMessage::DescribeQuorum(m) => encode_frame(k, hv, v, h, m, t, out),
        }
    }

    /// Mutable views of every endpoint, in the same order as [`Self::endpoints`].
    fn slots(&mut self) -> Vec<Slot<'_>> {
        let mut slots = Vec::new();
        match &mut self.message {
            AddressMessage::Metadata(m) => slots.extend(
                m.brokers
                    .iter_mut()
                    .map(|b| Slot::new(b.node_id.0, &mut b.host, Port::I32(&mut b.port))),
            ),
            AddressMessage::FindCoordinator(m) => {
                slots.push(Slot::new(m.node_id.0, &mut m.host, Port::I32(&mut m.port)));
                slots.extend(
                    m.coordinators
                        .iter_mut()
                        .map(|c| Slot::new(c.node_id.0, &mut c.host, Port::I32(&mut c.port))),
                );
            }
            AddressMessage::DescribeCluster(m) => slots.extend(
                m.brokers
                    .iter_mut()
                    .map(|b| Slot::new(b.broker_id.0, &mut b.host, Port::I32(&mut b.port))),
            ),
            AddressMessage::Produce(m) => slots.extend(
                m.node_endpoints
                    .iter_mut()
                    .map(|e| Slot::new(e.node_id.0, &mut e.host, Port::I32(&mut e.port))),
            ),
            AddressMessage::Fetch(m) => slots.extend(
                m.node_endpoints
                    .iter_mut()
                    .map(|e| Slot::new(e.node_id.0, &mut e.host, Port::I32(&mut e.port))),
            ),
            AddressMessage::ShareFetch(m) => slots.extend(
                m.node_endpoints
                    .iter_mut()
                    .map(|e| Slot::new(e.node_id.0, &mut e.host, Port::I32(&mut e.port))),
            ),
            AddressMessage::ShareAcknowledge(m) => slots.extend(
                m.node_endpoints
                    .iter_mut()
                    .map(|e| Slot::new(e.node_id.0, &mut e.host, Port::I32(&mut e.port))),
            ),
            AddressMessage::DescribeQuorum(m) => {
                for n in &mut m.nodes {
                    let node_id = n.node_id.0;
                    slots.extend(
                        n.listeners
                            .iter_mut()
                            .map(|l| Slot::new(node_id, &mut l.host, Port::U16(&mut l.port))),
                    );
                }
            }
        }
        slots.retain(|slot| !slot.host.is_empty());
        slots
    }
}

/// One endpoint inside a decoded response, borrowed for rewriting.
struct Slot<'a> {
    node_id: i32,
    host: &'a mut StrBytes,
    port: Port<'a>,
}

impl<'a> Slot<'a> {
    fn new(node_id: i32, host: &'a mut StrBytes, port: Port<'a>) -> Self {
        Self {
            node_id,
            host,
            port,
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            node_id: self.node_id,
            host: self.host.to_string(),
            port: self.port.get(),
        }
    }
}

/// Port fields are int32 everywhere except DescribeQuorum's listeners (uint16).
enum Port<'a> {
    I32(&'a mut i32),
    U16(&'a mut u16),
}

impl Port<'_> {
    fn get(&self) -> i32 {
        match self {
            Port::I32(port) => **port,
            Port::U16(port) => i32::from(**port),
        }
    }

    fn fits(&self, port: i32) -> bool {
        match self {
            Port::I32(_) => true,
            Port::U16(_) => u16::try_from(port).is_ok(),
        }
    }

    /// Stores `port`; callers check [`Self::fits`] first.
    fn set(&mut self, port: i32) {
        match self {
            Port::I32(field) => **field = port,
            Port::U16(field) => {
                if let Ok(port) = u16::try_from(port) {
                    **field = port;
                }
            }
        }
    }
}

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
    encode_frame(
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

/// Decodes an ApiVersions response, returning the version its body is in.
fn decode_api_versions(
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
    decode_frame(API_VERSIONS, 0, version, &shape::API_VERSIONS, body)
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

/// A decoded response frame body.
struct Frame<T> {
    header: ResponseHeader,
    message: T,
    trailing: Bytes,
}

fn decode_frame<T: Decodable>(
    api_key: i16,
    header_version: i16,
    version: i16,
    schema: &shape::Schema,
    body: Bytes,
) -> Result<Frame<T>, RewriteError> {
    let error = |reason: String| RewriteError::Decode {
        api: api_name(api_key),
        version,
        reason,
    };
    // Must run before kafka-protocol sees the bytes: see the `shape` module.
    let end =
        shape::check(&body, header_version, schema, version).map_err(|e| error(e.to_string()))?;
    let total = body.len();
    let mut buf = body;
    let header = ResponseHeader::decode(&mut buf, header_version)
        .map_err(|e| error(format!("header: {}", reason(e))))?;
    let message = T::decode(&mut buf, version).map_err(|e| error(reason(e)))?;
    let consumed = total - buf.len();
    if consumed != end {
        return Err(error(format!(
            "kafka-protocol read {consumed} bytes where kpsc's schema table expects {end}"
        )));
    }
    if !buf.is_empty() {
        // librdkafka's mock cluster appends a byte to Metadata v12/v13: keep such bytes verbatim.
        tracing::debug!(
            api = api_name(api_key),
            version,
            trailing = buf.len(),
            "response has bytes after its last schema field; keeping them"
        );
    }
    Ok(Frame {
        header,
        message,
        trailing: buf,
    })
}

fn encode_frame<T: Encodable>(
    api_key: i16,
    header_version: i16,
    version: i16,
    header: &ResponseHeader,
    message: &T,
    trailing: &Bytes,
    out: &mut BytesMut,
) -> Result<(), RewriteError> {
    let start = out.len();
    let result = (|| -> Result<(), String> {
        // Size first so large Fetch records are copied into `out` once, without regrowth.
        let size = header.compute_size(header_version).map_err(reason)?
            + message.compute_size(version).map_err(reason)?;
        out.reserve(size + trailing.len());
        header.encode(out, header_version).map_err(reason)?;
        message.encode(out, version).map_err(reason)?;
        out.extend_from_slice(trailing);
        Ok(())
    })();
    result.map_err(|reason| {
        out.truncate(start);
        RewriteError::Encode {
            api: api_name(api_key),
            version,
            reason,
        }
    })
}

/// kafka-protocol's errors with their context chain.
fn reason(error: impl fmt::Display) -> String {
    format!("{error:#}")
}

/// Wire-shape pre-check run before kafka-protocol decodes a response.
///
/// kafka-protocol 0.18 sizes `Vec::with_capacity` from array counts read off the wire before it
/// decodes a single element, so a few bytes claiming 2^31 entries make it request hundreds of GB,
/// and a failed allocation aborts the whole process (it is not a panic that could be caught).
/// Walking the same schema first and refusing any count whose entries cannot fit in the remaining
/// bytes bounds every allocation by the frame size.
///
/// The tables mirror kafka-protocol's generated decoders (Kafka 4.1 schemas) field by field; the
/// walk must read exactly what kafka-protocol reads, which `decode_frame` verifies on every decode.
mod shape {
    use std::fmt;

    #[derive(Clone, Copy, Debug)]
    pub(super) enum Ty {
        /// Fixed-width value: integers, booleans, uuids.
        Fixed(usize),
        /// (Nullable) string: int16 length, or uvarint length+1 in flexible versions.
        Str,
        /// (Nullable) bytes or records: int32 length, or uvarint length+1 in flexible versions.
        Bytes,
        /// Array of fixed-width values (broker ids).
        FixedArray(usize),
        /// Array of structs.
        Array(&'static [Field]),
        /// Inline struct.
        Struct(&'static [Field]),
    }

    #[derive(Clone, Copy, Debug)]
    pub(super) struct Field {
        name: &'static str,
        ty: Ty,
        min: i16,
        max: i16,
        tag: Option<u32>,
    }

    impl Field {
        fn present(&self, version: i16) -> bool {
            (self.min..=self.max).contains(&version)
        }
    }

    /// A message: its fields and the first version using compact encodings and tagged fields.
    pub(super) struct Schema {
        flexible_from: i16,
        fields: &'static [Field],
    }

    const I8: Ty = Ty::Fixed(1);
    const I16: Ty = Ty::Fixed(2);
    const U16: Ty = Ty::Fixed(2);
    const I32: Ty = Ty::Fixed(4);
    const I64: Ty = Ty::Fixed(8);
    const BOOL: Ty = Ty::Fixed(1);
    const UUID: Ty = Ty::Fixed(16);
    const STR: Ty = Ty::Str;
    const BYTES: Ty = Ty::Bytes;
    const BROKER_IDS: Ty = Ty::FixedArray(4);

    const fn all(name: &'static str, ty: Ty) -> Field {
        between(0, i16::MAX, name, ty)
    }
    const fn since(min: i16, name: &'static str, ty: Ty) -> Field {
        between(min, i16::MAX, name, ty)
    }
    const fn until(max: i16, name: &'static str, ty: Ty) -> Field {
        between(0, max, name, ty)
    }
    const fn between(min: i16, max: i16, name: &'static str, ty: Ty) -> Field {
        Field {
            name,
            ty,
            min,
            max,
            tag: None,
        }
    }
    const fn tagged(tag: u32, min: i16, name: &'static str, ty: Ty) -> Field {
        Field {
            name,
            ty,
            min,
            max: i16::MAX,
            tag: Some(tag),
        }
    }

    const HEADER: &[Field] = &[all("correlation_id", I32)];

    // Shared by Produce, Fetch, ShareFetch and ShareAcknowledge (only reached in versions that
    // have them).
    const NODE_ENDPOINT: &[Field] = &[
        all("node_id", I32),
        all("host", STR),
        all("port", I32),
        all("rack", STR),
    ];
    const LEADER_ID_AND_EPOCH: &[Field] = &[all("leader_id", I32), all("leader_epoch", I32)];

    const METADATA_BROKER: &[Field] = &[
        all("node_id", I32),
        all("host", STR),
        all("port", I32),
        since(1, "rack", STR),
    ];
    const METADATA_PARTITION: &[Field] = &[
        all("error_code", I16),
        all("partition_index", I32),
        all("leader_id", I32),
        since(7, "leader_epoch", I32),
        all("replica_nodes", BROKER_IDS),
        all("isr_nodes", BROKER_IDS),
        since(5, "offline_replicas", BROKER_IDS),
    ];
    const METADATA_TOPIC: &[Field] = &[
        all("error_code", I16),
        all("name", STR),
        since(10, "topic_id", UUID),
        since(1, "is_internal", BOOL),
        all("partitions", Ty::Array(METADATA_PARTITION)),
        since(8, "topic_authorized_operations", I32),
    ];
    pub(super) const METADATA: Schema = Schema {
        flexible_from: 9,
        fields: &[
            since(3, "throttle_time_ms", I32),
            all("brokers", Ty::Array(METADATA_BROKER)),
            since(2, "cluster_id", STR),
            since(1, "controller_id", I32),
            all("topics", Ty::Array(METADATA_TOPIC)),
            between(8, 10, "cluster_authorized_operations", I32),
            since(13, "error_code", I16),
        ],
    };

    const COORDINATOR: &[Field] = &[
        all("key", STR),
        all("node_id", I32),
        all("host", STR),
        all("port", I32),
        all("error_code", I16),
        all("error_message", STR),
    ];
    pub(super) const FIND_COORDINATOR: Schema = Schema {
        flexible_from: 3,
        fields: &[
            since(1, "throttle_time_ms", I32),
            until(3, "error_code", I16),
            between(1, 3, "error_message", STR),
            until(3, "node_id", I32),
            until(3, "host", STR),
            until(3, "port", I32),
            since(4, "coordinators", Ty::Array(COORDINATOR)),
        ],
    };

    const DESCRIBE_CLUSTER_BROKER: &[Field] = &[
        all("broker_id", I32),
        all("host", STR),
        all("port", I32),
        all("rack", STR),
        since(2, "is_fenced", BOOL),
    ];
    pub(super) const DESCRIBE_CLUSTER: Schema = Schema {
        flexible_from: 0,
        fields: &[
            all("throttle_time_ms", I32),
            all("error_code", I16),
            all("error_message", STR),
            since(1, "endpoint_type", I8),
            all("cluster_id", STR),
            all("controller_id", I32),
            all("brokers", Ty::Array(DESCRIBE_CLUSTER_BROKER)),
            all("cluster_authorized_operations", I32),
        ],
    };

    const PRODUCE_BATCH_ERROR: &[Field] = &[
        all("batch_index", I32),
        all("batch_index_error_message", STR),
    ];
    const PRODUCE_PARTITION: &[Field] = &[
        all("index", I32),
        all("error_code", I16),
        all("base_offset", I64),
        all("log_append_time_ms", I64),
        since(5, "log_start_offset", I64),
        since(8, "record_errors", Ty::Array(PRODUCE_BATCH_ERROR)),
        since(8, "error_message", STR),
        tagged(0, 10, "current_leader", Ty::Struct(LEADER_ID_AND_EPOCH)),
    ];
    const PRODUCE_TOPIC: &[Field] = &[
        until(12, "name", STR),
        since(13, "topic_id", UUID),
        all("partition_responses", Ty::Array(PRODUCE_PARTITION)),
    ];
    pub(super) const PRODUCE: Schema = Schema {
        flexible_from: 9,
        fields: &[
            all("responses", Ty::Array(PRODUCE_TOPIC)),
            all("throttle_time_ms", I32),
            tagged(0, 10, "node_endpoints", Ty::Array(NODE_ENDPOINT)),
        ],
    };

    const FETCH_ABORTED_TRANSACTION: &[Field] =
        &[all("producer_id", I64), all("first_offset", I64)];
    const FETCH_EPOCH_END_OFFSET: &[Field] = &[all("epoch", I32), all("end_offset", I64)];
    const FETCH_SNAPSHOT_ID: &[Field] = &[all("end_offset", I64), all("epoch", I32)];
    const FETCH_PARTITION: &[Field] = &[
        all("partition_index", I32),
        all("error_code", I16),
        all("high_watermark", I64),
        all("last_stable_offset", I64),
        since(5, "log_start_offset", I64),
        all("aborted_transactions", Ty::Array(FETCH_ABORTED_TRANSACTION)),
        since(11, "preferred_read_replica", I32),
        all("records", BYTES),
        tagged(0, 0, "diverging_epoch", Ty::Struct(FETCH_EPOCH_END_OFFSET)),
        tagged(1, 0, "current_leader", Ty::Struct(LEADER_ID_AND_EPOCH)),
        tagged(2, 0, "snapshot_id", Ty::Struct(FETCH_SNAPSHOT_ID)),
    ];
    const FETCH_TOPIC: &[Field] = &[
        until(12, "topic", STR),
        since(13, "topic_id", UUID),
        all("partitions", Ty::Array(FETCH_PARTITION)),
    ];
    pub(super) const FETCH: Schema = Schema {
        flexible_from: 12,
        fields: &[
            all("throttle_time_ms", I32),
            since(7, "error_code", I16),
            since(7, "session_id", I32),
            all("responses", Ty::Array(FETCH_TOPIC)),
            tagged(0, 16, "node_endpoints", Ty::Array(NODE_ENDPOINT)),
        ],
    };

    const SHARE_FETCH_ACQUIRED_RECORDS: &[Field] = &[
        all("first_offset", I64),
        all("last_offset", I64),
        all("delivery_count", I16),
    ];
    const SHARE_FETCH_PARTITION: &[Field] = &[
        all("partition_index", I32),
        all("error_code", I16),
        all("error_message", STR),
        all("acknowledge_error_code", I16),
        all("acknowledge_error_message", STR),
        all("current_leader", Ty::Struct(LEADER_ID_AND_EPOCH)),
        all("records", BYTES),
        all("acquired_records", Ty::Array(SHARE_FETCH_ACQUIRED_RECORDS)),
    ];
    const SHARE_FETCH_TOPIC: &[Field] = &[
        all("topic_id", UUID),
        all("partitions", Ty::Array(SHARE_FETCH_PARTITION)),
    ];
    pub(super) const SHARE_FETCH: Schema = Schema {
        flexible_from: 0,
        fields: &[
            all("throttle_time_ms", I32),
            all("error_code", I16),
            all("error_message", STR),
            all("acquisition_lock_timeout_ms", I32),
            all("responses", Ty::Array(SHARE_FETCH_TOPIC)),
            all("node_endpoints", Ty::Array(NODE_ENDPOINT)),
        ],
    };

    const SHARE_ACKNOWLEDGE_PARTITION: &[Field] = &[
        all("partition_index", I32),
        all("error_code", I16),
        all("error_message", STR),
        all("current_leader", Ty::Struct(LEADER_ID_AND_EPOCH)),
    ];
    const SHARE_ACKNOWLEDGE_TOPIC: &[Field] = &[
        all("topic_id", UUID),
        all("partitions", Ty::Array(SHARE_ACKNOWLEDGE_PARTITION)),
    ];
    pub(super) const SHARE_ACKNOWLEDGE: Schema = Schema {
        flexible_from: 0,
        fields: &[
            all("throttle_time_ms", I32),
            all("error_code", I16),
            all("error_message", STR),
            all("responses", Ty::Array(SHARE_ACKNOWLEDGE_TOPIC)),
            all("node_endpoints", Ty::Array(NODE_ENDPOINT)),
        ],
    };

    const DESCRIBE_QUORUM_REPLICA: &[Field] = &[
        all("replica_id", I32),
        since(2, "replica_directory_id", UUID),
        all("log_end_offset", I64),
        since(1, "last_fetch_timestamp", I64),
        since(1, "last_caught_up_timestamp", I64),
    ];
    const DESCRIBE_QUORUM_PARTITION: &[Field] = &[
        all("partition_index", I32),
        all("error_code", I16),
        since(2, "error_message", STR),
        all("leader_id", I32),
        all("leader_epoch", I32),
        all("high_watermark", I64),
        all("current_voters", Ty::Array(DESCRIBE_QUORUM_REPLICA)),
        all("observers", Ty::Array(DESCRIBE_QUORUM_REPLICA)),
    ];
    const DESCRIBE_QUORUM_TOPIC: &[Field] = &[
        all("topic_name", STR),
        all("partitions", Ty::Array(DESCRIBE_QUORUM_PARTITION)),
    ];
    const DESCRIBE_QUORUM_LISTENER: &[Field] =
        &[all("name", STR), all("host", STR), all("port", U16)];
    const DESCRIBE_QUORUM_NODE: &[Field] = &[
        all("node_id", I32),
        all("listeners", Ty::Array(DESCRIBE_QUORUM_LISTENER)),
    ];
    pub(super) const DESCRIBE_QUORUM: Schema = Schema {
        flexible_from: 0,
        fields: &[
            all("error_code", I16),
            since(2, "error_message", STR),
            all("topics", Ty::Array(DESCRIBE_QUORUM_TOPIC)),
            since(2, "nodes", Ty::Array(DESCRIBE_QUORUM_NODE)),
        ],
    };

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
    pub(super) const API_VERSIONS: Schema = Schema {
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

    #[derive(Debug)]
    pub(super) struct ShapeError {
        at: usize,
        field: &'static str,
        problem: &'static str,
    }

    impl ShapeError {
        /// The count check kafka-protocol lacks failed: kafka-protocol must not see this input.
        #[cfg(test)]
        pub(super) fn is_impossible_count(&self) -> bool {
            self.problem == IMPOSSIBLE_COUNT
        }
    }

    const IMPOSSIBLE_COUNT: &str = "claims more entries than the remaining bytes hold";

    impl fmt::Display for ShapeError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{} {} (byte {})", self.field, self.problem, self.at)
        }
    }

    /// Walks header + message the way kafka-protocol decodes them; returns where the message ends.
    pub(super) fn check(
        body: &[u8],
        header_version: i16,
        schema: &Schema,
        version: i16,
    ) -> Result<usize, ShapeError> {
        let mut walker = Walker {
            buf: body,
            pos: 0,
            version,
            flexible: header_version >= 1,
        };
        walker.fields(HEADER)?;
        walker.flexible = version >= schema.flexible_from;
        walker.fields(schema.fields)?;
        Ok(walker.pos)
    }

    struct Walker<'a> {
        buf: &'a [u8],
        pos: usize,
        version: i16,
        flexible: bool,
    }

    impl Walker<'_> {
        fn fail(&self, field: &'static str, problem: &'static str) -> ShapeError {
            ShapeError {
                at: self.pos,
                field,
                problem,
            }
        }

        fn remaining(&self) -> usize {
            self.buf.len() - self.pos
        }

        fn skip(&mut self, len: usize, field: &'static str) -> Result<(), ShapeError> {
            if len > self.remaining() {
                return Err(self.fail(field, "runs past the end of the response"));
            }
            self.pos += len;
            Ok(())
        }

        fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ShapeError> {
            let bytes = self
                .buf
                .get(self.pos..)
                .and_then(|rest| rest.first_chunk::<N>())
                .copied()
                .ok_or_else(|| self.fail(field, "runs past the end of the response"))?;
            self.pos += N;
            Ok(bytes)
        }

        fn int16(&mut self, field: &'static str) -> Result<i16, ShapeError> {
            self.array(field).map(i16::from_be_bytes)
        }

        fn int32(&mut self, field: &'static str) -> Result<i32, ShapeError> {
            self.array(field).map(i32::from_be_bytes)
        }

        /// Same reading as kafka-protocol: at most five bytes, excess bits dropped.
        fn uvarint(&mut self, field: &'static str) -> Result<u32, ShapeError> {
            let mut value = 0u32;
            for i in 0..5 {
                let [byte] = self.array::<1>(field)?;
                value |= u32::from(byte & 0x7f) << (i * 7);
                if byte < 0x80 {
                    break;
                }
            }
            Ok(value)
        }

        /// Length of a string (`wide == false`) or bytes field; null reads as empty.
        fn length(&mut self, field: &'static str, wide: bool) -> Result<usize, ShapeError> {
            if self.flexible {
                return Ok(self.uvarint(field)?.saturating_sub(1) as usize);
            }
            let len = if wide {
                self.int32(field)?
            } else {
                i32::from(self.int16(field)?)
            };
            match len {
                -1 => Ok(0),
                len => usize::try_from(len).map_err(|_| self.fail(field, "has a negative length")),
            }
        }

        /// Entry count of an array whose entries take at least `min_entry` bytes; null reads as 0.
        fn count(&mut self, field: &'static str, min_entry: usize) -> Result<usize, ShapeError> {
            let count = if self.flexible {
                self.uvarint(field)?.saturating_sub(1) as usize
            } else {
                match self.int32(field)? {
                    -1 => 0,
                    n => usize::try_from(n)
                        .map_err(|_| self.fail(field, "has a negative entry count"))?,
                }
            };
            // The one check kafka-protocol lacks: it reserves `count` entries up front.
            if count.saturating_mul(min_entry.max(1)) > self.remaining() {
                return Err(self.fail(field, IMPOSSIBLE_COUNT));
            }
            Ok(count)
        }

        fn fields(&mut self, fields: &[Field]) -> Result<(), ShapeError> {
            let version = self.version;
            for field in fields
                .iter()
                .filter(|f| f.tag.is_none() && f.present(version))
            {
                self.value(field.ty, field.name)?;
            }
            if self.flexible {
                let count = self.uvarint("tagged field count")?;
                for _ in 0..count {
                    let tag = self.uvarint("tagged field tag")?;
                    let size = self.uvarint("tagged field size")?;
                    // kafka-protocol decodes known tagged fields in place, ignoring their size,
                    // and skips unknown ones by size.
                    match fields
                        .iter()
                        .find(|f| f.tag == Some(tag) && f.present(version))
                    {
                        Some(field) => self.value(field.ty, field.name)?,
                        None => self.skip(size as usize, "unknown tagged field")?,
                    }
                }
            }
            Ok(())
        }

        fn value(&mut self, ty: Ty, name: &'static str) -> Result<(), ShapeError> {
            match ty {
                Ty::Fixed(width) => self.skip(width, name),
                Ty::Str => {
                    let len = self.length(name, false)?;
                    self.skip(len, name)
                }
                Ty::Bytes => {
                    let len = self.length(name, true)?;
                    self.skip(len, name)
                }
                Ty::FixedArray(width) => {
                    let count = self.count(name, width)?;
                    self.skip(count * width, name)
                }
                Ty::Array(fields) => {
                    let count = self.count(name, min_size(fields, self.version, self.flexible))?;
                    for _ in 0..count {
                        self.fields(fields)?;
                    }
                    Ok(())
                }
                Ty::Struct(fields) => self.fields(fields),
            }
        }
    }

    /// Fewest bytes one struct can take on the wire.
    fn min_size(fields: &[Field], version: i16, flexible: bool) -> usize {
        let narrow = if flexible { 1 } else { 2 };
        let wide = if flexible { 1 } else { 4 };
        let own: usize = fields
            .iter()
            .filter(|f| f.tag.is_none() && f.present(version))
            .map(|f| match f.ty {
                Ty::Fixed(width) => width,
                Ty::Str => narrow,
                Ty::Bytes | Ty::FixedArray(_) | Ty::Array(_) => wide,
                Ty::Struct(inner) => min_size(inner, version, flexible),
            })
            .sum();
        own + usize::from(flexible)
    }

    /// Every table must list exactly the fields kafka-protocol encodes in each version: a
    /// default-valued struct encodes to its minimum size (empty strings and arrays, omitted
    /// tagged fields), so the two sizes agree only if presence, widths and flexibility do.
    #[cfg(test)]
    mod tests {
        use super::*;
        use kafka_protocol::messages::{
            api_versions_response as av, describe_cluster_response as dc,
            describe_quorum_response as dq, fetch_response as fetch,
            find_coordinator_response as fc, metadata_response as md, produce_response as produce,
            share_acknowledge_response as sa, share_fetch_response as sf,
        };
        use kafka_protocol::protocol::Encodable;
        use std::ops::RangeInclusive;

        fn same<T: Encodable + Default>(
            name: &str,
            fields: &[Field],
            flexible_from: i16,
            versions: RangeInclusive<i16>,
        ) {
            for v in versions {
                assert_eq!(
                    min_size(fields, v, v >= flexible_from),
                    T::default().compute_size(v).unwrap(),
                    "{name} v{v}"
                );
            }
        }

        #[test]
        fn min_sizes_match_kafka_protocol() {
            let f = METADATA.flexible_from;
            same::<md::MetadataResponse>("Metadata", METADATA.fields, f, 0..=13);
            same::<md::MetadataResponseBroker>("broker", METADATA_BROKER, f, 0..=13);
            same::<md::MetadataResponseTopic>("topic", METADATA_TOPIC, f, 0..=13);
            same::<md::MetadataResponsePartition>("partition", METADATA_PARTITION, f, 0..=13);

            let f = FIND_COORDINATOR.flexible_from;
            same::<fc::FindCoordinatorResponse>(
                "FindCoordinator",
                FIND_COORDINATOR.fields,
                f,
                0..=6,
            );
            same::<fc::Coordinator>("coordinator", COORDINATOR, f, 4..=6);

            let f = DESCRIBE_CLUSTER.flexible_from;
            same::<dc::DescribeClusterResponse>(
                "DescribeCluster",
                DESCRIBE_CLUSTER.fields,
                f,
                0..=2,
            );
            same::<dc::DescribeClusterBroker>("broker", DESCRIBE_CLUSTER_BROKER, f, 0..=2);

            let f = PRODUCE.flexible_from;
            same::<produce::ProduceResponse>("Produce", PRODUCE.fields, f, 3..=13);
            same::<produce::TopicProduceResponse>("topic", PRODUCE_TOPIC, f, 3..=13);
            same::<produce::PartitionProduceResponse>("partition", PRODUCE_PARTITION, f, 3..=13);
            same::<produce::BatchIndexAndErrorMessage>("batch", PRODUCE_BATCH_ERROR, f, 8..=13);
            same::<produce::NodeEndpoint>("endpoint", NODE_ENDPOINT, f, 10..=13);
            same::<produce::LeaderIdAndEpoch>("leader", LEADER_ID_AND_EPOCH, f, 10..=13);

            let f = FETCH.flexible_from;
            same::<fetch::FetchResponse>("Fetch", FETCH.fields, f, 4..=18);
            same::<fetch::FetchableTopicResponse>("topic", FETCH_TOPIC, f, 4..=18);
            same::<fetch::PartitionData>("partition", FETCH_PARTITION, f, 4..=18);
            same::<fetch::AbortedTransaction>("aborted", FETCH_ABORTED_TRANSACTION, f, 4..=18);
            same::<fetch::EpochEndOffset>("epoch", FETCH_EPOCH_END_OFFSET, f, 12..=18);
            same::<fetch::SnapshotId>("snapshot", FETCH_SNAPSHOT_ID, f, 12..=18);
            same::<fetch::LeaderIdAndEpoch>("leader", LEADER_ID_AND_EPOCH, f, 12..=18);
            same::<fetch::NodeEndpoint>("endpoint", NODE_ENDPOINT, f, 16..=18);

            let f = SHARE_FETCH.flexible_from;
            same::<sf::ShareFetchResponse>("ShareFetch", SHARE_FETCH.fields, f, 1..=1);
            same::<sf::ShareFetchableTopicResponse>("topic", SHARE_FETCH_TOPIC, f, 1..=1);
            same::<sf::PartitionData>("partition", SHARE_FETCH_PARTITION, f, 1..=1);
            same::<sf::AcquiredRecords>("acquired", SHARE_FETCH_ACQUIRED_RECORDS, f, 1..=1);
            same::<sf::LeaderIdAndEpoch>("leader", LEADER_ID_AND_EPOCH, f, 1..=1);
            same::<sf::NodeEndpoint>("endpoint", NODE_ENDPOINT, f, 1..=1);

            let f = SHARE_ACKNOWLEDGE.flexible_from;
            same::<sa::ShareAcknowledgeResponse>(
                "ShareAcknowledge",
                SHARE_ACKNOWLEDGE.fields,
                f,
                1..=1,
            );
            same::<sa::ShareAcknowledgeTopicResponse>("topic", SHARE_ACKNOWLEDGE_TOPIC, f, 1..=1);
            same::<sa::PartitionData>("partition", SHARE_ACKNOWLEDGE_PARTITION, f, 1..=1);
            same::<sa::LeaderIdAndEpoch>("leader", LEADER_ID_AND_EPOCH, f, 1..=1);
            same::<sa::NodeEndpoint>("endpoint", NODE_ENDPOINT, f, 1..=1);

            let f = DESCRIBE_QUORUM.flexible_from;
            same::<dq::DescribeQuorumResponse>("DescribeQuorum", DESCRIBE_QUORUM.fields, f, 0..=2);
            same::<dq::TopicData>("topic", DESCRIBE_QUORUM_TOPIC, f, 0..=2);
            same::<dq::PartitionData>("partition", DESCRIBE_QUORUM_PARTITION, f, 0..=2);
            same::<dq::ReplicaState>("replica", DESCRIBE_QUORUM_REPLICA, f, 0..=2);
            same::<dq::Node>("node", DESCRIBE_QUORUM_NODE, f, 2..=2);
            same::<dq::Listener>("listener", DESCRIBE_QUORUM_LISTENER, f, 2..=2);

            let f = API_VERSIONS.flexible_from;
            same::<av::ApiVersionsResponse>("ApiVersions", API_VERSIONS.fields, f, 0..=4);
            same::<av::ApiVersion>("api", API_VERSION, f, 0..=4);
            same::<av::SupportedFeatureKey>("supported", SUPPORTED_FEATURE, f, 3..=4);
            same::<av::FinalizedFeatureKey>("finalized", FINALIZED_FEATURE, f, 3..=4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::api_versions_response::{
        FinalizedFeatureKey, SupportedFeatureKey,
    };
    use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
    use kafka_protocol::messages::find_coordinator_response::Coordinator;
    use kafka_protocol::messages::metadata_response::{
        MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
    };
    use kafka_protocol::messages::{
        BrokerId, ProducerId, TopicName, describe_quorum_response as dq, fetch_response as fetch,
        produce_response as produce, share_acknowledge_response as sa, share_fetch_response as sf,
    };
    use proptest::prelude::*;

    const CORRELATION_ID: i32 = 0x0102_0304;
    const ADVERTISED_HOST: &str = "kpsc.proxy.example";
    const REAL_PREFIX: &[u8] = b"10.0.0.";

    fn s(value: &'static str) -> StrBytes {
        StrBytes::from_static_str(value)
    }

    fn ep(node_id: i32, host: &str, port: i32) -> Endpoint {
        Endpoint {
            node_id,
            host: host.to_string(),
            port,
        }
    }

    /// Real brokers are 10.0.0.<node>:909x; kpsc advertises one host with a port per endpoint.
    fn advertise(endpoint: &Endpoint) -> Option<Advertised> {
        Some(Advertised {
            host: ADVERTISED_HOST.to_string(),
            // Wrapping: fuzzed responses carry arbitrary ids and ports.
            port: 40_000i32
                .wrapping_add(endpoint.node_id.wrapping_mul(10))
                .wrapping_add(endpoint.port.wrapping_sub(9092)),
        })
    }

    fn advertised(endpoint: &Endpoint) -> Endpoint {
        let Advertised { host, port } = advertise(endpoint).unwrap();
        ep(endpoint.node_id, &host, port)
    }

    /// Inverse of [`advertise`].
    fn unadvertise(endpoint: &Endpoint) -> Option<Advertised> {
        (endpoint.host == ADVERTISED_HOST).then(|| Advertised {
            host: format!("10.0.0.{}", endpoint.node_id),
            port: endpoint.port - 40_000 - endpoint.node_id * 10 + 9092,
        })
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn encode_with_header<T: Encodable>(
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

    fn frame<T: Encodable>(api: ApiKey, version: i16, message: &T) -> Bytes {
        let header = ResponseHeader::default().with_correlation_id(CORRELATION_ID);
        encode_with_header(
            &header,
            api.response_header_version(version),
            message,
            version,
        )
    }

    // ---- fixtures: every field the version has is set, so the shape walk covers it ----

    fn metadata(v: i16) -> (MetadataResponse, Vec<Endpoint>) {
        let broker = |id: i32, host: &'static str| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack((v >= 1).then(|| s("rack-a")))
        };
        let partition = MetadataResponsePartition::default()
            .with_error_code(0)
            .with_partition_index(3)
            .with_leader_id(BrokerId(1))
            .with_leader_epoch(if v >= 7 { 4 } else { -1 })
            .with_replica_nodes(vec![BrokerId(1), BrokerId(2)])
            .with_isr_nodes(vec![BrokerId(1)])
            .with_offline_replicas(if v >= 5 { vec![BrokerId(2)] } else { vec![] });
        let topic = MetadataResponseTopic::default()
            .with_name(Some(TopicName(s("orders"))))
            .with_is_internal(false)
            .with_partitions(vec![partition])
            .with_topic_authorized_operations(if v >= 8 { 0x0ff8 } else { i32::MIN });
        let message = MetadataResponse::default()
            .with_throttle_time_ms(if v >= 3 { 7 } else { 0 })
            .with_brokers(vec![broker(1, "10.0.0.1"), broker(2, "10.0.0.2")])
            .with_cluster_id((v >= 2).then(|| s("cluster-x")))
            .with_controller_id(BrokerId(if v >= 1 { 1 } else { -1 }))
            .with_topics(vec![topic])
            .with_cluster_authorized_operations(if (8..=10).contains(&v) {
                0x0ff8
            } else {
                i32::MIN
            });
        let endpoints = vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)];
        (message, endpoints)
    }

    fn metadata_endpoints(m: &MetadataResponse) -> Vec<Endpoint> {
        m.brokers
            .iter()
            .map(|b| ep(b.node_id.0, &b.host, b.port))
            .collect()
    }

    fn find_coordinator(v: i16) -> (FindCoordinatorResponse, Vec<Endpoint>) {
        let message =
            FindCoordinatorResponse::default().with_throttle_time_ms(if v >= 1 { 5 } else { 0 });
        if v <= 3 {
            let message = message
                .with_node_id(BrokerId(1))
                .with_host(s("10.0.0.1"))
                .with_port(9092);
            let message = if v >= 1 {
                message.with_error_message(None)
            } else {
                message
            };
            return (message, vec![ep(1, "10.0.0.1", 9092)]);
        }
        let coordinator = |key: &'static str, id: i32, host: &'static str| {
            Coordinator::default()
                .with_key(s(key))
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_error_message(None)
        };
        // A failed lookup reports no address (node -1, empty host): nothing to rewrite there.
        let failed = Coordinator::default()
            .with_key(s("group-c"))
            .with_node_id(BrokerId(-1))
            .with_port(-1)
            .with_error_code(15)
            .with_error_message(Some(s("coordinator not available")));
        let message = message.with_coordinators(vec![
            coordinator("group-a", 1, "10.0.0.1"),
            coordinator("group-b", 2, "10.0.0.2"),
            failed,
        ]);
        (
            message,
            vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
        )
    }

    fn find_coordinator_endpoints(m: &FindCoordinatorResponse) -> Vec<Endpoint> {
        std::iter::once(ep(m.node_id.0, &m.host, m.port))
            .chain(
                m.coordinators
                    .iter()
                    .map(|c| ep(c.node_id.0, &c.host, c.port)),
            )
            .filter(|e| !e.host.is_empty())
            .collect()
    }

    fn describe_cluster(v: i16) -> (DescribeClusterResponse, Vec<Endpoint>) {
        let broker = |id: i32, host: &'static str| {
            DescribeClusterBroker::default()
                .with_broker_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack(Some(s("rack-b")))
                .with_is_fenced(v >= 2 && id == 2)
        };
        let message = DescribeClusterResponse::default()
            .with_throttle_time_ms(1)
            .with_error_message(None)
            .with_endpoint_type(if v >= 1 { 2 } else { 1 })
            .with_cluster_id(s("cluster-x"))
            .with_controller_id(BrokerId(1))
            .with_brokers(vec![broker(1, "10.0.0.1"), broker(2, "10.0.0.2")])
            .with_cluster_authorized_operations(0x0ff8);
        (
            message,
            vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
        )
    }

    fn describe_cluster_endpoints(m: &DescribeClusterResponse) -> Vec<Endpoint> {
        m.brokers
            .iter()
            .map(|b| ep(b.broker_id.0, &b.host, b.port))
            .collect()
    }

    fn produce(v: i16) -> (ProduceResponse, Vec<Endpoint>) {
        let partition = produce::PartitionProduceResponse::default()
            .with_index(2)
            .with_base_offset(42)
            .with_log_append_time_ms(1_700_000_000_000)
            .with_log_start_offset(if v >= 5 { 0 } else { -1 })
            .with_record_errors(if v >= 8 {
                vec![
                    produce::BatchIndexAndErrorMessage::default()
                        .with_batch_index(1)
                        .with_batch_index_error_message(Some(s("bad record"))),
                ]
            } else {
                vec![]
            })
            .with_error_message((v >= 8).then(|| s("partial failure")))
            .with_current_leader(if v >= 10 {
                produce::LeaderIdAndEpoch::default()
                    .with_leader_id(BrokerId(2))
                    .with_leader_epoch(5)
            } else {
                Default::default()
            });
        let topic = produce::TopicProduceResponse::default()
            .with_name(if v <= 12 {
                TopicName(s("orders"))
            } else {
                Default::default()
            })
            .with_partition_responses(vec![partition]);
        let node = |id: i32, host: &'static str| {
            produce::NodeEndpoint::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack(Some(s("rack-c")))
        };
        let (nodes, endpoints) = if v >= PRODUCE_ENDPOINTS_SINCE {
            (
                vec![node(1, "10.0.0.1"), node(2, "10.0.0.2")],
                vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
            )
        } else {
            (vec![], vec![])
        };
        let message = ProduceResponse::default()
            .with_responses(vec![topic])
            .with_throttle_time_ms(3)
            .with_node_endpoints(nodes);
        (message, endpoints)
    }

    fn produce_endpoints(m: &ProduceResponse) -> Vec<Endpoint> {
        m.node_endpoints
            .iter()
            .map(|e| ep(e.node_id.0, &e.host, e.port))
            .collect()
    }

    fn fetch(v: i16) -> (FetchResponse, Vec<Endpoint>) {
        let mut partition = fetch::PartitionData::default()
            .with_partition_index(1)
            .with_high_watermark(100)
            .with_last_stable_offset(90)
            .with_log_start_offset(if v >= 5 { 1 } else { -1 })
            .with_aborted_transactions(Some(vec![
                fetch::AbortedTransaction::default()
                    .with_producer_id(ProducerId(9))
                    .with_first_offset(10),
            ]))
            .with_preferred_read_replica(BrokerId(if v >= 11 { 2 } else { -1 }))
            .with_records(Some(Bytes::from_static(b"opaque record batch bytes")));
        if v >= 12 {
            partition = partition
                .with_diverging_epoch(
                    fetch::EpochEndOffset::default()
                        .with_epoch(3)
                        .with_end_offset(80),
                )
                .with_current_leader(
                    fetch::LeaderIdAndEpoch::default()
                        .with_leader_id(BrokerId(2))
                        .with_leader_epoch(6),
                )
                .with_snapshot_id(
                    fetch::SnapshotId::default()
                        .with_end_offset(70)
                        .with_epoch(2),
                );
        }
        let topic = fetch::FetchableTopicResponse::default()
            .with_topic(if v <= 12 {
                TopicName(s("orders"))
            } else {
                Default::default()
            })
            .with_partitions(vec![partition]);
        let node = |id: i32, host: &'static str| {
            fetch::NodeEndpoint::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack(None)
        };
        let (nodes, endpoints) = if v >= FETCH_ENDPOINTS_SINCE {
            (
                vec![node(1, "10.0.0.1"), node(2, "10.0.0.2")],
                vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
            )
        } else {
            (vec![], vec![])
        };
        let message = FetchResponse::default()
            .with_throttle_time_ms(2)
            .with_session_id(if v >= 7 { 77 } else { 0 })
            .with_responses(vec![topic])
            .with_node_endpoints(nodes);
        (message, endpoints)
    }

    fn fetch_endpoints(m: &FetchResponse) -> Vec<Endpoint> {
        m.node_endpoints
            .iter()
            .map(|e| ep(e.node_id.0, &e.host, e.port))
            .collect()
    }

    fn share_fetch(_v: i16) -> (ShareFetchResponse, Vec<Endpoint>) {
        let partition = sf::PartitionData::default()
            .with_partition_index(0)
            .with_error_message(None)
            .with_acknowledge_error_message(Some(s("")))
            .with_current_leader(
                sf::LeaderIdAndEpoch::default()
                    .with_leader_id(1)
                    .with_leader_epoch(4),
            )
            .with_records(Some(Bytes::from_static(b"opaque share records")))
            .with_acquired_records(vec![
                sf::AcquiredRecords::default()
                    .with_first_offset(0)
                    .with_last_offset(9)
                    .with_delivery_count(1),
            ]);
        let node = |id: i32, host: &'static str| {
            sf::NodeEndpoint::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
                .with_rack(Some(s("rack-d")))
        };
        let message = ShareFetchResponse::default()
            .with_acquisition_lock_timeout_ms(30_000)
            .with_responses(vec![
                sf::ShareFetchableTopicResponse::default().with_partitions(vec![partition]),
            ])
            .with_node_endpoints(vec![node(1, "10.0.0.1"), node(2, "10.0.0.2")]);
        (
            message,
            vec![ep(1, "10.0.0.1", 9092), ep(2, "10.0.0.2", 9092)],
        )
    }

    fn share_fetch_endpoints(m: &ShareFetchResponse) -> Vec<Endpoint> {
        m.node_endpoints
            .iter()
            .map(|e| ep(e.node_id.0, &e.host, e.port))
            .collect()
    }

    fn share_acknowledge(_v: i16) -> (ShareAcknowledgeResponse, Vec<Endpoint>) {
        let partition = sa::PartitionData::default()
            .with_partition_index(0)
            .with_error_message(None)
            .with_current_leader(
                sa::LeaderIdAndEpoch::default()
                    .with_leader_id(2)
                    .with_leader_epoch(4),
            );
        let node = |id: i32, host: &'static str| {
            sa::NodeEndpoint::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(9092)
        };
        let message = ShareAcknowledgeResponse::default()
            .with_error_message(None)
            .with_responses(vec![
                sa::ShareAcknowledgeTopicResponse::default().with_partitions(vec![partition]),
            ])
            .with_node_endpoints(vec![node(2, "10.0.0.2"), node(1, "10.0.0.1")]);
        (
            message,
            vec![ep(2, "10.0.0.2", 9092), ep(1, "10.0.0.1", 9092)],
        )
    }

    fn share_acknowledge_endpoints(m: &ShareAcknowledgeResponse) -> Vec<Endpoint> {
        m.node_endpoints
            .iter()
            .map(|e| ep(e.node_id.0, &e.host, e.port))
            .collect()
    }

    fn describe_quorum(v: i16) -> (DescribeQuorumResponse, Vec<Endpoint>) {
        let replica = |id: i32| {
            dq::ReplicaState::default()
                .with_replica_id(BrokerId(id))
                .with_log_end_offset(50)
                .with_last_fetch_timestamp(if v >= 1 { 1_000 } else { -1 })
                .with_last_caught_up_timestamp(if v >= 1 { 900 } else { -1 })
        };
        let mut partition = dq::PartitionData::default()
            .with_leader_id(BrokerId(1))
            .with_leader_epoch(3)
            .with_high_watermark(60)
            .with_current_voters(vec![replica(1), replica(2)])
            .with_observers(vec![replica(3)]);
        let mut message = DescribeQuorumResponse::default();
        let mut endpoints = vec![];
        if v >= DESCRIBE_QUORUM_NODES_SINCE {
            partition = partition.with_error_message(None);
            let listener = |name: &'static str, host: &'static str, port: u16| {
                dq::Listener::default()
                    .with_name(s(name))
                    .with_host(s(host))
                    .with_port(port)
            };
            message = message.with_error_message(None).with_nodes(vec![
                dq::Node::default()
                    .with_node_id(BrokerId(1))
                    .with_listeners(vec![
                        listener("PLAINTEXT", "10.0.0.1", 9092),
                        listener("CONTROLLER", "10.0.0.1", 9093),
                    ]),
                dq::Node::default()
                    .with_node_id(BrokerId(2))
                    .with_listeners(vec![listener("PLAINTEXT", "10.0.0.2", 9092)]),
            ]);
            endpoints = vec![
                ep(1, "10.0.0.1", 9092),
                ep(1, "10.0.0.1", 9093),
                ep(2, "10.0.0.2", 9092),
            ];
        }
        let message = message.with_topics(vec![
            dq::TopicData::default()
                .with_topic_name(TopicName(s("__cluster_metadata")))
                .with_partitions(vec![partition]),
        ]);
        (message, endpoints)
    }

    fn describe_quorum_endpoints(m: &DescribeQuorumResponse) -> Vec<Endpoint> {
        m.nodes
            .iter()
            .flat_map(|n| {
                n.listeners
                    .iter()
                    .map(|l| ep(n.node_id.0, &l.host, i32::from(l.port)))
            })
            .collect()
    }

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

    fn all_versions(api: ApiKey) -> std::ops::RangeInclusive<i16> {
        let (min, max) = Kind::of(api as i16).unwrap().versions();
        min..=max
    }

    /// (api, version, frame body) for every version of every address-bearing response.
    fn all_frames() -> Vec<(ApiKey, i16, Bytes)> {
        fn add<T: Encodable>(
            frames: &mut Vec<(ApiKey, i16, Bytes)>,
            api: ApiKey,
            fixture: fn(i16) -> (T, Vec<Endpoint>),
        ) {
            for v in all_versions(api) {
                frames.push((api, v, frame(api, v, &fixture(v).0)));
            }
        }
        let mut frames = Vec::new();
        add(&mut frames, ApiKey::Metadata, metadata);
        add(&mut frames, ApiKey::FindCoordinator, find_coordinator);
        add(&mut frames, ApiKey::DescribeCluster, describe_cluster);
        add(&mut frames, ApiKey::Produce, produce);
        add(&mut frames, ApiKey::Fetch, fetch);
        add(&mut frames, ApiKey::ShareFetch, share_fetch);
        add(&mut frames, ApiKey::ShareAcknowledge, share_acknowledge);
        add(&mut frames, ApiKey::DescribeQuorum, describe_quorum);
        frames
    }

    /// decode -> endpoints -> rewrite -> encode for one fixture, checked against kafka-protocol.
    fn check_roundtrip<T: Encodable + Decodable>(
        api: ApiKey,
        v: i16,
        fixture: fn(i16) -> (T, Vec<Endpoint>),
        extract: fn(&T) -> Vec<Endpoint>,
    ) {
        let ctx = format!("{api:?} v{v}");
        let (message, expected) = fixture(v);
        assert_eq!(extract(&message), expected, "{ctx}: fixture");
        let input = frame(api, v, &message);
        assert_eq!(
            contains(&input, REAL_PREFIX),
            !expected.is_empty(),
            "{ctx}: fixture"
        );

        let mut response = AddressResponse::decode(api as i16, v, input.clone())
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
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
        let output = out.freeze().slice(6..);
        if !expected.is_empty() {
            assert!(
                !contains(&output, REAL_PREFIX),
                "{ctx}: real address leaked"
            );
        }

        let mut buf = output.clone();
        let header = ResponseHeader::decode(&mut buf, api.response_header_version(v)).unwrap();
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
        let mut back = AddressResponse::decode(api as i16, v, output).unwrap();
        assert_eq!(back.rewrite(unadvertise).unwrap(), expected.len(), "{ctx}");
        let mut restored = BytesMut::new();
        back.encode(&mut restored).unwrap();
        assert_eq!(restored, input, "{ctx}: only endpoints may change");
    }

    #[test]
    fn metadata_roundtrip_every_version() {
        for v in all_versions(ApiKey::Metadata) {
            check_roundtrip(ApiKey::Metadata, v, metadata, metadata_endpoints);
        }
    }

    #[test]
    fn find_coordinator_roundtrip_every_version() {
        for v in all_versions(ApiKey::FindCoordinator) {
            check_roundtrip(
                ApiKey::FindCoordinator,
                v,
                find_coordinator,
                find_coordinator_endpoints,
            );
        }
    }

    #[test]
    fn describe_cluster_roundtrip_every_version() {
        for v in all_versions(ApiKey::DescribeCluster) {
            check_roundtrip(
                ApiKey::DescribeCluster,
                v,
                describe_cluster,
                describe_cluster_endpoints,
            );
        }
    }

    #[test]
    fn produce_roundtrip_every_version() {
        assert_eq!(all_versions(ApiKey::Produce), 3..=13);
        for v in all_versions(ApiKey::Produce) {
            check_roundtrip(ApiKey::Produce, v, produce, produce_endpoints);
        }
    }

    #[test]
    fn fetch_roundtrip_every_version() {
        assert_eq!(all_versions(ApiKey::Fetch), 4..=18);
        for v in all_versions(ApiKey::Fetch) {
            check_roundtrip(ApiKey::Fetch, v, fetch, fetch_endpoints);
        }
    }

    #[test]
    fn share_roundtrip_every_version() {
        for v in all_versions(ApiKey::ShareFetch) {
            check_roundtrip(ApiKey::ShareFetch, v, share_fetch, share_fetch_endpoints);
        }
        for v in all_versions(ApiKey::ShareAcknowledge) {
            check_roundtrip(
                ApiKey::ShareAcknowledge,
                v,
                share_acknowledge,
                share_acknowledge_endpoints,
            );
        }
    }

    #[test]
    fn describe_quorum_roundtrip_every_version() {
        for v in all_versions(ApiKey::DescribeQuorum) {
            check_roundtrip(
                ApiKey::DescribeQuorum,
                v,
                describe_quorum,
                describe_quorum_endpoints,
            );
        }
    }

    #[test]
    fn decoded_versions_are_kafka_protocols() {
        let versions: Vec<_> = [
            ApiKey::Metadata,
            ApiKey::FindCoordinator,
            ApiKey::DescribeCluster,
            ApiKey::Produce,
            ApiKey::Fetch,
            ApiKey::ShareFetch,
            ApiKey::ShareAcknowledge,
            ApiKey::DescribeQuorum,
        ]
        .into_iter()
        .map(|api| (api, all_versions(api)))
        .collect();
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
    }

    #[test]
    fn unsupported_versions_and_keys() {
        for (key, version) in [
            (METADATA, 14),
            (METADATA, -1),
            (PRODUCE, 2),
            (PRODUCE, 14),
            (FETCH, 19),
            (SHARE_FETCH, 0),
            (ApiKey::JoinGroup as i16, 5),
            (API_VERSIONS, 3),
            (999, 0),
        ] {
            let err =
                AddressResponse::decode(key, version, Bytes::from_static(&[0; 64])).unwrap_err();
            assert!(
                matches!(err, RewriteError::Unsupported { api_key, version: v } if api_key == key && v == version),
                "{key} v{version}: {err}"
            );
        }
        let err = AddressResponse::decode(METADATA, 14, Bytes::new()).unwrap_err();
        assert_eq!(err.to_string(), "Metadata v14 responses are not rewritable");
    }

    #[test]
    fn find_coordinator_error_carries_no_endpoint() {
        for v in 0..=3 {
            let message = FindCoordinatorResponse::default()
                .with_error_code(15)
                .with_node_id(BrokerId(-1))
                .with_port(-1);
            let message = if v >= 1 {
                message.with_error_message(Some(s("coordinator not available")))
            } else {
                message
            };
            let input = frame(ApiKey::FindCoordinator, v, &message);
            let mut response = AddressResponse::decode(FIND_COORDINATOR, v, input.clone()).unwrap();
            assert_eq!(response.endpoints(), vec![]);
            // A map that knows nothing must not be asked.
            assert_eq!(response.rewrite(|_| None).unwrap(), 0);
            let mut out = BytesMut::new();
            response.encode(&mut out).unwrap();
            assert_eq!(out, input);
        }
    }

    #[test]
    fn unknown_tagged_fields_survive() {
        let header = ResponseHeader::default()
            .with_correlation_id(CORRELATION_ID)
            .with_unknown_tagged_field(5, Bytes::from_static(b"header-tag"));
        for v in 9..=13 {
            let (mut message, _) = metadata(v);
            message.brokers[0]
                .unknown_tagged_fields
                .insert(7, Bytes::from_static(b"broker-tag"));
            message
                .unknown_tagged_fields
                .insert(99, Bytes::from_static(b"top-tag"));
            let input = encode_with_header(&header, 1, &message, v);
            let mut response = AddressResponse::decode(METADATA, v, input.clone()).unwrap();
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
        let (produce_message, _) = produce(10);
        let produce_message =
            produce_message.with_unknown_tagged_field(3, Bytes::from_static(b"p"));
        let (fetch_message, _) = fetch(16);
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
            let response = AddressResponse::decode(key, v, input.clone()).unwrap();
            assert_eq!(response.endpoints().len(), 2);
            let mut out = BytesMut::new();
            response.encode(&mut out).unwrap();
            assert_eq!(out, input, "{} v{v}", api_name(key));
        }
    }

    #[test]
    fn trailing_bytes_are_kept() {
        for v in [12, 13] {
            let (message, _) = metadata(v);
            let mut input = BytesMut::from(&frame(ApiKey::Metadata, v, &message)[..]);
            input.extend_from_slice(&[0]);
            let input = input.freeze();
            let mut response = AddressResponse::decode(METADATA, v, input.clone()).unwrap();
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
        let (message, _) = metadata(12);
        let input = frame(ApiKey::Metadata, 12, &message);
        let mut response = AddressResponse::decode(METADATA, 12, input.clone()).unwrap();
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
    fn describe_quorum_port_must_fit_u16() {
        let (message, _) = describe_quorum(2);
        let input = frame(ApiKey::DescribeQuorum, 2, &message);
        let mut response = AddressResponse::decode(DESCRIBE_QUORUM, 2, input).unwrap();
        let err = response
            .rewrite(|_| {
                Some(Advertised {
                    host: ADVERTISED_HOST.into(),
                    port: 70_000,
                })
            })
            .unwrap_err();
        assert!(matches!(err, RewriteError::Encode { .. }), "{err}");
    }

    #[test]
    fn truncated_responses_fail_to_decode() {
        for (api, v, input) in all_frames() {
            for len in 0..input.len() {
                let result = AddressResponse::decode(api as i16, v, input.slice(..len));
                assert!(
                    matches!(result, Err(RewriteError::Decode { .. })),
                    "{api:?} v{v} truncated to {len} of {} bytes: {result:?}",
                    input.len()
                );
            }
        }
    }

    #[test]
    fn shape_walk_reads_what_kafka_protocol_reads() {
        for (api, v, input) in all_frames() {
            let kind = Kind::of(api as i16).unwrap();
            let header_version = api.response_header_version(v);
            let end = shape::check(&input, header_version, kind.schema(), v)
                .unwrap_or_else(|e| panic!("{api:?} v{v}: {e}"));
            assert_eq!(end, input.len(), "{api:?} v{v}");
        }
    }

    /// Without the shape check kafka-protocol would reserve these counts up front and the
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
        let refused = |result: Result<(), RewriteError>, field: &str| {
            let err = result.unwrap_err();
            assert!(matches!(err, RewriteError::Decode { .. }), "{err}");
            let message = err.to_string();
            assert!(
                message.contains(&format!("{field} claims more entries")),
                "{message}"
            );
        };
        for (key, version, field, body) in cases {
            refused(
                AddressResponse::decode(key, version, Bytes::from(body)).map(|_| ()),
                field,
            );
        }
        let body = [&[1, 2, 3, 4][..], &[0, 0], &[0x7f, 0xff, 0xff, 0xff]].concat();
        let result = rewrite_api_versions(
            0,
            Bytes::from(body),
            BulkPolicy::Cap,
            &[],
            &mut BytesMut::new(),
        );
        refused(result.map(|_| ()), "api_keys");
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
            matches!(result, Err(RewriteError::Decode { .. })),
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
    fn response_needs_rewrite_truth_table() {
        let table = [
            (PRODUCE, 9, false),
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
                    let (min, _) = Kind::of(key).unwrap().versions();
                    let result = AddressResponse::decode(key, version, Bytes::new());
                    if version >= min {
                        assert!(
                            matches!(result, Err(RewriteError::Decode { .. })),
                            "{} v{version} must be decodable: {result:?}",
                            api_name(key)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn api_names() {
        assert_eq!(api_name(0), "Produce");
        assert_eq!(api_name(3), "Metadata");
        assert_eq!(api_name(18), "ApiVersions");
        assert_eq!(api_name(60), "DescribeCluster");
        assert_eq!(api_name(999), "unknown");
        assert_eq!(api_name(-1), "unknown");
        for key in ApiKey::iter() {
            assert_eq!(api_name(key as i16), format!("{key:?}"));
        }
    }

    #[test]
    fn types_cross_tasks() {
        // The forwarder holds an AddressResponse across awaits on a multi-threaded runtime.
        fn check<T: Send + Sync + 'static>() {}
        check::<AddressResponse>();
        check::<RewriteError>();
        check::<ApiVersionsChanges>();
    }

    #[test]
    fn bulk_policy_parses() {
        assert_eq!("cap".parse::<BulkPolicy>(), Ok(BulkPolicy::Cap));
        assert_eq!("Rewrite".parse::<BulkPolicy>(), Ok(BulkPolicy::Rewrite));
        let err = "drop".parse::<BulkPolicy>().unwrap_err();
        assert!(
            err.contains("\"cap\"") && err.contains("\"rewrite\""),
            "{err}"
        );
        assert_eq!(BulkPolicy::default(), BulkPolicy::Cap);
        for policy in [BulkPolicy::Cap, BulkPolicy::Rewrite] {
            assert_eq!(policy.as_str().parse::<BulkPolicy>(), Ok(policy));
            assert_eq!(policy.to_string(), policy.as_str());
        }
    }

    /// Whether kafka-protocol alone decodes header + message.
    fn kafka_protocol_decodes(kind: Kind, version: i16, body: Bytes) -> bool {
        fn ok<T: Decodable>(mut buf: Bytes, header_version: i16, version: i16) -> bool {
            ResponseHeader::decode(&mut buf, header_version).is_ok()
                && T::decode(&mut buf, version).is_ok()
        }
        let hv = kind.api_key().response_header_version(version);
        match kind {
            Kind::Metadata => ok::<MetadataResponse>(body, hv, version),
            Kind::FindCoordinator => ok::<FindCoordinatorResponse>(body, hv, version),
            Kind::DescribeCluster => ok::<DescribeClusterResponse>(body, hv, version),
            Kind::Produce => ok::<ProduceResponse>(body, hv, version),
            Kind::Fetch => ok::<FetchResponse>(body, hv, version),
            Kind::ShareFetch => ok::<ShareFetchResponse>(body, hv, version),
            Kind::ShareAcknowledge => ok::<ShareAcknowledgeResponse>(body, hv, version),
            Kind::DescribeQuorum => ok::<DescribeQuorumResponse>(body, hv, version),
        }
    }

    fn exercise(key: i16, version: i16, body: Bytes) {
        let kind = Kind::of(key).unwrap();
        let header_version = kind.api_key().response_header_version(version);
        let result = AddressResponse::decode(key, version, body.clone());
        match shape::check(&body, header_version, kind.schema(), version) {
            // The walk and kafka-protocol must agree on where the message ends.
            Ok(_) => {
                if let Err(RewriteError::Decode { reason, .. }) = &result {
                    assert!(!reason.contains("schema table"), "{reason}");
                }
            }
            // Never stricter than kafka-protocol, except on counts kafka-protocol would
            // reserve (and which it must not be given).
            Err(e) if !e.is_impossible_count() => {
                assert!(
                    !kafka_protocol_decodes(kind, version, body),
                    "shape walk refused what kafka-protocol decodes: {e}"
                );
            }
            Err(_) => {}
        }
        if let Ok(mut response) = result {
            let endpoints = response.endpoints();
            let mut out = BytesMut::new();
            response.encode(&mut out).unwrap();
            match response.rewrite(advertise) {
                Ok(n) => assert_eq!(n, endpoints.len()),
                // Garbage ports may not fit DescribeQuorum's u16 after mapping.
                Err(RewriteError::Encode { .. }) => return,
                Err(e) => panic!("{e}"),
            }
            let mut out = BytesMut::new();
            response.encode(&mut out).unwrap();
            let again = AddressResponse::decode(key, version, out.freeze()).unwrap();
            assert_eq!(again.endpoints().len(), endpoints.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let body = Bytes::from(body);
            for key in [METADATA, FIND_COORDINATOR, DESCRIBE_CLUSTER, PRODUCE, FETCH, SHARE_FETCH, SHARE_ACKNOWLEDGE, DESCRIBE_QUORUM] {
                let (min, max) = Kind::of(key).unwrap().versions();
                for version in min..=max {
                    exercise(key, version, body.clone());
                }
            }
            for version in -1..=5 {
                let _ = rewrite_api_versions(version, body.clone(), BulkPolicy::Cap, &[], &mut BytesMut::new());
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
            exercise(*api as i16, *version, Bytes::from(body));
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
