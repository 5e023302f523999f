//! The host policy (`--policy FILE`): what a job may not ask of a shared Docker host, and what
//! every container gets whatever its job says. A deployment author can otherwise get root on
//! the host with `privileged`, a host namespace, a capability, a device or a bind of the Docker
//! socket; platform teams need to refuse those (as GitLab Runner's and Nomad's allow-lists do).
//!
//! Pure apart from host-path resolution, which goes through [`paths::HostPaths`]: it knows the
//! [`ContainerSpec`] and nothing of Prefect or the Docker API client. The worker applies it to
//! every new run after its configuration was rendered and validated and before anything is
//! pulled or created; containers adopted after a restart are not judged again.

pub mod file;
pub(crate) mod image;
pub mod paths;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::job::ContainerSpec;
pub use file::PolicyFileError;
use file::normalize_capability;
use paths::{HostPaths, RealHost, has_parent_dir};

/// The Docker sockets a bind may never reach, wherever the allowed prefixes are: access to
/// the socket is root on the host. The worker adds its own `DOCKER_HOST` socket.
const DOCKER_SOCKETS: [&str; 2] = ["/var/run/docker.sock", "/run/docker.sock"];

/// A host namespace a container can share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Namespace {
    /// `network_mode: host` (or `container:…`), or a `host` network.
    Network,
    /// `pid_mode`.
    Pid,
    /// `ipc_mode`.
    Ipc,
    /// `uts_mode`.
    Uts,
    /// `userns_mode`.
    Userns,
    /// `cgroupns`.
    Cgroup,
}

/// `[deny]`: each rule off unless the file turns it on.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Deny {
    pub privileged: bool,
    pub host_namespaces: Vec<Namespace>,
    /// Allowed host prefixes for bind mounts; `None` = binds are not judged.
    pub bind_outside: Option<Vec<PathBuf>>,
    pub cap_add: bool,
    pub devices: bool,
    pub unconfined: bool,
}

/// `[allow]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Allow {
    /// Image patterns; `None` = any image.
    pub registries: Option<Vec<String>>,
    /// Capabilities `cap_add` may add when `deny.cap_add` is on.
    pub capabilities: Vec<String>,
    /// Host devices allowed when `deny.devices` is on.
    pub devices: Vec<PathBuf>,
    /// `container_create_kwargs` keys; `None` = any.
    pub create_kwargs: Option<Vec<String>>,
}

/// `[force]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Force {
    pub no_new_privileges: bool,
    pub read_only_rootfs: bool,
    /// `path[:options]` tmpfs mounts (`/tmp` by default with a read-only root).
    pub tmpfs: Vec<String>,
    pub user: Option<String>,
    pub pids_limit: Option<i64>,
    pub memory: Option<i64>,
    pub max_memory: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub max_nano_cpus: Option<i64>,
    pub cap_drop: Vec<String>,
}

/// A rule a job broke; also the `rule` label of `docker_worker_policy_violations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// `[deny] privileged`.
    Privileged,
    /// `[deny] host_namespaces`.
    HostNamespaces,
    /// `[deny] bind_outside`.
    BindOutside,
    /// `[deny] cap_add` with `[allow] capabilities`.
    CapAdd,
    /// `[deny] devices` with `[allow] devices`.
    Devices,
    /// `[deny] unconfined`.
    Unconfined,
    /// `[allow] registries`.
    Registries,
    /// `[allow] create_kwargs`.
    CreateKwargs,
    /// `[force] max_memory`.
    MaxMemory,
    /// `[force] max_cpus`.
    MaxCpus,
}

impl Rule {
    /// The rule's key in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::HostNamespaces => "host_namespaces",
            Self::BindOutside => "bind_outside",
            Self::CapAdd => "cap_add",
            Self::Devices => "devices",
            Self::Unconfined => "unconfined",
            Self::Registries => "registries",
            Self::CreateKwargs => "create_kwargs",
            Self::MaxMemory => "max_memory",
            Self::MaxCpus => "max_cpus",
        }
    }
}

