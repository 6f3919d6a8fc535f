//! `kpsc_proxy_responses`: the kernel carries to the client the broker's responses that
//! need no rewrite (Produce, Fetch and the rest of the data path), run on every skb the
//! broker socket receives. It matches each response frame that starts in the skb with the
//! oldest expectation the request verdict pushed, and redirects the whole skb to the
//! client socket's egress only when every one of them is a response kpscd need not see.
//!
//! Invariants it keeps:
//! - A redirected skb holds only frames matched in order: each starts where the previous
//!   ended, its head is inside the skb, its size within `--max-frame-size`, and it answers
//!   the oldest expectation (same correlation id, kind EXPECT_DIRECT). Expectations of
//!   acks=0 requests a response does not answer are skipped, as kpscd skips them.
//! - Anything else passes the skb, and the stream from there, to kpscd (see `stream`):
//!   a response that may carry addresses, a marker (kpscd handled those requests), an
//!   answer to acks=0, a response nobody expects, a head split over two skbs. kpscd then
//!   delivers in order and hands the stream back with the expectation ring advanced past
//!   what it delivered.
//! - The expectation ring's head moves only here while this verdict has the stream.
//! - While kpscd holds the stream (`StreamState::hold`), the next skb with a frame
//!   boundary is passed: the client socket's backlog stops growing at a frame's end.
#![allow(clippy::needless_range_loop)]

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::stream_verdict, programs::SkBuffContext,
};
use kpsc_common::proxy_kernel::{
    ConnSlot, EXPECT_ACKS0, EXPECT_DIRECT, EXPECTATIONS, FRAMES_PER_BATCH,
};

use crate::{BROKER_COOKIES, CLIENTS, CONFIG, SLOTS, stream};

/// Size prefix and correlation id.
const RESPONSE_HEAD: usize = 8;
/// Expectations of unanswered acks=0 requests one response may skip.
const ACKS0_SKIPS: usize = 8;

fn expectation(slot: &ConnSlot, at: u64) -> (i32, u32) {
    let e = &slot.expectations[(at & (EXPECTATIONS as u64 - 1)) as usize];
    (e.correlation_id, e.kind)
}

/// Matches the frames starting at `first` in an skb of `len` bytes with the expectations
/// from the ring's head. Returns (new head, frames, bytes of the last frame still to
/// come), or None if the skb must go to kpscd.
fn walk(
    ctx: &SkBuffContext,
    slot: &ConnSlot,
    max_frame_size: u32,
    first: u32,
    len: u32,
) -> Option<(u64, u64, u32)> {
    // SAFETY: aligned u64s: the head kpscd may have stored before giving the stream back
    // (read after `resume_at`, as loaded in `stream::take`), the tail the request verdict
    // stores after the entries below it.
    let mut head = unsafe { core::ptr::read_volatile(&raw const slot.expect_head) };
    let tail = unsafe { core::ptr::read_volatile(&raw const slot.expect_tail) };
    let mut pos = first;
    let mut frames = 0;
    for _ in 0..FRAMES_PER_BATCH {
        if pos >= len {
            break;
        }
        let fixed = ctx.load::<[u8; RESPONSE_HEAD]>(pos as usize).ok()?;
        let size = i32::from_be_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
        if size < 4 || size as u32 > max_frame_size {
            return None;
        }
        let correlation_id = i32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let mut matched = false;
        for _ in 0..ACKS0_SKIPS {
            if head >= tail {
                // Nothing expected: kpscd says what this response is.
                return None;
            }
            let (expected, kind) = expectation(slot, head);
            if kind == EXPECT_ACKS0 && expected != correlation_id {
                head += 1;
                continue;
            }
            matched = kind == EXPECT_DIRECT && expected == correlation_id;
            break;
        }
        if !matched {
            return None;
        }
        head += 1;
        frames += 1;
        pos += size as u32 + 4;
    }
    if pos < len {
        return None;
    }
    Some((head, frames, pos - len))
}

#[stream_verdict]
pub fn kpsc_proxy_responses(ctx: SkBuffContext) -> u32 {
    if ctx.len() == 0 {
        return stream::PAYLOAD_FREE;
    }
    // SAFETY: the program's context pointer is the helper's only argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a plain lookup, copied at once.
    let Some(mut key) = (unsafe { BROKER_COOKIES.get(&cookie) }).copied() else {
        return stream::PASS;
    };
    let (Some(slot), Some(config)) = (SLOTS.get_ptr_mut(key), CONFIG.get(0)) else {
        return stream::PASS;
    };
    // SAFETY: this connection's slot; this verdict writes the response fields and, while
    // it has the stream, the ring's head (see `stream` and the module comment).
    let slot = unsafe { &mut *slot };
    let len = ctx.len();
    let Some(start) = stream::take(&mut slot.responses, len, true) else {
        return stream::PASS;
    };
    let left = slot.responses.frame_left;
    let (head, frames, next_left) = if left >= len {
        // The middle of a response already redirected.
        (None, 0, left - len)
    } else {
        // A hold (the client socket's backlog is over kpscd's cap) passes as a response
        // the verdict cannot carry does.
        let walked = match stream::held(&slot.responses) {
            true => None,
            false => walk(&ctx, slot, config.max_frame_size, left, len),
        };
        let Some((head, frames, next_left)) = walked else {
            stream::pass(&mut slot.responses, start, len, left);
            return stream::PASS;
        };
        (Some(head), frames, next_left)
    };
    // Published in the order kpscd reads the other way round: it reads the frame count
    // first, and must then see the bytes and the frame state that go with it.
    // SAFETY: aligned fields of this connection's slot; volatile keeps the order.
    unsafe {
        let state = &raw mut slot.responses;
        core::ptr::write_volatile(
            &raw mut (*state).redirected_bytes,
            (*state).redirected_bytes + u64::from(len),
        );
        core::ptr::write_volatile(&raw mut (*state).frame_left, next_left);
        core::ptr::write_volatile(
            &raw mut (*state).redirected_frames,
            (*state).redirected_frames + frames,
        );
        if let Some(head) = head {
            // The request verdict reads it to see the ring's room.
            core::ptr::write_volatile(&raw mut slot.expect_head, head);
        }
    }
    // Flags 0: the client socket's egress, through its psock backlog. A failed redirect
    // (the client socket already left the map) drops the skb: the connection is ending.
    CLIENTS.redirect_skb(&ctx, &mut key, 0) as u32
}
