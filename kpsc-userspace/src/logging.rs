//! `tracing` set-up: text or JSON lines on stderr, level from the configuration
//! (RUST_LOG, when set, wins so one module can be turned up without a restart flag).
use tracing_subscriber::EnvFilter;

use crate::config::{common::LogConfig, values::LogFormat};

pub fn init(log: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(log.level.directive()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
