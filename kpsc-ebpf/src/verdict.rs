//! What the portmap logic decides for a packet (`Verdict`), and why it drops one
//! (`DropReason`, which picks the counter).

use kpsc_common::FlowKey;

/// Why a packet was dropped: picks the `PortmapStats` counter.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    NoPort,
    NoRoute,
    Rewrite,
    SourceLimit,
    TableFull,
    Handshake,
    Race,
    SourceDenied,
}

/// What a stage decided.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Not decided (yet): not ours unless a later stage says otherwise.
    Pass,
    /// Ours to pass on: a non-SYN packet to a mapped port of no known flow (counted).
    PassUnknownFlow,
    /// Translate the packet to `translated` and send it.
    Send,
    /// Drop it, counted against the listen port as `why`.
    Drop,
}

/// What the flow logic decided for a packet. A plain struct, not an enum with data: it
/// crosses BPF function boundaries, whose types go into the object's BTF, and the kernel
/// refuses the BTF of Rust enums that carry data.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: Action,
    pub why: DropReason,
    /// Client -> broker (else broker -> client): which counters.
    pub inbound: bool,
    pub listen_port: u16,
    pub translated: FlowKey,
}

impl Verdict {
    pub const PASS: Verdict = Verdict {
        action: Action::Pass,
        why: DropReason::NoPort,
        inbound: false,
        listen_port: 0,
        translated: FlowKey {
            src_ip: [0; 4],
            dst_ip: [0; 4],
            src_port: 0,
            dst_port: 0,
        },
    };

    /// Client -> broker, to `listen_port`.
    #[inline(always)]
    pub fn to_broker(listen_port: u16, translated: &FlowKey) -> Verdict {
        Verdict {
            action: Action::Send,
            inbound: true,
            listen_port,
            translated: *translated,
            ..Verdict::PASS
        }
    }

    /// Broker -> client.
    #[inline(always)]
    pub fn to_client(translated: &FlowKey) -> Verdict {
        Verdict {
            action: Action::Send,
            listen_port: u16::from_be(translated.src_port),
            translated: *translated,
            ..Verdict::PASS
        }
    }

    #[inline(always)]
    pub fn drop(listen_port: u16, why: DropReason) -> Verdict {
        Verdict {
            action: Action::Drop,
            why,
            listen_port,
            ..Verdict::PASS
        }
    }

    #[inline(always)]
    pub fn undecided(&self) -> bool {
        self.action == Action::Pass
    }
}
