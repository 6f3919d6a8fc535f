//! An instance's pin directory, `<pin-root>/<instance>/` on bpffs: mounting bpffs where a
//! distribution does not, which maps are pinned there, whether pins an earlier run left
//! can be reused (same types and sizes), and removing them.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, MapType, lpm_trie::Key};
use kpsc_common::{
    Embryo, FlowKey, FlowNat, IcmpStats, Ip, PortTarget, PortmapConfig, PortmapStats, SourceBudget,
    portmap::{
        ALLOW_MAP, CONFIG_MAP, EMBRYO_REPLIES_MAP, EMBRYOS_MAP, FLOWS_MAP, ICMP_MAP, REPLIES_MAP,
        SNAT_MAP, SOURCES_MAP, STATS_MAP, TARGETS_MAP,
    },
};
use tracing::info;

const BPFFS: &str = "/sys/fs/bpf";

/// Where one instance's maps are pinned.
pub fn pin_dir(pin_root: &Path, instance: &str) -> PathBuf {
    pin_root.join(instance)
}

fn is_bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf "))
        })
        .unwrap_or(false)
}

/// Mounts bpffs on /sys/fs/bpf when it is not (many distributions do not mount it by default).
pub fn ensure_bpffs(pin_root: &Path) -> anyhow::Result<()> {
    if pin_root.starts_with(BPFFS) && !is_bpffs_mounted() {
        info!("mounting bpffs on {BPFFS}");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS])
            .status()
            .context("running mount -t bpf")?;
        if !status.success() {
            bail!("cannot mount bpffs on {BPFFS} (mount -t bpf bpf {BPFFS} failed: {status})");
        }
    }
    std::fs::create_dir_all(pin_root)
        .with_context(|| format!("cannot create {}", pin_root.display()))
}

/// Names of every pinned map, for cleanup.
pub const PINNED_MAPS: [&str; 11] = [
    SNAT_MAP,
    ICMP_MAP,
    TARGETS_MAP,
    FLOWS_MAP,
    REPLIES_MAP,
    EMBRYOS_MAP,
    EMBRYO_REPLIES_MAP,
    SOURCES_MAP,
    CONFIG_MAP,
    STATS_MAP,
    ALLOW_MAP,
];

/// The pinned maps only: the directory stays, as the instance lock is held on it.
pub fn remove_pinned_maps(dir: &Path) -> io::Result<()> {
    for name in PINNED_MAPS {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

pub fn remove_pins(dir: &Path) -> io::Result<()> {
    remove_pinned_maps(dir)?;
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Types and sizes the program expects: a pin that differs is from an incompatible build.
pub fn pins_compatible(dir: &Path) -> bool {
    let flow = (size_of::<FlowKey>(), size_of::<FlowNat>());
    let expected = [
        (
            TARGETS_MAP,
            MapType::Hash,
            (size_of::<u32>(), size_of::<PortTarget>()),
        ),
        (FLOWS_MAP, MapType::Hash, flow),
        (REPLIES_MAP, MapType::Hash, flow),
        (
            EMBRYOS_MAP,
            MapType::LruHash,
            (size_of::<FlowKey>(), size_of::<Embryo>()),
        ),
        (EMBRYO_REPLIES_MAP, MapType::LruHash, flow),
        (
            SOURCES_MAP,
            MapType::LruHash,
            (size_of::<Ip>(), size_of::<SourceBudget>()),
        ),
        (
            CONFIG_MAP,
            MapType::Array,
            (size_of::<u32>(), size_of::<PortmapConfig>()),
        ),
        (
            STATS_MAP,
            MapType::PerCpuHash,
            (size_of::<u32>(), size_of::<PortmapStats>()),
        ),
        (
            ALLOW_MAP,
            MapType::LpmTrie,
            (size_of::<Key<Ip>>(), size_of::<u8>()),
        ),
    ];
    // Maps that every start fills afresh, or counters, may be missing (a build before
    // they existed): the loader creates them next to the reused flow state, so an upgrade
    // keeps its live flows; nothing in them is worth keeping, so only their type and sizes
    // are checked.
    let refilled = [
        (
            SNAT_MAP,
            MapType::Array,
            (size_of::<u32>(), size_of::<Ip>()),
        ),
        (
            ICMP_MAP,
            MapType::PerCpuArray,
            (size_of::<u32>(), size_of::<IcmpStats>()),
        ),
    ];
    // A flow-state pin missing while others exist (an older build had fewer maps): start
    // afresh.
    let present = expected
        .iter()
        .filter(|(name, ..)| dir.join(name).exists())
        .count();
    if present != 0 && present != expected.len() {
        return false;
    }
    expected
        .iter()
        .chain(&refilled)
        .all(|(name, map_type, (key, value))| {
            let path = dir.join(name);
            if !path.exists() {
                return true;
            }
            MapData::from_pin(&path)
                .and_then(|m| m.info())
                .map(|info| {
                    info.map_type().is_ok_and(|t| t == *map_type)
                        && info.key_size() as usize == *key
                        && info.value_size() as usize == *value
                })
                .unwrap_or(false)
        })
}
