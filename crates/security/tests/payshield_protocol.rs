//! The payShield client's protocol and transport: what it does with answers that
//! are malformed, short, oversized, not to its request, or refusals; with a slow
//! or vanished HSM; and at its connection bound. A scripted server stands in for
//! the HSM where the test double would answer correctly; the double serves the
//! rest. Tests wait on events (channels), never on sleeps.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;
use switchyard_security::mac::MacError;
use switchyard_security::module::{MacAlgorithm, ModuleError, SecurityModule, Usage};
use switchyard_security::payshield::{
    KeyCheckError, PayShieldConfig, PayShieldConfigError, PayShieldKey, PayShieldModule,
    RESPONSE_SIZE_MAX_BYTES,
};
use switchyard_security::pin::{Format, PinError};
use switchyard_security::responder::{Responder, ResponderConfig};
use switchyard_security::{Algorithm, Key};

const ZAK: &str = "0123456789ABCDEFFEDCBA9876543210";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn key(hex: &str) -> Key {
    Key::new(Algorithm::Tdes, &unhex(hex)).unwrap()
}

fn lmk() -> Key {
    Key::new(Algorithm::Aes, &[0x42; 32]).unwrap()
}

/// A key entry: `token` as given.
fn entry(id: &str, usage: Usage, token: String, kcv: [u8; 3]) -> PayShieldKey {
    PayShieldKey {
        id: id.to_owned(),
        usage,
        algorithm: Algorithm::Tdes,
        length_bytes: 16,
        token,
        kcv,
    }
}

/// A module for the HSM at `address` with two ZPKs and a ZAK, as tokens of
/// the test LMK (a scripted server never reads them).
fn module_at(address: SocketAddr, tune: impl FnOnce(&mut PayShieldConfig)) -> PayShieldModule {
    let double = Responder::start(ResponderConfig::new(lmk())).unwrap();
    let mut config = PayShieldConfig::new(address);
    for (id, usage) in [
        ("zpk-a", Usage::Pin),
        ("zpk-b", Usage::Pin),
        ("zak", Usage::Mac),
    ] {
        let k = key(ZAK);
        let token = double.token(usage, &k).unwrap();
        config.keys.push(entry(id, usage, token, k.check_value()));
    }
    tune(&mut config);
    PayShieldModule::new(config).unwrap()
}

/// A scripted HSM: every request (after its length) is passed to `script`,
/// whose bytes are written back as they are (length included). Serves any
/// number of connections, each on its own thread.
fn scripted(script: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let script = std::sync::Arc::new(script);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let script = script.clone();
            std::thread::spawn(move || loop {
                let mut len = [0u8; 2];
                if stream.read_exact(&mut len).is_err() {
                    return;
                }
                let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if stream.read_exact(&mut message).is_err() {
                    return;
                }
                let answer = script(&message);
                if answer.is_empty() || stream.write_all(&answer).is_err() {
                    return;
                }
            });
        }
    });
    address
}

/// An answer to `message`: its header (4 characters) echoed, then `body`.
fn answer(message: &[u8], body: &[u8]) -> Vec<u8> {
    let len = (4 + body.len()) as u16;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&message[..4]);
    out.extend_from_slice(body);
    out
}

fn unavailable(result: Result<impl std::fmt::Debug, ModuleError>, says: &str) {
    match result {
        Err(ModuleError::Unavailable(text)) => assert!(text.contains(says), "{text:?}"),
        other => panic!("{other:?}: not Unavailable saying {says:?}"),
    }
}

fn translate(m: &PayShieldModule) -> Result<switchyard_security::module::PinBlock, ModuleError> {
    let (a, b) = (m.handle("zpk-a").unwrap(), m.handle("zpk-b").unwrap());
    m.translate_pin(
        (a, Format::Iso0),
        &[0x11; 8],
        b"4321987654321098",
        (b, Format::Iso0),
    )
}

fn verify(m: &PayShieldModule) -> Result<(), ModuleError> {
    let zak = m.handle("zak").unwrap();
    m.verify_mac(zak, MacAlgorithm::Iso9797Alg3, b"data", &[1; 8])
}

/// Whether an error is the one due.
type Is = fn(&ModuleError) -> bool;

