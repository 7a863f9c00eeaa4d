//! `pm-doctor` against real homes: a healthy one synced, published and served, then each
//! breakage it must name (a loose key, a truncated dist file, a broken `pm.toml`), a home without
//! an inventory, the `--json` shape and the exit statuses.

use std::os::unix::fs::PermissionsExt;

use crate::support::{Home, Lab, Pm, Run, Server};

pub fn doctor(home: &Home) -> Pm {
    Pm::new("pm-doctor").args(["--home", home.path().to_str().unwrap()])
}

/// A home that synced and published test.cvd version 3, with the manager CA and client key that
/// activation would create.
fn published_home() -> (Lab, Home) {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    let ca = pm::pki::ca::ManagerCa::load_or_create(home.path()).unwrap();
    ca.client_identity(home.path()).unwrap();
    (lab, home)
}

/// Runs `pm-doctor --json` and returns the exit code and the document.
pub fn json(pm: Pm) -> (i32, serde_json::Value) {
    let run: Run = pm.args(["--json"]).run();
    (run.code(), run.json())
}

/// The check named `name`.
pub fn check<'a>(document: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    document["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no check `{name}` in {document:#}"))
}

/// The keys of a JSON object, sorted.
fn keys_of(value: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn doctor_finds_a_synced_published_and_served_home_healthy() {
    let (_lab, home) = published_home();
    let server = Server::start(&home);
    let exporter = Server::spawn(
        Pm::new("pm-exporter")
            .args(["--listen", "127.0.0.1:0"])
            .env("PM_HOME", home.path().to_str().unwrap()),
    );
    // The exporter answers /healthz once its first snapshot is read.
    let healthz = format!("{}/healthz", exporter.base);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while crate::support::runtime()
        .block_on(async { reqwest::get(&healthz).await.map(|r| r.status().as_u16()) })
        .ok()
        != Some(200)
    {
        assert!(std::time::Instant::now() < deadline, "no snapshot");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, document) =
        json(doctor(&home).args(["--serve", &server.base, "--exporter", &exporter.base]));
    assert_eq!(code, 0, "{document:#}");
    assert_eq!(document["changed"], false);
    assert_eq!(document["ok"], true);
    for check in document["checks"].as_array().unwrap() {
        assert_eq!(check["result"], "ok", "{check:#}");
        assert_eq!(check["hint"], serde_json::Value::Null, "{check:#}");
    }
    for name in [
        "config",
        "secret pki/manifest-signing.key",
        "secret pki/ca.key",
        "secret pki/client.key",
        "inventory",
        "dist",
        "dist statement",
        "latest",
        "backups",
        "serve",
        "exporter",
    ] {
        check(&document, name);
    }
    // Without `--serve` or `--exporter` the reachability checks are not listed.
    let (_, document) = json(doctor(&home));
    let names: Vec<&str> = document["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["name"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"serve") && !names.contains(&"exporter"),
        "{names:?}"
    );
    // The table names every check and its result.
    let run = doctor(&home).run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(run.stdout().contains("| dist"), "{}", run.stdout());
    assert!(run.stdout().contains("| ok"), "{}", run.stdout());
}

#[test]
fn doctor_fails_a_private_key_readable_by_others_with_the_chmod_hint() {
    let (_lab, home) = published_home();
    let key = home.path().join("pki/ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, document) = json(doctor(&home));
    assert_eq!(code, 1, "{document:#}");
    assert_eq!(document["ok"], false);
    let check = check(&document, "secret pki/ca.key");
    assert_eq!(check["result"], "fail");
    let message = check["message"].as_str().unwrap();
    assert!(message.contains(key.to_str().unwrap()), "{message}");
    assert!(message.contains("mode 644"), "{message}");
    assert_eq!(check["hint"], format!("chmod 600 {}", key.display()));
    // The key's contents are never printed.
    let pem = std::fs::read_to_string(&key).unwrap();
    let body = pem.lines().nth(1).unwrap();
    let run = doctor(&home).run();
    assert_eq!(run.code(), 1);
    assert!(!run.stdout().contains(body) && !run.stderr().contains(body));
}

#[test]
fn doctor_fails_a_truncated_dist_file_naming_it() {
    let (_lab, home) = published_home();
    let file = home.repo("dist/clamav/test.cvd");
    let real = std::fs::canonicalize(&file).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).unwrap();
    let length = std::fs::metadata(&real).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&real)
        .unwrap()
        .set_len(length / 2)
        .unwrap();
    let (code, document) = json(doctor(&home));
    assert_eq!(code, 1, "{document:#}");
    let dist = check(&document, "dist");
    assert_eq!(dist["result"], "fail");
    let message = dist["message"].as_str().unwrap();
    assert!(message.contains("`clamav/test.cvd`"), "{message}");
    assert!(
        message.contains(&format!("size {}", length / 2)),
        "{message}"
    );
    assert!(dist["hint"].as_str().unwrap().contains("pm-mirror repair"));
}

