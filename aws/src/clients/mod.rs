//! Small typed clients, one per service, each covering only the calls Fluidity makes.
//! Every client is a thin view over an [`AwsConfig`](crate::AwsConfig) and cheap to build.

pub mod cloudwatch;
pub mod dynamodb;
pub mod ec2;
pub mod ecs;
pub mod lambda_url;
pub mod secrets;
pub mod sts;

use crate::error::Error;

/// A malformed-response error for `service`/`operation`.
pub(crate) fn malformed(
    service: &'static str,
    operation: &str,
    message: impl Into<String>,
) -> Error {
    Error::MalformedResponse {
        service,
        operation: operation.to_string(),
        message: message.into(),
    }
}

/// Decodes a JSON answer into `T`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    service: &'static str,
    operation: &str,
    v: serde_json::Value,
) -> crate::Result<T> {
    serde_json::from_value(v).map_err(|e| malformed(service, operation, e.to_string()))
}

/// A random token for idempotent create calls; the same token is reused on retries.
pub(crate) fn idempotency_token() -> String {
    format!(
        "{:016x}{:016x}",
        crate::http::random_u64(),
        crate::http::random_u64()
    )
}
