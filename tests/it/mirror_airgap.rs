//! Closed networks: `export` on a connected mirror, `import` on one that cannot reach upstream,
//! every rejection the reader promises (with the offline mirror byte-for-byte unchanged), and
//! a real freshclam updating from the imported data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Home, Lab, Pm, manifest, testdb};

/// A connected mirror synced from the lab, whose public key the offline mirror trusts.
pub(crate) struct Sites {
    pub(crate) lab: Lab,
    pub(crate) online: Home,
    pub(crate) offline: Home,
    pub(crate) work: tempfile::TempDir,
}

impl Sites {
    pub(crate) fn new(version: u32) -> Sites {
        let lab = Lab::start(version);
        let online = Home::new();
        online.clamav_config(&lab, "");
        Pm::mirror(&online).args(["sync"]).json();
        let offline = Home::new();
        // The closed side mirrors nothing itself: its data only arrives in bundles.
        offline.config("[retention]\narchives = 5\n");
        let sites = Sites {
            lab,
            online,
            offline,
            work: tempfile::tempdir().unwrap(),
        };
        assert_eq!(sites.trust_online_key()["changed"], true);
        sites
    }

    /// The online mirror's public key carried across and added to the offline trust store.
    pub(crate) fn trust_online_key(&self) -> serde_json::Value {
        let key = self.work.path().join("online.pem");
        Pm::mirror(&self.online)
            .args(["key", "export-public", "--out"])
            .arg_path(&key)
            .json();
        Pm::mirror(&self.offline)
            .args(["trust", "add"])
            .arg_path(&key)
            .json()
    }

    /// Another closed site that trusts what the offline mirror trusts now, and holds nothing.
    pub(crate) fn another_closed_site(&self) -> Home {
        let closed = Home::new();
        closed.config("");
        std::fs::create_dir_all(closed.path().join("trust")).unwrap();
        for entry in std::fs::read_dir(self.offline.path().join("trust")).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(
                    entry.path(),
                    closed.path().join("trust").join(entry.file_name()),
                )
                .unwrap();
            }
        }
        closed
    }

    pub(crate) fn bundle_path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    pub(crate) fn export(&self, name: &str, since: Option<&str>) -> serde_json::Value {
        let out = self.bundle_path(name);
        let mut pm = Pm::mirror(&self.online)
            .args(["export", "--out"])
            .arg_path(&out);
        if let Some(since) = since {
            pm = pm.args(["--since", since]);
        }
        pm.json()
    }

    pub(crate) fn import(&self, name: &str) -> crate::support::Run {
        Pm::mirror(&self.offline)
            .args(["import", "--json"])
            .arg_path(&self.bundle_path(name))
            .run()
    }
}

