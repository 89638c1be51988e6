//! `lookup_tallies`: the coordinates and rows of each shard's lookups by
//! status, so that an import's counts ([`super::Store::counts`],
//! [`super::Store::shard_counts`]) cost a few rows per shard instead of a
//! `GROUP BY` over all its lookups. The operator reads them on every
//! reconcile of every import (issue 17: operator cost flat in the number of
//! rows and imports).
//!
//! The invariant, for every import, shard and status: the tally holds
//! `COUNT(*)` and `SUM(rows)` of the lookups with that status (a tally moved
//! to zero stays as a zero row). Every statement that writes `lookups` keeps
//! it, in its own transaction:
//!
//! | write | how the tallies follow |
//! |---|---|
//! | planning a shard (pending lookups) | the shard's tallies counted from its new lookups under the plan's lock, in the plan's transaction |
//! | planning and answering a shard at once | the shard's tallies set from the pass's own counts |
//! | saving results, reusing kept answers | coordinates moved out of `pending`: on PostgreSQL in the same statement (a CTE over the `UPDATE … RETURNING`, [`pg_moving`]), on SQLite from the rows the `UPDATE … RETURNING` changed ([`Tally`]) |
//! | requeueing failed work | moved from `failed` to `pending` the same way |
//! | a reload or a deleted import | the import's tallies deleted with its lookups |
//!
//! A writer that does not keep them (an enricher of an earlier version, still
//! running through an upgrade) leaves a shard's tallies counting pending work
//! that is done; the shard's next enricher finds nothing to claim and counts
//! them again ([`super::Store::settle_shard_tallies`]).
//!
//! A save only changes `pending` lookups (a second answer for a coordinate
//! finished meanwhile is dropped), so each update moves a coordinate from a
//! known status. [`super::Store::tally_mismatches`] recounts and compares;
//! the fault and store tests call it after every run.

use std::collections::BTreeMap;

use crate::model::RowStatus;

/// Adds to one tally: `$1` import, `$2` shard, `$3` status, `$4` coordinates,
/// `$5` rows (both dialects).
pub(super) const ADD: &str = "INSERT INTO lookup_tallies (import_id, shard, status, coordinates, rows) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (import_id, shard, status) DO UPDATE SET coordinates = lookup_tallies.coordinates + excluded.coordinates, rows = lookup_tallies.rows + excluded.rows";

/// Deletes the import's tallies (`$1` import), beside the delete of its lookups.
pub(super) const DELETE_IMPORT: &str = "DELETE FROM lookup_tallies WHERE import_id = $1";

/// The shard's tallies counted from its lookups: `$1` import, `$2` shard.
/// Only under the shard's plan lock, before any other writer can see the
/// shard's lookups.
pub(super) const RECOUNT_SHARD: [&str; 2] = [
    "DELETE FROM lookup_tallies WHERE import_id = $1 AND shard = $2",
    "INSERT INTO lookup_tallies (import_id, shard, status, coordinates, rows) SELECT import_id, shard, status, COUNT(*), SUM(rows) FROM lookups WHERE import_id = $1 AND shard = $2 GROUP BY import_id, shard, status",
];

/// `(coordinates, rows)` of one shard from its tallies: `$1` import, `$2` shard.
pub(super) const SHARD_TOTAL: &str = "SELECT CAST(COALESCE(SUM(coordinates), 0) AS BIGINT), CAST(COALESCE(SUM(rows), 0) AS BIGINT) FROM lookup_tallies WHERE import_id = $1 AND shard = $2";

/// `(status, coordinates, rows)` of the import, by status: `$1` import.
pub(super) const BY_STATUS: &str = "SELECT status, CAST(SUM(coordinates) AS BIGINT), CAST(SUM(rows) AS BIGINT) FROM lookup_tallies WHERE import_id = $1 GROUP BY status";

/// `(shard, rows, finished rows, failed rows)` of the import, by shard: `$1` import.
pub(super) const BY_SHARD: &str = "SELECT shard, CAST(SUM(rows) AS BIGINT), CAST(SUM(CASE WHEN status <> 'pending' THEN rows ELSE 0 END) AS BIGINT), CAST(SUM(CASE WHEN status = 'failed' THEN rows ELSE 0 END) AS BIGINT) FROM lookup_tallies WHERE import_id = $1 GROUP BY shard ORDER BY shard";

