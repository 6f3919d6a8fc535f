//! `kpscd proxy --bulk-transfer sockmap`: what the request verdict (kpsc-ebpf's
//! `kpsc-proxy` object) and kpscd share. The verdict redirects a client's requests to its
//! broker socket in the kernel and reports the head of every frame it redirected; kpscd
//! handles what the verdict passes up. The protocol between them is described where it is
//! enforced, in kpsc-userspace's `proxy::bulk::sockmap`.

/// The request verdict, attached to CLIENTS_MAP.
pub const VERDICT: &str = "kpsc_proxy_requests";
/// The response verdict, attached to BROKERS_MAP.
pub const RESPONSE_VERDICT: &str = "kpsc_proxy_responses";
/// Client sockets (SOCKHASH, key: connection slot). The verdict runs on their skbs.
pub const CLIENTS_MAP: &str = "PROXY_CLIENTS";
/// Broker sockets (SOCKHASH, key: connection slot): the request verdict's redirect
/// targets, and the response verdict runs on their skbs.
pub const BROKERS_MAP: &str = "PROXY_BROKERS";
/// Client socket cookie -> connection slot.
pub const COOKIES_MAP: &str = "PROXY_COOKIES";
/// Broker socket cookie -> connection slot. (Map names are cut at 15 characters.)
pub const BROKER_COOKIES_MAP: &str = "PROXY_BCOOKIES";
/// `ConnSlot` per connection slot (ARRAY, mmap-able: kpscd reads and writes it in place).
pub const SLOTS_MAP: &str = "PROXY_SLOTS";
/// `RequestBatch` records (RINGBUF): the heads of the frames the verdict redirected.
pub const REQUESTS_MAP: &str = "PROXY_REQUESTS";
/// One `KernelConfig`.
pub const CONFIG_MAP: &str = "PROXY_CONFIG";

/// Connections that can be on the kernel path at once; more take the splice path.
pub const MAX_CONNECTIONS: u32 = 16_384;
/// Frames one skb may start for the kernel to redirect it; an skb starting more (many
/// small pipelined requests) goes to kpscd.
pub const FRAMES_PER_BATCH: usize = 16;
/// Size of the REQUESTS ring (bytes). When it is full the verdict passes skbs to kpscd.
pub const REQUESTS_RING_BYTES: u32 = 1 << 19;

/// `ConnSlot::mode`: the verdict frames and redirects.
pub const MODE_KERNEL: u32 = 0;
/// `ConnSlot::mode`: the verdict passes every skb to kpscd until it asks for the stream
/// back (`ConnSlot::resume_at`).
pub const MODE_USERSPACE: u32 = 1;
/// `ConnSlot::resume_at` when kpscd is not asking for the stream back.
pub const RESUME_NONE: u64 = u64::MAX;

/// Entries of a connection's expectation ring: what the response verdict knows of the
/// requests whose responses are still to come, in request order. The request verdict
/// stops redirecting (passes to kpscd) rather than fill its last entry, which is kept for
/// the marker a pass pushes.
pub const EXPECTATIONS: usize = 32;
/// `Expectation::kind`: the response goes to the client unseen.
pub const EXPECT_DIRECT: u32 = 1;
/// `Expectation::kind`: the response may carry addresses; kpscd must rewrite it.
pub const EXPECT_REWRITE: u32 = 2;
/// `Expectation::kind`: a Produce with acks=0, which Kafka brokers do not answer. A
/// response with its correlation id goes to kpscd (which drops it); any other response
/// skips the entry.
pub const EXPECT_ACKS0: u32 = 3;
/// `Expectation::kind`: the request verdict passed a stretch of requests to kpscd here;
/// the responses from this one on are kpscd's until it hands the stream back.
pub const EXPECT_MARKER: u32 = 4;

/// One expected response.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expectation {
    pub correlation_id: i32,
    pub kind: u32,
}

/// One direction's stream state, written by its verdict (`seen` .. `pass_tail`) and by
/// kpscd (`resume_at`). Offsets count the direction's bytes from the first one its
/// verdict could see.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Stream offset of the next skb: bytes the verdict has taken so far.
    pub seen: u64,
    /// Bytes of skbs redirected to the peer socket.
    pub redirected_bytes: u64,
    /// Frames whose head the verdict redirected.
    pub redirected_frames: u64,
    /// Where the current stretch passed to kpscd begins.
    pub pass_from: u64,
    /// `redirected_frames` when that stretch began.
    pub frames_before_pass: u64,
    /// Bytes passed to kpscd.
    pub passed_bytes: u64,
    /// Bytes of the frame being redirected that are still to come.
    pub frame_left: u32,
    /// MODE_KERNEL or MODE_USERSPACE.
    pub mode: u32,
    /// Incremented each time a stretch passed to kpscd begins.
    pub pass_epoch: u32,
    /// At `pass_from`: bytes that end a frame whose start was redirected.
    pub pass_tail: u32,
    /// Written by kpscd: the offset of a frame boundary up to which it has written every
    /// passed byte. An skb starting exactly there goes back to the kernel.
    pub resume_at: u64,
    /// Written by kpscd: 1 while the bytes redirected to the peer socket that its stream
    /// has not taken yet are over kpscd's cap. They wait on the peer's psock backlog,
    /// which no socket buffer bounds, and the source's TCP window stays open meanwhile.
    /// The verdict then passes from the next frame boundary, and kpscd, which writes only
    /// after that backlog has drained, stops reading: TCP's own backpressure again.
    pub hold: u32,
    pub _reserved: u32,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<StreamState>() == 80);
    assert!(offset_of!(StreamState, frame_left) == 48);
    assert!(offset_of!(StreamState, resume_at) == 64);
};