/// A job the policy refuses: `<rule> (<field>)`, and what was wrong when saying it cannot leak
/// a secret (a path, a mode, a capability; never an option's value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Violation {
    /// The rule.
    pub rule: Rule,
    /// The job field that broke it (`volumes.0`, `container_create_kwargs.cap_add`).
    pub field: String,
    /// What was wrong, when it helps and is safe to show.
    pub detail: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.rule.as_str(), self.field)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

fn violation(rule: Rule, field: impl Into<String>, detail: impl Into<String>) -> Violation {
    Violation {
        rule,
        field: field.into(),
        detail: Some(detail.into()),
    }
}

/// What the policy changed in an allowed job, one entry per change, for the run's logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// `User 1000:1000`, `ReadonlyRootfs`, `volumes.0 /srv/link → /srv/real`, …
    pub changes: Vec<String>,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.changes.join(", "))
    }
}

/// A loaded policy.
#[derive(Clone)]
pub struct HostPolicy {
    /// The file it came from (for logs and messages).
    source: PathBuf,
    deny: Deny,
    allow: Allow,
    force: Force,
    /// Sockets no bind may reach (see [`DOCKER_SOCKETS`]).
    docker_sockets: Vec<PathBuf>,
    /// How host paths are resolved.
    host: Arc<dyn HostPaths>,
}

impl fmt::Debug for HostPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostPolicy")
            .field("source", &self.source)
            .field("deny", &self.deny)
            .field("allow", &self.allow)
            .field("force", &self.force)
            .field("docker_sockets", &self.docker_sockets)
            .finish_non_exhaustive()
    }
}

impl PartialEq for HostPolicy {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.source,
            &self.deny,
            &self.allow,
            &self.force,
            &self.docker_sockets,
        ) == (
            &other.source,
            &other.deny,
            &other.allow,
            &other.force,
            &other.docker_sockets,
        )
    }
}

impl HostPolicy {
    /// Reads the policy file at `path`.
    ///
    /// # Errors
    /// [`PolicyFileError`] when the file cannot be read, is not TOML, or has a key or value
    /// that cannot be applied (with its line).
    pub fn load(path: &Path) -> Result<Self, PolicyFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyFileError {
            path: path.to_owned(),
            at: None,
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// A policy from a file's text; `path` names it in errors and logs.
    ///
    /// # Errors
    /// [`PolicyFileError`] as for [`HostPolicy::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyFileError> {
        let sections = file::parse(text, path)?;
        Ok(Self {
            source: path.to_owned(),
            deny: sections.deny,
            allow: sections.allow,
            force: sections.force,
            docker_sockets: DOCKER_SOCKETS.iter().map(PathBuf::from).collect(),
            host: Arc::new(RealHost),
        })
    }

    /// Also protects `socket` (the worker's `DOCKER_HOST` when it is a unix socket).
    #[must_use]
    pub fn with_docker_socket(mut self, socket: PathBuf) -> Self {
        if !self.docker_sockets.contains(&socket) {
            self.docker_sockets.push(socket);
        }
        self
    }

    /// Resolves host paths with `host` instead of the real filesystem (tests).
    #[must_use]
    pub fn with_host_paths(mut self, host: Arc<dyn HostPaths>) -> Self {
        self.host = host;
        self
    }

