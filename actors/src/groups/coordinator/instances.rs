//! Instances coming and going: create, delete, subscribe, assign by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use actix::prelude::*;

use super::super::error::GroupError;
use super::super::offsets_machine::TopicPartition;
use super::*;

impl Handler<CreateInstance> for GroupCoordinator {
    type Result = Result<String, GroupError>;

    fn handle(&mut self, msg: CreateInstance, _ctx: &mut Self::Context) -> Self::Result {
        self.check_serving()?;
        if self.instances.len() >= self.settings.instances_max {
            return Err(GroupError::Conflict(format!(
                "group '{}' has {} consumer instances, the most one group may have",
                self.group, self.settings.instances_max
            )));
        }
        let id = match &msg.0.name {
            Some(name) => {
                if self.instances.contains_key(name) {
                    return Err(GroupError::InstanceExists {
                        group: self.group.clone(),
                        instance: name.clone(),
                    });
                }
                name.clone()
            }
            None => loop {
                self.next_instance += 1;
                let id = format!("rest-consumer-{}-{}", self.epoch, self.next_instance);
                if !self.instances.contains_key(&id) {
                    break id;
                }
            },
        };
        // A name reused after its instance went is a new instance.
        self.gone.retain(|(gone, _)| *gone != id);
        self.instances.insert(
            id.clone(),
            Instance {
                config: msg.0,
                mode: Mode::Idle,
                last_seen: Instant::now(),
                positions: BTreeMap::new(),
                auto_committed: BTreeMap::new(),
                poll: None,
                leaving: false,
            },
        );
        Ok(id)
    }
}

impl Handler<DeleteInstance> for GroupCoordinator {
    type Result = ResponseActFuture<Self, Result<(), GroupError>>;

    fn handle(&mut self, msg: DeleteInstance, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        if let Err(e) = self.instance(&msg.0, now) {
            return Box::pin(actix::fut::ready(Err(e)));
        }
        // A poll under way still owns its partitions: the instance leaves when it ends.
        match self.instances.get_mut(&msg.0) {
            Some(instance) if instance.poll.is_some() => instance.leaving = true,
            _ => self.remove_instance(&msg.0, now, ctx),
        }
        Box::pin(actix::fut::ready(Ok(())))
    }
}

impl Handler<Subscribe> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        if self.classic_active() {
            return Err(GroupError::Conflict(format!(
                "group '{}' is managed by Kafka-protocol consumers (JoinGroup); a REST instance cannot subscribe to it",
                self.group
            )));
        }
        let instance = self.instance(&msg.instance, now)?;
        if matches!(instance.mode, Mode::Manual(_)) {
            return Err(GroupError::Conflict(format!(
                "consumer instance '{}' has a manual assignment; delete it (or the assignment) before subscribing",
                msg.instance
            )));
        }
        let pattern = match &msg.subscription {
            Subscription::Pattern(p) => Some(anchored(p)?),
            Subscription::Topics(topics) => {
                if let Some(missing) = topics.iter().find(|t| self.registry.get(t).is_none()) {
                    return Err(GroupError::UnknownTopic(missing.clone()));
                }
                None
            }
        };
        let instance = self.instance(&msg.instance, now)?;
        instance.mode = Mode::Subscribed {
            subscription: msg.subscription,
            pattern,
        };
        self.join(&msg.instance, now, ctx);
        Ok(())
    }
}

impl Handler<Unsubscribe> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        if self.instance(&msg.0, now)?.poll.is_some() {
            return Err(poll_under_way(&msg.0));
        }
        let owned: Vec<TopicPartition> = self.readable(&msg.0).into_iter().collect();
        self.released(&msg.0, &owned, ctx);
        self.leave(&msg.0, now);
        if let Some(instance) = self.instances.get_mut(&msg.0) {
            instance.mode = Mode::Idle;
            instance.positions.clear();
        }
        Ok(())
    }
}

impl Handler<GetSubscription> for GroupCoordinator {
    type Result = Result<Option<Subscription>, GroupError>;

    fn handle(&mut self, msg: GetSubscription, _ctx: &mut Self::Context) -> Self::Result {
        let instance = self.instance(&msg.0, Instant::now())?;
        Ok(match &instance.mode {
            Mode::Subscribed { subscription, .. } => Some(subscription.clone()),
            _ => None,
        })
    }
}

impl Handler<Assign> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Assign, _ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        for tp in &msg.partitions {
            let handle = self
                .registry
                .get(&tp.topic)
                .ok_or_else(|| GroupError::UnknownTopic(tp.topic.clone()))?;
            if tp.partition >= handle.meta.partitions {
                return Err(GroupError::UnknownPartition {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                });
            }
        }
        let instance = self.instance(&msg.instance, now)?;
        if instance.poll.is_some() {
            return Err(poll_under_way(&msg.instance));
        }
        if matches!(instance.mode, Mode::Subscribed { .. }) {
            return Err(GroupError::Conflict(format!(
                "consumer instance '{}' is subscribed; unsubscribe before assigning partitions by hand",
                msg.instance
            )));
        }
        let assigned: BTreeSet<TopicPartition> = msg.partitions.into_iter().collect();
        instance.positions.retain(|tp, _| assigned.contains(tp));
        instance.mode = Mode::Manual(assigned);
        Ok(())
    }
}

impl Handler<GetAssignment> for GroupCoordinator {
    type Result = Result<Vec<TopicPartition>, GroupError>;

    fn handle(&mut self, msg: GetAssignment, _ctx: &mut Self::Context) -> Self::Result {
        self.instance(&msg.0, Instant::now())?;
        Ok(self.readable(&msg.0).into_iter().collect())
    }
}

/// A topic pattern matching whole names. The pattern compiles on its own first, so one that
/// closes the group around it (`a)|(.*`) is refused rather than escaping the anchors.
pub(super) fn anchored(pattern: &str) -> Result<regex::Regex, GroupError> {
    let invalid = |e: regex::Error| {
        GroupError::Invalid(format!(
            "topic_pattern is not a valid regular expression: {e}"
        ))
    };
    regex::Regex::new(pattern).map_err(invalid)?;
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(invalid)
}

pub(super) fn poll_under_way(instance: &str) -> GroupError {
    GroupError::Conflict(format!(
        "a poll of consumer instance '{instance}' is under way; wait for it to return"
    ))
}
