//! What a reload replaces while the switch runs: the config in force, the route
//! table (numbered by connector slot), the certificate mapping, each
//! institution's rate limit, the bank connectors, and the TLS acceptor.
//!
//! A [`Live`] is immutable; a reload builds a new one and swaps it in whole.
//! Sessions keep their own `Arc<Live>` and look at the shared one only when its
//! generation moved, so the hot path pays one relaxed atomic load per request.

use super::connector::Connector;
use crate::config::{Config, Institution};
use crate::core::route::{BankIndex, RouteTable};
use crate::core::InstitutionId;
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// Most connector slots a process uses: each bank added or replaced by a reload
/// takes a new slot (removed banks keep theirs, so that answers and reversals
/// that name them stay valid). Past it, a reload that adds banks is refused and
/// a restart renumbers.
pub const CONNECTOR_SLOTS_MAX: usize = 8192;

/// The state of one institution that outlives reloads: its rate limiter (kept
/// while its rate is unchanged) and its count of requests in flight.
pub struct InstitutionState {
    /// Its config entry.
    pub config: Institution,
    /// GCRA limiter, lock-free.
    pub limiter: Arc<governor::DefaultDirectRateLimiter>,
    /// Requests refused by the rate limit.
    pub refused: metrics::Counter,
    /// Requests in flight (shared with the previous generation's state).
    pub inflight: Arc<AtomicUsize>,
    /// Requests refused at `inflight_per_institution_max`.
    pub inflight_refused: metrics::Counter,
}

impl InstitutionState {
    /// State for `i`, carrying over `previous`'s counters (and its limiter, when
    /// the rate did not change).
    fn new(i: &Institution, previous: Option<&InstitutionState>) -> InstitutionState {
        let same_rate = |p: &&InstitutionState| {
            p.config.rate_per_s == i.rate_per_s && p.config.rate_burst == i.rate_burst
        };
        let limiter = match previous.filter(same_rate) {
            Some(p) => p.limiter.clone(),
            None => Arc::new(rate_limiter(i)),
        };
        InstitutionState {
            config: i.clone(),
            limiter,
            refused: metrics::counter!("switchyard_rate_limited_total", "institution" => i.id.to_string()),
            inflight: previous
                .map_or_else(|| Arc::new(AtomicUsize::new(0)), |p| p.inflight.clone()),
            inflight_refused: metrics::counter!(
                "switchyard_institution_inflight_refused_total",
                "institution" => i.id.to_string()
            ),
        }
    }
}

/// The rate limiter of an institution's config.
fn rate_limiter(i: &Institution) -> governor::DefaultDirectRateLimiter {
    let per_s = std::num::NonZeroU32::new(i.rate_per_s).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(i.rate_burst).unwrap_or(std::num::NonZeroU32::MIN);
    governor::RateLimiter::direct(governor::Quota::per_second(per_s).allow_burst(burst))
}

/// One generation of everything a reload may change.
pub struct Live {
    /// The config in force (its limits; its banks in config order).
    pub config: Arc<Config>,
    /// Routes, naming connector slots (not config positions).
    pub routes: RouteTable,
    /// Every connector slot, retired ones included (indexed by [`BankIndex`]).
    pub connectors: Arc<[Arc<Connector>]>,
    /// The slot of each configured bank, in config order.
    pub active: Vec<BankIndex>,
    /// Certificate identity to institution.
    pub by_certificate: HashMap<String, InstitutionId>,
    /// Per-institution state.
    pub institutions: HashMap<InstitutionId, InstitutionState>,
    /// Server TLS for new acquirer connections.
    pub tls: Arc<rustls::ServerConfig>,
}

impl Live {
    /// A generation over `config`, whose banks are `active` (slots into
    /// `connectors`, in config order); institution state carries over from
    /// `previous`.
    pub fn new(
        config: Arc<Config>,
        connectors: Arc<[Arc<Connector>]>,
        active: Vec<BankIndex>,
        tls: Arc<rustls::ServerConfig>,
        previous: Option<&Live>,
    ) -> Live {
        let mut routes = config.routes.clone();
        routes.map_banks(|position| {
            active
                .get(usize::from(position))
                .copied()
                .unwrap_or(position)
        });
        let institutions = config
            .institutions
            .iter()
            .map(|i| {
                let old = previous.and_then(|p| p.institutions.get(&i.id));
                (i.id, InstitutionState::new(i, old))
            })
            .collect();
        Live {
            by_certificate: config.institutions_by_certificate(),
            routes,
            connectors,
            active,
            institutions,
            tls,
            config,
        }
    }

    /// The connector in slot `bank`, if any.
    pub fn connector(&self, bank: BankIndex) -> Option<&Arc<Connector>> {
        self.connectors.get(usize::from(bank))
    }

    /// Slot `bank`, or, when a reload retired it, the slot now serving the same
    /// bank id (a reversal goes to the bank that saw its original).
    pub fn serving(&self, bank: BankIndex) -> BankIndex {
        let Some(c) = self.connector(bank) else {
            return bank;
        };
        if !c.is_retired() {
            return bank;
        }
        let id = c.bank().id;
        self.active
            .iter()
            .copied()
            .find(|&b| self.connector(b).is_some_and(|o| o.bank().id == id))
            .unwrap_or(bank)
    }

    /// The configured banks' connectors, in config order.
    pub fn active_connectors(&self) -> impl Iterator<Item = &Arc<Connector>> {
        self.active.iter().filter_map(|&b| self.connector(b))
    }
}
