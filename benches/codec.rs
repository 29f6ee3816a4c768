//! Codec benchmarks: the work the switch does per message on its hot path.
//!
//! * `decode`: index a typical 0200 (13 fields, secondary bitmap), in each
//!   shipped dialect (BCD and EBCDIC convert to the canonical form first; the
//!   1993 dialects read a 1200 and translate it to the 1987 form).
//! * `encode`: write the same 0200 into a reused buffer.
//! * `forward`: decode, then re-encode with a new STAN (DE11), as the switch does
//!   when it forwards a request to a bank: same dialect (copy and patch), and
//!   across dialects (ASCII to hex bitmaps, ASCII to BCD, BCD to EBCDIC) and
//!   versions (a 1987 ASCII 0200 to a 1993 BCD 1200, and back).
//! * `frames`: split a read buffer of 64 framed 0200s and decode each.
//!
//! Run with `cargo bench --bench codec`; `cargo test --bench codec` runs each once.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use switchyard_wire::{
    reencode, Change, Dialect, Encoder, FrameDecoder, Framing, Message, Mti,
    FRAME_SIZE_MAX_BYTES_DEFAULT,
};

/// A typical purchase request as the acquirer sends it.
const PURCHASE_0200: &[(u8, &[u8])] = &[
    (2, b"4111111111111111"),
    (3, b"000000"),
    (4, b"000000012345"),
    (7, b"0605123456"),
    (11, b"000123"),
    (12, b"123456"),
    (13, b"0605"),
    (32, b"100001"),
    (37, b"515612000123"),
    (41, b"TERM0001"),
    (42, b"MERCHANT0000001"),
    (49, b"978"),
    (100, b"200001"),
];

/// Messages per read buffer in the `frames` benchmark.
const FRAMES_PER_BUFFER: usize = 64;

const DIALECTS: [&str; 6] = [
    "iso87-ascii",
    "iso87-hexbitmap",
    "iso87-binary",
    "iso87-ebcdic",
    "iso93-ascii",
    "iso93-binary",
];

fn dialect(name: &str) -> Dialect {
    Dialect::builtin(name).unwrap_or_else(|| panic!("built-in dialect {name}"))
}

fn encode_purchase(d: &Dialect, out: &mut BytesMut) -> usize {
    let mut enc = Encoder::new(d, out, Mti::FINANCIAL);
    for &(n, value) in PURCHASE_0200 {
        if let Err(e) = enc.field(n, value) {
            panic!("sample 0200: {e}");
        }
    }
    enc.finish()
}

fn purchase(d: &Dialect) -> Bytes {
    let mut out = BytesMut::new();
    encode_purchase(d, &mut out);
    out.freeze()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for name in DIALECTS {
        let d = dialect(name);
        let wire = purchase(&d);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| Message::decode(&d, black_box(wire.clone())).map(|m| m.has(100)))
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for name in DIALECTS {
        let d = dialect(name);
        let mut out = BytesMut::with_capacity(1024);
        group.throughput(Throughput::Bytes(purchase(&d).len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_purchase(&d, black_box(&mut out))
            })
        });
    }
    group.finish();
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    let ascii = dialect("iso87-ascii");
    let hex = dialect("iso87-hexbitmap");
    let binary = dialect("iso87-binary");
    let ebcdic = dialect("iso87-ebcdic");
    let iso93 = dialect("iso93-binary");
    let pairs = [
        ("iso87-ascii", &ascii, &ascii),
        ("iso87-ascii-to-hexbitmap", &ascii, &hex),
        ("iso87-ascii-to-binary", &ascii, &binary),
        ("iso87-binary-to-ebcdic", &binary, &ebcdic),
        ("iso87-ascii-to-iso93-binary", &ascii, &iso93),
        ("iso93-binary-to-iso87-ascii", &iso93, &ascii),
    ];
    for (label, from, to) in pairs {
        let wire = purchase(from);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        let mut out = BytesMut::with_capacity(1024);
        group.bench_function(label, |b| {
            b.iter(|| {
                out.clear();
                let msg = Message::decode(from, black_box(wire.clone())).ok()?;
                let changes = [Change::Set(11, b"000987")];
                reencode(&msg, from, to, msg.mti(), &changes, &mut out).ok()
            })
        });
    }
    group.finish();
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames");
    let d = dialect("iso87-ascii");
    let wire = purchase(&d);
    for framing in [Framing::U16be, Framing::Ascii4] {
        let mut stream = BytesMut::new();
        for _ in 0..FRAMES_PER_BUFFER {
            if let Err(e) = framing.write(&mut stream, &wire) {
                panic!("sample frame: {e}");
            }
        }
        let dec = FrameDecoder::new(framing, FRAME_SIZE_MAX_BYTES_DEFAULT);
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_function(format!("{framing}-split"), |b| {
            b.iter_batched(
                || stream.clone(),
                |mut buf| {
                    let mut count = 0;
                    while let Ok(Some(frame)) = dec.decode(&mut buf) {
                        black_box(frame);
                        count += 1;
                    }
                    count
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("{framing}-split-decode"), |b| {
            b.iter_batched(
                || stream.clone(),
                |mut buf| {
                    let mut fields = 0;
                    while let Ok(Some(frame)) = dec.decode(&mut buf) {
                        if let Ok(msg) = Message::decode(&d, frame) {
                            fields += msg.fields().count();
                        }
                    }
                    fields
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode, forward, frames);
criterion_main!(benches);
