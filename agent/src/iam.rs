//! IAM tunnel authentication, agent side: the [`CredentialSource`] that signs an STS
//! `GetCallerIdentity` request with the default AWS credential chain (and an optional
//! role on top), naming the server and carrying this TLS session's channel binding.
//!
//! The server forwards the signed request to STS, which says who signed it; the signature
//! is good for one server, one TLS session and a few minutes. The payload holds a
//! signature and maybe a session token, so it is never logged.

use std::sync::Arc;

use bytes::Bytes;
use fluidity_aws::endpoints::{Endpoints, Service};
use fluidity_aws::iam_auth::{sign_auth_request, AWS_STS_METHOD};
use fluidity_aws::{AwsConfig, ChainOptions, Env};
use fluidity_proto::Credentials;

use crate::config::AgentConfig;
use crate::error::{Error, Result};
use crate::tunnel::CredentialSource;

/// The AWS configuration of the `[aws]` table over `env`: region, the default credential
/// chain with AssumeRole on top when `iam_role_arn` is set, endpoint overrides (the
/// table's `sts_endpoint` over `AWS_ENDPOINT_URL*`). Reads local files only.
///
/// `fallback_region` (the function URLs' region in AWS mode) is used when neither the
/// table, the environment nor the profile names one.
pub fn aws_config(
    cfg: &AgentConfig,
    env: &Env,
    fallback_region: Option<&str>,
) -> Result<AwsConfig> {
    let a = &cfg.aws;
    let mut endpoints = Endpoints::none();
    if let Some(url) = &a.sts_endpoint {
        endpoints = endpoints.with_service(Service::Sts, url.clone());
    }
    let options = ChainOptions {
        region: a.region.clone(),
        fallback_region: fallback_region.map(str::to_owned),
        profile: a.profile.clone(),
        iam_role_arn: a.iam_role_arn.clone(),
        role_session_name: a.role_session_name.clone(),
        external_id: a.external_id.clone(),
        endpoints,
    };
    AwsConfig::from_env(env, &options).map_err(|e| {
        Error::Config(format!(
            "AWS configuration: {e}; set --region (FLUIDITY_AWS_REGION, [aws] region in the \
             config file, or AWS_REGION) and check the AWS profile files"
        ))
    })
}

/// Signs tunnel authentication requests. Cheap to clone; credentials are cached and
/// refreshed before they expire.
#[derive(Debug, Clone)]
pub struct IamSigner {
    aws: AwsConfig,
    sts_endpoint: String,
    signing_region: String,
    server_id: String,
    role: Option<String>,
}

