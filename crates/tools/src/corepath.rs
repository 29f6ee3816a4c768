//! One payment through the switch core without sockets: the CPU work the daemon
//! does per payment, in the order it does it, through the shipped code. The
//! `core_payment` bench times it; `tests/alloc.rs` checks it allocates nothing
//! once warm.
//!
//! 1. The acquirer's framed 0200 lands in the session's read buffer; the frame is
//!    split off (`FrameDecoder`) and decoded (`Message::decode`).
//! 2. `core::validate::admit` checks it and routes it by PAN (DE2).
//! 3. The bank's `core::link::Link` takes it (`poll_transmit`): a STAN on the link,
//!    its in-flight table, DE11 rewritten into the link's reused write buffer.
//! 4. The bank's 0210 (built once with `banksim::answer`, DE11 patched to the STAN)
//!    lands in the link's read buffer; it is split off and given to
//!    `Link::on_answer`, which decodes it and matches it by DE11.
//! 5. `core::answer::encode_reply` writes the answer, with the acquirer's own DE11,
//!    into the session's reused write buffer.
//!
//! Left out, as the daemon's shells and books do them: the journal (none here), the
//! duplicates table, the queue and answer channel between tasks, metrics.

use crate::banksim;
use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard::config::{
    ECHO_INTERVAL_MS_DEFAULT, ECHO_TIMEOUT_MS_DEFAULT, INFLIGHT_PER_LINK_MAX_DEFAULT,
    REQUEST_TIMEOUT_MS_DEFAULT, WRITE_BATCH_MAX_DEFAULT,
};
use switchyard::core::answer::{encode_reply, OriginalStan, Reply};
use switchyard::core::inflight::{Stan, STAN_MAX};
use switchyard::core::link::{Finish, Link, LinkConfig, LinkEnv, LinkRequest};
use switchyard::core::route::RouteTable;
use switchyard::core::saf::Advice;
use switchyard::core::validate::{admit, Admission};
use switchyard::core::InstitutionId;
use switchyard::journal::AppendError;
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
/// Wall clock the link stamps its own messages with (DE7); fixed, as nothing here
/// reads it.
const UNIX_S: u64 = 1_764_149_400;

/// Prefix lengths (digits) with their weights out of 10,000.
pub const LENGTH_WEIGHTS: [(usize, u64); 8] = [
    (4, 5),
    (5, 50),
    (6, 5_000),
    (7, 500),
    (8, 3_545),
    (9, 400),
    (10, 300),
    (11, 200),
];

/// Marsaglia's xorshift64: deterministic, no dependency.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// ASCII digits, the first one 1..=9.
    pub fn digits(&mut self, out: &mut [u8]) {
        for (i, slot) in out.iter_mut().enumerate() {
            let d = if i == 0 {
                1 + self.below(9)
            } else {
                self.below(10)
            };
            *slot = b'0' + d as u8;
        }
    }
}

/// A prefix length drawn by [`LENGTH_WEIGHTS`].
pub fn prefix_length(rng: &mut XorShift) -> usize {
    let mut r = rng.below(10_000);
    for (len, weight) in LENGTH_WEIGHTS {
        if r < weight {
            return len;
        }
        r -= weight;
    }
    unreachable!("weights sum to 10,000")
}

/// A table of `count` distinct PAN prefixes (bank indexes 0..64), and the prefixes.
pub fn route_table(count: usize, seed: u64) -> (RouteTable, Vec<Vec<u8>>) {
    let mut rng = XorShift(seed);
    let mut table = RouteTable::new();
    let mut prefixes = Vec::with_capacity(count);
    let mut buf = [0u8; 11];
    while prefixes.len() < count {
        let len = prefix_length(&mut rng);
        rng.digits(&mut buf[..len]);
        let text = std::str::from_utf8(&buf[..len]).expect("ASCII digits");
        if table.add_prefix(text, (rng.next_u64() % 64) as u16).is_ok() {
            prefixes.push(buf[..len].to_vec());
        }
    }
    (table, prefixes)
}

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

/// Why a payment did not complete (never expected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A frame or message did not decode.
    Decode,
    /// Admission did not forward the request.
    NotForwarded,
    /// The link did not take it, or did not write it.
    NotSent,
    /// Encoding the answer for the acquirer failed.
    Encode,
    /// The answer matched nothing in flight, or had the wrong MTI.
    Unmatched,
}

