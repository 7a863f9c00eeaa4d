//! History growth benchmark (`pm-lab history`): fills an inventory with simulated poll history
//! of a large fleet and times the views the tools read.
//!
//! Rows are made by set-based SQL (`INSERT ... SELECT FROM range(...)`), one day of polls per
//! transaction, so memory stays bounded whatever the size. Everything derives from a seeded
//! `hash()`, so a size and seed always give the same data. The model:
//!
//! - `hosts`: `bench-00001`.. in 10 groups `grp-01`.., addresses `10.x.y.z:7505`;
//! - dist: a new `daily` version every 6 hours (revision `rN`, `main` and `bytecode` fixed),
//!   published in `dist_history`;
//! - `polls`: every host every interval; ~1% fail (timeout, unreachable, ...), 0.5% of hosts
//!   stop answering for the last hour and 0.5% for the last two days;
//! - agents update every 15 minutes, 3% of them once a day (they skip versions and lag); a
//!   poll records a `component_versions` row (and the `update_runs` report) the first time it
//!   sees an install; 80% of agents move from pm-agent 0.1.0 to 0.2.0 halfway;
//! - one scan a day per host (0.05% infected with findings, 0.2% failed);
//! - `host_state` and `installed_components` as the last poll left them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::{INVENTORY_FILE, Inventory, InventoryError};

/// What to simulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySpec {
    /// Active hosts.
    pub hosts: usize,
    /// Days of history, ending now.
    pub days: u32,
    /// Time between two polls of a host (whole seconds, at least one).
    pub interval: Duration,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for HistorySpec {
    fn default() -> Self {
        HistorySpec {
            hosts: 10_000,
            days: 90,
            interval: Duration::from_secs(300),
            seed: 42,
        }
    }
}

/// What [`Inventory::generate_history`] wrote.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GeneratedHistory {
    /// Rows per table after generation.
    pub rows: BTreeMap<String, i64>,
    /// Wall time of the generation.
    pub seconds: f64,
}

/// One timed query of the benchmark.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueryTiming {
    /// Short name.
    pub name: String,
    /// The SQL.
    pub sql: String,
    /// Rows it returned.
    pub rows: u64,
    /// Median of the timed runs, milliseconds.
    pub median_ms: f64,
    /// Every timed run (after one warm-up), milliseconds.
    pub runs_ms: Vec<f64>,
}

/// The benchmark's JSON report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistoryReport {
    /// Hosts simulated.
    pub hosts: usize,
    /// Days simulated.
    pub days: u32,
    /// Poll interval, seconds.
    pub interval_seconds: u64,
    /// Rows per table.
    pub rows: BTreeMap<String, i64>,
    /// Generation wall time.
    pub generate_seconds: f64,
    /// Time of the final `CHECKPOINT`.
    pub checkpoint_seconds: f64,
    /// Size of `inventory.duckdb` after the checkpoint.
    pub file_bytes: u64,
    /// Size of `inventory.duckdb.wal` (0 when there is none).
    pub wal_bytes: u64,
    /// `file_bytes + wal_bytes` in GiB.
    pub total_gib: f64,
    /// First read-only open (as the tools open it), milliseconds.
    pub open_read_only_first_ms: f64,
    /// Median of 5 more read-only opens, milliseconds.
    pub open_read_only_median_ms: f64,
    /// The timed queries.
    pub queries: Vec<QueryTiming>,
}

/// Timed runs per query (after one warm-up).
const RUNS: usize = 5;

/// Tables whose rows the report counts.
const TABLES: &[&str] = &[
    "hosts",
    "revisions",
    "revision_files",
    "dist_history",
    "polls",
    "component_versions",
    "update_runs",
    "scans",
    "scan_findings",
    "host_state",
    "installed_components",
];

/// Parses a poll interval: `300`, `300s`, `5m`, `1h`.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a number with s, m or h, e.g. 5m"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => return Err(format!("`{text}`: unit must be s, m or h")),
    };
    if seconds == 0 {
        return Err(format!("`{text}`: the interval must be at least 1s"));
    }
    Ok(Duration::from_secs(seconds))
}

/// The name of simulated host number `index` (1-based) in a fleet of `hosts`.
pub fn bench_host_name(index: usize, hosts: usize) -> String {
    format!("bench-{index:0width$}", width = name_width(hosts))
}

