//! External API faults, one test each, against a real PostgreSQL: every row
//! still ends `enriched`, `no_match` or `failed` with a reason, and `failed`
//! rows can be retried later.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use common::{counted, fresh_pg};

use std::{sync::Arc, time::Duration};

use pipeline::{
    csv_input::CsvOptions,
    egress::EgressPolicy,
    enrich::{run_shard, Finish, ShardConfig},
    load::{load, Source},
    lookup::SearchPlan,
    offline::OfflineIndex,
    postcodes_io::PostcodesIo,
    retry::RetryPolicy,
    store::{ImportRecord, Store},
};
use postcodes_io_test_server::{Faults, TestServer};

/// Postcodes on a 0.01° grid around London: every test point has one within 100 m.
fn grid_index() -> Arc<OfflineIndex> {
    let mut text = String::from("pcd,lat,long\n");
    for i in 0..40 {
        for j in 0..40 {
            text.push_str(&format!(
                "T{}{} {}AA,{},{}\n",
                i,
                j / 10,
                j % 10,
                51.3 + i as f64 * 0.01,
                -0.4 + j as f64 * 0.01
            ));
        }
    }
    Arc::new(OfflineIndex::from_reader(Box::new(std::io::Cursor::new(text.into_bytes())), "grid").unwrap())
}

