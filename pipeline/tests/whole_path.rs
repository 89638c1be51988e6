//! Property test of the whole input path: records the generator knows are
//! written out in a random dialect (delimiter, quoting, CR/LF/CRLF, BOM,
//! Excel's `sep=` line) with random faults (ragged rows, NUL bytes, invalid
//! UTF-8, stray quotes in unquoted files, huge fields, quoted line breaks),
//! loaded by the reader into PostgreSQL and SQLite, and exported. The
//! generator is the oracle (no second parser reads the input):
//!
//! - every record appears exactly once, in input order, with its status
//!   (`pending` when its coordinates are valid and no field spans lines,
//!   `invalid` otherwise);
//! - the output is rectangular: every line as wide as the header;
//! - the user's fields come back byte-identical, or with the documented,
//!   counted replacement (NUL and invalid UTF-8 → U+FFFD); fields beyond the
//!   header's width are in `extra_fields`, joined with the input's delimiter;
//! - both databases give the same bytes.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256, seconds).
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use pipeline::{
    csv_input::{CsvOptions, Quote},
    egress::EgressPolicy,
    export::write_csv,
    load::{load, Source},
    store::Store,
};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

/// How a generated file is written.
#[derive(Debug, Clone)]
struct Dialect {
    delimiter: u8,
    quote: Quote,
    line_end: &'static str,
    bom: bool,
    excel_sep_line: bool,
    final_line_end: bool,
}

/// One generated record: the bytes of each field, and whether its coordinates are valid.
#[derive(Debug, Clone)]
struct Record {
    fields: Vec<Vec<u8>>,
    valid: bool,
}

#[derive(Debug, Clone)]
struct File {
    dialect: Dialect,
    /// Column names; `lat` and `lon` among them.
    header: Vec<String>,
    records: Vec<Record>,
}

fn dialect() -> impl Strategy<Value = Dialect> {
    (
        prop_oneof![Just(b','), Just(b';'), Just(b'\t'), Just(b'|')],
        any::<bool>(),
        prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(delimiter, quoted, line_end, bom, excel_sep_line, final_line_end)| Dialect {
                delimiter,
                // An unquoted file is only written with tab or pipe (as people do).
                quote: if quoted || matches!(delimiter, b',' | b';') {
                    Quote::Double
                } else {
                    Quote::None
                },
                line_end,
                bom,
                excel_sep_line: excel_sep_line && !bom,
                final_line_end,
            },
        )
}

/// A text field's bytes: plain text, unicode, delimiters, quotes, line
/// breaks, NULs, invalid UTF-8, sometimes huge. Whether the dialect can hold
/// it is decided when writing ([`text_for`]).
fn text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-zA-Z0-9 ._-]{0,10}".prop_map(String::into_bytes),
        2 => "\\PC{0,6}".prop_map(String::into_bytes),
        1 => Just(b"Smith, J; x|y\tz".to_vec()),
        1 => Just(b"Ben \"Nevis".to_vec()),
        1 => Just(b"\"quoted\" start".to_vec()),
        1 => Just(b"two\nlines".to_vec()),
        1 => Just(b"A\0B".to_vec()),
        1 => Just(b"Caf\xe9 \xff\xfe".to_vec()),
        1 => (1usize..200_000).prop_map(|n| vec![b'w'; n]),
    ]
}

/// A coordinate field's text and whether it is a valid latitude (or longitude).
fn coordinate(lat: bool) -> impl Strategy<Value = (Vec<u8>, bool)> {
    let range = if lat { 89.0 } else { 179.0 };
    prop_oneof![
        4 => (-range..range).prop_map(|v: f64| (format!("{v:.5}").into_bytes(), true)),
        1 => Just((b"abc".to_vec(), false)),
        1 => Just((b"".to_vec(), false)),
        1 => Just((b"1\x002".to_vec(), false)),
        1 => Just((b"999".to_vec(), false)),
    ]
}

