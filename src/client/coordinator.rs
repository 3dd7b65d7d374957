//! The life of one operation in the client: route, send, react to each reply or loss,
//! retry with a newer map, and, for writes to replicated partitions, coordinate
//! two-phase commit. The coordinator's rule is the one replicas use when in doubt
//! (ARCHITECTURE.md): commit exactly when every participant voted yes or has left the
//! map (dead); abort when one voted no. It never aborts a transaction whose votes are
//! all yes, so a replica that finds all its live peers prepared may commit alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::map::{key_hash, BrickId, ClusterMap};
use crate::proto::{Op, PrepareBody, Status, TxId, TxState, WriteKind};

use super::core::{ClientCore, Reply};
use super::{ClientError, Outcome, Request};

/// What a client has seen of the cluster, for people and tests (lazy repair counts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Newer maps installed, from any source.
    pub maps_installed: u64,
    /// Of those, fetched because a brick was lost or silent.
    pub maps_fetched: u64,
    /// `StaleEpoch` replies (each a lazy repair: the reply carried the map).
    pub stale_replies: u64,
    /// Operations sent again (stale map, lost brick, lock conflict).
    pub retries: u64,
    /// Transactions aborted because a replica voted no.
    pub aborts: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Get,
    Put,
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vote {
    /// Prepared; `true` if the key existed there (a remove reports `Removed`).
    Yes(bool),
    No,
    /// The connection broke before an answer.
    Lost,
}

enum Phase {
    /// Waiting to (re)start at `timer`.
    Idle,
    Read { brick: BrickId },
    Direct { brick: BrickId },
    Prepare { txid: TxId, participants: Vec<BrickId>, votes: Vec<(BrickId, Vote)> },
    /// Every participant voted yes or left the map, but one left without a yes: before
    /// committing, ask the live ones what they know. One that resolved the transaction
    /// while in doubt may have aborted it on the word of the departed one (which never
    /// prepared, and said so).
    Confirm { txid: TxId, participants: Vec<BrickId>, votes: Vec<(BrickId, Vote)>, answers: Vec<(BrickId, Option<TxState>)> },
    /// An abort sent: waiting for every participant still in the map to acknowledge it
    /// (a commit is not waited for: see `decide`). `reconfirm`: a participant which
    /// may have committed in doubt (it did not vote no) left the map without
    /// acknowledging; retrying could apply the
    /// write twice (its peers may have committed it in doubt once the no voter left
    /// too), so the live participants are asked first (`Confirm`). Not set when the
    /// abort came from there, on a live participant's "aborted" (a fenced brick does
    /// not answer, so the answer proves it is still a member, and while it is, no one
    /// can commit in doubt), unless a participant leaves after that.
    Abort { txid: TxId, pending: Vec<BrickId>, participants: Vec<BrickId>, votes: Vec<(BrickId, Vote)>, reconfirm: bool },
}

pub(crate) struct OpState {
    kind: OpKind,
    key: Vec<u8>,
    value: Vec<u8>,
    deadline: Instant,
    phase: Phase,
    /// When to restart (Idle) or look again at silent or lost bricks.
    timer: Option<Instant>,
    attempts: u32,
    /// Bricks that failed this operation's reads: tried last.
    avoid: Vec<BrickId>,
    /// A message of this attempt went unanswered past the suspicion time.
    suspect: bool,
    why: String,
}

/// How long to wait before attempt `n` after a conflict: grows, with jitter by token so
/// clients that collided do not collide again.
fn backoff(attempts: u32, token: u64) -> Duration {
    let base_us = 50u64 << attempts.min(10);
    Duration::from_micros(base_us.min(20_000) + (token.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54))
}

impl OpState {
    pub(crate) fn new(request: Request<'_>, deadline: Instant) -> OpState {
        let (kind, key, value) = match request {
            Request::Get(k) => (OpKind::Get, k, &[][..]),
            Request::Put(k, v) => (OpKind::Put, k, v),
            Request::Remove(k) => (OpKind::Remove, k, &[][..]),
        };
        OpState {
            kind,
            key: key.to_vec(),
            value: value.to_vec(),
            deadline,
            phase: Phase::Idle,
            timer: None,
            attempts: 0,
            avoid: Vec::new(),
            suspect: false,
            why: String::new(),
        }
    }

    pub(crate) fn timer_due(&self, now: Instant) -> bool {
        self.timer.is_some_and(|t| t <= now) || now >= self.deadline
    }

