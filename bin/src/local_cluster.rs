//! A real local cluster: N `tidepool node run` processes on 127.0.0.1 (or each in its own
//! network namespace, [`crate::netns`]), with a throwaway CA and certificates in a temp dir. Used
//! by `tidepool demo`, the chaos harness and the multi-process tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tidepool_runtime::codec::{WireMemberState, WireShardState};

use anyhow::{bail, Context, Result};
use tidepool_runtime::certs::{self, Role, Subject, Validity};
use tokio::process::{Child, Command};

/// One node process.
#[derive(Debug)]
pub struct NodeProc {
    pub name: String,
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// The loopback ports' reservations (none in network namespaces).
    _ports: Vec<crate::ports::Port>,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
}

/// The cluster and its temp dir (removed on drop, unless `keep` is set).
#[derive(Debug)]
pub struct LocalCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    shards: u32,
    /// Names of the control-plane voters (also the seeds).
    pub voters: Vec<String>,
    /// Extra environment for every node process (config overrides such as
    /// `TIDEPOOL_WORKERS__THREADS`); `{name}` in a value becomes the node's name.
    pub env: Vec<(String, String)>,
    /// Extra arguments after `node run --config FILE` for every node (`--log-format json`).
    pub args: Vec<String>,
    /// Extra environment for one node, by name (after `env`).
    pub node_env: std::collections::BTreeMap<String, Vec<(String, String)>>,
    /// The network namespaces the nodes run in (`None`: loopback). Declared after `nodes`, so
    /// the processes are killed before their namespaces go.
    pub net: Option<crate::netns::NetLab>,
    /// CPU starvation of every node process started from now on (chaos F11; the multi-process
    /// tests under `TIDEPOOL_TEST_STARVE=cpu=25,stall_every_ms=700,stall_max_ms=200`).
    pub starve: Option<crate::starve::Starve>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Stalls end first (joining sends the SIGCONT of one in progress): once the nodes are
        // killed and reaped their pids may be reused, and a stall must never stop a stranger.
        drop(self.starve.take());
    }
}

/// The ports every node uses inside its own namespace.
const NETNS_QUIC_PORT: u16 = 7000;
const NETNS_ADMIN_PORT: u16 = 7001;

impl LocalCluster {
    /// Makes the CA, certificates and configs of `n` nodes, the first `voters` of them control
    /// plane voters (the seeds). Starts nothing.
    pub fn create(bin: &Path, n: usize, shards: u32, voters: usize) -> Result<Self> {
        Self::create_in(bin, n, shards, voters, None)
    }

