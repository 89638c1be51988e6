//! The offline provider and the test server against what the real postcodes.io
//! answered (`../shared/data/postcodesio-answers.jsonl`: 1,140 points, each at
//! radius 100 m limit 5, radius 2000 m limit 1 and widesearch limit 10, run on
//! the NSPL file `nspl-latlon.csv.gz`). Every stage of every point: the same
//! `null`/non-null, the same first postcode, its distance within 0.01 m; the
//! test server also the same list in order. Skipped, with a note, when the data
//! is absent (`POSTCODE_DATA_DIR`, else `../shared/data`).

use std::{path::PathBuf, sync::Arc};

use pipeline::{
    geo::LatLon,
    lookup::Radius,
    offline::{default_cache_dir, OfflineIndex},
};
use postcodes_io_test_server::{Faults, TestServer};
use serde_json::{json, Value};

/// Largest difference allowed between our distance and postcodes.io's, metres.
const TOLERANCE_M: f64 = 0.01;

fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("POSTCODE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    let whole = ["nspl-latlon.csv.gz", "postcodesio-answers.jsonl"]
        .iter()
        .all(|f| dir.join(f).exists());
    whole.then_some(dir)
}

/// One line of the answers file.
struct Point {
    at: LatLon,
    /// `r100`, `r2000`, `wide`: each a list of (postcode, metres).
    stages: [Vec<(String, f64)>; 3],
}

/// The stages: key in the file, the product's radius, the limit postcodes.io was asked with.
const STAGES: [(&str, Radius, usize); 3] = [
    ("r100", Radius::Metres(100.0), 5),
    ("r2000", Radius::Metres(2000.0), 1),
    ("wide", Radius::Widesearch, 10),
];

fn read_points(path: &std::path::Path) -> Vec<Point> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let list = |k: &str| {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
                    .collect::<Vec<_>>()
            };
            Point {
                at: LatLon {
                    lat: v["lat"].as_f64().unwrap(),
                    lon: v["lon"].as_f64().unwrap(),
                },
                stages: [list("r100"), list("r2000"), list("wide")],
            }
        })
        .collect()
}

/// Differences between an answer list and postcodes.io's, as messages;
/// `whole` compares every entry, else only null-ness and the first.
fn differences(want: &[(String, f64)], got: &[(String, f64)], whole: bool) -> Option<String> {
    let n = if whole {
        want.len().max(got.len())
    } else {
        want.len().min(1).max(got.len().min(1))
    };
    let same = want.len().min(1) == got.len().min(1)
        && (!whole || want.len() == got.len())
        && want
            .iter()
            .zip(got)
            .take(n)
            .all(|(w, g)| w.0 == g.0 && (w.1 - g.1).abs() <= TOLERANCE_M);
    (!same).then(|| {
        format!(
            "postcodes.io {:?}, we {:?}",
            &want[..want.len().min(n)],
            &got[..got.len().min(n)]
        )
    })
}

async fn server_answers(server: &TestServer, points: &[Point], stage: usize) -> Vec<Vec<(String, f64)>> {
    let client = reqwest::Client::new();
    let (_, radius, limit) = STAGES[stage];
    let mut out = Vec::with_capacity(points.len());
    for chunk in points.chunks(100) {
        let geolocations: Vec<Value> = chunk
            .iter()
            .map(|p| match radius {
                Radius::Metres(m) => {
                    json!({"latitude": p.at.lat, "longitude": p.at.lon, "radius": m, "limit": limit})
                }
                Radius::Widesearch => {
                    json!({"latitude": p.at.lat, "longitude": p.at.lon, "widesearch": true, "limit": limit})
                }
            })
            .collect();
        let body: Value = client
            .post(format!("{}/postcodes", server.url()))
            .json(&json!({ "geolocations": geolocations }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for r in body["result"].as_array().unwrap() {
            out.push(match &r["result"] {
                Value::Null => vec![],
                list => list
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            p["postcode"].as_str().unwrap().to_string(),
                            p["distance"].as_f64().unwrap(),
                        )
                    })
                    .collect(),
            });
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_provider_and_test_server_answer_as_postcodes_io_did() {
    let Some(dir) = data_dir() else {
        eprintln!("skipped: no nspl-latlon.csv.gz and postcodesio-answers.jsonl in POSTCODE_DATA_DIR or ../shared/data");
        return;
    };
    let index =
        Arc::new(OfflineIndex::load_cached(&dir.join("nspl-latlon.csv.gz"), &default_cache_dir()).unwrap());
    let points = read_points(&dir.join("postcodesio-answers.jsonl"));
    assert_eq!(points.len(), 1140);
    let server = TestServer::start(index.clone(), Faults::default()).await.unwrap();
    let ats: Vec<LatLon> = points.iter().map(|p| p.at).collect();
    let mut failures = Vec::new();
    let mut compared = 0;
    for (s, &(name, radius, _)) in STAGES.iter().enumerate() {
        let offline = index.lookup_many(&ats, radius);
        let served = server_answers(&server, &points, s).await;
        for (i, p) in points.iter().enumerate() {
            let ours: Vec<(String, f64)> = offline[i]
                .iter()
                .map(|m| (m.postcode.clone(), m.distance_m))
                .collect();
            if let Some(d) = differences(&p.stages[s], &ours, false) {
                failures.push(format!("offline {name} at {:?}: {d}", p.at));
            }
            if let Some(d) = differences(&p.stages[s], &served[i], true) {
                failures.push(format!("test server {name} at {:?}: {d}", p.at));
            }
            compared += 2;
        }
    }
    for f in failures.iter().take(30) {
        eprintln!("{f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} answers differ from postcodes.io's",
        failures.len()
    );
}
