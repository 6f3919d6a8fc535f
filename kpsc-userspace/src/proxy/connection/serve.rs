//! Setting one connection up: the client's TLS handshake, connect to the broker, run both
//! directions, log and count how it ended.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, split},
    net::TcpStream,
    sync::mpsc,
    time::{Duration, timeout},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::either::Either;
use tracing::{debug, info, warn};

use crate::{
    kafka::sasl,
    proxy::{
        bulk::{
            copy::CopyMover,
            sockmap::{self, KernelConn},
            tcp::TcpMover,
            transfer::Transfer,
            uring::{UringMover, socket},
        },
        connection::{
            error::ConnError, kernel_requests::forward_requests_kernel,
            kernel_responses::forward_responses_kernel, requests::forward_requests,
            responses::forward_responses,
        },
        listeners::Route,
        state::ProxyState,
    },
    tls::listener::refusal_reason,
    upstream::BrokerStream,
};

/// The client's side: plain TCP, or TLS terminated here.
type ClientStream = Either<TcpStream, TlsStream<TcpStream>>;

/// Serves one accepted client connection to completion, logging and counting how it ended.
/// Nothing reaches a broker before the client is admitted (PROXY header, allow-lists, TLS
/// handshake with its client certificate).
pub async fn serve(mut client: TcpStream, peer: SocketAddr, route: Route, state: Arc<ProxyState>) {
    let Some(who) = state
        .gate
        .admit(&mut client, peer, route.listen_port, &state.metrics)
        .await
    else {
        return;
    };
    // Behind a cloud endpoint the peer is the endpoint's NAT address: the header's source
    // and endpoint id are what tell clients apart.
    let client_addr = who.addr;
    let endpoint_id = who.endpoint.as_ref().map(ToString::to_string);
    let endpoint_id = endpoint_id.as_deref().unwrap_or("-");
    if let Some(version) = who.header_version {
        info!(
            client = %client_addr,
            %peer,
            endpoint_id = %endpoint_id,
            cloud = who.endpoint.as_ref().map_or("-", |id| id.cloud()),
            proxy_protocol = version,
            listen_port = route.listen_port,
            broker = %route.broker,
            "client connected"
        );
    }
    client.set_nodelay(true).ok();
    let Some(client) = handshake(client, client_addr, peer, &route, &state).await else {
        return;
    };
    route.counters.connections_total.inc();
    route.counters.connections_open.inc();
    let read_before = who.header_version.is_some();
    let result = run(client, read_before, &route, &state).await;
    route.counters.connections_open.dec();
    match result {
        Ok(()) => {
            debug!(client = %client_addr, endpoint_id = %endpoint_id, listen_port = route.listen_port, broker = %route.broker, "connection closed")
        }
        Err(e) => {
            state.metrics.connection_error(e.reason());
            if e.is_fault() {
                warn!(client = %client_addr, endpoint_id = %endpoint_id, listen_port = route.listen_port, broker = %route.broker, error = %e, "connection closed on error");
            } else {
                debug!(client = %client_addr, endpoint_id = %endpoint_id, listen_port = route.listen_port, broker = %route.broker, error = %e, "client left");
            }
        }
    }
}

/// How long a client may take for its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's TLS handshake when the listeners serve TLS, before any broker is dialled:
/// a client that is not speaking TLS, or lacks the certificate asked for, costs no broker
/// connection. A failure is a refusal (counted by reason, logged rate-limited per source).
async fn handshake(
    client: TcpStream,
    client_addr: SocketAddr,
    peer: SocketAddr,
    route: &Route,
    state: &ProxyState,
) -> Option<ClientStream> {
    let Some(tls) = &state.config.access.tls else {
        return Some(Either::Left(client));
    };
    let accepted = timeout(
        TLS_HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(Arc::clone(&tls.config)).accept(client),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    match accepted {
        Ok(stream) => Some(Either::Right(stream)),
        // Closed during the handshake without an alert (a TCP health check): not a refusal.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!(%peer, listen_port = route.listen_port, "client closed during the TLS handshake");
            None
        }
        Err(e) => {
            let error = format!("client TLS handshake failed (--proxy-listener-tls-enable): {e}");
            let reason = refusal_reason(&e);
            state.gate.refuse(
                client_addr.ip(),
                peer,
                route.listen_port,
                reason,
                &error,
                &state.metrics,
            );
            None
        }
    }
}

