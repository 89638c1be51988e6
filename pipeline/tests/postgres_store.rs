//! Storage against a real PostgreSQL (`TEST_DATABASE_URL`, started by `make test`):
//! COPY load and reload, claims with SKIP LOCKED, resume after a lost batch, and
//! four concurrent shards drawing on one quota; offline shards answered in one
//! pass (planned and answered by COPY) give SQLite's output byte for byte.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use common::{counted, fresh_pg};

use std::{io::Write, sync::Arc};

use pipeline::{
    csv_input::CsvOptions,
    egress::EgressPolicy,
    enrich::{run_shard, ShardConfig},
    load::{load, Source},
    lookup::SearchPlan,
    model::{ImportPhase, Stage},
    offline::OfflineIndex,
    postcodes_io::PostcodesIo,
    quota::Slot,
    retry::RetryPolicy,
    store::{Outcome, Saved, ShardPlan},
};
use postcodes_io_test_server::{Faults, TestServer};

fn csv_file(text: &str) -> tempfile_path::Path {
    tempfile_path::Path::with(text)
}

/// A tiny self-deleting temp file.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Path {
        pub fn with(text: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "pg-store-{:x}.csv",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::write(&p, text).unwrap();
            Self(p)
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn tiny_index() -> Arc<OfflineIndex> {
    let text = "pcd,lat,long\nAB1 0AA,51.5000,-0.1000\nAB1 0AB,51.5100,-0.1000\nAB1 0AD,52.0000,-1.0000\n";
    Arc::new(
        OfflineIndex::from_reader(Box::new(std::io::Cursor::new(text.as_bytes().to_vec())), "tiny").unwrap(),
    )
}

#[tokio::test]
async fn copy_load_counts_every_row_and_a_reload_replaces() {
    let store = fresh_pg().await;
    let mut text = String::from("id;lat;lon;note\n");
    for i in 0..25_000 {
        text.push_str(&format!(
            "{i};{};{};\"tab\there, back\\slash\"\n",
            51.0 + (i % 1000) as f64 * 1e-3,
            -0.5
        ));
    }
    text.push_str("x;abc;1;bad\n");
    let f = csv_file(&text);
    let imp = store.ensure_import("u1", "t", "file", 4).await.unwrap();
    let c = load(
        &store,
        &imp,
        &Source::File(f.0.clone()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    assert_eq!((c.rows, c.invalid), (25_001, 1));
    // reload: replaced, not duplicated
    let c2 = load(
        &store,
        &imp,
        &Source::File(f.0.clone()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    assert_eq!(c, c2);
    let imp = store.import("u1").await.unwrap().unwrap();
    assert_eq!(
        (imp.phase, imp.rows_total, imp.rows_invalid),
        (ImportPhase::Loaded, 25_001, 1)
    );
    let counts = counted(&store, &imp).await;
    assert_eq!(
        (counts.rows_pending, counts.coordinates_total),
        (25_000, 0),
        "no shard planned yet"
    );
    let mut planned = ShardPlan::default();
    for shard in 0..4 {
        let p = store.plan_shard(imp.id, shard).await.unwrap();
        assert_eq!(store.plan_shard(imp.id, shard).await.unwrap(), p, "planned once");
        planned.coordinates += p.coordinates;
        planned.rows += p.rows;
    }
    assert_eq!((planned.coordinates, planned.rows), (1000, 25_000));
    let counts = counted(&store, &imp).await;
    assert_eq!((counts.rows_pending, counts.coordinates_total), (25_000, 1000));
    // the user's fields survive COPY escaping
    let mut first = None;
    store
        .for_each_result(imp.id, |r| {
            if first.is_none() {
                first = Some(r);
            }
            Ok(())
        })
        .await
        .unwrap();
    // (the stored record ends with the `extra_fields` field, empty here)
    assert_eq!(first.unwrap().fields, "0,51,-0.5,\"tab\there, back\\slash\",");
}

#[tokio::test]
async fn a_failed_parse_leaves_the_previous_load_alone() {
    let store = fresh_pg().await;
    let good = csv_file("lat,lon\n51.5,-0.1\n");
    let imp = store.ensure_import("u2", "t", "file", 1).await.unwrap();
    load(
        &store,
        &imp,
        &Source::File(good.0.clone()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    let err = load(
        &store,
        &imp,
        &Source::File("/nonexistent.csv".into()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert_eq!(store.import("u2").await.unwrap().unwrap().rows_total, 1);
}

#[tokio::test]
async fn claims_skip_locked_rows_and_a_lost_batch_is_claimed_again() {
    let store = fresh_pg().await;
    let mut text = String::from("lat,lon\n");
    for i in 0..300 {
        text.push_str(&format!("{},{}\n", 50.0 + i as f64 * 1e-3, -1.0));
    }
    let f = csv_file(&text);
    let imp = store.ensure_import("u3", "t", "file", 1).await.unwrap();
    load(
        &store,
        &imp,
        &Source::File(f.0.clone()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    store.plan_shard(imp.id, 0).await.unwrap();
    let a = store.claim(imp.id, 0, Stage::Radius, 100).await.unwrap();
    let b = store.claim(imp.id, 0, Stage::Radius, 100).await.unwrap();
    let sa: Vec<_> = a.items.iter().map(|c| c.lat.to_bits()).collect();
    assert_eq!(a.items.len(), 100);
    assert_eq!(b.items.len(), 100);
    assert!(
        b.items.iter().all(|c| !sa.contains(&c.lat.to_bits())),
        "claims overlap"
    );
    // a is saved, b is lost (its enricher died): b's rows are pending again
    let saved: Vec<Saved> = a
        .items
        .iter()
        .map(|c| Saved {
            lat: c.lat,
            lon: c.lon,
            attempts: 1,
            outcome: Outcome::NoMatch,
        })
        .collect();
    store.save(a, &saved).await.unwrap();
    drop(b);
    assert_eq!(store.pending(imp.id, Some(0)).await.unwrap(), 200);
    let c = store.claim(imp.id, 0, Stage::Radius, 500).await.unwrap();
    assert_eq!(c.items.len(), 200);
    assert!(
        c.items.iter().all(|x| !sa.contains(&x.lat.to_bits())),
        "a finished batch was claimed again"
    );
}

#[tokio::test]
async fn four_shards_share_one_quota_and_finish_every_row() {
    let store = fresh_pg().await;
    let mut text = String::from("lat,lon\n");
    for i in 0..4_000 {
        text.push_str(&format!("{},{}\n", 51.5 + (i % 2000) as f64 * 1e-5, -0.1));
    }
    let f = csv_file(&text);
    let imp = store.ensure_import("u4", "t", "file", 4).await.unwrap();
    let c = load(
        &store,
        &imp,
        &Source::File(f.0.clone()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    assert_eq!(c.rows, 4000);
    // server limit = quota: any overshoot would show as a 429
    let server = TestServer::start(
        tiny_index(),
        Faults {
            rate_limit: Some(10),
            retry_after_s: Some(1),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    store.set_quota(imp.id, 10.0, None).await.unwrap();
    let api = PostcodesIo::new(&server.url(), std::time::Duration::from_secs(10));
    let mut tasks = vec![];
    for shard in 0..4 {
        let (store, provider) = (store.clone(), Arc::new(api.clone()));
        let cfg = ShardConfig {
            import_id: imp.id,
            shard,
            plan: SearchPlan::default(),
            retry: RetryPolicy::default(),
            cache: None,
            concurrency: None,
        };
        tasks.push(tokio::spawn(async move {
            run_shard(&store, provider, &cfg, |_| {}).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let st = server.state.stats();
    assert_eq!(st.by_status.get(&429), None, "{st:?}");
    assert!(st.max_per_second <= 10, "{st:?}");
    let counts = counted(&store, &imp).await;
    assert_eq!(counts.rows_pending, 0);
    assert_eq!(counts.rows_enriched + counts.rows_no_match, 4_000);
    assert_eq!(
        store.quota_counters(imp.id).await.unwrap().requests as u64,
        st.requests
    );
}

#[tokio::test]
async fn the_budget_stops_reservations() {
    let store = fresh_pg().await;
    let imp = store.ensure_import("u5", "t", "file", 1).await.unwrap();
    store.set_quota(imp.id, 1000.0, Some(3)).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(store.reserve(imp.id).await.unwrap(), Slot::At { .. }));
    }
    assert_eq!(store.reserve(imp.id).await.unwrap(), Slot::Exhausted);
    assert!(store.budget_spent(imp.id).await.unwrap());
    store.set_quota(imp.id, 1000.0, Some(4)).await.unwrap();
    assert!(matches!(store.reserve(imp.id).await.unwrap(), Slot::At { .. }));
    let _ = std::io::stdout().flush();
}

/// Postcodes every 0.01° around London.
fn grid_index() -> Arc<OfflineIndex> {
    let mut text = String::from("pcd,lat,long\n");
    for i in 0..20 {
        for j in 0..20 {
            text.push_str(&format!(
                "T{i} {j}AA,{},{}\n",
                51.4 + i as f64 * 0.01,
                -0.2 + j as f64 * 0.01
            ));
        }
    }
    Arc::new(OfflineIndex::from_reader(Box::new(std::io::Cursor::new(text.into_bytes())), "grid").unwrap())
}

/// Loads `text` into a new import of `shards` shards on `store`, enriches every
/// shard with the offline index (twice: the second run finds each shard
/// planned) and returns the enriched CSV and a sample of 100 points
/// ([`pipeline::store::Store::point_sample`]).
async fn enriched_offline(
    store: &pipeline::store::Store,
    text: &str,
    shards: i32,
) -> (Vec<u8>, Vec<(f64, f64, String)>) {
    let f = csv_file(text);
    let imp = store
        .ensure_import("offline", "t", f.0.to_str().unwrap(), shards)
        .await
        .unwrap();
    load(
        store,
        &imp,
        &Source::File(f.0.clone()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    let plan = SearchPlan {
        widesearch: false,
        ..SearchPlan::default()
    };
    for _ in 0..2 {
        for shard in 0..shards {
            let cfg = ShardConfig {
                import_id: imp.id,
                shard,
                plan,
                retry: RetryPolicy::default(),
                cache: None,
                concurrency: None,
            };
            run_shard(store, grid_index(), &cfg, |_| {}).await.unwrap();
        }
    }
    let imp = store.import("offline").await.unwrap().unwrap();
    let counts = counted(store, &imp).await;
    assert_eq!(counts.rows_pending, 0, "{counts:?}");
    let mut out = vec![];
    pipeline::export::write_csv(store, &imp, &mut out).await.unwrap();
    let rows_total = counts.rows_total;
    let sample = store.point_sample(imp.id, rows_total, 100).await.unwrap();
    (out, sample)
}

#[tokio::test]
async fn offline_shards_answered_in_one_pass_match_sqlite_byte_for_byte() {
    // Repeated coordinates, -0.0, rows far from every postcode, invalid rows,
    // and user fields with quotes, tabs, backslashes and non-ASCII text.
    let mut text = String::from("id,lat,lon,note\n");
    for k in 0..3000 {
        let (lat, lon) = match k % 7 {
            0 => ("x".to_string(), "1".to_string()),
            1 => ("-0.0".to_string(), "0.0".to_string()),
            2 => ("51.0".to_string(), "-3.0".to_string()),
            _ => (
                format!("{}", 51.4 + (k % 97) as f64 * 0.002),
                format!("{}", -0.2 + (k % 53) as f64 * 0.003),
            ),
        };
        text.push_str(&format!("{k},{lat},{lon},\"n\t{k} \\ é, \"\"q\"\"\"\n"));
    }
    let pg = fresh_pg().await;
    let (on_pg, pg_sample) = enriched_offline(&pg, &text, 4).await;
    let db = std::env::temp_dir().join(format!("pg-store-offline-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let lite = pipeline::store::Store::connect(db.to_str().unwrap())
        .await
        .unwrap();
    lite.migrate().await.unwrap();
    let (on_lite, lite_sample) = enriched_offline(&lite, &text, 4).await;
    let _ = std::fs::remove_file(&db);
    assert_eq!(String::from_utf8_lossy(&on_pg), String::from_utf8_lossy(&on_lite));
    // every 30th of the 3,000 rows, less those whose coordinate did not parse
    assert_eq!(pg_sample, lite_sample);
    assert!((80..=100).contains(&pg_sample.len()), "{}", pg_sample.len());
    for status in ["enriched", "no_match"] {
        assert!(pg_sample.iter().any(|p| p.2 == status), "{status}: {pg_sample:?}");
    }
    let out = String::from_utf8(on_pg).unwrap();
    assert_eq!(out.lines().count(), 3001);
    for status in [",enriched,", ",no_match,", ",invalid,"] {
        assert!(out.contains(status), "{status}");
    }
}
