//! How a coordinate field becomes WGS84 degrees (README "CSV input rules").
//!
//! Accepted, with surrounding spaces ignored:
//! - decimal degrees with an optional sign: `51.5014`, `-0.1419`, `+51.5`; a
//!   decimal comma when the file's delimiter is not a comma (`51,5014` in a
//!   `;` file);
//! - a hemisphere letter before or after, the sign coming from the letter:
//!   `51.5014N`, `N51.5014`, `0.1419 W` (N/S on a latitude, E/W on a
//!   longitude, any case);
//! - degrees, minutes and seconds, or degrees and decimal minutes, with `°`,
//!   `'`/`′`, `"`/`″`, `d`/`m`/`s` or spaces between the parts:
//!   `51°30'05"N`, `51 30 05.2 N`, `N51 30.08`, `-0°08'31"`.
//!
//! Refused (the row becomes `invalid` with the reason): a letter and a minus
//! sign together (`-51.5N`: which sign is meant?), a letter of the other axis
//! (`51.5E` for a latitude), minutes or seconds outside 0..60, fractional
//! degrees followed by minutes, NaN and infinities. A number with a letter is
//! never read with the sign the letter does not give.

/// Which coordinate a field holds: it decides the hemisphere letters allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Latitude,
    Longitude,
}

/// Parses a coordinate field into degrees (see the module docs); `delimiter`
/// is the file's field delimiter (a decimal comma is read only when it is not
/// a comma). The error says why, without the line (the caller adds it).
pub fn parse_coordinate(field: &str, delimiter: u8, axis: Axis) -> Result<f64, String> {
    let t = field.trim();
    if t.is_empty() {
        return Err("is empty".into());
    }
    let (body, letter) = split_hemisphere(t);
    let negative_letter = match letter {
        None => false,
        Some(l) => hemisphere_sign(l, axis).map_err(|e| format!("{t:?}: {e}"))?,
    };
    let body = body.trim();
    let (sign, unsigned) = match body.as_bytes().first() {
        Some(b'-') => (-1.0, &body[1..]),
        Some(b'+') => (1.0, &body[1..]),
        _ => (1.0, body),
    };
    if letter.is_some() && body.starts_with(['-', '+']) {
        return Err(format!(
            "{t:?} has both a sign and a hemisphere letter; give one of them"
        ));
    }
    let magnitude = if is_sexagesimal(unsigned) {
        parse_sexagesimal(unsigned, delimiter).map_err(|e| format!("{t:?}: {e}"))?
    } else {
        parse_decimal(unsigned, delimiter).ok_or_else(|| describe_bad_number(t))?
    };
    let value = if negative_letter {
        -magnitude
    } else {
        sign * magnitude
    };
    Ok(value)
}

/// Parses a plain decimal number field (no letters, no minutes): what the
/// header detection asks of a field to call it numeric.
pub fn parse_degrees(field: &str, delimiter: u8) -> Result<f64, String> {
    let t = field.trim();
    if t.is_empty() {
        return Err("is empty".into());
    }
    let (sign, unsigned) = match t.as_bytes()[0] {
        b'-' => (-1.0, &t[1..]),
        b'+' => (1.0, &t[1..]),
        _ => (1.0, t),
    };
    parse_decimal(unsigned, delimiter)
        .map(|v| sign * v)
        .ok_or_else(|| describe_bad_number(t))
}

fn describe_bad_number(t: &str) -> String {
    let lower = t.to_ascii_lowercase();
    if lower.contains("nan") || lower.contains("inf") {
        format!("{t:?} is not a finite number")
    } else {
        format!("{t:?} is not a number")
    }
}

/// A hemisphere letter at the start or end of `t`, and the rest.
fn split_hemisphere(t: &str) -> (&str, Option<char>) {
    let is_hemisphere = |c: char| matches!(c.to_ascii_uppercase(), 'N' | 'S' | 'E' | 'W');
    let first = t.chars().next().expect("not empty");
    let last = t.chars().next_back().expect("not empty");
    // A unit mark (`51d30m05sN`) may stand before a trailing letter; another letter may not.
    let before_last = t[..t.len() - last.len_utf8()].chars().next_back();
    let mark_or_not_letter =
        |c: Option<char>| c.is_none_or(|c| !c.is_alphabetic() || matches!(c, 'd' | 'm' | 's'));
    if t.len() > 1 && is_hemisphere(last) && mark_or_not_letter(before_last) {
        return (&t[..t.len() - last.len_utf8()], Some(last.to_ascii_uppercase()));
    }
    if t.len() > 1 && is_hemisphere(first) && !t[1..].starts_with(char::is_alphabetic) {
        return (&t[1..], Some(first.to_ascii_uppercase()));
    }
    (t, None)
}

/// Whether the letter makes the value negative; an error for the other axis's letter.
fn hemisphere_sign(letter: char, axis: Axis) -> Result<bool, String> {
    match (axis, letter) {
        (Axis::Latitude, 'N') | (Axis::Longitude, 'E') => Ok(false),
        (Axis::Latitude, 'S') | (Axis::Longitude, 'W') => Ok(true),
        (Axis::Latitude, l) => Err(format!("{l} is a longitude hemisphere (N or S expected)")),
        (Axis::Longitude, l) => Err(format!("{l} is a latitude hemisphere (E or W expected)")),
    }
}

