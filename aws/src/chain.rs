//! Credential providers and the default chain, as the AWS SDKs resolve credentials:
//! environment, shared profile files, ECS container credentials, EC2 instance metadata,
//! then optionally STS AssumeRole on top; cached and refreshed before expiry.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use crate::client::AwsConfig;
use crate::clients::sts::StsClient;
use crate::credentials::{is_usable_part, Credentials};
use crate::endpoints::Endpoints;
use crate::env::Env;
use crate::error::{Error, Result};
use crate::http::{HttpClient, HttpRequest, RetryPolicy};
use crate::imds::Imds;

/// A source of credentials.
///
/// Returning [`Error::NoCredentials`] means "not configured here", which lets a chain try
/// the next provider; any other error means the provider is configured but failed, which
/// stops the chain (as in the SDKs, so a broken configuration is not silently bypassed).
pub trait ProvideCredentials: Send + Sync + std::fmt::Debug {
    /// Credentials valid now. May block on the network.
    fn provide(&self) -> Result<Credentials>;
}

impl ProvideCredentials for Credentials {
    fn provide(&self) -> Result<Credentials> {
        Ok(self.clone())
    }
}

/// What the default chain needs beyond the environment.
#[derive(Clone, Debug, Default)]
pub struct ChainOptions {
    /// The region; `None` resolves it from the environment and profile.
    pub region: Option<String>,
    /// The region when neither `region`, the environment nor the profile names one (a
    /// function URL's, say).
    pub fallback_region: Option<String>,
    /// The profile; `None` means `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
    /// A role to assume on top of the chain's credentials.
    pub iam_role_arn: Option<String>,
    /// The AssumeRole session name; `None` means `fluidity-<unix time>`.
    pub role_session_name: Option<String>,
    /// The AssumeRole external id, if the role's trust policy asks for one.
    pub external_id: Option<String>,
    /// Explicit endpoint overrides, layered over `AWS_ENDPOINT_URL*`.
    pub endpoints: Endpoints,
}

/// Parses an RFC 3339 timestamp such as `2024-05-01T12:00:00Z`.
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let dt = aws_smithy_types::DateTime::from_str(
        s.trim(),
        aws_smithy_types::date_time::Format::DateTime,
    )
    .ok()?;
    SystemTime::try_from(dt).ok()
}

/// Static keys from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
#[derive(Debug, Clone)]
pub struct EnvProvider {
    env: Env,
}

impl EnvProvider {
    /// Reads from `env`.
    pub fn new(env: &Env) -> Self {
        EnvProvider { env: env.clone() }
    }
}

impl ProvideCredentials for EnvProvider {
    fn provide(&self) -> Result<Credentials> {
        let id = self.env.get("AWS_ACCESS_KEY_ID");
        let secret = self.env.get("AWS_SECRET_ACCESS_KEY");
        match (id, secret) {
            (Some(id), Some(secret)) => Ok(Credentials::new(
                id,
                secret,
                self.env.get("AWS_SESSION_TOKEN").map(str::to_string),
                None,
                "environment",
            )),
            (None, None) => Err(Error::NoCredentials("environment".into())),
            _ => Err(Error::Credentials {
                provider: "environment",
                message: "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together".into(),
            }),
        }
    }
}

/// Credentials from the shared `credentials`/`config` files: static keys, a
/// `credential_process` (a command that prints them, as `aws configure
/// export-credentials --format process` does for an SSO profile), or `role_arn` with
/// `source_profile` (the keys or process of another profile) or `credential_source`
/// (`Environment`, `EcsContainer`, `Ec2InstanceMetadata`).
#[derive(Debug, Clone)]
pub struct ProfileProvider {
    env: Env,
    profile: Option<String>,
    http: HttpClient,
    region: String,
    endpoints: Endpoints,
}

/// How many `source_profile` hops are followed before giving up (loops are errors anyway).
const MAX_PROFILE_HOPS: usize = 4;

impl ProfileProvider {
    /// Reads profile `profile` (or `AWS_PROFILE`, or `default`) from the files `env` names;
    /// AssumeRole calls go to STS in `region` through `endpoints`.
    pub fn new(
        env: &Env,
        profile: Option<&str>,
        http: &HttpClient,
        region: &str,
        endpoints: &Endpoints,
    ) -> Self {
        ProfileProvider {
            env: env.clone(),
            profile: profile.map(str::to_string),
            http: http.clone(),
            region: region.to_string(),
            endpoints: endpoints.clone(),
        }
    }

    fn assume(
        &self,
        source: Arc<dyn ProvideCredentials>,
        p: &crate::profile::Profile,
        role_arn: &str,
    ) -> Result<Credentials> {
        let config = AwsConfig::new(
            p.get("region")
                .cloned()
                .unwrap_or_else(|| self.region.clone()),
            source,
            self.endpoints.clone(),
            self.http.clone(),
        );
        let session = p
            .get("role_session_name")
            .cloned()
            .unwrap_or_else(default_session_name);
        let duration = p
            .get("duration_seconds")
            .and_then(|d| d.parse().ok())
            .map(Duration::from_secs);
        StsClient::new(&config).assume_role(
            role_arn,
            &session,
            p.get("external_id").map(String::as_str),
            duration,
        )
    }
}

