//! Python runs end to end: environments, bundled files, exit codes, timeouts, abort,
//! stop and the sandbox.

use serde_json::json;
use stoa_types::RunStatus;

use super::*;

#[tokio::test]
async fn snippet_completes_with_its_output() {
    let s = TestServer::start().await;
    let (id, url) = s.start_code("print('hello from stoa')").await;
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "hello from stoa\n");
    let fin = finished(&events);
    assert_eq!(fin.job.result.return_code, Some(0));
    assert_eq!(fin.job.result.error, None);
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.return_code, Some(0));
    assert_eq!(r.stdout, "hello from stoa\n");
    let phases: Vec<_> = r.phases.iter().map(|p| p.phase.as_str()).collect();
    // Where there are warm sandboxes (bubblewrap, as root) the timeline says how it
    // started: the first run of its kind starts cold.
    let mut want = vec!["queued", "placed", "environment_ready", "started", "ended"];
    if std::path::Path::new("/usr/bin/bwrap").exists() && super::warm::as_root() {
        want.insert(3, "cold");
    }
    assert_eq!(phases, want);
}

#[tokio::test]
async fn file_with_arguments_and_future_import() {
    let s = TestServer::start().await;
    // What the official client sends for `lyceum python run prog.py a b`: an injected
    // sys.argv line in front of a file whose __future__ import must stay first.
    let code = "import sys; sys.argv = ['prog.py', 'a', 'b c']\n\"\"\"Doc.\"\"\"\nfrom __future__ import annotations\nimport sys\nprint(sys.argv)\nprint(__file__.endswith('prog.py'))\n";
    let (id, url) = s
        .start_json(json!({"code": code, "file_name": "prog.py"}))
        .await;
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "['prog.py', 'a', 'b c']\nTrue\n");
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Completed);
    assert_eq!(r.file_name.as_deref(), Some("prog.py"));
}

#[tokio::test]
async fn bundled_local_package_and_prior_imports() {
    let s = TestServer::start().await;
    let files = json!({
        "helper.py": "GREETING = 'hi from helper'\n",
        "pkg/__init__.py": "",
        "pkg/mod.py": "from .util import double\n",
        "pkg/util.py": "def double(x):\n    return 2 * x\n",
    });
    let body = json!({
        "code": "import helper\nfrom pkg.mod import double\nprint(helper.GREETING, double(21))\nprint(json.dumps({'ok': True}))\n",
        "import_files": files.to_string(),
        "prior_imports": ["json"],
        // Junk the official client sends: local names and stdlib names are dropped.
        "requirements_content": "helper\npkg\n__future__\ntomllib\n",
    });
    let (id, url) = s.start_json(body).await;
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "hi from helper 42\n{\"ok\": true}\n");
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
}

#[tokio::test]
async fn failing_script_keeps_its_exit_code() {
    let s = TestServer::start().await;
    let (id, url) = s
        .start_code("print('about to fail')\nimport sys\nsys.exit(3)")
        .await;
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "about to fail\n");
    assert_eq!(finished(&events).job.result.return_code, Some(3));
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.return_code, Some(3));
}

#[tokio::test]
async fn exception_traceback_is_streamed() {
    let s = TestServer::start().await;
    let (id, url) = s
        .start_code("def f():\n    raise ValueError('boom')\nf()\n")
        .await;
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert!(text.contains("Traceback (most recent call last)"), "{text}");
    assert!(text.contains("ValueError: boom"), "{text}");
    let stderr_events = events
        .iter()
        .filter(
            |e| matches!(&e.event, StreamEvent::Output(o) if o.stream.as_deref() == Some("stderr")),
        )
        .count();
    assert!(stderr_events >= 2, "traceback lines are marked as stderr");
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert!(r.stderr.contains("ValueError: boom"));
    assert_eq!(r.return_code, Some(1));
}

#[tokio::test]
async fn timeout_kills_the_run() {
    let s = TestServer::start().await;
    let (id, url) = s
        .start_json(json!({"code": "import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n", "timeout": 3}))
        .await;
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert_eq!(text, "sleeping\n");
    assert_eq!(
        finished(&events).job.result.error.as_deref(),
        Some("timeout after 3 s")
    );
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert_eq!(r.result.error.as_deref(), Some("timeout after 3 s"));
    assert!(
        run_processes(&id).is_empty(),
        "no process of the run is left"
    );
    let st = s.client.streaming_status(&id).await.unwrap();
    assert_eq!(st.status, "timeout");
}

