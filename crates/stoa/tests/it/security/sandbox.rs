//! Attacks: a Python run trying to leave its sandbox (capabilities, mounts, namespaces,
//! the host's files, other runs, the Docker socket), and runs exhausting the machine.

use stoa_types::RunStatus;

use super::super::{TestServer, assert_status, in_ci, read_stream, wait_output};
use super::{other_org, run_to_end};

/// True when sandbox tests can run here (bubblewrap present); says so otherwise.
fn sandbox_available() -> bool {
    if stoa_runtime::python::find_on_path("bwrap").is_some() {
        return true;
    }
    super::super::missing("bubblewrap (bwrap)");
    false
}

/// True when requirement builds can be tested here (bubblewrap and uv); says so otherwise.
fn builds_available() -> bool {
    if !sandbox_available() {
        return false;
    }
    if stoa_runtime::python::find_on_path("uv").is_none() {
        super::super::missing("uv");
        return false;
    }
    true
}

/// True when the tests run as root, as CI does (the case the boundary is about).
fn root() -> bool {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root && in_ci() {
        panic!("the security tests must run as root under CI=true");
    }
    root
}

#[tokio::test]
async fn a_run_has_no_privileges_and_sees_nothing_of_the_host() {
    if !sandbox_available() {
        return;
    }
    let s = TestServer::start().await;
    // A run of the first org, alive while the attacker looks for it.
    let (victim, victim_url) = s
        .start_code("import time\nprint('victim up', flush=True)\ntime.sleep(60)")
        .await;
    wait_output(&s.client, &victim_url, "victim up").await;
    let data = s.data_dir();
    let victim_dir = data.join("runs").join(&victim);
    assert!(
        victim_dir.exists(),
        "the victim's working directory exists on the host"
    );

    let attacker = other_org(&s, "attacker").await;
    let code = format!(
        r#"
import ctypes, ctypes.util, json, os
libc = ctypes.CDLL(None, use_errno=True)
def call(f, *a):
    r = f(*a)
    return "ok" if r == 0 else os.strerror(ctypes.get_errno())
st = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
res = {{
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
    "capeff": st["CapEff"].strip(), "capprm": st["CapPrm"].strip(), "capbnd": st["CapBnd"].strip(),
    "nonewprivs": st["NoNewPrivs"].strip(), "seccomp": st["Seccomp"].strip(),
    "umount_tmp": call(libc.umount2, b"/tmp", 2),
    "mount_tmpfs": call(libc.mount, b"none", b"/mnt", b"tmpfs", 0, None),
    "remount_root_rw": call(libc.mount, None, b"/", None, 32 | 4096, None),
    "setns_net": call(libc.setns, os.open("/proc/self/ns/net", os.O_RDONLY), 0),
    "unshare_user": call(libc.unshare, 0x10000000),
    "chroot": call(libc.chroot, b"/tmp"),
    "vsock": "ok" if libc.socket(40, 1, 0) >= 0 else os.strerror(ctypes.get_errno()),
    "paths": {{p: os.path.exists(p) for p in [
        {admin_key:?}, {data:?} + "/stoa.db", {data:?} + "/master.key", {data:?} + "/storage", {victim_dir:?}, "/var/run/docker.sock", "/run/docker.sock",
        "/root/.cargo", "/root/.bashrc", "/home", "/etc/shadow", "/var/lib/docker", "/sys/fs/cgroup"]}},
    "data_listing": sorted(os.listdir({data:?})),
    "runs_listing": len(os.listdir({data:?} + "/runs")),
    "envs_listing": len(os.listdir({data:?} + "/envs")),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "victim_env": [p for p in os.listdir("/proc") if p.isdigit()
                   and {victim:?}.encode() in open(f"/proc/{{p}}/environ", "rb").read()]
                   if os.access("/proc/1/environ", os.R_OK) else [],
    "etc": sorted(os.listdir("/etc")),
}}
try:
    open("/usr/stoa-write-test", "w")
    res["write_usr"] = "ok"
except OSError as e:
    res["write_usr"] = e.strerror
print("RESULT " + json.dumps(res))
"#,
        data = data.display().to_string(),
        admin_key = data.join("admin.key").display().to_string(),
        victim_dir = victim_dir.display().to_string(),
        victim = victim,
    );
    let (rec, out) = run_to_end(&attacker, serde_json::json!({ "code": code })).await;
    assert_status(&rec, RunStatus::Completed);
    let json = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("the attack printed its result: {out}"));
    let res: serde_json::Value = serde_json::from_str(json).unwrap();
    eprintln!("inside the sandbox: {res:#}");
    if root() {
        assert_ne!(res["uid"], 0, "{res}");
        assert_ne!(res["euid"], 0, "{res}");
    }
    assert_eq!(res["capeff"], "0000000000000000", "{res}");
    assert_eq!(res["capprm"], "0000000000000000", "{res}");
    assert_eq!(res["nonewprivs"], "1", "{res}");
    assert_eq!(res["seccomp"], "2", "a seccomp filter is installed: {res}");
    for call in [
        "umount_tmp",
        "mount_tmpfs",
        "remount_root_rw",
        "setns_net",
        "unshare_user",
        "chroot",
        "vsock",
    ] {
        assert_eq!(
            res[call], "Operation not permitted",
            "{call} is refused: {res}"
        );
    }
    assert_eq!(res["write_usr"], "Read-only file system", "{res}");
    for (path, seen) in res["paths"].as_object().unwrap() {
        assert_eq!(seen, false, "{path} is invisible inside a run");
    }
    // Of the data directory, only the paths to the run's own directory and its own
    // environment exist.
    assert_eq!(
        res["data_listing"],
        serde_json::json!(["envs", "runs"]),
        "{res}"
    );
    assert_eq!(res["runs_listing"], 1, "{res}");
    assert_eq!(res["envs_listing"], 1, "{res}");
    // A private PID namespace: a handful of processes (the sandbox's init and the run).
    assert!(
        res["pids"].as_array().unwrap().len() <= 4,
        "only the run's own processes are visible: {res}"
    );
    assert_eq!(res["victim_env"], serde_json::json!([]), "{res}");
    let etc: Vec<&str> = res["etc"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        !etc.contains(&"shadow") && !etc.contains(&"sudoers"),
        "{etc:?}"
    );
    assert!(etc.contains(&"passwd") && etc.contains(&"ssl"), "{etc:?}");
    // The host's passwd is not the one a run reads.
    s.client.abort(&victim).await.unwrap();
}

