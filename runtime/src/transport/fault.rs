//! A UDP socket under quinn that drops, delays and blocks datagrams per peer address, driven
//! by a shared [`FaultPlan`]. Built with the `fault-injection` feature, for tests and chaos runs:
//! quinn cannot tell it from a real socket, so everything above it (TLS, streams, retries,
//! reconnects) is exercised for real.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::{Rng, SeedableRng};

/// What happens to traffic to or from one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rule {
    /// Drop every datagram both ways.
    pub blocked: bool,
    /// Drop each datagram with this probability (0.0..=1.0), both ways.
    pub drop_rate: f64,
    /// Hold each outgoing datagram this long before sending it.
    pub delay: Duration,
    /// Add a random extra delay in `0..jitter` to each outgoing datagram (reorders them).
    pub jitter: Duration,
    /// Send each outgoing datagram twice with this probability.
    pub duplicate_rate: f64,
    /// `blocked` applies to outgoing datagrams only (a one-way partition: the peer still
    /// reaches us, we do not reach it).
    pub outgoing_only: bool,
}

#[derive(Debug)]
struct PlanState {
    default: Rule,
    peers: HashMap<SocketAddr, Rule>,
    rng: rand::rngs::StdRng,
    dropped: u64,
}

/// The faults to apply, shared between a test and the sockets it wraps. Seeded: the same seed
/// and the same traffic drop the same datagrams.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    state: Arc<Mutex<PlanState>>,
}

impl FaultPlan {
    pub fn new(seed: u64) -> Self {
        FaultPlan {
            state: Arc::new(Mutex::new(PlanState {
                default: Rule::default(),
                peers: HashMap::new(),
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                dropped: 0,
            })),
        }
    }

    /// Sets the rule for one peer address.
    pub fn set(&self, peer: SocketAddr, rule: Rule) {
        self.state.lock().peers.insert(peer, rule);
    }

    /// Sets the rule for every peer without one of its own.
    pub fn set_default(&self, rule: Rule) {
        self.state.lock().default = rule;
    }

    /// Blocks all traffic with `peer` (a partition).
    pub fn block(&self, peer: SocketAddr) {
        let mut s = self.state.lock();
        s.peers.entry(peer).or_default().blocked = true;
    }

    /// Removes every fault.
    pub fn heal(&self) {
        let mut s = self.state.lock();
        s.peers.clear();
        s.default = Rule::default();
    }

    /// Datagrams dropped so far (blocked or lost).
    pub fn dropped(&self) -> u64 {
        self.state.lock().dropped
    }

    /// Decides the fate of one datagram: `None` drops it, `Some((delay, duplicate))` passes it
    /// (outgoing ones may be delayed, jittered and duplicated; incoming ones only dropped).
    fn judge(&self, peer: SocketAddr, outgoing: bool) -> Option<(Duration, bool)> {
        let mut s = self.state.lock();
        let rule = s.peers.get(&peer).copied().unwrap_or(s.default);
        let blocked = rule.blocked && (outgoing || !rule.outgoing_only);
        let lost =
            blocked || (rule.drop_rate > 0.0 && s.rng.random_bool(rule.drop_rate.clamp(0.0, 1.0)));
        if lost {
            s.dropped += 1;
            return None;
        }
        if !outgoing {
            return Some((Duration::ZERO, false));
        }
        let jitter = if rule.jitter.is_zero() {
            Duration::ZERO
        } else {
            let nanos = u64::try_from(rule.jitter.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(s.rng.random_range(0..nanos))
        };
        let dup =
            rule.duplicate_rate > 0.0 && s.rng.random_bool(rule.duplicate_rate.clamp(0.0, 1.0));
        Some((rule.delay + jitter, dup))
    }
}

/// A real UDP socket with a [`FaultPlan`] in front of it.
pub struct FaultSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    plan: FaultPlan,
}

impl fmt::Debug for FaultSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

impl FaultSocket {
    /// Binds a UDP socket at `addr` and puts `plan` in front of it.
    pub fn bind(addr: SocketAddr, plan: FaultPlan) -> io::Result<Arc<Self>> {
        let udp = std::net::UdpSocket::bind(addr)?;
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, udp)?;
        Ok(Arc::new(FaultSocket { inner, plan }))
    }
}

impl AsyncUdpSocket for FaultSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match self.plan.judge(transmit.destination, true) {
            // A lost datagram looks sent: UDP gives no feedback.
            None => Ok(()),
            Some((d, dup)) if d.is_zero() => {
                if dup {
                    let _ = self.inner.try_send(transmit);
                }
                self.inner.try_send(transmit)
            }
            Some((delay, dup)) => {
                let inner = self.inner.clone();
                let (dest, ecn, src_ip) = (transmit.destination, transmit.ecn, transmit.src_ip);
                let contents = transmit.contents.to_vec();
                let segment_size = transmit.segment_size;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // A send that would block now is a lost datagram, as on a real network.
                    for _ in 0..(1 + usize::from(dup)) {
                        let _ = inner.try_send(&Transmit {
                            destination: dest,
                            ecn,
                            contents: &contents,
                            segment_size,
                            src_ip,
                        });
                    }
                });
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // One datagram (or GRO batch, always from one source) at a time, so a dropped one can be
        // discarded without compacting quinn's buffers.
        loop {
            let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
                return Poll::Ready(Ok(0));
            };
            match self
                .inner
                .poll_recv(cx, std::slice::from_mut(buf), std::slice::from_mut(m))
            {
                Poll::Ready(Ok(n)) if n > 0 => {
                    if self.plan.judge(m.addr, false).is_some() {
                        return Poll::Ready(Ok(1));
                    }
                }
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
