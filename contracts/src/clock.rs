//! Wall-clock time as the API writes it: Unix seconds and RFC 3339 UTC with second precision.
//! Defined once in `sandboxd_api::time`; re-exported here for the controllers.

pub use sandboxd_api::time::{rfc3339_now, unix_now};
