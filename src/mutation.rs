//! Planted protocol bugs, for proving that the checkers catch what they claim to. They
//! exist only in `sim` builds (the simulator's); in every other build `active` is a
//! constant `false` and the hooks compile away.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutation {
    /// A read of a prepared key returns the prepared value before the decision.
    ReadUncommitted = 1,
    /// Log records never have to be durable before replies leave.
    SkipSync = 2,
    /// Replicas with odd ids acknowledge a commit without applying it.
    LostCommit = 3,
    /// A core's round checks the lease only at its top, not again for each request: a
    /// process paused after that check serves what arrived during the pause.
    StaleLease = 4,
    /// A core's round sends the replies of its writes before the round's log write and
    /// sync complete.
    EarlyReplies = 5,
    /// The copy driver starts copying without probing the group's members for writes
    /// prepared under an older epoch.
    SkipProbe = 6,
    /// A read of a key with a prepared, undecided write returns the committed value at
    /// once instead of waiting for the decision: since a write is reported once every
    /// replica has prepared it, that value may be older than a reported write.
    ReadPastPrepared = 7,
    /// A checkpoint keeps values but not the decided transactions its core remembers.
    CheckpointForgetsDecisions = 8,
    /// The authority group's leader serves a map it has proposed before raft has
    /// committed it: a leader that dies first leaves a map its successor never made.
    UncommittedMap = 10,
    /// A brick that leaves a partition's group keeps its keys there (memory and disk are
    /// never given back).
    KeepLeftData = 11,
    /// A catch-up's repair writes the source's entries of each differing bucket but
    /// keeps the keys the source no longer holds (removals are not carried).
    RepairKeepsRemoved = 12,
    /// With values in the log, a finished checkpoint deletes every segment before its
    /// start, also those holding values that keys still point to.
    TrimLiveSegments = 13,
    /// The cleaner writes again every value in the segment it cleans, not only those a
    /// key still points to: an overwritten or removed value comes back.
    CleanMovesDead = 14,
}

impl Mutation {
    pub const ALL: [Mutation; 13] = [
        Mutation::ReadUncommitted,
        Mutation::SkipSync,
        Mutation::LostCommit,
        Mutation::StaleLease,
        Mutation::EarlyReplies,
        Mutation::SkipProbe,
        Mutation::ReadPastPrepared,
        Mutation::CheckpointForgetsDecisions,
        Mutation::UncommittedMap,
        Mutation::KeepLeftData,
        Mutation::RepairKeepsRemoved,
        Mutation::TrimLiveSegments,
        Mutation::CleanMovesDead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::ReadUncommitted => "read-uncommitted",
            Mutation::SkipSync => "skip-sync",
            Mutation::LostCommit => "lost-commit",
            Mutation::StaleLease => "stale-lease",
            Mutation::EarlyReplies => "early-replies",
            Mutation::SkipProbe => "skip-probe",
            Mutation::ReadPastPrepared => "read-past-prepared",
            Mutation::CheckpointForgetsDecisions => "checkpoint-forgets-decisions",
            Mutation::UncommittedMap => "uncommitted-map",
            Mutation::KeepLeftData => "keep-left-data",
            Mutation::RepairKeepsRemoved => "repair-keeps-removed",
            Mutation::TrimLiveSegments => "trim-live-segments",
            Mutation::CleanMovesDead => "clean-moves-dead",
        }
    }

    pub fn parse(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[cfg(feature = "sim")]
static ACTIVE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Plants `mutation` (or none) for the whole process.
#[cfg(feature = "sim")]
pub fn plant(mutation: Option<Mutation>) {
    ACTIVE.store(mutation.map_or(0, |m| m as u8), std::sync::atomic::Ordering::Relaxed);
}

#[cfg(feature = "sim")]
#[inline]
pub fn active(mutation: Mutation) -> bool {
    ACTIVE.load(std::sync::atomic::Ordering::Relaxed) == mutation as u8
}

#[cfg(not(feature = "sim"))]
#[inline(always)]
pub fn active(_mutation: Mutation) -> bool {
    false
}
