//! `pm-exporter` against inventories written by the real tools: the series of a polled fleet,
//! `promtool check metrics`, OpenMetrics negotiation, the `--allow` list, `/healthz`, and that
//! it keeps serving the last snapshot while pm-poll writes or after the file is gone.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{AgentSetup, EICAR, Home, Pm, Server, hold_read_write, runtime};

const OPENMETRICS: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";

/// Starts `pm-exporter` on a free loopback port.
pub(crate) fn exporter(home: &Home, flags: &[&str]) -> Server {
    Server::spawn(
        Pm::new("pm-exporter")
            .args(["--listen", "127.0.0.1:0"])
            .args(flags)
            .env("PM_HOME", home.path().to_str().unwrap()),
    )
}

/// Status, content type and body of a GET.
fn get(server: &Server, path: &str, accept: Option<&str>) -> (u16, String, String) {
    get_with(reqwest::Client::builder(), server, path, accept)
}

fn get_with(
    client: reqwest::ClientBuilder,
    server: &Server,
    path: &str,
    accept: Option<&str>,
) -> (u16, String, String) {
    let client = client.no_proxy().build().unwrap();
    runtime().block_on(async {
        let mut request = client
            .get(format!("{}{path}", server.base))
            .timeout(Duration::from_secs(10));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let response = request.send().await.unwrap();
        let code = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (code, content_type, response.text().await.unwrap())
    })
}

