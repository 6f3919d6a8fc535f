//! `kpsc-relay-ceiling MODE LISTEN SINK COUNTERS_FILE`: the process of kpsc-bench's
//! `splice-ceiling` (MODE `splice`), `uring-ceiling` (`uring`) and `uring-sqpoll-ceiling`
//! (`uring-sqpoll`) and `uring-recv-send-ceiling` (`uring-recv-send`) targets (see `kpsc_bench::relay_ceiling`). Not a proxy: it knows
//! nothing of Kafka.

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, sink, counters] = args.as_slice() else {
        anyhow::bail!(
            "usage: kpsc-relay-ceiling splice|uring|uring-sqpoll|uring-recv-send LISTEN_ADDRESS SINK_ADDRESS COUNTERS_FILE"
        );
    };
    kpsc_bench::relay_ceiling::run(
        mode.parse()?,
        listen,
        sink,
        counters.into(),
        Duration::from_millis(200),
    )
}
