//! End-to-end tests over real mutual TLS on 127.0.0.1:0, certificates made in the test.

use bytes::BytesMut;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use switchyard::wire::{Dialect, Encoder, Framing, Message, MessageHeader, Mti};
use switchyard_tools::demo::{Speaks, Testbed, TestbedOptions};
use switchyard_tools::testkit::{payment_fields, Client, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client of `bed` presenting a certificate for institution `id`.
async fn client(bed: &Testbed, id: &str) -> Client {
    let tls = bed.client_tls(id).unwrap();
    Client::connect(bed.switch_addr, tls).await.unwrap()
}

/// Polls `done` every 10 ms until it holds, for at most [`WAIT`]; `what` names it on
/// failure. For effects the switch shows only in counters or in the journal.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let poll = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(WAIT, poll).await.is_err() {
        panic!("not within {WAIT:?}: {what}");
    }
}

fn code(m: &Message) -> &[u8] {
    m.field(39).unwrap_or(b"--")
}

async fn testbed(opts: TestbedOptions) -> Testbed {
    Testbed::start(opts).await.expect("test bed starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_decline_and_field_echo() {
    let bed = testbed(TestbedOptions::default()).await;
    let mut c = client(&bed, "100001").await;
    c.send(
        Mti::FINANCIAL,
        &payment_fields(b"000042", b"100001", b"4111111111111111", b"000000001000"),
    )
    .await;
    let a = c.recv().await.unwrap();
    assert_eq!(a.mti(), Mti::FINANCIAL_RESPONSE);
    assert_eq!(code(&a), b"00");
    assert_eq!(
        a.field(11),
        Some(&b"000042"[..]),
        "acquirer's STAN restored"
    );
    assert_eq!(a.field(37), Some(&b"532912000001"[..]));
    assert_eq!(a.field(38).map(|v| v.len()), Some(6), "approval code");
    assert_eq!(
        bed.banks[0].stats.requests.load(Ordering::Relaxed),
        1,
        "routed by PAN prefix 4"
    );

    c.send(
        Mti::FINANCIAL,
        &payment_fields(b"000043", b"100001", b"5500000000000004", b"000000001051"),
    )
    .await;
    let d = c.recv().await.unwrap();
    assert_eq!((code(&d), d.field(11)), (&b"51"[..], Some(&b"000043"[..])));
    assert_eq!(
        bed.banks[1].stats.requests.load(Ordering::Relaxed),
        1,
        "routed by PAN prefix 5"
    );

    // DE100 beats the PAN prefix.
    let mut f = payment_fields(b"000044", b"100001", b"4111111111111111", b"000000002000");
    f.push((100, b"200003"));
    c.send(Mti::AUTHORIZATION, &f).await;
    let r = c.recv().await.unwrap();
    assert_eq!(
        (r.mti(), code(&r)),
        (Mti::AUTHORIZATION_RESPONSE, &b"00"[..])
    );
    assert_eq!(bed.banks[2].stats.requests.load(Ordering::Relaxed), 1);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_declines_no_route_wrong_acquirer_and_answers_echo() {
    let bed = testbed(TestbedOptions::default()).await;
    let mut c = client(&bed, "100002").await;
    c.send(
        Mti::FINANCIAL,
        &payment_fields(b"000001", b"100002", b"9999999999999999", b"000000001000"),
    )
    .await;
    let a = c.recv().await.unwrap();
    assert_eq!(
        (a.mti(), code(&a), a.field(11)),
        (Mti::FINANCIAL_RESPONSE, &b"92"[..], Some(&b"000001"[..]))
    );

    // DE32 names another institution than the certificate.
    c.send(
        Mti::FINANCIAL,
        &payment_fields(b"000002", b"100001", b"4111111111111111", b"000000001000"),
    )
    .await;
    let a = c.recv().await.unwrap();
    assert_eq!((code(&a), a.field(11)), (&b"58"[..], Some(&b"000002"[..])));
    assert_eq!(
        bed.banks[0].stats.requests.load(Ordering::Relaxed),
        0,
        "never forwarded"
    );

    c.send(
        Mti::NETWORK,
        &[(7, b"1125120000"), (11, b"000003"), (70, b"301")],
    )
    .await;
    let e = c.recv().await.unwrap();
    assert_eq!(e.mti(), Mti::NETWORK_RESPONSE);
    assert_eq!(
        (code(&e), e.field(70), e.field(11)),
        (&b"00"[..], Some(&b"301"[..]), Some(&b"000003"[..]))
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        ..TestbedOptions::default()
    })
    .await;
    let anonymous = switchyard::tls::client_config_anonymous(&[bed.ca.ca_der()]).unwrap();
    // TLS 1.3: the client may finish its side before the server's refusal arrives, so
    // the refusal shows either at connect or at the first read.
    if let Ok(mut c) = Client::connect(bed.switch_addr, anonymous).await {
        c.send(
            Mti::NETWORK,
            &[(7, b"1125120000"), (11, b"000001"), (70, b"301")],
        )
        .await;
        assert!(c.recv().await.is_none(), "no answer without a certificate");
    }
    // A certificate from another CA is refused too.
    let other = switchyard_tools::certs::DevCa::new("someone else").unwrap();
    let issued = other.issue_client("100001").unwrap();
    let tls = switchyard::tls::client_config(
        &[bed.ca.ca_der()],
        issued.chain().unwrap(),
        issued.key().unwrap(),
    )
    .unwrap();
    if let Ok(mut c) = Client::connect(bed.switch_addr, tls).await {
        c.send(
            Mti::NETWORK,
            &[(7, b"1125120000"), (11, b"000001"), (70, b"301")],
        )
        .await;
        assert!(
            c.recv().await.is_none(),
            "no answer with a foreign certificate"
        );
    }
    // A valid certificate for an institution not in config is refused after the handshake.
    let mut c = client(&bed, "100999").await;
    c.send(
        Mti::NETWORK,
        &[(7, b"1125120000"), (11, b"000001"), (70, b"301")],
    )
    .await;
    assert!(c.recv().await.is_none(), "unknown institution");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_down_answers_91_without_waiting_for_the_deadline() {
    // The deadline is a minute: a 91 well inside the test's wait cannot be a timeout.
    let opts = TestbedOptions {
        banks: 1,
        banks_down: 1,
        request_timeout_ms: 60_000,
        ..TestbedOptions::default()
    };
    let bed = testbed(opts).await;
    let down = bed.banks_down[0].clone();
    let mut c = client(&bed, "100001").await;
    let mut f = payment_fields(b"000007", b"100001", b"4111111111111111", b"000000001000");
    f.push((100, down.as_bytes()));
    c.send(Mti::FINANCIAL, &f).await;
    let a = c.recv().await.unwrap();
    assert_eq!((code(&a), a.field(11)), (&b"91"[..], Some(&b"000007"[..])));
    // The live bank still serves.
    assert_eq!(
        code(
            &c.pay(b"000008", b"100001", b"4111111111111111", b"000000001000")
                .await
        ),
        b"00"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_bank_gets_68_at_deadline_and_late_answer_is_dropped() {
    let opts = TestbedOptions {
        banks: 1,
        links: 1,
        request_timeout_ms: 200,
        bank_latency: Duration::from_millis(600),
        ..TestbedOptions::default()
    };
    let bed = testbed(opts).await;
    let mut c = client(&bed, "100001").await;
    c.send(
        Mti::FINANCIAL,
        &payment_fields(b"000100", b"100001", b"4111111111111111", b"000000001000"),
    )
    .await;
    let a = c.recv().await.unwrap();
    assert_eq!(
        (a.mti(), code(&a), a.field(11)),
        (Mti::FINANCIAL_RESPONSE, &b"68"[..], Some(&b"000100"[..]))
    );
    // Wait until the bank's late answer has reached the switch and been dropped.
    let connector = bed.switch.connectors()[0].clone();
    eventually("late answer arrives", || {
        connector.stats.unmatched.load(Ordering::Relaxed) != 0
    })
    .await;
    // The next thing on the connection is the echo answer, not a second 0210.
    c.send(
        Mti::NETWORK,
        &[(7, b"1125120000"), (11, b"000101"), (70, b"301")],
    )
    .await;
    let e = c.recv().await.unwrap();
    assert_eq!(
        (e.mti(), e.field(11)),
        (Mti::NETWORK_RESPONSE, Some(&b"000101"[..]))
    );
    assert_eq!(connector.stats.timed_out.load(Ordering::Relaxed), 1);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_on_one_connection_does_not_disturb_another() {
    let bed = testbed(TestbedOptions::default()).await;
    let mut good = client(&bed, "100001").await;
    let mut bad = client(&bed, "100002").await;
    // A bitmap announcing DE2 with a length beyond its maximum: answered 30, DE11 absent.
    let mut msg = b"0200".to_vec();
    msg.extend_from_slice(&[0x40, 0, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(b"994111");
    bad.send_raw(&msg).await;
    let a = bad.recv().await.unwrap();
    assert_eq!((a.mti(), code(&a)), (Mti::FINANCIAL_RESPONSE, &b"30"[..]));
    // A non-digit in DE4: answered 30, echoing DE3 (decoded before the error).
    let mut out = BytesMut::new();
    let d = Dialect::iso87_ascii();
    let mut enc = Encoder::new(&d, &mut out, Mti::FINANCIAL);
    for (n, v) in [(3u8, &b"000000"[..]), (4, b"000000001000"), (11, b"000009")] {
        enc.field(n, v).unwrap();
    }
    enc.finish();
    let at = out.iter().position(|&b| b == b'1').unwrap();
    out[at] = b'X';
    bad.send_raw(&out).await;
    let a = bad.recv().await.unwrap();
    assert_eq!(
        (code(&a), a.field(3), a.field(11)),
        (&b"30"[..], Some(&b"000000"[..]), None)
    );
    // Meanwhile the good connection is served.
    for i in 0..20u32 {
        let stan = format!("{:06}", 200 + i);
        good.send(
            Mti::FINANCIAL,
            &payment_fields(
                stan.as_bytes(),
                b"100001",
                b"4111111111111111",
                b"000000001000",
            ),
        )
        .await;
        let a = good.recv().await.unwrap();
        assert_eq!((code(&a), a.field(11)), (&b"00"[..], Some(stan.as_bytes())));
    }
    // Random bytes then an oversized length header: the bad connection is closed.
    bad.send_raw(&[0xde, 0xad, 0xbe, 0xef]).await;
    bad.stream()
        .write_all(&[0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    let _ = bad.stream().flush().await;
    while bad.recv_any().await.is_some() {}
    // And the good one still is served.
    good.send(
        Mti::FINANCIAL,
        &payment_fields(b"000999", b"100001", b"4111111111111111", b"000000001000"),
    )
    .await;
    assert_eq!(code(&good.recv().await.unwrap()), b"00");
    assert!(bed.switch.connectors()[0].links_up() > 0);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stan_wraps_around_on_a_bank_link() {
    let opts = TestbedOptions {
        banks: 1,
        links: 1,
        first_stan: 999_998,
        ..TestbedOptions::default()
    };
    let bed = testbed(opts).await;
    let mut c = client(&bed, "100001").await;
    let mut seen_at_bank = Vec::new();
    for stan in [b"000010", b"000011", b"000012", b"000013"] {
        c.send(
            Mti::FINANCIAL,
            &payment_fields(stan, b"100001", b"4111111111111111", b"000000001000"),
        )
        .await;
        let a = c.recv().await.unwrap();
        assert_eq!(
            (code(&a), a.field(11)),
            (&b"00"[..], Some(&stan[..])),
            "acquirer STAN restored"
        );
        seen_at_bank.push(bed.banks[0].stats.last_stan.load(Ordering::Relaxed));
    }
    assert_eq!(
        seen_at_bank,
        vec![999_999, 1, 2, 3],
        "link STANs wrap past 999999 to 1 (the sign-on took 999998)"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_bank_links_send_echoes() {
    let opts = TestbedOptions {
        banks: 1,
        links: 1,
        echo_interval_ms: 100,
        ..TestbedOptions::default()
    };
    let bed = testbed(opts).await;
    let stats = bed.banks[0].stats.clone();
    let echoed = async {
        while stats.echoes.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, echoed)
        .await
        .expect("idle link echoes");
    assert_eq!(
        bed.switch.connectors()[0].links_up(),
        1,
        "answered echoes keep the link up"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_missing_echoes_is_marked_down_and_routed_around() {
    let bed = testbed(TestbedOptions {
        banks: 2,
        links: 1,
        echo_interval_ms: 100,
        echo_timeout_ms: 200,
        failover: vec![("200002".into(), "200001".into())],
        ..TestbedOptions::default()
    })
    .await;
    // 200002 stops answering anything, echoes and sign-ons included.
    bed.banks[1].behavior.set_silent(true);
    let connector = bed.switch.connectors()[1].clone();
    eventually("200002 marked down after a missed echo", || {
        connector.links_up() == 0
    })
    .await;
    let mut c = client(&bed, "100001").await;
    let a = c
        .pay(b"000001", b"100001", b"5500000000000004", b"000000001000")
        .await;
    assert_eq!(code(&a), b"00", "routed around to 200001");
    assert_eq!(bed.banks[0].stats.requests.load(Ordering::Relaxed), 1);
    assert_eq!(bed.banks[1].stats.requests.load(Ordering::Relaxed), 0);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_clients_are_served() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        ..TestbedOptions::default()
    })
    .await;
    let issued = bed.ca.issue_client("100003").unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(bed.ca.ca_der()).unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(switchyard::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(issued.chain().unwrap(), issued.key().unwrap())
        .unwrap();
    let mut c = Client::connect(bed.switch_addr, Arc::new(tls12))
        .await
        .unwrap();
    assert_eq!(
        c.stream().get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(
        code(
            &c.pay(b"000001", b"100003", b"4111111111111111", b"000000001000")
                .await
        ),
        b"00"
    );
    assert_eq!(bed.switch.sessions_of("100003".parse().unwrap()), 1);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_answers_are_recorded_before_release() {
    use switchyard::journal::{scan, Fsync, RecordKind};
    let opts = TestbedOptions {
        banks: 1,
        banks_down: 0,
        journal: Some(Fsync::Batch),
        request_timeout_ms: 300,
        ..TestbedOptions::default()
    };
    let bed = testbed(opts).await;
    let dir = bed.journal_dir.clone().unwrap();
    let mut c = client(&bed, "100001").await;
    let visa = b"4111111111111111";
    // Approved, declined by the bank, timed out (silent bank), and a switch decline
    // before admission (92), which is not journaled.
    type Case<'a> = (&'a [u8], &'a [u8], &'a [u8], &'a [u8]); // STAN, PAN, DE4, DE39
    let cases: [Case; 4] = [
        (b"000001", visa, b"000000001000", b"00"),
        (b"000002", visa, b"000000001051", b"51"),
        (b"000003", visa, b"000000001000", b"68"),
        (b"000004", b"9999999999999999", b"000000001000", b"92"),
    ];
    for (stan, pan, amount, expected) in cases {
        bed.banks[0].behavior.set_silent(stan == b"000003");
        assert_eq!(code(&c.pay(stan, b"100001", pan, amount).await), expected);
    }

    // Every answer above was released after its outcome record was durable.
    let mut outcomes = Vec::new();
    let s = scan(&dir, |_, _, r| {
        if r.kind == RecordKind::Outcome {
            outcomes.push((r.request_id, r.body[..2].to_vec()));
        }
    })
    .unwrap();
    let count = |k: RecordKind| s.by_kind[RecordKind::ALL.iter().position(|x| *x == k).unwrap()];
    assert_eq!(count(RecordKind::Accepted), 3);
    assert_eq!(count(RecordKind::Forwarded), 3);
    let codes: Vec<&[u8]> = outcomes.iter().map(|(_, c)| c.as_slice()).collect();
    assert_eq!(codes, vec![&b"00"[..], b"51", b"68"]);
    assert!(s.torn_tail.is_none());
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_journal_refuses_new_requests_with_91() {
    use switchyard::journal::Fsync;
    let opts = TestbedOptions {
        banks: 1,
        journal: Some(Fsync::Batch),
        ..TestbedOptions::default()
    };
    let bed = testbed(opts).await;
    let mut c = client(&bed, "100001").await;
    assert_eq!(
        code(
            &c.pay(b"000001", b"100001", b"4111111111111111", b"000000001000")
                .await
        ),
        b"00"
    );
    bed.switch.journal().unwrap().simulate_failure();
    c.send(
        Mti::FINANCIAL,
        &payment_fields(b"000002", b"100001", b"4111111111111111", b"000000001000"),
    )
    .await;
    let a = c.recv().await.unwrap();
    assert_eq!((code(&a), a.field(11)), (&b"91"[..], Some(&b"000002"[..])));
    assert_eq!(
        bed.banks[0].stats.requests.load(Ordering::Relaxed),
        1,
        "not forwarded"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_bank_gets_a_reversal_advice_and_acknowledges_it() {
    use switchyard::journal::recovery::recover;
    use switchyard::journal::Fsync;
    let opts = TestbedOptions {
        banks: 1,
        links: 1,
        request_timeout_ms: 200,
        bank_latency: Duration::from_millis(500),
        journal: Some(Fsync::Batch),
        ..TestbedOptions::default()
    };
    let bed = testbed(opts).await;
    let mut c = client(&bed, "100001").await;
    let a = c
        .pay(b"000050", b"100001", b"4111111111111111", b"000000001000")
        .await;
    assert_eq!(code(&a), b"68");
    // The bank answers the 0200 late (dropped) and the 0420 within the advice's time.
    let connector = bed.switch.connectors()[0].clone();
    eventually("reversal acknowledged", || {
        connector.stats.reversals_acked.load(Ordering::Relaxed) != 0
    })
    .await;
    assert_eq!(
        bed.banks[0].stats.requests.load(Ordering::Relaxed),
        2,
        "the 0200 and one 0420"
    );
    assert_eq!(connector.reversals_waiting(), 0);
    let dir = bed.journal_dir.clone().unwrap();
    // The acknowledgement record becomes durable with the writer's next commit.
    eventually("ack journaled", || {
        recover(&dir).unwrap().1.reversals_pending.is_empty()
    })
    .await;
    let (_, recovery) = recover(&dir).unwrap();
    assert!(
        recovery.unfinished.is_empty(),
        "the 68 is the request's outcome"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_forwarded_requests_without_outcome_are_reversed() {
    use bytes::Bytes;
    use switchyard::journal::recovery::recover;
    use switchyard::journal::{Entry, Fsync, Journal, JournalConfig, RecordKind};
    // The journal a crash left: request 7 accepted and forwarded (connector 0,
    // link STAN 123), no outcome.
    let dir = std::env::temp_dir().join(format!("switchyard-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = Dialect::iso87_ascii();
    let mut request = BytesMut::new();
    let mut enc = Encoder::new(&d, &mut request, Mti::FINANCIAL);
    for (n, v) in payment_fields(b"000777", b"100001", b"4111111111111111", b"000000004200") {
        enc.field(n, v).unwrap();
    }
    enc.finish();
    let request: Bytes = request.freeze();
    let entry = |kind, head: &[u8], message: Bytes| {
        let mut h = [0u8; 16];
        h[..head.len()].copy_from_slice(head);
        Entry {
            kind,
            protected: false,
            request_id: 7,
            unix_ms: 0,
            head: (h, head.len() as u8),
            message,
        }
    };
    let mut forwarded = [0u8; 6];
    forwarded[2..].copy_from_slice(&123u32.to_le_bytes());
    let opened = Journal::open(JournalConfig::new(&dir)).unwrap();
    opened
        .journal
        .append(entry(RecordKind::Accepted, &[0; 8], request))
        .unwrap();
    opened
        .journal
        .append(entry(RecordKind::Forwarded, &forwarded, Bytes::new()))
        .unwrap();
    opened.journal.close();
    drop(opened);

    let opts = TestbedOptions {
        banks: 1,
        links: 1,
        journal: Some(Fsync::Batch),
        journal_at: Some(dir.clone()),
        // The test bed's 2 s window would let a slow machine forget the
        // originals before their retransmissions come.
        duplicate_window_s: 300,
        ..TestbedOptions::default()
    };
    let bed = testbed(opts).await;
    let connector = bed.switch.connectors()[0].clone();
    eventually("resumed reversal acknowledged", || {
        connector.stats.reversals_acked.load(Ordering::Relaxed) != 0
    })
    .await;
    assert_eq!(
        bed.banks[0].stats.requests.load(Ordering::Relaxed),
        1,
        "one 0420, nothing else"
    );
    // Its own STAN, past those used before the restart (the journal's position).
    let stan = bed.banks[0].stats.last_stan.load(Ordering::Relaxed);
    assert!(stan > 2 && stan != 123, "advice on a fresh STAN: {stan}");
    eventually("closed and acknowledged in the journal", || {
        let (_, r) = recover(&dir).unwrap();
        r.unfinished.is_empty() && r.reversals_pending.is_empty()
    })
    .await;
    bed.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The messages of `mti` a bank received (its log must be enabled).
fn bank_saw(bed: &Testbed, bank: usize, mti: &[u8; 4]) -> Vec<Message> {
    bank_saw_in(bed, bank, mti, &Dialect::iso87_ascii())
}

/// What bank `bank`, speaking dialect `d`, received with MTI `mti`.
fn bank_saw_in(bed: &Testbed, bank: usize, mti: &[u8; 4], d: &Dialect) -> Vec<Message> {
    bed.banks[bank]
        .stats
        .log
        .messages()
        .into_iter()
        .filter_map(|m| Message::decode(d, m).ok())
        .filter(|m| m.mti().as_bytes() == mti)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmissions_get_the_original_answer_and_reach_the_bank_once() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        first_stan: 700,
        ..TestbedOptions::default()
    })
    .await;
    bed.banks[0].stats.log.enable(1000);
    let mut c = client(&bed, "100001").await;
    let request = payment_fields(b"000042", b"100001", b"4111111111111111", b"000000001000");
    c.send(Mti::FINANCIAL, &request).await;
    let first = c.recv().await.unwrap();
    assert_eq!(code(&first), b"00");
    let approval = first.field(38).expect("approval code").to_vec();
    // The same request again, then as a repeat (0201): the original answer each time.
    c.send(Mti::FINANCIAL, &request).await;
    c.send(Mti(*b"0201"), &request).await;
    for _ in 0..2 {
        let again = c.recv().await.unwrap();
        assert_eq!(again.mti(), Mti::FINANCIAL_RESPONSE);
        assert_eq!(
            (code(&again), again.field(38), again.field(11)),
            (&b"00"[..], Some(&approval[..]), Some(&b"000042"[..]))
        );
    }
    // Same key, other content: 94, not forwarded.
    let changed = payment_fields(b"000042", b"100001", b"4111111111111111", b"000000009999");
    c.send(Mti::FINANCIAL, &changed).await;
    assert_eq!(code(&c.recv().await.unwrap()), b"94");
    // An unrelated request proves everything before it reached the bank already.
    assert_eq!(
        code(
            &c.pay(b"000043", b"100001", b"4111111111111111", b"000000001000")
                .await
        ),
        b"00"
    );
    let seen = bank_saw(&bed, 0, b"0200").len() + bank_saw(&bed, 0, b"0201").len();
    assert_eq!(seen, 2, "each payment reached the bank once");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmission_in_flight_is_answered_once_with_the_same_answer() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        bank_latency: Duration::from_millis(300),
        ..TestbedOptions::default()
    })
    .await;
    bed.banks[0].stats.log.enable(1000);
    let mut c = client(&bed, "100001").await;
    let request = payment_fields(b"000077", b"100001", b"4111111111111111", b"000000001000");
    c.send(Mti::FINANCIAL, &request).await;
    c.send(Mti::FINANCIAL, &request).await;
    let a = c.recv().await.unwrap();
    let b = c.recv().await.unwrap();
    assert_eq!(code(&a), b"00");
    assert_eq!((a.field(38), a.field(11)), (b.field(38), b.field(11)));
    assert_eq!(bank_saw(&bed, 0, b"0200").len(), 1);
    bed.stop().await;
}

/// An 0400 reversing `stan` sent at `de7` by acquirer 100001.
fn reversal<'a>(stan: &'a [u8], de90: &'a [u8], pan: &'a [u8]) -> Vec<(u8, &'a [u8])> {
    vec![
        (2, pan),
        (3, b"000000"),
        (4, b"000000001000"),
        (7, b"1125120100"),
        (11, stan),
        (32, b"100001"),
        (37, b"532912000001"),
        (49, b"978"),
        (90, de90),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquirer_reversal_reaches_the_bank_under_the_stan_it_saw() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        links: 1,
        first_stan: 500,
        ..TestbedOptions::default()
    })
    .await;
    bed.banks[0].stats.log.enable(1000);
    let mut c = client(&bed, "100001").await;
    let pan = b"4111111111111111";
    assert_eq!(
        code(&c.pay(b"000042", b"100001", pan, b"000000001000").await),
        b"00"
    );
    let forwarded = bank_saw(&bed, 0, b"0200");
    let link_stan = forwarded[0].field(11).unwrap().to_vec();
    assert_ne!(link_stan, b"000042", "the bank saw the switch's STAN");
    // DE90: original MTI, the acquirer's STAN, DE7, acquirer id, forwarding id.
    let de90 = b"020000004211251200000000010000100000000000";
    c.send(Mti::REVERSAL, &reversal(b"000050", de90, pan)).await;
    let answer = c.recv().await.unwrap();
    assert_eq!(answer.mti(), Mti::REVERSAL_RESPONSE);
    assert_eq!(
        (code(&answer), answer.field(11)),
        (&b"00"[..], Some(&b"000050"[..]))
    );
    let reversals = bank_saw(&bed, 0, b"0400");
    assert_eq!(reversals.len(), 1);
    let seen = reversals[0].field(90).unwrap();
    assert_eq!(&seen[4..10], &link_stan[..], "DE90 names the link STAN");
    assert_eq!(&seen[..4], b"0200");
    assert_eq!(
        &seen[10..],
        &de90[10..],
        "the rest of DE90 is the acquirer's"
    );

    // A reversal of a payment the switch never saw: 25, nothing sent to the bank.
    let unknown = b"020000009911251200000000010000100000000000";
    c.send(Mti::REVERSAL, &reversal(b"000051", unknown, pan))
        .await;
    assert_eq!(code(&c.recv().await.unwrap()), b"25");
    assert_eq!(bank_saw(&bed, 0, b"0400").len(), 1);
    bed.stop().await;
}

/// Sends a reversal (DE11 `stan`, DE90 `de90`) and checks that it is approved and
/// that bank 0 saw one 0400, naming `link_stan`: the STAN it saw the original under.
async fn reversed_at_the_bank(
    bed: &Testbed,
    c: &mut Client,
    stan: &[u8],
    de90: &[u8],
    pan: &[u8],
    link_stan: &[u8],
) {
    c.send(Mti::REVERSAL, &reversal(stan, de90, pan)).await;
    assert_eq!(code(&c.recv().await.unwrap()), b"00");
    let reversals = bank_saw(bed, 0, b"0400");
    assert_eq!(reversals.len(), 1);
    assert_eq!(&reversals[0].field(90).unwrap()[4..10], link_stan);
}

/// With a journal the duplicates table keeps no bank answer: a retransmission is
/// answered from the outcome record read back from the journal, and a reversal is
/// routed by what the table keeps, before and after a restart on the same journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_journal_retransmissions_and_reversals_match_across_a_restart() {
    use switchyard::journal::Fsync;
    let dir = std::env::temp_dir().join(format!("switchyard-readback-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = || TestbedOptions {
        banks: 1,
        links: 1,
        journal: Some(Fsync::Batch),
        journal_at: Some(dir.clone()),
        // The test bed's 2 s window would let a slow machine forget the
        // originals before their retransmissions come.
        duplicate_window_s: 300,
        ..TestbedOptions::default()
    };
    let pan = b"4111111111111111";
    let pay = |stan| payment_fields(stan, b"100001", pan, b"000000001000");
    // DE90 of the payment with DE11 `stan` (DE7 and acquirer as `payment_fields`).
    let de90 = |stan: &[u8]| {
        let mut d = *b"020000000011251200000000010000100000000000";
        d[4..10].copy_from_slice(stan);
        d
    };

    let bed = testbed(opts()).await;
    bed.banks[0].stats.log.enable(1000);
    let mut c = client(&bed, "100001").await;
    let mut approvals = Vec::new();
    for stan in [b"000042", b"000043", b"000044"] {
        let answer = c.pay(stan, b"100001", pan, b"000000001000").await;
        assert_eq!(code(&answer), b"00");
        approvals.push(answer.field(38).expect("DE38").to_vec());
    }
    let link_stans: Vec<Vec<u8>> = bank_saw(&bed, 0, b"0200")
        .iter()
        .map(|m| m.field(11).unwrap().to_vec())
        .collect();
    c.send(Mti::FINANCIAL, &pay(b"000042")).await;
    let again = c.recv().await.unwrap();
    assert_eq!(
        (code(&again), again.field(38), again.field(11)),
        (&b"00"[..], Some(&approvals[0][..]), Some(&b"000042"[..])),
        "read back from the journal"
    );
    let d90 = de90(b"000043");
    reversed_at_the_bank(&bed, &mut c, b"000050", &d90, pan, &link_stans[1]).await;
    assert_eq!(
        bank_saw(&bed, 0, b"0200").len(),
        3,
        "the repeat was not forwarded"
    );
    drop(c);
    bed.stop().await;

    // Restarted on the same journal, with a fresh bank: nothing more forwarded
    // for the repeat; the reversal reaches the bank under the STAN it saw before.
    let bed = testbed(opts()).await;
    bed.banks[0].stats.log.enable(1000);
    let mut c = client(&bed, "100001").await;
    for (i, stan) in [b"000042", b"000044"].into_iter().enumerate() {
        c.send(Mti::FINANCIAL, &pay(stan)).await;
        let again = c.recv().await.unwrap();
        assert_eq!(
            (code(&again), again.field(38)),
            (&b"00"[..], Some(&approvals[i * 2][..])),
            "DE11 {stan:?} after the restart"
        );
    }
    let d90 = de90(b"000044");
    reversed_at_the_bank(&bed, &mut c, b"000051", &d90, pan, &link_stans[2]).await;
    assert!(bank_saw(&bed, 0, b"0200").is_empty());
    drop(c);
    bed.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stans_are_unique_per_bank_across_its_links() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        links: 4,
        ..TestbedOptions::default()
    })
    .await;
    bed.banks[0].stats.log.enable(1000);
    let mut c = client(&bed, "100001").await;
    let stans: Vec<[u8; 6]> = (0..200u32)
        .map(|i| {
            let mut s = [b'0'; 6];
            s.copy_from_slice(format!("{:06}", i + 1).as_bytes());
            s
        })
        .collect();
    for stan in &stans {
        c.send(
            Mti::FINANCIAL,
            &payment_fields(stan, b"100001", b"4111111111111111", b"000000001000"),
        )
        .await;
    }
    for _ in &stans {
        assert_eq!(code(&c.recv().await.unwrap()), b"00");
    }
    let seen: std::collections::HashSet<Vec<u8>> = bank_saw(&bed, 0, b"0200")
        .iter()
        .map(|m| m.field(11).unwrap().to_vec())
        .collect();
    assert_eq!(
        seen.len(),
        stans.len(),
        "one STAN per request, whatever the link"
    );
    bed.stop().await;
}

/// Reads until the switch closes the connection; false if it stays open for [`WAIT`].
async fn closed_by_switch(c: &mut Client) -> bool {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match c.stream().read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_are_cut_off_and_others_keep_working() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        limits: vec![
            "idle_timeout_ms = 300".to_owned(),
            "frame_read_timeout_ms = 300".to_owned(),
        ],
        ..TestbedOptions::default()
    })
    .await;
    let mut idle = client(&bed, "100001").await;
    let mut trickle = client(&bed, "100001").await;
    let mut good = client(&bed, "100001").await;
    // Two bytes of a frame header and one of the message, then nothing.
    trickle.stream().write_all(&[0, 120, b'0']).await.unwrap();
    trickle.stream().flush().await.unwrap();
    let cut_off = tokio::spawn(async move {
        let trickle_cut = closed_by_switch(&mut trickle).await;
        let idle_cut = closed_by_switch(&mut idle).await;
        (trickle_cut, idle_cut)
    });
    // The good client keeps paying (so it is never idle) until both are cut off.
    let mut answers = 0u32;
    while !cut_off.is_finished() && answers < 100_000 {
        let stan = format!("{:06}", answers % 999_999 + 1);
        let a = good
            .pay(
                stan.as_bytes(),
                b"100001",
                b"4111111111111111",
                b"000000001000",
            )
            .await;
        assert_eq!(code(&a), b"00", "the good client is served throughout");
        answers += 1;
    }
    assert_eq!(
        cut_off.await.unwrap(),
        (true, true),
        "trickling and idle peers cut off"
    );
    assert!(answers > 0);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_institution_limit_are_refused() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        limits: vec!["connections_per_institution_max = 2".to_owned()],
        ..TestbedOptions::default()
    })
    .await;
    let mut a = client(&bed, "100001").await;
    let mut b = client(&bed, "100001").await;
    // Both counted once each has been served.
    for c in [&mut a, &mut b] {
        assert_eq!(
            code(
                &c.pay(b"000001", b"100001", b"4111111111111111", b"000000001000")
                    .await
            ),
            b"00"
        );
    }
    let mut third = client(&bed, "100001").await;
    assert!(
        closed_by_switch(&mut third).await,
        "third connection refused"
    );
    // Another institution is not affected.
    let mut other = client(&bed, "100002").await;
    assert_eq!(
        code(
            &other
                .pay(b"000001", b"100002", b"4111111111111111", b"000000001000")
                .await
        ),
        b"00"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_institution_rate_get_65_at_once() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        rate_per_s: 1,
        rate_burst: 3,
        ..TestbedOptions::default()
    })
    .await;
    let mut c = client(&bed, "100001").await;
    let mut codes = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..10u32 {
        let stan = format!("{:06}", i + 1);
        let a = c
            .pay(
                stan.as_bytes(),
                b"100001",
                b"4111111111111111",
                b"000000001000",
            )
            .await;
        codes.push(code(&a).to_vec());
    }
    let approved = codes.iter().filter(|c| c.as_slice() == b"00").count();
    let limited = codes.iter().filter(|c| c.as_slice() == b"65").count();
    // The burst passes, then one more per second the test took.
    let most = 3 + started.elapsed().as_secs() as usize + 1;
    assert!((3..=most).contains(&approved), "{codes:?}");
    assert_eq!(approved + limited, 10, "{codes:?}");
    // Echoes are not limited.
    c.send(
        Mti::NETWORK,
        &[(7, b"1125120000"), (11, b"000099"), (70, b"301")],
    )
    .await;
    assert_eq!(code(&c.recv().await.unwrap()), b"00");
    // Another institution has its own allowance.
    let mut other = client(&bed, "100002").await;
    assert_eq!(
        code(
            &other
                .pay(b"000001", b"100002", b"4111111111111111", b"000000001000")
                .await
        ),
        b"00"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_institution_inflight_limit_get_91_at_once() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        limits: vec!["inflight_per_institution_max = 2".to_owned()],
        ..TestbedOptions::default()
    })
    .await;
    // The bank holds its answers until the third request has been refused.
    bed.banks[0].behavior.stall_for(WAIT);
    let mut a = client(&bed, "100001").await;
    let mut b = client(&bed, "100001").await;
    let pan = b"4111111111111111";
    a.send(
        Mti::FINANCIAL,
        &payment_fields(b"000001", b"100001", pan, b"000000001000"),
    )
    .await;
    a.send(
        Mti::FINANCIAL,
        &payment_fields(b"000002", b"100001", pan, b"000000001000"),
    )
    .await;
    // Two in flight on the other connection: the third is refused at once.
    let stats = bed.banks[0].stats.clone();
    eventually("two requests at the bank", || {
        stats.requests.load(Ordering::Relaxed) == 2
    })
    .await;
    let third = b.pay(b"000003", b"100001", pan, b"000000001000").await;
    assert_eq!(code(&third), b"91");
    bed.banks[0].behavior.stall_for(Duration::ZERO);
    for _ in 0..2 {
        assert_eq!(code(&a.recv().await.unwrap()), b"00");
    }
    // Answered: the slots are free again.
    assert_eq!(
        code(&b.pay(b"000004", b"100001", pan, b"000000001000").await),
        b"00"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_sign_on_before_use_and_sign_off_at_shutdown() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        links: 2,
        ..TestbedOptions::default()
    })
    .await;
    let stats = bed.banks[0].stats.clone();
    // Each link counts as up once signed on (the test bed waits for one per bank).
    let connector = bed.switch.connectors()[0].clone();
    eventually("both links up", || connector.links_up() == 2).await;
    assert_eq!(stats.sign_ons.load(Ordering::Relaxed), 2);
    let mut c = client(&bed, "100001").await;
    assert_eq!(
        code(
            &c.pay(b"000001", b"100001", b"4111111111111111", b"000000001000")
                .await
        ),
        b"00"
    );
    // Shutdown waits for the bank's answers to the sign-offs.
    bed.switch.shutdown().await;
    assert_eq!(
        stats.sign_offs.load(Ordering::Relaxed),
        2,
        "both links signed off"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_without_links_fails_over_to_its_alternate() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        banks_down: 1,
        failover: vec![("200002".into(), "200001".into())],
        ..TestbedOptions::default()
    })
    .await;
    let mut c = client(&bed, "100001").await;
    // PAN prefix 5 routes to 200002, which has no host running: 200001 takes it.
    let a = c
        .pay(b"000001", b"100001", b"5500000000000004", b"000000001000")
        .await;
    assert_eq!(code(&a), b"00");
    assert_eq!(bed.banks[0].stats.requests.load(Ordering::Relaxed), 1);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_fails_over_by_its_own_list() {
    let bed = testbed(TestbedOptions {
        banks: 1,
        banks_down: 1,
        routes: vec!["pan_prefix = \"55\"\nbank = \"200002\"\nfailover = [\"200001\"]".into()],
        ..TestbedOptions::default()
    })
    .await;
    let mut c = client(&bed, "100001").await;
    // 200002 has no host running. PAN prefix 55 routes there with a failover
    // list: 200001 takes it. Prefix 5 routes there without one: 91 at once.
    let a = c
        .pay(b"000001", b"100001", b"5500000000000004", b"000000001000")
        .await;
    assert_eq!(code(&a), b"00");
    let a = c
        .pay(b"000002", b"100001", b"5100000000000004", b"000000001000")
        .await;
    assert_eq!(code(&a), b"91");
    assert_eq!(bed.banks[0].stats.requests.load(Ordering::Relaxed), 1);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_every_bank_not_marked_optional() {
    let down = |optional: bool| TestbedOptions {
        banks: 1,
        banks_down: 1,
        optional: if optional {
            vec!["200002".into()]
        } else {
            vec![]
        },
        ..TestbedOptions::default()
    };
    let bed = testbed(down(false)).await;
    let (ready, why) = bed.switch.readiness();
    assert!(!ready && why == "no link up to bank 200002", "{why}");
    bed.stop().await;
    let bed = testbed(down(true)).await;
    assert_eq!(bed.switch.readiness(), (true, "ready".to_owned()));
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ascii_acquirer_pays_a_bcd_bank_and_an_ebcdic_bank() {
    // The BCD bank behind a BCD length and a TPDU, the EBCDIC bank behind an
    // inclusive length and a 6-byte header: the simulated banks strip them and
    // send them back on their answers, which the switch strips in turn.
    let bed = testbed(TestbedOptions {
        banks: 2,
        links: 1,
        first_stan: 700,
        bank_speaks: vec![
            Speaks {
                dialect: "iso87-binary".into(),
                framing: Framing::Bcd2,
                header: MessageHeader::Tpdu,
            },
            Speaks {
                dialect: "iso87-ebcdic".into(),
                framing: Framing::U16beInclusive,
                header: MessageHeader::Fixed(6),
            },
        ],
        ..TestbedOptions::default()
    })
    .await;
    for bank in &bed.banks {
        bank.stats.log.enable(1000);
    }
    let mut c = client(&bed, "100001").await;
    // PAN prefix 4: the BCD bank. An odd-length PAN, padded on the wire.
    let pan = b"4111111111111111113";
    let a = c.pay(b"000042", b"100001", pan, b"000000001000").await;
    assert_eq!((a.mti(), code(&a)), (Mti::FINANCIAL_RESPONSE, &b"00"[..]));
    assert_eq!(
        a.field(11),
        Some(&b"000042"[..]),
        "acquirer's STAN restored"
    );
    assert_eq!(a.field(2), Some(&pan[..]));
    assert_eq!(a.field(38).map(|v| v.len()), Some(6), "approval code");
    let raw = bed.banks[0].stats.log.messages();
    assert_eq!(
        &raw[raw.len() - 1][..2],
        &[0x02, 0x00],
        "BCD MTI on the wire"
    );
    let binary = Dialect::builtin("iso87-binary").unwrap();
    let seen = bank_saw_in(&bed, 0, b"0200", &binary);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].field(2), Some(&pan[..]));
    assert_eq!(seen[0].field(4), Some(&b"000000001000"[..]));
    let link_stan = seen[0].field(11).unwrap().to_vec();

    // The reversal reaches the BCD bank with DE90 naming the link STAN.
    let de90 = b"020000004211251200000000010000100000000000";
    c.send(Mti::REVERSAL, &reversal(b"000050", de90, pan)).await;
    let r = c.recv().await.unwrap();
    assert_eq!(
        (r.mti(), code(&r), r.field(11)),
        (Mti::REVERSAL_RESPONSE, &b"00"[..], Some(&b"000050"[..]))
    );
    let reversals = bank_saw_in(&bed, 0, b"0400", &binary);
    assert_eq!(reversals.len(), 1);
    assert_eq!(&reversals[0].field(90).unwrap()[4..10], &link_stan[..]);

    // Track 2 with sentinels is valid ASCII (z) but BCD cannot carry ';' or
    // '?': answered 30, and the bank sees nothing.
    let mut f = payment_fields(b"000046", b"100001", pan, b"000000001000");
    f.push((35, b";4111111111111111113=2512101?"));
    f.sort_by_key(|(n, _)| *n);
    c.send(Mti::FINANCIAL, &f).await;
    let r = c.recv().await.unwrap();
    assert_eq!((code(&r), r.field(11)), (&b"30"[..], Some(&b"000046"[..])));
    assert_eq!(bank_saw_in(&bed, 0, b"0200", &binary).len(), 1);

    // PAN prefix 5: the EBCDIC bank declines (amount ending 51).
    let d = c
        .pay(b"000043", b"100001", b"5500000000000004", b"000000001051")
        .await;
    assert_eq!((code(&d), d.field(11)), (&b"51"[..], Some(&b"000043"[..])));
    let raw = bed.banks[1].stats.log.messages();
    let last = &raw[raw.len() - 1];
    assert_eq!(
        &last[..4],
        &[0xf0, 0xf2, 0xf0, 0xf0],
        "EBCDIC MTI on the wire"
    );
    let ebcdic = Dialect::builtin("iso87-ebcdic").unwrap();
    assert_eq!(bank_saw_in(&bed, 1, b"0200", &ebcdic).len(), 1);
    bed.stop().await;
}

/// Sends a message of `fields` (in the 1987 form) encoded under `d` and decodes
/// the answer under `d`.
async fn exchange_in(d: &Dialect, c: &mut Client, mti: Mti, fields: Vec<(u8, &[u8])>) -> Message {
    let mut out = BytesMut::new();
    let mut enc = Encoder::new(d, &mut out, mti);
    for (n, v) in &fields {
        enc.field(*n, v).unwrap();
    }
    assert!(enc.finish() > 0);
    c.send_raw(&out).await;
    Message::decode(d, c.recv_any().await.expect("an answer")).expect("answer decodes")
}

/// An ISO 8583:1993 acquirer's requests are keyed on their local date and time
/// (its reversals' DE56 names the original by it, not by DE7): a retransmission
/// and a reversal match, before and after a restart on the same journal (the key
/// rule is journaled with each accepted request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1993_acquirers_retransmissions_and_reversals_match_across_a_restart() {
    use switchyard::journal::Fsync;
    let dir = std::env::temp_dir().join(format!("switchyard-iso93-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = || TestbedOptions {
        banks: 1,
        links: 1,
        journal: Some(Fsync::Batch),
        journal_at: Some(dir.clone()),
        // The test bed's 2 s window would let a slow machine forget the
        // originals before their retransmissions come.
        duplicate_window_s: 300,
        acquirers: Speaks {
            dialect: "iso93-ascii".to_owned(),
            framing: Framing::U16be,
            header: MessageHeader::None,
        },
        ..TestbedOptions::default()
    };
    // Fields in the 1987 form; our encoder writes them as 1993 (1200, DE12 n12…).
    let d93 = Dialect::builtin("iso93-ascii").unwrap();
    let pan = b"4111111111111111";
    let pay = |stan: &'static [u8]| -> Vec<(u8, &'static [u8])> {
        vec![
            (2, pan),
            (3, b"000000"),
            (4, b"000000001000"),
            (7, b"1125110000"), // transmission: an hour before the local time
            (11, stan),
            (12, b"120000"),
            (13, b"1125"),
            (32, b"100001"),
            (37, b"532912000001"),
            (41, b"TERM0001"),
            (42, b"MERCHANT0000001"),
            (49, b"978"),
        ]
    };
    // A reversal of DE11 `stan`: DE90 names it by its local date and time, which
    // our encoder writes into DE56.
    let reversal = |stan: &'static [u8], original: &'static [u8]| {
        let mut f = pay(stan);
        let mut de90 = *b"020000000011251200000000010000100000000000";
        de90[4..10].copy_from_slice(original);
        f.push((90, Box::leak(Box::new(de90))));
        f
    };

    let bed = testbed(opts()).await;
    bed.banks[0].stats.log.enable(1000);
    let mut c = client(&bed, "100001").await;
    let mut approvals = Vec::new();
    for stan in [b"000042", b"000043"] {
        let a = exchange_in(&d93, &mut c, Mti::FINANCIAL, pay(stan)).await;
        assert_eq!((a.mti(), code(&a)), (Mti::FINANCIAL_RESPONSE, &b"00"[..]));
        approvals.push(a.field(38).expect("DE38").to_vec());
    }
    let again = exchange_in(&d93, &mut c, Mti::FINANCIAL, pay(b"000042")).await;
    assert_eq!(
        again.field(38),
        Some(&approvals[0][..]),
        "the original answer"
    );
    assert_eq!(
        bank_saw(&bed, 0, b"0200").len(),
        2,
        "the repeat not forwarded"
    );
    drop(c);
    bed.stop().await;

    let bed = testbed(opts()).await;
    bed.banks[0].stats.log.enable(1000);
    let mut c = client(&bed, "100001").await;
    let again = exchange_in(&d93, &mut c, Mti::FINANCIAL, pay(b"000043")).await;
    assert_eq!(
        (code(&again), again.field(38)),
        (&b"00"[..], Some(&approvals[1][..])),
        "after the restart: the original answer, read back"
    );
    let r = exchange_in(&d93, &mut c, Mti::REVERSAL, reversal(b"000050", b"000042")).await;
    assert_eq!((r.mti(), code(&r)), (Mti::REVERSAL_RESPONSE, &b"00"[..]));
    assert!(
        bank_saw(&bed, 0, b"0200").is_empty(),
        "nothing forwarded twice"
    );
    assert_eq!(
        bank_saw(&bed, 0, b"0400").len(),
        1,
        "the reversal found its original"
    );
    drop(c);
    bed.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
