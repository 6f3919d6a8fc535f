//! The io_uring relay (`uring-ceiling`, and `uring-sqpoll-ceiling` with
//! IORING_SETUP_SQPOLL): one thread, one ring, every connection on it.
//!
//! Per connection and direction, a round is two linked operations: IORING_OP_SPLICE
//! socket -> pipe (up to the pipe's capacity), hard-linked to IORING_OP_SPLICE pipe ->
//! socket of up to the same length with SPLICE_F_NONBLOCK. The kernel fails a splice
//! that moved less than asked (the usual case), so a soft link would cancel the second
//! operation; a hard link runs it anyway. The pipe is empty when a round starts, so the
//! second operation moves exactly what the first put in it (a pipe -> socket splice stops
//! at an empty pipe once it has moved something), and on an empty pipe (EOF or an error
//! in the first) SPLICE_F_NONBLOCK makes it return EAGAIN instead of waiting. Bytes
//! left in the pipe (a short send) go out in a lone pipe -> socket splice before the next
//! round. The sockets stay blocking: the kernel runs splice in its io-wq worker threads
//! (it cannot splice without blocking inline), where a blocking splice waits for data.
//!
//! Sockets and pipes are registered files (one table slot each), so the workers take no
//! file references per operation. The io-wq workers follow the relay thread's CPU
//! affinity (IORING_REGISTER_IOWQ_AFF, checked on a 200 ms tick): the benchmark pins the
//! proxy to a CPU, and the kernel would otherwise run the workers on any CPU.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use anyhow::Context as _;
use io_uring::{IoUring, opcode, squeue, types};

use crate::relay_ceiling::pipe::Pipe;

/// Connections at once; each takes six registered-file slots.
const MAX_CONNECTIONS: usize = 1024;
const SLOTS_PER_CONNECTION: usize = 6;
const RING_ENTRIES: u32 = 1024;
/// How long the SQ thread polls before it sleeps and needs a wake-up syscall.
const SQ_THREAD_IDLE_MS: u32 = 50;

/// user_data of the eventfd read that says new connections are waiting, and of the tick.
const WAKE: u64 = u64::MAX;
const TICK: u64 = u64::MAX - 1;
const FILL: u64 = 0;
const DRAIN: u64 = 1;

fn user_data(connection: usize, direction: usize, op: u64) -> u64 {
    ((connection as u64) << 2) | ((direction as u64) << 1) | op
}

/// One direction of a connection: registered-file slots and where its round stands.
struct Direction {
    from: u32,
    to: u32,
    pipe_read: u32,
    pipe_write: u32,
    capacity: u32,
    /// Bytes the fill put in the pipe that no drain has sent yet (signed: nothing is
    /// assumed about the order of a round's two completions).
    in_pipe: i64,
    /// Operations of the current round still to complete.
    pending: u8,
    eof: bool,
    done: bool,
}

struct Connection {
    client: TcpStream,
    upstream: TcpStream,
    /// Kept open for the slots that name them.
    _pipes: [Pipe; 2],
    directions: [Direction; 2],
    failed: bool,
}

impl Connection {
    fn stream(&self, direction: usize, towards: bool) -> &TcpStream {
        // Direction 0 is client -> upstream; `towards`: the socket it writes to.
        match (direction, towards) {
            (0, false) | (1, true) => &self.client,
            _ => &self.upstream,
        }
    }
}

struct Relay {
    ring: IoUring,
    connections: Vec<Option<Connection>>,
    free: Vec<usize>,
    relayed: Arc<AtomicU64>,
    /// The CPUs the io-wq workers were last told to use.
    iowq_cpus: Option<Vec<usize>>,
}

/// The CPUs the calling thread may run on.
fn own_cpus() -> io::Result<(libc::cpu_set_t, Vec<usize>)> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        let cpus = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect();
        Ok((set, cpus))
    }
}

