//! Live progress: recent figures handed over by the connections, one line per second.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::summary::thousands;
use super::{Plan, Templates, CLOSE_TIMEOUT_MS, PROGRESS_INTERVAL_MS};

/// Answers (their latencies), errors and timeouts not yet reported, warmup included.
pub(super) struct Recent {
    pub(super) latency: Histogram<u64>,
    pub(super) errors: u64,
    pub(super) timeouts: u64,
}

impl Recent {
    pub(super) fn new(templates: &Templates) -> Recent {
        Recent {
            latency: Histogram::new_from(&templates.coarse),
            errors: 0,
            timeouts: 0,
        }
    }

    /// Moves everything in `other` into `self`, leaving `other` empty.
    pub(super) fn absorb(&mut self, other: &mut Recent) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        other.clear();
    }

    fn clear(&mut self) {
        self.latency.reset();
        self.errors = 0;
        self.timeouts = 0;
    }
}

/// Prints a progress line on stderr every [`PROGRESS_INTERVAL_MS`] until `stop` fires (or,
/// at the latest, shortly after the run must have ended).
pub(super) async fn report_progress(plan: Arc<Plan>, mut stop: oneshot::Receiver<()>) {
    let period = Duration::from_millis(PROGRESS_INTERVAL_MS);
    let end = plan.drain_until + Duration::from_millis(CLOSE_TIMEOUT_MS) + period;
    let mut recent = Recent::new(&plan.templates);
    let (mut answers, mut errors, mut timeouts) = (0u64, 0u64, 0u64);
    let mut last = plan.start;
    let mut next = plan.start + period;
    while next <= end {
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep_until(next) => {}
        }
        next += period;
        let now = Instant::now();
        // Held for one copy of a small histogram; connections only ever `try_lock` it.
        recent.absorb(&mut switchyard::sync::lock(&plan.live));
        let interval_answers = recent.latency.len();
        answers += interval_answers;
        errors += recent.errors;
        timeouts += recent.timeouts;
        let secs = now.saturating_duration_since(last).as_secs_f64();
        // The phase the interval began in.
        let phase = if last < plan.measure_from {
            "warmup"
        } else if last >= plan.send_until {
            "draining"
        } else {
            ""
        };
        last = now;
        let line = ProgressLine {
            elapsed_s: now.saturating_duration_since(plan.start).as_secs_f64(),
            tps: if secs > 0.0 {
                interval_answers as f64 / secs
            } else {
                0.0
            },
            answers,
            errors,
            timeouts,
            p99_us: (!recent.latency.is_empty()).then(|| recent.latency.value_at_quantile(0.99)),
            phase,
        };
        eprintln!("{}", line.render());
        recent.clear();
    }
}

/// One line of live progress.
struct ProgressLine {
    elapsed_s: f64,
    /// Answers per second over the last interval.
    tps: f64,
    /// Totals since the start, warmup included.
    answers: u64,
    errors: u64,
    timeouts: u64,
    /// 99th percentile of the last interval's answers, in microseconds.
    p99_us: Option<u64>,
    /// The phase the interval began in: "warmup", "draining" or "" (measuring).
    phase: &'static str,
}

impl ProgressLine {
    /// `[  3s] 412,345 tps  answers 1,234,567  errors 0  timeouts 0  p99 1.4 ms`
    fn render(&self) -> String {
        let tps = if self.tps.is_finite() && self.tps > 0.0 {
            self.tps.round() as u64
        } else {
            0
        };
        let p99 = self
            .p99_us
            .map_or("-".to_owned(), |us| format!("{:.1} ms", us as f64 / 1000.0));
        let mut line = format!(
            "[{:>3.0}s] {} tps  answers {}  errors {}  timeouts {}  p99 {p99}",
            self.elapsed_s.max(0.0),
            thousands(tps),
            thousands(self.answers),
            thousands(self.errors),
            thousands(self.timeouts),
        );
        if !self.phase.is_empty() {
            let _ = write!(line, "  ({})", self.phase);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        let line = ProgressLine {
            elapsed_s: 3.2,
            tps: 412_345.4,
            answers: 1_234_567,
            errors: 0,
            timeouts: 0,
            p99_us: Some(1_400),
            phase: "",
        };
        assert_eq!(
            line.render(),
            "[  3s] 412,345 tps  answers 1,234,567  errors 0  timeouts 0  p99 1.4 ms"
        );
        let warmup = ProgressLine {
            p99_us: None,
            phase: "warmup",
            ..line
        };
        assert!(warmup.render().ends_with("p99 -  (warmup)"));
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }
}
