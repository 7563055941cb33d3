//! CPU starvation, the way Kubernetes CPU limits starve a pod (chaos F11, and
//! `TIDEPOOL_TEST_STARVE` for the multi-process tests): each node process gets its own CPU quota
//! per 100 ms period (cgroup v2 `cpu.max`, or cgroup v1 `cpu.cfs_quota_us` where the machine has
//! only v1), so a busy node is throttled for the rest of every period; where no cgroup can be
//! written (not root, read-only cgroupfs) competing busy threads take the cores instead. On top,
//! [`Stalls`] stops a random node with SIGSTOP for a few milliseconds to a few hundred, then
//! SIGCONTs it: the stalls a throttled, swapped or preempted process sees.
//!
//! A stalled or throttled node must keep invariant 1 by itself: it stops serving at its own
//! lease expiry however late its threads run (ARCHITECTURE.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::sync::Mutex;

/// The CFS period quotas are counted in (Kubernetes uses the same 100 ms).
const PERIOD_US: u64 = 100_000;

/// What starves the nodes, and how hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StarveSpec {
    /// CPU each node may use, in percent of one core (Kubernetes `limits.cpu: 250m` = 25).
    pub cpu_percent: u32,
    /// Mean time between SIGSTOP stalls (of a random node); 0 = no stalls.
    pub stall_every_ms: u64,
    /// Longest stall; each lasts a uniformly drawn 1..=this many milliseconds.
    pub stall_max_ms: u64,
}

