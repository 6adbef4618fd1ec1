//! Checking proxy credentials without leaking them through timing.

use base64::Engine;

use super::Credentials;

/// Compares two byte strings in time that depends only on their lengths, not contents.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

impl Credentials {
    /// Whether `username` and `password` match, compared in constant time.
    pub(crate) fn matches(&self, username: &[u8], password: &[u8]) -> bool {
        // Non-short-circuit `&` so that a wrong username costs as much as a wrong password.
        ct_eq(self.username.as_bytes(), username) & ct_eq(self.password.as_bytes(), password)
    }

    /// Whether a `Proxy-Authorization` value carries these credentials (`Basic` scheme).
    pub(crate) fn matches_basic(&self, value: &[u8]) -> bool {
        let value = value.trim_ascii();
        let Some(space) = value.iter().position(|&b| b == b' ') else {
            return false;
        };
        let (scheme, token) = (&value[..space], &value[space + 1..]);
        if !scheme.eq_ignore_ascii_case(b"basic") {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(token.trim_ascii())
        else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        self.matches(&decoded[..colon], &decoded[colon + 1..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            username: "alice".into(),
            password: "s3:cret".into(),
        }
    }

    #[test]
    fn basic_values() {
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:s3:cret")
        );
        assert!(creds().matches_basic(good.as_bytes()));
        assert!(creds().matches_basic(good.replace("Basic", "basic").as_bytes()));
        let wrong = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:s3:creT")
        );
        assert!(!creds().matches_basic(wrong.as_bytes()));
        assert!(!creds().matches_basic(b"Bearer abc"));
        assert!(!creds().matches_basic(b"Basic !!!"));
        assert!(!creds().matches_basic(b"Basic"));
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abc\0"));
        assert!(!ct_eq(b"", b"\0"));
    }
}
