//! The security module's interface tests: one suite ([`suite`]) that every
//! backend must pass, run against the software module and against the payShield
//! client talking to the payShield test double (`responder`) on 127.0.0.1.
//!
//! The suite sees a backend only through `SecurityModule`; it knows the clear
//! keys (they are test keys) to make input PIN blocks and check what comes out,
//! and checks MACs against published known answers (ISO/IEC 9797-1 annex B.4,
//! RFC 4493), so a backend agreeing only with itself does not pass.

use switchyard_security::mac::{retail_mac, MacError};
use switchyard_security::module::{
    KeyHandle, MacAlgorithm, ModuleError, SecurityModule, SoftwareModule, Usage,
};
use switchyard_security::payshield::{PayShieldConfig, PayShieldKey, PayShieldModule};
use switchyard_security::pin::{self, Format, PinError};
use switchyard_security::responder::{Responder, ResponderConfig};
use switchyard_security::tr31;
use switchyard_security::{Algorithm, Key};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The test keys: id, usage, algorithm, clear value.
const KEYS: [(&str, Usage, Algorithm, &str); 8] = [
    (
        "zpk-a",
        Usage::Pin,
        Algorithm::Tdes,
        "0123456789ABCDEFFEDCBA9876543210",
    ),
    (
        "zpk-b",
        Usage::Pin,
        Algorithm::Tdes,
        "1111111111111111FEDCBA9876543210",
    ),
    (
        "zpk-3",
        Usage::Pin,
        Algorithm::Tdes,
        "111111111111111122222222222222223333333333333333",
    ),
    (
        "zpk-aes",
        Usage::Pin,
        Algorithm::Aes,
        "000102030405060708090A0B0C0D0E0F",
    ),
    (
        "zak",
        Usage::Mac,
        Algorithm::Tdes,
        "0123456789ABCDEFFEDCBA9876543210",
    ),
    (
        "zak-aes",
        Usage::Mac,
        Algorithm::Aes,
        "2B7E151628AED2A6ABF7158809CF4F3C",
    ),
    (
        "zmk",
        Usage::KeyEncryption,
        Algorithm::Tdes,
        "0123456789ABCDEF0123456789ABCDEF",
    ),
    (
        "zmk-aes",
        Usage::KeyEncryption,
        Algorithm::Aes,
        "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
    ),
];

fn clear(id: &str) -> Key {
    let (_, _, algorithm, hex) = KEYS.iter().find(|k| k.0 == id).expect("a test key");
    Key::new(*algorithm, &unhex(hex)).expect("a test key")
}

/// The handles of the test keys in a backend.
struct Handles {
    zpk_a: KeyHandle,
    zpk_b: KeyHandle,
    zpk_3: KeyHandle,
    zpk_aes: KeyHandle,
    zak: KeyHandle,
    zak_aes: KeyHandle,
    zmk: KeyHandle,
    zmk_aes: KeyHandle,
}

impl Handles {
    fn of(m: &dyn SecurityModule) -> Handles {
        let h = |id: &str| m.handle(id).expect("every test key is held");
        Handles {
            zpk_a: h("zpk-a"),
            zpk_b: h("zpk-b"),
            zpk_3: h("zpk-3"),
            zpk_aes: h("zpk-aes"),
            zak: h("zak"),
            zak_aes: h("zak-aes"),
            zmk: h("zmk"),
            zmk_aes: h("zmk-aes"),
        }
    }
}

const PAN: &[u8] = b"4321987654321098";
const PIN: &[u8] = b"1234";

/// What every backend must do.
fn suite(m: &dyn SecurityModule, h: &Handles) {
    key_info(m, h);
    pin_translation(m, h);
    pin_refusals(m, h);
    macs(m, h);
    mac_refusals(m, h);
    rotation(m, h);
}