#[tokio::test]
async fn limits_end_runs_that_would_take_the_machine_down() {
    if !sandbox_available() {
        return;
    }
    if !root() {
        eprintln!("SKIPPED: cgroup limits need root");
        return;
    }
    let s = TestServer::start_with(|c| {
        let p = &mut c.profiles[0];
        p.memory_mb = Some(128);
        p.pids_limit = Some(64);
        p.disk_mb = Some(32);
    })
    .await;
    let attacker = other_org(&s, "hog").await;
    let run = |code: &str| run_to_end(&attacker, serde_json::json!({ "code": code }));

    // Memory: 1 GiB touched against a 128 MiB limit.
    let (rec, out) = run("b = bytearray(1024 * 1024 * 1024)\nprint('allocated')").await;
    assert_status(&rec, RunStatus::Failed);
    assert_eq!(
        rec.system_errors,
        vec!["out of memory".to_string()],
        "{rec:#?} {out}"
    );
    assert!(!out.contains("allocated"), "{out}");

    // Processes: a fork bomb stops at the pids limit.
    let (rec, out) = run(
        "import os, time\nn = 0\ntry:\n    for _ in range(1500):\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('fork refused after', n, e.strerror, flush=True)\n    os._exit(3)\nprint('forked', n)",
    )
    .await;
    assert!(out.contains("fork refused after"), "{out}");
    assert_eq!(rec.return_code, Some(3), "{rec:#?}");

    // Disk: one big file stops at the limit.
    let (rec, out) = run(
        "try:\n    with open('big', 'wb') as f:\n        for _ in range(64):\n            f.write(b'x' * 1024 * 1024)\nexcept OSError as e:\n    print('write refused:', e.strerror, flush=True)\n    raise SystemExit(4)",
    )
    .await;
    assert!(out.contains("write refused: File too large"), "{out}");
    // The file is capped at the limit, so the run's directory as a whole (the file plus
    // the run's code) is over it: the run either ends on its own refusal (exit 4) or the
    // disk watcher, ticking before it exits, ends it first. Both stop it at the limit.
    let watcher_ended_it = rec
        .system_errors
        .iter()
        .any(|e| e.contains("disk limit exceeded"));
    assert!(rec.return_code == Some(4) || watcher_ended_it, "{rec:#?}");

    // Disk: many small files end the run.
    let (rec, out) = run(
        "import time\nfor i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * 1024 * 1024)\nprint('written', flush=True)\ntime.sleep(30)",
    )
    .await;
    assert_status(&rec, RunStatus::Failed);
    assert!(
        rec.system_errors
            .iter()
            .any(|e| e.contains("disk limit exceeded")),
        "{rec:#?} {out}"
    );

    // /tmp is bounded too.
    let (_, out) = run(
        "try:\n    with open('/tmp/big', 'wb') as f:\n        for _ in range(64):\n            f.write(b'x' * 1024 * 1024)\n            f.flush()\n    print('tmp filled')\nexcept OSError as e:\n    print('tmp refused:', e.strerror)",
    )
    .await;
    assert!(out.contains("tmp refused"), "{out}");
}

