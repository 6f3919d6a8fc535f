//! How each fuzz target reads its input, shared by the targets (`fuzz_targets/`) and the
//! seeder (`examples/seed/`), so a committed seed means what its target reads.
//!
//! Every format keeps the bytes under test verbatim after a few control bytes, so corpus
//! files made from captures stay recognisable (`xxd` shows the Kafka frame).

use kafka_protocol::messages::ApiKey;
use kpsc::{
    config::proxy::BulkPolicy,
    kafka::guarded::CodecError,
    proxy::rewrite::{
        apis::ALL,
        declaration::{AddressApi, RewriteError},
    },
};

/// A refusal must never be the layout walk and kafka-protocol disagreeing on where a
/// message ends (`kafka::guarded` reports that as a decode error: kpsc's table is wrong).
pub fn assert_walk_agrees<T>(result: &Result<T, RewriteError>) {
    if let Err(RewriteError::Codec(CodecError::Decode { reason, .. })) = result {
        assert!(!reason.contains("schema table"), "{reason}");
    }
}

/// `frame_reader`: `[capacity, max, chunking, mode]` + the byte stream.
#[derive(Debug)]
pub struct FrameInput<'a> {
    /// FrameReader buffer size, 12..=64 (the request path needs 12 to see a header).
    pub capacity: usize,
    /// Largest frame accepted.
    pub max: u32,
    /// Seed of the read sizes the source returns (0: as much as asked).
    pub chunking: u8,
    pub mode: FrameMode,
    pub stream: &'a [u8],
}

/// Which caller's sequence of FrameReader calls to replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameMode {
    /// `read_frame` in a loop (the discovery client).
    ReadFrame,
    /// The request path: size (min 8), header peek, Produce peek, `take_buffered` +
    /// `copy_to` (what the bulk movers do).
    Requests,
    /// The response path: size + correlation id peek, then `copy_to` or `read_into`.
    Responses,
}

impl<'a> FrameInput<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&[capacity, max, chunking, mode], stream) = data.split_first_chunk::<4>()?;
        Some(Self {
            capacity: 12 + usize::from(capacity % 53),
            max: if max == u8::MAX {
                u32::MAX
            } else {
                u32::from(max) * 64
            },
            chunking,
            mode: match mode % 3 {
                0 => FrameMode::ReadFrame,
                1 => FrameMode::Requests,
                _ => FrameMode::Responses,
            },
            stream,
        })
    }

    /// A seed: `stream` read in `mode` with a 64-byte buffer, no size limit, reads of 1..=16
    /// bytes.
    pub fn seed(mode: FrameMode, stream: &[u8]) -> Vec<u8> {
        let mode = match mode {
            FrameMode::ReadFrame => 0,
            FrameMode::Requests => 1,
            FrameMode::Responses => 2,
        };
        [&[52, u8::MAX, 7, mode][..], stream].concat()
    }
}

/// `response_rewrite`: `[api, version]` + a response frame body (header included).
#[derive(Debug)]
pub struct ResponseInput<'a> {
    pub api: &'static AddressApi,
    pub version: i16,
    /// Advertise ports above 65535 (which DescribeQuorum's uint16 ports cannot hold).
    pub wide_ports: bool,
    pub body: &'a [u8],
}

impl<'a> ResponseInput<'a> {
    /// `api`: index in the registry (low 7 bits, modulo its length) and the wide-ports flag
    /// (high bit); `version`: offset from the API's lowest version, modulo its count.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&[api_byte, version], body) = data.split_first_chunk::<2>()?;
        let api = ALL[usize::from(api_byte & 0x7f) % ALL.len()];
        let versions = api.versions();
        let count = versions.end() - versions.start() + 1;
        Some(Self {
            api,
            version: versions.start() + i16::from(version) % count,
            wide_ports: api_byte & 0x80 != 0,
            body,
        })
    }

    /// A seed for `key` version `version`, or None if kpsc does not decode that version.
    pub fn seed(key: ApiKey, version: i16, body: &[u8]) -> Option<Vec<u8>> {
        let index = ALL.iter().position(|api| api.key == key)?;
        let api = ALL[index];
        if !api.versions().contains(&version) {
            return None;
        }
        let offset = u8::try_from(version - api.versions().start()).ok()?;
        Some([&[u8::try_from(index).ok()?, offset][..], body].concat())
    }
}

