#![no_main]
//! `kpsc::kafka::request`: the request header parser and the Produce `acks` finder, on any
//! bytes a client can send. Checked against references: the header against a plain reading
//! of its three fixed fields and kpsc's validity rules; `acks` against kafka-protocol's own
//! decoders of the request header and the string before `acks` (no arrays, so nothing there
//! sizes an allocation from the input): kpsc finds the same value, and finds it in every
//! request that kafka-protocol reads and writes back byte for byte. And `acks` is stable as
//! the prefix grows: once found, more bytes never change it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, RequestHeader as KafkaRequestHeader},
    protocol::{Decodable, Encodable},
};
use kpsc::kafka::request::{Acks, REQUEST_HEADER_FIXED_LEN, RequestHeader, produce_acks};
use libfuzzer_sys::fuzz_target;

/// Longest prefix checked for stability (each check reads the prefix again).
const STABILITY_WINDOW: usize = 512;

fuzz_target!(|body: &[u8]| {
    check_header(body);
    // Any version, as the request path calls the finder for any Produce header it accepted.
    let version = match body {
        [_, _, hi, lo, ..] => i16::from_be_bytes([*hi, *lo]),
        _ => 0,
    };
    if version >= 0 {
        check_acks(body, version);
    }
});

fn check_header(body: &[u8]) {
    let parsed = RequestHeader::parse(body);
    let Some(fixed) = body.first_chunk::<REQUEST_HEADER_FIXED_LEN>() else {
        assert!(parsed.is_err(), "a header needs 8 bytes");
        return;
    };
    let api_key = i16::from_be_bytes([fixed[0], fixed[1]]);
    let api_version = i16::from_be_bytes([fixed[2], fixed[3]]);
    let correlation_id = i32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    let valid = ApiKey::try_from(api_key).is_ok() && api_version >= 0;
    match parsed {
        Ok(header) => {
            assert!(valid, "accepted key {api_key} version {api_version}");
            assert_eq!(
                header,
                RequestHeader {
                    api_key,
                    api_version,
                    correlation_id
                }
            );
        }
        Err(_) => assert!(!valid, "refused key {api_key} version {api_version}"),
    }
}

fn check_acks(body: &[u8], version: i16) {
    let found = produce_acks(body, version);
    if let Some(reading) = kafka_reading(body, version) {
        match &found {
            // Whatever kpsc finds is where kafka-protocol finds it.
            Ok(Acks::Value(acks)) => assert_eq!(*acks, reading.acks),
            // A request kafka-protocol reads and writes back byte for byte is well formed:
            // kpsc must find its acks, unless the header has more tags than kpsc accepts.
            Ok(Acks::NeedMore) => assert!(
                !reading.canonical,
                "needs more bytes for a well-formed request"
            ),
            Err(e) => assert!(
                !reading.canonical || reading.header_tags > 64,
                "refused a well-formed request: {e}"
            ),
        }
    }

    // Stable as the prefix grows.
    let mut answer: Option<Acks> = None;
    for len in 0..=body.len().min(STABILITY_WINDOW) {
        match (produce_acks(&body[..len], version), &answer) {
            (Ok(Acks::NeedMore), None) => {}
            (Ok(Acks::NeedMore), Some(earlier)) => {
                panic!("{earlier:?} at a shorter prefix, then need more at {len}")
            }
            (Ok(value), None) => answer = Some(value),
            (Ok(value), Some(earlier)) => assert_eq!(&value, earlier, "prefix {len}"),
            // An error is final for the request path: nothing more to compare.
            (Err(_), _) => break,
        }
    }
}

/// kafka-protocol's reading of a Produce request up to `acks`.
struct Reading {
    acks: i16,
    /// Re-encoding what was read gives back the same bytes (no overlong varints, tags in
    /// order, ...).
    canonical: bool,
    header_tags: usize,
}

/// Request header (v1, or v2 from Produce v9) with kafka-protocol's decoder, then
/// `transactional_id` (v3+: a nullable string, compact from v9) and `acks` read plainly.
/// Nothing read here sizes an allocation from the input.
fn kafka_reading(body: &[u8], version: i16) -> Option<Reading> {
    let mut buf = Bytes::copy_from_slice(body);
    let header_version = ApiKey::Produce.request_header_version(version);
    let header = KafkaRequestHeader::decode(&mut buf, header_version).ok()?;
    let mut encoded = BytesMut::new();
    header.encode(&mut encoded, header_version).ok()?;
    if version >= 3 {
        let compact = version >= 9;
        let transactional_id = read_nullable_string(&mut buf, compact)?;
        write_nullable_string(&mut encoded, transactional_id.as_deref(), compact);
    }
    if buf.remaining() < 2 {
        return None;
    }
    Some(Reading {
        acks: buf.get_i16(),
        canonical: body.starts_with(&encoded),
        header_tags: header.unknown_tagged_fields.len(),
    })
}

/// int16 length (-1: null), or in flexible versions uvarint length + 1 (0: null).
fn read_nullable_string(buf: &mut Bytes, compact: bool) -> Option<Option<Bytes>> {
    let len = if compact {
        match read_uvarint(buf)? {
            0 => return Some(None),
            n => n as usize - 1,
        }
    } else {
        if buf.remaining() < 2 {
            return None;
        }
        match buf.get_i16() {
            -1 => return Some(None),
            n => usize::try_from(n).ok()?,
        }
    };
    (buf.remaining() >= len).then(|| Some(buf.split_to(len)))
}

fn write_nullable_string(out: &mut BytesMut, value: Option<&[u8]>, compact: bool) {
    match (value, compact) {
        (None, true) => out.put_u8(0),
        (None, false) => out.put_i16(-1),
        (Some(s), true) => {
            let mut n = s.len() as u32 + 1;
            while n >= 0x80 {
                out.put_u8(n as u8 | 0x80);
                n >>= 7;
            }
            out.put_u8(n as u8);
            out.put_slice(s);
        }
        (Some(s), false) => {
            out.put_i16(s.len() as i16);
            out.put_slice(s);
        }
    }
}

/// kafka-protocol's reading: at most five bytes.
fn read_uvarint(buf: &mut Bytes) -> Option<u32> {
    let mut value = 0u32;
    for i in 0..5 {
        if !buf.has_remaining() {
            return None;
        }
        let byte = buf.get_u8();
        value |= u32::from(byte & 0x7f) << (i * 7);
        if byte < 0x80 {
            break;
        }
    }
    Some(value)
}
