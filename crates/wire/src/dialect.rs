//! Dialects: which fields exist, their types, length kinds, bounds and encodings.

pub use crate::ebcdic::CodePage;
pub use crate::tlv::Tlv;
use serde::Deserialize;
use std::fmt;
use std::path::Path;

use crate::version::{held_1987, ActionCodes, Translation, Version};

/// Character class of a field (ISO 8583 "n", "an", "ans", …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum FieldType {
    /// Numeric digits `0-9`.
    #[serde(rename = "n")]
    N,
    /// Alphabetic (letters and space).
    #[serde(rename = "a")]
    A,
    /// Alphanumeric (letters, digits and space padding).
    #[serde(rename = "an")]
    An,
    /// Alphanumeric and special characters (printable).
    #[serde(rename = "ans")]
    Ans,
    /// Alphabetic and special characters (printable).
    #[serde(rename = "as")]
    As,
    /// Numeric and special characters (printable).
    #[serde(rename = "ns")]
    Ns,
    /// Alphanumeric and pad characters (printable).
    #[serde(rename = "anp")]
    Anp,
    /// Binary data.
    #[serde(rename = "b")]
    B,
    /// Track 2/3 data: digits and the separators `=`, `D`, `;`, `?`, `F`.
    #[serde(rename = "z")]
    Z,
    /// `C` (credit) or `D` (debit) followed by digits.
    #[serde(rename = "x+n")]
    XN,
}

/// Character class bits per byte value, for validating a field in one pass.
const CLASS_N: u8 = 1;
const CLASS_A: u8 = 2;
const CLASS_AN: u8 = 4;
const CLASS_PRINT: u8 = 8;
const CLASS_Z: u8 = 16;

static CLASSES: [u8; 256] = classes();

const fn classes() -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut bits = 0;
        if b.is_ascii_digit() {
            bits |= CLASS_N | CLASS_AN | CLASS_Z;
        }
        if b.is_ascii_alphabetic() || b == b' ' {
            bits |= CLASS_A | CLASS_AN;
        }
        if (b >= 0x20 && b <= 0x7e) || b >= 0xa0 {
            bits |= CLASS_PRINT;
        }
        if matches!(b, b'=' | b'D' | b';' | b'?' | b'F') {
            bits |= CLASS_Z;
        }
        table[i] = bits;
        i += 1;
    }
    table
}

impl FieldType {
    /// Offset of the first byte of `value` this type does not allow, if any.
    #[inline]
    pub fn first_invalid(self, value: &[u8]) -> Option<usize> {
        let (mask, rest) = match self {
            FieldType::N => (CLASS_N, value),
            FieldType::A => (CLASS_A, value),
            FieldType::An => (CLASS_AN, value),
            FieldType::Ans | FieldType::As | FieldType::Ns | FieldType::Anp => (CLASS_PRINT, value),
            FieldType::B => return None,
            FieldType::Z => (CLASS_Z, value),
            FieldType::XN => match value.split_first() {
                None => return None,
                Some((b'C' | b'D', rest)) => {
                    let at = rest
                        .iter()
                        .position(|&b| CLASSES[usize::from(b)] & CLASS_N == 0);
                    return at.map(|i| i + 1);
                }
                Some(_) => return Some(0),
            },
        };
        rest.iter()
            .position(|&b| CLASSES[usize::from(b)] & mask == 0)
    }

    /// Whether `byte` at `index` within the field value is allowed.
    #[inline]
    pub fn allows(self, index: usize, byte: u8) -> bool {
        match self {
            FieldType::N => byte.is_ascii_digit(),
            FieldType::A => byte.is_ascii_alphabetic() || byte == b' ',
            FieldType::An => byte.is_ascii_alphanumeric() || byte == b' ',
            FieldType::Ans | FieldType::As | FieldType::Ns | FieldType::Anp => {
                (0x20..=0x7e).contains(&byte) || byte >= 0xa0
            }
            FieldType::B => true,
            FieldType::Z => {
                byte.is_ascii_digit() || matches!(byte, b'=' | b'D' | b';' | b'?' | b'F')
            }
            FieldType::XN => {
                if index == 0 {
                    matches!(byte, b'C' | b'D')
                } else {
                    byte.is_ascii_digit()
                }
            }
        }
    }

    /// Short description used in error messages ("digits", "printable", …).
    pub fn expected(self) -> &'static str {
        match self {
            FieldType::N => "digits 0-9 (n)",
            FieldType::A => "letters (a)",
            FieldType::An => "letters, digits or space (an)",
            FieldType::Ans | FieldType::As | FieldType::Ns | FieldType::Anp => {
                "printable characters (ans)"
            }
            FieldType::B => "binary",
            FieldType::Z => "track data digits or separators (z)",
            FieldType::XN => "C or D then digits (x+n)",
        }
    }
}

