//! The crate's one error type and the wire error codes.

use std::fmt;

use crate::frame::FrameType;
use crate::handshake::AuthFailure;
use crate::StreamId;

/// A wire error code, carried by reset and goaway frames. An open set: codes this version
/// does not name are kept and reported as numbers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Graceful: no error.
    pub const NO_ERROR: ErrorCode = ErrorCode(0);
    /// The peer broke the protocol.
    pub const PROTOCOL: ErrorCode = ErrorCode(1);
    /// An internal error in the sender.
    pub const INTERNAL: ErrorCode = ErrorCode(2);
    /// The peer sent more than its credit window allowed.
    pub const FLOW_CONTROL: ErrorCode = ErrorCode(3);
    /// A frame exceeded the advertised maximum length.
    pub const FRAME_SIZE: ErrorCode = ErrorCode(4);
    /// A frame arrived for a stream in a state that does not allow it.
    pub const STREAM_CLOSED: ErrorCode = ErrorCode(5);
    /// The handshake did not complete within its deadline.
    pub const HANDSHAKE_TIMEOUT: ErrorCode = ErrorCode(6);
    /// Authentication was rejected.
    pub const AUTH_FAILED: ErrorCode = ErrorCode(7);
    /// No protocol version is supported by both sides.
    pub const VERSION_MISMATCH: ErrorCode = ErrorCode(8);
    /// The peer was silent for longer than the idle timeout.
    pub const IDLE_TIMEOUT: ErrorCode = ErrorCode(9);
    /// A stream was cancelled by the application (the usual reset code).
    pub const CANCEL: ErrorCode = ErrorCode(10);
    /// The side is overloaded (the reference server: beyond its tunnel limit).
    pub const EXCESSIVE_LOAD: ErrorCode = ErrorCode(11);

    /// A short name for the code, or `None` for codes this version does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "NO_ERROR",
            1 => "PROTOCOL",
            2 => "INTERNAL",
            3 => "FLOW_CONTROL",
            4 => "FRAME_SIZE",
            5 => "STREAM_CLOSED",
            6 => "HANDSHAKE_TIMEOUT",
            7 => "AUTH_FAILED",
            8 => "VERSION_MISMATCH",
            9 => "IDLE_TIMEOUT",
            10 => "CANCEL",
            11 => "EXCESSIVE_LOAD",
            _ => return None,
        })
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "code {}", self.0),
        }
    }
}