impl ProfileProvider {
    fn resolve(
        &self,
        profiles: &std::collections::BTreeMap<String, crate::profile::Profile>,
        name: &str,
        visited: &mut Vec<String>,
    ) -> Result<Credentials> {
        let fail = |message: String| Error::Credentials {
            provider: "profile",
            message,
        };
        let Some(p) = profiles.get(name) else {
            return Err(if visited.is_empty() {
                Error::NoCredentials(format!("profile {name:?}"))
            } else {
                fail(format!("source_profile {name:?} is not defined"))
            });
        };
        if visited.iter().any(|v| v == name) || visited.len() > MAX_PROFILE_HOPS {
            return Err(fail(format!(
                "source_profile loop or chain too long at {name:?}"
            )));
        }
        visited.push(name.to_string());
        let static_keys = match (p.get("aws_access_key_id"), p.get("aws_secret_access_key")) {
            (Some(id), Some(secret)) => Some(Credentials::new(
                id,
                secret,
                p.get("aws_session_token").cloned(),
                None,
                "profile",
            )),
            (None, None) => None,
            _ => {
                return Err(fail(format!(
                    "profile {name:?} needs both aws_access_key_id and aws_secret_access_key"
                )))
            }
        };
        // Keys written in the profile win over a process (the AWS CLI does so for the
        // credentials file; the SDKs differ); the process runs only when its keys are
        // used, not when role_arn takes them from another profile or source.
        let own_keys = |static_keys: Option<Credentials>| -> Result<Option<Credentials>> {
            match (static_keys, p.get("credential_process")) {
                (None, Some(command)) => {
                    Ok(Some(run_credential_process(command, PROCESS_TIME_LIMIT)?))
                }
                (keys, _) => Ok(keys),
            }
        };
        let Some(role) = p.get("role_arn") else {
            return own_keys(static_keys)?.ok_or_else(|| {
                if visited.len() == 1 {
                    Error::NoCredentials(format!(
                        "profile {name:?} (no keys and no credential_process; for an SSO \
                         profile, set credential_process = aws configure export-credentials \
                         --profile SSO_PROFILE --format process in another profile and use \
                         that one; web identity profiles are not supported)"
                    ))
                } else {
                    fail(format!("source_profile {name:?} has no keys"))
                }
            });
        };
        let source: Arc<dyn ProvideCredentials> = match (p.get("source_profile"), p.get("credential_source")) {
            (Some(_), Some(_)) => {
                return Err(fail(format!(
                    "profile {name:?} sets both source_profile and credential_source"
                )))
            }
            // A profile that names itself uses its own keys to assume the role.
            (Some(src), None) if src == name => Arc::new(
                own_keys(static_keys)?
                    .ok_or_else(|| fail(format!("profile {name:?} has no keys")))?,
            ),
            (Some(src), None) => Arc::new(self.resolve(profiles, src, visited)?),
            (None, Some(source)) => match source.as_str() {
                "Environment" => Arc::new(EnvProvider::new(&self.env)),
                "EcsContainer" => Arc::new(ContainerProvider::new(&self.env, &self.http)),
                "Ec2InstanceMetadata" => match Imds::from_env(&self.env)? {
                    Some(imds) => Arc::new(ImdsProvider::new(imds)),
                    None => {
                        return Err(fail(
                            "credential_source Ec2InstanceMetadata, but AWS_EC2_METADATA_DISABLED is set".into(),
                        ))
                    }
                },
                other => return Err(fail(format!("unsupported credential_source {other:?}"))),
            },
            (None, None) => {
                return Err(fail(format!(
                    "profile {name:?} has role_arn but neither source_profile nor credential_source"
                )))
            }
        };
        self.assume(source, p, role)
    }
}

impl ProvideCredentials for ProfileProvider {
    fn provide(&self) -> Result<Credentials> {
        let profiles = crate::profile::load_profiles(&self.env)?;
        let name = crate::profile::profile_name(&self.env, self.profile.as_deref());
        self.resolve(&profiles, &name, &mut Vec::new())
    }
}

/// How long a `credential_process` may take (a tool that asks for a login would wait for
/// ever; the CLI's own SSO refresh takes seconds).
pub const PROCESS_TIME_LIMIT: Duration = Duration::from_secs(60);

/// The most a `credential_process` may print on standard output; of its error output,
/// this much is kept and the rest read and dropped.
const MAX_PROCESS_OUTPUT: u64 = 64 * 1024;

/// How much of a failed `credential_process`'s error output its error shows (the end,
/// where tools say what went wrong).
const PROCESS_ERROR_CHARS: usize = 300;

/// The program a `credential_process` command runs, for errors: its first word that is not
/// a variable assignment (`VAULT_TOKEN=… helper` must not show the token). An assignment
/// that quotes its value, or substitutes one (`$(…)`, `${…}`), may hold spaces, so no word
/// after it is sure to be the program: then it is named `credential_process`.
fn program_name(command: &str) -> &str {
    let is_assignment = |word: &str| {
        word.split_once('=').is_some_and(|(name, _)| {
            name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    for word in command.split_whitespace() {
        if !is_assignment(word) {
            return word;
        }
        if word.contains(['\'', '"', '\\', '$', '`', '(', '{']) {
            return "credential_process";
        }
    }
    ""
}

/// Runs a profile's `credential_process` (through `sh -c`, as the SDKs on Unix do; in a
/// process group of its own, all of which is killed at the limit) and reads the
/// credentials it prints. Its errors name the program, not its arguments (which may hold
/// a token), and show the end of its error output when it fails; what it prints on
/// standard output (secrets) never appears.
pub fn run_credential_process(command: &str, limit: Duration) -> Result<Credentials> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let program = program_name(command);
    let fail = |message: String| Error::Credentials {
        provider: "credential_process",
        message: format!("`{program}` (arguments not shown): {message}"),
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        // Its own process group, so that a timeout ends what it started too.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    let stdout = read_beside(child.stdout.take(), false);
    let stderr = read_beside(child.stderr.take(), true);
    let group = rustix::process::Pid::from_child(&child);
    let kill_group = || {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    };
    let now = std::time::Instant::now();
    let deadline = now.checked_add(limit).unwrap_or(now + PROCESS_TIME_LIMIT);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                kill_group();
                let _ = child.wait();
                return Err(fail(format!("gave no answer within {limit:?}")));
            }
            Err(e) => {
                kill_group();
                return Err(fail(format!("cannot wait for it: {e}")));
            }
        }
    };
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        rx.recv_timeout(left.max(Duration::from_millis(100)))
    };
    let Ok(out) = collect(stdout) else {
        kill_group();
        return Err(fail(
            "exited, but something it started keeps its output open".into(),
        ));
    };
    // A helper it left running may hold stderr: that only matters when it failed.
    let err = if status.success() {
        Vec::new()
    } else {
        collect(stderr).unwrap_or_default()
    };
    // First: a process whose output was cut off dies of the closed pipe.
    if out.len() as u64 > MAX_PROCESS_OUTPUT {
        return Err(fail(format!(
            "printed more than {MAX_PROCESS_OUTPUT} bytes"
        )));
    }
    if !status.success() {
        // One line, whatever it wrote (line breaks and terminal escapes are shown escaped,
        // so that they cannot forge log lines).
        let err = String::from_utf8_lossy(&err);
        let err: String = err.trim().escape_debug().collect();
        let skip = err.chars().count().saturating_sub(PROCESS_ERROR_CHARS);
        let tail: String = err.chars().skip(skip).collect();
        let cut = if skip > 0 { "…" } else { "" };
        return Err(fail(format!("{status}: {cut}{tail}")));
    }
    let creds = process_credentials(&out).map_err(|e| match e {
        Error::Credentials { message, .. } => fail(message),
        other => other,
    })?;
    // Expired ones would be asked for again at every use and refused by AWS each time.
    if creds.expiry().is_some_and(|at| at <= SystemTime::now()) {
        return Err(fail(
            "the credentials it printed have already expired (renew its login, e.g. `aws sso \
             login`)"
                .into(),
        ));
    }
    Ok(creds)
}

