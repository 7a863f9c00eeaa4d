//! Rollouts (`pm-push update`, `pm-rollback`): the plan and every host's attempts, written in
//! short transactions (the start, then one per wave) so an interrupted rollout says where it
//! stopped and `pm-push resume` can continue it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use duckdb::{OptionalExt, params};

use super::{Inventory, InventoryError, from_epoch};

/// One rollout (`rollouts` row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRecord {
    /// Its job (`jobs.id`).
    pub job_id: i64,
    /// `update` or `rollback`.
    pub kind: String,
    /// The revision rolled out.
    pub revision: Option<String>,
    /// Rollback: the backup generation.
    pub generation: Option<i32>,
    /// `running`, `done`, `stopped`, `interrupted`.
    pub state: String,
    /// Waves, canary included.
    pub waves: i32,
    /// Per wave: `N` or `P%`.
    pub max_failures: String,
    /// JSON the command needs to resume.
    pub options: String,
    /// The process running it.
    pub pid: Option<i32>,
    /// The wave that stopped it.
    pub stopped_at_wave: Option<i32>,
    /// When the job started.
    pub started_at: Option<DateTime<Utc>>,
}

/// One attempt at one host (`job_results` row), or a host's latest attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAttempt {
    /// The host.
    pub host: String,
    /// Its wave (0: canary; none: the rollout did not ask it, it was on the revision already
    /// or held).
    pub wave: Option<i32>,
    /// 1, then 2.. for each resume.
    pub attempt: i32,
    /// `pending`, `ok`, `failed`, `skipped`, `not_attempted`, `held`.
    pub result: String,
    /// Whether the host changed.
    pub changed: Option<bool>,
    /// What the host has after the attempt.
    pub revision: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

