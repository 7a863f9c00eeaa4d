//! Products that leave dist: a product renamed or removed in `pm.toml` is left out of the next
//! revision sync stages, and publishing that revision would take its files out of dist (and, at
//! the next rollout, off every agent). Publish refuses that without `--allow-removal` and every
//! sync or publish that gets there names the products and their files, so a typo in `pm.toml`
//! never empties a product silently.

use std::collections::HashSet;

use serde::Serialize;

use crate::manifest::Manifest;

/// How many file paths a report names per product; the count is always complete.
pub const PATHS_SHOWN: usize = 10;

/// A `pm.toml` product that `from` holds and `to` does not, with its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemovedProduct {
    /// The product's name in `pm.toml` (a `pm` product's name for what a parent brought).
    pub name: String,
    /// How many files leave with it.
    pub files: usize,
    /// Bytes that leave with it.
    pub bytes: u64,
    /// The first [`PATHS_SHOWN`] of those files, in manifest order.
    pub paths: Vec<String>,
}

impl RemovedProduct {
    /// `` `vendor` (3 files: vendor/a.hdb, vendor/b.hdb, vendor/c.hdb) ``, the list capped.
    pub fn describe(&self) -> String {
        let mut paths = self.paths.join(", ");
        if self.files > self.paths.len() {
            paths.push_str(&format!(" and {} more", self.files - self.paths.len()));
        }
        let noun = if self.files == 1 { "file" } else { "files" };
        format!("`{}` ({} {noun}: {paths})", self.name, self.files)
    }
}

/// The `pm.toml` products `from` holds that `to` leaves out, in `from`'s order, with the files
/// that leave with them (those `to` does not hold at the same path). A product whose files all
/// stay (a `pm` product replaced by the products it brought) takes nothing away and is not
/// listed. A product a parent mirror dropped inside a `pm` product that is still there is not
/// one either: the parent's operator made that decision.
pub fn removed_products(from: &Manifest, to: &Manifest) -> Vec<RemovedProduct> {
    let kept: HashSet<&str> = to.files.iter().map(|f| f.path.as_str()).collect();
    leaving(
        from,
        |name| to.products_of(name).next().is_none(),
        |path| kept.contains(path),
    )
}

/// The products of `latest` that `pm.toml` no longer lists (`configured` are its product names),
/// with all their files: what the next sync leaves out of latest.
pub fn unconfigured_products(latest: &Manifest, configured: &[&str]) -> Vec<RemovedProduct> {
    leaving(latest, |name| !configured.contains(&name), |_| false)
}

fn leaving(
    from: &Manifest,
    leaves: impl Fn(&str) -> bool,
    stays: impl Fn(&str) -> bool,
) -> Vec<RemovedProduct> {
    let mut names: Vec<&str> = Vec::new();
    for entry in &from.products {
        let name = entry.config_product();
        if !names.contains(&name) && leaves(name) {
            names.push(name);
        }
    }
    names
        .into_iter()
        .filter_map(|name| {
            let files: Vec<_> = from
                .files_of_config_product(name)
                .filter(|f| !stays(&f.path))
                .collect();
            (!files.is_empty()).then(|| RemovedProduct {
                name: name.to_string(),
                files: files.len(),
                bytes: files.iter().map(|f| f.size).sum(),
                paths: files
                    .iter()
                    .take(PATHS_SHOWN)
                    .map(|f| f.path.clone())
                    .collect(),
            })
        })
        .collect()
}

/// One line naming every removed product: `` `vendor` (3 files: ...); `hq` (...) ``.
pub fn describe_all(removed: &[RemovedProduct]) -> String {
    removed
        .iter()
        .map(RemovedProduct::describe)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `warning:` line on stderr of a `command` that left products out of `place` (none when
/// nothing left): `warning: this sync left out of latest ...: `vendor` (...){tail}`.
pub fn warn(removed: &[RemovedProduct], dry_run: bool, command: &str, place: &str, tail: &str) {
    if removed.is_empty() {
        return;
    }
    let verb = if dry_run { "would leave" } else { "left" };
    eprintln!(
        "warning: this {command} {verb} out of {place}: {}{tail}",
        describe_all(removed)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{FileEntry, ProductEntry};

    fn manifest(products: &[(&str, Option<&str>, usize)]) -> Manifest {
        let mut files = Vec::new();
        for (name, _, n) in products {
            for i in 0..*n {
                files.push(FileEntry {
                    path: format!("{name}/f{i:02}.hdb"),
                    size: 10,
                    sha256: "0".repeat(64),
                    product: name.to_string(),
                    component: format!("f{i:02}.hdb"),
                    version: None,
                    build_time: None,
                });
            }
        }
        Manifest {
            format: 1,
            revision: "r1".into(),
            serial: 1,
            created_at: chrono::Utc::now(),
            source: "upstream".into(),
            content_sha256: String::new(),
            products: products
                .iter()
                .map(|(name, via, _)| ProductEntry {
                    name: name.to_string(),
                    kind: "files".into(),
                    via: via.map(String::from),
                    version: None,
                    components: Vec::new(),
                })
                .collect(),
            files,
        }
    }

    fn check(
        from: &[(&str, Option<&str>, usize)],
        to: &[(&str, Option<&str>, usize)],
        expected: &str,
    ) {
        let removed = removed_products(&manifest(from), &manifest(to));
        assert_eq!(describe_all(&removed), expected);
    }

    #[test]
    fn products_pm_toml_no_longer_lists_are_named_with_all_their_files() {
        let latest = manifest(&[
            ("clamav", None, 1),
            ("vendor", None, 2),
            ("c", Some("hq"), 1),
        ]);
        let names = |removed: Vec<RemovedProduct>| -> Vec<String> {
            removed.into_iter().map(|r| r.name).collect()
        };
        assert!(unconfigured_products(&latest, &["clamav", "vendor", "hq"]).is_empty());
        assert_eq!(
            names(unconfigured_products(&latest, &["clamav"])),
            ["vendor", "hq"]
        );
    }

    #[test]
    fn products_that_leave_are_named_with_their_files_capped() {
        check(
            &[("clamav", None, 1), ("vendor", None, 2)],
            &[("clamav", None, 1), ("vendor", None, 2)],
            "",
        );
        check(
            &[("clamav", None, 1), ("vendor", None, 2)],
            &[("clamav", None, 1)],
            "`vendor` (2 files: vendor/f00.hdb, vendor/f01.hdb)",
        );
        check(
            &[("vendor", None, 1)],
            &[("vendr", None, 1)],
            "`vendor` (1 file: vendor/f00.hdb)",
        );
        check(
            &[("big", None, 12)],
            &[],
            "`big` (12 files: big/f00.hdb, big/f01.hdb, big/f02.hdb, big/f03.hdb, big/f04.hdb, big/f05.hdb, big/f06.hdb, big/f07.hdb, big/f08.hdb, big/f09.hdb and 2 more)",
        );
        check(&[("empty", None, 0)], &[], "");
        // A parent's products count as the `pm` product that brought them.
        check(
            &[("clamav", Some("hq"), 2), ("vendor", Some("hq"), 1)],
            &[("clamav", Some("hq"), 2)],
            "",
        );
        check(
            &[("clamav", Some("hq"), 2), ("vendor", Some("hq"), 1)],
            &[("clamav", None, 2)],
            "`hq` (1 file: vendor/f00.hdb)",
        );
    }
}
