//! The crate's one error type.

use std::time::Duration;

/// Everything that can go wrong in the AWS layer.
///
/// Messages never contain secrets: no keys, tokens, signatures or Authorization headers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// AWS answered with an error document.
    #[error("{service} {operation} failed: {code}: {message} (HTTP {status}{}){}", request_id.as_deref().map(|id| format!(", request id {id}")).unwrap_or_default(), advice(service, operation, code))]
    Service {
        /// The service's signing name, e.g. `sts`.
        service: &'static str,
        /// The API action, e.g. `GetCallerIdentity`.
        operation: String,
        /// The HTTP status code.
        status: u16,
        /// The AWS error code, e.g. `SignatureDoesNotMatch` or `ThrottlingException`.
        code: String,
        /// AWS's human-readable message.
        message: String,
        /// The `x-amzn-RequestId` of the failed call, for support cases.
        request_id: Option<String>,
    },
    /// The request could not be sent or the response could not be read.
    #[error("HTTP request to {url} failed: {message}")]
    Transport {
        /// The endpoint, without query string.
        url: String,
        /// What went wrong.
        message: String,
        /// Whether the peer refused the connection, so the request was never delivered.
        connection_refused: bool,
    },
    /// The call did not finish within its deadline.
    #[error("HTTP request to {url} timed out after {timeout:?}")]
    Timeout {
        /// The endpoint, without query string.
        url: String,
        /// The deadline that expired.
        timeout: Duration,
    },
    /// An endpoint that is not an AWS API (metadata service, function URL) answered an error status.
    #[error("{url} answered HTTP {status}: {body}")]
    HttpStatus {
        /// The endpoint, without query string.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body, for diagnosis.
        body: String,
    },
    /// No provider in the credential chain had credentials.
    #[error("no AWS credentials found; tried: {0}")]
    NoCredentials(String),
    /// A credential provider was configured but failed.
    #[error("credential provider {provider} failed: {message}")]
    Credentials {
        /// The provider, e.g. `ecs-container` or `imds`.
        provider: &'static str,
        /// What went wrong.
        message: String,
    },
    /// No region was configured anywhere.
    #[error("no AWS region configured (set AWS_REGION, AWS_DEFAULT_REGION or a profile region)")]
    NoRegion,
    /// Configuration is invalid (an endpoint URL, a profile file, a setting).
    #[error("invalid AWS configuration: {0}")]
    Config(String),
    /// aws-sigv4 could not sign the request.
    #[error("could not sign the request: {0}")]
    Signing(String),
    /// The response was not what the API promises.
    #[error("malformed response from {service} {operation}: {message}")]
    MalformedResponse {
        /// The service's signing name.
        service: &'static str,
        /// The API action.
        operation: String,
        /// What was wrong with it.
        message: String,
    },
    /// A local file (profile, token file, CA bundle) could not be read.
    #[error("could not read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// AWS error codes that mean "slow down"; the SDKs retry all of them.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// AWS error codes for transient server-side failures, retried like a 5xx.
const TRANSIENT_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "IDPCommunicationError",
];

/// What to do about the authentication and authorisation errors people meet first, so
/// that the message answers "now what?" (empty for other codes).
fn advice(service: &str, operation: &str, code: &str) -> String {
    match code {
        "SignatureDoesNotMatch" | "IncompleteSignature" | "InvalidSignatureException" => {
            "; check that the secret key (AWS_SECRET_ACCESS_KEY, or aws_secret_access_key in \
             the profile in use) belongs to the access key id, and that this machine's clock is right"
                .to_string()
        }
        "InvalidClientTokenId" | "UnrecognizedClientException" | "InvalidAccessKeyId"
        | "AuthFailure" => "; the access key is not known to this endpoint: check \
             AWS_ACCESS_KEY_ID (or the profile in use), that the key is active, and that the \
             endpoint and region belong to the key's account"
            .to_string(),
        "ExpiredToken" | "ExpiredTokenException" | "RequestExpired" => {
            "; the temporary credentials have expired: refresh them (aws sso login, a new \
             session token) or check this machine's clock"
                .to_string()
        }
        "MissingAuthenticationToken" | "MissingAuthenticationTokenException" => {
            "; the request was not signed: configure AWS credentials".to_string()
        }
        "AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation"
        | "UnauthorizedAccess" => format!(
            "; the caller's IAM policies must allow {service}:{operation} on this resource"
        ),
        _ => String::new(),
    }
}

impl Error {
    /// The AWS error code, when AWS answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Service { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, when there was a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Service { status, .. } | Error::HttpStatus { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether AWS asked the caller to slow down (a throttling code or HTTP 429).
    pub fn is_throttling(&self) -> bool {
        match self {
            Error::Service { code, status, .. } => {
                *status == 429 || THROTTLING_CODES.contains(&code.as_str())
            }
            Error::HttpStatus { status, .. } => *status == 429,
            _ => false,
        }
    }

    /// Whether the request surely never reached the server.
    pub fn is_connection_refused(&self) -> bool {
        matches!(
            self,
            Error::Transport {
                connection_refused: true,
                ..
            }
        )
    }

    /// Whether an idempotent or AWS API call may be retried after this error (SDK semantics:
    /// throttling, 5xx, transient codes, timeouts and transport failures).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Service { code, status, .. } => {
                self.is_throttling() || *status >= 500 || TRANSIENT_CODES.contains(&code.as_str())
            }
            Error::HttpStatus { status, .. } => *status == 429 || *status >= 500,
            Error::Transport { .. } | Error::Timeout { .. } => true,
            _ => false,
        }
    }
}
