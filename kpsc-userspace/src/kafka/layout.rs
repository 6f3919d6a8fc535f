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
//!
//! The same walk rewrites broker addresses in place (`visit_endpoints`, `rewritten_len`,
//! `rewrite`): the tables mark where an endpoint's node id, host and port are, and every
//! other byte is copied verbatim. Decoding a whole response with kafka-protocol to change
//! a few hosts cost 5-8 times the frame in memory (many small structs per partition); the
//! walk needs the frame and the output, nothing per partition.

use std::{fmt, ops::Range};

use bytes::{BufMut, BytesMut};

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
    /// int32 broker id of the endpoint whose host and port follow (in this struct or in
    /// an array inside it).
    NodeId,
    /// String: an endpoint's host.
    Host,
    /// The port after an endpoint's host: int32, or uint16 (DescribeQuorum's listeners).
    Port(usize),
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
pub const NODE_ID: Ty = Ty::NodeId;
pub const HOST: Ty = Ty::Host;
pub const PORT: Ty = Ty::Port(4);
pub const PORT16: Ty = Ty::Port(2);

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
    /// One of the checks kafka-protocol lacks failed (an impossible count it would reserve,
    /// a tag it would count but not write back): kafka-protocol must not see this input.
    #[cfg(test)]
    pub fn guards_kafka_protocol(&self) -> bool {
        self.problem == IMPOSSIBLE_COUNT || self.problem == TAG_TOO_LARGE
    }
}

const IMPOSSIBLE_COUNT: &str = "claims more entries than the remaining bytes hold";
const TAG_TOO_LARGE: &str = "is 2^31 or more";

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

fn put_uvarint(out: &mut impl BufMut, mut value: u32) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

fn uvarint_len(value: u32) -> usize {
    match value {
        0..0x80 => 1,
        0x80..0x4000 => 2,
        0x4000..0x20_0000 => 3,
        0x20_0000..0x1000_0000 => 4,
        _ => 5,
    }
}

/// Told every endpoint a response carries, in wire order. Endpoints with an empty (or
/// null) host name no broker (FindCoordinator's "no coordinator": node -1, host "") and
/// are not reported.
pub trait EndpointSink {
    /// An error refuses the response; it reads as "host <problem>".
    fn endpoint(&mut self, node_id: i32, host: &[u8], port: i32) -> Result<(), &'static str>;
}

/// What an endpoint becomes in a rewrite: its new host and port, or `None` to keep it.
pub trait Replacements {
    fn replacement(&self, node_id: i32, host: &[u8], port: i32) -> Option<(&str, i32)>;
}

/// Walks header + message like [`check`], telling `sink` every endpoint; returns where the
/// message ends.
pub fn visit_endpoints(
    body: &[u8],
    header_version: i16,
    schema: &Schema,
    version: i16,
    sink: &mut dyn EndpointSink,
) -> Result<usize, ShapeError> {
    let mut walker = Walker::after_header(body, header_version, schema, version)?;
    walker.mode = Mode::Visit(sink);
    walker.fields(schema.fields)?;
    Ok(walker.pos)
}

/// The length of `body` once [`rewrite`] has replaced its endpoints; fails where the
/// replacement cannot be encoded (a port above 65535 in a uint16 field, a host too long
/// for its length prefix), so a caller can refuse before writing anything.
pub fn rewritten_len(
    body: &[u8],
    header_version: i16,
    schema: &Schema,
    version: i16,
    map: &dyn Replacements,
) -> Result<usize, ShapeError> {
    let mut walker = Walker::after_header(body, header_version, schema, version)?;
    walker.mode = Mode::Measure { map, delta: 0 };
    walker.fields(schema.fields)?;
    let Mode::Measure { delta, .. } = walker.mode else {
        unreachable!("the mode is set above")
    };
    body.len()
        .checked_add_signed(delta)
        .ok_or_else(|| walker.fail("response", "shrinks below nothing"))
}