/// `read_before`: kpscd read a PROXY header from the client socket.
async fn run(
    client: ClientStream,
    read_before: bool,
    route: &Route,
    state: &ProxyState,
) -> Result<(), ConnError> {
    let mut upstream = state.upstream.connect(&route.broker).await?;
    // --sasl-enable: the connection is authenticated before the client's first byte.
    if let Some(creds) = &state.config.upstream_sasl.credentials {
        let broker = route.broker.to_string();
        timeout(
            state.config.common.dial_timeout,
            sasl::authenticate(&mut upstream, creds, &broker),
        )
        .await
        .map_err(|_| ConnError::SaslTimeout(broker.clone()))??;
    }
    match (client, upstream) {
        (Either::Left(client), BrokerStream::Plain(upstream)) => {
            if let Some(conn) = kernel_conn(state, &client, &upstream, read_before)? {
                return proxy_kernel(client, upstream, conn, route, state).await;
            }
            // A ring whose thread failed takes no more connections: they splice instead.
            if let Some(ring) = state.uring.as_ref().filter(|ring| ring.alive()) {
                let spliced = &state.metrics.spliced_bytes;
                let movers = (
                    UringMover::new(Arc::clone(ring), spliced.clone()),
                    UringMover::new(Arc::clone(ring), spliced.clone()),
                );
                let client = socket::split(client).map_err(ConnError::Uring)?;
                let upstream = socket::split(upstream).map_err(ConnError::Uring)?;
                return proxy_streams(client, upstream, movers, route, state).await;
            }
            let (client_r, client_w) = client.into_split();
            let (upstream_r, upstream_w) = upstream.into_split();
            let transfer = state.config.bulk_transfer;
            let spliced = &state.metrics.spliced_bytes;
            proxy_streams(
                (client_r, client_w),
                (upstream_r, upstream_w),
                (
                    TcpMover::new(transfer, spliced.clone()),
                    TcpMover::new(transfer, spliced.clone()),
                ),
                route,
                state,
            )
            .await
        }
        // TLS on either side: its bytes cannot be spliced; both directions are copied.
        (client, upstream) => {
            proxy_streams(
                split(client),
                split(upstream),
                (CopyMover, CopyMover),
                route,
                state,
            )
            .await
        }
    }
}

/// The connection's place on the kernel path, if `--bulk-transfer sockmap` is on and it
/// can have one.
fn kernel_conn(
    state: &ProxyState,
    client: &TcpStream,
    upstream: &TcpStream,
    read_before: bool,
) -> Result<Option<KernelConn>, ConnError> {
    let Some(path) = &state.kernel_path else {
        return Ok(None);
    };
    // The verdict sees whole skbs: one a PROXY header was read out of would be framed
    // from its start. Such a connection (its first request came with the header) splices.
    if read_before && sockmap::socket::unread_bytes(client).map_err(ConnError::KernelPath)? > 0 {
        debug!("first request arrived with the PROXY header; this connection splices");
        return Ok(None);
    }
    let conn = path
        .register(client, upstream)
        .map_err(|e| ConnError::KernelPath(std::io::Error::other(format!("{e:#}"))))?;
    Ok(conn)
}

