//! `kpsc_proxy_requests`: the kernel carries a client's requests to its broker.
//! Requests never need rewriting, and Produce requests are a changefeed's bulk: this
//! verdict, run on every skb the client socket receives, redirects whole skbs to the
//! broker socket's egress and reports the head of every frame that starts in them (API
//! key, version, correlation id, whether a response will come) so kpscd can match the
//! responses in order. For each such frame it pushes an expectation for the response
//! verdict, and a marker where it passes a stretch to kpscd.
//!
//! Invariants it keeps:
//! - A redirected skb holds only frames it has walked: each starts where the previous
//!   ended, each head is inside the skb, each size is within `--max-frame-size`, each API
//!   key is one kpscd knows and lets through unseen, each version is not negative.
//!   Anything else (a head split over two skbs, more than FRAMES_PER_BATCH frames, a full
//!   ring or expectation ring) passes the whole skb to kpscd (see `stream`).
//! - A batch record and the frames' expectations are written before the skb is
//!   redirected, so the broker cannot answer a request neither kpscd nor the response
//!   verdict has been told of.
//! - The expectation ring always has room for a marker: a batch is redirected only if its
//!   entries leave one free, and the stream is taken back from kpscd only with room for a
//!   frame and a marker. So every stretch passed to kpscd has its marker.
//! - While kpscd holds the stream (`StreamState::hold`), the next skb with a frame
//!   boundary is passed: the broker socket's backlog stops growing at a frame's end.
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::stream_verdict, programs::SkBuffContext,
};
use kpsc_common::proxy_kernel::{
    ConnSlot, EXPECT_MARKER, EXPECTATIONS, Expectation, FRAMES_PER_BATCH, KernelConfig,
    RequestBatch, RequestHead,
};

use crate::{BROKERS, CONFIG, COOKIES, REQUESTS, SLOTS, stream};

/// Size prefix, API key, API version, correlation id.
const FIXED_HEAD: u32 = 12;
const PRODUCE: i16 = 0;

fn be_i16(ctx: &SkBuffContext, offset: u32) -> Option<i16> {
    ctx.load::<[u8; 2]>(offset as usize)
        .ok()
        .map(i16::from_be_bytes)
}

fn byte(ctx: &SkBuffContext, offset: u32) -> Option<u8> {
    ctx.load::<u8>(offset as usize).ok()
}

/// A Produce request's acks, read as kpscd's `produce_acks` does; None when it is not
/// within the frame and this skb, or a field is of a shape kpscd should look at.
fn produce_acks(ctx: &SkBuffContext, frame: u32, frame_end: u32, version: i16) -> Option<i16> {
    let mut off = frame + FIXED_HEAD;
    // client_id: int16-length nullable string in every header version.
    let client_id = be_i16(ctx, off)?;
    off += 2;
    if client_id > 0 {
        off += client_id as u32;
    }
    if version >= 9 {
        // Header v2: tagged fields. Clients send none; anything else goes to kpscd.
        if byte(ctx, off)? != 0 {
            return None;
        }
        off += 1;
    }
    if version >= 9 {
        // transactional_id: compact nullable string (uvarint length + 1), up to 2 bytes.
        let b0 = byte(ctx, off)?;
        let len = if b0 & 0x80 == 0 {
            off += 1;
            u32::from(b0)
        } else {
            let b1 = byte(ctx, off + 1)?;
            if b1 & 0x80 != 0 {
                return None;
            }
            off += 2;
            u32::from(b0 & 0x7f) | (u32::from(b1) << 7)
        };
        if len > 1 {
            off += len - 1;
        }
    } else if version >= 3 {
        let len = be_i16(ctx, off)?;
        off += 2;
        if len > 0 {
            off += len as u32;
        }
    }
    if off + 2 > frame_end {
        return None;
    }
    be_i16(ctx, off)
}

/// The head of the frame starting at `frame`, if the kernel may carry it.
fn frame_head(ctx: &SkBuffContext, config: &KernelConfig, frame: u32) -> Option<RequestHead> {
    let fixed = ctx.load::<[u8; FIXED_HEAD as usize]>(frame as usize).ok()?;
    let size = i32::from_be_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
    // Malformed or too large: kpscd refuses it with the error a client should see.
    if size < 8 || size as u32 > config.max_frame_size {
        return None;
    }
    let api_key = i16::from_be_bytes([fixed[4], fixed[5]]);
    let api_version = i16::from_be_bytes([fixed[6], fixed[7]]);
    // An unknown key or a negative version: kpscd's header check refuses it.
    if !config.allows(api_key) || api_version < 0 {
        return None;
    }
    let frame_len = size as u32 + 4;
    let expects_response = if api_key == PRODUCE {
        u32::from(produce_acks(ctx, frame, frame + frame_len, api_version)? != 0)
    } else {
        1
    };
    Some(RequestHead {
        api_key,
        api_version,
        correlation_id: i32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]),
        frame_len,
        expects_response,
    })
}

/// Walks the frames starting at `first` in an skb of `len` bytes into `batch`. Returns the
/// bytes of the last frame still to come, or None if the skb must go to kpscd.
fn walk(
    ctx: &SkBuffContext,
    config: &KernelConfig,
    first: u32,
    len: u32,
    batch: &mut RequestBatch,
) -> Option<u32> {
    let mut pos = first;
    let mut count = 0;
    for i in 0..FRAMES_PER_BATCH {
        if pos >= len {
            break;
        }
        let head = frame_head(ctx, config, pos)?;
        pos += head.frame_len;
        batch.frames[i] = head;
        count += 1;
    }
    if pos < len {
        return None;
    }
    batch.count = count;
    Some(pos - len)
}

