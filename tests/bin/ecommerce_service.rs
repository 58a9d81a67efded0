//! One service of the e-commerce example in a process of its own, for the multi-process
//! test (`ecommerce-service <user|order|inventory|payment|shipping>`): the same code as
//! `cargo run --example distributed_ecommerce -- --service <name>`, configured by
//! `NATS_URL`, `DATABASE_URL`, `ECOMMERCE_PREFIX` and `ECOMMERCE_PAYMENT_TIMEOUT_SECS`.

use std::process::ExitCode;

use eventcore_examples::distributed_ecommerce::contracts::ServiceName;
use eventcore_examples::distributed_ecommerce::process::run_service;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(service) = std::env::args()
        .nth(1)
        .as_deref()
        .and_then(ServiceName::parse)
    else {
        eprintln!("usage: ecommerce-service <user|order|inventory|payment|shipping>");
        return ExitCode::FAILURE;
    };
    match run_service(service, "127.0.0.1:0").await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("the {service} service failed: {error}");
            ExitCode::FAILURE
        }
    }
}
