//! The SQLite store's bulk paths (load, save, export) on rusqlite: prepared
//! statements stepped row by row on a blocking thread, which is what SQLite is
//! fast at. sqlx's SQLite driver hands every statement and every row across a
//! channel to its worker thread, which made these paths 4–10× slower
//! (measured in BENCHMARKS.md). Both use the same SQLite library
//! (libsqlite3-sys 0.37) and the same database file; the file's WAL journal
//! lets the connections of several processes share it.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::mpsc;

use crate::{
    csv_input::Row,
    db::{Claimed, Cols, LoadCounts, Saved, ShardPlan, PLAN, PLANNED, PLAN_COUNT, RECORD_PLAN},
    geo::shard_of,
    lookup::Area,
};

/// Opens a connection to the store's file with the pragmas every bulk path wants:
/// a 60 s wait for other processes' writes ([`wait_for_lock`]) and a 32 MiB page cache, so
/// memory stays flat at any file size. No memory-mapped I/O: mapped pages of
/// the file count as the process's resident memory, which then grew with the
/// file (+100 MB for an enricher at 1M rows), for about 0.5 s less export time.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
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

/// The result columns of a lookup, in this order from parameter `first`:
/// status, postcode, distance_m, result, error, then [`Area::COLUMNS`].
const ANSWER_COLUMNS: [&str; 5] = ["status", "postcode", "distance_m", "result", "error"];

fn bind_answer(stmt: &mut rusqlite::Statement<'_>, first: usize, c: &Cols<'_>) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(first, c.status)?;
    stmt.raw_bind_parameter(first + 1, c.m.map(|m| m.postcode.as_str()))?;
    stmt.raw_bind_parameter(first + 2, c.m.map(|m| m.distance_m))?;
    stmt.raw_bind_parameter(first + 3, c.m.and_then(|m| m.raw.as_deref()))?;
    stmt.raw_bind_parameter(first + 4, c.error)?;
    for i in 0..Area::COLUMNS.len() {
        stmt.raw_bind_parameter(first + 5 + i, c.area(i))?;
    }
    Ok(())
}

