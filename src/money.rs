//! ISO 4217 currencies and amounts in integer minor units.
//!
//! Amounts are never represented as floating point: on the wire (DE4, DE5, DE6) they are
//! n12 counts of the currency's minor unit, and in memory they are `i64` minor units.
//! Conversion to a decimal number (for display or reporting) goes through
//! [`rust_decimal::Decimal`], which is exact.

use std::fmt;

use rust_decimal::Decimal;

/// An ISO 4217 currency: numeric code (as carried in DE49-51), alphabetic code and the
/// number of digits after the decimal separator ("minor unit" exponent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Currency {
    /// ISO 4217 numeric code, e.g. 978 for EUR.
    pub numeric: u16,
    /// ISO 4217 alphabetic code, e.g. `"EUR"`.
    pub alpha: &'static str,
    /// Minor unit exponent: 2 means 1 unit = 100 minor units.
    pub exponent: u8,
}

const fn c(numeric: u16, alpha: &'static str, exponent: u8) -> Currency {
    Currency {
        numeric,
        alpha,
        exponent,
    }
}

/// Every active ISO 4217 currency (ISO 4217 list one, including the fund codes BOV, CHE,
/// CHW, CLF, COU, MXV, USN, UYI and UYW), sorted by numeric code for binary search.
///
/// X-codes (precious metals, SDR, testing and "no currency" codes) are omitted, except the
/// real circulating currencies XAF, XCD, XCG, XOF and XPF. Withdrawn codes (e.g. ANG, CUC,
/// HRK, SLL, VEF, ZWL) are not listed; XCG (Caribbean guilder) took over ANG's numeric code
/// 532 on 2025-03-31.
pub static CURRENCIES: &[Currency] = &[
    c(8, "ALL", 2),
    c(12, "DZD", 2),
    c(32, "ARS", 2),
    c(36, "AUD", 2),
    c(44, "BSD", 2),
    c(48, "BHD", 3),
    c(50, "BDT", 2),
    c(51, "AMD", 2),
    c(52, "BBD", 2),
    c(60, "BMD", 2),
    c(64, "BTN", 2),
    c(68, "BOB", 2),
    c(72, "BWP", 2),
    c(84, "BZD", 2),
    c(90, "SBD", 2),
    c(96, "BND", 2),
    c(104, "MMK", 2),
    c(108, "BIF", 0),
    c(116, "KHR", 2),
    c(124, "CAD", 2),
    c(132, "CVE", 2),
    c(136, "KYD", 2),
    c(144, "LKR", 2),
    c(152, "CLP", 0),
    c(156, "CNY", 2),
    c(170, "COP", 2),
    c(174, "KMF", 0),
    c(188, "CRC", 2),
    c(192, "CUP", 2),
    c(203, "CZK", 2),
    c(208, "DKK", 2),
    c(214, "DOP", 2),
    c(222, "SVC", 2),
    c(230, "ETB", 2),
    c(232, "ERN", 2),
    c(238, "FKP", 2),
    c(242, "FJD", 2),
    c(262, "DJF", 0),
    c(270, "GMD", 2),
    c(292, "GIP", 2),
    c(320, "GTQ", 2),
    c(324, "GNF", 0),
    c(328, "GYD", 2),
    c(332, "HTG", 2),
    c(340, "HNL", 2),
    c(344, "HKD", 2),
    c(348, "HUF", 2),
    c(352, "ISK", 0),
    c(356, "INR", 2),
    c(360, "IDR", 2),
    c(364, "IRR", 2),
    c(368, "IQD", 3),
    c(376, "ILS", 2),
    c(388, "JMD", 2),
    c(392, "JPY", 0),
    c(398, "KZT", 2),
    c(400, "JOD", 3),
    c(404, "KES", 2),
    c(408, "KPW", 2),
    c(410, "KRW", 0),
    c(414, "KWD", 3),
    c(417, "KGS", 2),
    c(418, "LAK", 2),
    c(422, "LBP", 2),
    c(426, "LSL", 2),
    c(430, "LRD", 2),
    c(434, "LYD", 3),
    c(446, "MOP", 2),
    c(454, "MWK", 2),
    c(458, "MYR", 2),
    c(462, "MVR", 2),
    c(480, "MUR", 2),
    c(484, "MXN", 2),
    c(496, "MNT", 2),
    c(498, "MDL", 2),
    c(504, "MAD", 2),
    c(512, "OMR", 3),
    c(516, "NAD", 2),
    c(524, "NPR", 2),
    c(532, "XCG", 2),
    c(533, "AWG", 2),
    c(548, "VUV", 0),
    c(554, "NZD", 2),
    c(558, "NIO", 2),
    c(566, "NGN", 2),
    c(578, "NOK", 2),
    c(586, "PKR", 2),
    c(590, "PAB", 2),
    c(598, "PGK", 2),
    c(600, "PYG", 0),
    c(604, "PEN", 2),
    c(608, "PHP", 2),
    c(634, "QAR", 2),
    c(643, "RUB", 2),
    c(646, "RWF", 0),
    c(654, "SHP", 2),
    c(682, "SAR", 2),
    c(690, "SCR", 2),
    c(702, "SGD", 2),
    c(704, "VND", 0),
    c(706, "SOS", 2),
    c(710, "ZAR", 2),
    c(728, "SSP", 2),
    c(748, "SZL", 2),
    c(752, "SEK", 2),
    c(756, "CHF", 2),
    c(760, "SYP", 2),
    c(764, "THB", 2),
    c(776, "TOP", 2),
    c(780, "TTD", 2),
    c(784, "AED", 2),
    c(788, "TND", 3),
    c(800, "UGX", 0),
    c(807, "MKD", 2),
    c(818, "EGP", 2),
    c(826, "GBP", 2),
    c(834, "TZS", 2),
    c(840, "USD", 2),
    c(858, "UYU", 2),
    c(860, "UZS", 2),
    c(882, "WST", 2),
    c(886, "YER", 2),
    c(901, "TWD", 2),
    c(924, "ZWG", 2),
    c(925, "SLE", 2),
    c(926, "VED", 2),
    c(927, "UYW", 4),
    c(928, "VES", 2),
    c(929, "MRU", 2),
    c(930, "STN", 2),
    c(933, "BYN", 2),
    c(934, "TMT", 2),
    c(936, "GHS", 2),
    c(938, "SDG", 2),
    c(940, "UYI", 0),
    c(941, "RSD", 2),
    c(943, "MZN", 2),
    c(944, "AZN", 2),
    c(946, "RON", 2),
    c(947, "CHE", 2),
    c(948, "CHW", 2),
    c(949, "TRY", 2),
    c(950, "XAF", 0),
    c(951, "XCD", 2),
    c(952, "XOF", 0),
    c(953, "XPF", 0),
    c(967, "ZMW", 2),
    c(968, "SRD", 2),
    c(969, "MGA", 2),
    c(970, "COU", 2),
    c(971, "AFN", 2),
    c(972, "TJS", 2),
    c(973, "AOA", 2),
    c(975, "BGN", 2),
    c(976, "CDF", 2),
    c(977, "BAM", 2),
    c(978, "EUR", 2),
    c(979, "MXV", 2),
    c(980, "UAH", 2),
    c(981, "GEL", 2),
    c(984, "BOV", 2),
    c(985, "PLN", 2),
    c(986, "BRL", 2),
    c(990, "CLF", 4),
    c(997, "USN", 2),
];

