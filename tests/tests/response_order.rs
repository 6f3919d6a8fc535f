//! Response order when one Metadata response is held back while 100+ Produce and Fetch
//! responses queue behind it on the same connection (issue 9), under each of
//! `--bulk-transfer copy`, `splice` and `sockmap` (sockmap needs root):
//! - natural: librdkafka's mock cluster with some 12,000 partitions, so the Metadata
//!   response kpscd must rewrite is about 300 KiB, followed in the same write by 120
//!   Produce (acks=1, up to 1 MiB) and Fetch requests, then Metadata, FindCoordinator,
//!   Produce (acks=1 and acks=0), Fetch and ApiVersions interleaved;
//! - forced: the same pipeline through [`ResponseDelayShim`] (a fault injector between
//!   kpscd and the mock), which holds the first Metadata response 300 ms until 100+
//!   responses queue behind it, then lets them go in one write, or dribbles the Metadata
//!   response out in 7-byte pieces, its last piece in the same write as the rest;
//! - the forced case against a broker that leaves acks=0 unanswered, as Kafka does (the
//!   shim drops the mock's answers to them).
//!
//! The client matches responses by order (correlation ids repeat on purpose) and checks
//! each against its request: brokers in Metadata and FindCoordinator exactly kpscd's
//! advertised list, produce offsets and partitions, fetch high watermarks and records, no
//! real broker (or shim) address anywhere in any response's bytes; behind the shim, every
//! response is also byte for byte what the broker sent, addresses replaced. The records
//! read back afterwards equal those produced; nothing answers acks=0 (the mock does, kpscd
//! must drop it). The client half-closes after its last write, while responses are still
//! held; kpscd must end the connection only after the last of them. Under sockmap kpscd's
//! kernel counters must show the kernel carried requests and kpscd handled the
//! ApiVersions ones.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use bytes::Bytes;
use kafka_protocol::{
    messages::{
        ApiKey, ApiVersionsResponse, FetchResponse, FindCoordinatorResponse, MetadataRequest,
        MetadataResponse, ProduceResponse,
    },
    protocol::StrBytes,
};
use kpsc_tests::{
    Kpscd, MockCluster, REAL_BROKER_HOST, advertised_addresses, contains_bytes, free_port_base,
    kernel_path::{kernel_accounted, kernel_counters},
    proxy_args,
    raw_pipeline::{
        CLIENT_ID, Req, TOPIC, consume_all, decode, edited_response, fetch_request, read_frame,
        record_values, value,
    },
    request_body,
    response_delay_shim::{HoldPlan, Release, ResponseDelayShim, SHIM_HOST, proxy_behind_shim},
};

const PARTITIONS: i32 = 8;
/// Requests in the write that follows the held Metadata request.
const BURST: usize = 120;
/// Requests after the burst, each in its own write.
const TAIL: usize = 40;
/// Correlation ids of acks=0 Produce requests start here: librdkafka's mock answers them
/// (Kafka does not) and kpscd drops those answers, so their ids must not be ones it waits
/// for.
const ACKS0_IDS: i32 = 100_000;
/// Topics beside [`TOPIC`], and partitions each, that make a Metadata response for all
/// topics about 300 KiB (few topics: the mock takes about 0.2 s to create each one).
const LARGE: (usize, i32) = (4, 3000);

/// One request of the pipeline.
#[derive(Clone, Debug)]
enum Ask {
    /// One of the shared pipeline requests (Metadata names only [`TOPIC`]).
    One(Req),
    /// Metadata v12 for every topic: large on a cluster with many partitions.
    AllTopics,
    /// Fetch v11 of [`TOPIC`] from `offset`, up to 2 MiB.
    Fetch { partition: i32, offset: i64 },
}

impl Ask {
    fn frame(&self, id: i32) -> Vec<u8> {
        let body = match self {
            Ask::One(req) => return req.frame(id),
            Ask::AllTopics => request_body(
                ApiKey::Metadata,
                12,
                id,
                CLIENT_ID,
                &MetadataRequest::default().with_topics(None),
            ),
            Ask::Fetch { partition, offset } => request_body(
                ApiKey::Fetch,
                11,
                id,
                CLIENT_ID,
                &fetch_request(*partition, *offset, 2 << 20),
            ),
        }
        .unwrap();
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }
}