/// `name = ?n, …` for the answer columns from parameter `first`.
fn answer_assignments(first: usize) -> String {
    ANSWER_COLUMNS
        .iter()
        .chain(Area::COLUMNS.iter())
        .enumerate()
        .map(|(i, c)| format!("{c} = ?{}", first + i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The database file behind a sqlx SQLite pool.
pub fn path_of(pool: &sqlx::SqlitePool) -> PathBuf {
    pool.connect_options().get_filename().to_path_buf()
}

/// Step 1 of a SQLite load: in chunks of committed transactions, inserts every
/// row received on `rows` into `points`. Returns the connection so the caller can
/// finish the load (lookups, phase) in a last transaction.
pub fn insert_points(
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
    stmt: &mut rusqlite::Statement<'_>,
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
            stmt.raw_bind_parameter(at + 8, "pending")?;
            stmt.raw_bind_parameter(at + 9, None::<&str>)?;
        }
        Err(e) => {
            counts.invalid += 1;
            stmt.raw_bind_parameter(at + 5, None::<f64>)?;
            stmt.raw_bind_parameter(at + 6, None::<f64>)?;
            stmt.raw_bind_parameter(at + 7, None::<i32>)?;
            stmt.raw_bind_parameter(at + 8, "invalid")?;
            stmt.raw_bind_parameter(at + 9, e.as_str())?;
        }
    }
    Ok(())
}

/// [`crate::db::Store::plan_shard`] on SQLite, in one `BEGIN IMMEDIATE` transaction
/// (a deferred one could not wait for the write lock it upgrades to).
pub fn plan_shard(path: &Path, import_id: i64, shard: i32) -> anyhow::Result<ShardPlan> {
    let mut conn = open(path)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let planned = tx
        .query_row(PLANNED, params![import_id, shard], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((coordinates, rows)) = planned {
        return Ok(ShardPlan { coordinates, rows });
    }
    tx.execute(PLAN, params![import_id, shard])?;
    let (coordinates, rows): (i64, i64) = tx.query_row(PLAN_COUNT, params![import_id, shard], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    tx.execute(RECORD_PLAN, params![import_id, shard, coordinates, rows])?;
    tx.commit()?;
    Ok(ShardPlan { coordinates, rows })
}

/// Plans a shard and answers it in the same pass, for a provider that answers at
/// once (the offline index): the shard's distinct coordinates are read in
/// (latitude, longitude) order and written as finished lookups, 4096 a
/// transaction, then the plan is recorded from the pass's own counts. Half the
/// writes of planning pending lookups and updating each. Killed midway, no plan
/// is recorded: the next run repeats the pass, keeping the lookups already
/// written (`ON CONFLICT DO NOTHING`). Returns `None` when the shard was
/// already planned.
#[allow(clippy::too_many_lines)] // TODO(issue 15): split in the store/provider redesign
pub fn plan_shard_answered(
    path: &Path,
    import_id: i64,
    shard: i32,
    answer: impl Fn(&[Claimed]) -> Vec<Saved>,
) -> anyhow::Result<Option<ShardPlan>> {
    const DISTINCT: &str = "SELECT lat, lon, COUNT(*) FROM points WHERE import_id = ?1 AND shard = ?2 AND status = 'pending' GROUP BY lat, lon ORDER BY lat, lon";
    const BATCH: usize = 4096;
    let reader = open(path)?;
    let mut writer = open(path)?;
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
    let columns: Vec<&str> = ANSWER_COLUMNS
        .iter()
        .chain(Area::COLUMNS.iter())
        .copied()
        .collect();
    let values: Vec<String> = (1..=6 + columns.len()).map(|i| format!("?{i}")).collect();
    let sql = format!(
        "INSERT INTO lookups (import_id, shard, lat, lon, rows, attempts, {}) VALUES ({}) ON CONFLICT DO NOTHING",
        columns.join(", "),
        values.join(", ")
    );
    let (mut batch, mut counts) = (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH));
    let mut plan = ShardPlan {
        coordinates: 0,
        rows: 0,
    };
    let mut write = |batch: &mut Vec<Claimed>, counts: &mut Vec<i64>| -> anyhow::Result<()> {
        plan.coordinates += batch.len() as i64;
        plan.rows += counts.iter().sum::<i64>();
        let results = answer(batch);
        let tx = writer.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut ins = tx.prepare_cached(&sql)?;
            for (s, n) in results.iter().zip(counts.iter()) {
                let c = Cols::of(s);
                ins.raw_bind_parameter(1, import_id)?;
                ins.raw_bind_parameter(2, shard)?;
                ins.raw_bind_parameter(3, s.lat)?;
                ins.raw_bind_parameter(4, s.lon)?;
                ins.raw_bind_parameter(5, n)?;
                ins.raw_bind_parameter(6, s.attempts)?;
                bind_answer(&mut ins, 7, &c)?;
                ins.raw_execute()?;
            }
        }
        tx.commit()?;
        batch.clear();
        counts.clear();
        Ok(())
    };
    let mut feed = |lat: f64, lon: f64, n: i64| -> anyhow::Result<()> {
        batch.push(Claimed {
            lat,
            lon,
            stage: 0,
            attempts: 0,
        });
        counts.push(n);
        if batch.len() == BATCH {
            write(&mut batch, &mut counts)?;
        }
        Ok(())
    };
    match shard_coordinates(&reader, import_id, shard)? {
        Some(sorted) => {
            drop(reader); // no read transaction held open while writing
            for run in sorted.chunk_by(|a, b| a == b) {
                feed(run[0].0, run[0].1, run.len() as i64)?;
            }
        }
        None => {
            let mut stmt = reader.prepare(DISTINCT)?;
            let mut rows = stmt.query(params![import_id, shard])?;
            while let Some(r) = rows.next()? {
                feed(r.get(0)?, r.get(1)?, r.get(2)?)?;
            }
        }
    }
    if !batch.is_empty() {
        write(&mut batch, &mut counts)?;
    }
    // Every distinct coordinate of the shard now has its lookup (written by this
    // pass or, after a kill, by an earlier one of the same set), so the counts of
    // this pass are the plan; nothing is left for `PLAN` to add.
    let tx = writer.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
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
    Ok(Some(plan))
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

/// Writes a batch of results in one transaction (one prepared UPDATE a coordinate).
pub fn save(path: &Path, import_id: i64, results: &[Saved]) -> anyhow::Result<()> {
    // ?1 import, ?2 lat, ?3 lon, ?4 attempts, ?5 stage, then the answer from ?6.
    let sql = format!(
        "UPDATE lookups SET stage = COALESCE(?5, stage), attempts = ?4, {} WHERE import_id = ?1 AND lat = ?2 AND lon = ?3",
        answer_assignments(6)
    );
    let mut conn = open(path)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare(&sql)?;
        for s in results {
            let c = Cols::of(s);
            stmt.raw_bind_parameter(1, import_id)?;
            stmt.raw_bind_parameter(2, s.lat)?;
            stmt.raw_bind_parameter(3, s.lon)?;
            stmt.raw_bind_parameter(4, s.attempts)?;
            stmt.raw_bind_parameter(5, c.stage)?;
            bind_answer(&mut stmt, 6, &c)?;
            stmt.raw_execute()?;
        }
    }
    tx.commit()?;
    Ok(())
}
