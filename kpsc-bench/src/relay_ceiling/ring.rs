//! What the io_uring relays share: the ring (optionally with an SQ polling thread), its
//! registered-file table, the io-wq workers' CPU affinity, and the loop that accepts
//! connections and hands completions to a relay.
//!
//! The io-wq workers follow the relay thread's CPU affinity (IORING_REGISTER_IOWQ_AFF,
//! checked on a 200 ms tick): the benchmark pins the proxy to a CPU, and the kernel would
//! otherwise run the workers on any CPU.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, mpsc},
};

use anyhow::Context as _;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use kpsc::proxy::bulk::uring::ring::own_cpus;

/// Connections at once; each takes SLOTS_PER_CONNECTION registered-file slots.
pub const MAX_CONNECTIONS: usize = 1024;
pub const SLOTS_PER_CONNECTION: usize = 6;
const RING_ENTRIES: u32 = 1024;
/// How long the SQ thread polls before it sleeps and needs a wake-up syscall.
const SQ_THREAD_IDLE_MS: u32 = 50;

/// user_data of the eventfd read that says new connections are waiting, and of the tick;
/// relays use the values below these.
const WAKE: u64 = u64::MAX;
const TICK: u64 = u64::MAX - 1;

pub struct Ring {
    pub uring: IoUring,
    free: Vec<usize>,
    /// The CPUs the io-wq workers were last told to use.
    iowq_cpus: Option<Vec<usize>>,
}

impl Ring {
    pub fn new(sqpoll: bool) -> anyhow::Result<Self> {
        let mut builder = IoUring::builder();
        if sqpoll {
            builder.setup_sqpoll(SQ_THREAD_IDLE_MS);
            // The SQ thread is a kernel thread of this process: on the proxy's CPU when
            // the benchmark pinned it to one, like the rest of the process.
            if let Ok((_, cpus)) = own_cpus()
                && let [cpu] = cpus.as_slice()
            {
                builder.setup_sqpoll_cpu(*cpu as u32);
            }
        } else {
            // Completions from io-wq are run when this thread next enters the kernel
            // (it always waits there), not by interrupting it.
            builder.setup_coop_taskrun();
        }
        let uring = builder
            .build(RING_ENTRIES)
            .context("creating the io_uring (kernel.io_uring_disabled?)")?;
        uring
            .submitter()
            .register_files_sparse((MAX_CONNECTIONS * SLOTS_PER_CONNECTION) as u32)
            .context("registering the file table (RLIMIT_NOFILE too low?)")?;
        let mut ring = Self {
            uring,
            free: (0..MAX_CONNECTIONS).rev().collect(),
            iowq_cpus: None,
        };
        ring.follow_affinity()?;
        Ok(ring)
    }

    /// Tells io-wq to run this ring's workers on the CPUs the relay thread may use, when
    /// those changed (the benchmark moves the proxy between CPUs).
    fn follow_affinity(&mut self) -> anyhow::Result<()> {
        let (set, cpus) = own_cpus().context("reading the relay thread's CPU affinity")?;
        if self.iowq_cpus.as_ref() != Some(&cpus) {
            self.uring
                .submitter()
                .register_iowq_aff(&set)
                .context("setting the io-wq workers' CPU affinity")?;
            self.iowq_cpus = Some(cpus);
        }
        Ok(())
    }

    /// Queues `entries` together (a linked round must not be split), submitting what is
    /// queued first when the ring lacks room.
    ///
    /// # Safety
    /// Every buffer and file an entry names stays valid until its completion.
    pub unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        loop {
            // SAFETY: the caller's promise.
            if unsafe { self.uring.submission().push_multiple(entries) }.is_ok() {
                return Ok(());
            }
            self.uring.submit()?;
        }
    }

    /// Takes a connection index and registers `fds` in its slots (the first at
    /// `index * SLOTS_PER_CONNECTION`).
    pub fn register(&mut self, fds: &[RawFd; SLOTS_PER_CONNECTION]) -> anyhow::Result<usize> {
        let index = self
            .free
            .pop()
            .with_context(|| format!("more than {MAX_CONNECTIONS} connections"))?;
        let base = (index * SLOTS_PER_CONNECTION) as u32;
        if let Err(e) = self.uring.submitter().register_files_update(base, fds) {
            self.free.push(index);
            return Err(e).context("registering a connection's files");
        }
        Ok(index)
    }

    /// Clears a connection's slots (no operation of it may be in flight) and frees its
    /// index; its files can then be closed.
    pub fn release(&mut self, index: usize) {
        let base = (index * SLOTS_PER_CONNECTION) as u32;
        let _ = self
            .uring
            .submitter()
            .register_files_update(base, &[-1; SLOTS_PER_CONNECTION]);
        self.free.push(index);
    }
}

