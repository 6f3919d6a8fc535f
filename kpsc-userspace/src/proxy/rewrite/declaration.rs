//! What declaring an address-bearing API takes: its key, the versions kpsc decodes, from
//! which version its responses carry addresses, and its layout table for the walker, which
//! also marks where the addresses are (`layout::NODE_ID`, `HOST`, `PORT`). Dispatch, the
//! endpoint list, the rewrite and the ApiVersions caps are all derived from that one
//! declaration.

#[cfg(test)]
use bytes::Bytes;
use kafka_protocol::{
    messages::ApiKey,
    protocol::{Decodable, Message},
};

use crate::kafka::{guarded::CodecError, layout::Schema, names::api_name};

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
    /// The response could not be decoded or encoded (layout walk, kafka-protocol).
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("no advertised address for broker {node_id} at {host}:{port}")]
    Unmapped {
        node_id: i32,
        host: String,
        port: i32,
    },
    #[error("{} v{version} responses are not rewritable", api_name(*.api_key))]
    Unsupported { api_key: i16, version: i16 },
}

/// One address-bearing API. Each lives in its own file under `apis/` as a `static API`.
#[derive(Debug)]
pub struct AddressApi {
    pub key: ApiKey,
    /// First version whose responses can carry broker addresses (0: every version).
    pub addresses_since: i16,
    /// First version whose responses kpsc decodes and checks: `addresses_since`, or an
    /// earlier version where a broker could still put addresses into a tagged field the
    /// version's schema does not have (`hidden_tag`).
    pub inspect_from: i16,
    /// The top-level tag that carries addresses from `addresses_since` on. A response of
    /// an earlier version that carries it anyway loses it before decoding: clients that
    /// read it regardless would follow real addresses.
    pub hidden_tag: Option<u32>,
    /// Under `--bulk-policy cap` the version is capped below `addresses_since`, so the
    /// responses (the bulk of the traffic) never carry addresses and pass opaquely.
    pub capped_by_bulk_policy: bool,
    /// The message's layout for the walker (see `kafka::layout`).
    pub schema: &'static Schema,
    pub codec: Codec,
    /// Test fixture: a response body (header included) of version `v` with every field the
    /// version has set, so walks and round trips cover all of them.
    #[cfg(test)]
    pub fixture: fn(i16) -> Bytes,
}

impl AddressApi {
    /// An API whose responses carry addresses in every version, with nothing hidden or
    /// opaque: what most declarations are. Others override fields with `..`.
    pub const fn every_version(key: ApiKey, schema: &'static Schema, codec: Codec) -> Self {
        Self {
            key,
            addresses_since: 0,
            inspect_from: 0,
            hidden_tag: None,
            capped_by_bulk_policy: false,
            schema,
            codec,
            #[cfg(test)]
            fixture: no_fixture,
        }
    }

    /// Versions kpsc decodes: everything kafka-protocol supports for the message.
    pub fn versions(&self) -> std::ops::RangeInclusive<i16> {
        self.codec.min_version..=self.codec.max_version
    }

    pub fn name(&self) -> &'static str {
        api_name(self.key as i16)
    }
}

#[cfg(test)]
fn no_fixture(_: i16) -> Bytes {
    panic!("every address-bearing API declares a fixture")
}

/// The kafka-protocol message type of an API: the versions it decodes, and in tests the
/// oracle the layout walk is checked against.
#[derive(Debug)]
pub struct Codec {
    pub min_version: i16,
    pub max_version: i16,
    /// Where kafka-protocol alone (no layout walk) ends header + message, if it decodes
    /// them: the walker must read the same, and never be stricter except on counts
    /// kafka-protocol must not be given.
    #[cfg(test)]
    pub unguarded_end: fn(i16, i16, Bytes) -> Option<usize>,
}

impl Codec {
    pub const fn of<M: Decodable + Message>() -> Self {
        Self {
            min_version: M::VERSIONS.min,
            max_version: M::VERSIONS.max,
            #[cfg(test)]
            unguarded_end: unguarded_end::<M>,
        }
    }
}

#[cfg(test)]
fn unguarded_end<M: Decodable>(header_version: i16, version: i16, body: Bytes) -> Option<usize> {
    use kafka_protocol::messages::ResponseHeader;
    let mut buf = body.clone();
    ResponseHeader::decode(&mut buf, header_version).ok()?;
    M::decode(&mut buf, version).ok()?;
    Some(body.len() - buf.len())
}
