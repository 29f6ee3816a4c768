//! DE7 (transmission date and time, MMDDhhmmss UTC) for the messages the switch
//! originates: a pure function of a Unix time passed in (the caller reads the
//! clock), the calendar by the `time` crate.

use time::OffsetDateTime;

/// DE7 for a Unix time in seconds: MMDDhhmmss, UTC (a time out of the calendar's
/// range gives the epoch's).
pub fn de7(unix_secs: u64) -> [u8; 10] {
    let at = i64::try_from(unix_secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let parts = [
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
    ];
    let mut out = [b'0'; 10];
    for (i, v) in parts.into_iter().enumerate() {
        out[2 * i] = b'0' + v / 10;
        out[2 * i + 1] = b'0' + v % 10;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn de7_is_month_day_and_time_of_day() {
        assert_eq!(&de7(0), b"0101000000");
        assert_eq!(&de7(59 * 86_400), b"0301000000"); // 1970 is not a leap year
        assert_eq!(&de7(19_782 * 86_400 + 86_398), b"0229235958"); // 2024-02-29
        assert_eq!(&de7(1_764_149_400), b"1126093000"); // 2025-11-26 09:30:00
        assert_eq!(&de7(u64::MAX), b"0101000000");
    }
}
