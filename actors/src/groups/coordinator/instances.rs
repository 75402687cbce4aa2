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
                polling: false,
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
        let owned = self.readable(&msg.0);
        self.released(&msg.0, &owned.into_iter().collect::<Vec<_>>(), ctx);
        self.leave(&msg.0, now);
        self.instances.remove(&msg.0);
        Box::pin(actix::fut::ready(Ok(())))
    }
}

impl Handler<Subscribe> for GroupCoordinator {
    type Result = Result<(), GroupError>;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let instance = self.instance(&msg.instance, now)?;
        if matches!(instance.mode, Mode::Manual(_)) {
            return Err(GroupError::Conflict(format!(
                "consumer instance '{}' has a manual assignment; delete it (or the assignment) before subscribing",
                msg.instance
            )));
        }
        let pattern = match &msg.subscription {
            Subscription::Pattern(p) => {
                Some(regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    GroupError::Invalid(format!(
                        "topic_pattern is not a valid regular expression: {e}"
                    ))
                })?)
            }
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
        self.instance(&msg.0, now)?;
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

    fn handle(&mut self, msg: GetAssignment, ctx: &mut Self::Context) -> Self::Result {
        self.instance(&msg.0, Instant::now())?;
        self.heartbeat(&msg.0, Instant::now(), ctx);
        Ok(self.readable(&msg.0).into_iter().collect())
    }
}
