//! Compose files: the supported subset, interpolation, and the plan a worker executes.
//!
//! A file goes through four steps, each reporting every problem it finds at once:
//! 1. YAML parsing (serde_norway, the maintained fork of serde_yaml), with `<<` merges;
//!    YAML tags (`!x`) are refused, since a tagged node would slip past the key check;
//! 2. interpolation of `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`,
//!    `${VAR?err}`, `${VAR:+alt}`, `$VAR` and `$$` in every string value, from the run's
//!    environment (the org's variables and secrets);
//! 3. the key check: anything outside [`SUPPORTED`] is listed with its path
//!    (`services.web.build`);
//! 4. typed parsing with `docker-compose-types`, then the checks of meaning (unknown
//!    dependencies, cycles, undeclared volumes, host bind mounts, GPUs the run does
//!    not have) into a [`ComposePlan`].
//!
//! Errors name a path and a problem. A value that interpolation changed may hold one
//! of the org's secrets, and a 422 goes back to the caller: such a value is never
//! quoted (see [`Interpolated`]); raw text of the file may be.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use docker_compose_types as dct;
use serde_norway::Value;

/// One problem with a compose file: where (`services.web.build`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeError {
    /// Dotted path of the key or value, `""` for the file itself.
    pub path: String,
    pub msg: String,
}

impl ComposeError {
    fn new(path: impl Into<String>, msg: impl Into<String>) -> Self {
        ComposeError {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// When a service may start, relative to one it depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Once the dependency's container has started.
    Started,
    /// Once the dependency's healthcheck passes.
    Healthy,
    /// Once the dependency has exited with code 0.
    CompletedSuccessfully,
}

/// A container healthcheck (durations in nanoseconds, as the engine takes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `["CMD", …]`, `["CMD-SHELL", "…"]` or `["NONE"]`.
    pub test: Vec<String>,
    pub interval_ns: Option<i64>,
    pub timeout_ns: Option<i64>,
    pub retries: Option<i64>,
    pub start_period_ns: Option<i64>,
    pub start_interval_ns: Option<i64>,
}

/// GPUs a service reserves, out of those the run was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRequest {
    /// All of the run's GPUs.
    All,
    /// The first N of the run's GPUs.
    Count(u32),
    /// These positions among the run's GPUs (`device_ids: ["0", "1"]`).
    Positions(Vec<u32>),
}

impl GpuRequest {
    /// The engine's device ids for this request, given the run's GPUs.
    pub fn pick(&self, run_gpus: &[String]) -> Vec<String> {
        match self {
            GpuRequest::All => run_gpus.to_vec(),
            GpuRequest::Count(n) => run_gpus.iter().take(*n as usize).cloned().collect(),
            GpuRequest::Positions(p) => p
                .iter()
                .filter_map(|i| run_gpus.get(*i as usize).cloned())
                .collect(),
        }
    }
}

/// A mount of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountPlan {
    /// A named volume of the stack (made for the run, removed with it).
    Volume {
        name: String,
        target: String,
        read_only: bool,
    },
    /// An anonymous volume (removed with its container).
    Anonymous { target: String },
    /// A tmpfs.
    Tmpfs { target: String, size: Option<u64> },
}

/// One service, ready to become a container.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePlan {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// Its own environment, after interpolation (the run's variables are added by the
    /// worker, below these).
    pub environment: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub depends_on: Vec<(String, Condition)>,
    pub healthcheck: Option<Health>,
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub memory_reservation: Option<u64>,
    pub gpus: Option<GpuRequest>,
    pub mounts: Vec<MountPlan>,
    /// tmpfs mount points (`/path` or `/path:options`).
    pub tmpfs: Vec<String>,
    pub shm_size: Option<u64>,
    pub init: bool,
    pub stop_grace: Option<Duration>,
    pub stop_signal: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub expose: Vec<String>,
    /// Ports reached through Stoa's proxy (never published on the host): the port the
    /// proxy serves it as (`published`, else the container's) and the container's.
    pub ports: Vec<(u16, u16)>,
    /// Extra names on the run's network (the service name is always one).
    pub aliases: Vec<String>,
    /// Another service waits for this one with `service_completed_successfully`: its
    /// exit does not end the run.
    pub awaited: bool,
}

/// A validated stack.
#[derive(Debug, Clone, PartialEq)]
pub struct ComposePlan {
    /// Services, dependencies before their dependents.
    pub services: Vec<ServicePlan>,
    /// Named volumes of the stack.
    pub volumes: Vec<String>,
    /// `x-stoa.exit-code-from`: the service whose exit code is the run's.
    pub exit_code_from: Option<String>,
    /// `x-stoa.s3-mount`: the services the org's storage is mounted into, when the
    /// run asks for it (all when absent).
    pub s3_mount: Option<Vec<String>>,
    /// Variables used but not set (replaced by an empty string, as compose does).
    pub warnings: Vec<String>,
}

