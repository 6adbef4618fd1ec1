//! IAM authentication of agents: the [`Authenticator`] over
//! [`fluidity_aws::iam_auth::Verifier`].
//!
//! The agent sends a signed STS `GetCallerIdentity` request (method
//! [`AWS_STS_METHOD`]); the verifier checks that it names this server and this TLS
//! session, that it is fresh and not replayed, forwards it to the configured STS endpoint
//! within a deadline, and matches the ARN STS reports against the allow list. The verdict
//! goes back to the agent as a typed [`AuthFailure`] and one line for humans; the serving
//! loop logs it (never the payload, which holds a signature and maybe a session token).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use fluidity_aws::endpoints::{Endpoints, Service};
use fluidity_aws::iam_auth::{
    AuthDenied, PrincipalPattern, Verifier, VerifierConfig, AWS_STS_METHOD,
};
use fluidity_aws::{Env, HttpConfig};
use fluidity_proto::AuthFailure;

use crate::config::{IamSettings, ServerConfig};
use crate::serve::{Admission, Authenticator, Denial};
use crate::Error;

/// Extra time the serving loop gives a verification beyond the STS deadline (parsing,
/// the blocking thread pool) before it answers "verifier unavailable" itself.
const VERIFY_SLACK: Duration = Duration::from_secs(2);

/// Admits agents that prove an allowed IAM identity through STS.
#[derive(Debug)]
pub struct IamAuthenticator {
    verifier: Verifier,
    session: Option<Duration>,
}

/// The settings resolved from [`IamSettings`], the server certificate and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedIam {
    /// The id requests must name.
    pub server_id: String,
    /// The STS endpoint requests are forwarded to (and must be signed for).
    pub sts_endpoint: String,
    /// The allow list.
    pub allowed: Vec<PrincipalPattern>,
}

