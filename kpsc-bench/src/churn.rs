//! Connection churn: connections opened, one ApiVersions request (what every Kafka client
//! sends first on a new connection) answered, closed by the client; several such loops run
//! at once. Measures new connections per second, connect + request latency, and how many
//! attempts failed. The flood workload runs the same loops while a SYN flood from spoofed
//! sources hits the same address (`flood_during`).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use hdrhistogram::Histogram;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest};
use kpsc_testkit::{request_body, syn_flood};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::wire::{FrameReader, write_frame};

#[derive(Clone, Debug)]
pub struct ChurnLoad {
    /// Loops opening connections at once.
    pub concurrency: usize,
    pub duration: Duration,
    /// An attempt (connect + request) that takes longer fails; long enough for one SYN
    /// retransmission (the kernel's first is after 1 s).
    pub attempt_timeout: Duration,
}

/// What one churn run measured.
#[derive(Debug)]
pub struct ChurnResult {
    /// Attempts started before the deadline.
    pub attempts: u64,
    /// Attempts whose request was answered correctly within the timeout.
    pub completed: u64,
    /// Of those, the ones answered before the run's deadline: what the rate counts, so an
    /// attempt that waits out a SYN retransmission at the end does not stretch the run.
    pub completed_in_time: u64,
    /// The first failure of the run and how many there were by kind.
    pub first_failure: Option<String>,
    pub timeouts: u64,
    /// Answered attempts that took a second or more: their first SYN was lost (dropped)
    /// and the kernel sent it again after 1 s.
    pub retried: u64,
    /// The run's window (attempts end after it, but are not counted in the rate).
    pub elapsed: Duration,
    /// Connect + request of completed attempts, microseconds.
    pub latency: Histogram<u64>,
}

impl ChurnResult {
    fn empty() -> anyhow::Result<Self> {
        Ok(Self {
            attempts: 0,
            completed: 0,
            completed_in_time: 0,
            first_failure: None,
            timeouts: 0,
            retried: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::new(3)?,
        })
    }
}

impl ChurnResult {
    pub fn connections_per_s(&self) -> f64 {
        self.completed_in_time as f64 / self.elapsed.as_secs_f64()
    }

    pub fn retried_pct(&self) -> f64 {
        if self.attempts == 0 {
            return 0.0;
        }
        100.0 * self.retried as f64 / self.attempts as f64
    }

    pub fn success_pct(&self) -> f64 {
        if self.attempts == 0 {
            return 0.0;
        }
        100.0 * self.completed as f64 / self.attempts as f64
    }
}

/// Linux resends an unanswered SYN after 1 s: an attempt this slow lost its first SYN.
const SYN_RETRANSMISSION: Duration = Duration::from_millis(1000);

/// One attempt: connect, ApiVersions v0, its answer (right correlation id, error 0), close.
async fn attempt(target: SocketAddr, body: &[u8], correlation_id: i32) -> anyhow::Result<()> {
    let stream = TcpStream::connect(target).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    write_frame(&mut w, body).await.context("sending")?;
    let mut reader = FrameReader::new(r, 4096);
    let mut frame = Vec::new();
    ensure!(
        reader.read_frame(1 << 20, &mut frame).await?,
        "closed before answering"
    );
    ensure!(frame.len() >= 6, "short ApiVersions response");
    let got = i32::from_be_bytes(frame[..4].try_into()?);
    ensure!(
        got == correlation_id,
        "answer {got} to request {correlation_id}"
    );
    let error = i16::from_be_bytes(frame[4..6].try_into()?);
    ensure!(error == 0, "ApiVersions error {error}");
    // The client closes first (FIN), as a Kafka client does: TIME_WAIT stays on its side.
    w.shutdown().await.ok();
    Ok(())
}

/// Runs `load` against `target`.
pub async fn run_churn(target: &str, load: &ChurnLoad) -> anyhow::Result<ChurnResult> {
    let target: SocketAddr = target
        .parse()
        .with_context(|| format!("address {target}"))?;
    let started = Instant::now();
    let loops: Vec<_> = (0..load.concurrency.max(1))
        .map(|worker| {
            let load = load.clone();
            tokio::spawn(async move {
                let mut body = request_body(
                    ApiKey::ApiVersions,
                    0,
                    0,
                    "kpsc-bench-churn",
                    &ApiVersionsRequest::default(),
                )?;
                let mut result = ChurnResult::empty()?;
                let mut correlation_id = (worker as i32) << 24;
                while started.elapsed() < load.duration {
                    correlation_id = correlation_id.wrapping_add(1);
                    body[4..8].copy_from_slice(&correlation_id.to_be_bytes());
                    result.attempts += 1;
                    let begun = Instant::now();
                    match tokio::time::timeout(
                        load.attempt_timeout,
                        attempt(target, &body, correlation_id),
                    )
                    .await
                    {
                        Ok(Ok(())) => {
                            result.completed += 1;
                            if started.elapsed() <= load.duration {
                                result.completed_in_time += 1;
                            }
                            if begun.elapsed() >= SYN_RETRANSMISSION {
                                result.retried += 1;
                            }
                            result.latency.record(begun.elapsed().as_micros() as u64)?;
                        }
                        Ok(Err(e)) => {
                            result.first_failure.get_or_insert(format!("{e:#}"));
                            // A refused or reset attempt returns at once: do not spin.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(_) => {
                            result.timeouts += 1;
                            result.first_failure.get_or_insert(format!(
                                "no answer within {:?}",
                                load.attempt_timeout
                            ));
                        }
                    }
                }
                anyhow::Ok(result)
            })
        })
        .collect();
    let mut total = ChurnResult::empty()?;
    for l in loops {
        let r = l.await??;
        total.attempts += r.attempts;
        total.completed += r.completed;
        total.completed_in_time += r.completed_in_time;
        total.timeouts += r.timeouts;
        total.retried += r.retried;
        if total.first_failure.is_none() {
            total.first_failure = r.first_failure;
        }
        total.latency.add(&r.latency)?;
    }
    total.elapsed = load.duration;
    Ok(total)
}

/// The flood side of the flood workload.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    /// SYNs per second.
    pub rate: u32,
}

/// Runs the churn `load` against `target` while `flood.rate` spoofed SYNs per second hit
/// the same address for the churn's duration, from the sources of
/// [`syn_flood::few_and_many_sources`] (198.18.0.0/15 only). Call it on a runtime whose
/// thread is in the client's namespace: the flooder thread inherits it. Returns the churn
/// result and the SYNs sent.
pub async fn flood_during(
    target: &str,
    load: &ChurnLoad,
    flood: Flood,
) -> anyhow::Result<(ChurnResult, u32)> {
    let addr: SocketAddrV4 = target
        .parse()
        .with_context(|| format!("flood target {target} (IPv4 only)"))?;
    let (ip, port): (Ipv4Addr, u16) = (*addr.ip(), addr.port());
    let count = (f64::from(flood.rate) * load.duration.as_secs_f64()) as u32;
    let over = load.duration;
    // A blocking-pool thread, started from this runtime's thread: same namespace.
    let flooder = tokio::task::spawn_blocking(move || {
        syn_flood::flood(ip, port, count, over, syn_flood::few_and_many_sources)
    });
    let churn = run_churn(target, load).await;
    let sent = flooder.await?.context("the SYN flooder")?;
    Ok((churn?, sent))
}
