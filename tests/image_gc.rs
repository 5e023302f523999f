//! Image garbage collection (`gc --images`, `start --gc-images`, `--min-free-disk`) with the
//! built binary against a real Prefect server, the real Docker daemon and, for the pull,
//! Debian's `docker-registry`.
//!
//! Every image a test makes is built `FROM local/busybox:dw` (or loaded from a hand-made
//! archive, to have an old creation time) with the label `dev.docker-worker.test=<unique>`,
//! so each is a distinct image; every collection is given that label (`--image-label`), so no
//! other image of the host — the shared test images above all — is ever looked at. A guard
//! removes the test's images and containers even when it fails.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::services::Registry;
use support::*;

/// How long the worker may take to act.
const TIMEOUT: Duration = Duration::from_secs(120);

/// One test image: its `repo:tag` (if it has one) and its id.
struct TestImage {
    name: String,
    id: String,
}

impl TestImage {
    fn short_id(&self) -> &str {
        &self.id["sha256:".len().."sha256:".len() + 12]
    }
}

/// Removes every image carrying `dev.docker-worker.test=<tag>` when dropped (children first,
/// as `-f` would not remove a parent before them).
struct ImagesGuard(String);

impl Drop for ImagesGuard {
    fn drop(&mut self) {
        for _ in 0..3 {
            let ids = image_ids(&self.0);
            if ids.is_empty() {
                return;
            }
            let _ = Command::new("docker")
                .arg("rmi")
                .arg("-f")
                .args(&ids)
                .output();
        }
    }
}

fn image_ids(tag: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "images",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label={TEST_LABEL}={tag}"),
        ])
        .output()
        .expect("docker images");
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    ids.dedup();
    ids
}