/// Resolves the server id, the STS endpoint and the allow list. `cert_cn` is the server
/// certificate's CN (the default server id); `env` supplies `AWS_REGION`,
/// `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL_STS`, `AWS_ENDPOINT_URL` and the shared config
/// file's region.
pub fn resolve(iam: &IamSettings, cert_cn: Option<&str>, env: &Env) -> Result<ResolvedIam, Error> {
    let allowed = iam
        .allowed_principals
        .iter()
        .map(|p| {
            p.parse::<PrincipalPattern>()
                .map_err(|e| Error::Config(format!("[iam] allowed_principals: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if allowed.is_empty() {
        return Err(Error::Config(
            "auth = \"iam\" needs [iam] allowed_principals (exact ARNs, account:ID, or \
             ARN prefixes ending in *); an empty list would admit nobody"
                .into(),
        ));
    }
    let server_id = iam
        .server_id
        .clone()
        .or_else(|| cert_cn.map(str::to_owned))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::Config(
                "auth = \"iam\" needs a server id: set [iam] server_id, or use a server \
                 certificate with a CN"
                    .into(),
            )
        })?;
    let sts_endpoint = match &iam.sts_endpoint {
        Some(url) => Endpoints::global(url.clone())
            .resolve(Service::Sts, "")
            .map_err(|e| Error::Config(format!("[iam] sts_endpoint: {e}")))?,
        None => {
            let endpoints = Endpoints::from_env(env);
            let region = match &iam.region {
                Some(r) => Some(r.clone()),
                None => fluidity_aws::profile::resolve_region(env, None)
                    .map_err(|e| Error::Config(format!("AWS region: {e}")))?,
            };
            if region.is_none() && !endpoints.is_overridden(Service::Sts) {
                return Err(Error::Config(
                    "auth = \"iam\" needs an STS endpoint: set --region \
                     (FLUIDITY_SERVER_REGION, [iam] region in the config file, or AWS_REGION) \
                     or --sts-endpoint (FLUIDITY_SERVER_STS_ENDPOINT, [iam] sts_endpoint)"
                        .into(),
                ));
            }
            endpoints
                .resolve(Service::Sts, region.as_deref().unwrap_or_default())
                .map_err(|e| Error::Config(format!("STS endpoint: {e}")))?
        }
    };
    Ok(ResolvedIam {
        server_id,
        sts_endpoint,
        allowed,
    })
}

impl IamAuthenticator {
    /// Builds the authenticator for `cfg` (which must have `auth = "iam"` settings), with
    /// the server certificate's CN as the default server id. Makes no network call.
    pub fn from_config(cfg: &ServerConfig, env: &Env) -> Result<IamAuthenticator, Error> {
        let cert_cn = cfg
            .load_identity()?
            .names()
            .ok()
            .and_then(|n| n.common_name);
        let iam = &cfg.iam;
        // Against the deadline in force (0 counts as 1), as the handshake uses it.
        let handshake = cfg.tunnel_handshake_timeout().as_secs();
        if iam.sts_timeout_secs == 0 || iam.sts_timeout_secs >= handshake {
            return Err(Error::Config(format!(
                "[iam] sts_timeout_secs ({}) must be at least 1 and shorter than \
                 tunnel_handshake_secs ({handshake} s in force), or agents give up before STS \
                 answers",
                iam.sts_timeout_secs
            )));
        }
        if iam.time_window_secs == 0 {
            return Err(Error::Config(
                "[iam] time_window_secs must be at least 1".into(),
            ));
        }
        let resolved = resolve(iam, cert_cn.as_deref(), env)?;
        let mut vc =
            VerifierConfig::new(resolved.server_id, resolved.sts_endpoint, resolved.allowed);
        vc.time_window = Duration::from_secs(iam.time_window_secs);
        vc.sts_timeout = Duration::from_secs(iam.sts_timeout_secs);
        vc.max_failures = iam.max_failures;
        vc.failure_window = Duration::from_secs(iam.failure_window_secs);
        // Proxy and CA bundle settings as the AWS SDKs read them.
        vc.http = HttpConfig::from_env(env);
        let verifier = Verifier::new(vc).map_err(|e| Error::Config(format!("[iam]: {e}")))?;
        Ok(IamAuthenticator {
            verifier,
            session: (iam.session_secs > 0).then(|| Duration::from_secs(iam.session_secs)),
        })
    }

    /// The verifier's settings (server id, STS endpoint, allow list, limits).
    pub fn verifier_config(&self) -> &VerifierConfig {
        self.verifier.config()
    }
}

/// The wire reason for a verifier's refusal.
pub fn failure_of(denied: &AuthDenied) -> AuthFailure {
    match denied {
        AuthDenied::SignatureRejected { .. } => AuthFailure::InvalidCredentials,
        AuthDenied::NotAllowed { .. } => AuthFailure::NotAllowed,
        AuthDenied::Replay => AuthFailure::Replayed,
        AuthDenied::ClockSkew { .. } => AuthFailure::ClockSkew,
        AuthDenied::WrongServer { .. } => AuthFailure::WrongServer,
        AuthDenied::BindingMismatch => AuthFailure::ChannelBindingMismatch,
        AuthDenied::StsUnreachable(_) => AuthFailure::VerifierUnavailable,
        AuthDenied::RateLimited => AuthFailure::RateLimited,
        AuthDenied::Malformed(_) => AuthFailure::Malformed,
        // A refusal this build does not know by name is still a refusal.
        _ => AuthFailure::InvalidCredentials,
    }
}

impl Authenticator for IamAuthenticator {
    fn authenticate(
        &self,
        method: &str,
        payload: &[u8],
        binding: &[u8],
        peer: SocketAddr,
    ) -> Result<Admission, Denial> {
        if method != AWS_STS_METHOD {
            return Err(Denial {
                failure: AuthFailure::UnsupportedMethod,
                detail: format!(
                    "this server takes IAM authentication ({AWS_STS_METHOD}); the agent \
                     offered {:?}: set auth = \"iam\" on the agent",
                    method.chars().take(64).collect::<String>()
                ),
            });
        }
        match self
            .verifier
            .verify(payload, binding, peer.ip(), SystemTime::now())
        {
            Ok(p) => Ok(Admission {
                principal: p.arn,
                lifetime: self.session,
            }),
            Err(denied) => Err(Denial {
                failure: failure_of(&denied),
                detail: denied.to_string(),
            }),
        }
    }

    fn deadline(&self) -> Duration {
        self.verifier
            .config()
            .sts_timeout
            .saturating_add(VERIFY_SLACK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(allowed: &[&str]) -> IamSettings {
        IamSettings {
            allowed_principals: allowed.iter().map(|s| s.to_string()).collect(),
            ..IamSettings::default()
        }
    }

    #[test]
    fn endpoint_comes_from_settings_then_environment_then_region() {
        let iam = settings(&["account:123456789012"]);
        let env = Env::from_pairs([("AWS_REGION", "eu-west-1")]);
        let r = resolve(&iam, Some("srv"), &env).unwrap();
        assert_eq!(r.sts_endpoint, "https://sts.eu-west-1.amazonaws.com");
        assert_eq!(r.server_id, "srv");

        let env = env.with("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:4566/");
        let r = resolve(&iam, Some("srv"), &env).unwrap();
        assert_eq!(r.sts_endpoint, "http://127.0.0.1:4566");

        let iam = IamSettings {
            sts_endpoint: Some("https://sts.vpce.example".into()),
            server_id: Some("explicit".into()),
            ..iam
        };
        let r = resolve(&iam, Some("srv"), &env).unwrap();
        assert_eq!(r.sts_endpoint, "https://sts.vpce.example");
        assert_eq!(r.server_id, "explicit");
    }

    #[test]
    fn missing_pieces_are_configuration_errors_that_say_what_to_set() {
        let env = Env::from_pairs([("AWS_REGION", "eu-west-1")]);
        let err = resolve(&settings(&[]), Some("srv"), &env).unwrap_err();
        assert!(err.to_string().contains("allowed_principals"), "{err}");
        let err = resolve(&settings(&["*"]), Some("srv"), &env).unwrap_err();
        assert!(err.to_string().contains("allowed_principals"), "{err}");
        let err = resolve(&settings(&["account:123456789012"]), None, &env).unwrap_err();
        assert!(err.to_string().contains("server_id"), "{err}");
        let no_region = Env::from_pairs([("AWS_CONFIG_FILE", "/nonexistent")]);
        let err = resolve(&settings(&["account:123456789012"]), Some("s"), &no_region).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("--region") && err.contains("--sts-endpoint"),
            "{err}"
        );
    }

    #[test]
    fn every_refusal_has_its_wire_reason() {
        let cases = [
            (
                AuthDenied::SignatureRejected {
                    code: "SignatureDoesNotMatch".into(),
                    message: "m".into(),
                },
                AuthFailure::InvalidCredentials,
            ),
            (
                AuthDenied::NotAllowed { arn: "a".into() },
                AuthFailure::NotAllowed,
            ),
            (AuthDenied::Replay, AuthFailure::Replayed),
            (
                AuthDenied::ClockSkew {
                    skew_secs: -900,
                    window_secs: 300,
                },
                AuthFailure::ClockSkew,
            ),
            (
                AuthDenied::WrongServer { got: "x".into() },
                AuthFailure::WrongServer,
            ),
            (
                AuthDenied::BindingMismatch,
                AuthFailure::ChannelBindingMismatch,
            ),
            (
                AuthDenied::StsUnreachable("refused".into()),
                AuthFailure::VerifierUnavailable,
            ),
            (AuthDenied::RateLimited, AuthFailure::RateLimited),
            (AuthDenied::Malformed("x".into()), AuthFailure::Malformed),
        ];
        for (denied, failure) in cases {
            assert_eq!(failure_of(&denied), failure, "{denied:?}");
        }
    }
}