/// Reads `pipe` on a thread of its own, beside the wait for its process, so that a
/// process that fills a pipe is not stuck on it: the first [`MAX_PROCESS_OUTPUT`] bytes
/// and one more, and then, when `drain`, the rest read and dropped (without, the reading
/// stops there, and a process that goes on writing dies of the closed pipe). What it read
/// comes back through the channel, so that a pipe a process's own child keeps open after
/// it exited cannot hold the caller past its limit.
fn read_beside(
    pipe: Option<impl std::io::Read + Send + 'static>,
    drain: bool,
) -> std::sync::mpsc::Receiver<Vec<u8>> {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = (&mut pipe)
                .take(MAX_PROCESS_OUTPUT + 1)
                .read_to_end(&mut out);
            if drain {
                let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            }
        }
        let _ = tx.send(out);
    });
    rx
}

/// What a `credential_process` prints.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ProcessCredentials {
    version: Option<serde_json::Value>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    expiration: Option<String>,
}

/// Reads the credentials a `credential_process` printed: JSON with `Version` 1,
/// `AccessKeyId`, `SecretAccessKey`, and optionally `SessionToken` and `Expiration`.
pub(crate) fn process_credentials(out: &[u8]) -> Result<Credentials> {
    let provider = "credential_process";
    // Only an object: serde_json's message for another type quotes the value (a bare
    // "secret" string), and a struct would also be read from an array.
    let not_expected = |why: String| Error::Credentials {
        provider,
        message: format!("its output is not the JSON expected: {why}"),
    };
    let value: serde_json::Value =
        serde_json::from_slice(out).map_err(|e| not_expected(e.to_string()))?;
    if !value.is_object() {
        return Err(not_expected("not a JSON object".into()));
    }
    let parsed: ProcessCredentials =
        serde_json::from_value(value).map_err(|e| not_expected(e.to_string()))?;
    if parsed.version.as_ref().and_then(serde_json::Value::as_u64) != Some(1) {
        return Err(Error::Credentials {
            provider,
            message: "its output must have \"Version\": 1".into(),
        });
    }
    MetadataCredentials {
        code: None,
        message: None,
        access_key_id: parsed.access_key_id,
        secret_access_key: parsed.secret_access_key,
        token: parsed.session_token,
        expiration: parsed.expiration,
    }
    .into_credentials(provider)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MetadataCredentials {
    code: Option<String>,
    message: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    token: Option<String>,
    expiration: Option<String>,
}

impl MetadataCredentials {
    fn into_credentials(self, provider: &'static str) -> Result<Credentials> {
        let fail = |message: String| Error::Credentials { provider, message };
        if let Some(code) = self.code.filter(|c| c != "Success") {
            return Err(fail(format!(
                "{code}: {}",
                self.message.unwrap_or_default()
            )));
        }
        let non_empty = |v: Option<String>| v.filter(|v| !v.is_empty());
        let (Some(id), Some(secret)) = (
            non_empty(self.access_key_id),
            non_empty(self.secret_access_key),
        ) else {
            return Err(fail("answer lacks AccessKeyId or SecretAccessKey".into()));
        };
        let token = non_empty(self.token);
        for (name, part) in [
            ("AccessKeyId", Some(&id)),
            ("SecretAccessKey", Some(&secret)),
            ("Token", token.as_ref()),
        ] {
            if part.is_some_and(|p| !is_usable_part(p)) {
                return Err(fail(format!(
                    "{name} holds characters other than printable ASCII"
                )));
            }
        }
        let expiry = match self.expiration {
            Some(e) => Some(
                parse_rfc3339(&e).ok_or_else(|| fail(format!("unparsable Expiration {e:?}")))?,
            ),
            None => None,
        };
        Ok(Credentials::new(id, secret, token, expiry, provider))
    }
}

/// Reads the credentials answer of the container credentials endpoint or of the instance
/// metadata service (`provider` names which): JSON with `AccessKeyId`, `SecretAccessKey`,
/// `Token` and `Expiration`, and for the metadata service a `Code` other than `Success`
/// when it has none to give.
pub(crate) fn metadata_credentials(body: &[u8], provider: &'static str) -> Result<Credentials> {
    let parsed: MetadataCredentials =
        serde_json::from_slice(body).map_err(|e| Error::Credentials {
            provider,
            message: format!("invalid JSON: {e}"),
        })?;
    parsed.into_credentials(provider)
}

/// The longest IAM role name.
const MAX_ROLE_NAME: usize = 64;

/// The instance's role in the metadata service's answer to
/// `/latest/meta-data/iam/security-credentials/`: its first line, trimmed, which must be
/// a valid IAM role name (it goes into the next request's path).
pub(crate) fn instance_role(listing: &str) -> Result<&str> {
    let role = listing.lines().next().unwrap_or("").trim();
    if role.is_empty()
        || role.len() > MAX_ROLE_NAME
        || !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    {
        return Err(Error::Credentials {
            provider: "imds",
            message: "metadata service returned an invalid role name".into(),
        });
    }
    Ok(role)
}

/// ECS (and EKS Pod Identity) container credentials: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
/// or `AWS_CONTAINER_CREDENTIALS_FULL_URI`, with the token of
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
#[derive(Debug, Clone)]
pub struct ContainerProvider {
    env: Env,
    http: HttpClient,
}

/// The ECS agent's credential address.
const ECS_HOST: &str = "http://169.254.170.2";
/// Token files larger than this are refused.
const MAX_TOKEN_FILE: u64 = 16 * 1024;

impl ContainerProvider {
    /// Reads the variables from `env`.
    pub fn new(env: &Env, http: &HttpClient) -> Self {
        ContainerProvider {
            env: env.clone(),
            http: http.clone(),
        }
    }

    fn url(&self) -> Result<Option<String>> {
        if let Some(rel) = self.env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            if !rel.starts_with('/') {
                return Err(Error::Credentials {
                    provider: "ecs-container",
                    message: "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI must start with /".into(),
                });
            }
            return Ok(Some(format!("{ECS_HOST}{rel}")));
        }
        let Some(full) = self.env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") else {
            return Ok(None);
        };
        let uri: ureq::http::Uri = full.parse().map_err(|e| Error::Credentials {
            provider: "ecs-container",
            message: format!("invalid AWS_CONTAINER_CREDENTIALS_FULL_URI: {e}"),
        })?;
        let allowed = match uri.scheme_str() {
            Some("https") => true,
            // Plain HTTP only to the local host or the ECS/EKS agent addresses, so the token
            // and the credentials never cross a network in the clear.
            Some("http") => uri.host().is_some_and(is_allowed_http_host),
            _ => false,
        };
        if !allowed {
            return Err(Error::Credentials {
                provider: "ecs-container",
                message: "AWS_CONTAINER_CREDENTIALS_FULL_URI must be https, or http to a loopback or ECS/EKS agent address".into(),
            });
        }
        Ok(Some(full.to_string()))
    }

    fn token(&self) -> Result<Option<String>> {
        let token = if let Some(path) = self.env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            let path = self.env.expand_home(path);
            let io = |source| Error::Io {
                path: path.display().to_string(),
                source,
            };
            let Some(bytes) =
                fluidity_runtime_smol::files::read_limited(&path, MAX_TOKEN_FILE).map_err(io)?
            else {
                return Err(Error::Credentials {
                    provider: "ecs-container",
                    message: "authorization token file is too large".into(),
                });
            };
            let text = String::from_utf8(bytes).map_err(|_| Error::Credentials {
                provider: "ecs-container",
                message: "authorization token file is not text".into(),
            })?;
            Some(text.trim().to_string())
        } else {
            self.env
                .get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
                .map(str::to_string)
        };
        if token.as_deref().is_some_and(|t| t.contains(['\r', '\n'])) {
            return Err(Error::Credentials {
                provider: "ecs-container",
                message: "authorization token contains a line break".into(),
            });
        }
        Ok(token.filter(|t| !t.is_empty()))
    }
}

