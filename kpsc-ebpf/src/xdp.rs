//! The portmap logic in XDP, in the driver's receive path before any sk_buff exists.
//!
//! It translates and sends only what it can finish here: an unfragmented TCP packet (IPv4,
//! or IPv6 with at most the extension headers `packet` walks)
//! whose route is resolved (`bpf_fib_lookup` success, within the egress MTU) and leaves
//! through the interface it came in (XDP_TX) or another interface in PORTMAP_DEVICES
//! (`bpf_redirect_map`). Everything else — non-TCP, fragments, an unresolved neighbour, an
//! egress kpscd did not attach to — is passed up untouched, and the TC program on the same
//! interface handles it as in `--attach tc`. The route is decided before the packet is
//! rewritten, so a passed packet is exactly what arrived. Flow state may already have
//! changed for it (see `portmap`); one corner is lost that way: a RST that ends a
//! half-open flow in XDP and then cannot be sent from XDP finds no flow in TC and is
//! dropped, so the other side's half-open connection times out instead.
//!
//! Checksums are updated incrementally (RFC 1624) in the packet: XDP frames carry full
//! checksums (from a wire, or from a veth peer with checksum offload off), never the
//! CHECKSUM_PARTIAL of a local stack, which only TC can see and handle.
//!
//! Packet access is direct: every pointer is bounds-checked against `data_end` right
//! before use (the verifier requires it), and none is kept across a helper call.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::generated::bpf_fib_lookup,
    macros::map,
    maps::DevMapHash,
    programs::XdpContext,
};
use kpsc_common::{FlowKey, portmap::MAX_DEVICES};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{
    csum,
    frame::{Failed, Frame, Hop, Route, addr_offset, fib_params},
    packet::{Headers, Load, MAX_L4},
};

/// ifindex -> the same interface: where XDP may redirect to (the interfaces kpscd
/// attached to). Filled by userspace.
#[map(name = "PORTMAP_DEVICES")]
static DEVICES: DevMapHash = DevMapHash::with_max_entries(MAX_DEVICES, 0);

/// A pointer to a `T` at `offset` in the frame, if the frame holds it whole.
///
/// `data` and `data_end` are read with volatile loads: plain ones LLVM may hoist into the
/// caller of a non-inlined function (`portmap::parse`) and pass as arguments, and the
/// verifier refuses the zero-extension the callee then applies to `data_end`.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    // SAFETY: `ctx.ctx` is the program's context pointer, valid for the whole run.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

impl Load for XdpContext {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: in bounds (checked just now); read_unaligned as frame data has no
        // alignment guarantee.
        ptr_at::<T>(self, offset).map(|p| unsafe { p.read_unaligned() })
    }
}

impl Frame for XdpContext {
    const PASS: i32 = XDP_PASS as i32;
    const LAST_HOOK: bool = false;
    const DROP: i32 = XDP_DROP as i32;

    #[inline(always)]
    fn headers(&self) -> Option<Headers> {
        crate::packet::tcp(self)
    }

    #[inline(always)]
    fn route(&self, to: &FlowKey, v4: bool, ip_len: u16) -> Route {
        let ingress = self.ingress_ifindex() as u32;
        // tot_len: XDP frames are never GSO, so the helper can check the egress MTU.
        let mut params = fib_params(to, v4, ingress, ip_len);
        // SAFETY: as in TC: a fully initialised bpf_fib_lookup on our stack, its size, and
        // the unmodified context pointer.
        let rc = unsafe {
            bpf_fib_lookup(
                self.ctx as *mut _,
                &mut params,
                core::mem::size_of::<FibParams>() as i32,
                0,
            )
        };
        if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
            return Route::Pass;
        }
        if params.ifindex != ingress && DEVICES.get_ifindex(params.ifindex).is_none() {
            return Route::Pass;
        }
        Route::Send(Hop {
            ifindex: params.ifindex,
            dmac: params.dmac,
            smac: params.smac,
            resolved: true,
        })
    }

    #[inline(always)]
    fn rewrite(&self, l4: usize, v4: bool, old: &FlowKey, new: &FlowKey) -> Result<(), Failed> {
        if l4 > MAX_L4 {
            return Err(Failed);
        }
        let tcp = ptr_at::<TcpHdr>(self, l4).ok_or(Failed)?;
        // The IPv4 header checksum: read here, written at the end through a pointer taken
        // again there (a pointer kept in an Option is merged with null into a scalar the
        // verifier no longer lets us write through).
        let mut ipc = 0u16;
        if v4 {
            let ip = ptr_at::<Ipv4Hdr>(self, EthHdr::LEN).ok_or(Failed)?;
            // SAFETY: inside the frame (checked just now); an unaligned u16 read.
            ipc = unsafe { (core::ptr::addr_of!((*ip).check) as *const u16).read_unaligned() };
        }
        // SAFETY: the headers are inside the frame (checked just now, and each address
        // word below is checked before it is written); u16/u32 fields are accessed
        // unaligned; nothing else touches this frame while the program runs.
        unsafe {
            let tcp_check = core::ptr::addr_of_mut!((*tcp).check) as *mut u16;
            let mut tcpc = tcp_check.read_unaligned();
            // An IPv4 address is word 3 of its mapped form.
            let first = if v4 { 3 } else { 0 };
            for (src, from, to) in [
                (true, &old.src_ip, &new.src_ip),
                (false, &old.dst_ip, &new.dst_ip),
            ] {
                let base = addr_offset(v4, src);
                for i in first..4 {
                    if from[i] != to[i] {
                        let word = ptr_at::<u32>(self, base + 4 * (i - first)).ok_or(Failed)?;
                        ipc = csum::replace4(ipc, from[i], to[i]);
                        tcpc = csum::replace4(tcpc, from[i], to[i]);
                        word.write_unaligned(to[i]);
                    }
                }
            }
            if old.src_port != new.src_port {
                tcpc = csum::replace2(tcpc, old.src_port, new.src_port);
                (core::ptr::addr_of_mut!((*tcp).source) as *mut u16).write_unaligned(new.src_port);
            }
            if old.dst_port != new.dst_port {
                tcpc = csum::replace2(tcpc, old.dst_port, new.dst_port);
                (core::ptr::addr_of_mut!((*tcp).dest) as *mut u16).write_unaligned(new.dst_port);
            }
            tcp_check.write_unaligned(tcpc);
        }
        if v4 {
            let ip = ptr_at::<Ipv4Hdr>(self, EthHdr::LEN).ok_or(Failed)?;
            // SAFETY: inside the frame (checked just now); an unaligned u16 write.
            unsafe { (core::ptr::addr_of_mut!((*ip).check) as *mut u16).write_unaligned(ipc) };
        }
        Ok(())
    }

    #[inline(always)]
    fn send(&self, hop: &Hop) -> Result<i32, Failed> {
        let eth = ptr_at::<[u8; 12]>(self, 0).ok_or(Failed)?;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&hop.dmac);
        macs[6..].copy_from_slice(&hop.smac);
        // SAFETY: the first 12 bytes are inside the frame (checked just now).
        unsafe { eth.write_unaligned(macs) };
        if hop.ifindex == self.ingress_ifindex() as u32 {
            return Ok(XDP_TX as i32);
        }
        DEVICES
            .redirect(hop.ifindex, 0)
            .map(|a| a as i32)
            .map_err(|_| Failed)
    }
}
