//! `kpscd portmap`: the kernel moves every byte (see `kpsc-ebpf/src/portmap.rs`). This side
//! checks privileges, resolves `targets`, locks and checks its pin directory
//! (`instance_lock`, `pin_dir`), loads and attaches the program (`datapath`, with the
//! object from `ebpf`), fills its port map, reloads it on SIGHUP, `probe`s what the brokers
//! advertise, removes closed `flows`, serves `kernel_metrics` and the map through the
//! admin endpoint (`state`), and cleans up on exit.
pub mod datapath;
pub mod ebpf;
pub mod flows;
pub mod hook;
pub mod instance_lock;
pub mod kernel_metrics;
pub mod pin_dir;
pub mod privileges;
pub mod probe;
pub mod state;
pub mod targets;

use kpsc_common::ip_addr;
use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, Mutex, RwLock},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminView},
    config::{
        error::{ConfigError, EXIT_CONFIG},
        portmap::PortmapConfig,
    },
    metrics::Metrics,
    portmap::{
        datapath::{Datapath, PinnedMaps},
        privileges::{EXIT_PRIVILEGE, NEEDED, missing_capabilities},
        state::{PortmapState, ProbeState},
        targets::{KernelTargets, check_forwarding, kernel_targets, program_config},
    },
    privilege,
    shutdown::{Draining, StopSignals},
};

/// What `prepare` made: the program loaded, filled and attached.
pub struct Prepared {
    config: PortmapConfig,
    datapath: Datapath,
    pins: Arc<PinnedMaps>,
    targets: KernelTargets,
}

/// Everything that needs more than CAP_BPF and CAP_NET_ADMIN: check the capabilities,
/// resolve the brokers, load, fill and attach the program, then give up every other
/// capability. It runs before the async runtime exists because capabilities belong to
/// threads: with only this thread alive, dropping them here drops them for good (the
/// drop checks every thread). `Err(code)` inside is an exit without an error to report.
pub fn prepare(config: PortmapConfig) -> anyhow::Result<Result<Prepared, ExitCode>> {
    let missing = missing_capabilities();
    if !missing.is_empty() {
        eprintln!(
            "kpscd portmap needs {}; missing: {}",
            NEEDED,
            missing.join(", ")
        );
        return Ok(Err(ExitCode::from(EXIT_PRIVILEGE)));
    }
    check_forwarding(&config.interfaces, &config.entries)?;
    let targets =
        kernel_targets(&config.entries, &config.snat_addresses).context("resolving the brokers")?;
    let mut datapath = match Datapath::load(&config.pin_root, &config.instance) {
        Ok(datapath) => datapath,
        // Another daemon's instance: the operator's to fix, a restart would not.
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("kpscd: {e:#}");
            return Ok(Err(ExitCode::from(EXIT_CONFIG)));
        }
        Err(e) => return Err(e),
    };
    let (hook, why) = hook::choose(config.attach);
    info!(attach = hook.as_str(), reason = why, "kernel hook chosen");
    let attached = datapath
        .apply(
            program_config(config.syn_rate_per_source, &targets.mapped_ports())?,
            &targets,
            &config.allow_sources,
        )
        .and_then(|()| datapath.attach(&config.interfaces, hook))
        .and_then(|()| PinnedMaps::open(datapath.pin_dir()))
        .and_then(|pins| {
            privilege::keep_only_capabilities(&KEPT_CAPABILITIES)?;
            Ok(pins)
        });
    match attached {
        Ok(pins) => Ok(Ok(Prepared {
            config,
            datapath,
            pins: Arc::new(pins),
            targets,
        })),
        Err(e) => {
            if let Err(cleanup) = datapath.shutdown() {
                error!(error = %format!("{cleanup:#}"), "cleaning up after a failed start");
            }
            Err(e)
        }
    }
}

/// What portmap keeps once attached: map reads and updates (CAP_BPF), and detaching
/// from the interfaces at exit (CAP_NET_ADMIN). CAP_PERFMON was only for the verifier.
const KEPT_CAPABILITIES: [privilege::Capability; 2] = [
    privilege::Capability::CAP_BPF,
    privilege::Capability::CAP_NET_ADMIN,
];

