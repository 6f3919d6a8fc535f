//! `--bulk-transfer sockmap`: the kernel carries a connection's frames between its two
//! sockets. The client socket enters a SOCKHASH whose verdict (kpsc-ebpf's
//! `kpsc_proxy_requests`) frames the request stream and redirects whole skbs to the broker
//! socket; it reports the head of every frame it redirected on a ring buffer, and kpscd
//! queues those as in flight exactly as if it had read them. The broker socket enters a
//! second SOCKHASH whose verdict (`kpsc_proxy_responses`) redirects to the client the
//! responses that need no rewrite, matched in order against expectations the request
//! verdict left in the connection's slot. Everything else reaches kpscd, which handles it
//! as on the splice path.
//!
//! Who writes a socket, and why order holds (the same in both directions):
//! - A verdict owns its stream (MODE_KERNEL) until an skb it may not carry (a request
//!   kpscd must see: ApiVersions, SASL, `--forbidden-api-keys`; a response that may carry
//!   addresses or answers such a request; a head split over two skbs; a full ring). It
//!   passes that skb whole and from then on every skb (MODE_USERSPACE), recording where
//!   the stretch begins, how many bytes of a frame it had begun redirecting come first
//!   (`pass_tail`), and how many frames it had redirected.
//! - Before kpscd writes a passed byte to the peer, it has accounted for every frame the
//!   kernel redirected before the stretch, and waits until the peer socket's stream holds
//!   every redirected byte: redirects are sent later by the psock backlog worker, and a
//!   write of ours would otherwise overtake them.
//! - kpscd gives a stream back by publishing `resume_at`, the frame boundary up to which
//!   it has written everything it read, once it has no byte left over. The verdict takes
//!   back only an skb that starts exactly there; if it passed another skb first, kpscd
//!   reads that too and publishes a later boundary. So a redirect never overtakes a write
//!   of ours, and at most one stretch is being handed over at a time.
//! - Responses follow requests: the request verdict pushes each carried request's
//!   expectation before it redirects the request, and a marker where it passes a stretch
//!   to kpscd. The response verdict redirects a response only if it answers the oldest
//!   expectation and that one needs no rewrite; at a marker it passes, so responses to
//!   requests kpscd handled (and everything after them) reach kpscd, in order. kpscd
//!   hands the response stream back only when no request it handled is still unanswered
//!   and the request verdict has its stream, after moving the ring's head past what it
//!   delivered. A local answer (kpscd's own) waits until the kernel has delivered every
//!   response before it and is not in the middle of one.
//! - The FIN: kpscd ends a direction only after the same drain. Both verdicts drop a
//!   FIN's own skb (no payload; TCP has taken the FIN already): sent by a psock backlog,
//!   as a redirect always is and a pass is behind redirects to its socket, 0 bytes are
//!   taken for a broken pipe (EPIPE on that socket). recvmsg may report the end before
//!   bytes passed ahead of the FIN that wait in that backlog; kpscd reads on until it has
//!   every byte the verdict passed (`passed`).
//! - Backpressure: a redirect waits on the peer socket's psock backlog, which no socket
//!   buffer bounds, while the source socket's TCP window keeps opening (the verdict has
//!   taken the bytes). Once more than BACKLOG_CAP of a direction waits there (a peer slow
//!   to read), kpscd holds the stream: the verdict passes from the next frame boundary,
//!   and kpscd, which writes only after the backlog has drained, stops reading until
//!   then. The window closes on the sender, as on the userspace path.

pub mod passed;
pub mod slots;
pub mod socket;

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, RingBuf, SockHash},
    programs::SkSkb,
};
use kpsc_common::proxy_kernel::{
    BROKER_COOKIES_MAP, BROKERS_MAP, CLIENTS_MAP, CONFIG_MAP, COOKIES_MAP, KernelConfig,
    MAX_CONNECTIONS, REQUESTS_MAP, RESPONSE_VERDICT, RequestBatch, SLOTS_MAP, VERDICT,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::mpsc,
};
use tracing::{debug, warn};

