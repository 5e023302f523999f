//! The policy's rules on specs, with host paths resolved in a temporary directory tree.

use std::os::unix::fs::symlink;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::*;
use crate::job::{ContainerSpec, PullPolicy};

fn spec() -> ContainerSpec {
    ContainerSpec {
        image: "local/busybox:dw".into(),
        pull_policy: PullPolicy::Never,
        registry_credentials: None,
        name: Some("n".into()),
        command: vec!["true".into()],
        env: vec![],
        labels: Default::default(),
        network_mode: "default".into(),
        extra_networks: vec![],
        binds: vec![],
        volume_paths: vec![],
        mem_limit: None,
        memswap_limit: None,
        privileged: false,
        auto_remove: false,
        stream_output: true,
        extra_hosts: None,
        config_overrides: Map::new(),
        host_config_overrides: Map::new(),
        exclusive_label: None,
        platform: None,
        create_kwargs_keys: vec![],
        max_runtime: None,
    }
}

fn policy(text: &str) -> HostPolicy {
    HostPolicy::parse(text, Path::new("/etc/docker-worker/policy.toml")).unwrap()
}

fn with_host(mut s: ContainerSpec, fields: Value) -> ContainerSpec {
    for (k, v) in fields.as_object().unwrap() {
        s.host_config_overrides.insert(k.clone(), v.clone());
    }
    s
}

fn refused(p: &HostPolicy, mut s: ContainerSpec) -> Violation {
    let before = s.clone();
    let v = p.apply(&mut s).expect_err("refused");
    assert_eq!(s, before, "a refused spec is left as it was");
    v
}

fn allowed(p: &HostPolicy, mut s: ContainerSpec) -> (ContainerSpec, Applied) {
    let applied = p.apply(&mut s).unwrap_or_else(|v| panic!("refused: {v}"));
    (s, applied)
}

#[test]
fn no_rule_changes_nothing() {
    let p = policy("");
    let s = with_host(
        ContainerSpec {
            privileged: true,
            network_mode: "host".into(),
            binds: vec!["/var/run/docker.sock:/var/run/docker.sock".into()],
            ..spec()
        },
        json!({"CapAdd": ["SYS_ADMIN"], "PidMode": "host", "Devices": [{"PathOnHost": "/dev/sda"}]}),
    );
    let (after, applied) = allowed(&p, s.clone());
    assert_eq!(after, s);
    assert!(applied.changes.is_empty());
}

#[test]
fn privileged() {
    let p = policy("[deny]\nprivileged = true\n");
    let v = refused(
        &p,
        ContainerSpec {
            privileged: true,
            ..spec()
        },
    );
    assert_eq!((v.rule, v.field.as_str()), (Rule::Privileged, "privileged"));
    assert!(v.to_string().starts_with("privileged (privileged)"), "{v}");
    allowed(&p, spec());
}

#[test]
fn host_namespaces_and_container_modes() {
    let p = policy(
        "[deny]\nhost_namespaces = [\"network\", \"pid\", \"ipc\", \"uts\", \"userns\", \"cgroup\"]\n",
    );
    for (s, field) in [
        (
            ContainerSpec {
                network_mode: "host".into(),
                ..spec()
            },
            "network_mode",
        ),
        (
            ContainerSpec {
                network_mode: "container:db".into(),
                ..spec()
            },
            "network_mode",
        ),
        (
            ContainerSpec {
                extra_networks: vec!["host".into()],
                ..spec()
            },
            "networks",
        ),
        (
            with_host(spec(), json!({"PidMode": "host"})),
            "container_create_kwargs.pid_mode",
        ),
        (
            with_host(spec(), json!({"PidMode": "container:x"})),
            "container_create_kwargs.pid_mode",
        ),
        (with_host(spec(), json!({"IpcMode": "host"})), "ipc_mode"),
        (
            with_host(spec(), json!({"IpcMode": "container:x"})),
            "ipc_mode",
        ),
        (
            with_host(spec(), json!({"UTSMode": "host"})),
            "container_create_kwargs.uts_mode",
        ),
        (
            with_host(spec(), json!({"UsernsMode": "host"})),
            "container_create_kwargs.userns_mode",
        ),
        (
            with_host(spec(), json!({"CgroupnsMode": "host"})),
            "container_create_kwargs.cgroupns",
        ),
    ] {
        let v = refused(&p, s);
        assert_eq!(
            (v.rule, v.field.as_str()),
            (Rule::HostNamespaces, field),
            "{v}"
        );
    }
    allowed(
        &p,
        with_host(
            ContainerSpec {
                network_mode: "my-net".into(),
                ..spec()
            },
            json!({"IpcMode": "shareable", "PidMode": "", "CgroupnsMode": "private"}),
        ),
    );
    // Only the namespaces listed are refused.
    let p = policy("[deny]\nhost_namespaces = [\"pid\"]\n");
    allowed(
        &p,
        ContainerSpec {
            network_mode: "host".into(),
            ..spec()
        },
    );
}

