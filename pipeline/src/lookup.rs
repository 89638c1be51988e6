//! What a provider answers: the nearest postcode to a coordinate within a radius,
//! and the search stages (radius, maximum radius, widesearch) of DESIGN.md
//! "Enrichment rules".

use serde::{Deserialize, Serialize};

use crate::model::Stage;

/// postcodes.io's widesearch range in metres ("search up to 20km radius").
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
    /// postcodes.io `widesearch`: up to 20 km.
    Widesearch,
}

impl Radius {
    pub fn metres(self) -> f64 {
        match self {
            Radius::Metres(m) => m.min(MAX_API_RADIUS_M),
            Radius::Widesearch => WIDESEARCH_RADIUS_M,
        }
    }
}

/// The search ladder: `radius_m` first, then `max_radius_m`, then widesearch.
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

impl SearchPlan {
    /// How far `stage` searches.
    pub fn radius(&self, stage: Stage) -> Radius {
        match stage {
            Stage::Radius => Radius::Metres(self.radius_m),
            Stage::MaxRadius => Radius::Metres(self.max_radius_m),
            Stage::Widesearch => Radius::Widesearch,
        }
    }

    /// The stage to try after `stage` found nothing, `None` when the row is
    /// `no_match`. The maximum radius is skipped when it searches no further
    /// than the first.
    pub fn next_stage(&self, stage: Stage) -> Option<Stage> {
        let widesearch = self.widesearch.then_some(Stage::Widesearch);
        match stage {
            Stage::Radius
                if self.max_radius_m.min(MAX_API_RADIUS_M) > self.radius_m.min(MAX_API_RADIUS_M) =>
            {
                Some(Stage::MaxRadius)
            }
            Stage::Radius | Stage::MaxRadius => widesearch,
            Stage::Widesearch => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_climbs_radius_max_radius_widesearch() {
        let plan = SearchPlan::default();
        assert_eq!(plan.next_stage(Stage::Radius), Some(Stage::MaxRadius));
        assert_eq!(plan.next_stage(Stage::MaxRadius), Some(Stage::Widesearch));
        assert_eq!(plan.next_stage(Stage::Widesearch), None);
        let no_wide = SearchPlan {
            widesearch: false,
            ..plan
        };
        assert_eq!(no_wide.next_stage(Stage::MaxRadius), None);
        // A maximum radius no wider than the first (after clamping) is skipped.
        let flat = SearchPlan {
            radius_m: 2500.0,
            max_radius_m: 3000.0,
            widesearch: true,
        };
        assert_eq!(flat.next_stage(Stage::Radius), Some(Stage::Widesearch));
        assert_eq!(
            SearchPlan {
                widesearch: false,
                ..flat
            }
            .next_stage(Stage::Radius),
            None
        );
        assert_eq!(plan.radius(Stage::MaxRadius), Radius::Metres(2000.0));
        assert_eq!(plan.radius(Stage::Widesearch), Radius::Widesearch);
    }
}