    /// The file the policy came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Judges a job's container and, when it is allowed, applies what the policy forces.
    /// Bind sources are rewritten to their resolved host paths, so the Engine mounts what
    /// was judged even if a link changes later.
    ///
    /// # Errors
    /// The first [`Violation`], before anything of `spec` is changed.
    pub fn apply(&self, spec: &mut ContainerSpec) -> Result<Applied, Violation> {
        self.check_image(spec)?;
        self.check_privileged(spec)?;
        self.check_namespaces(spec)?;
        self.check_capabilities(spec)?;
        self.check_devices(spec)?;
        self.check_unconfined(spec)?;
        self.check_create_kwargs(spec)?;
        let binds = self.check_binds(spec)?;
        self.check_limits(spec)?;
        let mut applied = Applied::default();
        for (i, bind) in binds {
            applied.changes.push(format!(
                "volumes.{i} {} → {bind}",
                spec.binds.get(i).map_or("", String::as_str)
            ));
            if let Some(slot) = spec.binds.get_mut(i) {
                *slot = bind;
            }
        }
        self.rewrite_mounts(spec, &mut applied);
        self.force(spec, &mut applied);
        Ok(applied)
    }

    fn check_image(&self, spec: &ContainerSpec) -> Result<(), Violation> {
        match &self.allow.registries {
            Some(patterns) if !image::image_allowed(patterns, &spec.image) => Err(violation(
                Rule::Registries,
                "image",
                format!("{} is not in an allowed registry", spec.image),
            )),
            _ => Ok(()),
        }
    }

    fn check_privileged(&self, spec: &ContainerSpec) -> Result<(), Violation> {
        let privileged = spec.privileged || host(spec, "Privileged") == Some(&json!(true));
        if self.deny.privileged && privileged {
            return Err(violation(
                Rule::Privileged,
                "privileged",
                "privileged containers are refused on this host",
            ));
        }
        Ok(())
    }

    /// Host modes and `container:` modes (which join another container's namespace, possibly
    /// the host's): Nomad's HCSEC-2026-19 was host namespace modes getting past a privileged
    /// gate, so each namespace is its own rule here.
    fn check_namespaces(&self, spec: &ContainerSpec) -> Result<(), Violation> {
        let denied = |ns: Namespace| self.deny.host_namespaces.contains(&ns);
        if denied(Namespace::Network) {
            if spec.extra_networks.iter().any(|n| n == "host") {
                return Err(violation(
                    Rule::HostNamespaces,
                    "networks",
                    "the `host` network shares the host's network namespace",
                ));
            }
            if let Some(detail) = shared(&spec.network_mode, "network") {
                return Err(violation(
                    Rule::HostNamespaces,
                    "network_mode",
                    format!(
                        "{detail} (with no network named, the worker picks `host` when PREFECT_API_URL is on localhost: give the job `networks` or a `network_mode`, and the worker an API URL containers can reach)"
                    ),
                ));
            }
        }
        for (ns, engine_field, field, name) in [
            (
                Namespace::Pid,
                "PidMode",
                "container_create_kwargs.pid_mode",
                "pid",
            ),
            (Namespace::Ipc, "IpcMode", "ipc_mode", "ipc"),
            (
                Namespace::Uts,
                "UTSMode",
                "container_create_kwargs.uts_mode",
                "uts",
            ),
            (
                Namespace::Userns,
                "UsernsMode",
                "container_create_kwargs.userns_mode",
                "user",
            ),
            (
                Namespace::Cgroup,
                "CgroupnsMode",
                "container_create_kwargs.cgroupns",
                "cgroup",
            ),
        ] {
            let mode = host(spec, engine_field).and_then(Value::as_str);
            if denied(ns)
                && let Some(detail) = mode.and_then(|m| shared(m, name))
            {
                return Err(violation(Rule::HostNamespaces, field, detail));
            }
        }
        Ok(())
    }

    fn check_capabilities(&self, spec: &ContainerSpec) -> Result<(), Violation> {
        if !self.deny.cap_add {
            return Ok(());
        }
        for cap in strings(host(spec, "CapAdd")) {
            let name = normalize_capability(&cap);
            if !self.allow.capabilities.contains(&name) {
                return Err(violation(
                    Rule::CapAdd,
                    "container_create_kwargs.cap_add",
                    format!("{name} is not an allowed capability"),
                ));
            }
        }
        Ok(())
    }

