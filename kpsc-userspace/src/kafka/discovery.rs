//! Asks a broker for the cluster's brokers (ApiVersions, then Metadata with no topics).
//! Used at start and periodically to find brokers that need a listener, and by portmap to
//! check what brokers advertise.
//!
//! A broker's answer is as hostile as anything on the forwarding path: it is decoded by
//! the same guarded decoder (layout walk first), never straight by kafka-protocol, so a
//! few bytes claiming 2^31 entries are an error here, not an abort.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use kafka_protocol::{
    messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest},
    protocol::{Encodable, HeaderVersion},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, split},
    time::timeout,
};

use crate::{
    config::sasl::SaslCredentials,
    kafka::{
        frame::{FrameReader, write_frame},
        request::encode_request,
        sasl,
    },
    mapping::addr::BrokerAddr,
    proxy::rewrite::{api_versions::decode_api_versions, apis},
    upstream::Upstream,
};

/// Highest Metadata version this client speaks (v13 only adds a top-level error code).
const METADATA_MAX_VERSION: i16 = 12;
const MAX_RESPONSE: u32 = 64 * 1024 * 1024;
const CLIENT_ID: &str = "kpsc-discovery";
const API_VERSIONS_CORRELATION_ID: i32 = 1;
const METADATA_CORRELATION_ID: i32 = 2;

/// One broker's answer: `(node_id, advertised address)` of every broker it knows. The
/// connection is made as for client traffic (dial mapping, TLS); with `sasl`, it
/// authenticates first.
pub async fn fetch_brokers(
    upstream: &Upstream,
    addr: &BrokerAddr,
    io_timeout: Duration,
    sasl: Option<&SaslCredentials>,
) -> anyhow::Result<Vec<(i32, BrokerAddr)>> {
    timeout(io_timeout, fetch(upstream, addr, sasl))
        .await
        .with_context(|| format!("metadata from {addr}: timed out after {io_timeout:?}"))?
        .with_context(|| format!("metadata from {addr}"))
}

async fn fetch(
    upstream: &Upstream,
    addr: &BrokerAddr,
    sasl: Option<&SaslCredentials>,
) -> anyhow::Result<Vec<(i32, BrokerAddr)>> {
    let mut stream = upstream.connect(addr).await?;
    if let Some(creds) = sasl {
        sasl::authenticate(&mut stream, creds, &addr.to_string()).await?;
    }
    let (r, mut w) = split(stream);
    let mut reader = FrameReader::new(r, 16 * 1024);

    let body = call(
        &mut reader,
        &mut w,
        ApiKey::ApiVersions,
        0,
        API_VERSIONS_CORRELATION_ID,
        &ApiVersionsRequest::default(),
    )
    .await?;
    let version = metadata_version(&parse_api_versions(body)?)?;
    let request = metadata_request(version);
    let body = call(
        &mut reader,
        &mut w,
        ApiKey::Metadata,
        version,
        METADATA_CORRELATION_ID,
        &request,
    )
    .await?;
    w.shutdown().await.ok();
    parse_metadata(version, body)
}

/// Metadata for no topics: only the brokers.
fn metadata_request(version: i16) -> MetadataRequest {
    // Nothing to auto-create; the flag exists only from v4 on, and leaving its default
    // (true) is required before that or the request cannot be encoded.
    MetadataRequest::default()
        .with_topics(Some(Vec::new()))
        .with_allow_auto_topic_creation(version < 4)
}

/// The broker's answer to kpsc's ApiVersions v0 request (body after the size prefix).
pub fn parse_api_versions(body: Bytes) -> anyhow::Result<ApiVersionsResponse> {
    let (_, frame) = decode_api_versions(0, body).context("ApiVersions v0 response")?;
    if frame.header.correlation_id != API_VERSIONS_CORRELATION_ID {
        bail!(
            "ApiVersions response has correlation id {} instead of {API_VERSIONS_CORRELATION_ID}",
            frame.header.correlation_id
        );
    }
    if frame.message.error_code != 0 {
        bail!("ApiVersions error code {}", frame.message.error_code);
    }
    Ok(frame.message)
}

/// The Metadata version to ask for: the broker's highest, up to what this client speaks.
fn metadata_version(versions: &ApiVersionsResponse) -> anyhow::Result<i16> {
    let broker_max = versions
        .api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::Metadata as i16)
        .map(|k| k.max_version)
        .context("broker does not support Metadata")?;
    // v1+: an empty topic list means "no topics" (v0 would mean all of them).
    let version = broker_max.min(METADATA_MAX_VERSION);
    if version < 1 {
        bail!("broker supports only Metadata v{broker_max}; kpsc needs v1 or later");
    }
    Ok(version)
}

