//! The sending half of a stream.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use super::flow::SendWindow;
use super::MIN_CHUNK;

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
    pub(crate) buf: SendBuf,
    pub(crate) window: SendWindow,
    pub(crate) fin: Fin,
    /// A write was refused for lack of credit: announce `Writable` on the next grant.
    pub(crate) blocked: bool,
    /// Bytes transmitted.
    pub(crate) sent: u64,
    /// The application has reset the stream with this code, to go out once the buffered
    /// bytes (and a queued FIN) have: no more writes, and received bytes are dropped.
    pub(crate) reset_after: Option<crate::ErrorCode>,
}

impl SendState {
    pub(crate) fn new(credit: u32) -> Self {
        SendState {
            buf: SendBuf::default(),
            window: SendWindow::new(credit),
            fin: Fin::Open,
            blocked: false,
            sent: 0,
            reset_after: None,
        }
    }

    /// How many more bytes a write may take: credit not already spoken for by the buffer,
    /// and no more than `send_buffer` bytes buffered in all (see
    /// [`Config::sanitized_send_buffer`](crate::Config::sanitized_send_buffer)).
    pub(crate) fn writable(&self, send_buffer: usize) -> usize {
        let buffered = self.buf.len();
        let free = self.window.credit().saturating_sub(buffered as u64);
        usize::try_from(free)
            .unwrap_or(usize::MAX)
            .min(send_buffer.saturating_sub(buffered))
    }

    /// Whether the transmitter has anything for this stream.
    pub(crate) fn has_output(&self) -> bool {
        !self.buf.is_empty() || self.fin == Fin::Queued
    }

    pub(crate) fn is_done(&self) -> bool {
        self.fin == Fin::Sent
    }
}

/// Written but not yet transmitted bytes: a queue of shared chunks (taken from
/// `write_bytes` without copying) followed by a tail that copying writes append to.
#[derive(Debug, Default)]
pub(crate) struct SendBuf {
    /// Older bytes, in order; never holds an empty chunk.
    chunks: VecDeque<Bytes>,
    /// Newer bytes, after every chunk. Shared transmits split slices off its front without
    /// copying; once they have been dropped (a runtime usually encrypts them at once), the
    /// allocation is unique again and is reused instead of a new one.
    tail: BytesMut,
    /// Bytes in `chunks`.
    queued: usize,
}

