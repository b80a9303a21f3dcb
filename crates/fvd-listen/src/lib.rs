//! Listening sockets of the FVD servers, one implementation for every
//! transport (the NBD server in fvd-nbd, the vhost-user-blk backend in
//! fvd-vhost):
//!
//! * [`bind_unix`] — a unix socket file created with mode 0600. A stale
//!   socket file (nobody accepting on it) is replaced; a live one, or
//!   anything that is not a socket, is an error naming the path. The file
//!   is removed when the returned [`SocketFile`] is dropped.
//! * [`Inherited::from_fd`] — a listening socket passed in by the program
//!   that started us (systemd socket activation, `LISTEN_FDS`): unix or
//!   TCP, already bound. An inherited unix socket's file belongs to the
//!   activator and is left in place.
//!
//! The listeners returned are the standard library's, in blocking mode;
//! each server makes them non-blocking and registers them with its own
//! event loop.

use std::io;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The path of a listening unix socket; the file is removed when dropped
/// if this process created it (not when it was inherited).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    owned: bool,
}

impl SocketFile {
    /// The socket's path (empty for an unnamed inherited socket).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listen on a unix socket at `path`, mode 0600 (see the crate docs for
/// what may already be at the path).
pub fn bind_unix(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let live = UnixStream::connect(path).is_ok();
        if live || !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{}: {}",
                    path.display(),
                    if live {
                        "a server is already listening on this socket"
                    } else {
                        "exists and is not a socket"
                    }
                ),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: cannot listen: {e}", path.display())))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        owned: true,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: chmod: {e}", path.display())))?;
    Ok((l, file))
}

/// A listening socket inherited from the process that started us.
#[derive(Debug)]
pub enum Inherited {
    /// A unix socket, with its path (left in place at exit).
    Unix(UnixListener, SocketFile),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Inherited {
    /// Classify the listening socket `fd`: a socket reporting a unix
    /// address is a unix socket, anything else must be a TCP socket.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Inherited> {
        let unix = UnixListener::from(fd);
        if let Ok(addr) = unix.local_addr() {
            let path = addr
                .as_pathname()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            return Ok(Inherited::Unix(unix, SocketFile { path, owned: false }));
        }
        let tcp = TcpListener::from(OwnedFd::from(unix));
        tcp.local_addr().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the inherited descriptor is not a listening socket: {e}"),
            )
        })?;
        Ok(Inherited::Tcp(tcp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_socket_replaces_a_stale_file_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let (l, f) = bind_unix(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = bind_unix(&p).unwrap_err();
        assert!(e.to_string().contains("already listening"), "{e}");
        // Stale: the listener is gone but the file stays.
        drop(l);
        std::mem::forget(f);
        let (_l, f) = bind_unix(&p).unwrap();
        drop(f);
        assert!(!p.exists(), "removed on drop");
        std::fs::write(&p, b"x").unwrap();
        let e = bind_unix(&p).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }

    #[test]
    fn inherited_sockets_are_classified_and_their_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let l = UnixListener::bind(&p).unwrap();
        match Inherited::from_fd(OwnedFd::from(l)).unwrap() {
            Inherited::Unix(_, f) => {
                assert_eq!(f.path(), p);
                drop(f);
                assert!(p.exists(), "an inherited socket file is left in place");
            }
            Inherited::Tcp(_) => panic!("unix socket taken for TCP"),
        }
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = t.local_addr().unwrap();
        match Inherited::from_fd(OwnedFd::from(t)).unwrap() {
            Inherited::Tcp(t) => assert_eq!(t.local_addr().unwrap(), addr),
            Inherited::Unix(..) => panic!("TCP socket taken for unix"),
        }
        let f = std::fs::File::open(dir.path()).unwrap();
        assert!(Inherited::from_fd(OwnedFd::from(f)).is_err());
    }
}
