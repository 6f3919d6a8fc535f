//! `kpscd proxy --bulk-transfer sockmap` (requests and the responses that need no rewrite
//! carried by the kernel) against real brokers, librdkafka's mock cluster and tansu:
//! order byte for byte on one pipelined connection written in whole frames and in 7-byte
//! pieces, 64 KiB to 16 MiB frames, a half-close right after large requests, 1,000
//! concurrent connections and no map entry left after them, and the refusal to start
//! without privileges (acks=0: `sockmap_acks_zero.rs`). Every test reads kpscd's kernel counters, so a run that silently took the
//! userspace path fails. Needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, FetchResponse, FindCoordinatorResponse, MetadataResponse,
    ProduceResponse,
};
use kpsc_tests::{
    Kpscd, MockCluster, RawClient,
    client_sockets::{connect_from, raise_fd_limit},
    eventually, free_port_base,
    kernel_path::{
        connection_map_entries, kernel_accounted, kernel_counters, kernel_delivered,
        kernel_response_counters,
    },
    kpscd_bin, proxy_args,
    raw_pipeline::{
        CLIENT_ID, Req, TOPIC, consume_all, decode, fetch_request, produce_request, read_frame,
        record_values, value,
    },
    request_body, run_with_timeout,
};

const PARTITIONS: i32 = 4;

fn cluster() -> MockCluster {
    MockCluster::led_by_broker_1(TOPIC, PARTITIONS).unwrap()
}

fn start(cluster: &MockCluster, extra: &[&str]) -> (Kpscd, u16) {
    let base = free_port_base(20);
    let mut args = vec!["--bulk-transfer", "sockmap"];
    args.extend_from_slice(extra);
    (
        Kpscd::start(&proxy_args(cluster, base, &args)).unwrap(),
        base,
    )
}

/// The mixed pipeline: Metadata, FindCoordinator, ApiVersions (which kpscd must see),
/// Produce v7 and v9 with acks=1 and acks=0 and record values from 17 bytes to 150 KB,
/// and Fetch, as (correlation id, request). Correlation ids repeat (a client may reuse
/// them); only acks=0 requests get ids of their own, since librdkafka's mock answers
/// acks=0 and an answer with the next request's id would be indistinguishable from it.
fn mixed_pipeline(tag: &str, cycles: usize) -> Vec<(i32, Req)> {
    const SIZES: [usize; 8] = [17, 200, 1_000, 3_000, 16_000, 65_536, 70_000, 150_000];
    let mut out = Vec::new();
    for c in 0..cycles {
        let partition = (c % PARTITIONS as usize) as i32;
        // (version, acks, value size) for a Produce; None for the request given.
        let cycle: [Result<(i16, i16, usize), Req>; 10] = [
            Err(Req::Metadata),
            Ok((7, 1, SIZES[c % 4])),
            Err(Req::FindCoordinator),
            Ok((7, 1, SIZES[4 + c % 4])),
            if c % 2 == 0 {
                Err(Req::ApiVersions)
            } else {
                Ok((9, 0, SIZES[(c + 3) % 8]))
            },
            Ok((7, 0, SIZES[c % 3])),
            Err(Req::Fetch { partition }),
            Ok((9, 1, SIZES[(c + 5) % 8])),
            Err(Req::Metadata),
            Ok((9, 0, 300)),
        ];
        for kind in cycle {
            let i = out.len();
            let (id, req) = match kind {
                Ok((version, acks, size)) => (
                    if acks == 0 {
                        100_000 + i as i32
                    } else {
                        (i % 37) as i32
                    },
                    Req::Produce {
                        version,
                        acks,
                        partition,
                        value: value(&format!("{tag}-{i}-"), size),
                    },
                ),
                Err(req) => ((i % 37) as i32, req),
            };
            out.push((id, req));
        }
    }
    out
}

/// What the response to a request must say, from the requests before it.
enum Expect {
    Metadata,
    FindCoordinator,
    ApiVersions,
    /// Produce (acks=1) of `version`: its record lands at `offset`, after every record
    /// produced to the partition before it, acks=0 ones included.
    Produce {
        version: i16,
        offset: i64,
    },
    /// Fetch from offset 0: the high watermark is the count of records produced before
    /// it, and the records are the first of them.
    Fetch {
        partition: i32,
        before: usize,
    },
}

