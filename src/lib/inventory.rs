//! The inventory: the one DuckDB file every manager tool shares (DESIGN.md section 5). This is
//! the only module that touches DuckDB. Writers open it only for their write, after all network
//! work, and retry while another process holds it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use duckdb::{AccessMode, Config, Connection, OptionalExt, params};

use crate::manifest::{FileEntry, Manifest};
use crate::profile::Profile;

mod query;
pub use query::{QueryError, QueryResult, QuerySink, QueryValue};

mod bulk;

mod hosts;
pub use hosts::HostCertificateExpiry;

mod poll;
mod rollout;
pub use poll::{FleetRow, PollCursors, PollFailure, PolledHost, RecordedPolls};
mod retention;
pub use retention::Pruned;
pub use rollout::{HostAttempt, RolloutRecord};

mod holds;
pub use holds::HoldRecord;

mod snapshot;
pub use snapshot::{
    DistComponentMetrics, DistMetrics, HostComponentMetrics, HostMetrics, MetricsSnapshot,
    ProductMetrics, RolloutMetrics, RolloutWaveMetrics,
};

mod history;
pub use history::{
    GeneratedHistory, HistoryReport, HistorySpec, QueryTiming, bench_host_name, history_benchmark,
    history_queries, parse_interval,
};

/// File name of the inventory inside `PM_HOME`.
pub const INVENTORY_FILE: &str = "inventory.duckdb";

/// Numbered schema migrations, applied in order on open.
const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "mirror", include_str!("../../sql/0001_mirror.sql")),
    (2, "bundles", include_str!("../../sql/0002_bundles.sql")),
    (
        3,
        "activation_keys",
        include_str!("../../sql/0003_activation_keys.sql"),
    ),
    (
        4,
        "accepted_bundles",
        include_str!("../../sql/0004_accepted_bundles.sql"),
    ),
    (5, "hosts", include_str!("../../sql/0005_hosts.sql")),
    (6, "setup", include_str!("../../sql/0006_setup.sql")),
    (7, "polls", include_str!("../../sql/0007_polls.sql")),
    (8, "rollouts", include_str!("../../sql/0008_rollouts.sql")),
    (
        9,
        "host_identity",
        include_str!("../../sql/0009_host_identity.sql"),
    ),
    (10, "holds", include_str!("../../sql/0010_holds.sql")),
    (
        11,
        "mirror_repairs",
        include_str!("../../sql/0011_mirror_repairs.sql"),
    ),
    (
        12,
        "agent_reports",
        include_str!("../../sql/0012_agent_reports.sql"),
    ),
    (
        13,
        "mirror_status",
        include_str!("../../sql/0013_mirror_status.sql"),
    ),
    (
        14,
        "manifest_keys",
        include_str!("../../sql/0014_manifest_keys.sql"),
    ),
];

/// Inventory errors.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// Another process kept the file locked past the lock timeout.
    #[error(
        "inventory `{path}` is locked by {holder} for more than {waited:?}; \
         likely a long pm-poll or pm-push, or a DuckDB CLI or Python session that opened it \
         read-write"
    )]
    Locked {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
    /// Any other DuckDB failure.
    #[error("inventory `{path}`: {source}")]
    Db {
        path: PathBuf,
        source: duckdb::Error,
    },
    /// The file has an older schema and this reader may not migrate it (the exporter).
    #[error(
        "inventory `{path}` has schema version {found}, older than this pm ({known}); \
         any pm tool that writes (pm-poll) migrates it"
    )]
    TooOld {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    /// The file was written by a newer pm.
    #[error("inventory `{path}` has schema version {found}, newer than this pm ({known})")]
    TooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
}

/// An open inventory.
impl InventoryError {
    /// A writer was killed with a write-ahead log that a read-only open cannot replay (DuckDB
    /// replays some logged schema changes only in a read-write open). Nothing is lost: the next
    /// read-write open replays it.
    pub fn is_unreplayable_wal(&self) -> bool {
        matches!(self, InventoryError::Db { source, .. }
            if source.to_string().contains("Failure while replaying WAL"))
    }
}

pub struct Inventory {
    conn: Connection,
    path: PathBuf,
}

/// One row of `mirror_syncs`.
#[derive(Debug, Clone)]
pub struct SyncRecord {
    /// Product name.
    pub product: String,
    /// `upstream`, `bundle` or `parent`.
    pub source: String,
    /// When the product's sync started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// `updated`, `unchanged`, `failed` or `cooldown`.
    pub result: String,
    /// Body bytes downloaded.
    pub bytes_downloaded: u64,
    /// `component=version` list after the sync.
    pub versions: String,
    /// New latest revision, if this sync made one.
    pub revision: Option<String>,
    /// Error text of a failure.
    pub error: Option<String>,
    /// sha256 of the bundle an import read.
    pub bundle_sha256: Option<String>,
    /// What the sync noted without failing, one note per line.
    pub warnings: Option<String>,
}

/// Per-product upstream state that later syncs and `status` read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProductState {
    /// Product name.
    pub product: String,
    /// `component=version` as last seen upstream.
    pub upstream_versions: Option<String>,
    /// When upstream last answered.
    pub upstream_checked_at: Option<DateTime<Utc>>,
    /// Last sync that ended well.
    pub last_success_at: Option<DateTime<Utc>>,
    /// Last sync that failed.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Its error.
    pub last_error: Option<String>,
    /// Upstream asked us to stay away until then.
    pub cooldown_until: Option<DateTime<Utc>>,
    /// Why (`HTTP 429 from <url>`).
    pub cooldown_reason: Option<String>,
    /// JSON map of URL -> conditional request validators.
    pub validators: Option<String>,
    /// JSON map of component -> [`UpstreamComponent`]: what the last sync that contacted
    /// upstream learnt of each component, failed or not (`pm-mirror status`).
    pub upstream_components: Option<String>,
}

