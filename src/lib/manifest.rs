//! The signed description of a revision (DESIGN.md section 2): every file with its size, sha256,
//! product, component, version and build time. Agents and importers refuse anything that does not
//! match it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// File name of the manifest inside a revision.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the detached Ed25519 signature of `manifest.json`.
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// Product kind of pm-agent packages.
pub const AGENT_KIND: &str = "agent";

/// Component name of the pm-agent package for one platform: `pm-agent-x86_64-linux` (arch and
/// os as Rust's `std::env::consts`).
pub fn agent_component(arch: &str, os: &str) -> String {
    format!("pm-agent-{arch}-{os}")
}

/// Plain-text signature databases ClamAV loads from its database directory without a container
/// (`CLI_DBEXT` in libclamav/readdb.h minus the signed containers): how third-party feeds
/// (SaneSecurity, URLhaus, a site's own hashes) ship. Matched as a case-insensitive suffix.
pub(crate) const PLAIN_SIGNATURE_EXTENSIONS: &[&str] = &[
    ".hdb", ".hdu", ".hsb", ".hsu", ".mdb", ".mdu", ".msb", ".msu", ".ndb", ".ndu", ".ldb", ".ldu",
    ".cdb", ".idb", ".fp", ".sfp", ".ign", ".ign2", ".pdb", ".gdb", ".wdb", ".ftm", ".cbc", ".crb",
    ".cat", ".pwdb", ".yar", ".yara",
];

/// Whether ClamAV loads `name` of a product of `kind`: the signed `.cvd` databases of `clamav`
/// products (their cdiffs and `.sign` files are for freshclam), and the plain signature files of
/// `files` feeds (anything else in a feed, e.g. an index or a README, stays out of the engine).
/// Agents install exactly these into the engine's database directory, by file name.
pub fn engine_loads(kind: &str, name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    match kind {
        "clamav" => lower.ends_with(".cvd"),
        "files" => PLAIN_SIGNATURE_EXTENSIONS
            .iter()
            .any(|ext| lower.ends_with(ext) && lower.len() > ext.len()),
        _ => false,
    }
}

/// Whether a database named `name` may go into the engine's database directory: letters,
/// digits, `-`, `_` and `.`, not hidden. Agents skip a feed's file named otherwise (with a
/// warning) and refuse a ClamAV database named otherwise; `pm-mirror sync` warns about such a
/// feed file.
pub fn engine_file_name_ok(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Two files a revision would install under one name in the engine's database directory (where
/// agents put every database by its file name): agents refuse such a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineNameClash {
    /// The file name both would take (`site.hdb`).
    pub name: String,
    /// The first file's path (`vendor-a/site.hdb`).
    pub first: String,
    /// The second's (`vendor-b/site.hdb`).
    pub second: String,
}