impl Relay {
    fn new(sqpoll: bool, relayed: Arc<AtomicU64>) -> anyhow::Result<Self> {
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
        let ring = builder
            .build(RING_ENTRIES)
            .context("creating the io_uring (kernel.io_uring_disabled?)")?;
        ring.submitter()
            .register_files_sparse((MAX_CONNECTIONS * SLOTS_PER_CONNECTION) as u32)
            .context("registering the file table (RLIMIT_NOFILE too low?)")?;
        let mut relay = Self {
            ring,
            connections: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            free: (0..MAX_CONNECTIONS).rev().collect(),
            relayed,
            iowq_cpus: None,
        };
        relay.follow_affinity()?;
        Ok(relay)
    }

    /// Tells io-wq to run this ring's workers on the CPUs the relay thread may use, when
    /// those changed (the benchmark moves the proxy between CPUs).
    fn follow_affinity(&mut self) -> anyhow::Result<()> {
        let (set, cpus) = own_cpus().context("reading the relay thread's CPU affinity")?;
        if self.iowq_cpus.as_ref() != Some(&cpus) {
            self.ring
                .submitter()
                .register_iowq_aff(&set)
                .context("setting the io-wq workers' CPU affinity")?;
            self.iowq_cpus = Some(cpus);
        }
        Ok(())
    }

