//! ISO 8583:1993 ↔ 1987 translation at the edge.
//!
//! The switch works in ISO 8583:1987: every rule (MTIs, DE39 response codes, DE90
//! original data elements, the keys of the duplicates table) reads that form. A
//! dialect declared `version = "1993"` is held, once decoded, in the 1987 form
//! of the default profile (`iso87-ascii`), and written back in 1993 form on
//! encode: decoding converts wire → the 1993 fields (as any dialect) → 1987;
//! encoding the reverse. So an acquirer and a bank of different versions meet
//! in the middle, and the switch's own answers reach a 1993 acquirer in 1993.
//!
//! What is translated (README, "ISO 8583:1993 and 1987"):
//!
//! | 1987 | 1993 |
//! |---|---|
//! | MTI 0xyz (0800, 0801, 0810, 0811) | MTI 1xyz (1804, 1805, 1814, 1815) |
//! | DE12 hhmmss + DE13 MMDD | DE12 YYMMDDhhmmss (the year nearest today) |
//! | DE39 response code, an 2 | DE39 action code, n 3 ([`ActionCodes`]) |
//! | MTI class (x1xx, x2xx, x4xx) | DE24 function code 100, 200, 400 |
//! | DE70 001, 002, 301 in 08xx | DE24 801, 802, 831 in 18xx |
//! | DE90 MTI, STAN, date and time, acquirer | DE56 MTI, STAN, YY + date and time, LL acquirer |
//!
//! DE56 names the original by its *local* date and time; a reversal's DE13 +
//! DE12 (which 1987 reversals copy from their original) give it on the way to
//! 1993, and on the way back DE56's becomes both DE90's date and time and the
//! message's DE13 + DE12. Requests from 1993 acquirers are therefore keyed on
//! DE13 + DE12 by the duplicates table (`KeyTime::Local` in the switch).
//!
//! Fields with the same meaning in both versions ([`CARRIED`]) are carried,
//! converted to the target's length rules. 1987 DE24 (the network international
//! identifier, an address on the 1987 link) and 1993 DE25 (message reason code)
//! have no counterpart and are left out. Any other field means something else in
//! the other version: a **request** carrying one is refused (the switch answers
//! 30, naming the field), an **answer** carrying one loses it.

use crate::dialect::{Dialect, DialectError, Encoding};
use crate::encode::Encoder;
use crate::error::{DecodeError, DecodeErrorKind, EncodeError, EncodeErrorKind, Location};
use crate::message::{Message, Mti};
use bytes::BytesMut;
use serde::Deserialize;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// The ISO 8583 version a dialect speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum Version {
    /// ISO 8583:1987 (MTIs 0xxx): the form the switch works in.
    #[default]
    #[serde(rename = "1987")]
    Iso1987,
    /// ISO 8583:1993 (MTIs 1xxx), translated at the edge.
    #[serde(rename = "1993")]
    Iso1993,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::Iso1987 => "ISO 8583:1987",
            Version::Iso1993 => "ISO 8583:1993",
        })
    }
}

/// Why a message could not be translated between versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untranslatable {
    /// The field means something else in the other version.
    NoCounterpart {
        /// The version translated into.
        into: Version,
    },
    /// A 1993 function code (DE24) with no 1987 equivalent for this message.
    FunctionCode,
    /// A 1987 network management code (DE70) with no 1993 function code.
    NetworkCode,
    /// Original data elements (DE56, DE90) not in the standard layout.
    OriginalData,
    /// A carried value holds a character the other version's type for the field
    /// does not allow (1993 DE54 is ans, 1987 DE54 an).
    Characters {
        /// The version translated into.
        into: Version,
    },
    /// The MTI's version digit is not the version translated from (a 0200 on a
    /// 1993 link).
    MtiVersion,
}