/// The brokers a Metadata response of `version` names (body after the size prefix).
/// Entries whose port cannot be a broker's (0, or outside u16) are left out.
pub fn parse_metadata(version: i16, body: Bytes) -> anyhow::Result<Vec<(i32, BrokerAddr)>> {
    let response = apis::decode(ApiKey::Metadata as i16, version, body)?;
    if response.correlation_id() != METADATA_CORRELATION_ID {
        bail!(
            "Metadata response has correlation id {} instead of {METADATA_CORRELATION_ID}",
            response.correlation_id()
        );
    }
    Ok(response
        .endpoints()
        .iter()
        .filter_map(|e| {
            let port = u16::try_from(e.port).ok().filter(|p| *p != 0)?;
            Some((e.node_id, BrokerAddr::new(e.host.clone(), port)))
        })
        .collect())
}

async fn call<Req, R, W>(
    reader: &mut FrameReader<R>,
    w: &mut W,
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    request: &Req,
) -> anyhow::Result<Bytes>
where
    Req: Encodable + HeaderVersion,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let buf = encode_request(api, version, correlation_id, CLIENT_ID, request)?;
    write_frame(w, &buf).await?;
    let mut body = Vec::new();
    if !reader.read_frame(MAX_RESPONSE, &mut body).await? {
        bail!("broker closed the connection before answering {api:?}");
    }
    Ok(Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kafka_protocol::messages::{
        BrokerId, MetadataResponse, ResponseHeader, api_versions_response::ApiVersion,
        metadata_response::MetadataResponseBroker,
    };
    use kafka_protocol::protocol::StrBytes;

    use super::*;

    fn with_header<T: Encodable>(
        correlation_id: i32,
        header_version: i16,
        message: &T,
        version: i16,
    ) -> Bytes {
        let mut buf = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(correlation_id)
            .encode(&mut buf, header_version)
            .unwrap();
        message.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    /// Before these answers went through the guarded decoder, kafka-protocol reserved the
    /// claimed entries up front: 18-26 bytes made the daemon allocate tens to hundreds of
    /// GB and abort.
    #[test]
    fn hostile_counts_are_errors_not_aborts() {
        // ApiVersions v0: error_code 0, api_keys claiming i32::MAX entries.
        let api_versions = [&1i32.to_be_bytes()[..], &[0, 0], &[0x7f, 0xff, 0xff, 0xff]].concat();
        let err = parse_api_versions(Bytes::from(api_versions)).unwrap_err();
        assert!(
            format!("{err:#}").contains("api_keys claims more entries"),
            "{err:#}"
        );
        // Metadata v1: brokers claiming i32::MAX entries.
        let metadata = [&2i32.to_be_bytes()[..], &[0x7f, 0xff, 0xff, 0xff]].concat();
        let err = parse_metadata(1, Bytes::from(metadata)).unwrap_err();
        assert!(
            format!("{err:#}").contains("brokers claims more entries"),
            "{err:#}"
        );
        // Metadata v12 (flexible): a compact count of u32::MAX - 1.
        let metadata = [
            &2i32.to_be_bytes()[..],
            &[0],
            &[0, 0, 0, 0],
            &[0xff, 0xff, 0xff, 0xff, 0x0f],
        ]
        .concat();
        assert!(parse_metadata(12, Bytes::from(metadata)).is_err());
    }

    /// Brokers that speak only Metadata v1-3 used to get no request at all: it failed to
    /// encode, and discovery never succeeded.
    #[test]
    fn the_request_encodes_for_every_version_discovery_may_pick() {
        for version in 1..=METADATA_MAX_VERSION {
            let mut buf = BytesMut::new();
            metadata_request(version)
                .encode(&mut buf, version)
                .unwrap_or_else(|e| panic!("v{version}: {e}"));
        }
    }

    #[test]
    fn real_answers_are_read() {
        let versions = ApiVersionsResponse::default().with_api_keys(vec![
            ApiVersion::default()
                .with_api_key(ApiKey::Metadata as i16)
                .with_max_version(13),
        ]);
        let parsed = parse_api_versions(with_header(1, 0, &versions, 0)).unwrap();
        assert_eq!(metadata_version(&parsed).unwrap(), METADATA_MAX_VERSION);
        let metadata = MetadataResponse::default().with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(3))
                .with_host(StrBytes::from_static_str("kafka-3"))
                .with_port(9092),
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(4))
                .with_host(StrBytes::from_static_str("kafka-4"))
                .with_port(0),
        ]);
        let brokers = parse_metadata(12, with_header(2, 1, &metadata, 12)).unwrap();
        assert_eq!(brokers, [(3, BrokerAddr::new("kafka-3", 9092))]);
        assert!(parse_metadata(12, with_header(9, 1, &metadata, 12)).is_err());
    }
}
