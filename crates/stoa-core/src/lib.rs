//! Stoa's pure logic: the run state machine, request validation, requirement cleaning
//! and the few rewrites applied to submitted code. No IO lives here.

pub mod code;
pub mod compose;
pub mod lifecycle;
pub mod loops;
pub mod netguard;
pub mod plane;
pub mod record;
pub mod requirements;
pub mod scheduler;
pub mod time;
pub mod validate;

pub use lifecycle::{can_transition, streaming_status};
pub use validate::{
    ComposeRunSpec, FieldErrors, ImageRunSpec, Limits, PythonRunSpec, RegistryCredentials,
    RunOptions,
};

/// Where a reconnecting output stream resumes: after the output line its
/// `Last-Event-ID` header names (`end`: after all of it; absent, negative or not a
/// number: from the start).
pub fn resume_after(last_event_id: Option<&str>) -> i64 {
    match last_event_id.map(str::trim) {
        Some("end") => i64::MAX,
        Some(v) => v.parse::<i64>().map_or(0, |n| n.max(0)),
        None => 0,
    }
}

#[cfg(test)]
mod resume_tests {
    use super::resume_after;

    #[test]
    fn the_last_event_id_names_where_a_stream_resumes() {
        assert_eq!(resume_after(None), 0);
        assert_eq!(resume_after(Some("end")), i64::MAX);
        assert_eq!(resume_after(Some(" 42 ")), 42);
        assert_eq!(resume_after(Some("-3")), 0);
        assert_eq!(resume_after(Some("x")), 0);
        assert_eq!(resume_after(Some("99999999999999999999")), 0);
    }
}