fn name_width(hosts: usize) -> usize {
    hosts.to_string().len().max(5)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// Numbers every statement of one generation shares.
struct Plan {
    hosts: i64,
    /// Poll interval, seconds.
    interval: i64,
    /// Polls per host: poll `k` (1..=polls) is at `start + k * interval`.
    polls: i64,
    /// Epoch seconds.
    start: i64,
    end: i64,
    /// Revisions `r1`..: `rS` is published at `start + (S - 1) * 6 h - 1 h`.
    revisions: i64,
    days: i64,
}

impl Plan {
    fn new(spec: &HistorySpec, now: i64) -> Plan {
        let interval = spec.interval.as_secs().max(1) as i64;
        let polls = (i64::from(spec.days) * 86_400 / interval).max(1);
        let end = now - now.rem_euclid(interval);
        let start = end - polls * interval;
        Plan {
            hosts: spec.hosts as i64,
            interval,
            polls,
            start,
            end,
            revisions: (polls * interval + 3600) / 21_600 + 1,
            days: i64::from(spec.days).max(1),
        }
    }

    /// Temporary macros the generating statements share (connection-local).
    fn macros(&self, spec: &HistorySpec) -> String {
        let Plan {
            interval,
            polls,
            start,
            ..
        } = *self;
        let width = name_width(spec.hosts);
        let seed = spec.seed;
        // Hosts that stop answering: for the last hour, or the last two days (at most half).
        let hour = (3600 / interval).max(1);
        let two_days = (172_800 / interval).min(polls / 2);
        format!(
            "CREATE OR REPLACE TEMP MACRO bench_rand(h, k, tag) AS
                 hash(CAST({seed} AS UBIGINT), CAST(h AS BIGINT), CAST(k AS BIGINT), CAST(tag AS VARCHAR));
             CREATE OR REPLACE TEMP MACRO bench_name(h) AS
                 'bench-' || lpad(CAST(h AS VARCHAR), {width}, '0');
             CREATE OR REPLACE TEMP MACRO bench_at(k) AS
                 to_timestamp(CAST({start} + CAST(k AS BIGINT) * {interval} AS DOUBLE));
             CREATE OR REPLACE TEMP MACRO bench_ts(epoch) AS to_timestamp(CAST(epoch AS DOUBLE));
             CREATE OR REPLACE TEMP MACRO bench_down(h) AS
                 CASE bench_rand(h, 0, 'down') % 200
                     WHEN 0 THEN {polls} - {hour}
                     WHEN 1 THEN {polls} - {two_days}
                     ELSE {polls} END;
             CREATE OR REPLACE TEMP MACRO bench_ok(h, k) AS
                 (bench_rand(h, k, 'ok') % 1000 >= 10 AND k <= bench_down(h));
             CREATE OR REPLACE TEMP MACRO bench_k_after(epoch) AS
                 greatest(1, CAST(ceil((epoch - {start}) / {interval}) AS BIGINT));
             CREATE OR REPLACE TEMP MACRO bench_first_ok(h, k0) AS
                 CASE WHEN k0 > {polls} THEN NULL
                      WHEN bench_ok(h, k0) THEN k0
                      WHEN k0 + 1 <= {polls} AND bench_ok(h, k0 + 1) THEN k0 + 1
                      WHEN k0 + 2 <= {polls} AND bench_ok(h, k0 + 2) THEN k0 + 2
                      WHEN k0 + 3 <= {polls} AND bench_ok(h, k0 + 3) THEN k0 + 3
                 END;"
        )
    }

    /// Hosts, revisions, dist, and the temporary tables of who installed what when.
    fn setup(&self) -> String {
        let Plan {
            hosts,
            start,
            revisions,
            days,
            ..
        } = *self;
        let half = days / 2 * 86_400;
        format!(
            "CREATE OR REPLACE TEMP TABLE bench_hosts AS
             SELECT h, bench_name(h) AS host,
                    'grp-' || lpad(CAST(h % 10 + 1 AS VARCHAR), 2, '0') AS grp,
                    CASE WHEN bench_rand(h, 0, 'lag') % 100 < 3 THEN 86400 ELSE 900 END AS period,
                    CAST(bench_rand(h, 0, 'offset') % 86400 AS BIGINT) AS offset_raw,
                    CAST(bench_rand(h, 0, 'scan') % 24 AS BIGINT) AS scan_hour,
                    CASE WHEN bench_rand(h, 0, 'agent') % 10 < 8
                         THEN {start} + {half} + CAST(bench_rand(h, 0, 'agent_at') % 86400 AS BIGINT)
                    END AS agent_up_at
             FROM range(1, {hosts} + 1) t(h);

             CREATE OR REPLACE TEMP TABLE bench_revs AS
             SELECT s, concat('r', s) AS revision,
                    {start} + (s - 1) * 21600 - 3600 AS published,
                    CAST(27000 + s - 1 AS VARCHAR) AS daily
             FROM range(1, {revisions} + 1) t(s);

             INSERT INTO hosts (host, address, host_group, profile, labels, certificate_serial,
                                certificate_fingerprint, agent_version, engine, activated_at,
                                activation_key_id, state)
             SELECT host,
                    concat('10.', h // 65536 % 256, '.', h // 256 % 256, '.', h % 256, ':7505'),
                    grp, 'default',
                    concat('{{\"site\":\"dc', h % 3 + 1, '\",\"role\":\"',
                           ['web', 'db', 'mail', 'file'][1 + h % 4], '\"}}'),
                    substr(md5(host), 1, 16), 'sha256:' || sha256(host), '0.1.0', 'clamav',
                    bench_ts({start} - 86400 - h), 'bench', 'active'
             FROM bench_hosts ORDER BY h;

             -- A fresh inventory numbers them 1..N in this order: `polls.host_id` = h.
             INSERT INTO host_ids (host) SELECT host FROM bench_hosts ORDER BY h;

             INSERT INTO revisions
             SELECT s, revision, sha256(revision), bench_ts(published - 180), 'upstream', 3,
                    162583588 + 282624 + 60000000 + s * 1000
             FROM bench_revs ORDER BY s;

             INSERT INTO revision_files
             SELECT r.revision, f.path, 'clamav', f.component,
                    CASE f.component WHEN 'daily' THEN r.daily ELSE f.version END,
                    CASE f.component WHEN 'daily' THEN bench_ts(r.published - 600)
                         ELSE bench_ts(f.built) END,
                    CASE f.component WHEN 'daily' THEN 60000000 + r.s * 1000 ELSE f.size END,
                    sha256(r.revision || f.path)
             FROM bench_revs r,
                  (VALUES ('clamav/main.cvd', 'main', '62', {start} - 3456000, 162583588),
                          ('clamav/daily.cvd', 'daily', NULL, NULL, NULL),
                          ('clamav/bytecode.cvd', 'bytecode', '335', {start} - 864000, 282624))
                      f(path, component, version, built, size)
             ORDER BY r.s, f.path;

             INSERT INTO dist_history (changed_at, action, revision, previous_revision, backups,
                                       archived)
             SELECT bench_ts(published), 'publish', revision,
                    CASE WHEN s > 1 THEN concat('r', s - 1) END,
                    concat_ws(',', CASE WHEN s > 1 THEN concat('r', s - 1) END,
                                   CASE WHEN s > 2 THEN concat('r', s - 2) END,
                                   CASE WHEN s > 3 THEN concat('r', s - 3) END),
                    CASE WHEN s > 4 THEN concat('r', s - 4) END
             FROM bench_revs ORDER BY s;

             -- Each install: an agent runs its update every `period` seconds from its offset and
             -- installs what dist serves then (r1 was there before the period); `k` is the
             -- first poll that answered after it (NULL: never seen).
             CREATE OR REPLACE TEMP TABLE bench_seen AS
             WITH installs AS (
                 SELECT h, max(s) AS s, u FROM (
                     SELECT b.h, r.s,
                            {start} + b.offset_raw % b.period
                            + CAST(ceil((r.published + 120 - {start} - b.offset_raw % b.period)
                                        / b.period) AS BIGINT) * b.period AS u
                     FROM bench_hosts b, bench_revs r
                     WHERE r.s >= 2)
                 GROUP BY h, u
                 UNION ALL
                 SELECT h, 1, {start} - 3600 FROM bench_hosts
             )
             SELECT h, s, u, bench_first_ok(h, bench_k_after(u + 20)) AS k FROM installs;"
        )
    }

    /// Polls with `k` in `first..last` (one transaction's worth), in poll order.
    fn polls(&self, first: i64, last: i64) -> String {
        let hosts = self.hosts;
        let count = (last - first) * hosts;
        format!(
            "INSERT INTO polls
             SELECT k, CAST(h AS INTEGER), bench_at(k), ok,
                    kind,
                    CASE kind
                        WHEN 'timeout' THEN 'no answer within 5s'
                        WHEN 'unreachable' THEN 'connect: no route to host'
                        WHEN 'refused' THEN 'connect: connection refused'
                        WHEN 'tls' THEN 'TLS handshake: certificate verify failed'
                        WHEN 'bad_response' THEN 'invalid poll response: expected value at line 1 column 1'
                        WHEN 'deadline' THEN 'poll round deadline of 60s passed'
                    END,
                    CASE WHEN ok THEN round(1.5 + (bench_rand(h, k, 'ms') % 2500) / 100.0, 2) END
             FROM (
                 SELECT k, h, ok,
                        CASE WHEN ok THEN NULL
                             WHEN k > bench_down(h) THEN 'unreachable'
                             ELSE ['timeout', 'timeout', 'timeout', 'timeout', 'unreachable',
                                   'unreachable', 'refused', 'tls', 'bad_response', 'deadline']
                                  [1 + CAST(bench_rand(h, k, 'kind') % 10 AS INTEGER)]
                        END AS kind
                 FROM (
                     SELECT k, h, bench_ok(h, k) AS ok
                     FROM (SELECT {first} + i // {hosts} AS k, 1 + i % {hosts} AS h
                           FROM range(0, {count}) r(i))))"
        )
    }

    /// The scans started on day `day` (0-based) that a poll collected, and their findings.
    fn scans(&self, day: i64) -> String {
        let Plan { start, .. } = *self;
        let day_start = start + day * 86_400;
        let day_end = day_start + 86_400;
        format!(
            "INSERT INTO scans
             SELECT host,
                    strftime(bench_ts(st), '%Y%m%dT%H%M%S') || '.000000Z-' || substr(md5(host || {day}), 1, 4),
                    bench_ts(st), bench_ts(st + dur), dur, 'clamav', 'clamscan',
                    '/srv' || chr(10) || '/home' || chr(10) || '/var/www',
                    CASE WHEN x >= 5 AND x < 25 THEN NULL ELSE 80000 + x * 7 END,
                    CASE WHEN x < 5 THEN 'infected' WHEN x < 25 THEN 'error' ELSE 'clean' END,
                    CASE WHEN x < 5 THEN 1 + x % 2 ELSE 0 END,
                    CASE WHEN x >= 5 AND x < 25
                         THEN 'clamscan exited with 2: Can''t open file or directory' END,
                    bench_at(k)
             FROM (
                 SELECT h, host, st, dur, x, bench_first_ok(h, bench_k_after(st + dur + 1)) AS k
                 FROM (
                     SELECT h, host,
                            {day_start} + scan_hour * 3600
                                + CAST(bench_rand(h, {day}, 'scan_at') % 3600 AS BIGINT) AS st,
                            300 + CAST(bench_rand(h, {day}, 'scan_s') % 1500 AS BIGINT) AS dur,
                            CAST(bench_rand(h, {day}, 'scan_x') % 10000 AS BIGINT) AS x
                     FROM bench_hosts))
             WHERE k IS NOT NULL
             ORDER BY k, h;

             INSERT INTO scan_findings
             SELECT host, scan_id,
                    ['/srv/uploads/invoice.pdf.exe', '/home/alice/Downloads/eicar.com',
                     '/var/www/html/wp-content/uploads/shell.php', '/srv/mail/attachment.docm',
                     '/home/bob/.cache/tmp/x.js', '/srv/share/setup.exe']
                        [1 + CAST(hash(scan_id, i) % 6 AS INTEGER)],
                    ['Eicar-Test-Signature', 'Win.Trojan.Agent-1234', 'Php.Webshell.Generic-1',
                     'Doc.Dropper.Agent-6347745-0', 'Js.Downloader.Agent-5', 'Win.Malware.Emotet-99']
                        [1 + CAST(hash(scan_id, i, 'sig') % 6 AS INTEGER)],
                    finished_at
             FROM (SELECT host, scan_id, finished_at, unnest(range(findings)) AS i
                   FROM scans
                   WHERE result = 'infected'
                     AND started_at >= bench_ts({day_start}) AND started_at < bench_ts({day_end}))
             ORDER BY finished_at, host, i;"
        )
    }

    /// Version changes and install runs as polls saw them.
    fn versions(&self) -> &'static str {
        "INSERT INTO component_versions
         SELECT host, component, version, build_time, revision, bench_at(k)
         FROM (
             SELECT b.h, b.host, 'daily' AS component, r.daily AS version,
                    bench_ts(r.published - 600) AS build_time, r.revision, x.k, 1 AS o
             FROM bench_seen x JOIN bench_hosts b USING (h) JOIN bench_revs r USING (s)
             WHERE x.k IS NOT NULL
             UNION ALL
             SELECT b.h, b.host, c.component, c.version, c.build_time, 'r1', x.k, c.o
             FROM bench_seen x JOIN bench_hosts b USING (h),
                  (SELECT 'main' AS component, '62' AS version,
                          (SELECT build_time FROM revision_files
                           WHERE revision = 'r1' AND component = 'main') AS build_time, 0 AS o
                   UNION ALL
                   SELECT 'bytecode', '335',
                          (SELECT build_time FROM revision_files
                           WHERE revision = 'r1' AND component = 'bytecode'), 2
                   UNION ALL
                   SELECT 'pm-agent', '0.1.0', NULL, 3) c
             WHERE x.s = 1 AND x.k IS NOT NULL
             UNION ALL
             SELECT a.h, a.host, 'pm-agent', '0.2.0', NULL, concat('r', x.s), a.k, 3
             FROM (SELECT h, host, bench_first_ok(h, bench_k_after(agent_up_at)) AS k
                   FROM bench_hosts WHERE agent_up_at IS NOT NULL) a
             ASOF JOIN (SELECT h, s, k FROM bench_seen WHERE k IS NOT NULL) x
                 ON a.h = x.h AND a.k >= x.k
             WHERE a.k IS NOT NULL)
         ORDER BY k, h, o;

         INSERT INTO update_runs
         SELECT host,
                strftime(bench_ts(u), '%Y%m%dT%H%M%S') || '.000000Z-' || substr(md5(host || s), 1, 4),
                'schedule', 'update', bench_ts(u), bench_ts(u + 20), true, true,
                concat('r', s), concat('r', previous), NULL, bench_at(k)
         FROM (
             SELECT x.h, b.host, x.s, x.u, x.k,
                    lag(x.s, 1, 1) OVER (PARTITION BY x.h ORDER BY x.u) AS previous
             FROM bench_seen x JOIN bench_hosts b USING (h)
             WHERE x.k IS NOT NULL AND x.s >= 2)
         ORDER BY k, h;"
    }

    /// `host_state` and `installed_components` as the last poll of each host left them.
    fn current(&self) -> String {
        let Plan {
            polls,
            interval,
            end,
            ..
        } = *self;
        // Hosts stop answering for at most two days: their last answer is in this window.
        let window = (end - 3 * 86_400).max(self.start);
        format!(
            "INSERT INTO host_state
             WITH last_poll AS (
                 SELECT host, polled_at, ok, error_kind, error, latency_ms
                 FROM poll_history WHERE polled_at = bench_at({polls})
             ),
             last_ok AS (
                 SELECT host, max(polled_at) AS at FROM poll_history
                 WHERE ok AND polled_at >= bench_ts({window}) GROUP BY host
             ),
             agent AS (
                 SELECT host, arg_max(version, changed_at) AS version FROM component_versions
                 WHERE component = 'pm-agent' GROUP BY host
             ),
             installed AS (
                 SELECT h, arg_max(s, k) AS s, arg_max(u, k) AS u FROM bench_seen
                 WHERE k IS NOT NULL GROUP BY h
             ),
             scan AS (
                 SELECT host, arg_max(scan_id, finished_at) AS id, max(finished_at) AS at,
                        arg_max(result, finished_at) AS result,
                        arg_max(findings, finished_at) AS findings
                 FROM scans GROUP BY host
             ),
             run AS (
                 SELECT host, arg_max(run_id, finished_at) AS id, max(finished_at) AS at
                 FROM update_runs GROUP BY host
             )
             SELECT b.host, p.polled_at, o.at, p.ok, p.error_kind, p.error, p.latency_ms,
                    a.version,
                    CASE WHEN i.s IS NOT NULL THEN 'clamav' END,
                    CASE WHEN i.s IS NOT NULL THEN b.grp END,
                    CASE WHEN i.s IS NOT NULL THEN 'default' END,
                    CASE WHEN i.s IS NOT NULL THEN bench_ts({end} + 180 * 86400) END,
                    CASE WHEN i.s IS NOT NULL THEN concat('r', i.s) END,
                    CAST(i.s AS INTEGER),
                    CASE WHEN i.s IS NOT NULL THEN bench_ts(i.u + 20) END,
                    CASE WHEN i.s IS NOT NULL THEN
                        concat_ws(',', CASE WHEN i.s > 1 THEN concat('r', i.s - 1) END,
                                       CASE WHEN i.s > 2 THEN concat('r', i.s - 2) END,
                                       CASE WHEN i.s > 3 THEN concat('r', i.s - 3) END) END,
                    CASE WHEN i.s IS NOT NULL THEN
                        concat(CASE WHEN b.period = 900 THEN 'update=*/15 * * * *'
                                    ELSE concat('update=', b.offset_raw % 3600 // 60, ' ',
                                                b.offset_raw // 3600, ' * * *') END,
                               '; scan=0 ', b.scan_hour, ' * * *') END,
                    s.id, s.at, s.result, s.findings,
                    r.id, r.at, CASE WHEN r.id IS NOT NULL THEN true END, NULL,
                    NULL -- manifest_key: benchmark hosts report none
             FROM bench_hosts b
             JOIN last_poll p ON p.host = b.host
             LEFT JOIN last_ok o ON o.host = b.host
             LEFT JOIN agent a ON a.host = b.host
             LEFT JOIN installed i ON i.h = b.h
             LEFT JOIN scan s ON s.host = b.host
             LEFT JOIN run r ON r.host = b.host
             ORDER BY b.h;

             INSERT INTO installed_components
             SELECT v.host, v.component, arg_max(v.version, v.changed_at),
                    arg_max(v.build_time, v.changed_at), s.installed_revision
             FROM component_versions v JOIN host_state s USING (host)
             GROUP BY v.host, v.component, s.installed_revision
             ORDER BY v.host, v.component;

             -- Keep the interval the data was made with next to it.
             INSERT INTO settings VALUES ('bench_poll_interval_seconds', '{interval}')
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value;"
        )
    }
}

impl Inventory {
    /// Fills an empty inventory with `spec`'s simulated history ending now; `progress` gets a
    /// line per step. Not for a real inventory: host names `bench-*` and made-up dist.
    pub fn generate_history(
        &self,
        spec: &HistorySpec,
        progress: &mut dyn FnMut(&str),
    ) -> Result<GeneratedHistory, InventoryError> {
        let started = Instant::now();
        let plan = Plan::new(spec, Utc::now().timestamp());
        self.db(self.conn.execute_batch(&plan.macros(spec)))?;
        self.transaction(|inv| inv.db(inv.conn.execute_batch(&plan.setup())))?;
        progress(&format!(
            "hosts, {} revisions and installs ready ({:.1}s)",
            plan.revisions,
            started.elapsed().as_secs_f64()
        ));
        let per_day = (86_400 / plan.interval).max(1);
        let chunks = (plan.polls + per_day - 1) / per_day;
        for chunk in 0..chunks {
            let chunk_started = Instant::now();
            let first = 1 + chunk * per_day;
            let last = (first + per_day).min(plan.polls + 1);
            self.transaction(|inv| {
                inv.db(inv.conn.execute_batch(&plan.polls(first, last)))?;
                if chunk < plan.days {
                    inv.db(inv.conn.execute_batch(&plan.scans(chunk)))?;
                }
                Ok(())
            })?;
            progress(&format!(
                "day {}/{chunks}: {} polls in {:.1}s (total {:.0}s)",
                chunk + 1,
                (last - first) * plan.hosts,
                chunk_started.elapsed().as_secs_f64(),
                started.elapsed().as_secs_f64()
            ));
        }
        self.transaction(|inv| {
            inv.db(inv.conn.execute_batch(plan.versions()))?;
            inv.db(inv.conn.execute_batch(&plan.current()))
        })?;
        self.db(self.conn.execute_batch(
            "DROP TABLE bench_seen; DROP TABLE bench_revs; DROP TABLE bench_hosts;",
        ))?;
        progress(&format!(
            "versions, update runs and current state done ({:.0}s)",
            started.elapsed().as_secs_f64()
        ));
        let mut rows = BTreeMap::new();
        for table in TABLES {
            let count: i64 = self.db(self.conn.query_row(
                &format!("SELECT count(*) FROM {table}"),
                [],
                |row| row.get(0),
            ))?;
            rows.insert((*table).to_string(), count);
        }
        Ok(GeneratedHistory {
            rows,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Runs `sql`, reads every row of its result, and returns how many there were and how long
    /// preparing, running and reading took.
    pub fn time_query(&self, sql: &str) -> Result<(u64, Duration), InventoryError> {
        let started = Instant::now();
        let mut statement = self.db(self.conn.prepare(sql))?;
        let mut rows = self.db(statement.query([]))?;
        let mut count = 0;
        while self.db(rows.next())?.is_some() {
            count += 1;
        }
        Ok((count, started.elapsed()))
    }

    /// Writes what is in memory and the WAL into the database file.
    pub fn checkpoint(&self) -> Result<(), InventoryError> {
        self.db(self.conn.execute_batch("CHECKPOINT"))
    }
}

/// The queries the benchmark times: the fleet views and typical history questions.
pub fn history_queries(hosts: usize) -> Vec<(String, String)> {
    let host = bench_host_name(42.min(hosts.max(1)), hosts);
    [
        ("fleet_status", "SELECT * FROM fleet_status".to_string()),
        ("stale_hosts", "SELECT * FROM stale_hosts".to_string()),
        ("version_drift", "SELECT * FROM version_drift".to_string()),
        (
            "failed_polls_per_group_per_day_7d",
            "SELECT date_trunc('day', p.polled_at) AS day, h.host_group AS grp, count(*) AS polls, \
             count(*) FILTER (WHERE NOT p.ok) / count(*) AS failed_share \
             FROM poll_history p JOIN hosts h ON h.host = p.host \
             WHERE p.polled_at >= now() - INTERVAL 7 DAY \
             GROUP BY ALL ORDER BY day, grp"
                .to_string(),
        ),
        (
            // The same answer, counted per poll round before the (time-zone aware, slow)
            // date_trunc: that runs on ~2,000 rounds instead of ~20 million rows.
            "failed_polls_per_group_per_day_7d_by_round",
            "SELECT date_trunc('day', t) AS day, grp, sum(n) AS polls, sum(f) / sum(n) AS failed_share \
             FROM (SELECT p.polled_at AS t, h.host_group AS grp, count(*) AS n, \
                          count(*) FILTER (WHERE NOT p.ok) AS f \
                   FROM poll_history p JOIN hosts h ON h.host = p.host \
                   WHERE p.polled_at >= now() - INTERVAL 7 DAY GROUP BY ALL) \
             GROUP BY ALL ORDER BY day, grp"
                .to_string(),
        ),
        (
            "version_history_one_host",
            format!("SELECT * FROM version_history WHERE host = '{host}'"),
        ),
        (
            "scan_alerts_latest_100",
            "SELECT * FROM scan_alerts ORDER BY found_at DESC LIMIT 100".to_string(),
        ),
    ]
    .into_iter()
    .map(|(name, sql)| (name.to_string(), sql))
    .collect()
}

/// `pm-lab history`: generates `spec` into a fresh inventory in `home`, checkpoints it, and
/// times the read-only open and [`history_queries`] (median of 5 runs after a warm-up).
pub fn history_benchmark(
    home: &Path,
    spec: &HistorySpec,
    lock_timeout: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<HistoryReport, InventoryError> {
    let inventory = Inventory::open(home, lock_timeout)?;
    // Generation only: more memory than the tools allow makes the big inserts faster.
    inventory.db(inventory.conn.execute_batch("SET memory_limit = '6GB'"))?;
    let generated = inventory.generate_history(spec, progress)?;
    let checkpoint_started = Instant::now();
    inventory.checkpoint()?;
    let checkpoint_seconds = checkpoint_started.elapsed().as_secs_f64();
    progress(&format!("checkpoint in {checkpoint_seconds:.1}s"));
    drop(inventory);

    let size = |name: &str| std::fs::metadata(home.join(name)).map_or(0, |m| m.len());
    let file_bytes = size(INVENTORY_FILE);
    let wal_bytes = size(&format!("{INVENTORY_FILE}.wal"));

    let open = || -> Result<(Inventory, f64), InventoryError> {
        let started = Instant::now();
        let inventory =
            Inventory::open_read_only(home, lock_timeout)?.expect("the inventory was just written");
        Ok((inventory, millis(started.elapsed())))
    };
    let (reader, open_read_only_first_ms) = open()?;
    drop(reader);
    let mut opens = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        opens.push(open()?.1);
    }

    let (reader, _) = open()?;
    let mut queries = Vec::new();
    for (name, sql) in history_queries(spec.hosts) {
        let (rows, _) = reader.time_query(&sql)?;
        let mut runs = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            runs.push(millis(reader.time_query(&sql)?.1));
        }
        let timing = QueryTiming {
            name,
            sql,
            rows,
            median_ms: median(&runs),
            runs_ms: runs,
        };
        progress(&format!(
            "{}: {} rows, median {:.1} ms",
            timing.name, timing.rows, timing.median_ms
        ));
        queries.push(timing);
    }
    Ok(HistoryReport {
        hosts: spec.hosts,
        days: spec.days,
        interval_seconds: spec.interval.as_secs(),
        rows: generated.rows,
        generate_seconds: (generated.seconds * 10.0).round() / 10.0,
        checkpoint_seconds: (checkpoint_seconds * 10.0).round() / 10.0,
        file_bytes,
        wal_bytes,
        total_gib: ((file_bytes + wal_bytes) as f64 / f64::from(1u32 << 30) * 1000.0).round()
            / 1000.0,
        open_read_only_first_ms,
        open_read_only_median_ms: median(&opens),
        queries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(inventory: &Inventory, sql: &str) -> i64 {
        inventory.conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn twenty_hosts_over_two_days_give_consistent_history_and_fleet_status() {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), Duration::from_secs(5)).unwrap();
        let spec = HistorySpec {
            hosts: 20,
            days: 2,
            interval: Duration::from_secs(3600),
            seed: 7,
        };
        let generated = inventory.generate_history(&spec, &mut |_| {}).unwrap();
        let rows = &generated.rows;
        assert_eq!(rows["hosts"], 20);
        assert_eq!(rows["polls"], 20 * 48, "every host every hour for two days");
        assert_eq!(rows["revisions"], 9, "a daily every 6 hours, and r1 before");
        assert_eq!(rows["revision_files"], 27);
        assert_eq!(rows["dist_history"], 9);
        assert_eq!(rows["host_state"], 20);
        assert_eq!(
            rows["installed_components"],
            count(
                &inventory,
                "SELECT count(DISTINCT host) * 4 FROM component_versions"
            )
        );
        assert!(rows["scans"] >= 20, "a scan a day per host: {rows:?}");
        assert!(rows["update_runs"] >= 20, "{rows:?}");
        assert!(
            rows["component_versions"] > rows["update_runs"],
            "initial components plus each change: {rows:?}"
        );
        // Each host's polls count: the same number for all.
        assert_eq!(
            count(
                &inventory,
                "SELECT count(DISTINCT n) FROM (SELECT count(*) AS n FROM polls GROUP BY host_id)"
            ),
            1
        );
        let colours = inventory
            .query_strings("SELECT version_colour FROM fleet_status")
            .unwrap();
        assert_eq!(colours.len(), 20);
        assert!(
            colours
                .iter()
                .all(|c| ["green", "yellow", "red"].contains(&c.as_str())),
            "{colours:?}"
        );
        assert!(colours.iter().any(|c| c == "green"), "{colours:?}");
        // version_history: daily moved on, each row with the version before it.
        let changes = count(
            &inventory,
            "SELECT count(*) FROM version_history
             WHERE component = 'daily' AND previous_version IS NOT NULL
               AND CAST(version AS INTEGER) > CAST(previous_version AS INTEGER)",
        );
        assert!(changes >= 20, "{changes}");
        assert_eq!(
            count(
                &inventory,
                "SELECT count(*) FROM version_history
                 WHERE component = 'daily' AND previous_version IS NOT NULL
                   AND CAST(version AS INTEGER) <= CAST(previous_version AS INTEGER)"
            ),
            0,
            "versions only move forward"
        );
        let queries = history_queries(spec.hosts);
        let (_, one_host) = queries
            .iter()
            .find(|(name, _)| name == "version_history_one_host")
            .unwrap();
        let (n, _) = inventory.time_query(one_host).unwrap();
        assert!(n > 0, "the history of one host");
        // The two forms of the history query give the same answer.
        let answer = |name: &str| {
            let (_, sql) = queries.iter().find(|(n, _)| n == name).unwrap();
            inventory
                .query_strings(&format!(
                    "SELECT concat_ws(' ', day, grp, polls, round(failed_share, 6)) FROM ({sql})"
                ))
                .unwrap()
        };
        let per_row = answer("failed_polls_per_group_per_day_7d");
        assert!(!per_row.is_empty());
        assert_eq!(
            per_row,
            answer("failed_polls_per_group_per_day_7d_by_round")
        );
    }

    #[test]
    fn intervals_parse_with_units() {
        assert_eq!(parse_interval("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_interval("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_interval("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("5d").is_err());
        assert_eq!(bench_host_name(42, 10_000), "bench-00042");
        assert_eq!(bench_host_name(42, 200_000), "bench-000042");
    }
}