    pub(crate) fn next_timer(&self) -> Option<Instant> {
        Some(self.timer.map_or(self.deadline, |t| t.min(self.deadline)))
    }

    fn name(&self) -> &'static str {
        match self.kind {
            OpKind::Get => "get",
            OpKind::Put => "put",
            OpKind::Remove => "remove",
        }
    }
}

/// The error for a write whose message was lost: `Unknown`, it may have been applied.
fn lost_write(op: &OpState, config: &super::ClientConfig, why: String) -> ClientError {
    ClientError::Unknown { op: op.name(), timeout_ms: config.op_timeout.as_millis() as u64, why }
}

/// What a committed write reports: a remove says whether the key existed.
fn outcome_of(kind: OpKind, votes: &[(BrickId, Vote)]) -> Outcome {
    let existed = votes.iter().any(|(_, v)| matches!(v, Vote::Yes(true)));
    match kind {
        OpKind::Remove if !existed => Outcome::NotFound,
        OpKind::Remove => Outcome::Removed,
        _ => Outcome::Stored,
    }
}

/// The vote a prepare's reply amounts to.
fn vote_of(status: Option<Status>, value: &[u8]) -> Vote {
    match status {
        Some(Status::Ok) => Vote::Yes(value.first() == Some(&1)),
        Some(_) => Vote::No,
        None => Vote::Lost,
    }
}

impl ClientCore {
    fn retry_in(&mut self, token: u64, after: Duration, why: String) {
        self.stats.retries += 1;
        if let Some(op) = self.ops.get_mut(&token) {
            op.phase = Phase::Idle;
            op.suspect = false;
            op.timer = Some(self.now + after);
            op.attempts += 1;
            op.why = why;
        }
    }

    /// A reply that carried a map (`StaleEpoch`): install it.
    fn repair(&mut self, value: &[u8]) {
        self.stats.stale_replies += 1;
        if let Ok(map) = ClusterMap::from_json(&String::from_utf8_lossy(value)) {
            self.install(map);
        }
    }

    /// Routes and sends the operation anew with the current map.
    pub(crate) fn start(&mut self, token: u64) {
        let Some(op) = self.ops.get_mut(&token) else { return };
        op.timer = None;
        let hash = key_hash(&op.key);
        // A cheap handle on the map: `send` below needs `self` mutably.
        let map = Arc::clone(&self.map);
        let (p, group) = map.route(hash);
        let kind = op.kind;
        let key = std::mem::take(&mut op.key);
        let value = std::mem::take(&mut op.value);
        let attempts = op.attempts;
        let result = match kind {
            OpKind::Get => {
                // Spread by token over the replicas this operation has not seen fail;
                // over all of them when every one has.
                let fresh = map.readable(p).filter(|b| !op.avoid.contains(b)).count();
                let spin = token as usize + attempts as usize;
                let brick = if fresh > 0 {
                    map.readable(p).filter(|b| !op.avoid.contains(b)).nth(spin % fresh)
                } else {
                    map.readable(p).nth(spin % map.readable(p).count().max(1))
                }
                .expect("a map has a readable replica for every partition");
                op.phase = Phase::Read { brick };
                self.send(token, brick, Op::Get, &key, &[]).map_err(|e| (brick, e))
            }
            OpKind::Put | OpKind::Remove if group.len() == 1 => {
                let brick = group[0];
                op.phase = Phase::Direct { brick };
                let wire = if kind == OpKind::Put { Op::Put } else { Op::Remove };
                self.send(token, brick, wire, &key, &value).map_err(|e| (brick, e))
            }
            OpKind::Put | OpKind::Remove => {
                let txid = TxId { client: self.client_id, seq: self.next_seq };
                self.next_seq += 1;
                let ids: Vec<u32> = group.iter().map(|b| b.0).collect();
                let write = if kind == OpKind::Put { WriteKind::Put } else { WriteKind::Remove };
                let mut body = Vec::with_capacity(32 + value.len());
                PrepareBody::encode(txid, write, &ids, &value, &mut body);
                op.phase = Phase::Prepare { txid, participants: group.to_vec(), votes: Vec::new() };
                let mut lost = Vec::new();
                for &b in group {
                    if self.send(token, b, Op::Prepare, &key, &body).is_err() {
                        lost.push(b);
                    }
                }
                if let Some(Phase::Prepare { votes, .. }) = self.ops.get_mut(&token).map(|o| &mut o.phase) {
                    votes.extend(lost.iter().map(|&b| (b, Vote::Lost)));
                }
                Ok(())
            }
        };
        if let Some(op) = self.ops.get_mut(&token) {
            op.key = key;
            op.value = value;
        }
        match result {
            Ok(()) => {
                if matches!(kind, OpKind::Put | OpKind::Remove) && group.len() > 1 {
                    self.evaluate(token);
                }
            }
            Err((brick, e)) => {
                if let Some(op) = self.ops.get_mut(&token) {
                    op.avoid.push(brick);
                }
                self.fetch_map();
                self.retry_in(token, Duration::from_millis(5), e.to_string());
            }
        }
    }

