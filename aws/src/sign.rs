//! SigV4 signing with `aws-sigv4`.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings,
};
use aws_sigv4::sign::v4;
use ureq::http::Uri;

use crate::credentials::Credentials;
use crate::error::{Error, Result};

/// Where a signature goes and how the payload is hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PayloadHash {
    /// The payload hash is part of the signature only (AWS APIs).
    Implicit,
    /// Also send `x-amz-content-sha256`, which Lambda function URLs want on requests with a body.
    Header,
}

/// The value of the `Host` header that a request to `url` carries.
///
/// aws-sigv4 signs the host from the URI, and ureq adds the same value if none is set; this
/// sets it explicitly so that what is signed and what is sent cannot differ.
pub(crate) fn host_header(url: &str) -> Result<String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| Error::Config(format!("invalid URL {url:?}: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| Error::Config(format!("URL {url:?} has no host")))?;
    if authority.as_str().contains('@') {
        return Err(Error::Config(format!(
            "URL {url:?} must not carry user info"
        )));
    }
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        Some("http") => 80,
        _ => return Err(Error::Config(format!("URL {url:?} must be http or https"))),
    };
    Ok(match authority.port_u16() {
        Some(port) if port != default_port => format!("{}:{port}", authority.host()),
        _ => authority.host().to_string(),
    })
}

/// Who signs, for which region and service, at what time and how the payload is hashed.
pub(crate) struct Signer<'a> {
    /// The credentials that sign.
    pub creds: &'a Credentials,
    /// The signing region.
    pub region: &'a str,
    /// The service's signing name.
    pub service: &'a str,
    /// The signing time.
    pub time: SystemTime,
    /// How the payload hash is carried.
    pub payload_hash: PayloadHash,
}

/// Signs a request and appends the signature headers (`authorization`, `x-amz-date`, and
/// `x-amz-security-token` for temporary credentials) to `headers`.
///
/// `headers` must already hold every header that is to be signed, including `host`; headers
/// added after signing are not covered by the signature.
pub(crate) fn sign_headers(
    signer: &Signer<'_>,
    method: &str,
    url: &str,
    headers: &mut Vec<(String, String)>,
    body: &[u8],
) -> Result<()> {
    let Signer {
        creds,
        region,
        service,
        time,
        payload_hash,
    } = *signer;
    let identity = creds.to_identity();
    let mut settings = SigningSettings::default();
    if payload_hash == PayloadHash::Header {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| Error::Signing(e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body),
    )
    .map_err(|e| Error::Signing(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| Error::Signing(e.to_string()))?
        .into_parts();
    let (new_headers, _params) = instructions.into_parts();
    for h in new_headers {
        headers.push((h.name().to_string(), h.value().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_keeps_only_non_default_ports() {
        assert_eq!(
            host_header("https://sts.amazonaws.com/").unwrap(),
            "sts.amazonaws.com"
        );
        assert_eq!(
            host_header("https://sts.amazonaws.com:443/").unwrap(),
            "sts.amazonaws.com"
        );
        assert_eq!(
            host_header("http://127.0.0.1:5000/").unwrap(),
            "127.0.0.1:5000"
        );
        assert!(host_header("ftp://x/").is_err());
        assert!(host_header("https://user:pw@x/").is_err());
    }

    #[test]
    fn signing_adds_date_authorization_and_token() {
        let creds = Credentials::new("AKIDEXAMPLE", "secret", Some("tok".into()), None, "test");
        let mut headers = vec![("host".to_string(), "sts.amazonaws.com".to_string())];
        let signer = Signer {
            creds: &creds,
            region: "us-east-1",
            service: "sts",
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            payload_hash: PayloadHash::Implicit,
        };
        sign_headers(
            &signer,
            "POST",
            "https://sts.amazonaws.com/",
            &mut headers,
            b"Action=GetCallerIdentity&Version=2011-06-15",
        )
        .unwrap();
        let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&"authorization"));
        assert!(names.contains(&"x-amz-date"));
        assert!(names.contains(&"x-amz-security-token"));
        let auth = &headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1;
        assert!(auth.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/sts/aws4_request"
        ));
    }
}
