//! Results: the per-connection tallies, how answers are counted, and the summary of a run
//! with its renderings.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use switchyard::core::ResponseCode;

use super::{Plan, Templates, BEHIND_LAG_MS};

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub(super) fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    fn json(&self) -> String {
        format!(
            "{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

/// The result of a run. Counts cover the measured period only (see the module docs).
/// `Debug` shows [`Summary::full_json`] (not the histogram's thousands of counters).
#[derive(Clone, serde::Serialize)]
pub struct Summary {
    /// Requests written.
    pub sent: u64,
    /// Answers with DE39 00.
    pub approved: u64,
    /// Answers with a bank decline (any code that is neither 00 nor a switch code).
    pub declined: u64,
    /// Switch/system codes (12 13 30 58 65 91 92 94 96), unexpected answers, and failed
    /// connections (one each, plus one per request in flight).
    pub errors: u64,
    /// Requests unanswered within `answer_timeout`, and answers with DE39 68.
    pub timeouts: u64,
    /// Matched answers per second of the measured period.
    pub tps: f64,
    /// Wall time of the run, connecting, warmup and draining included, in milliseconds.
    pub elapsed_ms: u64,
    /// Latency of matched answers, from the (intended) send time.
    pub latency_us: Latency,
    /// Every DE39 value seen, with its count.
    pub codes: BTreeMap<String, u64>,
    /// Open-loop rate asked for, requests per second; `None`: closed loop.
    pub rate: Option<u64>,
    /// Connections asked for.
    pub connections: usize,
    /// Requests in flight per connection, at most.
    pub window: usize,
    /// Unrecorded load before the measured period, in milliseconds.
    pub warmup_ms: u64,
    /// Length of the measured period, in milliseconds.
    pub duration_ms: u64,
    /// Requests sent within the measured period per second of it. Open loop: requests due in
    /// its last moments may be written just after it (timer resolution) and are not counted
    /// here, so a generator on schedule shows a hair under the rate.
    pub send_rate: f64,
    /// Open loop: how long after its intended time each request was written, in microseconds
    /// (timer resolution, scheduling, and waiting for a full window).
    pub send_lag_us: Latency,
    /// Open loop: requests due in the measured period that were never sent (their window
    /// stayed full, or their connection failed).
    pub unsent: u64,
    /// Open loop: the generator fell behind its schedule (a send lagged more than
    /// [`BEHIND_LAG_MS`], or requests were left unsent on a working connection).
    pub behind: bool,
    /// The latency distribution, in microseconds, for [`hgrm_text`](super::hgrm_text) and
    /// [`write_plot`](super::write_plot).
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

impl std::fmt::Debug for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.full_json())
    }
}

/// `tps` with one decimal; non-finite values (never expected) as 0.0 so the JSON stays valid.
fn tps_1dp(tps: f64) -> String {
    if tps.is_finite() {
        format!("{tps:.1}")
    } else {
        "0.0".to_owned()
    }
}

impl Summary {
    /// Exactly `{"approved":N,"declined":N,"errors":N,"timeouts":N,"tps":X,
    /// "latency_us":{"p50":N,"p99":N,"p999":N,"max":N}}`, keys in that order, `tps` with one
    /// decimal.
    pub fn demo_json(&self) -> String {
        let l = &self.latency_us;
        format!(
            "{{\"approved\":{},\"declined\":{},\"errors\":{},\"timeouts\":{},\"tps\":{},\
             \"latency_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}}}}",
            self.approved,
            self.declined,
            self.errors,
            self.timeouts,
            tps_1dp(self.tps),
            l.p50,
            l.p99,
            l.p999,
            l.max
        )
    }

    /// The whole summary as one JSON object: sent, approved, declined, errors, timeouts,
    /// tps (one decimal), latency_us {p50, p90, p99, p999, max}, then elapsed_ms, codes,
    /// mode ("open" or "closed"), rate (null in the closed loop), connections, window,
    /// warmup_ms, duration_ms, send_rate, behind, unsent, send_lag_us {p50 … max}.
    pub fn full_json(&self) -> String {
        let mut out = format!(
            "{{\"sent\":{},\"approved\":{},\"declined\":{},\"errors\":{},\"timeouts\":{},\
             \"tps\":{},\"latency_us\":{},\"elapsed_ms\":{},\"codes\":",
            self.sent,
            self.approved,
            self.declined,
            self.errors,
            self.timeouts,
            tps_1dp(self.tps),
            self.latency_us.json(),
            self.elapsed_ms,
        );
        // A map of strings to integers always serialises.
        out.push_str(&serde_json::to_string(&self.codes).unwrap_or_else(|_| "{}".to_owned()));
        let _ = write!(
            out,
            ",\"mode\":\"{}\",\"rate\":{},\"connections\":{},\"window\":{},\"warmup_ms\":{},\
             \"duration_ms\":{},\"send_rate\":{},\"behind\":{},\"unsent\":{},\"send_lag_us\":{}}}",
            self.mode(),
            self.rate.map_or("null".to_owned(), |r| r.to_string()),
            self.connections,
            self.window,
            self.warmup_ms,
            self.duration_ms,
            tps_1dp(self.send_rate),
            self.behind,
            self.unsent,
            self.send_lag_us.json(),
        );
        out
    }

