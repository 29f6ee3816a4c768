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

#[cfg(test)]
mod tests {
    use super::*;

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