/// A decimal number without sign: digits with at most one `.` (or a decimal
/// comma when the delimiter is not a comma). `None` for anything else.
fn parse_decimal(t: &str, delimiter: u8) -> Option<f64> {
    let owned;
    let t = if delimiter != b',' && t.contains(',') && !t.contains('.') && t.matches(',').count() == 1 {
        owned = t.replace(',', ".");
        owned.as_str()
    } else {
        t
    };
    let digits_and_point = !t.is_empty()
        && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && t.bytes().any(|b| b.is_ascii_digit())
        && t.matches('.').count() <= 1;
    if !digits_and_point {
        // Still accept what Rust's float parser accepts of plain numbers (`1e-3`).
        let v: f64 = t.parse().ok()?;
        return (v.is_finite() && !t.starts_with(['-', '+']) && !t.to_ascii_lowercase().contains("inf"))
            .then_some(v);
    }
    t.parse().ok()
}

/// Unit marks between degrees, minutes and seconds.
const MARKS: [char; 9] = ['°', 'º', '\'', '′', '"', '″', 'd', 'm', 's'];

/// Whether `t` is written in degrees and minutes (and seconds), not as one number.
fn is_sexagesimal(t: &str) -> bool {
    t.contains(MARKS) || t.trim().contains(char::is_whitespace)
}

/// `D M S`, `D M.m` or `D°` forms: the parts are split at unit marks and
/// spaces; each but the last must be whole; minutes and seconds below 60.
fn parse_sexagesimal(t: &str, delimiter: u8) -> Result<f64, String> {
    let parts: Vec<&str> = t
        .split(|c: char| MARKS.contains(&c) || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() || parts.len() > 3 {
        return Err("is not degrees, minutes and seconds".into());
    }
    let mut values = Vec::with_capacity(3);
    for (i, p) in parts.iter().enumerate() {
        let v = parse_decimal(p, delimiter).ok_or_else(|| format!("{p:?} is not a number"))?;
        if i + 1 < parts.len() && v.fract() != 0.0 {
            return Err(format!("{p:?} must be whole when minutes or seconds follow"));
        }
        if i > 0 && v >= 60.0 {
            return Err(format!("{p:?} is not below 60"));
        }
        values.push(v);
    }
    let scale = [1.0, 60.0, 3600.0];
    Ok(values.iter().zip(scale).map(|(v, s)| v / s).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(s: &str) -> Result<f64, String> {
        parse_coordinate(s, b',', Axis::Latitude)
    }

    fn lon(s: &str) -> Result<f64, String> {
        parse_coordinate(s, b',', Axis::Longitude)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn decimal_degrees_with_signs() {
        assert_eq!(lat("51.5014"), Ok(51.5014));
        assert_eq!(lat(" -0.5 "), Ok(-0.5));
        assert_eq!(lat("+51.5"), Ok(51.5));
        assert_eq!(parse_coordinate("51,5", b';', Axis::Latitude), Ok(51.5));
        assert!(
            lat("51,5").is_err(),
            "a decimal comma in a comma file is not a number"
        );
    }

    #[test]
    fn hemisphere_letters_give_the_sign() {
        for (s, want) in [
            ("51.5014N", 51.5014),
            ("N51.5014", 51.5014),
            ("51.5 s", -51.5),
            ("S 51.5", -51.5),
        ] {
            assert_eq!(lat(s), Ok(want), "{s}");
        }
        for (s, want) in [
            ("0.1419W", -0.1419),
            ("W0.1419", -0.1419),
            ("1.5E", 1.5),
            ("0.1419 w", -0.1419),
        ] {
            assert_eq!(lon(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn degrees_minutes_seconds_and_decimal_minutes() {
        let want = 51.0 + 30.0 / 60.0 + 5.0 / 3600.0;
        for s in [
            "51°30'05\"N",
            "51° 30′ 05″ N",
            "51 30 05 N",
            "N51 30 05",
            "51d30m05sN",
        ] {
            assert!(close(lat(s).unwrap(), want), "{s}: {:?}", lat(s));
        }
        assert!(close(lat("N51 30.08").unwrap(), 51.0 + 30.08 / 60.0));
        assert!(close(lon("-0°08'31\"").unwrap(), -(8.0 / 60.0 + 31.0 / 3600.0)));
        assert!(close(lon("0°08'31\"W").unwrap(), -(8.0 / 60.0 + 31.0 / 3600.0)));
    }

    #[test]
    fn ambiguous_or_impossible_forms_are_refused() {
        for s in [
            "-51.5N",
            "N-51.5",
            "51.5E",
            "51°75'N",
            "51°30'61\"N",
            "51.5°30'",
            "NaN",
            "inf",
            "-inf",
            "N",
            "abc",
            "51.5.1",
            "1 2 3 4",
            "NN51",
            "51NE",
        ] {
            assert!(lat(s).is_err(), "{s} gave {:?}", lat(s));
        }
        assert!(lon("51.5N").is_err());
        assert!(lat("").unwrap_err().contains("empty"));
    }

    #[test]
    fn plain_numbers_for_header_detection() {
        assert_eq!(parse_degrees("51.5", b','), Ok(51.5));
        assert_eq!(parse_degrees("-2", b','), Ok(-2.0));
        assert!(parse_degrees("lat", b',').is_err());
        assert!(parse_degrees("51.5N", b',').is_err());
        assert!(parse_degrees("nan", b',').unwrap_err().contains("finite"));
    }
}
