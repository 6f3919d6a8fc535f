//! The ring against real sockets.
use std::{
    future::poll_fn,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use super::*;
use crate::proxy::bulk::{
    splice::tests::pair,
    uring::socket::{self, UringRead, UringWrite},
};
use std::sync::atomic::AtomicBool;

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

/// `move_span`, bounded: a span that never ends fails the test instead of hanging it.
async fn span_to_end(
    ring: &Ring,
    (from, to): (&UringRead, &UringWrite),
    pipe: &Arc<Pipe>,
    len: u64,
) -> Result<Stalls, MoveError> {
    timeout(
        Duration::from_secs(20),
        move_span(ring, from, to, pipe, len),
    )
    .await
    .expect("the span did not end")
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
    let pipe = Arc::new(Pipe::blocking().unwrap());
    let mut source_stalls = 0;
    for len in [1_000_000, 4096, 1_995_904] {
        source_stalls += span_to_end(&ring, (&from, &to), &pipe, len)
            .await
            .unwrap()
            .source;
    }
    assert!(
        source_stalls > 0,
        "the pauses must have stalled a span on its source"
    );
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
    let pipe = Arc::new(Pipe::blocking().unwrap());
    let stalls = span_to_end(&ring, (&from, &to), &pipe, 16_000_000)
        .await
        .unwrap();
    assert!(
        stalls.sink > 0 && stalls.holding_bytes > 0,
        "the reader's pauses must have stalled the sink with bytes in the pipe: {stalls:?}"
    );
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
            let pipe = Arc::new(Pipe::blocking().unwrap());
            let (end, got) =
                tokio::join!(span_to_end(&ring, (&from, &to), &pipe, 300_000), async {
                    let mut got = vec![0; 300_000];
                    reader.read_exact(&mut got).await.map(|_| got)
                });
            assert!(end.is_ok(), "connection {c}: {end:?}");
            assert!(got.unwrap() == payload, "connection {c}: bytes differ");
            feeder.await.unwrap().unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// More spans taken at once than the submission queue holds rounds for (two entries
/// each): the ring submits what it has queued when the queue fills and goes on, and
/// each span still moves exactly its bytes, its connection's, in order.
#[tokio::test]
async fn more_spans_at_once_than_the_submission_queue_holds() {
    // 600: more than the queue's 512 rounds, in about 3600 descriptors (six a span).
    const SPANS: u32 = RING_ENTRIES / 2 + 88;
    const WORDS: u32 = 10_000;
    const LEN: usize = WORDS as usize * 4;
    // Every 4-byte word names its connection and place: bytes of another connection, or
    // out of order, differ.
    let payload = |c: u32| -> Vec<u8> {
        (0..WORDS)
            .flat_map(|i| ((c << 16) | i).to_le_bytes())
            .collect()
    };
    let ring = Ring::start().unwrap();
    // The thread takes the queue when the eventfd is written, and `submit` writes it only
    // if no wake-up is on its way: holding that wake-up back gathers every span in the
    // queue, so the thread takes them in one batch.
    assert!(!ring.woken.swap(true, Ordering::AcqRel));
    let mut tasks = Vec::new();
    for c in 0..SPANS {
        let ring = Arc::clone(&ring);
        tasks.push(tokio::spawn(async move {
            let (mut writer, (mut from, _), (_, to), mut reader) = relay().await;
            // A tail after the span, which must stay in the source.
            let mut sent = payload(c);
            sent.extend(c.to_le_bytes());
            let feeder =
                tokio::spawn(async move { writer.write_all(&sent).await.map(|()| writer) });
            let pipe = Arc::new(Pipe::blocking().unwrap());
            let (end, got) =
                tokio::join!(span_to_end(&ring, (&from, &to), &pipe, LEN as u64), async {
                    let mut got = vec![0; LEN];
                    let read = timeout(Duration::from_secs(20), reader.read_exact(&mut got));
                    read.await.expect("the bytes did not arrive").map(|_| got)
                });
            assert!(end.is_ok(), "connection {c}: {end:?}");
            assert!(got.unwrap() == payload(c), "connection {c}: bytes differ");
            let _writer = feeder.await.unwrap().unwrap();
            let mut tail = [0u8; 4];
            timeout(Duration::from_secs(5), from.read_exact(&mut tail))
                .await
                .expect("the span took bytes past its end")
                .unwrap();
            assert_eq!(tail, c.to_le_bytes(), "connection {c}: the tail moved");
        }));
    }
    let gathered = Instant::now() + Duration::from_secs(10);
    while ring.queue.lock().unwrap().len() < SPANS as usize {
        assert!(Instant::now() < gathered, "the spans were not all queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ring.wake();
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
    let pipe = Arc::new(Pipe::blocking().unwrap());
    let end = span_to_end(&ring, (&from, &to), &pipe, 50_000).await;
    assert!(
        matches!(end, Err(MoveError::Source(FrameError::Truncated))),
        "{end:?}"
    );
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
    let pipe = Arc::new(Pipe::blocking().unwrap());
    let end = span_to_end(&ring, (&from, &to), &pipe, 8 << 20).await;
    assert!(matches!(end, Err(MoveError::Sink(_))), "{end:?}");
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
        pipe: Arc::new(Pipe::blocking().unwrap()),
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
    // The ring drops its reference right after it told the task: the socket's own and
    // this new one are left.
    let fd = from.fd();
    let released = Instant::now() + Duration::from_secs(1);
    while Arc::strong_count(&fd) > 2 && Instant::now() < released {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(Arc::strong_count(&fd), 2);
}

/// What the threads named `workers` wait in now, for those waiting on a socket.
fn workers_waiting_on_a_socket(workers: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?.path();
            let name = std::fs::read_to_string(t.join("comm")).ok()?;
            let wchan = std::fs::read_to_string(t.join("wchan")).ok()?;
            (name.trim() == workers
                && ["wait_woken", "sk_wait_data", "sk_stream_wait_memory"].contains(&wchan.trim()))
            .then(|| format!("{} in {wchan}", name.trim()))
        })
        .collect()
}

/// Twenty peers trickling their frames 100 bytes every 3 ms: every span arrives whole,
/// and no worker of the ring waits on a socket between the pieces (each short receive
/// sends its span back to the task), so trickling peers cannot hold a kernel thread
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_peers_hold_no_worker() {
    let ring = Ring::start().unwrap();
    // The ring thread's wait is readable in wchan (else this test could not fail).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ring_thread = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?.path();
            (std::fs::read_to_string(t.join("comm")).ok()?.trim() == "kpsc-uring")
                .then(|| std::fs::read_to_string(t.join("wchan")).unwrap_or_default())
        })
        .collect::<Vec<_>>();
    assert!(
        ring_thread
            .iter()
            .any(|w| !w.trim().is_empty() && w.trim() != "0"),
        "wchan is not readable here: {ring_thread:?}"
    );
    let workers = ring.worker_name();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, workers) = (Arc::clone(&sampling), workers.clone());
        tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            while sampling.load(Ordering::Acquire) {
                seen.extend(workers_waiting_on_a_socket(&workers));
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        })
    };
    let mut tasks = Vec::new();
    for c in 0..20u8 {
        let ring = Arc::clone(&ring);
        tasks.push(tokio::spawn(async move {
            let (mut writer, (from, _), (_, to), mut reader) = relay().await;
            let payload: Vec<u8> = (0..10_000u32).map(|i| (i as u8) ^ c).collect();
            let sent = payload.clone();
            let feeder = tokio::spawn(async move {
                for piece in sent.chunks(100) {
                    writer.write_all(piece).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                writer
            });
            let pipe = Arc::new(Pipe::blocking().unwrap());
            // The span starts on a first piece, as a frame's rest follows its head: a span
            // submitted on an empty socket has a worker wait (up to the sockets' timeout)
            // for its first bytes, which is not what this test is about.
            from.readable().await.unwrap();
            let (end, got) = tokio::join!(span_to_end(&ring, (&from, &to), &pipe, 10_000), async {
                let mut got = vec![0; 10_000];
                reader.read_exact(&mut got).await.map(|_| got)
            });
            assert!(end.is_ok(), "peer {c}: {end:?}");
            assert!(got.unwrap() == payload, "peer {c}: bytes differ");
            feeder.await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    sampling.store(false, Ordering::Release);
    let seen = sampler.await.unwrap();
    assert!(
        seen.is_empty(),
        "workers waited on trickling peers: {seen:?}"
    );
}

/// When the ring thread fails, the span that was queued to it and every span submitted after end
/// with `RingFailed` instead of waiting forever, and the ring says it is dead, so new
/// connections do not use it.
#[tokio::test]
async fn a_failed_ring_fails_its_spans_and_refuses_new_ones() {
    let ring = Ring::start().unwrap();
    let (mut writer, (from, _), (_, to), _reader) = relay().await;
    writer.write_all(&[1; 100_000]).await.unwrap();
    // The first span moves; then a span the thread holds while the writer is silent.
    let pipe = Arc::new(Pipe::blocking().unwrap());
    span_to_end(&ring, (&from, &to), &pipe, 100_000)
        .await
        .unwrap();
    ring.poison.store(true, Ordering::Release);
    let done = Arc::new(SpanDone::default());
    ring.submit(Span {
        from: from.fd(),
        to: to.fd(),
        pipe: Arc::clone(&pipe),
        to_fill: 1000,
        in_pipe: 0,
        done: Arc::clone(&done),
    });
    let end = timeout(Duration::from_secs(5), poll_fn(|cx| done.poll(cx)))
        .await
        .expect("the span outlived its ring");
    assert!(matches!(end, SpanEnd::RingFailed(_)), "{end:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!ring.alive());
    let end = span_to_end(&ring, (&from, &to), &pipe, 1000).await;
    assert!(matches!(end, Err(MoveError::Mover(_))), "{end:?}");
}