/// A relay on a [`Ring`]: takes connections and the completions of its operations.
pub trait Relay {
    fn ring(&mut self) -> &mut Ring;
    fn add(&mut self, client: TcpStream, upstream: TcpStream) -> anyhow::Result<()>;
    fn complete(&mut self, user_data: u64, result: i32, flags: u32) -> io::Result<()>;
}

/// Accepts on `listener` and connects to `sink` on its own thread (blocking), handing
/// each pair to the ring's thread through `pairs` and a write to `wake`.
fn accept_loop(
    listener: TcpListener,
    sink: SocketAddr,
    pairs: mpsc::Sender<(TcpStream, TcpStream)>,
    wake: Arc<OwnedFd>,
) {
    for client in listener.incoming() {
        let pair = client.and_then(|client| {
            let upstream = TcpStream::connect(sink)?;
            client.set_nodelay(true)?;
            upstream.set_nodelay(true)?;
            Ok((client, upstream))
        });
        match pair {
            Ok(pair) => {
                if pairs.send(pair).is_err() {
                    return;
                }
                let one = 1u64.to_ne_bytes();
                // SAFETY: an 8-byte write to the eventfd this thread shares.
                unsafe { libc::write(wake.as_raw_fd(), one.as_ptr().cast(), 8) };
            }
            Err(e) => eprintln!("kpsc-relay-ceiling: accepting or connecting to {sink}: {e}"),
        }
    }
}

/// Runs `relay` until an error: connections from `listener`, each with its own
/// connection to `sink`.
pub fn drive(mut relay: impl Relay, listener: TcpListener, sink: SocketAddr) -> anyhow::Result<()> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    anyhow::ensure!(wake >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: just created, owned by nothing else.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
    let (pairs, incoming) = mpsc::channel();
    {
        let wake = Arc::clone(&wake);
        std::thread::spawn(move || accept_loop(listener, sink, pairs, wake));
    }
    let mut word = Box::new([0u8; 8]);
    let read_wake = |word: &mut [u8; 8]| {
        opcode::Read::new(types::Fd(wake.as_raw_fd()), word.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE)
    };
    let tick = Box::new(types::Timespec::new().nsec(200_000_000));
    let ticks = opcode::Timeout::new(&*tick)
        .flags(types::TimeoutFlags::MULTISHOT)
        .build()
        .user_data(TICK);
    // SAFETY: `word`, `tick` and the eventfd outlive the loop, which never ends but in error.
    unsafe { relay.ring().push(&[read_wake(&mut word), ticks])? };
    let mut completed = Vec::new();
    loop {
        match relay.ring().uring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e).context("io_uring_enter"),
        }
        completed.extend(
            relay
                .ring()
                .uring
                .completion()
                .map(|c: cqueue::Entry| (c.user_data(), c.result(), c.flags())),
        );
        for (data, result, flags) in completed.drain(..) {
            match data {
                WAKE => {
                    anyhow::ensure!(result == 8, "reading the wake-up eventfd: {result}");
                    while let Ok((client, upstream)) = incoming.try_recv() {
                        if let Err(e) = relay.add(client, upstream) {
                            eprintln!("kpsc-relay-ceiling: connection refused: {e:#}");
                        }
                    }
                    // SAFETY: as above.
                    unsafe { relay.ring().push(&[read_wake(&mut word)])? };
                }
                TICK => relay.ring().follow_affinity()?,
                _ => relay.complete(data, result, flags)?,
            }
        }
    }
}
