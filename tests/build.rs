//! Sets `cfg(postgres_tests)` when DATABASE_URL is set, so that the PostgreSQL tests show
//! as ignored (with the reason) in a bare `cargo test` without a database, and run
//! whenever one is configured. `scripts/test` always provides one.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo::rerun-if-env-changed=DATABASE_URL");
    if std::env::var_os("DATABASE_URL").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=postgres_tests");
    }
}
