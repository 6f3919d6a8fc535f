//! `kpsc-sockmap-ceiling LISTEN SINK COUNTERS_FILE`: the process of kpsc-bench's `sockmap-ceiling`
//! target (see `kpsc_bench::sockmap_ceiling`). Needs root (CAP_BPF, CAP_NET_ADMIN).

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, sink, counters] = args.as_slice() else {
        anyhow::bail!("usage: kpsc-sockmap-ceiling LISTEN_ADDRESS SINK_ADDRESS COUNTERS_FILE");
    };
    kpsc_bench::sockmap_ceiling::run(listen, sink, counters.into(), Duration::from_millis(200))
}