#[test]
fn error_codes_map_to_module_errors() {
    // Each answer carries the next error code the test queued.
    let codes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<[u8; 2]>::new()));
    let queue = codes.clone();
    let address = scripted(move |message| {
        let code = queue.lock().unwrap().remove(0);
        let mut body = vec![message[4], message[5] + 1];
        body.extend_from_slice(&code);
        answer(message, &body)
    });
    let m = module_at(address, |_| {});
    let cases: [(&[u8; 2], Is); 10] = [
        (b"20", |e| *e == ModuleError::Pin(PinError::Block)),
        (b"24", |e| *e == ModuleError::Pin(PinError::Block)),
        (b"22", |e| *e == ModuleError::Pin(PinError::Pan)),
        (b"23", |e| *e == ModuleError::Pin(PinError::Key)),
        (
            b"10",
            |e| matches!(e, ModuleError::Usage { id, .. } if id == "zpk-a"),
        ),
        (
            b"11",
            |e| matches!(e, ModuleError::Usage { id, .. } if id == "zpk-b"),
        ),
        (
            b"A4",
            |e| matches!(e, ModuleError::Usage { id, .. } if id == "zpk-a"),
        ),
        (b"68", |e| {
            let says = "68 (command has been disabled)";
            matches!(e, ModuleError::Unavailable(t) if t.contains(says))
        }),
        (
            b"13",
            |e| matches!(e, ModuleError::Unavailable(t) if t.contains("LMK error")),
        ),
        (
            b"9Z",
            |e| matches!(e, ModuleError::Unavailable(t) if t.contains("unknown error code")),
        ),
    ];
    for (code, is) in cases {
        codes.lock().unwrap().push(*code);
        let got = translate(&m).unwrap_err();
        assert!(is(&got), "{}: {got:?}", String::from_utf8_lossy(code));
    }
    // A refusal is not a transport failure: the connection stays in use.
    let stats = m.stats();
    assert_eq!(
        (stats.failures, stats.connections_open),
        (0, 1),
        "{stats:?}"
    );
    // 01 from M8 is a MAC that does not verify.
    codes.lock().unwrap().push(*b"01");
    assert_eq!(verify(&m), Err(ModuleError::Mac(MacError::Mismatch)));
}

#[test]
fn malformed_answers_are_refused_naming_the_fault() {
    let bodies: Vec<(&[u8], &str)> = vec![
        (b"CE00", "answer code \"CE\" where \"CD\" was due"),
        (b"CD0", "error code at offset 6: 2 bytes needed, 1 left"),
        (b"CD\x0000", "error code at offset 6: byte 0x00"),
        (
            b"CD0004",
            "destination PIN block at offset 10: 16 bytes needed, 0 left",
        ),
        (
            b"CD0004ZZ23456789ABCDEF01",
            "destination PIN block at offset 10: byte 0x5a",
        ),
        (
            b"CD00040123456789ABCDEF05",
            "destination PIN block format at offset 27",
        ),
        (
            b"CD00040123456789ABCDEF01X",
            "1 bytes after the last field, at offset 28",
        ),
    ];
    for (body, says) in bodies {
        let body = body.to_vec();
        let address = scripted(move |message| answer(message, &body));
        let m = module_at(address, |_| {});
        unavailable(translate(&m), says);
        // The connection it came on is closed, not reused.
        assert_eq!(m.stats().connections_open, 0, "{says}");
        assert_eq!(m.stats().failures, 1);
    }
}

#[test]
fn an_answer_not_to_this_request_is_refused() {
    // The header echoed is another request's.
    let address = scripted(|message| {
        let mut out = answer(message, b"ND00");
        out[5] ^= 1;
        out
    });
    let m = module_at(address, |_| {});
    unavailable(m.diagnostics(), "header is not the request's");
    // Nothing at all after the length.
    let address = scripted(|_| vec![0, 0]);
    let m = module_at(address, |_| {});
    unavailable(
        m.diagnostics(),
        "header at offset 0: 4 bytes needed, 0 left",
    );
}

#[test]
fn short_and_oversized_answers_close_the_connection() {
    // Declares 20 bytes, sends 6 and closes.
    let address = scripted(|message| {
        let mut out = 20u16.to_be_bytes().to_vec();
        out.extend_from_slice(&message[..4]);
        out.extend_from_slice(b"ND");
        out
    });
    // The scripted HSM then waits for the next request: the client's deadline
    // ends the read.
    let m = module_at(address, |c| c.timeout = Duration::from_millis(300));
    unavailable(m.diagnostics(), "no answer within the timeout");
    assert_eq!(m.stats().connections_open, 0);
    // Over the bound: refused by its length, unread.
    let address = scripted(|message| {
        let mut out = ((RESPONSE_SIZE_MAX_BYTES + 1) as u16)
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(&message[..4]);
        out
    });
    let m = module_at(address, |_| {});
    unavailable(m.diagnostics(), "answer of 4097 bytes is over 4096");
    assert_eq!(m.stats().connections_open, 0);
}

