//! [`super::Store::results_in_batches`] on PostgreSQL: the import's rows in
//! row order with their coordinates' lookups, as `point_results` gives them,
//! read with `COPY … TO STDOUT (FORMAT binary)` and decoded here.
//!
//! History (issue 17). Read as a query, 1M rows took about 10 s, most of it in
//! sqlx decoding 24 columns a row while the server's join took 2–4 s. Then the
//! server sent the joined rows as `COPY` text: a hash join and a sort by row
//! number that spilled 80 MiB at 1M rows even with [`WORK_MEM`], 2.4 s of
//! export where SQLite took 1.6 s, all of the client's work on one task.
//!
//! Now, as on SQLite, the join is made here when the import's lookups fit
//! [`JOIN_BUDGET_BYTES`] (`store/joined.rs`): the lookups are copied once into
//! a hash table, then the points are copied in row order (the primary key's
//! order: no sort on the server) and joined against it. Both copies read one
//! snapshot (a `REPEATABLE READ` transaction), so an export during enrichment
//! is one moment. Larger imports are joined by the server as before. The
//! copies are binary: the server's text output of a `float8` (shortest
//! round trip) and its parsing here cost more than the join. The stages
//! overlap: this task receives the copies' tuples and passes them on in
//! 256 KiB pieces; two blocking threads decode the pieces (the lookups into two
//! tables; the rows, joined and gathered into batches: CSV is encoded there);
//! this task hands the batches to the sink in the rows' order.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
};

use futures::TryStreamExt;
use sqlx::{postgres::PgPool, Connection, PgConnection};
use tokio::sync::{mpsc, Semaphore};

use super::{
    columns,
    joined::{self, result_row, Answers, JOIN_BUDGET_BYTES},
    pg_binary::{each_tuple, float, integer, text, SIGNATURE},
    records::{ResultBatch, ResultRef},
};
use crate::{lookup::Area, model::RowStatus};

/// `work_mem` of the server's join (imports over the join budget): the hash
/// of the lookups and the row-order sort in memory (about 85 MiB and 3 × 40
/// MiB at 1M rows, in the server's processes); larger imports spill, but in
/// fewer batches than at the default 4 MiB.
const WORK_MEM: &str = "SET LOCAL work_mem = '96MB'";

/// Bytes of `COPY` output passed to a decoding thread at a time.
pub const PIECE_BYTES: usize = 256 << 10;

/// The columns of [`columns::RESULT`]: row_number, fields, status, postcode, distance_m, the area, error.
const RESULT_COLUMNS: usize = 5 + Area::COLUMNS.len() + 1;
/// The lookups' columns copied for the join: lat, lon, distance_m, [`columns::PACKED`].
const LOOKUP_COLUMNS: usize = 3 + joined::PACKED;
/// The points' columns copied for the join.
const POINTS: &str = "row_number, fields, status, error, lat, lon";

/// [`super::Store::results_in_batches`] on PostgreSQL: joined here within
/// [`JOIN_BUDGET_BYTES`], else by the server. Errors: the database's, or
/// `COPY` output that does not decode.
pub(super) async fn results_in_batches<B: ResultBatch>(
    pool: &PgPool,
    import_id: i64,
    sink: impl FnMut(B) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    results_within(pool, import_id, JOIN_BUDGET_BYTES, PIECE_BYTES, sink).await?;
    Ok(())
}

/// Threads that decode a copy's pieces.
const DECODERS: usize = 2;

/// Pieces of the rows' copy between the copy and the sink at most (queued,
/// being decoded, or decoded and waiting for an earlier piece): about 4 MiB
/// of copy and 16 batches.
const PIECES_IN_FLIGHT: usize = 16;

/// A piece of a copy's output: whole tuples, numbered in the copy's order.
type Piece = (u64, Vec<u8>);

/// Where an export's rows were joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Join {
    /// Here, against the lookups held in memory.
    InMemory,
    /// By the server: the tallies' count of coordinates is over the budget.
    ServerOverBudget,
    /// By the server: the lookups were read but their answers ran out of room.
    ServerOutOfRoom,
}

/// [`results_in_batches`] with a join budget of `budget` bytes (0: always the
/// server's join) and pieces of `piece_bytes` (1: a tuple a piece); returns
/// where the rows were joined. The tests compare the joins and the ways of
/// cutting.
///
/// The lookups' copy is decoded by [`DECODERS`] threads, each into its own
/// [`Answers`] (a coordinate is in one of them); the rows' copy by as many,
/// each piece's rows gathered into batches that are handed to `sink` in the
/// pieces' order. On an error the connection is closed, not returned to the
/// pool: a copy left unread would leave its messages for the next user.
pub async fn results_within<B: ResultBatch>(
    pool: &PgPool,
    import_id: i64,
    budget: usize,
    piece_bytes: usize,
    sink: impl FnMut(B) -> anyhow::Result<()>,
) -> anyhow::Result<Join> {
    let mut conn = pool.acquire().await?;
    let joined = export_on(&mut conn, import_id, budget, piece_bytes, sink).await;
    if joined.is_err() {
        conn.close_on_drop();
    }
    joined
}