/// One component as the last sync that contacted upstream saw it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamComponent {
    /// The version upstream offered, when the sync read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why the sync failed on this component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProductState {
    /// What the last sync that contacted upstream learnt per component; None before the first
    /// such sync (or one recorded before this was kept).
    pub fn upstream_components(
        &self,
    ) -> Option<std::collections::BTreeMap<String, UpstreamComponent>> {
        serde_json::from_str(self.upstream_components.as_deref()?).ok()
    }

    /// Records what a sync learnt per component.
    pub fn set_upstream_components(
        &mut self,
        components: impl IntoIterator<Item = (String, UpstreamComponent)>,
    ) {
        let map: std::collections::BTreeMap<String, UpstreamComponent> =
            components.into_iter().collect();
        self.upstream_components = serde_json::to_string(&map).ok();
    }
}

/// The newest bundle import.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BundleImport {
    /// When it finished.
    pub at: DateTime<Utc>,
    /// sha256 of the bundle file.
    pub bundle_sha256: Option<String>,
    /// The local revision it made (none when it changed nothing).
    pub revision: Option<String>,
}

/// Where a product's current content came from: the sync or bundle import that brought it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ContentOrigin {
    /// Product name.
    #[serde(skip)]
    pub product: String,
    /// `upstream`, `parent` or `bundle` (`pm-mirror import`).
    pub source: String,
    /// When that sync or import finished.
    pub at: DateTime<Utc>,
    /// The revision it made.
    pub revision: Option<String>,
    /// sha256 of the bundle, for an import.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_sha256: Option<String>,
    /// What it noted without failing, one note per line.
    #[serde(skip)]
    pub warnings: Option<String>,
}

/// A publish that tried to change dist, and how it ended (`mirror_publishes`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PublishAttempt {
    /// When it ended.
    pub at: DateTime<Utc>,
    /// `published`, `refused` (exit 2: a rolled-back revision, ...) or `failed` (exit 1); or
    /// `up_to_date`: the first run with nothing to do after a refused or failed one.
    pub result: String,
    /// latest: the revision it tried to publish (none when latest was empty).
    pub revision: Option<String>,
    /// What dist is after it: the previous revision still, unless it published.
    pub dist: Option<String>,
    /// Why it was refused or failed.
    pub error: Option<String>,
}

/// A stored activation key (never the secret itself).
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationKeyRecord {
    /// Public identifier, the part before the dot.
    pub id: String,
    /// sha256 of the secret part.
    pub secret_sha256: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// Uses allowed; `None` for any number until expiry.
    pub max_uses: Option<i32>,
    /// Uses so far.
    pub uses: i32,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Free text for people.
    pub comment: Option<String>,
}

/// A host enrolled by `pm-activate host` (one row of `hosts`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HostRecord {
    /// The name in its certificate.
    pub host: String,
    /// `host:port` of its agent API.
    pub address: String,
    /// Its group.
    pub group: String,
    /// Its scan profile.
    pub profile: String,
    /// Labels as a JSON object text.
    pub labels: String,
    /// Serial (lowercase hex) of the certificate the manager issued.
    pub certificate_serial: Option<String>,
    /// Fingerprint of that certificate.
    pub certificate_fingerprint: Option<String>,
    /// End of that certificate's validity (`pm-poll` renews it well before).
    pub certificate_expires_at: Option<DateTime<Utc>>,
    /// pm-agent version it reported.
    pub agent_version: Option<String>,
    /// Engine adapter it reported.
    pub engine: Option<String>,
    /// When it was (last) activated.
    pub activated_at: Option<DateTime<Utc>>,
    /// Id of the activation key used.
    pub activation_key_id: Option<String>,
    /// `active` or `deactivated`.
    pub state: String,
    /// When it was deactivated.
    pub deactivated_at: Option<DateTime<Utc>>,
    /// Setup steps not confirmed by the agent yet, comma separated ('' when complete).
    pub setup_failed: String,
    /// sha256 of the license the agent holds.
    pub license_sha256: Option<String>,
}

impl HostRecord {
    /// An active host known by name and address only: group and profile `default`, no labels,
    /// nothing reported yet.
    pub fn active(host: &str, address: &str) -> HostRecord {
        HostRecord {
            host: host.into(),
            address: address.into(),
            group: "default".into(),
            profile: crate::profile::DEFAULT_PROFILE.into(),
            labels: "{}".into(),
            certificate_serial: None,
            certificate_fingerprint: None,
            certificate_expires_at: None,
            agent_version: None,
            engine: None,
            activated_at: None,
            activation_key_id: None,
            state: "active".into(),
            deactivated_at: None,
            setup_failed: String::new(),
            license_sha256: None,
        }
    }
}

/// A registered license file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseRecord {
    /// sha256 of its content (also its file name under `PM_HOME/licenses/`).
    pub sha256: String,
    /// The name agents store it under.
    pub file_name: String,
    /// Its size.
    pub size_bytes: i64,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// When it was registered.
    pub added_at: DateTime<Utc>,
}

