//! Holds on the agent: a held host stays where it is (issue 16). The manager sets a hold with
//! `POST /v1/setup/hold` (`pm-push hold`, a maintenance window or change freeze), with an
//! install that rolls the host back (`pm-rollback --host H --to ...`, a fleet rollback), and
//! the operator on the host with `pm-agent rollback`. It is kept in `setup.json`, so it
//! survives restarts, and it ends when released or at its end time. A window sent over a
//! rollback's hold is not taken ([`keeps_over`]): the agent answers with the hold it kept.
//!
//! What a hold does to each kind of install, decided under the install lock (so a hold taken
//! with an install is in force before the agent's schedule can run again):
//!
//! | install | while held |
//! |---|---|
//! | the agent's own schedule | skipped (logged; no failed run is recorded) |
//! | `POST /v1/update` without a hold (`pm-push update`) | refused, HTTP 409 `held`: the manager did not know of the hold, and records it from the answer |
//! | with a hold (`pm-rollback`), `POST /v1/rollback`, `pm-agent rollback` | installs, then holds the host at what it installed (a fleet rollback's hold does not replace an operator's or a hand rollback's: refused) |
//! | `pm-agent update` by hand | installs: the operator on the host asked for it; the hold stays |
//!
//! Clocks: the manager's end time is by its clock; the agent ends the hold at the later of that
//! time and the same span of its own clock from when it took the hold
//! ([`proto::HoldSpec::seconds_left`]). An agent clock ahead of the manager's (or stepped back
//! later) therefore never ends a window early; one behind ends it up to its offset late, which
//! is the safe side: a push meeting it is told `held` and shows the agent's end time.

use std::path::Path;

use anyhow::Result;
use chrono::{DateTime, Utc};

use super::setup;
use crate::proto::{self, HoldKind, HoldSpec, HoldState};

/// What an install does about the hold in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldPolicy {
    /// The agent's own schedule: nothing is installed while held.
    Skip,
    /// The manager's install without a hold (`pm-push update`): refused while held, since the
    /// manager did not know of the hold.
    Refuse,
    /// Install, then hold the host at what was installed: a rollback by hand or by a fleet
    /// rollback. It replaces the hold in force, except that a fleet rollback's hold never
    /// replaces an operator's or a hand rollback's (refused instead).
    Take(HoldSpec),
    /// Install whatever the hold; the hold stays (`pm-agent update` run by hand on the host).
    Ignore,
}

/// An install the hold in force did not allow.
#[derive(Debug, thiserror::Error)]
#[error("this host is {}; release it with `pm-push release --host HOST` on the manager", describe(.0))]
pub struct Held(pub HoldState);

/// `held (rollback: why) since T by X, until U` for people.
pub fn describe(hold: &HoldState) -> String {
    format!(
        "held ({}: {}) since {} by {}, {}",
        hold.kind.as_str(),
        hold.reason,
        hold.set_at.format("%Y-%m-%d %H:%M:%SZ"),
        hold.set_by,
        match hold.until {
            Some(until) => format!("until {}", until.format("%Y-%m-%d %H:%M:%SZ")),
            None => "until released".to_string(),
        }
    )
}

/// The hold `spec` asks for, taken at `now` by this agent's clock: it ends at the later of the
/// manager's end time and `seconds_left` of this clock.
pub fn take(spec: &HoldSpec, now: DateTime<Utc>) -> HoldState {
    let own_clock = spec
        .seconds_left
        .and_then(|s| i64::try_from(s).ok())
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|left| now.checked_add_signed(left));
    HoldState {
        kind: spec.kind,
        reason: spec.reason.clone(),
        set_by: spec.set_by.clone(),
        set_at: now,
        until: spec
            .until
            .map(|until| own_clock.map_or(until, |own| until.max(own))),
        requested_until: spec.until,
    }
}

/// Whether `hold` is still in force at `now`.
pub fn in_force(hold: &HoldState, now: DateTime<Utc>) -> bool {
    hold.until.is_none_or(|until| now < until)
}

/// The hold in force, if any.
pub fn current(dir: &Path) -> Result<Option<HoldState>> {
    let now = Utc::now();
    Ok(setup::load(dir)?.hold.filter(|hold| in_force(hold, now)))
}

