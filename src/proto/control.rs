//! The control plane's payloads and timing, shared by the bricks and the map authority:
//! the `Register` request and its answer (JSON in a frame's value), and the heartbeat,
//! lease and removal times both sides rely on.

use serde::{Deserialize, Serialize};

/// How often a brick tells the authority it is alive.
pub const HEARTBEAT_MS: u64 = 50;
/// A brick that has heard nothing from the authority for this long stops serving: the
/// authority removes a silent brick after `BRICK_TIMEOUT_MS`, which is longer, so a
/// removed brick has fenced itself before anyone writes without it.
pub const LEASE_MS: u64 = 500;
/// A brick silent for this long is removed by the authority (longer than `LEASE_MS`).
pub const BRICK_TIMEOUT_MS: u64 = 1500;
const _: () = assert!(LEASE_MS < BRICK_TIMEOUT_MS && HEARTBEAT_MS < LEASE_MS);

/// A brick's `Register` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registration {
    /// The id it had before, if any.
    pub id: Option<u32>,
    /// Where it serves and its directory's token, as the map will hold them (the JSON
    /// fields `cores`, `rdma`, `token`).
    #[serde(flatten)]
    pub addr: crate::map::BrickAddr,
}

/// The authority's answer to `Register`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registered {
    pub id: u32,
}

/// What a map authority member says of itself (its answer to `Op::Stats`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub term: u64,
    /// The leader's id as this member knows it (0: none).
    pub leader: u64,
    /// The epoch of the map it holds committed.
    pub epoch: u64,
}

impl MemberStatus {
    /// Its role as `cluster status` and `dds members` print it.
    pub fn role(&self) -> String {
        match self.leader {
            l if l == self.id => format!("leader, term {}", self.term),
            0 => format!("no leader known, term {}", self.term),
            l => format!("follower of member {l}, term {}", self.term),
        }
    }
}

/// A request about the authority group's membership (`Op::Members`). Changes go to the
/// leader (others answer `NotLeader`), one at a time, as raft configuration changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRequest {
    /// The members as this one knows them.
    List,
    /// Member `id` serves at `addr` and joins the group (ids are never reused).
    Add { id: u64, addr: std::net::SocketAddr },
    /// Member `id` leaves the group.
    Remove { id: u64 },
}

/// The answer to a `MemberRequest`: the group's voters (after the change, for one that
/// changes it) with their addresses, the group as it started (where a joining member's
/// raft log begins), and the lowest id never given out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberList {
    pub members: Vec<(u64, std::net::SocketAddr)>,
    pub boot: Vec<(u64, std::net::SocketAddr)>,
    pub next_id: u64,
}
