//! Start request bodies (Python, image, compose), whatever their JSON: a spec or field
//! errors, never a panic; every error names a field under `body`.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use stoa_core::validate::{ComposeRunSpec, ImageRunSpec, Limits, PythonRunSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let limits = Limits {
        default_timeout: 60,
        max_timeout: 600,
        notebook_max_timeout: 3600,
        max_ports: 8,
        profiles: vec!["cpu".into(), "gpu.a100".into()],
        max_import_files: 100,
        max_callback_urls: 4,
        profile_gpus: BTreeMap::from([("gpu.a100".to_string(), 1)]),
        allowed_registries: vec![],
    };
    let check = |errors: &stoa_core::validate::FieldErrors| {
        for e in &errors.0 {
            assert_eq!(e.loc.first().map(String::as_str), Some("body"), "{e:?}");
        }
    };
    if let Err(e) = PythonRunSpec::from_json(&body, &limits) {
        check(&e);
    }
    match ImageRunSpec::from_json(&body, &limits) {
        Ok((spec, _)) => {
            assert!(spec.run.timeout >= 1);
            assert!(spec.ports.len() <= limits.max_ports);
        }
        Err(e) => check(&e),
    }
    let env = |_: &str| Some("x".to_string());
    if let Err(e) = ComposeRunSpec::from_json(&body, &limits, &env) {
        check(&e);
    }
});
