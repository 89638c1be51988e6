//! The input forms people really have (Excel exports, crash-truncated files,
//! stray quotes, ragged rows, UTF-16, CR-only lines, hemisphere letters …),
//! each run through `postcode-operator local` on SQLite **and** PostgreSQL:
//! the exact statuses, postcodes, line numbers and output columns, the same
//! bytes from both databases, and every output line as wide as the header.
//!
//! The postcodes come from `samples/postcodes-sample.csv` (AB1 1AA is at
//! 57.14762,-2.09386; AB1 1AB at 57.14798,-2.09254).
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::path::Path;

use common::*;

/// One input form and what the enriched CSV must say about it.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    args: &'static [&'static str],
    /// The user's columns as the output names them.
    columns: &'static [&'static str],
    /// One line a row: the user's fields, `extra_fields`, `row_number`,
    /// `status`, `postcode`, `distance_m` and the error up to its first `:`
    /// (the line it names), joined with `|`.
    rows: &'static [&'static str],
    /// A text the run's summary must contain (a warning), if any.
    says: Option<&'static str>,
}

fn utf16(text: &str, big_endian: bool) -> Vec<u8> {
    let mut out = if big_endian {
        vec![0xFE, 0xFF]
    } else {
        vec![0xFF, 0xFE]
    };
    for unit in text.encode_utf16() {
        let b = if big_endian {
            unit.to_be_bytes()
        } else {
            unit.to_le_bytes()
        };
        out.extend_from_slice(&b);
    }
    out
}