    pub(crate) fn on_reply(&mut self, mut r: Reply) {
        let Some(op) = self.ops.get_mut(&r.token) else { return };
        let token = r.token;
        match &mut op.phase {
            Phase::Read { brick } | Phase::Direct { brick } if *brick == r.brick => {
                let brick = *brick;
                let outcome = match (op.kind, r.status) {
                    (OpKind::Get, Some(Status::Ok)) => Some(Outcome::Value(std::mem::take(&mut r.value))),
                    (OpKind::Put, Some(Status::Ok)) => Some(Outcome::Stored),
                    (OpKind::Remove, Some(Status::Ok)) => Some(Outcome::Removed),
                    (OpKind::Get | OpKind::Remove, Some(Status::NotFound)) => Some(Outcome::NotFound),
                    _ => None,
                };
                if let Some(outcome) = outcome {
                    return self.complete(token, Ok(outcome));
                }
                match r.status {
                    Some(Status::StaleEpoch) => {
                        self.repair(&r.value);
                        self.retry_in(token, Duration::ZERO, "stale map".into());
                    }
                    Some(Status::Behind) => self.retry_in(token, Duration::from_millis(1), "brick behind the map".into()),
                    Some(Status::Conflict) => {
                        let attempts = op.attempts;
                        self.retry_in(token, backoff(attempts, token), "key locked".into());
                    }
                    Some(status @ (Status::Unavailable | Status::WrongShard)) => {
                        op.avoid.push(brick);
                        let why = format!("{brick}: {}: {}", status.name(), String::from_utf8_lossy(&r.value));
                        self.fetch_map();
                        self.retry_in(token, Duration::from_millis(5), why);
                    }
                    None if op.kind != OpKind::Get => {
                        // A one-phase write lost on the wire may have been applied, and
                        // sending it again could apply it a second time after a later
                        // write: its outcome is unknown.
                        let err = lost_write(op, &self.config, format!("connection to {brick} lost with the write on it"));
                        self.fetch_map();
                        self.complete(token, Err(err));
                    }
                    None => {
                        op.avoid.push(brick);
                        self.fetch_map();
                        self.retry_in(token, Duration::from_millis(5), format!("connection to {brick} lost"));
                    }
                    Some(status) => {
                        let err = ClientError::Refused { op: r.op.name(), brick, status, message: String::from_utf8_lossy(&r.value).into_owned() };
                        self.complete(token, Err(err));
                    }
                }
            }
            Phase::Prepare { votes, participants, .. } if r.op == Op::Prepare => {
                if !participants.contains(&r.brick) || votes.iter().any(|(b, _)| *b == r.brick) {
                    return;
                }
                let vote = vote_of(r.status, &r.value);
                votes.push((r.brick, vote));
                if vote == Vote::No {
                    op.why = format!("{} voted no: {} {}", r.brick, r.status.map_or("connection lost", |s| s.name()), String::from_utf8_lossy(&r.value));
                }
                match r.status {
                    Some(Status::StaleEpoch) => self.repair(&r.value),
                    Some(Status::WrongShard) | None => self.fetch_map(),
                    _ => {}
                }
                self.evaluate(token);
            }
            Phase::Confirm { participants, answers, .. } if r.op == Op::Resolve => {
                if !participants.contains(&r.brick) || answers.iter().any(|(b, _)| *b == r.brick) {
                    return;
                }
                let state = match r.status {
                    Some(Status::Ok) if r.value.len() == 1 => TxState::from_u8(r.value[0]),
                    _ => None,
                };
                if state.is_none() {
                    // Lost, fenced or busy: asked again on the timer.
                    if op.timer.is_none() {
                        op.timer = Some(self.now + Duration::from_millis(20));
                    }
                    return;
                }
                answers.push((r.brick, state));
                self.confirm(token);
            }
            Phase::Abort { txid, participants, votes, .. } if r.op == Op::Abort && matches!(r.status, Some(Status::Conflict | Status::NotFound)) => {
                // The participant committed the transaction while in doubt (`NotFound`:
                // not aborted there) or keeps it prepared because a participant left
                // the map (`Conflict`): the live participants decide it among
                // themselves, and this client follows what they answer (`Confirm`).
                // Retrying now could apply the write twice.
                op.why = format!("{}: {} {}", r.brick, r.status.map_or("connection lost", |s| s.name()), String::from_utf8_lossy(&r.value));
                let (txid, participants, votes) = (*txid, std::mem::take(participants), std::mem::take(votes));
                op.phase = Phase::Confirm { txid, participants, votes, answers: Vec::new() };
                op.timer = Some(self.now + Duration::from_millis(20));
            }
            Phase::Abort { pending, reconfirm, .. } if r.op == Op::Abort => {
                if r.status.is_none() && self.map.bricks().contains_key(&r.brick) {
                    // Still a member: the timer tells it again on a new connection.
                    op.timer = Some(self.now + Duration::from_millis(20));
                    return;
                }
                if r.status.is_none() {
                    // A departure since any confirmation: the "aborted" it rested on
                    // may be a member's no longer (ask again).
                    *reconfirm = true;
                }
                pending.retain(|b| *b != r.brick);
                self.finish_abort(token);
            }
            _ => {} // a reply from an earlier attempt
        }
    }