/// Record values per partition, in the order produced.
type Produced = Vec<Vec<Vec<u8>>>;

/// The responses `pipeline` must get, in order, and the values produced per partition.
fn expectations(pipeline: &[(i32, Req)]) -> (Vec<(i32, Expect)>, Produced) {
    let mut produced = vec![Vec::new(); PARTITIONS as usize];
    let mut expected = Vec::new();
    for (id, req) in pipeline {
        let expect = match req {
            Req::Metadata => Expect::Metadata,
            Req::FindCoordinator => Expect::FindCoordinator,
            Req::ApiVersions => Expect::ApiVersions,
            Req::Produce {
                version,
                acks,
                partition,
                value,
            } => {
                let log = &mut produced[*partition as usize];
                log.push(value.clone());
                if *acks == 0 {
                    continue;
                }
                Expect::Produce {
                    version: *version,
                    offset: log.len() as i64 - 1,
                }
            }
            Req::Fetch { partition } => Expect::Fetch {
                partition: *partition,
                before: produced[*partition as usize].len(),
            },
        };
        expected.push((*id, expect));
    }
    (expected, produced)
}

/// An address a client may see: one of kpscd's, never a real broker's.
fn check_advertised(
    host: &str,
    port: i32,
    kpscd_ports: &std::ops::Range<i32>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        host.starts_with("127.0.1.") && kpscd_ports.contains(&port),
        "{host}:{port} is not one of kpscd's advertised addresses"
    );
    Ok(())
}

fn check_response(
    raw: &Bytes,
    id: i32,
    expect: &Expect,
    produced: &[Vec<Vec<u8>>],
    kpscd_ports: &std::ops::Range<i32>,
) -> anyhow::Result<()> {
    match expect {
        Expect::Metadata => {
            let r: MetadataResponse = decode(raw, id, 12)?;
            anyhow::ensure!(r.brokers.len() == 3, "brokers {:?}", r.brokers);
            for b in &r.brokers {
                check_advertised(&b.host, b.port, kpscd_ports)?;
            }
            anyhow::ensure!(!kpsc_tests::contains_bytes(raw, b"127.0.0.1"), "real host");
            anyhow::ensure!(
                r.topics.first().map(|t| t.partitions.len()) == Some(PARTITIONS as usize)
            );
        }
        Expect::FindCoordinator => {
            let r: FindCoordinatorResponse = decode(raw, id, 3)?;
            anyhow::ensure!(r.error_code == 0, "FindCoordinator error {}", r.error_code);
            check_advertised(&r.host, r.port, kpscd_ports)?;
        }
        Expect::ApiVersions => {
            let r: ApiVersionsResponse = decode(raw, id, 2)?;
            anyhow::ensure!(r.error_code == 0, "ApiVersions error {}", r.error_code);
            let produce = r
                .api_keys
                .iter()
                .find(|k| k.api_key == ApiKey::Produce as i16);
            anyhow::ensure!(
                produce.is_some_and(|k| k.max_version <= 9),
                "not capped: {produce:?}"
            );
        }
        Expect::Produce { version, offset } => {
            let r: ProduceResponse = decode(raw, id, *version)?;
            let p = r
                .responses
                .first()
                .and_then(|t| t.partition_responses.first())
                .ok_or_else(|| anyhow::anyhow!("empty produce response"))?;
            anyhow::ensure!(
                p.error_code == 0 && p.base_offset == *offset,
                "produce: error {}, offset {} where {offset} was next",
                p.error_code,
                p.base_offset
            );
        }
        Expect::Fetch { partition, before } => {
            let r: FetchResponse = decode(raw, id, 11)?;
            let p = r
                .responses
                .first()
                .and_then(|t| t.partitions.first())
                .ok_or_else(|| anyhow::anyhow!("empty fetch response"))?;
            anyhow::ensure!(p.error_code == 0, "fetch error {}", p.error_code);
            anyhow::ensure!(
                p.high_watermark == *before as i64,
                "fetch: high watermark {} after {before} records",
                p.high_watermark
            );
            let values = record_values(p.records.as_ref())?;
            let log = &produced[*partition as usize];
            anyhow::ensure!(
                (*before == 0 || !values.is_empty())
                    && values.len() <= *before
                    && values[..] == log[..values.len()],
                "fetch of partition {partition}: {} records, not the first of {before}",
                values.len()
            );
        }
    }
    Ok(())
}

