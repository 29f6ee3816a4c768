//! Latency histograms and Prometheus metrics.
//!
//! Each bank link's reader records latencies into its own plain HdrHistograms
//! (no lock, no atomic per sample) and adds them into its connector's shared
//! histograms about once a second, off the per-answer path. A publisher task turns
//! the shared histograms, queue depths, in-flight counts and link states into
//! `metrics` gauges, which the Prometheus exporter serves on the admin address.

use hdrhistogram::Histogram;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest latency recorded, µs (60 s); longer ones are clamped to it.
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// How often link readers hand their samples to the connector, and how often the
/// publisher refreshes gauges.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// Quantiles published per histogram.
const QUANTILES: [(f64, &str); 5] = [
    (0.5, "0.5"),
    (0.9, "0.9"),
    (0.99, "0.99"),
    (0.999, "0.999"),
    (1.0, "1"),
];

fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, LATENCY_MAX_US, 3) {
        Ok(h) => h,
        Err(_) => unreachable!("constant bounds are valid"),
    }
}

/// The stages of a payment's latency, as `/metrics` labels them (in the order
/// of [`Stages::all`]).
pub const STAGES: [&str; 4] = ["switch", "bank", "total", "journal"];

/// The latencies of one payment, µs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// From receipt to the answer handed back, less the time at the bank.
    pub switch_us: u64,
    /// From the batch written to the bank to its answer read.
    pub bank_us: u64,
    /// From receipt to the answer handed to the acquirer's session.
    pub total_us: u64,
    /// Of the switch's time, the wait for the batch's journal records to be
    /// durable: from the batch encoded to its being written to the bank.
    pub journal_us: u64,
}

impl Sample {
    /// Latencies from the four instants of a payment: received from the
    /// acquirer, its batch encoded, that batch written to the bank (once its
    /// journal records were durable), the answer read.
    pub fn new(received: Instant, encoded: Instant, written: Instant, answered: Instant) -> Sample {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(LATENCY_MAX_US);
        let total_us = us(answered.saturating_duration_since(received));
        let bank_us = us(answered.saturating_duration_since(written));
        Sample {
            switch_us: total_us.saturating_sub(bank_us),
            bank_us,
            total_us,
            journal_us: us(written.saturating_duration_since(encoded)),
        }
    }
}

/// Latency histograms by stage.
pub struct Stages {
    /// Time in the switch.
    pub switch: Histogram<u64>,
    /// Time at the bank.
    pub bank: Histogram<u64>,
    /// Total.
    pub total: Histogram<u64>,
    /// Of the time in the switch, the wait for the journal.
    pub journal: Histogram<u64>,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            switch: histogram(),
            bank: histogram(),
            total: histogram(),
            journal: histogram(),
        }
    }
}

impl Stages {
    /// The histograms in the order of [`STAGES`].
    pub fn all(&self) -> [&Histogram<u64>; 4] {
        [&self.switch, &self.bank, &self.total, &self.journal]
    }

    fn all_mut(&mut self) -> [&mut Histogram<u64>; 4] {
        [
            &mut self.switch,
            &mut self.bank,
            &mut self.total,
            &mut self.journal,
        ]
    }

    fn record(&mut self, s: Sample) {
        let values = [s.switch_us, s.bank_us, s.total_us, s.journal_us];
        for (h, v) in self.all_mut().into_iter().zip(values) {
            // Values are clamped into range, so recording cannot fail.
            let _ = h.record(v.clamp(1, LATENCY_MAX_US));
        }
    }

    fn add(&mut self, other: &Stages) {
        for (h, o) in self.all_mut().into_iter().zip(other.all()) {
            // Same bounds on both sides, so adding cannot fail.
            let _ = h.add(o);
        }
    }

    fn reset(&mut self) {
        for h in self.all_mut() {
            h.reset();
        }
    }

    /// Payments recorded.
    pub fn count(&self) -> u64 {
        self.total.len()
    }
}

