//! The snapshot lifecycle (the VSS sequence of DESIGN §4) as a plain state machine: which
//! transitions are legal, and — the point of it — what cleanup is still owed from any state,
//! so that thaw and release always happen, on error, on lease expiry, on shutdown.
//!
//! `Requested → Preparing → Frozen → Taken → Thawed → Reading → Released`

/// Where a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotState {
    Requested,
    Preparing,
    /// The guest is frozen (fsfreeze) or paused: must be thawed within the freeze bound.
    Frozen,
    /// The snapshot point exists; the guest is still frozen.
    Taken,
    /// The guest runs again; the snapshot is held.
    Thawed,
    /// Blocks are being read from the held snapshot.
    Reading,
    /// Nothing is held any more.
    Released,
}

/// Cleanup a snapshot still owes in some state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Unfreeze / resume the guest.
    Thaw,
    /// Drop the snapshot (merge the overlay back).
    Release,
}

/// A transition that is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("snapshot cannot go from {from:?} to {to:?}")]
pub struct IllegalTransition {
    pub from: SnapshotState,
    pub to: SnapshotState,
}

impl SnapshotState {
    /// The next state of the normal sequence.
    pub fn next(self) -> Option<SnapshotState> {
        use SnapshotState::*;
        Some(match self {
            Requested => Preparing,
            Preparing => Frozen,
            Frozen => Taken,
            Taken => Thawed,
            Thawed => Reading,
            Reading => Released,
            Released => return None,
        })
    }

    /// Moves to `to` if that is the next step, or an abort to `Released` once the owed
    /// cleanup has been done (the caller does it in [`SnapshotState::owed`]'s order).
    pub fn advance(self, to: SnapshotState) -> Result<SnapshotState, IllegalTransition> {
        if self.next() == Some(to) || (to == SnapshotState::Released && self != SnapshotState::Released) {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }

    /// What must still be done, in order, to leave nothing frozen and nothing held.
    pub fn owed(self) -> &'static [Cleanup] {
        use SnapshotState::*;
        match self {
            Requested | Preparing | Released => &[],
            // Frozen but no snapshot point yet: the freeze is undone; there is nothing to drop.
            Frozen => &[Cleanup::Thaw],
            Taken => &[Cleanup::Thaw, Cleanup::Release],
            Thawed | Reading => &[Cleanup::Release],
        }
    }

    /// True while the guest is frozen or paused.
    pub fn guest_frozen(self) -> bool {
        matches!(self, SnapshotState::Frozen | SnapshotState::Taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SnapshotState::*;

    const ALL: [SnapshotState; 7] = [Requested, Preparing, Frozen, Taken, Thawed, Reading, Released];

    #[test]
    fn the_normal_sequence_is_the_vss_sequence() {
        let mut s = Requested;
        let mut seen = vec![s];
        while let Some(n) = s.next() {
            s = s.advance(n).unwrap();
            seen.push(s);
        }
        assert_eq!(seen, ALL.to_vec());
    }

    #[test]
    fn skipping_a_step_is_refused() {
        assert!(Requested.advance(Taken).is_err());
        assert!(Frozen.advance(Reading).is_err());
        assert!(Thawed.advance(Frozen).is_err());
        assert!(Released.advance(Released).is_err());
    }

    #[test]
    fn from_every_state_the_owed_cleanup_thaws_before_it_releases_and_leaves_nothing() {
        for s in ALL {
            let owed = s.owed();
            // A frozen guest is always thawed, and thawed first.
            assert_eq!(s.guest_frozen(), owed.first() == Some(&Cleanup::Thaw), "{s:?}");
            // Anything that holds a snapshot point releases it.
            let holds = matches!(s, Taken | Thawed | Reading);
            assert_eq!(holds, owed.contains(&Cleanup::Release), "{s:?}");
            if s != Released {
                assert_eq!(s.advance(Released), Ok(Released), "{s:?} can always be aborted");
            }
        }
    }
}
