//! [`ResponseDelayShim`]: a fault injector, NOT a broker. A TCP relay between kpscd and a
//! real broker that forwards requests unchanged and holds one response back while the
//! broker's later responses queue behind it, then lets them all go at once: a delay a real
//! broker produces only by chance (a slow Metadata), made certain so the ordering tests
//! can count on it. Everything it forwards came from the real broker, byte for byte.
//!
//! It matches responses to requests by order (responses carry only a correlation id), so
//! every request through it must be answered: acks=0 Produce only in front of a broker
//! that answers it anyway, as librdkafka's mock and tansu do. Kafka never answers acks=0:
//! with [`HoldPlan::answers_acks0`] off, the shim drops those answers, so kpscd meets a
//! broker that behaves as Kafka does there.

use std::{
    collections::VecDeque,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{Kpscd, MockCluster, free_port_base, proxy_args};
use bytes::Bytes;
use kafka_protocol::{
    messages::{ApiKey, ProduceRequest, RequestHeader},
    protocol::Decodable,
};

/// Where [`proxy_behind_shim`] puts the shim: not the mock's host, so a leak of either is
/// told apart.
pub const SHIM_HOST: &str = "127.0.3.1";

/// The Metadata API key: the response the shim holds back.
const METADATA: i16 = 3;
/// A hold that has not collected its responses by then lets go anyway (the test then
/// fails on the report, not on a hang).
const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// How the held response and those queued behind it are let go.
#[derive(Clone, Copy, Debug)]
pub enum Release {
    /// The held response and every queued one in a single write.
    Whole,
    /// The held response in `piece`-byte writes `pause` apart, its last piece in the
    /// same write as every queued response.
    Dribble { piece: usize, pause: Duration },
    /// Each response in writes of its own, `pause` apart, and those over 64 KiB in two
    /// halves `pause` apart: the reader finds nothing to read in the middle of a frame.
    Paced { pause: Duration },
}

/// Responses above this size are split in two under [`Release::Paced`].
const PACED_SPLIT: usize = 64 << 10;

/// Which response to hold, for how long, and how to let it go.
#[derive(Clone, Debug)]
pub struct HoldPlan {
    /// Only the first Metadata response of a connection whose request has this client id
    /// is held (kpscd's own discovery connections pass undisturbed).
    pub client_id: String,
    /// Held at least this long...
    pub at_least: Duration,
    /// ...and until at least this many responses queue behind it.
    pub behind: usize,
    pub release: Release,
    /// Whether acks=0 Produce requests get the broker's answer (as from librdkafka's mock
    /// and tansu) or none (as from Kafka), on every connection through the shim.
    pub answers_acks0: bool,
    /// A response to end the connection in the middle of, as a broker dying mid-write
    /// leaves it.
    pub cut: Option<Cut>,
    /// After the first request of the plan's client id, the shim reads nothing more of
    /// that connection for this long: a broker slow to read.
    pub stall_reading: Option<Duration>,
}

/// The first response to `api_key` on a connection of the plan's client id goes to kpscd
/// only up to `keep` bytes (size prefix included); then the shim closes the connection
/// (FIN: nothing kpscd sent is left unread, so no reset) and forwards nothing more.
#[derive(Clone, Copy, Debug)]
pub struct Cut {
    pub api_key: i16,
    pub keep: usize,
}

impl HoldPlan {
    /// Holds nothing (the first Metadata response goes on at once), drops the answers
    /// to acks=0: a Kafka-like broker for `client_id`'s connections.
    pub fn kafka_acks0(client_id: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            at_least: Duration::ZERO,
            behind: 0,
            release: Release::Whole,
            answers_acks0: false,
            cut: None,
            stall_reading: None,
        }
    }

    /// Holds nothing and cuts the first `api_key` response of `client_id`'s connections
    /// after `keep` bytes; the broker's answers to acks=0 go on, as from the mock.
    pub fn cut(client_id: &str, api_key: ApiKey, keep: usize) -> Self {
        Self {
            answers_acks0: true,
            cut: Some(Cut {
                api_key: api_key as i16,
                keep,
            }),
            ..Self::kafka_acks0(client_id)
        }
    }

    /// Holds nothing; reads nothing of `client_id`'s connections for `stall` after their
    /// first request. The broker's answers to acks=0 go on, as from the mock.
    pub fn stall_reading(client_id: &str, stall: Duration) -> Self {
        Self {
            answers_acks0: true,
            stall_reading: Some(stall),
            ..Self::kafka_acks0(client_id)
        }
    }
}

