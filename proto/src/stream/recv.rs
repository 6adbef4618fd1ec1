//! The receiving half of a stream.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::flow::RecvWindow;

/// How many receive allocations a stream's unread chunks may keep alive beyond twice
/// their bytes (see [`RecvState::push`]).
const FREE_PINS: usize = 2;

/// The receive allocation a payload shares: which one (a number the connection changes
/// whenever it takes another) and how large it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allocation {
    pub(crate) id: u64,
    pub(crate) size: usize,
}

/// A receive allocation kept alive by some of a stream's unread chunks.
#[derive(Debug, Clone, Copy)]
struct Pin {
    allocation: Allocation,
    /// How many of the stream's shared chunks lie in it.
    chunks: usize,
}

#[derive(Debug)]
pub(crate) struct RecvState {
    /// Received chunks, in order: first the ones that share a receive allocation (see
    /// `pins`), then copies.
    pub(crate) chunks: VecDeque<Bytes>,
    /// Sum of `chunks` lengths; never above the stream's window.
    pub(crate) buffered: usize,
    /// The receive allocations the first chunks share, in their order; the chunks after
    /// them are copies.
    pins: VecDeque<Pin>,
    /// How many of `chunks`, from the front, are shared.
    shared_chunks: usize,
    /// Their bytes.
    shared_bytes: usize,
    /// The sizes of the allocations in `pins`, together.
    pinned: usize,
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
            pins: VecDeque::new(),
            shared_chunks: 0,
            shared_bytes: 0,
            pinned: 0,
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

    /// Queues a payload decoded from receive allocation `from`, and returns how many of
    /// its bytes were copied (none or all).
    ///
    /// A payload shares its allocation, which holds other frames too, other streams'
    /// among them: a reader that lags would keep alive whole allocations for a few bytes
    /// of its own in each (a peer sending one byte for it between every 64 KiB for
    /// another stream would make a 256 KiB window hold 16 GiB). So a payload stays shared
    /// only if its allocation is the one the stream's last chunk shares, or keeping one
    /// more allocation alive leaves them within twice the bytes the shared chunks hold
    /// plus [`FREE_PINS`] allocations of its size; otherwise it is copied, and so is
    /// every payload after it until the queue is empty. The allocations a stream keeps
    /// alive thus never exceed twice its window plus two of the largest; a download
    /// whose allocations hold mostly its own frames is never copied, however far its
    /// reader lags (the first and the last allocation it keeps alive may hold little of
    /// it, the free two are for them).
    pub(crate) fn push(&mut self, payload: Bytes, from: Allocation) -> usize {
        let len = payload.len();
        self.buffered += len;
        let copy = if self.shared_chunks < self.chunks.len() {
            true
        } else if self.pins.back().is_some_and(|p| p.allocation == from) {
            false
        } else {
            self.pinned + from.size > 2 * (self.shared_bytes + len) + FREE_PINS * from.size
        };
        if copy {
            self.chunks.push_back(Bytes::copy_from_slice(&payload));
            return len;
        }
        match self.pins.back_mut() {
            Some(pin) if pin.allocation == from => pin.chunks += 1,
            _ => {
                self.pins.push_back(Pin {
                    allocation: from,
                    chunks: 1,
                });
                self.pinned += from.size;
            }
        }
        self.shared_chunks += 1;
        self.shared_bytes += len;
        self.chunks.push_back(payload);
        0
    }

    /// Takes up to `max` bytes off the front.
    pub(crate) fn take(&mut self, max: usize) -> Option<Bytes> {
        let front = self.chunks.front_mut()?;
        let whole = front.len() <= max;
        let out = if whole {
            self.chunks.pop_front()?
        } else {
            front.split_to(max)
        };
        if self.shared_chunks > 0 {
            self.shared_bytes -= out.len();
            if whole {
                self.shared_chunks -= 1;
                if let Some(pin) = self.pins.front_mut() {
                    pin.chunks -= 1;
                    if pin.chunks == 0 {
                        self.pinned -= pin.allocation.size;
                        self.pins.pop_front();
                    }
                }
            }
        }
        self.buffered -= out.len();
        self.read += out.len() as u64;
        Some(out)
    }

    /// Drops every unread chunk (the application reset the stream).
    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.pins.clear();
        self.buffered = 0;
        self.shared_chunks = 0;
        self.shared_bytes = 0;
        self.pinned = 0;
    }

    /// The sizes of the receive allocations the unread chunks keep alive, together.
    pub(crate) fn pinned(&self) -> usize {
        self.pinned
    }

    /// The most [`pinned`](Self::pinned) can be, given the largest allocation and the
    /// largest window the stream can have.
    pub(crate) fn pin_limit(largest_allocation: usize, max_window: u32) -> usize {
        FREE_PINS * largest_allocation + 2 * max_window as usize
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

    fn state() -> RecvState {
        RecvState::new(u32::MAX, Instant::now())
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
            while s.buffered > lag {
                s.take(64 * 1024);
            }
        }
        assert_eq!(copied, 0);
        assert!(s.pinned() > 4 << 20, "the reader lags at the end");
    }

    /// One byte between every allocation's worth of another stream's frames would keep
    /// one allocation alive per byte: past two allocations those bytes are copied, and
    /// every byte after them, until the reader has caught up.
    #[test]
    fn a_stream_with_a_few_bytes_in_each_allocation_keeps_two_alive() {
        let mut s = state();
        let mut copied = 0;
        for id in 0..1000 {
            copied += s.push(payload(1, id as u8), allocation(id));
        }
        assert_eq!(copied, 998);
        assert_eq!(s.pinned(), 2 * ALLOC);
        // Reading frees the pins in order, and the bytes come out in order.
        for id in 0..1000u64 {
            let b = s.take(usize::MAX).expect("a chunk");
            assert_eq!(&b[..], [id as u8]);
            if id == 0 {
                assert_eq!(s.pinned(), ALLOC);
            }
        }
        assert_eq!((s.pinned(), s.buffered), (0, 0));
        // An empty queue shares again.
        assert_eq!(s.push(payload(1, 0), allocation(5000)), 0);
        assert_eq!(s.pinned(), ALLOC);
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
        assert_eq!((s.pinned(), s.buffered, s.chunks.len()), (0, 0, 0));
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

        /// Whatever the payloads and allocations, the bytes come out in the order they came
        /// in, the allocations kept alive stay within two of the largest plus twice the
        /// most ever buffered, and an empty queue keeps none.
        #[test]
        fn bytes_leave_in_order_and_pins_stay_bounded(ops in proptest::collection::vec(op(), 1..200)) {
            let mut s = state();
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
                        most_buffered = most_buffered.max(s.buffered);
                    }
                    Op::Take(n) => {
                        if let Some(b) = s.take(n.max(1)) {
                            taken.extend_from_slice(&b);
                        }
                    }
                }
                prop_assert_eq!(s.buffered + taken.len(), pushed.len());
                prop_assert!(s.pinned() <= FREE_PINS * largest + 2 * most_buffered);
            }
            while let Some(b) = s.take(usize::MAX) {
                taken.extend_from_slice(&b);
            }
            prop_assert!(taken == pushed, "bytes reordered or changed");
            prop_assert_eq!(s.pinned(), 0);
        }
    }
}
