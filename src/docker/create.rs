//! Getting a job's container running: the Engine's create body for a `ContainerSpec`, the
//! create itself (with `-1`, `-2`, … retries while the name is taken), the extra networks, the
//! stand-down of a duplicate, the start, and `create_and_start_while`, which stops between the
//! steps as soon as the run is withdrawn. Knows bollard's container calls, nothing of Prefect.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, NetworkConnectRequest};
use bollard::query_parameters::{
    CreateContainerOptions, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use serde_json::{Map, Value, json};

use super::connect::DockerRuntime;
use super::error::{DockerError, EngineFailure};
use crate::job::ContainerSpec;

/// How many suffixed names (`-1`, `-2`, …) to try after a name conflict.
const NAME_CONFLICT_ATTEMPTS: u32 = 50;

/// A container that was created (and maybe started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedContainer {
    /// Full container id.
    pub id: String,
    /// The name it got (after conflict retries), if one was requested.
    pub name: Option<String>,
    /// Unix time (s) just before it was created: the lower bound for its events.
    pub created_at: i64,
}

impl CreatedContainer {
    /// The name for messages: the container name, else the short id.
    pub fn display_name(&self) -> &str {
        self.name
            .as_deref()
            .unwrap_or(&self.id[..self.id.len().min(12)])
    }
}

/// A container that is running, with what it took to get there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedContainer {
    /// The container.
    pub container: CreatedContainer,
    /// How long the image pull took, if one was needed.
    pub pull_duration: Option<Duration>,
}

/// The name of create attempt `attempt`: the spec's name, then `<name>-1`, `<name>-2`, …
fn attempt_name(name: Option<&str>, attempt: u32) -> Option<String> {
    name.map(|n| {
        if attempt == 0 {
            n.to_owned()
        } else {
            format!("{n}-{attempt}")
        }
    })
}

/// The create call's query (`name`, `platform`); `None` when there is neither.
fn create_options(name: Option<&str>, platform: Option<&str>) -> Option<CreateContainerOptions> {
    if name.is_none() && platform.is_none() {
        return None;
    }
    let mut options = CreateContainerOptionsBuilder::default();
    if let Some(n) = name {
        options = options.name(n);
    }
    if let Some(p) = platform {
        options = options.platform(p);
    }
    Some(options.build())
}

/// The `HostConfig` part of the create body: the spec's typed settings, then its
/// `container_create_kwargs` overrides on top.
fn host_config(spec: &ContainerSpec) -> Map<String, Value> {
    let mut host_config = Map::new();
    host_config.insert("NetworkMode".into(), json!(spec.network_mode));
    if let Some(m) = spec.mem_limit {
        host_config.insert("Memory".into(), json!(m));
    }
    if let Some(m) = spec.memswap_limit {
        host_config.insert("MemorySwap".into(), json!(m));
    }
    if spec.privileged {
        host_config.insert("Privileged".into(), json!(true));
    }
    if !spec.binds.is_empty() {
        host_config.insert("Binds".into(), json!(spec.binds));
    }
    if let Some(hosts) = &spec.extra_hosts {
        host_config.insert("ExtraHosts".into(), json!(hosts));
    }
    if spec.auto_remove {
        host_config.insert("AutoRemove".into(), json!(true));
    }
    for (k, v) in &spec.host_config_overrides {
        host_config.insert(k.clone(), v.clone());
    }
    host_config
}

/// What one create attempt came to.
enum Attempt {
    Created(CreatedContainer),
    /// The name is taken: try the next suffix.
    NameTaken,
}

impl DockerRuntime {
    /// The Engine create body for a spec (what `POST /containers/create` receives).
    ///
    /// # Errors
    /// [`DockerError::InvalidOptions`] when `container_create_kwargs` fields do not fit the API model.
    pub fn create_body(spec: &ContainerSpec) -> Result<ContainerCreateBody, DockerError> {
        if spec.network_mode == "host"
            && spec
                .host_config_overrides
                .get("PortBindings")
                .and_then(Value::as_object)
                .is_some_and(|b| !b.is_empty())
        {
            return Err(DockerError::InvalidArgument {
                message: "\"host\" network_mode is incompatible with port_bindings".into(),
            });
        }
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut body = Map::new();
        body.insert("Tty".into(), json!(false));
        body.insert("OpenStdin".into(), json!(false));
        body.insert("StdinOnce".into(), json!(false));
        body.insert("AttachStdin".into(), json!(false));
        body.insert("AttachStdout".into(), json!(true));
        body.insert("AttachStderr".into(), json!(true));
        body.insert("Env".into(), json!(env));
        body.insert("Cmd".into(), json!(spec.command));
        body.insert("Image".into(), json!(spec.image));
        body.insert("NetworkDisabled".into(), json!(false));
        if !spec.volume_paths.is_empty() {
            let volumes: Map<String, Value> = spec
                .volume_paths
                .iter()
                .map(|p| (p.clone(), json!({})))
                .collect();
            body.insert("Volumes".into(), Value::Object(volumes));
        }
        body.insert("Labels".into(), json!(spec.labels));
        body.insert("HostConfig".into(), Value::Object(host_config(spec)));
        for (k, v) in &spec.config_overrides {
            body.insert(k.clone(), v.clone());
        }
        serde_json::from_value(Value::Object(body)).map_err(|e| DockerError::InvalidOptions {
            message: e.to_string(),
        })
    }

