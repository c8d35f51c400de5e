//! The run state machine: which transitions are allowed, and how states read on the
//! streaming-status fallback endpoint.

use stoa_types::RunStatus;

/// Whether a run may move from `from` to `to`.
///
/// Invariants: terminal states are final; a run never goes back; `pending` may be
/// aborted or cancelled directly (it never ran), but it cannot complete or fail.
pub fn can_transition(from: RunStatus, to: RunStatus) -> bool {
    use RunStatus::*;
    if from.is_terminal() || from == to {
        return false;
    }
    match (from, to) {
        (Pending, Starting) => true,
        (Pending, Aborted | Cancelled | SystemFailure) => true,
        (Pending, _) => false,
        (Starting, Running) => true,
        (Starting, t) => t.is_terminal(),
        (Running, t) => t.is_terminal(),
        _ => false,
    }
}

/// The status string used by `GET …/execution/streaming/{id}/status` (spec §5), which
/// the official client's polling fallback understands.
pub fn streaming_status(status: RunStatus, timed_out: bool) -> &'static str {
    use RunStatus::*;
    match status {
        Pending | Starting => "pending",
        Running => "running",
        Completed => "completed",
        Failed if timed_out => "timeout",
        Failed => "failed",
        SystemFailure => "failed_system",
        Aborted | Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn status() -> impl Strategy<Value = RunStatus> {
        (0..RunStatus::ALL.len()).prop_map(|i| RunStatus::ALL[i])
    }

    proptest! {
        /// No sequence of events moves a run out of a terminal state, and a run that
        /// applied only allowed transitions reaches at most one terminal state.
        #[test]
        fn terminal_states_are_final(events in proptest::collection::vec(status(), 0..40)) {
            let mut current = RunStatus::Pending;
            let mut terminals = 0;
            for ev in events {
                if can_transition(current, ev) {
                    prop_assert!(!current.is_terminal());
                    current = ev;
                    if current.is_terminal() {
                        terminals += 1;
                    }
                }
            }
            prop_assert!(terminals <= 1);
        }
    }

    #[test]
    fn lifecycle_order_is_enforced() {
        use RunStatus::*;
        assert!(can_transition(Pending, Starting));
        assert!(can_transition(Starting, Running));
        assert!(can_transition(Running, Completed));
        assert!(!can_transition(Pending, Completed));
        assert!(!can_transition(Running, Pending));
        assert!(!can_transition(Completed, Failed));
        assert!(can_transition(Pending, Aborted));
    }

    #[test]
    fn fallback_vocabulary() {
        assert_eq!(streaming_status(RunStatus::Starting, false), "pending");
        assert_eq!(
            streaming_status(RunStatus::SystemFailure, false),
            "failed_system"
        );
        assert_eq!(streaming_status(RunStatus::Aborted, false), "cancelled");
        assert_eq!(streaming_status(RunStatus::Failed, true), "timeout");
    }
}
