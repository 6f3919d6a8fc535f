//! Kafka-unaware relay probes, the processes of kpsc-bench's `splice-ceiling`,
//! `uring-ceiling`, `uring-sqpoll-ceiling` and `uring-recv-send-ceiling` targets: TCP forwarders that move whatever
//! arrives, socket -> pipe -> socket, with no framing. They measure what a bulk path
//! itself costs and delivers on this machine, so that kpscd's splice mode can be compared
//! with the same path without its Kafka work, and with io_uring (issue 9's "next-best
//! route" after sockmap). Not a proxy to run: it knows nothing of Kafka.
//!
//! - `splice`: nonblocking splice(2) driven by tokio's epoll reactor (`splice.rs`);
//! - `uring`: linked IORING_OP_SPLICE rounds on registered files (`uring.rs`);
//! - `uring-sqpoll`: the same with a kernel thread polling the submission queue;
//! - `uring-recv-send`: multishot IORING_OP_RECV into a provided buffer ring and
//!   IORING_OP_SEND, a copy each way but no io-wq worker (`uring_recv.rs`).
//!
//! Each writes `relayed_bytes=N chunks=M` (reads that brought bytes) and its threads' CPU time to a counters file, which the
//! report shows: io_uring runs its splices in io-wq worker threads (`iou-wrk-*`) and
//! polls with an SQ thread (`iou-sqp-*`), threads of this process, so the process's CPU
//! time includes them; the line shows how much of it they took.

mod counters;
mod pipe;
mod ring;
mod splice;
mod threads;
mod uring;
mod uring_recv;

use std::{
    net::{SocketAddr, TcpListener, ToSocketAddrs},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use counters::Counters;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Splice,
    Uring,
    UringSqpoll,
    UringRecvSend,
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "splice" => Self::Splice,
            "uring" => Self::Uring,
            "uring-sqpoll" => Self::UringSqpoll,
            "uring-recv-send" => Self::UringRecvSend,
            _ => anyhow::bail!(
                "unknown relay mode {s:?} (splice, uring, uring-sqpoll or uring-recv-send)"
            ),
        })
    }
}

/// Lets the io_uring file table hold every connection's slots (it is bounded by the soft
/// RLIMIT_NOFILE, often 1024).
fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Runs the relay `listen` -> `sink` until killed. Prints `listening on ADDR` once bound
/// (`listen` may name port 0), and writes its counters to `counters_file` every `report`.
pub fn run(
    mode: Mode,
    listen: &str,
    sink: &str,
    counters_file: PathBuf,
    report: Duration,
) -> anyhow::Result<()> {
    raise_fd_limit();
    let sink: SocketAddr = sink
        .to_socket_addrs()
        .with_context(|| format!("resolving the sink address {sink}"))?
        .next()
        .with_context(|| format!("{sink} resolves to no address"))?;
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    let counters = Arc::new(Counters::default());
    let reported = Arc::clone(&counters);
    std::thread::spawn(move || {
        let mut peak = 0;
        loop {
            std::thread::sleep(report);
            let t = threads::sample();
            peak = peak.max(t.io_wq_threads);
            let line = format!(
                "{} process_cpu_s={:.2} io_wq_threads={} io_wq_threads_peak={peak} io_wq_cpu_s={:.2} sq_thread_cpu_s={:.2}\n",
                reported.line(),
                t.process_seconds,
                t.io_wq_threads,
                t.io_wq_seconds,
                t.sq_seconds,
            );
            if let Err(e) = std::fs::write(&counters_file, line) {
                eprintln!("writing {}: {e}", counters_file.display());
            }
        }
    });
    match mode {
        Mode::Splice => splice::run(listener, sink, counters),
        Mode::Uring => uring::run(listener, sink, false, counters),
        Mode::UringSqpoll => uring::run(listener, sink, true, counters),
        Mode::UringRecvSend => uring_recv::run(listener, sink, counters),
    }
}
