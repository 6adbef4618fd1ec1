//! Secrets Manager: GetSecretValue, CreateSecret, PutSecretValue.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

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
        get_secret_value_answer(out)
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
        create_secret_answer(&out)
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
        put_secret_value_answer(&out)
    }
}

/// The secret of a GetSecretValue answer; `SecretBinary` is decoded from base64.
pub(crate) fn get_secret_value_answer(out: Value) -> Result<SecretValue> {
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

/// The new secret's ARN in a CreateSecret answer.
pub(crate) fn create_secret_answer(out: &Value) -> Result<String> {
    out.get("ARN")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| malformed("secretsmanager", "CreateSecret", "no ARN"))
}

/// The new version's id in a PutSecretValue answer.
pub(crate) fn put_secret_value_answer(out: &Value) -> Result<String> {
    out.get("VersionId")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| malformed("secretsmanager", "PutSecretValue", "no VersionId"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_secret_value_answers() {
        let v = get_secret_value_answer(json!({
            "ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:ca-AbCdEf",
            "Name": "ca", "VersionId": "v1", "SecretString": "hush", "SecretBinary": "AAE=",
        }))
        .unwrap();
        assert_eq!(v.name, "ca");
        assert_eq!(v.secret_string.as_deref(), Some("hush"));
        assert_eq!(v.secret_binary.as_deref(), Some(&[0u8, 1][..]));
        assert!(!format!("{v:?}").contains("hush"));
        let e = get_secret_value_answer(json!({ "SecretBinary": "not base64" })).unwrap_err();
        assert!(e.to_string().contains("SecretBinary is not base64"), "{e}");
        assert!(get_secret_value_answer(json!({ "Name": 1 })).is_err());
        assert_eq!(create_secret_answer(&json!({ "ARN": "a" })).unwrap(), "a");
        assert!(create_secret_answer(&json!({ "ARN": 1 })).is_err());
        assert_eq!(
            put_secret_value_answer(&json!({ "VersionId": "v" })).unwrap(),
            "v"
        );
        assert!(put_secret_value_answer(&json!({})).is_err());
    }
}
