//! The native container backend of dev-box.
//!
//! A sandbox is a tree of processes under one init process, `sandbox-init`, that runs as pid 1
//! in its own user, pid, mount, uts, ipc, net and cgroup namespaces, on an overlay root whose
//! layers are id-mapped mounts. The daemon talks to that init (the *agent*) over a Unix socket
//! bound on the host: see [`protocol`].
//!
//! - [`config::LaunchConfig`]: what the daemon asks for; [`launch::Launcher`] runs `sandbox-init`.
//! - [`container`]: the launcher and pid 1 (inside `sandbox-init`).
//! - [`agent`]: pid 1's request loop; [`client::AgentClient`]: the daemon's side of it.
//! - [`cgroup`]: cgroup v1 and v2 hierarchies (limits, freeze, kill, stats).
//! - [`checkpoint`]: checkpoints of a sandbox's processes with CRIU (restored by
//!   [`container::restore`]).
//! - [`native`]: all of it behind the engine's backend seam ([`devbox_backend::Backend`]).
//! - [`sys`]: the OS boundary, where all `unsafe` lives.

pub mod agent;
pub mod cgroup;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod container;
pub mod launch;
pub mod native;
pub mod procs;
pub mod protocol;
pub mod sys;
pub mod trace;
pub mod users;
