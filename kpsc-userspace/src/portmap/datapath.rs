//! The portmap data plane from userspace: load `kpsc_portmap`, pin its maps under
//! `/sys/fs/bpf/kpsc/<instance>/`, attach it to TC ingress, fill and read the maps.
//!
//! Pins outlive the daemon on purpose: `kpscctl maps` reads them without the daemon, and
//! after a crash the next start reuses them, so flows tracked before the crash keep their
//! translation. A clean stop detaches and removes them.

use std::{
    collections::HashSet,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::xdp::DevMapHash,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
        lpm_trie::Key,
    },
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
    util::nr_cpus,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use kpsc_common::{
    Embryo, FlowKey, FlowNat, IcmpStats, Ip, PortTarget, PortmapConfig, PortmapStats, ip_addr,
    ip_bits,
    portmap::{
        ALLOW_MAP, CONFIG_MAP, DEVICES_MAP, EMBRYO_REPLIES_MAP, EMBRYOS_MAP, FLOWS_MAP, ICMP_MAP,
        MAX_SNAT_ADDRESSES, PROGRAM, REPLIES_MAP, SNAT_MAP, STATS_MAP, TARGETS_MAP, XDP_PROGRAM,
    },
};
use tracing::{info, warn};

pub use crate::config::portmap::DEFAULT_PIN_ROOT;
pub use crate::portmap::pin_dir::pin_dir;
use crate::portmap::{
    ebpf::{OBJECT, privilege_hint},
    hook::{Hook, driver},
    instance_lock::InstanceLock,
    pin_dir::{PINNED_MAPS, ensure_bpffs, pins_compatible, remove_pinned_maps, remove_pins},
    targets::KernelTargets,
};

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of `bpf_ktime_get_ns`, which stamps the
/// flows.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The loaded and attached portmap program of one instance.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    interfaces: Vec<String>,
    /// Keeps another daemon out of `pin_dir` until the pins are removed.
    _lock: InstanceLock,
}