#[test]
fn an_offline_mirror_imports_a_bundle_publishes_it_and_freshclam_updates_from_it() {
    let sites = Sites::new(6);
    let export = sites.export("full.tar", None);
    assert_eq!(export["revision"], "r1");
    let sha256 = export["sha256"].as_str().unwrap().to_string();
    let bytes = std::fs::read(sites.bundle_path("full.tar")).unwrap();
    assert_eq!(
        pm::manifest::hex(&openssl::sha::sha256(&bytes)),
        sha256,
        "the printed sha256 is the file's"
    );

    // The offline mirror has no route to the lab: its pm.toml names no upstream at all.
    let run = sites.import("full.tar");
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let report = run.json();
    assert_eq!(
        (report["changed"].clone(), report["sha256"].clone()),
        (true.into(), sha256.clone().into())
    );
    let online = manifest(&sites.online, "latest");
    let offline = manifest(&sites.offline, "latest");
    assert_eq!(offline.content_sha256, online.content_sha256);
    assert_eq!(offline.files, online.files);
    assert_eq!(offline.products, online.products);
    assert_eq!(offline.source, "bundle");

    // Importing the same bundle again changes nothing.
    let again = sites.import("full.tar");
    assert_eq!(
        (again.code(), again.json()["changed"].clone()),
        (0, false.into())
    );

    // The import is in the inventory like a sync, with the bundle's sha256.
    let inventory =
        pm::inventory::Inventory::open_read_only(sites.offline.path(), Duration::from_secs(5))
            .unwrap()
            .unwrap();
    let rows = inventory
        .query_strings("SELECT source || ',' || result || ',' || versions || ',' || bundle_sha256 FROM mirror_syncs ORDER BY id")
        .unwrap();
    assert_eq!(rows[0], format!("bundle,updated,test=6,{sha256}"));
    assert_eq!(rows[1], format!("bundle,unchanged,test=6,{sha256}"));
    drop(inventory);

    // status shows when the last bundle came and how old the newest data is.
    let status = Pm::mirror(&sites.offline).args(["status"]).json();
    assert_eq!(status["last_import"]["bundle_sha256"], sha256.as_str());
    assert_eq!(status["newest_build_time"], "2021-06-23T01:34:05Z");
    assert!(status["newest_data_age_seconds"].as_i64().unwrap() > 365 * 86400);
    let text = Pm::mirror(&sites.offline).args(["status"]).run().stdout();
    assert!(
        text.contains("last bundle import") && text.contains("newest data built 2021-06-23"),
        "{text}"
    );

    // Publish and serve on the closed side; a stock freshclam updates test-1 -> test-6 from it.
    Pm::mirror(&sites.offline).args(["publish"]).json();
    let server = crate::support::Server::start(&sites.offline);
    crate::support::freshclam_updates_test_1_to_6(&server.base, "DatabaseMirror", "test.cld");
    drop(sites.lab);
}

#[test]
fn an_incremental_bundle_carries_only_what_changed_since_an_imported_revision() {
    let sites = Sites::new(3);
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);

    sites.lab.upstream.set_version(6).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    let full = sites.export("r2-full.tar", None);
    let incremental = sites.export("r2-since-r1.tar", Some("r1"));
    assert!(incremental["files"].as_u64().unwrap() < full["files"].as_u64().unwrap());
    assert!(incremental["size"].as_u64().unwrap() < full["size"].as_u64().unwrap());

    let run = sites.import("r2-since-r1.tar");
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(
        manifest(&sites.offline, "latest").content_sha256,
        manifest(&sites.online, "latest").content_sha256
    );
    let cvd = std::fs::read(sites.offline.repo("latest/clamav/test.cvd")).unwrap();
    assert_eq!(cvd, std::fs::read(testdb().join("test-6.cvd")).unwrap());

    // A mirror that never imported the base cannot use an incremental bundle.
    let fresh = sites.another_closed_site();
    let refused = Pm::mirror(&fresh)
        .args(["import"])
        .args([sites.bundle_path("r2-since-r1.tar")])
        .run();
    assert_eq!(refused.code(), 1);
    assert!(
        refused.stderr().contains("only what changed since"),
        "{}",
        refused.stderr()
    );
}

