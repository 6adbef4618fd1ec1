//! The sending half of a stream.

use bytes::BytesMut;

use super::flow::SendWindow;

/// Where the sender is with its FIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fin {
    /// Still writing.
    Open,
    /// `finish` was called; FIN goes out with the last buffered byte.
    Queued,
    /// FIN was transmitted.
    Sent,
}

#[derive(Debug)]
pub(crate) struct SendState {
    /// Written but not yet transmitted. Never longer than the stream credit.
    pub(crate) buf: BytesMut,
    pub(crate) window: SendWindow,
    pub(crate) fin: Fin,
    /// A write was refused for lack of credit: announce `Writable` on the next grant.
    pub(crate) blocked: bool,
    /// Bytes transmitted.
    pub(crate) sent: u64,
}

impl SendState {
    pub(crate) fn new(credit: u32) -> Self {
        SendState {
            buf: BytesMut::new(),
            window: SendWindow::new(credit),
            fin: Fin::Open,
            blocked: false,
            sent: 0,
        }
    }

    /// How many more bytes a write may take: credit not already spoken for by the buffer.
    pub(crate) fn writable(&self) -> usize {
        let free = self.window.credit().saturating_sub(self.buf.len() as u64);
        usize::try_from(free).unwrap_or(usize::MAX)
    }

    /// Whether the transmitter has anything for this stream.
    pub(crate) fn has_output(&self) -> bool {
        !self.buf.is_empty() || self.fin == Fin::Queued
    }

    pub(crate) fn is_done(&self) -> bool {
        self.fin == Fin::Sent
    }
}