impl Datapath {
    /// Loads the program, reusing compatible pinned maps left by an earlier run.
    pub fn load(pin_root: &Path, instance: &str) -> anyhow::Result<Self> {
        ensure_bpffs(pin_root)?;
        let dir = pin_dir(pin_root, instance);
        // Locked before the pins are looked at: pins found afterwards are no live
        // daemon's, so they are an earlier run's.
        let lock = InstanceLock::acquire(&dir)?;
        if PINNED_MAPS.iter().any(|name| dir.join(name).exists()) {
            if pins_compatible(&dir) {
                info!(pins = %dir.display(), "reusing pinned maps from an earlier run");
            } else {
                warn!(pins = %dir.display(), "pinned maps from an incompatible build: replacing them");
                remove_pinned_maps(&dir)
                    .with_context(|| format!("removing the pins in {}", dir.display()))?;
            }
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(OBJECT)
            .map_err(|e| privilege_hint(e.into()))
            .context("loading the eBPF object")?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("program {PROGRAM} missing from the object"))?
            .try_into()?;
        program
            .load()
            .map_err(|e| privilege_hint(e.into()))
            .with_context(|| format!("the kernel refused {PROGRAM}"))?;
        Ok(Self {
            ebpf,
            pin_dir: dir,
            interfaces: Vec::new(),
            _lock: lock,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Gives the program its settings and port map, all or nothing: if the port map is
    /// refused, the previous settings are put back (`set_targets` restores the previous
    /// map itself), so a failed reload leaves the old configuration serving whole.
    pub fn apply(
        &mut self,
        config: PortmapConfig,
        targets: &KernelTargets,
        allow: &[IpNet],
    ) -> anyhow::Result<()> {
        let old = self.config()?;
        let old_allow = self.allowed()?;
        let old_snat = self.snat_table()?;
        self.set_config(config)?;
        // The SNAT table before the ports that point into it; entries a new port map no
        // longer uses stay until it is in place (cleared by the next reload at the latest).
        let applied = self
            .set_allowed(allow)
            .and_then(|()| self.set_snat_table(&targets.snat_table, &old_snat))
            .and_then(|()| self.set_targets(&targets.ports));
        if let Err(e) = applied {
            if let Err(restore) = self.set_snat_table(&old_snat, &[]) {
                warn!(error = %format!("{restore:#}"), "restoring the previous --snat-address table failed too");
            }
            if let Err(restore) = self.set_config(old) {
                warn!(error = %format!("{restore:#}"), "restoring the previous settings failed too");
            }
            if let Err(restore) = self.set_allowed(&old_allow) {
                warn!(error = %format!("{restore:#}"), "restoring the previous --allow-source failed too");
            }
            return Err(e);
        }
        Ok(())
    }

    fn allow_map(&mut self) -> anyhow::Result<LpmTrie<&mut MapData, Ip, u8>> {
        Ok(LpmTrie::try_from(
            self.ebpf.map_mut(ALLOW_MAP).context("allow map missing")?,
        )?)
    }

    /// The networks in PORTMAP_ALLOW.
    fn allowed(&mut self) -> anyhow::Result<Vec<IpNet>> {
        self.allow_map()?
            .keys()
            .map(|k| {
                let k = k.context("reading the kernel's --allow-source networks")?;
                allow_net(&k).context("a bad prefix in the allow map")
            })
            .collect()
    }

    /// Makes PORTMAP_ALLOW exactly `allow` (::/0 when empty: everyone, IPv4 included). New
    /// networks go in before stale ones leave, so a source allowed before and after is
    /// never refused in between.
    fn set_allowed(&mut self, allow: &[IpNet]) -> anyhow::Result<()> {
        let everyone = [IpNet::V6(Ipv6Net::default())];
        let wanted: Vec<IpNet> = if allow.is_empty() {
            everyone.to_vec()
        } else {
            allow.iter().map(IpNet::trunc).collect()
        };
        let stale: Vec<IpNet> = self
            .allowed()?
            .into_iter()
            .filter(|net| !wanted.contains(net))
            .collect();
        let mut map = self.allow_map()?;
        for net in &wanted {
            map.insert(&allow_key(net), 1, 0)
                .with_context(|| format!("adding {net} to the kernel's --allow-source networks"))?;
        }
        for net in &stale {
            map.remove(&allow_key(net)).with_context(|| {
                format!("removing {net} from the kernel's --allow-source networks")
            })?;
        }
        Ok(())
    }

    fn snat_map(&mut self) -> anyhow::Result<Array<&mut MapData, Ip>> {
        Ok(Array::try_from(
            self.ebpf.map_mut(SNAT_MAP).context("SNAT map missing")?,
        )?)
    }

    /// The used part of PORTMAP_SNAT (up to the first empty entry).
    fn snat_table(&mut self) -> anyhow::Result<Vec<Ip>> {
        let map = self.snat_map()?;
        let mut table = Vec::new();
        for i in 0..MAX_SNAT_ADDRESSES {
            let ip = map
                .get(&i, 0)
                .context("reading the kernel's --snat-address table")?;
            if ip == kpsc_common::IP_ANY {
                break;
            }
            table.push(ip);
        }
        Ok(table)
    }

    /// Writes `table` into PORTMAP_SNAT and clears what `old` used beyond it.
    fn set_snat_table(&mut self, table: &[Ip], old: &[Ip]) -> anyhow::Result<()> {
        let mut map = self.snat_map()?;
        let cleared = old.len().saturating_sub(table.len());
        for (i, ip) in table
            .iter()
            .copied()
            .chain(std::iter::repeat_n(kpsc_common::IP_ANY, cleared))
            .enumerate()
        {
            let i = u32::try_from(i).context("--snat-address table index")?;
            map.set(i, ip, 0)
                .context("writing the kernel's --snat-address table")?;
        }
        Ok(())
    }

    fn config(&mut self) -> anyhow::Result<PortmapConfig> {
        let map: Array<_, PortmapConfig> = Array::try_from(
            self.ebpf
                .map_mut(CONFIG_MAP)
                .context("config map missing")?,
        )?;
        map.get(&0, 0).context("reading the program's settings")
    }

    /// Gives the program its settings (PORTMAP_CONFIG).
    fn set_config(&mut self, config: PortmapConfig) -> anyhow::Result<()> {
        let mut map: Array<_, PortmapConfig> = Array::try_from(
            self.ebpf
                .map_mut(CONFIG_MAP)
                .context("config map missing")?,
        )?;
        map.set(0, config, 0)
            .context("writing the program's settings")?;
        Ok(())
    }

    /// Attaches to every interface: TC ingress always (it handles whatever XDP passes up),
    /// then, for `Hook::Xdp`, native XDP in front of it, with the interfaces as the
    /// redirect targets XDP may use.
    pub fn attach(&mut self, interfaces: &[String], hook: Hook) -> anyhow::Result<()> {
        for iface in interfaces {
            self.attach_tc(iface)?;
        }
        if hook == Hook::Xdp {
            self.attach_xdp(interfaces)?;
        }
        Ok(())
    }

    /// Attaches to TC ingress of `iface` (tcx on kernels >= 6.6, clsact before), first
    /// removing a netlink attachment a killed earlier run may have left.
    fn attach_tc(&mut self, iface: &str) -> anyhow::Result<()> {
        // tcx links die with their process; clsact filters do not. Best effort: absent
        // qdiscs or filters are the normal case.
        let _ = tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROGRAM);
        let tcx = aya::util::KernelVersion::current()
            .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
            .unwrap_or(false);
        if !tcx {
            let _ = tc::qdisc_add_clsact(iface);
        }
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROGRAM)
            .context("program missing")?
            .try_into()?;
        program
            .attach(iface, TcAttachType::Ingress)
            .map_err(|e| privilege_hint(e.into()))
            .with_context(|| format!("attaching {PROGRAM} to {iface} ingress"))?;
        info!(interface = iface, "attached {PROGRAM} to TC ingress");
        self.interfaces.push(iface.to_owned());
        Ok(())
    }

    /// Native (driver mode) XDP on every interface, as bpf links: they die with the
    /// process, so a SIGKILL leaves no XDP program behind. Generic (skb) XDP is never
    /// used: it runs after the sk_buff exists and would only add a pass before TC.
    fn attach_xdp(&mut self, interfaces: &[String]) -> anyhow::Result<()> {
        let mut devices: DevMapHash<_> = DevMapHash::try_from(
            self.ebpf
                .map_mut(DEVICES_MAP)
                .context("devices map missing")?,
        )?;
        for iface in interfaces {
            let index = ifindex(iface)?;
            devices
                .insert(index, index, None, 0)
                .with_context(|| format!("adding {iface} to the XDP redirect map"))?;
        }
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .with_context(|| format!("program {XDP_PROGRAM} missing from the object"))?
            .try_into()?;
        program
            .load()
            .map_err(|e| privilege_hint(e.into()))
            .with_context(|| format!("the kernel refused {XDP_PROGRAM}"))?;
        for iface in interfaces {
            program.attach(iface, XdpMode::Driver).map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "--attach xdp: interface {iface} (driver {}) refused native XDP; \
                     use --attach tc",
                    driver(iface)
                ))
            })?;
            let driver = driver(iface);
            info!(interface = iface, %driver, "attached {XDP_PROGRAM} (native XDP) in front of TC");
            if driver == "veth" {
                // Measured: a veth peer's CHECKSUM_PARTIAL segments reach XDP with only the
                // pseudo-header sum, which the receiver then rejects; and a redirected frame
                // is dropped unless the receiving peer runs NAPI.
                warn!(
                    interface = iface,
                    "XDP on a veth: its peer must send full checksums (tx checksum offload \
                     off) and the veths XDP redirects into must have GRO on at their peer, \
                     or translated segments are dropped; --attach tc has neither limit"
                );
            }
        }
        Ok(())
    }

    /// Makes PORTMAP_TARGETS equal `targets` (listen port, target) and gives every port a
    /// counter entry. Flows already tracked keep their translation.
    /// Makes the kernel's port map exactly `targets`, all or nothing: if the kernel
    /// refuses any change, the previous map is put back and the error returned, so a
    /// failed reload leaves the old map serving.
    pub fn set_targets(&mut self, targets: &[(u16, PortTarget)]) -> anyhow::Result<()> {
        let old = self.current_targets()?;
        match self.apply_targets(targets) {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Err(restore) = self.apply_targets(&old) {
                    warn!(error = %format!("{restore:#}"), "restoring the previous port map failed too");
                }
                Err(e)
            }
        }
    }

    fn current_targets(&mut self) -> anyhow::Result<Vec<(u16, PortTarget)>> {
        let map: HashMap<_, u32, PortTarget> = HashMap::try_from(
            self.ebpf
                .map_mut(TARGETS_MAP)
                .context("targets map missing")?,
        )?;
        // A map read only in part would make the restore drop what it missed: fail instead.
        map.iter()
            .map(|entry| {
                let (port, target) = entry.context("reading the kernel's port map")?;
                let port = u16::try_from(port).context("a port outside 0-65535 in the map")?;
                Ok((port, target))
            })
            .collect()
    }

    fn apply_targets(&mut self, targets: &[(u16, PortTarget)]) -> anyhow::Result<()> {
        let wanted: HashSet<u32> = targets.iter().map(|(p, _)| u32::from(*p)).collect();
        let mut map: HashMap<_, u32, PortTarget> = HashMap::try_from(
            self.ebpf
                .map_mut(TARGETS_MAP)
                .context("targets map missing")?,
        )?;
        let stale: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for port in stale {
            map.remove(&port)
                .with_context(|| format!("removing port {port} from the kernel's port map"))?;
        }
        for (port, target) in targets {
            map.insert(u32::from(*port), *target, 0)
                .with_context(|| format!("adding port {port} to the kernel's port map"))?;
        }
        // Counters of ports no longer mapped go too: kept, they would fill the map over
        // reloads until adding a port fails.
        let mut stats: PerCpuHashMap<_, u32, PortmapStats> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(STATS_MAP).context("stats map missing")?)?;
        let stale: Vec<u32> = stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for port in stale {
            stats
                .remove(&port)
                .with_context(|| format!("removing port {port}'s counters"))?;
        }
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        for (port, _) in targets {
            let port = u32::from(*port);
            if stats.get(&port, 0).is_err() {
                let zero = PerCpuValues::try_from(vec![PortmapStats::default(); cpus])?;
                stats
                    .insert(port, zero, 0)
                    .with_context(|| format!("adding port {port}'s counters"))?;
            }
        }
        Ok(())
    }

    /// Detaches, and removes the pins (a clean stop leaves nothing behind).
    pub fn shutdown(self) -> anyhow::Result<()> {
        let dir = self.pin_dir.clone();
        let interfaces = self.interfaces.clone();
        drop(self.ebpf); // closes the tcx links: detached
        for iface in &interfaces {
            let _ = tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROGRAM);
        }
        remove_pins(&dir).with_context(|| format!("removing pins in {}", dir.display()))?;
        info!(pins = %dir.display(), "detached and unpinned");
        Ok(())
    }
}

