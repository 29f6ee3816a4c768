//! Framing: a length header before each message, checked before it is trusted.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

/// Default bound on one message (excluding its header), in bytes.
///
/// A 0200 of the default profile is about 200 bytes; the largest legal message of
/// the ISO 8583:1987 dialect is far larger but never seen in practice.
pub const FRAME_SIZE_MAX_BYTES_DEFAULT: usize = 8 * 1024;

/// How messages are delimited on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
pub enum Framing {
    /// 2-byte big-endian length, excluding itself (the default).
    #[serde(rename = "u16be")]
    U16be,
    /// 2-byte big-endian length, including itself.
    #[serde(rename = "u16be-inclusive")]
    U16beInclusive,
    /// 4 ASCII digits of length, excluding themselves.
    #[serde(rename = "ascii4")]
    Ascii4,
    /// 4 ASCII hex characters of length, excluding themselves.
    #[serde(rename = "hex4")]
    Hex4,
    /// 2 bytes of packed BCD length (up to 9999), excluding themselves.
    #[serde(rename = "bcd2")]
    Bcd2,
}

impl Framing {
    /// Every framing, for lists and tests.
    pub const ALL: [Framing; 5] = [
        Framing::U16be,
        Framing::U16beInclusive,
        Framing::Ascii4,
        Framing::Hex4,
        Framing::Bcd2,
    ];

    /// The name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Framing::U16be => "u16be",
            Framing::U16beInclusive => "u16be-inclusive",
            Framing::Ascii4 => "ascii4",
            Framing::Hex4 => "hex4",
            Framing::Bcd2 => "bcd2",
        }
    }

    /// Header size in bytes.
    pub fn header_len(self) -> usize {
        match self {
            Framing::U16be | Framing::U16beInclusive | Framing::Bcd2 => 2,
            Framing::Ascii4 | Framing::Hex4 => 4,
        }
    }

    /// Largest message the header can describe.
    pub fn size_limit_bytes(self) -> usize {
        match self {
            Framing::U16be | Framing::Hex4 => usize::from(u16::MAX),
            Framing::U16beInclusive => usize::from(u16::MAX) - 2,
            Framing::Ascii4 | Framing::Bcd2 => 9999,
        }
    }

    /// Reserves a header at the end of `out`; returns its offset for [`Framing::finish`].
    pub fn begin(self, out: &mut BytesMut) -> usize {
        let at = out.len();
        out.put_bytes(0, self.header_len());
        at
    }

    /// Fills in the header reserved at `at` with the length of what follows it.
    pub fn finish(self, out: &mut BytesMut, at: usize) -> Result<(), FrameError> {
        let len = out.len() - at - self.header_len();
        if len > self.size_limit_bytes() {
            out.truncate(at);
            return Err(FrameError::TooLarge {
                declared: len,
                max: self.size_limit_bytes(),
            });
        }
        let header = &mut out[at..at + self.header_len()];
        match self {
            Framing::U16be => header.copy_from_slice(&(len as u16).to_be_bytes()),
            Framing::U16beInclusive => header.copy_from_slice(&(len as u16 + 2).to_be_bytes()),
            Framing::Ascii4 => write_digits(header, len, 10, |d| b'0' + d),
            Framing::Hex4 => write_digits(header, len, 16, |d| HEX[usize::from(d)]),
            Framing::Bcd2 => {
                let digits = [len / 1000, len / 100 % 10, len / 10 % 10, len % 10];
                header[0] = (digits[0] as u8) << 4 | digits[1] as u8;
                header[1] = (digits[2] as u8) << 4 | digits[3] as u8;
            }
        }
        Ok(())
    }

    /// Appends `message` with its header.
    pub fn write(self, out: &mut BytesMut, message: &[u8]) -> Result<(), FrameError> {
        let at = self.begin(out);
        out.put_slice(message);
        self.finish(out, at)
    }

    /// The message length a complete header declares.
    fn read(self, header: &[u8]) -> Result<usize, FrameError> {
        let bad = |offset: usize| FrameError::BadHeader {
            offset,
            found: header[offset],
        };
        Ok(match self {
            Framing::U16be => usize::from(u16::from_be_bytes([header[0], header[1]])),
            Framing::U16beInclusive => {
                let total = usize::from(u16::from_be_bytes([header[0], header[1]]));
                // 0 and 1 cannot even cover the header; 2 is an empty message.
                total.checked_sub(2).ok_or(bad(1))?
            }
            Framing::Ascii4 | Framing::Hex4 => {
                let radix = if self == Framing::Ascii4 { 10 } else { 16 };
                let mut v = 0usize;
                for (offset, &b) in header.iter().enumerate() {
                    let digit = char::from(b).to_digit(radix).ok_or(bad(offset))?;
                    v = v * radix as usize + digit as usize;
                }
                v
            }
            Framing::Bcd2 => {
                let mut v = 0usize;
                for (offset, &b) in header.iter().enumerate() {
                    if b >> 4 > 9 || b & 15 > 9 {
                        return Err(bad(offset));
                    }
                    v = v * 100 + usize::from(b >> 4) * 10 + usize::from(b & 15);
                }
                v
            }
        })
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn write_digits(dst: &mut [u8], mut v: usize, radix: usize, char_of: impl Fn(u8) -> u8) {
    for slot in dst.iter_mut().rev() {
        *slot = char_of((v % radix) as u8);
        v /= radix;
    }
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Framing {
    type Err = String;

    fn from_str(s: &str) -> Result<Framing, String> {
        Framing::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Framing::ALL.iter().map(|f| f.as_str()).collect();
                format!("expected one of {}, found {s:?}", names.join(", "))
            })
    }
}

