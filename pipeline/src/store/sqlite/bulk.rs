//! The SQLite store's bulk writes (load, plan, save) on rusqlite: prepared
//! statements stepped row by row on a blocking thread, which is what SQLite is
//! fast at. sqlx's SQLite driver hands every statement and every row across a
//! channel to its worker thread, which made these paths 4–10× slower. Both use
//! the same SQLite library (libsqlite3-sys 0.37) and the same database file;
//! the file's WAL journal lets the connections of several processes share it.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Statement, TransactionBehavior};
use tokio::sync::mpsc;

use crate::{
    csv_input::Row,
    geo::shard_of,
    lookup::Area,
    model::{ImportPhase, RowStatus, Stage},
    store::{
        columns,
        records::{AnswerColumns, Claimed, LoadCounts, LoadEnd, Saved, ShardPlan},
        tallies::{self, Tally},
    },
};

const PLANNED: &str = "SELECT coordinates, rows FROM shard_plans WHERE import_id = ?1 AND shard = ?2";
const RECORD_PLAN: &str = "INSERT INTO shard_plans (import_id, shard, coordinates, rows) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING";

/// Opens a connection to the store's file with the pragmas every bulk path wants:
/// a 60 s wait for other processes' writes ([`wait_for_lock`]) and a 32 MiB page cache, so
/// memory stays flat at any file size. No memory-mapped I/O: mapped pages of
/// the file count as the process's resident memory, which then grew with the
/// file (+100 MB for an enricher at 1M rows), for about 0.5 s less export time.
pub(super) fn open(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
    conn.busy_handler(Some(wait_for_lock))?;
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA cache_size = -32768; PRAGMA mmap_size = 0; PRAGMA temp_store = FILE;")?;
    Ok(conn)
}

/// SQLite's busy handler for the bulk connections: retry every millisecond for
/// up to 60 s. SQLite's own `busy_timeout` sleeps in growing steps of up to
/// 100 ms, so with four enrichers taking turns at the write lock a waiting one
/// often slept on long after the lock was free (the enrich phase of a 1M-row
/// run kept the 2 cores 68% busy).
fn wait_for_lock(attempts: i32) -> bool {
    std::thread::sleep(std::time::Duration::from_millis(1));
    attempts < 60_000
}

