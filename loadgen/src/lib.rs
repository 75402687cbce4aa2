//! PubG1's load generator: starts a cluster (or joins one), drives producers, breaks brokers on
//! a timeline, and proves what survived. See `loadgen --help` and `loadgen/scenarios/`.

mod clients;
mod kafka;
pub use clients::keys_by_partition;
pub mod cluster;
pub mod group;
pub mod group_verify;
pub mod http;
pub mod nemesis;
pub mod ports;
pub mod proxy;
pub mod readback;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stream;
pub mod stream_verify;
pub mod summary;
pub mod verify;
