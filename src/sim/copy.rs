//! The copy driver's shell in the simulator: `meta::copy::CopyDriver` over simulated
//! links and timers, as `meta::copy_driver` drives it over blocking rpcs; each member
//! of the authority group drives the copies it planned while it led.

use crate::meta::copy::{Answer, CopyDriver, Step, COPY_RPC_TIMEOUT_MS, LINES};
use crate::meta::member::CopyPlan;

use super::net::{Call, Endpoint, LinkId};
use super::{Event, Micros, World, MS};

pub(crate) struct SimCopy {
    driver: CopyDriver,
    /// The leader's term that planned it (`Member::copied`).
    term: u64,
    /// The open link of each line (`copy::Line`).
    lines: [Option<LinkId>; LINES.len()],
    /// The call on the wire.
    waiting: Option<Call>,
    /// No poll before this (a `Step::Wait`); timers set for earlier calls may fire first.
    wake_at: Micros,
    next_id: u64,
    /// Partitions copied so far, with their target's incarnation when the job began
    /// (the authority takes no copy from a target that restarted since).
    pub copied: Vec<(crate::map::PartitionId, crate::map::BrickId, u64)>,
    lives: Vec<(crate::map::BrickId, u64)>,
}

impl SimCopy {
    /// `lives`: every brick's incarnation now.
    pub fn new(plan: CopyPlan, now_ms: u64, lives: Vec<(crate::map::BrickId, u64)>) -> SimCopy {
        SimCopy { driver: CopyDriver::new(plan.joins, plan.epoch, now_ms), term: plan.term, lines: [None; LINES.len()], waiting: None, wake_at: 0, next_id: 1, copied: Vec::new(), lives }
    }
}

impl World {
    /// Polls member `m`'s driver until it waits: for a reply, a pause, or nothing
    /// (finished).
    pub(crate) fn copy_step(&mut self, m: usize) {
        loop {
            let now_ms = self.now_ms();
            let Some(job) = &mut self.members[m].copy else { return };
            if let Some(call) = job.waiting {
                if self.now < call.sent + COPY_RPC_TIMEOUT_MS * MS {
                    return;
                }
                // The call timed out, as `Rpc::call` does: the link is as good as lost.
                self.break_link(call.link, false);
                self.copy_answer(m, call.link, Answer::Lost("timed out".into()));
                continue;
            }
            if self.now < job.wake_at {
                return;
            }
            // As the authority's copy thread: a plan of a term this member no longer
            // leads in is abandoned.
            let term = job.term;
            if !self.members[m].member.as_ref().is_some_and(|x| x.leads_in(term)) {
                let job = self.members[m].copy.take().expect("present");
                for link in job.lines.into_iter().flatten() {
                    self.break_link(link, false);
                }
                self.note(format!("copy: planned in term {term}, abandoned: member {m} no longer leads in it"));
                return;
            }
            let map = self.members[m].member.as_ref().and_then(|x| x.published()).cloned();
            let job = self.members[m].copy.as_mut().expect("present");
            match job.driver.poll(map.as_ref(), now_ms) {
                Step::Call { line, addr, op, epoch, value } => {
                    // A held line that closed fails the call, as a closed socket does.
                    let link = match job.lines[line as usize] {
                        Some(l) if self.net.alive(l) => Ok(l),
                        Some(_) => Err("connection closed".to_string()),
                        None => self.connect(Endpoint::Member(m), addr).ok_or(format!("connect to {addr}: refused")),
                    };
                    let job = self.members[m].copy.as_mut().expect("present");
                    let link = match link {
                        Ok(l) => l,
                        Err(why) => {
                            job.lines[line as usize] = None;
                            job.driver.answer(Answer::Lost(why), now_ms);
                            continue;
                        }
                    };
                    job.lines[line as usize] = Some(link);
                    let id = job.next_id;
                    job.next_id += 1;
                    let call = self.call(link, Endpoint::Member(m), op, epoch, &value, id);
                    self.members[m].copy.as_mut().expect("present").waiting = Some(call);
                    self.after(COPY_RPC_TIMEOUT_MS * MS, Event::CopyStep { member: m });
                    return;
                }
                Step::HangUp(line) => {
                    if let Some(link) = job.lines[line as usize].take() {
                        self.break_link(link, false);
                    }
                }
                Step::Wait { ms } => {
                    job.wake_at = self.now + ms * MS;
                    self.after(ms * MS, Event::CopyStep { member: m });
                    return;
                }
                Step::Note(note) => self.note(format!("copy: {note}")),
                Step::Finished(done) => {
                    let term = job.term;
                    self.members[m].copy = None;
                    let Some(member) = self.members[m].member.as_mut() else { return };
                    let step = member.copied(term, &done, now_ms).map_err(|e| e.to_string());
                    return self.member_apply(m, step);
                }
            }
        }
    }

    /// Hands member `m`'s driver what became of its call on `link`; the line is closed
    /// if lost.
    fn copy_answer(&mut self, m: usize, link: LinkId, answer: Answer) {
        let now_ms = self.now_ms();
        let Some(job) = &mut self.members[m].copy else { return };
        job.waiting = None;
        if matches!(answer, Answer::Lost(_)) {
            job.lines.iter_mut().filter(|l| **l == Some(link)).for_each(|l| *l = None);
        }
        job.driver.answer(answer, now_ms);
        let new: Vec<_> = job.driver.done()[job.copied.len()..].to_vec();
        for (p, target) in new {
            let life = job.lives.iter().find(|(b, _)| *b == target).map_or(u64::MAX, |(_, life)| *life);
            job.copied.push((p, target, life));
        }
    }

    pub(crate) fn copy_receive(&mut self, m: usize, link: LinkId, bytes: Vec<u8>) {
        let Some(call) = self.members[m].copy.as_ref().and_then(|j| j.waiting).filter(|c| c.link == link) else { return };
        let answer = match call.reply(&bytes) {
            Ok((status, value)) => Answer::Reply(status, value),
            Err(why) => Answer::Lost(why),
        };
        if matches!(answer, Answer::Lost(_)) {
            self.break_link(link, false);
        }
        self.copy_answer(m, link, answer);
        self.copy_step(m);
    }

    pub(crate) fn copy_link_down(&mut self, m: usize, link: LinkId) {
        let Some(job) = &mut self.members[m].copy else { return };
        if job.waiting.is_some_and(|c| c.link == link) {
            self.copy_answer(m, link, Answer::Lost("connection closed".into()));
            self.copy_step(m);
        }
    }
}
