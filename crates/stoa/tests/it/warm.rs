//! Warm sandboxes: a warm run is indistinguishable from a cold one for its code, sees
//! nothing of the run before it, stops and aborts as a cold run does, and finds its
//! pool's prior imports already loaded.

use serde_json::json;
use stoa_types::{ExecutionRecord, RunStatus};

use super::*;

/// True when the tests run as root (warm sandboxes exist only where runs drop to the
/// sandbox uid).
pub fn as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A server whose pools are made at the first use of a key.
async fn warm_server() -> Option<TestServer> {
    if !std::path::Path::new("/usr/bin/bwrap").exists() {
        missing("bubblewrap (/usr/bin/bwrap)");
        return None;
    }
    if !as_root() {
        missing("root (warm sandboxes exist only where runs drop to the sandbox uid)");
        return None;
    }
    Some(
        TestServer::start_with(|c| {
            c.python.warm.enabled = true;
            c.python.warm.learn_uses = 1;
            c.python.warm.per_env = 1;
            c.metrics.listen = Some("127.0.0.1:0".into());
        })
        .await,
    )
}

/// How the run started, from its timeline: `warm` or `cold`.
fn start_kind(r: &ExecutionRecord) -> &str {
    r.phases
        .iter()
        .map(|p| p.phase.as_str())
        .find(|p| *p == "warm" || *p == "cold")
        .unwrap_or("none")
}