/// [`results_within`] on one connection.
async fn export_on<B: ResultBatch>(
    conn: &mut PgConnection,
    import_id: i64,
    budget: usize,
    piece_bytes: usize,
    sink: impl FnMut(B) -> anyhow::Result<()>,
) -> anyhow::Result<Join> {
    let started = std::time::Instant::now();
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COALESCE(SUM(coordinates), 0)::BIGINT FROM lookup_tallies WHERE import_id = $1",
    )
    .bind(import_id)
    .fetch_one(&mut *tx)
    .await?;
    let (join, answers) = read_answers(&mut tx, import_id, n as usize, budget, piece_bytes).await?;
    tracing::debug!(
        ?join,
        seconds = started.elapsed().as_secs_f64(),
        "lookups read for the export"
    );
    let sql = if answers.is_some() {
        format!("SELECT {POINTS} FROM points WHERE import_id = {import_id} ORDER BY row_number")
    } else {
        tracing::debug!(budget, lookups = n, "the server joins");
        sqlx::query(WORK_MEM).execute(&mut *tx).await?;
        columns::select_results(&import_id.to_string(), "ORDER BY row_number")
    };
    copy_rows(&mut tx, &sql, answers, piece_bytes, sink).await?;
    tx.commit().await?;
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "export read");
    Ok(join)
}

/// The import's `n` lookups in [`DECODERS`] tables, each within a share of
/// `budget` bytes (checked before reading, then as read, the tables' growth
/// counted); `None` when they do not fit. Errors: the database's, or output
/// that does not decode.
async fn read_answers(
    conn: &mut PgConnection,
    import_id: i64,
    n: usize,
    budget: usize,
    piece_bytes: usize,
) -> anyhow::Result<(Join, Option<Arc<Vec<Answers>>>)> {
    // Each decoder's share of the table, with room for an uneven split (a
    // decoder that takes more grows its table, and counts the growth).
    let share = n / DECODERS + n / 16 + 1;
    if joined::coordinate_table_bytes(share) > budget / DECODERS {
        return Ok((Join::ServerOverBudget, None));
    }
    let (pieces_tx, pieces) = flume::bounded::<Piece>(8);
    let readers: Vec<_> = (0..DECODERS)
        .map(|_| {
            let pieces = pieces.clone();
            tokio::task::spawn_blocking(move || read_share(&pieces, share, budget / DECODERS))
        })
        .collect();
    drop(pieces);
    let copied = copy_pieces(conn, &lookups_sql(import_id), piece_bytes, pieces_tx, None).await;
    let mut tables = Vec::with_capacity(DECODERS);
    for reader in readers {
        tables.push(reader.await??); // a decoder's error first: it explains the copy's
    }
    anyhow::ensure!(copied?, "the export's decoding ended early");
    let Some(tables) = tables.into_iter().collect::<Option<Vec<Answers>>>() else {
        return Ok((Join::ServerOutOfRoom, None));
    };
    let (coordinates, answers, areas) = tables
        .iter()
        .map(Answers::sizes)
        .fold((0, 0, 0), |t, s| (t.0 + s.0, t.1 + s.1, t.2 + s.2));
    tracing::debug!(coordinates, answers, areas, "lookups in memory");
    Ok((Join::InMemory, Some(Arc::new(tables))))
}