impl std::fmt::Display for EngineNameClash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` and `{}` would both be `{}` in the scanning engine's database directory, and \
             agents refuse a dist where one database replaces another",
            self.first, self.second, self.name
        )
    }
}

/// The first clash among `files` (product kind, path), in order: see [`EngineNameClash`].
pub fn engine_name_clash<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<EngineNameClash> {
    let mut seen: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for (kind, path) in files {
        let name = path.rsplit('/').next().unwrap_or(path);
        // Agents never install a name the directory cannot take, so it clashes with nothing.
        if !engine_loads(kind, name) || !engine_file_name_ok(name) {
            continue;
        }
        if let Some(first) = seen.insert(name, path) {
            return Some(EngineNameClash {
                name: name.to_string(),
                first: first.to_string(),
                second: path.to_string(),
            });
        }
    }
    None
}

/// `manifest.json` of one revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of this document.
    pub format: u32,
    /// Revision name, `r<serial>`.
    pub revision: String,
    /// Monotonic serial of the revision on this mirror.
    pub serial: u32,
    /// When the revision was staged.
    pub created_at: DateTime<Utc>,
    /// Where its data came from: `upstream`, `bundle` or `parent`.
    pub source: String,
    /// Hash of every (path, size, sha256); equal hashes mean equal content.
    pub content_sha256: String,
    /// Products and their component versions.
    pub products: Vec<ProductEntry>,
    /// Every file of the revision, sorted by path.
    pub files: Vec<FileEntry>,
}

/// One product of a revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductEntry {
    /// Product name: from `pm.toml`, or from the parent's manifest for a product a `pm` product
    /// brought.
    pub name: String,
    /// `clamav` or `files` (a parent's product keeps the parent's kind).
    pub kind: String,
    /// The `pm.toml` product that brought it when that is not the product itself: the name of a
    /// `pm` product (a parent mirror) whose parent has this product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Version of the whole feed, when upstream names one (a `files` index version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Versions of its components.
    pub components: Vec<ComponentEntry>,
}

/// Each product's components as (name, version), sorted: what a product's content is, for
/// comparing it across revisions.
pub type ProductComponents = std::collections::BTreeMap<String, Vec<(String, String)>>;

impl Manifest {
    /// Its products' components ([`ProductComponents`]).
    pub fn product_components(&self) -> ProductComponents {
        self.products
            .iter()
            .map(|product| {
                let mut list: Vec<(String, String)> = product
                    .components
                    .iter()
                    .map(|c| (c.name.clone(), c.version.clone()))
                    .collect();
                list.sort();
                (product.name.clone(), list)
            })
            .collect()
    }
}

impl ProductEntry {
    /// Name of the `pm.toml` product that brought this entry.
    pub fn config_product(&self) -> &str {
        self.via.as_deref().unwrap_or(&self.name)
    }

    /// How reports name one of its components: `daily`, or `clamav/daily` for a product a
    /// parent mirror brought.
    pub fn component_label(&self, component: &ComponentEntry) -> String {
        match self.via {
            Some(_) => format!("{}/{}", self.name, component.name),
            None => component.name.clone(),
        }
    }
}

/// One versioned artifact, e.g. `daily` 27430.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentEntry {
    /// Component name (`daily`, or the file path for `files` products).
    pub name: String,
    /// Its version.
    pub version: String,
    /// When upstream built it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_time: Option<DateTime<Utc>>,
}

/// One file of a revision.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the revision root, `<product>/<file>`.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of the contents.
    pub sha256: String,
    /// Product it belongs to.
    pub product: String,
    /// Component it carries (a cdiff belongs to its database).
    pub component: String,
    /// Component version this file brings (a cdiff: the version it produces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Upstream build time, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_time: Option<DateTime<Utc>>,
}

/// Hash of the file list that identifies a revision's content independent of its serial.
pub fn content_sha256(files: &[FileEntry]) -> String {
    let mut sorted: Vec<&FileEntry> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut hasher = openssl::sha::Sha256::new();
    for file in sorted {
        hasher.update(file.path.as_bytes());
        hasher.update(b"\0");
        hasher.update(file.size.to_string().as_bytes());
        hasher.update(b"\0");
        hasher.update(file.sha256.as_bytes());
        hasher.update(b"\n");
    }
    hex(&hasher.finish())
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// Whether a relative path from an index is safe to use under the product directory.
pub fn safe_relative_path(path: &str) -> bool {
    // `:` would let a URL join leave the index's host (`http:evil/x`); `?#%` change meaning;
    // control characters (a newline) would break every log line and table that names the file.
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains(['\\', ':', '?', '#', '%', '\0'])
        && !path.chars().any(char::is_control)
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// What stays as it is in a URL path segment: RFC 3986's unreserved characters. Everything
/// else of a file name (a space, `é`, `+`) is percent-encoded as UTF-8.
const URL_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A manifest path as it goes into a URL (`vendor/release%20notes.txt`): each segment
/// percent-encoded, the `/` between them kept. Every client of a pm mirror (a child mirror's
/// sync, agents) asks for files this way, and `pm-mirror serve` decodes it
/// ([`decode_url_segment`]), so a feed's file name with a space or a non-ASCII letter is served
/// like any other.
pub fn url_path(path: &str) -> String {
    path.split('/')
        .map(|segment| percent_encoding::utf8_percent_encode(segment, URL_SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// One segment of a request path with its percent-escapes decoded; `None` when the bytes are
/// not UTF-8 (no manifest path holds such a name).
pub fn decode_url_segment(segment: &str) -> Option<String> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|text| text.into_owned())
}

/// The manifest format this pm writes and reads.
pub const FORMAT: u32 = 1;

impl Manifest {
    /// Checks what a reader relies on beyond the signature: a format it knows, and a revision
    /// named `r<serial>` (the name becomes a record and a path component elsewhere).
    pub fn check_shape(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "manifest format {} is not {FORMAT}, the one this pm reads: upgrade pm",
                self.format
            ));
        }
        if self.revision != format!("r{}", self.serial) {
            return Err(format!(
                "revision `{}` does not match serial {} (r{})",
                self.revision, self.serial, self.serial
            ));
        }
        if let Some(file) = self.files.iter().find(|f| !safe_relative_path(&f.path)) {
            return Err(format!("it lists the unusable path `{}`", file.path));
        }
        Ok(())
    }

    /// The entry for `path`, if the revision has it.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Files of one product.
    pub fn product_files<'a>(&'a self, product: &'a str) -> impl Iterator<Item = &'a FileEntry> {
        self.files.iter().filter(move |f| f.product == product)
    }

    /// The product entry named `name`.
    pub fn product(&self, name: &str) -> Option<&ProductEntry> {
        self.products.iter().find(|p| p.name == name)
    }

    /// The product entries the `pm.toml` product `name` brought: its own entry, or for a `pm`
    /// product the parent's products it carries (`via`).
    pub fn products_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ProductEntry> {
        self.products
            .iter()
            .filter(move |p| p.config_product() == name)
    }

    /// Files of the `pm.toml` product `name`: the files of every product it brought (a file of a
    /// product without an entry counts as that product's own).
    pub fn files_of_config_product<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a FileEntry> {
        self.files
            .iter()
            .filter(move |f| match self.product(&f.product) {
                Some(entry) => entry.config_product() == name,
                None => f.product == name,
            })
    }

    /// Two files this revision would install under one name ([`engine_name_clash`]), in the
    /// order agents read them: products in order, each product's files by path.
    pub fn engine_name_clash(&self) -> Option<EngineNameClash> {
        engine_name_clash(self.products.iter().flat_map(|product| {
            self.product_files(&product.name)
                .map(|file| (product.kind.as_str(), file.path.as_str()))
        }))
    }

    /// The pm-agent package for `component` ([`agent_component`]): the file of an `agent`
    /// product of this mirror's own that carries it.
    pub fn agent_package(&self, component: &str) -> Option<&FileEntry> {
        self.own_agent_products()
            .flat_map(|p| self.product_files(&p.name))
            .find(|f| f.component == component)
    }

    /// Whether the revision has an `agent` product of this mirror's own.
    pub fn has_agent_product(&self) -> bool {
        self.own_agent_products().next().is_some()
    }

    /// `agent` products this mirror synced itself. One a parent mirror brought (`via`) is never
    /// offered to agents: a parent trusted for signature data must not choose the executable
    /// the fleet runs as root.
    fn own_agent_products(&self) -> impl Iterator<Item = &ProductEntry> {
        self.products
            .iter()
            .filter(|p| p.kind == AGENT_KIND && p.via.is_none())
    }

    /// Total bytes of all files. Saturates: a manifest is parsed from untrusted bytes before
    /// any file is checked against it, and sizes near `u64::MAX` must not overflow the sum.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .fold(0u64, |total, f| total.saturating_add(f.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, sha: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: 1,
            sha256: sha.into(),
            product: "p".into(),
            component: "c".into(),
            version: None,
            build_time: None,
        }
    }

    #[test]
    fn content_hash_ignores_order_and_sees_changes() {
        let a = [file("a", "1"), file("b", "2")];
        let b = [file("b", "2"), file("a", "1")];
        let c = [file("a", "1"), file("b", "3")];
        assert_eq!(content_sha256(&a), content_sha256(&b));
        assert_ne!(content_sha256(&a), content_sha256(&c));
    }

    #[test]
    fn a_pm_product_owns_the_parent_products_it_brought() {
        let entry = |name: &str, via: Option<&str>| ProductEntry {
            name: name.into(),
            kind: "clamav".into(),
            via: via.map(Into::into),
            version: None,
            components: vec![ComponentEntry {
                name: "daily".into(),
                version: "7".into(),
                build_time: None,
            }],
        };
        let owned = |path: &str, product: &str| FileEntry {
            product: product.into(),
            ..file(path, "1")
        };
        let manifest = Manifest {
            format: FORMAT,
            revision: "r1".into(),
            serial: 1,
            created_at: Utc::now(),
            source: "upstream".into(),
            content_sha256: String::new(),
            products: vec![
                entry("local", None),
                entry("clamav", Some("parent")),
                entry("vendor", Some("parent")),
            ],
            files: vec![
                owned("clamav/daily.cvd", "clamav"),
                owned("local/daily.cvd", "local"),
                owned("vendor/a.dat", "vendor"),
            ],
        };
        let names = |name| {
            manifest
                .products_of(name)
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("parent"), ["clamav", "vendor"]);
        assert_eq!(names("local"), ["local"]);
        assert!(names("clamav").is_empty());
        let paths = |name| {
            manifest
                .files_of_config_product(name)
                .map(|f| f.path.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(paths("parent"), ["clamav/daily.cvd", "vendor/a.dat"]);
        assert_eq!(paths("local"), ["local/daily.cvd"]);
        let components = |p: &ProductEntry| p.component_label(&p.components[0]);
        assert_eq!(components(&manifest.products[0]), "daily");
        assert_eq!(components(&manifest.products[1]), "clamav/daily");
        // Manifests written before `via` existed still parse, and `via` stays out when unset.
        let json = serde_json::to_string(&manifest.products[0]).unwrap();
        assert!(!json.contains("via"), "{json}");
    }

    /// Found by the fuzz test below (seed 12578651032905805883): `total_bytes` summed with `+`,
    /// which panics in debug builds and wraps in release ones.
    #[test]
    fn total_bytes_of_sizes_past_u64_max_saturates_instead_of_overflowing() {
        let mut manifest = sample_manifest();
        manifest.files[0].size = u64::MAX;
        assert_eq!(manifest.total_bytes(), u64::MAX);
        manifest.files.truncate(2);
        manifest.files[0].size = 7;
        manifest.files[1].size = 5;
        assert_eq!(manifest.total_bytes(), 12);
    }

    /// Field names and values of the manifest's own, besides `fuzz::JSON_SYNTAX`.
    const JSON_EXTRA: &[&[u8]] = &[
        b"\"via\": \"parent\", ",
        b"\"kind\": \"agent\", ",
        b"\"size\": 18446744073709551615, ",
        b"../",
    ];

    /// A manifest like the ones `pm-mirror sync` writes: ClamAV databases and a cdiff, a
    /// `files` feed, a parent's product and the agent packages.
    fn sample_manifest() -> Manifest {
        let built = DateTime::parse_from_rfc3339("2026-11-25T09:10:11Z")
            .unwrap()
            .with_timezone(&Utc);
        let product =
            |name: &str, kind: &str, via: Option<&str>, components: &[(&str, &str)]| ProductEntry {
                name: name.into(),
                kind: kind.into(),
                via: via.map(Into::into),
                version: (kind == "files").then(|| "2026.11.25".into()),
                components: components
                    .iter()
                    .map(|&(name, version)| ComponentEntry {
                        name: name.into(),
                        version: version.into(),
                        build_time: Some(built),
                    })
                    .collect(),
            };
        let entry =
            |path: &str, size: u64, product: &str, component: &str, version: &str| FileEntry {
                path: path.into(),
                size,
                sha256: hex(&openssl::sha::sha256(path.as_bytes())),
                product: product.into(),
                component: component.into(),
                version: Some(version.into()),
                build_time: Some(built),
            };
        let files = vec![
            entry(
                "agent/pm-agent-x86_64-linux",
                9_812_345,
                "agent",
                "pm-agent-x86_64-linux",
                "0.1.0",
            ),
            entry("clamav/bytecode.cvd", 282_624, "clamav", "bytecode", "336"),
            entry(
                "clamav/daily-27430.cdiff",
                4_217,
                "clamav",
                "daily",
                "27430",
            ),
            entry("clamav/daily.cvd", 61_865_472, "clamav", "daily", "27430"),
            entry("clamav/main.cvd", 170_479_789, "clamav", "main", "62"),
            entry(
                "upstream/daily.cvd",
                61_865_472,
                "upstream",
                "daily",
                "27429",
            ),
            entry(
                "vendor/rules/a.yar",
                1_500,
                "vendor",
                "rules/a.yar",
                "2026.11.25",
            ),
        ];
        Manifest {
            format: FORMAT,
            revision: "r42".into(),
            serial: 42,
            created_at: built,
            source: "upstream".into(),
            content_sha256: content_sha256(&files),
            products: vec![
                product(
                    "agent",
                    AGENT_KIND,
                    None,
                    &[("pm-agent-x86_64-linux", "0.1.0")],
                ),
                product(
                    "clamav",
                    "clamav",
                    None,
                    &[("bytecode", "336"), ("daily", "27430"), ("main", "62")],
                ),
                product("upstream", "clamav", Some("parent"), &[("daily", "27429")]),
                product("vendor", "files", None, &[("rules/a.yar", "2026.11.25")]),
            ],
            files,
        }
    }

    /// Everything consumers of a parsed manifest call on it.
    fn use_every_accessor(manifest: &Manifest) {
        let _ = manifest.total_bytes();
        let _ = content_sha256(&manifest.files);
        let _ = manifest.has_agent_product();
        let _ = manifest.engine_name_clash();
        let _ = manifest.agent_package(&agent_component("x86_64", "linux"));
        for product in &manifest.products {
            let _ = manifest.file(&product.name);
            let _ = manifest.product_files(&product.name).count();
            let _ = manifest.products_of(product.config_product()).count();
            let _ = manifest.files_of_config_product(&product.name).count();
            for component in &product.components {
                let _ = product.component_label(component);
            }
        }
    }

    /// A signed manifest and its signature under damage (harness: `crate::fuzz`), checked the
    /// way agents and child mirrors do (Ed25519 signature, then the JSON): whatever verifies is
    /// the original, byte for byte and in meaning; whatever parses (a parent signs what it
    /// likes) round-trips through serde unchanged and survives every accessor.
    #[test]
    fn mutated_manifests_never_panic_and_verify_only_when_byte_identical() {
        let home = tempfile::tempdir().unwrap();
        let key = crate::pki::SigningKey::load_or_create(home.path()).unwrap();
        let verifier = crate::pki::VerifyingKey::from_pem(&key.public_key_pem().unwrap()).unwrap();
        let original = sample_manifest();
        let json = serde_json::to_vec_pretty(&original).unwrap();
        let signature = key.sign(&json).unwrap();
        assert!(verifier.verify(&json, &signature));
        let campaign = crate::fuzz::campaign("manifest", 8000, |seed| {
            let mut rng = crate::fuzz::Rng::new(seed);
            let (damage_json, damage_signature) = match rng.below(8) {
                0 => (false, true),
                1 => (true, true),
                _ => (true, false),
            };
            let mut damaged_json = json.clone();
            if damage_json {
                let mut damage = crate::fuzz::Damage::new(&json, 0, &mut rng);
                damage.any(&crate::fuzz::json_tokens(JSON_EXTRA));
                damaged_json = damage.bytes;
            }
            let mut damaged_signature = signature.clone();
            if damage_signature {
                let mut damage = crate::fuzz::Damage::new(&signature, 0, &mut rng);
                damage.any(&[b"\0", b"\xff"]);
                damaged_signature = damage.bytes;
            }
            let parsed = serde_json::from_slice::<Manifest>(&damaged_json);
            let verified = verifier.verify(&damaged_json, &damaged_signature);
            if verified {
                assert!(damaged_json == json, "a changed manifest verified");
                assert!(
                    damaged_signature == signature,
                    "a changed signature verified"
                );
                assert_eq!(parsed.as_ref().ok(), Some(&original));
            }
            if let Ok(manifest) = &parsed {
                let again = serde_json::to_vec_pretty(manifest).unwrap();
                assert_eq!(
                    serde_json::from_slice::<Manifest>(&again).ok().as_ref(),
                    Some(manifest),
                    "does not round-trip"
                );
                use_every_accessor(manifest);
            }
            verified
        });
        if !campaign.replay {
            assert!(campaign.accepted < campaign.cases, "nothing was damaged");
        }
    }

    #[test]
    fn manifest_paths_go_into_urls_percent_encoded_per_segment_and_back() {
        let check = |path: &str, url: &str| {
            assert_eq!(url_path(path), url, "{path}");
            let decoded: Vec<String> = url
                .split('/')
                .map(|segment| decode_url_segment(segment).unwrap())
                .collect();
            assert_eq!(decoded.join("/"), path, "{url}");
        };
        check("clamav/daily-27430.cdiff", "clamav/daily-27430.cdiff");
        check("vendor/release notes.txt", "vendor/release%20notes.txt");
        check("vendor/Über+sig~1.hdb", "vendor/%C3%9Cber%2Bsig~1.hdb");
        check("backup/2/manifest.json", "backup/2/manifest.json");
        assert_eq!(decode_url_segment("%ff"), None);
        assert_eq!(decode_url_segment("a%2fb").as_deref(), Some("a/b"));
    }

    #[test]
    fn two_databases_of_one_name_clash_other_files_do_not() {
        let check = |files: &[(&str, &str)], expected: Option<(&str, &str, &str)>| {
            let clash = engine_name_clash(files.iter().copied());
            assert_eq!(
                clash
                    .as_ref()
                    .map(|c| (c.name.as_str(), c.first.as_str(), c.second.as_str())),
                expected,
                "{files:?}"
            );
        };
        check(
            &[("files", "a/site.hdb"), ("files", "b/site.hdb")],
            Some(("site.hdb", "a/site.hdb", "b/site.hdb")),
        );
        check(
            &[("files", "a/x/site.ndb"), ("files", "a/y/site.ndb")],
            Some(("site.ndb", "a/x/site.ndb", "a/y/site.ndb")),
        );
        check(
            &[("clamav", "clamav/daily.cvd"), ("clamav", "hq/daily.cvd")],
            Some(("daily.cvd", "clamav/daily.cvd", "hq/daily.cvd")),
        );
        // What the engine does not load may share a name: it stays in its product directory.
        check(&[("files", "a/README"), ("files", "b/README")], None);
        check(
            &[
                ("clamav", "clamav/test-6.cdiff"),
                ("files", "b/test-6.cdiff"),
            ],
            None,
        );
        check(
            &[("files", "a/daily.cvd"), ("clamav", "clamav/daily.cvd")],
            None,
        );
        check(&[("files", "a/site.hdb"), ("files", "b/site.HDB")], None);
        check(
            &[("files", "a/my site.hdb"), ("files", "b/my site.hdb")],
            None,
        );
    }
}