/// An sdist whose in-tree build backend is `backend` (it attacks the host when it is
/// imported or asked for a wheel), and a loopback HTTP server that offers it: (server
/// process, requirement line).
fn malicious_sdist(dir: &std::path::Path, backend: &str) -> (std::process::Child, String) {
    let src = dir.join("evil-1.0");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("pyproject.toml"),
        "[project]\nname = \"evil\"\nversion = \"1.0\"\n[build-system]\nrequires = []\nbuild-backend = \"evil_backend\"\nbackend-path = [\".\"]\n",
    )
    .unwrap();
    std::fs::write(src.join("evil_backend.py"), backend).unwrap();
    let st = std::process::Command::new("tar")
        .arg("czf")
        .arg(dir.join("evil-1.0.tar.gz"))
        .arg("-C")
        .arg(dir)
        .arg("evil-1.0")
        .status()
        .unwrap();
    assert!(st.success());
    let port = super::super::free_port();
    let server = std::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    super::super::wait_listening(port);
    (
        server,
        format!("evil @ http://127.0.0.1:{port}/evil-1.0.tar.gz"),
    )
}

#[tokio::test]
async fn a_malicious_build_backend_stays_in_its_sandbox() {
    if !builds_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("owned-by-build");
    // The package server is on loopback: the operator allows that one address.
    let s = TestServer::start_with(|c| {
        c.python.allowed_destinations = vec!["127.0.0.1".into()];
        // Its own uid, so its own egress rules: other tests keep loopback refused.
        c.python.sandbox_uid = 64_510;
    })
    .await;
    // The first org's environment (no requirements) is in the cache.
    let (id, _) = s.start_code("print('clean')").await;
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
    let data = s.data_dir();
    let envs = data.join("envs");
    let victims: Vec<String> = std::fs::read_dir(&envs)
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(!victims.is_empty());
    let attack = format!(
        r#"
try:
    open({marker:?}, "w").write("x"); res["wrote_host"] = True
except OSError as e:
    res["wrote_host"] = e.strerror
try:
    res["admin_key"] = open({admin:?}).read()
except OSError as e:
    res["admin_key"] = e.strerror
res["victims_seen"] = [v for v in {victims:?} if os.path.exists(v)]
planted = []
for sp in [p for v in {victims:?} for p in glob.glob(v + "/lib/python*/site-packages")]:
    try:
        open(sp + "/sitecustomize.py", "w").write("print('POISONED')\n"); planted.append(sp)
    except OSError:
        pass
res["planted"] = planted
res["uid"] = os.getuid()
"#,
        marker = marker.display().to_string(),
        admin = data.join("admin.key").display().to_string(),
        victims = victims,
    );
    let backend = format!(
        "import json, os, glob\nres = {{}}\n{attack}\nraise RuntimeError('ATTACK ' + json.dumps(res))\n"
    );
    let (mut http, line) = malicious_sdist(work.path(), &backend);
    let attacker = other_org(&s, "builder").await;
    let (rec, out) = run_to_end(
        &attacker,
        serde_json::json!({ "code": "print('never')", "requirements_content": line }),
    )
    .await;
    let _ = http.kill();
    assert_status(&rec, RunStatus::Failed);
    let json = out
        .split("ATTACK {")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("the build backend ran and reported: {out}"));
    let res: serde_json::Value =
        serde_json::from_str(&format!("{{{json}")).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("inside the build sandbox: {res:#}");
    assert!(!marker.exists(), "the build wrote outside its sandbox");
    assert_ne!(res["wrote_host"], true, "{res}");
    let key = std::fs::read_to_string(data.join("admin.key")).unwrap_or_default();
    assert!(
        key.trim().is_empty() || !out.contains(key.trim()),
        "the admin key leaked"
    );
    assert_eq!(res["admin_key"], "No such file or directory", "{res}");
    assert_eq!(res["victims_seen"], serde_json::json!([]), "{res}");
    assert_eq!(res["planted"], serde_json::json!([]), "{res}");
    if root() {
        assert_ne!(res["uid"], 0, "{res}");
    }
    // The first org's environment is as it was.
    let (id, url) = s.start_code("print('clean')").await;
    let (out, _) = read_stream(&s.client, &url, None).await;
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
    assert!(!out.contains("POISONED"), "{out}");
    // Cached environments belong to the server, not to the sandbox uid.
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(&envs).unwrap().flatten() {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        assert_eq!(
            m.uid(),
            std::fs::metadata("/proc/self").unwrap().uid(),
            "{}",
            e.path().display()
        );
    }
}

