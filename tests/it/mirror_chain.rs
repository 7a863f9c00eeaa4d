//! Mirror chains: a site mirror whose upstream is a parent `pm-mirror serve` (product kind
//! `pm`). The child holds the parent's products at the same paths, trusts only manifests signed
//! with the parent's key, checks every file against the signed manifest, fetches only what
//! changed, works through a proxy, and a real freshclam updates from the child.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pm::lab::LabProxy;
use pm::manifest::Manifest;
use serde_json::json;

use crate::support::{Home, Lab, Pm, Server, freshclam_updates_test_1_to_6, manifest, testdb};

/// The parent's manifest signing public key, as `pm-mirror key export-public` writes it.
fn parent_key(parent: &Home) -> PathBuf {
    parent.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE)
}

/// A `pm.toml` with one `pm` product `site` chained to `base`, fast retries, plus `extra`.
fn chain_config(child: &Home, base: &str, key: &Path, extra: &str) {
    child.config(&format!(
        "[[products]]\nname = \"site\"\nkind = \"pm\"\nurl = \"{base}\"\ntrusted_key = \"{}\"\n{extra}\n\
         [http]\ntimeout = \"3s\"\nretries = 2\nbackoff = \"50ms\"\n",
        key.display()
    ));
}

/// A parent that synced the lab at `version` and published it.
fn published_parent(version: u32) -> (Lab, Home) {
    let lab = Lab::start(version);
    let parent = Home::new();
    parent.clamav_config(&lab, "");
    Pm::mirror(&parent).args(["sync"]).json();
    Pm::mirror(&parent).args(["publish"]).json();
    (lab, parent)
}

fn sync_publish(home: &Home) -> serde_json::Value {
    let report = Pm::mirror(home).args(["sync"]).json();
    Pm::mirror(home).args(["publish"]).json();
    report
}

/// Every file as (path, size, sha256, product).
fn file_list(manifest: &Manifest) -> Vec<(String, u64, String, String)> {
    manifest
        .files
        .iter()
        .map(|f| (f.path.clone(), f.size, f.sha256.clone(), f.product.clone()))
        .collect()
}

/// The child's dist holds exactly the parent's dist: same manifest file list, same bytes.
fn assert_same_dist(parent: &Home, child: &Home) {
    let parent_dist = manifest(parent, "dist");
    let child_dist = manifest(child, "dist");
    assert_eq!(file_list(&child_dist), file_list(&parent_dist));
    for file in &parent_dist.files {
        assert_eq!(
            std::fs::read(child.repo("dist").join(&file.path)).unwrap(),
            std::fs::read(parent.repo("dist").join(&file.path)).unwrap(),
            "{}",
            file.path
        );
    }
}

/// A sync that must fail: exit 1, the error on stdout, latest exactly as before, no staging.
fn failed_sync(child: &Home, before: Option<&Manifest>) -> String {
    let run = Pm::mirror(child).args(["sync"]).run();
    assert_eq!(
        run.code(),
        1,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout(),
        run.stderr()
    );
    match before {
        Some(before) => assert_eq!(&manifest(child, "latest"), before, "latest must not change"),
        None => assert!(!child.repo("latest/manifest.json").exists()),
    }
    let staging: Vec<_> = std::fs::read_dir(child.repo("revisions"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".staging"))
        .collect();
    assert!(staging.is_empty(), "staging left behind: {staging:?}");
    run.stdout()
}

