//! Sizes and rates as humans write them (`1GiB`, `512KiB`, `10MiB/s`), for every flag and
//! config value that takes one. Parsing is `bytesize`'s; this module fixes the error wording.

/// Why a size or rate does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a {what} (write it like {example})")]
pub struct UnitError {
    pub value: String,
    pub what: &'static str,
    pub example: &'static str,
}

/// Parses a size in bytes: `4096`, `512KiB`, `1GiB`, `1GB`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    s.trim().parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|_| UnitError {
        value: s.to_owned(),
        what: "size",
        example: "512KiB, 1GiB",
    })
}

/// Parses a rate in bytes per second: `10MiB/s` (the `/s` may be left out).
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    parse_size(t).map_err(|_| UnitError { value: s.to_owned(), what: "rate", example: "10MiB/s" })
}

/// A size for people: `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_parse_as_written_in_the_contract() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_rate("10MiB/s"), Ok(10 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_rate("fast/s").unwrap_err().to_string().contains("10MiB/s"));
    }
}
