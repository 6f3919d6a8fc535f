//! Real captures. librdkafka's mock cluster and the tansu broker answer real clients
//! (rdkafka producers with every `acks`, an idempotent and a transactional producer, a
//! consumer group) and a raw client asking for every version of ApiVersions, Metadata,
//! FindCoordinator and DescribeCluster the broker offers. A recording proxy in front of
//! each broker keeps every request and response frame as the broker sent it; it rewrites
//! broker addresses in the responses it forwards (with kpsc's own rewrite) so the clients
//! keep talking through it. Everything listens on 127.0.0.1.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsRequest, ApiVersionsResponse, DescribeClusterRequest,
        FindCoordinatorRequest, MetadataRequest, TopicName, metadata_request::MetadataRequestTopic,
    },
    protocol::{Encodable, HeaderVersion, StrBytes},
};
use kpsc::{
    kafka::guarded,
    proxy::rewrite::{api_versions, apis, declaration::Advertised},
};
use kpsc_tests::{MockCluster, RawClient, Tansu};
use rdkafka::{
    ClientConfig, Message as _,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, tcp::OwnedReadHalf},
};

const TOPIC: &str = "fuzz-seed";
const GROUP: &str = "fuzz-seed-group";
/// Bytes of each connection's stream kept for the frame reader's seeds.
const STREAM_KEEP: usize = 4096;

/// One request and the broker's answer (frame bodies, size prefix removed).
pub struct Exchange {
    pub source: &'static str,
    pub api_key: i16,
    pub version: i16,
    pub request: Vec<u8>,
    pub response: Option<Vec<u8>>,
}

/// The first bytes of one direction of one connection.
pub struct Stream {
    pub source: &'static str,
    pub from_client: bool,
    pub bytes: Vec<u8>,
}

#[derive(Default)]
pub struct Capture {
    pub exchanges: Vec<Exchange>,
    pub streams: Vec<Stream>,
}

pub fn mock_cluster() -> anyhow::Result<Capture> {
    let cluster = MockCluster::new(3)?;
    cluster.create_topic(TOPIC, 3)?;
    let brokers: Vec<SocketAddr> = cluster
        .broker_addrs()
        .iter()
        .map(|b| b.parse().with_context(|| format!("mock broker {b}")))
        .collect::<Result<_, _>>()?;
    record("mock", &brokers)
}

/// The tansu broker `TANSU_BIN` names (the test venv's by default).
pub fn tansu() -> anyhow::Result<Capture> {
    let tansu = Tansu::start()?;
    record("tansu", &[tansu.addr().parse()?])
}

fn record(source: &'static str, brokers: &[SocketAddr]) -> anyhow::Result<Capture> {
    let runtime = tokio::runtime::Runtime::new()?;
    let capture = Arc::new(Mutex::new(Capture::default()));
    // Broker port -> its recording proxy's port (all on 127.0.0.1).
    let mut routes = HashMap::new();
    let mut fronts = Vec::new();
    for &broker in brokers {
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let front = listener.local_addr()?;
        routes.insert(i32::from(broker.port()), i32::from(front.port()));
        fronts.push((listener, broker));
    }
    let routes = Arc::new(routes);
    let mut bootstrap = Vec::new();
    for (listener, broker) in fronts {
        bootstrap.push(listener.local_addr()?.to_string());
        let (capture, routes) = (capture.clone(), routes.clone());
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (capture, routes) = (capture.clone(), routes.clone());
                tokio::spawn(async move {
                    let _ = relay(source, client, broker, capture, routes).await;
                });
            }
        });
    }

    for front in &bootstrap {
        if let Err(e) = raw_client(front.parse()?) {
            eprintln!("seed: {source}: raw client via {front}: {e:#}");
        }
    }
    if let Err(e) = clients(&bootstrap.join(",")) {
        eprintln!("seed: {source}: clients: {e:#}");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    let capture = std::mem::take(&mut *capture.lock().unwrap());
    Ok(capture)
}

