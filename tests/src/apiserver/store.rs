//! The object store behind the emulator, shaped like etcd plus kube-apiserver's watch
//! cache: one global, monotonically increasing resourceVersion; a bounded history of
//! change events (older versions are "compacted" and answer 410 Gone); consistent
//! snapshots at past versions for paged lists; and fan-out of events to watchers.
//!
//! Objects are kept serialized as well as parsed, so that lists and watch events of
//! thousands of nodes cost a memory copy, not a serialization per reader.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::status::Status;

/// The resource this store holds (the emulator stores nodes only).
pub(crate) const RESOURCE: &str = "nodes";
const KIND: &str = "Node";
const API_VERSION: &str = "v1";

/// One version of an object, with its JSON forms.
#[derive(Debug)]
pub(crate) struct Stored {
    pub name: String,
    pub rv: u64,
    pub value: Value,
    /// The object with kind and apiVersion (GET, watch events).
    pub json: Bytes,
    /// Without kind and apiVersion, as kube-apiserver writes list items.
    pub bare: Bytes,
}

/// Serializes an object's members but kind and apiVersion.
struct Bare<'a>(&'a Map<String, Value>);

impl Serialize for Bare<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in self.0 {
            if key != "kind" && key != "apiVersion" {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

impl Stored {
    /// `value` must be an object whose metadata holds its name and resourceVersion `rv`.
    fn new(mut value: Value, rv: u64) -> Arc<Self> {
        let map = value
            .as_object_mut()
            .expect("stored objects are JSON objects");
        map.insert("kind".into(), KIND.into());
        map.insert("apiVersion".into(), API_VERSION.into());
        let name = object_name(&value).to_string();
        let bare = serde_json::to_vec(&Bare(value.as_object().expect("checked above")))
            .expect("JSON values serialize");
        let mut json = format!(r#"{{"kind":"{KIND}","apiVersion":"{API_VERSION}""#).into_bytes();
        if bare.len() > 2 {
            json.push(b',');
        }
        json.extend_from_slice(&bare[1..]);
        Arc::new(Stored {
            name,
            rv,
            value,
            json: json.into(),
            bare: bare.into(),
        })
    }
}

pub(crate) fn object_name(value: &Value) -> &str {
    value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub(crate) fn set_resource_version(value: &mut Value, rv: u64) {
    if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert("resourceVersion".into(), rv.to_string().into());
    }
}

/// Objects by name, in key order (the order of etcd and of lists).
pub(crate) type Objects = BTreeMap<String, Arc<Stored>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as history keeps it and watchers receive it.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: EventType,
    /// The object after the change (for a deletion: its last state, at the deletion's
    /// resourceVersion).
    pub object: Arc<Stored>,
    /// The object before the change (None for a creation): lets snapshots go back in
    /// time, and selector watches see an object leave their selection.
    pub prev: Option<Arc<Stored>>,
    /// The watch event line, shared by every watcher.
    pub line: Bytes,
}

/// A watch event line: `{"type":...,"object":...}` and a newline.
pub(crate) fn event_line(kind: &str, object_json: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object_json.len() + 32);
    line.extend_from_slice(br#"{"type":""#);
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(br#"","object":"#);
    line.extend_from_slice(object_json);
    line.extend_from_slice(b"}\n");
    line.into()
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum WatchFrom {
    /// At the current version; with `initial`, first an ADDED event per existing object.
    Now { initial: bool },
    /// With the first change after this resourceVersion.
    After(u64),
}

/// A registered watcher: what it must send first, then the live events.
pub(crate) struct Registration {
    pub id: u64,
    /// The state to announce as ADDED events (for `WatchFrom::Now { initial: true }`).
    pub initial: Option<Arc<Objects>>,
    /// Retained events after the requested version.
    pub backlog: Vec<Arc<Event>>,
    /// The version the initial state and backlog lead up to.
    pub rv: u64,
    pub events: mpsc::Receiver<Arc<Event>>,
}

/// Why a past version cannot be read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Unavailable {
    Compacted { oldest: u64 },
    TooLarge { current: u64 },
}

pub(crate) struct Store {
    objects: Arc<Objects>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Every event after this version is in `history`.
    compacted: u64,
    watch_buffer: usize,
    watchers: HashMap<u64, mpsc::Sender<Arc<Event>>>,
    next_watcher: u64,
    /// The last snapshot rebuilt for a paged list, reused by its next pages.
    snapshot_cache: Option<(u64, Arc<Objects>)>,
}

impl Store {
    /// A store keeping the last `history_limit` events; a watcher more than
    /// `watch_buffer` events behind is disconnected (like kube-apiserver's cacher does
    /// with unresponsive watchers) and must resume from its last version.
    pub fn new(history_limit: usize, watch_buffer: usize) -> Self {
        Store {
            objects: Arc::new(Objects::new()),
            rv: 1,
            history: VecDeque::new(),
            history_limit,
            compacted: 1,
            watch_buffer: watch_buffer.max(1),
            watchers: HashMap::new(),
            next_watcher: 0,
            snapshot_cache: None,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, name: &str) -> Option<Arc<Stored>> {
        self.objects.get(name).cloned()
    }

    /// The current objects and version.
    pub fn current(&self) -> (Arc<Objects>, u64) {
        (self.objects.clone(), self.rv)
    }

    /// The objects as they were at version `rv`.
    pub fn snapshot_at(&mut self, rv: u64) -> Result<Arc<Objects>, Unavailable> {
        if rv > self.rv {
            return Err(Unavailable::TooLarge { current: self.rv });
        }
        if rv == self.rv {
            return Ok(self.objects.clone());
        }
        if rv < self.compacted {
            return Err(Unavailable::Compacted {
                oldest: self.compacted,
            });
        }
        if let Some((at, snapshot)) = &self.snapshot_cache {
            if *at == rv {
                return Ok(snapshot.clone());
            }
        }
        let mut objects = (*self.objects).clone();
        for event in self.history.iter().rev().take_while(|e| e.rv > rv) {
            match &event.prev {
                Some(prev) => objects.insert(prev.name.clone(), prev.clone()),
                None => objects.remove(&event.object.name),
            };
        }
        let snapshot = Arc::new(objects);
        self.snapshot_cache = Some((rv, snapshot.clone()));
        Ok(snapshot)
    }

    /// Stores a new object (its metadata must name it); fails if the name is taken.
    pub fn create(&mut self, value: Value, dry_run: bool) -> Result<Arc<Stored>, Status> {
        let name = object_name(&value).to_string();
        if self.objects.contains_key(&name) {
            return Err(Status::already_exists(RESOURCE, &name));
        }
        if dry_run {
            return Ok(Stored::new(value, 0));
        }
        Ok(self.commit(EventType::Added, value, None))
    }

    /// Replaces object `name` by what `change` makes of it. A change that alters nothing
    /// but the resourceVersion is no write: no new version, no event (as kube-apiserver
    /// skips no-op updates).
    pub fn update(
        &mut self,
        name: &str,
        dry_run: bool,
        change: impl FnOnce(&Stored) -> Result<Value, Status>,
    ) -> Result<Arc<Stored>, Status> {
        let current = self
            .get(name)
            .ok_or_else(|| Status::not_found(RESOURCE, name))?;
        let mut value = change(&current)?;
        set_resource_version(&mut value, current.rv);
        let mut before = current.value.clone();
        // Stored values carry kind and apiVersion; compare like with like.
        for key in ["kind", "apiVersion"] {
            if let (Some(b), Some(v)) = (before.as_object_mut(), value.as_object_mut()) {
                b.remove(key);
                v.remove(key);
            }
        }
        if value == before {
            return Ok(current);
        }
        if dry_run {
            return Ok(Stored::new(value, current.rv));
        }
        Ok(self.commit(EventType::Modified, value, Some(current)))
    }

    /// Deletes object `name` once `precondition` accepts its current state.
    pub fn delete(
        &mut self,
        name: &str,
        dry_run: bool,
        precondition: impl FnOnce(&Stored) -> Result<(), Status>,
    ) -> Result<Arc<Stored>, Status> {
        let current = self
            .get(name)
            .ok_or_else(|| Status::not_found(RESOURCE, name))?;
        precondition(&current)?;
        if dry_run {
            return Ok(current);
        }
        Ok(self.commit(EventType::Deleted, current.value.clone(), Some(current)))
    }

    fn commit(
        &mut self,
        kind: EventType,
        mut value: Value,
        prev: Option<Arc<Stored>>,
    ) -> Arc<Stored> {
        self.rv += 1;
        set_resource_version(&mut value, self.rv);
        let stored = Stored::new(value, self.rv);
        let objects = Arc::make_mut(&mut self.objects);
        if kind == EventType::Deleted {
            objects.remove(&stored.name);
        } else {
            objects.insert(stored.name.clone(), stored.clone());
        }
        let event = Arc::new(Event {
            rv: self.rv,
            kind,
            line: event_line(kind.as_str(), &stored.json),
            object: stored.clone(),
            prev,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        // A full or closed channel ends that watch: the client resumes from the last
        // version it saw, or re-lists if that is compacted by then.
        self.watchers
            .retain(|_, sender| sender.try_send(event.clone()).is_ok());
        stored
    }

    /// Registers a watcher starting at `from`.
    pub fn watch(&mut self, from: WatchFrom) -> Result<Registration, Unavailable> {
        let (initial, backlog) = match from {
            WatchFrom::Now { initial } => (initial.then(|| self.objects.clone()), Vec::new()),
            WatchFrom::After(rv) => {
                if rv > self.rv {
                    return Err(Unavailable::TooLarge { current: self.rv });
                }
                if rv < self.compacted {
                    return Err(Unavailable::Compacted {
                        oldest: self.compacted,
                    });
                }
                let backlog = self.history.iter().filter(|e| e.rv > rv).cloned().collect();
                (None, backlog)
            }
        };
        let (sender, events) = mpsc::channel(self.watch_buffer);
        let id = self.next_watcher;
        self.next_watcher += 1;
        self.watchers.insert(id, sender);
        Ok(Registration {
            id,
            initial,
            backlog,
            rv: self.rv,
            events,
        })
    }

    pub fn unwatch(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    pub fn watcher_count(&self) -> usize {
        self.watchers.len()
    }

    /// Forgets all history: from now on only the current version can be watched from
    /// or listed at (like an etcd compaction at the current revision).
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
        self.snapshot_cache = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, label: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"l": label}}})
    }

    #[test]
    fn snapshots_go_back_in_time_until_compacted() {
        let mut store = Store::new(10, 10);
        store.create(node("a", "1"), false).unwrap();
        let rv_a = store.resource_version();
        store.create(node("b", "1"), false).unwrap();
        store.update("a", false, |_| Ok(node("a", "2"))).unwrap();
        store.delete("b", false, |_| Ok(())).unwrap();
        let then = store.snapshot_at(rv_a).unwrap();
        assert_eq!(then.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(then["a"].value["metadata"]["labels"]["l"], "1");
        assert_eq!(then["a"].rv, rv_a);
        // A no-op update writes nothing.
        let rv = store.resource_version();
        store.update("a", false, |_| Ok(node("a", "2"))).unwrap();
        assert_eq!(store.resource_version(), rv);
        store.compact();
        assert_eq!(
            store.snapshot_at(rv_a).unwrap_err(),
            Unavailable::Compacted { oldest: rv }
        );
        assert!(store.watch(WatchFrom::After(rv - 1)).is_err());
        assert!(store.watch(WatchFrom::After(rv)).is_ok());
    }

    #[test]
    fn stored_json_has_kind_first_and_bare_lacks_it() {
        let mut store = Store::new(10, 10);
        let stored = store.create(node("a", "1"), false).unwrap();
        let json = std::str::from_utf8(&stored.json).unwrap();
        assert!(
            json.starts_with(r#"{"kind":"Node","apiVersion":"v1","#),
            "{json}"
        );
        let bare: Value = serde_json::from_slice(&stored.bare).unwrap();
        assert!(bare.get("kind").is_none());
        assert_eq!(bare["metadata"]["resourceVersion"], "2");
    }
}
