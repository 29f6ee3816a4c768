//! Reports: the percentile distribution as `.hgrm` text, and the latency chart.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

use super::summary::Summary;
use super::HGRM_TICKS_PER_HALF;

/// .hgrm values are milliseconds: recorded microseconds divided by this.
const HGRM_VALUE_SCALE: f64 = 1000.0;
/// Size of the latency chart, in pixels.
const PLOT_SIZE_PX: (u32, u32) = (1000, 640);
/// The chart's percentile axis reaches at least 99.999 % (5 nines) and at most 6 nines.
const PLOT_NINES_MIN: u32 = 5;
const PLOT_NINES_MAX: u32 = 6;

/// Sub-buckets of an HdrHistogram with `sigfig` significant digits: the power of two at or
/// above 2·10^sigfig (2048 for 3 digits), as HdrHistogram's trailer prints it.
fn sub_bucket_count(sigfig: u8) -> u64 {
    (2 * 10u64.pow(u32::from(sigfig))).next_power_of_two()
}

/// `h` (microseconds) in HdrHistogram's percentile distribution text format (`.hgrm`), as
/// Java's `outputPercentileDistribution(out, 5, 1000.0)` prints it: values in milliseconds
/// with as many decimals as the histogram has significant digits, [`HGRM_TICKS_PER_HALF`]
/// rows per halving of the distance to 100 %, then the mean, standard deviation, maximum,
/// count and histogram shape. HdrHistogram's plotter
/// (hdrhistogram.github.io/HdrHistogram/plotFiles.html) reads it.
pub fn hgrm_text(h: &Histogram<u64>) -> String {
    let digits = usize::from(h.sigfig());
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for row in h.iter_quantiles(HGRM_TICKS_PER_HALF) {
        total += row.count_since_last_iteration();
        let value = row.value_iterated_to() as f64 / HGRM_VALUE_SCALE;
        let quantile = row.quantile_iterated_to();
        if quantile < 1.0 {
            let inverse = 1.0 / (1.0 - quantile);
            let _ = writeln!(
                out,
                "{value:12.digits$} {quantile:2.12} {total:10} {inverse:14.2}"
            );
        } else {
            let _ = writeln!(out, "{value:12.digits$} {quantile:2.12} {total:10}");
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (
            h.mean() / HGRM_VALUE_SCALE,
            h.stdev() / HGRM_VALUE_SCALE,
            h.max() as f64 / HGRM_VALUE_SCALE,
        )
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {max:12.digits$}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    out
}

/// The label of `nines` on the chart's percentile axis: 0 → "0%", 1 → "90%", 2 → "99%",
/// 3 → "99.9%" …
fn percentile_label(nines: u32) -> String {
    match nines {
        0 => "0%".to_owned(),
        1 => "90%".to_owned(),
        2 => "99%".to_owned(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)),
    }
}

/// Chart points: x = log10(1 / (1 − quantile)) (0 at 0 %, 1 at 90 %, 2 at 99 % …), y =
/// latency in milliseconds, one per row of the percentile distribution (the 100 % row, at
/// infinity, left out).
fn plot_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    h.iter_quantiles(HGRM_TICKS_PER_HALF)
        .filter(|row| row.quantile_iterated_to() < 1.0)
        .map(|row| {
            let x = (1.0 / (1.0 - row.quantile_iterated_to())).log10();
            (x, row.value_iterated_to() as f64 / HGRM_VALUE_SCALE)
        })
        .collect()
}