impl fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Untranslatable::NoCounterpart { into } => {
                write!(f, "means something else in {into}; not translated")
            }
            Untranslatable::FunctionCode => {
                f.write_str("function code has no ISO 8583:1987 equivalent for this message")
            }
            Untranslatable::NetworkCode => {
                f.write_str("network management code has no ISO 8583:1993 function code")
            }
            Untranslatable::OriginalData => {
                f.write_str("original data elements are not in the standard layout")
            }
            Untranslatable::Characters { into } => {
                write!(
                    f,
                    "holds a character the field's type in {into} does not allow"
                )
            }
            Untranslatable::MtiVersion => {
                f.write_str("the version digit is not that of the dialect's ISO 8583 version")
            }
        }
    }
}

/// Fields whose meaning and content agree in ISO 8583:1987 and 1993, carried
/// across (converted to the target's length rule and encoding).
pub const CARRIED: [u8; 69] = [
    2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 16, 17, 18, 19, 20, 21, 23, 27, 32, 33, 34, 35, 36, 37, 38,
    40, 41, 42, 44, 45, 47, 48, 49, 50, 51, 52, 54, 55, 60, 61, 62, 63, 64, 67, 68, 69, 73, 74, 75,
    76, 77, 78, 79, 80, 81, 86, 87, 88, 89, 97, 98, 99, 100, 101, 102, 103, 104, 128,
];

const fn carried_table() -> [bool; 129] {
    let mut table = [false; 129];
    let mut i = 0;
    while i < CARRIED.len() {
        table[CARRIED[i] as usize] = true;
        i += 1;
    }
    table
}

const CARRIED_TABLE: [bool; 129] = carried_table();

fn carried(n: u8) -> bool {
    CARRIED_TABLE.get(usize::from(n)).copied().unwrap_or(false)
}

/// 1987 fields translated or deliberately left out (DE24, the NII).
const TRANSLATED_1987: [u8; 6] = [12, 13, 24, 39, 70, 90];
/// 1993 fields translated or deliberately left out (DE25, the message reason code).
const TRANSLATED_1993: [u8; 5] = [12, 24, 25, 39, 56];

/// Most entries an action code table may hold.
pub const ACTION_CODES_MAX: usize = 1000;

/// The shipped table (`config/iso8583/action-codes.toml`).
pub const BUILTIN_ACTION_CODES: &str = include_str!("../../../config/iso8583/action-codes.toml");

const CLASSES: [&str; 9] = [
    "",
    "authorization",
    "financial",
    "file-action",
    "reversal",
    "reconciliation",
    "administrative",
    "fee-collection",
    "network-management",
];

#[derive(Clone, Copy, Debug)]
struct CodePair {
    response: [u8; 2],
    action: [u8; 3],
    /// Bit c set: applies to MTI class c (second digit); 0: every class.
    classes: u16,
}

impl CodePair {
    fn applies(&self, class: u8) -> bool {
        self.classes == 0 || self.classes & (1 << (class.wrapping_sub(b'0') & 15)) != 0
    }
}