/// A connector's latency histograms, fed by its links' recorders; allocated at
/// the first samples (four histograms take about 870 KB, which a connector
/// that never carried a payment, or a retired one, does not keep).
#[derive(Default)]
pub struct ConnectorLatency {
    merged: Mutex<Option<Box<Stages>>>,
}

/// Empty histograms, shown for a connector without samples.
static NO_SAMPLES: std::sync::OnceLock<Stages> = std::sync::OnceLock::new();

impl ConnectorLatency {
    /// A recorder for one link task.
    pub fn recorder(&self) -> LatencyRecorder<'_> {
        LatencyRecorder {
            shared: self,
            local: Stages::default(),
            flushed: Instant::now(),
        }
    }

    /// Runs `f` on the merged histograms (since start).
    pub fn with<R>(&self, f: impl FnOnce(&Stages) -> R) -> R {
        let merged = crate::sync::lock(&self.merged);
        f(merged
            .as_deref()
            .unwrap_or_else(|| NO_SAMPLES.get_or_init(Stages::default)))
    }
}

/// One task's latency recorder: plain histograms, added into the connector's once
/// per [`PUBLISH_INTERVAL`] and when dropped.
pub struct LatencyRecorder<'a> {
    shared: &'a ConnectorLatency,
    local: Stages,
    flushed: Instant,
}

impl LatencyRecorder<'_> {
    /// Records one payment.
    #[inline]
    pub fn record(&mut self, sample: Sample) {
        self.local.record(sample);
    }

    /// Hands samples to the connector when the interval has passed.
    pub fn maybe_flush(&mut self, now: Instant) {
        if now.saturating_duration_since(self.flushed) >= PUBLISH_INTERVAL {
            self.flush(now);
        }
    }

    /// When unflushed samples are due to be handed over (none: nothing pending).
    pub fn flush_due(&self) -> Option<Instant> {
        (self.local.count() > 0).then(|| self.flushed + PUBLISH_INTERVAL)
    }

    /// Hands samples to the connector now.
    pub fn flush(&mut self, now: Instant) {
        if self.local.count() > 0 {
            let mut merged = crate::sync::lock(&self.shared.merged);
            merged.get_or_insert_with(Box::default).add(&self.local);
            drop(merged);
            self.local.reset();
        }
        self.flushed = now;
    }
}

impl Drop for LatencyRecorder<'_> {
    fn drop(&mut self) {
        self.flush(Instant::now());
    }
}

/// Gauges `switchyard_latency_us{connector, stage, quantile}` and
/// `switchyard_latency_samples{connector}` of one connector, registered once.
pub struct LatencyGauges {
    quantiles: Vec<(usize, f64, metrics::Gauge)>,
    samples: metrics::Gauge,
}

impl LatencyGauges {
    /// Registers the gauges of `connector`.
    pub fn new(connector: &str) -> LatencyGauges {
        let mut quantiles = Vec::with_capacity(STAGES.len() * QUANTILES.len());
        for (stage_index, stage) in STAGES.into_iter().enumerate() {
            for (q, label) in QUANTILES {
                let gauge = metrics::gauge!(
                    "switchyard_latency_us",
                    "connector" => connector.to_owned(),
                    "stage" => stage,
                    "quantile" => label
                );
                quantiles.push((stage_index, q, gauge));
            }
        }
        let samples =
            metrics::gauge!("switchyard_latency_samples", "connector" => connector.to_owned());
        LatencyGauges { quantiles, samples }
    }

    /// Sets the gauges from the connector's histograms.
    pub fn set(&self, latency: &ConnectorLatency) {
        latency.with(|stages| {
            let all = stages.all();
            for (stage, q, gauge) in &self.quantiles {
                let h = all[*stage];
                gauge.set(if h.is_empty() {
                    0.0
                } else {
                    h.value_at_quantile(*q) as f64
                });
            }
            self.samples.set(stages.count() as f64);
        });
    }
}