    fn check_devices(&self, spec: &ContainerSpec) -> Result<(), Violation> {
        if !self.deny.devices {
            return Ok(());
        }
        if !strings(host(spec, "DeviceCgroupRules")).is_empty() {
            return Err(violation(
                Rule::Devices,
                "container_create_kwargs.device_cgroup_rules",
                "device cgroup rules are refused on this host",
            ));
        }
        let allowed: Vec<PathBuf> = self
            .allow
            .devices
            .iter()
            .map(|d| self.host.resolve(d))
            .collect();
        let devices = host(spec, "Devices").and_then(Value::as_array);
        for device in devices.into_iter().flatten() {
            let on_host = device
                .get("PathOnHost")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let path = Path::new(on_host);
            let ok = path.is_absolute()
                && !has_parent_dir(path)
                && allowed.contains(&self.host.resolve(path));
            if !ok {
                return Err(violation(
                    Rule::Devices,
                    "container_create_kwargs.devices",
                    format!("{on_host} is not an allowed device"),
                ));
            }
        }
        Ok(())
    }

    fn check_unconfined(&self, spec: &ContainerSpec) -> Result<(), Violation> {
        if !self.deny.unconfined {
            return Ok(());
        }
        for option in strings(host(spec, "SecurityOpt")) {
            let (key, value) = option
                .split_once(['=', ':'])
                .unwrap_or((option.as_str(), ""));
            let what = match (key, value) {
                // Any seccomp profile of the job's own: it can allow every syscall.
                ("seccomp", _) => "a seccomp profile of the job's own",
                ("apparmor", "unconfined") => "apparmor=unconfined",
                ("label", "disable") => "label=disable",
                ("systempaths", "unconfined") => "systempaths=unconfined",
                _ => continue,
            };
            return Err(violation(
                Rule::Unconfined,
                "container_create_kwargs.security_opt",
                format!("{what} is refused on this host"),
            ));
        }
        Ok(())
    }

    fn check_create_kwargs(&self, spec: &ContainerSpec) -> Result<(), Violation> {
        let Some(allowed) = &self.allow.create_kwargs else {
            return Ok(());
        };
        match spec
            .create_kwargs_keys
            .iter()
            .find(|k| !allowed.contains(k))
        {
            Some(key) => Err(violation(
                Rule::CreateKwargs,
                format!("container_create_kwargs.{key}"),
                "not an allowed container_create_kwargs key",
            )),
            None => Ok(()),
        }
    }

    /// Judges every host path the container would mount; returns the binds whose source
    /// resolved to another path (index, rewritten bind).
    fn check_binds(&self, spec: &ContainerSpec) -> Result<Vec<(usize, String)>, Violation> {
        let Some(prefixes) = &self.deny.bind_outside else {
            return Ok(Vec::new());
        };
        let allowed: Vec<PathBuf> = prefixes.iter().map(|p| self.host.resolve(p)).collect();
        let mut rewritten = Vec::new();
        for (i, bind) in spec.binds.iter().enumerate() {
            let Some((source, rest)) = bind_source(bind) else {
                continue;
            };
            let resolved = self.judge_source(source, &format!("volumes.{i}"), &allowed)?;
            if resolved != Path::new(source) {
                rewritten.push((i, format!("{}{rest}", resolved.display())));
            }
        }
        let mounts = host(spec, "Mounts").and_then(Value::as_array);
        for (i, mount) in mounts.into_iter().flatten().enumerate() {
            let field = format!("container_create_kwargs.mounts.{i}");
            match mount.get("Type").and_then(Value::as_str) {
                Some("bind") => {
                    let source = mount.get("Source").and_then(Value::as_str);
                    self.judge_source(source.unwrap_or_default(), &field, &allowed)?;
                }
                Some("volume")
                    if mount
                        .pointer("/VolumeOptions/DriverConfig")
                        .is_some_and(|d| !d.is_null()) =>
                {
                    return Err(violation(
                        Rule::BindOutside,
                        field,
                        "a volume with driver options can mount any host path",
                    ));
                }
                _ => {}
            }
        }
        if !strings(host(spec, "VolumesFrom")).is_empty() {
            return Err(violation(
                Rule::BindOutside,
                "container_create_kwargs.volumes_from",
                "another container's mounts cannot be judged",
            ));
        }
        Ok(rewritten)
    }