fn image_exists(id: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", id])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `FROM <from>` with the test label and a role label: a distinct image, tagged
/// `local/dw-igc-<role>:<tag>`.
fn build(tag: &str, role: &str, from: &str) -> TestImage {
    let name = format!("local/dw-igc-{role}:{tag}");
    let dockerfile = format!("FROM {from}\nLABEL {TEST_LABEL}={tag} {TEST_LABEL}.role={role}\n");
    let mut child = Command::new("docker")
        .args(["build", "-q", "-t", &name, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("docker build");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(dockerfile.as_bytes()).expect("dockerfile");
    }
    let out = child.wait_with_output().expect("docker build");
    assert!(
        out.status.success(),
        "docker build {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(id.starts_with("sha256:"), "{id}");
    TestImage { name, id }
}

/// An image created on 2020-01-01, loaded from an archive made here (`docker load` keeps the
/// creation time and sets no `LastTagTime`): untagged when `name` is `None`, else tagged with
/// `docker tag` afterwards (which sets its `LastTagTime` to now).
fn load_old(tag: &str, role: &str, name: Option<&str>) -> TestImage {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("layer")).unwrap();
    std::fs::write(d.join("layer/marker"), format!("{tag} {role}\n")).unwrap();
    run_ok(
        Command::new("tar")
            .args(["-cf", "layer.tar", "-C", "layer", "."])
            .current_dir(d),
    );
    let layer_digest = sha256(&d.join("layer.tar"));
    let config = json!({
        "architecture": "amd64", "os": "linux", "created": "2020-01-01T00:00:00Z",
        "config": {"Labels": {TEST_LABEL: tag, format!("{TEST_LABEL}.role"): role}},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created": "2020-01-01T00:00:00Z", "created_by": "docker-worker test"}],
    });
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    let manifest = json!([{"Config": "config.json", "RepoTags": null, "Layers": ["layer.tar"]}]);
    std::fs::write(d.join("manifest.json"), manifest.to_string()).unwrap();
    run_ok(
        Command::new("tar")
            .args([
                "-cf",
                "image.tar",
                "manifest.json",
                "config.json",
                "layer.tar",
            ])
            .current_dir(d),
    );
    run_ok(
        Command::new("docker")
            .args(["load", "-q", "-i"])
            .arg(d.join("image.tar")),
    );
    let id = format!("sha256:{}", sha256(&d.join("config.json")));
    assert!(image_exists(&id), "{id} was not loaded");
    if let Some(name) = name {
        run_ok(Command::new("docker").args(["tag", &id, name]));
    }
    TestImage {
        name: name.unwrap_or("<none>").to_owned(),
        id,
    }
}

fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// A container of `image` labelled with the test tag: running `sleep 600`, or exited.
fn container(tag: &str, image: &TestImage, running: bool) -> String {
    let command = if running { "sleep 600" } else { "true" };
    let id = run_ok(Command::new("docker").args([
        "run",
        "-d",
        "--label",
        &format!("{TEST_LABEL}={tag}"),
        &image.name,
        "sh",
        "-c",
        command,
    ]))
    .trim()
    .to_owned();
    if !running {
        run_ok(Command::new("docker").args(["wait", &id]));
    }
    id
}

/// `docker-worker gc ARGS` against the server: (exit code, stdout, stderr).
fn gc(server: &PrefectServer, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_docker-worker"))
        .arg("gc")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PREFECT_API_URL", &server.api_url)
        .output()
        .expect("run docker-worker gc");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The output line about `image`.
fn line<'a>(stdout: &'a str, image: &TestImage) -> &'a str {
    stdout
        .lines()
        .find(|l| l.contains(" image ") && l.contains(image.short_id()))
        .unwrap_or_else(|| panic!("no line for {} ({}) in:\n{stdout}", image.name, image.id))
}

fn position(stdout: &str, image: &TestImage) -> usize {
    stdout.find(line(stdout, image)).unwrap_or_default()
}

/// The decisions of `gc --images`, each against the real Engine and server: an image a
/// deployment names, one a deployment gets as the default image, one a waiting flow run names
/// in its own job variables, one a running and one a stopped container use, are kept; an
/// unused one, a child and its parent, and an old untagged one go; a young one (by creation,
/// or by a fresh tag on an old build) stays while `--older-than` says so. A dry run removes
/// nothing; a pool that does not exist removes nothing; untested images are never looked at.
#[tokio::test(flavor = "multi_thread")]
async fn gc_images_keeps_what_containers_and_deployments_use_and_removes_the_rest() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let tag = unique("igc");
    let label = format!("{TEST_LABEL}={tag}");
    let _images = ImagesGuard(tag.clone());
    let _containers = ContainerGuard::for_label(TEST_LABEL, &tag);
    let pool = unique("igc-pool");

    let referenced = build(&tag, "referenced", BUSYBOX);
    let default = build(&tag, "default", BUSYBOX);
    let by_run = build(&tag, "run", BUSYBOX);
    let running = build(&tag, "running", BUSYBOX);
    let stopped = build(&tag, "stopped", BUSYBOX);
    let orphan = build(&tag, "orphan", BUSYBOX);
    let parent = build(&tag, "parent", BUSYBOX);
    let child = build(&tag, "child", &parent.name);
    let old = load_old(&tag, "old", None);
    let retagged_name = format!("local/dw-igc-retagged:{tag}");
    let retagged = load_old(&tag, "retagged", Some(&retagged_name));

    api.busybox_deployment(&pool, json!({"image": referenced.name}))
        .await;
    // No image: runs get the default image.
    api.create_deployment(&pool, "exit-code", "flows.py:exit_code", json!({}))
        .await;
    // A run waiting with its own image (no worker polls this pool).
    let dep = api.busybox_deployment(&pool, json!({})).await;
    api.create_flow_run(&dep, json!({"image": by_run.name}))
        .await;
    container(&tag, &running, true);
    container(&tag, &stopped, false);
    let common = [
        "--images",
        "--pool",
        &pool,
        "--image-label",
        &label,
        "--default-image",
        &default.name,
    ];
    let all = [
        &referenced,
        &default,
        &by_run,
        &running,
        &stopped,
        &orphan,
        &parent,
        &child,
        &old,
        &retagged,
    ];
    let everything_there = |stdout: &str| {
        for image in all {
            assert!(image_exists(&image.id), "{} is gone:\n{stdout}", image.name);
        }
    };

    // A pool that does not exist: nothing is removed, and the run fails.
    let missing = unique("igc-missing");
    let (code, stdout, stderr) = gc(
        server,
        &[
            "--images",
            "--pool",
            &missing,
            "--image-label",
            &label,
            "--older-than",
            "0s",
        ],
    );
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "gc images: not run: could not tell which images the deployments use, so no image was removed: work pool '{missing}' does not exist"
        )),
        "{stdout}"
    );
    everything_there(&stdout);

    // Dry run: each decision is reported, nothing is removed.
    let mut args = common.to_vec();
    args.extend(["--older-than", "0s", "--dry-run"]);
    let (code, stdout, stderr) = gc(server, &args);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let deployment_of_pool = format!("of pool '{pool}' uses it");
    for (image, reason) in [
        (&referenced, deployment_of_pool.as_str()),
        (&default, deployment_of_pool.as_str()),
        (&by_run, "flow run '"),
        (&running, "(running) uses it"),
        (&stopped, "(exited) uses it"),
    ] {
        let l = line(&stdout, image);
        assert!(
            l.starts_with("kept image ") && l.contains(reason),
            "{l}\n{stdout}"
        );
    }
    assert!(
        line(&stdout, &by_run).contains(&deployment_of_pool),
        "{stdout}"
    );
    for image in [&orphan, &parent, &child, &old, &retagged] {
        let l = line(&stdout, image);
        assert!(l.starts_with("would remove image "), "{l}\n{stdout}");
    }
    assert!(
        position(&stdout, &child) < position(&stdout, &parent),
        "a child is decided before its parent:\n{stdout}"
    );
    assert!(
        line(&stdout, &old).contains("(created ") && line(&stdout, &old).contains("days ago)"),
        "created in 2020, never tagged:\n{stdout}"
    );
    let containers_summary = stdout
        .find("gc (dry run): ")
        .unwrap_or_else(|| panic!("no container summary before the images:\n{stdout}"));
    let images_part = &stdout[containers_summary..];
    assert!(
        images_part
            .trim_end()
            .ends_with("gc images (dry run): 5 would remove, 5 kept, 0 errors"),
        "{stdout}"
    );
    everything_there(&stdout);

    // A week: the images built or tagged just now are young; the old untagged one goes.
    let mut args = common.to_vec();
    args.extend(["--older-than", "7d"]);
    let (code, stdout, stderr) = gc(server, &args);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        line(&stdout, &old).starts_with("removed image <none> "),
        "{stdout}"
    );
    assert!(!image_exists(&old.id), "{stdout}");
    // Built images count from their tag (a build tags the image after creating it); the old
    // build from its fresh `docker tag`.
    for (image, age) in [
        (&orphan, "(tagged "),
        (&child, "(tagged "),
        (&retagged, "(tagged "),
    ] {
        let l = line(&stdout, image);
        assert!(
            l.starts_with("kept image ")
                && l.contains(age)
                && l.ends_with("created or tagged less than 7days ago"),
            "{l}\n{stdout}"
        );
        assert!(image_exists(&image.id), "{stdout}");
    }
    // The young child holds its parent back.
    assert!(
        line(&stdout, &parent).ends_with(&format!("image {} is built on it", child.name)),
        "{stdout}"
    );

    // No age limit: everything nobody uses goes, the child before its parent; the rest stays.
    let mut args = common.to_vec();
    args.extend(["--older-than", "0s"]);
    let (code, stdout, stderr) = gc(server, &args);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for image in [&orphan, &parent, &child, &retagged] {
        assert!(
            line(&stdout, image).starts_with("removed image "),
            "{stdout}"
        );
        assert!(
            !image_exists(&image.id),
            "{} survived:\n{stdout}",
            image.name
        );
    }
    for image in [&referenced, &default, &by_run, &running, &stopped] {
        assert!(
            image_exists(&image.id),
            "{} was removed:\n{stdout}",
            image.name
        );
    }
    assert!(
        stdout
            .trim_end()
            .ends_with("gc images: 4 removed, 5 kept, 0 errors"),
        "{stdout}"
    );
    for shared in [BUSYBOX, FLOW_IMAGE] {
        assert!(image_exists(shared), "{shared} was removed:\n{stdout}");
    }
}

