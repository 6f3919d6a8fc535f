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
//! file references per operation.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
};

use io_uring::{opcode, squeue, types};

use crate::relay_ceiling::{
    counters::Counters,
    pipe::Pipe,
    ring::{MAX_CONNECTIONS, Relay, Ring, SLOTS_PER_CONNECTION, drive},
};

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

struct SpliceRelay {
    ring: Ring,
    connections: Vec<Option<Connection>>,
    counters: Arc<Counters>,
}

impl SpliceRelay {
    fn connect(&mut self, client: TcpStream, upstream: TcpStream) -> anyhow::Result<()> {
        let pipes = [Pipe::new(false)?, Pipe::new(false)?];
        let fds: [RawFd; SLOTS_PER_CONNECTION] = [
            client.as_raw_fd(),
            upstream.as_raw_fd(),
            pipes[0].read.as_raw_fd(),
            pipes[0].write.as_raw_fd(),
            pipes[1].read.as_raw_fd(),
            pipes[1].write.as_raw_fd(),
        ];
        let index = self.ring.register(&fds)?;
        let base = (index * SLOTS_PER_CONNECTION) as u32;
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
        let directions = [direction(0, 1, &pipes[0], 2), direction(1, 0, &pipes[1], 4)];
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
        // SAFETY: the slots stay registered until both complete (see `release`).
        unsafe { self.ring.push(&[fill, drain]) }
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
        // SAFETY: as in `start_round`.
        unsafe { self.ring.push(&[drain]) }
    }

    fn completed(&mut self, data: u64, result: i32) -> io::Result<()> {
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
                    self.counters.chunk();
                } else {
                    d.in_pipe -= i64::from(n);
                    self.counters.relayed(n as u64);
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
        // No operation of it is in flight: the slots can be cleared, then the files closed.
        self.ring.release(index);
        self.connections[index] = None;
    }
}

impl Relay for SpliceRelay {
    fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }

    fn add(&mut self, client: TcpStream, upstream: TcpStream) -> anyhow::Result<()> {
        self.connect(client, upstream)
    }

    fn complete(&mut self, user_data: u64, result: i32, _flags: u32) -> io::Result<()> {
        self.completed(user_data, result)
    }
}

pub fn run(
    listener: TcpListener,
    sink: SocketAddr,
    sqpoll: bool,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let relay = SpliceRelay {
        ring: Ring::new(sqpoll)?,
        connections: (0..MAX_CONNECTIONS).map(|_| None).collect(),
        counters,
    };
    drive(relay, listener, sink)
}
