//! The sockets start-up binds (the API's TCP and Unix listeners, the admin listener) and the
//! signal that ends a serving process. Serves nothing: `http::serve` does, on what is bound
//! here.

use std::net::SocketAddr;

use tokio::net::{TcpListener, UnixListener};

use super::error::StartError;
use crate::config::ServerConfig;

/// What start-up bound, before anything is served on it.
pub(super) struct Sockets {
    /// The API's TCP listener; none in a relay process.
    pub api: Option<TcpListener>,
    /// The API's bound address (useful with port 0); a placeholder without a listener.
    pub local: SocketAddr,
    /// `server.admin_listen`'s listener and bound address.
    pub admin: Option<(TcpListener, SocketAddr)>,
    /// `server.listen_unix`'s listener; none in a relay process.
    pub unix: Option<UnixListener>,
}

/// Binds every configured socket: the API's TCP and Unix listeners (only when `serves_api`:
/// a relay process serves the admin listener alone) and the admin listener.
///
/// # Errors
/// [`StartError::Bind`] with the address that cannot be bound.
pub(super) async fn bind_all(
    server: &ServerConfig,
    serves_api: bool,
) -> Result<Sockets, StartError> {
    let (api, local) = if serves_api {
        let (listener, local) = bind(&server.listen).await?;
        (Some(listener), local)
    } else {
        (None, SocketAddr::from(([127, 0, 0, 1], 0)))
    };
    let admin = match &server.admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let unix = match &server.listen_unix {
        Some(path) if serves_api => Some(bind_unix(path, &server.listen_unix_mode)?),
        _ => None,
    };
    if api.is_some() && !local.ip().is_loopback() {
        tracing::warn!(addr = %local, "listening on a non-loopback address: anyone who can reach it can read and write documents");
    }
    Ok(Sockets {
        api,
        local,
        admin,
        unix,
    })
}

async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

/// Binds the Unix socket `path` with file `mode` (octal text, validated): bound under a
/// temporary name, given its mode, then renamed into place, so it is never reachable with
/// the process umask's looser mode. A stale socket at `path` (a previous process's) is
/// replaced; any other file there is an error.
fn bind_unix(path: &str, mode: &str) -> Result<UnixListener, StartError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let failed = |source| StartError::Bind {
        addr: path.to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
    }
    let temporary = format!("{path}.{}", std::process::id());
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary).map_err(failed)?;
    let mode = u32::from_str_radix(mode, 8).unwrap_or(0o600);
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)?;
    Ok(listener)
}

/// Completes on SIGTERM or Ctrl-C.
pub(super) async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
