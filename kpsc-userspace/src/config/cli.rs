//! kpscd's command line: one subcommand per mode, each taking that mode's flags. In the
//! library so that the fuzz targets parse exactly what the daemon parses.

use clap::{Parser, Subcommand};

use crate::config::{portmap::PortmapArgs, proxy::ProxyArgs};

/// kpsc: one private endpoint for a self-hosted Kafka cluster, one port per broker.
#[derive(Parser, Debug)]
#[command(name = "kpscd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Subcommand, Debug)]
pub enum Mode {
    /// Userspace proxy that rewrites broker addresses in responses (kafka-proxy's flags).
    #[command(visible_alias = "server")]
    Proxy(Box<ProxyArgs>),
    /// eBPF TC data plane: each listen port DNAT/SNATed to its broker in the kernel.
    Portmap(Box<PortmapArgs>),
}