/// The allow map's key for `net`: IPv4 networks as their IPv4-mapped form (::ffff:0:0/96
/// plus their prefix), as the program looks up every source as an `Ip`.
fn allow_key(net: &IpNet) -> Key<Ip> {
    let extra = if matches!(net, IpNet::V4(_)) { 96 } else { 0 };
    Key::new(u32::from(net.prefix_len()) + extra, ip_bits(net.network()))
}

/// The network an allow map key stands for (inverse of `allow_key`).
fn allow_net(key: &Key<Ip>) -> anyhow::Result<IpNet> {
    let len = u8::try_from(key.prefix_len()).context("prefix longer than 255")?;
    Ok(match ip_addr(&key.data()) {
        IpAddr::V4(v4) if len >= 96 => IpNet::V4(Ipv4Net::new(v4, len - 96)?),
        IpAddr::V4(v4) => IpNet::V6(Ipv6Net::new(v4.to_ipv6_mapped(), len)?),
        IpAddr::V6(v6) => IpNet::V6(Ipv6Net::new(v6, len)?),
    })
}

fn ifindex(iface: &str) -> anyhow::Result<u32> {
    let name =
        std::ffi::CString::new(iface).with_context(|| format!("interface name {iface:?}"))?;
    // SAFETY: a NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()).with_context(|| format!("no interface {iface}")),
        index => Ok(index),
    }
}

