//! The offline provider: exact nearest-postcode search over an ONS postcode file
//! (NSPL/ONSPD style CSV, plain or gzip).
//!
//! Columns: postcode from `pcds`, `pcd`, `pcd7`, `pcd8` or `postcode`; `lat` and
//! `long` (or `latitude`/`lon`/`lng`/`longitude`) in WGS84 degrees; rows without
//! coordinates (empty, or the ONS "no grid reference" 99.999999) are skipped, and
//! rows with `doterm` set (terminated postcodes) when that column exists.
//!
//! Distances and order are postcodes.io's: geodesics on the WGS84 ellipsoid
//! ([`crate::geo::geodesic_m`], what PostGIS `geography` measures), results
//! ordered `distance ASC, postcode ASC` (its `nearestPostcodeQuery`). The
//! search is exact: [`crate::grid`] finds, on the sphere (unit vectors in a
//! latitude/longitude grid, where Euclidean nearest is great-circle nearest),
//! every centroid that could be the nearest on the ellipsoid — all within
//! the sphere/ellipsoid ratio bound ([`crate::geo::SPHERE_TO_ELLIPSOID`], about
//! 1 %) of the sphere's nearest — and only those few are measured on the
//! ellipsoid. Postcodes sharing a centroid are kept together, the
//! alphabetically first beside the grid's points (the one a single answer
//! names) and the others apart (for lists and counts).
//!
//! Widesearch is postcodes.io's rule ([`WideRule::PostcodesIo`], its
//! `deriveMaxRange`): the smallest range of 500 m, 1,500 m, … 19,500 m holding
//! at least 10 postcodes, the nearest within it; none when 19,500 m holds
//! fewer. As the nearest 10 then all lie within the range, that is: the
//! nearest postcodes when the 10th nearest is within 19,500 m, else none.
//! "The nearest within 20 km" is an option ([`WideRule::NearestWithin20Km`]).

use std::{fs::File, io::Read, path::Path};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::{
    csv_input::open_maybe_gzip,
    geo::{geodesic_series, karney_m, squared_chord_for_m, LatLon, SPHERE_TO_ELLIPSOID},
    grid::{Grid, GridShape},
    lookup::{Area, Match, Radius},
    postcode::{outcode_incode, to_pcds},
    provider::{Answer, CallError, Provider},
    slab::Slab,
};

/// Coordinates the enricher answers at once from the index (no request limit
/// applies; a few thousand keep each database transaction short).
const BATCH: usize = 4096;

/// One postcode of a postcode file: WGS84 latitude and longitude in degrees, and
/// its `pcds` form padded with spaces to 8 bytes.
pub type Entry = (f64, f64, [u8; 8]);

/// postcodes.io's widesearch: postcodes counted, the range searched up to
/// (`deriveMaxRange` in its `app/models/postcode.ts`: `SEARCH_LIMIT`, and the
/// last of `START_RANGE` 500 m + k × `INCREMENT` 1000 m not above `MAX_RANGE` 20 km).
pub const WIDESEARCH_COUNT: usize = 10;
/// See [`WIDESEARCH_COUNT`].
pub const WIDESEARCH_LAST_RANGE_M: f64 = 19_500.0;

/// Centroids whose series distances ([`geodesic_series`]) are this close (metres)
/// are measured again by Karney's algorithm: well above the series' error
/// (under 0.1 mm, `geo`'s tests).
const NEAR_TIE_M: f64 = 1e-3;

/// How the offline provider answers a widesearch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WideRule {
    /// postcodes.io's (see the module docs): the default.
    #[default]
    PostcodesIo,
    /// The nearest postcode within 20 km, however few are around: more
    /// answers than postcodes.io gives in empty places (an explicit option).
    NearestWithin20Km,
}

