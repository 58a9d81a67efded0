//! The endpoints of a running service, scraped over a real loopback socket: `/metrics`
//! renders what the process's commands recorded (Prometheus installed as the global
//! recorder: this binary has only this test), `/health` answers, `/ready` follows the
//! health report: 200 when up or degraded, 503 when a component is down.

use std::sync::Arc;

use eventcore::health::{CheckpointLag, HealthChecks, StoreHealth};
use eventcore::testing::SwitchedCheck;
use eventcore::{
    Command, CommandExecutor, CommandLogic, CommandResult, Event, ProjectionName, ReadStreams,
    StoredEvent, StreamId, StreamResolver, StreamWrite,
};
use eventcore_http::{Endpoints, PROMETHEUS_CONTENT_TYPE, install_prometheus};
use eventcore_memory::InMemoryEventStore;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum Counted {
    Ticked,
}

/// Appends one event to its stream.
#[derive(Debug, Clone, Command)]
struct Tick {
    #[stream]
    counter: StreamId,
}

impl CommandLogic for Tick {
    type State = ();
    type Event = Counted;

    fn apply(&self, _: &mut (), _: &StoredEvent<Counted>) {}

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        (): (),
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Counted>>> {
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.counter.clone(),
            Counted::Ticked,
        )?])
    }
}

/// One HTTP/1.1 GET over a new connection: (status, content type, body).
async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connects");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    socket
        .write_all(request.as_bytes())
        .await
        .expect("sends the request");
    let mut answer = String::new();
    socket
        .read_to_string(&mut answer)
        .await
        .expect("reads the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let content_type = lines
        .filter_map(|line| line.split_once(": "))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.to_owned())
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[tokio::test]
async fn a_running_service_is_scraped_and_probed_over_loopback() {
    let prometheus = install_prometheus().expect("the first recorder of this process");
    let store = InMemoryEventStore::new();
    let executor = CommandExecutor::new(store.clone());
    let counter = StreamId::try_new("counter-1").expect("valid");
    for _ in 0..3 {
        executor
            .execute(&Tick {
                counter: counter.clone(),
            })
            .await
            .expect("ticks");
    }

    let broker = SwitchedCheck::new("broker", true);
    let view = ProjectionName::try_new("tick-view").expect("valid");
    let health = HealthChecks::new("ticker")
        .with_check(StoreHealth::new(Arc::new(store.clone())))
        .with_check(
            CheckpointLag::new(
                view.clone(),
                Arc::new(store.clone()),
                Arc::new(store.clone()),
            )
            .with_max_positions(2),
        )
        .with_check(broker.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let address = listener.local_addr().expect("bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Endpoints::new(health).with_prometheus(prometheus).serve(
        listener,
        async {
            let _ = stopped.await;
        },
    ));

    let (status, content_type, body) = get(address, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, PROMETHEUS_CONTENT_TYPE);
    let command = std::any::type_name::<Tick>();
    for line in [
        format!("eventcore_commands_total{{command=\"{command}\",outcome=\"success\"}} 3"),
        format!("eventcore_events_appended_total{{command=\"{command}\"}} 3"),
        format!("eventcore_command_duration_seconds_count{{command=\"{command}\"}} 3"),
        format!("eventcore_command_duration_seconds_bucket{{command=\"{command}\",le=\"+Inf\"}} 3"),
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "/metrics has no line {line:?}:\n{body}"
        );
    }
    assert!(
        body.lines()
            .any(|l| l.starts_with("# TYPE eventcore_command_duration_seconds histogram")),
        "durations are a Prometheus histogram:\n{body}"
    );
    println!("/metrics excerpt:");
    for line in body
        .lines()
        .filter(|l| l.contains("eventcore_commands_total"))
    {
        println!("  {line}");
    }

    let (status, _, body) = get(address, "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // Three positions behind, over the limit of two: degraded, and still ready.
    let (status, content_type, body) = get(address, "/ready").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "application/json");
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(report["service"], "ticker");
    assert_eq!(report["status"], "degraded", "{report}");
    let components = report["components"].as_array().expect("components");
    assert_eq!(components[0]["name"], "store");
    assert_eq!(components[0]["status"], "up");
    assert_eq!(components[1]["name"], "projection tick-view");
    assert_eq!(components[1]["status"], "degraded");
    assert_eq!(components[1]["lag_positions"], 3);
    assert_eq!(components[2]["status"], "up");

    // The projection catches up; the broker goes down: not ready.
    eventcore::CheckpointStore::save_checkpoint(&store, &view, eventcore::GlobalPosition::new(3))
        .await
        .expect("saved");
    broker.set_up(false);
    let (status, _, body) = get(address, "/ready").await;
    assert_eq!(status, 503, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(report["status"], "down", "{report}");
    let components = report["components"].as_array().expect("components");
    assert_eq!(components[1]["status"], "up", "caught up: {report}");
    assert_eq!(components[1]["lag_positions"], 0);
    assert_eq!(components[2]["status"], "down");
    assert_eq!(components[2]["detail"], "switched down by the test");

    // Back up: ready again.
    broker.set_up(true);
    let (status, _, body) = get(address, "/ready").await;
    assert_eq!(status, 200, "{body}");

    stop.send(()).expect("the server waits");
    server
        .await
        .expect("no panic")
        .expect("the server shuts down cleanly");
}
