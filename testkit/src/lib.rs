//! Helpers that tests and benchmarks share and the production binary never links: a throwaway etcd.
#![forbid(unsafe_code)]

pub mod local_etcd;

pub use local_etcd::LocalEtcd;
