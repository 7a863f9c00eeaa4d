//! Products that collide (issue 16): two feeds shipping a database of the same name, which every
//! agent refuses, and components of the same name in two products, whose series and
//! `behind_by` were taken one for the other.

use std::time::Duration;

use pm::manifest::FileEntry;
use pm::repo::{Generations, Repo};

use crate::support::{AgentSetup, Home, Lab, Pm, Server, runtime, sql};

/// A lab whose `files` feed is one file `name` holding `text`, at feed version `version`.
fn lab_with_feed_file(lab: &Lab, name: &str, text: &str, version: &str) -> tempfile::TempDir {
    let feed = tempfile::tempdir().unwrap();
    std::fs::write(feed.path().join(name), text).unwrap();
    lab.upstream.set_feed(feed.path(), version).unwrap();
    feed
}

/// `pm.toml`: the lab's ClamAV feed plus its `files` feed once per name in `feeds`.
fn config_with_feeds(home: &Home, lab: &Lab, feeds: &[&str]) {
    let mut extra = String::new();
    for name in feeds {
        extra.push_str(&format!(
            "[[products]]\nname = \"{name}\"\nkind = \"files\"\nindex_url = \"{}\"\n",
            lab.url("/vendor/index.json")
        ));
    }
    home.clamav_config(lab, &extra);
}

#[test]
fn two_feeds_shipping_a_database_of_one_name_are_refused_by_sync_publish_and_doctor() {
    let lab = Lab::start(3);
    let _feed = lab_with_feed_file(
        &lab,
        "site.hdb",
        "44d88612fea8a8f36de82e1278abb02f:68:Eicar\n",
        "1",
    );
    let home = Home::new();
    config_with_feeds(&home, &lab, &["vendor-a", "vendor-b"]);

    for args in [&["--json", "sync"][..], &["--json", "--dry-run", "sync"]] {
        let run = Pm::mirror(&home).args(args).run();
        assert_eq!(run.code(), 1, "{args:?}: {}{}", run.stdout(), run.stderr());
        let report = run.json();
        let failed = &report["products"][2];
        assert_eq!(
            (&failed["name"], &failed["result"]),
            (&"vendor-b".into(), &"failed".into()),
            "{report}"
        );
        let error = failed["error"].as_str().unwrap();
        assert!(
            error.contains(
                "`vendor-a/site.hdb` and `vendor-b/site.hdb` would both be `site.hdb` in the \
                 scanning engine's database directory"
            ) && error.contains("drop one of the products from pm.toml"),
            "{error}"
        );
        assert_eq!(report["changed"], false);
    }
    assert!(!home.repo("latest").exists(), "latest was made");

    // A revision holding such a pair (an older pm made it) is never published, and doctor fails
    // a dist holding one.
    config_with_feeds(&home, &lab, &["vendor-a"]);
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    let clashing = stage_by_hand_a_copy_of_latest_with(&home, "vendor-b/site.hdb");
    let run = Pm::mirror(&home).args(["publish"]).run();
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    assert!(
        run.stderr().contains(&format!(
            "error: {clashing}: `vendor-a/site.hdb` and `vendor-b/site.hdb` would both be `site.hdb`"
        )),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("hint: rename one of them"),
        "{}",
        run.stderr()
    );
    assert_eq!(
        Repo::new(home.path())
            .generations()
            .unwrap()
            .dist
            .as_deref(),
        Some("r1")
    );

    let repo = Repo::new(home.path());
    let lock = repo.lock(Duration::from_secs(5)).unwrap();
    let before = repo.generations().unwrap();
    repo.switch(
        &lock,
        &Generations {
            dist: Some(clashing.clone()),
            backups: vec!["r1".into()],
            ..before
        },
        None,
    )
    .unwrap();
    drop(lock);
    let doctor = Pm::new("pm-doctor")
        .args(["--home", home.path().to_str().unwrap(), "--json"])
        .run();
    assert_eq!(doctor.code(), 1, "{}", doctor.stdout());
    let report = doctor.json();
    let dist = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dist")
        .unwrap();
    assert_eq!(dist["result"], "fail", "{dist}");
    assert!(
        dist["message"]
            .as_str()
            .unwrap()
            .contains("would both be `site.hdb`"),
        "{dist}"
    );
}

