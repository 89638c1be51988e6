//! The exports' joins give exactly the `point_results` view's rows: invalid
//! rows, rows of an unplanned shard, failed and no_match lookups, answers with
//! commas, quotes, tabs, newlines, backslashes and NULLs, shared answers, and
//! an answer too long to pack. SQLite's in-memory and chunked joins are
//! compared with its view; PostgreSQL's in-memory join (at budgets that fit,
//! that fail before reading and that run out while reading) with its
//! server-side join and with SQLite's rows for the same input.
#![allow(clippy::too_many_lines)] // the 80-line limit is for non-test code

mod common;

use std::{path::PathBuf, sync::Arc};

use pipeline::{
    csv_input::CsvOptions,
    egress::EgressPolicy,
    enrich::{run_shard, Finish, ShardConfig},
    load::{load, Source},
    lookup::SearchPlan,
    model::RowStatus,
    offline::OfflineIndex,
    retry::RetryPolicy,
    store::{
        postgres_export::{results_within, Join, PIECE_BYTES},
        sqlite::export::{results, results_by_view, results_in_chunks, JOIN_BUDGET_BYTES},
        ImportRecord, ResultRef, ResultRow, Store,
    },
};

fn temp(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("sqlite-export-{}-{nanos:x}-{name}", std::process::id()))
}