/// `(shard, status, coordinates, rows)` where the tallies and a recount of the
/// lookups differ (zero tallies match no lookups): `$1` import.
pub(super) const MISMATCHES: &str = "
    WITH counted AS (SELECT shard, status, COUNT(*) AS coordinates, SUM(rows) AS rows FROM lookups WHERE import_id = $1 GROUP BY shard, status),
         kept AS (SELECT shard, status, coordinates, rows FROM lookup_tallies WHERE import_id = $1 AND (coordinates <> 0 OR rows <> 0))
    SELECT k.shard, k.status, CAST(k.coordinates AS BIGINT), CAST(k.rows AS BIGINT), CAST(COALESCE(c.coordinates, 0) AS BIGINT), CAST(COALESCE(c.rows, 0) AS BIGINT)
      FROM kept k LEFT JOIN counted c ON c.shard = k.shard AND c.status = k.status
     WHERE c.shard IS NULL OR c.coordinates <> k.coordinates OR c.rows <> k.rows
    UNION ALL
    SELECT c.shard, c.status, 0, 0, CAST(c.coordinates AS BIGINT), CAST(c.rows AS BIGINT)
      FROM counted c LEFT JOIN kept k ON c.shard = k.shard AND c.status = k.status
     WHERE k.shard IS NULL";

/// `update`, an `UPDATE lookups <alias> … WHERE …` that changes only lookups
/// whose status is `from` (its `WHERE` must say so) and has the import as
/// `$1`, made into one PostgreSQL statement that also moves the tallies of
/// the rows it changed (from `from` to their new status) and returns how many
/// lookups it changed (one `BIGINT`). Data-modifying CTEs run to completion
/// whether the outer query reads them or not; the tallies are upserted in
/// (shard, status) order, so concurrent saves of one shard lock them in the
/// same order.
pub(super) fn pg_moving(update: &str, alias: &str, from: RowStatus) -> String {
    let from = from.as_str();
    format!(
        "WITH moved AS ({update} RETURNING {alias}.shard, {alias}.status, {alias}.rows),
              delta AS (SELECT shard, status, 1::int8 AS c, rows AS r FROM moved
                        UNION ALL SELECT shard, '{from}', -1::int8, -rows FROM moved),
              kept AS (INSERT INTO lookup_tallies (import_id, shard, status, coordinates, rows)
                       SELECT $1, shard, status, SUM(c), SUM(r) FROM delta GROUP BY shard, status ORDER BY shard, status
                       ON CONFLICT (import_id, shard, status) DO UPDATE
                       SET coordinates = lookup_tallies.coordinates + excluded.coordinates, rows = lookup_tallies.rows + excluded.rows)
         SELECT COUNT(*) FROM moved"
    )
}

/// The `RETURNING` clause of an `UPDATE lookups` run by SQLite's `moving`
/// (the shard, new status and rows of each changed lookup).
pub(super) const SQLITE_RETURNING: &str = "RETURNING lookups.shard, lookups.status, lookups.rows";

/// Tally changes gathered while writing lookups on SQLite, written with
/// [`ADD`] before the transaction commits.
#[derive(Debug, Default)]
pub(super) struct Tally(BTreeMap<(i32, &'static str), (i64, i64)>);

impl Tally {
    /// `coordinates` lookups of `rows` rows now have `status` in `shard`.
    pub(super) fn add(&mut self, shard: i32, status: RowStatus, coordinates: i64, rows: i64) {
        let t = self.0.entry((shard, status.as_str())).or_default();
        t.0 += coordinates;
        t.1 += rows;
    }

    /// One lookup of `rows` rows went from `from` to `to`.
    pub(super) fn moved(&mut self, shard: i32, from: RowStatus, to: RowStatus, rows: i64) {
        if from != to {
            self.add(shard, to, 1, rows);
            self.add(shard, from, -1, -rows);
        }
    }

    /// Writes the changes on `tx` for `import_id` (SQLite, in the writer's transaction).
    pub(super) fn write_sqlite(&self, tx: &rusqlite::Connection, import_id: i64) -> rusqlite::Result<()> {
        let mut stmt = tx.prepare_cached(ADD)?;
        for ((shard, status), (coordinates, rows)) in &self.0 {
            stmt.execute(rusqlite::params![import_id, shard, status, coordinates, rows])?;
        }
        Ok(())
    }

    /// The changes as `(shard, status, coordinates, rows)`.
    pub(super) fn entries(&self) -> impl Iterator<Item = (i32, &'static str, i64, i64)> + '_ {
        self.0.iter().map(|((s, st), (c, r))| (*s, *st, *c, *r))
    }
}
