//! The io_uring that moves spliced spans for every `--bulk-transfer uring` connection: one
//! thread owns it, takes spans from tokio tasks through a queue and an eventfd, and runs
//! each span to its end before it wakes the task that asked.
//!
//! A span moves in rounds. A round is IORING_OP_SPLICE socket -> pipe of at most what is
//! left of the span (never past the frame, so the next frame's header stays in the socket
//! for kpscd to read), hard-linked to IORING_OP_SPLICE pipe -> socket with
//! SPLICE_F_NONBLOCK. The kernel fails a splice that moved less than asked, the usual case,
//! so a soft link would cancel the send; a hard link runs it anyway. The pipe is empty when
//! a round starts, so the send moves what the receive put in it, and on an empty pipe (EOF
//! or an error in the receive) it returns EAGAIN rather than waiting. A short send is
//! finished by a lone pipe -> socket splice before the next round. Both sockets are
//! blocking at the file level: the kernel runs every splice in its io-wq worker threads,
//! where a blocking splice sleeps until the network stack wakes it, with no trip through
//! userspace between rounds. The sockets' receive and send timeouts
//! (`socket::KERNEL_WAIT`) bound that sleep: a splice that waited that long for a peer
//! returns EAGAIN, and the span comes back to its task as stalled, to wait in tokio's
//! reactor instead. So a worker thread exists only while bytes move, not per peer that
//! stops in the middle of a frame.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
    thread,
};

use anyhow::Context as _;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tracing::{error, warn};

/// Submission queue size; the completion queue is twice this, and the kernel keeps
/// completions that overflow it (IORING_FEAT_NODROP).
const RING_ENTRIES: u32 = 1024;
/// user_data of the eventfd read that says spans are queued, and of the affinity tick.
const WAKE: u64 = u64::MAX;
const TICK: u64 = u64::MAX - 1;
/// The operations of a span, in user_data's low two bits: a round's receive and send, and
/// a lone send (the rest of a short one).
const FILL: u64 = 0;
const DRAIN: u64 = 1;
const REST: u64 = 2;

/// A pipe whose two ends are blocking: the splices on it run in io-wq, which may wait.
pub struct BlockingPipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: u32,
}

/// Pipe size asked for, as splice's: a 1 MiB span takes four rounds.
const PIPE_SIZE: libc::c_int = 256 << 10;

impl BlockingPipe {
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; a refused size leaves the default.
        let capacity = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            read,
            write,
            capacity: capacity as u32,
        })
    }
}

/// Which socket a stalled span waits for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Side {
    Source,
    Sink,
}

/// How a span ended. The side that failed decides which side the connection blames.
#[derive(Debug)]
pub enum SpanEnd {
    Moved,
    /// The source had nothing to read, or the sink no room, for the sockets' timeout
    /// (`socket::KERNEL_WAIT`): the task waits for that socket in tokio's reactor and
    /// continues with what is left, so a peer that stalls mid-frame holds no kernel
    /// worker.
    Stalled {
        to_fill: u64,
        in_pipe: u32,
        on: Side,
    },
    /// The source reached EOF inside the span.
    SourceEof,
    SourceError(io::Error),
    SinkError(io::Error),
}

/// Where a span's task waits for its end.
#[derive(Default)]
pub struct SpanDone {
    state: Mutex<(Option<SpanEnd>, Option<Waker>)>,
}

