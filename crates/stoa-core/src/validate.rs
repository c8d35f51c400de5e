//! Validation of start requests into run specs.
//!
//! The raw JSON body is checked field by field so that every problem is reported at
//! once, FastAPI-style (`loc`, `msg`, `type`, `input`). Unknown fields are ignored: the
//! official client sends fields the docs do not list.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use stoa_types::FieldError;

/// The limits a start request is checked against; from the server config.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Timeout used when the request has none.
    pub default_timeout: i64,
    /// Largest timeout accepted.
    pub max_timeout: i64,
    /// Largest timeout of a notebook run.
    pub notebook_max_timeout: i64,
    /// Most ports an image run may expose.
    pub max_ports: usize,
    /// Names of the configured hardware profiles.
    pub profiles: Vec<String>,
    /// Largest number of files in `import_files`.
    pub max_import_files: usize,
    /// Most callback URLs per run.
    pub max_callback_urls: usize,
    /// GPUs a run of each profile gets (profiles not listed get none).
    pub profile_gpus: BTreeMap<String, u32>,
    /// Registries (`host:port`) images may come from although they are internal
    /// (`docker.allowed_registries`).
    pub allowed_registries: Vec<String>,
}

/// Everything a Python run needs, validated. Stored with the run as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PythonRunSpec {
    /// The code, with the client's `sys.argv` line moved where Python accepts it.
    pub code: String,
    /// Name the code is written as inside the working directory.
    pub file_name: String,
    /// Whether the client named the file (false for inline snippets).
    pub file_name_given: bool,
    /// Raw requirement text; cleaned on the worker, which knows the interpreter.
    pub requirements: Option<String>,
    /// Modules imported before the code.
    pub prior_imports: Vec<String>,
    /// Relative path → file text, written under the working directory.
    pub import_files: BTreeMap<String, String>,
    #[serde(flatten)]
    pub run: RunOptions,
}

fn default_priority() -> i64 {
    50
}

/// What every start request has besides its payload: where and how long the run runs,
/// where its end is reported, how it is traced and placed. Stored flattened into each
/// spec (the same top-level fields as the request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Seconds before the run is killed.
    pub timeout: i64,
    /// Hardware profile.
    pub execution_type: String,
    /// Completion callback URLs.
    pub user_callback_urls: Vec<String>,
    /// Run labels (spec §3.1 extras).
    pub run_name: Option<String>,
    pub labels: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// Scheduling priority, 0..=100 (default 50), higher first.
    #[serde(default = "default_priority")]
    pub priority: i64,
    /// Same key from the same org within 24 h returns the first run.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A list of field errors, empty when the input was valid.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    /// Records one problem with the field `field` of the body.
    pub fn push(&mut self, field: &str, kind: &str, msg: impl Into<String>, input: Option<&Value>) {
        let mut loc = vec!["body".to_string()];
        if !field.is_empty() {
            loc.extend(field.split('.').map(str::to_string));
        }
        self.0.push(FieldError {
            loc,
            msg: msg.into(),
            kind: kind.to_string(),
            input: input.cloned(),
        });
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Typed access to the fields of a JSON object body, recording errors as it goes.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    /// Problems found so far.
    pub errors: FieldErrors,
}

