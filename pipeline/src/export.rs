//! The enriched CSV: the user's columns, then `row_number`, `status`,
//! `postcode`, `distance_m`, the area columns and `error` (DESIGN.md "Interfaces").

use std::io::Write;

use crate::{
    csv_input::push_csv_field,
    db::{ImportRecord, ResultRow, Store},
    lookup::Area,
};

/// The columns the product appends to the user's.
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
    let width = import.width.unwrap_or(2).max(2) as usize;
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

    /// One result line (with `\n`): the stored user fields, then the product's columns.
    pub fn row(&mut self, r: &ResultRow) -> &[u8] {
        self.buf.clear();
        push_line(&mut self.buf, &RowRef::from(r));
        self.buf.as_bytes()
    }
}

/// One row of the export, borrowed from wherever it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct RowRef<'a> {
    pub row_number: i64,
    /// The user's fields as stored: CSV-encoded, comma-separated.
    pub fields: &'a str,
    pub status: &'a str,
    pub postcode: Option<&'a str>,
    /// Metres.
    pub distance_m: Option<f64>,
    /// In [`Area::COLUMNS`] order.
    pub area: [Option<&'a str>; 11],
    pub error: Option<&'a str>,
}

impl<'a> From<&'a ResultRow> for RowRef<'a> {
    fn from(r: &'a ResultRow) -> Self {
        RowRef {
            row_number: r.row_number,
            fields: &r.fields,
            status: &r.status,
            postcode: r.postcode.as_deref(),
            distance_m: r.distance_m,
            area: [
                &r.outcode,
                &r.incode,
                &r.country,
                &r.region,
                &r.admin_district,
                &r.admin_county,
                &r.admin_ward,
                &r.parish,
                &r.parliamentary_constituency,
                &r.lsoa,
                &r.msoa,
            ]
            .map(|v| v.as_deref()),
            error: r.error.as_deref(),
        }
    }
}

impl From<&RowRef<'_>> for ResultRow {
    fn from(r: &RowRef<'_>) -> Self {
        let s = |v: Option<&str>| v.map(str::to_string);
        let [outcode, incode, country, region, admin_district, admin_county, admin_ward, parish, parliamentary_constituency, lsoa, msoa] =
            r.area.map(s);
        ResultRow {
            row_number: r.row_number,
            fields: r.fields.to_string(),
            status: r.status.to_string(),
            postcode: s(r.postcode),
            distance_m: r.distance_m,
            outcode,
            incode,
            country,
            region,
            admin_district,
            admin_county,
            admin_ward,
            parish,
            parliamentary_constituency,
            lsoa,
            msoa,
            error: s(r.error),
        }
    }
}

/// Appends one result line (with `\n`) to `b`: the stored user fields, then the
/// product's columns, the distance to 0.1 m.
pub fn push_line(b: &mut String, r: &RowRef<'_>) {
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
    fn add(&mut self, status: &str) {
        self.rows += 1;
        match status {
            "enriched" => self.enriched += 1,
            "no_match" => self.no_match += 1,
            "invalid" => self.invalid += 1,
            "failed" => self.failed += 1,
            _ => self.pending += 1,
        }
    }
}

/// Writes the import's enriched CSV to `out`; returns its data rows by status.
/// On SQLite the rows are read and encoded on a blocking thread
/// ([`crate::sqlite_export::results`]) while this task writes.
pub async fn write_csv(store: &Store, import: &ImportRecord, out: &mut impl Write) -> anyhow::Result<Tally> {
    let mut enc = LineEncoder::default();
    out.write_all(&enc.header(import))?;
    let n = match store {
        Store::Sqlite(pool) => {
            const CHUNK: usize = 1 << 20;
            let (path, import_id) = (crate::sqlite_bulk::path_of(pool), import.id);
            let (tx, mut chunks) = tokio::sync::mpsc::channel::<String>(4);
            let encoder = tokio::task::spawn_blocking(move || {
                let (mut buf, mut n) = (String::with_capacity(CHUNK + 4096), Tally::default());
                crate::sqlite_export::results(
                    &path,
                    import_id,
                    crate::sqlite_export::JOIN_BUDGET_BYTES,
                    |row| {
                        push_line(&mut buf, row);
                        n.add(row.status);
                        Ok(buf.len() < CHUNK
                            || tx
                                .blocking_send(std::mem::replace(
                                    &mut buf,
                                    String::with_capacity(CHUNK + 4096),
                                ))
                                .is_ok())
                    },
                )?;
                if !buf.is_empty() {
                    let _ = tx.blocking_send(buf);
                }
                anyhow::Ok(n)
            });
            while let Some(chunk) = chunks.recv().await {
                out.write_all(chunk.as_bytes())?;
            }
            encoder.await??
        }
        Store::Postgres(_) => {
            let mut n = Tally::default();
            store
                .for_each_result(import.id, |row| {
                    out.write_all(enc.row(&row))?;
                    n.add(&row.status);
                    Ok(())
                })
                .await?;
            n
        }
    };
    out.flush()?;
    Ok(n)
}
