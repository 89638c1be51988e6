//! Property-based fuzzing of the CSV reader (proptest): whatever the bytes, the
//! reader never panics, and every non-blank input line of a file without
//! quoted newlines maps to exactly one row with exactly one status.
//!
//! `PROPTEST_CASES` sets the number of cases (default 2000 here); failures are
//! kept in `tests/fuzz_csv.proptest-regressions` and replayed first.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

use std::io::Cursor;

use pipeline::csv_input::{CsvOptions, RowReader};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

/// Reads everything; `None` when the file is refused as a whole.
fn read_all(bytes: Vec<u8>, opts: &CsvOptions) -> Option<Vec<pipeline::csv_input::Row>> {
    let mut r = RowReader::new(Box::new(Cursor::new(bytes)), opts).ok()?;
    let mut rows = vec![];
    loop {
        match r.next_row() {
            Ok(Some(row)) => rows.push(row),
            Ok(None) => return Some(rows),
            Err(_) => return Some(rows),
        }
    }
}

/// A field: numbers, near-numbers, junk, delimiters inside quotes, unicode.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        (-100.0f64..100.0).prop_map(|v| format!("{v}")),
        (-200.0f64..200.0).prop_map(|v| format!("{v:.6}")),
        Just(String::new()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("51,5".to_string()),
        Just("\"quoted, with comma\"".to_string()),
        Just("\"say \"\"hi\"\"\"".to_string()),
        "[a-zA-Z0-9 .;|\t-]{0,12}",
        "\\PC{0,6}",
    ]
}

const WELL_QUOTED: [&str; 2] = ["\"quoted, with comma\"", "\"say \"\"hi\"\"\""];

fn delimiter() -> impl Strategy<Value = char> {
    prop_oneof![Just(','), Just(';'), Just('\t'), Just('|')]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let rows = read_all(bytes, &CsvOptions::default());
        if let Some(rows) = rows {
            for (i, r) in rows.iter().enumerate() {
                prop_assert_eq!(r.row_number, i as u64 + 1);
                if let Err(e) = &r.coordinate {
                    prop_assert!(e.starts_with("line ") || e.starts_with("lines "), "{}", e);
                }
            }
        }
    }

    #[test]
    fn every_non_blank_line_is_one_row_with_one_status(
        d in delimiter(),
        crlf in any::<bool>(),
        records in proptest::collection::vec(proptest::collection::vec(field(), 1..5), 1..40),
        blank_every in 0usize..7,
    ) {
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut text = format!("lat{d}lon{d}note{nl}");
        let mut expected = 0usize;
        for (i, rec) in records.iter().enumerate() {
            if blank_every > 0 && i % blank_every == 0 {
                text.push_str(nl);
            }
            // fields must not contain the delimiter or a line break unquoted
            let fields: Vec<String> = rec.iter().map(|f| {
                // well-formed quoted literals stay; anything else loses its quotes,
                // delimiters and line breaks (an open quote swallows the lines after
                // it by CSV's own rules: `arbitrary_bytes_never_panic` covers that)
                if WELL_QUOTED.contains(&f.as_str()) { f.clone() } else { f.replace([d, '\n', '\r', '"'], " ") }
            }).collect();
            let line = fields.join(&d.to_string());
            text.push_str(&line);
            text.push_str(nl);
            // A line of one field of only white space is blank (README "CSV input rules").
            let blank = !line.contains(d) && line.chars().all(|c| c.is_ascii_whitespace());
            if !blank {
                expected += 1;
            }
        }
        let opts = CsvOptions { delimiter: Some(d as u8), ..CsvOptions::default() };
        let rows = read_all(text.clone().into_bytes(), &opts).expect("a file with a lat/lon header is readable");
        prop_assert_eq!(rows.len(), expected, "text: {:?}", text);
        let lines: Vec<&str> = text.split(nl).collect();
        for r in &rows {
            let line = lines[(r.line - 1) as usize];
            // blank means ASCII white space only (U+2000 and the like are text)
            prop_assert!(!line.trim_matches(|c: char| c.is_ascii_whitespace()).is_empty() || line.contains(d), "row {} points at a blank line {}", r.row_number, r.line);
            match &r.coordinate {
                Ok((lat, lon)) => prop_assert!(lat.abs() <= 90.0 && lon.abs() <= 180.0),
                Err(e) => { let want = format!("line {}:", r.line); prop_assert!(e.starts_with(&want), "{}", e) },
            }
        }
    }
}