impl SpanDone {
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<SpanEnd> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.0.take() {
            Some(end) => Poll::Ready(end),
            None => {
                state.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn finish(&self, end: SpanEnd) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0 = Some(end);
            state.1.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// One span to move: `to_fill` bytes from `from` to `to` through `pipe`, which holds
/// `in_pipe` bytes already (what a stalled span left there; they go first). The
/// descriptors are shared with the connection, which may end first: the span keeps them
/// open until its last operation completed.
pub struct Span {
    pub from: Arc<OwnedFd>,
    pub to: Arc<OwnedFd>,
    pub pipe: Arc<BlockingPipe>,
    pub to_fill: u64,
    pub in_pipe: u32,
    pub done: Arc<SpanDone>,
}

/// A span under way on the ring thread.
struct Moving {
    span: Span,
    /// Bytes not yet received into the pipe.
    to_fill: u64,
    /// Received and not yet sent (signed: the order of a round's two completions is not
    /// assumed).
    in_pipe: i64,
    /// Operations of the current round not completed yet.
    pending: u8,
    /// A failure: the span ends when its round has completed.
    failed: Option<SpanEnd>,
    stalled: Option<Side>,
}

/// The ring's handle for tokio tasks.
pub struct Ring {
    queue: Mutex<VecDeque<Span>>,
    /// Set while an eventfd write is on its way and the thread has not yet taken the
    /// queue: spans queued meanwhile need no write of their own.
    woken: AtomicBool,
    wake: OwnedFd,
}

impl Ring {
    /// Creates the ring and starts its thread. Fails where io_uring is not allowed
    /// (`kernel.io_uring_disabled`, a seccomp filter) or too old for splice.
    pub fn start() -> anyhow::Result<Arc<Self>> {
        let mut builder = IoUring::builder();
        // The ring thread always waits inside io_uring_enter: completions that need its
        // task context run there, without interrupting it.
        builder.setup_coop_taskrun();
        let uring = builder
            .build(RING_ENTRIES)
            .context("creating an io_uring (kernel.io_uring_disabled, or a seccomp filter that forbids io_uring?)")?;
        anyhow::ensure!(
            uring.params().is_feature_nodrop(),
            "this kernel's io_uring may drop completions (no IORING_FEAT_NODROP; Linux 5.5 or later is needed)"
        );
        let mut probe = io_uring::Probe::new();
        uring
            .submitter()
            .register_probe(&mut probe)
            .context("probing the io_uring's operations")?;
        anyhow::ensure!(
            probe.is_supported(opcode::Splice::CODE),
            "this kernel's io_uring cannot splice (Linux 5.7 or later is needed)"
        );
        // SAFETY: eventfd returns a new descriptor or -1.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        anyhow::ensure!(wake >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: just created, owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let ring = Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            woken: AtomicBool::new(false),
            wake,
        });
        let thread_ring = Arc::clone(&ring);
        thread::Builder::new()
            .name("kpsc-uring".into())
            .spawn(move || {
                if let Err(e) = Driver::new(uring, thread_ring).and_then(Driver::run) {
                    // Spans queued from now on never end: their connections hang until
                    // they time out. This is a kernel failure, not a connection's.
                    error!(error = %format!("{e:#}"), "the io_uring thread stopped; --bulk-transfer uring connections stall");
                }
            })
            .context("starting the io_uring thread")?;
        Ok(ring)
    }

    /// Queues `span`; its `done` is finished when it has moved or failed.
    pub fn submit(&self, span: Span) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(span);
        if !self.woken.swap(true, Ordering::AcqRel) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write to an eventfd this handle owns. It cannot fail
            // short of the counter's overflow, which takes 2^64 - 1 wake-ups unread.
            unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

/// The ring thread's state.
struct Driver {
    uring: IoUring,
    ring: Arc<Ring>,
    /// Spans under way; user_data is `index << 2 | FILL/DRAIN/REST`.
    moving: Vec<Option<Moving>>,
    free: Vec<usize>,
    /// The eventfd read's target and the tick's timespec: the kernel reads them.
    word: Box<[u8; 8]>,
    tick: Box<types::Timespec>,
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

impl Driver {
    fn new(uring: IoUring, ring: Arc<Ring>) -> anyhow::Result<Self> {
        let mut driver = Self {
            uring,
            ring,
            moving: Vec::new(),
            free: Vec::new(),
            word: Box::new([0; 8]),
            tick: Box::new(types::Timespec::new().nsec(200_000_000)),
            iowq_cpus: None,
        };
        driver.follow_affinity();
        let ticks = opcode::Timeout::new(&*driver.tick)
            .flags(types::TimeoutFlags::MULTISHOT)
            .build()
            .user_data(TICK);
        let read_wake = driver.read_wake();
        // SAFETY: `word`, `tick` and the eventfd live as long as the driver, which owns
        // the ring.
        unsafe { driver.push(&[read_wake, ticks])? };
        Ok(driver)
    }

    fn read_wake(&mut self) -> squeue::Entry {
        opcode::Read::new(
            types::Fd(self.ring.wake.as_raw_fd()),
            self.word.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE)
    }

    /// io-wq workers do not follow the process's CPU affinity (they refuse
    /// sched_setaffinity): they are told to run where this thread may, which an operator
    /// or a benchmark pinning kpscd sets. Checked on every tick, since pinning may change.
    fn follow_affinity(&mut self) {
        let Ok((set, cpus)) = own_cpus() else {
            return;
        };
        if self.iowq_cpus.as_ref() != Some(&cpus) {
            if let Err(e) = self.uring.submitter().register_iowq_aff(&set) {
                warn!(error = %e, "cannot pin the io_uring workers to kpscd's CPUs");
            }
            self.iowq_cpus = Some(cpus);
        }
    }

    /// Queues `entries` together (a round must not be split), submitting what is queued
    /// first when the queue is full.
    ///
    /// # Safety
    /// Every buffer and descriptor an entry names stays valid until its completion.
    unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        loop {
            // SAFETY: the caller's promise.
            if unsafe { self.uring.submission().push_multiple(entries) }.is_ok() {
                return Ok(());
            }
            self.uring.submit()?;
        }
    }

    fn run(mut self) -> anyhow::Result<()> {
        let mut completed = Vec::new();
        loop {
            match self.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e).context("io_uring_enter"),
            }
            completed.extend(
                self.uring
                    .completion()
                    .map(|c: cqueue::Entry| (c.user_data(), c.result())),
            );
            for (data, result) in completed.drain(..) {
                match data {
                    WAKE => {
                        anyhow::ensure!(result == 8, "reading the wake-up eventfd: {result}");
                        self.take_queue()?;
                    }
                    TICK => self.follow_affinity(),
                    _ => self.completed(data, result)?,
                }
            }
        }
    }

