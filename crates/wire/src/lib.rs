//! Sans-IO ISO 8583 codec and framing for switchyard.
//!
//! Everything here works on bytes and values only: no sockets, no clock, no
//! async runtime, so the codec can be tested, benchmarked and fuzzed alone.
//!
//! * [`Dialect`] describes every field of a message profile and is loaded from a
//!   TOML file (two are built in, see [`Dialect::builtin`]).
//! * [`Message::decode`] checks a whole message against the dialect and records
//!   where each field lies in the frame: field bytes are borrowed, never copied.
//! * [`Encoder`] writes a message into a reused buffer, fields in ascending order.
//! * [`FrameDecoder`] splits a byte stream into frames (2-byte big-endian or
//!   4-digit ASCII length headers), checking the declared length against its bound
//!   before any memory is reserved for it.
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
mod mask;
mod message;
mod transcode;

pub use dialect::{
    BitmapEncoding, CodePage, Dialect, DialectError, Encoding, FieldSpec, FieldType, FieldWire,
    Filler, LengthCounts, LengthKind, MtiEncoding, PadSide, PrefixEncoding, BUILTIN_DIALECTS,
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