#[test]
fn capabilities_beyond_the_allow_list() {
    let p = policy("[deny]\ncap_add = true\n[allow]\ncapabilities = [\"NET_BIND_SERVICE\"]\n");
    let v = refused(
        &p,
        with_host(
            spec(),
            json!({"CapAdd": ["NET_BIND_SERVICE", "cap_sys_admin"]}),
        ),
    );
    assert_eq!(v.rule, Rule::CapAdd);
    assert!(v.to_string().contains("SYS_ADMIN"), "{v}");
    allowed(
        &p,
        with_host(spec(), json!({"CapAdd": ["CAP_NET_BIND_SERVICE"]})),
    );
    let none = policy("[deny]\ncap_add = true\n");
    refused(
        &none,
        with_host(spec(), json!({"CapAdd": ["NET_BIND_SERVICE"]})),
    );
}

#[test]
fn devices_beyond_the_allow_list_and_cgroup_rules() {
    let p = policy("[deny]\ndevices = true\n[allow]\ndevices = [\"/dev/null\"]\n");
    let device = |path: &str| json!({"Devices": [{"PathOnHost": path, "PathInContainer": "/dev/x", "CgroupPermissions": "rwm"}]});
    let v = refused(&p, with_host(spec(), device("/dev/sda")));
    assert_eq!(
        (v.rule, v.field.as_str()),
        (Rule::Devices, "container_create_kwargs.devices")
    );
    allowed(&p, with_host(spec(), device("/dev/null")));
    let v = refused(
        &p,
        with_host(spec(), json!({"DeviceCgroupRules": ["c 1:3 mr"]})),
    );
    assert_eq!(v.field, "container_create_kwargs.device_cgroup_rules");
}

#[test]
fn unconfined_security_options() {
    let p = policy("[deny]\nunconfined = true\n");
    for option in [
        "seccomp=unconfined",
        "seccomp:{\"defaultAction\":\"SCMP_ACT_ALLOW\"}",
        "apparmor=unconfined",
        "label:disable",
        "systempaths=unconfined",
    ] {
        let v = refused(&p, with_host(spec(), json!({"SecurityOpt": [option]})));
        assert_eq!(v.rule, Rule::Unconfined, "{option}");
        assert!(!v.to_string().contains("SCMP_ACT_ALLOW"), "{v}");
    }
    allowed(
        &p,
        with_host(
            spec(),
            json!({"SecurityOpt": ["no-new-privileges", "apparmor=docker-default"]}),
        ),
    );
}

#[test]
fn images_outside_the_allowed_registries() {
    let p = policy("[allow]\nregistries = [\"registry.internal:5000/*\", \"local/*\"]\n");
    let v = refused(
        &p,
        ContainerSpec {
            image: "busybox".into(),
            ..spec()
        },
    );
    assert_eq!((v.rule, v.field.as_str()), (Rule::Registries, "image"));
    assert_eq!(
        v.to_string(),
        "registries (image): busybox is not in an allowed registry"
    );
    allowed(&p, spec());
    allowed(
        &p,
        ContainerSpec {
            image: "registry.internal:5000/team/flow:1".into(),
            ..spec()
        },
    );
}

#[test]
fn create_kwargs_outside_the_allow_list() {
    let p = policy("[allow]\ncreate_kwargs = [\"user\", \"shm_size\"]\n");
    let v = refused(
        &p,
        ContainerSpec {
            create_kwargs_keys: vec!["user".into(), "log_config".into()],
            ..spec()
        },
    );
    assert_eq!(
        v.to_string(),
        "create_kwargs (container_create_kwargs.log_config): not an allowed container_create_kwargs key"
    );
    allowed(
        &p,
        ContainerSpec {
            create_kwargs_keys: vec!["shm_size".into()],
            ..spec()
        },
    );
}