/// The `n`th Produce of the pipeline (from 0), to partition `n` mod [`PARTITIONS`].
fn produce(n: usize, acks: i16, tag: &str) -> Ask {
    // The first batch of each partition is small, so a Fetch from offset 0 within 256 KiB
    // always returns records; then sizes up to 1 MiB (the mock keeps 5 MiB a partition).
    const SIZES: [usize; 6] = [120, 3_000, 16_000, 70_000, 150_000, 400_000];
    let size = if n < PARTITIONS as usize {
        200
    } else if n.is_multiple_of(23) {
        1 << 20
    } else {
        SIZES[n % SIZES.len()]
    };
    Ask::One(Req::Produce {
        version: if n.is_multiple_of(2) { 7 } else { 9 },
        acks,
        partition: (n % PARTITIONS as usize) as i32,
        value: value(&format!("{tag}-{n}-"), size),
    })
}

/// Builds the pipeline: correlation ids repeat (mod 37), so responses are matched by
/// order; a Fetch asks for the latest batch of its partition, so it answers with up to
/// 1 MiB.
struct Builder<'t> {
    tag: &'t str,
    requests: usize,
    produced: Vec<usize>,
}

impl Builder<'_> {
    fn next(&mut self, ask: Ask) -> (i32, Ask) {
        self.requests += 1;
        (((self.requests - 1) % 37) as i32, ask)
    }

    fn produce(&mut self, acks: i16) -> (i32, Ask) {
        let n: usize = self.produced.iter().sum();
        self.produced[n % PARTITIONS as usize] += 1;
        let (id, ask) = self.next(produce(n, acks, self.tag));
        match acks {
            0 => (ACKS0_IDS + n as i32, ask),
            _ => (id, ask),
        }
    }

    fn fetch(&mut self, partition: i32) -> (i32, Ask) {
        let offset = self.produced[partition as usize].saturating_sub(1) as i64;
        self.next(Ask::Fetch { partition, offset })
    }
}

/// The writes of the pipeline, each a list of (correlation id, request): a first Produce
/// alone, then Metadata for all topics with [`BURST`] Produce (acks=1) and Fetch requests
/// behind it in one write, then [`TAIL`] requests of every kind one write each: Metadata,
/// FindCoordinator, Produce with acks=1 and acks=0, Fetch, and ApiVersions (which kpscd
/// handles itself under sockmap, so the request stream moves between the kernel and
/// kpscd while the Metadata response is held).
fn pipeline(tag: &str) -> Vec<Vec<(i32, Ask)>> {
    let mut b = Builder {
        tag,
        requests: 0,
        produced: vec![0; PARTITIONS as usize],
    };
    let mut writes = vec![vec![b.produce(1)]];
    let mut burst = vec![b.next(Ask::AllTopics)];
    for k in 0..BURST {
        let partition = (k / 4 % PARTITIONS as usize) as i32;
        burst.push(if k % 4 == 3 {
            b.fetch(partition)
        } else {
            b.produce(1)
        });
    }
    writes.push(burst);
    for k in 0..TAIL {
        let partition = (k % PARTITIONS as usize) as i32;
        writes.push(vec![match k % 8 {
            0 => b.next(Ask::One(Req::Metadata)),
            2 => b.next(Ask::One(Req::FindCoordinator)),
            3 => b.fetch(partition),
            4 => b.next(Ask::AllTopics),
            5 => b.produce(0),
            6 => b.next(Ask::One(Req::ApiVersions)),
            _ => b.produce(1),
        }]);
    }
    writes
}

/// What the response to a request must say, from the requests before it.
#[derive(Debug)]
enum Expect {
    ApiVersions,
    AllTopics,
    Metadata,
    FindCoordinator,
    Produce {
        version: i16,
        partition: i32,
        offset: i64,
    },
    /// Fetch from `offset`: the high watermark is the count of records produced before
    /// it, the records those from `offset` on.
    Fetch {
        partition: i32,
        offset: usize,
        before: usize,
    },
}

/// Record values per partition, in the order produced.
type Produced = Vec<Vec<Vec<u8>>>;

