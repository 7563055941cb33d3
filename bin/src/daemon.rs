//! `tidepool node run`: load and validate config (before binding anything), set up logging and
//! metrics, start the node and its admin HTTP, and stop cleanly on SIGTERM/SIGINT.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tidepool_actors::node::Node;
use tidepool_runtime::config::{ConfigError, NodeConfig};
use tidepool_runtime::metrics as m;
use tidepool_runtime::storage::KeyRing;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// Exit code for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;
/// Exit code after the supervisor escalated (EX_SOFTWARE): the node left instead of limping.
pub const EXIT_ESCALATED: i32 = 70;

/// Loads config and checks that its data key file loads; on failure says which key is wrong
/// and why. The key file is read here, before anything is bound, so a missing, unreadable or
/// malformed one is a configuration error (exit 64) rather than a failure of a half-started node.
pub fn load_config(path: &Path) -> Result<NodeConfig, ConfigError> {
    let cfg = NodeConfig::load(Some(path))?;
    let key_file = cfg.data_key_file();
    if let Err(e) = KeyRing::load(&key_file) {
        let reason = format!("{e} (made by `tidepool certs init`, copied by `certs issue --node`)");
        return Err(ConfigError::new("storage.key_file", reason));
    }
    check_paths(&cfg)?;
    Ok(cfg)
}

/// Everything else the config points to, checked before any port is bound, so a wrong path is
/// one message and exit 64 (which the systemd unit does not restart), not a failure after start.
fn check_paths(cfg: &NodeConfig) -> Result<(), ConfigError> {
    let tls = tidepool_runtime::transport::TlsMaterial::load_node(&cfg.tls.dir).map_err(|e| {
        ConfigError::new(
            "tls.dir",
            format!("{e} (expects ca.pem, node.pem, node.key from `tidepool certs issue --node`)"),
        )
    })?;
    if tls.identity.name != cfg.node.name {
        return Err(ConfigError::new(
            "tls.dir",
            format!(
                "the certificate in {} is for {:?}, but node.name is {:?}",
                cfg.tls.dir.display(),
                tls.identity.name,
                cfg.node.name
            ),
        ));
    }
    let dir = &cfg.node.data_dir;
    let probe = dir.join(".tidepool-write-check");
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            ConfigError::new(
                "node.data_dir",
                format!("{} is not a writable directory: {e}", dir.display()),
            )
        })
}

/// Makes everything the daemon creates from here on owner-only (files 0600, directories 0700):
/// the data dir, the Raft log and snapshots, the audit and ownership logs, file:// objects.
/// A umask covers every writer, including libraries (redb, object_store) that create files
/// with the default 0666/0777. Called first thing in `tidepool node run`, before any thread.
pub fn restrict_umask() {
    #[allow(unsafe_code)]
    // SAFETY: umask(2) takes and returns a plain integer, cannot fail, and touches no memory of
    // ours. It is process-wide, which is what we want; no other thread exists yet.
    unsafe {
        libc::umask(0o077);
    }
}

/// Installs the Prometheus recorder: every series labelled `node` (this node's name) and
/// `cluster` (`cluster.name`), explicit buckets per histogram ([`m::buckets_for`]), every metric
/// described and the series dashboards and alerts read exported from the start.
pub fn install_metrics(cfg: &NodeConfig) -> Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new()
        .add_global_label("node", cfg.node.name.clone())
        .add_global_label("cluster", cfg.cluster.name.clone());
    for def in m::ALL.iter().filter(|d| d.kind == m::MetricKind::Histogram) {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(def.name.into()), m::buckets_for(def.name))
            .with_context(|| format!("histogram buckets of {}", def.name))?;
    }
    let handle = builder
        .install_recorder()
        .context("installing the metrics recorder")?;
    m::describe_all();
    m::register_zeros();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            t.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Runs a node until a signal or an escalation; returns the process exit code.
/// Makes glibc's malloc serve every buffer of 256 KiB or more with its own mapping, returned
/// to the OS when freed. By default glibc raises that threshold after the first large free,
/// and from then on keeps freed frame and reply buffers in its heap: after an attacker's
/// connection was closed, the node's RSS stayed hundreds of MiB up. Call before any thread
/// starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes glibc's allocation policy; it is called once, before the
    // runtime's threads exist, with a valid option and value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Every 10 s, hands memory glibc holds free back to the OS (`malloc_trim`, which also releases