#[test]
fn doctor_fails_a_broken_pm_toml_with_the_loaders_message() {
    let (_lab, home) = published_home();
    home.config("[[products]]\nname = \"clamav\"\nkind = \"nonsense\"\n");
    let expected = pm::config::Config::load(&home.path().join("pm.toml"))
        .unwrap_err()
        .to_string();
    let (code, document) = json(doctor(&home));
    assert_eq!(code, 1, "{document:#}");
    let config = check(&document, "config");
    assert_eq!(config["result"], "fail");
    assert_eq!(config["message"], expected);
    // The rest of the home is still checked.
    assert_eq!(check(&document, "dist")["result"], "ok");
}

#[test]
fn doctor_warns_about_a_home_without_inventory_and_exits_0_with_the_json_shape() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    let (code, document) = json(doctor(&home));
    assert_eq!(code, 0, "{document:#}");
    assert_eq!(keys_of(&document), ["changed", "checks", "ok"]);
    assert_eq!(document["changed"], false);
    assert_eq!(document["ok"], true);
    for check in document["checks"].as_array().unwrap() {
        assert_eq!(keys_of(check), ["hint", "message", "name", "result"]);
        if check["result"] != "ok" {
            assert_eq!(check["result"], "warn", "{check:#}");
            assert!(check["message"].is_string() && check["hint"].is_string());
        }
    }
    let inventory = check(&document, "inventory");
    assert_eq!(inventory["result"], "warn");
    assert_eq!(inventory["message"], "no inventory yet");
    assert_eq!(inventory["hint"], "run pm-mirror sync or pm-activate");
    let dist = check(&document, "dist");
    assert_eq!(dist["result"], "warn");
    assert_eq!(dist["hint"], "run `pm-mirror publish`");
}

#[test]
fn doctor_fails_an_unreachable_exporter_and_rejects_a_bad_url_as_usage() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    let port = crate::support::free_port();
    let (code, document) =
        json(doctor(&home).args(["--exporter", &format!("http://127.0.0.1:{port}")]));
    assert_eq!(code, 1, "{document:#}");
    let exporter = check(&document, "exporter");
    assert_eq!(exporter["result"], "fail");
    assert!(
        exporter["message"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{port}/healthz")),
        "{exporter:#}"
    );
    let run = doctor(&home).args(["--serve", "not a url"]).run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
}

#[test]
fn doctor_names_the_allow_list_when_the_exporter_answers_403() {
    let home = Home::new();
    let exporter = Server::spawn(
        Pm::new("pm-exporter")
            .args(["--listen", "127.0.0.1:0", "--allow", "10.0.0.0/8"])
            .env("PM_HOME", home.path().to_str().unwrap()),
    );
    let (code, document) = json(doctor(&home).args(["--exporter", &exporter.base]));
    assert_eq!(code, 1, "{document:#}");
    let exporter = check(&document, "exporter");
    assert_eq!(exporter["result"], "fail");
    let message = exporter["message"].as_str().unwrap();
    let hint = exporter["hint"].as_str().unwrap();
    assert!(
        message.contains("403") && message.contains("--allow"),
        "{exporter:#}"
    );
    // The address to add, as the exporter sees this host; not a word about the inventory.
    assert!(hint.contains("--allow 127.0.0.1/32"), "{exporter:#}");
    assert!(!hint.contains("inventory"), "{exporter:#}");
}

#[test]
fn doctor_warns_when_polls_older_than_keep_polls_are_never_pruned() {
    let home = Home::new();
    home.config("[poll]\nkeep_polls = \"30d\"\n");
    let key = home.path().join("k.key");
    Pm::activate(&home)
        .args(["key", "new", "--out"])
        .args([&key])
        .json();
    let (_, document) = json(doctor(&home));
    assert_eq!(
        check(&document, "inventory")["result"],
        "ok",
        "{document:#}"
    );

    // A poll 40 days old is still there: nothing pruned it (as when pm-poll stopped running,
    // or auto_prune is off and nobody runs pm-poll --prune).
    let file = home.path().join("inventory.duckdb");
    let (code, _, err) = crate::support::duckdb(&[
        file.to_str().unwrap(),
        "-c",
        "INSERT INTO polls VALUES (NULL, 1, now() - INTERVAL 40 DAY, true, NULL, NULL, 1)",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, document) = json(doctor(&home));
    assert_eq!(code, 0, "a warning: {document:#}");
    let inventory = check(&document, "inventory");
    assert_eq!(inventory["result"], "warn", "{inventory:#}");
    let message = inventory["message"].as_str().unwrap();
    assert!(message.contains("keep_polls` (30d)"), "{inventory:#}");
    assert!(message.contains("no prune ever ran"), "{inventory:#}");
    assert!(
        inventory["hint"]
            .as_str()
            .unwrap()
            .contains("pm-poll --prune"),
        "{inventory:#}"
    );

    // A prune puts it right.
    let pruned = Pm::poll(&home).args(["--prune"]).json();
    assert_eq!(pruned["deleted_polls"], 1, "{pruned:#}");
    let (_, document) = json(doctor(&home));
    assert_eq!(
        check(&document, "inventory")["result"],
        "ok",
        "{document:#}"
    );
}