/// `start --gc-images`: the worker removes an unused image at its interval, and keeps one a
/// deployment of *another* pool uses (workers of other pools may share the host) and one a
/// stopped container uses; the removal is counted.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_collects_images_at_its_interval() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let tag = unique("igc-d");
    let label = format!("{TEST_LABEL}={tag}");
    let _images = ImagesGuard(tag.clone());
    let _containers = ContainerGuard::for_label(TEST_LABEL, &tag);
    let pool = unique("igc-daemon");
    let other_pool = unique("igc-other");
    let _pool_guard = ContainerGuard::for_pool(&pool);
    let orphan = build(&tag, "orphan", BUSYBOX);
    let referenced = build(&tag, "referenced", BUSYBOX);
    let stopped = build(&tag, "stopped", BUSYBOX);
    api.busybox_deployment(&other_pool, json!({"image": referenced.name}))
        .await;
    container(&tag, &stopped, false);
    let port = free_port().to_string();
    let worker = WorkerProcess::start(
        server,
        &[
            "--pool",
            &pool,
            "--gc-interval",
            "1s",
            "--gc-older-than",
            "0s",
            "--gc-images",
            "--with-metrics",
        ],
        &[
            ("DOCKER_WORKER_GC_IMAGE_LABEL", label.as_str()),
            ("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1"),
            ("PREFECT_WORKER_WEBSERVER_PORT", &port),
        ],
    );
    eventually(
        TIMEOUT,
        "the worker to remove the unused image",
        async || {
            if image_exists(&orphan.id) {
                Err(worker.output())
            } else {
                Ok(())
            }
        },
    )
    .await;
    // A later round that removed nothing: what is used is still there after it.
    eventually(
        TIMEOUT,
        "a collection round after the removal",
        async || {
            let log = worker.output();
            let after = log
                .lines()
                .skip_while(|l| !(l.contains("removed image ") && l.contains(orphan.short_id())))
                .skip(1)
                .any(|l| l.contains("gc images: 0 removed"));
            if after { Ok(()) } else { Err(log) }
        },
    )
    .await;
    let log = worker.output();
    assert!(image_exists(&referenced.id), "{log}");
    assert!(image_exists(&stopped.id), "{log}");
    assert!(
        log.lines().any(|l| l.contains("kept image ")
            && l.contains(referenced.short_id())
            && l.contains(&format!("of pool '{other_pool}' uses it"))),
        "{log}"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains("docker_worker_gc_images_removed_total 1"),
        "{metrics}"
    );
}

