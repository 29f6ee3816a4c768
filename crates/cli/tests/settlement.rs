//! Settlement totals computed from the journal of a test run: they match what the
//! load generator counted, and each currency's positions net to zero.

use std::time::Duration;
use switchyard::journal::settlement::settle;
use switchyard::journal::Fsync;
use switchyard::wire::Dialect;
use switchyard_tools::demo::{Testbed, TestbedOptions};
use switchyard_tools::loadgen::{self, Identity, LoadOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_matches_the_load_and_nets_to_zero() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "switchyard-settlement-{}-{}",
        std::process::id(),
        now.as_nanos()
    ));
    let bed = Testbed::start(TestbedOptions {
        journal: Some(Fsync::Off),
        journal_at: Some(dir.clone()),
        ..TestbedOptions::default()
    })
    .await
    .unwrap();
    let mut summaries = Vec::new();
    for institution in ["100001", "100002"] {
        let identity = Identity {
            institution: institution.into(),
            tls: bed.client_tls(institution).unwrap(),
        };
        let opts = LoadOptions {
            destinations: vec!["200001".into(), "200002".into(), "200003".into()],
            connections: 1,
            window: 8,
            duration: Duration::from_millis(300),
            warmup: Duration::ZERO,
            decline_every: 10,
            ..LoadOptions::new(bed.switch_addr, "localhost", vec![identity])
        };
        let summary = loadgen::run(opts).await.unwrap();
        assert!(summary.approved > 0 && summary.errors == 0, "{summary:?}");
        summaries.push((institution, summary));
    }
    let switch = bed.switch.clone();
    switch.shutdown().await; // the journal is flushed
    let from = now.as_millis() as u64 - 60_000;
    let to = from + 3_600_000;
    let s = settle(&dir, from, to, &Dialect::iso87_ascii()).unwrap();
    assert!(s.balanced(), "{s:#?}");
    for (institution, summary) in &summaries {
        let approved: u64 = s
            .pairs
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{institution} -> ")))
            .map(|(_, t)| t.approved)
            .sum();
        assert_eq!(approved, summary.approved, "{institution}: {s:#?}");
        let position = s.positions[&format!("{institution} EUR")];
        let net: rust_decimal::Decimal = s
            .pairs
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{institution} -> ")))
            .map(|(_, t)| t.net)
            .sum();
        assert_eq!(
            position, net,
            "an acquirer's position is what its issuers owe it"
        );
        // Every amount is 10.00 to 99.99 EUR.
        let (low, high) = (summary.approved * 10, summary.approved * 100);
        assert!(net >= low.into() && net < high.into(), "{net}");
    }
    println!(
        "settled: {} pairs, positions {:?}",
        s.pairs.len(),
        s.positions
    );
    // The same from the command line, the window given as RFC 3339 times.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "settlement",
            "--json",
            "--from",
            "2000-01-01T00:00:00Z",
            "--to",
        ])
        .arg("2100-01-01T00:00:00.000Z")
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["from_ms"], 946_684_800_000u64);
    assert_eq!(v["to_ms"], 4_102_444_800_000u64);
    assert_eq!(v["pairs"].as_object().unwrap().len(), s.pairs.len());
    bed.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