    /// Decides a transaction once its votes allow.
    fn evaluate(&mut self, token: u64) {
        let Some(op) = self.ops.get_mut(&token) else { return };
        let Phase::Prepare { txid, participants, votes } = &op.phase else { return };
        let map = &self.map;
        let vote = |b: &BrickId| votes.iter().find(|(x, _)| x == b).map(|(_, v)| *v);
        let gone = |b: &BrickId| !map.bricks().contains_key(b);
        let (txid, participants) = (*txid, participants.clone());
        if participants.iter().all(gone) {
            // Every participant left the map before this client learned the outcome.
            // They may have committed it among themselves (in doubt, all prepared) and
            // served it before they died, so a retry could apply the write twice; and
            // committing here would claim a write no live replica may hold. A "no" from
            // one of them changes nothing: peers decide in doubt without a departed
            // participant (a brick paused past its removal answers "fenced" long after).
            let timeout_ms = self.config.op_timeout.as_millis() as u64;
            let err = ClientError::Unknown { op: op.name(), timeout_ms, why: format!("every participant of {txid} left the map before its outcome was known") };
            return self.complete(token, Err(err));
        }
        // Only a live participant's "no" aborts: the others commit in doubt once a
        // participant has left the map, whatever it answered.
        let any_no = participants.iter().any(|b| vote(b) == Some(Vote::No) && !gone(b));
        let all_yes = participants.iter().all(|b| matches!(vote(b), Some(Vote::Yes(_))) || gone(b));
        let commit = if any_no {
            false
        } else if all_yes {
            true
        } else {
            let lost = participants.iter().any(|b| matches!(vote(b), Some(Vote::Lost)) && !gone(b));
            if (lost || op.suspect) && op.timer.is_none() {
                // A lost or silent participant: wait for the authority to remove it (or
                // for its answer), looking at the map now and then.
                op.timer = Some(self.now + Duration::from_millis(20));
            }
            return;
        };
        let departed_without_yes = participants.iter().any(|b| gone(b) && !matches!(vote(b), Some(Vote::Yes(_))));
        if commit && departed_without_yes {
            let votes = votes.clone();
            op.phase = Phase::Confirm { txid, participants, votes, answers: Vec::new() };
            op.timer = None;
            return self.ask_live(token);
        }
        self.decide(token, txid, participants, commit);
    }