/// Postcodes every 0.01° around London.
fn index() -> Arc<OfflineIndex> {
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

/// Loads 600 rows in 2 shards: coordinates repeated, some invalid, some far
/// from every postcode, -0.0, and user fields that need quoting.
async fn loaded(store: &Store, db: &str) -> ImportRecord {
    let mut text = String::from("id,lat,lon,note\n");
    for k in 0..600 {
        let (lat, lon) = match k % 7 {
            0 => ("not-a-number".to_string(), "1".to_string()),
            1 => ("-0.0".to_string(), "0.0".to_string()),
            2 => ("51.0".to_string(), "-3.0".to_string()), // 50 km from the grid
            _ => (
                format!("{}", 51.4 + (k % 50) as f64 * 0.003),
                format!("{}", -0.2 + (k % 30) as f64 * 0.005),
            ),
        };
        text.push_str(&format!("{k},{lat},{lon},\"note {k}, with \"\"quotes\"\"\"\n"));
    }
    let csv = temp("in.csv");
    std::fs::write(&csv, text).unwrap();
    let imp = store.ensure_import(db, "export", "file", 2).await.unwrap();
    load(
        store,
        &imp,
        &Source::File(csv.clone()),
        &CsvOptions::default(),
        &EgressPolicy::unrestricted(),
    )
    .await
    .unwrap();
    std::fs::remove_file(&csv).unwrap();
    store.import(&imp.uid).await.unwrap().unwrap()
}

/// Enriches shard 0 offline (without widesearch, so the far rows end
/// no_match); shard 1 is never planned.
async fn enrich_shard_0(store: &Store, imp: &ImportRecord) {
    let plan = SearchPlan {
        widesearch: false,
        ..SearchPlan::default()
    };
    let cfg = ShardConfig {
        import_id: imp.id,
        shard: 0,
        plan,
        retry: RetryPolicy::default(),
        cache: None,
        concurrency: None,
    };
    assert_eq!(
        run_shard(store, index(), &cfg, |_| {}).await.unwrap(),
        Finish::Done
    );
}

/// Lookups made to fail, and area values that need quoting or escaping: the
/// same statements on both databases (`chr` is SQLite's `char`).
fn damage(chr: &str) -> [String; 2] {
    [
        "UPDATE lookups SET status = 'failed', postcode = NULL, distance_m = NULL, outcode = NULL, incode = NULL, \
         error = 'HTTP 500, \"oops\"' WHERE (lat, lon) IN \
         (SELECT lat, lon FROM lookups WHERE status = 'enriched' ORDER BY lat, lon LIMIT 3)"
            .to_string(),
        format!(
            "UPDATE lookups SET region = 'London, \"Greater\"', parish = '', \
             msoa = 'tab' || {chr}(9) || 'back\\slash' || {chr}(10) || 'line' || {chr}(13) \
             WHERE postcode IN ('T0 0AA', 'T1 1AA')"
        ),
    ]
}

/// The rows one of the export's joins gives, through `join`'s callback.
fn collect(
    join: impl FnOnce(&mut dyn FnMut(&ResultRef<'_>) -> anyhow::Result<bool>) -> anyhow::Result<()>,
) -> Vec<ResultRow> {
    let mut out = Vec::new();
    join(&mut |r| {
        out.push(ResultRow::from(r));
        Ok(true)
    })
    .unwrap();
    out
}

fn rows(db: &str, import_id: i64, budget: usize) -> Vec<ResultRow> {
    collect(|emit| results(std::path::Path::new(db), import_id, budget, emit))
}

/// The rows by the `point_results` view, the reference.
fn rows_by_view(db: &str, import_id: i64) -> Vec<ResultRow> {
    let conn = rusqlite::Connection::open(db).unwrap();
    collect(|emit| results_by_view(&conn, import_id, emit))
}

/// The rows joined `chunk_rows` at a time.
fn rows_in_chunks(db: &str, import_id: i64, chunk_rows: usize) -> Vec<ResultRow> {
    collect(|emit| results_in_chunks(std::path::Path::new(db), import_id, chunk_rows, emit))
}

/// Every way of joining gives the view's rows: in memory, and chunk by chunk
/// (one row a chunk, chunks that end mid-run of equal coordinates, and the
/// default through a budget too small for memory).
fn assert_every_join_gives_the_views_rows(db: &str, import_id: i64) -> Vec<ResultRow> {
    let by_view = rows_by_view(db, import_id);
    assert_eq!(rows(db, import_id, JOIN_BUDGET_BYTES), by_view, "in memory");
    assert_eq!(rows(db, import_id, 0), by_view, "in chunks (over the budget)");
    for chunk_rows in [1, 7, 64, 599, 600] {
        assert_eq!(
            rows_in_chunks(db, import_id, chunk_rows),
            by_view,
            "{chunk_rows} rows a chunk"
        );
    }
    by_view
}

#[tokio::test]
async fn the_join_in_memory_gives_the_views_rows() {
    let db = temp("store.db").to_string_lossy().to_string();
    let store = Store::connect(&db).await.unwrap();
    store.migrate().await.unwrap();
    let imp = loaded(&store, &db).await;
    enrich_shard_0(&store, &imp).await;
    // Some lookups failed, some with area data that needs quoting, sharing one answer.
    let conn = rusqlite::Connection::open(&db).unwrap();
    for sql in damage("char") {
        conn.execute(&sql, []).unwrap();
    }

    let by_view = assert_every_join_gives_the_views_rows(&db, imp.id);
    assert_eq!(by_view.len(), 600);
    let statuses: std::collections::HashSet<RowStatus> = by_view.iter().map(|r| r.status).collect();
    assert_eq!(statuses, RowStatus::ALL.iter().copied().collect());
    assert!(by_view
        .iter()
        .any(|r| r.area.region.as_deref() == Some("London, \"Greater\"")
            && r.area.parish.as_deref() == Some("")
            && r.area.msoa.as_deref() == Some("tab\tback\\slash\nline\r")));
    assert!(by_view
        .iter()
        .all(|r| r.row_number >= 1 && r.fields.contains("with \"\"quotes\"\"")));
    assert_eq!(
        by_view.iter().map(|r| r.row_number).collect::<Vec<_>>(),
        (1..=600).collect::<Vec<_>>()
    );

    // An error over 64 KiB (packed columns once ended at u16 offsets).
    conn.execute(
        "UPDATE lookups SET error = ?1 WHERE status = 'failed'",
        [&"x".repeat(70_000)],
    )
    .unwrap();
    let by_view = assert_every_join_gives_the_views_rows(&db, imp.id);
    assert!(by_view
        .iter()
        .any(|r| r.error.as_ref().is_some_and(|e| e.len() == 70_000)));
    store.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{suffix}"));
    }
}

/// The rows of PostgreSQL's export with a join budget of `budget` bytes, its
/// copies cut in pieces of `piece_bytes`, and where they were joined.
async fn pg_rows(store: &Store, import_id: i64, budget: usize, piece_bytes: usize) -> (Vec<ResultRow>, Join) {
    let Store::Postgres(pool) = store else {
        panic!("not PostgreSQL")
    };
    let mut out = Vec::new();
    let join = results_within(pool, import_id, budget, piece_bytes, |page: Vec<ResultRow>| {
        out.extend(page);
        Ok(())
    })
    .await
    .unwrap();
    (out, join)
}

/// PostgreSQL's joins (in memory within the budget, by the server beyond it,
/// and the fall back when the budget runs out mid-read) give the rows
/// SQLite's view gives for the same input and the same changes.
#[tokio::test]
async fn the_postgres_joins_give_sqlites_rows() {
    let db = temp("pg-reference.db").to_string_lossy().to_string();
    let sqlite = Store::connect(&db).await.unwrap();
    sqlite.migrate().await.unwrap();
    let pg = common::fresh_pg().await;
    let (s_imp, p_imp) = (loaded(&sqlite, &db).await, loaded(&pg, &db).await);
    enrich_shard_0(&sqlite, &s_imp).await;
    enrich_shard_0(&pg, &p_imp).await;
    let conn = rusqlite::Connection::open(&db).unwrap();
    let Store::Postgres(pool) = &pg else {
        unreachable!()
    };
    for (s_sql, p_sql) in damage("char").into_iter().zip(damage("chr")) {
        conn.execute(&s_sql, []).unwrap();
        sqlx::query(sqlx::AssertSqlSafe(p_sql))
            .execute(pool)
            .await
            .unwrap();
    }

    let mut reference = rows_by_view(&db, s_imp.id);
    for long_error in [false, true] {
        if long_error {
            // An error over 64 KiB (packed columns once ended at u16 offsets).
            let e = "x".repeat(70_000);
            conn.execute("UPDATE lookups SET error = ?1 WHERE status = 'failed'", [&e])
                .unwrap();
            sqlx::query("UPDATE lookups SET error = $1 WHERE status = 'failed'")
                .bind(&e)
                .execute(pool)
                .await
                .unwrap();
            reference = rows_by_view(&db, s_imp.id);
        }
        assert_eq!(reference.len(), 600);
        // Budgets: ample; none (the server joins); just over the coordinate
        // table, so that the answers run out of room while being read.
        // Pieces: a tuple each (both decoders take lookups and rows, rows
        // decoded out of turn wait for the ones before), 1,000 bytes, the default.
        let mut joins = std::collections::HashSet::new();
        for budget in [JOIN_BUDGET_BYTES, 0, 5_000, 10_000, 20_000, 40_000, 80_000] {
            for piece_bytes in [1, 1_000, PIECE_BYTES] {
                let (rows, join) = pg_rows(&pg, p_imp.id, budget, piece_bytes).await;
                assert_eq!(
                    rows, reference,
                    "budget {budget}, pieces of {piece_bytes} bytes, long error {long_error}"
                );
                match budget {
                    JOIN_BUDGET_BYTES => assert_eq!(join, Join::InMemory),
                    0 => assert_eq!(join, Join::ServerOverBudget),
                    _ => {}
                }
                joins.insert(join);
            }
        }
        assert!(
            joins.contains(&Join::ServerOutOfRoom),
            "some budget runs out while the lookups are read: {joins:?}"
        );
    }
    assert!(reference
        .iter()
        .any(|r| r.area.msoa.as_deref() == Some("tab\tback\\slash\nline\r")));
    // A sink that fails (a client gone) ends the export with its error, on either join.
    for budget in [JOIN_BUDGET_BYTES, 0] {
        let err = results_within(pool, p_imp.id, budget, 1, |_: Vec<ResultRow>| {
            anyhow::bail!("the client went away")
        })
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "the client went away");
        // The pool's next user finds its connection as new (a copy left
        // unread would have left messages on it).
        assert_eq!(pg_rows(&pg, p_imp.id, budget, PIECE_BYTES).await.0, reference);
    }
    sqlite.close().await;
    pg.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{suffix}"));
    }
}