    /// [`DockerRuntime::create_body`] as JSON, for showing (`docker-worker policy check`).
    ///
    /// # Errors
    /// As [`DockerRuntime::create_body`].
    pub fn create_body_json(spec: &ContainerSpec) -> Result<Value, DockerError> {
        serde_json::to_value(Self::create_body(spec)?).map_err(|e| DockerError::InvalidOptions {
            message: e.to_string(),
        })
    }

    /// [`DockerRuntime::create_body`] as this Engine gets it: with the Docker client config's
    /// proxies and without Podman's unreliable `AutoRemove`.
    fn engine_create_body(&self, spec: &ContainerSpec) -> Result<ContainerCreateBody, DockerError> {
        let mut body = Self::create_body(spec)?;
        // docker-py puts the client's configured proxies first, so the job's own env wins.
        if let Some(dir) = &self.docker_config {
            let proxies = super::proxies::proxy_env(dir, &[&self.host, &self.base_url]);
            if !proxies.is_empty() {
                let env = body.env.take().unwrap_or_default();
                body.env = Some(proxies.into_iter().chain(env).collect());
            }
        }
        if self.is_podman
            && let Some(host_config) = body.host_config.as_mut()
        {
            // Podman's compat wait misreports AutoRemove containers (0, -1 or a hang), so the
            // worker removes them itself after a reliable `not-running` wait.
            host_config.auto_remove = None;
        }
        Ok(body)
    }

    /// Creates the container, retrying with `<name>-1`, `<name>-2`, … while the name is taken.
    ///
    /// # Errors
    /// [`DockerError::ImageNotFound`], [`DockerError::NameConflict`], [`DockerError::CreateFailed`].
    pub async fn create_container(
        &self,
        spec: &ContainerSpec,
    ) -> Result<CreatedContainer, DockerError> {
        let body = self.engine_create_body(spec)?;
        let created_at = chrono::Utc::now().timestamp();
        for attempt in 0..=NAME_CONFLICT_ATTEMPTS {
            let name = attempt_name(spec.name.as_deref(), attempt);
            match self
                .create_once(spec, &body, name.clone(), created_at)
                .await?
            {
                Attempt::Created(container) => return Ok(self.with_engine_name(container).await),
                Attempt::NameTaken if attempt < NAME_CONFLICT_ATTEMPTS => {
                    tracing::info!(
                        container = name.as_deref().unwrap_or_default(),
                        "Docker container name already exists; retrying"
                    );
                }
                Attempt::NameTaken => {}
            }
        }
        Err(DockerError::NameConflict {
            name: spec.name.clone().unwrap_or_default(),
            attempts: NAME_CONFLICT_ATTEMPTS,
        })
    }

    /// A container created without a name gets the one the Engine chose (`happy_turing`),
    /// as docker-py's container object has it, so messages and events name it as the
    /// reference does. If the inspect fails the short id stands in.
    async fn with_engine_name(&self, mut container: CreatedContainer) -> CreatedContainer {
        if container.name.is_none()
            && let Ok(info) = self.docker.inspect_container(&container.id, None).await
        {
            container.name = info.name.map(|n| n.trim_start_matches('/').to_owned());
        }
        container
    }

    /// One create call under `name`. A name conflict is [`Attempt::NameTaken`] when the spec
    /// asked for a name; every other failure is classified into its [`DockerError`].
    async fn create_once(
        &self,
        spec: &ContainerSpec,
        body: &ContainerCreateBody,
        name: Option<String>,
        created_at: i64,
    ) -> Result<Attempt, DockerError> {
        let options = create_options(name.as_deref(), spec.platform.as_deref());
        tracing::info!(
            container = name.as_deref().unwrap_or("<auto>"),
            "Creating Docker container"
        );
        let failure = match self.docker.create_container(options, body.clone()).await {
            Ok(resp) => {
                return Ok(Attempt::Created(CreatedContainer {
                    id: resp.id,
                    name,
                    created_at,
                }));
            }
            Err(e) => EngineFailure::from(e),
        };
        if failure.is_name_conflict() && spec.name.is_some() {
            return Ok(Attempt::NameTaken);
        }
        if failure.status == Some(404) && failure.message.contains("No such image") {
            return Err(DockerError::ImageNotFound {
                image: spec.image.clone(),
                policy: spec.pull_policy.as_str(),
            });
        }
        Err(DockerError::CreateFailed {
            name: name.unwrap_or_else(|| "<auto>".into()),
            failure,
        })
    }

