//! Loopback ports for the node processes of local clusters and tests, safe to hand to a child
//! process while other test processes run beside this one.
//!
//! "Bind port 0, read the port, release it, start the node on it" hands out a port nobody holds:
//! the next call may get the same one (CI saw a node configured with `admin` equal to `listen`,
//! which refused to start, so its cluster never formed), and the OS may give it to anyone's next
//! outgoing connection as its ephemeral source port before the node binds it.
//!
//! So ports are drawn at random *below* the kernel's ephemeral range (which outgoing connections
//! never use), checked free for UDP and TCP alike, and reserved across processes by a file named
//! after the port in a shared directory, holding the owner's pid. A reservation ends when its
//! [`Port`] is dropped, or when its owner process is gone (the next caller removes it).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rand::Rng;

/// Lowest port handed out (below it live well-known and registered services).
const FLOOR: u16 = 10_000;

/// A reserved loopback port; the reservation ends on drop.
#[derive(Debug)]
pub struct Port {
    port: u16,
    file: PathBuf,
}

impl Port {
    pub fn get(&self) -> u16 {
        self.port
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Reserves a free loopback port (UDP and TCP) outside the ephemeral range.
pub fn reserve() -> Result<Port> {
    let dir = std::env::temp_dir().join("tidepool-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (lo, hi) = candidates();
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port = rng.random_range(lo..hi);
        let file = dir.join(port.to_string());
        if !claim(&file)? {
            continue;
        }
        let reserved = Port { port, file };
        if free(port) {
            return Ok(reserved);
        }
    }
    bail!("no free loopback port in {lo}..{hi} after 10000 tries")
}

/// The range to draw from: below the ephemeral range where there is room, else above it.
fn candidates() -> (u16, u16) {
    let (eph_lo, eph_hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    if eph_lo >= FLOOR + 2_000 {
        (FLOOR, eph_lo)
    } else if eph_hi < u16::MAX - 2_000 {
        (eph_hi + 1, u16::MAX)
    } else {
        // No room outside the ephemeral range: the race is back, but ports still work.
        (FLOOR, u16::MAX)
    }
}

/// Creates the reservation file; `false` if a live process holds it. A file whose owner is gone
/// is taken over.
fn claim(file: &std::path::Path) -> Result<bool> {
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
        {
            Ok(mut f) => {
                if let Err(e) = write!(f, "{}", std::process::id()) {
                    // An empty file would look like one being written, forever.
                    let _ = std::fs::remove_file(file);
                    return Err(e).with_context(|| format!("reserving {}", file.display()));
                }
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(file).unwrap_or_default();
                let alive = owner
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|pid| std::path::Path::new("/proc").join(pid.to_string()).exists());
                // An empty file is one being written right now: leave it to its owner.
                if alive || owner.is_empty() {
                    return Ok(false);
                }
                let _ = std::fs::remove_file(file);
            }
            Err(e) => return Err(e).with_context(|| format!("reserving {}", file.display())),
        }
    }
    Ok(false)
}

/// Whether nothing is bound to `port` on loopback, for UDP or TCP.
fn free(port: u16) -> bool {
    std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let (lo, hi) = candidates();
        let ports: Vec<Port> = (0..50).map(|_| reserve().unwrap()).collect();
        let mut seen = std::collections::BTreeSet::new();
        for p in &ports {
            assert!((lo..hi).contains(&p.get()));
            assert!(seen.insert(p.get()), "port {} handed out twice", p.get());
            assert!(p.file.exists());
        }
        let file = ports[0].file.clone();
        drop(ports);
        assert!(!file.exists(), "dropping a port ends its reservation");
    }

    #[test]
    fn a_reservation_of_a_dead_process_is_taken_over_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("12345");
        // pid_max is at most 2^22, so this pid never exists.
        std::fs::write(&file, "4999999").unwrap();
        assert!(claim(&file).unwrap());
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            std::process::id().to_string()
        );
        assert!(!claim(&file).unwrap(), "held by this (live) process");
    }
}
