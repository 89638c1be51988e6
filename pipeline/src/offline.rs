//! The offline provider: exact nearest-postcode search over an ONS postcode file
//! (NSPL/ONSPD style CSV, plain or gzip).
//!
//! Columns: postcode from `pcds`, `pcd`, `pcd7`, `pcd8` or `postcode`; `lat` and
//! `long` (or `latitude`/`lon`/`lng`/`longitude`) in WGS84 degrees; rows without
//! coordinates (empty, or the ONS "no grid reference" 99.999999) are skipped, and
//! rows with `doterm` set (terminated postcodes) when that column exists.
//!
//! Search is exact on the sphere: points are unit vectors in a k-d tree (kiddo),
//! where Euclidean nearest is great-circle nearest. Postcodes sharing a centroid
//! are stored once, under the alphabetically first `pcds` postcode, which is
//! what postcodes.io answers for such ties (results ordered
//! `distance ASC, postcode ASC`).

use std::{fs::File, io::Read, path::Path};

use kiddo::{ImmutableKdTree, SquaredEuclidean};

use crate::{
    csv_input::open_maybe_gzip,
    geo::{distance_m, squared_chord_for_m, LatLon},
    lookup::{Area, Match, Radius},
    postcode::{outcode_incode, to_pcds},
};

/// A loaded postcode file, ready for nearest-postcode queries.
pub struct OfflineIndex {
    tree: ImmutableKdTree<f64, 3>,
    /// Distinct centroids, in tree item order.
    centroids: Vec<LatLon>,
    /// `pcds` postcode of each centroid (the alphabetically first one there), space padded to 8 bytes.
    codes: Vec<[u8; 8]>,
    postcodes: usize,
}

/// The nearest postcode found by [`OfflineIndex::nearest`].
#[derive(Debug, Clone, PartialEq)]
pub struct Nearest<'a> {
    pub postcode: &'a str,
    pub distance_m: f64,
    pub centroid: LatLon,
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("cannot open postcode file {0}: {1}")]
    Open(String, std::io::Error),
    #[error("postcode file {0}: {1}")]
    Format(String, String),
}

fn find(headers: &csv::StringRecord, names: &[&str]) -> Option<usize> {
    names.iter().find_map(|n| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(n)))
}