impl ComposePlan {
    /// The service of that name.
    pub fn service(&self, name: &str) -> Option<&ServicePlan> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// The shape of what is accepted: keys of a mapping, or a map of names to a shape.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// Anything (a scalar, list or mapping whose inside is not checked).
    Any,
    /// A mapping with these keys only (plus `x-` extensions).
    Keys(&'static [(&'static str, Shape)]),
    /// A mapping of free names, each of this shape (a list is left alone).
    Named(&'static Shape),
    /// A list whose items (when mappings) have this shape.
    List(&'static Shape),
}

const DEVICE: Shape = Shape::Keys(&[
    ("driver", Shape::Any),
    ("count", Shape::Any),
    ("device_ids", Shape::Any),
    ("capabilities", Shape::Any),
]);
const LIMITS: Shape = Shape::Keys(&[("cpus", Shape::Any), ("memory", Shape::Any)]);
const RESERVATIONS: Shape = Shape::Keys(&[
    ("cpus", Shape::Any),
    ("memory", Shape::Any),
    ("devices", Shape::List(&DEVICE)),
]);
const DEPLOY: Shape = Shape::Keys(&[(
    "resources",
    Shape::Keys(&[("limits", LIMITS), ("reservations", RESERVATIONS)]),
)]);
const HEALTHCHECK: Shape = Shape::Keys(&[
    ("test", Shape::Any),
    ("interval", Shape::Any),
    ("timeout", Shape::Any),
    ("retries", Shape::Any),
    ("start_period", Shape::Any),
    ("start_interval", Shape::Any),
    ("disable", Shape::Any),
]);
const VOLUME_MOUNT: Shape = Shape::Keys(&[
    ("type", Shape::Any),
    ("source", Shape::Any),
    ("target", Shape::Any),
    ("read_only", Shape::Any),
    ("tmpfs", Shape::Keys(&[("size", Shape::Any)])),
    ("volume", Shape::Keys(&[("nocopy", Shape::Any)])),
]);
const SERVICE: Shape = Shape::Keys(&[
    ("image", Shape::Any),
    ("command", Shape::Any),
    ("entrypoint", Shape::Any),
    ("environment", Shape::Any),
    ("working_dir", Shape::Any),
    ("user", Shape::Any),
    (
        "depends_on",
        Shape::Named(&Shape::Keys(&[("condition", Shape::Any)])),
    ),
    ("healthcheck", HEALTHCHECK),
    ("deploy", DEPLOY),
    ("volumes", Shape::List(&VOLUME_MOUNT)),
    ("tmpfs", Shape::Any),
    ("shm_size", Shape::Any),
    ("init", Shape::Any),
    ("stop_grace_period", Shape::Any),
    ("stop_signal", Shape::Any),
    (
        "networks",
        Shape::Named(&Shape::Keys(&[("aliases", Shape::Any)])),
    ),
    ("labels", Shape::Any),
    ("expose", Shape::Any),
    ("ports", Shape::Any),
]);
/// The supported subset of the compose specification.
const SUPPORTED: Shape = Shape::Keys(&[
    ("version", Shape::Any),
    ("name", Shape::Any),
    ("services", Shape::Named(&SERVICE)),
    ("volumes", Shape::Named(&Shape::Keys(&[]))),
    ("networks", Shape::Named(&Shape::Keys(&[]))),
    (
        "x-stoa",
        Shape::Keys(&[("exit-code-from", Shape::Any), ("s3-mount", Shape::Any)]),
    ),
]);

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

/// Paths of the string values that interpolation changed. A message about a value at
/// or inside one of them must not quote it: it may hold a secret of the org.
#[derive(Debug, Default)]
struct Interpolated(BTreeSet<String>);

impl Interpolated {
    /// True when the value at `path`, or one inside it, came from interpolation.
    fn touches(&self, path: &str) -> bool {
        if path.is_empty() {
            return !self.0.is_empty();
        }
        self.0
            .range(path.to_string()..)
            .take_while(|p| p.starts_with(path))
            .any(|p| matches!(p.as_bytes().get(path.len()), None | Some(b'.' | b'[')))
    }

    /// The value at `path` quoted, or words naming it when interpolation made it.
    fn quote(&self, path: &str, value: &str) -> String {
        if self.touches(path) {
            "the interpolated value".to_string()
        } else {
            format!("{value:?}")
        }
    }
}

/// Reports every YAML tag (`!x`, on a key or a value) with its path.
fn tags(v: &Value, path: &str, out: &mut Vec<ComposeError>) {
    let refuse = |path: &str, tag: &serde_norway::value::Tag, out: &mut Vec<ComposeError>| {
        out.push(ComposeError::new(
            path,
            format!("YAML tags ({tag}) are not supported in compose files"),
        ));
    };
    match v {
        Value::Tagged(t) => refuse(path, &t.tag, out),
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                tags(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Mapping(m) => {
            for (k, val) in m {
                let p = join(path, &key_text(k));
                match k {
                    Value::Tagged(t) => refuse(&p, &t.tag, out),
                    _ => tags(val, &p, out),
                }
            }
        }
        _ => {}
    }
}

/// Lists every key outside the supported subset, with its path.
fn unsupported(v: &Value, shape: Shape, path: &str, out: &mut Vec<String>) {
    match (shape, v) {
        (Shape::Keys(keys), Value::Mapping(m)) => {
            for (k, val) in m {
                let name = key_text(k);
                match keys.iter().find(|(n, _)| *n == name) {
                    Some((_, s)) => unsupported(val, *s, &join(path, &name), out),
                    // Extensions are the user's own (x-stoa is checked above).
                    None if name.starts_with("x-") => {}
                    None => out.push(join(path, &name)),
                }
            }
        }
        (Shape::Named(s), Value::Mapping(m)) => {
            for (k, val) in m {
                unsupported(val, *s, &join(path, &key_text(k)), out);
            }
        }
        (Shape::List(s), Value::Sequence(items)) => {
            for (i, item) in items.iter().enumerate() {
                unsupported(item, *s, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Replaces variables in every string value (keys are left alone).
fn interpolate_value(
    v: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ComposeError>,
    unset: &mut BTreeSet<String>,
    changed: &mut Interpolated,
) {
    match v {
        // Interpolation errors quote only raw text of the file, never a value.
        Value::String(s) if s.contains('$') => match interpolate(s, env, unset) {
            Ok(r) => {
                if r != *s {
                    changed.0.insert(path.to_string());
                }
                *s = r;
            }
            Err(e) => errors.push(ComposeError::new(path, e)),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let p = format!("{path}[{i}]");
                interpolate_value(item, &p, env, errors, unset, changed);
            }
        }
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                let p = join(path, &key_text(k));
                interpolate_value(val, &p, env, errors, unset, changed);
            }
        }
        Value::Tagged(t) => interpolate_value(&mut t.value, path, env, errors, unset, changed),
        _ => {}
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Interpolates one string the way compose does. Unset variables without a default
/// become empty strings and are recorded in `unset`; `${VAR:?msg}` of an unset (or
/// empty) variable is an error.
pub fn interpolate(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
    unset: &mut BTreeSet<String>,
) -> Result<String, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                // The matching brace, counting nested `${`.
                let mut depth = 1;
                let mut j = i + 2;
                while j < chars.len() {
                    match chars[j] {
                        '{' if chars.get(j.wrapping_sub(1)) == Some(&'$') => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                if j >= chars.len() {
                    return Err(format!(
                        "invalid interpolation format in {s:?}: no closing '}}'"
                    ));
                }
                let inner: String = chars[i + 2..j].iter().collect();
                out.push_str(&expand(&inner, env, unset)?);
                i = j + 1;
            }
            Some(&n) if is_name_start(n) => {
                let mut j = i + 1;
                while j < chars.len() && is_name_char(chars[j]) {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                match env(&name) {
                    Some(v) => out.push_str(&v),
                    None => {
                        unset.insert(name);
                    }
                }
                i = j;
            }
            // A `$` that starts no variable stays as it is.
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The value of one `${…}` expression (without the braces).
fn expand(
    inner: &str,
    env: &dyn Fn(&str) -> Option<String>,
    unset: &mut BTreeSet<String>,
) -> Result<String, String> {
    let name_len = inner
        .char_indices()
        .find(|(_, c)| !is_name_char(*c))
        .map(|(i, _)| i)
        .unwrap_or(inner.len());
    let name = &inner[..name_len];
    if name.is_empty() || !name.starts_with(is_name_start) {
        return Err(format!("invalid interpolation format: ${{{inner}}}"));
    }
    let rest = &inner[name_len..];
    let value = env(name);
    let (op, arg) = if let Some(a) = rest.strip_prefix(":-") {
        (":-", a)
    } else if let Some(a) = rest.strip_prefix(":?") {
        (":?", a)
    } else if let Some(a) = rest.strip_prefix(":+") {
        (":+", a)
    } else if rest.is_empty() {
        ("", "")
    } else {
        // One character (a multi-byte one too) is the operator.
        let width = rest.chars().next().map_or(0, char::len_utf8);
        (&rest[..width], &rest[width..])
    };
    let set_nonempty = value.as_deref().is_some_and(|v| !v.is_empty());
    match op {
        "" => match value {
            Some(v) => Ok(v),
            None => {
                unset.insert(name.to_string());
                Ok(String::new())
            }
        },
        ":-" if set_nonempty => Ok(value.unwrap_or_default()),
        "-" if value.is_some() => Ok(value.unwrap_or_default()),
        ":-" | "-" => interpolate(arg, env, unset),
        ":?" if set_nonempty => Ok(value.unwrap_or_default()),
        "?" if value.is_some() => Ok(value.unwrap_or_default()),
        ":?" | "?" => {
            // The message is shown as written: interpolated, it could carry a secret.
            interpolate(arg, env, unset)?;
            Err(if arg.is_empty() {
                format!("required variable {name} is missing a value")
            } else {
                format!("required variable {name} is missing a value: {arg}")
            })
        }
        ":+" if set_nonempty => interpolate(arg, env, unset),
        "+" if value.is_some() => interpolate(arg, env, unset),
        ":+" | "+" => Ok(String::new()),
        _ => Err(format!("invalid interpolation format: ${{{inner}}}")),
    }
}

/// Keys whose numeric values are numbers for the typed parser; elsewhere a number is a
/// string (`user: 1000`, `expose: [80]`, `cpus: 0.5`, `command: [sleep, 5]`).
const NUMERIC_KEYS: &[&str] = &["retries", "count", "size", "target", "published"];

/// Prepares a checked tree for the typed parser: numbers become strings where the
/// parser wants strings, and tmpfs sizes written as `64m` become bytes.
fn normalize(
    v: &mut Value,
    key: &str,
    errors: &mut Vec<ComposeError>,
    path: &str,
    changed: &Interpolated,
) {
    match v {
        Value::Number(n) if !NUMERIC_KEYS.contains(&key) && key != "environment" => {
            *v = Value::String(n.to_string());
        }
        Value::String(s) if key == "size" => match parse_size(s) {
            Some(b) => *v = Value::Number(b.into()),
            None => errors.push(ComposeError::new(
                path,
                format!("{} is not a size", changed.quote(path, s)),
            )),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                normalize(item, key, errors, &format!("{path}[{i}]"), changed);
            }
        }
        Value::Mapping(m) => {
            // Environment values may be numbers and booleans (the parser keeps them).
            let inside_env = key == "environment";
            for (k, val) in m.iter_mut() {
                let name = key_text(k);
                if inside_env {
                    continue;
                }
                normalize(val, &name, errors, &join(path, &name), changed);
            }
        }
        _ => {}
    }
}

/// A name the engine accepts inside container and volume names.
fn is_object_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parses a size: bytes, or a number with `b`, `k`, `m`, `g` (optionally `b` after:
/// `kb`, `mb`, `gb`), case-insensitive.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').filter(|r| !r.is_empty()).unwrap_or(&t);
    let (num, mult) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 1u64 << 10),
        'm' => (&t[..t.len() - 1], 1 << 20),
        'g' => (&t[..t.len() - 1], 1 << 30),
        't' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    (n >= 0.0 && n.is_finite()).then_some((n * mult as f64) as u64)
}

/// Parses a compose duration: `1h30m`, `10s`, `500ms`, `1.5s`, `2us` (or plain seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return (secs >= 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0f64;
    let mut rest = t;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * secs;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// The error of [`split_words`] (it does not quote the text: it may be interpolated).
const UNTERMINATED: &str = "unterminated quote";

/// Splits a command string as a POSIX shell would split words (quotes and
/// backslashes), without expanding anything.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err(UNTERMINATED.to_string()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x @ ('"' | '\\' | '$' | '`')) => cur.push(x),
                            Some(x) => {
                                cur.push('\\');
                                cur.push(x);
                            }
                            None => return Err(UNTERMINATED.to_string()),
                        },
                        Some(x) => cur.push(x),
                        None => return Err(UNTERMINATED.to_string()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(x) = chars.next() {
                    cur.push(x);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// A lookup of variables by name in a list of `(name, value)` (the org's variables).
pub fn lookup_in(vars: &[(String, String)]) -> impl Fn(&str) -> Option<String> + '_ {
    move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

/// Reads, interpolates and checks a compose file, and plans its run.
///
/// `env` gives the run's variables; `run_gpus` is how many GPUs the run will have.
pub fn plan(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    run_gpus: u32,
) -> Result<ComposePlan, Vec<ComposeError>> {
    let mut root: Value = serde_norway::from_str(text)
        .map_err(|e| vec![ComposeError::new("", format!("invalid YAML: {e}"))])?;
    // `<<: *anchor` merges, as compose applies them.
    root.apply_merge()
        .map_err(|e| vec![ComposeError::new("", format!("invalid YAML merge: {e}"))])?;
    if !root.is_mapping() {
        return Err(vec![ComposeError::new(
            "",
            "a compose file must be a mapping with a `services` key",
        )]);
    }
    let mut errors = Vec::new();
    tags(&root, "", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut unset = BTreeSet::new();
    let mut changed = Interpolated::default();
    interpolate_value(&mut root, "", env, &mut errors, &mut unset, &mut changed);
    let mut keys = Vec::new();
    unsupported(&root, SUPPORTED, "", &mut keys);
    errors.extend(keys.into_iter().map(|p| {
        let msg = format!("{p} is not supported by Stoa (the README lists the supported keys)");
        ComposeError::new(p, msg)
    }));
    if !errors.is_empty() {
        return Err(errors);
    }
    normalize(&mut root, "", &mut errors, "", &changed);
    let x_stoa = root.get("x-stoa").cloned();
    if let Some(m) = root.as_mapping_mut() {
        // Extensions are read here, not by the typed parser.
        m.retain(|k, _| !key_text(k).starts_with("x-"));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let compose: dct::Compose = serde_path_to_error::deserialize(root).map_err(|e| {
        let path = error_path(e.path());
        // The parser's message quotes the value it refused.
        let msg = if changed.touches(&path) {
            "the interpolated value does not have the type or form this key takes".to_string()
        } else {
            format!("not a valid compose file: {}", e.inner())
        };
        vec![ComposeError::new(path, msg)]
    })?;
    for v in compose.volumes.0.keys() {
        if !is_object_name(v) {
            errors.push(ComposeError::new(
                format!("volumes.{v}"),
                "a volume name has letters, digits, '.', '_' and '-', and starts with a letter or digit",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut p = Planner {
        errors: Vec::new(),
        run_gpus,
        volumes: compose.volumes.0.keys().cloned().collect(),
        changed,
    };
    let mut services = Vec::new();
    for (name, svc) in &compose.services.0 {
        let svc = svc.clone().unwrap_or_default();
        if let Some(s) = p.service(name, &svc, env) {
            services.push(s);
        }
    }
    if services.is_empty() && p.errors.is_empty() {
        p.errors
            .push(ComposeError::new("services", "the file defines no service"));
    }
    let exit_code_from = match x_stoa.as_ref().and_then(|x| x.get("exit-code-from")) {
        None => None,
        Some(Value::String(s)) if compose.services.0.contains_key(s) => Some(s.clone()),
        Some(other) => {
            let path = "x-stoa.exit-code-from";
            let msg = format!(
                "{} is not a service of this file",
                p.changed.quote(path, &key_text(other))
            );
            p.errors.push(ComposeError::new(path, msg));
            None
        }
    };
    let s3_mount = match x_stoa.as_ref().and_then(|x| x.get("s3-mount")) {
        None => None,
        Some(Value::Sequence(names)) => {
            let mut out = Vec::new();
            for (i, n) in names.iter().enumerate() {
                match n {
                    Value::String(s) if compose.services.0.contains_key(s) => out.push(s.clone()),
                    other => {
                        let path = format!("x-stoa.s3-mount.{i}");
                        let msg = format!(
                            "{} is not a service of this file",
                            p.changed.quote(&path, &key_text(other))
                        );
                        p.errors.push(ComposeError::new(path, msg));
                    }
                }
            }
            Some(out)
        }
        Some(_) => {
            p.errors.push(ComposeError::new(
                "x-stoa.s3-mount",
                "a list of the services the org's storage is mounted into",
            ));
            None
        }
    };
    let mut proxied = BTreeMap::new();
    for s in &services {
        for (port, _) in &s.ports {
            if let Some(first) = proxied.insert(*port, s.name.clone()) {
                p.errors.push(ComposeError::new(
                    format!("services.{}.ports", s.name),
                    format!("port {port} is already served for service {first}: the proxy serves each port of a run once"),
                ));
            }
        }
    }
    let services = p.order(services);
    if !p.errors.is_empty() {
        return Err(p.errors);
    }
    Ok(ComposePlan {
        services,
        volumes: p.volumes,
        exit_code_from,
        s3_mount,
        warnings: unset
            .into_iter()
            .map(|n| {
                format!("[stoa] variable {n} is not set; it was replaced by an empty string\n")
            })
            .collect(),
    })
}

/// The path of a typed parser's error, in the form of [`ComposeError::path`] (up to
/// the first segment it cannot name).
/// A port of a service: the published port when given, and the container's.
type PortMapping = (Option<u16>, u16);

/// A short-syntax port (`80`, `8080:80`, `127.0.0.1:8080:80`, with `/tcp`): the
/// published port when given, and the container's; `None` for UDP, ranges and the rest.
fn short_port(p: &str) -> Option<PortMapping> {
    let p = p.strip_suffix("/tcp").unwrap_or(p);
    let mut parts = p.rsplitn(3, ':');
    let target: u16 = parts.next()?.parse().ok().filter(|t| *t > 0)?;
    let published = match parts.next() {
        None => None,
        Some(x) => Some(x.parse().ok()?),
    };
    Some((published, target))
}

fn error_path(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in p {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => out = join(&out, key),
            Segment::Unknown => break,
        }
    }
    out
}

struct Planner {
    errors: Vec<ComposeError>,
    run_gpus: u32,
    volumes: Vec<String>,
    /// What interpolation changed: those values are not quoted in errors.
    changed: Interpolated,
}

impl Planner {
    fn err(&mut self, path: String, msg: impl Into<String>) {
        self.errors.push(ComposeError::new(path, msg));
    }

    /// `value` (found at `path`) as an error message may show it.
    fn quote(&self, path: &str, value: &str) -> String {
        self.changed.quote(path, value)
    }

    fn duration(&mut self, path: String, v: &Option<String>) -> Option<Duration> {
        let s = v.as_ref()?;
        let d = parse_duration(s);
        if d.is_none() {
            let msg = format!(
                "{} is not a duration (like 10s, 1m30s, 500ms)",
                self.quote(&path, s)
            );
            self.err(path, msg);
        }
        d
    }

    fn size(&mut self, path: String, v: &Option<String>) -> Option<u64> {
        let s = v.as_ref()?;
        let b = parse_size(s);
        if b.is_none() {
            let msg = format!("{} is not a size (like 512m, 1g)", self.quote(&path, s));
            self.err(path, msg);
        }
        b
    }

    fn words(&mut self, path: String, s: &str) -> Vec<String> {
        split_words(s).unwrap_or_else(|e| {
            self.err(path, e);
            vec![]
        })
    }

    fn service(
        &mut self,
        name: &str,
        s: &dct::Service,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<ServicePlan> {
        let at = |k: &str| format!("services.{name}.{k}");
        if !is_object_name(name) {
            self.err(
                format!("services.{name}"),
                "a service name has letters, digits, '.', '_' and '-', and starts with a letter or digit",
            );
        }
        let image = match &s.image {
            Some(i) if !i.trim().is_empty() => i.clone(),
            _ => {
                self.err(
                    at("image"),
                    "every service needs an image (build is not supported)",
                );
                String::new()
            }
        };
        let command = match &s.command {
            None => None,
            Some(dct::Command::Simple(c)) => Some(self.words(at("command"), c)),
            Some(dct::Command::Args(a)) => Some(a.clone()),
        };
        let entrypoint = match &s.entrypoint {
            None => None,
            Some(dct::Entrypoint::Simple(c)) => Some(self.words(at("entrypoint"), c)),
            Some(dct::Entrypoint::List(a)) => Some(a.clone()),
        };
        let mut environment = Vec::new();
        match &s.environment {
            dct::Environment::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    let k = item.split_once('=').map_or(item.as_str(), |(k, _)| k);
                    if !crate::validate::is_env_name(k) {
                        let path = format!("services.{name}.environment[{i}]");
                        let msg = format!("{} is not a valid variable name", self.quote(&path, k));
                        self.err(path, msg);
                    }
                    match item.split_once('=') {
                        Some((k, v)) => environment.push((k.to_string(), v.to_string())),
                        // `- NAME` takes the run's value, when it has one.
                        None => {
                            if let Some(v) = env(item) {
                                environment.push((item.clone(), v));
                            }
                        }
                    }
                }
            }
            dct::Environment::KvPair(m) => {
                for (k, v) in m {
                    // Keys are never interpolated: the name may be shown.
                    if !crate::validate::is_env_name(k) {
                        self.err(
                            at("environment"),
                            format!("{k:?} is not a valid variable name"),
                        );
                    }
                    match v {
                        Some(v) => environment.push((k.clone(), v.to_string())),
                        None => {
                            if let Some(v) = env(k) {
                                environment.push((k.clone(), v));
                            }
                        }
                    }
                }
            }
        }
        let depends_on = match &s.depends_on {
            dct::DependsOnOptions::Simple(l) => {
                l.iter().map(|d| (d.clone(), Condition::Started)).collect()
            }
            dct::DependsOnOptions::Conditional(m) => m
                .iter()
                .filter_map(|(d, c)| {
                    let cond = match c.condition.as_str() {
                        "service_started" => Condition::Started,
                        "service_healthy" => Condition::Healthy,
                        "service_completed_successfully" => Condition::CompletedSuccessfully,
                        other => {
                            let path = format!("services.{name}.depends_on.{d}.condition");
                            let msg = format!(
                                "{} is not a condition (service_started, service_healthy, service_completed_successfully)",
                                self.quote(&path, other)
                            );
                            self.err(path, msg);
                            return None;
                        }
                    };
                    Some((d.clone(), cond))
                })
                .collect(),
        };
        let healthcheck = s.healthcheck.as_ref().map(|h| {
            let test = if h.disable {
                vec!["NONE".to_string()]
            } else {
                match &h.test {
                    Some(dct::HealthcheckTest::Single(c)) => vec!["CMD-SHELL".into(), c.clone()],
                    Some(dct::HealthcheckTest::Multiple(v)) => v.clone(),
                    None => vec![],
                }
            };
            if let Some(first) = test.first()
                && !matches!(first.as_str(), "CMD" | "CMD-SHELL" | "NONE")
            {
                self.err(
                    at("healthcheck.test"),
                    "a test list starts with CMD, CMD-SHELL or NONE",
                );
            }
            let ns = |d: Option<Duration>| d.map(|d| d.as_nanos() as i64);
            Health {
                test,
                interval_ns: ns(self.duration(at("healthcheck.interval"), &h.interval)),
                timeout_ns: ns(self.duration(at("healthcheck.timeout"), &h.timeout)),
                retries: (h.retries > 0).then_some(h.retries),
                start_period_ns: ns(self.duration(at("healthcheck.start_period"), &h.start_period)),
                start_interval_ns: ns(
                    self.duration(at("healthcheck.start_interval"), &h.start_interval)
                ),
            }
        });
        let resources = s.deploy.as_ref().and_then(|d| d.resources.clone());
        let limits = resources.as_ref().and_then(|r| r.limits.clone());
        let reservations = resources.as_ref().and_then(|r| r.reservations.clone());
        let cpus = limits.as_ref().and_then(|l| l.cpus.as_ref()).and_then(|c| {
            let v = c.trim().parse::<f64>().ok().filter(|v| *v > 0.0);
            if v.is_none() {
                let path = at("deploy.resources.limits.cpus");
                let msg = format!("{} is not a positive number of CPUs", self.quote(&path, c));
                self.err(path, msg);
            }
            v
        });
        let memory = self.size(
            at("deploy.resources.limits.memory"),
            &limits.as_ref().and_then(|l| l.memory.clone()),
        );
        let memory_reservation = self.size(
            at("deploy.resources.reservations.memory"),
            &reservations.as_ref().and_then(|l| l.memory.clone()),
        );
        let gpus = reservations
            .as_ref()
            .and_then(|r| r.devices.as_ref())
            .and_then(|devs| self.gpus(name, devs));
        let mut mounts = Vec::new();
        for (i, v) in s.volumes.iter().enumerate() {
            let path = format!("services.{name}.volumes[{i}]");
            if let Some(m) = self.mount(path, v) {
                mounts.push(m);
            }
        }
        let tmpfs = match &s.tmpfs {
            None => vec![],
            Some(dct::Tmpfs::Simple(t)) => vec![t.clone()],
            Some(dct::Tmpfs::List(l)) => l.clone(),
        };
        for t in &tmpfs {
            if !t.starts_with('/') {
                let msg = format!("{} is not an absolute path", self.quote(&at("tmpfs"), t));
                self.err(at("tmpfs"), msg);
            }
        }
        let shm_size = self.size(at("shm_size"), &s.shm_size);
        let stop_grace = self.duration(at("stop_grace_period"), &s.stop_grace_period);
        let labels = match &s.labels {
            dct::Labels::List(l) => l
                .iter()
                .map(|x| match x.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (x.clone(), String::new()),
                })
                .collect(),
            dct::Labels::Map(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let aliases = match &s.networks {
            dct::Networks::Simple(_) => vec![],
            dct::Networks::Advanced(n) => {
                n.0.values()
                    .filter_map(|v| match v {
                        dct::MapOrEmpty::Map(m) => Some(m.aliases.clone()),
                        dct::MapOrEmpty::Empty => None,
                    })
                    .flatten()
                    .collect()
            }
        };
        Some(ServicePlan {
            name: name.to_string(),
            image,
            command,
            entrypoint,
            environment,
            working_dir: s.working_dir.clone(),
            user: s.user.clone(),
            depends_on,
            healthcheck,
            cpus,
            memory,
            memory_reservation,
            gpus,
            mounts,
            tmpfs,
            shm_size,
            init: s.init,
            stop_grace,
            stop_signal: s.stop_signal.clone(),
            labels,
            expose: s.expose.clone(),
            ports: self.ports(name, &s.ports),
            aliases,
            awaited: false,
        })
    }

    /// `ports:` of a service: what the proxy serves (published port, else the
    /// container's) and the container's port; TCP only, no ranges.
    fn ports(&mut self, name: &str, ports: &dct::Ports) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        let entries: Vec<(String, Option<PortMapping>)> = match ports {
            dct::Ports::Short(v) => v.iter().map(|p| (p.clone(), short_port(p))).collect(),
            dct::Ports::Long(v) => v
                .iter()
                .map(|p| {
                    let published = match &p.published {
                        None => Some(None),
                        Some(dct::PublishedPort::Single(n)) => Some(Some(*n)),
                        Some(dct::PublishedPort::Range(r)) => r.parse().ok().map(Some),
                    };
                    let tcp = p.protocol.as_deref().is_none_or(|x| x == "tcp");
                    let parsed = published
                        .filter(|_| tcp && p.target > 0)
                        .map(|pb| (pb, p.target));
                    (format!("target {}", p.target), parsed)
                })
                .collect(),
        };
        for (i, (text, parsed)) in entries.into_iter().enumerate() {
            let path = format!("services.{name}.ports[{i}]");
            match parsed {
                Some((published, target)) if published != Some(0) => {
                    out.push((published.unwrap_or(target), target));
                }
                _ => {
                    let msg = format!(
                        "{} is not a TCP port mapping Stoa supports (PORT, or PROXY_PORT:PORT; the proxy serves it, the host never publishes it)",
                        self.quote(&path, &text)
                    );
                    self.err(path, msg);
                }
            }
        }
        out
    }

    fn gpus(&mut self, name: &str, devs: &[dct::Device]) -> Option<GpuRequest> {
        let path = format!("services.{name}.deploy.resources.reservations.devices");
        let mut req = None;
        for d in devs {
            let is_gpu = d.driver.as_deref() == Some("nvidia")
                || d.capabilities
                    .as_ref()
                    .is_some_and(|c| c.iter().any(|c| c == "gpu"));
            if !is_gpu {
                self.err(
                    path.clone(),
                    "only GPU reservations (capabilities: [gpu]) are supported",
                );
                continue;
            }
            let r = match (&d.count, &d.device_ids) {
                (Some(dct::DeviceCount::All), _) => GpuRequest::All,
                (Some(dct::DeviceCount::Count(n)), _) => GpuRequest::Count(*n as u32),
                (None, Some(ids)) => {
                    let pos: Option<Vec<u32>> = ids.iter().map(|i| i.parse().ok()).collect();
                    match pos {
                        Some(p) => GpuRequest::Positions(p),
                        None => {
                            self.err(
                                path.clone(),
                                "device_ids are positions among the run's GPUs (\"0\", \"1\", …)",
                            );
                            continue;
                        }
                    }
                }
                (None, None) => GpuRequest::All,
            };
            let need = match &r {
                GpuRequest::All => 1,
                GpuRequest::Count(n) => *n,
                GpuRequest::Positions(p) => p.iter().max().map(|m| m + 1).unwrap_or(0),
            };
            if need > self.run_gpus {
                // The count may come from a variable: it is not shown then.
                let asked = if self.changed.touches(&path) {
                    "more GPUs than".to_string()
                } else {
                    format!("{need} GPU(s) but")
                };
                self.err(
                    path.clone(),
                    format!(
                        "reserves {asked} the run's hardware profile gives it ({})",
                        self.run_gpus
                    ),
                );
            }
            req = Some(r);
        }
        req
    }

    fn mount(&mut self, path: String, v: &dct::Volumes) -> Option<MountPlan> {
        let host_bind = |s: &str| {
            s.starts_with('/') || s.starts_with('.') || s.starts_with('~') || s.contains('/')
        };
        match v {
            dct::Volumes::Simple(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                match parts.as_slice() {
                    [target] if target.starts_with('/') => Some(MountPlan::Anonymous {
                        target: target.to_string(),
                    }),
                    [source, target, rest @ ..] if rest.len() <= 1 => {
                        if host_bind(source) {
                            let msg = format!(
                                "{} is a host bind mount, which is not supported; use a named volume",
                                self.quote(&path, s)
                            );
                            self.err(path, msg);
                            return None;
                        }
                        self.named(path, source, target, rest.first() == Some(&"ro"))
                    }
                    _ => {
                        let msg =
                            format!("{} is not a volume (name:/path[:ro])", self.quote(&path, s));
                        self.err(path, msg);
                        None
                    }
                }
            }
            dct::Volumes::Advanced(a) => match a._type.as_str() {
                "volume" => match &a.source {
                    Some(src) => self.named(path, src, &a.target, a.read_only),
                    None => Some(MountPlan::Anonymous {
                        target: a.target.clone(),
                    }),
                },
                "tmpfs" => Some(MountPlan::Tmpfs {
                    target: a.target.clone(),
                    size: a.tmpfs.as_ref().map(|t| t.size),
                }),
                other => {
                    let path = format!("{path}.type");
                    let msg = format!(
                        "{} mounts are not supported (volume or tmpfs)",
                        self.quote(&path, other)
                    );
                    self.err(path, msg);
                    None
                }
            },
        }
    }

    fn named(&mut self, path: String, name: &str, target: &str, ro: bool) -> Option<MountPlan> {
        if !self.volumes.iter().any(|v| v == name) {
            let msg = format!(
                "{} names no volume declared under the top-level `volumes`",
                self.quote(&path, name)
            );
            self.err(path, msg);
            return None;
        }
        if !target.starts_with('/') {
            let msg = format!("{} is not an absolute path", self.quote(&path, target));
            self.err(path, msg);
            return None;
        }
        Some(MountPlan::Volume {
            name: name.to_string(),
            target: target.to_string(),
            read_only: ro,
        })
    }

    /// Orders services so that each comes after what it depends on; reports unknown
    /// dependencies and cycles, and marks the services others await.
    fn order(&mut self, mut services: Vec<ServicePlan>) -> Vec<ServicePlan> {
        let names: BTreeSet<String> = services.iter().map(|s| s.name.clone()).collect();
        let mut awaited = BTreeSet::new();
        for s in &services {
            for (d, c) in &s.depends_on {
                if !names.contains(d) {
                    let path = format!("services.{}.depends_on", s.name);
                    let msg = format!("{} is not a service of this file", self.quote(&path, d));
                    self.err(path, msg);
                } else if d == &s.name {
                    self.err(
                        format!("services.{}.depends_on", s.name),
                        "a service cannot depend on itself",
                    );
                }
                if *c == Condition::CompletedSuccessfully {
                    awaited.insert(d.clone());
                }
            }
        }
        for s in &mut services {
            s.awaited = awaited.contains(&s.name);
        }
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut ordered = Vec::with_capacity(services.len());
        while !services.is_empty() {
            let ready = services.iter().position(|s| {
                s.depends_on
                    .iter()
                    .all(|(d, _)| done.contains(d) || !names.contains(d) || d == &s.name)
            });
            match ready {
                Some(i) => {
                    let s = services.remove(i);
                    done.insert(s.name.clone());
                    ordered.push(s);
                }
                None => {
                    let cycle: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
                    self.err(
                        "services".to_string(),
                        format!("dependency cycle between {}", cycle.join(", ")),
                    );
                    break;
                }
            }
        }
        ordered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn paths(r: Result<ComposePlan, Vec<ComposeError>>) -> Vec<String> {
        r.expect_err("should fail")
            .into_iter()
            .map(|e| e.path)
            .collect()
    }

    #[test]
    fn interpolation_forms() {
        let e = env(&[("A", "x"), ("EMPTY", "")]);
        let mut unset = BTreeSet::new();
        let mut i = |s: &str| interpolate(s, &e, &mut unset);
        assert_eq!(i("$A ${A} $$A ${A}b").unwrap(), "x x $A xb");
        assert_eq!(i("${B:-def} ${EMPTY:-d2} ${EMPTY-d3}").unwrap(), "def d2 ");
        assert_eq!(i("${B:-${A}y}").unwrap(), "xy");
        assert_eq!(i("${A:+alt} ${B:+alt}.").unwrap(), "alt .");
        assert_eq!(i("cost $5").unwrap(), "cost $5");
        assert_eq!(
            i("${B:?set B please}").unwrap_err(),
            "required variable B is missing a value: set B please"
        );
        assert!(i("${EMPTY:?}").is_err());
        assert_eq!(i("${EMPTY?}").unwrap(), "");
        assert!(i("${A").is_err());
        assert!(i("${1x}").is_err());
        assert_eq!(i("$UNSET.").unwrap(), ".");
        assert!(unset.contains("UNSET"));
    }

    #[test]
    fn sizes_durations_and_words() {
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("0.5g"), Some(512 << 20));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(
            split_words(r#"sh -c 'echo "a b"' "x\"y" z\ w"#).unwrap(),
            vec!["sh", "-c", "echo \"a b\"", "x\"y", "z w"]
        );
        assert!(split_words("echo 'open").is_err());
    }

    #[test]
    fn a_stack_is_planned_in_dependency_order() {
        let yaml = r#"
x-stoa:
  exit-code-from: client
services:
  client:
    image: local/busybox:full
    command: sh -c "wget -qO- http://server:8080/"
    environment:
      TARGET: ${TARGET:-server}
      COUNT: 3
    depends_on:
      server: {condition: service_healthy}
      init: {condition: service_completed_successfully}
  server:
    image: local/busybox:full
    command: ["httpd", "-f", "-p", 8080]
    healthcheck:
      test: wget -q -O /dev/null http://127.0.0.1:8080/
      interval: 200ms
      retries: 20
    expose: [8080]
    volumes: [data:/www, "/scratch", {type: tmpfs, target: /tmp/t, tmpfs: {size: 16m}}]
    deploy: {resources: {limits: {cpus: 0.5, memory: 64m}}}
    stop_grace_period: 2s
    stop_signal: SIGINT
    init: true
    shm_size: 32m
  init:
    image: local/busybox:full
    command: ["true"]
volumes:
  data:
"#;
        let p = plan(yaml, &env(&[]), 0).unwrap();
        let order: Vec<&str> = p.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["server", "init", "client"]);
        assert_eq!(p.exit_code_from.as_deref(), Some("client"));
        let client = p.service("client").unwrap();
        assert_eq!(
            client.command.as_deref().unwrap(),
            ["sh", "-c", "wget -qO- http://server:8080/"]
        );
        assert_eq!(
            client.environment,
            vec![
                ("TARGET".into(), "server".into()),
                ("COUNT".into(), "3".into())
            ]
        );
        let server = p.service("server").unwrap();
        assert_eq!(server.command.as_deref().unwrap()[3], "8080");
        assert_eq!(server.healthcheck.as_ref().unwrap().test[0], "CMD-SHELL");
        assert_eq!(
            server.healthcheck.as_ref().unwrap().interval_ns,
            Some(200_000_000)
        );
        assert_eq!(server.cpus, Some(0.5));
        assert_eq!(server.memory, Some(64 << 20));
        assert_eq!(server.expose, vec!["8080"]);
        assert_eq!(server.mounts.len(), 3);
        assert_eq!(
            server.mounts[2],
            MountPlan::Tmpfs {
                target: "/tmp/t".into(),
                size: Some(16 << 20)
            }
        );
        assert_eq!(server.stop_grace, Some(Duration::from_secs(2)));
        assert!(server.init && !server.awaited);
        assert!(p.service("init").unwrap().awaited);
        assert_eq!(p.volumes, vec!["data"]);
    }

    /// Found by the fuzzer (`compose_interpolate`): a multi-byte character after a
    /// variable's name was cut in half, and the parse panicked.
    #[test]
    fn a_multibyte_character_after_a_name_is_an_error_not_a_panic() {
        let mut unset = BTreeSet::new();
        let got = interpolate("$Yq{\u{1}${k\u{185}}+Y}qq$", &|_| None, &mut unset);
        assert_eq!(
            got,
            Err("invalid interpolation format: ${k\u{185}}".to_string())
        );
        let errs = paths(plan(
            "services:\n  a:\n    image: \"x${V\u{20ac}}\"\n",
            &env(&[]),
            0,
        ));
        assert_eq!(errs, ["services.a.image"]);
    }

    #[test]
    fn ports_are_served_by_the_proxy_never_published() {
        let yaml = r#"
services:
  web:
    image: nginx
    ports: ["80", "8080:81", "127.0.0.1:9090:82/tcp"]
  api:
    image: api
    ports: [{target: 83, published: 9191}, {target: 84}]
"#;
        let p = plan(yaml, &env(&[]), 0).unwrap();
        assert_eq!(
            p.service("web").unwrap().ports,
            vec![(80, 80), (8080, 81), (9090, 82)]
        );
        assert_eq!(p.service("api").unwrap().ports, vec![(9191, 83), (84, 84)]);
        let yaml = r#"
services:
  web:
    image: nginx
    ports: ["53/udp", "8000-8010:80", "x", "8080:80"]
  api:
    image: api
    ports: [{target: 85, protocol: udp}, {target: 90, published: 8080}]
"#;
        let got = paths(plan(yaml, &env(&[]), 0));
        assert_eq!(
            got,
            [
                "services.web.ports[0]",
                "services.web.ports[1]",
                "services.web.ports[2]",
                "services.api.ports[0]",
                "services.api.ports",
            ]
        );
    }

    #[test]
    fn every_unsupported_key_is_listed_with_its_path() {
        let yaml = r#"
services:
  web:
    image: nginx
    build: .
    ports: ["8080:80"]
    privileged: true
    network_mode: host
    deploy: {replicas: 2, resources: {limits: {pids: 5}}}
    x-mine: fine
  db:
    image: postgres
    container_name: db
configs: {}
x-other: {}
"#;
        let got = paths(plan(yaml, &env(&[]), 0));
        assert_eq!(
            got,
            [
                "services.web.build",
                "services.web.privileged",
                "services.web.network_mode",
                "services.web.deploy.replicas",
                "services.web.deploy.resources.limits.pids",
                "services.db.container_name",
                "configs",
            ]
        );
    }

    #[test]
    fn meaning_errors() {
        let yaml = r#"
services:
  a:
    image: x
    depends_on: [ghost]
    volumes: ["./src:/src", "undeclared:/data"]
  b:
    depends_on: {a: {condition: service_happy}}
"#;
        let got = paths(plan(yaml, &env(&[]), 0));
        assert!(
            got.contains(&"services.a.depends_on".to_string()),
            "{got:?}"
        );
        assert!(
            got.contains(&"services.a.volumes[0]".to_string()),
            "{got:?}"
        );
        assert!(
            got.contains(&"services.a.volumes[1]".to_string()),
            "{got:?}"
        );
        assert!(got.contains(&"services.b.image".to_string()), "{got:?}");
        assert!(
            got.contains(&"services.b.depends_on.a.condition".to_string()),
            "{got:?}"
        );
        let names = "services:\n  \"a b\": {image: x}\nvolumes:\n  \"/v\":\n";
        assert_eq!(paths(plan(names, &env(&[]), 0)), ["volumes./v"]);
        let names = "services:\n  \"a b\": {image: x}\n";
        assert_eq!(paths(plan(names, &env(&[]), 0)), ["services.a b"]);
        let cycle =
            "services:\n  a: {image: x, depends_on: [b]}\n  b: {image: x, depends_on: [a]}\n";
        assert_eq!(paths(plan(cycle, &env(&[]), 0)), ["services"]);
        let bad = plan("services: [", &env(&[]), 0).unwrap_err();
        assert!(bad[0].msg.starts_with("invalid YAML"), "{bad:?}");
        let gpu = "services:\n  t:\n    image: x\n    deploy: {resources: {reservations: {devices: [{capabilities: [gpu], count: 2}]}}}\n";
        assert_eq!(
            paths(plan(gpu, &env(&[]), 1)),
            ["services.t.deploy.resources.reservations.devices"]
        );
        let p = plan(gpu, &env(&[]), 2).unwrap();
        assert_eq!(
            p.services[0]
                .gpus
                .as_ref()
                .unwrap()
                .pick(&["3".into(), "5".into(), "6".into()]),
            vec!["3", "5"]
        );
    }

    #[test]
    fn required_variables_and_warnings() {
        let yaml = "services:\n  a:\n    image: ${IMG:?set IMG}\n    command: echo $NOPE\n";
        let e = plan(yaml, &env(&[]), 0).unwrap_err();
        assert_eq!(e[0].path, "services.a.image");
        assert!(e[0].msg.contains("required variable IMG"), "{e:?}");
        let p = plan(yaml, &env(&[("IMG", "busybox")]), 0).unwrap();
        assert_eq!(p.services[0].image, "busybox");
        assert_eq!(p.services[0].command.as_deref().unwrap(), ["echo"]);
        assert!(p.warnings[0].contains("NOPE"));
    }

    const SECRET: &str = "s3cr3t-Value";

    /// Every error of `yaml` with the secret set; none of them shows the secret.
    fn errors_with_secret(yaml: &str) -> Vec<ComposeError> {
        let e = plan(yaml, &env(&[("S", SECRET), ("N", "3")]), 1).unwrap_err();
        for x in &e {
            assert!(
                !x.msg.contains("s3cr3t") && !x.path.contains("s3cr3t"),
                "{yaml} gave {x:?}"
            );
        }
        e
    }

    #[test]
    fn interpolated_values_are_never_quoted_in_errors() {
        // Each file fails at a different step of the check.
        let e = errors_with_secret("services:\n  a:\n    image: ${X:?${S}}\n");
        assert_eq!(
            e[0].msg, "required variable X is missing a value: ${S}",
            "the message as written"
        );
        let e = errors_with_secret(
            "services:\n  a:\n    image: x\n    shm_size: ${S}\n    volumes: [{type: tmpfs, target: /t, tmpfs: {size: \"${S}\"}}]\n",
        );
        assert_eq!(e[0].path, "services.a.volumes[0].tmpfs.size");
        assert_eq!(e[0].msg, "the interpolated value is not a size");
        let e = errors_with_secret("services:\n  a:\n    image: x\n    init: ${S}\n");
        assert_eq!(e[0].path, "services.a.init");
        assert!(e[0].msg.contains("interpolated value"), "{e:?}");
        let yaml = "
x-stoa: {exit-code-from: \"${S}\"}
services:
  a:
    image: x
    command: \"echo '${S}\"
    depends_on: [\"${S}\"]
    environment: [\"${S}=1\", \"GOOD=${S}\"]
    healthcheck: {test: [CMD, \"true\"], interval: \"${S}\"}
    deploy:
      resources:
        limits: {cpus: \"${S}\", memory: \"${S}\"}
        reservations: {devices: [{capabilities: [gpu], device_ids: [\"${N}\"]}]}
    tmpfs: [\"${S}\"]
    volumes: [\"${S}:/x\", \"v:${S}\", \"/a/${S}:/y\"]
  b:
    image: x
    depends_on: {a: {condition: \"${S}\"}}
volumes:
  v:
";
        let e = errors_with_secret(yaml);
        let paths: BTreeSet<&str> = e.iter().map(|x| x.path.as_str()).collect();
        for want in [
            "x-stoa.exit-code-from",
            "services.a.command",
            "services.a.depends_on",
            "services.a.environment[0]",
            "services.a.healthcheck.interval",
            "services.a.deploy.resources.limits.cpus",
            "services.a.deploy.resources.limits.memory",
            "services.a.deploy.resources.reservations.devices",
            "services.a.tmpfs",
            "services.a.volumes[0]",
            "services.a.volumes[1]",
            "services.a.volumes[2]",
            "services.b.depends_on.a.condition",
        ] {
            assert!(paths.contains(want), "{want} missing from {e:#?}");
        }
        assert!(
            e.iter().all(|x| !x.msg.contains("4 GPU")),
            "a count from a variable is not shown either: {e:?}"
        );
    }

    #[test]
    fn raw_values_are_still_quoted() {
        let e = plan(
            "services:\n  a:\n    image: x\n    depends_on: [ghost]\n    init: maybe\n    environment: {\"1X\": \"${S}\"}\n",
            &env(&[("S", SECRET)]),
            0,
        )
        .unwrap_err();
        assert_eq!(e[0].path, "services.a.init");
        assert!(e[0].msg.contains("\"maybe\""), "{e:?}");
        let e = plan(
            "services:\n  a:\n    image: x\n    depends_on: [ghost]\n    environment: {\"1X\": \"${S}\"}\n",
            &env(&[("S", SECRET)]),
            0,
        )
        .unwrap_err();
        let msgs: Vec<&str> = e.iter().map(|x| x.msg.as_str()).collect();
        assert!(
            msgs.contains(&"\"1X\" is not a valid variable name"),
            "{msgs:?}"
        );
        assert!(
            msgs.contains(&"\"ghost\" is not a service of this file"),
            "{msgs:?}"
        );
    }

    #[test]
    fn yaml_tags_are_refused_anywhere() {
        for (yaml, path) in [
            (
                "services: !x {a: {image: x, privileged: true}}\n",
                "services",
            ),
            (
                "services:\n  a:\n    image: !custom x\n",
                "services.a.image",
            ),
            (
                "services:\n  a:\n    image: x\n    volumes: [!v \"a:/b\"]\n",
                "services.a.volumes[0]",
            ),
            ("services:\n  a:\n    !k image: x\n", "services.a.!k image"),
        ] {
            let e = plan(yaml, &env(&[]), 0).unwrap_err();
            assert_eq!(e.len(), 1, "{e:?}");
            assert_eq!(e[0].path, path);
            assert!(e[0].msg.contains("YAML tags"), "{e:?}");
        }
        // Tags of the core schema are plain values to the parser, checked as such.
        let e = plan(
            "services: !!map {a: {image: x, privileged: true}}\n",
            &env(&[]),
            0,
        )
        .unwrap_err();
        assert_eq!(e[0].path, "services.a.privileged");
    }
}