/// Forwards one client connection to `broker`, recording both directions.
async fn relay(
    source: &'static str,
    client: tokio::net::TcpStream,
    broker: SocketAddr,
    capture: Arc<Mutex<Capture>>,
    routes: Arc<HashMap<i32, i32>>,
) -> anyhow::Result<()> {
    let upstream = tokio::net::TcpStream::connect(broker).await?;
    let (mut client_r, mut client_w) = client.into_split();
    let (mut broker_r, mut broker_w) = upstream.into_split();
    // correlation id -> index of its exchange
    let pending = Arc::new(Mutex::new(HashMap::<i32, usize>::new()));
    let requests = {
        let (capture, pending) = (capture.clone(), pending.clone());
        async move {
            let mut kept = Vec::new();
            while let Some(body) = read_frame(&mut client_r).await {
                keep(&mut kept, &body);
                if body.len() >= 8 {
                    let mut log = capture.lock().unwrap();
                    pending.lock().unwrap().insert(
                        i32::from_be_bytes(body[4..8].try_into().unwrap()),
                        log.exchanges.len(),
                    );
                    log.exchanges.push(Exchange {
                        source,
                        api_key: i16::from_be_bytes([body[0], body[1]]),
                        version: i16::from_be_bytes([body[2], body[3]]),
                        request: body.clone(),
                        response: None,
                    });
                }
                if write_frame(&mut broker_w, &body).await.is_err() {
                    break;
                }
            }
            kept
        }
    };
    let responses = {
        let (capture, pending) = (capture.clone(), pending.clone());
        async move {
            let mut kept = Vec::new();
            while let Some(body) = read_frame(&mut broker_r).await {
                keep(&mut kept, &body);
                let mut forward = body.clone();
                if body.len() >= 4 {
                    let correlation_id = i32::from_be_bytes(body[..4].try_into().unwrap());
                    let index = pending.lock().unwrap().remove(&correlation_id);
                    if let Some(index) = index {
                        let mut log = capture.lock().unwrap();
                        let exchange = &mut log.exchanges[index];
                        exchange.response = Some(body.clone());
                        if let Some(rewritten) =
                            rewrite(exchange.api_key, exchange.version, &body, &routes)
                        {
                            forward = rewritten;
                        }
                    }
                }
                if write_frame(&mut client_w, &forward).await.is_err() {
                    break;
                }
            }
            kept
        }
    };
    let (from_client, from_broker) = tokio::join!(requests, responses);
    let mut log = capture.lock().unwrap();
    for (from_client, bytes) in [(true, from_client), (false, from_broker)] {
        if !bytes.is_empty() {
            log.streams.push(Stream {
                source,
                from_client,
                bytes,
            });
        }
    }
    Ok(())
}

/// Appends a whole frame (size prefix included) to `kept` while it stays under the limit.
fn keep(kept: &mut Vec<u8>, body: &[u8]) {
    if kept.len() + 4 + body.len() <= STREAM_KEEP {
        kept.extend_from_slice(&(body.len() as i32).to_be_bytes());
        kept.extend_from_slice(body);
    }
}

async fn read_frame(r: &mut OwnedReadHalf) -> Option<Vec<u8>> {
    let size = r.read_i32().await.ok()?;
    let mut body = vec![0; usize::try_from(size).ok()?];
    r.read_exact(&mut body).await.ok()?;
    Some(body)
}

async fn write_frame(w: &mut tokio::net::tcp::OwnedWriteHalf, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&(body.len() as i32).to_be_bytes()).await?;
    w.write_all(body).await
}

/// Points every broker address in an address-bearing response at its recording proxy.
fn rewrite(api_key: i16, version: i16, body: &[u8], routes: &HashMap<i32, i32>) -> Option<Vec<u8>> {
    let mut response = apis::decode(api_key, version, Bytes::copy_from_slice(body)).ok()?;
    response
        .rewrite(|endpoint| {
            Some(match routes.get(&endpoint.port) {
                Some(&port) => Advertised {
                    host: "127.0.0.1".to_owned(),
                    port,
                },
                None => Advertised {
                    host: endpoint.host.clone(),
                    port: endpoint.port,
                },
            })
        })
        .ok()?;
    let mut out = BytesMut::new();
    response.encode(&mut out).ok()?;
    Some(out.to_vec())
}

/// rdkafka producers (acks all/1/0, idempotent, transactional) and a consumer group.
fn clients(bootstrap: &str) -> anyhow::Result<()> {
    let config = |extra: &[(&str, &str)]| {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap)
            .set("client.id", "kpsc-seed")
            .set("log_level", "3");
        for (k, v) in extra {
            c.set(*k, *v);
        }
        c
    };
    let producers: &[&[(&str, &str)]] = &[
        &[("acks", "all")],
        &[("acks", "1"), ("compression.type", "lz4")],
        &[("acks", "0")],
        &[("enable.idempotence", "true")],
    ];
    for extra in producers {
        let producer: BaseProducer = config(extra).create()?;
        for i in 0..5 {
            let payload = format!("message {i}");
            let key = format!("key-{i}");
            let record = BaseRecord::to(TOPIC).key(&key).payload(&payload);
            if let Err((e, _)) = producer.send(record) {
                eprintln!("seed: produce: {e}");
            }
        }
        if let Err(e) = producer.flush(Duration::from_secs(10)) {
            eprintln!("seed: flush {extra:?}: {e}");
        }
    }
    let transactional: BaseProducer = config(&[("transactional.id", "fuzz-seed-txn")]).create()?;
    let timeout = Duration::from_secs(10);
    let txn = transactional
        .init_transactions(timeout)
        .and_then(|()| transactional.begin_transaction())
        .and_then(|()| {
            transactional
                .send(BaseRecord::to(TOPIC).key("txn").payload("in a transaction"))
                .map_err(|(e, _)| e)
        })
        .and_then(|()| transactional.commit_transaction(timeout));
    if let Err(e) = txn {
        eprintln!("seed: transactional producer: {e}");
    }

    let consumer: BaseConsumer = config(&[
        ("group.id", GROUP),
        ("auto.offset.reset", "earliest"),
        ("enable.auto.commit", "false"),
    ])
    .create()?;
    consumer.subscribe(&[TOPIC])?;
    let started = Instant::now();
    let mut received = 0;
    while received < 10 && started.elapsed() < Duration::from_secs(30) {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                received += 1;
                let _ = message.offset();
            }
            Some(Err(e)) => eprintln!("seed: consume: {e}"),
            None => {}
        }
    }
    if received > 0 {
        let _ = consumer.commit_consumer_state(CommitMode::Sync);
    }
    consumer.unsubscribe();
    eprintln!("seed: consumed {received} messages");
    Ok(())
}

