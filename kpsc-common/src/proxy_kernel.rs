//! `kpscd proxy --bulk-transfer sockmap`: what the request verdict (kpsc-ebpf's
//! `kpsc-proxy` object) and kpscd share. The verdict redirects a client's requests to its
//! broker socket in the kernel and reports the head of every frame it redirected; kpscd
//! handles what the verdict passes up. The protocol between them is described where it is
//! enforced, in kpsc-userspace's `proxy::bulk::sockmap`.

/// The verdict, attached to CLIENTS_MAP.
pub const VERDICT: &str = "kpsc_proxy_requests";
/// Client sockets (SOCKHASH, key: connection slot). The verdict runs on their skbs.
pub const CLIENTS_MAP: &str = "PROXY_CLIENTS";
/// Broker sockets (SOCKHASH, key: connection slot): redirect targets only, so their
/// responses keep flowing through kpscd's ordinary (splice) path.
pub const BROKERS_MAP: &str = "PROXY_BROKERS";
/// Client socket cookie -> connection slot.
pub const COOKIES_MAP: &str = "PROXY_COOKIES";
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

/// One connection's state. The first block is written by the verdict only, the last by
/// kpscd only; each side reads the other's with acquire/release ordering (kpscd through
/// the mmap, the verdict through plain loads of a value the kernel's own locks order).
/// Offsets count the client's bytes from the first one the verdict could see.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSlot {
    /// Stream offset of the next skb: bytes the verdict has taken so far.
    pub seen: u64,
    /// Bytes of skbs redirected to the broker socket.
    pub redirected_bytes: u64,
    /// Frames whose head the verdict redirected (and reported).
    pub redirected_frames: u64,
    /// Where the current stretch passed to kpscd begins.
    pub pass_from: u64,
    /// `redirected_frames` when that stretch began: kpscd must have taken that many
    /// reported frames before it handles the first passed one.
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
    /// Written by kpscd: copied into every record, so a late record of a slot's previous
    /// connection is recognised.
    pub generation: u32,
    pub _pad: u32,
    /// Written by kpscd: the offset of a frame boundary up to which it has written every
    /// passed byte to the broker. An skb starting exactly there goes back to the kernel.
    pub resume_at: u64,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<ConnSlot>() == 80);
    assert!(offset_of!(ConnSlot, frame_left) == 48);
    assert!(offset_of!(ConnSlot, generation) == 64);
    assert!(offset_of!(ConnSlot, resume_at) == 72);
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
    pub frames: [RequestHead; FRAMES_PER_BATCH],
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<RequestHead>() == 16);
    assert!(size_of::<RequestBatch>() == 16 + 16 * FRAMES_PER_BATCH);
};

/// Set once by kpscd before any socket enters the maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// Bit k set: requests with API key k may be redirected. Every other key (ApiVersions,
    /// SASL, `--forbidden-api-keys`, keys >= 128) goes to kpscd.
    pub kernel_keys: [u64; 2],
    /// `--max-frame-size`: larger (and malformed) frames go to kpscd, which refuses them.
    pub max_frame_size: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<KernelConfig>() == 24);

impl KernelConfig {
    pub fn allows(&self, api_key: i16) -> bool {
        (0..128).contains(&api_key)
            && self.kernel_keys[(api_key / 64) as usize] & (1u64 << (api_key % 64)) != 0
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, no implicit padding (asserted above).
    unsafe impl aya::Pod for super::ConnSlot {}
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::RequestBatch {}
}
