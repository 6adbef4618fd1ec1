//! Secrets Manager: GetSecretValue, CreateSecret, PutSecretValue.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use crate::client::AwsConfig;
use crate::clients::{decode, idempotency_token, malformed};
use crate::endpoints::Service;
use crate::error::Result;

/// A secret's value. `Debug` shows metadata only.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue {
    /// The secret's ARN.
    pub arn: String,
    /// The secret's name.
    pub name: String,
    /// The version returned.
    pub version_id: String,
    /// The value, when stored as a string.
    pub secret_string: Option<String>,
    /// The value, when stored as binary.
    pub secret_binary: Option<Vec<u8>>,
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretValue")
            .field("arn", &self.arn)
            .field("name", &self.name)
            .field("version_id", &self.version_id)
            .field("value", &"** redacted **")
            .finish()
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawSecret {
    #[serde(rename = "ARN")]
    arn: String,
    name: String,
    version_id: String,
    secret_string: Option<String>,
    secret_binary: Option<String>,
}

/// The Secrets Manager client.
#[derive(Clone, Debug)]
pub struct SecretsManagerClient {
    config: AwsConfig,
}

impl SecretsManagerClient {
    /// A client using `config`.
    pub fn new(config: &AwsConfig) -> Self {
        SecretsManagerClient {
            config: config.clone(),
        }
    }

    /// GetSecretValue of the current version of `secret_id` (name or ARN).
    pub fn get_secret_value(&self, secret_id: &str) -> Result<SecretValue> {
        let out = self.config.call_json(
            Service::SecretsManager,
            "GetSecretValue",
            &json!({ "SecretId": secret_id }),
        )?;
        let raw: RawSecret = decode("secretsmanager", "GetSecretValue", out)?;
        let secret_binary = match raw.secret_binary {
            None => None,
            Some(b64) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| {
                        malformed(
                            "secretsmanager",
                            "GetSecretValue",
                            "SecretBinary is not base64",
                        )
                    })?,
            ),
        };
        Ok(SecretValue {
            arn: raw.arn,
            name: raw.name,
            version_id: raw.version_id,
            secret_string: raw.secret_string,
            secret_binary,
        })
    }

    /// CreateSecret with a string value; returns the new secret's ARN.
    pub fn create_secret(
        &self,
        name: &str,
        value: &str,
        description: Option<&str>,
    ) -> Result<String> {
        // The SDKs send an idempotency token so that a retried create is not a second one.
        let mut input = json!({
            "Name": name,
            "SecretString": value,
            "ClientRequestToken": idempotency_token(),
        });
        if let Some(d) = description {
            input["Description"] = json!(d);
        }
        let out = self
            .config
            .call_json(Service::SecretsManager, "CreateSecret", &input)?;
        out.get("ARN")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| malformed("secretsmanager", "CreateSecret", "no ARN"))
    }

    /// PutSecretValue: stores a new current version; returns its version id.
    pub fn put_secret_value(&self, secret_id: &str, value: &str) -> Result<String> {
        let out = self.config.call_json(
            Service::SecretsManager,
            "PutSecretValue",
            &json!({
                "SecretId": secret_id,
                "SecretString": value,
                "ClientRequestToken": idempotency_token(),
            }),
        )?;
        out.get("VersionId")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| malformed("secretsmanager", "PutSecretValue", "no VersionId"))
    }
}
