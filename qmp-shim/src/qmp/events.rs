//! QMP events: timestamped, broadcast to every negotiated connection
//! through its [`Outbox`].

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// What waits to be written to one client: its replies and events, in the
/// order they were queued (an event emitted while a command runs precedes
/// that command's reply, as in QEMU: libvirt checks the MIGRATION status
/// right after `migrate` returns). Queuing never blocks; the connection's
/// own writer thread ([`Outbox::run_writer`]) does the writing. A client
/// that lets more than the limit pile up is disconnected, like a QEMU
/// monitor whose client stops reading: dropping events instead would leave
/// libvirt with a wrong idea of the VM.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    changed: Condvar,
    limit: usize,
    /// Shut down on overflow, so that the reader and writer see the end.
    socket: Option<UnixStream>,
}

#[derive(Debug, Default)]
struct OutboxState {
    queue: VecDeque<String>,
    /// Bytes queued or being written.
    bytes: usize,
    writing: bool,
    closed: bool,
    overflowed: bool,
}

impl Outbox {
    /// An outbox holding at most `limit` bytes; `socket` (a clone of the
    /// connection) is shut down when it overflows.
    pub fn new(limit: usize, socket: Option<UnixStream>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(OutboxState::default()),
            changed: Condvar::new(),
            limit,
            socket,
        })
    }

    /// Queues `msg`; false when the outbox is closed, or overflows now (it
    /// is closed then and the client disconnected).
    pub fn push(&self, msg: &Value) -> bool {
        let mut text = msg.to_string();
        text.push_str("\r\n");
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.closed {
            return false;
        }
        if s.bytes + text.len() > self.limit {
            s.closed = true;
            s.overflowed = true;
            s.queue.clear();
            drop(s);
            self.changed.notify_all();
            tracing::warn!(
                "QMP client does not read: over {} bytes are waiting for it; disconnecting it",
                self.limit
            );
            if let Some(sock) = &self.socket {
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
            return false;
        }
        s.bytes += text.len();
        s.queue.push_back(text);
        drop(s);
        self.changed.notify_all();
        true
    }

    /// No more messages: the writer writes what is queued, then ends.
    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.changed.notify_all();
    }

    /// Waits at most `timeout` for everything queued to be written.
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        while s.bytes > 0 && !s.overflowed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.changed.wait_timeout(s, left) {
                Ok((g, _)) => s = g,
                Err(_) => return,
            }
        }
    }

    /// Writes queued messages to `w` until the outbox is closed and empty;
    /// run on the connection's writer thread. Fails on a write error or an
    /// overflow (the outbox is closed then).
    pub fn run_writer(&self, w: &mut impl Write) -> io::Result<()> {
        let poisoned = || io::Error::other("QMP outbox poisoned");
        loop {
            let mut s = self.state.lock().map_err(|_| poisoned())?;
            while s.queue.is_empty() && !s.closed {
                s = self.changed.wait(s).map_err(|_| poisoned())?;
            }
            if s.overflowed {
                return Err(io::Error::other(
                    "the client does not read its replies and events",
                ));
            }
            let Some(text) = s.queue.pop_front() else {
                return Ok(()); // closed, all written
            };
            s.writing = true;
            drop(s);
            let r = w.write_all(text.as_bytes());
            let mut s = self.state.lock().map_err(|_| poisoned())?;
            s.writing = false;
            s.bytes = s.bytes.saturating_sub(text.len());
            if r.is_err() {
                s.closed = true;
                s.queue.clear();
                s.bytes = 0;
            }
            drop(s);
            self.changed.notify_all();
            r?;
        }
    }
}

/// Where one connection's events go.
#[derive(Debug)]
enum Subscriber {
    /// A queue (tests, or a consumer with its own writer).
    Queue(Sender<Value>),
    /// A QMP connection's outbox: queued, never written by the emitter.
    Outbox(Arc<Outbox>),
}

impl Subscriber {
    /// Delivers `msg` without blocking; false when the subscriber is gone.
    fn send(&self, msg: &Value) -> bool {
        match self {
            Self::Queue(tx) => tx.send(msg.clone()).is_ok(),
            Self::Outbox(o) => o.push(msg),
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
    /// Never blocks on a client.
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

    /// Adds a connection whose events are queued in `outbox`, with its
    /// replies, for its own writer thread.
    pub fn subscribe_outbox(&self, id: u64, outbox: Arc<Outbox>) {
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push((id, Subscriber::Outbox(outbox)));
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
