//! The dashboard's pages. Each reads what the API would answer for the session's org
//! (calling the same functions), never more.

use std::collections::{BTreeMap, HashMap};

use axum::Form;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, PreEscaped, html};
use serde_json::{Value, json};
use stoa_store::{OutputStream, Run, RunFilter, RunKind};
use stoa_types::RunStatus;

use super::session::Session;
use super::{Nav, UiError, charts, error_lines, layout};
use crate::app::{self, Start};
use crate::error::ApiError;
use crate::state::AppState;

type Page = Result<Response, UiError>;

/// The run kinds the filters offer.
const KINDS: [&str; 4] = ["python", "image", "compose", "gpu_selection"];

fn badge(status: RunStatus) -> Markup {
    html! { span class={ "badge s-" (status) } { (status) } }
}

/// A stored time as the page shows it (UTC, to the second).
fn when(t: &stoa_core::time::Time) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn duration(run: &Run) -> String {
    match &run.job_start {
        Some(s) => human_secs(crate::api::seconds_between(s, run.job_end.as_ref())),
        None => "–".into(),
    }
}

/// A phase's time: the first one's as a time of day, the others' as seconds after it
/// (`+1.234 s`).
fn since_first(first: &stoa_core::time::Time, at: &stoa_core::time::Time) -> String {
    if at == first {
        at.format("%H:%M:%S%.3f UTC").to_string()
    } else {
        format!(
            "+{:.3} s",
            (*at - *first).num_microseconds().unwrap_or(0) as f64 / 1e6
        )
    }
}

fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{}m {:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h {:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn query_error(name: &str, msg: &str, input: &str) -> UiError {
    UiError::Api(ApiError::query(
        name,
        "value_error",
        msg,
        Some(input.into()),
    ))
}

/// The runs list's filters, from the page's query.
struct RunsQuery {
    pairs: Vec<(&'static str, String)>,
    filter: RunFilter,
    page: i64,
}

impl RunsQuery {
    fn parse(q: &HashMap<String, String>, page_size: i64) -> Result<RunsQuery, UiError> {
        let get = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let mut pairs = Vec::new();
        let mut filter = RunFilter {
            limit: page_size,
            ..Default::default()
        };
        if let Some(s) = get("state") {
            filter.statuses = if s == "active" {
                vec![RunStatus::Pending, RunStatus::Starting, RunStatus::Running]
            } else {
                vec![
                    s.parse::<RunStatus>()
                        .map_err(|e| query_error("state", &e, s))?,
                ]
            };
            pairs.push(("state", s.to_string()));
        }
        if let Some(k) = get("kind") {
            if !KINDS.contains(&k) {
                return Err(query_error(
                    "kind",
                    "a kind is python, image, compose or gpu_selection",
                    k,
                ));
            }
            filter.kind = Some(k.to_string());
            pairs.push(("kind", k.to_string()));
        }
        for (name, slot) in [
            ("profile", &mut filter.profile),
            ("label", &mut filter.label),
            ("name", &mut filter.run_name),
        ] {
            if let Some(v) = get(name) {
                *slot = Some(v.to_string());
                pairs.push((name, v.to_string()));
            }
        }
        let page = match get("page") {
            None => 1,
            Some(p) => p
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=1_000_000).contains(n))
                .ok_or_else(|| query_error("page", "a page is a number from 1", p))?,
        };
        filter.offset = (page - 1) * page_size;
        Ok(RunsQuery {
            pairs,
            filter,
            page,
        })
    }

    /// This query as a URL query string, with `page` set to `page` (none: left out).
    fn to_query(&self, page: Option<i64>) -> String {
        let mut s = reqwest::Url::parse("http://ui/").expect("a valid URL");
        {
            let mut q = s.query_pairs_mut();
            for (k, v) in &self.pairs {
                q.append_pair(k, v);
            }
            if let Some(p) = page {
                q.append_pair("page", &p.to_string());
            }
        }
        s.query().unwrap_or_default().to_string()
    }

    fn get(&self, k: &str) -> &str {
        self.pairs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }
}

fn rows(state: &AppState, runs: &[Run]) -> Markup {
    html! {
        @if runs.is_empty() {
            tr { td colspan="7" { "No runs match." } }
        }
        @for r in runs {
            tr data-id=(r.id) data-status=(r.status) {
                td {
                    @if let Some(n) = r.run_name.as_deref().or(r.file_name.as_deref()) {
                        a href={ "/ui/runs/" (r.id) } { (n) } br; small.mono { (r.id) }
                    } @else {
                        a.mono href={ "/ui/runs/" (r.id) } { (r.id) }
                    }
                }
                td { (r.job_type) }
                td { (r.execution_type) }
                td { (badge(r.status)) }
                td { (r.error.clone().or_else(|| state.engine.live_reason(r)).unwrap_or_default()) }
                td { (when(&r.created_at)) }
                td { (duration(r)) }
            }
        }
    }
}

/// One page of the org's runs, and whether an older page follows. (A filtered count
/// would read every matching run; the page reads one more row instead.)
async fn runs_of(
    state: &AppState,
    s: &Session,
    q: &HashMap<String, String>,
) -> Result<(RunsQuery, Vec<Run>, bool), UiError> {
    let mut rq = RunsQuery::parse(q, state.config.ui.page_size as i64)?;
    let org = &s.caller.org.id;
    rq.filter.limit += 1;
    let mut runs = state.store.list_runs(org, &rq.filter).await?;
    rq.filter.limit -= 1;
    let more = runs.len() as i64 > rq.filter.limit;
    runs.truncate(rq.filter.limit as usize);
    Ok((rq, runs, more))
}

/// The runs page: the org's runs, newest first, filtered and paginated; the table
/// refreshes itself while the page is open.
pub async fn runs(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Page {
    let (rq, runs, more) = runs_of(&state, &s, &q).await?;
    let counts = state.store.count_runs_by_status(&s.caller.org.id).await?;
    let total: i64 = counts.values().sum();
    let states = [
        "active",
        "pending",
        "starting",
        "running",
        "completed",
        "failed",
        "system_failure",
        "aborted",
        "cancelled",
    ];
    let select = |name: &str, label: &str, options: &[&str]| {
        let current = rq.get(name).to_string();
        html! {
            label for=(name) { (label) }
            select id=(name) name=(name) {
                option value="" { "any" }
                @for o in options {
                    option value=(o) selected[current == *o] { (o) }
                }
            }
        }
    };
    let profiles: Vec<&str> = state
        .config
        .profiles
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let body = html! {
        h1 { "Runs" }
        form.filters method="get" action="/ui/" role="search" {
            (select("state", "State", &states))
            (select("kind", "Kind", &KINDS))
            (select("profile", "Profile", &profiles))
            label for="label" { "Label" }
            input #label name="label" value=(rq.get("label"));
            label for="name" { "Name" }
            input #name name="name" value=(rq.get("name"));
            button type="submit" { "Filter" }
        }
        p #runs-count {
            (total) " runs"
            @for (st, n) in &counts { " · " (n) " " (st) }
            " — page " (rq.page)
        }
        table.runs {
            caption.visually-hidden { "Runs, newest first" }
            thead { tr { th scope="col" { "Run" } th scope="col" { "Kind" } th scope="col" { "Profile" } th scope="col" { "State" } th scope="col" { "Reason" } th scope="col" { "Created (UTC)" } th scope="col" { "Duration" } } }
            tbody #runs-rows data-refresh={ "/ui/runs/rows?" (rq.to_query(Some(rq.page))) } {
                (rows(&state, &runs))
            }
        }
        nav.pages aria-label="Pages" {
            @if rq.page > 1 { a rel="prev" href={ "/ui/?" (rq.to_query(Some(rq.page - 1))) } { "← Newer" } }
            @if more { a rel="next" href={ "/ui/?" (rq.to_query(Some(rq.page + 1))) } { "Older →" } }
        }
    };
    Ok(layout("Runs", Some((Nav::Runs, &s)), body).into_response())
}

