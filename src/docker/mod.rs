//! The Docker side: the only module that knows bollard. It takes a
//! [`ContainerSpec`](crate::job::ContainerSpec) and knows nothing of Prefect.
//!
//! [`DockerRuntime`] is one handle to one Engine; each file adds the methods of one job:
//! `connect` (opening the Engine), `image` (pull policy, registry login, shared pulls),
//! `create` (create, networks, start), `watch` (output, exit, Engine restarts), `events`
//! (past and live container events), `find` (our containers on the host), `stop` (stopping
//! and removing), `cleanup` and `images` (garbage collection of containers and images) and `usage` (resource accounting). bollard
//! types never leave this module: its outputs are the plain values re-exported here.

pub mod auth;
pub mod cleanup;
mod connect;
mod create;
pub mod error;
mod events;
mod find;
mod image;
pub mod images;
pub mod proxies;
pub mod single_flight;
mod stop;
pub mod usage;
mod watch;

pub use cleanup::{Removal, StoppedContainer};
pub use connect::{DockerRuntime, TlsFiles};
pub use create::{CreatedContainer, StartedContainer};
pub use error::{ConnectCause, DockerError, EngineFailure};
pub use events::{ContainerEvent, ContainerEventKind};
pub use find::{FoundContainer, ListedContainer};
pub use images::{DiskSpace, DiskSpaceError, ImageRemoval, ImageUser, LocalImage, PullGuard};
pub use watch::{ExitStatus, OutputLine, OutputSink, OutputStream};
