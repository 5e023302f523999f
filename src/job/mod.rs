//! Job configuration: everything between a work pool's base job template and the container
//! to create. Pure (std, serde, small parsing crates): no I/O, no Docker, no HTTP, so every
//! rule is testable in isolation.
//!
//! Flow: [`render::merge_job_variables`] → [`render::render_job_configuration`] →
//! [`config::DockerJobConfiguration::from_rendered`] → [`config::DockerJobConfiguration::prepare`]
//! → [`spec::ContainerSpec`]; an operator's [`overrides::JobOverride`] is merged in right after
//! rendering.

pub mod config;
pub mod create_kwargs;
pub mod image;
pub mod labels;
pub mod memory;
pub mod overrides;
pub mod refs;
pub mod render;
pub mod slug;
pub mod spec;
#[cfg(test)]
mod strategies;
pub mod template;
pub mod typed;
pub mod volumes;

pub use config::{DockerJobConfiguration, RegistryCredentials, ValidationError};
pub use image::PullPolicy;
pub use spec::{ContainerSpec, PREFECT_VERSION, PrepareError, RunContext};

/// The reference's default base job template of a `docker` work pool, byte for byte what
/// `prefect work-pool get-default-base-job-template --type docker` prints for prefect-docker 0.7.4.
pub const REFERENCE_BASE_JOB_TEMPLATE: &str = include_str!("default-base-job-template.json");

/// [`REFERENCE_BASE_JOB_TEMPLATE`] parsed.
pub fn reference_base_job_template() -> serde_json::Value {
    serde_json::from_str(REFERENCE_BASE_JOB_TEMPLATE).unwrap_or_default()
}

/// The template this worker gives the pools it creates: the reference's, unchanged, plus the
/// typed options (`gpus`, `shm_size`, `ipc_mode`, `cpus`, `ports`, `platform`) as variables
/// with UI titles and as `{{ placeholders }}` in the job configuration. Pools made with the
/// reference template work too: unset typed options change nothing.
pub fn default_base_job_template() -> serde_json::Value {
    let mut template = reference_base_job_template();
    if let Some(properties) = template
        .pointer_mut("/variables/properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        properties.extend(typed::template_variables());
    }
    if let Some(job) = template
        .get_mut("job_configuration")
        .and_then(serde_json::Value::as_object_mut)
    {
        for field in typed::TYPED_FIELDS {
            job.insert((*field).to_owned(), format!("{{{{ {field} }}}}").into());
        }
    }
    template
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_template_is_the_reference_plus_the_typed_options() {
        let reference = super::reference_base_job_template();
        assert_eq!(
            reference["variables"]["properties"]
                .as_object()
                .map(|p| p.len()),
            Some(16)
        );
        let mut ours = super::default_base_job_template();
        for field in super::typed::TYPED_FIELDS {
            assert_eq!(
                ours["job_configuration"][field],
                format!("{{{{ {field} }}}}")
            );
            assert!(ours["variables"]["properties"][field]["title"].is_string());
            ours["job_configuration"]
                .as_object_mut()
                .unwrap()
                .remove(*field);
            ours["variables"]["properties"]
                .as_object_mut()
                .unwrap()
                .remove(*field);
        }
        assert_eq!(ours, reference);
    }
}
