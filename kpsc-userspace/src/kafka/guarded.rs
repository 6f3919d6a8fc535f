//! Guarded decoding: every response body that came from a broker is walked by the layout
//! walker before kafka-protocol sees it (see `layout` for why), and re-encoded with its
//! unknown tagged fields and any bytes after the schema's last field kept verbatim.

use std::fmt;

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::ResponseHeader,
    protocol::{Decodable, Encodable},
};

use crate::kafka::{layout, names::api_name};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
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
}

/// A decoded response frame body: header, message, and the bytes after the message.
pub struct Frame<T> {
    pub header: ResponseHeader,
    pub message: T,
    pub trailing: Bytes,
}

/// A message body that can be encoded behind a trait object (kafka-protocol's `Encodable`
/// has generic methods, so it cannot be one).
pub trait EncodeBody {
    fn body_size(&self, version: i16) -> Result<usize, String>;
    fn encode_body(&self, out: &mut BytesMut, version: i16) -> Result<(), String>;
}

impl<T: Encodable> EncodeBody for T {
    fn body_size(&self, version: i16) -> Result<usize, String> {
        self.compute_size(version).map_err(reason)
    }

    fn encode_body(&self, out: &mut BytesMut, version: i16) -> Result<(), String> {
        self.encode(out, version).map_err(reason)
    }
}

/// Decodes a response body (after the size prefix, starting with the response header),
/// refusing any layout kafka-protocol could not decode without an unbounded allocation.
pub fn decode_response<T: Decodable>(
    api_key: i16,
    header_version: i16,
    version: i16,
    schema: &layout::Schema,
    body: Bytes,
) -> Result<Frame<T>, CodecError> {
    let error = |reason: String| CodecError::Decode {
        api: api_name(api_key),
        version,
        reason,
    };
    // Must run before kafka-protocol sees the bytes.
    let end =
        layout::check(&body, header_version, schema, version).map_err(|e| error(e.to_string()))?;
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

/// Appends header + message + trailing bytes (no size prefix) to `out`; on error `out` is
/// left as it was.
pub fn encode_response(
    api_key: i16,
    header_version: i16,
    version: i16,
    header: &ResponseHeader,
    message: &dyn EncodeBody,
    trailing: &Bytes,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let start = out.len();
    let result = (|| -> Result<(), String> {
        // Size first so large Fetch records are copied into `out` once, without regrowth.
        let size =
            header.compute_size(header_version).map_err(reason)? + message.body_size(version)?;
        out.reserve(size + trailing.len());
        header.encode(out, header_version).map_err(reason)?;
        message.encode_body(out, version)?;
        out.extend_from_slice(trailing);
        Ok(())
    })();
    result.map_err(|reason| {
        out.truncate(start);
        CodecError::Encode {
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
