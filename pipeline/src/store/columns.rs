//! Column lists of the store's SQL that include the area columns, built once
//! from [`Area::COLUMNS`] (the schema in `migrations/` spells them too).

use std::sync::LazyLock;

use crate::lookup::Area;

/// The answer columns of a lookup, in this order: status, postcode,
/// distance_m, result, error, then [`Area::COLUMNS`].
pub(crate) static ANSWER: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    ["status", "postcode", "distance_m", "result", "error"]
        .into_iter()
        .chain(Area::COLUMNS)
        .collect()
});

/// The columns of `point_results` a [`super::ResultRow`] is read from, in its
/// field order: row_number, fields, status, postcode, distance_m, the area, error.
pub(crate) static RESULT: LazyLock<String> = LazyLock::new(|| {
    ["row_number", "fields", "status", "postcode", "distance_m"]
        .into_iter()
        .chain(Area::COLUMNS)
        .chain(["error"])
        .collect::<Vec<_>>()
        .join(", ")
});

/// The packed answer the SQLite export keeps in memory: status, postcode, the
/// area, error (see `sqlite/export.rs`).
pub(crate) static PACKED: LazyLock<String> = LazyLock::new(|| {
    ["status", "postcode"]
        .into_iter()
        .chain(Area::COLUMNS)
        .chain(["error"])
        .collect::<Vec<_>>()
        .join(", ")
});

/// `SELECT <RESULT> FROM point_results WHERE import_id = <import> <rest>`.
pub(crate) fn select_results(import: &str, rest: &str) -> String {
    format!(
        "SELECT {} FROM point_results WHERE import_id = {import} {rest}",
        *RESULT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_hold_the_area_columns_in_order() {
        assert_eq!(
            *RESULT,
            "row_number, fields, status, postcode, distance_m, outcode, incode, country, region, admin_district, admin_county, admin_ward, parish, parliamentary_constituency, lsoa, msoa, admin_district_code, admin_county_code, admin_ward_code, parish_code, parliamentary_constituency_code, lsoa_code, msoa_code, error"
        );
        assert_eq!(ANSWER.len(), 5 + 18);
        assert!(PACKED.starts_with("status, postcode, outcode,") && PACKED.ends_with("msoa_code, error"));
    }
}
