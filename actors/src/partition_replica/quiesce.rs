//! Quiescence: an idle group stops ticking, so thousands of idle partitions cost no timer
//! wake-ups and no heartbeats (CockroachDB quiesces idle ranges, TiKV hibernates regions).
//!
//! A leader quiesces after [`IDLE_BEFORE_QUIESCE`] without a proposal, an apply or a role
//! change, once every entry is committed, applied and on every voter, and every follower's
//! broker is heard from: it tells each follower (`QuiesceNotice`) and stops its tick timer. A
//! follower stops too if its view matches the notice exactly. Anything wakes a replica: a local
//! proposal, any Raft message from another replica but a heartbeat's answer (so a woken
//! leader's first heartbeat wakes its followers, and the answers to the heartbeat a leader sent
//! as it quiesced do not wake it), a role change, and the broker's liveness watcher, which wakes every group
//! of a broker that falls silent (peer links ping every 100 ms, so brokers stay heard from while
//! all their groups are quiet). A quiesced follower whose leader dies is thus woken within
//! about half a second and elects as usual; a quiesced leader cut off from the others is woken
//! the same way and steps down by check-quorum.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::PartitionReplica;
use crate::raft_driver;
use crate::transport::{Outbound, QuiesceInbound, QuiesceNotice, Wake};

/// How long a brand-new group's other replicas wait for its preferred replica to win the first
/// election before they may campaign: a few of its longest election timeouts.
pub(super) fn fresh_election_hold(timing: &crate::raft_group::RaftSettings) -> Duration {
    Duration::from_millis(timing.tick_ms * 2 * timing.election_tick as u64 * 3)
}

/// How long a group must be idle before its leader quiesces it: long enough that a partition
/// with a trickle of traffic does not quiesce and wake between every two requests.
pub(super) const IDLE_BEFORE_QUIESCE: Duration = Duration::from_secs(2);

impl PartitionReplica {
    /// Start the Raft tick timer (at start, and on waking).
    pub(super) fn start_ticking(&mut self, ctx: &mut Context<Self>) {
        if self.ticker.is_some() {
            return;
        }
        let every = Duration::from_millis(self.settings.timing.tick_ms);
        let ticker = ctx.run_interval(every, |act, ctx| {
            raft_driver::guarded(act, ctx, |act, ctx| act.tick(ctx));
        });
        self.ticker = Some(ticker);
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.raft.is_none() {
            return;
        }
        self.ticks += 1;
        if !self.election_held() {
            if let Some(raft) = self.raft.as_mut() {
                raft.tick();
            }
        }
        let checkpoint = self.ticks.is_multiple_of(super::RAFT_GAUGE_TICKS);
        if checkpoint {
            self.publish_raft_gauges();
            self.expire_pending();
        }
        self.retry_install();
        self.offer_owed_snapshot_point();
        raft_driver::drive(self, ctx);
        if let Some((notice, since)) = self.quiesce_notice {
            // A notice is good for one election window: a follower still not caught up by then,
            // or whose leader's broker fell silent, goes on ticking (and elects if it must).
            let window = self.election_window();
            if since.elapsed() > window || !self.settings.cluster.is_alive(notice.leader, window) {
                self.quiesce_notice = None;
            } else {
                self.quiesce_if_matching(notice, since, ctx);
                if self.is_quiesced() {
                    return;
                }
            }
        }
        // After the Ready this tick made (a heartbeat's is handled at once): a tick always has
        // one pending before it is driven.
        if checkpoint {
            self.maybe_quiesce(ctx);
        }
    }

    /// Whether this replica's Raft clock stands still on this tick. A brand-new group's other
    /// replicas leave its first election to the preferred replica for a while (unless they hear
    /// from a leader first): when thousands of groups are created at once, three candidates per
    /// group split votes, bump terms and keep a saturated machine re-electing. Every other
    /// replica ticks every time, so a failover is as fast as without it.
    fn election_held(&mut self) -> bool {
        let Some(until) = self.hold_election_until else {
            return false;
        };
        let knows_leader = self.raft.as_ref().is_some_and(|raft| raft.leader_id() != 0);
        if knows_leader || Instant::now() >= until {
            self.hold_election_until = None;
            return false;
        }
        true
    }

