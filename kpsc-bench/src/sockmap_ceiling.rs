//! The `sockmap-ceiling` target's process: a TCP forwarder whose bytes never enter
//! userspace. Each accepted connection and its connection to the sink go into the probe's
//! SOCKHASH (kpsc-ebpf's `kpsc-sockmap-ceiling`), and its verdict redirects every skb to the
//! other socket. It measures what the kernel path itself costs and delivers on this
//! machine, an upper bound for any `kpscd proxy` design on sockmap (which must also frame,
//! rewrite and order). Not a proxy to run: it knows nothing of Kafka.

use std::{
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::SkSkb,
};
use kpsc::proxy::bulk::sockmap::socket::{
    cookie, hand_queued_bytes_to_verdict, stream_bytes_written,
};
use kpsc_common::sockmap_ceiling::{
    COUNTER_PASSED, COUNTER_REDIRECTED, COUNTERS_MAP, DELIVERED_MAP, PEERS_MAP, SOCKETS_MAP,
    VERDICT,
};

struct Maps {
    sockets: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, u64>,
    delivered: HashMap<MapData, u64, u64>,
}

/// The probe loaded and attached; dropping it detaches the verdict.
pub struct Probe {
    _ebpf: Ebpf,
    maps: Mutex<Maps>,
    counters: PerCpuArray<MapData, u64>,
}

fn take<M>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<M>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the probe object"))?;
    M::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Probe {
    /// Loads and attaches the verdict: needs CAP_BPF and CAP_NET_ADMIN (root here).
    pub fn load() -> anyhow::Result<Arc<Self>> {
        let mut ebpf = EbpfLoader::new()
            .load(kpsc::bench_probe::SOCKMAP_CEILING_OBJECT)
            .context("loading the sockmap ceiling probe (needs CAP_BPF and CAP_NET_ADMIN)")?;
        let sockets: SockHash<MapData, u64> = take(&mut ebpf, SOCKETS_MAP)?;
        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT)
            .with_context(|| format!("program {VERDICT} missing from the probe object"))?
            .try_into()
            .with_context(|| format!("{VERDICT} is not an sk_skb program"))?;
        program
            .load()
            .with_context(|| format!("loading {VERDICT}"))?;
        program
            .attach(sockets.fd())
            .with_context(|| format!("attaching {VERDICT} to {SOCKETS_MAP}"))?;
        let maps = Maps {
            sockets,
            peers: take(&mut ebpf, PEERS_MAP)?,
            delivered: take(&mut ebpf, DELIVERED_MAP)?,
        };
        let counters = take(&mut ebpf, COUNTERS_MAP)?;
        Ok(Arc::new(Self {
            _ebpf: ebpf,
            maps: Mutex::new(maps),
            counters,
        }))
    }

    /// (bytes the kernel redirected, bytes it passed to userspace) so far.
    pub fn counts(&self) -> anyhow::Result<(u64, u64)> {
        let sum = |index| -> anyhow::Result<u64> {
            Ok(self
                .counters
                .get(&index, 0)
                .context("reading the probe's counters")?
                .iter()
                .sum())
        };
        Ok((sum(COUNTER_REDIRECTED)?, sum(COUNTER_PASSED)?))
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, a: &TcpStream, b: &TcpStream) -> anyhow::Result<(u64, u64)> {
        let (ka, kb) = (cookie(a)?, cookie(b)?);
        let mut maps = self.maps();
        let inserted = (|| {
            maps.delivered.insert(ka, 0, 0)?;
            maps.delivered.insert(kb, 0, 0)?;
            maps.peers.insert(ka, kb, 0)?;
            maps.peers.insert(kb, ka, 0)?;
            maps.sockets.insert(kb, b.as_raw_fd(), 0)?;
            maps.sockets.insert(ka, a.as_raw_fd(), 0)
        })();
        if let Err(e) = inserted {
            Self::remove_locked(&mut maps, ka, kb);
            return Err(e).context("adding a connection's sockets to the probe's maps");
        }
        Ok((ka, kb))
    }

    fn remove_locked(maps: &mut Maps, ka: u64, kb: u64) {
        // Entries already gone are fine: the kernel drops closed sockets from the map.
        for key in [ka, kb] {
            let _ = maps.sockets.remove(&key);
            let _ = maps.peers.remove(&key);
            let _ = maps.delivered.remove(&key);
        }
    }

    /// Forwards one connection until both sides have closed. Plain blocking sockets,
    /// not tokio's: a socket registered with an epoll reactor wakes it for every skb the
    /// verdict takes, which would charge the probe CPU per skb for nothing.
    fn forward(&self, client: TcpStream, sink: &str) -> anyhow::Result<()> {
        let upstream = TcpStream::connect(sink)
            .with_context(|| format!("connecting to the sink at {sink}"))?;
        client.set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        let (ka, kb) = self.insert(&client, &upstream)?;
        hand_queued_bytes_to_verdict(&client)?;
        let result = std::thread::scope(|scope| {
            let towards_sink = scope.spawn(|| self.half_close_on_eof(&client, &upstream, kb));
            let towards_client = self.half_close_on_eof(&upstream, &client, ka);
            let towards_sink = towards_sink
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("forwarding thread panicked")));
            towards_sink.and(towards_client)
        });
        Self::remove_locked(&mut self.maps(), ka, kb);
        result
    }
}

