//! The UserSig on the device: a secret that never reaches a log line, an error or the API
//! (only its fingerprint does), what can be learned from it without the key, and its cache.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::identity::UserId;

/// A UserSig. Deliberately has no `Display`; `Debug` shows the fingerprint only.
#[derive(Clone, PartialEq, Eq)]
pub struct UserSig(String);

impl UserSig {
    pub fn new(s: impl Into<String>) -> UserSig {
        UserSig(s.into())
    }

    /// The secret itself: for the MQTT password and the cache file, nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn fingerprint(&self) -> String {
        imlink_usersig::fingerprint(&self.0)
    }
}

impl fmt::Debug for UserSig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserSig({})", self.fingerprint())
    }
}

/// What the daemon can learn from a UserSig without the app's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigFormat {
    /// TLS-sig-api v2: identifier, app, issue time and expiry.
    TlsSigV2 {
        identifier: String,
        sdk_app_id: u64,
        issued_at: i64,
        expires_at: i64,
    },
    /// A JWT: `exp` (and `iat`) from its payload, when present.
    Jwt {
        issued_at: Option<i64>,
        expires_at: Option<i64>,
    },
    /// Something else: expiry only from the provisioning response, if it says.
    Opaque,
}

/// Longest UserSig accepted from provisioning.
pub const MAX_SIG_LEN: usize = imlink_usersig::MAX_SIG_LEN;

/// Look inside a UserSig. Errors (never quoting the sig) mean it is malformed.
pub fn inspect(sig: &str) -> Result<SigFormat, String> {
    if sig.is_empty() {
        return Err("the UserSig is empty".into());
    }
    if sig.len() > MAX_SIG_LEN {
        return Err(format!(
            "the UserSig is {} bytes, over {MAX_SIG_LEN}",
            sig.len()
        ));
    }
    if let Some(i) = sig.bytes().position(|b| !(0x21..=0x7E).contains(&b)) {
        return Err(format!(
            "the UserSig has a space, control or non-ASCII character at byte {i}"
        ));
    }
    // TLS-sig v2 is zlib: its base64 starts with 'e' (0x78); 'eJ', 'eN', 'eA', 'eF' are the
    // four compression levels' headers.
    let looks_v2 = ["eJ", "eN", "eA", "eF", "eJw", "eNo"]
        .iter()
        .any(|p| sig.starts_with(p));
    match imlink_usersig::decode(sig) {
        Ok(d) => {
            return Ok(SigFormat::TlsSigV2 {
                identifier: d.identifier.clone(),
                sdk_app_id: d.sdk_app_id,
                issued_at: d.time as i64,
                expires_at: d.expires_at() as i64,
            });
        }
        Err(e) if looks_v2 => return Err(format!("a malformed TLS-sig-api v2 UserSig: {e}")),
        Err(_) => {}
    }
    let parts: Vec<&str> = sig.split('.').collect();
    if parts.len() == 3 && parts.iter().all(|p| !p.is_empty()) {
        use base64::Engine as _;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1].trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        if let Some(p) = payload {
            return Ok(SigFormat::Jwt {
                issued_at: p.get("iat").and_then(serde_json::Value::as_i64),
                expires_at: p.get("exp").and_then(serde_json::Value::as_i64),
            });
        }
    }
    Ok(SigFormat::Opaque)
}

// --- the cache ------------------------------------------------------------------------------

/// What the cache file holds.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    user_id: String,
    sdk_app_id: u64,
    user_sig: String,
    /// The issuer's clock minus the local wall clock at receipt, in seconds: applied to the
    /// wall clock after a restart so a wrong device clock is corrected the same way.
    server_offset: i64,
    issued_at: Option<i64>,
    expires_at: Option<i64>,
}

/// A cached sig, as loaded.
#[derive(Debug, Clone)]
pub struct Cached {
    pub sig: UserSig,
    pub issued_at: Option<i64>,
    pub expires_at: Option<i64>,
    /// The issuer's "now" per the stored offset.
    pub server_now: i64,
}

/// The UserSig cache: one JSON file in the state directory, mode 0600, written atomically.
#[derive(Debug, Clone)]
pub struct SigCache {
    path: PathBuf,
}

