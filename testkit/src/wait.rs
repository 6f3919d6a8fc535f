//! Waiting for things to happen, and free ports for things to listen on.

use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;

/// Retries `f` until it returns Ok or `timeout` passes.
pub fn eventually<T>(
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits (10 s at most) for the peer to close `stream`, by FIN or reset; panics if it
/// sends data instead or keeps the connection open.
pub fn expect_closed(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}

/// Waits until `addr` (host:port) accepts TCP connections from this thread's namespace.
pub fn wait_listening(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} not listening after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Port ranges for tests: each call returns a base with `count` free ports above it.
///
/// Ports come from below the kernel's ephemeral range when it leaves room there: a
/// port probed free inside that range can be taken by any outgoing connection (a
/// client, a broker's replica fetcher) before the process under test binds it, which
/// CI saw as kpscd's "Address already in use". Blocks start at an offset taken from the
/// process id, so test binaries run side by side rarely probe the same ports.
pub fn free_port_base(count: u16) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let (low, high) = test_port_range();
    let blocks = ((high - low) / 100).max(1);
    let _ = NEXT.compare_exchange(
        0,
        low + (std::process::id() % u32::from(blocks)) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let base = NEXT.fetch_add(count + 1, Ordering::SeqCst);
        if base < low || base.saturating_add(count) >= high {
            NEXT.store(low, Ordering::SeqCst);
            continue;
        }
        if (base..base + count).all(|p| TcpListener::bind(("0.0.0.0", p)).is_ok()) {
            return base;
        }
    }
}

/// [low, high) for test listeners: 10000 up to the start of the ephemeral range when
/// that leaves at least 4,000 ports, else 20000-60000 as a machine with a wide
/// ephemeral range offers nothing better.
fn test_port_range() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
    match ephemeral_low {
        Some(e) if e >= LOW + 4_000 => (LOW, e),
        _ => (20_000, 60_000),
    }
}
