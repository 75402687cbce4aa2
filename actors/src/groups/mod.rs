//! Consumer groups (issue 13, in progress): committed offsets as Raft state.
//!
//! A group's offsets live on one partition of the internal offsets topic; that partition's
//! replicas apply group commands through [`crate::state_machine::StateMachine`]
//! ([`offsets_machine::OffsetsMachine`]), so every replica holds the same committed offsets and
//! a new coordinator rebuilds the group from its applied state. The coordinator actors and the
//! HTTP consumer API that use it are not built yet.

pub mod offsets_machine;