impl<'a> Fields<'a> {
    /// Starts on a body; a body that is not an object is an error of its own.
    pub fn new(body: &'a Value) -> Result<Self, FieldErrors> {
        match body.as_object() {
            Some(obj) => Ok(Fields {
                obj,
                errors: FieldErrors::default(),
            }),
            None => {
                let mut e = FieldErrors::default();
                e.push(
                    "",
                    "model_attributes_type",
                    "Input should be a valid dictionary or object",
                    Some(body),
                );
                Err(e)
            }
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    /// A required string.
    pub fn req_str(&mut self, name: &str) -> Option<String> {
        match self.obj.get(name) {
            None | Some(Value::Null) => {
                self.errors.push(name, "missing", "Field required", None);
                None
            }
            Some(_) => self.opt_str(name),
        }
    }

    /// An optional string (null and absent are the same).
    pub fn opt_str(&mut self, name: &str) -> Option<String> {
        match self.get(name)? {
            Value::String(s) => Some(s.clone()),
            v => {
                self.errors.push(
                    name,
                    "string_type",
                    "Input should be a valid string",
                    Some(v),
                );
                None
            }
        }
    }

    /// An optional integer within `min..=max`.
    pub fn opt_int(&mut self, name: &str, min: i64, max: i64) -> Option<i64> {
        let v = self.get(name)?;
        let n = match v {
            Value::Number(n) if n.is_i64() => n.as_i64(),
            Value::Number(n) => n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        let Some(n) = n else {
            self.errors.push(
                name,
                "int_parsing",
                "Input should be a valid integer",
                Some(v),
            );
            return None;
        };
        if n < min {
            self.errors.push(
                name,
                "greater_than_equal",
                format!("Input should be greater than or equal to {min}"),
                Some(v),
            );
            None
        } else if n > max {
            self.errors.push(
                name,
                "less_than_equal",
                format!("Input should be less than or equal to {max}"),
                Some(v),
            );
            None
        } else {
            Some(n)
        }
    }

    /// An optional boolean.
    /// `enable_s3_mount` (default `on`) and `s3_mount_path` (default `/mnt/s3`, an
    /// absolute path without `..`).
    pub fn s3_mount(&mut self, on: bool) -> (bool, String) {
        let enable = self.opt_bool("enable_s3_mount").unwrap_or(on);
        let path = self
            .opt_str("s3_mount_path")
            .unwrap_or_else(|| DEFAULT_S3_MOUNT.to_string());
        if !(path.starts_with('/') && path.len() > 1 && safe_relative_path(&path[1..])) {
            self.errors.push(
                "s3_mount_path",
                "value_error",
                "must be an absolute path without '..'",
                Some(&Value::String(path.clone())),
            );
        }
        (enable, path)
    }

    pub fn opt_bool(&mut self, name: &str) -> Option<bool> {
        match self.get(name)? {
            Value::Bool(b) => Some(*b),
            v => {
                self.errors.push(
                    name,
                    "bool_type",
                    "Input should be a valid boolean",
                    Some(v),
                );
                None
            }
        }
    }

    /// An optional list of strings.
    pub fn opt_str_list(&mut self, name: &str) -> Option<Vec<String>> {
        let v = self.get(name)?;
        let items = v.as_array().and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        });
        if items.is_none() {
            self.errors.push(
                name,
                "list_type",
                "Input should be a valid list of strings",
                Some(v),
            );
        }
        items
    }

    /// `ports`: an optional list of distinct TCP ports (1..=65535), at most `max`.
    pub fn ports(&mut self, max: usize) -> Vec<u16> {
        let Some(v) = self.get("ports") else {
            return vec![];
        };
        let ports = v.as_array().and_then(|a| {
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|p| (1..=65535).contains(p))
                        .map(|p| p as u16)
                })
                .collect::<Option<Vec<_>>>()
        });
        let Some(mut ports) = ports else {
            self.errors.push(
                "ports",
                "list_type",
                "Input should be a list of TCP ports (1 to 65535)",
                Some(v),
            );
            return vec![];
        };
        ports.sort_unstable();
        ports.dedup();
        if ports.len() > max {
            self.errors.push(
                "ports",
                "too_long",
                format!("at most {max} ports (limits.max_ports_per_run)"),
                Some(v),
            );
        }
        ports
    }

    /// An optional object of string → string.
    pub fn opt_str_map(&mut self, name: &str) -> Option<BTreeMap<String, String>> {
        let v = self.get(name)?;
        let map = v.as_object().and_then(|o| {
            o.iter()
                .map(|(k, x)| x.as_str().map(|s| (k.clone(), s.to_string())))
                .collect::<Option<BTreeMap<_, _>>>()
        });
        if map.is_none() {
            self.errors.push(
                name,
                "dict_type",
                "Input should be an object of strings",
                Some(v),
            );
        }
        map
    }

    /// The hardware profile: pattern of spec §3.1 and one of the configured profiles.
    pub fn profile(&mut self, limits: &Limits) -> String {
        let name = self
            .opt_str("execution_type")
            .unwrap_or_else(|| "cpu".to_string());
        let pattern_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !pattern_ok {
            self.errors.push(
                "execution_type",
                "string_pattern_mismatch",
                "String should match pattern '^[a-zA-Z0-9_.]+$'",
                Some(&Value::String(name.clone())),
            );
        } else if !limits.profiles.iter().any(|p| p == &name) {
            self.errors.push(
                "execution_type",
                "unknown_hardware_profile",
                format!(
                    "unknown hardware profile '{name}'; available: {}",
                    limits.profiles.join(", ")
                ),
                Some(&Value::String(name.clone())),
            );
        }
        name
    }

    /// The fields every start request shares.
    pub fn run_options(&mut self, limits: &Limits) -> RunOptions {
        RunOptions {
            timeout: self.timeout(limits),
            execution_type: self.profile(limits),
            user_callback_urls: self.callback_urls(limits.max_callback_urls),
            run_name: self.opt_str("run_name"),
            labels: self.opt_str_list("labels").unwrap_or_default(),
            metadata: self.opt_str_map("metadata").unwrap_or_default(),
            priority: self.priority(),
            idempotency_key: self.idempotency_key(),
        }
    }

    /// `timeout` with the configured default and maximum.
    pub fn timeout(&mut self, limits: &Limits) -> i64 {
        self.opt_int("timeout", 1, limits.max_timeout)
            .unwrap_or(limits.default_timeout)
    }

    /// `priority`: 0..=100, default 50.
    pub fn priority(&mut self) -> i64 {
        self.opt_int("priority", 0, 100).unwrap_or(50)
    }

    /// `idempotency_key`: at most 200 characters.
    pub fn idempotency_key(&mut self) -> Option<String> {
        let k = self.opt_str("idempotency_key")?;
        if k.is_empty() || k.len() > 200 {
            self.errors.push(
                "idempotency_key",
                "string_too_long",
                "an idempotency key has 1 to 200 characters",
                Some(&Value::String(k)),
            );
            return None;
        }
        Some(k)
    }

    /// `user_callback_urls`: absolute http(s) URLs.
    pub fn callback_urls(&mut self, max: usize) -> Vec<String> {
        let urls = self.opt_str_list("user_callback_urls").unwrap_or_default();
        if urls.len() > max {
            self.errors.push(
                "user_callback_urls",
                "too_long",
                format!("at most {max} callback URLs per run"),
                None,
            );
        }
        for (i, u) in urls.iter().enumerate() {
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() < 10 {
                self.errors.push(
                    &format!("user_callback_urls.{i}"),
                    "url_scheme",
                    "URL scheme should be 'http' or 'https'",
                    Some(&Value::String(u.clone())),
                );
            }
        }
        urls
    }
}