/// How the client writes its pipeline.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Writes {
    /// Each frame in one write, back to back, as clients write.
    Frames,
    /// 7 bytes per write (TCP_NODELAY). Every third frame starts so, its head split over
    /// segments; the others start with their head whole after a 1 ms pause (time for kpscd
    /// to hand the stream back to the kernel) and go on in 7-byte pieces. Bodies over
    /// 4 KiB go in one write after the first 70 bytes, to keep the run short.
    Tiny,
}

fn write_pipeline(stream: &mut TcpStream, frames: &[Vec<u8>], writes: Writes) {
    for (i, frame) in frames.iter().enumerate() {
        if writes == Writes::Frames {
            stream.write_all(frame).unwrap();
            continue;
        }
        let mut pos = 0;
        if i % 3 != 0 {
            std::thread::sleep(Duration::from_millis(1));
            pos = frame.len().min(64);
            stream.write_all(&frame[..pos]).unwrap();
        }
        let tiny_end = if frame.len() > 4096 { 70 } else { frame.len() };
        while pos < tiny_end {
            let end = (pos + 7).min(tiny_end);
            stream.write_all(&frame[pos..end]).unwrap();
            pos = end;
        }
        stream.write_all(&frame[pos..]).unwrap();
    }
}

/// Pipelines 300 mixed requests on one connection without waiting (a thread writes
/// while this one reads), checks every response in order, that nothing else arrives,
/// and that the records read back are the ones produced, byte for byte and in order.
fn pipeline_keeps_order(writes: Writes) {
    let cluster = cluster();
    let (kpscd, base) = start(&cluster, &[]);
    let pipeline = mixed_pipeline(&format!("{writes:?}"), 30);
    let (expected, produced) = expectations(&pipeline);
    let frames: Vec<Vec<u8>> = pipeline.iter().map(|(id, r)| r.frame(*id)).collect();
    let addr = format!("127.0.1.1:{base}");
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // Bytes sent before kpscd has put the socket in its map reach the verdict as one
    // coalesced skb, which it passes up whole when it holds more than 16 frames or
    // ApiVersions; a pipeline written back to back may then stay with kpscd to its end.
    // A pause lets the first frames meet the verdict as a client's first requests do.
    std::thread::sleep(Duration::from_millis(50));
    let mut reader = stream.try_clone().unwrap();
    let kpscd_ports = i32::from(base)..i32::from(base) + 20;
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| write_pipeline(&mut stream, &frames, writes));
        for (n, (id, expect)) in expected.iter().enumerate() {
            let raw = read_frame(&mut reader).unwrap_or_else(|e| {
                panic!(
                    "response {n} of {}: {e:#}; {:?}",
                    expected.len(),
                    kernel_counters(&kpscd)
                )
            });
            check_response(&raw, *id, expect, &produced, &kpscd_ports)
                .unwrap_or_else(|e| panic!("response {n} (id {id}): {e:#}"));
        }
    });
    eprintln!(
        "{writes:?}: {} requests, {} responses in {:?}",
        frames.len(),
        expected.len(),
        started.elapsed()
    );
    // Nothing more is owed: the mock's answers to acks=0 were dropped.
    reader
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let extra = reader.read(&mut [0u8; 1]);
    assert!(
        matches!(&extra, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "after the last response: {extra:?}"
    );
    let k = kernel_accounted(&kpscd, frames.len());
    let api_versions = pipeline
        .iter()
        .filter(|(_, r)| matches!(r, Req::ApiVersions))
        .count();
    let bytes: usize = frames.iter().map(Vec::len).sum();
    eprintln!(
        "{writes:?}: {bytes} bytes sent; kernel: {k:?}; responses: {:?}",
        kernel_response_counters(&kpscd)
    );
    assert!(
        k.redirected_frames > 0.0 && k.redirected_bytes > 0.0,
        "{k:?}"
    );
    // ApiVersions always goes to kpscd.
    assert!(k.passed_frames >= api_versions as f64, "{k:?}");
    let counts: Vec<usize> = produced.iter().map(Vec::len).collect();
    let consumed = consume_all(&addr, &counts);
    for (p, (got, want)) in consumed.iter().zip(&produced).enumerate() {
        assert!(
            got == want,
            "partition {p}: records differ from those produced"
        );
    }
    drop(stream);
}