#[test]
fn a_child_mirror_holds_the_parents_files_fetches_only_changes_and_freshclam_updates_from_it() {
    let (lab, parent) = published_parent(3);
    let parent_server = Server::start(&parent);
    let child = Home::new();
    chain_config(&child, &parent_server.base, &parent_key(&parent), "");

    let first = sync_publish(&child);
    assert_eq!(first["changed"], true);
    let product = &first["products"][0];
    assert_eq!(
        [&product["name"], &product["kind"], &product["result"]],
        [&json!("site"), &json!("pm"), &json!("updated")]
    );
    assert_eq!(product["components"][0]["name"], "clamav/test");
    assert_eq!(product["components"][0]["upstream_version"], "3");
    assert_eq!(product["components"][0]["version"], "3");
    let parent_files = manifest(&parent, "dist").files.len();
    assert_eq!(product["files_downloaded"], parent_files);
    assert_same_dist(&parent, &child);
    // The parent's product arrives as it is, at the same paths, marked with what brought it.
    let child_dist = manifest(&child, "dist");
    let entry = child_dist.product("clamav").unwrap();
    assert_eq!(
        (entry.kind.as_str(), entry.via.as_deref()),
        ("clamav", Some("site"))
    );
    assert!(child.repo("dist/clamav/test.cvd").exists());
    assert_eq!(child_dist.source, "parent");

    // Nothing new on the parent: one 304 for its manifest, no body bytes.
    let again = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(again["changed"], false);
    assert_eq!(again["bytes_downloaded"], 0);
    assert_eq!(again["products"][0]["result"], "unchanged");

    lab.upstream.set_version(6).unwrap();
    sync_publish(&parent);
    let before = manifest(&child, "latest");
    let update = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(update["changed"], true);
    let product = &update["products"][0];
    assert_eq!(product["components"][0]["previous_version"], "3");
    assert_eq!(product["components"][0]["version"], "6");
    // Only the files that changed come over the wire: test.cvd, cdiffs 4..6 and their
    // signatures; cdiffs 2 and 3 are carried over from latest.
    let parent_dist = manifest(&parent, "dist");
    let changed: Vec<_> = parent_dist
        .files
        .iter()
        .filter(|f| before.file(&f.path).is_none_or(|b| b.sha256 != f.sha256))
        .collect();
    assert!(changed.iter().all(|f| !f.path.contains("test-2.cdiff")));
    assert_eq!(product["files_downloaded"], changed.len());
    let manifest_bytes = std::fs::metadata(parent.repo("dist/manifest.json"))
        .unwrap()
        .len();
    let signature_bytes = std::fs::metadata(parent.repo("dist/manifest.sig"))
        .unwrap()
        .len();
    // The parent's signed dist statement is read with its manifest.
    let statement_bytes: u64 = ["view/dist.json", "view/dist.sig"]
        .iter()
        .map(|path| std::fs::metadata(parent.repo(path)).unwrap().len())
        .sum();
    let file_bytes: u64 = changed.iter().map(|f| f.size).sum();
    assert_eq!(
        product["bytes_downloaded"],
        file_bytes + manifest_bytes + signature_bytes + statement_bytes
    );
    let latest = manifest(&child, "latest");
    let carried = latest.file("clamav/test-2.cdiff").unwrap();
    assert_eq!(Some(carried), before.file("clamav/test-2.cdiff"));
    Pm::mirror(&child).args(["publish"]).json();
    assert_same_dist(&parent, &child);

    // `status` shows the components the parent brought.
    let status = Pm::mirror(&child).args(["status"]).json();
    let component = &status["products"][0]["components"][0];
    assert_eq!(status["products"][0]["name"], "site");
    assert_eq!(
        [
            &component["name"],
            &component["upstream"],
            &component["latest"],
            &component["dist"]
        ],
        [&json!("clamav/test"), &json!("6"), &json!("6"), &json!("6")]
    );
    assert_eq!(component["backups"][0], "3");

    // A stock freshclam pointed at the child updates test-1 -> test-6 through the cdiffs.
    let child_server = Server::start(&child);
    freshclam_updates_test_1_to_6(&child_server.base, "DatabaseMirror", "test.cld");
}

#[test]
fn a_child_with_the_wrong_trusted_key_refuses_the_parents_manifest() {
    let (lab, parent) = published_parent(3);
    let server = Server::start(&parent);
    let child = Home::new();
    chain_config(&child, &server.base, &parent_key(&parent), "");
    Pm::mirror(&child).args(["sync"]).json();
    let before = manifest(&child, "latest");
    lab.upstream.set_version(6).unwrap();
    sync_publish(&parent);

    // Another mirror's key: the parent's manifest is not signed by it.
    let stranger = Home::new();
    pm::pki::SigningKey::load_or_create(stranger.path()).unwrap();
    let wrong = parent_key(&stranger);
    chain_config(&child, &server.base, &wrong, "");
    let out = failed_sync(&child, Some(&before));
    let manifest_url = format!("{}/manifest.json", server.base);
    assert!(
        out.contains(&format!(
            "`{manifest_url}` is not signed by the trusted key `{}`",
            wrong.display()
        )),
        "{out}"
    );
    assert!(out.contains("manifest.sig` does not match"), "{out}");
    let json = Pm::mirror(&child).args(["--json", "sync"]).run();
    assert_eq!(json.code(), 1);
    assert_eq!(json.json()["products"][0]["result"], "failed");
    assert_eq!(json.json()["changed"], false);

    // A key file that is missing or not a key says so before contacting the parent.
    let missing = child.path().join("nope.pem");
    chain_config(&child, &server.base, &missing, "");
    let out = failed_sync(&child, Some(&before));
    assert!(
        out.contains(&format!(
            "cannot use the trusted key `{}` for `{}`: cannot read it",
            missing.display(),
            server.base
        )),
        "{out}"
    );
    std::fs::write(&missing, "not a key\n").unwrap();
    let out = failed_sync(&child, Some(&before));
    assert!(out.contains("it is not a PEM public key"), "{out}");

    // With the right key the same sync goes through.
    chain_config(&child, &server.base, &parent_key(&parent), "");
    let ok = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(ok["products"][0]["components"][0]["version"], "6");
}