impl Inventory {
    /// Starts a rollout: its job (status `running`, not finished), its row and every host's
    /// first row.
    pub fn start_rollout(
        &self,
        started_at: DateTime<Utc>,
        summary: &str,
        rollout: &RolloutRecord,
        hosts: &[HostAttempt],
    ) -> Result<i64, InventoryError> {
        let job_id = self.insert_job(&rollout.kind, started_at, "running", summary)?;
        self.db(self.conn.execute(
            "UPDATE jobs SET finished_at = NULL WHERE id = ?",
            params![job_id],
        ))?;
        self.db(self.conn.execute(
            "INSERT INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            params![
                job_id,
                rollout.kind,
                rollout.revision,
                rollout.generation,
                rollout.state,
                rollout.waves,
                rollout.max_failures,
                rollout.options,
                rollout.pid,
                rollout.stopped_at_wave,
            ],
        ))?;
        self.record_attempts(job_id, hosts)?;
        Ok(job_id)
    }

    /// Appends attempts to a rollout's audit log.
    pub fn record_attempts(
        &self,
        job_id: i64,
        hosts: &[HostAttempt],
    ) -> Result<(), InventoryError> {
        let gone = self.gone_hosts(
            hosts.iter().map(|h| h.host.as_str()),
            "the rollout's result",
        )?;
        let mut appender = self.db(self.conn.appender("job_results"))?;
        let now = duckdb::types::Value::Timestamp(
            duckdb::types::TimeUnit::Microsecond,
            Utc::now().timestamp_micros(),
        );
        for host in hosts.iter().filter(|h| !gone.contains(&h.host)) {
            self.db(appender.append_row(params![
                job_id,
                host.host,
                host.wave,
                host.attempt,
                host.result,
                host.changed,
                host.revision,
                host.error,
                now.clone(),
            ]))?;
        }
        self.db(appender.flush())
    }

    /// Changes a rollout's state and its job's status and summary: a job that runs (again)
    /// has no end; one that ended, an end no earlier than its start (even across a clock
    /// step back).
    pub fn update_rollout(
        &self,
        job_id: i64,
        state: &str,
        stopped_at_wave: Option<i32>,
        pid: Option<i32>,
        job_status: &str,
        summary: &str,
    ) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "UPDATE rollouts SET state = ?, stopped_at_wave = ?, pid = ?, updated_at = now()
             WHERE job_id = ?",
            params![state, stopped_at_wave, pid, job_id],
        ))?;
        self.db(self.conn.execute(
            "UPDATE jobs SET status = ?, summary = ?,
                    finished_at = CASE WHEN ? = 'running' THEN NULL
                                       ELSE greatest(now(), started_at) END
             WHERE id = ?",
            params![job_status, summary, state, job_id],
        ))?;
        Ok(())
    }

    /// A rollout (`job_id`, or the newest of `kind`) and each host's latest attempt, by wave.
    pub fn rollout(
        &self,
        job_id: Option<i64>,
        kind: &str,
    ) -> Result<Option<(RolloutRecord, Vec<HostAttempt>)>, InventoryError> {
        let record = self.db(self
            .conn
            .query_row(
                "SELECT r.job_id, r.kind, r.revision, r.generation, r.state, r.waves,
                        r.max_failures, r.options, r.pid, r.stopped_at_wave, epoch(j.started_at)
                 FROM rollouts r JOIN jobs j ON j.id = r.job_id
                 WHERE (? IS NULL AND r.kind = ?) OR r.job_id = ?
                 ORDER BY r.job_id DESC LIMIT 1",
                params![job_id, kind, job_id],
                |row| {
                    Ok(RolloutRecord {
                        job_id: row.get(0)?,
                        kind: row.get(1)?,
                        revision: row.get(2)?,
                        generation: row.get(3)?,
                        state: row.get(4)?,
                        waves: row.get(5)?,
                        max_failures: row.get(6)?,
                        options: row.get(7)?,
                        pid: row.get(8)?,
                        stopped_at_wave: row.get(9)?,
                        started_at: from_epoch(row.get(10)?),
                    })
                },
            )
            .optional())?;
        let Some(record) = record else {
            return Ok(None);
        };
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, wave, attempt, result, changed, revision, error FROM rollout_hosts
             WHERE job_id = ? ORDER BY wave NULLS LAST, host",
        ))?;
        let rows = self.db(statement.query_map(params![record.job_id], |row| {
            Ok(HostAttempt {
                host: row.get(0)?,
                wave: row.get(1)?,
                attempt: row.get(2)?,
                result: row.get(3)?,
                changed: row.get(4)?,
                revision: row.get(5)?,
                error: row.get(6)?,
            })
        }))?;
        let hosts = rows.map(|row| self.db(row)).collect::<Result<_, _>>()?;
        Ok(Some((record, hosts)))
    }

    /// The rollouts recorded as running that include `host`: job id, kind and the pid of the
    /// process recorded as running it (newest first; whether it still runs is the caller's
    /// check, `push::rollout_process_alive`).
    pub fn running_rollouts_of(
        &self,
        host: &str,
    ) -> Result<Vec<(i64, String, Option<i32>)>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT r.job_id, r.kind, r.pid FROM rollouts r
             WHERE r.state = 'running'
               AND EXISTS (SELECT 1 FROM job_results j WHERE j.job_id = r.job_id AND j.host = ?)
             ORDER BY r.job_id DESC",
        ))?;
        let rows = self.db(statement.query_map(params![host], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// What each host had installed at its last answer, for hosts whose last poll succeeded
    /// within the inactive threshold (an older answer is not trusted to skip a host).
    ///
    /// A host that reported a manifest key other than `manager_key` counts as not installed:
    /// the update is what makes it follow the key's rotation (docs/keys.md), even on dist.
    pub fn installed_revisions(
        &self,
        manager_key: Option<&str>,
    ) -> Result<HashMap<String, Option<String>>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT host,
                    CASE WHEN manifest_key IS NOT NULL AND ?::VARCHAR IS NOT NULL
                              AND manifest_key <> ?::VARCHAR
                         THEN NULL ELSE installed_revision END
             FROM host_state
             WHERE reachable AND last_ok_at >= now() - to_seconds(coalesce(
                 (SELECT TRY_CAST(value AS BIGINT) FROM settings
                  WHERE key = 'inactive_after_seconds'), 1800))",
        ))?;
        let rows = self.db(
            statement.query_map(params![manager_key, manager_key], |row| {
                Ok((row.get(0)?, row.get(1)?))
            }),
        )?;
        rows.map(|row| self.db(row)).collect()
    }
}
