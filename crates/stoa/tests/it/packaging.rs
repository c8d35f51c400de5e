//! Packaging for operators: the systemd units pass `systemd-analyze verify` and start
//! the binary with flags it takes; the `.deb` (built by `scripts/package-deb.sh`, which
//! `scripts/test` runs first) installs the binary, the units, the completions and the
//! manual pages.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::missing;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(repo().join("packaging").join(name)).unwrap()
}

/// The value of `Key=` in a unit.
fn value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn systemd_units_verify_and_start_the_binary_with_flags_it_takes() {
    let Ok(o) = Command::new("systemd-analyze").arg("--version").output() else {
        missing("systemd-analyze (systemd)");
        return;
    };
    assert!(o.status.success());
    let bin = env!("CARGO_BIN_EXE_stoa");
    let dir = tempfile::tempdir().unwrap();
    // The manual pages the units name (`Documentation=man:…`), generated here.
    let man = dir.path().join("man/man1");
    std::fs::create_dir_all(&man).unwrap();
    let o = Command::new(bin).arg("man").arg(&man).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    let mut paths = vec![];
    for name in ["stoa.service", "stoa-worker.service"] {
        let text = unit(name);
        // Hardened, unprivileged, with a state directory of its own.
        for (key, want) in [
            ("User", "stoa"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("StateDirectoryMode", "0700"),
        ] {
            assert_eq!(value(&text, key), Some(want), "{name}: {key}");
        }
        assert!(value(&text, "StateDirectory").is_some(), "{name}");
        assert!(
            text.contains("root-equivalent"),
            "{name} says what the docker group gives"
        );
        // Its command, with the binary under test: every flag is one `stoa` takes
        // (`--help` after them exits 0 only then).
        let exec = value(&text, "ExecStart").unwrap();
        let args: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(args[0], "/usr/bin/stoa", "{name}");
        let o = Command::new(bin)
            .args(&args[1..])
            .arg("--help")
            .env_remove("STOA_SERVER")
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {exec}: {o:?}");
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace("/usr/bin/stoa", bin)).unwrap();
        paths.push(path);
    }
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn the_deb_installs_the_binary_units_completions_and_man_pages() {
    let debs: Vec<PathBuf> = std::fs::read_dir(repo().join("target/debian"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    let Some(deb) = debs.last() else {
        missing("the .deb (scripts/package-deb.sh, which scripts/test runs)");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let o = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(root.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    for f in [
        "usr/bin/stoa",
        "usr/lib/systemd/system/stoa.service",
        "usr/lib/systemd/system/stoa-worker.service",
        "usr/share/bash-completion/completions/stoa",
        "usr/share/zsh/vendor-completions/_stoa",
        "usr/share/fish/vendor_completions.d/stoa.fish",
        "usr/share/man/man1/stoa.1.gz",
        "usr/share/man/man1/stoa-server.1.gz",
        "usr/share/man/man1/stoa-worker.1.gz",
        "usr/share/doc/stoa/examples/stoa.toml",
    ] {
        assert!(root.path().join(f).is_file(), "{f} is installed");
    }
    // The installed binary runs, and is the one of this checkout.
    let o = Command::new(root.path().join("usr/bin/stoa"))
        .arg("--version")
        .output()
        .unwrap();
    let mine = Command::new(env!("CARGO_BIN_EXE_stoa"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(o.stdout, mine.stdout);
    // The units installed are the repository's.
    assert_eq!(
        std::fs::read_to_string(root.path().join("usr/lib/systemd/system/stoa.service")).unwrap(),
        unit("stoa.service")
    );
    // The completion loads in bash, the page renders.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p stoa",
            root.path()
                .join("usr/share/bash-completion/completions/stoa")
                .display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    if Command::new("man").arg("--version").output().is_ok() {
        let o = Command::new("man")
            .arg("-l")
            .arg(root.path().join("usr/share/man/man1/stoa-server.1.gz"))
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .unwrap();
        let page = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && page.contains("stoa-server"), "{o:?}");
    }
    // The package's metadata: what it needs, and the script that makes its user.
    let o = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(deb)
        .args(["Package", "Depends"])
        .output()
        .unwrap();
    let fields = String::from_utf8_lossy(&o.stdout);
    assert!(fields.contains("Package: stoa"), "{fields}");
    assert!(fields.contains("bubblewrap"), "{fields}");
    let ctl = tempfile::tempdir().unwrap();
    let o = Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb)
        .arg(ctl.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let postinst = std::fs::read_to_string(ctl.path().join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
}
