//! [`super::Store::results_in_batches`] on PostgreSQL: the import's rows in
//! row order, read with `COPY (SELECT … FROM point_results …) TO STDOUT` and
//! parsed here.
//!
//! Read as a query, 1M rows took about 10 s, most of it in sqlx decoding 24
//! columns a row (`Row::try_get`, an allocation per text value) while the
//! server's join took 2–4 s; the join itself spilled (a 16-batch hash join and
//! an external sort at the default `work_mem` of 4 MiB). Now the server sends
//! text lines and this parses them in place (borrowing every value that has no
//! escape), and the join runs with [`WORK_MEM`] in a transaction of its own.

use std::borrow::Cow;

use futures::TryStreamExt;
use sqlx::postgres::PgPool;

use super::{
    columns,
    records::{ResultBatch, ResultRef},
};
use crate::{lookup::Area, model::RowStatus};

/// `work_mem` of the export's transaction: the hash of the lookups and the
/// row-order sort in memory (about 85 MiB and 3 × 40 MiB at 1M rows, in the
/// server's processes); larger imports spill, as before, but in fewer batches.
const WORK_MEM: &str = "SET LOCAL work_mem = '96MB'";

/// The columns of [`columns::RESULT`]: row_number, fields, status, postcode, distance_m, the area, error.
const COLUMNS: usize = 5 + Area::COLUMNS.len() + 1;

/// [`super::Store::results_in_batches`] on PostgreSQL.
pub(super) async fn results_in_batches<B: ResultBatch>(
    pool: &PgPool,
    import_id: i64,
    mut sink: impl FnMut(B) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let sql = format!(
        "COPY ({}) TO STDOUT WITH (FORMAT text)",
        columns::select_results(&import_id.to_string(), "ORDER BY row_number")
    );
    let mut tx = pool.begin().await?;
    sqlx::query(WORK_MEM).execute(&mut *tx).await?;
    let (mut batch, mut unsent) = (B::empty(), false);
    {
        let mut stream = tx.copy_out_raw(&sql).await?;
        let mut carry: Vec<u8> = Vec::new();
        while let Some(bytes) = stream.try_next().await? {
            carry.extend_from_slice(&bytes);
            let Some(last) = carry.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            for line in carry[..last].split(|&b| b == b'\n') {
                unsent = !batch.push(&parse_line(line)?.as_ref());
                if !unsent {
                    sink(std::mem::replace(&mut batch, B::empty()))?;
                }
            }
            carry.drain(..=last);
        }
        anyhow::ensure!(carry.is_empty(), "COPY output ended within a line");
    }
    tx.commit().await?;
    if unsent {
        sink(batch)?;
    }
    Ok(())
}

/// A row's values as parsed from a `COPY` text line (borrowed unless escaped).
struct Parsed<'a> {
    row_number: i64,
    status: RowStatus,
    distance_m: Option<f64>,
    texts: [Option<Cow<'a, str>>; COLUMNS],
}

impl Parsed<'_> {
    fn as_ref(&self) -> ResultRef<'_> {
        let text = |i: usize| self.texts[i].as_deref();
        let mut area = [None; Area::COLUMNS.len()];
        for (i, v) in area.iter_mut().enumerate() {
            *v = text(5 + i);
        }
        ResultRef {
            row_number: self.row_number,
            fields: text(1).unwrap_or(""),
            status: self.status,
            postcode: text(3),
            distance_m: self.distance_m,
            area,
            error: text(COLUMNS - 1),
        }
    }
}

/// Parses one `COPY` text line of [`columns::RESULT`]'s columns.
fn parse_line(line: &[u8]) -> anyhow::Result<Parsed<'_>> {
    let line = std::str::from_utf8(line)?;
    let mut texts: [Option<Cow<'_, str>>; COLUMNS] = std::array::from_fn(|_| None);
    let mut fields = line.split('\t');
    for t in texts.iter_mut() {
        let v = fields
            .next()
            .ok_or_else(|| anyhow::anyhow!("a COPY line with fewer than {COLUMNS} columns"))?;
        *t = unescape(v);
    }
    anyhow::ensure!(
        fields.next().is_none(),
        "a COPY line with more than {COLUMNS} columns"
    );
    let number = |i: usize| texts[i].as_deref();
    let row_number: i64 = number(0)
        .ok_or_else(|| anyhow::anyhow!("a row without a number"))?
        .parse()?;
    let status: RowStatus = number(2)
        .ok_or_else(|| anyhow::anyhow!("a row without a status"))?
        .parse()?;
    let distance_m = number(4).map(str::parse::<f64>).transpose()?;
    Ok(Parsed {
        row_number,
        status,
        distance_m,
        texts,
    })
}

/// A `COPY` text value: `\N` is NULL; backslash escapes decoded.
fn unescape(v: &str) -> Option<Cow<'_, str>> {
    if v == "\\N" {
        return None;
    }
    if !v.contains('\\') {
        return Some(Cow::Borrowed(v));
    }
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            Some(c) => out.push(c), // `\\` and any other escaped character
            None => out.push('\\'),
        }
    }
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_reads_what_copy_writes() {
        assert_eq!(unescape("\\N"), None);
        assert_eq!(unescape("a,b").as_deref(), Some("a,b"));
        assert_eq!(unescape("a\\tb\\\\c\\nd\\re").as_deref(), Some("a\tb\\c\nd\re"));
    }

    #[test]
    fn a_line_becomes_a_row() {
        let mut line = String::from("7\t1.5,\"x\\ty\"\tenriched\tAB1 2CD\t12.25");
        for _ in 0..Area::COLUMNS.len() {
            line.push_str("\t\\N");
        }
        line.push_str("\t\\N");
        let p = parse_line(line.as_bytes()).unwrap();
        let r = p.as_ref();
        assert_eq!(r.row_number, 7);
        assert_eq!(r.fields, "1.5,\"x\ty\"");
        assert_eq!(r.status, RowStatus::Enriched);
        assert_eq!(r.postcode, Some("AB1 2CD"));
        assert_eq!(r.distance_m, Some(12.25));
        assert_eq!(r.error, None);
    }
}
