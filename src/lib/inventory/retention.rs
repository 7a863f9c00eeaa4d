//! Retention: what pruning deletes from the history the inventory keeps, for `pm-poll --prune`
//! and the prune pm-poll runs by itself once a day.
//!
//! `polls` grows by poll (a row per host per poll: at 10,000 hosts every 5 minutes about 12 MB a
//! day) and is pruned past `[poll] keep_polls`. The rest of the history grows by change: scans
//! and their findings, install runs, and version changes; it stays unless `[poll] keep_history`
//! is set. A host's newest version of each component is never pruned (`version_history` shows
//! it however old), and neither is anything the status views read: `fleet_status` reads
//! `host_state` and `installed_components` only, and the poll cursors live in `host_state`.

use std::path::Path;

use chrono::{DateTime, Utc};
use duckdb::params;
use serde::Serialize;

use super::{Inventory, InventoryError};

/// Rows a prune deleted (or, dry, would delete), per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// `polls` older than `keep_polls`.
    pub polls: usize,
    /// `scans` that finished before `keep_history`.
    pub scans: usize,
    /// `scan_findings` found before `keep_history`.
    pub scan_findings: usize,
    /// `update_runs` that finished before `keep_history`.
    pub update_runs: usize,
    /// `component_versions` rows older than `keep_history` that a newer row of the same host
    /// and component superseded.
    pub component_versions: usize,
}

/// `settings` key: seconds this manager's clock was ahead of the median of its agents' clocks
/// at the last poll that heard any (negative: behind).
const CLOCK_AHEAD_SECONDS: &str = "manager_clock_ahead_seconds";
/// `settings` key: when (epoch seconds, the manager's clock) that was measured.
const CLOCK_CHECKED_AT: &str = "manager_clock_checked_at";
/// `settings` key: when (epoch seconds) the newest poll run started whose agents' answers found
/// this manager's clock not ahead of theirs (what a prune measures ages from).
const CLOCK_IN_STEP_AT: &str = "manager_clock_in_step_at";

fn epoch(at: DateTime<Utc>) -> f64 {
    at.timestamp_micros() as f64 / 1e6
}

fn from_epoch(seconds: f64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros((seconds * 1e6).round() as i64).unwrap_or_default()
}

/// The tables pruned by `keep_history`, each with the condition on a row (`?`: the cutoff).
const HISTORY: [(&str, &str); 4] = [
    ("scans", "finished_at < to_timestamp(?)"),
    ("scan_findings", "found_at < to_timestamp(?)"),
    ("update_runs", "finished_at < to_timestamp(?)"),
    (
        "component_versions",
        "changed_at < to_timestamp(?) AND EXISTS (SELECT 1 FROM component_versions newer \
         WHERE newer.host = component_versions.host \
         AND newer.component = component_versions.component \
         AND newer.changed_at > component_versions.changed_at)",
    ),
];

impl Inventory {
    /// Bytes of the inventory in `home` and its write-ahead log on disk (two `stat`s, no open:
    /// a writer never blocks it); `None` without an inventory.
    pub fn size_on_disk(home: &Path) -> Option<u64> {
        let file = home.join(super::INVENTORY_FILE);
        let size = std::fs::metadata(&file).ok()?.len();
        let mut wal = file.into_os_string();
        wal.push(".wal");
        Some(size + std::fs::metadata(wal).map_or(0, |m| m.len()))
    }