#[test]
fn a_pipeline_written_in_whole_frames_comes_back_in_order() {
    pipeline_keeps_order(Writes::Frames);
}

#[test]
fn a_pipeline_written_7_bytes_at_a_time_comes_back_in_order() {
    pipeline_keeps_order(Writes::Tiny);
}

/// Produce requests of 64 KiB, 1 MiB and 16 MiB record batches, each answered before
/// the next, then read back equal; the kernel carried at least their bytes.
#[test]
fn frames_of_64_kib_1_mib_and_16_mib_go_through_the_kernel() {
    let cluster = cluster();
    let (kpscd, base) = start(&cluster, &["--max-frame-size", "33554432"]);
    let addr = format!("127.0.1.1:{base}");
    let mut client = RawClient::connect(&addr).unwrap();
    client
        .stream()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sizes = [64 << 10, 1 << 20, 16 << 20];
    // One partition each: librdkafka's mock keeps at most 5 MiB per partition, but always
    // the latest batch.
    let values: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&size| value(&format!("large-{size}-"), size))
        .collect();
    let started = Instant::now();
    for (partition, v) in values.iter().enumerate() {
        let (r, _): (ProduceResponse, _) = client
            .call(ApiKey::Produce, 7, &produce_request(1, partition as i32, v))
            .unwrap();
        let p = &r.responses[0].partition_responses[0];
        assert_eq!((p.error_code, p.base_offset), (0, 0), "{} bytes", v.len());
    }
    let produced = started.elapsed();
    let counts = vec![1; sizes.len()];
    let consumed = consume_all(&addr, &counts);
    for (got, want) in consumed.iter().zip(&values) {
        assert!(
            got.len() == 1 && got[0] == *want,
            "{} bytes came back different",
            want.len()
        );
    }
    // The Produce requests, and the Fetch requests of another connection. The producing
    // connection is still open: its counters must not wait for its end.
    kernel_accounted(&kpscd, sizes.len() + sizes.len());
    let payload: usize = sizes.iter().sum();
    let k = eventually(Duration::from_secs(3), || {
        let k = kernel_counters(&kpscd);
        anyhow::ensure!(k.redirected_bytes >= payload as f64, "{k:?}");
        Ok(k)
    })
    .unwrap();
    // The Produce responses and the Fetch responses carrying the batches back.
    let r = kernel_delivered(&kpscd, sizes.len() + sizes.len());
    assert!(r.redirected_bytes >= payload as f64, "{r:?}");
    eprintln!("produced in {produced:?}; kernel: {k:?}; responses: {r:?}");
    drop(client);
}

/// A request kpscd must see, sent with the client's FIN while the kernel cannot send the
/// client its responses (the client reads nothing yet): the verdict passes the request,
/// but it waits on the client socket's psock behind the responses redirected to it, and
/// recvmsg reports the FIN first. kpscd must still read and answer it once the client
/// reads. It took the FIN for the end before it counted the bytes the verdict passed;
/// and the FIN's own skb, passed too, broke the client socket (EPIPE) when the backlog
/// sent it, before the verdicts dropped it.
#[test]
fn a_request_passed_with_the_fin_behind_stuck_responses_is_answered() {
    request_passed_with_the_fin_behind_stuck_responses(Duration::from_millis(300));
}

/// The same with a client that reads its responses only 7 s after its FIN: its request
/// waits that long behind them. kpscd gave up after 5 s, whatever the client socket did,
/// and failed the connection.
#[test]
fn a_request_passed_with_the_fin_behind_responses_read_late_is_answered() {
    request_passed_with_the_fin_behind_stuck_responses(Duration::from_secs(7));
}

