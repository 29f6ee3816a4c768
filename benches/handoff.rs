//! Queue handoff between tokio tasks, as from acquirer sessions to a bank connector.
//!
//! Moves `ITEMS` items from producer tasks to one consumer task on a multi-thread
//! runtime with two workers, both queues bounded at `QUEUE_BOUND`:
//!
//! * `array_queue`: `crossbeam_queue::ArrayQueue` + `tokio::sync::Notify`, as the
//!   connector does: the producer pushes then `notify_one`; the consumer drains until
//!   empty, then creates `notified()`, `enable`s it, re-checks emptiness and waits.
//! * `mpsc`: bounded `tokio::sync::mpsc`, `try_send` / `recv_many`.
//!
//! A full queue makes the producer yield and retry (the switch answers 91 instead; a
//! benchmark must not lose items). Items are 8 bytes, or 640 bytes (about the size of a
//! `Pending` request, which holds a decoded `Message`). One iteration moves all items;
//! throughput is reported in items per second.
//!
//! Run with `cargo bench --bench handoff`; `cargo test --bench handoff` runs each once.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use criterion::{measurement::WallTime, BenchmarkGroup, Throughput};
use crossbeam_queue::ArrayQueue;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, Notify};

/// Items moved per iteration.
const ITEMS: u64 = 1_000_000;
/// Bound of both queues, in items.
const QUEUE_BOUND: usize = 8192;
/// Worker threads of the runtime.
const WORKERS: usize = 2;

/// An item of `N` words; the first carries the sequence number.
#[derive(Clone, Copy)]
struct Item<const N: usize>([u64; N]);

impl<const N: usize> Item<N> {
    fn new(seq: u64) -> Self {
        let mut words = [0u64; N];
        words[0] = seq;
        Item(words)
    }
}

/// Items `[first, first + count)` for producer `p` of `producers`.
fn share(p: u64, producers: u64) -> (u64, u64) {
    let per = ITEMS / producers;
    let first = p * per;
    let count = if p + 1 == producers {
        ITEMS - first
    } else {
        per
    };
    (first, count)
}

struct Shared<T> {
    queue: ArrayQueue<T>,
    notify: Notify,
}

async fn array_queue_run<const N: usize>(producers: u64) -> u64 {
    let shared = Arc::new(Shared {
        queue: ArrayQueue::new(QUEUE_BOUND),
        notify: Notify::new(),
    });
    let consumer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut received = 0u64;
            let mut sum = 0u64;
            while received < ITEMS {
                while let Some(item) = shared.queue.pop() {
                    let item: Item<N> = item;
                    sum = sum.wrapping_add(black_box(item).0[0]);
                    received += 1;
                }
                let notified = shared.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !shared.queue.is_empty() || received == ITEMS {
                    continue;
                }
                notified.await;
            }
            sum
        })
    };
    for p in 0..producers {
        let shared = shared.clone();
        tokio::spawn(async move {
            let (first, count) = share(p, producers);
            for seq in first..first + count {
                let mut item = Item::<N>::new(seq);
                loop {
                    match shared.queue.push(item) {
                        Ok(()) => {
                            shared.notify.notify_one();
                            break;
                        }
                        Err(back) => {
                            item = back;
                            tokio::task::yield_now().await;
                        }
                    }
                }
            }
        });
    }
    consumer.await.expect("consumer task")
}

async fn mpsc_run<const N: usize>(producers: u64) -> u64 {
    let (tx, mut rx) = mpsc::channel::<Item<N>>(QUEUE_BOUND);
    let consumer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(QUEUE_BOUND);
        let mut received = 0u64;
        let mut sum = 0u64;
        while received < ITEMS {
            if rx.recv_many(&mut batch, QUEUE_BOUND).await == 0 {
                break;
            }
            for item in batch.drain(..) {
                sum = sum.wrapping_add(black_box(item).0[0]);
                received += 1;
            }
        }
        sum
    });
    for p in 0..producers {
        let tx = tx.clone();
        tokio::spawn(async move {
            let (first, count) = share(p, producers);
            for seq in first..first + count {
                let mut item = Item::<N>::new(seq);
                loop {
                    match tx.try_send(item) {
                        Ok(()) => break,
                        Err(mpsc::error::TrySendError::Full(back)) => {
                            item = back;
                            tokio::task::yield_now().await;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
            }
        });
    }
    drop(tx);
    consumer.await.expect("consumer task")
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .build()
        .expect("tokio runtime")
}

/// Times `iters` runs of `run`, checking every item arrived exactly once.
fn timed<F: std::future::Future<Output = u64>>(
    rt: &Runtime,
    iters: u64,
    run: impl Fn() -> F,
) -> Duration {
    let expected = ITEMS * (ITEMS - 1) / 2;
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        let sum = rt.block_on(run());
        total += start.elapsed();
        assert_eq!(sum, expected, "every item arrives exactly once");
    }
    total
}

fn cases<const N: usize>(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, producers: u64) {
    let label = format!("{}B-{producers}p", N * 8);
    group.bench_function(BenchmarkId::new("array_queue", &label), |b| {
        b.iter_custom(|iters| timed(rt, iters, || array_queue_run::<N>(producers)))
    });
    group.bench_function(BenchmarkId::new("mpsc", &label), |b| {
        b.iter_custom(|iters| timed(rt, iters, || mpsc_run::<N>(producers)))
    });
}

fn handoff(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(ITEMS));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    cases::<1>(&mut group, &rt, 1);
    cases::<80>(&mut group, &rt, 1);
    cases::<80>(&mut group, &rt, 4);
    group.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