fn key_info(m: &dyn SecurityModule, h: &Handles) {
    assert_eq!(m.handle("no-such-key"), None);
    let info = m.info(h.zak).unwrap();
    assert_eq!(info.id, "zak");
    assert_eq!(info.usage, Usage::Mac);
    assert_eq!(info.algorithm, Algorithm::Tdes);
    assert_eq!(info.kcv, [0x08, 0xD7, 0xB4]);
    for (id, usage, algorithm, _) in KEYS {
        let info = m.info(m.handle(id).unwrap()).unwrap();
        assert_eq!((info.usage, info.algorithm), (usage, algorithm), "{id}");
        assert_eq!(info.kcv, clear(id).check_value(), "{id}");
    }
}

fn pin_translation(m: &dyn SecurityModule, h: &Handles) {
    let zpk_a = clear("zpk-a");
    let block0 = pin::encipher(Format::Iso0, &zpk_a, PIN, PAN, &mut pin::os_random).unwrap();
    for (to, key, id) in [
        (Format::Iso4, h.zpk_aes, "zpk-aes"),
        (Format::Iso1, h.zpk_b, "zpk-b"),
        (Format::Iso3, h.zpk_3, "zpk-3"),
        (Format::Iso0, h.zpk_b, "zpk-b"),
    ] {
        let out = m
            .translate_pin((h.zpk_a, Format::Iso0), &block0, PAN, (key, to))
            .unwrap();
        assert_eq!(out.as_bytes().len(), to.block_len(), "{to:?}");
        assert!(
            pin::holds_pin(to, &clear(id), out.as_bytes(), PAN, PIN).unwrap(),
            "ISO 0 -> {to:?} under {id}"
        );
        // And back: format 0 has no random fill, so the very block returns.
        let back = m
            .translate_pin((key, to), out.as_bytes(), PAN, (h.zpk_a, Format::Iso0))
            .unwrap();
        assert_eq!(back.as_bytes(), block0.as_bytes(), "{to:?} -> ISO 0");
    }
    // Format 1 to format 1 needs no PAN at all.
    let zpk_b = clear("zpk-b");
    let block1 = pin::encipher(Format::Iso1, &zpk_b, b"987654", b"", &mut pin::os_random).unwrap();
    let out = m
        .translate_pin(
            (h.zpk_b, Format::Iso1),
            &block1,
            b"",
            (h.zpk_3, Format::Iso1),
        )
        .unwrap();
    assert!(pin::holds_pin(
        Format::Iso1,
        &clear("zpk-3"),
        out.as_bytes(),
        b"",
        b"987654"
    )
    .unwrap());
    // A 19-digit PAN in format 4, and a 12-digit PIN.
    let pan19 = b"4321987654321098765";
    let block4 = pin::encipher(
        Format::Iso4,
        &clear("zpk-aes"),
        b"123456789012",
        pan19,
        &mut pin::os_random,
    )
    .unwrap();
    let out = m
        .translate_pin(
            (h.zpk_aes, Format::Iso4),
            &block4,
            pan19,
            (h.zpk_3, Format::Iso3),
        )
        .unwrap();
    let zpk_3 = clear("zpk-3");
    assert!(pin::holds_pin(Format::Iso3, &zpk_3, out.as_bytes(), pan19, b"123456789012").unwrap());
}

fn pin_refusals(m: &dyn SecurityModule, h: &Handles) {
    let zpk_a = clear("zpk-a");
    let block0 = pin::encipher(Format::Iso0, &zpk_a, PIN, PAN, &mut pin::os_random).unwrap();
    // Under the wrong key the block does not decipher to format 0: the switch
    // answers 81.
    assert_eq!(
        m.translate_pin(
            (h.zpk_b, Format::Iso0),
            &block0,
            PAN,
            (h.zpk_aes, Format::Iso4)
        ),
        Err(ModuleError::Pin(PinError::Block))
    );
    // A PAN too short for format 0, or not digits.
    assert_eq!(
        m.translate_pin(
            (h.zpk_a, Format::Iso0),
            &block0,
            b"123",
            (h.zpk_b, Format::Iso0)
        ),
        Err(ModuleError::Pin(PinError::Pan))
    );
    assert_eq!(
        m.translate_pin(
            (h.zpk_a, Format::Iso0),
            &block0,
            b"43219876543210X8",
            (h.zpk_b, Format::Iso0)
        ),
        Err(ModuleError::Pin(PinError::Pan))
    );
    // A format the key cannot carry, or a block of the wrong length.
    assert_eq!(
        m.translate_pin(
            (h.zpk_a, Format::Iso4),
            &block0,
            PAN,
            (h.zpk_b, Format::Iso0)
        ),
        Err(ModuleError::Pin(PinError::Key))
    );
    assert_eq!(
        m.translate_pin(
            (h.zpk_a, Format::Iso0),
            &block0[..7],
            PAN,
            (h.zpk_b, Format::Iso0)
        ),
        Err(ModuleError::Pin(PinError::Key))
    );
    // A MAC key or a ZMK cannot translate PINs, on either side.
    for (from, to) in [(h.zak, h.zpk_a), (h.zpk_a, h.zak), (h.zmk, h.zpk_a)] {
        assert!(
            matches!(
                m.translate_pin((from, Format::Iso0), &block0, PAN, (to, Format::Iso0)),
                Err(ModuleError::Usage { .. })
            ),
            "{from:?} -> {to:?}"
        );
    }
}