fn is_allowed_http_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => true,
        Ok(IpAddr::V4(v4)) => [[169, 254, 170, 2], [169, 254, 170, 23]].contains(&v4.octets()),
        Ok(IpAddr::V6(v6)) => v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23),
        Err(_) => false,
    }
}

impl ProvideCredentials for ContainerProvider {
    fn provide(&self) -> Result<Credentials> {
        let Some(url) = self.url()? else {
            return Err(Error::NoCredentials("ecs-container".into()));
        };
        let mut headers = vec![("accept".to_string(), "application/json".to_string())];
        if let Some(token) = self.token()? {
            headers.push(("authorization".to_string(), token));
        }
        let req = HttpRequest {
            method: "GET",
            url: url.clone(),
            headers,
            body: Vec::new(),
            timeout: Some(Duration::from_secs(5)),
        };
        // Plain HTTP goes only to a local or link-local agent (see `url`); through a proxy
        // it would show the token, and take credentials from, whoever runs the proxy.
        let http = if url
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        {
            self.http.without_proxy()?
        } else {
            self.http.clone()
        };
        // A GET of credentials is idempotent: retry transient failures.
        let resp =
            RetryPolicy::default().run("container credentials", Error::is_retryable, |_| {
                let resp = http.send(&req)?;
                if resp.status == 200 {
                    Ok(resp)
                } else {
                    Err(Error::HttpStatus {
                        url: crate::http::redact_url(&url),
                        status: resp.status,
                        body: resp.body_snippet(),
                    })
                }
            })?;
        metadata_credentials(&resp.body, "ecs-container")
    }
}

/// EC2 instance-role credentials from the metadata service (IMDSv2).
#[derive(Debug, Clone)]
pub struct ImdsProvider {
    imds: Arc<Imds>,
}

impl ImdsProvider {
    /// Reads from `imds`.
    pub fn new(imds: Imds) -> Self {
        ImdsProvider {
            imds: Arc::new(imds),
        }
    }
}

impl ProvideCredentials for ImdsProvider {
    fn provide(&self) -> Result<Credentials> {
        const BASE: &str = "/latest/meta-data/iam/security-credentials/";
        let role = match self.imds.get(BASE) {
            Ok(r) => r,
            // Not on EC2, or no instance profile: nothing configured here.
            Err(e @ (Error::Transport { .. } | Error::Timeout { .. })) => {
                tracing::debug!(error = %e, "instance metadata service not reachable");
                return Err(Error::NoCredentials("imds (not reachable)".into()));
            }
            Err(Error::HttpStatus { status: 404, .. }) => {
                return Err(Error::NoCredentials("imds (no instance profile)".into()))
            }
            Err(e) => return Err(e),
        };
        let role = instance_role(&role)?;
        let body = self.imds.get(&format!("{BASE}{role}"))?;
        metadata_credentials(body.as_bytes(), "imds")
    }
}

/// STS AssumeRole with credentials from another provider.
#[derive(Debug, Clone)]
pub struct AssumeRoleProvider {
    config: AwsConfig,
    role_arn: String,
    session_name: String,
    external_id: Option<String>,
    duration: Option<Duration>,
}

fn default_session_name() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("fluidity-{secs}")
}

impl AssumeRoleProvider {
    /// Assumes `role_arn` with the credentials of `config.credentials`, calling STS as
    /// `config` says. `session_name` defaults to `fluidity-<unix time>`.
    pub fn new(
        config: AwsConfig,
        role_arn: impl Into<String>,
        session_name: Option<String>,
        external_id: Option<String>,
        duration: Option<Duration>,
    ) -> Self {
        AssumeRoleProvider {
            config,
            role_arn: role_arn.into(),
            session_name: session_name.unwrap_or_else(default_session_name),
            external_id,
            duration,
        }
    }
}