/// Binds [`columns::ANSWER`] from parameter `first`.
fn bind_answer(stmt: &mut Statement<'_>, first: usize, c: &AnswerColumns<'_>) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(first, c.status.as_str())?;
    stmt.raw_bind_parameter(first + 1, c.postcode())?;
    stmt.raw_bind_parameter(first + 2, c.distance_m())?;
    stmt.raw_bind_parameter(first + 3, c.raw())?;
    stmt.raw_bind_parameter(first + 4, c.error)?;
    for i in 0..Area::COLUMNS.len() {
        stmt.raw_bind_parameter(first + 5 + i, c.area(i))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- load

/// Step 1 of a SQLite load: in chunks of committed transactions, inserts every
/// row received on `rows` into `points`. Returns the connection for
/// [`finish_load`].
pub(super) fn insert_points(
    path: &Path,
    import_id: i64,
    shards: u32,
    mut rows: mpsc::Receiver<Vec<Row>>,
) -> anyhow::Result<(Connection, LoadCounts)> {
    let conn = open(path)?;
    // One checkpoint at the end instead of one every 1000 pages: each page is
    // then copied from the WAL into the database once.
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
    let mut counts = LoadCounts::default();
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let mut in_tx = 0usize;
    {
        // Rows go in [`ROWS_A_STATEMENT`] at a time: a statement's own cost
        // (start, cursor, reset, unbind) was a fifth of the load's CPU one row a statement.
        let mut many = conn.prepare(&insert_points_sql(ROWS_A_STATEMENT))?;
        let mut one = conn.prepare(&insert_points_sql(1))?;
        while let Some(batch) = rows.blocking_recv() {
            let mut chunks = batch.chunks_exact(ROWS_A_STATEMENT);
            for chunk in &mut chunks {
                for (i, r) in chunk.iter().enumerate() {
                    bind_point(&mut many, i * POINT_COLUMNS, import_id, shards, r, &mut counts)?;
                }
                many.raw_execute()?;
            }
            for r in chunks.remainder() {
                bind_point(&mut one, 0, import_id, shards, r, &mut counts)?;
                one.raw_execute()?;
            }
            in_tx += batch.len();
            if in_tx >= 500_000 {
                conn.execute_batch("COMMIT; BEGIN IMMEDIATE")?;
                in_tx = 0;
            }
        }
    }
    conn.execute_batch("COMMIT")?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok((conn, counts))
}

/// Step 2 of a SQLite load: the import is `Loaded`, with its counts and the source's SHA-256.
pub(super) fn finish_load(
    conn: &Connection,
    id: i64,
    counts: LoadCounts,
    end: &LoadEnd,
) -> anyhow::Result<()> {
    const DONE: &str = "UPDATE imports SET phase = ?5, rows_total = ?2, rows_invalid = ?3, source_sha256 = ?4, warnings = ?6 WHERE id = ?1";
    conn.execute(
        DONE,
        params![
            id,
            counts.rows,
            counts.invalid,
            end.sha256,
            ImportPhase::Loaded.as_str(),
            end.warnings
        ],
    )?;
    Ok(())
}

/// Rows an `INSERT INTO points` statement of [`insert_points`] takes (9 × 64
/// parameters, well under SQLite's limit of 32766).
const ROWS_A_STATEMENT: usize = 64;
const POINT_COLUMNS: usize = 9;

fn insert_points_sql(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            format!(
                "({})",
                (1..=POINT_COLUMNS)
                    .map(|c| format!("?{}", r * POINT_COLUMNS + c))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    format!(
        "INSERT INTO points (import_id, row_number, line, fields, lat, lon, shard, status, error) VALUES {}",
        values.join(", ")
    )
}

/// Binds one row's 9 columns from parameter `at + 1`, counting it.
fn bind_point(
    stmt: &mut Statement<'_>,
    at: usize,
    import_id: i64,
    shards: u32,
    r: &Row,
    counts: &mut LoadCounts,
) -> rusqlite::Result<()> {
    counts.rows += 1;
    stmt.raw_bind_parameter(at + 1, import_id)?;
    stmt.raw_bind_parameter(at + 2, r.row_number as i64)?;
    stmt.raw_bind_parameter(at + 3, r.line as i64)?;
    stmt.raw_bind_parameter(at + 4, r.fields.as_str())?;
    match &r.coordinate {
        Ok((lat, lon)) => {
            stmt.raw_bind_parameter(at + 5, lat)?;
            stmt.raw_bind_parameter(at + 6, lon)?;
            stmt.raw_bind_parameter(at + 7, shard_of(*lat, *lon, shards) as i32)?;
            stmt.raw_bind_parameter(at + 8, RowStatus::Pending.as_str())?;
            stmt.raw_bind_parameter(at + 9, None::<&str>)?;
        }
        Err(e) => {
            counts.invalid += 1;
            stmt.raw_bind_parameter(at + 5, None::<f64>)?;
            stmt.raw_bind_parameter(at + 6, None::<f64>)?;
            stmt.raw_bind_parameter(at + 7, None::<i32>)?;
            stmt.raw_bind_parameter(at + 8, RowStatus::Invalid.as_str())?;
            stmt.raw_bind_parameter(at + 9, e.as_str())?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- plan

/// [`crate::store::Store::plan_shard`] on SQLite, in one `BEGIN IMMEDIATE` transaction
/// (a deferred one could not wait for the write lock it upgrades to).
pub(super) fn plan_shard(path: &Path, import_id: i64, shard: i32) -> anyhow::Result<ShardPlan> {
    const PLAN: &str = "INSERT INTO lookups (import_id, lat, lon, shard, rows) SELECT import_id, lat, lon, shard, COUNT(*) FROM points WHERE import_id = ?1 AND shard = ?2 AND status = 'pending' GROUP BY import_id, shard, lat, lon ON CONFLICT DO NOTHING";
    let mut conn = open(path)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let planned = tx
        .query_row(PLANNED, params![import_id, shard], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((coordinates, rows)) = planned {
        return Ok(ShardPlan { coordinates, rows });
    }
    tx.execute(PLAN, params![import_id, shard])?;
    for sql in tallies::RECOUNT_SHARD {
        tx.execute(sql, params![import_id, shard])?;
    }
    let (coordinates, rows): (i64, i64) =
        tx.query_row(tallies::SHARD_TOTAL, params![import_id, shard], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    tx.execute(RECORD_PLAN, params![import_id, shard, coordinates, rows])?;
    tx.commit()?;
    Ok(ShardPlan { coordinates, rows })
}

/// Coordinates [`plan_shard_answered`] answers and writes a transaction.
const ANSWERED_BATCH: usize = 4096;

/// Plans a shard and answers it in the same pass, for a provider that answers at
/// once (the offline index): the shard's distinct coordinates are read in
/// (latitude, longitude) order and written as finished lookups, 4096 a
/// transaction, then the plan is recorded from the pass's own counts. Half the
/// writes of planning pending lookups and updating each. Killed midway, no plan
/// is recorded: the next run repeats the pass, keeping the lookups already
/// written (`ON CONFLICT DO NOTHING`). Returns `None` when the shard was
/// already planned.
pub(super) fn plan_shard_answered(
    path: &Path,
    import_id: i64,
    shard: i32,
    answer: impl Fn(&[Claimed]) -> Vec<Saved>,
) -> anyhow::Result<Option<ShardPlan>> {
    const DISTINCT: &str = "SELECT lat, lon, COUNT(*) FROM points WHERE import_id = ?1 AND shard = ?2 AND status = 'pending' GROUP BY lat, lon ORDER BY lat, lon";
    let reader = open(path)?;
    let writer = open(path)?;
    // This process also holds the postcode index: smaller caches keep it flat
    // (the reader's sort spills to disk; the writer appends in key order).
    reader.execute_batch("PRAGMA cache_size = -8192")?;
    writer.execute_batch("PRAGMA cache_size = -8192")?;
    if writer
        .query_row(PLANNED, params![import_id, shard], |_| Ok(()))
        .optional()?
        .is_some()
    {
        return Ok(None);
    }
    let mut out = AnsweredWriter::new(writer, import_id, shard, answer);
    match shard_coordinates(&reader, import_id, shard)? {
        Some(sorted) => {
            drop(reader); // no read transaction held open while writing
            for run in sorted.chunk_by(|a, b| a == b) {
                out.feed(run[0].0, run[0].1, run.len() as i64)?;
            }
        }
        None => {
            let mut stmt = reader.prepare(DISTINCT)?;
            let mut rows = stmt.query(params![import_id, shard])?;
            while let Some(r) = rows.next()? {
                out.feed(r.get(0)?, r.get(1)?, r.get(2)?)?;
            }
        }
    }
    out.finish().map(Some)
}

/// The writing side of [`plan_shard_answered`]: gathers coordinates, answers
/// and inserts them a batch at a time, and finally records the plan.
struct AnsweredWriter<F> {
    conn: Connection,
    sql: String,
    import_id: i64,
    shard: i32,
    answer: F,
    batch: Vec<Claimed>,
    rows: Vec<i64>,
    plan: ShardPlan,
}

impl<F: Fn(&[Claimed]) -> Vec<Saved>> AnsweredWriter<F> {
    fn new(conn: Connection, import_id: i64, shard: i32, answer: F) -> Self {
        // ?1 import, ?2 shard, ?3 lat, ?4 lon, ?5 rows, ?6 attempts, then the answer from ?7.
        let answer_columns = &*columns::ANSWER;
        let values: Vec<String> = (1..=6 + answer_columns.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "INSERT INTO lookups (import_id, shard, lat, lon, rows, attempts, {}) VALUES ({}) ON CONFLICT DO NOTHING",
            answer_columns.join(", "),
            values.join(", ")
        );
        AnsweredWriter {
            conn,
            sql,
            import_id,
            shard,
            answer,
            batch: Vec::with_capacity(ANSWERED_BATCH),
            rows: Vec::with_capacity(ANSWERED_BATCH),
            plan: ShardPlan::default(),
        }
    }

    /// Adds a distinct coordinate of `rows` rows.
    fn feed(&mut self, lat: f64, lon: f64, rows: i64) -> anyhow::Result<()> {
        self.batch.push(Claimed {
            lat,
            lon,
            stage: Stage::Radius,
            attempts: 0,
        });
        self.rows.push(rows);
        if self.batch.len() == ANSWERED_BATCH {
            self.write()?;
        }
        Ok(())
    }

    /// Answers and inserts the batch in one transaction.
    fn write(&mut self) -> anyhow::Result<()> {
        self.plan.coordinates += self.batch.len() as i64;
        self.plan.rows += self.rows.iter().sum::<i64>();
        let results = (self.answer)(&self.batch);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut tally = Tally::default();
            let mut ins = tx.prepare_cached(&self.sql)?;
            for (s, n) in results.iter().zip(self.rows.iter()) {
                ins.raw_bind_parameter(1, self.import_id)?;
                ins.raw_bind_parameter(2, self.shard)?;
                ins.raw_bind_parameter(3, s.lat)?;
                ins.raw_bind_parameter(4, s.lon)?;
                ins.raw_bind_parameter(5, n)?;
                ins.raw_bind_parameter(6, s.attempts)?;
                let c = AnswerColumns::of(s);
                bind_answer(&mut ins, 7, &c)?;
                // 0 for a lookup an earlier, killed pass wrote (and tallied)
                if ins.raw_execute()? == 1 {
                    tally.add(self.shard, c.status, 1, *n);
                }
            }
            tally.write_sqlite(&tx, self.import_id)?;
        }
        tx.commit()?;
        self.batch.clear();
        self.rows.clear();
        Ok(())
    }

    /// Writes what is left and records the plan. Every distinct coordinate of
    /// the shard now has its lookup (written by this pass or, after a kill, by
    /// an earlier one of the same set), so the counts of this pass are the plan.
    fn finish(mut self) -> anyhow::Result<ShardPlan> {
        if !self.batch.is_empty() {
            self.write()?;
        }
        let (import_id, shard, plan) = (self.import_id, self.shard, self.plan);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if tx
            .query_row(PLANNED, params![import_id, shard], |_| Ok(()))
            .optional()?
            .is_none()
        {
            tx.execute(
                RECORD_PLAN,
                params![import_id, shard, plan.coordinates, plan.rows],
            )?;
        }
        tx.commit()?;
        Ok(plan)
    }
}

/// Runs `sql`, an `UPDATE lookups … RETURNING lookups.shard, lookups.status,
/// lookups.rows` that changes only lookups whose status is `from`, with
/// `params`, and moves their tallies, in one `BEGIN IMMEDIATE` transaction;
/// returns how many lookups changed.
pub(super) fn moving(
    path: &Path,
    import_id: i64,
    sql: &str,
    params: Vec<rusqlite::types::Value>,
    from: RowStatus,
) -> anyhow::Result<u64> {
    let mut conn = open(path)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut n = 0;
    {
        let mut tally = Tally::default();
        let mut stmt = tx.prepare(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        while let Some(r) = rows.next()? {
            let to: String = r.get(1)?;
            tally.moved(r.get(0)?, from, to.parse()?, r.get(2)?);
            n += 1;
        }
        drop(rows);
        tally.write_sqlite(&tx, import_id)?;
    }
    tx.commit()?;
    Ok(n)
}

/// Rows of a shard whose coordinates [`shard_coordinates`] sorts in memory
/// (16 bytes each: 48 MiB, a quarter of a 12M-row file); a larger shard is
/// grouped by SQLite's sorter, which spills to disk.
const SHARD_IN_MEMORY_ROWS: usize = 3 << 20;

/// The coordinates of a shard's pending rows in (latitude, longitude) order,
/// equal ones together, as `GROUP BY lat, lon` meets them; `None` when the
/// shard has more than [`SHARD_IN_MEMORY_ROWS`] rows. Sorting in memory takes
/// a tenth of the CPU of SQLite's sorter (about 0.05 s against 0.5 s for a
/// 250k-row shard).
fn shard_coordinates(
    conn: &Connection,
    import_id: i64,
    shard: i32,
) -> anyhow::Result<Option<Vec<(f64, f64)>>> {
    const SQL: &str =
        "SELECT lat, lon FROM points WHERE import_id = ?1 AND shard = ?2 AND status = 'pending'";
    let mut stmt = conn.prepare(SQL)?;
    let mut rows = stmt.query(params![import_id, shard])?;
    // Sized once from the import's rows over its shards (shards are a hash
    // partition, so near equal), grown at most to the cap: never more than 48 MiB.
    let estimate: i64 = conn
        .query_row(
            "SELECT rows_total / MAX(shards, 1) FROM imports WHERE id = ?1",
            [import_id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let mut all: Vec<(f64, f64)> = Vec::with_capacity(
        (estimate.max(0) as usize + estimate.max(0) as usize / 16).min(SHARD_IN_MEMORY_ROWS),
    );
    while let Some(r) = rows.next()? {
        if all.len() == all.capacity() {
            if all.len() >= SHARD_IN_MEMORY_ROWS {
                return Ok(None); // read again by SQL: only shards of files over about 12M rows
            }
            all.reserve_exact((all.len() * 2).clamp(1024, SHARD_IN_MEMORY_ROWS) - all.len());
        }
        // + 0.0 makes −0.0 +0.0: SQL groups them as one value.
        all.push((r.get::<_, f64>(0)? + 0.0, r.get::<_, f64>(1)? + 0.0));
    }
    all.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    Ok(Some(all))
}

// ---------------------------------------------------------------- save

/// Writes a batch of results in one transaction (one prepared UPDATE a
/// coordinate). Only pending lookups change (a second answer for a coordinate
/// finished meanwhile is dropped); their tallies move in the same transaction.
pub(super) fn save(path: &Path, import_id: i64, results: &[Saved]) -> anyhow::Result<()> {
    // ?1 import, ?2 lat, ?3 lon, ?4 attempts, ?5 stage, then the answer from ?6.
    let assignments: Vec<String> = columns::ANSWER
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} = ?{}", 6 + i))
        .collect();
    let sql = format!(
        "UPDATE lookups SET stage = COALESCE(?5, stage), attempts = ?4, {} WHERE import_id = ?1 AND lat = ?2 AND lon = ?3 AND status = 'pending' RETURNING shard, rows",
        assignments.join(", ")
    );
    let mut conn = open(path)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut tally = Tally::default();
        let mut stmt = tx.prepare(&sql)?;
        for s in results {
            let c = AnswerColumns::of(s);
            stmt.raw_bind_parameter(1, import_id)?;
            stmt.raw_bind_parameter(2, s.lat)?;
            stmt.raw_bind_parameter(3, s.lon)?;
            stmt.raw_bind_parameter(4, s.attempts)?;
            stmt.raw_bind_parameter(5, c.stage())?;
            bind_answer(&mut stmt, 6, &c)?;
            let mut changed = stmt.raw_query();
            if let Some(row) = changed.next()? {
                tally.moved(row.get(0)?, RowStatus::Pending, c.status, row.get(1)?);
            }
        }
        tally.write_sqlite(&tx, import_id)?;
    }
    tx.commit()?;
    Ok(())
}