/// Runs portmap mode until SIGTERM/SIGINT. Errors are reported (and turned into an exit
/// code) by kpscd's `main`.
pub async fn run(prepared: Prepared) -> anyhow::Result<ExitCode> {
    let Prepared {
        config,
        mut datapath,
        pins,
        targets,
    } = prepared;
    let signals = StopSignals::install().and_then(|stop| {
        let sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        Ok((stop, sighup))
    });
    let (mut stop, mut sighup) = match signals {
        Ok(signals) => signals,
        Err(e) => {
            datapath.shutdown()?;
            return Err(e);
        }
    };
    let shutdown = CancellationToken::new();
    let state = Arc::new(PortmapState {
        pins: RwLock::new(None),
        metrics: Metrics::new(),
        probe: Mutex::new(ProbeState::default()),
        attached: false.into(),
        reprobe: tokio::sync::Notify::new(),
        draining: Draining::default(),
        config: Mutex::new(config.clone()),
    });
    let admin = admin::serve(
        &config.common.http,
        Arc::clone(&state) as Arc<dyn AdminView>,
        shutdown.clone(),
    )
    .await;
    let result = async {
        let admin = admin?;
        state.set_pins(Some(pins));
        state
            .attached
            .store(true, std::sync::atomic::Ordering::Release);
        for (port, t) in &targets.ports {
            info!(
                listen_port = port,
                broker = %SocketAddr::new(ip_addr(&t.broker_ip), u16::from_be(t.broker_port)),
                snat = %ip_addr(&t.snat_ip),
                more_snat_addresses = t.snat_extra,
                "port mapped in the kernel"
            );
        }
        let prober = tokio::spawn(probe::probe_loop(Arc::clone(&state), shutdown.clone()));
        let cleaner = tokio::spawn(flows::cleanup_loop(
            datapath.pin_dir().to_path_buf(),
            shutdown.clone(),
        ));
        let signal_name = loop {
            tokio::select! {
                name = stop.recv() => break name,
                _ = sighup.recv() => reload(&state, &mut datapath).await,
            }
        };
        // Unready first, still attached: the load balancer stops sending new flows here
        // while the ones it sent keep being translated.
        let grace = config.common.shutdown_grace;
        state.draining.start();
        info!(
            signal = signal_name,
            ?grace,
            "shutting down: /ready answers 503; the program stays attached for the grace period"
        );
        if let Some(second) = stop.grace(grace).await {
            info!(
                signal = second,
                "second signal during the grace period: stopping now"
            );
        }
        info!("stopping: detaching the program");
        prober.abort();
        cleaner.abort();
        shutdown.cancel();
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        anyhow::Ok(())
    }
    .await;
    state.set_pins(None);
    datapath.shutdown()?;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: re-reads flags and file, resolves the brokers (off the async threads) and
/// swaps the kernel's port map. Anything that fails leaves the old map and config serving.
async fn reload(state: &Arc<PortmapState>, datapath: &mut Datapath) {
    let args = state.config.lock().expect("config lock").args.clone();
    let resolved = tokio::task::spawn_blocking(move || {
        let config = PortmapConfig::resolve(args).map_err(anyhow::Error::new)?;
        let targets = kernel_targets(&config.entries, &config.snat_addresses)?;
        anyhow::Ok((config, targets))
    })
    .await
    .map_err(anyhow::Error::new)
    .and_then(|r| r);
    let (config, targets) = match resolved {
        Ok(ok) => ok,
        Err(e) => {
            error!(error = %format!("{e:#}"), "SIGHUP: new configuration rejected, keeping the old one");
            return;
        }
    };
    let settings = match program_config(config.syn_rate_per_source, &targets.mapped_ports()) {
        Ok(settings) => settings,
        Err(e) => {
            error!(error = %format!("{e:#}"), "SIGHUP: keeping the old configuration");
            return;
        }
    };
    if config.attach != state.config.lock().expect("config lock").attach {
        warn!("SIGHUP: --attach changes only with a restart; keeping the current hook");
    }
    if let Err(e) = datapath.apply(settings, &targets, &config.allow_sources) {
        error!(error = %format!("{e:#}"), "SIGHUP: the kernel refused the new settings or port map, keeping the old configuration");
        return;
    }
    info!(
        ports = targets.ports.len(),
        allow_sources = config.allow_sources.len(),
        "SIGHUP: port map reloaded, --allow-source too; established flows keep their \
         brokers and are not checked against --allow-source again"
    );
    *state.config.lock().expect("config lock") = config;
    state.probe.lock().expect("probe lock").done = false;
    state.reprobe.notify_one();
}
