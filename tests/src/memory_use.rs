//! Memory as a test reads it: a process's (VmRSS, VmHWM from /proc/PID/status) and the
//! kernel's that no process is charged with (slab, TCP socket buffers), which a kernel
//! data path moves memory into.

/// A `/proc/PID/status` field given in kB (e.g. "VmRSS:"), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    kib_field(&status, field).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A `/proc/meminfo` field (e.g. "Slab:"), in bytes.
pub fn meminfo_bytes(field: &str) -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    kib_field(&meminfo, field).unwrap_or_else(|| panic!("no {field} in /proc/meminfo"))
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// The machine's TCP sockets (`/proc/net/sockstat`'s TCP line, whole network namespace).
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpSockets {
    pub in_use: u64,
    pub time_wait: u64,
    /// Bytes of socket buffers (the kernel counts pages).
    pub buffer_bytes: u64,
}

pub fn tcp_sockets() -> TcpSockets {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let line = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .expect("a TCP line in /proc/net/sockstat");
    // "inuse 33 orphan 0 tw 655 alloc 33 mem 222": name, value pairs.
    let words: Vec<&str> = line.split_whitespace().collect();
    let value = |name: &str| {
        words
            .chunks(2)
            .find(|pair| pair[0] == name)
            .and_then(|pair| pair.get(1)?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/net/sockstat's TCP line: {line}"))
    };
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    TcpSockets {
        in_use: value("inuse"),
        time_wait: value("tw"),
        buffer_bytes: value("mem") * page,
    }
}

/// How many descriptors a process holds: a socket it failed to close would keep its
/// kernel memory.
pub fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"))
        .count()
}
