//! Recording polls (`pm-poll`): one short write of everything the network part collected.
//!
//! Current state is replaced per polled host (`host_state`, `installed_components`); history is
//! appended only for what is new: a `polls` row per host, a `component_versions` row per
//! component whose version changed, scan reports and install runs newer than the host's cursor
//! (read again inside the transaction, so two polls racing never record a report twice).
//! Rows go in through DuckDB's Appender.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use duckdb::params;
use duckdb::types::{TimeUnit, Value};

use super::{Inventory, InventoryError, from_epoch};
use crate::proto::{PollResponse, ScanResult};

/// Why a host could not be polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollFailure {
    /// `timeout`, `unreachable`, `tls`, `refused`, `bad_response`, `deadline`.
    pub kind: String,
    /// What happened, for people.
    pub message: String,
}

/// One host's poll, as the network part saw it.
#[derive(Debug, Clone)]
pub struct PolledHost {
    /// Host name in the inventory.
    pub host: String,
    /// When the request started.
    pub polled_at: DateTime<Utc>,
    /// Round trip, when there was an answer.
    pub latency_ms: Option<f64>,
    /// The agent's answer or why there is none.
    pub answer: Result<PollResponse, PollFailure>,
    /// The certificate the host presented (and the serial the poll renewed it from), recorded
    /// by the host registry ([`Inventory::record_seen_certificates`]).
    pub certificate: Option<crate::hosts::CertificateSeen>,
    /// How far this manager's clock was ahead of the agent's when it answered (the `Date` of
    /// its answer; negative: behind), for the prune's check of the manager's clock.
    pub clock_ahead_of_agent: Option<chrono::Duration>,
}

/// Where the manager stands in a host's reports: the agent only sends newer ones. Each is a
/// sequence cursor (`seq:STREAM:N`, see `report_cursors`) when the agent numbers its reports,
/// else the newest report id recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollCursors {
    /// Scan reports recorded up to here.
    pub scans_after: Option<String>,
    /// Install runs recorded up to here.
    pub updates_after: Option<String>,
}

/// A host's place in its agent's report stream (`report_cursors`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StreamCursor {
    stream: String,
    scans_seq: Option<u64>,
    updates_seq: Option<u64>,
    /// The ids of the reports recorded under those numbers.
    scans_id: Option<String>,
    updates_id: Option<String>,
}

/// Whether a report is new to the inventory: by its number when the host's cursor is in the
/// same stream and has one for this kind (a report without a number is older than the numbers),
/// else by its id against the newest id recorded.
fn is_new(seq_cursor: Option<u64>, id_cursor: Option<&str>, seq: Option<u64>, id: &str) -> bool {
    match (seq_cursor, seq) {
        (Some(after), Some(seq)) => seq > after,
        (Some(_), None) => false,
        (None, _) => id_cursor.is_none_or(|after| id > after),
    }
}

/// What a recorded poll added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedPolls {
    /// Hosts whose versions, reachability, or reports changed.
    pub changed_hosts: Vec<String>,
    /// `component_versions` rows added.
    pub version_changes: usize,
    /// Scan reports added.
    pub scans: usize,
    /// Findings added.
    pub findings: usize,
    /// Install runs added.
    pub update_runs: usize,
}

/// One row of `fleet_status`, as `pm-poll` prints it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FleetRow {
    pub host: String,
    pub grp: String,
    pub address: String,
    pub reachable: bool,
    pub inactive: bool,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub latency_ms: Option<f64>,
    pub installed_revision: Option<String>,
    pub dist_revision: Option<String>,
    pub versions: Option<String>,
    pub behind_by: Option<i64>,
    pub version_colour: String,
    pub scan_colour: String,
    pub last_scan_at: Option<DateTime<Utc>>,
    pub last_scan_result: Option<String>,
    pub last_scan_findings: Option<i32>,
    pub last_ok_at: Option<DateTime<Utc>>,
    pub agent_version: Option<String>,
}

/// `host_state`, one row.
#[derive(Debug, Clone, Default, PartialEq)]
struct HostState {
    host: String,
    last_poll_at: Option<DateTime<Utc>>,
    last_ok_at: Option<DateTime<Utc>>,
    reachable: bool,
    error_kind: Option<String>,
    last_error: Option<String>,
    latency_ms: Option<f64>,
    agent_version: Option<String>,
    engine: Option<String>,
    reported_group: Option<String>,
    reported_profile: Option<String>,
    license_expires_at: Option<DateTime<Utc>>,
    installed_revision: Option<String>,
    installed_serial: Option<i32>,
    installed_at: Option<DateTime<Utc>>,
    backups: Option<String>,
    schedule: Option<String>,
    last_scan_id: Option<String>,
    last_scan_at: Option<DateTime<Utc>>,
    last_scan_result: Option<String>,
    last_scan_findings: Option<i32>,
    last_update_id: Option<String>,
    last_update_at: Option<DateTime<Utc>>,
    last_update_ok: Option<bool>,
    last_update_error: Option<String>,
    manifest_key: Option<String>,
}

const HOST_STATE_COLUMNS: &str = "host, epoch(last_poll_at), epoch(last_ok_at), reachable, \
     error_kind, last_error, latency_ms, agent_version, engine, reported_group, reported_profile, \
     epoch(license_expires_at), installed_revision, installed_serial, epoch(installed_at), backups, \
     schedule, last_scan_id, epoch(last_scan_at), last_scan_result, last_scan_findings, \
     last_update_id, epoch(last_update_at), last_update_ok, last_update_error, manifest_key";

/// A timestamp the Appender writes as is (the connection's time zone is UTC).
fn ts(time: Option<DateTime<Utc>>) -> Value {
    match time {
        Some(t) => Value::Timestamp(TimeUnit::Microsecond, t.timestamp_micros()),
        None => Value::Null,
    }
}

