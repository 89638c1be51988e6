//! What a provider answers: the nearest postcode to a coordinate within a radius
//! ([`Match`], with its [`Area`]), how far one request searches ([`Radius`]), and
//! an import's search settings ([`SearchPlan`]; the ladder of stages they make
//! is [`crate::ladder`]).

use serde::{Deserialize, Serialize};

/// postcodes.io's widesearch bound in metres (its `MAX_RANGE`, "search up to
/// 20km radius"); what it answers within it is its `deriveMaxRange` rule (see
/// [`crate::offline`]): nothing unless 10 postcodes lie within 19,500 m.
pub const WIDESEARCH_RADIUS_M: f64 = 20_000.0;
/// postcodes.io clamps a reverse-geocoding radius above this to this (metres).
pub const MAX_API_RADIUS_M: f64 = 2_000.0;
/// postcodes.io caps a bulk reverse-geocoding request at this many geolocations.
pub const MAX_BULK_GEOLOCATIONS: usize = 100;

/// How far one request searches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Radius {
    /// A radius in metres (postcodes.io clamps to 2000).
    Metres(f64),
    /// postcodes.io `widesearch`: the nearest, when 10 postcodes lie within
    /// 19.5 km (its `deriveMaxRange`; [`crate::offline`]).
    Widesearch,
}

impl Radius {
    /// The search radius in metres: a radius clamped to 2000, widesearch's 20 km bound.
    pub fn metres(self) -> f64 {
        match self {
            Radius::Metres(m) => m.min(MAX_API_RADIUS_M),
            Radius::Widesearch => WIDESEARCH_RADIUS_M,
        }
    }
}

/// An import's search settings: `radius_m` first, then `max_radius_m`, then
/// widesearch (the stages and their order: [`crate::ladder`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SearchPlan {
    pub radius_m: f64,
    pub max_radius_m: f64,
    pub widesearch: bool,
}

impl Default for SearchPlan {
    fn default() -> Self {
        Self {
            radius_m: 100.0,
            max_radius_m: 2000.0,
            widesearch: true,
        }
    }
}

/// Area data that comes with a postcode (postcodes.io field names; `None` when the
/// provider does not know it, e.g. the offline provider for everything but the
/// outcode and incode).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Area {
    pub outcode: Option<String>,
    pub incode: Option<String>,
    pub country: Option<String>,
    pub region: Option<String>,
    pub admin_district: Option<String>,
    pub admin_county: Option<String>,
    pub admin_ward: Option<String>,
    pub parish: Option<String>,
    pub parliamentary_constituency: Option<String>,
    pub lsoa: Option<String>,
    pub msoa: Option<String>,
}

impl Area {
    /// Column names of the area data, in export order: the one list the
    /// store's SQL and the enriched CSV's header are built from.
    pub const COLUMNS: [&'static str; 11] = [
        "outcode",
        "incode",
        "country",
        "region",
        "admin_district",
        "admin_county",
        "admin_ward",
        "parish",
        "parliamentary_constituency",
        "lsoa",
        "msoa",
    ];

    /// The values in [`Area::COLUMNS`] order.
    pub fn values(&self) -> [&Option<String>; Area::COLUMNS.len()] {
        [
            &self.outcode,
            &self.incode,
            &self.country,
            &self.region,
            &self.admin_district,
            &self.admin_county,
            &self.admin_ward,
            &self.parish,
            &self.parliamentary_constituency,
            &self.lsoa,
            &self.msoa,
        ]
    }

    /// The area from values in [`Area::COLUMNS`] order.
    pub fn from_values(values: [Option<String>; Area::COLUMNS.len()]) -> Self {
        let [outcode, incode, country, region, admin_district, admin_county, admin_ward, parish, parliamentary_constituency, lsoa, msoa] =
            values;
        Area {
            outcode,
            incode,
            country,
            region,
            admin_district,
            admin_county,
            admin_ward,
            parish,
            parliamentary_constituency,
            lsoa,
            msoa,
        }
    }
}

/// The nearest postcode to a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// Postcode in `pcds` form (`AB10 1AA`).
    pub postcode: String,
    /// Distance from the query to the postcode's centroid, metres.
    pub distance_m: f64,
    pub area: Area,
    /// The provider's raw result object (postcodes.io JSON), when there is one.
    pub raw: Option<String>,
}
