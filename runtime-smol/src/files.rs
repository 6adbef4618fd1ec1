//! Reading files whose size the program does not choose: configuration, certificates and
//! keys, credentials and tokens, CA bundles.

use std::io::Read;
use std::path::Path;

/// The bytes of `path` if it holds at most `max` of them, `None` if it holds more: a path
/// that names a device or a pipe (`/dev/zero`), or a huge file, costs at most `max + 1`
/// bytes. A size check on the file's metadata would not do, as those say 0.
pub fn read_limited(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_read_whole_up_to_the_limit_and_refused_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(
            read_limited(&path, 5).unwrap().as_deref(),
            Some(&b"12345"[..])
        );
        assert_eq!(read_limited(&path, 4).unwrap(), None);
        assert_eq!(read_limited(Path::new("/dev/zero"), 1024).unwrap(), None);
        assert!(read_limited(&dir.path().join("missing"), 5).is_err());
    }
}