/// Starts `body` until a run of it starts `kind` (`warm` once its pool is refilled),
/// waiting for each to end; returns that run's id, stream URL and record.
async fn run_until(
    s: &TestServer,
    body: &serde_json::Value,
    kind: &str,
) -> (String, String, ExecutionRecord) {
    for _ in 0..50 {
        let (id, url) = s.start_json(body.clone()).await;
        let r = s.wait_end(&id).await;
        if start_kind(&r) == kind {
            return (id, url, r);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("no run started {kind} in 50 tries");
}

/// Starts `body` until a run of it starts warm (earlier tries are aborted), returning
/// without waiting for it to end.
async fn start_warm(s: &TestServer, body: &serde_json::Value) -> (String, String) {
    for _ in 0..50 {
        let (id, url) = s.start_json(body.clone()).await;
        let r = wait_started(s, &id).await;
        if start_kind(&r) == "warm" {
            return (id, url);
        }
        s.client.abort(&id).await.unwrap();
        // The pool is refilled between launches.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("no run started warm in 50 tries");
}

/// Waits until the run is running (or over) and returns its record.
async fn wait_started(s: &TestServer, id: &str) -> ExecutionRecord {
    for _ in 0..600 {
        let r = s.client.execution(id).await.unwrap();
        if !matches!(r.status, RunStatus::Pending | RunStatus::Starting) {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("run {id} never started");
}

/// Live processes of a run, by its id in their environment or in their working
/// directory (a warm sandbox's Python gets its run after it started).
fn processes_of(id: &str) -> Vec<u32> {
    let mut out = run_processes(id);
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/cwd"))
            .is_ok_and(|c| c.to_string_lossy().contains(id))
            && !out.contains(&pid)
        {
            out.push(pid);
        }
    }
    out
}

/// What a run's code sees of itself, with its id (in paths and variables) replaced.
const DUMP: &str = r#"
import json, os, sys, __main__
me = os.environ["STOA_EXECUTION_ID"]
hide = lambda v: v.replace(me, "<id>") if isinstance(v, str) else [hide(x) for x in v]
main = {k: type(v).__name__ for k, v in vars(__main__).items()}
print(json.dumps({
    "argv": hide(sys.argv), "orig_argv": hide(sys.orig_argv), "cwd": hide(os.getcwd()),
    "file": hide(__file__), "path": hide(sys.path), "main": main,
    "loader": type(__loader__).__name__, "spec": repr(__spec__), "name": __name__,
    "env": {k: hide(v) for k, v in os.environ.items()},
    "flags": repr(sys.flags), "stdin": os.fstat(0).st_mode, "tmp": os.listdir("/tmp"),
    "modules": sorted(m for m in sys.modules if m not in ("json", "json.decoder", "json.scanner", "json.encoder", "_json")),
    "listing": hide(os.listdir("..")), "uid": os.getuid(), "pgrp_is_sid": os.getpgrp() == os.getsid(0),
}, sort_keys=True))
import atexit, threading, time
class Noisy:
    def __init__(self, what): self.what = what
    def __del__(self): print("finalised", self.what, flush=True)
held = Noisy("a global")
loop = Noisy("a cycle"); loop.me = loop
atexit.register(print, "at exit", flush=True)
threading.Thread(target=lambda: (time.sleep(0.05), print("thread joined", flush=True))).start()
sys.stderr.write("to stderr\n")
def fail():
    raise ValueError("from the run")
fail()
"#;

/// The same script started cold and warm: same output, exit code, argv, cwd,
/// environment (no pool variable), `__file__`, `__main__`, modules, traceback and
/// shutdown (threads joined, atexit, finalisers).
#[tokio::test]
async fn a_warm_run_is_a_cold_run_for_its_code() {
    let Some(s) = warm_server().await else { return };
    let body = json!({"code": DUMP, "file_name": "dump.py"});
    let (_, _, cold) = run_until(&s, &body, "cold").await;
    let (_, _, warm) = run_until(&s, &body, "warm").await;
    for r in [&cold, &warm] {
        assert_status(r, RunStatus::Failed);
        assert_eq!(r.return_code, Some(1));
    }
    let seen = |r: &ExecutionRecord| -> serde_json::Value {
        serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap()
    };
    let (c, w) = (seen(&cold), seen(&warm));
    for field in c.as_object().unwrap().keys() {
        assert_eq!(c[field], w[field], "{field} differs between cold and warm");
    }
    assert_eq!(c, w);
    assert_eq!(c["argv"], json!(["dump.py"]));
    assert_eq!(
        c["file"],
        json!(format!("{}/runs/<id>/dump.py", s.data_dir().display()))
    );
    assert_eq!(
        c["listing"],
        json!(["<id>"]),
        "the run sees only its own directory"
    );
    // Nothing of the pool in the run's environment.
    let env = c["env"].as_object().unwrap();
    assert!(
        env.keys()
            .all(|k| !k.contains("WARM") && !k.contains("PRIOR")),
        "{env:?}"
    );
    assert_eq!(env["HOME"], c["cwd"]);
    // The traceback is the script's alone, line for line.
    let strip = |r: &ExecutionRecord| r.stderr.replace(&r.execution_id, "<id>");
    assert_eq!(strip(&cold), strip(&warm));
    // The interpreter's shutdown as code sees it, in its order: the thread that is not
    // a daemon joined, atexit, a global's finaliser, then a cycle's.
    let out = |r: &ExecutionRecord| r.stdout.replace(&r.execution_id, "<id>");
    assert_eq!(out(&cold), out(&warm));
    let tail: Vec<&str> = warm.stdout.lines().skip(1).collect();
    assert_eq!(
        tail,
        [
            "thread joined",
            "at exit",
            "finalised a global",
            "finalised a cycle"
        ],
        "{}",
        warm.stdout
    );
    assert!(
        warm.stderr
            .starts_with("to stderr\nTraceback (most recent call last):\n  File \""),
        "{}",
        warm.stderr
    );
    assert!(
        warm.stderr.ends_with("ValueError: from the run\n"),
        "{}",
        warm.stderr
    );
    assert!(!warm.stderr.contains("<string>"), "{}", warm.stderr);
    // Exit codes as `python FILE` gives them: SystemExit with a code, with a message,
    // and atexit handlers run.
    for (code, rc, err) in [
        ("import sys\nsys.exit(7)\n", 7, ""),
        ("raise SystemExit('bye')\n", 1, "bye\n"),
        ("import atexit\natexit.register(print, 'at exit')\n", 0, ""),
    ] {
        let (_, _, warm) = run_until(&s, &json!({"code": code}), "warm").await;
        assert_eq!(warm.return_code, Some(rc), "{code}");
        assert_eq!(warm.stderr, err, "{code}");
    }
}

/// A warm sandbox serves one run: what a run leaves in its directory, `/tmp`, its
/// environment or its runs directory is not there for the next run of the same pool;
/// and a pool made for one org's variables never serves another org.
#[tokio::test]
async fn a_warm_sandbox_serves_one_run_and_one_org() {
    let Some(s) = warm_server().await else { return };
    let token = format!("secret-{}", std::process::id());
    let code = format!(
        "import os, sys\n\
         kind = sys.argv[0]\n\
         seen = [os.listdir('.'), os.path.exists('/tmp/left.txt'), os.listdir('..'), os.environ.get('LEFT'), os.environ.get('ORG_SECRET')]\n\
         print('seen', seen)\n\
         open('left.txt', 'w').write({token:?}); open('/tmp/left.txt', 'w').write({token:?})\n\
         try:\n    open('../beside.txt', 'w').write({token:?})\nexcept OSError:\n    pass\n\
         os.environ['LEFT'] = {token:?}; os.putenv('LEFT', {token:?})\n"
    );
    let body = json!({"code": code});
    s.client.env_set(&[("ORG_SECRET", &token)]).await.unwrap();
    // Two warm runs one after the other from the same pool.
    let (_, _, first) = run_until(&s, &body, "warm").await;
    let (_, _, second) = run_until(&s, &body, "warm").await;
    for r in [&first, &second] {
        assert_status(r, RunStatus::Completed);
        assert!(
            r.stdout.starts_with(&format!(
                "seen [['script.py'], False, ['{}'], None, '",
                r.execution_id
            )),
            "a warm run found something of another: {}",
            r.stdout
        );
    }
    // The other org's runs of the same code: never its variables, whatever pool.
    let other = other_org(&s, "warm-attacker").await;
    for _ in 0..3 {
        let st = other
            .start_python_json(&json!({"code": "import os\nprint(os.environ.get('ORG_SECRET'), sorted(os.listdir('..')))\n"}))
            .await
            .unwrap();
        let r = wait_end(&other, &st.execution_id).await;
        assert_status(&r, RunStatus::Completed);
        assert_eq!(r.stdout, format!("None ['{}']\n", st.execution_id));
        assert!(!r.stdout.contains(&token));
    }
    // No warm sandbox's directory outlives its run (each is removed just after its
    // run's end is stored): only the ready ones are left, empty.
    let runs = s.data_dir().join("runs");
    let held = || -> Vec<_> {
        std::fs::read_dir(&runs)
            .unwrap()
            .flatten()
            .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
            .map(|e| e.path())
            .collect()
    };
    for _ in 0..600 {
        if held().is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("run directories are still held: {:?}", held());
}

/// Stop and abort end a warm run as they end a cold one: the handler runs on stop,
/// abort leaves no process, and neither leaves the sandbox's directory.
#[tokio::test]
async fn stop_and_abort_end_a_warm_run() {
    let Some(s) = warm_server().await else { return };
    let code = "import signal, subprocess, sys, time\n\
                def bye(*_):\n    print('got SIGTERM, cleaning up', flush=True)\n    sys.exit(0)\n\
                signal.signal(signal.SIGTERM, bye)\n\
                p = subprocess.Popen(['sleep', '120'])\n\
                print('ready', flush=True)\ntime.sleep(120)\n";
    let body = json!({"code": code, "timeout": 300});
    let (id, url) = start_warm(&s, &body).await;
    wait_output(&s.client, &url, "ready").await;
    assert!(!processes_of(&id).is_empty());
    let reply = s.client.stop(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Cancelled));
    let r = s.client.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::Cancelled);
    assert_eq!(start_kind(&r), "warm");
    assert!(
        r.stdout.contains("got SIGTERM, cleaning up"),
        "{}",
        r.stdout
    );
    assert_eq!(r.return_code, Some(0));
    until_gone(&id).await;

    let (id, url) = start_warm(&s, &body).await;
    wait_output(&s.client, &url, "ready").await;
    let reply = s.client.abort(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Aborted));
    assert!(
        processes_of(&id).is_empty(),
        "abort returns only once every process is gone"
    );
    let r = s.client.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::Aborted);
    assert_eq!(r.stdout, "ready\n");
}

/// A pool with prior imports serves a run whose module was imported before the run
/// existed: `logging` notes when it was imported, which is before the run's submit.
#[tokio::test]
async fn a_prior_imports_pool_has_the_module_loaded_before_the_run() {
    let Some(s) = warm_server().await else { return };
    let code = "import sys, time\n\
                print('loaded', 'logging' in sys.modules, logging is sys.modules['logging'])\n\
                print('imported', repr(logging._startTime))\n";
    let body = json!({"code": code, "prior_imports": ["logging"]});
    let (_, _, cold) = run_until(&s, &body, "cold").await;
    assert!(
        cold.stdout.starts_with("loaded True True\n"),
        "{}",
        cold.stdout
    );
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let submitted = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let (id, _) = s.start_json(body.clone()).await;
        let r = s.wait_end(&id).await;
        assert_status(&r, RunStatus::Completed);
        if start_kind(&r) != "warm" {
            continue;
        }
        let mut lines = r.stdout.lines();
        assert_eq!(lines.next(), Some("loaded True True"));
        let imported: f64 = lines
            .next()
            .and_then(|l| l.strip_prefix("imported "))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{}", r.stdout));
        assert!(
            imported < submitted,
            "logging was imported at {imported}, after the run was submitted at {submitted}"
        );
        // The pool is refilled, and /metrics says so.
        for _ in 0..300 {
            let text = s.scrape_metrics().await;
            if text.lines().any(|l| l == "stoa_warm_sandboxes_ready 1") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "stoa_warm_sandboxes_ready never said 1: {}",
            s.scrape_metrics().await
        );
    }
    panic!("no run started warm in 50 tries");
}