/// A hold the manager sent, checked before it is kept.
pub(super) fn check_spec(spec: &HoldSpec) -> Result<(), String> {
    if spec.reason.trim().is_empty() || spec.reason.len() > 1024 {
        return Err("hold: `reason` must be 1 to 1024 bytes".into());
    }
    if spec.set_by.len() > 256 || spec.reason.chars().any(char::is_control) {
        return Err("hold: `set_by` is at most 256 bytes, `reason` one line".into());
    }
    Ok(())
}

/// Before an install (the install lock held): an error when the hold in force forbids it.
pub(super) fn admit(dir: &Path, policy: &HoldPolicy) -> Result<()> {
    let Some(hold) = current(dir)? else {
        return Ok(());
    };
    match policy {
        HoldPolicy::Ignore => Ok(()),
        HoldPolicy::Take(spec)
            if spec.kind != HoldKind::FleetRollback || hold.kind == HoldKind::FleetRollback =>
        {
            Ok(())
        }
        HoldPolicy::Skip | HoldPolicy::Refuse | HoldPolicy::Take(_) => Err(Held(hold).into()),
    }
}

/// After a successful install (the install lock still held): takes the hold the policy asks
/// for, and says on stderr that the host stays held when an operator installed by hand.
pub(super) fn after_install(dir: &Path, policy: &HoldPolicy) -> Result<()> {
    match policy {
        HoldPolicy::Take(spec) => {
            setup::set_hold(dir, Some(take(spec, Utc::now())))?;
        }
        HoldPolicy::Ignore => {
            if let Some(hold) = current(dir)? {
                eprintln!(
                    "note: this host stays {}: its schedule and the manager's rollouts leave it \
                     where it is now (`pm-push release --host HOST` on the manager ends it)",
                    describe(&hold)
                );
            }
        }
        HoldPolicy::Skip | HoldPolicy::Refuse => {}
    }
    Ok(())
}

/// The hold a rollback by hand takes when it was not given one: `what` (e.g. `backup:1`) put
/// back by `by`.
pub(super) fn rolled_back_by_hand(what: &str, by: &str) -> HoldSpec {
    HoldSpec {
        kind: HoldKind::Rollback,
        reason: format!("rolled back by hand to {what}"),
        set_by: by.to_string(),
        until: None,
        seconds_left: None,
    }
}

/// `user@host` of whoever runs this process (for holds taken on the host).
pub(super) fn local_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "?".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{user}@{} (pm-agent)", host.trim())
}

/// Takes (`Some`) or releases (`None`) a hold as `POST /v1/setup/hold` asks, under the install
/// lock so no install runs on once the answer is given: whether anything changed (the same
/// hold again, or releasing none, changes nothing), and the rollback's hold kept instead of a
/// window ([`keeps_over`]).
pub(super) fn apply(dir: &Path, request: &proto::HoldRequest) -> Result<proto::SetupResponse> {
    let _no_install = super::install::lock(dir)?;
    let now = Utc::now();
    let in_force = current(dir)?;
    match &request.hold {
        Some(spec) => {
            if let Some(hold) = in_force.as_ref().filter(|hold| keeps_over(hold, spec)) {
                tracing::info!(reason = %hold.reason, "window not taken: the host keeps its rollback's hold");
                return Ok(proto::SetupResponse {
                    changed: false,
                    kept: Some(hold.clone()),
                });
            }
            let same = in_force.as_ref().is_some_and(|hold| {
                hold.kind == spec.kind
                    && hold.reason == spec.reason
                    && hold.set_by == spec.set_by
                    && hold.requested_until == spec.until
            });
            if same {
                return Ok(false.into());
            }
            setup::set_hold(dir, Some(take(spec, now)))?;
            Ok(true.into())
        }
        None => {
            let releases = in_force
                .as_ref()
                .is_some_and(|hold| request.only_kind.is_none_or(|kind| kind == hold.kind));
            if releases || (in_force.is_none() && setup::load(dir)?.hold.is_some()) {
                // An ended hold is tidied away too, without counting as a change.
                setup::set_hold(dir, None)?;
            }
            Ok(releases.into())
        }
    }
}