/// A loaded postcode file, ready for nearest-postcode queries.
pub struct OfflineIndex {
    grid: Grid,
    /// Distinct centroids, in the grid's position order (see [`Grid::nearest_at`]).
    centroids: Slab<LatLon>,
    /// `pcds` postcode of each centroid (the alphabetically first one there), space padded to 8 bytes.
    codes: Slab<[u8; 8]>,
    /// `others[others_start[pos]..others_start[pos + 1]]`: the other postcodes
    /// at the centroid at `pos`, alphabetically.
    others_start: Slab<u32>,
    others: Slab<[u8; 8]>,
    postcodes: usize,
    wide: WideRule,
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
    names
        .iter()
        .find_map(|n| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(n)))
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
        Ok(Self::from_entries(Self::parse(reader, name)?))
    }

    /// Like [`OfflineIndex::load`], through a cache of the built index in
    /// `cache_dir`, named after the postcode file's path, size and modification
    /// time: the distinct centroids, their postcodes and the grid's arrays
    /// (about 120 MB for the 2.7 M-postcode NSPL), mapped read-only. Loading it
    /// skips the CSV parse and the grid build (about 1.5 s of CPU), which every
    /// enricher process would otherwise repeat, and the processes share one
    /// copy in the page cache. A missing, stale or unreadable cache is rebuilt;
    /// failing to write one is not an error. Cache files are replaced by rename,
    /// never rewritten in place, so a mapped one stays valid.
    pub fn load_cached(path: &Path, cache_dir: &Path) -> Result<Self, OfflineError> {
        let cache = cache_path(path, cache_dir)?;
        if let Some(index) = read_cache(&cache) {
            return Ok(index);
        }
        parse_into_cache(path, &cache)
    }

    /// Makes sure [`OfflineIndex::load_cached`] will find the cache, building it
    /// from the postcode file when it has none.
    pub fn ensure_cache(path: &Path, cache_dir: &Path) -> Result<(), OfflineError> {
        let cache = cache_path(path, cache_dir)?;
        if read_cache(&cache).is_none() {
            parse_into_cache(path, &cache)?;
        }
        Ok(())
    }

    /// Parses a postcode file into (latitude, longitude, space-padded `pcds`) entries (see module docs).
    pub fn parse(reader: Box<dyn Read + Send>, name: &str) -> Result<Vec<Entry>, OfflineError> {
        let fmt = |m: String| OfflineError::Format(name.to_string(), m);
        let reader = open_maybe_gzip(reader).map_err(|e| fmt(e.to_string()))?;
        let mut rdr = csv::ReaderBuilder::new()
            .flexible(true)
            .buffer_capacity(1 << 20)
            .from_reader(reader);
        let headers = rdr.headers().map_err(|e| fmt(e.to_string()))?.clone();
        let pc = find(&headers, &["pcds", "pcd", "pcd7", "pcd8", "postcode"]).ok_or_else(|| {
            fmt(format!(
                "no postcode column (pcds/pcd/postcode) in [{}]",
                headers.iter().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let lat = find(&headers, &["lat", "latitude"]).ok_or_else(|| fmt("no lat column".into()))?;
        let lon = find(&headers, &["long", "lon", "lng", "longitude"])
            .ok_or_else(|| fmt("no long column".into()))?;
        let doterm = find(&headers, &["doterm"]);

        let mut entries: Vec<Entry> = Vec::with_capacity(1 << 16);
        let mut rec = csv::ByteRecord::new();
        while rdr.read_byte_record(&mut rec).map_err(|e| fmt(e.to_string()))? {
            if let Some(d) = doterm {
                if rec.get(d).is_some_and(|v| !v.iter().all(u8::is_ascii_whitespace)) {
                    continue;
                }
            }
            let num = |i: usize| {
                rec.get(i)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| s.trim().parse::<f64>().ok())
            };
            let (Some(la), Some(lo)) = (num(lat), num(lon)) else {
                continue;
            };
            if !(-90.0..=90.0).contains(&la) || !(-180.0..=180.0).contains(&lo) || la > 99.0 {
                continue;
            }
            let Some(code) = rec
                .get(pc)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(to_pcds)
            else {
                continue;
            };
            let mut packed = [b' '; 8];
            packed[..code.len()].copy_from_slice(code.as_bytes());
            entries.push((la, lo, packed));
        }
        if entries.is_empty() {
            return Err(fmt("no postcode with coordinates".into()));
        }
        Ok(entries)
    }

    /// Builds the index from parsed entries: sorts them, groups them by
    /// centroid (the alphabetically first postcode beside the grid's points)
    /// and builds the grid.
    pub fn from_entries(entries: Vec<Entry>) -> Self {
        let postcodes = entries.len();
        let groups = distinct_centroids(entries);
        Self::from_parts(groups, postcodes)
    }

    /// The grid over distinct centroids (in (latitude, longitude) order) and their postcodes.
    fn from_parts(groups: Centroids, postcodes: usize) -> Self {
        let grid = Grid::build(&groups.centroids);
        // In the grid's order: a search's result is read beside the points it scanned.
        let mut centroids = Vec::with_capacity(groups.centroids.len());
        let mut codes = Vec::with_capacity(groups.centroids.len());
        let mut others_start = Vec::with_capacity(groups.centroids.len() + 1);
        let mut others = Vec::with_capacity(groups.codes.len() - groups.centroids.len());
        others_start.push(0u32);
        for &i in grid.items() {
            let i = i as usize;
            let group = &groups.codes[groups.start[i] as usize..groups.start[i + 1] as usize];
            centroids.push(groups.centroids[i]);
            codes.push(group[0]);
            others.extend_from_slice(&group[1..]);
            others_start.push(others.len() as u32);
        }
        Self {
            grid,
            centroids: centroids.into(),
            codes: codes.into(),
            others_start: others_start.into(),
            others: others.into(),
            postcodes,
            wide: WideRule::default(),
        }
    }

    /// The same index, answering widesearch by `rule`.
    pub fn with_wide_rule(mut self, rule: WideRule) -> Self {
        self.wide = rule;
        self
    }

    /// Number of postcodes loaded (before merging shared centroids).
    pub fn postcodes(&self) -> usize {
        self.postcodes
    }

    /// Number of distinct centroids in the grid.
    pub fn centroids(&self) -> usize {
        self.centroids.len()
    }

    fn code(&self, pos: usize) -> &str {
        std::str::from_utf8(&self.codes[pos])
            .expect("ASCII postcode")
            .trim_end()
    }

    fn other_codes(&self, pos: usize) -> impl Iterator<Item = &str> {
        let range = self.others_start[pos] as usize..self.others_start[pos + 1] as usize;
        self.others[range]
            .iter()
            .map(|c| std::str::from_utf8(c).expect("ASCII postcode").trim_end())
    }

    /// Postcodes at the centroid at `pos` (1 or more).
    fn weight(&self, pos: usize) -> u32 {
        1 + self.others_start[pos + 1] - self.others_start[pos]
    }

    /// Squared chord on the sphere that holds everything within `radius_m` on the ellipsoid.
    fn sphere_c2(radius_m: f64) -> f64 {
        squared_chord_for_m(radius_m / SPHERE_TO_ELLIPSOID.0 * (1.0 + 1e-9) + 1e-6)
    }

    /// Geodesic distance from `at` (unit vector `u`) to the centroid at `pos`, metres.
    #[inline]
    fn geodesic(&self, at: LatLon, u: [f64; 3], pos: usize) -> f64 {
        geodesic_series(u, self.grid.units()[pos]).unwrap_or_else(|| karney_m(at, self.centroids[pos]))
    }

    /// Of sphere candidates, the geodesically nearest within `radius_m` (ties:
    /// the alphabetically first postcode), as (metres, position). Candidates
    /// within [`NEAR_TIE_M`] of the nearest by [`geodesic_series`]' series are
    /// measured again by Karney's algorithm, which decides between them: where
    /// two centroids are equally far but for rounding (mirror images of each
    /// other about the query), postcodes.io's order is Karney's rounding.
    fn best_of(
        &self,
        at: LatLon,
        u: [f64; 3],
        candidates: &[(f64, usize)],
        radius_m: f64,
    ) -> Option<(f64, usize)> {
        let mut best: Option<(f64, usize)> = None;
        for &(_, pos) in candidates {
            let d = self.geodesic(at, u, pos);
            if best.is_none_or(|(b, bp)| d < b || (d == b && self.codes[pos] < self.codes[bp])) {
                best = Some((d, pos));
            }
        }
        let (mut d, mut pos) = best?;
        let near = |&&(_, p): &&(f64, usize)| p != pos && self.geodesic(at, u, p) <= d + NEAR_TIE_M;
        if candidates.len() > 1 && candidates.iter().any(|c| near(&c)) {
            (d, pos) = candidates
                .iter()
                .filter(|&&(_, p)| p == pos || self.geodesic(at, u, p) <= d + NEAR_TIE_M)
                .map(|&(_, p)| (karney_m(at, self.centroids[p]), p))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(self.codes[a.1].cmp(&self.codes[b.1])))
                .expect("the nearest itself");
        }
        (d <= radius_m).then_some((d, pos))
    }

    /// The nearest postcode to a WGS84 position within `radius_m` metres
    /// (geodesic, inclusive), or `None`; of postcodes equally near, the
    /// alphabetically first.
    pub fn nearest(&self, at: LatLon, radius_m: f64) -> Option<Nearest<'_>> {
        let mut candidates = Vec::with_capacity(8);
        let factor = SPHERE_TO_ELLIPSOID.1 / SPHERE_TO_ELLIPSOID.0;
        let u = self
            .grid
            .candidates_at(at, Self::sphere_c2(radius_m), 1, factor, |_| 1, &mut candidates);
        let (d, pos) = self.best_of(at, u, &candidates, radius_m)?;
        Some(self.found(pos, d))
    }

    /// [`OfflineIndex::nearest`] for each of `ats`, in order: the same answers,
    /// faster on many queries ([`Grid::candidates_each`] overlaps their memory reads).
    pub fn nearest_many(&self, ats: &[LatLon], radius_m: f64) -> Vec<Option<Nearest<'_>>> {
        let (centroids, codes): (&[LatLon], &[[u8; 8]]) = (&self.centroids, &self.codes);
        let mut found = Vec::with_capacity(ats.len());
        let factor = SPHERE_TO_ELLIPSOID.1 / SPHERE_TO_ELLIPSOID.0;
        self.grid
            .candidates_each(ats, Self::sphere_c2(radius_m), factor, |i, u, candidates| {
                found.push(self.best_of(ats[i], u, candidates, radius_m));
            });
        // Each result's centroid and postcode are requested a few results ahead.
        (0..ats.len())
            .map(|i| {
                if let Some(&Some((_, ahead))) = found.get(i + 4) {
                    crate::grid::prefetch(&centroids[ahead]);
                    crate::grid::prefetch(&codes[ahead]);
                }
                found[i].map(|(d, pos)| self.found(pos, d))
            })
            .collect()
    }

    /// The answer at grid position `pos`, `distance_m` away.
    fn found(&self, pos: usize, distance_m: f64) -> Nearest<'_> {
        Nearest {
            postcode: self.code(pos),
            distance_m,
            centroid: self.centroids[pos],
        }
    }

    /// Up to `limit` nearest postcodes within `radius_m` (geodesic, inclusive),
    /// ordered as postcodes.io orders them: distance, then postcode. Every
    /// postcode counts, also those sharing a centroid.
    pub fn nearest_n(&self, at: LatLon, radius_m: f64, limit: usize) -> Vec<Nearest<'_>> {
        if limit == 0 {
            return vec![];
        }
        let mut candidates = Vec::new();
        let factor = SPHERE_TO_ELLIPSOID.1 / SPHERE_TO_ELLIPSOID.0;
        let need = u32::try_from(limit).unwrap_or(u32::MAX);
        self.grid.candidates_at(
            at,
            Self::sphere_c2(radius_m),
            need,
            factor,
            |pos| self.weight(pos),
            &mut candidates,
        );
        let mut out: Vec<Nearest<'_>> = Vec::new();
        for &(_, pos) in &candidates {
            // Karney's for every candidate: lists are not the hot path, and ties in them
            // (see `best_of`) are ordered as postcodes.io orders them.
            let d = karney_m(at, self.centroids[pos]);
            if d <= radius_m {
                let all = std::iter::once(self.code(pos)).chain(self.other_codes(pos));
                out.extend(all.map(|postcode| Nearest {
                    postcode,
                    distance_m: d,
                    centroid: self.centroids[pos],
                }));
            }
        }
        out.sort_by(|a, b| {
            a.distance_m
                .total_cmp(&b.distance_m)
                .then(a.postcode.cmp(b.postcode))
        });
        out.truncate(limit);
        out
    }

    /// A widesearch's answer (see [`WideRule`]): up to `limit` (at most 10)
    /// postcodes, nearest first; empty when there is none to give.
    pub fn widesearch(&self, at: LatLon, limit: usize) -> Vec<Nearest<'_>> {
        let limit = limit.min(WIDESEARCH_COUNT);
        match self.wide {
            WideRule::PostcodesIo => {
                let mut found = self.nearest_n(at, WIDESEARCH_LAST_RANGE_M, WIDESEARCH_COUNT);
                if found.len() < WIDESEARCH_COUNT {
                    return vec![];
                }
                found.truncate(limit);
                found
            }
            WideRule::NearestWithin20Km => self.nearest_n(at, crate::lookup::WIDESEARCH_RADIUS_M, limit),
        }
    }

    /// The provider answer for one query: nearest within the radius as a
    /// [`Match`], or by the widesearch rule.
    pub fn lookup(&self, at: LatLon, radius: Radius) -> Option<Match> {
        match radius {
            Radius::Metres(_) => self.nearest(at, radius.metres()).map(|n| Self::answer(&n)),
            Radius::Widesearch => self.widesearch(at, 1).first().map(Self::answer),
        }
    }

    /// [`OfflineIndex::lookup`] for each of `ats`, in order (see [`OfflineIndex::nearest_many`]).
    pub fn lookup_many(&self, ats: &[LatLon], radius: Radius) -> Vec<Option<Match>> {
        match radius {
            Radius::Metres(_) => self
                .nearest_many(ats, radius.metres())
                .into_iter()
                .map(|n| n.map(|n| Self::answer(&n)))
                .collect(),
            Radius::Widesearch => ats.iter().map(|&at| self.lookup(at, radius)).collect(),
        }
    }

    fn answer(n: &Nearest<'_>) -> Match {
        let (out, inc) = outcode_incode(n.postcode);
        Match {
            postcode: n.postcode.to_string(),
            distance_m: n.distance_m,
            area: Area {
                outcode: Some(out.to_string()),
                incode: Some(inc.to_string()),
                ..Area::default()
            },
            raw: None,
        }
    }
}

