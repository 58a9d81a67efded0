//! NATS test support: a prefix per test, so tests sharing a server never see each
//! other's streams, and a broker crash that loses the end of a publication.

use async_nats::jetstream;
use eventcore::distributed::ServiceId;
use eventcore_nats::{NatsConfig, NatsTransport};
use futures::TryStreamExt;

/// The server the NATS tests use.
///
/// # Panics
///
/// When NATS_URL is not set: the tests calling this are compiled as ignored then, so
/// reaching this without it is a broken set-up.
pub fn nats_url() -> String {
    std::env::var("NATS_URL")
        .expect("NATS_URL must be set to run the NATS tests (scripts/test sets it)")
}

/// A subject prefix no other test uses.
pub fn fresh_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}", &id[..24])
}

/// A transport on the test server under a fresh prefix.
///
/// # Panics
///
/// When the server cannot be reached.
pub async fn fresh_transport() -> NatsTransport {
    let client = async_nats::connect(nats_url())
        .await
        .expect("connect to NATS_URL");
    let config = NatsConfig::default()
        .with_prefix(fresh_prefix())
        .expect("valid prefix");
    NatsTransport::new(client, config)
}

/// A broker crash and restart in which `service`'s publication stream loses its last
/// `messages` messages, as a server that acknowledged them before syncing them to disk
/// does: the stream is rebuilt with the messages that survived (same subjects, headers
/// and bodies, same sequences), and each of its consumers resumes after what it had
/// acknowledged, at most the new end, with nothing in flight.
///
/// # Panics
///
/// When the server refuses any step.
pub async fn lose_last_messages(transport: &NatsTransport, service: &ServiceId, messages: usize) {
    let context = transport.context();
    let name = transport.config().stream_name(service);
    let mut stream = context.get_stream(&name).await.expect("the stream exists");
    let info = stream.info().await.expect("stream info").clone();
    let keep = info.state.last_sequence.saturating_sub(messages as u64);
    let mut kept = Vec::new();
    for sequence in info.state.first_sequence.max(1)..=keep {
        kept.push(
            stream
                .get_raw_message(sequence)
                .await
                .expect("a stored message"),
        );
    }
    let consumers: Vec<jetstream::consumer::Info> = stream
        .consumers()
        .try_collect()
        .await
        .expect("the consumers");
    context.delete_stream(&name).await.expect("deletes");
    context
        .create_stream(info.config.clone())
        .await
        .expect("recreates");
    for message in kept {
        let sequence = message.sequence;
        let ack = context
            .publish_with_headers(message.subject.clone(), message.headers, message.payload)
            .await
            .expect("republishes")
            .await
            .expect("stored again");
        assert_eq!(ack.sequence, sequence, "the survivors keep their sequences");
    }
    let stream = context.get_stream(&name).await.expect("the stream exists");
    for consumer in consumers {
        let mut config = consumer.config.clone();
        let resume = consumer.ack_floor.stream_sequence.min(keep) + 1;
        config.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: resume,
        };
        stream
            .create_consumer(config)
            .await
            .expect("recreates the consumer");
    }
}

/// Rebuilds `service`'s publication stream with every message passed through
/// `rewrite` (its headers and body, in place), as a relay between the services would:
/// same subjects and sequences. Call it before any consumer exists.
///
/// # Panics
///
/// When the server refuses any step, or the stream has consumers.
pub async fn rewrite_messages(
    transport: &NatsTransport,
    service: &ServiceId,
    mut rewrite: impl FnMut(&mut async_nats::HeaderMap, &mut bytes::Bytes),
) {
    let context = transport.context();
    let name = transport.config().stream_name(service);
    let mut stream = context.get_stream(&name).await.expect("the stream exists");
    let info = stream.info().await.expect("stream info").clone();
    assert_eq!(info.state.consumer_count, 0, "rewrite before subscribing");
    let mut messages = Vec::new();
    for sequence in info.state.first_sequence.max(1)..=info.state.last_sequence {
        messages.push(
            stream
                .get_raw_message(sequence)
                .await
                .expect("a stored message"),
        );
    }
    context.delete_stream(&name).await.expect("deletes");
    context
        .create_stream(info.config.clone())
        .await
        .expect("recreates");
    for message in messages {
        let (mut headers, mut payload) = (message.headers, message.payload);
        rewrite(&mut headers, &mut payload);
        let ack = context
            .publish_with_headers(message.subject.clone(), headers, payload)
            .await
            .expect("republishes")
            .await
            .expect("stored again");
        assert_eq!(ack.sequence, message.sequence, "same sequences");
    }
}

/// The (event id, source position) of every message `service`'s publication stream
/// holds, in stream order.
///
/// # Panics
///
/// When the server refuses a read or a message has no position header.
pub async fn published(transport: &NatsTransport, service: &ServiceId) -> Vec<(String, u64)> {
    let context = transport.context();
    let mut stream = context
        .get_stream(transport.config().stream_name(service))
        .await
        .expect("the stream exists");
    let state = stream.info().await.expect("stream info").state.clone();
    let mut held = Vec::new();
    for sequence in state.first_sequence.max(1)..=state.last_sequence {
        let message = stream
            .get_raw_message(sequence)
            .await
            .expect("a stored message");
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_else(|| panic!("message {sequence} has no {name}"))
        };
        held.push((
            header("Nats-Msg-Id"),
            header("Eventcore-Global-Position")
                .parse()
                .expect("a position"),
        ));
    }
    held
}