/// Largest header between a frame's length and its message, bytes.
pub const HEADER_BYTES_MAX: usize = 32;

/// Bytes of a TPDU: protocol id (0x60), destination address (2), source address (2).
pub const TPDU_BYTES: usize = 5;

/// Bytes between a frame's length header and the ISO 8583 message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MessageHeader {
    /// The message follows the length (the default).
    #[default]
    None,
    /// A 5-byte TPDU; an answer carries it back with the destination and
    /// source addresses swapped.
    Tpdu,
    /// A fixed header of this many bytes (1..=[`HEADER_BYTES_MAX`]), echoed
    /// unchanged on answers.
    Fixed(u8),
}

impl MessageHeader {
    /// Header bytes before each message.
    pub fn len(self) -> usize {
        match self {
            MessageHeader::None => 0,
            MessageHeader::Tpdu => TPDU_BYTES,
            MessageHeader::Fixed(n) => usize::from(n),
        }
    }

    /// Whether there is no header.
    pub fn is_empty(self) -> bool {
        self == MessageHeader::None
    }

    /// Takes the header off the front of `frame` and returns the header its answer
    /// carries (a TPDU's addresses swapped); `None` when the frame is shorter than
    /// the header (and `frame` is left as it was).
    pub fn split(self, frame: &mut Bytes) -> Option<Header> {
        if self == MessageHeader::None {
            return Some(Header::default());
        }
        let n = self.len();
        if frame.len() < n {
            return None;
        }
        let head = frame.split_to(n);
        let mut header = Header::from_slice(&head)?;
        if self == MessageHeader::Tpdu {
            header.bytes.copy_within(1..3, 5);
            header.bytes.copy_within(3..5, 1);
            header.bytes.copy_within(5..7, 3);
            header.bytes[5..7].fill(0);
        }
        Some(header)
    }

    /// The name used in config files (`none`, `tpdu`, `fixed`).
    pub fn kind(self) -> &'static str {
        match self {
            MessageHeader::None => "none",
            MessageHeader::Tpdu => "tpdu",
            MessageHeader::Fixed(_) => "fixed",
        }
    }
}

/// A header kept by value (at most [`HEADER_BYTES_MAX`] bytes): what an answer
/// carries back, or what a bank link sends before each message.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; HEADER_BYTES_MAX],
    len: u8,
}

