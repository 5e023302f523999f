//! Job configuration: everything between a work pool's base job template and the container
//! to create. Pure (std, serde, small parsing crates): no I/O, no Docker, no HTTP, so every
//! rule is testable in isolation.
//!
//! Flow: [`render::merge_job_variables`] → [`render::render_job_configuration`] →
//! [`config::DockerJobConfiguration::from_rendered`] → [`config::DockerJobConfiguration::prepare`]
//! → [`spec::ContainerSpec`].

pub mod config;
pub mod create_kwargs;
pub mod image;
pub mod labels;
pub mod memory;
pub mod render;
pub mod slug;
pub mod spec;
pub mod template;
pub mod volumes;

pub use config::{DockerJobConfiguration, RegistryCredentials, ValidationError};
pub use image::PullPolicy;
pub use spec::{ContainerSpec, PREFECT_VERSION, PrepareError, RunContext};

/// The default base job template of a `docker` work pool, byte for byte what
/// `prefect work-pool get-default-base-job-template --type docker` prints for prefect-docker 0.7.4.
pub const DEFAULT_BASE_JOB_TEMPLATE: &str = include_str!("default-base-job-template.json");

/// [`DEFAULT_BASE_JOB_TEMPLATE`] parsed.
pub fn default_base_job_template() -> serde_json::Value {
    serde_json::from_str(DEFAULT_BASE_JOB_TEMPLATE).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_template_parses() {
        let t = super::default_base_job_template();
        assert!(t["job_configuration"].is_object());
        assert_eq!(
            t["variables"]["properties"].as_object().map(|p| p.len()),
            Some(16)
        );
    }
}
