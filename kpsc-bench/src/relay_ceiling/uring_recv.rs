//! The io_uring recv/send relay (`uring-recv-send-ceiling`): per connection and
//! direction, one multishot IORING_OP_RECV that picks buffers from a provided buffer ring,
//! and one IORING_OP_SEND at a time of what it received, in order. Unlike splice, recv
//! and send complete inline or from a poll wake-up, never in io-wq workers; the price is a
//! copy into userspace memory and out of it.
//!
//! When the ring runs out of buffers a multishot recv ends with ENOBUFS; the direction is
//! armed again once a send has given a buffer back, so a slow receiver holds its sender
//! back through TCP, as with any relay.

use std::{
    collections::VecDeque,
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
};

use anyhow::Context as _;
use io_uring::{cqueue, opcode, types, types::BufRingEntry};

use crate::relay_ceiling::{
    counters::Counters,
    ring::{MAX_CONNECTIONS, Relay, Ring, SLOTS_PER_CONNECTION, drive},
};

const RECV: u64 = 0;
const SEND: u64 = 1;

/// Buffers in the provided ring (a power of two) and their size: 16 MiB in all, shared by
/// every connection.
const BUFFERS: u16 = 256;
const BUFFER_SIZE: usize = 64 << 10;
const GROUP: u16 = 0;

fn user_data(connection: usize, direction: usize, op: u64) -> u64 {
    ((connection as u64) << 2) | ((direction as u64) << 1) | op
}

/// The provided buffer ring: entries shared with the kernel, and the buffers they name.
struct BufRing {
    entries: *mut BufRingEntry,
    memory: Box<[u8]>,
    tail: u16,
}

impl BufRing {
    fn new(ring: &Ring) -> anyhow::Result<Self> {
        let bytes = usize::from(BUFFERS) * size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping (page-aligned, as the kernel requires),
        // never unmapped: the ring lives as long as the process.
        let entries = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        anyhow::ensure!(
            entries != libc::MAP_FAILED,
            "mapping the buffer ring: {}",
            io::Error::last_os_error()
        );
        // SAFETY: the mapping stays valid for the process's life.
        unsafe {
            ring.uring
                .submitter()
                .register_buf_ring_with_flags(entries as u64, BUFFERS, GROUP, 0)
        }
        .context("registering the provided buffer ring")?;
        let mut buffers = Self {
            entries: entries.cast(),
            memory: vec![0u8; usize::from(BUFFERS) * BUFFER_SIZE].into_boxed_slice(),
            tail: 0,
        };
        for bid in 0..BUFFERS {
            buffers.give_back(bid);
        }
        Ok(buffers)
    }

    fn buffer(&self, bid: u16) -> *const u8 {
        self.memory[usize::from(bid) * BUFFER_SIZE..].as_ptr()
    }