    pub(super) fn is_quiesced(&self) -> bool {
        self.ticker.is_none()
    }

    /// On the leader: quiesce the group if nothing has happened in it for a while and nothing
    /// is in flight anywhere in it.
    fn maybe_quiesce(&mut self, ctx: &mut Context<Self>) {
        let idle = self.last_active.elapsed() >= IDLE_BEFORE_QUIESCE
            && self.proposals.is_empty()
            && self.installing.is_none()
            && !self.driver.is_busy();
        let Some(raft) = self
            .raft
            .as_ref()
            .filter(|raft| idle && raft.is_quiescent())
        else {
            return;
        };
        let me = self.settings.broker_id;
        let window = self.election_window();
        let followers: Vec<u64> = self.voters.iter().copied().filter(|v| *v != me).collect();
        if !followers
            .iter()
            .all(|id| self.settings.cluster.is_alive(*id, window))
        {
            return;
        }
        let notice = QuiesceNotice {
            group: self.shared.log,
            term: raft.term(),
            index: raft.last_index(),
            leader: me,
        };
        for follower in followers {
            self.settings
                .transport
                .send_to(follower, Outbound::Quiesce(notice));
        }
        self.quiesce(ctx);
    }

    /// The shortest election timeout.
    fn election_window(&self) -> Duration {
        Duration::from_millis(
            self.settings.timing.tick_ms * self.settings.timing.election_tick as u64,
        )
    }

    /// On a follower: stop ticking if this replica holds exactly what the leader's notice
    /// says, every entry applied; else keep the notice and look again on the next tick.
    fn quiesce_if_matching(
        &mut self,
        notice: QuiesceNotice,
        since: Instant,
        ctx: &mut Context<Self>,
    ) {
        let matches = self
            .raft
            .as_ref()
            .is_some_and(|raft| raft.may_quiesce_at(notice.term, notice.index, notice.leader))
            && !self.driver.is_busy()
            && self.installing.is_none()
            && self.proposals.is_empty();
        if matches {
            self.quiesce(ctx);
        } else if !self.is_quiesced() {
            self.quiesce_notice = Some((notice, since));
        }
    }

    fn quiesce(&mut self, ctx: &mut Context<Self>) {
        self.quiesce_notice = None;
        if let Some(ticker) = self.ticker.take() {
            ctx.cancel_future(ticker);
            self.metrics.raft_quiesced_groups.inc();
            self.shared.quiesced.store(true, Ordering::Release);
        }
    }

    /// Tick again (if quiesced); the group counts as active from now.
    pub(super) fn wake(&mut self, ctx: &mut Context<Self>) {
        if self.is_quiesced() {
            self.shared.quiesced.store(false, Ordering::Release);
            self.last_active = Instant::now();
            self.metrics.raft_quiesced_groups.dec();
            self.start_ticking(ctx);
        }
    }
}

impl Handler<QuiesceInbound> for PartitionReplica {
    type Result = ();

    fn handle(&mut self, msg: QuiesceInbound, ctx: &mut Self::Context) {
        let notice = msg.0;
        raft_driver::guarded(self, ctx, |act, ctx| {
            // The notice stands for the leader's last heartbeat: commit what it says is
            // committed, apply it, and quiesce once that is done.
            if let Some(raft) = act.raft.as_mut() {
                raft.adopt_quiesce_notice(notice.term, notice.index, notice.leader);
            }
            raft_driver::drive(act, ctx);
            act.quiesce_if_matching(notice, Instant::now(), ctx);
        });
    }
}

impl Handler<Wake> for PartitionReplica {
    type Result = ();

    fn handle(&mut self, _msg: Wake, ctx: &mut Self::Context) {
        raft_driver::guarded(self, ctx, |act, ctx| {
            // Woken because a broker fell silent: a notice kept from before must not put this
            // replica back to sleep.
            act.quiesce_notice = None;
            act.wake(ctx);
        });
    }
}