    /// Asks every live participant not yet answered what it knows of the transaction.
    fn ask_live(&mut self, token: u64) {
        let Some(op) = self.ops.get_mut(&token) else { return };
        let Phase::Confirm { txid, participants, answers, .. } = &op.phase else { return };
        let map = &self.map;
        let ask: Vec<BrickId> = participants.iter().copied().filter(|b| map.bricks().contains_key(b) && !answers.iter().any(|(x, _)| x == b)).collect();
        let (txid, key) = (*txid, op.key.clone());
        let mut failed = false;
        for b in ask {
            let on_wire = self.msgs.values().any(|m| m.token == token && m.brick == b && m.op == Op::Resolve);
            if !on_wire && self.send(token, b, Op::Resolve, &key, &txid.to_bytes()).is_err() {
                failed = true;
            }
        }
        if failed {
            if let Some(op) = self.ops.get_mut(&token) {
                op.timer = Some(self.now + Duration::from_millis(20));
            }
        }
        self.confirm(token);
    }

    /// Decides a confirming transaction once every live participant answered: any
    /// committed, commit; any aborted, abort; all prepared, commit (no one can abort it
    /// now: the only participant that could say "never prepared" has left the map).
    fn confirm(&mut self, token: u64) {
        let Some(op) = self.ops.get_mut(&token) else { return };
        let Phase::Confirm { txid, participants, answers, .. } = &op.phase else { return };
        let map = &self.map;
        let live: Vec<BrickId> = participants.iter().copied().filter(|b| map.bricks().contains_key(b)).collect();
        if live.is_empty() {
            let timeout_ms = self.config.op_timeout.as_millis() as u64;
            let err = ClientError::Unknown { op: op.name(), timeout_ms, why: format!("every participant of {txid} left the map before its outcome was known") };
            return self.complete(token, Err(err));
        }
        let answer = |b: &BrickId| answers.iter().find(|(x, _)| x == b).and_then(|(_, s)| *s);
        if live.iter().any(|b| answer(b).is_none()) {
            return;
        }
        let commit = !live.iter().any(|b| answer(b) == Some(TxState::Aborted)) || live.iter().any(|b| answer(b) == Some(TxState::Committed));
        if !commit {
            op.why = format!("{txid}: a participant had aborted it while in doubt");
        }
        let (txid, participants) = (*txid, participants.clone());
        self.decide(token, txid, participants, commit);
    }

    /// Phase two: sends the decision to every participant that may hold the prepare and
    /// is alive. A commit completes the write at once: every participant still in the
    /// map holds it prepared and durable, and from there the only outcome any of them
    /// can reach, with this client or without it, is commit (ARCHITECTURE.md, "One
    /// round trip"). Reads of the key wait at each replica until the decision lands.
    fn decide(&mut self, token: u64, txid: TxId, participants: Vec<BrickId>, commit: bool) {
        let Some(op) = self.ops.get_mut(&token) else { return };
        let map = &self.map;
        let votes: Vec<(BrickId, Vote)> = match &op.phase {
            Phase::Prepare { votes, .. } | Phase::Confirm { votes, .. } => votes.clone(),
            _ => Vec::new(),
        };
        let vote = |b: &BrickId| votes.iter().find(|(x, _)| x == b).map(|(_, v)| *v);
        let gone = |b: &BrickId| !map.bricks().contains_key(b);
        let pending: Vec<BrickId> =
            participants.iter().copied().filter(|b| !gone(b) && (commit || vote(b) != Some(Vote::No))).collect();
        let key = op.key.clone();
        if commit {
            let outcome = outcome_of(op.kind, &votes);
            for b in pending {
                self.send_decision(b, &key, &txid.to_bytes());
            }
            return self.complete(token, Ok(outcome));
        }
        let confirmed = matches!(op.phase, Phase::Confirm { .. });
        let reconfirm = !confirmed && participants.iter().any(|b| gone(b) && vote(b) != Some(Vote::No));
        op.phase = Phase::Abort { txid, pending: pending.clone(), participants, votes, reconfirm };
        op.timer = None;
        self.stats.aborts += 1;
        let mut unreachable = Vec::new();
        for b in pending {
            if self.send(token, b, Op::Abort, &key, &txid.to_bytes()).is_err() {
                unreachable.push(b);
            }
        }
        if !unreachable.is_empty() {
            if let Some(op) = self.ops.get_mut(&token) {
                op.timer = Some(self.now + Duration::from_millis(20));
            }
            self.fetch_map();
        }
        self.finish_abort(token);
    }