/// free pages inside its heaps). Buffers under the mmap threshold (replies of a few KiB to
/// 256 KiB) otherwise stay with the process after a burst, or an attack, is over.
async fn trim_memory_loop() {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim only returns free memory to the OS; it takes glibc's own locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

pub async fn run(cfg: NodeConfig) -> Result<i32> {
    let grace = Duration::from_millis(cfg.node.shutdown_grace_ms);
    let metrics = install_metrics(&cfg)?;
    // Admin HTTP first: /livez and /metrics answer while the node joins; /readyz says 503 until
    // the node has started.
    let slot = crate::admin::ReadinessSlot::default();
    let phase = tidepool_actors::forming::phase_channel();
    let admin = crate::admin::bind(
        cfg.node.admin,
        metrics,
        slot.clone(),
        phase.clone(),
        &cfg.admin,
    )
    .await?;
    tokio::spawn(sd_status_loop(phase.subscribe()));
    tokio::spawn(admin);
    tokio::spawn(trim_memory_loop());
    metrics::gauge!(
        m::BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "revision" => env!("TIDEPOOL_REVISION")
    )
    .set(1.0);
    #[cfg(feature = "fault-injection")]
    let socket = crate::fault_file::socket_from_env(cfg.node.listen)?;
    #[cfg(not(feature = "fault-injection"))]
    let socket = None;
    // Signal handlers before the (possibly long) start: SIGTERM while joining stops cleanly.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut node = tokio::select! {
        node = Node::start_reporting(&cfg, socket, phase) => node.context("starting the node")?,
        _ = term.recv() => { info!("SIGTERM while starting: stopping"); return Ok(0); }
        _ = int.recv() => { info!("SIGINT while starting: stopping"); return Ok(0); }
    };
    let readiness = node.readiness();
    let _ = slot.set(readiness.clone());
    info!(node = %cfg.node.name, quic = %cfg.node.listen, admin = %cfg.node.admin, "tidepool node running");
    // systemd (Type=notify): started, joined and serving /livez and /readyz.
    sd_notify_state(&[sd_notify::NotifyState::Ready]);
    spawn_sd_watchdog();

    let code = tokio::select! {
        _ = term.recv() => { info!("SIGTERM: stopping"); 0 }
        _ = int.recv() => { info!("SIGINT: stopping"); 0 }
        reason = node.escalated() => {
            error!(reason = reason.as_deref().unwrap_or("unknown"), "supervisor escalated: leaving the cluster");
            EXIT_ESCALATED
        }
    };
    // systemd: the stop (drain) begins; systemd waits up to TimeoutStopSec for the exit.
    sd_notify_state(&[sd_notify::NotifyState::Stopping]);
    readiness.begin_stop();
    if tokio::time::timeout(grace + Duration::from_secs(1), node.shutdown(grace))
        .await
        .is_err()
    {
        warn!(?grace, "shutdown overran its grace period");
    }
    Ok(code)
}

/// Mirrors the start-up phase into systemd's status line (`systemctl status tidepool` shows
/// `forming the cluster: waiting for voter(s) n2, n3 …`). Nothing without `NOTIFY_SOCKET`.
async fn sd_status_loop(mut phase: tokio::sync::watch::Receiver<tidepool_actors::forming::Phase>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    loop {
        let line = phase.borrow_and_update().describe();
        sd_notify_state(&[sd_notify::NotifyState::Status(&line)]);
        if phase.changed().await.is_err() {
            return;
        }
    }
}

/// Tells the service manager about a state change (`sd_notify(3)`: a datagram to the socket in
/// `NOTIFY_SOCKET`). Does nothing when `NOTIFY_SOCKET` is unset (not under systemd with
/// `Type=notify`); a failure to send is logged, never fatal.
fn sd_notify_state(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, ?state, "cannot notify systemd");
    }
}

/// With `WatchdogSec=` in the unit (systemd sets `WATCHDOG_USEC` and `WATCHDOG_PID`), pings the
/// watchdog at half the interval from the async runtime, so a wedged runtime gets the node
/// restarted. Nothing otherwise.
fn spawn_sd_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled().filter(|d| !d.is_zero()) else {
        return;
    };
    tokio::spawn(async move {
        let mut t = tokio::time::interval(interval / 2);
        loop {
            t.tick().await;
            sd_notify_state(&[sd_notify::NotifyState::Watchdog]);
        }
    });
}

/// Sets up tracing for the CLI: human-readable text (colour on a TTY) or flat JSON lines.
pub fn init_logging(json: bool) {
    crate::logging::init_cli(json);
}

/// Sets up tracing for a node: text or flat JSON lines, every one carrying the node's name.
pub fn init_node_logging(json: bool, node: &str) {
    crate::logging::init_node(json, node);
}