/// Whether the rollback's hold `hold` stays when `spec` is sent: a window (kind `hold`, or any
/// hold with an end) never replaces a rollback's hold (by hand, `pm-agent rollback`, or of the
/// fleet), whether or not the manager knew of it. Replaced, the host would follow dist again
/// when the window ends, undoing the rollback.
pub(super) fn keeps_over(hold: &HoldState, spec: &HoldSpec) -> bool {
    matches!(hold.kind, HoldKind::Rollback | HoldKind::FleetRollback)
        && (spec.kind == HoldKind::Hold || spec.until.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(until: Option<DateTime<Utc>>, seconds_left: Option<u64>) -> HoldSpec {
        HoldSpec {
            kind: HoldKind::Hold,
            reason: "change freeze".into(),
            set_by: "ops@manager".into(),
            until,
            seconds_left,
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    /// `(manager's until, seconds left, agent's now)` -> when the agent ends the hold.
    fn check(until: Option<&str>, seconds_left: Option<u64>, now: &str, expected: Option<&str>) {
        let hold = take(&spec(until.map(at), seconds_left), at(now));
        assert_eq!(
            hold.until,
            expected.map(at),
            "{until:?} {seconds_left:?} {now}"
        );
        assert_eq!(hold.requested_until, until.map(at));
    }

    #[test]
    fn an_agent_clock_off_the_managers_never_ends_a_window_early() {
        // Clocks agree: the same moment either way.
        check(
            Some("2026-01-01T12:10:00Z"),
            Some(600),
            "2026-01-01T12:00:00Z",
            Some("2026-01-01T12:10:00Z"),
        );
        // The agent is an hour ahead: ten minutes of its own time, not a moment long past.
        check(
            Some("2026-01-01T12:10:00Z"),
            Some(600),
            "2026-01-01T13:00:00Z",
            Some("2026-01-01T13:10:00Z"),
        );
        // The agent is an hour behind: the manager's end time (an hour late by the agent's
        // clock, which a later correction of that clock shortens back to the manager's).
        check(
            Some("2026-01-01T12:10:00Z"),
            Some(600),
            "2026-01-01T11:00:00Z",
            Some("2026-01-01T12:10:00Z"),
        );
        // No span given (an older manager): the manager's time; no end: until released.
        check(
            Some("2026-01-01T12:10:00Z"),
            None,
            "2026-01-01T13:00:00Z",
            Some("2026-01-01T12:10:00Z"),
        );
        check(None, Some(600), "2026-01-01T12:00:00Z", None);
        // A span too large for the calendar is the manager's time, not a panic.
        check(
            Some("2026-01-01T12:10:00Z"),
            Some(u64::MAX),
            "2026-01-01T12:00:00Z",
            Some("2026-01-01T12:10:00Z"),
        );
    }

    #[test]
    fn a_hold_is_in_force_until_its_end_and_a_fleet_rollback_does_not_replace_an_operators() {
        let hold = take(
            &spec(Some(at("2026-01-01T12:10:00Z")), Some(600)),
            at("2026-01-01T12:00:00Z"),
        );
        assert!(in_force(&hold, at("2026-01-01T12:09:59Z")));
        assert!(!in_force(&hold, at("2026-01-01T12:10:00Z")));
        let dir = tempfile::tempdir().unwrap();
        setup::set_hold(dir.path(), Some(take(&spec(None, None), Utc::now()))).unwrap();
        let fleet = HoldSpec {
            kind: HoldKind::FleetRollback,
            ..spec(None, None)
        };
        let by_hand = HoldSpec {
            kind: HoldKind::Rollback,
            ..spec(None, None)
        };
        for (policy, allowed) in [
            (HoldPolicy::Skip, false),
            (HoldPolicy::Refuse, false),
            (HoldPolicy::Take(fleet), false),
            (HoldPolicy::Take(by_hand), true),
            (HoldPolicy::Ignore, true),
        ] {
            let admitted = admit(dir.path(), &policy);
            assert_eq!(admitted.is_ok(), allowed, "{policy:?}");
            if let Err(err) = admitted {
                assert!(err.downcast_ref::<Held>().is_some(), "{err:#}");
                assert!(err.to_string().contains("change freeze"), "{err:#}");
            }
        }
    }
}