/// Commits a copy of latest plus a copy of its `vendor-a/site.hdb` at `path` (with its own
/// product entry), signed with the home's key, as latest: what an older pm synced. Returns the
/// revision.
fn stage_by_hand_a_copy_of_latest_with(home: &Home, path: &str) -> String {
    let repo = Repo::new(home.path());
    let lock = repo.lock(Duration::from_secs(5)).unwrap();
    let latest = crate::support::manifest(home, "latest");
    let mut staged = repo.stage(&lock).unwrap();
    let from = repo.revision_dir(&latest.revision);
    for file in &latest.files {
        staged.carry_over(&from, file.clone()).unwrap();
    }
    let original = latest.file("vendor-a/site.hdb").unwrap().clone();
    let (product, _) = path.split_once('/').unwrap();
    std::fs::copy(from.join(&original.path), staged.path_for(path).unwrap()).unwrap();
    staged.add(FileEntry {
        path: path.into(),
        product: product.into(),
        ..original
    });
    let mut products = latest.products.clone();
    let mut entry = latest.product("vendor-a").unwrap().clone();
    entry.name = product.into();
    products.push(entry);
    let key = pm::pki::SigningKey::load_or_create(home.path()).unwrap();
    let manifest = staged
        .commit(&repo, &lock, &key, "upstream", products)
        .unwrap();
    let generations = Generations {
        latest: Some(manifest.revision.clone()),
        ..repo.generations().unwrap()
    };
    repo.switch(&lock, &generations, None).unwrap();
    manifest.revision
}

#[test]
fn a_component_named_like_another_products_is_compared_with_its_own_products_dist() {
    let setup = AgentSetup::new();
    // The feed's file `test` (not a database the engine loads) at version 9, beside ClamAV's
    // test database at 3: compared by name, the host looked 6 versions behind.
    let _feed = lab_with_feed_file(&setup.lab, "test", "notes\n", "9");
    config_with_feeds(&setup.home, &setup.lab, &["vendor"]);
    Pm::mirror(&setup.home).args(["sync"]).json();
    Pm::mirror(&setup.home).args(["publish"]).json();
    setup.agent_cmd(&["update"]);
    let poll = Pm::poll(&setup.home).args(["--json"]).run();
    assert_eq!(poll.code(), 0, "{}{}", poll.stdout(), poll.stderr());

    // Compared with the feed's `test` (version 9), the host looked 6 versions behind.
    assert_eq!(
        sql(
            &setup.home,
            "SELECT installed_version, dist_version, behind_by FROM host_versions \
             WHERE component = 'test'"
        ),
        ["3,3,0"]
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT product, component, installed_version, dist_version, behind_by \
             FROM host_versions WHERE component = 'test'"
        ),
        ["clamav,test,3,3,0"]
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT product, component, version FROM dist_components ORDER BY product"
        ),
        ["clamav,test,3", "vendor,test,9"]
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT product, component, version, hosts, is_dist FROM version_drift \
             WHERE component = 'test'"
        ),
        ["clamav,test,3,1,true"]
    );
    let status = sql(&setup.home, "SELECT version_colour FROM fleet_status");
    assert_eq!(status, ["green"]);

    let exporter = Server::spawn(
        Pm::new("pm-exporter")
            .args(["--listen", "127.0.0.1:0"])
            .env("PM_HOME", setup.home.path().to_str().unwrap()),
    );
    let body = runtime().block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let response = client
                .get(format!("{}/metrics", exporter.base))
                .send()
                .await
                .unwrap();
            if response.status() == 200 {
                break response.text().await.unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "no /metrics");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    for series in [
        r#"pm_host_component_behind_dist{host="127.0.0.1",group="default",product="clamav",component="test"} 0"#,
        r#"pm_host_component_version{host="127.0.0.1",group="default",product="clamav",component="test"} 3"#,
        r#"pm_dist_component_version{product="clamav",component="test"} 3"#,
        r#"pm_dist_component_version{product="vendor",component="test"} 9"#,
    ] {
        assert!(
            body.lines().any(|line| line == series),
            "{series} in\n{body}"
        );
    }
}
