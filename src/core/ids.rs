//! Institution identifiers (DE32 acquiring, DE100 receiving): up to 11 digits.

use std::fmt;
use std::str::FromStr;

/// Digits an institution id may have (DE32 and DE100 are n..11).
pub const INSTITUTION_ID_DIGITS_MAX: usize = 11;

/// An institution id held as a number plus its digit count, so `"0042"` and `"42"`
/// stay distinct and comparing ids never allocates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstitutionId(u64);

impl InstitutionId {
    /// Parses 1..=11 ASCII digits; `None` otherwise.
    #[inline]
    pub fn from_digits(digits: &[u8]) -> Option<InstitutionId> {
        if digits.is_empty() || digits.len() > INSTITUTION_ID_DIGITS_MAX {
            return None;
        }
        let mut value = 0u64;
        for &b in digits {
            if !b.is_ascii_digit() {
                return None;
            }
            value = value * 10 + u64::from(b - b'0');
        }
        Some(InstitutionId(((digits.len() as u64) << 40) | value))
    }

    fn digits(self) -> usize {
        (self.0 >> 40) as usize
    }

    fn value(self) -> u64 {
        self.0 & ((1 << 40) - 1)
    }

    /// The packed form (digit count and value), for compact storage.
    pub fn to_raw(self) -> u64 {
        self.0
    }

    /// The id whose packed form is `raw` (as stored by [`InstitutionId::to_raw`]);
    /// `None` if it does not describe 1..=11 digits.
    pub fn from_raw(raw: u64) -> Option<InstitutionId> {
        let id = InstitutionId(raw);
        let digits = id.digits();
        let fits = (1..=INSTITUTION_ID_DIGITS_MAX).contains(&digits)
            && id.value() < 10u64.pow(digits as u32);
        fits.then_some(id)
    }

    /// Writes the digits into `out`, returning the used prefix.
    pub fn write_digits(self, out: &mut [u8; INSTITUTION_ID_DIGITS_MAX]) -> &[u8] {
        let n = self.digits();
        let mut v = self.value();
        for slot in out[..n].iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        &out[..n]
    }
}

impl fmt::Display for InstitutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:0width$}", self.value(), width = self.digits())
    }
}

impl fmt::Debug for InstitutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a text is not an institution id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an institution id is 1 to 11 digits")]
pub struct InstitutionIdError;

impl FromStr for InstitutionId {
    type Err = InstitutionIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InstitutionId::from_digits(s.as_bytes()).ok_or(InstitutionIdError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_leading_zeros() {
        let a: InstitutionId = "0042".parse().unwrap();
        let b: InstitutionId = "42".parse().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string(), "0042");
        let mut buf = [0u8; INSTITUTION_ID_DIGITS_MAX];
        assert_eq!(a.write_digits(&mut buf), b"0042");
        assert_eq!(
            "99999999999".parse::<InstitutionId>().unwrap().to_string(),
            "99999999999"
        );
        assert!("123456789012".parse::<InstitutionId>().is_err());
        assert!("12a".parse::<InstitutionId>().is_err());
        assert!("".parse::<InstitutionId>().is_err());
    }
}
