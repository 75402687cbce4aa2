//! Consumer groups: committed offsets as Raft state, membership with server-side assignment
//! (REST Proxy instances), and the classic client-side protocol (Kafka's JoinGroup/SyncGroup).
//!
//! A group's offsets live on one partition of the internal offsets topic; that partition's
//! replicas apply group commands through [`crate::state_machine::StateMachine`]
//! ([`offsets_machine::OffsetsMachine`]), so every replica holds the same committed offsets and
//! a new coordinator rebuilds the group from its applied state. [`membership`] is a group's
//! members and the two-step hand-over of partitions between them; [`assignor`] computes who
//! should own what; [`classic`] is the JoinGroup/SyncGroup protocol, where a leader member
//! computes the assignment.

pub mod assignor;
pub mod classic;
pub mod coordinator;
pub mod error;
pub mod membership;
pub mod offsets_machine;
pub mod offsets_replica;