    /// Connects the container to each network, in order.
    ///
    /// # Errors
    /// [`DockerError::NetworkNotFound`] or [`DockerError::NetworkConnectFailed`].
    pub async fn connect_networks(
        &self,
        container: &CreatedContainer,
        networks: &[String],
    ) -> Result<(), DockerError> {
        for network in networks {
            let inspected = self
                .docker
                .inspect_network(network, None)
                .await
                .map_err(|e| match EngineFailure::from(e) {
                    f if f.status == Some(404) => DockerError::NetworkNotFound {
                        network: network.clone(),
                    },
                    failure => DockerError::NetworkConnectFailed {
                        container: container.display_name().to_owned(),
                        network: network.clone(),
                        failure,
                    },
                })?;
            let id = inspected.id.unwrap_or_else(|| network.clone());
            let request = NetworkConnectRequest {
                container: container.id.clone(),
                endpoint_config: Some(Default::default()),
            };
            self.docker
                .connect_network(&id, request)
                .await
                .map_err(|e| DockerError::NetworkConnectFailed {
                    container: container.display_name().to_owned(),
                    network: network.clone(),
                    failure: e.into(),
                })?;
        }
        Ok(())
    }

    /// If another container carries the same exclusive label, one of them (earliest created,
    /// then lowest id) goes on and the others are removed before they start.
    async fn stand_down_if_duplicate(
        &self,
        ours: &CreatedContainer,
        key: &str,
        value: &str,
    ) -> Result<(), DockerError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{key}={value}")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let Ok(all) = self.docker.list_containers(Some(options)).await else {
            return Ok(()); // cannot tell: go on, as without the check
        };
        if all.len() < 2 {
            return Ok(());
        }
        let winner = all
            .iter()
            .filter_map(|c| Some((c.created.unwrap_or(i64::MAX), c.id.as_deref()?)))
            .min();
        if winner.is_some_and(|(_, id)| id != ours.id) {
            let options = RemoveContainerOptionsBuilder::default().force(true).build();
            let _ = self.docker.remove_container(&ours.id, Some(options)).await;
            return Err(DockerError::Duplicate {
                label: format!("{key}={value}"),
            });
        }
        Ok(())
    }

    /// Starts a created container.
    ///
    /// # Errors
    /// [`DockerError::StartFailed`].
    pub async fn start_container(&self, container: &CreatedContainer) -> Result<(), DockerError> {
        self.docker
            .start_container(&container.id, None)
            .await
            .map_err(|e| DockerError::StartFailed {
                container: container.display_name().to_owned(),
                failure: e.into(),
            })
    }

    /// Pull (per policy), create, connect the extra networks and start: everything up to a
    /// running container. A container created before a later step failed is left in place, as
    /// the Python worker leaves it, so its state can be inspected.
    ///
    /// # Errors
    /// The failing step's [`DockerError`].
    pub async fn create_and_start_container(
        &self,
        spec: &ContainerSpec,
    ) -> Result<StartedContainer, DockerError> {
        self.create_and_start_while(spec, &|| true).await
    }

    /// A step after the create failed. A failure about the job leaves the container for
    /// inspection, as the Python worker does; a transient one removes it, so a retry of the
    /// whole submission starts clean (one container per run).
    async fn after_failed_step(
        &self,
        container: &CreatedContainer,
        error: DockerError,
    ) -> DockerError {
        if error.is_transient() {
            self.force_remove(
                container,
                "container whose start failed for a transient reason",
            )
            .await;
        }
        error
    }

    /// [`DockerRuntime::create_and_start_container`], asking `wanted()` before the pull,
    /// before the create and right before the start: once it says no, nothing more happens, a
    /// container already created is removed, and the answer is [`DockerError::Withdrawn`].
    /// So a run cancelled while it was being submitted never gets a container started.
    ///
    /// # Errors
    /// The failing step's [`DockerError`], or [`DockerError::Withdrawn`].
    pub async fn create_and_start_while(
        &self,
        spec: &ContainerSpec,
        wanted: &(dyn Fn() -> bool + Sync),
    ) -> Result<StartedContainer, DockerError> {
        self.create_and_start_observed(spec, wanted, &|_| {}).await
    }

    /// [`DockerRuntime::create_and_start_while`], telling `created` about the container as soon
    /// as it exists, before its networks and its start (which may still fail): the caller's
    /// `container.created` event is due then, as in the reference.
    ///
    /// # Errors
    /// The failing step's [`DockerError`], or [`DockerError::Withdrawn`].
    pub async fn create_and_start_observed(
        &self,
        spec: &ContainerSpec,
        wanted: &(dyn Fn() -> bool + Sync),
        created: &(dyn Fn(&CreatedContainer) + Sync),
    ) -> Result<StartedContainer, DockerError> {
        if !wanted() {
            return Err(DockerError::Withdrawn { stage: "pulled" });
        }
        // From the pull to the create, nothing but this mark keeps an image collection from
        // removing the image; after it, the container does.
        let _in_flight = self.in_flight.enter(&spec.image);
        let pull_duration = self.ensure_image(spec).await?;
        if !wanted() {
            return Err(DockerError::Withdrawn { stage: "created" });
        }
        let container = self.create_container(spec).await?;
        if let Some((key, value)) = &spec.exclusive_label {
            self.stand_down_if_duplicate(&container, key, value).await?;
        }
        created(&container);
        if let Err(e) = self
            .connect_networks(&container, &spec.extra_networks)
            .await
        {
            return Err(self.after_failed_step(&container, e).await);
        }
        if !wanted() {
            self.force_remove(&container, "withdrawn container").await;
            return Err(DockerError::Withdrawn { stage: "started" });
        }
        match self.start_container(&container).await {
            Err(DockerError::StartFailed { container, failure })
                if spec.host_config_overrides.contains_key("DeviceRequests")
                    && failure.message.contains("could not select device driver") =>
            {
                return Err(DockerError::NoGpuRuntime { container, failure });
            }
            Err(e) => return Err(self.after_failed_step(&container, e).await),
            Ok(()) => {}
        }
        Ok(StartedContainer {
            container,
            pull_duration,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::PullPolicy;
    use std::collections::BTreeMap;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "local/busybox:dw".into(),
            pull_policy: PullPolicy::Never,
            registry_credentials: None,
            name: Some("n".into()),
            command: vec!["true".into()],
            env: vec![("A".into(), "1".into())],
            labels: BTreeMap::from([("l".into(), "v".into())]),
            network_mode: "host".into(),
            extra_networks: vec![],
            binds: vec!["/tmp:/t".into()],
            volume_paths: vec!["/t".into()],
            mem_limit: Some(1 << 26),
            memswap_limit: None,
            privileged: false,
            auto_remove: true,
            stream_output: true,
            extra_hosts: Some(vec!["host.docker.internal:host-gateway".into()]),
            config_overrides: Map::from_iter([("User".to_owned(), json!("1000"))]),
            host_config_overrides: Map::from_iter([("ShmSize".to_owned(), json!(1024))]),
            exclusive_label: None,
            platform: None,
            max_runtime: None,
            create_kwargs_keys: vec![],
        }
    }

    #[test]
    fn create_body_has_the_reference_shape() {
        let body = serde_json::to_value(DockerRuntime::create_body(&spec()).unwrap()).unwrap();
        assert_eq!(body["Env"], json!(["A=1"]));
        assert_eq!(body["Cmd"], json!(["true"]));
        assert_eq!(body["Volumes"], json!({"/t": {}}));
        assert_eq!(body["User"], json!("1000"));
        let hc = &body["HostConfig"];
        assert_eq!(hc["NetworkMode"], json!("host"));
        assert_eq!(hc["Memory"], json!(1 << 26));
        assert_eq!(hc["AutoRemove"], json!(true));
        assert_eq!(hc["ShmSize"], json!(1024));
        assert_eq!(
            hc["ExtraHosts"],
            json!(["host.docker.internal:host-gateway"])
        );
        assert!(hc.get("Privileged").is_none() && hc.get("MemorySwap").is_none());
    }

    #[test]
    fn bad_overrides_are_reported() {
        let mut s = spec();
        s.host_config_overrides
            .insert("ShmSize".into(), json!("not a number"));
        assert!(matches!(
            DockerRuntime::create_body(&s),
            Err(DockerError::InvalidOptions { .. })
        ));
    }

    #[test]
    fn conflicting_names_get_numbered_suffixes() {
        assert_eq!(attempt_name(Some("n"), 0).as_deref(), Some("n"));
        assert_eq!(attempt_name(Some("n"), 2).as_deref(), Some("n-2"));
        assert_eq!(attempt_name(None, 3), None);
        assert!(create_options(None, None).is_none());
    }
}
