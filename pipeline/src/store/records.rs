//! What the store reads and writes: the import record, claimed work and its
//! results, counts, and the rows of the enriched output ([`ResultRow`] owned,
//! [`ResultRef`] borrowed, gathered in [`ResultBatch`]es).

use sqlx::Postgres;

use crate::{
    csv_input::Layout,
    lookup::{Area, Match},
    model::{ImportPhase, RowStatus, Stage},
};

/// An import as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportRecord {
    pub id: i64,
    pub uid: String,
    pub name: String,
    pub source: String,
    pub source_sha256: Option<String>,
    pub shards: i32,
    pub phase: ImportPhase,
    /// The user's column names (JSON in the table), `None` when headerless.
    pub header: Option<Vec<String>>,
    pub width: Option<i32>,
    pub lat_index: Option<i32>,
    pub lon_index: Option<i32>,
    pub rows_total: i64,
    pub rows_invalid: i64,
    pub error: Option<String>,
    /// What the reader had to repair, one warning a line ([`LoadEnd`]).
    pub warnings: Option<String>,
}

impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for ImportRecord
where
    &'r str: sqlx::ColumnIndex<R>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(r: &'r R) -> sqlx::Result<Self> {
        let header: Option<String> = r.try_get("header")?;
        let phase: String = r.try_get("phase")?;
        let decode = |column: &str, e: Box<dyn std::error::Error + Send + Sync>| sqlx::Error::ColumnDecode {
            index: column.into(),
            source: e,
        };
        Ok(ImportRecord {
            id: r.try_get("id")?,
            uid: r.try_get("uid")?,
            name: r.try_get("name")?,
            source: r.try_get("source")?,
            source_sha256: r.try_get("source_sha256")?,
            shards: r.try_get("shards")?,
            phase: phase.parse().map_err(|e| decode("phase", Box::new(e)))?,
            header: header
                .map(|h| serde_json::from_str(&h))
                .transpose()
                .map_err(|e| decode("header", Box::new(e)))?,
            width: r.try_get("width")?,
            lat_index: r.try_get("lat_index")?,
            lon_index: r.try_get("lon_index")?,
            rows_total: r.try_get("rows_total")?,
            rows_invalid: r.try_get("rows_invalid")?,
            error: r.try_get("error")?,
            warnings: r.try_get("warnings")?,
        })
    }
}

/// What a load writes to the import's row before its rows: the CSV layout.
#[derive(Debug, Clone)]
pub(crate) struct LoadStart {
    pub id: i64,
    pub shards: u32,
    pub delimiter: String,
    /// JSON array of the user's column names.
    pub header: Option<String>,
    pub width: i32,
    pub lat_index: i32,
    pub lon_index: i32,
}

impl LoadStart {
    pub fn of(import: &ImportRecord, layout: &Layout, width: usize) -> anyhow::Result<Self> {
        Ok(LoadStart {
            id: import.id,
            shards: u32::try_from(import.shards.max(1)).unwrap_or(1),
            delimiter: (layout.delimiter as char).to_string(),
            header: layout.header.as_ref().map(serde_json::to_string).transpose()?,
            width: width as i32,
            lat_index: layout.lat_index as i32,
            lon_index: layout.lon_index as i32,
        })
    }
}

/// Rows written by a load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadCounts {
    pub rows: i64,
    pub invalid: i64,
}

/// What the reader knows once the whole input is read: the source's SHA-256
/// (hex) and what it had to repair, one warning a line (`None` when nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadEnd {
    pub sha256: String,
    pub warnings: Option<String>,
}

/// A coordinate claimed for enrichment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claimed {
    pub lat: f64,
    pub lon: f64,
    pub stage: Stage,
    pub attempts: i32,
}

impl Claimed {
    /// From a `(lat, lon, stage, attempts)` row of `lookups`.
    pub(crate) fn from_row((lat, lon, stage, attempts): (f64, f64, i16, i32)) -> anyhow::Result<Self> {
        Ok(Claimed {
            lat,
            lon,
            stage: Stage::try_from(stage)?,
            attempts,
        })
    }
}

/// A batch of claimed coordinates; on PostgreSQL the claim holds the rows locked
/// (`FOR UPDATE SKIP LOCKED`) until [`super::Store::save`] commits or the claim is dropped.
pub struct Claim {
    pub(crate) tx: Option<sqlx::Transaction<'static, Postgres>>,
    pub(crate) import_id: i64,
    pub items: Vec<Claimed>,
}