/// Checks that `path` is a safe relative path: no `..`, not absolute, no empty parts.
pub fn safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|p| !p.is_empty() && p != ".." && p != ".")
}

fn is_module_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|p| {
            let mut cs = p.chars();
            matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

impl PythonRunSpec {
    /// Validates a `streaming/start` body.
    pub fn from_json(body: &Value, limits: &Limits) -> Result<Self, FieldErrors> {
        let mut f = Fields::new(body)?;
        let code = f.req_str("code");
        f.opt_int("nbcode", i64::MIN, i64::MAX);
        let run = f.run_options(limits);
        let file_name = f.opt_str("file_name");
        if let Some(n) = &file_name
            && (!safe_relative_path(n) || n.contains('/'))
        {
            f.errors.push(
                "file_name",
                "value_error",
                "file_name must be a plain file name",
                Some(&Value::String(n.clone())),
            );
        }
        let requirements = f.opt_str("requirements_content");
        let prior_imports = f.opt_str_list("prior_imports").unwrap_or_default();
        for (i, m) in prior_imports.iter().enumerate() {
            if !is_module_name(m) {
                f.errors.push(
                    &format!("prior_imports.{i}"),
                    "value_error",
                    "not a module name",
                    Some(&Value::String(m.clone())),
                );
            }
        }
        let import_files = match f.opt_str("import_files") {
            None => BTreeMap::new(),
            Some(s) if s.trim().is_empty() => BTreeMap::new(),
            Some(s) => parse_import_files(&s, limits, &mut f.errors),
        };
        let script = file_name.as_deref().unwrap_or("script.py");
        import_conflicts(&import_files, script, &mut f.errors);
        if !f.errors.is_empty() {
            return Err(f.errors);
        }
        let code = code.expect("checked above");
        Ok(PythonRunSpec {
            code: crate::code::relocate_argv_line(&code),
            file_name_given: file_name.is_some(),
            file_name: file_name.unwrap_or_else(|| "script.py".to_string()),
            requirements,
            prior_imports,
            import_files,
            run,
        })
    }

    /// Top-level module names provided by the bundled files (`pkg/mod.py` → `pkg`).
    pub fn local_module_names(&self) -> std::collections::BTreeSet<String> {
        self.import_files
            .keys()
            .filter_map(|k| {
                let top = k.split('/').next()?;
                Some(top.strip_suffix(".py").unwrap_or(top).to_string())
            })
            .collect()
    }
}

/// Everything an image run needs, validated. Stored with the run as JSON; registry
/// passwords are not part of it (see [`RegistryCredentials`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRunSpec {
    /// Image reference.
    pub image: String,
    /// Command; the image's own when absent.
    pub cmd: Option<Vec<String>>,
    /// Environment from `docker_run_env`, in order.
    pub env: Vec<(String, String)>,
    /// Lines of `docker_run_env` that were skipped, to report in the run's output.
    pub env_warnings: Vec<String>,
    pub file_name: Option<String>,
    /// Mount the org's storage directory into the container.
    pub enable_s3_mount: bool,
    /// Where it is mounted.
    pub s3_mount_path: String,
    /// Seconds between SIGTERM and kill on stop.
    pub graceful_timeout: Option<i64>,
    /// User name of basic registry credentials (the password is never stored).
    pub registry_username: Option<String>,
    /// `customer_notebook` for a notebook (`notebook launch`), else none.
    pub job_type: Option<String>,
    /// Ports the run serves on, reachable through the proxy; the image's `EXPOSE`d
    /// TCP ports when empty.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// How many of the image's `EXPOSE`d ports are proxied when `ports` is empty
    /// (`limits.max_ports_per_run` at submit).
    #[serde(default = "default_max_ports")]
    pub max_ports: usize,
    #[serde(flatten)]
    pub run: RunOptions,
}

