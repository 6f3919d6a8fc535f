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
//! stops in the middle of a frame. `move_span` is the task's side: it submits what is
//! left of a stalled span again once the socket it stalled on is ready.

use std::{
    collections::VecDeque,
    future::poll_fn,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
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

pub use crate::proxy::bulk::splice::Pipe;
use crate::{
    kafka::frame::{FrameError, MoveError},
    proxy::bulk::uring::socket::{UringRead, UringWrite},
};

/// Submission queue size; the completion queue is twice this, and the kernel keeps
/// completions that overflow it (IORING_FEAT_NODROP).
const RING_ENTRIES: u32 = 1024;
/// user_data of the eventfd read that says spans are queued, and of the affinity tick.
const WAKE: u64 = u64::MAX;
const TICK: u64 = u64::MAX - 1;
/// Unbound io-wq workers at most (each a kernel thread of kpscd's).
const MAX_WORKERS: u32 = 256;
/// The operations of a span, in user_data's low two bits: a round's receive and send, and
/// a lone send (the rest of a short one).
const FILL: u64 = 0;
const DRAIN: u64 = 1;
const REST: u64 = 2;

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
    /// The kernel or the ring failed, not a peer: an operation cancelled (io-wq could not
    /// start a worker), out of memory, or the ring thread gone.
    RingFailed(io::Error),
}

/// Errors of an operation that are the kernel's, not the socket's peer's.
fn ring_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECANCELED | libc::EINTR | libc::ENOMEM | libc::ENOBUFS | libc::EBADF | libc::EINVAL
    )
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

    /// Called once per span (by `Moving`'s drop, or for a span the ring never took).
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
    pub pipe: Arc<Pipe>,
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
    /// The round's send returned EAGAIN: with bytes in the pipe, the sink had no room.
    drain_blocked: bool,
    /// A receive brought less than `SLOW_FILL`: the span goes back to its task rather
    /// than wait in a worker for a peer that trickles (see `SLOW_FILL`).
    slow_source: bool,
}

/// A receive that brings less than this, when more was asked, ends the span as stalled
/// once the pipe is empty, as if the source had timed out. A peer trickling a frame a
/// few bytes at a time would otherwise keep a kernel worker waiting between every
/// piece (the sockets' timeout only bounds one wait); now it costs a wake-up of its task
/// per piece, as under splice. Bulk transfers bring tens of KB per receive.
const SLOW_FILL: i32 = 8 << 10;

impl Drop for Moving {
    /// Every span ends exactly once, here: when its operations are done, or when the
    /// ring thread fails with operations in flight (the kernel cancels them when the
    /// ring closes; its file references keep the sockets valid meanwhile).
    fn drop(&mut self) {
        let end = match (self.failed.take(), self.stalled) {
            (Some(failed), _) => failed,
            (None, Some(on)) => SpanEnd::Stalled {
                to_fill: self.to_fill,
                in_pipe: self.in_pipe.max(0) as u32,
                on,
            },
            (None, None) if self.pending == 0 && self.to_fill == 0 && self.in_pipe == 0 => {
                SpanEnd::Moved
            }
            (None, None) => SpanEnd::RingFailed(io::Error::other("the io_uring thread stopped")),
        };
        self.span.done.finish(end);
    }
}

/// The ring's handle for tokio tasks.
pub struct Ring {
    queue: Mutex<VecDeque<Span>>,
    /// Set while an eventfd write is on its way and the thread has not yet taken the
    /// queue: spans queued meanwhile need no write of their own.
    woken: AtomicBool,
    wake: OwnedFd,
    /// Set under the queue's lock when the ring thread has stopped: spans submitted after
    /// fail at once, and new connections copy instead.
    dead: AtomicBool,
    /// The ring thread's id: its io-wq workers are named `iou-wrk-<id>`.
    thread_id: std::sync::atomic::AtomicI32,
    #[cfg(test)]
    poison: AtomicBool,
}

