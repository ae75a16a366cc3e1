//! Deadlines of sessions and rooms in one min-heap with lazy deletion.
//!
//! Each session or room keeps the deadline of its one live entry
//! (`timer_at`). Activity that only pushes a deadline later (every received
//! frame does) costs nothing here: when the old entry pops early the owner
//! recomputes and pushes again. Only a deadline that moves earlier pushes a new
//! entry; the superseded one is skipped when it pops. So a tick costs
//! O(expired · log n), never O(sessions).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::ids::{RoomId, SessionKey};
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TimerTarget {
    Session(SessionKey),
    Room(RoomId),
}

#[derive(Default)]
pub(crate) struct TimerQueue {
    heap: BinaryHeap<Reverse<(Timestamp, TimerTarget)>>,
}

impl TimerQueue {
    /// Ensures `target` is woken at `deadline` or earlier; `live` is the
    /// owner's `timer_at`.
    pub(crate) fn schedule(
        &mut self,
        live: &mut Option<Timestamp>,
        deadline: Timestamp,
        target: TimerTarget,
    ) {
        if live.is_none_or(|current| deadline < current) {
            *live = Some(deadline);
            self.heap.push(Reverse((deadline, target)));
        }
    }

    /// Pops the earliest entry due at `now`.
    pub(crate) fn pop_due(&mut self, now: Timestamp) -> Option<(Timestamp, TimerTarget)> {
        let Reverse((deadline, _)) = self.heap.peek()?;
        if *deadline > now {
            return None;
        }
        self.heap.pop().map(|Reverse(entry)| entry)
    }

    /// The earliest deadline, possibly of a superseded entry (an early wake-up
    /// is harmless).
    pub(crate) fn next(&self) -> Option<Timestamp> {
        self.heap.peek().map(|Reverse((deadline, _))| *deadline)
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}