/// Fetches whose responses wait for a client reading nothing, then a request kpscd must
/// see and the client's FIN; the client reads after `read_after`.
fn request_passed_with_the_fin_behind_stuck_responses(read_after: Duration) {
    const FETCHES: usize = 24;
    let cluster = cluster();
    let (kpscd, base) = start(&cluster, &[]);
    let mut stream = TcpStream::connect(format!("127.0.1.1:{base}")).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let record = value("stuck-", 1 << 20);
    for id in 0..4 {
        let produce = Req::Produce {
            version: 7,
            acks: 1,
            partition: 0,
            value: record.clone(),
        };
        stream.write_all(&produce.frame(id)).unwrap();
        let _: ProduceResponse = decode(&read_frame(&mut stream).unwrap(), id, 7).unwrap();
    }
    // 1 MiB responses (one batch each), 24 MiB in all: more than the sockets between
    // kpscd and the client hold, so the kernel's redirects to the client wait, until more
    // than kpscd's 4 MiB cap does (then kpscd takes the response stream over).
    // One write each, so the verdict carries each request and the kernel its response.
    for id in 0..FETCHES as i32 {
        let request = fetch_request(0, i64::from(id % 4), 2 << 20);
        let body = request_body(ApiKey::Fetch, 11, 100 + id, CLIENT_ID, &request).unwrap();
        stream
            .write_all(&[&(body.len() as i32).to_be_bytes()[..], &body].concat())
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    stream.write_all(&Req::ApiVersions.frame(7)).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(read_after);
    for id in 0..FETCHES as i32 {
        let raw = read_frame(&mut stream).unwrap_or_else(|e| panic!("fetch {id}: {e:#}"));
        let r: FetchResponse = decode(&raw, 100 + id, 11).unwrap();
        let records = record_values(r.responses[0].partitions[0].records.as_ref()).unwrap();
        assert!(records == [record.clone()], "fetch {id}: other records");
    }
    let raw = read_frame(&mut stream).unwrap_or_else(|e| {
        panic!(
            "the ApiVersions response after the Fetch responses: {e:#}; kpscd: {}",
            kpscd.log()
        )
    });
    let r: ApiVersionsResponse = decode(&raw, 7, 2).unwrap();
    assert_eq!(r.error_code, 0);
    assert_eq!(
        stream.read(&mut [0u8; 1]).unwrap(),
        0,
        "after the last response"
    );
    // The 4 Produce responses, and Fetch responses past the sockets' buffers and the cap:
    // kpscd holds the response stream only once more than 4 MiB wait behind the client
    // socket, so the request above was passed behind them.
    let r = kernel_delivered(&kpscd, 4 + 5);
    eprintln!("responses: {r:?}");
    assert_eq!(kpscd.metric("kpsc_connection_errors_total", ""), 0.0);
}

/// A client that half-closes right after its last request still gets every response:
/// the kernel's reports of the last requests may reach kpscd after the client's FIN, and
/// kpscd must still wait for their responses (it closed after 1 to 7 of 8 in 4 runs of 10
/// when it did not).
#[test]
fn a_half_close_right_after_large_requests_loses_none_of_them() {
    const REQUESTS: usize = 8;
    let cluster = cluster();
    let (kpscd, base) = start(&cluster, &[]);
    let mut stream = TcpStream::connect(format!("127.0.1.1:{base}")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut writer = stream.try_clone().unwrap();
    let values: Vec<Vec<u8>> = (0..REQUESTS)
        .map(|i| value(&format!("half-close-{i}-"), 1 << 20))
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for (i, v) in values.iter().enumerate() {
                let request = Req::Produce {
                    version: 7,
                    acks: 1,
                    partition: 0,
                    value: v.clone(),
                };
                writer.write_all(&request.frame(i as i32)).unwrap();
            }
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        for i in 0..REQUESTS {
            let raw = read_frame(&mut stream).unwrap_or_else(|e| panic!("response {i}: {e:#}"));
            let r: ProduceResponse = decode(&raw, i as i32, 7).unwrap();
            let p = &r.responses[0].partition_responses[0];
            assert_eq!((p.error_code, p.base_offset), (0, i as i64), "response {i}");
        }
    });
    // Then the end of the connection, nothing else.
    assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 0);
    let k = kernel_accounted(&kpscd, REQUESTS);
    eprintln!("half-close: {k:?}");
    assert!(k.redirected_frames > 0.0, "{k:?}");
    assert_eq!(kpscd.metric("kpsc_connection_errors_total", ""), 0.0);
}

