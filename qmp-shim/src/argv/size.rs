//! QEMU size strings (`qemu_strtosz`): `256`, `256M`, `1G`, `512k`, `1.5G`.

/// Parses `s`; a number without suffix is multiplied by `default_unit`
/// (1 MiB for `-m 256`, 1 byte elsewhere). Suffixes B, K, M, G, T, P, E
/// (any case) are powers of 1024. Returns `None` on overflow or bad syntax.
pub fn parse_size(s: &str, default_unit: u64) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return None;
    }
    let unit: u64 = match suffix {
        "" => default_unit,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return None,
    };
    match number.split_once('.') {
        None => number.parse::<u64>().ok()?.checked_mul(unit),
        Some((int, frac)) => {
            // Fractions only with an explicit suffix, like QEMU.
            if suffix.is_empty() || frac.is_empty() || frac.contains('.') {
                return None;
            }
            let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
            let scale = 10u64.checked_pow(u32::try_from(frac.len()).ok()?)?;
            let frac: u64 = frac.parse().ok()?;
            let whole = int.checked_mul(unit)?;
            let part = u128::from(frac) * u128::from(unit) / u128::from(scale);
            whole.checked_add(u64::try_from(part).ok()?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256", 1 << 20), Some(256 << 20));
        assert_eq!(parse_size("256M", 1), Some(256 << 20));
        assert_eq!(parse_size("1G", 1 << 20), Some(1 << 30));
        assert_eq!(parse_size("512k", 1), Some(512 << 10));
        assert_eq!(parse_size("1.5G", 1), Some(3 << 29));
        assert_eq!(parse_size("4096B", 1 << 20), Some(4096));
        assert_eq!(parse_size("", 1), None);
        assert_eq!(parse_size("12X", 1), None);
        assert_eq!(parse_size("1.5", 1 << 20), None);
        assert_eq!(parse_size("99999999999999E", 1), None);
    }
}
