//! Memory sizes as users write them in `mem_limit` / `memswap_limit` (`128m`, `1g`, `100000b`).
//!
//! Pure. Follows docker-py's `parse_bytes`, which the Python worker relies on: units are
//! powers of 1024, a bare number is bytes, the number may be a decimal, an empty string is 0.

/// Parses a docker-py memory string into bytes.
///
/// Rules, as docker-py applies them: a trailing `b`/`B` after another letter is dropped
/// (`64mb` → `64m`); the last character is the unit (`b`, `k`, `m`, `g`, any case) unless it
/// is a digit (then the whole string is bytes); the rest is read as a decimal number and the
/// product truncated. Surrounding spaces are allowed around the number, not after the unit.
///
/// # Errors
/// docker-py's messages: an unknown unit ("should specify the units"), or a number that does
/// not parse ("Failed converting …"). A number too large for the Engine (or not finite) is
/// reported with the second message too.
pub fn parse_bytes(text: &str) -> Result<i64, String> {
    if text.is_empty() {
        return Ok(0);
    }
    let mut s = text;
    let mut tail = s.chars().rev();
    if let (Some(last), Some(before)) = (tail.next(), tail.next())
        && last.is_alphabetic()
        && before.is_alphabetic()
        && matches!(last, 'b' | 'B')
    {
        s = &s[..s.len() - 1];
    }
    let Some(suffix) = s.chars().next_back() else {
        return Ok(0);
    };
    let (digits, multiplier) = if suffix.is_numeric() {
        (s, 1_f64)
    } else {
        let digits = &s[..s.len() - suffix.len_utf8()];
        let multiplier = match suffix.to_ascii_lowercase() {
            'b' => 1_f64,
            'k' => 1024_f64,
            'm' => 1024_f64 * 1024.0,
            'g' => 1024_f64 * 1024.0 * 1024.0,
            _ => {
                return Err(format!(
                    "The specified value for memory ({s}) should specify the units. The postfix should be one of the `b` `k` `m` `g` characters"
                ));
            }
        };
        (digits, multiplier)
    };
    let failed =
        || format!("Failed converting the string value for memory ({digits}) to an integer.");
    // An exact integer needs no float (and keeps precision above 2^53).
    if multiplier == 1.0
        && let Ok(n) = digits.trim().parse::<i64>()
    {
        return Ok(n);
    }
    let value = python_float(digits).ok_or_else(failed)?;
    let bytes = (value * multiplier).trunc();
    // i64::MAX as f64 rounds up to 2^63, so the upper bound is exclusive; the cast below
    // cannot truncate.
    if !bytes.is_finite() || bytes >= i64::MAX as f64 || bytes < i64::MIN as f64 {
        return Err(failed());
    }
    Ok(bytes as i64)
}

/// Python's `float(str)` for the forms people write: surrounding whitespace, a sign,
/// decimals, exponents, and `_` between digits (`1_000`).
fn python_float(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.contains('_') {
        let bytes = t.as_bytes();
        let between_digits = bytes.iter().enumerate().all(|(i, b)| {
            *b != b'_'
                || (i > 0
                    && bytes[i - 1].is_ascii_digit()
                    && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
        });
        if !between_digits {
            return None;
        }
        return t.replace('_', "").parse().ok();
    }
    t.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        // Expected values from docker-py 7.2.0's parse_bytes.
        for (text, bytes) in [
            ("", 0),
            ("100000b", 100_000),
            ("100000", 100_000),
            ("100B", 100),
            ("1000k", 1_024_000),
            ("128m", 134_217_728),
            ("64mb", 67_108_864),
            ("64MB", 67_108_864),
            ("64Mb", 67_108_864),
            ("1g", 1_073_741_824),
            ("1.5g", 1_610_612_736),
            ("-1", -1),
            ("-1m", -1_048_576),
            ("+5k", 5120),
            (" 64m", 67_108_864),
            (" 64", 64),
            ("1e3k", 1_024_000),
            ("1_000k", 1_024_000),
            ("0.5", 0),
            ("1.5", 1),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text:?}");
        }
    }

    #[test]
    fn docker_py_messages() {
        // Messages from docker-py 7.2.0's parse_bytes for the same inputs.
        let units = |v: &str| {
            format!(
                "The specified value for memory ({v}) should specify the units. The postfix should be one of the `b` `k` `m` `g` characters"
            )
        };
        let failed =
            |v: &str| format!("Failed converting the string value for memory ({v}) to an integer.");
        assert_eq!(parse_bytes("12x"), Err(units("12x")));
        // The trailing `b` is dropped before the unit is read, and the message shows that.
        assert_eq!(parse_bytes("12xb"), Err(units("12x")));
        assert_eq!(parse_bytes("64m "), Err(units("64m ")));
        assert_eq!(parse_bytes("inf"), Err(units("inf")));
        assert_eq!(parse_bytes("kb"), Err(failed("")));
        assert_eq!(parse_bytes("m"), Err(failed("")));
        assert_eq!(parse_bytes("b"), Err(failed("")));
        assert_eq!(parse_bytes("abcm"), Err(failed("abc")));
        assert_eq!(parse_bytes("1,5m"), Err(failed("1,5")));
        assert_eq!(parse_bytes("0x10"), Err(failed("0x10")));
        assert_eq!(parse_bytes("1__0k"), Err(failed("1__0")));
        // docker-py raises a bare Python error for NaN and hands the Engine a number it
        // rejects for a huge one; both get the conversion message here.
        assert_eq!(parse_bytes("nanm"), Err(failed("nan")));
        assert_eq!(parse_bytes("1e300g"), Err(failed("1e300")));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::parse_bytes;
    use crate::job::strategies::{config, joined, text};

    /// Pieces of memory strings: signs, digits, decimals, exponents, `_`, units, spaces.
    const PIECES: &[&str] = &[
        "0", "1", "5", "9", "12", "999999", ".", "e", "E", "+", "-", "_", " ", "b", "B", "k", "K",
        "m", "M", "g", "G", "x", "é",
    ];

    proptest! {
        #![proptest_config(config(512))]

        /// Any text is bytes or docker-py's message, never a panic; a size re-parses equal
        /// written as plain bytes or with a `b` unit.
        #[test]
        fn any_text_parses_or_is_refused(s in prop_oneof![text(), joined(PIECES, 8)]) {
            if let Ok(n) = parse_bytes(&s) {
                prop_assert_eq!(parse_bytes(&n.to_string()), Ok(n));
                prop_assert_eq!(parse_bytes(&format!("{n}b")), Ok(n));
            }
        }

        /// A whole number with a unit is that many powers of 1024, with or without a trailing
        /// `b`, in any case.
        #[test]
        fn units_multiply(n in 0i64..1 << 30, unit in 0usize..4, upper: bool, trailing_b: bool) {
            let letter = ["b", "k", "m", "g"][unit];
            let letter = if upper { letter.to_ascii_uppercase() } else { letter.to_owned() };
            let b = if trailing_b && unit > 0 { "b" } else { "" };
            let expected = n << (10 * unit);
            prop_assert_eq!(parse_bytes(&format!("{n}{letter}{b}")), Ok(expected));
        }
    }
}