/// 1,000 connections open at once, from 250 source addresses in 127.0.2.0/24, each
/// producing a record (written as soon as connected, before kpscd has put the socket in
/// its maps); all in the maps while open, and none left once they are closed.
#[test]
fn a_thousand_connections_leave_no_map_entry_behind() {
    const CONNECTIONS: usize = 1_000;
    const THREADS: usize = 4;
    raise_fd_limit(16_384);
    let cluster = cluster();
    let (kpscd, base) = start(&cluster, &[]);
    let to: SocketAddr = format!("127.0.1.1:{base}").parse().unwrap();
    let started = Instant::now();
    let connections: Vec<TcpStream> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    (t..CONNECTIONS)
                        .step_by(THREADS)
                        .map(|i| {
                            let mut stream = connect_from([127, 0, 2, 1 + (i % 250) as u8], to);
                            let produce = Req::Produce {
                                version: 7,
                                acks: 1,
                                partition: (i % PARTITIONS as usize) as i32,
                                value: value(&format!("conn-{i}-"), 200),
                            };
                            stream.write_all(&produce.frame(i as i32)).unwrap();
                            let raw = read_frame(&mut stream)
                                .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
                            let r: ProduceResponse = decode(&raw, i as i32, 7)
                                .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
                            assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
                            stream
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    eprintln!(
        "{CONNECTIONS} connections and round trips in {:?}",
        started.elapsed()
    );
    assert_eq!(connections.len(), CONNECTIONS);
    let open = connection_map_entries(kpscd.pid());
    assert!(open.values().all(|&n| n == CONNECTIONS), "{open:?}");
    let k = kernel_accounted(&kpscd, CONNECTIONS);
    assert_eq!(k.redirected_frames, CONNECTIONS as f64, "{k:?}");
    // Every Produce response went back through the kernel too.
    let r = kernel_delivered(&kpscd, CONNECTIONS);
    assert_eq!(r.passed_frames, 0.0, "{r:?}");

    let closing = Instant::now();
    drop(connections);
    let left = eventually(Duration::from_secs(10), || {
        let left = connection_map_entries(kpscd.pid());
        anyhow::ensure!(left.values().all(|&n| n == 0), "{left:?}");
        Ok(left)
    })
    .unwrap();
    eprintln!(
        "map entries {open:?} -> {left:?} in {:?} after closing",
        closing.elapsed()
    );
    eventually(Duration::from_secs(5), || {
        anyhow::ensure!(kpscd.metric("kpsc_connections_open", "") == 0.0);
        Ok(())
    })
    .unwrap();
    assert_eq!(kpscd.metric("kpsc_connection_errors_total", ""), 0.0);
}

/// Without CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, for real (another uid, no capability
/// in any set), `--bulk-transfer sockmap` is refused at start with a message naming them,
/// exit code 4; it does not quietly fall back to the userspace path.
#[test]
fn without_privileges_sockmap_is_refused_at_start() {
    let cluster = cluster();
    // A copy the unprivileged user can reach whatever the checkout's permissions.
    let dir =
        std::env::temp_dir().join(format!("kpsc-sockmap-unprivileged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let binary = dir.join("kpscd");
    std::fs::copy(kpscd_bin(), &binary).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for path in [&dir, &binary] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let base = free_port_base(20);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--",
    ])
    .arg(&binary)
    .arg("proxy")
    .args(proxy_args(&cluster, base, &["--bulk-transfer", "sockmap"]))
    .args([
        "--http-listen-address",
        &format!("127.0.0.1:{}", free_port_base(1)),
    ]);
    let out = run_with_timeout(&mut cmd, b"", Duration::from_secs(20)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    for needed in [
        "--bulk-transfer sockmap",
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
    ] {
        assert!(stderr.contains(needed), "no {needed:?} in:\n{stderr}");
    }
}
