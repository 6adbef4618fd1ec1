//! Fluidity's AWS layer.
//!
//! - sign requests with SigV4 (module `sign`, through `aws-sigv4`, never by hand);
//! - resolve credentials like the AWS SDKs ([`chain`]): environment, shared profile files,
//!   ECS container credentials, EC2 instance metadata (IMDSv2), optional AssumeRole on top,
//!   cached and refreshed before expiry; and the region ([`profile::resolve_region`]);
//! - override endpoints per service ([`Endpoints`], `AWS_ENDPOINT_URL*`);
//! - small typed [`clients`] for STS, ECS, EC2, DynamoDB, Secrets Manager, CloudWatch and
//!   Lambda function URLs;
//! - IAM authentication of tunnel clients through STS ([`iam_auth`]).
//!
//! Everything is synchronous on `ureq`; async callers run calls with `blocking::unblock`.
//! All configuration is read from an explicit [`Env`] snapshot so tests can inject it.
//! Nothing here logs a secret key, session token, signature or Authorization header.

pub mod chain;
mod client;
pub mod clients;
pub mod control;
mod credentials;
pub mod endpoints;
mod env;
mod error;
#[cfg(any(fuzzing, test))]
pub mod fuzzing;
pub mod http;
pub mod iam_auth;
pub mod imds;
pub mod profile;
mod sign;
pub mod xml;

pub use chain::{ChainOptions, ProvideCredentials};
pub use client::AwsConfig;
pub use credentials::Credentials;
pub use endpoints::{Endpoints, Service};
pub use env::Env;
pub use error::{Error, Result};
pub use http::{HttpClient, HttpConfig, RetryPolicy};
