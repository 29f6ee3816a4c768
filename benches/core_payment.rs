//! One payment through the switch core, without sockets: the CPU work the daemon does
//! per payment, in the order it does it.
//!
//! 1. The acquirer's framed 0200 lands in the session's read buffer; the frame is split
//!    off (`FrameDecoder`) and decoded (`Message::decode`).
//! 2. `core::validate::admit` checks it and routes it by PAN (DE2) in the route table.
//! 3. `InflightTable::insert` gives it a STAN on the bank link.
//! 4. `wire::reencode` writes it in the bank's dialect with DE11 = that STAN into the
//!    link's reused write buffer (`Framing::U16be` begin/finish).
//! 5. The bank's 0210 (built once with `banksim::answer`, DE11 patched to the STAN) lands
//!    in the link's read buffer; it is split off and decoded.
//! 6. `InflightTable::take` by its DE11 finds the request.
//! 7. `net::encode_reply(&Reply::Bank { .. })` writes the answer, with the acquirer's own
//!    DE11, into the session's reused write buffer.
//!
//! Parameterised by route table size (10, 10,000, 1,000,000 PAN prefixes, realistic
//! lengths as in `benches/route.rs`); 65,536 distinct requests whose PANs all route are
//! sent in turn. The link has `INFLIGHT_OTHERS` other requests in flight throughout.
//! One iteration is one payment.
//!
//! `tests/alloc.rs` includes this file to assert that [`SwitchCore::payment`] makes no
//! heap allocation once warm.
//!
//! Run with `cargo bench --bench core_payment`; `cargo test --bench core_payment` runs
//! each once.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard::config::{INFLIGHT_PER_LINK_MAX_DEFAULT, REQUEST_TIMEOUT_MS_DEFAULT};
use switchyard::core::answer::{encode_reply, OriginalStan, Reply};
use switchyard::core::inflight::{InflightTable, Stan};
use switchyard::core::route::RouteTable;
use switchyard::core::validate::{admit, Admission};
use switchyard::core::InstitutionId;
use switchyard::wire::{
    reencode, Change, Dialect, Encoder, FrameDecoder, Framing, Message, Mti,
    FRAME_SIZE_MAX_BYTES_DEFAULT,
};

/// Route table sizes, in PAN prefixes.
pub const SIZES: [usize; 3] = [10, 10_000, 1_000_000];
/// Distinct requests sent in turn (a power of two): cards spread over the whole table.
pub const REQUEST_COUNT: usize = 1 << 16;
/// Requests in flight on the link besides the payment being measured.
pub const INFLIGHT_OTHERS: usize = 255;
/// The acquiring institution (certificate and DE32).
pub const ACQUIRER: &str = "100001";
/// Framing on both sides.
const FRAMING: Framing = Framing::U16be;
/// Read and write buffers of sessions and links, bytes (as in `net`).
const BUFFER_BYTES: usize = 64 * 1024;

#[path = "common/mod.rs"]
mod common;
pub use common::{route_table, XorShift};

/// `REQUEST_COUNT` framed 0200s from `ACQUIRER` (no DE100: routed by PAN), each with a
/// PAN extending one of `prefixes`.
pub fn request_frames(dialect: &Dialect, prefixes: &[Vec<u8>], seed: u64) -> Vec<Vec<u8>> {
    let mut rng = XorShift(seed);
    (0..REQUEST_COUNT)
        .map(|i| {
            let mut pan = [0u8; 16];
            let prefix = &prefixes[rng.below(prefixes.len() as u64) as usize];
            pan[..prefix.len()].copy_from_slice(prefix);
            rng.digits(&mut pan[prefix.len()..]);
            let stan = format!("{:06}", i + 1);
            let rrn = format!("515612{:06}", i + 1);
            let fields: [(u8, &[u8]); 12] = [
                (2, &pan),
                (3, b"000000"),
                (4, b"000000012345"),
                (7, b"0605123456"),
                (11, stan.as_bytes()),
                (12, b"123456"),
                (13, b"0605"),
                (32, ACQUIRER.as_bytes()),
                (37, rrn.as_bytes()),
                (41, b"TERM0001"),
                (42, b"MERCHANT0000001"),
                (49, b"978"),
            ];
            let mut body = BytesMut::new();
            let mut enc = Encoder::new(dialect, &mut body, Mti::FINANCIAL);
            for (n, value) in fields {
                enc.field(n, value).expect("sample 0200 field");
            }
            enc.finish();
            let mut framed = BytesMut::new();
            FRAMING
                .write(&mut framed, &body)
                .expect("sample 0200 frame");
            framed.to_vec()
        })
        .collect()
}

/// Why a payment did not complete (never expected in the benchmark).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A frame or message did not decode.
    Decode,
    /// Admission did not forward the request.
    NotForwarded,
    /// The in-flight table was full.
    TableFull,
    /// Re-encoding for the bank or for the acquirer failed.
    Encode,
    /// The answer matched nothing in flight, or had the wrong MTI.
    Unmatched,
}

/// The state one acquirer session and one bank link keep across payments.
pub struct SwitchCore {
    acquirer_dialect: Arc<Dialect>,
    bank_dialect: Arc<Dialect>,
    routes: RouteTable,
    acquirer: InstitutionId,
    request_timeout: Duration,
    frames: FrameDecoder,
    inflight: InflightTable<Message>,
    session_read: BytesMut,
    session_write: BytesMut,
    link_read: BytesMut,
    link_write: BytesMut,
    /// The bank's framed 0210, DE11 to be patched at `answer_stan_at`.
    answer: Vec<u8>,
    answer_stan_at: usize,
}

