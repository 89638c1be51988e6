//! [`Store`]: imports (create, read, fail, delete) and the load of their rows.

use tokio::sync::mpsc;

use super::{
    on_pool, postgres,
    records::{ImportRecord, LoadCounts, LoadEnd, LoadStart},
    sqlite, Store,
};
use crate::{
    csv_input::{Layout, Row},
    model::ImportPhase,
};

impl Store {
    /// Creates the import if it does not exist (by uid) and returns it.
    pub async fn ensure_import(
        &self,
        uid: &str,
        name: &str,
        source: &str,
        shards: i32,
    ) -> anyhow::Result<ImportRecord> {
        const SQL: &str = "INSERT INTO imports (uid, name, source, shards) VALUES ($1, $2, $3, $4) ON CONFLICT (uid) DO NOTHING";
        on_pool!(self, p => sqlx::query(SQL).bind(uid).bind(name).bind(source).bind(shards).execute(p).await.map(drop))?;
        self.import(uid)
            .await?
            .ok_or_else(|| anyhow::anyhow!("import {uid} vanished"))
    }

    /// The import with this uid, if any.
    pub async fn import(&self, uid: &str) -> anyhow::Result<Option<ImportRecord>> {
        const SQL: &str = "SELECT id, uid, name, source, source_sha256, shards, phase, header, width, lat_index, lon_index, rows_total, rows_invalid, error, warnings FROM imports WHERE uid = $1";
        let record = on_pool!(self, p => sqlx::query_as(SQL).bind(uid).fetch_optional(p).await?);
        Ok(record)
    }

    /// Sets the source (and shard count) of an import that has not loaded yet, or is to be reloaded.
    pub async fn set_import_source(&self, id: i64, source: &str, shards: i32) -> anyhow::Result<()> {
        const SQL: &str = "UPDATE imports SET source = $2, shards = $3 WHERE id = $1";
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(source).bind(shards).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Marks the import failed with a message for the user.
    pub async fn fail_import(&self, id: i64, message: &str) -> anyhow::Result<()> {
        const SQL: &str = "UPDATE imports SET phase = $3, error = $2 WHERE id = $1";
        let failed = ImportPhase::Failed.as_str();
        on_pool!(self, p => sqlx::query(SQL).bind(id).bind(message).bind(failed).execute(p).await.map(drop))?;
        Ok(())
    }

    /// Deletes the import and everything stored for it (rows, lookups, quota).
    pub async fn delete_import(&self, uid: &str) -> anyhow::Result<()> {
        const SQL: [&str; 6] = [
            "DELETE FROM points WHERE import_id = $1",
            "DELETE FROM lookups WHERE import_id = $1",
            super::tallies::DELETE_IMPORT,
            "DELETE FROM shard_plans WHERE import_id = $1",
            "DELETE FROM quotas WHERE import_id = $1",
            "DELETE FROM imports WHERE id = $1",
        ];
        let Some(imp) = self.import(uid).await? else {
            return Ok(());
        };
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for sql in SQL {
                sqlx::query(sql).bind(imp.id).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Replaces the import's rows with the batches received on `rows`: deletes
    /// what an earlier load wrote (rows, lookups, shard plans), writes every row
    /// (PostgreSQL `COPY` in one transaction; SQLite prepared inserts, committed
    /// in chunks while the phase says `Loading`) with its shard
    /// ([`crate::geo::shard_of`]), and sets the phase to `Loaded` with the
    /// source's SHA-256 and the load's warnings that `done` gives once the input is read. The lookups
    /// (one per distinct coordinate) are made by each shard's enricher: see
    /// [`Store::plan_shard`].
    pub async fn load(
        &self,
        import: &ImportRecord,
        layout: &Layout,
        width: usize,
        done: impl std::future::Future<Output = anyhow::Result<LoadEnd>>,
        rows: mpsc::Receiver<Vec<Row>>,
    ) -> anyhow::Result<LoadCounts> {
        let start = LoadStart::of(import, layout, width)?;
        match self {
            Store::Postgres(p) => postgres::load(p, &start, done, rows).await,
            Store::Sqlite(p) => sqlite::load(p, start, done, rows).await,
        }
    }
}