fn expectations(requests: &[(i32, Ask)]) -> (Vec<(i32, Expect)>, Produced) {
    let mut produced: Produced = vec![Vec::new(); PARTITIONS as usize];
    let expected = requests
        .iter()
        .filter_map(|(id, ask)| {
            let expect = match ask {
                Ask::One(Req::ApiVersions) => Expect::ApiVersions,
                Ask::AllTopics => Expect::AllTopics,
                Ask::One(Req::Metadata) => Expect::Metadata,
                Ask::One(Req::FindCoordinator) => Expect::FindCoordinator,
                Ask::One(Req::Produce {
                    version,
                    acks,
                    partition,
                    value,
                }) => {
                    let log = &mut produced[*partition as usize];
                    log.push(value.clone());
                    if *acks == 0 {
                        return None;
                    }
                    Expect::Produce {
                        version: *version,
                        partition: *partition,
                        offset: log.len() as i64 - 1,
                    }
                }
                Ask::Fetch { partition, offset } => Expect::Fetch {
                    partition: *partition,
                    offset: *offset as usize,
                    before: produced[*partition as usize].len(),
                },
                Ask::One(Req::Fetch { .. }) => unreachable!("not in this pipeline"),
            };
            Some((*id, expect))
        })
        .collect();
    (expected, produced)
}

/// What every response is checked against.
struct Truth {
    /// node id -> (host, port) kpscd advertises.
    advertised: BTreeMap<i32, (String, i32)>,
    /// Every topic of the cluster and its partition count.
    topics: BTreeMap<String, usize>,
    produced: Produced,
    /// Byte strings no response may contain: the real brokers' (and shim's) addresses.
    leaks: Vec<String>,
}

impl Truth {
    fn check_brokers(&self, brokers: &[(i32, String, i32)]) -> anyhow::Result<()> {
        let want: Vec<(i32, String, i32)> = self
            .advertised
            .iter()
            .map(|(id, (host, port))| (*id, host.clone(), *port))
            .collect();
        anyhow::ensure!(brokers == want, "brokers {brokers:?} where {want:?}");
        Ok(())
    }

    fn check(&self, raw: &Bytes, id: i32, expect: &Expect) -> anyhow::Result<()> {
        for leak in &self.leaks {
            anyhow::ensure!(
                !contains_bytes(raw, leak.as_bytes()),
                "{leak:?} in the response"
            );
        }
        match expect {
            Expect::ApiVersions => {
                let r: ApiVersionsResponse = decode(raw, id, 2)?;
                anyhow::ensure!(r.error_code == 0, "ApiVersions error {}", r.error_code);
                let produce = r
                    .api_keys
                    .iter()
                    .find(|k| k.api_key == ApiKey::Produce as i16);
                // --bulk-policy cap: Produce responses never carry addresses.
                anyhow::ensure!(
                    produce.is_some_and(|k| k.max_version <= 9),
                    "Produce not capped: {produce:?}"
                );
            }
            Expect::AllTopics | Expect::Metadata => {
                let r: MetadataResponse = decode(raw, id, 12)?;
                let brokers: Vec<_> = r
                    .brokers
                    .iter()
                    .map(|b| (b.node_id.0, b.host.to_string(), b.port))
                    .collect();
                self.check_brokers(&brokers)?;
                let topics: BTreeMap<String, usize> = r
                    .topics
                    .iter()
                    .map(|t| {
                        let name = t.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
                        (name, t.partitions.len())
                    })
                    .collect();
                let want = match expect {
                    Expect::AllTopics => self.topics.clone(),
                    _ => BTreeMap::from([(TOPIC.to_owned(), PARTITIONS as usize)]),
                };
                anyhow::ensure!(
                    topics == want,
                    "metadata: {} topics, {} partitions, where {} and {}",
                    topics.len(),
                    topics.values().sum::<usize>(),
                    want.len(),
                    want.values().sum::<usize>()
                );
            }
            Expect::FindCoordinator => {
                let r: FindCoordinatorResponse = decode(raw, id, 3)?;
                anyhow::ensure!(r.error_code == 0, "FindCoordinator error {}", r.error_code);
                let got = (r.host.to_string(), r.port);
                anyhow::ensure!(
                    self.advertised.get(&r.node_id.0) == Some(&got),
                    "coordinator {} at {got:?}, not its advertised address",
                    r.node_id.0
                );
            }
            Expect::Produce {
                version,
                partition,
                offset,
            } => {
                let r: ProduceResponse = decode(raw, id, *version)?;
                let p = r
                    .responses
                    .first()
                    .and_then(|t| t.partition_responses.first())
                    .ok_or_else(|| anyhow::anyhow!("empty produce response"))?;
                anyhow::ensure!(
                    p.error_code == 0 && p.index == *partition && p.base_offset == *offset,
                    "produce: error {}, partition {} offset {} where partition {partition} offset {offset}",
                    p.error_code,
                    p.index,
                    p.base_offset
                );
            }
            Expect::Fetch {
                partition,
                offset,
                before,
            } => {
                let r: FetchResponse = decode(raw, id, 11)?;
                let p = r
                    .responses
                    .first()
                    .and_then(|t| t.partitions.first())
                    .ok_or_else(|| anyhow::anyhow!("empty fetch response"))?;
                anyhow::ensure!(
                    p.error_code == 0 && p.partition_index == *partition,
                    "fetch: error {}, partition {} where {partition}",
                    p.error_code,
                    p.partition_index
                );
                anyhow::ensure!(
                    p.high_watermark == *before as i64,
                    "fetch of partition {partition}: high watermark {} after {before} records",
                    p.high_watermark
                );
                let values = record_values(p.records.as_ref())?;
                let log = &self.produced[*partition as usize];
                anyhow::ensure!(
                    !values.is_empty()
                        && offset + values.len() <= *before
                        && values[..] == log[*offset..offset + values.len()],
                    "fetch of partition {partition}: {} records, not those from {offset} of {before}",
                    values.len()
                );
            }
        }
        Ok(())
    }
}

