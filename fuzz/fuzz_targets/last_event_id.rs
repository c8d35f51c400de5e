//! The `Last-Event-ID` of a reconnecting stream, whatever its text: where the stream
//! resumes, never negative, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    assert!(stoa_core::resume_after(Some(s)) >= 0);
});