/// The index answers in memory: no quota, no retries, and the enricher climbs a
/// batch's whole search ladder at once.
impl Provider for OfflineIndex {
    fn name(&self) -> String {
        format!("the offline index of {} postcodes", self.postcodes)
    }

    fn batch_size(&self) -> usize {
        BATCH
    }

    fn answers_locally(&self) -> bool {
        true
    }

    fn answer<'a>(
        &'a self,
        at: &'a [LatLon],
        radius: Radius,
    ) -> BoxFuture<'a, Result<Vec<Answer>, CallError>> {
        let answers = self.lookup_many(at, radius).into_iter();
        Box::pin(std::future::ready(Ok(answers
            .map(|m| m.map_or(Answer::NoPostcode, Answer::Found))
            .collect())))
    }
}

/// The default cache directory of [`OfflineIndex::load_cached`]:
/// `postcode-operator-index` in the temporary directory, created when missing.
pub fn default_cache_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("postcode-operator-index");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Distinct centroids and their postcodes: `codes[start[i]..start[i + 1]]`,
/// alphabetically, are at `centroids[i]`.
struct Centroids {
    centroids: Vec<LatLon>,
    start: Vec<u32>,
    codes: Vec<[u8; 8]>,
}

/// Sorts entries by (latitude, longitude, postcode) and groups them by centroid
/// (a postcode listed twice at one centroid counts once).
fn distinct_centroids(mut entries: Vec<Entry>) -> Centroids {
    entries.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
    entries.dedup();
    let mut groups = Centroids {
        centroids: Vec::new(),
        start: Vec::new(),
        codes: Vec::with_capacity(entries.len()),
    };
    for (i, e) in entries.iter().enumerate() {
        if i == 0 || entries[i - 1].0 != e.0 || entries[i - 1].1 != e.1 {
            groups.centroids.push(LatLon { lat: e.0, lon: e.1 });
            groups.start.push(i as u32);
        }
        groups.codes.push(e.2);
    }
    groups.start.push(entries.len() as u32);
    groups
}

