//! Holds (`holds`, `host_holds`): hosts rollouts leave alone. A new hold on a host replaces the
//! one in force (which is kept, released); `pm-push release` releases; an end time ends a hold
//! by itself (the view compares it with `now()`, so nothing has to run at that moment).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use duckdb::params;

use super::{Inventory, InventoryError, from_epoch, to_epoch};

/// A hold in force, or one to record.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRecord {
    /// The host.
    pub host: String,
    /// `hold`, `rollback`, `fleet-rollback`.
    pub kind: String,
    /// For people.
    pub reason: String,
    /// What the host had installed when held, when known.
    pub revision: Option<String>,
    /// When it was set.
    pub set_at: DateTime<Utc>,
    /// `user@host` of the command, or `agent` (learnt from the agent's refusal).
    pub set_by: String,
    /// When it ends by itself (none: until released).
    pub until: Option<DateTime<Utc>>,
    /// The job that set it.
    pub job_id: Option<i64>,
    /// Whether the agent has it too.
    pub on_agent: bool,
}

impl HoldRecord {
    /// The hold as the manager asks an agent for it again (re-activation, `pm-activate host`):
    /// its kind, reason, who set it and its end, with what is left of it from `now`. `None` for
    /// a kind this manager does not know.
    pub fn spec(&self, now: DateTime<Utc>) -> Option<crate::proto::HoldSpec> {
        use crate::proto::HoldKind;
        let kind = [HoldKind::Hold, HoldKind::Rollback, HoldKind::FleetRollback]
            .into_iter()
            .find(|kind| kind.as_str() == self.kind)?;
        Some(crate::proto::HoldSpec {
            kind,
            reason: self.reason.clone(),
            set_by: self.set_by.clone(),
            until: self.until,
            seconds_left: self.until.map(|at| (at - now).num_seconds().max(0) as u64),
        })
    }

    /// `hold (why) since T, until U` for the output of rollouts.
    pub fn describe(&self) -> String {
        format!(
            "held ({}: {}) since {}, {}",
            self.kind,
            self.reason,
            self.set_at.format("%Y-%m-%d %H:%M:%SZ"),
            self.until
                .map_or("until released".to_string(), |until| format!(
                    "until {}",
                    until.format("%Y-%m-%d %H:%M:%SZ")
                ))
        )
    }
}

impl Inventory {
    /// The holds in force, by host (`host_holds`).
    pub fn holds(&self) -> Result<HashMap<String, HoldRecord>, InventoryError> {
        let mut statement = self.db(self.conn.prepare(
            "SELECT host, kind, reason, revision, epoch(set_at), set_by, epoch(held_until),
                    job_id, on_agent
             FROM host_holds ORDER BY host",
        ))?;
        let rows = self.db(statement.query_map([], |row| {
            Ok(HoldRecord {
                host: row.get(0)?,
                kind: row.get(1)?,
                reason: row.get(2)?,
                revision: row.get(3)?,
                set_at: from_epoch(row.get(4)?).unwrap_or_default(),
                set_by: row.get(5)?,
                until: from_epoch(row.get(6)?),
                job_id: row.get(7)?,
                on_agent: row.get(8)?,
            })
        }))?;
        rows.map(|row| self.db(row).map(|hold| (hold.host.clone(), hold)))
            .collect()
    }