/// Serves `app` on a loopback port on the lab's runtime; its base URL.
fn serve_on_lab(lab: &Lab, app: axum::Router) -> String {
    let listener = lab
        .runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    lab.runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// What the fake parent does to file bodies (the manifest and its signature stay genuine).
#[derive(Clone, Copy)]
enum Tamper {
    FlipByte,
    AppendByte,
}

/// A parent that serves a real parent's signed manifest but tampered files.
fn tampering_parent(lab: &Lab, dist: PathBuf, tamper: Arc<Mutex<Tamper>>) -> String {
    use axum::extract::Request;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let app = axum::Router::new().fallback(move |request: Request| {
        let dist = dist.clone();
        let tamper = *tamper.lock().unwrap();
        async move {
            let path = request.uri().path().trim_start_matches('/').to_string();
            let Ok(mut body) = std::fs::read(dist.join(&path)) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            if !path.starts_with("manifest.") {
                match tamper {
                    Tamper::FlipByte => {
                        let middle = body.len() / 2;
                        body[middle] ^= 0x01;
                    }
                    Tamper::AppendByte => body.push(b'\n'),
                }
            }
            body.into_response()
        }
    });
    serve_on_lab(lab, app)
}

#[test]
fn a_tampered_file_from_the_parent_fails_its_size_or_sha256_check() {
    let (lab, parent) = published_parent(3);
    let server = Server::start(&parent);
    let child = Home::new();
    chain_config(&child, &server.base, &parent_key(&parent), "");
    Pm::mirror(&child).args(["sync"]).json();
    let before = manifest(&child, "latest");
    lab.upstream.set_version(6).unwrap();
    sync_publish(&parent);

    let tamper = Arc::new(Mutex::new(Tamper::FlipByte));
    let base = tampering_parent(&lab, parent.repo("dist"), tamper.clone());
    chain_config(&child, &base, &parent_key(&parent), "");
    let out = failed_sync(&child, Some(&before));
    assert!(out.contains("the parent's manifest says"), "{out}");
    assert!(out.contains("sha256 is "), "{out}");

    // One byte more than the parent's manifest says: refused as it arrives.
    *tamper.lock().unwrap() = Tamper::AppendByte;
    let out = failed_sync(&child, Some(&before));
    assert!(out.contains("is larger than the limit of"), "{out}");

    // The genuine parent again: the update goes through.
    chain_config(&child, &server.base, &parent_key(&parent), "");
    let ok = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(ok["changed"], true);
    assert_eq!(
        std::fs::read(child.repo("latest/clamav/test.cvd")).unwrap(),
        std::fs::read(testdb().join("test-6.cvd")).unwrap()
    );
}

#[test]
fn a_signed_parent_manifest_with_a_path_outside_its_product_is_refused() {
    let (lab, parent) = published_parent(3);
    // The parent's own key signs a manifest whose file leaves the product directory: the
    // signature is genuine, the path still is not accepted.
    let mut evil = manifest(&parent, "dist");
    evil.files[0].path = "clamav/../../etc/cron.d/evil".into();
    let json = serde_json::to_vec_pretty(&evil).unwrap();
    let key = pm::pki::SigningKey::load_or_create(parent.path()).unwrap();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("manifest.json"), &json).unwrap();
    std::fs::write(site.path().join("manifest.sig"), key.sign(&json).unwrap()).unwrap();
    let base = tampering_parent(
        &lab,
        site.path().to_owned(),
        Arc::new(Mutex::new(Tamper::FlipByte)),
    );
    let child = Home::new();
    chain_config(&child, &base, &parent_key(&parent), "");
    let out = failed_sync(&child, None);
    assert!(
        out.contains(&format!(
            "`{base}/manifest.json` is not a valid pm manifest: unsafe path `clamav/../../etc/cron.d/evil`"
        )),
        "{out}"
    );
}

