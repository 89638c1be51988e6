-- Each enricher plans its own shard before enriching it: one lookup per distinct
-- coordinate of the shard's pending rows, written in one transaction together
-- with this row, so a shard is planned exactly once (a reload deletes both).
CREATE TABLE shard_plans (
    import_id   BIGINT NOT NULL,
    shard       INTEGER NOT NULL,
    coordinates BIGINT NOT NULL,
    rows        BIGINT NOT NULL,
    PRIMARY KEY (import_id, shard)
);
