//! The SQLite store's read of the output: every row of an import in row order
//! with its coordinate's lookup, as the `point_results` view defines it.
//!
//! The view's plan probes the lookups' primary key once a row: about 4 µs a row
//! at 1M rows (B-tree descent and record decoding in SQLite), most of an
//! end-to-end run. When the import's lookups fit
//! [`JOIN_BUDGET_BYTES`], they are instead read once in key order into a hash
//! table, and the points are scanned in row order against it. An answer is
//! kept as two packed parts, each stored once and shared: its own columns
//! (status, postcode, outcode, incode, error), shared by the coordinates with
//! the same answer, and its 16 area columns, shared by every postcode in the
//! same areas (an LSOA's postcodes: tens of thousands of distinct sets where
//! there are hundreds of thousands of postcodes). Two threads read the two
//! halves of the lookups (split at the median latitude). Larger imports, whose table
//! would not fit, are joined a chunk of rows at a time, each chunk's
//! coordinates looked up in key order ([`results_in_chunks`]), so memory
//! stays flat at any size.
//!
//! The in-memory path reads on several connections, not one snapshot: export
//! after the enrichers end (as `local` does), or rows may mix two moments.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    path::Path,
};

use foldhash::fast::RandomState;

use indexmap::{Equivalent, IndexSet};
use rusqlite::{types::ValueRef, Connection, OptionalExtension};

use super::bulk::open;
use crate::{
    lookup::Area,
    model::RowStatus,
    store::{columns, records::ResultRef},
};

/// Memory the in-memory join may hold (hash tables and packed answers), bytes.
/// Each half's table is a power of two of 33-byte slots within half of it.
/// 160 MiB since answers carry the area codes (19 packed columns): at 128 MiB
/// the 1M-row benchmark file (375 k distinct answers) no longer fitted and fell
/// back to the view's join, 9–10 s end to end instead of 6.4 s, for the same
/// peak RSS of `local` (about 247 MiB, the enrichers' postcode index). The
/// areas are kept apart from the answers (issue 17): answers from
/// postcodes.io carry all 16 area columns, which the postcodes of one LSOA
/// share.
pub const JOIN_BUDGET_BYTES: usize = 160 << 20;

/// The packed columns of an answer: status, postcode, [`Area::COLUMNS`], error.
const PACKED: usize = 2 + Area::COLUMNS.len() + 1;
/// Of those, the answer's own: status, postcode, outcode, incode, error. The
/// other 16 (country … msoa_code) are the postcode's areas, which tens of
/// thousands of postcodes share: kept once per distinct set of areas.
const OWN: [usize; 5] = [0, 1, 2, 3, PACKED - 1];
const AREAS: usize = PACKED - OWN.len();
const _: () = assert!(
    OWN[3] + 1 + AREAS == PACKED - 1,
    "the areas lie between incode and error"
);

/// Text columns in one allocation: `ends[i]` is where column i ends in `text`;
/// bit i of `nulls` marks a NULL.
#[derive(PartialEq, Eq)]
struct Packed<const N: usize> {
    text: Box<str>,
    ends: [u32; N],
    nulls: u32,
}

/// Columns being read, before they are known to be new.
struct PackedRef<'a, const N: usize> {
    text: &'a str,
    ends: [u32; N],
    nulls: u32,
}

impl<const N: usize> Hash for Packed<N> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        PackedRef {
            text: &self.text,
            ends: self.ends,
            nulls: self.nulls,
        }
        .hash(h)
    }
}

impl<const N: usize> Hash for PackedRef<'_, N> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.text.hash(h);
        self.ends.hash(h);
        self.nulls.hash(h);
    }
}

impl<const N: usize> Equivalent<Packed<N>> for PackedRef<'_, N> {
    fn equivalent(&self, a: &Packed<N>) -> bool {
        self.text == &*a.text && self.ends == a.ends && self.nulls == a.nulls
    }
}

impl<const N: usize> Packed<N> {
    fn column(&self, i: usize) -> Option<&str> {
        if self.nulls & (1 << i) != 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.text[start..self.ends[i] as usize])
    }
}

/// Packs columns `columns` of row `r` into `text` (cleared first): the ends
/// of the columns in it and the NULLs. Errors: a value that is not text, or
/// columns over 4 GiB.
fn pack<const N: usize>(
    r: &rusqlite::Row<'_>,
    columns: impl Iterator<Item = usize>,
    text: &mut String,
) -> anyhow::Result<([u32; N], u32)> {
    text.clear();
    let (mut ends, mut nulls) = ([0u32; N], 0u32);
    for ((i, end), column) in ends.iter_mut().enumerate().zip(columns) {
        match r.get_ref(column)? {
            ValueRef::Null => nulls |= 1 << i,
            v => text.push_str(v.as_str()?),
        }
        *end = u32::try_from(text.len())?;
    }
    Ok((ends, nulls))
}

