//! Finds the local modules a Python file imports, recursively, so they can be sent
//! with the run as `import_files` (spec §6.1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Relative path (with `/`) → file text of every local module `main` imports, directly
/// or through other local modules. `root` is the directory imports resolve against.
pub fn local_imports(main: &Path, root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo: Vec<PathBuf> = vec![main.to_path_buf()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(file) = todo.pop() {
        if !seen.insert(file.clone()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if file != main
            && let Ok(rel) = file.strip_prefix(root)
        {
            out.insert(rel.to_string_lossy().replace('\\', "/"), text.clone());
        }
        let pkg_dir = file.parent().unwrap_or(root).to_path_buf();
        for module in imported_modules(&text) {
            for f in resolve(&module, root, &pkg_dir) {
                todo.push(f);
            }
        }
    }
    out
}

/// A module named by an import: absolute (`a.b`) or relative (`..a`, level 2).
#[derive(Debug, PartialEq)]
struct Module {
    level: usize,
    name: String,
}

/// The modules imported by top-level or nested `import` / `from … import` statements.
fn imported_modules(text: &str) -> Vec<Module> {
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("import ") {
            for part in rest.split(',') {
                let name = part.split_whitespace().next().unwrap_or("");
                if !name.is_empty() {
                    out.push(Module {
                        level: 0,
                        name: name.to_string(),
                    });
                }
            }
        } else if let Some(rest) = l.strip_prefix("from ") {
            let mut it = rest.split_whitespace();
            let target = it.next().unwrap_or("");
            if it.next() != Some("import") {
                continue;
            }
            let level = target.chars().take_while(|&c| c == '.').count();
            let base = &target[level..];
            // `from pkg import mod` may name a submodule: try both.
            let joined = it.collect::<Vec<_>>().join(" ");
            let names: Vec<&str> = joined
                .trim_matches(|c| c == '(' || c == ')')
                .split(',')
                .filter_map(|n| n.split_whitespace().next())
                .collect();
            if !base.is_empty() {
                out.push(Module {
                    level,
                    name: base.to_string(),
                });
            }
            for n in names {
                if n == "*" {
                    continue;
                }
                let name = if base.is_empty() {
                    n.to_string()
                } else {
                    format!("{base}.{n}")
                };
                out.push(Module { level, name });
            }
        }
    }
    out
}

/// The local files a module import needs: the module and its packages' `__init__.py`.
fn resolve(m: &Module, root: &Path, pkg_dir: &Path) -> Vec<PathBuf> {
    let mut base = if m.level == 0 {
        root.to_path_buf()
    } else {
        pkg_dir.to_path_buf()
    };
    for _ in 1..m.level {
        base = base.parent().map(Path::to_path_buf).unwrap_or(base);
    }
    let parts: Vec<&str> = m.name.split('.').filter(|p| !p.is_empty()).collect();
    let mut files = Vec::new();
    let mut dir = base;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let as_file = dir.join(format!("{part}.py"));
        let as_pkg = dir.join(part);
        if last && as_file.is_file() {
            files.push(as_file);
        } else if as_pkg.is_dir() {
            let init = as_pkg.join("__init__.py");
            if init.is_file() {
                files.push(init);
            }
            dir = as_pkg;
        } else {
            break;
        }
    }
    // Only files inside the root are bundled.
    files.retain(|f| f.starts_with(root));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_modules_packages_and_relative_imports() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::write(
            r.join("main.py"),
            "import helper, os\nfrom pkg import mod\nimport numpy as np\n",
        )
        .unwrap();
        std::fs::write(r.join("helper.py"), "X = 1\n").unwrap();
        std::fs::create_dir(r.join("pkg")).unwrap();
        std::fs::write(r.join("pkg/__init__.py"), "").unwrap();
        std::fs::write(r.join("pkg/mod.py"), "from .util import f\n").unwrap();
        std::fs::write(r.join("pkg/util.py"), "def f(): return 2\n").unwrap();
        std::fs::write(r.join("unused.py"), "").unwrap();
        let got = local_imports(&r.join("main.py"), r);
        let keys: Vec<_> = got.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            vec!["helper.py", "pkg/__init__.py", "pkg/mod.py", "pkg/util.py"]
        );
    }
}