use self::{
    passed::Stream,
    slots::{Slot, Slots},
};
use crate::metrics::PortCounters;

static PROXY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpsc-proxy"));

/// What kpscd needs to run the kernel path, as operators grant it. CAP_PERFMON: the
/// verifier refuses the verdict's variable offsets into its ring record without it
/// ("pointer arithmetic with it prohibited for !root"), as for portmap.
pub const NEEDED: &str = "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root)";
pub const CAPABILITIES: [crate::privilege::Capability; 3] = [
    crate::privilege::Capability::CAP_BPF,
    crate::privilege::Capability::CAP_PERFMON,
    crate::privilege::Capability::CAP_NET_ADMIN,
];

struct SocketMaps {
    clients: SockHash<MapData, u32>,
    brokers: SockHash<MapData, u32>,
    cookies: HashMap<MapData, u64, u32>,
    broker_cookies: HashMap<MapData, u64, u32>,
}

/// Slots not in use, oldest freed first: a slot is reused as late as possible, so a
/// verdict still running for its previous connection's last skb is long finished.
struct FreeSlots {
    free: VecDeque<u32>,
    generation: Vec<u32>,
}

/// Where a slot's reports go: its connection's generation and queue.
/// Batches are boxed: a channel allocates room for 32 values up front, and 32 inline
/// batches would cost an idle connection about 9 KiB.
type Route = (u32, mpsc::UnboundedSender<Box<RequestBatch>>);

/// The loaded verdict and its maps, shared by every connection.
pub struct KernelPath {
    _ebpf: Ebpf,
    maps: Mutex<SocketMaps>,
    slots: Slots,
    free: Mutex<FreeSlots>,
    /// Per slot: the generation of its connection and where its batches go.
    routes: Mutex<Vec<Option<Route>>>,
}

fn take<M>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<M>
where
    M: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the kernel path object"))?;
    M::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Loads `name` and attaches it to `map` as its stream verdict.
fn attach_verdict(
    ebpf: &mut Ebpf,
    name: &str,
    map: &SockHash<MapData, u32>,
    map_name: &str,
) -> anyhow::Result<()> {
    let program: &mut SkSkb = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()
        .with_context(|| format!("{name} is not an sk_skb program"))?;
    program
        .load()
        .with_context(|| format!("loading {name} (needs {NEEDED})"))?;
    program
        .attach(map.fd())
        .with_context(|| format!("attaching {name} to {map_name}"))?;
    Ok(())
}

