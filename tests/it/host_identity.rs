//! Host identity on day 2 (issue 16): names and renames, new addresses, re-activation after a
//! wipe, agent certificates that age (a year on with libfaketime), clocks that disagree, and
//! `--targets` at scale. Real `pm-agent` processes on their own loopback addresses, the real
//! `pm-activate`, `pm-poll`, `pm-doctor` and `pm-exporter`, real TLS and a real inventory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::poll::host;
use crate::support::{AgentSetup, EICAR, Home, Pm, Run, bin, free_port, runtime, sql};

/// A dist URL for managers that never serve one (activation only stores it on the agent).
const NO_DIST: &str = "http://127.0.0.1:9";

/// A real `pm-agent` with its own state directory, listening on `addr`.
struct Agent {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    key_file: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// `pm-agent init` as `name` on `ip` (a free port) with a fresh key from `home`, then run.
    fn start(home: &Home, name: &str, ip: &str) -> Agent {
        Agent::start_at(home, name, format!("{ip}:{}", free_port()).parse().unwrap())
    }

    /// `pm-agent init` as `name` listening on `addr`, with a fresh key from `home`, then run.
    fn start_at(home: &Home, name: &str, addr: SocketAddr) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("activation.key");
        Pm::activate(home)
            .args(["key", "new", "--out"])
            .args([&key_file])
            .json();
        let mut agent = Agent {
            dir,
            addr,
            key_file,
            child: None,
        };
        agent.init(name);
        agent.run(None);
        agent
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn init(&self, name: &str) {
        Pm::agent(&self.state())
            .args([
                "init",
                "--listen",
                &self.addr.to_string(),
                "--engine",
                "clamav",
            ])
            .args(["--host-name", name, "--database-dir"])
            .args([self.dir.path().join("db")])
            .args(["--activation-key-file"])
            .args([&self.key_file])
            .json();
    }