    fn take_queue(&mut self) -> io::Result<()> {
        // Cleared before the queue is taken: a span queued after this point writes the
        // eventfd again (its read is re-armed below), one queued before is taken now.
        self.ring.woken.store(false, Ordering::Release);
        let spans: Vec<Span> = self
            .ring
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for span in spans {
            let index = self.free.pop().unwrap_or_else(|| {
                self.moving.push(None);
                self.moving.len() - 1
            });
            self.moving[index] = Some(Moving {
                to_fill: span.to_fill,
                in_pipe: i64::from(span.in_pipe),
                span,
                pending: 0,
                failed: None,
                stalled: None,
            });
            self.next(index)?;
        }
        let read_wake = self.read_wake();
        // SAFETY: as in `new`.
        unsafe { self.push(&[read_wake]) }
    }

    /// Starts the next operations of span `index`, or ends it.
    fn next(&mut self, index: usize) -> io::Result<()> {
        let finished = match &self.moving[index] {
            None => return Ok(()),
            Some(m) => {
                m.failed.is_some() || m.stalled.is_some() || (m.to_fill == 0 && m.in_pipe == 0)
            }
        };
        if finished {
            let m = self.moving[index].take().expect("checked above");
            let end = match (m.failed, m.stalled) {
                (Some(failed), _) => failed,
                (None, Some(on)) => SpanEnd::Stalled {
                    to_fill: m.to_fill,
                    in_pipe: m.in_pipe as u32,
                    on,
                },
                (None, None) => SpanEnd::Moved,
            };
            let span = m.span;
            self.free.push(index);
            let Span {
                from,
                to,
                pipe,
                done,
                ..
            } = span;
            // Let go of the descriptors before the task hears of the end: a connection
            // that has ended closes its sockets as soon as it drops its own references.
            drop((from, to, pipe));
            done.finish(end);
            return Ok(());
        }
        let m = self.moving[index].as_mut().expect("checked above");
        let pipe = &m.span.pipe;
        let user_data = |op| ((index as u64) << 2) | op;
        let entries: Vec<squeue::Entry> = if m.in_pipe > 0 {
            // A short send: the rest first, so the pipe is empty when a round starts.
            let more = m.to_fill > 0;
            vec![drain(pipe, &m.span.to, m.in_pipe as u32, more, false).user_data(user_data(REST))]
        } else {
            let ask = m.to_fill.min(u64::from(pipe.capacity)) as u32;
            // "More" only when bytes are sure to follow: the last segment goes out at once.
            let more = m.to_fill > u64::from(ask);
            let fill = opcode::Splice::new(
                types::Fd(m.span.from.as_raw_fd()),
                -1,
                types::Fd(pipe.write.as_raw_fd()),
                -1,
                ask,
            )
            .flags(libc::SPLICE_F_MOVE)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(user_data(FILL));
            vec![
                fill,
                drain(pipe, &m.span.to, pipe.capacity, more, true).user_data(user_data(DRAIN)),
            ]
        };
        m.pending = entries.len() as u8;
        // SAFETY: the span holds both sockets and the pipe until its operations complete.
        unsafe { self.push(&entries) }
    }

