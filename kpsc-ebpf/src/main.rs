//! kpsc's kernel programs.
//!
//! `kpsc_portmap` (module `portmap`) is the portmap data plane.
//!
//! `kpsc_tc_port_counter` is the first stage of the portmap data plane: a TC classifier
//! that recognises IPv4 TCP packets addressed to a mapped listen port and counts them.
//! Invariant: it never changes or drops a packet (always `TC_ACT_PIPE`), so attaching it
//! is safe on any interface; only ports present in `PORT_COUNTERS` are counted.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use kpsc_common::{MAX_MAPPED_PORTS, PortCounters};

/// listen port (host order, as u32) -> counters. Userspace inserts a zeroed entry per
/// mapped port; the program only updates existing entries, so unmapped ports cost one lookup.
#[map(name = "PORT_COUNTERS")]
static PORT_COUNTERS: PerCpuHashMap<u32, PortCounters> =
    PerCpuHashMap::with_max_entries(MAX_MAPPED_PORTS, 0);

mod packet;
mod portmap;

#[classifier]
pub fn kpsc_portmap(ctx: TcContext) -> i32 {
    portmap::run(&ctx)
}

#[classifier]
pub fn kpsc_tc_port_counter(ctx: TcContext) -> i32 {
    count_mapped_port(&ctx);
    TC_ACT_PIPE as i32
}

#[inline(always)]
fn count_mapped_port(ctx: &TcContext) -> Option<()> {
    let packet::Ipv4Tcp { ip, tcp, .. } = packet::ipv4_tcp(ctx)?;
    let port = u16::from_be_bytes(tcp.dest) as u32;
    let counters = PORT_COUNTERS.get_ptr_mut(&port)?;
    // SAFETY: per-CPU value, no concurrent writer on this CPU while we run.
    unsafe {
        (*counters).packets += 1;
        (*counters).bytes += u16::from_be_bytes(ip.tot_len) as u64;
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
