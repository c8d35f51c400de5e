//! Compose interpolation of any string: a value or an error, never a panic; text
//! without `$` comes back unchanged, and `$$` is one `$`.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let env = |name: &str| match name.len() % 3 {
        0 => None,
        1 => Some(String::new()),
        _ => Some(format!("<{name}>")),
    };
    let mut unset = BTreeSet::new();
    let out = stoa_core::compose::interpolate(s, &env, &mut unset);
    if !s.contains('$') {
        assert_eq!(out.as_deref(), Ok(s));
    }
    let escaped = s.replace('$', "$$");
    let mut unset = BTreeSet::new();
    assert_eq!(
        stoa_core::compose::interpolate(&escaped, &env, &mut unset).as_deref(),
        Ok(s),
        "$$ is a literal $"
    );
});