/// Distinct packed values, each kept once, by index.
struct Distinct<const N: usize>(IndexSet<Packed<N>, RandomState>);

impl<const N: usize> Distinct<N> {
    /// The index of `text` packed as `ends`, `nulls`, added when new (its bytes
    /// counted in `bytes`, twice for the growth of the set); `None` once
    /// `bytes` would pass `budget`.
    fn index(
        &mut self,
        text: &str,
        (ends, nulls): ([u32; N], u32),
        bytes: &mut usize,
        budget: usize,
    ) -> Option<u32> {
        let found = PackedRef { text, ends, nulls };
        if let Some(i) = self.0.get_index_of(&found) {
            return Some(i as u32);
        }
        *bytes += text.len() + 2 * (std::mem::size_of::<Packed<N>>() + 8 + 8);
        if *bytes > budget {
            return None;
        }
        Some(
            self.0
                .insert_full(Packed {
                    text: text.into(),
                    ends,
                    nulls,
                })
                .0 as u32,
        )
    }
}

/// An answer: its own columns and its areas, each shared with every coordinate
/// (own) or postcode (areas) that has the same.
struct Answer<'a> {
    own: &'a Packed<{ OWN.len() }>,
    areas: &'a Packed<AREAS>,
}

impl Answer<'_> {
    /// Column `i` in [`PACKED`] order.
    fn column(&self, i: usize) -> Option<&str> {
        match OWN.iter().position(|&o| o == i) {
            Some(k) => self.own.column(k),
            None => self.areas.column(i - OWN[3] - 1),
        }
    }
}

/// A coordinate as the join key: the bit patterns, with −0.0 made +0.0 (SQL
/// compares them equal).
fn key(lat: f64, lon: f64) -> (u64, u64) {
    ((lat + 0.0).to_bits(), (lon + 0.0).to_bits())
}

/// Lookups in memory: coordinate → (own columns, areas, distance in metres,
/// NaN for none).
struct Half {
    coordinates: HashMap<(u64, u64), (u32, u32, f64), RandomState>,
    own: Distinct<{ OWN.len() }>,
    areas: Distinct<AREAS>,
}

/// The import's lookups in memory, in two halves by latitude (below `split`,
/// and the rest), read by two threads at once.
struct Lookups {
    split: f64,
    halves: [Half; 2],
}

/// Bytes a hash table of `n` entries of `entry` bytes allocates (hashbrown: a
/// power-of-two bucket count at most 7/8 full, one control byte a bucket).
fn table_bytes(n: usize, entry: usize) -> usize {
    (n.max(1) * 8 / 7 + 1).next_power_of_two() * (entry + 1)
}

impl Lookups {
    /// Reads the import's lookups, or `None` when they would take more than `budget` bytes.
    fn read(path: &Path, import_id: i64, budget: usize) -> anyhow::Result<Option<Self>> {
        let conn = open_for_scan(path)?;
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM lookups WHERE import_id = ?1",
            [import_id],
            |r| r.get(0),
        )?;
        if table_bytes(n as usize / 2 + 1, 32) > budget / 2 {
            return Ok(None);
        }
        // The median latitude (a walk of half the primary key): halves of equal size.
        let split: f64 = conn
            .query_row(
                "SELECT lat FROM lookups WHERE import_id = ?1 ORDER BY lat LIMIT 1 OFFSET ?2",
                [import_id, n / 2],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0.0);
        let (below, rest) = std::thread::scope(|s| {
            let below = s.spawn(|| Half::read(path, import_id, "lat < ?2", split, budget / 2));
            let rest = Half::read(path, import_id, "lat >= ?2", split, budget / 2);
            (below.join().expect("lookups reader thread"), rest)
        });
        Ok(match (below?, rest?) {
            (Some(b), Some(r)) => Some(Lookups {
                split,
                halves: [b, r],
            }),
            _ => None,
        })
    }

    /// The answer and distance (NaN for none) of a coordinate.
    fn get(&self, lat: f64, lon: f64) -> Option<(Answer<'_>, f64)> {
        let half = &self.halves[usize::from(lat >= self.split)];
        half.coordinates.get(&key(lat, lon)).map(|&(own, areas, d)| {
            let answer = Answer {
                own: &half.own.0[own as usize],
                areas: &half.areas.0[areas as usize],
            };
            (answer, d)
        })
    }
}