/// Copies the rows of `sql` (the points when `answers` holds the lookups, the
/// server's join otherwise), decodes them on [`DECODERS`] threads and hands
/// them to `sink` in batches, in the copy's order, with at most
/// [`PIECES_IN_FLIGHT`] pieces between the copy and the sink. Errors: the
/// database's, `sink`'s, a decoder's (a panic included), or output that
/// does not decode.
async fn copy_rows<B: ResultBatch>(
    conn: &mut PgConnection,
    sql: &str,
    answers: Option<Arc<Vec<Answers>>>,
    piece_bytes: usize,
    mut sink: impl FnMut(B) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let abort = Arc::new(AtomicBool::new(false));
    // A permit a piece, taken before it is sent and given back when the sink
    // has its rows; closed when a stage fails, which ends the copy.
    let room = Arc::new(Semaphore::new(PIECES_IN_FLIGHT));
    let (pieces_tx, pieces) = flume::bounded::<Piece>(PIECES_IN_FLIGHT);
    let (rows_tx, mut rows) = mpsc::channel::<(u64, Vec<B>)>(PIECES_IN_FLIGHT);
    let decoders: Vec<_> = (0..DECODERS)
        .map(|_| {
            let (pieces, rows_tx, answers) = (pieces.clone(), rows_tx.clone(), answers.clone());
            let mut failed = OnFailure::new(&abort, &room);
            tokio::task::spawn_blocking(move || {
                let decoded = decode_rows(
                    &pieces,
                    answers.as_deref().map(Vec::as_slice),
                    &rows_tx,
                    &failed.abort,
                );
                if decoded.is_ok() {
                    failed.disarm(); // only an error or a panic stops the others
                }
                decoded
            })
        })
        .collect();
    drop((pieces, rows_tx));
    let copy_sql = format!("COPY ({sql}) TO STDOUT (FORMAT binary)");
    let copy = copy_pieces(conn, &copy_sql, piece_bytes, pieces_tx, Some(&room));
    // Owns the receiver: when the sink fails, the decoders' sends fail too.
    let drain = {
        // Dropped when the drain ends: by then the decoders have ended, unless the sink failed.
        let ended = OnFailure::new(&abort, &room);
        async move {
            let room = &ended.room;
            let mut in_order = InOrder::default();
            while let Some((seq, batches)) = rows.recv().await {
                for batches in in_order.put(seq, batches) {
                    batches.into_iter().try_for_each(&mut sink)?;
                    room.add_permits(1);
                }
            }
            anyhow::Ok(in_order.is_empty())
        }
    };
    let (copied, drained) = tokio::join!(copy, drain);
    let mut decoded = Ok(());
    for decoder in decoders {
        decoded = decoded.and(decoder.await?);
    }
    // The first cause: a stage that ends early makes the others end too.
    let drained = drained?;
    decoded?;
    anyhow::ensure!(copied? && drained, "the export's copy ended early");
    Ok(())
}

/// Dropped while armed: a stage failed or panicked. Tells the decoders to
/// stop and closes the copy's room, which ends the copy.
struct OnFailure {
    abort: Arc<AtomicBool>,
    room: Arc<Semaphore>,
    armed: bool,
}