/// A request as the link carries it here: the message and its deadline.
pub struct CoreRequest {
    message: Message,
    deadline: Instant,
}

impl LinkRequest for CoreRequest {
    fn message(&self) -> &Message {
        &self.message
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn original_link_stan(&self) -> Option<Stan> {
        None
    }

    fn forwarded_at(&mut self, _now: Instant) {}

    fn times(&self) -> (Instant, Instant) {
        (self.deadline, self.deadline)
    }
}

/// The bank as the link sees it here: requests handed to the link directly, no
/// journal; an answer is encoded for the acquirer at once, into the session's
/// write buffer (as the session writer would, without the channel between them).
pub struct CoreEnv {
    next_stan: Cell<u32>,
    /// The STAN the last request was forwarded under.
    forwarded: Cell<Option<Stan>>,
    queued: RefCell<Option<CoreRequest>>,
    acquirer_dialect: Arc<Dialect>,
    bank_dialect: Arc<Dialect>,
    /// The session's write buffer, and whether the last answer encoded.
    session_write: RefCell<BytesMut>,
    encoded: Cell<Option<bool>>,
}

impl LinkEnv for CoreEnv {
    type Request = CoreRequest;

    fn next_stan(&self) -> u32 {
        let n = self.next_stan.get();
        self.next_stan.set(n.wrapping_add(1));
        n % STAN_MAX + 1
    }

    fn next_request(&self) -> Option<CoreRequest> {
        self.queued.borrow_mut().take()
    }

    fn due_advices(&self, _now: Instant, _max: usize, _out: &mut Vec<Advice>) {}

    fn next_advice_due(&self) -> Option<Instant> {
        None
    }

    fn forwarded(&self, _request: &CoreRequest, stan: Stan) -> Result<u64, AppendError> {
        self.forwarded.set(Some(stan));
        Ok(0)
    }

    fn finish(&self, request: CoreRequest, how: Finish, _now: Instant) {
        let Finish::Answered { answer, .. } = how else {
            return;
        };
        let stan = OriginalStan::of(&request.message);
        let reply = Reply::bank(stan, answer, self.bank_dialect.clone(), 0, 0);
        let mut out = self.session_write.borrow_mut();
        out.clear();
        let encoded = encode_reply(
            &reply,
            (&self.acquirer_dialect, &Default::default()),
            FRAMING,
            &[],
            &mut out,
        );
        self.encoded.set(Some(encoded));
    }