/// What became of one claimed coordinate.
// `Enriched` is the usual outcome, not the rare one: boxing it would add an
// allocation to nearly every result and save no memory.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Enriched(Match),
    /// Nothing in range at this stage; try the next stage later.
    NextStage(Stage),
    NoMatch,
    /// Not answered this time (e.g. missing from a response); stays pending.
    Retry(String),
    Failed(String),
}

/// The result of one claimed coordinate; `attempts` is the total requests made for it so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub lat: f64,
    pub lon: f64,
    pub attempts: i32,
    pub outcome: Outcome,
}

/// The lookup columns a [`Saved`] result writes ([`super::columns::ANSWER`]
/// and the stage, which only moves forward).
pub(crate) struct AnswerColumns<'a> {
    pub status: RowStatus,
    pub stage: Option<Stage>,
    pub m: Option<&'a Match>,
    pub error: Option<&'a str>,
}

impl<'a> AnswerColumns<'a> {
    pub fn of(s: &'a Saved) -> Self {
        let (status, stage, m, error) = match &s.outcome {
            Outcome::Enriched(m) => (RowStatus::Enriched, None, Some(m), None),
            Outcome::NextStage(st) => (RowStatus::Pending, Some(*st), None, None),
            Outcome::NoMatch => (RowStatus::NoMatch, None, None, None),
            Outcome::Retry(e) => (RowStatus::Pending, None, None, Some(e.as_str())),
            Outcome::Failed(e) => (RowStatus::Failed, None, None, Some(e.as_str())),
        };
        AnswerColumns {
            status,
            stage,
            m,
            error,
        }
    }

    pub fn stage(&self) -> Option<i16> {
        self.stage.map(Stage::as_i16)
    }

    pub fn postcode(&self) -> Option<&'a str> {
        self.m.map(|m| m.postcode.as_str())
    }

    pub fn distance_m(&self) -> Option<f64> {
        self.m.map(|m| m.distance_m)
    }

    pub fn raw(&self) -> Option<&'a str> {
        self.m.and_then(|m| m.raw.as_deref())
    }

    /// Area column `i` of [`Area::COLUMNS`].
    pub fn area(&self, i: usize) -> Option<&'a str> {
        self.m.and_then(|m| m.area.values()[i].as_deref())
    }
}

/// Row and coordinate counts by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub rows_total: i64,
    pub rows_invalid: i64,
    pub rows_pending: i64,
    pub rows_enriched: i64,
    pub rows_no_match: i64,
    pub rows_failed: i64,
    pub coordinates_total: i64,
    pub coordinates_done: i64,
}

impl Counts {
    /// The counts from the import's row totals and its lookups' `(status,
    /// coordinates, rows)` groups. Rows of shards not planned yet have no lookup:
    /// they count as pending too.
    pub(crate) fn of(
        (total, invalid): (i64, i64),
        groups: impl IntoIterator<Item = (String, i64, i64)>,
    ) -> anyhow::Result<Self> {
        let mut c = Counts {
            rows_total: total,
            rows_invalid: invalid,
            ..Counts::default()
        };
        for (status, coords, rows) in groups {
            let status: RowStatus = status.parse()?;
            c.coordinates_total += coords;
            match status {
                RowStatus::Pending => {}
                RowStatus::Enriched => c.rows_enriched += rows,
                RowStatus::NoMatch => c.rows_no_match += rows,
                RowStatus::Failed | RowStatus::Invalid => c.rows_failed += rows,
            }
            if status.is_finished() {
                c.coordinates_done += coords;
            }
        }
        c.rows_pending = (total - invalid - c.rows_enriched - c.rows_no_match - c.rows_failed).max(0);
        Ok(c)
    }

    /// The row counts, one per status.
    pub fn rows_by_status(&self) -> [(RowStatus, i64); 5] {
        [
            (RowStatus::Enriched, self.rows_enriched),
            (RowStatus::NoMatch, self.rows_no_match),
            (RowStatus::Invalid, self.rows_invalid),
            (RowStatus::Failed, self.rows_failed),
            (RowStatus::Pending, self.rows_pending),
        ]
    }
}

/// Progress of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardCounts {
    pub shard: i32,
    pub rows: i64,
    pub done: i64,
    pub failed: i64,
}

impl From<(i32, i64, i64, i64)> for ShardCounts {
    fn from((shard, rows, done, failed): (i32, i64, i64, i64)) -> Self {
        ShardCounts {
            shard,
            rows,
            done,
            failed,
        }
    }
}