/// A mock cluster whose [`TOPIC`] partitions are all led by broker 1 (the one kpscd maps
/// statically), plus `filler_topics` topics of `filler_partitions` each, led by any.
fn cluster(filler_topics: usize, filler_partitions: i32) -> (MockCluster, BTreeMap<String, usize>) {
    let cluster = MockCluster::led_by_broker_1(TOPIC, PARTITIONS).unwrap();
    let mut topics = BTreeMap::from([(TOPIC.to_owned(), PARTITIONS as usize)]);
    for t in 0..filler_topics {
        let name = format!("filler-{t:03}");
        cluster.create_topic(&name, filler_partitions).unwrap();
        topics.insert(name, filler_partitions as usize);
    }
    (cluster, topics)
}

/// Writes the pipeline (a thread, which half-closes after its last write) while reading
/// and checking every response in order; then only the connection's end may come, the
/// records read back must equal those produced, and under sockmap the kernel must have
/// carried requests. Returns the responses as received.
fn run_pipeline(kpscd: &Kpscd, base: u16, mode: &str, tag: &str, truth: &mut Truth) -> Vec<Bytes> {
    let writes = pipeline(tag);
    let requests: Vec<(i32, Ask)> = writes.iter().flatten().cloned().collect();
    let (expected, produced) = expectations(&requests);
    truth.produced = produced;
    let frames: Vec<Vec<u8>> = writes
        .iter()
        .map(|w| w.iter().flat_map(|(id, ask)| ask.frame(*id)).collect())
        .collect();
    let addr = format!("127.0.1.1:{base}");
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Under sockmap: let kpscd put the socket in its map first, and pause between writes,
    // so the verdict meets requests at packet starts and carries some (see sockmap.rs).
    std::thread::sleep(Duration::from_millis(50));
    let mut writer = stream.try_clone().unwrap();
    let started = Instant::now();
    let mut received = Vec::with_capacity(expected.len());
    std::thread::scope(|s| {
        s.spawn(|| {
            for write in &frames {
                writer.write_all(write).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            // A half-close while responses are still held: kpscd must deliver them all
            // before it ends the connection.
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        for (n, (id, expect)) in expected.iter().enumerate() {
            let raw = read_frame(&mut stream)
                .unwrap_or_else(|e| panic!("{mode}: response {n} of {}: {e:#}", expected.len()));
            truth
                .check(&raw, *id, expect)
                .unwrap_or_else(|e| panic!("{mode}: response {n} (id {id}, {expect:?}): {e:#}"));
            received.push(raw);
        }
    });
    let bytes: usize = frames.iter().map(Vec::len).sum();
    let answered: usize = received.iter().map(Bytes::len).sum();
    eprintln!(
        "{mode} {tag}: {} requests ({bytes} bytes), {} responses ({answered} bytes) in order in {:?}; the first all-topics Metadata response {} bytes",
        requests.len(),
        received.len(),
        started.elapsed(),
        received[1].len()
    );
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Then the end of the connection, nothing else (the mock's answers to acks=0 dropped).
    let extra = stream.read(&mut [0u8; 1]);
    assert!(
        matches!(&extra, Ok(0)),
        "{mode}: after the last response: {extra:?}"
    );
    if mode == "sockmap" {
        let k = kernel_accounted(kpscd, requests.len());
        eprintln!("{mode} {tag}: kernel {k:?}");
        assert!(
            k.redirected_frames > 0.0 && k.redirected_bytes > 0.0,
            "{mode}: the kernel carried no request: {k:?}"
        );
        let api_versions = requests
            .iter()
            .filter(|(_, ask)| matches!(ask, Ask::One(Req::ApiVersions)))
            .count();
        // ApiVersions always goes to kpscd: the stream was handed over and back.
        assert!(k.passed_frames >= api_versions as f64, "{mode}: {k:?}");
    }
    if mode == "splice" || mode == "uring" {
        // The large Produce and Fetch frames took the path under test.
        let spliced = kpscd.metric("kpsc_spliced_bytes_total", "");
        assert!(spliced > 1e6, "{mode} {tag}: spliced {spliced} bytes");
    }
    let counts: Vec<usize> = truth.produced.iter().map(Vec::len).collect();
    let consumed = consume_all(&addr, &counts);
    for (p, (got, want)) in consumed.iter().zip(&truth.produced).enumerate() {
        assert!(
            got == want,
            "{mode}: partition {p}: records differ from those produced"
        );
    }
    assert_eq!(
        kpscd.metric("kpsc_connection_errors_total", ""),
        0.0,
        "{mode}: {:?}",
        kernel_counters(kpscd)
    );
    received
}

/// Natural: the held response is a ~300 KiB Metadata response kpscd must decode and
/// rewrite while the broker's next 120 responses arrive behind it.
fn natural(mode: &str) {
    let setup = Instant::now();
    let (cluster, topics) = cluster(LARGE.0, LARGE.1);
    let base = free_port_base(20);
    let kpscd = Kpscd::start(&proxy_args(&cluster, base, &["--bulk-transfer", mode])).unwrap();
    let mut leaks = vec![REAL_BROKER_HOST.to_owned()];
    leaks.extend(cluster.broker_addrs());
    let mut truth = Truth {
        advertised: advertised_addresses(base),
        topics,
        produced: Vec::new(),
        leaks,
    };
    eprintln!(
        "{mode} natural: cluster and kpscd up in {:?}",
        setup.elapsed()
    );
    run_pipeline(&kpscd, base, mode, "natural", &mut truth);
}

/// [`ResponseDelayShim`] in front of broker 1, holding the first Metadata response of the
/// pipeline's client until `behind` responses queue behind it, and kpscd with
/// `--bulk-transfer mode` in front of both; the shim answers acks=0 as the mock does or,
/// without `answers_acks0`, not at all, as Kafka does.
fn behind_shim(
    cluster: &MockCluster,
    mode: &str,
    release: Release,
    behind: usize,
    answers_acks0: bool,
) -> (ResponseDelayShim, Kpscd, u16) {
    let plan = HoldPlan {
        client_id: CLIENT_ID.to_owned(),
        at_least: Duration::from_millis(300),
        behind,
        release,
        answers_acks0,
        cut: None,
        stall_reading: None,
    };
    proxy_behind_shim(cluster, plan, &["--bulk-transfer", mode]).unwrap()
}

/// Forced: [`ResponseDelayShim`] between kpscd and broker 1 holds the first Metadata
/// response 300 ms until at least 100 responses queue behind it, then releases it as
/// `release` says. The mock advertises the shim as broker 1, so kpscd takes the shim for
/// the broker. Released whole, the held response is the large one of [`natural`]; dribbled
/// 7 bytes at a time, a small one (one topic). Without `answers_acks0` the shim drops the
/// mock's answers to acks=0, as Kafka sends none, and the held response is a small one.
fn forced(mode: &str, release: Release, answers_acks0: bool) {
    let (cluster, topics) = match release {
        Release::Whole if answers_acks0 => cluster(LARGE.0, LARGE.1),
        _ => cluster(0, 0),
    };
    let (shim, kpscd, base) = behind_shim(&cluster, mode, release, 100, answers_acks0);
    let mut leaks = vec![
        REAL_BROKER_HOST.to_owned(),
        SHIM_HOST.to_owned(),
        shim.addr().to_string(),
    ];
    leaks.extend(cluster.broker_addrs());
    let advertised = advertised_addresses(base);
    let mut truth = Truth {
        advertised: advertised.clone(),
        topics,
        produced: Vec::new(),
        leaks,
    };
    let tag = format!("{release:?}");
    let received = run_pipeline(&kpscd, base, mode, &tag, &mut truth);
    let holds = shim.holds();
    eprintln!("{mode} {tag}: shim holds {holds:?}");
    assert!(
        shim.errors().is_empty(),
        "{mode}: shim: {:?}",
        shim.errors()
    );
    assert!(
        holds.len() == 1
            && holds[0].behind >= 100
            && holds[0].held_for >= Duration::from_millis(300),
        "{mode}: the shim did not hold the Metadata response as planned: {holds:?}"
    );
    let acks0 = pipeline(&tag)
        .iter()
        .flatten()
        .filter(|(_, ask)| matches!(ask, Ask::One(Req::Produce { acks: 0, .. })))
        .count();
    let dropped = shim.dropped_acks0_answers();
    assert_eq!(
        dropped,
        if answers_acks0 { 0 } else { acks0 },
        "{mode}: answers to acks=0 the shim dropped"
    );
    // Byte for byte: what the broker sent through the shim, in the same order, with only
    // the addresses of Metadata and FindCoordinator responses replaced.
    // The mock's answers to acks=0, which kpscd must drop, are not the client's.
    let forwarded: Vec<_> = shim
        .forwarded()
        .into_iter()
        .filter(|f| !(f.api_key == ApiKey::Produce as i16 && f.correlation_id >= ACKS0_IDS))
        .collect();
    assert_eq!(
        forwarded.len(),
        received.len(),
        "{mode}: responses forwarded by the shim"
    );
    let node = |id: i32| advertised.get(&id).cloned().unwrap();
    for (n, (f, got)) in forwarded.iter().zip(&received).enumerate() {
        let want = match ApiKey::try_from(f.api_key) {
            Ok(ApiKey::Metadata) => {
                edited_response(&f.body, f.api_version, |r: &mut MetadataResponse| {
                    for b in &mut r.brokers {
                        let (host, port) = node(b.node_id.0);
                        b.host = StrBytes::from_string(host);
                        b.port = port;
                    }
                })
            }
            Ok(ApiKey::FindCoordinator) => {
                edited_response(&f.body, f.api_version, |r: &mut FindCoordinatorResponse| {
                    let (host, port) = node(r.node_id.0);
                    r.host = StrBytes::from_string(host);
                    r.port = port;
                })
            }
            // kpscd caps versions in it (checked in `Truth::check`).
            Ok(ApiKey::ApiVersions) => continue,
            _ => f.body.clone(),
        };
        assert!(
            got[..] == want[..],
            "{mode}: response {n} (api {} id {}) is not what the broker sent in that place",
            f.api_key,
            f.correlation_id
        );
    }
}

const WHOLE: Release = Release::Whole;
const DRIBBLE: Release = Release::Dribble {
    piece: 7,
    pause: Duration::from_millis(1),
};

/// A client that half-closes while its responses are still held back (the shim holds the
/// Metadata response until the others queue behind it, then sends each in a write of its
/// own, 1 MiB Fetch responses in two halves 20 ms apart), its FIN in a segment of its
/// own: every response is still delivered, then the end of the connection, and kpscd
/// counts no connection error. Under sockmap the FIN reaches the verdict as an skb
/// without payload, and kpscd splices the Fetch responses across the pause in each.
fn half_close_while_responses_are_held(mode: &str) {
    const ROUNDS: usize = 3;
    let (cluster, _) = cluster(0, 0);
    let paced = Release::Paced {
        pause: Duration::from_millis(20),
    };
    let (shim, kpscd, base) = behind_shim(&cluster, mode, paced, 2 * ROUNDS, true);
    let mut stream = TcpStream::connect(format!("127.0.1.1:{base}")).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // As in `run_pipeline`: the socket in kpscd's map before the first request.
    std::thread::sleep(Duration::from_millis(50));
    // Metadata (held), then per round a 1 MiB Produce and a Fetch of it, a write each.
    let values: Vec<Vec<u8>> = (0..ROUNDS)
        .map(|i| value(&format!("half-close-{mode}-{i}-"), 1 << 20))
        .collect();
    stream.write_all(&Req::Metadata.frame(0)).unwrap();
    for (i, v) in values.iter().enumerate() {
        let partition = i as i32;
        let produce = Req::Produce {
            version: 7,
            acks: 1,
            partition,
            value: v.clone(),
        };
        let fetch = Ask::Fetch {
            partition,
            offset: 0,
        };
        std::thread::sleep(Duration::from_millis(2));
        stream.write_all(&produce.frame(2 * i as i32 + 1)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        stream.write_all(&fetch.frame(2 * i as i32 + 2)).unwrap();
    }
    // While the responses are held, in a segment of its own.
    std::thread::sleep(Duration::from_millis(20));
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut next = |what: &str| {
        read_frame(&mut stream).unwrap_or_else(|e| {
            panic!(
                "{mode}: {what} after the half-close: {e:#}; kpscd: {}",
                kpscd.log()
            )
        })
    };
    let _: MetadataResponse = decode(&next("metadata"), 0, 12).unwrap();
    for (i, v) in values.iter().enumerate() {
        let r: ProduceResponse = decode(&next("produce"), 2 * i as i32 + 1, 7).unwrap();
        let p = &r.responses[0].partition_responses[0];
        assert_eq!((p.error_code, p.base_offset), (0, 0), "{mode}: produce {i}");
        let r: FetchResponse = decode(&next("fetch"), 2 * i as i32 + 2, 11).unwrap();
        let got = record_values(r.responses[0].partitions[0].records.as_ref()).unwrap();
        assert!(
            got.len() == 1 && got[0] == *v,
            "{mode}: fetch {i}: other records"
        );
    }
    assert_eq!(
        stream.read(&mut [0u8; 1]).unwrap(),
        0,
        "{mode}: after the last response"
    );
    let holds = shim.holds();
    assert!(
        holds.len() == 1 && holds[0].behind == 2 * ROUNDS,
        "{mode}: {holds:?}"
    );
    if mode == "sockmap" {
        let k = kernel_accounted(&kpscd, 1 + 2 * ROUNDS);
        assert!(k.redirected_frames > 0.0, "{mode}: {k:?}");
    }
    assert_eq!(
        kpscd.metric("kpsc_connection_errors_total", ""),
        0.0,
        "{mode}: {}",
        kpscd.log()
    );
}

/// A test per `--bulk-transfer` mode, `name::under_<mode>`, each running `run(mode)`.
macro_rules! under_each_mode {
    ($(#[$doc:meta])* $name:ident, $run:expr) => {
        $(#[$doc])*
        mod $name {
            use super::*;

            #[test]
            fn under_copy() {
                ($run)("copy")
            }

            #[test]
            fn under_splice() {
                ($run)("splice")
            }

            #[test]
            fn under_sockmap() {
                ($run)("sockmap")
            }

            #[test]
            fn under_uring() {
                ($run)("uring")
            }
        }
    };
}

under_each_mode!(natural_large_metadata, natural);
under_each_mode!(held_metadata_released_in_one_write, |mode| forced(
    mode, WHOLE, true
));
under_each_mode!(
    /// The pipeline against a broker that leaves acks=0 unanswered, as Kafka does: kpscd
    /// (and, under sockmap, the response verdict) must not wait for those answers.
    held_metadata_with_acks0_unanswered,
    |mode| forced(mode, WHOLE, false)
);
under_each_mode!(held_metadata_dribbled, |mode| forced(mode, DRIBBLE, true));
under_each_mode!(
    half_close_while_responses_are_held,
    half_close_while_responses_are_held
);