impl KernelPath {
    /// Loads and attaches the verdicts. `kernel_keys`: the API keys whose requests the
    /// kernel may carry unseen; `rewritten_from`: per API key, the lowest version whose
    /// responses kpscd must rewrite (i16::MAX: none). Must run inside the tokio runtime
    /// (it starts the ring buffer reader).
    pub fn load(
        kernel_keys: impl IntoIterator<Item = i16>,
        rewritten_from: [i16; 128],
        max_frame_size: u32,
    ) -> anyhow::Result<Arc<Self>> {
        let mut ebpf = EbpfLoader::new()
            .load(PROXY_OBJECT)
            .with_context(|| format!("loading the kernel path (needs {NEEDED})"))?;
        let clients: SockHash<MapData, u32> = take(&mut ebpf, CLIENTS_MAP)?;
        let brokers: SockHash<MapData, u32> = take(&mut ebpf, BROKERS_MAP)?;
        attach_verdict(&mut ebpf, VERDICT, &clients, CLIENTS_MAP)?;
        attach_verdict(&mut ebpf, RESPONSE_VERDICT, &brokers, BROKERS_MAP)?;
        let mut config = KernelConfig {
            max_frame_size,
            carry_responses: 1,
            rewritten_from,
            ..KernelConfig::default()
        };
        for key in kernel_keys {
            if (0..128).contains(&key) {
                config.kernel_keys[(key / 64) as usize] |= 1 << (key % 64);
            }
        }
        let mut config_map: Array<MapData, KernelConfig> = take(&mut ebpf, CONFIG_MAP)?;
        config_map
            .set(0, config, 0)
            .context("writing the kernel path's configuration")?;
        let Map::Array(slots_map) = ebpf
            .take_map(SLOTS_MAP)
            .with_context(|| format!("map {SLOTS_MAP} missing"))?
        else {
            anyhow::bail!("map {SLOTS_MAP} is not an array");
        };
        let slots = Slots::map(slots_map.fd().as_fd(), MAX_CONNECTIONS)
            .with_context(|| format!("mapping {SLOTS_MAP} into memory"))?;
        let requests: RingBuf<MapData> = take(&mut ebpf, REQUESTS_MAP)?;
        let path = Arc::new(Self {
            maps: Mutex::new(SocketMaps {
                clients,
                brokers,
                cookies: take(&mut ebpf, COOKIES_MAP)?,
                broker_cookies: take(&mut ebpf, BROKER_COOKIES_MAP)?,
            }),
            _ebpf: ebpf,
            slots,
            free: Mutex::new(FreeSlots {
                free: (0..MAX_CONNECTIONS).collect(),
                generation: vec![0; MAX_CONNECTIONS as usize],
            }),
            routes: Mutex::new((0..MAX_CONNECTIONS).map(|_| None).collect()),
        });
        // The slots' mapping must outlive the maps' fds it was made from: Ebpf keeps the
        // programs; dropping `slots_map` closes only our fd, the mapping stays valid.
        drop(slots_map);
        // SAFETY: the ring owns its fd and keeps it open, the same one, until dropped with
        // the AsyncFd.
        let reader = unsafe { AsyncFd::register_with_interest(requests, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("watching the request ring")?;
        tokio::spawn(read_requests(reader, Arc::downgrade(&path)));
        Ok(path)
    }

    /// Puts a connection on the kernel path. None when it cannot be (all slots taken, a
    /// socket the maps refuse): that connection takes the splice path.
    pub fn register(
        self: &Arc<Self>,
        client: &TcpStream,
        broker: &TcpStream,
    ) -> anyhow::Result<Option<KernelConn>> {
        let cookie = socket::cookie(client).context("reading the client socket's cookie")?;
        let broker_cookie = socket::cookie(broker).context("reading the broker socket's cookie")?;
        let broker_base = socket::stream_bytes_written(broker)
            .context("reading the broker socket's byte count")?;
        let client_base = socket::stream_bytes_written(client)
            .context("reading the client socket's byte count")?;
        let Some((index, generation)) = self.allocate() else {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                warn!(
                    slots = MAX_CONNECTIONS,
                    "every kernel path slot is taken; further connections splice (said once)"
                );
            });
            return Ok(None);
        };
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.routes)[index as usize] = Some((generation, tx));
        self.slots.get(index).reset(generation);
        // From here on an early return releases the slot and whatever entered the maps.
        let conn = KernelConn {
            path: Arc::clone(self),
            index,
            cookie,
            broker_cookie,
            batches: Mutex::new(Some(rx)),
            broker_base,
            client_base,
            counted: Default::default(),
            taken: Default::default(),
        };
        let mut maps = lock(&self.maps);
        // Cookies first: a verdict that runs finds its slot. The client socket last: its
        // verdict's redirects need the broker socket in its map.
        let inserted = maps
            .cookies
            .insert(conn.cookie, index, 0)
            .and_then(|()| maps.broker_cookies.insert(broker_cookie, index, 0))
            .and_then(|()| maps.brokers.insert(index, broker.as_raw_fd(), 0))
            .and_then(|()| maps.clients.insert(index, client.as_raw_fd(), 0));
        drop(maps);
        if let Err(error) = inserted {
            // No byte has met the verdict yet (the client socket entered no map), so the
            // connection can still take the splice path. EOPNOTSUPP: a socket no longer
            // established (the client already sent its FIN), which sockmap refuses.
            debug!(%error, "connection not put on the kernel path; it splices");
            return Ok(None);
        }
        socket::hand_queued_bytes_to_verdict(client)
            .context("handing queued client bytes to the verdict")?;
        socket::hand_queued_bytes_to_verdict(broker)
            .context("handing queued broker bytes to the verdict")?;
        Ok(Some(conn))
    }

    fn allocate(&self) -> Option<(u32, u32)> {
        let mut free = lock(&self.free);
        let index = free.free.pop_front()?;
        let generation = &mut free.generation[index as usize];
        *generation = generation.wrapping_add(1);
        Some((index, *generation))
    }

    fn release(&self, index: u32, cookie: u64, broker_cookie: u64) {
        {
            let mut maps = lock(&self.maps);
            // Entries already gone are fine: the kernel drops closed sockets from the map.
            let _ = maps.clients.remove(&index);
            let _ = maps.brokers.remove(&index);
            let _ = maps.cookies.remove(&cookie);
            let _ = maps.broker_cookies.remove(&broker_cookie);
        }
        lock(&self.routes)[index as usize] = None;
        lock(&self.free).free.push_back(index);
    }

    fn route(&self, batch: RequestBatch) {
        let routes = lock(&self.routes);
        match routes.get(batch.slot as usize) {
            Some(Some((generation, tx))) if *generation == batch.generation => {
                // A closed receiver: the connection is ending and drops its requests.
                let _ = tx.send(Box::new(batch));
            }
            // A late record of a connection that has ended.
            _ => debug!(slot = batch.slot, "request record of an ended connection"),
        }
    }
}

