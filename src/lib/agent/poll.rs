//! `GET /v1/poll` (mutual TLS): everything the manager's `pm-poll` records about this host in one
//! answer: status, what is installed, the schedule, and the scan reports and install runs the
//! manager has not seen yet (`?scans_after=CURSOR&updates_after=CURSOR`): those numbered above
//! N for a cursor `seq:STREAM:N` of this agent's report stream (see `reports`), every kept one
//! for a cursor of another stream (this state directory is not the one the manager knew), and
//! those whose id sorts after an id cursor (a manager from before the numbers, or its first
//! poll since). The answer names the stream and its last number.
//!
//! A cursor of this stream above the last number, or naming a report this agent numbered
//! otherwise, means this state directory went back in time (a VM snapshot or a backup
//! restored): the numbers after it were given again to other reports, so every kept report
//! comes back, of both kinds, for the manager to sort by id.

use std::sync::Arc;

use anyhow::Result;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::{Agent, error, from_manager};
use crate::proto::{self, PollResponse, ScheduleEntry};
use crate::tls::TlsConnectInfo;

/// The query of a poll: the newest report ids the manager already has.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cursors {
    scans_after: Option<String>,
    updates_after: Option<String>,
}

/// Whether one kind's `cursor` shows that this state directory went back (see the module): it
/// names a number of this stream the agent has not given yet, or one the agent gave to another
/// report than the one the manager recorded under it (the kept report of that number has
/// another id, or is gone while older ones of the kind are kept: pruning takes the oldest).
/// `kept`: the kind's kept reports as (number, id).
fn rewound(cursor: Option<&str>, stream: &str, last: u64, kept: &[(Option<u64>, &str)]) -> bool {
    let Some((of, after, recorded_id)) = cursor.and_then(proto::parse_seq_cursor) else {
        return false;
    };
    if of != stream {
        return false;
    }
    if after > last {
        return true;
    }
    let Some(recorded_id) = recorded_id else {
        return false;
    };
    match kept.iter().find(|(seq, _)| *seq == Some(after)) {
        Some((_, id)) => *id != recorded_id,
        None => kept
            .iter()
            .any(|(seq, _)| seq.is_some_and(|seq| seq < after)),
    }
}

/// Reports newer than `after` (a cursor, see the module), oldest first, at most
/// [`proto::POLL_MAX_REPORTS`] (the oldest ones first, so a manager that was away catches up
/// over a few polls without gaps).
fn newer<T>(
    newest_first: Vec<T>,
    key: impl Fn(&T) -> (Option<u64>, &str),
    after: Option<&str>,
    stream: Option<&str>,
) -> Vec<T> {
    let is_new = |item: &T| {
        let (seq, id) = key(item);
        match after {
            None => true,
            Some(cursor) => match proto::parse_seq_cursor(cursor) {
                Some((of, after, _)) if Some(of) == stream => seq.is_some_and(|seq| seq > after),
                Some(_) => true,
                None => id > cursor,
            },
        }
    };
    let mut items: Vec<T> = newest_first.into_iter().filter(is_new).collect();
    items.reverse();
    items.truncate(proto::POLL_MAX_REPORTS);
    items
}

fn answer(agent: &Agent, status: proto::AgentStatus, cursors: &Cursors) -> Result<PollResponse> {
    let path = agent.dir.join(super::CONFIG_FILE);
    let schedule = super::schedule::status(&agent.config, &path)?
        .into_iter()
        .map(|entry| ScheduleEntry {
            job: entry.job.to_string(),
            expression: entry.expression,
            next_run: entry.next_run.map(|t| t.with_timezone(&chrono::Utc)),
        })
        .collect();
    let (stream, last) = super::reports::stream(&agent.dir).unzip();
    let scans = super::scan::list(&agent.dir)?;
    let updates = super::schedule::list_updates(&agent.dir)?;
    let scan_keys: Vec<_> = scans.iter().map(|r| (r.seq, r.id.as_str())).collect();
    let update_keys: Vec<_> = updates.iter().map(|r| (r.seq, r.id.as_str())).collect();
    // A rewound stream answers as another stream would: with every report kept.
    let own_stream = stream.as_deref().filter(|stream| {
        !last.is_some_and(|last| {
            rewound(cursors.scans_after.as_deref(), stream, last, &scan_keys)
                || rewound(cursors.updates_after.as_deref(), stream, last, &update_keys)
        })
    });
    if own_stream.is_none() && stream.is_some() {
        tracing::warn!(
            last = last.unwrap_or_default(),
            "the manager has seen report numbers this agent has not given yet (its state was restored from a snapshot or backup?): sending every kept report"
        );
    }
    Ok(PollResponse {
        status,
        installed: super::install::installed_state(&agent.dir, &agent.config.database_dir)?,
        schedule,
        scans: newer(
            scans,
            |r| (r.seq, r.id.as_str()),
            cursors.scans_after.as_deref(),
            own_stream,
        ),
        updates: newer(
            updates,
            |r| (r.seq, r.id.as_str()),
            cursors.updates_after.as_deref(),
            own_stream,
        ),
        report_last: last,
        report_stream: stream,
    })
}

