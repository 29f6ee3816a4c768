//! Prometheus text exposition, parsed for the tests that scrape the switch.

use std::collections::HashMap;

/// Parses Prometheus text exposition lines into `name{labels}` → value.
pub fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
