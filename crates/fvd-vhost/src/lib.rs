//! vhost-user-blk backend: exports an FVD (or raw) image to virtual machines
//! (QEMU's `vhost-user-blk-pci`, cloud-hypervisor, Firecracker) over a
//! vhost-user unix socket, on the rust-vmm crates (`vhost`,
//! `vhost-user-backend`, `virtio-queue`, `vm-memory`).
//!
//! Layers, each depending only on those above it in this list:
//! * [`config`] — the feature bits and virtio-blk configuration space;
//! * [`request`] — parsing descriptor chains into requests (guest-controlled
//!   input: checked, never panics);
//! * [`execute`] — running one request on the shared `fvd_core::Image`;
//! * [`backend`] — the `VhostUserBackend`: popping chains, tasks per request,
//!   out-of-order completion, EVENT_IDX, drain on `stop_vring`;
//! * [`server`] — the socket, one front end at a time, reconnects, shutdown.

pub mod backend;
pub mod config;
pub mod execute;
pub mod request;
pub mod server;

pub use backend::BlkBackend;
pub use config::DeviceConfig;
pub use server::{ExportConfig, ServeSummary, Socket, serve, serve_on};
