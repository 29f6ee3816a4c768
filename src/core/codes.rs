//! Response codes (DE39) that the switch itself produces.

use std::fmt;

/// A DE39 response code produced by the switch (bank codes are passed through).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseCode {
    /// 00 approved (network management answers).
    Approved,
    /// 12 invalid transaction (unsupported MTI or processing code).
    InvalidTransaction,
    /// 13 invalid amount or currency.
    InvalidAmount,
    /// 25 unable to locate the original (a reversal whose original the switch does
    /// not know within its duplicates window).
    OriginalNotFound,
    /// 30 format error (a field does not match the dialect or is missing).
    FormatError,
    /// 58 transaction not permitted to this institution (DE32 ≠ certificate).
    NotPermitted,
    /// 63 security violation (the request's MAC is missing or does not verify).
    SecurityViolation,
    /// 65 rate limit exceeded.
    RateLimited,
    /// 68 response received too late (deadline passed at the switch).
    LateResponse,
    /// 81 PIN cryptographic error (DE52 is not a valid PIN block under the
    /// acquirer's key, or one side of the route has no PIN key).
    PinCryptographicError,
    /// 91 destination unavailable or overloaded.
    DestinationUnavailable,
    /// 92 no route to the destination.
    NoRoute,
    /// 94 duplicate transmission.
    Duplicate,
    /// 96 system malfunction.
    SystemMalfunction,
}

impl ResponseCode {
    /// Every code, for metrics and documentation.
    pub const ALL: [ResponseCode; 14] = [
        ResponseCode::Approved,
        ResponseCode::InvalidTransaction,
        ResponseCode::InvalidAmount,
        ResponseCode::OriginalNotFound,
        ResponseCode::FormatError,
        ResponseCode::NotPermitted,
        ResponseCode::RateLimited,
        ResponseCode::LateResponse,
        ResponseCode::DestinationUnavailable,
        ResponseCode::NoRoute,
        ResponseCode::Duplicate,
        ResponseCode::SystemMalfunction,
        // Appended: a code's position is kept where it is stored (duplicates).
        ResponseCode::SecurityViolation,
        ResponseCode::PinCryptographicError,
    ];

    /// The two ASCII digits of DE39.
    pub fn as_bytes(self) -> &'static [u8; 2] {
        match self {
            ResponseCode::Approved => b"00",
            ResponseCode::InvalidTransaction => b"12",
            ResponseCode::InvalidAmount => b"13",
            ResponseCode::OriginalNotFound => b"25",
            ResponseCode::FormatError => b"30",
            ResponseCode::NotPermitted => b"58",
            ResponseCode::SecurityViolation => &security_codes()[0],
            ResponseCode::RateLimited => b"65",
            ResponseCode::LateResponse => b"68",
            ResponseCode::PinCryptographicError => &security_codes()[1],
            ResponseCode::DestinationUnavailable => b"91",
            ResponseCode::NoRoute => b"92",
            ResponseCode::Duplicate => b"94",
            ResponseCode::SystemMalfunction => b"96",
        }
    }

    /// The code as a static string, for metric labels.
    pub fn as_str(self) -> &'static str {
        match std::str::from_utf8(self.as_bytes()) {
            Ok(s) => s,
            Err(_) => unreachable!("response codes are ASCII digits"),
        }
    }

    /// The code a DE39 value stands for, if the switch produces it.
    pub fn from_de39(field: &[u8]) -> Option<ResponseCode> {
        ResponseCode::ALL
            .into_iter()
            .find(|c| c.as_bytes() == field)
    }
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// DE39 of [`ResponseCode::SecurityViolation`] and
/// [`ResponseCode::PinCryptographicError`]: `[keys] mac_failure_code` and
/// `pin_failure_code` of the config the switch started with (63 and 81 until
/// then, and in a process that never sets them). Set once: changing them needs
/// a restart.
static SECURITY_CODES: std::sync::OnceLock<[[u8; 2]; 2]> = std::sync::OnceLock::new();

/// The standard codes: 63 security violation, 81 PIN cryptographic error.
const SECURITY_CODES_DEFAULT: [[u8; 2]; 2] = [*b"63", *b"81"];

fn security_codes() -> &'static [[u8; 2]; 2] {
    SECURITY_CODES.get().unwrap_or(&SECURITY_CODES_DEFAULT)
}

/// Sets the two security codes for the life of the process; false (nothing
/// changed) when they were set already to others.
pub fn set_security_codes(codes: [[u8; 2]; 2]) -> bool {
    *SECURITY_CODES.get_or_init(|| codes) == codes
}

/// A DE39 value as a static label (any two bytes; unknown ones map to "other").
pub fn de39_label(field: &[u8]) -> &'static str {
    const KNOWN: [&str; 27] = [
        "00", "01", "03", "04", "05", "12", "13", "14", "25", "30", "41", "43", "51", "54", "55",
        "57", "58", "61", "63", "65", "68", "81", "91", "92", "94", "96", "06",
    ];
    KNOWN
        .into_iter()
        .find(|k| k.as_bytes() == field)
        .unwrap_or("other")
}