impl StarveSpec {
    /// Parses `cpu=25,stall_every_ms=700,stall_max_ms=200` (`TIDEPOOL_TEST_STARVE`). Keys may be
    /// left out (no stalls; cpu 100).
    pub fn parse(text: &str) -> Result<Self> {
        let mut s = StarveSpec {
            cpu_percent: 100,
            stall_every_ms: 0,
            stall_max_ms: 0,
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("`{part}`: expected key=value"))?;
            let v: u64 = v
                .trim()
                .parse()
                .with_context(|| format!("`{part}`: not a whole number"))?;
            match k.trim() {
                "cpu" => s.cpu_percent = u32::try_from(v).context("cpu out of range")?,
                "stall_every_ms" => s.stall_every_ms = v,
                "stall_max_ms" => s.stall_max_ms = v,
                other => bail!("unknown key `{other}` (cpu, stall_every_ms, stall_max_ms)"),
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// Parses `TIDEPOOL_TEST_STARVE`: a spec as [`StarveSpec::parse`] takes, plus an optional
    /// `seed=N` that draws the stalls (default 1), so repeated runs can differ.
    pub fn parse_with_seed(text: &str) -> Result<(Self, u64)> {
        let mut seed = 1;
        let mut rest = Vec::new();
        for part in text.split(',').map(str::trim) {
            match part.split_once('=') {
                Some((k, v)) if k.trim() == "seed" => {
                    seed = v
                        .trim()
                        .parse()
                        .with_context(|| format!("`{part}`: not a whole number"))?;
                }
                _ => rest.push(part),
            }
        }
        Ok((Self::parse(&rest.join(","))?, seed))
    }

    pub fn validate(&self) -> Result<()> {
        if self.cpu_percent == 0 || self.cpu_percent > 1000 {
            bail!("cpu must be in 1..=1000 (percent of one core)");
        }
        if self.stall_every_ms > 0 && self.stall_max_ms == 0 {
            bail!("stall_max_ms must be at least 1 when stall_every_ms is set");
        }
        Ok(())
    }
}

/// How the CPU is limited.
#[derive(Debug)]
enum Mode {
    /// One child cgroup per node under `dir` (v2: `cpu.max`).
    V2 { dir: PathBuf },
    /// One child cgroup per node under `dir` (v1 cpu controller: `cpu.cfs_quota_us`).
    V1 { dir: PathBuf },
    /// No writable cgroup: busy threads compete for every core instead.
    Hogs {
        stop: Arc<AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    },
    /// `cpu = 100` or more on a machine without limits to apply: nothing to do.
    None,
}

/// Starvation of a set of node processes; undone on drop (processes moved back, cgroups
/// removed, busy threads stopped, every stalled node continued).
#[derive(Debug)]
pub struct Starve {
    spec: StarveSpec,
    mode: Mode,
    /// Node name -> pid, for the stall thread (and the cgroups).
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
    /// Nodes paused on purpose (no stalls meanwhile).
    held: Mutex<BTreeMap<String, u32>>,
    stalls: Option<Stalls>,
}

impl Starve {
    /// Sets up starvation for processes added later with [`Starve::add`]; `seed` draws the stalls.
    pub fn new(spec: StarveSpec, seed: u64) -> Result<Self> {
        spec.validate()?;
        remove_stale();
        let tag = format!("tidepool-starve-{}-{seed}", std::process::id());
        let mode = if spec.cpu_percent >= 100 * cores() {
            Mode::None
        } else if let Some(dir) = v2_dir(&tag) {
            Mode::V2 { dir }
        } else if let Some(dir) = v1_dir(&tag) {
            Mode::V1 { dir }
        } else {
            hogs(spec.cpu_percent)
        };
        let pids = Arc::new(Mutex::new(BTreeMap::new()));
        let stalls = (spec.stall_every_ms > 0).then(|| Stalls::start(pids.clone(), spec, seed));
        Ok(Starve {
            spec,
            mode,
            pids,
            held: Mutex::new(BTreeMap::new()),
            stalls,
        })
    }

    /// What is done, in words (for the run's event line).
    pub fn describe(&self) -> String {
        let how = match &self.mode {
            Mode::V2 { .. } => format!("cgroup v2 cpu.max {}%", self.spec.cpu_percent),
            Mode::V1 { .. } => format!("cgroup v1 cfs quota {}%", self.spec.cpu_percent),
            Mode::Hogs { threads, .. } => format!("{} busy threads (no cgroup)", threads.len()),
            Mode::None => "no CPU limit".into(),
        };
        if self.spec.stall_every_ms > 0 {
            format!(
                "{how}, SIGSTOP stalls of 1..{} ms every ~{} ms",
                self.spec.stall_max_ms, self.spec.stall_every_ms
            )
        } else {
            how
        }
    }

    /// Starves node `name`'s process `pid` from now on (a restarted node is added again).
    pub fn add(&self, name: &str, pid: u32) -> Result<()> {
        match &self.mode {
            Mode::V2 { dir } => {
                let cg = dir.join(name);
                if !cg.exists() {
                    std::fs::create_dir(&cg)?;
                    let quota = PERIOD_US * u64::from(self.spec.cpu_percent) / 100;
                    std::fs::write(cg.join("cpu.max"), format!("{quota} {PERIOD_US}"))?;
                }
                std::fs::write(cg.join("cgroup.procs"), pid.to_string())?;
            }
            Mode::V1 { dir } => {
                let cg = dir.join(name);
                if !cg.exists() {
                    std::fs::create_dir(&cg)?;
                    std::fs::write(cg.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
                    let quota = PERIOD_US * u64::from(self.spec.cpu_percent) / 100;
                    std::fs::write(cg.join("cpu.cfs_quota_us"), quota.to_string())?;
                }
                std::fs::write(cg.join("cgroup.procs"), pid.to_string())?;
            }
            Mode::Hogs { .. } | Mode::None => {}
        }
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), pid);
        Ok(())
    }

    /// Node `name` is paused on purpose: no stalls for it until [`Starve::release`]. Waits for
    /// a stall in progress to end (the stall thread holds the table while it stalls a node).
    pub fn hold(&self, name: &str) {
        let mut p = self
            .pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pid) = p.remove(name) {
            self.held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.to_string(), pid);
        }
    }

    /// Node `name`'s pause ended: stalls may hit it again.
    pub fn release(&self, name: &str) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        if let Some(pid) = held {
            self.pids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.to_string(), pid);
        }
    }

    /// Node `name` exited (killed or stopped): no more stalls for it.
    pub fn remove(&self, name: &str) {
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
    }
}

impl Drop for Starve {
    fn drop(&mut self) {
        // Stalls first: every node they stopped is continued before anything else happens.
        self.stalls.take();
        match &mut self.mode {
            Mode::V2 { dir } | Mode::V1 { dir } => release(dir),
            Mode::Hogs { stop, threads } => {
                stop.store(true, Ordering::Relaxed);
                for t in threads.drain(..) {
                    let _ = t.join();
                }
            }
            Mode::None => {}
        }
    }
}

fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// A cgroup v2 directory with the cpu controller for our children, if one can be made.
fn v2_dir(tag: &str) -> Option<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
    if !controllers.split_whitespace().any(|c| c == "cpu") {
        return None;
    }
    let dir = root.join(tag);
    std::fs::create_dir(&dir).ok()?;
    // Children of `dir` may use the cpu controller (the root must delegate it to `dir` first).
    let delegated = std::fs::write(root.join("cgroup.subtree_control"), "+cpu").is_ok()
        && std::fs::write(dir.join("cgroup.subtree_control"), "+cpu").is_ok();
    if !delegated {
        let _ = std::fs::remove_dir(&dir);
        return None;
    }
    Some(dir)
}

/// A cgroup v1 directory in the cpu hierarchy, if one can be made.
fn v1_dir(tag: &str) -> Option<PathBuf> {
    let root = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
        .iter()
        .map(Path::new)
        .find(|p| p.join("cpu.cfs_quota_us").exists())?;
    let dir = root.join(tag);
    std::fs::create_dir(&dir).ok()?;
    Some(dir)
}

/// Removes the cgroups of harness processes that died without cleaning up (killed runs).
fn remove_stale() {
    for root in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpu,cpuacct",
    ] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name
                .strip_prefix("tidepool-starve-")
                .and_then(|rest| rest.split('-').next())
            else {
                continue;
            };
            if !Path::new("/proc").join(owner).exists() {
                release(&e.path());
            }
        }
    }
}

/// Moves every process in `dir`'s children back to the root and removes the cgroups.
fn release(dir: &Path) {
    let root = dir.parent().unwrap_or(Path::new("/sys/fs/cgroup"));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let cg = e.path();
            if !cg.is_dir() {
                continue;
            }
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(root.join("cgroup.procs"), pid);
            }
            let _ = std::fs::remove_dir(&cg);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Busy threads that leave the nodes about `cpu_percent` of a core each would get anyway: one
/// hog per core keeps the scheduler sharing every core with them.
fn hogs(_cpu_percent: u32) -> Mode {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = (0..cores() * 2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    Mode::Hogs { stop, threads }
}

/// A thread that SIGSTOPs a random node now and then and SIGCONTs it a moment later.
#[derive(Debug)]
struct Stalls {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stalls {
    fn start(pids: Arc<Mutex<BTreeMap<String, u32>>>, spec: StarveSpec, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5157_4e11);
            while !flag.load(Ordering::Relaxed) {
                // The fault schedule (exponential-ish gaps around the mean), not a sync wait.
                let gap = rng.random_range(spec.stall_every_ms / 2..=spec.stall_every_ms * 3 / 2);
                std::thread::sleep(Duration::from_millis(gap.max(1)));
                // The table stays locked through the stall, so a node paused on purpose
                // (`hold`) is never continued by a stall's SIGCONT.
                let p = pids
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if p.is_empty() {
                    continue;
                }
                let i = rng.random_range(0..p.len());
                let Some(pid) = p.values().nth(i).and_then(|p| i32::try_from(*p).ok()) else {
                    continue;
                };
                let stall = rng.random_range(1..=spec.stall_max_ms);
                crate::local_cluster::send_signal(pid, libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(stall)); // the stall itself
                crate::local_cluster::send_signal(pid, libc::SIGCONT);
                drop(p);
            }
        });
        Stalls {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Stalls {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Joining waits out a stall in progress, so its SIGCONT is always sent.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_variable_may_carry_a_seed() {
        let (spec, seed) =
            StarveSpec::parse_with_seed("cpu=25,seed=7,stall_every_ms=700,stall_max_ms=200")
                .unwrap();
        assert_eq!((spec.cpu_percent, spec.stall_every_ms, seed), (25, 700, 7));
        assert_eq!(StarveSpec::parse_with_seed("cpu=25").unwrap().1, 1);
        assert!(StarveSpec::parse_with_seed("cpu=25,seed=x").is_err());
    }

    #[test]
    fn specs_parse_and_refuse_nonsense() {
        let s = StarveSpec::parse("cpu=25, stall_every_ms=700,stall_max_ms=200").unwrap();
        assert_eq!(
            s,
            StarveSpec {
                cpu_percent: 25,
                stall_every_ms: 700,
                stall_max_ms: 200
            }
        );
        assert_eq!(StarveSpec::parse("cpu=40").unwrap().stall_every_ms, 0);
        for bad in [
            "cpu=0",
            "cpu=x",
            "cpus=3",
            "stall_every_ms=5",
            "cpu",
            "cpu=5000",
        ] {
            assert!(StarveSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
