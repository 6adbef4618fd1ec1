//! The handshake: hello (version and limits) → auth → auth result → ready.
//!
//! Both sides send [`Hello`] at once. The agent sends its auth frame right behind its
//! hello (no round trip is spent waiting). The server answers the auth with an
//! [`AuthResult`] once the application has decided (or at once in mTLS-only mode). No
//! stream frame is valid before the agent has received an accepting auth result. A
//! deadline covers the whole handshake.

use std::fmt;

use bytes::Bytes;

use crate::{Error, Limits};

/// Lowest protocol version this implementation speaks.
pub const MIN_VERSION: u8 = 1;
/// Highest protocol version this implementation speaks.
pub const MAX_VERSION: u8 = 1;

/// Authentication method name for "no tunnel authentication" (identity from mTLS only).
pub const AUTH_METHOD_NONE: &str = "none";

/// The first frame of each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Hello {
    /// Lowest protocol version the sender speaks.
    pub min_version: u8,
    /// Highest protocol version the sender speaks.
    pub max_version: u8,
    /// The sender's limits.
    pub limits: Limits,
}

impl Hello {
    pub(crate) fn ours(limits: Limits) -> Hello {
        Hello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            limits,
        }
    }

    /// The highest version both sides speak.
    pub fn negotiate(&self, peer: &Hello) -> Result<u8, Error> {
        let v = self.max_version.min(peer.max_version);
        if v < self.min_version || v < peer.min_version || peer.min_version > peer.max_version {
            return Err(Error::VersionMismatch {
                ours_min: self.min_version,
                ours_max: self.max_version,
                theirs_min: peer.min_version,
                theirs_max: peer.max_version,
            });
        }
        Ok(v)
    }
}

/// What the agent presents to authenticate: a method name and its payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Method name, 1..=64 bytes of visible ASCII.
    pub method: String,
    /// Method-specific payload (for `aws-sts-v1`, a signed STS request).
    pub payload: Bytes,
}

impl Credentials {
    /// No tunnel authentication: the server must be in mTLS-only mode.
    pub fn none() -> Credentials {
        Credentials {
            method: AUTH_METHOD_NONE.to_owned(),
            payload: Bytes::new(),
        }
    }
}

impl fmt::Debug for Credentials {
    // The payload may hold a signature: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("method", &self.method)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A typed reason for rejecting authentication. Carried on the wire as a `u16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum AuthFailure {
    /// The identity is valid but not on the server's allow list.
    NotAllowed,
    /// The credentials are invalid (for example STS said the signature does not match).
    InvalidCredentials,
    /// This exact request was seen before.
    Replayed,
    /// The request's timestamp is outside the accepted window.
    ClockSkew,
    /// The request names another server.
    WrongServer,
    /// The request is bound to another TLS session.
    ChannelBindingMismatch,
    /// The server could not verify the request (for example STS unreachable).
    VerifierUnavailable,
    /// Too many failed attempts from this address.
    RateLimited,
    /// The server does not support the method.
    UnsupportedMethod,
    /// The payload could not be parsed.
    Malformed,
    /// A code this version does not know.
    Unknown(u16),
}

impl AuthFailure {
    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            AuthFailure::NotAllowed => 1,
            AuthFailure::InvalidCredentials => 2,
            AuthFailure::Replayed => 3,
            AuthFailure::ClockSkew => 4,
            AuthFailure::WrongServer => 5,
            AuthFailure::ChannelBindingMismatch => 6,
            AuthFailure::VerifierUnavailable => 7,
            AuthFailure::RateLimited => 8,
            AuthFailure::UnsupportedMethod => 9,
            AuthFailure::Malformed => 10,
            AuthFailure::Unknown(c) => c,
        }
    }

    /// The failure for a wire code.
    pub fn from_code(code: u16) -> AuthFailure {
        match code {
            1 => AuthFailure::NotAllowed,
            2 => AuthFailure::InvalidCredentials,
            3 => AuthFailure::Replayed,
            4 => AuthFailure::ClockSkew,
            5 => AuthFailure::WrongServer,
            6 => AuthFailure::ChannelBindingMismatch,
            7 => AuthFailure::VerifierUnavailable,
            8 => AuthFailure::RateLimited,
            9 => AuthFailure::UnsupportedMethod,
            10 => AuthFailure::Malformed,
            c => AuthFailure::Unknown(c),
        }
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            AuthFailure::NotAllowed => "principal not allowed",
            AuthFailure::InvalidCredentials => "invalid credentials",
            AuthFailure::Replayed => "replayed request",
            AuthFailure::ClockSkew => "request time outside the accepted window",
            AuthFailure::WrongServer => "request names another server",
            AuthFailure::ChannelBindingMismatch => "request bound to another TLS session",
            AuthFailure::VerifierUnavailable => "server could not verify the request",
            AuthFailure::RateLimited => "too many failed attempts",
            AuthFailure::UnsupportedMethod => "unsupported authentication method",
            AuthFailure::Malformed => "malformed authentication payload",
            AuthFailure::Unknown(c) => return write!(f, "unknown failure code {c}"),
        };
        f.write_str(s)
    }
}

/// The server's answer to an auth frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum AuthResult {
    /// Admitted.
    Accepted {
        /// Who the server thinks the agent is (for example an IAM ARN); may be empty.
        principal: String,
        /// Seconds the admission is valid for; 0 means for the life of the connection.
        lifetime_secs: u32,
    },
    /// Refused; the server closes the connection after sending this.
    Rejected {
        /// Why.
        failure: AuthFailure,
        /// One line for humans.
        detail: String,
    },
}

/// An authentication attempt the server application must answer with
/// `Connection::accept_auth` or `Connection::reject_auth`. Not `Clone`: there is exactly one
/// answer; dropping it unanswered leaves the handshake to its deadline.
#[must_use = "answer with accept_auth or reject_auth, or the handshake times out"]
#[derive(PartialEq, Eq)]
pub struct AuthRequest {
    /// The method the agent chose.
    pub method: String,
    /// The method's payload.
    pub payload: Bytes,
}

impl fmt::Debug for AuthRequest {
    // The payload may hold a signature: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRequest")
            .field("method", &self.method)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Where a side is in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the peer's hello.
    AwaitHello,
    /// Server: hello done, waiting for the agent's auth frame.
    AwaitAuth,
    /// Server: the application holds the [`AuthRequest`].
    AuthPending,
    /// Agent: hello done, waiting for the auth result.
    AwaitAuthResult,
    /// Handshake complete.
    Ready,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u8, max: u8) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            limits: Limits::default(),
        }
    }

    #[test]
    fn negotiates_highest_common_version() {
        assert_eq!(hello(1, 3).negotiate(&hello(2, 5)), Ok(3));
        assert_eq!(hello(1, 1).negotiate(&hello(1, 1)), Ok(1));
        assert!(hello(1, 1).negotiate(&hello(2, 2)).is_err());
        assert!(hello(1, 3).negotiate(&hello(3, 2)).is_err());
    }

    #[test]
    fn failure_codes_round_trip() {
        for c in 0..30u16 {
            assert_eq!(AuthFailure::from_code(c).code(), c);
        }
    }

    #[test]
    fn debug_never_shows_payload() {
        let c = Credentials {
            method: "x".into(),
            payload: Bytes::from_static(b"SECRET-SIGNATURE"),
        };
        assert!(!format!("{c:?}").contains("SECRET"));
        let r = AuthRequest {
            method: "x".into(),
            payload: Bytes::from_static(b"SECRET-SIGNATURE"),
        };
        assert!(!format!("{r:?}").contains("SECRET"));
    }
}
