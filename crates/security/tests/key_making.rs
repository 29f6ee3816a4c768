//! Making keys: from components, at random, and their check values.

use switchyard_security::{Algorithm, Key, KeyError};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn components_xor_to_the_key_and_its_check_value() {
    // 0123456789ABCDEFFEDCBA9876543210 (KCV 08D7B4) as two components.
    let a = unhex("1111111111111111EEEEEEEEEEEEEEEE");
    let b = unhex("1032547698BADCFE1032547698BADCFE");
    let key = Key::from_components(Algorithm::Tdes, &[&a, &b]).unwrap();
    assert_eq!(key.check_value(), [0x08, 0xD7, 0xB4]);
    let one = Key::from_components(
        Algorithm::Tdes,
        &[&unhex("0123456789ABCDEFFEDCBA9876543210")],
    )
    .unwrap();
    assert_eq!(one.check_value(), [0x08, 0xD7, 0xB4]);
    // Three components: the third cancels the second.
    let three = Key::from_components(Algorithm::Tdes, &[&a, &b, &b]).unwrap();
    let lone_a = Key::new(Algorithm::Tdes, &a).unwrap();
    assert_eq!(three.check_value(), lone_a.check_value());
}

#[test]
fn components_of_unequal_or_wrong_lengths_are_refused() {
    assert_eq!(
        Key::from_components(Algorithm::Tdes, &[]).unwrap_err(),
        KeyError::Length {
            algorithm: Algorithm::Tdes,
            length: 0
        }
    );
    assert_eq!(
        Key::from_components(Algorithm::Aes, &[&[1; 16], &[2; 24]]).unwrap_err(),
        KeyError::Length {
            algorithm: Algorithm::Aes,
            length: 24
        }
    );
    assert!(Key::from_components(Algorithm::Tdes, &[&[1; 8], &[2; 8]]).is_err());
}

#[test]
fn random_keys_have_their_length_and_differ() {
    for (alg, len) in [
        (Algorithm::Tdes, 16),
        (Algorithm::Tdes, 24),
        (Algorithm::Aes, 16),
        (Algorithm::Aes, 24),
        (Algorithm::Aes, 32),
    ] {
        let a = Key::random(alg, len).unwrap();
        let b = Key::random(alg, len).unwrap();
        assert_eq!(a.algorithm(), alg);
        assert!(format!("{a:?}").contains(&format!("{len} bytes")), "{a:?}");
        assert_ne!(a.check_value(), b.check_value());
    }
    assert!(Key::random(Algorithm::Tdes, 32).is_err());
    assert!(Key::random(Algorithm::Aes, 8).is_err());
}