/// A tree: `allowed/` (the allowed prefix) holding a real directory, a link out of it and a
/// link to a fake Docker socket; the policy protects that socket.
struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Tree {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("allowed/data")).unwrap();
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("run/docker.sock"), "").unwrap();
        symlink(root.join("etc"), root.join("allowed/escape")).unwrap();
        symlink(root.join("run/docker.sock"), root.join("allowed/sock")).unwrap();
        symlink(root.join("allowed/data"), root.join("allowed/alias")).unwrap();
        Self { _dir: dir, root }
    }

    fn path(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    fn policy(&self) -> HostPolicy {
        policy(&format!(
            "[deny]\nbind_outside = [\"{}\"]\n",
            self.path("allowed")
        ))
        .with_docker_socket(self.root.join("run/docker.sock"))
    }
}

#[test]
fn binds_are_judged_after_resolving_links_on_the_host() {
    let tree = Tree::new();
    let p = tree.policy();
    let bind = |rel: &str| ContainerSpec {
        binds: vec![format!("{}:/x:ro", tree.path(rel))],
        ..spec()
    };
    let (s, applied) = allowed(&p, bind("allowed/data"));
    assert_eq!(
        s.binds,
        vec![format!("{}:/x:ro", tree.path("allowed/data"))]
    );
    assert!(applied.changes.is_empty());
    // A missing directory under the prefix (the Engine creates it) is fine.
    allowed(&p, bind("allowed/new/dir"));
    // A link inside the prefix to another place inside it: mounted by its real path.
    let (s, applied) = allowed(&p, bind("allowed/alias"));
    assert_eq!(
        s.binds,
        vec![format!("{}:/x:ro", tree.path("allowed/data"))]
    );
    assert_eq!(applied.changes.len(), 1, "{applied}");

    let v = refused(&p, bind("etc"));
    assert_eq!((v.rule, v.field.as_str()), (Rule::BindOutside, "volumes.0"));
    let v = refused(&p, bind("allowed/escape"));
    assert!(
        v.to_string()
            .contains(&format!("resolves to {}", tree.path("etc"))),
        "{v}"
    );
    let v = refused(&p, bind("allowed/sock"));
    assert!(v.to_string().contains("is the Docker socket"), "{v}");
    let v = refused(&p, bind("run"));
    assert!(v.to_string().contains("holds the Docker socket"), "{v}");
    let v = refused(&p, bind("allowed/../etc"));
    assert!(v.to_string().contains("without `..`"), "{v}");
    // Named and anonymous volumes are not host paths.
    allowed(
        &p,
        ContainerSpec {
            binds: vec!["cache:/cache".into(), "/anon".into()],
            ..spec()
        },
    );
}

#[test]
fn the_socket_is_refused_even_under_an_allowed_prefix() {
    let tree = Tree::new();
    let p = policy(&format!("[deny]\nbind_outside = [\"{}\"]\n", tree.path("")))
        .with_docker_socket(tree.root.join("run/docker.sock"));
    let v = refused(
        &p,
        ContainerSpec {
            binds: vec![format!("{}:/s", tree.path("allowed/sock"))],
            ..spec()
        },
    );
    assert!(v.to_string().contains("Docker socket"), "{v}");
}

#[test]
fn mounts_and_volumes_from_are_judged_too() {
    let tree = Tree::new();
    let p = tree.policy();
    let mount = |source: String| {
        with_host(
            spec(),
            json!({"Mounts": [{"Type": "bind", "Source": source, "Target": "/m"}]}),
        )
    };
    let v = refused(&p, mount(tree.path("allowed/escape")));
    assert_eq!(v.field, "container_create_kwargs.mounts.0");
    let (s, _) = allowed(&p, mount(tree.path("allowed/alias")));
    assert_eq!(
        s.host_config_overrides["Mounts"][0]["Source"],
        json!(tree.path("allowed/data"))
    );
    let v = refused(
        &p,
        with_host(
            spec(),
            json!({"Mounts": [{"Type": "volume", "Source": "v", "Target": "/v",
        "VolumeOptions": {"DriverConfig": {"Name": "local", "Options": {"type": "none", "o": "bind", "device": "/"}}}}]}),
        ),
    );
    assert_eq!(v.rule, Rule::BindOutside);
    let v = refused(&p, with_host(spec(), json!({"VolumesFrom": ["other"]})));
    assert_eq!(v.field, "container_create_kwargs.volumes_from");
}

