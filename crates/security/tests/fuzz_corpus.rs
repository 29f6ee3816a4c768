//! Runs every file of the security fuzz corpora (`fuzz/corpus/keystore_parse/`,
//! `fuzz/corpus/tr31_unwrap/`) through the same checks as the fuzz targets of
//! those names (`fuzz/security/`), so `cargo test` covers the committed seeds and
//! anything a fuzzing run added.
//!
//! The seeds are written by `write_seed_corpus` (ignored; run it after a change
//! to the seeds): `cargo test -p switchyard-security --test fuzz_corpus --
//! --ignored write_seed_corpus`.

#[path = "../../../fuzz/security/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};
use switchyard_security::store::{KeyStore, KeyType, STORE_HEADER};
use switchyard_security::tr31::{
    self, Exportability, Header, KeyUsage, ModeOfUse, OptionalBlock, Version,
};
use switchyard_security::{Algorithm, Key};

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 2] = [
    ("keystore_parse", checks::keystore_parse),
    ("tr31_unwrap", checks::tr31_unwrap),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn run_target(target: &str) {
    let check = TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .map(|(_, c)| *c)
        .expect("a target");
    let mut files = 0;
    for entry in std::fs::read_dir(corpus_dir(target)).expect("the corpus directory") {
        let path = entry.expect("a corpus entry").path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if !path.is_file() || name.is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        let data = std::fs::read(&path).expect("a corpus file");
        let ok = std::panic::catch_unwind(|| check(&data));
        assert!(ok.is_ok(), "{target}: {} fails its check", path.display());
        files += 1;
    }
    assert!(files > 0, "{target}: an empty corpus");
}

#[test]
fn keystore_parse_corpus() {
    run_target("keystore_parse");
}

#[test]
fn tr31_unwrap_corpus() {
    run_target("tr31_unwrap");
}

// === Seeds ===

fn store_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let dir = std::env::temp_dir().join(format!("switchyard-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (store, master) = (dir.join("keys.txt"), dir.join("master.key"));
    let mut ks = KeyStore::init(&store, &master).unwrap();
    let tdes = Key::new(Algorithm::Tdes, &checks::FUZZ_KBPK_TDES).unwrap();
    let aes = Key::new(Algorithm::Aes, &checks::FUZZ_KBPK_AES).unwrap();
    ks.insert("zpk-1", KeyType::Zpk, &tdes).unwrap();
    ks.insert("kbpk.bank_2", KeyType::Kbpk, &aes).unwrap();
    ks.insert(
        "zak-9",
        KeyType::Zak,
        &Key::random(Algorithm::Aes, 16).unwrap(),
    )
    .unwrap();
    ks.save().unwrap();
    let valid = std::fs::read_to_string(&store).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let line = valid.lines().nth(1).unwrap().to_owned();
    let with = |extra: &str| format!("{valid}{extra}\n").into_bytes();
    vec![
        ("valid", valid.clone().into_bytes()),
        ("empty", Vec::new()),
        ("header-only", format!("{STORE_HEADER}\n").into_bytes()),
        ("comments-and-blank-lines", with("\n# a comment\n\n")),
        ("duplicate-id", with(&line)),
        ("six-fields", with(&format!("{line} extra"))),
        (
            "lowercase-kcv",
            valid.replace(" 08D7B4 ", " 08d7b4 ").into_bytes(),
        ),
        ("unknown-type", valid.replace(" zpk ", " pvk ").into_bytes()),
        ("long-id", with(&line.replacen("zpk-1", &"a".repeat(65), 1))),
        ("short-wrapped", with("k zpk tdes 08D7B4 0011223344556677")),
        ("crlf", valid.replace('\n', "\r\n").into_bytes()),
        (
            "wrong-header",
            valid.replacen("keystore 1", "keystore 2", 1).into_bytes(),
        ),
    ]
}

fn tr31_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = vec![
        (
            "published-b-a722".to_owned(),
            "B0080P0TE00E000094B420079CC80BA3461F86FE26EFC4A3B8E4FA4C5F5341176EED7B727B8A248E"
                .to_owned(),
        ),
        (
            "published-b-a732-ks-block".to_owned(),
            "B0104B0TX12S0100KS1800604B120F9292800000BB68BE8680A400D9191AD4ECE45B6E6C0D21C4738A52190E248719E24B433627"
                .to_owned(),
        ),
        (
            "published-d-a74".to_owned(),
            "D0112P0AE00E0000B82679114F470F540165EDFBF7E250FCEA43F810D215F8D207E2E417C07156A27E8E31DA05F7425509593D03A457DC34"
                .to_owned(),
        ),
        ("empty".to_owned(), String::new()),
        ("header-only".to_owned(), "B0016P0TE00E0000".to_owned()),
    ];
    let kbpks = [
        Key::new(Algorithm::Tdes, &checks::FUZZ_KBPK_TDES).unwrap(),
        Key::new(Algorithm::Aes, &checks::FUZZ_KBPK_AES).unwrap(),
    ];
    for kbpk in &kbpks {
        let version = Version::for_kbpk(kbpk.algorithm());
        let v = if version == Version::B { "b" } else { "d" };
        for (alg, len) in [(Algorithm::Tdes, 16), (Algorithm::Aes, 32)] {
            let key = Key::random(alg, len).unwrap();
            let a = if alg == Algorithm::Tdes {
                "tdes"
            } else {
                "aes"
            };
            let mut header = Header::new(
                version,
                KeyUsage::PIN_ENCRYPTION,
                alg,
                ModeOfUse::EncryptDecrypt,
                Exportability::Trusted,
            );
            seeds.push((
                format!("fuzz-kbpk-{v}-{a}"),
                tr31::wrap(kbpk, &header, &key).unwrap(),
            ));
            header.key_version = *b"c1";
            header.optional_blocks = vec![
                OptionalBlock {
                    id: *b"KS",
                    data: "00604B120F9292800000".to_owned(),
                },
                OptionalBlock {
                    id: *b"TS",
                    data: "2026-11-30T12:00:00Z".repeat(14),
                },
            ];
            seeds.push((
                format!("fuzz-kbpk-{v}-{a}-optional-blocks"),
                tr31::wrap(kbpk, &header, &key).unwrap(),
            ));
        }
    }
    seeds
        .into_iter()
        .map(|(name, text)| (name, text.into_bytes()))
        .collect()
}

#[test]
#[ignore = "writes the seed corpus into fuzz/corpus/"]
fn write_seed_corpus() {
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    for (name, data) in store_seeds() {
        write("keystore_parse", name, &data);
    }
    for (name, data) in tr31_seeds() {
        write("tr31_unwrap", &name, &data);
    }
}

#[test]
fn seeds_pass_their_checks_and_the_fuzz_kbpk_seeds_unwrap() {
    for (_, data) in store_seeds() {
        checks::keystore_parse(&data);
    }
    let tdes = Key::new(Algorithm::Tdes, &checks::FUZZ_KBPK_TDES).unwrap();
    let aes = Key::new(Algorithm::Aes, &checks::FUZZ_KBPK_AES).unwrap();
    for (name, data) in tr31_seeds() {
        checks::tr31_unwrap(&data);
        if name.starts_with("fuzz-kbpk-b") {
            tr31::unwrap(&tdes, std::str::from_utf8(&data).unwrap()).unwrap();
        }
        if name.starts_with("fuzz-kbpk-d") {
            tr31::unwrap(&aes, std::str::from_utf8(&data).unwrap()).unwrap();
        }
    }
}
