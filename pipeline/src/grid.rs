//! Exact nearest-neighbour search on the sphere over a latitude/longitude grid,
//! for the offline provider's 2 M postcode centroids; and the candidates for
//! the nearest under a metric within a known ratio of the sphere's
//! ([`Grid::candidates_at`]: the offline provider ranks them by geodesic).
//!
//! Points are bucketed into cells of [`CELL_LAT_DEG`] × [`CELL_LON_DEG`]
//! (about 450 m × 420 m in Great Britain) stored contiguously in cell order
//! (one offsets array, a counting sort to build). A query scans the cells in
//! rings around its own cell, skips a cell whose lower-bound distance exceeds
//! the best so far, and stops when no unscanned cell can hold anything nearer.
//! Distances are squared chords between unit vectors, which order exactly as
//! great-circle distances.
//!
//! Lower bounds (angles on the unit sphere, for a point P outside a set of rows
//! or columns):
//! - rows: every great-circle path is at least as long as its latitude change,
//!   so `dist ≥ |φQ − φedge|`;
//! - columns: P lies beyond the meridian at the column edge, so a path from Q
//!   crosses it, and the distance from Q to a meridian Δλ away is
//!   `asin(cos φQ · sin Δλ) ≥ cos φQ · (Δλ − Δλ³/6)`.
//!
//! An angle θ becomes a squared chord `(2 sin(θ/2))² ≥ (θ − θ³/24)²`. Both
//! bounds are relaxed by [`SLACK_RAD`] (6 mm) against rounding, which can only
//! make the search look at a cell more, never skip one it needs. Measured
//! against brute force in this module's tests and `operator/tests/local_pipeline.rs`.

use crate::{geo::LatLon, slab::Slab};

/// Cell height, degrees of latitude.
pub const CELL_LAT_DEG: f64 = 0.004;
/// Cell width, degrees of longitude (≈ CELL_LAT_DEG / cos 54°: square cells in Great Britain).
pub const CELL_LON_DEG: f64 = 0.0064;
/// Rounding allowance of the lower bounds, radians (1e-9 rad ≈ 6 mm).
const SLACK_RAD: f64 = 1e-9;

/// Points in grid cells; item numbers are positions in the order given to [`Grid::build`].
pub struct Grid {
    lat0: f64,
    lon0: f64,
    rows: usize,
    cols: usize,
    /// `start[cell]..start[cell + 1]` are the cell's entries in `units`/`items`.
    start: Slab<u32>,
    units: Slab<[f64; 3]>,
    items: Slab<u32>,
}

/// Where a grid lies and its size in cells: with its three arrays, all of a grid
/// (see [`Grid::from_parts`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridShape {
    /// South-west corner of cell (0, 0), degrees.
    pub lat0: f64,
    pub lon0: f64,
    pub rows: usize,
    pub cols: usize,
}

/// A zeroed vector whose memory the kernel is asked to back with transparent
/// huge pages: a query touches a few cells at random in ~70 MB, and with 4 KiB
/// pages most of those touches also miss the TLB.
fn huge_vec<T: Copy>(n: usize, zero: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let bytes = n * std::mem::size_of::<T>();
    const HUGE: usize = 2 << 20;
    if bytes >= 2 * HUGE {
        let start = (v.as_mut_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_mut_ptr() as usize + bytes) & !(HUGE - 1);
        if end > start {
            // SAFETY: advice on a range inside this vector's own allocation; no memory is accessed.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(n, zero);
    v
}

/// Queries ahead whose cell starts [`Grid::nearest_each`] requests.
pub const STARTS_AHEAD: usize = 16;
/// Queries ahead whose points [`Grid::nearest_each`] requests (their starts requested earlier).
pub const POINTS_AHEAD: usize = 8;

/// Asks the CPU to start loading the cache line of `p`; no effect on results.
#[inline(always)]
pub(crate) fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unused_unsafe)]
    // SAFETY: a prefetch is a hint; it reads nothing into the program and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((p as *const T).cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Squared chord lower bound for a great-circle angle θ ≥ 0 (radians).
#[inline]
fn chord2_at_least(theta: f64) -> f64 {
    let t = (theta - SLACK_RAD).max(0.0);
    let c = (t - t * t * t / 24.0).max(0.0);
    c * c
}

/// Angle lower bound to points `dlon` radians of longitude away (0 ≤ dlon ≤ π/2).
#[inline]
fn lon_gap(cos_lat: f64, dlon: f64) -> f64 {
    if dlon <= 0.0 {
        0.0
    } else {
        let x = dlon.min(std::f64::consts::FRAC_PI_2);
        cos_lat * (x - x * x * x / 6.0)
    }
}

