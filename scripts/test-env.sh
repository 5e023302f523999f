#!/usr/bin/env bash
# Prepares everything the test suite talks to, idempotently, on a Debian machine as root:
#   - a Docker daemon (the running one; dockerd is started if none answers),
#   - Debian's PostgreSQL binaries (the tests run private clusters of their own),
#   - a Python venv with the reference Prefect server and worker (pinned), and one with a
#     Prefect 2.x server (venv-prefect2),
#   - local images built without any registry pull:
#       local/busybox:dw            FROM scratch + Debian's static busybox
#       local/prefect:3.9.1         debootstrap'ed Debian + python3 + prefect 3.9.1
#       local/prefect-flow:3.9.1    the above + tests/flows/flows.py
# Prints the variables the tests read (DW_TEST_VENV) on its last line.
#
# Re-running is cheap: every step checks whether its result is already there.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ENV_DIR=${DW_TEST_ENV_DIR:-$REPO/.test-env}
VENV=$ENV_DIR/venv
PREFECT_VERSION=3.9.1
PREFECT_DOCKER_VERSION=0.7.4
# A Prefect 2.x server, to check the REST path there (tests/prefect2.rs).
VENV2=$ENV_DIR/venv-prefect2
PREFECT2_VERSION=2.20.27
log() { printf '[test-env %s] %s\n' "$(date +%T)" "$*" >&2; }

mkdir -p "$ENV_DIR"

# ---------------------------------------------------------------- packages
need_pkgs=()
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
dpkg -s debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v podman >/dev/null 2>&1 || need_pkgs+=(podman)
command -v docker-registry >/dev/null 2>&1 || need_pkgs+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || need_pkgs+=(apache2-utils)
# PostgreSQL: the tests start private clusters from its binaries (tests/support/postgres.rs);
# Debian's default cluster is left as installed (its service is not needed).
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_pkgs+=(postgresql)
command -v setpriv >/dev/null 2>&1 || need_pkgs+=(util-linux)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# ---------------------------------------------------------------- rootless docker (tests/rootless.rs)
# rootlesskit, newuidmap and slirp4netns run a second dockerd as an unprivileged user; that
# user needs /dev/net/tun (slirp4netns) and /dev/fuse (fuse-overlayfs), which a stock Debian
# leaves at 0666 and some VM images at 0600.
rootless_pkgs=()
command -v rootlesskit >/dev/null 2>&1 || rootless_pkgs+=(rootlesskit)
command -v newuidmap >/dev/null 2>&1 || rootless_pkgs+=(uidmap)
command -v slirp4netns >/dev/null 2>&1 || rootless_pkgs+=(slirp4netns)
command -v fuse-overlayfs >/dev/null 2>&1 || rootless_pkgs+=(fuse-overlayfs)
if [ ${#rootless_pkgs[@]} -gt 0 ]; then
  log "installing ${rootless_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${rootless_pkgs[@]}" >/dev/null
fi
for dev in /dev/net/tun /dev/fuse; do
  if [ -e "$dev" ]; then chmod 0666 "$dev"; fi
done

# ---------------------------------------------------------------- docker daemon
if ! docker info >/dev/null 2>&1; then
  log "no Docker daemon answers; starting dockerd"
  nohup dockerd >"$ENV_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not come up; see $ENV_DIR/dockerd.log"; exit 1; }
fi

# ---------------------------------------------------------------- python venv
venv_ok() {
  [ -x "$VENV/bin/prefect" ] &&
    "$VENV/bin/python" - "$PREFECT_VERSION" "$PREFECT_DOCKER_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("prefect") == sys.argv[1], version("prefect")
assert version("prefect-docker") == sys.argv[2], version("prefect-docker")
EOF
}
if ! venv_ok; then
  log "creating venv $VENV (prefect==$PREFECT_VERSION prefect-docker==$PREFECT_DOCKER_VERSION)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "prefect==$PREFECT_VERSION" "prefect-docker==$PREFECT_DOCKER_VERSION"
  venv_ok || { log "venv check failed after install"; exit 1; }
fi

if ! { [ -x "$VENV2/bin/prefect" ] && "$VENV2/bin/python" -c "import sys; from importlib.metadata import version; sys.exit(version('prefect') != '$PREFECT2_VERSION')" 2>/dev/null; }; then
  log "creating venv $VENV2 (prefect==$PREFECT2_VERSION)"
  rm -rf "$VENV2"
  python3 -m venv "$VENV2"
  "$VENV2/bin/pip" install -q "prefect==$PREFECT2_VERSION"
fi

# ---------------------------------------------------------------- images
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have_image local/busybox:dw; then
  log "building local/busybox:dw"
  ctx=$(mktemp -d)
  cp /bin/busybox "$ctx/busybox"
  docker build -q -t local/busybox:dw -f "$REPO/tests/images/busybox.Dockerfile" "$ctx" >/dev/null
  rm -rf "$ctx"
fi

if ! have_image "local/prefect:$PREFECT_VERSION"; then
  log "building local/prefect:$PREFECT_VERSION from a debootstrap rootfs (a few minutes)"
  rootfs=$ENV_DIR/rootfs
  cleanup_rootfs() {
    umount "$rootfs/proc" 2>/dev/null || true
    umount "$rootfs/dev" 2>/dev/null || true
  }
  trap cleanup_rootfs EXIT
  cleanup_rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$ENV_DIR/debootstrap.log" 2>&1 ||
    { log "debootstrap failed; see $ENV_DIR/debootstrap.log"; exit 1; }
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/tmp/host-ca.crt"
  mount -t proc proc "$rootfs/proc"
  mount --bind /dev "$rootfs/dev"
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates >/dev/null' \
    >>"$ENV_DIR/debootstrap.log" 2>&1 || { log "apt in rootfs failed; see $ENV_DIR/debootstrap.log"; exit 1; }
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PIP_CERT=/tmp/host-ca.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    sh -c "python3 -m venv /opt/prefect && /opt/prefect/bin/pip install -q --no-cache-dir prefect==$PREFECT_VERSION" \
    >>"$ENV_DIR/debootstrap.log" 2>&1 || { log "pip in rootfs failed; see $ENV_DIR/debootstrap.log"; exit 1; }
  cleanup_rootfs
  trap - EXIT
  rm -f "$rootfs/tmp/host-ca.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/opt/prefect/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'CMD ["prefect","version"]' \
    - "local/prefect:$PREFECT_VERSION" >/dev/null
  rm -rf "$rootfs"
fi

# The flow image is cheap: rebuild it whenever the flows changed (docker caches the layers).
log "building local/prefect-flow:$PREFECT_VERSION"
docker build -q -t "local/prefect-flow:$PREFECT_VERSION" \
  -f "$REPO/tests/images/prefect-flow.Dockerfile" "$REPO/tests/flows" >/dev/null

log "ready"
echo "DW_TEST_VENV=$VENV"