/// Waits (up to 30 s: the sandbox is taken down just after the end is stored) until
/// no process of run `id` is left.
async fn until_gone(id: &str) {
    for _ in 0..600 {
        if processes_of(id).is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("run {id} left processes: {:?}", processes_of(id));
}

/// A warm run ends as its code ends (it reports its exit code as its output closes),
/// and that never loses output nor leaves a process: a child that still holds the
/// run's output when the script ends is ended with the sandbox, as in a cold run, and
/// what it printed is kept.
#[tokio::test]
async fn a_warm_run_ends_with_its_code_and_nothing_outlives_it() {
    let Some(s) = warm_server().await else { return };
    let code = "import subprocess, sys, time\n\
                subprocess.Popen(['sh', '-c', 'echo from the child; exec sleep 600'])\n\
                time.sleep(0.3)\n\
                print('main done', flush=True)\n\
                sys.stderr.write('to stderr\\n')\n";
    let body = json!({"code": code, "timeout": 300});
    let (_, _, cold) = run_until(&s, &body, "cold").await;
    let (id, _, warm) = run_until(&s, &body, "warm").await;
    for r in [&cold, &warm] {
        assert_status(r, RunStatus::Completed);
        assert_eq!(r.return_code, Some(0));
        assert_eq!(r.stdout, "from the child\nmain done\n");
        assert_eq!(r.stderr, "to stderr\n");
    }
    until_gone(&id).await;
    // Every exit code the program reports is the one the run had.
    for (tail, rc) in [
        ("raise SystemExit(3)", 3),
        ("1/0", 1),
        ("import os; os._exit(7)", 7),
    ] {
        let body = json!({"code": format!("print('x')\n{tail}\n")});
        let (id, _, r) = run_until(&s, &body, "warm").await;
        assert_eq!(r.return_code, Some(rc), "{tail}: {}", r.stderr);
        assert_eq!(r.stdout, "x\n", "{tail}");
        until_gone(&id).await;
    }
}

/// A run can write an exit code on the socket its code goes back on, close its output,
/// and go on: that only ends its own run, as `os._exit` would, and its sandbox is
/// killed with everything in it right after. Nothing it left is seen by the next run.
#[tokio::test]
async fn a_run_that_fakes_its_end_only_ends_itself() {
    let Some(s) = warm_server().await else { return };
    let code = r#"
import os, stat, subprocess, time
open("/tmp/left-behind", "w").write("secret")
subprocess.Popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
print("faking my end", flush=True)
found = False
for fd in map(int, os.listdir("/proc/self/fd")):
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.write(fd, b"0\n")
            os.close(fd)
            found = True
    except OSError:
        pass
if not found:
    raise SystemExit("no socket: a cold run")
os.close(1)
os.close(2)
time.sleep(600)
"#;
    let body = json!({"code": code, "timeout": 300});
    let (id, _, r) = run_until(&s, &body, "warm").await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.return_code, Some(0));
    assert_eq!(r.stdout, "faking my end\n");
    until_gone(&id).await;
    let look = json!({"code": "import os\nprint(os.path.exists('/tmp/left-behind'))\n"});
    let (_, _, next) = run_until(&s, &look, "warm").await;
    assert_eq!(next.stdout, "False\n");
}

/// A run that prints a lot just before it ends keeps all of it to the last line, cold
/// or warm: its end is stored only once its output was read.
#[tokio::test]
async fn a_python_runs_output_is_kept_to_the_last_line_cold_or_warm() {
    let Some(s) = warm_server().await else { return };
    let code = "import sys\n\
                sys.stdout.write(''.join(f'{i}\\n' for i in range(1, 40001)))\n\
                sys.stderr.write(''.join(f'{i}\\n' for i in range(1, 20001)))\n\
                print('last line')\n";
    let body = json!({"code": code, "timeout": 120});
    for kind in ["cold", "warm"] {
        let (_, _, r) = run_until(&s, &body, kind).await;
        assert_status(&r, RunStatus::Completed);
        assert_counted(
            &r.stdout,
            40000,
            Some("last line"),
            &format!("{kind} stdout"),
        );
        assert_counted(&r.stderr, 20000, None, &format!("{kind} stderr"));
    }
}
