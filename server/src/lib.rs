//! Fluidity server library: the cloud side of the tunnel.
//!
//! - [`egress`]: the egress policy, name resolution and the dialler that answers every
//!   stream open with a connection or a typed refusal;
//! - [`health`]: the server's counters and the `/healthz` and `/metrics` endpoint;
//! - [`aws`]: AWS mode: self-discovery, the agent's address, the certificate from the CA
//!   function, CloudWatch metrics;
//! - [`config`]: the configuration file and its defaults;
//! - [`serve`]: the tunnel listener, one tunnel per agent, streams dialled through egress;
//! - [`iam`]: IAM authentication of agents through STS (`auth = "iam"`);
//! - [`Error`]: the crate's error type.

pub mod aws;
pub mod config;
pub mod egress;
pub mod health;
pub mod iam;
pub mod serve;

mod error;
mod give_way;

pub use config::ServerConfig;
pub use error::Error;
pub use serve::Server;