async fn poll_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    cursors: Result<Query<Cursors>, QueryRejection>,
) -> Response {
    let status = {
        let inner = agent.lock();
        if let Err(response) = from_manager(&inner, &info) {
            return *response;
        }
        super::agent_status(&agent, &inner)
    };
    let cursors = match cursors {
        Ok(Query(cursors)) => cursors,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the query takes only `scans_after` and `updates_after`: {rejection}"),
            );
        }
    };
    let worker = Arc::clone(&agent);
    match tokio::task::spawn_blocking(move || answer(&worker, status, &cursors)).await {
        Ok(Ok(response)) => axum::Json(response).into_response(),
        Ok(Err(err)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the agent cannot read its state: {err:#}"),
        ),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the poll stopped: {err}"),
        ),
    }
}

/// `GET /v1/poll`.
pub(super) fn routes() -> Router<Arc<Agent>> {
    Router::new().route(proto::POLL_PATH, get(poll_handler))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report as the tests see it: its number and id.
    type Report = (Option<u64>, String);

    fn key(report: &Report) -> (Option<u64>, &str) {
        (report.0, &report.1)
    }

    fn ids(reports: Vec<Report>) -> Vec<String> {
        reports.into_iter().map(|(_, id)| id).collect()
    }

    #[test]
    fn only_reports_after_the_cursor_come_back_oldest_first_and_bounded() {
        let newest_first: Vec<Report> = (0..80).rev().map(|n| (None, format!("{n:03}"))).collect();
        let all = newer(newest_first.clone(), key, None, None);
        assert_eq!(all.len(), proto::POLL_MAX_REPORTS);
        assert_eq!(all[0].1, "000");
        let after = newer(newest_first.clone(), key, Some("077"), None);
        assert_eq!(ids(after), ["078", "079"]);
        assert!(newer(newest_first, key, Some("079"), None).is_empty());
    }

    #[test]
    fn a_sequence_cursor_counts_in_its_own_stream_only() {
        // Numbered 1..=4, newest first, with ids that went back with the clock at 3.
        let newest_first: Vec<Report> = vec![
            (Some(4), "2026-a".into()),
            (Some(3), "2025-z".into()),
            (Some(2), "2030-b".into()),
            (Some(1), "2030-a".into()),
            (None, "2029-z".into()),
        ];
        let cursor = proto::seq_cursor("ab", 2, None);
        assert_eq!(
            ids(newer(newest_first.clone(), key, Some(&cursor), Some("ab"))),
            ["2025-z", "2026-a"],
            "the reports made after the clock stepped back come back"
        );
        // Another stream (a new state directory): everything kept, for the manager to sort.
        assert_eq!(
            newer(newest_first.clone(), key, Some(&cursor), Some("cd")).len(),
            5
        );
        // An id cursor (a manager from before the numbers): by id, as before.
        assert_eq!(
            ids(newer(newest_first, key, Some("2030-a"), Some("ab"))),
            ["2030-b"]
        );
    }

    #[test]
    fn a_cursor_the_stream_does_not_match_any_more_means_the_state_went_back() {
        // Kept: numbers 3 and 5 of this kind (4 went to the other kind), last given 6.
        let kept = [(Some(5), "e"), (Some(3), "c")];
        let check = |cursor: Option<&str>, expected: bool| {
            assert_eq!(rewound(cursor, "ab", 6, &kept), expected, "{cursor:?}");
        };
        check(None, false);
        check(Some("seq:ab:5"), false);
        check(Some("seq:ab:5:e"), false);
        check(Some("seq:ab:9"), true);
        // Number 5 was given to another report than the one recorded under it.
        check(Some("seq:ab:5:x"), true);
        // Number 4 of this kind is not kept while 3 is: it went to another report.
        check(Some("seq:ab:4:d"), true);
        // Number 2 is older than anything kept: pruned, nothing to tell.
        check(Some("seq:ab:2:b"), false);
        // Another stream's numbers, or ids, say nothing about this one.
        check(Some("seq:cd:9"), false);
        check(Some("20991231T000000.000000Z-ff"), false);
    }
}
