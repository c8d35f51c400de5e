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
