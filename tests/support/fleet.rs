//! A fleet of Docker hosts on one machine: a Linux bridge the test creates in the root network
//! namespace (10.X.0.1/24, X picked so no route, address or link of the machine uses it), and
//! per host a network namespace on that bridge (a veth pair, 10.X.0.N), a private `dockerd` in
//! it (its own data-root, exec-root, pidfile, socket and mount namespace, storage `vfs`, no
//! iptables) and the `docker-worker` binary in the same namespace, talking to a Prefect server
//! that listens on the bridge's address.
//!
//! Every process of a host — dockerd, its containerd and shims, the containers (through
//! `--cgroup-parent`) and the worker — lives in one cgroup v1 freezer group of its own, so a
//! host is lost the way a machine is: everything frozen, SIGKILLed and thawed at once
//! ([`Host::lose`]). Teardown is by that group, the namespaces and links named here, and the
//! directory made here; a watchdog shell does the same when the test process is gone, so even a
//! panicking test leaves nothing behind.
//!
//! Processes are put in a namespace with `nsenter --net` rather than `ip netns exec`: the latter
//! mounts a fresh `/sys`, which hides the cgroup hierarchies dockerd needs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use super::{BUSYBOX, WorkerProcess, eventually_blocking, run_ok, within_blocking};

/// The freezer hierarchy the hosts' cgroups live in.
const FREEZER: &str = "/sys/fs/cgroup/freezer";

fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{tool}` is missing — the fleet suite needs it (Debian's {package}); run `scripts/test-env.sh`"
    );
}

/// Fails loudly unless everything a fleet needs is here.
pub fn require_fleet_peers() {
    require("ip", "iproute2");
    require("nsenter", "util-linux");
    require("unshare", "util-linux");
    require("dockerd", "docker.io");
    require("docker", "docker.io");
    assert!(
        Path::new(FREEZER).join("cgroup.procs").exists(),
        "the cgroup v1 freezer hierarchy is missing at {FREEZER} — the fleet suite kills a host \
         through it (a machine with cgroup v1 controllers mounted, as this Docker uses)"
    );
    assert!(
        nix_is_root(),
        "the fleet suite must run as root (it creates network namespaces, links and cgroups)"
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Shell that ends every process of the freezer group `cg` (and its children groups): freeze,
/// SIGKILL, thaw, until none is left; then removes the groups docker made under it in every
/// hierarchy.
fn kill_group_script(cg_rel: &str) -> String {
    format!(
        r#"cg={FREEZER}/{cg_rel}
if [ -d "$cg" ]; then
  for i in 1 2 3 4 5 6 7 8 9 10; do
    pids=$(find "$cg" -name cgroup.procs -exec cat {{}} + 2>/dev/null)
    [ -z "$pids" ] && break
    echo FROZEN > "$cg/freezer.state" 2>/dev/null
    kill -9 $pids 2>/dev/null
    echo THAWED > "$cg/freezer.state" 2>/dev/null
    sleep 0.3
  done
fi
for d in /sys/fs/cgroup/*/{cg_rel}; do [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {{}} \; 2>/dev/null; done
"#
    )
}

/// Shell that unmounts whatever is still mounted under `dir` and removes it.
fn remove_dir_script(dir: &Path) -> String {
    format!(
        "grep -o ' {d}[^ ]*' /proc/mounts | sort -r | xargs -r umount -l 2>/dev/null; rm -rf {d}\n",
        d = dir.display()
    )
}

fn sh(script: &str) {
    let _ = Command::new("sh").arg("-c").arg(script).output();
}

/// The bridge the hosts hang off, and the directory their files live in.
pub struct Network {
    /// `dwf<X>`: the prefix of every name this network makes (bridge, namespaces, cgroups).
    pub prefix: String,
    /// `10.X.0.1`: the bridge's address in the root namespace (the Prefect server listens here).
    pub gateway: String,
    /// `/tmp/dwf<X>`.
    dir: PathBuf,
    /// The busybox image saved once, loaded into every host.
    image_tar: PathBuf,
    next_host: AtomicU8,
    watchdog: Child,
}

impl Network {
    /// Creates the bridge on a 10.X.0.0/24 that nothing on the machine uses.
    pub fn start() -> Self {
        require_fleet_peers();
        let routes = run_ok(Command::new("ip").args(["-o", "route", "show", "table", "all"]))
            + &run_ok(Command::new("ip").args(["-o", "addr"]))
            + &run_ok(Command::new("ip").args(["-o", "link"]));
        let start = 100 + (std::process::id() % 150) as u8;
        let (x, dir) = (0..150u8)
            .map(|i| 100 + (start - 100 + i) % 150)
            .find_map(|x| {
                let prefix = format!("dwf{x}");
                if routes.contains(&format!("10.{x}.")) || routes.contains(&prefix) {
                    return None;
                }
                // The directory is the lock: another test binary picking the same X fails here.
                let dir = PathBuf::from(format!("/tmp/{prefix}"));
                std::fs::create_dir(&dir).ok().map(|()| (x, dir))
            })
            .expect("no free 10.X.0.0/24 for the fleet bridge");
        let prefix = format!("dwf{x}");
        let bridge = format!("{prefix}b");
        let gateway = format!("10.{x}.0.1");
        let teardown = Self::teardown_script(&prefix, &dir);
        std::fs::write(dir.join("teardown.sh"), &teardown).expect("teardown script");
        // The watchdog: when this test process is gone, tear the whole network down.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                r#"parent=$1; trap 'exit 0' TERM; while kill -0 "$parent" 2>/dev/null; do sleep 1; done; sh "$2""#,
            )
            .arg("sh")
            .arg(std::process::id().to_string())
            .arg(dir.join("teardown.sh"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fleet watchdog");
        run_ok(Command::new("ip").args(["link", "add", "name", &bridge, "type", "bridge"]));
        run_ok(Command::new("ip").args(["addr", "add", &format!("{gateway}/24"), "dev", &bridge]));
        run_ok(Command::new("ip").args(["link", "set", &bridge, "up"]));
        let image_tar = dir.join("busybox.tar");
        run_ok(
            Command::new("docker")
                .args(["save", "-o"])
                .arg(&image_tar)
                .arg(BUSYBOX),
        );
        eprintln!("[fleet] bridge {bridge} at {gateway}/24");
        Self {
            prefix,
            gateway,
            dir,
            image_tar,
            next_host: AtomicU8::new(1),
            watchdog,
        }
    }

    fn teardown_script(prefix: &str, dir: &Path) -> String {
        format!(
            "{kill}for ns in $(ip netns list | awk '{{print $1}}' | grep '^{prefix}h'); do ip netns del $ns; done\nip link del {prefix}b 2>/dev/null\n{rm}",
            kill = kill_group_script(prefix),
            rm = remove_dir_script(dir),
        )
    }

    /// A new host on this network with its dockerd running and the busybox image loaded (no
    /// worker yet). `label` names it in the test's output (`host-1`).
    pub fn host(&self, label: &str) -> Host {
        let n = self.next_host.fetch_add(1, Ordering::SeqCst);
        assert!(n < 240, "too many hosts on one fleet network");
        let ns = format!("{}h{n}", self.prefix);
        let peer = format!("{}p{n}", self.prefix);
        let addr = format!(
            "{}.{}",
            self.gateway.rsplit_once('.').map_or("", |(net, _)| net),
            10 + n
        );
        run_ok(Command::new("ip").args(["netns", "add", &ns]));
        run_ok(Command::new("ip").args([
            "link", "add", &ns, "type", "veth", "peer", "name", &peer, "netns", &ns,
        ]));
        run_ok(Command::new("ip").args([
            "link",
            "set",
            &ns,
            "master",
            &format!("{}b", self.prefix),
            "up",
        ]));
        run_ok(Command::new("ip").args([
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &peer,
        ]));
        run_ok(Command::new("ip").args(["-n", &ns, "link", "set", &peer, "up"]));
        run_ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        let root = self.dir.join(format!("h{n}"));
        std::fs::create_dir_all(&root).expect("host dir");
        std::fs::write(root.join("daemon.json"), "{}").expect("daemon.json");
        let cg_rel = format!("{}/h{n}", self.prefix);
        std::fs::create_dir_all(Path::new(FREEZER).join(&cg_rel)).expect("host cgroup");
        let mut host = Host {
            label: label.to_owned(),
            ns,
            addr,
            socket: format!("unix://{}/docker.sock", root.display()),
            root,
            cg_rel,
            dockerd: None,
            worker: None,
            old_logs: Vec::new(),
        };
        host.start_dockerd();
        run_ok(
            Command::new("docker")
                .args(["-H", &host.socket, "load", "-q", "-i"])
                .arg(&self.image_tar),
        );
        eprintln!(
            "[fleet] {} = netns {} at {}",
            host.label, host.ns, host.addr
        );
        host
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        sh(&Self::teardown_script(&self.prefix, &self.dir));
    }
}

/// One Docker host of a fleet: a network namespace, its dockerd, and (once started) its worker.
pub struct Host {
    /// `host-1`: the name the test gives it (and its worker's `--name`).
    pub label: String,
    /// Its network namespace (also the root side of its veth pair).
    pub ns: String,
    /// Its address on the bridge.
    pub addr: String,
    /// `unix://…/docker.sock` of its dockerd.
    pub socket: String,
    root: PathBuf,
    /// Its freezer group, relative to the hierarchy.
    cg_rel: String,
    dockerd: Option<Child>,
    /// Its worker, if one runs.
    pub worker: Option<WorkerProcess>,
    /// The logs of its earlier workers (stopped or lost), oldest first.
    old_logs: Vec<PathBuf>,
}

