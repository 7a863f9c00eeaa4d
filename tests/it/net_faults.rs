//! Network faults on loopback (a [`FaultProxy`] that delays, drops, resets, cuts or stalls
//! connections) between pm-mirror sync and its upstream, an agent and the dist it installs
//! from, and pm-poll/pm-push and their agents: every run ends within the bound its documented
//! timeouts and retries give, says per product or per host what failed, loses nothing, and the
//! next run without the fault completes. Then five writers and a reader share the inventory.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::faults::assert_consistent;
use crate::support::{
    AgentSetup, ExtraAgent, FaultProxy, Home, Lab, NetFault, Pm, component_version, manifest,
    testdb, write_feed,
};

/// `[http]` of the homes below: each request may take 3 s, and is tried 1 + 2 times.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
const HTTP_RETRIES: u64 = 2;
/// Backoffs: 50 ms, then 100 ms.
const HTTP_BACKOFFS: Duration = Duration::from_millis(150);
/// Process start, TLS, DuckDB: what a run costs beyond its network waits on a busy CI machine.
const SLACK: Duration = Duration::from_secs(4);

/// A home whose ClamAV feed comes through `proxy` (test.cvd 3 synced through it while it
/// passes), and a `files` feed straight from the lab; the lab then offers test.cvd 6.
fn home_behind_proxy() -> (Lab, FaultProxy, Home, tempfile::TempDir) {
    let lab = Lab::start(3);
    let feed = tempfile::tempdir().unwrap();
    write_feed(feed.path(), "v1", 4);
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    let proxy = FaultProxy::start(lab.addr);
    let home = Home::new();
    home.config(&format!(
        "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{}\"\ndatabases = [\"test\"]\n\
         [[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n\
         [http]\ntimeout = \"{}s\"\nretries = {HTTP_RETRIES}\nbackoff = \"50ms\"\n",
        proxy.url("/clamav"),
        lab.url("/vendor/index.json"),
        HTTP_TIMEOUT.as_secs(),
    ));
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    lab.upstream.set_version(6).unwrap();
    (lab, proxy, home, feed)
}

fn product<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["products"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no product {name}: {report}"))
}

/// One sync through `fault`: it fails within `bound` after exactly `attempts` connections,
/// names the failed product and keeps latest; the next sync without the fault completes.
/// Returns how long the faulty run took.
fn sync_through(fault: NetFault, attempts: u64, bound: Duration) -> Duration {
    let (_lab, proxy, home, _feed) = home_behind_proxy();
    let before = manifest(&home, "latest");
    proxy.set(fault);
    let connections = proxy.connections();
    let started = Instant::now();
    let run = Pm::mirror(&home).args(["sync", "--json"]).run();
    let took = started.elapsed();
    let context = format!("{fault:?}: {}\n{}", run.stdout(), run.stderr());
    assert!(took < bound, "{context}: took {took:?}, bound {bound:?}");
    assert_eq!(run.code(), 1, "{context}");
    assert!(!run.stderr().contains("panicked"), "{context}");
    let report = run.json();
    let clamav = product(&report, "clamav");
    assert_eq!(clamav["result"], "failed", "{context}");
    let error = clamav["error"].as_str().unwrap();
    assert!(
        error.contains(&proxy.url("/clamav/test.cvd"))
            && (error.contains("could not be fetched") || error.contains("was truncated")),
        "{context}"
    );
    assert_ne!(product(&report, "vendor")["result"], "failed", "{context}");
    assert_eq!(
        proxy.connections() - connections,
        attempts,
        "{context}: connection attempts"
    );
    assert_eq!(manifest(&home, "latest"), before, "{context}: latest moved");
    assert_eq!(
        std::fs::read(home.repo("latest/clamav/test.cvd")).unwrap(),
        std::fs::read(testdb().join("test-3.cvd")).unwrap()
    );
    assert_consistent(&home, &format!("{fault:?}"));

    proxy.set(NetFault::Pass);
    let healed = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(healed["changed"], true, "{healed}");
    assert_eq!(
        component_version(&manifest(&home, "latest"), "clamav", "test"),
        "6"
    );
    took
}