/// One publish or rollback of dist.
#[derive(Debug, Clone)]
pub struct DistChange {
    /// `publish` or `rollback`.
    pub action: String,
    /// What dist became.
    pub revision: String,
    /// What dist was.
    pub previous_revision: Option<String>,
    /// backup/1..3 after the change.
    pub backups: Vec<String>,
    /// Revision moved into the archive.
    pub archived: Option<String>,
}

fn to_epoch(time: Option<DateTime<Utc>>) -> Option<f64> {
    time.map(|t| t.timestamp_micros() as f64 / 1e6)
}

fn from_epoch(seconds: Option<f64>) -> Option<DateTime<Utc>> {
    seconds.and_then(|s| DateTime::from_timestamp_micros((s * 1e6).round() as i64))
}

impl Inventory {
    /// Opens (creating and migrating) the inventory for writing, waiting up to `lock_timeout`
    /// while another process holds it.
    pub fn open(home: &Path, lock_timeout: Duration) -> Result<Inventory, InventoryError> {
        std::fs::create_dir_all(home).map_err(|err| InventoryError::Db {
            path: home.to_owned(),
            source: duckdb::Error::ToSqlConversionFailure(Box::new(err)),
        })?;
        let path = home.join(INVENTORY_FILE);
        if !path.exists() {
            create_complete(&path)?;
        } else {
            // A first run killed between linking its inventory into place and removing the
            // staging name left that name behind: the writers after it remove it.
            remove_abandoned_staging(home);
        }
        let conn = open_with_retry(&path, AccessMode::ReadWrite, lock_timeout)?;
        // Appended timestamps are UTC; DuckDB would read them in the session's time zone.
        let _ = conn.execute_batch("SET TimeZone = 'UTC'");
        let inventory = Inventory { conn, path };
        inventory.migrate()?;
        Ok(inventory)
    }