/// 1987 response codes ↔ 1993 action codes (DE39), with the rules for codes no
/// entry lists. Read from a TOML file (the shipped one is
/// `config/iso8583/action-codes.toml`, which documents the format).
#[derive(Debug)]
pub struct ActionCodes {
    entries: Vec<CodePair>,
    unlisted_action: [[u8; 2]; 10],
    unlisted_response: [u8; 3],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionCodesFile {
    unlisted: Unlisted,
    #[serde(default)]
    code: Vec<CodeEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Unlisted {
    action: Vec<String>,
    response: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeEntry {
    response: String,
    action: String,
    #[serde(default)]
    classes: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for the reader of the file
    meaning: String,
}

fn response_code(s: &str) -> Option<[u8; 2]> {
    let b: [u8; 2] = s.as_bytes().try_into().ok()?;
    b.iter().all(u8::is_ascii_alphanumeric).then_some(b)
}

fn action_code(s: &str) -> Option<[u8; 3]> {
    let b: [u8; 3] = s.as_bytes().try_into().ok()?;
    b.iter().all(u8::is_ascii_digit).then_some(b)
}

impl ActionCodes {
    /// Parses and checks a table; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<ActionCodes, DialectError> {
        let problem = |entry: usize, problem: String| DialectError::ActionCodes {
            origin: origin.to_owned(),
            entry,
            problem,
        };
        let file: ActionCodesFile =
            toml::from_str(text).map_err(|e| problem(0, e.message().to_owned()))?;
        if file.code.len() > ACTION_CODES_MAX {
            return Err(problem(
                0,
                format!("more than {ACTION_CODES_MAX} [[code]] entries"),
            ));
        }
        let mut unlisted_action = [[0u8; 2]; 10];
        if file.unlisted.action.len() != 10 {
            return Err(problem(
                0,
                "[unlisted] action must list 10 response codes, one per first digit".into(),
            ));
        }
        for (slot, s) in unlisted_action.iter_mut().zip(&file.unlisted.action) {
            *slot = response_code(s).ok_or_else(|| {
                problem(
                    0,
                    format!("[unlisted] action: {s:?} is not a 2-character response code"),
                )
            })?;
        }
        let unlisted_response = action_code(&file.unlisted.response).ok_or_else(|| {
            problem(
                0,
                format!(
                    "[unlisted] response: {:?} is not a 3-digit action code",
                    file.unlisted.response
                ),
            )
        })?;
        let mut entries = Vec::with_capacity(file.code.len());
        for (i, e) in file.code.iter().enumerate() {
            let n = i + 1;
            let response = response_code(&e.response).ok_or_else(|| {
                problem(
                    n,
                    format!("response {:?} is not 2 letters or digits", e.response),
                )
            })?;
            let action = action_code(&e.action)
                .ok_or_else(|| problem(n, format!("action {:?} is not 3 digits", e.action)))?;
            let mut classes = 0u16;
            for c in &e.classes {
                let Some(k) = CLASSES.iter().skip(1).position(|x| x == c) else {
                    return Err(problem(
                        n,
                        format!("class {c:?} is not one of {}", CLASSES[1..].join(", ")),
                    ));
                };
                classes |= 1 << (k + 1);
            }
            entries.push(CodePair {
                response,
                action,
                classes,
            });
        }
        Ok(ActionCodes {
            entries,
            unlisted_action,
            unlisted_response,
        })
    }

    /// The shipped table.
    pub fn builtin() -> Arc<ActionCodes> {
        static BUILTIN: OnceLock<Arc<ActionCodes>> = OnceLock::new();
        BUILTIN
            .get_or_init(
                || match ActionCodes::from_toml(BUILTIN_ACTION_CODES, "action-codes") {
                    Ok(t) => Arc::new(t),
                    // The shipped file is tested to parse; a failure here is a build bug.
                    Err(e) => unreachable!("{e}"),
                },
            )
            .clone()
    }

    /// The 1993 action code for 1987 `response` in a message of MTI class `class`
    /// (the MTI's second digit).
    pub fn to_1993(&self, class: u8, response: &[u8]) -> [u8; 3] {
        self.entries
            .iter()
            .find(|e| e.response == response && e.applies(class))
            .map_or(self.unlisted_response, |e| e.action)
    }

    /// The 1987 response code for 1993 `action` in a message of MTI class `class`.
    pub fn to_1987(&self, class: u8, action: &[u8]) -> [u8; 2] {
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| e.action == action && e.applies(class))
        {
            return e.response;
        }
        let digit = action.first().map_or(9, |d| d.wrapping_sub(b'0'));
        self.unlisted_action[usize::from(digit.min(9))]
    }
}

/// What a 1993 dialect needs to translate.
#[derive(Debug)]
pub(crate) struct Translation {
    /// The same dialect without translation: its wire layout, messages held in
    /// the 1993 form.
    pub(crate) plain: Arc<Dialect>,
    pub(crate) codes: Arc<ActionCodes>,
}

/// The 1987 form 1993 messages are held in: the default profile.
pub(crate) fn held_1987() -> Arc<Dialect> {
    static HELD: OnceLock<Arc<Dialect>> = OnceLock::new();
    HELD.get_or_init(|| Arc::new(Dialect::iso87_ascii()))
        .clone()
}

/// `mti` with version digit `from` changed to `to`, and in network management
/// (x80x, x81x) the last digit by `last` (0800 ↔ 1804: 1993 says the request
/// comes from "other", not the acquirer); other versions unchanged.
fn change_version(mti: Mti, from: u8, to: u8, last: [(u8, u8); 2]) -> Mti {
    let mut b = mti.0;
    if b[0] != from {
        return mti;
    }
    b[0] = to;
    if b[1] == b'8' && matches!(b[2], b'0' | b'1') {
        if let Some(&(_, d)) = last.iter().find(|(d, _)| *d == b[3]) {
            b[3] = d;
        }
    }
    Mti(b)
}

/// The 1993 MTI of 1987 `mti` (0800 → 1804; others change the version digit).
pub fn mti_to_1993(mti: Mti) -> Mti {
    change_version(mti, b'0', b'1', [(b'0', b'4'), (b'1', b'5')])
}

/// The 1987 MTI of 1993 `mti` (1804 → 0800; others change the version digit).
pub fn mti_to_1987(mti: Mti) -> Mti {
    change_version(mti, b'1', b'0', [(b'4', b'0'), (b'5', b'1')])
}

/// 1987 DE70 network management codes ↔ 1993 DE24 function codes in 08xx/18xx.
const NETWORK_CODES: [(&[u8; 3], &[u8; 3]); 3] =
    [(b"001", b"801"), (b"002", b"802"), (b"301", b"831")];

/// A civil date (UTC), for the year of a 1987 date that has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Today {
    /// Year, e.g. 2026.
    pub year: i32,
    /// 1–12.
    pub month: u32,
    /// 1–31.
    pub day: u32,
}