impl Header {
    /// A copy of `bytes`; `None` when longer than [`HEADER_BYTES_MAX`].
    pub fn from_slice(bytes: &[u8]) -> Option<Header> {
        let mut header = Header::default();
        header.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        header.len = bytes.len() as u8;
        Some(header)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Header(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// A stream that cannot be framed; the connection cannot be resynchronised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header declares more bytes than the bound.
    #[error("frame header declares {declared} bytes, more than the limit of {max}")]
    TooLarge {
        /// Declared length.
        declared: usize,
        /// The bound.
        max: usize,
    },
    /// A header holds a byte its framing does not allow (a non-digit in an ASCII
    /// or BCD header, a non-hex character in a hex one, an inclusive length too
    /// small to cover itself).
    #[error("frame header byte {offset}: not a valid length, found 0x{found:02x}")]
    BadHeader {
        /// Offset within the header.
        offset: usize,
        /// The byte found.
        found: u8,
    },
    /// A header declares an empty message.
    #[error("frame header declares an empty message")]
    Empty,
}

/// Splits frames off a read buffer: check the header and bound, then take the bytes.
#[derive(Clone, Copy, Debug)]
pub struct FrameDecoder {
    framing: Framing,
    max_bytes: usize,
}

impl FrameDecoder {
    /// A decoder accepting messages up to `max_bytes` (clamped to what the header can say).
    pub fn new(framing: Framing, max_bytes: usize) -> FrameDecoder {
        FrameDecoder {
            framing,
            max_bytes: max_bytes.min(framing.size_limit_bytes()),
        }
    }

    /// The framing.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Takes the next whole message out of `buf` (header stripped), or `Ok(None)` when
    /// more bytes are needed. The returned bytes share `buf`'s allocation.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let header = self.framing.header_len();
        if buf.len() < header {
            return Ok(None);
        }
        let len = self.framing.read(&buf[..header])?;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_bytes {
            return Err(FrameError::TooLarge {
                declared: len,
                max: self.max_bytes,
            });
        }
        if buf.len() < header + len {
            buf.reserve(header + len - buf.len());
            return Ok(None);
        }
        buf.advance(header);
        Ok(Some(buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_framing_round_trips_and_waits_for_more() {
        for framing in Framing::ALL {
            assert_eq!(framing.as_str().parse::<Framing>(), Ok(framing));
            let dec = FrameDecoder::new(framing, 100);
            let mut buf = BytesMut::new();
            framing.write(&mut buf, b"hello").unwrap();
            framing.write(&mut buf, b"world!").unwrap();
            let mut partial = buf.split_to(3);
            assert_eq!(dec.decode(&mut partial), Ok(None));
            partial.unsplit(buf);
            let mut buf = partial;
            assert_eq!(
                dec.decode(&mut buf).unwrap().as_deref(),
                Some(&b"hello"[..])
            );
            assert_eq!(
                dec.decode(&mut buf).unwrap().as_deref(),
                Some(&b"world!"[..])
            );
            assert_eq!(dec.decode(&mut buf), Ok(None));
        }
    }

    #[test]
    fn bounds_and_bad_headers_are_errors() {
        let dec = FrameDecoder::new(Framing::U16be, 100);
        let mut buf = BytesMut::from(&[0x01, 0x00][..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge {
                declared: 256,
                max: 100
            })
        );
        let dec = FrameDecoder::new(Framing::Ascii4, 100);
        let mut buf = BytesMut::from(&b"00x1"[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::BadHeader {
                offset: 2,
                found: b'x'
            })
        );
        let mut buf = BytesMut::from(&b"0000"[..]);
        assert_eq!(dec.decode(&mut buf), Err(FrameError::Empty));
        let dec = FrameDecoder::new(Framing::Hex4, 100);
        let mut buf = BytesMut::from(&b"00G1"[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::BadHeader {
                offset: 2,
                found: b'G'
            })
        );
        let dec = FrameDecoder::new(Framing::Bcd2, 100);
        let mut buf = BytesMut::from(&[0x00, 0x1a][..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(FrameError::BadHeader { offset: 1, .. })
        ));
        let dec = FrameDecoder::new(Framing::U16beInclusive, 100);
        let mut buf = BytesMut::from(&[0x00, 0x01][..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(FrameError::BadHeader { offset: 1, .. })
        ));
        let mut buf = BytesMut::from(&[0x00, 0x02][..]);
        assert_eq!(dec.decode(&mut buf), Err(FrameError::Empty));
    }

    #[test]
    fn a_tpdu_comes_back_with_its_addresses_swapped() {
        let mut frame = Bytes::from_static(&[0x60, 0x00, 0x01, 0x00, 0x02, b'0', b'8']);
        let header = MessageHeader::Tpdu.split(&mut frame).unwrap();
        assert_eq!(header.as_bytes(), &[0x60, 0x00, 0x02, 0x00, 0x01]);
        assert_eq!(&frame[..], b"08");
        let mut frame = Bytes::from_static(b"HDR1msg");
        let header = MessageHeader::Fixed(4).split(&mut frame).unwrap();
        assert_eq!((header.as_bytes(), &frame[..]), (&b"HDR1"[..], &b"msg"[..]));
        let mut short = Bytes::from_static(b"HD");
        assert!(MessageHeader::Fixed(4).split(&mut short).is_none());
        assert_eq!(&short[..], b"HD");
    }

    #[test]
    fn headers_are_written_as_their_framing_says() {
        let cases: [(Framing, &[u8]); 5] = [
            (Framing::U16be, &[0x01, 0x2c]),
            (Framing::U16beInclusive, &[0x01, 0x2e]),
            (Framing::Ascii4, b"0300"),
            (Framing::Hex4, b"012C"),
            (Framing::Bcd2, &[0x03, 0x00]),
        ];
        for (framing, header) in cases {
            let mut out = BytesMut::new();
            framing.write(&mut out, &[b'x'; 300]).unwrap();
            assert_eq!(&out[..framing.header_len()], header, "{framing}");
        }
    }
}
