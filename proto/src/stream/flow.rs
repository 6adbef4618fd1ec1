//! Credit windows. Checked arithmetic throughout: a peer cannot overflow a counter.

use crate::MAX_WINDOW;

/// Credit this side may still spend sending (granted by the peer, not yet used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendWindow {
    credit: u64,
}

impl SendWindow {
    pub(crate) fn new(initial: u32) -> Self {
        SendWindow {
            credit: u64::from(initial),
        }
    }

    pub(crate) fn credit(&self) -> u64 {
        self.credit
    }

    /// Spends `n` bytes; the caller never spends more than [`Self::credit`].
    pub(crate) fn consume(&mut self, n: u64) {
        debug_assert!(n <= self.credit, "spent {n} with credit {}", self.credit);
        self.credit = self.credit.saturating_sub(n);
    }

    /// Adds the peer's increment; `Err` when the window would exceed [`MAX_WINDOW`].
    pub(crate) fn grant(&mut self, increment: u32) -> Result<(), ()> {
        let c = self.credit + u64::from(increment);
        if c > u64::from(MAX_WINDOW) {
            return Err(());
        }
        self.credit = c;
        Ok(())
    }
}

/// What this side has allowed the peer to send, and what it owes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecvWindow {
    /// What the peer may have sent and this side not yet released: the most it buffers.
    window: u32,
    /// Bytes the peer may still send before our next update.
    remaining: u64,
    /// Bytes released (processed or read) but not yet returned to the peer.
    pending: u64,
}

impl RecvWindow {
    pub(crate) fn new(window: u32) -> Self {
        RecvWindow {
            window,
            remaining: u64::from(window),
            pending: 0,
        }
    }

    /// The current window: what the peer may have sent that this side has not released.
    pub(crate) fn window(&self) -> u32 {
        self.window
    }

    /// Records `n` received bytes; `Err` when the peer exceeded its credit.
    pub(crate) fn on_receive(&mut self, n: u64) -> Result<(), ()> {
        if n > self.remaining {
            return Err(());
        }
        self.remaining -= n;
        Ok(())
    }

    /// Records `n` bytes released; returns the increment to send once at least half the
    /// window is owed (fewer, larger updates; the sender never stalls while half remains).
    pub(crate) fn on_release(&mut self, n: u64) -> Option<u32> {
        self.pending += n;
        if self.pending >= u64::from(self.window / 2).max(1) {
            let inc = self.pending.min(u64::from(MAX_WINDOW)) as u32;
            self.pending -= u64::from(inc);
            self.remaining += u64::from(inc);
            return Some(inc);
        }
        None
    }

    /// Narrows the window by up to `by` bytes, never below `min`, out of the `from` bytes
    /// [`Self::on_release`] just returned (credit can only be held back, never taken
    /// back); returns how much: the caller sends that much less.
    pub(crate) fn shrink(&mut self, by: u32, min: u32, from: u32) -> u32 {
        let by = by.min(self.window.saturating_sub(min)).min(from);
        self.window -= by;
        self.remaining -= u64::from(by);
        by
    }

    /// Whether what the peer may still send, what was released and not yet returned, and
    /// the `unreleased` bytes received stay within the window (less once bytes are dropped
    /// unread, or released after the peer's FIN, when no credit returns).
    pub(crate) fn holds(&self, unreleased: usize) -> bool {
        self.remaining + self.pending + unreleased as u64 <= u64::from(self.window)
    }

    /// Widens the window by up to `by` bytes, never beyond `max`, and returns how much:
    /// credit the caller adds to the update it sends.
    pub(crate) fn grow(&mut self, by: u32, max: u32) -> u32 {
        let by = by.min(max.saturating_sub(self.window));
        self.window += by;
        self.remaining += u64::from(by);
        by
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overflowing_grant_is_refused() {
        let mut w = SendWindow::new(MAX_WINDOW);
        assert!(w.grant(1).is_err());
        assert_eq!(w.credit(), u64::from(MAX_WINDOW));
        let mut w = SendWindow::new(0);
        assert!(w.grant(u32::MAX).is_err());
    }

    #[test]
    fn receive_beyond_window_is_refused() {
        let mut r = RecvWindow::new(10);
        assert!(r.on_receive(10).is_ok());
        assert!(r.on_receive(1).is_err());
    }

    proptest! {
        /// A sender obeying the credit it was given never overruns the receiver, and the
        /// receiver's credit returns as bytes are released.
        #[test]
        fn sender_and_receiver_agree(window in 1u32..100_000, extra in 0u32..300_000, ops in proptest::collection::vec((any::<bool>(), 1u64..50_000), 1..200)) {
            let mut s = SendWindow::new(window);
            let mut r = RecvWindow::new(window);
            let max = window.saturating_add(extra);
            let mut unreleased = 0u64;
            let mut owed_updates = Vec::new();
            for (send, n) in ops {
                if send {
                    let n = n.min(s.credit());
                    s.consume(n);
                    prop_assert!(r.on_receive(n).is_ok());
                    unreleased += n;
                } else {
                    let n = n.min(unreleased);
                    unreleased -= n;
                    if let Some(inc) = r.on_release(n) {
                        // Growing at an update adds to it, as the connection does.
                        let grown = if n % 3 == 0 { r.grow(window, max) } else { 0 };
                        owed_updates.push(inc + grown);
                    }
                }
                for inc in owed_updates.drain(..) { prop_assert!(s.grant(inc).is_ok()); }
                // Credit seen by the sender equals what the receiver will still accept.
                prop_assert_eq!(s.credit(), r.remaining);
                prop_assert!(unreleased <= u64::from(r.window()));
                prop_assert!(r.window() <= max);
            }
        }
    }
}
