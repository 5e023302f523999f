//! Extra real peers started per test: a registry with htpasswd auth, a private TLS Docker
//! daemon, and Podman's Docker-compatible service. Each is stopped by PID and its files
//! removed when the handle drops; none touches the machine's own daemon.

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{BUSYBOX, eventually_blocking, free_port, run_ok, unique, within_blocking};

fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{tool}` is missing — run `scripts/test-env.sh` (installs Debian's {package})"
    );
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    eventually_blocking(
        Duration::from_secs(60),
        format!("{what} to listen on 127.0.0.1:{port}"),
        || match TcpStream::connect(("127.0.0.1", port)) {
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "{e}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )),
        },
    );
}

fn pipe(from: &mut Command, to: &mut Command) {
    let mut producer = from.stdout(Stdio::piped()).spawn().expect("start producer");
    let out = producer.stdout.take().expect("stdout");
    let status = to.stdin(out).output().expect("run consumer");
    let produced = producer.wait().expect("wait producer");
    assert!(
        produced.success() && status.status.success(),
        "{from:?} | {to:?} failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// Debian's `docker-registry` on 127.0.0.1 with htpasswd (bcrypt) authentication.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The user that may push and pull.
    pub user: String,
    /// Its password.
    pub password: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    pub fn start() -> Self {
        require_tool("docker-registry", "docker-registry");
        require_tool("htpasswd", "apache2-utils");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let user = "dwuser".to_owned();
        let password = format!("pw-{}", unique("r"));
        let htpasswd = run_ok(Command::new("htpasswd").args(["-Bbn", &user, &password]));
        std::fs::write(dir.path().join("htpasswd"), htpasswd).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: dw-test\n    path: {root}/htpasswd\n",
            root = dir.path().display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = dir.path().join("registry.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start docker-registry");
        wait_for_port(port, "docker-registry", &log);
        Self {
            addr: format!("127.0.0.1:{port}"),
            user,
            password,
            dir,
            child,
        }
    }

    /// A private Docker CLI config dir holding this registry's login (as `docker login` writes it).
    pub fn docker_config(&self) -> PathBuf {
        let dir = self.dir.path().join("docker-config");
        std::fs::create_dir_all(&dir).unwrap();
        let mut login = Command::new("docker")
            .env("DOCKER_CONFIG", &dir)
            .args([
                "login",
                "--username",
                &self.user,
                "--password-stdin",
                &self.addr,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        login
            .stdin
            .take()
            .unwrap()
            .write_all(self.password.as_bytes())
            .unwrap();
        let out = login.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "docker login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    /// Pushes the busybox test image as `<registry>/dw/busybox:<tag>` and removes the local tag,
    /// so using it needs a real pull.
    pub fn push_busybox(&self, tag: &str) -> String {
        let config = self.docker_config();
        let image = format!("{}/dw/busybox:{tag}", self.addr);
        run_ok(Command::new("docker").args(["tag", BUSYBOX, &image]));
        run_ok(
            Command::new("docker")
                .env("DOCKER_CONFIG", &config)
                .args(["push", &image]),
        );
        run_ok(Command::new("docker").args(["rmi", &image]));
        image
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Docker daemon of the test's own, listening on 127.0.0.1 with TLS client verification
/// (certificates generated here), with its own bridge, data-root and exec-root, and
/// `--live-restore` so its containers survive a restart of the daemon.
pub struct TlsDockerd {
    /// `tcp://127.0.0.1:PORT`.
    pub host: String,
    /// `DOCKER_CERT_PATH` for clients: `ca.pem`, `cert.pem`, `key.pem`.
    pub client_certs: PathBuf,
    /// Its unix socket (for loading images with the CLI).
    pub socket: String,
    root: PathBuf,
    bridge: String,
    port: u16,
    child: Child,
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

/// A key and a certificate signed by `dir/ca.pem`, with the given subject and extensions.
fn issue_cert(dir: &Path, stem: &str, key: &str, cert: &str, subject: &str, extensions: &str) {
    let (csr, ext) = (format!("{stem}.csr"), format!("{stem}.ext"));
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", &csr, "-subj", subject,
        ],
    );
    std::fs::write(dir.join(&ext), extensions).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}

impl TlsDockerd {
    pub fn start() -> Self {
        require_tool("dockerd", "docker.io");
        require_tool("openssl", "openssl");
        require_tool("ip", "iproute2");
        // Short paths: containerd's sockets live under the exec-root.
        let root = PathBuf::from(format!("/tmp/{}", unique("dwd")));
        let certs = root.join("certs");
        let client = root.join("client");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::create_dir_all(&client).unwrap();
        openssl(
            &certs,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=dw-test-ca",
            ],
        );
        issue_cert(
            &certs,
            "server",
            "server-key.pem",
            "server-cert.pem",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        issue_cert(
            &certs,
            "client",
            "key.pem",
            "cert.pem",
            "/CN=dw-client",
            "extendedKeyUsage=clientAuth\n",
        );
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::copy(certs.join(f), client.join(f)).unwrap();
        }

