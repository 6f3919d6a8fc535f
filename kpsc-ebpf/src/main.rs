//! kpsc's kernel programs.
//!
//! `kpsc_portmap` (module `portmap`) is the portmap data plane: per-port DNAT/SNAT to the
//! brokers on TC ingress. `packet` parses the headers it needs.
#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};

mod packet;
mod portmap;

#[classifier]
pub fn kpsc_portmap(ctx: TcContext) -> i32 {
    portmap::run(&ctx)
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
