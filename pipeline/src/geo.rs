//! WGS84 coordinates: validation ranges, great-circle and geodesic (ellipsoidal)
//! distance, the unit-sphere embedding used by the nearest-postcode index, and
//! the shard of a coordinate.
//!
//! Distances that answers report are geodesics on the WGS84 ellipsoid
//! ([`geodesic_m`]), what PostGIS `geography` (and so postcodes.io) computes;
//! the sphere only finds candidates ([`SPHERE_TO_ELLIPSOID`] bounds how far the
//! two can disagree).

/// Mean Earth radius in metres (IUGG R1), used for great-circle distances.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// WGS84 semi-major axis, metres.
pub const WGS84_A: f64 = 6_378_137.0;
/// WGS84 flattening.
pub const WGS84_F: f64 = 1.0 / 298.257_223_563;
/// WGS84 first eccentricity squared, `f (2 − f)`.
const WGS84_E2: f64 = WGS84_F * (2.0 - WGS84_F);

/// Bounds of (geodesic on the WGS84 ellipsoid) / (great circle on the sphere of
/// [`EARTH_RADIUS_M`], geodetic latitude taken as spherical latitude) for any
/// two points, rounded outwards: the two metrics differ at every point and in
/// every direction by a factor between the smallest and the largest radius of
/// curvature over R — `a (1 − e²) / R` = 0.994417 (meridian, equator) and
/// `a / √(1 − e²) / R` = 1.004487 (poles) — so the shortest paths do too.
pub const SPHERE_TO_ELLIPSOID: (f64, f64) = (0.9944, 1.0045);

/// Chords (metres) up to which [`geodesic_m`] uses its series; longer ones go to
/// Karney's algorithm.
const SERIES_MAX_CHORD_M: f64 = 30_000.0;

/// A WGS84 position in degrees: latitude in -90..=90, longitude in -180..=180.
/// Plain numbers ([`bytemuck::Pod`]), so a mapped index file can hold them.
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct LatLon {
    pub lat: f64,
    pub lon: f64,
}

impl LatLon {
    /// Unit vector on the sphere (x, y, z); the chord between two of these is
    /// monotonic in great-circle distance, so Euclidean nearest = spherical nearest.
    pub fn unit_vector(self) -> [f64; 3] {
        let (lat, lon) = (self.lat.to_radians(), self.lon.to_radians());
        [lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()]
    }
}

