//! Published ports: a TCP listener in the daemon's network namespace per mapping; each
//! accepted connection is joined to a connection to `127.0.0.1:<sandbox_port>` made with a
//! socket of the sandbox's namespace (so it works without a veth, in `none` mode too).
//!
//! The sandbox decides how long a connection lives (its service may hold every connection
//! open and never answer), so what they cost the daemon is bounded: [`CONNS`] at once per
//! sandbox across all its published ports, and [`ALL_CONNS`] for the whole daemon (two
//! descriptors each; fewer when its limit of open files is low); a connection beyond either is accepted and closed at once.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::{NetError, PortMap};

/// Connections one sandbox's published ports carry at once (all of them together).
pub(crate) const CONNS: usize = 1024;
/// How long the connection into the sandbox may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a sandbox may stay silent on a connection whose client has finished sending.
pub(crate) const LINGER: Duration = Duration::from_secs(10);
/// Connections every sandbox's published ports carry at once, at most; less when the
/// daemon's soft limit of open files is low: a quarter of it (two descriptors each, so half
/// of the daemon's descriptors stay for everything else).
pub(crate) const ALL_CONNS: usize = 4096;

fn all_slots() -> &'static Semaphore {
    static SLOTS: std::sync::OnceLock<Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        Semaphore::new(ALL_CONNS.min(usize::try_from(soft / 4).unwrap_or(ALL_CONNS)))
    })
}

/// What runs for each accepted connection before it is joined to the sandbox: given the
/// sandbox's id, it resolves (once the sandbox can answer) to a guard held for as long as
/// the connection lasts.
pub type ConnHook = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn Future<Output = Box<dyn Send>> + Send>> + Send + Sync,
>;

/// Binds every mapping (all or none) and starts their accept loops.
pub(crate) fn start_all(
    rt: &tokio::runtime::Handle,
    netns: &Path,
    ports: &[PortMap],
    id: &str,
    hook: Option<ConnHook>,
) -> Result<Vec<tokio::task::AbortHandle>, NetError> {
    let mut listeners = Vec::new();
    for p in ports {
        let err = |source| NetError::Port {
            bind: p.bind,
            port: p.host_port,
            source,
        };
        let l = std::net::TcpListener::bind(SocketAddr::new(p.bind, p.host_port)).map_err(err)?;
        l.set_nonblocking(true).map_err(err)?;
        listeners.push((l, *p));
    }
    let _guard = rt.enter();
    let mut tasks = Vec::new();
    let slots = Arc::new(Semaphore::new(CONNS));
    for (l, p) in listeners {
        let l = tokio::net::TcpListener::from_std(l).map_err(|source| NetError::Port {
            bind: p.bind,
            port: p.host_port,
            source,
        })?;
        let ns = netns.to_path_buf();
        tasks.push(
            rt.spawn(accept_loop(
                l,
                ns,
                p.sandbox_port,
                slots.clone(),
                id.to_string(),
                hook.clone(),
            ))
            .abort_handle(),
        );
    }
    Ok(tasks)
}

async fn accept_loop(
    l: tokio::net::TcpListener,
    netns: PathBuf,
    port: u16,
    slots: Arc<Semaphore>,
    id: String,
    hook: Option<ConnHook>,
) {
    // Connections are children of this task's JoinSet: aborting the loop ends them too.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = l.accept() => {
                let Ok((outside, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let Ok(all) = all_slots().try_acquire() else {
                    continue;
                };
                let ns = netns.clone();
                let woken = hook.as_ref().map(|h| h(id.clone()));
                conns.spawn(async move {
                    let _permits = (permit, all);
                    // Held while the connection lasts (the sandbox is in use meanwhile).
                    let _in_use = match woken {
                        Some(w) => Some(w.await),
                        None => None,
                    };
                    // Only the socket is made on a thread in the sandbox's namespace (a
                    // short one: setns and socket); the connect is asynchronous, so a service
                    // that never accepts holds no thread of the daemon.
                    let Ok(socket) = socket_inside(&ns) else {
                        return;
                    };
                    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
                    let Ok(Ok(inside)) = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to)).await else {
                        return;
                    };
                    join(outside, inside).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Carries one connection both ways until both sides have closed it; except that once the
/// client has finished sending, the sandbox may stay silent for at most [`LINGER`] at a time
/// (it may answer for as long as it sends): a sandbox cannot keep a descriptor of the daemon
/// for every client that left.
async fn join(outside: tokio::net::TcpStream, inside: tokio::net::TcpStream) {
    let (mut out_r, mut out_w) = outside.into_split();
    let (mut in_r, mut in_w) = inside.into_split();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let up = async move {
        let _ = tokio::io::copy(&mut out_r, &mut in_w).await;
        let _ = in_w.shutdown().await;
        let _ = done_tx.send(true);
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let client_done = *done_rx.borrow();
            let read = if client_done {
                match tokio::time::timeout(LINGER, in_r.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    r = in_r.read(&mut buf) => r,
                    // Read again, now with the limit (a TCP read is cancel-safe).
                    _ = done_rx.changed() => continue,
                }
            };
            match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = out_w.shutdown().await;
    };
    tokio::join!(up, down);
}

/// A TCP socket of the sandbox's namespace at `netns` (made on a thread of its own there).
fn socket_inside(netns: &Path) -> Result<tokio::net::TcpSocket, NetError> {
    let ns = netns.to_path_buf();
    crate::plumb::on_thread(move || {
        crate::plumb::enter_netns(&ns)?;
        tokio::net::TcpSocket::new_v4().map_err(|source| NetError::Os {
            what: "making a socket in the sandbox".into(),
            source,
        })
    })
}