#[test]
fn an_answer_cut_by_a_closed_connection_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut message = [0u8; 8];
        stream.read_exact(&mut message).unwrap();
        let mut out = 20u16.to_be_bytes().to_vec();
        out.extend_from_slice(&message[2..6]);
        out.extend_from_slice(b"ND");
        stream.write_all(&out).unwrap();
        // Dropped: closed inside the answer.
    });
    let m = module_at(address, |_| {});
    unavailable(m.diagnostics(), "connection closed inside the answer");
    // Not retried: part of an answer had come.
    assert_eq!(m.stats().reconnects, 0);
}

#[test]
fn a_silent_hsm_times_out_and_the_connection_is_not_reused() {
    let (seen, requests) = mpsc::channel();
    let address = scripted(move |_| {
        let _ = seen.send(());
        // Never answers: waits until the client has gone.
        std::thread::park();
        Vec::new()
    });
    let m = module_at(address, |c| c.timeout = Duration::from_millis(200));
    unavailable(m.diagnostics(), "no answer within the timeout");
    requests.recv().unwrap();
    let stats = m.stats();
    assert_eq!(
        (stats.failures, stats.connections_open),
        (1, 0),
        "{stats:?}"
    );
    // The next call opens a new connection (and times out again).
    unavailable(m.diagnostics(), "no answer within the timeout");
    requests.recv().unwrap();
}

#[test]
fn a_slow_test_double_times_out() {
    let mut config = ResponderConfig::new(lmk());
    config.delay = Duration::from_millis(500);
    let double = Responder::start(config).unwrap();
    let m = module_at(double.address(), |c| c.timeout = Duration::from_millis(100));
    unavailable(m.diagnostics(), "no answer within the timeout");
}

#[test]
fn a_vanished_hsm_is_unavailable() {
    let address = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let m = module_at(address, |_| {});
    unavailable(m.diagnostics(), "connect");
    assert_eq!(m.stats().connections_open, 0);
}

#[test]
fn a_connection_the_hsm_closed_is_replaced_once() {
    let double = Responder::start(ResponderConfig::new(lmk())).unwrap();
    let m = module_at(double.address(), |_| {});
    let first = m.diagnostics().unwrap();
    assert_eq!(first.firmware, "1500-0900");
    assert_eq!(first.lmk_check.len(), 16);
    assert_eq!(m.stats().connections_open, 1);
    // The HSM restarts: every connection closed from its side.
    double.drop_connections();
    assert_eq!(m.diagnostics().unwrap(), first);
    let stats = m.stats();
    assert_eq!((stats.reconnects, stats.failures), (1, 0), "{stats:?}");
    assert_eq!(double.connections_accepted(), 2);
}

#[test]
fn at_the_connection_bound_a_call_is_refused_at_once() {
    let (seen, requests) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let address = scripted(move |message| {
        let _ = seen.send(());
        let _ = released.lock().unwrap().recv();
        answer(message, b"ND000123456789ABCDEF1500-0900")
    });
    let m = module_at(address, |c| c.connections_max = 1);
    std::thread::scope(|s| {
        let first = s.spawn(|| m.diagnostics());
        // The first call holds the only connection, waiting for its answer.
        requests.recv().unwrap();
        unavailable(m.diagnostics(), "all 1 connections are busy");
        assert_eq!(m.stats().busy, 1);
        release.send(()).unwrap();
        let got = first.join().unwrap().unwrap();
        assert_eq!(got.lmk_check, "0123456789ABCDEF");
    });
    // Free again, on the same connection.
    release.send(()).unwrap();
    assert_eq!(m.diagnostics().unwrap().firmware, "1500-0900");
    requests.recv().unwrap();
    assert_eq!(m.stats().connections_open, 1);
}