/// Upper bounds of the Prometheus latency histogram buckets, µs (100 µs to 60 s;
/// `+Inf` follows).
pub const LATENCY_BUCKETS_US: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Seconds with up to six decimals and no trailing zeros (`0.0025`, `1`).
fn seconds(us: u64) -> String {
    let text = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Appends `switchyard_latency_seconds`, a Prometheus histogram per connector
/// and stage (time in the switch, at the bank, total; cumulative since start),
/// rendered from the connectors' HdrHistograms (counts and sum exact to their
/// 0.1 % resolution). `connectors` gives each connector's label and histograms.
pub fn render_histograms<'a>(
    out: &mut String,
    connectors: impl Iterator<Item = (String, &'a ConnectorLatency)>,
) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP switchyard_latency_seconds Payment latency by connector and stage \
         (switch: time in the switch; bank: time at the bank; total: receipt to answer; \
         journal: of the switch's time, the wait for the journal before the bank write)."
    );
    let _ = writeln!(out, "# TYPE switchyard_latency_seconds histogram");
    for (connector, latency) in connectors {
        latency.with(|stages| {
            for (stage, h) in STAGES.into_iter().zip(stages.all()) {
                let labels = format!("connector=\"{connector}\",stage=\"{stage}\"");
                for le in LATENCY_BUCKETS_US {
                    let n = if h.is_empty() {
                        0
                    } else {
                        h.count_between(0, le)
                    };
                    let _ = writeln!(
                        out,
                        "switchyard_latency_seconds_bucket{{{labels},le=\"{}\"}} {n}",
                        seconds(le)
                    );
                }
                let _ = writeln!(
                    out,
                    "switchyard_latency_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                    h.len()
                );
                let sum_us: u64 = h
                    .iter_recorded()
                    .map(|v| h.median_equivalent(v.value_iterated_to()) * v.count_at_value())
                    .sum();
                let _ = writeln!(
                    out,
                    "switchyard_latency_seconds_sum{{{labels}}} {}",
                    seconds(sum_us)
                );
                let _ = writeln!(
                    out,
                    "switchyard_latency_seconds_count{{{labels}}} {}",
                    h.len()
                );
            }
        });
    }
}

/// Installs the Prometheus recorder (once per process); the admin endpoint
/// renders `/metrics` from the handle.
pub fn install_recorder(
) -> Result<metrics_exporter_prometheus::PrometheusHandle, metrics_exporter_prometheus::BuildError>
{
    metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_split_switch_and_bank_time() {
        let t0 = Instant::now();
        let s = Sample::new(
            t0,
            t0 + Duration::from_micros(100),
            t0 + Duration::from_micros(300),
            t0 + Duration::from_micros(1000),
        );
        assert_eq!((s.switch_us, s.bank_us, s.total_us), (300, 700, 1000));
        assert_eq!(s.journal_us, 200, "encoded to written");
        let latency = ConnectorLatency::default();
        {
            let mut r = latency.recorder();
            for _ in 0..100 {
                r.record(s);
            }
            assert_eq!(
                latency.with(Stages::count),
                0,
                "not flushed before the interval"
            );
        }
        assert_eq!(latency.with(Stages::count), 100, "flushed on drop");
        let mut text = String::new();
        render_histograms(&mut text, std::iter::once(("200001".to_owned(), &latency)));
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let bank = "switchyard_latency_seconds_bucket{connector=\"200001\",stage=\"bank\"";
        assert_eq!(line(&format!("{bank},le=\"0.0005\"}}")), "0");
        assert_eq!(line(&format!("{bank},le=\"0.001\"}}")), "100");
        assert_eq!(line(&format!("{bank},le=\"+Inf\"}}")), "100");
        let sum = line("switchyard_latency_seconds_sum{connector=\"200001\",stage=\"bank\"}");
        assert!(sum.starts_with("0.07"), "100 × 700 µs: {sum}");
        assert_eq!(seconds(2_500), "0.0025");
        assert_eq!(seconds(60_000_000), "60");
        let p99 = latency.with(|s| s.bank.value_at_quantile(0.99));
        assert!((699..=701).contains(&p99));
    }
}
