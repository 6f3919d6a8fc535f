//! Asks a broker for the cluster's brokers (ApiVersions, then Metadata with no topics).
//! Used at start and periodically to find brokers that need a listener.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
        RequestHeader, ResponseHeader,
    },
    protocol::{Decodable, Encodable, HeaderVersion, StrBytes},
};
use tokio::{io::AsyncWriteExt, net::TcpStream, time::timeout};

use crate::{
    kafka::frame::{FrameReader, write_frame},
    mapping::addr::BrokerAddr,
};

/// Highest Metadata version this client speaks (v13 only adds a top-level error code).
const METADATA_MAX_VERSION: i16 = 12;
const MAX_RESPONSE: u32 = 64 * 1024 * 1024;
const CLIENT_ID: &str = "kpsc-discovery";

/// One broker's answer: `(node_id, advertised address)` of every broker it knows.
pub async fn fetch_brokers(
    addr: &BrokerAddr,
    io_timeout: Duration,
) -> anyhow::Result<Vec<(i32, BrokerAddr)>> {
    timeout(io_timeout, fetch(addr))
        .await
        .with_context(|| format!("metadata from {addr}: timed out after {io_timeout:?}"))?
        .with_context(|| format!("metadata from {addr}"))
}

async fn fetch(addr: &BrokerAddr) -> anyhow::Result<Vec<(i32, BrokerAddr)>> {
    let stream = TcpStream::connect((addr.host.as_str(), addr.port))
        .await
        .context("connect")?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r, 16 * 1024);

    let versions: ApiVersionsResponse = call(
        &mut reader,
        &mut w,
        ApiKey::ApiVersions,
        0,
        1,
        &ApiVersionsRequest::default(),
    )
    .await?;
    if versions.error_code != 0 {
        bail!("ApiVersions error code {}", versions.error_code);
    }
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
    let request = MetadataRequest::default()
        .with_topics(Some(Vec::new()))
        .with_allow_auto_topic_creation(false);
    let metadata: MetadataResponse =
        call(&mut reader, &mut w, ApiKey::Metadata, version, 2, &request).await?;
    w.shutdown().await.ok();
    Ok(metadata
        .brokers
        .into_iter()
        .filter_map(|b| {
            let port = u16::try_from(b.port).ok().filter(|p| *p != 0)?;
            Some((b.node_id.0, BrokerAddr::new(b.host.to_string(), port)))
        })
        .collect())
}

async fn call<Req, Resp>(
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    request: &Req,
) -> anyhow::Result<Resp>
where
    Req: Encodable + HeaderVersion,
    Resp: Decodable + HeaderVersion,
{
    let header = RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    let mut buf = BytesMut::new();
    header.encode(&mut buf, Req::header_version(version))?;
    request.encode(&mut buf, version)?;
    write_frame(w, &buf).await?;
    let mut body = Vec::new();
    if !reader.read_frame(MAX_RESPONSE, &mut body).await? {
        bail!("broker closed the connection before answering {api:?}");
    }
    let mut body = Bytes::from(body);
    let header = ResponseHeader::decode(&mut body, Resp::header_version(version))
        .with_context(|| format!("{api:?} v{version} response header"))?;
    if header.correlation_id != correlation_id {
        bail!(
            "{api:?} response has correlation id {} instead of {correlation_id}",
            header.correlation_id
        );
    }
    // Trailing bytes beyond the schema (seen in librdkafka's mock) are ignored here.
    Resp::decode(&mut body, version).with_context(|| format!("{api:?} v{version} response"))
}
