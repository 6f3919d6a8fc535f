//! Configuration: kafka-proxy-compatible flags, an optional TOML file with the same keys
//! (a flag's long name with `_` for `-`), and validation. Flags override the file; the file
//! overrides defaults. Each flag is declared once, typed, in the clap struct of the mode
//! that accepts it (`common` for both); the file's schema is derived from that declaration,
//! so a key of the other mode is an error naming the key.
pub mod cli;
pub mod common;
pub mod ctl;
pub mod error;
pub mod file;
pub mod kafka_proxy;
pub mod listener;
pub mod portmap;
pub mod proxy;
pub mod run_as;
pub mod sasl;
pub mod tls;
pub mod upstream_tls;
pub mod values;
