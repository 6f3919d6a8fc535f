//! `kpscd proxy --bulk-transfer sockmap`: the kernel carries a connection's frames between
//! its client and broker sockets. `requests` runs on the client socket's skbs and
//! redirects them to the broker; `responses` runs on the broker socket's skbs and
//! redirects what needs no rewrite to the client. Each passes to kpscd what the kernel
//! may not carry; `stream` is the hand-over between the two, the same in both directions.
//! The maps are shared by both programs and by kpscd (names in kpsc-common).
#![no_std]
#![no_main]

mod requests;
mod responses;
mod stream;

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, RingBuf, SockHash},
};
use kpsc_common::proxy_kernel::{ConnSlot, KernelConfig, MAX_CONNECTIONS, REQUESTS_RING_BYTES};

#[map(name = "PROXY_CLIENTS")]
static CLIENTS: SockHash<u32> = SockHash::with_max_entries(MAX_CONNECTIONS, 0);

#[map(name = "PROXY_BROKERS")]
static BROKERS: SockHash<u32> = SockHash::with_max_entries(MAX_CONNECTIONS, 0);

/// Client socket cookie -> connection slot.
#[map(name = "PROXY_COOKIES")]
static COOKIES: HashMap<u64, u32> = HashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Broker socket cookie -> connection slot.
#[map(name = "PROXY_BCOOKIES")]
static BROKER_COOKIES: HashMap<u64, u32> = HashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map(name = "PROXY_SLOTS")]
static SLOTS: Array<ConnSlot> = Array::with_max_entries(MAX_CONNECTIONS, BPF_F_MMAPABLE);

#[map(name = "PROXY_REQUESTS")]
static REQUESTS: RingBuf = RingBuf::with_byte_size(REQUESTS_RING_BYTES, 0);

#[map(name = "PROXY_CONFIG")]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

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