#[tokio::test]
async fn abort_kills_the_process_tree() {
    let s = TestServer::start().await;
    // A child process too, to show the whole tree goes.
    let (id, url) = s
        .start_code("import subprocess, time\np = subprocess.Popen(['sleep', '120'])\nprint('started', flush=True)\ntime.sleep(120)\n")
        .await;
    wait_output(&s.client, &url, "started").await;
    assert!(
        !run_processes(&id).is_empty(),
        "the run is alive before the abort"
    );
    let reply = s.client.abort(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Aborted));
    assert!(
        run_processes(&id).is_empty(),
        "abort returns only once every process is gone"
    );
    let r = s.client.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::Aborted);
    assert_eq!(r.stdout, "started\n");
    let (_, events) = read_stream(&s.client, &url, None).await;
    assert_eq!(
        finished(&events).job.result.error.as_deref(),
        Some("aborted by user")
    );
    // Aborting again is harmless.
    assert_eq!(
        s.client.abort(&id).await.unwrap().status,
        Some(RunStatus::Aborted)
    );
}

#[tokio::test]
async fn abort_of_a_queued_run_never_starts_it() {
    let s = TestServer::start_with(|c| c.worker.enabled = false).await;
    let (id, _) = s.start_code("print('never')").await;
    let r = s.client.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::Pending);
    assert!(r.pending_reason.unwrap().contains("no worker"));
    assert_eq!(
        s.client.abort(&id).await.unwrap().status,
        Some(RunStatus::Aborted)
    );
    let r = s.client.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::Aborted);
    assert_eq!(r.job_start, None);
}

#[tokio::test]
async fn stop_sends_sigterm_then_cancels() {
    let s = TestServer::start().await;
    let code = "import signal, sys, time\n\
                def bye(*_):\n    print('got SIGTERM, cleaning up', flush=True)\n    sys.exit(0)\n\
                signal.signal(signal.SIGTERM, bye)\n\
                print('ready', flush=True)\ntime.sleep(120)\n";
    let (id, url) = s.start_code(code).await;
    wait_output(&s.client, &url, "ready").await;
    let reply = s.client.stop(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Cancelled));
    let r = s.client.execution(&id).await.unwrap();
    assert_status(&r, RunStatus::Cancelled);
    assert!(
        r.stdout.contains("got SIGTERM, cleaning up"),
        "{}",
        r.stdout
    );
    assert_eq!(r.return_code, Some(0));
    assert!(run_processes(&id).is_empty());
}

#[tokio::test]
async fn stop_kills_after_the_grace_period() {
    let s = TestServer::start_with(|c| c.worker.stop_grace_s = 1).await;
    let code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)\n";
    let (id, url) = s.start_code(code).await;
    wait_output(&s.client, &url, "ready").await;
    let reply = s.client.stop(&id).await.unwrap();
    assert_eq!(reply.status, Some(RunStatus::Cancelled));
    assert!(run_processes(&id).is_empty());
}

#[tokio::test]
async fn sandbox_hides_the_server_and_other_runs() {
    if !std::path::Path::new("/usr/bin/bwrap").exists() {
        return missing("bubblewrap (/usr/bin/bwrap)");
    }
    let s = TestServer::start().await;
    let data = s.data_dir();
    let host_marker = format!("/tmp/stoa-host-marker-{}", std::process::id());
    std::fs::write(&host_marker, "x").unwrap();
    let code = format!(
        "import os\n\
         print('db visible:', os.path.exists({db:?}))\n\
         print('runs visible:', os.path.exists({runs:?}) and len(os.listdir({runs:?})))\n\
         print('server env:', 'CARGO_PKG_NAME' in os.environ)\n\
         open('out.txt', 'w').write('ok'); print('cwd writable:', open('out.txt').read())\n\
         try:\n    open('/usr/stoa-test', 'w')\nexcept OSError:\n    print('root read-only: True')\n\
         print('tmp private:', not os.path.exists({marker:?}))\n\
         open('/tmp/from-run', 'w').write('x')\n",
        db = data.join("stoa.db").display().to_string(),
        runs = data.join("runs").display().to_string(),
        marker = host_marker,
    );
    let (id, url) = s.start_code(&code).await;
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert_eq!(
        text,
        "db visible: False\nruns visible: 1\nserver env: False\ncwd writable: ok\nroot read-only: True\ntmp private: True\n",
        "only the run's own directory is visible under runs/"
    );
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
    std::fs::remove_file(&host_marker).unwrap();
    assert!(
        !std::path::Path::new("/tmp/from-run").exists(),
        "the run's /tmp is its own"
    );
    assert!(
        !s.data_dir().join("runs").join(&id).exists(),
        "the working directory is removed after the run"
    );
}