#[test]
fn a_disabled_command_is_unavailable_and_other_commands_go_on() {
    let mut config = ResponderConfig::new(lmk());
    config.disabled = vec![*b"M6"];
    let double = Responder::start(config).unwrap();
    let mut keys = PayShieldConfig::new(double.address());
    let zak = key(ZAK);
    let token = double.token(Usage::Mac, &zak).unwrap();
    keys.keys
        .push(entry("zak", Usage::Mac, token, zak.check_value()));
    let m = PayShieldModule::new(keys).unwrap();
    let h = m.handle("zak").unwrap();
    let mut out = [0u8; 8];
    unavailable(
        m.generate_mac(h, MacAlgorithm::Iso9797Alg3, b"x", &mut out),
        "M6 answered error 68",
    );
    // M8 is not disabled; a 6-byte MAC is checked through M6, which is.
    assert_eq!(
        m.verify_mac(h, MacAlgorithm::Iso9797Alg3, b"x", &[0; 8]),
        Err(ModuleError::Mac(MacError::Mismatch))
    );
    unavailable(
        m.verify_mac(h, MacAlgorithm::Iso9797Alg3, b"x", &[0; 6]),
        "68",
    );
    // Data over the bound is refused before anything is sent.
    let commands = double.commands();
    unavailable(
        m.verify_mac(
            h,
            MacAlgorithm::Iso9797Alg3,
            &vec![0; 16 * 1024 + 1],
            &[0; 8],
        ),
        "at most 16384",
    );
    assert_eq!(double.commands(), commands);
}

