//! Helpers that tests and benchmarks share and the production binary never links: a throwaway etcd
//! and OCI registry, a busybox test image, and loopback addresses of a test's own.
#![forbid(unsafe_code)]

pub mod image;
pub mod local_etcd;
pub mod net;
pub mod real_node;
pub mod registry;

pub use local_etcd::LocalEtcd;
pub use net::{exclusive_addr, unique_loopback_ip};
pub use real_node::RealNode;
pub use registry::LocalRegistry;