/// Looks up a currency by its ISO 4217 numeric code.
pub fn currency_by_numeric(code: u16) -> Option<Currency> {
    CURRENCIES
        .binary_search_by_key(&code, |c| c.numeric)
        .ok()
        .map(|i| CURRENCIES[i])
}

/// Parse DE49 as 3 ASCII digits; None if not digits or unknown.
///
/// The same encoding is used by DE50 and DE51.
pub fn currency_from_de49(field: &[u8]) -> Option<Currency> {
    let [a, b, c] = *field else {
        return None;
    };
    if !(a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit()) {
        return None;
    }
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    currency_by_numeric(code)
}

/// Looks up a currency by its ISO 4217 alphabetic code (ASCII case-insensitive, so `"eur"`
/// finds EUR).
pub fn currency_by_alpha(alpha: &str) -> Option<Currency> {
    CURRENCIES
        .iter()
        .find(|c| c.alpha.eq_ignore_ascii_case(alpha))
        .copied()
}

/// An amount in minor units of a currency (DE4 is n12 minor units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amount {
    /// Signed count of minor units (cents for EUR, yen for JPY, fils for KWD).
    pub minor: i64,
    /// The currency the amount is expressed in.
    pub currency: Currency,
}

/// Why a DE4-style n12 amount could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// The field is not exactly 12 bytes long.
    #[error("expected 12 digits, found {found} bytes")]
    Length {
        /// The length of the field that was found.
        found: usize,
    },
    /// The byte at `position` (0-based) is not an ASCII digit.
    #[error("non-digit at position {position}")]
    NonDigit {
        /// 0-based offset of the first offending byte.
        position: usize,
    },
}

/// Number of digits in a DE4-style amount.
const DE4_LEN: usize = 12;

/// Largest value representable in 12 digits.
const DE4_MAX: i64 = 999_999_999_999;

