//! The receiving half of a stream.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::flow::RecvWindow;

#[derive(Debug)]
pub(crate) struct RecvState {
    /// Received chunks, as they came off the wire (no copy).
    pub(crate) chunks: VecDeque<Bytes>,
    /// Sum of `chunks` lengths; never above the stream's window.
    pub(crate) buffered: usize,
    pub(crate) window: RecvWindow,
    /// When the last window update went out (at first, when the stream began): how long
    /// the reader took for the half window since tells whether the window holds it back.
    pub(crate) last_update: Instant,
    /// Whether the last update was quick (at first, yes): growth needs two in a row.
    pub(crate) last_quick: bool,
    pub(crate) fin_received: bool,
    /// The application has seen the end of the stream.
    pub(crate) fin_read: bool,
    /// A `Readable` event is outstanding (not yet answered by a read that blocked).
    pub(crate) signalled: bool,
    /// Bytes accepted from the wire.
    pub(crate) received: u64,
    /// Bytes handed to the application.
    pub(crate) read: u64,
}

impl RecvState {
    pub(crate) fn new(window: u32, now: Instant) -> Self {
        RecvState {
            chunks: VecDeque::new(),
            buffered: 0,
            window: RecvWindow::new(window),
            last_update: now,
            last_quick: true,
            fin_received: false,
            fin_read: false,
            signalled: false,
            received: 0,
            read: 0,
        }
    }

    /// Takes up to `max` bytes off the front.
    pub(crate) fn take(&mut self, max: usize) -> Option<Bytes> {
        let front = self.chunks.front_mut()?;
        let out = if front.len() <= max {
            self.chunks.pop_front()?
        } else {
            front.split_to(max)
        };
        self.buffered -= out.len();
        self.read += out.len() as u64;
        Some(out)
    }

    pub(crate) fn is_done(&self) -> bool {
        self.fin_read
    }
}