/// Everything that can go wrong in `fluidity-proto`: misuse by the application, malformed
/// input, and the reasons a connection is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not an error: the stream has no data to read, or no credit to write. Wait for
    /// `StreamEvent::Readable` or `StreamEvent::Writable`.
    #[error("would block: wait for a readable or writable event")]
    Blocked,
    /// The stream does not exist (never opened, or already closed or reset).
    #[error("stream {0} does not exist")]
    UnknownStream(StreamId),
    /// The application tried to open a stream before the handshake finished.
    #[error("the tunnel is not ready yet")]
    NotReady,
    /// Opening one more stream would exceed the peer's stream limit.
    #[error("the peer allows no more concurrent streams")]
    TooManyStreams,
    /// The connection is shutting down and takes no new streams.
    #[error("the tunnel is shutting down")]
    GoingAway,
    /// The application wrote after finishing the stream.
    #[error("stream {0} is already finished for writing")]
    StreamFinished(StreamId),
    /// Only the agent opens streams.
    #[error("only the agent side opens streams")]
    WrongSide,
    /// The stream is not waiting for an accept or refuse answer.
    #[error("stream {0} is not waiting for an open answer")]
    NotPendingOpen(StreamId),
    /// The stream was opened but the server has not accepted it, so it cannot be read yet.
    #[error("stream {0} is not open yet")]
    NotOpen(StreamId),
    /// The application asked to open a stream to a host name no OPEN can carry: empty,
    /// over 255 bytes, or not visible ASCII (see [`Host::name`](crate::Host::name)).
    #[error("invalid target host name {0:?}: 1 to 255 bytes of visible ASCII")]
    InvalidTarget(String),
    /// The agent was given credentials whose method name no AUTH can carry.
    #[error("invalid authentication method name {0:?}: 1 to 64 bytes of visible ASCII")]
    InvalidAuthMethod(String),
    /// The agent was given credentials whose AUTH frame would be longer than the
    /// 16 KiB every server takes before its limits are known.
    #[error("credentials of {0} bytes do not fit an AUTH frame of 16 KiB")]
    CredentialsTooLarge(usize),
    /// All stream ids have been used; a new connection is needed.
    #[error("stream ids exhausted on this connection")]
    StreamIdsExhausted,
    /// The connection is closed; no further operations are possible.
    #[error("the tunnel connection is closed")]
    ConnectionClosed,
    /// A frame's length exceeds the maximum this side advertised.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The announced payload length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// A frame's payload does not match its type's layout.
    #[error("malformed {frame:?} frame: {what}")]
    Malformed {
        /// The frame type.
        frame: FrameType,
        /// What was wrong.
        what: &'static str,
    },
    /// A frame type this version does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// A frame header with a framing version this implementation does not speak.
    #[error("unsupported framing version {0}")]
    BadFramingVersion(u8),
    /// The peer broke a protocol rule (detected by this side).
    #[error("protocol violation ({code}): {detail}")]
    Protocol {
        /// The code sent to the peer in the goaway.
        code: ErrorCode,
        /// What happened.
        detail: String,
    },
    /// No protocol version is supported by both sides.
    #[error("no common protocol version: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}")]
    VersionMismatch {
        /// Our lowest version.
        ours_min: u8,
        /// Our highest version.
        ours_max: u8,
        /// The peer's lowest version.
        theirs_min: u8,
        /// The peer's highest version.
        theirs_max: u8,
    },
    /// The handshake did not complete within the configured deadline.
    #[error("the handshake did not complete within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The peer sent nothing (not even a pong) for the idle timeout.
    #[error("the peer sent nothing for {0:?}; it is presumed dead")]
    IdleTimeout(std::time::Duration),
    /// The server rejected this agent's authentication.
    #[error("authentication rejected ({failure}): {detail}")]
    AuthRejected {
        /// The typed reason.
        failure: AuthFailure,
        /// The server's explanation.
        detail: String,
    },
    /// The peer closed the connection with a goaway carrying an error code.
    #[error("the peer closed the tunnel ({code}): {detail}")]
    PeerClosed {
        /// The peer's code.
        code: ErrorCode,
        /// The peer's explanation.
        detail: String,
    },
    /// The transport ended before the connection was drained.
    #[error("the transport closed before the tunnel was shut down")]
    TransportClosed,
    /// The transport failed before the connection was drained; the text says how (a TLS
    /// alert from the peer, a reset connection).
    #[error("the transport failed: {0}")]
    TransportFailed(String),
    /// This side closed the connection.
    #[error("closed locally ({0})")]
    LocallyClosed(ErrorCode),
}

impl Error {
    /// The wire code that describes this error to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::FrameTooLarge { .. } => ErrorCode::FRAME_SIZE,
            Error::Malformed { .. } | Error::UnknownFrameType(_) | Error::BadFramingVersion(_) => {
                ErrorCode::PROTOCOL
            }
            Error::Protocol { code, .. } => *code,
            Error::VersionMismatch { .. } => ErrorCode::VERSION_MISMATCH,
            Error::HandshakeTimeout(_) => ErrorCode::HANDSHAKE_TIMEOUT,
            Error::IdleTimeout(_) => ErrorCode::IDLE_TIMEOUT,
            Error::AuthRejected { .. } => ErrorCode::AUTH_FAILED,
            Error::PeerClosed { code, .. } => *code,
            Error::LocallyClosed(code) => *code,
            Error::TransportClosed | Error::TransportFailed(_) => ErrorCode::PROTOCOL,
            _ => ErrorCode::INTERNAL,
        }
    }

    /// Whether the error ends the connection (as opposed to a refused call).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Error::Blocked
                | Error::UnknownStream(_)
                | Error::NotReady
                | Error::TooManyStreams
                | Error::GoingAway
                | Error::StreamFinished(_)
                | Error::WrongSide
                | Error::NotPendingOpen(_)
                | Error::NotOpen(_)
                | Error::StreamIdsExhausted
                | Error::InvalidTarget(_)
        )
    }

    pub(crate) fn protocol(code: ErrorCode, detail: impl Into<String>) -> Error {
        Error::Protocol {
            code,
            detail: detail.into(),
        }
    }
}
