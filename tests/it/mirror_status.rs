//! `pm-mirror status` tells the truth (issue 17): after upstream asked to wait, after a failed
//! publish, per database, and on a closed home fed only by bundles.

use pm::lab::FaultKind;

use crate::mirror_airgap::Sites;
use crate::support::{Home, Lab, Pm, synced_at_3_with_6_upstream};

fn seconds_from_now(text: &serde_json::Value) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(text.as_str().unwrap()).unwrap();
    at.signed_duration_since(chrono::Utc::now()).num_seconds()
}

fn component<'a>(product: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    product["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no component `{name}` in {product}"))
}

#[test]
fn after_a_429_status_shows_the_product_deferred_with_its_failure_time_error_and_next_try() {
    let (lab, home, _) = synced_at_3_with_6_upstream();
    lab.fault(
        FaultKind::TooManyRequests {
            retry_after: Some(3600),
        },
        "test.cvd",
        None,
    );
    let before = chrono::Utc::now();
    assert_eq!(Pm::mirror(&home).args(["sync"]).run().code(), 3);

    let status = Pm::mirror(&home).args(["status"]).json();
    let product = &status["products"][0];
    assert_eq!(product["state"], "deferred", "{product}");
    let failed_at =
        chrono::DateTime::parse_from_rfc3339(product["last_failure_at"].as_str().unwrap()).unwrap();
    assert!(failed_at >= before, "{product}");
    let error = product["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("upstream asked to wait: HTTP 429, retry after "),
        "{error}"
    );
    assert!((3500..=3600).contains(&seconds_from_now(&product["cooldown_until"])));
    // Upstream's version is not known: the 429 answered the probe, not version 3 or 6.
    assert_eq!(
        component(product, "test")["upstream"],
        "unknown",
        "{product}"
    );

    let text = Pm::mirror(&home).args(["status"]).run().stdout();
    assert!(
        text.contains("clamav: deferred: last sync failed at ")
            && text.contains("upstream asked to wait: HTTP 429")
            && text.contains("next try after "),
        "{text}"
    );
}

#[test]
fn a_failed_publish_shows_in_status_with_its_error_and_dist_still_the_previous_revision() {
    let (_lab, home, _) = synced_at_3_with_6_upstream();
    Pm::mirror(&home).args(["publish"]).json();
    Pm::mirror(&home).args(["sync"]).json();
    // One changed byte in latest's new CVD: publish verifies latest and refuses it.
    let cvd = home.repo("latest/clamav/test.cvd");
    let mut bytes = std::fs::read(&cvd).unwrap();
    bytes[600] ^= 0xff;
    std::fs::remove_file(&cvd).unwrap();
    std::fs::write(&cvd, bytes).unwrap();
    let before = chrono::Utc::now();
    let publish = Pm::mirror(&home).args(["publish"]).run();
    assert_eq!(publish.code(), 1, "{}", publish.stderr());

    let status = Pm::mirror(&home).args(["status"]).json();
    let last = &status["last_publish"];
    assert_eq!(last["result"], "failed", "{status}");
    assert_eq!(last["revision"], "r2", "{last}");
    assert_eq!(last["dist"], "r1", "{last}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("`clamav/test.cvd` in r2 does not match its manifest"),
        "{last}"
    );
    let at = chrono::DateTime::parse_from_rfc3339(last["at"].as_str().unwrap()).unwrap();
    assert!(at >= before, "{last}");
    assert_eq!(status["generations"]["dist"], "r1");

    let text = Pm::mirror(&home).args(["status"]).run().stdout();
    assert!(
        text.contains("last publish failed at ")
            && text.contains("does not match its manifest")
            && text.contains("dist is still r1"),
        "{text}"
    );
}

#[test]
fn a_refused_publish_of_a_rolled_back_latest_shows_in_status_as_refused() {
    let (_lab, home, _) = synced_at_3_with_6_upstream();
    Pm::mirror(&home).args(["publish"]).json();
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    Pm::mirror(&home)
        .args(["rollback", "--generation", "1"])
        .json();
    let publish = Pm::mirror(&home).args(["publish"]).run();
    assert_eq!(publish.code(), 2, "{}", publish.stderr());

    let last = &Pm::mirror(&home).args(["status"]).json()["last_publish"];
    assert_eq!(last["result"], "refused", "{last}");
    assert_eq!(last["revision"], "r2", "{last}");
    assert_eq!(last["dist"], "r1", "{last}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("was rolled back from dist"),
        "{last}"
    );
    // A publish that goes through is the last one then.
    Pm::mirror(&home).args(["publish", "--again"]).json();
    let last = &Pm::mirror(&home).args(["status"]).json()["last_publish"];
    assert_eq!(last["result"], "published", "{last}");
    assert_eq!(last["dist"], "r2", "{last}");
    assert!(last["error"].is_null(), "{last}");
}