#[test]
fn a_sync_through_dropped_reset_or_cut_connections_fails_after_its_retries_and_keeps_latest() {
    // Refused at once: the first request (the header read) is tried 1 + retries times, each a
    // new connection, then the product fails; only the backoffs cost time.
    let fast = HTTP_BACKOFFS + SLACK;
    for fault in [
        NetFault::Drop,
        NetFault::Reset,
        // Inside the response headers, and inside the 512-byte header read's body.
        NetFault::CutAfter(100),
        NetFault::CutAfter(400),
    ] {
        sync_through(fault, 1 + HTTP_RETRIES, fast);
    }
}

#[test]
fn a_sync_through_a_stalled_connection_ends_after_its_timeouts_and_keeps_latest() {
    // Each attempt waits for the whole-request timeout: (1 + retries) x timeout + backoffs.
    let attempts = 1 + HTTP_RETRIES;
    let waited = HTTP_TIMEOUT * attempts as u32 + HTTP_BACKOFFS;
    let took = sync_through(NetFault::Stall, attempts, waited + SLACK);
    assert!(took >= waited, "the timeouts ended it: {took:?}");
}

#[test]
fn a_sync_through_a_slow_link_completes_and_one_slower_than_the_timeout_fails_and_keeps_latest() {
    let (_lab, proxy, home, _feed) = home_behind_proxy();
    proxy.set(NetFault::Delay(Duration::from_millis(20)));
    let report = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(
        component_version(&manifest(&home, "latest"), "clamav", "test"),
        "6"
    );
    // Slower than the whole-request timeout: like a stall, 1 + retries attempts.
    let attempts = 1 + HTTP_RETRIES;
    let waited = HTTP_TIMEOUT * attempts as u32 + HTTP_BACKOFFS;
    let took = sync_through(
        NetFault::Delay(HTTP_TIMEOUT + HTTP_TIMEOUT),
        attempts,
        waited + SLACK,
    );
    assert!(took >= waited, "the timeouts ended it: {took:?}");
}

/// An agent whose dist URL goes through a proxy in front of `pm-mirror serve`, installed at
/// test 3; the manager then publishes test 6.
fn agent_behind_proxy() -> (AgentSetup, FaultProxy) {
    let setup = AgentSetup::new();
    let server: SocketAddr = setup.server.base["http://".len()..].parse().unwrap();
    let proxy = FaultProxy::start(server);
    // The activation record names the dist URL; point it at the proxy.
    let record = setup.state().join("manager/manager.json");
    let mut activation: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    activation["dist_url"] = proxy.url("").into();
    std::fs::write(&record, serde_json::to_vec_pretty(&activation).unwrap()).unwrap();
    let first = setup.agent_cmd(&["update"]);
    assert_eq!(first["revision"], manifest(&setup.home, "dist").revision);
    setup.publish(6);
    (setup, proxy)
}

/// What the agent has installed: installed.json and every database file.
fn agent_files(setup: &AgentSetup) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![(
        "installed.json".to_string(),
        std::fs::read(setup.state().join("installed.json")).unwrap(),
    )];
    for entry in std::fs::read_dir(setup.db()).unwrap() {
        let entry = entry.unwrap();
        files.push((
            entry.file_name().to_string_lossy().into_owned(),
            std::fs::read(entry.path()).unwrap(),
        ));
    }
    files.sort();
    files
}

