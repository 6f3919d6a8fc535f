//! A SYN flood at a portmap node while a long-lived connection produces through it and new
//! clients keep connecting: the run the IPv4 and IPv6 flood tests share.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use kpsc_testkit::{RawClient, netns};

use crate::portmap::produce_one;

/// A new connection that must be up within 5 s (a SYN lost to a full table would
/// otherwise wait for the kernel's two-minute connect timeout).
pub fn connect_within(addr: &str) -> anyhow::Result<RawClient> {
    let addr: SocketAddr = addr.parse()?;
    RawClient::from_stream(std::net::TcpStream::connect_timeout(
        &addr,
        Duration::from_secs(5),
    )?)
}

/// What happened during a flood.
#[derive(Debug)]
pub struct FloodRun {
    /// SYNs the flooder sent, and how long it took.
    pub sent: u32,
    pub took: Duration,
    /// Records the long-lived connection produced during the flood.
    pub produced: u32,
    /// Each new connection's time to connect and answer ApiVersions, or its error.
    pub connects: Vec<(Duration, Result<(), String>)>,
}

impl FloodRun {
    pub fn slowest_connect(&self) -> Option<Duration> {
        self.connects.iter().map(|(t, _)| *t).max()
    }
}

/// Runs `flood` (returns the SYNs it sent) on a thread in namespace `client_ns` while
/// `stream` produces to `topic` every 5 ms and a new client connects to `bootstrap` every
/// 200 ms from the same namespace. Panics when the stream errs, nothing was produced, no
/// connection was tried, or any failed: the flood must disturb neither.
pub fn flood_while_streaming(
    client_ns: &str,
    stream: &mut RawClient,
    bootstrap: &str,
    topic: &str,
    flood: impl FnOnce() -> anyhow::Result<u32> + Send,
) -> FloodRun {
    let flooding = AtomicBool::new(true);
    let produced = AtomicU32::new(0);
    let (flooded, connects, streamed) = std::thread::scope(|s| {
        let streamer = s.spawn(|| -> anyhow::Result<()> {
            let mut n = 0u64;
            while flooding.load(Ordering::Relaxed) {
                n += 1;
                produce_one(stream, topic, format!("during {n}").as_bytes())?;
                produced.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        });
        let connector = s.spawn(|| {
            netns::enter(client_ns).unwrap();
            let mut results = Vec::new();
            while flooding.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = connect_within(bootstrap).and_then(|mut c| c.api_versions());
                results.push((
                    started.elapsed(),
                    r.map(|_| ()).map_err(|e| format!("{e:#}")),
                ));
                std::thread::sleep(Duration::from_millis(200));
            }
            results
        });
        let flooder = s.spawn(|| {
            netns::enter(client_ns)?;
            let started = Instant::now();
            flood().map(|sent| (sent, started.elapsed()))
        });
        let flooded = flooder.join().unwrap();
        flooding.store(false, Ordering::Relaxed);
        (flooded, connector.join().unwrap(), streamer.join().unwrap())
    });
    let (sent, took) = flooded.unwrap_or_else(|e| panic!("the flooder: {e:#}"));
    let run = FloodRun {
        sent,
        took,
        produced: produced.load(Ordering::Relaxed),
        connects,
    };
    eprintln!(
        "flood: {sent} SYNs in {took:?}; produced during it: {}; new connections during it: \
         {} (slowest {:?})",
        run.produced,
        run.connects.len(),
        run.slowest_connect()
    );
    streamed.unwrap_or_else(|e| panic!("the open connection failed: {e:#}"));
    assert!(run.produced > 0, "nothing produced during the flood");
    let failed: Vec<_> = run.connects.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        !run.connects.is_empty() && failed.is_empty(),
        "new connections during the flood failed: {failed:?}"
    );
    run
}

/// After the flood: `stream` produces again and 20 new clients connect at once.
pub fn clients_connect_after_flood(
    client_ns: &str,
    stream: &mut RawClient,
    bootstrap: &str,
    topic: &str,
) {
    produce_one(stream, topic, b"after the flood").unwrap();
    for i in 0..20 {
        netns::in_netns(client_ns, || connect_within(bootstrap)?.api_versions())
            .unwrap()
            .unwrap_or_else(|e| panic!("new connection {i} after the flood: {e:#}"));
    }
}