impl SendBuf {
    pub(crate) fn len(&self) -> usize {
        self.queued + self.tail.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a copy of `data`.
    pub(crate) fn extend_from_slice(&mut self, data: &[u8]) {
        if self.tail.capacity() - self.tail.len() < data.len()
            && !self.tail.is_empty()
            && !self.tail.try_reclaim(data.len())
        {
            // Making room would move the untransmitted bytes, or grow an allocation that
            // still holds them: they leave as a chunk instead, and the tail starts afresh.
            self.queued += self.tail.len();
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.tail.extend_from_slice(data);
    }

    /// Appends `data` without copying it (unless it is small).
    pub(crate) fn push(&mut self, data: Bytes) {
        if data.len() < MIN_CHUNK {
            self.extend_from_slice(&data);
            return;
        }
        if !self.tail.is_empty() {
            self.queued += self.tail.len();
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.queued += data.len();
        self.chunks.push_back(data);
    }

    /// Removes the first `n` bytes (at most `len`) and appends a copy of them to `out`.
    pub(crate) fn copy_to(&mut self, mut n: usize, out: &mut Vec<u8>) {
        debug_assert!(n <= self.len());
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let k = n.min(front.len());
            out.extend_from_slice(&front[..k]);
            n -= k;
            self.queued -= k;
            if k == front.len() {
                self.chunks.pop_front();
            } else {
                front.advance(k);
            }
        }
        let n = n.min(self.tail.len());
        out.extend_from_slice(&self.tail[..n]);
        self.tail.advance(n);
    }

    /// Removes the first `n` bytes (at most `len`) and appends them to `out` as shared
    /// slices, without copying.
    pub(crate) fn split_to(&mut self, mut n: usize, out: &mut Vec<Bytes>) {
        debug_assert!(n <= self.len());
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.queued -= front.len();
                if let Some(chunk) = self.chunks.pop_front() {
                    out.push(chunk);
                }
            } else {
                out.push(front.split_to(n));
                self.queued -= n;
                n = 0;
            }
        }
        let n = n.min(self.tail.len());
        if n > 0 {
            out.push(self.tail.split_to(n).freeze());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One operation on a [`SendBuf`].
    #[derive(Debug, Clone)]
    enum Op {
        Copy(usize),
        Push(usize),
        TakeCopy(usize),
        TakeShared(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..100_000).prop_map(Op::Copy),
            (1usize..4_000).prop_map(Op::Copy),
            (1usize..100_000).prop_map(Op::Push),
            (0usize..150_000).prop_map(Op::TakeCopy),
            (0usize..150_000).prop_map(Op::TakeShared),
        ]
    }

    /// A runtime that transmits shared slices and drops them once encrypted must not cost
    /// an allocation per write: the tail takes its allocation back.
    #[test]
    fn the_tail_reuses_its_allocation_once_shared_slices_are_dropped() {
        let mut buf = SendBuf::default();
        let data = vec![7u8; 64 * 1024];
        buf.extend_from_slice(&data);
        let mut out = Vec::new();
        buf.split_to(data.len(), &mut out);
        let first = out[0].as_ptr();
        out.clear();
        for round in 0..8 {
            buf.extend_from_slice(&data);
            buf.split_to(data.len(), &mut out);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].as_ptr(), first, "round {round} allocated afresh");
            assert!(out[0].iter().all(|&b| b == 7));
            out.clear();
        }
        // While a slice is still alive its bytes are never overwritten.
        buf.extend_from_slice(&data);
        buf.split_to(data.len(), &mut out);
        buf.extend_from_slice(&[9u8; 1000]);
        assert!(
            out[0].iter().all(|&b| b == 7),
            "a live slice was overwritten"
        );
    }

    /// Bytes the transmitter has not taken yet stay where they are when a write needs more
    /// room than the tail has: no move, no doubled allocation; they leave as a chunk.
    #[test]
    fn a_backlog_is_sealed_instead_of_moved_or_grown() {
        let mut buf = SendBuf::default();
        buf.extend_from_slice(&[1u8; 200 * 1024]);
        let mut out = Vec::new();
        buf.split_to(100 * 1024, &mut out);
        out.clear();
        let backlog = buf.tail.as_ptr();
        let capacity = buf.tail.capacity();
        buf.extend_from_slice(&[2u8; 150 * 1024]);
        assert_eq!(buf.len(), 250 * 1024);
        assert_eq!(buf.chunks.len(), 1, "the backlog was not sealed");
        assert_eq!(buf.chunks[0].as_ptr(), backlog, "the backlog moved");
        assert!(buf.tail.capacity() <= capacity.max(150 * 1024) * 2);
        let mut all = Vec::new();
        buf.copy_to(buf.len(), &mut all);
        assert!(all[..100 * 1024].iter().all(|&b| b == 1));
        assert!(all[100 * 1024..].iter().all(|&b| b == 2));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever mix of copying and shared writes and of copying and shared takes, the
        /// bytes come out in the order they went in and the queue never holds an empty
        /// chunk.
        #[test]
        fn bytes_leave_in_order(ops in proptest::collection::vec(op(), 1..40)) {
            let mut buf = SendBuf::default();
            let mut written = Vec::new();
            let mut taken = Vec::new();
            let mut next = 0u8;
            let mut fresh = |n: usize| -> Vec<u8> {
                (0..n).map(|_| { next = next.wrapping_add(1); next }).collect()
            };
            for op in ops {
                match op {
                    Op::Copy(n) => {
                        let d = fresh(n);
                        buf.extend_from_slice(&d);
                        written.extend_from_slice(&d);
                    }
                    Op::Push(n) => {
                        let d = fresh(n);
                        buf.push(Bytes::from(d.clone()));
                        written.extend_from_slice(&d);
                    }
                    Op::TakeCopy(n) => buf.copy_to(n.min(buf.len()), &mut taken),
                    Op::TakeShared(n) => {
                        let mut out = Vec::new();
                        buf.split_to(n.min(buf.len()), &mut out);
                        for c in out {
                            taken.extend_from_slice(&c);
                        }
                    }
                }
                prop_assert_eq!(buf.len() + taken.len(), written.len());
                prop_assert!(buf.chunks.iter().all(|c| !c.is_empty()));
            }
            let rest = buf.len();
            buf.copy_to(rest, &mut taken);
            prop_assert_eq!(buf.len(), 0);
            prop_assert!(taken == written, "bytes reordered or changed");
        }
    }
}