/// Both directions of a connection whose requests the kernel carries.
async fn proxy_kernel(
    client: TcpStream,
    upstream: TcpStream,
    conn: KernelConn,
    route: &Route,
    state: &ProxyState,
) -> Result<(), ConnError> {
    let (client_r, mut client_w) = client.into_split();
    let (upstream_r, mut upstream_w) = upstream.into_split();
    let (in_flight_tx, in_flight_rx) = mpsc::channel(state.config.max_in_flight);
    let result = both_directions(
        forward_requests_kernel(client_r, &mut upstream_w, in_flight_tx, &conn, route, state),
        forward_responses_kernel(upstream_r, &mut client_w, in_flight_rx, &conn, route, state),
    )
    .await;
    // However the connection ended, what the kernel carried is counted.
    conn.account(&route.counters);
    let _ = timeout(CLIENT_SHUTDOWN_TIMEOUT, client_w.shutdown()).await;
    result
}

/// Runs a connection's two directions: when the client stops sending, what is still in
/// flight is delivered; when the broker side ends, nothing more can be answered.
async fn both_directions(
    requests: impl Future<Output = Result<(), ConnError>>,
    responses: impl Future<Output = Result<(), ConnError>>,
) -> Result<(), ConnError> {
    tokio::pin!(requests, responses);
    tokio::select! {
        r = &mut requests => match r {
            Ok(()) => responses.await,
            Err(e) => Err(e),
        },
        r = &mut responses => r,
    }
}

