//! The listening socket: taken from systemd (socket activation) or bound at the configured
//! path (0660, the clients' group), and who a connected peer is (`SO_PEERGROUPS`).

use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use crate::config::ApiConfig;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another process is already serving {0} (is imlinkd running twice?)")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api.group {0:?}: no such group")]
    NoSuchGroup(String),
    #[error("socket activation: {0}")]
    Activation(String),
}

/// The listening socket, and the path to remove on exit (none when systemd owns it).
pub struct Bound {
    pub listener: UnixListener,
    pub owned_path: Option<PathBuf>,
}

/// Take the socket systemd passed (socket activation), or bind the configured path: a stale
/// socket file is replaced, a live one means another daemon and is an error. The socket is
/// made 0660 and given the client group.
pub fn bind(cfg: &ApiConfig) -> Result<Bound, BindError> {
    if let Some(listener) = activated_socket()? {
        return Ok(Bound {
            listener,
            owned_path: None,
        });
    }
    let path = &cfg.socket;
    let io = |source| BindError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.clone()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Err(BindError::NotASocket(path.clone())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    if let Some(group) = &cfg.group {
        // A group name, or a numeric gid.
        let gid = match group.parse::<u32>() {
            Ok(n) => nix::unistd::Gid::from_raw(n),
            Err(_) => {
                nix::unistd::Group::from_name(group)
                    .ok()
                    .flatten()
                    .ok_or_else(|| BindError::NoSuchGroup(group.clone()))?
                    .gid
            }
        };
        // Under the packaged unit the daemon's primary group already is the clients' group, and
        // the system call filter forbids chown: only change what needs changing.
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(path).map_err(io)?.gid() != gid.as_raw() {
            nix::unistd::chown(path, None, Some(gid))
                .map_err(|e| io(std::io::Error::from_raw_os_error(e as i32)))?;
        }
    }
    Ok(Bound {
        listener,
        owned_path: Some(path.clone()),
    })
}

fn activated_socket() -> Result<Option<UnixListener>, BindError> {
    let fds = sd_notify::listen_fds().map_err(|e| BindError::Activation(e.to_string()))?;
    let Some(fd) = fds.into_iter().next() else {
        return Ok(None);
    };
    check_activated_fd(fd).map_err(BindError::Activation)?;
    // SAFETY: systemd passed this descriptor to us (LISTEN_PID matched) and nothing else in
    // the process owns it; we take ownership exactly once.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    std_listener
        .set_nonblocking(true)
        .map_err(|e| BindError::Activation(e.to_string()))?;
    UnixListener::from_std(std_listener)
        .map(Some)
        .map_err(|e| BindError::Activation(e.to_string()))
}

/// The descriptor systemd passed must be what the API needs: a listening Unix stream socket
/// (a datagram socket, a TCP port or a file would fail later, or serve the wrong thing).
pub(super) fn check_activated_fd(fd: std::os::fd::RawFd) -> Result<(), String> {
    let int_opt = |opt: libc::c_int| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(format!(
                "the passed descriptor {fd} is not a socket ({})",
                std::io::Error::last_os_error()
            ))
        }
    };
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err(format!(
            "the passed socket (fd {fd}) is not a Unix socket: use ListenStream=/path in imlinkd.socket"
        ));
    }
    if int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(format!(
            "the passed socket (fd {fd}) is not a stream socket: use ListenStream="
        ));
    }
    if int_opt(libc::SO_ACCEPTCONN)? != 1 {
        return Err(format!("the passed socket (fd {fd}) is not listening"));
    }
    Ok(())
}

/// The peer's supplementary groups, as the kernel recorded them at connect time
/// (`SO_PEERGROUPS`, Linux 4.13+): no /proc lookup, so no race with pid reuse, and it works
/// under `ProtectProc=invisible`.
pub(super) fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0u32; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which is that large.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<u32>();
        if r == 0 {
            groups.truncate(n);
            return groups;
        }
        // ERANGE: `len` now says how much room is needed.
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "SO_PEERGROUPS is not available ({err}): api.operator_gids match only a \
                 client's primary group"
            );
        }
        break;
    }
    Vec::new()
}

/// Remove the socket file on exit (when we created it).
pub fn cleanup(path: Option<&Path>) {
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}
