//! A `nats-server` process of a test's own, for fault tests: started on a free port
//! with its own store directory, killed with SIGKILL and restarted on the same port and
//! store, as a crashed server is.

use std::path::PathBuf;
use std::process::Stdio;

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
    dir: PathBuf,
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
        let dir = std::env::temp_dir().join(format!(
            "eventcore-nats-fault-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a store directory");
        let mut server = NatsServer {
            port: free_port(),
            dir,
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
        assert!(self.child.is_none(), "the server runs already");
        let log = std::fs::File::create(self.dir.join("server.log")).expect("a log file");
        let child = Command::new(server_binary())
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.dir.join("store"))
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
        // Bounded wait for the listener: a start-up condition, not a synchronisation.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!(
            "nats-server did not listen on {}; its log: {}",
            self.port,
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
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
