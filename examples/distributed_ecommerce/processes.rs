//! `--service` and `--drive`: the example as separate processes
//! (`eventcore_examples::distributed_ecommerce::process`).

pub(crate) use eventcore_examples::distributed_ecommerce::process::{drive, run_service};
