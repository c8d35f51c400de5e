//! The web dashboard in a real headless Chromium, driven over WebDriver
//! (chromedriver) against the real server: sign-in, starting a run from the page and
//! watching its output arrive live, its charts, abort from the page, org isolation, and
//! the CSRF check. Screenshots go to `target/ui-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{Value, json};
use stoa_types::RunStatus;

use super::{
    ADMIN_KEY, TestServer, assert_status, free_port, missing, org_with_key, wait_listening,
};

/// Browser tests one at a time: each starts a Chromium, and the machine has 2 cores.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// A headless Chromium under chromedriver; both go when this is dropped.
struct Chromium {
    client: Browser,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // chromedriver and the browsers it started share its process group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
    }
}

/// Chromium, or `None` (said, and a failure under CI) when it is not installed.
async fn chromium() -> Option<Chromium> {
    let (Some(browser), Some(driver)) = (on_path("chromium"), on_path("chromedriver")) else {
        missing("Chromium and chromedriver (Debian's chromium and chromium-driver packages)");
        return None;
    };
    let port = free_port();
    let mut cmd = Command::new(driver);
    cmd.arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let driver = cmd.spawn().expect("chromedriver starts");
    wait_listening(port);
    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": browser,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1280,1000",
                     format!("--user-data-dir={}", profile.path().display())],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    Some(Chromium {
        client,
        driver,
        _profile: profile,
    })
}

/// Polls `js` (a function body returning a value) until it returns something truthy;
/// returns that value. Panics with `what` after `secs`.
async fn until(b: &Browser, js: &str, secs: u64, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = b.execute(js, vec![]).await.unwrap_or(Value::Null);
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(x) => *x,
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let page = b.source().await.unwrap_or_default();
            panic!("{what}: not within {secs} s; the page is:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The text of the element `css` names, once it is on the page (30 s at most: a click
/// may return before the page it leads to has loaded).
async fn text_of(b: &Browser, css: &str) -> String {
    b.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} on the page: {e}"))
        .text()
        .await
        .unwrap()
}

fn shot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(b: &Browser, name: &str) {
    let png = b.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name} is a PNG");
    std::fs::write(shot_dir().join(name), png).unwrap();
}

async fn sign_in(b: &Browser, base: &str, key: &str) {
    b.goto(&format!("{base}/ui/login")).await.unwrap();
    type_into(b, "#key", key).await;
    click(b, "form.stack button").await;
    until(
        b,
        "return document.readyState === 'complete'
             && (location.pathname !== '/ui/login' || document.querySelector('p.error') !== null);",
        30,
        "the page after signing in",
    )
    .await;
}

/// Clicks the element `css` names.
async fn click(b: &Browser, css: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} on the page: {e}"))
        .click()
        .await
        .unwrap();
}

/// Types `text` into the field `css` names.
async fn type_into(b: &Browser, css: &str, text: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} on the page: {e}"))
        .send_keys(text)
        .await
        .unwrap();
}

/// Puts `text` in the start form's text area `field` and starts the run; the id of the
/// run, once the browser is on its page.
async fn start_from_form(b: &Browser, field: &str, text: &str) -> String {
    b.execute(
        &format!("document.getElementById('{field}').value = arguments[0];"),
        vec![json!(text)],
    )
    .await
    .unwrap();
    click(b, "#start button[type=submit]").await;
    let url = until(
        b,
        "return location.pathname.startsWith('/ui/runs/') ? location.pathname : null;",
        30,
        "the run's page",
    )
    .await;
    url.as_str()
        .unwrap()
        .trim_start_matches("/ui/runs/")
        .to_string()
}

/// What a POST from the page's own origin answers: (status, body).
async fn post_from_page(b: &Browser, path: &str, form: &str) -> (u64, String) {
    let v = b
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch(arguments[0], {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: arguments[1], redirect: 'manual'})
               .then(r => r.text().then(t => done([r.status, t])))
               .catch(e => done([0, String(e)]));",
            vec![json!(path), json!(form)],
        )
        .await
        .unwrap();
    (
        v[0].as_u64().unwrap(),
        v[1].as_str().unwrap_or_default().to_string(),
    )
}

const TICKS: &str = "import time
t = time.time()
i = 0
while time.time() - t < 4:
    sum(range(100000))
    if time.time() - t > i * 0.5:
        print('tick', i, flush=True)
        i += 1
print('\\x1b[32mdone\\x1b[0m', flush=True)
";

