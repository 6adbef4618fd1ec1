//! The receiving half of a stream.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::flow::RecvWindow;
use super::MIN_CHUNK;

/// How many receive allocations a stream's unread chunks may keep alive beyond twice
/// their bytes, at least (see [`RecvState::push`]).
const FREE_PINS: usize = 2;

/// The least a stream's buffer for copied payloads takes at a time: payloads up to a
/// quarter of it share one allocation instead of costing one each; larger ones get their
/// own, so that what a full buffer leaves unused stays within a quarter of what it holds.
const COPY_ALLOC: usize = 16 * 1024;

/// The receive allocation a payload shares: which one (a number the connection changes
/// whenever it takes another) and how large it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allocation {
    pub(crate) id: u64,
    pub(crate) size: usize,
}

/// Consecutive chunks of a stream: shared ones in one receive allocation, or copies.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// The allocation the chunks share; `None` for copies.
    shared: Option<Allocation>,
    chunks: usize,
}

#[derive(Debug)]
pub(crate) struct RecvState {
    /// Received chunks, in order, one per payload of [`MIN_CHUNK`] or more; `small` comes
    /// after them.
    chunks: VecDeque<Bytes>,
    /// What `chunks` holds, run by run, in the same order.
    runs: VecDeque<Run>,
    /// Room for copied payloads: each is copied in and split off as its chunk, so that
    /// they share an allocation (of this stream's bytes only).
    copies: BytesMut,
    /// Payloads under [`MIN_CHUNK`] received after every chunk, copied and gathered: one
    /// read takes several. Sealed into a chunk when a larger payload comes.
    small: BytesMut,
    /// Sum of `chunks` and `small` lengths; never above the stream's window.
    buffered: usize,
    /// Bytes of `chunks` in shared runs.
    shared_bytes: usize,
    /// The sizes of the allocations the shared runs keep alive, together (one allocation
    /// split by copies counts once per run).
    pinned: usize,
    pub(crate) window: RecvWindow,
    /// When the last window update went out (at first, when the stream began).
    pub(crate) last_update: Instant,
    /// Bytes the reader took lately: each update adds what it returns, and what was
    /// counted fades with the time between updates (see `Connection::resize_window`).
    pub(crate) taken_lately: u64,
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
            runs: VecDeque::new(),
            copies: BytesMut::new(),
            small: BytesMut::new(),
            buffered: 0,
            shared_bytes: 0,
            pinned: 0,
            window: RecvWindow::new(window),
            last_update: now,
            taken_lately: 0,
            fin_received: false,
            fin_read: false,
            signalled: false,
            received: 0,
            read: 0,
        }
    }

    /// Queues a payload decoded from receive allocation `from`, and returns how many of
    /// its bytes were copied (none or all).
    ///
    /// A payload under [`MIN_CHUNK`] is copied and gathered with the small ones before it,
    /// so that one-byte frames cost a byte each, not an entry in the queue and an
    /// allocation kept alive.
    ///
    /// A payload shares its allocation, which holds other frames too, other streams'
    /// among them: a reader that lags would keep alive whole allocations for a few bytes
    /// of its own in each (a peer sending a kilobyte for it between every 64 KiB for
    /// another stream would make a 256 KiB window hold 16 MiB). So a payload in another
    /// allocation than the last chunk's, when that one is shared, stays shared only if
    /// keeping its allocation alive too leaves the allocations the stream's shared chunks
    /// keep alive within twice their bytes plus a slack: [`FREE_PINS`] allocations of its
    /// size, or half the stream's window while it buffers less than that. Otherwise it is
    /// copied (into an allocation of the stream's own, see [`COPY_ALLOC`]). The receive
    /// allocations a stream keeps alive thus never exceed twice its window plus two of
    /// the largest (the half-window slack applies only while the stream buffers less
    /// than half its window, which keeps it within one and a half windows), and its
    /// copies take little more than their bytes.
    ///
    /// Why the slack grows while the reader is within half the window: a stream's share
    /// of an allocation says little while several streams move at once (three downloads
    /// side by side hold a third of each allocation each, all of it alive, and with two
    /// allocations of slack they copied two thirds of their bytes whenever their readers
    /// lagged a little); allocations go to waste when some streams' bytes in them are read
    /// and others' are not, that is, when a reader falls behind by much of its window.
    /// A download whose allocations hold mostly its own frames shares them however far
    /// its reader lags, once the reader is past any it kept for only a few bytes.
    pub(crate) fn push(&mut self, payload: Bytes, from: Allocation) -> usize {
        let len = payload.len();
        self.buffered += len;
        if len < MIN_CHUNK {
            self.small.extend_from_slice(&payload);
            return len;
        }
        self.seal_small();
        let same = self.runs.back().is_some_and(|r| r.shared == Some(from));
        // In u64: windows up to 2^31 would overflow a 32-bit usize here.
        let window = u64::from(self.window.window());
        let moving = if (self.buffered as u64) < window / 2 {
            window / 2
        } else {
            0
        };
        let slack = (FREE_PINS as u64 * from.size as u64).max(moving);
        let room = 2 * (self.shared_bytes as u64 + len as u64) + slack;
        if !same && self.pinned as u64 + from.size as u64 > room {
            let copy = if len > COPY_ALLOC / 4 {
                Bytes::copy_from_slice(&payload)
            } else {
                if self.copies.capacity() < len {
                    // The earlier allocation goes when its chunks have been read.
                    self.copies = BytesMut::with_capacity(COPY_ALLOC);
                }
                self.copies.extend_from_slice(&payload);
                self.copies.split().freeze()
            };
            self.queue_copy(copy);
            return len;
        }
        match self.runs.back_mut() {
            Some(run) if run.shared == Some(from) => run.chunks += 1,
            _ => {
                self.runs.push_back(Run {
                    shared: Some(from),
                    chunks: 1,
                });
                self.pinned += from.size;
            }
        }
        self.shared_bytes += len;
        self.chunks.push_back(payload);
        0
    }

    /// Queues the gathered small payloads as one copied chunk.
    fn seal_small(&mut self) {
        if !self.small.is_empty() {
            let copy = self.small.split().freeze();
            self.queue_copy(copy);
        }
    }

    /// Queues a chunk of copied bytes.
    fn queue_copy(&mut self, copy: Bytes) {
        self.chunks.push_back(copy);
        match self.runs.back_mut() {
            Some(run) if run.shared.is_none() => run.chunks += 1,
            _ => self.runs.push_back(Run {
                shared: None,
                chunks: 1,
            }),
        }
    }

    /// Takes up to `max` bytes off the front.
    pub(crate) fn take(&mut self, max: usize) -> Option<Bytes> {
        if self.chunks.is_empty() && !self.small.is_empty() {
            let out = self.small.split_to(max.min(self.small.len())).freeze();
            self.taken(out.len());
            return Some(out);
        }
        let front = self.chunks.front_mut()?;
        let whole = front.len() <= max;
        let out = if whole {
            self.chunks.pop_front()?
        } else {
            front.split_to(max)
        };
        // Every chunk is in a run.
        if let Some(run) = self.runs.front_mut() {
            if run.shared.is_some() {
                self.shared_bytes -= out.len();
            }
            if whole {
                run.chunks -= 1;
                if run.chunks == 0 {
                    if let Some(allocation) = run.shared {
                        self.pinned -= allocation.size;
                    }
                    self.runs.pop_front();
                }
            }
        }
        self.taken(out.len());
        Some(out)
    }

    /// Counts `n` bytes handed to the application.
    fn taken(&mut self, n: usize) {
        self.buffered -= n;
        self.read += n as u64;
        if self.buffered == 0 {
            // Nothing waits: the room left in these need not outlive the reads.
            self.copies = BytesMut::new();
            self.small = BytesMut::new();
        }
    }

    /// Drops every unread byte (the application reset the stream).
    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.runs.clear();
        self.copies = BytesMut::new();
        self.small = BytesMut::new();
        self.buffered = 0;
        self.shared_bytes = 0;
        self.pinned = 0;
    }

    /// The unread bytes, in order (the peer reset the stream).
    pub(crate) fn into_unread(mut self) -> Vec<Bytes> {
        self.seal_small();
        self.chunks.into()
    }

    /// Bytes received and not read yet.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered
    }

    /// The sizes of the receive allocations the unread chunks keep alive, together.
    pub(crate) fn pinned(&self) -> usize {
        self.pinned
    }

    /// The most [`pinned`](Self::pinned) can be, given the largest allocation and the
    /// largest window the stream can have.
    pub(crate) fn pin_limit(largest_allocation: usize, max_window: u32) -> u64 {
        FREE_PINS as u64 * largest_allocation as u64 + 2 * u64::from(max_window)
    }

    pub(crate) fn is_done(&self) -> bool {
        self.fin_read
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALLOC: usize = 64 * 1024;

    fn allocation(id: u64) -> Allocation {
        Allocation { id, size: ALLOC }
    }

    /// A stream with the default window, 256 KiB.
    fn state() -> RecvState {
        RecvState::new(256 * 1024, Instant::now())
    }

    fn payload(len: usize, byte: u8) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    /// A download whose allocations hold mostly its own frames is never copied, however
    /// far its reader lags behind, nor when the reader catches up now and then.
    #[test]
    fn a_lagging_download_keeps_sharing_its_own_allocations() {
        const FRAME: usize = 16 * 1024;
        let mut s = state();
        let (mut id, mut used) = (0, 0);
        let mut copied = 0;
        for i in 0..20_000 {
            // Frames (with their 9-byte headers) fill allocations one after the other.
            used += FRAME + 9;
            if used > ALLOC {
                id += 1;
                used = FRAME + 9;
            }
            copied += s.push(payload(FRAME, i as u8), allocation(id));
            // The reader keeps up, then lags by up to a 4 MiB window, then catches up.
            let lag = match i % 3000 {
                0..=499 => 0,
                _ => 4 << 20,
            };
            while s.buffered() > lag {
                s.take(64 * 1024);
            }
        }
        assert_eq!(copied, 0);
        assert!(s.pinned() > 4 << 20, "the reader lags at the end");
    }

    /// A kilobyte between every allocation's worth of another stream's frames would keep
    /// 64 KiB alive per kilobyte: past two allocations those payloads are copied into an
    /// allocation of the stream's own, and come out one by one, in order. (A window of
    /// 256 KiB holds 200 of them.)
    #[test]
    fn a_stream_with_a_kilobyte_in_each_allocation_keeps_two_alive() {
        let mut s = state();
        let mut copied = 0;
        for id in 0..200 {
            copied += s.push(payload(MIN_CHUNK, id as u8), allocation(id));
        }
        assert_eq!(copied, 198 * MIN_CHUNK);
        assert_eq!(s.pinned(), 2 * ALLOC);
        // The copies share the stream's own allocations, COPY_ALLOC each.
        let copies: Vec<_> = s
            .chunks
            .iter()
            .skip(2)
            .map(|c| c.as_ptr() as usize)
            .collect();
        let apart = copies
            .windows(2)
            .filter(|w| w[1] != w[0] + MIN_CHUNK)
            .count();
        assert!(
            apart <= 198 * MIN_CHUNK / COPY_ALLOC,
            "{apart} allocations for the copies"
        );
        for id in 0..200u64 {
            let b = s.take(usize::MAX).expect("a chunk");
            assert_eq!(b.len(), MIN_CHUNK, "one payload per read");
            assert!(b.iter().all(|&x| x == id as u8), "in order");
            if id == 0 {
                assert_eq!(s.pinned(), ALLOC);
            }
        }
        assert_eq!((s.pinned(), s.buffered()), (0, 0));
        // An empty queue shares again.
        assert_eq!(s.push(payload(MIN_CHUNK, 0), allocation(5000)), 0);
        assert_eq!(s.pinned(), ALLOC);
    }

    /// Payloads under MIN_CHUNK are gathered, whatever their allocations: one-byte frames
    /// cost a byte each, keep no receive allocation alive, and a read takes many.
    #[test]
    fn small_payloads_are_gathered() {
        let mut s = state();
        for id in 0..100_000 {
            assert_eq!(s.push(payload(1, id as u8), allocation(id)), 1);
        }
        // A larger payload after them comes after them.
        s.push(payload(MIN_CHUNK, 7), allocation(100_000));
        assert_eq!(s.pinned(), ALLOC);
        assert_eq!(
            s.chunks.len(),
            2,
            "the small ones in one chunk, then the large one"
        );
        let small = s.take(usize::MAX).expect("the small ones");
        assert_eq!(small.len(), 100_000);
        assert!(small.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert_eq!(s.take(usize::MAX).map(|b| b.len()), Some(MIN_CHUNK));
        // Small ones read as they come, in pieces if asked.
        s.push(payload(10, 1), allocation(1));
        s.push(payload(10, 2), allocation(1));
        assert_eq!(s.take(15).map(|b| b.len()), Some(15));
        assert_eq!(s.take(15).map(|b| b.len()), Some(5));
        assert_eq!(s.take(15), None);
        assert_eq!(s.buffered(), 0);
    }

    /// Copies do not make a stream copy for good: once its reader is past the
    /// allocations it kept for a few bytes, a download that fills its own allocations is
    /// shared again, though the reader never empties the queue.
    #[test]
    fn a_stream_shares_again_once_past_what_it_copied() {
        let mut s = state();
        for id in 0..8 {
            s.push(payload(MIN_CHUNK, 1), allocation(id));
        }
        let copied_before = 6;
        let mut copied = 0;
        let mut id = 8;
        for i in 0..3000 {
            if i % 3 == 0 {
                id += 1;
            }
            copied += s.push(payload(16 * 1024, 2), allocation(id));
            // The reader stays 64 KiB behind.
            while s.buffered() > 64 * 1024 {
                s.take(16 * 1024);
            }
        }
        assert!(
            copied <= 4 * 16 * 1024,
            "{copied} bytes copied after the {copied_before} copied single bytes"
        );
    }

    /// A stream with a quarter of each allocation (four streams' frames interleaved) keeps
    /// four allocations alive (twice its 64 KiB in them, plus two), then copies.
    #[test]
    fn interleaved_streams_copy_once_their_share_is_small() {
        let mut s = state();
        let mut copied = 0;
        for id in 0..64 {
            copied += s.push(payload(16 * 1024, 1), allocation(id));
        }
        assert_eq!(s.pinned(), 4 * ALLOC);
        assert_eq!(copied, 60 * 16 * 1024);
        // A reader that reads part of a chunk leaves its pin in place.
        let part = s.take(1000).expect("bytes");
        assert_eq!(part.len(), 1000);
        assert_eq!(s.pinned(), 4 * ALLOC);
        s.clear();
        assert_eq!((s.pinned(), s.buffered(), s.chunks.len()), (0, 0, 0));
    }

    /// Three downloads side by side hold a third of each allocation each, all of it
    /// alive: while their readers keep within half their (grown) windows, nothing is
    /// copied; a reader that falls further behind copies.
    #[test]
    fn downloads_side_by_side_keep_sharing_while_their_readers_keep_up() {
        let run = |lag: usize| {
            let mut s = RecvState::new(4 << 20, Instant::now());
            let mut copied = 0;
            for id in 0..2000 {
                copied += s.push(payload(21 * 1024, 1), allocation(id));
                while s.buffered() > lag {
                    s.take(64 * 1024);
                }
            }
            copied
        };
        assert_eq!(run(1 << 20), 0);
        assert!(run(3 << 20) > 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A payload of this length, in the same allocation as the last one or a new one
        /// of the given size.
        Push(usize, Option<usize>),
        Take(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..20_000, prop::option::of(1usize..300_000)).prop_map(|(n, a)| Op::Push(n, a)),
            (1usize..40, prop::option::of(1usize..300_000)).prop_map(|(n, a)| Op::Push(n, a)),
            (0usize..50_000).prop_map(Op::Take),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the payloads, allocations and window, the bytes come out in the order
        /// they came in, the allocations kept alive stay within the slack (two of the
        /// largest, or half the window) plus twice the most ever buffered, and an empty
        /// queue keeps none.
        #[test]
        fn bytes_leave_in_order_and_pins_stay_bounded(
            window in proptest::sample::select(vec![64 * 1024u32, 256 * 1024, 4 << 20]),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut s = RecvState::new(window, Instant::now());
            let mut pushed = Vec::new();
            let mut taken = Vec::new();
            let mut next = 0u8;
            let mut current = allocation(0);
            let (mut largest, mut most_buffered) = (ALLOC, 0);
            for op in ops {
                match op {
                    Op::Push(n, fresh) => {
                        if let Some(size) = fresh {
                            current = Allocation { id: current.id + 1, size: size.max(n) };
                            largest = largest.max(current.size);
                        }
                        let d: Vec<u8> = (0..n).map(|_| { next = next.wrapping_add(1); next }).collect();
                        s.push(Bytes::from(d.clone()), current);
                        pushed.extend_from_slice(&d);
                        most_buffered = most_buffered.max(s.buffered());
                    }
                    Op::Take(n) => {
                        if let Some(b) = s.take(n.max(1)) {
                            taken.extend_from_slice(&b);
                        }
                    }
                }
                prop_assert_eq!(s.buffered() + taken.len(), pushed.len());
                let slack = (FREE_PINS * largest).max(window as usize / 2);
                prop_assert!(s.pinned() <= slack + 2 * most_buffered);
                prop_assert_eq!(s.runs.iter().map(|r| r.chunks).sum::<usize>(), s.chunks.len());
            }
            while let Some(b) = s.take(usize::MAX) {
                taken.extend_from_slice(&b);
            }
            prop_assert!(taken == pushed, "bytes reordered or changed");
            prop_assert_eq!(s.pinned(), 0);
        }
    }
}