fn default_max_ports() -> usize {
    8
}

/// The `job_type` of a notebook run, as the official client sends it.
pub const NOTEBOOK_JOB_TYPE: &str = "customer_notebook";

impl ImageRunSpec {
    /// Whether it is a notebook (`job_type` `customer_notebook`).
    pub fn is_notebook(&self) -> bool {
        self.job_type.as_deref() == Some(NOTEBOOK_JOB_TYPE)
    }
}

/// Basic registry credentials from a start request. `Debug` hides the password.
#[derive(Clone, PartialEq)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RegistryCredentials {{ username: {:?}, password: *** }}",
            self.username
        )
    }
}

/// Splits `docker_run_env` (lines `NAME=value`, split at the first `=`): lines without
/// `=` or with an invalid name are skipped and reported.
pub fn parse_env_lines(raw: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut env = Vec::new();
    let mut warnings = Vec::new();
    for line in raw.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if is_env_name(k) => env.push((k.to_string(), v.to_string())),
            Some((k, _)) => warnings.push(format!(
                "[stoa] skipped docker_run_env entry: '{k}' is not a valid variable name\n"
            )),
            None => warnings.push(format!(
                "[stoa] skipped docker_run_env entry without '=': '{line}'\n"
            )),
        }
    }
    (env, warnings)
}