/// Hands this skb, and the stream from here on, to kpscd; a stretch that begins here
/// gets its marker, so the response verdict leaves its responses to kpscd too.
fn pass(slot: &mut ConnSlot, config: &KernelConfig, start: u64, len: u32, tail: u32) -> u32 {
    if stream::pass(&mut slot.requests, start, len, tail) && config.carry_responses != 0 {
        let at = slot.expect_tail;
        slot.expectations[(at % EXPECTATIONS as u64) as usize] = Expectation {
            correlation_id: 0,
            kind: EXPECT_MARKER,
        };
        slot.pass_marker = at;
        // SAFETY: an aligned u64 the response verdict and kpscd read; volatile so the
        // entry above is stored first.
        unsafe { core::ptr::write_volatile(&raw mut slot.expect_tail, at + 1) };
    }
    stream::PASS
}

/// Free entries in the expectation ring.
fn room(slot: &ConnSlot) -> u64 {
    // SAFETY: an aligned u64 the response verdict or kpscd stores; a stale value only
    // makes the ring look fuller.
    let head = unsafe { core::ptr::read_volatile(&raw const slot.expect_head) };
    (EXPECTATIONS as u64).saturating_sub(slot.expect_tail.saturating_sub(head))
}

/// Pushes the expectations of the batch's frames, if they leave the marker's entry free.
fn push_expectations(slot: &mut ConnSlot, config: &KernelConfig, batch: &RequestBatch) -> bool {
    let tail = slot.expect_tail;
    let count = (batch.count as usize).min(FRAMES_PER_BATCH);
    if (count as u64) + 1 > room(slot) {
        return false;
    }
    for i in 0..FRAMES_PER_BATCH {
        if i >= count {
            break;
        }
        let frame = &batch.frames[i];
        slot.expectations[((tail + i as u64) % EXPECTATIONS as u64) as usize] = Expectation {
            correlation_id: frame.correlation_id,
            kind: config.expectation_kind(
                frame.api_key,
                frame.api_version,
                frame.expects_response != 0,
            ),
        };
    }
    // SAFETY: as in `pass`.
    unsafe { core::ptr::write_volatile(&raw mut slot.expect_tail, tail + count as u64) };
    true
}

#[stream_verdict]
pub fn kpsc_proxy_requests(ctx: SkBuffContext) -> u32 {
    if ctx.len() == 0 {
        return stream::PAYLOAD_FREE;
    }
    // SAFETY: the program's context pointer is the helper's only argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a plain lookup, copied at once.
    let Some(mut key) = (unsafe { COOKIES.get(&cookie) }).copied() else {
        // Not (or no longer) a registered connection: its bytes are kpscd's.
        return stream::PASS;
    };
    let (Some(slot), Some(config)) = (SLOTS.get_ptr_mut(key), CONFIG.get(0)) else {
        return stream::PASS;
    };
    // SAFETY: this connection's slot; only this socket's verdict writes the fields it
    // writes, one skb at a time (see `stream`).
    let slot = unsafe { &mut *slot };
    // kpscd takes no new requests (shutdown): the rest of a frame already under way is
    // still carried (with what shares its last packet), nothing after it. SAFETY: an aligned u32 kpscd stores atomically.
    if unsafe { core::ptr::read_volatile(&raw const slot.stopped) } != 0
        && slot.requests.frame_left == 0
    {
        return stream::PASS;
    }
    let len = ctx.len();
    let may_resume = config.carry_responses == 0 || room(slot) >= 2;
    let Some(start) = stream::take(&mut slot.requests, len, may_resume) else {
        return stream::PASS;
    };
    let left = slot.requests.frame_left;
    if left >= len {
        // The middle of a frame already redirected.
        slot.requests.frame_left = left - len;
    } else if stream::held(&slot.requests) {
        // The broker socket's backlog is over kpscd's cap: kpscd takes the stream.
        return pass(slot, config, start, len, left);
    } else {
        let Some(mut entry) = REQUESTS.reserve::<RequestBatch>(0) else {
            return pass(slot, config, start, len, left);
        };
        // SAFETY: the reservation is a RequestBatch's worth of ring memory, ours until
        // submitted or discarded.
        let batch = unsafe { &mut *entry.as_mut_ptr() };
        batch.slot = key;
        batch.generation = slot.generation;
        batch.count = 0;
        batch.first_expectation = slot.expect_tail;
        let Some(next_left) = walk(&ctx, config, left, len, batch) else {
            entry.discard(0);
            return pass(slot, config, start, len, left);
        };
        if config.carry_responses != 0 && !push_expectations(slot, config, batch) {
            entry.discard(0);
            return pass(slot, config, start, len, left);
        }
        slot.requests.redirected_frames += u64::from(batch.count);
        slot.requests.frame_left = next_left;
        entry.submit(0);
    }
    slot.requests.redirected_bytes += u64::from(len);
    // Flags 0: the broker socket's egress, through its psock backlog. A failed redirect
    // (the broker socket already left the map) drops the skb: the connection is ending.
    BROKERS.redirect_skb(&ctx, &mut key, 0) as u32
}