    fn mode(&self) -> &'static str {
        if self.rate.is_some() {
            "open"
        } else {
            "closed"
        }
    }

    /// One line describing the load, e.g. "open loop 1,000 requests/s, 1 connection,
    /// window 2,000".
    pub fn load_description(&self) -> String {
        let connections = match self.connections {
            1 => "1 connection".to_owned(),
            n => format!("{} connections", thousands(n as u64)),
        };
        let window = thousands(self.window as u64);
        match self.rate {
            Some(rate) => format!(
                "open loop {} requests/s, {connections}, window {window}",
                thousands(rate)
            ),
            None => format!("closed loop, {connections}, window {window}"),
        }
    }

    /// A warning to print when the generator fell behind its schedule; `None` when it did not.
    pub fn behind_warning(&self) -> Option<String> {
        if !self.behind {
            return None;
        }
        let unsent = match self.unsent {
            0 => String::new(),
            n => format!(", {} requests never sent", thousands(n)),
        };
        Some(format!(
            "the load generator fell behind its schedule: sends lagged up to {:.1} ms after \
             their intended times{unsent}; sent {}/s of the {}/s asked. Either the window \
             ({}) stayed full (the target is slower than the rate) or this machine could not \
             keep up; latency is still counted from the intended times.",
            self.send_lag_us.max as f64 / 1000.0,
            tps_1dp(self.send_rate),
            thousands(self.rate.unwrap_or(0)),
            thousands(self.window as u64),
        ))
    }

    /// A human-readable summary, one figure per line.
    pub fn render(&self) -> String {
        let l = &self.latency_us;
        let mut out = String::new();
        let secs = self.duration_ms as f64 / 1000.0;
        let _ = writeln!(out, "load        {}", self.load_description());
        let _ = writeln!(
            out,
            "measured    {secs:.2} s after {:.2} s of warmup ({:.2} s in all)",
            self.warmup_ms as f64 / 1000.0,
            self.elapsed_ms as f64 / 1000.0
        );
        let _ = writeln!(out, "sent        {}", self.sent);
        let _ = writeln!(out, "approved    {}", self.approved);
        let _ = writeln!(out, "declined    {}", self.declined);
        let _ = writeln!(out, "errors      {}", self.errors);
        let _ = writeln!(out, "timeouts    {}", self.timeouts);
        let _ = writeln!(out, "throughput  {} tps", tps_1dp(self.tps));
        let _ = writeln!(
            out,
            "latency us  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        if let Some(rate) = self.rate {
            let lag = &self.send_lag_us;
            let _ = writeln!(
                out,
                "sending     {}/s of {rate}/s asked{}{}",
                tps_1dp(self.send_rate),
                if self.unsent > 0 {
                    format!(", {} never sent", self.unsent)
                } else {
                    String::new()
                },
                if self.behind { " (behind)" } else { "" }
            );
            let _ = writeln!(
                out,
                "send lag us p50 {}  p99 {}  max {}",
                lag.p50, lag.p99, lag.max
            );
        }
        let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c}={n}")).collect();
        let _ = writeln!(out, "codes       {}", codes.join(" "));
        out
    }
}

/// `n` with a comma every three digits: 1234567 → "1,234,567".
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// === tallies ===

/// Counts and latencies of the measured requests of one connection, merged at the end.
pub(super) struct Tally {
    pub(super) sent: u64,
    /// Open loop: measured requests sent only after the measured period (a backlog).
    pub(super) sent_late: u64,
    pub(super) answered: u64,
    pub(super) approved: u64,
    pub(super) declined: u64,
    pub(super) errors: u64,
    pub(super) timeouts: u64,
    pub(super) unsent: u64,
    /// Requests were left unsent on a connection that kept working.
    pub(super) behind: bool,
    /// DE39 values seen; few distinct ones, so a small vector beats a map.
    codes: Vec<([u8; 2], u64)>,
    pub(super) latency: Histogram<u64>,
    /// Open loop: time from intended to actual send, in microseconds.
    pub(super) send_lag: Histogram<u64>,
}

