//! One direction of the simulated transport: an ordered byte pipe (like TCP) whose bytes
//! arrive split at random points, after a latency with jitter, held back by stalls, and
//! which can end with an EOF or go silent for ever.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::options::LinkOptions;
use super::rng::Rng;

/// A piece of the byte stream on its way.
#[derive(Debug)]
struct Segment {
    at: Instant,
    data: Vec<u8>,
}

/// One direction of the link.
#[derive(Debug)]
pub struct Link {
    opts: LinkOptions,
    queue: VecDeque<Segment>,
    /// Delivery times never decrease: the transport is ordered.
    last_at: Instant,
    /// Nothing is delivered before this instant.
    stalled_until: Instant,
    /// The sender closed its end: EOF follows the queued bytes, at this instant or later.
    eof_at: Option<Instant>,
    /// The EOF has been handed to the receiver.
    eof_delivered: bool,
    /// Silent disconnect: every byte, queued or future, is dropped and no EOF comes.
    cut: bool,
    /// Bytes accepted from the sender.
    pub bytes_sent: u64,
    /// Bytes handed to the receiver.
    pub bytes_delivered: u64,
    /// Transmissions cut into more than one piece.
    pub splits: u64,
    /// Stalls started.
    pub stalls: u64,
}

impl Link {
    /// An empty link.
    pub fn new(opts: LinkOptions, now: Instant) -> Link {
        Link {
            opts,
            queue: VecDeque::new(),
            last_at: now,
            stalled_until: now,
            eof_at: None,
            eof_delivered: false,
            cut: false,
            bytes_sent: 0,
            bytes_delivered: 0,
            splits: 0,
            stalls: 0,
        }
    }

    /// Takes bytes from the sender, splitting them at random points into segments that
    /// each get their own (ordered) arrival time. A send may start a stall.
    pub fn send(&mut self, now: Instant, data: &[u8], rng: &mut Rng) {
        if self.cut || self.eof_at.is_some() || data.is_empty() {
            return;
        }
        self.bytes_sent += data.len() as u64;
        if self.opts.stall_per_mille > 0 && rng.chance(self.opts.stall_per_mille) {
            let d = rng.duration(Duration::ZERO, self.opts.stall_max);
            self.stalled_until = self.stalled_until.max(now + d);
            self.stalls += 1;
        }
        let mut rest = data;
        while !rest.is_empty() {
            let n = if rng.chance(self.opts.split_per_mille) {
                rng.range_usize(1, rest.len().min(self.opts.split_max).max(1))
            } else {
                rest.len()
            };
            if n < rest.len() {
                self.splits += 1;
            }
            let (piece, tail) = rest.split_at(n);
            rest = tail;
            let jitter = rng.duration(Duration::ZERO, self.opts.jitter);
            let at = (now + self.opts.latency + jitter).max(self.last_at);
            self.last_at = at;
            // Pieces that arrive together are one segment: fewer simulation steps.
            match self.queue.back_mut() {
                Some(seg) if seg.at == at => seg.data.extend_from_slice(piece),
                _ => self.queue.push_back(Segment {
                    at,
                    data: piece.to_vec(),
                }),
            }
        }
    }

    /// The sender closed its end: an EOF follows whatever is queued.
    pub fn close(&mut self, now: Instant) {
        if self.eof_at.is_none() {
            let at = (now + self.opts.latency).max(self.last_at);
            self.eof_at = Some(at);
        }
    }

    /// The connection breaks at once: queued bytes are lost and an EOF arrives after the
    /// latency (a TCP reset).
    pub fn abort(&mut self, now: Instant) {
        self.queue.clear();
        self.eof_at = Some(now + self.opts.latency);
    }

    /// Silent disconnect: from now on nothing at all arrives, not even an EOF.
    pub fn cut(&mut self) {
        self.cut = true;
        self.queue.clear();
    }

    /// How many bytes the transport holds towards the receiver at most.
    pub fn capacity(&self) -> Option<usize> {
        self.opts.capacity
    }

    /// Whether the link was cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Moves the bytes due at `now` into `inbox`; returns how many.
    pub fn deliver(&mut self, now: Instant, inbox: &mut Vec<u8>) -> usize {
        if self.cut || now < self.stalled_until {
            return 0;
        }
        let mut n = 0;
        while let Some(seg) = self.queue.front() {
            if seg.at > now {
                break;
            }
            let seg = self.queue.pop_front().expect("front exists");
            n += seg.data.len();
            inbox.extend_from_slice(&seg.data);
        }
        self.bytes_delivered += n as u64;
        n
    }

    /// Whether the EOF is due at `now` (all bytes before it delivered); true once.
    pub fn take_eof(&mut self, now: Instant) -> bool {
        if self.cut || self.eof_delivered || !self.queue.is_empty() || now < self.stalled_until {
            return false;
        }
        match self.eof_at {
            Some(at) if at <= now => {
                self.eof_delivered = true;
                true
            }
            _ => false,
        }
    }

    /// When something is next due (bytes or the EOF), if ever.
    pub fn next_due(&self) -> Option<Instant> {
        if self.cut {
            return None;
        }
        let next = match self.queue.front() {
            Some(seg) => Some(seg.at),
            None if !self.eof_delivered => self.eof_at,
            None => None,
        };
        next.map(|at| at.max(self.stalled_until))
    }

    /// Bytes queued and not yet delivered.
    pub fn queued(&self) -> usize {
        self.queue.iter().map(|s| s.data.len()).sum()
    }

    /// Whether the link has nothing more to deliver, ever or for now.
    pub fn is_idle(&self) -> bool {
        self.next_due().is_none()
    }
}
