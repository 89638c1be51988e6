//! The SQLite store's read of the output: every row of an import in row order
//! with its coordinate's lookup, as the `point_results` view defines it.
//!
//! The view's plan probes the lookups' primary key once a row: about 4 µs a row
//! at 1M rows (B-tree descent and record decoding in SQLite), most of an
//! end-to-end run. When the import's lookups fit
//! [`JOIN_BUDGET_BYTES`], they are instead read once in key order into a hash
//! table, answers packed and shared between the coordinates that have the same
//! one (a postcode's area data is the same for all its coordinates), and the
//! points are scanned in row order against it. Two threads read the two
//! halves of the lookups (split at the median latitude). Larger imports, whose table
//! would not fit, keep the view's plan, so memory stays flat at any size.
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
/// peak RSS of `local` (about 247 MiB, the enrichers' postcode index).
pub const JOIN_BUDGET_BYTES: usize = 160 << 20;

/// The packed columns of an answer: status, postcode, [`Area::COLUMNS`], error.
const PACKED: usize = 2 + Area::COLUMNS.len() + 1;
const _: () = assert!(PACKED <= 32, "a bit of `nulls` per packed column");

/// An answer's text columns in one allocation: `ends[i]` is where column i ends
/// in `text`; bit i of `nulls` marks a NULL.
#[derive(PartialEq, Eq)]
struct Answer {
    text: Box<str>,
    ends: [u16; PACKED],
    nulls: u32,
}

/// An answer being read, before it is known to be new.
struct AnswerRef<'a> {
    text: &'a str,
    ends: [u16; PACKED],
    nulls: u32,
}

impl Hash for Answer {
    fn hash<H: Hasher>(&self, h: &mut H) {
        AnswerRef {
            text: &self.text,
            ends: self.ends,
            nulls: self.nulls,
        }
        .hash(h)
    }
}

impl Hash for AnswerRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.text.hash(h);
        self.ends.hash(h);
        self.nulls.hash(h);
    }
}

impl Equivalent<Answer> for AnswerRef<'_> {
    fn equivalent(&self, a: &Answer) -> bool {
        self.text == &*a.text && self.ends == a.ends && self.nulls == a.nulls
    }
}

impl Answer {
    fn column(&self, i: usize) -> Option<&str> {
        if self.nulls & (1 << i) != 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.text[start..self.ends[i] as usize])
    }
}

/// A coordinate as the join key: the bit patterns, with −0.0 made +0.0 (SQL
/// compares them equal).
fn key(lat: f64, lon: f64) -> (u64, u64) {
    ((lat + 0.0).to_bits(), (lon + 0.0).to_bits())
}

/// Lookups in memory: coordinate → (answer, distance in metres, NaN for none).
struct Half {
    coordinates: HashMap<(u64, u64), (u32, f64), RandomState>,
    answers: IndexSet<Answer, RandomState>,
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
    fn get(&self, lat: f64, lon: f64) -> Option<(&Answer, f64)> {
        let half = &self.halves[usize::from(lat >= self.split)];
        half.coordinates
            .get(&key(lat, lon))
            .map(|&(i, d)| (&half.answers[i as usize], d))
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
        let mut answers: IndexSet<Answer, RandomState> = IndexSet::default();
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(rusqlite::params![import_id, split])?;
        let mut text = String::new();
        while let Some(r) = rows.next()? {
            let (lat, lon): (f64, f64) = (r.get(0)?, r.get(1)?);
            let distance: Option<f64> = r.get(2)?;
            text.clear();
            let (mut ends, mut nulls) = ([0u16; PACKED], 0u32);
            for (i, end) in ends.iter_mut().enumerate() {
                match r.get_ref(3 + i)? {
                    ValueRef::Null => nulls |= 1 << i,
                    v => text.push_str(v.as_str()?),
                }
                let Ok(at) = u16::try_from(text.len()) else {
                    return Ok(None); // an answer over 64 KiB (a long error): leave it to SQL
                };
                *end = at;
            }
            let found = AnswerRef {
                text: &text,
                ends,
                nulls,
            };
            let index = match answers.get_index_of(&found) {
                Some(i) => i,
                None => {
                    // The text, the entry (answer and hash) and its index slot,
                    // twice for the growth of both tables.
                    bytes += text.len() + 2 * (std::mem::size_of::<Answer>() + 8 + 8);
                    if bytes > budget {
                        return Ok(None);
                    }
                    answers
                        .insert_full(Answer {
                            text: text.as_str().into(),
                            ends,
                            nulls,
                        })
                        .0
                }
            };
            coordinates.insert(key(lat, lon), (index as u32, distance.unwrap_or(f64::NAN)));
        }
        Ok(Some(Half { coordinates, answers }))
    }
}

/// Column `i` of a row as text (`None` for NULL).
fn text<'a>(r: &'a rusqlite::Row<'_>, i: usize) -> anyhow::Result<Option<&'a str>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Null => None,
        v => Some(v.as_str()?),
    })
}

/// A stored status (`None`, a row without a lookup, is pending).
fn status(text: Option<&str>) -> anyhow::Result<RowStatus> {
    Ok(text.map(str::parse).transpose()?.unwrap_or(RowStatus::Pending))
}

/// Calls `emit` with every row of the import in row order, until it returns
/// `false`; joins in memory within `budget` bytes, else with the view's plan.
/// Errors: the database's.
pub fn results(
    path: &Path,
    import_id: i64,
    budget: usize,
    mut emit: impl FnMut(&ResultRef<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let Some(lookups) = Lookups::read(path, import_id, budget)? else {
        tracing::debug!(budget, "lookups exceed the join budget: joining through the view");
        return results_by_view(&open(path)?, import_id, emit);
    };
    let conn = open_for_scan(path)?;
    let [below, rest] = &lookups.halves;
    tracing::debug!(
        coordinates = below.coordinates.len() + rest.coordinates.len(),
        answers = below.answers.len() + rest.answers.len(),
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
        let column = |i: usize| found.and_then(|(a, _)| a.column(i));
        let point_status = status(text(r, 2)?)?;
        let mut area = [None; Area::COLUMNS.len()];
        for (i, v) in area.iter_mut().enumerate() {
            *v = column(2 + i);
        }
        let row = ResultRef {
            row_number: r.get(0)?,
            fields: text(r, 1)?.unwrap_or(""),
            status: match point_status {
                RowStatus::Invalid => RowStatus::Invalid,
                _ => status(column(0))?,
            },
            postcode: column(1),
            distance_m: found.map(|(_, d)| d).filter(|d| !d.is_nan()),
            area,
            error: text(r, 3)?.or(column(PACKED - 1)),
        };
        if !emit(&row)? {
            break;
        }
    }
    Ok(())
}

/// [`results`] through the `point_results` view: one primary-key probe a row, no memory beyond SQLite's cache.
fn results_by_view(
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
