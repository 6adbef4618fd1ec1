//! End-to-end test support: the real `fluidity` and `fluidity-server` binaries on
//! 127.0.0.1, real clients (curl, Python `websockets`, plain sockets) and small real origin
//! servers written here.
//!
//! - [`bin`] builds the binaries once per test process and finds them next to the test
//!   executable, so `CARGO_TARGET_DIR` and the profile are respected.
//! - [`proc`] runs child processes that are killed on drop, with their stderr in a file
//!   that is printed when a test fails, and a [`proc::Watchdog`] that ends a hung test.
//! - [`tunnel`] starts a server and an agent (or `fluidity local`) and waits until the
//!   tunnel is ready, never with fixed sleeps.
//! - [`origin`] holds the origins: HTTP/1.1 (plain and TLS), echo, flood, black hole, one
//!   whose connections end in resets (HTTP and WebSocket), and a Python WebSocket echo
//!   server.
//! - [`client`] holds the client side: curl, CONNECT through the proxy, raw HTTP, the
//!   Python WebSocket client, and the deterministic payloads.
//!
//! Everything here panics with a message on a setup failure: it is test code, and a panic
//! is how a test reports. Origins never panic on what a client sends.

pub mod bin;
pub mod client;
pub mod origin;
pub mod proc;
pub mod tunnel;

pub use client::{curl, payload, sha256_hex, Curl};
pub use proc::{watchdog, Watchdog};
pub use tunnel::{Agent, AgentOptions, PathRelay, Server, ServerOptions, Tunnel};