    /// `pm-agent run`, its clock at OFFSET when given (libfaketime preloaded into pm-agent
    /// itself, not the `faketime` wrapper, whose child would outlive a stop), until it answers
    /// TLS.
    fn run(&mut self, faketime: Option<&str>) {
        self.stop();
        let mut command = Command::new(bin("pm-agent"));
        if let Some(offset) = faketime {
            command
                .env("LD_PRELOAD", crate::agent_day2::LIBFAKETIME)
                .env("FAKETIME", offset)
                // Only the wall clock moves: tokio's timers keep the real monotonic clock.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        command
            .arg("--state")
            .arg(self.state())
            .arg("run")
            .env_remove("PM_AGENT_STATE")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("agent.log")).unwrap());
        let mut child = command
            .spawn()
            .expect("faketime and pm-agent run (apt-get install faketime)");
        let deadline = Instant::now() + Duration::from_secs(15);
        let runtime = runtime();
        while runtime
            .block_on(pm::tls::fetch_server_certificate(
                self.addr,
                Duration::from_millis(500),
            ))
            .is_err()
        {
            assert!(
                child.try_wait().unwrap().is_none(),
                "pm-agent run exited: {}",
                self.log()
            );
            assert!(Instant::now() < deadline, "pm-agent run does not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Moves the agent to `ip` (same port): `listen` in agent.toml, then a restart.
    fn readdress(&mut self, ip: &str) {
        self.move_to(format!("{ip}:{}", self.addr.port()).parse().unwrap());
    }

    /// Moves the agent to `addr`: `listen` in agent.toml, then a restart.
    fn move_to(&mut self, addr: SocketAddr) {
        self.stop();
        self.listen_at(addr);
        self.run(None);
    }

    /// Rewrites `listen` in agent.toml (the agent stopped; it listens there once run).
    fn listen_at(&mut self, addr: SocketAddr) {
        let path = self.state().join("agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let old = self.addr.to_string();
        self.addr = addr;
        std::fs::write(&path, text.replace(&old, &self.addr.to_string())).unwrap();
    }

    /// The host's state directory is wiped and the agent set up again as `name` with a new
    /// key, then run.
    fn wipe_and_init(&mut self, home: &Home, name: &str) {
        self.stop();
        std::fs::remove_dir_all(self.state()).unwrap();
        let key_file = self.dir.path().join("second.key");
        Pm::activate(home)
            .args(["key", "new", "--out"])
            .args([&key_file])
            .json();
        self.key_file = key_file;
        self.init(name);
        self.run(None);
    }

    /// The certificate the agent presents now.
    fn certificate(&self) -> openssl::x509::X509 {
        runtime()
            .block_on(pm::tls::fetch_server_certificate(
                self.addr,
                Duration::from_secs(5),
            ))
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `pm-activate host ADDR --key-file KEY --dist-url ... FLAGS`, expecting success.
fn activate(home: &Home, agent: &Agent, flags: &[&str]) -> Value {
    let run = Pm::activate(home)
        .args(["--json", "host", &agent.addr.to_string(), "--key-file"])
        .args([&agent.key_file])
        .args(["--dist-url", NO_DIST])
        .args(flags)
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    run.json()
}

/// `pm-activate host ADDR FLAGS` again, without a key: an agent this manager activated.
fn reapply(home: &Home, address: &str, flags: &[&str]) -> Run {
    Pm::activate(home).args(["host", address]).args(flags).run()
}

fn poll(home: &Home, flags: &[&str]) -> (i32, Value, String) {
    let run = Pm::poll(home).args(["--json"]).args(flags).run();
    (run.code(), run.json(), run.stderr())
}

/// `TOOL --home HOME --json ARGS` under libfaketime at OFFSET: a manager whose clock is on.
pub(crate) fn at(offset: &str, tool: &str, home: &Home, args: &[&str]) -> Run {
    // libfaketime preloaded, not the `faketime` wrapper: the wrapper keeps a semaphore in
    // /dev/shm named by its pid, and one a killed run left behind fails a later run whose pid
    // matches ("sem_open: File exists").
    let mut command = Command::new(bin(tool));
    command
        .args(["--home"])
        .arg(home.path())
        .args(["--json"])
        .args(args)
        .env("LD_PRELOAD", crate::agent_day2::LIBFAKETIME)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    Pm::wrap(command).run()
}

/// `pm-poll --json FLAGS` at `OFFSET`.
fn poll_at(home: &Home, offset: &str, flags: &[&str]) -> Run {
    at(offset, "pm-poll", home, flags)
}

/// Every row of the tables that describe hosts, as text, to prove that nothing changed.
fn host_tables(home: &Home) -> Vec<String> {
    [
        "SELECT * FROM hosts ORDER BY host",
        "SELECT * FROM revoked_certificates ORDER BY serial",
        "SELECT * FROM host_ids ORDER BY id",
    ]
    .iter()
    .flat_map(|query| sql(home, query))
    .collect()
}

fn common_name(cert: &openssl::x509::X509) -> String {
    cert.subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .unwrap()
        .data()
        .to_string()
        .unwrap()
}

fn serial(cert: &openssl::x509::X509) -> String {
    pm::pki::ca::serial_hex(cert).unwrap()
}

#[test]
fn a_rename_onto_an_active_host_is_refused_and_changes_nothing() {
    let home = Home::new();
    let a21 = Agent::start(&home, "a21", "127.0.0.21");
    let a22 = Agent::start(&home, "a22", "127.0.0.22");
    activate(&home, &a21, &["--group", "web", "--label", "site=paris"]);
    activate(&home, &a22, &[]);
    let before = host_tables(&home);

    let run = reapply(&home, &a22.addr.to_string(), &["--name", "a21"]);
    assert_eq!(run.code(), 2, "{}\n{}", run.stdout(), run.stderr());
    let stderr = run.stderr();
    assert!(
        stderr.contains("error: ") && stderr.contains("`a21`"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: "), "{stderr}");
    assert_eq!(
        host_tables(&home),
        before,
        "the refused rename changed the inventory"
    );
    assert_eq!(common_name(&a22.certificate()), "a22");

    // Both hosts are still managed: each answers the poll under its own name.
    let (code, report, stderr) = poll(&home, &["--all"]);
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(host(&report, "a21")["address"], a21.addr.to_string());
    assert_eq!(host(&report, "a21")["grp"], "web");
    assert_eq!(host(&report, "a22")["address"], a22.addr.to_string());
}

#[test]
fn names_that_break_the_rule_are_refused_on_every_path_and_change_nothing() {
    let home = Home::new();
    let active = Agent::start(&home, "a23", "127.0.0.23");
    activate(&home, &active, &[]);
    let fresh = Agent::start(&home, "a24", "127.0.0.24");
    let before = host_tables(&home);
    let keys_before = sql(&home, "SELECT id, uses FROM activation_keys ORDER BY id");
    let long = "a".repeat(65);
    for name in [
        "",
        "a b",
        "x' OR '1'='1",
        "../../etc",
        long.as_str(),
        "new\nline",
        "quo\"te",
        "..",
    ] {
        let refused = |run: Run| {
            let stderr = run.stderr();
            assert_eq!(run.code(), 2, "{name:?}: {}\n{stderr}", run.stdout());
            assert!(
                stderr.contains("error: ") && stderr.contains("hint: "),
                "{name:?}: {stderr}"
            );
        };
        // Re-applied to an activated host.
        refused(reapply(&home, &active.addr.to_string(), &["--name", name]));
    }
    // A new activation: refused before the key is used (the same rule, so two names do).
    for name in ["a b", "../../etc"] {
        let run = Pm::activate(&home)
            .args(["host", &fresh.addr.to_string(), "--key-file"])
            .args([&fresh.key_file])
            .args(["--dist-url", NO_DIST, "--name", name])
            .run();
        assert_eq!(run.code(), 2, "{name:?}: {}", run.stderr());
    }
    assert_eq!(host_tables(&home), before);
    assert_eq!(
        sql(&home, "SELECT id, uses FROM activation_keys ORDER BY id"),
        keys_before,
        "a refused name took a key use"
    );
    assert_eq!(common_name(&active.certificate()), "a23");
}

#[test]
fn a_rename_keeps_the_hosts_history_under_its_new_name_and_leaves_no_orphan() {
    let setup = AgentSetup::new();
    // History of every kind: an install (versions, install run), a rollout (job results), a
    // scan with a finding, polls and the current state.
    let run = Pm::push(&setup.home)
        .args(["update", "--all", "--json"])
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let files = setup.tmp.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("eicar.com"), EICAR).unwrap();
    setup.agent_cmd(&["scan", files.to_str().unwrap()]);
    let (code, _, stderr) = poll(&setup.home, &[]);
    assert_eq!(code, 0, "{stderr}");
    let tables = [
        "host_ids",
        "component_versions",
        "scans",
        "scan_findings",
        "update_runs",
        "host_state",
        "installed_components",
        "job_results",
    ];
    // Per table: rows under the old name, rows under the new one (one CLI run).
    let counts = || {
        let query = tables
            .iter()
            .map(|t| {
                format!(
                    "SELECT '{t}', count(*) FILTER (WHERE host = '127.0.0.1'), \
                     count(*) FILTER (WHERE host = 'scanner-1') FROM {t}"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let mut rows = sql(&setup.home, &query);
        rows.sort();
        rows
    };
    let before = counts();
    for row in &before {
        assert!(
            !row.contains(",0,"),
            "the test needs history in every table: {row}"
        );
    }
    let old_serial = sql(&setup.home, "SELECT certificate_serial FROM hosts")[0].clone();

    let run = reapply(
        &setup.home,
        &setup.addr.to_string(),
        &["--name", "scanner-1"],
    );
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());

    // Every row moved to the new name, none left under the old one.
    let moved: Vec<String> = before
        .iter()
        .map(|row| {
            let (table, rest) = row.split_once(',').unwrap();
            let (old, _) = rest.split_once(',').unwrap();
            format!("{table},0,{old}")
        })
        .collect();
    assert_eq!(counts(), moved);
    assert_eq!(
        sql(&setup.home, "SELECT host, state FROM hosts"),
        ["scanner-1,active"],
        "one row, no orphan"
    );
    let history = sql(
        &setup.home,
        "SELECT count(*) FROM version_history WHERE host = 'scanner-1' AND grp IS NOT NULL",
    );
    assert_ne!(history, ["0"]);
    // The agent now carries the new name, and its old certificate is retired.
    let cert = runtime()
        .block_on(pm::tls::fetch_server_certificate(
            setup.addr,
            Duration::from_secs(5),
        ))
        .unwrap();
    assert_eq!(common_name(&cert), "scanner-1");
    assert_eq!(
        sql(
            &setup.home,
            &format!("SELECT host FROM revoked_certificates WHERE serial = '{old_serial}'"),
        ),
        ["scanner-1"]
    );
    let (code, report, stderr) = poll(&setup.home, &["--host", "scanner-1"]);
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(host(&report, "scanner-1")["polled"], "ok");
}

#[test]
fn a_readdressed_agent_gets_a_certificate_for_its_new_address_and_answers_polls_there() {
    let home = Home::new();
    let mut agent = Agent::start(&home, "a41", "127.0.0.41");
    activate(&home, &agent, &["--group", "db"]);
    let old_serial = serial(&agent.certificate());
    agent.readdress("127.0.0.42");

    let run = Pm::activate(&home)
        .args(["--json", "host", &agent.addr.to_string()])
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let report = run.json();
    assert_eq!(report["address"], agent.addr.to_string());
    assert_eq!(report["host"], "a41");
    assert_eq!(report["group"], "db");
    let certificate = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "certificate")
        .unwrap_or_else(|| panic!("no certificate step: {report}"));
    assert_eq!(certificate["ok"], true, "{report}");
    let new_serial = serial(&agent.certificate());
    assert_ne!(new_serial, old_serial);
    assert_eq!(report["certificate_serial"], new_serial);

    // What the timer's poll does next: it must reach the host at its new address.
    let (code, report, stderr) = poll(&home, &["--all"]);
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(host(&report, "a41")["polled"], "ok");
    assert_eq!(
        sql(
            &home,
            &format!("SELECT reason FROM revoked_certificates WHERE serial = '{old_serial}'"),
        ),
        ["re-issued for a new address"]
    );
}

#[test]
fn reactivating_a_wiped_agent_keeps_its_group_profile_and_labels() {
    let home = Home::new();
    let mut agent = Agent::start(&home, "a51", "127.0.0.51");
    activate(
        &home,
        &agent,
        &[
            "--group",
            "web",
            "--label",
            "site=paris",
            "--label",
            "rack=4",
        ],
    );
    agent.wipe_and_init(&home, "a51");

    let run = Pm::activate(&home)
        .args(["host", &agent.addr.to_string(), "--key-file"])
        .args([&agent.key_file])
        .args(["--dist-url", NO_DIST])
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert!(
        run.stdout().contains("kept from its earlier activation"),
        "the output says what was kept: {}",
        run.stdout()
    );
    assert_eq!(
        sql(
            &home,
            "SELECT host_group, labels FROM hosts WHERE host = 'a51'"
        ),
        ["web,\"{\"\"rack\"\":\"\"4\"\",\"\"site\"\":\"\"paris\"\"}\""]
    );
    // A flag still wins over what was kept.
    let run = reapply(&home, &agent.addr.to_string(), &["--group", "db"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert_eq!(
        sql(&home, "SELECT host_group FROM hosts WHERE host = 'a51'"),
        ["db"]
    );
}

#[test]
fn activation_errors_say_what_happened() {
    let home = Home::new();
    let agent = Agent::start(&home, "a61", "127.0.0.61");
    // A key whose id this manager knows, with a secret that is not the key's.
    let text = std::fs::read_to_string(&agent.key_file).unwrap();
    let (prefix, secret) = text.trim().rsplit_once('.').unwrap();
    let flipped = if secret.starts_with('A') { 'B' } else { 'A' };
    let forged = agent.dir.path().join("forged.key");
    crate::support::write_private(&forged, &format!("{prefix}.{flipped}{}\n", &secret[1..]));
    let run = Pm::activate(&home)
        .args(["host", &agent.addr.to_string(), "--key-file"])
        .args([&forged])
        .args(["--dist-url", NO_DIST])
        .run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    let stderr = run.stderr();
    assert!(!stderr.contains("is not known"), "{stderr}");
    assert!(stderr.contains("secret does not match"), "{stderr}");

    // Activated by another manager: one clear sentence.
    activate(&home, &agent, &[]);
    let other = Home::new();
    let run = Pm::activate(&other)
        .args(["host", &agent.addr.to_string(), "--key-file"])
        .args([&agent.key_file])
        .args(["--dist-url", NO_DIST])
        .run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    let stderr = run.stderr();
    assert!(stderr.contains("another manager"), "{stderr}");
    assert!(!stderr.contains("  "), "a run of spaces: {stderr:?}");
}

#[test]
fn a_polled_fleet_renews_its_certificates_and_still_answers_a_year_on() {
    let home = Home::new();
    let mut agents = vec![
        Agent::start(&home, "a71", "127.0.0.71"),
        Agent::start(&home, "a72", "127.0.0.72"),
    ];
    for agent in &agents {
        activate(&home, agent, &[]);
    }
    let first: Vec<String> = agents.iter().map(|a| serial(&a.certificate())).collect();
    let expires = sql(
        &home,
        "SELECT DISTINCT round((epoch(certificate_expires_at) - epoch(now())) / 86400) FROM hosts",
    );
    assert_eq!(
        expires,
        ["365.0"],
        "the inventory keeps each host's certificate expiry"
    );

    // 300 days on (the manager and the hosts keep one time): the poll renews both.
    for agent in &mut agents {
        agent.run(Some("+300d"));
    }
    let run = poll_at(&home, "+300d", &["--all"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let report = run.json();
    assert_eq!(report["summary"]["certificates_renewed"], 2, "{report}");
    let renewed: Vec<String> = agents.iter().map(|a| serial(&a.certificate())).collect();
    for (old, new) in first.iter().zip(&renewed) {
        assert_ne!(old, new);
        assert_eq!(
            sql(
                &home,
                &format!("SELECT reason FROM revoked_certificates WHERE serial = '{old}'")
            ),
            ["renewed"]
        );
    }
    let serials = sql(&home, "SELECT certificate_serial FROM hosts ORDER BY host");
    assert_eq!(serials, renewed);

    // A year and more after activation: the original certificates would have expired.
    for agent in &mut agents {
        agent.run(Some("+400d"));
    }
    let run = poll_at(&home, "+400d", &["--all"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let report = run.json();
    assert_eq!(report["summary"]["ok"], 2, "{report}");
    assert_eq!(report["summary"]["certificates_renewed"], 0, "{report}");

    // A renewed agent still forgets its manager cleanly and falls back to a self-signed
    // certificate for its new key.
    let run = at("+400d", "pm-activate", &home, &["deactivate", "a71"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let fallback = agents[0].certificate();
    assert!(fallback.verify(&fallback.public_key().unwrap()).unwrap());
    let status = Pm::agent(&agents[0].state()).args(["status"]).json();
    assert_eq!(status["activated"], false, "{status}");
}

#[test]
fn an_expired_certificate_is_named_as_such_and_pm_activate_renews_it() {
    let home = Home::new();
    let mut agent = Agent::start(&home, "a81", "127.0.0.81");
    activate(&home, &agent, &[]);
    // Nobody polled for a year: the certificate expired.
    agent.run(Some("+366d"));
    let run = poll_at(&home, "+366d", &["--all"]);
    assert_eq!(run.code(), 1, "{}\n{}", run.stdout(), run.stderr());
    let report = run.json();
    let line = host(&report, "a81");
    let error = line["error"].as_str().unwrap();
    assert!(error.contains("expired"), "{error}");
    assert!(!error.contains("  "), "runs of spaces: {error}");
    assert!(!error.contains("not activated"), "{error}");
    assert!(
        error.contains("pm-activate host"),
        "says what to do: {error}"
    );

    let run = at(
        "+366d",
        "pm-activate",
        &home,
        &["host", &agent.addr.to_string()],
    );
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let run = poll_at(&home, "+366d", &["--all"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
}

#[test]
fn certificate_expiry_is_exported_and_pm_doctor_warns_when_renewal_is_overdue() {
    let home = Home::new();
    let agent = Agent::start(&home, "a91", "127.0.0.91");
    activate(&home, &agent, &["--group", "web"]);
    let expiry: f64 = sql(&home, "SELECT epoch(certificate_expires_at) FROM hosts")[0]
        .parse()
        .unwrap();
    let cert = agent.certificate();
    let epoch = openssl::asn1::Asn1Time::from_unix(0).unwrap();
    let diff = epoch.diff(cert.not_after()).unwrap();
    assert_eq!(
        expiry as i64,
        i64::from(diff.days) * 86_400 + i64::from(diff.secs)
    );

    let exporter = crate::support::Server::spawn(
        Pm::new("pm-exporter")
            .args(["--listen", "127.0.0.1:0", "--refresh", "1s"])
            .env("PM_HOME", home.path().to_str().unwrap()),
    );
    let metrics = {
        let url = format!("{}/metrics", exporter.base);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let output = Command::new("curl").args(["-sf", &url]).output().unwrap();
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            if text.contains("pm_host_up") || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let expected = format!(
        "pm_host_certificate_expiry_timestamp_seconds{{host=\"a91\",group=\"web\"}} {}",
        expiry as i64
    );
    assert!(
        metrics.lines().any(|l| l.starts_with(&expected)),
        "{expected} in:\n{metrics}"
    );

    let doctor = |offset: &str| {
        let report = at(offset, "pm-doctor", &home, &[]).json();
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "certificates")
            .cloned()
            .unwrap_or_else(|| panic!("no certificates check: {report}"))
    };
    assert_eq!(doctor("+0d")["result"], "ok");
    let overdue = doctor("+300d");
    assert_eq!(overdue["result"], "warn", "{overdue}");
    assert!(
        overdue["message"].as_str().unwrap().contains("a91"),
        "{overdue}"
    );
    assert!(
        overdue["hint"].as_str().unwrap().contains("pm-poll"),
        "{overdue}"
    );
    for field in ["message", "hint"] {
        let text = overdue[field].as_str().unwrap();
        assert!(
            !text.contains("  "),
            "runs of spaces in the {field}: {text}"
        );
    }
}

#[test]
fn an_agent_two_days_behind_is_refused_activation_naming_the_clocks() {
    let home = Home::new();
    let mut agent = Agent::start(&home, "a95", "127.0.0.95");
    agent.run(Some("-2d"));
    let keys_before = sql(&home, "SELECT id, uses FROM activation_keys");
    let run = Pm::activate(&home)
        .args(["host", &agent.addr.to_string(), "--key-file"])
        .args([&agent.key_file])
        .args(["--dist-url", NO_DIST])
        .run();
    assert_eq!(run.code(), 1, "{}\n{}", run.stdout(), run.stderr());
    let stderr = run.stderr();
    assert!(stderr.contains("clock"), "{stderr}");
    assert!(stderr.contains("2 days behind"), "{stderr}");
    assert!(stderr.contains("hint: "), "{stderr}");
    assert_eq!(
        sql(&home, "SELECT id, uses FROM activation_keys"),
        keys_before,
        "no key use taken"
    );
    assert!(sql(&home, "SELECT host FROM hosts").is_empty());
}

#[test]
fn a_poll_of_an_agent_whose_clock_fell_behind_names_the_clock() {
    let home = Home::new();
    let mut agent = Agent::start(&home, "a96", "127.0.0.96");
    activate(&home, &agent, &[]);
    // The host's clock steps two days back (a dead RTC battery, a bad NTP source).
    agent.run(Some("-2d"));
    let (code, report, stderr) = poll(&home, &["--all"]);
    assert_eq!(code, 1, "{report}\n{stderr}");
    let line = host(&report, "a96");
    assert_eq!(line["error_kind"], "clock", "{line}");
    let error = line["error"].as_str().unwrap();
    assert!(error.contains("2 days behind"), "{error}");
    assert!(!error.contains("not activated"), "{error}");
}

#[test]
fn bulk_activation_of_unreachable_targets_costs_little_cpu_per_target() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("activation.key");
    Pm::activate(&home)
        .args(["key", "new", "--reusable", "--out"])
        .args([&key_file])
        .json();
    // 400 addresses where nothing listens (a closed range of loopback).
    let port = free_port();
    let targets: String = (0..400)
        .map(|i| format!("127.9.{}.{}:{port}\n", i / 200, 1 + i % 200))
        .collect();
    let file = tmp.path().join("targets.txt");
    std::fs::write(&file, targets).unwrap();
    let times = tmp.path().join("times");
    let output = Command::new("/usr/bin/time")
        .args(["-f", "%U %S", "-o"])
        .arg(&times)
        .arg(bin("pm-activate"))
        .arg("--home")
        .arg(home.path())
        .args(["--json", "host", "--targets"])
        .arg(&file)
        .arg("--key-file")
        .arg(&key_file)
        .args(["--dist-url", NO_DIST])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["summary"]["failed"], 400, "{report}");
    let text = std::fs::read_to_string(&times).unwrap();
    let cpu: f64 = text
        .split_whitespace()
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    // Under 1 ms each in a release build; a debug build gets 5 ms (2 s in all).
    assert!(cpu < 2.0, "{cpu} s of CPU for 400 unreachable targets");
}

/// The hold `pm-agent status` shows for the agent in `state` (`null` when none).
fn agent_hold(state: &std::path::Path) -> Value {
    Pm::agent(state).args(["status"]).json()["hold"].clone()
}

#[test]
fn an_agent_moved_onto_another_active_hosts_address_is_refused_and_that_host_never_polls_green() {
    let home = Home::new();
    let mut a61 = Agent::start(&home, "a61", "127.0.77.61");
    let mut a62 = Agent::start(&home, "a62", "127.0.77.62");
    activate(&home, &a61, &[]);
    activate(&home, &a62, &[]);
    let serial_61 = serial(&a61.certificate());
    // a62's agent is down; a61's agent is moved onto a62's address by hand.
    a62.stop();
    a61.move_to(a62.addr);
    let before = host_tables(&home);

    let run = reapply(&home, &a62.addr.to_string(), &[]);
    assert_eq!(run.code(), 2, "{}\n{}", run.stdout(), run.stderr());
    let stderr = run.stderr();
    assert!(
        stderr.contains("error: ") && stderr.contains("`a62`") && stderr.contains("`a61`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: ") && stderr.contains("pm-activate deactivate a62"),
        "{stderr}"
    );
    assert!(!stderr.contains("  "), "runs of spaces: {stderr}");
    assert_eq!(
        host_tables(&home),
        before,
        "the refused move changed the inventory"
    );
    assert_eq!(
        serial(&a61.certificate()),
        serial_61,
        "the agent got a new certificate"
    );

    // The poll timer meets a61's agent at a62's address: a62 is not reachable-green, and
    // nothing is renewed.
    let (code, report, stderr) = poll(&home, &["--all"]);
    assert_ne!(code, 0, "{report}\n{stderr}");
    let a62_line = host(&report, "a62");
    assert_eq!(a62_line["polled"], "wrong_host", "{report}");
    assert_eq!(a62_line["reachable"], false, "{report}");
    assert_ne!(host(&report, "a61")["polled"], "ok", "{report}");
    assert_eq!(report["summary"]["certificates_renewed"], 0, "{report}");
    assert_eq!(serial(&a61.certificate()), serial_61);
    let error = sql(
        &home,
        "SELECT error FROM poll_history WHERE host = 'a62' ORDER BY polled_at DESC LIMIT 1",
    );
    assert!(
        error[0].contains("`a61`") && error[0].contains("`a62`"),
        "the failure names both hosts: {error:?}"
    );

    // A hold meant for a62 never lands on a61's agent.
    let run = Pm::push(&home)
        .args([
            "--json",
            "hold",
            "--host",
            "a62",
            "--reason",
            "a62 is being repaired",
        ])
        .run();
    assert_ne!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert_eq!(agent_hold(&a61.state()), Value::Null);

    // Nor is a new host activated there while a62 holds the address.
    a61.stop();
    let a63 = Agent::start_at(&home, "a63", a62.addr);
    let keys_before = sql(&home, "SELECT id, uses FROM activation_keys ORDER BY id");
    let run = Pm::activate(&home)
        .args(["host", &a63.addr.to_string(), "--key-file"])
        .args([&a63.key_file])
        .args(["--dist-url", NO_DIST, "--name", "a63"])
        .run();
    assert_eq!(run.code(), 2, "{}\n{}", run.stdout(), run.stderr());
    assert!(run.stderr().contains("`a62`"), "{}", run.stderr());
    assert_eq!(
        sql(&home, "SELECT id, uses FROM activation_keys ORDER BY id"),
        keys_before,
        "the refused activation took a key use"
    );
}

#[test]
fn agents_that_swap_addresses_are_polled_as_the_wrong_host_never_renewed_nor_told_anything() {
    // Two agents on one machine (one IP, two ports) whose configurations were swapped by hand:
    // each presents a certificate naming the address the other host is recorded at.
    let home = Home::new();
    let ip = "127.0.77.64";
    let mut a64 = Agent::start(&home, "a64", ip);
    let mut a65 = Agent::start(&home, "a65", ip);
    activate(&home, &a64, &[]);
    activate(&home, &a65, &[]);
    let (addr_64, addr_65) = (a64.addr, a65.addr);
    let (serial_64, serial_65) = (serial(&a64.certificate()), serial(&a65.certificate()));
    a64.stop();
    a65.stop();
    a64.listen_at(addr_65);
    a65.listen_at(addr_64);
    a64.run(None);
    a65.run(None);

    let (code, report, stderr) = poll(&home, &["--all"]);
    assert_ne!(code, 0, "{report}\n{stderr}");
    for name in ["a64", "a65"] {
        let line = host(&report, name);
        assert_eq!(line["polled"], "wrong_host", "{name}: {report}");
        assert_eq!(line["reachable"], false, "{name}: {report}");
    }
    assert_eq!(report["summary"]["certificates_renewed"], 0, "{report}");
    assert_eq!(
        serial(&a64.certificate()),
        serial_64,
        "a64's agent was re-issued"
    );
    assert_eq!(
        serial(&a65.certificate()),
        serial_65,
        "a65's agent was re-issued"
    );
    assert_eq!(common_name(&a64.certificate()), "a64");

    // A hold for a64 goes to its address, where a65's agent answers: refused before it is sent.
    let run = Pm::push(&home)
        .args(["--json", "hold", "--host", "a64", "--reason", "window"])
        .run();
    assert_ne!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert!(
        run.stdout().contains("a65"),
        "the failure names the agent met: {}",
        run.stdout()
    );
    assert_eq!(
        agent_hold(&a65.state()),
        Value::Null,
        "a65's agent took a64's hold"
    );
    assert_eq!(agent_hold(&a64.state()), Value::Null);
}

#[test]
fn a_rename_while_a_rollout_runs_is_refused_and_renaming_there_and_back_leaves_one_host() {
    let fleet = crate::push::Fleet::start(3);
    let home = &fleet.setup.home;
    fleet.setup.publish(6);
    let address = sql(home, "SELECT address FROM hosts WHERE host = 'lab-002'").remove(0);
    let mut child = Pm::push(home)
        .args([
            "update",
            "--group",
            "lab",
            "--wave-size",
            "1",
            "--pause",
            "3s",
            "--json",
        ])
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    fleet.wait_for_canary();
    // The rollout goes on writing its waves meanwhile: compare the hosts only.
    let hosts = || sql(home, "SELECT * FROM hosts ORDER BY host");
    let before = hosts();
    let run = reapply(home, &address, &["--name", "app-2"]);
    let stderr = run.stderr();
    assert_eq!(run.code(), 1, "{}\n{stderr}", run.stdout());
    let job = sql(home, "SELECT max(job_id) FROM rollouts").remove(0);
    assert!(
        stderr.contains(&format!("job {job}")) && stderr.contains(&format!("pid {}", child.id())),
        "names the rollout and its process: {stderr}"
    );
    assert!(stderr.contains("hint: "), "{stderr}");
    assert_eq!(hosts(), before, "the refused rename changed the inventory");
    assert!(child.wait().unwrap().success(), "the rollout ends well");
    assert_eq!(
        sql(
            home,
            "SELECT count(*) FROM job_results WHERE host = 'app-2'"
        ),
        ["0"]
    );

    // Once it ended, the rename moves everything, and nothing comes back under the old name.
    let run = reapply(home, &address, &["--name", "app-2"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let (code, report, stderr) = poll(home, &["--all"]);
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(
        host(&report, "app-2")["version_colour"],
        "green",
        "{report}"
    );
    let status = Pm::push(home).args(["status", &job]).json();
    assert_eq!(status["summary"]["pending"], 0, "{status}");
    assert_eq!(status["summary"]["ok"], 3, "{status}");
    let left = sql(
        home,
        "SELECT count(*) FROM (SELECT host FROM host_ids UNION ALL SELECT host FROM host_state
         UNION ALL SELECT host FROM job_results UNION ALL SELECT host FROM update_runs
         UNION ALL SELECT host FROM report_cursors) WHERE host = 'lab-002'",
    );
    assert_eq!(left, ["0"], "rows left under the old name");

    // Renaming back gives one active host for the agent, with its group.
    let run = reapply(home, &address, &["--name", "lab-002"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert_eq!(
        sql(
            home,
            &format!(
                "SELECT host, host_group FROM hosts WHERE state = 'active' AND address = '{address}'"
            ),
        ),
        ["lab-002,lab"]
    );
    let (code, report, stderr) = poll(home, &["--all"]);
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(report["summary"]["certificates_renewed"], 0, "{report}");
    assert_eq!(report["hosts"].as_array().unwrap().len(), 3, "{report}");
}

#[test]
fn reactivating_a_wiped_agent_gives_it_back_the_hold_in_force() {
    let home = Home::new();
    let mut agent = Agent::start(&home, "a71", "127.0.77.71");
    activate(&home, &agent, &["--group", "db"]);
    let run = Pm::push(&home)
        .args([
            "--json",
            "hold",
            "--host",
            "a71",
            "--until",
            "2d",
            "--reason",
            "change freeze CHG-9",
        ])
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert_eq!(agent_hold(&agent.state())["reason"], "change freeze CHG-9");

    // The host's state is wiped; it is set up and activated again with a key.
    agent.wipe_and_init(&home, "a71");
    let report = activate(&home, &agent, &[]);
    let step = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "hold")
        .unwrap_or_else(|| panic!("no hold step: {report}"));
    assert_eq!(step["ok"], true, "{report}");

    let hold = agent_hold(&agent.state());
    assert_eq!(
        hold["reason"], "change freeze CHG-9",
        "the agent holds again: {hold}"
    );
    let holds = Pm::push(&home).args(["holds"]).json();
    let line = &holds["holds"][0];
    assert_eq!(line["host"], "a71", "{holds}");
    assert_eq!(line["on_agent"], true, "{holds}");
    assert_eq!(line["reason"], "change freeze CHG-9", "{holds}");
}

#[test]
fn errors_about_names_and_strangers_read_as_one_sentence_without_runs_of_spaces() {
    let home = Home::new();
    let mut first = Agent::start(&home, "a95", "127.0.77.95");
    activate(&home, &first, &[]);
    // Another agent reports the same name: refused, and the message says what to do.
    let second = Agent::start(&home, "a95", "127.0.77.96");
    let run = Pm::activate(&home)
        .args(["host", &second.addr.to_string(), "--key-file"])
        .args([&second.key_file])
        .args(["--dist-url", NO_DIST])
        .run();
    assert_eq!(run.code(), 1, "{}\n{}", run.stdout(), run.stderr());
    let stderr = run.stderr();
    assert!(stderr.contains("pm-activate deactivate a95"), "{stderr}");
    assert!(!stderr.contains("  "), "runs of spaces: {stderr}");

    // The first host's agent is set up again and not activated: a stranger to this manager.
    first.wipe_and_init(&home, "a95");
    let (code, report, stderr) = poll(&home, &["--host", "a95"]);
    assert_eq!(code, 1, "{report}\n{stderr}");
    let error = host(&report, "a95")["error"].as_str().unwrap().to_string();
    assert!(error.contains("did not issue"), "{error}");
    assert!(!error.contains("  "), "runs of spaces: {error}");
}

#[test]
fn a_hold_the_agent_lost_reads_not_on_the_agent_after_a_poll_until_pm_activate_gives_it_back() {
    let home = Home::new();
    let agent = Agent::start(&home, "a72", "127.0.77.72");
    activate(&home, &agent, &[]);
    let run = Pm::push(&home)
        .args([
            "--json",
            "hold",
            "--host",
            "a72",
            "--reason",
            "change freeze CHG-10",
        ])
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let on_agent = || Pm::push(&home).args(["holds"]).json()["holds"][0]["on_agent"].clone();
    assert_eq!(on_agent(), true);

    // The agent's setup is restored from a snapshot taken before the hold.
    let path = agent.state().join("setup.json");
    let mut setup: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    setup.as_object_mut().unwrap().remove("hold");
    std::fs::write(&path, serde_json::to_vec(&setup).unwrap()).unwrap();
    assert_eq!(agent_hold(&agent.state()), Value::Null);

    let (code, report, stderr) = poll(&home, &["--all"]);
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(
        on_agent(),
        false,
        "the manager says the agent has a hold it lost"
    );

    // Re-applying the host's setup gives it back.
    let run = reapply(&home, &agent.addr.to_string(), &[]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert_eq!(agent_hold(&agent.state())["reason"], "change freeze CHG-10");
    assert_eq!(on_agent(), true);
}

#[test]
fn pm_doctor_names_active_hosts_that_share_an_address() {
    let home = Home::new();
    let a66 = Agent::start(&home, "a66", "127.0.77.66");
    let a67 = Agent::start(&home, "a67", "127.0.77.67");
    activate(&home, &a66, &[]);
    activate(&home, &a67, &[]);
    let addresses = || {
        let report = Pm::new("pm-doctor")
            .args(["--json", "--home", home.path().to_str().unwrap()])
            .run()
            .json();
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "addresses")
            .cloned()
            .unwrap_or_else(|| panic!("no addresses check: {report}"))
    };
    assert_eq!(addresses()["result"], "ok");
    // An inventory from before the rule: a66 was moved onto a67's address.
    let file = home.path().join("inventory.duckdb");
    let (code, _, stderr) = crate::support::duckdb(&[
        file.to_str().unwrap(),
        "-c",
        &format!(
            "UPDATE hosts SET address = '{}' WHERE host = 'a66'",
            a67.addr
        ),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let check = addresses();
    assert_eq!(check["result"], "warn", "{check}");
    let message = check["message"].as_str().unwrap();
    assert!(
        message.contains("a66")
            && message.contains("a67")
            && message.contains(&a67.addr.to_string()),
        "{check}"
    );
    assert!(
        check["hint"]
            .as_str()
            .unwrap()
            .contains("pm-activate deactivate"),
        "{check}"
    );
}

/// Red team C, item 8: a certificate renewed while the manager's and the agent's clocks were
/// both 300 days ahead is valid only from then. With the clocks right again (another agent of
/// the same poll agrees with the manager), the poll says it was issued while a clock was wrong,
/// not "set this manager's clock right", and `pm-activate host ADDR` re-issues it.
#[test]
fn a_certificate_issued_while_both_clocks_were_ahead_is_named_so_and_pm_activate_reissues_it() {
    let home = Home::new();
    let mut ahead = Agent::start(&home, "a87", "127.0.0.87");
    let right = Agent::start(&home, "a88", "127.0.0.88");
    activate(&home, &ahead, &[]);
    activate(&home, &right, &[]);
    ahead.run(Some("+300d"));
    let run = poll_at(&home, "+300d", &["--host", "a87"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert_eq!(
        run.json()["summary"]["certificates_renewed"],
        1,
        "{}",
        run.stdout()
    );
    // Both clocks are right again.
    ahead.run(None);
    let (code, report, stderr) = poll(&home, &["--all"]);
    assert_eq!(code, 3, "{report}\n{stderr}");
    let line = host(&report, "a87");
    assert_eq!(line["error_kind"], "clock", "{line}");
    let error = line["error"].as_str().unwrap();
    assert!(!error.contains("set this manager's clock right"), "{error}");
    assert!(error.contains("issued while a clock was wrong"), "{error}");
    assert!(
        error.contains(&format!("pm-activate host {}", ahead.addr)),
        "{error}"
    );
    let run = reapply(&home, &ahead.addr.to_string(), &["--json"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert!(
        run.stdout().contains("issued while a clock was wrong"),
        "{}",
        run.stdout()
    );
    let (code, report, stderr) = poll(&home, &["--all"]);
    assert_eq!(code, 0, "{report}\n{stderr}");
}