impl SigCache {
    pub fn new(state_dir: &Path) -> SigCache {
        SigCache {
            path: state_dir.join("usersig.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Load the cached sig for `user`/`app`, if there is one that is still valid at
    /// `wall_now`. `Err` means the file is corrupt (the caller logs it and fetches anew).
    pub fn load(&self, user: &UserId, app: u64, wall_now: i64) -> Result<Option<Cached>, String> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let f: CacheFile = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a UserSig cache ({e})", self.path.display()))?;
        if f.version != 1 {
            return Err(format!(
                "{}: unknown cache version {}",
                self.path.display(),
                f.version
            ));
        }
        if f.user_id != user.as_str() || f.sdk_app_id != app {
            return Ok(None);
        }
        if let SigFormat::TlsSigV2 {
            identifier,
            sdk_app_id,
            ..
        } = inspect(&f.user_sig).map_err(|e| format!("{}: {e}", self.path.display()))?
            && (identifier != user.as_str() || sdk_app_id != app)
        {
            return Err(format!(
                "{}: the cached UserSig is for another user or app",
                self.path.display()
            ));
        }
        let server_now = wall_now + f.server_offset;
        if f.expires_at.is_some_and(|e| server_now >= e) {
            return Ok(None);
        }
        Ok(Some(Cached {
            sig: UserSig(f.user_sig),
            issued_at: f.issued_at,
            expires_at: f.expires_at,
            server_now,
        }))
    }

    /// Store a sig: write a 0600 temp file in the same directory, fsync, rename over the
    /// cache, fsync the directory. A crash leaves either the old or the new file, whole.
    #[allow(clippy::too_many_arguments)]
    pub fn store(
        &self,
        user: &UserId,
        app: u64,
        sig: &UserSig,
        server_offset: i64,
        issued_at: Option<i64>,
        expires_at: Option<i64>,
    ) -> std::io::Result<()> {
        let f = CacheFile {
            version: 1,
            user_id: user.to_string(),
            sdk_app_id: app,
            user_sig: sig.expose().to_string(),
            server_offset,
            issued_at,
            expires_at,
        };
        let json = serde_json::to_vec(&f).map_err(std::io::Error::other)?;
        write_atomic(&self.path, &json, 0o600)
    }

    pub fn forget(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Write `bytes` to `path` atomically with `mode` (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
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

    fn sig_for(user: &str, app: u64, time: u64, expire: u64) -> String {
        imlink_usersig::generate(&imlink_usersig::SigParams {
            sdk_app_id: app,
            secret_key: "k",
            identifier: user,
            time,
            expire,
            userbuf: None,
        })
    }

    #[test]
    fn debug_shows_the_fingerprint_not_the_sig() {
        let s = UserSig::new(sig_for("alice", 1, 1000, 100));
        let dbg = format!("{s:?}");
        assert!(dbg.starts_with("UserSig(sha256:"));
        assert!(!dbg.contains(&s.expose()[..16]));
    }

    #[test]
    fn formats_are_recognised() {
        assert_eq!(
            inspect(&sig_for("alice", 7, 1000, 100)),
            Ok(SigFormat::TlsSigV2 {
                identifier: "alice".into(),
                sdk_app_id: 7,
                issued_at: 1000,
                expires_at: 1100
            })
        );
        // header.{"exp":1700000000,"iat":1699990000}.sig
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3MDAwMDAwMDAsImlhdCI6MTY5OTk5MDAwMH0.c2ln";
        assert_eq!(
            inspect(jwt),
            Ok(SigFormat::Jwt {
                issued_at: Some(1_699_990_000),
                expires_at: Some(1_700_000_000)
            })
        );
        assert_eq!(inspect("opaque-token-123"), Ok(SigFormat::Opaque));
        assert!(inspect("eJxbroken").unwrap_err().contains("malformed"));
        assert!(inspect("has space").is_err());
        assert!(inspect("").is_err());
        assert!(inspect(&"x".repeat(MAX_SIG_LEN + 1)).is_err());
    }

    #[test]
    fn the_cache_round_trips_at_0600_and_ignores_what_does_not_fit() {
        let dir = std::env::temp_dir().join(format!("imlinkd-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = SigCache::new(&dir);
        let alice = UserId::parse("alice").unwrap();
        assert!(
            cache.load(&alice, 7, 1000).unwrap().is_none(),
            "no file yet"
        );
        let sig = UserSig::new(sig_for("alice", 7, 1000, 100));
        cache
            .store(&alice, 7, &sig, 5, Some(1000), Some(1100))
            .unwrap();
        let mode = std::fs::metadata(cache.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let c = cache.load(&alice, 7, 1050).unwrap().unwrap();
        assert_eq!(c.sig, sig);
        assert_eq!(c.server_now, 1055, "the stored clock offset is applied");
        // Expired (by the corrected clock), other user, other app: not used.
        assert!(cache.load(&alice, 7, 1095).unwrap().is_none());
        assert!(
            cache
                .load(&UserId::parse("bob").unwrap(), 7, 1050)
                .unwrap()
                .is_none()
        );
        assert!(cache.load(&alice, 8, 1050).unwrap().is_none());
        // Corrupt: an error to log, not a panic.
        std::fs::write(cache.path(), b"{garbage").unwrap();
        assert!(cache.load(&alice, 7, 1050).is_err());
        cache.forget().unwrap();
        cache.forget().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