/// How the length of a field is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthKind {
    /// Exactly `max` units.
    Fixed,
    /// Two-digit length prefix, up to `max` (≤ 99) units.
    LlVar,
    /// Three-digit length prefix, up to `max` (≤ 999) units.
    LllVar,
}

impl LengthKind {
    /// Digits in the length prefix.
    pub fn prefix_digits(self) -> usize {
        match self {
            LengthKind::Fixed => 0,
            LengthKind::LlVar => 2,
            LengthKind::LllVar => 3,
        }
    }
}

/// How a field's value units are written on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// One ASCII character per unit.
    Ascii,
    /// One raw byte per unit (binary fields).
    Binary,
    /// Two ASCII hex characters per byte (binary fields in hex dialects).
    Hex,
    /// Packed BCD: two digits per byte (numeric and track fields); an odd count
    /// is padded with one nibble (the dialect's `bcd_pad` side and
    /// `bcd_filler`).
    Bcd,
    /// One EBCDIC character per unit, in the dialect's `code_page`.
    Ebcdic,
}

impl Encoding {
    /// Wire bytes taken by `units` value units.
    #[inline]
    pub fn wire_len(self, units: usize) -> usize {
        match self {
            Encoding::Hex => units * 2,
            Encoding::Bcd => units.div_ceil(2),
            Encoding::Ascii | Encoding::Binary | Encoding::Ebcdic => units,
        }
    }

    /// How a decoded [`Message`](crate::Message) holds the value: text read from
    /// BCD or EBCDIC is held as ASCII (Latin-1); binary and hex stay as they are.
    #[inline]
    pub fn value(self) -> Encoding {
        match self {
            Encoding::Bcd | Encoding::Ebcdic => Encoding::Ascii,
            e => e,
        }
    }
}

/// How the message type indicator is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtiEncoding {
    /// Four ASCII digits.
    Ascii,
    /// Two bytes of packed BCD (`0x02 0x00` for 0200).
    Bcd,
    /// Four EBCDIC digits.
    Ebcdic,
}

impl MtiEncoding {
    /// Wire bytes of the MTI.
    pub fn wire_len(self) -> usize {
        match self {
            MtiEncoding::Bcd => 2,
            MtiEncoding::Ascii | MtiEncoding::Ebcdic => 4,
        }
    }
}

/// How a variable field's length prefix is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefixEncoding {
    /// ASCII digits: 2 for LLVAR, 3 for LLLVAR.
    Ascii,
    /// Packed BCD: 1 byte for LLVAR (`0x19`), 2 bytes for LLLVAR (`0x01 0x23`).
    Bcd,
    /// Unsigned big-endian binary: 1 byte for LLVAR, 2 bytes for LLLVAR.
    Binary,
    /// EBCDIC digits: 2 for LLVAR, 3 for LLLVAR.
    Ebcdic,
}

impl PrefixEncoding {
    /// Wire bytes of a prefix of this kind.
    pub fn wire_len(self, kind: LengthKind) -> usize {
        match (self, kind) {
            (_, LengthKind::Fixed) => 0,
            (PrefixEncoding::Ascii | PrefixEncoding::Ebcdic, k) => k.prefix_digits(),
            (PrefixEncoding::Bcd | PrefixEncoding::Binary, LengthKind::LlVar) => 1,
            (PrefixEncoding::Bcd | PrefixEncoding::Binary, LengthKind::LllVar) => 2,
        }
    }
}

/// What a BCD field's length prefix counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthCounts {
    /// Digits (nibbles): a 19-digit PAN has length 19 in 10 bytes.
    Digits,
    /// Bytes: the same PAN has length 10; with filler `F` a pad nibble is not a
    /// digit, with filler `0` it is read as one.
    Bytes,
}

/// Which side of an odd-length BCD value carries the pad nibble.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PadSide {
    /// `123` is `0x01 0x23` (with filler 0).
    Left,
    /// `123` is `0x12 0x30` (with filler 0).
    Right,
}

/// The pad nibble of odd-length BCD values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum Filler {
    /// Nibble 0.
    #[serde(rename = "0")]
    Zero,
    /// Nibble F.
    #[serde(rename = "F", alias = "f")]
    F,
}

impl Filler {
    /// The nibble's value.
    pub fn nibble(self) -> u8 {
        match self {
            Filler::Zero => 0,
            Filler::F => 0xf,
        }
    }
}

/// A field's wire details beyond its value encoding, resolved from the field's
/// own settings and the dialect's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FieldWire {
    /// How the length prefix is written.
    pub prefix: PrefixEncoding,
    /// What the prefix counts (BCD fields).
    pub counts: LengthCounts,
    /// Pad side of odd BCD values.
    pub pad: PadSide,
    /// Pad nibble of odd BCD values.
    pub filler: Filler,
}

