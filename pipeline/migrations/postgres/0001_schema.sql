-- Uploaded CSV files, stored in chunks so neither upload nor read needs the whole file in memory.
CREATE TABLE uploads (
    id          TEXT PRIMARY KEY,
    size_bytes  BIGINT NOT NULL DEFAULT 0,
    sha256      TEXT,
    complete    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE upload_chunks (
    upload_id   TEXT NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    data        BYTEA NOT NULL,
    PRIMARY KEY (upload_id, seq)
);

-- One row per import (a PostcodeImport's uid, or a local run's).
CREATE TABLE imports (
    id            BIGSERIAL PRIMARY KEY,
    uid           TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    source        TEXT NOT NULL,
    source_sha256 TEXT,
    shards        INTEGER NOT NULL,
    delimiter     TEXT,
    header        TEXT,            -- JSON array of the user's column names, NULL when headerless
    width         INTEGER,
    lat_index     INTEGER,
    lon_index     INTEGER,
    phase         TEXT NOT NULL DEFAULT 'Pending',   -- Pending | Loading | Loaded | Failed
    rows_total    BIGINT NOT NULL DEFAULT 0,
    rows_invalid  BIGINT NOT NULL DEFAULT 0,
    error         TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every input row, with its original fields; status pending|invalid at load time.
-- The enrichment result of a valid row is its coordinate's lookup (view point_results).
CREATE TABLE points (
    import_id   BIGINT NOT NULL,
    row_number  BIGINT NOT NULL,
    line        BIGINT NOT NULL,
    fields      TEXT NOT NULL,
    lat         DOUBLE PRECISION,
    lon         DOUBLE PRECISION,
    shard       INTEGER,
    status      TEXT NOT NULL,
    error       TEXT,
    PRIMARY KEY (import_id, row_number)
);

-- One row per distinct coordinate of an import: the unit of work of an enricher.
CREATE TABLE lookups (
    import_id   BIGINT NOT NULL,
    lat         DOUBLE PRECISION NOT NULL,
    lon         DOUBLE PRECISION NOT NULL,
    shard       INTEGER NOT NULL,
    rows        BIGINT NOT NULL,
    stage       SMALLINT NOT NULL DEFAULT 0,        -- 0 radius, 1 max radius, 2 widesearch
    status      TEXT NOT NULL DEFAULT 'pending',    -- pending | enriched | no_match | failed
    postcode    TEXT,
    distance_m  DOUBLE PRECISION,
    outcode TEXT, incode TEXT, country TEXT, region TEXT, admin_district TEXT, admin_county TEXT,
    admin_ward TEXT, parish TEXT, parliamentary_constituency TEXT, lsoa TEXT, msoa TEXT,
    result      TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    PRIMARY KEY (import_id, lat, lon)
);
CREATE INDEX lookups_claim ON lookups (import_id, shard, status, stage, lat, lon);

-- The import's external API quota, shared by all its shards (see pipeline::quota).
CREATE TABLE quotas (
    import_id           BIGINT PRIMARY KEY,
    requests_per_second DOUBLE PRECISION NOT NULL,
    max_requests        BIGINT,
    next_at             DOUBLE PRECISION NOT NULL DEFAULT 0,
    paused_until        DOUBLE PRECISION NOT NULL DEFAULT 0,
    requests            BIGINT NOT NULL DEFAULT 0,
    retries             BIGINT NOT NULL DEFAULT 0,
    throttled           BIGINT NOT NULL DEFAULT 0
);

CREATE VIEW point_results AS
SELECT p.import_id, p.row_number, p.line, p.fields, p.lat, p.lon, p.shard,
       CASE WHEN p.status = 'invalid' THEN 'invalid' ELSE COALESCE(l.status, 'pending') END AS status,
       l.postcode, l.distance_m, l.outcode, l.incode, l.country, l.region, l.admin_district, l.admin_county,
       l.admin_ward, l.parish, l.parliamentary_constituency, l.lsoa, l.msoa, l.result,
       COALESCE(p.error, l.error) AS error
FROM points p
LEFT JOIN lookups l ON l.import_id = p.import_id AND l.lat = p.lat AND l.lon = p.lon;
