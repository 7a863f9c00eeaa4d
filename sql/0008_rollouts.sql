-- Rollouts by pm-push and pm-rollback (DESIGN.md section 4): the plan, and a row per host per
-- attempt (the audit log). A host's state in a rollout is its latest attempt.

CREATE TABLE rollouts (
    job_id       BIGINT PRIMARY KEY,      -- jobs.id
    kind         VARCHAR NOT NULL,        -- update, rollback
    revision     VARCHAR,                 -- the revision rolled out
    generation   INTEGER,                 -- rollback: the backup generation (1..3)
    state        VARCHAR NOT NULL,        -- running, done, stopped, interrupted
    waves        INTEGER NOT NULL,        -- number of waves, canary included
    max_failures VARCHAR NOT NULL,        -- per wave: N or P%
    options      VARCHAR NOT NULL,        -- JSON: what `pm-push resume` needs
    pid          INTEGER,                 -- the process running it (to tell running from killed)
    stopped_at_wave INTEGER,              -- the wave that stopped it, when stopped
    updated_at   TIMESTAMPTZ NOT NULL
);

CREATE TABLE job_results (
    job_id      BIGINT NOT NULL,
    host        VARCHAR NOT NULL,
    wave        INTEGER NOT NULL,         -- 0: the canary wave
    attempt     INTEGER NOT NULL,         -- 1, then 2.. for each resume
    result      VARCHAR NOT NULL,         -- pending, ok, failed, skipped, not_attempted
    changed     BOOLEAN,
    revision    VARCHAR,                  -- what the host has after the attempt
    error       VARCHAR,
    recorded_at TIMESTAMPTZ NOT NULL
);

-- Each host's latest attempt in each rollout.
CREATE VIEW rollout_hosts AS
SELECT job_id, host, wave, attempt, result, changed, revision, error, recorded_at
FROM job_results
-- Within an attempt the outcome outranks its `pending` row, whatever the clock says.
QUALIFY row_number() OVER (
    PARTITION BY job_id, host
    ORDER BY attempt DESC, (result <> 'pending') DESC, recorded_at DESC
) = 1;

-- Per rollout and wave: how many hosts are in each state.
CREATE VIEW rollout_progress AS
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
       count(*) FILTER (WHERE h.result = 'pending') AS pending
FROM rollouts r
JOIN jobs j ON j.id = r.job_id
JOIN rollout_hosts h ON h.job_id = r.job_id
GROUP BY ALL;