    /// Retries an abort once every live participant acknowledged it.
    fn finish_abort(&mut self, token: u64) {
        let Some(op) = self.ops.get_mut(&token) else { return };
        let Phase::Abort { txid, pending, votes, reconfirm, participants } = &mut op.phase else { return };
        let map = &self.map;
        let before = pending.len();
        pending.retain(|b| map.bricks().contains_key(b));
        *reconfirm |= pending.len() < before;
        if !pending.is_empty() {
            return;
        }
        if *reconfirm {
            op.why = format!("{txid}: aborted, but a participant that may hold it prepared left the map unanswered");
            let (txid, participants, votes) = (*txid, std::mem::take(participants), std::mem::take(votes));
            op.phase = Phase::Confirm { txid, participants, votes, answers: Vec::new() };
            op.timer = None;
            return self.ask_live(token);
        }
        let (attempts, why) = (op.attempts, op.why.clone());
        self.retry_in(token, backoff(attempts, token), why);
    }

    /// A message has gone unanswered past the suspicion time: look for a newer map in
    /// which a dead brick is gone.
    pub(crate) fn on_silent(&mut self, token: u64, brick: BrickId) {
        self.fetch_map();
        let Some(op) = self.ops.get_mut(&token) else { return };
        op.suspect = true;
        if self.map.bricks().contains_key(&brick) {
            if op.timer.is_none() && !matches!(op.phase, Phase::Idle) {
                op.timer = Some(self.now + Duration::from_millis(20));
            }
            return;
        }
        match op.phase {
            Phase::Direct { .. } => {
                let err = lost_write(op, &self.config, format!("{brick} left the map with the write unanswered"));
                self.complete(token, Err(err));
            }
            Phase::Read { .. } => {
                op.avoid.push(brick);
                self.msgs.retain(|_, m| m.token != token);
                self.retry_in(token, Duration::ZERO, format!("{brick} left the map"));
            }
            Phase::Prepare { .. } => self.evaluate(token),
            Phase::Confirm { .. } => self.confirm(token),
            Phase::Abort { .. } => self.finish_abort(token),
            Phase::Idle => {}
        }
    }

    pub(crate) fn on_timer(&mut self, token: u64) {
        let now = self.now;
        let Some(op) = self.ops.get_mut(&token) else { return };
        if now >= op.deadline {
            let timeout_ms = self.config.op_timeout.as_millis() as u64;
            let (name, mut why) = (op.name(), std::mem::take(&mut op.why));
            if why.is_empty() {
                why = "no reply in time from every replica it needs (a brick paused, overloaded or unreachable)".into();
            }
            let err = match &op.phase {
                // Failed for sure only if every participant said no: one that did not
                // answer may hold it prepared and commit it in doubt once the no voters
                // have left the map.
                Phase::Prepare { votes, participants, .. }
                    if participants.iter().all(|p| votes.iter().any(|(b, v)| b == p && *v == Vote::No)) =>
                {
                    ClientError::Timeout { op: name, timeout_ms, why }
                }
                Phase::Prepare { .. } | Phase::Confirm { .. } | Phase::Abort { .. } => ClientError::Unknown { op: name, timeout_ms, why },
                Phase::Direct { .. } => ClientError::Unknown { op: name, timeout_ms, why },
                _ => ClientError::Timeout { op: name, timeout_ms, why },
            };
            return self.complete(token, Err(err));
        }
        op.timer = None;
        match &op.phase {
            Phase::Idle => self.start(token),
            Phase::Prepare { .. } => {
                self.fetch_map();
                self.evaluate(token);
            }
            Phase::Confirm { .. } => {
                self.fetch_map();
                self.ask_live(token);
            }
            Phase::Abort { txid, pending, .. } => {
                // Send again to live participants whose connection broke.
                let (txid, pending) = (*txid, pending.clone());
                let key = op.key.clone();
                self.fetch_map();
                for b in pending {
                    let on_wire = self.msgs.values().any(|m| m.token == token && m.brick == b);
                    if self.map.bricks().contains_key(&b) && !on_wire && self.send(token, b, Op::Abort, &key, &txid.to_bytes()).is_err() {
                        if let Some(op) = self.ops.get_mut(&token) {
                            op.timer = Some(self.now + Duration::from_millis(20));
                        }
                    }
                }
                self.finish_abort(token);
            }
            Phase::Read { brick } | Phase::Direct { brick } => {
                // Silent: gone from the map by now? Then go elsewhere; else keep waiting.
                let brick = *brick;
                self.fetch_map();
                if !self.map.bricks().contains_key(&brick) {
                    self.on_silent(token, brick);
                } else if let Some(op) = self.ops.get_mut(&token) {
                    op.timer = Some(self.now + Duration::from_millis(20));
                }
            }
        }
    }
}