    /// Records holds, each replacing the one in force on its host.
    pub fn record_holds(&self, holds: &[HoldRecord]) -> Result<(), InventoryError> {
        let gone = self.gone_hosts(holds.iter().map(|h| h.host.as_str()), "the hold")?;
        for hold in holds.iter().filter(|h| !gone.contains(&h.host)) {
            self.db(self.conn.execute(
                "UPDATE holds SET released_at = now(), released_by = 'a newer hold',
                        release_job_id = ?
                 WHERE host = ? AND released_at IS NULL",
                params![hold.job_id, hold.host],
            ))?;
            self.db(self.conn.execute(
                "INSERT INTO holds (host, kind, reason, revision, set_at, set_by, held_until,
                                    job_id, on_agent)
                 VALUES (?, ?, ?, ?, to_timestamp(?), ?, to_timestamp(?), ?, ?)",
                params![
                    hold.host,
                    hold.kind,
                    hold.reason,
                    hold.revision,
                    to_epoch(Some(hold.set_at)),
                    hold.set_by,
                    to_epoch(hold.until),
                    hold.job_id,
                    hold.on_agent,
                ],
            ))?;
        }
        Ok(())
    }

    /// Records whether `host`'s agent has the hold in force on the manager (`pm-push holds`:
    /// "agent has it").
    pub fn set_hold_on_agent(&self, host: &str, on_agent: bool) -> Result<(), InventoryError> {
        self.db(self.conn.execute(
            "UPDATE holds SET on_agent = ? WHERE host = ? AND released_at IS NULL",
            params![on_agent, host],
        ))?;
        Ok(())
    }

    /// What polls saw of the agents' holds: a rollback's hold an agent has and the manager
    /// does not (taken on the host) is recorded; for each held host that answered with its hold
    /// (agents of this release), whether its agent has the hold in force on the manager (same
    /// kind and reason) is recorded, so `pm-push holds` never says "agent has it" for an agent
    /// that lost it (state wiped, reset or restored from a snapshot). Only the hosts whose
    /// answer differs from the record are written; returns the holds the answers show lost
    /// (the agent does not have them), so the poll can say so.
    pub fn record_seen_holds(
        &self,
        polled: &[crate::inventory::PolledHost],
    ) -> Result<Vec<HoldRecord>, InventoryError> {
        let held = self.holds()?;
        let mut lost = Vec::new();
        for poll in polled {
            let Ok(answer) = &poll.answer else {
                continue;
            };
            if !answer.status.reports_hold {
                continue;
            }
            let Some(hold) = held.get(&poll.host) else {
                // A rollback the agent took itself (`pm-agent rollback` on the host) is learnt:
                // rollouts then report the host held, and windows leave its hold alone.
                if let Some(theirs) = answer.status.hold.as_ref().filter(|h| {
                    matches!(
                        h.kind,
                        crate::proto::HoldKind::Rollback | crate::proto::HoldKind::FleetRollback
                    )
                }) {
                    self.record_holds(&[HoldRecord {
                        host: poll.host.clone(),
                        kind: theirs.kind.as_str().into(),
                        reason: theirs.reason.clone(),
                        revision: answer.installed.as_ref().and_then(|i| i.revision.clone()),
                        set_at: theirs.set_at,
                        set_by: format!("{} (from the agent)", theirs.set_by),
                        until: theirs.until,
                        job_id: None,
                        on_agent: true,
                    }])?;
                }
                continue;
            };
            let has = answer
                .status
                .hold
                .as_ref()
                .is_some_and(|h| h.kind.as_str() == hold.kind && h.reason == hold.reason);
            if has != hold.on_agent {
                self.set_hold_on_agent(&poll.host, has)?;
            }
            if !has {
                lost.push(hold.clone());
            }
        }
        Ok(lost)
    }

    /// Releases the holds on `hosts` that are not released yet (only those of `only_kind`
    /// when given); returns how many were in force.
    pub fn release_holds(
        &self,
        hosts: &[String],
        only_kind: Option<&str>,
        released_by: &str,
        job_id: Option<i64>,
    ) -> Result<usize, InventoryError> {
        let in_force = self.holds()?;
        let mut released = 0;
        for host in hosts {
            if in_force
                .get(host)
                .is_some_and(|hold| only_kind.is_none_or(|kind| kind == hold.kind))
            {
                released += 1;
            }
            self.db(self.conn.execute(
                "UPDATE holds SET released_at = now(), released_by = ?, release_job_id = ?
                 WHERE host = ? AND released_at IS NULL AND (? IS NULL OR kind = ?)",
                params![released_by, job_id, host, only_kind, only_kind],
            ))?;
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(host: &str, kind: &str, until: Option<DateTime<Utc>>) -> HoldRecord {
        HoldRecord {
            host: host.into(),
            kind: kind.into(),
            reason: format!("{kind} of {host}"),
            revision: Some("r1".into()),
            set_at: Utc::now(),
            set_by: "ops@manager".into(),
            until,
            job_id: Some(1),
            on_agent: true,
        }
    }

    #[test]
    fn a_hold_replaces_the_one_in_force_ends_at_its_time_and_releases_by_kind() {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), std::time::Duration::from_secs(5)).unwrap();
        for host in ["a", "b", "c"] {
            let address = format!("{host}.lan:7505");
            inventory
                .upsert_host(&crate::inventory::HostRecord::active(host, &address))
                .unwrap();
        }
        let past = Utc::now() - chrono::Duration::seconds(1);
        inventory
            .record_holds(&[
                hold("a", "hold", None),
                hold("b", "fleet-rollback", None),
                hold("c", "hold", Some(past)),
            ])
            .unwrap();
        inventory
            .record_holds(&[hold("a", "rollback", None)])
            .unwrap();
        let held = inventory.holds().unwrap();
        assert_eq!(
            held.keys().map(String::as_str).collect::<Vec<_>>().len(),
            2,
            "c ended: {held:?}"
        );
        assert_eq!(held["a"].kind, "rollback", "the newer hold is in force");
        let all = ["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(
            inventory
                .release_holds(&all, Some("fleet-rollback"), "job 2", Some(2))
                .unwrap(),
            1
        );
        assert_eq!(inventory.holds().unwrap().keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(inventory.release_holds(&all, None, "ops", None).unwrap(), 1);
        assert!(inventory.holds().unwrap().is_empty());
    }
}
