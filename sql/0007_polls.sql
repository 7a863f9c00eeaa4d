-- Fleet status recorded by pm-poll (DESIGN.md section 5), and the views that are the public SQL
-- surface. History tables grow by change, not by poll, except `polls` (pruned by
-- `pm-poll --prune`). `host_state` and `installed_components` hold each host's current state,
-- replaced by every poll, so `fleet_status` reads one row per host and never scans history.

-- Settings the views read, written by pm-poll from pm.toml `[poll]`.
CREATE TABLE settings (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);
INSERT INTO settings VALUES
    ('inactive_after_seconds', '1800'),   -- no successful contact for 30 min: inactive
    ('scan_max_age_seconds', '604800');   -- last scan older than 7 days: scan colour yellow

-- A small number per host name: `polls` stores the number (its largest table stays half the
-- size, and a host's polls are found faster); `poll_history` shows the name.
CREATE SEQUENCE host_ids_seq START 1;
CREATE TABLE host_ids (
    id   INTEGER PRIMARY KEY DEFAULT nextval('host_ids_seq'),
    host VARCHAR NOT NULL UNIQUE
);

-- One row per host per poll (query it through `poll_history`).
CREATE TABLE polls (
    job_id     BIGINT,
    host_id    INTEGER NOT NULL,   -- host_ids.id
    polled_at  TIMESTAMPTZ NOT NULL,
    ok         BOOLEAN NOT NULL,
    error_kind VARCHAR,          -- timeout, unreachable, tls, refused, bad_response, deadline
    error      VARCHAR,
    latency_ms DOUBLE
);

-- One row per host per component per change (the first poll that saw a version).
CREATE TABLE component_versions (
    host       VARCHAR NOT NULL,
    component  VARCHAR NOT NULL,   -- test, daily, main, bytecode, pm-agent, ...
    version    VARCHAR,            -- NULL: the component was removed
    build_time TIMESTAMPTZ,
    revision   VARCHAR,            -- dist revision installed with it
    changed_at TIMESTAMPTZ NOT NULL
);

-- Each agent scan report, once.
CREATE TABLE scans (
    host             VARCHAR NOT NULL,
    scan_id          VARCHAR NOT NULL,
    started_at       TIMESTAMPTZ NOT NULL,
    finished_at      TIMESTAMPTZ NOT NULL,
    duration_seconds DOUBLE,
    engine           VARCHAR,
    program          VARCHAR,        -- clamscan, clamdscan, or the command engine's
    paths            VARCHAR,        -- newline separated
    files_scanned    BIGINT,
    result           VARCHAR NOT NULL, -- clean, infected, error
    findings         INTEGER NOT NULL,
    error            VARCHAR,
    recorded_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE scan_findings (
    host      VARCHAR NOT NULL,
    scan_id   VARCHAR NOT NULL,
    path      VARCHAR NOT NULL,
    signature VARCHAR NOT NULL,
    found_at  TIMESTAMPTZ NOT NULL   -- when the scan finished
);

-- Each install run of an agent (update or rollback; scheduled, from the manager or local), once.
CREATE TABLE update_runs (
    host              VARCHAR NOT NULL,
    run_id            VARCHAR NOT NULL,
    trigger           VARCHAR,        -- schedule, manager, local
    action            VARCHAR,        -- update, rollback
    started_at        TIMESTAMPTZ NOT NULL,
    finished_at       TIMESTAMPTZ NOT NULL,
    ok                BOOLEAN NOT NULL,
    changed           BOOLEAN,
    revision          VARCHAR,
    previous_revision VARCHAR,
    error             VARCHAR,
    recorded_at       TIMESTAMPTZ NOT NULL
);

-- Current state per host (replaced by each poll of the host).
CREATE TABLE host_state (
    host                VARCHAR NOT NULL,
    last_poll_at        TIMESTAMPTZ NOT NULL,
    last_ok_at          TIMESTAMPTZ,
    reachable           BOOLEAN NOT NULL,
    error_kind          VARCHAR,
    last_error          VARCHAR,
    latency_ms          DOUBLE,
    agent_version       VARCHAR,
    engine              VARCHAR,
    reported_group      VARCHAR,
    reported_profile    VARCHAR,
    license_expires_at  TIMESTAMPTZ,
    installed_revision  VARCHAR,
    installed_serial    INTEGER,
    installed_at        TIMESTAMPTZ,
    backups             VARCHAR,      -- backup:1..3 revisions, e.g. "r41,r40,"
    schedule            VARCHAR,      -- e.g. "update=*/15 * * * *; scan=0 3 * * *"
    last_scan_id        VARCHAR,
    last_scan_at        TIMESTAMPTZ,
    last_scan_result    VARCHAR,
    last_scan_findings  INTEGER,
    last_update_id      VARCHAR,
    last_update_at      TIMESTAMPTZ,
    last_update_ok      BOOLEAN,
    last_update_error   VARCHAR
);

-- Current components per host (replaced by each successful poll of the host).
CREATE TABLE installed_components (
    host       VARCHAR NOT NULL,
    component  VARCHAR NOT NULL,
    version    VARCHAR,
    build_time TIMESTAMPTZ,
    revision   VARCHAR
);

-- The revision dist serves now and its components (one row per component, newest version).
CREATE VIEW dist_components AS
WITH dist AS (
    SELECT revision FROM dist_history ORDER BY id DESC LIMIT 1
)
SELECT f.revision,
       f.component,
       arg_max(f.version, coalesce(TRY_CAST(f.version AS BIGINT), 0)) AS version,
       max(f.build_time) AS build_time
FROM revision_files f JOIN dist USING (revision)
WHERE f.version IS NOT NULL
GROUP BY f.revision, f.component;

-- Each host's components next to dist: how far behind each one is. behind_by is the version
-- difference for numeric versions (ClamAV), else 0 or 1; NULL when dist has no such component.
CREATE VIEW host_versions AS
SELECT h.host,
       h.host_group AS grp,
       c.component,
       c.version AS installed_version,
       c.build_time AS installed_build_time,
       d.version AS dist_version,
       d.build_time AS dist_build_time,
       CASE
           WHEN d.version IS NULL THEN NULL
           WHEN c.version IS NULL THEN 1
           WHEN TRY_CAST(c.version AS BIGINT) IS NOT NULL AND TRY_CAST(d.version AS BIGINT) IS NOT NULL
               THEN greatest(TRY_CAST(d.version AS BIGINT) - TRY_CAST(c.version AS BIGINT), 0)
           WHEN c.version = d.version THEN 0
           ELSE 1
       END AS behind_by
FROM hosts h
JOIN installed_components c ON c.host = h.host
LEFT JOIN dist_components d ON d.component = c.component
WHERE h.state = 'active';

-- One row per active host: where it is, whether it answers, what it runs, how it compares with
-- dist, and the PSMT colours: versions green = all at dist, yellow = some behind, red = all
-- behind (or nothing installed while dist has something); scan green = last scan clean and
-- recent, yellow = none yet, too old or failed, red = findings.
CREATE VIEW fleet_status AS
WITH cfg AS (
    SELECT
        (SELECT TRY_CAST(value AS BIGINT) FROM settings WHERE key = 'inactive_after_seconds') AS inactive_after,
        (SELECT TRY_CAST(value AS BIGINT) FROM settings WHERE key = 'scan_max_age_seconds') AS scan_max_age
),
dist AS (
    SELECT revision FROM dist_history ORDER BY id DESC LIMIT 1
),
versions AS (
    SELECT host,
           count(behind_by) AS compared,
           count(*) FILTER (WHERE behind_by > 0) AS behind,
           max(behind_by) AS behind_by,
           string_agg(component || ' ' || coalesce(installed_version, '-') || '/' || coalesce(dist_version, '-'), ', ' ORDER BY component)
               FILTER (WHERE dist_version IS NOT NULL) AS versions
    FROM host_versions
    GROUP BY host
)
SELECT h.host,
       h.host_group AS grp,
       h.address,
       h.labels,
       h.profile,
       h.engine,
       coalesce(s.agent_version, h.agent_version) AS agent_version,
       coalesce(s.reachable, false) AS reachable,
       coalesce(coalesce(s.last_ok_at, h.activated_at) < now() - to_seconds(cfg.inactive_after), true) AS inactive,
       s.last_poll_at,
       s.last_ok_at,
       s.error_kind,
       s.last_error,
       s.latency_ms,
       s.installed_revision,
       (SELECT revision FROM dist) AS dist_revision,
       v.versions,
       CASE WHEN coalesce(v.compared, 0) > 0 THEN v.behind_by END AS behind_by,  -- NULL: nothing to compare
       CASE
           WHEN (SELECT revision FROM dist) IS NULL THEN 'unknown'
           WHEN s.host IS NULL THEN 'unknown'
           WHEN coalesce(v.compared, 0) = 0 THEN 'red'
           WHEN v.behind = 0 THEN 'green'
           WHEN v.behind < v.compared THEN 'yellow'
           ELSE 'red'
       END AS version_colour,
       s.last_update_at,
       s.last_update_ok,
       s.last_scan_at,
       s.last_scan_result,
       s.last_scan_findings,
       CASE
           WHEN s.last_scan_result = 'infected' THEN 'red'
           WHEN s.last_scan_result = 'clean' AND s.last_scan_at >= now() - to_seconds(cfg.scan_max_age) THEN 'green'
           ELSE 'yellow'
       END AS scan_colour,
       s.license_expires_at,
       s.schedule,
       h.activated_at
FROM hosts h
CROSS JOIN cfg
LEFT JOIN host_state s ON s.host = h.host
LEFT JOIN versions v ON v.host = h.host
WHERE h.state = 'active';

-- Hosts that need a look: not contacted lately, not answering, or behind dist.
CREATE VIEW stale_hosts AS
SELECT host, grp, address, reachable, inactive, last_ok_at, error_kind, last_error,
       installed_revision, dist_revision, behind_by, version_colour,
       CASE
           WHEN inactive THEN 'inactive'
           WHEN NOT reachable THEN 'unreachable'
           ELSE 'behind dist'
       END AS reason
FROM fleet_status
WHERE inactive OR NOT reachable OR version_colour IN ('yellow', 'red');

-- Every version change of every component on every host, with the version before it.
CREATE VIEW version_history AS
SELECT v.host,
       h.host_group AS grp,
       v.component,
       lag(v.version) OVER (PARTITION BY v.host, v.component ORDER BY v.changed_at) AS previous_version,
       v.version,
       v.build_time,
       v.revision,
       v.changed_at
FROM component_versions v
LEFT JOIN hosts h ON h.host = v.host;

-- Hosts per component version across the active fleet, and whether that is dist's version.
CREATE VIEW version_drift AS
SELECT component,
       installed_version AS version,
       count(*) AS hosts,
       bool_or(installed_version = dist_version) AS is_dist   -- NULL: dist has no such component
FROM host_versions
GROUP BY component, installed_version;

-- Every scan report, with the host's group.
CREATE VIEW scan_history AS
SELECT s.host, h.host_group AS grp, s.scan_id, s.started_at, s.finished_at, s.duration_seconds,
       s.engine, s.program, s.paths, s.files_scanned, s.result, s.findings, s.error
FROM scans s
LEFT JOIN hosts h ON h.host = s.host;

-- Every finding: which host, which file, which signature, when.
CREATE VIEW scan_alerts AS
SELECT f.host, h.host_group AS grp, f.path, f.signature, f.found_at, f.scan_id
FROM scan_findings f
LEFT JOIN hosts h ON h.host = f.host;

-- Every poll of every host: when, whether it answered, why not, how fast.
CREATE VIEW poll_history AS
SELECT i.host, h.host_group AS grp, p.polled_at, p.ok, p.error_kind, p.error, p.latency_ms,
       p.job_id
FROM polls p
JOIN host_ids i ON i.id = p.host_id
LEFT JOIN hosts h ON h.host = i.host;

-- Every install run reported by agents.
CREATE VIEW update_history AS
SELECT u.host, h.host_group AS grp, u.run_id, u.trigger, u.action, u.started_at, u.finished_at,
       u.ok, u.changed, u.revision, u.previous_revision, u.error
FROM update_runs u
LEFT JOIN hosts h ON h.host = u.host;