    /// When the newest prune (a `prune` job, by pm-poll or `pm-poll --prune`) started, of those
    /// not after `now`: a prune stamped by a clock that was ahead must not hold off the next.
    pub fn last_prune_at(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, InventoryError> {
        let seconds: Option<f64> = self.db(self.conn.query_row(
            "SELECT epoch(max(started_at)) FROM jobs WHERE kind = 'prune' \
             AND started_at <= to_timestamp(?)",
            params![epoch(now)],
            |row| row.get(0),
        ))?;
        Ok(seconds.map(from_epoch))
    }

    /// How many polls of runs other than `this_job` are stamped more than
    /// [`crate::hosts::MAX_CLOCK_SKEW`] after `now` (recorded while the clock was ahead, or the
    /// clock stepped back since; a run writing at the same time stamps its polls a little after
    /// `now`, which is no sign of either).
    pub fn polls_stamped_ahead(
        &self,
        now: DateTime<Utc>,
        this_job: Option<i64>,
    ) -> Result<usize, InventoryError> {
        let ahead: i64 = self.db(self.conn.query_row(
            "SELECT count(*) FROM polls WHERE polled_at > to_timestamp(?) \
             AND job_id IS DISTINCT FROM ?",
            params![epoch(now + crate::hosts::MAX_CLOCK_SKEW), this_job],
            |row| row.get(0),
        ))?;
        Ok(ahead as usize)
    }

    /// Records how far this manager's clock is ahead of its agents' (`ahead`, negative:
    /// behind), measured at `at` by the manager's clock (call inside a transaction); not more
    /// than [`crate::hosts::MAX_CLOCK_SKEW`] ahead and measured against enough agents to
    /// `vouch` for it, `at` is also the new [`Inventory::clock_in_step_at`].
    pub fn save_clock_against_agents(
        &self,
        ahead: chrono::Duration,
        at: DateTime<Utc>,
        vouch: bool,
    ) -> Result<(), InventoryError> {
        let mut settings = vec![
            (CLOCK_AHEAD_SECONDS, ahead.num_seconds().to_string()),
            (CLOCK_CHECKED_AT, at.timestamp().to_string()),
        ];
        if vouch && ahead <= crate::hosts::MAX_CLOCK_SKEW {
            settings.push((CLOCK_IN_STEP_AT, at.timestamp().to_string()));
        }
        self.save_settings(&settings)
    }

    /// When the newest poll run started whose agents' answers found this manager's clock not
    /// ahead of theirs (`None`: no poll ever did): its stamp is a time the fleet vouched for,
    /// which a clock that ran ahead since cannot move.
    pub fn clock_in_step_at(&self) -> Result<Option<DateTime<Utc>>, InventoryError> {
        Ok(self
            .setting_seconds(CLOCK_IN_STEP_AT)?
            .and_then(|at| DateTime::from_timestamp(at, 0)))
    }

    /// A `settings` value that holds whole seconds (`None`: unset or not a number).
    fn setting_seconds(&self, key: &str) -> Result<Option<i64>, InventoryError> {
        self.db(self.conn.query_row(
            "SELECT TRY_CAST(max(value) AS BIGINT) FROM settings WHERE key = ?",
            params![key],
            |row| row.get(0),
        ))
    }

    /// How far this manager's clock was ahead of its agents' (seconds, negative: behind) at
    /// the last poll that heard one, and when that was by the manager's clock
    /// (`CLOCK_AHEAD_SECONDS` and `CLOCK_CHECKED_AT` in `settings`, written by pm-poll).
    pub fn clock_against_agents(&self) -> Result<Option<(i64, DateTime<Utc>)>, InventoryError> {
        let (Some(ahead), Some(at)) = (
            self.setting_seconds(CLOCK_AHEAD_SECONDS)?,
            self.setting_seconds(CLOCK_CHECKED_AT)?,
        ) else {
            return Ok(None);
        };
        Ok(DateTime::from_timestamp(at, 0).map(|at| (ahead, at)))
    }

    /// When the oldest poll kept was recorded (`None`: no polls).
    pub fn oldest_poll_at(&self) -> Result<Option<DateTime<Utc>>, InventoryError> {
        let seconds: Option<f64> =
            self.db(self
                .conn
                .query_row("SELECT epoch(min(polled_at)) FROM polls", [], |row| {
                    row.get(0)
                }))?;
        Ok(seconds.map(from_epoch))
    }

    /// Deletes polls older than `polls_before` and, with `history_before`, the history older
    /// than that (the tables of `HISTORY`); `dry_run` only counts. The caller holds a transaction.
    pub fn prune(
        &self,
        polls_before: DateTime<Utc>,
        history_before: Option<DateTime<Utc>>,
        dry_run: bool,
    ) -> Result<Pruned, InventoryError> {
        let run = |table: &str, condition: &str, before: DateTime<Utc>| {
            let cutoff = epoch(before);
            if dry_run {
                self.db(self.conn.query_row(
                    &format!("SELECT count(*) FROM {table} WHERE {condition}"),
                    params![cutoff],
                    |row| row.get::<_, i64>(0),
                ))
                .map(|n| n as usize)
            } else {
                self.db(self.conn.execute(
                    &format!("DELETE FROM {table} WHERE {condition}"),
                    params![cutoff],
                ))
            }
        };
        let mut pruned = Pruned {
            polls: run("polls", "polled_at < to_timestamp(?)", polls_before)?,
            ..Pruned::default()
        };
        if let Some(before) = history_before {
            let [scans, findings, updates, versions] = HISTORY;
            pruned.scans = run(scans.0, scans.1, before)?;
            pruned.scan_findings = run(findings.0, findings.1, before)?;
            pruned.update_runs = run(updates.0, updates.1, before)?;
            pruned.component_versions = run(versions.0, versions.1, before)?;
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn count(inventory: &Inventory, table: &str) -> i64 {
        inventory
            .conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .unwrap()
    }

    /// A new inventory in a temporary home holding the rows `sql` inserts.
    fn inventory_with(sql: &str) -> (tempfile::TempDir, Inventory) {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), Duration::from_secs(5)).unwrap();
        inventory.conn.execute_batch(sql).unwrap();
        (home, inventory)
    }

    #[test]
    fn pruning_keeps_recent_history_and_each_hosts_newest_version() {
        // Two hosts; days ago: 400 and 10. web-2's only version is 400 days old.
        let (_home, inventory) = inventory_with(
            "INSERT INTO polls VALUES
                     (1, 1, now() - INTERVAL 400 DAY, true, NULL, NULL, 1),
                     (2, 1, now() - INTERVAL 10 DAY, true, NULL, NULL, 1);
                 INSERT INTO scans VALUES
                     ('web-1', 's1', now() - INTERVAL 400 DAY, now() - INTERVAL 400 DAY, 1,
                      'clamav', 'clamscan', '/', 1, 'infected', 1, NULL, now()),
                     ('web-1', 's2', now() - INTERVAL 10 DAY, now() - INTERVAL 10 DAY, 1,
                      'clamav', 'clamscan', '/', 1, 'clean', 0, NULL, now());
                 INSERT INTO scan_findings VALUES
                     ('web-1', 's1', '/x', 'Eicar', now() - INTERVAL 400 DAY);
                 INSERT INTO update_runs VALUES
                     ('web-1', 'u1', 'manager', 'update', now() - INTERVAL 400 DAY,
                      now() - INTERVAL 400 DAY, true, true, 'r1', NULL, NULL, now()),
                     ('web-1', 'u2', 'manager', 'update', now() - INTERVAL 10 DAY,
                      now() - INTERVAL 10 DAY, true, true, 'r2', 'r1', NULL, now());
                 INSERT INTO component_versions VALUES
                     ('web-1', 'daily', '1', NULL, 'r1', now() - INTERVAL 400 DAY),
                     ('web-1', 'daily', '2', NULL, 'r2', now() - INTERVAL 300 DAY),
                     ('web-1', 'daily', '3', NULL, 'r3', now() - INTERVAL 10 DAY),
                     ('web-2', 'daily', '1', NULL, 'r1', now() - INTERVAL 400 DAY);",
        );
        let days_ago = |days: i64| Utc::now() - chrono::Duration::days(days);

        // Counting changes nothing.
        let counted = inventory
            .prune(days_ago(30), Some(days_ago(365)), true)
            .unwrap();
        let expected = Pruned {
            polls: 1,
            scans: 1,
            scan_findings: 1,
            update_runs: 1,
            component_versions: 1,
        };
        assert_eq!(counted, expected);
        assert_eq!(count(&inventory, "polls"), 2);

        // Without keep_history, only polls go.
        let polls_only = inventory.prune(days_ago(30), None, false).unwrap();
        assert_eq!(
            polls_only,
            Pruned {
                polls: 1,
                ..Pruned::default()
            }
        );
        assert_eq!(count(&inventory, "scans"), 2);

        let pruned = inventory
            .prune(days_ago(30), Some(days_ago(365)), false)
            .unwrap();
        assert_eq!(
            pruned,
            Pruned {
                polls: 0,
                ..expected
            }
        );
        let versions: Vec<(String, String)> = {
            let mut statement = inventory
                .conn
                .prepare("SELECT host, version FROM component_versions ORDER BY host, version")
                .unwrap();
            statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        // web-1's 300-day-old version is newer than the cutoff; web-2's only one stays.
        let expected_versions = [("web-1", "2"), ("web-1", "3"), ("web-2", "1")]
            .map(|(h, v)| (h.to_string(), v.to_string()));
        assert_eq!(versions, expected_versions);
        assert_eq!(inventory.last_prune_at(Utc::now()).unwrap(), None);
    }

    #[test]
    fn rows_stamped_after_the_clock_are_counted_and_do_not_hold_off_the_prune() {
        // Polls of job 1 (10 days ago), job 3 (100 days ahead) and job 4 (a minute ahead: a
        // run writing meanwhile); a prune stamped 100 days ahead.
        let (_home, inventory) = inventory_with(
            "INSERT INTO polls VALUES
                 (1, 1, now() - INTERVAL 10 DAY, true, NULL, NULL, 1),
                 (3, 1, now() + INTERVAL 100 DAY, true, NULL, NULL, 1),
                 (4, 1, now() + INTERVAL 1 MINUTE, true, NULL, NULL, 1);",
        );
        let now = Utc::now();
        inventory
            .insert_job("prune", now + chrono::Duration::days(100), "ok", "")
            .unwrap();
        assert_eq!(inventory.last_prune_at(now).unwrap(), None);
        assert_eq!(inventory.polls_stamped_ahead(now, None).unwrap(), 1);
        // Its own polls stamped ahead are no sign of a clock that was.
        assert_eq!(inventory.polls_stamped_ahead(now, Some(3)).unwrap(), 0);
    }

    #[test]
    fn only_a_clock_found_not_ahead_of_the_agents_moves_the_prune_reference() {
        let (_home, inventory) = inventory_with("");
        assert_eq!(inventory.clock_in_step_at().unwrap(), None);
        let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
        let hour = chrono::Duration::hours(1);
        inventory
            .save_clock_against_agents(hour, now, true)
            .unwrap();
        assert_eq!(inventory.clock_in_step_at().unwrap(), Some(now));
        // In step, but measured against too few agents to vouch for it.
        let soon = now + hour;
        inventory
            .save_clock_against_agents(hour, soon, false)
            .unwrap();
        assert_eq!(inventory.clock_in_step_at().unwrap(), Some(now));
        // Far ahead: recorded, but it vouches for nothing.
        let later = now + chrono::Duration::days(300);
        inventory
            .save_clock_against_agents(chrono::Duration::days(300), later, true)
            .unwrap();
        assert_eq!(inventory.clock_in_step_at().unwrap(), Some(now));
        assert_eq!(
            inventory.clock_against_agents().unwrap(),
            Some((300 * 86_400, later))
        );
        // Behind: its stamps are earlier than the truth, so they age nothing early.
        inventory
            .save_clock_against_agents(-hour * 5, later, true)
            .unwrap();
        assert_eq!(inventory.clock_in_step_at().unwrap(), Some(later));
    }
}