#[test]
fn a_database_missing_upstream_gets_its_own_row_and_error_and_the_others_their_versions() {
    let lab = Lab::start(3);
    let home = Home::new();
    // `daily` is not on the lab upstream; it comes first so the probe of `test` comes after the
    // failure.
    home.config(&format!(
        "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{}\"\n\
         databases = [\"daily\", \"test\"]\n[http]\ntimeout = \"3s\"\nretries = 1\nbackoff = \"50ms\"\n",
        lab.url("/clamav")
    ));
    let sync = Pm::mirror(&home).args(["sync", "--json"]).run();
    assert_eq!(sync.code(), 1, "{}", sync.stderr());
    let reported = &sync.json()["products"][0];
    assert!(
        component(reported, "daily")["error"]
            .as_str()
            .unwrap()
            .contains("daily.cvd` is not found upstream (HTTP 404)"),
        "{reported}"
    );
    assert_eq!(component(reported, "test")["upstream_version"], "3");
    assert!(component(reported, "test")["error"].is_null(), "{reported}");

    let status = Pm::mirror(&home).args(["status"]).json();
    let product = &status["products"][0];
    let daily = component(product, "daily");
    assert_eq!(daily["upstream"], "unknown", "{product}");
    assert!(
        daily["error"]
            .as_str()
            .unwrap()
            .contains("daily.cvd` is not found upstream (HTTP 404)"),
        "{product}"
    );
    let test = component(product, "test");
    assert_eq!(test["upstream"], "3", "{product}");
    assert!(test["error"].is_null(), "{product}");
    assert_eq!(product["state"], "failing");

    let text = Pm::mirror(&home).args(["status"]).run().stdout();
    assert!(
        text.contains("clamav/daily: `") && text.contains("daily.cvd` is not found upstream"),
        "{text}"
    );
}

#[test]
fn a_closed_home_with_no_pm_toml_imports_publishes_and_lists_what_it_holds_with_its_origin() {
    let sites = Sites::new(3);
    std::fs::remove_file(sites.offline.path().join("pm.toml")).unwrap();
    let export = sites.export("r1.tar", None);
    let sha256 = export["sha256"].as_str().unwrap().to_string();

    let import = sites.import("r1.tar");
    assert_eq!(import.code(), 0, "{}", import.stderr());
    assert!(
        import.stderr().contains("no `pm.toml`") && import.stderr().contains("closed home"),
        "{}",
        import.stderr()
    );
    let publish = Pm::mirror(&sites.offline).args(["publish"]).run();
    assert_eq!(publish.code(), 0, "{}", publish.stderr());

    let status = Pm::mirror(&sites.offline).args(["status"]).json();
    let products = status["products"].as_array().unwrap();
    assert_eq!(products.len(), 1, "{status}");
    let product = &products[0];
    assert_eq!(product["name"], "clamav");
    assert_eq!(product["state"], "imported");
    let test = component(product, "test");
    assert_eq!(test["latest"], "3", "{product}");
    assert_eq!(test["dist"], "3", "{product}");
    assert_eq!(product["origin"]["source"], "bundle", "{product}");
    assert_eq!(product["origin"]["bundle_sha256"], sha256.as_str());
    assert_eq!(product["origin"]["revision"], "r1");

    let text = Pm::mirror(&sites.offline).args(["status"]).run().stdout();
    assert!(
        text.contains("| clamav ") && text.contains(&format!("import of bundle {}", &sha256[..12])),
        "{text}"
    );
}

#[test]
fn a_closed_home_from_the_documented_minimal_pm_toml_lists_the_products_it_imported() {
    let sites = Sites::new(3);
    sites.offline.config(&minimal_closed_home_toml());
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    Pm::mirror(&sites.offline).args(["publish"]).json();
    let sync = Pm::mirror(&sites.offline).args(["sync"]).run();
    assert_eq!(sync.code(), 0, "{}", sync.stderr());
    let doctor = Pm::new("pm-doctor")
        .args(["--home"])
        .args([sites.offline.path()])
        .run();
    assert_eq!(doctor.code(), 0, "{}", doctor.stdout());

    let status = Pm::mirror(&sites.offline).args(["status"]).json();
    let product = &status["products"][0];
    assert_eq!(product["name"], "clamav", "{status}");
    assert_eq!(component(product, "test")["dist"], "3", "{product}");
}

/// The minimal `pm.toml` of a closed home, as docs/mirror.md shows it.
fn minimal_closed_home_toml() -> String {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/mirror.md"))
        .expect("docs/mirror.md");
    let (_, after) = page
        .split_once("<!-- closed-home-pm.toml -->\n```toml\n")
        .expect("docs/mirror.md shows the minimal closed-home pm.toml");
    after.split_once("```").unwrap().0.to_string()
}
