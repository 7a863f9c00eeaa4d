-- `pm-mirror status` tells the truth (issue 17).

-- What the last sync that contacted upstream learnt of each component, failed or not: JSON
-- {"daily": {"version": "27430"}, "main": {"error": "`.../main.cvd` is not found upstream"}}.
-- upstream_versions keeps what upstream last offered when a sync ended well (the exporter's
-- gauge); this says what the last try saw, database by database.
ALTER TABLE mirror_products ADD COLUMN upstream_components VARCHAR;

-- Every publish that tried to change dist, and how it ended: published, refused (a rolled-back
-- revision, ...) or failed (latest does not verify, ...). dist_history has the changes only;
-- this also has the attempts that changed nothing.
CREATE SEQUENCE mirror_publishes_id_seq START 1;
CREATE TABLE mirror_publishes (
    id           BIGINT PRIMARY KEY DEFAULT nextval('mirror_publishes_id_seq'),
    job_id       BIGINT,
    attempted_at TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ NOT NULL,
    result       VARCHAR NOT NULL,           -- published, refused, failed
    revision     VARCHAR,                    -- latest: what it tried to publish
    dist         VARCHAR,                    -- what dist is after it
    error        VARCHAR
);
