//! A compose file, whatever its bytes: planned or refused with errors, never a panic;
//! a plan's services are unique and its proxy ports served once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let env = |name: &str| (name.len() % 2 == 0).then(|| format!("v{name}"));
    if let Ok(plan) = stoa_core::compose::plan(text, &env, 2) {
        let mut names: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len(), "services are unique");
        let mut ports: Vec<u16> = plan
            .services
            .iter()
            .flat_map(|s| s.ports.iter().map(|p| p.0))
            .collect();
        let m = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(m, ports.len(), "each proxy port once");
    }
});