    /// Opens the inventory read-only; `None` when it does not exist yet.
    pub fn open_read_only(
        home: &Path,
        lock_timeout: Duration,
    ) -> Result<Option<Inventory>, InventoryError> {
        let path = home.join(INVENTORY_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let conn = match open_with_retry(&path, AccessMode::ReadOnly, lock_timeout) {
            Err(err) if err.is_unreplayable_wal() => {
                // As for a migration: replay it once, briefly read-write, then read.
                drop(Inventory::open(home, lock_timeout)?);
                open_with_retry(&path, AccessMode::ReadOnly, lock_timeout)?
            }
            other => other?,
        };
        let inventory = Inventory { conn, path };
        let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if inventory.schema_version()? < known {
            // Written by an older pm: migrate once (briefly read-write), then read.
            drop(inventory);
            drop(Inventory::open(home, lock_timeout)?);
            return Inventory::open_read_only(home, lock_timeout);
        }
        Ok(Some(inventory))
    }

    fn db<T>(&self, result: duckdb::Result<T>) -> Result<T, InventoryError> {
        result.map_err(|source| InventoryError::Db {
            path: self.path.clone(),
            source,
        })
    }

    /// The schema version applied to this file: 0 for a file no migration ever completed in
    /// (a first run killed while creating it), which the next writer migrates.
    pub fn schema_version(&self) -> Result<u32, InventoryError> {
        let tables: i64 = self.db(self.conn.query_row(
            "SELECT count(*) FROM duckdb_tables() \
             WHERE schema_name = 'main' AND table_name = 'schema_migrations'",
            [],
            |row| row.get(0),
        ))?;
        if tables == 0 {
            return Ok(0);
        }
        let version: Option<u32> = self.db(self.conn.query_row(
            "SELECT max(version) FROM schema_migrations",
            [],
            |row| row.get(0),
        ))?;
        Ok(version.unwrap_or(0))
    }

    fn migrate(&self) -> Result<(), InventoryError> {
        self.db(self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL)",
        ))?;
        let current = self.schema_version()?;
        let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > known {
            return Err(InventoryError::TooNew {
                path: self.path.clone(),
                found: current,
                known,
            });
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            let apply = || -> duckdb::Result<()> {
                self.conn.execute_batch("BEGIN TRANSACTION")?;
                self.conn.execute_batch(sql)?;
                self.conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, now())",
                    params![version, name],
                )?;
                self.conn.execute_batch("COMMIT")
            };
            if let Err(err) = apply() {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(InventoryError::Db {
                    path: self.path.clone(),
                    source: err,
                });
            }
            tracing::debug!(version, name, "applied inventory migration");
        }
        if current < known {
            // Schema changes left in the log are what DuckDB replays worst after a kill (and
            // read-only opens not at all): fold them into the file at once.
            self.db(self.conn.execute_batch("CHECKPOINT"))?;
        }
        Ok(())
    }

    /// Runs `body` in one transaction: all of it lands or none.
    pub fn transaction<T>(
        &self,
        body: impl FnOnce(&Inventory) -> Result<T, InventoryError>,
    ) -> Result<T, InventoryError> {
        self.db(self.conn.execute_batch("BEGIN TRANSACTION"))?;
        match body(self) {
            Ok(value) => {
                self.db(self.conn.execute_batch("COMMIT"))?;
                Ok(value)
            }
            Err(err) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(err)
            }
        }
    }

    /// Inserts a finished job and returns its id.
    pub fn insert_job(
        &self,
        kind: &str,
        started_at: DateTime<Utc>,
        status: &str,
        summary: &str,
    ) -> Result<i64, InventoryError> {
        let actor = actor();
        self.db(self.conn.query_row(
            "INSERT INTO jobs (kind, started_at, finished_at, status, actor, summary)
             VALUES (?, to_timestamp(?), greatest(now(), to_timestamp(?)), ?, ?, ?) RETURNING id",
            params![
                kind,
                to_epoch(Some(started_at)),
                to_epoch(Some(started_at)),
                status,
                actor,
                summary
            ],
            |row| row.get(0),
        ))
    }

    /// Records a revision and its files; recording the same revision twice is a no-op.
    pub fn record_revision(&self, manifest: &Manifest) -> Result<bool, InventoryError> {
        let exists: Option<i64> = self.db(self
            .conn
            .query_row(
                "SELECT 1 FROM revisions WHERE revision = ?",
                params![manifest.revision],
                |row| row.get(0),
            )
            .optional())?;
        if exists.is_some() {
            return Ok(false);
        }
        self.db(self.conn.execute(
            "INSERT INTO revisions VALUES (?, ?, ?, to_timestamp(?), ?, ?, ?)",
            params![
                manifest.serial,
                manifest.revision,
                manifest.content_sha256,
                to_epoch(Some(manifest.created_at)),
                manifest.source,
                manifest.files.len() as i64,
                manifest.total_bytes() as i64,
            ],
        ))?;
        let mut insert = self.db(self
            .conn
            .prepare("INSERT INTO revision_files VALUES (?, ?, ?, ?, ?, to_timestamp(?), ?, ?)"))?;
        for file in &manifest.files {
            self.db(insert.execute(params![
                manifest.revision,
                file.path,
                file.product,
                file.component,
                file.version,
                to_epoch(file.build_time),
                file.size as i64,
                file.sha256,
            ]))?;
        }
        Ok(true)
    }

    /// Appends sync rows for one job.
    pub fn record_syncs(&self, job_id: i64, rows: &[SyncRecord]) -> Result<(), InventoryError> {
        for row in rows {
            let duration = (row.finished_at - row.started_at)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1e6;
            self.db(self.conn.execute(
                "INSERT INTO mirror_syncs (job_id, product, source, started_at, finished_at,
                     duration_seconds, result, bytes_downloaded, versions, revision, error,
                     bundle_sha256, warnings)
                 VALUES (?, ?, ?, to_timestamp(?), to_timestamp(?), ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    job_id,
                    row.product,
                    row.source,
                    to_epoch(Some(row.started_at)),
                    to_epoch(Some(row.finished_at)),
                    duration,
                    row.result,
                    row.bytes_downloaded as i64,
                    row.versions,
                    row.revision,
                    row.error,
                    row.bundle_sha256,
                    row.warnings,
                ],
            ))?;
        }
        Ok(())
    }

    /// Every product's stored upstream state.
    pub fn product_states(&self) -> Result<Vec<ProductState>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT product, upstream_versions, epoch(upstream_checked_at), epoch(last_success_at),
                    epoch(last_failure_at), last_error, epoch(cooldown_until), cooldown_reason,
                    validators, upstream_components
             FROM mirror_products ORDER BY product",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(ProductState {
                product: row.get(0)?,
                upstream_versions: row.get(1)?,
                upstream_checked_at: from_epoch(row.get(2)?),
                last_success_at: from_epoch(row.get(3)?),
                last_failure_at: from_epoch(row.get(4)?),
                last_error: row.get(5)?,
                cooldown_until: from_epoch(row.get(6)?),
                cooldown_reason: row.get(7)?,
                validators: row.get(8)?,
                upstream_components: row.get(9)?,
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// Inserts or replaces a product's upstream state.
    pub fn save_product_state(&self, state: &ProductState) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "INSERT OR REPLACE INTO mirror_products VALUES
                 (?, ?, to_timestamp(?), to_timestamp(?), to_timestamp(?), ?, to_timestamp(?), ?, ?,
                  ?)",
            params![
                state.product,
                state.upstream_versions,
                to_epoch(state.upstream_checked_at),
                to_epoch(state.last_success_at),
                to_epoch(state.last_failure_at),
                state.last_error,
                to_epoch(state.cooldown_until),
                state.cooldown_reason,
                state.validators,
                state.upstream_components,
            ],
        ))?;
        Ok(())
    }

    /// Records a publish or rollback of dist.
    pub fn record_dist_change(
        &self,
        job_id: i64,
        change: &DistChange,
    ) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "INSERT INTO dist_history (changed_at, action, revision, previous_revision, backups, archived, job_id)
             VALUES (now(), ?, ?, ?, ?, ?, ?)",
            params![
                change.action,
                change.revision,
                change.previous_revision,
                change.backups.join(","),
                change.archived,
                job_id,
            ],
        ))?;
        Ok(())
    }

    /// The newest bundle import: when, which bundle, which revision it made.
    pub fn last_bundle_import(&self) -> Result<Option<BundleImport>, InventoryError> {
        self.db(self
            .conn
            .query_row(
                "SELECT epoch(max(finished_at)), arg_max(bundle_sha256, finished_at),
                            arg_max(revision, finished_at)
                     FROM mirror_syncs WHERE source = 'bundle' HAVING count(*) > 0",
                [],
                |row| {
                    Ok(BundleImport {
                        at: from_epoch(row.get(0)?).unwrap_or_default(),
                        bundle_sha256: row.get(1)?,
                        revision: row.get(2)?,
                    })
                },
            )
            .optional())
    }

    /// Records a publish attempt (`job_id`: its row in `jobs`).
    pub fn record_publish(
        &self,
        job_id: i64,
        started_at: DateTime<Utc>,
        attempt: &PublishAttempt,
    ) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "INSERT INTO mirror_publishes
                 (job_id, attempted_at, finished_at, result, revision, dist, error)
             VALUES (?, to_timestamp(?), to_timestamp(?), ?, ?, ?, ?)",
            params![
                job_id,
                to_epoch(Some(started_at)),
                to_epoch(Some(attempt.at)),
                attempt.result,
                attempt.revision,
                attempt.dist,
                attempt.error,
            ],
        ))?;
        Ok(())
    }

    /// The newest publish attempt.
    pub fn last_publish(&self) -> Result<Option<PublishAttempt>, InventoryError> {
        self.db(self
            .conn
            .query_row(
                "SELECT epoch(finished_at), result, revision, dist, error FROM mirror_publishes
                 ORDER BY id DESC LIMIT 1",
                [],
                |row| {
                    Ok(PublishAttempt {
                        at: from_epoch(row.get(0)?).unwrap_or_default(),
                        result: row.get(1)?,
                        revision: row.get(2)?,
                        dist: row.get(3)?,
                        error: row.get(4)?,
                    })
                },
            )
            .optional())
    }

    /// Per product, the sync or import that brought its current content: its newest `updated`
    /// (or `rolled_back_by_parent`) row that made a revision.
    pub fn content_origins(&self) -> Result<Vec<ContentOrigin>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT product, source, epoch(finished_at), revision, bundle_sha256, warnings
             FROM mirror_syncs
             WHERE result IN ('updated', 'rolled_back_by_parent') AND revision IS NOT NULL
             QUALIFY row_number() OVER (PARTITION BY product ORDER BY id DESC) = 1
             ORDER BY product",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(ContentOrigin {
                product: row.get(0)?,
                source: row.get(1)?,
                at: from_epoch(row.get(2)?).unwrap_or_default(),
                revision: row.get(3)?,
                bundle_sha256: row.get(4)?,
                warnings: row.get(5)?,
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// The newest exporter serial accepted from `signer`.
    pub fn accepted_bundle_serial(&self, signer: &str) -> Result<Option<u32>, InventoryError> {
        self.db(self
            .conn
            .query_row(
                "SELECT serial FROM accepted_bundles WHERE signer = ?",
                params![signer],
                |row| row.get(0),
            )
            .optional())
    }

    /// Remembers the exporter serial of an accepted bundle (a lower one replaces it only after
    /// an explicit downgrade).
    pub fn accept_bundle_serial(
        &self,
        signer: &str,
        serial: u32,
        revision: &str,
    ) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "INSERT OR REPLACE INTO accepted_bundles VALUES (?, ?, ?, now())",
            params![signer, serial, revision],
        ))?;
        Ok(())
    }

    /// The files of a recorded revision (for revisions no longer in the repository).
    pub fn revision_files(&self, revision: &str) -> Result<Vec<FileEntry>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT path, size, sha256, product, component, version, epoch(build_time)
             FROM revision_files WHERE revision = ? ORDER BY path",
        ))?;
        let rows = self.db(statement.query_map(params![revision], |row| {
            Ok(FileEntry {
                path: row.get(0)?,
                size: row.get::<_, i64>(1)? as u64,
                sha256: row.get(2)?,
                product: row.get(3)?,
                component: row.get(4)?,
                version: row.get(5)?,
                build_time: from_epoch(row.get(6)?),
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// Stores a new activation key (only the hash of its secret).
    pub fn insert_activation_key(&self, key: &ActivationKeyRecord) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "INSERT INTO activation_keys (id, secret_sha256, created_at, created_by, expires_at,
                 max_uses, uses, revoked_at, comment)
             VALUES (?, ?, to_timestamp(?), ?, to_timestamp(?), ?, ?, to_timestamp(?), ?)",
            params![
                key.id,
                key.secret_sha256,
                to_epoch(Some(key.created_at)),
                actor(),
                to_epoch(Some(key.expires_at)),
                key.max_uses,
                key.uses,
                to_epoch(key.revoked_at),
                key.comment,
            ],
        ))?;
        Ok(())
    }

    /// Every activation key, newest first.
    pub fn activation_keys(&self) -> Result<Vec<ActivationKeyRecord>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT id, secret_sha256, epoch(created_at), epoch(expires_at), max_uses, uses,
                    epoch(revoked_at), comment
             FROM activation_keys ORDER BY created_at DESC, id",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(ActivationKeyRecord {
                id: row.get(0)?,
                secret_sha256: row.get(1)?,
                created_at: from_epoch(row.get(2)?).unwrap_or_default(),
                expires_at: from_epoch(row.get(3)?).unwrap_or_default(),
                max_uses: row.get(4)?,
                uses: row.get(5)?,
                revoked_at: from_epoch(row.get(6)?),
                comment: row.get(7)?,
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// Counts one use of a key, only if it is still usable (in the same statement, so two
    /// activations cannot both take a single-use key); `false` when it was not.
    pub fn use_activation_key(&self, id: &str) -> Result<bool, InventoryError> {
        let changed = self.db(self.conn.execute(
            "UPDATE activation_keys SET uses = uses + 1
             WHERE id = ? AND revoked_at IS NULL AND expires_at > now()
               AND (max_uses IS NULL OR uses < max_uses)",
            params![id],
        ))?;
        Ok(changed == 1)
    }
    /// Revokes a key; `false` when there is no such key.
    pub fn revoke_activation_key(&self, id: &str) -> Result<bool, InventoryError> {
        let changed = self.db(self.conn.execute(
            "UPDATE activation_keys SET revoked_at = now() WHERE id = ? AND revoked_at IS NULL",
            params![id],
        ))?;
        Ok(changed > 0)
    }

    /// Inserts a host or replaces the row of a host with the same name (a re-activation).
    pub fn upsert_host(&self, host: &HostRecord) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "INSERT OR REPLACE INTO hosts (host, address, host_group, profile, labels,
                 certificate_serial, certificate_fingerprint, agent_version, engine, activated_at,
                 activation_key_id, state, deactivated_at, setup_failed, license_sha256,
                 certificate_expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, to_timestamp(?), ?, ?, to_timestamp(?), ?, ?,
                     to_timestamp(?))",
            params![
                host.host,
                host.address,
                host.group,
                host.profile,
                host.labels,
                host.certificate_serial,
                host.certificate_fingerprint,
                host.agent_version,
                host.engine,
                to_epoch(host.activated_at),
                host.activation_key_id,
                host.state,
                to_epoch(host.deactivated_at),
                host.setup_failed,
                host.license_sha256,
                to_epoch(host.certificate_expires_at),
            ],
        ))?;
        Ok(())
    }

    /// Every host, by name.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, address, host_group, profile, labels, certificate_serial,
                    certificate_fingerprint, agent_version, engine, epoch(activated_at),
                    activation_key_id, state, epoch(deactivated_at), coalesce(setup_failed, ''),
                    license_sha256, epoch(certificate_expires_at)
             FROM hosts ORDER BY host",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(HostRecord {
                host: row.get(0)?,
                address: row.get(1)?,
                group: row.get(2)?,
                profile: row.get(3)?,
                labels: row.get(4)?,
                certificate_serial: row.get(5)?,
                certificate_fingerprint: row.get(6)?,
                agent_version: row.get(7)?,
                engine: row.get(8)?,
                activated_at: from_epoch(row.get(9)?),
                activation_key_id: row.get(10)?,
                state: row.get(11)?,
                deactivated_at: from_epoch(row.get(12)?),
                setup_failed: row.get(13)?,
                license_sha256: row.get(14)?,
                certificate_expires_at: from_epoch(row.get(15)?),
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// Marks a host deactivated and revokes its certificate serial (history is kept);
    /// `false` when there is no such host.
    pub fn deactivate_host(&self, host: &str, reason: &str) -> Result<bool, InventoryError> {
        let serial: Option<Option<String>> = self.db(self
            .conn
            .query_row(
                "SELECT certificate_serial FROM hosts WHERE host = ?",
                params![host],
                |row| row.get(0),
            )
            .optional())?;
        let Some(serial) = serial else {
            return Ok(false);
        };
        self.db(self.conn.execute(
            "UPDATE hosts SET state = 'deactivated', deactivated_at = now()
             WHERE host = ? AND state <> 'deactivated'",
            params![host],
        ))?;
        if let Some(serial) = serial {
            self.revoke_certificate(&serial, host, reason)?;
        }
        Ok(true)
    }

    /// Records a certificate serial as revoked (again is a no-op).
    pub fn revoke_certificate(
        &self,
        serial: &str,
        host: &str,
        reason: &str,
    ) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "INSERT INTO revoked_certificates VALUES (?, ?, now(), ?) ON CONFLICT DO NOTHING",
            params![serial.to_ascii_lowercase(), host, reason],
        ))?;
        Ok(())
    }

    /// The host whose revoked certificate has `serial`, if it was revoked.
    pub fn revoked_certificate(&self, serial: &str) -> Result<Option<String>, InventoryError> {
        self.db(self
            .conn
            .query_row(
                "SELECT coalesce(host, '') FROM revoked_certificates WHERE serial = ?",
                params![serial.to_ascii_lowercase()],
                |row| row.get(0),
            )
            .optional())
    }

    /// Every revoked certificate serial (lowercase hex).
    pub fn revoked_serials(&self) -> Result<std::collections::HashSet<String>, InventoryError> {
        Ok(self
            .query_strings("SELECT serial FROM revoked_certificates")?
            .into_iter()
            .collect())
    }

    /// Every profile, by name (`default` included).
    pub fn profiles(&self) -> Result<Vec<Profile>, InventoryError> {
        let mut statement =
            self.db(self.conn.prepare("SELECT body FROM profiles ORDER BY name"))?;
        let rows = self.db(statement.query_map([], |row| row.get::<_, String>(0)))?;
        rows.map(|row| {
            let body = self.db(row)?;
            serde_json::from_str(&body).map_err(|err| InventoryError::Db {
                path: self.path.clone(),
                source: duckdb::Error::FromSqlConversionFailure(
                    0,
                    duckdb::types::Type::Text,
                    Box::new(err),
                ),
            })
        })
        .collect()
    }

    /// The profile called `name`.
    pub fn profile(&self, name: &str) -> Result<Option<Profile>, InventoryError> {
        Ok(self.profiles()?.into_iter().find(|p| p.name == name))
    }

    /// Creates or replaces a profile; `false` when it was already exactly this.
    pub fn save_profile(&self, profile: &Profile) -> Result<bool, InventoryError> {
        if self.profile(&profile.name)?.as_ref() == Some(profile) {
            return Ok(false);
        }
        let body = serde_json::to_string(profile).expect("profiles serialise");
        self.db(self.conn.execute(
            "INSERT INTO profiles VALUES (?, ?, ?, now(), now())
             ON CONFLICT (name) DO UPDATE SET mode = excluded.mode, body = excluded.body,
                 updated_at = now()",
            params![profile.name, profile.mode(), body],
        ))?;
        Ok(true)
    }

    /// Deletes a profile; `false` when there was none.
    pub fn delete_profile(&self, name: &str) -> Result<bool, InventoryError> {
        let deleted = self.db(self
            .conn
            .execute("DELETE FROM profiles WHERE name = ?", params![name]))?;
        Ok(deleted > 0)
    }

    /// Registers a license file (again is a no-op).
    pub fn insert_license(&self, license: &LicenseRecord) -> Result<bool, InventoryError> {
        let inserted = self.db(self.conn.execute(
            "INSERT INTO licenses VALUES (?, ?, ?, to_timestamp(?), to_timestamp(?))
             ON CONFLICT DO NOTHING",
            params![
                license.sha256,
                license.file_name,
                license.size_bytes,
                to_epoch(Some(license.expires_at)),
                to_epoch(Some(license.added_at)),
            ],
        ))?;
        Ok(inserted > 0)
    }

    /// Registered licenses, newest first (the first is the one hosts get).
    pub fn licenses(&self) -> Result<Vec<LicenseRecord>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT sha256, file_name, size_bytes, epoch(expires_at), epoch(added_at)
             FROM licenses ORDER BY added_at DESC, sha256",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(LicenseRecord {
                sha256: row.get(0)?,
                file_name: row.get(1)?,
                size_bytes: row.get(2)?,
                expires_at: from_epoch(row.get(3)?).unwrap_or_default(),
                added_at: from_epoch(row.get(4)?).unwrap_or_default(),
            })
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// Runs a query that returns one value per row, for tests and small reports.
    pub fn query_strings(&self, sql: &str) -> Result<Vec<String>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(sql))?;
        let rows = self.db(statement.query_map([], |row| row.get::<_, String>(0)))?;
        rows.map(|row| self.db(row)).collect()
    }
}

