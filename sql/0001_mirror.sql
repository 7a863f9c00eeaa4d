-- The mirror's history: revisions of the repository, what was published when, every sync,
-- per-product upstream state (validators, cool-down) and the jobs audit log.
-- Timestamps are UTC (TIMESTAMPTZ); versions are text because vendors are not all numeric.

CREATE SEQUENCE jobs_id_seq START 1;
CREATE TABLE jobs (
    id          BIGINT PRIMARY KEY DEFAULT nextval('jobs_id_seq'),
    kind        VARCHAR NOT NULL,          -- sync, publish, gc, ...
    started_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    status      VARCHAR NOT NULL,          -- ok, failed, partial, unchanged
    actor       VARCHAR,                   -- user@host that ran it
    summary     VARCHAR                    -- one line for people; details live in the job's rows
);

CREATE TABLE revisions (
    serial         INTEGER PRIMARY KEY,
    revision       VARCHAR NOT NULL UNIQUE,  -- r42
    content_sha256 VARCHAR NOT NULL,         -- hash of every (path, size, sha256)
    created_at     TIMESTAMPTZ NOT NULL,
    source         VARCHAR NOT NULL,         -- upstream, bundle, parent
    n_files        INTEGER NOT NULL,
    total_bytes    BIGINT NOT NULL
);

CREATE TABLE revision_files (
    revision   VARCHAR NOT NULL,
    path       VARCHAR NOT NULL,             -- clamav/daily.cvd
    product    VARCHAR NOT NULL,
    component  VARCHAR NOT NULL,             -- daily
    version    VARCHAR,                      -- 27430
    build_time TIMESTAMPTZ,
    size       BIGINT NOT NULL,
    sha256     VARCHAR NOT NULL,
    PRIMARY KEY (revision, path)
);

CREATE SEQUENCE dist_history_id_seq START 1;
CREATE TABLE dist_history (
    id                BIGINT PRIMARY KEY DEFAULT nextval('dist_history_id_seq'),
    changed_at        TIMESTAMPTZ NOT NULL,
    action            VARCHAR NOT NULL,      -- publish, rollback
    revision          VARCHAR NOT NULL,      -- what dist became
    previous_revision VARCHAR,               -- what dist was
    backups           VARCHAR,               -- backup/1..3 after the change, e.g. "r41,r40,r39"
    archived          VARCHAR,               -- revision moved to archive by this change
    job_id            BIGINT
);

CREATE SEQUENCE mirror_syncs_id_seq START 1;
CREATE TABLE mirror_syncs (
    id               BIGINT PRIMARY KEY DEFAULT nextval('mirror_syncs_id_seq'),
    job_id           BIGINT,
    product          VARCHAR NOT NULL,
    source           VARCHAR NOT NULL,       -- upstream, bundle, parent
    started_at       TIMESTAMPTZ NOT NULL,
    finished_at      TIMESTAMPTZ NOT NULL,
    duration_seconds DOUBLE NOT NULL,
    result           VARCHAR NOT NULL,       -- updated, unchanged, failed, cooldown
    bytes_downloaded BIGINT NOT NULL,
    versions         VARCHAR,                -- component=version list after the sync, e.g. "daily=27430"
    revision         VARCHAR,                -- the new latest revision, when this sync made one
    error            VARCHAR
);

CREATE TABLE mirror_products (
    product          VARCHAR PRIMARY KEY,
    upstream_versions VARCHAR,               -- component=version as last seen upstream
    upstream_checked_at TIMESTAMPTZ,         -- when upstream last answered
    last_success_at  TIMESTAMPTZ,
    last_failure_at  TIMESTAMPTZ,
    last_error       VARCHAR,
    cooldown_until   TIMESTAMPTZ,
    cooldown_reason  VARCHAR,
    validators       VARCHAR                 -- JSON: url -> {etag, last_modified}
);
