//! The PROXY protocol header (HAProxy's v1 text and v2 binary forms) a load balancer or
//! private endpoint puts in front of a client's bytes: the real client address and, in v2,
//! the cloud's endpoint id TLV.
//!
//! Reading consumes exactly the header and nothing after it (v2 announces its length; v1
//! is read up to its CRLF), so the first Kafka byte is still in the socket for the
//! forwarder. Parsing is the `ppp` crate's, which bounds-checks every field; this module
//! adds the cloud TLVs. Whatever the input, the result is a header or an error, and at most
//! 16 + 4,096 bytes are buffered.

use std::{fmt, net::SocketAddr};

use ppp::{v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt};

/// v2 headers start with these 12 bytes; v1 with `PROXY`.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED_LEN: usize = 16;
/// Longest v2 address block + TLVs accepted. Real ones (addresses, an endpoint id, a few
/// small TLVs) are well under 100 bytes; the field allows 65,535, which an unauthenticated
/// peer could make kpscd allocate per connection.
const V2_MAX_LEN: usize = 4096;
/// v1's longest header, CRLF included (the specification's bound).
const V1_MAX_LEN: usize = 107;
/// v1's shortest header: `PROXY UNKNOWN\r\n`.
const V1_MIN_LEN: usize = 15;

/// Google Private Service Connect: the consumer's PSC connection id, 8 bytes, network order.
pub const TLV_GCP: u8 = 0xE0;
/// AWS PrivateLink: subtype 0x01 + the VPC endpoint id (`vpce-...`).
pub const TLV_AWS: u8 = 0xEA;
/// Azure Private Link: subtype 0x01 + the private endpoint's LinkID, u32 little endian.
pub const TLV_AZURE: u8 = 0xEE;
const SUBTYPE_AWS_VPCE_ID: u8 = 0x01;
const SUBTYPE_AZURE_LINK_ID: u8 = 0x01;
/// AWS VPC endpoint ids are short ASCII (`vpce-` and 17 hex digits); a longer or
/// non-ASCII value is not one, and would only make log lines and labels long.
const MAX_VPCE_ID_LEN: usize = 64;

/// The private endpoint a connection came through, from the cloud's TLV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointId {
    GooglePsc(u64),
    AwsVpce(String),
    AzureLinkId(u32),
}

impl EndpointId {
    pub fn cloud(&self) -> &'static str {
        match self {
            Self::GooglePsc(_) => "gcp_psc",
            Self::AwsVpce(_) => "aws_privatelink",
            Self::AzureLinkId(_) => "azure_private_link",
        }
    }
}

/// The id as operators see it in their cloud's console (and write in `--allow-endpoint-id`).
impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::GooglePsc(id) => write!(f, "{id}"),
            Self::AwsVpce(id) => f.write_str(id),
            Self::AzureLinkId(id) => write!(f, "{id}"),
        }
    }
}

/// What a header said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: u8,
    /// The real client; None when the header names none (v2 LOCAL, as in load-balancer
    /// health checks, v1 UNKNOWN, or a non-IP family): the TCP peer stands.
    pub source: Option<SocketAddr>,
    pub endpoint: Option<EndpointId>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("connection closed inside the PROXY protocol header (truncated)")]
    Truncated,
    #[error("reading the PROXY protocol header: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for HeaderError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Self::Truncated
        } else {
            Self::Io(e)
        }
    }
}

fn malformed(what: impl Into<String>) -> HeaderError {
    HeaderError::Malformed(what.into())
}

/// Whether a connection whose first byte is `first` starts with a PROXY header. A Kafka
/// frame cannot start this way: its size would be at least 0x0D000000 (218 MB) bytes.
pub fn starts_header(first: u8) -> bool {
    first == V2_SIGNATURE[0] || first == b'P'
}

/// Reads one header from the start of `reader`, which must begin with a byte for which
/// [`starts_header`] holds. Consumes the header and nothing more.
pub async fn read_header<R: AsyncRead + Unpin>(reader: &mut R) -> Result<ProxyHeader, HeaderError> {
    let mut first = [0u8; 1];
    reader.read_exact(&mut first).await?;
    if first[0] == V2_SIGNATURE[0] {
        read_v2(first[0], reader).await
    } else {
        read_v1(first[0], reader).await
    }
}

async fn read_v2<R: AsyncRead + Unpin>(
    first: u8,
    reader: &mut R,
) -> Result<ProxyHeader, HeaderError> {
    let mut header = vec![0u8; V2_FIXED_LEN];
    header[0] = first;
    reader.read_exact(&mut header[1..]).await?;
    if header[..V2_SIGNATURE.len()] != V2_SIGNATURE[..] {
        return Err(malformed("starts with \\r but not with the v2 signature"));
    }
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if length > V2_MAX_LEN {
        return Err(malformed(format!(
            "v2 header length {length} exceeds {V2_MAX_LEN} bytes"
        )));
    }
    header.resize(V2_FIXED_LEN + length, 0);
    reader.read_exact(&mut header[V2_FIXED_LEN..]).await?;
    parse_v2(&header)
}