/// One response the shim forwarded to kpscd, as the broker sent it.
#[derive(Clone, Debug)]
pub struct Forwarded {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    /// The frame without its size prefix: what [`crate::raw_pipeline::read_frame`] returns.
    pub body: Vec<u8>,
}

/// What one hold did.
#[derive(Clone, Copy, Debug)]
pub struct HoldReport {
    pub held_for: Duration,
    /// Responses queued behind the held one when it was let go.
    pub behind: usize,
    pub behind_bytes: usize,
}

/// What the shim saw of the connections whose requests carry the plan's client id.
#[derive(Default)]
struct Seen {
    forwarded: Vec<Forwarded>,
    holds: Vec<HoldReport>,
    errors: Vec<String>,
    dropped_acks0: usize,
    /// Responses cut short (see [`Cut`]).
    cuts: usize,
}

struct Request {
    api_key: i16,
    api_version: i16,
    correlation_id: i32,
    client_id: Option<String>,
    /// A Produce request with acks=0.
    acks0: bool,
}

/// The relay: accepts on its own address, dials the broker once per connection.
pub struct ResponseDelayShim {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    acceptor: Option<JoinHandle<()>>,
}

impl ResponseDelayShim {
    /// Listens on `listen` (port 0: any) and relays to `broker`.
    pub fn start(listen: &str, broker: &str, plan: HoldPlan) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen).with_context(|| format!("shim bind {listen}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let broker = broker.to_owned();
        let acceptor = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let (broker, plan, seen) = (broker.clone(), plan.clone(), seen.clone());
                            std::thread::spawn(move || {
                                if let Err(e) = relay(client, &broker, plan, &seen) {
                                    // Printed now too: a test failing first never asks.
                                    eprintln!("response delay shim: {e:#}");
                                    seen.lock().unwrap().errors.push(format!("{e:#}"));
                                }
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => return,
                    }
                }
            })
        };
        Ok(Self {
            addr,
            stop,
            seen,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Responses forwarded on the plan's connections, in the order written to kpscd.
    pub fn forwarded(&self) -> Vec<Forwarded> {
        self.seen.lock().unwrap().forwarded.clone()
    }

    pub fn holds(&self) -> Vec<HoldReport> {
        self.seen.lock().unwrap().holds.clone()
    }

    /// Answers to acks=0 Produce requests dropped, on every connection.
    pub fn dropped_acks0_answers(&self) -> usize {
        self.seen.lock().unwrap().dropped_acks0
    }

    /// Responses cut short by the plan's [`Cut`].
    pub fn cuts(&self) -> usize {
        self.seen.lock().unwrap().cuts
    }

    /// What went wrong in a relay (a connection closing is not an error).
    pub fn errors(&self) -> Vec<String> {
        self.seen.lock().unwrap().errors.clone()
    }
}

impl Drop for ResponseDelayShim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// A shim with `plan` in front of the mock's broker 1, and kpscd (started with
/// [`proxy_args`] plus `kpscd_args`) in front of both. The mock advertises the shim as
/// broker 1, so kpscd takes the shim for the broker. Returns kpscd's port base.
pub fn proxy_behind_shim(
    cluster: &MockCluster,
    plan: HoldPlan,
    kpscd_args: &[&str],
) -> anyhow::Result<(ResponseDelayShim, Kpscd, u16)> {
    let shim = ResponseDelayShim::start(&format!("{SHIM_HOST}:0"), &cluster.broker_addr(1), plan)?;
    cluster.set_advertised(1, SHIM_HOST, shim.addr().port())?;
    let base = free_port_base(20);
    let mut args = proxy_args(cluster, base, kpscd_args);
    // Broker 1 is reached through the shim: its mapping names the shim's address.
    args[1] = format!("{},0.0.0.0:{base},127.0.1.1:{base}", shim.addr());
    let kpscd = Kpscd::start(&args)?;
    Ok((shim, kpscd, base))
}

/// One frame (size prefix included), or None at a clean end between frames.
fn read_whole_frame(stream: &mut TcpStream) -> anyhow::Result<Option<Vec<u8>>> {
    let mut size = [0u8; 4];
    match stream.read_exact(&mut size) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(size);
    anyhow::ensure!(len >= 4, "frame size {len}");
    let mut frame = size.to_vec();
    frame.resize(4 + len as usize, 0);
    stream.read_exact(&mut frame[4..])?;
    Ok(Some(frame))
}

fn parse_request(frame: &[u8]) -> anyhow::Result<Request> {
    anyhow::ensure!(frame.len() >= 14, "request of {} bytes", frame.len());
    let i16_at = |at: usize| i16::from_be_bytes([frame[at], frame[at + 1]]);
    // client_id: int16-length nullable string, in every request header version.
    let id_len = i16_at(12);
    let client_id = (id_len >= 0)
        .then(|| frame.get(14..14 + id_len as usize))
        .flatten()
        .map(|b| String::from_utf8_lossy(b).into_owned());
    let (api_key, api_version) = (i16_at(4), i16_at(6));
    let acks0 = api_key == ApiKey::Produce as i16 && produce_acks(frame, api_version)? == 0;
    Ok(Request {
        api_key,
        api_version,
        correlation_id: i32::from_be_bytes(frame[8..12].try_into()?),
        client_id,
        acks0,
    })
}

/// The `acks` of a Produce request frame (size prefix included).
fn produce_acks(frame: &[u8], version: i16) -> anyhow::Result<i16> {
    let mut body = Bytes::copy_from_slice(&frame[4..]);
    RequestHeader::decode(&mut body, ApiKey::Produce.request_header_version(version))
        .context("Produce request header")?;
    let request = ProduceRequest::decode(&mut body, version).context("Produce request")?;
    Ok(request.acks)
}

fn relay(
    mut client: TcpStream,
    broker: &str,
    plan: HoldPlan,
    seen: &Arc<Mutex<Seen>>,
) -> anyhow::Result<()> {
    client.set_nonblocking(false)?;
    let mut upstream = TcpStream::connect(broker).with_context(|| format!("shim -> {broker}"))?;
    for s in [&client, &upstream] {
        s.set_nodelay(true)?;
    }
    let requests = Arc::new(Mutex::new(VecDeque::<Request>::new()));
    // Requests: each frame's head noted before the frame goes on, so its response
    // always finds it.
    let up = {
        let (mut from, mut to, requests) =
            (client.try_clone()?, upstream.try_clone()?, requests.clone());
        let (client_id, mut stall) = (plan.client_id.clone(), plan.stall_reading);
        std::thread::spawn(move || -> anyhow::Result<()> {
            while let Some(frame) = read_whole_frame(&mut from).context("reading a request")? {
                let request = parse_request(&frame)?;
                let mine = request.client_id.as_deref() == Some(client_id.as_str());
                requests.lock().unwrap().push_back(request);
                to.write_all(&frame)
                    .context("writing a request to the broker")?;
                if let Some(stall) = stall.take_if(|_| mine) {
                    std::thread::sleep(stall);
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            Ok(())
        })
    };
    // Responses: read as fast as the broker sends them, matched to requests by order; a
    // writer thread decides when each reaches kpscd.
    let broker_side = upstream.try_clone()?;
    let (tx, rx) = mpsc::channel::<(Request, Vec<u8>)>();
    let plan_answers_acks0 = plan.answers_acks0;
    let seen_down = seen.clone();
    let down = std::thread::spawn(move || -> anyhow::Result<()> {
        while let Some(frame) = read_whole_frame(&mut upstream).context("reading a response")? {
            let request = requests
                .lock()
                .unwrap()
                .pop_front()
                .context("a response with no request waiting (acks=0 through the shim?)")?;
            if request.acks0 && !plan_answers_acks0 {
                seen_down.lock().unwrap().dropped_acks0 += 1;
                continue;
            }
            if tx.send((request, frame)).is_err() {
                break;
            }
        }
        Ok(())
    });
    let written = write_responses(&mut client, rx, &plan, seen).context("writing to kpscd");
    // Either side's end ends the relay: a broker that keeps a half-closed connection open
    // must not keep the response thread waiting.
    let _ = client.shutdown(Shutdown::Both);
    let _ = broker_side.shutdown(Shutdown::Both);
    let up = up.join().expect("shim request thread");
    let down = down.join().expect("shim response thread");
    written.and(up).and(down)
}

/// Writes responses to kpscd in the broker's order, holding the plan's one back.
fn write_responses(
    client: &mut TcpStream,
    rx: mpsc::Receiver<(Request, Vec<u8>)>,
    plan: &HoldPlan,
    seen: &Mutex<Seen>,
) -> anyhow::Result<()> {
    let mine = |r: &Request| r.client_id.as_deref() == Some(plan.client_id.as_str());
    let record = |r: &Request, frame: &[u8]| {
        if mine(r) {
            seen.lock().unwrap().forwarded.push(Forwarded {
                api_key: r.api_key,
                api_version: r.api_version,
                correlation_id: r.correlation_id,
                body: frame[4..].to_vec(),
            });
        }
    };
    let mut held: Option<(Instant, Request, Vec<u8>)> = None;
    let mut queued: Vec<(Request, Vec<u8>)> = Vec::new();
    let mut hold_done = false;
    loop {
        // `ended`: the broker's side is done, nothing more will queue.
        let (next, ended) = match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(next) => (Some(next), false),
            Err(mpsc::RecvTimeoutError::Timeout) => (None, false),
            Err(mpsc::RecvTimeoutError::Disconnected) if held.is_some() => (None, true),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        if let Some((request, frame)) = next {
            if held.is_some() {
                queued.push((request, frame));
            } else if let Some(cut) = plan.cut.filter(|c| c.api_key == request.api_key)
                && mine(&request)
            {
                // Counted first: the test may look as soon as its connection ends.
                seen.lock().unwrap().cuts += 1;
                client.write_all(&frame[..cut.keep.min(frame.len())])?;
                client.shutdown(Shutdown::Write)?;
                return Ok(());
            } else if !hold_done && request.api_key == METADATA && mine(&request) {
                held = Some((Instant::now(), request, frame));
                hold_done = true;
            } else {
                record(&request, &frame);
                client.write_all(&frame)?;
            }
        }
        let Some((since, ..)) = &held else {
            continue;
        };
        let waited = since.elapsed();
        let due = waited >= plan.at_least && queued.len() >= plan.behind;
        if !(due || ended || waited >= HOLD_LIMIT) {
            continue;
        }
        let (_, request, frame) = held.take().expect("held");
        let behind_bytes = queued.iter().map(|(_, f)| f.len()).sum();
        seen.lock().unwrap().holds.push(HoldReport {
            held_for: waited,
            behind: queued.len(),
            behind_bytes,
        });
        let mut burst = Vec::with_capacity(frame.len() + behind_bytes);
        if let Release::Paced { pause } = plan.release {
            let all = std::iter::once((request, frame)).chain(queued.drain(..));
            for (request, frame) in all {
                record(&request, &frame);
                let half = if frame.len() > PACED_SPLIT {
                    frame.len() / 2
                } else {
                    frame.len()
                };
                for part in [&frame[..half], &frame[half..]] {
                    if !part.is_empty() {
                        client.write_all(part)?;
                        std::thread::sleep(pause);
                    }
                }
            }
            continue;
        }
        record(&request, &frame);
        match plan.release {
            Release::Paced { .. } => unreachable!("handled above"),
            Release::Whole => burst.extend_from_slice(&frame),
            Release::Dribble { piece, pause } => {
                let last = frame.len() - (frame.len() - 1) % piece - 1;
                for chunk in frame[..last].chunks(piece) {
                    client.write_all(chunk)?;
                    std::thread::sleep(pause);
                }
                burst.extend_from_slice(&frame[last..]);
            }
        }
        for (request, frame) in queued.drain(..) {
            record(&request, &frame);
            burst.extend_from_slice(&frame);
        }
        client.write_all(&burst)?;
    }
}
