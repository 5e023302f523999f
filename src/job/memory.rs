//! Memory sizes as users write them in `mem_limit` / `memswap_limit` (`128m`, `1g`, `100000b`).
//!
//! Pure. Units are powers of 1024, as docker-py parses them.

/// Parses a docker-py memory string into bytes.
///
/// # Errors
/// The reference's message when the unit is not one of `b`, `k`, `m`, `g`, or the number is bad.
pub fn parse_bytes(text: &str) -> Result<i64, String> {
    let s = text.trim();
    let bad_unit = || {
        format!(
            "The specified value for memory ({text}) should specify the units. The postfix should be one of the `b` `k` `m` `g` characters"
        )
    };
    if s.is_empty() {
        return Err(bad_unit());
    }
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let lower = s.to_ascii_lowercase();
    let mut body = lower.as_str();
    if body.len() > 1 && body.ends_with('b') {
        let without_b = &body[..body.len() - 1];
        if without_b.ends_with(['k', 'm', 'g']) || without_b.parse::<f64>().is_ok() {
            body = without_b;
        }
    }
    let (number, multiplier) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1024_f64),
        Some('m') => (&body[..body.len() - 1], 1024_f64 * 1024.0),
        Some('g') => (&body[..body.len() - 1], 1024_f64 * 1024.0 * 1024.0),
        Some(c) if c.is_ascii_digit() => (body, 1.0),
        _ => return Err(bad_unit()),
    };
    let value: f64 = number.trim().parse().map_err(|_| bad_unit())?;
    if !value.is_finite() {
        return Err(bad_unit());
    }
    Ok((value * multiplier) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_bytes("100000b"), Ok(100_000));
        assert_eq!(parse_bytes("100000"), Ok(100_000));
        assert_eq!(parse_bytes("1000k"), Ok(1_024_000));
        assert_eq!(parse_bytes("128m"), Ok(134_217_728));
        assert_eq!(parse_bytes("64mb"), Ok(67_108_864));
        assert_eq!(parse_bytes("1g"), Ok(1_073_741_824));
        assert_eq!(parse_bytes("1.5g"), Ok(1_610_612_736));
        assert_eq!(parse_bytes("-1"), Ok(-1));
    }

    #[test]
    fn bad_units_are_explained() {
        let err = parse_bytes("12x").unwrap_err();
        assert!(err.contains("(12x) should specify the units"), "{err}");
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("m").is_err());
    }
}