/// How long a finished connection may take to deliver its last bytes and its close to the
/// client (TLS close_notify) before it is dropped anyway.
const CLIENT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Both directions of one proxied connection, over any streams.
pub async fn proxy_streams<CR, CW, UR, UW, Up, Down>(
    (client_r, mut client_w): (CR, CW),
    (upstream_r, mut upstream_w): (UR, UW),
    (up, down): (Up, Down),
    route: &Route,
    state: &ProxyState,
) -> Result<(), ConnError>
where
    CR: AsyncRead + Unpin + Send,
    CW: AsyncWrite + Unpin + Send,
    UR: AsyncRead + Unpin + Send,
    UW: AsyncWrite + Unpin + Send,
    Up: Transfer<CR, UW>,
    Down: Transfer<UR, CW>,
{
    // The upstream write half outlives both loops: dropping it sends FIN, and brokers drop
    // the responses still owed on a connection whose client side has closed.
    let (in_flight_tx, in_flight_rx) = mpsc::channel(state.config.max_in_flight);
    let result = both_directions(
        forward_requests(client_r, &mut upstream_w, up, in_flight_tx, route, state),
        forward_responses(upstream_r, &mut client_w, down, in_flight_rx, route, state),
    )
    .await;
    // A TLS client learns of a clean end from close_notify (dropping would only close the
    // socket); on TCP this is the FIN the drop would send. The connection ends either way,
    // so a failure here changes nothing.
    let _ = timeout(CLIENT_SHUTDOWN_TIMEOUT, client_w.shutdown()).await;
    result
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;
    use crate::{
        config::proxy::{ProxyArgs, ProxyConfig},
        mapping::addr::BrokerAddr,
    };

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    fn request(api_key: i16, version: i16, correlation_id: i32, rest: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&api_key.to_be_bytes());
        body.extend_from_slice(&version.to_be_bytes());
        body.extend_from_slice(&correlation_id.to_be_bytes());
        body.extend_from_slice(&(-1i16).to_be_bytes()); // null client id
        body.extend_from_slice(rest);
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }

    fn response(correlation_id: i32, rest: &[u8]) -> Vec<u8> {
        let mut frame = ((4 + rest.len()) as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&correlation_id.to_be_bytes());
        frame.extend_from_slice(rest);
        frame
    }

    async fn read_frame(stream: &mut DuplexStream) -> Vec<u8> {
        let mut size = [0; 4];
        stream.read_exact(&mut size).await.unwrap();
        let mut body = vec![0; i32::from_be_bytes(size) as usize];
        stream.read_exact(&mut body).await.unwrap();
        [size.to_vec(), body].concat()
    }

    /// A proxy state whose only broker is 127.0.0.1:9 (never dialled: tests hand the
    /// forwarder their own streams), and the route of its listen port.
    fn state() -> (Arc<ProxyState>, Route) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mapping = format!("127.0.0.1:9,127.0.0.1:{port},proxy.example:{port}");
        let cli = Cli::try_parse_from([
            "kpscd",
            "--bootstrap-server-mapping",
            &mapping,
            "--dynamic-listeners-disable",
            "--http-disable",
        ])
        .unwrap();
        let (state, _incoming) =
            ProxyState::start(ProxyConfig::resolve(cli.proxy).unwrap()).unwrap();
        let route = Route {
            listen_port: port,
            broker: BrokerAddr::new("127.0.0.1", 9),
            counters: state.metrics.port(port, "127.0.0.1:9"),
        };
        (state, route)
    }

    /// Runs the forwarder between an in-memory client and broker: the client sends
    /// `requests` and reads `expect` responses; the broker reads `forwarded` requests and
    /// then writes `answers`. Returns (requests the broker got, responses the client got).
    async fn exchange(
        requests: Vec<u8>,
        forwarded: usize,
        answers: Vec<u8>,
        expect: usize,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Route) {
        let (state, route) = state();
        let (mut client, client_side) = duplex(1 << 16);
        let (upstream_side, mut broker) = duplex(1 << 16);
        let (client_r, client_w) = split(client_side);
        let (upstream_r, upstream_w) = split(upstream_side);
        let client_task = tokio::spawn(async move {
            client.write_all(&requests).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..expect {
                got.push(read_frame(&mut client).await);
            }
            client.shutdown().await.unwrap();
            got
        });
        let broker_task = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..forwarded {
                got.push(read_frame(&mut broker).await);
            }
            broker.write_all(&answers).await.unwrap();
            got
        });
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            proxy_streams(
                (client_r, client_w),
                (upstream_r, upstream_w),
                (CopyMover, CopyMover),
                &route,
                &state,
            ),
        )
        .await;
        result
            .expect("the forwarder hung: a response was lost")
            .unwrap();
        (
            broker_task.await.unwrap(),
            client_task.await.unwrap(),
            route,
        )
    }

    fn produce_acks0(correlation_id: i32) -> Vec<u8> {
        // v7: transactional_id null, acks 0, timeout 30 s, no topics.
        request(
            0,
            7,
            correlation_id,
            &[0xff, 0xff, 0, 0, 0, 0, 0x75, 0x30, 0, 0, 0, 0],
        )
    }

    /// The forwarder over in-memory streams: a request kpsc answers itself, an acks=0
    /// produce (no response will come) and opaque requests are answered to the client in
    /// request order, and nothing kpsc answers reaches the broker.
    #[tokio::test]
    async fn responses_keep_request_order_over_in_memory_streams() {
        let heartbeat_1 = request(12, 0, 2, b"heartbeat one");
        let heartbeat_2 = request(12, 0, 4, b"heartbeat two");
        let sent = [
            request(18, 99, 1, &[]), // ApiVersions newer than kpsc decodes
            heartbeat_1.clone(),
            produce_acks0(3),
            heartbeat_2.clone(),
        ]
        .concat();
        let answers = [response(2, b"first"), response(4, b"second")].concat();
        let (forwarded, got, route) = exchange(sent, 3, answers, 3).await;
        assert_eq!(forwarded, [heartbeat_1, produce_acks0(3), heartbeat_2]);
        let [local, first, second] = <[Vec<u8>; 3]>::try_from(got).unwrap();
        assert_eq!(&local[4..8], &1i32.to_be_bytes(), "kpsc's own answer first");
        assert_eq!(&local[8..10], &35i16.to_be_bytes(), "UNSUPPORTED_VERSION");
        assert_eq!(first, response(2, b"first"));
        assert_eq!(second, response(4, b"second"));
        assert_eq!(
            route.counters.bytes_to_client.get(),
            (local.len() + first.len() + second.len()) as u64
        );
    }

    /// A client may reuse the correlation id of an acks=0 produce for its next request: the
    /// broker answers only that request, and the answer must reach the client (it used to
    /// be dropped as the produce's, and the client hung).
    #[tokio::test]
    async fn a_reused_acks0_correlation_id_still_gets_its_answer() {
        use kafka_protocol::{
            messages::{BrokerId, MetadataResponse, metadata_response::MetadataResponseBroker},
            protocol::{Decodable, Encodable, StrBytes},
        };
        let metadata = MetadataResponse::default().with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(1))
                .with_host(StrBytes::from_static_str("127.0.0.1"))
                .with_port(9),
        ]);
        let mut body = bytes::BytesMut::new();
        metadata.encode(&mut body, 1).unwrap();
        let sent = [produce_acks0(7), request(3, 1, 7, &[0, 0, 0, 0])].concat();
        let (forwarded, got, _) = exchange(sent, 2, response(7, &body), 1).await;
        assert_eq!(forwarded.len(), 2);
        let mut answer = bytes::Bytes::from(got[0][8..].to_vec());
        assert_eq!(&got[0][4..8], &7i32.to_be_bytes());
        let rewritten = MetadataResponse::decode(&mut answer, 1).unwrap();
        assert_eq!(rewritten.brokers[0].host.as_str(), "proxy.example");
    }

    /// A response much larger than the socket buffers, to a TLS client that is not reading
    /// when kpsc writes the response's end: the end must still be sent. rustls keeps what
    /// it accepted queued until flushed, and kpsc used to never flush: the client waited
    /// for the tail forever. Real sockets with small buffers (kernel autotuning would make
    /// the race rare), a real rustls client; the broker is an in-memory stream.
    #[tokio::test]
    async fn a_tls_client_gets_the_whole_response_after_pausing() {
        use tokio::net::{TcpSocket, TcpStream};
        use tokio_rustls::{
            TlsConnector,
            rustls::{self, pki_types::ServerName},
        };

        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        // Accepted sockets inherit the listener's small send buffer.
        let listener = TcpSocket::new_v4().unwrap();
        listener.set_send_buffer_size(4096).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = listener.listen(1).unwrap();
        let client_socket = TcpSocket::new_v4().unwrap();
        client_socket.set_recv_buffer_size(4096).unwrap();
        let (client, accepted) = tokio::join!(client_socket.connect(addr), listener.accept());
        let (client, (accepted, _)): (TcpStream, _) = (client.unwrap(), accepted.unwrap());

        let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let answer = response(5, &payload);
        let (state, route) = state();
        let (upstream_side, mut broker) = duplex(1 << 16);
        let proxy = tokio::spawn(async move {
            let tls = TlsAcceptor::from(Arc::new(server_config))
                .accept(accepted)
                .await
                .unwrap();
            proxy_streams(
                split(tls),
                split(upstream_side),
                (CopyMover, CopyMover),
                &route,
                &state,
            )
            .await
        });
        let heartbeat = request(12, 0, 5, b"heartbeat");
        let broker_task = tokio::spawn(async move {
            let got = read_frame(&mut broker).await;
            broker.write_all(&answer).await.unwrap();
            (got, broker)
        });
        let mut client = TlsConnector::from(Arc::new(client_config))
            .connect(ServerName::try_from("localhost").unwrap(), client)
            .await
            .unwrap();
        client.write_all(&heartbeat).await.unwrap();
        client.flush().await.unwrap();
        // Not reading: kpsc fills the socket buffers and rustls' queue.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut got = vec![0; 8 + payload.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the end of the response never came")
            .unwrap();
        assert_eq!(got, response(5, &payload));
        let (forwarded, _broker) = broker_task.await.unwrap();
        assert_eq!(forwarded, heartbeat);
        // The client leaves; the connection ends cleanly.
        client.shutdown().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), proxy).await;
        ended.expect("the connection did not end").unwrap().unwrap();
        // kpsc said goodbye with close_notify: rustls reports a bare TCP close as an error.
        let mut rest = [0u8; 1];
        assert_eq!(client.read(&mut rest).await.unwrap(), 0);
    }
}