    /// One bind source: no `..`, never (a directory holding) the Docker socket, and inside an
    /// allowed prefix once every link is resolved. Returns the resolved path.
    fn judge_source(
        &self,
        source: &str,
        field: &str,
        allowed: &[PathBuf],
    ) -> Result<PathBuf, Violation> {
        let path = Path::new(source);
        if !path.is_absolute() || has_parent_dir(path) {
            return Err(violation(
                Rule::BindOutside,
                field,
                format!("{source} is not an absolute host path without `..`"),
            ));
        }
        let resolved = self.host.resolve(path);
        let via = if resolved == path {
            String::new()
        } else {
            format!(" (it resolves to {})", resolved.display())
        };
        for socket in &self.docker_sockets {
            let socket = self.host.resolve(socket);
            if socket == resolved {
                return Err(violation(
                    Rule::BindOutside,
                    field,
                    format!("{source} is the Docker socket{via}"),
                ));
            }
            if socket.starts_with(&resolved) {
                return Err(violation(
                    Rule::BindOutside,
                    field,
                    format!("{source} holds the Docker socket {}{via}", socket.display()),
                ));
            }
        }
        if !allowed.iter().any(|p| resolved.starts_with(p)) {
            return Err(violation(
                Rule::BindOutside,
                field,
                format!("{source} is outside the allowed host paths{via}"),
            ));
        }
        Ok(resolved)
    }

    /// Bind mounts of `container_create_kwargs.mounts` get their resolved sources too.
    fn rewrite_mounts(&self, spec: &mut ContainerSpec, applied: &mut Applied) {
        if self.deny.bind_outside.is_none() {
            return;
        }
        let Some(Value::Array(mounts)) = spec.host_config_overrides.get_mut("Mounts") else {
            return;
        };
        for (i, mount) in mounts.iter_mut().enumerate() {
            if mount.get("Type").and_then(Value::as_str) != Some("bind") {
                continue;
            }
            let Some(source) = mount.get("Source").and_then(Value::as_str) else {
                continue;
            };
            let resolved = self.host.resolve(Path::new(source));
            if resolved != Path::new(source) {
                applied.changes.push(format!(
                    "container_create_kwargs.mounts.{i} {source} → {}",
                    resolved.display()
                ));
                mount["Source"] = json!(resolved.display().to_string());
            }
        }
    }