#[test]
fn a_parent_product_named_like_a_local_product_fails_the_pm_product() {
    let (lab, parent) = published_parent(3);
    let server = Server::start(&parent);
    let child = Home::new();
    // The child also mirrors the lab itself under the same name `clamav`.
    chain_config(
        &child,
        &server.base,
        &parent_key(&parent),
        &format!(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{}\"\ndatabases = [\"test\"]\n",
            lab.url("/clamav")
        ),
    );
    let out = failed_sync(&child, None);
    assert!(
        out.contains(&format!(
            "the parent `{}` has a product `clamav` and so does the product `clamav` in pm.toml",
            server.base
        )),
        "{out}"
    );
    // A dry run says the same without downloading anything.
    let dry = Pm::mirror(&child)
        .args(["--dry-run", "--json", "sync"])
        .run();
    assert_eq!(dry.code(), 1, "{}", dry.stdout());
    let report = dry.json();
    assert_eq!(report["products"][0]["result"], "failed");
    assert_eq!(report["products"][1]["result"], "would_update");
}

#[test]
fn a_chain_works_through_an_authenticating_proxy_from_pm_toml() {
    let (lab, parent) = published_parent(3);
    let server = Server::start(&parent);
    let proxy = LabProxy::new(Some(("mirror", "s3cret"))).unwrap();
    let proxy_addr = lab.runtime.block_on(proxy.spawn("127.0.0.1:0")).unwrap();
    let child = Home::new();
    let password = child.path().join("proxy.pass");
    crate::support::write_private(&password, "s3cret\n");
    chain_config(
        &child,
        &server.base,
        &parent_key(&parent),
        &format!(
            "[proxy]\nurl = \"http://{proxy_addr}\"\nusername = \"mirror\"\npassword_file = \"{}\"\n",
            password.display()
        ),
    );
    let first = sync_publish(&child);
    assert_eq!(first["changed"], true);
    assert_same_dist(&parent, &child);
    // The manifest, its signature and every file went through the proxy.
    let files = manifest(&parent, "dist").files.len() as u64;
    assert!(
        proxy.forwarded() >= files + 2,
        "forwarded {}",
        proxy.forwarded()
    );
    assert_eq!(proxy.refused(), 0);

    // Conditional requests pass through the proxy too: an unchanged parent costs a 304.
    let forwarded = proxy.forwarded();
    let again = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(again["changed"], false);
    assert_eq!(again["bytes_downloaded"], 0);
    assert_eq!(proxy.forwarded(), forwarded + 1);

    lab.upstream.set_version(6).unwrap();
    sync_publish(&parent);
    let update = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(update["products"][0]["components"][0]["version"], "6");

    // Without the right password the proxy refuses and the sync fails, naming the 407.
    std::fs::write(&password, "wrong\n").unwrap();
    let before = manifest(&child, "latest");
    let out = failed_sync(&child, Some(&before));
    assert!(out.contains("407"), "{out}");
    assert!(proxy.refused() >= 1);
}

/// The warnings of `product` in `pm-mirror status --json` (the sync that brought its content).
fn status_warnings(home: &Home, product: &str) -> Vec<String> {
    let status = Pm::mirror(home).args(["status"]).json();
    status["products"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == product)
        .flat_map(|p| p["warnings"].as_array().cloned().unwrap_or_default())
        .map(|w| w.as_str().unwrap().to_string())
        .collect()
}