impl Host {
    /// `sh -c` that moves itself into this host's cgroup and execs the rest in its network
    /// namespace.
    fn in_host(&self) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec nsenter --net="$@""#)
            .arg("sh")
            .arg(Path::new(FREEZER).join(&self.cg_rel))
            .arg(format!("/run/netns/{}", self.ns));
        cmd
    }

    fn start_dockerd(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("dockerd.log"))
            .expect("dockerd log");
        let child = self
            .in_host()
            // Its own mount namespace: its mounts die with it.
            .args(["unshare", "--mount", "--propagation", "private", "dockerd"])
            .arg("--config-file")
            .arg(self.root.join("daemon.json"))
            .args(["-H", &self.socket])
            .arg("--data-root")
            .arg(self.root.join("data"))
            .arg("--exec-root")
            .arg(self.root.join("exec"))
            .arg("--pidfile")
            .arg(self.root.join("dockerd.pid"))
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--storage-driver",
                "vfs",
                "--cgroup-parent",
                &format!("/{}", self.cg_rel),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.dockerd = Some(child);
        let log = self.root.join("dockerd.log");
        eventually_blocking(
            Duration::from_secs(90),
            format!("{}'s dockerd to answer `docker info`", self.label),
            || {
                if let Some(Ok(Some(status))) = self.dockerd.as_mut().map(Child::try_wait) {
                    panic!(
                        "{}'s dockerd exited ({status}):\n{}",
                        self.label,
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                let ok = self
                    .docker()
                    .args(["info", "--format", "{{.ServerVersion}}"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    Ok(())
                } else {
                    Err(std::fs::read_to_string(&log).unwrap_or_default())
                }
            },
        );
    }

    /// The Docker CLI pointed at this host's daemon.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.args(["-H", &self.socket]);
        cmd
    }

    /// Starts this host's worker (`--name <label>`) in its namespace against `api_url`.
    pub fn start_worker(&mut self, api_url: &str, args: &[&str], env: &[(&str, &str)]) {
        assert!(
            self.worker.is_none(),
            "{} already runs a worker",
            self.label
        );
        let mut all_args = vec!["--name", self.label.as_str()];
        all_args.extend_from_slice(args);
        let mut all_env = vec![("DOCKER_HOST", self.socket.as_str()), ("RUST_LOG", "info")];
        all_env.extend_from_slice(env);
        let wrapper = self.in_host();
        self.worker = Some(WorkerProcess::start_wrapped(
            wrapper, api_url, &all_args, &all_env,
        ));
    }

    /// The output of every worker this host ran, oldest first.
    pub fn worker_output(&self) -> String {
        let mut out = String::new();
        for log in &self.old_logs {
            out += &std::fs::read_to_string(log).unwrap_or_default();
            out += "--- (worker stopped) ---\n";
        }
        out + &self
            .worker
            .as_ref()
            .map(WorkerProcess::output)
            .unwrap_or_default()
    }

    /// The last lines of [`Self::worker_output`], for assertion messages.
    pub fn worker_tail(&self, lines: usize) -> String {
        let out = self.worker_output();
        let all: Vec<&str> = out.lines().collect();
        format!(
            "{} worker (last {lines} lines):\n{}",
            self.label,
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    /// SIGTERMs the worker and waits up to `timeout` for it to exit; returns its exit status.
    pub async fn stop_worker(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut worker = self.worker.take().expect("a running worker");
        worker.signal("TERM");
        let status = worker.wait_timeout(timeout).await;
        self.old_logs.push(worker.log.clone());
        status.unwrap_or_else(|| {
            panic!(
                "{}'s worker did not exit within {timeout:?} of SIGTERM:\n{}",
                self.label,
                worker.output()
            )
        })
    }

    /// Loses the host: every process of it (dockerd, containerd, shims, containers, worker)
    /// frozen and SIGKILLed at once, as a machine that lost power.
    pub fn lose(&mut self) {
        sh(&format!(
            "cg={FREEZER}/{}\nfor i in 1 2 3 4 5 6 7 8 9 10; do pids=$(find \"$cg\" -name cgroup.procs -exec cat {{}} + 2>/dev/null); [ -z \"$pids\" ] && break; echo FROZEN > \"$cg/freezer.state\"; kill -9 $pids; echo THAWED > \"$cg/freezer.state\"; sleep 0.3; done",
            self.cg_rel
        ));
        if let Some(mut d) = self.dockerd.take() {
            let _ = d.wait();
        }
        if let Some(mut w) = self.worker.take() {
            let _ = w.child.wait();
            self.old_logs.push(w.log.clone());
        }
        let left = within_blocking(Duration::from_secs(10), || {
            std::fs::read_to_string(Path::new(FREEZER).join(&self.cg_rel).join("cgroup.procs"))
                .is_ok_and(|s| s.trim().is_empty())
        });
        assert!(left.is_ok(), "{}'s processes outlived its loss", self.label);
    }

    /// Boots a lost host again: /run is empty after a reboot (no pidfile, no exec-root), the
    /// data-root is as it was. Its worker is the caller's to start.
    pub fn boot(&mut self) {
        assert!(self.dockerd.is_none(), "{} is still up", self.label);
        let _ = std::fs::remove_file(self.root.join("dockerd.pid"));
        sh(&remove_dir_script(&self.root.join("exec")));
        self.start_dockerd();
    }

    /// Cuts (`false`) or heals (`true`) the host's link to the bridge, at the bridge's end: its
    /// packets are dropped silently, connections hang rather than fail.
    pub fn set_link(&self, up: bool) {
        run_ok(Command::new("ip").args(["link", "set", &self.ns, if up { "up" } else { "down" }]));
    }

    /// The pool's containers on this host: (flow-run id, worker name, state, exit code).
    pub fn containers(&self, pool: &str) -> Vec<HostContainer> {
        let out = run_ok(self.docker().args([
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=io.prefect.work-pool-name={pool}"),
            "--format",
            "{{.ID}}\t{{.Label \"io.prefect.flow-run-id\"}}\t{{.Label \"io.prefect.worker-name\"}}\t{{.State}}",
        ]));
        out.lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some(HostContainer {
                    id: f.next()?.to_owned(),
                    run_id: f.next()?.to_owned(),
                    worker: f.next()?.to_owned(),
                    state: f.next()?.to_owned(),
                })
            })
            .collect()
    }

    /// The Engine's ID (what `infrastructure_pid` starts with for containers of this host).
    pub fn engine_id(&self) -> String {
        run_ok(self.docker().args(["info", "--format", "{{.ID}}"]))
            .trim()
            .to_owned()
    }
}

/// One container of a pool on a host.
#[derive(Debug, Clone)]
pub struct HostContainer {
    pub id: String,
    pub run_id: String,
    pub worker: String,
    pub state: String,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(w) = &self.worker {
            let _ = Command::new("kill")
                .arg("-9")
                .arg(w.child.id().to_string())
                .status();
        }
        sh(&kill_group_script(&self.cg_rel));
        if let Some(mut d) = self.dockerd.take() {
            let _ = d.wait();
        }
        if let Some(mut w) = self.worker.take() {
            let _ = w.child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        sh(&remove_dir_script(&self.root));
    }
}