/// A valid environment variable name: a letter or `_`, then letters, digits or `_`.
pub fn is_env_name(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl ImageRunSpec {
    /// Validates an `image/start` body; returns the spec and, for basic registry
    /// credentials, the credentials (kept apart so they are never stored).
    pub fn from_json(
        body: &Value,
        limits: &Limits,
    ) -> Result<(Self, Option<RegistryCredentials>), FieldErrors> {
        let mut f = Fields::new(body)?;
        let image = f.req_str("docker_image_ref");
        if let Some(i) = &image
            && (i.trim().is_empty() || i.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            f.errors.push(
                "docker_image_ref",
                "value_error",
                "not a valid image reference",
                Some(&Value::String(i.clone())),
            );
        }
        if let Some(i) = &image
            && let Some(reg) = crate::netguard::internal_registry(i, &limits.allowed_registries)
        {
            f.errors.push(
                "docker_image_ref",
                "value_error",
                format!("the image's registry {reg} is a loopback, private, link-local or metadata address; an operator can allow it with docker.allowed_registries"),
                Some(&Value::String(i.clone())),
            );
        }
        let cmd = f.opt_str_list("docker_run_cmd").filter(|c| !c.is_empty());
        let (env, env_warnings) = f
            .opt_str("docker_run_env")
            .map(|e| parse_env_lines(&e))
            .unwrap_or_default();
        let job_type = f.opt_str("job_type");
        if let Some(t) = &job_type
            && t != NOTEBOOK_JOB_TYPE
        {
            f.errors.push(
                "job_type",
                "value_error",
                format!("must be {NOTEBOOK_JOB_TYPE:?} (a notebook) or absent"),
                Some(&Value::String(t.clone())),
            );
        }
        // A notebook may run longer than other runs.
        let run = if job_type.as_deref() == Some(NOTEBOOK_JOB_TYPE) {
            let notebook = Limits {
                max_timeout: limits.notebook_max_timeout,
                ..limits.clone()
            };
            f.run_options(&notebook)
        } else {
            f.run_options(limits)
        };
        let file_name = f.opt_str("file_name");
        let (enable_s3_mount, s3_mount_path) = f.s3_mount(true);
        let graceful_timeout = f.opt_int("graceful_timeout", 0, limits.max_timeout);
        let creds = registry_credentials(&mut f);
        let ports = f.ports(limits.max_ports);
        if !f.errors.is_empty() {
            return Err(f.errors);
        }
        let spec = ImageRunSpec {
            image: image.expect("checked above"),
            cmd,
            env,
            env_warnings,
            file_name,
            enable_s3_mount,
            s3_mount_path,
            graceful_timeout,
            registry_username: creds.as_ref().map(|c| c.username.clone()),
            job_type,
            ports,
            max_ports: limits.max_ports,
            run,
        };
        Ok((spec, creds))
    }
}

/// Where runs see their org's storage unless they name another path.
pub const DEFAULT_S3_MOUNT: &str = "/mnt/s3";

fn default_s3_mount() -> String {
    DEFAULT_S3_MOUNT.to_string()
}

/// Everything a compose run needs, validated. The file is stored as it was sent and
/// interpolated again by the worker, so that secret values never reach the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComposeRunSpec {
    /// The compose file, as sent.
    pub compose_file_code: String,
    /// Its services, in start order (for listings).
    pub services: Vec<String>,
    pub file_name: Option<String>,
    /// Seconds between SIGTERM and kill on stop.
    pub graceful_timeout: Option<i64>,
    /// User name of basic registry credentials (the password is never stored).
    pub registry_username: Option<String>,
    /// Mount the org's storage into the services (`x-stoa.s3-mount` names which; all
    /// when it is absent). Off unless asked, as in Lyceum.
    #[serde(default)]
    pub enable_s3_mount: bool,
    #[serde(default = "default_s3_mount")]
    pub s3_mount_path: String,
    #[serde(flatten)]
    pub run: RunOptions,
}

