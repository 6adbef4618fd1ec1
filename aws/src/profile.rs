//! The shared `credentials` and `config` files, read as the AWS SDKs read them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::env::Env;
use crate::error::{Error, Result};

/// Profile files larger than this are refused.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// One profile's properties, keys lower-cased.
pub type Profile = BTreeMap<String, String>;

/// The profile to use: `explicit`, else `AWS_PROFILE`, else `default`.
pub fn profile_name(env: &Env, explicit: Option<&str>) -> String {
    explicit
        .or_else(|| env.get("AWS_PROFILE"))
        .unwrap_or("default")
        .to_string()
}

/// The shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`).
pub fn credentials_file(env: &Env) -> Option<PathBuf> {
    match env.get("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => Some(env.expand_home(p)),
        None => env.home_dir().map(|h| h.join(".aws").join("credentials")),
    }
}

/// The shared config file (`AWS_CONFIG_FILE`, else `~/.aws/config`).
pub fn config_file(env: &Env) -> Option<PathBuf> {
    match env.get("AWS_CONFIG_FILE") {
        Some(p) => Some(env.expand_home(p)),
        None => env.home_dir().map(|h| h.join(".aws").join("config")),
    }
}

/// All profiles of both files: the config file's `[profile NAME]` and `[default]`
/// sections, overlaid by the credentials file's `[NAME]` sections (which win, as in the
/// SDKs). Missing files are empty.
pub fn load_profiles(env: &Env) -> Result<BTreeMap<String, Profile>> {
    let config = match config_file(env) {
        Some(path) => read_optional(&path)?,
        None => None,
    };
    let credentials = match credentials_file(env) {
        Some(path) => read_optional(&path)?,
        None => None,
    };
    Ok(merge_profiles(config.as_deref(), credentials.as_deref()))
}

/// The profiles of a config file's and a credentials file's texts, as
/// [`load_profiles`] merges them.
pub(crate) fn merge_profiles(
    config: Option<&str>,
    credentials: Option<&str>,
) -> BTreeMap<String, Profile> {
    let mut profiles: BTreeMap<String, Profile> = BTreeMap::new();
    for (section, props) in parse_ini(config.unwrap_or_default()) {
        let name = if section == "default" {
            Some("default".to_string())
        } else {
            section
                .strip_prefix("profile")
                .filter(|rest| rest.starts_with([' ', '\t']))
                .map(|rest| rest.trim().to_string())
        };
        if let Some(name) = name {
            profiles.entry(name).or_default().extend(props);
        }
    }
    for (section, props) in parse_ini(credentials.unwrap_or_default()) {
        profiles.entry(section).or_default().extend(props);
    }
    profiles
}

/// The selected profile, if either file defines it.
pub fn load_profile(env: &Env, explicit: Option<&str>) -> Result<Option<Profile>> {
    let name = profile_name(env, explicit);
    Ok(load_profiles(env)?.remove(&name))
}

/// The region: `AWS_REGION`, else `AWS_DEFAULT_REGION`, else the selected profile's `region`.
pub fn resolve_region(env: &Env, profile: Option<&str>) -> Result<Option<String>> {
    if let Some(r) = env
        .get("AWS_REGION")
        .or_else(|| env.get("AWS_DEFAULT_REGION"))
    {
        return Ok(Some(r.to_string()));
    }
    Ok(load_profile(env, profile)?
        .and_then(|p| p.get("region").cloned())
        .filter(|r| !r.is_empty()))
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    let io_err = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = match fluidity_runtime_smol::files::read_limited(path, MAX_FILE_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            return Err(Error::Config(format!(
                "{} is larger than {MAX_FILE_BYTES} bytes",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Error::Config(format!("{} is not UTF-8", path.display())))
}

/// Parses the AWS flavour of INI: `[section]`, `key = value`, `#`/`;` comments, and
/// indented continuation lines (nested sub-properties, which are skipped). A header
/// without its `]` or with an empty name starts a section that is dropped, properties
/// and all, as is a property with an empty name.
fn parse_ini(text: &str) -> Vec<(String, Profile)> {
    let mut out: Vec<(String, Profile)> = Vec::new();
    // Whether the properties that follow belong to the last section of `out`.
    let mut in_section = false;
    for raw in text.lines() {
        if raw.starts_with([' ', '\t']) && !raw.trim().is_empty() {
            // A continuation of the previous property (e.g. `s3 =` sub-settings).
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.find(']').map(|end| rest[..end].trim());
            in_section = false;
            if let Some(name) = name.filter(|n| !n.is_empty()) {
                out.push((name.to_string(), Profile::new()));
                in_section = true;
            }
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim();
        if !in_section || k.is_empty() {
            continue;
        }
        if let Some((_, props)) = out.last_mut() {
            let v = v.trim();
            // Inline comments need whitespace before the marker, as in the SDKs.
            let v = [" #", "\t#", " ;", "\t;"]
                .iter()
                .filter_map(|m| v.find(m))
                .min()
                .map_or(v, |i| v[..i].trim_end());
            props.insert(k.to_ascii_lowercase(), v.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_comments_and_continuations() {
        let text = "# comment\n[default]\naws_access_key_id = AKID ; note\nregion=eu-west-1\n\n[profile dev]\nregion = us-east-2\ns3 =\n  max_concurrent_requests = 20\nrole_arn = arn:aws:iam::1:role/x\n";
        let p = parse_ini(text);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].1["aws_access_key_id"], "AKID");
        assert_eq!(p[1].0, "profile dev");
        assert_eq!(p[1].1["role_arn"], "arn:aws:iam::1:role/x");
        assert!(!p[1].1.contains_key("max_concurrent_requests"));
    }

    /// Headers with no name or no `]`, and properties with no name, are dropped with what
    /// follows them; before, `[]` made a profile named "" and the properties after `[prod`
    /// went to the profile above it.
    #[test]
    fn drops_nameless_and_unterminated_sections() {
        let text = "[default]\nregion = eu-west-1\n[prod\naws_access_key_id = B\n[ ]\nx = 1\n\
                    [profile  ]\ny = 2\n[profile dev]\n= v\nregion = us-east-2\n";
        let profiles = merge_profiles(Some(text), Some(text));
        let names: Vec<&str> = profiles.keys().map(String::as_str).collect();
        assert_eq!(names, ["default", "dev", "profile", "profile dev"]);
        let region = |r: &str| Profile::from([("region".to_string(), r.to_string())]);
        assert_eq!(profiles["default"], region("eu-west-1"));
        assert_eq!(profiles["dev"], region("us-east-2"));
        assert_eq!(profiles["profile dev"], region("us-east-2"));
    }
}
