//! How a control function fails: an HTTP status, a stable code and a clear message, which
//! is exactly what reaches the caller as an [`ErrorResponse`].

use super::types::ErrorResponse;

/// A refusal or failure of a control function.
///
/// This is a value, not a new error hierarchy: the AWS failures inside keep their
/// [`crate::Error`] text (service, operation, code, message, request id) in `message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// The HTTP status the caller gets (400 refusal, 404 unknown path, 500 configuration,
    /// 502 AWS failure).
    pub status: u16,
    /// The stable code of [`ErrorResponse::error`].
    pub code: &'static str,
    /// What went wrong, in words.
    pub message: String,
}

impl ControlError {
    /// A malformed request (400, `bad_request`).
    pub fn bad_request(message: impl Into<String>) -> Self {
        ControlError {
            status: 400,
            code: "bad_request",
            message: message.into(),
        }
    }

    /// A CSR the CA will not sign (400, `csr_refused`).
    pub fn csr_refused(message: impl Into<String>) -> Self {
        ControlError {
            status: 400,
            code: "csr_refused",
            message: message.into(),
        }
    }

    /// An unknown function or path (404, `not_found`).
    pub fn not_found(message: impl Into<String>) -> Self {
        ControlError {
            status: 404,
            code: "not_found",
            message: message.into(),
        }
    }

    /// A call without the SigV4 signature a function URL under `AWS_IAM` requires
    /// (403, `forbidden`).
    pub fn forbidden(message: impl Into<String>) -> Self {
        ControlError {
            status: 403,
            code: "forbidden",
            message: message.into(),
        }
    }

    /// The function is misconfigured (500, `configuration`).
    pub fn config(message: impl Into<String>) -> Self {
        ControlError {
            status: 500,
            code: "configuration",
            message: message.into(),
        }
    }

    /// An AWS call failed (502, `aws_error`): `what` says what the function was doing.
    pub fn aws(what: &str, err: &crate::Error) -> Self {
        Self::aws_told(format!("{what}: {err}"))
    }

    /// An AWS call failed (502, `aws_error`), told whole by `message`.
    pub fn aws_told(message: impl Into<String>) -> Self {
        ControlError {
            status: 502,
            code: "aws_error",
            message: message.into(),
        }
    }

    /// The JSON body for the caller.
    pub fn to_response(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.code.to_string(),
            message: self.message.clone(),
        }
    }
}
