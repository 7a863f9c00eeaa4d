//! `pm-mirror status` tells the truth (issue 17): after upstream asked to wait, after a failed
//! publish, and per database.

use pm::lab::FaultKind;

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
