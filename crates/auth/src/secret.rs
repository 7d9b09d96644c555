//! Secrets: a string that never prints, and the rule for the files that hold them.
//!
//! Every secret this service reads (the NATS password, the issuer seed, app keys, operator
//! secrets) comes from its own file, which must be a regular file of mode 0600 or 0400 (no
//! group or other bits) owned by the service's user or by root. Anything else is refused with
//! an error that names the file and the fix, before the service starts.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A secret string: no `Display`, `Debug` prints `<redacted>`. Dropped bytes are overwritten.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// The secret itself, for the one place that needs it (HMAC, CONNECT).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: overwrite the heap buffer before it is freed.
        // SAFETY: zero bytes are valid UTF-8, and the String is not used afterwards.
        unsafe {
            for b in self.0.as_bytes_mut() {
                std::ptr::write_volatile(b, 0);
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Largest secret file read (a seed is 58 bytes, an app key 64).
pub const MAX_SECRET_FILE: u64 = 4096;

/// Why a secret file is refused. Displays as what is wrong and how to fix it; never the content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read it: {0}")]
    Io(String),
    #[error("is not a regular file")]
    NotAFile,
    #[error("has mode {mode:04o}; a secret file must be 0600 or 0400 (fix: chmod 600 on it)")]
    Mode { mode: u32 },
    #[error(
        "is owned by uid {owner}; it must belong to the service's user (uid {me}) or root \
         (fix: chown it to the user imlink-auth runs as)"
    )]
    Owner { owner: u32, me: u32 },
    #[error("is larger than {MAX_SECRET_FILE} bytes (not a secret file?)")]
    TooLarge,
    #[error("is empty")]
    Empty,
    #[error("is not UTF-8 text")]
    NotUtf8,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Read a secret file: checks type, mode, owner and size, then trims surrounding whitespace
/// (a trailing newline from an editor or `echo`).
pub fn read_secret_file(path: &Path) -> Result<Secret, SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|e| SecretFileError::Io(e.kind().to_string()))?;
    if !meta.is_file() {
        return Err(SecretFileError::NotAFile);
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o177 != 0 || mode & 0o400 == 0 {
        return Err(SecretFileError::Mode { mode });
    }
    let me = euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(SecretFileError::Owner {
            owner: meta.uid(),
            me,
        });
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(SecretFileError::TooLarge);
    }
    let bytes = std::fs::read(path).map_err(|e| SecretFileError::Io(e.kind().to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| SecretFileError::NotUtf8)?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretFileError::Empty);
    }
    Ok(Secret(trimmed.to_string()))
}

/// Write a secret file atomically: a temporary file of mode 0600 in the same directory,
/// fsync, rename, fsync of the directory. Refuses to replace an existing file unless `replace`.
pub fn write_secret_file(path: &Path, contents: &str, replace: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !replace && path.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "it exists (use --force to replace it)",
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir() -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "imlink-auth-secret-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_0600_file_is_read_and_trimmed() {
        let d = dir();
        let p = d.join("k");
        write_secret_file(&p, "  abc\n", false).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_secret_file(&p).unwrap().expose(), "abc");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_secret_file(&p).unwrap().expose(), "abc");
        // No silent replacement.
        assert!(write_secret_file(&p, "x", false).is_err());
    }

    #[test]
    fn loose_modes_and_odd_files_are_refused() {
        let d = dir();
        let p = d.join("k");
        std::fs::write(&p, "abc").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o700, 0o200] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                read_secret_file(&p),
                Err(SecretFileError::Mode { mode }),
                "{mode:o}"
            );
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "\n \n").unwrap();
        assert_eq!(read_secret_file(&p), Err(SecretFileError::Empty));
        std::fs::write(&p, vec![b'a'; 5000]).unwrap();
        assert_eq!(read_secret_file(&p), Err(SecretFileError::TooLarge));
        assert_eq!(read_secret_file(&d), Err(SecretFileError::NotAFile));
        assert!(matches!(
            read_secret_file(&d.join("missing")),
            Err(SecretFileError::Io(_))
        ));
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        // Runs as root in CI: chown to another uid. As an ordinary user the chown fails and
        // the file is ours, which the rule accepts: nothing to check then.
        let d = dir();
        let p = d.join("k");
        write_secret_file(&p, "abc", false).unwrap();
        let ok = unsafe {
            let c = std::ffi::CString::new(p.to_string_lossy().as_bytes()).unwrap();
            libc::chown(c.as_ptr(), 4242, 4242) == 0
        };
        if ok && euid() != 4242 {
            assert!(matches!(
                read_secret_file(&p),
                Err(SecretFileError::Owner { owner: 4242, .. })
            ));
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
    }
}