const RETAIL_DATA: &[u8] = b"Now is the time for all ";
/// RFC 4493's example message (64 bytes; the examples take its first 0, 16, 40
/// and 64).
const RFC_4493_M: [&str; 4] = [
    "6bc1bee22e409f96e93d7e117393172a",
    "ae2d8a571e03ac9c9eb76fac45af8e51",
    "30c81c46a35ce411e5fbc1191a0a52ef",
    "f69f2445df4f9b17ad2b417be66c3710",
];

fn macs(m: &dyn SecurityModule, h: &Handles) {
    // ISO/IEC 9797-1 annex B.4: algorithm 3, padding method 1.
    let mut mac = [0u8; 8];
    m.generate_mac(h.zak, MacAlgorithm::Iso9797Alg3, RETAIL_DATA, &mut mac)
        .unwrap();
    assert_eq!(mac.to_vec(), unhex("A1C72E74EA3FA9B6"));
    let mut left = [0u8; 4];
    m.generate_mac(h.zak, MacAlgorithm::Iso9797Alg3, RETAIL_DATA, &mut left)
        .unwrap();
    assert_eq!(left, mac[..4]);
    for len in [4, 6, 8] {
        m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, RETAIL_DATA, &mac[..len])
            .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
    }
    // RFC 4493 section 4: AES-CMAC, carried as its left 8 bytes.
    let message = unhex(&RFC_4493_M.concat());
    for (len, want) in [
        (0, "bb1d6929e9593728"),
        (16, "070a16b46b4d4144"),
        (40, "dfa66747de9ae630"),
        (64, "51f0bebf7e3b9d92"),
    ] {
        let mut mac = [0u8; 8];
        m.generate_mac(h.zak_aes, MacAlgorithm::AesCmac, &message[..len], &mut mac)
            .unwrap();
        assert_eq!(mac.to_vec(), unhex(want), "RFC 4493 example of {len} bytes");
        m.verify_mac(h.zak_aes, MacAlgorithm::AesCmac, &message[..len], &mac)
            .unwrap();
        m.verify_mac(h.zak_aes, MacAlgorithm::AesCmac, &message[..len], &mac[..4])
            .unwrap();
    }
}

