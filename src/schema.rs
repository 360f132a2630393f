//! The Postgres side of versioning: `syncar migrate` ([`migrate`]: the sequence, version
//! columns, triggers and the `kv` table), the catalog lookups that turn configured resources
//! into [`Resource`](crate::resource::Resource)s ([`catalog`]), and the queries of the
//! changes log ([`changes`]), and tables' shapes, whose changes are announced to the fleet
//! ([`shape`]). Knows nothing about caches.

pub mod capture;
pub mod catalog;
pub mod changes;
mod columns;
mod error;
mod install;
mod lock;
pub mod migrate;
mod names;
mod objects;
mod rearm;
mod republish;
mod script;
pub mod shape;
mod source;
mod stamp;
mod table;
mod triggers;
mod uninstall;

pub use catalog::{check, load_catalog, Check};
pub use changes::{changes_since, current_xmin, prune_changes, ChangesQuery};
pub use error::SchemaError;
pub use migrate::{migrate, plan, Migration};
pub use names::{
    last_value_sql, CHANGES_TABLE, FLUSH_ABOVE_KEYS, NOTIFY_CHANNEL, VERSION_SEQUENCE,
};
pub use rearm::rearm;
pub use republish::republish;
pub use script::{one_line, Block, Script};
pub use stamp::broken_c_stamp;
pub use uninstall::uninstall;