/// A query in progress.
struct Query {
    q: [f64; 3],
    phi: f64,
    lam: f64,
    cos_phi: f64,
    row: usize,
    col: usize,
}

impl Grid {
    /// Builds the grid over points (WGS84 degrees). Panics when `points` is empty
    /// or holds more than `u32::MAX` points.
    pub fn build(points: &[LatLon]) -> Self {
        assert!(
            !points.is_empty() && points.len() < u32::MAX as usize,
            "1..u32::MAX points"
        );
        let (mut lat_min, mut lat_max, mut lon_min, mut lon_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for p in points {
            lat_min = lat_min.min(p.lat);
            lat_max = lat_max.max(p.lat);
            lon_min = lon_min.min(p.lon);
            lon_max = lon_max.max(p.lon);
        }
        let rows = ((lat_max - lat_min) / CELL_LAT_DEG) as usize + 1;
        let cols = ((lon_max - lon_min) / CELL_LON_DEG) as usize + 1;
        let mut grid = Grid {
            lat0: lat_min,
            lon0: lon_min,
            rows,
            cols,
            start: Slab::Owned(vec![]),
            units: Slab::Owned(vec![]),
            items: Slab::Owned(vec![]),
        };
        let cells: Vec<u32> = points.iter().map(|p| grid.cell_of(p.lat, p.lon) as u32).collect();
        let mut start = huge_vec(rows * cols + 1, 0u32);
        for &c in &cells {
            start[c as usize + 1] += 1;
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut next = start.clone();
        let mut units = huge_vec(points.len(), [0.0; 3]);
        let mut items = huge_vec(points.len(), 0u32);
        for (i, (&c, p)) in cells.iter().zip(points).enumerate() {
            let slot = &mut next[c as usize];
            units[*slot as usize] = p.unit_vector();
            items[*slot as usize] = i as u32;
            *slot += 1;
        }
        grid.start = start.into();
        grid.units = units.into();
        grid.items = items.into();
        grid
    }

    /// Where the grid lies and its size.
    pub fn shape(&self) -> GridShape {
        GridShape {
            lat0: self.lat0,
            lon0: self.lon0,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// The arrays: cell starts (`rows × cols + 1`), unit vectors and item numbers (one a point).
    pub fn arrays(&self) -> (&Slab<u32>, &Slab<[f64; 3]>, &Slab<u32>) {
        (&self.start, &self.units, &self.items)
    }

    /// A grid from what [`Grid::shape`] and [`Grid::arrays`] gave of one built
    /// for `points` points; `None` when the parts do not fit together (cell
    /// starts not rising from 0 to the point count, an item out of range).
    pub fn from_parts(
        shape: GridShape,
        start: Slab<u32>,
        units: Slab<[f64; 3]>,
        items: Slab<u32>,
        points: usize,
    ) -> Option<Self> {
        let n = units.len();
        let cells_fit = shape.rows > 0
            && shape.cols > 0
            && start.len() == shape.rows.checked_mul(shape.cols)?.checked_add(1)?;
        let fits = cells_fit
            && items.len() == n
            && n == points
            && start.first() == Some(&0)
            && start.last().map(|&l| l as usize) == Some(n)
            && start.windows(2).all(|w| w[0] <= w[1])
            && items.iter().all(|&i| (i as usize) < points);
        fits.then_some(Grid {
            lat0: shape.lat0,
            lon0: shape.lon0,
            rows: shape.rows,
            cols: shape.cols,
            start,
            units,
            items,
        })
    }

    /// Bytes of memory held.
    pub fn bytes(&self) -> usize {
        self.start.len() * 4 + self.units.len() * 24 + self.items.len() * 4
    }

    fn row_of(&self, lat: f64) -> usize {
        (((lat - self.lat0) / CELL_LAT_DEG).floor().max(0.0) as usize).min(self.rows - 1)
    }

    fn col_of(&self, lon: f64) -> usize {
        (((lon - self.lon0) / CELL_LON_DEG).floor().max(0.0) as usize).min(self.cols - 1)
    }

    fn cell_of(&self, lat: f64, lon: f64) -> usize {
        self.row_of(lat) * self.cols + self.col_of(lon)
    }

    /// Latitude of the lower edge of row `r`, radians.
    fn row_edge(&self, r: usize) -> f64 {
        (self.lat0 + r as f64 * CELL_LAT_DEG).to_radians()
    }

    /// Longitude of the western edge of column `c`, radians.
    fn col_edge(&self, c: usize) -> f64 {
        (self.lon0 + c as f64 * CELL_LON_DEG).to_radians()
    }

    fn query(&self, at: LatLon) -> Query {
        let (phi, lam) = (at.lat.to_radians(), at.lon.to_radians());
        Query {
            q: at.unit_vector(),
            phi,
            lam,
            cos_phi: phi.cos(),
            row: self.row_of(at.lat),
            col: self.col_of(at.lon),
        }
    }

    /// Squared-chord lower bound from the query to anything in cell (r, c).
    #[inline]
    fn cell_bound(&self, q: &Query, r: usize, c: usize) -> f64 {
        let (lo, hi) = (self.row_edge(r), self.row_edge(r + 1));
        let dlat = if q.phi < lo {
            lo - q.phi
        } else if q.phi > hi {
            q.phi - hi
        } else {
            0.0
        };
        let (w, e) = (self.col_edge(c), self.col_edge(c + 1));
        let dlon = if q.lam < w {
            w - q.lam
        } else if q.lam > e {
            q.lam - e
        } else {
            0.0
        };
        chord2_at_least(dlat.max(lon_gap(q.cos_phi, dlon)))
    }

    /// Squared-chord lower bound to anything outside rings 0..=k, `INFINITY` when
    /// those rings cover the grid.
    fn ring_bound(&self, q: &Query, k: usize) -> f64 {
        let mut gap = f64::INFINITY;
        if q.row > k {
            gap = gap.min((q.phi - self.row_edge(q.row - k)).max(0.0));
        }
        if q.row + k + 1 < self.rows {
            gap = gap.min((self.row_edge(q.row + k + 1) - q.phi).max(0.0));
        }
        if q.col > k {
            gap = gap.min(lon_gap(q.cos_phi, q.lam - self.col_edge(q.col - k)));
        }
        if q.col + k + 1 < self.cols {
            gap = gap.min(lon_gap(q.cos_phi, self.col_edge(q.col + k + 1) - q.lam));
        }
        if gap.is_infinite() {
            f64::INFINITY
        } else {
            chord2_at_least(gap)
        }
    }

    /// Calls `visit(cell bound, range)` for the cells of ring k (Chebyshev distance k
    /// from the query's cell) inside the grid.
    #[inline]
    fn ring(&self, q: &Query, k: usize, mut visit: impl FnMut(usize, usize)) {
        let (r0, c0) = (q.row as isize, q.col as isize);
        let k = k as isize;
        let (rows, cols) = (self.rows as isize, self.cols as isize);
        for r in (r0 - k).max(0)..=(r0 + k).min(rows - 1) {
            let edge_row = r == r0 - k || r == r0 + k;
            if edge_row {
                for c in (c0 - k).max(0)..=(c0 + k).min(cols - 1) {
                    visit(r as usize, c as usize);
                }
            } else {
                for c in [c0 - k, c0 + k] {
                    if c >= 0 && c < cols {
                        visit(r as usize, c as usize);
                    }
                }
            }
        }
    }

    /// Scans cells ring by ring, offering `found` every point of a cell whose
    /// lower bound is within `found.limit()`, until no unscanned cell can be.
    fn search(&self, at: LatLon, found: &mut impl Found) -> [f64; 3] {
        let q = self.query(at);
        // The slices once, not through the `Slab` at every point.
        let (start, units): (&[u32], &[[f64; 3]]) = (&self.start, &self.units);
        for k in 0.. {
            self.ring(&q, k, |r, c| {
                if self.cell_bound(&q, r, c) > found.limit() {
                    return;
                }
                let cell = r * self.cols + c;
                let (first, end) = (start[cell] as usize, start[cell + 1] as usize);
                for (i, u) in units[first..end].iter().enumerate().map(|(j, u)| (first + j, u)) {
                    let (dx, dy, dz) = (u[0] - q.q[0], u[1] - q.q[1], u[2] - q.q[2]);
                    found.offer(dx * dx + dy * dy + dz * dz, i);
                }
            });
            // Stop when nothing unscanned can be wanted, or nothing is left unscanned
            // (with an unbounded limit and fewer points than wanted, the bound alone never stops).
            let bound = self.ring_bound(&q, k);
            if bound.is_infinite() || bound > found.limit() {
                break;
            }
        }
        q.q
    }

    /// The nearest point within squared chord `max_c2` as (squared chord, item);
    /// among points equally near, the one `better` prefers (a strict "less than" on items).
    pub fn nearest(&self, at: LatLon, max_c2: f64, better: impl Fn(u32, u32) -> bool) -> Option<(f64, u32)> {
        let items: &[u32] = &self.items;
        self.nearest_at(at, max_c2, |a, b| better(items[a], items[b]))
            .map(|(d2, pos)| (d2, items[pos]))
    }

    /// Like [`Grid::nearest`], by position: the result and `better`'s arguments
    /// are positions in the grid's order ([`Grid::items`] maps them to items).
    /// A caller that keeps its own per-point data in that order reads it next
    /// to nothing else, instead of through the item array (a cache miss).
    pub fn nearest_at(
        &self,
        at: LatLon,
        max_c2: f64,
        better: impl Fn(usize, usize) -> bool,
    ) -> Option<(f64, usize)> {
        let mut found = Nearest {
            max_c2,
            better,
            best: None,
        };
        self.search(at, &mut found);
        found.best
    }

    /// [`Grid::nearest_at`] for each of `ats` in order, handing `each(i, result)`
    /// the same answers. Faster on scattered queries: a search waits on memory
    /// (a cell's start, then its points, each a likely cache miss), so the
    /// starts are requested [`STARTS_AHEAD`] queries ahead and the points
    /// [`POINTS_AHEAD`] ahead, while other searches run.
    pub fn nearest_each(
        &self,
        ats: &[LatLon],
        max_c2: f64,
        better: impl Fn(usize, usize) -> bool + Copy,
        mut each: impl FnMut(usize, Option<(f64, usize)>),
    ) {
        for (i, &at) in ats.iter().enumerate() {
            if let Some(&ahead) = ats.get(i + STARTS_AHEAD) {
                self.prefetch_starts(ahead);
            }
            if let Some(&ahead) = ats.get(i + POINTS_AHEAD) {
                self.prefetch_points(ahead);
            }
            each(i, self.nearest_at(at, max_c2, better));
        }
    }

    /// Candidates for the nearest points under another metric whose ratio to
    /// the sphere's lies in `1..=factor` after scaling (the geodesic one, see
    /// [`crate::geo::SPHERE_TO_ELLIPSOID`]): into `out`, as (squared chord,
    /// position) nearest first, every point within squared chord `max_c2`
    /// whose great-circle distance is at most `factor` × that of the point
    /// where the `weight`s (≥ 1 each) of the points nearer or as near first
    /// add up to `need` (all of them when they never do). So the `need`
    /// nearest under the other metric, counted by weight, are among them.
    /// `need` ≥ 1; `factor` ≥ 1. Returns the query's unit vector.
    pub fn candidates_at(
        &self,
        at: LatLon,
        max_c2: f64,
        need: u32,
        factor: f64,
        weight: impl Fn(usize) -> u32,
        out: &mut Vec<(f64, usize)>,
    ) -> [f64; 3] {
        out.clear();
        // chord(kθ) ≤ k·chord(θ) for k ≥ 1 (the chord is concave in the angle)
        let factor2 = factor * factor;
        if need == 1 {
            let mut found = Candidates1 {
                max_c2,
                limit: max_c2,
                factor2,
                found: out,
            };
            let u = self.search(at, &mut found);
            let limit = found.limit;
            out.retain(|c| c.0 <= limit);
            out.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            return u;
        }
        let mut found = Candidates {
            max_c2,
            limit: max_c2,
            factor2,
            need,
            weight,
            found: out,
        };
        self.search(at, &mut found)
    }

    /// [`Grid::candidates_at`] with `need` 1 for each of `ats` in order, handing
    /// `each(i, query's unit vector, candidates)`; faster on many queries (see
    /// [`Grid::nearest_each`]).
    pub fn candidates_each(
        &self,
        ats: &[LatLon],
        max_c2: f64,
        factor: f64,
        mut each: impl FnMut(usize, [f64; 3], &[(f64, usize)]),
    ) {
        let mut out = Vec::with_capacity(16);
        for (i, &at) in ats.iter().enumerate() {
            if let Some(&ahead) = ats.get(i + STARTS_AHEAD) {
                self.prefetch_starts(ahead);
            }
            if let Some(&ahead) = ats.get(i + POINTS_AHEAD) {
                self.prefetch_points(ahead);
            }
            let u = self.candidates_at(at, max_c2, 1, factor, |_| 1, &mut out);
            each(i, u, &out);
        }
    }

    /// The unit vectors, by position.
    pub fn units(&self) -> &[[f64; 3]] {
        &self.units
    }

    /// The item at each position: `items()[pos]` is the number, in the order
    /// given to [`Grid::build`], of the point at `pos`.
    pub fn items(&self) -> &[u32] {
        &self.items
    }

    /// Rows of the 3 × 3 cells around `at`, as (first cell, one past the last cell).
    fn block(&self, at: LatLon) -> impl Iterator<Item = (usize, usize)> + '_ {
        let (r, c) = (self.row_of(at.lat), self.col_of(at.lon));
        let (c0, c1) = (c.saturating_sub(1), (c + 1).min(self.cols - 1));
        (r.saturating_sub(1)..=(r + 1).min(self.rows - 1))
            .map(move |row| (row * self.cols + c0, row * self.cols + c1 + 1))
    }

    /// Requests the cell starts of the 3 × 3 cells around `at` (a hint to the CPU only).
    fn prefetch_starts(&self, at: LatLon) {
        for (first, end) in self.block(at) {
            prefetch(&self.start[first]);
            prefetch(&self.start[end]);
        }
    }

    /// Requests the first points of the 3 × 3 cells around `at` (a hint to the CPU only).
    fn prefetch_points(&self, at: LatLon) {
        for (first, end) in self.block(at) {
            let (lo, hi) = (self.start[first] as usize, self.start[end] as usize);
            for i in (lo..hi).step_by(3).take(4) {
                prefetch(&self.units[i]); // 3 unit vectors are 72 bytes: about a cache line each step
            }
        }
    }

    /// Up to `n` nearest points within squared chord `max_c2`, as (squared chord, item), nearest first.
    pub fn nearest_n(&self, at: LatLon, max_c2: f64, n: usize) -> Vec<(f64, u32)> {
        self.nearest_n_at(at, max_c2, n)
            .into_iter()
            .map(|(d2, pos)| (d2, self.items[pos]))
            .collect()
    }

    /// Like [`Grid::nearest_n`], by position (see [`Grid::nearest_at`]).
    pub fn nearest_n_at(&self, at: LatLon, max_c2: f64, n: usize) -> Vec<(f64, usize)> {
        if n == 0 {
            return vec![];
        }
        let mut found = NearestN {
            max_c2,
            n,
            found: Vec::with_capacity(n + 1),
        };
        self.search(at, &mut found);
        found.found
    }
}

/// What a search keeps of the points it is offered, by position in the grid's arrays.
trait Found {
    /// Squared chord beyond which nothing is wanted any more.
    fn limit(&self) -> f64;
    fn offer(&mut self, d2: f64, pos: usize);
}

struct Nearest<F> {
    max_c2: f64,
    better: F,
    best: Option<(f64, usize)>,
}

impl<F: Fn(usize, usize) -> bool> Found for Nearest<F> {
    fn limit(&self) -> f64 {
        self.best.map_or(self.max_c2, |b| b.0.min(self.max_c2))
    }

    #[inline]
    fn offer(&mut self, d2: f64, pos: usize) {
        match self.best {
            Some((b, bp)) if d2 > b || (d2 == b && !(self.better)(pos, bp)) => {}
            _ if d2 <= self.max_c2 => self.best = Some((d2, pos)),
            _ => {}
        }
    }
}

struct NearestN {
    max_c2: f64,
    n: usize,
    found: Vec<(f64, usize)>,
}

impl Found for NearestN {
    fn limit(&self) -> f64 {
        if self.found.len() == self.n {
            self.found[self.n - 1].0.min(self.max_c2)
        } else {
            self.max_c2
        }
    }

    fn offer(&mut self, d2: f64, pos: usize) {
        if d2 <= self.limit() {
            let at = self.found.partition_point(|f| f.0 <= d2);
            self.found.insert(at, (d2, pos));
            self.found.truncate(self.n);
        }
    }
}

/// [`Candidates`] for `need` 1, cheaper: every point offered within the limit
/// of its time is kept, and those beyond the final limit are dropped at the end.
struct Candidates1<'o> {
    max_c2: f64,
    limit: f64,
    factor2: f64,
    found: &'o mut Vec<(f64, usize)>,
}

impl Found for Candidates1<'_> {
    #[inline]
    fn limit(&self) -> f64 {
        self.limit
    }

    #[inline]
    fn offer(&mut self, d2: f64, pos: usize) {
        if d2 > self.limit {
            return;
        }
        self.found.push((d2, pos));
        let limit = self.max_c2.min(d2 * self.factor2);
        if limit < self.limit {
            self.limit = limit;
            if self.found.len() > 16 {
                self.found.retain(|c| c.0 <= limit);
            }
        }
    }
}

/// Everything within `factor` of the point where the weights reach `need` (see [`Grid::candidates_at`]).
struct Candidates<'o, W> {
    max_c2: f64,
    limit: f64,
    factor2: f64,
    need: u32,
    weight: W,
    found: &'o mut Vec<(f64, usize)>,
}

