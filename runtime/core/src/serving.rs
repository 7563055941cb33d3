//! Sans-IO: whether a node admits an op for a shard (invariant 1), one rule for the router and
//! the deterministic simulation. A node admits an op for `shard` at `epoch` only while an actor
//! serves the shard here at that epoch, the slot accepts (no graceful handoff under way), and
//! the node may serve at this instant (its lease, on its own clock, with the map acted on). The
//! same lease is asked again before the op is applied and before it is answered.

/// What admission sees of a shard's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// The epoch the slot's actor serves at, if one runs.
    pub epoch: Option<u64>,
    /// Whether the slot accepts new ops (false during a graceful handoff).
    pub accepting: bool,
}

/// Why an op was not admitted (all retryable: the client asks the owner in its newer map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotServing {
    #[error("no actor serves the shard here")]
    NoActor,
    #[error("served here at epoch {here}, not {asked}")]
    OtherEpoch { here: u64, asked: u64 },
    #[error("the shard is being handed off")]
    NotAccepting,
    #[error("this node's lease has lapsed")]
    LeaseLapsed,
}

/// Admission of an op for epoch `asked` at this instant, where `may_serve` is this node's lease.
pub fn admit(slot: SlotView, asked: u64, may_serve: bool) -> Result<(), NotServing> {
    let here = slot.epoch.ok_or(NotServing::NoActor)?;
    if here != asked {
        return Err(NotServing::OtherEpoch { here, asked });
    }
    if !slot.accepting {
        return Err(NotServing::NotAccepting);
    }
    if !may_serve {
        return Err(NotServing::LeaseLapsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_table() {
        let at = |epoch, accepting| SlotView { epoch, accepting };
        let table = [
            (at(Some(3), true), 3, true, Ok(())),
            (at(None, true), 3, true, Err(NotServing::NoActor)),
            (
                at(Some(2), true),
                3,
                true,
                Err(NotServing::OtherEpoch { here: 2, asked: 3 }),
            ),
            (at(Some(3), false), 3, true, Err(NotServing::NotAccepting)),
            (at(Some(3), true), 3, false, Err(NotServing::LeaseLapsed)),
        ];
        for (slot, asked, lease, want) in table {
            assert_eq!(admit(slot, asked, lease), want, "{slot:?} {asked} {lease}");
        }
    }
}
