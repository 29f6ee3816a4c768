//! Sans-IO ISO 8583 codec and framing for switchyard.
//!
//! Everything here works on bytes and values only: no sockets, no async
//! runtime, so the codec can be tested, benchmarked and fuzzed alone. The one
//! clock read is today's date (UTC), for the year an ISO 8583:1987 date lacks
//! when it is written as ISO 8583:1993 (`version`, [`Today`]).
//!
//! * [`Dialect`] describes every field of a message profile and its encodings
//!   (ASCII, BCD, EBCDIC, binary, hex) and is loaded from a TOML file or a jPOS
//!   packager (six are built in, see [`Dialect::builtin`]). A dialect with
//!   anything but ASCII is converted once to its canonical form on decode and
//!   back on encode (`transcode`); an ISO 8583:1993 dialect is translated to and
//!   from the 1987 form (`version`).
//! * [`Message::decode`] checks a whole message against the dialect and records
//!   where each field lies in the frame: field bytes are borrowed, never copied.
//! * [`Encoder`] writes a message into a reused buffer, fields in ascending order.
//! * [`FrameDecoder`] splits a byte stream into frames (see [`Framing`]: binary,
//!   ASCII, hex or BCD length headers), checking the declared length against its
//!   bound before any memory is reserved for it; [`MessageHeader`] takes a TPDU
//!   or fixed header off the front of a frame.
#![forbid(unsafe_code)]

#[cfg(feature = "fuzzing")]
pub mod corpus;
mod dialect;
mod ebcdic;
mod encode;
mod error;
mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod jpos;
mod mask;
mod message;
mod tlv;
mod transcode;
mod version;

pub use dialect::{
    BitmapEncoding, CodePage, Dialect, DialectError, Encoding, FieldSpec, FieldType, FieldWire,
    Filler, LengthCounts, LengthKind, MtiEncoding, PadSide, PrefixEncoding, Tlv, BUILTIN_DIALECTS,
    DIALECT_FILE_SIZE_MAX_BYTES,
};
pub use encode::{reencode, Change, Encoder};
pub use error::{DecodeError, DecodeErrorKind, EncodeError, EncodeErrorKind, Location};
pub use frame::{
    FrameDecoder, FrameError, Framing, Header, MessageHeader, FRAME_SIZE_MAX_BYTES_DEFAULT,
    HEADER_BYTES_MAX, TPDU_BYTES,
};
pub use mask::{field_for_log, mask_pan, LoggedField, MaskedPan};
pub use message::{Message, Mti, Span, FIELD_COUNT};
pub use tlv::{TlvError, TlvProblem};
pub use version::{
    mti_to_1987, mti_to_1993, ActionCodes, Today, Untranslatable, Version, ACTION_CODES_MAX,
    BUILTIN_ACTION_CODES, CARRIED,
};