/// Parses one complete v2 header (what [`read_v2`] read).
pub fn parse_v2(bytes: &[u8]) -> Result<ProxyHeader, HeaderError> {
    let header = v2::Header::try_from(bytes).map_err(|e| malformed(format!("v2: {e}")))?;
    let source = match (header.command, header.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
    };
    let mut endpoint = None;
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(|e| malformed(format!("v2 TLV: {e}")))?;
        let found = endpoint_tlv(tlv.kind, &tlv.value)?;
        if let Some(id) = found {
            match &endpoint {
                Some(seen) if seen != &id => {
                    return Err(malformed(format!(
                        "two different endpoint ids ({seen} and {id})"
                    )));
                }
                _ => endpoint = Some(id),
            }
        }
    }
    Ok(ProxyHeader {
        version: 2,
        source,
        endpoint,
    })
}

/// The endpoint id in one TLV, if it is a cloud's endpoint TLV. Other TLVs (ALPN,
/// authority, CRC, other subtypes) are not kpsc's business and are skipped.
fn endpoint_tlv(kind: u8, value: &[u8]) -> Result<Option<EndpointId>, HeaderError> {
    match kind {
        TLV_GCP => {
            let id: [u8; 8] = value.try_into().map_err(|_| {
                malformed(format!(
                    "Google PSC TLV 0xE0 holds {} bytes, not 8",
                    value.len()
                ))
            })?;
            Ok(Some(EndpointId::GooglePsc(u64::from_be_bytes(id))))
        }
        TLV_AWS if value.first() == Some(&SUBTYPE_AWS_VPCE_ID) => {
            let id = &value[1..];
            if id.is_empty()
                || id.len() > MAX_VPCE_ID_LEN
                || !id.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            {
                return Err(malformed(
                    "AWS TLV 0xEA: the VPC endpoint id is not 1-64 characters of [A-Za-z0-9-]",
                ));
            }
            Ok(Some(EndpointId::AwsVpce(
                String::from_utf8_lossy(id).into_owned(),
            )))
        }
        TLV_AZURE if value.first() == Some(&SUBTYPE_AZURE_LINK_ID) => {
            let id: [u8; 4] = value[1..].try_into().map_err(|_| {
                malformed(format!(
                    "Azure TLV 0xEE LinkID holds {} bytes, not 4",
                    value.len() - 1
                ))
            })?;
            Ok(Some(EndpointId::AzureLinkId(u32::from_le_bytes(id))))
        }
        _ => Ok(None),
    }
}

async fn read_v1<R: AsyncRead + Unpin>(
    first: u8,
    reader: &mut R,
) -> Result<ProxyHeader, HeaderError> {
    let mut line = vec![0u8; V1_MIN_LEN];
    line[0] = first;
    reader.read_exact(&mut line[1..]).await?;
    // Byte by byte from here: the header's end is only known when its CRLF arrives, and
    // the Kafka bytes after it must stay in the socket.
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX_LEN {
            return Err(malformed(format!("v1: no CRLF within {V1_MAX_LEN} bytes")));
        }
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte).await?;
        line.push(byte[0]);
    }
    parse_v1(&line)
}

/// Parses one complete v1 line (CRLF included).
pub fn parse_v1(line: &[u8]) -> Result<ProxyHeader, HeaderError> {
    let header = v1::Header::try_from(line).map_err(|e| malformed(format!("v1: {e}")))?;
    if header.header.len() != line.len() {
        return Err(malformed("v1: bytes after the first CR"));
    }
    let source = match header.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    };
    Ok(ProxyHeader {
        version: 1,
        source,
        endpoint: None,
    })
}

