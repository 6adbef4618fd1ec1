//! Test support for Fluidity: the deterministic simulation harness.

pub mod e2e;
pub mod moto;