    fn unmatched(&self, _stan: Stan, _approved: bool) {}
    fn advice_acked(&self, _advice: Advice) {}
    fn advice_retry(&self, _advice: Advice, _now: Instant) {}
    fn advice_deferred(&self, _advice: Advice, _now: Instant) {}
    fn advice_unsendable(&self, _advice: Advice) {}
    fn link_up(&self, _slot: usize) {}
    fn link_down(&self, _slot: usize) {}
    fn inflight(&self, _slot: usize, _n: usize) {}
}

/// The state one acquirer session and one bank link keep across payments.
pub struct SwitchCore {
    acquirer_dialect: Arc<Dialect>,
    bank_dialect: Arc<Dialect>,
    routes: RouteTable,
    acquirer: InstitutionId,
    request_timeout: Duration,
    frames: FrameDecoder,
    link: Link<CoreEnv>,
    env: CoreEnv,
    session_read: BytesMut,
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
        let body = Bytes::copy_from_slice(&sample[FRAMING.header_len()..]);
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
        banksim::answer(&at_bank, &bank_dialect, &mut body).expect("bank's 0210");
        let stan_at = Message::decode(&bank_dialect, body.clone().freeze())
            .ok()
            .and_then(|m| m.span(11))
            .expect("0210 with DE11");
        let mut answer = BytesMut::new();
        FRAMING.write(&mut answer, &body).expect("0210 frame");
        let config = LinkConfig {
            bank: InstitutionId::from_digits(b"200001").expect("bank id"),
            acquirer_dialect: acquirer_dialect.clone(),
            dialect: bank_dialect.clone(),
            framing: FRAMING,
            header: Default::default(),
            inflight_max: INFLIGHT_PER_LINK_MAX_DEFAULT,
            write_batch_max: WRITE_BATCH_MAX_DEFAULT,
            echo_interval: Duration::from_millis(ECHO_INTERVAL_MS_DEFAULT),
            echo_timeout: Duration::from_millis(ECHO_TIMEOUT_MS_DEFAULT),
            security: Default::default(),
        };
        let mut core = SwitchCore {
            acquirer: InstitutionId::from_digits(ACQUIRER.as_bytes()).expect("acquirer id"),
            routes,
            request_timeout: Duration::from_millis(REQUEST_TIMEOUT_MS_DEFAULT),
            frames: FrameDecoder::new(FRAMING, FRAME_SIZE_MAX_BYTES_DEFAULT),
            link: Link::new(config, 0, Instant::now()),
            env: CoreEnv {
                next_stan: Cell::new(0),
                forwarded: Cell::new(None),
                queued: RefCell::new(None),
                acquirer_dialect: acquirer_dialect.clone(),
                bank_dialect: bank_dialect.clone(),
                session_write: RefCell::new(BytesMut::with_capacity(BUFFER_BYTES)),
                encoded: Cell::new(None),
            },
            session_read: BytesMut::with_capacity(BUFFER_BYTES),
            link_read: BytesMut::with_capacity(BUFFER_BYTES),
            link_write: BytesMut::with_capacity(BUFFER_BYTES),
            answer: answer.to_vec(),
            answer_stan_at: FRAMING.header_len() + usize::from(stan_at.start),
            acquirer_dialect,
            bank_dialect,
        };
        core.sign_on();
        // Requests that stay in flight throughout (never answered).
        let far = Instant::now() + Duration::from_secs(3600);
        for _ in 0..INFLIGHT_OTHERS {
            *core.env.queued.borrow_mut() = Some(CoreRequest {
                message: request.clone(),
                deadline: far,
            });
            core.link_write.clear();
            core.link
                .poll_transmit(&core.env, Instant::now(), UNIX_S, &mut core.link_write);
        }
        core
    }

    /// The link's sign-on, answered 00.
    fn sign_on(&mut self) {
        let now = Instant::now();
        let mut out = BytesMut::new();
        self.link.poll_transmit(&self.env, now, UNIX_S, &mut out);
        let frame = self
            .frames
            .decode(&mut out)
            .ok()
            .flatten()
            .expect("sign-on");
        let sign_on = Message::decode(&self.bank_dialect, frame).expect("sign-on decodes");
        let mut body = BytesMut::new();
        let mut enc = Encoder::new(&self.bank_dialect, &mut body, Mti::NETWORK_RESPONSE);
        for n in [7u8, 11, 39, 70] {
            let value = if n == 39 {
                Some(&b"00"[..])
            } else {
                sign_on.field(n)
            };
            enc.field(n, value.expect("sign-on field"))
                .expect("0810 field");
        }
        enc.finish();
        self.link.on_answer(&self.env, body.freeze(), now);
        assert!(self.link.is_up(), "signed on");
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
        let Admission::Forward { .. } = admit(&msg, self.acquirer, &self.routes) else {
            return Err(Failure::NotForwarded);
        };
        let now = Instant::now();
        let request = CoreRequest {
            message: msg,
            deadline: now + self.request_timeout,
        };
        // Bank link: STAN, in flight, re-encoded with DE11 = STAN into the write buffer.
        self.link_write.clear();
        self.link
            .submit(&self.env, request, now, &mut self.link_write);
        let stan = self.env.forwarded.take().ok_or(Failure::NotSent)?;
        if self.link_write.is_empty() {
            return Err(Failure::NotSent);
        }
        let digits = stan.to_de11();
        // The bank's answer arrives on the link: frame, then the link decodes and
        // matches it by DE11, and the answer is encoded for the acquirer with its own
        // DE11.
        let start = self.link_read.len();
        self.link_read.extend_from_slice(&self.answer);
        let patch = start + self.answer_stan_at;
        self.link_read[patch..patch + 6].copy_from_slice(&digits);
        let frame = match self.frames.decode(&mut self.link_read) {
            Ok(Some(frame)) => frame,
            _ => return Err(Failure::Decode),
        };
        self.link.on_answer(&self.env, frame, now);
        match self.env.encoded.take() {
            Some(true) => Ok(self.env.session_write.borrow().len()),
            Some(false) => Err(Failure::Encode),
            None => Err(Failure::Unmatched),
        }
    }
}
