//! Framing: a length header before each message, checked before it is trusted.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

/// Default bound on one message (excluding its header), in bytes.
///
/// A 0200 of the default profile is about 200 bytes; the largest legal message of
/// the ISO 8583:1987 dialect is far larger but never seen in practice.
pub const FRAME_SIZE_MAX_BYTES_DEFAULT: usize = 8 * 1024;

/// How messages are delimited on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// 2-byte big-endian length, excluding itself (the default).
    U16be,
    /// 4 ASCII digits of length, excluding themselves.
    Ascii4,
}

impl Framing {
    /// Header size in bytes.
    pub fn header_len(self) -> usize {
        match self {
            Framing::U16be => 2,
            Framing::Ascii4 => 4,
        }
    }

    /// Largest message the header can describe.
    pub fn size_limit_bytes(self) -> usize {
        match self {
            Framing::U16be => usize::from(u16::MAX),
            Framing::Ascii4 => 9999,
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
        match self {
            Framing::U16be => out[at..at + 2].copy_from_slice(&(len as u16).to_be_bytes()),
            Framing::Ascii4 => {
                let mut v = len;
                for slot in out[at..at + 4].iter_mut().rev() {
                    *slot = b'0' + (v % 10) as u8;
                    v /= 10;
                }
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
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Framing::U16be => "u16be",
            Framing::Ascii4 => "ascii4",
        })
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
    /// An ASCII header holds a non-digit.
    #[error("frame header byte {offset}: expected an ASCII digit, found 0x{found:02x}")]
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
        let len = match self.framing {
            Framing::U16be => usize::from(u16::from_be_bytes([buf[0], buf[1]])),
            Framing::Ascii4 => {
                let mut v = 0usize;
                for (offset, &b) in buf[..4].iter().enumerate() {
                    if !b.is_ascii_digit() {
                        return Err(FrameError::BadHeader { offset, found: b });
                    }
                    v = v * 10 + usize::from(b - b'0');
                }
                v
            }
        };
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
    fn both_framings_round_trip_and_wait_for_more() {
        for framing in [Framing::U16be, Framing::Ascii4] {
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
    }
}