#[tokio::test]
async fn dashboard_signs_in_starts_a_run_and_follows_it_live() {
    let _one = ONE_BROWSER.lock().await;
    let s = TestServer::start_with(|c| {
        c.metrics.interval_ms = 200;
        c.profiles.push(stoa_server::config::ProfileConfig {
            name: "cpu.2".into(),
            price_per_hour: 0.5,
            cpus: Some(2.0),
            ..Default::default()
        });
    })
    .await;
    let Some(chrome) = chromium().await else {
        return;
    };
    let b = &chrome.client;
    let base = s.client.base().to_string();

    // Without a session every page sends the browser to sign in; a wrong key is refused.
    b.goto(&format!("{base}/ui/")).await.unwrap();
    assert!(b.current_url().await.unwrap().path().ends_with("/ui/login"));
    sign_in(b, &base, "lk_not_a_key_at_all_0000000000000").await;
    assert!(text_of(b, "p.error").await.contains("not valid"));
    b.goto(&format!("{base}/ui/")).await.unwrap();
    assert!(b.current_url().await.unwrap().path().ends_with("/ui/login"));

    sign_in(b, &base, ADMIN_KEY).await;
    assert_eq!(b.current_url().await.unwrap().path(), "/ui/");
    assert_eq!(text_of(b, "h1").await, "Runs");

    // Start a snippet from the page; it lands on the run's page.
    b.goto(&format!("{base}/ui/new")).await.unwrap();
    let id = start_from_form(b, "code", TICKS).await;
    // A mark that a reload would wipe: the lines must arrive without one.
    b.execute("window.__stoaMark = 7;", vec![]).await.unwrap();
    let seen = until(
        b,
        "const o = document.getElementById('output').textContent;
         return o.includes('tick 1') ? [window.__stoaMark, document.getElementById('run-state').textContent, o] : null;",
        30,
        "output lines arriving live",
    )
    .await;
    assert_eq!(seen[0], json!(7), "the page was not reloaded: {seen}");
    assert!(
        ["pending", "starting", "running"].contains(&seen[1].as_str().unwrap()),
        "the line came while the run ran: {seen}"
    );
    assert!(!seen[2].as_str().unwrap().contains("done"), "{seen}");

    // It reaches completed, with its CPU chart drawn and the ANSI colour rendered.
    until(
        b,
        "const st = document.getElementById('run-state');
         return st && st.textContent === 'completed' && window.__stoaMark === undefined
             && document.querySelector('#chart-cpu polyline') !== null
             && document.querySelector('#output span.c2') !== null;",
        60,
        "completed (the page reloaded with the final record), with the CPU chart and the coloured line",
    )
    .await;
    let points: u64 = b
        .find(Locator::Id("chart-cpu"))
        .await
        .unwrap()
        .attr("data-points")
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert!(points >= 2, "the CPU chart has {points} points");
    assert_eq!(text_of(b, "#run-exit").await, "0");
    let rec = s.wait_end(&id).await;
    assert_status(&rec, RunStatus::Completed);
    assert!(rec.stdout.contains("tick 0"));
    // Tall enough for the output and the charts.
    b.set_window_size(1280, 1900).await.unwrap();
    screenshot(b, "run.png").await;
    b.set_window_size(1280, 1000).await.unwrap();

    // POSTs without the session's CSRF token are refused and change nothing.
    let before = s.client.history(1, 0).await.unwrap().total_executions;
    let (status, body) = post_from_page(b, "/ui/new", "kind=python&code=print(1)").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _) = post_from_page(
        b,
        &format!("/ui/runs/{id}/delete"),
        "csrf=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        s.client.history(1, 0).await.unwrap().total_executions,
        before
    );
    assert!(s.client.execution(&id).await.is_ok(), "not deleted");

    // The runs page lists it; a filter that excludes it does not.
    b.goto(&format!("{base}/ui/?kind=python")).await.unwrap();
    let row = format!("tr[data-id='{id}']");
    assert!(text_of(b, &row).await.contains("completed"));
    b.goto(&format!("{base}/ui/?kind=image")).await.unwrap();
    assert!(b.find(Locator::Css(&row)).await.is_err());

    // A GPU selection over two profiles: the comparison with its recommendation.
    let sel = s
        .client
        .start_selection(&json!({"code": "print('profiling')", "profiles": ["cpu", "cpu.2"]}))
        .await
        .unwrap();
    let sel_id = sel["execution_id"].as_str().unwrap().to_string();
    for _ in 0..300 {
        let st = s.client.selection_status(&sel_id).await.unwrap();
        if st["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.goto(&format!("{base}/ui/selection/{sel_id}"))
        .await
        .unwrap();
    assert!(
        text_of(b, "#recommendation")
            .await
            .starts_with("Recommended: cpu")
    );
    assert_eq!(
        b.find_all(Locator::Css("table.selection tbody tr"))
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(b.find(Locator::Css("tr.recommended")).await.is_ok());
    screenshot(b, "gpu-selection.png").await;

    b.goto(&format!("{base}/ui/")).await.unwrap();
    screenshot(b, "runs.png").await;
}

#[tokio::test]
async fn dashboard_aborts_a_run_and_shows_no_other_orgs_run() {
    let _one = ONE_BROWSER.lock().await;
    let s = TestServer::start().await;
    let Some(chrome) = chromium().await else {
        return;
    };
    let b = &chrome.client;
    let base = s.client.base().to_string();
    sign_in(b, &base, ADMIN_KEY).await;

    // Abort from the run's page (confirmed in the dialog): the run ends aborted.
    let (id, _) = s
        .start_code("import time\nprint('up', flush=True)\ntime.sleep(120)")
        .await;
    b.goto(&format!("{base}/ui/runs/{id}")).await.unwrap();
    until(
        b,
        "return document.getElementById('output').textContent.includes('up');",
        30,
        "the run's first line",
    )
    .await;
    click(b, "button.abort").await;
    b.accept_alert().await.expect("the confirmation dialog");
    let rec = s.wait_end(&id).await;
    assert_status(&rec, RunStatus::Aborted);
    until(
        b,
        "const st = document.getElementById('run-state'); return st && st.textContent === 'aborted';",
        20,
        "the page showing aborted",
    )
    .await;

    // Another org's run is the not-found page, as in the API.
    let (other, rival_key) = org_with_key(&s, "rival").await;
    let theirs = other
        .start_python(&stoa_types::PythonStartRequest {
            code: "print('secret of rival')".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .execution_id;
    b.goto(&format!("{base}/ui/runs/{theirs}")).await.unwrap();
    assert_eq!(text_of(b, "h1").await, "Not found");
    assert!(!b.source().await.unwrap().contains("secret of rival"));
    b.goto(&format!("{base}/ui/runs/{theirs}/log"))
        .await
        .unwrap();
    assert!(!b.source().await.unwrap().contains("secret of rival"));
    b.goto(&format!("{base}/ui/")).await.unwrap();
    assert!(
        b.find(Locator::Css(&format!("tr[data-id='{theirs}']")))
            .await
            .is_err()
    );

    // The fleet (an admin key): the embedded worker and its profile.
    b.goto(&format!("{base}/ui/fleet")).await.unwrap();
    assert!(text_of(b, "table.fleet tbody").await.contains("embedded"));
    assert!(text_of(b, "table.queues tbody").await.contains("cpu"));

    // Secrets: set from the page (name and kind shown, the value never sent back), then
    // deleted from the page; the API sees both.
    b.goto(&format!("{base}/ui/secrets")).await.unwrap();
    type_into(b, "#sname", "UI_TOKEN").await;
    type_into(b, "#svalue", "hunter2-from-the-page").await;
    click(b, "form.stack button").await;
    until(
        b,
        "return document.querySelector('table.secrets tbody').textContent.includes('UI_TOKEN');",
        30,
        "the variable listed",
    )
    .await;
    assert!(!b.source().await.unwrap().contains("hunter2"));
    let listed = |v: Value| v.to_string().contains("UI_TOKEN");
    assert!(listed(s.client.env_list().await.unwrap()));
    click(b, "table.secrets form.action button").await;
    b.accept_alert().await.expect("the confirmation dialog");
    until(
        b,
        "return document.querySelector('table.secrets tbody').textContent.includes('None yet');",
        30,
        "the variable gone",
    )
    .await;
    assert!(!listed(s.client.env_list().await.unwrap()));

    // Signing out ends the session, also for a copy of its cookie.
    let copied = b
        .get_named_cookie("stoa_session")
        .await
        .expect("the session cookie")
        .value()
        .to_string();
    let with_copy = || async {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .get(format!("{base}/ui/"))
            .header("Cookie", format!("stoa_session={copied}"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(with_copy().await, 200);
    click(b, "form.signout button").await;
    until(
        b,
        "return location.pathname === '/ui/login';",
        30,
        "the sign-in page",
    )
    .await;
    b.goto(&format!("{base}/ui/fleet")).await.unwrap();
    assert!(b.current_url().await.unwrap().path().ends_with("/ui/login"));
    assert_eq!(with_copy().await, 303, "the copied cookie is over too");

    // The other org, signed in: its own run only, and no worker details (not an admin).
    sign_in(b, &base, &rival_key).await;
    let mine = format!("tr[data-id='{id}']");
    assert!(b.find(Locator::Css(&mine)).await.is_err());
    assert!(
        b.find(Locator::Css(&format!("tr[data-id='{theirs}']")))
            .await
            .is_ok()
    );
    b.goto(&format!("{base}/ui/runs/{id}")).await.unwrap();
    assert_eq!(text_of(b, "h1").await, "Not found");
    b.goto(&format!("{base}/ui/fleet")).await.unwrap();
    assert!(b.find(Locator::Css("table.fleet")).await.is_err());
    assert!(text_of(b, "table.queues tbody").await.contains("cpu"));

    // Its key revoked, its session is over at once.
    let store = s.handle.as_ref().unwrap().store.clone();
    assert!(store.revoke_key(&rival_key[..11]).await.unwrap());
    b.goto(&format!("{base}/ui/")).await.unwrap();
    assert!(b.current_url().await.unwrap().path().ends_with("/ui/login"));

    // A sign-in posted from another site, or by a client that says nothing of where it
    // comes from, is refused.
    let refused = reqwest::Client::new()
        .post(format!("{base}/ui/login"))
        .header("Origin", "http://evil.example")
        .form(&[("key", ADMIN_KEY)])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.headers().get("set-cookie").is_none());
    let bare = reqwest::Client::new()
        .post(format!("{base}/ui/login"))
        .form(&[("key", ADMIN_KEY)])
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 403);
}

const TWO_SERVICES: &str = r#"
services:
  alpha:
    image: local/busybox:full
    command: ["sh", "-c", "for i in 1 2 3; do echo alpha-line-$$i; sleep 0.2; done"]
  beta:
    image: local/busybox:full
    command: ["sh", "-c", "for i in 1 2 3; do echo beta-line-$$i; sleep 0.2; done; echo beta-err >&2"]
"#;

#[tokio::test]
async fn dashboard_starts_a_compose_run_and_filters_its_output_by_service() {
    let _one = ONE_BROWSER.lock().await;
    if !super::docker_runs::engine_ready() {
        return;
    }
    let s = TestServer::start().await;
    let Some(chrome) = chromium().await else {
        return;
    };
    let b = &chrome.client;
    let base = s.client.base().to_string();
    sign_in(b, &base, ADMIN_KEY).await;

    // A compose file from the start form.
    b.goto(&format!("{base}/ui/new")).await.unwrap();
    click(b, "input[name=kind][value=compose]").await;
    assert!(
        !b.find(Locator::Id("code"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "the Python fields are hidden for a compose file"
    );
    let id = start_from_form(b, "compose", TWO_SERVICES).await;
    let rec = s.wait_end(&id).await;
    assert_status(&rec, RunStatus::Completed);
    // The page of the ended run (the live page reloads itself once the run ends).
    b.goto(&format!("{base}/ui/runs/{id}")).await.unwrap();

    // Both services are offered once their lines arrived; choosing one shows only its
    // lines, and a search narrows further.
    until(
        b,
        "const o = Array.from(document.querySelectorAll('#service option')).map(x => x.value);
         return o.includes('alpha') && o.includes('beta')
             && document.getElementById('output').textContent.includes('beta-err');",
        30,
        "the services in the filter",
    )
    .await;
    let visible = "return Array.from(document.querySelectorAll('#output .l'))
        .filter(d => !d.hidden).map(d => [d.textContent, d.classList.contains('err')]);";
    b.find(Locator::Id("service"))
        .await
        .unwrap()
        .select_by_value("beta")
        .await
        .unwrap();
    let lines = b.execute(visible, vec![]).await.unwrap();
    let lines = lines.as_array().unwrap();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l[0].as_str().unwrap().starts_with("beta | ")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l[0] == "beta | beta-err" && l[1] == true),
        "stderr is marked: {lines:?}"
    );
    type_into(b, "#search", "line-2").await;
    let lines = b.execute(visible, vec![]).await.unwrap();
    assert_eq!(lines, json!([["beta | beta-line-2", false]]));
}