/// Appends `body` to `out` with every endpoint `map` replaces rewritten: the host's length
/// prefix and bytes, the port, and the size of every known tagged field around them
/// (re-encoded as the content's real length). Every other byte, unknown tagged fields and
/// bytes after the schema's last field included, is copied as it was. On error `out` may
/// hold part of the output: callers truncate it.
pub fn rewrite(
    body: &[u8],
    header_version: i16,
    schema: &Schema,
    version: i16,
    map: &dyn Replacements,
    out: &mut BytesMut,
) -> Result<(), ShapeError> {
    let mut walker = Walker::after_header(body, header_version, schema, version)?;
    walker.mode = Mode::Emit {
        map,
        out,
        copied: 0,
    };
    walker.fields(schema.fields)?;
    let Mode::Emit { out, copied, .. } = walker.mode else {
        unreachable!("the mode is set above")
    };
    out.extend_from_slice(&body[copied..]);
    Ok(())
}

/// Checks that every known tagged field holding endpoints declares its content's real
/// length (what [`rewrite`] writes; kafka-protocol and Kafka's Java client read known
/// tagged fields in place and ignore the size, so a decode alone does not show it).
pub fn check_endpoint_tag_sizes(
    body: &[u8],
    header_version: i16,
    schema: &Schema,
    version: i16,
) -> Result<(), ShapeError> {
    let mut walker = Walker::after_header(body, header_version, schema, version)?;
    walker.mode = Mode::CheckTagSizes;
    walker.fields(schema.fields)?;
    Ok(())
}

/// What a walk does besides checking the shape.
enum Mode<'v> {
    Check,
    Visit(&'v mut dyn EndpointSink),
    CheckTagSizes,
    /// Adds up how many bytes the rewrite adds (negative: removes).
    Measure {
        map: &'v dyn Replacements,
        delta: isize,
    },
    /// Writes the rewritten body; `copied` is how far `buf` has been copied to `out`.
    Emit {
        map: &'v dyn Replacements,
        out: &'v mut BytesMut,
        copied: usize,
    },
}

/// An endpoint's host as read: where its length prefix starts, and its bytes.
#[derive(Clone)]
struct HostSpan {
    prefix: usize,
    content: Range<usize>,
}

/// Whether a value of `ty` can hold an endpoint in `version`.
fn carries_endpoints(ty: Ty, version: i16) -> bool {
    match ty {
        Ty::Host => true,
        Ty::Array(fields) | Ty::Struct(fields) => fields
            .iter()
            .any(|f| f.present(version) && carries_endpoints(f.ty, version)),
        _ => false,
    }
}

struct Walker<'a, 'v> {
    buf: &'a [u8],
    pos: usize,
    version: i16,
    flexible: bool,
    mode: Mode<'v>,
    /// The endpoint being read: the last node id, and the host read after it.
    node_id: i32,
    host: Option<HostSpan>,
}