/// The runs table's rows alone (the page refreshes them while open).
pub async fn run_rows(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Page {
    let (_, runs, _) = runs_of(&state, &s, &q).await?;
    Ok(rows(&state, &runs).into_response())
}

/// ANSI SGR colours to HTML spans; every other escape sequence is dropped.
pub(crate) fn ansi_html(text: &str) -> Markup {
    let mut out = String::with_capacity(text.len());
    let mut open = false;
    let mut rest = text;
    while let Some(i) = rest.find('\x1b') {
        escape_into(&mut out, &rest[..i]);
        rest = &rest[i + 1..];
        let Some(body) = rest.strip_prefix('[') else {
            continue;
        };
        let end = body
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(body.len());
        let (params, cmd) = (&body[..end], body[end..].chars().next());
        rest = &body[(end + cmd.map_or(0, char::len_utf8)).min(body.len())..];
        if cmd != Some('m') {
            continue;
        }
        if open {
            out.push_str("</span>");
            open = false;
        }
        let classes: Vec<String> = params
            .split(';')
            .filter_map(|p| p.parse::<u8>().ok())
            .filter_map(|n| match n {
                1 => Some("b".to_string()),
                30..=37 | 90..=97 => Some(format!("c{}", n % 10 + if n >= 90 { 8 } else { 0 })),
                _ => None,
            })
            .collect();
        if !classes.is_empty() {
            out.push_str(&format!("<span class=\"{}\">", classes.join(" ")));
            open = true;
        }
    }
    escape_into(&mut out, rest);
    if open {
        out.push_str("</span>");
    }
    PreEscaped(out)
}

/// Appends `text` escaped for HTML (maud's own escaping).
fn escape_into(out: &mut String, text: &str) {
    use std::fmt::Write;
    let _ = maud::Escaper::new(out).write_str(text);
}

/// The compose service an output line came from (`svc | text`).
fn line_service(line: &str) -> Option<&str> {
    let (svc, _) = line.split_once(" | ")?;
    (!svc.is_empty()
        && svc
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    .then_some(svc)
}

fn spec_of(run: &Run) -> Value {
    serde_json::from_str(&run.spec).unwrap_or(Value::Null)
}

/// What started the run, readable; values of environment variables are not shown.
fn request_of(run: &Run) -> Markup {
    let spec = spec_of(run);
    let text = |k: &str| spec.get(k).and_then(Value::as_str).map(str::to_string);
    html! {
        @match run.job_type {
            RunKind::Python => {
                @if let Some(code) = text("code") { h3 { "Code" } pre.code { (code) } }
                @if let Some(r) = text("requirements") { h3 { "Requirements" } pre.code { (r) } }
                @if let Some(files) = spec.get("import_files").and_then(Value::as_object) {
                    @if !files.is_empty() { h3 { "Local modules" } ul { @for f in files.keys() { li.mono { (f) } } } }
                }
            }
            RunKind::Image | RunKind::Notebook => {
                dl {
                    dt { "Image" } dd.mono { (text("image").unwrap_or_default()) }
                    dt { "Command" } dd.mono { (spec.get("cmd").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")).unwrap_or_else(|| "the image's own".into())) }
                    @if let Some(env) = spec.get("env").and_then(Value::as_array) {
                        dt { "Environment" }
                        dd.mono { (env.iter().filter_map(|p| p.get(0).and_then(Value::as_str)).map(|n| format!("{n}=•••")).collect::<Vec<_>>().join(" ")) }
                    }
                }
            }
            RunKind::Compose => {
                @if let Some(c) = text("compose_file_code") { h3 { "Compose file" } pre.code { (c) } }
            }
            RunKind::GpuSelection => {
                p { a href={ "/ui/selection/" (run.id) } { "The comparison of its profiles" } }
            }
        }
    }
}

/// The metric charts of a run (one of the session's org, loaded with `load_run`), for
/// its page and the page's refresh.
async fn charts_of(state: &AppState, run: &Run) -> Result<Markup, UiError> {
    let secs = run
        .job_start
        .as_ref()
        .map(|st| crate::api::seconds_between(st, run.job_end.as_ref()))
        .unwrap_or(0.0);
    // About 150 points at most, one per second for short runs.
    let step = ((secs / 150.0).ceil() as i64).max(1);
    let q = HashMap::from([("step".to_string(), format!("{step}s"))]);
    Ok(charts::render(
        &crate::run_metrics::series(state, run, &q).await?,
    ))
}

/// A run's page: its header, timeline, live output, charts, controls and request.
pub async fn run(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> Page {
    let run = app::load_run(&state, &s.caller.org.id, &id).await?;
    let pending_reason = state.engine.live_reason(&run);
    let chunks = state
        .store
        .read_output(run.id, 0, 100_000, state.config.ui.page_output_bytes)
        .await?;
    let charts = charts_of(&state, &run).await?;
    let active = !run.status.is_terminal();
    let name = run
        .run_name
        .clone()
        .or(run.file_name.clone())
        .unwrap_or_else(|| format!("Run {}", run.id));
    let price = run
        .price_per_hour
        .map(|p| format!("{p:.2} per hour"))
        .unwrap_or_else(|| "–".into());
    let action = |verb: &str, label: &str, confirm: &str| {
        html! {
            form.action method="post" action={ "/ui/runs/" (run.id) "/" (verb) } data-confirm=(confirm) {
                (s.csrf_field())
                button type="submit" class={ "btn " (verb) } { (label) }
            }
        }
    };
    let body = html! {
        h1 { (name) " " span #run-badge { (badge(run.status)) } }
        section #run-head data-id=(run.id) data-status=(run.status) data-kind=(run.job_type)
            data-stream={ "/api/v1/stream/" (run.id) } {
            dl.head {
                dt { "State" } dd #run-state { (run.status) }
                dt { "Exit code" } dd #run-exit { (run.return_code.map(|c| c.to_string()).unwrap_or_else(|| "–".into())) }
                @if let Some(e) = run.error.as_deref() {
                    dt { "Error" } dd { (e) }
                } @else if active {
                    dt #run-reason-label hidden[pending_reason.is_none()] { "Waiting" }
                    dd #run-reason hidden[pending_reason.is_none()] { (pending_reason.as_deref().unwrap_or_default()) }
                }
                dt { "Kind" } dd { (run.job_type) }
                dt { "Profile" } dd { (run.execution_type) }
                dt { "Worker" } dd { (run.worker_id.as_deref().unwrap_or("–")) }
                @if let Some(j) = &run.slurm_job_id { dt { "Slurm job" } dd { (j) } }
                @if crate::ports::proxied(&state, &run) && !run.ports.is_empty() {
                    dt { "Ports" }
                    dd { @for p in run.ports.keys() { a href={ "/ports/" (run.id) "/" (p) "/" } target="_blank" rel="noopener" { (p) } " " } }
                }
                @if !run.gpu_ids.is_empty() { dt { "GPUs" } dd { (run.gpu_ids.join(", ")) } }
                dt { "Created" } dd { (when(&run.created_at)) " UTC" }
                dt { "Started" } dd { (run.job_start.as_ref().map(when).unwrap_or_else(|| "–".into())) }
                dt { "Ended" } dd { (run.job_end.as_ref().map(when).unwrap_or_else(|| "–".into())) }
                dt { "Duration" } dd { (duration(&run)) }
                dt { "Cost" } dd { (format!("{:.4}", crate::api::billed(&run))) " (" (price) ")" }
                @if let Some(p) = &run.parent_id { dt { "GPU selection" } dd { a href={ "/ui/selection/" (p) } { (p) } } }
            }
            div.actions {
                @if active {
                    (action("stop", "Stop", "Stop this run? It gets SIGTERM, then its grace period, then is killed."))
                    (action("abort", "Abort", "Abort this run? Its processes are killed at once."))
                } @else {
                    (action("delete", "Delete", "Delete this run and its output? This cannot be undone."))
                }
            }
        }
        section aria-labelledby="timeline-h" {
            h2 #timeline-h { "Timeline" }
            ol.timeline {
                @for (phase, at) in &run.phases {
                    li { strong { (phase) } " " time datetime=(stoa_core::time::stamp(at)) { (since_first(&run.phases[0].1, at)) } }
                }
            }
        }
        section aria-labelledby="output-h" {
            h2 #output-h { "Output" }
            div.output-tools {
                label { input #follow type="checkbox" checked; " Follow" }
                label for="search" { "Search" }
                input #search type="search" placeholder="text in a line";
                @if run.job_type == RunKind::Compose {
                    label for="service" { "Service" }
                    select #service { option value="" { "all" } }
                }
                a href={ "/ui/runs/" (run.id) "/log" } download { "Download the full log" }
                span #live-state aria-live="polite" {}
            }
            pre #output.output tabindex="0" aria-label="Output" {
                @for c in &chunks {
                    @for line in c.content.split_inclusive('\n') {
                        div class={ "l" @if c.stream == OutputStream::Stderr { " err" } } data-svc=[line_service(line)] { (ansi_html(line.strip_suffix('\n').unwrap_or(line))) }
                    }
                }
            }
            @if run.output_expired { p { "This run's output was removed by retention." } }
        }
        section aria-labelledby="charts-h" {
            h2 #charts-h { "Metrics" }
            div #charts data-refresh=[active.then(|| format!("/ui/runs/{}/charts", run.id))] { (charts) }
        }
        section aria-labelledby="request-h" {
            h2 #request-h { "Request" }
            (request_of(&run))
        }
    };
    Ok(layout(&name, Some((Nav::Runs, &s)), body).into_response())
}

/// The charts alone (the run page refreshes them while the run is active).
pub async fn run_charts(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> Page {
    let run = app::load_run(&state, &s.caller.org.id, &id).await?;
    Ok(charts_of(&state, &run).await?.into_response())
}

/// The full log of a run as a text file (stderr lines as they came, in order), read
/// from the store a page at a time.
pub async fn run_log(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> Page {
    let run = app::load_run(&state, &s.caller.org.id, &id).await?;
    let store = state.store.clone();
    let pages = futures::stream::unfold(Some(0i64), move |after| {
        let store = store.clone();
        async move {
            let after = after?;
            match store.read_output(run.id, after, 500, 256 * 1024).await {
                Ok(chunks) if !chunks.is_empty() => {
                    let last = chunks.last().map(|c| c.seq);
                    let text: String = chunks.into_iter().map(|c| c.content).collect();
                    Some((Ok::<_, std::io::Error>(Bytes::from(text)), last))
                }
                Ok(_) => None,
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}.log\"", run.id),
            ),
        ],
        axum::body::Body::from_stream(pages),
    )
        .into_response())
}

/// Abort, stop or delete from the run's page.
pub async fn run_action(
    State(state): State<AppState>,
    s: Session,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Page {
    s.check(&form)?;
    let org = &s.caller.org.id;
    match action.as_str() {
        "abort" => app::abort(&state, org, &id).await?,
        "stop" => app::stop(&state, org, &id).await?,
        "delete" => {
            app::delete(&state, org, &id).await?;
            return Ok(Redirect::to("/ui/").into_response());
        }
        _ => return Err(UiError::Api(ApiError::NotFound("Not Found".into()))),
    };
    Ok(Redirect::to(&format!("/ui/runs/{id}")).into_response())
}

/// The start form, with what was typed and why it was refused.
fn start_form(
    state: &AppState,
    s: &Session,
    f: &HashMap<String, String>,
    errors: &[String],
) -> Markup {
    let v = |k: &str| f.get(k).map(String::as_str).unwrap_or_default().to_string();
    let kind = f.get("kind").map(String::as_str).unwrap_or("python");
    let body = html! {
        h1 { "Start a run" }
        @if !errors.is_empty() {
            div.error role="alert" { p { "The run was not started:" } ul { @for e in errors { li { (e) } } } }
        }
        form.stack #start method="post" action="/ui/new" {
            (s.csrf_field())
            fieldset {
                legend { "Kind" }
                @for (k, label) in [("python", "Python snippet"), ("image", "Docker image"), ("compose", "Compose file")] {
                    label.inline { input type="radio" name="kind" value=(k) checked[kind == k]; " " (label) }
                }
            }
            label for="profile" { "Hardware profile" }
            select #profile name="profile" {
                @for p in &state.config.profiles {
                    option value=(p.name) selected[v("profile") == p.name] {
                        (p.name) @if p.gpu_count > 0 { " (" (p.gpu_count) " GPU)" } " · " (format!("{:.2}", p.price_per_hour)) "/h"
                    }
                }
            }
            label for="timeout" { "Timeout (seconds; empty: the default)" }
            input #timeout name="timeout" type="number" min="1" value=(v("timeout"));
            label for="run_name" { "Name (optional)" }
            input #run_name name="run_name" value=(v("run_name"));
            div.kind-python {
                label for="code" { "Python code" }
                textarea #code name="code" rows="10" spellcheck="false" { (v("code")) }
                label for="requirements" { "Requirements (requirements.txt, optional)" }
                textarea #requirements name="requirements" rows="3" spellcheck="false" { (v("requirements")) }
            }
            div.kind-image {
                label for="image" { "Image" }
                input #image name="image" value=(v("image")) placeholder="local/busybox:full";
                label for="command" { "Command (words separated by spaces; empty: the image's own)" }
                input #command name="command" value=(v("command"));
            }
            div.kind-compose {
                label for="compose" { "Compose file" }
                textarea #compose name="compose" rows="10" spellcheck="false" { (v("compose")) }
            }
            button type="submit" { "Start" }
        }
    };
    layout("Start a run", Some((Nav::New, s)), body)
}

/// The start form.
pub async fn new_run(State(state): State<AppState>, s: Session) -> Page {
    Ok(start_form(&state, &s, &HashMap::new(), &[]).into_response())
}

/// The start request the form describes, as the API takes it.
fn start_body(f: &HashMap<String, String>) -> Result<(Start, Value), String> {
    let v = |k: &str| f.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
    let mut body = match f.get("kind").map(String::as_str).unwrap_or("python") {
        "python" => (
            Start::Python,
            json!({"code": f.get("code").cloned().unwrap_or_default()}),
        ),
        "image" => (
            Start::Image,
            json!({"docker_image_ref": v("image").unwrap_or_default()}),
        ),
        "compose" => (
            Start::Compose,
            json!({"compose_file_code": f.get("compose").cloned().unwrap_or_default()}),
        ),
        other => return Err(format!("kind: {other:?} is not python, image or compose")),
    };
    let o = body.1.as_object_mut().expect("an object");
    if let Some(p) = v("profile") {
        o.insert("execution_type".into(), json!(p));
    }
    if let Some(t) = v("timeout") {
        let t: i64 = t
            .parse()
            .map_err(|_| format!("timeout: {t:?} is not a whole number of seconds"))?;
        o.insert("timeout".into(), json!(t));
    }
    if let Some(n) = v("run_name") {
        o.insert("run_name".into(), json!(n));
    }
    match body.0 {
        Start::Python => {
            if let Some(r) = v("requirements") {
                o.insert("requirements_content".into(), json!(r));
            }
        }
        Start::Image => {
            if let Some(c) = v("command") {
                o.insert(
                    "docker_run_cmd".into(),
                    json!(c.split_whitespace().collect::<Vec<_>>()),
                );
            }
        }
        Start::Compose => {}
    }
    Ok(body)
}

/// Starts the run the form describes and goes to its page.
pub async fn start_run(
    State(state): State<AppState>,
    s: Session,
    Form(form): Form<HashMap<String, String>>,
) -> Page {
    s.check(&form)?;
    let refused = |status: StatusCode, errors: Vec<String>| {
        Ok((status, start_form(&state, &s, &form, &errors)).into_response())
    };
    let (kind, body) = match start_body(&form) {
        Ok(b) => b,
        Err(e) => return refused(StatusCode::UNPROCESSABLE_ENTITY, vec![e]),
    };
    match app::submit(&state, &s.caller.org.id, kind, &body).await {
        Ok(started) => {
            Ok(Redirect::to(&format!("/ui/runs/{}", started.execution_id)).into_response())
        }
        Err(e) => {
            let (status, _, lines) = error_lines(e);
            refused(status, lines)
        }
    }
}

fn bytes_h(b: Option<f64>) -> String {
    match b {
        Some(b) if b >= 1024.0 * 1024.0 * 1024.0 => {
            format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
        }
        Some(b) => format!("{:.1} MiB", b / (1024.0 * 1024.0)),
        None => "–".into(),
    }
}

/// A GPU selection: each profile's runtime, cost, peak memory and state, with the
/// recommendation marked.
pub async fn selection(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> Page {
    let axum::Json(st) =
        crate::selection::status(State(state.clone()), s.caller.clone(), Path(id.clone())).await?;
    let pick = |k: &str| {
        st.selection_results
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (best, fastest, cheapest) = (pick("best"), pick("fastest"), pick("cheapest"));
    let mut peaks: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for r in &st.profiling_results {
        let summary = match r.execution_id.parse() {
            Ok(rid) => state.store.metrics_summary(rid).await?,
            Err(_) => None,
        };
        let v: Value = summary
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        peaks.insert(
            r.execution_id.clone(),
            (
                v.get("peak_ram_bytes").and_then(Value::as_f64),
                v.get("peak_gpu_memory_bytes").and_then(Value::as_f64),
            ),
        );
    }
    let body = html! {
        h1 { "GPU selection " (badge(st.status)) }
        p { "Run " a href={ "/ui/runs/" (st.execution_id) } { (st.execution_id) } }
        @if let Some(b) = &best { p #recommendation { "Recommended: " strong { (b) } " (the cheapest of the profiles within 25% of the fastest)" } }
        table.selection {
            caption.visually-hidden { "Profiles compared" }
            thead { tr { th scope="col" { "Profile" } th scope="col" { "Runtime" } th scope="col" { "Cost" } th scope="col" { "Peak memory" } th scope="col" { "Peak GPU memory" } th scope="col" { "State" } th scope="col" {} } }
            tbody {
                @for r in &st.profiling_results {
                    @let (ram, gpu) = peaks.get(&r.execution_id).cloned().unwrap_or_default();
                    tr class=[(best.as_deref() == Some(r.profile.as_str())).then_some("recommended")] {
                        td { a href={ "/ui/runs/" (r.execution_id) } { (r.profile) } }
                        td { (r.execution_time.map(human_secs).unwrap_or_else(|| "–".into())) }
                        td { (r.cost.map(|c| format!("{c:.6}")).unwrap_or_else(|| "–".into())) }
                        td { (bytes_h(ram)) }
                        td { (bytes_h(gpu)) }
                        td { (badge(r.status)) }
                        td {
                            @if best.as_deref() == Some(r.profile.as_str()) { span.tag.best { "recommended" } " " }
                            @if fastest.as_deref() == Some(r.profile.as_str()) { span.tag { "fastest" } " " }
                            @if cheapest.as_deref() == Some(r.profile.as_str()) { span.tag { "cheapest" } }
                        }
                    }
                }
            }
        }
        @if !st.system_errors.is_empty() { h2 { "Problems" } ul { @for e in &st.system_errors { li { (e) } } } }
    };
    Ok(layout("GPU selection", Some((Nav::Runs, &s)), body).into_response())
}

/// The fleet: each worker with its profiles, GPUs, free slots, last heartbeat and runs
/// held; and the queue depth of each profile.
pub async fn fleet(State(state): State<AppState>, s: Session) -> Page {
    struct Row {
        profiles: Vec<(String, usize, usize)>,
        draining: bool,
    }
    let mut workers: BTreeMap<String, Row> = BTreeMap::new();
    for p in &state.config.profiles {
        for o in state.engine.offers_of(&p.name) {
            let w = workers.entry(o.worker.clone()).or_insert(Row {
                profiles: vec![],
                draining: o.draining,
            });
            w.profiles.push((p.name.clone(), o.slots, o.running));
        }
    }
    let stored: BTreeMap<String, stoa_store::WorkerRecord> = state
        .store
        .list_workers()
        .await?
        .into_iter()
        .map(|w| (w.name.clone(), w))
        .collect();
    let depths = state.engine.queue_depths();
    // Per profile: workers offering it, runs held, slots.
    let mut totals: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for w in workers.values() {
        for (p, slots, running) in &w.profiles {
            let t = totals.entry(p.as_str()).or_default();
            *t = (t.0 + 1, t.1 + running, t.2 + slots);
        }
    }
    let body = html! {
        h1 { "Fleet" }
        table.queues {
            caption { "Profiles" }
            thead { tr { th scope="col" { "Profile" } th scope="col" { "Workers offering it" } th scope="col" { "Running / slots" } th scope="col" { "Runs waiting" } th scope="col" { "Price per hour" } } }
            tbody {
                @for p in &state.config.profiles {
                    @let (n, running, slots) = totals.get(p.name.as_str()).copied().unwrap_or_default();
                    tr { td { (p.name) } td { (n) } td { (running) " / " (slots) } td { (depths.get(&p.name).copied().unwrap_or(0)) } td { (format!("{:.2}", p.price_per_hour)) } }
                }
            }
        }
        @if !s.caller.is_admin {
            p { "The workers themselves (names, hosts, GPUs) are shown to admin keys only, as in " code { "stoa workers list" } "." }
        } @else {
        table.fleet {
            caption { "Workers" }
            thead { tr { th scope="col" { "Worker" } th scope="col" { "Host" } th scope="col" { "Profiles (running / slots)" } th scope="col" { "Free slots" } th scope="col" { "GPUs" } th scope="col" { "Last heartbeat (UTC)" } th scope="col" { "Runs held" } } }
            tbody {
                @if workers.is_empty() { tr { td colspan="7" { "No worker is connected." } } }
                @for (name, w) in &workers {
                    @let rec = stored.get(name);
                    @let offer: Value = rec.and_then(|r| serde_json::from_str(&r.offer).ok()).unwrap_or(Value::Null);
                    @let cluster = offer.get("cluster").filter(|c| !c.is_null());
                    tr {
                        td { (name) @if w.draining { " " span.tag { "draining" } } }
                        td { (offer.get("host").and_then(Value::as_str).unwrap_or(if rec.is_none() { "this server" } else { "–" }))
                             @if let Some(c) = cluster { br; small { (c.get("manager").and_then(Value::as_str).unwrap_or("")) ":" (c.get("name").and_then(Value::as_str).unwrap_or("")) } } }
                        td { @for (p, slots, running) in &w.profiles { (p) " " (running) "/" (slots) br; } }
                        td { (w.profiles.iter().map(|(_, s, r)| s.saturating_sub(*r)).sum::<usize>()) }
                        td { (offer.get("gpus").and_then(Value::as_array).map(|g| g.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).filter(|g| !g.is_empty()).unwrap_or_else(|| "–".into())) }
                        td { (rec.map(|r| when(&r.last_heard_at)).unwrap_or_else(|| "– (embedded)".into())) }
                        td { (w.profiles.iter().map(|(_, _, r)| r).sum::<usize>()) }
                    }
                }
            }
        }
        }
    };
    Ok(layout("Fleet", Some((Nav::Fleet, &s)), body).into_response())
}

async fn secrets_page(
    state: &AppState,
    s: &Session,
    status: StatusCode,
    errors: &[String],
) -> Page {
    let list = state.store.list_secrets(&s.caller.org.id).await?;
    let body = html! {
        h1 { "Secrets" }
        p { "Variables of your organisation, given to every run as environment variables. Values are never shown here." }
        @if !errors.is_empty() { div.error role="alert" { ul { @for e in errors { li { (e) } } } } }
        table.secrets {
            caption.visually-hidden { "Variables" }
            thead { tr { th scope="col" { "Name" } th scope="col" { "Kind" } th scope="col" { "Updated (UTC)" } th scope="col" {} } }
            tbody {
                @if list.is_empty() { tr { td colspan="4" { "None yet." } } }
                @for v in &list {
                    tr {
                        td.mono { (v.name) }
                        td { @if v.is_secret { "secret (masked in output)" } @else { "plain" } }
                        td { (when(&v.updated_at)) }
                        td {
                            form.action method="post" action="/ui/secrets/delete" data-confirm={ "Delete " (v.name) "?" } {
                                (s.csrf_field())
                                input type="hidden" name="name" value=(v.name);
                                button type="submit" aria-label={ "Delete " (v.name) } { "Delete" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Set a variable" }
        form.stack method="post" action="/ui/secrets" autocomplete="off" {
            (s.csrf_field())
            label for="sname" { "Name" }
            input #sname name="name" required pattern="[A-Za-z_][A-Za-z0-9_]*";
            label for="svalue" { "Value" }
            input #svalue name="value" type="password" autocomplete="new-password";
            label.inline { input type="checkbox" name="is_secret" value="true" checked; " Secret (masked in run output)" }
            button type="submit" { "Set" }
        }
    };
    Ok((status, layout("Secrets", Some((Nav::Secrets, s)), body)).into_response())
}

/// The org's variables: names and kinds.
pub async fn secrets(State(state): State<AppState>, s: Session) -> Page {
    secrets_page(&state, &s, StatusCode::OK, &[]).await
}

/// Sets a variable (as `POST environment-variables/` does).
pub async fn set_secret(
    State(state): State<AppState>,
    s: Session,
    Form(form): Form<HashMap<String, String>>,
) -> Page {
    s.check(&form)?;
    let item = json!({
        "name": form.get("name").map(|n| n.trim()).unwrap_or_default(),
        "value": form.get("value").cloned().unwrap_or_default(),
        "is_secret": form.contains_key("is_secret"),
    });
    let body = crate::api::Body(Bytes::from(
        json!({"environment_variables": [item]}).to_string(),
    ));
    match crate::env_vars::upsert(State(state.clone()), s.caller.clone(), body).await {
        Ok(_) => Ok(Redirect::to("/ui/secrets").into_response()),
        Err(e) => {
            let (status, _, lines) = error_lines(e);
            secrets_page(&state, &s, status, &lines).await
        }
    }
}

/// Deletes a variable by name.
pub async fn delete_secret(
    State(state): State<AppState>,
    s: Session,
    Form(form): Form<HashMap<String, String>>,
) -> Page {
    s.check(&form)?;
    let name = form.get("name").cloned().unwrap_or_default();
    let _deleted =
        crate::env_vars::delete_one(State(state.clone()), s.caller.clone(), Path(name)).await?;
    Ok(Redirect::to("/ui/secrets").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_colours_become_spans() {
        let h = ansi_html("a\x1b[31mred\x1b[0m <b>\x1b[2K").into_string();
        assert_eq!(h, "a<span class=\"c1\">red</span> &lt;b&gt;");
        let h = ansi_html("\x1b[1;92mok\x1b[m").into_string();
        assert_eq!(h, "<span class=\"b c10\">ok</span>");
        assert_eq!(ansi_html("\x1b[").into_string(), "");
    }

    #[test]
    fn services_of_lines() {
        assert_eq!(line_service("web | hello"), Some("web"));
        assert_eq!(line_service("a b | c"), None);
        assert_eq!(line_service("plain"), None);
    }

    #[test]
    fn form_to_start_request() {
        let f = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (k, b) = start_body(&f(&[
            ("kind", "image"),
            ("image", "x:1"),
            ("command", "sh -c  true"),
            ("timeout", "30"),
        ]))
        .unwrap();
        assert_eq!(k, Start::Image);
        assert_eq!(
            b,
            json!({"docker_image_ref": "x:1", "docker_run_cmd": ["sh", "-c", "true"], "timeout": 30})
        );
        assert!(
            start_body(&f(&[("kind", "python"), ("timeout", "ten")]))
                .unwrap_err()
                .contains("timeout")
        );
    }
}
