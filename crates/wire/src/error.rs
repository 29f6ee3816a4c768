//! Decode and encode errors: small, `Copy`, and precise about where and what.

use crate::dialect::FieldType;
use std::fmt;

/// Which part of a message an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// The 4-digit message type indicator.
    Mti,
    /// The primary bitmap.
    PrimaryBitmap,
    /// The secondary bitmap (field 1).
    SecondaryBitmap,
    /// A data field, by number.
    Field(u8),
    /// Bytes after the last field announced by the bitmaps.
    Trailing,
}

impl Location {
    /// The field number, with 0 for the MTI and primary bitmap, 1 for the secondary bitmap.
    pub fn field_number(self) -> u8 {
        match self {
            Location::Mti | Location::PrimaryBitmap | Location::Trailing => 0,
            Location::SecondaryBitmap => 1,
            Location::Field(n) => n,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Mti => f.write_str("MTI"),
            Location::PrimaryBitmap => f.write_str("primary bitmap"),
            Location::SecondaryBitmap => f.write_str("secondary bitmap (field 1)"),
            Location::Field(n) => write!(f, "field {n}"),
            Location::Trailing => f.write_str("end of message"),
        }
    }
}

/// What was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// The message ended before the part was complete.
    Truncated {
        /// Bytes the part needs.
        needed: usize,
        /// Bytes left in the message.
        available: usize,
    },
    /// The MTI is not four ASCII digits.
    BadMti {
        /// The offending byte.
        found: u8,
    },
    /// A length prefix has a non-digit.
    BadLengthPrefix {
        /// The offending byte.
        found: u8,
    },
    /// A variable length exceeds the field's maximum.
    LengthTooLong {
        /// The dialect's maximum for the field.
        max: u16,
        /// The declared length.
        found: u16,
    },
    /// A byte outside the field's character class.
    BadCharacter {
        /// The field's type.
        expected: FieldType,
        /// The offending byte.
        found: u8,
    },
    /// A hex-encoded bitmap or field holds a non-hex character.
    BadHex {
        /// The offending byte.
        found: u8,
    },
    /// The bitmap announces a field the dialect does not define.
    UndefinedField,
    /// Bytes remain after the last announced field.
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A BCD byte holds a nibble that is not a digit (or a track separator in a
    /// `z` field), or a pad nibble that is not the dialect's filler.
    BadBcd {
        /// The offending byte.
        found: u8,
    },
    /// A structured field (BER-TLV, tag-length) is malformed; the offset is the
    /// element's first byte.
    BadTlv {
        /// The element's tag.
        tag: u32,
        /// What is wrong.
        problem: crate::tlv::TlvProblem,
    },
    /// The field cannot be translated between ISO 8583 versions (a 1993
    /// dialect's message into the 1987 form the switch works in).
    Untranslatable(crate::version::Untranslatable),
    /// Frame larger than the codec can index (65,535 bytes).
    MessageTooLarge {
        /// Message size in bytes.
        size: usize,
    },
}

/// A message that does not match its dialect: where, at which byte, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The part of the message.
    pub location: Location,
    /// Byte offset from the start of the message (after the frame header).
    pub offset: usize,
    /// What was expected and what was found.
    pub kind: DecodeErrorKind,
}

struct Byte(u8);

impl fmt::Display for Byte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() || self.0 == b' ' {
            write!(f, "'{}' (0x{:02x})", char::from(self.0), self.0)
        } else {
            write!(f, "byte 0x{:02x}", self.0)
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}: ", self.location, self.offset)?;
        match self.kind {
            DecodeErrorKind::Truncated { needed, available } => {
                write!(
                    f,
                    "expected {needed} bytes, found {available} before the end"
                )
            }
            DecodeErrorKind::BadMti { found } => {
                write!(f, "expected 4 ASCII digits, found {}", Byte(found))
            }
            DecodeErrorKind::BadLengthPrefix { found } => {
                write!(f, "expected a length digit, found {}", Byte(found))
            }
            DecodeErrorKind::LengthTooLong { max, found } => {
                write!(f, "expected length at most {max}, found {found}")
            }
            DecodeErrorKind::BadCharacter { expected, found } => {
                write!(f, "expected {}, found {}", expected.expected(), Byte(found))
            }
            DecodeErrorKind::BadHex { found } => {
                write!(f, "expected a hex digit, found {}", Byte(found))
            }
            DecodeErrorKind::UndefinedField => {
                f.write_str("announced by the bitmap but not defined by the dialect")
            }
            DecodeErrorKind::TrailingBytes { count } => {
                write!(f, "expected no more bytes, found {count}")
            }
            DecodeErrorKind::BadBcd { found } => {
                write!(f, "expected packed BCD digits, found byte 0x{found:02x}")
            }
            DecodeErrorKind::BadTlv { tag, problem } => {
                write!(f, "{}", crate::tlv::TlvError { tag, problem })
            }
            DecodeErrorKind::Untranslatable(why) => write!(f, "{why}"),
            DecodeErrorKind::MessageTooLarge { size } => {
                write!(f, "expected at most 65535 bytes, found {size}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a field could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeErrorKind {
    /// The dialect does not define the field.
    UndefinedField,
    /// Fields must be written in ascending order, each once.
    OutOfOrder {
        /// The last field written.
        previous: u8,
    },
    /// Value longer than the field's maximum.
    TooLong {
        /// Maximum in units.
        max: u16,
        /// Value length in units.
        found: usize,
    },
    /// A fixed field's value has the wrong length.
    WrongLength {
        /// Required length in units.
        expected: u16,
        /// Value length in units.
        found: usize,
    },
    /// A hex value to convert holds a non-hex character or an odd count.
    BadHex,
    /// A value the field's wire encoding cannot carry (a letter in a BCD field).
    Unrepresentable {
        /// Offset of the byte within the value.
        offset: usize,
        /// The byte.
        found: u8,
    },
    /// The field cannot be translated between ISO 8583 versions (the 1987
    /// form into a 1993 dialect).
    Untranslatable(crate::version::Untranslatable),
    /// A message in the canonical form ended early or was inconsistent (a bug:
    /// the encoder writes that form itself).
    Malformed,
}

/// A value that does not fit its field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeError {
    /// The field number.
    pub field: u8,
    /// What was wrong.
    pub kind: EncodeErrorKind,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field {}: ", self.field)?;
        match self.kind {
            EncodeErrorKind::UndefinedField => f.write_str("not defined by the dialect"),
            EncodeErrorKind::OutOfOrder { previous } => {
                write!(
                    f,
                    "written after field {previous}; fields go in ascending order"
                )
            }
            EncodeErrorKind::TooLong { max, found } => {
                write!(f, "expected at most {max} units, found {found}")
            }
            EncodeErrorKind::WrongLength { expected, found } => {
                write!(f, "expected exactly {expected} units, found {found}")
            }
            EncodeErrorKind::BadHex => f.write_str("expected an even count of hex digits"),
            // The byte is not shown: the value may be card data (a track, a PAN).
            EncodeErrorKind::Unrepresentable { offset, .. } => write!(
                f,
                "the wire encoding cannot carry the byte at value offset {offset}"
            ),
            EncodeErrorKind::Untranslatable(why) => write!(f, "{why}"),
            EncodeErrorKind::Malformed => f.write_str("malformed canonical message"),
        }
    }
}

impl std::error::Error for EncodeError {}