/// A v2 PROXY header from `source` to `destination` with `tlvs`: what a cloud endpoint
/// sends. For tests and the fuzz seeds.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut builder = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (source, destination),
    );
    for (kind, value) in tlvs {
        builder = builder
            .write_tlv(*kind, value)
            .expect("writing to a Vec cannot fail");
    }
    builder.build().expect("a header with few TLVs fits u16")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Reads a header from `bytes`, returning it and what was left unread.
    async fn read(bytes: &[u8]) -> (Result<ProxyHeader, HeaderError>, Vec<u8>) {
        let mut reader = bytes;
        let result = read_header(&mut reader).await;
        (result, reader.to_vec())
    }

    #[tokio::test]
    async fn each_clouds_endpoint_tlv() {
        let src = addr("198.18.3.4:40000");
        let dst = addr("198.18.0.1:9092");
        let psc = 43_686_719_580_552_292u64.to_be_bytes();
        let vpce = [&[1u8][..], b"vpce-08d2bf15fac5001c9"].concat();
        let azure = [1u8, 0x33, 0, 0, 0x26];
        let kafka = b"\0\0\0\x10kafka-bytes";
        for (tlv, expected) in [
            (
                (TLV_GCP, &psc[..]),
                EndpointId::GooglePsc(43_686_719_580_552_292),
            ),
            (
                (TLV_AWS, &vpce[..]),
                EndpointId::AwsVpce("vpce-08d2bf15fac5001c9".into()),
            ),
            (
                (TLV_AZURE, &azure[..]),
                EndpointId::AzureLinkId(0x2600_0033),
            ),
        ] {
            // An unrelated TLV (authority) before it is skipped.
            let header = encode_v2(src, dst, &[(0x02, b"kafka.example"), tlv]);
            let (result, rest) = read(&[&header[..], kafka].concat()).await;
            let got = result.unwrap();
            assert_eq!(got.source, Some(src));
            assert_eq!(got.endpoint.as_ref(), Some(&expected));
            assert_eq!(rest, kafka, "exactly the header is consumed");
        }
        assert_eq!(
            EndpointId::AzureLinkId(0x2600_0033).to_string(),
            "637534259"
        );
    }

    #[tokio::test]
    async fn v1_and_local() {
        let (got, rest) = read(b"PROXY TCP4 198.18.3.4 198.18.0.1 40000 9092\r\n\0\0\0\x01x").await;
        let got = got.unwrap();
        assert_eq!(got.version, 1);
        assert_eq!(got.source, Some(addr("198.18.3.4:40000")));
        assert_eq!(rest, b"\0\0\0\x01x");
        let (got, rest) = read(b"PROXY UNKNOWN\r\nnext").await;
        assert_eq!(got.unwrap().source, None);
        assert_eq!(rest, b"next");
        let (got, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 9092\r\n").await;
        assert_eq!(got.unwrap().source, Some(addr("[2001:db8::1]:40000")));
        // v2 LOCAL (a load balancer's own health check): no client address.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        let (got, _) = read(&local).await;
        assert_eq!(got.unwrap().source, None);
    }

    #[tokio::test]
    async fn malformed_and_truncated_headers_are_errors() {
        let src = addr("198.18.3.4:40000");
        let dst = addr("198.18.0.1:9092");
        let good = encode_v2(src, dst, &[(TLV_GCP, &7u64.to_be_bytes())]);
        // Every truncation of a good header.
        for cut in 1..good.len() {
            let (got, _) = read(&good[..cut]).await;
            assert!(
                matches!(got, Err(HeaderError::Truncated)),
                "cut {cut}: {got:?}"
            );
        }
        let v1 = b"PROXY TCP4 198.18.3.4 198.18.0.1 40000 9092\r\n";
        for cut in 1..v1.len() {
            let (got, _) = read(&v1[..cut]).await;
            assert!(
                matches!(got, Err(HeaderError::Truncated)),
                "v1 cut {cut}: {got:?}"
            );
        }
        let mut bad_version = good.clone();
        bad_version[12] = 0x31;
        let mut bad_signature = good.clone();
        bad_signature[5] = b'X';
        let mut tlv_overrun = good.clone();
        let n = tlv_overrun.len();
        tlv_overrun[n - 9] = 0xff; // the TLV's length claims more than the header holds
        let short_gcp = encode_v2(src, dst, &[(TLV_GCP, &[1, 2, 3])]);
        let bad_vpce = encode_v2(src, dst, &[(TLV_AWS, b"\x01vpce/../x")]);
        let long_azure = encode_v2(src, dst, &[(TLV_AZURE, &[1, 1, 2, 3, 4, 5])]);
        // A length field over the bound: refused before anything past the 16 bytes is read.
        let mut too_long = good.clone();
        too_long[14..16].copy_from_slice(&4097u16.to_be_bytes());
        let (got, rest) = read(&[&too_long[..], &[0u8; 4200][..]].concat()).await;
        assert!(matches!(got, Err(HeaderError::Malformed(_))), "{got:?}");
        assert_eq!(rest.len(), too_long.len() - 16 + 4200);
        let two_ids = encode_v2(
            src,
            dst,
            &[
                (TLV_GCP, &1u64.to_be_bytes()),
                (TLV_GCP, &2u64.to_be_bytes()),
            ],
        );
        for (name, input) in [
            ("version 3", bad_version),
            ("signature", bad_signature),
            ("tlv overrun", tlv_overrun),
            ("short psc id", short_gcp),
            ("vpce id charset", bad_vpce),
            ("azure length", long_azure),
            ("two ids", two_ids),
            (
                "v1 garbage",
                b"PROXY TCP4 not-an-ip 198.18.0.1 1 2\r\n".to_vec(),
            ),
            ("v1 too long", [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat()),
            (
                "v1 lowercase",
                b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
        ] {
            let (got, _) = read(&input).await;
            assert!(
                matches!(got, Err(HeaderError::Malformed(_))),
                "{name}: {got:?}"
            );
        }
    }

    #[test]
    fn kafka_frames_do_not_look_like_headers() {
        // A first frame of any size kpsc accepts starts with 0x00..0x06.
        assert!(!starts_header(0x00));
        assert!(!starts_header(0x06));
        assert!(starts_header(b'\r'));
        assert!(starts_header(b'P'));
    }
}