impl Tally {
    pub(super) fn new(templates: &Templates) -> Tally {
        Tally {
            sent: 0,
            sent_late: 0,
            answered: 0,
            approved: 0,
            declined: 0,
            errors: 0,
            timeouts: 0,
            unsent: 0,
            behind: false,
            codes: Vec::new(),
            latency: Histogram::new_from(&templates.latency),
            send_lag: Histogram::new_from(&templates.coarse),
        }
    }

    pub(super) fn count_code(&mut self, code: [u8; 2], n: u64) {
        match self.codes.iter_mut().find(|(c, _)| *c == code) {
            Some((_, count)) => *count += n,
            None => self.codes.push((code, n)),
        }
    }

    pub(super) fn merge(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.sent_late += other.sent_late;
        self.answered += other.answered;
        self.approved += other.approved;
        self.declined += other.declined;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.unsent += other.unsent;
        self.behind |= other.behind;
        for &(code, n) in &other.codes {
            self.count_code(code, n);
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.send_lag.add(&other.send_lag);
    }

    pub(super) fn summary(&self, plan: &Plan, elapsed: Duration) -> Summary {
        let opts = &plan.opts;
        let secs = opts.duration.as_secs_f64();
        let per_second = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let send_lag_us = Latency::of(&self.send_lag);
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Summary {
            sent: self.sent,
            approved: self.approved,
            declined: self.declined,
            errors: self.errors,
            timeouts: self.timeouts,
            tps: per_second(self.answered),
            elapsed_ms: millis(elapsed),
            latency_us: Latency::of(&self.latency),
            codes: self
                .codes
                .iter()
                .map(|(c, n)| (String::from_utf8_lossy(c).into_owned(), *n))
                .collect(),
            rate: opts.rate,
            connections: opts.connections,
            window: opts.window,
            warmup_ms: millis(opts.warmup),
            duration_ms: millis(opts.duration),
            send_rate: per_second(self.sent.saturating_sub(self.sent_late)),
            behind: self.behind || send_lag_us.max > BEHIND_LAG_MS * 1000,
            send_lag_us,
            unsent: self.unsent,
            histogram: self.latency.clone(),
        }
    }
}

/// How an answer's DE39 is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Approved,
    Declined,
    Error,
    Timeout,
}

pub(super) fn classify(de39: &[u8]) -> Outcome {
    match ResponseCode::from_de39(de39) {
        Some(ResponseCode::Approved) => Outcome::Approved,
        Some(ResponseCode::LateResponse) => Outcome::Timeout,
        Some(_) => Outcome::Error,
        None => Outcome::Declined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_json_shape() {
        let summary = Summary {
            sent: 10,
            approved: 7,
            declined: 1,
            errors: 1,
            timeouts: 1,
            tps: 1234.56,
            elapsed_ms: 1000,
            latency_us: Latency {
                p50: 100,
                p90: 150,
                p99: 200,
                p999: 300,
                max: 400,
            },
            codes: BTreeMap::from([("00".to_owned(), 7), ("51".to_owned(), 1)]),
            rate: Some(1000),
            connections: 2,
            window: 64,
            warmup_ms: 500,
            duration_ms: 1000,
            send_rate: 10.0,
            send_lag_us: Latency::default(),
            unsent: 0,
            behind: false,
            histogram: Histogram::new_from(&Templates::new().unwrap().latency),
        };
        let json = summary.demo_json();
        assert_eq!(
            json,
            concat!(
                r#"{"approved":7,"declined":1,"errors":1,"timeouts":1,"tps":1234.6,"#,
                r#""latency_us":{"p50":100,"p99":200,"p999":300,"max":400}}"#
            )
        );
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["latency_us"]["p999"], 300);

        let full_json = summary.full_json();
        assert!(
            full_json.starts_with(concat!(
                r#"{"sent":10,"approved":7,"declined":1,"errors":1,"timeouts":1,"tps":1234.6,"#,
                r#""latency_us":{"p50":100,"p90":150,"p99":200,"p999":300,"max":400},"#
            )),
            "{full_json}"
        );
        let full: serde_json::Value = serde_json::from_str(&full_json).unwrap();
        assert_eq!(full["sent"], 10);
        assert_eq!(full["latency_us"]["p90"], 150);
        assert_eq!(full["codes"]["51"], 1);
        assert_eq!(full["mode"], "open");
        assert_eq!(full["rate"], 1000);
        assert_eq!(full["behind"], false);
        assert_eq!(full["send_lag_us"]["max"], 0);
        assert!(summary.render().contains("approved    7"));
    }
}
