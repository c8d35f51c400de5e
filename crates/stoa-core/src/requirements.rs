//! Cleaning of `requirements_content` (spec §6.1) and the environment cache key.
//!
//! The official client sends junk lines: local module names, standard-library names and
//! pins from the client's own environment. Stoa drops the first two kinds and installs
//! the rest best-effort: unpinned names that do not resolve are tolerated.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

/// One requirement line kept after cleaning.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Requirement {
    /// The line as given (trimmed), passed to the installer.
    pub line: String,
    /// The normalised project name (lower case, `_` and `.` as `-`).
    pub name: String,
    /// True when the line pins or constrains a version, or is a URL: its failure fails the run.
    pub strict: bool,
}

/// Normalises a project or module name the way packaging tools compare them.
pub fn normalize_name(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace(['_', '.'], "-")
}

/// Cleans the raw requirement text.
///
/// Drops blank lines, comments, option lines (`-r`, `--index-url`: they could redirect
/// the installer), names of standard-library modules and names of bundled local modules.
/// The result is de-duplicated and sorted, so the cache key does not depend on order.
pub fn clean(
    raw: &str,
    stdlib: &BTreeSet<String>,
    local_modules: &BTreeSet<String>,
) -> Vec<Requirement> {
    let mut out: BTreeSet<Requirement> = BTreeSet::new();
    for line in raw.lines() {
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('-') {
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .unwrap_or(line.len());
        let raw_name = &line[..name_end];
        if raw_name.is_empty() {
            continue;
        }
        let rest = line[name_end..].trim();
        if stdlib.contains(raw_name) || local_modules.contains(raw_name) {
            continue;
        }
        let strict = !rest.is_empty();
        out.insert(Requirement {
            line: line.to_string(),
            name: normalize_name(raw_name),
            strict,
        });
    }
    out.into_iter().collect()
}

/// The cache key of an environment: a hash of the cleaned requirement lines and the
/// interpreter version.
pub fn env_key(reqs: &[Requirement], python_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(python_version.as_bytes());
    h.update([0]);
    for r in reqs {
        h.update(r.line.as_bytes());
        h.update([b'\n']);
    }
    hex::encode(&h.finalize()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(xs: &[&str]) -> BTreeSet<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn drops_stdlib_local_and_options() {
        let raw =
            "helper\nnumpy==1.26.4\npkg\nsub\n__future__\ntomllib\n# c\n-r other.txt\n\nPyYAML\n";
        let got = clean(
            raw,
            &set(&["__future__", "tomllib"]),
            &set(&["helper", "pkg", "sub"]),
        );
        let lines: Vec<_> = got.iter().map(|r| (r.line.as_str(), r.strict)).collect();
        assert_eq!(lines, vec![("PyYAML", false), ("numpy==1.26.4", true)]);
    }

    #[test]
    fn key_ignores_order() {
        let a = clean("b\na==1", &set(&[]), &set(&[]));
        let b = clean("a==1\nb\n", &set(&[]), &set(&[]));
        assert_eq!(env_key(&a, "3.11.7"), env_key(&b, "3.11.7"));
        assert_ne!(env_key(&a, "3.11.7"), env_key(&a, "3.12.0"));
    }
}
