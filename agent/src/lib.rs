//! Fluidity agent library: the laptop side of the tunnel.
//!
//! - [`proxy`]: the local proxy front end (HTTP/1.1 forward proxy, CONNECT, WebSocket
//!   upgrade, SOCKS5), written against a [`proxy::Dialer`];
//! - [`tunnel`]: the [`proxy::Dialer`] that carries streams through the tunnel, with
//!   reconnection and a circuit breaker;
//! - [`iam`]: IAM tunnel authentication (signing an STS request with the AWS credential
//!   chain);
//! - [`aws`]: AWS mode: wake, query, certificate, connect, kill on exit;
//! - [`config`]: the configuration file and its defaults;
//! - [`run`]: wiring the proxy to the tunnel;
//! - [`local`]: local mode (certificates, an in-process server and the proxy).

pub mod aws;
pub mod config;
pub mod error;
pub mod iam;
pub mod local;
pub mod proxy;
pub mod run;
pub mod tunnel;