#[test]
fn keys_are_checked_against_the_hsm() {
    let double = Responder::start(ResponderConfig::new(lmk())).unwrap();
    let zak = key(ZAK);
    let token = double.token(Usage::Mac, &zak).unwrap();
    let mut config = PayShieldConfig::new(double.address());
    config
        .keys
        .push(entry("zak", Usage::Mac, token.clone(), zak.check_value()));
    PayShieldModule::new(config.clone())
        .unwrap()
        .check_keys()
        .unwrap();
    // Recorded with another check value: another key, or another LMK.
    config.keys[0].kcv = [1, 2, 3];
    let m = PayShieldModule::new(config.clone()).unwrap();
    assert_eq!(
        m.check_keys(),
        Err(KeyCheckError::Mismatch {
            id: "zak".into(),
            configured: "010203".into(),
            found: "08D7B4".into(),
        })
    );
    // A token of another LMK does not authenticate in this HSM.
    let other = Responder::start(ResponderConfig::new(
        Key::new(Algorithm::Aes, &[0x43; 32]).unwrap(),
    ))
    .unwrap();
    config.address = other.address();
    let m = PayShieldModule::new(config).unwrap();
    match m.check_keys() {
        Err(KeyCheckError::Module {
            id,
            error: ModuleError::Usage { .. },
        }) => assert_eq!(id, "zak"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn configs_are_checked_and_tokens_never_shown() {
    let address: SocketAddr = "127.0.0.1:1500".parse().unwrap();
    let token = format!("U{}", "0123456789ABCDEF".repeat(2));
    let good = entry("zak", Usage::Mac, token.clone(), [8, 0xD7, 0xB4]);
    let with = |tune: &dyn Fn(&mut PayShieldConfig)| {
        let mut c = PayShieldConfig::new(address);
        c.keys.push(good.clone());
        tune(&mut c);
        PayShieldModule::new(c).map(|_| ())
    };
    assert_eq!(with(&|_| {}), Ok(()));
    assert_eq!(
        with(&|c| c.connections_max = 0),
        Err(PayShieldConfigError::Connections(0))
    );
    assert_eq!(
        with(&|c| c.header_len = 17),
        Err(PayShieldConfigError::HeaderLength(17))
    );
    assert!(matches!(
        with(&|c| c.timeout = Duration::ZERO),
        Err(PayShieldConfigError::Timeout(_))
    ));
    assert_eq!(
        with(&|c| c.keys.push(good.clone())),
        Err(PayShieldConfigError::Id("zak".into()))
    );
    assert!(matches!(
        with(&|c| c.keys[0].token.push('0')),
        Err(PayShieldConfigError::Token { .. })
    ));
    assert!(matches!(
        with(&|c| c.keys[0].algorithm = Algorithm::Aes),
        Err(PayShieldConfigError::Token { .. })
    ));
    assert!(matches!(
        with(&|c| c.keys[0].length_bytes = 8),
        Err(PayShieldConfigError::Length { .. })
    ));
    let bad = with(&|c| c.keys[0].token = format!("U{}", "XY".repeat(16)));
    assert!(!format!("{bad:?}").contains("XYXY"), "{bad:?}");
    // Debug shows ids and check values, never the token.
    let mut c = PayShieldConfig::new(address);
    c.keys.push(good.clone());
    let m = PayShieldModule::new(c.clone()).unwrap();
    for shown in [format!("{m:?}"), format!("{c:?}"), format!("{good:?}")] {
        assert!(!shown.contains("0123456789ABCDEF"), "{shown}");
        assert!(shown.contains("08D7B4"), "{shown}");
    }
}

#[test]
fn a_variant_token_is_sent_as_it_is_and_the_double_refuses_its_scheme() {
    // The double holds key-block tokens only; a U token is framed correctly
    // (the answer is a refusal, not a framing error).
    let double = Responder::start(ResponderConfig::new(lmk())).unwrap();
    let mut config = PayShieldConfig::new(double.address());
    let token = format!("U{}", "0123456789ABCDEF".repeat(2));
    config
        .keys
        .push(entry("zak", Usage::Mac, token, [8, 0xD7, 0xB4]));
    let m = PayShieldModule::new(config).unwrap();
    let h = m.handle("zak").unwrap();
    assert!(matches!(
        m.key_check_value(h),
        Err(ModuleError::Usage { id, .. }) if id == "zak"
    ));
    let mut out = [0u8; 8];
    assert!(matches!(
        m.generate_mac(h, MacAlgorithm::Iso9797Alg3, b"x", &mut out),
        Err(ModuleError::Usage { .. })
    ));
    // Refusals, not transport failures.
    assert_eq!(m.stats().failures, 0);
}

#[test]
fn the_header_may_be_any_length_the_hsm_is_set_to() {
    for header_len in [0, 1, 8, 16] {
        let mut config = ResponderConfig::new(lmk());
        config.header_len = header_len;
        let double = Responder::start(config).unwrap();
        let m = module_at(double.address(), |c| c.header_len = header_len);
        for _ in 0..3 {
            m.diagnostics().unwrap();
        }
    }
    // A client and an HSM that disagree do not understand each other.
    let double = Responder::start(ResponderConfig::new(lmk())).unwrap();
    let m = module_at(double.address(), |c| c.header_len = 6);
    assert!(matches!(m.diagnostics(), Err(ModuleError::Unavailable(_))));
}

/// A seeded xorshift: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `message` with one of: a byte changed, bytes cut from the end, bytes added,
/// a span cut from the middle.
fn mutate(rng: &mut Rng, message: &[u8]) -> Vec<u8> {
    let mut out = message.to_vec();
    match rng.below(4) {
        0 if !out.is_empty() => {
            let i = rng.below(out.len());
            out[i] = rng.next() as u8;
        }
        1 => out.truncate(rng.below(out.len() + 1)),
        2 => out.extend((0..1 + rng.below(8)).map(|_| rng.next() as u8)),
        _ if out.len() > 2 => {
            let at = rng.below(out.len() - 1);
            let n = 1 + rng.below(out.len() - at - 1);
            out.drain(at..at + n);
        }
        _ => {}
    }
    out
}

#[test]
fn mutated_commands_never_panic_the_double() {
    let double = Responder::start(ResponderConfig::new(lmk())).unwrap();
    let hsm = double.hsm();
    let zak = key(ZAK);
    let (mac_token, pin_token) = (
        double.token(Usage::Mac, &zak).unwrap(),
        double.token(Usage::Pin, &zak).unwrap(),
    );
    let zmk = double.token(Usage::KeyEncryption, &zak).unwrap();
    let commands = [
        "0000NC".to_owned(),
        format!("0000BUFFF{mac_token};FFF;001"),
        format!("0000CC{pin_token}{pin_token}1200010203040506070101198765432109"),
        format!("0000M600131FFF{mac_token}0004data"),
        format!("0000M800131FFF{mac_token}0004data0102030405060708"),
        format!("0000A01FFFS{zmk}R#P0T2B00E00"),
    ];
    for command in &commands {
        let answer = hsm.answer(command.as_bytes()).unwrap();
        assert_ne!(&answer[8..10], b"15", "{command}: a well-formed command");
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..20_000 {
        let command = &commands[rng.below(commands.len())];
        let mut message = mutate(&mut rng, command.as_bytes());
        if rng.below(4) == 0 {
            message = mutate(&mut rng, &message);
        }
        if let Some(answer) = hsm.answer(&message) {
            let len = usize::from(u16::from_be_bytes([answer[0], answer[1]]));
            assert_eq!(len, answer.len() - 2);
            assert_eq!(&answer[2..6], &message[..4]);
        }
    }
}

#[test]
fn mutated_answers_never_panic_the_client() {
    // The double's answers, mutated (their length kept right, so that nothing
    // waits for a timeout).
    let double = Responder::start(ResponderConfig::new(lmk())).unwrap();
    let answers = std::sync::Arc::new(double);
    let answering = answers.clone();
    let rng = std::sync::Mutex::new(Rng(0x2545_F491_4F6C_DD1D));
    let address = scripted(move |message| {
        let answer = answering.hsm().answer(message).unwrap_or_default();
        let body = mutate(&mut rng.lock().unwrap(), answer.get(2..).unwrap_or(&[]));
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    });
    let mut config = PayShieldConfig::new(address);
    let zak = key(ZAK);
    for (id, usage) in [
        ("zpk-a", Usage::Pin),
        ("zak", Usage::Mac),
        ("zmk", Usage::KeyEncryption),
    ] {
        let token = answers.token(usage, &zak).unwrap();
        config.keys.push(entry(id, usage, token, zak.check_value()));
    }
    let m = PayShieldModule::new(config).unwrap();
    let (zpk, mac, zmk) = (
        m.handle("zpk-a").unwrap(),
        m.handle("zak").unwrap(),
        m.handle("zmk").unwrap(),
    );
    let block = switchyard_security::pin::encipher(
        Format::Iso0,
        &zak,
        b"1234",
        b"4321987654321098",
        &mut switchyard_security::pin::os_random,
    )
    .unwrap();
    let mut outcomes = [0usize; 2];
    for i in 0..300 {
        let mut out = [0u8; 8];
        let results = [
            m.diagnostics().map(|_| ()),
            m.key_check_value(mac).map(|_| ()),
            m.translate_pin(
                (zpk, Format::Iso0),
                &block,
                b"4321987654321098",
                (zpk, Format::Iso3),
            )
            .map(|_| ()),
            m.generate_mac(mac, MacAlgorithm::Iso9797Alg3, b"data", &mut out),
            m.verify_mac(mac, MacAlgorithm::Iso9797Alg3, b"data", &out),
            m.stage(mac, zmk).map(|_| ()),
        ];
        for r in results {
            outcomes[usize::from(r.is_ok())] += 1;
        }
        assert!(m.stats().connections_open <= 4, "{i}");
    }
    // Some mutations leave a sound answer (a changed hex digit of a MAC).
    assert!(outcomes[1] > 0 && outcomes[0] > 0, "{outcomes:?}");
}

#[test]
fn a_rotated_key_survives_a_restart_when_its_token_is_saved() {
    let double = Responder::start(ResponderConfig::new(lmk())).unwrap();
    let zak = key(ZAK);
    let zmk = key("0123456789ABCDEF0123456789ABCDEF");
    let mut config = PayShieldConfig::new(double.address());
    config.keys.push(entry(
        "zak",
        Usage::Mac,
        double.token(Usage::Mac, &zak).unwrap(),
        zak.check_value(),
    ));
    config.keys.push(entry(
        "zmk",
        Usage::KeyEncryption,
        double.token(Usage::KeyEncryption, &zmk).unwrap(),
        zmk.check_value(),
    ));
    let m = PayShieldModule::new(config.clone()).unwrap();
    let (h, under) = (m.handle("zak").unwrap(), m.handle("zmk").unwrap());
    let (before, _) = m.current_token(h).unwrap();
    let staged = m.stage(h, under).unwrap();
    // Staged is not current: nothing to save yet.
    assert_eq!(m.current_token(h).unwrap().0, before);
    m.activate(h, &staged).unwrap();
    let (token, kcv) = m.current_token(h).unwrap();
    assert_ne!(token, before);
    assert_eq!(kcv, staged.kcv);
    let mut mac = [0u8; 8];
    m.generate_mac(h, MacAlgorithm::Iso9797Alg3, b"after", &mut mac)
        .unwrap();
    // The switch restarts from the saved token: the same key, checked.
    config.keys[0].token = token;
    config.keys[0].kcv = kcv;
    let restarted = PayShieldModule::new(config).unwrap();
    restarted.check_keys().unwrap();
    let h = restarted.handle("zak").unwrap();
    restarted
        .verify_mac(h, MacAlgorithm::Iso9797Alg3, b"after", &mac)
        .unwrap();
}