    /// Hands buffer `bid` to the kernel again.
    fn give_back(&mut self, bid: u16) {
        let addr = self.buffer(bid) as u64;
        // SAFETY: the slot is inside the mapping; the kernel reads only slots before the
        // tail, and this one is after it until the store below.
        unsafe {
            let entry = &mut *self.entries.add(usize::from(self.tail & (BUFFERS - 1)));
            entry.set_addr(addr);
            entry.set_len(BUFFER_SIZE as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is a u16 in the first entry, which the kernel reads atomically.
        unsafe {
            AtomicU16::from_ptr(BufRingEntry::tail(self.entries).cast_mut())
                .store(self.tail, Ordering::Release);
        }
    }
}

struct Direction {
    from: u32,
    to: u32,
    /// Received buffers not sent yet (buffer id, length), oldest first; `sent`: bytes of
    /// the first one already sent.
    queue: VecDeque<(u16, u32)>,
    sent: u32,
    receiving: bool,
    sending: bool,
    eof: bool,
    done: bool,
}

struct Connection {
    client: TcpStream,
    upstream: TcpStream,
    directions: [Direction; 2],
    failed: bool,
}

struct RecvSendRelay {
    ring: Ring,
    buffers: BufRing,
    connections: Vec<Option<Connection>>,
    /// Directions whose recv ended for want of buffers, to arm again when some come back.
    starved: Vec<(usize, usize)>,
    counters: Arc<Counters>,
}

impl RecvSendRelay {
    fn arm_recv(&mut self, index: usize, direction: usize) -> io::Result<()> {
        let Some(c) = self.connections[index].as_mut() else {
            return Ok(());
        };
        let d = &mut c.directions[direction];
        if c.failed || d.eof || d.receiving {
            return Ok(());
        }
        d.receiving = true;
        let recv = opcode::RecvMulti::new(types::Fixed(d.from), GROUP)
            .build()
            .user_data(user_data(index, direction, RECV));
        // SAFETY: the slot stays registered until the recv ends (see `release`).
        unsafe { self.ring.push(&[recv]) }
    }

    /// Sends the oldest received bytes if no send is in flight; half-closes once the
    /// source ended and everything went out.
    fn send_next(&mut self, index: usize, direction: usize) -> io::Result<()> {
        let Some(c) = self.connections[index].as_mut() else {
            return Ok(());
        };
        let d = &mut c.directions[direction];
        if c.failed || d.sending {
            return Ok(());
        }
        let Some(&(bid, len)) = d.queue.front() else {
            if d.eof && !d.done {
                d.done = true;
                let to = if direction == 0 {
                    &c.upstream
                } else {
                    &c.client
                };
                let _ = to.shutdown(Shutdown::Write);
            }
            return Ok(());
        };
        d.sending = true;
        // SAFETY: `sent` < `len` <= BUFFER_SIZE: inside buffer `bid`.
        let at = unsafe { self.buffers.buffer(bid).add(d.sent as usize) };
        let send = opcode::Send::new(types::Fixed(d.to), at, len - d.sent)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(index, direction, SEND));
        // SAFETY: the buffer is not given back to the kernel before the send completes.
        unsafe { self.ring.push(&[send]) }
    }

    fn completed(&mut self, data: u64, result: i32, flags: u32) -> io::Result<()> {
        let (index, direction, op) = ((data >> 2) as usize, ((data >> 1) & 1) as usize, data & 1);
        let Some(c) = self.connections[index].as_mut() else {
            return Ok(());
        };
        let d = &mut c.directions[direction];
        let mut error = None;
        let mut freed = None;
        if op == RECV {
            if !cqueue::more(flags) {
                d.receiving = false;
            }
            match result {
                n if n > 0 => {
                    let bid = cqueue::buffer_select(flags).ok_or_else(|| {
                        io::Error::other("a recv completion without its buffer id")
                    })?;
                    d.queue.push_back((bid, n as u32));
                    self.counters.chunk();
                }
                0 => d.eof = true,
                n if n == -libc::ENOBUFS => self.starved.push((index, direction)),
                n => error = Some(io::Error::from_raw_os_error(-n)),
            }
        } else {
            d.sending = false;
            match result {
                n if n > 0 => {
                    self.counters.relayed(n as u64);
                    d.sent += n as u32;
                    if let Some(&(bid, len)) = d.queue.front()
                        && d.sent >= len
                    {
                        d.queue.pop_front();
                        d.sent = 0;
                        freed = Some(bid);
                    }
                }
                0 => error = Some(io::ErrorKind::WriteZero.into()),
                n => error = Some(io::Error::from_raw_os_error(-n)),
            }
        }
        if let Some(e) = error
            && !c.failed
        {
            // Ends this connection's other operations: its recvs and sends return.
            eprintln!("kpsc-relay-ceiling: connection ended: {e}");
            c.failed = true;
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.upstream.shutdown(Shutdown::Both);
        }
        if let Some(bid) = freed {
            self.buffers.give_back(bid);
            for (i, d) in std::mem::take(&mut self.starved) {
                self.arm_recv(i, d)?;
            }
        }
        let Some(c) = self.connections[index].as_ref() else {
            return Ok(());
        };
        let d = &c.directions[direction];
        let rearm = op == RECV && !d.receiving && result > 0;
        if c.failed {
            if c.directions.iter().all(|d| !d.receiving && !d.sending) {
                self.release(index);
            }
            return Ok(());
        }
        if rearm {
            // A multishot recv may end with data (e.g. its CQ overflowed): arm it again.
            self.arm_recv(index, direction)?;
        }
        self.send_next(index, direction)?;
        if let Some(c) = self.connections[index].as_ref()
            && c.directions.iter().all(|d| d.done)
        {
            self.release(index);
        }
        Ok(())
    }

    fn release(&mut self, index: usize) {
        if let Some(c) = self.connections[index].take() {
            for d in c.directions {
                for (bid, _) in d.queue {
                    self.buffers.give_back(bid);
                }
            }
        }
        self.ring.release(index);
    }
}

impl Relay for RecvSendRelay {
    fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }

    fn add(&mut self, client: TcpStream, upstream: TcpStream) -> anyhow::Result<()> {
        let mut fds = [-1; SLOTS_PER_CONNECTION];
        fds[0] = client.as_raw_fd();
        fds[1] = upstream.as_raw_fd();
        let index = self.ring.register(&fds)?;
        let base = (index * SLOTS_PER_CONNECTION) as u32;
        let direction = |from, to| Direction {
            from: base + from,
            to: base + to,
            queue: VecDeque::new(),
            sent: 0,
            receiving: false,
            sending: false,
            eof: false,
            done: false,
        };
        self.connections[index] = Some(Connection {
            client,
            upstream,
            directions: [direction(0, 1), direction(1, 0)],
            failed: false,
        });
        self.arm_recv(index, 0)?;
        self.arm_recv(index, 1)?;
        Ok(())
    }

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) -> io::Result<()> {
        self.completed(user_data, result, flags)
    }
}

pub fn run(listener: TcpListener, sink: SocketAddr, counters: Arc<Counters>) -> anyhow::Result<()> {
    let ring = Ring::new(false)?;
    let relay = RecvSendRelay {
        buffers: BufRing::new(&ring)?,
        ring,
        connections: (0..MAX_CONNECTIONS).map(|_| None).collect(),
        starved: Vec::new(),
        counters,
    };
    drive(relay, listener, sink)
}
