//! Stoa's integration tests: one binary, modules per area. Every test drives the real
//! HTTP server on 127.0.0.1:0 over its real SQLite store, with real Python processes.

mod it;