impl OnFailure {
    fn new(abort: &Arc<AtomicBool>, room: &Arc<Semaphore>) -> Self {
        OnFailure {
            abort: abort.clone(),
            room: room.clone(),
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for OnFailure {
    fn drop(&mut self) {
        if self.armed {
            self.abort.store(true, Relaxed);
            self.room.close();
        }
    }
}

/// Items numbered 0, 1, 2, … arriving in any order, given back in order.
struct InOrder<T> {
    waiting: BTreeMap<u64, T>,
    next: u64,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        InOrder {
            waiting: BTreeMap::new(),
            next: 0,
        }
    }
}

impl<T> InOrder<T> {
    /// Adds item `seq`; returns the items now due, in order.
    fn put(&mut self, seq: u64, item: T) -> Vec<T> {
        self.waiting.insert(seq, item);
        let mut due = Vec::new();
        while let Some(item) = self.waiting.remove(&self.next) {
            due.push(item);
            self.next += 1;
        }
        due
    }

    /// No item waits for an earlier one.
    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

fn lookups_sql(import_id: i64) -> String {
    format!(
        "COPY (SELECT lat, lon, distance_m, {} FROM lookups WHERE import_id = {import_id}) TO STDOUT (FORMAT binary)",
        *columns::PACKED
    )
}

/// Runs a `COPY … TO STDOUT (FORMAT binary)` and passes its tuples on in
/// numbered pieces of about `piece_bytes` (the server sends a tuple a
/// message; the header, which comes with the first, is checked and left
/// out, as is the end marker). `Ok(false)` when the decoders have gone (they
/// say why). Errors: the database's, or output that is not the format.
async fn copy_pieces(
    conn: &mut PgConnection,
    sql: &str,
    piece_bytes: usize,
    to: flume::Sender<Piece>,
    room: Option<&Semaphore>,
) -> anyhow::Result<bool> {
    let mut stream = conn.copy_out_raw(sql).await?;
    let (mut piece, mut seq) = (Vec::with_capacity(piece_bytes + 4096), 0u64);
    let (mut header, mut ended) = (false, false);
    while let Some(bytes) = stream.try_next().await? {
        let mut bytes = &bytes[..];
        if !header {
            anyhow::ensure!(
                bytes.len() >= 19 && bytes.starts_with(SIGNATURE),
                "not binary COPY output"
            );
            let extension = u32::from_be_bytes(bytes[15..19].try_into()?) as usize;
            bytes = bytes
                .get(19 + extension..)
                .ok_or_else(|| anyhow::anyhow!("a cut COPY header"))?;
            header = true;
        }
        anyhow::ensure!(!ended, "COPY output after its end");
        if bytes == (-1i16).to_be_bytes() {
            ended = true;
            continue;
        }
        piece.extend_from_slice(bytes);
        if piece.len() >= piece_bytes {
            let full = std::mem::replace(&mut piece, Vec::with_capacity(piece_bytes + 4096));
            if !send(&to, room, (seq, full)).await {
                return Ok(false);
            }
            seq += 1;
        }
    }
    anyhow::ensure!(ended, "COPY output without its end");
    Ok(piece.is_empty() || send(&to, room, (seq, piece)).await)
}

/// Sends a piece once `room` (if any) has a permit for it; `false` when the
/// decoders have gone or the room was closed.
async fn send(to: &flume::Sender<Piece>, room: Option<&Semaphore>, piece: Piece) -> bool {
    if let Some(room) = room {
        match room.acquire().await {
            Ok(permit) => permit.forget(), // given back by the sink
            Err(_) => return false,
        }
    }
    to.send_async(piece).await.is_ok()
}

/// A decoder's share of the lookups: the pieces it takes, in an [`Answers`]
/// with room for `n` coordinates within `budget` bytes; `None` when they do
/// not fit (the rest of its pieces are taken and dropped). Errors: output
/// that does not decode.
fn read_share(pieces: &flume::Receiver<Piece>, n: usize, budget: usize) -> anyhow::Result<Option<Answers>> {
    let mut table = Answers::with_capacity(n, budget).expect("checked by the caller");
    let mut room = true;
    for (_, piece) in pieces.iter() {
        if room {
            each_tuple(&piece, LOOKUP_COLUMNS, |t| {
                if room {
                    let coordinate = (float(t[0])?, float(t[1])?);
                    let distance_m = t[2].map(|_| float(t[2])).transpose()?;
                    room = table.insert(coordinate, distance_m, |c| text(t[3 + c]))?;
                }
                Ok(())
            })?;
        }
    }
    Ok(room.then_some(table))
}

/// A decoder of the rows' copy: each piece it takes becomes batches of rows
/// (joined against `answers`, or as the server joined them when `None`), sent
/// with the piece's number. Ends when the pieces end, the rows' receiver has
/// gone or a stage failed (`abort`). Errors: output that does not decode.
fn decode_rows<B: ResultBatch>(
    pieces: &flume::Receiver<Piece>,
    answers: Option<&[Answers]>,
    rows: &mpsc::Sender<(u64, Vec<B>)>,
    abort: &AtomicBool,
) -> anyhow::Result<()> {
    for (seq, piece) in pieces.iter() {
        if abort.load(Relaxed) {
            return Ok(());
        }
        let (mut batches, mut batch, mut unsent) = (Vec::new(), B::empty(), false);
        let mut push = |row: &ResultRef<'_>| {
            unsent = !batch.push(row);
            if !unsent {
                batches.push(std::mem::replace(&mut batch, B::empty()));
            }
        };
        match answers {
            Some(answers) => each_tuple(&piece, 6, |t| {
                let found = match (t[4], t[5]) {
                    (Some(_), Some(_)) => {
                        let (lat, lon) = (float(t[4])?, float(t[5])?);
                        answers.iter().find_map(|a| a.get(lat, lon))
                    }
                    _ => None,
                };
                let invalid = joined::status(text(t[2])?)? == RowStatus::Invalid;
                let fields = text(t[1])?.unwrap_or("");
                push(&result_row(
                    integer(t[0])?,
                    fields,
                    invalid,
                    text(t[3])?,
                    found.as_ref(),
                )?);
                Ok(())
            })?,
            None => each_tuple(&piece, RESULT_COLUMNS, |t| {
                let mut area = [None; Area::COLUMNS.len()];
                for (i, v) in area.iter_mut().enumerate() {
                    *v = text(t[5 + i])?;
                }
                push(&ResultRef {
                    row_number: integer(t[0])?,
                    fields: text(t[1])?.unwrap_or(""),
                    status: joined::status(text(t[2])?)?,
                    postcode: text(t[3])?,
                    distance_m: t[4].map(|_| float(t[4])).transpose()?,
                    area,
                    error: text(t[RESULT_COLUMNS - 1])?,
                });
                Ok(())
            })?,
        }
        if unsent {
            batches.push(batch);
        }
        if rows.blocking_send((seq, batches)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_back_in_order_whatever_order_they_arrive_in() {
        let mut in_order = InOrder::default();
        let mut out = Vec::new();
        for seq in [3u64, 1, 0, 2, 5, 6, 4, 7] {
            out.extend(in_order.put(seq, seq));
            assert_eq!(out, (0..out.len() as u64).collect::<Vec<_>>());
        }
        assert_eq!(out, (0..8).collect::<Vec<_>>());
        assert!(in_order.is_empty());
        assert!(in_order.put(9, 9).is_empty(), "8 missing: 9 waits");
        assert!(!in_order.is_empty());
    }
}
