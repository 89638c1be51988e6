//! Offline area data against postcodes.io's: the offline provider on a small
//! NSPL-layout file with area codes and its ONS names files
//! (`tests/fixtures/nspl-areas`, see its README), and the test server on the
//! same file through the postcodes.io client, answer every point with the area
//! names and codes postcodes.io gives for those codes
//! (`postcodesio-answers.json`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use pipeline::{
    geo::LatLon,
    lookup::{Match, Radius},
    offline::OfflineIndex,
    postcodes_io::{to_match, PostcodesIo},
    provider::Answer,
};
use postcodes_io_test_server::{Faults, TestServer};
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nspl-areas")
}

fn postcode_file() -> PathBuf {
    fixture().join("Data/NSPL_TEST_2025_UK.csv")
}

/// (point, postcodes.io's answer there) of the fixture.
fn expected() -> Vec<(LatLon, Match)> {
    let text = std::fs::read_to_string(fixture().join("postcodesio-answers.json")).unwrap();
    let all: Vec<Value> = serde_json::from_str(&text).unwrap();
    all.iter()
        .map(|a| {
            let at = LatLon {
                lat: a["latitude"].as_f64().unwrap(),
                lon: a["longitude"].as_f64().unwrap(),
            };
            (at, to_match(&a["result"]).unwrap())
        })
        .collect()
}

fn assert_same(point: usize, got: &Match, want: &Match) {
    assert_eq!(got.postcode, want.postcode, "point {point}");
    assert_eq!(got.area, want.area, "point {point}: {}", got.postcode);
}

#[test]
fn offline_areas_are_postcodes_ios() {
    let index = OfflineIndex::load(&postcode_file()).unwrap();
    assert!(index.has_areas());
    let want = expected();
    assert_eq!(want.len(), 8);
    for (i, (at, want)) in want.iter().enumerate() {
        let got = index.lookup(*at, Radius::Metres(100.0)).unwrap();
        assert_same(i, &got, want);
    }
    // The terminated CB3 9ZZ is not answered: its point gets CB3 9ND, 13 m away.
    let at_terminated = index.lookup(want[1].0, Radius::Metres(100.0)).unwrap();
    assert!(at_terminated.distance_m > 10.0 && at_terminated.distance_m < 20.0);
    // Batches answer the same.
    let ats: Vec<LatLon> = want.iter().map(|(at, _)| *at).collect();
    for (i, (got, (_, want))) in index
        .lookup_many(&ats, Radius::Metres(100.0))
        .iter()
        .zip(&want)
        .enumerate()
    {
        assert_same(i, got.as_ref().unwrap(), want);
    }
}

#[test]
fn the_cache_keeps_the_areas_and_follows_the_names_files() {
    let dir = std::env::temp_dir().join(format!("pco-areas-{}", std::process::id()));
    let data = dir.join("Data");
    let documents = dir.join("Documents");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&documents).unwrap();
    let file = data.join("nspl.csv");
    std::fs::copy(postcode_file(), &file).unwrap();
    for f in std::fs::read_dir(fixture().join("Documents")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, documents.join(f.file_name().unwrap())).unwrap();
    }
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let want = expected();
    let ats: Vec<LatLon> = want.iter().map(|(at, _)| *at).collect();
    let answers = |index: &OfflineIndex| index.lookup_many(&ats, Radius::Metres(100.0));
    let built = OfflineIndex::load_cached(&file, &cache).unwrap();
    let mapped = OfflineIndex::load_cached(&file, &cache).unwrap();
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "one cache, read back"
    );
    assert_eq!(answers(&built), answers(&mapped));
    assert_eq!(answers(&mapped)[0].as_ref().unwrap().area, want[0].1.area);

    // A names file changed: a new cache, with the new name.
    let wards = documents.join("WD Ward names and codes UK as at 05_25.csv");
    let text = std::fs::read_to_string(&wards).unwrap();
    std::fs::write(
        &wards,
        text.replace("Harston & Comberton", "Harston and Comberton"),
    )
    .unwrap();
    let renamed = OfflineIndex::load_cached(&file, &cache).unwrap();
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
    let area = answers(&renamed)[0].clone().unwrap().area;
    assert_eq!(area.admin_ward.as_deref(), Some("Harston and Comberton"));
    assert_eq!(area.admin_ward_code.as_deref(), Some("E05011296"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_names_files_the_codes_are_still_given() {
    let file = std::fs::File::open(postcode_file()).unwrap();
    let index = OfflineIndex::from_reader(Box::new(file), "no documents").unwrap();
    let want = expected();
    let got = index.lookup(want[0].0, Radius::Metres(100.0)).unwrap();
    assert_eq!(got.area.admin_district, None);
    assert_eq!(got.area.country, None);
    assert_eq!(got.area.admin_district_code, want[0].1.area.admin_district_code);
    assert_eq!(got.area.lsoa_code.as_deref(), Some("E01018218"));
}

#[tokio::test]
async fn the_test_server_answers_the_same_through_the_client() {
    let index = Arc::new(OfflineIndex::load(&postcode_file()).unwrap());
    let server = TestServer::start(index, Faults::default()).await.unwrap();
    let client = PostcodesIo::new(&server.url(), Duration::from_secs(30));
    let want = expected();
    let queries: Vec<(f64, f64)> = want.iter().map(|(at, _)| (at.lat, at.lon)).collect();
    let answers = client
        .bulk_reverse(&queries, Radius::Metres(100.0))
        .await
        .unwrap();
    for (i, (answer, (_, want))) in answers.iter().zip(&want).enumerate() {
        let Answer::Found(got) = answer else {
            panic!("point {i}: {answer:?}");
        };
        assert_same(i, got, want);
    }
}
