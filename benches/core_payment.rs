//! One payment through the switch core, without sockets: the CPU work the daemon does
//! per payment, in the order it does it, through the shipped bank link
//! (`core::link::Link`). The path is `switchyard_tools::corepath::SwitchCore` (see
//! its docs for the steps); `tests/alloc.rs` checks it allocates nothing once warm.
//!
//! Parameterised by route table size (10, 10,000, 1,000,000 PAN prefixes, realistic
//! lengths as in `benches/route.rs`); 65,536 distinct requests whose PANs all route are
//! sent in turn. The link has `INFLIGHT_OTHERS` other requests in flight throughout.
//! One iteration is one payment.
//!
//! Run with `cargo bench --bench core_payment`; `cargo test --bench core_payment` runs
//! each once.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use switchyard::wire::Dialect;
use switchyard_tools::corepath::{request_frames, route_table, SwitchCore, REQUEST_COUNT, SIZES};

fn core_payment(c: &mut Criterion) {
    let mut group = c.benchmark_group("core_payment");
    group.throughput(Throughput::Elements(1));
    for size in SIZES {
        let (routes, prefixes) = route_table(size, 0x9e37_79b9_7f4a_7c15 ^ size as u64);
        let requests = request_frames(&Dialect::iso87_ascii(), &prefixes, 0x5eed);
        let mut core = SwitchCore::new(routes, &requests[0]);
        for request in &requests {
            if let Err(e) = core.payment(request) {
                panic!("sample payment failed: {e:?}");
            }
        }
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (REQUEST_COUNT - 1);
                core.payment(black_box(&requests[i]))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, core_payment);
criterion_main!(benches);