impl ProvideCredentials for AssumeRoleProvider {
    fn provide(&self) -> Result<Credentials> {
        StsClient::new(&self.config).assume_role(
            &self.role_arn,
            &self.session_name,
            self.external_id.as_deref(),
            self.duration,
        )
    }
}

/// Tries providers in order; see [`ProvideCredentials`] for when it moves on.
#[derive(Debug, Clone)]
pub struct ChainProvider {
    providers: Vec<Arc<dyn ProvideCredentials>>,
}

impl ChainProvider {
    /// A chain of `providers`, tried first to last.
    pub fn new(providers: Vec<Arc<dyn ProvideCredentials>>) -> Self {
        ChainProvider { providers }
    }
}

impl ProvideCredentials for ChainProvider {
    fn provide(&self) -> Result<Credentials> {
        let mut tried = Vec::new();
        for p in &self.providers {
            match p.provide() {
                Ok(c) => {
                    tracing::debug!(
                        provider = c.provider(),
                        access_key_id = c.access_key_id(),
                        "loaded AWS credentials"
                    );
                    return Ok(c);
                }
                Err(Error::NoCredentials(what)) => tried.push(what),
                Err(e) => return Err(e),
            }
        }
        Err(Error::NoCredentials(tried.join(", ")))
    }
}

/// Caches another provider's credentials and refreshes them a margin before they expire.
/// Credentials that name no expiry are fetched again after [`UNTIMED_LIFETIME`]: keys in
/// the credentials file may be temporary ones that a login tool rewrites. If a refresh
/// fails while the old credentials are still valid (or name no expiry), they are used on.
#[derive(Debug)]
pub struct CachedProvider {
    inner: Arc<dyn ProvideCredentials>,
    margin: Duration,
    untimed_lifetime: Duration,
    /// The credentials and when to fetch them again even if they do not expire (or, after
    /// a failed refresh, no sooner than).
    cache: Mutex<Option<(Credentials, Instant)>>,
}

/// How long after a failed refresh the cached credentials are used before the next try:
/// without it, every call (each signed request) would run the whole chain again.
const RETRY_FAILED_REFRESH: Duration = Duration::from_secs(60);

/// Cached credentials are used only while they have this long left.
const USABLE_FOR: Duration = Duration::from_secs(10);

/// The SDKs refresh five minutes before expiry.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// How long credentials without an expiry are used before they are fetched again, as in
/// the Rust SDK.
pub const UNTIMED_LIFETIME: Duration = Duration::from_secs(15 * 60);

impl CachedProvider {
    /// Caches `inner`, refreshing `margin` before expiry.
    pub fn new(inner: Arc<dyn ProvideCredentials>, margin: Duration) -> Self {
        CachedProvider {
            inner,
            margin,
            untimed_lifetime: UNTIMED_LIFETIME,
            cache: Mutex::new(None),
        }
    }
}

impl ProvideCredentials for CachedProvider {
    fn provide(&self) -> Result<Credentials> {
        // Holding the lock across the refresh makes concurrent callers wait for one fetch
        // instead of stampeding the credential source.
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let usable_at =
            |c: &Credentials, at: SystemTime| c.expiry().is_none_or(|exp| exp > at + USABLE_FOR);
        if let Some((c, recheck)) = cache.as_ref() {
            let fresh = match c.expiry() {
                None => Instant::now() < *recheck,
                // After a failed refresh, the next waits a while (while they still work).
                Some(exp) => {
                    exp > now + self.margin || (Instant::now() < *recheck && usable_at(c, now))
                }
            };
            if fresh {
                return Ok(c.clone());
            }
        }
        match self.inner.provide() {
            Ok(c) => {
                let recheck = match c.expiry() {
                    None => Instant::now() + self.untimed_lifetime,
                    Some(_) => Instant::now(),
                };
                *cache = Some((c.clone(), recheck));
                Ok(c)
            }
            // Judged at the end of the refresh, which may have taken a while (a
            // credential_process has a minute).
            Err(e) => match cache.as_mut() {
                Some((c, recheck)) if usable_at(c, SystemTime::now()) => {
                    tracing::warn!(error = %e, retry_secs = RETRY_FAILED_REFRESH.as_secs(),
                        "credential refresh failed; using the cached credentials");
                    *recheck = Instant::now() + RETRY_FAILED_REFRESH;
                    Ok(c.clone())
                }
                _ => Err(e),
            },
        }
    }
}

