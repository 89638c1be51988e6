-- Adaptive concurrency per upstream API (issue 13, pipeline::concurrency):
-- how many requests may be in flight to the API at once, from every import,
-- shard and process on this database, adjusted to the latency the clients
-- observe (a TCP-Vegas rule), and the smallest latency seen, its baseline.
ALTER TABLE api_quotas ADD COLUMN concurrency_limit DOUBLE PRECISION NOT NULL DEFAULT 4;
ALTER TABLE api_quotas ADD COLUMN min_latency_s DOUBLE PRECISION;
-- One row per request in flight to an API (a lease on one unit of its
-- concurrency limit). A crashed holder's lease ends by itself at expires_at
-- (seconds since the Unix epoch): its request's timeout plus a grace. A
-- request that timed out keeps its lease for one more timeout, while the
-- server is presumably still working on it.
CREATE TABLE api_leases (
    id          INTEGER PRIMARY KEY,
    api_url     TEXT NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX api_leases_api ON api_leases (api_url, expires_at);
-- Fair shares of an API's rate among the imports using it (pipeline::quota):
-- when the import last reserved a request slot (seconds since the Unix
-- epoch; an import is active for ACTIVE_WINDOW_S after), and the rate its
-- last slot was spaced at (requests/second), shown as status.apiShareRps.
ALTER TABLE quotas ADD COLUMN active_at DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE quotas ADD COLUMN share_rps DOUBLE PRECISION;
CREATE INDEX quotas_api_active ON quotas (api_url, active_at);
