//! `kpsc_proxy_requests`: `kpscd proxy --bulk-transfer sockmap` carries a client's
//! requests to its broker in the kernel. Requests never need rewriting, and Produce
//! requests are a changefeed's bulk: this verdict, run on every skb the client socket
//! receives, redirects whole skbs to the broker socket's egress and reports the head of
//! every frame that starts in them (API key, version, correlation id, whether a response
//! will come) so kpscd can match the responses in order.
//!
//! Invariants it keeps:
//! - A redirected skb holds only frames it has walked: each starts where the previous
//!   ended, each head is inside the skb, each size is within `--max-frame-size`, each API
//!   key is one kpscd knows and lets through unseen, each version is not negative.
//!   Anything else (a head split over two skbs, more than FRAMES_PER_BATCH frames, a full
//!   ring) passes the whole skb to kpscd and switches the connection to MODE_USERSPACE:
//!   an skb is never split, so kpscd then owns the stream, starting with the tail of a
//!   frame already redirected (`pass_tail`).
//! - It gives the stream back only to an skb that starts exactly where kpscd said it had
//!   written everything (`resume_at`): kernel and userspace bytes never interleave.
//! - A batch record is submitted before its skb is redirected, so the broker cannot answer
//!   a request kpscd has not been told of.
//!
//! One skb of one socket at a time (the verdict runs under the socket's lock), so the
//! slot's fields need no atomics on this side.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, sk_action::SK_PASS},
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use kpsc_common::proxy_kernel::{
    ConnSlot, FRAMES_PER_BATCH, KernelConfig, MAX_CONNECTIONS, MODE_KERNEL, MODE_USERSPACE,
    REQUESTS_RING_BYTES, RequestBatch, RequestHead,
};

#[map(name = "PROXY_CLIENTS")]
static CLIENTS: SockHash<u32> = SockHash::with_max_entries(MAX_CONNECTIONS, 0);

#[map(name = "PROXY_BROKERS")]
static BROKERS: SockHash<u32> = SockHash::with_max_entries(MAX_CONNECTIONS, 0);

#[map(name = "PROXY_COOKIES")]
static COOKIES: HashMap<u64, u32> = HashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map(name = "PROXY_SLOTS")]
static SLOTS: Array<ConnSlot> = Array::with_max_entries(MAX_CONNECTIONS, BPF_F_MMAPABLE);

#[map(name = "PROXY_REQUESTS")]
static REQUESTS: RingBuf = RingBuf::with_byte_size(REQUESTS_RING_BYTES, 0);

#[map(name = "PROXY_CONFIG")]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

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

/// Hands this skb, and the stream from here on, to kpscd.
fn pass(slot: &mut ConnSlot, start: u64, len: u32, tail: u32) -> u32 {
    if slot.mode == MODE_KERNEL {
        slot.pass_from = start;
        slot.pass_tail = tail;
        slot.frames_before_pass = slot.redirected_frames;
        slot.frame_left = 0;
        slot.pass_epoch += 1;
        slot.mode = MODE_USERSPACE;
    }
    slot.passed_bytes += u64::from(len);
    SK_PASS
}

#[stream_verdict]
pub fn kpsc_proxy_requests(ctx: SkBuffContext) -> u32 {
    // SAFETY: the program's context pointer is the helper's only argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a plain lookup, copied at once.
    let Some(mut key) = (unsafe { COOKIES.get(&cookie) }).copied() else {
        // Not (or no longer) a registered connection: its bytes are kpscd's.
        return SK_PASS;
    };
    let (Some(slot), Some(config)) = (SLOTS.get_ptr_mut(key), CONFIG.get(0)) else {
        return SK_PASS;
    };
    // SAFETY: this socket's slot; only this socket's verdict writes the fields it writes,
    // one skb at a time (see the module comment).
    let slot = unsafe { &mut *slot };
    let len = ctx.len();
    if len == 0 {
        // A FIN without payload. Redirected, the broker socket's psock backlog would send
        // 0 bytes, which the kernel takes for a broken pipe: it sets EPIPE on the broker
        // socket, and kpscd's next read there that finds nothing (a large response
        // spliced while it arrives) fails, losing the responses still owed. Passed, it
        // ends the stream where kpscd reads, as in MODE_USERSPACE; no byte moves, so
        // the mode and offsets stay.
        return SK_PASS;
    }
    let start = slot.seen;
    slot.seen = start + u64::from(len);
    if slot.mode == MODE_USERSPACE {
        // SAFETY: an aligned u64 kpscd stores atomically; a volatile load sees a whole one.
        let resume_at = unsafe { core::ptr::read_volatile(&raw const slot.resume_at) };
        if resume_at != start {
            return pass(slot, start, len, 0);
        }
        slot.mode = MODE_KERNEL;
        slot.frame_left = 0;
    }
    let left = slot.frame_left;
    if left >= len {
        // The middle of a frame already redirected.
        slot.frame_left = left - len;
    } else {
        let Some(mut entry) = REQUESTS.reserve::<RequestBatch>(0) else {
            return pass(slot, start, len, left);
        };
        // SAFETY: the reservation is a RequestBatch's worth of ring memory, ours until
        // submitted or discarded.
        let batch = unsafe { &mut *entry.as_mut_ptr() };
        batch.slot = key;
        batch.generation = slot.generation;
        batch.count = 0;
        let Some(next_left) = walk(&ctx, config, left, len, batch) else {
            entry.discard(0);
            return pass(slot, start, len, left);
        };
        slot.redirected_frames += u64::from(batch.count);
        slot.frame_left = next_left;
        entry.submit(0);
    }
    slot.redirected_bytes += u64::from(len);
    // Flags 0: the broker socket's egress, through its psock backlog. A failed redirect
    // (the broker socket already left the map) drops the skb: the connection is ending.
    BROKERS.redirect_skb(&ctx, &mut key, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: `license` is the section the loader reads the program's license from (a C
// string); LICENSE is the only symbol of that name. GPL-compatible: sk_skb redirects need
// it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