/// A tally that differs from a recount of the lookups
/// ([`super::Store::tally_mismatches`]): `(coordinates, rows)` each way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TallyMismatch {
    pub shard: i32,
    pub status: String,
    pub tallied: (i64, i64),
    pub counted: (i64, i64),
}

/// The import's request counters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QuotaCounters {
    pub requests: i64,
    pub retries: i64,
    pub throttled: i64,
    /// The rate the import's last request slot was spaced at (requests/second):
    /// its quota, or less while it shares its API's quota with other imports
    /// ([`crate::quota::share_rps`]); `None` before its first request.
    pub share_rps: Option<f64>,
}

/// The lookups of one planned shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardPlan {
    /// Distinct coordinates (lookups) in the shard.
    pub coordinates: i64,
    /// Valid rows in the shard.
    pub rows: i64,
}

/// One row of the enriched output, as read from `point_results`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub row_number: i64,
    /// The user's fields as stored: CSV-encoded, comma-separated.
    pub fields: String,
    pub status: RowStatus,
    pub postcode: Option<String>,
    /// Metres.
    pub distance_m: Option<f64>,
    pub area: Area,
    pub error: Option<String>,
}

/// Reads the columns of `columns::RESULT` (those of `point_results`), in that order.
impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for ResultRow
where
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(r: &'r R) -> sqlx::Result<Self> {
        const AREA: usize = 5;
        let status: String = r.try_get(2)?;
        Ok(ResultRow {
            row_number: r.try_get(0)?,
            fields: r.try_get(1)?,
            status: status.parse().map_err(|e| sqlx::Error::ColumnDecode {
                index: "status".into(),
                source: Box::new(e),
            })?,
            postcode: r.try_get(3)?,
            distance_m: r.try_get(4)?,
            area: Area::from_values(try_array(|i| r.try_get(AREA + i))?),
            error: r.try_get(AREA + Area::COLUMNS.len())?,
        })
    }
}

/// An array of `N` values from a fallible function of the index.
fn try_array<T, E, const N: usize>(mut f: impl FnMut(usize) -> Result<T, E>) -> Result<[T; N], E> {
    let mut error = None;
    let values = std::array::from_fn(|i| match f(i) {
        Ok(v) => Some(v),
        Err(e) => {
            error.get_or_insert(e);
            None
        }
    });
    match error {
        Some(e) => Err(e),
        None => Ok(values.map(|v| v.expect("every value read"))),
    }
}

/// One row of the enriched output, borrowed from wherever it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRef<'a> {
    pub row_number: i64,
    /// The user's fields as stored: CSV-encoded, comma-separated.
    pub fields: &'a str,
    pub status: RowStatus,
    pub postcode: Option<&'a str>,
    /// Metres.
    pub distance_m: Option<f64>,
    /// In [`Area::COLUMNS`] order.
    pub area: [Option<&'a str>; Area::COLUMNS.len()],
    pub error: Option<&'a str>,
}

impl<'a> From<&'a ResultRow> for ResultRef<'a> {
    fn from(r: &'a ResultRow) -> Self {
        ResultRef {
            row_number: r.row_number,
            fields: &r.fields,
            status: r.status,
            postcode: r.postcode.as_deref(),
            distance_m: r.distance_m,
            area: r.area.values().map(Option::as_deref),
            error: r.error.as_deref(),
        }
    }
}

impl From<&ResultRef<'_>> for ResultRow {
    fn from(r: &ResultRef<'_>) -> Self {
        let owned = |v: Option<&str>| v.map(str::to_string);
        ResultRow {
            row_number: r.row_number,
            fields: r.fields.to_string(),
            status: r.status,
            postcode: owned(r.postcode),
            distance_m: r.distance_m,
            area: Area::from_values(r.area.map(owned)),
            error: owned(r.error),
        }
    }
}

/// Rows of the output gathered where they are read and handed on whole (see
/// [`super::Store::results_in_batches`]): a page of rows, a chunk of CSV text.
pub trait ResultBatch: Send + 'static {
    /// A new, empty batch.
    fn empty() -> Self;
    /// Adds a row; `true` when the batch is full and is to be handed on.
    fn push(&mut self, row: &ResultRef<'_>) -> bool;
}

/// Rows a page of [`ResultRow`]s holds.
const PAGE_ROWS: usize = 4096;

impl ResultBatch for Vec<ResultRow> {
    fn empty() -> Self {
        Vec::with_capacity(PAGE_ROWS)
    }

    fn push(&mut self, row: &ResultRef<'_>) -> bool {
        Vec::push(self, ResultRow::from(row));
        self.len() >= PAGE_ROWS
    }
}
