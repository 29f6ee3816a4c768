//! Gauges: published once a second (and before each scrape), read from the
//! sessions, the connectors, the duplicates table and the journal.

use crate::core::recent::Recent;
use crate::journal::Journal;
use crate::net::connector::Connector;
use crate::net::ingress::Ingress;
use crate::telemetry::{self, PUBLISH_INTERVAL};
use std::sync::Arc;
use switchyard_security::payshield::PayShieldModule;
use tokio_util::sync::CancellationToken;

/// What the gauges are read from.
pub(super) struct Published {
    pub(super) ingress: Arc<Ingress>,
    pub(super) recent: Arc<Recent>,
    pub(super) journal: Option<Arc<Journal>>,
    /// The payShield client the switch started with (`[keys.payshield]`).
    pub(super) payshield: Option<Arc<PayShieldModule>>,
}

/// Refreshes gauges once per [`PUBLISH_INTERVAL`] until shutdown, and expires the
/// duplicates table's old keys.
pub(super) async fn publish_loop(p: Published, shutdown: CancellationToken) {
    let mut gauges = Gauges::new();
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                // Keys past the window go even where no request comes to expire them.
                p.recent.expire(std::time::Instant::now());
                gauges.publish(&p);
            }
        }
    }
}

/// Every gauge the switch publishes, registered once: latency quantiles, queue
/// depth, requests in flight and links up per connector, acquirer connections.
pub(super) struct Gauges {
    connectors: Vec<ConnectorGauges>,
    connections: metrics::Gauge,
    duplicates: metrics::Gauge,
    duplicates_capacity: metrics::Gauge,
    duplicates_bytes: metrics::Gauge,
    duplicates_window: metrics::Gauge,
    duplicates_evicted: metrics::Counter,
    /// Early evictions as of the last publication.
    evicted_before: u64,
    journal_segments: metrics::Gauge,
    journal_bytes: metrics::Gauge,
    journal_queue: metrics::Gauge,
}

/// The payShield client's counters, published as they stand (a counter the
/// client keeps, so `absolute`).
fn publish_payshield(module: &PayShieldModule) {
    let stats = module.stats();
    metrics::counter!("switchyard_payshield_commands_total").absolute(stats.requests);
    metrics::counter!("switchyard_payshield_failures_total").absolute(stats.failures);
    metrics::counter!("switchyard_payshield_busy_total").absolute(stats.busy);
    metrics::counter!("switchyard_payshield_reconnects_total").absolute(stats.reconnects);
    metrics::gauge!("switchyard_payshield_connections_open").set(stats.connections_open as f64);
}

struct ConnectorGauges {
    latency: telemetry::LatencyGauges,
    queue_depth: metrics::Gauge,
    inflight: metrics::Gauge,
    links_up: metrics::Gauge,
    saf_depth: metrics::Gauge,
}

impl ConnectorGauges {
    fn new(c: &Connector) -> ConnectorGauges {
        let label = c.bank().id.to_string();
        ConnectorGauges {
            latency: telemetry::LatencyGauges::new(&label),
            queue_depth: metrics::gauge!("switchyard_connector_queue_depth", "connector" => label.clone()),
            inflight: metrics::gauge!("switchyard_connector_inflight", "connector" => label.clone()),
            links_up: metrics::gauge!("switchyard_connector_links_up", "connector" => label.clone()),
            saf_depth: metrics::gauge!("switchyard_reversals_waiting", "connector" => label),
        }
    }
}

impl Gauges {
    pub(super) fn new() -> Gauges {
        Gauges {
            connectors: Vec::new(),
            connections: metrics::gauge!("switchyard_acquirer_connections"),
            duplicates: metrics::gauge!("switchyard_duplicates_entries"),
            duplicates_capacity: metrics::gauge!("switchyard_duplicates_capacity"),
            duplicates_bytes: metrics::gauge!("switchyard_duplicates_bytes"),
            duplicates_window: metrics::gauge!("switchyard_duplicates_window_seconds"),
            duplicates_evicted: metrics::counter!("switchyard_duplicates_evicted_early_total"),
            evicted_before: 0,
            journal_segments: metrics::gauge!("switchyard_journal_segments"),
            journal_bytes: metrics::gauge!("switchyard_journal_bytes"),
            journal_queue: metrics::gauge!("switchyard_journal_queue_depth"),
        }
    }

    /// Sets every gauge; connector slots a reload added get theirs first, and
    /// retired connectors are left out (a replacement has the same labels).
    pub(super) fn publish(&mut self, p: &Published) {
        let live = p.ingress.live();
        for c in live.connectors.get(self.connectors.len()..).unwrap_or(&[]) {
            self.connectors.push(ConnectorGauges::new(c));
        }
        for (c, g) in live.connectors.iter().zip(&self.connectors) {
            if c.is_retired() {
                continue;
            }
            g.latency.set(&c.latency);
            g.queue_depth.set(c.queue_depth() as f64);
            g.inflight.set(c.inflight() as f64);
            g.links_up.set(c.links_up() as f64);
            g.saf_depth.set(c.reversals_waiting() as f64);
        }
        self.connections.set(p.ingress.connections() as f64);
        self.publish_duplicates(&p.recent);
        if let Some(journal) = &p.journal {
            let (segments, bytes) = journal.disk_usage();
            self.journal_segments.set(segments as f64);
            self.journal_bytes.set(bytes as f64);
            self.journal_queue.set(journal.queue_depth() as f64);
        }
        if let Some(module) = &p.payshield {
            publish_payshield(module);
        }
    }

    /// The duplicates table: keys, bound, memory, the window it guarantees, and
    /// early evictions (warned of, rate-limited, while they happen).
    fn publish_duplicates(&mut self, recent: &Recent) {
        let table = recent.table();
        let now = std::time::Instant::now();
        let window = table.effective_window(now);
        self.duplicates.set(table.len() as f64);
        self.duplicates_capacity.set(table.capacity() as f64);
        self.duplicates_bytes.set(table.bytes() as f64);
        self.duplicates_window.set(window.as_secs() as f64);
        let evicted = table.evicted_early();
        self.duplicates_evicted.absolute(evicted);
        if evicted > self.evicted_before {
            crate::log_limited!(
                warn,
                evicted_early = evicted - self.evicted_before,
                effective_window_s = window.as_secs(),
                window_s = table.window().as_secs(),
                "duplicates table full (duplicates.memory_max_bytes): answered keys evicted \
                 before their window passed"
            );
        }
        self.evicted_before = evicted;
    }
}