fn text(value: Option<&str>) -> Value {
    value.map_or(Value::Null, |v| Value::Text(v.to_string()))
}

/// Components as the inventory tracks them: the databases, and the agent itself.
fn components(answer: &PollResponse) -> BTreeMap<String, (Option<String>, Option<DateTime<Utc>>)> {
    let mut components = BTreeMap::new();
    if let Some(installed) = &answer.installed {
        for component in &installed.components {
            components.insert(
                component.component.clone(),
                (component.version.clone(), component.build_time),
            );
        }
    }
    components.insert(
        "pm-agent".to_string(),
        (Some(answer.status.agent_version.clone()), None),
    );
    components
}

impl Inventory {
    fn host_states(&self) -> Result<HashMap<String, HostState>, InventoryError> {
        let mut statement = self.db(self
            .conn
            .prepare(&format!("SELECT {HOST_STATE_COLUMNS} FROM host_state")))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(HostState {
                host: row.get(0)?,
                last_poll_at: from_epoch(row.get(1)?),
                last_ok_at: from_epoch(row.get(2)?),
                reachable: row.get(3)?,
                error_kind: row.get(4)?,
                last_error: row.get(5)?,
                latency_ms: row.get(6)?,
                agent_version: row.get(7)?,
                engine: row.get(8)?,
                reported_group: row.get(9)?,
                reported_profile: row.get(10)?,
                license_expires_at: from_epoch(row.get(11)?),
                installed_revision: row.get(12)?,
                installed_serial: row.get(13)?,
                installed_at: from_epoch(row.get(14)?),
                backups: row.get(15)?,
                schedule: row.get(16)?,
                last_scan_id: row.get(17)?,
                last_scan_at: from_epoch(row.get(18)?),
                last_scan_result: row.get(19)?,
                last_scan_findings: row.get(20)?,
                last_update_id: row.get(21)?,
                last_update_at: from_epoch(row.get(22)?),
                last_update_ok: row.get(23)?,
                last_update_error: row.get(24)?,
                manifest_key: row.get(25)?,
            })
        }))?;
        rows.map(|row| self.db(row).map(|state| (state.host.clone(), state)))
            .collect()
    }

    /// The report cursors of every host polled before.
    pub fn poll_cursors(&self) -> Result<HashMap<String, PollCursors>, InventoryError> {
        let streams = self.stream_cursors()?;
        Ok(self
            .host_states()?
            .into_values()
            .map(|state| {
                let stream = streams.get(&state.host);
                let by_seq = |seq: Option<u64>, id: Option<&str>| {
                    Some(crate::proto::seq_cursor(&stream?.stream, seq?, id))
                };
                let cursors = PollCursors {
                    scans_after: stream
                        .and_then(|c| by_seq(c.scans_seq, c.scans_id.as_deref()))
                        .or(state.last_scan_id),
                    updates_after: stream
                        .and_then(|c| by_seq(c.updates_seq, c.updates_id.as_deref()))
                        .or(state.last_update_id),
                };
                (state.host, cursors)
            })
            .collect())
    }

    /// The reports of these answers already recorded, as (host, report id): a report is
    /// recorded once whatever the cursors say (a restored agent sends what it keeps again).
    fn recorded_report_ids<'a>(
        &self,
        polled: &'a [PolledHost],
    ) -> Result<HashSet<(&'a str, &'a str)>, InventoryError> {
        let sent: Vec<(&str, &str)> = polled
            .iter()
            .filter_map(|poll| Some((poll.host.as_str(), poll.answer.as_ref().ok()?)))
            .flat_map(|(host, answer)| {
                let scans = answer.scans.iter().map(|r| r.id.as_str());
                let runs = answer.updates.iter().map(|r| r.id.as_str());
                scans.chain(runs).map(move |id| (host, id))
            })
            .collect();
        if sent.is_empty() {
            return Ok(HashSet::new());
        }
        self.db(self.conn.execute_batch(
            "CREATE OR REPLACE TEMP TABLE sent_reports (host VARCHAR, id VARCHAR)",
        ))?;
        self.append(
            "sent_reports",
            sent.iter()
                .map(|(host, id)| [Value::Text(host.to_string()), Value::Text(id.to_string())]),
        )?;
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, id FROM sent_reports s
                 WHERE EXISTS (SELECT 1 FROM scans WHERE host = s.host AND scan_id = s.id)
                    OR EXISTS (SELECT 1 FROM update_runs WHERE host = s.host AND run_id = s.id)",
        ))?;
        let found: HashSet<(String, String)> = self
            .db(statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))))?
            .map(|row| self.db(row))
            .collect::<Result<_, _>>()?;
        self.db(self.conn.execute_batch("DROP TABLE sent_reports"))?;
        Ok(sent
            .into_iter()
            .filter(|(host, id)| found.contains(&(host.to_string(), id.to_string())))
            .collect())
    }

    /// Each host's place in its agent's report stream.
    fn stream_cursors(&self) -> Result<HashMap<String, StreamCursor>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, stream, scans_after_seq, updates_after_seq, scans_after_id, updates_after_id
             FROM report_cursors",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            let seq = |n: Option<i64>| n.and_then(|n| u64::try_from(n).ok());
            Ok((
                row.get::<_, String>(0)?,
                StreamCursor {
                    stream: row.get(1)?,
                    scans_seq: seq(row.get(2)?),
                    updates_seq: seq(row.get(3)?),
                    scans_id: row.get(4)?,
                    updates_id: row.get(5)?,
                },
            ))
        }))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// Each host's current components and their versions.
    fn installed_components(
        &self,
    ) -> Result<HashMap<String, HashMap<String, Option<String>>>, InventoryError> {
        let mut statement = self.db(self
            .conn
            .prepare("SELECT host, component, version FROM installed_components"))?;
        let rows =
            self.db(statement.query_map([], |row| Ok(((row.get(0)?, row.get(1)?), row.get(2)?))))?;
        let mut by_host: HashMap<String, HashMap<String, Option<String>>> = HashMap::new();
        for row in rows {
            let ((host, component), version) = self.db(row)?;
            by_host.entry(host).or_default().insert(component, version);
        }
        Ok(by_host)
    }

    /// Settings the views read (`inactive_after_seconds`, `scan_max_age_seconds`).
    pub fn save_settings(&self, settings: &[(&str, String)]) -> Result<(), InventoryError> {
        for (key, value) in settings {
            self.db(self.conn.execute(
                "INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            ))?;
        }
        Ok(())
    }

    /// Records one poll of many hosts (call inside [`Inventory::transaction`]).
    pub fn record_polls(
        &self,
        job_id: i64,
        polled: &[PolledHost],
    ) -> Result<RecordedPolls, InventoryError> {
        let now = Utc::now();
        let mut states = self.host_states()?;
        let mut current = self.installed_components()?;
        let mut streams = self.stream_cursors()?;
        let mut new_streams = Vec::new();
        let mut recorded = RecordedPolls::default();

        let mut polls = Vec::with_capacity(polled.len());
        let mut versions = Vec::new();
        let mut components_rows = Vec::new();
        let mut scans = Vec::new();
        let mut findings = Vec::new();
        let mut updates = Vec::new();
        let mut new_states = Vec::with_capacity(polled.len());
        let mut answered: HashSet<&str> = HashSet::new();
        let gone = self.gone_hosts(polled.iter().map(|p| p.host.as_str()), "the poll")?;
        let recorded_ids = self.recorded_report_ids(polled)?;

        for poll in polled.iter().filter(|p| !gone.contains(&p.host)) {
            let before = states.remove(&poll.host);
            let mut state = before.clone().unwrap_or_else(|| HostState {
                host: poll.host.clone(),
                ..HostState::default()
            });
            state.last_poll_at = Some(poll.polled_at);
            state.latency_ms = poll.latency_ms;
            let mut changed = false;
            match &poll.answer {
                Err(failure) => {
                    polls.push([
                        Value::BigInt(job_id),
                        Value::Text(poll.host.clone()),
                        ts(Some(poll.polled_at)),
                        Value::Boolean(false),
                        Value::Text(failure.kind.clone()),
                        Value::Text(failure.message.clone()),
                        poll.latency_ms.map_or(Value::Null, Value::Double),
                    ]);
                    changed |= before.as_ref().is_none_or(|b| b.reachable);
                    state.reachable = false;
                    state.error_kind = Some(failure.kind.clone());
                    state.last_error = Some(failure.message.clone());
                }
                Ok(answer) => {
                    answered.insert(poll.host.as_str());
                    polls.push([
                        Value::BigInt(job_id),
                        Value::Text(poll.host.clone()),
                        ts(Some(poll.polled_at)),
                        Value::Boolean(true),
                        Value::Null,
                        Value::Null,
                        poll.latency_ms.map_or(Value::Null, Value::Double),
                    ]);
                    changed |= before.as_ref().is_none_or(|b| !b.reachable);
                    state.reachable = true;
                    state.last_ok_at = Some(poll.polled_at);
                    state.error_kind = None;
                    state.last_error = None;
                    state.agent_version = Some(answer.status.agent_version.clone());
                    state.engine = Some(answer.status.engine.clone());
                    state.reported_group = answer.status.group.clone();
                    state.reported_profile = answer.status.profile.clone();
                    state.license_expires_at = answer.status.license_expires_at;
                    state.manifest_key = answer.status.manifest_key.clone();
                    let revision = answer.installed.as_ref().and_then(|i| i.revision.clone());
                    if let Some(installed) = answer.installed.as_ref()
                        && !installed.damaged.is_empty()
                    {
                        tracing::warn!(
                            host = %poll.host,
                            damaged = %installed.damaged.join("; "),
                            "the host's database directory no longer holds what it installed: it is behind dist until an install puts the files back"
                        );
                    }
                    state.installed_revision = revision.clone();
                    state.installed_serial = answer
                        .installed
                        .as_ref()
                        .and_then(|i| i.serial)
                        .map(|s| s.min(i32::MAX as u32) as i32);
                    state.installed_at = answer.installed.as_ref().map(|i| i.installed_at);
                    state.backups = answer.installed.as_ref().map(|i| {
                        i.backups
                            .iter()
                            .map(|b| b.clone().unwrap_or_default())
                            .collect::<Vec<_>>()
                            .join(",")
                    });
                    state.schedule = Some(
                        answer
                            .schedule
                            .iter()
                            .map(|s| format!("{}={}", s.job, s.expression))
                            .collect::<Vec<_>>()
                            .join("; "),
                    )
                    .filter(|s| !s.is_empty());

                    // Components: a row for every one whose version changed, or that went away.
                    let now_installed = components(answer);
                    let mut previous = current.remove(&poll.host).unwrap_or_default();
                    for (component, (version, build_time)) in &now_installed {
                        if previous.remove(component).as_ref() != Some(version) {
                            changed = true;
                            versions.push([
                                Value::Text(poll.host.clone()),
                                Value::Text(component.clone()),
                                text(version.as_deref()),
                                ts(*build_time),
                                text(revision.as_deref()),
                                ts(Some(poll.polled_at)),
                            ]);
                        }
                        components_rows.push([
                            Value::Text(poll.host.clone()),
                            Value::Text(component.clone()),
                            text(version.as_deref()),
                            ts(*build_time),
                            text(revision.as_deref()),
                        ]);
                    }
                    // What is left of the previous set went away.
                    for component in previous.into_keys().filter(|c| c != "pm-agent") {
                        changed = true;
                        versions.push([
                            Value::Text(poll.host.clone()),
                            Value::Text(component),
                            Value::Null,
                            Value::Null,
                            text(revision.as_deref()),
                            ts(Some(poll.polled_at)),
                        ]);
                    }

                    // Reports newer than what is recorded (the cursors as of this
                    // transaction): by number within the agent's report stream, by id before
                    // the host's first numbered poll or when its stream changed.
                    let stream = streams
                        .remove(&poll.host)
                        .filter(|c| answer.report_stream.as_deref() == Some(c.stream.as_str()));
                    let (scans_seq, updates_seq) = stream
                        .as_ref()
                        .map_or((None, None), |c| (c.scans_seq, c.updates_seq));
                    let scan_keys: Vec<(u64, &str)> = answer
                        .scans
                        .iter()
                        .filter_map(|r| Some((r.seq?, r.id.as_str())))
                        .collect();
                    let update_keys: Vec<(u64, &str)> = answer
                        .updates
                        .iter()
                        .filter_map(|r| Some((r.seq?, r.id.as_str())))
                        .collect();
                    // The agent's state went back (a snapshot or backup restored): numbers the
                    // manager recorded name other reports now. The agent says so by its last
                    // number, or by sending numbers at or below the cursor (it sends every
                    // report it keeps then); those whose id is not recorded are new, and the
                    // cursors start again from what it sent.
                    let at_or_below = |cursor: Option<u64>, keys: &[(u64, &str)]| {
                        cursor.is_some_and(|after| keys.iter().any(|(seq, _)| *seq <= after))
                    };
                    let rewound = stream.is_some()
                        && (answer.report_last.is_some_and(|last| {
                            scans_seq.max(updates_seq).is_some_and(|n| n > last)
                        }) || at_or_below(scans_seq, &scan_keys)
                            || at_or_below(updates_seq, &update_keys));
                    if rewound {
                        tracing::warn!(
                            host = %poll.host,
                            last = answer.report_last,
                            "the agent's report numbers went back (state restored from a snapshot or backup?): taking its kept reports by id"
                        );
                    }
                    // The next cursor of a kind: its highest number sent, and that report's id.
                    let next = |cursor: Option<u64>, id: Option<&String>, keys: &[(u64, &str)]| {
                        let sent = keys.iter().max_by_key(|(seq, _)| *seq);
                        match sent {
                            Some((seq, id)) if rewound || cursor.is_none_or(|c| *seq > c) => {
                                (Some(*seq), Some(id.to_string()))
                            }
                            _ if rewound => (answer.report_last, None),
                            _ => (cursor, id.cloned()),
                        }
                    };
                    if let Some(stream_id) = &answer.report_stream {
                        let (scans_next, scans_next_id) = next(
                            scans_seq,
                            stream.as_ref().and_then(|c| c.scans_id.as_ref()),
                            &scan_keys,
                        );
                        let (updates_next, updates_next_id) = next(
                            updates_seq,
                            stream.as_ref().and_then(|c| c.updates_id.as_ref()),
                            &update_keys,
                        );
                        let number =
                            |n: Option<u64>| n.map_or(Value::Null, |n| Value::BigInt(n as i64));
                        new_streams.push([
                            Value::Text(poll.host.clone()),
                            Value::Text(stream_id.clone()),
                            number(scans_next),
                            number(updates_next),
                            text(scans_next_id.as_deref()),
                            text(updates_next_id.as_deref()),
                        ]);
                    }
                    for scan in &answer.scans {
                        let new = rewound
                            || is_new(scans_seq, state.last_scan_id.as_deref(), scan.seq, &scan.id);
                        if !new || recorded_ids.contains(&(poll.host.as_str(), scan.id.as_str())) {
                            continue;
                        }
                        scans.push([
                            Value::Text(poll.host.clone()),
                            Value::Text(scan.id.clone()),
                            ts(Some(scan.started_at)),
                            ts(Some(scan.finished_at)),
                            Value::Double(scan.duration_seconds),
                            Value::Text(scan.engine.clone()),
                            text(scan.program.as_deref()),
                            Value::Text(scan.paths.join("\n")),
                            scan.files_scanned.map_or(Value::Null, |n| {
                                Value::BigInt(n.min(i64::MAX as u64) as i64)
                            }),
                            Value::Text(scan.result.as_str().to_string()),
                            Value::Int(scan.findings.len().min(i32::MAX as usize) as i32),
                            text(scan.error.as_deref()),
                            ts(Some(now)),
                        ]);
                        for finding in &scan.findings {
                            findings.push([
                                Value::Text(poll.host.clone()),
                                Value::Text(scan.id.clone()),
                                Value::Text(finding.path.clone()),
                                Value::Text(finding.signature.clone()),
                                ts(Some(scan.finished_at)),
                            ]);
                        }
                        // The id cursor only grows: after a clock step back the newest report
                        // can have the smallest id.
                        if state
                            .last_scan_id
                            .as_deref()
                            .is_none_or(|c| scan.id.as_str() > c)
                        {
                            state.last_scan_id = Some(scan.id.clone());
                        }
                        state.last_scan_at = Some(scan.finished_at);
                        state.last_scan_result = Some(
                            match scan.result {
                                ScanResult::Clean => "clean",
                                ScanResult::Infected => "infected",
                                ScanResult::Error => "error",
                            }
                            .to_string(),
                        );
                        let found = scan.findings.len().min(i32::MAX as usize) as i32;
                        state.last_scan_findings = match scan.result {
                            // A failed scan says nothing about the files it did not reach: it
                            // never lowers what is known (PmHostInfected stays until a clean
                            // rescan), it only adds what it did find.
                            ScanResult::Error => match state.last_scan_findings {
                                Some(known) => Some(known.max(found)),
                                None => (found > 0).then_some(found),
                            },
                            ScanResult::Clean | ScanResult::Infected => Some(found),
                        };
                        recorded.scans += 1;
                        recorded.findings += scan.findings.len();
                        changed = true;
                    }
                    for run in &answer.updates {
                        let new = rewound
                            || is_new(
                                updates_seq,
                                state.last_update_id.as_deref(),
                                run.seq,
                                &run.id,
                            );
                        if !new || recorded_ids.contains(&(poll.host.as_str(), run.id.as_str())) {
                            continue;
                        }
                        let report = run.report.as_ref();
                        updates.push([
                            Value::Text(poll.host.clone()),
                            Value::Text(run.id.clone()),
                            Value::Text(run.trigger.clone()),
                            text(report.map(|r| r.action.as_str())),
                            ts(Some(run.started_at)),
                            ts(Some(run.finished_at)),
                            Value::Boolean(run.error.is_none()),
                            report.map_or(Value::Null, |r| Value::Boolean(r.changed)),
                            text(report.and_then(|r| r.revision.as_deref())),
                            text(report.and_then(|r| r.previous_revision.as_deref())),
                            text(run.error.as_deref()),
                            ts(Some(now)),
                        ]);
                        if state
                            .last_update_id
                            .as_deref()
                            .is_none_or(|c| run.id.as_str() > c)
                        {
                            state.last_update_id = Some(run.id.clone());
                        }
                        state.last_update_at = Some(run.finished_at);
                        state.last_update_ok = Some(run.error.is_none());
                        state.last_update_error = run.error.clone();
                        recorded.update_runs += 1;
                        changed = true;
                    }
                }
            }
            if changed {
                recorded.changed_hosts.push(poll.host.clone());
            }
            new_states.push(state);
        }
        recorded.version_changes = versions.len();

        // Stage the polled names: they get their `host_ids` number, and their current state is
        // replaced below.
        self.db(self.conn.execute_batch(
            "CREATE OR REPLACE TEMP TABLE polled_hosts (host VARCHAR, answered BOOLEAN)",
        ))?;
        self.append(
            "polled_hosts",
            polled.iter().filter(|p| !gone.contains(&p.host)).map(|p| {
                [
                    Value::Text(p.host.clone()),
                    Value::Boolean(answered.contains(p.host.as_str())),
                ]
            }),
        )?;
        let ids = self.host_ids()?;
        self.append(
            "polls",
            polls.into_iter().map(|mut row| {
                if let Value::Text(host) = &row[1] {
                    row[1] = Value::Int(ids[host.as_str()]);
                }
                row
            }),
        )?;
        self.append("component_versions", versions)?;
        self.append("scans", scans)?;
        self.append("scan_findings", findings)?;
        self.append("update_runs", updates)?;

        // Where each host that answered stands in its report stream (none: an agent from
        // before the numbers, asked by id from now on).
        self.db(self.conn.execute_batch(
            "DELETE FROM report_cursors
                 WHERE host IN (SELECT host FROM polled_hosts WHERE answered)",
        ))?;
        self.append("report_cursors", new_streams)?;

        // Replace the current state of the polled hosts (and the components of those that
        // answered): the names staged above, delete, append.
        self.db(self.conn.execute_batch(
            "DELETE FROM host_state WHERE host IN (SELECT host FROM polled_hosts);
             DELETE FROM installed_components
                 WHERE host IN (SELECT host FROM polled_hosts WHERE answered);
             DROP TABLE polled_hosts;",
        ))?;
        self.append("installed_components", components_rows)?;
        self.append(
            "host_state",
            new_states.into_iter().map(|s| {
                [
                    Value::Text(s.host),
                    ts(s.last_poll_at),
                    ts(s.last_ok_at),
                    Value::Boolean(s.reachable),
                    text(s.error_kind.as_deref()),
                    text(s.last_error.as_deref()),
                    s.latency_ms.map_or(Value::Null, Value::Double),
                    text(s.agent_version.as_deref()),
                    text(s.engine.as_deref()),
                    text(s.reported_group.as_deref()),
                    text(s.reported_profile.as_deref()),
                    ts(s.license_expires_at),
                    text(s.installed_revision.as_deref()),
                    s.installed_serial.map_or(Value::Null, Value::Int),
                    ts(s.installed_at),
                    text(s.backups.as_deref()),
                    text(s.schedule.as_deref()),
                    text(s.last_scan_id.as_deref()),
                    ts(s.last_scan_at),
                    text(s.last_scan_result.as_deref()),
                    s.last_scan_findings.map_or(Value::Null, Value::Int),
                    text(s.last_update_id.as_deref()),
                    ts(s.last_update_at),
                    s.last_update_ok.map_or(Value::Null, Value::Boolean),
                    text(s.last_update_error.as_deref()),
                    text(s.manifest_key.as_deref()),
                ]
            }),
        )?;
        self.record_seen_certificates(polled)?;
        Ok(recorded)
    }

    /// Numbers the staged `polled_hosts` that have none yet; every polled host's number.
    fn host_ids(&self) -> Result<HashMap<String, i32>, InventoryError> {
        self.db(self.conn.execute_batch(
            "INSERT INTO host_ids (host)
             SELECT DISTINCT host FROM polled_hosts
             WHERE host NOT IN (SELECT host FROM host_ids)",
        ))?;
        let mut statement = self.db(self.conn.prepare(
            "SELECT i.host, i.id FROM host_ids i JOIN polled_hosts p ON p.host = i.host",
        ))?;
        let rows = self.db(statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))))?;
        rows.map(|row| self.db(row)).collect()
    }

    fn append<const N: usize>(
        &self,
        table: &str,
        rows: impl IntoIterator<Item = [Value; N]>,
    ) -> Result<(), InventoryError> {
        let mut appender = self.db(self.conn.appender(table))?;
        for row in rows {
            self.db(appender.append_row(duckdb::appender_params_from_iter(row)))?;
        }
        self.db(appender.flush())
    }

    /// The manifest key each active host reported at its last answered poll, by host name
    /// (hosts that never answered, or whose agent reports no key, are left out).
    pub fn manifest_keys(&self) -> Result<Vec<(String, Option<String>)>, InventoryError> {
        // A reachable host that reported none runs an agent from before key rotation, or lost
        // its key file; an unreachable one is reported by the other checks.
        let mut statement = self.db(self.conn.prepare(
            "SELECT s.host, s.manifest_key FROM host_state s JOIN hosts h ON h.host = s.host
             WHERE h.state = 'active' AND (s.manifest_key IS NOT NULL OR s.reachable)
             ORDER BY s.host",
        ))?;
        let rows = self.db(statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))))?;
        rows.map(|row| self.db(row)).collect()
    }

    /// `fleet_status` rows, by host name (`only`: these hosts).
    pub fn fleet_status(&self, only: Option<&[String]>) -> Result<Vec<FleetRow>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, grp, address, reachable, inactive, error_kind, last_error, latency_ms,
                    installed_revision, dist_revision, versions, behind_by, version_colour,
                    scan_colour, epoch(last_scan_at), last_scan_result, last_scan_findings,
                    epoch(last_ok_at), agent_version
             FROM fleet_status ORDER BY host",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(FleetRow {
                host: row.get(0)?,
                grp: row.get(1)?,
                address: row.get(2)?,
                reachable: row.get(3)?,
                inactive: row.get(4)?,
                error_kind: row.get(5)?,
                error: row.get(6)?,
                latency_ms: row.get(7)?,
                installed_revision: row.get(8)?,
                dist_revision: row.get(9)?,
                versions: row.get(10)?,
                behind_by: row.get(11)?,
                version_colour: row.get(12)?,
                scan_colour: row.get(13)?,
                last_scan_at: from_epoch(row.get(14)?),
                last_scan_result: row.get(15)?,
                last_scan_findings: row.get(16)?,
                last_ok_at: from_epoch(row.get(17)?),
                agent_version: row.get(18)?,
            })
        }))?;
        let only: Option<HashSet<&str>> = only.map(|o| o.iter().map(String::as_str).collect());
        rows.filter(|row| {
            row.as_ref().map_or(true, |r| {
                only.as_ref().is_none_or(|o| o.contains(r.host.as_str()))
            })
        })
        .map(|row| self.db(row))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proto::{
        AgentStatus, InstalledComponent, InstalledState, ScanFinding, ScanReport, UpdateRun,
    };

    fn answer(version: &str, scans: Vec<ScanReport>) -> PollResponse {
        PollResponse {
            status: AgentStatus {
                host_name: "web-1".into(),
                agent_version: "0.1.0".into(),
                agent_sha256: None,
                upgrade_error: None,
                activated: true,
                manager_ca_fingerprint: None,
                engine: "clamav".into(),
                group: Some("web".into()),
                profile: Some("default".into()),
                license_expires_at: None,
                hold: None,
                reports_hold: true,
                manifest_key: None,
            },
            installed: Some(InstalledState {
                revision: Some(format!("r{version}")),
                serial: Some(1),
                installed_at: Utc::now(),
                components: vec![InstalledComponent {
                    component: "test".into(),
                    version: Some(version.into()),
                    build_time: DateTime::from_timestamp(1_700_000_000, 0),
                }],
                backups: vec![Some("r1".into()), None],
                damaged: Vec::new(),
            }),
            schedule: Vec::new(),
            scans,
            updates: vec![UpdateRun {
                id: "20260101T000000.000000Z-aa".into(),
                seq: None,
                trigger: "schedule".into(),
                started_at: Utc::now(),
                finished_at: Utc::now(),
                report: None,
                error: Some("no dist".into()),
            }],
            report_stream: None,
            report_last: None,
        }
    }

    fn scan(id: &str) -> ScanReport {
        ScanReport {
            id: id.into(),
            seq: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            duration_seconds: 0.5,
            engine: "clamav".into(),
            program: Some("clamscan".into()),
            paths: vec!["/srv".into()],
            files_scanned: Some(2),
            findings: vec![ScanFinding {
                path: "/srv/eicar.com".into(),
                signature: "Eicar-Test-Signature".into(),
            }],
            result: ScanResult::Infected,
            error: None,
        }
    }

    /// A new inventory in a temporary home (kept alive by the first value) with one active
    /// host, `web-1`: recorders write only for active hosts.
    fn inventory_with_web_1() -> (tempfile::TempDir, Inventory) {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), Duration::from_secs(1)).unwrap();
        inventory
            .upsert_host(&crate::inventory::HostRecord::active(
                "web-1",
                "10.0.0.1:7505",
            ))
            .unwrap();
        (home, inventory)
    }

    fn count(inventory: &Inventory, table: &str) -> i64 {
        inventory
            .conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn versions_and_reports_are_recorded_once_and_a_failure_keeps_the_last_contact() {
        let (_home, inventory) = inventory_with_web_1();
        let at = DateTime::from_timestamp(1_800_000_000, 123_456_000).unwrap();
        let poll = |answer: Result<PollResponse, PollFailure>, at: DateTime<Utc>| PolledHost {
            host: "web-1".into(),
            polled_at: at,
            latency_ms: Some(1.5),
            answer,
            certificate: None,
            clock_ahead_of_agent: None,
        };
        let first = inventory
            .transaction(|inv| inv.record_polls(1, &[poll(Ok(answer("3", vec![scan("a")])), at)]))
            .unwrap();
        assert_eq!(first.version_changes, 2, "test and pm-agent");
        assert_eq!((first.scans, first.findings, first.update_runs), (1, 1, 1));
        // The same answer again: nothing new but the poll row.
        let again = inventory
            .transaction(|inv| inv.record_polls(2, &[poll(Ok(answer("3", vec![scan("a")])), at)]))
            .unwrap();
        assert_eq!(again, RecordedPolls::default());
        let moved = inventory
            .transaction(|inv| {
                inv.record_polls(3, &[poll(Ok(answer("4", vec![scan("a"), scan("b")])), at)])
            })
            .unwrap();
        assert_eq!((moved.version_changes, moved.scans), (1, 1));
        assert_eq!(count(&inventory, "component_versions"), 3);
        assert_eq!(count(&inventory, "scans"), 2);
        assert_eq!(count(&inventory, "scan_findings"), 2);
        assert_eq!(count(&inventory, "update_runs"), 1);
        assert_eq!(count(&inventory, "polls"), 3);
        let later = at + chrono::Duration::minutes(5);
        let failed = inventory
            .transaction(|inv| {
                inv.record_polls(
                    4,
                    &[poll(
                        Err(PollFailure {
                            kind: "timeout".into(),
                            message: "no answer in 5s".into(),
                        }),
                        later,
                    )],
                )
            })
            .unwrap();
        assert_eq!(failed.changed_hosts, ["web-1"]);
        let states = inventory.host_states().unwrap();
        let state = &states["web-1"];
        assert!(!state.reachable);
        assert_eq!(
            state.last_ok_at,
            Some(at),
            "timestamps round-trip exactly, in UTC"
        );
        assert_eq!(state.last_poll_at, Some(later));
        assert_eq!(state.installed_revision.as_deref(), Some("r4"));
        assert_eq!(state.last_scan_id.as_deref(), Some("b"));
        assert_eq!(count(&inventory, "installed_components"), 2);
        assert_eq!(
            inventory.poll_cursors().unwrap()["web-1"]
                .scans_after
                .as_deref(),
            Some("b")
        );
        assert_eq!(inventory.prune(later, None, false).unwrap().polls, 3);
        assert_eq!(count(&inventory, "component_versions"), 3, "history stays");
    }

    /// Records one successful poll of `web-1` answering `answer`.
    fn record_answer(inventory: &Inventory, answer: PollResponse) -> RecordedPolls {
        inventory
            .transaction(|inv| {
                inv.record_polls(
                    1,
                    &[PolledHost {
                        host: "web-1".into(),
                        polled_at: Utc::now(),
                        latency_ms: None,
                        answer: Ok(answer),
                        certificate: None,
                        clock_ahead_of_agent: None,
                    }],
                )
            })
            .unwrap()
    }

    /// A poll answer from a numbering agent: scans with (id, seq), stream `ab`.
    fn numbered(scans: &[(&str, u64)]) -> PollResponse {
        let mut answer = answer(
            "3",
            scans
                .iter()
                .map(|(id, seq)| ScanReport {
                    seq: Some(*seq),
                    ..scan(id)
                })
                .collect(),
        );
        answer.updates.clear();
        answer.report_stream = Some("ab".into());
        answer
    }

    #[test]
    fn reports_are_recorded_by_number_once_an_agent_numbers_them_whatever_its_clock_does() {
        let (_home, inventory) = inventory_with_web_1();
        let record = |answer: PollResponse| record_answer(&inventory, answer);
        let cursor = |inventory: &Inventory| inventory.poll_cursors().unwrap()["web-1"].clone();
        // Before the upgrade: by id.
        record(answer("3", vec![scan("2030-a")]));
        assert_eq!(cursor(&inventory).scans_after.as_deref(), Some("2030-a"));
        // The first poll of the upgraded agent came with the id cursor: what it sent is new.
        assert_eq!(record(numbered(&[("2030-b", 1)])).scans, 1);
        assert_eq!(
            cursor(&inventory).scans_after.as_deref(),
            Some("seq:ab:1:2030-b")
        );
        // The clock stepped back: the ids sort lower, the numbers still count up.
        assert_eq!(record(numbered(&[("2029-a", 2), ("2029-b", 3)])).scans, 2);
        assert_eq!(
            cursor(&inventory).scans_after.as_deref(),
            Some("seq:ab:3:2029-b")
        );
        // The same answer again (a racing poll): nothing twice.
        assert_eq!(record(numbered(&[("2029-a", 2), ("2029-b", 3)])).scans, 0);
        assert_eq!(count(&inventory, "scans"), 4);
        let states = inventory.host_states().unwrap();
        assert_eq!(
            states["web-1"].last_scan_id.as_deref(),
            Some("2030-b"),
            "the id cursor only grows"
        );
        // The agent went back to a version from before the numbers: by id again.
        record(answer("3", vec![scan("2031-a")]));
        assert_eq!(cursor(&inventory).scans_after.as_deref(), Some("2031-a"));
        assert_eq!(count(&inventory, "scans"), 5);
    }

    #[test]
    fn an_agent_whose_numbers_went_back_has_its_kept_reports_taken_by_id_once() {
        let (_home, inventory) = inventory_with_web_1();
        let record = |scans: &[(&str, u64)], last: u64| {
            let mut answer = numbered(scans);
            answer.report_last = Some(last);
            record_answer(&inventory, answer).scans
        };
        let cursor = || {
            inventory.poll_cursors().unwrap()["web-1"]
                .scans_after
                .clone()
        };
        assert_eq!(record(&[("a", 1), ("b", 2), ("c", 3)], 3), 3);
        // Restored to a state from after `a`: it made `d` as number 2 and sends all it keeps.
        assert_eq!(record(&[("a", 1), ("d", 2)], 2), 1, "only `d` is new");
        assert_eq!(
            cursor().as_deref(),
            Some("seq:ab:2:d"),
            "the cursor starts again"
        );
        // The next poll is by number again, and the same answer twice records nothing.
        assert_eq!(record(&[("e", 3)], 3), 1);
        assert_eq!(record(&[("e", 3)], 3), 0);
        assert_eq!(count(&inventory, "scans"), 5);
        // Restored again, to after `d`, with numbers given past the cursor before the poll:
        // the agent saw that its number 3 is not `e` and sent all it keeps.
        assert_eq!(record(&[("d", 2), ("f", 3), ("g", 4)], 4), 2);
        assert_eq!(cursor().as_deref(), Some("seq:ab:4:g"));
        // Restored to a state with no scan report at all: the cursor is its last number.
        assert_eq!(record(&[], 1), 0);
        assert_eq!(cursor().as_deref(), Some("seq:ab:1"));
    }

    #[test]
    fn a_failed_scan_never_lowers_the_findings_known_and_only_adds_what_it_found() {
        let (_home, inventory) = inventory_with_web_1();
        let findings_after = |scans: Vec<ScanReport>| {
            record_answer(&inventory, answer("3", scans));
            let states = inventory.host_states().unwrap();
            let state = &states["web-1"];
            (
                state.last_scan_result.clone().unwrap(),
                state.last_scan_findings,
            )
        };
        let failed = |id: &str, found: usize| ScanReport {
            result: ScanResult::Error,
            error: Some("exited with status 2".into()),
            findings: scan(id).findings.into_iter().cycle().take(found).collect(),
            ..scan(id)
        };
        // Unknown stays unknown (absent, never 0).
        assert_eq!(findings_after(vec![failed("a", 0)]), ("error".into(), None));
        assert_eq!(
            findings_after(vec![failed("b", 1)]),
            ("error".into(), Some(1))
        );
        assert_eq!(
            findings_after(vec![scan("c")]),
            ("infected".into(), Some(1))
        );
        assert_eq!(
            findings_after(vec![failed("d", 0)]),
            ("error".into(), Some(1))
        );
        assert_eq!(
            findings_after(vec![failed("e", 3)]),
            ("error".into(), Some(3))
        );
        let clean = ScanReport {
            result: ScanResult::Clean,
            findings: Vec::new(),
            ..scan("f")
        };
        assert_eq!(findings_after(vec![clean]), ("clean".into(), Some(0)));
    }

    #[test]
    fn host_versions_counts_as_missing_exactly_what_the_agent_would_install() {
        use crate::manifest::{PLAIN_SIGNATURE_EXTENSIONS, engine_file_name_ok, engine_loads};
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), Duration::from_secs(1)).unwrap();
        // (product, kind, file name in the product); a feed file's component is its path in
        // the feed, a ClamAV file's the database it belongs to.
        let mut files: Vec<(&str, &str, String)> = [
            ("clamav", "clamav", "test.cvd"),
            ("clamav", "clamav", "daily.cvd"),
            ("clamav", "clamav", "daily-2.cdiff"),
            ("clamav", "clamav", "daily.cvd.sign"),
            ("agent", "agent", "pm-agent-0.1.0-aarch64-linux"),
            ("vendor", "files", "README.txt"),
            ("vendor", "files", "index.json"),
            ("vendor", "files", ".hidden.ndb"),
            ("vendor", "files", "bad name.ndb"),
            ("vendor", "files", "ndb"),
            ("vendor", "files", "a.ndb.txt"),
            ("vendor", "files", "sub/dir/z.ldb"),
            ("vendor", "files", "Upper.HDB"),
        ]
        .map(|(p, k, n)| (p, k, n.to_string()))
        .into();
        for ext in PLAIN_SIGNATURE_EXTENSIONS {
            files.push(("vendor", "files", format!("x{ext}")));
        }
        inventory
            .conn
            .execute_batch(
                "INSERT INTO hosts (host, address) VALUES ('web-1', '10.0.0.1:7505'),
                     ('web-2', '10.0.0.2:7505');
                 INSERT INTO host_state (host, last_poll_at, reachable, installed_revision)
                     VALUES ('web-1', now(), true, 'r1'), ('web-2', now(), true, NULL);
                 -- web-2 never installed a revision; it reports only its agent's version.
                 INSERT INTO installed_components VALUES ('web-1', 'test', '1', NULL, 'r1'),
                     ('web-2', 'pm-agent', '0.1.0', NULL, NULL);
                 INSERT INTO dist_history (changed_at, action, revision)
                     VALUES (now(), 'publish', 'r1');",
            )
            .unwrap();
        let mut expected = Vec::new();
        for (product, kind, name) in &files {
            let component = match *kind {
                "files" => name.clone(),
                "agent" => "pm-agent-aarch64-linux".to_string(),
                _ => name.split(['.', '-']).next().unwrap().to_string(),
            };
            inventory
                .conn
                .execute(
                    "INSERT INTO revision_files VALUES ('r1', ?, ?, ?, '1', NULL, 1, 'x')",
                    params![format!("{product}/{name}"), product, component],
                )
                .unwrap();
            let base = name.rsplit('/').next().unwrap();
            if engine_loads(kind, base) && engine_file_name_ok(base) && component != "test" {
                expected.push(format!("web-1 {product} {component}"));
            }
        }
        expected.sort();
        expected.dedup();
        let missing: Vec<String> = inventory
            .conn
            .prepare(
                "SELECT host || ' ' || product || ' ' || component FROM host_versions \
                 WHERE missing ORDER BY 1",
            )
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(missing, expected);
        assert!(
            missing.contains(&"web-1 clamav daily".to_string()),
            "{missing:?}"
        );
    }
}
