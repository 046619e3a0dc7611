//! A client connection's socket as revocation reaches it: revoking an
//! HTTP/1.1 session resets its socket from the revocation path itself, so
//! that the client sees the close within the revocation's own loop instead
//! of after 10,000 connection tasks have been woken and scheduled to do it.
//!
//! What must always hold: the descriptor number a [`SocketHandle`] holds is
//! open whenever it is armed. The connection disarms it (under the same
//! lock) before it closes its socket, and an abort never closes the number:
//! it sets `SO_LINGER` 0 and puts `/dev/null` in the socket's place with
//! `dup2`, which releases the socket (the peer gets a reset) while the
//! number stays open until the connection task closes it as usual. Its
//! socket calls then fail (`ENOTSOCK`), and nothing reaches anyone.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// One connection's socket, armed while the connection task owns it.
#[derive(Debug, Default)]
pub struct SocketHandle {
    fd: Mutex<Option<RawFd>>,
}

impl SocketHandle {
    /// Lets revocation reset `fd`. The caller must disarm it before `fd` is
    /// closed.
    pub fn arm(&self, fd: RawFd) {
        *self.lock() = Some(fd);
    }

    /// Called before the socket is closed: from now on, [`abort`] does
    /// nothing (and waits for an abort under way to finish).
    ///
    /// [`abort`]: SocketHandle::abort
    pub fn disarm(&self) {
        *self.lock() = None;
    }

    /// Resets the socket now, if it is still armed (once: it is disarmed
    /// by this). Returns whether it was.
    pub fn abort(&self) -> bool {
        let mut fd = self.lock();
        let Some(raw) = fd.take() else {
            return false;
        };
        // SAFETY: an armed number is open: `disarm` runs under this lock
        // before the connection closes its socket, and nothing here closes it.
        let socket = unsafe { BorrowedFd::borrow_raw(raw) };
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_linger(Some(Duration::ZERO));
        match dev_null() {
            Some(null) => {
                // SAFETY: both numbers are open (`null` for the life of the
                // process); `dup2` closes the socket's file under `raw` and
                // leaves `raw` open on /dev/null, for its owner to close.
                let replaced = unsafe { libc::dup2(null.as_raw_fd(), raw) };
                if replaced < 0 {
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
            }
            // No /dev/null: a FIN now, the reset when the task closes it.
            None => {
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<RawFd>> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `/dev/null`, opened once for the life of the process.
fn dev_null() -> Option<&'static File> {
    static NULL: OnceLock<Option<File>> = OnceLock::new();
    NULL.get_or_init(|| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .ok()
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn an_abort_resets_the_peer_and_keeps_the_number_open() {
        let (mut client, mut server) = pair();
        let handle = SocketHandle::default();
        handle.arm(server.as_raw_fd());
        assert!(handle.abort());
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
        // The number is still open (on /dev/null): a new descriptor gets
        // another one, and the owner's socket calls fail.
        let other = File::open("/dev/null").unwrap();
        assert_ne!(other.as_raw_fd(), server.as_raw_fd());
        assert!(server.write(b"late").is_err());
        assert!(server.read(&mut buf).is_err());
        // Once only.
        assert!(!handle.abort());
    }

    #[test]
    fn a_disarmed_handle_leaves_the_socket_alone() {
        let (mut client, mut server) = pair();
        let handle = SocketHandle::default();
        handle.arm(server.as_raw_fd());
        handle.disarm();
        assert!(!handle.abort());
        server.write_all(b"still here").unwrap();
        let mut buf = [0u8; 10];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still here");
    }
}
