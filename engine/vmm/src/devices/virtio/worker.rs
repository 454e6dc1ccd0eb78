//! The device thread of a virtio device with host input (virtio-net receive)
//! or timed work (virtio-rng's rate limit): it polls the input fd while the
//! device can take input, sleeps until the device's next timer, and polls a
//! socket that wakes it when that changes (the driver posted buffers, a request
//! waits for the rate limit, the VM resumed, an announce started, the VM is
//! going away). All device work happens under the device's lock, in
//! [`VirtioPci::service`], which does nothing while the device is stopped: a
//! paused VM's guest memory is never written from here.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::VirtioPci;

/// A device thread that could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot create a socket pair: {0}")]
    SocketPair(#[source] std::io::Error),
    #[error("cannot make a socket non-blocking: {0}")]
    NonBlocking(#[source] std::io::Error),
    #[error("cannot clone a socket: {0}")]
    CloneSocket(#[source] std::io::Error),
    #[error("{what} lock poisoned")]
    LockPoisoned { what: &'static str },
    #[error("cannot start the thread of {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// A running device thread; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Worker {
    exit: Arc<AtomicBool>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread of `dev` if the device has host input or timed work.
    pub fn spawn(dev: &Arc<Mutex<VirtioPci>>) -> Result<Option<Self>, WorkerError> {
        let (wake, theirs) = UnixStream::pair().map_err(WorkerError::SocketPair)?;
        for s in [&wake, &theirs] {
            s.set_nonblocking(true).map_err(WorkerError::NonBlocking)?;
        }
        let name = {
            let mut d = dev
                .lock()
                .map_err(|_| WorkerError::LockPoisoned { what: "device" })?;
            if !d.needs_thread() {
                return Ok(None);
            }
            let writer = wake.try_clone().map_err(WorkerError::CloneSocket)?;
            d.attach_waker(writer);
            d.name()
        };
        let exit = Arc::new(AtomicBool::new(false));
        let (dev, stop) = (dev.clone(), exit.clone());
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(&dev, theirs, &stop))
            .map_err(|source| WorkerError::Spawn { name, source })?;
        Ok(Some(Self {
            exit,
            wake,
            thread: Some(thread),
        }))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.exit.store(true, Ordering::Release);
        let _ = std::io::Write::write(&mut self.wake, &[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(dev: &Mutex<VirtioPci>, mut wake: UnixStream, exit: &AtomicBool) {
    let input = dev.lock().ok().and_then(|d| d.input()).map(|(fd, _)| fd);
    let mut drain = [0u8; 64];
    while !exit.load(Ordering::Acquire) {
        let (poll_input, next) = match dev.lock() {
            Ok(mut d) => d.service(Instant::now()),
            Err(_) => return,
        };
        let timeout = match next {
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(Instant::now()).as_millis() + 1;
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::NONE)
            }
        };
        let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        if let Some(input) = input.as_ref().filter(|_| poll_input) {
            fds.push(PollFd::new(input.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("device thread: poll failed: {e}");
                return;
            }
        }
        while matches!(wake.read(&mut drain), Ok(n) if n > 0) {}
    }
}
