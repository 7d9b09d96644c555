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

/// A UserSig a local app brought (`login {user_id, user_sig}`), checked before it is used
/// or kept.
#[derive(Debug)]
pub struct AppSig {
    pub sig: UserSig,
    /// Whom it says it is for (TLS-sig v2); `None` for formats that do not say. Whether that
    /// is the user being logged in is the engine's decision.
    pub user: Option<UserId>,
    pub issued_at: Option<i64>,
    pub expires_at: Option<i64>,
}

/// Check a UserSig a local app brought for app `sdk_app_id`: well formed, for this app, for
/// `user` when the app named one (else the engine checks it against whom the session logs in
/// as), and (when it says when, and the wall clock `now` is plausible) not expired. Errors
/// carry an IM code and never quote the sig.
pub fn check_app_sig(
    text: &str,
    user: Option<&UserId>,
    sdk_app_id: u64,
    now: i64,
    clock_plausible: bool,
) -> Result<AppSig, (u32, String)> {
    use crate::session::codes;
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let (for_user, issued_at, expires_at) = match inspect(text) {
        Err(e) => return Err((codes::SVR_SIG_CHECK_FAILED, format!("user_sig: {e}"))),
        Ok(SigFormat::TlsSigV2 {
            identifier,
            sdk_app_id: app,
            issued_at,
            expires_at,
        }) => {
            let Ok(for_user) = UserId::parse(&identifier) else {
                return Err((
                    codes::SVR_SIG_MISMATCH_ID,
                    format!(
                        "user_sig was issued for {}, which is not a valid UserID",
                        crate::session::quote_external(&identifier, 40)
                    ),
                ));
            };
            if let Some(u) = user.filter(|u| **u != for_user) {
                return Err((
                    codes::SVR_SIG_MISMATCH_ID,
                    format!(
                        "user_sig was issued for {:?}, not {:?}",
                        for_user.as_str(),
                        u.as_str()
                    ),
                ));
            }
            if app != sdk_app_id {
                return Err((
                    codes::SVR_SIG_MISMATCH_APP,
                    format!("user_sig was issued for SDKAppID {app}, not {sdk_app_id}"),
                ));
            }
            (Some(for_user), Some(issued_at), Some(expires_at))
        }
        Ok(SigFormat::Jwt {
            issued_at,
            expires_at,
        }) => (None, issued_at, expires_at),
        Ok(SigFormat::Opaque) => (None, None, None),
    };
    if clock_plausible && expires_at.is_some_and(|e| e < now) {
        return Err((
            codes::USER_SIG_EXPIRED,
            "user_sig has expired; ask the app server for a new one".into(),
        ));
    }
    Ok(AppSig {
        sig: UserSig::new(text),
        user: for_user,
        issued_at,
        expires_at,
    })
}

// --- the cache ------------------------------------------------------------------------------

/// What the cache file holds (version 2; version 1 files, without the boot-time anchor, are
/// still read).
#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    user_id: String,
    sdk_app_id: u64,
    user_sig: String,
    /// The issuer's clock minus the local wall clock at receipt, in seconds: after a reboot it
    /// is applied to the wall clock, so a device clock that was wrong then is corrected the
    /// same way.
    server_offset: i64,
    issued_at: Option<i64>,
    expires_at: Option<i64>,
    /// The exact anchor, valid within the boot that wrote it: the issuer's time at receipt,
    /// and the boot-time milliseconds of the receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    anchor: Option<BootAnchor>,
}

/// Where a sig's deadline is anchored: the issuer's time at a boot-time instant of one boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootAnchor {
    pub boot_id: String,
    pub received_boot_ms: u64,
    pub server_now: i64,
}

/// A cached sig, as loaded. Whether it is still valid is the session machine's call.
#[derive(Debug, Clone)]
pub struct Cached {
    pub sig: UserSig,
    pub issued_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub server_offset: i64,
    pub anchor: Option<BootAnchor>,
}

/// What is stored with a sig.
#[derive(Debug, Clone)]
pub struct CacheEntry<'a> {
    pub user: &'a UserId,
    pub app: u64,
    pub sig: &'a UserSig,
    pub server_offset: i64,
    pub issued_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub anchor: Option<BootAnchor>,
}