fn cases() -> Vec<Case> {
    let mut zero_tail = b"lat,lon\n57.14762,-2.09386\n57.14798,-2.09254\n".to_vec();
    zero_tail.extend(std::iter::repeat_n(0u8, 4096));
    vec![
        Case {
            name: "short-row",
            bytes: b"lat,lon\n57.14762,-2.09386\n0\n57.14798,-2.09254\n".to_vec(),
            args: &[],
            columns: &["lat", "lon"],
            rows: &[
                "57.14762|-2.09386||1|enriched|AB1 1AA|0.0|",
                "0|||2|invalid|||line 3",
                "57.14798|-2.09254||3|enriched|AB1 1AB|0.0|",
            ],
            says: Some("1 rows had fewer fields than the header"),
        },
        Case {
            name: "unquoted-comma",
            bytes: b"name,lat,lon\nSmith, John,57.14762,-2.09386\nAnn,57.14798,-2.09254\nBo,57.14762,-2.09386,,\n"
                .to_vec(),
            args: &[],
            columns: &["name", "lat", "lon"],
            rows: &[
                "Smith| John|57.14762|-2.09386|1|invalid|||line 2",
                "Ann|57.14798|-2.09254||2|enriched|AB1 1AB|0.0|",
                "Bo|57.14762|-2.09386|,|3|enriched|AB1 1AA|0.0|",
            ],
            says: Some("2 rows had more fields than the header"),
        },
        Case {
            name: "stray-quote-tab",
            bytes: b"id\tlocality\tlat\tlon\n1\t\"Ben Nevis\t57.14762\t-2.09386\n2\tGlen\t57.14798\t-2.09254\n3\tX\"\t57.14762\t-2.09386\n"
                .to_vec(),
            args: &[],
            columns: &["id", "locality", "lat", "lon"],
            rows: &[
                "1|\"Ben Nevis|57.14762|-2.09386||1|enriched|AB1 1AA|0.0|",
                "2|Glen|57.14798|-2.09254||2|enriched|AB1 1AB|0.0|",
                "3|X\"|57.14762|-2.09386||3|enriched|AB1 1AA|0.0|",
            ],
            says: None,
        },
        Case {
            name: "stray-quote-quoted",
            bytes: b"id\tlocality\tlat\tlon\n1\t\"Ben Nevis\t57.14762\t-2.09386\n2\tGlen\t57.14798\t-2.09254\n"
                .to_vec(),
            args: &["--quote", "double"],
            columns: &["id", "locality", "lat", "lon"],
            rows: &["1|Ben Nevis\t57.14762\t-2.09386\n2\tGlen\t57.14798\t-2.09254\n||||1|invalid|||lines 2-3"],
            says: Some("rows whose quoted field spans lines are invalid"),
        },
        Case {
            name: "zero-filled-tail",
            bytes: zero_tail,
            args: &[],
            columns: &["lat", "lon"],
            rows: &[
                "57.14762|-2.09386||1|enriched|AB1 1AA|0.0|",
                "57.14798|-2.09254||2|enriched|AB1 1AB|0.0|",
            ],
            says: None,
        },
        Case {
            name: "nul-in-fields",
            bytes: b"name,lat,lon\nA\0B,57.14762,-2.09386\nC,57.1\x0047,-2.09386\n".to_vec(),
            args: &[],
            columns: &["name", "lat", "lon"],
            rows: &[
                "A\u{FFFD}B|57.14762|-2.09386||1|enriched|AB1 1AA|0.0|",
                "C|57.1\u{FFFD}47|-2.09386||2|invalid|||line 3",
            ],
            says: Some("2 fields held NUL bytes or invalid UTF-8"),
        },
        Case {
            name: "invalid-utf8",
            bytes: b"name,lat,lon\nCaf\xe9,57.14762,-2.09386\n".to_vec(),
            args: &[],
            columns: &["name", "lat", "lon"],
            rows: &["Caf\u{FFFD}|57.14762|-2.09386||1|enriched|AB1 1AA|0.0|"],
            says: Some("1 fields held NUL bytes or invalid UTF-8"),
        },
        Case {
            name: "excel-sep-line",
            bytes: b"sep=;\r\nname;lat;lon\r\nA;57.14762;-2.09386\r\nB;57.14798;-2.09254\r\n".to_vec(),
            args: &[],
            columns: &["name", "lat", "lon"],
            rows: &[
                "A|57.14762|-2.09386||1|enriched|AB1 1AA|0.0|",
                "B|57.14798|-2.09254||2|enriched|AB1 1AB|0.0|",
            ],
            says: None,
        },
        Case {
            name: "utf16le-bom",
            bytes: utf16("name\tlat\tlon\r\nZoë\t57.14762\t-2.09386\r\nB\tx\t-2\r\n", false),
            args: &[],
            columns: &["name", "lat", "lon"],
            rows: &["Zoë|57.14762|-2.09386||1|enriched|AB1 1AA|0.0|", "B|x|-2||2|invalid|||line 3"],
            says: None,
        },
        Case {
            name: "utf16be-bom",
            bytes: utf16("name\tlat\tlon\r\nZoë\t57.14762\t-2.09386\r\n", true),
            args: &[],
            columns: &["name", "lat", "lon"],
            rows: &["Zoë|57.14762|-2.09386||1|enriched|AB1 1AA|0.0|"],
            says: None,
        },
        Case {
            name: "cr-only-lines",
            bytes: b"name,lat,lon\rA,57.14762,-2.09386\rB,x,-2\rC,57.14798,-2.09254\r".to_vec(),
            args: &[],
            columns: &["name", "lat", "lon"],
            rows: &[
                "A|57.14762|-2.09386||1|enriched|AB1 1AA|0.0|",
                "B|x|-2||2|invalid|||line 3",
                "C|57.14798|-2.09254||3|enriched|AB1 1AB|0.0|",
            ],
            says: None,
        },
        Case {
            name: "blank-and-whitespace-lines",
            bytes: b"lat,lon\n57.14762,-2.09386\n   \n\t\n\n57.14798,-2.09254\nx,1\n".to_vec(),
            args: &[],
            columns: &["lat", "lon"],
            rows: &[
                "57.14762|-2.09386||1|enriched|AB1 1AA|0.0|",
                "57.14798|-2.09254||2|enriched|AB1 1AB|0.0|",
                "x|1||3|invalid|||line 7",
            ],
            says: None,
        },
        Case {
            name: "hemisphere-letters-and-dms",
            bytes: "name,lat,lon\nA,57.14762N,2.09386W\nB,57°08'51.432N,2°05'37.896W\nC,N57 08.8572,W2 05.6316\nD,-57.14762N,2.09386W\nE,57.14762S,2.09386W\nF,57.14762,2.09386E\n"
                .as_bytes()
                .to_vec(),
            args: &[],
            columns: &["name", "lat", "lon"],
            rows: &[
                "A|57.14762N|2.09386W||1|enriched|AB1 1AA|0.0|",
                "B|57°08'51.432N|2°05'37.896W||2|enriched|AB1 1AA|0.0|",
                "C|N57 08.8572|W2 05.6316||3|enriched|AB1 1AA|0.0|",
                "D|-57.14762N|2.09386W||4|invalid|||line 5",
                "E|57.14762S|2.09386W||5|no_match|||",
                "F|57.14762|2.09386E||6|no_match|||",
            ],
            says: None,
        },
    ]
}

