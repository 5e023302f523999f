//! The hello flow end to end against a rootless Docker daemon: Debian's `rootlesskit` and
//! `dockerd-rootless.sh` run as an unprivileged user this test creates, with a real Prefect
//! server on the host's 127.0.0.1. Under rootless Docker `host` networking is rootlesskit's
//! namespace and `host-gateway` its bridge, so the worker must send a localhost API URL to
//! rootlesskit's host loopback address instead; this proves it does, and that the flow's
//! Prefect engine reaches the server that way.
//!
//! Needs root (to create the user and start the daemon as it) and what `scripts/test-env.sh`
//! installs: `rootlesskit`, `uidmap`, `slirp4netns`, `fuse-overlayfs`, and `/dev/net/tun` and
//! `/dev/fuse` usable by unprivileged users (mode 0666, as on a stock Debian).

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// The unprivileged user the daemon runs as.
const USER: &str = "dwrootless";

fn output(cmd: &mut Command) -> (bool, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// A rootless dockerd (rootlesskit + dockerd-rootless.sh as [`USER`]), stopped when dropped.
struct RootlessDockerd {
    child: Child,
    socket: String,
    log: PathBuf,
}

impl RootlessDockerd {
    fn start() -> Self {
        let (_, uid) = output(Command::new("id").arg("-u"));
        assert_eq!(
            uid.trim(),
            "0",
            "the rootless test must run as root (it creates a user and starts a daemon as it)"
        );
        for tool in [
            "rootlesskit",
            "newuidmap",
            "slirp4netns",
            "fuse-overlayfs",
            "dockerd-rootless.sh",
        ] {
            let (found, _) = output(Command::new("sh").args([
                "-c",
                &format!("PATH=$PATH:/usr/share/docker.io/contrib command -v {tool}"),
            ]));
            assert!(
                found,
                "{tool} is missing — run `scripts/test-env.sh` (installs rootlesskit, uidmap, slirp4netns, fuse-overlayfs)"
            );
        }
        for device in ["/dev/net/tun", "/dev/fuse"] {
            let mode = std::fs::metadata(device)
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            assert_eq!(
                mode & 0o006,
                0o006,
                "{device} is not usable by unprivileged users (mode {mode:o}) — run `scripts/test-env.sh`"
            );
        }
        if !output(Command::new("id").arg(USER)).0 {
            run_ok(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", USER]));
        }
        let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
        if !subuid.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
            run_ok(Command::new("usermod").args([
                "--add-subuids",
                "300000-365535",
                "--add-subgids",
                "300000-365535",
                USER,
            ]));
        }
        let uid = output(Command::new("id").args(["-u", USER]))
            .1
            .trim()
            .to_owned();
        let gid = output(Command::new("id").args(["-g", USER]))
            .1
            .trim()
            .to_owned();
        let home = PathBuf::from(format!("/home/{USER}"));
        let runtime = PathBuf::from(format!("/run/user/{uid}"));
        std::fs::create_dir_all(&runtime).unwrap();
        run_ok(
            Command::new("chown")
                .arg(format!("{uid}:{gid}"))
                .arg(&runtime),
        );
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = format!("unix://{}/docker.sock", runtime.display());
        let answers = {
            let socket = socket.clone();
            move || output(Command::new("docker").args(["-H", &socket, "info"])).0
        };
        assert!(
            !answers(),
            "a rootless daemon already answers at {socket}; stop it first"
        );
        // What a daemon that was killed left behind.
        let _ = std::fs::remove_file(runtime.join("docker.pid"));
        let _ = std::fs::remove_dir_all(runtime.join("dockerd-rootlesskit"));
        let log = std::env::temp_dir().join(format!("{}.log", unique("dw-rootless-dockerd")));
        let file = std::fs::File::create(&log).unwrap();
        // A watchdog shell owns rootlesskit: it stops it when told to (TERM) and when this
        // test process is gone, so even a killed test leaves no daemon behind.
        let watchdog = r#"parent=$1; shift; "$@" & child=$!
trap 'kill $child 2>/dev/null; wait $child; exit 0' TERM INT
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 1; done
kill $child 2>/dev/null; wait $child"#;
        // The flags of dockerd-rootless.sh, except --disable-host-loopback: containers reach
        // the host's loopback at 10.0.2.2 only without it.
        let child = Command::new("sh")
            .args(["-c", watchdog, "sh", &std::process::id().to_string()])
            .args([
                "setpriv",
                "--reuid",
                &uid,
                "--regid",
                &gid,
                "--init-groups",
                "--",
                "rootlesskit",
            ])
            .args([
                "--net=slirp4netns",
                "--mtu=65520",
                "--slirp4netns-sandbox=auto",
                "--slirp4netns-seccomp=auto",
                "--port-driver=builtin",
                "--copy-up=/etc",
                "--copy-up=/run",
                "--propagation=rslave",
            ])
            .arg(format!(
                "--state-dir={}/dockerd-rootlesskit",
                runtime.display()
            ))
            .args(["dockerd-rootless.sh", "--storage-driver=fuse-overlayfs"])
            .arg(format!(
                "--data-root={}/.local/share/docker",
                home.display()
            ))
            .env_clear()
            .env("HOME", &home)
            .env("USER", USER)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env(
                "PATH",
                "/usr/share/docker.io/contrib:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("_DOCKERD_ROOTLESS_CHILD", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start rootlesskit");
        let mut daemon = Self { child, socket, log };
        eventually_blocking(
            Duration::from_secs(120),
            "the rootless dockerd to answer",
            || {
                if let Ok(Some(status)) = daemon.child.try_wait() {
                    panic!("rootlesskit exited ({status}):\n{}", daemon.log_text());
                }
                if answers() {
                    Ok(())
                } else {
                    Err(daemon.log_text())
                }
            },
        );
        daemon
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.args(["-H", &self.socket]);
        cmd
    }

    /// Copies a local image of the host's daemon into this one, unless it has it already
    /// (its data root is kept between runs).
    fn ensure_image(&self, image: &str) {
        if output(self.docker().args(["image", "inspect", image])).0 {
            return;
        }
        let tar = std::env::temp_dir().join(format!("{}.tar", unique("dw-rootless-image")));
        run_ok(
            Command::new("docker")
                .args(["save", "-o"])
                .arg(&tar)
                .arg(image),
        );
        let loaded = output(self.docker().arg("load").arg("-i").arg(&tar));
        let _ = std::fs::remove_file(&tar);
        assert!(
            loaded.0,
            "loading {image} into the rootless daemon: {}",
            loaded.1
        );
    }

    /// Ids of this daemon's containers of `pool`.
    fn containers(&self, pool: &str) -> Vec<String> {
        let filter = format!("label=io.prefect.work-pool-name={pool}");
        output(
            self.docker()
                .args(["ps", "-aq", "--no-trunc", "--filter", &filter]),
        )
        .1
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for RootlessDockerd {
    fn drop(&mut self) {
        // SIGTERM to the watchdog, which stops rootlesskit (and so dockerd and containerd
        // inside it) and waits for it.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let stopped = within_blocking(Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten()
        });
        if stopped.is_err() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_flow_completes_on_rootless_docker() {
    require_docker();
    let daemon = RootlessDockerd::start();
    let (_, info) = output(
        daemon
            .docker()
            .args(["info", "--format", "{{json .SecurityOptions}}"]),
    );
    assert!(
        info.contains("name=rootless"),
        "not a rootless daemon: {info}"
    );
    daemon.ensure_image(FLOW_IMAGE);

    let server = server();
    let api = Api::new(server);
    let pool = unique("rootless");
    let dep = api
        .create_deployment(
            &pool,
            "hello",
            "flows.py:hello",
            json!({"image": FLOW_IMAGE}),
        )
        .await;
    let run_id = api.create_flow_run(&dep, json!({})).await;
    let socket = daemon.socket.clone();
    let worker = WorkerProcess::start(server, &["--pool", &pool], &[("DOCKER_HOST", &socket)]);
    worker
        .wait_for_output("rootless Docker", Duration::from_secs(60))
        .await;
    let run = api
        .wait_for_final_state(&run_id, Duration::from_secs(600))
        .await;
    let containers = daemon.containers(&pool);
    let inspected: Value = containers
        .first()
        .map(|id| {
            let (_, text) = output(daemon.docker().args(["inspect", id]));
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null)[0].clone()
        })
        .unwrap_or(Value::Null);
    let _ = daemon
        .docker()
        .arg("rm")
        .arg("-f")
        .args(&containers)
        .output();
    assert_eq!(
        run_state(&run).0,
        "COMPLETED",
        "run: {run}\nworker:\n{}\ncontainer: {inspected}",
        worker.output()
    );
    // What made it work: no `host` network, the API URL through host.docker.internal, mapped
    // to rootlesskit's host loopback address.
    let host_config = &inspected["HostConfig"];
    assert_eq!(host_config["NetworkMode"], json!("default"), "{inspected}");
    assert_eq!(
        host_config["ExtraHosts"],
        json!(["host.docker.internal:10.0.2.2"]),
        "{inspected}"
    );
    let api_url = format!(
        "PREFECT_API_URL=http://host.docker.internal:{}/api",
        server.port
    );
    assert!(
        inspected["Config"]["Env"]
            .as_array()
            .is_some_and(|e| e.contains(&json!(api_url))),
        "{inspected}"
    );
    worker
        .wait_for_output("hello world from", Duration::from_secs(30))
        .await;
}
