//! The SQLite store's read of the output: every row of an import in row order
//! with its coordinate's lookup, as the `point_results` view defines it.
//!
//! The view's plan probes the lookups' primary key once a row: about 4 µs a row
//! at 1M rows (B-tree descent and record decoding in SQLite), most of an
//! end-to-end run. When the import's lookups fit
//! [`JOIN_BUDGET_BYTES`], they are instead read once in key order into a hash
//! table (`store/joined.rs`, shared with PostgreSQL's export), and the points
//! are scanned in row order against it. Two threads read the two
//! halves of the lookups (split at the median latitude). Larger imports, whose table
//! would not fit, are joined a chunk of rows at a time, each chunk's
//! coordinates looked up in key order ([`results_in_chunks`]), so memory
//! stays flat at any size.
//!
//! The in-memory path reads on several connections, not one snapshot: export
//! after the enrichers end (as `local` does), or rows may mix two moments.

use std::path::Path;

use rusqlite::{types::ValueRef, Connection, OptionalExtension};

use super::bulk::open;
use crate::{
    lookup::Area,
    model::RowStatus,
    store::{
        columns,
        joined::{coordinate_table_bytes, result_row, status, Answer, Answers, ListedAnswers},
        records::ResultRef,
    },
};

pub use crate::store::joined::JOIN_BUDGET_BYTES;

/// Half of the lookups, by latitude.
type Half = Answers;

/// The import's lookups in memory, in two halves by latitude (below `split`,
/// and the rest), read by two threads at once.
struct Lookups {
    split: f64,
    halves: [Half; 2],
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
        if coordinate_table_bytes(n as usize / 2 + 1) > budget / 2 {
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
            let below = s.spawn(|| read_half(path, import_id, "lat < ?2", split, budget / 2));
            let rest = read_half(path, import_id, "lat >= ?2", split, budget / 2);
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
        self.halves[usize::from(lat >= self.split)].get(lat, lon)
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

/// The lookups whose latitude meets `condition` against `split`, or `None`
/// when they would take more than `budget` bytes.
fn read_half(
    path: &Path,
    import_id: i64,
    condition: &str,
    split: f64,
    budget: usize,
) -> anyhow::Result<Option<Half>> {
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
    let Some(mut half) = Answers::with_capacity(n as usize, budget) else {
        return Ok(None);
    };
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params![import_id, split])?;
    while let Some(r) = rows.next()? {
        let coordinate: (f64, f64) = (r.get(0)?, r.get(1)?);
        if !half.insert(coordinate, r.get(2)?, |c| text(r, 3 + c))? {
            return Ok(None);
        }
    }
    Ok(Some(half))
}

/// Column `i` of a row as text (`None` for NULL).
fn text<'a>(r: &'a rusqlite::Row<'_>, i: usize) -> anyhow::Result<Option<&'a str>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Null => None,
        v => Some(v.as_str()?),
    })
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
    let ((c0, o0, a0), (c1, o1, a1)) = (lookups.halves[0].sizes(), lookups.halves[1].sizes());
    tracing::debug!(
        coordinates = c0 + c1,
        answers = o0 + o1,
        areas = a0 + a1,
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
    answers: ListedAnswers,
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
            answers: ListedAnswers::default(),
            answer_of: vec![u32::MAX; chunk.rows.len()],
        };
        for run in order.chunk_by(|a, b| coordinate(a) == coordinate(b)) {
            let (lat, lon) = coordinate(&run[0]);
            let mut found = probe.query(rusqlite::params![import_id, lat, lon])?;
            let Some(r) = found.next()? else {
                continue; // not planned yet: pending
            };
            let index = out.answers.push(r.get(0)?, |c| text(r, 1 + c))?;
            for i in run {
                out.answer_of[*i as usize] = index;
            }
        }
        Ok(out)
    }

    /// The answer and distance (NaN for none) of row `i` of the chunk.
    fn get(&self, i: usize) -> Option<(Answer<'_>, f64)> {
        self.answers.get(self.answer_of[i])
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