impl FieldWire {
    const ASCII: FieldWire = FieldWire {
        prefix: PrefixEncoding::Ascii,
        counts: LengthCounts::Digits,
        pad: PadSide::Left,
        filler: Filler::Zero,
    };
}

/// How the primary and secondary bitmaps are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BitmapEncoding {
    /// 8 raw bytes per bitmap.
    Binary,
    /// 16 ASCII hex characters per bitmap.
    Hex,
    /// 16 EBCDIC hex characters per bitmap (`0`-`9` are 0xF0-0xF9, `A`-`F`
    /// 0xC1-0xC6).
    #[serde(rename = "hex-ebcdic")]
    HexEbcdic,
}

impl BitmapEncoding {
    /// Wire bytes of one 64-bit bitmap.
    pub fn wire_len(self) -> usize {
        match self {
            BitmapEncoding::Binary => 8,
            BitmapEncoding::Hex | BitmapEncoding::HexEbcdic => 16,
        }
    }
}

/// One field of a dialect.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// Field number, 1..=128 (1 is the secondary bitmap).
    pub number: u8,
    /// Human name, for documentation and errors.
    pub name: String,
    /// Character class.
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Fixed or variable length.
    pub length: LengthKind,
    /// Fixed: the exact length; variable: the maximum. Characters, or bytes for `b`.
    pub max: u16,
    /// Wire encoding of the value.
    pub encoding: Encoding,
    /// Length prefix encoding of this field, if not the dialect's.
    #[serde(default)]
    pub length_prefix_encoding: Option<PrefixEncoding>,
    /// What a BCD field's prefix counts, if not the dialect's.
    #[serde(default)]
    pub length_counts: Option<LengthCounts>,
    /// Pad side of odd BCD values, if not the dialect's.
    #[serde(default)]
    pub bcd_pad: Option<PadSide>,
    /// Pad nibble of odd BCD values, if not the dialect's.
    #[serde(default)]
    pub bcd_filler: Option<Filler>,
    /// The value's structure, checked on decode (`"ber"`: BER-TLV, on binary
    /// fields; `"tagN-lenM"`: ASCII tags and lengths, on text fields).
    #[serde(default)]
    pub tlv: Option<Tlv>,
}

/// A dialect as a file states it (TOML, or built from a jPOS packager).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DialectFile {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) description: String,
    pub(crate) mti_encoding: MtiEncoding,
    pub(crate) bitmap_encoding: BitmapEncoding,
    pub(crate) length_prefix_encoding: PrefixEncoding,
    /// Required when anything is EBCDIC.
    #[serde(default)]
    pub(crate) code_page: Option<CodePage>,
    #[serde(default)]
    pub(crate) length_counts: Option<LengthCounts>,
    #[serde(default)]
    pub(crate) bcd_pad: Option<PadSide>,
    #[serde(default)]
    pub(crate) bcd_filler: Option<Filler>,
    /// Whether a tertiary bitmap (fields 129..=192) follows the secondary one
    /// when bit 65 is set; field 65 is then that bitmap. Default false.
    #[serde(default)]
    pub(crate) tertiary_bitmap: Option<bool>,
    /// `"1987"` (the default) or `"1993"` (translated at the edge).
    #[serde(default)]
    pub(crate) version: Option<Version>,
    /// For a 1993 dialect: the DE39 table (a path, relative to the dialect
    /// file's directory); default the shipped `action-codes.toml`.
    #[serde(default)]
    pub(crate) action_codes: Option<String>,
    pub(crate) field: Vec<FieldSpec>,
}

