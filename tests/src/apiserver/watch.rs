//! Watch responses: newline-delimited JSON events in a chunked body, with the initial
//! state, bookmarks, the server-side timeout and forced closes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

use super::nodes::lock;
use super::selector::Filter;
use super::server::{Body, Shared};
use super::store::{event_line, Event, EventType, Registration};

/// What a watch request asked for, once validated.
pub(crate) struct WatchOptions {
    pub filter: Filter,
    pub bookmarks: bool,
    pub timeout: Duration,
    /// Streaming list (`sendInitialEvents=true`): end the initial events with a bookmark
    /// annotated `k8s.io/initial-events-end`.
    pub initial_events_end: bool,
}

/// Bytes buffered before a chunk is written while sending the initial state.
const CHUNK_SIZE: usize = 64 * 1024;
/// Events taken from the queue into one chunk at most.
const EVENTS_PER_CHUNK: usize = 512;

/// Starts the task feeding watch `registration` and returns the response body it fills.
pub(crate) fn body(shared: Arc<Shared>, registration: Registration, options: WatchOptions) -> Body {
    let (chunks, mut receiver) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let id = registration.id;
        run(&shared, registration, options, chunks).await;
        lock(&shared.store).unwatch(id);
    });
    let stream = futures::stream::poll_fn(move |cx| {
        receiver
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))))
    });
    StreamBody::new(stream).boxed_unsync()
}

/// A BOOKMARK event at `rv`.
fn bookmark_line(rv: u64, initial_events_end: bool) -> Bytes {
    let annotations = if initial_events_end {
        r#","annotations":{"k8s.io/initial-events-end":"true"}"#
    } else {
        ""
    };
    let object = format!(
        r#"{{"kind":"Node","apiVersion":"v1","metadata":{{"resourceVersion":"{rv}","creationTimestamp":null{annotations}}}}}"#
    );
    event_line("BOOKMARK", object.as_bytes())
}

/// The line `filter` makes of `event`: an object entering the selection is ADDED, one
/// leaving it DELETED (kube-apiserver's rule), others pass or vanish.
fn filtered_line(filter: &Filter, event: &Event) -> Option<Bytes> {
    if filter.is_empty() {
        return Some(event.line.clone());
    }
    let now = filter.matches(&event.object.value);
    let before = event
        .prev
        .as_ref()
        .is_some_and(|prev| filter.matches(&prev.value));
    let kind = match (event.kind, before, now) {
        (EventType::Deleted, true, _) => EventType::Deleted,
        (EventType::Deleted, false, _) => return None,
        (_, true, true) => event.kind,
        (_, false, true) => EventType::Added,
        (_, true, false) => EventType::Deleted,
        (_, false, false) => return None,
    };
    if kind == event.kind {
        Some(event.line.clone())
    } else {
        Some(event_line(kind.as_str(), &event.object.json))
    }
}

async fn run(
    shared: &Shared,
    registration: Registration,
    options: WatchOptions,
    chunks: mpsc::Sender<Bytes>,
) {
    let Registration {
        initial,
        backlog,
        rv,
        mut events,
        ..
    } = registration;
    let mut closes = shared.close_watches.subscribe();
    closes.mark_unchanged();
    let deadline = tokio::time::sleep(options.timeout);
    tokio::pin!(deadline);

    let mut buffer = BytesMut::new();
    if let Some(objects) = initial {
        for object in objects.values() {
            if options.filter.matches(&object.value) {
                buffer.extend_from_slice(&event_line("ADDED", &object.json));
                if buffer.len() >= CHUNK_SIZE && chunks.send(buffer.split().freeze()).await.is_err()
                {
                    return;
                }
            }
        }
    }
    for event in &backlog {
        if let Some(line) = filtered_line(&options.filter, event) {
            buffer.extend_from_slice(&line);
        }
    }
    if options.initial_events_end {
        buffer.extend_from_slice(&bookmark_line(rv, true));
    }
    if !buffer.is_empty() && chunks.send(buffer.split().freeze()).await.is_err() {
        return;
    }

    let period = shared.config.bookmark_interval;
    let mut bookmarks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    bookmarks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = closes.changed() => return,
            _ = &mut deadline => return,
            _ = chunks.closed() => return,
            event = events.recv() => {
                let Some(event) = event else {
                    // Dropped by the store for falling behind: the client resumes.
                    return;
                };
                let mut batch = vec![event];
                while batch.len() < EVENTS_PER_CHUNK {
                    match events.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(_) => break,
                    }
                }
                for event in &batch {
                    if let Some(line) = filtered_line(&options.filter, event) {
                        buffer.extend_from_slice(&line);
                    }
                }
                if !buffer.is_empty() && chunks.send(buffer.split().freeze()).await.is_err() {
                    return;
                }
            }
            _ = bookmarks.tick(), if options.bookmarks => {
                // Under the store lock every event up to the current version is queued
                // here, so after draining the queue the current version is a safe bookmark.
                let current = {
                    let store = lock(&shared.store);
                    let mut cut_off = false;
                    loop {
                        match events.try_recv() {
                            Ok(event) => {
                                if let Some(line) = filtered_line(&options.filter, &event) {
                                    buffer.extend_from_slice(&line);
                                }
                            }
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                cut_off = true;
                                break;
                            }
                        }
                    }
                    (!cut_off).then(|| store.resource_version())
                };
                if let Some(rv) = current {
                    buffer.extend_from_slice(&bookmark_line(rv, false));
                }
                if !buffer.is_empty() && chunks.send(buffer.split().freeze()).await.is_err() {
                    return;
                }
                if current.is_none() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn bookmark_lines_parse_as_kube_bookmarks() {
        let line = bookmark_line(42, true);
        let event: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(event["type"], "BOOKMARK");
        assert_eq!(event["object"]["metadata"]["resourceVersion"], "42");
        assert_eq!(
            event["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
            "true"
        );
        assert!(line.ends_with(b"\n"));
    }
}