fn file() -> impl Strategy<Value = File> {
    (
        dialect(),
        0usize..4,
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
    )
        .prop_flat_map(|(dialect, others, lat_at, lon_at)| {
            let width = others + 2;
            let lat = lat_at.index(width);
            let lon = (lat + 1 + lon_at.index(width - 1)) % width;
            let header: Vec<String> = (0..width)
                .map(|i| match i {
                    _ if i == lat => "lat".to_string(),
                    _ if i == lon => "lon".to_string(),
                    _ => format!("field_{i}"),
                })
                .collect();
            let record = (
                prop::collection::vec(text(), width),
                coordinate(true),
                coordinate(false),
                // ragged: -1 one field short, 0 as wide as the header, n > 0 surplus fields
                prop_oneof![6 => Just(0i32), 1 => Just(-1i32), 1 => 1i32..4],
                prop::collection::vec(text(), 3),
            )
                .prop_map(move |(mut fields, (la, la_ok), (lo, lo_ok), ragged, extra)| {
                    fields[lat] = la;
                    fields[lon] = lo;
                    let mut valid = la_ok && lo_ok;
                    match ragged {
                        -1 => {
                            fields.pop();
                            // the last column was a coordinate: it is now missing
                            valid &= lat < width - 1 && lon < width - 1;
                        }
                        n if n > 0 => fields.extend(extra.into_iter().take(n as usize)),
                        _ => {}
                    }
                    Record { fields, valid }
                });
            (Just(dialect), Just(header), prop::collection::vec(record, 1..40))
        })
        .prop_map(|(dialect, header, records)| File {
            dialect,
            header,
            records,
        })
}

/// The field as this dialect can hold it: an unquoted file cannot hold its
/// delimiter or a line break (they become spaces); a quoted one holds
/// anything.
fn text_for(d: &Dialect, field: &[u8]) -> Vec<u8> {
    match d.quote {
        Quote::Double => field.to_vec(),
        Quote::None => field
            .iter()
            .map(|&b| {
                if b == d.delimiter || b == b'\n' || b == b'\r' {
                    b' '
                } else {
                    b
                }
            })
            .collect(),
    }
}

/// Each record's fields as written, after [`text_for`].
fn written(f: &File) -> Vec<Vec<Vec<u8>>> {
    f.records
        .iter()
        .map(|r| r.fields.iter().map(|x| text_for(&f.dialect, x)).collect())
        .collect()
}

/// The records as the generator means them, after [`text_for`] (the truth).
fn truth(f: &File) -> Vec<Record> {
    written(f)
        .into_iter()
        .zip(&f.records)
        // A line of one field of only spaces, tabs or NULs is blank, not a
        // record (README, CSV input rules).
        .filter(|(fields, _)| {
            !(fields.len() == 1 && fields[0].iter().all(|&b| b == 0 || b.is_ascii_whitespace()))
        })
        .map(|(fields, r)| {
            // A quoted field spanning lines makes its row invalid (kept whole,
            // with the lines it spans), so that a stray quote can never merge
            // records silently (README, CSV input rules).
            let spans_lines = fields.iter().flatten().any(|&b| b == b'\n' || b == b'\r');
            Record {
                fields,
                valid: r.valid && !spans_lines,
            }
        })
        .collect()
}

