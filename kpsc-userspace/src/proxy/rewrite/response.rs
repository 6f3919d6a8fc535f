//! A decoded address-bearing response: its endpoints, the rewrite that replaces them, and
//! the re-encoding that keeps everything else (unknown tagged fields, bytes after the
//! schema's last field) verbatim.

use bytes::{Bytes, BytesMut};
use kafka_protocol::{messages::ResponseHeader, protocol::StrBytes};

use crate::{
    kafka::{
        guarded::{self, CodecError},
        layout,
    },
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
    /// Opaque strings that were not UTF-8: (index among the API's opaque string spans,
    /// original bytes), masked for kafka-protocol and put back when encoding.
    masked: Vec<(usize, Bytes)>,
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
                    .map_err(|e| CodecError::Decode {
                        api: api.name(),
                        version,
                        reason: e.to_string(),
                    })?;
            if let Some(without) = without {
                body = Bytes::from(without);
                stripped_hidden = true;
            }
        }
        let (body, masked) = mask_opaque_strings(api, header_version, version, body)?;
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
            masked,
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
                return Err(CodecError::Encode {
                    api,
                    version,
                    reason: format!(
                        "advertised port {} for broker {} does not fit the response's port field",
                        advertised.port, endpoint.node_id
                    ),
                }
                .into());
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
        let start = out.len();
        guarded::encode_response(
            self.api.key as i16,
            self.header_version,
            self.version,
            &self.header,
            self.message.as_ref(),
            &self.trailing,
            out,
        )?;
        if !self.masked.is_empty() {
            self.unmask(&mut out[start..])
                .inspect_err(|_| out.truncate(start))?;
        }
        Ok(())
    }

    /// Puts the original bytes of masked opaque strings back into an encoded body: the
    /// rewrite never touches them, so each has the same length and position in order.
    fn unmask(&self, body: &mut [u8]) -> Result<(), RewriteError> {
        let error = |reason: String| CodecError::Encode {
            api: self.api.name(),
            version: self.version,
            reason,
        };
        let spans = layout::string_spans(
            body,
            self.header_version,
            self.api.schema,
            self.version,
            self.api.opaque_strings,
        )
        .map_err(|e| error(e.to_string()))?;
        for (index, original) in &self.masked {
            let span = spans
                .get(*index)
                .filter(|span| span.len() == original.len())
                .ok_or_else(|| error("an opaque string moved while rewriting".into()))?;
            body[span.clone()].copy_from_slice(original);
        }
        Ok(())
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

/// Replaces the bytes of opaque strings that are not UTF-8 with `?` of the same length, so
/// kafka-protocol decodes the response; returns the body to decode and what was masked.
fn mask_opaque_strings(
    api: &AddressApi,
    header_version: i16,
    version: i16,
    body: Bytes,
) -> Result<(Bytes, Vec<(usize, Bytes)>), RewriteError> {
    if api.opaque_strings.is_empty() {
        return Ok((body, Vec::new()));
    }
    let spans = layout::string_spans(
        &body,
        header_version,
        api.schema,
        version,
        api.opaque_strings,
    )
    .map_err(|e| CodecError::Decode {
        api: api.name(),
        version,
        reason: e.to_string(),
    })?;
    let masked: Vec<(usize, Bytes)> = spans
        .iter()
        .enumerate()
        .filter(|(_, span)| std::str::from_utf8(&body[(*span).clone()]).is_err())
        .map(|(index, span)| (index, body.slice(span.clone())))
        .collect();
    if masked.is_empty() {
        return Ok((body, masked));
    }
    let mut copy = body.to_vec();
    for (index, _) in &masked {
        copy[spans[*index].clone()].fill(b'?');
    }
    Ok((Bytes::from(copy), masked))
}