/// Issue 17: a child mirror that followed its parent's rollback reported it as `updated`. The
/// parent's manifest serial went down, so the child says `rolled back by the parent` (text,
/// `--json`, the inventory and `status`) with the versions before and after; the parent's next
/// publish is an update again.
#[test]
fn a_child_following_its_parents_rollback_says_rolled_back_by_the_parent_with_the_versions() {
    let (lab, parent) = published_parent(5);
    let server = Server::start(&parent);
    let child = Home::new();
    chain_config(&child, &server.base, &parent_key(&parent), "");
    sync_publish(&child);
    lab.upstream.set_version(6).unwrap();
    sync_publish(&parent);
    let update = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(update["products"][0]["result"], "updated");

    Pm::mirror(&parent)
        .args(["rollback", "--generation", "1"])
        .json();
    let expected = "rolled back by the parent: its dist went back to r1 (manifest serial 2 -> 1): \
                    clamav/test 6 -> 5";
    let dry = Pm::mirror(&child).args(["--dry-run", "sync"]).json();
    assert_eq!(dry["products"][0]["result"], "would_update");
    assert_eq!(dry["products"][0]["warnings"], json!([expected]));

    let text = Pm::mirror(&child).args(["sync"]).run();
    assert_eq!(text.code(), 0, "{}", text.stderr());
    let table_row = text
        .stdout()
        .lines()
        .find(|line| line.contains("clamav/test"))
        .unwrap_or_default()
        .split('|')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("|");
    assert!(
        table_row.starts_with("|site|clamav/test|5|6|5|rolled back by the parent|"),
        "{}",
        text.stdout()
    );
    assert!(
        text.stdout().contains(&format!("site: {expected}")),
        "{}",
        text.stdout()
    );
    assert_eq!(
        crate::support::sql(
            &child,
            "SELECT result, versions FROM mirror_syncs ORDER BY id DESC LIMIT 1"
        ),
        ["rolled_back_by_parent,clamav/test=5"]
    );
    assert_eq!(status_warnings(&child, "site"), [expected]);
    assert_eq!(
        std::fs::read(child.repo("latest/clamav/test.cvd")).unwrap(),
        std::fs::read(testdb().join("test-5.cvd")).unwrap()
    );

    // The parent publishes its latest again: the child moves up and calls it an update.
    Pm::mirror(&parent).args(["publish", "--again"]).json();
    let again = Pm::mirror(&child).args(["sync"]).json();
    let product = &again["products"][0];
    assert_eq!(product["result"], "updated");
    assert_eq!(product["components"][0]["previous_version"], "5");
    assert_eq!(product["components"][0]["version"], "6");
    assert_eq!(product["warnings"], json!(null));
}

/// A relay in front of a parent's `pm-mirror serve` that, on the first file request after each
/// request for the manifest, runs the next of `switches` (a publish or rollback on the parent)
/// before it forwards the request: the parent switches dist between the child's manifest and
/// its files.
fn switching_parent(lab: &Lab, base: String, switches: Vec<Vec<String>>, parent: &Home) -> String {
    use axum::extract::Request;
    use axum::response::IntoResponse;
    let switches = Arc::new(Mutex::new(std::collections::VecDeque::from(switches)));
    let armed = Arc::new(Mutex::new(false));
    let parent_home = parent.path().to_path_buf();
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |request: Request| {
        let (switches, armed, parent_home) = (switches.clone(), armed.clone(), parent_home.clone());
        let (client, base) = (client.clone(), base.clone());
        async move {
            let path = request.uri().path().to_string();
            let switch = {
                let mut armed = armed.lock().unwrap();
                if path == "/manifest.json" {
                    *armed = true;
                    None
                } else if path != "/manifest.sig" && *armed {
                    *armed = false;
                    switches.lock().unwrap().pop_front()
                } else {
                    None
                }
            };
            if let Some(args) = switch {
                let status = tokio::task::spawn_blocking(move || {
                    Pm::new("pm-mirror")
                        .args(["--home".into(), parent_home.display().to_string()])
                        .args(args)
                        .command()
                        .stdout(std::process::Stdio::null())
                        .status()
                        .unwrap()
                })
                .await
                .unwrap();
                assert!(status.success());
            }
            let mut forwarded = client.get(format!("{base}{path}"));
            for name in ["if-none-match", "if-modified-since", "range"] {
                if let Some(value) = request.headers().get(name) {
                    forwarded = forwarded.header(name, value.clone());
                }
            }
            let answer = forwarded.send().await.unwrap();
            let status = answer.status();
            let mut headers = axum::http::HeaderMap::new();
            for name in ["etag", "last-modified", "content-range"] {
                if let Some(value) = answer.headers().get(name) {
                    headers.insert(name, value.clone());
                }
            }
            let body = answer.bytes().await.unwrap();
            (status, headers, body).into_response()
        }
    });
    serve_on_lab(lab, app)
}

/// A parent at version 3 (published), then 5 and 6 (each synced and published), with its serve.
fn parent_published_3_5_6() -> (Lab, Home, Server) {
    let (lab, parent) = published_parent(3);
    for version in [5, 6] {
        lab.upstream.set_version(version).unwrap();
        sync_publish(&parent);
    }
    let server = Server::start(&parent);
    (lab, parent, server)
}

