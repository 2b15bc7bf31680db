//! Where the daemon is and how to reach it: its Unix socket, or TCP with or without TLS.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::rustls;

use crate::ClientError;

/// The daemon's address.
#[derive(Clone)]
pub(crate) enum Endpoint {
    /// A Unix socket.
    Unix(PathBuf),
    /// TCP; TLS with a configuration.
    Tcp {
        host: String,
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp { host, port, tls } => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                write!(f, "{scheme}://{}:{port}", bracketed(host))
            }
        }
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl Endpoint {
    /// Parses `https://HOST[:PORT]`, `http://HOST[:PORT]` (port 7878 by default) or
    /// `unix:///path`.
    pub(crate) fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self, ClientError> {
        let bad = |why: &str| {
            ClientError::Protocol(format!(
                "--host {url:?}: {why} (give https://HOST:PORT, http://127.0.0.1:PORT or unix:///path/api.sock)"
            ))
        };
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("a socket path must be absolute"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("unknown scheme"));
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('@') || authority.is_empty() {
            return Err(bad("give only a host and a port"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, tail) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match tail.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if tail.is_empty() => 7878,
                None => return Err(bad("bad port")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), 7878),
            }
        };
        let tls = if tls {
            Some(client_config(ca_file)?)
        } else {
            None
        };
        Ok(Endpoint::Tcp { host, port, tls })
    }

    /// The `Host` header's value.
    pub(crate) fn host_header(&self) -> String {
        match self {
            Endpoint::Unix(_) => "localhost".into(),
            Endpoint::Tcp { host, port, .. } => format!("{}:{port}", bracketed(host)),
        }
    }

    /// A new connection.
    pub(crate) async fn connect(&self) -> Result<Conn, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            endpoint: self.to_string(),
            source,
        };
        match self {
            Endpoint::Unix(p) => UnixStream::connect(p)
                .await
                .map(Conn::Unix)
                .map_err(unreachable),
            Endpoint::Tcp { host, port, tls } => {
                let tcp = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(unreachable)?;
                let _ = tcp.set_nodelay(true);
                let Some(cfg) = tls else {
                    return Ok(Conn::Tcp(tcp));
                };
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| ClientError::Protocol(format!("{host}: {e}")))?;
                let s = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ClientError::Unreachable {
                        endpoint: format!("{self} (TLS: {e})"),
                        source: e,
                    })?;
                Ok(Conn::Tls(Box::new(s)))
            }
        }
    }
}

/// TLS trusting the web's roots and the certificates of `ca_file`.
fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(f) = ca_file {
        let pem = std::fs::read(f)
            .map_err(|e| ClientError::Protocol(format!("reading {}: {e}", f.display())))?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                ClientError::Protocol(format!("{}: not PEM certificates: {e}", f.display()))
            })?;
            roots.add(cert).map_err(|e| {
                ClientError::Protocol(format!("{}: unusable certificate: {e}", f.display()))
            })?;
            n += 1;
        }
        if n == 0 {
            return Err(ClientError::Protocol(format!(
                "{}: no certificate in it",
                f.display()
            )));
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Protocol(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A connection to the daemon.
pub enum Conn {
    /// Its Unix socket.
    Unix(UnixStream),
    /// TCP in plain text.
    Tcp(TcpStream),
    /// TCP with TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("http://127.0.0.1:9000", None).unwrap();
        assert_eq!(e.to_string(), "http://127.0.0.1:9000");
        assert_eq!(e.host_header(), "127.0.0.1:9000");
        let e = Endpoint::parse("https://[::1]:7", None).unwrap();
        assert_eq!(e.to_string(), "https://[::1]:7");
        let e = Endpoint::parse("https://box.example/", None).unwrap();
        assert_eq!(e.to_string(), "https://box.example:7878");
        let e = Endpoint::parse("unix:///run/x.sock", None).unwrap();
        assert_eq!(e.to_string(), "/run/x.sock");
        for bad in [
            "ftp://x",
            "http://",
            "http://a:b",
            "http://u@h:1",
            "http://h:1/path",
            "unix://rel",
        ] {
            assert!(Endpoint::parse(bad, None).is_err(), "{bad}");
        }
    }
}