impl OfflineIndex {
    /// Loads a postcode file (see module docs). Errors when it cannot be read or
    /// has no postcode/lat/long columns.
    pub fn load(path: &Path) -> Result<Self, OfflineError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| OfflineError::Open(name.clone(), e))?;
        Self::from_reader(Box::new(file), &name)
    }

    /// Like [`OfflineIndex::load`] from any byte stream; `name` is for messages.
    pub fn from_reader(reader: Box<dyn Read + Send>, name: &str) -> Result<Self, OfflineError> {
        let fmt = |m: String| OfflineError::Format(name.to_string(), m);
        let reader = open_maybe_gzip(reader).map_err(|e| fmt(e.to_string()))?;
        let mut rdr = csv::ReaderBuilder::new().flexible(true).buffer_capacity(1 << 20).from_reader(reader);
        let headers = rdr.headers().map_err(|e| fmt(e.to_string()))?.clone();
        let pc = find(&headers, &["pcds", "pcd", "pcd7", "pcd8", "postcode"])
            .ok_or_else(|| fmt(format!("no postcode column (pcds/pcd/postcode) in [{}]", headers.iter().collect::<Vec<_>>().join(", "))))?;
        let lat = find(&headers, &["lat", "latitude"]).ok_or_else(|| fmt("no lat column".into()))?;
        let lon = find(&headers, &["long", "lon", "lng", "longitude"]).ok_or_else(|| fmt("no long column".into()))?;
        let doterm = find(&headers, &["doterm"]);

        let mut entries: Vec<(f64, f64, [u8; 8])> = Vec::with_capacity(2_800_000);
        let mut rec = csv::ByteRecord::new();
        while rdr.read_byte_record(&mut rec).map_err(|e| fmt(e.to_string()))? {
            if let Some(d) = doterm {
                if rec.get(d).is_some_and(|v| !v.iter().all(u8::is_ascii_whitespace)) {
                    continue;
                }
            }
            let num = |i: usize| rec.get(i).and_then(|v| std::str::from_utf8(v).ok()).and_then(|s| s.trim().parse::<f64>().ok());
            let (Some(la), Some(lo)) = (num(lat), num(lon)) else { continue };
            if !(-90.0..=90.0).contains(&la) || !(-180.0..=180.0).contains(&lo) || la > 99.0 {
                continue;
            }
            let Some(code) = rec.get(pc).and_then(|v| std::str::from_utf8(v).ok()).and_then(to_pcds) else { continue };
            let mut packed = [b' '; 8];
            packed[..code.len()].copy_from_slice(code.as_bytes());
            entries.push((la, lo, packed));
        }
        if entries.is_empty() {
            return Err(fmt("no postcode with coordinates".into()));
        }
        Ok(Self::build(entries))
    }

    /// Builds the index from (latitude, longitude, space-padded `pcds`) entries.
    fn build(mut entries: Vec<(f64, f64, [u8; 8])>) -> Self {
        let postcodes = entries.len();
        entries.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        entries.dedup_by(|b, a| a.0 == b.0 && a.1 == b.1);
        let centroids: Vec<LatLon> = entries.iter().map(|e| LatLon { lat: e.0, lon: e.1 }).collect();
        let codes: Vec<[u8; 8]> = entries.iter().map(|e| e.2).collect();
        drop(entries);
        let points: Vec<[f64; 3]> = centroids.iter().map(|c| c.unit_vector()).collect();
        let tree = ImmutableKdTree::new_from_slice(&points).expect("non-empty point set");
        Self { tree, centroids, codes, postcodes }
    }

    /// Number of postcodes loaded (before merging shared centroids).
    pub fn postcodes(&self) -> usize {
        self.postcodes
    }

    /// Number of distinct centroids in the tree.
    pub fn centroids(&self) -> usize {
        self.centroids.len()
    }

    fn code(&self, item: usize) -> &str {
        std::str::from_utf8(&self.codes[item]).expect("ASCII postcode").trim_end()
    }

    /// The nearest postcode to a WGS84 position within `radius_m` metres
    /// (great-circle), or `None`.
    pub fn nearest(&self, at: LatLon, radius_m: f64) -> Option<Nearest<'_>> {
        let q = at.unit_vector();
        let found = self.tree.query(&q).nearest_one::<SquaredEuclidean<f64>>().execute();
        if found.distance > squared_chord_for_m(radius_m) {
            return None;
        }
        let item = found.item as usize;
        let centroid = self.centroids[item];
        Some(Nearest { postcode: self.code(item), distance_m: distance_m(at, centroid), centroid })
    }

    /// Up to `limit` nearest postcodes within `radius_m`, nearest first (one per centroid).
    pub fn nearest_n(&self, at: LatLon, radius_m: f64, limit: usize) -> Vec<Nearest<'_>> {
        let Some(n) = std::num::NonZeroUsize::new(limit) else { return vec![] };
        let q = at.unit_vector();
        let max = squared_chord_for_m(radius_m);
        let mut out: Vec<Nearest<'_>> = self
            .tree
            .query(&q)
            .nearest_n::<SquaredEuclidean<f64>>(n)
            .execute()
            .into_iter()
            .filter(|f| f.distance <= max)
            .map(|f| {
                let c = self.centroids[f.item as usize];
                Nearest { postcode: self.code(f.item as usize), distance_m: distance_m(at, c), centroid: c }
            })
            .collect();
        out.sort_by(|a, b| a.distance_m.total_cmp(&b.distance_m).then(a.postcode.cmp(b.postcode)));
        out
    }

    /// The provider answer for one query: nearest within the radius as a [`Match`].
    pub fn lookup(&self, at: LatLon, radius: Radius) -> Option<Match> {
        self.nearest(at, radius.metres()).map(|n| {
            let (out, inc) = outcode_incode(n.postcode);
            Match {
                postcode: n.postcode.to_string(),
                distance_m: n.distance_m,
                area: Area { outcode: Some(out.to_string()), incode: Some(inc.to_string()), ..Area::default() },
                raw: None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(text: &str) -> OfflineIndex {
        OfflineIndex::from_reader(Box::new(std::io::Cursor::new(text.as_bytes().to_vec())), "test").unwrap()
    }

    #[test]
    fn nearest_with_radius_ties_and_skips() {
        let idx = index(
            "pcd,lat,long,doterm\nAB1 0ZZ,57.1,-2.2,\nAB1 0AA,57.1,-2.2,\nAB101AA,57.2,-2.2,\nZZ1 1ZZ,57.1001,-2.2,202001\nXX1 1XX,,0,\nYY1 1YY,99.999999,0,\n",
        );
        assert_eq!(idx.postcodes(), 3);
        assert_eq!(idx.centroids(), 2);
        let n = idx.nearest(LatLon { lat: 57.1001, lon: -2.2 }, 100.0).unwrap();
        assert_eq!(n.postcode, "AB1 0AA"); // tie at one centroid: alphabetically first; terminated ZZ1 skipped
        assert!((n.distance_m - 11.1).abs() < 0.1, "{}", n.distance_m);
        assert!(idx.nearest(LatLon { lat: 57.15, lon: -2.2 }, 100.0).is_none());
        assert_eq!(idx.nearest(LatLon { lat: 57.19, lon: -2.2 }, 2000.0).unwrap().postcode, "AB10 1AA");
        let m = idx.lookup(LatLon { lat: 57.19, lon: -2.2 }, Radius::Widesearch).unwrap();
        assert_eq!((m.area.outcode.as_deref(), m.area.incode.as_deref()), (Some("AB10"), Some("1AA")));
        assert_eq!(idx.nearest_n(LatLon { lat: 57.1, lon: -2.2 }, 20_000.0, 5).len(), 2);
    }

    #[test]
    fn refuses_files_without_columns() {
        let e = OfflineIndex::from_reader(Box::new(std::io::Cursor::new(b"a,b\n1,2\n".to_vec())), "x");
        assert!(e.is_err());
    }
}