/// Starts a copy of the `stoa` binary (one anybody can run, wherever the checkout
/// lives) serving `dir/data`, behind the command `wrap` (empty: directly), with `PATH`
/// and `envs`; its process and a client with the admin key once it answers.
async fn spawn_server(
    dir: &std::path::Path,
    wrap: &[&str],
    path: &str,
    envs: &[(&str, &str)],
) -> (std::process::Child, stoa_client::Client) {
    let bin = dir.join("stoa");
    std::fs::copy(env!("CARGO_BIN_EXE_stoa"), &bin).unwrap();
    let port = super::super::free_port();
    let mut argv: Vec<std::ffi::OsString> = wrap.iter().map(Into::into).collect();
    argv.push(bin.into());
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir)
        .env("STOA_ADMIN_KEY", super::super::ADMIN_KEY)
        // Killed at the end: no spare networks to leave behind.
        .env("STOA_DOCKER__NETWORK_POOL", "0")
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // A process that another test started while the copy was open for writing holds
    // it until it executes (ETXTBSY): try again a moment later.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.unwrap(),
        }
    };
    let client =
        stoa_client::Client::new(&format!("http://127.0.0.1:{port}"), super::super::ADMIN_KEY);
    for _ in 0..200 {
        if client.machine_types().await.is_ok() {
            return (child, client);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the server did not come up");
}

/// The same rules when Stoa itself runs unprivileged: the release binary started as
/// `nobody` sandboxes runs in a user namespace, without capabilities, with seccomp and
/// without the data directory.
#[tokio::test]
async fn an_unprivileged_server_sandboxes_runs_the_same_way() {
    if !sandbox_available() || !root() {
        eprintln!("SKIPPED: starting a server as nobody needs root and bubblewrap");
        return;
    }
    let interpreter = std::path::Path::new("/usr/bin/python3");
    if !interpreter.exists() {
        super::super::missing("/usr/bin/python3 (an interpreter nobody can run)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let data = dir.path().join("data");
    let (mut child, client) = spawn_server(
        dir.path(),
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        &[
            ("STOA_PYTHON__INTERPRETER", interpreter.to_str().unwrap()),
            ("STOA_PYTHON__INSTALLER", "pip"),
        ],
    )
    .await;
    let code = format!(
        "import ctypes, json, os\nlibc = ctypes.CDLL(None, use_errno=True)\nst = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\nprint('RESULT ' + json.dumps({{'uid': os.getuid(), 'capeff': st['CapEff'].strip(), 'seccomp': st['Seccomp'].strip(), 'umount': libc.umount2(b'/tmp', 2), 'data': os.path.exists({:?})}}))",
        data.join("stoa.db").display().to_string()
    );
    let (rec, out) = run_to_end(&client, serde_json::json!({ "code": code })).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_status(&rec, RunStatus::Completed);
    let json = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("{out}"));
    let res: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_ne!(res["uid"], 0, "{res}");
    assert_eq!(res["capeff"], "0000000000000000", "{res}");
    assert_eq!(res["seccomp"], "2", "{res}");
    assert_eq!(res["umount"], -1, "{res}");
    assert_eq!(res["data"], false, "{res}");
}

/// A build that leaves a link where the server writes the environment's ready marker
/// (pointing at a root-only host file, and at one that does not exist yet) must not
/// make the server write through it.
#[tokio::test]
async fn a_build_cannot_make_the_server_write_through_a_link() {
    if !builds_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let victim = work.path().join("root-only");
    std::fs::write(&victim, "untouched\n").unwrap();
    let planted = work.path().join("planted");
    let s = TestServer::start_with(|c| {
        c.python.allowed_destinations = vec!["127.0.0.1".into()];
        c.python.sandbox_uid = 64_511;
    })
    .await;
    let envs = s.data_dir().join("envs");
    // A valid wheel, after planting links in its own environment (the only one it sees).
    let backend = format!(
        r#"import glob, os, zipfile
def get_requires_for_build_wheel(config_settings=None):
    return []
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    for env in glob.glob({envs:?} + "/*"):
        for target, name in (({victim:?}, ".stoa-ready"), ({planted:?}, "pyvenv.cfg.d")):
            try:
                os.symlink(target, env + "/" + name)
            except OSError:
                pass
    name = "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        z.writestr("evil-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
        z.writestr("evil-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: evil\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("evil-1.0.dist-info/RECORD", "evil-1.0.dist-info/METADATA,,\nevil-1.0.dist-info/WHEEL,,\nevil-1.0.dist-info/RECORD,,\n")
    return name
"#,
        envs = envs.display().to_string(),
        victim = victim.display().to_string(),
        planted = planted.display().to_string(),
    );
    let (mut http, line) = malicious_sdist(work.path(), &backend);
    let attacker = other_org(&s, "linker").await;
    let (rec, out) = run_to_end(
        &attacker,
        serde_json::json!({ "code": "print('ran')", "requirements_content": line }),
    )
    .await;
    let _ = http.kill();
    assert_status(&rec, RunStatus::Completed);
    assert!(out.contains("ran"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "untouched\n",
        "the server wrote through the build's link"
    );
    assert!(!planted.exists());
    // The published marker is the server's own file, not the build's link.
    let env = std::fs::read_dir(&envs)
        .unwrap()
        .flatten()
        .find(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .unwrap();
    let marker = std::fs::symlink_metadata(env.path().join(".stoa-ready")).unwrap();
    assert!(marker.is_file(), "{marker:?}");
}

/// A root server that finds no bubblewrap starts (image runs need none), but never runs
/// a Python run as root: the run fails saying why.
#[tokio::test]
async fn a_root_server_without_bubblewrap_refuses_python_runs() {
    if !root() {
        eprintln!("SKIPPED: the case is a server running as root");
        return;
    }
    let interpreter = stoa_runtime::Interpreter::probe("python3").unwrap().path;
    let dir = tempfile::tempdir().unwrap();
    // A PATH with neither bwrap nor setpriv on it.
    let (mut child, client) = spawn_server(
        dir.path(),
        &[],
        interpreter.parent().unwrap().to_str().unwrap(),
        &[("STOA_PYTHON__INTERPRETER", interpreter.to_str().unwrap())],
    )
    .await;
    let (rec, out) = run_to_end(
        &client,
        serde_json::json!({ "code": "import os\nprint('uid', os.getuid())" }),
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_status(&rec, RunStatus::SystemFailure);
    assert!(!out.contains("uid 0"), "{out}");
    assert!(
        rec.system_errors
            .iter()
            .any(|e| e.contains("need bubblewrap")),
        "{rec:#?}"
    );
}
