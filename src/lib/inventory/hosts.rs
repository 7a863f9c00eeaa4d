//! The host registry's DuckDB side (the rules are `crate::hosts`): renames that move a host's
//! whole history in one statement per table, the certificate each host presents, and the reads
//! `pm-doctor` and the exporter make of certificate expiry.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use duckdb::params;
use duckdb::types::{TimeUnit, Value};

use super::{Inventory, InventoryError, from_epoch, to_epoch};
use crate::hosts::HostCertificate;
use crate::inventory::PolledHost;

/// One active host's certificate expiry, for the exporter and `pm-doctor`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCertificateExpiry {
    /// Host name.
    pub host: String,
    /// Its group.
    pub group: String,
    /// Its agent's address.
    pub address: String,
    /// When its certificate expires.
    pub expires_at: DateTime<Utc>,
}

impl Inventory {
    /// Every table other than `hosts` with a `host` column: the host's history and current
    /// state (`host_ids`, `component_versions`, `scans`, `scan_findings`, `update_runs`,
    /// `host_state`, `installed_components`, `job_results`, `revoked_certificates` and any added
    /// later), read from the catalogue so that a new table is never left behind by a rename.
    fn tables_naming_hosts(&self) -> Result<Vec<String>, InventoryError> {
        self.query_strings(
            "SELECT t.table_name
             FROM duckdb_tables() t
             JOIN duckdb_columns() c
               ON c.database_name = t.database_name AND c.schema_name = t.schema_name
              AND c.table_name = t.table_name
             WHERE t.database_name = current_database() AND t.schema_name = 'main'
               AND NOT t.temporary AND c.column_name = 'host' AND t.table_name <> 'hosts'
             ORDER BY 1",
        )
    }

    /// The tables holding rows under `name` (no host row needed: history outlives hosts).
    pub fn name_history(&self, name: &str) -> Result<Vec<String>, InventoryError> {
        let mut found = Vec::new();
        for table in self.tables_naming_hosts()? {
            let rows: i64 = self.db(self.conn.query_row(
                &format!("SELECT count(*) FROM \"{table}\" WHERE host = ?"),
                params![name],
                |row| row.get(0),
            ))?;
            if rows > 0 {
                found.push(table);
            }
        }
        Ok(found)
    }

    /// Renames host `from` to `to` everywhere: its row and every row of its history and state,
    /// so that nothing stays behind under the old name. Call inside
    /// [`Inventory::transaction`]. `Ok(Err(tables))` when `to` is already a host or has rows in
    /// those tables: nothing was changed (a rename never mixes two histories).
    pub fn rename_host(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Result<usize, Vec<String>>, InventoryError> {
        let mut taken = self.name_history(to)?;
        let hosts: i64 = self.db(self.conn.query_row(
            "SELECT count(*) FROM hosts WHERE host = ?",
            params![to],
            |row| row.get(0),
        ))?;
        if hosts > 0 {
            taken.insert(0, "hosts".into());
        }
        if !taken.is_empty() {
            return Ok(Err(taken));
        }
        let mut moved = 0;
        for table in self.tables_naming_hosts()? {
            moved += self.db(self.conn.execute(
                &format!("UPDATE \"{table}\" SET host = ? WHERE host = ?"),
                params![to, from],
            ))?;
        }
        moved += self.db(self.conn.execute(
            "UPDATE hosts SET host = ? WHERE host = ?",
            params![to, from],
        ))?;
        Ok(Ok(moved))
    }

    /// Of `names`, those that are not active hosts now: renamed or deactivated since the
    /// command that asked them read the inventory. The recorders (polls, rollout attempts,
    /// holds) leave their rows out, so that no row lands under a name no host has (a ghost host
    /// split from its history), and warn naming each (`what`: what was left out).
    pub fn gone_hosts<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        what: &str,
    ) -> Result<HashSet<String>, InventoryError> {
        let active: HashSet<String> = self
            .query_strings("SELECT host FROM hosts WHERE state = 'active'")?
            .into_iter()
            .collect();
        let gone: HashSet<String> = names
            .into_iter()
            .filter(|name| !active.contains(*name))
            .map(str::to_string)
            .collect();
        for name in &gone {
            tracing::warn!(
                host = %name,
                "{what} of `{name}` not recorded: it is no longer an active host (renamed or \
                 deactivated while this ran)"
            );
        }
        Ok(gone)
    }

