//! The control plane: the Wake, Query, Kill, Sleep and CA handlers behind the Lambda
//! functions, as plain functions over typed requests, responses and the AWS clients.
//!
//! - [`types`]: the JSON shapes, shared by handlers and [`ControlClient`]; the DynamoDB
//!   attribute names and the metric names the server must use;
//! - [`handlers`]: [`Control`], which runs each function;
//! - [`agent_ip`]: the agent-IP table, keyed by [`ServerId`] (`CLUSTER/SERVICE`), which
//!   exists before any task, so Wake can write it and the server can read it at start-up;
//! - [`ca`]: the CA's naming policy over the project's PKI;
//! - [`lambda`]: Lambda events, function-URL responses and a small Runtime API client
//!   (the `bootstrap` binary);
//! - [`local`]: the same functions over HTTP on loopback (`fluidity-control`);
//! - [`client`]: [`ControlClient`], the typed, SigV4-signed caller the agent and server use.
//!
//! `docs/AWS.md` describes the functions, their settings and the decisions behind them.

pub mod agent_ip;
pub mod ca;
pub mod client;
pub mod config;
mod error;
pub mod handlers;
pub mod lambda;
pub mod local;
pub mod types;

pub use client::{ControlClient, ControlUrls};
pub use config::ControlConfig;
pub use error::ControlError;
pub use handlers::{task_ips, Caller, Control, ServerState, SleepStep, WakeStep};
pub use types::*;
