//! The Kafka-unaware relay probes (`kpsc-relay-ceiling`: splice, uring, uring-sqpoll,
//! uring-recv-send)
//! deliver every byte, in order, both ways, across a half-close: a benchmark of a relay
//! that loses or reorders bytes would measure nothing. On loopback; about 1 s in all.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Connections at once, and bytes each side sends on each.
const CONNECTIONS: u64 = 3;
const BYTES: usize = 8 << 20;
/// A relay that stops passing bytes (or a FIN) fails the test instead of hanging it.
const STALL: Duration = Duration::from_secs(20);

/// Bytes no two streams share and a reordering would not keep (xorshift).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The probe process, killed when the test ends, pass or fail.
struct Probe(Child);

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sink's side of one connection: reads the client's id and stream while sending
/// the first half of its own, then (the client has half-closed) the second half.
fn serve(stream: TcpStream) -> Result<(), String> {
    stream
        .set_read_timeout(Some(STALL))
        .map_err(|e| e.to_string())?;
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    let mut id = [0u8; 8];
    reader.read_exact(&mut id).map_err(|e| format!("id: {e}"))?;
    let id = u64::from_be_bytes(id);
    let reply = pattern(id + 1000, BYTES);
    let (first, second) = reply.split_at(BYTES / 2);
    let first = first.to_vec();
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sending = thread::spawn(move || writer.write_all(&first));
    let mut got = Vec::with_capacity(BYTES);
    reader
        .read_to_end(&mut got)
        .map_err(|e| format!("sink reading: {e}"))?;
    sending
        .join()
        .unwrap()
        .map_err(|e| format!("sink writing: {e}"))?;
    if got != pattern(id, BYTES) {
        return Err(format!(
            "connection {id}: the sink got {} bytes, not the {BYTES} sent in order",
            got.len()
        ));
    }
    // After the client's half-close: the other direction must still carry bytes.
    let mut writer = stream;
    writer
        .write_all(second)
        .map_err(|e| format!("sink writing after the half-close: {e}"))?;
    writer.shutdown(Shutdown::Write).map_err(|e| e.to_string())
}

/// The client's side: sends its id and stream, half-closes, reads the sink's to the end.
fn client(relay: &str, id: u64) -> Result<(), String> {
    let stream = TcpStream::connect(relay).map_err(|e| format!("connecting: {e}"))?;
    stream
        .set_read_timeout(Some(STALL))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sending = thread::spawn(move || {
        writer.write_all(&id.to_be_bytes())?;
        writer.write_all(&pattern(id, BYTES))?;
        writer.shutdown(Shutdown::Write)
    });
    let mut got = Vec::with_capacity(BYTES);
    (&stream)
        .read_to_end(&mut got)
        .map_err(|e| format!("client reading: {e}"))?;
    sending
        .join()
        .unwrap()
        .map_err(|e| format!("client writing: {e}"))?;
    if got != pattern(id + 1000, BYTES) {
        return Err(format!(
            "connection {id}: the client got {} bytes, not the {BYTES} sent in order",
            got.len()
        ));
    }
    Ok(())
}

fn relays_every_byte_in_order(mode: &str) {
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap().to_string();
    let counters = std::env::temp_dir().join(format!(
        "kpsc-relay-ceiling-test-{mode}-{}.counters",
        std::process::id()
    ));
    let mut probe = Probe(
        Command::new(env!("CARGO_BIN_EXE_kpsc-relay-ceiling"))
            .args([mode, "127.0.0.1:0", &sink_addr])
            .arg(&counters)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting kpsc-relay-ceiling"),
    );
    let mut line = String::new();
    BufReader::new(probe.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let relay = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();

    let sinks = thread::spawn(move || {
        let served: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let (stream, _) = sink.accept().unwrap();
                thread::spawn(move || serve(stream))
            })
            .collect();
        served.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|id| {
            let relay = relay.clone();
            thread::spawn(move || client(&relay, id))
        })
        .collect();
    for c in clients {
        c.join().unwrap().unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
    let served: Vec<Result<(), String>> = sinks.join().unwrap();
    for s in served {
        s.unwrap_or_else(|e| panic!("{mode}: {e}"));
    }

    // Its own count agrees (the report shows it), and it is still running.
    let expected = CONNECTIONS * (8 + 2 * BYTES as u64);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = String::new();
    loop {
        last = std::fs::read_to_string(&counters).unwrap_or(last);
        if last.contains(&format!("relayed_bytes={expected} ")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{mode}: counters {last:?}, expected relayed_bytes={expected}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        probe.0.try_wait().unwrap().is_none(),
        "{mode}: the probe exited"
    );
    let _ = std::fs::remove_file(&counters);
}

#[test]
fn splice_relay_delivers_every_byte_in_order() {
    relays_every_byte_in_order("splice");
}

#[test]
fn uring_relay_delivers_every_byte_in_order() {
    relays_every_byte_in_order("uring");
}

#[test]
fn uring_sqpoll_relay_delivers_every_byte_in_order() {
    relays_every_byte_in_order("uring-sqpoll");
}

#[test]
fn uring_recv_send_relay_delivers_every_byte_in_order() {
    relays_every_byte_in_order("uring-recv-send");
}