/// Network is off unless asked for; asked for, the server's loopback stays refused.
#[tokio::test]
async fn network_switch_cuts_runs_off() {
    if !std::path::Path::new("/usr/bin/bwrap").exists() {
        return missing("bubblewrap (/usr/bin/bwrap)");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = format!(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n    print('connected')\nexcept OSError:\n    print('no network')\n"
    );
    let s = TestServer::start().await;
    let (_, url) = s.start_code(&code).await;
    assert_eq!(read_stream(&s.client, &url, None).await.0, "no network\n");
    let s = TestServer::start_with(|c| c.python.network = true).await;
    let (_, url) = s.start_code(&code).await;
    assert_eq!(read_stream(&s.client, &url, None).await.0, "no network\n");
}

/// Requirements come from the package index once; the second run with the same
/// requirements reuses the environment and contacts no index: the server is restarted
/// with an index URL where nothing listens, and the run still imports the package.
#[tokio::test]
async fn requirements_are_installed_once_and_reused_offline() {
    if stoa_runtime::python::find_on_path("uv").is_none() {
        missing("uv");
    }
    let s = TestServer::start().await;
    let body = json!({
        "code": "import six\nprint('six', six.__version__)\n",
        // An unpinned name that does not resolve is tolerated with a warning.
        "requirements_content": "six==1.16.0\nstoa-no-such-package-xyz\n",
    });
    let (id, url) = s.start_json(body.clone()).await;
    let (text, events) = read_stream(&s.client, &url, None).await;
    assert!(text.contains("six 1.16.0\n"), "{text}");
    assert!(
        text.contains("skipped requirement 'stoa-no-such-package-xyz'"),
        "{text}"
    );
    let reasons: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            StreamEvent::Status(st) => st.pending_reason.clone(),
            _ => None,
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r == "building Python environment"),
        "{reasons:?}"
    );
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);

    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |c| {
        c.python.index_url = Some("http://127.0.0.1:9/simple".into())
    })
    .await;
    let (id, url) = s.start_json(body).await;
    let (text, _) = read_stream(&s.client, &url, None).await;
    assert!(text.contains("six 1.16.0\n"), "{text}");
    assert_status(&s.wait_end(&id).await, RunStatus::Completed);
}

#[tokio::test]
async fn pinned_requirement_that_cannot_install_fails_the_run() {
    let s =
        TestServer::start_with(|c| c.python.index_url = Some("http://127.0.0.1:9/simple".into()))
            .await;
    let (id, _) = s
        .start_json(json!({"code": "print(1)", "requirements_content": "six==1.16.0"}))
        .await;
    let r = s.wait_end(&id).await;
    assert_status(&r, RunStatus::Failed);
    assert!(
        r.result
            .error
            .as_deref()
            .unwrap()
            .starts_with("requirements could not be installed"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains("could not install requirement 'six==1.16.0'"),
        "{}",
        r.stdout
    );
}

#[tokio::test]
async fn without_a_sandbox_runs_keep_their_own_process_group_and_clean_env() {
    let s = TestServer::start_with(|c| c.python.sandbox = "none".into()).await;
    let (id, url) = s
        .start_code("import os, subprocess, time\nsubprocess.Popen(['sleep', '120'])\nprint('server env:', 'CARGO_PKG_NAME' in os.environ, flush=True)\ntime.sleep(120)\n")
        .await;
    wait_output(&s.client, &url, "server env: False").await;
    assert_eq!(run_processes(&id).len(), 2, "the script and its child");
    assert_eq!(
        s.client.abort(&id).await.unwrap().status,
        Some(RunStatus::Aborted)
    );
    assert!(run_processes(&id).is_empty());
    let (id, _) = s.start_code("print('plain')").await;
    assert_eq!(s.wait_end(&id).await.stdout, "plain\n");
}
