//! The copy path's memory, counted by the allocator: a large frame borrows a bulk buffer
//! while it moves and gives it back when it is done; small frames never take one. Its own
//! test binary, with one test, so the heap it counts is this test's alone.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    io,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
};

use kpsc::kafka::frame::{BULK_BUFFER, FrameReader};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Heap bytes currently allocated.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Byte `i` of every frame body: made on the fly, so neither end holds a frame.
fn byte(i: usize) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}

/// Frames with the given body sizes, generated as they are read, in reads of up to
/// 100,000 bytes (more than the bulk buffer offers).
struct Frames {
    sizes: Vec<usize>,
    frame: usize,
    /// Position in the current frame, size prefix included.
    at: usize,
}

impl AsyncRead for Frames {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut budget = 100_000usize;
        while budget > 0 && buf.remaining() > 0 && self.frame < self.sizes.len() {
            let size = self.sizes[self.frame];
            let prefix = (size as i32).to_be_bytes();
            if self.at < 4 {
                buf.put_slice(&prefix[self.at..self.at + 1]);
                self.at += 1;
                budget -= 1;
                continue;
            }
            let n = (size + 4 - self.at).min(budget).min(buf.remaining());
            let body: Vec<u8> = (self.at - 4..self.at - 4 + n).map(byte).collect();
            buf.put_slice(&body);
            self.at += n;
            budget -= n;
            if self.at == size + 4 {
                self.frame += 1;
                self.at = 0;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Checks every byte against `byte(i)` without keeping any, and samples the heap on each
/// write: the peak is what the copy held while it moved bytes.
struct Checker {
    at: usize,
    peak: usize,
}

impl AsyncWrite for Checker {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.peak = self.peak.max(live());
        for (k, b) in buf.iter().enumerate() {
            assert_eq!(*b, byte(self.at + k), "byte {} of the frame", self.at + k);
        }
        self.at += buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Copies the next frame's body; returns the heap's peak during the copy and its level
/// after, both relative to before.
async fn copy_next(r: &mut FrameReader<Frames>) -> (usize, usize) {
    assert!(r.fill_to(4).await.unwrap());
    let size = i32::from_be_bytes(r.buffered()[..4].try_into().unwrap()) as usize;
    r.consume(4);
    let mut out = Checker { at: 0, peak: 0 };
    let before = live();
    r.copy_to(size, &mut out).await.unwrap();
    let after = live();
    assert_eq!(out.at, size);
    (
        out.peak.saturating_sub(before),
        after.saturating_sub(before),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn the_bulk_buffer_lives_only_while_a_large_frame_moves() {
    let sizes = vec![16 << 20, 4096, 1 << 20, 100, 8 * 1024 - 4];
    let mut r = FrameReader::new(
        Frames {
            sizes,
            frame: 0,
            at: 0,
        },
        8 * 1024,
    );
    for large in [16 << 20, 4096usize, 1 << 20] {
        let (peak, after) = copy_next(&mut r).await;
        if large > 8 * 1024 {
            assert!(
                peak >= BULK_BUFFER,
                "a {large}-byte frame should borrow a {BULK_BUFFER}-byte bulk buffer (peak +{peak})"
            );
        } else {
            assert!(peak < 1024, "a {large}-byte frame took +{peak} bytes");
        }
        // The tokio runtime and the test harness may allocate a little meanwhile; a kept
        // bulk buffer would be BULK_BUFFER (32 KiB).
        assert!(
            after < 4096,
            "{after} bytes still held after a {large}-byte frame"
        );
    }
    // Small frames: never a bulk buffer.
    for _ in 0..2 {
        let (peak, after) = copy_next(&mut r).await;
        assert!(
            peak < 1024 && after < 1024,
            "+{peak} during, +{after} after"
        );
    }
}
