//! The enriched CSV: the user's columns, `extra_fields`, then `row_number`,
//! `status`, `postcode`, `distance_m`, the area columns and `error` (DESIGN.md
//! "Interfaces"), written from the rows the store reads. Every line has the
//! header's width: the reader stores each row's user fields padded or cut to
//! the header's width, the surplus in `extra_fields`
//! ([`crate::csv_input::RowReader::next_row`]).

use std::io::Write;

use crate::{
    csv_input::push_csv_field,
    lookup::Area,
    model::RowStatus,
    store::{ImportRecord, ResultBatch, ResultRef, ResultRow, Store},
};

/// The column after the user's that holds a row's fields beyond the header's
/// width, joined with the input's delimiter; empty for the other rows.
pub const EXTRA_FIELDS: &str = "extra_fields";

/// The columns the product appends to the user's (and to [`EXTRA_FIELDS`]).
pub fn result_columns() -> Vec<&'static str> {
    let mut c = vec!["row_number", "status", "postcode", "distance_m"];
    c.extend(Area::COLUMNS);
    c.push("error");
    c
}

/// The user's column names: the header, or `lat`, `lon`, `column_N` for a headerless file.
pub fn user_columns(import: &ImportRecord) -> Vec<String> {
    if let Some(h) = &import.header {
        return h.clone();
    }
    let width = import.width.unwrap_or(2).max(2) as usize; // the reader's `Layout::width`
    let (lat, lon) = (
        import.lat_index.unwrap_or(0) as usize,
        import.lon_index.unwrap_or(1) as usize,
    );
    (0..width)
        .map(|i| match i {
            _ if i == lat => "lat".to_string(),
            _ if i == lon => "lon".to_string(),
            _ => format!("column_{}", i + 1),
        })
        .collect()
}

/// Encodes the enriched CSV's lines.
#[derive(Default)]
pub struct LineEncoder {
    buf: String,
}

impl LineEncoder {
    /// The header line (with `\n`).
    pub fn header(&mut self, import: &ImportRecord) -> Vec<u8> {
        let mut cols = user_columns(import);
        cols.push(EXTRA_FIELDS.to_string());
        cols.extend(result_columns().into_iter().map(str::to_string));
        self.buf.clear();
        for (i, c) in cols.iter().enumerate() {
            if i > 0 {
                self.buf.push(',');
            }
            push_csv_field(&mut self.buf, c);
        }
        self.buf.push('\n');
        self.buf.as_bytes().to_vec()
    }

    /// One result line (with `\n`): the stored user fields (with `extra_fields`), then the product's columns.
    pub fn row(&mut self, r: &ResultRow) -> &[u8] {
        self.buf.clear();
        push_line(&mut self.buf, &ResultRef::from(r));
        self.buf.as_bytes()
    }
}

/// Appends one result line (with `\n`) to `b`: the stored user fields, then the
/// product's columns, the distance to 0.1 m.
pub fn push_line(b: &mut String, r: &ResultRef<'_>) {
    use std::fmt::Write as _;
    b.push_str(r.fields);
    let _ = write!(b, ",{},{},", r.row_number, r.status);
    push_csv_field(b, r.postcode.unwrap_or(""));
    b.push(',');
    if let Some(d) = r.distance_m {
        let _ = write!(b, "{d:.1}");
    }
    for v in r.area.iter().chain([&r.error]) {
        b.push(',');
        push_csv_field(b, v.unwrap_or(""));
    }
    b.push('\n');
}

/// Rows written by [`write_csv`], by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub rows: u64,
    pub enriched: u64,
    pub no_match: u64,
    pub invalid: u64,
    pub failed: u64,
    pub pending: u64,
}

impl Tally {
    fn add(&mut self, status: RowStatus) {
        self.rows += 1;
        match status {
            RowStatus::Enriched => self.enriched += 1,
            RowStatus::NoMatch => self.no_match += 1,
            RowStatus::Invalid => self.invalid += 1,
            RowStatus::Failed => self.failed += 1,
            RowStatus::Pending => self.pending += 1,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.rows += other.rows;
        self.enriched += other.enriched;
        self.no_match += other.no_match;
        self.invalid += other.invalid;
        self.failed += other.failed;
        self.pending += other.pending;
    }
}

/// Bytes of CSV a [`Chunk`] gathers before it is written.
const CHUNK_BYTES: usize = 1 << 20;

/// Lines of the enriched CSV encoded where the rows are read, and their tally.
struct Chunk {
    text: String,
    tally: Tally,
}

impl ResultBatch for Chunk {
    fn empty() -> Self {
        Chunk {
            text: String::with_capacity(CHUNK_BYTES + 4096),
            tally: Tally::default(),
        }
    }

    fn push(&mut self, row: &ResultRef<'_>) -> bool {
        push_line(&mut self.text, row);
        self.tally.add(row.status);
        self.text.len() >= CHUNK_BYTES
    }
}

/// Writes the import's enriched CSV to `out`; returns its data rows by status.
/// The lines are encoded in chunks as the store reads the rows (on SQLite, on
/// the reading thread) while this task writes them.
pub async fn write_csv(store: &Store, import: &ImportRecord, out: &mut impl Write) -> anyhow::Result<Tally> {
    out.write_all(&LineEncoder::default().header(import))?;
    let mut tally = Tally::default();
    store
        .results_in_batches(import.id, |chunk: Chunk| {
            out.write_all(chunk.text.as_bytes())?;
            tally.merge(&chunk.tally);
            Ok(())
        })
        .await?;
    out.flush()?;
    Ok(tally)
}