/// Issue 17: a child sync during which the parent switched dist failed with "not found upstream
/// (HTTP 404)". The child sees that the parent's manifest changed and starts over once from the
/// new one; a parent that switches again fails the sync saying what happened, latest untouched.
#[test]
fn a_parent_switching_dist_during_a_child_sync_is_followed_once_and_said_when_it_switches_again() {
    let rollback = || vec!["rollback".to_string(), "--generation".into(), "1".into()];
    let publish_again = || vec!["publish".to_string(), "--again".into()];

    // One switch (a rollback to 5 while the child fetches 6's files): followed.
    let (lab, parent, server) = parent_published_3_5_6();
    let child = Home::new();
    let relay = switching_parent(&lab, server.base.clone(), vec![rollback()], &parent);
    chain_config(&child, &relay, &parent_key(&parent), "");
    let run = Pm::mirror(&child).args(["--json", "sync"]).run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let product = &run.json()["products"][0];
    assert_eq!(product["result"], "updated");
    assert_eq!(product["components"][0]["version"], "5");
    assert_eq!(
        product["warnings"],
        json!([
            "the parent published or rolled back while this sync ran; this sync followed its new dist"
        ])
    );
    assert_eq!(
        file_list(&manifest(&child, "latest")),
        file_list(&manifest(&parent, "dist"))
    );
    drop(server);
    drop(lab);

    // Two switches (a rollback, then the rolled-back revision published again): said, and
    // nothing staged; the next sync goes through.
    let (lab, parent, server) = parent_published_3_5_6();
    let child = Home::new();
    let relay = switching_parent(
        &lab,
        server.base.clone(),
        vec![rollback(), publish_again()],
        &parent,
    );
    chain_config(&child, &relay, &parent_key(&parent), "");
    let out = failed_sync(&child, None);
    assert!(
        out.contains(&format!(
            "site: the parent `{relay}` published or rolled back while this sync ran, twice ("
        )) && out.contains("); run sync again"),
        "{out}"
    );
    let run = Pm::mirror(&child).args(["--json", "sync"]).run();
    assert_eq!(
        run.code(),
        0,
        "the next sync goes through: {}",
        run.stderr()
    );
    assert_eq!(run.json()["products"][0]["components"][0]["version"], "6");
}

/// Issue 17: a child took a lower manifest serial for its parent's rollback, so an old dist of
/// the parent replayed on the way (manifest, signature and dist statement as the parent once
/// served them, all validly signed) was followed. The parent's signed dist statement tells the
/// two apart, as it does for agents: a real rollback signs a newer one.
#[test]
fn a_child_refuses_an_old_dist_of_its_parent_replayed_but_follows_a_real_rollback() {
    let (lab, parent) = published_parent(5);
    let server = Server::start(&parent);
    let child = Home::new();
    chain_config(&child, &server.base, &parent_key(&parent), "");
    sync_publish(&child);
    // What the parent served for r1, kept by whoever replays it later.
    let served = |name: &str| std::fs::read(parent.path().join("repo/view").join(name)).unwrap();
    let old_statement = [
        ("dist.json", served("dist.json")),
        ("dist.sig", served("dist.sig")),
    ];
    lab.upstream.set_version(6).unwrap();
    sync_publish(&parent);
    Pm::mirror(&child).args(["sync"]).json();
    let followed = manifest(&child, "latest").revision;

    let view = std::fs::canonicalize(parent.path().join("repo/view")).unwrap();
    for (name, bytes) in &old_statement {
        std::fs::write(view.join(name), bytes).unwrap();
    }
    std::fs::remove_file(view.join("dist")).unwrap();
    std::os::unix::fs::symlink("../../revisions/r1", view.join("dist")).unwrap();
    let replayed = Pm::mirror(&child).args(["sync"]).run();
    assert_eq!(replayed.code(), 1, "{}", replayed.stdout());
    assert!(
        replayed
            .stderr()
            .contains("an old dist of the parent is being replayed"),
        "{}",
        replayed.stderr()
    );
    assert_eq!(manifest(&child, "latest").revision, followed);

    // The parent's own rollback signs a newer statement: followed, and said so.
    Pm::mirror(&parent)
        .args(["rollback", "--generation", "1"])
        .json();
    let rolled_back = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(
        rolled_back["products"][0]["result"], "rolled_back_by_parent",
        "{rolled_back}"
    );
}