impl SwitchCore {
    /// A core routing by `routes`; `sample` (a framed 0200) is answered once by the
    /// simulated bank to make the 0210 template, and fills the link's other requests.
    pub fn new(routes: RouteTable, sample: &[u8]) -> SwitchCore {
        let acquirer_dialect = Arc::new(Dialect::iso87_ascii());
        let bank_dialect = Arc::new(Dialect::iso87_ascii());
        let body = bytes::Bytes::copy_from_slice(&sample[FRAMING.header_len()..]);
        let request = Message::decode(&acquirer_dialect, body).expect("sample 0200");
        // The request as the bank sees it, and the bank's answer to it.
        let mut wire = BytesMut::new();
        let changes = [Change::Set(11, b"000001")];
        reencode(
            &request,
            &acquirer_dialect,
            &bank_dialect,
            request.mti(),
            &changes,
            &mut wire,
        )
        .expect("sample 0200 in the bank's dialect");
        let at_bank = Message::decode(&bank_dialect, wire.freeze()).expect("bank's 0200");
        let mut body = BytesMut::new();
        switchyard_tools::banksim::answer(&at_bank, &bank_dialect, &mut body).expect("bank's 0210");
        let stan_at = Message::decode(&bank_dialect, body.clone().freeze())
            .ok()
            .and_then(|m| m.span(11))
            .expect("0210 with DE11");
        let mut answer = BytesMut::new();
        FRAMING.write(&mut answer, &body).expect("0210 frame");
        let mut inflight = InflightTable::new(INFLIGHT_PER_LINK_MAX_DEFAULT);
        let far = Instant::now() + Duration::from_secs(3600);
        for _ in 0..INFLIGHT_OTHERS {
            let _ = inflight.insert(far, request.clone());
        }
        SwitchCore {
            acquirer: InstitutionId::from_digits(ACQUIRER.as_bytes()).expect("acquirer id"),
            routes,
            request_timeout: Duration::from_millis(REQUEST_TIMEOUT_MS_DEFAULT),
            frames: FrameDecoder::new(FRAMING, FRAME_SIZE_MAX_BYTES_DEFAULT),
            inflight,
            session_read: BytesMut::with_capacity(BUFFER_BYTES),
            session_write: BytesMut::with_capacity(BUFFER_BYTES),
            link_read: BytesMut::with_capacity(BUFFER_BYTES),
            link_write: BytesMut::with_capacity(BUFFER_BYTES),
            answer: answer.to_vec(),
            answer_stan_at: FRAMING.header_len() + usize::from(stan_at.start),
            acquirer_dialect,
            bank_dialect,
        }
    }

    /// One payment: `request` (a framed 0200) in, the framed 0210 for the acquirer out.
    /// Returns the answer's length in bytes.
    pub fn payment(&mut self, request: &[u8]) -> Result<usize, Failure> {
        // Acquirer session: frame, decode, admit, hand over.
        self.session_read.extend_from_slice(request);
        let frame = match self.frames.decode(&mut self.session_read) {
            Ok(Some(frame)) => frame,
            _ => return Err(Failure::Decode),
        };
        let msg = Message::decode(&self.acquirer_dialect, frame).map_err(|_| Failure::Decode)?;
        let Admission::Forward { bank, .. } = admit(&msg, self.acquirer, &self.routes) else {
            return Err(Failure::NotForwarded);
        };
        let deadline = Instant::now() + self.request_timeout;
        // Bank link: STAN, re-encode with DE11 = STAN into the write buffer.
        let stan = self
            .inflight
            .insert(deadline, msg)
            .map_err(|_| Failure::TableFull)?;
        let msg = self.inflight.get(stan).ok_or(Failure::Unmatched)?;
        self.link_write.clear();
        let at = FRAMING.begin(&mut self.link_write);
        let digits = stan.to_de11();
        reencode(
            msg,
            &self.acquirer_dialect,
            &self.bank_dialect,
            msg.mti(),
            &[Change::Set(11, &digits)],
            &mut self.link_write,
        )
        .map_err(|_| Failure::Encode)?;
        FRAMING
            .finish(&mut self.link_write, at)
            .map_err(|_| Failure::Encode)?;
        // The bank's answer arrives on the link: frame, decode, match by DE11.
        let start = self.link_read.len();
        self.link_read.extend_from_slice(&self.answer);
        let patch = start + self.answer_stan_at;
        self.link_read[patch..patch + 6].copy_from_slice(&digits);
        let frame = match self.frames.decode(&mut self.link_read) {
            Ok(Some(frame)) => frame,
            _ => return Err(Failure::Decode),
        };
        let answer = Message::decode(&self.bank_dialect, frame).map_err(|_| Failure::Decode)?;
        let stan = answer
            .field(11)
            .and_then(Stan::from_de11)
            .ok_or(Failure::Unmatched)?;
        let request = self.inflight.take(stan).ok_or(Failure::Unmatched)?;
        if Some(answer.mti()) != request.mti().response() {
            return Err(Failure::Unmatched);
        }
        // Acquirer session: the answer with the acquirer's DE11, framed.
        let reply = Reply::Bank {
            stan: OriginalStan::of(&request),
            answer,
            dialect: self.bank_dialect.clone(),
            connector: bank,
            seq: 0,
        };
        self.session_write.clear();
        let encoded = encode_reply(
            &reply,
            &self.acquirer_dialect,
            FRAMING,
            &mut self.session_write,
        );
        if !encoded {
            return Err(Failure::Encode);
        }
        Ok(self.session_write.len())
    }
}

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
