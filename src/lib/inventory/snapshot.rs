//! The exporter's reads: a few set-based queries over the views that give everything
//! `/metrics` shows (`pm::exporter`), in plain structs, so the file is open only while they run.
//! Timestamps are Unix seconds; versions are numbers only where the inventory's text is an
//! integer (ClamAV's are), everything else is left out rather than guessed.

use std::path::Path;

use duckdb::AccessMode;

use super::{INVENTORY_FILE, Inventory, InventoryError, MIGRATIONS, open_with_retry};

/// One active host as `fleet_status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMetrics {
    /// Host name.
    pub host: String,
    /// Its group.
    pub group: String,
    /// The last poll succeeded.
    pub reachable: bool,
    /// No successful contact for `inactive_after`.
    pub inactive: bool,
    /// Last poll attempt.
    pub last_poll: Option<f64>,
    /// Last successful poll.
    pub last_ok: Option<f64>,
    /// Last install run the agent reported.
    pub last_update: Option<f64>,
    /// Whether that run succeeded.
    pub last_update_ok: Option<bool>,
    /// Last scan.
    pub last_scan: Option<f64>,
    /// Findings of the last scan that ran to completion (a failed one only ever raises them).
    pub scan_findings: Option<i64>,
    /// `green`, `yellow`, `red` or `unknown`.
    pub version_colour: String,
    /// `green`, `yellow` or `red`.
    pub scan_colour: String,
    /// License expiry.
    pub license_expiry: Option<f64>,
    /// pm-agent version.
    pub agent_version: Option<String>,
    /// A hold is in force: rollouts and its own schedule leave it alone.
    pub held: bool,
    /// When that hold ends by itself (none: until released, or not held).
    pub held_until: Option<f64>,
}

/// One installed component of an active host (`host_versions`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostComponentMetrics {
    /// Host name.
    pub host: String,
    /// Its group.
    pub group: String,
    /// The product the component came from (`clamav`; empty when the inventory cannot tell).
    pub product: String,
    /// Component name (`daily`).
    pub component: String,
    /// Installed version, when it is an integer.
    pub version: Option<i64>,
    /// Upstream build time of the installed version.
    pub build_time: Option<f64>,
    /// Versions behind dist (never negative), when both versions are integers.
    pub behind: Option<i64>,
    /// A component of dist the agent would install and the host lacks (`host_versions.missing`).
    pub missing: bool,
}

/// What dist is (the newest `dist_history` row).
#[derive(Debug, Clone, PartialEq)]
pub struct DistMetrics {
    /// The revision dist serves.
    pub revision: String,
    /// Its serial.
    pub serial: Option<i64>,
    /// When dist last changed (publish or rollback).
    pub changed_at: Option<f64>,
    /// backup/1..3 after that change; empty strings for empty generations.
    pub backups: Vec<String>,
}

/// One component of dist.
#[derive(Debug, Clone, PartialEq)]
pub struct DistComponentMetrics {
    /// Product (`clamav`).
    pub product: String,
    /// Component (`daily`).
    pub component: String,
    /// Version, when it is an integer.
    pub version: Option<i64>,
    /// Upstream build time.
    pub build_time: Option<f64>,
}

/// One mirrored product.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductMetrics {
    /// Product name.
    pub product: String,
    /// Last sync attempt.
    pub last_sync: Option<f64>,
    /// Last successful sync.
    pub last_success: Option<f64>,
    /// End of the upstream cool-down, while it lasts.
    pub cooldown_until: Option<f64>,
    /// `component=version,...` as upstream last answered.
    pub upstream_versions: Option<String>,
}

/// A rollout the exporter may show: running by its record, or the most recent one.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutMetrics {
    /// Its job id.
    pub job_id: i64,
    /// `update` or `rollback`.
    pub kind: String,
    /// State as recorded (`running` may belong to a process that is gone).
    pub state: String,
    /// The process running it.
    pub pid: Option<i32>,
    /// The newest rollout of all.
    pub most_recent: bool,
}