/// Why a dialect file was refused.
#[derive(Debug, thiserror::Error)]
pub enum DialectError {
    /// The file could not be read.
    #[error("dialect {origin}: cannot read: {source}")]
    Io {
        /// Path or name of the dialect.
        origin: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML or not the dialect schema.
    #[error("dialect {origin}: {source}")]
    Toml {
        /// Path or name of the dialect.
        origin: String,
        /// The parse error (names the key and line).
        source: Box<toml::de::Error>,
    },
    /// A field definition is inconsistent.
    #[error("dialect {origin}: field {field}: {problem}")]
    Field {
        /// Path or name of the dialect.
        origin: String,
        /// The field number.
        field: u16,
        /// What is wrong.
        problem: &'static str,
    },
    /// A jPOS packager file that is not XML, or uses a class or attribute that
    /// does not map.
    #[error("dialect {origin}: line {line}: {problem}")]
    Xml {
        /// Path or name of the dialect.
        origin: String,
        /// 1-based line of the element (0: the document as a whole).
        line: u32,
        /// What is wrong.
        problem: String,
    },
    /// A 1993 dialect's action code table is malformed.
    #[error("action code table {origin}: entry {entry}: {problem}")]
    ActionCodes {
        /// Path or name of the table.
        origin: String,
        /// 1-based `[[code]]` entry (0: the table as a whole).
        entry: usize,
        /// What is wrong.
        problem: String,
    },
    /// A dialect-wide setting is inconsistent.
    #[error("dialect {origin}: {problem}")]
    Layout {
        /// Path or name of the dialect.
        origin: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Largest dialect file read, bytes.
pub const DIALECT_FILE_SIZE_MAX_BYTES: u64 = 1 << 20;

/// A message profile: the definition of every field.
#[derive(Clone, Debug)]
pub struct Dialect {
    fingerprint: u64,
    name: String,
    description: String,
    mti: MtiEncoding,
    bitmap: BitmapEncoding,
    code_page: Option<CodePage>,
    /// Indexed by field number; index 0 unused.
    fields: Vec<Option<FieldSpec>>,
    /// Each field's resolved wire details, indexed like `fields`.
    wire: Vec<FieldWire>,
    /// For a dialect whose wire form is not the form messages are held in (BCD,
    /// EBCDIC, non-ASCII MTI or length prefixes): the same fields with ASCII
    /// text, ASCII prefixes, an ASCII MTI and binary bitmaps. Decoding converts
    /// into it and encoding out of it (`transcode`); `None`: the dialect is its
    /// own canonical form and messages are used as they arrive.
    canonical: Option<std::sync::Arc<Dialect>>,
    /// The ISO 8583 version the dialect speaks.
    version: Version,
    /// Whether field 65 is a tertiary bitmap announcing fields 129..=192.
    tertiary: bool,
    /// For a 1993 dialect: how it is translated to the 1987 form it is held in
    /// (then `canonical` is that form: `iso87-ascii`).
    translation: Option<std::sync::Arc<Translation>>,
}

/// Dialects compiled into the binary: (name, TOML text).
pub const BUILTIN_DIALECTS: &[(&str, &str)] = &[
    (
        "iso87-ascii",
        include_str!("../../../config/iso8583/iso87-ascii.toml"),
    ),
    (
        "iso87-hexbitmap",
        include_str!("../../../config/iso8583/iso87-hexbitmap.toml"),
    ),
    (
        "iso87-binary",
        include_str!("../../../config/iso8583/iso87-binary.toml"),
    ),
    (
        "iso87-ebcdic",
        include_str!("../../../config/iso8583/iso87-ebcdic.toml"),
    ),
    (
        "iso93-ascii",
        include_str!("../../../config/iso8583/iso93-ascii.toml"),
    ),
    (
        "iso93-binary",
        include_str!("../../../config/iso8583/iso93-binary.toml"),
    ),
];

impl Dialect {
    /// Parses and checks a dialect from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Dialect, DialectError> {
        let file: DialectFile = toml::from_str(text).map_err(|e| DialectError::Toml {
            origin: origin.to_owned(),
            source: Box::new(e),
        })?;
        Dialect::from_file(file, origin)
    }

    /// Reads a jPOS GenericPackager XML file's text as a dialect (the classes it
    /// maps: README, "jPOS packager files"); `origin` names it in errors.
    pub fn from_jpos_xml(text: &str, origin: &str) -> Result<Dialect, DialectError> {
        Dialect::from_file(crate::jpos::read(text, origin)?, origin)
    }

    pub(crate) fn from_file(file: DialectFile, origin: &str) -> Result<Dialect, DialectError> {
        let tertiary = file.tertiary_bitmap.unwrap_or(false);
        let mut fields: Vec<Option<FieldSpec>> = vec![None; 193];
        let layout = |problem| DialectError::Layout {
            origin: origin.to_owned(),
            problem,
        };
        let defaults = FieldWire {
            prefix: file.length_prefix_encoding,
            counts: file.length_counts.unwrap_or(LengthCounts::Digits),
            pad: file.bcd_pad.unwrap_or(PadSide::Left),
            filler: file.bcd_filler.unwrap_or(Filler::Zero),
        };
        let mut wire = vec![defaults; 193];
        let mut ebcdic = file.mti_encoding == MtiEncoding::Ebcdic
            || file.bitmap_encoding == BitmapEncoding::HexEbcdic
            || file.length_prefix_encoding == PrefixEncoding::Ebcdic;
        for spec in file.field {
            let problem = check_spec(&spec, file.bitmap_encoding, tertiary);
            let number = spec.number;
            if let Some(problem) = problem {
                return Err(DialectError::Field {
                    origin: origin.to_owned(),
                    field: u16::from(number),
                    problem,
                });
            }
            let slot = &mut fields[usize::from(number)];
            if slot.is_some() {
                return Err(DialectError::Field {
                    origin: origin.to_owned(),
                    field: u16::from(number),
                    problem: "defined twice",
                });
            }
            let w = &mut wire[usize::from(number)];
            w.prefix = spec.length_prefix_encoding.unwrap_or(w.prefix);
            w.counts = spec.length_counts.unwrap_or(w.counts);
            w.pad = spec.bcd_pad.unwrap_or(w.pad);
            w.filler = spec.bcd_filler.unwrap_or(w.filler);
            ebcdic |= spec.encoding == Encoding::Ebcdic
                || (spec.length != LengthKind::Fixed && w.prefix == PrefixEncoding::Ebcdic);
            *slot = Some(spec);
        }
        if ebcdic && file.code_page.is_none() {
            return Err(layout(
                "code_page (cp037, cp500 or cp1047) is required when anything is EBCDIC",
            ));
        }
        let mut d = Dialect {
            fingerprint: 0,
            name: file.name,
            description: file.description,
            mti: file.mti_encoding,
            bitmap: file.bitmap_encoding,
            code_page: file.code_page,
            fields,
            wire,
            canonical: None,
            version: file.version.unwrap_or_default(),
            tertiary,
            translation: None,
        };
        if d.needs_transcoding() {
            d.canonical = Some(std::sync::Arc::new(d.canonical_twin()));
        }
        d.fingerprint = d.layout_hash();
        match (d.version, file.action_codes) {
            (Version::Iso1987, Some(_)) => {
                return Err(layout("action_codes applies to version = \"1993\" only"))
            }
            (Version::Iso1987, None) => {}
            (Version::Iso1993, table) => {
                let codes = match table {
                    None => ActionCodes::builtin(),
                    Some(path) => {
                        let base = Path::new(origin).parent().unwrap_or(Path::new(""));
                        let path = base.join(path);
                        let origin = path.display().to_string();
                        let text = read_bounded(&path).map_err(|source| DialectError::Io {
                            origin: origin.clone(),
                            source,
                        })?;
                        std::sync::Arc::new(ActionCodes::from_toml(&text, &origin)?)
                    }
                };
                let plain = std::sync::Arc::new(d.clone());
                d.translation = Some(std::sync::Arc::new(Translation { plain, codes }));
                d.canonical = Some(held_1987());
                d.fingerprint = d.layout_hash();
            }
        }
        Ok(d)
    }

    /// Whether a tertiary bitmap (field 65) announces fields 129..=192.
    #[inline]
    pub fn tertiary_bitmap(&self) -> bool {
        self.tertiary
    }

    /// The ISO 8583 version this dialect speaks.
    pub fn version(&self) -> Version {
        self.version
    }

    /// How a 1993 dialect is translated (`None` for 1987).
    #[inline]
    pub(crate) fn translation(&self) -> Option<&Translation> {
        self.translation.as_deref()
    }

    /// This dialect as it is on the wire, without the 1993 → 1987 translation:
    /// messages decode to, and encode from, the 1993 fields (the codec's tests
    /// and tools that show a 1993 message as it is). Itself for a 1987 dialect.
    pub fn untranslated(&self) -> Dialect {
        match &self.translation {
            Some(t) => (*t.plain).clone(),
            None => self.clone(),
        }
    }

    /// Whether the wire form differs from the form messages are held in.
    fn needs_transcoding(&self) -> bool {
        self.mti != MtiEncoding::Ascii
            || self.bitmap == BitmapEncoding::HexEbcdic
            || self.fields.iter().zip(&self.wire).any(|(f, w)| {
                f.as_ref().is_some_and(|f| {
                    matches!(f.encoding, Encoding::Bcd | Encoding::Ebcdic)
                        || (f.length != LengthKind::Fixed && w.prefix != PrefixEncoding::Ascii)
                })
            })
    }

    /// The same fields held as ASCII text with ASCII prefixes, an ASCII MTI and
    /// binary bitmaps.
    fn canonical_twin(&self) -> Dialect {
        let fields = self
            .fields
            .iter()
            .map(|f| {
                f.as_ref().map(|f| {
                    let mut f = f.clone();
                    f.encoding = if f.number == 1 {
                        Encoding::Binary
                    } else {
                        f.encoding.value()
                    };
                    f.length_prefix_encoding = None;
                    f.length_counts = None;
                    f.bcd_pad = None;
                    f.bcd_filler = None;
                    f
                })
            })
            .collect();
        let mut twin = Dialect {
            fingerprint: 0,
            name: self.name.clone(),
            description: self.description.clone(),
            mti: MtiEncoding::Ascii,
            bitmap: BitmapEncoding::Binary,
            code_page: None,
            fields,
            wire: vec![FieldWire::ASCII; 193],
            canonical: None,
            version: self.version,
            tertiary: self.tertiary,
            translation: None,
        };
        twin.fingerprint = twin.layout_hash();
        twin
    }

    /// The form messages of this dialect are held in once decoded (itself for
    /// ASCII dialects): [`Message`](crate::Message) values, journal records
    /// and re-encoding all use it.
    #[inline]
    pub fn canonical(&self) -> &Dialect {
        self.canonical.as_deref().unwrap_or(self)
    }

    /// Whether decoding and encoding convert between the wire and
    /// [`Dialect::canonical`] (one copy of the message each way).
    #[inline]
    pub fn is_transcoded(&self) -> bool {
        self.canonical.is_some()
    }

    /// How the MTI is written.
    pub fn mti_encoding(&self) -> MtiEncoding {
        self.mti
    }

    /// The EBCDIC code page, when anything is EBCDIC.
    pub fn code_page(&self) -> Option<CodePage> {
        self.code_page
    }

    /// Field `number`'s resolved length prefix and BCD details.
    #[inline]
    pub fn field_wire(&self, number: u8) -> FieldWire {
        self.wire
            .get(usize::from(number))
            .copied()
            .unwrap_or(FieldWire::ASCII)
    }

    /// A dialect shipped with switchyard, by name (`iso87-ascii`, `iso87-hexbitmap`,
    /// `iso87-binary`, `iso87-ebcdic`).
    pub fn builtin(name: &str) -> Option<Dialect> {
        let (_, text) = BUILTIN_DIALECTS.iter().find(|(n, _)| *n == name)?;
        // The built-in files are tested to parse; a failure here is a build bug.
        Dialect::from_toml(text, name).ok()
    }

    /// A built-in dialect by name, else a file at that path (a regular file of at
    /// most [`DIALECT_FILE_SIZE_MAX_BYTES`]): a jPOS GenericPackager when its name
    /// ends in `.xml`, else TOML.
    pub fn load(name_or_path: &str) -> Result<Dialect, DialectError> {
        if let Some(d) = Dialect::builtin(name_or_path) {
            return Ok(d);
        }
        let text = read_bounded(Path::new(name_or_path)).map_err(|source| DialectError::Io {
            origin: name_or_path.to_owned(),
            source,
        })?;
        if name_or_path.ends_with(".xml") {
            return Dialect::from_jpos_xml(&text, name_or_path);
        }
        Dialect::from_toml(&text, name_or_path)
    }

    /// The default profile: ISO 8583:1987, ASCII, binary bitmaps.
    pub fn iso87_ascii() -> Dialect {
        match Dialect::builtin("iso87-ascii") {
            Some(d) => d,
            None => unreachable!("built-in dialect iso87-ascii is tested to parse"),
        }
    }

    /// A hash of the wire layout (bitmaps and every field's definition, not names):
    /// two dialects with the same fingerprint encode every message identically.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The dialect's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dialect's description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Bitmap encoding.
    pub fn bitmap_encoding(&self) -> BitmapEncoding {
        self.bitmap
    }

    /// The definition of field `number`, if the dialect has one.
    #[inline]
    pub fn field(&self, number: u8) -> Option<&FieldSpec> {
        self.fields
            .get(usize::from(number))
            .and_then(Option::as_ref)
    }

    /// The interface definition an operator hands a bank: the dialect's wire
    /// settings, then one row per field (number, name, type, length rule, how the
    /// value and its length prefix are written). `markdown`: as a Markdown table;
    /// otherwise aligned text.
    pub fn describe(&self, markdown: bool) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let bitmap = match self.bitmap {
            BitmapEncoding::Binary => "8 bytes each",
            BitmapEncoding::Hex => "16 ASCII hex characters each",
            BitmapEncoding::HexEbcdic => "16 EBCDIC hex characters each",
        };
        let mti = match self.mti {
            MtiEncoding::Ascii => "4 ASCII digits",
            MtiEncoding::Bcd => "2 bytes packed BCD",
            MtiEncoding::Ebcdic => "4 EBCDIC digits",
        };
        let settings = [
            ("dialect", self.name.clone()),
            ("description", self.description.clone()),
            (
                "version",
                match self.version {
                    Version::Iso1987 => self.version.to_string(),
                    Version::Iso1993 => format!(
                        "{} (translated to and from ISO 8583:1987 at the edge: README, \
                         \"ISO 8583:1993 and 1987\")",
                        self.version
                    ),
                },
            ),
            ("MTI", mti.to_owned()),
            (
                "bitmaps",
                if self.tertiary {
                    format!("{bitmap}; a tertiary bitmap (field 65) announces fields 129-192")
                } else {
                    bitmap.to_owned()
                },
            ),
            (
                "code page",
                self.code_page
                    .map_or("none".to_owned(), |c| c.as_str().to_owned()),
            ),
            (
                "largest message",
                format!("{} bytes", self.message_size_max_bytes()),
            ),
        ];
        let rows = self.fields.iter().zip(&self.wire).filter_map(|(f, w)| {
            let f = f.as_ref()?;
            let length = match f.length {
                LengthKind::Fixed => format!("fixed {}", f.max),
                LengthKind::LlVar => format!("LLVAR ..{}", f.max),
                LengthKind::LllVar => format!("LLLVAR ..{}", f.max),
            };
            let mut encoding = format!("{:?}", f.encoding).to_lowercase();
            if let Some(t) = f.tlv {
                let _ = write!(encoding, ", {} structure", t.name());
            }
            if f.encoding == Encoding::Bcd {
                let pad = match w.pad {
                    PadSide::Left => "left",
                    PadSide::Right => "right",
                };
                let _ = write!(encoding, ", odd padded {pad} with {:X}", w.filler.nibble());
            }
            let prefix = match f.length {
                LengthKind::Fixed => "-".to_owned(),
                _ => {
                    let mut p = format!("{:?}", w.prefix).to_lowercase();
                    if f.encoding == Encoding::Bcd && w.counts == LengthCounts::Bytes {
                        p.push_str(", counts bytes");
                    }
                    p
                }
            };
            let ty = match f.ty {
                FieldType::XN => "x+n".to_owned(),
                t => format!("{t:?}").to_lowercase(),
            };
            Some([
                f.number.to_string(),
                f.name.clone(),
                ty,
                length,
                encoding,
                prefix,
            ])
        });
        let head = [
            "field",
            "name",
            "type",
            "length",
            "encoding",
            "length prefix",
        ];
        if markdown {
            for (k, v) in settings {
                let _ = writeln!(out, "- **{k}**: {v}");
            }
            let _ = writeln!(out, "\n| {} |", head.join(" | "));
            let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
            for r in rows {
                let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
        } else {
            for (k, v) in settings {
                let _ = writeln!(out, "{k:<16} {v}");
            }
            let _ = writeln!(out);
            let rows: Vec<[String; 6]> = rows.collect();
            let mut widths = head.map(str::len);
            for r in &rows {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |cells: [&str; 6]| {
                let mut l = String::new();
                for (c, w) in cells.iter().zip(widths) {
                    let _ = write!(l, "{c:<w$}  ");
                }
                l.trim_end().to_owned()
            };
            let _ = writeln!(out, "{}", line(head));
            for r in &rows {
                let _ = writeln!(out, "{}", line(r.each_ref().map(String::as_str)));
            }
        }
        out
    }

    /// Largest wire size of any single message under this dialect, in bytes.
    pub fn message_size_max_bytes(&self) -> usize {
        let fields: usize = self
            .fields
            .iter()
            .zip(&self.wire)
            .filter_map(|(f, w)| f.as_ref().map(|f| (f, w)))
            .map(|(f, w)| w.prefix.wire_len(f.length) + f.encoding.wire_len(usize::from(f.max)))
            .sum();
        self.mti.wire_len() + self.bitmap.wire_len() + fields
    }

    /// A hash of the wire layout (not names): SipHash with fixed keys, so the
    /// same layout gives the same value in every process.
    fn layout_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.bitmap as u8).hash(&mut h);
        if self.is_transcoded() {
            // Only dialects with more than ASCII hash these, so the ASCII
            // dialects' fingerprints are as before.
            (self.mti, self.code_page).hash(&mut h);
        }
        if self.version != Version::Iso1987 {
            self.version.hash(&mut h);
        }
        if self.tertiary {
            "tertiary".hash(&mut h);
        }
        for (f, w) in self.fields.iter().zip(&self.wire) {
            let Some(f) = f else { continue };
            (
                f.number,
                f.ty as u8,
                f.length as u8,
                f.max,
                f.encoding as u8,
            )
                .hash(&mut h);
            if self.is_transcoded() {
                w.hash(&mut h);
            }
            if let Some(t) = f.tlv {
                t.hash(&mut h);
            }
        }
        h.finish()
    }
}

/// A regular file of at most [`DIALECT_FILE_SIZE_MAX_BYTES`] (never a device or
/// a pipe), as text.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > DIALECT_FILE_SIZE_MAX_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file of at most {DIALECT_FILE_SIZE_MAX_BYTES} bytes"),
        ));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, DIALECT_FILE_SIZE_MAX_BYTES + 1),
        &mut text,
    )?;
    Ok(text)
}

