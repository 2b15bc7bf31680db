//! Sizes and CPU amounts as people write them: `512Mi`, `4Gi`, `1G`, `1.5`, `500m`.

/// Parses a byte size: a number with an optional suffix `K`, `M`, `G`, `T` (powers of 1000),
/// `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024) or `k`/`m`/`g` shorthand (1024-based, as docker).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let mult: u64 = match suffix.trim() {
        "" | "B" | "b" => 1,
        "K" | "KB" => 1000,
        "M" | "MB" => 1000_u64.pow(2),
        "G" | "GB" => 1000_u64.pow(3),
        "T" | "TB" => 1000_u64.pow(4),
        "Ki" | "KiB" | "k" | "kb" => 1 << 10,
        "Mi" | "MiB" | "m" | "mb" => 1 << 20,
        "Gi" | "GiB" | "g" | "gb" => 1 << 30,
        "Ti" | "TiB" | "t" | "tb" => 1 << 40,
        _ => return Err(invalid_size(s)),
    };
    let value: f64 = num.parse().map_err(|_| invalid_size(s))?;
    if !value.is_finite() || value < 0.0 {
        return Err(invalid_size(s));
    }
    let bytes = value * mult as f64;
    if bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as u64)
}

fn invalid_size(s: &str) -> String {
    format!("invalid quantity {s:?}: use a number with an optional suffix such as 512Mi, 4Gi or 1G")
}

/// Parses a CPU amount into thousandths of a CPU: `2`, `0.5`, `500m`.
pub fn parse_cpu_millis(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "invalid CPU amount {s:?}: use a number of CPUs such as 2 or 0.5, or millicpus such as 500m"
        )
    };
    let millis = if let Some(m) = t.strip_suffix('m') {
        m.parse::<u64>().map_err(|_| bad())?
    } else {
        let v: f64 = t.parse().map_err(|_| bad())?;
        if !v.is_finite() || !(0.0..=1_000_000.0).contains(&v) {
            return Err(bad());
        }
        (v * 1000.0).round() as u64
    };
    Ok(millis)
}

/// Parses a duration into milliseconds: a number (fractions allowed) with a unit `ms`, `s`,
/// `m`, `h` or `d`: `500ms`, `30s`, `1.5m`, `2h`. A bare number is seconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad =
        || format!("invalid duration {s:?}: use a number with ms, s, m, h or d, such as 30s or 5m");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit {
        "ms" => 1.0,
        "" | "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return Err(bad()),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    let ms = v * mult;
    if !ms.is_finite() || ms < 0.0 || ms > u64::MAX as f64 / 2.0 {
        return Err(bad());
    }
    Ok(ms.round() as u64)
}

/// Formats milliseconds for people: `500ms`, `30s`, `5m`, `1h30m`.
pub fn format_duration_ms(ms: u64) -> String {
    if ms < 1000 || !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, 0) => format!("{h}h{m}m"),
        (h, m, sec) => format!("{h}h{m}m{sec}s"),
    }
}

/// Formats bytes for people: `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("30s").unwrap(), 30_000);
        assert_eq!(parse_duration_ms("30").unwrap(), 30_000);
        assert_eq!(parse_duration_ms("1.5m").unwrap(), 90_000);
        assert_eq!(parse_duration_ms("2h").unwrap(), 7_200_000);
        for bad in ["", "5x", "-1s", "s", "1e400s", "1..2s"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration_ms(90_000), "1m30s");
        assert_eq!(format_duration_ms(1500), "1500ms");
        assert_eq!(format_duration_ms(7_200_000), "2h");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4Gi").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert_eq!(parse_bytes("256m").unwrap(), 256 << 20);
        assert!(parse_bytes("4XB").unwrap_err().contains("4XB"));
        assert!(parse_bytes("-1Gi").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("1e300").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpu_millis("2").unwrap(), 2000);
        assert_eq!(parse_cpu_millis("0.5").unwrap(), 500);
        assert_eq!(parse_cpu_millis("250m").unwrap(), 250);
        assert!(parse_cpu_millis("two").is_err());
        assert!(parse_cpu_millis("-1").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }
}