fn encode_field(d: &Dialect, field: &[u8], out: &mut Vec<u8>) {
    let needs_quotes = d.quote == Quote::Double
        && (field
            .iter()
            .any(|&b| b == d.delimiter || matches!(b, b'"' | b'\n' | b'\r'))
            || field.first().is_some_and(|b| b.is_ascii_whitespace()));
    if needs_quotes {
        out.push(b'"');
        for &b in field {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(field);
    }
}

fn write(f: &File) -> Vec<u8> {
    let d = &f.dialect;
    let mut out = vec![];
    if d.bom {
        out.extend_from_slice(&[0xEF, 0xBB, 0xBF]);
    }
    if d.excel_sep_line {
        out.extend_from_slice(format!("sep={}{}", char::from(d.delimiter), d.line_end).as_bytes());
    }
    let header: Vec<Vec<u8>> = f.header.iter().map(|h| h.clone().into_bytes()).collect();
    let mut lines = vec![header];
    lines.extend(written(f));
    for (i, fields) in lines.iter().enumerate() {
        for (j, field) in fields.iter().enumerate() {
            if j > 0 {
                out.push(d.delimiter);
            }
            encode_field(d, field, &mut out);
        }
        if i + 1 < lines.len() || d.final_line_end {
            out.extend_from_slice(d.line_end.as_bytes());
        }
    }
    out
}

/// What the output must hold for a record: its user fields (as wide as the
/// header), `extra_fields`, and its status; and how many fields were replaced.
fn expected(f: &File, r: &Record) -> (Vec<String>, String, &'static str, u64) {
    let width = f.header.len();
    let mut replaced = 0;
    let mut text = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        if matches!(s, std::borrow::Cow::Owned(_)) || b.contains(&0) {
            replaced += 1;
        }
        s.replace('\0', "\u{FFFD}")
    };
    let user: Vec<String> = (0..width)
        .map(|i| r.fields.get(i).map(|b| text(b)).unwrap_or_default())
        .collect();
    let extra: Vec<String> = r.fields.iter().skip(width).map(|b| text(b)).collect();
    let status = if r.valid { "pending" } else { "invalid" };
    (
        user,
        extra.join(&char::from(f.dialect.delimiter).to_string()),
        status,
        replaced,
    )
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Loads `bytes` into `store` and exports it; the exported bytes.
async fn through(store: &Store, bytes: &[u8], f: &File) -> (Vec<u8>, Option<String>) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("whole-path-{}-{n}.csv", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let uid = format!("case-{n}");
    let import = store
        .ensure_import(&uid, &uid, path.to_str().unwrap(), 2)
        .await
        .unwrap();
    let opts = CsvOptions {
        delimiter: (!f.dialect.excel_sep_line).then_some(f.dialect.delimiter),
        quote: Some(f.dialect.quote),
        ..CsvOptions::default()
    };
    // A local file, as the `local` runner reads it: no egress policy.
    load(
        store,
        &import,
        &Source::File(path.clone()),
        &opts,
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap_or_else(|e| panic!("load failed: {e}"));
    let import = store.import(&uid).await.unwrap().unwrap();
    let mut out = vec![];
    write_csv(store, &import, &mut out).await.unwrap();
    store.delete_import(&uid).await.unwrap();
    let _ = std::fs::remove_file(&path);
    (out, import.warnings)
}

fn check(f: &File, out: &[u8], warnings: Option<&str>) -> Result<(), TestCaseError> {
    let mut r = csv::ReaderBuilder::new().flexible(true).from_reader(out);
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    let width = f.header.len();
    prop_assert_eq!(&header[..width], &f.header[..]);
    prop_assert_eq!(&header[width], "extra_fields");
    let row_number = header.iter().position(|h| h == "row_number").unwrap();
    let status = header.iter().position(|h| h == "status").unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let truth = truth(f);
    prop_assert_eq!(rows.len(), truth.len(), "every record exactly once");
    let mut replaced = 0;
    for (i, (row, want)) in rows.iter().zip(&truth).enumerate() {
        prop_assert_eq!(
            row.len(),
            header.len(),
            "row {} is not as wide as the header",
            i + 1
        );
        let (user, extra, st, rep) = expected(f, want);
        replaced += rep;
        let got: Vec<&str> = row.iter().take(width).collect();
        prop_assert_eq!(
            got,
            user.iter().map(String::as_str).collect::<Vec<_>>(),
            "row {}",
            i + 1
        );
        prop_assert_eq!(&row[width], extra.as_str(), "row {} extra_fields", i + 1);
        let number = (i + 1).to_string();
        prop_assert_eq!(&row[row_number], number.as_str());
        prop_assert_eq!(&row[status], st, "row {}", i + 1);
    }
    if replaced > 0 {
        let says = format!("{replaced} fields held NUL bytes or invalid UTF-8");
        prop_assert!(
            warnings.is_some_and(|w| w.contains(&says)),
            "{:?} lacks {}",
            warnings,
            says
        );
    }
    Ok(())
}

async fn sqlite() -> Store {
    let path = std::env::temp_dir().join(format!("whole-path-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let store = Store::connect(path.to_str().unwrap()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

#[test]
fn every_record_comes_back_once_in_order_rectangular_and_alike_on_both_databases() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pg, lite) = rt.block_on(async { (common::fresh_pg().await, sqlite().await) });
    let config = ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    };
    proptest!(config, |(f in file())| {
        let bytes = write(&f);
        let ((on_pg, pg_warnings), (on_lite, _)) =
            rt.block_on(async { (through(&pg, &bytes, &f).await, through(&lite, &bytes, &f).await) });
        check(&f, &on_pg, pg_warnings.as_deref())?;
        prop_assert!(on_pg == on_lite, "PostgreSQL and SQLite outputs differ");
    });
}