/// Great-circle (haversine) distance in metres between two WGS84 positions.
pub fn distance_m(a: LatLon, b: LatLon) -> f64 {
    let (p1, p2) = (a.lat.to_radians(), b.lat.to_radians());
    let dp = p2 - p1;
    let dl = (b.lon - a.lon).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// Geodesic distance in metres on the WGS84 ellipsoid between two positions,
/// as PostGIS `ST_Distance(geography, geography)` computes it (Karney 2013,
/// "Algorithms for geodesics"). Lines under 30 km (every answer of a
/// postcode search) take a series instead: the straight 3-D chord `c` between
/// the points on the ellipsoid, lengthened to the arc of the normal section,
/// `c + c³ / (24 ρ²)` with ρ Euler's radius of curvature in the line's
/// direction; the terms left out are below 10⁻⁶ m at 30 km, and the module's
/// tests hold it to Karney's (the `geographiclib-rs` crate) within 0.1 mm.
/// It needs no trigonometry given the points' unit vectors ([`geodesic_series`]).
pub fn geodesic_m(a: LatLon, b: LatLon) -> f64 {
    geodesic_series(a.unit_vector(), b.unit_vector()).unwrap_or_else(|| karney_m(a, b))
}

/// [`geodesic_m`]'s series for points given by their [`LatLon::unit_vector`]s
/// (the index keeps them); `None` for lines too long for it (then [`karney_m`]).
#[inline]
pub fn geodesic_series(ua: [f64; 3], ub: [f64; 3]) -> Option<f64> {
    let (pa, pb) = (ellipsoid_point(ua), ellipsoid_point(ub));
    let d = [pb[0] - pa[0], pb[1] - pa[1], pb[2] - pa[2]];
    let c2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    if c2 > SERIES_MAX_CHORD_M * SERIES_MAX_CHORD_M {
        return None;
    }
    // Direction of the line at `a`: its east and north components.
    let cos_phi = ua[0].hypot(ua[1]);
    let inv_rho2 = if cos_phi < 1e-12 {
        let m = WGS84_A * (1.0 - WGS84_E2) / (1.0 - WGS84_E2).powf(1.5);
        1.0 / (m * m)
    } else {
        let (cl, sl, sp) = (ua[0] / cos_phi, ua[1] / cos_phi, ua[2]);
        let east = -sl * d[0] + cl * d[1];
        let north = -sp * cl * d[0] - sp * sl * d[1] + cos_phi * d[2];
        let w2 = 1.0 - WGS84_E2 * sp * sp;
        let n = WGS84_A / w2.sqrt();
        let m = n * (1.0 - WGS84_E2) / w2;
        let h2 = east * east + north * north;
        let inv_rho = if h2 > 0.0 {
            (north * north / m + east * east / n) / h2
        } else {
            1.0 / m
        };
        inv_rho * inv_rho
    };
    let c = c2.sqrt();
    Some(c + c * c2 * inv_rho2 / 24.0)
}

/// Karney's geodesic distance on WGS84, metres (`geographiclib-rs`).
pub fn karney_m(a: LatLon, b: LatLon) -> f64 {
    use geographiclib_rs::{Geodesic, InverseGeodesic};
    static WGS84: std::sync::LazyLock<Geodesic> = std::sync::LazyLock::new(Geodesic::wgs84);
    InverseGeodesic::<f64>::inverse(&*WGS84, a.lat, a.lon, b.lat, b.lon)
}

/// Earth-centred coordinates (metres) of the point on the WGS84 ellipsoid whose
/// geodetic latitude and longitude give the unit vector `u`.
#[inline]
fn ellipsoid_point(u: [f64; 3]) -> [f64; 3] {
    let n = WGS84_A / (1.0 - WGS84_E2 * u[2] * u[2]).sqrt();
    [n * u[0], n * u[1], n * (1.0 - WGS84_E2) * u[2]]
}

/// Squared chord length on the unit sphere for a great-circle distance in metres.
pub fn squared_chord_for_m(metres: f64) -> f64 {
    let c = 2.0
        * (metres / (2.0 * EARTH_RADIUS_M))
            .min(std::f64::consts::FRAC_PI_2)
            .sin();
    c * c
}

/// Great-circle distance in metres for a squared chord length on the unit sphere.
pub fn m_for_squared_chord(sq: f64) -> f64 {
    2.0 * EARTH_RADIUS_M * (sq.max(0.0).sqrt() / 2.0).min(1.0).asin()
}

/// Shard (0..shards) of a coordinate: a 64-bit mix of the exact f64 bits of
/// latitude and longitude, so identical coordinates always meet in one shard and
/// are asked for once (DESIGN.md "Data"). `-0.0` and `0.0` are the same point.
pub fn shard_of(lat: f64, lon: f64, shards: u32) -> u32 {
    fn bits(x: f64) -> u64 {
        if x == 0.0 {
            0
        } else {
            x.to_bits()
        }
    }
    let h = splitmix64(splitmix64(bits(lat)) ^ bits(lon));
    (h % u64::from(shards.max(1))) as u32
}

/// SplitMix64 finaliser (Steele, Lea, Flood 2014): a fast, well-distributed 64-bit mix.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_of_one_degree_of_latitude_is_about_111_km() {
        let d = distance_m(LatLon { lat: 51.0, lon: 0.0 }, LatLon { lat: 52.0, lon: 0.0 });
        assert!((d - 111_195.0).abs() < 5.0, "{d}");
    }

    #[test]
    fn the_geodesic_series_is_karneys_within_a_tenth_of_a_millimetre() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let lat_range = if i % 2 == 0 { 49.0..61.0 } else { -85.0..85.0 };
            let a = LatLon {
                lat: rng.random_range(lat_range),
                lon: rng.random_range(-180.0..180.0),
            };
            // up to about 28 km away, in any direction, often very near
            let scale = [1e-6, 1e-4, 1e-3, 1e-2, 0.25][i % 5];
            let b = LatLon {
                lat: (a.lat + rng.random_range(-scale..scale)).clamp(-89.9, 89.9),
                lon: a.lon + rng.random_range(-scale..scale),
            };
            let (fast, exact) = (geodesic_m(a, b), karney_m(a, b));
            worst = worst.max((fast - exact).abs());
            assert!((fast - exact).abs() < 1e-4, "{a:?} {b:?}: {fast} vs {exact}");
        }
        assert!(worst > 0.0);
        // beyond the series: Karney's own
        let (a, b) = (LatLon { lat: 50.0, lon: -5.0 }, LatLon { lat: 58.6, lon: -3.0 });
        assert_eq!(geodesic_m(a, b), karney_m(a, b));
    }

    #[test]
    fn sphere_and_ellipsoid_stay_within_their_bounds() {
        let (lo, hi) = SPHERE_TO_ELLIPSOID;
        for (a, b) in [
            ((0.0, 0.0), (0.01, 0.0)),    // meridian at the equator: the smallest ratio
            ((89.98, 0.0), (89.99, 0.0)), // near the pole: the largest
            ((0.0, 0.0), (0.0, 0.01)),
            ((54.0, -2.0), (54.1, -2.1)),
            ((50.0, -5.0), (58.6, -3.0)),
        ] {
            let (a, b) = (LatLon { lat: a.0, lon: a.1 }, LatLon { lat: b.0, lon: b.1 });
            let r = karney_m(a, b) / distance_m(a, b);
            assert!(lo < r && r < hi, "{a:?} {b:?}: {r}");
        }
    }

    #[test]
    fn chord_round_trips_metres() {
        for m in [0.5, 100.0, 2000.0, 20_000.0] {
            assert!((m_for_squared_chord(squared_chord_for_m(m)) - m).abs() < 1e-6 * m.max(1.0));
        }
    }

    #[test]
    fn identical_coordinates_share_a_shard_and_shards_spread() {
        assert_eq!(shard_of(51.5, -0.1, 4), shard_of(51.5, -0.1, 4));
        assert_eq!(shard_of(0.0, -0.0, 7), shard_of(-0.0, 0.0, 7));
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[shard_of(50.0 + f64::from(i) * 1e-4, -1.0, 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(shard_of(1.0, 2.0, 1), 0);
    }
}
