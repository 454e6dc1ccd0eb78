//! QMP events: timestamped, broadcast to every negotiated connection.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// One event as QEMU sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Option<Value>,
    pub seconds: u64,
    pub microseconds: u32,
}

impl Event {
    /// An event stamped now.
    pub fn new(name: &str, data: Option<Value>) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            name: name.to_string(),
            data,
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        }
    }

    /// `{"event":..,"data":..,"timestamp":{"seconds":..,"microseconds":..}}`.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "event": self.name,
            "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
        });
        if let (Some(data), Some(obj)) = (&self.data, v.as_object_mut()) {
            obj.insert("data".into(), data.clone());
        }
        v
    }
}

/// Where one connection's events go.
#[derive(Debug)]
enum Subscriber {
    /// A queue (tests, or a consumer with its own writer).
    Queue(Sender<Value>),
    /// Written at once, under the lock its replies are written with: an
    /// event emitted while a command runs reaches the client before that
    /// command's reply, as in QEMU (libvirt checks the MIGRATION status
    /// right after `migrate` returns).
    Stream(Arc<Mutex<UnixStream>>),
}

impl Subscriber {
    /// Delivers `msg`; false when the subscriber is gone.
    fn send(&self, msg: &Value) -> bool {
        match self {
            Self::Queue(tx) => tx.send(msg.clone()).is_ok(),
            Self::Stream(w) => {
                let mut text = msg.to_string();
                text.push_str("\r\n");
                w.lock()
                    .map(|mut s| s.write_all(text.as_bytes()).is_ok())
                    .unwrap_or(false)
            }
        }
    }
}

/// Connection id → where its events go.
type Subscribers = Arc<Mutex<Vec<(u64, Subscriber)>>>;

/// The sending side handed to the backend and to command handlers.
/// Cloning is cheap; events go to every subscribed connection.
#[derive(Debug, Clone, Default)]
pub struct EventSink {
    subscribers: Subscribers,
}

impl EventSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `name` with `data` to every subscriber; dead ones are dropped.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let msg = Event::new(name, data).to_json();
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.retain(|(_, sub)| sub.send(&msg));
        }
    }

    /// Adds a connection's outgoing queue under `id`.
    pub fn subscribe(&self, id: u64, tx: Sender<Value>) {
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push((id, Subscriber::Queue(tx)));
        }
    }

    /// Adds a connection whose events are written to `stream` directly
    /// (under the same lock as its replies).
    pub fn subscribe_stream(&self, id: u64, stream: Arc<Mutex<UnixStream>>) {
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push((id, Subscriber::Stream(stream)));
        }
    }

    /// Removes the connection `id`.
    pub fn unsubscribe(&self, id: u64) {
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.retain(|(i, _)| *i != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shape_and_fanout() {
        let sink = EventSink::new();
        let (tx, rx) = std::sync::mpsc::channel();
        sink.subscribe(1, tx);
        sink.emit("STOP", None);
        sink.emit("MIGRATION", Some(json!({"status": "setup"})));
        let a = rx.recv().expect("event");
        assert_eq!(a["event"], "STOP");
        assert!(a.get("data").is_none());
        assert!(a["timestamp"]["seconds"].as_u64().expect("secs") > 1_600_000_000);
        assert!(a["timestamp"]["microseconds"].as_u64().expect("us") < 1_000_000);
        assert_eq!(rx.recv().expect("event")["data"]["status"], "setup");
        sink.unsubscribe(1);
        sink.emit("RESUME", None);
        assert!(rx.try_recv().is_err());
    }
}
