//! Shared by the storage tests: a fresh, migrated PostgreSQL database per test.

use pipeline::store::{Counts, ImportRecord, Store};
use sqlx::Connection;

/// A new database on the test server (`TEST_DATABASE_URL`, set by `make test`),
/// migrated. Fails when no server is configured: these tests never skip.
pub async fn fresh_pg() -> Store {
    let base = std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL is not set: run the tests with `make test`, which starts PostgreSQL");
    let name = format!(
        "p_{:x}_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
        std::process::id()
    );
    let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let store = Store::connect(&format!("{}/{name}", base.rsplit_once('/').unwrap().0))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
}

/// The import's counts, once the tallies they are read from are checked
/// against a recount of its lookups (`Store::tally_mismatches`).
#[allow(dead_code)] // not every test file counts
pub async fn counted(store: &Store, imp: &ImportRecord) -> Counts {
    let off = store.tally_mismatches(imp.id).await.unwrap();
    assert!(off.is_empty(), "tallies differ from the lookups: {off:?}");
    store.counts(imp).await.unwrap()
}