/// Writes an SVG chart of `summary`'s latency by percentile: x on a log scale of
/// 1/(1 − p), labelled 0 %, 90 %, 99 %, 99.9 % …; y in milliseconds. Text is left to the
/// SVG viewer's fonts (`<text>` elements; plotters draws no glyphs without its `ttf`
/// feature).
pub fn write_plot(path: &Path, summary: &Summary) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let points = plot_points(&summary.histogram);
    let last_x = points.last().map_or(0.0, |&(x, _)| x);
    let nines = (last_x.ceil() as u32).clamp(PLOT_NINES_MIN, PLOT_NINES_MAX);
    let points: Vec<(f64, f64)> = points
        .into_iter()
        .filter(|&(x, _)| x <= f64::from(nines))
        .collect();
    let y_max = points.iter().map(|&(_, y)| y).fold(0.0, f64::max) * 1.1;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };
    let title = format!(
        "Latency by percentile: {}, {:.0} s",
        summary.load_description(),
        summary.duration_ms as f64 / 1000.0
    );

    let root = SVGBackend::new(path, PLOT_SIZE_PX).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..f64::from(nines), 0f64..y_max)?;
    let x_label = |x: &f64| {
        let rounded = x.round();
        if (x - rounded).abs() < 1e-6 && rounded >= 0.0 {
            percentile_label(rounded as u32)
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_labels(nines as usize + 1)
        .x_label_formatter(&x_label)
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::{Latency, Templates};
    use std::collections::BTreeMap;

    #[test]
    fn hgrm_format() {
        let mut h = Histogram::new_from(&Templates::new().unwrap().latency);
        for us in [100, 200, 300, 400] {
            h.record(us).unwrap();
        }
        let text = hgrm_text(&h);
        println!("{text}");
        let expected = concat!(
            "       Value     Percentile TotalCount 1/(1-Percentile)\n",
            "\n",
            "       0.100 0.000000000000          1           1.00\n",
            "HGRM_ROWS",
            "#[Mean    =        0.250, StdDeviation   =        0.112]\n",
            "#[Max     =        0.400, Total count    =            4]\n",
            "#[Buckets =           16, SubBuckets     =         2048]\n",
        );
        let (head, tail) = expected.split_once("HGRM_ROWS").unwrap();
        assert!(text.starts_with(head), "{text}");
        assert!(text.ends_with(tail), "{text}");
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .skip(2)
            .collect();
        assert_eq!(
            rows.last().copied(),
            Some("       0.400 1.000000000000          4")
        );
        for row in &rows[..rows.len() - 1] {
            let columns: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(columns.len(), 4, "{row}");
            assert_eq!(row.len(), 12 + 1 + 14 + 1 + 10 + 1 + 14, "{row}");
            let quantile: f64 = columns[1].parse().unwrap();
            let inverse: f64 = columns[3].parse().unwrap();
            assert!((inverse - 1.0 / (1.0 - quantile)).abs() < 0.01, "{row}");
        }
        assert_eq!(text, HGRM_SMALL, "{text}");
        // An empty histogram: header and trailer only.
        h.reset();
        assert!(hgrm_text(&h).contains("#[Max     =        0.000, Total count    =            0]"));
    }

    #[test]
    fn latency_chart() {
        let mut histogram = Histogram::new_from(&Templates::new().unwrap().latency);
        for i in 1..=10_000u64 {
            histogram
                .record(200 + i % 300 + if i % 100 == 0 { 50_000 } else { 0 })
                .unwrap();
        }
        let summary = Summary {
            sent: 10_000,
            approved: 10_000,
            declined: 0,
            errors: 0,
            timeouts: 0,
            tps: 1000.0,
            elapsed_ms: 10_000,
            latency_us: Latency::of(&histogram),
            codes: BTreeMap::new(),
            rate: Some(1000),
            connections: 1,
            window: 2000,
            warmup_ms: 0,
            duration_ms: 10_000,
            send_rate: 1000.0,
            send_lag_us: Latency::default(),
            unsent: 0,
            behind: false,
            histogram,
        };
        let path = std::env::temp_dir().join(format!("loadgen-chart-{}.svg", std::process::id()));
        write_plot(&path, &summary).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if std::env::var_os("KEEP_CHART").is_none() {
            let _ = std::fs::remove_file(&path);
        }
        assert!(svg.starts_with("<svg"), "{svg}");
        for label in [
            "0%",
            "90%",
            "99%",
            "99.9%",
            "99.99%",
            "99.999%",
            "latency (ms)",
        ] {
            assert!(
                svg.contains(&format!(">\n{label}\n</text>")),
                "{label} missing: {svg}"
            );
        }
        assert!(svg.contains("open loop 1,000 requests/s, 1 connection, window 2,000"));
        assert!(svg.contains("<polyline"), "{svg}");
        assert_eq!(percentile_label(4), "99.99%");
    }

    const HGRM_SMALL: &str = concat!(
        "       Value     Percentile TotalCount 1/(1-Percentile)\n",
        "\n",
        "       0.100 0.000000000000          1           1.00\n",
        "       0.100 0.100000000000          1           1.11\n",
        "       0.100 0.200000000000          1           1.25\n",
        "       0.200 0.300000000000          2           1.43\n",
        "       0.200 0.400000000000          2           1.67\n",
        "       0.200 0.500000000000          2           2.00\n",
        "       0.300 0.550000000000          3           2.22\n",
        "       0.300 0.600000000000          3           2.50\n",
        "       0.300 0.650000000000          3           2.86\n",
        "       0.300 0.700000000000          3           3.33\n",
        "       0.400 0.750000000000          4           4.00\n",
        "       0.400 1.000000000000          4\n",
        "#[Mean    =        0.250, StdDeviation   =        0.112]\n",
        "#[Max     =        0.400, Total count    =            4]\n",
        "#[Buckets =           16, SubBuckets     =         2048]\n",
    );
}