/// The output's rows projected as [`Case::rows`] says; panics unless every
/// line has the header's width.
fn projected(path: &Path, columns: &[&str]) -> Vec<String> {
    let mut r = csv::ReaderBuilder::new().flexible(true).from_path(path).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    let mut want: Vec<&str> = columns.to_vec();
    want.extend([
        "extra_fields",
        "row_number",
        "status",
        "postcode",
        "distance_m",
        "error",
    ]);
    assert_eq!(
        &header[..columns.len() + 1],
        &want[..columns.len() + 1],
        "user columns, then extra_fields"
    );
    let index: Vec<usize> = want
        .iter()
        .map(|c| header.iter().position(|h| h == c).unwrap())
        .collect();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            assert_eq!(
                rec.len(),
                header.len(),
                "line {:?} is not as wide as the header",
                rec.position()
            );
            index
                .iter()
                .map(|&i| {
                    let v = &rec[i];
                    if header[i] == "error" {
                        v.split(':').next().unwrap_or("").to_string()
                    } else {
                        v.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// Runs `case` with `db`; returns the output's bytes.
fn run_case(case: &Case, dir: &Path, db: &str, tag: &str) -> Vec<u8> {
    let input = dir.join(format!("{}.csv", case.name));
    std::fs::write(&input, &case.bytes).unwrap();
    let out = dir.join(format!("{}-{tag}.enriched.csv", case.name));
    let sample = repo().join("samples/postcodes-sample.csv");
    let mut args = vec![
        input.to_str().unwrap(),
        "--db",
        db,
        "--offline-postcodes",
        sample.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(case.args);
    let o = run_local(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{} on {tag}: {err}", case.name);
    if let Some(says) = case.says {
        assert!(
            err.contains(says),
            "{} on {tag}: the summary does not say {says:?}: {err}",
            case.name
        );
    }
    assert_eq!(projected(&out, case.columns), case.rows, "{} on {tag}", case.name);
    std::fs::read(&out).unwrap()
}

#[tokio::test]
async fn every_input_form_gives_its_rows_on_sqlite_and_postgres_alike() {
    let dir = temp_dir("forms");
    for case in cases() {
        let sqlite = dir.join(format!("{}.db", case.name));
        let on_sqlite = run_case(&case, &dir, sqlite.to_str().unwrap(), "sqlite");
        let pg = fresh_pg().await;
        let on_pg = run_case(&case, &dir, &pg, "postgres");
        assert!(
            on_sqlite == on_pg,
            "{}: SQLite and PostgreSQL outputs differ",
            case.name
        );
    }
}

#[test]
fn a_missing_input_file_exits_2_with_its_name() {
    let dir = temp_dir("missing");
    let missing = dir.join("nowhere.csv");
    let db = dir.join("m.db");
    let o = run_local(&[missing.to_str().unwrap(), "--db", db.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot open") && err.contains("nowhere.csv"),
        "{err}"
    );
}
