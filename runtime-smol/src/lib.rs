//! Runtime for Fluidity tunnel connections: the driver that runs a `fluidity-proto`
//! connection over `smol`/`async-io` sockets and rustls, and what the binaries build on it.
//!
//! - [`driver`] owns one TLS connection and its `proto::Connection`; [`stream`] gives each
//!   tunnel stream as `AsyncRead + AsyncWrite`, and its received bytes as shared chunks;
//!   [`relay`] moves bytes between a stream and a socket, in a bulk transfer without
//!   copying them.
//! - [`tls`] is the only module of the data plane that touches rustls. It builds the
//!   mutual TLS 1.3 configurations (private CA, ALPN `fluidity/1`, ring with a
//!   post-quantum hybrid key exchange, passed explicitly), checks peer identities (CN
//!   and IP SANs), derives the channel-binding value used by tunnel authentication, and
//!   wraps a rustls connection for a buffered-API driver.
//! - [`pki`] generates the private CA and the server and agent certificates, creates
//!   and signs CSRs, and manages a local certificate directory (`fluidity certs init`).
//! - [`app`] runs a binary's executor threads; [`timer`], [`listener`], [`resolve`] and
//!   [`happy_eyeballs`] are small pieces every loop needs: a moving deadline, what to do
//!   when accepting fails, name lookups under a deadline, and connecting to the first of
//!   several addresses that answers.

pub mod app;
pub mod driver;
pub mod files;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod happy_eyeballs;
pub mod listener;
pub mod pki;
pub mod relay;
pub mod resolve;
pub mod stream;
#[cfg(any(test, fuzzing, feature = "testing"))]
pub mod testing;
pub mod timer;
pub mod tls;

pub use driver::{accept, connect, handshake, start, Driver, Handshaken, Tunnel, TunnelEvent};
pub use stream::TunnelStream;

mod error;

pub use error::{Error, IdentityError, PeerRole};
