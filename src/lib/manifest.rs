//! The signed description of a revision (DESIGN.md section 2): every file with its size, sha256,
//! product, component, version and build time. Agents and importers refuse anything that does not
//! match it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// File name of the manifest inside a revision.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the detached Ed25519 signature of `manifest.json`.
pub const SIGNATURE_FILE: &str = "manifest.sig";

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
    /// Product name from `pm.toml`.
    pub name: String,
    /// `clamav` or `files`.
    pub kind: String,
    /// Version of the whole feed, when upstream names one (a `files` index version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Versions of its components.
    pub components: Vec<ComponentEntry>,
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

impl Manifest {
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

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
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
}