impl IamSigner {
    /// Resolves the region, the credential chain (AssumeRole on top when
    /// `[aws] iam_role_arn` is set), the STS endpoint and the server id from `cfg` and
    /// `env`. Reads local files only: credentials are fetched on the first signature.
    pub fn from_config(cfg: &AgentConfig, env: &Env) -> Result<IamSigner> {
        let server_id = cfg
            .iam
            .server_id
            .clone()
            .or_else(|| cfg.expected_server_cn.clone())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::Config(
                    "auth = \"iam\" needs the server's id: set --iam-server-id \
                     (FLUIDITY_IAM_SERVER_ID, or [iam] server_id in the config file) to the \
                     server's IAM server id (by default its certificate CN), or set \
                     expected_server_cn in the config file"
                        .into(),
                )
            })?;
        IamSigner::new(
            aws_config(cfg, env, None)?,
            server_id,
            cfg.aws.iam_role_arn.clone(),
        )
    }

    /// A signer over `aws` (its credentials, region and STS endpoint) for the server
    /// `server_id`; `role` only improves error messages.
    pub fn new(aws: AwsConfig, server_id: impl Into<String>, role: Option<String>) -> Result<Self> {
        let sts_endpoint = aws
            .endpoints
            .resolve(Service::Sts, &aws.region)
            .map_err(|e| Error::Config(format!("[aws] sts_endpoint: {e}")))?;
        let signing_region = aws
            .endpoints
            .signing_region(Service::Sts, &aws.region)
            .to_owned();
        Ok(IamSigner {
            aws,
            sts_endpoint,
            signing_region,
            server_id: server_id.into(),
            role,
        })
    }

    /// The same signer for another server (AWS mode learns the server ARN at wake-up).
    pub fn for_server(&self, server_id: impl Into<String>) -> IamSigner {
        IamSigner {
            server_id: server_id.into(),
            ..self.clone()
        }
    }

    /// The STS endpoint requests are signed for.
    pub fn sts_endpoint(&self) -> &str {
        &self.sts_endpoint
    }

    /// The server id requests name.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// The region requests are signed for.
    pub fn region(&self) -> &str {
        &self.signing_region
    }

    /// Tunnel credentials for the TLS session whose exporter value is `channel_binding`.
    /// Blocks while credentials are fetched (profile files, container or instance
    /// credentials, AssumeRole); run it off the executor.
    pub fn sign(&self, channel_binding: &[u8]) -> Result<Credentials, String> {
        let creds = self
            .aws
            .credentials
            .provide()
            .map_err(|e| match &self.role {
                Some(role) => format!(
                    "cannot get AWS credentials to assume {role}: {e}; check the credential \
                 chain, the role's trust policy and the STS endpoint {}",
                    self.sts_endpoint
                ),
                None => format!(
                    "cannot get AWS credentials: {e}; check AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the shared credentials file, or the \
                 container/instance role"
                ),
            })?;
        let payload = sign_auth_request(
            &creds,
            &self.signing_region,
            &self.sts_endpoint,
            &self.server_id,
            channel_binding,
        )
        .map_err(|e| format!("cannot sign the authentication request: {e}"))?;
        tracing::debug!(
            access_key_id = creds.access_key_id(),
            provider = creds.provider(),
            sts = %self.sts_endpoint,
            server_id = %self.server_id,
            "signed the tunnel authentication request"
        );
        Ok(Credentials {
            method: AWS_STS_METHOD.to_owned(),
            payload: Bytes::from(payload.encode()),
        })
    }

    /// This signer as the tunnel's [`CredentialSource`].
    pub fn into_source(self) -> CredentialSource {
        let signer = Arc::new(self);
        Arc::new(move |binding: &[u8]| signer.sign(binding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentAuth;

    fn env() -> Env {
        Env::from_pairs([
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret"),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ])
    }

    fn cfg() -> AgentConfig {
        let mut c = AgentConfig {
            auth: AgentAuth::Iam,
            ..AgentConfig::default()
        };
        c.aws.region = Some("eu-west-1".into());
        c.iam.server_id = Some("arn:aws:ecs:eu-west-1:123456789012:task/x".into());
        c
    }

    #[test]
    fn signs_for_the_regional_endpoint_and_the_named_server() {
        let s = IamSigner::from_config(&cfg(), &env()).unwrap();
        assert_eq!(s.sts_endpoint(), "https://sts.eu-west-1.amazonaws.com");
        let creds = s.sign(&[9; 32]).unwrap();
        assert_eq!(creds.method, AWS_STS_METHOD);
        let p = fluidity_aws::iam_auth::AuthPayload::decode(&creds.payload).unwrap();
        assert_eq!(
            p.header(fluidity_aws::iam_auth::SERVER_ID_HEADER),
            Some("arn:aws:ecs:eu-west-1:123456789012:task/x")
        );
        assert_eq!(
            p.header(fluidity_aws::iam_auth::CHANNEL_BINDING_HEADER),
            Some(hex_of(&[9; 32]).as_str())
        );
        assert_eq!(p.url, "https://sts.eu-west-1.amazonaws.com/");
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn endpoint_override_and_server_id_fallback() {
        let mut c = cfg();
        c.aws.sts_endpoint = Some("http://127.0.0.1:5000/".into());
        c.iam.server_id = None;
        c.expected_server_cn = Some("server-cn".into());
        let s = IamSigner::from_config(&c, &env()).unwrap();
        assert_eq!(s.sts_endpoint(), "http://127.0.0.1:5000");
        assert_eq!(s.server_id(), "server-cn");
    }

    #[test]
    fn the_function_urls_region_serves_when_nothing_else_names_one() {
        let mut c = cfg();
        c.aws.region = None;
        let region =
            |c: &AgentConfig, env: &Env, fallback| aws_config(c, env, fallback).map(|a| a.region);
        assert_eq!(region(&c, &env(), Some("eu-west-2")).unwrap(), "eu-west-2");
        assert!(region(&c, &env(), None).is_err());
        let mut with_env = env();
        with_env.set("AWS_REGION", "us-east-2");
        assert_eq!(
            region(&c, &with_env, Some("eu-west-2")).unwrap(),
            "us-east-2"
        );
        assert_eq!(
            region(&cfg(), &env(), Some("eu-west-2")).unwrap(),
            "eu-west-1"
        );
        let dir = std::env::temp_dir().join(format!("fluidity-iam-region-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config");
        std::fs::write(&config, "[default]\nregion = ap-south-1\n").unwrap();
        let with_profile = env().with("AWS_CONFIG_FILE", config.to_str().unwrap());
        let got = region(&c, &with_profile, Some("eu-west-2"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got.unwrap(), "ap-south-1");
    }

    #[test]
    fn missing_settings_say_what_to_set() {
        let mut c = cfg();
        c.iam.server_id = None;
        let err = IamSigner::from_config(&c, &env()).unwrap_err().to_string();
        assert!(
            err.contains("--iam-server-id") && err.contains("[iam] server_id"),
            "{err}"
        );
        let mut c = cfg();
        c.aws.region = None;
        let err = IamSigner::from_config(&c, &env()).unwrap_err().to_string();
        assert!(
            err.contains("--region") && err.contains("[aws] region"),
            "{err}"
        );
        let no_keys = Env::from_pairs([
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]);
        let s = IamSigner::from_config(&cfg(), &no_keys).unwrap();
        let err = s.sign(&[1; 32]).unwrap_err();
        assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    }
}
