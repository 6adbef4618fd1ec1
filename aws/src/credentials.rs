//! AWS credentials, with secrets kept out of `Debug` output and logs.

use std::time::SystemTime;

/// A string that never shows in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("** redacted **")
    }
}

/// An access key pair, with a session token for temporary credentials.
///
/// `Debug` shows the access key id (not secret; AWS logs it in CloudTrail) and redacts the
/// secret key and the session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    access_key_id: String,
    secret_access_key: Secret,
    session_token: Option<Secret>,
    expiry: Option<SystemTime>,
    provider: &'static str,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("provider", &self.provider)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "** redacted **"),
            )
            .field("expiry", &self.expiry)
            .finish()
    }
}

/// Whether `part` (an access key id, a secret key or a session token read from an answer)
/// can sign a request: not empty, and printable ASCII without spaces, as AWS issues them.
/// Anything else would fail to sign or carry control characters into a header.
pub(crate) fn is_usable_part(part: &str) -> bool {
    !part.is_empty() && part.bytes().all(|b| b.is_ascii_graphic())
}

impl Credentials {
    /// Credentials from their parts; `provider` names where they came from, for diagnostics.
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
        expiry: Option<SystemTime>,
        provider: &'static str,
    ) -> Self {
        Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: Secret(secret_access_key.into()),
            session_token: session_token.filter(|t| !t.is_empty()).map(Secret),
            expiry,
            provider,
        }
    }

    /// The access key id (`AKIA…` or `ASIA…`).
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// The secret access key. Never log it.
    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key.0
    }

    /// The session token of temporary credentials. Never log it.
    pub fn session_token(&self) -> Option<&str> {
        self.session_token.as_ref().map(|s| s.0.as_str())
    }

    /// When temporary credentials stop working; `None` for long-term keys.
    pub fn expiry(&self) -> Option<SystemTime> {
        self.expiry
    }

    /// The provider that produced these credentials, e.g. `environment` or `imds`.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// The identity aws-sigv4 signs with.
    pub(crate) fn to_identity(&self) -> aws_smithy_runtime_api::client::identity::Identity {
        aws_credential_types::Credentials::new(
            self.access_key_id.clone(),
            self.secret_access_key.0.clone(),
            self.session_token.as_ref().map(|s| s.0.clone()),
            self.expiry,
            self.provider,
        )
        .into()
    }
}