fn mac_refusals(m: &dyn SecurityModule, h: &Handles) {
    let mismatch = Err(ModuleError::Mac(MacError::Mismatch));
    let good = unhex("A1C72E74EA3FA9B6");
    let mut bad = good.clone();
    bad[7] ^= 1;
    assert_eq!(
        m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, RETAIL_DATA, &bad),
        mismatch
    );
    assert_eq!(
        m.verify_mac(
            h.zak,
            MacAlgorithm::Iso9797Alg3,
            b"Now is the time for ALL ",
            &good
        ),
        mismatch
    );
    assert_eq!(
        m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, RETAIL_DATA, &bad[2..7]),
        mismatch,
        "5 bytes, wrong"
    );
    // Fewer than 4 bytes never verify.
    assert_eq!(
        m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, RETAIL_DATA, &good[..3]),
        mismatch
    );
    assert_eq!(
        m.verify_mac(
            h.zak_aes,
            MacAlgorithm::AesCmac,
            b"",
            &unhex("bb1d6929e9593729")
        ),
        mismatch
    );
    // Usage: a PIN key or a ZMK makes no MACs; a TDES key no CMAC; no MAC of 3
    // bytes.
    let mut out = [0u8; 8];
    for (key, algorithm) in [
        (h.zpk_a, MacAlgorithm::Iso9797Alg3),
        (h.zmk, MacAlgorithm::Iso9797Alg3),
        (h.zak, MacAlgorithm::AesCmac),
        (h.zak_aes, MacAlgorithm::Iso9797Alg3),
    ] {
        assert!(
            matches!(
                m.generate_mac(key, algorithm, RETAIL_DATA, &mut out),
                Err(ModuleError::Usage { .. })
            ),
            "{key:?} {algorithm:?}"
        );
        assert!(matches!(
            m.verify_mac(key, algorithm, RETAIL_DATA, &good),
            Err(ModuleError::Usage { .. })
        ));
    }
    assert!(matches!(
        m.generate_mac(h.zak, MacAlgorithm::Iso9797Alg3, RETAIL_DATA, &mut out[..3]),
        Err(ModuleError::Usage { .. })
    ));
}

fn rotation(m: &dyn SecurityModule, h: &Handles) {
    // A MAC key: generated in the module, sent to the peer under the ZMK.
    let data = b"a message in flight across a rotation";
    let mut old = [0u8; 8];
    m.generate_mac(h.zak, MacAlgorithm::Iso9797Alg3, data, &mut old)
        .unwrap();
    let staged = m.stage(h.zak, h.zmk).unwrap();
    let (header, peer_key) = tr31::unwrap(&clear("zmk"), &staged.block).unwrap();
    assert_eq!(header.key_usage.as_str(), "M3");
    assert_eq!(header.algorithm, Algorithm::Tdes);
    assert_eq!(peer_key.check_value(), staged.kcv);
    // Not in use until activated; but a MAC under it verifies already (the
    // peer may have switched on another link).
    let mut out = [0u8; 8];
    m.generate_mac(h.zak, MacAlgorithm::Iso9797Alg3, data, &mut out)
        .unwrap();
    assert_eq!(out, old);
    let peers = retail_mac(&peer_key, data).unwrap();
    m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, data, &peers)
        .unwrap();
    assert_eq!(m.info(h.zak).unwrap().kcv, [0x08, 0xD7, 0xB4]);
    m.activate(h.zak, &staged).unwrap();
    assert_eq!(m.info(h.zak).unwrap().kcv, staged.kcv);
    m.generate_mac(h.zak, MacAlgorithm::Iso9797Alg3, data, &mut out)
        .unwrap();
    assert_eq!(out, retail_mac(&peer_key, data).unwrap());
    // The replaced key still verifies (answers in flight), the new one too.
    m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, data, &old)
        .unwrap();
    m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, data, &out)
        .unwrap();
    // Activating twice is refused: nothing is staged.
    assert_eq!(m.activate(h.zak, &staged), Err(ModuleError::UnknownKey));
    assert_eq!(m.discard(h.zak, &staged), Err(ModuleError::UnknownKey));
    // A rotation the peer refused: the staged key is dropped and its MACs no
    // longer verify; the key in use is unchanged.
    let refused = m.stage(h.zak, h.zmk).unwrap();
    let (_, refused_key) = tr31::unwrap(&clear("zmk"), &refused.block).unwrap();
    let refused_mac = retail_mac(&refused_key, data).unwrap();
    m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, data, &refused_mac)
        .unwrap();
    m.discard(h.zak, &refused).unwrap();
    assert_eq!(
        m.verify_mac(h.zak, MacAlgorithm::Iso9797Alg3, data, &refused_mac),
        Err(ModuleError::Mac(MacError::Mismatch))
    );
    assert_eq!(m.activate(h.zak, &refused), Err(ModuleError::UnknownKey));
    assert_eq!(m.info(h.zak).unwrap().kcv, staged.kcv);
    // A key-encryption key is needed to stage under, and is not itself staged.
    assert!(matches!(
        m.stage(h.zak, h.zak),
        Err(ModuleError::Usage { .. })
    ));
    assert!(matches!(
        m.stage(h.zmk, h.zmk),
        Err(ModuleError::Usage { .. })
    ));

    // An AES PIN key under an AES ZMK (TR-31 version D); PIN blocks made under
    // the replaced key still translate.
    let aes_old = clear("zpk-aes");
    let block_old = pin::encipher(Format::Iso4, &aes_old, PIN, PAN, &mut pin::os_random).unwrap();
    let staged = m.stage(h.zpk_aes, h.zmk_aes).unwrap();
    let (header, new_key) = tr31::unwrap(&clear("zmk-aes"), &staged.block).unwrap();
    assert_eq!(header.key_usage.as_str(), "P0");
    assert_eq!(new_key.check_value(), staged.kcv);
    m.activate(h.zpk_aes, &staged).unwrap();
    let block_new = pin::encipher(Format::Iso4, &new_key, PIN, PAN, &mut pin::os_random).unwrap();
    let zpk_a = clear("zpk-a");
    for block in [&block_old, &block_new] {
        let out = m
            .translate_pin(
                (h.zpk_aes, Format::Iso4),
                block,
                PAN,
                (h.zpk_a, Format::Iso0),
            )
            .unwrap();
        assert!(pin::holds_pin(Format::Iso0, &zpk_a, out.as_bytes(), PAN, PIN).unwrap());
    }
    // Towards the rotated key, the new key is used.
    let out = m
        .translate_pin(
            (h.zpk_a, Format::Iso0),
            &pin::encipher(Format::Iso0, &zpk_a, PIN, PAN, &mut pin::os_random).unwrap(),
            PAN,
            (h.zpk_aes, Format::Iso4),
        )
        .unwrap();
    assert!(pin::holds_pin(Format::Iso4, &new_key, out.as_bytes(), PAN, PIN).unwrap());
}

