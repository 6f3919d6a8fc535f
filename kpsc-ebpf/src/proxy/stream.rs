//! The hand-over of one direction's stream between its verdict and kpscd, the same for
//! requests and responses:
//! - the verdict owns the stream (MODE_KERNEL) until an skb it may not carry; it passes
//!   that skb whole and from then on every skb (MODE_USERSPACE), recording where the
//!   stretch begins and how many bytes of a frame it had begun redirecting come first;
//! - it takes the stream back only at an skb that starts exactly where kpscd says it has
//!   written everything it read (`resume_at`): kernel and userspace bytes never
//!   interleave, and an skb is never split.
//!
//! One skb of one socket at a time (a verdict runs under its socket's lock), so a
//! direction's fields need no atomics on this side.

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use kpsc_common::proxy_kernel::{MODE_KERNEL, MODE_USERSPACE, StreamState};

/// Accounts an skb of `len` bytes and says where it starts in the stream, or None when
/// kpscd has the stream and does not give it back at this skb (the skb is passed).
/// `may_resume`: the verdict could carry frames from here (else kpscd keeps the stream).
pub fn take(state: &mut StreamState, len: u32, may_resume: bool) -> Option<u64> {
    let start = state.seen;
    state.seen = start + u64::from(len);
    if state.mode == MODE_USERSPACE {
        // SAFETY: an aligned u64 kpscd stores atomically; a volatile load sees a whole one.
        let resume_at = unsafe { core::ptr::read_volatile(&raw const state.resume_at) };
        if resume_at != start || !may_resume || held(state) {
            state.passed_bytes += u64::from(len);
            return None;
        }
        state.mode = MODE_KERNEL;
        state.frame_left = 0;
    }
    Some(start)
}

/// kpscd holds the stream: the peer's redirect backlog is over its cap (see
/// `StreamState::hold`). The verdict passes from the next frame boundary and does not take
/// the stream back meanwhile.
pub fn held(state: &StreamState) -> bool {
    // SAFETY: an aligned u32 kpscd stores atomically.
    unsafe { core::ptr::read_volatile(&raw const state.hold) != 0 }
}

/// Passes this skb, and the stream from here on, to kpscd. `tail`: bytes at its start
/// that end a frame already redirected. True when this begins a stretch.
pub fn pass(state: &mut StreamState, start: u64, len: u32, tail: u32) -> bool {
    let begins = state.mode == MODE_KERNEL;
    if begins {
        state.pass_from = start;
        state.pass_tail = tail;
        state.frames_before_pass = state.redirected_frames;
        state.frame_left = 0;
        state.pass_epoch += 1;
        state.mode = MODE_USERSPACE;
    }
    state.passed_bytes += u64::from(len);
    begins
}

/// The verdict for a passed skb.
pub const PASS: u32 = SK_PASS;

/// The verdict for an skb without payload, which both verdicts give before anything else:
/// a FIN (nothing else without payload is queued to be read). TCP has already taken the
/// FIN when the verdict runs, so recvmsg reports the end of the stream whatever becomes
/// of the skb, and dropping it loses nothing. The other verdicts break the connection
/// when the socket's psock backlog sends the skb: it sends 0 bytes, which the kernel
/// takes for a broken pipe (EPIPE on that socket, and the backlog stops). A redirect
/// always goes through the peer socket's backlog; a pass goes through the socket's own
/// whenever that holds redirects to it (responses to a client that is slow to read), and
/// kpscd's next write there fails.
pub const PAYLOAD_FREE: u32 = SK_DROP;
