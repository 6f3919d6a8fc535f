//! What declaring an address-bearing API takes: its key, the versions kpsc decodes, from
//! which version its responses carry addresses, its layout table for the walker, and where
//! in the decoded message the addresses are (`Addresses::slots`). Dispatch, the endpoint
//! list, the rewrite and the ApiVersions caps are all derived from that one declaration.

use std::fmt;

use bytes::Bytes;
use kafka_protocol::{
    messages::{ApiKey, ResponseHeader},
    protocol::{Decodable, Encodable, Message, StrBytes},
};

use crate::kafka::{
    guarded::{self, CodecError, EncodeBody},
    layout::Schema,
    names::api_name,
};

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
    /// String fields passed through byte for byte: a client may put any bytes there (the
    /// group or transactional id FindCoordinator echoes), which kafka-protocol's UTF-8
    /// check would refuse although only the addresses need rewriting.
    pub opaque_strings: &'static [&'static str],
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
            opaque_strings: &[],
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

/// The decoded message behind a trait object, with its header and trailing bytes.
pub struct Decoded {
    pub header: ResponseHeader,
    pub message: Box<dyn AddressMessage>,
    pub trailing: Bytes,
}

type DecodeFn = fn(i16, i16, i16, &Schema, Bytes) -> Result<Decoded, CodecError>;

/// The kafka-protocol message type of an API, reduced to what dispatch needs.
#[derive(Debug)]
pub struct Codec {
    pub min_version: i16,
    pub max_version: i16,
    decode: DecodeFn,
    /// Whether kafka-protocol alone (no layout walk) decodes header + message: the walker
    /// must never be stricter, except on counts kafka-protocol must not be given.
    #[cfg(test)]
    pub decodes_unguarded: fn(i16, i16, Bytes) -> bool,
}

impl Codec {
    pub const fn of<M>() -> Self
    where
        M: Addresses + Decodable + Encodable + Message + Send + Sync + fmt::Debug + 'static,
    {
        Self {
            min_version: M::VERSIONS.min,
            max_version: M::VERSIONS.max,
            decode: decode_boxed::<M>,
            #[cfg(test)]
            decodes_unguarded: decodes_unguarded::<M>,
        }
    }

    /// Guarded decode of a response body (header included).
    pub fn decode(
        &self,
        api_key: i16,
        header_version: i16,
        version: i16,
        schema: &Schema,
        body: Bytes,
    ) -> Result<Decoded, CodecError> {
        (self.decode)(api_key, header_version, version, schema, body)
    }
}

fn decode_boxed<M>(
    api_key: i16,
    header_version: i16,
    version: i16,
    schema: &Schema,
    body: Bytes,
) -> Result<Decoded, CodecError>
where
    M: Addresses + Decodable + Encodable + Message + Send + Sync + fmt::Debug + 'static,
{
    let frame = guarded::decode_response::<M>(api_key, header_version, version, schema, body)?;
    Ok(Decoded {
        header: frame.header,
        message: Box::new(frame.message),
        trailing: frame.trailing,
    })
}

#[cfg(test)]
fn decodes_unguarded<M: Decodable>(header_version: i16, version: i16, mut body: Bytes) -> bool {
    ResponseHeader::decode(&mut body, header_version).is_ok()
        && M::decode(&mut body, version).is_ok()
}

/// Where a message's broker addresses are. Implemented once per address-bearing message.
pub trait Addresses {
    /// Mutable views of every endpoint, in wire order. Entries with an empty host are not
    /// addresses (e.g. FindCoordinator errors report node -1, host "", port -1) and are
    /// dropped by the caller.
    fn slots(&mut self) -> Vec<Slot<'_>>;
}

/// A decoded address-bearing message: its endpoints and its encoding.
pub trait AddressMessage: EncodeBody + Send + Sync + fmt::Debug {
    fn slots(&mut self) -> Vec<Slot<'_>>;
}

impl<M: Addresses + Encodable + Send + Sync + fmt::Debug> AddressMessage for M {
    fn slots(&mut self) -> Vec<Slot<'_>> {
        Addresses::slots(self)
    }
}

/// One endpoint inside a decoded response, borrowed for rewriting.
pub struct Slot<'a> {
    pub node_id: i32,
    pub host: &'a mut StrBytes,
    pub port: Port<'a>,
}

impl<'a> Slot<'a> {
    pub fn new(node_id: i32, host: &'a mut StrBytes, port: Port<'a>) -> Self {
        Self {
            node_id,
            host,
            port,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            node_id: self.node_id,
            host: self.host.to_string(),
            port: self.port.get(),
        }
    }
}

/// Port fields are int32 everywhere except DescribeQuorum's listeners (uint16).
pub enum Port<'a> {
    I32(&'a mut i32),
    U16(&'a mut u16),
}

impl Port<'_> {
    pub fn get(&self) -> i32 {
        match self {
            Port::I32(port) => **port,
            Port::U16(port) => i32::from(**port),
        }
    }

    pub fn fits(&self, port: i32) -> bool {
        match self {
            Port::I32(_) => true,
            Port::U16(_) => u16::try_from(port).is_ok(),
        }
    }

    /// Stores `port`; callers check [`Self::fits`] first.
    pub fn set(&mut self, port: i32) {
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
