//! kpscctl's command line, in the library so that the man pages are made from the same
//! declaration the binary parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::portmap::DEFAULT_PIN_ROOT;

#[derive(Parser, Debug)]
#[command(name = "kpscctl", version, about = "Inspect a running kpscd")]
pub struct CtlCli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the live port map: listen address, broker, advertised address, connections, bytes.
    ///
    /// For `kpscd portmap` it reads the kernel's pinned maps directly (port map, per-port
    /// counters, live flows), so it works even when the daemon is busy or gone; for `kpscd
    /// proxy` it asks the daemon's admin endpoint.
    Maps {
        /// kpscd's admin address (--http-listen-address); forces the admin endpoint.
        #[arg(long, env = "KPSC_ADMIN")]
        admin: Option<String>,
        /// Portmap instance whose pinned maps to read.
        #[arg(long, default_value = "default")]
        instance: String,
        /// bpffs directory of the pins.
        #[arg(long = "pin-root", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every N seconds (default 1), like top. Ctrl-C stops.
        #[arg(long, num_args = 0..=1, default_missing_value = "1", value_name = "SECS")]
        watch: Option<f64>,
    },
}