/// Every file and symlink under `dir`, with contents, for byte-for-byte comparisons.
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            let relative = path.strip_prefix(dir).unwrap().to_path_buf();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                files.insert(relative, format!("-> {}", target.display()).into_bytes());
            } else if kind.is_dir() {
                files.insert(relative, b"<dir>".to_vec());
                stack.push(path);
            } else {
                files.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// A tar member written byte by byte, so a test can make what `tar::Builder` refuses to.
pub(crate) struct Member {
    pub(crate) name: Vec<u8>,
    pub(crate) kind: u8,
    pub(crate) data: Vec<u8>,
    pub(crate) link: Vec<u8>,
}

pub(crate) fn member(name: &str, data: &[u8]) -> Member {
    Member {
        name: name.as_bytes().to_vec(),
        kind: b'0',
        data: data.to_vec(),
        link: Vec::new(),
    }
}

pub(crate) fn raw_tar(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for member in members {
        let mut header = [0u8; 512];
        header[..member.name.len()].copy_from_slice(&member.name);
        header[100..107].copy_from_slice(b"0000644");
        header[108..115].copy_from_slice(b"0000000");
        header[116..123].copy_from_slice(b"0000000");
        header[124..135].copy_from_slice(format!("{:011o}", member.data.len()).as_bytes());
        header[136..147].copy_from_slice(b"00000000000");
        header[156] = member.kind;
        header[157..157 + member.link.len()].copy_from_slice(&member.link);
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].copy_from_slice(b"        ");
        let checksum: u32 = header.iter().map(|b| *b as u32).sum();
        header[148..155].copy_from_slice(format!("{checksum:06o}\0").as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&member.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// The four leading members of a bundle of `online`'s latest, signed with `key`, carrying
/// `included` (all files when `None`).
pub(crate) fn signed_preamble(
    online: &Home,
    key: &pm::pki::SigningKey,
) -> (Vec<Member>, pm::manifest::Manifest) {
    let dir = online.repo("latest");
    let manifest_bytes = std::fs::read(dir.join("manifest.json")).unwrap();
    let manifest: pm::manifest::Manifest = serde_json::from_slice(&manifest_bytes).unwrap();
    let header = pm::bundle::BundleHeader {
        format: pm::bundle::BUNDLE_FORMAT,
        created_at: chrono::Utc::now(),
        exporter: key.fingerprint().unwrap(),
        revision: manifest.revision.clone(),
        content_sha256: manifest.content_sha256.clone(),
        manifest_sha256: pm::manifest::hex(&openssl::sha::sha256(&manifest_bytes)),
        base: None,
        included: manifest.files.iter().map(|f| f.path.clone()).collect(),
        keys_sha256: None,
    };
    let header_bytes = serde_json::to_vec(&header).unwrap();
    let members = vec![
        member("bundle.json", &header_bytes),
        member("bundle.sig", &key.sign(&header_bytes).unwrap()),
        member("manifest.json", &manifest_bytes),
        member(
            "manifest.sig",
            &std::fs::read(dir.join("manifest.sig")).unwrap(),
        ),
    ];
    (members, manifest)
}

/// The file members of a correct bundle of `online`'s latest.
pub(crate) fn file_members(online: &Home, manifest: &pm::manifest::Manifest) -> Vec<Member> {
    manifest
        .files
        .iter()
        .map(|f| {
            member(
                &format!("files/{}", f.path),
                &std::fs::read(online.repo("latest").join(&f.path)).unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_bad_bundle_is_rejected_and_the_offline_mirror_stays_byte_for_byte_the_same() {
    let sites = Sites::new(3);
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    sites.lab.upstream.set_version(6).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    let good = sites.export("r2.tar", None);

    let online_key = pm::pki::SigningKey::load_or_create(sites.online.path()).unwrap();
    let stranger_home = tempfile::tempdir().unwrap();
    let stranger_key = pm::pki::SigningKey::load_or_create(stranger_home.path()).unwrap();
    let (preamble, latest) = signed_preamble(&sites.online, &online_key);
    let files = file_members(&sites.online, &latest);
    let with = |extra: Vec<Member>, skip_files: &[&str]| -> Vec<u8> {
        let (mut members, _) = signed_preamble(&sites.online, &online_key);
        members.extend(
            file_members(&sites.online, &latest)
                .into_iter()
                .filter(|m| {
                    !skip_files
                        .iter()
                        .any(|s| m.name == format!("files/{s}").as_bytes())
                }),
        );
        members.extend(extra);
        raw_tar(&members)
    };
    let link = |name: &str, kind: u8, target: &str| Member {
        name: name.as_bytes().to_vec(),
        kind,
        data: Vec::new(),
        link: target.as_bytes().to_vec(),
    };
    let good_bytes = std::fs::read(sites.bundle_path("r2.tar")).unwrap();
    let mut tampered = files
        .iter()
        .map(|m| Member {
            name: m.name.clone(),
            kind: m.kind,
            data: m.data.clone(),
            link: Vec::new(),
        })
        .collect::<Vec<_>>();
    let last = tampered.last_mut().unwrap();
    let at = last.data.len() / 2;
    last.data[at] ^= 1;
    let mut tampered_bundle = preamble;
    tampered_bundle.extend(tampered);
    let stranger_bundle = {
        let (mut members, _) = signed_preamble(&sites.online, &stranger_key);
        members.extend(file_members(&sites.online, &latest));
        raw_tar(&members)
    };
    let cases: Vec<(&str, Vec<u8>, &str, &[&str])> = vec![
        (
            "traversal",
            with(vec![member("files/../../../../tmp/pm-escape", b"x")], &[]),
            "path traversal",
            &[],
        ),
        (
            "absolute",
            with(vec![member("/tmp/pm-escape", b"x")], &[]),
            "absolute paths are not allowed",
            &[],
        ),
        (
            "symlink",
            with(
                vec![link("files/clamav/test.cvd", b'2', "/etc/passwd")],
                &["clamav/test.cvd"],
            ),
            "links are not allowed",
            &[],
        ),
        (
            "hardlink",
            with(
                vec![link("files/clamav/test.cvd", b'1', "bundle.json")],
                &["clamav/test.cvd"],
            ),
            "links are not allowed",
            &[],
        ),
        (
            "device",
            with(
                vec![link("files/clamav/test.cvd", b'3', "")],
                &["clamav/test.cvd"],
            ),
            "device files are not allowed",
            &[],
        ),
        (
            "fifo",
            with(
                vec![link("files/clamav/test.cvd", b'6', "")],
                &["clamav/test.cvd"],
            ),
            "device files are not allowed",
            &[],
        ),
        (
            "duplicate",
            with(
                vec![member(
                    "files/clamav/test.cvd",
                    &std::fs::read(sites.online.repo("latest/clamav/test.cvd")).unwrap(),
                )],
                &[],
            ),
            "appears twice",
            &[],
        ),
        (
            "unlisted",
            with(
                vec![member("files/clamav/extra.ndb", b"not in the manifest")],
                &[],
            ),
            "not listed in the manifest",
            &[],
        ),
        (
            "missing",
            with(Vec::new(), &["clamav/test.cvd"]),
            "truncated",
            &[],
        ),
        (
            "truncated",
            good_bytes[..good_bytes.len() / 2].to_vec(),
            "truncated",
            &[],
        ),
        (
            "oversized",
            good_bytes.clone(),
            "larger than the limit",
            &["--max-size", "20K"],
        ),
        ("untrusted", stranger_bundle, "does not trust", &[]),
        (
            "tampered",
            raw_tar(&tampered_bundle),
            "does not match the manifest",
            &[],
        ),
        (
            "garbage",
            b"this is not a tar file at all".repeat(40),
            "rejected",
            &[],
        ),
    ];
    assert!(good["files"].as_u64().unwrap() > 0);

    let before = snapshot(sites.offline.path());
    for (name, bytes, expected, extra_args) in cases {
        let path = sites.bundle_path(&format!("{name}.tar"));
        std::fs::write(&path, &bytes).unwrap();
        let run = Pm::mirror(&sites.offline)
            .args(["import"])
            .args([&path])
            .args(extra_args)
            .run();
        assert_eq!(run.code(), 1, "{name}: {}", run.stderr());
        assert!(
            run.stderr().contains(expected),
            "{name}: `{expected}` not in {}",
            run.stderr()
        );
        assert!(
            run.stderr().contains("nothing was changed") || run.stderr().contains("hint:"),
            "{name}"
        );
        assert_eq!(
            snapshot(sites.offline.path()),
            before,
            "{name} changed the offline mirror"
        );
        assert!(
            !Path::new("/tmp/pm-escape").exists(),
            "{name} wrote outside the staging directory"
        );
    }

    // The good bundle still imports after all that.
    let run = sites.import("r2.tar");
    assert_eq!(run.code(), 0, "{}", run.stderr());
}

#[test]
fn an_older_bundle_does_not_replace_a_newer_latest_unless_allowed() {
    let sites = Sites::new(3);
    sites.export("v3.tar", None);
    sites.lab.upstream.set_version(6).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    sites.export("v6.tar", None);
    assert_eq!(sites.import("v6.tar").code(), 0);

    let before = snapshot(sites.offline.path());
    let refused = Pm::mirror(&sites.offline)
        .args(["import"])
        .args([sites.bundle_path("v3.tar")])
        .run();
    assert_eq!(refused.code(), 1);
    assert!(
        refused.stderr().contains("--allow-downgrade"),
        "{}",
        refused.stderr()
    );
    assert_eq!(snapshot(sites.offline.path()), before);

    let allowed = Pm::mirror(&sites.offline)
        .args(["import", "--allow-downgrade", "--json"])
        .args([sites.bundle_path("v3.tar")])
        .run();
    assert_eq!(allowed.code(), 0, "{}", allowed.stderr());
    let cvd = std::fs::read(sites.offline.repo("latest/clamav/test.cvd")).unwrap();
    assert_eq!(cvd, std::fs::read(testdb().join("test-3.cvd")).unwrap());
}

#[test]
fn trust_lists_and_removes_keys_and_refuses_non_keys() {
    let sites = Sites::new(3);
    let list = Pm::mirror(&sites.offline).args(["trust", "list"]).json();
    let fingerprint = list["keys"][0]["fingerprint"].as_str().unwrap().to_string();
    assert!(fingerprint.starts_with("sha256:"));
    let not_a_key = sites.work.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello").unwrap();
    let refused = Pm::mirror(&sites.offline)
        .args(["trust", "add"])
        .args([&not_a_key])
        .run();
    assert_eq!(refused.code(), 2, "{}", refused.stderr());

    let removed = Pm::mirror(&sites.offline)
        .args(["trust", "remove", &fingerprint[7..20]])
        .json();
    assert_eq!(removed["fingerprint"], fingerprint.as_str());
    sites.export("r1.tar", None);
    let untrusted = sites.import("r1.tar");
    assert_eq!(untrusted.code(), 1);
    assert!(
        untrusted.stderr().contains("trusts no exporter key"),
        "{}",
        untrusted.stderr()
    );
}

#[test]
fn a_replayed_older_bundle_is_refused_even_without_numeric_versions() {
    // Regression (review finding): `files` versions like 2026.1 are not numbers, so the
    // exporter's serial is what tells an older bundle apart.
    let lab = Lab::start(3);
    let feed = tempfile::tempdir().unwrap();
    crate::support::write_feed(feed.path(), "one", 2);
    lab.upstream.set_feed(feed.path(), "2026.1").unwrap();
    let online = Home::new();
    online.config(&format!(
        "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n",
        lab.url("/vendor/index.json")
    ));
    Pm::mirror(&online).args(["sync"]).json();
    let work = tempfile::tempdir().unwrap();
    let old = work.path().join("old.tar");
    let new = work.path().join("new.tar");
    Pm::mirror(&online)
        .args(["export", "--out"])
        .arg_path(&old)
        .json();
    crate::support::write_feed(feed.path(), "two", 2);
    lab.upstream.set_feed(feed.path(), "2026.2").unwrap();
    Pm::mirror(&online).args(["sync"]).json();
    Pm::mirror(&online)
        .args(["export", "--out"])
        .arg_path(&new)
        .json();

    let offline = Home::new();
    offline.config("");
    let key = work.path().join("online.pem");
    Pm::mirror(&online)
        .args(["key", "export-public", "--out"])
        .arg_path(&key)
        .json();
    Pm::mirror(&offline)
        .args(["trust", "add"])
        .arg_path(&key)
        .json();
    assert_eq!(
        Pm::mirror(&offline)
            .args(["import"])
            .arg_path(&new)
            .run()
            .code(),
        0
    );
    let replay = Pm::mirror(&offline).args(["import"]).arg_path(&old).run();
    assert_eq!(replay.code(), 1);
    assert!(
        replay.stderr().contains("older than serial 2"),
        "{}",
        replay.stderr()
    );
    let allowed = Pm::mirror(&offline)
        .args(["import", "--allow-downgrade"])
        .arg_path(&old)
        .run();
    assert_eq!(allowed.code(), 0, "{}", allowed.stderr());
    let version = manifest(&offline, "latest")
        .product("vendor")
        .unwrap()
        .version
        .clone();
    assert_eq!(version.as_deref(), Some("2026.1"));
}

/// Issue 16: a closed site's sync exited 2 (no products), the unit's `ExecStartPost=` publish
/// was skipped, and dist's statement expired a week later. Its sync has nothing to do, and the
/// unit runs publish however sync ended (the systemd box of the Ansible test runs the unit).
#[test]
fn a_closed_sites_sync_timer_has_nothing_to_sync_and_its_publish_keeps_dist_signed() {
    let sites = Sites::new(3);
    sites.offline.config("[serve]\ndist_valid_for = \"7s\"\n");
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    Pm::mirror(&sites.offline).args(["publish"]).json();
    // A seventh of the validity passes: the next publish is due to re-sign.
    std::thread::sleep(Duration::from_millis(1100));

    let sync = Pm::mirror(&sites.offline).args(["-q", "sync"]).run();
    assert_eq!(sync.code(), 0, "{}", sync.stderr());
    assert_eq!(
        (sync.stdout(), sync.stderr()),
        (String::new(), String::new())
    );
    let report = Pm::mirror(&sites.offline).args(["sync"]).json();
    assert_eq!(
        (&report["changed"], &report["revision"]),
        (&false.into(), &"r1".into())
    );
    let publish = Pm::mirror(&sites.offline).args(["publish"]).json();
    assert_eq!(publish["re_signed"], true, "{publish}");

    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/pm-mirror-sync.service"),
    )
    .unwrap();
    let lines: Vec<&str> = unit.lines().filter(|l| l.starts_with("Exec")).collect();
    assert_eq!(
        lines,
        [
            "ExecStart=/usr/local/bin/pm-mirror -q sync",
            "ExecStopPost=/usr/local/bin/pm-mirror -q publish"
        ],
        "systemd skips ExecStartPost= after a failed ExecStart="
    );

    // Before anything was imported there is nothing to publish either: a usage error.
    let empty = Home::new();
    empty.config("[retention]\narchives = 5\n");
    let run = Pm::mirror(&empty).args(["sync"]).run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("pm-mirror import FILE"),
        "{}",
        run.stderr()
    );
}

/// Runs `pm` for at most 15 s (`-1`: killed then): a test of what used to block for ever fails
/// instead of hanging the suite.
fn run_bounded(pm: Pm) -> crate::bad_input::Outcome {
    crate::bad_input::run_limited(pm.command(), Duration::from_secs(15))
}

/// Issue 17: `import` of a FIFO blocked for ever waiting for a writer. Anything but a regular
/// file (FIFO, socket, directory, device) is refused at once, the mirror unchanged, while a
/// symlink to a bundle file imports; `trust add` and `--out` of `export` and `key
/// export-public` refuse the same.
#[test]
fn importing_a_fifo_socket_directory_or_device_is_refused_at_once_and_changes_nothing() {
    let sites = Sites::new(3);
    sites.export("pm-r1.tar", None);
    let fifo = sites.bundle_path("bundle.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let socket = sites.bundle_path("bundle.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let directory = sites.bundle_path("bundle.d");
    std::fs::create_dir(&directory).unwrap();
    let before = snapshot(sites.offline.path());
    let cases: [(&Path, &str); 4] = [
        (&fifo, "a FIFO (named pipe)"),
        (&socket, "a socket"),
        (&directory, "a directory"),
        (Path::new("/dev/zero"), "a character device"),
    ];
    for (path, kind) in cases {
        let started = std::time::Instant::now();
        let output = run_bounded(
            Pm::mirror(&sites.offline)
                .args(["import", "--json"])
                .arg_path(path),
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{kind}");
        assert_eq!(output.code, 2, "{kind}: {}", output.stderr);
        let report: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
        assert_eq!(
            report["error"],
            format!(
                "cannot import `{}`: it is {kind}, not a regular file",
                path.display()
            )
        );
        assert!(
            report["hint"]
                .as_str()
                .unwrap()
                .contains("copy it to a file first"),
            "{report}"
        );
        assert_eq!(snapshot(sites.offline.path()), before, "{kind}");
    }
    for args in [&["trust", "add"][..], &["key", "export-public", "--out"]] {
        let output = run_bounded(Pm::mirror(&sites.offline).args(args).arg_path(&fifo));
        assert_eq!(output.code, 2, "{args:?}");
        assert!(
            output
                .stderr
                .contains("a FIFO (named pipe), not a regular file"),
            "{args:?}: {}",
            output.stderr
        );
    }
    let output = run_bounded(
        Pm::mirror(&sites.online)
            .args(["export", "--out"])
            .arg_path(&fifo),
    );
    assert_eq!(output.code, 2, "{}", output.stderr);
    let fifo_kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(
        std::os::unix::fs::FileTypeExt::is_fifo(&fifo_kind),
        "export must not replace the FIFO"
    );
    assert_eq!(snapshot(sites.offline.path()), before);

    // The home's own pm.toml: a FIFO there would hang every tool and the sync timer.
    let piped = Home::new();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(piped.path().join("pm.toml"))
            .status()
            .unwrap()
            .success()
    );
    let output = run_bounded(Pm::mirror(&piped).args(["sync"]));
    assert_eq!(output.code, 2, "{}", output.stderr);
    assert!(
        output
            .stderr
            .contains("pm.toml`: it is a FIFO (named pipe), not a regular file"),
        "{}",
        output.stderr
    );

    // A symlink to a bundle file is a regular file for this purpose.
    let link = sites.bundle_path("latest.tar");
    std::os::unix::fs::symlink(sites.bundle_path("pm-r1.tar"), &link).unwrap();
    let imported = Pm::mirror(&sites.offline)
        .args(["import", "--json"])
        .arg_path(&link)
        .run();
    assert_eq!(imported.code(), 0, "{}", imported.stderr());
    assert_eq!(imported.json()["changed"], true);
}

/// Red team: a closed site refused a bundle from an exporter that had removed a product as "an
/// older bundle?", so the operator had to pass --allow-downgrade (which also lets real
/// downgrades in), and its publish's hint spoke of pm.toml products a closed home has none of.
#[test]
fn a_closed_site_takes_a_newer_bundle_without_a_product_and_publishes_it_with_allow_removal() {
    let lab = Lab::start(5);
    let feed = tempfile::tempdir().unwrap();
    crate::support::write_feed(feed.path(), "v1", 3);
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    let online = Home::new();
    online.clamav_and_feed_config(&lab);
    Pm::mirror(&online).args(["sync"]).json();
    Pm::mirror(&online).args(["publish"]).json();
    let offline = Home::new();
    offline.config("");
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("online.pem");
    Pm::mirror(&online)
        .args(["key", "export-public", "--out"])
        .arg_path(&key)
        .json();
    Pm::mirror(&offline)
        .args(["trust", "add"])
        .arg_path(&key)
        .json();
    let bundle = |name: &str| {
        let path = work.path().join(name);
        Pm::mirror(&online)
            .args(["export", "--out"])
            .arg_path(&path)
            .json();
        path
    };
    let first = bundle("both.tar");
    Pm::mirror(&offline)
        .args(["import"])
        .arg_path(&first)
        .json();
    Pm::mirror(&offline).args(["publish"]).json();

    online.clamav_config(&lab, "");
    Pm::mirror(&online).args(["sync"]).json();
    Pm::mirror(&online)
        .args(["publish", "--allow-removal"])
        .json();
    let second = bundle("clamav-only.tar");
    let imported = Pm::mirror(&offline)
        .args(["import"])
        .arg_path(&second)
        .run();
    assert_eq!(imported.code(), 0, "{}", imported.stderr());
    let refused = Pm::mirror(&offline).args(["publish"]).run();
    assert_eq!(refused.code(), 2, "{}", refused.stdout());
    assert!(
        refused
            .stderr()
            .contains("the last imported bundle no longer carries it"),
        "{}",
        refused.stderr()
    );
    let published = Pm::mirror(&offline)
        .args(["publish", "--allow-removal"])
        .json();
    assert_eq!(published["changed"], true, "{published}");
}
