//! The states the pipeline stores and compares: an import's [`ImportPhase`], a
//! row's [`RowStatus`] and a lookup's search [`Stage`]. Each is stored as the
//! value its `as_str()` (or [`Stage::as_i16`]) gives, the values the schema
//! comments in `migrations/` list; SQL filters in [`crate::store`] spell the
//! same values.

use std::{fmt, str::FromStr};

/// A stored value that is not one of an enum's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?} in the database")]
pub struct UnknownValue {
    kind: &'static str,
    value: String,
}

/// Declares a text-stored enum with `as_str`, `Display` and `FromStr`.
macro_rules! stored_text {
    ($(#[$m:meta])* $name:ident, $kind:literal { $($(#[$vm:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored text.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue { kind: $kind, value: s.to_string() }),
                }
            }
        }
    };
}

stored_text!(
    /// Where an import's load stands (`imports.phase`). Not the PostcodeImport's
    /// phase in Kubernetes, which the operator derives from this and its Jobs.
    ImportPhase, "import phase" {
        /// Created, nothing loaded yet.
        Pending = "Pending",
        /// A reader is writing its rows (or was killed doing so).
        Loading = "Loading",
        /// Every row is stored: the enrichers may start.
        Loaded = "Loaded",
        /// The input cannot be loaded (the `error` column says why).
        Failed = "Failed",
    }
);

stored_text!(
    /// What became of a row (`points.status`, `lookups.status`, the
    /// `point_results` view and the enriched CSV's `status` column).
    RowStatus, "row status" {
        /// Not answered yet.
        Pending = "pending",
        /// A postcode was found.
        Enriched = "enriched",
        /// Nothing within the search ladder's last stage.
        NoMatch = "no_match",
        /// The row's coordinate is not valid (only ever on `points`).
        Invalid = "invalid",
        /// Not answered within the retry policy (the `error` column says why).
        Failed = "failed",
    }
);

impl RowStatus {
    /// Whether the row needs no more work (every status but `pending`).
    pub fn is_finished(self) -> bool {
        self != RowStatus::Pending
    }
}

/// The search stage a pending lookup is at (`lookups.stage`, stored as 0, 1, 2):
/// the ladder of DESIGN.md "Enrichment rules" ([`crate::lookup::SearchPlan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Stage {
    /// The first radius (`radius_m`).
    #[default]
    Radius,
    /// The maximum radius (`max_radius_m`).
    MaxRadius,
    /// postcodes.io widesearch (20 km).
    Widesearch,
}

impl Stage {
    /// Every stage, in ladder order.
    pub const ALL: [Stage; 3] = [Stage::Radius, Stage::MaxRadius, Stage::Widesearch];

    /// The stored number.
    pub const fn as_i16(self) -> i16 {
        match self {
            Stage::Radius => 0,
            Stage::MaxRadius => 1,
            Stage::Widesearch => 2,
        }
    }
}

impl TryFrom<i16> for Stage {
    type Error = UnknownValue;

    fn try_from(n: i16) -> Result<Self, UnknownValue> {
        Stage::ALL
            .into_iter()
            .find(|s| s.as_i16() == n)
            .ok_or_else(|| UnknownValue {
                kind: "search stage",
                value: n.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_are_the_schemas() {
        let phases: Vec<&str> = ImportPhase::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(phases, ["Pending", "Loading", "Loaded", "Failed"]);
        let statuses: Vec<&str> = RowStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(statuses, ["pending", "enriched", "no_match", "invalid", "failed"]);
        assert_eq!(Stage::ALL.map(Stage::as_i16), [0, 1, 2]);
    }

    #[test]
    fn values_round_trip_and_strangers_are_refused() {
        for &s in RowStatus::ALL {
            assert_eq!(s.as_str().parse::<RowStatus>(), Ok(s));
        }
        for &p in ImportPhase::ALL {
            assert_eq!(p.to_string().parse::<ImportPhase>(), Ok(p));
        }
        for s in Stage::ALL {
            assert_eq!(Stage::try_from(s.as_i16()), Ok(s));
        }
        assert!("loaded".parse::<ImportPhase>().is_err());
        assert!("Enriched".parse::<RowStatus>().is_err());
        assert!(Stage::try_from(3).is_err());
        assert!(Stage::Radius < Stage::MaxRadius && Stage::MaxRadius < Stage::Widesearch);
    }
}