    fn check_limits(&self, spec: &ContainerSpec) -> Result<(), Violation> {
        if let (Some(max), Some(asked)) = (self.force.max_memory, spec.mem_limit)
            && asked > max
        {
            return Err(violation(
                Rule::MaxMemory,
                "mem_limit",
                format!("{asked} bytes asked, at most {max} allowed"),
            ));
        }
        let Some(max) = self.force.max_nano_cpus else {
            return Ok(());
        };
        for (engine_field, field) in [
            ("CpuQuota", "container_create_kwargs.cpu_quota"),
            ("CpuPeriod", "container_create_kwargs.cpu_period"),
        ] {
            if host(spec, engine_field).is_some() {
                return Err(violation(
                    Rule::MaxCpus,
                    field,
                    "with a CPU limit on this host, CPUs are set with the `cpus` job variable",
                ));
            }
        }
        match host(spec, "NanoCpus").and_then(Value::as_i64) {
            Some(asked) if asked > max => Err(violation(
                Rule::MaxCpus,
                "cpus",
                format!(
                    "{} CPUs asked, at most {} allowed",
                    asked as f64 / 1e9,
                    max as f64 / 1e9
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Applies the `[force]` section.
    fn force(&self, spec: &mut ContainerSpec, applied: &mut Applied) {
        let force = &self.force;
        let changes = &mut applied.changes;
        if spec.mem_limit.is_none_or(|m| m <= 0)
            && let Some(memory) = force.memory.or(force.max_memory)
        {
            spec.mem_limit = Some(memory);
            changes.push(format!("Memory {memory}"));
        }
        let hc = &mut spec.host_config_overrides;
        let cpu_set = ["NanoCpus", "CpuQuota", "CpuPeriod"]
            .iter()
            .any(|f| hc.get(*f).is_some_and(|v| !v.is_null()));
        if !cpu_set && let Some(nanos) = force.nano_cpus.or(force.max_nano_cpus) {
            hc.insert("NanoCpus".into(), json!(nanos));
            changes.push(format!("NanoCpus {nanos}"));
        }
        if force.no_new_privileges {
            let mut options = strings(hc.get("SecurityOpt"));
            options.retain(|o| !o.starts_with("no-new-privileges"));
            options.push("no-new-privileges".into());
            hc.insert("SecurityOpt".into(), json!(options));
            changes.push("SecurityOpt no-new-privileges".into());
        }
        if force.read_only_rootfs {
            hc.insert("ReadonlyRootfs".into(), json!(true));
            changes.push("ReadonlyRootfs".into());
        }
        force_tmpfs(hc, &force.tmpfs, changes);
        if let Some(limit) = force.pids_limit {
            let asked = hc.get("PidsLimit").and_then(Value::as_i64);
            if !asked.is_some_and(|n| n > 0 && n <= limit) {
                hc.insert("PidsLimit".into(), json!(limit));
                changes.push(format!("PidsLimit {limit}"));
            }
        }
        if !force.cap_drop.is_empty() {
            let mut drop: BTreeSet<String> = strings(hc.get("CapDrop"))
                .iter()
                .map(|c| normalize_capability(c))
                .collect();
            drop.extend(force.cap_drop.iter().cloned());
            hc.insert("CapDrop".into(), json!(drop));
            changes.push(format!("CapDrop {}", force.cap_drop.join(" ")));
        }
        if let Some(user) = &force.user {
            spec.config_overrides.insert("User".into(), json!(user));
            changes.push(format!("User {user}"));
        }
    }

    /// The rules in words, for `docker-worker policy check` and the start-up log.
    pub fn describe(&self) -> Vec<String> {
        let mut out = self.describe_refusals();
        out.extend(self.describe_forced());
        out
    }

    /// The `[deny]` and `[allow]` rules in words.
    fn describe_refusals(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (deny, allow) = (&self.deny, &self.allow);
        let list = |items: &[String]| items.join(", ");
        let paths = |items: &[PathBuf]| {
            items
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if deny.privileged {
            out.push("refuse privileged containers".into());
        }
        if !deny.host_namespaces.is_empty() {
            let names: Vec<String> = deny
                .host_namespaces
                .iter()
                .map(|n| format!("{n:?}").to_ascii_lowercase())
                .collect();
            out.push(format!(
                "refuse the host's (or another container's) namespaces: {}",
                list(&names)
            ));
        }
        if let Some(prefixes) = &deny.bind_outside {
            out.push(format!(
                "refuse bind mounts outside {} (links resolved on this host) and of the Docker socket ({})",
                if prefixes.is_empty() { "everything".to_owned() } else { paths(prefixes) },
                paths(&self.docker_sockets)
            ));
        }
        if deny.cap_add {
            out.push(format!(
                "refuse added capabilities other than: {}",
                if allow.capabilities.is_empty() {
                    "none".to_owned()
                } else {
                    list(&allow.capabilities)
                }
            ));
        }
        if deny.devices {
            out.push(format!(
                "refuse host devices other than: {}",
                if allow.devices.is_empty() {
                    "none".to_owned()
                } else {
                    paths(&allow.devices)
                }
            ));
        }
        if deny.unconfined {
            out.push("refuse unconfined seccomp, AppArmor, SELinux labels and system paths".into());
        }
        if let Some(patterns) = &allow.registries {
            out.push(format!("allow only images matching: {}", list(patterns)));
        }
        if let Some(keys) = &allow.create_kwargs {
            out.push(format!(
                "allow only these container_create_kwargs keys: {}",
                list(keys)
            ));
        }
        out
    }

    /// The `[force]` rules in words.
    fn describe_forced(&self) -> Vec<String> {
        let mut out = Vec::new();
        let force = &self.force;
        let list = |items: &[String]| items.join(", ");
        if let Some(max) = force.max_memory {
            out.push(format!("refuse more memory than {max} bytes"));
        }
        if let Some(max) = force.max_nano_cpus {
            out.push(format!("refuse more CPUs than {}", max as f64 / 1e9));
        }
        if let Some(memory) = force.memory.or(force.max_memory) {
            out.push(format!(
                "memory limit {memory} bytes when the job sets none"
            ));
        }
        if let Some(nanos) = force.nano_cpus.or(force.max_nano_cpus) {
            out.push(format!(
                "{} CPUs when the job sets none",
                nanos as f64 / 1e9
            ));
        }
        if force.no_new_privileges {
            out.push("force no-new-privileges".into());
        }
        if force.read_only_rootfs {
            out.push("force a read-only root filesystem".into());
        }
        if !force.tmpfs.is_empty() {
            out.push(format!("force tmpfs mounts: {}", list(&force.tmpfs)));
        }
        if let Some(user) = &force.user {
            out.push(format!("force user {user}"));
        }
        if let Some(limit) = force.pids_limit {
            out.push(format!("force a pids limit of at most {limit}"));
        }
        if !force.cap_drop.is_empty() {
            out.push(format!(
                "force dropped capabilities: {}",
                list(&force.cap_drop)
            ));
        }
        out
    }
}

/// What a namespace mode shares, if anything: `host`, or `container:<name>`.
fn shared(mode: &str, namespace: &str) -> Option<String> {
    if mode == "host" {
        Some(format!("`host` shares the host's {namespace} namespace"))
    } else if mode.starts_with("container:") {
        Some(format!(
            "`{mode}` joins another container's {namespace} namespace, which can be the host's"
        ))
    } else {
        None
    }
}

/// A `HostConfig` field the job's options set.
fn host<'s>(spec: &'s ContainerSpec, field: &str) -> Option<&'s Value> {
    spec.host_config_overrides
        .get(field)
        .filter(|v| !v.is_null())
}

/// A JSON list of strings (anything else reads as empty).
fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The host source of a bind (`/src:/dst[:ro]` → `/src` and `:/dst[:ro]`); `None` for an
/// anonymous or named volume.
fn bind_source(bind: &str) -> Option<(&str, &str)> {
    let colon = bind.find(':')?;
    let (source, rest) = bind.split_at(colon);
    source.starts_with('/').then_some((source, rest))
}

/// Adds each forced tmpfs mount the job does not already have.
fn force_tmpfs(hc: &mut Map<String, Value>, tmpfs: &[String], changes: &mut Vec<String>) {
    if tmpfs.is_empty() {
        return;
    }
    let mut mounts = match hc.get("Tmpfs") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    for entry in tmpfs {
        let (path, options) = entry.split_once(':').unwrap_or((entry, ""));
        if !mounts.contains_key(path) {
            mounts.insert(path.to_owned(), json!(options));
            changes.push(format!("Tmpfs {path}"));
        }
    }
    hc.insert("Tmpfs".into(), Value::Object(mounts));
}

#[cfg(test)]
mod tests;
