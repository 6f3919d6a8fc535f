#![no_main]
//! Configuration (`kpsc::config`): an arbitrary command line through kpscd's parser
//! (`config::cli`), its unsupported-flag check and `ProxyConfig::resolve` /
//! `PortmapConfig::resolve`, with an arbitrary TOML file as `--config`; the file also
//! through `file::load` for both modes.
//! Checked:
//! - an error names the refused flag: one the mode declares, `--config`, or a kafka-proxy
//!   flag kpsc lists as unsupported (what exit code 2 reports to the operator);
//! - the file loads only if it is a TOML table whose keys all belong to the mode, and a
//!   refusal of an unknown key names that key;
//! - a resolved configuration holds what the daemon relies on (a mapping, a frame limit of
//!   at least 1 KiB, a positive refresh interval, paths starting with `/`, a valid port
//!   map, portmap's interface and entries, none between IP families) and resolving again
//!   gives the same.
//!
//! Only the fuzzed file is ever read: `--config` always names it (or nothing).

use std::{ffi::OsString, fmt::Debug, os::unix::ffi::OsStringExt, path::Path, sync::OnceLock};

use clap::Parser as _;
use kpsc::{
    config::{
        cli::{Cli, Mode},
        error::ConfigError,
        file,
        kafka_proxy::{UNSUPPORTED_KAFKA_PROXY_FLAGS, reject_unsupported_flags},
        portmap::{PortmapArgs, PortmapConfig},
        proxy::{ProxyArgs, ProxyConfig},
    },
    mapping::map::DynamicPorts,
};
use kpsc_fuzz::ConfigInput;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    let input = ConfigInput::parse(data);
    let config = input.file.map(|text| {
        let path = config_path();
        std::fs::write(path, text).unwrap();
        check_file::<ProxyArgs>(path, text);
        check_file::<PortmapArgs>(path, text);
        path.to_path_buf()
    });

    let lossy: Vec<String> = input
        .args
        .iter()
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    if let Err(e) = reject_unsupported_flags(&lossy) {
        assert!(
            UNSUPPORTED_KAFKA_PROXY_FLAGS
                .iter()
                .any(|(flag, _)| e.flag == format!("--{flag}")),
            "{e}"
        );
        return;
    }
    let argv = std::iter::once(OsString::from("kpscd")).chain(
        input
            .args
            .iter()
            .map(|arg| OsString::from_vec(arg.to_vec())),
    );
    let Ok(cli) = Cli::try_parse_from(argv) else {
        return;
    };
    match cli.mode {
        Mode::Proxy(mut args) => {
            args.common.config = config;
            check_proxy(*args);
        }
        Mode::Portmap(mut args) => {
            args.common.config = config;
            check_portmap(*args);
        }
    }
});

/// This process's file for `--config`.
fn config_path() -> &'static Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("kpsc-fuzz-config-{}.toml", std::process::id()))
    })
}

fn check_file<A: clap::Args + DeserializeOwned + Default>(path: &Path, text: &[u8]) {
    let keys = file::keys::<A>();
    let table = std::str::from_utf8(text)
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(text).ok());
    match (file::load::<A>(Some(path)), table) {
        (Ok(_), None) => panic!("loaded a file that is not a TOML table"),
        (Ok(_), Some(table)) => {
            if let Some(key) = table.keys().find(|key| !keys.contains(key)) {
                panic!("loaded a file with the unknown key {key:?}");
            }
        }
        (Err(e), table) => {
            assert_eq!(e.flag, "--config", "{e}");
            if let Some(key) = table.and_then(|t| t.keys().find(|k| !keys.contains(k)).cloned()) {
                assert!(e.message.contains(&format!("`{key}`")), "{e}");
            }
        }
    }
}

/// `--config` and the long flags the mode declares.
fn names_a_flag<A: clap::Args>(e: &ConfigError) -> bool {
    e.flag == "--config"
        || file::keys::<A>()
            .iter()
            .any(|key| e.flag == format!("--{}", key.replace('_', "-")))
}

/// The configuration `resolve` gives, or None after checking that its error names a flag
/// of the mode whose flags are `A`.
fn resolved<A: clap::Args, C>(result: Result<C, ConfigError>) -> Option<C> {
    result
        .inspect_err(|e| assert!(names_a_flag::<A>(e), "error names no flag: {e}"))
        .ok()
}

fn check_proxy(args: ProxyArgs) {
    let Some(config) = resolved::<ProxyArgs, _>(ProxyConfig::resolve(args.clone())) else {
        return;
    };
    check_common(&config.common);
    assert!(config.max_frame_size >= 1024);
    assert!(config.max_in_flight >= 1);
    config.port_map.validate().unwrap();
    if let DynamicPorts::Deterministic { min_port, .. }
    | DynamicPorts::Sequential { min_port, .. } = config.port_map.dynamic
    {
        assert_ne!(min_port, 0);
    }
    same_again(&config, ProxyConfig::resolve(args));
}

fn check_portmap(args: PortmapArgs) {
    let Some(config) = resolved::<PortmapArgs, _>(PortmapConfig::resolve(args.clone())) else {
        return;
    };
    check_common(&config.common);
    assert!(!config.interfaces.is_empty());
    assert!(
        !config.instance.is_empty()
            && !config.instance.contains('/')
            && !config.instance.starts_with('.')
    );
    assert_eq!(config.entries.len(), config.common.static_mappings.len());
    // No mapping translates between IPv4 and IPv6: a broker given as an address is of
    // its listen address's family.
    assert!(
        config
            .entries
            .iter()
            .all(|e| match e.broker.host.parse::<std::net::IpAddr>() {
                Ok(broker) => broker.is_ipv4() == e.listen.is_ipv4(),
                Err(_) => true,
            })
    );
    same_again(&config, PortmapConfig::resolve(args));
}

fn check_common(common: &kpsc::config::common::CommonSettings) {
    assert!(!common.static_mappings.is_empty());
    assert!(!common.metadata_refresh_interval.is_zero());
    assert!(common.http.metrics_path.starts_with('/'));
    assert!(common.http.health_path.starts_with('/'));
}

fn same_again<C: Debug>(first: &C, again: Result<C, ConfigError>) {
    let again = again.unwrap_or_else(|e| panic!("resolved once, then refused: {e}"));
    assert_eq!(format!("{first:?}"), format!("{again:?}"));
}