impl<'a, 'v> Walker<'a, 'v> {
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
            mode: Mode::Check,
            node_id: -1,
            host: None,
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
            return Err(self.fail("tagged field tag", TAG_TOO_LARGE));
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
                let size_at = self.pos;
                let size = self.uvarint("tagged field size")?;
                // kafka-protocol decodes known tagged fields in place, ignoring their size,
                // and skips unknown ones by size.
                match fields
                    .iter()
                    .find(|f| f.tag == Some(tag) && f.present(version))
                {
                    Some(field)
                        if !matches!(self.mode, Mode::Check | Mode::Visit(_))
                            && carries_endpoints(field.ty, version) =>
                    {
                        self.endpoint_tag(size_at, size, field)?
                    }
                    Some(field) => self.value(field.ty, field.name)?,
                    None => self.skip(size as usize, "unknown tagged field")?,
                }
            }
        }
        Ok(())
    }

    /// A known tagged field holding endpoints, its size varint at `size_at` declaring
    /// `declared` bytes: its size follows what its content becomes.
    fn endpoint_tag(
        &mut self,
        size_at: usize,
        declared: u32,
        field: &Field,
    ) -> Result<(), ShapeError> {
        let content = self.pos;
        let map = match &self.mode {
            Mode::Measure { map, .. } | Mode::Emit { map, .. } => Some(*map),
            _ => None,
        };
        let Some(map) = map else {
            // CheckTagSizes.
            self.value(field.ty, field.name)?;
            if self.pos - content != declared as usize {
                return Err(self.fail(field.name, "declares a size other than its length"));
            }
            return Ok(());
        };
        // The size comes before the content: measure the content's rewrite first.
        let mut inner = Walker {
            buf: self.buf,
            pos: content,
            version: self.version,
            flexible: self.flexible,
            mode: Mode::Measure { map, delta: 0 },
            node_id: self.node_id,
            host: None,
        };
        inner.value(field.ty, field.name)?;
        let Mode::Measure { delta, .. } = inner.mode else {
            unreachable!("set above")
        };
        let size = (inner.pos - content)
            .checked_add_signed(delta)
            .and_then(|size| u32::try_from(size).ok())
            .ok_or_else(|| self.fail(field.name, "would not fit its size field"))?;
        match &mut self.mode {
            Mode::Measure { delta: outer, .. } => {
                *outer += delta + uvarint_len(size) as isize - (content - size_at) as isize;
                self.pos = inner.pos;
                Ok(())
            }
            Mode::Emit { out, copied, .. } => {
                out.extend_from_slice(&self.buf[*copied..size_at]);
                put_uvarint(*out, size);
                *copied = content;
                self.value(field.ty, field.name)
            }
            _ => unreachable!("only rewrites get here"),
        }
    }

    /// The port of the endpoint whose host was just read, at `at`, `width` bytes wide.
    fn endpoint(&mut self, port: i32, at: usize, width: usize) -> Result<(), ShapeError> {
        let Some(host) = self.host.take().filter(|h| !h.content.is_empty()) else {
            return Ok(());
        };
        let buf = self.buf;
        let bytes = &buf[host.content.clone()];
        let node_id = self.node_id;
        let flexible = self.flexible;
        let replacement = match &mut self.mode {
            Mode::Check | Mode::CheckTagSizes => return Ok(()),
            Mode::Visit(sink) => {
                return sink
                    .endpoint(node_id, bytes, port)
                    .map_err(|problem| self.fail("host", problem));
            }
            Mode::Measure { map, .. } | Mode::Emit { map, .. } => {
                map.replacement(node_id, bytes, port)
            }
        };
        let Some((new_host, new_port)) = replacement else {
            return Ok(());
        };
        let fits = match width {
            2 => u16::try_from(new_port).is_ok(),
            _ => true,
        };
        if !fits {
            return Err(self.fail("port", "cannot hold the advertised port"));
        }
        if !flexible && i16::try_from(new_host.len()).is_err() {
            return Err(self.fail("host", "cannot hold the advertised host"));
        }
        let new_host_len = u32::try_from(new_host.len())
            .ok()
            .filter(|len| *len < u32::MAX)
            .ok_or_else(|| self.fail("host", "cannot hold the advertised host"))?;
        let prefix_len = if flexible {
            uvarint_len(new_host_len + 1)
        } else {
            2
        };
        match &mut self.mode {
            Mode::Measure { delta, .. } => {
                *delta += (prefix_len + new_host.len()) as isize
                    - (host.content.end - host.prefix) as isize;
            }
            Mode::Emit { out, copied, .. } => {
                out.extend_from_slice(&self.buf[*copied..host.prefix]);
                if flexible {
                    put_uvarint(*out, new_host_len + 1);
                } else {
                    out.put_i16(new_host.len() as i16);
                }
                out.extend_from_slice(new_host.as_bytes());
                out.extend_from_slice(&self.buf[host.content.end..at]);
                match width {
                    2 => out.put_u16(new_port as u16),
                    _ => out.put_i32(new_port),
                }
                *copied = at + width;
            }
            _ => unreachable!("returned above"),
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
            Ty::NodeId => {
                self.node_id = self.int32(name)?;
                Ok(())
            }
            Ty::Host => {
                let prefix = self.pos;
                let len = self.length(name, false)?;
                let start = self.pos;
                self.skip(len, name)?;
                self.host = Some(HostSpan {
                    prefix,
                    content: start..self.pos,
                });
                Ok(())
            }
            Ty::Port(width) => {
                let at = self.pos;
                let port = match width {
                    2 => i32::from(u16::from_be_bytes(self.array(name)?)),
                    _ => self.int32(name)?,
                };
                self.endpoint(port, at, width)
            }
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
            Ty::Fixed(width) | Ty::Port(width) => width,
            Ty::NodeId => 4,
            Ty::Str | Ty::Host => narrow,
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
