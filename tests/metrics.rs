//! The switch's Prometheus metrics, rendered and parsed after real traffic.

use std::collections::HashMap;
use std::time::Duration;
use switchyard_tools::demo::{Testbed, TestbedOptions};
use switchyard_tools::loadgen::{self, Identity, LoadOptions};
use switchyard_tools::testkit::parse_prometheus as parse;

fn sum(m: &HashMap<String, f64>, name: &str, must_contain: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(name) && must_contain.iter().all(|c| k.contains(c)))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_answers_and_publish_latency() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder in this test binary");
    let bed = Testbed::start(TestbedOptions::default()).await.unwrap();
    let identity = Identity {
        institution: "100002".into(),
        tls: bed.client_tls("100002").unwrap(),
    };
    let opts = LoadOptions {
        destinations: vec!["200001".into(), "200002".into()],
        connections: 1,
        window: 4,
        duration: Duration::from_millis(300),
        decline_every: 10,
        ..LoadOptions::new(bed.switch_addr, "localhost", vec![identity])
    };
    let summary = loadgen::run(opts).await.unwrap();
    assert!(summary.approved > 0 && summary.errors == 0, "{summary:?}");
    // Link readers hand their samples over when idle; wait for the last batch.
    let expected = (summary.approved + summary.declined) as f64;
    let mut m = HashMap::new();
    for _ in 0..500 {
        bed.switch.publish_metrics();
        m = parse(&handle.render());
        if sum(&m, "switchyard_latency_samples", &[]) >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let approved = sum(
        &m,
        "switchyard_responses_total",
        &["code=\"00\"", "institution=\"100002\""],
    );
    let declined = sum(&m, "switchyard_responses_total", &["code=\"51\""]);
    assert_eq!(
        approved as u64, summary.approved,
        "every approval counted once"
    );
    assert_eq!(declined as u64, summary.declined);
    let per_connector = sum(&m, "switchyard_responses_total", &["connector=\"200001\""]);
    assert!(per_connector > 0.0, "labelled by connector");
    let samples = sum(&m, "switchyard_latency_samples", &[]);
    assert_eq!(
        samples as u64,
        summary.approved + summary.declined,
        "one sample per answer"
    );
    let p99_total = sum(
        &m,
        "switchyard_latency_us",
        &[
            "connector=\"200001\"",
            "stage=\"total\"",
            "quantile=\"0.99\"",
        ],
    );
    assert!(p99_total > 0.0, "latency published");
    assert_eq!(
        sum(
            &m,
            "switchyard_connector_links_up",
            &["connector=\"200003\""]
        ),
        2.0
    );
    assert!(m
        .keys()
        .any(|k| k.starts_with("switchyard_connector_queue_depth")));
    bed.stop().await;
}