impl Today {
    /// Today's date by the system clock (UTC).
    pub fn now() -> Today {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Today::from_days((secs / 86_400) as i64)
    }

    /// The date `days` after 1970-01-01 (Howard Hinnant's civil_from_days).
    fn from_days(days: i64) -> Today {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Today { year, month, day }
    }

    /// Days since 1970-01-01 of (year, month, day) (days_from_civil).
    fn days(year: i32, month: u32, day: u32) -> i64 {
        let y = i64::from(year) - i64::from(month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The two-digit year of month `mm` day `dd` nearest today (a date in late
    /// December seen on 1 January is last year's).
    pub fn year_of(self, mm: u32, dd: u32) -> [u8; 2] {
        let today = Today::days(self.year, self.month, self.day);
        let year = if (1..=12).contains(&mm) && (1..=31).contains(&dd) {
            (self.year - 1..=self.year + 1)
                .min_by_key(|&y| (Today::days(y, mm, dd) - today).abs())
                .unwrap_or(self.year)
        } else {
            self.year
        };
        let yy = year.rem_euclid(100) as u8;
        [b'0' + yy / 10, b'0' + yy % 10]
    }
}

fn two_digits(b: &[u8]) -> u32 {
    b.iter()
        .take(2)
        .fold(0, |v, &d| v * 10 + u32::from(d.wrapping_sub(b'0') % 10))
}

/// A value built by translation (at most DE56's 35 digits).
struct Built {
    bytes: [u8; 40],
    len: usize,
}

impl Built {
    fn new() -> Built {
        Built {
            bytes: [0; 40],
            len: 0,
        }
    }

    fn push(&mut self, v: &[u8]) -> Option<()> {
        let end = self.len.checked_add(v.len()).filter(|&e| e <= 40)?;
        self.bytes[self.len..end].copy_from_slice(v);
        self.len = end;
        Some(())
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// 1993 DE56 (MTI, STAN, YYMMDDhhmmss, LL + acquirer) as 1987 DE90 (MTI, STAN,
/// MMDDhhmmss, acquirer and forwarding institution right-justified in 11 digits).
fn de56_to_de90(v: &[u8]) -> Option<[u8; 42]> {
    if v.len() < 22 || !v.iter().all(u8::is_ascii_digit) || v[0] != b'1' {
        return None;
    }
    let mut out = [b'0'; 42];
    let mti = mti_to_1987(Mti(v[..4].try_into().ok()?));
    out[..4].copy_from_slice(&mti.0);
    out[4..10].copy_from_slice(&v[4..10]);
    out[10..20].copy_from_slice(&v[12..22]);
    if v.len() > 22 {
        let ll = usize::try_from(two_digits(v.get(22..24)?)).ok()?;
        let acquirer = v.get(24..)?;
        if acquirer.len() != ll || ll > 11 {
            return None;
        }
        out[31 - ll..31].copy_from_slice(acquirer);
    }
    Some(out)
}

/// 1987 DE90 as 1993 DE56; `local` (MMDDhhmmss from the message's own DE13 +
/// DE12, which a reversal copies from its original) is preferred to DE90's
/// transmission date and time, since DE56 names the original's local time.
fn de90_to_de56(de90: &[u8], local: Option<[u8; 10]>, today: Today) -> Option<Built> {
    if de90.len() != 42 || !de90.iter().all(u8::is_ascii_digit) || de90[0] != b'0' {
        return None;
    }
    let mut when = [0u8; 10];
    when.copy_from_slice(&de90[10..20]);
    let when = local.unwrap_or(when);
    let mut out = Built::new();
    out.push(&mti_to_1993(Mti(de90[..4].try_into().ok()?)).0)?;
    out.push(&de90[4..10])?;
    out.push(&today.year_of(two_digits(&when[..2]), two_digits(&when[2..4])))?;
    out.push(&when)?;
    let acquirer = &de90[20..31];
    let skip = acquirer
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(acquirer.len() - 1);
    let acquirer = &acquirer[skip..];
    out.push(&[
        b'0' + (acquirer.len() / 10) as u8,
        b'0' + (acquirer.len() % 10) as u8,
    ])?;
    out.push(acquirer)?;
    Some(out)
}

fn is_response(mti: Mti) -> bool {
    matches!(mti.0[2], b'1' | b'3')
}

/// Whether value `v` (in `from` value encoding) fits the character class of
/// field `n` in dialect `to` (binary fields: any byte).
fn allowed(to: &Dialect, n: u8, v: &[u8], from: Encoding) -> bool {
    match to.canonical().field(n) {
        Some(spec) if spec.ty != crate::dialect::FieldType::B && from != Encoding::Hex => {
            spec.ty.first_invalid(v).is_none()
        }
        _ => true,
    }
}

fn value_encoding(d: &Dialect, n: u8) -> Encoding {
    d.canonical()
        .field(n)
        .map_or(Encoding::Ascii, |s| s.encoding.value())
}

/// Appends the 1987 form of `m` (decoded under `t.plain`, a partial message when
/// its decoding failed) to `out`, in [`held_1987`]'s layout. On error the form
/// holds every field that did translate (for an answer echoing DE11).
pub(crate) fn to_1987(m: &Message, t: &Translation, out: &mut BytesMut) -> Result<(), DecodeError> {
    let mti93 = m.mti();
    let (class, request) = (mti93.0[1], !is_response(mti93));
    let mut first: Option<DecodeError> = None;
    let mut fail = |n: u8, kind: Untranslatable| {
        if first.is_none() {
            first = Some(DecodeError {
                location: if n == 0 {
                    Location::Mti
                } else {
                    Location::Field(n)
                },
                offset: m.span(n).map_or(0, |s| usize::from(s.start)),
                kind: DecodeErrorKind::Untranslatable(kind),
            });
        }
    };
    // "0000" stands for an MTI that did not decode (its error comes first).
    if mti93.0[0] != b'1' && mti93.0 != *b"0000" {
        fail(0, Untranslatable::MtiVersion);
    }
    for (n, _) in m.fields() {
        if n > 1 && request && !carried(n) && !TRANSLATED_1993.contains(&n) {
            fail(
                n,
                Untranslatable::NoCounterpart {
                    into: Version::Iso1987,
                },
            );
        }
    }
    let function = m.field(24);
    let network = match (class, function) {
        (b'8', Some(f)) => match NETWORK_CODES.iter().find(|(_, f93)| &f93[..] == f) {
            Some((c87, _)) => Some(*c87),
            None => {
                if request {
                    fail(24, Untranslatable::FunctionCode);
                }
                None
            }
        },
        (b'4', Some(f)) if f != b"400" && request => {
            // A partial reversal (401) has no 1987 form without DE95.
            fail(24, Untranslatable::FunctionCode);
            None
        }
        _ => None,
    };
    // A message naming its original (DE56) carries the original's local date
    // and time in DE12/DE13, as 1987 reversals do: DE56's is taken, so the way
    // back (`to_1993`, which writes DE56's from DE13 + DE12) gives it unchanged.
    let original = m.field(56).filter(|v| de56_to_de90(v).is_some());
    let local = original.map(|v| &v[10..22]).or(m.field(12));
    let held = held_1987();
    let plain = &*t.plain;
    let mut enc = Encoder::new(&held, out, mti_to_1987(mti93));
    for n in 2..=128u8 {
        let result = match n {
            12 => match local {
                Some(v) if v.len() == 12 => enc.field(12, &v[6..12]),
                _ => Ok(()),
            },
            13 => match local {
                Some(v) if v.len() == 12 => enc.field(13, &v[2..6]),
                _ => Ok(()),
            },
            39 => match m.field(39) {
                Some(a) => enc.field(39, &t.codes.to_1987(class, a)),
                None => Ok(()),
            },
            70 => match network {
                Some(c) => enc.field(70, c),
                None => Ok(()),
            },
            90 => match m.field(56) {
                Some(v) => match de56_to_de90(v) {
                    Some(de90) => enc.field(90, &de90),
                    None => {
                        fail(56, Untranslatable::OriginalData);
                        Ok(())
                    }
                },
                None => Ok(()),
            },
            n if carried(n) => match m.field(n) {
                Some(v) if !allowed(&held, n, v, value_encoding(plain, n)) => {
                    if request {
                        fail(
                            n,
                            Untranslatable::Characters {
                                into: Version::Iso1987,
                            },
                        );
                    }
                    Ok(()) // an answer loses the field
                }
                Some(v) => enc.field_converted(n, v, value_encoding(plain, n)),
                None => Ok(()),
            },
            _ => Ok(()),
        };
        if let (Err(e), true) = (result, request) {
            // A carried value outside the 1987 length rule (a 1993 DE44 of 99);
            // an answer loses the field.
            fail(
                e.field,
                Untranslatable::NoCounterpart {
                    into: Version::Iso1987,
                },
            );
        }
    }
    enc.finish();
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Appends the 1993 wire form (under `t.plain`) of `m`, a message in the 1987
/// form, to `out`; returns its length.
pub(crate) fn to_1993(
    m: &Message,
    t: &Translation,
    today: Today,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let mti87 = m.mti();
    let (class, request) = (mti87.0[1], !is_response(mti87));
    let untranslatable = |field, kind| EncodeError {
        field,
        kind: EncodeErrorKind::Untranslatable(kind),
    };
    if mti87.0[0] != b'0' {
        return Err(untranslatable(0, Untranslatable::MtiVersion));
    }
    if request {
        if let Some((n, _)) = m
            .fields()
            .find(|&(n, _)| n > 1 && !carried(n) && !TRANSLATED_1987.contains(&n))
        {
            return Err(untranslatable(
                n,
                Untranslatable::NoCounterpart {
                    into: Version::Iso1993,
                },
            ));
        }
    }
    let function: Option<&[u8; 3]> = match class {
        b'8' => match m.field(70) {
            Some(c) => match NETWORK_CODES.iter().find(|(c87, _)| &c87[..] == c) {
                Some((_, f)) => Some(f),
                None if request => return Err(untranslatable(70, Untranslatable::NetworkCode)),
                None => None,
            },
            None => None,
        },
        b'1' if request => Some(b"100"),
        b'2' if request => Some(b"200"),
        b'4' if request => Some(b"400"),
        _ => None,
    };
    let local = match (m.field(13), m.field(12)) {
        (Some(d), Some(t)) if d.len() == 4 && t.len() == 6 => {
            let mut v = [0u8; 10];
            v[..4].copy_from_slice(d);
            v[4..].copy_from_slice(t);
            Some(v)
        }
        _ => None,
    };
    let held = held_1987();
    let start = out.len();
    let result = (|| {
        let mut enc = Encoder::new(&t.plain, out, mti_to_1993(mti87));
        for n in 2..=128u8 {
            match n {
                12 => {
                    if let Some(time) = m.field(12).filter(|v| v.len() == 6) {
                        let date = m
                            .field(13)
                            .filter(|v| v.len() == 4)
                            .or_else(|| m.field(7).filter(|v| v.len() == 10).map(|v| &v[..4]));
                        let mut v = [0u8; 12];
                        match date {
                            Some(d) => v[2..6].copy_from_slice(d),
                            None => {
                                let (mm, dd) = (today.month, today.day);
                                v[2..6].copy_from_slice(&[
                                    b'0' + (mm / 10) as u8,
                                    b'0' + (mm % 10) as u8,
                                    b'0' + (dd / 10) as u8,
                                    b'0' + (dd % 10) as u8,
                                ]);
                            }
                        }
                        let yy = today.year_of(two_digits(&v[2..4]), two_digits(&v[4..6]));
                        v[..2].copy_from_slice(&yy);
                        v[6..].copy_from_slice(time);
                        enc.field(12, &v)?;
                    }
                }
                24 => {
                    if let Some(f) = function {
                        enc.field(24, f)?;
                    }
                }
                39 => {
                    if let Some(r) = m.field(39) {
                        enc.field(39, &t.codes.to_1993(class, r))?;
                    }
                }
                56 => {
                    if let Some(de90) = m.field(90) {
                        let Some(de56) = de90_to_de56(de90, local, today) else {
                            return Err(untranslatable(90, Untranslatable::OriginalData));
                        };
                        enc.field(56, de56.as_slice())?;
                    }
                }
                n if carried(n) => {
                    if let Some(v) = m.field(n) {
                        let from = value_encoding(&held, n);
                        let fits = allowed(&t.plain, n, v, from);
                        if !fits && request {
                            let into = Version::Iso1993;
                            return Err(untranslatable(n, Untranslatable::Characters { into }));
                        }
                        // An answer loses a field that does not fit.
                        if fits {
                            match enc.field_converted(n, v, from) {
                                Err(e) if request => return Err(e),
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        match enc.finish() {
            0 => Err(EncodeError {
                field: 0,
                kind: EncodeErrorKind::Malformed,
            }),
            len => Ok(len),
        }
    })();
    if result.is_err() {
        out.truncate(start);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_and_maps_the_switch_codes() {
        let t = ActionCodes::builtin();
        for (r, a) in [
            (b"00", b"000"),
            (b"12", b"902"),
            (b"13", b"110"),
            (b"25", b"914"),
            (b"30", b"904"),
            (b"51", b"116"),
            (b"58", b"120"),
            (b"63", b"122"),
            (b"65", b"123"),
            (b"68", b"911"),
            (b"81", b"126"),
            (b"91", b"907"),
            (b"92", b"908"),
            (b"94", b"913"),
            (b"96", b"909"),
        ] {
            assert_eq!(&t.to_1993(b'2', r), a, "{}", String::from_utf8_lossy(r));
            assert_eq!(&t.to_1987(b'2', a), r, "{}", String::from_utf8_lossy(a));
        }
        assert_eq!(&t.to_1993(b'4', b"00"), b"400");
        assert_eq!(&t.to_1993(b'8', b"00"), b"800");
        assert_eq!(&t.to_1987(b'4', b"400"), b"00");
        assert_eq!(&t.to_1987(b'2', b"912"), b"91");
        // Unlisted: by first digit, and "do not honour".
        assert_eq!(&t.to_1987(b'2', b"199"), b"05");
        assert_eq!(&t.to_1987(b'2', b"999"), b"96");
        assert_eq!(&t.to_1993(b'2', b"Z9"), b"100");
    }

    #[test]
    fn a_bad_table_is_refused_naming_the_entry() {
        let text = "[unlisted]\naction = [\"00\",\"05\",\"04\",\"00\",\"00\",\"00\",\"00\",\"00\",\"00\",\"96\"]\nresponse = \"100\"\n[[code]]\nresponse = \"00\"\naction = \"000\"\n[[code]]\nresponse = \"05\"\naction = \"1x0\"\n";
        let e = ActionCodes::from_toml(text, "t").unwrap_err().to_string();
        assert!(e.contains("entry 2") && e.contains("1x0"), "{e}");
        let e = ActionCodes::from_toml(
            &text.replace("\"000\"", "\"000\"\nclasses = [\"cash\"]"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cash"), "{e}");
    }

    #[test]
    fn mtis_map_both_ways() {
        for (a, b) in [
            (b"0200", b"1200"),
            (b"0210", b"1210"),
            (b"0420", b"1420"),
            (b"0421", b"1421"),
            (b"0430", b"1430"),
            (b"0800", b"1804"),
            (b"0810", b"1814"),
            (b"0801", b"1805"),
            (b"0820", b"1820"),
        ] {
            assert_eq!(mti_to_1993(Mti(*a)), Mti(*b));
            assert_eq!(mti_to_1987(Mti(*b)), Mti(*a));
        }
    }

    #[test]
    fn the_year_is_the_nearest() {
        let new_year = Today {
            year: 2027,
            month: 1,
            day: 1,
        };
        assert_eq!(&new_year.year_of(12, 31), b"26");
        assert_eq!(&new_year.year_of(1, 2), b"27");
        let autumn = Today {
            year: 2026,
            month: 11,
            day: 30,
        };
        assert_eq!(&autumn.year_of(1, 3), b"27");
        assert_eq!(&autumn.year_of(6, 1), b"26");
        assert_eq!(Today::from_days(Today::days(2026, 11, 30)), autumn);
        assert_eq!(
            Today::from_days(0),
            Today {
                year: 1970,
                month: 1,
                day: 1
            }
        );
    }

    #[test]
    fn original_data_elements_map_both_ways() {
        let de56 = b"120000004226113012000006100001";
        let de90 = de56_to_de90(de56).unwrap();
        assert_eq!(&de90[..], b"020000004211301200000000010000100000000000");
        let today = Today {
            year: 2026,
            month: 11,
            day: 30,
        };
        let back = de90_to_de56(&de90, None, today).unwrap();
        assert_eq!(back.as_slice(), &de56[..]);
        assert!(
            de56_to_de90(b"1200000042261130120000071000").is_none(),
            "LL 07, 4 digits"
        );
    }
}
