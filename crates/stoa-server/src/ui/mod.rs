//! The web dashboard at `/ui/`: server-rendered HTML (maud) with a little JavaScript
//! for the live parts (the browser's `EventSource` on the run's output stream, and a
//! periodic refresh of the runs table and the charts). Every asset is embedded in the
//! binary. Pages read without JavaScript; only live updates need it.
//!
//! Sign-in exchanges an API key for a session cookie (HttpOnly, SameSite=Strict, Secure
//! when `public_url` is https) that names the key by its stored hash and is signed with
//! a key derived from the secrets master key, so every server of a site accepts it and a
//! revoked key ends its sessions at once. Every page is scoped to the key's org exactly
//! as the API is (another org's run is the not-found page). Every POST carries a CSRF
//! token bound to the session.

mod charts;
mod pages;
mod session;
pub use session::{COOKIE as SESSION_COOKIE, Session};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};

use crate::error::ApiError;
use crate::state::AppState;

/// The dashboard's routes (`/ui/…`, and `/` redirecting there).
pub fn router(state: AppState) -> axum::Router<AppState> {
    axum::Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(pages::runs))
        .route("/ui/runs/rows", get(pages::run_rows))
        .route("/ui/login", get(session::login_page).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/runs/{id}", get(pages::run))
        .route("/ui/runs/{id}/charts", get(pages::run_charts))
        .route("/ui/runs/{id}/log", get(pages::run_log))
        .route("/ui/runs/{id}/{action}", post(pages::run_action))
        .route("/ui/new", get(pages::new_run).post(pages::start_run))
        .route("/ui/selection/{id}", get(pages::selection))
        .route("/ui/fleet", get(pages::fleet))
        .route("/ui/secrets", get(pages::secrets).post(pages::set_secret))
        .route("/ui/secrets/delete", post(pages::delete_secret))
        .route("/ui/assets/style.css", get(style))
        .route("/ui/assets/app.js", get(script))
        .route(
            "/ui/{*rest}",
            get(|| async { UiError::Api(ApiError::NotFound("Not Found".into())) }),
        )
        .layer(axum::middleware::map_request_with_state(state, same_origin))
        .layer(axum::middleware::map_response(harden))
}

/// A POST from another site (its `Origin` names neither the request's host nor
/// `public_url`), or with neither `Origin` nor `Sec-Fetch-Site: same-origin`, is
/// refused before any handler runs: this covers the sign-in form,
/// which has no session to bind a CSRF token to (an attacker's page must not sign a
/// browser into the attacker's org).
async fn same_origin(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
) -> Result<axum::extract::Request, UiError> {
    if req.method() != axum::http::Method::POST {
        return Ok(req);
    }
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        // Browsers send `Origin` on every POST; without it, only a fetch metadata
        // header that says the request comes from this site is taken.
        let site = req.headers().get("sec-fetch-site").map(|v| v.as_bytes());
        return match site {
            Some(b"same-origin") => Ok(req),
            _ => Err(UiError::Csrf),
        };
    };
    let origin = origin.to_str().unwrap_or_default();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let same_host = host.is_some_and(|h| {
        origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(h))
    });
    let public = state
        .config
        .public_url
        .as_deref()
        .is_some_and(|u| u.trim_end_matches('/').eq_ignore_ascii_case(origin));
    if same_host || public {
        Ok(req)
    } else {
        Err(UiError::Csrf)
    }
}

/// Headers on every dashboard reply: no framing, no inline script, no referrer to other
/// sites (`no-referrer` would make browsers send `Origin: null` on the forms, which the
/// origin check refuses).
async fn harden(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/style.css"))
}

async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Why a page could not be shown.
#[derive(Debug)]
pub enum UiError {
    /// No valid session: to the sign-in page.
    SignIn,
    /// A POST without the session's CSRF token.
    Csrf,
    /// What the API would have answered, shown as a page.
    Api(ApiError),
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        UiError::Api(e)
    }
}

impl From<stoa_store::StoreError> for UiError {
    fn from(e: stoa_store::StoreError) -> Self {
        UiError::Api(e.into())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let (status, title, lines) = match self {
            UiError::SignIn => return Redirect::to("/ui/login").into_response(),
            UiError::Csrf => (
                StatusCode::FORBIDDEN,
                "Refused",
                vec![
                    "The form's CSRF token is missing or does not match your session; reload the page and try again."
                        .to_string(),
                ],
            ),
            UiError::Api(e) => error_lines(e),
        };
        let body = layout(
            title,
            None,
            html! {
                h1 { (title) }
                @for l in &lines { p.error { (l) } }
                p { a href="/ui/" { "Back to the runs" } }
            },
        );
        (status, body).into_response()
    }
}

/// The status, a title and the messages of an API error.
pub(crate) fn error_lines(e: ApiError) -> (StatusCode, &'static str, Vec<String>) {
    match e {
        ApiError::Validation(errs) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not accepted",
            errs.iter()
                .map(|f| {
                    let field: Vec<&str> = f
                        .loc
                        .iter()
                        .map(String::as_str)
                        .filter(|l| *l != "body")
                        .collect();
                    format!("{}: {}", field.join("."), f.msg)
                })
                .collect(),
        ),
        ApiError::NotFound(_) => (
            StatusCode::NOT_FOUND,
            "Not found",
            vec!["There is nothing here, or it belongs to another organisation.".into()],
        ),
        ApiError::Internal(m) => {
            tracing::error!(error = %m, "internal error in the dashboard");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal error",
                vec!["internal error".into()],
            )
        }
        other => {
            let msg = other.to_string();
            (other.into_response().status(), "Refused", vec![msg])
        }
    }
}

/// Where a page sits in the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Runs,
    New,
    Fleet,
    Secrets,
}

/// The page around `content`: head, navigation (when signed in) and footer.
pub(crate) fn layout(
    title: &str,
    nav: Option<(Nav, &session::Session)>,
    content: Markup,
) -> Markup {
    let item = |here: Nav, which: Nav, href: &str, label: &str| {
        html! {
            li { a href=(href) aria-current=[(here == which).then_some("page")] { (label) } }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · Stoa" }
                link rel="stylesheet" href="/ui/assets/style.css";
                script src="/ui/assets/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { "Stoa" }
                    @if let Some((here, s)) = nav {
                        nav aria-label="Main" {
                            ul {
                                (item(here, Nav::Runs, "/ui/", "Runs"))
                                (item(here, Nav::New, "/ui/new", "Start a run"))
                                (item(here, Nav::Fleet, "/ui/fleet", "Fleet"))
                                (item(here, Nav::Secrets, "/ui/secrets", "Secrets"))
                            }
                        }
                        form.signout method="post" action="/ui/logout" {
                            (s.csrf_field())
                            span.org { (s.caller.org.name) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main #main { (content) }
            }
        }
    }
}