/// A connection for one sequential scan: a 2 MiB page cache is as fast as the
/// default 32 MiB there, and three connections at 32 MiB took `local` from 160
/// to 218 MiB.
fn open_for_scan(path: &Path) -> anyhow::Result<Connection> {
    let conn = open(path)?;
    conn.execute_batch("PRAGMA cache_size = -2048")?;
    Ok(conn)
}

impl Half {
    /// The lookups whose latitude meets `condition` against `split`, or `None`
    /// when they would take more than `budget` bytes.
    fn read(
        path: &Path,
        import_id: i64,
        condition: &str,
        split: f64,
        budget: usize,
    ) -> anyhow::Result<Option<Self>> {
        let conn = open_for_scan(path)?;
        let sql = format!(
            "SELECT lat, lon, distance_m, {} FROM lookups WHERE import_id = ?1 AND {condition}",
            *columns::PACKED
        );
        let n: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM lookups WHERE import_id = ?1 AND {condition}"),
            rusqlite::params![import_id, split],
            |r| r.get(0),
        )?;
        let n = n as usize;
        let mut bytes = table_bytes(n, 32);
        if bytes > budget {
            return Ok(None);
        }
        let mut coordinates = HashMap::with_capacity_and_hasher(n, RandomState::default());
        let (mut own, mut areas) = (Distinct(IndexSet::default()), Distinct(IndexSet::default()));
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(rusqlite::params![import_id, split])?;
        let mut text = String::new();
        while let Some(r) = rows.next()? {
            let (lat, lon): (f64, f64) = (r.get(0)?, r.get(1)?);
            let distance: Option<f64> = r.get(2)?;
            let packed = pack(r, OWN.iter().map(|c| 3 + c), &mut text)?;
            let Some(o) = own.index(&text, packed, &mut bytes, budget) else {
                return Ok(None);
            };
            let packed = pack(r, (OWN[3] + 1..PACKED - 1).map(|c| 3 + c), &mut text)?;
            let Some(a) = areas.index(&text, packed, &mut bytes, budget) else {
                return Ok(None);
            };
            coordinates.insert(key(lat, lon), (o, a, distance.unwrap_or(f64::NAN)));
        }
        Ok(Some(Half {
            coordinates,
            own,
            areas,
        }))
    }
}

/// Column `i` of a row as text (`None` for NULL).
fn text<'a>(r: &'a rusqlite::Row<'_>, i: usize) -> anyhow::Result<Option<&'a str>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Null => None,
        v => Some(v.as_str()?),
    })
}

/// A row of the output, as `point_results` gives it, from its point's columns
/// (`invalid`: the point's status is `invalid`; `error`: the point's) and
/// its coordinate's answer and distance (NaN for none), if found.
fn result_row<'a>(
    row_number: i64,
    fields: &'a str,
    invalid: bool,
    error: Option<&'a str>,
    found: Option<&'a (Answer<'a>, f64)>,
) -> anyhow::Result<ResultRef<'a>> {
    let column = |i: usize| found.and_then(|(a, _)| a.column(i));
    let mut area = [None; Area::COLUMNS.len()];
    for (i, v) in area.iter_mut().enumerate() {
        *v = column(2 + i);
    }
    Ok(ResultRef {
        row_number,
        fields,
        status: if invalid {
            RowStatus::Invalid
        } else {
            status(column(0))?
        },
        postcode: column(1),
        distance_m: found.map(|(_, d)| *d).filter(|d| !d.is_nan()),
        area,
        error: error.or(column(PACKED - 1)),
    })
}

/// A stored status (`None`, a row without a lookup, is pending).
fn status(text: Option<&str>) -> anyhow::Result<RowStatus> {
    Ok(text.map(str::parse).transpose()?.unwrap_or(RowStatus::Pending))
}

