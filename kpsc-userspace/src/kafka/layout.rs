//! The layout walker: a wire-shape pre-check run before kafka-protocol decodes anything
//! that came from a broker or a client.
//!
//! Why it exists: kafka-protocol 0.18 sizes `Vec::with_capacity` from array counts read off
//! the wire before it decodes a single element, so a few bytes claiming 2^31 entries make it
//! request hundreds of GB, and a failed allocation aborts the whole process (it is not a
//! panic that could be caught). Walking the same schema first and refusing any count whose
//! entries cannot fit in the remaining bytes bounds every allocation by the frame size.
//! When kafka-protocol bounds its reservations itself, this file and the schema tables
//! beside each API can go.
//!
//! The tables (declared with each API under `proxy/rewrite/apis/`) mirror kafka-protocol's
//! generated decoders (Kafka 4.1 schemas) field by field; the walk must read exactly what
//! kafka-protocol reads, which `kafka::guarded` verifies on every decode.

use std::{fmt, ops::Range};

#[derive(Clone, Copy, Debug)]
pub enum Ty {
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
pub struct Field {
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
#[derive(Debug)]
pub struct Schema {
    pub flexible_from: i16,
    pub fields: &'static [Field],
}

pub const I8: Ty = Ty::Fixed(1);
pub const I16: Ty = Ty::Fixed(2);
pub const U16: Ty = Ty::Fixed(2);
pub const I32: Ty = Ty::Fixed(4);
pub const I64: Ty = Ty::Fixed(8);
pub const BOOL: Ty = Ty::Fixed(1);
pub const UUID: Ty = Ty::Fixed(16);
pub const STR: Ty = Ty::Str;
pub const BYTES: Ty = Ty::Bytes;
pub const BROKER_IDS: Ty = Ty::FixedArray(4);

pub const fn all(name: &'static str, ty: Ty) -> Field {
    between(0, i16::MAX, name, ty)
}
pub const fn since(min: i16, name: &'static str, ty: Ty) -> Field {
    between(min, i16::MAX, name, ty)
}
pub const fn until(max: i16, name: &'static str, ty: Ty) -> Field {
    between(0, max, name, ty)
}
pub const fn between(min: i16, max: i16, name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        min,
        max,
        tag: None,
    }
}
pub const fn tagged(tag: u32, min: i16, name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        min,
        max: i16::MAX,
        tag: Some(tag),
    }
}

const HEADER: &[Field] = &[all("correlation_id", I32)];

#[derive(Debug)]
pub struct ShapeError {
    at: usize,
    field: &'static str,
    problem: &'static str,
}

impl ShapeError {
    /// The count check kafka-protocol lacks failed: kafka-protocol must not see this input.
    #[cfg(test)]
    pub fn is_impossible_count(&self) -> bool {
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
pub fn check(
    body: &[u8],
    header_version: i16,
    schema: &Schema,
    version: i16,
) -> Result<usize, ShapeError> {
    let mut walker = Walker::after_header(body, header_version, schema, version)?;
    walker.fields(schema.fields)?;
    Ok(walker.pos)
}

/// Where the contents of every string field named in `names` lie in `body`, in wire
/// order (a null string is an empty span).
pub fn string_spans(
    body: &[u8],
    header_version: i16,
    schema: &Schema,
    version: i16,
    names: &'static [&'static str],
) -> Result<Vec<Range<usize>>, ShapeError> {
    let mut walker = Walker::after_header(body, header_version, schema, version)?;
    walker.strings = Some((names, Vec::new()));
    walker.fields(schema.fields)?;
    Ok(walker.strings.map(|(_, spans)| spans).unwrap_or_default())
}

/// `body` without the top-level tagged field `tag`, or `None` when the body has no such
/// field. A response of a version whose schema does not have `tag` may still carry it (a
/// broker reusing a later version's encoding), and clients that read it regardless would
/// follow what it says; removing it from the bytes keeps every other field verbatim.
pub fn without_top_level_tag(
    body: &[u8],
    header_version: i16,
    schema: &Schema,
    version: i16,
    tag: u32,
) -> Result<Option<Vec<u8>>, ShapeError> {
    if version < schema.flexible_from {
        return Ok(None);
    }
    let mut walker = Walker::after_header(body, header_version, schema, version)?;
    for field in schema
        .fields
        .iter()
        .filter(|f| f.tag.is_none() && f.present(version))
    {
        walker.value(field.ty, field.name)?;
    }
    let section = walker.pos;
    let count = walker.uvarint("tagged field count")?;
    let mut kept = Vec::new();
    let mut found = false;
    for _ in 0..count {
        let start = walker.pos;
        let this = walker.tag()?;
        let size = walker.uvarint("tagged field size")?;
        match schema
            .fields
            .iter()
            .find(|f| f.tag == Some(this) && f.present(version))
        {
            Some(field) => walker.value(field.ty, field.name)?,
            None => walker.skip(size as usize, "unknown tagged field")?,
        }
        if this == tag {
            found = true;
        } else {
            kept.push(start..walker.pos);
        }
    }
    if !found {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..section]);
    // Every field numbered `tag` is gone, however many the broker sent.
    put_uvarint(&mut out, kept.len() as u32);
    for span in kept {
        out.extend_from_slice(&body[span]);
    }
    out.extend_from_slice(&body[walker.pos..]);
    Ok(Some(out))
}

fn put_uvarint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

struct Walker<'a> {
    buf: &'a [u8],
    pos: usize,
    version: i16,
    flexible: bool,
    /// String fields whose content spans to record, and the spans recorded.
    strings: Option<(&'a [&'static str], Vec<Range<usize>>)>,
}

impl<'a> Walker<'a> {
    /// A walker positioned after the response header (correlation id, and tagged fields
    /// in header v1), set for the message's own encoding.
    fn after_header(
        body: &'a [u8],
        header_version: i16,
        schema: &Schema,
        version: i16,
    ) -> Result<Self, ShapeError> {
        let mut walker = Walker {
            buf: body,
            pos: 0,
            version,
            flexible: header_version >= 1,
            strings: None,
        };
        walker.fields(HEADER)?;
        walker.flexible = version >= schema.flexible_from;
        Ok(walker)
    }

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

    /// A tagged field's tag. kafka-protocol keeps unknown tags as `i32` keys and does not
    /// write negative ones back although it counts them, so a tag of 2^31 or more would
    /// come out as a response claiming a field it does not hold: refused here.
    fn tag(&mut self) -> Result<u32, ShapeError> {
        let tag = self.uvarint("tagged field tag")?;
        if i32::try_from(tag).is_err() {
            return Err(self.fail("tagged field tag", "is 2^31 or more"));
        }
        Ok(tag)
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
                let tag = self.tag()?;
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
                let start = self.pos;
                self.skip(len, name)?;
                if let Some((names, spans)) = &mut self.strings
                    && names.contains(&name)
                {
                    spans.push(start..self.pos);
                }
                Ok(())
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

/// Test support: a table must list exactly the fields kafka-protocol encodes in each version.
/// A default-valued struct encodes to its minimum size (empty strings and arrays, omitted
/// tagged fields), so the two sizes agree only if presence, widths and flexibility do.
#[cfg(test)]
pub fn assert_min_size_matches<T: kafka_protocol::protocol::Encodable + Default>(
    name: &str,
    fields: &[Field],
    flexible_from: i16,
    versions: std::ops::RangeInclusive<i16>,
) {
    for v in versions {
        assert_eq!(
            min_size(fields, v, v >= flexible_from),
            T::default().compute_size(v).unwrap(),
            "{name} v{v}"
        );
    }
}