/// Reads the verdict's request records and hands each to its connection.
async fn read_requests(mut reader: AsyncFd<RingBuf<MapData>>, path: std::sync::Weak<KernelPath>) {
    loop {
        let mut guard = match reader.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                warn!(%error, "kernel request path: cannot watch the request ring; kernel-path connections will stall");
                return;
            }
        };
        let Some(path) = path.upgrade() else { return };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<RequestBatch>() {
                continue;
            }
            // SAFETY: the verdict writes RequestBatch records (plain data, any bit pattern
            // valid); read unaligned from the ring's memory.
            let batch = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RequestBatch>()) };
            drop(item);
            path.route(batch);
        }
        guard.clear_ready();
    }
}

/// One connection on the kernel path; leaving it (drop) takes its sockets out of the maps.
pub struct KernelConn {
    path: Arc<KernelPath>,
    index: u32,
    cookie: u64,
    broker_cookie: u64,
    /// The heads of the frames the verdict redirected, in stream order: the request loop
    /// takes the receiver.
    batches: Mutex<Option<mpsc::UnboundedReceiver<Box<RequestBatch>>>>,
    /// The broker socket's stream bytes before the kernel path (SASL written by kpscd).
    broker_base: u64,
    /// The client socket's stream bytes before the kernel path.
    client_base: u64,
    /// What `account` has counted of each direction: (frames, bytes), requests first.
    counted: [(AtomicU64, AtomicU64); 2],
    /// What the peer socket's stream had taken of each direction when last asked
    /// (`hold_if_backlogged`), requests first.
    taken: [AtomicU64; 2],
}

/// How long the redirect backlog may make no progress handing a socket its bytes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of a direction the kernel may have redirected that the peer socket's stream has
/// not taken (they wait on its psock backlog, which no socket buffer bounds) before kpscd
/// holds the direction's stream (see `StreamState::hold`). On top come the peer socket's
/// send buffer and the rest of the frame under way when the cap is crossed, and what the
/// kernel redirects before kpscd looks: it looks as each request is reported, and on the
/// response loop's poll (2 ms while it waits on the kernel, else 250 ms). So requests are
/// held back within a frame of the cap; responses that arrive in a burst after the last
/// request was reported (at most those of the 31 the kernel carries) may pass it by what
/// comes before the next poll. A check in the verdict would close that gap.
pub const BACKLOG_CAP: u64 = 4 << 20;