pub(crate) fn scrape(server: &Server) -> String {
    let (code, _, body) = get(server, "/metrics", None);
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the series written exactly as `series` (name and labels), if present.
pub(crate) fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

fn promtool_check(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs: apt-get install prometheus (scripts/setup.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The first agent has dist and found EICAR, `web-2` is stopped; both were polled.
fn polled_fleet() -> (AgentSetup, crate::support::ExtraAgent) {
    let setup = AgentSetup::new();
    let mut other = setup.add_agent("web-2", &["--group", "web"]);
    setup.agent_cmd(&["update"]);
    let dir = setup.tmp.path().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("eicar.com"), EICAR).unwrap();
    setup.agent_cmd(&["scan", dir.to_str().unwrap()]);
    other.stop();
    let run = Pm::poll(&setup.home)
        .args(["--json", "--timeout", "3s"])
        .run();
    assert_eq!(run.code(), 3, "web-2 is down: {}", run.stdout());
    (setup, other)
}

#[test]
fn a_polled_fleet_is_exported_in_both_formats_and_promtool_accepts_it() {
    let (setup, _other) = polled_fleet();
    // A finished rollout: 127.0.0.1 is on dist already (skipped), web-2 is down.
    let run = Pm::push(&setup.home)
        .args(["update", "--all", "--json"])
        .run();
    assert_ne!(run.code(), 2, "{}", run.stderr());
    let job_id = run.json()["job_id"].clone();
    let server = exporter(&setup.home, &[]);

    let (code, content_type, body) = get(&server, "/metrics", None);
    assert_eq!(code, 200, "{body}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let local = r#"{host="127.0.0.1",group="default"}"#;
    let web = r#"{host="web-2",group="web"}"#;
    for (series, expected) in [
        (format!("pm_host_up{local}"), 1.0),
        (format!("pm_host_up{web}"), 0.0),
        (format!("pm_host_scan_findings{local}"), 1.0),
        (format!("pm_host_scan_status{local}"), 2.0),
        (format!("pm_host_scan_status{web}"), 1.0),
        (format!("pm_host_version_status{local}"), 0.0),
        (format!("pm_host_last_update_success{local}"), 1.0),
        (
            r#"pm_host_component_version{host="127.0.0.1",group="default",product="clamav",component="test"}"#
                .to_string(),
            3.0,
        ),
        (
            r#"pm_host_component_behind_dist{host="127.0.0.1",group="default",product="clamav",component="test"}"#
                .to_string(),
            0.0,
        ),
        (r#"pm_hosts{version_status="green"}"#.to_string(), 1.0),
        (r#"pm_hosts{version_status="unknown"}"#.to_string(), 0.0),
        (
            r#"pm_hosts_by_scan_status{scan_status="red"}"#.to_string(),
            1.0,
        ),
        (r#"pm_dist_info{revision="r1"}"#.to_string(), 1.0),
        (r#"pm_latest_info{revision="r1"}"#.to_string(), 1.0),
        ("pm_dist_serial".to_string(), 1.0),
        (
            r#"pm_dist_component_version{product="clamav",component="test"}"#.to_string(),
            3.0,
        ),
        (
            r#"pm_upstream_component_version{product="clamav",component="test"}"#.to_string(),
            3.0,
        ),
        ("pm_inventory_read_errors_total".to_string(), 0.0),
        ("pm_rollouts_in_progress".to_string(), 0.0),
    ] {
        assert_eq!(value(&body, &series), Some(expected), "{series} in\n{body}");
    }
    // Unknown stays absent: web-2 never scanned, and nothing is published as a backup yet.
    assert_eq!(value(&body, &format!("pm_host_scan_findings{web}")), None);
    assert!(!body.contains("pm_backup_info"), "{body}");
    assert!(
        value(
            &body,
            r#"pm_mirror_last_successful_sync_timestamp_seconds{product="clamav"}"#
        )
        .is_some()
    );
    assert!(value(&body, "pm_inventory_snapshot_read_seconds").is_some());
    // The rollout: every host counted once in its wave, all six results present.
    let rollout: Vec<&str> = body
        .lines()
        .filter(|l| {
            l.starts_with(&format!(
                "pm_rollout_hosts{{job_id=\"{job_id}\",kind=\"update\""
            ))
        })
        .collect();
    assert_eq!(rollout.len() % 6, 0, "{body}");
    assert!(!rollout.is_empty(), "job {job_id}: {body}");
    let counted: f64 = rollout
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(counted, 2.0, "{rollout:#?}");
    // Nothing of the scan but its count: no paths or signature names in labels.
    assert!(!body.contains("Eicar"), "{body}");
    promtool_check(&body);

    let (code, content_type, open) = get(&server, "/metrics", Some(OPENMETRICS));
    assert_eq!(code, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert_eq!(open.matches("# EOF").count(), 1);
    assert!(open.contains("# TYPE pm_host_agent info\n"), "{open}");
    assert_eq!(
        value(&open, &format!("pm_host_scan_findings{local}")),
        Some(1.0)
    );
    assert!(!body.contains("# EOF"));

    let (code, _, health) = get(&server, "/healthz", None);
    assert_eq!((code, health.as_str()), (200, "ok\n"));
    let (code, _, _) = get(&server, "/nothing", None);
    assert_eq!(code, 404);
}

#[test]
fn only_allowed_networks_are_answered_and_healthz_waits_for_an_inventory() {
    let home = Home::new();
    let refused = exporter(&home, &["--allow", "10.0.0.0/8", "--refresh", "1s"]);
    for path in ["/metrics", "/healthz"] {
        let (code, _, body) = get(&refused, path, None);
        assert_eq!((code, body.as_str()), (403, ""), "{path}");
    }

    let server = exporter(
        &home,
        &[
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "127.0.0.0/8",
            "--refresh",
            "1s",
        ],
    );
    let (code, _, health) = get(&server, "/healthz", None);
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("no inventory at"), "{health}");
    // Without a snapshot, only the exporter's own series.
    let body = scrape(&server);
    assert!(
        value(&body, "pm_inventory_read_errors_total").unwrap() >= 1.0,
        "{body}"
    );
    assert!(
        !body.contains("pm_inventory_snapshot_age_seconds"),
        "{body}"
    );
    assert!(body.contains("pm_exporter_build_info{version="), "{body}");
    promtool_check(&body);

    // Any tool that writes creates the inventory; the next refresh finds it.
    let key = home.path().join("k.key");
    Pm::activate(&home)
        .args(["key", "new", "--out"])
        .args([&key])
        .json();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, health) = get(&server, "/healthz", None);
        if code == 200 {
            assert_eq!(health, "ok\n");
            break;
        }
        assert!(Instant::now() < deadline, "still {code}: {health}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = scrape(&server);
    assert_eq!(
        value(&body, r#"pm_hosts{version_status="unknown"}"#),
        Some(0.0)
    );
    assert!(!body.contains("pm_dist_info"), "nothing published: {body}");
}

/// The status `curl` gets for `/healthz` at `url` (0: no answer).
fn curl_status(url: &str) -> u16 {
    let output = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--noproxy", "*", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).parse().unwrap_or(0)
}

#[test]
fn an_ipv4_mapped_allow_entry_on_a_dual_stack_listener_admits_ipv4_clients() {
    let home = Home::new();
    let port = crate::support::free_port();
    let server = Server::spawn(
        Pm::new("pm-exporter")
            .args(["--listen", &format!("[::]:{port}")])
            .args([
                "--allow",
                "::ffff:127.0.0.1/128",
                "--allow",
                "::ffff:0:0/104",
            ])
            .env("PM_HOME", home.path().to_str().unwrap()),
    );
    // Written as IPv6 (::ffff:127.0.0.1, ::ffff:0.0.0.0/104), meant as IPv4 (127.0.0.1,
    // 0.0.0.0/8): the IPv4 client is in, an IPv6 one is not.
    assert_eq!(
        curl_status(&format!("http://127.0.0.1:{port}/healthz")),
        503
    );
    assert_eq!(curl_status(&format!("http://[::1]:{port}/healthz")), 403);
    drop(server);
    // A mapped entry shorter than /96 covers IPv6 and IPv4 at once: refused, with a hint.
    let run = Pm::new("pm-exporter")
        .args(["--listen", "127.0.0.1:0", "--allow", "::ffff:0:0/95"])
        .env("PM_HOME", home.path().to_str().unwrap())
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("as two --allow flags"),
        "{}",
        run.stderr()
    );
}

#[test]
fn the_last_snapshot_is_served_while_pm_poll_writes_and_after_the_inventory_is_gone() {
    let (setup, _other) = polled_fleet();
    let server = exporter(&setup.home, &["--refresh", "1s"]);
    let up = r#"pm_host_up{host="127.0.0.1",group="default"}"#;
    assert_eq!(value(&scrape(&server), up), Some(1.0));

    // pm-poll writes while we scrape: every scrape answers, and every poll records.
    let home = setup.home.path().to_owned();
    let polls = std::thread::spawn(move || {
        (0..4)
            .map(|_| {
                Command::new(crate::support::bin("pm-poll"))
                    .args([
                        "--home",
                        home.to_str().unwrap(),
                        "--json",
                        "--timeout",
                        "3s",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
                    .code()
            })
            .collect::<Vec<_>>()
    });
    let mut scrapes = 0;
    while !polls.is_finished() && scrapes < 2000 {
        let started = Instant::now();
        let body = scrape(&server);
        assert_eq!(value(&body, up), Some(1.0));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        polls.join().unwrap(),
        [Some(3); 4],
        "web-2 is down in every poll"
    );
    assert!(scrapes > 0);

    // A writer holding the file: busy, the last snapshot stays.
    let file = setup.home.path().join("inventory.duckdb");
    let (mut session, stdin) = hold_read_write(&file);
    std::thread::sleep(Duration::from_millis(2500));
    let body = scrape(&server);
    assert_eq!(value(&body, up), Some(1.0));
    let busy_errors = value(&body, "pm_inventory_read_errors_total").unwrap();
    assert!(busy_errors >= 1.0, "{body}");
    drop(stdin);
    session.wait().unwrap();

    // Replaced by something that is not an inventory, then removed: still the last snapshot,
    // more errors, and its age grows.
    let wal = setup.home.path().join("inventory.duckdb.wal");
    let _ = std::fs::remove_file(&wal);
    let replacement = setup.home.path().join("replacement");
    std::fs::write(&replacement, b"not a database").unwrap();
    std::fs::rename(&replacement, &file).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let damaged = scrape(&server);
    assert_eq!(value(&damaged, up), Some(1.0));
    let damaged_errors = value(&damaged, "pm_inventory_read_errors_total").unwrap();
    assert!(damaged_errors > busy_errors, "{damaged}");
    let damaged_age = value(&damaged, "pm_inventory_snapshot_age_seconds").unwrap();
    assert!(damaged_age >= 2.0, "{damaged}");

    std::fs::remove_file(&file).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let missing = scrape(&server);
    assert_eq!(value(&missing, up), Some(1.0));
    assert!(value(&missing, "pm_inventory_read_errors_total").unwrap() > damaged_errors);
    assert!(value(&missing, "pm_inventory_snapshot_age_seconds").unwrap() > damaged_age);
    let (code, _, _) = get(&server, "/healthz", None);
    assert_eq!(code, 200, "a snapshot exists");

    // Warned once per kind of failure, not per refresh; a writer holding the file for seconds
    // (a poll) is the normal case and no warning.
    let stderr = server.stop();
    let warnings: Vec<_> = stderr.iter().filter(|l| l.contains("WARN")).collect();
    assert!((1..=3).contains(&warnings.len()), "{stderr:#?}");
    assert!(
        !warnings.iter().any(|l| l.contains("Busy")),
        "{warnings:#?}"
    );
}

#[test]
fn https_scrapes_are_served_with_the_given_certificate_and_the_allow_list_applies() {
    let home = Home::new();
    let (key, cert) = pm::pki::ca::AgentIdentity::generate("127.0.0.1").unwrap();
    let key_file = home.path().join("exporter.key");
    crate::support::write_private(
        &key_file,
        std::str::from_utf8(&key.private_key_to_pem_pkcs8().unwrap()).unwrap(),
    );
    let cert_file = home.path().join("exporter.pem");
    std::fs::write(&cert_file, cert.to_pem().unwrap()).unwrap();
    let tls = |allow: &str| {
        exporter(
            &home,
            &[
                "--tls-cert",
                cert_file.to_str().unwrap(),
                "--tls-key",
                key_file.to_str().unwrap(),
                "--allow",
                allow,
            ],
        )
    };
    let insecure = || reqwest::Client::builder().danger_accept_invalid_certs(true);

    let server = tls("127.0.0.0/8");
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let (code, _, body) = get_with(insecure(), &server, "/metrics", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("pm_exporter_build_info"), "{body}");
    let (code, _, _) = get_with(insecure(), &server, "/healthz", None);
    assert_eq!(code, 503, "no inventory");

    let refused = tls("10.0.0.0/8");
    let (code, _, body) = get_with(insecure(), &refused, "/metrics", None);
    assert_eq!((code, body.as_str()), (403, ""));

    // A key others can read is refused before anything listens.
    let loose = home.path().join("loose.key");
    std::fs::write(&loose, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = Pm::new("pm-exporter")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert_file.to_str().unwrap(),
        ])
        .args(["--tls-key", loose.to_str().unwrap()])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("hint:"), "{}", run.stderr());
}

#[test]
fn a_scrape_that_accepts_gzip_gets_the_same_series_compressed() {
    let (setup, _other) = polled_fleet();
    let server = exporter(&setup.home, &[]);
    let plain = scrape(&server);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let (encoding, vary, compressed) = runtime().block_on(async {
        let response = client
            .get(format!("{}/metrics", server.base))
            .header("accept-encoding", "gzip, deflate")
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (encoding, vary) = (header("content-encoding"), header("vary"));
        (encoding, vary, response.bytes().await.unwrap().to_vec())
    });
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert_eq!(vary.as_deref(), Some("accept-encoding"));
    // One gzip member, as zlib-based clients read it (a second member would be ignored):
    // a single-member reader must reach the end of the body and find every series.
    let mut text = String::new();
    let mut single = flate2::bufread::GzDecoder::new(&compressed[..]);
    std::io::Read::read_to_string(&mut single, &mut text).unwrap();
    assert!(
        single.into_inner().is_empty(),
        "bytes after the first gzip member"
    );
    assert!(compressed.len() < plain.len(), "compressed");
    // Every series but the previous scrape's duration, which the first scrape has not.
    let series = |body: &str| {
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("pm_exporter_scrape_duration"))
            .count()
    };
    assert_eq!(series(&text), series(&plain), "{text}");
    let inventory_lines = |body: &str| -> Vec<String> {
        body.lines()
            .filter(|l| l.starts_with("pm_host_") || l.starts_with("pm_dist_"))
            .map(str::to_string)
            .collect()
    };
    assert!(!inventory_lines(&plain).is_empty());
    assert_eq!(inventory_lines(&text), inventory_lines(&plain));
    promtool_check(&text);
    // curl --compressed (libcurl decodes with zlib) sees every series too.
    let output = Command::new("curl")
        .args(["-s", "--compressed", "--noproxy", "*", "--max-time", "10"])
        .arg(format!("{}/metrics", server.base))
        .output()
        .unwrap();
    assert!(output.status.success(), "curl: {:?}", output.status);
    let curled = String::from_utf8_lossy(&output.stdout);
    assert_eq!(series(&curled), series(&plain), "{curled}");
    assert_eq!(inventory_lines(&curled), inventory_lines(&plain));
    // `q=0` refuses gzip: plain text.
    let (code, _, body) = get_with(
        reqwest::Client::builder().default_headers(
            [(
                reqwest::header::ACCEPT_ENCODING,
                reqwest::header::HeaderValue::from_static("gzip;q=0"),
            )]
            .into_iter()
            .collect(),
        ),
        &server,
        "/metrics",
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(inventory_lines(&body), inventory_lines(&plain));
}