/// Parse DE4 (exactly 12 ASCII digits) into minor units without allocation.
///
/// Also suitable for DE5 and DE6, which have the same n12 format.
pub fn parse_de4(field: &[u8]) -> Result<i64, AmountError> {
    if field.len() != DE4_LEN {
        return Err(AmountError::Length { found: field.len() });
    }
    let mut value: i64 = 0;
    for (position, &byte) in field.iter().enumerate() {
        if !byte.is_ascii_digit() {
            return Err(AmountError::NonDigit { position });
        }
        // At most 12 digits, so this cannot overflow an i64.
        value = value * 10 + i64::from(byte - b'0');
    }
    Ok(value)
}

/// Write minor units as 12 ASCII digits (value must be 0..=999_999_999_999; debug_assert).
///
/// In release builds an out-of-range value is clamped into that range rather than
/// producing a corrupt field.
pub fn format_de4(minor: i64, out: &mut [u8; 12]) {
    debug_assert!(
        (0..=DE4_MAX).contains(&minor),
        "DE4 amount out of range: {minor}"
    );
    let mut value = minor.clamp(0, DE4_MAX);
    for slot in out.iter_mut().rev() {
        // `value % 10` is in 0..=9, so the narrowing is lossless.
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

impl Amount {
    /// The amount in major units as an exact decimal, e.g. 1234 minor EUR is 12.34.
    pub fn to_decimal(&self) -> Decimal {
        Decimal::new(self.minor, u32::from(self.currency.exponent))
    }
}

impl fmt::Display for Amount {
    /// Formats as `"<major units> <alpha code>"`, e.g. `12.34 EUR`, `1234 JPY`,
    /// `1.234 KWD`. The number always shows the currency's full number of minor digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.to_decimal(), self.currency.alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(alpha: &str) -> Currency {
        currency_by_alpha(alpha).expect(alpha)
    }

    #[test]
    fn table_is_sorted_unique_and_well_formed() {
        for pair in CURRENCIES.windows(2) {
            assert!(pair[0].numeric < pair[1].numeric, "{pair:?}");
        }
        for (i, a) in CURRENCIES.iter().enumerate() {
            assert!((1..=999).contains(&a.numeric), "{a:?}");
            assert_eq!(a.alpha.len(), 3, "{a:?}");
            assert!(a.alpha.bytes().all(|b| b.is_ascii_uppercase()), "{a:?}");
            assert!(a.exponent <= 4, "{a:?}");
            assert!(
                CURRENCIES[i + 1..].iter().all(|b| b.alpha != a.alpha),
                "duplicate alpha {a:?}"
            );
        }
    }

    #[test]
    fn every_entry_is_found_both_ways() {
        for &c in CURRENCIES {
            assert_eq!(currency_by_numeric(c.numeric), Some(c));
            assert_eq!(currency_by_alpha(c.alpha), Some(c));
        }
    }

    #[test]
    fn known_currencies() {
        let expect: &[(u16, &str, u8)] = &[
            (978, "EUR", 2),
            (840, "USD", 2),
            (392, "JPY", 0),
            (414, "KWD", 3),
            (48, "BHD", 3),
            (990, "CLF", 4),
            (927, "UYW", 4),
            (826, "GBP", 2),
            (756, "CHF", 2),
            (952, "XOF", 0),
            (950, "XAF", 0),
            (953, "XPF", 0),
            (951, "XCD", 2),
            (924, "ZWG", 2),
            (928, "VES", 2),
            (925, "SLE", 2),
            (532, "XCG", 2),
            (8, "ALL", 2),
        ];
        for &(numeric, alpha, exponent) in expect {
            let want = Currency {
                numeric,
                alpha,
                exponent,
            };
            assert_eq!(currency_by_numeric(numeric), Some(want));
            assert_eq!(currency_by_alpha(alpha), Some(want));
        }
    }

    #[test]
    fn unknown_and_withdrawn_codes() {
        assert_eq!(currency_by_numeric(0), None);
        assert_eq!(currency_by_numeric(999), None);
        assert_eq!(currency_by_numeric(1000), None);
        assert_eq!(currency_by_numeric(191), None); // HRK, withdrawn 2023
        assert_eq!(currency_by_numeric(932), None); // ZWL, withdrawn 2024
        assert_eq!(currency_by_alpha("ANG"), None); // replaced by XCG
        assert_eq!(currency_by_alpha("XXX"), None);
        assert_eq!(currency_by_alpha(""), None);
        assert_eq!(currency_by_alpha("EURO"), None);
    }

    #[test]
    fn alpha_lookup_ignores_ascii_case() {
        assert_eq!(currency_by_alpha("eur"), Some(cur("EUR")));
        assert_eq!(currency_by_alpha("Jpy"), Some(cur("JPY")));
    }

    #[test]
    fn de49_parsing() {
        assert_eq!(currency_from_de49(b"978"), Some(cur("EUR")));
        assert_eq!(currency_from_de49(b"048"), Some(cur("BHD")));
        assert_eq!(currency_from_de49(b"008"), Some(cur("ALL")));
        assert_eq!(currency_from_de49(b"000"), None);
        assert_eq!(currency_from_de49(b"999"), None);
        assert_eq!(currency_from_de49(b"EUR"), None);
        assert_eq!(currency_from_de49(b"97A"), None);
        assert_eq!(currency_from_de49(b" 78"), None);
        assert_eq!(currency_from_de49(b"97"), None);
        assert_eq!(currency_from_de49(b"0978"), None);
        assert_eq!(currency_from_de49(b""), None);
    }

    #[test]
    fn de4_parse() {
        assert_eq!(parse_de4(b"000000001234"), Ok(1234));
        assert_eq!(parse_de4(b"000000000000"), Ok(0));
        assert_eq!(parse_de4(b"999999999999"), Ok(DE4_MAX));
        assert_eq!(parse_de4(b"100000000000"), Ok(100_000_000_000));
    }

    #[test]
    fn de4_errors() {
        assert_eq!(parse_de4(b""), Err(AmountError::Length { found: 0 }));
        assert_eq!(
            parse_de4(b"00000001234"),
            Err(AmountError::Length { found: 11 })
        );
        assert_eq!(
            parse_de4(b"0000000012345"),
            Err(AmountError::Length { found: 13 })
        );
        assert_eq!(
            parse_de4(b"A00000001234"),
            Err(AmountError::NonDigit { position: 0 })
        );
        assert_eq!(
            parse_de4(b"00000 001234"),
            Err(AmountError::NonDigit { position: 5 })
        );
        assert_eq!(
            parse_de4(b"-00000001234"),
            Err(AmountError::NonDigit { position: 0 })
        );
        assert_eq!(
            parse_de4(b"00000000123\xff"),
            Err(AmountError::NonDigit { position: 11 })
        );
    }

    #[test]
    fn de4_error_messages() {
        assert_eq!(
            AmountError::Length { found: 3 }.to_string(),
            "expected 12 digits, found 3 bytes"
        );
        assert_eq!(
            AmountError::NonDigit { position: 7 }.to_string(),
            "non-digit at position 7"
        );
    }

    #[test]
    fn de4_format() {
        let mut out = [0u8; 12];
        format_de4(1234, &mut out);
        assert_eq!(&out, b"000000001234");
        format_de4(0, &mut out);
        assert_eq!(&out, b"000000000000");
        format_de4(DE4_MAX, &mut out);
        assert_eq!(&out, b"999999999999");
    }

    #[test]
    fn de4_round_trip() {
        let mut out = [0u8; 12];
        let values: [i64; 9] = [
            0,
            1,
            9,
            10,
            99,
            1234,
            100_000_000_000,
            123_456_789_012,
            DE4_MAX,
        ];
        for v in values {
            format_de4(v, &mut out);
            assert_eq!(parse_de4(&out), Ok(v));
        }
        for field in [b"000000000000", b"999999999999", b"012345678901"] {
            let v = parse_de4(field).unwrap();
            format_de4(v, &mut out);
            assert_eq!(&out, field);
        }
    }

    #[test]
    fn to_decimal_is_exact() {
        let a = Amount {
            minor: 1234,
            currency: cur("EUR"),
        };
        assert_eq!(a.to_decimal(), Decimal::new(1234, 2));
        let clf = Amount {
            minor: 10_001,
            currency: cur("CLF"),
        };
        assert_eq!(clf.to_decimal().to_string(), "1.0001");
    }

    #[test]
    fn display() {
        let show = |minor, alpha| {
            Amount {
                minor,
                currency: cur(alpha),
            }
            .to_string()
        };
        assert_eq!(show(1234, "JPY"), "1234 JPY");
        assert_eq!(show(1234, "EUR"), "12.34 EUR");
        assert_eq!(show(1234, "KWD"), "1.234 KWD");
        assert_eq!(show(5, "EUR"), "0.05 EUR");
        assert_eq!(show(100, "USD"), "1.00 USD");
        assert_eq!(show(0, "EUR"), "0.00 EUR");
        assert_eq!(show(-1234, "EUR"), "-12.34 EUR");
        assert_eq!(show(DE4_MAX, "USD"), "9999999999.99 USD");
    }
}