/// An import of `n` distinct points near grid postcodes, loaded, one shard.
async fn import(store: &Store, n: usize) -> ImportRecord {
    let mut text = String::from("lat,lon\n");
    for k in 0..n {
        text.push_str(&format!(
            "{},{}\n",
            51.3 + (k % 40) as f64 * 0.01 + 0.00002 * (k / 40) as f64,
            -0.4 + (k / 40 % 40) as f64 * 0.01
        ));
    }
    let path = std::env::temp_dir().join(format!(
        "faults-{}-{:x}.csv",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(&path, text).unwrap();
    let imp = store
        .ensure_import(&path.to_string_lossy(), "faults", "file", 1)
        .await
        .unwrap();
    load(
        store,
        &imp,
        &Source::File(path.clone()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    let _ = std::fs::remove_file(&path);
    store.set_quota(imp.id, 200.0, None).await.unwrap();
    store.import(&imp.uid).await.unwrap().unwrap()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base: Duration::from_millis(20),
        cap: Duration::from_millis(200),
    }
}

async fn enrich(
    store: &Store,
    imp: &ImportRecord,
    url: &str,
    timeout: Duration,
    retry: RetryPolicy,
) -> Finish {
    let provider = Arc::new(PostcodesIo::new(url, timeout));
    let cfg = ShardConfig {
        import_id: imp.id,
        shard: 0,
        plan: SearchPlan::default(),
        retry,
        cache: None,
        concurrency: None,
    };
    run_shard(store, provider, &cfg, |_| {}).await.unwrap()
}

/// Runs 250 points (3 batches of at most 100) with `script` as the first
/// requests' fates and checks that every row ends enriched after exactly
/// `requests` requests (the 3 batches plus the retries the faults cost).
async fn survives(script: &[&str], faults: Faults, requests: u64) -> postcodes_io_test_server::Stats {
    let store = fresh_pg().await;
    let imp = import(&store, 250).await;
    let faults = Faults {
        script: script.iter().map(|s| s.to_string()).collect(),
        ..faults
    };
    let server = TestServer::start(grid_index(), faults).await.unwrap();
    assert_eq!(
        enrich(&store, &imp, &server.url(), Duration::from_secs(2), fast_retry()).await,
        Finish::Done
    );
    let c = counted(&store, &imp).await;
    let mut errors = std::collections::BTreeSet::new();
    store
        .for_each_result(imp.id, |r| {
            errors.extend(r.error);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(
        (c.rows_enriched, c.rows_pending, c.rows_failed),
        (250, 0, 0),
        "{c:?} {errors:?}"
    );
    let st = server.state.stats();
    assert_eq!(st.requests, requests, "{st:?}");
    let q = store.quota_counters(imp.id).await.unwrap();
    assert_eq!(
        q.requests as u64, st.requests,
        "every request went through the quota"
    );
    st
}

#[tokio::test]
async fn http_500_502_503_are_retried() {
    let st = survives(&["500", "502", "503"], Faults::default(), 6).await;
    assert_eq!(st.by_status.get(&500), Some(&1));
    assert_eq!(st.by_status.get(&503), Some(&1));
}

#[tokio::test]
async fn garbage_and_truncated_bodies_are_retried() {
    survives(&["garbage", "truncated", "ok", "garbage"], Faults::default(), 6).await;
}

#[tokio::test]
async fn connection_resets_are_retried() {
    let st = survives(&["reset", "reset"], Faults::default(), 5).await;
    assert_eq!(st.by_status.get(&0), Some(&2));
}

#[tokio::test]
async fn read_timeouts_are_retried() {
    // slower than the client's 2 s timeout
    survives(
        &["slow", "ok", "slow"],
        Faults {
            slow_ms: 3_000,
            ..Faults::default()
        },
        5,
    )
    .await;
}

#[tokio::test]
async fn slow_answers_within_the_timeout_are_waited_for() {
    survives(
        &["slow", "slow"],
        Faults {
            slow_ms: 500,
            ..Faults::default()
        },
        3,
    )
    .await;
}

#[tokio::test]
async fn fewer_answers_than_queries_and_reordered_answers() {
    let st = survives(&["fewer", "reorder", "fewer"], Faults::default(), 4).await;
    // only the rows missing from a short answer are asked again (the server
    // counts them as answered twice: it dropped them from the response itself)
    assert_eq!(st.geolocations, 252, "{st:?}");
    assert_eq!(st.repeated_queries, 2, "{st:?}");
}

#[tokio::test]
async fn http_429_with_retry_after_pauses_every_request() {
    let store = fresh_pg().await;
    let imp = import(&store, 400).await;
    let faults = Faults {
        script: vec!["ok".into(), "429".into()],
        retry_after_s: Some(2),
        ..Faults::default()
    };
    let server = TestServer::start(grid_index(), faults).await.unwrap();
    // two "shards" worth of workers on the same import (same quota row)
    let (s1, s2) = (store.clone(), store.clone());
    let (i1, i2) = (imp.clone(), imp.clone());
    let (u1, u2) = (server.url(), server.url());
    let a = tokio::spawn(async move { enrich(&s1, &i1, &u1, Duration::from_secs(5), fast_retry()).await });
    let b = tokio::spawn(async move { enrich(&s2, &i2, &u2, Duration::from_secs(5), fast_retry()).await });
    assert_eq!(a.await.unwrap(), Finish::Done);
    assert_eq!(b.await.unwrap(), Finish::Done);
    let st = server.state.stats();
    let t429 = st
        .log
        .iter()
        .find(|(_, c)| *c == 429)
        .expect("a 429 was served")
        .0;
    // The other worker may have reserved its slot before the 429 came back:
    // that one request can still arrive; every later one waits for the pause.
    let early: Vec<f64> = st
        .arrivals
        .iter()
        .map(|&t| t - t429)
        .filter(|&d| d > 1e-6 && d < 1.9)
        .collect();
    assert!(
        early.len() <= 1,
        "requests arrived {early:?}s after the 429 (Retry-After 2); only one reserved before it may"
    );
    let q = store.quota_counters(imp.id).await.unwrap();
    assert_eq!(q.throttled, 1);
    assert_eq!(counted(&store, &imp).await.rows_pending, 0);
}

#[tokio::test]
async fn http_429_without_retry_after_backs_off_and_finishes() {
    survives(
        &["429", "429", "429"],
        Faults {
            retry_after_s: None,
            ..Faults::default()
        },
        6,
    )
    .await;
}

#[tokio::test]
async fn an_unreachable_api_fails_rows_with_the_reason_and_they_can_be_retried() {
    let store = fresh_pg().await;
    let imp = import(&store, 150).await;
    // a port nothing listens on
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let finish = enrich(
        &store,
        &imp,
        &format!("http://{closed}"),
        Duration::from_secs(2),
        fast_retry(),
    )
    .await;
    assert_eq!(finish, Finish::Done);
    let c = counted(&store, &imp).await;
    assert_eq!(c.rows_failed, 150, "{c:?}");
    let mut reasons = vec![];
    store
        .for_each_result(imp.id, |r| {
            reasons.push(r.error.unwrap_or_default());
            Ok(())
        })
        .await
        .unwrap();
    assert!(
        reasons
            .iter()
            .all(|e| e.contains("connection failed") && e.contains("after 4 requests")),
        "{:?}",
        &reasons[..2]
    );
    // later, with the API back: only the failed rows are asked, and they finish
    assert_eq!(store.requeue_failed(imp.id).await.unwrap(), 150);
    let server = TestServer::start(grid_index(), Faults::default()).await.unwrap();
    enrich(&store, &imp, &server.url(), Duration::from_secs(2), fast_retry()).await;
    let c = counted(&store, &imp).await;
    assert_eq!((c.rows_enriched, c.rows_failed), (150, 0));
    assert_eq!(server.state.stats().requests, 2);
}

#[tokio::test]
async fn a_spent_budget_stops_with_rows_pending_and_resumes_when_raised() {
    let store = fresh_pg().await;
    let imp = import(&store, 450).await;
    store.set_quota(imp.id, 200.0, Some(2)).await.unwrap();
    let server = TestServer::start(grid_index(), Faults::default()).await.unwrap();
    assert_eq!(
        enrich(&store, &imp, &server.url(), Duration::from_secs(2), fast_retry()).await,
        Finish::QuotaExhausted
    );
    let c = counted(&store, &imp).await;
    assert_eq!((c.rows_enriched, c.rows_pending), (200, 250), "{c:?}");
    assert_eq!(server.state.stats().requests, 2, "the budget is a hard limit");
    store.set_quota(imp.id, 200.0, Some(10)).await.unwrap();
    assert_eq!(
        enrich(&store, &imp, &server.url(), Duration::from_secs(2), fast_retry()).await,
        Finish::Done
    );
    assert_eq!(counted(&store, &imp).await.rows_enriched, 450);
    assert_eq!(server.state.stats().repeated_queries, 0);
}

/// The counts are read from tallies that every write keeps (issue 17): after
/// rows fail, are requeued, are answered by a retry, and after a second import
/// of the same points answered from the kept answers, the tallies equal a
/// recount of the lookups, on both databases.
#[tokio::test]
async fn tallies_follow_every_write_on_both_databases() {
    use pipeline::answer_cache::AnswerCache;
    let dir = std::env::temp_dir().join(format!("faults-tallies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lite = Store::connect(dir.join("tallies.db").to_str().unwrap())
        .await
        .unwrap();
    lite.migrate().await.unwrap();
    for store in [fresh_pg().await, lite] {
        let with_cache = |imp: &ImportRecord, url: &str| {
            let cfg = ShardConfig {
                import_id: imp.id,
                shard: 0,
                plan: SearchPlan::default(),
                retry: fast_retry(),
                cache: AnswerCache::for_api(url, &SearchPlan::default(), 30),
                concurrency: None,
            };
            let (store, url) = (store.clone(), url.to_string());
            async move {
                let provider = Arc::new(PostcodesIo::new(&url, Duration::from_secs(2)));
                run_shard(&store, provider, &cfg, |_| {}).await.unwrap()
            }
        };
        let imp = import(&store, 150).await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        with_cache(&imp, &format!("http://{closed}")).await;
        assert_eq!(counted(&store, &imp).await.rows_failed, 150);
        assert_eq!(store.requeue_failed(imp.id).await.unwrap(), 150);
        let c = counted(&store, &imp).await;
        assert_eq!((c.rows_failed, c.rows_pending), (0, 150), "{c:?}");
        // A failed request, then one answering part of its batch: saves that
        // keep coordinates pending (a retry), then answers.
        let server = TestServer::start(
            grid_index(),
            Faults {
                script: vec!["500".into(), "fewer".into()],
                ..Faults::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(with_cache(&imp, &server.url()).await, Finish::Done);
        let c = counted(&store, &imp).await;
        assert_eq!(
            (c.rows_enriched, c.rows_pending, c.coordinates_done),
            (150, 0, 150),
            "{c:?}"
        );
        let requests = server.state.stats().requests;
        let again = import(&store, 150).await;
        assert_eq!(with_cache(&again, &server.url()).await, Finish::Done);
        assert_eq!(
            server.state.stats().requests,
            requests,
            "answered from the kept answers"
        );
        let c = counted(&store, &again).await;
        assert_eq!((c.rows_enriched, c.rows_pending), (150, 0), "{c:?}");
        let shards = store.shard_counts(again.id).await.unwrap();
        assert_eq!(shards.len(), 1);
        assert_eq!((shards[0].rows, shards[0].done, shards[0].failed), (150, 150, 0));
        if !store.is_postgres() {
            // A writer that did not keep the tallies (an enricher of an earlier
            // version): the shard's next run finds nothing to do and recounts.
            let conn = rusqlite::Connection::open(dir.join("tallies.db")).unwrap();
            conn.execute(
                "INSERT INTO lookup_tallies (import_id, shard, status, coordinates, rows) VALUES (?1, 0, 'pending', 9, 9) ON CONFLICT (import_id, shard, status) DO UPDATE SET coordinates = 9, rows = 9",
                [again.id],
            )
            .unwrap();
            assert!(!store.tally_mismatches(again.id).await.unwrap().is_empty());
            assert_eq!(with_cache(&again, &server.url()).await, Finish::Done);
            assert_eq!(counted(&store, &again).await.rows_pending, 0);
        }
    }
}
