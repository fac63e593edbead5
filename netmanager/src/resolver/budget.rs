//! How much work misses may cause: lookups in flight overall, per sending
//! host and per container, the query rates to the cluster (token buckets),
//! and the frames held meanwhile. A flood from one container or one host
//! uses up its own share, never what everyone else's first packets need.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use worker_common::logging::LogBudget;

use super::MissKey;
use crate::dataplane::{Miss, MissReason};

/// Addresses resolved at the same time, at most. A container sending to
/// random service addresses gets its misses refused beyond this, and the
/// node keeps answering everyone else.
pub const MAX_LOOKUPS: usize = 256;
/// Table queries per second to the cluster, on average, and the burst.
pub(super) const QUERIES_PER_SECOND: f64 = 50.0;
pub(super) const QUERY_BURST: f64 = 100.0;
/// The same for tunnel misses, a budget of their own: a flood from the
/// underlay cannot use up what the local containers need.
pub(super) const PEER_QUERIES_PER_SECOND: f64 = 20.0;
pub(super) const PEER_QUERY_BURST: f64 = 40.0;
/// Tunnel lookups in flight per sending host, at most.
pub const MAX_LOOKUPS_PER_PEER: usize = 16;
/// One container's share: lookups in flight, and queries per second with
/// their burst. A container sending to thousands of unknown addresses uses
/// up its own share, not the lookups its neighbours' first packets need.
pub const MAX_LOOKUPS_PER_CONTAINER: usize = 32;
pub(super) const CONTAINER_QUERIES_PER_SECOND: f64 = 10.0;
pub(super) const CONTAINER_QUERY_BURST: f64 = 20.0;
/// Per-container budgets kept before idle (full again) ones are forgotten.
pub(super) const CONTAINER_BUDGETS_KEPT: usize = 1024;
/// Frames kept per lookup (the programs hold `miss_hold` per address; this
/// bounds what a cleared and refilled mark could add).
pub(super) const MAX_FRAMES_PER_LOOKUP: usize = 16;
/// Frames of a container parked on one failed address (the newest are
/// kept), and on all of them together: a client that keeps dialing an
/// address the cluster knows no instance behind yet has its latest SYNs
/// sent through the moment a table result names one.
pub(super) const MAX_PARKED_PER_ADDRESS: usize = 4;
pub(super) const MAX_PARKED_FRAMES: usize = 256;
/// Unresolved-miss log lines per minute; the rest are counted and summed up.
pub(super) const LOG_LINES_PER_MINUTE: u32 = 20;

/// Who a miss is charged to: the host that sent a tunnel datagram, or the
/// interface (a container's veth) a container's packet came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Origin {
    Peer(IpAddr),
    Interface(u32),
}

impl Origin {
    pub(super) fn of(miss: &Miss) -> Origin {
        match miss.reason {
            MissReason::Peer => {
                Origin::Peer(miss.peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
            }
            _ => Origin::Interface(miss.ifindex),
        }
    }

    pub(super) fn max_lookups(self) -> usize {
        match self {
            Origin::Peer(_) => MAX_LOOKUPS_PER_PEER,
            Origin::Interface(_) => MAX_LOOKUPS_PER_CONTAINER,
        }
    }
}

/// A held frame and, for a tunnel datagram, who sent it.
pub(super) struct HeldFrame {
    pub(super) sender: Option<IpAddr>,
    pub(super) bytes: Vec<u8>,
}

/// A lookup that failed: misses for its address are refused until
/// `NEGATIVE_TTL` after `at`, or until a table result answers it; a
/// container's frames refused meanwhile are parked here.
pub(super) struct Failure {
    pub(super) at: Instant,
    pub(super) parked: Vec<HeldFrame>,
}

pub(super) struct Pending {
    /// Frames held per miss while its lookup is in flight.
    pub(super) frames: HashMap<MissKey, Vec<HeldFrame>>,
    /// When each lookup in flight started.
    pub(super) started: HashMap<MissKey, Instant>,
    pub(super) failed: HashMap<MissKey, Failure>,
    /// (inner source, sender) pairs whose datagrams were refused because
    /// the cluster names another node: a host repeating a known
    /// instance's address costs one question per `NEGATIVE_TTL`, not one
    /// per datagram. Keyed by sender, so it never refuses the real node.
    pub(super) wrong_sender: HashMap<(IpAddr, Option<IpAddr>), Instant>,
    pub(super) queries: TokenBucket,
    pub(super) peer_queries: TokenBucket,
    /// Lookups in flight per sending host or container.
    pub(super) per_origin: HashMap<Origin, usize>,
    /// Each container's own query budget, by interface.
    pub(super) per_container: HashMap<u32, TokenBucket>,
    pub(super) log: LogBudget<LOG_LINES_PER_MINUTE>,
}

impl Pending {
    /// Parks a container's frame on the failed lookup `key`: the newest
    /// [`MAX_PARKED_PER_ADDRESS`], within [`MAX_PARKED_FRAMES`] in all.
    pub(super) fn park(&mut self, key: &MissKey, frame: HeldFrame) {
        let total: usize = self.failed.values().map(|f| f.parked.len()).sum();
        let Some(f) = self.failed.get_mut(key) else {
            return;
        };
        if f.parked.len() >= MAX_PARKED_PER_ADDRESS {
            f.parked.remove(0);
        } else if total >= MAX_PARKED_FRAMES {
            return;
        }
        f.parked.push(frame);
    }

    /// Takes a query token for a lookup charged to `origin`: from the
    /// container's own budget and the containers' common one, or from the
    /// tunnel budget.
    pub(super) fn take_query(&mut self, origin: Origin) -> bool {
        match origin {
            Origin::Peer(_) => self.peer_queries.take(),
            Origin::Interface(ifindex) => {
                if self.per_container.len() >= CONTAINER_BUDGETS_KEPT {
                    self.per_container.retain(|_, b| !b.idle());
                }
                let own = self.per_container.entry(ifindex).or_insert_with(|| {
                    TokenBucket::new(CONTAINER_QUERIES_PER_SECOND, CONTAINER_QUERY_BURST)
                });
                own.take() && self.queries.take()
            }
        }
    }
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            frames: HashMap::new(),
            started: HashMap::new(),
            failed: HashMap::new(),
            wrong_sender: HashMap::new(),
            queries: TokenBucket::new(QUERIES_PER_SECOND, QUERY_BURST),
            peer_queries: TokenBucket::new(PEER_QUERIES_PER_SECOND, PEER_QUERY_BURST),
            per_origin: HashMap::new(),
            per_container: HashMap::new(),
            log: LogBudget::default(),
        }
    }
}

/// Token bucket for table queries.
pub(super) struct TokenBucket {
    pub(super) tokens: f64,
    pub(super) at: Instant,
    pub(super) rate: f64,
    pub(super) burst: f64,
}

impl TokenBucket {
    pub(super) fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            at: Instant::now(),
            rate,
            burst,
        }
    }

    pub(super) fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Full again: forgetting it changes nothing.
    pub(super) fn idle(&self) -> bool {
        self.tokens + self.at.elapsed().as_secs_f64() * self.rate >= self.burst
    }
}