/// Blocks until the peer's FIN (or an error) reaches `fd`. Only POLLRDHUP is asked for:
/// the data-ready wake-up the socket gets for every skb the verdict redirects carries
/// POLLIN and so does not wake this poll, and the probe spends no CPU per skb (a readiness
/// loop would wake up for every one and find nothing to read).
fn wait_for_fin(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Ok(());
        }
    }
}

/// How long the redirect backlog may take to hand a socket its bytes before a FIN.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Probe {
    /// Waits for `from` to end, then for `to` (cookie `to_key`) to hold every byte
    /// redirected to it, then ends that direction: a FIN sent earlier would overtake
    /// queued redirects.
    fn half_close_on_eof(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        to_key: u64,
    ) -> anyhow::Result<()> {
        wait_for_fin(from.as_raw_fd())?;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let delivered = self.maps().delivered.get(&to_key, 0).unwrap_or(0);
            if stream_bytes_written(to)? >= delivered {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("the redirect backlog did not drain in {DRAIN_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        to.shutdown(Shutdown::Write)?;
        Ok(())
    }
}

/// Runs the forwarder: `listen` -> `sink`, every connection through the probe, a thread
/// per direction. Writes the probe's counters (`redirected_bytes=N passed_bytes=M`) to
/// `counters` every `report`.
pub fn run(
    listen: &str,
    sink: &str,
    counters: std::path::PathBuf,
    report: Duration,
) -> anyhow::Result<()> {
    let probe = Probe::load()?;
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let reporter = Arc::clone(&probe);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(report);
            if let Ok((redirected, passed)) = reporter.counts() {
                let line = format!("redirected_bytes={redirected} passed_bytes={passed}\n");
                if let Err(e) = std::fs::write(&counters, line) {
                    eprintln!("writing {}: {e}", counters.display());
                }
            }
        }
    });
    for client in listener.incoming() {
        let client = client.context("accepting")?;
        let (probe, sink) = (Arc::clone(&probe), sink.to_owned());
        std::thread::spawn(move || {
            if let Err(e) = probe.forward(client, &sink) {
                // A connection that closed before it entered the map (kpsc-bench's
                // readiness check) is refused by the map with EOPNOTSUPP: nothing to say.
                let closed_at_once = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .and_then(std::io::Error::raw_os_error)
                        == Some(libc::EOPNOTSUPP)
                });
                if !closed_at_once {
                    eprintln!("kpsc-sockmap-ceiling: connection ended: {e:#}");
                }
            }
        });
    }
    Ok(())
}