    /// Queues `entries` together (a linked round must not be split), submitting what is
    /// queued first when the ring lacks room.
    fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry names (eventfd word, timespec) lives as long
            // as the relay, and every file it names is a registered slot or the eventfd.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn add(&mut self, client: TcpStream, upstream: TcpStream) -> anyhow::Result<()> {
        let index = self
            .free
            .pop()
            .with_context(|| format!("more than {MAX_CONNECTIONS} connections"))?;
        let pipes = [Pipe::new(false)?, Pipe::new(false)?];
        let fds: [RawFd; SLOTS_PER_CONNECTION] = [
            client.as_raw_fd(),
            upstream.as_raw_fd(),
            pipes[0].read.as_raw_fd(),
            pipes[0].write.as_raw_fd(),
            pipes[1].read.as_raw_fd(),
            pipes[1].write.as_raw_fd(),
        ];
        let base = (index * SLOTS_PER_CONNECTION) as u32;
        if let Err(e) = self.ring.submitter().register_files_update(base, &fds) {
            self.free.push(index);
            return Err(e).context("registering a connection's files");
        }
        let direction = |from, to, pipe: &Pipe, pipe_slot| Direction {
            from: base + from,
            to: base + to,
            pipe_read: base + pipe_slot,
            pipe_write: base + pipe_slot + 1,
            capacity: pipe.capacity as u32,
            in_pipe: 0,
            pending: 0,
            eof: false,
            done: false,
        };
        let directions = [
            direction(0, 1, &pipes[0], 2),
            direction(1, 0, &pipes[1], 4),
        ];
        self.connections[index] = Some(Connection {
            client,
            upstream,
            _pipes: pipes,
            directions,
            failed: false,
        });
        for d in 0..2 {
            self.start_round(index, d)?;
        }
        Ok(())
    }

    fn start_round(&mut self, index: usize, direction: usize) -> io::Result<()> {
        let Some(c) = self.connections[index].as_mut() else {
            return Ok(());
        };
        let d = &mut c.directions[direction];
        let fill = opcode::Splice::new(
            types::Fixed(d.from),
            -1,
            types::Fixed(d.pipe_write),
            -1,
            d.capacity,
        )
        .flags(libc::SPLICE_F_MOVE)
        .build()
        .flags(squeue::Flags::IO_HARDLINK)
        .user_data(user_data(index, direction, FILL));
        let drain = opcode::Splice::new(
            types::Fixed(d.pipe_read),
            -1,
            types::Fixed(d.to),
            -1,
            d.capacity,
        )
        .flags(libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK)
        .build()
        .user_data(user_data(index, direction, DRAIN));
        d.pending = 2;
        self.push(&[fill, drain])
    }

    /// Sends what a short drain left in the pipe.
    fn drain_rest(&mut self, index: usize, direction: usize) -> io::Result<()> {
        let Some(c) = self.connections[index].as_mut() else {
            return Ok(());
        };
        let d = &mut c.directions[direction];
        let drain = opcode::Splice::new(
            types::Fixed(d.pipe_read),
            -1,
            types::Fixed(d.to),
            -1,
            d.in_pipe as u32,
        )
        .flags(libc::SPLICE_F_MOVE)
        .build()
        .user_data(user_data(index, direction, DRAIN));
        d.pending = 1;
        self.push(&[drain])
    }

    fn complete(&mut self, data: u64, result: i32) -> io::Result<()> {
        let (index, direction, op) = ((data >> 2) as usize, ((data >> 1) & 1) as usize, data & 1);
        let Some(c) = self.connections[index].as_mut() else {
            return Ok(());
        };
        let d = &mut c.directions[direction];
        d.pending -= 1;
        let error = match (op, result) {
            (FILL, 0) => {
                d.eof = true;
                None
            }
            (_, n) if n > 0 => {
                if op == FILL {
                    d.in_pipe += i64::from(n);
                } else {
                    d.in_pipe -= i64::from(n);
                    self.relayed.fetch_add(n as u64, Ordering::Relaxed);
                }
                None
            }
            // The round's drain found the pipe empty: the fill brought nothing.
            (DRAIN, n) if n == -libc::EAGAIN => None,
            // Our pipe's write end is open, so a pipe -> socket splice never ends at 0.
            (DRAIN, 0) => Some(io::Error::from(io::ErrorKind::WriteZero)),
            (_, n) => Some(io::Error::from_raw_os_error(-n)),
        };
        if let Some(e) = error
            && !c.failed
        {
            // Ends the other operations of this connection: blocked splices return.
            eprintln!("kpsc-relay-ceiling: connection ended: {e}");
            c.failed = true;
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.upstream.shutdown(Shutdown::Both);
        }
        let d = &mut c.directions[direction];
        if d.pending > 0 {
            return Ok(());
        }
        if c.failed {
            d.done = true;
        } else if d.in_pipe > 0 {
            return self.drain_rest(index, direction);
        } else if d.eof {
            d.done = true;
            // Half-close: the other direction goes on.
            let _ = c.stream(direction, true).shutdown(Shutdown::Write);
        } else {
            return self.start_round(index, direction);
        }
        if c.directions.iter().all(|d| d.done && d.pending == 0) {
            self.release(index);
        }
        Ok(())
    }

    fn release(&mut self, index: usize) {
        let base = (index * SLOTS_PER_CONNECTION) as u32;
        // No operation of it is in flight: the slots can be cleared, then the files closed.
        let _ = self
            .ring
            .submitter()
            .register_files_update(base, &[-1; SLOTS_PER_CONNECTION]);
        self.connections[index] = None;
        self.free.push(index);
    }
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

pub fn run(
    listener: TcpListener,
    sink: SocketAddr,
    sqpoll: bool,
    relayed: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut relay = Relay::new(sqpoll, relayed)?;
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
    relay.push(&[read_wake(&mut word), ticks])?;
    let mut completed = Vec::new();
    loop {
        match relay.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e).context("io_uring_enter"),
        }
        completed.extend(
            relay
                .ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for (data, result) in completed.drain(..) {
            match data {
                WAKE => {
                    anyhow::ensure!(result == 8, "reading the wake-up eventfd: {result}");
                    while let Ok((client, upstream)) = incoming.try_recv() {
                        if let Err(e) = relay.add(client, upstream) {
                            eprintln!("kpsc-relay-ceiling: connection refused: {e:#}");
                        }
                    }
                    relay.push(&[read_wake(&mut word)])?;
                }
                TICK => relay.follow_affinity()?,
                _ => relay.complete(data, result)?,
            }
        }
    }
}