// === The backends ===

fn software() -> SoftwareModule {
    let mut m = SoftwareModule::new();
    for (id, usage, _, _) in KEYS {
        m.add(id, usage, clear(id)).unwrap();
    }
    m
}

/// The test double, and a payShield module holding the test keys as its
/// tokens.
pub fn payshield() -> (Responder, PayShieldModule) {
    let lmk = Key::new(Algorithm::Aes, &[0x5A; 32]).unwrap();
    let responder = Responder::start(ResponderConfig::new(lmk)).unwrap();
    let mut config = PayShieldConfig::new(responder.address());
    for (id, usage, algorithm, hex) in KEYS {
        let key = clear(id);
        config.keys.push(PayShieldKey {
            id: id.to_owned(),
            usage,
            algorithm,
            length_bytes: hex.len() / 2,
            token: responder.token(usage, &key).unwrap(),
            kcv: key.check_value(),
        });
    }
    let module = PayShieldModule::new(config).unwrap();
    (responder, module)
}

#[test]
fn the_software_module_passes_the_interface_suite() {
    let m = software();
    suite(&m, &Handles::of(&m));
}

#[test]
fn the_payshield_module_passes_the_interface_suite_against_the_test_double() {
    let (responder, m) = payshield();
    m.check_keys().unwrap();
    suite(&m, &Handles::of(&m));
    let stats = m.stats();
    assert!(stats.requests > 20, "{stats:?}");
    assert_eq!((stats.failures, stats.busy, stats.reconnects), (0, 0, 0));
    // One caller at a time: one connection, reused.
    assert_eq!(responder.connections_accepted(), 1);
    assert_eq!(stats.connections_open, 1);
}

#[test]
fn the_suite_passes_with_many_callers_at_once() {
    let (responder, m) = payshield();
    let h = Handles::of(&m);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..5 {
                    key_info(&m, &h);
                    pin_translation(&m, &h);
                    macs(&m, &h);
                }
            });
        }
    });
    let stats = m.stats();
    assert!(stats.connections_open <= 4, "{stats:?}");
    assert!(responder.connections_accepted() <= 4);
    // Four callers and four connections: nobody was turned away.
    assert_eq!(stats.busy, 0);
}