/// Calls `emit` with every row of the import in row order, until it returns
/// `false`; joins in memory within `budget` bytes, else [`results_in_chunks`].
/// Errors: the database's.
pub fn results(
    path: &Path,
    import_id: i64,
    budget: usize,
    mut emit: impl FnMut(&ResultRef<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let Some(lookups) = Lookups::read(path, import_id, budget)? else {
        tracing::debug!(budget, "lookups exceed the join budget: joining chunk by chunk");
        return results_in_chunks(path, import_id, CHUNK_ROWS, emit);
    };
    let conn = open_for_scan(path)?;
    let [below, rest] = &lookups.halves;
    tracing::debug!(
        coordinates = below.coordinates.len() + rest.coordinates.len(),
        answers = below.own.0.len() + rest.own.0.len(),
        areas = below.areas.0.len() + rest.areas.0.len(),
        seconds = started.elapsed().as_secs_f64(),
        "lookups read for the export"
    );
    const SQL: &str = "SELECT row_number, fields, status, error, lat, lon FROM points WHERE import_id = ?1 ORDER BY row_number";
    let mut stmt = conn.prepare(SQL)?;
    let mut rows = stmt.query([import_id])?;
    while let Some(r) = rows.next()? {
        let (lat, lon): (Option<f64>, Option<f64>) = (r.get(4)?, r.get(5)?);
        let found = match (lat, lon) {
            (Some(lat), Some(lon)) => lookups.get(lat, lon),
            _ => None,
        };
        let invalid = status(text(r, 2)?)? == RowStatus::Invalid;
        let fields = text(r, 1)?.unwrap_or("");
        if !emit(&result_row(
            r.get(0)?,
            fields,
            invalid,
            text(r, 3)?,
            found.as_ref(),
        )?)? {
            break;
        }
    }
    Ok(())
}

/// Rows of a chunk of [`results_in_chunks`], at most.
const CHUNK_ROWS: usize = 1 << 19;
/// Bytes of the fields (and errors) of a chunk's rows, at most.
const CHUNK_TEXT_BYTES: usize = 32 << 20;

/// A point of a chunk: its text columns are ranges of the chunk's text.
struct ChunkRow {
    row_number: i64,
    fields: std::ops::Range<usize>,
    error: Option<std::ops::Range<usize>>,
    invalid: bool,
    coordinate: Option<(f64, f64)>,
}

/// Points read in row order, a chunk at a time.
#[derive(Default)]
struct Chunk {
    rows: Vec<ChunkRow>,
    text: String,
}

impl Chunk {
    /// Reads the next rows of `points` (`row_number, fields, status, error,
    /// lat, lon`), up to `limit` rows or [`CHUNK_TEXT_BYTES`]; `false` once
    /// `points` has no more.
    fn fill(&mut self, points: &mut rusqlite::Rows<'_>, limit: usize) -> anyhow::Result<bool> {
        self.rows.clear();
        self.text.clear();
        while self.rows.len() < limit.max(1) && self.text.len() < CHUNK_TEXT_BYTES {
            let Some(r) = points.next()? else {
                return Ok(false);
            };
            let text = &mut self.text;
            let mut push = |t: &str| {
                text.push_str(t);
                text.len() - t.len()..text.len()
            };
            let fields = push(self::text(r, 1)?.unwrap_or(""));
            let error = self::text(r, 3)?.map(&mut push);
            let (lat, lon): (Option<f64>, Option<f64>) = (r.get(4)?, r.get(5)?);
            self.rows.push(ChunkRow {
                row_number: r.get(0)?,
                fields,
                error,
                invalid: status(self::text(r, 2)?)? == RowStatus::Invalid,
                coordinate: lat.zip(lon).map(|(lat, lon)| (lat + 0.0, lon + 0.0)),
            });
        }
        Ok(true)
    }
}

/// The answers of a chunk's coordinates.
struct ChunkAnswers {
    own: Distinct<{ OWN.len() }>,
    areas: Distinct<AREAS>,
    /// (own, areas, distance in metres or NaN) of each coordinate found.
    answers: Vec<(u32, u32, f64)>,
    /// Each row's answer, an index in `answers` ([`u32::MAX`]: none).
    answer_of: Vec<u32>,
}

impl ChunkAnswers {
    /// Looks the chunk's distinct coordinates up with `probe` (`$1` import,
    /// `$2` lat, `$3` lon → `distance_m, <PACKED>`), in key order.
    fn look_up(chunk: &Chunk, probe: &mut rusqlite::Statement<'_>, import_id: i64) -> anyhow::Result<Self> {
        let coordinate = |i: &u32| chunk.rows[*i as usize].coordinate.expect("filtered");
        let mut order: Vec<u32> = (0..chunk.rows.len() as u32)
            .filter(|&i| chunk.rows[i as usize].coordinate.is_some())
            .collect();
        order.sort_unstable_by(|a, b| {
            let ((la, oa), (lb, ob)) = (coordinate(a), coordinate(b));
            la.total_cmp(&lb).then(oa.total_cmp(&ob))
        });
        let mut out = ChunkAnswers {
            own: Distinct(IndexSet::default()),
            areas: Distinct(IndexSet::default()),
            answers: Vec::new(),
            answer_of: vec![u32::MAX; chunk.rows.len()],
        };
        let mut text = String::new();
        for run in order.chunk_by(|a, b| coordinate(a) == coordinate(b)) {
            let (lat, lon) = coordinate(&run[0]);
            let mut found = probe.query(rusqlite::params![import_id, lat, lon])?;
            let Some(r) = found.next()? else {
                continue; // not planned yet: pending
            };
            // No budget here: a chunk's memory is bounded by its rows.
            let p = pack(r, OWN.iter().map(|c| 1 + c), &mut text)?;
            let o = out.own.index(&text, p, &mut 0, usize::MAX).unwrap_or_default();
            let p = pack(r, (OWN[3] + 1..PACKED - 1).map(|c| 1 + c), &mut text)?;
            let a = out.areas.index(&text, p, &mut 0, usize::MAX).unwrap_or_default();
            let distance: Option<f64> = r.get(0)?;
            out.answers.push((o, a, distance.unwrap_or(f64::NAN)));
            let index = out.answers.len() as u32 - 1;
            for i in run {
                out.answer_of[*i as usize] = index;
            }
        }
        Ok(out)
    }

    /// The answer and distance (NaN for none) of row `i` of the chunk.
    fn get(&self, i: usize) -> Option<(Answer<'_>, f64)> {
        let &(own, areas, d) = self.answers.get(self.answer_of[i] as usize)?;
        let answer = Answer {
            own: &self.own.0[own as usize],
            areas: &self.areas.0[areas as usize],
        };
        Some((answer, d))
    }
}

/// [`results`] for lookups too many to hold: the points are read in row
/// order a chunk at a time (`chunk_rows`, [`CHUNK_ROWS`] in [`results`], and at
/// most [`CHUNK_TEXT_BYTES`] of fields), the chunk's distinct coordinates
/// are looked up in (latitude, longitude) order, the lookups' key order, and
/// the chunk's rows are emitted in row order. The view's plan probes once a
/// row in row order, which is random in the key: at 10M rows most probes
/// missed SQLite's page cache, a `pread` each (39 s, 17 of them in the
/// kernel; 29 s and 4 this way). Memory: one chunk.
pub fn results_in_chunks(
    path: &Path,
    import_id: i64,
    chunk_rows: usize,
    mut emit: impl FnMut(&ResultRef<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    const POINTS: &str = "SELECT row_number, fields, status, error, lat, lon FROM points WHERE import_id = ?1 ORDER BY row_number";
    let probe_sql = format!(
        "SELECT distance_m, {} FROM lookups WHERE import_id = ?1 AND lat = ?2 AND lon = ?3",
        *columns::PACKED
    );
    let conn = open(path)?;
    let mut points = conn.prepare(POINTS)?;
    let mut probe = conn.prepare(&probe_sql)?;
    let mut rows = points.query([import_id])?;
    let mut chunk = Chunk::default();
    let mut more = true;
    while more {
        more = chunk.fill(&mut rows, chunk_rows)?;
        let answers = ChunkAnswers::look_up(&chunk, &mut probe, import_id)?;
        for (i, row) in chunk.rows.iter().enumerate() {
            let fields = &chunk.text[row.fields.clone()];
            let error = row.error.clone().map(|e| &chunk.text[e]);
            let found = answers.get(i);
            let result = result_row(row.row_number, fields, row.invalid, error, found.as_ref())?;
            if !emit(&result)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// [`results`] through the `point_results` view: one primary-key probe a
/// row, in row order, no memory beyond SQLite's cache. The reference the
/// faster paths are tested against.
pub fn results_by_view(
    conn: &Connection,
    import_id: i64,
    mut emit: impl FnMut(&ResultRef<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut stmt = conn.prepare(&columns::select_results("?1", "ORDER BY row_number"))?;
    let mut rows = stmt.query([import_id])?;
    while let Some(r) = rows.next()? {
        let mut area = [None; Area::COLUMNS.len()];
        for (i, v) in area.iter_mut().enumerate() {
            *v = text(r, 5 + i)?;
        }
        let row = ResultRef {
            row_number: r.get(0)?,
            fields: text(r, 1)?.unwrap_or(""),
            status: status(text(r, 2)?)?,
            postcode: text(r, 3)?,
            distance_m: r.get(4)?,
            area,
            error: text(r, 5 + Area::COLUMNS.len())?,
        };
        if !emit(&row)? {
            break;
        }
    }
    Ok(())
}
