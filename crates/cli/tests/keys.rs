//! `switchyard keys` as an operator runs it: init, import by components (KCV
//! checked), generate, list, TR-31 export from one store and import into another.
//! No output and no store file may hold a clear key.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// 0123456789ABCDEFFEDCBA9876543210 (KCV 08D7B4) as two components.
const COMPONENT_1: &str = "1111111111111111EEEEEEEEEEEEEEEE";
const COMPONENT_2: &str = "1032547698BADCFE1032547698BADCFE";
const CLEAR_KEY: &str = "0123456789ABCDEFFEDCBA9876543210";

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("switchyard-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn store(&self) -> PathBuf {
        self.0.join("keys.txt")
    }

    fn master(&self) -> PathBuf {
        self.0.join("master.key")
    }

    /// `switchyard keys <sub> --store .. --master-key-file .. <args>`.
    fn keys(&self, sub: &str, args: &[&str]) -> Output {
        let out = Command::new(BIN)
            .args(["keys", sub, "--store"])
            .arg(self.store())
            .arg("--master-key-file")
            .arg(self.master())
            .args(args)
            .output()
            .expect("run switchyard keys");
        no_clear_key(&out);
        out
    }

    fn ok(&self, sub: &str, args: &[&str]) -> String {
        let out = self.keys(sub, args);
        assert!(
            out.status.success(),
            "keys {sub} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn no_clear_key(out: &Output) {
    for text in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(text).to_uppercase();
        for secret in [CLEAR_KEY, COMPONENT_1, COMPONENT_2] {
            assert!(
                !text.contains(secret),
                "clear key material in output: {text}"
            );
        }
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn import_components(d: &Dir, id: &str, kind: &str, kcv: &str) -> Output {
    d.keys(
        "import",
        &[
            "--id",
            id,
            "--type",
            kind,
            "--algorithm",
            "tdes",
            "--component",
            COMPONENT_1,
            "--component",
            COMPONENT_2,
            "--kcv",
            kcv,
        ],
    )
}

#[test]
fn init_makes_a_0600_master_key_and_an_empty_store() {
    let d = Dir::new("init");
    let out = d.ok("init", &[]);
    assert!(out.contains("0 keys"), "{out}");
    assert_eq!(mode(&d.master()), 0o600);
    assert_eq!(mode(&d.store()), 0o600);
    let master = std::fs::read_to_string(d.master()).unwrap();
    assert_eq!(master.trim_end().len(), 64, "64 hex digits");
    // A second init keeps the master key.
    d.ok("init", &[]);
    assert_eq!(std::fs::read_to_string(d.master()).unwrap(), master);
}

#[test]
fn a_master_key_file_others_can_read_is_refused() {
    let d = Dir::new("mode");
    d.ok("init", &[]);
    std::fs::set_permissions(d.master(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = d.keys("list", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0644") && err.contains("master.key"), "{err}");
}

#[test]
fn components_import_with_their_kcv_and_a_mismatch_writes_nothing() {
    let d = Dir::new("components");
    d.ok("init", &[]);
    let before = std::fs::read(d.store()).unwrap();
    let out = import_components(&d, "zpk-1", "zpk", "0BADBD");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0BADBD") && err.contains("08D7B4"), "{err}");
    assert_eq!(std::fs::read(d.store()).unwrap(), before, "nothing written");
    let out = import_components(&d, "zpk-1", "zpk", "08d7b4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.contains("zpk-1") && line.contains("zpk") && line.contains("tdes"));
    assert!(line.contains("08D7B4"), "{line}");
    // The same id again is refused.
    assert!(!import_components(&d, "zpk-1", "zpk", "08D7B4")
        .status
        .success());
    let text = std::fs::read_to_string(d.store()).unwrap().to_uppercase();
    for secret in [CLEAR_KEY, COMPONENT_1, COMPONENT_2] {
        assert!(
            !text.contains(secret),
            "clear key material in the store: {text}"
        );
    }
}

#[test]
fn list_shows_id_type_algorithm_and_kcv_only() {
    let d = Dir::new("list");
    d.ok("init", &[]);
    import_components(&d, "zmk-bank2", "zmk", "08D7B4");
    d.ok(
        "generate",
        &["--id", "dek-1", "--type", "dek", "--algorithm", "aes"],
    );
    let table = d.ok("list", &[]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows[1]
            .split_whitespace()
            .eq(["zmk-bank2", "zmk", "tdes", "08D7B4"]),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&d.ok("list", &["--json"])).unwrap();
    let keys = json.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    for k in keys {
        let mut fields: Vec<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["algorithm", "id", "kcv", "type"]);
    }
    assert_eq!(keys[1]["algorithm"], "aes");
}

#[test]
fn export_then_import_elsewhere_keeps_the_kcv() {
    // Our store and a peer's share a TDES ZMK (from the same components) and an
    // AES KBPK (generated here, carried to the peer under the ZMK).
    let ours = Dir::new("export-ours");
    let peer = Dir::new("export-peer");
    for d in [&ours, &peer] {
        d.ok("init", &[]);
        import_components(d, "zmk", "zmk", "08D7B4");
    }
    ours.ok(
        "generate",
        &[
            "--id",
            "kbpk",
            "--type",
            "kbpk",
            "--algorithm",
            "aes",
            "--length",
            "32",
        ],
    );
    let kbpk_block = ours.ok("export", &["--id", "kbpk", "--under", "zmk"]);
    let kbpk_block = kbpk_block.trim();
    assert!(
        kbpk_block.starts_with('B'),
        "version B under a TDES ZMK: {kbpk_block}"
    );
    let got = peer.ok(
        "import",
        &[
            "--id", "kbpk", "--type", "kbpk", "--tr31", kbpk_block, "--under", "zmk",
        ],
    );
    let kcv = |list: &str, id: &str| {
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(3))
            .map(str::to_owned)
    };
    assert_eq!(kcv(&got, "kbpk"), kcv(&ours.ok("list", &[]), "kbpk"));
    for (id, kind, alg) in [
        ("zpk-1", "zpk", "tdes"),
        ("zak-1", "zak", "aes"),
        ("dek-1", "dek", "aes"),
    ] {
        ours.ok(
            "generate",
            &["--id", id, "--type", kind, "--algorithm", alg],
        );
        let block = ours.ok("export", &["--id", id, "--under", "kbpk"]);
        let block = block.trim();
        assert!(
            block.starts_with('D'),
            "version D under an AES KBPK: {block}"
        );
        let usage = &block[5..7];
        let want = match kind {
            "zpk" => "P0",
            "zak" => "M6",
            _ => "D0",
        };
        assert_eq!(usage, want, "{block}");
        let got = peer.ok(
            "import",
            &[
                "--id", id, "--type", kind, "--tr31", block, "--under", "kbpk",
            ],
        );
        assert_eq!(kcv(&got, id), kcv(&ours.ok("list", &[]), id), "{id}");
        assert!(kcv(&got, id).is_some(), "{got}");
    }
    // A block of one usage is not imported as another type, and a tampered
    // block not at all.
    let block = ours.ok("export", &["--id", "zpk-1", "--under", "kbpk"]);
    let block = block.trim();
    let out = peer.keys(
        "import",
        &[
            "--id", "x", "--type", "zak", "--tr31", block, "--under", "kbpk",
        ],
    );
    assert!(!out.status.success());
    let mut tampered = block.to_owned();
    let last = if tampered.ends_with('0') { "1" } else { "0" };
    tampered.replace_range(tampered.len() - 1.., last);
    let out = peer.keys(
        "import",
        &[
            "--id", "x", "--type", "zpk", "--tr31", &tampered, "--under", "kbpk",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAC"));
}