fn check_spec(spec: &FieldSpec, bitmap: BitmapEncoding, tertiary: bool) -> Option<&'static str> {
    if spec.number == 0 || spec.number > 192 {
        return Some("number must be 1..=128 (1..=192 with tertiary_bitmap = true)");
    }
    if spec.number > 128 && !tertiary {
        return Some("fields 129..=192 need tertiary_bitmap = true");
    }
    if spec.max == 0 {
        return Some("max must be at least 1");
    }
    match spec.length {
        LengthKind::LlVar if spec.max > 99 => return Some("llvar max must be ≤ 99"),
        LengthKind::LllVar if spec.max > 999 => return Some("lllvar max must be ≤ 999"),
        LengthKind::Fixed if spec.max > 999 => return Some("fixed length must be ≤ 999"),
        _ => {}
    }
    let binary = spec.ty == FieldType::B;
    match (binary, spec.encoding) {
        (true, Encoding::Ascii | Encoding::Ebcdic | Encoding::Bcd) => {
            return Some("type b needs encoding binary or hex")
        }
        (false, Encoding::Binary | Encoding::Hex) => {
            return Some("only type b may use binary or hex encoding")
        }
        (false, Encoding::Bcd) if !matches!(spec.ty, FieldType::N | FieldType::Z) => {
            return Some("bcd encoding needs type n or z")
        }
        _ => {}
    }
    if spec.encoding != Encoding::Bcd
        && (spec.length_counts.is_some() || spec.bcd_pad.is_some() || spec.bcd_filler.is_some())
    {
        return Some("length_counts, bcd_pad and bcd_filler apply to bcd fields only");
    }
    match (spec.tlv, spec.encoding) {
        (Some(Tlv::Ber), Encoding::Binary) | (None, _) => {}
        (Some(Tlv::Ber), _) => return Some("tlv = \"ber\" needs type b with encoding binary"),
        (Some(Tlv::TagLength { .. }), Encoding::Ascii | Encoding::Ebcdic) if !binary => {}
        (Some(Tlv::TagLength { .. }), _) => {
            return Some("tlv = \"tagN-lenM\" needs a text field in ascii or ebcdic")
        }
    }
    if spec.number == 1 || (spec.number == 65 && tertiary) {
        let expected = match bitmap {
            BitmapEncoding::Binary => Encoding::Binary,
            BitmapEncoding::Hex | BitmapEncoding::HexEbcdic => Encoding::Hex,
        };
        if !binary || spec.length != LengthKind::Fixed || spec.max != 8 || spec.encoding != expected
        {
            return Some(
                "fields 1 and (with a tertiary bitmap) 65 are bitmaps: b, fixed, 8, bitmap encoding",
            );
        }
    }
    None
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_define_all_fields() {
        for (name, _) in BUILTIN_DIALECTS {
            let d = match Dialect::builtin(name) {
                Some(d) => d,
                None => panic!(
                    "{name}: {:?}",
                    Dialect::from_toml(BUILTIN_DIALECTS[0].1, name)
                ),
            };
            for n in 1..=128u8 {
                assert!(d.field(n).is_some(), "{name} lacks field {n}");
            }
            assert_eq!(d.field(4).map(|f| f.max), Some(12));
            assert_eq!(d.field(2).map(|f| f.length), Some(LengthKind::LlVar));
        }
    }

    #[test]
    fn class_table_agrees_with_allows() {
        use FieldType::*;
        for ty in [N, A, An, Ans, As, Ns, Anp, B, Z, XN] {
            for b in 0..=255u8 {
                assert_eq!(
                    ty.first_invalid(&[b]).is_none(),
                    ty.allows(0, b),
                    "{ty:?} {b}"
                );
                let two = [if ty == XN { b'C' } else { b'0' }, b];
                let ok = ty.allows(0, two[0]) && ty.allows(1, b);
                let expected = if ok {
                    None
                } else {
                    Some(if ty.allows(0, two[0]) { 1 } else { 0 })
                };
                assert_eq!(ty.first_invalid(&two), expected, "{ty:?} {b}");
            }
        }
    }

    #[test]
    fn descriptions_list_every_field_with_its_encodings() {
        let d = Dialect::builtin("iso87-binary").unwrap();
        let text = d.describe(false);
        assert!(
            text.contains("MTI              2 bytes packed BCD"),
            "{text}"
        );
        let pan = text.lines().find(|l| l.starts_with("2 ")).unwrap();
        assert!(
            pan.contains("LLVAR ..19") && pan.contains("bcd, odd padded left with 0"),
            "{pan}"
        );
        let md = Dialect::builtin("iso87-ebcdic").unwrap().describe(true);
        assert!(md.contains("- **code page**: cp1047"), "{md}");
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| ")).count(),
            1 + 128,
            "{md}"
        );
    }

    #[test]
    fn fingerprints_tell_layouts_apart() {
        let a = Dialect::iso87_ascii();
        let h = Dialect::builtin("iso87-hexbitmap").unwrap();
        assert_eq!(a.fingerprint(), Dialect::iso87_ascii().fingerprint());
        assert_ne!(a.fingerprint(), h.fingerprint());
    }

    #[test]
    fn bad_field_is_named() {
        let text = r#"
            name = "x"
            mti_encoding = "ascii"
            bitmap_encoding = "binary"
            length_prefix_encoding = "ascii"
            [[field]]
            number = 2
            name = "PAN"
            type = "n"
            length = "llvar"
            max = 120
            encoding = "ascii"
        "#;
        let err = Dialect::from_toml(text, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("dialect x.toml: field 2: llvar max must be ≤ 99")
        );
    }
}