/// A cache file larger than this is not one.
const MAX_CACHE_BYTES: u64 = 64 * 1024;

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

    /// Load the cached sig for `user`/`app`, if there is one. `Err` means the file is corrupt
    /// (the caller logs it and fetches anew).
    pub fn load(&self, user: &UserId, app: u64) -> Result<Option<Cached>, String> {
        // Never through a symlink (someone who can write the directory must not make the
        // daemon read another file as its secret), and never more than a cache can be.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(format!(
                    "{}: is a symlink, not the cache",
                    self.path.display()
                ));
            }
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let mut bytes = Vec::new();
        use std::io::Read as _;
        (&mut file)
            .take(MAX_CACHE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if bytes.len() as u64 > MAX_CACHE_BYTES {
            return Err(format!(
                "{}: larger than a UserSig cache",
                self.path.display()
            ));
        }
        let f: CacheFile = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a UserSig cache ({e})", self.path.display()))?;
        if !(1..=2).contains(&f.version) {
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
        Ok(Some(Cached {
            sig: UserSig(f.user_sig),
            issued_at: f.issued_at,
            expires_at: f.expires_at,
            server_offset: f.server_offset,
            anchor: f.anchor,
        }))
    }

    /// Store a sig: write a 0600 temp file in the same directory, fsync, rename over the
    /// cache, fsync the directory. A crash leaves either the old or the new file, whole.
    pub fn store(&self, e: &CacheEntry<'_>) -> std::io::Result<()> {
        let f = CacheFile {
            version: 2,
            user_id: e.user.to_string(),
            sdk_app_id: e.app,
            user_sig: e.sig.expose().to_string(),
            server_offset: e.server_offset,
            issued_at: e.issued_at,
            expires_at: e.expires_at,
            anchor: e.anchor.clone(),
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
    fn the_cache_round_trips_at_0600_with_its_anchor_and_ignores_what_does_not_fit() {
        let dir = std::env::temp_dir().join(format!("imlinkd-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = SigCache::new(&dir);
        let alice = UserId::parse("alice").unwrap();
        assert!(cache.load(&alice, 7).unwrap().is_none(), "no file yet");
        let sig = UserSig::new(sig_for("alice", 7, 1000, 100));
        let anchor = BootAnchor {
            boot_id: "b1".into(),
            received_boot_ms: 5_000,
            server_now: 1005,
        };
        cache
            .store(&CacheEntry {
                user: &alice,
                app: 7,
                sig: &sig,
                server_offset: 5,
                issued_at: Some(1000),
                expires_at: Some(1100),
                anchor: Some(anchor.clone()),
            })
            .unwrap();
        let mode = std::fs::metadata(cache.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let c = cache.load(&alice, 7).unwrap().unwrap();
        assert_eq!(c.sig, sig);
        assert_eq!(c.server_offset, 5);
        assert_eq!(c.anchor, Some(anchor));
        assert_eq!((c.issued_at, c.expires_at), (Some(1000), Some(1100)));
        // Other user, other app: not used.
        assert!(
            cache
                .load(&UserId::parse("bob").unwrap(), 7)
                .unwrap()
                .is_none()
        );
        assert!(cache.load(&alice, 8).unwrap().is_none());
        // A version 1 file (no anchor) still loads.
        let v1 = serde_json::json!({"version": 1, "user_id": "alice", "sdk_app_id": 7,
            "user_sig": sig.expose(), "server_offset": -3, "issued_at": 1000, "expires_at": 1100});
        std::fs::write(cache.path(), v1.to_string()).unwrap();
        let c = cache.load(&alice, 7).unwrap().unwrap();
        assert_eq!((c.server_offset, c.anchor), (-3, None));
        // Corrupt or from the future: an error to log, not a panic.
        std::fs::write(cache.path(), b"{garbage").unwrap();
        assert!(cache.load(&alice, 7).is_err());
        let v9 = serde_json::json!({"version": 9, "user_id": "alice", "sdk_app_id": 7,
            "user_sig": sig.expose(), "server_offset": 0, "issued_at": null, "expires_at": null});
        std::fs::write(cache.path(), v9.to_string()).unwrap();
        assert!(cache.load(&alice, 7).unwrap_err().contains("version 9"));
        cache.forget().unwrap();
        cache.forget().unwrap();
        // A symlink in its place is refused, not followed.
        let target = dir.join("elsewhere.json");
        std::fs::write(&target, v1.to_string()).unwrap();
        std::os::unix::fs::symlink(&target, cache.path()).unwrap();
        assert!(cache.load(&alice, 7).unwrap_err().contains("symlink"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