/// `--min-free-disk`: with a minimum no disk has, the pull of a run's image from a real
/// registry is preceded by an image collection (the unused image goes, the image another
/// deployment uses stays), then a warning that the disk is still short, then the pull, which
/// goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_disk_collects_images_before_the_pull_and_pulls_anyway() {
    require_docker();
    let server = server();
    let api = Api::new(server);
    let registry = Registry::start();
    let config = registry.docker_config();
    let tag = unique("igc-p");
    let label = format!("{TEST_LABEL}={tag}");
    let _images = ImagesGuard(tag.clone());
    let pool = unique("igc-pull");
    let guard = ContainerGuard::for_pool(&pool);
    // The run's image: labelled, pushed, and removed here, so the run must pull it.
    let pushed = build(&tag, "pulled", BUSYBOX);
    let remote = format!("{}/dw/igc:{tag}", registry.addr);
    run_ok(Command::new("docker").args(["tag", &pushed.name, &remote]));
    run_ok(
        Command::new("docker")
            .env("DOCKER_CONFIG", &config)
            .args(["push", &remote]),
    );
    run_ok(Command::new("docker").args(["rmi", &remote, &pushed.name]));
    assert!(!image_exists(&pushed.id));
    let orphan = build(&tag, "orphan", BUSYBOX);
    let referenced = build(&tag, "referenced", BUSYBOX);
    api.busybox_deployment(
        &pool,
        json!({"image": referenced.name, "image_pull_policy": "Never"}),
    )
    .await;
    let dep = api
        .busybox_deployment(
            &pool,
            json!({"image": remote, "image_pull_policy": "IfNotPresent", "command": "true"}),
        )
        .await;
    let worker = WorkerProcess::start(
        server,
        &[
            "--pool",
            &pool,
            "--min-free-disk",
            "1000t",
            "--gc-image-label",
            &label,
            "--gc-older-than",
            "0s",
        ],
        &[("DOCKER_CONFIG", config.to_str().unwrap())],
    );
    worker
        .wait_for_output(
            "--min-free-disk: images are collected before a pull",
            TIMEOUT,
        )
        .await;
    api.create_flow_run(&dep, json!({})).await;
    eventually(TIMEOUT, "the run's container", async || {
        if guard.containers().is_empty() {
            Err(worker.output())
        } else {
            Ok(())
        }
    })
    .await;
    let log = worker.output();
    let at = |needle: &str| {
        log.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{log}"))
    };
    let collecting = at(&format!("collecting images before pulling {remote}"));
    let removed = log
        .lines()
        .position(|l| l.contains("removed image ") && l.contains(orphan.short_id()))
        .unwrap_or_else(|| panic!("the orphan was not removed:\n{log}"));
    let still_short = at(&format!("pulling {remote} anyway"));
    let pulling = at(&format!("Pulling image '{remote}'"));
    assert!(
        collecting < removed && removed < still_short && still_short < pulling,
        "collect {collecting}, removed {removed}, warning {still_short}, pull {pulling}:\n{log}"
    );
    assert!(
        log.lines()
            .nth(still_short)
            .is_some_and(|l| l.contains("WARN")),
        "{log}"
    );
    assert!(!image_exists(&orphan.id), "{log}");
    assert!(image_exists(&referenced.id), "{log}");
    assert!(image_exists(&pushed.id), "the pull went on:\n{log}");
}