impl Ring {
    /// Creates the ring and starts its thread. Fails where io_uring is not allowed
    /// (`kernel.io_uring_disabled`, a seccomp filter) or too old for splice.
    pub fn start() -> anyhow::Result<Arc<Self>> {
        let mut builder = IoUring::builder();
        // The ring thread always waits inside io_uring_enter: completions that need its
        // task context run there, without interrupting it.
        builder.setup_coop_taskrun();
        let uring = builder.build(RING_ENTRIES).context(
            "creating an io_uring (needs Linux 5.19 or later, not disabled by \
             kernel.io_uring_disabled or a seccomp filter)",
        )?;
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
            dead: AtomicBool::new(false),
            thread_id: std::sync::atomic::AtomicI32::new(0),
            #[cfg(test)]
            poison: AtomicBool::new(false),
        });
        let thread_ring = Arc::clone(&ring);
        thread::Builder::new()
            .name("kpsc-uring".into())
            .spawn(move || {
                // Marks the ring dead however the thread ends, a panic included; the
                // driver's spans are failed as it drops.
                let _dead = DeadOnExit(Arc::clone(&thread_ring));
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                thread_ring.thread_id.store(tid, Ordering::Release);
                if let Err(e) = Driver::new(uring, thread_ring).and_then(Driver::run) {
                    error!(error = %format!("{e:#}"), "the io_uring thread stopped: spans under way fail, new connections copy");
                }
            })
            .context("starting the io_uring thread")?;
        Ok(ring)
    }

    /// The name the kernel gives this ring's io-wq worker threads.
    pub fn worker_name(&self) -> String {
        format!("iou-wrk-{}", self.thread_id.load(Ordering::Acquire))
    }

    /// Whether the ring thread still runs.
    pub fn alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
    }

    /// Queues `span`; its `done` is finished when it has moved or failed.
    pub fn submit(&self, span: Span) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if self.dead.load(Ordering::Acquire) {
                span.done.finish(SpanEnd::RingFailed(io::Error::other(
                    "the io_uring thread stopped",
                )));
                return;
            }
            queue.push_back(span);
        }
        if !self.woken.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// Tells the ring thread to take the queue.
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to an eventfd this handle owns. It cannot fail short of
        // the counter's overflow, which takes 2^64 - 1 wake-ups unread.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// How often a span stalled before it ended, by side (what the tests look at).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stalls {
    pub source: u32,
    pub sink: u32,
    /// Stalls that left bytes in the pipe, which go out first when the span continues.
    pub holding_bytes: u32,
}

/// Moves `len` bytes from `from` to `to` through `pipe` (empty) on `ring`, continuing
/// after every stall once the socket it waited for is ready. The side that failed is the
/// side the error blames; the ring's own failures are the mover's.
pub async fn move_span(
    ring: &Ring,
    from: &UringRead,
    to: &UringWrite,
    pipe: &Arc<Pipe>,
    len: u64,
) -> Result<Stalls, MoveError> {
    let (mut to_fill, mut in_pipe, mut stalls) = (len, 0, Stalls::default());
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
        match poll_fn(|cx| done.poll(cx)).await {
            SpanEnd::Moved => return Ok(stalls),
            SpanEnd::Stalled {
                to_fill: f,
                in_pipe: p,
                on,
            } => {
                (to_fill, in_pipe) = (f, p);
                stalls.holding_bytes += u32::from(p > 0);
                match on {
                    Side::Source => {
                        stalls.source += 1;
                        from.readable()
                            .await
                            .map_err(|e| MoveError::Source(FrameError::Io(e)))?;
                    }
                    Side::Sink => {
                        stalls.sink += 1;
                        to.writable().await.map_err(MoveError::Sink)?;
                    }
                }
            }
            SpanEnd::SourceEof => return Err(MoveError::Source(FrameError::Truncated)),
            SpanEnd::SourceError(e) => return Err(MoveError::Source(FrameError::Io(e))),
            SpanEnd::SinkError(e) => return Err(MoveError::Sink(e)),
            SpanEnd::RingFailed(e) => return Err(MoveError::Mover(e)),
        }
    }
}

struct DeadOnExit(Arc<Ring>);