#[test]
fn host_paths_can_be_resolved_by_another_resolver() {
    struct Everything(PathBuf);
    impl HostPaths for Everything {
        fn resolve(&self, path: &Path) -> PathBuf {
            if path.starts_with("/srv/data") {
                self.0.clone()
            } else {
                path.to_owned()
            }
        }
    }
    let p = policy("[deny]\nbind_outside = [\"/srv/data\"]\n")
        .with_host_paths(Arc::new(Everything(PathBuf::from("/run/docker.sock"))));
    let v = refused(
        &p,
        ContainerSpec {
            binds: vec!["/srv/data/x:/x".into()],
            ..spec()
        },
    );
    assert!(v.to_string().contains("Docker socket"), "{v}");
}

#[test]
fn forced_options_reach_the_spec() {
    let p = policy(
        r#"[force]
no_new_privileges = true
read_only_rootfs = true
user = "1000:1000"
pids_limit = 512
memory = "256m"
max_memory = "1g"
cpus = 0.5
max_cpus = 2
cap_drop = ["net_raw"]
"#,
    );
    let (s, applied) = allowed(
        &p,
        with_host(
            spec(),
            json!({"SecurityOpt": ["no-new-privileges:false"], "PidsLimit": 100000, "Tmpfs": {"/run": "size=1m"}, "CapDrop": ["MKNOD"]}),
        ),
    );
    let hc = &s.host_config_overrides;
    assert_eq!(hc["SecurityOpt"], json!(["no-new-privileges"]));
    assert_eq!(hc["ReadonlyRootfs"], json!(true));
    assert_eq!(hc["Tmpfs"], json!({"/run": "size=1m", "/tmp": ""}));
    assert_eq!(hc["PidsLimit"], json!(512));
    assert_eq!(hc["NanoCpus"], json!(500_000_000));
    assert_eq!(hc["CapDrop"], json!(["MKNOD", "NET_RAW"]));
    assert_eq!(s.config_overrides["User"], json!("1000:1000"));
    assert_eq!(s.mem_limit, Some(256 << 20));
    assert!(applied.to_string().contains("User 1000:1000"), "{applied}");
    // A job's own lower pids limit, memory and CPUs within the maximum are kept.
    let (s, _) = allowed(
        &p,
        with_host(
            ContainerSpec {
                mem_limit: Some(512 << 20),
                ..spec()
            },
            json!({"PidsLimit": 10, "NanoCpus": 1_500_000_000}),
        ),
    );
    assert_eq!(s.host_config_overrides["PidsLimit"], json!(10));
    assert_eq!(s.host_config_overrides["NanoCpus"], json!(1_500_000_000));
    assert_eq!(s.mem_limit, Some(512 << 20));
    // Above the maximum: refused, not clamped.
    let v = refused(
        &p,
        ContainerSpec {
            mem_limit: Some(2 << 30),
            ..spec()
        },
    );
    assert_eq!((v.rule, v.field.as_str()), (Rule::MaxMemory, "mem_limit"));
    let v = refused(
        &p,
        with_host(spec(), json!({"NanoCpus": 3_000_000_000_i64})),
    );
    assert_eq!((v.rule, v.field.as_str()), (Rule::MaxCpus, "cpus"));
    let v = refused(&p, with_host(spec(), json!({"CpuQuota": 400_000})));
    assert_eq!(v.field, "container_create_kwargs.cpu_quota");
}

#[test]
fn a_maximum_alone_is_also_the_default() {
    let p = policy("[force]\nmax_memory = \"1g\"\nmax_cpus = 2\n");
    let (s, _) = allowed(&p, spec());
    assert_eq!(s.mem_limit, Some(1 << 30));
    assert_eq!(s.host_config_overrides["NanoCpus"], json!(2_000_000_000));
}

#[test]
fn describe_names_every_rule() {
    let p = policy(
        "[deny]\nprivileged = true\nbind_outside = [\"/srv\"]\n[allow]\nregistries = [\"local/*\"]\n[force]\nuser = \"1000\"\n",
    );
    let text = p.describe().join("\n");
    for needle in [
        "privileged",
        "/srv",
        "/var/run/docker.sock",
        "local/*",
        "user 1000",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

/// The example policy of `deploy/` (the one the systemd unit names) reads, and the README's
/// example too.
#[test]
fn the_shipped_examples_read() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/policy.toml");
    let policy = HostPolicy::load(Path::new(example)).unwrap_or_else(|e| panic!("{e}"));
    assert!(policy.describe().len() > 10, "{:?}", policy.describe());
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Host policy")
        .nth(1)
        .expect("a Host policy section");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a TOML example");
    HostPolicy::parse(toml, Path::new("README.md")).unwrap_or_else(|e| panic!("{e}"));
}
