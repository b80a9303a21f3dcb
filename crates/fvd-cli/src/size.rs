//! Byte counts in qemu-img's notation: parsing (`512`, `64K`, `1.5G`,
//! `0x1000`) and printing (`2.06 MiB` the way `qemu-img info` shows sizes,
//! `1.001 KiB` the way `qemu-io` reports transfers).

/// Binary unit suffixes, in increasing order, with their shift.
const SUFFIXES: [(char, u32); 7] = [
    ('b', 0),
    ('k', 10),
    ('m', 20),
    ('g', 30),
    ('t', 40),
    ('p', 50),
    ('e', 60),
];

/// Parse a byte count: a decimal or `0x` hexadecimal integer, or a decimal
/// fraction, optionally followed by one of the binary suffixes
/// `b k m g t p e` (either case; `k` = 1024). The result must be a whole
/// number of bytes that fits in 64 bits.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let bad = || format!("invalid size '{text}'");
    if s.is_empty() {
        return Err(bad());
    }
    let (num, shift) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() && !is_hex_tail(s) => {
            let lc = c.to_ascii_lowercase();
            let shift = SUFFIXES
                .iter()
                .find(|(k, _)| *k == lc)
                .map(|(_, sh)| *sh)
                .ok_or_else(|| format!("invalid size '{text}': unknown suffix '{c}'"))?;
            (&s[..s.len() - 1], shift)
        }
        _ => (s, 0),
    };
    let value: u128 = if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) || hex.len() > 16 {
            return Err(bad());
        }
        let v = u128::from_str_radix(hex, 16).map_err(|_| bad())?;
        v << shift
    } else {
        let (int, frac) = match num.split_once('.') {
            Some((i, f)) => (i, f),
            None => (num, ""),
        };
        let digits = |d: &str| d.chars().all(|c| c.is_ascii_digit());
        if (int.is_empty() && frac.is_empty())
            || !digits(int)
            || !digits(frac)
            || int.len() > 20
            || frac.len() > 20
        {
            return Err(bad());
        }
        let int_v: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let frac_v: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| bad())?
        };
        let scale = 10u128.pow(frac.len() as u32);
        let scaled = (int_v * scale + frac_v) << shift;
        if !scaled.is_multiple_of(scale) {
            return Err(format!(
                "invalid size '{text}': it is not a whole number of bytes"
            ));
        }
        scaled / scale
    };
    u64::try_from(value).map_err(|_| format!("invalid size '{text}': too large"))
}

/// True if the trailing letter of `s` belongs to a hexadecimal number
/// (`0x1b` is 27 bytes, not 1 byte-suffixed).
fn is_hex_tail(s: &str) -> bool {
    (s.starts_with("0x") || s.starts_with("0X"))
        && s[2..].chars().all(|c| c.is_ascii_hexdigit())
        && !s[2..].is_empty()
}

/// Unit names for [`human`], from bytes up.
const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// A size as `qemu-img info` prints it: three significant digits and a
/// binary unit (`10 MiB`, `2.06 MiB`, `196 KiB`, `0 B`).
pub fn human(bytes: u64) -> String {
    let i = if bytes == 0 {
        0
    } else {
        (63 - bytes.leading_zeros()) as usize / 10
    };
    let v = bytes as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}", three_digits(v), UNITS[i])
}

/// `v` with three significant digits and no trailing zeros (`%.3g` without
/// the exponent form).
fn three_digits(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A value as `qemu-io` prints transfer sizes and rates: `1 MiB`,
/// `1.001 KiB`, `48 bytes` (three decimals unless they are all zero).
pub fn io_units(value: f64) -> String {
    const NAMES: [&str; 6] = [" EiB", " PiB", " TiB", " GiB", " MiB", " KiB"];
    let mut v = value;
    let mut suffix = " bytes";
    for (k, name) in NAMES.iter().enumerate() {
        let unit = (1u64 << (10 * (6 - k))) as f64;
        if value >= unit {
            v = value / unit;
            suffix = name;
            break;
        }
    }
    let s = format!("{v:.3}");
    match s.strip_suffix(".000") {
        Some(whole) => format!("{whole}{suffix}"),
        None => format!("{s}{suffix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_suffixed() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size("4096b"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0x1b"), Ok(27));
        assert_eq!(parse_size("0x10k"), Ok(16 << 10));
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "k",
            "1.5",
            "1.3k",
            "-1",
            "1x",
            "12Q",
            "0x",
            "0xg",
            "1..2",
            "99999999999999999999G",
        ] {
            assert!(parse_size(s).is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(10 << 20), "10 MiB");
        assert_eq!(human(2_162_688), "2.06 MiB");
        assert_eq!(human(200_704), "196 KiB");
    }

    #[test]
    fn io_unit_strings() {
        assert_eq!(io_units(1048576.0), "1 MiB");
        assert_eq!(io_units(48.0), "48 bytes");
        assert_eq!(io_units(1025.0), "1.001 KiB");
        assert_eq!(io_units(0.0), "0 bytes");
        assert_eq!(io_units(9_371_648.0), "8.938 MiB");
    }
}
