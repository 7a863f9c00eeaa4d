//! A real Prometheus (Debian's package) scraping the real `pm-exporter` of a lab fleet: every
//! PromQL expression of the Grafana dashboards returns data, and the alert rules fire for the
//! infected, the stale and the behind host (the rules as shipped, with their `for:` waits set
//! to 0s so that the test does not wait hours).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{AgentSetup, EICAR, Pm, Server, free_port, runtime};
use pm::lab::FaultKind;

/// A Prometheus server on a free loopback port with its own empty TSDB, killed on drop.
struct Prometheus {
    child: Child,
    base: String,
}

impl Prometheus {
    fn start(dir: &Path, exporter: &str) -> Prometheus {
        let rules = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/alerts/pm-alerts.yml"),
        )
        .unwrap();
        let immediate: String = rules
            .lines()
            .map(|line| match line.trim_start().strip_prefix("for:") {
                Some(_) => format!("{}for: 0s", &line[..line.len() - line.trim_start().len()]),
                None => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join("rules.yml"), immediate).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [rules.yml]\n\
                 scrape_configs:\n  - job_name: pm\n    static_configs:\n      - targets: ['{exporter}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus runs (apt-get install prometheus; scripts/setup.sh does)");
        let prometheus = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        prometheus.wait_until("it is ready", |p| p.get("/-/ready").is_some());
        prometheus
    }

    fn get(&self, path: &str) -> Option<String> {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        runtime().block_on(async {
            let response = client
                .get(format!("{}{path}", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            if !response.status().is_success() {
                return None;
            }
            response.text().await.ok()
        })
    }

    /// The result vector of an instant query (an error for an expression that does not parse).
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let answer: Value = runtime()
            .block_on(async {
                let url = reqwest::Url::parse_with_params(
                    &format!("{}/api/v1/query", self.base),
                    &[("query", expr)],
                )
                .map_err(|err| err.to_string())?;
                client
                    .get(url)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .map_err(|err| err.to_string())?
                    .bytes()
                    .await
                    .map_err(|err| err.to_string())
            })
            .and_then(|body| serde_json::from_slice(&body).map_err(|err| err.to_string()))?;
        if answer["status"] != "success" {
            return Err(format!("`{expr}`: {answer}"));
        }
        let data = &answer["data"];
        Ok(match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => {
                data["result"].as_array().cloned().unwrap_or_default()
            }
            // A scalar (e.g. `time() - x` with no vector) counts as data.
            _ => vec![data["result"].clone()],
        })
    }

    /// Firing alerts as `NAME host-or-product`.
    fn firing(&self) -> Vec<String> {
        let Some(text) = self.get("/api/v1/alerts") else {
            return Vec::new();
        };
        let answer: Value = serde_json::from_str(&text).unwrap();
        let mut firing: Vec<String> = answer["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                let labels = &a["labels"];
                let subject = labels["host"]
                    .as_str()
                    .or(labels["product"].as_str())
                    .unwrap_or("-");
                format!("{} {subject}", labels["alertname"].as_str().unwrap_or("?"))
            })
            .collect();
        firing.sort();
        firing
    }

