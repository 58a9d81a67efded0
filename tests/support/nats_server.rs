//! `nats-server` processes of a test's own, for fault tests: one server, or a 3-node
//! JetStream cluster on loopback, each node on free ports with its own store directory,
//! killed with SIGKILL and restarted on the same ports and store, as a crashed server is.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The server binary the fault tests start: `NATS_SERVER_BIN` (`scripts/test` sets it),
/// else `nats-server` on the PATH.
pub fn server_binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN").map_or_else(|| PathBuf::from("nats-server"), PathBuf::from)
}

/// A running (or killed) server of one test.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    /// The monitoring port of a cluster node: ready means `/healthz` answers ok there.
    monitor: Option<u16>,
    dir: PathBuf,
    args: Vec<OsString>,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

impl NatsServer {
    /// Starts a server with JetStream on a free port, its store in a fresh directory.
    ///
    /// # Panics
    ///
    /// When the binary cannot be started or does not listen.
    pub async fn start() -> NatsServer {
        let dir = fresh_dir();
        let port = free_port();
        let args = vec![
            "-js".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string().into(),
            "-sd".into(),
            dir.join("store").into_os_string(),
        ];
        let mut server = NatsServer {
            port,
            monitor: None,
            dir,
            args,
            child: None,
        };
        server.restart().await;
        server
    }

    /// The URL clients connect to (the same across restarts).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL, as a crash does, and waits until it is gone.
    ///
    /// # Panics
    ///
    /// When it is not running.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the server runs");
        child.kill().await.expect("kills the server");
    }

    /// Starts the server again on the same port and store.
    ///
    /// # Panics
    ///
    /// When it does not start listening.
    pub async fn restart(&mut self) {
        self.spawn();
        match self.monitor {
            None => self.wait_until("listening", 200, listens(self.port)).await,
            Some(_) => self.wait_healthy().await,
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the server runs already");
        // Appended to: a restarted node's log keeps what it said before the crash.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("a log file");
        let child = Command::new(server_binary())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start {} (set NATS_SERVER_BIN; scripts/test does): {error}",
                    server_binary().display()
                )
            });
        self.child = Some(child);
    }

    /// Waits until this cluster node reports itself healthy: JetStream on, the meta
    /// group led, and every stream and consumer replica it holds caught up with its
    /// leader (the server's `/healthz`).
    ///
    /// # Panics
    ///
    /// When it is not healthy within a minute, or is not a cluster node.
    pub async fn wait_healthy(&self) {
        let monitor = self.monitor.expect("a cluster node");
        self.wait_until("healthy", 2_400, healthz(monitor)).await;
    }

    /// Whether this server runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    // Bounded polling for a process's readiness: a start-up condition of a process
    // outside the test, not a synchronisation between the test's own tasks.
    async fn wait_until<F, Fut>(&self, what: &str, tries: u32, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        for _ in 0..tries {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "nats-server on {} is not {what}; its log: {}",
            self.port,
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }
}

fn fresh_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "eventcore-nats-fault-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("a store directory");
    dir
}

fn listens(
    port: u16,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
    move || {
        Box::pin(async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
    }
}

/// `GET /healthz` on a monitoring port answers `{"status":"ok"}`.
fn healthz(
    port: u16,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
    move || {
        Box::pin(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return false;
            };
            let request = "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
            if socket.write_all(request.as_bytes()).await.is_err() {
                return false;
            }
            let mut answer = String::new();
            socket.read_to_string(&mut answer).await.is_ok()
                && answer.starts_with("HTTP/1.0 200")
                && answer.contains(r#""status":"ok""#)
        })
    }
}

/// A 3-node JetStream cluster on loopback: nodes `n0`, `n1`, `n2`, each with its own
/// client, cluster and monitoring ports and store directory, routes to all three.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, by index (`n0` is `nodes[0]`).
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts the three nodes and waits until each is healthy.
    ///
    /// # Panics
    ///
    /// When a node cannot be started or does not become healthy.
    pub async fn start() -> NatsCluster {
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes = ports
            .iter()
            .map(|(_, cluster, _)| format!("nats-route://127.0.0.1:{cluster}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (n, &(port, cluster, monitor)) in ports.iter().enumerate() {
            let dir = fresh_dir();
            let conf = dir.join("node.conf");
            let store = dir.join("store");
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{n}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: eventcore, listen: 127.0.0.1:{cluster}, routes: [{routes}] }}\n",
                    store.display()
                ),
            )
            .expect("writes the node's configuration");
            nodes.push(NatsServer {
                port,
                monitor: Some(monitor),
                dir,
                args: vec!["-c".into(), conf.into_os_string()],
                child: None,
            });
        }
        // All three start before any is waited for: a node is healthy only with a
        // meta-group leader, which needs a quorum.
        for node in &mut nodes {
            node.spawn();
        }
        for node in &nodes {
            node.wait_healthy().await;
        }
        NatsCluster { nodes }
    }

    /// The client URLs of all three nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The index of the node named `name` (`n0`, `n1`, `n2`).
    ///
    /// # Panics
    ///
    /// For another name.
    pub fn index_of(&self, name: &str) -> usize {
        name.strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .filter(|n: &usize| *n < self.nodes.len())
            .unwrap_or_else(|| panic!("no node {name}"))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
