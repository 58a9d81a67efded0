//! Requests no backend may accept are refused, with a typed error, before anything is
//! written.

use super::*;

/// Requests with no stream, a stream twice, or an event id twice are refused before
/// anything is written.
pub async fn invalid_append_requests_are_refused(store: impl EventStore) {
    let s = stream("invalid");
    assert!(matches!(
        store.append(AppendRequest::new()).await,
        Err(Error::InvalidAppend { .. })
    ));
    let twice = AppendRequest::new()
        .with_stream(StreamAppend::new(
            s.clone(),
            ExpectedVersion::Any,
            vec![added(1)],
        ))
        .with_stream(StreamAppend::new(
            s.clone(),
            ExpectedVersion::Any,
            vec![added(2)],
        ));
    assert!(matches!(
        store.append(twice).await,
        Err(Error::InvalidAppend { .. })
    ));
    let event = added(1);
    let same_id =
        AppendRequest::single(s.clone(), ExpectedVersion::Any, vec![event.clone(), event]);
    assert!(matches!(
        store.append(same_id).await,
        Err(Error::InvalidAppend { .. })
    ));
    assert!(read_everything(&store).await.is_empty());
}

/// A NUL character in a payload or in metadata is refused with a typed error before
/// anything is written (PostgreSQL cannot store it, so no backend may accept it); an
/// escaped backslash followed by `u0000` is ordinary text and is stored.
pub async fn nul_characters_are_refused_before_anything_is_written(store: impl EventStore) {
    let s = stream("nul");
    assert!(matches!(
        EventPayload::from_json(r#"{"text":"a\u0000b"}"#),
        Err(Error::InvalidPayload { .. })
    ));
    let nul_text = ConformanceEvent::Noted {
        text: "a\0b".to_owned(),
    };
    assert!(matches!(
        EventData::from_event(&nul_text, EventMetadata::default()),
        Err(Error::InvalidPayload { .. })
    ));
    let bad_actor = EventData::from_event(
        &ConformanceEvent::Added { value: 1 },
        EventMetadata::default().with_actor("ro\0ot"),
    )
    .expect("the payload is fine");
    let refused = append_to(&store, &s, ExpectedVersion::Any, vec![added(1), bad_actor]).await;
    assert!(
        matches!(refused, Err(Error::InvalidMetadata { .. })),
        "{refused:?}"
    );
    let bad_custom = EventData::from_event(
        &ConformanceEvent::Added { value: 1 },
        EventMetadata::default().with_custom("deep", serde_json::json!({"list": ["x\0"]})),
    )
    .expect("the payload is fine");
    let refused = append_to(&store, &s, ExpectedVersion::Any, vec![bad_custom]).await;
    assert!(
        matches!(refused, Err(Error::InvalidMetadata { .. })),
        "{refused:?}"
    );
    assert!(read_everything(&store).await.is_empty());

    let harmless = EventPayload::from_json(r#"{"Noted":{"text":"\\u0000"}}"#).expect("no NUL");
    let data = EventData::new(
        EventType::try_new("Noted").expect("valid"),
        harmless,
        EventMetadata::default(),
    );
    append_to(&store, &s, ExpectedVersion::Any, vec![data])
        .await
        .expect("stored");
    let (events, _) = read(&store, &s).await;
    let decoded = events[0].decode::<ConformanceEvent>().expect("decodes");
    assert_eq!(
        decoded.payload,
        ConformanceEvent::Noted {
            text: "\\u0000".to_owned()
        }
    );
}

/// Bad stream ids never reach a store: construction refuses them with a typed error.
pub async fn invalid_stream_ids_are_rejected_at_construction(store: impl EventStore) {
    for bad in [
        String::new(),
        "x".repeat(256),
        "tab\there".to_owned(),
        "nul\0".to_owned(),
    ] {
        assert!(
            StreamId::try_new(bad.as_str()).is_err(),
            "{bad:?} must be rejected"
        );
    }
    let longest = "y".repeat(255);
    let s = StreamId::try_new(longest.as_str()).expect("255 bytes is allowed");
    append_to(&store, &s, ExpectedVersion::NoStream, vec![added(1)])
        .await
        .expect("append");
    assert_eq!(read(&store, &s).await.0[0].stream_id.as_str(), longest);
}
