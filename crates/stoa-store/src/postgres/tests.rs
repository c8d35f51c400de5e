/// The rules of [`crate::conformance`], on this backend: one database per test, in the
/// cluster `STOA_TEST_DATABASE_URL` names.
mod conformance {
    crate::conformance_suite!(crate::conformance::fresh_postgres());
}
