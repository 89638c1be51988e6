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
    let (lat, lon) = (import.lat_index.unwrap_or(0) as usize, import.lon_index.unwrap_or(1) as usize);
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
        use std::fmt::Write as _;
        let b = &mut self.buf;
        b.clear();
        b.push_str(&r.fields);
        let _ = write!(b, ",{},{},", r.row_number, r.status);
        push_csv_field(b, r.postcode.as_deref().unwrap_or(""));
        b.push(',');
        if let Some(d) = r.distance_m {
            let _ = write!(b, "{d:.1}");
        }
        for v in [
            &r.outcode, &r.incode, &r.country, &r.region, &r.admin_district, &r.admin_county, &r.admin_ward, &r.parish,
            &r.parliamentary_constituency, &r.lsoa, &r.msoa, &r.error,
        ] {
            b.push(',');
            push_csv_field(b, v.as_deref().unwrap_or(""));
        }
        b.push('\n');
        b.as_bytes()
    }
}

/// Writes the import's enriched CSV to `out`; returns the number of data rows.
pub async fn write_csv(store: &Store, import: &ImportRecord, out: &mut impl Write) -> anyhow::Result<u64> {
    let mut enc = LineEncoder::default();
    out.write_all(&enc.header(import))?;
    let n = store
        .for_each_result(import.id, |row| {
            out.write_all(enc.row(&row))?;
            Ok(())
        })
        .await?;
    out.flush()?;
    Ok(n)
}