/// TLS to the HSM: the double behind a certificate of a CA made here, the client
/// trusting that CA and presenting its own certificate (payShield 10K host
/// ports may ask for one).
#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::sync::Arc;
    use switchyard_security::payshield::PayShieldTls;

    struct Pki {
        ca: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Pki {
        fn new() -> Pki {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let key = KeyPair::generate().unwrap();
            let ca = params.self_signed(&key).unwrap().der().clone();
            Pki {
                ca,
                issuer: Issuer::new(params, key),
            }
        }

        fn leaf(&self, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![name.to_owned()])
                .unwrap()
                .signed_by(&key, &self.issuer)
                .unwrap();
            let der = PrivatePkcs8KeyDer::from(key.serialize_der());
            (vec![cert.der().clone()], der.into())
        }

        fn roots(&self) -> Arc<rustls::RootCertStore> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            Arc::new(roots)
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// The double on TLS with a certificate for `hsm.test` that asks for a
    /// client certificate of the same CA; a module holding the test keys that
    /// presents one, and its client config.
    fn double(pki: &Pki) -> (Responder, PayShieldModule, Arc<rustls::ClientConfig>) {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(pki.roots(), provider())
                .build()
                .unwrap();
        let (chain, key) = pki.leaf("hsm.test");
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let (chain, key) = pki.leaf("switch.test");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(pki.roots())
            .with_client_auth_cert(chain, key)
            .unwrap();
        let mut config = ResponderConfig::new(Key::new(Algorithm::Aes, &[0x5A; 32]).unwrap());
        config.tls = Some(Arc::new(server));
        let responder = Responder::start(config).unwrap();
        let module = module_for(&responder, Some(Arc::new(client.clone())), "hsm.test");
        (responder, module, Arc::new(client))
    }

    fn module_for(
        responder: &Responder,
        client: Option<Arc<rustls::ClientConfig>>,
        name: &str,
    ) -> PayShieldModule {
        let mut config = PayShieldConfig::new(responder.address());
        for (id, usage, algorithm, hex) in KEYS {
            let key = clear(id);
            config.keys.push(PayShieldKey {
                id: id.to_owned(),
                usage,
                algorithm,
                length_bytes: hex.len() / 2,
                token: responder.token(usage, &key).unwrap(),
                kcv: key.check_value(),
            });
        }
        config.tls = client.map(|config| PayShieldTls {
            config,
            server_name: ServerName::try_from(name.to_owned()).unwrap(),
        });
        PayShieldModule::new(config).unwrap()
    }

    #[test]
    fn the_payshield_module_passes_the_interface_suite_over_mutual_tls() {
        let pki = Pki::new();
        let (responder, m, _) = double(&pki);
        m.check_keys().unwrap();
        suite(&m, &Handles::of(&m));
        // A connection the HSM closed is replaced over TLS too.
        responder.drop_connections();
        m.diagnostics().unwrap();
        assert_eq!(m.stats().reconnects, 1);
    }

    #[test]
    fn an_hsm_not_trusted_or_not_named_is_refused() {
        let pki = Pki::new();
        let (responder, _, client) = double(&pki);
        // Another name than the certificate's.
        let m = module_for(&responder, Some(client), "other.test");
        match m.diagnostics() {
            Err(ModuleError::Unavailable(text)) => assert!(text.contains("TLS"), "{text}"),
            other => panic!("{other:?}"),
        }
        // A client that trusts another CA.
        let other = Pki::new();
        let (chain, key) = other.leaf("switch.test");
        let stranger = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(other.roots())
            .with_client_auth_cert(chain, key)
            .unwrap();
        let m = module_for(&responder, Some(Arc::new(stranger)), "hsm.test");
        match m.diagnostics() {
            Err(ModuleError::Unavailable(text)) => assert!(text.contains("TLS"), "{text}"),
            other => panic!("{other:?}"),
        }
        // Plain TCP to a TLS port gets no answer it understands.
        let m = module_for(&responder, None, "hsm.test");
        assert!(matches!(m.diagnostics(), Err(ModuleError::Unavailable(_))));
    }
}
