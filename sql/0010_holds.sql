-- Holds (issue 16): hosts kept where they are, out of the manager's rollouts and their own
-- schedules: a maintenance window or change freeze (`pm-push hold [--until T]`), a host rolled
-- back by hand (`pm-rollback --host H --to ...`, `pm-agent rollback`), the hosts a fleet
-- rollback moved while dist has not rotated back. One row per hold; `pm-push release` (or a
-- newer hold on the host) sets `released_at`, an end time ends it by itself.

CREATE SEQUENCE holds_id_seq START 1;
CREATE TABLE holds (
    id             BIGINT PRIMARY KEY DEFAULT nextval('holds_id_seq'),
    host           VARCHAR NOT NULL,
    kind           VARCHAR NOT NULL,     -- hold, rollback, fleet-rollback
    reason         VARCHAR NOT NULL,
    revision       VARCHAR,              -- what the host had installed when held, when known
    set_at         TIMESTAMPTZ NOT NULL,
    set_by         VARCHAR NOT NULL,     -- user@host of the command; `agent` when learnt from it
    held_until     TIMESTAMPTZ,          -- NULL: until released
    job_id         BIGINT,               -- the job that set it
    on_agent       BOOLEAN NOT NULL,     -- the agent has it too (its own schedule skips updates)
    released_at    TIMESTAMPTZ,
    released_by    VARCHAR,
    release_job_id BIGINT
);

-- The hold in force on each host (released and ended ones are history).
CREATE VIEW host_holds AS
SELECT host, kind, reason, revision, set_at, set_by, held_until, job_id, on_agent, id AS hold_id
FROM holds
WHERE released_at IS NULL AND (held_until IS NULL OR held_until > now())
QUALIFY row_number() OVER (PARTITION BY host ORDER BY id DESC) = 1;

-- A host a rollout did not ask (already on the revision, or held) is in no wave: NULL, where
-- rollouts before this migration wrote -1.
ALTER TABLE job_results ALTER COLUMN wave DROP NOT NULL;
UPDATE job_results SET wave = NULL WHERE wave = -1;

-- rollout_progress of 0008, with the held hosts counted.
CREATE OR REPLACE VIEW rollout_progress AS
SELECT r.job_id,
       r.kind,
       r.revision,
       r.state,
       j.started_at,
       h.wave,
       count(*) AS hosts,
       count(*) FILTER (WHERE h.result = 'ok') AS ok,
       count(*) FILTER (WHERE h.result = 'failed') AS failed,
       count(*) FILTER (WHERE h.result = 'skipped') AS skipped,
       count(*) FILTER (WHERE h.result = 'not_attempted') AS not_attempted,
       count(*) FILTER (WHERE h.result = 'pending') AS pending,
       count(*) FILTER (WHERE h.result = 'held') AS held
FROM rollouts r
JOIN jobs j ON j.id = r.job_id
JOIN rollout_hosts h ON h.job_id = r.job_id
GROUP BY ALL;

-- fleet_status of 0007, with the hold in force appended (columns before it keep their order).
CREATE OR REPLACE VIEW fleet_status AS
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
           -- A failed scan keeps the findings of the last one that ran (unknown is not clean).
           WHEN s.last_scan_result = 'infected' OR s.last_scan_findings > 0 THEN 'red'
           WHEN s.last_scan_result = 'clean' AND s.last_scan_at >= now() - to_seconds(cfg.scan_max_age) THEN 'green'
           ELSE 'yellow'
       END AS scan_colour,
       s.license_expires_at,
       s.schedule,
       h.activated_at,
       hh.host IS NOT NULL AS held,   -- rollouts and the agent's own schedule leave it alone
       hh.kind AS hold_kind,          -- hold, rollback, fleet-rollback
       hh.reason AS hold_reason,
       hh.set_at AS held_since,
       hh.held_until                  -- NULL: until `pm-push release`
FROM hosts h
CROSS JOIN cfg
LEFT JOIN host_state s ON s.host = h.host
LEFT JOIN versions v ON v.host = h.host
LEFT JOIN host_holds hh ON hh.host = h.host
WHERE h.state = 'active';

-- stale_hosts of 0007: a held host behind dist is there on purpose, not stale (a held host
-- that stopped answering still is).
CREATE OR REPLACE VIEW stale_hosts AS
SELECT host, grp, address, reachable, inactive, last_ok_at, error_kind, last_error,
       installed_revision, dist_revision, behind_by, version_colour,
       CASE
           WHEN inactive THEN 'inactive'
           WHEN NOT reachable THEN 'unreachable'
           ELSE 'behind dist'
       END AS reason,
       held
FROM fleet_status
WHERE inactive OR NOT reachable OR (version_colour IN ('yellow', 'red') AND NOT held);