/// The default chain: environment, profile, container, instance metadata, cached; with
/// `options.iam_role_arn`, AssumeRole on top (cached separately).
pub fn default_chain(
    env: &Env,
    http: &HttpClient,
    region: &str,
    endpoints: &Endpoints,
    options: &ChainOptions,
) -> Result<Arc<dyn ProvideCredentials>> {
    let mut providers: Vec<Arc<dyn ProvideCredentials>> = vec![
        Arc::new(EnvProvider::new(env)),
        Arc::new(ProfileProvider::new(
            env,
            options.profile.as_deref(),
            http,
            region,
            endpoints,
        )),
        Arc::new(ContainerProvider::new(env, http)),
    ];
    if let Some(imds) = Imds::from_env(env)? {
        providers.push(Arc::new(ImdsProvider::new(imds)));
    }
    let base: Arc<dyn ProvideCredentials> = Arc::new(CachedProvider::new(
        Arc::new(ChainProvider::new(providers)),
        DEFAULT_REFRESH_MARGIN,
    ));
    let Some(role) = &options.iam_role_arn else {
        return Ok(base);
    };
    let config = AwsConfig::new(region, base, endpoints.clone(), http.clone());
    Ok(Arc::new(CachedProvider::new(
        Arc::new(AssumeRoleProvider::new(
            config,
            role.clone(),
            options.role_session_name.clone(),
            options.external_id.clone(),
            None,
        )),
        DEFAULT_REFRESH_MARGIN,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_provider_needs_both_keys() {
        let env = Env::from_pairs([("AWS_ACCESS_KEY_ID", "AKID")]);
        assert!(matches!(
            EnvProvider::new(&env).provide(),
            Err(Error::Credentials { .. })
        ));
        assert!(matches!(
            EnvProvider::new(&Env::empty()).provide(),
            Err(Error::NoCredentials(_))
        ));
        let c = EnvProvider::new(
            &env.with("AWS_SECRET_ACCESS_KEY", "s")
                .with("AWS_SESSION_TOKEN", "t"),
        )
        .provide()
        .unwrap();
        assert_eq!(c.session_token(), Some("t"));
    }

    #[test]
    fn container_full_uri_must_be_local_or_tls() {
        let http = HttpClient::direct().unwrap();
        for (uri, ok) in [
            ("http://127.0.0.1:9/creds", true),
            ("http://localhost/creds", true),
            ("http://169.254.170.23/v1/credentials", true),
            ("http://[fd00:ec2::23]/v1/credentials", true),
            ("https://creds.example.com/x", true),
            ("http://creds.example.com/x", false),
            ("http://10.0.0.1/x", false),
            ("file:///etc/passwd", false),
        ] {
            let env = Env::from_pairs([("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri)]);
            assert_eq!(
                ContainerProvider::new(&env, &http).url().is_ok(),
                ok,
                "{uri}"
            );
        }
    }

    /// Hands out credentials expiring `lifetime` from now, or fails once `fail` is set;
    /// counts the calls.
    #[derive(Debug)]
    struct Counting {
        lifetime: Duration,
        calls: std::sync::atomic::AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl ProvideCredentials for Counting {
        fn provide(&self) -> Result<Credentials> {
            use std::sync::atomic::Ordering;
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::Credentials {
                    provider: "test",
                    message: "down".into(),
                });
            }
            Ok(Credentials::new(
                format!("AKID{n}"),
                "s",
                Some("t".into()),
                Some(SystemTime::now() + self.lifetime),
                "test",
            ))
        }
    }

    fn counting(lifetime: Duration) -> Arc<Counting> {
        Arc::new(Counting {
            lifetime,
            calls: Default::default(),
            fail: Default::default(),
        })
    }

    #[test]
    fn cache_refreshes_within_the_margin_and_rides_out_failed_refreshes() {
        use std::sync::atomic::Ordering;
        // Far from expiry: fetched once.
        let inner = counting(Duration::from_secs(3600));
        let cached = CachedProvider::new(inner.clone(), DEFAULT_REFRESH_MARGIN);
        let first = cached.provide().unwrap();
        assert_eq!(cached.provide().unwrap(), first);
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);

        // Inside the refresh margin: every call refreshes.
        let inner = counting(Duration::from_secs(120));
        let cached = CachedProvider::new(inner.clone(), DEFAULT_REFRESH_MARGIN);
        let first = cached.provide().unwrap();
        let second = cached.provide().unwrap();
        assert_ne!(first.access_key_id(), second.access_key_id());
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);

        // A failed refresh while the old credentials still work: the old ones are used,
        // and the next refresh waits a while rather than come with every call.
        inner.fail.store(true, Ordering::SeqCst);
        assert_eq!(cached.provide().unwrap(), second);
        assert_eq!(cached.provide().unwrap(), second);
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);

        // Nothing cached and the source fails: the error comes through.
        let inner = counting(Duration::from_secs(120));
        inner.fail.store(true, Ordering::SeqCst);
        let cached = CachedProvider::new(inner, DEFAULT_REFRESH_MARGIN);
        assert!(matches!(
            cached.provide(),
            Err(Error::Credentials {
                provider: "test",
                ..
            })
        ));
    }

    /// Keys in the credentials file name no expiry, yet may be temporary ones that a login
    /// tool rewrites every hour: they are read again after the untimed lifetime, and
    /// used on while the file cannot be read.
    #[test]
    fn keys_without_an_expiry_are_read_again_after_a_while() {
        let dir = std::env::temp_dir().join(format!("fluidity-untimed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("credentials");
        let write = |akid: &str| {
            std::fs::write(
                &file,
                format!("[default]\naws_access_key_id = {akid}\naws_secret_access_key = s\naws_session_token = t\n"),
            )
            .unwrap()
        };
        write("ASIAOLD");
        let env = Env::from_pairs([
            ("AWS_SHARED_CREDENTIALS_FILE", file.display().to_string()),
            ("AWS_CONFIG_FILE", "/nonexistent".to_string()),
        ]);
        let http = HttpClient::direct().unwrap();
        let profile = ProfileProvider::new(&env, None, &http, "us-east-1", &Endpoints::default());
        let cache = |untimed_lifetime| CachedProvider {
            untimed_lifetime,
            ..CachedProvider::new(Arc::new(profile.clone()), DEFAULT_REFRESH_MARGIN)
        };
        let (kept, renewed) = (cache(UNTIMED_LIFETIME), cache(Duration::ZERO));
        assert_eq!(kept.provide().unwrap().access_key_id(), "ASIAOLD");
        assert_eq!(renewed.provide().unwrap().access_key_id(), "ASIAOLD");
        write("ASIANEW");
        assert_eq!(kept.provide().unwrap().access_key_id(), "ASIAOLD");
        assert_eq!(renewed.provide().unwrap().access_key_id(), "ASIANEW");
        std::fs::write(&file, "[default]\naws_access_key_id = ASIAHALF\n").unwrap();
        assert_eq!(renewed.provide().unwrap().access_key_id(), "ASIANEW");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chain_moves_on_only_when_a_provider_has_nothing() {
        let env_empty: Arc<dyn ProvideCredentials> = Arc::new(EnvProvider::new(&Env::empty()));
        let broken: Arc<dyn ProvideCredentials> = Arc::new(EnvProvider::new(&Env::from_pairs([(
            "AWS_ACCESS_KEY_ID",
            "AKID",
        )])));
        let good: Arc<dyn ProvideCredentials> = counting(Duration::from_secs(3600));
        let c = ChainProvider::new(vec![env_empty.clone(), good.clone()])
            .provide()
            .unwrap();
        assert_eq!(c.provider(), "test");
        // A configured but broken provider stops the chain rather than being bypassed.
        assert!(matches!(
            ChainProvider::new(vec![broken, good]).provide(),
            Err(Error::Credentials { .. })
        ));
        match ChainProvider::new(vec![env_empty]).provide() {
            Err(Error::NoCredentials(tried)) => assert!(tried.contains("environment")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn credential_process_output() {
        let c = process_credentials(
            br#"{"Version":1,"AccessKeyId":"ASIAX","SecretAccessKey":"s/k+","SessionToken":"t==","Expiration":"2030-01-02T03:04:05Z"}"#,
        )
        .unwrap();
        assert_eq!(c.session_token(), Some("t=="));
        assert_eq!(c.expiry(), parse_rfc3339("2030-01-02T03:04:05Z"));
        assert_eq!(c.provider(), "credential_process");
        let long_lived =
            process_credentials(br#"{"Version":1,"AccessKeyId":"AKID","SecretAccessKey":"s"}"#)
                .unwrap();
        assert_eq!(
            (long_lived.session_token(), long_lived.expiry()),
            (None, None)
        );
        for (out, why) in [
            (
                &br#"{"AccessKeyId":"AKID","SecretAccessKey":"s"}"#[..],
                "\"Version\": 1",
            ),
            (
                br#"{"Version":2,"AccessKeyId":"AKID","SecretAccessKey":"s"}"#,
                "\"Version\": 1",
            ),
            (br#"{"Version":1,"AccessKeyId":"AKID"}"#, "lacks"),
            (
                br#"{"Version":1,"AccessKeyId":"AK ID","SecretAccessKey":"s"}"#,
                "printable",
            ),
            (
                br#"{"Version":1,"AccessKeyId":"A","SecretAccessKey":"s","Expiration":"later"}"#,
                "Expiration",
            ),
            (b"AKID s", "not the JSON expected"),
        ] {
            let err = process_credentials(out).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn a_credential_process_is_run_and_its_failures_explained() {
        let limit = Duration::from_secs(10);
        let c = run_credential_process(
            r#"printf '{"Version": 1, "AccessKeyId": "AKIDPROC", "SecretAccessKey": "s"}'"#,
            limit,
        )
        .unwrap();
        assert_eq!(c.access_key_id(), "AKIDPROC");
        let err =
            run_credential_process("echo 'Token expired: run aws sso login' >&2; exit 3", limit)
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("exit status: 3") && err.contains("aws sso login"),
            "{err}"
        );
        // What it printed is secret: an unreadable answer is not quoted.
        let err = run_credential_process(
            r#"s=SECRET; printf '{"Version": 1, "AccessKeyId": "%sPART"' "$s""#,
            limit,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("not the JSON expected") && !err.contains("SECRETPART"),
            "{err}"
        );
        let err = run_credential_process("head -c 100000 /dev/zero", limit)
            .unwrap_err()
            .to_string();
        assert!(err.contains("printed more than"), "{err}");
        let err = run_credential_process("sleep 30", Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gave no answer within"), "{err}");
        let err = run_credential_process("sleep 5 & echo started", Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        assert!(err.contains("keeps its output open"), "{err}");
    }

    #[test]
    fn what_a_credential_process_prints_is_never_quoted() {
        for out in [&br#""wJalrSECRETKEY""#[..], br#"["wJalrSECRETKEY"]"#] {
            let err = process_credentials(out).unwrap_err().to_string();
            assert!(
                err.contains("not a JSON object") && !err.contains("SECRET"),
                "{err}"
            );
        }
        // Nor are its arguments, which may hold a token.
        let err = run_credential_process(
            "printf x --token SECRETTOKEN; exit 1",
            Duration::from_secs(10),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`printf` (arguments not shown)") && !err.contains("SECRETTOKEN"),
            "{err}"
        );
        // Its error output is one line, its end kept.
        let err = run_credential_process(
            r#"i=0; while [ $i -lt 100 ]; do echo "noise $i" >&2; i=$((i+1)); done; printf 'fake\n\033[31mlog' >&2; exit 1"#,
            Duration::from_secs(10),
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains('\n') && !err.contains('\u{1b}'), "{err:?}");
        assert!(err.contains("\\nfake") || err.contains("fake\\n"), "{err}");
        assert!(err.ends_with("log") && !err.contains("noise 0"), "{err}");
    }

    #[test]
    fn a_credential_process_may_talk_a_lot_and_leave_helpers_behind() {
        let ok = r#"printf '{"Version": 1, "AccessKeyId": "AKID", "SecretAccessKey": "s"}'"#;
        let noisy = format!(
            r#"i=0; while [ $i -lt 3000 ]; do echo "debug line $i, padded to be long enough" >&2; i=$((i+1)); done; {ok}"#
        );
        assert!(run_credential_process(&noisy, Duration::from_secs(20)).is_ok());
        // A helper left running holds its error output: that matters only on failure.
        let helper = format!("sleep 3 >/dev/null & {ok}");
        assert!(run_credential_process(&helper, Duration::from_secs(2)).is_ok());
        let expired = r#"printf '{"Version": 1, "AccessKeyId": "AKID", "SecretAccessKey": "s", "SessionToken": "t", "Expiration": "2020-01-01T00:00:00Z"}'"#;
        let err = run_credential_process(expired, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("already expired"), "{err}");
    }

    #[test]
    fn a_credential_process_that_gives_no_answer_ends_with_what_it_started() {
        let marker = format!("sleep 7.{}", std::process::id());
        let err = run_credential_process(
            &format!("echo waiting for a login >&2; {marker}; echo '{{}}'"),
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gave no answer within"), "{err}");
        let running = || {
            let out = std::process::Command::new("pgrep")
                .args(["-f", &marker])
                .output()
                .expect("pgrep");
            !out.stdout.is_empty()
        };
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while running() {
            assert!(
                std::time::Instant::now() < until,
                "{marker} outlived its limit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_profile_runs_its_process_only_where_its_keys_are_used() {
        let dir = std::env::temp_dir().join(format!("fluidity-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ran = |name: &str| dir.join(name).exists();
        let config = dir.join("config");
        std::fs::write(
            &config,
            format!(
                "[profile base]\naws_access_key_id = AKIDBASE\naws_secret_access_key = s\n\n\
                 [profile other-source]\nrole_arn = arn:aws:iam::123456789012:role/x\n\
                 source_profile = base\ncredential_process = touch {0}/other; exit 1\n\n\
                 [profile own-source]\nrole_arn = arn:aws:iam::123456789012:role/x\n\
                 source_profile = own-source\ncredential_process = touch {0}/own; exit 1\n\n\
                 [profile keys-first]\naws_access_key_id = AKIDKEYS\naws_secret_access_key = s\n\
                 credential_process = touch {0}/keys; exit 1\n",
                dir.display()
            ),
        )
        .unwrap();
        let env = Env::from_pairs([
            ("AWS_CONFIG_FILE", config.display().to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_string()),
            // Nothing listens there: AssumeRole fails, after the keys were chosen.
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9".to_string()),
        ]);
        let http = HttpClient::direct().unwrap();
        let provide = |profile: &str| {
            ProfileProvider::new(
                &env,
                Some(profile),
                &http,
                "us-east-1",
                &Endpoints::default(),
            )
            .provide()
        };
        assert!(provide("other-source").is_err());
        assert!(
            !ran("other"),
            "the role takes base's keys: the process must not run"
        );
        let err = provide("own-source").unwrap_err().to_string();
        assert!(ran("own") && err.contains("exit status: 1"), "{err}");
        assert_eq!(provide("keys-first").unwrap().access_key_id(), "AKIDKEYS");
        assert!(!ran("keys"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Reads one request head from `conn`.
    fn read_head(conn: &mut std::net::TcpStream) -> String {
        use std::io::Read;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    #[test]
    fn container_credentials_over_plain_http_never_go_through_a_proxy() {
        use std::io::Write;
        use std::net::TcpListener;
        // A loopback address other than 127.0.0.1, which the proxy settings bypass anyway.
        let agent = TcpListener::bind("127.0.0.2:0").unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        proxy.set_nonblocking(true).unwrap();
        let full = format!("http://{}/creds", agent.local_addr().unwrap());
        let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
        let served = std::thread::spawn(move || {
            let (mut conn, _) = agent.accept().unwrap();
            let head = read_head(&mut conn);
            let body = r#"{"AccessKeyId":"ASIALOCAL","SecretAccessKey":"s","Token":"t","Expiration":"2099-01-01T00:00:00Z"}"#;
            write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            head
        });
        let env = Env::from_pairs([
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("HTTP_PROXY", proxy_url.as_str()),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", full.as_str()),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "POD-TOKEN"),
        ]);
        let http = HttpClient::new(crate::HttpConfig::from_env(&env)).unwrap();
        assert!(http.config().proxy.is_some(), "the proxy is configured");
        let c = ContainerProvider::new(&env, &http).provide().unwrap();
        assert_eq!(c.access_key_id(), "ASIALOCAL");
        assert!(served.join().unwrap().contains("POD-TOKEN"));
        assert!(
            proxy.accept().is_err(),
            "the proxy was asked for the container's credentials"
        );
    }

    #[test]
    fn a_credential_process_is_named_by_its_program_never_by_an_assignment_before_it() {
        for (command, program) in [
            ("/usr/bin/helper --token s3cr3t", "/usr/bin/helper"),
            ("VAULT_TOKEN=s.SECRET A_1=x helper get", "helper"),
            ("  aws configure export-credentials", "aws"),
            ("--x=1 helper", "--x=1"),
            ("TOKEN=s.SECRET", ""),
            ("TOKEN='s.SECRET PART' helper", "credential_process"),
            ("TOKEN=\"s.SECRET PART\" helper", "credential_process"),
            ("TOKEN=s.SECRET\\ PART helper", "credential_process"),
            ("TOKEN=$(echo s.SECRET PART) helper", "credential_process"),
            ("TOKEN=${X:-s.SECRET PART} helper", "credential_process"),
            ("TOKEN=`echo s.SECRET PART` helper", "credential_process"),
        ] {
            assert_eq!(program_name(command), program, "{command}");
        }
        let err = run_credential_process(
            "VAULT_TOKEN=s.SECRET /nonexistent/helper",
            Duration::from_secs(10),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`/nonexistent/helper`") && !err.contains("SECRET"),
            "{err}"
        );
    }

    #[test]
    fn rfc3339_parses() {
        let t = parse_rfc3339("2024-01-02T03:04:05Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_704_164_645
        );
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn metadata_credentials_answers() {
        let c = metadata_credentials(
            br#"{"Code":"Success","AccessKeyId":"ASIAX","SecretAccessKey":"s/k+","Token":"t==","Expiration":"2024-01-02T03:04:05Z"}"#,
            "imds",
        )
        .unwrap();
        assert_eq!(
            (c.access_key_id(), c.secret_access_key(), c.session_token()),
            ("ASIAX", "s/k+", Some("t=="))
        );
        assert_eq!(c.expiry(), parse_rfc3339("2024-01-02T03:04:05Z"));
        let c = metadata_credentials(
            br#"{"AccessKeyId":"AKID","SecretAccessKey":"s","Token":""}"#,
            "ecs-container",
        )
        .unwrap();
        assert_eq!((c.session_token(), c.expiry()), (None, None));
        for (body, why) in [
            (
                &br#"{"Code":"Failure","Message":"no role"}"#[..],
                "Failure: no role",
            ),
            (br#"{"AccessKeyId":"AKID"}"#, "lacks"),
            // Empty parts were accepted before, and signed with.
            (br#"{"AccessKeyId":"","SecretAccessKey":"s"}"#, "lacks"),
            (br#"{"AccessKeyId":"AKID","SecretAccessKey":""}"#, "lacks"),
            (
                br#"{"AccessKeyId":"AKID\r\nx: y","SecretAccessKey":"s"}"#,
                "AccessKeyId holds",
            ),
            (
                br#"{"AccessKeyId":"AKID","SecretAccessKey":"s k"}"#,
                "SecretAccessKey holds",
            ),
            (
                br#"{"AccessKeyId":"AKID","SecretAccessKey":"s","Token":"t\u00e9"}"#,
                "Token holds",
            ),
            (
                br#"{"AccessKeyId":"AKID","SecretAccessKey":"s","Expiration":"soon"}"#,
                "unparsable Expiration",
            ),
            (b"[1]", "invalid JSON"),
        ] {
            let e = metadata_credentials(body, "imds").unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("s k"), "{e}");
        }
    }

    #[test]
    fn instance_role_is_the_first_line() {
        assert_eq!(instance_role("role-1\nrole-2\n").unwrap(), "role-1");
        assert_eq!(instance_role(" my.role@x \r\n").unwrap(), "my.role@x");
        assert!(instance_role(&"r".repeat(MAX_ROLE_NAME)).is_ok());
        let long = "r".repeat(MAX_ROLE_NAME + 1);
        for bad in ["", "\nrole", "../x", "role name", "r\u{e9}le", &long] {
            assert!(instance_role(bad).is_err(), "{bad:?}");
        }
    }
}
