-- Coordinates and rows of each shard's lookups by status (issue 17,
-- pipeline::store::tallies): kept exact by every statement that writes
-- lookups, in its own transaction, so an import's counts are read from a few
-- rows instead of a GROUP BY over all its lookups on every reconcile.
CREATE TABLE lookup_tallies (
    import_id   INTEGER NOT NULL,
    shard       INTEGER NOT NULL,
    status      TEXT NOT NULL,
    coordinates INTEGER NOT NULL,
    rows        INTEGER NOT NULL,
    PRIMARY KEY (import_id, shard, status)
);
INSERT INTO lookup_tallies (import_id, shard, status, coordinates, rows)
SELECT import_id, shard, status, COUNT(*), SUM(rows) FROM lookups GROUP BY import_id, shard, status;
