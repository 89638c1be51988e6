//! Area data end to end through `postcode-operator local`: the offline
//! provider on an NSPL-layout file with area codes and its ONS names files
//! (`pipeline/tests/fixtures/nspl-areas`), on SQLite and on PostgreSQL, and the
//! HTTP path against the test server on the same file: every output row's
//! area columns are what postcodes.io answers for those postcodes' codes
//! (the fixture's `postcodesio-answers.json`).

mod common;

use std::{path::PathBuf, sync::Arc};

use common::*;
use pipeline::{lookup::Area, offline::OfflineIndex, postcodes_io::to_match};
use postcodes_io_test_server::{Faults, TestServer};
use serde_json::Value;

fn fixture() -> PathBuf {
    repo().join("pipeline/tests/fixtures/nspl-areas")
}

fn postcode_file() -> PathBuf {
    fixture().join("Data/NSPL_TEST_2025_UK.csv")
}

/// The input (one row per fixture point) and postcodes.io's answers there
/// (postcode, area), in row order.
fn input_and_expected(dir: &std::path::Path) -> (PathBuf, Vec<(String, Area)>) {
    let text = std::fs::read_to_string(fixture().join("postcodesio-answers.json")).unwrap();
    let all: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut csv = String::from("lat,lon\n");
    let mut expected = vec![];
    for a in &all {
        csv.push_str(&format!("{},{}\n", a["latitude"], a["longitude"]));
        let m = to_match(&a["result"]).unwrap();
        expected.push((m.postcode, m.area));
    }
    let input = dir.join("points.csv");
    std::fs::write(&input, csv).unwrap();
    (input, expected)
}

/// Runs `local` with `args` on the fixture's points and checks every row's
/// postcode and area columns against postcodes.io's answers.
fn run_and_check(tag: &str, db: Option<String>, args: &[&str]) {
    let dir = temp_dir(tag);
    let (input, expected) = input_and_expected(&dir);
    let out = dir.join("out.csv");
    let db = db.unwrap_or_else(|| dir.join("areas.db").display().to_string());
    let mut all = vec![
        input.to_str().unwrap(),
        "--db",
        &db,
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend(args);
    assert!(run_local(&all).status.success());
    let (header, rows) = read_output(&out);
    for c in Area::COLUMNS {
        assert!(header.iter().any(|h| h == c), "{c} in {header:?}");
    }
    assert_eq!(rows.len(), expected.len());
    for (i, (row, (postcode, area))) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(row["status"], "enriched", "{tag} row {}", i + 1);
        assert_eq!(&row["postcode"], postcode, "{tag} row {}", i + 1);
        for (c, want) in Area::COLUMNS.iter().zip(area.values()) {
            assert_eq!(
                row[*c],
                want.clone().unwrap_or_default(),
                "{tag} row {} ({postcode}) column {c}",
                i + 1
            );
        }
    }
}

#[test]
fn offline_area_columns_are_postcodes_ios_on_sqlite() {
    run_and_check(
        "areas-sqlite",
        None,
        &["--offline-postcodes", postcode_file().to_str().unwrap()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_area_columns_are_postcodes_ios_on_postgres() {
    let db = fresh_pg().await;
    tokio::task::spawn_blocking(move || {
        run_and_check(
            "areas-pg",
            Some(db),
            &["--offline-postcodes", postcode_file().to_str().unwrap()],
        )
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_area_columns_from_the_test_server_are_the_same_on_postgres() {
    let index = Arc::new(OfflineIndex::load(&postcode_file()).unwrap());
    let server = TestServer::start(index, Faults::default()).await.unwrap();
    let db = fresh_pg().await;
    let url = server.url();
    tokio::task::spawn_blocking(move || {
        run_and_check("areas-http", Some(db), &["--api-url", &url, "--quota-rps", "20"])
    })
    .await
    .unwrap();
}