    /// [`LocalCluster::create`], with every node in its own namespace of `net` if given.
    pub fn create_in(
        bin: &Path,
        n: usize,
        shards: u32,
        voters: usize,
        net: Option<crate::netns::NetLab>,
    ) -> Result<Self> {
        let mut dir = tempfile::Builder::new()
            .prefix("tidepool-")
            .tempdir()
            .context("temp dir")?;
        // For post-mortems of a failing multi-process test: keep every node's log and data.
        if std::env::var_os("TIDEPOOL_KEEP_CLUSTER_DIRS").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping the cluster dir {}", dir.path().display());
        }
        let root = dir.path();
        certs::init_ca(&root.join("ca"))?;
        for (client, role) in [("demo-admin", Role::Admin), ("demo-reader", Role::Reader)] {
            let out = root.join("certs").join(client);
            certs::issue(
                &root.join("ca"),
                &Subject::Client {
                    name: client.into(),
                    role,
                },
                &out,
                Validity::days_from_now(30),
            )?;
        }
        let mut c = LocalCluster {
            bin: bin.to_path_buf(),
            dir,
            nodes: Vec::new(),
            shards,
            voters: Vec::new(),
            env: Vec::new(),
            args: Vec::new(),
            node_env: Default::default(),
            net,
            starve: None,
        };
        if let Ok(text) = std::env::var("TIDEPOOL_TEST_STARVE") {
            let (spec, seed) = crate::starve::StarveSpec::parse_with_seed(&text)
                .with_context(|| format!("TIDEPOOL_TEST_STARVE={text}"))?;
            let s = crate::starve::Starve::new(spec, seed)?;
            eprintln!("starving every node: {}", s.describe());
            c.starve = Some(s);
        }
        let voters = voters.clamp(1, n.max(1));
        for i in 0..n {
            c.add_node()?;
            if i < voters {
                c.voters.push(c.nodes[i].name.clone());
            }
        }
        for i in 0..c.nodes.len() {
            c.write_config(i)?;
        }
        Ok(c)
    }

    /// Adds one more node (certificate and config); start it with [`LocalCluster::start`].
    pub fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        let root = self.dir.path().to_path_buf();
        certs::issue(
            &root.join("ca"),
            &Subject::Node(name.clone()),
            &root.join("certs").join(&name),
            Validity::days_from_now(30),
        )?;
        let mut ports = Vec::new();
        let (quic, admin) = match self.net.as_mut() {
            Some(net) => {
                let ip = net.add_node(i)?;
                (
                    SocketAddr::from((ip, NETNS_QUIC_PORT)),
                    SocketAddr::from((ip, NETNS_ADMIN_PORT)),
                )
            }
            None => {
                ports.push(crate::ports::reserve()?);
                ports.push(crate::ports::reserve()?);
                (
                    SocketAddr::from(([127, 0, 0, 1], ports[0].get())),
                    SocketAddr::from(([127, 0, 0, 1], ports[1].get())),
                )
            }
        };
        self.nodes.push(NodeProc {
            config: root.join(format!("{name}.toml")),
            log: root.join(format!("{name}.log")),
            name,
            quic,
            admin,
            child: None,
            _ports: ports,
        });
        if !self.voters.is_empty() {
            self.write_config(i)?;
        }
        Ok(i)
    }

    fn write_config(&self, i: usize) -> Result<()> {
        let root = self.dir.path();
        let node = &self.nodes[i];
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| self.voters.contains(&n.name))
            .map(|n| format!("\"{}\"", n.quic))
            .collect();
        let voters: Vec<String> = self.voters.iter().map(|v| format!("\"{v}\"")).collect();
        let toml = format!(
            "[node]\nname = \"{name}\"\nlisten = \"{quic}\"\nadmin = \"{admin}\"\ndata_dir = \"{data}\"\nshutdown_grace_ms = 15000\n\n\
             [cluster]\nseeds = [{seeds}]\nvoters = [{voters}]\nshards = {shards}\n\n\
             [tls]\ndir = \"{certs}\"\n\n[storage]\nurl = \"file://{shared}\"\n\n\
             [jobs]\nimport_urls = [\"file://{tmp}/\", \"s3://lake/\"]\n",
            name = node.name,
            quic = node.quic,
            admin = node.admin,
            data = root.join("data").join(&node.name).display(),
            seeds = seeds.join(", "),
            voters = voters.join(", "),
            shards = self.shards,
            certs = root.join("certs").join(&node.name).display(),
            shared = root.join("shared").display(),
            // Imports read test data from temp dirs (and the tests' moto bucket), nothing else.
            tmp = std::env::temp_dir().display(),
        );
        std::fs::write(&node.config, toml)?;
        Ok(())
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Certificate dir of the admin client (`--cert-dir`).
    pub fn admin_dir(&self) -> PathBuf {
        self.root().join("certs").join("demo-admin")
    }

    /// Certificate dir of the read-only client.
    pub fn reader_dir(&self) -> PathBuf {
        self.root().join("certs").join("demo-reader")
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root().join("ca")
    }

    /// A client with the admin certificate, connected through every node.
    pub async fn admin_client(
        &self,
        opts: tidepool_runtime::client::ClientOptions,
    ) -> Result<tidepool_runtime::client::ClusterClient> {
        let tls = tidepool_runtime::transport::TlsMaterial::load_client(&self.admin_dir())?;
        Ok(tidepool_runtime::client::ClusterClient::connect(&self.seeds(), &tls, opts).await?)
    }

    /// Once every node is ready: an admin client, after every node is up and the shard map
    /// has settled (the start of most multi-process tests).
    pub async fn settled_admin_client(
        &mut self,
        opts: tidepool_runtime::client::ClientOptions,
    ) -> Result<tidepool_runtime::client::ClusterClient> {
        self.wait_ready(Duration::from_secs(90)).await?;
        let client = self.admin_client(opts).await?;
        wait_all_up(&client, self.nodes.len(), Duration::from_secs(90)).await?;
        wait_stable(&client, Duration::from_secs(120)).await?;
        Ok(client)
    }

    /// Runs the `tidepool` command line with `args` against this cluster, as a user would: the
    /// first node as the seed, the admin certificate.
    pub fn cli(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        std::process::Command::new(&self.bin)
            .args(args)
            .env("TIDEPOOL_CONNECT", self.nodes[0].quic.to_string())
            .env("TIDEPOOL_CERT_DIR", self.admin_dir())
            .output()
    }

    /// [`Self::cli`] for a command that must succeed and print one JSON document (`--json`).
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.cli(args)?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?} exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{args:?} printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn seeds(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.quic).collect()
    }

    /// Starts node `i` (stdout and stderr go to its log file).
    pub fn start(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut cmd = match &self.net {
            Some(net) => net.command(i, &self.bin),
            None => Command::new(&self.bin),
        };
        let child = cmd
            .args(["node", "run", "--config"])
            .arg(&node.config)
            .args(&self.args)
            .env_remove("TIDEPOOL_LOG")
            .envs(
                self.env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.replace("{name}", &node.name))),
            )
            .envs(self.node_env.get(&node.name).into_iter().flatten().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        if let (Some(s), Some(pid)) = (&self.starve, child.id()) {
            s.add(&node.name, pid)
                .with_context(|| format!("starving {}", node.name))?;
        }
        node.child = Some(child);
        Ok(())
    }

    /// Node `i` exited: no starvation bookkeeping for it any more.
    fn exited(&mut self, i: usize) {
        self.nodes[i].child = None;
        if let Some(s) = &self.starve {
            s.remove(&self.nodes[i].name);
        }
    }

    pub fn start_all(&mut self) -> Result<()> {
        (0..self.nodes.len()).try_for_each(|i| self.start(i))
    }

    /// Polls every running node's `/readyz` until all answer 200 or `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .collect();
        self.wait_nodes_ready(running, timeout).await
    }

    /// Polls the `/readyz` of the nodes `pending` (together) until all answer 200 or `timeout`
    /// passes. A node that exits meanwhile fails the wait at once with its own log (a voter that
    /// cannot start keeps the others from forming the cluster, and their logs only say they are
    /// waiting).
    async fn wait_nodes_ready(&mut self, mut pending: Vec<usize>, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for i in pending {
                if let Ok((200, _)) = crate::http::get(self.nodes[i].admin, "/readyz").await {
                    continue;
                }
                self.bail_if_exited(i)?;
                still.push(i);
            }
            pending = still;
            if let (Some(&i), true) = (pending.first(), Instant::now() > deadline) {
                let names: Vec<&str> = pending
                    .iter()
                    .map(|&j| self.nodes[j].name.as_str())
                    .collect();
                bail!(
                    "{} not ready within {timeout:?}; log of {}:\n{}",
                    names.join(", "),
                    self.nodes[i].name,
                    self.tail_log(i)
                );
            }
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
            }
        }
        Ok(())
    }

    /// Fails with node `i`'s exit status and log if its process has exited.
    fn bail_if_exited(&mut self, i: usize) -> Result<()> {
        if let Some(status) = self.nodes[i]
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            bail!(
                "{} exited with {status} before becoming ready; log:\n{}",
                self.nodes[i].name,
                self.tail_log(i)
            );
        }
        Ok(())
    }

    /// The last lines of node `i`'s log.
    pub fn tail_log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Scrapes node `i`'s `/metrics`.
    pub async fn metrics(&self, i: usize) -> Result<String> {
        let (status, body) = crate::http::get(self.nodes[i].admin, "/metrics").await?;
        if status != 200 {
            bail!("/metrics on {} answered {status}", self.nodes[i].name);
        }
        Ok(body)
    }

    /// Sends `sig` to node `i`.
    pub fn signal(&self, i: usize, sig: i32) -> Result<()> {
        let pid = self.nodes[i].pid().context("node is not running")?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        // A node stopped on purpose gets no starvation stalls: a stall's SIGCONT would end the
        // pause early. (`hold` waits for a stall of it in progress to end first.)
        if let Some(s) = &self.starve {
            match sig {
                libc::SIGSTOP => s.hold(&self.nodes[i].name),
                libc::SIGCONT => s.release(&self.nodes[i].name),
                _ => {}
            }
        }
        // We hold the un-reaped child, so the pid cannot have been reused by another process.
        if send_signal(pid, sig) != 0 {
            bail!(
                "kill({pid}, {sig}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILLs node `i` and reaps it.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        // No more stalls of it from now on: once reaped, its pid may belong to anyone.
        if let Some(s) = &self.starve {
            s.remove(&self.nodes[i].name);
        }
        let child = self.nodes[i]
            .child
            .as_mut()
            .context("node is not running")?;
        child.start_kill()?;
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .context("killed node not reaped")??;
        self.exited(i);
        Ok(())
    }

    /// Whether node `i`'s process is running.
    pub fn running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Polls node `i`'s `/readyz` until 200.
    pub async fn wait_node_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        self.wait_nodes_ready(vec![i], timeout).await
    }

    /// SIGTERMs node `i` and waits for it to exit.
    pub async fn stop(&mut self, i: usize, timeout: Duration) -> Result<ExitStatus> {
        self.signal(i, libc::SIGTERM)?;
        let child = self.nodes[i]
            .child
            .as_mut()
            .context("node is not running")?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .context("node did not exit in time")??;
        self.exited(i);
        Ok(status)
    }

    /// Stops every node; returns their exit statuses.
    pub async fn stop_all(&mut self, timeout: Duration) -> Result<Vec<ExitStatus>> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_some() {
                self.signal(i, libc::SIGTERM)?;
            }
        }
        let mut out = Vec::new();
        for i in 0..self.nodes.len() {
            if let Some(child) = self.nodes[i].child.as_mut() {
                let status = tokio::time::timeout(timeout, child.wait())
                    .await
                    .context("node did not exit in time")??;
                out.push(status);
                self.exited(i);
            }
        }
        Ok(out)
    }

    /// Keeps the temp dir after the cluster is dropped (for post-mortems).
    pub fn keep(mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }
}