/// Hosts per result in one wave of a rollout (`rollout_progress`).
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutWaveMetrics {
    /// Its job id.
    pub job_id: i64,
    /// `update` or `rollback`.
    pub kind: String,
    /// Wave number (0: canary; none: the hosts not asked, skipped or held).
    pub wave: Option<i64>,
    /// Hosts by result: ok, failed, skipped, not_attempted, pending, held.
    pub results: [(&'static str, i64); 6],
}

/// Everything the exporter reads in one visit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Active hosts.
    pub hosts: Vec<HostMetrics>,
    /// Their installed components.
    pub host_components: Vec<HostComponentMetrics>,
    /// dist, when something is published.
    pub dist: Option<DistMetrics>,
    /// The newest revision (latest).
    pub latest_revision: Option<String>,
    /// dist's components.
    pub dist_components: Vec<DistComponentMetrics>,
    /// Mirrored products.
    pub products: Vec<ProductMetrics>,
    /// Last air-gap bundle import.
    pub last_bundle_import: Option<f64>,
    /// Running rollouts and the most recent one.
    pub rollouts: Vec<RolloutMetrics>,
    /// Active hosts' certificate expiry (from `hosts`, not `fleet_status`).
    pub host_certificates: Vec<super::HostCertificateExpiry>,
}

impl Inventory {
    /// Opens the inventory read-only for one snapshot: a single attempt (a writer holding the
    /// file is [`InventoryError::Locked`] at once), never a migration; `None` when there is no
    /// file. An older schema is an error here, since migrating would take the write lock.
    pub fn open_for_snapshot(home: &Path) -> Result<Option<Inventory>, InventoryError> {
        let path = home.join(INVENTORY_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let conn = open_with_retry(&path, AccessMode::ReadOnly, std::time::Duration::ZERO)?;
        let inventory = Inventory { conn, path };
        // One thread: the queries are small, and a long-running exporter should not keep a
        // buffer per core nor take both cores from the scrapes it serves meanwhile.
        inventory.db(inventory.conn.execute_batch("SET threads = 1"))?;
        let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        let found = inventory.schema_version()?;
        if found != known {
            return Err(if found > known {
                InventoryError::TooNew {
                    path: inventory.path.clone(),
                    found,
                    known,
                }
            } else {
                InventoryError::TooOld {
                    path: inventory.path.clone(),
                    found,
                    known,
                }
            });
        }
        Ok(Some(inventory))
    }

    /// Reads everything but the rollout waves (see [`Inventory::rollout_waves`]).
    pub fn metrics_snapshot(&self) -> Result<MetricsSnapshot, InventoryError> {
        Ok(MetricsSnapshot {
            hosts: self.host_metrics()?,
            host_components: self.host_component_metrics()?,
            dist: self.dist_metrics()?,
            latest_revision: self.db(self.conn.query_row(
                "SELECT max_by(revision, serial) FROM revisions",
                [],
                |row| row.get(0),
            ))?,
            dist_components: self.dist_component_metrics()?,
            products: self.product_metrics()?,
            last_bundle_import: self
                .last_bundle_import()?
                .map(|b| b.at.timestamp_micros() as f64 / 1e6),
            rollouts: self.rollout_metrics()?,
            host_certificates: self.certificate_metrics()?,
        })
    }

    fn host_metrics(&self) -> Result<Vec<HostMetrics>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, grp, reachable, inactive, epoch(last_poll_at), epoch(last_ok_at),
                    epoch(last_update_at), last_update_ok, epoch(last_scan_at),
                    last_scan_findings, version_colour, scan_colour,
                    epoch(license_expires_at), agent_version, held, epoch(held_until)
             FROM fleet_status ORDER BY host",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(HostMetrics {
                host: row.get(0)?,
                group: row.get(1)?,
                reachable: row.get(2)?,
                inactive: row.get(3)?,
                last_poll: row.get(4)?,
                last_ok: row.get(5)?,
                last_update: row.get(6)?,
                last_update_ok: row.get(7)?,
                last_scan: row.get(8)?,
                scan_findings: row.get(9)?,
                version_colour: row.get(10)?,
                scan_colour: row.get(11)?,
                license_expiry: row.get(12)?,
                agent_version: row.get(13)?,
                held: row.get(14)?,
                held_until: row.get(15)?,
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    fn host_component_metrics(&self) -> Result<Vec<HostComponentMetrics>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, grp, component, TRY_CAST(installed_version AS BIGINT),
                    epoch(installed_build_time),
                    CASE WHEN TRY_CAST(installed_version AS BIGINT) IS NOT NULL
                              AND TRY_CAST(dist_version AS BIGINT) IS NOT NULL
                         THEN behind_by END,
                    coalesce(product, ''), missing
             FROM host_versions ORDER BY host, product, component",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(HostComponentMetrics {
                host: row.get(0)?,
                group: row.get(1)?,
                product: row.get(6)?,
                component: row.get(2)?,
                version: row.get(3)?,
                build_time: row.get(4)?,
                behind: row.get(5)?,
                missing: row.get(7)?,
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    fn dist_metrics(&self) -> Result<Option<DistMetrics>, InventoryError> {
        use duckdb::OptionalExt;
        let row = self.db(self
            .conn
            .query_row(
                "SELECT d.revision, r.serial, epoch(d.changed_at), d.backups
                     FROM dist_history d LEFT JOIN revisions r USING (revision)
                     ORDER BY d.id DESC LIMIT 1",
                [],
                |row| {
                    Ok(DistMetrics {
                        revision: row.get(0)?,
                        serial: row.get(1)?,
                        changed_at: row.get(2)?,
                        backups: row
                            .get::<_, Option<String>>(3)?
                            .unwrap_or_default()
                            .split(',')
                            .map(str::to_string)
                            .collect(),
                    })
                },
            )
            .optional())?;
        Ok(row)
    }

    fn dist_component_metrics(&self) -> Result<Vec<DistComponentMetrics>, InventoryError> {
        // `dist_components` without the product, which the metric labels carry.
        let mut statement = self.db(self.conn.prepare(
            "SELECT f.product, f.component,
                    CASE WHEN bool_and(TRY_CAST(f.version AS BIGINT) IS NOT NULL)
                         THEN max(TRY_CAST(f.version AS BIGINT)) END,
                    epoch(max(f.build_time))
             FROM revision_files f
             WHERE f.revision = (SELECT revision FROM dist_history ORDER BY id DESC LIMIT 1)
               AND f.version IS NOT NULL
             GROUP BY f.product, f.component
             ORDER BY f.product, f.component",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(DistComponentMetrics {
                product: row.get(0)?,
                component: row.get(1)?,
                version: row.get(2)?,
                build_time: row.get(3)?,
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    fn product_metrics(&self) -> Result<Vec<ProductMetrics>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "WITH syncs AS (
                 SELECT product, max(started_at) AS last_sync FROM mirror_syncs GROUP BY product
             )
             SELECT coalesce(p.product, s.product), epoch(s.last_sync), epoch(p.last_success_at),
                    -- An expired cool-down is none (as pm-mirror status shows it).
                    CASE WHEN p.cooldown_until > now() THEN epoch(p.cooldown_until) END,
                    p.upstream_versions
             FROM mirror_products p FULL JOIN syncs s ON s.product = p.product
             ORDER BY 1",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(ProductMetrics {
                product: row.get(0)?,
                last_sync: row.get(1)?,
                last_success: row.get(2)?,
                cooldown_until: row.get(3)?,
                upstream_versions: row.get(4)?,
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    fn rollout_metrics(&self) -> Result<Vec<RolloutMetrics>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT job_id, kind, state, pid, job_id = (SELECT max(job_id) FROM rollouts)
             FROM rollouts
             WHERE state = 'running' OR job_id = (SELECT max(job_id) FROM rollouts)
             ORDER BY job_id",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(RolloutMetrics {
                job_id: row.get(0)?,
                kind: row.get(1)?,
                state: row.get(2)?,
                pid: row.get(3)?,
                most_recent: row.get(4)?,
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// `rollout_progress` of these rollouts, by job and wave.
    pub fn rollout_waves(
        &self,
        job_ids: &[i64],
    ) -> Result<Vec<RolloutWaveMetrics>, InventoryError> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        let list = job_ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut statement = self.db(self.conn.prepare(&format!(
            "SELECT job_id, kind, wave, ok, failed, skipped, not_attempted, pending, held
             FROM rollout_progress WHERE job_id IN ({list}) ORDER BY job_id, wave NULLS LAST"
        )))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(RolloutWaveMetrics {
                job_id: row.get(0)?,
                kind: row.get(1)?,
                wave: row.get(2)?,
                results: [
                    ("ok", row.get(3)?),
                    ("failed", row.get(4)?),
                    ("skipped", row.get(5)?),
                    ("not_attempted", row.get(6)?),
                    ("pending", row.get(7)?),
                    ("held", row.get(8)?),
                ],
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }
}
