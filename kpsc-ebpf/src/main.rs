//! kpsc's kernel programs.
//!
//! The portmap data plane (per-port DNAT/SNAT to the brokers) is `portmap`, run by two
//! thin entry points: `kpsc_portmap` on TC ingress (`tc`) and `kpsc_portmap_xdp` in XDP
//! (`xdp`), which hands TC what it cannot finish. `frame` is what the logic needs from
//! either; `packet` parses the headers; `verdict` is what the logic decides. On TC, what
//! the portmap leaves alone goes on to `icmp`, which translates ICMP errors about its
//! flows; `csum` updates checksums the program computes itself.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

mod csum;
mod frame;
mod icmp;
mod packet;
mod portmap;
mod tc;
mod verdict;
mod xdp;

#[classifier]
pub fn kpsc_portmap(ctx: TcContext) -> i32 {
    match portmap::run(&ctx) {
        // Not a TCP packet of ours: it may be an ICMP error about one.
        TC_ACT_UNSPEC => icmp::run(&ctx),
        verdict => verdict,
    }
}

#[xdp]
pub fn kpsc_portmap_xdp(ctx: XdpContext) -> u32 {
    portmap::run(&ctx) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: `license` is the section the loader reads the program's license from (a C
// string); LICENSE is the only symbol of that name.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
