//! docker-worker: a native Prefect worker that runs flow runs as Docker containers.
//!
//! Boundaries: [`job`] is pure (template → [`job::ContainerSpec`]); [`prefect`] knows HTTP and
//! nothing of Docker; [`docker`] knows bollard and nothing of Prefect; [`worker`] wires the two,
//! and so do [`gc`] (removing the containers of finished flow runs) and [`image_gc`]
//! (removing images no container and no deployment uses). [`guard`] is the host
//! policy applied to every new run's container.
#![forbid(unsafe_code)]

pub mod app;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod docker;
pub mod gc;
pub mod guard;
pub mod health;
pub mod image_gc;
pub mod job;
pub mod logs;
pub mod metrics;
pub mod prefect;
pub mod redact;
pub mod shutdown;
pub mod worker;
