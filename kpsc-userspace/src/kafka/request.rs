//! The request header, as far as the proxy reads it: `api_key int16, api_version int16,
//! correlation_id int32, client_id nullable string` (+ tagged fields in header v2), and
//! the `acks` of a Produce request, because `acks=0` means the broker sends no response
//! and the proxy must not wait for one. Nothing else of a request is parsed.

use kafka_protocol::messages::ApiKey;

use crate::kafka::frame::FrameError;

/// api_key + api_version + correlation_id.
pub const REQUEST_HEADER_FIXED_LEN: usize = 8;

/// The part of a request header the proxy needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

impl RequestHeader {
    /// Parses the first 8 bytes of a request body.
    pub fn parse(body: &[u8]) -> Result<Self, FrameError> {
        if body.len() < REQUEST_HEADER_FIXED_LEN {
            return Err(FrameError::BadHeader("shorter than 8 bytes".into()));
        }
        let api_key = i16::from_be_bytes([body[0], body[1]]);
        let api_version = i16::from_be_bytes([body[2], body[3]]);
        let correlation_id = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
        if ApiKey::try_from(api_key).is_err() {
            return Err(FrameError::BadHeader(format!("unknown api key {api_key}")));
        }
        if api_version < 0 {
            return Err(FrameError::BadHeader(format!(
                "negative api version {api_version}"
            )));
        }
        Ok(Self {
            api_key,
            api_version,
            correlation_id,
        })
    }
}

/// Result of looking for `acks` in a Produce request prefix.
#[derive(Debug, PartialEq, Eq)]
pub enum Acks {
    Value(i16),
    /// The prefix is too short; look again with more bytes.
    NeedMore,
}

/// Finds `acks` in a Produce request body prefix (header + start of the message).
pub fn produce_acks(body: &[u8], api_version: i16) -> Result<Acks, FrameError> {
    let mut cur = Cursor {
        buf: body,
        pos: REQUEST_HEADER_FIXED_LEN,
    };
    let parse = |cur: &mut Cursor| -> Option<Result<i16, FrameError>> {
        // client_id: int16-length nullable string, never compact (even in header v2).
        let len = cur.i16()?;
        if len > 0 {
            cur.skip(len as usize)?;
        }
        if ApiKey::Produce.request_header_version(api_version) >= 2
            && let Err(e) = cur.skip_tagged_fields()?
        {
            return Some(Err(e));
        }
        if api_version >= 3 {
            // transactional_id: nullable string, compact from v9 (flexible).
            if api_version >= 9 {
                let len = cur.uvarint()?;
                if len > 1 {
                    cur.skip(len as usize - 1)?;
                }
            } else {
                let len = cur.i16()?;
                if len > 0 {
                    cur.skip(len as usize)?;
                }
            }
        }
        Some(Ok(cur.i16()?))
    };
    match parse(&mut cur) {
        None => Ok(Acks::NeedMore),
        Some(Ok(acks)) => Ok(Acks::Value(acks)),
        Some(Err(e)) => Err(e),
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn uvarint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..35).step_by(7) {
            let b = *self.take(1)?.first()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        // Longer than 5 bytes: not a valid u32 varint. Treat as a huge length so the
        // caller reports NeedMore and the frame limit rejects it.
        Some(u64::MAX >> 1)
    }
    fn skip_tagged_fields(&mut self) -> Option<Result<(), FrameError>> {
        let count = self.uvarint()?;
        if count > 64 {
            return Some(Err(FrameError::BadHeader(format!(
                "{count} tagged fields in a request header"
            ))));
        }
        for _ in 0..count {
            self.uvarint()?; // tag
            let len = self.uvarint()?;
            self.skip(usize::try_from(len).ok()?)?;
        }
        Some(Ok(()))
    }
}

/// Encodes a request kpscd sends itself (discovery, SASL): header and body, ready for
/// `write_frame`.
pub fn encode_request<Req>(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    client_id: &'static str,
    request: &Req,
) -> anyhow::Result<bytes::BytesMut>
where
    Req: kafka_protocol::protocol::Encodable + kafka_protocol::protocol::HeaderVersion,
{
    use kafka_protocol::protocol::Encodable as _;
    let header = kafka_protocol::messages::RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(kafka_protocol::protocol::StrBytes::from_static_str(
            client_id,
        )));
    let mut buf = bytes::BytesMut::new();
    header.encode(&mut buf, Req::header_version(version))?;
    request.encode(&mut buf, version)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce_prefix(version: i16, client_id: &str, txn: Option<&str>, acks: i16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&version.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        b.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
        b.extend_from_slice(client_id.as_bytes());
        if version >= 9 {
            b.push(0); // no header tagged fields
            match txn {
                None => b.push(0),
                Some(t) => {
                    b.push(t.len() as u8 + 1);
                    b.extend_from_slice(t.as_bytes());
                }
            }
        } else if version >= 3 {
            match txn {
                None => b.extend_from_slice(&(-1i16).to_be_bytes()),
                Some(t) => {
                    b.extend_from_slice(&(t.len() as i16).to_be_bytes());
                    b.extend_from_slice(t.as_bytes());
                }
            }
        }
        b.extend_from_slice(&acks.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0x75, 0x30]); // timeout
        b
    }

    #[test]
    fn finds_acks_in_every_produce_version() {
        for version in 0..=13 {
            for txn in [None, Some("txn-1")] {
                for acks in [-1, 0, 1] {
                    let b = produce_prefix(version, "rdkafka", txn, acks);
                    assert_eq!(
                        produce_acks(&b, version).unwrap(),
                        Acks::Value(acks),
                        "v{version} txn {txn:?}"
                    );
                    assert_eq!(
                        produce_acks(&b[..b.len() - 5], version).unwrap(),
                        Acks::NeedMore
                    );
                }
            }
        }
    }

    #[test]
    fn header_rejects_garbage() {
        assert!(RequestHeader::parse(&[0, 3, 0, 12, 0, 0, 0, 1]).is_ok());
        assert!(RequestHeader::parse(&[0x7f, 0x7f, 0, 1, 0, 0, 0, 1]).is_err());
        assert!(RequestHeader::parse(&[0, 3, 0xff, 0xff, 0, 0, 0, 1]).is_err());
        assert!(RequestHeader::parse(&[0, 3]).is_err());
    }
}