/// The real clamscan loads the agent's database directory.
fn clamscan_loads(db: &Path) {
    let clean = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(clean.path(), "nothing to see").unwrap();
    let output = std::process::Command::new("clamscan")
        .args(["--no-summary", "-d"])
        .args([db, clean.path()])
        .output()
        .expect("clamscan runs: apt-get install clamav");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One `pm-agent update` through `fault`: fails within `bound` after `attempts` connections,
/// with a clear error, the installed set untouched and loadable.
fn agent_update_through(setup: &AgentSetup, proxy: &FaultProxy, fault: NetFault, bound: Duration) {
    let before = agent_files(setup);
    proxy.set(fault);
    let connections = proxy.connections();
    let started = Instant::now();
    let run = Pm::agent(&setup.state()).args(["update", "--json"]).run();
    let took = started.elapsed();
    let context = format!("{fault:?}: {}\n{}", run.stdout(), run.stderr());
    assert!(took < bound, "{context}: took {took:?}, bound {bound:?}");
    assert_eq!(run.code(), 1, "{context}");
    assert!(
        run.stderr().contains("error: cannot fetch") && run.stderr().contains("hint: "),
        "{context}"
    );
    // The agent does not retry: the next update (its schedule's or a push) is the retry.
    assert_eq!(proxy.connections() - connections, 1, "{context}");
    assert_eq!(
        agent_files(setup),
        before,
        "{context}: the installed set changed"
    );
    clamscan_loads(&setup.db());
    setup.agent_cmd(&["status"]);
}

#[test]
fn an_agent_update_through_dropped_reset_or_cut_connections_fails_clearly_and_keeps_its_databases()
{
    let (setup, proxy) = agent_behind_proxy();
    for fault in [
        NetFault::Drop,
        NetFault::Reset,
        NetFault::CutAfter(100),
        NetFault::CutAfter(1000),
    ] {
        agent_update_through(&setup, &proxy, fault, SLACK);
    }
    proxy.set(NetFault::Delay(Duration::from_millis(20)));
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(report["revision"], manifest(&setup.home, "dist").revision);
    clamscan_loads(&setup.db());
}

#[test]
fn an_agent_update_from_a_stalled_dist_gives_up_after_the_stall_timeout_and_keeps_its_databases() {
    let (setup, proxy) = agent_behind_proxy();
    // The manager stops sending: the agent waits STALL_TIMEOUT for a byte (not the 10-minute
    // request timeout), fails, and frees its install lock for the next update.
    let stall = pm::agent::DIST_STALL_TIMEOUT;
    let started = Instant::now();
    agent_update_through(&setup, &proxy, NetFault::Stall, stall + SLACK);
    assert!(started.elapsed() >= stall, "the stall timeout ended it");
    proxy.set(NetFault::Pass);
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["revision"], manifest(&setup.home, "dist").revision);
}

/// Another agent of `setup`'s manager that the manager reaches only through a proxy: it is
/// activated at the proxy's address, so every poll and push to it goes through the proxy.
fn agent_via_proxy(setup: &AgentSetup, host_name: &str) -> (ExtraAgent, FaultProxy) {
    let mut proxy = None;
    let agent = setup.add_agent_reached_at(host_name, &[], |addr| {
        let started = FaultProxy::start(addr);
        let at = started.addr;
        proxy = Some(started);
        at
    });
    (agent, proxy.unwrap())
}

/// `pm-query --json QUERY` rows.
fn query(home: &Home, sql: &str) -> Vec<Value> {
    let run = Pm::new("pm-query")
        .args(["--home"])
        .args([home.path()])
        .args(["--json", sql])
        .run();
    assert_eq!(run.code(), 0, "{sql}: {}", run.stderr());
    let document = run.json();
    document["rows"]
        .as_array()
        .or_else(|| document.as_array())
        .unwrap_or_else(|| panic!("{sql}: {document}"))
        .clone()
}