impl KernelConn {
    pub fn slot(&self) -> Slot<'_> {
        self.path.slots.get(self.index)
    }

    /// Counts what the kernel carried since the last call, in both directions, on the
    /// port's counters. Either direction's loop may call it; the connection's end calls
    /// it last, so a connection that ends abruptly still counts everything.
    pub fn account(&self, counters: &PortCounters) {
        let slot = self.slot();
        let directions = [
            (
                slot.requests(),
                &counters.kernel_from_client,
                &counters.bytes_from_client,
            ),
            (
                slot.responses(),
                &counters.kernel_to_client,
                &counters.bytes_to_client,
            ),
        ];
        for ((direction, kernel, bytes), (frames_counted, bytes_counted)) in
            directions.into_iter().zip(&self.counted)
        {
            let frames = direction.redirected_frames();
            let delta = frames.saturating_sub(frames_counted.fetch_max(frames, Ordering::AcqRel));
            kernel.redirected_frames.inc_by(delta);
            let carried = direction.redirected_bytes();
            let delta = carried.saturating_sub(bytes_counted.fetch_max(carried, Ordering::AcqRel));
            kernel.redirected_bytes.inc_by(delta);
            bytes.inc_by(delta);
        }
    }

    /// The request reports' receiver (once).
    pub fn take_batches(&self) -> Option<mpsc::UnboundedReceiver<Box<RequestBatch>>> {
        lock(&self.batches).take()
    }

    /// Waits until the broker socket's stream holds every request byte the kernel
    /// redirected and the `written_by_us` bytes kpscd wrote: from then on a write of ours
    /// cannot overtake a redirect.
    pub async fn drain_requests(
        &self,
        broker: &impl AsRawFd,
        written_by_us: u64,
    ) -> io::Result<()> {
        let want = || self.broker_base + written_by_us + self.slot().requests().redirected_bytes();
        drain(broker, want, "broker").await?;
        // The backlog is empty: the verdict may take the stream back.
        self.slot().requests().hold(false);
        Ok(())
    }

    /// As `drain_requests`, for the responses the kernel redirected to the client socket.
    pub async fn drain_responses(
        &self,
        client: &impl AsRawFd,
        written_by_us: u64,
    ) -> io::Result<()> {
        let want = || self.client_base + written_by_us + self.slot().responses().redirected_bytes();
        drain(client, want, "client").await?;
        // The backlog is empty: the verdict may take the stream back.
        self.slot().responses().hold(false);
        Ok(())
    }

    /// Holds `stream` once what the kernel redirected of it to the peer socket, and the
    /// peer's stream has not taken, passes BACKLOG_CAP: a peer slow to read (a broker
    /// for requests, a client for responses) would otherwise make kpscd's node queue
    /// whatever the other side sends. The drain lets go. Asks the socket only once the
    /// kernel has redirected a cap's worth since the last time, so a peer that keeps up
    /// costs nothing. `written_by_us`: what kpscd wrote to the peer itself. True when it
    /// began a hold.
    pub fn hold_if_backlogged(
        &self,
        stream: Stream,
        peer: &impl AsRawFd,
        written_by_us: u64,
    ) -> io::Result<bool> {
        let slot = self.slot();
        let (direction, base, taken) = match stream {
            Stream::Requests => (slot.requests(), self.broker_base, &self.taken[0]),
            Stream::Responses => (slot.responses(), self.client_base, &self.taken[1]),
        };
        let want = base + written_by_us + direction.redirected_bytes();
        if want.saturating_sub(taken.load(Ordering::Relaxed)) <= BACKLOG_CAP {
            return Ok(false);
        }
        let written = socket::stream_progress(peer)?.written;
        taken.store(written, Ordering::Relaxed);
        let hold = want.saturating_sub(written) > BACKLOG_CAP && !direction.held();
        if hold {
            debug!(
                ?stream,
                cap = BACKLOG_CAP,
                "the peer reads slowly: holding the stream"
            );
            direction.hold(true);
        }
        Ok(hold)
    }

    /// Stops carrying the client's requests (kpscd is shutting down and takes no new
    /// ones) and returns once the request verdict has carried and reported its last
    /// frame: it finishes a frame under way (waited for up to `patience`), then carries
    /// nothing more, and what it passes stays unread. The verdict runs under the socket's
    /// lock, so taking that lock after each step means no run that began before it is
    /// still going. The client socket stays in its map, as the target of the responses
    /// still owed.
    pub async fn stop_carrying(&self, client: &impl AsRawFd, patience: Duration) -> io::Result<()> {
        self.slot().stop();
        socket::wait_out_running_verdict(client)?;
        let give_up = Instant::now() + patience;
        while self.slot().requests().frame_left() > 0 && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        socket::wait_out_running_verdict(client)
    }
}