impl ComposeRunSpec {
    /// Validates a `compose/start` body. The file is parsed, interpolated from `env`
    /// (the org's variables) and checked against the supported subset; each problem
    /// is an error located under `compose_file_code` (`body.compose_file_code.services.web.build`).
    pub fn from_json(
        body: &Value,
        limits: &Limits,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Self, Option<RegistryCredentials>), FieldErrors> {
        let mut f = Fields::new(body)?;
        let code = f.req_str("compose_file_code");
        let run = f.run_options(limits);
        let file_name = f.opt_str("file_name");
        let graceful_timeout = f.opt_int("graceful_timeout", 0, limits.max_timeout);
        let (enable_s3_mount, s3_mount_path) = f.s3_mount(false);
        let creds = registry_credentials(&mut f);
        let gpus = limits
            .profile_gpus
            .get(&run.execution_type)
            .copied()
            .unwrap_or(0);
        let mut services = Vec::new();
        if let Some(code) = &code {
            match crate::compose::plan(code, env, gpus) {
                Ok(p) => {
                    // The image is interpolated: the message never repeats it.
                    for s in &p.services {
                        if crate::netguard::internal_registry(&s.image, &limits.allowed_registries)
                            .is_some()
                        {
                            f.errors.push(
                                &format!("compose_file_code.services.{}.image", s.name),
                                "value_error",
                                "the image's registry is a loopback, private, link-local or metadata address; an operator can allow it with docker.allowed_registries",
                                None,
                            );
                        }
                    }
                    let ports: usize = p.services.iter().map(|s| s.ports.len()).sum();
                    if ports > limits.max_ports {
                        f.errors.push(
                            "compose_file_code",
                            "value_error",
                            format!("its services have {ports} ports; a run has at most {} (limits.max_ports_per_run)", limits.max_ports),
                            None,
                        );
                    }
                    services = p.services.into_iter().map(|s| s.name).collect();
                }
                Err(errs) => {
                    for e in errs {
                        let field = if e.path.is_empty() {
                            "compose_file_code".to_string()
                        } else {
                            format!("compose_file_code.{}", e.path)
                        };
                        f.errors.push(&field, "value_error", e.msg, None);
                    }
                }
            }
        }
        if !f.errors.is_empty() {
            return Err(f.errors);
        }
        let spec = ComposeRunSpec {
            compose_file_code: code.expect("checked above"),
            services,
            file_name,
            graceful_timeout,
            registry_username: creds.as_ref().map(|c| c.username.clone()),
            enable_s3_mount,
            s3_mount_path,
            run,
        };
        Ok((spec, creds))
    }
}

/// Registry credentials of an image or compose start request.
pub fn registry_credentials(f: &mut Fields) -> Option<RegistryCredentials> {
    let kind = f.opt_str("docker_registry_credential_type")?;
    match kind.as_str() {
        "basic" => {
            let user = f.opt_str("docker_username").filter(|s| !s.is_empty());
            let pass = f.opt_str("docker_password").filter(|s| !s.is_empty());
            if user.is_none() {
                f.errors.push(
                    "docker_username",
                    "missing",
                    "required with docker_registry_credential_type 'basic'",
                    None,
                );
            }
            if pass.is_none() {
                f.errors.push(
                    "docker_password",
                    "missing",
                    "required with docker_registry_credential_type 'basic'",
                    None,
                );
            }
            Some(RegistryCredentials {
                username: user?,
                password: pass?,
            })
        }
        "aws" => {
            f.errors.push(
                "docker_registry_credential_type",
                "value_error",
                "AWS (ECR) registry credentials are not supported yet; use 'basic' with a registry user and password",
                Some(&Value::String(kind)),
            );
            None
        }
        _ => {
            f.errors.push(
                "docker_registry_credential_type",
                "enum",
                "Input should be 'basic' or 'aws'",
                Some(&Value::String(kind)),
            );
            None
        }
    }
}