/// Each host's value of `field` in a report's `hosts`.
fn per_host(report: &Value, field: &str) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h[field].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn poll_and_push_past_faulty_links_finish_in_time_with_the_right_result_per_host() {
    let setup = AgentSetup::new();
    let _good = setup.add_agent("good-2", &[]);
    let (_bad_a, proxy_a) = agent_via_proxy(&setup, "bad-a");
    let (_bad_b, proxy_b) = agent_via_proxy(&setup, "bad-b");
    let poll = |timeout: &str| {
        let started = Instant::now();
        let run = Pm::poll(&setup.home)
            .args(["--timeout", timeout, "--json"])
            .run();
        (run.code(), run.json(), started.elapsed())
    };
    let (code, report, _) = poll("2s");
    assert_eq!(code, 0, "all four answer while the proxies pass: {report}");

    // pm-poll asks each host once, for at most --timeout, all at once: the poll ends within
    // that timeout, with exit 3 (partial) and a failed row for each host behind a fault.
    let timeout = Duration::from_secs(2);
    for (fault_a, fault_b) in [
        (NetFault::Stall, NetFault::Reset),
        (NetFault::Drop, NetFault::CutAfter(100)),
        (NetFault::Delay(timeout + timeout), NetFault::CutAfter(1200)),
    ] {
        proxy_a.set(fault_a);
        proxy_b.set(fault_b);
        let before = (proxy_a.connections(), proxy_b.connections());
        let (code, report, took) = poll("2s");
        let context = format!("{fault_a:?}/{fault_b:?}: {report}");
        assert!(took < timeout + SLACK, "{context}: took {took:?}");
        assert_eq!(code, 3, "{context}");
        assert_eq!(report["summary"]["ok"], 2, "{context}");
        assert_eq!(report["summary"]["unreachable"], 2, "{context}");
        let polled = per_host(&report, "polled");
        assert_eq!(polled[0], ("127.0.0.1".into(), "ok".into()), "{context}");
        assert_eq!(polled[3], ("good-2".into(), "ok".into()), "{context}");
        for (host, result) in &polled[1..3] {
            assert!(host.starts_with("bad-") && result != "ok", "{context}");
        }
        assert_eq!(
            (proxy_a.connections(), proxy_b.connections()),
            (before.0 + 1, before.1 + 1),
            "{context}: pm-poll does not retry within a poll"
        );
        // The inventory has the same per-host answer, with the reason.
        let rows = query(
            &setup.home,
            &format!(
                "SELECT h.host, p.ok, p.error_kind, p.error FROM polls p \
                 JOIN host_ids h ON h.id = p.host_id WHERE p.job_id = {} ORDER BY h.host",
                report["job_id"]
            ),
        );
        assert_eq!(rows.len(), 4, "{context}: {rows:?}");
        for row in &rows {
            let bad = row["host"].as_str().unwrap().starts_with("bad-");
            assert_eq!(row["ok"], !bad, "{context}: {row}");
            assert_eq!(row["error"].is_string(), bad, "{context}: {row}");
        }
    }

    // pm-push: each host is asked to install once (for at most --timeout), then the wave's
    // hosts are polled once (same client timeout): 2 connections to each faulty host.
    setup.publish(6);
    let dist = manifest(&setup.home, "dist").revision;
    proxy_a.set(NetFault::Stall);
    proxy_b.set(NetFault::Reset);
    let before = (proxy_a.connections(), proxy_b.connections());
    let push_timeout = Duration::from_secs(3);
    let push = || {
        let started = Instant::now();
        let run = Pm::push(&setup.home)
            .args([
                "update",
                "--canary",
                "0",
                "--max-failures",
                "2",
                "--timeout",
                "3s",
            ])
            .args(["--json"])
            .run();
        (run.code(), run.json(), started.elapsed())
    };
    let (code, report, took) = push();
    let context = format!("push: {report}");
    assert!(took < push_timeout * 2 + SLACK, "{context}: took {took:?}");
    assert_eq!(code, 3, "{context}");
    assert_eq!(
        per_host(&report, "result"),
        [
            ("127.0.0.1".to_string(), "ok".to_string()),
            ("bad-a".into(), "failed".into()),
            ("bad-b".into(), "failed".into()),
            ("good-2".into(), "ok".into()),
        ],
        "{context}"
    );
    assert_eq!(
        (proxy_a.connections(), proxy_b.connections()),
        (before.0 + 2, before.1 + 2),
        "{context}: one install request and one poll per host"
    );
    let recorded = query(
        &setup.home,
        "SELECT host, result FROM rollout_hosts ORDER BY host",
    );
    assert_eq!(recorded.len(), 4, "{recorded:?}");
    for row in &recorded {
        let bad = row["host"].as_str().unwrap().starts_with("bad-");
        assert_eq!(row["result"], if bad { "failed" } else { "ok" }, "{row}");
    }

    // Without the faults, the same command installs dist on the two and skips the others.
    proxy_a.set(NetFault::Pass);
    proxy_b.set(NetFault::Pass);
    let (code, report, _) = push();
    assert_eq!(code, 0, "{report}");
    let results = per_host(&report, "result");
    assert_eq!(results[1], ("bad-a".into(), "ok".into()), "{report}");
    assert_eq!(results[2], ("bad-b".into(), "ok".into()), "{report}");
    let (code, report, _) = poll("10s");
    assert_eq!(code, 0, "{report}");
    for host in report["hosts"].as_array().unwrap() {
        assert_eq!(host["installed_revision"], dist.as_str(), "{host}");
    }
}