    fn completed(&mut self, data: u64, result: i32) -> io::Result<()> {
        let (index, op) = ((data >> 2) as usize, data & 3);
        let Some(m) = self.moving.get_mut(index).and_then(Option::as_mut) else {
            return Ok(());
        };
        m.pending -= 1;
        let failed = match (op, result) {
            (FILL, 0) => Some(SpanEnd::SourceEof),
            (FILL, n) if n > 0 => {
                m.to_fill -= n as u64;
                m.in_pipe += i64::from(n);
                None
            }
            (FILL, n) if n == -libc::EAGAIN => {
                m.stalled = Some(Side::Source);
                None
            }
            (FILL, n) => Some(SpanEnd::SourceError(io::Error::from_raw_os_error(-n))),
            (_, n) if n > 0 => {
                m.in_pipe -= i64::from(n);
                None
            }
            // A round's send found the pipe empty: its receive brought nothing.
            (DRAIN, n) if n == -libc::EAGAIN => None,
            // A lone send found no room for the sink's timeout.
            (_, n) if n == -libc::EAGAIN => {
                m.stalled = Some(Side::Sink);
                None
            }
            // The pipe's write end is open, so a send from it never ends at 0.
            (_, 0) => Some(SpanEnd::SinkError(io::ErrorKind::WriteZero.into())),
            (_, n) => Some(SpanEnd::SinkError(io::Error::from_raw_os_error(-n))),
        };
        if m.failed.is_none() {
            m.failed = failed;
        }
        if m.pending > 0 {
            return Ok(());
        }
        self.next(index)
    }
}

/// A pipe -> socket splice of at most `len` bytes. `nonblocking`: an empty pipe returns
/// EAGAIN instead of waiting (a round's send, after a receive that may have brought
/// nothing).
fn drain(
    pipe: &BlockingPipe,
    to: &OwnedFd,
    len: u32,
    more: bool,
    nonblocking: bool,
) -> squeue::Entry {
    let flags = libc::SPLICE_F_MOVE
        | if more { libc::SPLICE_F_MORE } else { 0 }
        | if nonblocking {
            libc::SPLICE_F_NONBLOCK
        } else {
            0
        };
    opcode::Splice::new(
        types::Fd(pipe.read.as_raw_fd()),
        -1,
        types::Fd(to.as_raw_fd()),
        -1,
        len,
    )
    .flags(flags)
    .build()
}

