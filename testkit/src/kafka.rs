//! One raw Kafka client: requests encoded with the `kafka-protocol` crate, for sending exact
//! request versions (every Metadata version, pipelines, malformed frames) that high-level
//! clients never send on demand.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader},
    protocol::{Decodable, Encodable, HeaderVersion, StrBytes},
};

/// The client id of [`RawClient`] requests.
pub const RAW_CLIENT_ID: &str = "kpsc-testkit";

/// A request frame's body (without the size prefix): the header with `correlation_id` and
/// `client_id`, then `request`, both encoded for `version`.
pub fn request_body<Req: Encodable + HeaderVersion>(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    client_id: &'static str,
    request: &Req,
) -> anyhow::Result<BytesMut> {
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(client_id)))
        .encode(&mut body, Req::header_version(version))?;
    request.encode(&mut body, version)?;
    Ok(body)
}

/// A Kafka connection speaking raw protocol, one request or a pipeline at a time.
pub struct RawClient {
    stream: TcpStream,
    next_correlation: i32,
}

impl RawClient {
    pub fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        Self::from_stream(stream)
    }

    /// Wraps a connected stream (e.g. one bound to a chosen source address).
    pub fn from_stream(stream: TcpStream) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            next_correlation: 1,
        })
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Encodes and sends one request; returns its correlation id.
    pub fn send<Req: Encodable + HeaderVersion>(
        &mut self,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> anyhow::Result<i32> {
        let correlation_id = self.next_correlation;
        self.next_correlation += 1;
        let body = request_body(api, version, correlation_id, RAW_CLIENT_ID, request)?;
        self.send_raw(&body)?;
        Ok(correlation_id)
    }

    /// Sends a size prefix and `body` as they are.
    pub fn send_raw(&mut self, body: &[u8]) -> anyhow::Result<()> {
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        self.stream.write_all(&frame)?;
        Ok(())
    }

    /// Reads one response frame body (header included).
    pub fn recv_raw(&mut self) -> anyhow::Result<Bytes> {
        read_frame(&mut self.stream)
    }

    /// Reads a response, checks its correlation id and decodes it. Trailing bytes beyond
    /// the schema are allowed (librdkafka's mock adds one to Metadata v12/v13).
    pub fn recv<Resp: Decodable + HeaderVersion>(
        &mut self,
        correlation_id: i32,
        version: i16,
    ) -> anyhow::Result<(Resp, Bytes)> {
        let raw = self.recv_raw()?;
        let mut body = raw.clone();
        let header = ResponseHeader::decode(&mut body, Resp::header_version(version))?;
        anyhow::ensure!(
            header.correlation_id == correlation_id,
            "correlation id {} != {correlation_id}",
            header.correlation_id
        );
        Ok((Resp::decode(&mut body, version)?, raw))
    }

    /// ApiVersions as clients do it: v3 first; a broker that does not support v3 answers
    /// with UNSUPPORTED_VERSION in v0 format, then ask again with the highest version
    /// that answer lists. Returns the response and the version used.
    pub fn api_versions(&mut self) -> anyhow::Result<(ApiVersionsResponse, i16)> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str(RAW_CLIENT_ID))
            .with_client_software_version(StrBytes::from_static_str("1"));
        let id = self.send(ApiKey::ApiVersions, 3, &request)?;
        let raw = self.recv_raw()?;
        // The ApiVersions response header is v0 (no tagged fields) whatever the version.
        let mut body = raw.clone();
        let header = ResponseHeader::decode(&mut body, 0)?;
        anyhow::ensure!(header.correlation_id == id, "ApiVersions correlation id");
        // Kafka answers an unsupported version in v0 format; librdkafka's mock answers in
        // the requested format. Accept both, as clients do.
        let first = match ApiVersionsResponse::decode(&mut body.clone(), 3) {
            Ok(r) if r.error_code == 0 => return Ok((r, 3)),
            Ok(r) => r,
            Err(_) => ApiVersionsResponse::decode(&mut body, 0)?,
        };
        anyhow::ensure!(
            first.error_code == 35,
            "ApiVersions v3 error {}",
            first.error_code
        );
        // An answer without its own range means "try v0" (librdkafka's fallback).
        let version = first
            .api_keys
            .iter()
            .find(|k| k.api_key == ApiKey::ApiVersions as i16)
            .map_or(0, |k| k.max_version.min(3));
        let (r, _): (ApiVersionsResponse, _) = self.call(ApiKey::ApiVersions, version, &request)?;
        anyhow::ensure!(
            r.error_code == 0,
            "ApiVersions v{version} error {}",
            r.error_code
        );
        Ok((r, version))
    }

    /// Sends one request and decodes its response.
    pub fn call<Req, Resp>(
        &mut self,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> anyhow::Result<(Resp, Bytes)>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let id = self.send(api, version, request)?;
        self.recv(id, version)
    }
}

/// Reads one response frame from `stream` and returns its body (header included).
pub fn read_frame(stream: &mut impl Read) -> anyhow::Result<Bytes> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size)?;
    let size = i32::from_be_bytes(size);
    anyhow::ensure!(size >= 4, "bad response size {size}");
    let mut body = vec![0; size as usize];
    stream.read_exact(&mut body)?;
    Ok(Bytes::from(body))
}

/// True when `haystack` contains `needle` as bytes.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