impl Drop for DeadOnExit {
    fn drop(&mut self) {
        let queued: Vec<Span> = {
            let mut queue = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.0.dead.store(true, Ordering::Release);
            queue.drain(..).collect()
        };
        for span in queued {
            span.done.finish(SpanEnd::RingFailed(io::Error::other(
                "the io_uring thread stopped",
            )));
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
    /// The eventfd read's target and the tick's timespec, which the kernel uses. Leaked:
    /// should the thread fail, the kernel may still complete the read after the ring is
    /// dropped (one ring per process, 24 bytes).
    word: &'static mut [u8; 8],
    tick: &'static types::Timespec,
    /// The tick repeats by itself (Linux 6.4+); else it is armed again each time.
    multishot_tick: bool,
    iowq_cpus: Option<Vec<usize>>,
}

/// The CPUs the calling thread may run on.
pub fn own_cpus() -> io::Result<(libc::cpu_set_t, Vec<usize>)> {
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
        // Each splice waits in an unbound io-wq worker, one per span under way (a span
        // holds one only while bytes move, see `SLOW_FILL` and `socket::KERNEL_WAIT`).
        // Capped, so many busy connections cannot exhaust the process's threads
        // (RLIMIT_NPROC, a container's pids limit); spans beyond it wait their turn.
        uring
            .submitter()
            .register_iowq_max_workers(&mut [0, MAX_WORKERS])
            .context("capping the io_uring's workers")?;
        let mut driver = Self {
            uring,
            ring,
            moving: Vec::new(),
            free: Vec::new(),
            word: Box::leak(Box::new([0; 8])),
            tick: Box::leak(Box::new(types::Timespec::new().nsec(200_000_000))),
            multishot_tick: true,
            iowq_cpus: None,
        };
        let read_wake = driver.read_wake();
        let tick = driver.tick();
        // SAFETY: `word`, `tick` and the eventfd live as long as the process.
        unsafe { driver.push(&[read_wake, tick])? };
        Ok(driver)
    }

    fn tick(&self) -> squeue::Entry {
        let tick = opcode::Timeout::new(self.tick);
        if self.multishot_tick {
            tick.flags(types::TimeoutFlags::MULTISHOT)
        } else {
            tick
        }
        .build()
        .user_data(TICK)
    }

    fn ticked(&mut self, result: i32, flags: u32) -> io::Result<()> {
        if result == -libc::EINVAL && self.multishot_tick {
            // Before Linux 6.4: a tick per arming.
            self.multishot_tick = false;
        } else {
            self.follow_affinity();
        }
        if !cqueue::more(flags) {
            let tick = self.tick();
            // SAFETY: as in `new`.
            unsafe { self.push(&[tick])? };
        }
        Ok(())
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
    /// or a benchmark pinning kpscd sets. Checked on every tick, since pinning may change;
    /// the kernel takes it only once this thread has submitted (the workers' pool is made
    /// then), so the first tick does it.
    fn follow_affinity(&mut self) {
        let Ok((set, cpus)) = own_cpus() else {
            return;
        };
        if self.iowq_cpus.as_ref() != Some(&cpus) {
            match self.uring.submitter().register_iowq_aff(&set) {
                Ok(()) => self.iowq_cpus = Some(cpus),
                Err(e) => {
                    warn!(error = %e, "cannot pin the io_uring workers to kpscd's CPUs");
                    // Not again every tick.
                    self.iowq_cpus = Some(cpus);
                }
            }
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
                    .map(|c: cqueue::Entry| (c.user_data(), c.result(), c.flags())),
            );
            for (data, result, flags) in completed.drain(..) {
                match data {
                    WAKE => {
                        anyhow::ensure!(result == 8, "reading the wake-up eventfd: {result}");
                        self.take_queue()?;
                    }
                    TICK => self.ticked(result, flags)?,
                    _ => self.completed(data, result)?,
                }
            }
        }
    }

    fn take_queue(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if self.ring.poison.load(Ordering::Acquire) {
            return Err(io::Error::other("poisoned by a test"));
        }
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
                drain_blocked: false,
                slow_source: false,
            });
            self.next(index)?;
        }
        let read_wake = self.read_wake();
        // SAFETY: as in `new`.
        unsafe { self.push(&[read_wake]) }
    }

    /// Starts the next operations of span `index`, or ends it.
    fn next(&mut self, index: usize) -> io::Result<()> {
        let finished = match &mut self.moving[index] {
            None => return Ok(()),
            Some(m) => {
                if m.in_pipe == 0 && m.slow_source && m.to_fill > 0 && m.stalled.is_none() {
                    m.stalled = Some(Side::Source);
                }
                m.failed.is_some() || m.stalled.is_some() || (m.to_fill == 0 && m.in_pipe == 0)
            }
        };
        if finished {
            // Its drop tells the task how it ended.
            self.moving[index] = None;
            self.free.push(index);
            return Ok(());
        }
        let m = self.moving[index].as_mut().expect("checked above");
        let pipe = &m.span.pipe;
        let user_data = |op| ((index as u64) << 2) | op;
        // A round is two entries, a lone send one: no allocation per round.
        let rest;
        let round;
        let entries: &[squeue::Entry] = if m.in_pipe > 0 {
            // A short send: the rest first, so the pipe is empty when a round starts.
            let more = m.to_fill > 0;
            rest = [
                drain(pipe, &m.span.to, m.in_pipe as u32, more, false).user_data(user_data(REST))
            ];
            &rest
        } else {
            let ask = m.to_fill.min(pipe.capacity as u64) as u32;
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
            round = [
                fill,
                drain(pipe, &m.span.to, pipe.capacity as u32, more, true)
                    .user_data(user_data(DRAIN)),
            ];
            &round
        };
        m.pending = entries.len() as u8;
        m.drain_blocked = false;
        m.slow_source = false;
        // SAFETY: the span holds both sockets and the pipe until its operations complete.
        unsafe { self.push(entries) }
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
                m.slow_source = n < SLOW_FILL && (n as u64) < m.to_fill;
                m.to_fill -= n as u64;
                m.in_pipe += i64::from(n);
                None
            }
            (FILL, n) if n == -libc::EAGAIN => {
                m.stalled = Some(Side::Source);
                None
            }
            (_, n) if n < 0 && ring_error(-n) => {
                Some(SpanEnd::RingFailed(io::Error::from_raw_os_error(-n)))
            }
            (FILL, n) => Some(SpanEnd::SourceError(io::Error::from_raw_os_error(-n))),
            (_, n) if n > 0 => {
                m.in_pipe -= i64::from(n);
                None
            }
            // A round's send: the pipe was empty (its receive brought nothing), or the
            // sink had no room for its timeout; which, is known when both completed.
            (DRAIN, n) if n == -libc::EAGAIN => {
                m.drain_blocked = true;
                None
            }
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
        if m.pending == 0 && m.drain_blocked && m.in_pipe > 0 && m.stalled.is_none() {
            m.stalled = Some(Side::Sink);
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
fn drain(pipe: &Pipe, to: &OwnedFd, len: u32, more: bool, nonblocking: bool) -> squeue::Entry {
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
mod tests;
