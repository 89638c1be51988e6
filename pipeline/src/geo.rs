//! WGS84 coordinates: validation ranges, great-circle distance, the unit-sphere
//! embedding used by the nearest-postcode index, and the shard of a coordinate.

/// Mean Earth radius in metres (IUGG R1), used for great-circle distances.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

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