impl<W: Fn(usize) -> u32> Found for Candidates<'_, W> {
    #[inline]
    fn limit(&self) -> f64 {
        self.limit
    }

    #[inline]
    fn offer(&mut self, d2: f64, pos: usize) {
        if d2 > self.limit {
            return;
        }
        let at = self.found.partition_point(|f| f.0 <= d2);
        self.found.insert(at, (d2, pos));
        let mut sum = 0u32;
        for (j, &(d, p)) in self.found.iter().enumerate() {
            sum = sum.saturating_add((self.weight)(p));
            if sum >= self.need {
                self.limit = self.max_c2.min(d * self.factor2);
                let keep = self.found.partition_point(|f| f.0 <= self.limit).max(j + 1);
                self.found.truncate(keep);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn brute(points: &[LatLon], at: LatLon) -> (f64, u32) {
        let q = at.unit_vector();
        points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let u = p.unit_vector();
                (
                    (u[0] - q[0]).powi(2) + (u[1] - q[1]).powi(2) + (u[2] - q[2]).powi(2),
                    i as u32,
                )
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        // Clustered points (some cells dense, most empty) and queries inside,
        // near and far outside the grid: the grid answers what brute force does.
        #[test]
        fn nearest_is_exact(
            seeds in prop::collection::vec((49.9f64..58.7, -7.6f64..1.8), 1..12),
            offsets in prop::collection::vec((0usize..12, -0.05f64..0.05, -0.08f64..0.08), 1..400),
            queries in prop::collection::vec((45.0f64..62.0, -12.0f64..5.0), 1..40),
        ) {
            let points: Vec<LatLon> = offsets.iter().map(|&(s, dl, dn)| {
                let (la, lo) = seeds[s % seeds.len()];
                LatLon { lat: la + dl, lon: lo + dn }
            }).collect();
            let grid = Grid::build(&points);
            let mut all = queries.iter().map(|&(lat, lon)| LatLon { lat, lon }).collect::<Vec<_>>();
            all.extend(points.iter().take(20).map(|p| LatLon { lat: p.lat + 0.0001, lon: p.lon - 0.0002 }));
            for at in all {
                let (d2, item) = brute(&points, at);
                let got = grid.nearest(at, f64::INFINITY, |a, b| a < b).unwrap();
                prop_assert_eq!(got.0, d2, "at {:?}", at);
                prop_assert_eq!(got.1, item);
                let n = grid.nearest_n(at, f64::INFINITY, 3);
                prop_assert_eq!(n[0].0, d2);
                prop_assert!(n.windows(2).all(|w| w[0].0 <= w[1].0));
                // within a radius smaller than the nearest: nothing
                prop_assert!(grid.nearest(at, d2 * 0.999, |a, b| a < b).is_none() || d2 == 0.0);
            }
        }
    }

    #[test]
    fn asking_for_more_points_than_there_are_ends() {
        let points = [LatLon { lat: 51.5, lon: -0.1 }, LatLon { lat: 52.5, lon: -1.1 }];
        let grid = Grid::build(&points);
        assert_eq!(
            grid.nearest_n(LatLon { lat: 51.0, lon: 0.0 }, f64::INFINITY, 3)
                .len(),
            2
        );
    }

    #[test]
    fn exact_ties_go_to_the_preferred_item() {
        // Mirror images across the prime meridian: bit-for-bit equal distances.
        let points = [
            LatLon {
                lat: 51.5,
                lon: -0.001,
            },
            LatLon {
                lat: 51.5,
                lon: 0.001,
            },
        ];
        let grid = Grid::build(&points);
        let at = LatLon { lat: 51.5, lon: 0.0 };
        assert_eq!(grid.nearest(at, f64::INFINITY, |a, b| a < b).unwrap().1, 0);
        assert_eq!(grid.nearest(at, f64::INFINITY, |a, b| a > b).unwrap().1, 1);
    }
}