/// Waits until `socket`'s stream holds `want()` bytes. Gives up after DRAIN_TIMEOUT
/// without progress while nothing waits on the peer (a slow reader is waited for, as a
/// blocked write would be), or at once when the connection can no longer carry them.
async fn drain(socket: &impl AsRawFd, want: impl Fn() -> u64, name: &str) -> io::Result<()> {
    drain_within(socket, want, name, DRAIN_TIMEOUT).await
}

async fn drain_within(
    socket: &impl AsRawFd,
    want: impl Fn() -> u64,
    name: &str,
    patience: Duration,
) -> io::Result<()> {
    let mut deadline = Instant::now() + patience;
    let mut last = 0;
    let mut tries = 0u32;
    loop {
        let progress = socket::stream_progress(socket)?;
        if progress.written >= want() {
            return Ok(());
        }
        if !progress.open {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the {name} socket closed before the kernel's redirects reached it"),
            ));
        }
        if progress.written > last || progress.queued > 0 {
            last = progress.written;
            deadline = Instant::now() + patience;
        } else if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the kernel's redirect backlog did not reach the {name} socket in {patience:?}"
                ),
            ));
        }
        // The backlog worker usually runs within microseconds; tokio's timer ticks in
        // milliseconds.
        tries += 1;
        if tries < 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for KernelConn {
    fn drop(&mut self) {
        self.path
            .release(self.index, self.cookie, self.broker_cookie);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::bulk::splice::tests::pair;

    const PATIENCE: Duration = Duration::from_millis(50);

    /// Bytes that never come (a redirect the kernel dropped) end the wait after its
    /// patience, with an error naming the socket; bytes already there end it at once.
    #[tokio::test]
    async fn a_backlog_that_makes_no_progress_is_given_up_on() {
        let (mut conn, _peer) = pair().await;
        conn.write_all(&[7; 1000]).await.unwrap();
        while socket::stream_progress(&conn).unwrap().queued > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let have = socket::stream_progress(&conn).unwrap().written;
        assert!(have >= 1000);
        drain_within(&conn, || have, "client", PATIENCE)
            .await
            .unwrap();

        let started = Instant::now();
        let e = drain_within(&conn, || have + 1, "client", PATIENCE)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("client socket"), "{e}");
        assert!(started.elapsed() >= PATIENCE);
    }

    /// A peer slow to read is waited for however long it takes, as a blocked write
    /// would be: bytes queued on the socket are progress.
    #[tokio::test]
    async fn a_slow_reader_is_waited_for() {
        const LEN: usize = 16 << 20;
        let (conn, mut peer) = pair().await;
        let fd = conn.as_raw_fd();
        let (_, mut writer) = conn.into_split();
        // Returns the writer: the descriptor stays open until the wait is over.
        let feeder = tokio::spawn(async move {
            writer.write_all(&vec![1; LEN]).await.unwrap();
            writer
        });
        // The sender's buffers fill; the peer reads only after six patiences.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(PATIENCE * 6).await;
            let mut buf = vec![0; LEN];
            peer.read_exact(&mut buf).await.unwrap();
        });
        let started = Instant::now();
        drain_within(&fd, || LEN as u64, "client", PATIENCE)
            .await
            .unwrap();
        assert!(started.elapsed() >= PATIENCE * 6);
        reader.await.unwrap();
        drop(feeder.await.unwrap());
    }

    /// A connection reset while bytes are still owed fails at once.
    #[tokio::test]
    async fn a_reset_peer_fails_the_wait_at_once() {
        let (conn, peer) = pair().await;
        peer.set_zero_linger().unwrap();
        drop(peer);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let e = drain_within(&conn, || 1000, "broker", Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