    /// Waits (at most 90 s) until `done` holds.
    fn wait_until(&self, what: &str, done: impl Fn(&Prometheus) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every PromQL expression of the dashboards (template variables filled in), from
/// dashboards/promql-exprs.py.
fn dashboard_expressions() -> Vec<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .arg(format!("{root}/dashboards/promql-exprs.py"))
        .output()
        .expect("python3 runs dashboards/promql-exprs.py");
    assert!(output.status.success(), "{output:?}");
    let mut expressions: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    expressions.sort();
    expressions.dedup();
    expressions
}

/// Expressions that need what a connected lab fleet cannot have: an air-gap bundle import.
const NEEDS_A_BUNDLE_IMPORT: &str = "pm_bundle_last_import_timestamp_seconds";

#[test]
fn prometheus_scraping_the_exporter_answers_every_dashboard_expression_and_fires_the_alerts() {
    // Three agents: lab-web infected, db-3 stays on test 3 while dist moves on (behind), web-2
    // stopped (down, then inactive).
    let setup = AgentSetup::new();
    let behind = setup.add_agent("db-3", &["--group", "db"]);
    let mut stopped = setup.add_agent("web-2", &["--group", "web"]);
    Pm::agent(&behind.state()).args(["update"]).json();
    // web-2 is also held, for a day: the held-hosts panel has a host and an end time.
    Pm::push(&setup.home)
        .args(["hold", "--host", "web-2", "--until", "1d"])
        .json();
    // A vendor feed arrives with revision 5: db-3, not updated since, lacks it (a missing
    // component).
    let feed = setup.tmp.path().join("feed");
    std::fs::create_dir_all(feed.join("sigs")).unwrap();
    std::fs::write(
        feed.join("sigs/site.hdb"),
        "44d88612fea8a8f36de82e1278abb02f:68:Pm.Site.Sample\n",
    )
    .unwrap();
    setup.lab.upstream.set_feed(&feed, "1").unwrap();
    setup.home.clamav_config(
        &setup.lab,
        &format!(
            "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n\
             [poll]\ninactive_after = \"8s\"\n",
            setup.lab.url("/vendor/index.json")
        ),
    );
    setup.publish(5);
    // A rollout to the first host only: a job with waves for the rollout dashboard.
    let first = "127.0.0.1";
    let rollout = Pm::push(&setup.home)
        .args(["update", "--host", first, "--json"])
        .run();
    assert_eq!(rollout.code(), 0, "{}", rollout.stdout());
    let license = setup.tmp.path().join("site.lic");
    std::fs::write(&license, "LICENSE-ID=1\n").unwrap();
    let expires = (chrono::Utc::now() + chrono::Duration::days(20))
        .format("%Y-%m-%d")
        .to_string();
    let licensed = Pm::push(&setup.home)
        .args(["license", license.to_str().unwrap(), "--expires", &expires])
        .args(["--host", first, "--json"])
        .run();
    assert_eq!(licensed.code(), 0, "{}", licensed.stdout());
    let scan_dir = setup.tmp.path().join("scan-me");
    std::fs::create_dir_all(&scan_dir).unwrap();
    std::fs::write(scan_dir.join("eicar.com"), EICAR).unwrap();
    setup.agent_cmd(&["scan", scan_dir.to_str().unwrap()]);
    // Upstream moves to 6 and is synced but not published (upstream ahead of dist); then it
    // answers 429 and the mirror is in cool-down.
    setup.lab.upstream.set_version(6).unwrap();
    Pm::mirror(&setup.home).args(["sync"]).json();
    setup.lab.fault(
        FaultKind::TooManyRequests {
            retry_after: Some(3600),
        },
        "test.cvd",
        None,
    );
    let cooled = Pm::mirror(&setup.home).args(["sync"]).run();
    assert_ne!(
        cooled.code(),
        0,
        "the 429 is a failure: {}",
        cooled.stdout()
    );
    stopped.stop();
    // web-2 was activated more than inactive_after ago and never answers: inactive. The others
    // answer this poll, so they stay active for inactive_after.
    std::thread::sleep(Duration::from_secs(9));
    let polled = Pm::poll(&setup.home)
        .args(["--json", "--timeout", "3s"])
        .run();
    assert_eq!(polled.code(), 3, "web-2 is down: {}", polled.stdout());

    let exporter = Server::spawn(
        Pm::new("pm-exporter")
            .args(["--listen", "127.0.0.1:0", "--refresh", "1s"])
            .env("PM_HOME", setup.home.path().to_str().unwrap()),
    );
    let work = tempfile::tempdir().unwrap();
    let prometheus = Prometheus::start(work.path(), exporter.base.trim_start_matches("http://"));
    prometheus.wait_until("three hosts are scraped", |p| {
        p.query("pm_host_up").is_ok_and(|r| r.len() == 3)
    });

    // Every dashboard expression evaluates and returns data (rate-like ones need two scrapes:
    // retried within the bound).
    let expressions = dashboard_expressions();
    assert!(expressions.len() > 40, "{expressions:?}");
    let mut empty = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        empty.clear();
        for expr in &expressions {
            match prometheus.query(expr) {
                Ok(result) if result.is_empty() && !expr.contains(NEEDS_A_BUNDLE_IMPORT) => {
                    empty.push(expr.clone())
                }
                Ok(_) => {}
                Err(err) => panic!("a dashboard expression does not evaluate: {err}"),
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(empty.is_empty(), "no data for: {empty:#?}");

    // The alerts: infection, staleness (down and inactive), behind dist, cool-down, license.
    let wanted = [
        format!("PmHostInfected {first}"),
        "PmHostInactive web-2".to_string(),
        "PmHostDown web-2".to_string(),
        "PmHostBehindDist db-3".to_string(),
        "PmMirrorInCooldown clamav".to_string(),
        format!("PmLicenseExpiringSoon {first}"),
    ];
    prometheus.wait_until("the alerts fire", |p| {
        let firing = p.firing();
        wanted.iter().all(|alert| firing.contains(alert))
    });
    let firing = prometheus.firing();
    eprintln!(
        "{} dashboard expressions returned data; firing: {firing:?}",
        expressions.len()
    );
    for quiet in [
        "PmHostInfected db-3",
        "PmHostBehindDist 127.0.0.1",
        "PmHostDown db-3",
        "PmDistFrozen clamav",
        "PmExporterSnapshotStale -",
    ] {
        assert!(!firing.contains(&quiet.to_string()), "{quiet}: {firing:?}");
    }
}