/// The cache's layout version: 005 added the other postcodes of each centroid.
const CACHE_MAGIC: &[u8; 8] = b"PCIDX005";
/// Written in the header in this machine's byte order: a cache from a machine of the other order is refused.
const BYTE_ORDER_MARK: u64 = 0x0102_0304_0506_0708;
/// Header: magic, byte-order mark, postcodes, centroids, grid rows, grid
/// columns (u64), grid origin latitude and longitude (f64), other postcodes (u64).
const CACHE_HEADER: usize = 72;

/// The cache file of a postcode file: named after its path, size and modification time.
fn cache_path(path: &Path, cache_dir: &Path) -> Result<std::path::PathBuf, OfflineError> {
    let meta = std::fs::metadata(path).map_err(|e| OfflineError::Open(path.display().to_string(), e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = format!(
        "{}\0{}\0{}",
        std::fs::canonicalize(path)
            .unwrap_or(path.to_path_buf())
            .display(),
        meta.len(),
        mtime
    );
    let digest = Sha256::digest(key.as_bytes());
    Ok(cache_dir.join(format!("postcode-index-{}.bin", hex::encode(&digest[..16]))))
}

fn parse_into_cache(path: &Path, cache: &Path) -> Result<OfflineIndex, OfflineError> {
    let name = path.display().to_string();
    let entries = OfflineIndex::parse(
        Box::new(File::open(path).map_err(|e| OfflineError::Open(name.clone(), e))?),
        &name,
    )?;
    let index = OfflineIndex::from_entries(entries);
    if let Err(e) = write_cache(cache, &index) {
        tracing::debug!(cache = %cache.display(), "offline index cache not written: {e}");
    }
    Ok(index)
}

/// Byte lengths of the sections after the header, each padded to 8 bytes:
/// centroids, codes, unit vectors, cell starts, items, other postcodes' starts, other postcodes.
/// `None` when the sizes overflow (a damaged header).
fn sections(centroids: usize, cells: usize, others: usize) -> Option<[(usize, usize); 7]> {
    let sized = [
        (centroids, 16),
        (centroids, 8),
        (centroids, 24),
        (cells.checked_add(1)?, 4),
        (centroids, 4),
        (centroids.checked_add(1)?, 4),
        (others, 8),
    ];
    let mut out = [(0, 0); 7];
    for (o, (n, size)) in out.iter_mut().zip(sized) {
        *o = (n, n.checked_mul(size)?.checked_next_multiple_of(8)?);
    }
    Some(out)
}

/// Maps a whole cache file; `None` when missing, of another version or byte
/// order, not whole, or inconsistent.
fn read_cache(path: &Path) -> Option<OfflineIndex> {
    let file = File::open(path).ok()?;
    // SAFETY: cache files are only ever replaced by rename, never modified in
    // place, so the mapped bytes do not change while mapped.
    let map = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&file) }.ok()?);
    let head = map.get(..CACHE_HEADER)?;
    let word = |i: usize| u64::from_ne_bytes(head[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    if &head[..8] != CACHE_MAGIC || word(1) != BYTE_ORDER_MARK {
        return None;
    }
    let (postcodes, n, rows, cols) = (
        word(2) as usize,
        word(3) as usize,
        word(4) as usize,
        word(5) as usize,
    );
    let shape = GridShape {
        lat0: f64::from_bits(word(6)),
        lon0: f64::from_bits(word(7)),
        rows,
        cols,
    };
    let [c, k, u, s, i, os, o] = sections(n, rows.checked_mul(cols)?, word(8) as usize)?;
    let mut at = CACHE_HEADER;
    let mut next = |(_, bytes): (usize, usize)| {
        let offset = at;
        at = at.checked_add(bytes)?;
        Some(offset)
    };
    let (c_at, k_at, u_at, s_at, i_at) = (next(c)?, next(k)?, next(u)?, next(s)?, next(i)?);
    let (os_at, o_at) = (next(os)?, next(o)?);
    if at != map.len() || n == 0 {
        return None;
    }
    let centroids = Slab::mapped(&map, c_at, c.0)?;
    let codes: Slab<[u8; 8]> = Slab::mapped(&map, k_at, k.0)?;
    let others_start: Slab<u32> = Slab::mapped(&map, os_at, os.0)?;
    let others: Slab<[u8; 8]> = Slab::mapped(&map, o_at, o.0)?;
    let others_fit = others_start.first() == Some(&0)
        && others_start.last().map(|&l| l as usize) == Some(others.len())
        && others_start.windows(2).all(|w| w[0] <= w[1]);
    if !others_fit || !codes.iter().chain(others.iter()).all(|code| code.is_ascii()) {
        return None;
    }
    let grid = Grid::from_parts(
        shape,
        Slab::mapped(&map, s_at, s.0)?,
        Slab::mapped(&map, u_at, u.0)?,
        Slab::mapped(&map, i_at, i.0)?,
        n,
    )?;
    Some(OfflineIndex {
        grid,
        centroids,
        codes,
        others_start,
        others,
        postcodes,
        wide: WideRule::default(),
    })
}

fn write_cache(path: &Path, index: &OfflineIndex) -> std::io::Result<()> {
    use std::io::Write as _;
    // Written whole under a name no other writer uses (processes of other
    // containers may share the directory and a process id), synced, then
    // renamed: readers never see a partial file, and a mapped file is never
    // written to.
    let tmp = path.with_extension(format!(
        "{}-{:016x}.partial",
        std::process::id(),
        rand::random::<u64>()
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let shape = index.grid.shape();
    let (start, units, items) = index.grid.arrays();
    out.write_all(CACHE_MAGIC)?;
    for w in [
        BYTE_ORDER_MARK,
        index.postcodes as u64,
        index.centroids.len() as u64,
        shape.rows as u64,
        shape.cols as u64,
        shape.lat0.to_bits(),
        shape.lon0.to_bits(),
        index.others.len() as u64,
    ] {
        out.write_all(&w.to_ne_bytes())?;
    }
    let parts = [
        index.centroids.as_bytes(),
        index.codes.as_bytes(),
        units.as_bytes(),
        start.as_bytes(),
        items.as_bytes(),
        index.others_start.as_bytes(),
        index.others.as_bytes(),
    ];
    let sizes = sections(index.centroids.len(), shape.rows * shape.cols, index.others.len())
        .ok_or_else(|| std::io::Error::other("index too large to cache"))?;
    for (bytes, (_, padded)) in parts.into_iter().zip(sizes) {
        out.write_all(bytes)?;
        out.write_all(&[0u8; 8][..padded - bytes.len()])?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    let synced = file.sync_all();
    drop(file);
    match synced.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
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
        let n = idx
            .nearest(
                LatLon {
                    lat: 57.1001,
                    lon: -2.2,
                },
                100.0,
            )
            .unwrap();
        assert_eq!(n.postcode, "AB1 0AA"); // tie at one centroid: alphabetically first; terminated ZZ1 skipped
        assert!((n.distance_m - 11.1).abs() < 0.1, "{}", n.distance_m);
        assert!(idx
            .nearest(
                LatLon {
                    lat: 57.15,
                    lon: -2.2
                },
                100.0
            )
            .is_none());
        assert_eq!(
            idx.nearest(
                LatLon {
                    lat: 57.19,
                    lon: -2.2
                },
                2000.0
            )
            .unwrap()
            .postcode,
            "AB10 1AA"
        );
        let far = LatLon {
            lat: 57.19,
            lon: -2.2,
        };
        // postcodes.io's widesearch: fewer than 10 postcodes within 19.5 km, no answer
        assert_eq!(idx.lookup(far, Radius::Widesearch), None);
        let idx = idx.with_wide_rule(WideRule::NearestWithin20Km);
        let m = idx.lookup(far, Radius::Widesearch).unwrap();
        assert_eq!(
            (m.area.outcode.as_deref(), m.area.incode.as_deref()),
            (Some("AB10"), Some("1AA"))
        );
        assert_eq!(
            idx.nearest_n(LatLon { lat: 57.1, lon: -2.2 }, 20_000.0, 5)
                .iter()
                .map(|n| n.postcode)
                .collect::<Vec<_>>(),
            ["AB1 0AA", "AB1 0ZZ", "AB10 1AA"] // every postcode, also those sharing a centroid
        );
    }

    #[test]
    fn the_cache_gives_the_same_index_and_follows_the_file() {
        let dir = std::env::temp_dir().join(format!("offline-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pc.csv");
        std::fs::write(
            &file,
            "pcd,lat,long\nAB1 0ZZ,57.1,-2.2\nAB1 0AA,57.1,-2.2\nAB101AA,57.2,-2.2\n",
        )
        .unwrap();
        let first = OfflineIndex::load_cached(&file, &dir).unwrap();
        assert_eq!(
            std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".bin"))
                .count(),
            1
        );
        let cached = OfflineIndex::load_cached(&file, &dir).unwrap();
        assert_eq!((cached.postcodes(), cached.centroids()), (3, 2));
        let at = LatLon {
            lat: 57.19,
            lon: -2.2,
        };
        assert_eq!(cached.nearest(at, 2000.0), first.nearest(at, 2000.0));
        assert!(
            matches!(cached.grid.arrays().0, Slab::Mapped { .. }),
            "the second load maps the cache"
        );
        drop(cached); // unmapped before the file is changed in place below
                      // a cut-short or tampered cache is not used: the file is read again
        let bin = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "bin"))
            .unwrap();
        let whole = std::fs::read(&bin).unwrap();
        std::fs::write(&bin, &whole[..whole.len() - 8]).unwrap();
        assert!(read_cache(&bin).is_none());
        assert_eq!(
            OfflineIndex::load_cached(&file, &dir)
                .unwrap()
                .nearest(at, 2000.0),
            first.nearest(at, 2000.0)
        );
        let mut bad = whole.clone();
        // before the items (2 × 4 bytes), the other postcodes' starts (3 × 4, padded to 16), the
        // other postcode (8) and the last 8 bytes of the cell starts (maybe padding): a cell start
        let near_end = whole.len() - 5 * 8;
        bad[near_end - 4..near_end].copy_from_slice(&99u32.to_ne_bytes()); // a cell start above the point count
        std::fs::write(&bin, &bad).unwrap();
        assert!(read_cache(&bin).is_none());
        assert_eq!(
            OfflineIndex::load_cached(&file, &dir)
                .unwrap()
                .nearest(at, 2000.0),
            first.nearest(at, 2000.0)
        );
        assert_eq!(std::fs::read(&bin).unwrap(), whole, "rebuilt as it was");
        // a changed file (other size) is read again, not answered from the old cache
        std::fs::write(&file, "pcd,lat,long\nZZ9 9ZZ,57.19,-2.2\n").unwrap();
        assert_eq!(
            OfflineIndex::load_cached(&file, &dir)
                .unwrap()
                .nearest(at, 2000.0)
                .unwrap()
                .postcode,
            "ZZ9 9ZZ"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        // Clustered centroids, some shared by several postcodes, queries near and far:
        // the index answers what measuring every postcode by Karney's geodesic does.
        #[test]
        fn answers_are_the_geodesic_brute_force(
            seeds in proptest::collection::vec((49.9f64..58.7, -7.6f64..1.8), 1..6),
            offsets in proptest::collection::vec((0usize..6, -0.03f64..0.03, -0.05f64..0.05, 1usize..4), 1..300),
            queries in proptest::collection::vec((0usize..6, -0.2f64..0.2, -0.3f64..0.3), 1..30),
        ) {
            let mut text = String::from("pcds,lat,long\n");
            let mut all = Vec::new();
            for (i, &(s, dl, dn, copies)) in offsets.iter().enumerate() {
                let (la, lo) = seeds[s % seeds.len()];
                let (lat, lon) = ((la + dl) * 1e5, (lo + dn) * 1e5);
                let (lat, lon) = (lat.round() / 1e5, lon.round() / 1e5); // NSPL's 5 decimals: ties happen
                for c in 0..copies {
                    let code = format!("{}B{} {c}AA", char::from(b'A' + (i / 100) as u8), i % 100); // distinct
                    text.push_str(&format!("{code},{lat},{lon}\n"));
                    all.push((code, LatLon { lat, lon }));
                }
            }
            let idx = index(&text);
            for &(s, dl, dn) in &queries {
                let (la, lo) = seeds[s % seeds.len()];
                let at = LatLon { lat: la + dl, lon: lo + dn };
                let mut brute: Vec<(f64, &str)> = all.iter().map(|(c, p)| (karney_m(at, *p), c.as_str())).collect();
                brute.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
                for radius in [100.0, 2000.0, 20_000.0] {
                    let want = brute.iter().find(|b| b.0 <= radius);
                    let got = idx.nearest(at, radius);
                    proptest::prop_assert_eq!(want.map(|w| w.1), got.as_ref().map(|g| g.postcode), "at {:?} r {}", at, radius);
                    if let (Some(w), Some(g)) = (want, got) {
                        proptest::prop_assert!((w.0 - g.distance_m).abs() < 1e-4);
                    }
                    let list = idx.nearest_n(at, radius, 7);
                    let want: Vec<&str> = brute.iter().filter(|b| b.0 <= radius).take(7).map(|b| b.1).collect();
                    proptest::prop_assert_eq!(list.iter().map(|n| n.postcode).collect::<Vec<_>>(), want);
                }
                // widesearch: postcodes.io's rule against its definition (10 within 19.5 km)
                let ten = brute.len() >= 10 && brute[9].0 <= WIDESEARCH_LAST_RANGE_M;
                let wide = idx.lookup(at, Radius::Widesearch);
                proptest::prop_assert_eq!(wide.map(|m| m.postcode), ten.then(|| brute[0].1.to_string()));
            }
        }
    }

    #[test]
    fn terminated_postcodes_are_left_out() {
        // A terminated postcode nearer than any live one: never answered, never counted.
        let text =
            "pcds,doterm,lat,long\nAB1 0AA,,57.1,-2.2\nAB1 0AB,202301,57.10001,-2.2\nAB1 0AD,,57.1002,-2.2\n";
        let idx = index(text);
        let at = LatLon {
            lat: 57.10001,
            lon: -2.2,
        };
        assert_eq!(idx.postcodes(), 2);
        assert_eq!(idx.nearest(at, 100.0).unwrap().postcode, "AB1 0AA");
        let list: Vec<_> = idx.nearest_n(at, 2000.0, 10).iter().map(|n| n.postcode).collect();
        assert_eq!(list, ["AB1 0AA", "AB1 0AD"]);
    }

    #[test]
    fn refuses_files_without_columns() {
        let e = OfflineIndex::from_reader(Box::new(std::io::Cursor::new(b"a,b\n1,2\n".to_vec())), "x");
        assert!(e.is_err());
    }
}
