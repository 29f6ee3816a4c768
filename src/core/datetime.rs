//! Calendar arithmetic for DE7 (transmission date and time, MMDDhhmmss UTC).
//!
//! Pure functions of a Unix time passed in; the caller reads the clock.

/// Month (1..=12) and day (1..=31) of a day count since 1970-01-01
/// (proleptic Gregorian; Howard Hinnant's civil-from-days).
pub fn month_day(days: u64) -> (u64, u64) {
    let z = days + 719_468;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (month, day)
}

/// DE7 for a Unix time in seconds: MMDDhhmmss, UTC.
pub fn de7(unix_secs: u64) -> [u8; 10] {
    let (month, day) = month_day(unix_secs / 86_400);
    let rem = unix_secs % 86_400;
    let parts = [month, day, rem / 3600, rem % 3600 / 60, rem % 60];
    let mut out = [b'0'; 10];
    for (i, v) in parts.into_iter().enumerate() {
        out[2 * i] = b'0' + (v / 10 % 10) as u8;
        out[2 * i + 1] = b'0' + (v % 10) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_and_de7() {
        assert_eq!(month_day(0), (1, 1));
        assert_eq!(month_day(59), (3, 1)); // 1970 is not a leap year
        assert_eq!(month_day(20_454), (1, 1)); // 2026-01-01
        assert_eq!(month_day(20_512), (2, 28));
        assert_eq!(month_day(19_782), (2, 29)); // 2024-02-29
        assert_eq!(&de7(19_782 * 86_400 + 86_398), b"0229235958");
    }
}
