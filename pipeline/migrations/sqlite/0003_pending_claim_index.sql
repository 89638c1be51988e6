-- Claims only ever look for pending lookups: index just those. A finished lookup
-- leaves the index instead of moving within it, and lookups written finished
-- (the offline provider answers while it plans a shard) never enter it.
DROP INDEX lookups_claim;
CREATE INDEX lookups_claim ON lookups (import_id, shard, stage, lat, lon) WHERE status = 'pending';
