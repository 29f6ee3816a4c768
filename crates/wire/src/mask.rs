//! Card number masking for logs and `Debug` output (first 6 and last 4 at most).

use std::fmt;

/// A card number that displays with all but the first 6 and last 4 digits masked.
///
/// Formatting never allocates; numbers shorter than 13 digits show only their last
/// four (or nothing when shorter than 8), so a short PAN is never shown nearly whole.
#[derive(Clone, Copy)]
pub struct MaskedPan<'a>(&'a [u8]);

/// Wraps a PAN (or any account number) for masked display.
pub fn mask_pan(pan: &[u8]) -> MaskedPan<'_> {
    MaskedPan(pan)
}

impl fmt::Display for MaskedPan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.0.len();
        let (head, tail) = match len {
            13.. => (6, 4),
            8..=12 => (0, 4),
            _ => (0, 0),
        };
        for (i, &b) in self.0.iter().enumerate() {
            let shown = i < head || i >= len - tail;
            let c = if shown && b.is_ascii_graphic() {
                char::from(b)
            } else {
                '*'
            };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

impl fmt::Debug for MaskedPan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Fields whose content never appears in logs: expiry, track data, PIN block, EMV
/// data, MACs.
fn hidden(n: u8) -> bool {
    matches!(n, 14 | 35 | 36 | 45 | 52 | 55 | 64 | 96 | 128)
}

/// Fields shown masked like a card number (PAN, extended PAN, account ids).
fn masked(n: u8) -> bool {
    matches!(n, 2 | 34 | 102 | 103)
}

/// A field value made safe for logs and dumps: card numbers masked, sensitive
/// fields hidden (only their length shown), printable text quoted, binary as a length.
pub struct LoggedField<'a> {
    number: u8,
    value: &'a [u8],
}

/// Wraps field `number`'s `value` for display in logs.
pub fn field_for_log(number: u8, value: &[u8]) -> LoggedField<'_> {
    LoggedField { number, value }
}

impl fmt::Display for LoggedField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.value;
        if hidden(self.number) {
            write!(f, "<{} bytes hidden>", v.len())
        } else if masked(self.number) {
            write!(f, "{}", mask_pan(v))
        } else if v.iter().all(|b| (0x20..=0x7e).contains(b)) {
            write!(f, "{:?}", String::from_utf8_lossy(v))
        } else {
            write!(f, "<{} bytes>", v.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_fields_never_show() {
        assert_eq!(
            field_for_log(2, b"4111111111111111").to_string(),
            "411111******1111"
        );
        assert_eq!(
            field_for_log(35, b"4111111111111111=2512").to_string(),
            "<21 bytes hidden>"
        );
        assert_eq!(
            field_for_log(4, b"000000001000").to_string(),
            "\"000000001000\""
        );
        assert_eq!(field_for_log(127, &[0, 1]).to_string(), "<2 bytes>");
    }

    #[test]
    fn masks_middle_digits() {
        assert_eq!(
            mask_pan(b"4111111111111111").to_string(),
            "411111******1111"
        );
        assert_eq!(
            mask_pan(b"5500000000000004").to_string(),
            "550000******0004"
        );
        assert_eq!(mask_pan(b"123456789012").to_string(), "********9012");
        assert_eq!(mask_pan(b"1234567").to_string(), "*******");
        assert_eq!(mask_pan(b"").to_string(), "");
    }
}