/// Polls `cluster status` until `n` members are reported up and reachable.
pub async fn wait_all_up(
    client: &tidepool_runtime::client::ClusterClient,
    n: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = client.status().await {
            if s.members.len() == n && s.members.iter().all(|m| m.state == WireMemberState::Up) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("members not all up within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
}

/// Polls the running nodes' metrics until at least `ops` writes have been applied in all (the
/// workload is under way).
pub async fn wait_applied(c: &LocalCluster, ops: f64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut applied = 0.0;
        for (i, n) in c.nodes.iter().enumerate() {
            if n.pid().is_some() {
                if let Ok(text) = c.metrics(i).await {
                    applied += crate::http::sum_metric(
                        &text,
                        "tidepool_shard_ops_total",
                        &[("result", "applied")],
                    );
                }
            }
        }
        if applied >= ops {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {applied} writes applied within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
}

/// Polls until every shard has an owner, no handoff is running, and the map stayed the same for
/// three polls in a row (rebalancing has settled).
pub async fn wait_stable(
    client: &tidepool_runtime::client::ClusterClient,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    let mut same = 0;
    loop {
        if let Ok(shards) = client.shards().await {
            let settled = !shards.is_empty()
                && shards
                    .iter()
                    .all(|s| s.state == WireShardState::Serving && s.owner.is_some());
            let now: Vec<(Option<String>, u64)> =
                shards.iter().map(|s| (s.owner.clone(), s.epoch)).collect();
            if settled && last.as_ref() == Some(&now) {
                same += 1;
                if same >= 3 {
                    client.refresh().await?;
                    return Ok(());
                }
            } else {
                same = 0;
            }
            last = Some(now);
        }
        if Instant::now() > deadline {
            bail!("shard map did not settle within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await; // poll interval
    }
}

#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: i32, sig: i32) -> i32 {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) }
}