    /// Every revoked certificate serial (lowercase hex) and the host it was revoked for.
    pub fn revoked_hosts(&self) -> Result<HashMap<String, String>, InventoryError> {
        let mut statement = self.db(self
            .conn
            .prepare("SELECT serial, coalesce(host, '') FROM revoked_certificates"))?;
        let rows = self.db(statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// Records the certificate a host presents now (serial, fingerprint, expiry).
    pub fn record_certificate(
        &self,
        host: &str,
        certificate: &HostCertificate,
    ) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "UPDATE hosts SET certificate_serial = ?, certificate_fingerprint = ?,
                 certificate_expires_at = to_timestamp(?)
             WHERE host = ?",
            params![
                certificate.serial,
                certificate.fingerprint,
                to_epoch(Some(certificate.expires_at)),
                host
            ],
        ))?;
        Ok(())
    }

    /// What the polls saw of certificates: a renewal the poll made (the new certificate; the
    /// old serial revoked as `renewed`), or a host presenting another certificate than recorded
    /// that expires later (a renewal recorded by nobody, e.g. a killed poll: recorded, the old
    /// serial revoked as `superseded`), or the expiry of a host activated before it was kept.
    /// Set-based: one `UPDATE` for all changed hosts.
    pub fn record_seen_certificates(&self, polled: &[PolledHost]) -> Result<usize, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, certificate_serial, epoch(certificate_expires_at)
             FROM hosts WHERE state = 'active'",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                (row.get::<_, Option<String>>(1)?, from_epoch(row.get(2)?)),
            ))
        }))?;
        let recorded: HashMap<String, (Option<String>, Option<DateTime<Utc>>)> = rows
            .collect::<Result<_, _>>()
            .map_err(|source| InventoryError::Db {
                path: self.path.clone(),
                source,
            })?;
        let mut changed: Vec<(&str, &HostCertificate)> = Vec::new();
        for poll in polled {
            let (Some(seen), Some((serial, expires_at))) =
                (&poll.certificate, recorded.get(&poll.host))
            else {
                continue;
            };
            let current = &seen.current;
            if let Some(old) = &seen.renewed_from {
                self.revoke_certificate(old, &poll.host, "renewed")?;
                changed.push((&poll.host, current));
            } else if serial.as_deref() == Some(current.serial.as_str()) {
                if *expires_at != Some(current.expires_at) {
                    changed.push((&poll.host, current));
                }
            } else if expires_at.is_none_or(|at| current.expires_at > at) {
                if let (Some(old), Some(_)) = (serial, expires_at) {
                    self.revoke_certificate(old, &poll.host, "superseded")?;
                }
                changed.push((&poll.host, current));
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        self.db(self.conn.execute_batch(
            "CREATE OR REPLACE TEMP TABLE seen_certificates (
                 host VARCHAR, serial VARCHAR, fingerprint VARCHAR, expires_at TIMESTAMPTZ)",
        ))?;
        let mut appender = self.db(self.conn.appender("seen_certificates"))?;
        for (host, certificate) in &changed {
            let row = [
                Value::Text(host.to_string()),
                Value::Text(certificate.serial.clone()),
                Value::Text(certificate.fingerprint.clone()),
                Value::Timestamp(
                    TimeUnit::Microsecond,
                    certificate.expires_at.timestamp_micros(),
                ),
            ];
            self.db(appender.append_row(duckdb::appender_params_from_iter(row)))?;
        }
        self.db(appender.flush())?;
        drop(appender);
        self.db(self.conn.execute_batch(
            "UPDATE hosts SET certificate_serial = s.serial, certificate_fingerprint = s.fingerprint,
                 certificate_expires_at = s.expires_at
             FROM seen_certificates s WHERE hosts.host = s.host;
             DROP TABLE seen_certificates;",
        ))?;
        Ok(changed.len())
    }

    /// Active hosts whose certificate expires before `before` (or has expired), soonest first.
    pub fn certificates_expiring(
        &self,
        before: DateTime<Utc>,
    ) -> Result<Vec<HostCertificateExpiry>, InventoryError> {
        self.certificate_expiries(Some(before))
    }

    /// Every active host's certificate expiry that the inventory knows, by host.
    pub fn certificate_metrics(&self) -> Result<Vec<HostCertificateExpiry>, InventoryError> {
        self.certificate_expiries(None)
    }

    fn certificate_expiries(
        &self,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<HostCertificateExpiry>, InventoryError> {
        let order = if before.is_some() {
            "certificate_expires_at, host"
        } else {
            "host"
        };
        let mut statement = self.db(self.conn.prepare(&format!(
            "SELECT host, host_group, address, epoch(certificate_expires_at)
             FROM hosts
             WHERE state = 'active' AND certificate_expires_at IS NOT NULL
               AND (? IS NULL OR certificate_expires_at < to_timestamp(?))
             ORDER BY {order}"
        )))?;
        let limit = to_epoch(before);
        let rows = self.db(statement.query_map(params![limit, limit], |row| {
            Ok(HostCertificateExpiry {
                host: row.get(0)?,
                group: row.get(1)?,
                address: row.get(2)?,
                expires_at: from_epoch(row.get(3)?).unwrap_or_default(),
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::inventory::HostRecord;

    fn inventory() -> (tempfile::TempDir, Inventory) {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), Duration::from_secs(1)).unwrap();
        (home, inventory)
    }

    #[test]
    fn every_table_with_a_host_column_is_part_of_a_rename() {
        let (_home, inventory) = inventory();
        assert_eq!(
            inventory.tables_naming_hosts().unwrap(),
            [
                "component_versions",
                "holds",
                "host_ids",
                "host_state",
                "installed_components",
                "job_results",
                "report_cursors",
                "revoked_certificates",
                "scan_findings",
                "scans",
                "update_runs",
            ]
        );
    }

    #[test]
    fn a_rename_moves_every_row_and_refuses_a_name_with_history() {
        let (_home, inventory) = inventory();
        inventory
            .upsert_host(&HostRecord::active("a22", "127.0.0.22:7505"))
            .unwrap();
        inventory
            .upsert_host(&HostRecord::active("a21", "127.0.0.21:7505"))
            .unwrap();
        inventory
            .conn
            .execute_batch(
                "INSERT INTO host_ids (host) VALUES ('a22'), ('a21');
                 INSERT INTO scans (host, scan_id, started_at, finished_at, result, findings,
                     recorded_at) VALUES ('a22', 's1', now(), now(), 'clean', 0, now());
                 INSERT INTO revoked_certificates VALUES ('ab', 'a22', now(), 'renewed');
                 INSERT INTO scans (host, scan_id, started_at, finished_at, result, findings,
                     recorded_at) VALUES ('gone', 's2', now(), now(), 'clean', 0, now());",
            )
            .unwrap();
        let refused = inventory.transaction(|inv| inv.rename_host("a22", "a21"));
        assert_eq!(
            refused.unwrap().unwrap_err(),
            ["hosts", "host_ids"],
            "an active host's name"
        );
        let refused = inventory.transaction(|inv| inv.rename_host("a22", "gone"));
        assert_eq!(
            refused.unwrap().unwrap_err(),
            ["scans"],
            "a name with history"
        );

        let moved = inventory.transaction(|inv| inv.rename_host("a22", "a23"));
        assert_eq!(moved.unwrap().unwrap(), 4);
        for table in ["hosts", "host_ids", "scans", "revoked_certificates"] {
            let count = |name: &str| {
                inventory
                    .query_strings(&format!(
                        "SELECT count(*)::VARCHAR FROM {table} WHERE host = '{name}'"
                    ))
                    .unwrap()
            };
            assert_eq!(count("a22"), ["0"], "{table}");
            assert_eq!(count("a23"), ["1"], "{table}");
        }
    }

    #[test]
    fn rows_for_a_host_renamed_or_deactivated_meanwhile_are_left_out() {
        use crate::inventory::{HoldRecord, HostAttempt, PollFailure};
        let (_home, inventory) = inventory();
        let names = ["a21", "a22", "a23"];
        for (n, host) in names.iter().enumerate() {
            let address = format!("127.0.0.{}:7505", 21 + n);
            inventory
                .upsert_host(&HostRecord::active(host, &address))
                .unwrap();
        }
        // A poll, a rollout and a hold read a21, a22 and a23; then a22 is renamed and a23
        // deactivated before they record.
        inventory
            .transaction(|inv| inv.rename_host("a22", "b22"))
            .unwrap()
            .unwrap();
        inventory.deactivate_host("a23", "deactivated").unwrap();
        let polled: Vec<PolledHost> = names
            .iter()
            .map(|host| PolledHost {
                host: host.to_string(),
                polled_at: Utc::now(),
                latency_ms: None,
                answer: Err(PollFailure {
                    kind: "timeout".into(),
                    message: "no answer".into(),
                }),
                certificate: None,
                clock_ahead_of_agent: None,
            })
            .collect();
        let attempts: Vec<HostAttempt> = names
            .iter()
            .map(|host| HostAttempt {
                host: host.to_string(),
                wave: Some(1),
                attempt: 1,
                result: "ok".into(),
                changed: Some(true),
                revision: Some("r2".into()),
                error: None,
            })
            .collect();
        let holds: Vec<HoldRecord> = names
            .iter()
            .map(|host| HoldRecord {
                host: host.to_string(),
                kind: "hold".into(),
                reason: "window".into(),
                revision: None,
                set_at: Utc::now(),
                set_by: "ops@manager".into(),
                until: None,
                job_id: Some(1),
                on_agent: true,
            })
            .collect();
        inventory
            .transaction(|inv| {
                inv.record_polls(1, &polled)?;
                inv.record_attempts(1, &attempts)?;
                inv.record_holds(&holds)
            })
            .unwrap();
        for table in ["host_ids", "host_state", "job_results", "holds"] {
            assert_eq!(
                inventory
                    .query_strings(&format!("SELECT DISTINCT host FROM {table} ORDER BY 1"))
                    .unwrap(),
                ["a21"],
                "{table}"
            );
        }
    }

    #[test]
    fn certificate_expiry_is_kept_and_read_back_for_the_exporter_and_doctor() {
        let (_home, inventory) = inventory();
        inventory
            .upsert_host(&HostRecord::active("web-1", "10.0.0.1:7505"))
            .unwrap();
        let at = |seconds| DateTime::from_timestamp(seconds, 0).unwrap();
        let certificate = HostCertificate {
            serial: "ab".into(),
            fingerprint: "sha256:00".into(),
            not_before: at(1_800_000_000),
            expires_at: at(1_831_536_000),
        };
        inventory.record_certificate("web-1", &certificate).unwrap();
        let expiries = inventory.certificate_metrics().unwrap();
        assert_eq!(expiries.len(), 1);
        assert_eq!(expiries[0].expires_at, at(1_831_536_000));
        assert_eq!(expiries[0].group, "default");
        assert!(
            inventory
                .certificates_expiring(at(1_831_536_000))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            inventory
                .certificates_expiring(at(1_831_536_001))
                .unwrap()
                .len(),
            1
        );
    }
}