fn parse_import_files(
    s: &str,
    limits: &Limits,
    errors: &mut FieldErrors,
) -> BTreeMap<String, String> {
    let input = Value::String(s.to_string());
    let parsed: Result<BTreeMap<String, Value>, _> = serde_json::from_str(s);
    let Ok(map) = parsed else {
        errors.push(
            "import_files",
            "json_invalid",
            "import_files must be a JSON-encoded object of relative path to file text",
            Some(&input),
        );
        return BTreeMap::new();
    };
    if map.len() > limits.max_import_files {
        errors.push(
            "import_files",
            "too_long",
            format!("at most {} files may be bundled", limits.max_import_files),
            None,
        );
    }
    let mut out = BTreeMap::new();
    for (k, v) in map {
        if !safe_relative_path(&k) {
            errors.push(
                &format!("import_files.{k}"),
                "value_error",
                "path must be relative and must not contain '..'",
                Some(&Value::String(k.clone())),
            );
            continue;
        }
        match v {
            Value::String(text) => {
                out.insert(k, text);
            }
            other => errors.push(
                &format!("import_files.{k}"),
                "string_type",
                "file text should be a string",
                Some(&other),
            ),
        }
    }
    out
}

/// Refuses bundled paths that need a file and a directory of the same name (`a` and
/// `a/b`), including the run's own file `script`: they cannot all be written.
fn import_conflicts(files: &BTreeMap<String, String>, script: &str, errors: &mut FieldErrors) {
    let as_dir = |p: &str| {
        let prefix = format!("{p}/");
        // Keys under `p/` sort together, right after `p/` itself.
        files
            .range(prefix.clone()..)
            .next()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
    };
    let files_and_script = files.keys().map(String::as_str).chain(
        // The run's file is written last, over a bundled file of the same name.
        (!files.contains_key(script)).then_some(script),
    );
    for p in files_and_script {
        if let Some(inner) = as_dir(p) {
            let what = if p == script && !files.contains_key(p) {
                "the run's file_name"
            } else {
                "a file"
            };
            errors.push(
                "import_files",
                "value_error",
                format!(
                    "{p:?} is both {what} and the directory of {inner:?}; a path cannot be both"
                ),
                Some(&Value::String(inner)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            default_timeout: 60,
            max_timeout: 600,
            notebook_max_timeout: 3600,
            max_ports: 8,
            profiles: vec!["cpu".into()],
            max_import_files: 100,
            max_callback_urls: 2,
            profile_gpus: BTreeMap::new(),
            allowed_registries: vec!["127.0.0.1:5000".into()],
        }
    }

    #[test]
    fn internal_registries_are_refused_with_the_field_named() {
        for image in [
            "127.0.0.1:5001/x",
            "localhost:5000/x",
            "169.254.169.254/x",
            "[::1]:5000/x",
            "10.0.0.5/x",
        ] {
            let e = ImageRunSpec::from_json(&json!({"docker_image_ref": image}), &limits())
                .unwrap_err();
            assert_eq!(e.0[0].loc, ["body", "docker_image_ref"], "{image}");
            assert!(
                e.0[0].msg.contains("docker.allowed_registries"),
                "{:?}",
                e.0[0]
            );
        }
        assert!(
            ImageRunSpec::from_json(&json!({"docker_image_ref": "127.0.0.1:5000/x"}), &limits())
                .is_ok()
        );
        assert!(
            ImageRunSpec::from_json(
                &json!({"docker_image_ref": "registry.example.com/x"}),
                &limits()
            )
            .is_ok()
        );
        let env = |n: &str| (n == "REG").then(|| "10.1.2.3:5000".to_string());
        let yaml = "services:\n  ok: {image: busybox}\n  bad: {image: \"${REG}/x\"}\n";
        let e = ComposeRunSpec::from_json(&json!({"compose_file_code": yaml}), &limits(), &env)
            .unwrap_err();
        assert_eq!(e.0.len(), 1, "{e:?}");
        assert_eq!(
            e.0[0].loc,
            ["body", "compose_file_code", "services", "bad", "image"]
        );
        assert!(
            !e.0[0].msg.contains("10.1.2.3"),
            "interpolated values are not repeated"
        );
    }

    #[test]
    fn defaults_are_applied() {
        let s =
            PythonRunSpec::from_json(&json!({"code": "print(1)", "extra": 1}), &limits()).unwrap();
        assert_eq!(s.run.timeout, 60);
        assert_eq!(s.run.execution_type, "cpu");
        assert_eq!(s.file_name, "script.py");
    }

    #[test]
    fn every_bad_field_is_named() {
        let e = PythonRunSpec::from_json(
            &json!({"timeout": 601, "execution_type": "gpu.x", "import_files": "{\"../a.py\": \"\"}"}),
            &limits(),
        )
        .unwrap_err();
        let locs: Vec<String> = e.0.iter().map(|x| x.loc.join(".")).collect();
        assert_eq!(
            locs,
            vec![
                "body.code",
                "body.timeout",
                "body.execution_type",
                "body.import_files.../a.py"
            ]
        );
    }

    #[test]
    fn image_requests() {
        let (s, c) = ImageRunSpec::from_json(
            &json!({"docker_image_ref": "local/busybox:full", "docker_run_env": "FOO=bar\nMULTI=a=b\nBADVAR",
                "docker_registry_credential_type": "basic", "docker_username": "u", "docker_password": "p"}),
            &limits(),
        )
        .unwrap();
        assert_eq!(
            s.env,
            vec![("FOO".into(), "bar".into()), ("MULTI".into(), "a=b".into())]
        );
        assert_eq!(s.env_warnings.len(), 1);
        assert_eq!(s.s3_mount_path, "/mnt/s3");
        assert!(s.enable_s3_mount);
        assert_eq!(c.unwrap().password, "p");
        assert!(
            !serde_json::to_string(&s).unwrap().contains("\"p\""),
            "the password is not in the stored spec"
        );
        let e = ImageRunSpec::from_json(
            &json!({"docker_image_ref": "x", "docker_registry_credential_type": "aws"}),
            &limits(),
        )
        .unwrap_err();
        assert_eq!(e.0[0].loc, vec!["body", "docker_registry_credential_type"]);
        assert!(e.0[0].msg.contains("not supported yet"));
        let e = ImageRunSpec::from_json(
            &json!({"timeout": 5, "s3_mount_path": "/a/../b"}),
            &limits(),
        )
        .unwrap_err();
        let locs: Vec<String> = e.0.iter().map(|x| x.loc.join(".")).collect();
        assert_eq!(locs, vec!["body.docker_image_ref", "body.s3_mount_path"]);
    }

    #[test]
    fn a_path_cannot_be_a_file_and_a_directory() {
        let check = |files: serde_json::Value, extra: serde_json::Value| {
            let mut body = json!({"code": "print(1)", "import_files": files.to_string()});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            PythonRunSpec::from_json(&body, &limits()).map(|_| ())
        };
        for (files, extra, both) in [
            (
                json!({"a": "", "a/b": ""}),
                json!({}),
                "\"a\" is both a file",
            ),
            (
                json!({"a": "", "a/b/c": "", "ab": ""}),
                json!({}),
                "\"a\" is both",
            ),
            (
                json!({"pkg/a": "", "pkg/a/b/c.py": ""}),
                json!({}),
                "\"pkg/a\" is both",
            ),
            (json!({"script.py/x": ""}), json!({}), "the run's file_name"),
            (
                json!({"main.py/x": ""}),
                json!({"file_name": "main.py"}),
                "the run's file_name",
            ),
        ] {
            let e = check(files.clone(), extra).expect_err(&files.to_string());
            assert_eq!(e.0.len(), 1, "{e:?}");
            assert_eq!(e.0[0].loc, vec!["body", "import_files"]);
            assert!(e.0[0].msg.contains(both), "{files}: {}", e.0[0].msg);
        }
        for files in [
            json!({"a/b": "", "a/c": "", "ab": "", "a.b/c": "", "a-b": ""}),
            json!({"script.py": "", "lib/script.py": ""}),
        ] {
            if let Err(e) = check(files.clone(), json!({})) {
                panic!("{files}: {e:?}");
            }
        }
    }

    #[test]
    fn paths_are_checked() {
        assert!(safe_relative_path("pkg/mod.py"));
        assert!(!safe_relative_path("/etc/passwd"));
        assert!(!safe_relative_path("a/../b"));
        assert!(!safe_relative_path("a//b"));
    }
}
