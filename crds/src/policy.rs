//! The operator's decisions, one module each — this module only names where each is made:
//!
//! | decision | where |
//! |---|---|
//! | which preset a build starts with | [`crate::first_preset::choose_preset`] |
//! | when memory pressure is real | [`crate::pressure::classify_pressure`] |
//! | what counts as an OOM kill (how an attempt ended) | [`crate::outcome::classify`] |
//! | what one build unit does next | [`crate::ladder::next_action`] |
//! | when to restart, with what, when to give up | [`crate::ladder::after_attempt`] |
//! | when a build begins (a Failed index rebuilt, a rebuild) | [`crate::rebuild::build_start`] |
//! | the whole of several build units | [`crate::aggregate::whole`] |
//!
//! [`crate::transitions::StatusDraft`] writes each step and decision into status; the
//! Kubernetes controller and local mode only observe and carry decisions out. The re-exports
//! below keep the two paths the indexer uses (`policy::exit_code`, `policy::auto_preset`).

pub use crate::first_preset::auto_preset;
pub use crate::outcome::exit_code;
