//! `kpscd proxy`: kafka-proxy's job. Data flow: `listeners` accept client connections on
//! one port per broker -> `connection` forwards each to its broker, requests up and
//! responses down in order -> frames that pass through unchanged go through a `bulk` mover
//! (copy or splice), address-bearing responses through `rewrite`. Before that, `access`
//! admits the client (PROXY protocol header via `proxy_header`, allow-lists). `state` is what they
//! share, `refresh` keeps the port map current from cluster metadata.
//!
//! This file runs the mode start to finish: admin endpoint, static listeners, first
//! metadata, periodic refresh, and a graceful stop on SIGTERM/SIGINT: unready for the
//! grace period while serving, then no new connections while in-flight requests finish.
pub mod access;
pub mod budget;
pub mod bulk;
pub mod cert_reload;
pub mod connection;
pub mod listeners;
pub mod proxy_header;
pub mod refresh;
pub mod rewrite;
pub mod state;

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    admin,
    config::{
        error::EXIT_CONFIG,
        proxy::{BulkTransfer, ProxyConfig},
    },
    privilege,
    proxy::{bulk::sockmap, listeners::Accepted, state::ProxyState},
    shutdown::StopSignals,
};

/// Runs proxy mode until SIGTERM/SIGINT. Errors are reported (and turned into an exit
/// code) by kpscd's `main`.
pub async fn run(mut config: ProxyConfig) -> anyhow::Result<ExitCode> {
    let (transfer, why) = config.bulk_transfer.resolve();
    if config.bulk_transfer == BulkTransfer::Auto {
        info!(bulk_transfer = %transfer, why, "--bulk-transfer auto");
    }
    config.bulk_transfer = transfer;
    info!(
        bulk_policy = %config.bulk_policy,
        max_frame_size = config.max_frame_size,
        bulk_transfer = %config.bulk_transfer,
        max_in_flight = config.max_in_flight,
        "kpscd proxy starting"
    );
    log_tls(&config);
    if config.upstream_sasl.password_on_argv {
        warn!(
            "--sasl-password on the command line is visible to every local user (ps, \
             /proc); prefer --sasl-password-file, --sasl-password-env or \
             --sasl-jaas-config-file"
        );
    }
    if let Some(creds) = &config.common.discovery_sasl {
        info!(
            mechanism = %creds.mechanism,
            user = %creds.username,
            every_connection = config.upstream_sasl.credentials.is_some(),
            "authenticating to the brokers with SASL"
        );
    }
    if config.bulk_transfer == BulkTransfer::Sockmap {
        let missing = privilege::missing_capabilities(&sockmap::CAPABILITIES);
        if !missing.is_empty() {
            eprintln!(
                "kpscd proxy --bulk-transfer sockmap needs {}; missing: {}",
                sockmap::NEEDED,
                missing.join(", ")
            );
            return Ok(ExitCode::from(privilege::EXIT_PRIVILEGE));
        }
    }
    let mut stop = StopSignals::install()?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let (state, incoming) = ProxyState::start(config)?;
    let admin = admin::serve(
        &state.config.common.http,
        Arc::clone(&state) as Arc<dyn admin::AdminView>,
        state.shutdown.clone(),
    )
    .await?;
    // Everything that may need root is bound: from here on kpscd needs no privilege.
    match &state.config.run_as {
        Some(run_as) => privilege::drop_root(run_as)?,
        None => privilege::warn_if_root(
            "kpscd proxy needs no privilege once its listeners are bound (none at all for ports above 1023)",
        ),
    }
    state.tasks.spawn(dispatch(incoming, Arc::clone(&state)));
    let listener_cert = state
        .config
        .access
        .tls
        .as_ref()
        .map(|t| Arc::clone(&t.cert));
    if let Some(cert) = &listener_cert {
        tokio::spawn(cert_reload::watch(Arc::clone(cert), state.shutdown.clone()));
    }

    // First metadata: port-map conflicts found here are configuration errors.
    match refresh::refresh_metadata(&state).await {
        Ok(problems) if !problems.is_empty() => {
            for p in &problems {
                error!(error = %format!("{p:#}"), "broker cannot be mapped");
                eprintln!("kpscd: invalid port map: {p:#}");
            }
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Ok(_) => {
            let brokers = state.listeners.snapshot().map.entries().len();
            info!(brokers, "port map ready");
        }
        Err(e) => warn!(
            error = %format!("{e:#}"),
            "no broker answered yet; serving the static listeners and retrying every refresh interval"
        ),
    }
    let refresher = tokio::spawn(refresh::refresh_loop(Arc::clone(&state)));

    let signal_name = loop {
        tokio::select! {
            name = stop.recv() => break name,
            _ = sighup.recv() => match &listener_cert {
                Some(cert) => cert_reload::reload(cert, "SIGHUP"),
                None => info!(
                    "SIGHUP: no listener certificate to reload (flags and file are read at \
                     start); restart kpscd to apply a new configuration"
                ),
            },
        }
    };
    // Unready first, still serving: the load balancer's health check takes this instance
    // out while its ports still accept, so no client is refused in between.
    let grace = state.config.common.shutdown_grace;
    state.start_draining();
    info!(
        signal = signal_name,
        ?grace,
        "shutting down: /ready answers 503; serving on for the grace period"
    );
    let cut_short = stop.grace(grace).await;
    let timeout = state.config.shutdown_timeout;
    state.shutdown.cancel();
    state.tasks.close();
    refresher.abort();
    match cut_short {
        // An operator who signals again does not want to wait.
        Some(second) => warn!(
            signal = second,
            remaining = state.tasks.len(),
            "second signal during the grace period: stopping now"
        ),
        None => {
            info!(
                ?timeout,
                "stopping: no new connections, finishing in-flight requests"
            );
            tokio::select! {
                _ = state.tasks.wait() => {}
                _ = tokio::time::sleep(timeout) => warn!(
                    remaining = state.tasks.len(),
                    "shutdown timeout reached; closing the remaining connections"
                ),
                second = stop.recv() => warn!(
                    signal = second,
                    remaining = state.tasks.len(),
                    "second signal: stopping now"
                ),
            }
        }
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    info!("kpscd stopped");
    Ok(ExitCode::SUCCESS)
}

/// TLS as configured, once at start: which bulk path TLS connections take, and a loud
/// warning when broker certificates are not checked.
fn log_tls(config: &ProxyConfig) {
    if let Some(tls) = &config.access.tls {
        info!(
            certificate = %tls.cert.describe(),
            client_certificates_required = tls.client_auth,
            "listener TLS on: client connections use the copy mover (TLS bytes cannot be \
             spliced); the certificate is re-read on SIGHUP and when its files change"
        );
    }
    if let Some(tls) = &config.upstream_tls {
        info!(
            trust = %tls.trust,
            "TLS to the brokers on (client traffic and kpscd's metadata requests): broker \
             connections use the copy mover (TLS bytes cannot be spliced)"
        );
        if tls.insecure {
            warn!(
                "--tls-insecure-skip-verify: broker certificates are NOT verified; anyone on \
                 the path to the brokers can read and change all traffic. Use it for tests only"
            );
        }
    }
}

/// Starts a connection task for every accepted client, until shutdown.
async fn dispatch(mut incoming: mpsc::Receiver<Accepted>, state: Arc<ProxyState>) {
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            accepted = incoming.recv() => match accepted {
                Some(a) => a,
                None => return,
            },
        };
        state.tasks.spawn(connection::serve::serve(
            accepted.stream,
            accepted.peer,
            accepted.route,
            Arc::clone(&state),
        ));
    }
}
