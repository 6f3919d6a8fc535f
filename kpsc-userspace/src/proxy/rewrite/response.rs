//! A decoded address-bearing response: its endpoints, the rewrite that replaces them, and
//! the re-encoding that keeps everything else (unknown tagged fields, bytes after the
//! schema's last field) verbatim.

use bytes::{Bytes, BytesMut};
use kafka_protocol::{messages::ResponseHeader, protocol::StrBytes};

use crate::{
    kafka::{guarded, layout},
    proxy::rewrite::declaration::{
        AddressApi, AddressMessage, Advertised, Endpoint, RewriteError, Slot,
    },
};

/// Header + message + trailing bytes of one response, decoded.
#[derive(Debug)]
pub struct AddressResponse {
    api: &'static AddressApi,
    version: i16,
    header_version: i16,
    header: ResponseHeader,
    message: Box<dyn AddressMessage>,
    trailing: Bytes,
    stripped_hidden: bool,
}

impl AddressResponse {
    /// Decodes `body`, the frame body after the 4-byte size (it starts with the response
    /// header), as a response of `api` version `version`.
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
        let mut stripped_hidden = false;
        let mut body = body;
        if let Some(tag) = api.hidden_tag.filter(|_| version < api.addresses_since) {
            let without =
                layout::without_top_level_tag(&body, header_version, api.schema, version, tag)
                    .map_err(|e| RewriteError::Decode {
                        api: api.name(),
                        version,
                        reason: e.to_string(),
                    })?;
            if let Some(without) = without {
                body = Bytes::from(without);
                stripped_hidden = true;
            }
        }
        let decoded =
            api.codec
                .decode(api.key as i16, header_version, version, api.schema, body)?;
        Ok(Self {
            api,
            version,
            header_version,
            header: decoded.header,
            message: decoded.message,
            trailing: decoded.trailing,
            stripped_hidden,
        })
    }

    pub fn correlation_id(&self) -> i32 {
        self.header.correlation_id
    }

    /// Every endpoint the response carries, in wire order. Entries with an empty host are
    /// not addresses (e.g. FindCoordinator errors report node -1, host "", port -1) and are
    /// neither listed nor rewritten.
    pub fn endpoints(&mut self) -> Vec<Endpoint> {
        self.slots().iter().map(Slot::endpoint).collect()
    }

    /// Replaces each endpoint's host/port with what `map` returns; returns how many were
    /// rewritten.
    ///
    /// If `map` returns `None` for any endpoint the result is [`RewriteError::Unmapped`] and
    /// the response is left untouched (all endpoints are mapped before any is replaced).
    pub fn rewrite(
        &mut self,
        mut map: impl FnMut(&Endpoint) -> Option<Advertised>,
    ) -> Result<usize, RewriteError> {
        let api = self.api.name();
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

    /// Appends header + message + trailing bytes (no size prefix) to `out`; on error `out`
    /// is left as it was.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), RewriteError> {
        guarded::encode_response(
            self.api.key as i16,
            self.header_version,
            self.version,
            &self.header,
            self.message.as_ref(),
            &self.trailing,
            out,
        )
        .map_err(RewriteError::from)
    }

    /// Whether the response carried the API's address tag outside its version's schema
    /// (`AddressApi::hidden_tag`) and lost it.
    pub fn stripped_hidden(&self) -> bool {
        self.stripped_hidden
    }

    fn slots(&mut self) -> Vec<Slot<'_>> {
        let mut slots = self.message.slots();
        slots.retain(|slot| !slot.host.is_empty());
        slots
    }
}
