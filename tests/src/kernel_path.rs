//! What the `--bulk-transfer sockmap` tests read of a running kpscd's kernel path: its
//! counters (what the kernel carried, what kpscd handled itself) and the entries of its
//! connection maps in the kernel (read through the bpf syscalls: needs root).

use std::{collections::BTreeMap, time::Duration};

use aya::maps::{HashMap, Map, MapData, MapInfo, SockHash};
use kpsc_common::proxy_kernel::{BROKER_COOKIES_MAP, BROKERS_MAP, CLIENTS_MAP, COOKIES_MAP};
use kpsc_testkit::{Kpscd, eventually};

/// kpscd's kernel path counters of one direction, over every port.
#[derive(Clone, Copy, Debug)]
pub struct KernelCounters {
    pub redirected_bytes: f64,
    pub redirected_frames: f64,
    pub passed_frames: f64,
}

fn direction_counters(kpscd: &Kpscd, direction: &str) -> KernelCounters {
    let label = format!("direction=\"{direction}\"");
    KernelCounters {
        redirected_bytes: kpscd.metric("kpsc_kernel_redirected_bytes_total", &label),
        redirected_frames: kpscd.metric("kpsc_kernel_redirected_frames_total", &label),
        passed_frames: kpscd.metric("kpsc_kernel_passed_frames_total", &label),
    }
}

/// Client -> broker: requests.
pub fn kernel_counters(kpscd: &Kpscd) -> KernelCounters {
    direction_counters(kpscd, "from_client")
}

/// Broker -> client: responses.
pub fn kernel_response_counters(kpscd: &Kpscd) -> KernelCounters {
    direction_counters(kpscd, "to_client")
}

/// Waits until the kernel has delivered at least `frames` responses (kpscd accounts for
/// them lazily) and returns the response counters.
pub fn kernel_delivered(kpscd: &Kpscd, frames: usize) -> KernelCounters {
    eventually(Duration::from_secs(5), || {
        let k = kernel_response_counters(kpscd);
        anyhow::ensure!(
            k.redirected_frames >= frames as f64,
            "{k:?}, wanted {frames} responses delivered by the kernel"
        );
        Ok(k)
    })
    .unwrap()
}

/// Waits until every one of `frames` requests was accounted as either carried by the
/// kernel or handled by kpscd (exactly once), and returns the counters.
pub fn kernel_accounted(kpscd: &Kpscd, frames: usize) -> KernelCounters {
    eventually(Duration::from_secs(5), || {
        let k = kernel_counters(kpscd);
        anyhow::ensure!(
            k.redirected_frames + k.passed_frames == frames as f64,
            "{k:?}, {frames} requests sent"
        );
        Ok(k)
    })
    .unwrap()
}

/// The kernel memory of the BPF maps a process holds descriptors of (fdinfo's `memlock`:
/// for a SOCKHASH it counts the entries present, for a preallocated map its whole size).
pub fn map_memory(pid: u32) -> u64 {
    process_maps(pid)
        .values()
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// The BPF maps a process holds descriptors of: map id -> fdinfo text (of one of its
/// descriptors, when it holds several).
fn process_maps(pid: u32) -> BTreeMap<u32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|fd| std::fs::read_to_string(fd.unwrap().path()).ok())
        .filter_map(|info| {
            let id = info
                .lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse::<u32>().ok())?;
            Some((id, info))
        })
        .collect()
}

/// Entries of one kpscd's connection maps (PROXY_COOKIES, PROXY_BCOOKIES,
/// PROXY_CLIENTS, PROXY_BROKERS) by name. They are the maps whose fds that process holds (its /proc fdinfo names their
/// ids), so another kpscd on the machine does not count.
pub fn connection_map_entries(pid: u32) -> BTreeMap<String, usize> {
    let mut entries = BTreeMap::new();
    for id in process_maps(pid).into_keys() {
        let name = MapInfo::from_id(id)
            .unwrap()
            .name_as_str()
            .map(str::to_owned);
        let data = || MapData::from_id(id).unwrap();
        let count = match name.as_deref() {
            Some(COOKIES_MAP | BROKER_COOKIES_MAP) => {
                HashMap::<_, u64, u32>::try_from(Map::HashMap(data()))
                    .unwrap()
                    .keys()
                    .map(Result::unwrap)
                    .count()
            }
            Some(CLIENTS_MAP | BROKERS_MAP) => SockHash::<_, u32>::try_from(Map::SockHash(data()))
                .unwrap()
                .keys()
                .map(Result::unwrap)
                .count(),
            _ => continue,
        };
        entries.insert(name.unwrap(), count);
    }
    assert_eq!(
        entries.len(),
        4,
        "kpscd {pid}'s connection maps: {entries:?}"
    );
    entries
}