/// Read-only view of an instance's pinned maps: what `kpscctl maps` and the metrics read.
pub struct PinnedMaps {
    targets: HashMap<MapData, u32, PortTarget>,
    // LRU hash maps (half-open flows) are read through aya's HashMap.
    flows: HashMap<MapData, FlowKey, FlowNat>,
    replies: HashMap<MapData, FlowKey, FlowNat>,
    embryos: HashMap<MapData, FlowKey, Embryo>,
    embryo_replies: HashMap<MapData, FlowKey, FlowNat>,
    stats: PerCpuHashMap<MapData, u32, PortmapStats>,
    /// Absent in pins of a build before `--snat-address`.
    snat: Option<Array<MapData, Ip>>,
    /// Absent in pins of a build before the ICMP counters.
    icmp: Option<PerCpuArray<MapData, IcmpStats>>,
}

/// Where a tracked flow is in its life, from the FIN/RST bits of both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    Open,
    /// One side sent FIN.
    Closing,
    /// Both sides sent FIN, or a RST went through.
    Closed,
}

impl FlowState {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowState::Open => "open",
            FlowState::Closing => "closing",
            FlowState::Closed => "closed",
        }
    }
}

fn open_pin(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        privilege_hint(anyhow::Error::new(e))
            .context(format!("cannot open pinned map {}", path.display()))
    })?;
    Ok(Map::from_map_data(data)?)
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !dir.exists() {
            bail!(
                "no pinned portmap maps at {} (is `kpscd portmap` running with this --instance?)",
                dir.display()
            );
        }
        Ok(Self {
            targets: HashMap::try_from(open_pin(dir, TARGETS_MAP)?)?,
            flows: HashMap::try_from(open_pin(dir, FLOWS_MAP)?)?,
            replies: HashMap::try_from(open_pin(dir, REPLIES_MAP)?)?,
            embryos: HashMap::try_from(open_pin(dir, EMBRYOS_MAP)?)?,
            embryo_replies: HashMap::try_from(open_pin(dir, EMBRYO_REPLIES_MAP)?)?,
            stats: PerCpuHashMap::try_from(open_pin(dir, STATS_MAP)?)?,
            snat: match dir.join(SNAT_MAP).exists() {
                true => Some(Array::try_from(open_pin(dir, SNAT_MAP)?)?),
                false => None,
            },
            icmp: match dir.join(ICMP_MAP).exists() {
                true => Some(PerCpuArray::try_from(open_pin(dir, ICMP_MAP)?)?),
                false => None,
            },
        })
    }

    /// Every translated source address of `target`: its `snat_ip`, then its
    /// `--snat-address` entries.
    pub fn snat_addresses(&self, target: &PortTarget) -> Vec<IpAddr> {
        let mut all = vec![ip_addr(&target.snat_ip)];
        if let Some(table) = &self.snat {
            let first = u32::from(target.snat_first);
            all.extend(
                (first..first + u32::from(target.snat_extra))
                    .filter_map(|i| table.get(&i, 0).ok())
                    .map(|ip| ip_addr(&ip)),
            );
        }
        all
    }

    /// ICMP errors about tracked flows, all ports and CPUs together (zero when the pins
    /// predate the counter).
    pub fn icmp(&self) -> IcmpStats {
        self.icmp
            .as_ref()
            .and_then(|m| m.get(&0, 0).ok())
            .map(|per_cpu| IcmpStats::sum(per_cpu.iter()))
            .unwrap_or_default()
    }

    pub fn targets(&self) -> Vec<(u16, PortTarget)> {
        let mut v: Vec<(u16, PortTarget)> = self
            .targets
            .iter()
            .filter_map(Result::ok)
            .map(|(p, t)| (p as u16, t))
            .collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }

    pub fn stats(&self, port: u16) -> PortmapStats {
        self.stats
            .get(&u32::from(port), 0)
            .map(|per_cpu| PortmapStats::sum(per_cpu.iter()))
            .unwrap_or_default()
    }

    /// Established flows.
    pub fn flows(&self) -> Vec<(FlowKey, FlowNat)> {
        self.flows.iter().filter_map(Result::ok).collect()
    }

    /// Half-open flows (a SYN went through, the handshake has not completed), by client
    /// tuple.
    pub fn embryos(&self) -> Vec<(FlowKey, Embryo)> {
        self.embryos.iter().filter_map(Result::ok).collect()
    }

    /// Reply sides of established flows: broker->node tuple -> node->client.
    pub fn established_replies(&self) -> Vec<(FlowKey, FlowNat)> {
        self.replies.iter().filter_map(Result::ok).collect()
    }

    /// Reply sides of half-open flows: broker->node tuple -> node->client.
    pub fn half_open_replies(&self) -> Vec<(FlowKey, FlowNat)> {
        self.embryo_replies.iter().filter_map(Result::ok).collect()
    }

    /// CLOCK_MONOTONIC nanoseconds of a flow's last packet either way (to the second).
    pub fn last_activity_ns(&self, flow: &FlowNat) -> u64 {
        let reply = self
            .replies
            .get(&flow.translated.reversed(), 0)
            .map_or(0, |r| r.last_ns);
        flow.last_ns.max(reply)
    }

    /// State of a flow from both directions' entries (`FlowNat::closed`). A flow whose
    /// reply entry is gone can carry no more replies: closed.
    pub fn flow_state(&self, flow: &FlowNat) -> FlowState {
        let Ok(reply) = self.replies.get(&flow.translated.reversed(), 0) else {
            return FlowState::Closed;
        };
        if flow.closed(&reply) {
            FlowState::Closed
        } else if flow.fin | reply.fin != 0 {
            FlowState::Closing
        } else {
            FlowState::Open
        }
    }

    /// Forgets a flow in both directions if it is still the one `snapshot` (read from
    /// FLOWS[key] earlier) describes: a tuple that a new connection reused since keeps its
    /// new entries, and a reply entry is removed only if it points back at `key`. Returns
    /// whether the flow was removed. (The re-read and the delete are two system calls: a
    /// reuse in the microseconds between them is not caught; the sweep of orphaned reply
    /// entries cleans up after it.)
    pub fn remove_flow(&mut self, key: &FlowKey, snapshot: &FlowNat) -> bool {
        match self.flows.get(key, 0) {
            Ok(current) if current == *snapshot => {}
            _ => return false,
        }
        let _ = self.flows.remove(key);
        let reply_key = snapshot.translated.reversed();
        if self
            .replies
            .get(&reply_key, 0)
            .is_ok_and(|r| r.translated == key.reversed())
        {
            let _ = self.replies.remove(&reply_key);
        }
        true
    }

    /// Removes reply entries whose flow entry is gone or belongs to another tuple, silent
    /// (no packet either way, to the second) for `grace`: a promotion inserts the reply
    /// entry a moment before the flow entry, and stamps it. Returns how many went.
    pub fn remove_orphaned_replies(&mut self, now_ns: u64, grace_ns: u64) -> usize {
        let mut removed = 0;
        for (reply_key, back) in self.established_replies() {
            let client = back.translated.reversed();
            let owned = self
                .flows
                .get(&client, 0)
                .is_ok_and(|f| f.translated == reply_key.reversed());
            if owned || now_ns.saturating_sub(back.last_ns) < grace_ns {
                continue;
            }
            // Re-read: a promotion that reused the tuple since the walk is not an orphan.
            if self.replies.get(&reply_key, 0).is_ok_and(|r| r == back) {
                let _ = self.replies.remove(&reply_key);
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_keys_round_trip_both_families() {
        for text in [
            "198.18.0.0/15",
            "0.0.0.0/0",
            "2001:2::/48",
            "::/0",
            "10.1.2.3/32",
        ] {
            let net: IpNet = text.parse().unwrap();
            let key = allow_key(&net);
            assert_eq!(allow_net(&key).unwrap(), net, "{text}");
        }
        assert_eq!(
            allow_key(&"198.18.0.0/15".parse().unwrap()).prefix_len(),
            96 + 15
        );
    }
}
