//! Places that give way: connections that hold a place without having shown what they are
//! for yet (a TLS handshake under way, a request head still coming), oldest first, so that
//! when every place is taken a new connection may take the place of one that has sat too
//! long. Connections held open by a slow client cannot then keep everyone else out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A place among those that may give way: its id, and what ends its wait when it must.
pub(crate) struct Yield {
    /// The place's id, for [`GiveWay::remove`].
    pub(crate) id: u64,
    /// Gets a message when the place must give way; closed when it was removed.
    pub(crate) told: async_channel::Receiver<()>,
}

/// The places that may give way, oldest first.
#[derive(Debug, Default)]
pub(crate) struct GiveWay {
    waiting: VecDeque<(u64, Instant, async_channel::Sender<()>)>,
    next_id: u64,
}

impl GiveWay {
    /// A new place, taken at `now`; ids start at 1.
    pub(crate) fn add(&mut self, now: Instant) -> Yield {
        self.next_id += 1;
        let (tell, told) = async_channel::bounded(1);
        self.waiting.push_back((self.next_id, now, tell));
        Yield {
            id: self.next_id,
            told,
        }
    }

    /// The place `id` no longer gives way (its connection went on, or ended).
    pub(crate) fn remove(&mut self, id: u64) {
        self.waiting.retain(|(w, _, _)| *w != id);
    }

    /// Tells the oldest place, if it has been held for `after` at `now`, to give way, and
    /// forgets it; false when there is none that old.
    pub(crate) fn give_way(&mut self, now: Instant, after: Duration) -> bool {
        match self.waiting.front() {
            Some((_, since, _)) if now.saturating_duration_since(*since) >= after => {
                if let Some((_, _, tell)) = self.waiting.pop_front() {
                    let _ = tell.try_send(());
                }
                true
            }
            _ => false,
        }
    }

    /// The ids of the places, oldest first.
    #[cfg(test)]
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.waiting.iter().map(|(id, _, _)| *id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_place_held_long_enough_gives_way_and_only_once() {
        let mut g = GiveWay::default();
        let start = Instant::now();
        let a = g.add(start);
        let b = g.add(start);
        assert_eq!((a.id, b.id), (1, 2));
        assert!(!g.give_way(start, Duration::from_secs(3600)));
        g.remove(a.id);
        assert!(a.told.is_closed(), "a removed place is never told");
        assert!(g.give_way(start + Duration::from_secs(1), Duration::from_secs(1)));
        assert_eq!(b.told.try_recv(), Ok(()));
        assert!(!g.give_way(start + Duration::from_secs(1), Duration::ZERO));
        assert!(g.ids().is_empty());
    }
}
