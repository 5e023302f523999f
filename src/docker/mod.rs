//! The Docker side: the only module that knows bollard. It takes a
//! [`ContainerSpec`](crate::job::ContainerSpec) and knows nothing of Prefect.

pub mod auth;
pub mod cleanup;
pub mod error;
pub mod proxies;
pub mod runtime;
pub mod single_flight;
pub mod usage;

pub use cleanup::{Removal, StoppedContainer};
pub use error::{DockerError, EngineFailure};
pub use runtime::{
    ContainerEvent, ContainerEventKind, CreatedContainer, DockerRuntime, ExitStatus,
    FoundContainer, StartedContainer, TlsFiles,
};
