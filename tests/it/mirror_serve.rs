//! `pm-mirror serve` over a real port: HTTP semantics, the signed manifest, backups, and a real
//! `freshclam` updating from it, then a real `clamscan` finding the EICAR test file.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use reqwest::header;

use crate::support::{Home, Lab, Pm, testdb};

/// A running `pm-mirror serve`, stopped on drop.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(home: &Home) -> Server {
        let mut child = Pm::mirror(home)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .command()
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let base = loop {
            let line = lines.next().expect("serve printed its address").unwrap();
            if let Some(at) = line.find("on http://") {
                break line[at + 3..].trim_end_matches('/').to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, base }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish_version(lab: &Lab, home: &Home, version: u32) {
    lab.upstream.set_version(version).unwrap();
    Pm::mirror(home).args(["sync"]).json();
    Pm::mirror(home).args(["publish"]).json();
}

#[test]
fn serve_answers_with_etag_last_modified_ranges_head_and_404() {
    let lab = Lab::start(5);
    let home = Home::new();
    home.clamav_config(&lab, "");
    publish_version(&lab, &home, 5);
    publish_version(&lab, &home, 6);
    let server = Server::start(&home);
    let client = reqwest::Client::new();
    let get = |path: &str, headers: &[(header::HeaderName, String)]| {
        let mut request = client.get(format!("{}{path}", server.base));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        lab.runtime.block_on(async {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            (status, headers, response.bytes().await.unwrap().to_vec())
        })
    };

    let cvd6 = std::fs::read(testdb().join("test-6.cvd")).unwrap();
    let (status, headers, body) = get("/clamav/test.cvd", &[]);
    assert_eq!((status, body.len()), (200, cvd6.len()));
    assert_eq!(body, cvd6);
    // Last-Modified is the CVD's own build time (stime 1624412045), which freshclam compares
    // with If-Modified-Since.
    assert_eq!(
        headers[header::LAST_MODIFIED],
        "Wed, 23 Jun 2021 01:34:05 GMT"
    );
    assert_eq!(headers[header::ACCEPT_RANGES], "bytes");
    let etag = headers[header::ETAG].to_str().unwrap().to_string();

    assert_eq!(
        get("/clamav/test.cvd", &[(header::IF_NONE_MATCH, etag.clone())]).0,
        304
    );
    let same = "Wed, 23 Jun 2021 01:34:05 GMT".to_string();
    assert_eq!(
        get("/clamav/test.cvd", &[(header::IF_MODIFIED_SINCE, same)]).0,
        304
    );
    let older = "Wed, 23 Jun 2021 01:34:04 GMT".to_string();
    assert_eq!(
        get("/clamav/test.cvd", &[(header::IF_MODIFIED_SINCE, older)]).0,
        200
    );

    let (status, headers, body) = get("/clamav/test.cvd", &[(header::RANGE, "bytes=0-511".into())]);
    assert_eq!((status, body.len()), (206, 512));
    assert_eq!(
        headers[header::CONTENT_RANGE],
        format!("bytes 0-511/{}", cvd6.len()).as_str()
    );
    assert_eq!(body, cvd6[..512]);

    let head = lab
        .runtime
        .block_on(
            client
                .head(format!("{}/clamav/test.cvd", server.base))
                .send(),
        )
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(
        head.headers()[header::CONTENT_LENGTH],
        cvd6.len().to_string().as_str()
    );

    for missing in [
        "/clamav/nothing.cvd",
        "/clamav/../pm.toml",
        "/backup/4/clamav/test.cvd",
        "/",
        "/.lock",
    ] {
        assert_eq!(get(missing, &[]).0, 404, "{missing}");
    }

    // Backups are served too: backup/1 is the previous dist with test.cvd version 5.
    let (status, _, body) = get("/backup/1/clamav/test.cvd", &[]);
    assert_eq!(
        (status, body),
        (200, std::fs::read(testdb().join("test-5.cvd")).unwrap())
    );

    // The manifest is signed with the manager's key; operators can check it with openssl.
    let (_, _, manifest) = get("/manifest.json", &[]);
    let (_, _, signature) = get("/manifest.sig", &[]);
    let public = std::fs::read(home.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE)).unwrap();
    let key = pm::pki::VerifyingKey::from_pem(&public).unwrap();
    assert!(key.verify(&manifest, &signature));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), &manifest).unwrap();
    std::fs::write(dir.path().join("manifest.sig"), &signature).unwrap();
    let openssl = Command::new("openssl")
        .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
        .arg(home.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE))
        .args(["-rawin", "-in"])
        .arg(dir.path().join("manifest.json"))
        .arg("-sigfile")
        .arg(dir.path().join("manifest.sig"))
        .output()
        .expect("openssl CLI");
    assert!(String::from_utf8_lossy(&openssl.stdout).contains("Signature Verified Successfully"));
}

const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn run(program: &str, args: &[&str]) -> (i32, String) {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!("`{program}` cannot run ({err}): apt-get install clamav clamav-freshclam")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

fn clamscan(db: &Path, file: &Path) -> (i32, String) {
    run(
        "clamscan",
        &[
            "--no-summary",
            "-d",
            db.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    )
}

/// A stock freshclam pointed at `pm-mirror serve` updates a database from test-1 to test-6; the
/// real clamscan then finds EICAR, which test-1 does not detect.
fn freshclam_updates_from_1_to_6(mirror_option: &str, expected_file: &str) {
    let lab = Lab::start(1);
    let home = Home::new();
    home.clamav_config(&lab, "");
    publish_version(&lab, &home, 1);
    let server = Server::start(&home);

    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("db");
    std::fs::create_dir(&db).unwrap();
    std::fs::write(
        db.join("test.cvd"),
        std::fs::read(testdb().join("test-1.cvd")).unwrap(),
    )
    .unwrap();
    let eicar = work.path().join("eicar.com");
    std::fs::write(&eicar, EICAR).unwrap();
    let (code, text) = clamscan(&db, &eicar);
    assert_eq!(code, 0, "test-1 does not detect EICAR yet: {text}");

    publish_version(&lab, &home, 6);
    let config = work.path().join("freshclam.conf");
    std::fs::write(
        &config,
        format!(
            "DatabaseDirectory {}\nDatabaseOwner root\n{mirror_option} {}/clamav\nScriptedUpdates yes\n\
             ExcludeDatabase daily\nExcludeDatabase main\nExcludeDatabase bytecode\nExtraDatabase test\n\
             Foreground yes\n",
            db.display(),
            server.base
        ),
    )
    .unwrap();
    let freshclam = [
        "--config-file",
        config.to_str().unwrap(),
        "--no-dns",
        "--stdout",
        "--no-warnings",
    ];
    let (code, text) = run("freshclam", &freshclam);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("{expected_file} updated (version: 6")),
        "{text}"
    );
    let (code, text) = clamscan(&db, &eicar);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("Eicar-Test-Signature FOUND"), "{text}");

    // Asking again is a cheap "up to date", never an error or a cool-down.
    let (code, text) = run("freshclam", &freshclam);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("is up-to-date (version: 6"), "{text}");
}

#[test]
fn freshclam_database_mirror_updates_incrementally_from_test_1_to_6() {
    // DatabaseMirror uses the cdiffs, so the result is a .cld.
    freshclam_updates_from_1_to_6("DatabaseMirror", "test.cld");
}

#[test]
fn freshclam_private_mirror_updates_from_test_1_to_6() {
    // PrivateMirror downloads the whole CVD.
    freshclam_updates_from_1_to_6("PrivateMirror", "test.cvd");
}
