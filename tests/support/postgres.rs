//! Debian's PostgreSQL as a private cluster of one test binary: its own data directory, port on
//! 127.0.0.1 and socket directory, run as the `postgres` user (initdb refuses root). A watchdog
//! shell stops it when the test process is gone, so even a panicking test leaves no server.
//! Each Prefect server gets a database of its own on it ([`Postgres::create_database`]).
//!
//! Durability is switched off (`fsync`, `full_page_writes`, `synchronous_commit`): a test
//! cluster is thrown away, and on 2 shared cores the flushes would only slow every test down.
//! The benchmark (`bench/bench.py --db postgres`) keeps PostgreSQL's defaults.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{eventually_blocking, free_port, run_ok, unique};

/// Which database the Prefect servers of this test process use: `DW_TEST_DB=postgres` or
/// `sqlite` (the default). `scripts/test.sh` runs the database-sensitive suites once with each.
pub fn use_postgres() -> bool {
    match std::env::var("DW_TEST_DB").as_deref() {
        Ok("postgres" | "postgresql") => true,
        Ok("" | "sqlite") | Err(_) => false,
        Ok(other) => panic!("DW_TEST_DB={other}: expected `sqlite` or `postgres`"),
    }
}

/// The newest PostgreSQL server binaries Debian installed (`/usr/lib/postgresql/<major>/bin`).
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<u32> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|m: &u32| root.join(m.to_string()).join("bin/postgres").exists())
        .collect();
    majors.sort_unstable();
    let major = majors.last().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is missing (no /usr/lib/postgresql/<major>/bin/postgres) — run \
             `scripts/test-env.sh` (installs Debian's postgresql)"
        )
    });
    root.join(major.to_string()).join("bin")
}

/// setpriv's arguments that make what follows run as `postgres`.
const AS_POSTGRES: [&str; 4] = [
    "--reuid=postgres",
    "--regid=postgres",
    "--init-groups",
    "--",
];

/// Runs `cmd` as the `postgres` user without a login session (setpriv execs in place, so the
/// PID we hold is the server's own).
fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(AS_POSTGRES)
        .arg(program)
        .env_remove("PGDATA")
        .env("HOME", "/tmp");
    cmd
}

/// A private PostgreSQL cluster on 127.0.0.1.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    child: Child,
    bin: PathBuf,
}

impl Postgres {
    /// Initialises a cluster in a fresh temporary directory and starts it.
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(unique("dw-pg"));
        run_ok(
            Command::new("install")
                .args(["-d", "-o", "postgres", "-g", "postgres", "-m", "0700"])
                .arg(&dir),
        );
        let data = dir.join("data");
        run_ok(
            as_postgres(&bin.join("initdb"))
                .args([
                    "--auth=trust",
                    "--username=postgres",
                    "--no-sync",
                    "--encoding=UTF8",
                ])
                .arg("--pgdata")
                .arg(&data),
        );
        let port = free_port();
        let log = dir.join("postgres.log");
        let script = r#"parent=$1; shift; "$@" & child=$!; trap 'kill -INT $child 2>/dev/null; exit 0' TERM INT
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 1; done
kill -INT "$child" 2>/dev/null; sleep 5; kill -9 "$child" 2>/dev/null; wait"#;
        let log_file = std::fs::File::create(&log).expect("postgres log");
        run_ok(Command::new("chown").arg("postgres").arg(&log));
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(std::process::id().to_string())
            .arg("setpriv")
            .args(AS_POSTGRES)
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=400",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
            ])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start postgres");
        let pg = Self {
            port,
            dir,
            child,
            bin,
        };
        eventually_blocking(
            Duration::from_secs(60),
            format!("PostgreSQL to accept connections on 127.0.0.1:{port}"),
            || {
                let ready = Command::new(pg.bin.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ready { Ok(()) } else { Err(pg.log_tail()) }
            },
        );
        pg
    }

    /// A new empty database, as the `postgresql+asyncpg://` URL a Prefect server takes in
    /// `PREFECT_API_DATABASE_CONNECTION_URL`.
    pub fn create_database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("prefect_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        run_ok(
            Command::new(self.bin.join("createdb"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .arg(&name),
        );
        format!(
            "postgresql+asyncpg://postgres@127.0.0.1:{}/{name}",
            self.port
        )
    }

    /// The last lines the server logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The one cluster of this test binary, started on first use and never dropped: its watchdog
/// stops it when the process exits (its files stay in the temp dir, as a server's home does).
pub fn cluster() -> &'static Postgres {
    static CLUSTER: OnceLock<Postgres> = OnceLock::new();
    CLUSTER.get_or_init(Postgres::start)
}
