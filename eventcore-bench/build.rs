//! Sets `cfg(postgres_tests)` when DATABASE_URL is set and `cfg(nats_tests)` when
//! NATS_URL is set, so that the benchmark's PostgreSQL smoke run (W2x2) shows as ignored
//! (with the reason) in a bare `cargo test` without the server, and runs whenever one is
//! configured. `scripts/test` always provides both. (The same as `tests/build.rs`.)

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo::rustc-check-cfg=cfg(nats_tests)");
    println!("cargo::rerun-if-env-changed=DATABASE_URL");
    println!("cargo::rerun-if-env-changed=NATS_URL");
    if std::env::var_os("DATABASE_URL").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=postgres_tests");
    }
    if std::env::var_os("NATS_URL").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=nats_tests");
    }
}
