//! The portmap logic on TC ingress: every packet, GSO and CHECKSUM_PARTIAL ones included.
//!
//! No pointer into packet data is ever held. Headers are copied out with
//! `bpf_skb_load_bytes` (`TcContext::load`) and every write is a helper
//! (`bpf_skb_store_bytes`, `bpf_l3/l4_csum_replace`) that checks its offset at run time.
//! Those helpers may unclone or reallocate the packet, which would invalidate direct packet
//! pointers; with none held, the verifier needs no `data_end` checks. The offsets stay
//! valid across them: nothing here changes the packet's length or header layout. The
//! checksum helpers also handle CHECKSUM_PARTIAL packets from a local stack.
//!
//! Packets go out with `bpf_fib_lookup` + `bpf_redirect` (or `bpf_redirect_neigh` when the
//! neighbour is not resolved yet), bypassing the input path, which would drop a forwarded
//! packet whose new source is the node's own address.

use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT,
        TC_ACT_UNSPEC, bpf_fib_lookup as FibParams,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use kpsc_common::FlowKey;
use network_types::eth::EthHdr;

use crate::{
    frame::{Failed, Frame, Hop, Route, addr_offset, fib_params},
    packet::{Headers, Load},
};

/// The IPv4 header checksum (IPv6 has none).
const IP_CSUM_OFF: usize = EthHdr::LEN + 10;

impl Load for TcContext {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        TcContext::load(self, offset).ok()
    }
}

impl Frame for TcContext {
    /// Not ours: TC_ACT_UNSPEC lets whatever is attached after us see the packet. kpscd
    /// attaches with tcx on kernels >= 6.6 (aya's choice), where UNSPEC is TCX_NEXT: the
    /// next tcx program, then the clsact filters, then the stack; TC_ACT_OK would end the
    /// chain there. With netlink cls_bpf (older kernels, direct-action) UNSPEC likewise
    /// continues with the next filter and, after the last, passes the packet on.
    const PASS: i32 = TC_ACT_UNSPEC;
    const LAST_HOOK: bool = true;
    const DROP: i32 = TC_ACT_SHOT as i32;

    #[inline(always)]
    fn headers(&self) -> Option<Headers> {
        crate::packet::tcp(self)
    }

    #[inline(always)]
    fn route(&self, to: &FlowKey, v4: bool, _ip_len: u16) -> Route {
        // SAFETY: `self.skb.skb` is the program's context pointer, valid for the whole
        // run; the verifier turns this constant-offset field load into a read of the
        // real sk_buff.
        let ifindex = unsafe { (*self.skb.skb).ifindex };
        // tot_len 0: the kernel checks the skb against the egress MTU itself, which
        // handles GSO packets (a non-zero tot_len of a GSO packet fails with FRAG_NEEDED).
        let mut params = fib_params(to, v4, ifindex, 0);
        // SAFETY: `params` is a fully initialised bpf_fib_lookup on our stack and its size
        // is passed; the helper writes its result back into it. The first argument is the
        // unmodified context pointer, as the verifier requires.
        let rc = unsafe {
            bpf_fib_lookup(
                self.skb.skb as *mut _,
                &mut params,
                core::mem::size_of::<FibParams>() as i32,
                0,
            )
        };
        let resolved = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
        if !resolved && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
            return Route::NoRoute;
        }
        Route::Send(Hop {
            ifindex: params.ifindex,
            dmac: params.dmac,
            smac: params.smac,
            resolved,
        })
    }

    /// Each checksum update takes the old and new values explicitly, so it does not matter
    /// that the field is stored after. Only the address words that change are touched:
    /// an IPv4 address is word 3 of its mapped form.
    #[inline(always)]
    fn rewrite(&self, l4: usize, v4: bool, old: &FlowKey, new: &FlowKey) -> Result<(), Failed> {
        let tcp_csum = l4 + 16;
        let pseudo = u64::from(BPF_F_PSEUDO_HDR);
        let ok = |r: Result<(), i64>| r.map_err(|_| Failed);
        let first = if v4 { 3 } else { 0 };
        for (src, from, to) in [
            (true, &old.src_ip, &new.src_ip),
            (false, &old.dst_ip, &new.dst_ip),
        ] {
            let base = addr_offset(v4, src);
            for i in first..4 {
                if from[i] != to[i] {
                    let (o, n) = (u64::from(from[i]), u64::from(to[i]));
                    ok(self.l4_csum_replace(tcp_csum, o, n, pseudo | 4))?;
                    if v4 {
                        ok(self.l3_csum_replace(IP_CSUM_OFF, o, n, 4))?;
                    }
                    ok(self.store(base + 4 * (i - first), &to[i], 0))?;
                }
            }
        }
        if old.src_port != new.src_port {
            let (o, n) = (u64::from(old.src_port), u64::from(new.src_port));
            ok(self.l4_csum_replace(tcp_csum, o, n, 2))?;
            ok(self.store(l4, &new.src_port, 0))?;
        }
        if old.dst_port != new.dst_port {
            let (o, n) = (u64::from(old.dst_port), u64::from(new.dst_port));
            ok(self.l4_csum_replace(tcp_csum, o, n, 2))?;
            ok(self.store(l4 + 2, &new.dst_port, 0))?;
        }
        Ok(())
    }

    #[inline(always)]
    fn send(&self, hop: &Hop) -> Result<i32, Failed> {
        if !hop.resolved {
            // The kernel resolves the neighbour and sends the packet when it can.
            // SAFETY: null params with length 0 are allowed: the helper then looks up the
            // next hop from the packet's own IP header.
            return Ok(
                unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) } as i32,
            );
        }
        if self.store(0, &hop.dmac, 0).is_err() || self.store(6, &hop.smac, 0).is_err() {
            return Err(Failed);
        }
        // SAFETY: helper without memory arguments; the redirect happens after we return.
        Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as i32)
    }
}