/// Every version of ApiVersions, Metadata, FindCoordinator and DescribeCluster the broker
/// offers (up to what kafka-protocol encodes), over one connection.
fn raw_client(front: SocketAddr) -> anyhow::Result<()> {
    let mut raw = Raw::connect(front)?;
    let offered = raw.call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
    let offered = guarded::decode_response::<ApiVersionsResponse>(
        ApiKey::ApiVersions as i16,
        0,
        0,
        &api_versions::SCHEMA,
        offered,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .message;
    let max = |key: ApiKey, ours: i16| {
        offered
            .api_keys
            .iter()
            .find(|k| k.api_key == key as i16)
            .map(|k| (k.min_version, k.max_version.min(ours)))
    };
    if let Some((min, max)) = max(ApiKey::ApiVersions, 4) {
        for v in min.max(1)..=max {
            let request = ApiVersionsRequest::default()
                .with_client_software_name(StrBytes::from_static_str("kpsc-seed"))
                .with_client_software_version(StrBytes::from_static_str("1.0"));
            raw.try_call(ApiKey::ApiVersions, v, &request);
        }
    }
    if let Some((min, max)) = max(ApiKey::Metadata, 13) {
        for v in min..=max {
            let all = MetadataRequest::default().with_topics((v == 0).then(Vec::new));
            raw.try_call(ApiKey::Metadata, v, &all);
            let one = MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str(TOPIC)))),
            ]));
            raw.try_call(ApiKey::Metadata, v, &one);
        }
    }
    if let Some((min, max)) = max(ApiKey::FindCoordinator, 6) {
        for v in min..=max {
            for key_type in [0, 1] {
                if key_type == 1 && v == 0 {
                    continue;
                }
                let key = StrBytes::from_static_str(if key_type == 0 {
                    GROUP
                } else {
                    "fuzz-seed-txn"
                });
                let request = if v < 4 {
                    FindCoordinatorRequest::default().with_key(key)
                } else {
                    FindCoordinatorRequest::default().with_coordinator_keys(vec![key])
                };
                raw.try_call(ApiKey::FindCoordinator, v, &request.with_key_type(key_type));
            }
        }
    }
    if let Some((min, max)) = max(ApiKey::DescribeCluster, 2) {
        for v in min..=max {
            raw.try_call(
                ApiKey::DescribeCluster,
                v,
                &DescribeClusterRequest::default(),
            );
        }
    }
    Ok(())
}

/// A raw client through one recording proxy; a failed call (the broker refusing the
/// version, say) is logged and the next call gets a new connection.
struct Raw {
    front: String,
    client: RawClient,
}

impl Raw {
    fn connect(front: SocketAddr) -> anyhow::Result<Self> {
        let front = front.to_string();
        let client = RawClient::connect(&front)?;
        Ok(Self { front, client })
    }

    fn call<R: Encodable + HeaderVersion>(
        &mut self,
        api: ApiKey,
        version: i16,
        request: &R,
    ) -> anyhow::Result<Bytes> {
        self.client
            .send(api, version, request)
            .with_context(|| format!("{api:?} v{version}"))?;
        self.client.recv_raw()
    }

    fn try_call<R: Encodable + HeaderVersion>(&mut self, api: ApiKey, version: i16, request: &R) {
        if let Err(e) = self.call(api, version, request) {
            eprintln!("seed: {api:?} v{version} via {}: {e:#}", self.front);
            match RawClient::connect(&self.front) {
                Ok(fresh) => self.client = fresh,
                Err(e) => eprintln!("seed: reconnecting to {}: {e}", self.front),
            }
        }
    }
}