/// `user@host` of whoever runs the tool, for the jobs audit log.
pub(crate) fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "{}@{}",
        if user.is_empty() { "?" } else { &user },
        host.trim()
    )
}

fn open_with_retry(
    path: &Path,
    mode: AccessMode,
    lock_timeout: Duration,
) -> Result<Connection, InventoryError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        let config = Config::default()
            .access_mode(clone_mode(&mode))
            .and_then(|c| {
                // The inventory is small; a bounded memory use keeps a busy manager polite.
                c.max_memory("1GB")
            });
        let result = config.and_then(|config| Connection::open_with_flags(path, config));
        match result {
            Ok(conn) => return Ok(conn),
            Err(err) => {
                let message = err.to_string();
                if !message.contains("lock") {
                    return Err(InventoryError::Db {
                        path: path.to_owned(),
                        source: err,
                    });
                }
                if started.elapsed() >= lock_timeout {
                    return Err(InventoryError::Locked {
                        path: path.to_owned(),
                        holder: lock_holder(&message),
                        waited: lock_timeout,
                    });
                }
                tracing::debug!(path = %path.display(), "inventory busy, retrying");
                std::thread::sleep(delay.min(lock_timeout.saturating_sub(started.elapsed())));
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Prefix of the file a new inventory is built in before it is linked into place.
const STAGING_PREFIX: &str = "inventory.duckdb.new-";

/// Creates the inventory at `path` already migrated and checkpointed: it is built under a
/// staging name and hard-linked into place, so a first run killed meanwhile leaves no inventory
/// at all rather than one whose first schema changes sit in a log DuckDB fails to replay.
fn create_complete(path: &Path) -> Result<(), InventoryError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let failed = |source: std::io::Error| InventoryError::Db {
        path: path.to_owned(),
        source: duckdb::Error::ToSqlConversionFailure(Box::new(source)),
    };
    remove_abandoned_staging(dir);
    let staging = dir.join(format!("{STAGING_PREFIX}{}", std::process::id()));
    remove_staging(&staging);
    let built = (|| {
        let conn = open_with_retry(&staging, AccessMode::ReadWrite, Duration::ZERO)?;
        let inventory = Inventory {
            conn,
            path: staging.clone(),
        };
        inventory.migrate()?;
        inventory.db(inventory.conn.execute_batch("CHECKPOINT"))?;
        drop(inventory);
        std::fs::File::open(&staging)
            .and_then(|file| file.sync_all())
            .map_err(failed)
    })();
    let linked = built.and_then(|()| match std::fs::hard_link(&staging, path) {
        // Another first run finished first: its inventory is as good as ours.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other
            .and_then(|()| crate::durable::sync_dir(dir))
            .map_err(failed),
    });
    remove_staging(&staging);
    linked
}

fn remove_staging(staging: &Path) {
    let mut wal = staging.as_os_str().to_owned();
    wal.push(".wal");
    let _ = std::fs::remove_file(staging);
    let _ = std::fs::remove_file(wal);
}

/// Removes what first runs killed while building an inventory left (their process is gone).
fn remove_abandoned_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(STAGING_PREFIX)
            .map(|rest| rest.trim_end_matches(".wal"))
        else {
            continue;
        };
        let alive = pid.parse::<u32>().is_ok_and(|pid| {
            pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
        });
        if !alive {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn clone_mode(mode: &AccessMode) -> AccessMode {
    match mode {
        AccessMode::ReadOnly => AccessMode::ReadOnly,
        AccessMode::ReadWrite => AccessMode::ReadWrite,
        AccessMode::Automatic => AccessMode::Automatic,
    }
}

/// Names the process in DuckDB's lock message ("Conflicting lock is held in /usr/bin/x (PID 42)").
fn lock_holder(message: &str) -> String {
    let Some(start) = message.find("held in ") else {
        return "another process".into();
    };
    let rest = &message[start + "held in ".len()..];
    let end = rest.find(')').map(|i| i + 1).unwrap_or(rest.len());
    let holder = rest[..end].trim();
    let program = holder.split(" (").next().unwrap_or(holder);
    let program = Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    match (program, holder.find("(PID")) {
        (Some(program), Some(pid_at)) => format!("`{program}` {}", &holder[pid_at..]),
        _ => format!("`{holder}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_no_migration_completed_in_reads_as_version_zero_and_the_next_open_migrates_it() {
        // What a first run killed between creating the file and its first migration leaves.
        let home = tempfile::tempdir().unwrap();
        drop(duckdb::Connection::open(home.path().join(INVENTORY_FILE)).unwrap());
        match Inventory::open_for_snapshot(home.path()) {
            Err(InventoryError::TooOld { found: 0, .. }) => {}
            Err(err) => panic!("expected TooOld from 0, got {err}"),
            Ok(_) => panic!("expected TooOld from 0, got an inventory"),
        }
        let inventory = Inventory::open(home.path(), Duration::from_secs(1)).unwrap();
        assert_eq!(
            inventory.schema_version().unwrap(),
            MIGRATIONS.last().unwrap().0
        );
    }

    #[test]
    fn an_empty_home_migrates_from_zero_to_the_newest_schema() {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), Duration::from_secs(1)).unwrap();
        assert_eq!(
            inventory.schema_version().unwrap(),
            MIGRATIONS.last().unwrap().0
        );
        drop(inventory);
        let again = Inventory::open(home.path(), Duration::from_secs(1)).unwrap();
        let tables = again
            .query_strings("SELECT table_name FROM information_schema.tables ORDER BY 1")
            .unwrap();
        for table in [
            "dist_history",
            "jobs",
            "mirror_syncs",
            "revision_files",
            "revisions",
        ] {
            assert!(
                tables.iter().any(|t| t == table),
                "{table} missing from {tables:?}"
            );
        }
    }

    #[test]
    fn product_state_round_trips() {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), Duration::from_secs(1)).unwrap();
        let state = ProductState {
            product: "clamav".into(),
            upstream_versions: Some("test=6".into()),
            cooldown_until: DateTime::from_timestamp(1_900_000_000, 0),
            cooldown_reason: Some("HTTP 429".into()),
            ..ProductState::default()
        };
        inventory.save_product_state(&state).unwrap();
        inventory.save_product_state(&state).unwrap();
        assert_eq!(inventory.product_states().unwrap(), vec![state]);
    }

    #[test]
    fn a_deactivated_host_is_kept_and_its_serial_revoked() {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), Duration::from_secs(1)).unwrap();
        let host = HostRecord {
            host: "web-1".into(),
            address: "10.0.0.1:7505".into(),
            group: "web".into(),
            profile: "default".into(),
            labels: r#"{"site":"paris"}"#.into(),
            certificate_serial: Some("ab12".into()),
            certificate_fingerprint: Some("sha256:00".into()),
            certificate_expires_at: DateTime::from_timestamp(1_831_536_000, 0),
            agent_version: Some("1.0.0".into()),
            engine: Some("clamav".into()),
            activated_at: DateTime::from_timestamp(1_800_000_000, 0),
            activation_key_id: Some("0badcafe".into()),
            state: "active".into(),
            deactivated_at: None,
            setup_failed: "license".into(),
            license_sha256: None,
        };
        inventory.upsert_host(&host).unwrap();
        assert_eq!(inventory.hosts().unwrap(), vec![host.clone()]);
        assert_eq!(inventory.revoked_certificate("AB12").unwrap(), None);
        assert!(inventory.deactivate_host("web-1", "test").unwrap());
        assert!(!inventory.deactivate_host("nobody", "test").unwrap());
        let kept = inventory.hosts().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].state, "deactivated");
        assert!(kept[0].deactivated_at.is_some());
        assert_eq!(
            inventory.revoked_certificate("AB12").unwrap().as_deref(),
            Some("web-1")
        );
        // Again: no error, still one revocation.
        inventory
            .revoke_certificate("ab12", "web-1", "again")
            .unwrap();
        assert_eq!(
            inventory
                .query_strings("SELECT serial FROM revoked_certificates")
                .unwrap(),
            vec!["ab12".to_string()]
        );
    }

    #[test]
    fn lock_holder_names_the_program_and_pid() {
        let message = "IO Error: Could not set lock on file \"/h/inventory.duckdb\": Conflicting \
                       lock is held in /usr/local/bin/pm-poll (PID 4242) by user root. See also";
        assert_eq!(lock_holder(message), "`pm-poll` (PID 4242)");
        assert_eq!(lock_holder("weird"), "another process");
    }
}
