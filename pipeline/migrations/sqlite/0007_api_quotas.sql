-- One quota per upstream API (issue 13), keyed by its base URL (no trailing
-- '/'), shared by every import, shard and process on this database: each
-- request takes a slot of its import's quota and of its API's
-- (pipeline::quota). The operator writes operator_rps (its --api-quota flag,
-- Helm value apiQuotas), `local --quota-rps` writes local_rps; when both are
-- written the lower stands.
CREATE TABLE api_quotas (
    api_url       TEXT PRIMARY KEY,
    operator_rps  DOUBLE PRECISION,
    local_rps     DOUBLE PRECISION,
    next_at       DOUBLE PRECISION NOT NULL DEFAULT 0,
    paused_until  DOUBLE PRECISION NOT NULL DEFAULT 0
);
-- The API whose quota the import's requests also take (NULL: the import's own only).
ALTER TABLE quotas ADD COLUMN api_url TEXT;
