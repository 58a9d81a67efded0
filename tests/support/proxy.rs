//! A TCP proxy between a store and PostgreSQL that can lose an answer on purpose: the
//! statement reaches the server and commits, its answer never reaches the client, and
//! (optionally) the server stays unreachable afterwards, as after a crash.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with the next answer to a statement that returned one row: the
/// chunk of bytes carrying the server's `CommandComplete` (`SELECT 1`). PostgreSQL sends
/// it, for a statement outside an explicit transaction, only after the commit (output is
/// flushed at `Sync`, after the implicit transaction ended), so a cut there loses the
/// answer of a statement that committed. Earlier answers (a ping, a `Describe`) pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Drops every connection on the next answer; new connections are accepted.
    Answer,
    /// Drops every connection on the next answer and refuses new ones until
    /// [`Proxy::heal`].
    AnswerAndServer,
}

struct State {
    upstream: SocketAddr,
    armed: parking_lot::Mutex<Option<Cut>>,
    refusing: AtomicBool,
    /// Bumped to drop every open connection.
    kill: watch::Sender<u64>,
    /// Answers dropped so far.
    cuts: AtomicUsize,
}

/// A proxy listening on 127.0.0.1, forwarding to `upstream`. Dropped with the runtime.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Starts a proxy in front of `upstream`.
    ///
    /// # Panics
    ///
    /// When no local port can be bound.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            upstream,
            armed: parking_lot::Mutex::new(None),
            refusing: AtomicBool::new(false),
            kill: watch::Sender::new(0),
            cuts: AtomicUsize::new(0),
        });
        let accept_state = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accept_state.refusing.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                tokio::spawn(pump(client, accept_state.clone()));
            }
        });
        Proxy { addr, state }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms the proxy: the next answer from the server is dropped as `cut` says.
    pub fn arm(&self, cut: Cut) {
        *self.state.armed.lock() = Some(cut);
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.state.refusing.store(false, Ordering::SeqCst);
    }

    /// How many answers were dropped.
    pub fn cuts(&self) -> usize {
        self.state.cuts.load(Ordering::SeqCst)
    }
}

async fn pump(mut client: TcpStream, state: Arc<State>) {
    let Ok(mut server) = TcpStream::connect(state.upstream).await else {
        return;
    };
    let mut killed = state.kill.subscribe();
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut up = [0_u8; 16 * 1024];
    let mut down = [0_u8; 16 * 1024];
    loop {
        tokio::select! {
            _ = killed.changed() => return,
            read = client_read.read(&mut up) => {
                let Ok(n @ 1..) = read else { return };
                if server_write.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            read = server_read.read(&mut down) => {
                let Ok(n @ 1..) = read else { return };
                let cut = if contains(&down[..n], b"SELECT 1\0") {
                    state.armed.lock().take()
                } else {
                    None
                };
                if let Some(cut) = cut {
                    if cut == Cut::AnswerAndServer {
                        state.refusing.store(true, Ordering::SeqCst);
                    }
                    state.cuts.fetch_add(1, Ordering::SeqCst);
                    state.kill.send_modify(|generation| *generation += 1);
                    return;
                }
                if client_write.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
