//! Hot reload of a real `switchyard run`: a route changed in the config file and
//! SIGHUP; new requests take the new route while an existing connection stays
//! open and a request in flight completes; an invalid edit is rejected whole and
//! the routes in force stay.

mod daemon;

use bytes::BytesMut;
use daemon::{connect, Bank, Daemon, Pki, TempDir, WAIT};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use switchyard::wire::{Dialect, FrameDecoder, Framing, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The config file with the route for PAN prefix 4 going to bank `route_to`.
fn config(dir: &Path, a: SocketAddr, b: SocketAddr, route_to: &str) -> PathBuf {
    let rest = format!(
        r#"[[institution]]
id = "100001"

[[bank]]
id = "200001"
address = "{a}"
server_name = "bank"
links = 1

[[bank]]
id = "200002"
address = "{b}"
server_name = "bank"
links = 1

[[route]]
pan_prefix = "4"
bank = "{route_to}"
"#
    );
    daemon::write_config(dir, "", "", &rest)
}

/// Payment `n`, framed.
fn payment(n: usize) -> Vec<u8> {
    daemon::framed(&daemon::payment(n, "100001", "000000001000"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_a_route_without_dropping_anything() {
    let dir = TempDir::new("reload");
    let pki = Pki::write(&dir.0);
    let a = Bank::start(&pki, Duration::ZERO).await;
    let b = Bank::start(&pki, Duration::ZERO).await;
    let path = config(&dir.0, a.addr, b.addr, "200001");
    let mut daemon = Daemon::start(&path);
    daemon.wait_line("bank link up"); // the second bank's link
    let mut s = connect(daemon.addr, &pki.client("100001")).await.unwrap();
    let d = Dialect::iso87_ascii();
    let mut buf = BytesMut::new();
    let decoder = FrameDecoder::new(Framing::U16be, 8192);
    let mut next = async |s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>| loop {
        if let Some(f) = decoder.decode(&mut buf).unwrap() {
            return Message::decode(&d, f).unwrap();
        }
        let n = tokio::time::timeout(WAIT, s.read_buf(&mut buf))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "connection closed");
    };

    s.write_all(&payment(1)).await.unwrap();
    assert_eq!(next(&mut s).await.field(39), Some(&b"00"[..]));
    assert_eq!(
        a.stats.requests.load(Ordering::Relaxed),
        1,
        "routed to 200001"
    );

    // A request held in flight at bank A across the reload.
    a.behavior.stall_for(WAIT);
    s.write_all(&payment(2)).await.unwrap();
    let held = async {
        while a.stats.requests.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(WAIT, held).await.unwrap();

    config(&dir.0, a.addr, b.addr, "200002");
    daemon.reload();
    daemon.wait_line("routes reloaded");
    s.write_all(&payment(3)).await.unwrap();
    let answer = next(&mut s).await;
    assert_eq!(
        (answer.field(11), answer.field(39)),
        (Some(&b"000003"[..]), Some(&b"00"[..]))
    );
    assert_eq!(
        b.stats.requests.load(Ordering::Relaxed),
        1,
        "new route: 200002"
    );
    a.behavior.stall_for(Duration::ZERO);
    let answer = next(&mut s).await;
    assert_eq!(
        (answer.field(11), answer.field(39)),
        (Some(&b"000002"[..]), Some(&b"00"[..])),
        "the request in flight completed"
    );

    // An invalid edit: rejected whole, the routes in force stay.
    config(&dir.0, a.addr, b.addr, "777");
    daemon.reload();
    let line = daemon.wait_line("reload rejected");
    assert!(line.contains("route[0].bank"), "{line}");
    s.write_all(&payment(4)).await.unwrap();
    assert_eq!(next(&mut s).await.field(39), Some(&b"00"[..]));
    assert_eq!(b.stats.requests.load(Ordering::Relaxed), 2, "still 200002");
    assert_eq!(a.stats.requests.load(Ordering::Relaxed), 2);
    // A rate limit lowered by a reload: over it, 65 at once.
    config(&dir.0, a.addr, b.addr, "200002");
    let slow = std::fs::read_to_string(&path).unwrap().replace(
        "id = \"100001\"\n",
        "id = \"100001\"\nrate_per_s = 1\nrate_burst = 1\n",
    );
    std::fs::write(&path, slow).unwrap();
    daemon.reload();
    daemon.wait_line("request deadlines applied");
    let mut codes = Vec::new();
    for n in 5..8 {
        s.write_all(&payment(n)).await.unwrap();
        codes.push(next(&mut s).await.field(39).unwrap().to_vec());
    }
    assert!(codes.contains(&b"65".to_vec()), "{codes:?}");
    daemon.kill();
    a.stop().await;
    b.stop().await;
}
