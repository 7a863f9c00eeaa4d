//! `GET /v1/poll` (mutual TLS): everything the manager's `pm-poll` records about this host in one
//! answer: status, what is installed, the schedule, and the scan reports and install runs the
//! manager has not seen yet (`?scans_after=ID&updates_after=ID`, ids sort by time).

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

/// Reports newer than `after`, oldest first, at most [`proto::POLL_MAX_REPORTS`] (the oldest
/// ones first, so a manager that was away catches up over a few polls without gaps).
fn newer<T>(newest_first: Vec<T>, id: impl Fn(&T) -> &str, after: Option<&str>) -> Vec<T> {
    let mut items: Vec<T> = newest_first
        .into_iter()
        .filter(|item| after.is_none_or(|after| id(item) > after))
        .collect();
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
    Ok(PollResponse {
        status,
        installed: super::install::installed_state(&agent.dir)?,
        schedule,
        scans: newer(
            super::scan::list(&agent.dir)?,
            |r| r.id.as_str(),
            cursors.scans_after.as_deref(),
        ),
        updates: newer(
            super::schedule::list_updates(&agent.dir)?,
            |r| r.id.as_str(),
            cursors.updates_after.as_deref(),
        ),
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

    #[test]
    fn only_reports_after_the_cursor_come_back_oldest_first_and_bounded() {
        let newest_first: Vec<String> = (0..80).rev().map(|n| format!("{n:03}")).collect();
        let all = newer(newest_first.clone(), |s| s.as_str(), None);
        assert_eq!(all.len(), proto::POLL_MAX_REPORTS);
        assert_eq!(all[0], "000");
        let after = newer(newest_first.clone(), |s| s.as_str(), Some("077"));
        assert_eq!(after, ["078", "079"]);
        assert!(newer(newest_first, |s| s.as_str(), Some("079")).is_empty());
    }
}