/// `api_versions`: `[version, flags, forbidden keys...]` + an ApiVersions response body.
#[derive(Debug)]
pub struct ApiVersionsInput<'a> {
    /// The request's version, -1..=5 (kpsc decodes 0..=4).
    pub version: i16,
    pub policy: BulkPolicy,
    /// `--forbidden-api-keys`.
    pub forbidden: Vec<i16>,
    pub body: &'a [u8],
}

impl<'a> ApiVersionsInput<'a> {
    /// `flags`: bit 0 = `--bulk-policy rewrite`; bits 1-2 = how many int16 forbidden keys
    /// follow.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&[version, flags], mut rest) = data.split_first_chunk::<2>()?;
        let mut forbidden = Vec::new();
        for _ in 0..(flags >> 1) & 3 {
            let (key, tail) = rest.split_first_chunk::<2>()?;
            forbidden.push(i16::from_be_bytes(*key));
            rest = tail;
        }
        Some(Self {
            version: i16::from(version % 7) - 1,
            policy: if flags & 1 == 0 {
                BulkPolicy::Cap
            } else {
                BulkPolicy::Rewrite
            },
            forbidden,
            body: rest,
        })
    }

    /// A seed: the answer to an ApiVersions request of `version`, `--bulk-policy cap`,
    /// DeleteTopics (20) forbidden.
    pub fn seed(version: i16, body: &[u8]) -> Vec<u8> {
        let version = u8::try_from(version + 1).expect("ApiVersions versions are -1..=5");
        [&[version, 1 << 1, 0, 20][..], body].concat()
    }
}

/// `discovery`: `[which]` + the body of a broker's answer to kpsc's discovery client.
#[derive(Debug)]
pub struct DiscoveryInput<'a> {
    /// `None`: the answer to ApiVersions v0; `Some(v)`: to Metadata v`v` (1..=12, the
    /// versions the client asks for).
    pub metadata_version: Option<i16>,
    pub body: &'a [u8],
}

/// Highest Metadata version kpsc's discovery client asks for.
pub const DISCOVERY_METADATA_MAX: i16 = 12;

impl<'a> DiscoveryInput<'a> {
    /// `which`: bit 0 clear = ApiVersions; set = Metadata, version 1 + (which >> 1) % 12.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&which, body) = data.split_first()?;
        Some(Self {
            metadata_version: (which & 1 == 1)
                .then(|| 1 + i16::from(which >> 1) % DISCOVERY_METADATA_MAX),
            body,
        })
    }

    pub fn seed(metadata_version: Option<i16>, body: &[u8]) -> Option<Vec<u8>> {
        let which = match metadata_version {
            None => 0,
            Some(v @ 1..=DISCOVERY_METADATA_MAX) => u8::try_from(v - 1).ok()? << 1 | 1,
            Some(_) => return None,
        };
        Some([&[which][..], body].concat())
    }
}

/// `config`: the command line after `kpscd` (arguments separated by NUL), then optionally
/// 0xFF and the text of the file given as `--config` (0xFF never occurs in UTF-8).
#[derive(Debug)]
pub struct ConfigInput<'a> {
    pub args: Vec<&'a [u8]>,
    pub file: Option<&'a [u8]>,
}

impl<'a> ConfigInput<'a> {
    pub fn parse(data: &'a [u8]) -> Self {
        let (args, file) = match data.iter().position(|&b| b == 0xff) {
            Some(at) => (&data[..at], Some(&data[at + 1..])),
            None => (data, None),
        };
        Self {
            args: args.split(|&b| b == 0).collect(),
            file,
        }
    }

    pub fn seed(args: &[&str], file: Option<&str>) -> Vec<u8> {
        let mut out = args.join("\0").into_bytes();
        if let Some(file) = file {
            out.push(0xff);
            out.extend_from_slice(file.as_bytes());
        }
        out
    }
}
