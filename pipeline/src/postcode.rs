//! UK postcodes in `pcds` form (`AB10 1AA`): outcode, a space, a 3-character incode.

/// Normalises a postcode in any spacing or case (`ab101aa`, `AB10  1AA`, ONS
/// 7-character `pcd` form `DE1 0AA`) to `pcds` form. Returns `None` when what is
/// left after removing white space is not 5 to 7 ASCII alphanumerics.
pub fn to_pcds(raw: &str) -> Option<String> {
    let compact: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
    if !(5..=7).contains(&compact.len()) || !compact.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let upper = compact.to_ascii_uppercase();
    let split = upper.len() - 3;
    Some(format!("{} {}", &upper[..split], &upper[split..]))
}

/// Splits a `pcds` postcode into (outcode, incode).
pub fn outcode_incode(pcds: &str) -> (&str, &str) {
    pcds.split_once(' ').unwrap_or((pcds, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_ons_and_loose_forms() {
        assert_eq!(to_pcds("AB101AA").as_deref(), Some("AB10 1AA"));
        assert_eq!(to_pcds("DE1 0AA").as_deref(), Some("DE1 0AA"));
        assert_eq!(to_pcds("w1a 0ax").as_deref(), Some("W1A 0AX"));
        assert_eq!(to_pcds("EC1A1BB").as_deref(), Some("EC1A 1BB"));
        assert_eq!(to_pcds("M1  1AE").as_deref(), Some("M1 1AE"));
        assert_eq!(to_pcds("ABC"), None);
        assert_eq!(to_pcds("AB1-0AA"), None);
        assert_eq!(outcode_incode("EC1A 1BB"), ("EC1A", "1BB"));
    }
}
