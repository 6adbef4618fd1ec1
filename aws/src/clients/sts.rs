//! STS: GetCallerIdentity and AssumeRole.

use std::time::Duration;

use crate::chain::parse_rfc3339;
use crate::client::AwsConfig;
use crate::clients::malformed;
use crate::credentials::{is_usable_part, Credentials};
use crate::endpoints::Service;
use crate::error::Result;
use crate::xml::XmlNode;

/// Who the caller is, as STS sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerIdentity {
    /// The 12-digit account id.
    pub account: String,
    /// The caller's ARN (`…:user/NAME` or `…:assumed-role/ROLE/SESSION`).
    pub arn: String,
    /// The unique id of the caller.
    pub user_id: String,
}

impl CallerIdentity {
    /// Reads a `GetCallerIdentityResponse` document.
    pub fn from_xml(root: &XmlNode) -> Option<Self> {
        let r = root.child("GetCallerIdentityResult")?;
        Some(CallerIdentity {
            account: r.text_at(&["Account"])?.to_string(),
            arn: r.text_at(&["Arn"])?.to_string(),
            user_id: r.text_at(&["UserId"]).unwrap_or_default().to_string(),
        })
    }
}

/// The STS client.
#[derive(Clone, Debug)]
pub struct StsClient {
    config: AwsConfig,
}

impl StsClient {
    /// A client using `config`.
    pub fn new(config: &AwsConfig) -> Self {
        StsClient {
            config: config.clone(),
        }
    }

    /// GetCallerIdentity.
    pub fn get_caller_identity(&self) -> Result<CallerIdentity> {
        let root = self
            .config
            .call_query(Service::Sts, "GetCallerIdentity", &[])?;
        CallerIdentity::from_xml(&root)
            .ok_or_else(|| malformed("sts", "GetCallerIdentity", "no Arn or Account"))
    }

    /// AssumeRole; returns temporary credentials with their expiry. `duration` defaults to
    /// one hour.
    pub fn assume_role(
        &self,
        role_arn: &str,
        session_name: &str,
        external_id: Option<&str>,
        duration: Option<Duration>,
    ) -> Result<Credentials> {
        let secs = duration
            .unwrap_or(Duration::from_secs(3600))
            .as_secs()
            .to_string();
        let mut params = vec![
            ("RoleArn", role_arn),
            ("RoleSessionName", session_name),
            ("DurationSeconds", secs.as_str()),
        ];
        if let Some(id) = external_id {
            params.push(("ExternalId", id));
        }
        let root = self
            .config
            .call_query(Service::Sts, "AssumeRole", &params)?;
        let creds = assume_role_credentials(&root)?;
        tracing::debug!(role_arn, session_name, "assumed role");
        Ok(creds)
    }
}

/// The temporary credentials of an `AssumeRoleResponse` document: every part present,
/// printable ASCII, and an RFC 3339 `Expiration`.
pub(crate) fn assume_role_credentials(root: &XmlNode) -> Result<Credentials> {
    let c = root
        .path(&["AssumeRoleResult", "Credentials"])
        .ok_or_else(|| malformed("sts", "AssumeRole", "no Credentials"))?;
    let field = |name: &str| {
        c.text_at(&[name])
            .filter(|v| !v.is_empty())
            .ok_or_else(|| malformed("sts", "AssumeRole", format!("no {name}")))
    };
    let part = |name: &str| {
        field(name).and_then(|v| {
            if is_usable_part(v) {
                Ok(v)
            } else {
                Err(malformed(
                    "sts",
                    "AssumeRole",
                    format!("{name} holds characters other than printable ASCII"),
                ))
            }
        })
    };
    let expiry = parse_rfc3339(field("Expiration")?)
        .ok_or_else(|| malformed("sts", "AssumeRole", "unparsable Expiration"))?;
    Ok(Credentials::new(
        part("AccessKeyId")?,
        part("SecretAccessKey")?,
        Some(part("SessionToken")?.to_string()),
        Some(expiry),
        "assume-role",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(credentials: &str) -> XmlNode {
        crate::xml::parse(
            format!(
                "<AssumeRoleResponse><AssumeRoleResult><Credentials>{credentials}</Credentials>\
                 </AssumeRoleResult></AssumeRoleResponse>"
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn assume_role_answers() {
        let c = assume_role_credentials(&answer(
            "<AccessKeyId>ASIAX</AccessKeyId><SecretAccessKey>s</SecretAccessKey>\
             <SessionToken>t</SessionToken><Expiration>2024-01-02T03:04:05Z</Expiration>",
        ))
        .unwrap();
        assert_eq!(
            (c.access_key_id(), c.secret_access_key(), c.session_token()),
            ("ASIAX", "s", Some("t"))
        );
        assert_eq!(c.expiry(), parse_rfc3339("2024-01-02T03:04:05Z"));
        for (credentials, why) in [
            ("", "no Expiration"),
            (
                "<AccessKeyId>A</AccessKeyId><Expiration>2024-01-02T03:04:05Z</Expiration>",
                "no SecretAccessKey",
            ),
            (
                "<AccessKeyId>A</AccessKeyId><SecretAccessKey>s</SecretAccessKey>\
                 <SessionToken>t&#10;x</SessionToken><Expiration>2024-01-02T03:04:05Z</Expiration>",
                "SessionToken holds",
            ),
            (
                "<AccessKeyId>A</AccessKeyId><SecretAccessKey>s</SecretAccessKey>\
                 <SessionToken>t</SessionToken><Expiration>+002024-01-02</Expiration>",
                "unparsable Expiration",
            ),
        ] {
            let e = assume_role_credentials(&answer(credentials))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
        }
        assert!(assume_role_credentials(&XmlNode::default()).is_err());
    }
}
