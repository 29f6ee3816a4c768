//! Routing benchmarks: `RouteTable` longest-prefix lookup by PAN (DE2).
//!
//! Tables of 10, 10,000 and 1,000,000 PAN prefixes with realistic lengths (mostly 6-
//! and 8-digit BIN ranges, some 4, 5, 7, 9, 10 and 11 digits), drawn from a seeded
//! xorshift so every run sees the same tables. Each lookup takes the next PAN of a fixed
//! set of 65,536 random 16-digit PANs, half of which match a prefix; one iteration is
//! one lookup, so the time reported is ns per lookup.
//!
//! * `by_pan/N`: `RouteTable::by_pan`.
//! * `route/N`: `RouteTable::route(None, Some(pan))`, as admission calls it.
//!
//! Run with `cargo bench --bench route`; `cargo test --bench route` runs each once.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use switchyard::core::route::RouteTable;

/// Table sizes, in PAN prefixes.
const SIZES: [usize; 3] = [10, 10_000, 1_000_000];
/// PANs looked up in turn (a power of two); half of them match a prefix.
const PAN_COUNT: usize = 1 << 16;
/// Digits in the PANs looked up.
const PAN_DIGITS: usize = 16;
use switchyard_tools::corepath::{route_table as table, XorShift};

/// `PAN_COUNT` PANs in random order, exactly half extending a prefix of the table and
/// half matching no prefix.
fn pans(table: &RouteTable, prefixes: &[Vec<u8>], seed: u64) -> Vec<[u8; PAN_DIGITS]> {
    let mut rng = XorShift(seed);
    let mut out = Vec::with_capacity(PAN_COUNT);
    for i in 0..PAN_COUNT {
        let mut pan = [0u8; PAN_DIGITS];
        if i % 2 == 0 {
            let prefix = &prefixes[rng.below(prefixes.len() as u64) as usize];
            pan[..prefix.len()].copy_from_slice(prefix);
            let tail = prefix.len();
            rng.digits(&mut pan[tail..]);
            // `digits` starts at 1..=9; any digit is fine after the prefix.
            pan[tail] = b'0' + rng.below(10) as u8;
        } else {
            loop {
                rng.digits(&mut pan);
                if table.by_pan(&pan).is_none() {
                    break;
                }
            }
        }
        out.push(pan);
    }
    // Fisher-Yates, so hits and misses do not alternate predictably.
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i as u64 + 1) as usize);
    }
    out
}

fn distinct_lengths(prefixes: &[Vec<u8>]) -> usize {
    let mut seen = [false; 20];
    for p in prefixes {
        seen[p.len()] = true;
    }
    seen.iter().filter(|s| **s).count()
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    for size in SIZES {
        let (table, prefixes) = table(size, 0x9e37_79b9_7f4a_7c15 ^ size as u64);
        let pans = pans(&table, &prefixes, 0xd1b5_4a32_d192_ed03);
        let hits = pans
            .iter()
            .filter(|p| table.by_pan(&p[..]).is_some())
            .count();
        eprintln!(
            "route table: {size} prefixes, {} distinct lengths, {hits} of {PAN_COUNT} PANs hit",
            distinct_lengths(&prefixes)
        );
        group.bench_function(BenchmarkId::new("by_pan", size), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (PAN_COUNT - 1);
                table.by_pan(black_box(&pans[i][..]))
            })
        });
        group.bench_function(BenchmarkId::new("route", size), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (PAN_COUNT - 1);
                table.route(None, Some(black_box(&pans[i][..])))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