#[cfg(test)]
mod tests {
    use std::{future::poll_fn, time::Duration};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        time::timeout,
    };

    use super::*;
    use crate::proxy::bulk::uring::socket::{self, UringRead, UringWrite};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A relay's two kpscd-side sockets: `from` (its peer is the returned writer) and `to`
    /// (its peer is the returned reader).
    async fn relay() -> (
        TcpStream,
        (UringRead, UringWrite),
        (UringRead, UringWrite),
        TcpStream,
    ) {
        let (writer, from) = pair().await;
        let (to, reader) = pair().await;
        (
            writer,
            socket::split(from).unwrap(),
            socket::split(to).unwrap(),
            reader,
        )
    }

    /// A span whatever its stalls: continued after each in the reactor, as the mover does.
    async fn span_to_end(
        ring: &Ring,
        (from, to): (&UringRead, &UringWrite),
        pipe: &Arc<BlockingPipe>,
        len: u64,
    ) -> (SpanEnd, usize) {
        let (mut to_fill, mut in_pipe, mut stalls) = (len, 0, 0);
        loop {
            let done = Arc::new(SpanDone::default());
            ring.submit(Span {
                from: from.fd(),
                to: to.fd(),
                pipe: Arc::clone(pipe),
                to_fill,
                in_pipe,
                done: Arc::clone(&done),
            });
            let end = timeout(Duration::from_secs(20), poll_fn(|cx| done.poll(cx)))
                .await
                .expect("the span did not end");
            match end {
                SpanEnd::Stalled {
                    to_fill: f,
                    in_pipe: p,
                    on,
                } => {
                    (to_fill, in_pipe) = (f, p);
                    stalls += 1;
                    match on {
                        Side::Source => from.readable().await.unwrap(),
                        Side::Sink => to.writable().await.unwrap(),
                    }
                }
                end => return (end, stalls),
            }
        }
    }

    /// Bytes written in odd pieces and with pauses longer than the sockets' timeout
    /// arrive whole and in order, several spans one after the other on one pipe, and what
    /// follows the last span stays in the source socket.
    #[tokio::test]
    async fn spans_move_exactly_their_length_and_leave_the_rest() {
        let ring = Ring::start().unwrap();
        let (mut writer, (mut from, _), (_, to), mut reader) = relay().await;
        let payload: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = payload.clone();
        let feeder = tokio::spawn(async move {
            for (i, piece) in sent.chunks(65_521).enumerate() {
                writer.write_all(piece).await.unwrap();
                if i % 10 == 3 {
                    tokio::time::sleep(3 * socket::KERNEL_WAIT).await;
                }
                tokio::task::yield_now().await;
            }
            writer
        });
        let collect = tokio::spawn(async move {
            let mut got = vec![0; 3_000_000];
            reader.read_exact(&mut got).await.unwrap();
            got
        });
        let pipe = Arc::new(BlockingPipe::new().unwrap());
        let mut stalls = 0;
        for len in [1_000_000, 4096, 1_995_904] {
            let (end, n) = span_to_end(&ring, (&from, &to), &pipe, len).await;
            assert!(matches!(end, SpanEnd::Moved), "{end:?}");
            stalls += n;
        }
        assert!(stalls > 0, "the pauses must have stalled a span");
        assert_eq!(collect.await.unwrap(), payload[..3_000_000]);
        let _writer = feeder.await.unwrap();
        let mut rest = [0u8; 17];
        from.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, payload[3_000_000..]);
    }

    /// A reader that pauses leaves bytes in the pipe when the sink stalls: they go out
    /// first when the span continues.
    #[tokio::test]
    async fn a_stalled_sink_keeps_its_pipe_bytes_in_order() {
        let ring = Ring::start().unwrap();
        let (mut writer, (from, _), (_, to), mut reader) = relay().await;
        let payload: Vec<u8> = (0..16_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        let feeder = tokio::spawn(async move { writer.write_all(&sent).await.map(|()| writer) });
        let collect = tokio::spawn(async move {
            let mut got = vec![0; 16_000_000];
            for chunk in got.chunks_mut(4_000_000) {
                tokio::time::sleep(5 * socket::KERNEL_WAIT).await;
                reader.read_exact(chunk).await.unwrap();
            }
            got
        });
        let pipe = Arc::new(BlockingPipe::new().unwrap());
        let (end, stalls) = span_to_end(&ring, (&from, &to), &pipe, 16_000_000).await;
        assert!(matches!(end, SpanEnd::Moved), "{end:?}");
        assert!(stalls > 0, "the reader's pauses must have stalled the sink");
        assert!(collect.await.unwrap() == payload, "bytes differ");
        feeder.await.unwrap().unwrap();
    }

    /// Fifty connections' spans on the ring at once each arrive whole.
    #[tokio::test]
    async fn concurrent_spans_each_arrive_whole() {
        let ring = Ring::start().unwrap();
        let mut tasks = Vec::new();
        for c in 0..50u32 {
            let ring = Arc::clone(&ring);
            tasks.push(tokio::spawn(async move {
                let (mut writer, (from, _), (_, to), mut reader) = relay().await;
                let payload: Vec<u8> = (0..300_000u32).map(|i| (i + c) as u8).collect();
                let sent = payload.clone();
                let feeder =
                    tokio::spawn(async move { writer.write_all(&sent).await.map(|()| writer) });
                let pipe = Arc::new(BlockingPipe::new().unwrap());
                let (end, got) =
                    tokio::join!(span_to_end(&ring, (&from, &to), &pipe, 300_000), async {
                        let mut got = vec![0; 300_000];
                        reader.read_exact(&mut got).await.map(|_| got)
                    });
                assert!(matches!(end.0, SpanEnd::Moved), "connection {c}: {end:?}");
                assert!(got.unwrap() == payload, "connection {c}: bytes differ");
                feeder.await.unwrap().unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn eof_inside_the_span_ends_it_at_the_source() {
        let ring = Ring::start().unwrap();
        let (mut writer, (from, _), (_, to), _reader) = relay().await;
        writer.write_all(&[1; 10_000]).await.unwrap();
        drop(writer);
        let pipe = Arc::new(BlockingPipe::new().unwrap());
        let (end, _) = span_to_end(&ring, (&from, &to), &pipe, 50_000).await;
        assert!(matches!(end, SpanEnd::SourceEof), "{end:?}");
    }

    #[tokio::test]
    async fn a_closed_destination_ends_it_at_the_sink() {
        let ring = Ring::start().unwrap();
        let (mut writer, (from, _), (_, to), reader) = relay().await;
        drop(reader);
        let feeder = tokio::spawn(async move {
            let _ = writer.write_all(&vec![9u8; 8 << 20]).await;
            writer
        });
        let pipe = Arc::new(BlockingPipe::new().unwrap());
        let (end, _) = span_to_end(&ring, (&from, &to), &pipe, 8 << 20).await;
        assert!(matches!(end, SpanEnd::SinkError(_)), "{end:?}");
        drop(from);
        let _ = feeder.await;
    }

    /// A peer that stops mid-span holds no kernel worker: the span comes back stalled
    /// on the source after the sockets' timeout, with what it moved accounted for, and
    /// the ring lets go of the descriptors.
    #[tokio::test]
    async fn a_silent_source_stalls_the_span_and_frees_the_worker() {
        let ring = Ring::start().unwrap();
        let (mut writer, (from, _), (_, to), mut reader) = relay().await;
        writer.write_all(&[1; 10_000]).await.unwrap();
        let done = Arc::new(SpanDone::default());
        ring.submit(Span {
            from: from.fd(),
            to: to.fd(),
            pipe: Arc::new(BlockingPipe::new().unwrap()),
            to_fill: 100_000,
            in_pipe: 0,
            done: Arc::clone(&done),
        });
        let end = timeout(Duration::from_secs(5), poll_fn(|cx| done.poll(cx)))
            .await
            .expect("the span waited past the sockets' timeout");
        assert!(
            matches!(
                end,
                SpanEnd::Stalled {
                    to_fill: 90_000,
                    in_pipe: 0,
                    on: Side::Source
                }
            ),
            "{end:?}"
        );
        let mut got = vec![0; 10_000];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [1; 10_000]);
        // The ring has dropped its reference: the socket's own and this new one are left.
        assert_eq!(Arc::strong_count(&from.fd()), 2);
    }
}
