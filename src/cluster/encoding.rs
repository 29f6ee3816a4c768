//! How a journal batch travels in a stream message: the records as the local
//! journal writes them, or (`cluster.compression = "lz4"`, the default) those
//! bytes as one LZ4 block after their plain size (u32, little-endian), marked
//! by the header [`HEADER_ENCODING`]. ISO 8583 records compress about 4:1
//! (a journal segment of a bench run: 67 MB to 16 MB), and the three NATS
//! servers store, replicate and sync every byte: fewer bytes is less of their
//! CPU and disk, and less of the link between sites.
//!
//! A message without the header holds plain records, so a stream written
//! before compression, or by a node with `compression = "none"`, reads as it
//! always did, and nodes with either setting can share a stream. A message is
//! sent plain when compressing does not make it smaller.

use bytes::Bytes;

/// Header: how a batch message's payload is encoded; absent: plain records.
pub const HEADER_ENCODING: &str = "Switchyard-Encoding";

/// [`HEADER_ENCODING`]'s value for an LZ4 block after its plain size.
pub const ENCODING_LZ4: &str = "lz4";

/// The largest plain size a compressed message may name, bytes: NATS's own
/// limit on a message (`max_payload` may not exceed 64 MiB), which no plain
/// batch message exceeds. A larger size is refused before anything is
/// allocated.
pub const PLAIN_MESSAGE_MAX_BYTES: usize = 64 << 20;

/// `cluster.compression`: how this node encodes the batches it publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// An LZ4 block when smaller (the default).
    #[default]
    Lz4,
    /// The records as they are.
    None,
}

impl Compression {
    /// The setting named `name` in a config file.
    pub fn from_name(name: &str) -> Option<Compression> {
        match name {
            "lz4" => Some(Compression::Lz4),
            "none" => Some(Compression::None),
            _ => None,
        }
    }

    /// The payload to publish for `plain` and the header value to mark it
    /// with: compressed only when that is smaller.
    pub fn encode(self, plain: &Bytes) -> (Bytes, Option<&'static str>) {
        if self == Compression::Lz4 && plain.len() <= PLAIN_MESSAGE_MAX_BYTES {
            let packed = lz4_flex::block::compress_prepend_size(plain);
            if packed.len() < plain.len() {
                return (Bytes::from(packed), Some(ENCODING_LZ4));
            }
        }
        (plain.clone(), None)
    }
}

/// The plain records of a message whose [`HEADER_ENCODING`] is `encoding`:
/// `payload` itself, or its decompression into `buf` (kept for the next
/// message). An error names what is wrong.
pub fn plain<'a>(
    encoding: Option<&str>,
    payload: &'a [u8],
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8], String> {
    match encoding {
        None => Ok(payload),
        Some(ENCODING_LZ4) => {
            let Some((size, block)) = payload.split_first_chunk::<4>() else {
                return Err(format!(
                    "lz4 payload of {} bytes: shorter than its size prefix",
                    payload.len()
                ));
            };
            let size = u32::from_le_bytes(*size) as usize;
            if size > PLAIN_MESSAGE_MAX_BYTES {
                return Err(format!(
                    "lz4 payload names a plain size of {size} bytes: at most \
                     {PLAIN_MESSAGE_MAX_BYTES}"
                ));
            }
            buf.clear();
            buf.resize(size, 0);
            let n = lz4_flex::block::decompress_into(block, buf)
                .map_err(|e| format!("lz4 payload: {e}"))?;
            if n != size {
                return Err(format!(
                    "lz4 payload: {n} bytes decompressed, its prefix names {size}"
                ));
            }
            Ok(&buf[..])
        }
        Some(other) => Err(format!("unknown {HEADER_ENCODING} {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Bytes {
        let mut b = Vec::new();
        for i in 0..200u32 {
            b.extend_from_slice(b"0200F23C46C1A8E09A0000000000000000001654");
            b.extend_from_slice(&i.to_le_bytes());
        }
        Bytes::from(b)
    }

    #[test]
    fn lz4_goes_and_comes_back_and_a_plain_message_reads_as_it_is() {
        let plain_bytes = records();
        let (packed, header) = Compression::Lz4.encode(&plain_bytes);
        assert_eq!(header, Some(ENCODING_LZ4));
        assert!(packed.len() * 4 < plain_bytes.len(), "{}", packed.len());
        let mut buf = Vec::new();
        assert_eq!(plain(header, &packed, &mut buf).unwrap(), &plain_bytes[..]);

        let (same, none) = Compression::None.encode(&plain_bytes);
        assert_eq!((same, none), (plain_bytes.clone(), None));
        assert_eq!(
            plain(None, &plain_bytes, &mut buf).unwrap(),
            &plain_bytes[..]
        );
    }

    #[test]
    fn what_compressing_does_not_shrink_goes_plain() {
        // Bytes without repetition (a xorshift sequence).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let noise = Bytes::from(noise);
        assert_eq!(Compression::Lz4.encode(&noise), (noise.clone(), None));
    }

    #[test]
    fn a_bad_payload_is_named_never_a_panic() {
        let mut buf = Vec::new();
        let (packed, header) = Compression::Lz4.encode(&records());
        let cases: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
            (header, packed[..3].to_vec(), "shorter than its size prefix"),
            (
                header,
                {
                    let mut p = packed.to_vec();
                    p[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                    p
                },
                "at most",
            ),
            (
                header,
                {
                    let mut p = packed.to_vec();
                    p[..4].copy_from_slice(&100u32.to_le_bytes());
                    p
                },
                "lz4 payload",
            ),
            (header, packed[..packed.len() / 2].to_vec(), "lz4 payload"),
            (
                Some("zstd"),
                packed.to_vec(),
                "unknown Switchyard-Encoding \"zstd\"",
            ),
        ];
        for (encoding, payload, why) in cases {
            let e = plain(encoding, &payload, &mut buf).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        // Every truncation and every flipped byte: an error or other bytes,
        // never a panic.
        for cut in 0..packed.len() {
            let _ = plain(header, &packed[..cut], &mut buf);
        }
        for at in 4..packed.len() {
            let mut p = packed.to_vec();
            p[at] ^= 0xA5;
            let _ = plain(header, &p, &mut buf);
        }
    }
}