        // Its own bridge; never --bridge=none (that deletes the host's docker0).
        let octet = 200 + (std::process::id() % 50);
        let bridge = format!("dwtls{octet}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        run_ok(Command::new("ip").args(["link", "add", "name", &bridge, "type", "bridge"]));
        run_ok(Command::new("ip").args([
            "addr",
            "add",
            &format!("172.31.{octet}.1/24"),
            "dev",
            &bridge,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &bridge, "up"]));

        let port = free_port();
        let socket = format!("unix://{}/docker.sock", root.display());
        // Its own (empty) config file: the machine's /etc/docker/daemon.json is not ours.
        std::fs::write(root.join("daemon.json"), "{}").unwrap();
        let child = Self::spawn(&root, &certs, port, &socket, &bridge);
        let mut daemon = Self {
            host: format!("tcp://127.0.0.1:{port}"),
            client_certs: client,
            socket,
            root,
            bridge,
            port,
            child,
        };
        daemon.wait_ready();
        pipe(
            Command::new("docker").args(["save", BUSYBOX]),
            Command::new("docker").args(["-H", &daemon.socket, "load", "-q"]),
        );
        daemon
    }
}

impl TlsDockerd {
    fn spawn(root: &Path, certs: &Path, port: u16, socket: &str, bridge: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("dockerd.log"))
            .unwrap();
        Command::new("dockerd")
            .arg("--config-file")
            .arg(root.join("daemon.json"))
            .args(["--tlsverify", "--tlscacert"])
            .arg(certs.join("ca.pem"))
            .arg("--tlscert")
            .arg(certs.join("server-cert.pem"))
            .arg("--tlskey")
            .arg(certs.join("server-key.pem"))
            .args(["-H", &format!("tcp://127.0.0.1:{port}"), "-H", socket])
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .args([
                "--bridge",
                bridge,
                "--iptables=false",
                "--ip-masq=false",
                "--storage-driver",
                "vfs",
                "--live-restore",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd")
    }

    fn wait_ready(&mut self) {
        let log = self.root.join("dockerd.log");
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        eventually_blocking(
            Duration::from_secs(60),
            "the private dockerd to answer `docker info`",
            || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("private dockerd exited ({status}):\n{}", log_text());
                }
                let ok = Command::new("docker")
                    .args(["-H", &self.socket, "info", "--format", "{{.ServerVersion}}"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok { Ok(()) } else { Err(log_text()) }
            },
        );
    }

    /// Stops the daemon by its PID (it stops its containers) and starts it again on the same
    /// port, data and certificates.
    pub fn restart(&mut self, down_for: Duration) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg(self.root.join("exec/netns/default"))
            .output();
        // Deliberately down for a while (the outage is what the caller tests), not a wait.
        std::thread::sleep(down_for);
        self.child = Self::spawn(
            &self.root,
            &self.root.join("certs"),
            self.port,
            &self.socket,
            &self.bridge,
        );
        self.wait_ready();
    }
}

impl Drop for TlsDockerd {
    fn drop(&mut self) {
        // Stop only the daemon this test started, by its PID.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        // Let it stop its containers; kill it if it takes longer than 20 s.
        let _ = within_blocking(Duration::from_secs(20), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
        // With --live-restore the containerd it started outlives it: end that by its PID too.
        if let Ok(pid) = std::fs::read_to_string(self.root.join("exec/containerd/containerd.pid")) {
            let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
        }
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r umount -l",
                self.root.display()
            ))
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `podman system service` on a private socket with private storage, holding the images it
/// was given (copied from the machine's Docker daemon).
pub struct PodmanService {
    /// `unix://…/podman.sock`.
    pub host: String,
    root: PathBuf,
    child: Child,
}

impl PodmanService {
    fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.root.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.root.join("storage.conf"));
        cmd
    }

    pub fn start(images: &[&str]) -> Self {
        require_tool("podman", "podman");
        let root = PathBuf::from(format!("/tmp/{}", unique("dwp")));
        std::fs::create_dir_all(root.join("events")).unwrap();
        // The machine caps rlimits below Podman's defaults; events go to a private file.
        std::fs::write(
            root.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{r}/events/events.log\"\ntmp_dir = \"{r}/tmp\"\n",
                r = root.display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{r}/storage\"\nrunroot = \"{r}/run\"\n",
                r = root.display()
            ),
        )
        .unwrap();
        let socket = root.join("podman.sock");
        let log = root.join("podman.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new("podman")
            .env("CONTAINERS_CONF", root.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", root.join("storage.conf"))
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start podman system service");
        let service = Self {
            host: format!("unix://{}", socket.display()),
            root,
            child,
        };
        eventually_blocking(
            Duration::from_secs(60),
            "the podman service to create its socket",
            || {
                if socket.exists() {
                    Ok(())
                } else {
                    Err(std::fs::read_to_string(&log).unwrap_or_default())
                }
            },
        );
        for image in images {
            pipe(
                Command::new("docker").args(["save", image]),
                service.podman().args(["load", "-q"]),
            );
        }
        service
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let _ = self.podman().args(["rm", "-af", "-t", "0"]).output();
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        // Overlay mounts of removed containers are gone; unmount anything left before deleting.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r umount -l",
                self.root.display()
            ))
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A TCP proxy to `target` that holds every chunk coming back for `delay`: a slow registry,
/// so a pull takes seconds and a test can act while a run is still being submitted.
pub struct SlowProxy {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowProxy {
    pub fn start(target: &str, delay: Duration) -> Self {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = target.to_owned();
        let stopping = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(&target) else {
                    continue;
                };
                let (mut c_read, mut u_write) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 || u_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = u_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut u_read, mut c_write) = (upstream, client);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = u_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        // Deliberate: the slowness is what this proxy is for.
                        std::thread::sleep(delay);
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { addr, stop }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(&self.addr);
    }
}