/// One connection's state, shared by both verdicts and kpscd (through an mmap). Each
/// field has one writer at a time; readers on the other side use acquire/release ordering
/// (kpscd through atomics on the mapping, the verdicts through volatile loads of values
/// the kernel's own locks and queues order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSlot {
    /// The client's requests (request verdict).
    pub requests: StreamState,
    /// The broker's responses (response verdict).
    pub responses: StreamState,
    /// Expectations pushed so far (ring position of the next one). Written by the request
    /// verdict only.
    pub expect_tail: u64,
    /// Expectations whose response has been dealt with. Written by the response verdict
    /// while it has the response stream, by kpscd before it gives the stream back.
    pub expect_head: u64,
    /// Ring position of the marker pushed when the latest request stretch was passed.
    pub pass_marker: u64,
    /// Written by kpscd: copied into every record, so a late record of a slot's previous
    /// connection is recognised.
    pub generation: u32,
    /// Written by kpscd: 1 when it takes no new requests (shutdown). The request verdict
    /// then finishes the frame under way and carries nothing more; what it passes stays
    /// unread.
    pub stopped: u32,
    pub expectations: [Expectation; EXPECTATIONS],
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(ConnSlot, responses) == 80);
    assert!(offset_of!(ConnSlot, expect_tail) == 160);
    assert!(offset_of!(ConnSlot, generation) == 184);
    assert!(offset_of!(ConnSlot, expectations) == 192);
    assert!(size_of::<ConnSlot>() == 192 + 8 * EXPECTATIONS);
};

/// The head of one redirected request frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    /// Size prefix included.
    pub frame_len: u32,
    /// 0 for a Produce request with acks=0 (brokers send no response).
    pub expects_response: u32,
}

/// The frames that started in one redirected skb, in stream order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestBatch {
    pub slot: u32,
    pub generation: u32,
    pub count: u32,
    pub _pad: u32,
    /// Expectation ring position of the first frame; the others follow it.
    pub first_expectation: u64,
    pub frames: [RequestHead; FRAMES_PER_BATCH],
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<RequestHead>() == 16);
    assert!(size_of::<RequestBatch>() == 24 + 16 * FRAMES_PER_BATCH);
};

/// Set once by kpscd before any socket enters the maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Bit k set: requests with API key k may be redirected. Every other key (ApiVersions,
    /// SASL, `--forbidden-api-keys`, keys >= 128) goes to kpscd.
    pub kernel_keys: [u64; 2],
    /// `--max-frame-size`: larger (and malformed) frames go to kpscd, which refuses them.
    pub max_frame_size: u32,
    /// 1: responses are carried by the kernel too (the response verdict is attached).
    pub carry_responses: u32,
    /// Per API key: the lowest version whose responses kpscd must rewrite (i16::MAX:
    /// none). Requests of lower versions expect responses the kernel may carry.
    pub rewritten_from: [i16; 128],
}

const _: () = assert!(core::mem::size_of::<KernelConfig>() == 24 + 256);

impl Default for KernelConfig {
    /// Carries nothing: no key allowed, nothing direct.
    fn default() -> Self {
        Self {
            kernel_keys: [0; 2],
            max_frame_size: 0,
            carry_responses: 0,
            rewritten_from: [0; 128],
        }
    }
}

impl KernelConfig {
    pub fn allows(&self, api_key: i16) -> bool {
        (0..128).contains(&api_key)
            && self.kernel_keys[(api_key / 64) as usize] & (1u64 << (api_key % 64)) != 0
    }

    /// The expectation for a response to (`api_key`, `api_version`), an allowed request.
    pub fn expectation_kind(&self, api_key: i16, api_version: i16, expects_response: bool) -> u32 {
        if !expects_response {
            EXPECT_ACKS0
        } else if (0..128).contains(&api_key)
            && api_version < self.rewritten_from[(api_key & 127) as usize]
        {
            EXPECT_DIRECT
        } else {
            EXPECT_REWRITE
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, no implicit padding (asserted above).
    unsafe impl aya::Pod for super::ConnSlot {}
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::RequestBatch {}
    unsafe impl aya::Pod for super::Expectation {}
}
