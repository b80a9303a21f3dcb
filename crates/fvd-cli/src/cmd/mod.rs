//! One module per subcommand; each has an `Args` (clap) and an async `run`
//! returning the exit status.

pub mod amend;
pub mod cache;
pub mod check;
pub mod commit;
pub mod compare;
pub mod control;
pub mod convert;
pub mod create;
pub mod demo;
pub mod demo_nbd;
pub mod info;
pub mod io;
pub mod luks;
pub mod map;
pub mod mount;
pub mod prefetch;
pub mod profile;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod serve_cache;
pub mod serve_extras;
pub mod serve_metrics;
pub mod serve_start;
pub mod serve_vhost;
pub mod snapshot;