/// How long the writers and the reader run: `PM_CONTENTION_SECONDS`, else 8.
fn contention_seconds() -> u64 {
    std::env::var("PM_CONTENTION_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

/// A run that did not get the inventory: exit 1 and the documented busy error with its hint.
fn assert_busy(run: &crate::support::Run, who: &str) {
    let stderr = run.stderr();
    assert!(
        run.code() == 1
            && stderr.contains("error: inventory `")
            && stderr.contains("is locked by")
            && stderr.contains("hint: ")
            && !stderr.contains("panicked"),
        "{who}: exit {}\n{}\n{stderr}",
        run.code(),
        run.stdout()
    );
}

/// What one writer saw: the ids of the writes it was told succeeded, and its busy failures.
#[derive(Default)]
struct Writes {
    ok: Vec<String>,
    busy: usize,
}

/// Runs `make(n)` with `--json` until `deadline`; `id` takes a success's id from its output.
fn write_until(
    who: &str,
    deadline: Instant,
    make: impl Fn(usize) -> Pm,
    id: impl Fn(&Value) -> String,
) -> Writes {
    let mut writes = Writes::default();
    let mut n = 0;
    while Instant::now() < deadline {
        n += 1;
        let run = make(n).args(["--json"]).run();
        if run.code() == 0 {
            writes.ok.push(id(&run.json()));
        } else {
            assert_busy(&run, who);
            writes.busy += 1;
        }
    }
    writes
}

fn count(home: &Home, sql: &str) -> usize {
    query(home, sql)[0]["n"].as_u64().unwrap() as usize
}

/// A JSON id as text: strings without quotes, numbers as written.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Column `v` of every row.
fn strings(home: &Home, sql: &str) -> std::collections::BTreeSet<String> {
    query(home, sql).iter().map(|row| text(&row["v"])).collect()
}

#[test]
fn five_writers_and_a_reader_share_the_inventory_and_no_acknowledged_write_is_lost() {
    let setup = AgentSetup::new();
    let home = &setup.home;
    let keys_dir = tempfile::tempdir().unwrap();
    let jobs_of = |kind: &str| format!("SELECT count(*) AS n FROM jobs WHERE kind = '{kind}'");
    let (keys_before, profiles_before, syncs_before, polls_before) = (
        count(home, "SELECT count(*) AS n FROM activation_keys"),
        count(home, "SELECT count(*) AS n FROM profiles"),
        count(home, &jobs_of("sync")),
        count(home, "SELECT count(DISTINCT job_id) AS n FROM polls"),
    );
    let seconds = contention_seconds();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    // Two writers wait only 100 ms for the lock (pm-poll 2 s), so that busy failures happen and are
    // checked.
    let key_writer = |tag: &'static str, lock_timeout: &'static str| {
        let dir = keys_dir.path().to_owned();
        move |n: usize| {
            Pm::activate(home)
                .args(["--lock-timeout", lock_timeout, "key", "new", "--out"])
                .args([dir.join(format!("{tag}-{n}.key"))])
        }
    };
    let id = |field: &'static str| move |v: &Value| text(&v[field]);
    let (keys_a, keys_b, profiles, syncs, polls, reads) = std::thread::scope(|s| {
        let keys_a = s.spawn(|| write_until("key new", deadline, key_writer("a", "30s"), id("id")));
        let keys_b =
            s.spawn(|| write_until("key new", deadline, key_writer("b", "100ms"), id("id")));
        let profiles = s.spawn(|| {
            write_until(
                "profile new",
                deadline,
                |n| {
                    Pm::activate(home)
                        .args(["--lock-timeout", "100ms", "profile", "new"])
                        .args([format!("p{n}"), "--set".into(), "scan_archive=no".into()])
                },
                |v| text(&v["profile"]["name"]),
            )
        });
        let syncs = s.spawn(|| {
            write_until(
                "sync",
                deadline,
                |_| Pm::mirror(home).args(["sync"]),
                |_| String::new(),
            )
        });
        let polls = s.spawn(|| {
            write_until(
                "poll",
                deadline,
                |_| Pm::poll(home).args(["--lock-timeout", "2s"]),
                id("job_id"),
            )
        });
        let reads = s.spawn(|| {
            let (mut ok, mut busy) = (0, 0);
            while Instant::now() < deadline {
                let run = Pm::new("pm-query")
                    .args(["--home"])
                    .args([home.path()])
                    .args(["--lock-timeout", "1s", "--json"])
                    .args(["SELECT count(*) AS n FROM jobs"])
                    .run();
                if run.code() == 0 {
                    run.json();
                    ok += 1;
                } else {
                    assert_busy(&run, "pm-query");
                    busy += 1;
                }
            }
            (ok, busy)
        });
        (
            keys_a.join().unwrap(),
            keys_b.join().unwrap(),
            profiles.join().unwrap(),
            syncs.join().unwrap(),
            polls.join().unwrap(),
            reads.join().unwrap(),
        )
    });
    let elapsed = started.elapsed().as_secs_f64();

    // Every acknowledged write is there, and no refused one left a row.
    let keys = strings(home, "SELECT id AS v FROM activation_keys");
    for key in keys_a.ok.iter().chain(&keys_b.ok) {
        assert!(keys.contains(key), "key {key} acknowledged but lost");
    }
    assert_eq!(keys.len(), keys_before + keys_a.ok.len() + keys_b.ok.len());
    let names = strings(home, "SELECT name AS v FROM profiles");
    for name in &profiles.ok {
        assert!(names.contains(name), "profile {name} acknowledged but lost");
    }
    assert_eq!(names.len(), profiles_before + profiles.ok.len());
    assert_eq!(
        count(home, &jobs_of("sync")),
        syncs_before + syncs.ok.len(),
        "one sync job per acknowledged sync"
    );
    let poll_jobs = strings(home, "SELECT DISTINCT job_id AS v FROM polls");
    for job in &polls.ok {
        assert!(poll_jobs.contains(job), "poll {job} acknowledged but lost");
    }
    assert_eq!(poll_jobs.len(), polls_before + polls.ok.len());
    assert_consistent(home, "after the contention run");

    let writers = [&keys_a, &keys_b, &profiles, &syncs, &polls];
    let written: usize = writers.iter().map(|w| w.ok.len()).sum();
    let busy: usize = writers.iter().map(|w| w.busy).sum();
    eprintln!(
        "contention {elapsed:.1} s: {written} writes ({:.1}/s; keys {}+{}, profiles {}, syncs {}, \
         polls {}), {busy} busy refusals (keys {}+{}, profiles {}, syncs {}, polls {}), \
         reader {} queries ({:.1}/s), {} busy",
        written as f64 / elapsed,
        keys_a.ok.len(),
        keys_b.ok.len(),
        profiles.ok.len(),
        syncs.ok.len(),
        polls.ok.len(),
        keys_a.busy,
        keys_b.busy,
        profiles.busy,
        syncs.busy,
        polls.busy,
        reads.0,
        reads.0 as f64 / elapsed,
        reads.1,
    );
    assert!(
        writers.iter().all(|w| !w.ok.is_empty()) && reads.0 > 0,
        "every writer and the reader got through at least once"
    );
}
